# The one packet parser of the project, and IP fragment reassembly.
from libc.stdint cimport int64_t, uint8_t, uint32_t, uint64_t

from mbx._packet cimport Batch, mbx_pkt

# Parses L2..L4 of p.data[0:p.caplen] into p's fields; sets and returns p.status
# (a ParseStatus).  Never reads outside the frame, whatever the bytes say.
cdef int parse_packet(mbx_pkt *p) noexcept nogil

cdef enum DefragResult:
    DEFRAG_NONE = 0     # not a fragment: nothing to do
    DEFRAG_HELD = 1     # fragment kept; p.verdict = VERDICT_HELD, no further processing
    DEFRAG_DONE = 2     # p now holds the whole datagram (in the batch arena), re-parsed
    DEFRAG_DROP = 3     # fragment refused (p.status says why); p.verdict = VERDICT_DROP

# IPv4 and IPv6 fragment reassembly with bounded memory and a timeout.
cdef class FragTable:
    cdef readonly uint64_t held             # fragments accepted into a pending datagram
    cdef readonly uint64_t completed        # datagrams rebuilt
    cdef readonly uint64_t timed_out        # datagrams abandoned at the timeout
    cdef readonly uint64_t memcap_drops     # fragments refused for lack of memory
    cdef readonly uint64_t bad              # fragments refused as malformed/overlapping
    cdef int defrag(self, Batch batch, mbx_pkt *p) noexcept nogil
    # Abandons datagrams idle for longer than the timeout; returns how many.
    cdef int expire(self, int64_t now_ns) noexcept nogil
