"""Synthetic captures for the benchmarks, and the dpkt baselines they are measured against.

A capture is ``n_packets`` Ethernet/IPv4 frames over ``n_flows`` flows, half TCP and
half UDP, each packet of a flow chosen at random (uniform, seeded) and sent by its
client or its server with equal chance.  The frames of each (flow, direction) are one
template built once with the example builders (so checksums and lengths are right);
records are then written as pcap header + template, which makes a million packets a
matter of a second or two rather than the ~40 s of building each frame.

Files are cached under ``/dev/shm`` (tmpfs: in memory), keyed by every parameter, so
a second run reuses them and reading them measures the reader, not the disk.
"""
import os
import struct
import tempfile

import dpkt

# numpy's OpenBLAS starts a thread per CPU at import, and they showed in the
# benchmarks' profiles (about 4 %) though nothing here uses BLAS: on 2 cores they
# only compete with the processes being measured.  Set before numpy loads.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
import numpy as np  # noqa: E402

from mbx.examples.capture import ether, tcp4, udp4

CACHE_DIR = os.environ.get("MBX_BENCH_DIR", "/dev/shm" if os.path.isdir("/dev/shm")
                           else tempfile.gettempdir())
FORMAT_VERSION = 1          # bump when the layout of the generated traffic changes
T0_NS = 1_700_000_000 * 10**9
GAP_NS = 1_000              # one packet a microsecond: 1 M packets span 1 s, no expiry

_ETH_IP = 14 + 20


def _addresses(flow):
    """Client and server address of ``flow``: 10.x.y.z clients, 172.16.x.y servers."""
    c = 0x0A000000 + 1 + flow
    s = 0xAC100000 + 1 + flow % 4096
    return (f"{c >> 24}.{c >> 16 & 255}.{c >> 8 & 255}.{c & 255}",
            f"{s >> 24}.{s >> 16 & 255}.{s >> 8 & 255}.{s & 255}")


def _frame(flow, server_side, size):
    cli, srv = _addresses(flow)
    cport, sport = 1024 + flow % 60000, (80, 53)[flow & 1]
    tcp = not flow & 1
    pad = size - _ETH_IP - (20 if tcp else 8)
    payload = bytes(max(pad, 0))
    if tcp:
        build = tcp4
        extra = {"seq": flow * 7919 & 0xFFFFFFFF, "ack": flow * 104729 & 0xFFFFFFFF,
                 "flags": 0x10}
    else:
        build = udp4
        extra = {}
    if server_side:
        ip = build(srv, cli, sport, cport, payload, **extra)
    else:
        ip = build(cli, srv, cport, sport, payload, **extra)
    return ether(ip)


def templates(n_flows, sizes):
    """One frame per (flow, direction): index ``2 * flow + side`` (side 1: server)."""
    return [_frame(k >> 1, k & 1, int(sizes[k])) for k in range(2 * n_flows)]


def capture_path(n_packets, n_flows, size, seed=1):
    """Where the capture with these parameters is (or will be) cached."""
    return os.path.join(CACHE_DIR, f"mbx-bench-v{FORMAT_VERSION}-{n_packets}p-{n_flows}f-"
                                   f"{size}-s{seed}.pcap")


