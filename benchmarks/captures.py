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
import numpy as np

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
