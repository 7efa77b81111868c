"""The pipelined deployment: the μStack in this process, each NF in a child process.

Everything the processes share lives in one anonymous shared mapping made before
the fork (so it has the same address everywhere, and nothing is left in /dev/shm):
the control block (a doorbell, liveness and counters per process), Event Memory (the
message pool), the burst's descriptors and arena, and one SPSC ring of message
indices per hop of the chain: stack -> NF 0 -> NF 1 -> ... -> NF n-1 -> stack, plus
one merge ring per member of a parallel group (member -> stack, see below).

Every message the stack builds travels the chain in order, as far as the last NF
that takes it (taken_from: by its sub(), unless a filter refused the message; every
NF after one that called mb_up_sub): where no NF after takes it, the NF done with it
ends it there instead of pushing it on (retired), and an NF's publication no later NF
takes is not pushed at all.  An NF takes from
its ring, sorts what it took into the same two local queues the inline dispatcher
uses (stack events, NF publications), and drains them with the inline code, up to
the last burst position it knows complete; whatever it is done with (handled,
skipped, hidden by an earlier drop) it forwards, and its publications follow the
event that caused them.  So NF k+1 sees a packet's events after NF k, in the order
the inline waves give, and its verdicts and rewrites are in the shared packet.

A parallel group (two or more adjacent NFs with one ``group``; read-only, so any
order of them gives the same packets) is one hop with a ring per member: the hop
before it pushes every message (and epoch end) into every member's ring, all of
them or none, so the members see the same messages.  Each member sends what it is
done with, its publications and its epoch ends back on its own merge ring to the
stack; a member done with a message sent to the group sets its bit in ``gdone``
(shared, per message), and only the group's first member (the lead) names where its
copy is in the message header.  The stack merges: it keeps the lead's copies and
every member's publications per epoch region, and once every member has ended an
epoch, sends the epoch on to the next hop (the next stage's rings, or its own
completions) ordered as the chain orders it: by burst position, the messages from
before the group first, then each member's publications in chain order.  So later
stages see exactly what they would behind the members one after the other.  The
members of a group share a chain stage: a drop hides the packet from later stages
only ("any drop wins"), or with merge "all" counts as a vote (mbx_pkt.votes) and
the last member's vote drops it, or with a merge function is only a vote, which the
stack hands to the function as it sends the epoch on (merge_decide).

The stack works in epochs (a dispatch round): it pushes the round's messages and an
end marker; the epoch is complete when the marker comes back on the completion ring
(markers never overtake messages, and every hop forwards them in order, so epochs
complete in order).  Up to K = ``inflight`` epochs are in flight: Event Memory is cut
into K regions (the stack's share and each NF's share alike), epoch e using region
(e - 1) mod K, and the stack starts building epoch e + K only once epoch e is
complete.  Bursts run ahead the same way: there are K burst slots (descriptors and
arena) in the mapping, and the stack reads, parses and publishes burst i + 1 (and up
to i + K - 1) while the NFs still work on burst i; it sends burst i only once the
last epoch of it is complete (``burst_done``), in order, and reads into its slot again
only after that.  An epoch's packets are in one slot (``epoch_slot``, written before
its first message is pushed); an NF looks it up at its first message of the epoch.
K = 1 is one burst in flight: the stack waits for each epoch before the next.

What the stack mutates while NFs still handle earlier bursts, and why that is safe
(the rule for anything added to this deployment): an NF reads only (a) its messages,
whose headers, bodies and snapshots were filled when they were published and are not
touched again until their region is reused, K epochs later, after they completed;
(b) the packets of its epoch's burst slot, which the stack does not touch again until
that burst was sent; (c) what it copied itself.  Nothing an NF reads may point into
live Stack Memory (flow records, TCP state, stream buffers): the stack moves on with
those while up to K - 1 later bursts are parsed, so anything of them an NF needs
travels in the message (a snapshot), or is kept by the stack until the burst that
referenced it completes.  Conversely, what an NF asks of the stack takes effect up to
K - 1 bursts later than inline.

A dead NF is found by waitpid (its pidfd wakes the stack); the stack then drains its
ring on its behalf, recovers the messages it held (their header records the hop they
were sent to; their region tells their epoch), and applies its failure policy: "open"
forwards them as if it skipped them, "closed" drops the packets it was subscribed to.
A dead group member is pumped into its merge ring the same way; the messages it
held are those sent to the group without its bit in ``gdone`` (only the lead's are
forwarded: another member's copy only counts, and its drop under "closed").

An NF with restarts allowed (``restart_nf``) is forked again once its back-off has
passed: the stack then drains its ring only up to the next epoch end, forwards what
it recovered, and the new process consumes the ring from the epoch after, in the
region of its share of Event Memory that epoch uses, as the dead one would have.
A group member is no different: its ring is one of the fan-out's, what the stack
forwards for it goes to its merge ring (ends, the lead's copies, gdone bits) as the
member would have sent it, and the merge counts the new process's epoch ends after
those, so it rejoins at the epoch boundary.

NFs change the stack's state only by requests (the control path, after the burst in
the mapping: one ring of mbx_req per NF).  An NF's mb_up_sub and the
FLOW/TCP/TERMINATE it publishes are tagged with the epoch it is handling; the stack
applies an epoch's requests when that epoch completes (with K > 1 the stack has
already built up to K - 1 later bursts by then: a stack-side mb_up_sub lands that
much later than inline, while the NF's own tables change at once).  TERMINATE and
stream reads act on the epoch's own burst and on live stream buffers, so an
application whose NF processes publish FLOW/TCP/TERMINATE or subscribe to DATA_RDY
runs with one burst in flight (mbx.pipeline.inflight_for).  The stack's tables
(Stack Memory: flow table, TCP state, stream buffers) are in a second shared mapping
(mbx._shm), read-only in the NF processes.
"""
from cpython.exc cimport PyErr_CheckSignals
from cpython.mem cimport PyMem_Calloc, PyMem_Free
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, malloc, qsort
from libc.string cimport memcpy, memmove, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.unistd cimport getppid
from posix.wait cimport WNOHANG, waitpid

from mbx._events cimport (
    MAX_TYPES, MSG_F_SIDED, NO_PKT, NO_RING, EventBus, mbx_filter, mbx_msg, mbx_vote,
    msg_header,
)
from mbx._packet cimport NO_FLOW, PKT_F_STACK_DROP, VERDICT_DROP, Batch, mbx_pkt

import json
import os
import signal

from mbx import _events
from mbx.errors import MbxError, exc_text

cdef extern from "sys/eventfd.h" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_CLOEXEC
        EFD_NONBLOCK

cdef extern from "sys/prctl.h" nogil:
    int prctl(int option, unsigned long arg2, unsigned long arg3, unsigned long arg4,
              unsigned long arg5)
    enum:
        PR_SET_PDEATHSIG

cdef extern from "sched.h" nogil:
    int sched_yield()

cdef extern from *:
    """
    static int mbx_cmp_u64(const void *a, const void *b) {
        uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
        return x < y ? -1 : x > y;
    }
    """
    int mbx_cmp_u64(const void *a, const void *b) noexcept nogil

# mbx_msg_hdr.refs, which inline counts the queues holding a message, here says
# where it is: k, sent to (or held by) hop k; HANDLED | k, NF k is done with it but
# has not pushed it on yet; DONE, no hop holds it.  A dead NF's messages are found so.
cdef enum:
    DONE = 0xFFFF
    HANDLED = 0x8000
    RING_HDR = 192
    SPIN = 512              # polls before yielding, then before blocking
    YIELDS = 64
    SPIN_SHARED = 32        # the same with more processes than cores
    YIELDS_SHARED = 4
    SCRATCH = 1024
    ERROR_SIZE = 1024
    REPORT_SIZE = 4096      # an NF's report(), as JSON, written when its process ends
    PAGE = 4096
    # per NF and type: published, delivered, and dropped at its ring (see ring_drop)
    TYPE_COUNTS = 3

# An NF's report() as JSON, in bytes, at most: what its area in the pipeline's shared
# memory holds with the NUL; every deployment keeps to it (mbx.runtime.take_report).
REPORT_MAX = REPORT_SIZE - 1

# How long stack_wait still waits for the NFs once the run was asked to stop.
cdef int64_t STOP_GRACE_NS = 1000000000


cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline bint spun(uint32_t spins, uint32_t spin, uint32_t yields) noexcept nogil:
    # The first stages of every wait here: poll (relaxed) for `spin` rounds, then
    # yield the core for `yields` more; False once it is time to block instead.
    if spins < spin:
        mbx_relax()
        return True
    if spins < spin + yields:
        sched_yield()
        return True
    return False


cdef str slot_text(const char *area, uint32_t k, size_t size):
    # The NUL-terminated text in slot k of an area of ``size``-byte slots.  (Cython
    # slices a char * as area[start:strlen(area)], which is empty for k > 0 when
    # slot 0 holds less text: point at the slot first.)
    cdef const char *text = area + <size_t>k * size
    return text.decode("utf-8", "replace")


cdef inline size_t up(size_t n, size_t a) noexcept nogil:
    return (n + a - 1) & ~(a - 1)


cdef inline void drop_pkt(mbx_pkt *p, uint8_t stage) noexcept nogil:
    if p.verdict != VERDICT_DROP or stage < p.drop_stage:
        p.drop_stage = stage
    p.verdict = VERDICT_DROP


def layout(uint32_t nnf, uint32_t total, uint32_t ring_size, size_t batch_bytes,
           uint32_t inflight=1, uint32_t members=0):
    """(bytes of the shared mapping, [offset of each of the ``inflight`` burst slots]).
    ``members``: NFs in parallel groups (each has a merge ring, see the module).
    The NFs' request rings (the control path) end the mapping, after the bursts."""
    cdef size_t off = up(sizeof(mbx_ctl), PAGE)
    off += up(<size_t>nnf * ERROR_SIZE, 64)
    off += up(<size_t>nnf * REPORT_SIZE, 64)
    off += up(<size_t>nnf * TYPE_COUNTS * MAX_TYPES * 8, 64)
    off += (nnf + 1 + members) * up(RING_HDR + <size_t>ring_size * 4, 64)
    off += 2 * up(<size_t>total * 4, 64)
    off = up(off, PAGE) + up(<size_t>total * sizeof(mbx_msg), PAGE)
    slots = [off + k * up(batch_bytes, PAGE) for k in range(inflight)]
    return off + inflight * up(batch_bytes, PAGE) + nnf * sizeof(mbx_req_ring), slots


