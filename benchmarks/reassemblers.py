"""A reference TCP reassembler in plain Python over dpkt: the baseline of the TCP
Monitor's bulk figures, and a second opinion on ``mbx flows``' digests.

Per direction of each connection: bytes in sequence order, offset 0 the byte after
the ISN when the SYN was seen (else the first byte seen), overlaps keep the bytes
that arrived first, out-of-order segments wait in a heap until the hole before them
fills, and each direction's stream is hashed with SHA-256 as it grows.  A connection
is keyed ``cli:port-srv:port`` with the client the sender of the first pure SYN (else
of the first packet), as ``mbx flows`` keys it.  What it does not do, and the
benchmark captures do not need: skip holes the peer acknowledged (lost segments),
number reused 5-tuples (``#2``), IPv6 and VLANs.
"""
import hashlib
import heapq
import socket

import dpkt

_SYN, _FIN, _RST, _ACK = dpkt.tcp.TH_SYN, dpkt.tcp.TH_FIN, dpkt.tcp.TH_RST, dpkt.tcp.TH_ACK


class _Direction:
    __slots__ = ("base", "next", "heap", "sha", "length", "pkts", "arrivals")

    def __init__(self):
        self.base = None        # sequence number of stream offset 0
        self.next = 0           # stream offset of the next byte to deliver
        self.heap = []          # (offset, arrival, bytes) waiting behind a hole
        self.sha = hashlib.sha256()
        self.length = 0
        self.pkts = 0
        self.arrivals = 0

    def add(self, seq, data):
        off = (seq - self.base) & 0xFFFFFFFF
        if off >= 0x80000000:           # before offset 0: a retransmitted SYN's data?
            return
        end = off + len(data)
        nxt = self.next
        if off > nxt:
            self.arrivals += 1
            heapq.heappush(self.heap, (off, self.arrivals, data))
            return
        if end <= nxt:
            return                      # all delivered already: first wins
        if off < nxt:
            data = data[nxt - off:]
        self.sha.update(data)
        self.length += len(data)
        self.next = end
        heap = self.heap
        while heap and heap[0][0] <= self.next:
            o, _, d = heapq.heappop(heap)
            e = o + len(d)
            if e > self.next:
                d = d[self.next - o:]
                self.sha.update(d)
                self.length += len(d)
                self.next = e


class _Connection:
    __slots__ = ("first", "client", "dirs", "close", "syn", "synack", "ack", "order")

    def __init__(self, first, order):
        self.first = first      # (addr, port) of the first packet's sender
        self.client = None      # (addr, port) of the pure SYN's sender
        self.dirs = {}
        self.close = 0
        self.syn = self.synack = self.ack = False
        self.order = order


def reassemble(path):
    """{``cli:port-srv:port``: record} of every TCP connection of the pcap ``path``,
    records as ``mbx flows`` writes them (lengths, SHA-256 digests, packets, handshake,
    close)."""
    conns = {}
    ethernet = dpkt.ethernet.Ethernet
    ip_type, tcp_type = dpkt.ip.IP, dpkt.tcp.TCP
    with open(path, "rb") as fh:
        for _ts, buf in dpkt.pcap.Reader(fh):
            ip = ethernet(buf).data
            if type(ip) is not ip_type:
                continue
            tcp = ip.data
            if type(tcp) is not tcp_type:
                continue
            a, b = (ip.src, tcp.sport), (ip.dst, tcp.dport)
            key = (a, b) if a <= b else (b, a)
            conn = conns.get(key)
            if conn is None:
                conn = conns[key] = _Connection(a, len(conns))
            d = conn.dirs.get(a)
            if d is None:
                d = conn.dirs[a] = _Direction()
            d.pkts += 1
            flags = tcp.flags
            seq = tcp.seq
            if flags & _SYN:
                if flags & _ACK:
                    conn.synack = True
                else:
                    conn.syn = True
                    if conn.client is None:
                        conn.client = a
                d.base = (seq + 1) & 0xFFFFFFFF
                seq = d.base
            elif flags & _ACK and conn.syn and conn.synack and a == conn.client:
                conn.ack = True
            if flags & _RST:
                conn.close |= 2
            if flags & _FIN:
                conn.close |= 1
            data = tcp.data
            if data:
                if d.base is None:
                    d.base = seq        # midstream pickup
                d.add(seq, data)
    out = {}
    for conn in sorted(conns.values(), key=lambda c: c.order):
        cli = conn.client or conn.first
        srv = next((e for e in conn.dirs if e != cli), None)
        if srv is None:     # one-sided: the key's other end
            (x, y) = next(k for k, v in conns.items() if v is conn)
            srv = y if x == cli else x
        c2s, s2c = conn.dirs.get(cli, _Direction()), conn.dirs.get(srv, _Direction())
        name = (f"{socket.inet_ntoa(cli[0])}:{cli[1]}-"
                f"{socket.inet_ntoa(srv[0])}:{srv[1]}")
        out[name] = {
            "c2s_len": c2s.length, "c2s_sha256": c2s.sha.hexdigest(),
            "s2c_len": s2c.length, "s2c_sha256": s2c.sha.hexdigest(),
            "pkts_c2s": c2s.pkts, "pkts_s2c": s2c.pkts,
            "handshake": conn.syn and conn.synack and conn.ack,
            "close": "rst" if conn.close & 2 else ("fin" if conn.close & 1 else "none"),
        }
    return out


def differences(mbx_connections, ref_connections,
                fields=("c2s_len", "c2s_sha256", "s2c_len", "s2c_sha256")):
    """Where ``mbx flows``' connections and the reference's disagree (a list of
    strings; empty when every connection has the same lengths and digests)."""
    diffs = []
    for key in sorted(set(mbx_connections) | set(ref_connections)):
        m, r = mbx_connections.get(key), ref_connections.get(key)
        if m is None or r is None:
            diffs.append(f"{key}: only in {'the reference' if m is None else 'mbx'}")
            continue
        for f in fields:
            if m[f] != r[f]:
                diffs.append(f"{key}: {f} mbx {m[f]!r}, reference {r[f]!r}")
    return diffs
