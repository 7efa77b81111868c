"""The L4 load balancer's output capture, read back by dpkt and by tshark:
checksums valid, translation consistent in both directions."""
import shutil
import subprocess

import dpkt
import pytest
from conftest import read_frames

from mbx.examples.capture import BACKENDS, VIP
from mbx.nfs.l4lb import L4LB, choose_backend


def _checksums_ok(ip):
    """Recompute IPv4 and TCP/UDP checksums with dpkt and compare."""
    raw = bytes(ip)
    hdr = dpkt.ip.IP(raw)
    want_ip, want_l4 = hdr.sum, hdr.data.sum
    hdr.sum = 0
    hdr.data.sum = 0
    rebuilt = dpkt.ip.IP(bytes(hdr))      # dpkt fills checksums when packing
    return rebuilt.sum == want_ip and rebuilt.data.sum == want_l4


def _tcp_packets(frames):
    for ts, buf in frames:
        eth = dpkt.ethernet.Ethernet(buf)
        ip = eth.data
        if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.tcp.TCP):
            yield ts, ip


def _addr(raw):
    return ".".join(str(b) for b in raw)


def test_translation_both_ways_with_valid_checksums(run, example_pcap):
    lb = L4LB(vip=f"{VIP[0]}:{VIP[1]}", backends=",".join(f"{a}:{p}" for a, p in BACKENDS))
    counters, out = run([lb], example_pcap)
    before = list(_tcp_packets(read_frames(example_pcap)))
    after = list(_tcp_packets(out))
    assert len(before) == len(after) > 1000
    to_backend = from_vip = 0
    for (_, a), (_, b) in zip(before, after, strict=True):
        assert _checksums_ok(b), "checksum broken by the rewrite"
        src, dst = _addr(a.src), _addr(a.dst)
        if (dst, a.data.dport) == VIP:
            backend = choose_backend(src, a.data.sport, dst, a.data.dport, 6, BACKENDS)
            assert (_addr(b.dst), b.data.dport) == backend
            assert (_addr(b.src), b.data.sport) == (src, a.data.sport)
            to_backend += 1
        elif (src, a.data.sport) in BACKENDS:
            # a reply: the backend becomes the VIP again, and it is the backend
            # this client's connection was sent to
            assert (_addr(b.src), b.data.sport) == VIP
            assert choose_backend(dst, a.data.dport, *VIP, 6, BACKENDS) == (src, a.data.sport)
            from_vip += 1
        else:
            assert bytes(a) == bytes(b), "traffic not for the VIP is untouched"
    assert to_backend > 500 and from_vip > 500
    assert lb.translated == to_backend + from_vip
    assert not lb.forward and not lb.reply_flows     # per-flow state freed at FLOW/END


@pytest.mark.skipif(shutil.which("tshark") is None,
                    reason="tshark is not installed (scripts/test.sh installs it as root)")
def test_tshark_finds_valid_checksums_and_consistent_conversations(run, example_pcap):
    lb = L4LB()
    run([lb], example_pcap)
    out_path = example_pcap + ".out.pcap"
    r = subprocess.run(
        ["tshark", "-n", "-r", out_path, "-o", "ip.check_checksum:TRUE",
         "-o", "tcp.check_checksum:TRUE", "-o", "udp.check_checksum:TRUE",
         "-Y", "ip.checksum.status == 0 || tcp.checksum.status == 0 || "
               "udp.checksum.status == 0", "-T", "fields", "-e", "frame.number"],
        capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"frames with bad checksums: {r.stdout[:200]}"
    r = subprocess.run(
        ["tshark", "-n", "-r", out_path, "-Y", "tcp && ip.addr == 198.18.1.0/24",
         "-T", "fields", "-e", "ip.src", "-e", "tcp.srcport", "-e", "ip.dst",
         "-e", "tcp.dstport"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    to_backend, from_vip = set(), set()
    for line in r.stdout.splitlines():
        src, sport, dst, dport = line.split("\t")
        if src.startswith("198.18.1.") and dst.startswith("198.18.2."):
            to_backend.add((src, int(sport)))
        elif src == VIP[0]:
            assert int(sport) == VIP[1]
            from_vip.add((dst, int(dport)))
        else:
            assert VIP[0] not in (src, dst), line
    assert to_backend and to_backend == from_vip, "a client talks to a backend but " \
        "hears from the VIP only if its replies were translated"
    # the backend never shows as a source towards a client
    assert "198.18.2." not in "".join(
        line.split("\t")[0] for line in r.stdout.splitlines())
