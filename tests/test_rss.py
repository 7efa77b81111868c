"""Software RSS (paper §4.2): the short header walk that places a frame in a stack
process before any parse must agree with the full parse plus the flow table's
symmetric hash, wherever it answers; the pcap reader and the stack then deliver
exactly a process's share."""
import random
import struct

import dpkt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from mbxtest import fragmented_flows

import mbx
from mbx._events import EventBus, _live_buses
from mbx._packet import Batch
from mbx._parse import parse
from mbx._pcap import PcapReader
from mbx._stack import NetworkLayer, rss_owners
from mbx.errors import CaptureFormatError, PortError
from mbx.examples.capture import ether, tcp4, tcp6, udp4

V4 = [b"\xc6\x12\x00\x01", b"\xc6\x12\x00\x02", b"\xc6\x13\x07\x07",
      # ordered one way in network byte order and the other way read little-endian
      # (1.0.0.2 < 2.0.0.1, 0x02000001 < 0x01000002 as a host's u32): which end
      # of a flow is the smaller must be decided in network order, as the flow
      # table does; the three above sort alike in both orders
      b"\x01\x00\x00\x02", b"\x02\x00\x00\x01"]
# ports likewise: 0x0102 < 0x0201, their bytes swapped the other way round
PORTS = [80, 443, 5000, 5001, 0x0102, 0x0201]
V6 = [bytes.fromhex("20010db8" + "00" * 11 + k) for k in ("01", "02", "ff")]
TPIDS = [0x8100, 0x88A8, 0x9100]
EXT6 = [0, 43, 60, 51, 44]          # hop-by-hop, routing, dest opts, AH, fragment


def l4_header(draw, proto, sport, dport):
    if proto == 6:
        doff = draw(st.sampled_from([5, 5, 6, 4, 15]))
        opts = b"\x01\x01\x01\x01" * max(0, doff - 5)
        return struct.pack("!HHIIBBHHH", sport, dport, 1, 2, doff << 4, 0x18, 100, 0,
                           0) + opts
    if proto == 17:
        ulen = draw(st.sampled_from([8, 16, 3, 400]))
        return struct.pack("!HHHH", sport, dport, ulen, 0)
    if proto in (1, 58):
        return struct.pack("!BBHHH", draw(st.sampled_from([0, 3, 8, 128])), 0, 0, 1, 2)
    return draw(st.binary(min_size=0, max_size=12))


def ipv4_packet(draw, proto, l4):
    src, dst = draw(st.sampled_from(V4)), draw(st.sampled_from(V4))
    opts = draw(st.sampled_from([b"", b"", b"\x01\x01\x01\x00", b"\x07\x07\x04" + b"\0" * 5,
                                 b"\x44\x02\x00\x00"]))
    ihl = (20 + len(opts)) // 4
    ihl = draw(st.sampled_from([ihl, ihl, ihl, 3, 15]))
    version = draw(st.sampled_from([4, 4, 4, 6]))
    frag = draw(st.sampled_from([0, 0, 0x4000, 0x2000, 0x0003, 0x2005, 0x1FFF]))
    # Authentication Headers (RFC 4302) before the transport: the parser walks them
    # to the ports inside; lengths (n + 2) * 4, 0 (too short, still walked) to 60
    nahs = draw(st.sampled_from([0, 0, 0, 1, 2]))
    ahs = b""
    for k in range(nahs):
        n = draw(st.sampled_from([0, 1, 4, 60]))
        ahs += bytes([51 if k + 1 < nahs else proto, n, 0, 0]) + b"\x5a" * (n * 4 + 4)
    body = opts + ahs + l4
    tot = 20 + len(body)
    tot = draw(st.sampled_from([tot, tot, tot, 19, 0, tot + 30, 65535]))
    hdr = struct.pack("!BBHHHBBH4s4s", (version << 4) | ihl, 0, tot, 7, frag, 64,
                      51 if nahs else proto, 0, src, dst)
    return hdr + body


