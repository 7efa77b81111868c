# The one checksum helper of the project: the Internet checksum, its incremental
# update (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m')), used by every NF that rewrites
# header fields so a rewrite costs a few adds instead of a pass over the packet, and
# the sum that checks a received segment's (the TCP Monitor's checksums="verify").
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t


cdef inline uint16_t csum_fold(uint32_t s) noexcept nogil:
    s = (s & 0xFFFF) + (s >> 16)
    s = (s & 0xFFFF) + (s >> 16)
    return <uint16_t>s


cdef inline uint32_t csum_add(uint32_t s, const uint8_t *data, size_t n) noexcept nogil:
    # Sum of big-endian 16-bit words; an odd tail byte is padded with zero.
    cdef size_t i = 0
    while i + 1 < n:
        s += (<uint32_t>data[i] << 8) | data[i + 1]
        i += 2
    if i < n:
        s += <uint32_t>data[i] << 8
    return s


cdef inline uint16_t csum(const uint8_t *data, size_t n) noexcept nogil:
    return <uint16_t>(~csum_fold(csum_add(0, data, n)) & 0xFFFF)


cdef inline uint16_t load16(const uint8_t *p) noexcept nogil:
    return (<uint16_t>p[0] << 8) | p[1]


cdef inline void store16(uint8_t *p, uint16_t v) noexcept nogil:
    p[0] = v >> 8
    p[1] = v & 0xFF


# Replace the 16-bit words old[0:n] by new[0:n] (n even) in the field at csum_at,
# which holds a checksum (network order) covering them.
cdef inline void csum_replace(uint8_t *csum_at, const uint8_t *old, const uint8_t *new,
                              size_t n) noexcept nogil:
    cdef uint32_t s = (~load16(csum_at)) & 0xFFFF
    cdef size_t i = 0
    while i + 1 < n:
        s += (~load16(old + i)) & 0xFFFF
        s += load16(new + i)
        i += 2
    store16(csum_at, <uint16_t>(~csum_fold(s) & 0xFFFF))


# The same update for a field an interface has yet to finish (OFFLOAD_CSUM_PARTIAL):
# it holds the pseudo-header sum itself, not its complement, so the words are
# swapped in the sum directly.  Only pseudo-header words (addresses) belong here:
# the interface sums the rest of the segment, ports included, when it sends.
cdef inline void csum_replace_partial(uint8_t *csum_at, const uint8_t *old,
                                      const uint8_t *new, size_t n) noexcept nogil:
    cdef uint32_t s = load16(csum_at)
    cdef size_t i = 0
    while i + 1 < n:
        s += (~load16(old + i)) & 0xFFFF
        s += load16(new + i)
        i += 2
    store16(csum_at, csum_fold(s))


# Checking a checksum reads every byte of a segment, so it sums 32-bit words in the
# machine's byte order into 64 bits (RFC 1071 §2(B): the one's complement sum does not
# depend on byte order, and a valid segment sums to 0xFFFF either way).
cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline uint64_t mbx_csum_sum(const uint8_t *p, size_t n, uint64_t s) {
        uint32_t w32;
        uint16_t w16 = 0;
        while (n >= 4) { memcpy(&w32, p, 4); s += w32; p += 4; n -= 4; }
        if (n >= 2) { memcpy(&w16, p, 2); s += w16; p += 2; n -= 2; w16 = 0; }
        if (n) { memcpy(&w16, p, 1); s += w16; }  /* the odd byte, padded with zero */
        return s;
    }
    static inline int mbx_csum_valid(uint64_t s) {
        while (s >> 16) s = (s & 0xFFFF) + (s >> 16);
        return s == 0xFFFF;
    }
    """
    uint64_t csum_sum "mbx_csum_sum"(const uint8_t *p, size_t n, uint64_t s) noexcept nogil
    bint csum_valid "mbx_csum_valid"(uint64_t s) noexcept nogil
