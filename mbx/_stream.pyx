"""TCP bytestream reassembly: per-direction, bounded, in C structs.

A stream is append-only (paper §4.2): the *frontier* is the end of the contiguous
prefix, everything before it is delivered and never changes, and reads are stateless
(``read(offset, length)``, paper §6).  Segments are placed at 64-bit offsets (sequence
numbers unwrapped against the frontier), out-of-order bytes wait in a small sorted
interval block until the hole before them is filled or acknowledged (``skip_to``:
a gap, never filler bytes).  All bytes live in fixed-size chunks of one StreamPool
allocation; a stream maps at most ``max_stream_bytes`` of them.  Running out of
chunks, window or interval slots drops bytes and says so (MEMCAP); nothing grows.

Up to ``STREAM_MAX_GAPS`` (65: as many as one ACK can skip) skipped gaps stay inside
the held range ``[base, frontier)``, in the same pool block as the intervals: the
bytes between them stay readable while ``retain`` keeps them (one ACK may prove
several holes lost, and each DATA_RDY of that burst must still be readable), reads
stop at the next gap and fail inside one.  One more gap releases the bytes before the
oldest (``gap_overflows``), unless the caller still has readers for them (its
``keep`` offset): then the two oldest gaps become one over the bytes between them
(``gap_joins``), which the DATA_RDY that named them still reads
(``stream_read_run``).  With no block free at all, such a hole waits, unskipped,
for a later ACK (``gap_deferrals``).

The hot path is a segment exactly at the frontier with nothing out of order: one
memcpy into the tail chunk, no interval bookkeeping.
"""
import time

cimport cython
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport int32_t, int64_t, uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memmove, memset

from mbx._shm cimport stack_arena, stack_calloc, stack_free

cdef enum:
    MIN_CHUNK = 64
    MAX_CHUNK = 1 << 24
    MAX_WINDOW_CHUNKS = 0xFFFF          # mbx_stream.nchunks is 16 bits
    MAX_STREAM_BYTES = 1 << 30          # well inside the 2 GiB of sequence unwrapping
    # uint64 words of a pool block: STREAM_MAX_OOO intervals, then STREAM_MAX_GAPS gaps
    BLOCK_WORDS = 2 * (STREAM_MAX_OOO + STREAM_MAX_GAPS)

cdef uint64_t NO_DIFF = 0xFFFFFFFFFFFFFFFFULL
_MIB = 1 << 20

STREAM_SIZE = sizeof(mbx_stream)
MAX_OOO_PIECES = STREAM_MAX_OOO     # out-of-order pieces a stream holds at most


_FLAG_NAMES = (
    (STREAM_FRONTIER_MOVED, "frontier_moved"),
    (STREAM_CONFLICT, "overlap_conflict"),
    (STREAM_MEMCAP, "memcap"),
    (STREAM_OLD, "old"),
    (STREAM_OUT_OF_ORDER, "out_of_order"),
    (STREAM_OVERLAP, "overlap"),
    (STREAM_UNCHECKED, "unchecked"),
    (STREAM_PIECES, "too_many_pieces"),
)
FLAGS = {name: value for value, name in _FLAG_NAMES}
_POLICIES = {"first": OVERLAP_FIRST, "last": OVERLAP_LAST}


def flag_names(int flags):
    """The names of StreamAddFlags bits set in ``flags``."""
    return {name for value, name in _FLAG_NAMES if flags & value}


cdef bint _is_int(x):
    return isinstance(x, int) and not isinstance(x, bool)


POOL_NAMES = ("total_bytes", "chunk_size", "max_stream_bytes", "retain")


def check_pool(total_bytes, chunk_size, max_stream_bytes, retain, names=POOL_NAMES):
    """Raise ValueError for sizes ``StreamPool`` refuses.  ``names``: the four sizes'
    names in the message, so a layer that takes them under its own names (the TCP
    Monitor's ``stream_memory`` and ``stream_window``) reports them as its user
    gave them; the rules live only here."""
    total_name, chunk_name, window_name, retain_name = names
    if not _is_int(chunk_size) or not MIN_CHUNK <= chunk_size <= MAX_CHUNK \
            or chunk_size & (chunk_size - 1):
        raise ValueError(f"{chunk_name} must be a power of two from {MIN_CHUNK:,} to "
                         f"{MAX_CHUNK:,}, not {chunk_size!r}")
    if not _is_int(total_bytes) or total_bytes < chunk_size:
        raise ValueError(f"{total_name} must be at least {chunk_name} ({chunk_size:,}), "
                         f"not {total_bytes!r}")
    if total_bytes // chunk_size >= 0xFFFFFFFF:
        raise ValueError(f"{total_name} makes too many chunks of {chunk_name} "
                         f"({chunk_size:,}): {total_bytes // chunk_size:,}, below "
                         f"{0xFFFFFFFF:,} fit")
    if not _is_int(max_stream_bytes) or not chunk_size <= max_stream_bytes <= MAX_STREAM_BYTES:
        raise ValueError(f"{window_name} must be from {chunk_name} ({chunk_size:,}) to "
                         f"{MAX_STREAM_BYTES:,}, not {max_stream_bytes!r}")
    if max_stream_bytes // chunk_size > MAX_WINDOW_CHUNKS:
        raise ValueError(f"{window_name} must be at most {MAX_WINDOW_CHUNKS:,} chunks of "
                         f"{chunk_name} ({chunk_size:,}), not "
                         f"{max_stream_bytes // chunk_size:,}")
    if not _is_int(retain) or not 0 <= retain < max_stream_bytes:
        raise ValueError(f"{retain_name} must be below {window_name} "
                         f"({max_stream_bytes:,}), not {retain!r}")


