"""FlowTable against a plain-Python model, plus symmetry, hash quality and size."""

import ipaddress
import random
from collections import Counter, OrderedDict

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from mbx._flow import FlowTable, bench_lookups, flow_hash
from mbx._parse import status_names

# Parse statuses (mbx/_packet.pxd) used below, by name (TRUNC_L4 was written as 11,
# which is BAD_TCP_OFF).
PARSE_TRUNC_L3 = status_names().index("trunc_l3")
PARSE_TRUNC_L4 = status_names().index("trunc_l4")

# A small pool so that random packets hit the same flows often, in both directions.
POOL = {
    4: [("10.0.0.1", 1000), ("10.0.0.1", 80), ("10.0.0.2", 80), ("192.168.1.9", 53)],
    6: [("2001:db8::1", 443), ("2001:db8::2", 5000), ("::1", 0)],
}
PROTOS = [6, 17]


def side_of(src, sport, dst, dport):
    """0 when the packet's source is the canonical endpoint a (the smaller one)."""
    s = (ipaddress.ip_address(src).packed, sport)
    d = (ipaddress.ip_address(dst).packed, dport)
    return 1 if s > d else 0


def canonical(src, sport, dst, dport, proto):
    s = (ipaddress.ip_address(src).packed, sport)
    d = (ipaddress.ip_address(dst).packed, dport)
    return (min(s, d), max(s, d), proto)


