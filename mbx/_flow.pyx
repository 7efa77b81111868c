"""The flow table (Stack Memory): one record per bidirectional 5-tuple.

Everything is allocated once at construction; lookup() runs without the GIL and
never allocates.  When the table is full it evicts the least recently active flow
or refuses the packet, by policy, and counts either: it never stops tracking
silently.  Ended flows wait in a bounded ``ended`` list until the stack has
published FLOW/END for them.
"""
import ipaddress
import math
import time

from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy, memset

from mbx._packet cimport NO_FLOW, PARSE_OK, PKT_F_RSS_HASH, TH_ACK, TH_SYN, mbx_pkt
from mbx._shm cimport stack_arena, stack_calloc, stack_free

# Largest capacity accepted: keeps 2 x capacity buckets (rounded up to a power of
# two) within uint32 slot numbers, clear of NO_FLOW.
cdef extern from *:
    # A hint only: gcc and clang both provide it.
    void __builtin_prefetch(const void *addr) noexcept nogil

cdef enum:
    BURST_CHUNK = 32            # packets whose misses lookup_burst overlaps
    MAX_CAPACITY = 1 << 28
    DEFAULT_ENDED = 256 + 64    # a 256-packet burst may evict 256 flows, plus slack

CAPACITY_MAX = MAX_CAPACITY    # for callers that check options before building a table

_POLICIES = {"evict": FULL_EVICT_OLDEST, "refuse": FULL_REFUSE}
FLOW_POLICIES = tuple(_POLICIES)    # for callers that check options first
_POLICY_NAMES = {v: k for k, v in _POLICIES.items()}
_END_NAMES = {
    END_NONE: "none", END_IDLE: "idle", END_EVICTED: "evicted",
    END_SHUTDOWN: "shutdown", END_CLOSED: "closed",
}
_STATUS_NAMES = {FLOW_FREE: "free", FLOW_ACTIVE: "active", FLOW_EXPIRED: "expired"}

# p's hash: the one its port's software-RSS walk already computed for this key (the
# same function over the same canonical key, tests/test_rss.py), else computed here.
cdef inline uint8_t _opened_by_receiver(const mbx_pkt *p) noexcept nogil:
    # A TCP flow first seen at its SYN+ACK (its SYN was lost, or went by before the
    # capture started) was opened by the SYN+ACK's receiver: name that side the
    # initiator, as the TCP Monitor names it the client, so that direction 0 is
    # from the client for the flow table and every layer above it.
    return p.l4_proto == 6 and (p.tcp_flags & (TH_SYN | TH_ACK)) == (TH_SYN | TH_ACK)


cdef inline uint32_t _key_hash(const mbx_pkt *p, const mbx_flow_key *k) noexcept nogil:
    if p.flags & PKT_F_RSS_HASH:
        return p.hash
    return flow_key_hash(k)


# Hashing reads the key's first five 8-byte words and memcmp the whole key, the VLAN
# ids after those words; a layout change must be seen.
if sizeof(mbx_flow_key) != 44 or <size_t>&(<mbx_flow_key *>NULL).vlan != 40:
    raise ImportError(f"mbx_flow_key is {sizeof(mbx_flow_key)} bytes, expected 44 with "
                      "the VLAN ids at 40")


