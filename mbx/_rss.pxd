# Software RSS (paper §4.2 "Parallel Stacks"): which of n stack processes a frame
# belongs to, decided from the raw bytes with a short header walk, so a process can
# pass over the other processes' packets before copying or parsing them.
#
# The answer must be the one the stack gives after the full parse (parse_packet,
# then the flow table's symmetric hash of flow_key_of), or both directions of a
# flow could land in different processes.  So the walk mirrors parse_packet's rules
# for the fields the flow key reads, and answers only where those rules are short:
# Ethernet with up to MAX_VLAN_TAGS VLAN tags (stepped over: their ids are not hashed,
# see rss_stack_of_parsed), IPv4 without options or AH, IPv6 without
# extension headers, any other transport.  Everything else (IPv4 options, AH or a
# bad header length, IPv6 extension headers) returns -1: only the full parse can
# tell (the parser walks AH to the ports of the transport inside).
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy

from mbx._flow cimport flow_hash_words, flow_key_hash, flow_key_of, mbx_flow_key
from mbx._packet cimport MAX_VLAN_TAGS, mbx_pkt

cdef extern from *:
    """
    #define MBX_LITTLE_ENDIAN (__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__)
    """
    # The IPv4 walk builds the flow key's words in registers in the little-endian
    # layout of mbx_flow_key; elsewhere it defers to the parser.
    bint MBX_LITTLE_ENDIAN


# Stack k of n owns the flows whose hash falls in the k-th n-th of the 32-bit range.
# The high bits, not hash % n: the flow table picks buckets by the low bits, and a
# share chosen by them would leave half of every process's buckets empty.
cdef inline int rss_share_of(uint32_t h, uint32_t n) noexcept nogil:
    return <int>((<uint64_t>h * n) >> 32)


cdef inline uint16_t _rss_ld16(const uint8_t *b) noexcept nogil:
    return <uint16_t>((<uint16_t>b[0] << 8) | b[1])


cdef inline uint32_t _rss_ld32(const uint8_t *b) noexcept nogil:
    return ((<uint32_t>b[0] << 24) | (<uint32_t>b[1] << 16)
            | (<uint32_t>b[2] << 8) | <uint32_t>b[3])


# The transport ports as parse_packet fills them: TCP, UDP and SCTP ports when
# their 4 bytes were captured within the IP datagram, else 0 (ICMP, other
# protocols, fragments, a capture cut before them).  cur: transport header offset;
# end: end of the captured datagram.  Without branches on the protocol: a capture
# mixing TCP and UDP at random would mispredict them on every other frame.
cdef inline uint32_t _rss_ports(uint8_t proto, const uint8_t *d, uint32_t cur,
                                uint32_t end) noexcept nogil:
    cdef uint32_t ok = ((proto == 6) | (proto == 17) | (proto == 132)) & (cur + 4 <= end)
    # read at cur only where the header is there (else at 0, always captured)
    cdef const uint8_t *t = d + (cur & (0 - ok))
    return ((<uint32_t>_rss_ld16(t) << 16) | _rss_ld16(t + 2)) & (0 - ok)


# The stack (0..n-1) that owns parsed packet p: the flow table's symmetric hash
# picks it, so both directions of a flow meet in one process.  Fragments carry no
# ports, so all of a datagram's pieces hash alike (by addresses); frames without
# an IP header are stack 0's.  The hash leaves the VLAN ids out (flow_key_hash), so
# neither this nor the walk below needs them: a flow's directions carry the same
# tags, and meet on one stack either way; flows that differ only in their VLANs
# share a stack, each its own flow there.
cdef inline int rss_stack_of_parsed(const mbx_pkt *p, uint32_t n) noexcept nogil:
    cdef mbx_flow_key key
    if p.ip_ver == 0:
        return 0
    flow_key_of(p, &key, False)
    return rss_share_of(flow_key_hash(&key), n)


# flow_key_hash(flow_key_of(p)) of an IPv4 packet without building either: the
# canonical key's five words made in registers (a: the smaller address, then port).
# The order is chosen by masks, not a branch: it is each packet's direction, which
# a branch predictor cannot learn.
cdef inline uint32_t _rss_hash_v4(const uint8_t *ip, uint8_t proto,
                                  uint32_t ports) noexcept nogil:
    cdef uint32_t src, dst, x, swap, pswap
    cdef uint32_t sport = ports >> 16, dport = ports & 0xFFFF
    cdef uint64_t w[5]
    memcpy(&src, ip + 12, 4)            # as the key holds them: bytes in wire order
    memcpy(&dst, ip + 16, 4)
    cdef uint32_t s_be = _rss_ld32(ip + 12), d_be = _rss_ld32(ip + 16)
    swap = 0 - <uint32_t>((s_be > d_be) | ((s_be == d_be) & (sport > dport)))
    x = (src ^ dst) & swap
    pswap = (sport ^ dport) & swap
    w[0] = src ^ x
    w[1] = 0
    w[2] = dst ^ x
    w[3] = 0
    w[4] = ((sport ^ pswap) | (<uint64_t>(dport ^ pswap) << 16)
            | (<uint64_t>proto << 32) | (<uint64_t>4 << 40))
    return flow_hash_words(w)


