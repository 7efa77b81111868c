"""The built-in example capture, made here rather than downloaded.

It is the traffic a load balancer in front of the VIP 198.18.3.1:80 sees: clients
(198.18.1.0/24) open TCP connections to the VIP, send an HTTP GET and read a
response that the backend (198.18.2.1 or .2, chosen by ``l4lb.choose_backend``)
sends back from its own address.  Around it: DNS over UDP, IPv6 connections, VLAN
and QinQ tagged frames, a fragmented UDP datagram, ICMP echo and an ICMP error,
ARP, and a few malformed frames, so every part of the stack has work.
"""
import random
import struct

from mbx.nfs.l4lb import choose_backend

VIP = ("198.18.3.1", 80)
BACKENDS = [("198.18.2.1", 80), ("198.18.2.2", 80)]
# Client ports are 20000 + 2i, one a flow, and must stay below 65536.
FLOWS_MAX = 20000
MAC_C = bytes.fromhex("020000000001")
MAC_S = bytes.fromhex("020000000002")


def _csum(data):
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def _ip4(a):
    return bytes(int(x) for x in a.split("."))


def _ip6(a):
    import ipaddress

    return ipaddress.IPv6Address(a).packed


def _l4(proto, src, dst, sport, dport, payload, seq=0, ack=0, flags=0x18, win=65535,
        opts=b"", v6=False):
    if proto == 6:
        off = (20 + len(opts)) // 4
        hdr = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, off << 4, flags, win, 0, 0)
        seg = hdr + opts + payload
        csum_at = 16
    else:
        seg = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
        csum_at = 6
    if v6:
        pseudo = src + dst + struct.pack("!IxxxB", len(seg), proto)
    else:
        pseudo = src + dst + struct.pack("!xBH", proto, len(seg))
    c = _csum(pseudo + seg) or (0xFFFF if proto == 17 else 0)
    return seg[:csum_at] + struct.pack("!H", c) + seg[csum_at + 2:]


def ipv4(src, dst, proto, l4, ident=0, frag=0, ttl=64):
    s, d = _ip4(src), _ip4(dst)
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(l4), ident, frag, ttl, proto, 0, s, d)
    hdr = hdr[:10] + struct.pack("!H", _csum(hdr)) + hdr[12:]
    return hdr + l4


def ether(payload, ethertype=0x0800, vlans=()):
    tags = b""
    tpids = [0x88A8, 0x8100] if len(vlans) == 2 else [0x8100]
    for tpid, vid in zip(tpids, vlans, strict=False):
        tags += struct.pack("!HH", tpid, vid)
    return MAC_S + MAC_C + tags + struct.pack("!H", ethertype) + payload


def tcp4(src, dst, sport, dport, payload=b"", **kw):
    l4 = _l4(6, _ip4(src), _ip4(dst), sport, dport, payload, **kw)
    return ipv4(src, dst, 6, l4)


def udp4(src, dst, sport, dport, payload=b""):
    return ipv4(src, dst, 17, _l4(17, _ip4(src), _ip4(dst), sport, dport, payload))


def tcp6(src, dst, sport, dport, payload=b"", **kw):
    s, d = _ip6(src), _ip6(dst)
    l4 = _l4(6, s, d, sport, dport, payload, v6=True, **kw)
    return struct.pack("!IHBB16s16s", 6 << 28, len(l4), 6, 64, s, d) + l4


def tcp_connection(cli, srv, reply_from, request, response, t, isn_c, isn_s, mss=1448,
                   wrap=tcp4, ethertype=0x0800, vlans=()):
    """Frames (ts, bytes) of one connection: handshake, request, response, FIN close."""
    (ca, cp), (sa, sp), (ra, rp) = cli, srv, reply_from
    out = []

    def c2s(ts, **kw):
        out.append((ts, ether(wrap(ca, sa, cp, sp, **kw), ethertype, vlans)))

    def s2c(ts, **kw):
        out.append((ts, ether(wrap(ra, ca, rp, cp, **kw), ethertype, vlans)))

    opts = struct.pack("!BBH", 2, 4, mss) + b"\x01\x03\x03\x07"  # MSS, NOP, WS=7
    c2s(t, seq=isn_c, flags=0x02, opts=opts)
    s2c(t + 0.0001, seq=isn_s, ack=isn_c + 1, flags=0x12, opts=opts)
    c2s(t + 0.0002, seq=isn_c + 1, ack=isn_s + 1, flags=0x10)
    c2s(t + 0.0003, seq=isn_c + 1, ack=isn_s + 1, flags=0x18, payload=request)
    seq = isn_s + 1
    ts = t + 0.0005
    for i in range(0, len(response), mss):
        chunk = response[i:i + mss]
        s2c(ts, seq=seq, ack=isn_c + 1 + len(request), flags=0x18 if i + mss >= len(
            response) else 0x10, payload=chunk)
        seq += len(chunk)
        ts += 0.00002
    c2s(ts, seq=isn_c + 1 + len(request), ack=seq, flags=0x11)
    s2c(ts + 0.0001, seq=seq, ack=isn_c + 2 + len(request), flags=0x11)
    c2s(ts + 0.0002, seq=isn_c + 2 + len(request), ack=seq + 1, flags=0x10)
    return out