cdef class FlowTable:
    """Fixed-capacity table of bidirectional flows with idle expiry.

    ``FlowTable(capacity=65536, idle_timeout=60.0, policy="evict")``: ``policy`` says
    what a new flow does when every slot is taken: ``"evict"`` ends the least
    recently active flow (END_EVICTED) to make room, ``"refuse"`` leaves the packet
    without a flow.  ``ended_capacity`` bounds the list of ended flows awaiting
    publication; when it is full, eviction degrades to refusal.
    ``vlan_in_flow_key`` puts the outer two VLAN ids of each packet in its flow's
    key: the same 5-tuple in two VLANs is two flows.  Off, it is one (a flow that
    crosses the middlebox in one VLAN each way).
    """

    def __cinit__(self, capacity=65536, idle_timeout=60.0, policy="evict",
                  ended_capacity=DEFAULT_ENDED, bint vlan_in_flow_key=True):
        # Validate before allocating, so a bad argument leaves nothing behind.
        if not isinstance(capacity, int) or isinstance(capacity, bool):
            raise ValueError(f"capacity must be an int, not {type(capacity).__name__}")
        if not 1 <= capacity <= MAX_CAPACITY:
            raise ValueError(f"capacity must be between 1 and {MAX_CAPACITY}, got {capacity}")
        try:
            timeout = float(idle_timeout)
        except (TypeError, ValueError):
            raise ValueError(f"idle_timeout must be a number of seconds, got {idle_timeout!r}")
        # Bounded so that timestamp arithmetic in int64 ns cannot overflow.
        if not (math.isfinite(timeout) and 0.0 <= timeout <= 1e9):
            raise ValueError(f"idle_timeout must be between 0 and 1e9 seconds, got {timeout}")
        if policy not in _POLICIES:
            raise ValueError(f"policy must be 'evict' or 'refuse', got {policy!r}")
        if not isinstance(ended_capacity, int) or isinstance(ended_capacity, bool):
            raise ValueError("ended_capacity must be an int")
        if not 1 <= ended_capacity <= MAX_CAPACITY:
            raise ValueError(
                f"ended_capacity must be between 1 and {MAX_CAPACITY}, got {ended_capacity}")

        cdef uint32_t cap = capacity
        cdef uint64_t nbuckets = 1
        while nbuckets < 2 * <uint64_t>cap:
            nbuckets <<= 1
        self.capacity = cap
        self.idle_timeout_ns = <int64_t>round(timeout * 1e9)
        self.clock_step_ns = max(self.idle_timeout_ns, 1000000000)
        self.policy = _POLICIES[policy]
        self.vlan_keyed = vlan_in_flow_key
        self.ended_cap = ended_capacity
        self.bucket_mask = <uint32_t>(nbuckets - 1)

        # Stack Memory: shared with the NF processes when pipelined
        self.stack_memory = stack_arena()
        self.shared_tables = self.stack_memory is not None
        self.flows = <mbx_flow *>stack_calloc(cap, sizeof(mbx_flow))
        self.buckets = <uint32_t *>stack_calloc(nbuckets, sizeof(uint32_t))
        self.ended = <mbx_flow *>stack_calloc(self.ended_cap, sizeof(mbx_flow))
        self.ended_slot = <uint32_t *>stack_calloc(self.ended_cap, sizeof(uint32_t))
        self.ended_ns = <int64_t *>stack_calloc(self.ended_cap, sizeof(int64_t))
        if (self.flows == NULL or self.buckets == NULL or self.ended == NULL
                or self.ended_slot == NULL or self.ended_ns == NULL):
            raise MemoryError(f"cannot allocate a flow table of {cap} flows")
        self.mem_bytes = (cap * sizeof(mbx_flow) + nbuckets * sizeof(uint32_t)
                          + self.ended_cap * (sizeof(mbx_flow) + sizeof(uint32_t)
                                              + sizeof(int64_t)))
        memset(self.buckets, 0xFF, nbuckets * sizeof(uint32_t))

        # Freed slots are chained through hnext (free_head).  Slots never used are
        # handed out in order (next_unused) rather than chained into the free list
        # here: the table's pages are touched only as flows arrive, so a large
        # table costs nothing until it fills.
        self.next_unused = 0
        self.free_head = NO_FLOW
        self.lru_head = NO_FLOW
        self.lru_tail = NO_FLOW
        self.active = 0
        self.n_ended = 0

    def __dealloc__(self):
        stack_free(self.shared_tables, self.flows)
        stack_free(self.shared_tables, self.buckets)
        stack_free(self.shared_tables, self.ended)
        stack_free(self.shared_tables, self.ended_slot)
        stack_free(self.shared_tables, self.ended_ns)

    # ------------------------------------------------------------------ C API

    cdef void _lru_unlink(self, uint32_t slot) noexcept nogil:
        cdef mbx_flow *f = &self.flows[slot]
        if f.lru_prev != NO_FLOW:
            self.flows[f.lru_prev].lru_next = f.lru_next
        else:
            self.lru_head = f.lru_next
        if f.lru_next != NO_FLOW:
            self.flows[f.lru_next].lru_prev = f.lru_prev
        else:
            self.lru_tail = f.lru_prev

    cdef void _lru_append(self, uint32_t slot) noexcept nogil:
        cdef mbx_flow *f = &self.flows[slot]
        f.lru_prev = self.lru_tail
        f.lru_next = NO_FLOW
        if self.lru_tail != NO_FLOW:
            self.flows[self.lru_tail].lru_next = slot
        else:
            self.lru_head = slot
        self.lru_tail = slot

    cdef void _finish(self, uint32_t slot, uint8_t reason) noexcept nogil:
        # Caller checked that slot is active and that ended has room.
        cdef mbx_flow *f = &self.flows[slot]
        cdef mbx_flow *e = &self.ended[self.n_ended]
        memcpy(e, f, sizeof(mbx_flow))
        e.status = FLOW_EXPIRED
        e.end_reason = reason
        e.hnext = NO_FLOW
        e.lru_prev = NO_FLOW
        e.lru_next = NO_FLOW
        self.ended_slot[self.n_ended] = slot
        self.ended_ns[self.n_ended] = self.clock_ns
        self.n_ended += 1

        # Unlink from the bucket chain (singly linked: chains are short).
        cdef uint32_t *link = &self.buckets[f.hash & self.bucket_mask]
        while link[0] != slot:
            link = &self.flows[link[0]].hnext
        link[0] = f.hnext
        self._lru_unlink(slot)

        # gen stays: (slot, gen) still names the ended flow until the slot is reused.
        f.status = FLOW_FREE
        f.end_reason = reason
        f.hnext = self.free_head
        self.free_head = slot
        self.active -= 1
        if reason == END_IDLE:
            self.expired += 1
        elif reason == END_EVICTED:
            self.evicted += 1
        elif reason == END_SHUTDOWN:
            self.shut += 1
        else:
            self.closed += 1

    cdef uint32_t lookup(self, mbx_pkt *p) noexcept nogil:
        cdef mbx_flow_key key
        if not flow_trackable(p):
            return self._untracked(p)
        cdef uint8_t side = flow_key_of(p, &key, self.vlan_keyed)
        return self._lookup_keyed(p, &key, side, _key_hash(p, &key))

    cdef uint32_t _untracked(self, mbx_pkt *p) noexcept nogil:
        self.created_last = False
        self.last_before = p.ts_ns
        p.hash = 0
        p.flow = NO_FLOW
        p.flow_gen = 0
        p.dir = 0
        return NO_FLOW

    cdef int lookup_burst(self, mbx_pkt **pkts, int n, uint8_t *created,
                          int64_t *before) noexcept nogil:
        # Three prefetch passes over a chunk before the real lookups, so the chunk's
        # cache misses (bucket, flow record, LRU neighbours) overlap instead of
        # being paid one after another.  The lookups themselves run in packet order,
        # so the result is exactly that of n calls to lookup().
        cdef mbx_flow_key keys[BURST_CHUNK]
        cdef uint32_t hs[BURST_CHUNK]
        cdef uint8_t sides[BURST_CHUNK]
        cdef int base, i, m
        cdef uint32_t slot
        cdef mbx_flow *f
        cdef mbx_pkt *p
        self.guard = pkts
        base = 0
        while base < n:
            m = n - base if n - base < BURST_CHUNK else BURST_CHUNK
            for i in range(m):
                p = pkts[base + i]
                if flow_trackable(p):
                    sides[i] = flow_key_of(p, &keys[i], self.vlan_keyed)
                    hs[i] = _key_hash(p, &keys[i])
                    __builtin_prefetch(&self.buckets[hs[i] & self.bucket_mask])
                else:
                    sides[i] = 0xFF
            for i in range(m):
                if sides[i] != 0xFF:
                    slot = self.buckets[hs[i] & self.bucket_mask]
                    if slot != NO_FLOW:
                        f = &self.flows[slot]
                        __builtin_prefetch(f)
                        __builtin_prefetch(<char *>f + sizeof(mbx_flow) - 1)
            for i in range(m):
                if sides[i] != 0xFF:
                    slot = self.buckets[hs[i] & self.bucket_mask]
                    if slot != NO_FLOW:
                        f = &self.flows[slot]
                        if f.lru_prev != NO_FLOW:
                            __builtin_prefetch(&self.flows[f.lru_prev].lru_next)
                        if f.lru_next != NO_FLOW:
                            __builtin_prefetch(&self.flows[f.lru_next].lru_prev)
            for i in range(m):
                p = pkts[base + i]
                if sides[i] == 0xFF:
                    self._untracked(p)
                else:
                    self.guard_n = base + i
                    self._lookup_keyed(p, &keys[i], sides[i], hs[i])
                    if self.split:
                        self.split = False
                        self.guard_n = 0
                        return base + i
                if created != NULL:
                    created[base + i] = self.created_last
                if before != NULL:
                    before[base + i] = self.last_before
            base += m
        self.guard_n = 0
        return n

    cdef bint _touched_in_burst(self, uint32_t slot, uint32_t gen) noexcept nogil:
        # Whether a packet looked up earlier in this lookup_burst call is slot's
        # (rare: asked only of a flow found idle)
        cdef int j
        for j in range(self.guard_n):
            if self.guard[j].flow == slot and self.guard[j].flow_gen == gen:
                return True
        return False

    cdef uint32_t _lookup_keyed(self, mbx_pkt *p, const mbx_flow_key *k, uint8_t side,
                                uint32_t h) noexcept nogil:
        cdef mbx_flow *f
        cdef uint32_t slot
        cdef uint32_t b = h & self.bucket_mask
        cdef uint8_t d
        self.created_last = False
        self.last_before = p.ts_ns      # (a refused packet has no flow)
        self.lookups += 1
        self.clock_ns = p.ts_ns         # a flow evicted for this one ends now
        p.hash = h
        p.flow = NO_FLOW
        p.flow_gen = 0
        p.dir = 0

        slot = self.buckets[b]
        while slot != NO_FLOW:
            f = &self.flows[slot]
            if f.hash == h and memcmp(&f.key, k, sizeof(mbx_flow_key)) == 0:
                break
            slot = f.hnext

        if slot != NO_FLOW and p.ts_ns > f.last_ns and self.n_ended < self.ended_cap and \
                <uint64_t>p.ts_ns - <uint64_t>f.last_ns > <uint64_t>self.idle_timeout_ns:
            # Idle past the timeout before this packet came (expiry runs after each
            # burst, by its time): the old flow ends, as it would have had the
            # burst ended just before, and this packet starts a new one; first,
            # though, the caller handles the packets of this burst the old flow had.
            if self._touched_in_burst(slot, f.gen):
                self.split = True
                self.lookups -= 1
                return NO_FLOW
            self._finish(slot, END_IDLE)
            slot = NO_FLOW

        if slot == NO_FLOW:
            if self.free_head == NO_FLOW and self.next_unused < self.capacity:
                slot = self.next_unused
                self.next_unused += 1
                f = &self.flows[slot]
            else:
                if self.free_head == NO_FLOW:
                    if (self.policy != FULL_EVICT_OLDEST or self.n_ended >= self.ended_cap
                            or self.lru_head == NO_FLOW):
                        self.refused += 1
                        return NO_FLOW
                    self._finish(self.lru_head, END_EVICTED)
                slot = self.free_head
                f = &self.flows[slot]
                self.free_head = f.hnext
            memcpy(&f.key, k, sizeof(mbx_flow_key))
            f.hash = h
            f.gen += 1
            f.hnext = self.buckets[b]
            self.buckets[b] = slot
            f.want = 0xFFFFFFFF
            f.status = FLOW_ACTIVE
            f.init_side = side ^ _opened_by_receiver(p)
            f.end_reason = END_NONE
            f.pkts[0] = 0
            f.pkts[1] = 0
            f.bytes[0] = 0
            f.bytes[1] = 0
            f.first_ns = p.ts_ns
            f.last_ns = p.ts_ns
            self._lru_append(slot)
            self.active += 1
            self.created += 1
            self.created_last = True
        elif slot != self.lru_tail:
            self._lru_unlink(slot)
            self._lru_append(slot)

        d = side ^ f.init_side
        p.flow = slot
        p.flow_gen = f.gen
        p.dir = d
        if not self.defer_count:
            flow_count(f, p)
        self.last_before = f.last_ns
        if p.ts_ns > f.last_ns:
            f.last_ns = p.ts_ns
        return slot

    cdef int expire(self, int64_t now_ns) noexcept nogil:
        # Walks from the LRU head and stops at the first flow still live: O(ended),
        # not O(table).  LRU order is arrival order, so a flow whose timestamps ran
        # backwards may wait one extra call behind a younger head.
        cdef int n = 0
        cdef uint32_t slot
        cdef mbx_flow *f
        self.clock_ns = now_ns
        while self.lru_head != NO_FLOW and self.n_ended < self.ended_cap:
            slot = self.lru_head
            f = &self.flows[slot]
            if (f.last_ns > now_ns and <uint64_t>f.last_ns - <uint64_t>now_ns
                    > <uint64_t>self.clock_step_ns):
                # seen at a time the clock has since stepped back from (a packet
                # stamped in the future): taken as seen now, so that it goes idle
                # a timeout from now instead of holding every flow behind it
                f.last_ns = now_ns
                self._lru_unlink(slot)
                self._lru_append(slot)
                continue
            # Unsigned difference: exact whatever the two timestamps are.
            if not (now_ns > f.last_ns and <uint64_t>now_ns - <uint64_t>f.last_ns
                    > <uint64_t>self.idle_timeout_ns):
                break
            self._finish(slot, END_IDLE)
            n += 1
        return n

    cdef int end_all(self) noexcept nogil:
        cdef int n = 0
        while self.lru_head != NO_FLOW and self.n_ended < self.ended_cap:
            self._finish(self.lru_head, END_SHUTDOWN)
            n += 1
        return n

    cdef int end_flow(self, uint32_t slot, uint8_t reason) noexcept nogil:
        if (slot >= self.capacity or self.flows[slot].status != FLOW_ACTIVE
                or self.n_ended >= self.ended_cap):
            return 0
        self._finish(slot, reason)
        return 1

    cdef void clear_ended(self) noexcept nogil:
        self.n_ended = 0

    # ------------------------------------------------- Python API (tests, tools)

    def lookup_tuple(self, str src, str dst, int sport, int dport, int proto,
                     int64_t ts_ns, uint32_t wirelen=60, uint8_t status=PARSE_OK,
                     uint8_t tcp_flags=0, vlan=()):
        """Look up one packet given as a 5-tuple; ``(slot, gen, dir, created)``.

        ``slot`` is -1 when the table refused the flow, or when ``status`` (the
        ParseStatus the parser would have left) says the addresses were never read.
        ``vlan``: the ids of its VLAN tags, outermost first, as the parser records
        them (the outer two).
        """
        cdef mbx_pkt pkt
        _fill_pkt(&pkt, src, dst, sport, dport, proto, ts_ns, wirelen, status)
        pkt.tcp_flags = tcp_flags
        _fill_vlan(&pkt, vlan)
        cdef uint32_t slot = self.lookup(&pkt)
        if slot == NO_FLOW:
            return (-1, 0, 0, False)
        return (<int>slot, pkt.flow_gen, pkt.dir, bool(self.created_last))

    def lookup_burst_py(self, packets):
        """lookup_tuple() over a sequence of ``(src, dst, sport, dport, proto, ts_ns[,
        wirelen])`` tuples, through lookup_burst(); a list of its results."""
        cdef Py_ssize_t n = len(packets), i
        if n == 0:
            return []
        cdef mbx_pkt *pkts = <mbx_pkt *>PyMem_Calloc(n, sizeof(mbx_pkt))
        cdef mbx_pkt **ptrs = <mbx_pkt **>PyMem_Malloc(n * sizeof(mbx_pkt *))
        cdef uint8_t *created = <uint8_t *>PyMem_Malloc(n)
        try:
            if pkts == NULL or ptrs == NULL or created == NULL:
                raise MemoryError("cannot allocate a burst")
            for i in range(n):
                a = tuple(packets[i])
                _fill_pkt(&pkts[i], a[0], a[1], a[2], a[3], a[4], a[5],
                          a[6] if len(a) > 6 else 60)
                ptrs[i] = &pkts[i]
            i = 0
            while i < n:
                i += self.lookup_burst(ptrs + i, <int>(n - i), created + i, NULL)
            return [(-1, 0, 0, False) if pkts[i].flow == NO_FLOW else
                    (<int>pkts[i].flow, pkts[i].flow_gen, pkts[i].dir, bool(created[i]))
                    for i in range(n)]
        finally:
            PyMem_Free(pkts)
            PyMem_Free(ptrs)
            PyMem_Free(created)

    def expire_py(self, int64_t now_ns):
        """End flows idle for longer than the timeout at ``now_ns``; how many ended."""
        return self.expire(now_ns)

    def end_all_py(self):
        """End every active flow while the ended list has room; how many ended."""
        return self.end_all()

    def end_flow_py(self, uint32_t slot, uint8_t reason=END_CLOSED):
        """End one flow now; True if it was active and the ended list had room."""
        return self.end_flow(slot, reason) == 1

    def take_ended(self):
        """The records of flows ended since the last call, oldest first; clears them."""
        cdef uint32_t i
        out = [_flow_dict(&self.ended[i], self.ended_slot[i]) for i in range(self.n_ended)]
        self.clear_ended()
        return out

    def flow(self, uint32_t slot):
        """The active flow in ``slot`` as a dict, or None."""
        if slot >= self.capacity or self.flows[slot].status != FLOW_ACTIVE:
            return None
        return _flow_dict(&self.flows[slot], slot)

    def __len__(self):
        return self.active

    @property
    def counters(self):
        return {
            "lookups": self.lookups, "created": self.created, "expired": self.expired,
            "evicted": self.evicted, "closed": self.closed, "shutdown": self.shut,
            "refused": self.refused, "active": self.active,
        }

    @property
    def policy_name(self):
        return _POLICY_NAMES[self.policy]

    @property
    def idle_timeout(self):
        return self.idle_timeout_ns / 1e9

    @property
    def ended_capacity(self):
        return self.ended_cap

    @property
    def n_buckets(self):
        return <uint64_t>self.bucket_mask + 1

    @property
    def bytes_per_flow(self):
        """Bytes of table memory per flow slot (record + buckets; the ended list not
        counted, it does not grow with capacity)."""
        cdef double buckets = (<double>self.bucket_mask + 1) * sizeof(uint32_t)
        return sizeof(mbx_flow) + buckets / self.capacity

    @property
    def memory_bytes(self):
        """Everything allocated at construction."""
        return self.mem_bytes

    def chain_lengths(self):
        """Histogram of bucket chain lengths: ``hist[k]`` buckets hold k flows."""
        cdef uint64_t i
        cdef uint32_t slot, k
        hist = [0]
        for i in range(<uint64_t>self.bucket_mask + 1):
            k = 0
            slot = self.buckets[i]
            while slot != NO_FLOW:
                k += 1
                slot = self.flows[slot].hnext
            while len(hist) <= k:
                hist.append(0)
            hist[k] += 1
        return hist


