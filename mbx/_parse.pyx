"""The one packet parser of mbx, and IP fragment reassembly.

``parse_packet`` runs once per packet without the GIL and fills the parser fields of
an ``mbx_pkt``; ``FragTable`` rebuilds fragmented datagrams in the batch arena so the
stacks above only ever see whole IP datagrams.  ``parse``, ``status_names``,
``parse_many`` and ``FragTable.push`` are the Python face for tests and tools.
"""
import ipaddress
import time

from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uintptr_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcmp, memcpy, memset

from mbx._checksum cimport csum
from mbx._fragment cimport (
    FRAG_HDR_MAX, frag_header, frag_payload_at, frag_payload_len, frag_plan, frag_plan_for,
)
from mbx._packet cimport MAX_VLAN_TAGS as VLAN_TAGS_WALKED
from mbx._packet cimport (
    MAX_SACK_BLOCKS,
    PARSE_BAD_FRAG,
    PARSE_BAD_IHL,
    PARSE_BAD_IP_LEN,
    PARSE_BAD_IP_OPTION,
    PARSE_BAD_IP_VERSION,
    PARSE_BAD_IPV4_AH,
    PARSE_BAD_IPV6_EXT,
    PARSE_BAD_TCP_OFF,
    PARSE_BAD_TCP_OPT,
    PARSE_BAD_UDP_LEN,
    PARSE_FRAG_MEMCAP,
    PARSE_N,
    PARSE_NOT_IP,
    PARSE_OK,
    PARSE_TRUNC_L2,
    PARSE_TRUNC_L3,
    PARSE_TRUNC_L4,
    PARSE_TOO_MANY_VLAN_TAGS,
    PKT_F_FRAGMENT,
    PKT_F_ICMP_ERROR,
    PKT_F_IP_OPTIONS,
    PKT_F_REASSEMBLED,
    PKT_F_RSS_HASH,
    PKT_F_STACK_DROP,
    PKT_F_TRUNCATED,
    TCPOPT_F_CUT,
    TCPOPT_F_MSS,
    TCPOPT_F_SACK,
    TCPOPT_F_SACK_OK,
    TCPOPT_F_TS,
    TCPOPT_F_WSCALE,
    VERDICT_DROP,
    VERDICT_HELD,
    VERDICT_PASS,
    Batch,
    mbx_pkt,
)

# The ParseStatus names in enum order: counters and the CLI print these.
_STATUS_NAMES = (
    "ok", "not_ip", "trunc_l2", "trunc_l3", "bad_ip_version", "bad_ihl", "bad_ip_len",
    "bad_ip_option", "bad_ipv6_ext", "bad_ipv4_ah", "bad_frag", "trunc_l4", "bad_tcp_off",
    "bad_tcp_opt", "bad_udp_len", "frag_timeout", "frag_memcap", "too_many_vlan_tags",
)
assert len(_STATUS_NAMES) == PARSE_N, "ParseStatus and _STATUS_NAMES disagree"
_DEFRAG_NAMES = ("none", "held", "done", "drop")
# The most fragments FragTable rebuilds a datagram from (FRAG_MAX_PIECES)
MAX_FRAGMENTS = FRAG_MAX_PIECES
# The most VLAN tags parsed through; a frame with more is too_many_vlan_tags
MAX_VLAN_TAGS = VLAN_TAGS_WALKED
_FLAG_NAMES = ((PKT_F_FRAGMENT, "fragment"), (PKT_F_REASSEMBLED, "reassembled"),
               (PKT_F_ICMP_ERROR, "icmp_error"), (PKT_F_IP_OPTIONS, "ip_options"),
               (PKT_F_TRUNCATED, "truncated"), (PKT_F_RSS_HASH, "rss_hash"),
               (PKT_F_STACK_DROP, "stack_drop"))

cdef enum:
    ETH_HLEN = 14
    ETHERTYPE_IPV4 = 0x0800
    ETHERTYPE_IPV6 = 0x86DD
    ETHERTYPE_VLAN = 0x8100
    ETHERTYPE_QINQ = 0x88A8
    ETHERTYPE_QINQ_OLD = 0x9100     # pre-802.1ad QinQ, still seen on old switches
    IPPROTO_HOPOPTS = 0
    IPPROTO_ICMP = 1
    IPPROTO_TCP = 6
    IPPROTO_UDP = 17
    IPPROTO_ROUTING = 43
    IPPROTO_FRAGMENT = 44
    IPPROTO_AH = 51
    IPPROTO_ICMPV6 = 58
    IPPROTO_DSTOPTS = 60
    IPPROTO_SCTP = 132
    IP_MAXPACKET = 65535
    NO_SLOT = 0xFFFFFFFF
    # FragTable.spill: the most _rebuild writes (its datagram's length bound, behind
    # the longest L2 header the parser walks)
    SPILL_SIZE = ETH_HLEN + 4 * VLAN_TAGS_WALKED + 40 + IP_MAXPACKET


# Big-endian loads and stores, one byte at a time: frames are not aligned, and the
# compiler turns these into a load plus bswap.
cdef inline uint16_t ld16(const uint8_t *b) noexcept nogil:
    return <uint16_t>((<uint16_t>b[0] << 8) | b[1])


cdef inline uint32_t ld32(const uint8_t *b) noexcept nogil:
    return ((<uint32_t>b[0] << 24) | (<uint32_t>b[1] << 16)
            | (<uint32_t>b[2] << 8) | <uint32_t>b[3])


cdef inline void st16(uint8_t *b, uint32_t v) noexcept nogil:
    b[0] = <uint8_t>(v >> 8)
    b[1] = <uint8_t>v


cdef inline int _done(mbx_pkt *p, int status) noexcept nogil:
    p.status = <uint8_t>status
    return status