class FlowTableModel(RuleBasedStateMachine):
    @initialize(
        capacity=st.integers(1, 6),
        policy=st.sampled_from(["evict", "refuse"]),
        ended_cap=st.sampled_from([1, 3, 320]),
        timeout_ns=st.sampled_from([0, 100, 300]),
    )
    def setup(self, capacity, policy, ended_cap, timeout_ns):
        self.table = FlowTable(capacity=capacity, idle_timeout=timeout_ns / 1e9,
                               policy=policy, ended_capacity=ended_cap)
        assert self.table.idle_timeout_ns == timeout_ns
        self.capacity = capacity
        self.policy = policy
        self.ended_cap = ended_cap
        self.timeout = timeout_ns
        self.now = 1_000
        # canonical key -> record; order of the OrderedDict is the LRU order.
        self.flows = OrderedDict()
        self.slot_gen = {}
        self.ended = []
        self.counters = Counter(lookups=0, created=0, expired=0, evicted=0, closed=0,
                                shutdown=0, refused=0)

    def _end(self, key, reason):
        rec = self.flows.pop(key)
        ended = dict(rec, status="expired", end_reason=reason)
        self.ended.append(ended)
        if reason == "idle":
            self.counters["expired"] += 1
        elif reason == "evicted":
            self.counters["evicted"] += 1
        else:
            self.counters[reason] += 1          # closed, shutdown

    @rule(
        family=st.sampled_from([4, 6]),
        i=st.integers(0, 3),
        j=st.integers(0, 3),
        proto=st.sampled_from(PROTOS),
        wirelen=st.integers(40, 1500),
    )
    def packet(self, family, i, j, proto, wirelen):
        pool = POOL[family]
        src, sport = pool[i % len(pool)]
        dst, dport = pool[j % len(pool)]
        slot, gen, d, created = self.table.lookup_tuple(
            src, dst, sport, dport, proto, self.now, wirelen)
        self.counters["lookups"] += 1
        key = canonical(src, sport, dst, dport, proto)
        side = side_of(src, sport, dst, dport)
        if (key in self.flows and self.now - self.flows[key]["last_ns"] > self.timeout
                and len(self.ended) < self.ended_cap):
            # idle past the timeout before this packet: ends, and the packet starts
            # a new flow (expiry runs only after each burst)
            self._end(key, "idle")
        if key not in self.flows:
            if len(self.flows) == self.capacity:
                if self.policy == "evict" and len(self.ended) < self.ended_cap:
                    victim = next(iter(self.flows))
                    self._end(victim, "evicted")
                else:
                    self.counters["refused"] += 1
                    assert (slot, created) == (-1, False)
                    return
            assert created
            assert 0 <= slot < self.capacity
            assert slot not in {r["slot"] for r in self.flows.values()}
            assert gen == self.slot_gen.get(slot, 0) + 1
            self.slot_gen[slot] = gen
            self.counters["created"] += 1
            init = (src, sport, dst, dport)     # the first packet's sender initiates
            self.flows[key] = {
                "slot": slot, "gen": gen, "side": side,
                "src": init[0], "sport": init[1], "dst": init[2], "dport": init[3],
                "proto": proto, "ip_ver": family, "pkts": [0, 0], "bytes": [0, 0],
                "first_ns": self.now, "last_ns": self.now,
            }
        else:
            rec = self.flows[key]
            assert not created
            assert (slot, gen) == (rec["slot"], rec["gen"])
        rec = self.flows[key]
        self.flows.move_to_end(key)
        expect_dir = side ^ rec["side"]
        assert d == expect_dir
        rec["pkts"][d] += 1
        rec["bytes"][d] += wirelen
        rec["last_ns"] = max(rec["last_ns"], self.now)

    # Steps that land exactly on the timeout boundaries as well as past them.
    @rule(dt=st.sampled_from([0, 1, 50, 99, 100, 101, 200, 300, 301, 1000]))
    def advance(self, dt):
        self.now += dt

    @rule()
    def expire(self):
        n = 0
        while self.flows and len(self.ended) < self.ended_cap:
            key = next(iter(self.flows))
            if not self.now - self.flows[key]["last_ns"] > self.timeout:
                break
            self._end(key, "idle")
            n += 1
        assert self.table.expire_py(self.now) == n

    @rule()
    def end_all(self):
        n = 0
        while self.flows and len(self.ended) < self.ended_cap:
            self._end(next(iter(self.flows)), "shutdown")
            n += 1
        assert self.table.end_all_py() == n

    @precondition(lambda self: self.flows)
    @rule(data=st.data())
    def end_one(self, data):
        key = data.draw(st.sampled_from(list(self.flows)))
        slot = self.flows[key]["slot"]
        ok = len(self.ended) < self.ended_cap
        if ok:
            self._end(key, "closed")
        assert self.table.end_flow_py(slot) == ok

    @rule(slot=st.integers(0, 9))
    def end_free_slot(self, slot):
        if slot in {r["slot"] for r in self.flows.values()}:
            return
        assert self.table.end_flow_py(slot) is False

    @rule()
    def take_ended(self):
        got = self.table.take_ended()
        assert len(got) == len(self.ended)
        for g, m in zip(got, self.ended, strict=True):
            self._check_record(g, m)
            assert g["status"] == "expired"
            assert g["end_reason"] == m["end_reason"]
        self.ended = []

    def _check_record(self, got, rec):
        for field in ("slot", "gen", "src", "sport", "dst", "dport", "proto", "ip_ver",
                      "first_ns", "last_ns"):
            assert got[field] == rec[field], field
        assert got["pkts"] == tuple(rec["pkts"])
        assert got["bytes"] == tuple(rec["bytes"])

    @invariant()
    def agrees(self):
        if not hasattr(self, "table"):
            return
        t = self.table
        assert len(t) == len(self.flows)
        assert t.counters == dict(self.counters, active=len(self.flows))
        c = t.counters        # every flow created is active or ended for one reason
        assert c["created"] == c["active"] + c["expired"] + c["evicted"] + c["closed"] \
            + c["shutdown"]
        assert t.n_ended == len(self.ended)
        live = {}
        for rec in self.flows.values():
            got = t.flow(rec["slot"])
            assert got is not None
            assert got["status"] == "active"
            self._check_record(got, rec)
            live[rec["slot"]] = rec
        for slot in range(self.capacity + 2):
            if slot not in live:
                assert t.flow(slot) is None


TestFlowTableModel = FlowTableModel.TestCase
TestFlowTableModel.settings = settings(max_examples=300, stateful_step_count=60,
                                       deadline=None)


# -------------------------------------------------------------------- symmetry

