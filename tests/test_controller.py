"""Application files and the Controller: loading, type checks with their messages,
filters compiled into the bus, parallel groups and their merged verdicts."""
import ipaddress
import re
import subprocess
import sys
import textwrap

import dpkt
import pytest
from mbx._monitor import TcpMonitor
from mbxtest import read_frames, run_app

import mbx
from mbx._events import EventBus
from mbx.controller import check, load_app_file
from mbx.errors import AppError
from mbx.examples.capture import ether, tcp4, tcp6, udp4, write_pcap
from mbx.ports import open_input
from mbx.runtime import App

IDS = str(mbx.__file__).replace("__init__.py", "examples/ids.py")


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


NF_FILE = '''
import mbx
ALERT = mbx.register_event_type("TEST_CTL_ALERT", fields=[("n", "u32")])

class Counter(mbx.NF):
    def __init__(self, name, types=("PKT",), drop_port=None):
        super().__init__(name)
        self.seen = []
        self.drop_port = drop_port
        for t in types:
            self.sub(t, self.on_event)

    def on_event(self, ev):
        self.seen.append((ev.type_name, ev.has_packet and ev.dport))
        if self.drop_port is not None and ev.has_packet and ev.dport == self.drop_port:
            ev.drop()

def make(name="counter", types="PKT", drop_port=None):
    return Counter(name, types.split(","), drop_port and int(drop_port))
'''


def test_an_application_file_loads_links_and_runs(tmp_path, example_pcap):
    nf_file = write(tmp_path, "counter.py", NF_FILE)
    app = write(tmp_path, "app.toml", f"""
        [app]
        name = "web"
        [stack]
        flow_capacity = 4096
        [[nf]]
        use = "{nf_file}"
        options = {{ name = "web", types = "PKT,FLOW/END" }}
        [nf.filter]
        dst_port = [80, "8000-8080"]
        proto = "tcp"
        [[nf]]
        use = "flow_stats"
        """)
    spec = load_app_file(app)
    assert [nf.name for nf in spec.nfs] == ["web", "flow_stats"]
    assert spec.options == {"flow_capacity": 4096}
    graph = spec.graph()
    assert "NF web" in graph and "<- PKT" in graph and "Network Layer" in graph
    assert "dst_port" in graph
    counters = mbx.App(spec.nfs, **spec.options).run(open_input("pcap:" + example_pcap))
    web = spec.nfs[0]
    # the filter ran in the bus: exactly the TCP packets to port 80 or 8000-8080
    expected = 0
    for _, buf in read_frames(example_pcap):
        eth = dpkt.ethernet.Ethernet(buf)
        ip = eth.data
        if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.tcp.TCP) and not (
                ip.mf or ip.offset):
            d = ip.data.dport
            expected += d == 80 or 8000 <= d <= 8080
    pkts = [s for s in web.seen if s[0] == "PKT"]
    assert len(pkts) == expected > 100
    assert all(d == 80 or 8000 <= d <= 8080 for _, d in pkts)
    # FLOW/END has no packet: the flow's server port is what the filter checks
    assert any(s[0] == "FLOW/END" for s in web.seen)
    assert counters["packets"] == len(read_frames(example_pcap))


# Prefixes of every kind the C matcher handles differently: whole bytes only (/8,
# /24, /32), a partial last byte (/15, /20, /31, /127), IPv6 (/64, /127).
FILTER_NETS = ["10.0.0.0/8", "172.16.0.0/15", "192.168.5.0/24", "198.51.100.6/31",
               "198.51.100.9/32", "203.0.112.0/20", "2001:db8:a:b::/64", "2001:db8::6/127"]


def _near(net):
    """Addresses at and just beyond the edges of ``net``, and the network address with
    each of the bits around the prefix length flipped: the last bit of the prefix
    (outside when flipped) and the first bit after it (inside)."""
    out = {net.network_address, net.broadcast_address, net.network_address - 1,
           net.broadcast_address + 1}
    width = net.max_prefixlen
    for bit in range(max(0, net.prefixlen - 3), min(width, net.prefixlen + 2)):
        out.add(ipaddress.ip_address(int(net.network_address) ^ (1 << (width - 1 - bit))))
    return out


def test_src_net_and_dst_net_filters_take_exactly_the_prefix(run):
    nets = [ipaddress.ip_network(n) for n in FILTER_NETS]
    addrs = sorted({a for n in nets for a in _near(n)}, key=lambda a: (a.version, a))
    peer = {4: "192.0.2.200", 6: "2001:db8:ffff::1"}
    frames = []
    for k, a in enumerate(addrs):
        # a SYN from the address and one to it
        for src, dst in ((str(a), peer[a.version]), (peer[a.version], str(a))):
            frame = (ether(tcp4(src, dst, 1000 + k, 80, flags=0x02)) if a.version == 4
                     else ether(tcp6(src, dst, 1000 + k, 80, flags=0x02), ethertype=0x86DD))
            frames.append((1_700_000_000 + len(frames) * 1e-4, frame))
    sent = [tuple(str(ipaddress.ip_address(bytes(a))) for a in (ip.src, ip.dst))
            for ip in (dpkt.ethernet.Ethernet(f).data for _, f in frames)]

    def recorder(name, **spec):
        nf = mbx.NF(name)
        nf.got = []
        nf.sub("PKT", lambda ev: nf.got.append((ev.src_ip, ev.dst_ip)))
        nf.filter("PKT", **spec)
        nf.spec = spec
        return nf

    nfs = [recorder(f"{side}{i}", **{f"{side}_net": str(n)})
           for i, n in enumerate(nets) for side in ("src", "dst")]
    # a list of prefixes takes an address in any of them
    nfs.append(recorder("list", src_net=[FILTER_NETS[1], FILTER_NETS[7]]))
    run(nfs, frames=frames)
    for nf in nfs:
        side, want_nets = next(iter(nf.spec.items()))
        want_nets = [ipaddress.ip_network(n) for n in
                     (want_nets if isinstance(want_nets, list) else [want_nets])]
        want = [p for p in sent
                if any(ipaddress.ip_address(p[0 if side == "src_net" else 1]) in n
                       for n in want_nets)]
        assert nf.got == want, f"{nf.name} {nf.spec}: took " \
            f"{sorted(set(nf.got) - set(want))}, missed {sorted(set(want) - set(nf.got))}"
        assert want and len(want) < len(sent)       # the filter had work on both sides