@cython.final
cdef class StreamPool:
    """Stack Memory for reassembled streams: ``total_bytes`` allocated once, carved
    into ``chunk_size`` chunks (a power of two) shared by every stream.

    ``StreamPool(total_bytes=64 MiB, chunk_size=16384, max_stream_bytes=1 MiB,
    retain=0, ooo_blocks=None)``: a stream maps at most ``max_stream_bytes`` of chunks
    (out-of-order window plus retained bytes) and holds out-of-order data at most that
    far beyond its frontier; ``retain`` bytes behind the frontier survive release()
    for late readers; ``ooo_blocks`` (default: one per chunk) bounds how many streams
    may hold out-of-order data or skipped gaps at once.
    """

    def __cinit__(self, total_bytes=64 * _MIB, chunk_size=16384,
                  max_stream_bytes=_MIB, retain=0, ooo_blocks=None):
        # Validate everything before allocating anything.
        check_pool(total_bytes, chunk_size, max_stream_bytes, retain)
        n_chunks = total_bytes // chunk_size
        if ooo_blocks is None:
            ooo_blocks = n_chunks
        if not _is_int(ooo_blocks) or not 0 <= ooo_blocks < 0xFFFFFFFF:
            raise ValueError(f"ooo_blocks must be between 0 and 4294967294, "
                             f"got {ooo_blocks!r}")

        self.chunk_size = chunk_size
        self.chunk_shift = chunk_size.bit_length() - 1
        self.n_chunks = n_chunks
        self.total_bytes = <uint64_t>n_chunks * chunk_size
        self.max_stream_bytes = max_stream_bytes
        self.window_chunks = max_stream_bytes // chunk_size
        self.retain = retain
        self.ooo_blocks = ooo_blocks

        # In the shared Stack Memory arena when pipelined, so NF processes read the
        # streams (see mbx._shm); else the heap.
        self.stack_memory = stack_arena()
        self.shared_tables = self.stack_memory is not None
        self.mem = <uint8_t *>stack_calloc(self.total_bytes, 1)
        self.chunk_next = <uint32_t *>stack_calloc(n_chunks, sizeof(uint32_t))
        self.chunk_no = <uint64_t *>stack_calloc(n_chunks, sizeof(uint64_t))
        # +1: never a zero-byte request, which may return NULL.
        self.ooo_iv = <uint64_t *>stack_calloc(<size_t>ooo_blocks * BLOCK_WORDS + 1,
                                               sizeof(uint64_t))
        self.ooo_next = <uint32_t *>stack_calloc(<size_t>ooo_blocks + 1, sizeof(uint32_t))
        if (self.mem == NULL or self.chunk_next == NULL or self.chunk_no == NULL
                or self.ooo_iv == NULL or self.ooo_next == NULL):
            raise MemoryError(f"cannot allocate a stream pool of {self.total_bytes} bytes")

        # Free lists chained lowest index first.
        cdef uint32_t i
        for i in range(self.n_chunks):
            self.chunk_next[i] = i + 1 if i + 1 < self.n_chunks else NO_CHUNK
        self.free_head = 0
        self.n_free = self.n_chunks
        for i in range(self.ooo_blocks):
            self.ooo_next[i] = i + 1 if i + 1 < self.ooo_blocks else NO_CHUNK
        self.free_ooo = 0 if self.ooo_blocks else NO_CHUNK
        self.n_free_ooo = self.ooo_blocks

    def __dealloc__(self):
        stack_free(self.shared_tables, self.mem)
        stack_free(self.shared_tables, self.chunk_next)
        stack_free(self.shared_tables, self.chunk_no)
        stack_free(self.shared_tables, self.ooo_iv)
        stack_free(self.shared_tables, self.ooo_next)

    @property
    def chunks_in_use(self):
        return self.n_chunks - self.n_free

    @property
    def chunks_free(self):
        return self.n_free

    @property
    def ooo_blocks_in_use(self):
        return self.ooo_blocks - self.n_free_ooo

    @property
    def counters(self):
        """Every counter of the pool, as a dict."""
        return {
            "chunks": self.n_chunks,
            "chunks_in_use": self.n_chunks - self.n_free,
            "ooo_blocks_in_use": self.ooo_blocks - self.n_free_ooo,
            "bytes_stored": self.bytes_stored,
            "memcap_events": self.memcap_events,
            "memcap_bytes": self.memcap_bytes,
            "piece_drops": self.piece_drops,
            "conflicts": self.conflicts,
            "gaps": self.gaps,
            "gap_bytes": self.gap_bytes,
            "gap_overflows": self.gap_overflows,
            "gap_deferrals": self.gap_deferrals,
            "gap_joins": self.gap_joins,
            "old_segments": self.old_segments,
            "ooo_segments": self.ooo_segments,
            "unchecked_bytes": self.unchecked_bytes,
        }

    def __repr__(self):
        return (f"StreamPool(total_bytes={self.total_bytes}, chunk_size={self.chunk_size}, "
                f"max_stream_bytes={self.max_stream_bytes}, retain={self.retain}; "
                f"{self.n_chunks - self.n_free}/{self.n_chunks} chunks in use)")


# ---------------------------------------------------------------------- internals

cdef inline uint8_t *_mem(StreamPool pool, uint32_t c) noexcept nogil:
    return pool.mem + (<size_t>c << pool.chunk_shift)


cdef inline void _push_chunk(StreamPool pool, uint32_t c) noexcept nogil:
    pool.chunk_next[c] = pool.free_head
    pool.free_head = c
    pool.n_free += 1


cdef inline uint64_t *_ivs(StreamPool pool, const mbx_stream *s) noexcept nogil:
    return pool.ooo_iv + <size_t>s.ooo * BLOCK_WORDS


cdef inline uint64_t *_gapv(StreamPool pool, const mbx_stream *s) noexcept nogil:
    # The held gaps: [start, end) pairs after the block's intervals.
    return pool.ooo_iv + <size_t>s.ooo * BLOCK_WORDS + 2 * STREAM_MAX_OOO


cdef inline void _drop_ooo_block(StreamPool pool, mbx_stream *s) noexcept nogil:
    # Forgets every interval and gap.
    if s.ooo != NO_CHUNK:
        pool.ooo_next[s.ooo] = pool.free_ooo
        pool.free_ooo = s.ooo
        pool.n_free_ooo += 1
        s.ooo = NO_CHUNK
    s.n_ooo = 0
    s.n_gaps = 0


