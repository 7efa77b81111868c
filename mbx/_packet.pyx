"""Packet bursts and the Port interface shared by every I/O backend."""
cimport cython
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport uintptr_t
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t
from libc.string cimport memcpy, memset

from mbx.errors import PortError


# owner says whether pkts and arena are this Batch's to free: the cyclic GC must not
# clear it first (a Batch over shared memory in a cycle would free the mapping's
# pointers).
@cython.no_gc_clear
cdef class Batch:
    """A reusable burst: up to ``capacity`` packet descriptors over one byte arena."""

    def __cinit__(self, uint32_t capacity=64, size_t arena_size=0):
        if capacity == 0:
            raise ValueError("Batch capacity must be at least 1")
        if arena_size == 0:
            arena_size = default_arena(capacity)
        self.capacity = capacity
        self.arena_size = arena_size
        self.pkts = <mbx_pkt *>PyMem_Malloc(capacity * sizeof(mbx_pkt))
        self.arena = <uint8_t *>PyMem_Malloc(arena_size)
        if self.pkts == NULL or self.arena == NULL:
            raise MemoryError("cannot allocate a packet batch")
        self.count = 0
        self.arena_used = 0

    def __dealloc__(self):
        if self.owner is None:
            PyMem_Free(self.pkts)
            PyMem_Free(self.arena)

    @staticmethod
    def shared_size(uint32_t capacity=64, size_t arena_size=0):
        """Bytes ``Batch.over`` needs for this capacity and arena."""
        if arena_size == 0:
            arena_size = default_arena(capacity)
        return ((capacity * sizeof(mbx_pkt) + 63) & ~(<size_t>63)) + arena_size

    @staticmethod
    def over(buffer, uint32_t capacity=64, size_t arena_size=0):
        """A Batch whose descriptors and arena live in ``buffer`` (writable, at least
        ``shared_size`` bytes), e.g. shared memory several processes map: the buffer is
        kept exported while the Batch lives, never freed by it."""
        cdef uint8_t[::1] view = buffer
        if arena_size == 0:
            arena_size = default_arena(capacity)
        cdef size_t need = Batch.shared_size(capacity, arena_size)
        if capacity == 0 or <size_t>view.shape[0] < need:
            raise ValueError(f"Batch.over: needs {need} bytes, the buffer has "
                             f"{view.shape[0]}")
        cdef Batch b = Batch.__new__(Batch, 1, 16)
        PyMem_Free(b.pkts)
        PyMem_Free(b.arena)
        b.owner = view
        b.capacity = capacity
        b.arena_size = arena_size
        b.pkts = <mbx_pkt *>&view[0]
        b.arena = &view[0] + ((capacity * sizeof(mbx_pkt) + 63) & ~(<size_t>63))
        return b

    @property
    def address(self):
        """Where the descriptors live (tests: is it in shared memory?)."""
        return <uintptr_t>self.pkts

    cdef void clear(self) noexcept nogil:
        self.count = 0
        self.arena_used = 0

    cdef uint8_t *reserve(self, size_t length) noexcept nogil:
        # 16-byte alignment keeps IP headers of copied frames at a sane alignment.
        cdef size_t start = (self.arena_used + 15) & ~(<size_t>15)
        if start + length > self.arena_size:
            return NULL
        self.arena_used = start + length
        return self.arena + start

    cdef mbx_pkt *add(self, const uint8_t *frame, uint32_t caplen, uint32_t wirelen,
                      int64_t ts_ns, uint16_t port) noexcept nogil:
        if self.count >= self.capacity:
            return NULL
        if ((self.arena_used + 15) & ~(<size_t>15)) + caplen + self.rebuild_room > \
                self.arena_size:
            return NULL
        cdef uint8_t *dst = self.reserve(caplen)
        if dst == NULL:
            return NULL
        memcpy(dst, frame, caplen)
        cdef mbx_pkt *p = &self.pkts[self.count]
        memset(p, 0, sizeof(mbx_pkt))
        p.data = dst
        p.caplen = caplen
        p.wirelen = wirelen if wirelen >= caplen else caplen
        p.ts_ns = ts_ns
        p.index = self.count
        p.port = port
        p.flow = NO_FLOW
        self.count = self.count + 1     # (+= trips nonecheck without the GIL in debug builds)
        return p

    def __len__(self):
        return self.count

    def append(self, frame, int64_t ts_ns=0, uint16_t port=0, wirelen=None):
        """Copy one frame in (tests and tools); False when the batch is full."""
        cdef const uint8_t[::1] view = frame
        cdef uint32_t n = view.shape[0]
        cdef uint32_t wl = n if wirelen is None else wirelen
        cdef const uint8_t *src = &view[0] if n else <const uint8_t *>b""
        return self.add(src, n, wl, ts_ns, port) != NULL

    def reset(self):
        """Empty the batch for reuse."""
        self.clear()

    def frame(self, uint32_t i):
        """The bytes of packet ``i`` (a copy)."""
        if i >= self.count:
            raise IndexError(f"packet {i} not in a batch of {self.count}")
        return (<char *>self.pkts[i].data)[:self.pkts[i].caplen]

    def timestamp_ns(self, uint32_t i):
        if i >= self.count:
            raise IndexError(f"packet {i} not in a batch of {self.count}")
        return self.pkts[i].ts_ns

    def wirelen(self, uint32_t i):
        if i >= self.count:
            raise IndexError(f"packet {i} not in a batch of {self.count}")
        return self.pkts[i].wirelen

    def port(self, uint32_t i):
        """The port id packet ``i`` was received on (a bridge: 0 client side, 1
        server side)."""
        if i >= self.count:
            raise IndexError(f"packet {i} not in a batch of {self.count}")
        return self.pkts[i].port

    def rss_hash(self, uint32_t i):
        """The flow hash the port's software-RSS walk found for packet ``i`` (the
        flow table takes it rather than hashing again), or None."""
        if i >= self.count:
            raise IndexError(f"packet {i} not in a batch of {self.count}")
        return self.pkts[i].hash if self.pkts[i].flags & PKT_F_RSS_HASH else None