def test_a_per_type_filter_replaces_the_nf_wide_one_for_its_type_only(tmp_path):
    nf_file = write(tmp_path, "rec.py", """
        import mbx

        def make(name="rec"):
            nf = mbx.NF(name)
            nf.got = []
            nf.sub("PKT", lambda ev: nf.got.append(("PKT", ev.proto, ev.sport, ev.dport)))
            nf.sub("FLOW/END", lambda ev: nf.got.append(
                ("FLOW/END", ev.proto, ev.cli_port, ev.srv_port)))
            return nf
        """)
    app = write(tmp_path, "app.toml", f"""
        [[nf]]
        use = "{nf_file}"
        [nf.filter]
        dst_port = 80
        [nf.filters.PKT]
        proto = "udp"
        """)
    spec = load_app_file(app)
    # mbx check shows the filter each subscription gets
    links = {line.split()[1]: line for line in spec.graph().splitlines() if "<-" in line}
    assert links["PKT"].endswith("[Filter(proto='udp')]")
    assert links["FLOW/END"].endswith("[Filter(dst_port=80)]")
    # TCP and UDP flows to port 80 and to other ports, a packet each way
    frames, k = [], 0
    for proto, srv_port in ((6, 80), (6, 443), (17, 80), (17, 53)):
        for cli_port in (40000, 40001):
            for sp, dp, src, dst in ((cli_port, srv_port, "198.18.1.1", "198.18.2.1"),
                                     (srv_port, cli_port, "198.18.2.1", "198.18.1.1")):
                pkt = (tcp4(src, dst, sp, dp, flags=0x02 if sp == cli_port else 0x12)
                       if proto == 6 else udp4(src, dst, sp, dp, b"x"))
                frames.append((1_700_000_000 + k * 1e-3, ether(pkt)))
                k += 1
    write_pcap(str(tmp_path / "in.pcap"), frames)
    App(spec.nfs).run(open_input(f"pcap:{tmp_path / 'in.pcap'}"))
    got = spec.nfs[0].got
    # PKT: its own filter (every UDP packet, port 80 or not), not the NF-wide one
    assert [g[1:] for g in got if g[0] == "PKT"] == [
        (17, sp, dp) for port in (80, 53) for cli in (40000, 40001)
        for sp, dp in ((cli, port), (port, cli))]
    # FLOW/END: the NF-wide filter (server port 80, TCP or UDP)
    assert sorted(g[1:] for g in got if g[0] == "FLOW/END") == [
        (6, 40000, 80), (6, 40001, 80), (17, 40000, 80), (17, 40001, 80)]


def test_a_second_filter_for_one_subscription_is_refused(tmp_path):
    # The second replaced the first, silently: in code, and in an application file
    # through two names of one type ("flow.end" and END are both FLOW/END).
    nf = mbx.NF("twice")
    nf.sub(mbx.PKT, lambda ev: None)
    nf.filter(mbx.PKT, proto="tcp")
    with pytest.raises(mbx.SubscriptionError) as info:
        nf.filter("pkt", dst_port=80)
    assert str(info.value).startswith("NF twice: a second filter for PKT (it has "
                                      "Filter(proto='tcp')")
    nf.filter(None, proto="udp")
    with pytest.raises(mbx.SubscriptionError, match="second filter for every sub"):
        nf.filter(None, dst_port=53)
    assert set(nf.filters) == {mbx.PKT.idx, None}
    app = write(tmp_path, "app.toml", """
        [[nf]]
        use = "flow_stats"
        [nf.filters."flow.end"]
        proto = "tcp"
        [nf.filters.END]
        dst_port = 80
        """)
    with pytest.raises(AppError) as info:
        load_app_file(app)
    # at the line of the second filter's table
    assert 'app.toml:6: [[nf]] #1 "flow_stats": NF flow_stats: filter: a second filter ' \
           'for FLOW/END' in str(info.value)


def test_nf_files_are_found_beside_the_application_file(tmp_path, monkeypatch):
    # "FILE.py:NAME" (one NF of a file of several) was looked up in the current
    # directory, and its options were keyed by the whole "FILE.py:NAME" and lost.
    sub = tmp_path / "app"
    sub.mkdir()
    write(sub, "two.py", """
        import mbx

        def make(name="x", types="PKT"):
            made = []
            for nf_name in (name, "other"):
                nf = mbx.NF(nf_name)
                for t in types.split(","):
                    nf.sub(t, lambda ev: None)
                made.append(nf)
            return made
        """)
    app = write(sub, "app.toml", """
        [[nf]]
        use = "two.py:picked"
        options = { name = "picked", types = "FLOW/START,FLOW/END" }
        """)
    monkeypatch.chdir(tmp_path)             # not the application file's directory
    spec = load_app_file(app)
    assert [nf.name for nf in spec.nfs] == ["picked"]
    assert sorted(mbx._events.event_types()[i].name for i in spec.nfs[0].subs) == [
        "FLOW/END", "FLOW/START"]


def test_a_file_in_the_current_directory_never_stands_in_for_one_beside_the_app(
        tmp_path, monkeypatch):
    # use = "x.py" and merge = "x.py:fn" were looked up in the current directory
    # first: a file of the same name there ran in place of the application's own.
    sub = tmp_path / "app"
    sub.mkdir()
    for where, name in ((sub, "mine"), (tmp_path, "impostor")):
        write(where, "nf.py", f"""
            import mbx

            nf = mbx.NF("{name}", group="g")
            nf.sub("PKT", lambda ev: None)
            """)
        write(where, "votes.py", f"""
            def {name}(votes):
                return False
            """)
    app = write(sub, "app.toml", """
        [[nf]]
        use = "nf.py"
        group = "g"
        [[nf]]
        use = "l2fwd"
        group = "g"
        [groups.g]
        merge = "votes.py:mine"
        """)
    monkeypatch.chdir(tmp_path)
    spec = load_app_file(app)
    assert spec.nfs[0].name == "mine"
    assert spec.nfs[0].group_merge.__name__ == "mine"
    # beside the application file only: the message says where it looked
    (sub / "votes.py").unlink()
    with pytest.raises(AppError) as info:
        load_app_file(app)
    assert f"{sub / 'votes.py'}: no such file" in str(info.value)
    (sub / "nf.py").unlink()
    with pytest.raises(AppError) as info:
        load_app_file(app)
    assert f"NF file {sub / 'nf.py'}: no such file" in str(info.value)
    assert "relative to the application file" in str(info.value)