cdef inline int _parse_tcp_options(mbx_pkt *p, const uint8_t *t, uint32_t doff) noexcept nogil:
    # Known kinds with a wrong length are skipped, not fatal (as Linux does); only a
    # length that breaks the walk itself is a malformation.  Options parsed before
    # the bad one stay filled in.
    cdef uint32_t i = 20, kind, olen, j, nblk
    while i < doff:
        kind = t[i]
        if kind == 0:
            break
        if kind == 1:
            i += 1
            continue
        if i + 2 > doff:
            return _done(p, PARSE_BAD_TCP_OPT)
        olen = t[i + 1]
        if olen < 2 or i + olen > doff:
            return _done(p, PARSE_BAD_TCP_OPT)
        if kind == 2:
            if olen == 4:
                p.mss = ld16(t + i + 2)
                p.tcp_opts |= TCPOPT_F_MSS
        elif kind == 3:
            if olen == 3:
                p.wscale = t[i + 2]
                p.tcp_opts |= TCPOPT_F_WSCALE
        elif kind == 4:
            if olen == 2:
                p.tcp_opts |= TCPOPT_F_SACK_OK
        elif kind == 5:
            if olen >= 10 and (olen - 2) % 8 == 0 and not (p.tcp_opts & TCPOPT_F_SACK):
                nblk = (olen - 2) // 8
                if nblk > MAX_SACK_BLOCKS:
                    nblk = MAX_SACK_BLOCKS
                for j in range(nblk):
                    p.sack[2 * j] = ld32(t + i + 2 + 8 * j)
                    p.sack[2 * j + 1] = ld32(t + i + 6 + 8 * j)
                p.nsack = <uint8_t>nblk
                p.tcp_opts |= TCPOPT_F_SACK
        elif kind == 8:
            if olen == 10:
                p.tsval = ld32(t + i + 2)
                p.tsecr = ld32(t + i + 6)
                p.tcp_opts |= TCPOPT_F_TS
        i += olen
    return _done(p, PARSE_OK)


# cur: transport header offset; end: end of the captured IP datagram (never past
# caplen); decl: where the IP header says the datagram ends (may be past caplen).
# Lengths that overrun decl are lies (BAD_*); lengths that only overrun end are a
# short capture (TRUNC_L4).
cdef inline int _parse_l4(mbx_pkt *p, const uint8_t *d, uint32_t cur, uint32_t end,
                          uint32_t decl) noexcept nogil:
    cdef const uint8_t *t = d + cur
    cdef uint32_t doff, ulen, uend
    cdef uint8_t proto = p.l4_proto
    p.l4_off = cur
    if proto == IPPROTO_TCP or proto == IPPROTO_UDP or proto == IPPROTO_SCTP:
        # The ports lead all three headers: kept whenever they were captured, so a
        # header cut short by a snaplen still keys its own flow, not a 0:0 one it
        # would share with every other connection cut so between the same addresses.
        # SCTP's keep its associations between two hosts apart (they differ by port
        # only), and agree with the AF_PACKET fanout hash and the RSS walk, which
        # take them.
        if cur + 4 > end:
            return _done(p, PARSE_TRUNC_L4)
        p.sport = ld16(t)
        p.dport = ld16(t + 2)
    if proto == IPPROTO_TCP:
        if cur + 20 > end:
            return _done(p, PARSE_TRUNC_L4)
        p.seq = ld32(t + 4)
        p.ack = ld32(t + 8)
        p.tcp_flags = t[13]
        p.win = ld16(t + 14)
        doff = <uint32_t>(t[12] >> 4) * 4
        if doff < 20 or cur + doff > decl:
            return _done(p, PARSE_BAD_TCP_OFF)
        if cur + doff > end:
            # The snaplen cut the options, the fixed header read above is whole: the
            # segment is tracked on it as tshark decodes it (a SYN dropped here took
            # its connection's handshake and direction with it).  The options are
            # unknown, not absent (TCPOPT_F_CUT), and no payload was captured, so
            # the payload starts at the captured end, empty.  It stays TRUNC_L4 for
            # the parse counters: its header is cut, whatever the stack makes of it.
            p.tcp_opts = TCPOPT_F_CUT
            p.flags |= PKT_F_TRUNCATED
            p.payload_off = end
            p.payload_len = 0
            return _done(p, PARSE_TRUNC_L4)
        p.payload_off = cur + doff
        p.payload_len = end - p.payload_off
        if doff > 20:
            return _parse_tcp_options(p, t, doff)
        return _done(p, PARSE_OK)
    if proto == IPPROTO_UDP:
        if cur + 8 > end:
            return _done(p, PARSE_TRUNC_L4)
        p.payload_off = cur + 8
        p.payload_len = end - p.payload_off
        ulen = ld16(t + 4)
        if ulen < 8 or cur + ulen > decl:
            return _done(p, PARSE_BAD_UDP_LEN)
        uend = cur + ulen
        if uend < end:
            p.payload_len = uend - p.payload_off
        return _done(p, PARSE_OK)
    if ((proto == IPPROTO_ICMP and p.ip_ver == 4)
            or (proto == IPPROTO_ICMPV6 and p.ip_ver == 6)):
        if cur + 8 > end:
            return _done(p, PARSE_TRUNC_L4)
        p.icmp_type = t[0]
        p.icmp_code = t[1]
        # An error quotes the packet that caused it; its ports belong to that other
        # packet, so they are left for an NF that asks, not put in this one's fields.
        if proto == IPPROTO_ICMP:
            if t[0] == 3 or t[0] == 4 or t[0] == 5 or t[0] == 11 or t[0] == 12:
                p.flags |= PKT_F_ICMP_ERROR
        elif 1 <= t[0] <= 4:
            p.flags |= PKT_F_ICMP_ERROR
        p.payload_off = cur + 8
        p.payload_len = end - p.payload_off
        return _done(p, PARSE_OK)
    # SCTP (its ports read above), GRE, ESP, ...: the transport header is the
    # payload as far as we know.
    p.payload_off = cur
    p.payload_len = end - cur
    return _done(p, PARSE_OK)