cdef class Port:
    """Base of every packet I/O backend: burst receive, burst send, close, counters."""

    def __cinit__(self, *args, **kwargs):
        self.name = ""
        self._error = None
        self.closed = False

    # A backend that only sends, or only receives, keeps these: an output given as
    # a run's input (or an input as its output) is an error, not an empty input (or
    # an output that took nothing, silently).
    cdef int rx_burst(self, Batch batch) noexcept nogil:
        self.set_error(b"it is an output: it cannot be read")
        return PORT_ERROR

    cdef int tx_burst(self, mbx_pkt **pkts, int n) noexcept nogil:
        self.set_error(b"it is an input: it cannot send")
        return PORT_ERROR

    cdef void set_error(self, const char *message) noexcept with gil:
        if self._error is None:
            self._error = PortError(f"{self.name}: {message.decode('utf-8', 'replace')}")

    cdef void adopt_error(self, Port part) noexcept with gil:
        # A bridge's side words its error with its own name (afpacket:ms), which the
        # user never gave: say it is the bridge's, and which side.
        cdef str side
        err = part._error
        part._error = None
        if self._error is not None or err is None:
            return
        side = ("client" if part is getattr(self, "client", None) else
                "server" if part is getattr(self, "server", None) else "")
        text = str(err)
        if side and type(err) is PortError and text.startswith(f"{part.name}: "):
            err = PortError(f"{self.name}, {side} side: {text[len(part.name) + 2:]}")
        self._error = err

    cpdef check(self):
        """Raise the error a burst call recorded, if any."""
        if self._error is not None:
            err, self._error = self._error, None
            raise err

    cpdef bint rss_share(self, uint32_t k, uint32_t n) except -1:
        """Software RSS at the source: from now on, pass over the frames that a short
        header walk gives to another of ``n`` stack processes than ``k``, without
        copying them into a batch (counted in ``rss_skipped``).  Frames the walk
        cannot place are still delivered; the stack decides those after parsing.
        True when this backend filters (a capture replayed by every process), False
        when it delivers everything as before."""
        if n == 0 or k >= n:
            raise ValueError(f"{self.name}: rss share must be k of n with 0 <= k < n, "
                             f"not {k} of {n}")
        return False

    def receive(self, Batch batch not None):
        """Fill ``batch`` (appending); the count added, or -1 at the end of input."""
        cdef int n
        with nogil:
            n = self.rx_burst(batch)
        if n == PORT_ERROR:
            self.check()
        return n

    def send(self, Batch batch not None):
        """Send every packet of ``batch`` whose verdict is pass; the count sent."""
        cdef mbx_pkt *ptrs[256]
        cdef uint32_t i = 0
        cdef int k, n, sent = 0
        while i < batch.count:
            k = 0
            while i < batch.count and k < 256:
                if batch.pkts[i].verdict == VERDICT_PASS:
                    ptrs[k] = &batch.pkts[i]
                    k += 1
                i += 1
            if k:
                with nogil:
                    n = self.tx_burst(ptrs, k)
                if n == PORT_ERROR:
                    self.check()
                sent += n
        return sent

    def close(self):
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def counters(self):
        return {
            "rx_pkts": self.rx_pkts, "rx_bytes": self.rx_bytes,
            "tx_pkts": self.tx_pkts, "tx_bytes": self.tx_bytes,
            "rx_dropped": self.rx_dropped, "tx_dropped": self.tx_dropped,
            "rss_skipped": self.rss_skipped,
        }


def bridge_counters(Port bridge not None, Port client not None, Port server not None,
                    uint64_t misrouted):
    """A bridge's counters, with ``misrouted`` and each side's counters under
    ``client`` and ``server`` (AF_PACKET and DPDK bridges alike)."""
    c = Port.counters.__get__(bridge)
    c.update(misrouted=misrouted, client=client.counters, server=server.counters)
    return c


cdef int bridge_tx_burst(Port bridge, Port client, Port server, mbx_pkt **pkts, int n,
                         uint64_t *misrouted) noexcept nogil:
    cdef mbx_pkt *to_server[256]
    cdef mbx_pkt *to_client[256]
    cdef int i = 0, ns, nc, r = 0, sent = 0
    while i < n:
        ns = nc = 0
        while i < n and ns < 256 and nc < 256:
            if pkts[i].port == 0:
                to_server[ns] = pkts[i]
                ns += 1
            elif pkts[i].port == 1:
                to_client[nc] = pkts[i]
                nc += 1
            else:
                misrouted[0] += 1
            i += 1
        if ns:
            r = server.tx_burst(to_server, ns)
            if r == PORT_ERROR:
                bridge.adopt_error(server)
                break
            sent += r
        if nc:
            r = client.tx_burst(to_client, nc)
            if r == PORT_ERROR:
                bridge.adopt_error(client)
                break
            sent += r
    # After a failed send too: a caller tells what went out from these counters (the
    # stack counts only the rest as dropped_on_error), and the other side, or the
    # failed side before its error, may have sent part of the burst.
    bridge.tx_pkts = client.tx_pkts + server.tx_pkts
    bridge.tx_bytes = client.tx_bytes + server.tx_bytes
    bridge.tx_dropped = client.tx_dropped + server.tx_dropped + misrouted[0]
    return PORT_ERROR if r == PORT_ERROR else sent