@pytest.mark.parametrize("body, message", [
    ("""
     [[nf]]
     use = "{nf}"
     options = {{ types = "DATA_RDY_NOPE" }}
     """, "unknown event type 'DATA_RDY_NOPE'"),
    ("""
     [[nf]]
     use = "{nf}"
     options = {{ types = "TEST_CTL_ALERT" }}
     """, "subscribes to TEST_CTL_ALERT, which nothing in the application publishes"),
    ("""
     [[nf]]
     use = "l4lb"
     group = "g"
     [[nf]]
     use = "l2fwd"
     group = "g"
     """, "NF l4lb writes packets and cannot run in the parallel group 'g'"),
    ("""
     [[nf]]
     use = "l2fwd"
     [[nf]]
     use = "l2fwd"
     """, "NF name(s) used twice: l2fwd"),
    ("""
     [[nf]]
     use = "l2fwd"
     colour = "blue"
     """, ':4: [[nf]] #1 "l2fwd": unknown key(s) colour'),
    ("""
     [[nf]]
     use = "l2fwd"
     [nf.filter]
     dst_port = [70000]
     """, "NF l2fwd: filter dst_port: 70000 is not within 0-65535"),
    ("""
     [[nf]]
     use = "l2fwd"
     [nf.filter]
     dst_port = "90-80"
     """, "filter dst_port: '90-80' runs backwards: write 80-90"),
    # a bool is an int to Python: proto = true was taken as 1, ICMP
    ("""
     [[nf]]
     use = "l2fwd"
     [nf.filter]
     proto = true
     """, "filter proto: True is not tcp, udp, icmp, icmp6, sctp or a protocol number"),
    # an empty list left the key unconstrained: it matched every packet
    ("""
     [[nf]]
     use = "l2fwd"
     [nf.filter]
     dst_port = []
     """, "filter dst_port: an empty list: give at least one port or range"),
    ("""
     [[nf]]
     use = "l2fwd"
     [nf.filter]
     src_net = []
     """, "filter src_net: an empty list: give at least one prefix"),
    ("""
     [[nf]]
     use = "l2fwd"
     [nf.filter]
     src_net = "10.0.0.1/8"
     """, "filter src_net: '10.0.0.1/8' has bits set past its prefix length: write "
          "10.0.0.0/8 for the network, or 10.0.0.1 for the host"),
    ("""
     [[nf]]
     use = "l2fwd"
     [nf.filter]
     proto = "icmp"
     dst_port = 80
     """, "proto 'icmp' with src_port or dst_port matches nothing: ICMP has no ports"),
    ("""
     [[nf]]
     use = "l2fwd"
     [nf.filter]
     src = "198.18.0.1"
     """, "NF l2fwd: filter: unknown key(s) src (known: proto, src_port, "
          "dst_port, src_net, dst_net)"),
    ("""
     [[nf]]
     use = "{nf}"
     [nf.filters."FLOW/END"]
     proto = "tcp"
     """, 'NF counter: filters."FLOW/END": the NF does not subscribe to FLOW/END'),
    ("""
     [app]
     name = "x"
     stak = "tcp"
     [[nf]]
     use = "l2fwd"
     """, "[app] unknown key(s) stak"),
    ("""
     [stack]
     flow_capacity = -5
     [[nf]]
     use = "l2fwd"
     """, "[stack] flow_capacity must be a whole number from 1 to 268,435,456, not -5"),
    ("""
     [stack]
     flows = 3
     [[nf]]
     use = "l2fwd"
     """, "[stack] unknown option(s) flows"),
    ("""
     [stack]
     idle_timeout = "soon"
     [[nf]]
     use = "l2fwd"
     """, "[stack] idle_timeout = 'soon': expected a number of seconds"),
    ("""
     [stack]
     flow_capacity = 1.5
     [[nf]]
     use = "l2fwd"
     """, "[stack] flow_capacity = 1.5: expected a whole number"),
    ("""
     [stack]
     overlap = true
     [[nf]]
     use = "l2fwd"
     """, "[stack] overlap = True: expected a string"),
    ("""
     [[nf]]
     use = "l2fwd"
     options = 3
     """, ':4: [[nf]] #1 "l2fwd": options = 3: expected a table'),
    ("""
     [[nf]]
     use = "l2fwd"
     group = 5
     """, ':4: [[nf]] #1 "l2fwd": group = 5: expected a string'),
    ("""
     [[nf]]
     use = "l2fwd"
     [nf.filters]
     PKT = 3
     """, ':4: [[nf]] #1 "l2fwd": filters = {\'PKT\': 3}: expected a table of tables'),
    ("""
     nf = 3
     """, "nf = 3: expected [[nf]] tables"),
    ("""
     stack = "tcp"
     [[nf]]
     use = "l2fwd"
     """, "stack = 'tcp': expected a [stack] table"),
    ("""
     [[nf]]
     use = "l2fwd
     """, "app.toml: "),
    ("""
     [[nf]]
     use = "nosuch"
     """, "unknown NF 'nosuch'"),
    ("""
     [[nf]]
     use = "{nf}"
     group = "g"
     [groups.g]
     merge = "most"
     """, ":6: parallel group 'g': merge = 'most': use \"any\""),
    ("""
     [[nf]]
     use = "{nf}"
     group = "g"
     [groups.h]
     merge = "all"
     """, ":5: [groups.h]: no NF has group = 'h'"),
    ("""
     [[nf]]
     use = "{nf}"
     group = "g"
     [groups.g]
     merge = "all"
     quorum = 2
     """, ":7: [groups.g] unknown key(s) quorum"),
])
def test_refusals_name_file_line_nf_and_types(tmp_path, body, message):
    nf_file = write(tmp_path, "counter.py", NF_FILE)
    app = write(tmp_path, "app.toml", body.format(nf=nf_file))
    with pytest.raises(AppError) as info:
        load_app_file(app)
    assert message in str(info.value)
    assert "app.toml" in str(info.value)