ipv4 = st.integers(0, 2**32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2**128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
port = st.integers(0, 65535)


@st.composite
def five_tuples(draw):
    addr = draw(st.sampled_from([ipv4, ipv6]))
    return (draw(addr), draw(addr), draw(port), draw(port), draw(st.integers(0, 255)))


@given(st.lists(five_tuples(), min_size=1, max_size=20))
def test_reverse_direction_same_flow(tuples):
    t = FlowTable(capacity=64)
    for ts, (src, dst, sport, dport, proto) in enumerate(tuples):
        assert flow_hash(src, dst, sport, dport, proto) == \
            flow_hash(dst, src, dport, sport, proto)
        slot, gen, d, _ = t.lookup_tuple(src, dst, sport, dport, proto, ts)
        rslot, rgen, rd, rcreated = t.lookup_tuple(dst, src, dport, sport, proto, ts)
        assert (rslot, rgen, rcreated) == (slot, gen, False)
        if (src, sport) == (dst, dport):
            assert rd == d
        else:
            assert rd == 1 - d
        assert t.flow(slot)["hash"] == flow_hash(src, dst, sport, dport, proto)


def test_initiator_orientation_and_counts():
    t = FlowTable(capacity=4)
    # The initiator is the larger endpoint here, so the key stores it as b.
    assert t.lookup_tuple("10.0.0.9", "10.0.0.1", 5555, 80, 6, 10, 100) == (0, 1, 0, True)
    assert t.lookup_tuple("10.0.0.1", "10.0.0.9", 80, 5555, 6, 5, 1500) == (0, 1, 1, False)
    f = t.flow(0)
    assert (f["src"], f["sport"], f["dst"], f["dport"]) == ("10.0.0.9", 5555, "10.0.0.1", 80)
    assert f["pkts"] == (1, 1)
    assert f["bytes"] == (100, 1500)
    # last_ns never goes backwards on a late timestamp.
    assert (f["first_ns"], f["last_ns"]) == (10, 10)
    # Different protocol, different flow.
    assert t.lookup_tuple("10.0.0.9", "10.0.0.1", 5555, 80, 17, 10)[0] == 1


SYN, ACK = 0x02, 0x10


def test_a_tcp_flow_first_seen_at_its_syn_ack_is_named_by_its_client():
    t = FlowTable(capacity=4)
    # The SYN went by unseen: the SYN+ACK's receiver opened the flow.
    assert t.lookup_tuple("10.0.0.1", "10.0.0.9", 80, 5555, 6, 10,
                          tcp_flags=SYN | ACK) == (0, 1, 1, True)
    assert t.lookup_tuple("10.0.0.9", "10.0.0.1", 5555, 80, 6, 20, tcp_flags=ACK)[2] == 0
    f = t.flow(0)
    assert (f["src"], f["sport"], f["dst"], f["dport"]) == ("10.0.0.9", 5555, "10.0.0.1", 80)
    assert f["pkts"] == (1, 1)
    # Only a TCP SYN+ACK flips: a first pure SYN, a first ACK, a UDP packet with
    # those bits in the byte do not.
    for slot, (proto, flags) in enumerate(((6, SYN), (6, ACK), (17, SYN | ACK)), 1):
        assert t.lookup_tuple("10.0.0.1", "10.0.0.9", 80 + slot, 5555, proto, 30,
                              tcp_flags=flags) == (slot, 1, 0, True)


def test_unparsed_packets_get_no_flow_uncounted():
    t = FlowTable(capacity=4)
    assert t.lookup_tuple("10.0.0.1", "10.0.0.2", 1, 2, 6, 0, status=PARSE_TRUNC_L3)[0] == -1
    assert t.counters["lookups"] == 0
    # Addresses were read before the transport header turned out short: tracked (an
    # ICMP flow's key has no ports; a TCP/UDP header cut before its ports is not
    # tracked, see the next test; lookup_tuple's packet has no captured bytes).
    assert t.lookup_tuple("10.0.0.1", "10.0.0.2", 0, 0, 1, 0, status=PARSE_TRUNC_L4)[0] == 0
    assert t.counters["lookups"] == 1
    assert t.lookup_tuple("10.0.0.1", "10.0.0.2", 0, 0, 6, 0, status=PARSE_TRUNC_L4)[0] == -1
    assert t.counters["lookups"] == 1


def _flow_starts(path, records, snaplen=65535):
    """Run the stack over ``records`` ((captured bytes, length on the wire), written
    to ``path`` as a pcap): its counters, and each FLOW/START's (client, server) port."""
    import struct

    import mbx
    from mbx.ports import open_input

    with open(path, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snaplen, 1))
        for i, (frame, wirelen) in enumerate(records):
            fh.write(struct.pack("<IIII", 1_700_000_000, i, len(frame), wirelen) + frame)
    ports = []
    nf = mbx.NF("starts")
    nf.sub(mbx.FLOW_START, lambda ev: ports.append((ev.cli_port, ev.srv_port)))
    inp = open_input(f"pcap:{path}")
    try:
        return mbx.App([nf]).run(inp), ports
    finally:
        inp.close()