def check_inflight(inflight):
    """Refuse a number of bursts in flight the mapping cannot carry."""
    if (not isinstance(inflight, int) or not 1 <= inflight <= MBX_MAX_INFLIGHT
            or inflight & (inflight - 1)):
        raise ValueError(f"inflight must be a power of two from 1 to {MBX_MAX_INFLIGHT} "
                         f"(bursts the stack runs ahead of the NFs), not {inflight}")


def _handled_in_nf_process(ev):
    # What the stack's copy of an NF's handler tables holds where the NF's own
    # mb_up_sub installed a handler: the stack only asks whether one is there.
    raise MbxError("an NF's handler runs in its own process, not in the stack's")


cdef class PipeBus(EventBus):
    """The EventBus of the pipelined deployment (one object, forked into every
    process; ``role`` says which part this process plays)."""

    def __cinit__(self, *args, **kwargs):
        self.may_share = False      # every NF its own process, and its own ring
        self.rings = NULL
        self.out = NULL
        self.scratch = NULL
        self.policy = NULL
        self.pending = NULL
        self.npend = NULL
        self.pend_last = NULL
        self.pidfds = NULL
        self.slot_pkts = NULL
        self.shm = None
        self.restart_left = NULL
        self.restart_at = NULL
        self.started_epochs = NULL
        self.at_boundary = NULL
        self.gfirst = NULL
        self.glast = NULL
        self.mends = NULL
        self.hop_ends = NULL
        self.merges = NULL
        self.ngroups = 0
        self.takers = NULL

    def __dealloc__(self):
        cdef uint32_t k
        if self.pending != NULL:
            for k in range(self.nnf):
                free(self.pending[k])
        free(self.pending)
        free(self.npend)
        free(self.pend_last)
        free(self.rings)
        free(self.out)
        free(self.scratch)
        free(self.policy)
        free(self.pidfds)
        free(self.slot_pkts)
        free(self.restart_left)
        free(self.restart_at)
        free(self.started_epochs)
        free(self.at_boundary)
        for k in range(self.ngroups):
            free(self.merges[k].count)
            free(self.merges[k].keys)
            free(self.merges[k].idx)
            free(self.merges[k].out)
        free(self.merges)
        free(self.gfirst)
        free(self.glast)
        free(self.mends)
        free(self.hop_ends)
        free(self.takers)

    def setup(self, shm, uint32_t ring_size, bint drop_full, failures,
              uint32_t inflight=1, restarts=None):
        """Carve the shared mapping (see ``layout``); before the fork.  ``restarts``:
        per NF, (restarts allowed, first back-off in seconds), see ``restart_nf``."""
        cdef uint8_t[::1] view = shm
        cdef uint32_t n = self.nnf, k
        cdef size_t off
        if n == 0:
            raise MbxError("the pipelined deployment needs at least one NF")
        if ring_size < 2 or ring_size & (ring_size - 1):
            raise ValueError(f"ring_size must be a power of two >= 2, not {ring_size}")
        check_inflight(inflight)
        self.shm = view
        self.base = &view[0]
        self.total = self.msg_capacity
        self.stack_share = self.total // 2
        self.nf_share = (self.total - self.stack_share) // n
        # A power of two: (epoch - 1) & (K - 1) stays right across the 32-bit wrap.
        self.inflight = inflight
        self.stack_region = self.stack_share // inflight
        self.nf_region = self.nf_share // inflight
        if self.stack_region < 32 or self.nf_region < 1:
            raise MbxError(f"msg_capacity {self.total} is too small for {n} NF processes "
                           f"with {inflight} bursts in flight (each has its own share of "
                           "Event Memory)")
        self.ring_size = ring_size
        self.drop_full = drop_full
        self.role = n
        self.ctl = <mbx_ctl *>self.base
        off = up(sizeof(mbx_ctl), PAGE)
        self.errors = <char *>(self.base + off)
        off += up(<size_t>n * ERROR_SIZE, 64)
        self.reports = <char *>(self.base + off)
        off += up(<size_t>n * REPORT_SIZE, 64)
        self.typecnt = <uint64_t *>(self.base + off)
        off += up(<size_t>n * TYPE_COUNTS * MAX_TYPES * 8, 64)
        # Stages: a parallel group of two or more NFs is fanned out to and merged
        # (see the module); every other NF is a stage of its own.
        self.gfirst = <uint32_t *>calloc_u32(n)
        self.glast = <uint32_t *>calloc_u32(n)
        if self.gfirst == NULL or self.glast == NULL:
            raise MemoryError()
        for k in range(n):
            self.gfirst[k] = k if k == 0 or self.nf_stage[k] != self.nf_stage[k - 1] \
                else self.gfirst[k - 1]
        for j in range(n, 0, -1):        # (k is unsigned: count down from n)
            k = j - 1
            self.glast[k] = k if k == n - 1 or self.nf_stage[k] != self.nf_stage[k + 1] \
                else self.glast[k + 1]
        # rings 0..n: the input of NF k (n: the stack's completions); n + 1 + k: the
        # merge ring of group member k (to the stack)
        self.rings = <mbx_ring **>calloc(2 * n + 1, sizeof(mbx_ring *))
        if self.rings == NULL:
            raise MemoryError()
        for k in range(2 * n + 1):
            if k > n and not self.member(k - n - 1):
                continue
            self.rings[k] = <mbx_ring *>(self.base + off)
            self.rings[k].size = ring_size
            self.rings[k].mask = ring_size - 1
            off += up(RING_HDR + <size_t>ring_size * 4, 64)
        self.fmask = <uint32_t *>(self.base + off)
        off += up(<size_t>self.total * 4, 64)
        self.gdone = <uint32_t *>(self.base + off)
        off += up(<size_t>self.total * 4, 64)
        off = up(off, PAGE)
        # Event Memory moves into the mapping; every slot starts free.
        PyMem_Free(self.msgs)
        self.msgs = <mbx_msg *>(self.base + off)
        self.msgs_shared = True
        for k in range(self.total):
            self.msgs[k].h.refs = DONE
        self.out = <uint32_t *>malloc((<size_t>self.total + 64) * 4)
        self.scratch = <uint32_t *>malloc(<size_t>max(SCRATCH, ring_size) * 4)
        self.policy = <uint8_t *>malloc(n)
        self.npend = <uint32_t *>calloc_u32(n)
        self.pend_last = <uint32_t *>calloc_u32(n)
        self.pending = <uint32_t **>malloc(n * sizeof(uint32_t *))
        self.pidfds = <int *>malloc((n + 1) * sizeof(int))
        self.slot_pkts = <mbx_pkt **>calloc(inflight, sizeof(mbx_pkt *))
        if (self.out == NULL or self.scratch == NULL or self.policy == NULL
                or self.npend == NULL or self.pend_last == NULL or self.pending == NULL
                or self.pidfds == NULL or self.slot_pkts == NULL):
            raise MemoryError()
        self.failure_names = list(failures)
        self.reported = set()
        self.logged = set()
        self.restart_conf = list(restarts) if restarts is not None else [(0, 0.0)] * n
        self.restart_log = [[] for _ in range(n)]
        self.restart_made = [0] * n
        self.restart_left = <uint32_t *>calloc_u32(n)
        self.started_epochs = <uint32_t *>calloc_u32(n)
        self.restart_at = <uint64_t *>calloc(n, 8)
        self.at_boundary = <uint8_t *>calloc(n, 1)
        if (self.restart_left == NULL or self.started_epochs == NULL
                or self.restart_at == NULL or self.at_boundary == NULL):
            raise MemoryError()
        for k in range(n):
            self.restart_left[k] = self.restart_conf[k][0]
            self.may_restart |= self.restart_left[k] > 0
        for k in range(n):
            self.policy[k] = self.failure_names[k] == "open"
            self.pending[k] = NULL
            self.pidfds[k] = -1
        for k in range(n + 1):
            efd = eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)
            if efd < 0:
                raise OSError(os.strerror(efd), "eventfd")
            self.ctl.procs[k].efd = efd
        self.any_filter = any(nf.filters for nf in self.nfs)
        # Who takes each type (by sub(), the only sets there are before the run):
        # an event no NF from a hop on takes is not pushed there (taken_from).
        self.takers = <uint32_t *>calloc_u32(MAX_TYPES)
        if self.takers == NULL:
            raise MemoryError()
        for t in range(MAX_TYPES):
            for k in range(n):
                if self.sets[k][0][t] != NULL:
                    self.takers[t] |= (<uint32_t>1) << k
        # the control path ends the mapping (see layout)
        self.reqs = <mbx_req_ring *>(self.base + view.shape[0] - n * sizeof(mbx_req_ring))
        # Spinning pays only while every process has a core to itself; past that a
        # waiting process would take the core its producer needs: block soon.
        if n + 1 <= len(os.sched_getaffinity(0)):
            self.spin, self.yields = SPIN, YIELDS
        else:
            self.spin, self.yields = SPIN_SHARED, YIELDS_SHARED

    def stage_of(self, uint32_t k):
        """(first, last) NF of NF k's stage (a parallel group, or k alone)."""
        return self.gfirst[k], self.glast[k]

    def fanout_members(self):
        """NFs in parallel groups of two or more (each has a merge ring)."""
        cdef uint32_t k, n = 0
        for k in range(self.nnf):
            if ((k > 0 and self.nf_stage[k] == self.nf_stage[k - 1])
                    or (k + 1 < self.nnf and self.nf_stage[k] == self.nf_stage[k + 1])):
                n += 1
        return n

    cdef inline bint member(self, uint32_t k) noexcept nogil:
        return self.glast[k] != self.gfirst[k]

    cdef uint32_t hop_after(self, uint32_t k) noexcept nogil:
        # Where NF k pushes: its merge ring (a group member), else the next stage's
        # ring (fanned out to every ring of a group), or the stack's.
        return self.nnf + 1 + k if self.member(k) else k + 1

    cdef uint32_t hop_room(self, uint32_t r) noexcept nogil:
        cdef uint32_t j, room = mbx_ring_room(self.rings[r])
        if r < self.nnf and self.member(r):
            for j in range(r + 1, self.glast[r] + 1):
                room = min(room, mbx_ring_room(self.rings[j]))
        return room

    cdef uint32_t hop_enqueue(self, uint32_t r, uint32_t *src, uint32_t n) noexcept nogil:
        # Into ring r, or (r starts a group) the same entries into every member's
        # ring: all of them or none, so the members see the same messages.
        cdef uint32_t j, last = r
        if r < self.nnf and self.member(r):
            last = self.glast[r]
        n = min(n, self.hop_room(r))
        if n == 0:
            return 0
        for j in range(r, last + 1):
            mbx_ring_enqueue(self.rings[j], src, n)
            self.wake_consumer(j)
        return n

    cdef uint32_t ends_into(self, uint32_t r) noexcept nogil:
        # Epoch ends pushed into ring r so far (counted before they are pushed).
        cdef uint32_t p = self.gfirst[r] if r < self.nnf else r
        if p == 0:
            return mbx_load(&self.ctl.procs[self.nnf].epochs)
        if self.member(p - 1):
            return self.hop_ends[p]
        return mbx_load(&self.ctl.procs[p - 1].epochs)

    def attach_shared_batches(self, batches):
        """The K burst slots every process sees (built over the shared mapping)."""
        cdef uint32_t k
        if len(batches) != self.inflight:
            raise MbxError(f"{len(batches)} burst slots for {self.inflight} in flight")
        self.batches = list(batches)
        for k in range(self.inflight):
            self.slot_pkts[k] = (<Batch>self.batches[k]).pkts
        self.attach_batch(self.batches[0])

    cdef void attach_batch(self, Batch batch):
        # The stack starts a burst: its slot goes with the epochs it publishes.
        cdef uint32_t k
        EventBus.attach_batch(self, batch)
        for k in range(self.inflight):
            if self.slot_pkts[k] == batch.pkts:
                self.slot = k

    cdef inline mbx_proc *proc(self, uint32_t k) noexcept nogil:
        return &self.ctl.procs[k]

    # -- waking -------------------------------------------------------------------

    cdef void wake_consumer(self, uint32_t r) noexcept nogil:
        # The consumer of ring r is NF r (the stack for the last ring, the merge
        # rings, and the ring of a dead NF, which it drains).
        if r < self.nnf and not self.ctl.procs[r].dead:
            mbx_wake(&self.ctl.procs[r])
        else:
            mbx_wake(&self.ctl.procs[self.nnf])

    cdef void wake_producer(self, uint32_t r) noexcept nogil:
        # A merge ring's producer is its member; a stage's rings are fed by the NF
        # before it, or by the stack (the first stage, and after a group).
        cdef uint32_t p
        if r > self.nnf:
            p = r - self.nnf - 1
        else:
            p = self.gfirst[r] if r < self.nnf else r
            if p == 0 or self.member(p - 1):
                p = self.nnf
            else:
                p -= 1
        if p < self.nnf and self.ctl.procs[p].dead:
            p = self.nnf
        mbx_wake(&self.ctl.procs[p])

    # -- the EventBus hooks ---------------------------------------------------------

    def full_text(self):
        # An NF process publishes into its own region of Event Memory for the epoch,
        # far smaller than the whole.
        if self.role == self.nnf:
            return EventBus.full_text(self)
        return (f"its share of Event Memory for one burst is full ({self.nf_region} "
                f"messages: msg_capacity {self.total} is half the stack's, half shared "
                f"by {self.nnf} NF process{'es' if self.nnf > 1 else ''}, over "
                f"{self.inflight} burst{'s' if self.inflight > 1 else ''} in flight)")

    cdef mbx_msg *new_msg(self, uint16_t type_idx, uint64_t type_id, int64_t ts_ns,
                          uint32_t flow, uint32_t gen, uint32_t pkt, uint8_t dir,
                          uint16_t publisher, uint32_t pos) noexcept nogil:
        if self.role == self.nnf:
            return EventBus.new_msg(self, type_idx, type_id, ts_ns, flow, gen, pkt, dir,
                                    publisher, pos)
        # An NF publishes into its own share of Event Memory, in the epoch's region
        # (reused K epochs later, when the stack knows this one complete).
        if self.nf_used >= self.nf_region:
            return NULL
        cdef uint32_t region = self.ctl.procs[self.role].epochs & (self.inflight - 1)
        cdef mbx_msg *m = &self.msgs[self.stack_share + self.role * self.nf_share
                                     + region * self.nf_region + self.nf_used]
        self.nf_used += 1
        # refs: held by this NF until it pushes it on
        msg_header(m, type_idx, type_id, ts_ns, flow, gen, pkt, dir, publisher, pos,
                   self.role)
        return m

    cdef void filter_mask(self, mbx_msg *m, uint32_t first) noexcept nogil:
        # Filters are judged when a message is published, as inline: a later
        # rewrite of the packet does not change who gets it.
        cdef uint32_t i, mask = 0
        cdef uint32_t idx = <uint32_t>(m - self.msgs)
        cdef mbx_filter *f
        for i in range(first, self.nnf):
            f = self.set_filter[i][0][m.h.type_idx]
            if f != NULL and not self.passes(f, m):
                mask |= (<uint32_t>1) << i
        self.fmask[idx] = mask

    cdef bint taken_from(self, mbx_msg *m, uint32_t h) noexcept nogil:
        # Does an NF of hop h or after it take m?  By its sub() (takers), unless a
        # filter refused m at publication; an NF that called mb_up_sub may take
        # anything.  What none takes goes no further: pushing it would cost ring
        # room and time for nothing, and under the drop policy its drop would drop
        # its packet too.
        cdef uint32_t mask
        if h >= self.nnf:
            return False
        mask = ((self.takers[m.h.type_idx] | mbx_load(&self.ctl.dynamic))
                & ((<uint32_t>0xFFFFFFFF) << h))
        if self.any_filter:
            mask &= ~self.fmask[<uint32_t>(m - self.msgs)]
        return mask != 0

    cdef void publish(self, mbx_msg *m) noexcept nogil:
        cdef uint32_t idx = <uint32_t>(m - self.msgs)
        self.published += 1
        self.per_type_published[m.h.type_idx] += 1
        self.last_pub = idx
        if self.role == self.nnf:
            m.h.refs = 0
            if self.any_filter:
                self.filter_mask(m, 0)
            if not self.taken_from(m, 0):
                m.h.refs = DONE
                self.completed += 1
                return
        else:
            m.h.refs = HANDLED | self.role
            self.ctl.procs[self.role].published += 1
            if self.any_filter:
                self.filter_mask(m, self.role + 1)
            # (its group mates may not take it: the NFs after its stage)
            if not self.taken_from(m, self.glast[self.role] + 1):
                m.h.refs = DONE
                self.ctl.procs[self.role].retired += 1
                return
        self.out[self.nout] = idx
        self.nout += 1

    cdef void release(self, mbx_msg *m) noexcept nogil:
        # An NF is done with m (handled, skipped or hidden): on down the chain.  The
        # members of a group share the messages sent to it: each says it is done in
        # gdone, and only the first (the lead) names where its copy is (the stack
        # merges the lead's copies, and every member's ends and publications).
        cdef uint32_t idx = <uint32_t>(m - self.msgs)
        cdef uint32_t k = self.role
        if k < self.nnf and self.member(k):
            mbx_vote(&self.gdone[idx], (<uint32_t>1) << (k - self.gfirst[k]))
            if k != self.gfirst[k]:
                self.out[self.nout] = idx
                self.nout += 1
                return
        elif k < self.nnf and not self.taken_from(m, k + 1):
            m.h.refs = DONE             # no NF after it takes m: it ends here
            self.ctl.procs[k].retired += 1
            return
        m.h.refs = HANDLED | k
        self.out[self.nout] = idx
        self.nout += 1

    cdef void handler_failed(self, uint32_t i, mbx_pkt *p) noexcept nogil:
        # In NF i's process its handler raised on p's event: the NF is about to fail,
        # and unless it fails open the packet it gave no verdict on does not pass
        # (a firewall's crash on a bad packet must not forward exactly that packet).
        # Its drop unless it dropped the packet itself (its bit), whatever its group
        # mates did with it.
        if p != NULL and not self.policy[i] and not (p.votes >> i) & 1:
            self.nf_drop(i, p)
            self.nf_drops[i] += 1

    cdef void ring_drop(self, uint32_t idx, uint32_t r) noexcept nogil:
        # A full ring under the drop policy: the message goes no further, and its
        # packet is dropped with it (an NF that did not see it cannot pass it).
        # Counted for the NF whose ring was full (of a group's, the fullest), not
        # for the producer: so each NF's ring_dropped says what it and the NFs after
        # it missed, and they add up to the deployment's.  Only ring r's producer
        # (one process at a time, the stack for a dead NF) writes these counts.
        cdef mbx_msg *m = &self.msgs[idx]
        cdef mbx_pkt *p
        cdef uint32_t j, k = r
        cdef mbx_proc *pr
        if r < self.nnf and self.member(r):
            for j in range(r + 1, self.glast[r] + 1):
                if mbx_ring_room(self.rings[j]) < mbx_ring_room(self.rings[k]):
                    k = j
        pr = &self.ctl.procs[k]
        m.h.refs = DONE
        pr.ring_dropped += 1
        self.typecnt[<size_t>k * TYPE_COUNTS * MAX_TYPES + 2 * MAX_TYPES + m.h.type_idx] += 1
        if m.h.pkt != NO_PKT:
            p = &self.pkts[m.h.pkt]
            if p.verdict != VERDICT_DROP:
                pr.ring_dropped_pkts += 1
                p.flags |= PKT_F_STACK_DROP     # counted here, not as an NF's drop
            drop_pkt(p, 0)

    # -- the NF side --------------------------------------------------------------

    cdef void push_out(self, uint32_t r, mbx_proc *me, bint from_stack) noexcept nogil:
        # Push everything in out to ring r: stall while it is full (spin, yield,
        # then block until the consumer takes some), or drop under the drop policy
        # into an NF's ring; epoch ends are never dropped, nor is anything on the
        # completion ring (every NF has had it: a drop there would only drop packets
        # the chain passed, and the stack drains that ring whatever else waits).
        cdef uint32_t done = 0, n, j, keep
        cdef uint32_t spins = 0
        cdef bint copies = r > self.nnf and self.role != self.gfirst[self.role]
        cdef mbx_msg *m
        while done < self.nout:
            # Name the next hop in what is about to go (no more than fits): until
            # then, a message is this NF's, should it die.  (A group member other
            # than the lead names only its own publications: the rest are shared.)
            n = min(self.hop_room(r), self.nout - done)
            for j in range(done, done + n):
                if not self.out[j] & MBX_END_BIT:
                    m = &self.msgs[self.out[j]]
                    if not copies or m.h.publisher == self.role + 1:
                        m.h.refs = r
            n = self.hop_enqueue(r, self.out + done, n)
            if n:
                done += n
                spins = 0
                continue
            # a merge ring never drops: the stack drains it whatever comes next
            if self.drop_full and r < self.nnf:
                keep = done
                for j in range(done, self.nout):
                    if self.out[j] & MBX_END_BIT:
                        self.out[keep] = self.out[j]
                        keep += 1
                    else:
                        self.ring_drop(self.out[j], r)
                self.nout = keep
                if done == keep:
                    break
            if mbx_load(&self.ctl.stop):
                # the run is over: whoever would have made room (a consumer that
                # died, the stack draining for it) is gone or stopping, so stop
                # waiting, or this process could not run its stop() and report
                break
            spins += 1
            if spun(spins, self.spin, self.yields):
                continue
            mbx_sleep_begin(me)
            if self.hop_room(r) or mbx_load(&self.ctl.stop):
                mbx_sleep_cancel(me)
                continue
            mbx_sleep_wait(me, NULL, 0, 100)
        self.nout = 0

    cdef uint32_t wait_input(self, uint32_t k, uint32_t *buf, uint32_t n) noexcept nogil:
        # Take up to n entries from ring k; 0 once the run is over and it is empty.
        cdef uint32_t got, spins = 0
        cdef mbx_ring *ring = self.rings[k]
        cdef mbx_proc *me = &self.ctl.procs[k]
        while True:
            got = mbx_ring_dequeue(ring, buf, n)
            if got:
                self.wake_producer(k)
                return got
            if mbx_load(&self.ctl.stop):
                return 0
            spins += 1
            if spun(spins, self.spin, self.yields):
                continue
            mbx_sleep_begin(me)
            if mbx_ring_count(ring) or mbx_load(&self.ctl.stop):
                mbx_sleep_cancel(me)
                continue
            mbx_sleep_wait(me, NULL, 0, 200)

    cdef int deliver(self, uint32_t k, object nf, uint32_t limit) except -1:
        if self.next_ring(k, limit) == NO_RING:
            return 0
        cdef uint64_t t0 = now_ns()
        _events._dispatching.nf = nf
        try:
            self._drain(k, limit)
        finally:
            _events._dispatching.nf = None
            self.current_msg_idx = None
            self.ctl.procs[k].busy_ns += now_ns() - t0
            # what the inline bus counts per NF, for the stack's statistics
            self.ctl.procs[k].delivered = self.delivered
            self.ctl.procs[k].c_events = self.nf_c_events[k]
            self.ctl.procs[k].handler_ns = self.nf_ns[k]
            # its own drops (in a group that votes, its votes), each member its own
            self.ctl.procs[k].drops = self.nf_drops[k]
        return 0

    def nf_main(self, uint32_t k):
        """The loop of NF k's process (after the fork); returns when the run ends."""
        cdef uint32_t n, j, idx, r, mask, hop, parent = os.getppid()
        cdef uint32_t *buf = self.scratch
        cdef mbx_msg *m
        cdef mbx_proc *me
        cdef uint8_t *skip
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if getppid() != parent:
            os._exit(1)
        self.role = k
        self.msg_capacity = self.total
        self.enter_nf_process()
        self.per_type_published = self.typecnt + <size_t>k * TYPE_COUNTS * MAX_TYPES
        self.per_type_delivered = self.per_type_published + MAX_TYPES
        me = &self.ctl.procs[k]
        # A restarted NF goes on counting where its dead process left off.
        self.delivered = me.delivered
        self.nf_c_events[k] = me.c_events
        self.nf_ns[k] = me.handler_ns
        self.nf_drops[k] = me.drops
        skip = <uint8_t *>PyMem_Calloc(self.total, 1)
        if skip == NULL:
            raise MemoryError()
        self.skip = skip
        nf = self.nfs[k]
        mask = self.msg_capacity - 1
        hop = self.hop_after(k)
        self.maxpos = 0
        self.nout = 0
        self.need_slot = True
        while True:
            with nogil:
                n = self.wait_input(k, buf, SCRATCH)
            if n == 0:
                break
            for j in range(n):
                idx = buf[j]
                if idx & MBX_END_BIT:
                    if (idx - me.epochs - 1) & 0x7FFFFFFF:
                        continue        # a copy a recovery upstream sent again
                    # The epoch is complete upstream: finish it, pass the end on, and
                    # go on in the next region of this NF's share of Event Memory.
                    # The end is counted after the epoch's messages are pushed and
                    # before it is: a recovery of the next NF may count it early
                    # (and send it itself, the copy dropped), never late.
                    self.deliver(k, nf, NO_RING - 1)
                    if self.nout:
                        with nogil:
                            self.push_out(hop, me, False)
                    mbx_store(&me.epochs, me.epochs + 1)
                    self.out[0] = idx
                    self.nout = 1
                    with nogil:
                        self.push_out(hop, me, False)
                    self.nf_used = 0
                    self.maxpos = 0
                    self.need_slot = True
                    continue
                if self.need_slot:
                    # The epoch's first message: the stack named its burst slot
                    # before pushing it (the rings' release/acquire carry that here).
                    self.slot = self.ctl.epoch_slot[me.epochs & (self.inflight - 1)]
                    self.pkts = self.slot_pkts[self.slot]
                    self.batch = self.batches[self.slot]
                    self.need_slot = False
                me.events_in += 1
                m = &self.msgs[idx]
                skip[idx] = (self.fmask[idx] >> k) & 1 if self.any_filter else 0
                r = 2 * k + (m.h.publisher != 0)
                self.queues[r * self.msg_capacity + (self.qtail[r] & mask)] = idx
                self.qtail[r] += 1
                if m.h.pos > self.maxpos:
                    self.maxpos = m.h.pos
            # Positions arrive in order, so everything below the last one seen is
            # complete (the events and the publications they caused).
            if self.maxpos:
                self.deliver(k, nf, self.maxpos - 1)
            if self.nout:
                with nogil:
                    self.push_out(hop, me, False)

    def nf_failed(self, uint32_t k, str text):
        """NF k's handler raised: keep the text for the stack, pass on what is done."""
        raw = text.encode("utf-8", "replace")[:ERROR_SIZE - 1]
        memcpy(self.errors + k * ERROR_SIZE, <const char *>raw, len(raw))
        self.errors[k * ERROR_SIZE + len(raw)] = 0
        self.ctl.procs[k].failed = 1
        if self.nout:
            with nogil:
                self.push_out(self.hop_after(k), &self.ctl.procs[k], False)

    def nf_report(self, uint32_t k, str text):
        """NF k's report (JSON text, at most REPORT_MAX bytes: mbx.runtime.take_report
        made it so) for the stack."""
        raw = text.encode("utf-8")
        if len(raw) > REPORT_MAX:
            raise ValueError(f"NF {self.nfs[k].name}: a report of {len(raw):,} bytes")
        memcpy(self.reports + k * REPORT_SIZE, <const char *>raw, len(raw))
        self.reports[k * REPORT_SIZE + len(raw)] = 0

    def nf_exit(self, uint32_t k):
        mbx_store(&self.ctl.procs[k].exited, 1)

    # -- the stack side -----------------------------------------------------------

    def become_stack(self, pids, pidfds):
        """In the stack's process after the fork: the children and their pidfds."""
        cdef uint32_t k
        cdef mbx_merge *mg
        self.role = self.nnf
        for k in range(self.nnf):
            self.ctl.procs[k].pid = pids[k]
            self.pidfds[k] = pidfds[k]
        self.ctl.procs[self.nnf].pid = os.getpid()
        self.done_epoch = self.ctl.epoch
        self.reset_pool()
        self.mends = <uint32_t *>calloc_u32(self.nnf)
        self.hop_ends = <uint32_t *>calloc_u32(self.nnf + 1)
        firsts = [k for k in range(self.nnf) if self.member(k) and self.gfirst[k] == k]
        self.merges = <mbx_merge *>calloc(max(len(firsts), 1), sizeof(mbx_merge))
        if self.mends == NULL or self.hop_ends == NULL or self.merges == NULL:
            raise MemoryError()
        for k in range(self.nnf):
            self.mends[k] = self.ctl.epoch
        for k in firsts:
            mg = &self.merges[self.ngroups]
            self.ngroups += 1
            mg.first = k
            mg.last = self.glast[k]
            mg.next = mg.last + 1
            mg.fn = self.nf_fngroup[k]
            mg.votemask = self.nf_votemask[k] if mg.fn else 0
            mg.flushed = self.ctl.epoch
            mg.count = <uint32_t *>calloc_u32(self.inflight)
            mg.keys = <uint64_t *>malloc(<size_t>self.inflight * self.total * 8)
            mg.idx = <uint32_t *>malloc(<size_t>self.inflight * self.total * 4)
            mg.out = <uint32_t *>malloc((<size_t>self.total + 2 * MBX_MAX_INFLIGHT + 64) * 4)
            if mg.count == NULL or mg.keys == NULL or mg.idx == NULL or mg.out == NULL:
                raise MemoryError()

    cdef void reset_pool(self) noexcept nogil:
        # The stack builds the next epoch (ctl.epoch + 1) in that epoch's region of
        # its share, which stack_round made sure is free: msg_used and msg_capacity
        # bound the region, so the stack's room checks stay what they are inline.
        if self.role != self.nnf:
            self.msg_used = 0
            return
        self.msg_used = (self.ctl.epoch & (self.inflight - 1)) * self.stack_region
        self.msg_capacity = self.msg_used + self.stack_region

    cdef uint32_t region_of(self, uint32_t idx) noexcept nogil:
        # The epoch region a message was built in (the stack's share or an NF's).
        if idx < self.stack_share:
            return idx // self.stack_region
        return ((idx - self.stack_share) % self.nf_share) // self.nf_region

    cdef bint drain_completions(self) noexcept nogil:
        # Take completions back; an end marker completes its epoch (they come back
        # in order; one a recovery sent twice is older than done_epoch, and ignored).
        cdef uint32_t n, j, idx, ahead
        cdef bint got = False
        cdef mbx_ring *ring = self.rings[self.nnf]
        while True:
            n = mbx_ring_dequeue(ring, self.scratch, SCRATCH)
            if n == 0:
                return got
            got = True
            self.wake_producer(self.nnf)
            for j in range(n):
                idx = self.scratch[j]
                if idx & MBX_END_BIT:
                    ahead = (idx - self.done_epoch) & 0x7FFFFFFF
                    if ahead <= self.inflight:
                        self.done_epoch += ahead
                    continue
                self.msgs[idx].h.refs = DONE
                self.completed += 1

    cdef bint merge_groups(self) noexcept nogil:
        # The stack's merge of each parallel group: take what its members sent back
        # (the lead's copies of the messages sent to the group, every member's
        # publications and epoch ends), and once every member has ended an epoch,
        # send the epoch on, ordered as the chain would (by burst position; the
        # messages from before the group first, then each member's publications in
        # chain order).
        cdef uint32_t g, j, n, i, idx, r, e, cls, seq, region, start, keep
        cdef bint progress = False
        cdef mbx_merge *mg
        cdef mbx_msg *m
        cdef uint64_t *keys
        for g in range(self.ngroups):
            mg = &self.merges[g]
            for j in range(mg.first, mg.last + 1):
                r = self.nnf + 1 + j
                while True:
                    n = mbx_ring_dequeue(self.rings[r], self.scratch, SCRATCH)
                    if n == 0:
                        break
                    progress = True
                    self.wake_producer(r)
                    for i in range(n):
                        idx = self.scratch[i]
                        if idx & MBX_END_BIT:
                            if not (idx - self.mends[j] - 1) & 0x7FFFFFFF:
                                self.mends[j] += 1      # (a copy a recovery resent is not)
                            continue
                        m = &self.msgs[idx]
                        if mg.first < m.h.publisher <= mg.last + 1:
                            cls = m.h.publisher - mg.first
                        elif j == mg.first:
                            cls = 0
                        else:
                            continue        # another member's copy: the lead's goes on
                        region = self.region_of(idx)
                        seq = mg.count[region]
                        mg.count[region] += 1
                        mg.keys[region * self.total + seq] = (
                            ((<uint64_t>m.h.pos) << 40) | ((<uint64_t>cls) << 32) | seq)
                        mg.idx[region * self.total + seq] = idx
            while True:
                e = mg.flushed + 1
                for j in range(mg.first, mg.last + 1):
                    if <int32_t>(self.mends[j] - e) < 0:
                        break
                else:
                    region = (e - 1) & (self.inflight - 1)
                    keys = mg.keys + region * self.total
                    qsort(keys, mg.count[region], 8, mbx_cmp_u64)
                    start = mg.nout
                    for i in range(mg.count[region]):
                        idx = mg.idx[region * self.total + <uint32_t>keys[i]]
                        self.gdone[idx] = 0
                        self.msgs[idx].h.refs = mg.next
                        mg.out[mg.nout] = idx
                        mg.nout += 1
                    if mg.fn:
                        self.merge_decide(mg, start, region)
                    if mg.next < self.nnf:
                        # what no NF from the next stage on takes ends here
                        keep = start
                        for i in range(start, mg.nout):
                            idx = mg.out[i]
                            if self.taken_from(&self.msgs[idx], mg.next):
                                mg.out[keep] = idx
                                keep += 1
                            else:
                                self.msgs[idx].h.refs = DONE
                                self.completed += 1
                        mg.nout = keep
                    mg.out[mg.nout] = MBX_END_BIT | (e & 0x7FFFFFFF)
                    mg.nout += 1
                    mg.count[region] = 0
                    mg.flushed = e
                    self.hop_ends[mg.next] += 1
                    progress = True
                    continue
                break
            if mg.nout == 0:
                continue
            if mg.next == self.nnf:
                # the group ends the chain: these are completions
                for i in range(mg.nout):
                    idx = mg.out[i]
                    if idx & MBX_END_BIT:
                        if ((idx - self.done_epoch) & 0x7FFFFFFF) <= self.inflight:
                            self.done_epoch += (idx - self.done_epoch) & 0x7FFFFFFF
                        continue
                    self.msgs[idx].h.refs = DONE
                    self.completed += 1
                mg.nout = 0
                continue
            n = self.hop_enqueue(mg.next, mg.out, mg.nout)
            if n:
                progress = True
                memmove(mg.out, mg.out + n, (mg.nout - n) * 4)
                mg.nout -= n
            elif self.drop_full:
                i = 0
                for j in range(mg.nout):
                    if mg.out[j] & MBX_END_BIT:
                        mg.out[i] = mg.out[j]
                        i += 1
                    else:
                        self.ring_drop(mg.out[j], mg.next)
                progress = progress or i < mg.nout
                mg.nout = i
        return progress

    cdef void merge_decide(self, mbx_merge *mg, uint32_t start, uint32_t region) noexcept nogil:
        # Every member has ended the epoch whose messages are mg.out[start:]: the
        # group's merge function decides each packet a member voted to drop (at the
        # first of its messages, in chain order; its votes are cleared then), before
        # the next stage or the completion sees it, under one taking of the GIL.  An
        # error is kept for dispatch to raise; until then the packets it leaves
        # undecided are dropped.
        cdef uint32_t i, pkt
        cdef mbx_pkt *pkts = self.slot_pkts[self.ctl.epoch_slot[region]]
        cdef mbx_pkt *p
        for i in range(start, mg.nout):
            pkt = self.msgs[mg.out[i]].h.pkt
            if pkt != NO_PKT and pkts[pkt].votes & mg.votemask:
                break
        else:
            return
        with gil:
            name, fn, mask, stage, names = self.fn_groups[mg.fn - 1]
            for i in range(i, mg.nout):
                pkt = self.msgs[mg.out[i]].h.pkt
                if pkt == NO_PKT or not pkts[pkt].votes & mg.votemask:
                    continue
                p = &pkts[pkt]
                if self.req_error is not None:
                    p.votes &= ~mg.votemask
                    drop_pkt(p, stage)
                    continue
                try:
                    self.merge_packet(name, fn, names, mask, stage, p)
                except BaseException as exc:    # noqa: BLE001 (raised again by dispatch)
                    self.req_error = exc

    cdef bint merge_idle(self) noexcept nogil:
        # Nothing for the stack to merge or send on until a member or ring moves.
        cdef uint32_t g, j
        cdef mbx_merge *mg
        for g in range(self.ngroups):
            mg = &self.merges[g]
            for j in range(mg.first, mg.last + 1):
                if mbx_ring_count(self.rings[self.nnf + 1 + j]):
                    return False
            if mg.nout and self.hop_room(mg.next):
                return False
        return True

    cdef bint check_deaths(self) noexcept nogil:
        cdef uint32_t k
        cdef int status = 0, r
        cdef bint found = False
        for k in range(self.nnf):
            if self.ctl.procs[k].dead or self.ctl.procs[k].pid <= 0:
                continue
            r = waitpid(self.ctl.procs[k].pid, &status, WNOHANG)
            if r == 0:
                continue
            self.ctl.procs[k].status = status if r > 0 else -1
            self.pidfds[k] = -1
            mbx_store(&self.ctl.procs[k].dead, 1)
            self.plan_restart(k)
            self.recover(k)
            self.deaths += 1
            found = True
        return found

    cdef void pump_one(self, uint32_t k, uint32_t idx) noexcept nogil:
        # Forward a message in dead NF k's place, by its failure policy.  Its packet
        # is in the burst slot of its epoch, which its region names.
        cdef mbx_msg *m = &self.msgs[idx]
        cdef uint16_t t = m.h.type_idx
        cdef mbx_pkt *p
        cdef uint32_t bit = 0
        cdef bint copy = False, unhandled
        if self.member(k):
            bit = (<uint32_t>1) << (k - self.gfirst[k])
            # a message sent to the group (not its own publication): done when its
            # gdone bit says so; only the lead's copy goes on to the merge
            copy = m.h.publisher != k + 1 and k != self.gfirst[k]
            if copy and self.gdone[idx] & bit:
                return
        if copy:
            unhandled = True
        elif m.h.refs != k and m.h.refs != (HANDLED | k):
            return              # already forwarded (met twice around the death)
        else:
            unhandled = m.h.refs == k
        if (not self.policy[k] and unhandled and m.h.pkt != NO_PKT
                and self.sets[k][0][t] != NULL):
            if (not (m.h.flags & MSG_F_SIDED)
                    or (self.set_side[k][0][t] >> (m.h.flags & 3)) & 1):
                if (self.set_filter[k][0][t] == NULL
                        or self.passes(self.set_filter[k][0][t], m)):
                    p = &self.slot_pkts[self.ctl.epoch_slot[self.region_of(idx)]][m.h.pkt]
                    # counted as its drop once per packet it would have seen: not
                    # dropped by an earlier stage (the dispatcher's test), nor by NF
                    # k itself (its bit: its process did, or an earlier message of
                    # the packet was pumped).  A group mate's drop is no reason: the
                    # mates all see the packet, and which got to it first is timing.
                    if (not (p.votes >> k) & 1
                            and (p.verdict != VERDICT_DROP
                                 or p.drop_stage >= self.nf_stage[k])):
                        self.ctl.procs[k].drops += 1
                    self.nf_drop(k, p)      # its vote, in a group that votes
        self.ctl.procs[k].pumped += 1
        if bit:
            mbx_vote(&self.gdone[idx], bit)
        if copy:
            return
        m.h.refs = self.hop_after(k)
        self.pending[k][self.npend[k]] = idx
        self.npend[k] += 1

    cdef void pend_end(self, uint32_t k, uint32_t end) noexcept nogil:
        # An end marker in dead NF k's place: the next one only (a copy a recovery
        # already sent is dropped by its number).
        if (end - self.pend_last[k] - 1) & 0x7FFFFFFF:
            return
        self.pend_last[k] += 1
        self.pending[k][self.npend[k]] = end
        self.npend[k] += 1

    cdef void recover(self, uint32_t k) noexcept nogil:
        # NF k died: take its ring over, and find the messages it held (popped, not
        # yet forwarded: their header still names hop k), in order: by epoch (their
        # region tells which of those in flight), then by position.  It may also
        # have held end markers: each goes back after its epoch's held messages.
        cdef uint32_t n = 0, j, idx, nh = 0, r, ring_ends = 0, first, ranks
        cdef int64_t held_ends
        cdef uint32_t *ring_items
        cdef uint64_t *held
        cdef uint8_t *in_ring
        cdef uint16_t refs, a = self.gfirst[k]
        cdef bint mine
        if self.pending[k] == NULL:
            self.pending[k] = <uint32_t *>malloc((<size_t>self.total + self.ring_size + 64) * 4)
            self.npend[k] = 0
        ring_items = <uint32_t *>malloc(<size_t>self.ring_size * 4)
        held = <uint64_t *>malloc(<size_t>self.total * 8)
        in_ring = <uint8_t *>calloc(self.total, 1)
        if ring_items == NULL or held == NULL or in_ring == NULL or self.pending[k] == NULL:
            free(ring_items)
            free(held)
            free(in_ring)
            return
        # An NF counts an end before it pushes it, so the upstream count may be one
        # ahead of its ring (never behind), and NF k may have died between counting
        # its last end and pushing it: so that end is sent again first (dropped
        # downstream if it got there).
        first = self.ctl.procs[k].epochs + 1
        self.pend_last[k] = first - 1
        if first > 1:
            self.pending[k][self.npend[k]] = MBX_END_BIT | ((first - 1) & 0x7FFFFFFF)
            self.npend[k] += 1
        held_ends = <int64_t>(<int32_t>(self.ends_into(k) - (first - 1)))
        n = mbx_ring_dequeue(self.rings[k], ring_items, self.ring_size)
        self.wake_producer(k)
        for j in range(n):
            if not ring_items[j] & MBX_END_BIT:
                in_ring[ring_items[j]] = 1
            else:
                ring_ends += 1
        held_ends -= ring_ends
        ranks = <uint32_t>max(held_ends, 0)
        for idx in range(self.total):
            if in_ring[idx]:
                continue
            refs = self.msgs[idx].h.refs
            mine = refs == k or refs == (HANDLED | k)
            if (not mine and self.member(k) and k != a and self.msgs[idx].h.publisher != k + 1
                    and (refs == a or refs == (HANDLED | a) or refs == self.nnf + 1 + a)):
                # sent to the group, and this member had not said it was done
                mine = not self.gdone[idx] & ((<uint32_t>1) << (k - a))
            if mine:
                r = (self.region_of(idx) - (first - 1)) & (self.inflight - 1)
                # epoch rank, then burst position (< 2^24), then index
                held[nh] = (((<uint64_t>r) << 56) | ((<uint64_t>self.msgs[idx].h.pos) << 32)
                            | idx)
                nh += 1
                ranks = max(ranks, r + 1)
        qsort(held, nh, 8, mbx_cmp_u64)
        free(in_ring)
        j = 0
        for r in range(ranks):
            while j < nh and (held[j] >> 56) == r:
                self.pump_one(k, <uint32_t>held[j])
                j += 1
            if r < held_ends:
                self.pend_end(k, MBX_END_BIT | ((first + r) & 0x7FFFFFFF))
        for j in range(n):
            if ring_items[j] & MBX_END_BIT:
                self.pend_end(k, ring_items[j])
            else:
                self.pump_one(k, ring_items[j])
        free(ring_items)
        free(held)

    cdef bint pump(self, uint32_t k) noexcept nogil:
        # Dead NF k: drain its ring (room permitting), push what is pending on; its
        # ends count as forwarded once they are in the next ring.
        # Once its restart is due, the ring is taken one entry at a time and left at
        # the start of an epoch, for the new process (restart_ready).
        cdef uint32_t n, j, idx, sent, last
        cdef bint progress = False, restarting = self.restart_wanted(k)
        while (not self.at_boundary[k]
                and self.npend[k] + SCRATCH <= self.total + self.ring_size):
            n = mbx_ring_dequeue(self.rings[k], self.scratch, 1 if restarting else SCRATCH)
            if n == 0:
                break
            progress = True
            self.wake_producer(k)
            for j in range(n):
                idx = self.scratch[j]
                if idx & MBX_END_BIT:
                    last = self.pend_last[k]
                    self.pend_end(k, idx)
                    if restarting and self.pend_last[k] != last:
                        self.at_boundary[k] = 1
                else:
                    self.pump_one(k, idx)
        if self.npend[k]:
            sent = self.hop_enqueue(self.hop_after(k), self.pending[k], self.npend[k])
            if sent:
                progress = True
                for j in range(sent):
                    idx = self.pending[k][j]
                    if (idx & MBX_END_BIT
                            and not (idx - self.ctl.procs[k].epochs - 1) & 0x7FFFFFFF):
                        self.ctl.procs[k].epochs += 1
                memmove(self.pending[k], self.pending[k] + sent, (self.npend[k] - sent) * 4)
                self.npend[k] -= sent
        return progress

    cdef void stack_round(self) noexcept nogil:
        # Close an epoch: name its burst slot, push its messages and end marker to
        # NF 0, and wait until the region the next epoch is built in is free (the
        # epoch K before it complete; with K = 1, this very epoch).
        cdef uint32_t e
        self.ctl.epoch += 1
        e = self.ctl.epoch
        self.ctl.epoch_slot[(e - 1) & (self.inflight - 1)] = self.slot
        if e - self.done_epoch > self.max_ahead:
            self.max_ahead = e - self.done_epoch
        self.out[self.nout] = MBX_END_BIT | (e & 0x7FFFFFFF)
        self.nout += 1
        self.stack_wait(e + 1 - self.inflight)

    cdef void stack_wait(self, uint32_t target) noexcept nogil:
        # Push what is in out (an epoch, its end marker last) and take completions
        # back until epoch `target` is complete.  Meanwhile drain the rings of dead
        # NFs, and watch for deaths.
        cdef uint32_t sent = 0, n, k, spins = 0
        cdef bint progress, idle
        cdef mbx_proc *me = &self.ctl.procs[self.nnf]
        cdef uint64_t t0 = now_ns()
        while True:
            if self.abandoned:
                break
            progress = False
            if sent < self.nout:
                n = self.hop_enqueue(0, self.out + sent, self.nout - sent)
                if n:
                    sent += n
                    progress = True
                    if sent == self.nout:
                        mbx_store(&me.epochs, me.epochs + 1)
                elif self.drop_full:
                    while sent < self.nout - 1:
                        self.ring_drop(self.out[sent], 0)
                        sent += 1
            if self.drain_completions():
                progress = True
            if self.ngroups and self.merge_groups():
                progress = True
            if sent == self.nout and <int32_t>(self.done_epoch - target) >= 0:
                break
            for k in range(self.nnf):
                if self.ctl.procs[k].dead and self.pump(k):
                    progress = True
            if self.may_restart and self.restart_ready():
                progress = True
            if progress:
                spins = 0
                continue
            spins += 1
            if spun(spins, self.spin, self.yields):
                continue
            if self.check_deaths():
                spins = 0
                continue
            if self.requests_pressing():
                with gil:
                    self.take_requests_now()
                spins = 0
                continue
            mbx_sleep_begin(me)
            idle = mbx_ring_count(self.rings[self.nnf]) == 0 and self.merge_idle()
            if idle and sent < self.nout and self.hop_room(0):
                idle = False
            for k in range(self.nnf):
                if self.ctl.procs[k].dead and (
                        mbx_ring_count(self.rings[k]) or self.npend[k]):
                    idle = False
            if not idle:
                mbx_sleep_cancel(me)
                spins = 0
                continue
            mbx_sleep_wait(me, self.pidfds, self.nnf, 20)
            if self.stop_pending():
                break
        self.nout = 0
        me.busy_ns += now_ns() - t0

    cdef bint stop_pending(self) noexcept nogil:
        # Asked to stop while an NF keeps its epoch (a handler that hangs): wait a
        # second for it as for any, then give up on the NFs (abandoned), so the run
        # ends; finish_run then kills what does not leave.
        cdef bint asked
        if self.abandoned:
            return True
        with gil:
            asked = self.stop_asked()
        if not asked:
            return False
        if self.stop_exc is not None:
            self.abandoned = True       # a KeyboardInterrupt: the caller raises it
        elif self.stop_seen_ns == 0:
            self.stop_seen_ns = <int64_t>now_ns()
        elif <int64_t>now_ns() - self.stop_seen_ns > STOP_GRACE_NS:
            self.abandoned = True
        return self.abandoned

    cdef bint stop_asked(self):
        # Python signal handlers run only when this runs Python: let them (the CLI's
        # set the run's stop event), and keep what one raised for the caller.
        try:
            PyErr_CheckSignals()
        except BaseException as exc:
            self.stop_exc = exc
            return True
        if self.stop_deadline_ns and <int64_t>now_ns() >= self.stop_deadline_ns:
            return True
        return self.stop_event is not None and self.stop_event.is_set()

    cdef int raise_stop_exc(self) except -1:
        if self.stop_exc is not None:
            exc, self.stop_exc = self.stop_exc, None
            raise exc
        return 0

    cpdef dispatch(self):
        """The stack's side of a dispatch round: push what this round published to
        the NF processes, and return once the next round's Event Memory is free
        (with one burst in flight: once all of this round completed)."""
        if self.role != self.nnf:
            raise MbxError("dispatch runs in the stack's process")
        if self.nout:
            with nogil:
                self.stack_round()
        self.raise_stop_exc()
        self.apply_requests(self.done_epoch)
        if self.deaths:
            self._report_failures()

    cpdef uint32_t burst_mark(self):
        """The last epoch pushed: the burst just processed is complete with it."""
        return self.ctl.epoch

    cpdef bint burst_done(self, Batch batch, uint32_t mark, bint wait) except -1:
        """Has epoch ``mark`` come back (so every NF is done with ``batch``)?  Then
        it may be sent."""
        cdef uint32_t k
        if self.role != self.nnf:
            raise MbxError("burst_done runs in the stack's process")
        if <int32_t>(self.done_epoch - mark) < 0:
            with nogil:
                if wait:
                    self.stack_wait(mark)
                else:
                    self.drain_completions()
                    if self.ngroups:
                        self.merge_groups()
                    for k in range(self.nnf):
                        if self.ctl.procs[k].dead:
                            self.pump(k)
        self.raise_stop_exc()
        self.apply_requests(self.done_epoch)
        if self.deaths:
            self._report_failures()
        return <int32_t>(self.done_epoch - mark) >= 0

    def _report_failures(self):
        # A dead NF process (its handler's error, a signal, an exit) ends the run when
        # the NF has no failure policy, unless a restart is coming (restart_nf records
        # why it died, or finish_run if the run ends first); every death is recorded
        # in its "deaths".
        cdef uint32_t k
        for k in range(self.nnf):
            if not self.ctl.procs[k].dead or k in self.reported:
                continue
            self.reported.add(k)
            if self.restart_left[k]:
                continue
            reason = self._death_reason(k) + self._not_restarted(k)
            self.restart_log[k].append(reason)
            self.logged.add(k)
            if self.failure_names[k] is None:
                if self.ctl.procs[k].failed:
                    raise _events.NFError(slot_text(self.errors, k, ERROR_SIZE))
                raise _events.NFError(f"NF {self.nfs[k].name}: its process {reason}, "
                                      "and the NF has no failure policy (failure = "
                                      "\"open\" or \"closed\" lets the run go on)")

    # -- restarting a dead NF -------------------------------------------------------

    cdef void plan_restart(self, uint32_t k) noexcept nogil:
        # NF k was just found dead.  A process that did not finish one epoch of its
        # own is not restarted (it fails at start, or on the first events it gets:
        # a restart would only repeat that); otherwise the next restart waits the
        # back-off, doubled at each restart already made.
        cdef uint32_t made
        self.at_boundary[k] = 0
        if not self.restart_left[k]:
            return
        if self.ctl.procs[k].epochs == self.started_epochs[k]:
            self.restart_left[k] = 0
            return
        with gil:
            made = self.restart_made[k]
            self.restart_at[k] = now_ns() + <uint64_t>(
                self.restart_conf[k][1] * 1e9 * (1 << min(made, 20)))

    cdef bint restart_wanted(self, uint32_t k) noexcept nogil:
        return self.restart_left[k] > 0 and now_ns() >= self.restart_at[k]

    cdef bint restart_ready(self) noexcept nogil:
        # Restart each dead NF whose ring the stack left at an epoch's start, once
        # everything it forwarded for it is in the next ring.
        cdef uint32_t k
        cdef bint done = False
        for k in range(self.nnf):
            if (self.ctl.procs[k].dead and self.restart_left[k] and self.at_boundary[k]
                    and self.npend[k] == 0):
                with gil:
                    self.restart_nf(k)
                done = True
        return done

    def restart_nf(self, uint32_t k):
        """Fork a new process for dead NF k, which consumes its ring from the next
        epoch on.  It is forked from this (the stack's) process, whose copy of the NF
        object is the pre-fork one: the dead process's state is lost, as in any
        crash; its counters go on.  Its per-flow subscription changes are lost with
        it, in the stack's tables too, and requests it left unapplied are dropped."""
        cdef mbx_proc *pr = &self.ctl.procs[k]
        self.restart_log[k].append(self._death_reason(k))
        self.logged.discard(k)          # the next process's death is its own entry
        self.restart_left[k] -= 1
        self.restart_made[k] += 1
        self.at_boundary[k] = 0
        self.reported.discard(k)
        while mbx_req_peek(&self.reqs[k]) != NULL:
            mbx_req_pop(&self.reqs[k])
        if self.flow_set[k] != NULL:
            memset(self.flow_set[k], 0, <size_t>self.flow_capacity * 2)
        self.errors[k * ERROR_SIZE] = 0
        pr.failed = 0
        pr.exited = 0                   # a process whose handler raised left cleanly
        pr.status = 0
        self.started_epochs[k] = pr.epochs
        mbx_store(&pr.dead, 0)
        try:
            pid, pidfd = self.spawn(k)
        except BaseException as exc:    # noqa: BLE001 (it stays down, by its policy)
            mbx_store(&pr.dead, 1)
            self.restart_left[k] = 0
            self.restart_made[k] -= 1
            self.restart_log[k].append(f"restart failed: {exc_text(exc)}")
            self.reported.add(k)        # its death is in the log already
            self.logged.add(k)
            return
        pr.pid = pid
        self.pidfds[k] = pidfd
        mbx_wake(pr)

    def _death_reason(self, uint32_t k):
        cdef mbx_proc *pr = &self.ctl.procs[k]
        if pr.failed:
            return slot_text(self.errors, k, ERROR_SIZE)
        if pr.status < 0:
            return "gone (not reaped)"
        code = os.waitstatus_to_exitcode(pr.status)
        if code < 0:
            try:
                return f"killed by {signal.Signals(-code).name}"
            except ValueError:          # a real-time signal has no name
                return f"killed by signal {-code}"
        return f"exited with status {code}"

    def stop_failures(self, int code):
        """The errors of the NF processes that exited with status ``code`` (their
        stop() raised), once finish_run reaped them."""
        cdef uint32_t k
        out = []
        for k in range(self.nnf):
            pr = &self.ctl.procs[k]
            if (pr.dead and pr.failed and pr.status >= 0
                    and os.waitstatus_to_exitcode(pr.status) == code):
                out.append(slot_text(self.errors, k, ERROR_SIZE))
        return out

    def _not_restarted(self, uint32_t k):
        # Why NF k's dead process was not restarted ("" when it has no restarts).
        if not self.restart_conf[k][0]:
            return ""
        if self.restart_left[k]:
            return "; not restarted: the run ended"
        if self.restart_made[k] < self.restart_conf[k][0]:
            return "; not restarted: it died before finishing an epoch"
        return "; not restarted: restart limit reached"

    def _log_end_deaths(self, killed, double timeout):
        # At the run's end: the deaths nothing recorded yet.  A process may die too
        # late for a check to see it (after its last epoch, in stop()), or be seen
        # dead while its restart waited for the back-off or an epoch boundary, which
        # the run's end overtook: each is recorded, and why it was not restarted.
        cdef uint32_t k
        cdef mbx_proc *pr
        for k in range(self.nnf):
            pr = &self.ctl.procs[k]
            if k in self.logged or not (pr.failed or (pr.dead and not pr.exited)):
                continue
            if k in killed:
                reason = (f"{self._death_reason(k)}: it did not stop within "
                          f"{timeout:g} s of the run's end")
            else:
                if pr.epochs == self.started_epochs[k]:
                    # as plan_restart does for a death seen during the run: no
                    # restart for a process that did not finish an epoch
                    self.restart_left[k] = 0
                reason = self._death_reason(k) + self._not_restarted(k)
            self.restart_log[k].append(reason)
            self.logged.add(k)

    def finish_run(self, double timeout=10.0):
        """Stop every NF process (their stop() runs there), reap them, kill any that
        do not leave in time, record the deaths not recorded yet, and fold their
        counters into the bus's."""
        cdef uint32_t k, t
        cdef int status = 0, r
        cdef uint64_t *pub
        if self.abandoned:
            # stopped while an NF held an epoch: it is not coming back soon
            timeout = min(timeout, 1.0)
        mbx_store(&self.ctl.stop, 1)
        for k in range(self.nnf):
            mbx_wake(&self.ctl.procs[k])
        import time
        deadline = time.monotonic() + timeout
        killed = set()
        while True:
            waiting = False
            for k in range(self.nnf):
                if self.ctl.procs[k].dead or self.ctl.procs[k].pid <= 0:
                    continue
                r = waitpid(self.ctl.procs[k].pid, &status, WNOHANG)
                if r == 0:
                    if time.monotonic() > deadline:
                        os.kill(self.ctl.procs[k].pid, signal.SIGKILL)
                        killed.add(k)
                    waiting = True
                    continue
                self.ctl.procs[k].status = status if r > 0 else -1
                self.ctl.procs[k].dead = 1
            if not waiting:
                break
            time.sleep(0.002)
        self._log_end_deaths(killed, timeout)
        for k in range(self.nnf):
            pub = self.typecnt + <size_t>k * TYPE_COUNTS * MAX_TYPES
            for t in range(MAX_TYPES):
                self.per_type_published[t] += pub[t]
                self.per_type_delivered[t] += pub[MAX_TYPES + t]
            self.published += self.ctl.procs[k].published
            self.delivered += self.ctl.procs[k].delivered
        self.folded = True
        for k in range(self.nnf + 1):
            if self.ctl.procs[k].efd > 0:
                os.close(self.ctl.procs[k].efd)
                self.ctl.procs[k].efd = -1

    def counters(self):
        """Events published and delivered, per type name: the stack's and, until
        finish_run folds them in, the NF processes' as they count them (in shared
        memory), so that the live views (``--stats``, ``--prometheus``) see the
        events delivered while the run goes on, not only at its end."""
        cdef uint32_t k, t
        cdef uint64_t *cnt
        if self.folded or self.role != self.nnf:
            return EventBus.counters(self)
        pub = [self.per_type_published[t] for t in range(MAX_TYPES)]
        dlv = [self.per_type_delivered[t] for t in range(MAX_TYPES)]
        for k in range(self.nnf):
            cnt = self.typecnt + <size_t>k * TYPE_COUNTS * MAX_TYPES
            for t in range(MAX_TYPES):
                pub[t] += cnt[t]
                dlv[t] += cnt[MAX_TYPES + t]
        return {ty.name: {"published": pub[ty.idx], "delivered": dlv[ty.idx]}
                for ty in _events.event_types() if pub[ty.idx] or dlv[ty.idx]}

    def pipeline_counters(self):
        """Per NF process and for the rings: what went where."""
        cdef uint32_t k, i
        cdef uint64_t in_use = 0, queued = 0, dropped = 0, published = 0, retired = 0
        cdef mbx_proc *pr
        cdef uint64_t *dlv
        cdef uint64_t *rdr
        nfs = {}
        types = _events.event_types()
        for k in range(self.nnf):
            pr = &self.ctl.procs[k]
            dlv = self.typecnt + <size_t>k * TYPE_COUNTS * MAX_TYPES + MAX_TYPES
            rdr = dlv + MAX_TYPES
            if pr.failed:
                state = "failed"
            elif pr.exited:
                state = "ok"
            elif pr.dead:
                state = "died"
            else:
                state = "running"
            nfs[self.nfs[k].name] = {
                "pid": pr.pid, "state": state, "exit_status": pr.status,
                # None: no policy, so a failure of this NF ends the run
                "failure": self.failure_names[k],
                "events_in": pr.events_in, "delivered": pr.delivered,
                "c_events": pr.c_events, "handler_ns": pr.handler_ns,
                "types": {t.name: dlv[t.idx] for t in types if dlv[t.idx]},
                "published": pr.published, "drops": pr.drops,
                "handler_s": pr.busy_ns * 1e-9,
                # dropped at its ring: neither it nor any NF after it had them
                "ring_dropped": pr.ring_dropped,
                "ring_dropped_pkts": pr.ring_dropped_pkts,
                "ring_dropped_types": {t.name: rdr[t.idx] for t in types if rdr[t.idx]},
                "forwarded_for_it": pr.pumped,
                "retired": pr.retired,
                "restarts": self.restart_made[k],
                "restart_limit": self.restart_conf[k][0],
                "deaths": list(self.restart_log[k]),
                # the members of its parallel group it runs beside (fanned out to)
                "report": (json.loads(slot_text(self.reports, k, REPORT_SIZE))
                           if self.reports[k * REPORT_SIZE] else None),
                "parallel_with": [self.nfs[j].name for j in
                                  range(self.gfirst[k], self.glast[k] + 1) if j != k],
            }
            dropped += pr.ring_dropped
            published += pr.published
            retired += pr.retired
        for i in range(self.total):
            if self.msgs[i].h.refs != DONE:
                in_use += 1
        for k in range(2 * self.nnf + 1):
            if self.rings[k] != NULL:
                queued += mbx_ring_count(self.rings[k])
        # Until finish_run folds the NF processes' publications into the bus's
        # count, it holds the stack's alone.
        total = self.published if self.folded else self.published + published
        stack_published = total - published
        # back on the completion ring, or ended where no NF after took them
        completed = self.completed + retired
        return {
            "nfs": nfs,
            "ring_size": self.ring_size,
            "ring_full": "drop" if self.drop_full else "stall",
            "inflight": self.inflight,
            "max_in_flight": self.max_ahead,
            "stack_wait_s": self.ctl.procs[self.nnf].busy_ns * 1e-9,
            "epochs": self.ctl.epoch,
            "published": total,
            "completed": completed,
            "ring_dropped": dropped,
            # each NF's, added up: a drop is counted at the ring it happened at
            "ring_dropped_pkts": sum(v["ring_dropped_pkts"] for v in nfs.values()),
            "stack_published": stack_published,
            "lost": total - completed - dropped,
            "pool_in_use": in_use,
            "ring_entries": queued,
            "requests": self.requests,
            "requests_early": self.requests_early,
        }

    # -- what NF processes may do: the control path and Stack Memory --------------

    def enable_terminate(self, monitor):
        """Before the fork: the TCP Monitor that FLOW/TCP/TERMINATE from NF processes
        reaches (as the inline deployment's _TerminateSink does)."""
        self.terminator = monitor

    def enter_nf_process(self):
        # After the fork, in an NF's process: the stack's tables are read here,
        # never written (an NF that tries faults in its own process).
        if self.stack_memory is not None:
            self.stack_memory.protect()
        if self.stream_reader is not None:
            self.stream_reader.nf_side = True

    def up_sub(self, uint32_t nf, etype, flow, handler, bint batch, uint8_t smask):
        """mb_up_sub: the NF's own tables change now, and the stack's (which decide
        what it still builds for the flow: events, reassembly) when this epoch
        completes, before the flow's later events."""
        EventBus.up_sub(self, nf, etype, flow, handler, batch, smask)
        cdef mbx_req q
        # From now on the NFs before it pass it everything (taken_from): what they
        # passed on already, up to K - 1 bursts ahead, is as late as the stack's side
        mbx_or(&self.ctl.dynamic, (<uint32_t>1) << nf)
        if self.role >= self.nnf:
            return
        memset(&q, 0, sizeof(q))
        q.kind = MBX_REQ_UP_SUB
        q.type_idx = etype.idx
        q.slot = <uint32_t>(flow & 0xFFFFFFFF)
        q.gen = <uint32_t>(flow >> 32)
        q.subscribed = handler is not None
        q.batch = batch
        q.smask = smask
        self.push_request(&q)

    def publish_from(self, nf, msg):
        """An NF's publication; a FLOW/TCP/TERMINATE also goes to the stack as a
        request (its TCP Monitor sends the RSTs when the epoch completes)."""
        EventBus.publish_from(self, nf, msg)
        cdef mbx_req q
        cdef mbx_msg *m
        if (self.role >= self.nnf or self.terminator is None
                or not msg.etype.is_a(_events.FLOW_TCP_TERMINATE)):
            return
        m = &self.msgs[self.last_pub]
        if m.h.flow == NO_FLOW:
            return
        memset(&q, 0, sizeof(q))
        q.kind = MBX_REQ_TERMINATE
        q.slot = m.h.flow
        q.gen = m.h.flow_gen
        q.pos = m.h.pos
        q.pkt = m.h.pkt
        self.push_request(&q)

    cdef int push_request(self, mbx_req *q) except -1:
        # Into this NF's request ring, tagged with the epoch it handles (one more
        # than the ends it forwarded).  A full ring waits for the stack, which takes
        # requests of the epoch it waits for when a ring fills (requests_pressing).
        cdef mbx_proc *me = &self.ctl.procs[self.role]
        cdef mbx_req_ring *ring = &self.reqs[self.role]
        cdef uint32_t spins = 0
        q.epoch = me.epochs + 1
        with nogil:
            while not mbx_req_push(ring, q):
                if mbx_load(&self.ctl.stop):
                    break
                mbx_wake(&self.ctl.procs[self.nnf])
                spins += 1
                if not spun(spins, SPIN, YIELDS):
                    mbx_sleep_begin(me)
                    if mbx_req_count(ring) < MBX_REQ_SLOTS:
                        mbx_sleep_cancel(me)
                        continue
                    mbx_sleep_wait(me, NULL, 0, 1)
        return 0

    cdef bint requests_pressing(self) noexcept nogil:
        cdef uint32_t k
        for k in range(self.nnf):
            if mbx_req_count(&self.reqs[k]) >= MBX_REQ_SLOTS:
                return True
        return False

    def take_requests_now(self):
        # A request ring is full mid-epoch: the stack builds nothing while it waits,
        # so taking the requests made so far changes only what it builds later, as
        # their epoch's completion would (the NF waits for room otherwise; TERMINATE
        # comes only with one burst in flight, see the module).  Errors wait for
        # dispatch.
        cdef uint64_t before = self.requests
        try:
            self.apply_requests(self.ctl.epoch)
            self.requests_early += self.requests - before
        except BaseException as exc:    # noqa: BLE001 (raised again by dispatch)
            self.req_error = exc

    cdef int apply_requests(self, uint32_t upto) except -1:
        # The requests made in epochs up to upto, in order: each NF's mb_up_sub into
        # the stack's copy of its tables; then the TERMINATEs, by burst position and
        # chain order, as the inline sink takes them, and skipped like there when an
        # NF dropped the packet they came with.
        cdef uint32_t k
        cdef mbx_req *q
        cdef list terminate = []
        if self.req_error is not None:
            exc, self.req_error = self.req_error, None
            raise exc
        types = _events.event_types()
        for k in range(self.nnf):
            while True:
                q = mbx_req_peek(&self.reqs[k])
                if q == NULL or <int32_t>(q.epoch - upto) > 0:
                    break
                flow = q.slot | (<uint64_t>q.gen << 32)
                self.requests += 1
                if q.kind == MBX_REQ_UP_SUB:
                    try:
                        EventBus.up_sub(self, k, types[q.type_idx], flow,
                                        _handled_in_nf_process if q.subscribed else None,
                                        q.batch, q.smask)
                    finally:
                        mbx_req_pop(&self.reqs[k])
                    continue
                if q.kind == MBX_REQ_TERMINATE:
                    terminate.append((q.pos, k, len(terminate), flow, q.pkt))
                mbx_req_pop(&self.reqs[k])
            mbx_wake(&self.ctl.procs[k])
        terminate.sort()
        for pos, _nf, _, flow, pkt in terminate:
            if pkt != NO_PKT and self.pkts[<uint32_t>pkt].verdict == VERDICT_DROP:
                continue
            self.terminator.terminate_flow(flow, pos)
        return 0


cdef inline void *calloc_u32(uint32_t n) noexcept nogil:
    cdef void *p = malloc(max(n, 1) * 4)
    if p != NULL:
        memset(p, 0, max(n, 1) * 4)
    return p