cdef inline void _maybe_drop_block(StreamPool pool, mbx_stream *s) noexcept nogil:
    # The block goes back once it holds neither intervals nor gaps.
    if s.n_ooo == 0 and s.n_gaps == 0:
        _drop_ooo_block(pool, s)


cdef inline int _gap_after(StreamPool pool, const mbx_stream *s,
                           uint64_t off) noexcept nogil:
    # Index of the first held gap that ends after off (off lies in it when its start
    # is <= off), or n_gaps.
    cdef const uint64_t *g
    cdef int t = 0
    if s.n_gaps:
        g = _gapv(pool, s)
        while t < s.n_gaps and g[2 * t + 1] <= off:
            t += 1
    return t


cdef inline uint32_t _find_chunk(StreamPool pool, const mbx_stream *s,
                                 uint64_t cno) noexcept nogil:
    # The list is short (at most window_chunks) and sorted; appends go to the tail,
    # so the tail is checked first.
    cdef uint32_t c = s.tail
    if c != NO_CHUNK and pool.chunk_no[c] == cno:
        return c
    c = s.head
    while c != NO_CHUNK and pool.chunk_no[c] < cno:
        c = pool.chunk_next[c]
    if c != NO_CHUNK and pool.chunk_no[c] == cno:
        return c
    return NO_CHUNK


cdef uint64_t _compare(StreamPool pool, const mbx_stream *s, uint64_t off,
                       const uint8_t *src, uint64_t n) noexcept nogil:
    # Offset of the first byte of [off, off + n) that differs from src, or NO_DIFF.
    # Every chunk of the range is mapped (the caller only compares held bytes).
    cdef uint64_t mask = pool.chunk_size - 1
    cdef uint64_t take, i
    cdef const uint8_t *p
    cdef uint32_t c = _find_chunk(pool, s, off >> pool.chunk_shift)
    while n > 0 and c != NO_CHUNK:
        take = pool.chunk_size - (off & mask)
        if take > n:
            take = n
        p = _mem(pool, c) + (off & mask)
        if memcmp(p, src, take) != 0:
            i = 0
            while p[i] == src[i]:
                i += 1
            return off + i
        off += take
        src += take
        n -= take
        c = pool.chunk_next[c]
    return NO_DIFF


cdef void _copy(StreamPool pool, const mbx_stream *s, uint64_t off, const uint8_t *src,
                uint64_t n) noexcept nogil:
    # Writes into chunks already mapped (consecutive: the caller mapped the range).
    cdef uint64_t mask = pool.chunk_size - 1
    cdef uint64_t take
    cdef uint32_t c = _find_chunk(pool, s, off >> pool.chunk_shift)
    while n > 0 and c != NO_CHUNK:
        take = pool.chunk_size - (off & mask)
        if take > n:
            take = n
        memcpy(_mem(pool, c) + (off & mask), src, take)
        off += take
        src += take
        n -= take
        c = pool.chunk_next[c]


cdef void _set_base(StreamPool pool, mbx_stream *s, uint64_t nb) noexcept nogil:
    # Moves base forward to nb, drops the gaps it reaches and frees the chunks wholly
    # before it.
    s.base = nb
    cdef uint64_t *g
    cdef int k = 0
    if s.n_gaps:
        g = _gapv(pool, s)
        while k < s.n_gaps and g[2 * k] <= s.base:
            # A base inside (or at) a gap is a base at its end: there are no bytes in it.
            if s.base < g[2 * k + 1]:
                s.base = g[2 * k + 1]
            k += 1
        if k:
            s.n_gaps -= k
            memmove(g, g + 2 * k, s.n_gaps * 2 * sizeof(uint64_t))
            _maybe_drop_block(pool, s)
    cdef uint32_t c = s.head
    cdef uint32_t nxt
    while c != NO_CHUNK and ((pool.chunk_no[c] + 1) << pool.chunk_shift) <= s.base:
        nxt = pool.chunk_next[c]
        _push_chunk(pool, c)
        s.nchunks -= 1
        c = nxt
    s.head = c
    if c == NO_CHUNK:
        s.tail = NO_CHUNK


cdef uint64_t _held_in(const uint64_t *iv, int i, int j, int64_t lo,
                       int64_t hi) noexcept nogil:
    # Bytes of [lo, hi) inside the intervals iv[i:j].
    cdef uint64_t held = 0
    cdef int64_t a, b
    cdef int t
    for t in range(i, j):
        a = <int64_t>iv[2 * t]
        b = <int64_t>iv[2 * t + 1]
        if a < lo:
            a = lo
        if b > hi:
            b = hi
        if a < b:
            held += <uint64_t>(b - a)
    return held


cdef int _append(StreamPool pool, mbx_stream *s, const uint8_t *data,
                 size_t n) noexcept nogil:
    # The hot path: data starts at the frontier and nothing is held beyond it, so
    # every mapped chunk is at or before the frontier's and the bytes go to the tail.
    cdef int flags = 0
    cdef uint64_t mask = pool.chunk_size - 1
    cdef uint64_t cno, take
    cdef uint32_t c
    while n > 0:
        cno = s.frontier >> pool.chunk_shift
        c = s.tail
        if c == NO_CHUNK or pool.chunk_no[c] != cno:
            if pool.n_free == 0 or s.nchunks >= pool.window_chunks:
                s.dropped += n
                pool.memcap_events += 1
                pool.memcap_bytes += n
                return flags | STREAM_MEMCAP
            c = pool.free_head
            pool.free_head = pool.chunk_next[c]
            pool.n_free -= 1
            pool.chunk_no[c] = cno
            pool.chunk_next[c] = NO_CHUNK
            if s.tail == NO_CHUNK:
                s.head = c
            else:
                pool.chunk_next[s.tail] = c
            s.tail = c
            s.nchunks += 1
        take = pool.chunk_size - (s.frontier & mask)
        if take > n:
            take = n
        memcpy(_mem(pool, c) + (s.frontier & mask), data, take)
        s.frontier += take
        pool.bytes_stored += take
        data += take
        n -= take
        flags = STREAM_FRONTIER_MOVED
    return flags