def ipv6_packet(draw, proto, l4):
    src, dst = draw(st.sampled_from(V6)), draw(st.sampled_from(V6))
    chain = draw(st.lists(st.sampled_from(EXT6), max_size=3))
    nexts = chain + [proto]
    ext = b""
    for kind, nh in zip(chain, nexts[1:], strict=True):
        if kind == 44:
            off = draw(st.sampled_from([0, 0, 1, 8]))   # 0: atomic fragment
            more = draw(st.sampled_from([0, 1]))
            ext += struct.pack("!BBHI", nh, 0, (off << 3) | more, 99)
        elif kind == 51:
            ext += struct.pack("!BB", nh, 1) + b"\0" * 10
        else:
            ext += struct.pack("!BB", nh, 0) + b"\0" * 6
    body = ext + l4
    plen = draw(st.sampled_from([len(body), len(body), 0, len(body) + 50]))
    version = draw(st.sampled_from([6, 6, 6, 4]))
    return struct.pack("!IHBB16s16s", version << 28, plen, nexts[0], 64, src, dst) + body


@st.composite
def frames(draw):
    proto = draw(st.sampled_from([6, 6, 17, 17, 1, 58, 47, 50, 132]))
    sport = draw(st.sampled_from(PORTS))
    dport = draw(st.sampled_from(PORTS))
    l4 = l4_header(draw, proto, sport, dport) + draw(st.binary(max_size=16))
    family = draw(st.sampled_from([4, 6]))
    ip = ipv4_packet(draw, proto, l4) if family == 4 else ipv6_packet(draw, proto, l4)
    ethertype = draw(st.sampled_from([0x0800 if family == 4 else 0x86DD] * 4
                                     + [0x0806, 0x0800 if family == 6 else 0x86DD]))
    tags = b"".join(struct.pack("!HH", draw(st.sampled_from(TPIDS)), 5)
                    for _ in range(draw(st.sampled_from([0, 0, 1, 2, 3, 8, 9]))))
    frame = b"\x02" * 12 + tags + struct.pack("!H", ethertype) + ip
    if draw(st.booleans()):
        frame = frame[:draw(st.integers(0, len(frame)))]
    return frame


def _order_flips():
    """TCP and UDP frames between ends whose order flips with the byte order: the
    addresses 1.0.0.2 and 2.0.0.1, or one address and the ports 0x0102 and 0x0201,
    each way."""
    out = []
    for make in (tcp4, udp4):
        for a, b, pa, pb in (("1.0.0.2", "2.0.0.1", 80, 80),
                             ("1.0.0.2", "2.0.0.1", 0x0102, 0x0201),
                             ("198.18.0.1", "198.18.0.1", 0x0102, 0x0201)):
            out += [ether(make(a, b, pa, pb, b"x")), ether(make(b, a, pb, pa, b"x"))]
    return out


@settings(max_examples=3000, deadline=None)
@given(frame=frames(), n=st.integers(1, 8), cut=st.sampled_from([0, 0, 1, 30, 2000]))
@example(frame=_order_flips()[2], n=5, cut=0)
@example(frame=_order_flips()[9], n=5, cut=0)
def test_fast_walk_agrees_with_the_full_parse(frame, n, cut):
    # cut: bytes the capture left out (a snaplen); with none, an IP length past the
    # frame is a lie (bad_ip_len)
    fast, full, walk_hash, table_hash = rss_owners(frame, n, len(frame) + cut)
    assert 0 <= full < n
    assert fast in (-1, full)
    # the hash the walk hands the flow table is the table's own for that frame (one
    # it does not track, a TCP/UDP header cut before its ports, has no use for it)
    assert walk_hash is None or table_hash is None or walk_hash == table_hash


