"""The TCP Monitor μStack (mbx._monitor) end to end: NFs over crafted and example
captures, checked against the bytes and packets that were sent.

Directions: ``stream_dir`` 0 and an event's ``dir`` 0 are client -> server (the
client is the sender of the first pure SYN).
"""
import hashlib
import ipaddress
import json
import shutil
import struct
import subprocess
import sys

import dpkt
import pytest
from mbxtest import skip_or_fail_in_ci

import mbx
from mbx import NFError
from mbx._tcp import snapshot_decode
from mbx.errors import MbxError, PermissionDenied
from mbx.examples.capture import ether, tcp4, tcp6, write_pcap
from mbx.flows import STREAM_WINDOW_MAX, flows_json

M32 = 0xFFFFFFFF
FIN, SYN, RST, PSH, ACK = 0x01, 0x02, 0x04, 0x08, 0x10
CLI4, SRV4 = ("10.0.0.1", 40000), ("10.0.0.2", 80)
CLI6, SRV6 = ("2001:db8::1", 40000), ("2001:db8::2", 80)


# ---------------------------------------------------------------------------
# Crafting connections

class Conn:
    """Frames of one TCP connection.  ``c``/``s`` take sequence numbers relative to
    the sender's ISN and ACKs relative to the peer's, so ``c(1, 1, data=b"x")`` is
    the client's first data byte acking the server's SYN."""

    def __init__(self, cli=CLI4, srv=SRV4, isn_c=1000, isn_s=5000, v6=False, t=1.0):
        self.cli, self.srv, self.isn_c, self.isn_s, self.v6, self.t = (
            cli, srv, isn_c, isn_s, v6, t)
        self.frames = []

    def _add(self, src, dst, seq, ack, flags, data, win=65535):
        wrap, et = (tcp6, 0x86DD) if self.v6 else (tcp4, 0x0800)
        self.t += 0.001
        frame = ether(wrap(src[0], dst[0], src[1], dst[1], data, seq=seq & M32,
                           ack=ack & M32, flags=flags, win=win), et)
        self.frames.append((self.t, frame))
        return len(self.frames) - 1

    def c(self, seq, ack=0, flags=ACK, data=b"", win=65535):
        return self._add(self.cli, self.srv, self.isn_c + seq, self.isn_s + ack, flags, data,
                         win)

    def s(self, seq, ack=0, flags=ACK, data=b"", win=65535):
        return self._add(self.srv, self.cli, self.isn_s + seq, self.isn_c + ack, flags, data,
                         win)

    def handshake(self, syn_data=b""):
        self.c(0, -self.isn_s, SYN, syn_data)
        self.s(0, 1 + len(syn_data), SYN | ACK)
        self.c(1 + len(syn_data), 1)
        return 1 + len(syn_data)

    def exchange(self, req, resp, seg_c=None, seg_s=None, order=None, dup=(), syn_data=0,
                 close=True):
        """Handshake (the first ``syn_data`` request bytes in the SYN), the request in
        segments (``seg_c``: list of lengths), ACKed, then the response, ACKed, then a
        FIN close.  ``order`` permutes the request's segments, ``dup`` repeats the
        segments with those indices right after themselves."""
        c0 = self.handshake(req[:syn_data])
        rest = req[syn_data:]
        for who, data, segs, base, peer in (("c", rest, seg_c, c0, 1),
                                            ("s", resp, seg_s, 1, len(req) + 1)):
            send = self.c if who == "c" else self.s
            pieces, off = [], 0
            for n in segs or [len(data)]:
                pieces.append((base + off, data[off:off + n]))
                off += n
            assert off == len(data)
            idx = list(range(len(pieces)))
            if who == "c" and order is not None:
                idx = order
            for i in idx:
                for _ in range(2 if (who == "c" and i in dup) else 1):
                    send(pieces[i][0], peer, PSH | ACK, pieces[i][1])
            if who == "c":
                self.s(1, len(req) + 1)
            else:
                self.c(len(req) + 1, len(resp) + 1)
        if close:
            self.c(len(req) + 1, len(resp) + 1, FIN | ACK)
            self.s(len(resp) + 1, len(req) + 2, FIN | ACK)
            self.c(len(req) + 2, len(resp) + 2)
        return self.frames


class Recorder(mbx.NF):
    """Records events of the given types: (type_name, burst_pos, dir, fields, snapshot)
    and, for DATA_RDY, the bytes read."""

    def __init__(self, types, side="sender", name="rec", writes=False, read=True):
        super().__init__(name, writes=writes)
        self.events = []
        self.streams = {}           # (flow, stream_dir) -> bytearray
        self.read = read
        for t in types:
            self.sub(t, self.on, side=side)

    def on(self, ev):
        f = ev.fields() if ev.type_name != "PKT" else {}
        self.events.append((ev.type_name, ev.burst_pos, ev.dir, f, ev.snapshot, ev.flow))
        if ev.type_name == "DATA_RDY" and self.read:
            data = bytes(ev.read())
            assert len(data) == f["length"] == f["frontier"] - f["offset"]
            self.streams.setdefault((ev.flow, f["stream_dir"]), []).append(
                (f["offset"], f["frontier"], data))

    def of(self, name):
        return [e for e in self.events if e[0] == name]


class StreamCheck(mbx.NF):
    """Checks in its handler (in the NF's process when pipelined) that each DATA_RDY
    reads the bytes of the one of ``streams`` its frontier names (not another
    direction's); reports how many it checked."""

    def __init__(self, *streams):
        super().__init__("check")
        self.streams, self.checked = streams, 0
        self.sub(mbx.DATA_RDY, self.on_data, side="both")

    def on_data(self, ev):
        got = bytes(ev.read())
        (want,) = [s for s in self.streams if len(s) == ev.frontier]
        assert got == want[ev.offset:ev.frontier], \
            f"stream_dir {ev.stream_dir}: read {got[:8]!r}..., not {want[:8]!r}"
        self.checked += 1

    def report(self):
        return {"checked": self.checked}


def joined(chunks):
    """Bytes of a stream's DATA_RDY chunks, checking they are contiguous."""
    end = 0
    for off, frontier, _ in chunks:
        assert off == end, chunks
        end = frontier
    return b"".join(d for _, _, d in chunks)


def by_dir(rec):
    """{stream_dir: bytes} of a one-connection run."""
    flows = {f for f, _ in rec.streams}
    assert len(flows) == 1, flows
    return {d: joined(ch) for (_, d), ch in rec.streams.items()}


def tcp_of(frame):
    eth = dpkt.ethernet.Ethernet(frame)
    return eth.data, eth.data.data


def checksum_ok(frame):
    """Recompute the IP and TCP checksums with dpkt and compare."""
    ip, tcp = tcp_of(frame)
    raw = bytes(tcp)
    want = struct.unpack("!H", raw[16:18])[0]
    tcp.sum = 0
    if isinstance(ip, dpkt.ip6.IP6):
        ip.plen = len(tcp)
        tcp_raw = bytes(tcp)
        s = dpkt.struct.pack("!16s16sxxHxxxB", ip.src, ip.dst, len(tcp_raw), 6)
    else:
        tcp_raw = bytes(tcp)
        s = dpkt.struct.pack("!4s4sxBH", ip.src, ip.dst, 6, len(tcp_raw))
        hdr = bytearray(bytes(ip)[:ip.hl * 4])
        ipsum = struct.unpack("!H", hdr[10:12])[0]
        hdr[10:12] = b"\0\0"
        if dpkt.in_cksum(bytes(hdr)) != ipsum:
            return False
    tcp_raw = tcp_raw[:16] + b"\0\0" + tcp_raw[18:]
    return dpkt.in_cksum(s + tcp_raw) == want


REQ = b"GET /" + bytes(range(256)) * 3 + b" HTTP/1.1\r\n\r\n"
RESP = b"HTTP/1.1 200 OK\r\n\r\n" + bytes((i * 7) & 0xFF for i in range(3000))


# ---------------------------------------------------------------------------
# 1. DATA_RDY reassembly

def _expected_streams(path):
    """{(src, sport, dst, dport): bytes} of every TCP payload in capture order (the
    example capture sends every segment once, in order)."""
    out = {}
    with open(path, "rb") as fh:
        for _, buf in dpkt.pcap.Reader(fh):
            try:
                eth = dpkt.ethernet.Ethernet(buf)
            except dpkt.UnpackError:
                continue
            ip = eth.data
            if not isinstance(ip, dpkt.ip.IP | dpkt.ip6.IP6):
                continue
            tcp = ip.data
            if not isinstance(tcp, dpkt.tcp.TCP) or not tcp.data:
                continue
            key = (bytes(ip.src), tcp.sport, bytes(ip.dst), tcp.dport)
            out[key] = out.get(key, b"") + bytes(tcp.data)
    return out


def test_data_rdy_reassembles_example_capture(run, example_pcap):
    """Every byte of every TCP direction of the example capture, once, in order."""
    got = {}
    nf = mbx.NF("reader")

    def on(ev):
        # the packet that moved the frontier carries the data here (no gaps): orient
        # the key by the stream's sender
        assert ev.dir == ev.stream_dir
        import ipaddress
        key = (ipaddress.ip_address(ev.src_ip).packed, ev.sport,
               ipaddress.ip_address(ev.dst_ip).packed, ev.dport)
        prev = got.setdefault(key, [0, b""])
        assert ev.offset == prev[0]
        prev[0] = ev.frontier
        prev[1] += bytes(ev.read())

    nf.sub(mbx.DATA_RDY, on)
    counters, _ = run([nf], example_pcap)
    want = _expected_streams(example_pcap)
    assert {k: v[1] for k, v in got.items()} == want
    assert len(want) > 100
    assert counters["tcp"]["pool_chunks_in_use"] == 0