def make_capture(n_packets=1_000_000, n_flows=100_000, size="64", seed=1):
    """Path of a capture of ``n_packets`` over ``n_flows``; built once, then cached.

    ``size`` is ``"64"`` (every frame 64 bytes) or ``"mixed"`` (each flow direction
    has its own size, uniform in 500..1500 bytes).
    """
    path = capture_path(n_packets, n_flows, size, seed)
    if os.path.exists(path):
        return path
    rng = np.random.default_rng(seed)
    if size == "64":
        sizes = np.full(2 * n_flows, 64)
    elif size == "mixed":
        sizes = rng.integers(500, 1501, 2 * n_flows)
    else:
        raise ValueError(f"size must be '64' or 'mixed', not {size!r}")
    tmpl = templates(n_flows, sizes)
    # Every flow appears (its first packet from the client), then random traffic.
    first = np.arange(min(n_flows, n_packets)) * 2
    rest = n_packets - len(first)
    pick = np.concatenate([first, rng.integers(0, n_flows, rest) * 2
                           + rng.integers(0, 2, rest)])
    if rest:
        # Spread the first packets through the capture: new flows keep arriving.
        order = rng.permutation(n_packets)
        firsts = np.sort(order[:len(first)])
        others = np.sort(order[len(first):])
        seq = np.empty(n_packets, dtype=np.int64)
        seq[firsts] = first
        seq[others] = pick[len(first):]
        pick = seq
    ts = T0_NS + np.arange(n_packets, dtype=np.int64) * GAP_NS
    lens = np.array([len(t) for t in tmpl], dtype=np.uint32)[pick]
    hdr = np.empty((n_packets, 4), dtype="<u4")
    hdr[:, 0] = ts // 10**9
    hdr[:, 1] = ts % 10**9 // 1000
    hdr[:, 2] = lens
    hdr[:, 3] = lens
    hb = hdr.tobytes()
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        chunk = 65536
        picks = pick.tolist()
        for base in range(0, n_packets, chunk):
            parts = []
            for i in range(base, min(base + chunk, n_packets)):
                parts.append(hb[16 * i:16 * i + 16])
                parts.append(tmpl[picks[i]])
            fh.write(b"".join(parts))
    os.replace(tmp, path)
    return path


def load_frames(path):
    """Every frame of ``path`` as bytes, in a list (read by dpkt, not timed)."""
    with open(path, "rb") as fh:
        return [bytes(buf) for _ts, buf in dpkt.pcap.Reader(fh)]


def dpkt_flows(frames):
    """The dpkt baseline of the stack: parse each frame, take IPv4/IPv6 and TCP/UDP,
    key the flow by a direction-independent 5-tuple and count packets and bytes per
    direction.  Returns {key: [pkts_fwd, pkts_rev, bytes_fwd, bytes_rev]}."""
    flows = {}
    ethernet = dpkt.ethernet.Ethernet
    ip_types = (dpkt.ip.IP, dpkt.ip6.IP6)
    l4_types = (dpkt.tcp.TCP, dpkt.udp.UDP)
    for buf in frames:
        ip = ethernet(buf).data
        if not isinstance(ip, ip_types):
            continue
        l4 = ip.data
        if not isinstance(l4, l4_types):
            continue
        a = (ip.src, l4.sport)
        b = (ip.dst, l4.dport)
        if a <= b:
            key, side = (a, b, ip.p), 0
        else:
            key, side = (b, a, ip.p), 1
        c = flows.get(key)
        if c is None:
            c = flows[key] = [0, 0, 0, 0]
        c[side] += 1
        c[2 + side] += len(buf)
    return flows


def dpkt_read(path):
    """The dpkt baseline of the pcap reader: iterate over every record."""
    n = 0
    with open(path, "rb") as fh:
        for _ts, _buf in dpkt.pcap.Reader(fh):
            n += 1
    return n


def mbx_read(path):
    """Read every record of ``path`` into a reused Batch (mbx's reader, no stack)."""
    from mbx._packet import Batch
    from mbx.ports import open_input

    inp = open_input("pcap:" + path)
    batch = Batch(64)
    n = 0
    try:
        while True:
            got = inp.receive(batch)
            if got < 0:
                break
            n += got
            batch.reset()
    finally:
        inp.close()
    return n


def noop_calls(n):
    """The least a per-event Python dispatch can cost: ``n`` calls of a no-op."""
    def handler(ev):
        return None

    for ev in range(n):
        handler(ev)
    return n