# IPv4's Authentication Headers (RFC 4302) between the IP header and the transport,
# walked as the IPv6 chain walks its AH, so a TCP or UDP packet inside AH keys its
# own flow by its ports and reaches the L4 checks.  cur (in/out): the header after
# the IP header, left at the transport header; end, decl: as for _parse_l4; cut: the
# status of a header past the captured bytes only (TRUNC_L3, or BAD_IP_LEN when the
# IP length lies).  PARSE_OK to go on to the transport, else p's status.  Each AH is
# at least 8 bytes, so the walk ends within tot / 8 steps.
cdef inline int _skip_ipv4_ah(mbx_pkt *p, const uint8_t *d, uint32_t *cur,
                              uint32_t end, uint32_t decl, int cut) noexcept nogil:
    cdef uint32_t at = cur[0], hlen
    while p.l4_proto == IPPROTO_AH:
        if at + 2 > decl:
            return _done(p, PARSE_BAD_IPV4_AH)
        if at + 2 > end:
            return _done(p, cut)
        hlen = (<uint32_t>d[at + 1] + 2) * 4
        if at + hlen > decl:
            return _done(p, PARSE_BAD_IPV4_AH)
        if at + hlen > end:
            return _done(p, cut)
        p.l4_proto = d[at]
        at += hlen
    cur[0] = at
    return PARSE_OK


cdef inline int _parse_ipv4(mbx_pkt *p, const uint8_t *d, uint32_t off,
                            uint32_t n) noexcept nogil:
    cdef const uint8_t *ip = d + off
    cdef uint32_t avail = n - off
    cdef uint32_t ihl, tot, end, i, olen, fo
    cdef uint32_t cur = off
    if avail < 20:
        return _done(p, PARSE_TRUNC_L3)
    if (ip[0] >> 4) != 4:
        return _done(p, PARSE_BAD_IP_VERSION)
    p.ip_ver = 4
    p.ttl = ip[8]
    p.l4_proto = ip[9]
    tot = ld16(ip + 2)
    p.ip_len = tot
    p.frag_id = ld16(ip + 4)
    memcpy(p.src.b, ip + 12, 4)
    memcpy(p.dst.b, ip + 16, 4)
    ihl = <uint32_t>(ip[0] & 0x0F) * 4
    # A header past the captured bytes is a short capture when the wire had more,
    # and a lie when even the wire frame was shorter.
    if ihl < 20 or (ihl > avail and off + ihl > p.wirelen):
        return _done(p, PARSE_BAD_IHL)
    if ihl > avail:
        return _done(p, PARSE_TRUNC_L3)
    if tot == 0 and p.wirelen > off + ihl:
        # Captured on the sending host with TCP segmentation offload: the kernel
        # leaves the total length to the NIC, so the datagram is the whole frame (as
        # Wireshark reads it).
        tot = p.wirelen - off
        p.ip_len = tot
    if tot < ihl:
        return _done(p, PARSE_BAD_IP_LEN)
    if ihl > 20:
        p.flags |= PKT_F_IP_OPTIONS
        i = 20
        while i < ihl:
            if ip[i] == 0:          # end of option list
                break
            if ip[i] == 1:          # no-op
                i += 1
                continue
            if i + 2 > ihl:
                return _done(p, PARSE_BAD_IP_OPTION)
            olen = ip[i + 1]
            if olen < 2 or i + olen > ihl:
                return _done(p, PARSE_BAD_IP_OPTION)
            i += olen
    # Bytes after the total length are Ethernet padding, not payload.
    end = off + tot
    if tot > avail:
        # Past the captured bytes only, a capture cut by its snaplen; past the frame
        # on the wire too, a lie (Wireshark: "total length exceeds packet length").
        end = n
        p.flags |= PKT_F_TRUNCATED
        if off + tot > p.wirelen:
            # A lying fragment is refused before it is taken for one: it could only
            # be rebuilt into a datagram with bytes that never came.  Otherwise the
            # transport header is read as far as it was captured, as Wireshark does:
            # its ports keep the packet in its own flow (a capture rewritten after a
            # snaplen cut, with wire lengths lost, says this of every long frame).
            if ld16(ip + 6) & 0x3FFF:
                return _done(p, PARSE_BAD_IP_LEN)
            cur += ihl
            if _skip_ipv4_ah(p, d, &cur, end, off + tot, PARSE_BAD_IP_LEN) != PARSE_OK:
                return p.status
            _parse_l4(p, d, cur, end, off + tot)
            return _done(p, PARSE_BAD_IP_LEN)
    fo = ld16(ip + 6)
    # A fragment's AH is in its fragmentable part (RFC 4302 applies AH to whole
    # datagrams, fragmentation comes after): only the rebuilt datagram is walked.
    if fo & 0x3FFF:
        p.flags |= PKT_F_FRAGMENT
        p.frag_off = fo & 0x1FFF
        p.frag_more = (fo >> 13) & 1
        p.payload_off = off + ihl
        p.payload_len = end - p.payload_off
        if <uint32_t>p.frag_off * 8 + (tot - ihl) > IP_MAXPACKET:
            return _done(p, PARSE_BAD_FRAG)
        return _done(p, PARSE_OK)
    cur += ihl
    if _skip_ipv4_ah(p, d, &cur, end, off + tot, PARSE_TRUNC_L3) != PARSE_OK:
        return p.status
    return _parse_l4(p, d, cur, end, off + tot)