cdef uint64_t _check_delivered(StreamPool pool, mbx_stream *s, int64_t lo, int64_t hi,
                               const uint8_t *src, uint64_t *diff) noexcept nogil:
    # Compares [lo, hi) (base <= lo < hi <= frontier) with the delivered bytes, around
    # every gap inside; returns the bytes that could not be compared (in gaps).
    cdef int64_t pos = lo
    cdef int64_t gs, ge
    cdef uint64_t d
    cdef uint64_t unchecked = 0
    cdef const uint64_t *g
    cdef int t = _gap_after(pool, s, <uint64_t>lo)
    if s.n_gaps:
        g = _gapv(pool, s)
    while t < s.n_gaps and pos < hi:
        gs = <int64_t>g[2 * t]
        ge = <int64_t>g[2 * t + 1]
        if gs >= hi:
            break
        # The bytes before the gap, then the gap itself.
        if pos < gs:
            d = _compare(pool, s, <uint64_t>pos, src + (pos - lo), <uint64_t>(gs - pos))
            if d < diff[0]:
                diff[0] = d
            pos = gs
        ge = hi if hi < ge else ge
        unchecked += <uint64_t>(ge - pos)
        pos = ge
        t += 1
    if pos < hi:
        d = _compare(pool, s, <uint64_t>pos, src + (pos - lo), <uint64_t>(hi - pos))
        if d < diff[0]:
            diff[0] = d
    return unchecked


cdef int _add_slow(StreamPool pool, mbx_stream *s, int64_t start, const uint8_t *data,
                   size_t n) noexcept nogil:
    cdef int flags = 0
    cdef int64_t end = start + <int64_t>n
    cdef int64_t F = <int64_t>s.frontier
    cdef int64_t lo, hi, limit, a, b, new_lo, new_hi, pos, cut
    cdef uint64_t diff = NO_DIFF
    cdef uint64_t d, unchecked = 0, dropped = 0, stored
    cdef uint64_t c0, c1, cno, avail, missing
    cdef uint32_t c, prev, nc
    cdef uint64_t *iv = NULL
    cdef int i, j, k, t, after, dest
    cdef bint joins

    # 1. Bytes before the frontier are delivered: compared, never changed.
    if start < F:
        flags |= STREAM_OVERLAP
        hi = end if end < F else F
        lo = start if start > <int64_t>s.base else <int64_t>s.base
        # [start, base): released (or before offset 0), nothing to compare with.
        unchecked += <uint64_t>((lo if lo < hi else hi) - start)
        if lo < hi:
            unchecked += _check_delivered(pool, s, lo, hi, data + (lo - start), &diff)
        if end <= F:
            flags |= STREAM_OLD
            start = end
        else:
            data += F - start
            start = F

    # 2. Out-of-order bytes at most max_stream_bytes beyond the frontier.
    if start < end:
        limit = F + <int64_t>pool.max_stream_bytes
        if end > limit:
            cut = start if start > limit else limit
            dropped += <uint64_t>(end - cut)
            end = cut

    # 3. Chunks: count those the range lacks; it is cut at the first one that the
    # pool or the stream's window cannot supply.
    if start < end:
        if s.ooo != NO_CHUNK:
            iv = _ivs(pool, s)
        c0 = <uint64_t>start >> pool.chunk_shift
        c1 = <uint64_t>(end - 1) >> pool.chunk_shift
        avail = pool.n_free
        if avail > <uint64_t>(pool.window_chunks - s.nchunks):
            avail = pool.window_chunks - s.nchunks
        c = s.head
        while c != NO_CHUNK and pool.chunk_no[c] < c0:
            c = pool.chunk_next[c]
        missing = 0
        cno = c0
        while cno <= c1:
            if c != NO_CHUNK and pool.chunk_no[c] == cno:
                c = pool.chunk_next[c]
            elif missing == avail:
                cut = <int64_t>(cno << pool.chunk_shift)
                if cut < start:
                    cut = start
                dropped += <uint64_t>(end - cut) - _held_in(iv, 0, s.n_ooo, cut, end)
                end = cut
                break
            else:
                missing += 1
            cno += 1

    # 4. Intervals: the new range merges with every interval it overlaps or touches.
    if start < end:
        # i: the first interval that ends at or after start (binary search: up to
        # STREAM_MAX_OOO of them, and in-order bytes beyond the last are the usual case)
        i = 0
        k = s.n_ooo
        while i < k:
            t = (i + k) >> 1
            if <int64_t>iv[2 * t + 1] < start:
                i = t + 1
            else:
                k = t
        j = i
        while j < s.n_ooo and <int64_t>iv[2 * j] <= end:
            j += 1
        k = j - i
        new_lo = start
        new_hi = end
        if k > 0:
            if <int64_t>iv[2 * i] < new_lo:
                new_lo = <int64_t>iv[2 * i]
            if <int64_t>iv[2 * j - 1] > new_hi:
                new_hi = <int64_t>iv[2 * j - 1]
        joins = new_lo == F
        after = s.n_ooo - k + (0 if joins else 1)
        if after > STREAM_MAX_OOO or (after > 0 and s.ooo == NO_CHUNK
                                      and pool.n_free_ooo == 0):
            dropped += <uint64_t>(end - start) - _held_in(iv, i, j, start, end)
            end = start
            if after > STREAM_MAX_OOO:
                flags |= STREAM_PIECES
        elif after > 0 and s.ooo == NO_CHUNK:
            s.ooo = pool.free_ooo
            pool.free_ooo = pool.ooo_next[s.ooo]
            pool.n_free_ooo -= 1
            iv = _ivs(pool, s)

    if start < end:
        # 5. Map the missing chunks (step 3 made sure there are enough).
        c1 = <uint64_t>(end - 1) >> pool.chunk_shift
        prev = NO_CHUNK
        c = s.head
        while c != NO_CHUNK and pool.chunk_no[c] < c0:
            prev = c
            c = pool.chunk_next[c]
        cno = c0
        while cno <= c1:
            if c != NO_CHUNK and pool.chunk_no[c] == cno:
                prev = c
                c = pool.chunk_next[c]
            else:
                nc = pool.free_head
                pool.free_head = pool.chunk_next[nc]
                pool.n_free -= 1
                pool.chunk_no[nc] = cno
                pool.chunk_next[nc] = c
                if prev == NO_CHUNK:
                    s.head = nc
                else:
                    pool.chunk_next[prev] = nc
                if c == NO_CHUNK:
                    s.tail = nc
                s.nchunks += 1
                prev = nc
            cno += 1

        # 6. New bytes are copied; bytes already held are compared and, under
        # OVERLAP_LAST, replaced.
        stored = 0
        pos = start
        for k in range(i, j):
            a = <int64_t>iv[2 * k]
            b = <int64_t>iv[2 * k + 1]
            hi = a if a < end else end
            if pos < hi:
                _copy(pool, s, <uint64_t>pos, data + (pos - start), <uint64_t>(hi - pos))
                stored += <uint64_t>(hi - pos)
                pos = hi
            hi = b if b < end else end
            if pos < hi:
                flags |= STREAM_OVERLAP
                d = _compare(pool, s, <uint64_t>pos, data + (pos - start),
                             <uint64_t>(hi - pos))
                if d != NO_DIFF:
                    if d < diff:
                        diff = d
                    if s.policy == OVERLAP_LAST:
                        _copy(pool, s, <uint64_t>pos, data + (pos - start),
                              <uint64_t>(hi - pos))
                pos = hi
        if pos < end:
            _copy(pool, s, <uint64_t>pos, data + (pos - start), <uint64_t>(end - pos))
            stored += <uint64_t>(end - pos)
        pool.bytes_stored += stored

        # 7. Replace iv[i:j] by the merged interval, or hand it to the frontier.
        if s.n_ooo > j:
            dest = i if joins else i + 1
            memmove(&iv[2 * dest], &iv[2 * j], (s.n_ooo - j) * 2 * sizeof(uint64_t))
        if joins:
            s.frontier = <uint64_t>new_hi
            flags |= STREAM_FRONTIER_MOVED
        else:
            iv[2 * i] = <uint64_t>new_lo
            iv[2 * i + 1] = <uint64_t>new_hi
            if stored:
                flags |= STREAM_OUT_OF_ORDER
                pool.ooo_segments += 1
        s.n_ooo = <uint8_t>after
        _maybe_drop_block(pool, s)

    if flags & STREAM_OLD:
        pool.old_segments += 1
    if diff != NO_DIFF:
        flags |= STREAM_CONFLICT
        s.conflict_off = diff
        s.conflicts += 1
        pool.conflicts += 1
    if unchecked:
        flags |= STREAM_UNCHECKED
        pool.unchecked_bytes += unchecked
    if dropped:
        flags |= STREAM_MEMCAP
        s.dropped += dropped
        pool.memcap_events += 1
        pool.memcap_bytes += dropped
        if flags & STREAM_PIECES:
            pool.piece_drops += 1
    elif flags & STREAM_PIECES:         # every byte was held already: nothing lost
        flags &= ~STREAM_PIECES
    return flags


