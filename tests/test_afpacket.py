"""AF_PACKET ports on a real test bed: network namespaces joined by veth pairs.

    client ns            mb ns (no addresses)             server ns
    198.18.1.1  c0 ---- mc  [BridgePorts + App]  ms ---- s0  198.18.1.2

The middlebox namespace has no addresses and an nftables ingress rule that drops
everything its kernel would receive on mc/ms: packet sockets are served before that
hook, so only the bridge moves frames between the sides.  Offloads are off on every
veth: a user-space middlebox must see wire-sized frames whose checksums are final,
not 64 KiB GSO/GRO super-frames or frames with a partial checksum left for a NIC
that does not exist; the one exception is the test of the port's ``offloads=True``,
which takes exactly those.  IPv6 is off so router/multicast chatter does not muddy counts.

The namespace tests need root, ``ip netns``, ethtool, nft, curl and tcpdump; without
them they are skipped with the reason (and fail instead under ``CI=true``, where the
CI image is expected to provide them).  The parts that run inside a namespace are
this file run as a script (``python test_afpacket.py bridge|fanout ...``).
"""
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest
from mbxtest import skip_or_fail_in_ci

from mbx.errors import PortError
from mbx.ports import open_input, open_output, open_ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
from benchmarks.testbed import netns  # noqa: E402  (the shared namespace plumbing)

PREFIX = "mxa"
NS_RE = re.compile(rf"^{PREFIX}(\d+)-[cms]$")
NS_C, NS_M, NS_S = (f"{PREFIX}{os.getpid()}-{role}" for role in "cms")
CLIENT_IP, SERVER_IP = "198.18.1.1", "198.18.1.2"
CLIENT_IP6, SERVER_IP6 = "2001:db8:1::1", "2001:db8:1::2"    # documentation prefix
HERE = os.path.abspath(__file__)
RINGS = ("v2", "v3")            # AfPacketPort ring formats; every live test runs both


# ---------------------------------------------------------------- helpers


def _sh(*cmd, check=True, timeout=20, **kw):
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True,
                          text=True, **kw)


_in_ns = netns.in_ns


def _testbed_missing():
    """Why the namespace tests cannot run here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces and AF_PACKET sockets)"
    for tool in ("ip", "ethtool", "nft", "curl", "tcpdump"):
        if shutil.which(tool) is None:
            return f"needs {tool} (apt-get install iproute2 ethtool nftables curl tcpdump)"
    return netns.probe(PREFIX)


def _require_testbed():
    reason = _testbed_missing()
    if reason:
        skip_or_fail_in_ci(reason, what="the AF_PACKET tests")


def _mac(ns, dev):
    return _sh(*_in_ns(ns, "cat", f"/sys/class/net/{dev}/address")).stdout.strip()


def _quiet_veth(ns, dev):
    _sh("ip", "-n", ns, "link", "set", dev, "up")
    netns.offloads_off(ns, dev, check=False)
    _sh(*_in_ns(ns, "sysctl", "-qw", f"net.ipv6.conf.{dev}.disable_ipv6=1"), check=False)


class Procs:
    """Processes started by a test, stopped by their own PID whatever happens."""

    def __init__(self):
        self.procs = []

    def start(self, cmd, **kw):
        p = subprocess.Popen(cmd, text=True, **kw)
        self.procs.append(p)
        return p

    def stop_all(self):
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(5)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(5)


@pytest.fixture
def testbed():
    """client -- mb -- server namespaces; removed (with their veths) afterwards."""
    _require_testbed()
    netns.reap_stale(NS_RE)     # left by a run that was killed
    made = []
    procs = Procs()
    try:
        for ns in (NS_C, NS_M, NS_S):
            _sh("ip", "netns", "add", ns)
            made.append(ns)
            _sh(*_in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"),
                check=False)
            _sh("ip", "-n", ns, "link", "set", "lo", "up")
        _sh("ip", "link", "add", "c0", "netns", NS_C, "type", "veth", "peer", "name", "mc",
            "netns", NS_M)
        _sh("ip", "link", "add", "s0", "netns", NS_S, "type", "veth", "peer", "name", "ms",
            "netns", NS_M)
        for ns, dev in ((NS_C, "c0"), (NS_M, "mc"), (NS_M, "ms"), (NS_S, "s0")):
            _quiet_veth(ns, dev)
        _sh("ip", "-n", NS_C, "addr", "add", f"{CLIENT_IP}/24", "dev", "c0")
        _sh("ip", "-n", NS_S, "addr", "add", f"{SERVER_IP}/24", "dev", "s0")
        # Static neighbours keep ARP off the measured path (ARP still crosses the
        # bridge when asked: it forwards every frame).
        _sh("ip", "-n", NS_C, "neigh", "replace", SERVER_IP, "lladdr", _mac(NS_S, "s0"),
            "dev", "c0", "nud", "permanent")
        _sh("ip", "-n", NS_S, "neigh", "replace", CLIENT_IP, "lladdr", _mac(NS_C, "c0"),
            "dev", "s0", "nud", "permanent")
        rules = ("table netdev mbx {\n"
                 " chain in_mc { type filter hook ingress device mc priority 0; policy drop; }\n"
                 " chain in_ms { type filter hook ingress device ms priority 0; policy drop; }\n"
                 "}\n")
        _sh(*_in_ns(NS_M, "nft", "-f", "-"), input=rules)
        yield procs
    finally:
        procs.stop_all()
        for ns in made:
            netns.delete_ns(ns)


def _ipv6_on_the_end_hosts():
    """IPv6 on the client and the server only (lo too: the server's own check goes
    there), with static neighbours both ways: no NDP to wait for."""
    for ns, dev, addr in ((NS_C, "c0", CLIENT_IP6), (NS_S, "s0", SERVER_IP6)):
        for d in ("lo", dev):
            _sh(*_in_ns(ns, "sysctl", "-qw", f"net.ipv6.conf.{d}.disable_ipv6=0"))
        _sh("ip", "-n", ns, "-6", "addr", "add", f"{addr}/64", "dev", dev, "nodad")
    _sh("ip", "-n", NS_C, "neigh", "replace", SERVER_IP6, "lladdr", _mac(NS_S, "s0"),
        "dev", "c0", "nud", "permanent")
    _sh("ip", "-n", NS_S, "neigh", "replace", CLIENT_IP6, "lladdr", _mac(NS_C, "c0"),
        "dev", "s0", "nud", "permanent")


def _start_bridge(procs, *extra):
    p = procs.start(_in_ns(NS_M, sys.executable, HERE, "bridge", "mc", "ms", *extra),
                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    line = p.stdout.readline()
    if line.strip() != "ready":
        p.kill()
        raise AssertionError(f"bridge did not start: {line}{p.stderr.read()}")
    return p


def _stop_bridge(p):
    # The helper stops the bridge at the end of its stdin.
    out, err = p.communicate(input="", timeout=30)
    assert p.returncode == 0, err
    return json.loads(out.strip().splitlines()[-1])


def _serve_blob(procs, tmp_path, bind=SERVER_IP):
    """The server: a 3 MiB random file over HTTP at bind:8080/blob.bin."""
    www = tmp_path / "www"
    www.mkdir()
    blob = os.urandom(3 << 20)
    (www / "blob.bin").write_bytes(blob)
    procs.start(_in_ns(NS_S, sys.executable, "-m", "http.server", "8080", "--bind",
                       bind, "--directory", str(www)),
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return blob


def _wait_started(proc, directory, n=1):
    """Until ``n`` NF start()s of the run ``proc`` have each written a ``started``
    marker (``started``, or ``started-PID`` per stack process) in ``directory``: its
    stacks are reading.  Fails with the process's error if it died first, or after
    30 s."""
    deadline = time.monotonic() + 30
    while len(list(directory.glob("started*"))) < n:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, f"{n} stack(s) of the run did not start"
        time.sleep(0.05)


def _fetch_blob():
    """The client downloads the server's blob through the bridge (the server may take
    a moment to listen), to nowhere: the traffic is what counts."""
    for _ in range(50):
        r = subprocess.run(_in_ns(NS_C, "curl", "-sS", "--max-time", "20", "-o",
                                  "/dev/null", f"http://{SERVER_IP}:8080/blob.bin"),
                           capture_output=True, timeout=30)
        if r.returncode == 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"curl failed: {r.stderr}")


def _ping(count=5):
    """ICMP echo from the client (a raw socket: no dependency on iputils): how many
    were answered."""
    return len(_ping_rtts(count))


def _ping_rtts(count=5, gap=0.0):
    """ICMP echo from the client, ``gap`` seconds apart: the round-trip time in
    seconds of each echo answered (within 2 s)."""
    code = f"""