cdef inline int _parse_ipv6(mbx_pkt *p, const uint8_t *d, uint32_t off,
                            uint32_t n) noexcept nogil:
    cdef const uint8_t *ip = d + off
    cdef uint32_t plen, decl, end, cur, hlen, fo
    cdef uint8_t nh
    cdef int cut = PARSE_TRUNC_L3      # what a header past the captured bytes is
    if n - off < 40:
        return _done(p, PARSE_TRUNC_L3)
    if (ip[0] >> 4) != 6:
        return _done(p, PARSE_BAD_IP_VERSION)
    p.ip_ver = 6
    plen = ld16(ip + 4)
    nh = ip[6]
    p.ttl = ip[7]
    p.ip_len = 40 + plen
    memcpy(p.src.b, ip + 8, 16)
    memcpy(p.dst.b, ip + 24, 16)
    decl = off + 40 + plen
    end = decl
    if decl > n:
        # as for IPv4: a cut capture, or a lie when even the wire frame is shorter;
        # a lie is the packet's status however far the walk gets, and the headers
        # are read as far as they were captured (the ports keep it in its flow)
        end = n
        p.flags |= PKT_F_TRUNCATED
        if decl > p.wirelen:
            cut = PARSE_BAD_IP_LEN
    cur = off + 40
    # Every header advances cur by at least 8 bytes, so the walk ends within
    # plen / 8 steps however the chain is built.
    while True:
        p.l4_proto = nh
        if (nh == IPPROTO_HOPOPTS or nh == IPPROTO_ROUTING or nh == IPPROTO_DSTOPTS
                or nh == IPPROTO_AH):
            if cur + 2 > decl:
                return _done(p, PARSE_BAD_IPV6_EXT)
            if cur + 2 > end:
                return _done(p, cut)
            if nh == IPPROTO_AH:
                hlen = (<uint32_t>d[cur + 1] + 2) * 4
            else:
                hlen = (<uint32_t>d[cur + 1] + 1) * 8
            if cur + hlen > decl:
                return _done(p, PARSE_BAD_IPV6_EXT)
            if cur + hlen > end:
                return _done(p, cut)
            nh = d[cur]
            cur += hlen
        elif nh == IPPROTO_FRAGMENT:
            if cur + 8 > decl:
                return _done(p, PARSE_BAD_IPV6_EXT)
            if cur + 8 > end:
                return _done(p, cut)
            nh = d[cur]
            fo = ld16(d + cur + 2)
            p.frag_id = ld32(d + cur + 4)
            cur += 8
            # An atomic fragment (offset 0, M clear) is a whole datagram: parse on.
            if fo & 0xFFF9:
                if cut == PARSE_BAD_IP_LEN:
                    return _done(p, cut)    # never rebuilt from bytes that never came
                p.l4_proto = nh
                p.flags |= PKT_F_FRAGMENT
                p.frag_off = fo >> 3
                p.frag_more = fo & 1
                p.payload_off = cur
                p.payload_len = end - cur
                if <uint32_t>p.frag_off * 8 + (decl - cur) > IP_MAXPACKET:
                    return _done(p, PARSE_BAD_FRAG)
                return _done(p, PARSE_OK)
        else:
            break
    if cut == PARSE_BAD_IP_LEN:
        _parse_l4(p, d, cur, end, decl)
        return _done(p, cut)
    return _parse_l4(p, d, cur, end, decl)


cdef int parse_packet(mbx_pkt *p) noexcept nogil:
    cdef const uint8_t *d = p.data
    cdef uint32_t n = p.caplen
    cdef uint32_t off = ETH_HLEN
    cdef uint16_t et
    # REASSEMBLED describes where data came from, not what it holds: it survives
    # the re-parse that FragTable does after rebuilding a datagram.  RSS_HASH, set by
    # the port before any parse, says the hash (left alone here) is already known.
    cdef uint8_t keep = p.flags & (PKT_F_REASSEMBLED | PKT_F_RSS_HASH)
    memset(&p.ethertype, 0, <size_t>(<char *>&p.hash - <char *>&p.ethertype))
    p.flags = keep
    if n < ETH_HLEN:
        return _done(p, PARSE_TRUNC_L2)
    et = ld16(d + 12)
    while et == ETHERTYPE_VLAN or et == ETHERTYPE_QINQ or et == ETHERTYPE_QINQ_OLD:
        if p.nvlan == VLAN_TAGS_WALKED:
            # Deeper than any real stack: the frame goes on untouched (not counted
            # as malformed), with the TPID past the bound as its ethertype, under
            # its own status: it may hide IP, which not_ip would deny.
            p.ethertype = et
            return _done(p, PARSE_TOO_MANY_VLAN_TAGS)
        if off + 4 > n:
            return _done(p, PARSE_TRUNC_L2)
        if p.nvlan < 2:
            p.vlan[p.nvlan] = ld16(d + off) & 0x0FFF
        p.nvlan += 1
        et = ld16(d + off + 2)
        off += 4
    p.ethertype = et
    p.l3_off = off
    if et == ETHERTYPE_IPV4:
        return _parse_ipv4(p, d, off, n)
    if et == ETHERTYPE_IPV6:
        return _parse_ipv6(p, d, off, n)
    return _done(p, PARSE_NOT_IP)


# ---------------------------------------------------------------------------
# Python helpers (tests and tools; not the packet path)

def status_names():
    """The ParseStatus names in enum order (lower case, no ``PARSE_`` prefix)."""
    return list(_STATUS_NAMES)


cdef object _addr(mbx_pkt *p, const uint8_t *b):
    if p.ip_ver == 4:
        return str(ipaddress.IPv4Address((<const char *>b)[:4]))
    if p.ip_ver == 6:
        return str(ipaddress.IPv6Address((<const char *>b)[:16]))
    return None


cdef dict _fields(mbx_pkt *p):
    cdef uint32_t pl_end = p.payload_off + p.payload_len
    return {
        "status": _STATUS_NAMES[p.status],
        "status_code": p.status,
        "ethertype": p.ethertype,
        "nvlan": p.nvlan,
        "vlan": [p.vlan[i] for i in range(min(p.nvlan, 2))],
        "ip_ver": p.ip_ver,
        "l3_off": p.l3_off,
        "l4_proto": p.l4_proto,
        "ttl": p.ttl,
        "ip_len": p.ip_len,
        "src": _addr(p, p.src.b),
        "dst": _addr(p, p.dst.b),
        "frag_off": p.frag_off,
        "frag_more": p.frag_more,
        "frag_id": p.frag_id,
        "l4_off": p.l4_off,
        "payload_off": p.payload_off,
        "payload_len": p.payload_len,
        "payload": ((<const char *>p.data)[p.payload_off:pl_end]
                    if p.payload_len and pl_end <= p.caplen else b""),
        "sport": p.sport,
        "dport": p.dport,
        "tcp_flags": p.tcp_flags,
        "seq": p.seq,
        "ack": p.ack,
        "win": p.win,
        "tcp_opts": p.tcp_opts,
        "mss": p.mss if p.tcp_opts & TCPOPT_F_MSS else None,
        "wscale": p.wscale if p.tcp_opts & TCPOPT_F_WSCALE else None,
        "sack_ok": bool(p.tcp_opts & TCPOPT_F_SACK_OK),
        "sack": [(p.sack[2 * i], p.sack[2 * i + 1]) for i in range(p.nsack)],
        "ts": (p.tsval, p.tsecr) if p.tcp_opts & TCPOPT_F_TS else None,
        "opts_cut": bool(p.tcp_opts & TCPOPT_F_CUT),
        "tsval": p.tsval,
        "tsecr": p.tsecr,
        "icmp_type": p.icmp_type,
        "icmp_code": p.icmp_code,
        "flags": p.flags,
        "flag_names": [name for bit, name in _FLAG_NAMES if p.flags & bit],
    }