CASES = {
    "one_segment": dict(),
    "split": dict(seg_c=[1, 100, 7, 500, 200, len(REQ) - 808],
                  seg_s=[1448, 1448, 3019 - 2896]),
    "reordered": dict(seg_c=[100, 100, 100, 100, len(REQ) - 400], order=[2, 0, 4, 1, 3]),
    "duplicated": dict(seg_c=[300, 300, len(REQ) - 600], dup=(0, 2), order=[1, 0, 2]),
    "tfo": dict(syn_data=40, seg_c=[100, len(REQ) - 140]),
    "wrap": dict(isn_c=M32 - 150, isn_s=M32 - 1000, seg_c=[100, 100, len(REQ) - 200],
                 seg_s=[500, 500, 1000, 1019], order=[1, 2, 0]),
    "ipv6": dict(v6=True, seg_c=[10, len(REQ) - 10], order=[1, 0]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_data_rdy_hand_built(run, tmp_path, case):
    kw = dict(CASES[case])
    conn_kw = {k: kw.pop(k) for k in ("isn_c", "isn_s", "v6") if k in kw}
    if conn_kw.get("v6"):
        conn_kw.update(cli=CLI6, srv=SRV6)
    frames = Conn(**conn_kw).exchange(REQ, RESP[:3019], **kw)
    rec = Recorder([mbx.DATA_RDY])
    counters, out = run([rec], frames=frames)
    assert by_dir(rec) == {0: REQ, 1: RESP[:3019]}
    assert len(out) == len(frames)
    assert counters["tcp"]["gaps"] == counters["tcp"]["conflicts"] == 0


def test_a_read_of_the_event_s_stream_ends_at_its_frontier(run):
    """The stack delivers a whole burst before the NFs run: a read past a DATA_RDY's
    frontier returned the burst's later bytes too, so its result depended on --burst."""
    frames = Conn().exchange(REQ, RESP, seg_s=[1000, 1000, 1000, len(RESP) - 3000])
    for burst in (64, 1):
        got = []
        nf = mbx.NF("reader")
        nf.sub(mbx.DATA_RDY, lambda ev, got=got: got.append(
            (ev.frontier - ev.offset, len(ev.read(ev.offset, 10**6)),
             len(ev.read(0, 10**6)) == ev.frontier)), side="both")
        run([nf], frames=frames, burst=burst, retain=1 << 20)
        assert len(got) == 5 and all(a == b and whole for a, b, whole in got), got


@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
def test_reads_and_writes_past_the_frontier_are_judged_by_the_event(run, deploy):
    """At --burst 64 the stream was delivered past a DATA_RDY's frontier already:
    a write over it succeeded (bytes the NF was not shown) and a read past it
    returned nothing, where --burst 1 refused both."""
    frames = Conn().exchange(REQ, RESP, seg_s=[1000, 1000, 1000, len(RESP) - 3000])

    class Edge(mbx.NF):
        def __init__(self):
            super().__init__("edge", writes=deploy == "inline")
            self.sub(mbx.DATA_RDY, self.on, side="both")
            self.seen = {"events": 0, "beyond": 0, "at": 0, "last": 0, "write": 0}

        def on(self, ev):
            self.seen["events"] += 1
            try:
                ev.read(ev.frontier + 1, 4)
            except MbxError as exc:
                self.seen["beyond"] += "beyond this DATA_RDY's frontier" in str(exc)
            self.seen["at"] += len(ev.read(ev.frontier, 4)) == 0
            self.seen["last"] += len(ev.read(ev.frontier - 1, 4)) == 1
            if self.writes:
                try:
                    ev.write(ev.frontier - 1, b"ab")
                except MbxError as exc:
                    self.seen["write"] += "run past this DATA_RDY's frontier" in str(exc)

        def report(self):
            return self.seen

    for burst in (1, 64, 256):
        counters, _ = run([Edge()], frames=frames, burst=burst, deploy=deploy,
                          retain=1 << 20)
        seen = counters["nfs"]["edge"]["report"]
        n = seen["events"]
        assert n == 5 and seen == {"events": n, "beyond": n, "at": n, "last": n,
                                   "write": n if deploy == "inline" else 0}, (burst, seen)


def test_stream_arguments_out_of_range_are_refused_naming_the_nf(run):
    """stream_dir picks one of the connection's two streams: 2 read or overwrote the
    next connection's stream (or past the table: a crash); a negative offset gave a
    bare OverflowError, a float one was cut short silently."""
    frames = Conn().exchange(REQ, RESP) + Conn(cli=("10.0.0.3", 40001)).exchange(
        b"x" * 50, b"y" * 50)

    class Misuse(mbx.NF):
        def __init__(self):
            super().__init__("misuse", writes=True)
            self.sub(mbx.DATA_RDY, self.on)
            self.errors = []

        def on(self, ev):
            for call in (lambda: ev.read(0, 4096, stream_dir=2),
                         lambda: ev.write(0, b"Z", stream_dir=2),
                         lambda: ev.read(0, 10, stream_dir=-1),
                         lambda: ev.read(-1, 10),
                         lambda: ev.read(0, -1),
                         lambda: ev.write(-1, b"Z"),
                         lambda: ev.read(0.9, 10),
                         lambda: ev.write(float(ev.offset), b"Z"),
                         lambda: ev.read(0, True)):
                try:
                    call()
                except (TypeError, ValueError) as exc:
                    self.errors.append(str(exc))
                else:
                    self.errors.append(None)

    nf = Misuse()
    _, out = run([nf], frames=frames, max_streams=16)
    assert len(nf.errors) == 9 * 4
    for i, msg in enumerate(nf.errors):
        assert msg is not None and msg.startswith("NF misuse: ev."), (i, msg)
    assert "stream_dir must be 0 (client -> server) or 1" in nf.errors[0]
    assert "stream_dir must be 0" in nf.errors[1] and "not -1" in nf.errors[2]
    assert "offset must be from 0" in nf.errors[3] and "length must be" in nf.errors[4]
    assert "offset is a whole number, not float" in nf.errors[6]
    assert [bytes(tcp_of(f)[1].data) for _, f in out if tcp_of(f)[1].data] == \
        [bytes(tcp_of(f)[1].data) for _, f in frames if tcp_of(f)[1].data]


def test_read_released_bytes(run, tmp_path):
    """With retain=0 the bytes behind the frontier go back to the pool at the end of
    each burst: reading them later raises a clear MbxError; retain keeps them."""
    frames = Conn().exchange(REQ, RESP, seg_c=[100, 100, len(REQ) - 200])
    for retain, ok in ((0, False), (1 << 16, True)):
        results = []
        nf = mbx.NF("late")

        def on(ev, results=results):
            if ev.stream_dir == 0 and ev.offset > 0:
                try:
                    results.append(bytes(ev.read(0, 1)))
                except MbxError as exc:
                    results.append(str(exc))

        nf.sub(mbx.DATA_RDY, on)
        run([nf], frames=frames, burst=1, retain=retain)
        assert len(results) == 2
        for r in results:
            if ok:
                assert r == REQ[:1]
            else:
                assert "is no longer held" in r and "offset 0" in r, r


# ---------------------------------------------------------------------------
# 2. Only the work asked for

def test_no_data_rdy_subscriber_no_stream(run, example_pcap):
    rec = Recorder([mbx.PKT_TCP, mbx.FLOW_TCP])
    counters, _ = run([rec], example_pcap)
    assert counters["tcp"]["tcp_packets"] > 0
    assert counters["tcp"]["streams_opened"] == 0
    with_rdy = Recorder([mbx.DATA_RDY], name="rdy")
    counters, _ = run([with_rdy], example_pcap)
    assert counters["tcp"]["streams_opened"] > 0


def test_unsubscribing_frees_streams(run, tmp_path):
    """After mb_up_sub(DATA_RDY, flow, None), no more DATA_RDY for that flow and its
    streams are freed at its next packet (retain would otherwise keep chunks)."""
    frames = []
    for i in range(3):
        frames += Conn(cli=("10.0.0.1", 41000 + i), t=1 + i).exchange(
            REQ, RESP, seg_c=[100, len(REQ) - 100], seg_s=[1000, 1000, len(RESP) - 2000])

    def make(unsub):
        nf = mbx.NF("u")
        nf.rdy = {}
        nf.in_use = []

        def on_rdy(ev):
            nf.rdy[ev.flow] = nf.rdy.get(ev.flow, 0) + 1
            if unsub:
                nf.up_sub(mbx.DATA_RDY, ev.flow, None)

        def on_pkt(ev):
            nf.in_use.append(nf._bus.stream_reader.counters_tcp()["pool_chunks_in_use"])

        nf.sub(mbx.DATA_RDY, on_rdy)
        nf.sub(mbx.PKT_TCP, on_pkt)
        return nf

    nf = make(True)
    counters, _ = run([nf], frames=frames, burst=1, retain=1 << 20)
    assert sorted(nf.rdy.values()) == [1, 1, 1]
    assert counters["tcp"]["pool_chunks_in_use"] == 0
    # between the first data packet of a connection and its end, the stream is freed
    # as soon as the next packet comes: never more than one connection's chunks
    assert max(nf.in_use) >= 1
    ctl = make(False)
    counters2, _ = run([ctl], frames=frames, burst=1, retain=1 << 20)
    assert min(ctl.rdy.values()) > 1
    assert counters2["tcp"]["pool_chunks_in_use"] == 0
    assert sum(ctl.in_use) > sum(nf.in_use)
    # the first packet after each connection's first DATA_RDY sees no chunk in use
    per_conn = len(frames) // 3
    for i in range(3):
        assert nf.in_use[i * per_conn + 4] == 0, nf.in_use


def test_stack_choice(run, example_pcap):
    pkt = Recorder([mbx.PKT], read=False)
    counters, _ = run([pkt], example_pcap)
    assert "tcp" not in counters
    tcp = Recorder([mbx.PKT_TCP], name="t")
    counters, _ = run([tcp], example_pcap)
    assert counters["tcp"]["tcp_packets"] == len(tcp.events) > 0


# ---------------------------------------------------------------------------
# 3. Sides

def test_sides_counts(run, tmp_path):
    """Every packet updates both endpoints' stacks (the sender's, then the
    receiver's).  So per packet: side="sender" (default) and "receiver" give one
    PKT/TCP event, "both" two, and "client"/"server" one each: the client's stack
    raises the sender-side event for the client's packets and the receiver-side one
    for the server's.  (A subscription to one endpoint's *sent* packets only is
    "client"/"server" filtered on ``ev.dir``; see the §7.3 test below.)"""
    conn = Conn()
    frames = conn.exchange(b"abc", b"defgh")
    n = len(frames)
    n_c = sum(1 for _, f in frames if tcp_of(f)[1].sport == CLI4[1])
    counts = {}
    for side in ("sender", "receiver", "client", "server", "both"):
        rec = Recorder([mbx.PKT_TCP, mbx.FLOW_TCP_STATE], side=side, name=side)
        run([rec], frames=frames)
        pk = [e for e in rec.events if e[0].startswith("PKT/TCP")]
        counts[side] = len(pk)
        assert sorted({e[1] for e in pk}) == list(range(n))
        st = rec.of("FLOW/TCP/STATE")
        if side == "client":
            assert {e[3]["side"] for e in st} == {1}
        if side == "server":
            assert {e[3]["side"] for e in st} == {2}
        if side == "sender":
            # sender-side state changes: the side field names the packet's sender
            assert all(e[3]["side"] == 1 + e[2] for e in st)
        if side == "receiver":
            assert all(e[3]["side"] == 2 - e[2] for e in st)
    assert counts == {"sender": n, "receiver": n, "client": n, "server": n, "both": 2 * n}
    assert n_c == 6 and n == 10


def test_paper_config3_server_side_client_packets(run, tmp_path):
    """§7.3, config 3: the server-side stack only, for packets from the client: a
    side="server" subscription keeping ``dir == 0`` events gets one event per client
    packet, and the state changes it sees are the server's as it receives them."""
    frames = Conn().exchange(b"abc", b"defgh")
    rec = Recorder([mbx.PKT_TCP, mbx.FLOW_TCP_STATE], side="server")
    run([rec], frames=frames)
    mine = [e for e in rec.events if e[2] == 0]
    pk = [e for e in mine if e[0].startswith("PKT/TCP")]
    assert [e[1] for e in pk] == [0, 2, 3, 6, 7, 9]        # the client's packets
    st = [(e[3]["old_state"], e[3]["new_state"]) for e in mine if e[0] == "FLOW/TCP/STATE"]
    # CLOSED -> SYN_RCVD (the SYN), -> ESTABLISHED (the ACK), -> CLOSE_WAIT (the FIN),
    # LAST_ACK -> CLOSED (the last ACK)
    assert st == [(0, 3), (3, 4), (4, 7), (9, 0)]
    for e in pk:
        assert e[4]["receiver_is_client"] is False


# ---------------------------------------------------------------------------
# 4. Event types per packet

def test_event_types_per_packet(run, tmp_path):
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, b"hello")
    conn.s(1, 6, PSH | ACK, b"world!")
    conn.c(1, 1, PSH | ACK, b"hello")          # retransmission
    conn.c(6, 7, FIN | ACK)
    conn.s(7, 7, FIN | ACK)
    conn.c(7, 8)
    # a second connection closed by RST
    k2 = Conn(cli=("10.0.0.1", 40001), t=2)
    k2.handshake()
    k2.c(1, 1, PSH | ACK, b"x")
    k2.s(1, 2, RST | ACK)
    rec = Recorder([mbx.PKT_TCP, mbx.FLOW_TCP])
    run([rec], frames=conn.frames + k2.frames)
    f1, f2 = rec.events[0][5], [e for e in rec.events if e[1] == 9][0][5]
    types = [(e[1], e[0]) for e in rec.events if e[0].startswith("PKT") and e[5] == f1]
    assert [t for _, t in types] == [
        "PKT/TCP/SYN", "PKT/TCP/SYN", "PKT/TCP", "PKT/TCP", "PKT/TCP",
        "PKT/TCP/RETRANSMISSION", "PKT/TCP/FIN", "PKT/TCP/FIN", "PKT/TCP"]
    types2 = [e[0] for e in rec.events if e[0].startswith("PKT") and e[5] == f2]
    assert types2 == ["PKT/TCP/SYN", "PKT/TCP/SYN", "PKT/TCP", "PKT/TCP", "PKT/TCP/RST"]
    for flow, reason in ((f1, 1), (f2, 2)):
        ev = [e for e in rec.events if e[5] == flow]
        names = [e[0] for e in ev]
        assert names.count("FLOW/TCP/START") == 1 and names[0] == "FLOW/TCP/START"
        assert names.count("FLOW/TCP/ESTABLISHED") == 1
        est = [e for e in ev if e[0] == "FLOW/TCP/ESTABLISHED"][0]
        assert est[1] in (2, 11)                 # the handshake's ACK
        term = [e for e in ev if e[0] == "FLOW/TCP/TERMINATE"]
        assert len(term) == 1 and term[0][3]["reason"] == reason
    states = [(e[1], e[3]["old_state"], e[3]["new_state"])
              for e in rec.events if e[0] == "FLOW/TCP/STATE" and e[5] == f1]
    # the senders' changes: client SYN_SENT, server SYN_RCVD->? (receiver side), ...
    assert states[0] == (0, 0, 2)               # client CLOSED -> SYN_SENT
    assert (6, 4, 5) in states                  # client ESTABLISHED -> FIN_WAIT_1
    assert (7, 7, 9) in states                  # server CLOSE_WAIT -> LAST_ACK


def test_capture_without_the_syn_names_the_client_by_the_syn_ack(run, tmp_path):
    """The capture starts at the server's SYN+ACK: the flow's client is still the
    SYN+ACK's receiver, in FLOW/START's addresses, in every packet's dir and in the
    TCP Monitor's stream directions."""
    conn = Conn()
    frames = conn.exchange(b"GET / HTTP/1.0\r\n\r\n", b"HTTP/1.0 200 OK\r\n\r\nhi")[1:]
    rec = Recorder([mbx.FLOW_START, mbx.PKT, mbx.DATA_RDY])
    run([rec], frames=frames, stack="tcp")
    (start,) = rec.of("FLOW/START")
    assert (start[3]["cli_addr"], start[3]["cli_port"]) == conn.cli
    assert (start[3]["srv_addr"], start[3]["srv_port"]) == conn.srv
    pkt_dirs = {e[1]: e[2] for e in rec.events if e[0].startswith("PKT")}
    senders = [ip.src for ip, _ in (tcp_of(f) for _, f in frames)]
    cli_ip = ipaddress.ip_address(conn.cli[0]).packed
    assert pkt_dirs == {i: 0 if s == cli_ip else 1 for i, s in enumerate(senders)}
    assert by_dir(rec) == {0: b"GET / HTTP/1.0\r\n\r\n", 1: b"HTTP/1.0 200 OK\r\n\r\nhi"}


@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
@pytest.mark.parametrize("burst", [64, 1])
def test_a_burst_that_turns_the_client_around_reads_each_event_s_own_stream(
        run, deploy, burst):
    """Picked up mid-connection: the server speaks first (so it is taken for the
    client), the client answers, then the server's SYN+ACK (a retransmission) turns
    the roles around, all in one burst.  Handlers run after the burst: each DATA_RDY
    must still read the bytes of the stream it was published for (it read the other
    direction's, with no error, when the read mapped the event's stream_dir through
    the flow's client as of the burst's end)."""
    conn = Conn()
    conn.s(1, 1, PSH | ACK, b"x" * 100)           # the server's bytes first
    conn.c(1, 101, PSH | ACK, b"y" * 60)          # the client's
    conn.s(0, 1, SYN | ACK)                       # the SYN+ACK names the client
    # stream_dir counts from the client as the event knew it: at burst 64 the first
    # DATA_RDY (the server's bytes) says 0, as the server was taken for the client
    check = StreamCheck(b"x" * 100, b"y" * 60)
    c, _ = run([check], frames=conn.frames, stack="tcp", burst=burst, deploy=deploy)
    # (a wrong read raises in the handler, which ends the run with NFError)
    assert c["nfs"]["check"]["report"] == {"checked": 2}


@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
def test_a_filter_on_flow_and_stream_events_matches_the_connection(run, deploy):
    """A filter asking for connections to port 80 on DATA_RDY and FLOW/TCP/STATE:
    the events a server's packet carries (its bytes, its state changes, the client's
    bytes after a hole the server's ACK proved) are the connection's too.  They were
    matched by that packet's headers (source port 80) and filtered out: the NF lost
    the client's bytes after the hole, with no GAP either."""
    conn = Conn()
    c0 = conn.handshake()
    conn.c(c0, 1, PSH | ACK, b"GET /first HTTP/1.1\r\n\r\n")       # 24 bytes
    conn.c(c0 + 24 + 10, 1, PSH | ACK, b"GET /after-hole HTTP/1.1\r\n\r\n")
    conn.s(1, c0 + 24 + 10 + 29)            # the server ACKs past the lost 10 bytes
    conn.s(1, c0 + 63, PSH | ACK, b"HTTP/1.1 200 OK\r\n\r\n")
    conn.c(c0 + 63, 20, FIN | ACK)
    conn.s(20, c0 + 64, FIN | ACK)
    conn.c(c0 + 64, 21)

    def recorder(name, filtered):
        rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_STATE, mbx.FLOW_TCP_GAP],
                       side="both", name=name)
        if filtered:
            for t in ("DATA_RDY", "FLOW/TCP/STATE", "FLOW/TCP/GAP"):
                rec.filter(t, dst_port=80)
        return rec

    every, port80 = recorder("every", False), recorder("port80", True)
    c, _ = run([every, port80], frames=conn.frames, stack="tcp", deploy=deploy)
    # (pipelined the events reach the NF processes: compare the counts)
    assert c["nfs"]["port80"]["types"] == c["nfs"]["every"]["types"]
    assert c["nfs"]["every"]["types"]["FLOW/TCP/GAP"] >= 1
    if deploy == "inline":
        assert every.streams and port80.streams == every.streams
    # and a filter that names another port still keeps them out
    other = recorder("other", False)
    for t in ("DATA_RDY", "FLOW/TCP/STATE", "FLOW/TCP/GAP"):
        other.filter(t, dst_port=8080)
    c, _ = run([other], frames=conn.frames, stack="tcp")
    assert c["nfs"]["other"]["events"] == 0


def test_data_then_a_syn_ack_of_the_same_sender_in_one_burst(run):
    """Data from one side, then a SYN+ACK (with FIN) from the same side in the same
    burst: the first DATA_RDY's handler raised "no stream is kept for this flow and
    direction" (its stream_dir went through the client as of the burst's end)."""
    conn = Conn()
    conn.s(1, 1, ACK, b"x" * 100)
    conn.s(101, 1, SYN | FIN | ACK, b"y" * 100)
    rec = Recorder([mbx.DATA_RDY], side="both")
    run([rec], frames=conn.frames, stack="tcp")
    data = [chunk for chunks in rec.streams.values() for _, _, chunk in chunks]
    assert data and data[0] == b"x" * 100


def test_reused_five_tuple(run, tmp_path):
    """A new SYN with another ISN on the 5-tuple of a finished connection ends the
    old flow (FLOW/END reason 4 "closed") and starts a new one."""
    a = Conn(isn_c=1000)
    a.exchange(b"first", b"one")
    b = Conn(isn_c=900000, isn_s=77, t=a.t + 0.01)
    b.exchange(b"second", b"two")
    rec = Recorder([mbx.FLOW_START, mbx.FLOW_END, mbx.FLOW_TCP_START, mbx.DATA_RDY])
    counters, _ = run([rec], frames=a.frames + b.frames)
    ends = rec.of("FLOW/END")
    assert len(ends) == 2 and len(rec.of("FLOW/START")) == 2
    assert len(rec.of("FLOW/TCP/START")) == 2
    first_end = ends[0]
    assert first_end[1] == len(a.frames)        # when the new SYN comes
    assert first_end[3]["end_reason"] == 4      # closed: a new SYN restarted it
    # both connections' bytes stay readable by the handlers, which run after the
    # whole burst, when the first flow has already ended
    streams = {k: joined(v) for k, v in rec.streams.items()}
    assert sorted(streams.values()) == [b"first", b"one", b"second", b"two"]
    assert len({f for f, _ in streams}) == 2
    assert counters["tcp"]["new_connections"] == 1
    assert counters["tcp"]["pool_chunks_in_use"] == 0


def _dpkt_tcp(src, dst, seq, ack, flags, data=b""):
    """One Ethernet/IPv4/TCP frame, built by dpkt (not by mbx's own helpers)."""
    seg = dpkt.tcp.TCP(sport=src[1], dport=dst[1], seq=seq & M32, ack=ack & M32,
                       flags=flags, win=65535, data=data)
    ip = dpkt.ip.IP(src=ipaddress.ip_address(src[0]).packed,
                    dst=ipaddress.ip_address(dst[0]).packed, p=dpkt.ip.IP_PROTO_TCP,
                    ttl=64, data=seg)
    ip.len = len(ip)
    return bytes(dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6,
                                        type=dpkt.ethernet.ETH_TYPE_IP, data=ip))


def _dpkt_connection(t, isn_c, isn_s, req, resp):
    """[(ts, frame)] of a whole connection CLI4 -> SRV4 from time t, 10 ms apart:
    handshake, request, response, FIN close (10 packets: 6 from the client)."""
    c = [(CLI4, SRV4, isn_c, isn_s), (SRV4, CLI4, isn_s, isn_c)]
    q, r = len(req), len(resp)
    segs = [(0, 0, 0, SYN, b""), (1, 0, 1, SYN | ACK, b""), (0, 1, 1, ACK, b""),
            (0, 1, 1, PSH | ACK, req), (1, 1, 1 + q, ACK, b""),
            (1, 1, 1 + q, PSH | ACK, resp), (0, 1 + q, 1 + r, ACK, b""),
            (0, 1 + q, 1 + r, FIN | ACK, b""), (1, 1 + r, 2 + q, FIN | ACK, b""),
            (0, 2 + q, 2 + r, ACK, b"")]
    out = []
    for k, (who, seq, ack, flags, data) in enumerate(segs):
        src, dst, isn, peer = c[who]
        out.append((t + k * 0.01, _dpkt_tcp(src, dst, isn + seq, peer + ack, flags, data)))
    return out


@pytest.mark.parametrize("burst,deploy", [(64, "inline"), (1, "inline"),
                                          (64, "pipelined")])