def example_frames(flows=200, seed=1, t0=1_700_000_000.0):
    """Every frame of the example capture as (timestamp seconds, bytes), in time order."""
    if not 1 <= flows <= FLOWS_MAX:
        raise ValueError(f"flows must be from 1 to {FLOWS_MAX:,}, not {flows}")
    rng = random.Random(seed)
    frames = []
    for i in range(flows):
        cli = (f"198.18.1.{1 + i % 250}", 20000 + 2 * i)
        backend = choose_backend(cli[0], cli[1], VIP[0], VIP[1], 6, BACKENDS)
        path = f"/{rng.choice(['index.html', 'small', 'big'])}"
        req = f"GET {path} HTTP/1.1\r\nHost: 198.18.3.1\r\n\r\n".encode()
        body = bytes(rng.getrandbits(8) for _ in range(rng.choice([64, 1000, 8192])))
        resp = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body
        frames += tcp_connection(cli, VIP, backend, req, resp, t0 + i * 0.003,
                                 rng.getrandbits(32), rng.getrandbits(32))
    for i in range(flows // 10):            # IPv6, one in two with an 802.1Q tag
        cli = (f"2001:db8:1::{i + 1:x}", 30000 + i)
        srv = ("2001:db8:2::1", 443)
        frames += tcp_connection(cli, srv, srv, b"hello", b"world" * 50, t0 + 0.5 + i * 0.01,
                                 rng.getrandbits(32), rng.getrandbits(32), wrap=tcp6,
                                 ethertype=0x86DD, vlans=(100,) if i % 2 else ())
    for i in range(flows // 5):             # DNS
        q = (struct.pack("!HHHHHH", i, 0x0100, 1, 0, 0, 0)
             + b"\x07example\x03com\x00\x00\x01\x00\x01")
        t = t0 + 0.2 + i * 0.005
        cli = f"198.18.1.{1 + i % 250}"
        frames.append((t, ether(udp4(cli, "198.18.0.53", 40000 + i, 53, q))))
        frames.append((t + 0.0004, ether(udp4("198.18.0.53", f"198.18.1.{1 + i % 250}", 53,
                                              40000 + i, q + b"\xc0\x0c\x00\x01\x00\x01"
                                              b"\x00\x00\x00\x3c\x00\x04\xc6\x12\x03\x01"))))
    for i in range(5):                      # SQL clients, two of them hostile
        query = (b"SELECT * FROM users WHERE name='' OR 1=1 --'" if i % 3 == 0
                 else b"SELECT id FROM orders WHERE id=42")
        frames += tcp_connection((f"198.18.1.{50 + i}", 41000 + i), ("198.18.0.33", 3306),
                                 ("198.18.0.33", 3306), query, b"\x07\x00\x00\x01ok",
                                 t0 + 0.6 + i * 0.01, rng.getrandbits(32),
                                 rng.getrandbits(32))
    # QinQ-tagged TCP, a fragmented UDP datagram (3 fragments, sent out of order)
    frames += tcp_connection(("198.18.1.200", 5555), ("198.18.0.80", 8080),
                             ("198.18.0.80", 8080), b"ping", b"pong", t0 + 0.7, 1, 2,
                             vlans=(10, 20), ethertype=0x0800)
    data = _l4(17, _ip4("198.18.1.9"), _ip4("198.18.0.9"), 7000, 7001, bytes(range(256)) * 16)
    pieces = [data[0:1480], data[1480:2960], data[2960:]]
    offs = [0, 1480, 2960]
    fr = []
    for k, (piece, off) in enumerate(zip(pieces, offs, strict=True)):
        more = 0x2000 if k < 2 else 0
        fr.append(ether(ipv4("198.18.1.9", "198.18.0.9", 17, piece, ident=0x4242,
                             frag=more | (off // 8))))
    frames += [(t0 + 0.8, fr[2]), (t0 + 0.8001, fr[0]), (t0 + 0.8002, fr[1])]
    # ICMP echo and a port-unreachable quoting a TCP header
    echo = struct.pack("!BBHHH", 8, 0, 0, 1, 1) + b"abcdefgh"
    echo = echo[:2] + struct.pack("!H", _csum(echo)) + echo[4:]
    frames.append((t0 + 0.9, ether(ipv4("198.18.1.1", "198.18.0.1", 1, echo))))
    quoted = tcp4("198.18.1.1", "198.18.0.1", 1234, 9999, seq=5)[:28]
    err = struct.pack("!BBHI", 3, 3, 0, 0) + quoted
    err = err[:2] + struct.pack("!H", _csum(err)) + err[4:]
    frames.append((t0 + 0.9001, ether(ipv4("198.18.0.1", "198.18.1.1", 1, err))))
    # ARP request, and malformed frames: a cut TCP header, a lying IPv4 IHL
    arp = struct.pack("!HHBBH6s4s6s4s", 1, 0x0800, 6, 4, 1, MAC_C, _ip4("198.18.1.1"),
                      b"\0" * 6, _ip4("198.18.1.254"))
    frames.append((t0 + 0.95, ether(arp, 0x0806)))
    frames.append((t0 + 0.96, ether(tcp4("198.18.1.7", "198.18.0.7", 1, 2)[:30])))
    bad = bytearray(tcp4("198.18.1.8", "198.18.0.8", 1, 2))
    bad[0] = 0x4F
    frames.append((t0 + 0.97, ether(bytes(bad))))
    frames.sort(key=lambda f: f[0])
    return frames


def write_pcap(path, frames, nanosecond=False):
    """Write (timestamp seconds, bytes) frames as a classic pcap file."""
    magic = 0xA1B23C4D if nanosecond else 0xA1B2C3D4
    scale = 1_000_000_000 if nanosecond else 1_000_000
    with open(path, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", magic, 2, 4, 0, 0, 262144, 1))
        for ts, frame in frames:
            ticks = round(ts * scale)
            fh.write(struct.pack("<IIII", ticks // scale, ticks % scale, len(frame), len(frame)))
            fh.write(frame)
    return len(frames)


def write_example(path, flows=200, seed=1):
    """Write the example capture to ``path``; returns the number of packets."""
    return write_pcap(path, example_frames(flows, seed))