import json, os, socket, struct, time
def csum(b):
    s = sum(struct.unpack('!%dH' % (len(b) // 2), b))
    s = (s >> 16) + (s & 0xffff); s += s >> 16
    return ~s & 0xffff
s = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
rtts = []
for seq in range({count}):
    time.sleep({gap})
    body = struct.pack('!BBHHH', 8, 0, 0, 0x4d42, seq) + b'mbx-ping' * 4
    body = body[:2] + struct.pack('!H', csum(body)) + body[4:]
    t = time.monotonic()
    s.sendto(body, ('{SERVER_IP}', 0))
    while time.monotonic() - t < 2:
        s.settimeout(max(2 - (time.monotonic() - t), 0.001))
        try:
            data = s.recv(2048)
        except socket.timeout:
            break
        ihl = (data[0] & 15) * 4
        typ, _, _, ident, rseq = struct.unpack('!BBHHH', data[ihl:ihl + 8])
        if typ == 0 and ident == 0x4d42 and rseq == seq:
            rtts.append(time.monotonic() - t)
            break
print(json.dumps(rtts))
"""
    r = _sh(*_in_ns(NS_C, sys.executable, "-c", code), timeout=30 + count * (2 + gap))
    return json.loads(r.stdout)


# ---------------------------------------------------------------- no test bed needed


def test_missing_interface_names_it():
    with pytest.raises(PortError, match=r"afpacket:mbx-nope0: no such interface"):
        open_input("afpacket:mbx-nope0")


def test_spec_errors():
    for spec, msg in [("afpacket:", "names no interface"),
                      ("afpacket:a,b,c", "expected afpacket:IF"),
                      ("afpacket:a?colour=red", "unknown option 'colour'"),
                      ("afpacket:a?block_count=x", "bad value 'x'"),
                      ("afpacket:a?promisc=maybe", "bad value 'maybe' for promisc"),
                      ("afpacket:a?offloads=2", "bad value '2' for offloads"),
                      ("afpacket:a?duration=-3", "bad value '-3' for duration"),
                      # past what the C fields hold: named, not an OverflowError
                      ("afpacket:a?block_count=-1", "bad value '-1' for block_count"),
                      ("afpacket:a?retire_ms=99999999999",
                       "bad value '99999999999' for retire_ms")]:
        with pytest.raises(PortError, match=msg):
            open_input(spec)
    with pytest.raises(PortError, match="two different interfaces"):
        open_input("afpacket:lo,lo")
    # whole numbers: decimal, leading zeros and all, or 0x hexadecimal, in every option
    from mbx.ports import check_spec
    check_spec("afpacket:lo?timeout_ms=05&block_count=0x10&fanout=07")
    for bad in ("timeout_ms=1_0", "timeout_ms=-3", "fanout=7x"):
        with pytest.raises(PortError, match="bad value"):
            open_input(f"afpacket:lo?{bad}")
    # Linux ties a fanout group to one interface: the server side's join would fail
    # with a message blaming another program
    with pytest.raises(PortError, match=r"the two sides need two groups"):
        open_input("afpacket:a,b?fanout=7,7")
    with pytest.raises(PortError, match=r"afpacket:lo\?ring=v1'?: ring 'v1' is not one "
                                        r"of v2, v3"):
        open_input("afpacket:lo?ring=v1")
    with pytest.raises(PortError, match=r"offloads: super-frames of up to 64 KiB must fit "
                                        r"whole, but frame_size 2048 is below 65792"):
        open_input("afpacket:lo?offloads=1&frame_size=2048")
    with pytest.raises(PortError, match=r"but block_size 65536 is below 65792"):
        open_input("afpacket:lo?offloads=1&ring=v3&block_size=65536")


def test_open_ports_pcap(tmp_path, example_pcap):
    inp, out = open_ports("pcap:" + example_pcap, f"pcap:{tmp_path / 'o.pcap'}")
    with inp, out:
        assert inp is not out
    inp, out = open_ports("pcap:" + example_pcap)
    with inp:
        assert out is None


def test_without_cap_net_raw_is_a_port_error():
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        skip_or_fail_in_ci("needs root and setpriv to drop CAP_NET_RAW")
    code = ("from mbx._afpacket import AfPacketPort\n"
            "try:\n    AfPacketPort('lo')\nexcept Exception as e:\n    print(type(e).__name__, e)")
    r = _sh("setpriv", "--bounding-set", "-net_raw", "--inh-caps", "-net_raw",
            sys.executable, "-c", code, timeout=120)
    assert "PortError afpacket:lo: socket(AF_PACKET, SOCK_RAW)" in r.stdout
    assert "Operation not permitted" in r.stdout and "CAP_NET_RAW" in r.stdout


def test_loopback_port_attributes_and_close():
    if os.geteuid() != 0:
        skip_or_fail_in_ci("needs root (CAP_NET_RAW) for an AF_PACKET socket")
    from mbx._afpacket import AfPacketPort
    p = AfPacketPort("lo", block_size=1 << 16, block_count=4, timeout_ms=1,
                     promisc=False)
    assert p.iface == "lo" and p.ifindex > 0 and p.mtu >= 1500
    assert p.name == "afpacket:lo"
    assert set(p.counters) >= {"rx_pkts", "rx_dropped", "kernel_packets"}
    p.close()
    p.close()
    from mbx._packet import Batch
    assert p.receive(Batch(4)) == -1           # closed: end of input
    with pytest.raises(PortError, match="closed"):
        _send_one(p)
    q = open_output("afpacket:lo")
    assert not q.rx and q.tx
    q.close()


def test_a_failed_live_run_counts_what_it_left_in_the_ring(testbed, tmp_path):
    # A run ended by an NF's error reports its counters; the frames still in the
    # ring were counted only as the port closed, after the report was made.
    procs = testbed
    nf = tmp_path / "slow_fail.py"
    nf.write_text("import os, time\n"
                  "import mbx\n"
                  f"OUT = {str(tmp_path)!r}\n"
                  "class SlowFail(mbx.NF):\n"
                  "    def __init__(self):\n"
                  "        super().__init__('slow_fail')\n"
                  "        self.sub(mbx.PKT, self.on_pkt)\n"
                  "    def start(self):\n"
                  "        open(os.path.join(OUT, 'started'), 'w').close()\n"
                  "    def on_pkt(self, ev):\n"
                  "        time.sleep(0.5)         # the rest arrives meanwhile\n"
                  "        raise ValueError('gave up')\n"
                  "def make():\n"
                  "    return SlowFail()\n")
    os.chmod(tmp_path, 0o755)
    counters = tmp_path / "c.json"
    mbx = procs.start(_in_ns(NS_M, sys.executable, "-m", "mbx.cli", "run", str(nf),
                             "--in", "afpacket:mc?timeout_ms=5", "--duration", "60",
                             "--json", str(counters)),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    _wait_started(mbx, tmp_path)
    sent = int(_sh(*_in_ns(NS_C, sys.executable, HERE, "send", "c0", "ab")).stdout)
    out, err = mbx.communicate(timeout=60)
    assert mbx.returncode == 2 and "gave up" in err
    port = json.loads(counters.read_text())["ports"]["in"]
    assert port["rx_unread"] > 0
    assert port["rx_pkts"] + port["rx_unread"] == port["kernel_packets"] == sent
    assert "unread" in out


DIRECTIONS_NF = """
import os
import mbx
OUT = {out!r}
class Directions(mbx.NF):
    def __init__(self):
        super().__init__("directions")
        self.seen = {{"to_server": 0, "to_client": 0}}
        self.sub(mbx.PKT, self.on_pkt)
    def start(self):
        open(os.path.join(OUT, "started"), "w").close()
    def on_pkt(self, ev):
        if ev.dport == 8080:
            self.seen["to_server"] += 1
        elif ev.sport == 8080:
            self.seen["to_client"] += 1
    def report(self):
        return self.seen
def make():
    return Directions()
"""


def test_one_interface_is_monitored_both_ways(testbed, tmp_path):
    """afpacket:IF on the client's own interface sees what the client sends as well
    as what it receives, as tcpdump does (every socket used to ignore outgoing
    frames, right for a bridge, so a host's monitor saw half of each connection, and
    said nothing); ?outgoing=0 leaves the host's sends out."""
    _serve_blob(testbed, tmp_path)
    bridge = _start_bridge(testbed, "60", "v2")
    os.chmod(tmp_path, 0o755)
    seen = {}
    try:
        for spec in ("afpacket:c0", "afpacket:c0?outgoing=0"):
            run = tmp_path / spec.replace(":", "_").replace("?", "_").replace("=", "_")
            run.mkdir()
            os.chmod(run, 0o755)
            nf = run / "directions.py"
            nf.write_text(DIRECTIONS_NF.format(out=str(run)))
            counters = run / "c.json"
            mon = testbed.start(_in_ns(NS_C, sys.executable, "-m", "mbx.cli", "run", str(nf),
                                       "--in", spec, "--duration", "4", "-q", "--json",
                                       str(counters)),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
            _wait_started(mon, run)
            _fetch_blob()
            _, err = mon.communicate(timeout=60)
            assert mon.returncode == 0, err
            seen[spec] = json.loads(counters.read_text())["nfs"]["directions"]["report"]
    finally:
        _stop_bridge(bridge)
    both, inbound = seen["afpacket:c0"], seen["afpacket:c0?outgoing=0"]
    assert both["to_server"] > 0 and both["to_client"] > 1000, both
    assert inbound["to_server"] == 0 and inbound["to_client"] > 1000, inbound


def test_mbx_flows_on_a_live_interface_stops_on_a_signal_with_its_summary(testbed,
                                                                          tmp_path):
    """mbx flows on a live port had no signal handling: SIGTERM ended it with no
    output at all, and SIGINT did nothing to a background job (ignored by the shell).
    Both now end the capture and write the summary of what came."""
    _serve_blob(testbed, tmp_path)
    bridge = _start_bridge(testbed, "60", "v2")
    os.chmod(tmp_path, 0o755)
    try:
        for sig in (signal.SIGTERM, signal.SIGINT):
            out = tmp_path / f"flows-{sig}.json"
            flows = testbed.start(
                _in_ns(NS_C, sys.executable, "-c",
                       "import signal, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
                       "from mbx.cli import main; sys.exit(main())",
                       "flows", "afpacket:c0", "--json", "-o", str(out)),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
            time.sleep(1.5)             # its socket is bound by then
            _fetch_blob()
            time.sleep(0.3)
            flows.send_signal(sig)
            _, err = flows.communicate(timeout=30)
            assert flows.returncode == 0, (sig, err)
            conns = json.loads(out.read_text())["connections"]
            done = [c for c in conns.values() if c["s2c_len"] > 3 << 20]   # + headers
            assert done and done[0]["handshake"], conns
    finally:
        _stop_bridge(bridge)


def test_a_send_only_bridge_has_nothing_to_receive(testbed):
    # rx_burst on a bridge opened with rx=False polled sockets that never receive
    # and returned "nothing yet" forever; a send-only AfPacketPort says end of input.
    code = ("from mbx._afpacket import BridgePorts\n"
            "from mbx._packet import Batch\n"
            "b = BridgePorts('mc', 'ms', rx=False)\n"
            "print(b.receive(Batch(4)), b.client.receive(Batch(4)))\n"
            "b.close()\n")
    r = _sh(*_in_ns(NS_M, sys.executable, "-c", code), timeout=30, cwd=ROOT)
    assert r.stdout.split() == ["-1", "-1"], r.stderr


def test_a_bridge_side_that_fails_leaves_what_the_other_sent_counted(testbed):
    # The bridge's counters were brought up to its sides' only after a burst that
    # sent in full: when one side failed, what the other had sent of the same burst
    # was missing from the bridge's tx_pkts, from which the stack tells what went
    # out, and all of it counted as dropped_on_error.  The server side sends first;
    # the client side, closed, then fails.
    code = ("import json\n"
            "from mbx._afpacket import BridgePorts\n"
            "from mbx._packet import Batch\n"
            "from mbx.errors import PortError\n"
            "b = BridgePorts('mc', 'ms', rx=False)\n"
            "batch = Batch(8)\n"
            "for i in range(7):\n"
            "    batch.append(b'\\xff' * 60, port=i % 2)\n"
            "b.client.close()\n"
            "try:\n"
            "    b.send(batch)\n"
            "except PortError as e:\n"
            "    print(e)\n"
            "c = b.counters\n"
            "print(json.dumps([c['tx_pkts'], c['tx_bytes'], c['server']['tx_pkts'],\n"
            "                  c['client']['tx_pkts']]))\n"
            "b.close()\n")
    r = _sh(*_in_ns(NS_M, sys.executable, "-c", code), timeout=30, cwd=ROOT)
    error, counts = r.stdout.splitlines()
    assert "send on a closed port" in error, r.stdout + r.stderr
    assert json.loads(counts) == [4, 4 * 60, 4, 0]


def test_only_receiving_sockets_count_as_other_readers():
    # The warning about other packet sockets on a bridge's interfaces ("... receive
    # on IF") counted send-only sockets too, which get no frames.
    if os.geteuid() != 0:
        skip_or_fail_in_ci("needs root (CAP_NET_RAW) for an AF_PACKET socket")
    from mbx._afpacket import AfPacketPort
    from mbx.ports import _packet_sockets
    lo = {"lo": socket.if_nametoindex("lo")}
    before = _packet_sockets(lo, set()).get("lo", 0)
    with AfPacketPort("lo", rx=False):
        assert _packet_sockets(lo, set()).get("lo", 0) == before
    with AfPacketPort("lo", block_size=1 << 16, block_count=2, promisc=False, tx=False):
        assert _packet_sockets(lo, set()).get("lo", 0) == before + 1


@pytest.mark.parametrize("ring", RINGS)
def test_loopback_receive_each_ring(ring):
    # Frames sent on lo come back in as received frames: both ring formats deliver
    # them whole, in order, with their wire length; a frame longer than a V2 slot is
    # read whole from the socket's queue, where the kernel put it too (it was cut
    # short to the slot).
    if os.geteuid() != 0:
        skip_or_fail_in_ci("needs root (CAP_NET_RAW) for an AF_PACKET socket")
    from mbx._afpacket import AfPacketPort
    from mbx._packet import Batch
    frame_size = 512 if ring == "v2" else 2048
    rx = AfPacketPort("lo", ring=ring, block_size=1 << 16, block_count=4,
                      frame_size=frame_size, timeout_ms=1, promisc=False, tx=False,
                      retire_ms=1)
    tx = AfPacketPort("lo", rx=False)
    marker = os.urandom(6)
    sizes = [60, 300, 1000]
    with rx, tx:
        for i, n in enumerate(sizes):
            b = Batch(1)
            # an unused ethertype keeps the kernel's stack off these frames
            b.append(b"\x02" * 6 + marker + b"\x88\xb5" + bytes([i]) * (n - 14))
            assert tx.send(b) == 1
        got = []
        deadline = time.monotonic() + 5
        while len(got) < len(sizes) and time.monotonic() < deadline:
            batch = Batch(64)
            for j in range(max(rx.receive(batch), 0)):
                f = batch.frame(j)
                if f[6:12] == marker:
                    got.append(f)
        assert [f[14] for f in got] == [0, 1, 2]
        assert [len(f) for f in got] == sizes
        assert rx.rx_truncated == 0
        assert rx.rx_whole == (1 if ring == "v2" else 0)
        assert rx.ring_version == ring


def test_a_loopback_monitor_sees_each_frame_once():
    # A monitor of one interface takes the host's sends too (outgoing), but on a
    # loopback each frame sent also comes back received: `mbx flows afpacket:lo`
    # counted every segment twice (libpcap drops the outgoing copy there too).
    if os.geteuid() != 0:
        skip_or_fail_in_ci("needs root (CAP_NET_RAW) for an AF_PACKET socket")
    from mbx._afpacket import AfPacketPort
    from mbx._packet import Batch
    rx = AfPacketPort("lo", block_size=1 << 16, block_count=4, timeout_ms=1,
                      promisc=False, tx=False, outgoing=True)
    tx = AfPacketPort("lo", rx=False)
    marker = os.urandom(6)
    with rx, tx:
        assert not rx.outgoing
        for i in range(5):
            b = Batch(1)
            b.append(b"\x02" * 6 + marker + b"\x88\xb5" + bytes([i]) * 50)
            assert tx.send(b) == 1
        got = []
        quiet_until = time.monotonic() + 0.5     # then nothing more may come
        deadline = time.monotonic() + 5
        while time.monotonic() < min(deadline, quiet_until if len(got) >= 5 else deadline):
            batch = Batch(64)
            for j in range(max(rx.receive(batch), 0)):
                f = batch.frame(j)
                if f[6:12] == marker:
                    got.append(f[14])
        assert got == [0, 1, 2, 3, 4]


def _send_one(port):
    from mbx._packet import Batch
    b = Batch(1)
    b.append(b"\xff" * 60)
    return port.send(b)


# ---------------------------------------------------------------- the test bed


@pytest.mark.parametrize("ring", RINGS)
def test_bridge_ping_curl_counters_and_pcap_equivalence(testbed, tmp_path, ring):
    procs = testbed
    blob = _serve_blob(procs, tmp_path)
    # Without the bridge nothing crosses the middlebox.
    assert _ping(1) == 0
    # What the bridge receives, captured beside it (incoming frames only).
    cap = tmp_path / "mb.pcap"
    dump = procs.start(_in_ns(NS_M, "tcpdump", "-i", "any", "-Q", "in", "-nn",
                              "-B", "32768",
                              "-w", str(cap)),
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 10
    while time.time() < deadline and not cap.exists():
        time.sleep(0.05)
    time.sleep(0.5)

    bridge = _start_bridge(procs, "60", ring)
    try:
        assert _ping(5) == 5
        # The server may take a moment to listen.
        for _ in range(50):
            r = subprocess.run(_in_ns(NS_C, "curl", "-sS", "--max-time", "20", "-o", "-",
                                      f"http://{SERVER_IP}:8080/blob.bin"),
                               capture_output=True, timeout=30)
            if r.returncode == 0:
                break
            time.sleep(0.1)
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(blob).hexdigest()
        time.sleep(0.3)
    finally:
        result = _stop_bridge(bridge)
    time.sleep(1.5)                 # tcpdump's ring hands over its last block
    dump.send_signal(signal.SIGTERM)
    dump_err = dump.communicate(timeout=10)[1]
    assert re.search(r"^0 packets dropped by kernel", dump_err, re.M), dump_err

    live, ports = result["counters"], result["ports"]
    assert result["ring"] == [ring, ring]
    # The port counters agree with what the stack and the NF saw.
    assert ports["rx_pkts"] == live["packets"] == result["l2fwd"] > 2000
    assert ports["tx_pkts"] == live["sent"] == live["packets"]
    assert ports["rx_dropped"] == 0 and ports["tx_dropped"] == 0
    assert ports["client"]["rx_pkts"] + ports["server"]["rx_pkts"] == ports["rx_pkts"]
    # Each side sends what the other received.
    assert ports["client"]["tx_pkts"] == ports["server"]["rx_pkts"]
    assert ports["server"]["tx_pkts"] == ports["client"]["rx_pkts"]

    # The same application over the capture reaches the same counters.
    from mbx._pcap import PcapReader
    from mbx.nfs.flow_stats import FlowStats
    from mbx.nfs.l2fwd import L2Fwd
    from mbx.runtime import App
    with PcapReader(str(cap)) as r:
        replay = App([L2Fwd(), FlowStats()]).run(r, None)
    assert replay["packets"] == live["packets"]
    assert replay["bytes"] == live["bytes"]
    assert replay["flows"] == live["flows"]
    assert replay["events"] == live["events"]
    assert replay["parse"] == live["parse"]


@pytest.mark.parametrize("ring", RINGS)
@pytest.mark.parametrize("mode", ["flow", "hash"])
def test_fanout_splits_flows_and_keeps_directions_together(testbed, ring, mode):
    procs = testbed
    helper = procs.start(_in_ns(NS_M, sys.executable, HERE, "fanout", "mc", ring, mode),
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    assert helper.stdout.readline().strip() == "ready", helper.stderr.read()
    sent = int(_sh(*_in_ns(NS_C, sys.executable, HERE, "send", "c0"), timeout=60).stdout)
    out, err = helper.communicate(input=f"{sent}\n", timeout=60)
    assert helper.returncode == 0, err
    res = json.loads(out.strip().splitlines()[-1])
    a, b = (set(map(tuple, m)) for m in res["members"])
    assert res["received"] == sent == res["per_member"][0] + res["per_member"][1]
    assert a and b, f"{mode} fanout should spread 64 flows over both members"
    assert not a & b, "a flow (either direction) reached both members"
    assert len(a | b) == 64
    assert res["split_directions"] == 0


def _offloads(ns, dev, tx):
    # A veth's default offloads (TSO, GSO, GRO, checksums), or the same without tx
    # checksumming, and so without TSO: the kernel then finishes checksums and cuts
    # super-frames in software before a frame leaves through dev.
    _sh(*_in_ns(ns, "ethtool", "-K", dev, "rx", "on", "tx", "on" if tx else "off",
                "gso", "on", "gro", "on", *(("tso", "on") if tx else ())))


def _tcp_checksums_bad(frames):
    """(TCP segments in frames, how many of them have a wrong checksum), by dpkt."""
    import dpkt
    seen = bad = 0
    for buf in frames:
        ip = dpkt.ethernet.Ethernet(buf).data
        if isinstance(ip, (dpkt.ip.IP, dpkt.ip6.IP6)) and isinstance(ip.data, dpkt.tcp.TCP):
            want = ip.data.sum
            ip.data.sum = 0
            if isinstance(ip, dpkt.ip.IP):
                ip.sum = 0
            seen += 1
            bad += type(ip)(bytes(ip)).data.sum != want   # packing fills the sum in
    return seen, bad


def _endpoint(addr, port):
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


def _url(addr, port=80):
    return f"http://{_endpoint(addr, port)}"


@pytest.mark.parametrize("ring", RINGS)
def test_a_plain_bridge_finishes_checksums_the_senders_left_to_their_veth(
        testbed, tmp_path, ring):
    # The end hosts' veths do tx checksumming (a veth's default) but no segmentation:
    # every frame they send leaves its TCP checksum for the device, and AF_PACKET
    # hands it over so (TP_STATUS_CSUMNOTREADY).  A bridge without offloads sent
    # the frames on unfinished, and the receivers, which verify, dropped them all:
    # not even a connection opened.
    procs = testbed
    for ns, dev in ((NS_C, "c0"), (NS_S, "s0")):
        _sh(*_in_ns(ns, "ethtool", "-K", dev, "tx", "on", "rx", "on", "tso", "off",
                    "gso", "off", "gro", "off"))
    blob = _serve_blob(procs, tmp_path)
    for _ in range(100):
        if _sh(*_in_ns(NS_S, "curl", "-sS", "-o", "/dev/null", "--max-time", "2",
                       _url(SERVER_IP, 8080)), check=False).returncode == 0:
            break
        time.sleep(0.1)
    bridge = _start_bridge(procs, "60", ring)
    try:
        r = subprocess.run(_in_ns(NS_C, "curl", "-sS", "--max-time", "15", "-o", "-",
                                  _url(SERVER_IP, 8080) + "/blob.bin"),
                           capture_output=True, timeout=30)
    finally:
        result = _stop_bridge(bridge)
    assert r.returncode == 0, r.stderr
    assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(blob).hexdigest()
    client, server = result["ports"]["client"], result["ports"]["server"]
    for side in (client, server):
        assert side["rx_csum_partial"] > 0
        assert side["rx_truncated"] == 0
    # every frame that came unfinished left finished (by the other side's port)
    assert client["tx_csum_done"] == server["rx_csum_partial"]
    assert server["tx_csum_done"] == client["rx_csum_partial"]


@pytest.mark.parametrize("family,ring", [(4, "v2"), (6, "v2"), (4, "v3")])
def test_offloads_bridge_moves_super_frames_and_the_lb_keeps_checksums_right(
        testbed, tmp_path, family, ring):
    # Offloads on at client and server: their TCP hands the veths super-frames of up
    # to 64 KiB whose checksums are left for the sending device.  The bridge takes
    # them with offloads=1 and runs the L4 LB, which rewrites VIP to backend in each
    # one's pseudo-header sum.  The bridge's own veths have tx checksumming off, so
    # the kernel cuts each super-frame and finishes its checksum in software on the
    # way out, and the receiving TCP checks every checksum: a wrong rewrite stalls
    # the download.  A recorder beside the bridge writes what it takes to pcap, and
    # PcapWriter finishes the checksums there.  IPv4 (TSO) and IPv6 (TSO6) alike.
    procs = testbed
    vip, server = ("198.18.1.100", SERVER_IP) if family == 4 else ("2001:db8:1::100",
                                                                    SERVER_IP6)
    for ns, dev in ((NS_C, "c0"), (NS_S, "s0")):
        _offloads(ns, dev, tx=True)
    for dev in ("mc", "ms"):
        _offloads(NS_M, dev, tx=False)
    if family == 6:
        _ipv6_on_the_end_hosts()
    _sh("ip", "-n", NS_C, "neigh", "replace", vip, "lladdr", _mac(NS_S, "s0"),
        "dev", "c0", "nud", "permanent")
    blob = _serve_blob(procs, tmp_path, bind=server)
    # The server listens before the one download that counts: a broken checksum
    # fails it within its time limit instead of being retried.
    for _ in range(100):
        if _sh(*_in_ns(NS_S, "curl", "-gsS", "-o", "/dev/null", "--max-time", "2",
                       _url(server, 8080)), check=False).returncode == 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"the server at {_url(server, 8080)} did not answer in its namespace")
    cap = tmp_path / "ms.pcap"
    rec = procs.start(_in_ns(NS_M, sys.executable, HERE, "record", "ms", str(cap)),
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    assert rec.stdout.readline().strip() == "ready", rec.stderr.read()
    # VIP port 80, backend port 8080: ports change too, which a partial sum must not
    # take in (the sending device sums them).
    bridge = _start_bridge(procs, "60", ring, "1", _endpoint(vip, 80),
                           _endpoint(server, 8080))
    try:
        r = subprocess.run(_in_ns(NS_C, "curl", "-gsS", "--max-time", "15", "-o", "-",
                                  _url(vip) + "/blob.bin"),
                           capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert hashlib.sha256(r.stdout).hexdigest() == hashlib.sha256(blob).hexdigest()
    finally:
        result = _stop_bridge(bridge)
        out, err = rec.communicate(input="", timeout=30)
    assert rec.returncode == 0, err
    recorded = json.loads(out.strip().splitlines()[-1])

    ports = result["ports"]
    client, server = ports["client"], ports["server"]
    assert result["l2fwd"] > 0                              # the LB translated
    assert server["rx_gso"] > 0 and server["rx_csum_partial"] > 0
    assert client["rx_csum_partial"] > 0
    # super-frames: far fewer frames than the 1448-byte segments on a plain link
    assert server["rx_pkts"] < len(blob) // 1448 // 2
    assert ports["tx_dropped"] == ports["rx_dropped"] == 0
    assert client["tx_pkts"] == server["rx_pkts"] and server["tx_pkts"] == client["rx_pkts"]

    from mbx._pcap import PcapReader
    frames = []
    with PcapReader(str(cap)) as reader:
        from mbx._packet import Batch
        batch = Batch(64)
        while (n := reader.receive(batch)) != -1:
            frames += [batch.frame(i) for i in range(n)]
            batch.reset()
    assert recorded["rx_gso"] > 0 and recorded["rx_csum_partial"] > 0
    assert max(map(len, frames)) > 1514
    seen, bad = _tcp_checksums_bad(frames)
    assert seen > 20 and bad == 0


_RAW_SERVER = """
import socket, sys
blob = open(sys.argv[2], "rb").read()
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 9000))
s.listen(1)
print("ready", flush=True)
c, _ = s.accept()
c.sendall(blob)
c.shutdown(socket.SHUT_WR)
c.settimeout(15)
c.recv(1)
c.close()
"""

_RAW_CLIENT = """
import hashlib, socket, sys
s = socket.create_connection((sys.argv[1], 9000), timeout=15)
h, n = hashlib.sha256(), 0
while data := s.recv(1 << 16):
    h.update(data)
    n += len(data)
s.close()
print(n, h.hexdigest())
"""


def test_offloads_super_frames_reassemble_into_the_exact_stream(testbed, tmp_path):
    # The TCP Monitor on super-frames.  A raw TCP server sends a 3 MiB blob (nothing
    # else) through the offloads bridge; a recorder beside it takes both sides'
    # frames as the bridge does; `mbx flows` over that capture rebuilds the server's
    # stream: the blob's length and SHA-256, from far fewer segments than the
    # 1,448-byte ones a plain link carries.
    procs = testbed
    for ns, dev in ((NS_C, "c0"), (NS_S, "s0")):
        _offloads(ns, dev, tx=True)
    for dev in ("mc", "ms"):
        _offloads(NS_M, dev, tx=False)
    blob = os.urandom(3 << 20)
    (tmp_path / "blob.bin").write_bytes(blob)
    server = procs.start(_in_ns(NS_S, sys.executable, "-c", _RAW_SERVER, SERVER_IP,
                                str(tmp_path / "blob.bin")),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert server.stdout.readline().strip() == "ready", server.stderr.read()
    cap = tmp_path / "both.pcap"
    rec = procs.start(_in_ns(NS_M, sys.executable, HERE, "record", "mc,ms", str(cap)),
                      stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
    assert rec.stdout.readline().strip() == "ready", rec.stderr.read()
    bridge = _start_bridge(procs, "60", "v2", "1")
    try:
        r = _sh(*_in_ns(NS_C, sys.executable, "-c", _RAW_CLIENT, SERVER_IP), timeout=30)
    finally:
        _stop_bridge(bridge)
        out, err = rec.communicate(input="", timeout=30)
    assert rec.returncode == 0, err
    assert r.stdout.split() == [str(len(blob)), hashlib.sha256(blob).hexdigest()]
    assert json.loads(out.strip().splitlines()[-1])["rx_dropped"] == 0   # a whole record

    # The recorder reads the two rings in turns, so a client ACK can land in the file
    # before the server data it acknowledges (the bridge itself cannot see them so:
    # it forwards the data before the client can ACK it).  The kernel's receive
    # times give the order back; unsorted, the monitor would take those ACKs as
    # proof of capture loss and skip the bytes as a gap.
    import dpkt
    with open(cap, "rb") as fh:
        records = sorted(dpkt.pcap.Reader(fh), key=lambda rec: rec[0])
    ordered = tmp_path / "ordered.pcap"
    with open(ordered, "wb") as fh:
        writer = dpkt.pcap.Writer(fh, nano=True)
        for ts, buf in records:
            writer.writepkt(buf, ts)
    assert max(len(buf) for _, buf in records) > 1514

    from mbx.flows import flows_json
    doc, warnings = flows_json(str(ordered))
    assert not warnings
    (key, c), = doc["connections"].items()
    assert key == f"{CLIENT_IP}:{key.split(':')[1].split('-')[0]}-{SERVER_IP}:9000"
    assert c["handshake"] and c["c2s_len"] == 0
    assert c["s2c_len"] == len(blob)
    assert c["s2c_sha256"] == hashlib.sha256(blob).hexdigest()
    assert 0 < c["pkts_s2c"] < len(blob) // 1448 // 2


RECORDER_NF = """
import json, os
import mbx

class Recorder(mbx.NF):
    # per flow (endpoints sorted): packets each way, written by each stack process
    def __init__(self):
        super().__init__("recorder")
        self.flows = {}
        self.sub(mbx.PKT, self.on_pkt)

    def start(self):
        open(os.path.join(OUT, f"started-{os.getpid()}"), "w").close()

    def on_pkt(self, ev):
        a, b = (ev.src_ip, ev.sport), (ev.dst_ip, ev.dport)
        rec = self.flows.setdefault(repr(sorted([a, b]) + [ev.proto]), [0, 0])
        rec[a > b] += 1
        self.n = getattr(self, "n", 0) + 1      # how far it got, for the test to wait on
        with open(os.path.join(OUT, f"count-{os.getpid()}"), "w") as fh:
            fh.write(str(self.n))

    def stop(self):
        with open(os.path.join(OUT, f"flows-{os.getpid()}.json"), "w") as fh:
            json.dump(self.flows, fh)

nf = Recorder()
"""


def test_new_fanout_groups_are_nobody_else_s(testbed):
    # --stacks took group ids from its pid (pid & 0xFFFE): two runs whose pids
    # differed in the last bit shared one group, each seeing half the traffic, with
    # no word.  Groups of ids the kernel picks are new, and joinable by their id.
    r = _sh(*_in_ns(NS_M, sys.executable, HERE, "newgroups", "mc", "ms"), timeout=60)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    squatter, a, b, c = res["ids"]
    assert squatter == 7 and len({squatter, a, b}) == 3 and c == a
    assert len(set(res["bridge"])) == 2 and not set(res["bridge"]) & {squatter, a, b}
    # an id in use with another mode: refused, and the message says why
    assert "another program's group of that id" in res["clash"]


def test_stacks_refuse_a_fanout_of_their_own(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "run", "l2fwd", "--in",
                        "afpacket:mc,ms?fanout=9", "--stacks", "2"], capture_output=True,
                       text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 2
    assert "--stacks makes the fanout groups its processes share" in r.stderr


@pytest.mark.parametrize("ring, out", [(ring, False) for ring in RINGS] + [("v2", True)])
def test_stacks_split_a_bridge_and_keep_both_directions_of_a_flow_together(
        testbed, tmp_path, ring, out):
    # Each side of a bridge is a fanout group of its own (Linux ties a group to one
    # interface), and run_parallel opens the stacks' ports in order, so the kernel's
    # symmetric hash gives a flow's two directions, arriving on different
    # interfaces, to the same stack.  Before, the second side's join failed (EINVAL).
    procs = testbed
    nf = tmp_path / "rec.py"
    nf.write_text(f"OUT = {str(tmp_path)!r}\n" + RECORDER_NF)
    os.chmod(tmp_path, 0o755)
    spec = f"afpacket:mc,ms?ring={ring}&timeout_ms=5"
    counters = tmp_path / "c.json"
    # out: --out names the input's bridge, as the test bed does; each stack sends
    # through its input's sockets then (it opened a second, send-only bridge before)
    mbx = procs.start(_in_ns(NS_M, sys.executable, "-m", "mbx.cli", "run", str(nf),
                             "--in", spec, *(("--out", spec) if out else ()),
                             "--stacks", "2", "--duration", "60", "-q",
                             "--json", str(counters)),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    _wait_started(mbx, tmp_path, 2)
    sent = sum(int(_sh(*_in_ns(ns, sys.executable, HERE, "send", dev, way),
                       timeout=60).stdout)
               for ns, dev, way in ((NS_C, "c0", "ab"), (NS_S, "s0", "ba")))
    deadline = time.monotonic() + 20            # until the stacks have taken them all
    while (sum(int(f.read_text() or 0) for f in tmp_path.glob("count-*")) < sent
           and time.monotonic() < deadline):
        time.sleep(0.05)
    mbx.send_signal(signal.SIGINT)              # every stack ends its run, and reports
    _, err = mbx.communicate(timeout=60)
    assert mbx.returncode == 0, err
    parts = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("flows-*"))]
    assert len(parts) == 2
    ours = [{k: v for k, v in part.items() if "198.18.7." in k} for part in parts]
    assert all(ours), "hash fanout should spread 64 flows over both stacks"
    assert not set(ours[0]) & set(ours[1]), "a flow reached both stacks"
    assert len(ours[0]) + len(ours[1]) == 64
    # each stack saw both directions of its flows, every packet once
    assert all(v == [4, 4] for part in ours for v in part.values())
    assert sent == 512
    ports = json.loads(counters.read_text())["ports"]
    assert ports["out"] is None                 # the input's bridge sent, with --out too
    assert ports["in"]["tx_pkts"] == sent


def test_stacks_keep_every_packet_of_a_flow_together_fragments_too(testbed, tmp_path):
    # The kernel's fanout hash takes a whole IPv6 packet's ports but not an IPv6
    # fragment's (it rebuilds only IPv4 for the group), so a flow whose datagrams
    # were sometimes fragmented was split between two stacks.  mbx's flow mode
    # hashes IPv6 by its addresses: each flow's whole and fragmented datagrams, both
    # ways, reach one stack, IPv4 ones by their ports once the kernel rebuilt them.
    procs = testbed
    nf = tmp_path / "rec.py"
    nf.write_text(f"OUT = {str(tmp_path)!r}\n" + RECORDER_NF)
    os.chmod(tmp_path, 0o755)
    mbx = procs.start(_in_ns(NS_M, sys.executable, "-m", "mbx.cli", "run", str(nf),
                             "--in", "afpacket:mc,ms?timeout_ms=5", "--stacks", "2",
                             "--duration", "60", "-q"),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    _wait_started(mbx, tmp_path, 2)
    for ns, dev, way in ((NS_C, "c0", "ab"), (NS_S, "s0", "ba")):
        _sh(*_in_ns(ns, sys.executable, HERE, "sendfrag", dev, way), timeout=60)
    flows = _fragmented_flows()
    expected = len(flows) * 6           # 3 datagrams each way, a fragmented one whole
    deadline = time.monotonic() + 20    # until the stacks have taken them all
    while (sum(int(f.read_text() or 0) for f in tmp_path.glob("count-*")) < expected
           and time.monotonic() < deadline):
        time.sleep(0.05)
    mbx.send_signal(signal.SIGINT)
    _, err = mbx.communicate(timeout=60)
    assert mbx.returncode == 0, err
    parts = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("flows-*"))]
    assert len(parts) == 2
    ours = [{k: v for k, v in part.items() if "2001:db8:7:" in k or "198.18.7." in k}
            for part in parts]
    split = set(ours[0]) & set(ours[1])
    assert not split, f"{len(split)} flows reached both stacks, e.g. {min(split)}"
    assert len(ours[0]) + len(ours[1]) == len(flows)
    # every datagram once, in its flow's stack: the fragmented one rebuilt
    assert all(v == [3, 3] for part in ours for v in part.values())
    for family in ("2001:db8:7:", "198.18.7."):
        assert all(any(family in k for k in part) for part in ours), \
            f"the {family} flows should be spread over both stacks"


def _cpu_ticks(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])        # utime + stime


def _start_recorder_run(procs, tmp_path, *extra, inp="afpacket:mc,ms?timeout_ms=5"):
    nf = tmp_path / "rec.py"
    nf.write_text(f"OUT = {str(tmp_path)!r}\n" + RECORDER_NF)
    p = procs.start(_in_ns(NS_M, sys.executable, "-m", "mbx.cli", "run", str(nf),
                           "--in", inp, "--duration", "60", *extra),
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    _wait_started(p, tmp_path)
    return p


def test_a_link_down_is_waited_out_and_a_deleted_interface_ends_the_run(testbed,
                                                                         tmp_path):
    # A downed link left an error on the socket that poll() reported at once, for
    # ever: the bridge spun a core until --duration; a deleted interface likewise,
    # though it could never deliver again.
    procs = testbed
    counters = tmp_path / "c.json"
    p = _start_recorder_run(procs, tmp_path, "--json", str(counters))
    _sh("ip", "-n", NS_M, "link", "set", "ms", "down")
    before = _cpu_ticks(p.pid)
    time.sleep(2.0)
    spent = _cpu_ticks(p.pid) - before
    _sh("ip", "-n", NS_M, "link", "set", "ms", "up")
    assert spent < 50, f"{spent} ticks of CPU in 2 s with the link down"
    time.sleep(0.5)
    sent = int(_sh(*_in_ns(NS_C, sys.executable, HERE, "send", "c0", "ab"),
                   timeout=60).stdout)
    deadline = time.monotonic() + 20
    while (sum(int(f.read_text() or 0) for f in tmp_path.glob("count-*")) < sent
           and time.monotonic() < deadline):
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert "(a port's link went down: an error raised on its socket" in out
    c = json.loads(counters.read_text())
    server = c["ports"]["in"]["server"]
    assert server["link_errors"] >= 1 and server["link_error"] == "Network is down"
    assert c["packets"] >= sent == 256 and server["tx_dropped"] == 0
    # the interface deleted under a running bridge: the run ends, naming it, as the
    # side of the bridge the user gave (not as a port "afpacket:mc" of its own), and
    # its flows as ended by that error, not by a stop that never came
    for f in [*tmp_path.glob("started-*"), *tmp_path.glob("count-*")]:
        f.unlink()
    p = _start_recorder_run(procs, tmp_path)
    _sent_through(tmp_path, 256)
    t0 = time.monotonic()
    _sh("ip", "-n", NS_M, "link", "del", "mc")
    out, err = p.communicate(timeout=30)
    assert p.returncode == 2, err
    assert "afpacket:mc,ms, client side: interface mc is gone (deleted" in err, err
    assert "ended at the error" in out and "ended at the stop" not in out, out
    assert time.monotonic() - t0 < 10


def _sent_through(tmp_path, total, directions="ab"):
    """The client sends the ``send`` helper's frames (client to server: ``ab``) and
    waits until the recorder of the run has counted ``total`` packets in all."""
    sent = int(_sh(*_in_ns(NS_C, sys.executable, HERE, "send", "c0", directions),
                   timeout=60).stdout)
    deadline = time.monotonic() + 20
    while (sum(int(f.read_text() or 0) for f in tmp_path.glob("count-*")) < total
           and time.monotonic() < deadline):
        time.sleep(0.05)
    return sent


def _no_carrier(ns, dev):
    """Until ``dev``'s operstate says it has no carrier (its peer is down)."""
    deadline = time.monotonic() + 10
    while _sh(*_in_ns(ns, "cat", f"/sys/class/net/{dev}/operstate")).stdout.strip() == "up":
        assert time.monotonic() < deadline, f"{dev} kept its carrier"
        time.sleep(0.02)


def test_frames_sent_while_the_far_end_is_down_count_as_not_sent(testbed, tmp_path):
    # With the server's end of the link down, mbx's side (ms) is up without carrier:
    # sendmmsg took the frames and the kernel dropped them, and the summary said
    # "sent" for every one.  Now the port looks at its carrier: the frames count as
    # not sent, with why, and the outage as a link error; once the far end is up again
    # frames go and count as sent.
    procs = testbed
    counters = tmp_path / "c.json"
    p = _start_recorder_run(procs, tmp_path, "--json", str(counters))
    _sh("ip", "-n", NS_S, "link", "set", "s0", "down")
    _no_carrier(NS_M, "ms")
    lost = _sent_through(tmp_path, 256)
    _sh("ip", "-n", NS_S, "link", "set", "s0", "up")
    time.sleep(0.2)
    sent = _sent_through(tmp_path, lost + 256)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    c = json.loads(counters.read_text())
    server = c["ports"]["in"]["server"]
    assert c["packets"] == lost + sent == 512
    assert (server["tx_dropped"], server["tx_pkts"], c["sent"]) == (lost, sent, sent)
    why = "no carrier on ms (the link's far end is down or unplugged)"
    assert server["link_errors"] == 1 and server["link_error"] == why
    assert server["tx_error"] == why
    assert (f"not sent       256 packets, by the in port (last error: server: {why})"
            in out), out
    assert "link           1 link error (a port's link went down" in out


# ---------------------------------------------------------------- inside a namespace


def _bridge_main(client_if, server_if, duration, ring, offloads="0", vip="", backend=""):
    # L2 forwarding, or with a VIP the L4 LB sending it to one backend.
    from mbx._afpacket import BridgePorts
    from mbx.nfs.flow_stats import FlowStats
    from mbx.nfs.l2fwd import L2Fwd
    from mbx.nfs.l4lb import L4LB
    from mbx.runtime import App
    bridge = BridgePorts(client_if, server_if, ring=ring, timeout_ms=5,
                         duration=float(duration), offloads=offloads == "1")
    l2 = L4LB(vip=vip, backends=backend) if vip else L2Fwd()
    app = App([l2, FlowStats()])
    result = {}

    def run():
        try:
            result["counters"] = app.run(bridge, bridge)
        except BaseException as exc:       # reported by the parent
            result["error"] = repr(exc)

    worker = threading.Thread(target=run)
    worker.start()
    print("ready", flush=True)
    sys.stdin.read()                        # the parent closes stdin to stop us
    bridge.stop()
    worker.join(30)
    if "error" in result or worker.is_alive():
        print(result.get("error", "bridge run did not stop"), file=sys.stderr)
        sys.exit(1)
    out = {"counters": result["counters"], "ports": bridge.counters,
           "l2fwd": l2.translated if vip else l2.packets,
           "ring": [bridge.client.ring_version, bridge.server.ring_version]}
    bridge.close()
    print(json.dumps(out, default=str))


def _record_main(ifaces, path):
    # What arrives on one interface ("ms") or two ("mc,ms"), as an offloads port
    # takes it, into a pcap file.
    from mbx._afpacket import AfPacketPort, BridgePorts
    from mbx._pcap import PcapWriter
    from mbx.nfs.l2fwd import L2Fwd
    from mbx.runtime import App
    options = dict(offloads=True, tx=False, timeout_ms=5, duration=60.0)
    names = ifaces.split(",")
    port = BridgePorts(*names, **options) if len(names) == 2 else AfPacketPort(
        names[0], **options)
    writer = PcapWriter(path)
    result = {}
    worker = threading.Thread(target=lambda: result.update(c=App([L2Fwd()]).run(port,
                                                                              writer)))
    worker.start()
    print("ready", flush=True)
    sys.stdin.read()
    # stop() ends the input at once, leaving what the ring still holds unread; a
    # busy machine can leave the last frames there, so wait until nothing more comes.
    seen, deadline = -1, time.monotonic() + 10
    while port.counters["rx_pkts"] != seen and time.monotonic() < deadline:
        seen = port.counters["rx_pkts"]
        time.sleep(0.2)
    port.stop()
    worker.join(30)
    writer.close()
    print(json.dumps(port.counters))
    port.close()


def _frame(src_mac, dst_mac, src, dst, proto, sport, dport, payload=b"x" * 18):
    l4 = (struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) if proto == 17 else
          struct.pack("!HHIIBBHHH", sport, dport, 1, 0, 0x50, 0x18, 1024, 0, 0))
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4) + len(payload), 0, 0, 64,
                     proto, 0, socket.inet_aton(src), socket.inet_aton(dst))
    return dst_mac + src_mac + b"\x08\x00" + ip + l4 + payload


def _key(frame):
    if frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 15) * 4
    proto = frame[23]
    src, dst = frame[26:30], frame[30:34]
    sport, dport = struct.unpack("!HH", frame[14 + ihl:18 + ihl])
    return proto, (src, sport), (dst, dport)


def _send_main(tx_if, directions="both"):
    # Frames for 64 flows (TCP and UDP), 4 packets each way: both directions, or
    # only "ab" (client to server) or "ba" (server to client).
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    raw.bind((tx_if, 0))
    mac_a, mac_b = b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02"
    sent = 0
    for i in range(64):
        proto = 17 if i % 2 else 6
        a, b = f"198.18.7.{1 + i % 50}", f"198.18.8.{1 + i // 50}"
        sport, dport = 20000 + 2 * i, 80 if proto == 6 else 53
        for _ in range(4):
            if directions != "ba":
                raw.send(_frame(mac_a, mac_b, a, b, proto, sport, dport))
                sent += 1
            if directions != "ab":
                raw.send(_frame(mac_b, mac_a, b, a, proto, dport, sport))
                sent += 1
    raw.close()
    print(sent)


def _ip_frames(src_mac, dst_mac, src, dst, proto, sport, dport, ident, payload):
    """One UDP or TCP datagram (checksums by dpkt) in Ethernet frames: whole if it
    fits a 1500-byte MTU, else fragments of it with identification ``ident``."""
    import dpkt
    v6 = ":" in src
    addr = ((lambda a: socket.inet_pton(socket.AF_INET6, a)) if v6 else socket.inet_aton)
    l4 = (dpkt.udp.UDP(sport=sport, dport=dport, ulen=8 + len(payload), data=payload)
          if proto == 17 else
          dpkt.tcp.TCP(sport=sport, dport=dport, seq=ident, ack=1,
                       flags=dpkt.tcp.TH_ACK | dpkt.tcp.TH_PUSH, data=payload))
    eth = dst_mac + src_mac + (b"\x86\xdd" if v6 else b"\x08\x00")
    if v6:
        ip = dpkt.ip6.IP6(src=addr(src), dst=addr(dst), nxt=proto, hlim=64, data=l4,
                          plen=len(l4))
        body = bytes(ip)[40:]
        if len(body) <= 1400:
            return [eth + bytes(ip)]
        frames = []
        for off in range(0, len(body), 1232):
            part = body[off:off + 1232]
            more = off + 1232 < len(body)
            frames.append(eth + struct.pack("!IHBB", 6 << 28, 8 + len(part), 44, 64)
                          + addr(src) + addr(dst)
                          + struct.pack("!BBHI", proto, 0, off | more, ident) + part)
        return frames
    body = bytes(dpkt.ip.IP(src=addr(src), dst=addr(dst), p=proto, ttl=64, data=l4))[20:]
    step = 1480 if len(body) > 1480 else len(body)
    return [eth + bytes(dpkt.ip.IP(src=addr(src), dst=addr(dst), p=proto, ttl=64,
                                   id=ident & 0xFFFF, data=body[off:off + step],
                                   offset=off // 8, mf=int(off + step < len(body))))
            for off in range(0, len(body), step)]


def _fragmented_flows():
    """96 flows, 64 IPv6 (16 address pairs, 4 flows each) and 32 IPv4, a quarter
    TCP, each with its datagrams of 100, 2,000 (fragmented) and 300 bytes."""
    flows = []
    for i in range(64):
        proto = 6 if i % 4 == 3 else 17
        flows.append((f"2001:db8:7::{1 + i // 4}", f"2001:db8:8::{1 + i % 3}", proto,
                      20000 + i, 443 if proto == 6 else 53))
    for i in range(32):
        proto = 6 if i % 4 == 3 else 17
        flows.append((f"198.18.7.{1 + i}", "198.18.8.1", proto, 30000 + i,
                      443 if proto == 6 else 53))
    return flows


def _send_fragmented_main(tx_if, direction):
    # Every flow of _fragmented_flows one way: "ab" (client to server) or "ba".
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    raw.bind((tx_if, 0))
    mac_a, mac_b = b"\x02\x00\x00\x00\x00\x01", b"\x02\x00\x00\x00\x00\x02"
    sent = 0
    for n, (a, b, proto, sport, dport) in enumerate(_fragmented_flows()):
        for k, size in enumerate((100, 2000, 300)):
            ident = n * 8 + k + (4 if direction == "ba" else 0)
            payload = bytes((ident + i) & 0xFF for i in range(size))
            frames = (_ip_frames(mac_a, mac_b, a, b, proto, sport, dport, ident, payload)
                      if direction == "ab" else
                      _ip_frames(mac_b, mac_a, b, a, proto, dport, sport, ident, payload))
            for frame in frames:
                raw.send(frame)
                sent += 1
    raw.close()
    print(sent)


def _unread_main(iface, ring, keep):
    # Takes `keep` frames from `iface`'s ring once the sender is done (a line on
    # stdin), leaves the rest there, closes: what the port counted, as JSON.
    from mbx._afpacket import AfPacketPort
    from mbx._packet import Batch
    port = AfPacketPort(iface, ring=ring, timeout_ms=5, retire_ms=1, tx=False)
    print("ready", flush=True)
    sys.stdin.readline()
    time.sleep(0.1)                 # a V3 block is handed over 1 ms after its first frame
    batch = Batch(int(keep))
    read = 0
    deadline = time.monotonic() + 5
    while read < int(keep) and time.monotonic() < deadline:
        read += max(port.receive(batch), 0)
    port.close()
    print(json.dumps(dict(read=read, **port.counters)), flush=True)


def _udp_main(role, addr, count, peer=""):
    # The end hosts of the fragmented-traffic test, on the kernel's UDP: "recv" takes
    # count datagrams on addr:5353 (or stops 10 s after the last), "send" sends count
    # datagrams from addr to peer:5353 over 8 source ports, 200, 3000 and 9000 bytes
    # long in turn (the kernel sends the longer ones in fragments).  Both print the
    # datagrams' SHA-256 digests.
    import hashlib
    import random
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    digests = []
    if role == "recv":
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
        s.bind((addr, 5353))
        s.settimeout(10)
        print("ready", flush=True)
        try:
            while len(digests) < int(count):
                digests.append(hashlib.sha256(s.recv(65535)).hexdigest())
        except TimeoutError:
            pass
    else:
        rng = random.Random(5)
        socks = []
        for k in range(8):
            s = socket.socket(family, socket.SOCK_DGRAM)
            s.bind((addr, 41000 + k))
            socks.append(s)
        for i in range(int(count)):
            data = rng.randbytes((200, 3000, 9000)[i % 3])
            socks[i % 8].sendto(data, (peer, 5353))
            digests.append(hashlib.sha256(data).hexdigest())
            time.sleep(0.002)
    print(json.dumps(sorted(digests)))


def _fanout_main(rx_if, ring, mode):
    # Two sockets in one fanout group of this mode on rx_if; drain both once the
    # sender is done and report which flows each saw.
    from mbx._afpacket import AfPacketPort
    from mbx._packet import Batch
    group = os.getpid() & 0xFFFF
    members = [AfPacketPort(rx_if, ring=ring, fanout_group=group, fanout_mode=mode,
                            tx=False, block_size=1 << 20, block_count=8, timeout_ms=2)
               for _ in range(2)]
    print("ready", flush=True)
    sent = int(sys.stdin.readline())
    seen = [[], []]
    batch = Batch(256)
    deadline = time.monotonic() + 10
    while sum(map(len, seen)) < sent and time.monotonic() < deadline:
        for m, port in enumerate(members):
            batch.reset()
            n = port.receive(batch)
            seen[m] += [batch.frame(i) for i in range(n)]
    time.sleep(0.1)
    for m, port in enumerate(members):      # anything beyond what was sent
        batch.reset()
        n = port.receive(batch)
        seen[m] += [batch.frame(i) for i in range(n)]
    member_flows, owner, split = [], {}, 0
    for m in range(2):
        fl = set()
        for f in seen[m]:
            key = _key(f)
            if key is None:
                continue
            proto, x, y = key
            flow = (proto, *sorted([x, y]))
            fl.add(flow)
            if owner.setdefault(flow, m) != m:
                split += 1
        member_flows.append(sorted([p, x[0].hex(), x[1], y[0].hex(), y[1]]
                                   for p, x, y in fl))
    print(json.dumps({"received": sum(map(len, seen)), "per_member": list(map(len, seen)),
                      "members": member_flows, "split_directions": split}))
    for port in members:
        port.close()


def _newgroups_main(client_if, server_if):
    # Fanout groups of ids the kernel picks, next to "another program's" group 7.
    from mbx._afpacket import AfPacketPort, BridgePorts
    from mbx.errors import PortError
    small = dict(tx=False, block_size=1 << 16, block_count=2)
    squatter = AfPacketPort(client_if, fanout_group=7, **small)
    a = AfPacketPort(client_if, fanout_group="new", **small)
    b = AfPacketPort(client_if, fanout_group="new", **small)
    c = AfPacketPort(client_if, fanout_group=a.fanout_group, **small)
    bridge = BridgePorts(client_if, server_if, fanout_group="new", **small)
    try:
        AfPacketPort(client_if, fanout_group=7, fanout_mode="lb", **small)
        clash = None
    except PortError as exc:
        clash = str(exc)
    print(json.dumps({"ids": [p.fanout_group for p in (squatter, a, b, c)],
                      "bridge": bridge.fanout_groups, "clash": clash}))
    for port in (squatter, a, b, c, bridge):
        port.close()


if __name__ == "__main__":
    if sys.argv[1] == "newgroups":
        _newgroups_main(*sys.argv[2:4])
    elif sys.argv[1] == "bridge":
        _bridge_main(*sys.argv[2:])
    elif sys.argv[1] == "record":
        _record_main(*sys.argv[2:4])
    elif sys.argv[1] == "fanout":
        _fanout_main(*sys.argv[2:5])
    elif sys.argv[1] == "sendfrag":
        _send_fragmented_main(*sys.argv[2:4])
    elif sys.argv[1] == "unread":
        _unread_main(*sys.argv[2:5])
    elif sys.argv[1] == "udp":
        _udp_main(*sys.argv[2:6])
    elif sys.argv[1] == "send":
        _send_main(*sys.argv[2:4])
    else:
        sys.exit(f"unknown mode {sys.argv[1]!r}")


@pytest.mark.parametrize("ring", RINGS)
def test_frames_left_in_the_ring_at_close_are_counted(testbed, ring):
    # An input stopped with frames still in its ring (stop(), --duration, Ctrl-C)
    # used to lose them without a trace: close() now counts them as rx_unread, so
    # the frames read and those left add up to what the kernel put in the ring.
    procs = testbed
    rx = procs.start(_in_ns(NS_M, sys.executable, HERE, "unread", "mc", ring, "10"),
                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert rx.stdout.readline().strip() == "ready", rx.stderr.read()
    sent = int(_sh(*_in_ns(NS_C, sys.executable, HERE, "send", "c0", "ab")).stdout)
    out, err = rx.communicate(input="go\n", timeout=30)
    assert rx.returncode == 0, err
    got = json.loads(out.strip().splitlines()[-1])
    assert got["read"] == got["rx_pkts"] == 10
    assert got["rx_dropped"] == 0
    assert got["rx_unread"] == sent - 10 > 0
    assert got["kernel_packets"] == sent


def _udp_through_mbx(procs, tmp_path, count, client, server, *ports, stacks=1):
    """``mbx run`` of the recorder and l2fwd in the middle namespace with ``ports``
    (its --in and --out); the client's kernel sends ``count`` UDP datagrams (200,
    3,000 and 9,000 bytes in turn) to the server's.  Checks that every one arrived
    byte for byte and returns the run's counters (--json); the recorder's per-flow
    files are in ``tmp_path``."""
    nf = tmp_path / "rec.py"
    nf.write_text(f"OUT = {str(tmp_path)!r}\n" + RECORDER_NF)
    os.chmod(tmp_path, 0o755)
    counters = tmp_path / "c.json"
    mbx = procs.start(_in_ns(NS_M, sys.executable, "-m", "mbx.cli", "run", f"{nf}+l2fwd",
                             *ports, "--duration", "60", "-q", "--json", str(counters)),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    # The receiver gives up 10 s after its last datagram, or after it starts: so it
    # starts once mbx reads (mbx may take longer than that to start on a busy host).
    _wait_started(mbx, tmp_path, stacks)
    receiver = procs.start(_in_ns(NS_S, sys.executable, HERE, "udp", "recv", server,
                                  str(count)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert receiver.stdout.readline().strip() == "ready", receiver.stderr.read()
    sent = json.loads(_sh(*_in_ns(NS_C, sys.executable, HERE, "udp", "send", client,
                                  str(count), server), timeout=60).stdout)
    out, err = receiver.communicate(timeout=60)
    mbx.send_signal(signal.SIGINT)
    _, mbx_err = mbx.communicate(timeout=60)
    assert mbx.returncode == 0, mbx_err
    assert json.loads(out) == sent          # every datagram, byte for byte
    return json.loads(counters.read_text())


@pytest.mark.parametrize("family,stacks", [(4, 1), (6, 1), (4, 2)])
def test_a_bridge_forwards_fragmented_datagrams_whole_and_in_their_flow(
        testbed, tmp_path, family, stacks):
    # The client's kernel sends UDP datagrams of 3,000 and 9,000 bytes in fragments.
    # The bridge rebuilt them (FragTable; with --stacks the kernel, for the fanout
    # group) and sent each as one frame longer than the MTU: the veth refused it
    # (EMSGSIZE), so every fragmented datagram was lost.  With --stacks, the
    # fragments went to the stack their addresses picked, away from their flow.  Now
    # the output cuts them again and the server's kernel gets every datagram, each
    # flow in one stack.
    procs = testbed
    client, server = (CLIENT_IP, SERVER_IP) if family == 4 else (CLIENT_IP6, SERVER_IP6)
    if family == 6:
        _ipv6_on_the_end_hosts()
    count = 48
    result = _udp_through_mbx(procs, tmp_path, count, client, server, "--in",
                              "afpacket:mc,ms?timeout_ms=5", "--stacks", str(stacks),
                              stacks=stacks)
    server_side = result["ports"]["in"]["server"]
    assert server_side["tx_cut"] == count * 2 // 3 and server_side["tx_dropped"] == 0
    # "sent" counts packets, as "packets" does: a datagram cut again is one (each
    # packet is held as a fragment, dropped, or passed and sent)
    assert result["sent"] == (result["packets"] - result["fragments_held"]
                              - result["dropped_by_nf"] - result["dropped_malformed"])
    if stacks == 1:
        assert result["fragments"]["completed"] == count * 2 // 3
    else:
        # the kernel rebuilt them for the fanout group, and the ring's slots are
        # too small: each was read whole from the socket's queue
        assert result["ports"]["in"]["client"]["rx_whole"] == count * 2 // 3
    parts = [json.loads(f.read_text()) for f in sorted(tmp_path.glob("flows-*"))]
    ours = [{k: v for k, v in part.items() if "5353" in k} for part in parts]
    seen = [key for part in ours for key in part]
    assert len(seen) == len(set(seen)) == 8, "a flow was seen by two stacks"
    assert all(v == [count // 8, 0] or v == [0, count // 8]
               for part in ours for v in part.values())


def test_an_offloads_output_finishes_checksums_a_plain_input_could_not_place(
        testbed, tmp_path):
    # A port without offloads learns only that a frame's checksum is not finished
    # (TP_STATUS_CSUMNOTREADY), not where it is (csum_start 0).  An offloads output
    # passed that on in its virtio_net_hdr, and the kernel took offset 0 for the
    # checksum's place: it wrote into the destination MAC and every such datagram
    # was lost.  Now that output finishes the checksum itself.
    procs = testbed
    _sh(*_in_ns(NS_C, "ethtool", "-K", "c0", "tx", "on"))
    count = 24
    ports = _udp_through_mbx(procs, tmp_path, count, CLIENT_IP, SERVER_IP,
                             "--in", "afpacket:mc?timeout_ms=5",
                             "--out", "afpacket:ms?offloads=1")["ports"]
    # the 200-byte datagrams left their checksum to c0 (the fragmented ones could not)
    assert ports["in"]["rx_csum_partial"] == count // 3
    assert ports["out"]["tx_csum_done"] == count // 3
    assert ports["out"]["tx_dropped"] == 0


def test_frames_larger_than_the_mtu_are_cut_or_counted_and_explained(testbed, tmp_path):
    # A 3,000-byte IPv4 datagram with DF set cannot leave a 1,500-byte link: it is
    # dropped and counted, and the run's summary says so with the reason (EMSGSIZE),
    # while the frames around it go out.  Without DF it goes as three fragments,
    # as an IPv4 router would send it.
    import dpkt

    from mbx.examples.capture import write_pcap

    frames = []
    for size, df in ((100, False), (3000, True), (3000, False), (100, False)):
        udp = dpkt.udp.UDP(sport=1, dport=2, data=b"x" * (size - 14 - 28))
        ip = dpkt.ip.IP(src=socket.inet_aton(CLIENT_IP), dst=socket.inet_aton(SERVER_IP),
                        p=17, data=udp, df=int(df))
        ip.len = len(bytes(ip))
        frames.append((1.0, b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00"
                       + bytes(ip)))
    cap, counters = tmp_path / "jumbo.pcap", tmp_path / "c.json"
    write_pcap(str(cap), frames)
    r = _sh(*_in_ns(NS_M, sys.executable, "-m", "mbx.cli", "run", "l2fwd", "--in",
                    f"pcap:{cap}", "--out", "afpacket:ms", "--json", str(counters)),
            check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "not sent       1 packet, by the out port (last error: Message too long)" \
        in r.stdout
    out = json.loads(counters.read_text())["ports"]["out"]
    assert out["tx_pkts"] == 2 + 3 and out["tx_dropped"] == 1 and out["tx_cut"] == 1
    assert out["tx_too_long"] == 1
    assert out["tx_error"] == os.strerror(errno.EMSGSIZE)


REMTU_NF = """
import fcntl, socket, struct, time
import mbx

class Remtu(mbx.NF):
    # sets ms's MTU to 1000 at the second packet, back to 1500 at the third
    def __init__(self):
        super().__init__("remtu")
        self.n = 0
        self.sub(mbx.PKT, self.on_pkt)

    def on_pkt(self, ev):
        self.n += 1
        if self.n in (2, 3):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                fcntl.ioctl(s, 0x8922, struct.pack("16si20x", b"ms",   # SIOCSIFMTU
                                                   1000 if self.n == 2 else 1500))
        if self.n == 3:
            time.sleep(0.05)        # past the port's next look at its link

nf = Remtu()
"""


def test_an_mtu_changed_mid_run_is_the_one_datagrams_are_cut_to(testbed, tmp_path):
    # The output read its MTU once, at open.  Lowered mid-run, a datagram longer than
    # the new MTU was refused (EMSGSIZE, "not sent ... Message too long") though it
    # could be cut; raised again, datagrams went on being cut to the old one.  Now
    # the port reads the MTU again when the kernel refuses a frame as too long (and
    # sends it again, cut), and as it looks at its carrier.  One packet a burst: the
    # NF changes the MTU just before the port sends that packet.
    import dpkt

    from mbx.examples.capture import write_pcap

    procs = testbed
    payloads = [bytes([k]) * 1400 for k in range(3)]
    smac = bytes.fromhex(_mac(NS_S, "s0").replace(":", ""))
    frames = []
    for k, data in enumerate(payloads):
        udp = dpkt.udp.UDP(sport=41000, dport=5353, ulen=8 + len(data), data=data)
        ip = dpkt.ip.IP(src=socket.inet_aton(CLIENT_IP), dst=socket.inet_aton(SERVER_IP),
                        p=17, data=udp, id=k + 1)        # DF clear: it may be cut
        ip.len = len(bytes(ip))
        frames.append((1.0 + k, smac + b"\x02\x00\x00\x00\x00\x01\x08\x00" + bytes(ip)))
    cap, counters, nf = tmp_path / "big.pcap", tmp_path / "c.json", tmp_path / "remtu.py"
    write_pcap(str(cap), frames)
    nf.write_text(REMTU_NF)
    receiver = procs.start(_in_ns(NS_S, sys.executable, HERE, "udp", "recv", SERVER_IP,
                                  str(len(payloads))),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert receiver.stdout.readline().strip() == "ready", receiver.stderr.read()
    r = _sh(*_in_ns(NS_M, sys.executable, "-m", "mbx.cli", "run", f"{nf}+l2fwd", "--in",
                    f"pcap:{cap}", "--out", "afpacket:ms", "--burst", "1", "--json",
                    str(counters)), check=False, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out, err = receiver.communicate(timeout=30)
    # every datagram arrived, the second as fragments of the new MTU
    assert json.loads(out) == sorted(hashlib.sha256(d).hexdigest() for d in payloads), r.stdout
    c = json.loads(counters.read_text())["ports"]["out"]
    assert (c["tx_pkts"], c["tx_cut"], c["tx_dropped"]) == (1 + 2 + 1, 1, 0), c
    assert "cut again      1 datagram longer than an output's link" in r.stdout
    assert "not sent" not in r.stdout


def test_a_frame_received_cut_short_is_not_sent_on(testbed, tmp_path):
    # A frame the input had only part of (a capture's snaplen; a ring slot when the
    # kernel could not queue the whole copy) went out cut short: a 1,982-byte frame
    # whose IP header said 9,000 bytes.  It is dropped and counted, with why.
    frame = (b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x08\x00"
             + bytes.fromhex("4500025800000000401100000a0000010a000002") + bytes(580))
    cap, counters = tmp_path / "cut.pcap", tmp_path / "c.json"
    with open(cap, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        for caplen in (len(frame), 200, len(frame)):      # the second cut short
            fh.write(struct.pack("<IIII", 1, 0, caplen, len(frame)) + frame[:caplen])
    r = _sh(*_in_ns(NS_M, sys.executable, "-m", "mbx.cli", "run", "l2fwd", "--in",
                    f"pcap:{cap}", "--out", "afpacket:ms", "--json", str(counters)),
            check=False, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(counters.read_text())["ports"]["out"]
    assert (out["tx_pkts"], out["tx_dropped"], out["tx_partial"]) == (2, 1, 1), out
    assert out["tx_error"] == "1 received cut short, so not sent on"
    assert "not sent       1 packet, by the out port (last error: 1 received cut short" \
        in r.stdout


def test_a_second_bridge_on_the_same_interfaces_is_warned_of(testbed, tmp_path):
    # Two runs bridging the same veths both forward every frame, so the far end gets
    # each twice; nothing said so.  The second run now warns at its start (the first,
    # alone there, does not).
    procs = testbed
    first = _start_recorder_run(procs, tmp_path, "-q")
    second = _sh(*_in_ns(NS_M, sys.executable, "-m", "mbx.cli", "run", "l2fwd", "--in",
                         "afpacket:mc,ms?timeout_ms=5", "--duration", "0.5", "-q"),
                 check=False, timeout=60)
    # ... and so does a --stacks run, whose own sockets are in fanout groups
    stacks = _sh(*_in_ns(NS_M, sys.executable, "-m", "mbx.cli", "run", "l2fwd", "--in",
                         "afpacket:mc,ms?timeout_ms=5", "--duration", "0.5", "-q",
                         "--stacks", "2"), check=False, timeout=60)
    first.send_signal(signal.SIGINT)
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0 and "warning" not in err, err
    assert second.returncode == 0, second.stderr
    assert stacks.returncode == 0, stacks.stderr
    for iface in ("mc", "ms"):
        for run in (second, stacks):
            assert (f"mbx: warning: 1 other packet socket receives on {iface} (a capture "
                    "such as tcpdump is harmless; another bridge there forwards every "
                    "frame a second time)") in run.stderr


def test_an_interface_deleted_after_its_link_went_down_ends_the_run(testbed, tmp_path):
    # A deletion takes the link down (an error on the socket, which the port reads
    # while the name still resolves: a link that went down) and then unregisters
    # the interface without another error: the run went on until --duration.
    # Now an idle port that saw a link error looks whether its interface is still
    # there.  Taking the link down first, by hand, makes the order certain.
    procs = testbed
    _sh("ip", "-n", NS_M, "link", "add", "x0", "type", "veth", "peer", "name", "x1")
    _sh("ip", "-n", NS_M, "link", "set", "x0", "up")
    _sh("ip", "-n", NS_M, "link", "set", "x1", "up")
    p = _start_recorder_run(procs, tmp_path, "-q", inp="afpacket:x0?timeout_ms=5")
    time.sleep(0.3)
    _sh("ip", "-n", NS_M, "link", "set", "x0", "down")
    time.sleep(0.5)                             # the port reads the error meanwhile
    t0 = time.monotonic()
    _sh("ip", "-n", NS_M, "link", "del", "x0")
    _, err = p.communicate(timeout=30)
    assert p.returncode == 2 and "interface x0 is gone" in err, err
    assert time.monotonic() - t0 < 5


def test_which_runs_receive_what_they_send():
    # the input of one interface takes outgoing frames unless the run sends there
    from mbx.ports import _sends_to_input, check_spec
    assert not _sends_to_input("afpacket:eth0", None)
    assert not _sends_to_input("afpacket:eth0", "pcap:out.pcap")
    assert not _sends_to_input("afpacket:eth0", "afpacket:eth1")
    assert _sends_to_input("afpacket:eth0?ring=v3", "afpacket:eth0?promisc=0")
    assert _sends_to_input("afpacket:eth0", "dpdk:net_af_packet0,iface=eth0")
    assert not _sends_to_input("afpacket:eth0", "dpdk:net_af_packet0,iface=eth01")
    with pytest.raises(PortError, match="outgoing: a bridge sends what it receives"):
        check_spec("afpacket:a,b?outgoing=1")


def test_a_link_down_or_without_carrier_at_start_is_warned_of(testbed, tmp_path):
    # The run starts and waits for the links, as before, but said nothing until its
    # final counters: now it names each interface and what is wrong with it.
    _sh("ip", "-n", NS_M, "link", "set", "mc", "down")
    _sh("ip", "-n", NS_S, "link", "set", "s0", "down")
    _no_carrier(NS_M, "ms")
    r = _sh(*_in_ns(NS_M, sys.executable, "-m", "mbx.cli", "run", "l2fwd", "--in",
                    "afpacket:mc,ms?timeout_ms=5", "--duration", "0.3", "-q"), timeout=60)
    assert ("mbx: warning: interface mc is down: nothing flows through it until it is "
            "up (ip link set mc up)") in r.stderr
    assert "mbx: warning: interface ms has no carrier" in r.stderr
    _sh("ip", "-n", NS_M, "link", "set", "mc", "up")
    _sh("ip", "-n", NS_S, "link", "set", "s0", "up")
    r = _sh(*_in_ns(NS_M, sys.executable, "-m", "mbx.cli", "run", "l2fwd", "--in",
                    "afpacket:mc,ms?timeout_ms=5", "--duration", "0.3", "-q"), timeout=60)
    assert "warning" not in r.stderr, r.stderr


def test_a_send_only_port_s_interface_deleted_ends_the_run_naming_it(testbed, tmp_path):
    # An --out port of its own receives nothing, so only its sends can tell that its
    # interface went: the kernel refused them (ENXIO, the socket is bound to the gone
    # ifindex) and the port dropped each burst as if the link were busy, for ever,
    # even once an interface of the same name was back.  Now it ends the run.
    procs = testbed
    p = _start_recorder_run(procs, tmp_path, "--out", "afpacket:ms",
                            inp="afpacket:mc?timeout_ms=5")
    _sh("ip", "-n", NS_M, "link", "del", "ms")
    t0 = time.monotonic()
    while p.poll() is None and time.monotonic() - t0 < 10:
        _sh(*_in_ns(NS_C, sys.executable, HERE, "send", "c0", "ab"), timeout=60)
    _, err = p.communicate(timeout=10)
    assert p.returncode == 2, err
    assert "afpacket:ms: interface ms is gone" in err, err


def test_a_send_only_port_s_link_down_counts_as_a_link_error(testbed, tmp_path):
    # A bridge side counts a link that goes down (the error the kernel raises on its
    # receiving socket); an --out port, whose socket receives nothing, counted the
    # frames the kernel refused (ENETDOWN) but never the outage.
    procs = testbed
    counters = tmp_path / "c.json"
    p = _start_recorder_run(procs, tmp_path, "--out", "afpacket:ms", "--json",
                            str(counters), inp="afpacket:mc?timeout_ms=5")
    _sh("ip", "-n", NS_M, "link", "set", "ms", "down")
    lost = _sent_through(tmp_path, 256, "ab")
    _sh("ip", "-n", NS_M, "link", "set", "ms", "up")
    time.sleep(0.2)
    sent = _sent_through(tmp_path, lost + 256, "ab")
    lost_again = _sent_through(tmp_path, lost + sent + 256, "ab")
    _sh("ip", "-n", NS_M, "link", "set", "ms", "down")
    lost += _sent_through(tmp_path, lost + sent + lost_again + 256, "ab")
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    c = json.loads(counters.read_text())
    port = c["ports"]["out"]
    assert port["tx_dropped"] == lost == 512 and c["sent"] == sent + lost_again
    assert port["link_errors"] == 2 and port["link_error"] == "Network is down"
    assert "link           2 link errors (a port's link went down" in out, out


def test_gro_on_a_bridged_interface_is_warned_of_before_the_run(testbed, tmp_path):
    # GRO (a real NIC's default) on an interface mbx reads hands the packet socket
    # merged frames longer than the MTU, which the other side refuses as too long:
    # TCP through a plain bridge stalled and the only hint blamed the senders' TSO.
    # Now the run says so at its start, naming the interface and both fixes.
    _sh(*_in_ns(NS_M, "ethtool", "-K", "mc", "gro", "on"))

    def warnings_of(inp, *out):
        r = subprocess.run(_in_ns(NS_M, sys.executable, "-m", "mbx.cli", "run", "l2fwd",
                                  "--in", inp, *out, "--duration", "0.2", "-q"),
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        return [line for line in r.stderr.splitlines() if "GRO" in line]

    said = warnings_of("afpacket:mc,ms")
    assert len(said) == 1 and "interface mc has GRO on" in said[0], said
    assert "ethtool -K mc gro off" in said[0] and "?offloads=1" in said[0]
    assert warnings_of("afpacket:mc", "--out", "afpacket:ms")
    assert warnings_of("afpacket:mc,ms?offloads=1") == []          # it takes them
    assert warnings_of("afpacket:mc", "--out", f"pcap:{tmp_path}/o.pcap") == []
    # a bridge whose place a capture output takes forwards nothing live
    assert warnings_of("afpacket:mc,ms", "--out", f"pcap:{tmp_path}/b.pcap") == []
    _sh(*_in_ns(NS_M, "ethtool", "-K", "mc", "gro", "off"))
    assert warnings_of("afpacket:mc,ms") == []


def test_a_pipelined_bridge_sends_a_lone_frame_once_the_nfs_are_done(testbed):
    # With a burst in flight, the pipelined stack went back to reading the port,
    # which slept in poll() for timeout_ms (the NFs' completion wakes no port): a
    # lone frame waited for the next one or for the timeout, so at low rates every
    # frame was late by up to timeout_ms each way.  With 200 ms, a ping took 400.
    procs = testbed
    mbx = procs.start(_in_ns(NS_M, sys.executable, "-m", "mbx.cli", "run", "l2fwd",
                             "--deploy", "pipelined", "--in",
                             "afpacket:mc,ms?timeout_ms=200", "--duration", "60", "-q"),
                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    try:
        deadline = time.monotonic() + 30
        while _ping(1) == 0:        # until the NF processes forward
            assert mbx.poll() is None, mbx.communicate()[1]
            assert time.monotonic() < deadline, "the pipelined bridge forwards nothing"
        rtts = sorted(_ping_rtts(15, gap=0.05))
    finally:
        mbx.send_signal(signal.SIGINT)
        _, err = mbx.communicate(timeout=60)
    assert mbx.returncode == 0, err
    assert len(rtts) == 15
    # Well below one poll timeout (the inline bridge: under a millisecond), with
    # room for a busy CI host.
    assert rtts[len(rtts) // 2] < 0.05, rtts
