# TCP bytestream reassembly, one mbx_stream per direction of a flow: the contract
# between _stream and the TCP Monitor, which embeds the struct in its per-flow state
# and calls the functions below per segment, without the GIL.
#
# A stream is append-only (paper §4.2): bytes before the *frontier* (the end of the
# contiguous prefix) are delivered and never change; bytes beyond it wait, out of
# order, until the hole before them is filled or acknowledged (skipped).  Offsets are
# 64-bit (offset 0 is the byte at seq0), so streams longer than 4 GiB and sequence
# wraparound need no special case.  Every byte lives in a fixed-size chunk of one
# StreamPool allocation (Stack Memory); out-of-order bookkeeping is a fixed-size
# interval block from the same pool.  Running out of either is MEMCAP, never a crash.
#
# A hole that the receiver acknowledged is skipped: a *gap*, never filler bytes.  Up
# to STREAM_MAX_GAPS gaps stay inside the held range [base, frontier) (in the same
# block as the intervals), so bytes before each stay readable as long as the pool's
# retain keeps them; reads stop at a gap and fail inside one.  Past the bound (or
# with no block free) the bytes before the oldest gap are released early
# (pool.gap_overflows counts it), but never bytes the caller still has readers for
# (from its keep offset on): then the two oldest gaps are joined over the bytes
# between them (pool.gap_joins), which stream_read_run still reads; with no block
# free, the hole is not skipped yet (pool.gap_deferrals).
cimport cython
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    NO_CHUNK = 0xFFFFFFFF
    # Out-of-order intervals a stream may hold at once, so a hostile sender cannot
    # make bookkeeping grow.  Bytes that would make one more are dropped, and so is
    # every later segment beyond them (each is a new piece too) until a hole fills:
    # the bound must sit well above what loss and reordering make.  16 did not: a
    # 16 MiB download with 3 % loss and 25 % reordering before the capture point had
    # up to 29 holes at once and lost 112-535 segments' bytes.  A block (64 + 65
    # pairs) is 2,064 bytes, taken only while a stream holds pieces or gaps.
    STREAM_MAX_OOO = 64
    # Skipped gaps kept inside the held range [base, frontier) at once: as many as
    # one ACK can skip (a hole before each interval and one after the last), so one
    # ACK alone never has to release the bytes its own DATA_RDY events deliver; more
    # release the bytes before the oldest (gap_overflows).
    STREAM_MAX_GAPS = STREAM_MAX_OOO + 1

# Overlap policy for bytes beyond the frontier that a later segment carries again
# with different content (bytes before the frontier are delivered: always kept).
cdef enum StreamPolicy:
    OVERLAP_FIRST = 0       # keep what arrived first (most receivers: BSD, Linux)
    OVERLAP_LAST = 1        # the later segment wins (Windows-like, some evasions)

# What stream_add did; several at once.
cdef enum StreamAddFlags:
    STREAM_FRONTIER_MOVED = 1   # the contiguous prefix grew: new bytes to deliver
    STREAM_CONFLICT = 2         # an overlap carried different bytes (see conflict_off)
    # some bytes were dropped: pool empty, window or interval block full (dropped)
    STREAM_MEMCAP = 4
    STREAM_OLD = 8              # entirely before the frontier: a retransmission
    STREAM_OUT_OF_ORDER = 16    # new bytes were stored beyond the frontier, behind a hole
    STREAM_OVERLAP = 32         # some bytes were already held or delivered
    # some overlapping bytes could not be compared (released, in a gap, before 0)
    STREAM_UNCHECKED = 64
    # with STREAM_MEMCAP: dropped because the stream held STREAM_MAX_OOO out-of-order
    # pieces already and the bytes would have made another (not for lack of memory)
    STREAM_PIECES = 128

# Negative results of stream_read.
cdef enum StreamReadError:
    STREAM_ERR_RELEASED = -1    # off < base: released
    STREAM_ERR_BEYOND = -2      # off > frontier: not delivered (yet)
    STREAM_ERR_GAP = -3         # off lies in a skipped gap: there are no bytes