# ---------------------------------------------------------------------- C API

cdef void stream_init(StreamPool pool, mbx_stream *s, uint32_t seq0,
                      uint8_t policy) noexcept nogil:
    memset(s, 0, sizeof(mbx_stream))
    s.seq0 = seq0
    s.head = NO_CHUNK
    s.tail = NO_CHUNK
    s.ooo = NO_CHUNK
    s.policy = OVERLAP_LAST if policy == OVERLAP_LAST else OVERLAP_FIRST
    s.live = 1


cdef int stream_add(StreamPool pool, mbx_stream *s, uint32_t seq, const uint8_t *data,
                    size_t n) noexcept nogil:
    if n == 0 or not s.live:
        return 0
    cdef int32_t rel = <int32_t>(seq - (s.seq0 + <uint32_t>s.frontier))
    if rel == 0 and s.n_ooo == 0:
        return _append(pool, s, data, n)
    return _add_slow(pool, s, <int64_t>s.frontier + rel, data, n)


cdef uint64_t stream_skip_hole(StreamPool pool, mbx_stream *s, uint32_t seq,
                               uint64_t keep, uint64_t *gap_start,
                               uint64_t *gap_end) noexcept nogil:
    cdef int32_t rel = <int32_t>(seq - (s.seq0 + <uint32_t>s.frontier))
    if rel <= 0 or not s.live:
        return 0
    # Bytes before the hole with readers still: holding the gap must not release
    # them.  No block free releases everything before the hole; a full list, what
    # is before the oldest gap.
    cdef uint64_t *g
    if s.base < s.frontier and s.ooo == NO_CHUNK and pool.n_free_ooo == 0 \
            and s.frontier > keep:
        pool.gap_deferrals += 1
        return 0
    if (s.base < s.frontier and s.n_gaps == STREAM_MAX_GAPS
            and _gapv(pool, s)[2 * STREAM_MAX_GAPS - 1] != s.frontier
            and _gapv(pool, s)[0] > keep):
        # The list is full and the bytes before the oldest gap have readers: the two
        # oldest gaps become one, over the bytes between them.  Those stay held, and
        # the DATA_RDY that named them reads them past the gap list
        # (stream_read_run); other reads now stop at the joined gap.  Deferring the
        # hole instead would leave the pieces beyond it held until the burst's end,
        # and a burst with more rounds of holes would then refuse new pieces.
        g = _gapv(pool, s)
        g[1] = g[3]
        memmove(g + 2, g + 4, (STREAM_MAX_GAPS - 2) * 2 * sizeof(uint64_t))
        s.n_gaps -= 1
        pool.gap_joins += 1
    cdef uint64_t target = s.frontier + <uint64_t>rel
    cdef uint64_t hs = s.frontier
    cdef uint64_t he, nf
    cdef uint64_t *iv
    if s.n_ooo > 0 and _ivs(pool, s)[0] <= target:
        # The hole ends where held data begins; the frontier runs through that data.
        iv = _ivs(pool, s)
        he = iv[0]
        nf = iv[1]
        s.n_ooo -= 1
        memmove(iv, iv + 2, s.n_ooo * 2 * sizeof(uint64_t))
    else:
        he = target
        nf = target
    s.frontier = nf
    if s.base >= hs:
        _set_base(pool, s, he)      # nothing held before the gap: base jumps past it
    elif s.n_gaps and _gapv(pool, s)[2 * s.n_gaps - 1] == hs:
        _gapv(pool, s)[2 * s.n_gaps - 1] = he     # no byte since the last gap: one gap
    elif s.ooo == NO_CHUNK and pool.n_free_ooo == 0:
        # Nowhere to keep the gap: nothing before it can be read past it.
        pool.gap_overflows += 1
        _set_base(pool, s, he)
    else:
        if s.ooo == NO_CHUNK:
            s.ooo = pool.free_ooo
            pool.free_ooo = pool.ooo_next[s.ooo]
            pool.n_free_ooo -= 1
        if s.n_gaps == STREAM_MAX_GAPS:
            # The list is full: the bytes before the oldest gap go, and that gap.
            pool.gap_overflows += 1
            _set_base(pool, s, _gapv(pool, s)[1])
        g = _gapv(pool, s)
        g[2 * s.n_gaps] = hs
        g[2 * s.n_gaps + 1] = he
        s.n_gaps += 1
    _maybe_drop_block(pool, s)
    s.gap_bytes += he - hs
    s.gaps += 1
    pool.gaps += 1
    pool.gap_bytes += he - hs
    gap_start[0] = hs
    gap_end[0] = he
    return he - hs