cdef object _addr_str(const uint8_t *a, uint8_t ip_ver):
    cdef bytes raw = (<const char *>a)[:4 if ip_ver == 4 else 16]
    return str(ipaddress.ip_address(raw))


cdef list vlan_ids(const uint16_t *vlan):
    # A key's VLAN ids as shown: outer first, a trailing 0 (no such tag) left out:
    # [] untagged (or not keyed by VLAN), [10] one tag, [100, 10] QinQ
    if vlan[1]:
        return [vlan[0], vlan[1]]
    return [vlan[0]] if vlan[0] else []


cdef dict _flow_dict(const mbx_flow *f, uint32_t slot):
    # Presented in initiator -> responder orientation, as NFs think of a flow.
    cdef const uint8_t *ia = &f.key.a[0]
    cdef const uint8_t *ra = &f.key.b[0]
    cdef uint16_t ip = f.key.a_port
    cdef uint16_t rp = f.key.b_port
    if f.init_side:
        ia, ra = ra, ia
        ip, rp = rp, ip
    return {
        "slot": slot, "gen": f.gen, "hash": f.hash,
        "src": _addr_str(ia, f.key.ip_ver), "dst": _addr_str(ra, f.key.ip_ver),
        "sport": ip, "dport": rp, "proto": f.key.proto, "ip_ver": f.key.ip_ver,
        "vlan": vlan_ids(f.key.vlan),
        "pkts": (f.pkts[0], f.pkts[1]), "bytes": (f.bytes[0], f.bytes[1]),
        "first_ns": f.first_ns, "last_ns": f.last_ns,
        "status": _STATUS_NAMES.get(f.status, str(f.status)),
        "end_reason": _END_NAMES.get(f.end_reason, str(f.end_reason)),
    }


