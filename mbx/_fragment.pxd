# Cutting an IP datagram too long for an output link into fragments (RFC 791 §3.2,
# RFC 8200 §4.5), for the live outputs.  mbx rebuilds fragmented datagrams before
# its NFs see them (FragTable), and a kernel fanout group with the defrag flag hands
# them over rebuilt, so a middlebox holds datagrams longer than the link they leave
# on; sent as they are, the interface refuses them (EMSGSIZE) and every fragmented
# datagram is lost.  An output cuts them again, as a defragmenting firewall does:
#
# - IPv4 with DF clear, as any IPv4 router may: into fragments of at most the
#   link's MTU, and none longer than the sender's own (frag_size, when mbx rebuilt
#   it).  With DF set only one mbx rebuilt, into fragments as long as the sender's
#   (when those fit the link), as Linux does with frag_max_size; the fragments keep
#   DF.  Options not marked "copied" go only in the first (they become NOPs).
# - IPv6 only where mbx rebuilt it (PKT_F_REASSEMBLED): the source fragmented it,
#   only a source may; the unfragmentable part (the IPv6 header, hop-by-hop and
#   routing headers, a destination options header before a routing header) goes in
#   every fragment, with a fragment header carrying the original identification.
#
# A plan says how; frag_header writes fragment k's headers, and its payload is the
# datagram's bytes [payload_at(k), + payload_len(k)) - no copy of the payload is
# needed for an output that sends from several buffers (sendmmsg's iovecs).
from libc.stdint cimport uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy, memset

from mbx._checksum cimport csum, load16, store16
from mbx._packet cimport PKT_F_FRAGMENT, PKT_F_REASSEMBLED, PKT_F_TRUNCATED, mbx_pkt

cdef enum:
    FRAG_HDR_MAX = 256      # room for one fragment's L2 + IP headers (and IPv6's
    #                         fragment header); longer header chains are not cut


ctypedef struct frag_plan:
    uint32_t l3             # the IP header's offset
    uint32_t unfrag         # end of what every fragment repeats (L2 + IP header(s))
    uint32_t nh_pos         # IPv6: the next-header byte that names the fragmentable part
    uint32_t total          # fragmentable bytes
    uint32_t chunk          # payload bytes of every fragment but the last (8k)
    uint32_t count          # fragments
    uint8_t v6


# Whether p, one IP datagram longer than mtu (IP bytes), can be cut for that MTU, and
# how (in f).  No: not IP, cut short, itself a fragment, IPv4 with DF set that mbx
# did not rebuild (or whose sender's fragments are longer than the link takes), IPv6
# that mbx did not rebuild, or headers longer than FRAG_HDR_MAX or the MTU allows.
cdef inline bint frag_plan_for(const mbx_pkt *p, uint32_t mtu, frag_plan *f) noexcept nogil:
    cdef const uint8_t *d = p.data
    cdef uint32_t l3 = p.l3_off, end, cur, hdr, nh_pos, ext
    cdef uint8_t nh
    cdef bint df = False
    if (p.ip_ver != 4 and p.ip_ver != 6) or p.flags & (PKT_F_FRAGMENT | PKT_F_TRUNCATED):
        return False
    if p.caplen < p.wirelen or p.ip_len == 0 or l3 + p.ip_len > p.caplen:
        return False
    end = l3 + p.ip_len
    if p.ip_ver == 4:
        # DF: the sender asked that it not be cut, beyond how it was cut already
        df = (d[l3 + 6] & 0x40) != 0
        if df and not (p.flags & PKT_F_REASSEMBLED and p.frag_size):
            return False
        cur = l3 + <uint32_t>(d[l3] & 0x0F) * 4
        hdr = cur - l3
        nh_pos = 0
    else:
        if not p.flags & PKT_F_REASSEMBLED:
            return False
        nh_pos = l3 + 6
        cur = l3 + 40
        nh = d[nh_pos]
        while True:
            if cur + 2 > end:
                return False
            if nh == 60:            # destination options: unfragmentable before routing
                ext = (<uint32_t>d[cur + 1] + 1) * 8
                if cur + ext + 2 > end or d[cur] != 43:
                    break
            elif nh != 0 and nh != 43:
                break
            ext = (<uint32_t>d[cur + 1] + 1) * 8
            nh_pos = cur
            nh = d[cur]
            cur += ext
            if cur > end:
                return False
        hdr = cur - l3 + 8          # with the fragment header
    if cur + 8 > FRAG_HDR_MAX or hdr + 8 > mtu:
        return False
    f.l3 = l3
    f.unfrag = cur
    f.nh_pos = nh_pos
    f.total = end - cur
    f.chunk = (mtu - hdr) & ~(<uint32_t>7)
    if p.frag_size and p.frag_size < f.chunk:
        f.chunk = p.frag_size & ~(<uint32_t>7)
        if f.chunk == 0:
            f.chunk = 8
    elif df and p.frag_size > f.chunk:
        return False                # the sender's fragments do not fit this link
    f.count = (f.total + f.chunk - 1) // f.chunk
    f.v6 = p.ip_ver == 6
    return f.count > 1


cdef inline uint32_t frag_payload_at(const frag_plan *f, uint32_t k) noexcept nogil:
    return f.unfrag + k * f.chunk


cdef inline uint32_t frag_payload_len(const frag_plan *f, uint32_t k) noexcept nogil:
    cdef uint32_t off = k * f.chunk
    return f.chunk if off + f.chunk < f.total else f.total - off


# Fragment k's L2 and IP headers into out (FRAG_HDR_MAX bytes); returns their length.
cdef inline uint32_t frag_header(const mbx_pkt *p, const frag_plan *f, uint32_t k,
                                 uint8_t *out) noexcept nogil:
    cdef uint32_t off = k * f.chunk
    cdef uint32_t n = frag_payload_len(f, k)
    cdef uint32_t l3 = f.l3, ihl, i, olen
    cdef uint16_t more = 1 if off + n < f.total else 0
    cdef uint8_t *fh
    memcpy(out, p.data, f.unfrag)
    if not f.v6:
        ihl = f.unfrag - l3
        store16(out + l3 + 2, <uint16_t>(ihl + n))
        store16(out + l3 + 6, <uint16_t>((load16(p.data + l3 + 6) & 0xC000)
                                         | (more << 13) | (off >> 3)))
        if k:
            # Only options marked "copied" (the type's top bit) belong in later
            # fragments; the others become NOPs of the same length.
            i = l3 + 20
            while i < f.unfrag:
                if out[i] == 0:         # end of options
                    break
                if out[i] == 1:         # NOP
                    i += 1
                    continue
                if i + 1 >= f.unfrag:
                    break
                olen = out[i + 1]
                if olen < 2 or i + olen > f.unfrag:
                    break
                if not out[i] & 0x80:
                    memset(out + i, 1, olen)
                i += olen
        store16(out + l3 + 10, 0)
        store16(out + l3 + 10, csum(out + l3, ihl))
        return f.unfrag
    fh = out + f.unfrag
    fh[0] = p.data[f.nh_pos]        # what the fragmentable part starts with
    fh[1] = 0
    out[f.nh_pos] = 44              # IPPROTO_FRAGMENT
    store16(fh + 2, <uint16_t>(off | more))
    store16(fh + 4, <uint16_t>(p.frag_id >> 16))
    store16(fh + 6, <uint16_t>(p.frag_id & 0xFFFF))
    store16(out + l3 + 4, <uint16_t>(f.unfrag - l3 - 40 + 8 + n))
    return f.unfrag + 8