# What the walk found in a frame (rss_hash_of_frame).
cdef enum:
    RSS_PARSE = -1      # only the full parse can tell (IPv4 options or AH, IPv6
    #                     extension headers)
    RSS_NOT_IP = 0      # no IP addresses for the parser to read: stack 0's
    RSS_FLOW = 1        # *h is the flow table's hash of the frame's flow key
    RSS_FRAGMENT = 2    # *h hashes the addresses alone (an IPv4 fragment); the flow
    #                     table hashes the reassembled datagram's key instead


# The walk itself: classifies frame d[0:caplen] (wirelen bytes on the wire) and, for
# RSS_FLOW and RSS_FRAGMENT, leaves its hash in h.  Frames the parser finds no IP
# address in (non-IP, cut short before the addresses, a wrong version nibble) are
# RSS_NOT_IP, as rss_stack_of_parsed says.  An IP length past the wire frame is the
# parser's BAD_IP_LEN: left to it (RSS_PARSE), a rare frame.
cdef inline int rss_hash_of_frame(const uint8_t *d, uint32_t caplen, uint32_t wirelen,
                                  uint32_t *h) noexcept nogil:
    cdef uint32_t off = 14, nvlan = 0, ihl, tot, end, plen
    cdef uint16_t et
    cdef uint8_t proto
    cdef const uint8_t *ip
    cdef mbx_pkt k                  # IPv6: only the fields flow_key_of reads
    cdef mbx_flow_key key
    if caplen < 14:
        return RSS_NOT_IP           # TRUNC_L2
    et = _rss_ld16(d + 12)
    while et == 0x8100 or et == 0x88A8 or et == 0x9100:
        if nvlan == MAX_VLAN_TAGS or off + 4 > caplen:
            return RSS_NOT_IP       # TOO_MANY_VLAN_TAGS or TRUNC_L2: no addresses
        et = _rss_ld16(d + off + 2)
        off += 4
        nvlan += 1
    ip = d + off
    if et == 0x0800:
        if caplen - off < 20 or (ip[0] >> 4) != 4:
            return RSS_NOT_IP       # TRUNC_L3 or BAD_IP_VERSION: no addresses
        ihl = <uint32_t>(ip[0] & 0x0F) * 4
        tot = _rss_ld16(ip + 2)
        proto = ip[9]
        if (ihl != 20 or tot < 20 or off + tot > wirelen or proto == 51
                or not MBX_LITTLE_ENDIAN):
            return RSS_PARSE        # options, BAD_IHL, BAD_IP_LEN, AH: the parser's call
        if _rss_ld16(ip + 6) & 0x3FFF:
            h[0] = _rss_hash_v4(ip, proto, 0)
            return RSS_FRAGMENT
        end = off + tot if tot <= caplen - off else caplen
        h[0] = _rss_hash_v4(ip, proto, _rss_ports(proto, d, off + 20, end))
        return RSS_FLOW
    if et == 0x86DD:
        if caplen - off < 40 or (ip[0] >> 4) != 6:
            return RSS_NOT_IP
        proto = ip[6]
        if proto == 0 or proto == 43 or proto == 44 or proto == 51 or proto == 60:
            return RSS_PARSE        # extension headers: the parser walks them
        memcpy(k.src.b, ip + 8, 16)
        memcpy(k.dst.b, ip + 24, 16)
        k.ip_ver = 6
        k.l4_proto = proto
        plen = _rss_ld16(ip + 4)
        if off + 40 + plen > wirelen:
            return RSS_PARSE        # BAD_IP_LEN
        end = off + 40 + plen if 40 + plen <= caplen - off else caplen
        plen = _rss_ports(proto, d, off + 40, end)
        k.sport = <uint16_t>(plen >> 16)
        k.dport = <uint16_t>plen
        flow_key_of(&k, &key, False)
        h[0] = flow_key_hash(&key)
        return RSS_FLOW
    return RSS_NOT_IP               # NOT_IP


# The stack (0..n-1) that owns frame d[0:caplen], or -1 when only the full parse can
# tell.
cdef inline int rss_stack_of_frame(const uint8_t *d, uint32_t caplen, uint32_t wirelen,
                                   uint32_t n) noexcept nogil:
    cdef uint32_t h = 0
    cdef int kind = rss_hash_of_frame(d, caplen, wirelen, &h)
    if kind == RSS_PARSE:
        return -1
    return rss_share_of(h, n)       # RSS_NOT_IP: h = 0, stack 0