# 72 bytes.  Chunks are a singly linked list (pool.chunk_next)
# sorted by offset; tail is where in-order appends go.
ctypedef struct mbx_stream:
    uint64_t base           # first byte still held (everything before it is released)
    uint64_t frontier       # end of the delivered prefix
    uint64_t conflict_off   # first differing byte of the last conflicting segment
    uint64_t gap_bytes      # bytes skipped by stream_skip_*
    uint64_t dropped        # bytes dropped for memory (MEMCAP)
    uint32_t seq0           # sequence number of offset 0
    uint32_t head           # chunk with the lowest offsets, or NO_CHUNK
    uint32_t tail           # chunk with the highest offsets, or NO_CHUNK
    # Block (pool) of STREAM_MAX_OOO intervals then STREAM_MAX_GAPS gaps; NO_CHUNK
    # while nothing is out of order and no gap is held.
    uint32_t ooo
    uint32_t conflicts      # segments that carried conflicting bytes
    uint32_t gaps           # gaps skipped
    uint16_t nchunks        # chunks mapped (at most pool.window_chunks)
    uint8_t n_ooo           # intervals in the block, sorted, disjoint, beyond frontier
    # gaps in the block: sorted, disjoint, not touching, each start > base and
    # end <= frontier (a base that reaches a gap's start moves to its end)
    uint8_t n_gaps
    uint8_t policy          # StreamPolicy
    # Set by stream_init, cleared by stream_free: a zeroed (calloc'd) or freed struct
    # is inert, so freeing every flow's streams at flow end is safe for flows that
    # never had reassembly, and a freed stream cannot take chunks that nobody frees.
    uint8_t live
    # The caller's (the TCP Monitor's): a refused zero-window probe's byte, which was
    # at the frontier, kept until the frontier moves or an ACK proves it was taken.
    uint8_t probe
    uint8_t probe_held


# Stack Memory for streams: one allocation carved into chunks, allocated once.
# final: the Monitor reads its fields from another extension without the vtable.
@cython.final
cdef class StreamPool:
    cdef uint8_t *mem
    cdef uint32_t *chunk_next       # list link; free chunks are chained through it too
    cdef uint64_t *chunk_no         # offset >> chunk_shift of the bytes a chunk holds
    # blocks of STREAM_MAX_OOO interval then STREAM_MAX_GAPS gap [start, end) pairs
    cdef uint64_t *ooo_iv
    cdef uint32_t *ooo_next         # free list of interval blocks
    cdef uint32_t free_head
    cdef uint32_t free_ooo
    cdef uint32_t n_free
    cdef uint32_t n_free_ooo
    cdef uint32_t chunk_shift
    cdef readonly uint32_t chunk_size
    cdef readonly uint32_t n_chunks
    cdef readonly uint32_t ooo_blocks
    cdef readonly uint32_t window_chunks    # max_stream_bytes / chunk_size
    cdef readonly uint64_t total_bytes
    cdef readonly uint64_t max_stream_bytes
    cdef readonly uint64_t retain
    # counters, over every stream of the pool
    cdef readonly uint64_t bytes_stored     # new bytes written into chunks
    cdef readonly uint64_t memcap_events    # stream_add calls that dropped bytes
    cdef readonly uint64_t memcap_bytes
    cdef readonly uint64_t piece_drops      # memcap_events that were STREAM_PIECES
    cdef readonly uint64_t conflicts
    cdef readonly uint64_t gaps
    cdef readonly uint64_t gap_bytes
    # gaps that released the bytes before the oldest held gap (the list was full) or
    # before themselves (no block free), whatever retain said
    cdef readonly uint64_t gap_overflows
    # holes left unskipped for now: no block free to hold their gap, and bytes from
    # the caller's keep offset on (its readers are not done with them) held
    cdef readonly uint64_t gap_deferrals
    # the list was full with readers before the oldest gap: it joined the two oldest
    cdef readonly uint64_t gap_joins
    cdef readonly uint64_t old_segments
    cdef readonly uint64_t ooo_segments     # segments held beyond the frontier
    cdef readonly uint64_t unchecked_bytes  # overlapping bytes that could not be compared
    cdef object stack_memory        # the shared arena the arrays are in (None: heap)
    cdef bint shared_tables         # they are: freed with it, not one by one


# s must be zeroed, or freed with stream_free, before (init does not free); seq0 is
# ISN + 1, or the first sequence number seen when a flow is picked up midstream.
# Every other function does nothing on a stream that is not initialised.
cdef void stream_init(StreamPool pool, mbx_stream *s, uint32_t seq0,
                      uint8_t policy) noexcept nogil