@pytest.mark.parametrize("body, line, message", [
    ("""
     [app]
     name = "x"

     [stack]                     # comments and blank lines do not move the line
     idle_timeout = 5
     flow_capacity = "big"
     [[nf]]
     use = "l2fwd"
     """, 7, "[stack] flow_capacity = 'big': expected a whole number"),
    ("""
     [stack]
     msg_capacity = 4096
     flow_capcity = 5
     [[nf]]
     use = "l2fwd"
     """, 4, "[stack] unknown option(s) flow_capcity (known: "),
    ("""
     [[nf]]
     use = "l2fwd"
     [stack]
     "flow_capacity" = -5
     """, 5, "[stack] flow_capacity must be a whole number from 1 to 268,435,456"),
    ("""
     stack.overlap = 3
     [[nf]]
     use = "l2fwd"
     """, 2, "[stack] overlap = 3: expected a string"),
    ("""
     [stack]
     vlan_in_flow_key = "no"
     [[nf]]
     use = "l2fwd"
     """, 3, "[stack] vlan_in_flow_key = 'no': expected true or false"),
    # values only the stack used to check, refused by mbx run without the line
    ("""
     [stack]
     idle_timeout = 5
     flow_policy = "drop"
     [[nf]]
     use = "l2fwd"
     """, 4, "[stack] flow_policy must be one of evict, refuse, not 'drop'"),
    ("""
     [stack]
     overlap = "middle"
     [[nf]]
     use = "l2fwd"
     """, 3, "[stack] overlap must be one of first, last, not 'middle'"),
    ("""
     [stack]
     malformed = "keep"
     chunk_size = 4096
     [[nf]]
     use = "l2fwd"
     """, 3, "[stack] malformed must be one of forward, drop, not 'keep'"),
    ("""
     [stack]
     chunk_size = 3000
     [[nf]]
     use = "l2fwd"
     """, 3, "[stack] chunk_size must be a power of two from 64 to 16,777,216, not 3000"),
    # what only the tables refused, without the line and in their own words
    # ("capacity", "timeout"), after mbx check had passed them
    ("""
     [stack]
     idle_timeout = 5
     flow_capacity = 0
     [[nf]]
     use = "l2fwd"
     """, 4, "[stack] flow_capacity must be a whole number from 1 to 268,435,456, "
             "not 0"),
    ("""
     [stack]
     msg_capacity = 1000
     [[nf]]
     use = "l2fwd"
     """, 3, "[stack] msg_capacity must be a power of two, not 1000"),
    ("""
     [stack]
     idle_timeout = -5
     [[nf]]
     use = "l2fwd"
     """, 3, "[stack] idle_timeout must be seconds, from 0 to 1e9, not -5"),
    ("""
     [stack]
     frag_timeout = 0
     [[nf]]
     use = "l2fwd"
     """, 3, "[stack] frag_timeout must be seconds, above 0, up to 1e9, not 0"),
    ("""
     [[nf]]
     use = "l2fwd"
     [[nf]]
     use = "logger"
     options = { types = ["FLOW", "PKT"] }
     """, 6, '[[nf]] #2 "logger": types must be a string of comma-separated event types '
             "(\"FLOW,PKT\"), not ['FLOW', 'PKT']"),
    # sizes that are wrong only together, at the line of the one the rule names
    ("""
     [stack]
     chunk_size = 65536
     stream_window = 16384
     [[nf]]
     use = "l2fwd"
     """, 4, "[stack] stream_window must be from chunk_size (65,536) to 1,073,741,824, "
             "not 16384"),
    ("""
     [stack]
     stream_window = 65536
     retain = 65536
     [[nf]]
     use = "l2fwd"
     """, 4, "[stack] retain must be below stream_window (65,536), not 65536"),
    ("""
     [stack]
     stream_memory = 8192
     [[nf]]
     use = "l2fwd"
     """, 3, "[stack] stream_memory must be at least chunk_size (16,384), not 8192"),
    ("""
     [stack]
     max_streams = 0
     [[nf]]
     use = "l2fwd"
     """, 3, "[stack] max_streams must be from 1 to 4,294,967,295, not 0"),
    ("""
     [stack]
     chunk_size = 8388608
     [[nf]]
     use = "l2fwd"
     """, 2, "[stack] stream_window must be from chunk_size (8,388,608) to "
             "1,073,741,824, not 4194304 (the default stream_window: give one that fits)"),
    ("""
     [stack]
     flow_capacity = 5
     [app]
     stack = "udp"
     [[nf]]
     use = "l2fwd"
     """, 5, "[app] stack = 'udp': use auto, network or tcp"),
    ("""
     [[nf]]   # the first NF
     use = "flow_stats"
     group = "g"
     [[nf]]
     use = "l2fwd"
     [[nf]]
     use = "logger"
     group = "g"
     """, 7, "parallel group 'g' is split by other NFs (NF l2fwd): list its NFs next "
             "to each other"),
    ("""
     [[nf]]
     use = "l2fwd"
     [[nf]]
     use = "IDS"
     name = "dpi"
     group = "g"
     [[nf]]
     use = "IDS"
     name = "ids"
     group = "g"
     """, 8, "NF ids subscribes to DPI_DETECT, which NF dpi of its parallel group 'g' "
             "publishes"),
    ("""
     [[nf]]
     use = "l2fwd"
     [[ nf ]]
     use = "IDS"
     name = "ids"
     """, 4, "NF ids subscribes to DPI_DETECT, which nothing in the application "
             "publishes"),
    ("""
     [[nf]]
     use = "l2fwd"
     [[nf]]
     use = "flow_stats"
     [[nf]]
     use = "l2fwd"
     """, 6, "NF name(s) used twice: l2fwd"),
    ("""
     [[nf]]
     use = "l2fwd"
     group = "g"
     [[nf]]
     use = "l4lb"
     group = "g"
     """, 5, "NF l4lb writes packets and cannot run in the parallel group 'g'"),
    ("""
     [[nf]]        # a comment after the header does not hide it
     use = "l2fwd"
     [[nf]]
     use = "l2fwd"
     colour = "blue"
     """, 6, '[[nf]] #2 "l2fwd": unknown key(s) colour'),
])
def test_refusals_give_the_line_of_the_key_or_nf(tmp_path, body, line, message):
    app = write(tmp_path, "app.toml", body.replace("IDS", IDS))
    with pytest.raises(AppError) as info:
        load_app_file(app)
    assert str(info.value).startswith(f"{app}:{line}: {message}")