def test_connections_captured_cut_short_keep_their_own_flows(tmp_path):
    """TCP and UDP headers cut by a snaplen after their ports: the parser left the
    ports 0, so all such connections between two hosts were one 0:0 flow.  A header
    cut before its ports end is tracked by no flow."""

    from mbx.examples.capture import ether, tcp4, udp4

    cut = []                    # (captured bytes, length on the wire)
    for sport in (40001, 40002, 40003):
        f = ether(tcp4("198.18.0.1", "198.18.0.2", sport, 80))
        cut.append((f[:38], len(f)))                # the ports and the sequence number
    for sport in (5001, 5002):
        f = ether(udp4("198.18.0.1", "198.18.0.2", sport, 53, b"q" * 20))
        cut.append((f[:38], len(f)))                # the ports, not the length
    for sport in (7001, 7002):
        f = ether(tcp4("198.18.0.1", "198.18.0.2", sport, 80))
        cut.append((f[:37], len(f)))                # 3 bytes of the header
    c, ports = _flow_starts(tmp_path / "snap.pcap", cut, snaplen=38)
    assert c["parse"] == {"trunc_l4": 7} and c["packets"] == 7
    assert sorted(ports) == [(5001, 53), (5002, 53), (40001, 80), (40002, 80), (40003, 80)]
    assert c["flows"]["created"] == 5


def test_malformed_tcp_whose_ports_were_not_read_is_in_no_flow(tmp_path):
    """Beyond TRUNC_L4: a header cut before its ports under an IP length that lies
    (bad_ip_len), and a TCP packet whose bad IP option stopped the parser before the
    transport, have ports 0; tracked, every such connection between two hosts was
    one 0:0 flow.  A lying length with the ports captured keeps its own flow."""
    import struct

    from mbx.examples.capture import ether, tcp4

    records = []                # (captured bytes, length on the wire)
    for sport in (7001, 7002):
        f = ether(tcp4("198.18.0.1", "198.18.0.2", sport, 80))
        records.append((f[:37], 37))                # 3 bytes of TCP, IP says 40
    f = ether(tcp4("198.18.0.1", "198.18.0.2", 7003, 80))
    records.append((f[:38], 38))                    # the ports, IP says 40 more
    for sport in (7004, 7005):
        f = bytearray(ether(tcp4("198.18.0.1", "198.18.0.2", sport, 80)))
        ip = f[14:34]
        ip[0] = 0x46                                # a 24-byte header: one option
        struct.pack_into("!H", ip, 2, struct.unpack_from("!H", ip, 2)[0] + 4)
        bad = bytes(f[:14] + ip + b"\x07\x01\x00\x00" + f[34:])   # option length 1
        records.append((bad, len(bad)))
    c, ports = _flow_starts(tmp_path / "lies.pcap", records)
    assert c["parse"] == {"bad_ip_len": 3, "bad_ip_option": 2} and c["packets"] == 5
    assert ports == [(7003, 80)] and c["flows"]["created"] == 1


def test_a_packet_whose_parse_stopped_before_its_transport_is_in_no_flow(tmp_path):
    """An IPv6 extension header or an IPv4 AH past the datagram stops the parser
    before the transport: l4_proto is left the extension header's number (0, 44, 51)
    and the ports 0.  Tracked, every such connection between two hosts was one flow
    of that made-up protocol."""
    import struct

    from mbx.examples.capture import _ip6, ether, ipv4, tcp4, tcp6

    records = []
    for sport in (7001, 7002, 7003):
        tcp = tcp6("2001:db8::1", "2001:db8::2", sport, 80)[40:]
        for ext in (bytes([6, 30]) + b"\0" * 6,        # Hop-by-Hop: 248 bytes
                    bytes([6, 0])):                     # a fragment header cut short
            nh = 0 if len(ext) == 8 else 44
            body = ext + tcp if nh == 0 else ext
            f = ether(struct.pack("!IHBB16s16s", 6 << 28, len(body), nh, 64,
                                  _ip6("2001:db8::1"), _ip6("2001:db8::2")) + body,
                      0x86DD)
            records.append((f, len(f)))
        tcp = tcp4("198.18.0.1", "198.18.0.2", sport, 80)[20:]
        f = ether(ipv4("198.18.0.1", "198.18.0.2", 51, bytes([6, 60]) + b"\0" * 10 + tcp))
        records.append((f, len(f)))                 # an AH of 248 bytes
    c, ports = _flow_starts(tmp_path / "ext.pcap", records)
    assert c["parse"] == {"bad_ipv6_ext": 6, "bad_ipv4_ah": 3} and c["packets"] == 9
    assert ports == [] and c["flows"]["created"] == 0