cdef uint64_t stream_skip_to(StreamPool pool, mbx_stream *s, uint32_t seq) noexcept nogil:
    # At most STREAM_MAX_OOO + 1 rounds: each consumes an interval or reaches seq.
    cdef uint64_t total = 0
    cdef uint64_t gs, ge, k
    while True:
        k = stream_skip_hole(pool, s, seq, 0xFFFFFFFFFFFFFFFFULL, &gs, &ge)
        if k == 0:
            return total
        total += k


cdef uint32_t stream_release(StreamPool pool, mbx_stream *s, uint64_t upto) noexcept nogil:
    cdef uint64_t lim = s.frontier - pool.retain if s.frontier > pool.retain else 0
    if upto > lim:
        upto = lim
    if upto <= s.base or not s.live:
        return 0
    cdef uint32_t before = s.nchunks
    _set_base(pool, s, upto)
    return before - s.nchunks


cdef int stream_read(StreamPool pool, const mbx_stream *s, uint64_t off, size_t n,
                     const uint8_t **ptr) noexcept nogil:
    cdef const uint64_t *g
    cdef int t
    if s.base <= off <= s.frontier and s.live:
        t = _gap_after(pool, s, off)
        if t < s.n_gaps:
            g = _gapv(pool, s) + 2 * t
            if off >= g[0]:
                return STREAM_ERR_GAP
            if n > g[0] - off:
                n = <size_t>(g[0] - off)        # a read stops at the next gap
    return stream_read_run(pool, s, off, n, ptr)


cdef int stream_read_run(StreamPool pool, const mbx_stream *s, uint64_t off, size_t n,
                         const uint8_t **ptr) noexcept nogil:
    if off < s.base:
        return STREAM_ERR_RELEASED
    if off > s.frontier or not s.live:
        return STREAM_ERR_BEYOND
    cdef uint64_t avail = s.frontier - off
    if avail == 0 or n == 0:
        ptr[0] = NULL
        return 0
    return _chunk_run(pool, s, off, avail if avail < n else n, ptr)


cdef inline int _chunk_run(StreamPool pool, const mbx_stream *s, uint64_t off, uint64_t n,
                           const uint8_t **ptr) noexcept nogil:
    # Up to n bytes at stream offset off, as far as the chunk holding off goes: the
    # caller has bounded n by what the stream has there (delivered or held).
    cdef uint32_t c = _find_chunk(pool, s, off >> pool.chunk_shift)
    if c == NO_CHUNK:
        return STREAM_ERR_GAP
    cdef uint64_t within = off & (pool.chunk_size - 1)
    if n > pool.chunk_size - within:
        n = pool.chunk_size - within
    ptr[0] = _mem(pool, c) + within
    return <int>n


cdef void stream_held_piece(StreamPool pool, const mbx_stream *s, int i, uint64_t *start,
                            uint64_t *end) noexcept nogil:
    cdef const uint64_t *iv = _ivs(pool, s) + 2 * i
    start[0] = iv[0]
    end[0] = iv[1]


cdef int stream_read_held(StreamPool pool, const mbx_stream *s, uint64_t off, size_t n,
                          const uint8_t **ptr) noexcept nogil:
    # A held piece's bytes are in the chunks its offsets map to, as delivered ones.
    if not s.live or n == 0:
        return 0
    return _chunk_run(pool, s, off, n, ptr)


cdef uint64_t stream_gap_end(StreamPool pool, const mbx_stream *s,
                             uint64_t off) noexcept nogil:
    cdef int t = _gap_after(pool, s, off)
    if t < s.n_gaps and _gapv(pool, s)[2 * t] <= off:
        return _gapv(pool, s)[2 * t + 1]
    return s.frontier


cdef void stream_free(StreamPool pool, mbx_stream *s) noexcept nogil:
    if not s.live:
        return
    s.live = 0
    cdef uint32_t c = s.head
    cdef uint32_t nxt
    while c != NO_CHUNK:
        nxt = pool.chunk_next[c]
        _push_chunk(pool, c)
        c = nxt
    s.head = NO_CHUNK
    s.tail = NO_CHUNK
    s.nchunks = 0
    _drop_ooo_block(pool, s)
    s.base = s.frontier


# ---------------------------------------------------------------------- Python API

cdef uint32_t _seq(seq) except? 0xFFFFFFFF:
    # Sequence arithmetic is modulo 2**32: seq0 + offset needs no wrapping by callers.
    if not _is_int(seq):
        raise ValueError(f"seq must be an int, got {seq!r}")
    return seq & 0xFFFFFFFF