def test_a_restarted_flow_ends_at_its_own_last_packet(run, tmp_path, burst, deploy):
    """Two connections on one 5-tuple, 10 s apart: the old flow's FLOW/END gave
    last_ns = the new SYN's time (or a later packet's, the second connection's
    packets being looked up in the same chunk), which is the new flow's first."""
    first = _dpkt_connection(100.0, 1000, 5000, b"first", b"one")
    second = _dpkt_connection(110.0, 900000, 77, b"second!", b"two")
    ns = [round(ts * 1e9) for ts, _ in first + second]

    class Flows(mbx.NF):
        def __init__(self):
            super().__init__("flows")
            self.seen = []
            self.sub(mbx.FLOW_START, self.on)
            self.sub(mbx.FLOW_END, self.on)

        def on(self, ev):
            self.seen.append((ev.type_name, ev.ts, ev.fields()))

        def report(self):
            return {"seen": self.seen}

    nf = Flows()
    counters, _ = run([nf], frames=first + second, stack="tcp", burst=burst,
                      deploy=deploy)
    seen = (counters["nfs"]["flows"]["report"]["seen"] if deploy == "pipelined"
            else nf.seen)
    assert counters["tcp"]["new_connections"] == 1
    ends = [(ts, f) for name, ts, f in seen if name == "FLOW/END"]
    starts = [(ts, f) for name, ts, f in seen if name == "FLOW/START"]
    assert len(ends) == len(starts) == 2
    (end_old, old), (end_new, new) = ends
    assert (old["end_reason"], new["end_reason"]) == (4, 3)      # closed, shutdown
    # each flow spans its own connection's packets, and counts them
    assert (old["first_ns"], old["last_ns"]) == (ns[0], ns[9])
    assert (new["first_ns"], new["last_ns"]) == (ns[10], ns[19])
    for f in (old, new):
        assert (f["pkts_c2s"], f["pkts_s2c"]) == (6, 4)
    # the old flow ends when the new SYN comes, which starts the new one
    assert end_old == ns[10] == starts[1][0]
    # mbx flows: two connections, each with its own packets
    capture = tmp_path / "two.pcap"
    with open(capture, "wb") as fh:
        writer = dpkt.pcap.Writer(fh)
        for ts, frame in first + second:
            writer.writepkt(frame, ts)
    doc, warnings = flows_json(str(capture))
    assert not warnings
    key = f"{CLI4[0]}:{CLI4[1]}-{SRV4[0]}:{SRV4[1]}"
    conns = doc["connections"]
    assert list(conns) == [key, key + "#2"]
    assert [(c["pkts_c2s"], c["pkts_s2c"], c["c2s_len"], c["s2c_len"])
            for c in conns.values()] == [(6, 4, 5, 3), (6, 4, 7, 3)]


# ---------------------------------------------------------------------------
# 5. Snapshots

def test_snapshots_as_of_the_event(run, tmp_path):
    frames = Conn().exchange(REQ, RESP, seg_s=[1000, 1000, len(RESP) - 2000])
    rec = Recorder([mbx.PKT_TCP, mbx.FLOW_TCP, mbx.DATA_RDY], side="both")
    run([rec], frames=frames)          # one burst: handlers run after all of it
    assert rec.events
    for name, _, _, fields, snap, _ in rec.events:
        assert snap["ts_ns"] is not None
        if name == "DATA_RDY":
            assert snap["frontier"] == fields["frontier"]
    syn = [e for e in rec.events if e[0] == "PKT/TCP/SYN" and e[1] == 0]
    assert syn
    for e in syn:
        assert e[4]["sender_state"] == "SYN_SENT"
        assert e[4]["receiver_state"] in ("CLOSED", "LISTEN", "SYN_RCVD")
        assert not e[4]["established"] and not e[4]["terminated"]
    last = [e for e in rec.events if e[1] == len(frames) - 1 and e[0].startswith("PKT")]
    assert last and all(e[4]["terminated"] for e in last)
    # the receiver's ack in the snapshot of the request's PKT/TCP event is the
    # handshake's, not the later one
    req_pkt = [e for e in rec.events if e[1] == 3 and e[0] == "PKT/TCP"][0]
    assert req_pkt[4]["receiver_ack"] == 1000 + 1
    # DATA_RDY frontiers grow along the response
    fr = [e[3]["frontier"] for e in rec.events if e[0] == "DATA_RDY" and e[3]["stream_dir"]]
    assert fr == [1000, 2000, len(RESP)]


def test_snapshot_is_23_bytes(run, tmp_path):
    frames = Conn().exchange(b"abc", b"de")
    raw = []
    nf = mbx.NF("b")
    nf.sub(mbx.PKT_TCP, lambda recs: raw.append(recs["snapshot"].copy()), batch=True)
    run([nf], frames=frames)
    snaps = [bytes(r) for arr in raw for r in arr]
    assert len(snaps) == len(frames)
    for s in snaps:
        assert len(s) == 24 and s[23] == 0     # 23 used of the 24-byte area
        snapshot_decode(s[:23])


# ---------------------------------------------------------------------------
# 6. Reassembly anomalies

def _conflict_frames():
    conn = Conn()
    conn.handshake()
    conn.c(11, 1, PSH | ACK, b"KLMNOPQRST")     # beyond a hole: held
    conn.c(11, 1, PSH | ACK, b"KLMxxPQRST")     # the same range, other bytes
    conn.c(1, 1, PSH | ACK, b"ABCDEFGHIJ")      # fills the hole
    conn.s(1, 21)
    return conn.frames


@pytest.mark.parametrize("policy,want", [("first", b"ABCDEFGHIJKLMNOPQRST"),
                                         ("last", b"ABCDEFGHIJKLMxxPQRST")])
def test_overlap_conflict(run, tmp_path, policy, want):
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_OVERLAP_CONFLICT])
    counters, _ = run([rec], frames=_conflict_frames(), overlap=policy)
    conf = rec.of("FLOW/TCP/OVERLAP_CONFLICT")
    assert len(conf) == 1
    assert conf[0][3]["offset"] == 13 and conf[0][3]["stream_dir"] == 0
    assert conf[0][3]["policy"] == (0 if policy == "first" else 1)
    assert by_dir(rec) == {0: want}
    assert counters["tcp"]["conflicts"] == 1


def test_a_retransmission_over_released_bytes_is_counted_unchecked(run):
    # "GET /evil" sent again over "GET /good" once delivered: compared (a conflict)
    # while the bytes are held, counted as unchecked once released, so that a
    # conflict missed because of where the bursts fell shows in the counters.
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, b"GET /good")
    conn.c(1, 1, PSH | ACK, b"GET /evil")
    conn.s(1, 10)
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_OVERLAP_CONFLICT])
    for burst, retain, conflicts, unchecked in ((64, 0, 1, 0), (1, 0, 0, 9),
                                                (1, 65536, 1, 0)):
        rec.events.clear()
        counters, _ = run([rec], frames=conn.frames, burst=burst, retain=retain)
        assert len(rec.of("FLOW/TCP/OVERLAP_CONFLICT")) == conflicts, (burst, retain)
        assert counters["tcp"]["conflicts"] == conflicts
        assert counters["tcp"]["unchecked_bytes"] == unchecked, (burst, retain)


def test_gap_acked_hole(run, tmp_path):
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, b"0123456789")
    conn.c(31, 1, PSH | ACK, b"abcdefghij")     # 20 bytes missing before it
    conn.s(1, 41)                               # the server got them all
    conn.c(41, 1, PSH | ACK, b"tail")
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_GAP])
    counters, _ = run([rec], frames=conn.frames)
    gaps = rec.of("FLOW/TCP/GAP")
    assert len(gaps) == 1
    assert (gaps[0][3]["offset"], gaps[0][3]["length"], gaps[0][3]["stream_dir"]) == (10, 20, 0)
    chunks = rec.streams[next(iter(rec.streams))]
    # no filler: DATA_RDY and GAP events tile the stream; every DATA_RDY reads
    assert [(o, f) for o, f, _ in chunks] == [(0, 10), (30, 40), (40, 44)]
    data = b"".join(d for _, _, d in chunks)
    assert data == b"0123456789abcdefghijtail"
    assert counters["tcp"]["gaps"] == 1 and counters["tcp"]["gap_bytes"] == 20
    # and mbx flows agrees
    path = str(tmp_path / "gap.pcap")
    write_pcap(path, conn.frames)
    rec_f = next(iter(flows_json(path)[0]["connections"].values()))
    assert rec_f["c2s_len"] == 24
    assert rec_f["c2s_sha256"] == hashlib.sha256(b"0123456789abcdefghijtail").hexdigest()


def test_data_behind_unacked_hole_never_delivered(run, tmp_path):
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, b"0123456789")
    conn.c(21, 1, PSH | ACK, b"behind")         # hole [10, 20), never filled
    conn.s(1, 11)                                # the server only has the first 10
    conn.c(27, 1, PSH | ACK, b"more")
    conn.s(1, 11)
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_GAP])
    counters, _ = run([rec], frames=conn.frames)
    assert by_dir(rec) == {0: b"0123456789"}
    assert not rec.of("FLOW/TCP/GAP")
    assert counters["tcp"]["pool_chunks_in_use"] == 0


@pytest.mark.parametrize("opts", [dict(stream_memory=4096, chunk_size=1024),
                                  dict(stream_window=2048, chunk_size=1024),
                                  dict(max_streams=1)])
def test_memcap(run, tmp_path, opts):
    frames = []
    for i in range(3):
        conn = Conn(cli=("10.0.0.1", 42000 + i), t=1 + i * 0.0001)
        conn.handshake()
        frames += conn.frames
    # interleave: three connections open at once, each sending 8 KiB out of order
    conns = [Conn(cli=("10.0.0.1", 42000 + i), t=5 + i) for i in range(3)]
    for k in range(8, 0, -1):
        for conn in conns:
            conn.c(1 + 1024 * k, 1, PSH | ACK, bytes([k]) * 1024)
    for conn in conns:
        conn.c(1, 1, PSH | ACK, b"\0" * 1024)
        frames += conn.frames
    frames.sort(key=lambda f: f[0])
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_MEMCAP])
    counters, out = run([rec], frames=frames, **opts)
    assert counters["tcp"]["memcaps"] > 0
    assert rec.of("FLOW/TCP/MEMCAP")
    assert len(out) == len(frames)
    for chunks in rec.streams.values():
        joined(chunks)
    assert counters["tcp"]["pool_chunks_in_use"] == 0


# ---------------------------------------------------------------------------
# 7. TERMINATE

class Killer(mbx.NF):
    """Terminates every connection on the client's first data segment."""

    def __init__(self):
        super().__init__("killer")
        self.port = self.pub(mbx.FLOW_TCP_TERMINATE)
        self.sub(mbx.PKT_TCP, self.on)
        self.killed = set()
        self.expect = {}

    def on(self, ev):
        if ev.dir == 0 and ev.payload_len and ev.flow not in self.killed:
            self.killed.add(ev.flow)
            snap = ev.snapshot
            # the client's next seq follows this segment; the server's is what it
            # will send next (the snapshot's receiver is the server)
            self.expect[ev.flow] = ((ev.seq + ev.payload_len) & M32,
                                    snap["receiver_snd_nxt"])
            self.publish(self.port, self.new_msg(mbx.FLOW_TCP_TERMINATE))


class Watcher(mbx.NF):
    """Records the TERMINATEs other NFs publish: (publisher, reason, snapshot)."""

    def __init__(self):
        super().__init__("watch")
        self.terminates = []
        self.pkt_snapshots = set()
        self.sub(mbx.FLOW_TCP_TERMINATE, self.on_terminate)
        self.sub(mbx.PKT, self.on_pkt)

    def on_terminate(self, ev):
        if ev.publisher:
            self.terminates.append((ev.publisher, ev.reason, ev.snapshot))

    def on_pkt(self, ev):
        self.pkt_snapshots.add(type(ev.snapshot).__name__)


@pytest.mark.parametrize("v6", [False, True])
def test_terminate_sends_rsts(run, tmp_path, v6):
    cli, srv = (CLI6, SRV6) if v6 else (CLI4, SRV4)
    victim = Conn(cli=cli, srv=srv, isn_c=M32 - 3, isn_s=123456, v6=v6)
    victim.handshake()
    victim.c(1, 1, PSH | ACK, b"attack payload")
    victim.s(1, 15, PSH | ACK, b"response")
    victim.c(15, 9, FIN | ACK)
    victim.s(9, 16, FIN | ACK)
    other = Conn(cli=(cli[0], 40007), srv=srv, v6=v6, t=1.0005)
    other.handshake()
    frames = sorted(victim.frames + other.frames, key=lambda f: f[0])
    other_after = Conn(cli=(cli[0], 40007), srv=srv, v6=v6, t=10)
    other_after.s(1, 1, PSH | ACK, b"fine")     # the other connection goes on
    frames += other_after.frames
    k = Killer()
    watch = Watcher()
    counters, out = run([k, watch], frames=frames)
    assert counters["tcp"]["rst_sent"] == 2
    # the NF's TERMINATE says an NF asked (reason 3), and carries no stack snapshot
    # (its snapshot area was whatever the message slot held before)
    assert watch.terminates == [(1, 3, None)]
    assert watch.pkt_snapshots == {"dict"}         # the Monitor's PKT/TCP events do
    rsts, rest = [], []
    for _, f in out:
        ip, tcp = tcp_of(f)
        assert checksum_ok(f), f.hex()
        (rsts if tcp.flags & RST else rest).append((ip, tcp))
    assert len(rsts) == 2
    to_srv = [t for _, t in rsts if t.dport == srv[1]]
    to_cli = [t for _, t in rsts if t.dport == cli[1]]
    assert len(to_srv) == len(to_cli) == 1
    assert to_srv[0].seq == (M32 - 3 + 15) & M32            # client's next seq
    assert to_cli[0].seq == 123456 + 1                       # server's next seq
    assert to_srv[0].ack == to_cli[0].seq and to_cli[0].ack == to_srv[0].seq
    for ip, t in rsts:
        assert len(ip.src) == (16 if v6 else 4)
        assert (t.sport, t.dport) in ((cli[1], srv[1]), (srv[1], cli[1]))
    # the data segment itself passes (the NF did not drop it), nothing later does
    victim_ports = {cli[1]}
    victim_pkts = [(t.sport, t.dport, t.flags) for _, t in rest
                   if t.sport in victim_ports or t.dport in victim_ports]
    assert len(victim_pkts) == 4                # SYN, SYN+ACK, ACK, the data
    other_pkts = [t for _, t in rest if 40007 in (t.sport, t.dport)]
    assert len(other_pkts) == len(other.frames) + 1
    assert counters["tcp"]["dropped_terminated"] == 3
    # the RSTs leave after their burst's packets, and take the time of its last one
    # (they took the flow's first packet's, and the output went back in time)
    stamps = [t for t, _ in out]
    assert stamps == sorted(stamps)


class AncestorKiller(Killer):
    """Killer's TERMINATEs through a FLOW/TCP port, which can carry them too."""

    def __init__(self):
        super().__init__()
        self.pubs.clear()
        self.port = self.pub(mbx.FLOW_TCP)


@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
def test_a_terminate_through_an_ancestor_port_still_terminates(run, deploy):
    # The TCP Monitor took TERMINATEs only when some NF declared a FLOW/TCP/TERMINATE
    # port; one published on a FLOW/TCP port was delivered to nobody, silently.
    victim = Conn()
    victim.handshake()
    victim.c(1, 1, PSH | ACK, b"attack payload")
    victim.s(1, 15, PSH | ACK, b"response")
    counters, _ = run([AncestorKiller()], frames=victim.frames, deploy=deploy,
                      stack="tcp")
    assert counters["tcp"]["rst_sent"] == 2
    assert counters["tcp"]["dropped_terminated"] == 1
    if deploy == "pipelined":       # a TERMINATE acts on its own burst: lock-step
        assert counters["pipeline"]["inflight"] == 1


class EveryEventReader(mbx.NF):
    """Subscribes to EVENT, so gets DATA_RDY with the rest, and reads each one."""

    def __init__(self):
        super().__init__("every")
        self.sub(mbx.EVENT, self.on)
        self.read = 0

    def on(self, ev):
        if ev.type_name == "DATA_RDY":
            self.read += len(bytes(ev.read()))

    def report(self):
        return {"read": self.read}


def test_a_subscriber_to_an_ancestor_of_data_rdy_reads_streams_pipelined(
        run, example_pcap):
    # With the TCP Monitor a subscriber to EVENT gets DATA_RDY and may read streams,
    # so its process needs one burst in flight; it had four, and its reads failed
    # ("stream offset 0 was already released") once the stack had moved on.
    inline, _ = run([EveryEventReader()], capture=example_pcap, stack="tcp")
    c, _ = run([EveryEventReader()], capture=example_pcap, stack="tcp",
               deploy="pipelined")
    assert c["pipeline"]["inflight"] == 1
    assert c["nfs"]["every"]["report"]["read"] == inline["nfs"]["every"]["report"][
        "read"] > 0
    # without the Monitor no DATA_RDY exists: no reason to hold the stack back
    c, _ = run([EveryEventReader()], capture=example_pcap, deploy="pipelined")
    assert c["pipeline"]["inflight"] == 4


def test_events_not_from_the_monitor_carry_no_snapshot(run):
    from mbx.examples.capture import ether, udp4

    watch = Watcher()
    frames = [(1.0 + i, ether(udp4("198.18.1.1", "198.18.1.2", 5000, 53, b"q")))
              for i in range(3)]
    run([watch], frames=frames, stack="tcp")
    assert watch.pkt_snapshots == {"NoneType"}