@pytest.mark.parametrize("body, line, message", [
    ("""
     [stack]
     flow_capcity = 5
     [[nf]]
     use = "l2fwd"
     """, 3, "[stack] unknown option(s) flow_capcity"),
    # mbx check passed sizes wrong only together, and mbx run failed in the stack,
    # without the line and in the stream pool's own words (max_stream_bytes)
    ("""
     [app]
     stack = "tcp"
     [stack]
     stream_window = 4096
     [[nf]]
     use = "l2fwd"
     """, 5, "[stack] stream_window must be from chunk_size (16,384)"),
])
def test_mbx_check_and_run_give_the_line_of_a_stack_key(tmp_path, example_pcap, body, line,
                                                         message):
    app = write(tmp_path, "app.toml", body)
    for cmd in (["check", app], ["run", app, "--in", "pcap:" + example_pcap]):
        r = subprocess.run([sys.executable, "-m", "mbx.cli", *cmd], capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 2, cmd
        assert f"{app}:{line}: {message}" in r.stderr, (cmd, r.stderr)


def test_app_and_the_monitor_refuse_stream_sizes_in_the_same_words():
    with pytest.raises(AppError, match="stack options: retain must be below "
                                       "stream_window"):
        App([], stack="tcp", stream_window=1 << 16, retain=1 << 16)
    # the Monitor itself says the same, in the same words
    with pytest.raises(ValueError, match="^stream_window must be from chunk_size"):
        TcpMonitor(EventBus([]), stream_window=4096)


def test_monitor_options_an_application_would_ignore_are_named(tmp_path, example_pcap):
    app = write(tmp_path, "app.toml", """
        [stack]
        chunk_size = 8192
        [[nf]]
        use = "l2fwd"
        """)
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "check", app],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert ("warning: chunk_size: a TCP Monitor option, unused: no NF subscribes to a "
            "TCP type, so the Network Layer runs alone") in r.stdout
    cmd = [sys.executable, "-m", "mbx.cli", "run", app, "--in", "pcap:" + example_pcap,
           "-q"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    # run says what check says (it said "the stack is set to the Network Layer",
    # the Controller's answer for a stack nobody set)
    assert ("mbx: warning: chunk_size: a TCP Monitor option, unused: no NF subscribes "
            "to a TCP type") in r.stderr
    r = subprocess.run(cmd + ["--stack", "network"], capture_output=True, text=True,
                       timeout=120)
    assert "unused: the stack is set to the Network Layer" in r.stderr
    # --stack tcp runs the Monitor: the option is used, nothing to say
    r = subprocess.run(cmd + ["--stack", "tcp"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert "warning" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "run", "l2fwd", "--in",
                        "pcap:" + example_pcap, "-q", "--stack", "network", "--overlap",
                        "last"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert ("mbx: warning: overlap: a TCP Monitor option, unused: the stack is set to "
            "the Network Layer") in r.stderr


def test_the_graph_marks_a_later_feeder_and_leaves_out_group_mates(tmp_path):
    backward = write(tmp_path, "back.toml", f"""
        [[nf]]
        use = "{IDS}"
        name = "ids"
        [[nf]]
        use = "{IDS}"
        name = "dpi"
        """)
    graph = load_app_file(backward).graph()
    assert "<- DPI_DETECT             from NF dpi (later in the chain: inline only)" in graph
    # two members of a group that take PKT: each is fed by the stack alone (a mate
    # republishes PKT, but mates run side by side, not one after the other)
    member = write(tmp_path, "member.py", """
        import mbx
        def make(name="m"):
            nf = mbx.NF(name)
            nf.sub(mbx.PKT, lambda ev: None)
            return nf
        """)
    grouped = write(tmp_path, "group.toml", f"""
        [[nf]]
        use = "{member}"
        options = {{ name = "m1" }}
        group = "g"
        [[nf]]
        use = "{member}"
        options = {{ name = "m2" }}
        group = "g"
        """)
    fed = [line.strip() for line in load_app_file(grouped).graph().splitlines()
           if "<- PKT" in line]
    assert fed == ["<- PKT                    from Network Layer"] * 2


def test_the_logger_subscribes_once_to_a_type_named_twice(example_pcap, tmp_path):
    # "FLOW/END,FLOW/END" was refused as a second subscription "(use up_sub ...)"
    from mbx.nfs.logger import make

    log = tmp_path / "ends.jsonl"
    logger = make(path=str(log), types="FLOW/END, FLOW/END,")
    counters, _ = run_app([logger], example_pcap)
    ends = [line for line in log.read_text().splitlines() if "FLOW/END" in line]
    assert len(ends) == counters["flows"]["created"] > 0


def test_subscription_fed_by_a_publishing_nf_or_a_descendant_type(tmp_path):
    parent = mbx.register_event_type("TEST_CTL_PARENT")
    child = mbx.register_event_type("TEST_CTL_PARENT/CHILD")
    pub = mbx.NF("pub")
    pub.sub(mbx.FLOW_END, lambda ev: None)
    pub.pub(child)
    sub = mbx.NF("sub")
    sub.sub(parent, lambda ev: None)          # a child publication feeds a parent sub
    spec = check("x", "x", "auto", {}, [pub, sub])
    assert [(nf.name, t.name, feeders) for nf, t, feeders in spec.links] == [
        ("pub", "FLOW/END", ["Network Layer"]),
        ("sub", "TEST_CTL_PARENT", ["NF pub"])]
    lonely = mbx.NF("lonely")
    lonely.sub(child, lambda ev: None)
    pub2 = mbx.NF("pub2")
    pub2.pub(parent)                          # a parent publication does not feed it
    with pytest.raises(AppError, match="TEST_CTL_PARENT/CHILD, which nothing"):
        check("x", "x", "auto", {}, [pub2, lonely])


def test_a_type_of_the_same_name_under_another_parent_is_named(tmp_path):
    # Two files registered PORTSCAN, one under FLOW: two types, and the subscriber's
    # error listed the other among every publication with no word of why
    top = mbx.register_event_type("TEST_CTL_SCAN")
    under_flow = mbx.register_event_type("TEST_CTL_SCAN", parent=mbx.FLOW)
    pub = mbx.NF("scan")
    pub.sub(mbx.PKT, lambda ev: None)
    pub.pub(top)
    alert = mbx.NF("alert")
    alert.sub(under_flow, lambda ev: None)
    with pytest.raises(AppError) as info:
        check("x", "x", "auto", {}, [pub, alert])
    assert ("FLOW/TEST_CTL_SCAN, which nothing in the application publishes"
            in str(info.value))
    assert ("TEST_CTL_SCAN has the same name under another parent: a type registered "
            "with a different parent is another type") in str(info.value)


def test_parallel_group_sees_every_packet_and_any_drop_wins(run, example_pcap):
    class Dropper(mbx.NF):
        def __init__(self, name, port, group=None):
            super().__init__(name, group=group)
            self.port = port
            self.seen = 0
            self.sub(mbx.PKT, self.on_pkt)

        def on_pkt(self, ev):
            self.seen += 1
            if ev.dport == self.port:
                ev.drop()

    a = Dropper("a", 53, group="monitors")
    b = Dropper("b", 443, group="monitors")
    after = Dropper("after", -1)
    counters, out = run([a, b, after], example_pcap)
    assert a.seen == b.seen == counters["events"]["PKT"]["published"]
    dropped = counters["dropped_by_nf"]
    assert dropped > 0
    assert after.seen == a.seen - dropped
    for _, buf in out:
        ip = dpkt.ethernet.Ethernet(buf).data
        if isinstance(ip, dpkt.ip.IP | dpkt.ip6.IP6) and hasattr(ip.data, "dport"):
            assert ip.data.dport not in (53, 443)
    # sequential: the second NF no longer sees what the first dropped
    a2, b2 = Dropper("a2", 53), Dropper("b2", 443)
    run([a2, b2], example_pcap)
    assert b2.seen < a2.seen


def test_group_merge_all_drops_only_what_every_member_dropped(run, tmp_path,
                                                             example_pcap):
    # merge = "all": a packet one member drops still passes; one every member drops
    # does not.  Every member sees every packet either way.
    nf_file = write(tmp_path, "counter.py", NF_FILE)
    app = write(tmp_path, "app.toml", f"""
        [[nf]]
        use = "{nf_file}"
        options = {{ name = "a", drop_port = 53 }}
        group = "g"
        [[nf]]
        use = "{nf_file}"
        options = {{ name = "b", drop_port = 53 }}
        group = "g"
        [[nf]]
        use = "{nf_file}"
        options = {{ name = "c", drop_port = 443 }}
        group = "g"
        [[nf]]
        use = "{nf_file}"
        options = {{ name = "after" }}
        [groups.g]
        merge = "all"
        """)
    spec = load_app_file(app)
    assert "parallel group g, merge all" in spec.graph()
    counters, _ = run(spec.nfs, example_pcap)
    a, b, c, after = spec.nfs
    assert len(a.seen) == len(b.seen) == len(c.seen) == counters["events"]["PKT"]["published"]
    ports = [d for _, d in a.seen]
    # 53 is dropped by two members of three, 443 by one: nothing is dropped
    assert ports.count(53) > 0 and ports.count(443) > 0
    assert counters["dropped_by_nf"] == 0
    assert len(after.seen) == len(ports)
    # the same members, any drop wins (the default)
    spec = load_app_file(app)
    for nf in spec.nfs:
        nf.group_merge = "any"
    counters, _ = run(spec.nfs, example_pcap)
    assert counters["dropped_by_nf"] == ports.count(53) + ports.count(443)
    assert len(spec.nfs[3].seen) == len(ports) - counters["dropped_by_nf"]


def test_group_merge_all_when_every_member_drops(run, example_pcap):
    class Dropper(mbx.NF):
        def __init__(self, name, port):
            super().__init__(name, group="g")
            self.group_merge = "all"
            self.port = port
            self.sub(mbx.PKT, self.on_pkt)

        def on_pkt(self, ev):
            if ev.dport == self.port:
                ev.drop()

    counters, out = run([Dropper("a", 53), Dropper("b", 53)], example_pcap)
    assert counters["dropped_by_nf"] > 0
    for _, buf in out:
        ip = dpkt.ethernet.Ethernet(buf).data
        if isinstance(ip, dpkt.ip.IP | dpkt.ip6.IP6) and hasattr(ip.data, "dport"):
            assert ip.data.dport != 53
    mixed = Dropper("m", 53)
    mixed.group_merge = "any"
    with pytest.raises(mbx.SubscriptionError, match="parallel group 'g': its NFs must share"):
        run([Dropper("a2", 53), mixed], example_pcap)


def test_a_subscription_the_network_layer_cannot_feed_says_the_stack_was_set():
    # DATA_RDY is the TCP Monitor's: with the stack set to the Network Layer the
    # refusal says so; a type no μStack publishes gets no such hint.
    reader = mbx.NF("reader")
    reader.sub(mbx.DATA_RDY, lambda ev: None)
    with pytest.raises(AppError, match=r"DATA_RDY, which nothing.*the stack is set to "
                                       r"the Network Layer: run with --stack auto or tcp"):
        check("app", "app", "network", {}, [reader])
    assert check("app", "app", "auto", {}, [reader]).stack == "tcp"
    lonely = mbx.NF("lonely")
    lonely.sub(mbx.register_event_type("TEST_CTL_LONELY"), lambda ev: None)
    with pytest.raises(AppError, match="nothing in the application publishes") as err:
        check("app", "app", "network", {}, [lonely])
    assert "stack is set" not in str(err.value)


def test_load_app_refuses_options_for_an_application_file(tmp_path):
    # From Python there is no --set to blame: the error says what to do instead.
    from mbx.runtime import load_app

    app = write(tmp_path, "one.toml", '[[nf]]\nuse = "l2fwd"\n')
    with pytest.raises(mbx.AppError, match=r"sets its NFs' options itself") as err:
        load_app(str(app), {"l2fwd": {"x": 1}})
    assert "--set" not in str(err.value)
    assert [nf.name for nf in load_app(str(app))] == ["l2fwd"]


def test_mbx_check_prints_the_graph(tmp_path):
    import mbx as pkg

    ids = str(pkg.__file__).replace("__init__.py", "examples/ids.toml")
    # The IDS's Logger writes ids-alerts.jsonl when it runs; a check must leave a
    # log already there as it was, and create none.
    kept = tmp_path / "ids-alerts.jsonl"
    kept.write_text('{"type":"IDS_ALERT"}\n')
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "check", ids], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert kept.read_text() == '{"type":"IDS_ALERT"}\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ids-alerts.jsonl"]
    assert "NF dpi" in r.stdout and "<- DPI_DETECT" in r.stdout and "from NF dpi" in r.stdout
    bad = write(tmp_path, "bad.toml", '[[nf]]\nuse = "logger"\noptions = { types = "IDS_ALERT" }\n')
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "check", bad], capture_output=True,
                       text=True, timeout=120, cwd=tmp_path)
    assert r.returncode == 2
    assert "NF logger subscribes to IDS_ALERT" in r.stderr or "unknown event type" in r.stderr