def parse(frame, wirelen=None):
    """Parse one Ethernet frame (a copy) and return the descriptor fields by name.

    ``wirelen`` defaults to the frame length; a larger value says the capture was
    cut short, which turns some BAD_* verdicts into TRUNC_*.
    """
    cdef const uint8_t[::1] view = frame
    cdef uint32_t n = view.shape[0]
    cdef mbx_pkt pkt
    # A private copy sized exactly to the frame, so a read past caplen would be a
    # real out-of-bounds read that sanitizers and the fuzz tests can catch.
    cdef uint8_t *buf = <uint8_t *>malloc(n if n else 1)
    if buf == NULL:
        raise MemoryError()
    try:
        if n:
            memcpy(buf, &view[0], n)
        memset(&pkt, 0, sizeof(mbx_pkt))
        pkt.data = buf
        pkt.caplen = n
        pkt.wirelen = n if wirelen is None or wirelen < n else wirelen
        parse_packet(&pkt)
        return _fields(&pkt)
    finally:
        free(buf)


def parse_many(frames, uint32_t repeat=1):
    """Parse every frame of ``frames`` ``repeat`` times; the mean ns per packet.

    A benchmark helper: the frames are laid out in one buffer first so the timed
    loop is parse_packet alone, without the GIL.
    """
    cdef Py_ssize_t count = len(frames), i
    cdef size_t total = 0
    cdef uint32_t _rep
    cdef mbx_pkt *pkts
    cdef uint8_t *buf
    cdef const uint8_t[::1] view
    for f in frames:
        total += len(f)
    if count == 0 or repeat == 0:
        return 0.0
    pkts = <mbx_pkt *>malloc(count * sizeof(mbx_pkt))
    buf = <uint8_t *>malloc(total if total else 1)
    if pkts == NULL or buf == NULL:
        free(pkts)
        free(buf)
        raise MemoryError()
    try:
        total = 0
        for i in range(count):
            view = frames[i]
            memset(&pkts[i], 0, sizeof(mbx_pkt))
            pkts[i].data = buf + total
            pkts[i].caplen = pkts[i].wirelen = view.shape[0]
            if view.shape[0]:
                memcpy(buf + total, &view[0], view.shape[0])
            total += view.shape[0]
        t0 = time.perf_counter_ns()
        with nogil:
            for _rep in range(repeat):
                for i in range(count):
                    parse_packet(&pkts[i])
        t1 = time.perf_counter_ns()
        return (t1 - t0) / (<double>count * repeat)
    finally:
        free(pkts)
        free(buf)


# ---------------------------------------------------------------------------
# Fragment reassembly

cdef inline uint8_t *_piece_data(frag_piece *q) noexcept nogil:
    return <uint8_t *>(q + 1)


cdef inline uint32_t _mix(uint32_t h) noexcept nogil:
    h ^= h >> 16
    h *= <uint32_t>0x7FEB352DU
    h ^= h >> 15
    h *= <uint32_t>0x846CA68BU
    h ^= h >> 16
    return h


cdef inline uint8_t _key_proto(mbx_pkt *p) noexcept nogil:
    # RFC 791 keys IPv4 reassembly on the protocol too; IPv6 (RFC 8200) does not.
    return p.l4_proto if p.ip_ver == 4 else 0