def test_terminate_across_bursts(run, tmp_path):
    """With one packet per burst the later packets are dropped by the Monitor on
    arrival, and the RSTs leave right after the data segment."""
    victim = Conn()
    victim.handshake()
    victim.c(1, 1, PSH | ACK, b"attack")
    victim.s(1, 7, PSH | ACK, b"response")
    victim.c(7, 9, FIN | ACK)
    counters, out = run([Killer()], frames=victim.frames, burst=1)
    flags = [tcp_of(f)[1].flags for _, f in out]
    assert flags[:4] == [SYN, SYN | ACK, ACK, PSH | ACK]
    assert [f & RST for f in flags[4:]] == [RST, RST]
    assert counters["tcp"]["dropped_terminated"] == 2


# ---------------------------------------------------------------------------
# 8. Writer NFs

class Upper(mbx.NF):
    def __init__(self, writes=True):
        super().__init__("upper", writes=writes)
        self.sub(mbx.DATA_RDY, self.on)
        self.changed = 0

    def on(self, ev):
        data = bytes(ev.read())
        self.changed += ev.write(ev.offset, data.upper())


@pytest.mark.parametrize("v6", [False, True])
def test_writer_rewrites_packets(run, tmp_path, v6):
    cli, srv = (CLI6, SRV6) if v6 else (CLI4, SRV4)
    req, resp = b"get /index.html http/1.1\r\n\r\n" * 40, b"hello world, " * 300
    frames = Conn(cli=cli, srv=srv, v6=v6).exchange(
        req, resp, seg_c=[500, 300, len(req) - 800], order=[1, 0, 2],
        seg_s=[1448, 1448, len(resp) - 2896])
    nf = Upper()
    counters, out = run([nf], frames=frames)
    assert nf.changed == len(req) + len(resp)
    assert len(out) == len(frames)
    payloads = b""
    for (_, before), (_, after) in zip(frames, out, strict=True):
        assert checksum_ok(after)
        tb, ta = tcp_of(before)[1], tcp_of(after)[1]
        assert bytes(ta.data) == bytes(tb.data).upper()
        payloads += bytes(ta.data)
    path = str(tmp_path / "rewritten.pcap")
    write_pcap(path, out)
    rec = next(iter(flows_json(path)[0]["connections"].values()))
    assert rec["c2s_sha256"] == hashlib.sha256(req.upper()).hexdigest()
    assert rec["s2c_sha256"] == hashlib.sha256(resp.upper()).hexdigest()


@pytest.mark.parametrize("behind", [100_000, 1 << 30])
def test_a_write_skips_a_segment_wholly_before_the_stream(run, behind):
    """A segment of the same direction in the burst, lying wholly before the
    stream's first byte (a late one of an earlier connection, or forged): a write
    leaves it alone.  Its end, below offset 0, used to be taken as unsigned, so the
    write copied a huge length: a crash, or both packets silently corrupted and
    write() returning about 2**64."""
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, b"hello")
    conn.c((1 - behind) % 2**32, 1, PSH | ACK, b"junk")
    nf = Upper()
    _, out = run([nf], frames=conn.frames)
    assert nf.changed == 5
    assert [bytes(tcp_of(f)[1].data) for _, f in out[-2:]] == [b"HELLO", b"junk"]
    assert all(checksum_ok(f) for _, f in out)


def test_a_write_over_a_gap_changes_nothing(run, tmp_path):
    # [0, 100), a hole the ACK skips, [200, 300): a write of [0, 300) fails at the
    # gap, and must leave the stream as it was (it used to change [0, 100) in the
    # stream but not in the packets)
    conn = Conn()
    conn.handshake()
    conn.s(1, 1, PSH | ACK, b"A" * 100)
    conn.s(201, 1, PSH | ACK, b"B" * 100)
    conn.c(1, 301)

    class Writer(mbx.NF):
        def __init__(self):
            super().__init__("w", writes=True)
            self.sub(mbx.DATA_RDY, self.on)
            self.log = []

        def on(self, ev):
            # (on the DATA_RDY that reaches 300: a write is judged against the
            # event's frontier, and the first one's is 100)
            if ev.frontier == 300:
                with pytest.raises(MbxError, match="cannot be written"):
                    ev.write(0, b"z" * 300)
                self.log.append(bytes(ev.read(0, 100)))

    nf = Writer()
    _, out = run([nf], frames=conn.frames)
    assert nf.log == [b"A" * 100]
    assert [bytes(tcp_of(f)[1].data) for _, f in out if tcp_of(f)[1].data] == \
        [b"A" * 100, b"B" * 100]


def test_non_writer_cannot_write(run, tmp_path):
    frames = Conn().exchange(b"abc", b"def")
    with pytest.raises(NFError) as info:
        run([Upper(writes=False)], frames=frames)
    assert isinstance(info.value.__cause__, PermissionDenied) or \
        "PermissionDenied" in str(info.value)
    assert "writes=True" in str(info.value)


def test_writes_set_during_the_run_does_not_let_an_nf_write_streams(run):
    class Late(Upper):
        def on(self, ev):
            self.writes = True
            Upper.on(self, ev)

    frames = Conn().exchange(b"abc", b"def")
    with pytest.raises(NFError, match="NF upper rewrote stream bytes but did not "
                                      "declare writes=True"):
        run([Late(writes=False)], frames=frames)


# ---------------------------------------------------------------------------
# 9. mbx flows on crafted captures

def _flows(tmp_path, frames, name="c.pcap"):
    path = str(tmp_path / name)
    write_pcap(path, frames)
    doc, warnings = flows_json(path)
    assert warnings == [] and "warnings" not in doc
    return doc["connections"]


def test_flows_names_the_piece_bound_not_memory(tmp_path):
    """More out-of-order pieces at once than a stream holds: the bytes are lost and
    `mbx flows` says why; it used to send the user to --stream-memory, which cannot
    help."""
    from mbx._stream import MAX_OOO_PIECES

    conn = Conn()
    c0 = conn.handshake()
    data = bytes(range(256)) * 16
    holes = 2 * MAX_OOO_PIECES + 4
    seg = len(data) // holes
    for k in range(1, holes, 2):                # every other segment first
        conn.c(c0 + k * seg, 1, PSH | ACK, data[k * seg:(k + 1) * seg])
    for k in range(0, holes, 2):                # then the holes
        conn.c(c0 + k * seg, 1, PSH | ACK, data[k * seg:(k + 1) * seg])
    path = str(tmp_path / "holes.pcap")
    write_pcap(path, conn.frames)
    doc, warnings = flows_json(path)
    lost = holes // 2 - MAX_OOO_PIECES          # the odd pieces past the bound
    (rec,) = doc["connections"].values()
    # delivered: up to the first piece that was not held (it never comes again)
    assert rec["c2s_len"] == (2 * MAX_OOO_PIECES + 1) * seg
    assert warnings == [f"{lost} segments lost bytes: their stream held {MAX_OOO_PIECES} "
                        "out-of-order pieces already (the bound on a stream's holes; heavy "
                        "loss or reordering); their connections' digests are incomplete",
                        # the pieces held past the lost one are never delivered
                        "1 stream ended with bytes behind a hole never filled nor "
                        "acknowledged (the capture missed a segment, or ended before its "
                        "retransmission): those bytes are in no digest"]
    assert doc["warnings"] == warnings          # in the JSON too, for scripts


def _hole_past_the_window(tmp_path, hole):
    """A capture that missed ``hole`` bytes of a window-scaled (shift 14) connection
    whose receiver ACKs them all: 100 bytes, then 100 more past the hole."""
    cli, srv, frames = ("10.0.0.1", 40000), ("10.0.0.2", 80), []

    def seg(src, dst, seq, ack, flags, data=b"", opts=b""):
        frames.append((1.0 + len(frames) / 1000, ether(tcp4(
            src[0], dst[0], src[1], dst[1], data, seq=seq & M32, ack=ack & M32,
            flags=flags, win=65535, opts=opts))))

    ws = b"\x01\x03\x03\x0e"                     # NOP, window scale 14
    seg(cli, srv, 1000, 0, SYN, opts=ws)
    seg(srv, cli, 5000, 1001, SYN | ACK, opts=ws)
    seg(cli, srv, 1001, 5001, ACK)
    seg(srv, cli, 5001, 1001, ACK)              # a scaled window: 1 GiB
    seg(cli, srv, 1001, 5001, PSH | ACK, b"a" * 100)
    seg(cli, srv, 1101 + hole, 5001, PSH | ACK, b"b" * 100)
    seg(srv, cli, 5001, 1201 + hole, ACK)
    path = str(tmp_path / "hole.pcap")
    write_pcap(path, frames)
    return path


def test_flows_names_the_stream_window_not_memory(tmp_path):
    """Bytes beyond the stream's window (64 MiB past its next byte in `mbx flows`)
    are dropped whatever the stream memory: the warning used to send the user to
    --stream-memory, which cannot help; it names --stream-window, and a window
    large enough keeps them (the hole then a gap the ACK proves)."""
    path = _hole_past_the_window(tmp_path, 80 << 20)
    doc, warnings = flows_json(path)
    (rec,) = doc["connections"].values()
    assert rec["c2s_len"] == 100
    assert warnings == ["1 segments lost bytes: they lay more than the stream window "
                        "(64 MiB) beyond their stream's next byte (a hole that large): "
                        "raise --stream-window; their connections' digests are incomplete",
                        # the receiver's ACK then proves them lost, with the hole
                        f"1 hole the capture missed ({(80 << 20) + 100:,} bytes) the "
                        "receiver acknowledged: skipped, those bytes are in no digest"]
    # the largest --stream-window is one the stack takes, and the next is not
    doc, warnings = flows_json(path, stream_window=STREAM_WINDOW_MAX << 20)
    (rec,) = doc["connections"].values()
    assert (rec["c2s_len"], rec["c2s_sha256"]) == (200, _sha(b"a" * 100 + b"b" * 100))
    assert warnings == [f"1 hole the capture missed ({80 << 20:,} bytes) the receiver "
                        "acknowledged: skipped, those bytes are in no digest"]
    with pytest.raises(MbxError, match="stream_window must be at most 65,535 chunks"):
        flows_json(path, stream_window=(STREAM_WINDOW_MAX + 1) << 20)
    # a pool of one chunk, held by the first bytes: memory, not the window, says so
    doc, warnings = flows_json(path, stream_memory=2048, stream_window=100 << 20)
    assert "raise --stream-memory" in warnings[0]
    assert not any("--stream-window" in w for w in warnings)


def _sha(b):
    return hashlib.sha256(b).hexdigest()


def test_flows_strict_exits_3_on_a_summary_it_knows_is_incomplete(tmp_path, capsys):
    """A hole the receiver acknowledged (skipped) and one never filled when the
    capture ends (the bytes behind it held, never delivered) leave bytes out of the
    digests: `mbx flows` used to say nothing of either and exit 0, so a script could
    not tell such a summary from a whole one.  Each is a warning now, and --strict
    makes any warning exit 3, the summary still written."""
    from mbx.cli import EXIT_INCOMPLETE, main

    skipped = _hole_past_the_window(tmp_path, 100)
    conn = Conn()
    c0 = conn.handshake()
    conn.c(c0, 1, PSH | ACK, b"a" * 10)
    conn.c(c0 + 20, 1, PSH | ACK, b"c" * 10)    # bytes 10-19 never come
    held = str(tmp_path / "held.pcap")
    write_pcap(held, conn.frames)
    doc, warnings = flows_json(held)
    (rec,) = doc["connections"].values()
    assert rec["c2s_len"] == 10
    assert warnings == ["1 stream ended with bytes behind a hole never filled nor "
                        "acknowledged (the capture missed a segment, or ended before its "
                        "retransmission): those bytes are in no digest"]
    whole = str(tmp_path / "whole.pcap")
    write_pcap(whole, Conn().exchange(b"abc", b"def"))
    for path, warned in ((skipped, "1 hole the capture missed"),
                         (held, "1 stream ended with bytes behind a hole"),
                         (whole, None)):
        out = str(tmp_path / "out.json")
        assert main(["flows", path, "--json", "-o", out]) == 0
        status = main(["flows", path, "--json", "-o", out, "--strict"])
        err = capsys.readouterr().err
        assert status == (EXIT_INCOMPLETE if warned else 0) and EXIT_INCOMPLETE == 3
        assert (warned or "no warning") in (err if warned else "no warning")
        with open(out) as f:
            assert len(json.load(f)["connections"]) == 1      # written all the same
        if not warned:
            assert err == ""


def test_flows_keys_and_records(tmp_path):
    a = Conn(cli=("10.1.0.1", 1111), srv=("10.1.0.2", 80))
    a.exchange(b"request", b"response")
    b = Conn(cli=CLI6, srv=SRV6, v6=True, t=2)
    b.exchange(b"q6", b"r6", close=False)
    c = Conn(cli=("10.1.0.1", 1111), srv=("10.1.0.2", 80), isn_c=99999, t=3)
    c.exchange(b"again", b"ok")
    conns = _flows(tmp_path, a.frames + b.frames + c.frames)
    assert list(conns) == ["10.1.0.1:1111-10.1.0.2:80", "[2001:db8::1]:40000-[2001:db8::2]:80",
                           "10.1.0.1:1111-10.1.0.2:80#2"]
    r = conns["10.1.0.1:1111-10.1.0.2:80"]
    assert r == {"c2s_len": 7, "c2s_sha256": _sha(b"request"), "s2c_len": 8,
                 "s2c_sha256": _sha(b"response"), "pkts_c2s": 6, "pkts_s2c": 4,
                 "handshake": True, "close": "fin"}
    r6 = conns["[2001:db8::1]:40000-[2001:db8::2]:80"]
    assert (r6["c2s_len"], r6["s2c_len"], r6["close"], r6["handshake"]) == (2, 2, "none", True)
    assert conns["10.1.0.1:1111-10.1.0.2:80#2"]["c2s_sha256"] == _sha(b"again")


def test_flows_client_selection(tmp_path):
    # no SYN: the receiver of the first SYN+ACK is the client, even if the server
    # sent first
    a = Conn(cli=("10.2.0.1", 2000), srv=("10.2.0.2", 80))
    a.s(1, 1, PSH | ACK, b"early")              # server speaks first (midstream-ish)
    a.s(0, 1, SYN | ACK)
    a.c(1, 6, PSH | ACK, b"cli")
    # no SYN, no SYN+ACK: the first sender is the client
    b = Conn(cli=("10.2.0.3", 3000), srv=("10.2.0.4", 80), t=2)
    b.s(1, 1, PSH | ACK, b"first")
    b.c(1, 6, PSH | ACK, b"second")
    # a pure SYN decides even when it is not the first packet
    c = Conn(cli=("10.2.0.5", 4000), srv=("10.2.0.6", 80), t=3)
    c.s(0, 1, SYN | ACK)
    c.c(0, -c.isn_s, SYN)
    c.c(1, 1)
    conns = _flows(tmp_path, a.frames + b.frames + c.frames)
    keys = list(conns)
    assert keys[0] == "10.2.0.1:2000-10.2.0.2:80"
    assert keys[1] == "10.2.0.4:80-10.2.0.3:3000"
    assert keys[2] == "10.2.0.5:4000-10.2.0.6:80"
    assert conns[keys[1]]["c2s_sha256"] == _sha(b"first")
    assert conns[keys[2]]["handshake"] is True


def test_flows_counts_every_segment(tmp_path):
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, b"hello ")
    conn.c(1, 1, PSH | ACK, b"hello ")          # duplicate
    conn.c(7, 1, PSH | ACK, b"world")
    conn.c(1, 1, PSH | ACK, b"hello world")     # retransmission over both
    conn.s(1, 12)
    conn.s(1, 12)                                # duplicate ACK
    conn.c(12, 1, RST | ACK, b"diagnostic")      # RST with data: counts too
    rec = next(iter(_flows(tmp_path, conn.frames).values()))
    assert rec["pkts_c2s"] == 7 and rec["pkts_s2c"] == 3
    assert rec["close"] == "rst"
    assert rec["c2s_len"] == len(b"hello worlddiagnostic")
    assert rec["c2s_sha256"] == _sha(b"hello worlddiagnostic")


def test_payload_after_the_sender_s_fin_is_no_hole(run, tmp_path):
    """Bytes a sender sends beyond its own FIN (which its peer acknowledged) are no
    stream bytes: they are dropped and counted as such (payload_after_fin), not held
    behind the FIN's sequence number, which no byte fills, as behind a hole the
    capture missed (`mbx flows` said so).  What came before the FIN is kept, also
    from a segment that runs past it."""
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, b"data")
    conn.c(5, 1, FIN | ACK)
    conn.s(1, 6)
    conn.c(6, 1, PSH | ACK, b"LATE")
    conn.c(3, 1, PSH | ACK, b"taXX")             # "ta" again, then past the FIN
    conn.s(1, 6, PSH | ACK, b"resp")
    conn.c(6, 5)
    rec = Recorder([mbx.DATA_RDY], side="both")
    counters, _ = run([rec], frames=conn.frames)
    assert by_dir(rec) == {0: b"data", 1: b"resp"}
    assert counters["tcp"]["payload_after_fin"] == 2
    assert counters["tcp"]["conflicts"] == 0
    path = str(tmp_path / "afterfin.pcap")
    write_pcap(path, conn.frames)
    doc, warnings = flows_json(path)
    rec_f = next(iter(doc["connections"].values()))
    assert (rec_f["c2s_len"], rec_f["s2c_len"]) == (4, 4)
    assert warnings == ["2 segments with payload reached beyond their sender's FIN "
                        "(payload_after_fin); a receiver drops those bytes, so they are "
                        "in no digest"]