@cython.final
cdef class _StreamBytes:
    # Exports delivered bytes of a chunk read-only and keeps the pool alive: a view
    # held past release() can go stale (the chunk is reused) but never dangles.
    cdef object owner
    cdef const uint8_t *ptr
    cdef Py_ssize_t length

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        PyBuffer_FillInfo(buffer, self, <void *>self.ptr, self.length, 1, flags)

    def __releasebuffer__(self, Py_buffer *buffer):
        pass


@cython.final
cdef class Stream:
    """One direction of a TCP connection, reassembled (a test and tool API; the TCP
    Monitor uses the C functions of ``_stream.pxd`` on structs it embeds).

    ``Stream(pool, seq0, policy="first")``: ``seq0`` is the sequence number of stream
    offset 0 (ISN + 1); ``policy`` decides conflicting overlaps beyond the frontier
    (``"first"`` keeps the old bytes, ``"last"`` takes the new ones).
    """
    cdef StreamPool pool
    cdef mbx_stream s
    cdef list _gaps
    cdef bint _closed

    def __cinit__(self, StreamPool pool not None, seq0, policy="first"):
        if not _is_int(seq0) or not 0 <= seq0 <= 0xFFFFFFFF:
            raise ValueError(f"seq0 must be a 32-bit sequence number, got {seq0!r}")
        if policy not in _POLICIES:
            raise ValueError(f"policy must be 'first' or 'last', got {policy!r}")
        self.pool = pool
        self._gaps = []
        stream_init(pool, &self.s, seq0, _POLICIES[policy])

    def __dealloc__(self):
        if not self._closed and self.pool is not None:
            stream_free(self.pool, &self.s)

    cdef _check_open(self):
        if self._closed:
            raise ValueError("the stream is closed")

    def close(self):
        """Returns every chunk to the pool; the stream can no longer be used."""
        if not self._closed:
            stream_free(self.pool, &self.s)
            self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def add(self, seq, data):
        """Places a segment; returns the names of the StreamAddFlags it raised."""
        self._check_open()
        cdef const uint8_t[::1] v = data
        cdef size_t n = v.shape[0]
        cdef uint32_t sq = _seq(seq)
        cdef int flags
        if n == 0:
            return set()
        with nogil:
            flags = stream_add(self.pool, &self.s, sq, &v[0], n)
        return flag_names(flags)

    def skip_to(self, seq, keep=None):
        """The peer acknowledged everything before ``seq``: skips the holes before it,
        records each as a gap, returns the bytes skipped.  ``keep``: the offset from
        which delivered bytes still have readers (never released for a gap)."""
        self._check_open()
        cdef uint32_t sq = _seq(seq)
        cdef uint64_t gs, ge, k, total = 0
        cdef uint64_t kept = 0xFFFFFFFFFFFFFFFFULL
        if keep is not None:
            if not _is_int(keep) or keep < 0:
                raise ValueError(f"keep must be a stream offset, got {keep!r}")
            kept = keep
        while True:
            k = stream_skip_hole(self.pool, &self.s, sq, kept, &gs, &ge)
            if k == 0:
                return total
            self._gaps.append((gs, ge))
            total += k

    def release(self, upto):
        """Releases bytes before offset ``upto`` (and more than ``pool.retain`` behind
        the frontier); returns the chunks given back to the pool."""
        self._check_open()
        if not _is_int(upto) or upto < 0:
            raise ValueError(f"upto must be a stream offset, got {upto!r}")
        return stream_release(self.pool, &self.s, min(upto, self.s.frontier))

    cdef _readable(self, off, n):
        # Validates a read; returns the bytes available from off (up to the frontier
        # or a gap, at most n).
        self._check_open()
        if not _is_int(off) or off < 0:
            raise ValueError(f"off must be a stream offset, got {off!r}")
        if not _is_int(n) or n < 0:
            raise ValueError(f"n must be a length, got {n!r}")
        if off < self.s.base:
            raise ValueError(f"offset {off} is released (base is {self.s.base})")
        if off > self.s.frontier:
            raise ValueError(f"offset {off} is beyond the frontier ({self.s.frontier})")
        cdef uint64_t end = self.s.frontier
        cdef int t = _gap_after(self.pool, &self.s, off)
        cdef const uint64_t *g
        if t < self.s.n_gaps:
            g = _gapv(self.pool, &self.s) + 2 * t
            if off >= g[0]:
                raise ValueError(f"offset {off} is in the gap [{g[0]}, {g[1]})")
            end = g[0]
        return min(n, end - off)

    def read(self, off, n):
        """A copy of up to ``n`` delivered bytes from ``off``, joining chunks; shorter
        at the frontier or at a gap.  ValueError when ``off`` is released, in a gap or
        beyond the frontier."""
        cdef uint64_t want = self._readable(off, n)
        cdef uint64_t o = off
        cdef const uint8_t *p
        cdef int got
        out = bytearray(want)
        cdef uint8_t[::1] dst = out
        cdef uint64_t done = 0
        while done < want:
            got = stream_read(self.pool, &self.s, o + done, want - done, &p)
            if got <= 0:
                break
            memcpy(&dst[done], p, got)
            done += got
        return bytes(out[:done])

    def view(self, off, n):
        """Up to ``n`` delivered bytes from ``off`` as a read-only memoryview: zero-copy
        when they lie in one chunk, a copy otherwise.  Valid until released."""
        cdef uint64_t want = self._readable(off, n)
        cdef const uint8_t *p = NULL
        cdef int got = stream_read(self.pool, &self.s, off, want, &p)
        if <uint64_t>max(got, 0) < want:
            return memoryview(self.read(off, n))
        cdef _StreamBytes b = _StreamBytes.__new__(_StreamBytes)
        b.owner = self.pool
        b.ptr = p if p != NULL else <const uint8_t *>b""
        b.length = got
        return memoryview(b)

    def offset_of(self, seq):
        """The stream offset of sequence number ``seq`` (unwrapped near the frontier)."""
        return stream_offset_of(&self.s, _seq(seq))

    @property
    def frontier(self):
        return self.s.frontier

    @property
    def base(self):
        return self.s.base

    @property
    def gaps(self):
        """Every gap skip_to() recorded, as [start, end) offsets, oldest first."""
        return list(self._gaps)

    @property
    def held_gaps(self):
        """The gaps still inside [base, frontier) (reads stop at them), as [start,
        end) offsets, oldest first; at most STREAM_MAX_GAPS, adjacent ones joined."""
        if self.s.n_gaps == 0:
            return []
        cdef const uint64_t *g = _gapv(self.pool, &self.s)
        return [(g[2 * t], g[2 * t + 1]) for t in range(self.s.n_gaps)]

    @property
    def gap_bytes(self):
        return self.s.gap_bytes

    @property
    def conflicts(self):
        return self.s.conflicts

    @property
    def conflict_offset(self):
        """First differing offset of the last conflicting segment, or None."""
        return self.s.conflict_off if self.s.conflicts else None

    @property
    def dropped(self):
        return self.s.dropped

    @property
    def chunks(self):
        return self.s.nchunks

    @property
    def out_of_order(self):
        """The intervals held beyond the frontier, as [start, end) offsets."""
        if self.s.n_ooo == 0:
            return []
        cdef const uint64_t *iv = _ivs(self.pool, &self.s)
        return [(iv[2 * t], iv[2 * t + 1]) for t in range(self.s.n_ooo)]

    @property
    def seq0(self):
        return self.s.seq0

    @property
    def policy(self):
        return "last" if self.s.policy == OVERLAP_LAST else "first"

    @property
    def closed(self):
        return self._closed

    def __repr__(self):
        return (f"Stream(base={self.s.base}, frontier={self.s.frontier}, "
                f"out_of_order={self.s.n_ooo}, gaps={self.s.gaps}, "
                f"conflicts={self.s.conflicts}, dropped={self.s.dropped})")