cdef void _fill_pkt(mbx_pkt *pkt, str src, str dst, int sport, int dport, int proto,
                    int64_t ts_ns=0, uint32_t wirelen=60, uint8_t status=PARSE_OK) except *:
    s = ipaddress.ip_address(src)
    d = ipaddress.ip_address(dst)
    if s.version != d.version:
        raise ValueError(f"src and dst are of different IP versions: {src}, {dst}")
    if not (0 <= sport <= 0xFFFF and 0 <= dport <= 0xFFFF):
        raise ValueError(f"ports must be 0..65535, got {sport}, {dport}")
    if not 0 <= proto <= 0xFF:
        raise ValueError(f"proto must be 0..255, got {proto}")
    cdef bytes sb = s.packed
    cdef bytes db = d.packed
    memset(pkt, 0, sizeof(mbx_pkt))
    memcpy(pkt.src.b, <const char *>sb, len(sb))
    memcpy(pkt.dst.b, <const char *>db, len(db))
    pkt.ip_ver = s.version
    pkt.l4_proto = proto
    pkt.sport = sport
    pkt.dport = dport
    pkt.ts_ns = ts_ns
    pkt.wirelen = wirelen
    pkt.status = status
    # As if the parser reached the transport header behind an option-less IP header
    # (no bytes are captured, so a TCP/UDP header is still cut before its ports).
    pkt.l3_off = 14
    pkt.l4_off = 14 + (20 if s.version == 4 else 40)
    pkt.flow = NO_FLOW