cdef class FragTable:
    """IPv4/IPv6 fragment reassembly: bounded bytes and datagrams, idle timeout.

    Held fragment bytes plus per-fragment bookkeeping never exceed ``max_bytes``;
    at most ``max_datagrams`` datagrams are pending at once.  A datagram is given up
    ``timeout`` seconds after its first fragment arrived.
    """

    def __cinit__(self, size_t max_bytes=4 << 20, uint32_t max_datagrams=1024,
                  double timeout=30.0):
        cdef uint32_t nb = 16, i
        if max_datagrams == 0 or max_datagrams >= NO_SLOT // 2:
            raise ValueError("max_datagrams must be between 1 and 2**31")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        self.max_bytes = max_bytes
        self.max_datagrams = max_datagrams
        self.timeout_ns = <int64_t>(timeout * 1e9)
        while nb < 2 * max_datagrams:
            nb <<= 1
        self.bucket_mask = nb - 1
        self.dgrams = <frag_dgram *>malloc(max_datagrams * sizeof(frag_dgram))
        self.buckets = <uint32_t *>malloc(nb * sizeof(uint32_t))
        # fixed at start, as the rest of the table: a run short of memory fails here
        self.spill = <uint8_t *>malloc(SPILL_SIZE)
        if self.dgrams == NULL or self.buckets == NULL or self.spill == NULL:
            raise MemoryError("cannot allocate a fragment table")
        memset(self.dgrams, 0, max_datagrams * sizeof(frag_dgram))
        for i in range(nb):
            self.buckets[i] = NO_SLOT
        for i in range(max_datagrams):
            self.dgrams[i].hnext = i + 1 if i + 1 < max_datagrams else NO_SLOT
        self.free_head = 0
        # A per-table seed keeps crafted fragment ids from piling into one chain.
        self.seed = _mix(<uint32_t>(<uintptr_t><void *>self)
                         ^ <uint32_t>(time.time_ns() & 0xFFFFFFFF))

    def __dealloc__(self):
        self._free_all()
        free(self.dgrams)
        free(self.buckets)
        free(self.spill)
        self.dgrams = NULL
        self.buckets = NULL
        self.spill = NULL

    cdef void _free_all(self) noexcept nogil:
        cdef uint32_t s
        if self.dgrams == NULL:
            return
        for s in range(self.max_datagrams):
            if self.dgrams[s].used:
                self._release(s)

    def close(self):
        """Drop every pending datagram now (also done when the table is freed)."""
        self._free_all()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def counters(self):
        return {"held": self.held, "held_completed": self.held_completed,
                "held_discarded": self.held_discarded, "held_pending": self.held_pending,
                "completed": self.completed,
                "timed_out": self.timed_out, "pending_at_end": self.pending_at_end,
                "memcap_drops": self.memcap_drops,
                "bad": self.bad, "no_room": self.no_room, "too_many": self.too_many,
                "pending": self.pending,
                "bytes_used": self.bytes_used}

    cdef uint32_t _lookup(self, mbx_pkt *p, bint create) noexcept nogil:
        # Keyed by the VLANs too: two address spaces that overlap on a trunk may
        # send one (addresses, id) at once, whose fragments would otherwise be
        # rebuilt into one datagram.  Whatever the flow table's vlan_in_flow_key:
        # one datagram's fragments cross the link in one VLAN.
        cdef uint32_t h, s, b, i
        cdef frag_dgram *g
        cdef uint8_t proto = _key_proto(p)
        h = self.seed ^ p.frag_id ^ (<uint32_t>p.ip_ver << 8) ^ proto
        h = _mix(h ^ ((<uint32_t>p.vlan[0] << 16) | p.vlan[1]))
        for i in range(0, 16, 4):
            h = _mix(h ^ ld32(p.src.b + i))
            h = _mix(h ^ ld32(p.dst.b + i))
        b = h & self.bucket_mask
        s = self.buckets[b]
        while s != NO_SLOT:
            g = &self.dgrams[s]
            if (g.hash == h and g.ident == p.frag_id and g.ver == p.ip_ver
                    and g.proto == proto and g.vlan[0] == p.vlan[0]
                    and g.vlan[1] == p.vlan[1] and memcmp(g.src, p.src.b, 16) == 0
                    and memcmp(g.dst, p.dst.b, 16) == 0):
                return s
            s = g.hnext
        if not create or self.free_head == NO_SLOT:
            return NO_SLOT
        s = self.free_head
        g = &self.dgrams[s]
        self.free_head = g.hnext
        memcpy(g.src, p.src.b, 16)
        memcpy(g.dst, p.dst.b, 16)
        g.vlan[0] = p.vlan[0]
        g.vlan[1] = p.vlan[1]
        g.ident = p.frag_id
        g.hash = h
        g.ver = p.ip_ver
        g.proto = proto
        g.used = 1
        g.end = -1
        g.piece_max = 0
        g.npieces = 0
        g.nheld = 0
        g.first_ns = p.ts_ns
        g.pieces = NULL
        g.head = NULL
        g.head_len = 0
        g.l3_off = 0
        g.charged = 0
        g.counted = self.counting
        g.hnext = self.buckets[b]
        self.buckets[b] = s
        self.pending += 1
        return s

    cdef void _release(self, uint32_t slot) noexcept nogil:
        cdef frag_dgram *g = &self.dgrams[slot]
        cdef frag_piece *q = g.pieces
        cdef frag_piece *nxt
        cdef uint32_t *link = &self.buckets[g.hash & self.bucket_mask]
        while q != NULL:
            nxt = q.next
            free(q)
            q = nxt
        free(g.head)
        g.pieces = NULL
        g.head = NULL
        self.bytes_used -= g.charged
        g.charged = 0
        # Freed other than rebuilt (given up, refused, cut off by the input's end,
        # close()): its held fragments go with it, so that every fragment `held`
        # counted ends in held_completed or here (_rebuild moves its own first).
        self.held_discarded += g.nheld
        self.held_pending -= g.nheld
        g.nheld = 0
        while link[0] != slot:
            link = &self.dgrams[link[0]].hnext
        link[0] = g.hnext
        g.used = 0
        g.hnext = self.free_head
        self.free_head = slot
        self.pending -= 1

    cdef int _refuse(self, mbx_pkt *p, uint32_t slot, int status) noexcept nogil:
        # One bad or unstorable fragment dooms its datagram: IP never resends a
        # single fragment, so keeping the rest would only hold memory to the timeout.
        if slot != NO_SLOT:
            self._release(slot)
        if not self.counting:
            pass
        elif status == PARSE_FRAG_MEMCAP:
            self.memcap_drops += 1
        else:
            self.bad += 1
        p.status = <uint8_t>status
        p.verdict = VERDICT_DROP
        p.flags |= PKT_F_STACK_DROP
        return DEFRAG_DROP

    cdef int expire(self, int64_t now_ns) noexcept nogil:
        cdef uint32_t s
        cdef int n = 0
        if self.pending == 0:
            return 0
        for s in range(self.max_datagrams):
            if not self.dgrams[s].used:
                continue
            if (self.dgrams[s].first_ns > now_ns and <uint64_t>self.dgrams[s].first_ns
                    - <uint64_t>now_ns > <uint64_t>max(self.timeout_ns, 1000000000)):
                # begun at a time the input's clock has since stepped back from
                # (clock_take: a fragment stamped days ahead): its time runs from
                # now, as a flow's does, not from days ahead
                self.dgrams[s].first_ns = now_ns
            elif now_ns - self.dgrams[s].first_ns > self.timeout_ns:
                self.timed_out += self.dgrams[s].counted
                self._release(s)
                n += 1
        return n

    cdef int end_all(self) noexcept nogil:
        # Not timed out: the input ended first (a capture of a millisecond would
        # otherwise count all its incomplete datagrams as 30 s old), as flows that
        # the input's end ends count as `shutdown`, not idle.
        cdef uint32_t s
        cdef int n = 0
        if self.pending == 0:
            return 0
        for s in range(self.max_datagrams):
            if self.dgrams[s].used:
                self.pending_at_end += self.dgrams[s].counted
                self._release(s)
                n += 1
        return n

    def finish(self):
        """Give up every pending datagram as cut off by the end of the input
        (``pending_at_end``); how many.  ``close()`` frees them without a reason
        counted (their held fragments count in ``held_discarded`` either way)."""
        return self.end_all()

    cdef int defrag(self, Batch batch, mbx_pkt *p, bint counted=True) noexcept nogil:
        cdef uint32_t slot, off, length, e, hdr, lo, hi, covered
        cdef size_t need
        cdef bint dup = False, store_head
        cdef frag_dgram *g
        cdef frag_piece *q
        cdef frag_piece *np
        cdef frag_piece **link
        cdef const uint8_t *src
        if not (p.flags & PKT_F_FRAGMENT):
            return DEFRAG_NONE
        self.counting = counted
        slot = self._lookup(p, False)
        if slot != NO_SLOT and p.ts_ns - self.dgrams[slot].first_ns > self.timeout_ns:
            # Its datagram's time ran out before this fragment came: timed out, what
            # the stack's sweep would have said of it, whatever this fragment is (a
            # bad one must not take the blame for a datagram already given up).
            self.timed_out += self.dgrams[slot].counted
            self._release(slot)
            slot = NO_SLOT
        if p.status != PARSE_OK:
            return self._refuse(p, slot, p.status)
        if p.flags & PKT_F_TRUNCATED:
            # A short capture of a fragment can never be rebuilt: pass it on as is.
            return DEFRAG_NONE
        off = <uint32_t>p.frag_off * 8
        length = p.payload_len
        e = off + length
        # Size of the rebuilt datagram's IP header(s); the length field must hold it.
        hdr = p.payload_off - p.l3_off
        if p.ip_ver == 6:
            hdr -= 48
        # RFC 791/8200: every fragment but the last carries a multiple of 8 bytes.
        if (p.frag_more and (length == 0 or length & 7)) or hdr + e > IP_MAXPACKET:
            return self._refuse(p, slot, PARSE_BAD_FRAG)
        if slot == NO_SLOT:
            slot = self._lookup(p, True)
            if slot == NO_SLOT:
                self.expire(p.ts_ns)
                slot = self._lookup(p, True)
                if slot == NO_SLOT:
                    return self._refuse(p, NO_SLOT, PARSE_FRAG_MEMCAP)
        g = &self.dgrams[slot]
        if p.frag_more:
            if g.end >= 0 and e > <uint32_t>g.end:
                return self._refuse(p, slot, PARSE_BAD_FRAG)
        else:
            if g.end >= 0 and e != <uint32_t>g.end:
                return self._refuse(p, slot, PARSE_BAD_FRAG)
        src = p.data + p.payload_off
        q = g.pieces
        while q != NULL:
            if not p.frag_more and q.off + q.length > e:
                return self._refuse(p, slot, PARSE_BAD_FRAG)
            lo = off if off > q.off else q.off
            hi = e if e < q.off + q.length else q.off + q.length
            if lo < hi:
                if memcmp(_piece_data(q) + (lo - q.off), src + (lo - off), hi - lo) != 0:
                    return self._refuse(p, slot, PARSE_BAD_FRAG)
                if q.off <= off and e <= q.off + q.length:
                    dup = True
            q = q.next
        if not dup and g.npieces == FRAG_MAX_PIECES:
            # More pieces than any sender cuts a datagram into: a flood of tiny
            # fragments, each checked against every piece held.
            self.too_many += g.counted
            self.counting = False           # (counted as too_many, not bad)
            return self._refuse(p, slot, PARSE_BAD_FRAG)
        store_head = off == 0 and g.head == NULL
        need = 0 if dup else sizeof(frag_piece) + length
        if store_head:
            need += p.payload_off
        if self.bytes_used + need > self.max_bytes:
            # Give up the datagrams past their time first (by this fragment's clock,
            # not the stack's: parallel stacks see the same fragments but not the
            # same packets, and must agree on what each table holds).
            self.expire(p.ts_ns)
        if self.bytes_used + need > self.max_bytes:
            return self._refuse(p, slot, PARSE_FRAG_MEMCAP)
        if store_head:
            g.head = <uint8_t *>malloc(p.payload_off)
            if g.head == NULL:
                return self._refuse(p, slot, PARSE_FRAG_MEMCAP)
            memcpy(g.head, p.data, p.payload_off)
            g.head_len = p.payload_off
            g.l3_off = p.l3_off
        if not dup:
            np = <frag_piece *>malloc(sizeof(frag_piece) + length)
            if np == NULL:
                return self._refuse(p, slot, PARSE_FRAG_MEMCAP)
            np.off = off
            np.length = length
            if length > g.piece_max:
                g.piece_max = length
            memcpy(_piece_data(np), src, length)
            link = &g.pieces
            while link[0] != NULL and link[0].off <= off:
                link = &link[0].next
            np.next = link[0]
            link[0] = np
            g.npieces += 1
        g.charged += need
        self.bytes_used += need
        if not p.frag_more:
            g.end = <int32_t>e
        if g.end >= 0 and g.head != NULL:
            covered = 0
            q = g.pieces
            while q != NULL and q.off <= covered:
                if q.off + q.length > covered:
                    covered = q.off + q.length
                q = q.next
            if covered >= <uint32_t>g.end:
                return self._rebuild(batch, p, slot)
        self.held += counted
        self.held_pending += counted
        g.nheld += counted
        p.verdict = VERDICT_HELD
        return DEFRAG_HELD

    cdef int _rebuild(self, Batch batch, mbx_pkt *p, uint32_t slot) noexcept nogil:
        cdef frag_dgram *g = &self.dgrams[slot]
        cdef bint v6 = g.ver == 6
        cdef uint32_t l3 = g.l3_off
        cdef uint32_t hdr = g.head_len - 8 if v6 else g.head_len
        cdef uint32_t total = hdr + <uint32_t>g.end
        cdef uint32_t nhpos, cur, ihl, piece_max, ident
        cdef uint8_t kind
        cdef frag_piece *q
        cdef uint8_t *out
        cdef bint spilled
        # The first fragment's headers may be longer than the others' (IPv4 options,
        # IPv6 extension headers): the whole must still fit the length field.
        if total - l3 - (40 if v6 else 0) > IP_MAXPACKET:
            return self._refuse(p, slot, PARSE_BAD_FRAG)
        out = batch.reserve(total)
        spilled = out == NULL
        if spilled:
            # No room left in the burst's arena (see Batch.rebuild_room) to carry it
            # out.  Rebuilt aside all the same, and re-parsed: parallel stacks each
            # rebuild every datagram in bursts of their own, so whether a burst had
            # room differs between them, and only the stack that owns the datagram's
            # flow (known from the rebuilt datagram alone) may decide that it is
            # dropped, and count it; the others leave it to that one, as they leave
            # it a datagram that found room.
            if total > SPILL_SIZE:
                self.no_room += g.counted       # (cannot be: _rebuild's own bound)
                self.counting = False
                return self._refuse(p, slot, PARSE_FRAG_MEMCAP)
            out = self.spill
        memcpy(out, g.head, hdr)
        if v6:
            # The head ends with the fragment header (hdr is its offset).  Walk the
            # chain the parser already checked to find whose next-header named it.
            nhpos = l3 + 6
            cur = l3 + 40
            while cur < hdr:
                kind = out[nhpos]
                nhpos = cur
                if kind == IPPROTO_AH:
                    cur += (<uint32_t>out[cur + 1] + 2) * 4
                elif kind == IPPROTO_FRAGMENT:
                    # an atomic fragment header before the real one: 8 bytes, as the
                    # parser walks it (its second byte is reserved, not a length)
                    cur += 8
                else:
                    cur += (<uint32_t>out[cur + 1] + 1) * 8
            out[nhpos] = g.head[hdr]
            st16(out + l3 + 4, total - l3 - 40)
        else:
            ihl = <uint32_t>(out[l3] & 0x0F) * 4
            st16(out + l3 + 2, total - l3)
            out[l3 + 6] &= 0xC0          # keep RF/DF, clear MF and the offset
            out[l3 + 7] = 0
            st16(out + l3 + 10, 0)
            st16(out + l3 + 10, csum(out + l3, ihl))
        q = g.pieces
        while q != NULL:
            memcpy(out + hdr + q.off, _piece_data(q), q.length)
            q = q.next
        self.completed += g.counted
        self.held_completed += g.nheld
        self.held_pending -= g.nheld
        g.nheld = 0
        piece_max = g.piece_max
        ident = g.ident
        self._release(slot)
        p.data = out
        p.caplen = total
        p.wirelen = total
        p.flags |= PKT_F_REASSEMBLED
        p.verdict = VERDICT_PASS
        parse_packet(p)
        # What an output needs to cut it again as its sender did (the re-parse
        # cleared both): no fragment longer than the longest received, and IPv6's
        # identification, which the rebuilt datagram no longer carries.
        p.frag_size = <uint16_t>min(piece_max, 0xFFF8)
        p.frag_id = ident
        return DEFRAG_NO_ROOM if spilled else DEFRAG_DONE

    cdef int drop_no_room(self, mbx_pkt *p) noexcept nogil:
        # Its fragments went into it (held_completed, completed): it is the datagram
        # that is dropped, for want of room in the burst, not the fragments.
        self.no_room += 1
        p.status = PARSE_FRAG_MEMCAP
        p.verdict = VERDICT_DROP
        p.flags |= PKT_F_STACK_DROP
        return DEFRAG_DROP

    def sweep(self, int64_t now_ns):
        """Give up datagrams older than the timeout at ``now_ns``; how many."""
        return self.expire(now_ns)

    def push(self, frame, int64_t ts_ns=0, uint32_t mtu=0, wirelen=None):
        """Parse and offer one frame: ("none"|"held"|"done"|"drop", datagram or None).

        ``wirelen`` (default: the frame's length) says how long the frame was on the
        wire, when ``frame`` is a capture cut short.

        The reassembled frame is returned only for "done"; with ``mtu``, as the list
        of frames an AF_PACKET output of that MTU sends for it (cut into fragments
        when longer, see ``mbx/_fragment.pxd``; the datagram alone when it need not
        or may not be cut).  Tests and tools only: the stack calls ``defrag`` on its
        own batches.
        """
        cdef const uint8_t[::1] view = frame
        cdef uint32_t n = view.shape[0]
        cdef mbx_pkt *p
        cdef int r
        cdef Batch b
        if self._scratch is None:
            # Room for the frame plus a rebuilt 64 KiB datagram with its headers.
            self._scratch = Batch(1, 4 * 65536)
        b = self._scratch
        b.clear()
        p = b.add(&view[0] if n else <const uint8_t *>b"", n,
                  n if wirelen is None or wirelen < n else wirelen, ts_ns, 0)
        if p == NULL:
            raise ValueError(f"frame of {n} bytes is too large")
        with nogil:
            parse_packet(p)
            r = self.defrag(b, p)
            if r == DEFRAG_NO_ROOM:
                r = self.drop_no_room(p)        # (room for one is kept, above)
        if r == DEFRAG_DONE:
            if mtu:
                return "done", _sent_as(p, mtu)
            return "done", (<const char *>p.data)[:p.caplen]
        return _DEFRAG_NAMES[r], None


cdef list _sent_as(const mbx_pkt *p, uint32_t mtu):
    # The frames an output of this MTU sends for p (AfPacketPort.send_frames' rule).
    cdef frag_plan plan
    cdef uint8_t hdr[FRAG_HDR_MAX]
    cdef uint32_t k, n, at
    if p.caplen <= mtu + p.l3_off or not frag_plan_for(p, mtu, &plan):
        return [(<const char *>p.data)[:p.caplen]]
    out = []
    for k in range(plan.count):
        n = frag_header(p, &plan, k, hdr)
        at = frag_payload_at(&plan, k)
        out.append((<const char *>hdr)[:n]
                   + (<const char *>p.data)[at:at + frag_payload_len(&plan, k)])
    return out