def bench_add(uint64_t nbytes=256 * _MIB, uint32_t segment=1448, double reorder=0.0,
              uint64_t seed=1, uint32_t chunk_size=16384):
    """Feeds ``nbytes`` of ``segment``-byte segments through stream_add(), releasing
    up to the frontier after each, in a nogil loop; ``reorder`` is the fraction of
    segments that arrive after their successor.  Returns seconds and MB/s, and the
    baseline: the same segments memcpy'd in order into one chunk-sized buffer."""
    if segment == 0 or nbytes < segment:
        raise ValueError("segment must be positive and at most nbytes")
    if not 0.0 <= reorder <= 1.0:
        raise ValueError(f"reorder must be between 0 and 1, got {reorder}")
    cdef uint64_t nseg = nbytes // segment
    cdef StreamPool pool = StreamPool(total_bytes=4 * _MIB, chunk_size=chunk_size)
    cdef uint64_t src_len = _MIB
    cdef uint8_t *src = <uint8_t *>PyMem_Malloc(src_len + segment)
    cdef uint32_t *order = <uint32_t *>PyMem_Malloc(nseg * sizeof(uint32_t))
    cdef mbx_stream s
    cdef uint64_t i, r = seed, k, flags_or = 0
    cdef uint32_t seq0 = 0xFFFF0000         # wraps early on
    cdef uint64_t threshold = <uint64_t>(reorder * 4294967296.0)
    if src == NULL or order == NULL:
        PyMem_Free(src)
        PyMem_Free(order)
        raise MemoryError("cannot allocate the benchmark buffers")
    try:
        for i in range(src_len + segment):
            r = r * 6364136223846793005ULL + 1442695040888963407ULL
            src[i] = <uint8_t>(r >> 56)
        i = 0
        while i < nseg:
            r = r * 6364136223846793005ULL + 1442695040888963407ULL
            if i + 1 < nseg and (r >> 32) < threshold:
                order[i] = <uint32_t>(i + 1)
                order[i + 1] = <uint32_t>i
                i += 2
            else:
                order[i] = <uint32_t>i
                i += 1
        stream_init(pool, &s, seq0, OVERLAP_FIRST)
        t0 = time.perf_counter()
        with nogil:
            for i in range(nseg):
                k = order[i]
                flags_or |= <uint64_t>stream_add(
                    pool, &s, seq0 + <uint32_t>(k * segment),
                    src + (k * segment) % src_len, segment)
                stream_release(pool, &s, s.frontier)
        t1 = time.perf_counter()
        ok = s.frontier == nseg * segment and not (flags_or & STREAM_MEMCAP)
        stream_free(pool, &s)
        # Baseline: the copy alone, into a buffer that stays in cache as the pool's
        # recycled chunks do.
        dst = <uint8_t *>PyMem_Malloc(chunk_size + segment)
        if dst == NULL:
            raise MemoryError("cannot allocate the benchmark buffers")
        b0 = time.perf_counter()
        with nogil:
            for i in range(nseg):
                memcpy(dst + (i * segment) % chunk_size, src + (i * segment) % src_len,
                       segment)
        b1 = time.perf_counter()
        PyMem_Free(dst)
    finally:
        PyMem_Free(src)
        PyMem_Free(order)
    secs = t1 - t0
    base = b1 - b0
    total = nseg * segment
    return {"seconds": secs, "bytes": total, "segments": nseg,
            "mb_per_s": total / secs / 1e6 if secs > 0 else float("inf"),
            "memcpy_mb_per_s": total / base / 1e6 if base > 0 else float("inf"),
            "complete": ok}


def _zeroed_stream_is_inert(StreamPool pool not None):
    # For the tests: what a Monitor with calloc'd flow state would do by mistake.
    cdef mbx_stream s
    cdef const uint8_t *p
    memset(&s, 0, sizeof(s))
    cdef uint32_t used = pool.n_chunks - pool.n_free
    stream_free(pool, &s)
    ok = (stream_add(pool, &s, 0, <const uint8_t *>b"abc", 3) == 0
          and stream_skip_to(pool, &s, 100) == 0 and stream_release(pool, &s, 10) == 0
          and stream_read(pool, &s, 0, 10, &p) == STREAM_ERR_BEYOND)
    stream_free(pool, &s)
    return ok and pool.n_chunks - pool.n_free == used