@pytest.mark.parametrize("fin_seq", [50, 301])
def test_an_unconfirmed_fin_cuts_off_no_acknowledged_bytes(run, tmp_path, fin_seq):
    """A FIN its receiver did not acknowledge as such is no end of the stream: a
    stale or injected one inside bytes already acknowledged (50), or ahead of a
    hole in the window (301), must not drop the bytes that follow it, which the
    receiver's ACKs show it took (an IDS would not see them otherwise)."""
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, b"A" * 100)
    conn.s(1, 101)
    conn.c(fin_seq, 1, FIN | ACK)
    conn.c(101, 1, PSH | ACK, b"B" * 400)
    conn.s(1, 501)
    conn.c(501, 1, PSH | ACK, b"C" * 10)
    conn.s(1, 511)
    rec = Recorder([mbx.DATA_RDY], side="both")
    counters, _ = run([rec], frames=conn.frames)
    assert by_dir(rec) == {0: b"A" * 100 + b"B" * 400 + b"C" * 10}
    assert counters["tcp"]["payload_after_fin"] == 0
    assert counters["tcp"]["gaps"] == 0


def test_flows_rst_data_counts(tmp_path):
    """Data in a RST (RFC 1122 diagnostic text) is counted, as tshark's follow does
    (the brief: "data in RST counts")."""
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, b"abc")
    conn.s(1, 4, RST | ACK, b"bye")
    rec = next(iter(_flows(tmp_path, conn.frames).values()))
    assert rec["close"] == "rst"
    assert (rec["s2c_len"], rec["s2c_sha256"]) == (3, _sha(b"bye"))


def test_flows_close_is_rst_for_any_rst_even_an_invalid_one(run, tmp_path):
    """By design (docs/guide.md, tests/interop/reference.py): `close` is a header
    fact, "rst" when any segment had RST.  A blind RST far outside the window, then a
    FIN close: the Monitor ignores the RST (the connection ends by its FINs, its
    bytes intact), and `close` still says "rst"."""
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, b"a" * 100)
    conn.c(101 + 10**7, 1, RST | ACK, b"forged")
    conn.c(101, 1, FIN | ACK)
    conn.s(1, 102, FIN | ACK)
    conn.c(102, 2)
    rec = Recorder([mbx.FLOW_TCP_TERMINATE], side="both")
    run([rec], frames=conn.frames)
    (term,) = rec.of("FLOW/TCP/TERMINATE")
    assert term[3]["reason"] == 1               # by FINs
    r = next(iter(_flows(tmp_path, conn.frames).values()))
    assert r["close"] == "rst"
    assert (r["c2s_len"], r["c2s_sha256"]) == (100, _sha(b"a" * 100))


def test_flows_truncated_frames(tmp_path):
    """A frame cut by the snaplen: only its captured bytes count; the rest, once
    ACKed, is a gap."""
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, b"A" * 100)
    conn.c(101, 1, PSH | ACK, b"B" * 100)
    conn.s(1, 201)
    conn.c(201, 1, FIN | ACK)
    conn.s(1, 202, FIN | ACK)
    conn.c(202, 2)
    path = str(tmp_path / "trunc.pcap")
    snap = 14 + 20 + 20 + 40
    with open(path, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snap, 1))
        for ts, frame in conn.frames:
            sec, us = int(ts), round((ts - int(ts)) * 1e6)
            cap = frame[:snap]
            fh.write(struct.pack("<IIII", sec, us, len(cap), len(frame)))
            fh.write(cap)
    doc, _ = flows_json(path)
    rec = next(iter(doc["connections"].values()))
    assert rec["c2s_len"] == 80
    assert rec["c2s_sha256"] == _sha(b"A" * 40 + b"B" * 40)
    assert rec["close"] == "fin" and rec["handshake"] is True



def _with_options(cli, srv, isn_c, isn_s, reply=b"r" * 300, v6=False):
    """One connection as Linux sends it: SYN and SYN+ACK with MSS, SACK-permitted,
    timestamps and a window scale of 7 (20 option bytes), later segments with the
    timestamp option (12), windows scaled."""
    frames, t = [], [1.0]
    if v6:
        def ip(src, dst, seg):
            return dpkt.ip6.IP6(src=ipaddress.ip_address(src).packed,
                                dst=ipaddress.ip_address(dst).packed, nxt=6, hlim=64,
                                plen=len(bytes(seg)), data=seg)
    else:
        def ip(src, dst, seg):
            return dpkt.ip.IP(src=ipaddress.ip_address(src).packed,
                              dst=ipaddress.ip_address(dst).packed, p=6, ttl=64, data=seg)

    def seg(a, b, seq, ack, flags, win, data=b"", syn=False):
        opts = (b"\x02\x04\x05\xb4\x04\x02\x08\x0a" + struct.pack("!II", 7, 0)
                + b"\x01\x03\x03\x07") if syn else (
                b"\x01\x01\x08\x0a" + struct.pack("!II", 8, 7))
        tcp = dpkt.tcp.TCP(sport=a[1], dport=b[1], seq=seq & M32, ack=ack & M32,
                           flags=flags, win=win, opts=opts, data=data)
        tcp.off = (20 + len(opts)) // 4
        t[0] += 0.001
        et = 0x86DD if v6 else 0x0800
        frames.append((t[0], bytes(dpkt.ethernet.Ethernet(
            src=b"\x02" * 6, dst=b"\x04" * 6, type=et, data=ip(a[0], b[0], tcp)))))

    seg(cli, srv, isn_c, 0, SYN, 64240, syn=True)
    seg(srv, cli, isn_s, isn_c + 1, SYN | ACK, 65160, syn=True)
    seg(cli, srv, isn_c + 1, isn_s + 1, ACK, 502)
    seg(cli, srv, isn_c + 1, isn_s + 1, PSH | ACK, 502, b"q" * 40)
    # the server's window field is 4 (512 bytes unscaled) where 4 << 7 is offered
    for i in range(0, len(reply), 100):
        seg(srv, cli, isn_s + 1 + i, isn_c + 41, ACK, 4, reply[i:i + 100])
    seg(cli, srv, isn_c + 41, isn_s + 1 + len(reply), FIN | ACK, 502)
    seg(srv, cli, isn_s + 1 + len(reply), isn_c + 42, FIN | ACK, 4)
    seg(cli, srv, isn_c + 42, isn_s + 2 + len(reply), ACK, 502)
    return frames


def _cut_pcap(path, frames, snap):
    with open(path, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snap, 1))
        for ts, frame in frames:
            sec, us = int(ts), round((ts - int(ts)) * 1e6)
            fh.write(struct.pack("<IIII", sec, us, min(len(frame), snap), len(frame)))
            fh.write(frame[:snap])
    return str(path)


@pytest.mark.parametrize("v6", [False, True])
def test_flows_segments_whose_options_the_snaplen_cut(tmp_path, v6):
    """A snaplen inside the TCP options (the fixed header whole, as `editcap -s 54`
    or `tcpdump -s 68` leave a SYN) made every segment so cut trunc_l4, ignored by
    the Monitor: SYNs lost, client and server swapped, handshake false.  tshark
    reads ports, seq and flags from the same frames: so does the Monitor now, with
    the same connections, directions, handshakes and packet counts as uncut."""
    a = ("2001:db8::1", 40000) if v6 else ("198.18.0.1", 40000)
    b = ("2001:db8::2", 80) if v6 else ("198.18.0.2", 80)
    frames = (_with_options(a, b, 1000, 5000, v6=v6)
              + _with_options((a[0], 40001), b, 7000, 9000, v6=v6))
    frames = [(i * 0.001 + 1, f) for i, (_, f) in enumerate(sorted(frames))]
    whole, _ = flows_json(_cut_pcap(tmp_path / "whole.pcap", frames, 65535))
    assert all(r["handshake"] for r in whole["connections"].values())
    hdr = 14 + (40 if v6 else 20) + 20
    for snap in (hdr, hdr + 6):             # every segment's options cut: SYNs' at least
        doc, warnings = flows_json(_cut_pcap(tmp_path / f"s{snap}.pcap", frames, snap))
        want = {k: dict(r, c2s_len=0, s2c_len=0, c2s_sha256=_sha(b""), s2c_sha256=_sha(b""))
                for k, r in whole["connections"].items()}
        assert doc["connections"] == want
        assert any("cut by the capture's snaplen" in w for w in warnings), warnings
        if shutil.which("tshark") is None:
            skip_or_fail_in_ci("tshark is not installed (scripts/test.sh installs it)",
                               "the comparison with tshark")
        else:
            # tshark: the same packets in each direction of each connection
            out = subprocess.run(
                ["tshark", "-n", "-r", str(tmp_path / f"s{snap}.pcap"), "-T", "fields",
                 "-e", "tcp.srcport", "-e", "tcp.dstport", "-e", "tcp.flags.syn"],
                capture_output=True, text=True, timeout=60, check=True).stdout.split("\n")
            rows = [line.split("\t") for line in out if line]
            for key, r in want.items():
                cport = int(key.split("-")[0].rsplit(":", 1)[1])
                assert r["pkts_c2s"] == sum(1 for s, _, _ in rows if int(s) == cport)
                assert r["pkts_s2c"] == sum(1 for _, d, _ in rows if int(d) == cport)


def _three_holes():
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, b"a" * 10)
    conn.c(21, 1, PSH | ACK, b"b" * 10)         # hole [10, 20)
    conn.c(41, 1, PSH | ACK, b"c" * 10)         # hole [30, 40)
    conn.c(61, 1)                               # and [50, 60): its next seq is 61
    conn.s(1, 61)                               # one ACK of all three
    return conn.frames


def test_multiple_gaps_one_ack(run, tmp_path):
    """One ACK proving three holes lost: a GAP for each and a DATA_RDY for the held
    bytes after each (so no DATA_RDY range contains a gap), and mbx flows hashes
    exactly the bytes that were there."""
    frames = _three_holes()
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_GAP], read=False)
    run([rec], frames=frames)
    gaps = [(e[3]["offset"], e[3]["length"]) for e in rec.of("FLOW/TCP/GAP")]
    assert gaps == [(10, 10), (30, 10), (50, 10)]
    rdy = [(e[3]["offset"], e[3]["frontier"]) for e in rec.of("DATA_RDY")]
    assert rdy == [(0, 10), (20, 30), (40, 50)]
    path = str(tmp_path / "holes.pcap")
    write_pcap(path, frames)
    r = next(iter(flows_json(path)[0]["connections"].values()))
    assert (r["c2s_len"], r["c2s_sha256"]) == (30, _sha(b"a" * 10 + b"b" * 10 + b"c" * 10))


def _streams_and_gaps(run, tmp_path, conn, burst=64):
    """(c2s bytes, s2c bytes) by mbx flows, and the GAP events an NF saw."""
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_GAP], side="both", read=False)
    run([rec], frames=conn.frames, burst=burst)
    gaps = [(e[3]["stream_dir"], e[3]["offset"], e[3]["length"])
            for e in rec.of("FLOW/TCP/GAP")]
    path = str(tmp_path / "c.pcap")
    write_pcap(path, conn.frames)
    r = next(iter(flows_json(path)[0]["connections"].values()))
    return (r["c2s_len"], r["c2s_sha256"]), (r["s2c_len"], r["s2c_sha256"]), gaps


def test_an_ack_ahead_of_its_data_skips_nothing(run, tmp_path):
    """An ACK captured before the data it acknowledges (merged or multi-queue
    captures), and a bogus one far ahead: neither may turn bytes not seen yet into a
    gap, or the real bytes that follow are never delivered (an injected ACK would
    blind every NF to the rest of the stream)."""
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, b"GET / ")
    conn.s(1, 19)                               # ACKs bytes still on their way
    conn.s(1, 100_001)                          # acknowledges nothing ever sent
    conn.c(7, 1, PSH | ACK, b"HTTP/1.1\r\n\r\n")
    conn.s(1, 19)
    conn.c(19, 1, FIN | ACK)
    conn.s(1, 20, FIN | ACK)
    conn.c(20, 2)
    c2s, _, gaps = _streams_and_gaps(run, tmp_path, conn)
    assert c2s == (18, _sha(b"GET / HTTP/1.1\r\n\r\n")) and gaps == []


def test_a_lost_last_segment_is_a_gap_once_its_successor_is_seen(run, tmp_path):
    """A hole at the end of what was seen is skipped only when the sender shows it
    sent past it (here its next segment): then the ACK proves the bytes lost."""
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, b"a" * 10)
    conn.s(1, 21)                               # [10, 20) never captured
    conn.s(1, 21)
    c2s, _, gaps = _streams_and_gaps(run, tmp_path, conn)
    assert gaps == [] and c2s[0] == 10
    conn.c(21, 1, PSH | ACK, b"c" * 10)
    conn.s(1, 31)
    c2s, _, gaps = _streams_and_gaps(run, tmp_path, conn)
    assert gaps == [(0, 10, 10)] and c2s == (20, _sha(b"a" * 10 + b"c" * 10))


def test_segments_the_receiver_would_refuse_do_not_reach_the_stream(run, tmp_path):
    """A segment beyond the receiver's window, and a RST that fails validation, are
    refused by the state machine: their payload is no stream data and their ACK skips
    no hole (RFC 9293 §3.10.7.4).  The window-breaking copy used to win over the
    bytes the receiver did accept (overlap policy "first")."""
    conn = Conn()
    conn.c(0, 0, SYN)
    conn.s(0, 1, SYN | ACK, win=100)            # the server takes 100 bytes at a time
    conn.c(1, 1, win=65535)
    conn.c(1, 1, PSH | ACK, b"x" * 50)
    conn.c(151, 1, PSH | ACK, b"Z" * 100)       # starts past 1 + 100: refused
    conn.s(1, 51, win=100)
    conn.c(51, 1, PSH | ACK, b"y" * 100)
    conn.s(1, 151, win=100)
    conn.c(151, 1, PSH | ACK, b"W" * 100)
    conn.s(1, 251, win=100)
    conn.s(9_999_999, 10_000, RST | ACK, b"rstdata")     # fails validation
    conn.c(251, 1, FIN | ACK)
    conn.s(1, 252, FIN | ACK, win=100)
    conn.c(252, 2)
    c2s, s2c, gaps = _streams_and_gaps(run, tmp_path, conn)
    assert c2s == (250, _sha(b"x" * 50 + b"y" * 100 + b"W" * 100))
    assert s2c == (0, _sha(b"")) and gaps == []


@pytest.mark.parametrize("policy", ["first", "last"])
def test_a_rst_past_rcv_nxt_is_no_stream_data(run, tmp_path, policy):
    """A RST inside the window but 10 bytes past rcv_nxt, carrying 10 bytes, then the
    real bytes there: Linux answers such a RST with a challenge ACK and keeps the
    connection (RFC 5961 §3.2), and no receiver takes a RST's text.  Its bytes used
    to be stored at 110-119 (RFC 793's whole-window test), read by DATA_RDY in place
    of the real ones, with an OVERLAP_CONFLICT under either policy."""
    data = bytes(range(150))
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, data[:100])
    conn.c(111, 1, RST | ACK, b"X" * 10)
    conn.c(101, 1, PSH | ACK, data[100:])
    conn.c(151, 1, FIN | ACK)
    conn.s(1, 152, FIN | ACK)
    conn.c(152, 2)
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_OVERLAP_CONFLICT, mbx.FLOW_TCP_TERMINATE],
                   side="both")
    run([rec], frames=conn.frames, overlap=policy)
    assert by_dir(rec)[0] == data
    assert rec.of("FLOW/TCP/OVERLAP_CONFLICT") == []
    # the connection ends with its FINs, not at the RST
    (term,) = rec.of("FLOW/TCP/TERMINATE")
    assert term[3]["reason"] == 1
    rec = next(iter(_flows(tmp_path, conn.frames).values()))
    assert (rec["c2s_len"], rec["c2s_sha256"]) == (150, _sha(data))


def test_a_valid_rst_s_text_counts_only_at_the_frontier(run, tmp_path):
    """A RST at the receiver's ACK but behind what the sender sent is valid (the
    Monitor cannot tell rcv_nxt closer), yet its text would overwrite bytes already
    delivered: it is no stream data and no conflict.  At the frontier it counts."""
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, b"a" * 20)
    conn.s(1, 11)                               # the server has 10 of the 20
    conn.c(11, 1, RST | ACK, b"Z" * 10)         # at its ACK: over delivered bytes
    conn.c(21, 1, RST | ACK, b"tail")           # at the frontier
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_OVERLAP_CONFLICT], side="both")
    run([rec], frames=conn.frames)
    assert by_dir(rec)[0] == b"a" * 20 + b"tail"
    assert rec.of("FLOW/TCP/OVERLAP_CONFLICT") == []