# Places the segment (seq, data[0:n]); returns StreamAddFlags.
cdef int stream_add(StreamPool pool, mbx_stream *s, uint32_t seq, const uint8_t *data,
                    size_t n) noexcept nogil
# The receiver acknowledged everything before seq: skips every hole before it (the
# frontier then runs on through whatever contiguous data follows); returns the bytes
# skipped (0: nothing was missing).  Each hole becomes a gap held inside [base,
# frontier) while bytes before it are held (see STREAM_MAX_GAPS).  Releases early
# whatever that needs (no reader is waiting).
cdef uint64_t stream_skip_to(StreamPool pool, mbx_stream *s, uint32_t seq) noexcept nogil
# The same, one hole at a time, for a caller that reports each gap: skips the first
# hole before seq, sets [*gap_start, *gap_end) and returns its length (0: none left,
# or none that can be skipped now).  Bytes from offset keep on have readers still
# (DATA_RDY published, not yet dispatched): they are never released for a gap (a
# full list joins its two oldest gaps instead; with no block free the hole is left
# for a later call, pool.gap_deferrals, after the caller released them).
cdef uint64_t stream_skip_hole(StreamPool pool, mbx_stream *s, uint32_t seq,
                               uint64_t keep, uint64_t *gap_start,
                               uint64_t *gap_end) noexcept nogil
# The caller is done with bytes before upto; those also more than pool.retain behind
# the frontier are released and their whole chunks go back to the pool (a base that
# reaches a gap moves past it; gaps behind it are dropped).  Returns the chunks freed.
cdef uint32_t stream_release(StreamPool pool, mbx_stream *s, uint64_t upto) noexcept nogil
# Stateless read: *ptr = the bytes at off; returns how many are contiguous in memory
# from there (<= n, stopping at the next gap; 0 when off == frontier) or a
# StreamReadError (STREAM_ERR_GAP inside a gap).
cdef int stream_read(StreamPool pool, const mbx_stream *s, uint64_t off, size_t n,
                     const uint8_t **ptr) noexcept nogil
# The same for bytes a DATA_RDY named, held and contiguous when it was published:
# read past the gap list, where a full list may have joined gaps around them since.
cdef int stream_read_run(StreamPool pool, const mbx_stream *s, uint64_t off, size_t n,
                         const uint8_t **ptr) noexcept nogil
# Held piece i (< s.n_ooo) of s, beyond its frontier: its offsets [*start, *end).
cdef void stream_held_piece(StreamPool pool, const mbx_stream *s, int i, uint64_t *start,
                            uint64_t *end) noexcept nogil
# Stateless read of bytes inside a held piece (off and off + n within it): *ptr = the
# bytes at off; returns how many are contiguous in memory from there (<= n).
cdef int stream_read_held(StreamPool pool, const mbx_stream *s, uint64_t off, size_t n,
                          const uint8_t **ptr) noexcept nogil
# Where reading can go on after STREAM_ERR_GAP at off: the end of the held gap off lies
# in, or the frontier when it lies in none (nothing more can be read).
cdef uint64_t stream_gap_end(StreamPool pool, const mbx_stream *s,
                             uint64_t off) noexcept nogil
# Returns every chunk and interval block to the pool; s may then be initialised again
# (until then it is inert; frontier and counters stay readable).
cdef void stream_free(StreamPool pool, mbx_stream *s) noexcept nogil


cdef inline uint64_t stream_frontier(const mbx_stream *s) noexcept nogil:
    return s.frontier

cdef inline uint64_t stream_base(const mbx_stream *s) noexcept nogil:
    return s.base

# Sequence numbers are unwrapped against the frontier: a segment is taken to be
# within 2 GiB of it, before or after, which TCP windows guarantee.  May be negative
# (a byte before seq0).
cdef inline int64_t stream_offset_of(const mbx_stream *s, uint32_t seq) noexcept nogil:
    return <int64_t>s.frontier + <int32_t>(seq - (s.seq0 + <uint32_t>s.frontier))

cdef inline uint32_t stream_seq_of(const mbx_stream *s, uint64_t off) noexcept nogil:
    return s.seq0 + <uint32_t>off