def test_eviction_falls_back_to_refusal_when_ended_is_full():
    t = FlowTable(capacity=1, policy="evict", ended_capacity=1)
    assert t.lookup_tuple("10.0.0.1", "10.0.0.2", 1, 2, 6, 0)[0] == 0
    assert t.lookup_tuple("10.0.0.1", "10.0.0.3", 1, 2, 6, 1) == (0, 2, 0, True)
    assert t.lookup_tuple("10.0.0.1", "10.0.0.4", 1, 2, 6, 2)[0] == -1
    assert t.counters["evicted"] == 1 and t.counters["refused"] == 1
    [rec] = t.take_ended()
    assert (rec["dst"], rec["gen"], rec["end_reason"]) == ("10.0.0.2", 1, "evicted")
    assert t.lookup_tuple("10.0.0.1", "10.0.0.4", 1, 2, 6, 3) == (0, 3, 0, True)


def test_end_all_drains_in_rounds():
    t = FlowTable(capacity=100, ended_capacity=30)
    for i in range(100):
        t.lookup_tuple("10.0.0.1", f"10.1.0.{i}", 1, 2, 6, i)
    total = 0
    while n := t.end_all_py():
        assert n <= 30
        ended = t.take_ended()
        assert len(ended) == n and all(r["end_reason"] == "shutdown" for r in ended)
        total += n
    assert total == 100 and len(t) == 0


@pytest.mark.parametrize(
    "kwargs, word",
    [
        ({"capacity": 0}, "capacity"),
        ({"capacity": -5}, "capacity"),
        ({"capacity": 2**40}, "capacity"),
        ({"capacity": 1.5}, "capacity"),
        ({"idle_timeout": -1}, "idle_timeout"),
        ({"idle_timeout": float("nan")}, "idle_timeout"),
        ({"idle_timeout": float("inf")}, "idle_timeout"),
        ({"idle_timeout": "soon"}, "idle_timeout"),
        ({"policy": "drop"}, "policy"),
        ({"ended_capacity": 0}, "ended_capacity"),
    ],
)
def test_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        FlowTable(**kwargs)


def test_lookup_tuple_rejects_mixed_families():
    with pytest.raises(ValueError):
        FlowTable(4).lookup_tuple("10.0.0.1", "::1", 1, 2, 6, 0)


# ---------------------------------------------------------------- hash quality