@pytest.mark.parametrize("policy", ["first", "last"])
def test_a_rst_s_text_never_covers_bytes_held_beyond_the_frontier(run, policy):
    # A valid RST at the frontier whose text reaches over real bytes held out of
    # order: it would replace them (overlap "last") or conflict with them; it is no
    # stream data, and the real bytes fill the hole
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, b"a" * 100)
    conn.s(1, 101)
    conn.c(151, 1, PSH | ACK, b"b" * 50)        # [150, 200), behind a hole
    conn.c(101, 1, RST | ACK, b"X" * 100)       # at the frontier, over [100, 200)
    conn.c(101, 1, PSH | ACK, b"c" * 50)        # the real [100, 150)
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_OVERLAP_CONFLICT], side="both")
    run([rec], frames=conn.frames, overlap=policy)
    assert by_dir(rec)[0] == b"a" * 100 + b"c" * 50 + b"b" * 50
    assert rec.of("FLOW/TCP/OVERLAP_CONFLICT") == []


def test_data_on_the_window_edge_is_refused(run, tmp_path):
    """Data must start before the receiver's right edge, rcv_nxt + window (RFC 9293
    §3.10.7.4): a zero-window probe's byte at rcv_nxt, and a segment starting just
    at the edge of an open window, are dropped by the receiver (Linux's
    tcp_data_queue).  Both used to reach the stream, ahead of the bytes the
    receiver took at those places."""
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, b"hello")
    conn.s(1, 6, win=0)                         # window closed at rcv_nxt 6
    conn.c(6, 1, PSH | ACK, b"X")               # the probe's byte: refused
    conn.s(1, 6, win=10)                        # reopens, X not taken: edge 16
    conn.c(16, 1, PSH | ACK, b"EVIL")           # starts on the edge: refused
    conn.c(6, 1, PSH | ACK, b"0123456789")
    conn.s(1, 16, win=1000)
    conn.c(16, 1, PSH | ACK, b"GOOD")
    conn.s(1, 20, win=1000)
    want = b"hello0123456789GOOD"
    rec = Recorder([mbx.DATA_RDY], side="both")
    run([rec], frames=conn.frames)
    assert by_dir(rec)[0] == want
    c2s, _, gaps = _streams_and_gaps(run, tmp_path, conn)
    assert c2s == (len(want), _sha(want)) and gaps == []


@pytest.mark.parametrize("v6", [False, True])
@pytest.mark.parametrize("checksums", ["ignore", "verify"])
def test_a_segment_with_a_wrong_checksum_counts_only_when_not_verified(run, v6, checksums):
    """A segment whose TCP checksum is wrong, which its receiver dropped (its ACK
    shows it), then the good retransmission.  checksums="ignore" (the default: a
    capture taken where the sending card computes checksums has a wrong one on every
    segment that host sent) delivers it like any, and the good retransmission is an
    overlap conflict; "verify" leaves it out as the receiver did, and the stream is
    what the receiver got.  The odd-length segment checks the sum's padding byte."""
    conn = Conn(**({"cli": CLI6, "srv": SRV6, "v6": True} if v6 else {}))
    conn.handshake()
    conn.c(1, 1, PSH | ACK, b"GOOD1")
    i = conn.c(6, 1, PSH | ACK, b"GOOD2")
    t, frame = conn.frames[i]
    conn.frames[i] = (t, frame[:-5] + b"GOXD2")      # corrupted after its checksum
    assert checksum_ok(conn.frames[i][1]) is False
    conn.s(1, 6)                                     # the server dropped it
    conn.c(6, 1, PSH | ACK, b"GOOD2")
    conn.c(11, 1, PSH | ACK, b"odd")
    conn.s(1, 14)
    assert all(checksum_ok(f) for k, (_, f) in enumerate(conn.frames) if k != i)
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_OVERLAP_CONFLICT], side="both")
    counters, _ = run([rec], frames=conn.frames, checksums=checksums)
    tcp = counters["tcp"]
    if checksums == "ignore":
        assert by_dir(rec) == {0: b"GOOD1GOXD2odd"}     # delivered: no policy undoes it
        assert len(rec.of("FLOW/TCP/OVERLAP_CONFLICT")) == tcp["conflicts"] == 1
        assert tcp["bad_checksums"] == tcp["unverifiable"] == 0
    else:
        assert by_dir(rec) == {0: b"GOOD1GOOD2odd"}
        assert rec.of("FLOW/TCP/OVERLAP_CONFLICT") == [] and tcp["conflicts"] == 0
        assert tcp["bad_checksums"] == 1 and tcp["unverifiable"] == 0
        # the segment is still a packet of its flow (PKT), only not the receiver's
        assert counters["flows"]["created"] == 1


def test_verify_leaves_out_a_bad_ip_header_and_takes_a_cut_segment(run, tmp_path):
    """checksums="verify": a wrong IPv4 header checksum drops a segment before TCP
    as it does on a receiver; a segment a snaplen cut cannot be checked, and is
    taken as it is (unverifiable), its cut bytes a gap as always."""
    conn = Conn()
    conn.handshake()
    i = conn.c(1, 1, PSH | ACK, b"EVIL1")
    t, frame = conn.frames[i]
    bad = bytearray(frame)
    bad[14 + 10] ^= 0xFF                               # the IPv4 header checksum
    conn.frames[i] = (t, bytes(bad))
    conn.c(1, 1, PSH | ACK, b"GOOD1")
    j = conn.c(6, 1, PSH | ACK, b"cut-short")
    conn.s(1, 15)
    path = str(tmp_path / "cut.pcap")
    with open(path, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for k, (ts, frame) in enumerate(conn.frames):
            cap = frame[:60] if k == j else frame         # 6 of its 9 bytes cut
            fh.write(struct.pack("<IIII", int(ts), round((ts - int(ts)) * 1e6), len(cap),
                                 len(frame)))
            fh.write(cap)
    rec = Recorder([mbx.DATA_RDY], side="both")
    counters, _ = run([rec], capture=path, checksums="verify")
    tcp = counters["tcp"]
    assert tcp["bad_checksums"] == 1 and tcp["unverifiable"] == 1
    assert tcp["conflicts"] == 0
    assert by_dir(rec)[0].startswith(b"GOOD1")


def _tcp6_routed(ext, first_nh, final, corrupt=False):
    # One IPv6 TCP segment behind extension headers ``ext``; its checksum is over the
    # pseudo-header with ``final`` as the destination (RFC 8200 §8.1)
    src, dst = (ipaddress.ip_address(a).packed for a in ("2001:db8::1", "2001:db8::2"))
    payload = b"hello"
    hdr = struct.pack("!HHIIBBHHH", 40000, 80, 1000, 0, 5 << 4, 0x18, 65535, 0, 0)
    pseudo = src + ipaddress.ip_address(final).packed + struct.pack("!I3xB", 25, 6)
    total = sum(struct.unpack(f"!{(len(pseudo) + 26) // 2}H",
                              pseudo + hdr + payload + b"\0"))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    seg = hdr[:16] + struct.pack("!H", ~total & 0xFFFF) + hdr[18:] + payload
    if corrupt:
        seg = seg[:-1] + b"!"
    ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(ext) + len(seg), first_nh, 64, src, dst)
    return ether(ip6 + ext + seg, 0x86DD)


@pytest.mark.parametrize("rtype", [0, 2, 4, 3])
def test_verify_sums_a_routed_ipv6_segment_over_its_final_destination(run, rtype):
    """A Routing header with segments left: the TCP checksum covers the final
    destination, the list's last address (types 0 and 2) or Segment List[0] (an SRv6
    SRH), not the header's destination; a type not read here (3, RPL's compressed
    list) is taken unchecked.  tshark agrees on each good and corrupted case."""
    final = "2001:db8::99"
    fin = ipaddress.ip_address(final).packed
    other = ipaddress.ip_address("2001:db8::2").packed
    ext = {0: bytes([6, 2, 0, 1, 0, 0, 0, 0]) + fin,
           2: bytes([6, 2, 2, 1, 0, 0, 0, 0]) + fin,
           4: bytes([6, 4, 4, 1, 1, 0, 0, 0]) + fin + other,
           3: bytes([6, 2, 3, 1, 0, 0, 0, 0]) + fin}[rtype]
    for corrupt in (False, True):
        frames = [(1.0, _tcp6_routed(ext, 43, final, corrupt))]
        counters, _ = run([], frames=frames, stack="tcp", checksums="verify")
        tcp = counters["tcp"]
        if rtype == 3:
            assert (tcp["bad_checksums"], tcp["unverifiable"]) == (0, 1)
        else:
            assert (tcp["bad_checksums"], tcp["unverifiable"]) == (int(corrupt), 0)
            assert tcp["tcp_packets"] == int(not corrupt)


def test_checksums_must_be_a_known_word():
    with pytest.raises(mbx.AppError, match="checksums"):
        mbx.App([], checksums="strict")


@pytest.mark.parametrize("burst", [1, 64])
def test_data_on_the_edge_before_the_ack_that_opened_it_is_delivered(run, tmp_path, burst):
    """Capture records out of order (a real 3%-loss download, two records swapped):
    the server's segment at 3001 comes before the client's ACK that opened the
    window for it, so it starts just on the right edge the client last showed (its
    ACK 1, window 3000) and the window check refuses it, as a receiver would a
    segment on its edge.  The client took it: its later ACK covers it.  It used to
    be dropped for good, and that ACK then made its 1,000 bytes a GAP "the capture
    missed".  Held aside until the ACK, it is delivered; a segment held so whose
    bytes the sender sends again into the window gives way to them (the receiver
    refused it: the window check stands), compared with them first."""
    data = bytes(range(250)) * 24
    conn = Conn()
    conn.c(0, 0, SYN)
    conn.s(0, 1, SYN | ACK)
    conn.c(1, 1, ACK, win=3000)                 # the client's window: edge 3001
    for off in (0, 1000, 2000):
        conn.s(1 + off, 1, PSH | ACK, data[off:off + 1000])
    conn.s(3001, 1, PSH | ACK, data[3000:4000])  # on the edge, seen before ...
    conn.c(1, 1001, ACK, win=3000)         # ... the ACK that opened the window
    conn.c(1, 2001, ACK, win=3000)
    conn.s(4001, 1, PSH | ACK, data[4000:5000])
    conn.s(5001, 1, PSH | ACK, b"EVIL" * 250)   # on the edge, and refused:
    conn.c(1, 5001, ACK, win=1000)         # the client took up to 5001 only
    conn.s(5001, 1, PSH | ACK, data[5000:6000])  # the real bytes, into the window
    conn.c(1, 6001, ACK, win=3000)
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_OVERLAP_CONFLICT], side="both")
    run([rec], frames=conn.frames, burst=burst)
    assert by_dir(rec)[1] == data
    # the real bytes differ from the held ones they replace: one of the two copies
    # was not what the receiver got
    assert [e[3]["offset"] for e in rec.of("FLOW/TCP/OVERLAP_CONFLICT")] == [5000]
    _, s2c, gaps = _streams_and_gaps(run, tmp_path, conn, burst=burst)
    assert gaps == [] and s2c == (6000, _sha(data))


def _edge_conn():
    """A connection whose client window ends at 1001, the server's first 1000 bytes
    sent."""
    conn = Conn()
    conn.c(0, 0, SYN)
    conn.s(0, 1, SYN | ACK)
    conn.c(1, 1, ACK, win=1000)
    conn.s(1, 1, PSH | ACK, b"x" * 1000)
    return conn


@pytest.mark.parametrize("overlap", ["first", "last"])
def test_held_edge_data_meets_the_real_bytes_under_the_overlap_policy(run, overlap):
    """A segment injected past the window's edge, then the real bytes from the edge,
    both before the ACK that opened the window: the hold compares them as the
    stream does (an OVERLAP_CONFLICT, the policy deciding), and none of the real
    bytes becomes a GAP.  The hold used to start at the first segment held, so the
    real bytes lost their head and their overlap was compared with nothing."""
    conn = _edge_conn()
    conn.s(1101, 1, PSH | ACK, b"EVIL" * 25)
    conn.s(1001, 1, PSH | ACK, b"R" * 300)
    conn.c(1, 1301, ACK, win=1000)
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_OVERLAP_CONFLICT, mbx.FLOW_TCP_GAP],
                   side="both")
    counters, _ = run([rec], frames=conn.frames, overlap=overlap)
    mid = b"EVIL" * 25 if overlap == "first" else b"R" * 100
    assert by_dir(rec)[1] == b"x" * 1000 + b"R" * 100 + mid + b"R" * 100
    assert [e[3]["offset"] for e in rec.of("FLOW/TCP/OVERLAP_CONFLICT")] == [1100]
    assert rec.of("FLOW/TCP/GAP") == []
    assert (counters["tcp"]["conflicts"], counters["tcp"]["gaps"]) == (1, 0)


def test_a_resend_into_the_window_keeps_the_held_bytes_beyond_it(run):
    """Two segments held past the window's edge, A then B; the window opens (an ACK
    that covers neither) and the sender sends A again into it, a spurious
    retransmission.  A's copy into the window is the stream's and B stays held until
    the receiver's ACK covers it: delivered, not a GAP.  A resend over the first
    held byte used to drop the whole hold, B included."""
    conn = _edge_conn()
    conn.s(1001, 1, PSH | ACK, b"A" * 300)      # on the edge: held
    conn.s(1301, 1, PSH | ACK, b"B" * 300)      # held
    conn.c(1, 1001, ACK, win=1000)              # the window opens: edge 2001
    conn.s(1001, 1, PSH | ACK, b"A" * 300)      # A again, into the window
    conn.c(1, 1601, ACK, win=1000)              # took A and B
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_OVERLAP_CONFLICT, mbx.FLOW_TCP_GAP],
                   side="both")
    counters, _ = run([rec], frames=conn.frames)
    assert by_dir(rec)[1] == b"x" * 1000 + b"A" * 300 + b"B" * 300
    assert rec.of("FLOW/TCP/GAP") == [] and rec.of("FLOW/TCP/OVERLAP_CONFLICT") == []
    tcp = counters["tcp"]
    assert (tcp["gaps"], tcp["conflicts"], tcp["edge_data_dropped"]) == (0, 0, 0)


def test_a_byte_sent_into_the_window_over_held_bytes_is_compared_with_them(run):
    """One byte other than the held one, sent into the window over the first byte
    held past its edge (here the last delivered byte and the next): the receiver
    takes it, the difference is an OVERLAP_CONFLICT at its offset, and the rest of
    the hold waits for the ACK.  It used to drop the whole hold without a word, and
    the ACK then made 299 real bytes a GAP."""
    conn = _edge_conn()
    conn.s(1001, 1, PSH | ACK, b"R" * 300)      # on the edge: held
    conn.s(1000, 1, PSH | ACK, b"xV")           # starts in the window
    conn.c(1, 1301, ACK, win=1000)
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_OVERLAP_CONFLICT, mbx.FLOW_TCP_GAP],
                   side="both")
    counters, _ = run([rec], frames=conn.frames)
    assert by_dir(rec)[1] == b"x" * 1000 + b"V" + b"R" * 299
    assert [e[3]["offset"] for e in rec.of("FLOW/TCP/OVERLAP_CONFLICT")] == [1000]
    assert rec.of("FLOW/TCP/GAP") == []
    assert (counters["tcp"]["gaps"], counters["tcp"]["edge_data_dropped"]) == (0, 0)


def test_a_resend_past_the_held_bytes_lets_them_go_uncounted(run):
    """A resend into the window that covers every held byte and more: the hold is
    let go (nothing of it left for an ACK, nothing dropped unseen) and the resend's
    bytes are the stream's."""
    conn = _edge_conn()
    conn.s(1001, 1, PSH | ACK, b"R" * 300)      # held
    conn.c(1, 1001, ACK, win=1000)              # the window opens, R not taken
    conn.s(1001, 1, PSH | ACK, b"R" * 500)      # R and more, into the window
    conn.c(1, 1501, ACK, win=1000)
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_OVERLAP_CONFLICT], side="both")
    counters, _ = run([rec], frames=conn.frames)
    assert by_dir(rec)[1] == b"x" * 1000 + b"R" * 500
    tcp = counters["tcp"]
    assert (tcp["conflicts"], tcp["edge_data_dropped"], tcp["gaps"]) == (0, 0, 0)


def test_a_rst_s_text_over_held_bytes_supersedes_none_of_them(run):
    """A RST carrying text over bytes held past the window's edge: no receiver takes
    a RST's text (as the next bytes due it is delivered, what a reader of the
    capture sees), so it is no resend: the held bytes are not compared with it, and
    the RST ends the connection with them counted as never taken."""
    conn = _edge_conn()
    conn.s(1001, 1, PSH | ACK, b"R" * 300)      # held
    conn.c(1, 1001, ACK, win=1000)              # the window opens, R not taken
    conn.s(1001, 1, RST | ACK, b"Z" * 300)
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_OVERLAP_CONFLICT], side="both")
    counters, _ = run([rec], frames=conn.frames)
    assert by_dir(rec)[1] == b"x" * 1000 + b"Z" * 300
    assert (counters["tcp"]["conflicts"], counters["tcp"]["edge_data_dropped"]) == (0, 300)