def deep_size(obj, seen=None):
    """Bytes held by ``obj`` and everything it refers to (containers, bytes, ints),
    each object counted once."""
    import sys

    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        for k, v in obj.items():
            size += deep_size(k, seen) + deep_size(v, seen)
    elif isinstance(obj, list | tuple | set | frozenset):
        for x in obj:
            size += deep_size(x, seen)
    return size


# ------------------------------------------------------------------ TCP Monitor

# The TCP Monitor's captures are TCP only, with handshakes: built column by column in
# numpy (64-byte frames) or segment by segment (the bulk captures), with correct IP and
# TCP checksums either way.
MON_FORMAT_VERSION = 1      # bump when the layout of the TCP Monitor captures changes
_MAC = bytes.fromhex("020000000002020000000001")


def _csum_fold(total):
    """One's complement checksum field of a sum of big-endian 16-bit words."""
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _word_sum(data):
    """Sum of ``data`` as big-endian 16-bit words, mod 0xFFFF (2**16 = 1 mod 0xFFFF,
    so this is the one's complement sum without a Python loop over the words)."""
    if len(data) & 1:
        data += b"\0"
    return int.from_bytes(data, "big") % 0xFFFF


def _write_pcap(path, records):
    """Writes ``records`` (an iterable of (ts_ns, frame)) as a pcap file at ``path``,
    through a temporary name so an interrupted build leaves no half file."""
    tmp = path + f".tmp{os.getpid()}"
    pack = struct.Struct("<IIII").pack
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        parts = []
        for ts, frame in records:
            parts.append(pack(ts // 10**9, ts % 10**9 // 1000, len(frame), len(frame)))
            parts.append(frame)
            if len(parts) >= 65536:
                fh.write(b"".join(parts))
                parts.clear()
        fh.write(b"".join(parts))
    os.replace(tmp, path)


def _mon_path(kind, *params):
    return os.path.join(CACHE_DIR, f"mbx-bench-mon{MON_FORMAT_VERSION}-{kind}-"
                        + "-".join(str(p) for p in params) + ".pcap")


# Per-flow pattern of the 64-byte TCP captures: (from server, flags, payload length).
# A handshake, then 10-byte segments both ways, each acking the other side's bytes.
_TCP64_PATTERN = [(0, 0x02, 0), (1, 0x12, 0), (0, 0x10, 0)] + [
    (k & 1, 0x18, 10) for k in range(61)]


def make_tcp64_capture(n_flows=100_000, pkts_per_flow=10, seed=1):
    """Path of a capture of ``n_flows`` TCP connections of ``pkts_per_flow`` 64-byte
    frames each (SYN, SYN-ACK, ACK, then 10-byte segments alternating client and
    server, sequence and acknowledgment numbers consistent); built once, cached.

    The packets of all flows are interleaved at random (seeded) with each flow's own
    order kept, so flows open all through the capture and overlap.  With
    ``pkts_per_flow=1`` it is one SYN per flow: ``n_flows`` concurrent half-open flows.
    Handshake frames carry no payload and 10 bytes of Ethernet padding.
    """
    if not 1 <= pkts_per_flow <= len(_TCP64_PATTERN):
        raise ValueError(f"pkts_per_flow must be 1..{len(_TCP64_PATTERN)}")
    path = _mon_path("tcp64", f"{n_flows}f", f"{pkts_per_flow}ppf", f"s{seed}")
    if os.path.exists(path):
        return path
    rng = np.random.default_rng(seed)
    pat = _TCP64_PATTERN[:pkts_per_flow]
    k_n = len(pat)
    n = n_flows * k_n
    # relative seq/ack of each pattern step: the sender's bytes so far and the peer's
    sent = [0, 0]
    rel = []
    for srv, flags, plen in pat:
        seq = sent[srv]
        ack = sent[srv ^ 1] if flags & 0x10 else 0
        rel.append((seq, ack))
        sent[srv] += plen + (1 if flags & 0x02 else 0)
    flow = np.arange(n_flows, dtype=np.int64)
    isn = np.stack([(flow * 2654435761 + 12345) & 0xFFFFFFFF,
                    (flow * 40503 * 65537 + 777) & 0xFFFFFFFF], axis=1)
    cli_ip = 0x0A000001 + flow
    srv_ip = 0xAC100001 + flow % 4096
    cli_port = 1024 + flow % 60000
    srv_port = np.full(n_flows, 80)
    fr = np.zeros((n_flows, k_n, 64), dtype=np.uint8)
    fr[:, :, :12] = np.frombuffer(_MAC, dtype=np.uint8)
    fr[:, :, 12:14] = (8, 0)

    def put(col, width, values):
        # big-endian ``width``-byte fields at byte ``col`` of every frame
        v = np.asarray(values, dtype=np.uint64)
        for b in range(width):
            fr[:, :, col + b] = (v >> np.uint64(8 * (width - 1 - b))) & np.uint64(255)

    srv_side = np.array([s for s, _, _ in pat])
    plens = np.array([p for _, _, p in pat])
    flags = np.array([f for _, f, _ in pat])
    src = np.where(srv_side[None, :], srv_ip[:, None], cli_ip[:, None])
    dst = np.where(srv_side[None, :], cli_ip[:, None], srv_ip[:, None])
    sp = np.where(srv_side[None, :], srv_port[:, None], cli_port[:, None])
    dp = np.where(srv_side[None, :], cli_port[:, None], srv_port[:, None])
    own = isn[:, srv_side]                      # (flows, k): the sender's ISN
    peer = isn[:, srv_side ^ 1]
    rseq = np.array([s for s, _ in rel], dtype=np.int64)
    rack = np.array([a for _, a in rel], dtype=np.int64)
    seq = (own + rseq) & 0xFFFFFFFF
    ack = np.where(flags & 0x10, (peer + rack) & 0xFFFFFFFF, 0)
    fr[:, :, 14] = 0x45
    put(16, 2, np.broadcast_to(40 + plens, (n_flows, k_n)))
    fr[:, :, 22] = 64
    fr[:, :, 23] = 6
    put(26, 4, src)
    put(30, 4, dst)
    put(34, 2, sp)
    put(36, 2, dp)
    put(38, 4, seq)
    put(42, 4, ack)
    fr[:, :, 46] = 0x50
    fr[:, :, 47] = flags
    put(48, 2, np.full((n_flows, k_n), 65535))
    body = np.arange(10, dtype=np.uint8) + 0x41
    fr[:, :, 54:64] = np.where((plens > 0)[None, :, None], body, 0)
    words = fr.view(">u2").astype(np.uint64)    # (flows, k, 32)
    ip_sum = words[:, :, 7:17].sum(axis=2)
    put(24, 2, _fold_np(ip_sum))
    tcp_len = 20 + plens
    # pseudo header: addresses, protocol, TCP length; segment: words 17.. up to length
    seg_words = (tcp_len + 1) // 2
    mask = np.arange(32)[None, :] < (17 + seg_words)[:, None]     # (k, 32)
    mask[:, :17] = False
    tcp_sum = (words * mask[None, :, :]).sum(axis=2) + words[:, :, 13:17].sum(axis=2) \
        + 6 + tcp_len[None, :]
    put(50, 2, _fold_np(tcp_sum))
    # interleave: random positions, each flow's packets in pattern order
    pos = rng.permutation(n).reshape(n_flows, k_n)
    pos.sort(axis=1)
    order = np.empty(n, dtype=np.int64)
    order[pos.ravel()] = np.arange(n)
    frames = fr.reshape(n, 64)[order]
    ts = T0_NS + np.arange(n, dtype=np.int64) * GAP_NS
    hdr = np.empty((n, 4), dtype="<u4")
    hdr[:, 0] = ts // 10**9
    hdr[:, 1] = ts % 10**9 // 1000
    hdr[:, 2:] = 64
    rec = np.concatenate([hdr.view(np.uint8).reshape(n, 16), frames], axis=1)
    tmp = path + f".tmp{os.getpid()}"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        fh.write(rec.tobytes())
    os.replace(tmp, path)
    return path


def _fold_np(total):
    total = total.astype(np.uint64)
    for _ in range(3):
        total = (total & np.uint64(0xFFFF)) + (total >> np.uint64(16))
    return ~total & np.uint64(0xFFFF)


def _tcp_frame(src, dst, sport, dport, seq, ack, flags, payload, pay_sum, opts=b""):
    """An Ethernet/IPv4/TCP frame; ``pay_sum`` is ``_word_sum(payload)`` (given so
    a payload reused many times is summed once)."""
    off = (20 + len(opts)) // 4
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, 65535, 0,
                      0) + opts
    seg_len = len(tcp) + len(payload)
    pseudo = src + dst + struct.pack("!xBH", 6, seg_len)
    # an odd-length header never happens (options are whole words), so the payload's
    # words line up with the segment's
    total = _word_sum(pseudo + tcp) + pay_sum
    tcp = tcp[:16] + struct.pack("!H", _csum_fold(total)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + seg_len, 0, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + struct.pack("!H", _csum_fold(_word_sum(ip))) + ip[12:]
    return _MAC + b"\x08\x00" + ip + tcp + payload


class _Conn:
    """One scripted connection of the bulk captures: its frames come out one at a time
    (``next_frames``) so the builder can interleave many connections."""

    def __init__(self, k, rng, data, exchanges, segment, ack_every):
        self.k = k
        self.cli = struct.pack("!I", 0x0A000001 + k)
        self.srv = struct.pack("!I", 0xAC100001 + k % 4096)
        self.cport, self.sport = 1024 + k % 60000, 80
        self.isn = [int(rng.integers(0, 2**32)), int(rng.integers(0, 2**32))]
        self.nxt = [(self.isn[0] + 1) & 0xFFFFFFFF, (self.isn[1] + 1) & 0xFFFFFFFF]
        self.data = data
        self.rng = rng
        self.exchanges = exchanges      # [(request bytes, response bytes)]
        self.segment = segment          # (min, max) segment payload
        self.ack_every = ack_every
        self.steps = self._script()

    def _seg(self, side, payload_off, length, flags=0x10):
        # a segment of ``length`` stream bytes from ``side`` (0 client, 1 server); the
        # bytes are a window of the shared random block, by stream offset
        src, dst = (self.cli, self.srv) if side == 0 else (self.srv, self.cli)
        sp, dp = (self.cport, self.sport) if side == 0 else (self.sport, self.cport)
        start = (payload_off * 7 + side * 104729 + self.k * 7919) % (
            len(self.data) - 65536)
        payload = self.data[start:start + length]
        seq = self.nxt[side]
        frame = _tcp_frame(src, dst, sp, dp, seq, self.nxt[side ^ 1], flags, payload,
                           _word_sum(payload))
        self.nxt[side] = (seq + length + (1 if flags & 0x01 else 0)) & 0xFFFFFFFF
        return frame

    def _script(self):
        mss = struct.pack("!BBH", 2, 4, 1460) + b"\x01\x03\x03\x07"
        c, s = self.cli, self.srv
        yield [_tcp_frame(c, s, self.cport, self.sport, self.isn[0], 0, 0x02, b"", 0, mss)]
        yield [_tcp_frame(s, c, self.sport, self.cport, self.isn[1], self.nxt[0], 0x12,
                          b"", 0, mss)]
        yield [_tcp_frame(c, s, self.cport, self.sport, self.nxt[0], self.nxt[1], 0x10,
                          b"", 0)]
        sent = [0, 0]
        lo, hi = self.segment
        for req, resp in self.exchanges:
            for side, total in ((0, req), (1, resp)):
                unacked = 0
                done = 0
                while done < total:
                    n = min(total - done, int(self.rng.integers(lo, hi + 1)))
                    frames = [self._seg(side, sent[side], n, 0x18 if done + n >= total
                                        else 0x10)]
                    done += n
                    sent[side] += n
                    unacked += 1
                    if unacked >= self.ack_every or done >= total:
                        frames.append(self._seg(side ^ 1, sent[side ^ 1], 0))
                        unacked = 0
                    yield frames
        yield [self._seg(0, sent[0], 0, 0x11)]
        yield [self._seg(1, sent[1], 0, 0x11)]
        yield [self._seg(0, sent[0], 0, 0x10)]


def _bulk_records(conns, concurrent, reorder, dup, rng):
    """Frames of ``conns`` interleaved: ``concurrent`` connections open at a time, one
    step (a segment and maybe its ACK) of a random open connection at a time; a
    fraction ``reorder`` of data segments swap with the next frame, ``dup`` are sent
    twice (a retransmission of identical bytes).  A held segment goes out after the
    next data frame (of any connection), before any ACK."""
    pending = list(reversed(conns))
    active = [pending.pop() for _ in range(min(concurrent, len(pending)))]
    ts = T0_NS
    held = None
    while active:
        i = int(rng.integers(0, len(active)))
        step = next(active[i].steps, None)
        if step is None:
            active[i] = active[-1]
            active.pop()
            if pending:
                active.append(pending.pop())
            continue
        for frame in step:
            ts += GAP_NS
            if held is not None:
                # a data segment overtakes the held one; an ACK never does (it would
                # acknowledge bytes the monitor has not seen: a loss, not a reorder)
                first, second = (frame, held) if len(frame) > 100 else (held, frame)
                yield ts, first
                yield ts, second
                held = None
                continue
            r = rng.random()
            if len(frame) > 100 and r < reorder:
                held = frame
                continue
            yield ts, frame
            if len(frame) > 100 and r < reorder + dup:
                yield ts, frame
    if held is not None:
        yield ts, held


def make_bulk_capture(total_mb=300, segment=1448, concurrent=32, seed=1):
    """Path of a capture of about ``total_mb`` MB of TCP payload; built once, cached.

    ``segment=1448``: bulk transfers, each connection a small request and a response
    of several MB in 1448-byte segments (``total_mb`` / 64 MB each, 64 connections,
    ``concurrent`` open at once).  ``segment="small"``: HTTP-like connections of
    several request/response exchanges whose segments are 100-200 bytes.  Every
    connection has its handshake and its FINs, the receiver ACKs every second
    segment, 0.5 % of segments are reordered and 0.5 % retransmitted.
    """
    path = _mon_path("bulk", f"{total_mb}MB", segment, f"{concurrent}c", f"s{seed}")
    if os.path.exists(path):
        return path
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, 1 << 22, dtype=np.uint8).tobytes()
    total = total_mb * 10**6
    conns = []
    if segment == "small":
        k, got = 0, 0
        while got < total:
            ex = [(int(rng.integers(150, 400)), int(rng.integers(1000, 8000)))
                  for _ in range(int(rng.integers(2, 9)))]
            conns.append(_Conn(k, rng, data, ex, (100, 200), 2))
            got += sum(a + b for a, b in ex)
            k += 1
    else:
        per = total // 64
        conns = [_Conn(k, rng, data, [(200, per)], (segment, segment), 2)
                 for k in range(64)]
    _write_pcap(path, _bulk_records(conns, concurrent, 0.005, 0.005, rng))
    return path


def payload_bytes(path):
    """TCP payload bytes of every frame of ``path`` (what the reassemblers deliver,
    plus the bytes of retransmitted copies), counted with dpkt."""
    n = 0
    with open(path, "rb") as fh:
        for _ts, buf in dpkt.pcap.Reader(fh):
            tcp = dpkt.ethernet.Ethernet(buf).data.data
            n += len(tcp.data)
    return n