VOTES_FILE = '''
def majority(dropped):
    return len(dropped) >= 2

def two(a, b):
    return True

THRESHOLD = 2
'''


def _voting_app(tmp_path, merge, members=3):
    nf_file = write(tmp_path, "counter.py", NF_FILE)
    write(tmp_path, "votes.py", VOTES_FILE)
    write(tmp_path, "broken.py", "import no_such_module_here\n")
    ports = [53, 53, 443]
    body = "".join(f"""
        [[nf]]
        use = "{nf_file}"
        options = {{ name = "m{i}", drop_port = {ports[i]} }}
        group = "g"
        """ for i in range(members))
    return write(tmp_path, "app.toml", body + f"""
        [[nf]]
        use = "{nf_file}"
        options = {{ name = "after" }}
        [groups.g]
        merge = "{merge}"
        """)


def test_group_merge_function_from_a_file(run, tmp_path, example_pcap):
    spec = load_app_file(_voting_app(tmp_path, "votes.py:majority"))
    graph = spec.graph()
    # named as handler errors name their code: by the file's name, not its path
    assert "parallel group g, merge majority (votes.py, line 2)" in graph, graph
    counters, _ = run(spec.nfs, example_pcap)
    m0, _, _, after = spec.nfs
    ports = [d for _, d in m0.seen]
    # 53: two members of three dropped it; 443: one only
    assert counters["dropped_by_nf"] == ports.count(53) > 0
    assert [d for _, d in after.seen].count(443) == ports.count(443) > 0
    # module:function resolves the same way; mbx check prints it in the graph
    app = _voting_app(tmp_path, "mbx.examples.votes:majority")
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "check", app], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert re.search(r"NF m1 \(parallel group g, merge majority \(votes\.py, line \d+\)",
                     r.stdout), r.stdout


@pytest.mark.parametrize("merge, members, message", [
    ("votes.py:nosuch", 3, "votes.py defines no nosuch"),
    ("votes.py:THRESHOLD", 3, "2 is not callable"),
    ("votes.py:two", 3, "two (" ),
    ("votes.py:majority", 1, "a merge function needs two or more members (NF m0 is alone)"),
    ("broken.py:f", 3, "broken.py, line 1: ModuleNotFoundError"),
    ("nosuch.py:f", 3, "nosuch.py: no such file"),
    ("no_such_pkg_xyz:f", 3, "ModuleNotFoundError"),
    ("majority", 3, "merge = 'majority': use \"any\""),
])
def test_group_merge_function_refusals(tmp_path, merge, members, message):
    app = _voting_app(tmp_path, merge, members)
    with pytest.raises(AppError) as info:
        load_app_file(app)
    text = str(info.value)
    assert message in text
    assert "app.toml:" in text and "parallel group 'g'" in text
    if merge == "votes.py:two":
        assert re.search(r"two \(votes\.py, line \d+\) must take one argument", text), text


def test_group_merge_function_refused_on_the_bus(run, example_pcap):
    def nfs(merge, n=2):
        out = [mbx.NF(f"n{i}", group="g") for i in range(n)]
        for nf in out:
            nf.sub(mbx.PKT, lambda ev: None)
            nf.group_merge = merge
        return out

    with pytest.raises(mbx.SubscriptionError, match="parallel group 'g': merge: 3 is not"):
        run(nfs(3), example_pcap)
    with pytest.raises(mbx.SubscriptionError, match="must take one argument"):
        run(nfs(lambda: True), example_pcap)
    with pytest.raises(mbx.SubscriptionError, match="needs two or more members"):
        run(nfs(len, 1), example_pcap)
    a, b = nfs(len)
    b.group_merge = lambda dropped: True        # another function: not one merge
    with pytest.raises(mbx.SubscriptionError, match="must share one merge"):
        run([a, b], example_pcap)


def test_group_member_subscribing_to_its_mate_refused(tmp_path):
    # ids.py's two NFs: ids subscribes to DPI_DETECT, which dpi publishes
    app = write(tmp_path, "app.toml", f"""
        [[nf]]
        use = "{IDS}"
        name = "dpi"
        group = "g"
        [[nf]]
        use = "{IDS}"
        name = "ids"
        group = "g"
        """)
    with pytest.raises(AppError) as info:
        load_app_file(app)
    text = str(info.value)
    assert "app.toml:6: NF ids subscribes to DPI_DETECT, which NF dpi of its " \
           "parallel group 'g' publishes (its port DPI_DETECT)" in text
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "check", app], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "NF ids subscribes to DPI_DETECT" in r.stderr


