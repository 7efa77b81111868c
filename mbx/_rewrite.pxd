# Rewriting a packet's source or destination address and port in place, with the
# IPv4 header and TCP/UDP checksums updated incrementally (RFC 1624, _checksum.pxd).
# The one implementation: Event.set_src/set_dst (Python NFs) and C NFs (mbx/cnf.pxd)
# both call pkt_rewrite, so a packet leaves the same whichever kind of NF rewrote it.
# The transport header is p.l4_off, which the parser places after any IPv4 or IPv6
# Authentication Header.  A rewrite breaks AH's ICV, which covers the addresses and
# everything after AH, ports included: as through any NAT, the receiver's IPsec will
# refuse the packet, though its TCP/UDP checksum is kept right.
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy

from mbx._checksum cimport (
    csum_add, csum_fold, csum_replace, csum_replace_partial, load16, store16,
)
from mbx._packet cimport OFFLOAD_CSUM_PARTIAL, PARSE_OK, PKT_F_FRAGMENT, mbx_pkt

cdef enum RewriteStatus:
    REWRITE_OK = 0
    REWRITE_NOT_IP = 1          # no IP header to rewrite
    REWRITE_NO_PORTS = 2        # a port change for a packet without TCP/UDP ports


# which: 0 source, 1 destination.  addr: the new address (4 bytes for IPv4, 16 for
# IPv6, as p.ip_ver says), or NULL to keep it; port: the new port, or -1 to keep it.
# Checks come first: on an error status the packet is unchanged.  A packet whose L4
# checksum the sending interface finishes (OFFLOAD_CSUM_PARTIAL) gets only the
# address change in its pseudo-header sum: the interface sums the ports itself.
cdef inline int pkt_rewrite(mbx_pkt *p, int which, const uint8_t *addr,
                            int port) noexcept nogil:
    cdef uint8_t *ip_hdr
    cdef uint8_t *l4
    cdef uint8_t *l4_csum = NULL
    cdef uint8_t *addr_at
    cdef uint8_t newport[2]
    cdef int alen
    cdef bint has_l4
    cdef bint partial = p.offload & OFFLOAD_CSUM_PARTIAL
    if p.ip_ver == 0:
        return REWRITE_NOT_IP
    ip_hdr = p.data + p.l3_off
    l4 = p.data + p.l4_off
    alen = 4 if p.ip_ver == 4 else 16
    has_l4 = p.l4_off > 0 and not (p.flags & PKT_F_FRAGMENT)
    if port >= 0 and not (has_l4 and (p.l4_proto == 6 or p.l4_proto == 17)
                          and p.l4_off + 4 <= p.caplen):
        return REWRITE_NO_PORTS
    if has_l4 and p.l4_proto == 6 and p.l4_off + 18 <= p.caplen:
        l4_csum = l4 + 16
    elif has_l4 and p.l4_proto == 17 and p.l4_off + 8 <= p.caplen:
        l4_csum = l4 + 6
        if load16(l4_csum) == 0 and p.ip_ver == 4 and not partial:
            l4_csum = NULL          # UDP over IPv4 without a checksum stays so
    if addr != NULL:
        addr_at = ip_hdr + (12 if p.ip_ver == 4 else 8) + which * alen
        if p.ip_ver == 4:
            csum_replace(ip_hdr + 10, addr_at, addr, 4)
        if l4_csum != NULL and partial:
            csum_replace_partial(l4_csum, addr_at, addr, alen)
        elif l4_csum != NULL:
            csum_replace(l4_csum, addr_at, addr, alen)
        memcpy(addr_at, addr, alen)
        if which:
            memcpy(p.dst.b, addr, alen)
        else:
            memcpy(p.src.b, addr, alen)
    if port >= 0:
        store16(newport, <uint16_t>port)
        if l4_csum != NULL and not partial:
            csum_replace(l4_csum, l4 + 2 * which, newport, 2)
        memcpy(l4 + 2 * which, newport, 2)
        if which:
            p.dport = <uint16_t>port
        else:
            p.sport = <uint16_t>port
    if l4_csum != NULL and not partial and p.l4_proto == 17 and load16(l4_csum) == 0:
        store16(l4_csum, 0xFFFF)     # a computed UDP checksum of 0 is sent as all ones
    return REWRITE_OK


# Finish a checksum the sending interface was to finish (OFFLOAD_CSUM_PARTIAL), for
# an output that cannot: what the interface would do (sum data[csum_start:] with the
# pseudo-header sum already in the field, store the complement).  0: done or nothing
# to do; -1: the offsets lie outside the captured bytes (the packet is left as is).
cdef inline int pkt_finish_csum(mbx_pkt *p) noexcept nogil:
    cdef uint32_t at
    cdef uint16_t c
    if not (p.offload & OFFLOAD_CSUM_PARTIAL):
        return 0
    if p.csum_start == 0:
        # The port knew only that the checksum was not ready (AF_PACKET without
        # offloads: TP_STATUS_CSUMNOTREADY): the parsed TCP or UDP header says where.
        if p.l4_off == 0 or p.status != PARSE_OK or p.flags & PKT_F_FRAGMENT:
            return -1
        if p.l4_proto == 6:
            p.csum_offset = 16
        elif p.l4_proto == 17:
            p.csum_offset = 6
        else:
            return -1
        p.csum_start = p.l4_off
    at = <uint32_t>p.csum_start + p.csum_offset
    if at + 2 > p.caplen or p.caplen < p.wirelen:
        return -1
    c = <uint16_t>(~csum_fold(csum_add(0, p.data + p.csum_start,
                                       p.caplen - p.csum_start)) & 0xFFFF)
    store16(p.data + at, c if c else 0xFFFF)    # 0 means "no checksum" to UDP
    p.offload = p.offload & ~OFFLOAD_CSUM_PARTIAL
    return 0