cdef int _fill_vlan(mbx_pkt *pkt, vlan) except -1:
    ids = [int(v) for v in vlan]
    if not all(0 <= v <= 0xFFF for v in ids):
        raise ValueError(f"VLAN ids must be 0..4095, got {vlan!r}")
    pkt.nvlan = min(len(ids), 0xFF)
    for i, v in enumerate(ids[:2]):
        pkt.vlan[i] = v
    return 0


def flow_hash(str src, str dst, int sport, int dport, int proto):
    """The symmetric flow hash of a 5-tuple, as lookup() computes it (tests, RSS); the
    same in every VLAN."""
    cdef mbx_pkt pkt
    cdef mbx_flow_key key
    _fill_pkt(&pkt, src, dst, sport, dport, proto)
    flow_key_of(&pkt, &key, False)
    return flow_key_hash(&key)


cdef inline uint64_t _splitmix(uint64_t *state) noexcept nogil:
    state[0] += 0x9e3779b97f4a7c15ULL
    cdef uint64_t z = state[0]
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL
    return z ^ (z >> 31)


ctypedef struct _bench_tuple:
    uint8_t src[4]
    uint8_t dst[4]
    uint16_t sport
    uint16_t dport


def bench_lookups(uint32_t n_flows=100_000, uint64_t n_packets=1_000_000,
                  uint64_t seed=1, int burst=0):
    """Mean ns per lookup of ``n_packets`` packets spread at random over ``n_flows``
    established IPv4 TCP flows (both directions), in a nogil loop.

    Flows are created first, outside the timed loop, so this measures the steady
    state: hash, bucket walk, key compare, LRU move and counters.  Each packet's
    tuple is written into a descriptor of a 256-entry ring first, as a parser would
    fill a burst, so the figure is not dominated by cache misses on descriptors.
    ``burst`` > 0 looks packets up ``burst`` at a time through lookup_burst().
    """
    if not 0 <= burst <= 256:
        raise ValueError(f"burst must be between 0 and 256, got {burst}")
    if n_flows == 0 or n_packets == 0:
        raise ValueError("n_flows and n_packets must be positive")
    cdef FlowTable table = FlowTable(capacity=n_flows, idle_timeout=3600.0)
    cdef _bench_tuple *tuples = <_bench_tuple *>PyMem_Calloc(
        2 * n_flows, sizeof(_bench_tuple))
    cdef uint32_t *order = <uint32_t *>PyMem_Malloc(n_packets * sizeof(uint32_t))
    cdef mbx_pkt ring[256]
    cdef mbx_pkt *ptrs[256]
    cdef uint64_t k
    cdef int done
    cdef uint64_t rng = seed
    cdef uint64_t i, r
    cdef _bench_tuple *t
    cdef _bench_tuple *u
    cdef int64_t t0, t1
    if tuples == NULL or order == NULL:
        PyMem_Free(tuples)
        PyMem_Free(order)
        raise MemoryError("cannot allocate the benchmark packets")
    memset(ring, 0, sizeof(ring))
    for i in range(256):
        ring[i].ip_ver = 4
        ring[i].l4_proto = 6
        ring[i].wirelen = 100
        ptrs[i] = &ring[i]
    try:
        for i in range(n_flows):
            r = _splitmix(&rng)
            t = &tuples[2 * i]
            u = &tuples[2 * i + 1]
            t.src[0] = 10
            memcpy(&t.src[1], &r, 3)
            t.dst[0] = 192
            t.dst[1] = 168
            memcpy(&t.dst[2], (<uint8_t *>&r) + 3, 2)
            t.sport = <uint16_t>(r >> 40)
            t.dport = 443
            u.src = t.dst
            u.dst = t.src
            u.sport = t.dport
            u.dport = t.sport
        for i in range(n_packets):
            order[i] = <uint32_t>(_splitmix(&rng) % (2 * <uint64_t>n_flows))
        with nogil:
            for i in range(2 * <uint64_t>n_flows):
                _bench_one(&ring[0], &tuples[i], 0)
                table.lookup(&ring[0])
        t0 = time.perf_counter_ns()
        with nogil:
            if burst == 0:
                for i in range(n_packets):
                    _bench_one(&ring[i & 255], &tuples[order[i]], <int64_t>i)
                    table.lookup(&ring[i & 255])
            else:
                i = 0
                while i < n_packets:
                    k = 0
                    while k < <uint64_t>burst and i < n_packets:
                        _bench_one(&ring[k], &tuples[order[i]], <int64_t>i)
                        k += 1
                        i += 1
                    done = 0
                    while done < <int>k:
                        done += table.lookup_burst(ptrs + done, <int>k - done, NULL, NULL)
        t1 = time.perf_counter_ns()
    finally:
        PyMem_Free(tuples)
        PyMem_Free(order)
    return (t1 - t0) / <double>n_packets


cdef inline void _bench_one(mbx_pkt *p, const _bench_tuple *t, int64_t ts) noexcept nogil:
    memcpy(p.src.b, t.src, 4)
    memcpy(p.dst.b, t.dst, 4)
    p.sport = t.sport
    p.dport = t.dport
    p.ts_ns = ts