@settings(max_examples=1000, deadline=None)
@given(frame=st.binary(max_size=120), n=st.integers(1, 8))
@example(frame=b"\x02" * 12 + b"\x08\x00" + b"\x45" + b"\0" * 19, n=3)
def test_fast_walk_agrees_on_any_bytes(frame, n):
    fast, full, walk_hash, table_hash = rss_owners(frame, n)
    assert fast in (-1, full)
    assert walk_hash is None or table_hash is None or walk_hash == table_hash


def dpkt_frames():
    """Frames built by dpkt: the common cases the walk must answer itself, and the
    ones it must leave to the parser."""
    def eth(ip, tags=()):
        e = dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, data=ip,
                                   type=0x0800 if isinstance(ip, dpkt.ip.IP) else 0x86DD)
        raw = bytes(e)
        for tpid in reversed(tags):
            raw = raw[:12] + struct.pack("!HH", tpid, 9) + raw[12:]
        return raw

    fast, slow = [], []
    for i in range(64):
        s, d = V4[i % 3], V4[(i // 3) % 3]
        tcp = dpkt.tcp.TCP(sport=1000 + i, dport=80, flags=dpkt.tcp.TH_SYN)
        udp = dpkt.udp.UDP(sport=53, dport=2000 + i, data=b"q")
        udp.ulen = 9
        fast.append(eth(dpkt.ip.IP(src=s, dst=d, p=6, data=tcp), tags=[0x8100] * (i % 3)))
        fast.append(eth(dpkt.ip.IP(src=s, dst=d, p=17, data=udp)))
        fast.append(eth(dpkt.ip.IP(src=s, dst=d, p=6, mf=1, offset=3, data=b"x" * 16)))
        fast.append(eth(dpkt.ip6.IP6(src=V6[i % 3], dst=V6[(i + 1) % 3], nxt=6, hlim=64,
                                     data=tcp, plen=20)))
        slow.append(eth(dpkt.ip.IP(src=s, dst=d, p=6, hl=6, opts=b"\x01\x01\x01\x00",
                                    data=tcp)))
        # IPv6 with a hop-by-hop header, built by hand (dpkt re-serialises its own)
        body = struct.pack("!BB", 6, 0) + b"\0" * 6 + bytes(tcp)
        ip6 = struct.pack("!IHBB16s16s", 6 << 28, len(body), 0, 64, V6[i % 3],
                          V6[(i + 2) % 3]) + body
        slow.append(b"\x04" * 6 + b"\x02" * 6 + b"\x86\xdd" + ip6)
        # IPv4 with an Authentication Header before the TCP or UDP header
        ah = bytes([6 if i % 2 else 17, 4, 0, 0]) + b"\0" * 20
        inner = tcp if i % 2 else udp
        slow.append(eth(dpkt.ip.IP(src=s, dst=d, p=51, data=ah + bytes(inner))))
    return fast, slow


def test_dpkt_frames_common_cases_are_decided_without_the_parser():
    fast, slow = dpkt_frames()
    for n in (2, 3, 4):
        for f in fast:
            quick, full, walk_hash, table_hash = rss_owners(f, n)
            assert quick == full, f.hex()
            # handed to the table except for fragments (hashed by addresses alone)
            assert walk_hash == (None if f[20:22] == b"\x20\x03" else table_hash), f.hex()
        for f in slow:
            quick, full, walk_hash, table_hash = rss_owners(f, n)
            assert quick == -1 and walk_hash is None, f.hex()
            assert 0 <= full < n
    # ends that sort one way in network byte order and the other in a host's: the
    # walk orders them as the flow table does, and both directions meet
    flips = _order_flips()
    for f in flips:
        quick, full, walk_hash, table_hash = rss_owners(f, 4)
        assert quick == full and walk_hash == table_hash, f.hex()
    for there, back in zip(flips[::2], flips[1::2], strict=True):
        assert rss_owners(there, 4) == rss_owners(back, 4)
    # both directions of a flow, and all pieces of a datagram, meet in one stack
    a = ether(tcp4("198.18.0.1", "198.19.0.2", 40000, 443))
    b = ether(tcp4("198.19.0.2", "198.18.0.1", 443, 40000))
    assert rss_owners(a, 4) == rss_owners(b, 4)
    # IPv4 in AH: its flow is the TCP connection inside (the ports after AH), which
    # its packets without AH share
    plain = dpkt.ip.IP(ether(tcp4("198.18.0.1", "198.19.0.2", 40000, 443))[14:])
    inner = bytes(plain.data)
    plain.p, plain.len, plain.sum = 51, 0, 0
    plain.data = bytes([6, 1, 0, 0]) + b"\0" * 8 + inner
    in_ah = b"\x04" * 6 + b"\x02" * 6 + b"\x08\x00" + bytes(plain)
    quick, full, walk_hash, table_hash = rss_owners(in_ah, 4)
    assert (quick, walk_hash) == (-1, None)
    assert (full, table_hash) == (rss_owners(b, 4)[1], rss_owners(b, 4)[3])
    c = ether(tcp6("2001:db8::1", "2001:db8::2", 1, 2))
    d = ether(tcp6("2001:db8::2", "2001:db8::1", 2, 1))
    assert rss_owners(c, 4) == rss_owners(d, 4)


def test_a_deep_vlan_stack_keeps_a_flow_on_one_stack():
    # Behind three tags or more a frame was not IP to the walk and the parser alike:
    # consistent, but its flow untracked.  Up to the bound both read the IP header.
    def tagged(frame, depth):
        return frame[:12] + struct.pack("!HH", 0x8100, 7) * depth + frame[12:]

    for depth in (3, 8):
        there = rss_owners(tagged(ether(tcp4("198.18.0.1", "198.19.0.2", 40000, 443)),
                                  depth), 4)
        back = rss_owners(tagged(ether(tcp4("198.19.0.2", "198.18.0.1", 443, 40000)),
                                 depth), 4)
        assert there == back and there[0] == there[1], depth
        assert there[2] is not None and there[2] == there[3], depth


def test_vlans_keep_a_flow_on_one_stack_and_out_of_the_hash():
    # The VLAN ids are in the flow key but not in its hash: the walk needs none.
    # Both directions of a flow in one VLAN, the same 5-tuple in other VLANs (QinQ
    # too), and a connection routed between two (client side 10, server side 20)
    # all get the walk's answer, the parser's, and one hash the table takes as is.
    there = tcp4("198.18.0.1", "198.19.0.2", 40000, 443)
    back = tcp4("198.19.0.2", "198.18.0.1", 443, 40000)
    owners = {rss_owners(ether(f, vlans=v), 7)
              for f in (there, back) for v in [(), (10,), (20,), (100, 10), (200, 10)]}
    assert len(owners) == 1
    ((fast, full, walk_hash, table_hash),) = owners
    assert fast == full and walk_hash == table_hash is not None
    assert (rss_owners(ether(there, vlans=(10,)), 7)
            == rss_owners(ether(back, vlans=(20,)), 7))


def test_parallel_stacks_keep_each_vlan_s_flow_whole(tmp_path):
    # Two stacks over connections of one 5-tuple in VLANs 10 and 20: each is one
    # flow, both its directions on one stack, two flows in all (as one stack sees)
    from mbx.examples.capture import tcp_connection, write_pcap
    from mbx.nfs.l2fwd import L2Fwd
    from mbx.runtime import App, run_parallel

    frames = []
    for vid in (10, 20):
        for port in range(40000, 40016):
            frames += tcp_connection(("198.18.0.1", port), ("198.19.0.1", 80),
                                     ("198.19.0.1", 80), b"GET /", b"page", 1.0 + vid,
                                     port, 7 * port, vlans=(vid,))
    cap = str(tmp_path / "vlans.pcap")
    write_pcap(cap, sorted(frames, key=lambda f: f[0]))
    inp = mbx.ports.open_input("pcap:" + cap)
    try:
        single = App([L2Fwd()], stack="tcp").run(inp)
    finally:
        inp.close()
    merged, parts = run_parallel(lambda: [L2Fwd()], "pcap:" + cap, None, stacks=2,
                                 stack="tcp")
    # 16 connections in each VLAN, each one flow: a direction on a stack of its
    # own would make a flow there too (more than 32), one flow for both VLANs 16
    assert single["flows"]["created"] == merged["flows"]["created"] == 32
    assert all(p["flows"]["created"] for p in parts)
    assert merged["tcp"]["connections"] == single["tcp"]["connections"] == 32


def mixed_frames():
    fast, slow = dpkt_frames()
    extra = [ether(b"\x00" * 28, ethertype=0x0806),           # ARP: stack 0's
             ether(udp4("198.18.5.5", "198.19.5.5", 9, 9))[:30],  # cut short
             ether(tcp4("198.18.1.1", "198.19.1.1", 7, 8), vlans=(3, 4))]
    out = []
    for i in range(max(len(fast), len(slow))):
        out += fast[i:i + 1] + slow[i:i + 1]
    return out + extra


def is_fragment(frame):
    return "fragment" in parse(frame)["flag_names"]


def delivered(frames, k, n):
    """The frames an RSS reader hands stack k of n: its own, and every fragment
    (only the rebuilt datagram names its flow, so every stack rebuilds it)."""
    return [f for f in frames if rss_owners(f, n)[1] == k or is_fragment(f)]


def write(path, frames, linktype=1):
    with open(path, "wb") as fh:
        w = dpkt.pcap.Writer(fh, linktype=linktype)
        for i, f in enumerate(frames):
            w.writepkt(f, ts=1.0 + i * 1e-3)


def read_all(port):
    got = []
    b = Batch(64)
    while True:
        b.reset()
        if port.receive(b) < 0:
            return got
        got += [b.frame(i) for i in range(len(b))]


def test_pcap_reader_delivers_exactly_its_share(tmp_path):
    frames = mixed_frames()
    ip_only = [f[14:] for f in frames if f[12:14] == b"\x08\x00"]
    for name, written, linktype, as_ether in (
            ("eth.pcap", frames, 1, lambda f: f),
            ("raw.pcap", ip_only, 101, lambda f: b"\0" * 12 + b"\x08\x00" + f)):
        path = str(tmp_path / name)
        write(path, written, linktype)
        expect_all = [as_ether(f) for f in written]
        fragments = [f for f in expect_all if is_fragment(f)]
        assert fragments
        n = 3
        shares = []
        for k in range(n):
            port = PcapReader(path)
            assert port.rss_share(k, n) is True
            got = read_all(port)
            want = delivered(expect_all, k, n)
            assert got == want
            # the frames it counts are its own; fragments count where their
            # addresses say, once over all the processes
            own = [f for f in expect_all if rss_owners(f, n)[1] == k]
            assert port.rx_pkts == len(own)
            assert port.rss_skipped == len(expect_all) - len(own)
            shares.append(len(got) - len(fragments))
            port.close()
        assert sum(shares) == len(expect_all) - len(fragments) and min(shares) > 0


def test_flow_table_takes_the_hash_the_reader_found(tmp_path):
    # Both directions of 300 flows into tables of 32 flows (64 buckets: long chains,
    # and evictions), once from the RSS reader (which hands each frame's hash to the
    # table) and once from the same frames appended to batches (the table hashes
    # them): the same flows end with the same counts, in the same order.
    rng = random.Random(5)
    ends = [(f"198.18.{rng.randrange(1, 250)}.{rng.randrange(1, 250)}",
             f"198.19.{rng.randrange(1, 250)}.{rng.randrange(1, 250)}",
             rng.randrange(1024, 65000), rng.choice([80, 53])) for _ in range(300)]
    frames = []
    for _ in range(3000):
        src, dst, sp, dp = ends[rng.randrange(len(ends))]
        if rng.random() < 0.5:
            src, dst, sp, dp = dst, src, dp, sp
        frames.append(ether((udp4 if 53 in (sp, dp) else tcp4)(src, dst, sp, dp, b"x")))
    path = str(tmp_path / "flows.pcap")
    write(path, frames)
    live = _live_buses[0]

    def ended(k, n, port=None, batch=None):
        got = []
        nf = mbx.NF("ends")
        # (timestamps apart: appended frames carry none)
        nf.sub(mbx.FLOW_END, lambda ev: got.append(
            {k: v for k, v in ev.fields().items() if not k.endswith("_ns")}))
        # closed here: the NF and the bus point at each other, so a bus left open
        # lives until a garbage collection and, until then, refuses new event types
        # to every later test (a bus is running)
        bus = EventBus([nf], msg_capacity=4096)
        try:
            stack = NetworkLayer(bus, flow_capacity=32, rss=(k, n))
            if port is not None:
                stack.run(port)
            else:
                stack.process(batch)
                stack.shutdown()
            assert stack.counters()["flows"]["evicted"] > 0
        finally:
            bus.close()
        assert nf._bus is None
        return got

    for k in range(2):
        port = PcapReader(path)
        port.rss_share(k, 2)
        batch = Batch(64)
        assert port.receive(batch) > 0
        for i in range(len(batch)):
            h = batch.rss_hash(i)
            *_, table = rss_owners(batch.frame(i), 2)
            assert h is not None and h == table
        port.rewind()
        with_walk = ended(k, 2, port=port)
        port.close()
        mine = [f for f in frames if rss_owners(f, 2)[1] == k]
        plain = Batch(len(mine))
        for f in mine:
            assert plain.append(f)
        assert plain.rss_hash(0) is None
        assert with_walk == ended(0, 1, batch=plain) and len(with_walk) > 32
    assert _live_buses[0] == live           # no bus left running behind the test


def test_rss_reader_delivers_its_frames_before_the_damage_then_fails(tmp_path):
    # The reader decides records ahead of delivering them: damage found ahead must
    # still come after every frame of this share that precedes it, as without RSS.
    frames = mixed_frames()[:40]
    path = tmp_path / "damaged.pcap"
    write(str(path), frames)
    raw = bytearray(path.read_bytes())
    pos = 24
    for f in frames[:30]:                   # record 30's captured length: absurd
        pos += 16 + len(f)
    raw[pos + 8:pos + 12] = struct.pack("<I", 0x7FFFFFFF)
    path.write_bytes(bytes(raw))
    for k in range(2):
        port = PcapReader(str(path))
        port.rss_share(k, 2)
        got = []
        b = Batch(4)
        with pytest.raises(CaptureFormatError, match=f"byte offset {pos}"):
            while True:
                b.reset()
                if port.receive(b) < 0:
                    break
                got += [b.frame(i) for i in range(len(b))]
        assert got == delivered(frames[:30], k, 2)
        port.close()


def test_rss_share_is_not_changed_under_frames_decided_for_another(tmp_path):
    path = str(tmp_path / "x.pcap")
    frames = mixed_frames()
    write(path, frames)
    port = PcapReader(path)
    port.rss_share(0, 2)
    b = Batch(1)
    assert port.receive(b) == 1             # the rest of its run of records waits
    with pytest.raises(PortError, match="rss_share.1, 2. while frames decided"):
        port.rss_share(1, 2)
    port.rewind()
    port.rss_share(1, 2)
    assert read_all(port) == delivered(frames, 1, 2)
    port.close()


def test_rss_share_rejects_a_bad_share(tmp_path):
    path = str(tmp_path / "x.pcap")
    write(path, mixed_frames()[:3])
    port = PcapReader(path)
    try:
        port.rss_share(2, 2)
    except ValueError as e:
        assert "pcap:" in str(e) and "2 of 2" in str(e)
    else:
        raise AssertionError("rss_share(2, 2) was accepted")
    finally:
        port.close()


def test_stack_keeps_its_share_from_an_input_that_does_not_filter():
    # A batch handed to the stack directly (as a DPDK or AF_PACKET port would
    # deliver it): the stack decides each packet itself.
    frames = mixed_frames()
    n = 3
    seen_total = 0
    for k in range(n):
        seen = []
        nf = mbx.NF("recorder")
        nf.sub(mbx.PKT, lambda ev, seen=seen: seen.append(1))
        bus = EventBus([nf], msg_capacity=4096)
        stack = NetworkLayer(bus, rss=(k, n))
        batch = Batch(len(frames))
        for f in frames:
            assert batch.append(f)
        stack.process(batch)
        want = sum(1 for f in frames if rss_owners(f, n)[1] == k)
        c = stack.counters()
        assert c["packets"] == want
        assert len(seen) == want - c["fragments_held"]    # held fragments make no PKT
        assert c["other_stacks"] == len(frames) - want
        seen_total += c["packets"]
        bus.close()
    assert seen_total == len(frames)


def test_stack_gives_a_rebuilt_datagram_to_its_flows_stack():
    # Batches handed to the stacks directly: every stack rebuilds every fragmented
    # datagram, the stack its flow hashes to delivers it, and each fragment counts
    # in one stack only.
    frames, fragmented = fragmented_flows()
    n = 3
    flows_per_stack, packets, completed = [], 0, 0
    for k in range(n):
        flows = {}
        nf = mbx.NF("recorder")

        def on_pkt(ev, flows=flows):
            key = tuple(sorted([(ev.src_ip, ev.sport), (ev.dst_ip, ev.dport)]))
            flows[key] = flows.get(key, 0) + 1
        nf.sub(mbx.PKT, on_pkt)
        bus = EventBus([nf], msg_capacity=4096)
        stack = NetworkLayer(bus, rss=(k, n))
        for i in range(0, len(frames), 64):
            batch = Batch(64)
            for f in frames[i:i + 64]:
                assert batch.append(f)
            stack.process(batch)
        c = stack.counters()
        packets += c["packets"]
        completed += c["fragments"]["completed"]
        assert c["packets"] + c["other_stacks"] == len(frames)
        flows_per_stack.append(flows)
        bus.close()
    keys = [key for flows in flows_per_stack for key in flows]
    assert len(keys) == len(set(keys)) == 120, "a flow was seen by two stacks"
    assert all(count == 6 for flows in flows_per_stack for count in flows.values())
    assert packets == len(frames) and completed == fragmented


def _fanout_member_hash(frame):
    """What mbx's fanout program (fanout_mode="flow", mbx._afpacket._FLOW_HASH) returns
    for an Ethernet ``frame`` received (its network header after the one tag the
    kernel strips): a small classic BPF interpreter for the instructions it uses, an
    out-of-range load ending it with 0, as the kernel's does."""
    from mbx._afpacket import _FLOW_HASH

    et = struct.unpack("!H", frame[12:14])[0]
    net = frame[14:]
    if et in (0x8100, 0x88A8):
        et, net = struct.unpack("!H", frame[16:18])[0], frame[18:]
    prog = [struct.unpack("=HBBI", _FLOW_HASH[i:i + 8]) for i in range(0, len(_FLOW_HASH), 8)]
    a = x = pc = 0
    mem = [0] * 16
    net_off, ad_protocol = (-0x100000) & 0xFFFFFFFF, (-0x1000) & 0xFFFFFFFF
    sizes = {0x00: 4, 0x08: 2, 0x10: 1}
    while True:
        code, jt, jf, k = prog[pc]
        pc += 1
        cls, size, mode = code & 0x07, code & 0x18, code & 0xE0
        if cls == 0x00 and mode in (0x20, 0x40):        # BPF_LD ABS / IND
            at = k + (x if mode == 0x40 else 0)
            if k == ad_protocol:
                a = et
                continue
            at -= net_off
            if at + sizes[size] > len(net):
                return 0
            a = int.from_bytes(net[at:at + sizes[size]], "big")
        elif code == 0x60:                              # BPF_LD | BPF_MEM
            a = mem[k]
        elif code == 0x61:                              # BPF_LDX | BPF_MEM
            x = mem[k]
        elif code == 0x02:                              # BPF_ST
            mem[k] = a
        elif code == 0x07:                              # BPF_MISC | BPF_TAX
            x = a
        elif cls == 0x04:                               # BPF_ALU
            op, src = code & 0xF0, x if code & 0x08 else k
            a = {0x50: a & src, 0x60: a << src, 0x70: a >> src, 0xA0: a ^ src,
                 0x20: a * src}[op] & 0xFFFFFFFF
        elif code == 0x05:                              # BPF_JA
            pc += k
        elif cls == 0x05:                               # BPF_JMP, against k
            op = code & 0xF0
            taken = {0x10: a == k, 0x30: a >= k, 0x40: bool(a & k)}[op]
            pc += jt if taken else jf
        elif cls == 0x06:                               # BPF_RET
            return a if code & 0x18 == 0x10 else k
        else:
            raise AssertionError(f"instruction {code:#x} not interpreted")


def sctp4(src, dst, sport, dport):
    body = struct.pack("!HHII", sport, dport, 1234, 0) + b"\0\0\0\x08dddd"
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(body), 7, 0, 64, 132, 0,
                      bytes(map(int, src.split("."))), bytes(map(int, dst.split("."))))
    return ether(hdr + body)


def test_sctp_associations_are_flows_of_their_own_in_every_split():
    # The fanout program hashed SCTP ports, the flow key had none: 8 associations
    # between two hosts were one flow for one stack, and two stacks on a live
    # AF_PACKET input each held some of them under that one key.  The key, the RSS
    # walk and the fanout program now all take SCTP's ports.
    keys = {}
    for i in range(8):
        ends = [("198.18.90.1", 5000 + i), ("198.18.90.2", 6000)]
        for (src, sp), (dst, dp) in (ends, ends[::-1]):
            frame = sctp4(src, dst, sp, dp)
            f = parse(frame)
            assert f["status"] == "ok" and (f["sport"], f["dport"]) == (sp, dp)
            fast, full, walk_hash, table_hash = rss_owners(frame, 4)
            assert fast == full and walk_hash == table_hash is not None
            keys.setdefault(table_hash, set()).add(_fanout_member_hash(frame))
    assert len(keys) == 8                   # eight flows, each both ways
    # each flow's packets, both ways, to one fanout member; the flows spread
    assert all(len(members) == 1 for members in keys.values())
    assert len(set().union(*keys.values())) == 8


def test_a_header_length_below_20_is_hashed_by_its_addresses_only():
    # An IPv4 header length below 20 (bad_ihl) had the fanout program read "ports"
    # from inside the IP header (its length, its TOS): one flow's frames went to
    # several members.  The parser keys them without ports; the program now hashes
    # them by their addresses, as it does a fragment.
    members, keys = set(), set()
    for ihl in (0, 1, 4):
        for size in (0, 9, 40, 100):
            for tos in (0, 0x10):
                body = struct.pack("!HHIIBBHHH", 1000 + size, 80, 1, 2, 0x50, 0x18, 100,
                                   0, 0) + b"x" * size
                hdr = struct.pack("!BBHHHBBH4s4s", 0x40 | ihl, tos, 20 + len(body), 7, 0,
                                  64, 6, 0, b"\xc6\x12\x00\x01", b"\xc6\x12\x00\x02")
                frame = ether(hdr + body)
                assert parse(frame)["status"] == "bad_ihl"
                keys.add(rss_owners(frame, 4)[1])
                members.add(_fanout_member_hash(frame))
    assert len(keys) == 1
    assert len(members) == 1, members