LOOP_NFS = '''
import mbx

X = mbx.register_event_type("LOOP_X", fields=[("v", "u16")])
Y = mbx.register_event_type("LOOP_Y", fields=[("v", "u16")])


class Forward(mbx.NF):
    # takes one type and always publishes the other
    def __init__(self, name, takes, gives, start=False):
        super().__init__(name)
        self.port = self.pub(gives)
        self.gives = gives
        self.sub(takes, self.on)
        if start:
            self.sub(mbx.FLOW_START, self.on)

    def on(self, ev):
        self.publish(self.port, self.new_msg(self.gives))


def a():
    return Forward("a", X, Y)


def b():
    return Forward("b", Y, X, start=True)


def c():
    return Forward("c", mbx.FLOW_START, X)
'''


def test_a_publication_loop_is_warned_of_and_named_when_it_fills_event_memory(
        tmp_path, example_pcap):
    # a takes LOOP_X and publishes LOOP_Y, b (after it) the other way round: inline,
    # one flow's events went round until Event Memory filled, and the error said
    # only to raise msg_capacity, which cannot help.
    (tmp_path / "loop.py").write_text(LOOP_NFS)
    app = tmp_path / "loop.toml"
    app.write_text('[[nf]]\nuse = "loop:a"\n[[nf]]\nuse = "loop:b"\n')

    def mbx_cmd(*args):
        return subprocess.run([sys.executable, "-m", "mbx.cli", *args], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    loop = "NF a -> NF b (LOOP_Y) -> NF a (LOOP_X)"
    r = mbx_cmd("check", str(app))
    assert r.returncode == 0, r.stderr
    assert f"warning: NFs publish to each other in a loop: {loop}" in r.stdout
    r = mbx_cmd("run", str(app), "--in", f"pcap:{example_pcap}")
    assert r.returncode == 2
    assert f"mbx: warning: NFs publish to each other in a loop: {loop}" in r.stderr
    assert "raise msg_capacity, unless NFs publish to each other in a loop" in r.stderr
    # a chain without the loop: no warning
    app.write_text('[[nf]]\nuse = "loop:c"\n[[nf]]\nuse = "loop:a"\n')
    r = mbx_cmd("check", str(app))
    assert r.returncode == 0 and "warning" not in r.stdout + r.stderr


def test_a_group_of_one_nf_is_warned_of_as_a_likely_typo(tmp_path, example_pcap):
    # "inpsect" for "inspect": the NF ran ungrouped and nothing said so
    app = tmp_path / "g.toml"
    entry = '[[nf]]\nuse = "logger"\nname = "{}"\ngroup = "{}"\noptions = {{ path = "{}" }}\n'
    app.write_text(entry.format("a", "inspect", tmp_path / "a.jsonl")
                   + entry.format("b", "inspect", tmp_path / "b.jsonl")
                   + entry.format("c", "inpsect", tmp_path / "c.jsonl"))
    warning = "parallel group(s) of one NF: 'inpsect' (NF c)"
    assert warning in load_app_file(str(app)).graph()
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "run", str(app), "--in",
                        f"pcap:{example_pcap}", "-q"], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0 and f"mbx: warning: {warning}" in r.stderr
    app.write_text(entry.format("a", "inspect", tmp_path / "a.jsonl")
                   + entry.format("b", "inspect", tmp_path / "b.jsonl"))
    assert "warning" not in load_app_file(str(app)).graph()


@pytest.mark.parametrize("name", ["my.group", "gé"])
def test_a_group_named_with_a_dot_keeps_its_line_in_errors(tmp_path, name):
    # [groups."my.group"] was looked for as [groups.my.group], never found (and
    # then "gé" as "g\u00e9")
    app = tmp_path / "g.toml"
    app.write_text(f'[[nf]]\nuse = "flow_stats"\ngroup = "{name}"\n[[nf]]\n'
                   f'use = "logger"\ngroup = "{name}"\n[groups."{name}"]\n'
                   'merge = "bogus"\n', encoding="utf-8")
    with pytest.raises(AppError, match=f"^{app}:8: parallel group '{name}': "
                                       "merge = 'bogus'"):
        load_app_file(str(app))


def test_mbx_check_refuses_a_failure_policy_that_is_none(tmp_path):
    # a run refused it, and mbx check printed the graph and exited 0
    nf = tmp_path / "badfail.py"
    nf.write_text('import mbx\nnf = mbx.NF("badfail")\nnf.failure = "opn"\n'
                  'nf.sub(mbx.PKT, lambda ev: None)\n')
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "check", str(nf)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "NF badfail: failure must be 'open' or 'closed', not 'opn'" in r.stderr