def test_edge_data_the_pool_refuses_is_a_memcap_then_a_gap(run):
    """Bytes held past the window's edge that the pool has no room for are counted
    as memcaps, and the ACK that takes the hold skips them as GAPs, as it does for
    data in the window: every byte is delivered or accounted for.  They used to
    vanish uncounted."""
    frames = []
    for i in range(12):
        conn = Conn(cli=(f"10.0.0.{i + 1}", 40000 + i), t=1.0 + i / 100)
        conn.c(0, 0, SYN)
        conn.s(0, 1, SYN | ACK)
        conn.c(1, 1, ACK, win=1000)
        conn.s(1, 1, PSH | ACK, b"x" * 1000)
        conn.s(1001, 1, PSH | ACK, b"E" * 4000)     # on the edge: held
        frames += conn.frames
    for i in range(12):
        conn = Conn(cli=(f"10.0.0.{i + 1}", 40000 + i), t=2.0 + i / 100)
        conn.c(1, 5001, ACK, win=60000)             # took it all
        frames += conn.frames
    got = []

    class Reader(mbx.NF):
        def __init__(self):
            super().__init__("reader")
            self.sub(mbx.DATA_RDY, lambda ev: got.append(len(ev.read())))

    counters, _ = run([Reader()], frames=frames, stream_memory=24 * 2048, chunk_size=2048,
                      retain=0)
    tcp = counters["tcp"]
    assert tcp["memcaps"] > 0 and tcp["gap_bytes"] > 0
    assert sum(got) + tcp["gap_bytes"] == 12 * 5000


def test_data_with_fin_on_the_edge_is_held_too(run, tmp_path):
    """A segment with the last data and the FIN, recorded before the ACK that opened
    the window for it, is held like other data on the edge and delivered once the
    receiver's ACK covers it; it used to be dropped without a word."""
    conn = _edge_conn()
    conn.s(1001, 1, FIN | PSH | ACK, b"y" * 100)
    conn.c(1, 1001, ACK, win=1000)
    conn.c(1, 1102, ACK, win=1000)
    conn.c(1, 1102, FIN | ACK)
    conn.s(1102, 2)
    path = str(tmp_path / "finedge.pcap")
    write_pcap(path, conn.frames)
    doc, warnings = flows_json(path)
    rec_f = next(iter(doc["connections"].values()))
    assert rec_f["s2c_len"] == 1100
    assert rec_f["s2c_sha256"] == _sha(b"x" * 1000 + b"y" * 100)
    assert warnings == []


def test_edge_data_no_ack_takes_is_counted(run, tmp_path):
    """Data held past the window's edge that no ACK of the receiver ever covers is
    dropped when its flow ends, counted (edge_data_dropped) and named by mbx flows,
    not lost without a word."""
    conn = _edge_conn()
    conn.s(1001, 1, PSH | ACK, b"E" * 500)
    conn.c(1, 1001, ACK, win=0)
    rec = Recorder([mbx.DATA_RDY], side="both")
    counters, _ = run([rec], frames=conn.frames)
    assert by_dir(rec) == {1: b"x" * 1000}
    assert counters["tcp"]["edge_data_dropped"] == 500
    path = str(tmp_path / "edgeleak.pcap")
    write_pcap(path, conn.frames)
    _, warnings = flows_json(path)
    assert any("(edge_data_dropped)" in w and w.startswith("500 bytes") for w in warnings)


def test_edge_data_dropped_counts_the_bytes_held_not_the_holes_between(run):
    # two 10-byte segments held 900 bytes apart, never acknowledged: 20 bytes were
    # held and dropped, not the 910 their span covers
    conn = Conn()
    conn.c(0, 0, SYN)
    conn.s(0, 1, SYN | ACK)
    conn.c(1, 1, ACK, win=1000)
    conn.s(1, 1, PSH | ACK, b"x" * 1000)
    conn.s(1001, 1, PSH | ACK, b"a" * 10)
    conn.s(1901, 1, PSH | ACK, b"b" * 10)
    conn.c(1, 1001, ACK, win=1000)
    rec = Recorder([mbx.DATA_RDY], side="both")
    counters, _ = run([rec], frames=conn.frames)
    assert counters["tcp"]["edge_data_dropped"] == 20
    assert counters["tcp"]["pool_chunks_in_use"] == 0


@pytest.mark.parametrize("burst", [1, 64])
def test_a_zero_window_probe_the_receiver_acks_is_stream_data(run, tmp_path, burst):
    """A zero-window probe's byte is refused, as Linux refuses it (taking every
    probe would let its byte win over the real one where the receiver drops it:
    test_data_on_the_window_edge_is_refused), but kept aside: this receiver takes
    it and ACKs it, so it is the stream's byte 100, as in tshark's follow.  It used
    to be a 1-byte GAP."""
    data = bytes(range(150))
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, data[:100])
    conn.s(1, 101, win=0)
    conn.c(101, 1, ACK, data[100:101])          # the probe
    conn.s(1, 102, win=1000)                    # taken: the receiver ACKs it
    conn.c(102, 1, PSH | ACK, data[101:])
    conn.c(151, 1, FIN | ACK)
    conn.s(1, 152, FIN | ACK)
    conn.c(152, 2)
    c2s, _, gaps = _streams_and_gaps(run, tmp_path, conn, burst=burst)
    assert gaps == []
    assert c2s == (150, _sha(data))


@pytest.mark.parametrize("older_ack", [101, 301], ids=["lower_ack", "same_ack"])
def test_an_older_ack_seen_late_does_not_narrow_the_window(run, tmp_path, older_ack):
    """The client's ACKs seen out of order (a capture fed by two CPUs does that; seen
    in the interop reorder_dup captures): its newest ACK (301, window 300: right edge
    601) comes before an older one with a smaller window (100), sent before it, at a
    lower ACK or, before a window update, at the same one.  The older window taken
    as the current one put the edge at 401 and refused the server's segment at 501,
    which the client accepted; its ACK then made those bytes a GAP."""
    resp = bytes(range(200)) * 3
    conn = Conn()
    conn.c(0, 0, SYN)
    conn.s(0, 1, SYN | ACK)
    conn.c(1, 1, win=300)
    conn.c(1, 1, PSH | ACK, b"GET", win=300)
    for off in (0, 100, 200):
        conn.s(1 + off, 4, ACK, resp[off:off + 100])
    conn.c(4, 301, win=300)                     # the newest ACK, seen first
    conn.c(4, older_ack, win=100)               # sent before it
    for off in (300, 400, 500):                 # the last one starts at 501 < 601
        conn.s(1 + off, 4, ACK, resp[off:off + 100])
    conn.c(4, 601, win=300)                     # the client got every byte
    conn.s(601, 4, FIN | ACK)
    conn.c(4, 602, FIN | ACK)
    conn.s(602, 5)
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_GAP], side="both")
    run([rec], frames=conn.frames)
    assert by_dir(rec)[1] == resp and not rec.of("FLOW/TCP/GAP")
    c2s, s2c, gaps = _streams_and_gaps(run, tmp_path, conn)
    assert s2c == (600, _sha(resp)) and gaps == []


def test_a_late_segment_of_the_old_connection_leaves_the_new_one_alone(run):
    """A reused 4-tuple: the old server's retransmitted FIN arrives after the new
    SYN.  It does not acknowledge the new SYN, so it is not the new connection's
    (RFC 9293 §3.10.7.3); it used to put the new server in FIN_WAIT_1 and end the
    connection before its data."""
    old = Conn()
    old.handshake()
    old.c(1, 1, PSH | ACK, b"first")
    old.s(1, 6, PSH | ACK, b"r1")
    old.c(6, 3, FIN | ACK)
    old.s(3, 7, FIN | ACK)
    old.c(7, 4)
    new = Conn(isn_c=200_000, isn_s=900_000, t=old.t)
    new.c(0, -900_000, SYN)
    new.frames.append((new.t + 0.0005, old.frames[-2][1]))     # the stale FIN again
    new.s(0, 1, SYN | ACK)
    new.c(1, 1)
    new.c(1, 1, PSH | ACK, b"second")
    new.c(7, 1, FIN | ACK)
    new.s(1, 8)
    new.s(1, 8, PSH | ACK, b"server-still-sending")
    new.s(21, 8, FIN | ACK)
    new.c(8, 22)
    rec = Recorder([mbx.FLOW_TCP_ESTABLISHED, mbx.FLOW_TCP_TERMINATE, mbx.DATA_RDY])
    run([rec], frames=old.frames + new.frames)
    names = [e[0] for e in rec.events]
    est = rec.of("FLOW/TCP/ESTABLISHED")[-1][3]
    assert (est["state_cli"], est["state_srv"]) == (4, 4)     # both ESTABLISHED
    last = len(names) - 1 - names[::-1].index("FLOW/TCP/TERMINATE")
    assert "DATA_RDY" not in names[last:]
    assert rec.streams[(rec.events[last][5], 1)][-1][2] == b"server-still-sending"


def test_closed_connections_give_their_stream_memory_back(run):
    """A connection closed by FINs kept a chunk of each stream until its flow idled
    out: with the default pool 8,192 of them within the idle timeout stopped
    reassembly (MEMCAP) for every later one.  Here a pool of 64 chunks carries 300
    connections one after another, all within the idle timeout."""
    frames = []
    for i in range(300):
        conn = Conn(cli=("10.0.0.1", 20000 + i), t=1.0 + i * 0.01)
        frames += conn.exchange(b"GET /%d" % i, b"HTTP/1.1 200 OK\r\n\r\n%d" % i)
    got = []
    nf = mbx.NF("reader")
    nf.sub(mbx.DATA_RDY, lambda ev: got.append(bytes(ev.read())), side="both")
    counters, _ = run([nf], frames=frames, stream_memory=1 << 20)
    assert counters["tcp"]["memcaps"] == 0 and len(got) == 600
    assert counters["tcp"]["pool_chunks_in_use"] == 0


def test_a_keep_alive_probe_with_a_garbage_byte_is_no_conflict(run):
    """Keep-alive probes resend the last byte, often as garbage (RFC 1122 §4.2.3.6):
    each one raised OVERLAP_CONFLICT.  A different byte elsewhere still does."""
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, PSH | ACK, b"abc")
    conn.s(1, 4)
    for _ in range(3):
        conn.c(3, 1, ACK, b"\x00")              # seq = next - 1, one byte
        conn.s(1, 4)
    conn.c(1, 1, PSH | ACK, b"aXc")             # a real conflicting retransmission
    rec = Recorder([mbx.FLOW_TCP_OVERLAP_CONFLICT, mbx.DATA_RDY])
    run([rec], frames=conn.frames)
    assert [e[3]["offset"] for e in rec.of("FLOW/TCP/OVERLAP_CONFLICT")] == [1]
    assert b"".join(d for _, _, d in rec.streams[next(iter(rec.streams))]) == b"abc"


def test_a_midstream_pickup_keeps_bytes_before_its_first_payload(run, tmp_path):
    """Picked up without a SYN: a pure ACK already put the client's next byte at
    seq 1, so "hello " arriving after "world" still belongs before it."""
    conn = Conn()
    conn.c(1, 1)
    conn.s(1, 1)
    conn.c(7, 1, PSH | ACK, b"world")
    conn.c(1, 1, PSH | ACK, b"hello ")
    conn.s(1, 12)
    conn.c(12, 1, FIN | ACK)
    conn.s(1, 13, FIN | ACK)
    conn.c(13, 2)
    c2s, _, gaps = _streams_and_gaps(run, tmp_path, conn)
    assert c2s == (11, _sha(b"hello world")) and gaps == []


def test_multiple_gaps_one_ack_readable(run, tmp_path):
    rec = Recorder([mbx.DATA_RDY])
    run([rec], frames=_three_holes(), burst=1, retain=1 << 16)
    chunks = rec.streams[next(iter(rec.streams))]
    assert [d for _, _, d in chunks] == [b"a" * 10, b"b" * 10, b"c" * 10]


def test_data_rdy_sides(run, tmp_path):
    """DATA_RDY belongs to the endpoint receiving the stream: "server" gets the
    client's bytes, "client" the server's; the default ("sender") and "both" get
    every DATA_RDY once, and so does "receiver": the receiving side is the one a
    DATA_RDY belongs to.  ("receiver" used to get none, and its subscriber's flows
    were not even reassembled: the subscription matched no DATA_RDY.)"""
    frames = Conn().exchange(b"request", b"response")
    got, n = {}, {}
    for side in ("sender", "both", "client", "server", "receiver"):
        rec = Recorder([mbx.DATA_RDY], side=side, name=side)
        counters, _ = run([rec], frames=frames)
        got[side] = {d: joined(v) for (_, d), v in rec.streams.items()}
        n[side] = (len(rec.of("DATA_RDY")), counters["tcp"]["streams_opened"])
    assert got["sender"] == got["both"] == got["receiver"] == {0: b"request",
                                                               1: b"response"}
    assert got["server"] == {0: b"request"}
    assert got["client"] == {1: b"response"}
    assert n["receiver"] == n["sender"] == n["both"] == (2, 1)


def test_a_finished_run_frees_its_stack_without_garbage_collection(example_pcap):
    """The bus, the TCP Monitor and the handlers' Event views pointed at one another,
    so each App run in one process kept its Stack and Event Memory until a full
    garbage collection, which the buffers' size does not bring on (10 MiB more per
    run)."""
    import gc

    from mbx._monitor import TcpMonitor

    from mbx._events import EventBus
    from mbx.ports import open_input

    def live():
        return sum(isinstance(o, TcpMonitor | EventBus) for o in gc.get_objects())

    gc.collect()
    before = live()
    gc.disable()
    try:
        for _ in range(3):
            nf = mbx.NF("reader")
            nf.sub(mbx.DATA_RDY, lambda ev: len(ev.read()))
            terminator = mbx.NF("terminator")      # its sink points at the stack
            terminator.pub(mbx.FLOW_TCP_TERMINATE)
            inp = open_input(f"pcap:{example_pcap}")
            app = mbx.App([nf, terminator])
            app.run(inp)
            inp.close()
            del app, nf, terminator
        assert live() == before
    finally:
        gc.enable()


# ---------------------------------------------------------------------------
# Data on a SYN (TCP Fast Open): stream data only once the receiver took it

SYNDATA, REAL = b"SYNDATA", b"REAL request\r\n"


def _syn_data_run(run, tmp_path, conn):
    """(stream bytes by stream_dir as NFs read them, the c2s and s2c (length,
    sha256) of mbx flows, OVERLAP_CONFLICT events, the tcp counters)."""
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_OVERLAP_CONFLICT], side="both")
    counters, _ = run([rec], frames=conn.frames)
    c2s, s2c, _ = _streams_and_gaps(run, tmp_path, conn)
    streams = {d: joined(ch) for (_, d), ch in rec.streams.items()}
    return streams, c2s, s2c, rec.of("FLOW/TCP/OVERLAP_CONFLICT"), counters["tcp"]


def _close(conn, c_next, s_next):
    conn.c(c_next, s_next, FIN | ACK)
    conn.s(s_next, c_next + 1, FIN | ACK)
    conn.c(c_next + 1, s_next + 1)


def test_syn_data_the_server_refuses_never_reaches_the_stream(run, tmp_path):
    """A server without a TFO cookie for the client (Linux, say) answers a SYN with
    data by a SYN+ACK that acknowledges the SYN only, throws the SYN's bytes away,
    and gets the real bytes again at ISN + 1.  The Monitor delivered the SYN's bytes
    at once, so NFs read SYNDATA where the server got REAL, and the real bytes only
    raised OVERLAP_CONFLICT (an IDS evasion)."""
    conn = Conn()
    conn.c(0, -conn.isn_s, SYN, SYNDATA)
    conn.s(0, 1, SYN | ACK)                     # acknowledges the SYN only
    conn.c(1, 1, PSH | ACK, REAL)               # the client sends its bytes again
    conn.s(1, 1 + len(REAL))
    _close(conn, 1 + len(REAL), 1)
    streams, c2s, _, conflicts, tcp = _syn_data_run(run, tmp_path, conn)
    assert streams == {0: REAL} and c2s == (len(REAL), _sha(REAL))
    assert conflicts == [] and tcp["conflicts"] == 0
    assert tcp["syn_data_dropped"] == len(SYNDATA)
    assert tcp["pool_chunks_in_use"] == 0
    # and mbx run's summary says so
    capture = tmp_path / "syn.pcap"
    write_pcap(str(capture), conn.frames)
    nf = tmp_path / "reader.py"
    nf.write_text("import mbx\nmbx.mb_sub(mbx.DATA_RDY, lambda ev: ev.read())\n")
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "run", str(nf), "--in",
                        f"pcap:{capture}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert f"SYN data the receiver did not take {len(SYNDATA)} bytes" in r.stdout


@pytest.mark.parametrize("taken", [len(SYNDATA), 3])
def test_syn_data_the_server_takes_is_the_stream_s_first_bytes(run, tmp_path, taken):
    """A SYN+ACK that acknowledges the SYN's bytes (TFO accepted): those bytes are
    the stream's first, ahead of what follows; of a part taken, only that part."""
    conn = Conn()
    conn.c(0, -conn.isn_s, SYN, SYNDATA)
    conn.s(0, 1 + taken, SYN | ACK)
    rest = SYNDATA[taken:] + b" and more"
    conn.c(1 + taken, 1, PSH | ACK, rest)
    end = 1 + taken + len(rest)
    conn.s(1, end)
    _close(conn, end, 1)
    streams, c2s, _, conflicts, tcp = _syn_data_run(run, tmp_path, conn)
    want = SYNDATA + b" and more"
    assert streams == {0: want} and c2s == (len(want), _sha(want))
    assert conflicts == [] and tcp["syn_data_dropped"] == len(SYNDATA) - taken