def _random_tuples(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            src = str(ipaddress.IPv4Address(rng.getrandbits(32)))
            dst = str(ipaddress.IPv4Address(rng.getrandbits(32)))
        else:
            src = str(ipaddress.IPv6Address(rng.getrandbits(128)))
            dst = str(ipaddress.IPv6Address(rng.getrandbits(128)))
        out.append((src, dst, rng.getrandbits(16), rng.getrandbits(16), 6))
    return out


def _structured_tuples(n):
    # Real traffic is anything but random: one client, one server, sequential
    # ephemeral ports; and a /16 of clients to one service port.
    out = [("10.0.0.1", "10.0.0.2", 1024 + i, 80, 6) for i in range(n // 2)]
    out += [(str(ipaddress.IPv4Address(0x0A000000 + i)), "192.168.0.1", 40000, 443, 6)
            for i in range(n - n // 2)]
    return out


@pytest.mark.parametrize("tuples", [_random_tuples(100_000, 7), _structured_tuples(100_000)],
                         ids=["random", "structured"])
def test_hash_quality(tuples):
    t = FlowTable(capacity=len(tuples))
    for ts, tup in enumerate(tuples):
        assert t.lookup_tuple(*tup, ts)[3]
    assert len(t) == len(tuples)
    hist = t.chain_lengths()
    assert len(hist) - 1 <= 8, hist
    hashes = [t.flow(s)["hash"] for s in range(len(tuples))]
    for stacks in (2, 4, 8):
        counts = Counter(h % stacks for h in hashes)
        expect = len(hashes) / stacks
        assert all(abs(c - expect) / expect < 0.03 for c in counts.values()), counts
    # The upper bits too (a dispatcher may shift rather than mask).
    counts = Counter(h >> 30 for h in hashes)
    assert all(abs(c - len(hashes) / 4) / (len(hashes) / 4) < 0.03 for c in counts.values())


def test_bytes_per_flow():
    t = FlowTable(capacity=65536)
    assert t.bytes_per_flow <= 256
    assert t.n_buckets >= 2 * 65536 and t.n_buckets & (t.n_buckets - 1) == 0
    assert t.memory_bytes >= 65536 * t.bytes_per_flow


def test_bench_runs():
    assert bench_lookups(1000, 10_000) > 0
    assert bench_lookups(1000, 10_000, burst=32) > 0


@settings(deadline=None, max_examples=50)
@given(
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 3), st.sampled_from(PROTOS),
                       st.integers(0, 500)), max_size=100),
    st.sampled_from(["evict", "refuse"]),
)
def test_burst_equals_single_lookups(steps, policy):
    # Prefetching must not change results: same sequence, same answers and records.
    single = FlowTable(capacity=3, policy=policy, idle_timeout=1e-7, ended_capacity=5)
    burst = FlowTable(capacity=3, policy=policy, idle_timeout=1e-7, ended_capacity=5)
    pool = POOL[4]
    pkts, now = [], 0
    for i, j, proto, dt in steps:
        now += dt
        pkts.append((pool[i][0], pool[j][0], pool[i][1], pool[j][1], proto, now, 40 + dt))
    assert burst.lookup_burst_py(pkts) == [single.lookup_tuple(*p) for p in pkts]
    assert burst.counters == single.counters
    assert burst.take_ended() == single.take_ended()
    for slot in range(3):
        assert burst.flow(slot) == single.flow(slot)


@pytest.mark.parametrize("gap, ends", [(999, False), (1000, False), (1001, True)])
def test_the_idle_timeout_edge_is_the_same_at_lookup_and_at_expiry(gap, ends):
    # A flow is idle once *more* than idle_timeout passed since its last packet:
    # whether its next packet finds that out (lookup, within a burst) or expiry does
    # (after a burst), a packet exactly idle_timeout later goes on with the flow and
    # one 1 ns later starts a new one.
    udp = ("10.0.0.1", "10.0.0.2", 5000, 53, 17)
    first, then = (*udp, 1_000_000), (*udp, 1_000_000 + gap)

    by_lookup = FlowTable(capacity=4, idle_timeout=1e-6)
    assert by_lookup.idle_timeout_ns == 1000
    a, b = by_lookup.lookup_burst_py([first, then])
    assert a[3] and b[3] == ends and (b[1] == a[1] + 1 if ends else b[:2] == a[:2])

    by_expiry = FlowTable(capacity=4, idle_timeout=1e-6)
    a2 = by_expiry.lookup_tuple(*first)
    assert by_expiry.expire_py(then[5]) == int(ends)
    b2 = by_expiry.lookup_tuple(*then)
    assert b2[3] == ends

    for t in (by_lookup, by_expiry):
        assert t.counters["expired"] == int(ends) and t.counters["created"] == 1 + ends
        assert [(e["end_reason"], e["last_ns"]) for e in t.take_ended()] == (
            [("idle", 1_000_000)] if ends else [])
        assert t.flow(b[0] if t is by_lookup else b2[0])["last_ns"] == then[5]
    assert a2[:3] == a[:3]


def test_a_packet_after_the_idle_timeout_starts_a_new_flow_within_a_burst(tmp_path):
    """Expiry runs after each burst: a flow idle for longer than the timeout used to
    go on with the first packets after its pause (the first burst's worth), however
    long the pause."""
    import mbx
    from mbx.examples.capture import ether, udp4, write_pcap
    from mbx.ports import open_input

    frames = [(1.0 + t, ether(udp4("10.0.0.1", "10.0.0.2", 5000, 53, b"q")))
              for t in (0, 0.5, 5, 5.5, 20)]
    path = str(tmp_path / "gaps.pcap")
    write_pcap(path, frames)
    ends = []
    nf = mbx.NF("ends")
    nf.sub(mbx.FLOW_END, lambda ev: ends.append((ev.end_reason, ev.pkts_c2s)))
    inp = open_input(f"pcap:{path}")
    try:
        c = mbx.App([nf], idle_timeout=1.0).run(inp, burst=64)
    finally:
        inp.close()
    assert c["flows"]["created"] == 3 and c["flows"]["expired"] == 2
    names = mbx._events.END_REASONS
    assert [(names[r], n) for r, n in ends] == [("idle", 2), ("idle", 2), ("shutdown", 1)]


@pytest.mark.parametrize("stack", ["network", "tcp"])
def test_flow_events_show_the_flow_as_of_their_packet_whatever_the_burst(example_pcap,
                                                                          stack):
    """A flow's later packets in the same burst used to show in its FLOW/START and
    FLOW/TCP/* events: a last_ns past the event's packet, so the event changed with
    --burst."""
    import mbx
    from mbx.ports import open_input

    def flow_events(burst):
        seen = []
        nf = mbx.NF("flows")
        nf.sub(mbx.FLOW, lambda ev: seen.append((ev.type_name, ev.ts, ev.fields())))
        inp = open_input(f"pcap:{example_pcap}")
        try:
            mbx.App([nf], stack=stack).run(inp, burst=burst)
        finally:
            inp.close()
        return seen

    whole = flow_events(64)
    starts = [(ts, f) for name, ts, f in whole if name == "FLOW/START"]
    assert len(starts) > 100
    for ts, f in starts:
        assert f["first_ns"] == f["last_ns"] == ts, f
        assert f["pkts_c2s"] + f["pkts_s2c"] == 1, f
    if stack == "tcp":
        tcp = [(ts, f) for name, ts, f in whole if name.startswith("FLOW/TCP/")]
        assert len(tcp) > 100 and all(f["last_ns"] == ts for ts, f in tcp)
    assert whole == flow_events(1)


def test_a_burst_that_fills_event_memory_leaves_nfs_room_to_publish(tmp_path):
    # A burst near Event Memory's size was read until the stack's own events filled
    # it: flow_stats, publishing FLOW/STATS for each FLOW/END of a flow evicted in
    # the burst, found no room and the run failed ("Event Memory is full").
    from mbxtest import run_app

    from mbx.examples.capture import ether, udp4
    from mbx.nfs.flow_stats import FlowStats

    frames = [(1_700_000_000 + k * 1e-6,
               ether(udp4("198.18.0.1", "198.18.0.2", 1024 + k, 53, b"q")))
              for k in range(3000)]
    stats = FlowStats()
    c, _ = run_app([stats], None, tmp_path, frames=frames, burst=1024,
                   msg_capacity=1024, flow_capacity=64)
    assert c["packets"] == 3000 and c["flows"]["evicted"] > 2000
    published = c["events"]["FLOW/STATS"]["published"]
    assert published == c["flows"]["created"] == 3000


def test_a_flow_seen_before_the_clock_stepped_back_does_not_hold_expiry():
    # Expiry walks the LRU list from its head and stops at the first flow still
    # live.  A flow touched at a time the clock later stepped back from (a packet
    # stamped days ahead) looked live until the clock came back there, and every
    # flow behind it stayed in the table.
    t = FlowTable(capacity=8, idle_timeout=1.0)
    assert t.clock_step_ns == 1_000_000_000
    s = 1_000_000_000
    future = t.lookup_tuple("10.0.0.1", "10.0.0.2", 1, 53, 17, 10 * 86400 * s)
    later = [t.lookup_tuple("10.0.0.1", "10.0.0.2", 2 + k, 53, 17, (2 + k) * s)
             for k in range(3)]
    assert future[0] >= 0 and all(x[0] >= 0 for x in later)
    # at 10 s the three are idle; the future flow is taken as seen at 10 s
    assert t.expire_py(10 * s) == 3
    assert t.counters["active"] == 1
    assert t.expire_py(11 * s) == 0             # not idle a timeout after that yet
    assert t.expire_py(11 * s + 1) == 1
    # a flow just ahead of the clock (within the step) is left as it is
    u = FlowTable(capacity=8, idle_timeout=1.0)
    u.lookup_tuple("10.0.0.1", "10.0.0.2", 1, 53, 17, 20 * s)
    u.lookup_tuple("10.0.0.1", "10.0.0.2", 2, 53, 17, 19 * s)
    assert u.expire_py(19 * s + s // 2) == 0


def test_rebuilt_datagram_counts_as_one_packet_of_its_rebuilt_length(tmp_path):
    # As the guide says under the flow counters: a datagram rebuilt from fragments
    # counts once, at the length of the rebuilt frame (one Ethernet and IP header),
    # not the fragments' frames on the wire.
    from mbxtest import fragment4, run_app

    import mbx
    from mbx.examples.capture import ether, udp4

    whole = ether(udp4("198.18.0.1", "198.18.0.2", 1000, 53, bytes(4096)))
    frags = fragment4(whole, 1480)
    assert len(frags) == 3 and sum(map(len, frags)) > len(whole)
    ends = []

    class Ends(mbx.NF):
        def __init__(self):
            super().__init__("ends")
            self.sub(mbx.FLOW_END, lambda ev: ends.append((ev.pkts_c2s, ev.bytes_c2s)))

    run_app([Ends()], None, tmp_path, [(1.0 + i / 1000, f) for i, f in enumerate(frags)])
    assert ends == [(1, len(whole))]


# --- VLAN ids in the key -----------------------------------------------------------

def test_the_same_five_tuple_in_two_vlans_is_two_flows():
    # Two address spaces that overlap on a trunk: the same 5-tuple in VLAN 10 and in
    # VLAN 20 is two connections, as Suricata (vlan.use-for-tracking) and Zeek see it.
    t = FlowTable(capacity=16)
    there = ("10.0.0.1", "10.0.0.2", 40000, 80, 6)
    back = ("10.0.0.2", "10.0.0.1", 80, 40000, 6)
    in10 = t.lookup_tuple(*there, 1, vlan=(10,))
    in20 = t.lookup_tuple(*there, 2, vlan=(20,))
    assert in10[3] and in20[3] and in10[0] != in20[0]
    # each direction of each stays in its own flow
    assert t.lookup_tuple(*back, 3, vlan=(10,))[:3] == (in10[0], in10[1], 1)
    assert t.lookup_tuple(*back, 4, vlan=(20,))[:3] == (in20[0], in20[1], 1)
    assert t.lookup_tuple(*there, 5)[3]         # untagged: a third
    assert len(t) == 3
    rec10, rec20 = t.flow(in10[0]), t.flow(in20[0])
    assert (rec10["vlan"], rec10["pkts"]) == ([10], (1, 1))
    assert (rec20["vlan"], rec20["pkts"]) == ([20], (1, 1))
    # the hash leaves the VLANs out (software RSS needs none): one bucket, two keys
    assert rec10["hash"] == rec20["hash"] == flow_hash(*there)


def test_both_qinq_ids_count():
    t = FlowTable(capacity=16)
    there = ("198.18.0.1", "198.19.0.1", 5000, 53, 17)
    back = ("198.19.0.1", "198.18.0.1", 53, 5000, 17)
    slots = {vlans: t.lookup_tuple(*there, 1, vlan=vlans)[0]
             for vlans in [(100, 10), (100, 20), (200, 10), (100,), (10,)]}
    assert len(set(slots.values())) == 5
    for vlans, slot in slots.items():
        assert t.lookup_tuple(*back, 2, vlan=vlans)[:3:2] == (slot, 1)
        assert t.flow(slot)["vlan"] == list(vlans)
    # a third tag and deeper: not recorded by the parser, not in the key
    assert t.lookup_tuple(*back, 3, vlan=(100, 10, 7))[0] == slots[(100, 10)]


def test_without_vlans_in_the_key_one_connection_crosses_two_vlans():
    # Router on a stick: the client's side is VLAN 10, the server's VLAN 20, and a
    # middlebox on the trunk sees one connection go out in one and back in the other
    t = FlowTable(capacity=16, vlan_in_flow_key=False)
    assert not t.vlan_keyed and FlowTable(capacity=1).vlan_keyed
    slot, gen, d, created = t.lookup_tuple("10.0.0.1", "10.0.0.2", 40000, 80, 6, 1,
                                           vlan=(10,))
    assert created and d == 0
    assert t.lookup_tuple("10.0.0.2", "10.0.0.1", 80, 40000, 6, 2,
                          vlan=(20,)) == (slot, gen, 1, False)
    assert len(t) == 1 and t.flow(slot)["vlan"] == []