def test_two_nfs_writing_one_file_are_refused_before_either_opens_it(tmp_path,
                                                                    example_pcap):
    # Refused only at start(), once the first Logger had truncated the file, and
    # mbx check said nothing.
    app = write(tmp_path, "two.toml", """
        [[nf]]
        use = "logger"
        name = "la"
        options = { path = "same.jsonl", types = "FLOW/START" }
        [[nf]]
        use = "logger"
        name = "lb"
        options = { path = "./same.jsonl", types = "FLOW/END" }
        """)
    kept = tmp_path / "same.jsonl"
    kept.write_text("keep\n")
    want = (f"{app}:6: NF lb: './same.jsonl' is written by NF la (line 2) too; "
            "two writers would interleave their bytes")
    for cmd in (["check", app], ["run", app, "--in", f"pcap:{example_pcap}", "-q"]):
        r = subprocess.run([sys.executable, "-m", "mbx.cli", *cmd], capture_output=True,
                           text=True, timeout=120, cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert want in r.stderr
        assert kept.read_text() == "keep\n"
    # an App made in code is refused before its first NF starts, too
    from mbx.nfs.logger import make

    (tmp_path / "x").mkdir()
    nfs = [make("la", str(kept)), make("lb", str(tmp_path / "x" / ".." / "same.jsonl"))]
    with pytest.raises(AppError, match="NF lb: .* is written by NF la too"):
        App(nfs).run(open_input(f"pcap:{example_pcap}"))
    assert kept.read_text() == "keep\n"
    # standard output is shared in whole lines, as it always was
    assert check("t", "t", "auto", {}, [make("la", "-"), make("lb", "/dev/stdout")])


SHARED_FILE = '''
import mbx
seen = {"n": 0}         # the module's state, which both its NFs use

class A(mbx.NF):
    def __init__(self):
        super().__init__("a")
        self.sub(mbx.PKT, self.on)

    def on(self, ev):
        seen["n"] += 1

class B(mbx.NF):
    def __init__(self):
        super().__init__("b")
        self.sub(mbx.PKT, self.on)

    def on(self, ev):
        self.saw = seen["n"]

nfs = [A(), B()]
'''


@pytest.mark.parametrize("uses", [('"shared.py:a"', '"shared.py:b"'),
                                  ('"shared.py"\nname = "a"', '"shared.py"\nname = "b"')])
def test_the_nfs_of_one_file_share_one_load_of_it(tmp_path, example_pcap, uses):
    # use = "FILE.py:NAME" loaded the file once per entry: B read a module A never
    # counted in (0), where the chain shared.py:a+shared.py:b shared it
    write(tmp_path, "shared.py", SHARED_FILE)
    app = write(tmp_path, "sh.toml", f"[[nf]]\nuse = {uses[0]}\n[[nf]]\nuse = {uses[1]}\n")
    a, b = load_app_file(app).nfs
    assert (a.name, b.name) == ("a", "b")
    assert type(a).on.__globals__ is type(b).on.__globals__
    counters, _ = run_app([a, b], example_pcap)
    assert b.saw == counters["events"]["PKT"]["published"] > 0
    bad = write(tmp_path, "bad.toml", '[[nf]]\nuse = "shared.py:c"\n')
    with pytest.raises(AppError, match=r'bad.toml:2: \[\[nf\]\] #1 "shared.py:c": .*shared.py '
                                       r"defines no NF named 'c' \(it defines a, b\)"):
        load_app_file(bad)


TYPED_FILE = '''
import mbx

def make(limit: int = 5, verbose=False, ratio: float = 1.0, label: str = "x",
         extra=None):
    nf = mbx.NF("typed")
    nf.sub(mbx.PKT, lambda ev: None)
    nf.given = (limit, verbose, ratio, label, extra)
    return nf
'''


@pytest.mark.parametrize("options, message", [
    ("limit = 7.5", "option limit=7.5: expected an integer"),
    ("limit = true", "option limit=True: expected an integer"),
    ("limit = \"7\"", None),        # text, as --set gives it, is made the int
    ("verbose = 1", "option verbose=1: expected true or false"),
    ("ratio = false", "option ratio=False: expected a number"),
    ("label = 5", "option label=5: expected a string"),
])
def test_application_file_options_are_held_to_the_type_make_declares(tmp_path, options,
                                                                     message):
    # TOML values were passed to make() unchecked: limit 7.5 ran as 7.5 where
    # --set typed.limit=7.5 was refused, and path = 5 reached the Logger's open()
    write(tmp_path, "typed.py", TYPED_FILE)
    app = write(tmp_path, "app.toml", f"""
        [[nf]]
        use = "typed.py"
        options = {{ {options} }}
        """)
    if message is None:
        assert load_app_file(app).nfs[0].given[0] == 7
        return
    with pytest.raises(AppError) as info:
        load_app_file(app)
    assert str(info.value).startswith(f'{app}:4: [[nf]] #1 "typed.py": NF file ')
    assert str(info.value).endswith(f"typed.py: make(): {message}")


def test_application_file_options_of_the_right_type_pass(tmp_path):
    write(tmp_path, "typed.py", TYPED_FILE)
    app = write(tmp_path, "app.toml", """
        [[nf]]
        use = "typed.py"
        options = { limit = 7, verbose = true, ratio = 2, label = "y", extra = [1, 2] }
        """)
    given = load_app_file(app).nfs[0].given
    assert given == (7, True, 2.0, "y", [1, 2]) and isinstance(given[2], float)
    # the Logger's path: named as an option, not a TypeError from open()
    bad = write(tmp_path, "log.toml", '[[nf]]\nuse = "logger"\noptions = { path = 5 }\n')
    with pytest.raises(AppError, match=r'log.toml:3: \[\[nf\]\] #1 "logger": option path=5: '
                                       r"expected a string$"):
        load_app_file(bad)


@pytest.mark.parametrize("body, want", [
    # an unknown key, at its line, in the second [[nf]] table, named by its use
    ('[[nf]]\nuse = "flow_stats"\n[[nf]]\nuse = "l2fwd"\ncolour = "blue"\n',
     '5: [[nf]] #2 "l2fwd": unknown key(s) colour'),
    # a key of the wrong type, the table named by its name
    ('[[nf]]\nuse = "l2fwd"\n\n[[nf]]\nname = "log"\nuse = "logger"\ngroup = 5\n',
     '7: [[nf]] #2 "log": group = 5: expected a string'),
    # an unknown NF, at the line of its use
    ('[app]\nname = "ids"\n[[nf]]\nuse = "flow_stats"\n[[nf]]\n# the IDS\nuse = "idz"\n',
     '7: [[nf]] #2 "idz": unknown NF \'idz\''),
    # an option of the wrong type: in an inline table, a [nf.options] table, or as a
    # dotted key, at the line of the option
    ('[[nf]]\nuse = "l2fwd"\n[[nf]]\nuse = "logger"\noptions = { path = 5 }\n',
     '5: [[nf]] #2 "logger": option path=5: expected a string'),
    ('[[nf]]\nuse = "logger"\n[nf.options]\ntypes = "PKT"\n"path" = 5\n[[nf]]\n'
     'use = "l2fwd"\n',
     '5: [[nf]] #1 "logger": option path=5: expected a string'),
    ('[[nf]]\nuse = "logger"\noptions . path = 5\n',
     '3: [[nf]] #1 "logger": option path=5: expected a string'),
    # an option the NF does not take
    ('[[nf]]\nuse = "logger"\nname = "log"\n[nf.options]\ntypes = "PKT"\n'
     'colour = "blue"\n',
     '6: [[nf]] #1 "log": unknown option(s) colour; it takes '),
    # text in a multi-line string that looks like tables and keys is not taken for
    # them: the second real [[nf]] is #2, at its own line
    ('[app]\nname = """\n[[nf]]\nuse = "logger"\noptions.path = 5\n"""\n[[nf]]\n'
     'use = "l2fwd"\n[[nf]]\nuse = "logger"\noptions.path = 7\n',
     '11: [[nf]] #2 "logger": option path=7: expected a string'),
    # TOML's lines end at \n alone: a U+2028 in a comment or a U+0085 in a string
    # breaks none (nor does a header-like text after one start a table)
    ('# see\u2028[[nf]]\n[[nf]]\nuse = "logger"\n[[nf]]\nname = "a\u0085b"\n'
     'use = "l2fwd"\ncolour = 1\n',
     '7: [[nf]] #2 "a\u0085b": unknown key(s) colour'),
    # ... nor in a multi-line array (["x"] is no [x] header)
    ('[[nf]]\nuse = "typed.py"\noptions.extra = [\n  1,\n  ["x"]\n]\n'
     'options.limit = 7.5\n',
     '7: [[nf]] #1 "typed.py": NF file '),
])
def test_errors_say_file_line_and_which_nf_table_as_a_compiler_does(tmp_path, body, want):
    write(tmp_path, "typed.py", TYPED_FILE)
    app = write(tmp_path, "app.toml", body)
    with pytest.raises(AppError) as info:
        load_app_file(app)
    assert str(info.value).startswith(f"{app}:{want}"), str(info.value)


def test_an_option_whose_line_the_text_does_not_show_has_none(tmp_path):
    # [[nf]] tables as an array of inline tables over several lines: the option's
    # line is not the array's first, so none is given, not a wrong one
    app = write(tmp_path, "app.toml", 'nf = [\n  { use = "l2fwd" },\n'
                                      '  { use = "logger", options = { path = 5 } },\n]\n')
    with pytest.raises(AppError) as info:
        load_app_file(app)
    assert str(info.value) == (f'{app}: [[nf]] #2 "logger": option path=5: expected a '
                               'string')