@pytest.mark.parametrize("taken", [False, True])
def test_syn_data_in_a_one_sided_capture(run, tmp_path, taken):
    """Only the client's side captured (or the SYN+ACK lost): its next segment with
    data says what became of its SYN's bytes: sent again at ISN + 1, they were
    refused; sent on past them, they were taken and come first."""
    conn = Conn()
    conn.c(0, -conn.isn_s, SYN, SYNDATA)
    start = 1 + len(SYNDATA) if taken else 1
    conn.c(start, 1)                            # its ACK of the SYN+ACK decides nothing
    conn.c(start, 1, PSH | ACK, REAL)
    conn.c(start + len(REAL), 1, FIN | ACK)
    want = SYNDATA + REAL if taken else REAL
    streams, c2s, _, conflicts, tcp = _syn_data_run(run, tmp_path, conn)
    assert streams == {0: want} and c2s == (len(want), _sha(want))
    assert conflicts == [] and tcp["syn_data_dropped"] == (0 if taken else len(SYNDATA))


@pytest.mark.parametrize("end", ["fin", "rst"])
def test_syn_data_nothing_decided_goes_to_the_stream_when_the_connection_ends(
        run, tmp_path, end):
    """Held SYN data that nothing decided (no reply, no later data) when the
    connection ends by a FIN or a RST is delivered then, on that packet, as any
    data the receiver may have taken: it does not vanish."""
    conn = Conn()
    conn.c(0, -conn.isn_s, SYN, SYNDATA)
    if end == "fin":
        conn.c(1 + len(SYNDATA), 1, FIN | ACK)
    else:
        conn.s(0, 1 + len(SYNDATA), RST | ACK)  # a closed port's reply
    streams, c2s, _, conflicts, tcp = _syn_data_run(run, tmp_path, conn)
    assert streams == {0: SYNDATA} and c2s == (len(SYNDATA), _sha(SYNDATA))
    assert tcp["syn_data_dropped"] == 0 and tcp["pool_chunks_in_use"] == 0


@pytest.mark.parametrize("taken", [False, True])
def test_data_on_a_syn_ack_counts_once_the_client_took_it(run, tmp_path, taken):
    """The same rule for the server's side: data on its SYN+ACK is stream data only
    once the client's ACK covers it; else the server sends it again at ISN + 1."""
    conn = Conn()
    conn.c(0, -conn.isn_s, SYN)
    conn.s(0, 1, SYN | ACK, b"HELLO")
    if taken:
        conn.c(1, 6)
        conn.s(6, 1, PSH | ACK, REAL)
        s_next = 6 + len(REAL)
    else:
        conn.c(1, 1)                            # acknowledges the SYN+ACK only
        conn.s(1, 1, PSH | ACK, REAL)
        s_next = 1 + len(REAL)
    conn.c(1, s_next)
    _close(conn, 1, s_next)
    want = b"HELLO" + REAL if taken else REAL
    streams, _, s2c, conflicts, tcp = _syn_data_run(run, tmp_path, conn)
    assert streams == {1: want} and s2c == (len(want), _sha(want))
    assert conflicts == [] and tcp["syn_data_dropped"] == (0 if taken else 5)


@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
@pytest.mark.parametrize("end", ["idle", "input_end"])
def test_syn_data_nothing_decided_by_its_flow_s_end_is_dropped(run, deploy, end):
    """SYN data still held when its flow ends (idle, or at the input's end) had no
    sign the receiver took it: dropped and counted, its memory back in the pool.
    (It was delivered in a DATA_RDY without a packet, which a filter could not
    match: an NF filtered to port 80 got another port's bytes.)"""
    conn = Conn()
    conn.c(0, -conn.isn_s, SYN, SYNDATA)
    if end == "idle":                           # a later flow's packet expires it
        later = Conn(cli=("10.0.0.3", 40001), t=500.0)
        later.c(0, 0, SYN)
        conn.frames += later.frames
    counters, _ = run([EveryEventReader()], frames=conn.frames, stack="tcp",
                      deploy=deploy)
    assert counters["nfs"]["every"]["report"]["read"] == 0
    assert counters["tcp"]["syn_data_dropped"] == len(SYNDATA)
    assert counters["tcp"]["pool_chunks_in_use"] == 0


@pytest.mark.parametrize("rounds", [1, 2])
def test_an_ack_over_many_holes_keeps_every_data_rdy_readable(run, rounds):
    # Each round: as many pieces as a stream holds (the interval bound), each behind
    # a hole, then one ACK over them all: a gap and a DATA_RDY per hole, all in one
    # burst.  Holding the gaps must not release bytes whose DATA_RDY the NF has not
    # read yet; a second round in the same burst overfills the gap list, which then
    # joins its oldest gaps over those bytes, still readable by their DATA_RDY.
    from mbx._stream import MAX_OOO_PIECES
    conn = Conn()
    conn.handshake()
    want, off = {}, 0
    for _ in range(rounds):
        for _ in range(MAX_OOO_PIECES):
            data = bytes([65 + len(want) % 26]) * 100
            conn.s(1 + off + 100, 1, PSH | ACK, data)
            want[off + 100] = data
            off += 200
        conn.c(1, 1 + off)
    burst = len(conn.frames)
    for _ in range(40):                         # the next burst: the ACK again
        conn.c(1, 1 + off)
    rec = Recorder([mbx.DATA_RDY])
    counters, _ = run([rec], frames=conn.frames, burst=burst)
    chunks = rec.streams[next(iter(rec.streams))]
    assert {o: d for o, _, d in chunks} == want
    assert counters["tcp"]["gaps"] == MAX_OOO_PIECES * rounds
    assert counters["tcp"]["gap_overflows"] == counters["tcp"]["gap_deferrals"] == 0
    assert (counters["tcp"]["gap_joins"] > 0) == (rounds == 2)


@pytest.mark.parametrize("burst", [16, 256])
def test_rounds_of_holes_in_one_burst_lose_nothing(run, burst, tmp_path):
    # Eight rounds of 20 pieces behind 20 holes, each round then ACKed whole (a
    # capture that missed half of every round): whatever the burst, every captured
    # byte is read, every hole is a gap, and nothing is refused.  With 256 a burst
    # holds all eight rounds, more gaps than the list holds while the NF has not
    # read the bytes between them yet.
    conn = Conn()
    conn.handshake()
    want, base = {}, 0
    for _ in range(8):
        for k in range(20):
            data = bytes([65 + len(want) % 26]) * 10
            conn.s(1 + base + 20 * k + 10, 1, PSH | ACK, data)
            want[base + 20 * k + 10] = data
        base += 20 * 20 + 10
        conn.c(1, 1 + base)
    rec = Recorder([mbx.DATA_RDY])
    counters, _ = run([rec], frames=conn.frames, burst=burst)
    chunks = rec.streams[next(iter(rec.streams))]
    assert {o: d for o, _, d in chunks} == want
    tcp = counters["tcp"]
    # 20 holes a round (the ACK ends where bytes were seen: a round's last hole is
    # skipped with the next round's first, 10 + 10 bytes)
    assert tcp["gaps"] == 8 * 20 and tcp["gap_bytes"] == 20 * 10 + 7 * (19 * 10 + 20)
    assert tcp["memcaps"] == tcp["gap_deferrals"] == tcp["gap_overflows"] == 0
    assert (tcp["gap_joins"] > 0) == (burst == 256)
    # mbx flows (bursts of 256, no NF) hashes every captured byte too
    path = str(tmp_path / "rounds.pcap")
    write_pcap(path, conn.frames)
    doc, warnings = flows_json(path)
    (summary,) = doc["connections"].values()
    assert summary["s2c_len"] == len(want) * 10
    # the holes are the capture's, and said so: the only warning
    assert warnings == [f"{tcp['gaps']} holes the capture missed ({tcp['gap_bytes']:,} "
                        "bytes) the receiver acknowledged: skipped, those bytes are in no "
                        "digest"]


@pytest.mark.parametrize("fin_with_hole", [True, False])
def test_a_fin_beyond_a_hole_waits_for_it(run, fin_with_hole):
    # The client half-closes; the server sends A, then (B lost) C with its FIN.  The
    # client has not taken that FIN: it queues it until B fills the hole, and only
    # its ACK of the FIN closes the connection.  Until then B is stream data.
    conn = Conn()
    conn.handshake()
    req = b"GET / HTTP/1.1\r\n\r\n"
    n = len(req)
    conn.c(1, 1, PSH | ACK, req)
    conn.c(1 + n, 1, FIN | ACK)                 # client half-closes
    conn.s(1, n + 2)                            # server ACKs it
    conn.s(1, n + 2, ACK, b"A" * 100)
    if fin_with_hole:
        conn.s(201, n + 2, PSH | FIN | ACK, b"C" * 100)     # B lost
        conn.c(n + 2, 101)                      # dup ACK: the hole
        conn.s(101, n + 2, ACK, b"B" * 100)     # B retransmitted
    else:
        conn.s(101, n + 2, ACK, b"B" * 100)
        conn.s(201, n + 2, PSH | FIN | ACK, b"C" * 100)
    last = conn.c(n + 2, 302)                   # all data and the FIN acknowledged
    rec = Recorder([mbx.DATA_RDY, mbx.FLOW_TCP_STATE, mbx.FLOW_TCP_TERMINATE],
                   side="both")
    counters, _ = run([rec], frames=conn.frames)
    assert by_dir(rec) == {0: req, 1: b"A" * 100 + b"B" * 100 + b"C" * 100}
    assert counters["tcp"]["payload_after_close"] == 0
    term = rec.of("FLOW/TCP/TERMINATE")
    # the client takes the FIN in sequence: FIN_WAIT_2 -> TIME_WAIT when it ACKs it
    # (the hole) or when it comes (none); both FINs acknowledged either way at the end
    assert len(term) == 1 and term[0][3]["reason"] == 1
    took = [e[1] for e in rec.of("FLOW/TCP/STATE")
            if (e[3]["old_state"], e[3]["new_state"]) == (6, 10)]
    assert took and set(took) == ({last} if fin_with_hole else {last - 1})
    if fin_with_hole:
        assert term[0][1] == last


@pytest.mark.parametrize("late, counted", [(b"A" * 100, 0), (b"B" * 100 + b"C", 1)])
def test_payload_after_close_is_only_bytes_beyond_the_side_s_fin(run, late, counted):
    # A copy of data the stream had, seen after the close (a retransmission the
    # network delayed: seen once on veths under load), was counted as payload after
    # close, and mbx flows warned that those bytes were in no digest; they were.
    conn = Conn()
    conn.handshake()
    conn.c(1, 1, FIN | ACK)
    conn.s(1, 2, ACK, b"A" * 100)
    conn.s(101, 2, PSH | ACK, b"B" * 100)
    conn.s(201, 2, FIN | ACK)
    conn.c(2, 202)                              # both FINs acknowledged: closed
    conn.s(1 if counted == 0 else 101, 2, ACK, late)    # a copy of A; or B and one more
    rec = Recorder([mbx.DATA_RDY], side="both")
    counters, _ = run([rec], frames=conn.frames)
    assert by_dir(rec) == {1: b"A" * 100 + b"B" * 100}
    assert counters["tcp"]["payload_after_close"] == counted


# ---------------------------------------------------------------------------
# VLAN ids in the flow key

def _tagged(frame, *vids):
    """frame (untagged Ethernet) with 802.1Q tags ``vids`` after its MAC addresses."""
    return frame[:12] + b"".join(struct.pack("!HH", 0x8100, v) for v in vids) + frame[12:]


def _capture(path, frames):
    with open(path, "wb") as fh:
        writer = dpkt.pcap.Writer(fh)
        for ts, frame in sorted(frames, key=lambda f: f[0]):
            writer.writepkt(frame, ts)
    return str(path)


def test_the_same_connection_in_two_vlans_is_two_connections(run, tmp_path):
    # Two address spaces that overlap on a trunk: one 5-tuple, two TCP connections,
    # interleaved packet by packet, with their own sequence numbers and bytes.  One
    # flow for both mixed their TCP state: each side's ISN was the other's, and
    # neither stream came out whole.
    one = _dpkt_connection(1.0, 1000, 5000, b"GET /ten", b"ten" * 100)
    two = _dpkt_connection(1.001, 70000, 900000, b"GET /twenty", b"twenty" * 70)
    frames = ([(ts, _tagged(f, 10)) for ts, f in one]
              + [(ts, _tagged(f, 20)) for ts, f in two])
    doc, warnings = flows_json(_capture(tmp_path / "vlans.pcap", frames))
    assert not warnings
    key = f"{CLI4[0]}:{CLI4[1]}-{SRV4[0]}:{SRV4[1]}"
    conns = doc["connections"]
    assert sorted(conns) == [key + " vlan 10", key + " vlan 20"]
    for vid, req, resp in ((10, b"GET /ten", b"ten" * 100),
                           (20, b"GET /twenty", b"twenty" * 70)):
        c = conns[f"{key} vlan {vid}"]
        assert c["handshake"] and c["close"] == "fin"
        assert (c["pkts_c2s"], c["pkts_s2c"]) == (6, 4)
        assert (c["c2s_sha256"], c["s2c_sha256"]) == (
            hashlib.sha256(req).hexdigest(), hashlib.sha256(resp).hexdigest())
    # and through an App: two flows, each with its own TCP state and stream bytes
    rec = Recorder([mbx.FLOW_START, mbx.FLOW_TCP_ESTABLISHED, mbx.DATA_RDY])
    counters, _ = run([rec], frames=frames)
    assert counters["flows"]["created"] == 2
    # the flow events say which VLAN (the NFs' view of the key)
    assert sorted((e[3]["vlan"], e[3]["inner_vlan"]) for e in rec.of("FLOW/START")) == [
        (10, 0), (20, 0)]
    assert sorted(e[3]["vlan"] for e in rec.of("FLOW/TCP/ESTABLISHED")) == [10, 20]
    assert sorted(joined(v) for v in rec.streams.values()) == sorted(
        [b"GET /ten", b"ten" * 100, b"GET /twenty", b"twenty" * 70])


def test_a_connection_routed_between_two_vlans_is_one_without_vlans_in_the_key(
        run, tmp_path):
    # Router on a stick: the client's side is VLAN 10 and the server's VLAN 20, so a
    # middlebox on the trunk sees the client's packets tagged 10 and the server's
    # tagged 20.  Keyed by VLAN those are two half connections; with
    # vlan_in_flow_key=False one connection, reassembled both ways.
    frames = [(ts, _tagged(f, 10 if f[26:30] == bytes([10, 0, 0, 1]) else 20))
              for ts, f in _dpkt_connection(1.0, 1000, 5000, b"GET /", b"page" * 90)]
    path = _capture(tmp_path / "stick.pcap", frames)
    key = f"{CLI4[0]}:{CLI4[1]}-{SRV4[0]}:{SRV4[1]}"
    doc, _ = flows_json(path, vlan_in_flow_key=False)
    assert list(doc["connections"]) == [key]
    c = doc["connections"][key]
    assert c["handshake"] and (c["pkts_c2s"], c["pkts_s2c"]) == (6, 4)
    assert (c["c2s_sha256"], c["s2c_sha256"]) == (
        hashlib.sha256(b"GET /").hexdigest(), hashlib.sha256(b"page" * 90).hexdigest())
    doc, _ = flows_json(path)           # the default: two, neither with a handshake
    assert sorted(doc["connections"]) == [key + " vlan 10", key + " vlan 20"]
    assert not any(c["handshake"] for c in doc["connections"].values())
    rec = Recorder([mbx.DATA_RDY])
    counters, _ = run([rec], frames=frames, vlan_in_flow_key=False)
    assert counters["flows"]["created"] == 1
    assert sorted(joined(v) for v in rec.streams.values()) == [b"GET /", b"page" * 90]


def test_both_qinq_ids_are_in_the_flow_key(run):
    # 802.1ad: the same 5-tuple under outer 100 inner 10, outer 100 inner 20 and
    # outer 200 inner 10 is three flows, each direction of each in its own
    tags = [(100, 10), (100, 20), (200, 10)]
    frames = [(1.0 + k * 0.001, ether(tcp4(*ends, flags=0x18, seq=1), vlans=t))
              for k, (t, ends) in enumerate(
                  (t, ends) for ends in [(CLI4[0], SRV4[0], CLI4[1], SRV4[1]),
                                         (SRV4[0], CLI4[0], SRV4[1], CLI4[1])]
                  for t in tags)]
    rec = Recorder([mbx.FLOW_START, mbx.FLOW_END])
    counters, _ = run([rec], frames=frames, stack="network")
    assert counters["flows"]["created"] == 3
    ends = rec.of("FLOW/END")
    assert sorted((e[3]["vlan"], e[3]["inner_vlan"]) for e in ends) == sorted(tags)
    assert all((e[3]["pkts_c2s"], e[3]["pkts_s2c"]) == (1, 1) for e in ends)
