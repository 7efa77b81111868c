# The pipelined deployment: the stack in one process, each NF in its own, events over
# shared-memory single-producer/single-consumer rings of Event Memory indices.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from mbx._events cimport EventBus, mbx_msg
from mbx._packet cimport Batch, mbx_pkt

cdef extern from *:
    """
    #include <errno.h>
    #include <poll.h>
    #include <sched.h>
    #include <stdint.h>
    #include <string.h>
    #include <unistd.h>

    #define MBX_END_BIT 0x80000000u     /* a ring entry that ends an epoch */
    #define MBX_MAX_PROCS 33            /* MAX_NFS NFs + the stack */
    #define MBX_MAX_INFLIGHT 16         /* bursts (epochs) the stack runs ahead */

    /* One SPSC ring of message indices.  head is the consumer's, tail the
       producer's, each alone on its cache line; entries are published by the
       release store of tail and taken back by the release store of head. */
    typedef struct {
        uint32_t head; uint32_t pad0[15];
        uint32_t tail; uint32_t pad1[15];
        uint32_t size; uint32_t mask; uint32_t pad2[14];
        uint32_t slots[];
    } mbx_ring;

    static inline uint32_t mbx_ring_count(mbx_ring *r) {
        return __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE)
               - __atomic_load_n(&r->head, __ATOMIC_ACQUIRE);
    }
    static inline uint32_t mbx_ring_room(mbx_ring *r) {
        return r->size - mbx_ring_count(r);
    }
    static inline uint32_t mbx_ring_enqueue(mbx_ring *r, const uint32_t *src, uint32_t n) {
        uint32_t tail = __atomic_load_n(&r->tail, __ATOMIC_RELAXED);
        uint32_t head = __atomic_load_n(&r->head, __ATOMIC_ACQUIRE);
        uint32_t room = r->size - (tail - head), i;
        if (n > room) n = room;
        for (i = 0; i < n; i++) r->slots[(tail + i) & r->mask] = src[i];
        __atomic_store_n(&r->tail, tail + n, __ATOMIC_RELEASE);
        return n;
    }
    static inline uint32_t mbx_ring_dequeue(mbx_ring *r, uint32_t *dst, uint32_t max) {
        uint32_t head = __atomic_load_n(&r->head, __ATOMIC_RELAXED);
        uint32_t tail = __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE);
        uint32_t n = tail - head, i;
        if (n > max) n = max;
        for (i = 0; i < n; i++) dst[i] = r->slots[(head + i) & r->mask];
        __atomic_store_n(&r->head, head + n, __ATOMIC_RELEASE);
        return n;
    }

    /* One process of the deployment (an NF, or the stack last): its doorbell, its
       liveness and its counters.  Two cache lines. */
    typedef struct {
        uint32_t sleeping;      /* set before it blocks on its eventfd */
        int32_t efd;
        int32_t pid;
        uint32_t dead;          /* gone: the stack bypasses it by its failure policy */
        uint32_t exited;        /* left at the end of the run, counters final */
        int32_t status;         /* wait status once reaped */
        uint32_t epochs;        /* epoch ends it forwarded */
        uint32_t failed;        /* a handler raised (the text is in the error area) */
        uint64_t events_in, delivered, published, busy_ns;
        /* ring_dropped(_pkts): dropped at its own (input) ring when full, by the
           producer of that ring; the stack's are always 0 (see ring_drop) */
        uint64_t ring_dropped, ring_dropped_pkts, drops, pumped;
        uint64_t c_events;      /* of delivered: to C handlers */
        uint64_t handler_ns;    /* in handlers (when timed), as inline */
        uint64_t retired;       /* done with, not passed on: no NF after it takes them */
        uint8_t pad[8];
    } mbx_proc;

    typedef struct {
        uint32_t stop;
        uint32_t epoch;
        uint32_t dynamic;       /* NFs that called mb_up_sub: they may take any type */
        uint32_t pad[13];
        mbx_proc procs[MBX_MAX_PROCS];
        /* per in-flight epoch region ((epoch - 1) & (inflight - 1)): the burst slot
           its packets are in; written before the epoch's first message is pushed */
        uint32_t epoch_slot[MBX_MAX_INFLIGHT];
    } mbx_ctl;

    static inline uint32_t mbx_load(uint32_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void mbx_store(uint32_t *p, uint32_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    static inline void mbx_or(uint32_t *p, uint32_t v) {
        __atomic_fetch_or(p, v, __ATOMIC_RELEASE);
    }
    static inline void mbx_relax(void) {
    #if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
    #endif
    }
    /* Wake p if it sleeps.  The fence pairs with the one in mbx_sleep_begin: either
       the sleeper sees the work published before this call, or this call sees it
       sleeping (no lost wake-up). */
    static inline void mbx_wake(mbx_proc *p) {
        uint64_t one = 1;
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
        if (__atomic_load_n(&p->sleeping, __ATOMIC_RELAXED)) {
            ssize_t r = write(p->efd, &one, 8);
            (void)r;
        }
    }
    static inline void mbx_sleep_begin(mbx_proc *p) {
        __atomic_store_n(&p->sleeping, 1, __ATOMIC_RELAXED);
        __atomic_thread_fence(__ATOMIC_SEQ_CST);
    }
    static inline void mbx_sleep_cancel(mbx_proc *p) {
        __atomic_store_n(&p->sleeping, 0, __ATOMIC_RELAXED);
    }
    /* Block until woken, one of fds is readable, or timeout_ms passed. */
    static inline void mbx_sleep_wait(mbx_proc *p, const int *fds, int nfds, int timeout_ms) {
        struct pollfd pf[MBX_MAX_PROCS + 1];
        uint64_t v;
        int i, n = 0;
        pf[n].fd = p->efd; pf[n].events = POLLIN; pf[n].revents = 0; n++;
        for (i = 0; i < nfds && n <= MBX_MAX_PROCS; i++) {
            if (fds[i] < 0) continue;
            pf[n].fd = fds[i]; pf[n].events = POLLIN; pf[n].revents = 0; n++;
        }
        if (poll(pf, n, timeout_ms) > 0 && (pf[0].revents & POLLIN)) {
            ssize_t r = read(p->efd, &v, 8);
            (void)r;
        }
        __atomic_store_n(&p->sleeping, 0, __ATOMIC_RELAXED);
    }
    """
    enum:
        MBX_END_BIT
        MBX_MAX_PROCS
        MBX_MAX_INFLIGHT

    ctypedef struct mbx_ring:
        uint32_t size
        uint32_t mask

    ctypedef struct mbx_proc:
        uint32_t sleeping
        int efd
        int pid
        uint32_t dead
        uint32_t exited
        int status
        uint32_t epochs
        uint32_t failed
        uint64_t events_in
        uint64_t delivered
        uint64_t published
        uint64_t busy_ns
        uint64_t ring_dropped
        uint64_t ring_dropped_pkts
        uint64_t drops
        uint64_t pumped
        uint64_t c_events
        uint64_t handler_ns
        uint64_t retired

    ctypedef struct mbx_ctl:
        uint32_t stop
        uint32_t epoch
        uint32_t dynamic
        mbx_proc procs[MBX_MAX_PROCS]
        uint32_t epoch_slot[MBX_MAX_INFLIGHT]

    uint32_t mbx_ring_count(mbx_ring *r) noexcept nogil
    uint32_t mbx_ring_room(mbx_ring *r) noexcept nogil
    uint32_t mbx_ring_enqueue(mbx_ring *r, const uint32_t *src, uint32_t n) noexcept nogil
    uint32_t mbx_ring_dequeue(mbx_ring *r, uint32_t *dst, uint32_t max) noexcept nogil
    uint32_t mbx_load(uint32_t *p) noexcept nogil
    void mbx_store(uint32_t *p, uint32_t v) noexcept nogil
    void mbx_or(uint32_t *p, uint32_t v) noexcept nogil
    void mbx_relax() noexcept nogil
    void mbx_wake(mbx_proc *p) noexcept nogil
    void mbx_sleep_begin(mbx_proc *p) noexcept nogil
    void mbx_sleep_cancel(mbx_proc *p) noexcept nogil
    void mbx_sleep_wait(mbx_proc *p, const int *fds, int nfds, int timeout_ms) noexcept nogil


# The control path from NF processes to the stack (paper §4.2: NFs change stack state
# only by events): one SPSC ring of requests per NF, after the burst in the mapping.
# An NF pushes a request (its mb_up_sub for a flow, the FLOW/TCP/TERMINATE it
# published) tagged with the epoch it handles; the stack applies the requests of an
# epoch when that epoch completes, before it builds anything later, so a flow's
# later events follow them, whatever number of epochs is in flight.
cdef extern from *:
    """
    #define MBX_REQ_SLOTS 1024          /* requests one NF may leave per epoch */
    enum { MBX_REQ_UP_SUB = 1, MBX_REQ_TERMINATE = 2 };

    typedef struct {            /* 32 bytes */
        uint32_t epoch;         /* made while handling this epoch */
        uint16_t kind;          /* MBX_REQ_* */
        uint16_t type_idx;      /* UP_SUB: the type */
        uint32_t slot;          /* the flow (slot, generation) */
        uint32_t gen;
        uint32_t pos;           /* TERMINATE: burst position of the event */
        uint32_t pkt;           /* TERMINATE: its packet, or NO_PKT */
        uint8_t subscribed;     /* UP_SUB: a handler (1) or None (0) */
        uint8_t batch;
        uint8_t smask;          /* UP_SUB: the side mask */
        uint8_t pad[5];
    } mbx_req;

    typedef struct {
        uint32_t head; uint32_t pad0[15];
        uint32_t tail; uint32_t pad1[15];
        mbx_req slots[MBX_REQ_SLOTS];
    } mbx_req_ring;

    static inline int mbx_req_push(mbx_req_ring *r, const mbx_req *q) {
        uint32_t tail = __atomic_load_n(&r->tail, __ATOMIC_RELAXED);
        if (tail - __atomic_load_n(&r->head, __ATOMIC_ACQUIRE) >= MBX_REQ_SLOTS)
            return 0;
        r->slots[tail % MBX_REQ_SLOTS] = *q;
        __atomic_store_n(&r->tail, tail + 1, __ATOMIC_RELEASE);
        return 1;
    }
    /* The oldest request, left in place (the stack takes it only once its epoch
       is complete), or NULL. */
    static inline mbx_req *mbx_req_peek(mbx_req_ring *r) {
        uint32_t head = __atomic_load_n(&r->head, __ATOMIC_RELAXED);
        if (head == __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE)) return NULL;
        return &r->slots[head % MBX_REQ_SLOTS];
    }
    static inline void mbx_req_pop(mbx_req_ring *r) {
        __atomic_store_n(&r->head, r->head + 1, __ATOMIC_RELEASE);
    }
    static inline uint32_t mbx_req_count(mbx_req_ring *r) {
        return __atomic_load_n(&r->tail, __ATOMIC_ACQUIRE)
               - __atomic_load_n(&r->head, __ATOMIC_ACQUIRE);
    }
    """
    enum:
        MBX_REQ_SLOTS
        MBX_REQ_UP_SUB
        MBX_REQ_TERMINATE

    ctypedef struct mbx_req:
        uint32_t epoch
        uint16_t kind
        uint16_t type_idx
        uint32_t slot
        uint32_t gen
        uint32_t pos
        uint32_t pkt
        uint8_t subscribed
        uint8_t batch
        uint8_t smask

    ctypedef struct mbx_req_ring:
        pass

    int mbx_req_push(mbx_req_ring *r, const mbx_req *q) noexcept nogil
    mbx_req *mbx_req_peek(mbx_req_ring *r) noexcept nogil
    void mbx_req_pop(mbx_req_ring *r) noexcept nogil
    uint32_t mbx_req_count(mbx_req_ring *r) noexcept nogil


# The stack's merge of one parallel group (NFs first..last): what its members sent
# back, per epoch region, until every member has ended that epoch; then the epoch
# goes on to the next hop, sorted as the chain would have ordered it.
ctypedef struct mbx_merge:
    uint32_t first
    uint32_t last
    uint32_t next               # the ring after the group (the next stage's, or nnf)
    uint32_t votemask           # its members' vote bits, when a merge function decides
    uint32_t fn                 # 1 + its index in EventBus.fn_groups, or 0
    uint32_t flushed            # the last epoch sent on
    uint32_t *count             # per region: entries kept
    uint64_t *keys              # per region: (position, class, sequence) of each
    uint32_t *idx               # per region, by sequence: the message
    uint32_t *out               # sent on when the next ring has room
    uint32_t nout


cdef class PipeBus(EventBus):
    cdef readonly uint32_t role         # the NF this process runs, or nnf: the stack
    cdef readonly uint32_t total        # messages in the shared pool
    cdef readonly uint32_t stack_share  # the stack's messages: [0, stack_share)
    cdef readonly uint32_t nf_share     # each NF's, for its publications, after those
    cdef uint32_t nf_used
    cdef object shm                     # the mapping everything below lives in
    cdef uint8_t *base
    cdef mbx_ctl *ctl
    cdef char *errors                   # per NF: the text of the error that ended it
    cdef char *reports                  # per NF: its report() as JSON, when it ended
    cdef uint64_t *typecnt              # per NF: published, delivered, ring_dropped
    #                                     [MAX_TYPES] each
    cdef bint folded                    # finish_run added the NF processes' counts in
    cdef mbx_ring **rings               # ring k feeds NF k; ring nnf is the completion ring
    cdef readonly uint32_t ring_size
    cdef readonly bint drop_full        # a full ring drops (counted) instead of stalling
    cdef uint32_t *out                  # indices waiting to be pushed downstream
    cdef uint32_t nout
    cdef uint32_t *scratch
    cdef uint8_t *policy                # per NF: 1 fail open, 0 closed
    cdef uint32_t **pending             # per dead NF: what the stack forwards for it
    cdef uint32_t *npend
    cdef uint32_t *pend_last            # per dead NF: the last end marker it forwarded
    cdef int *pidfds
    cdef uint32_t *fmask                # per message: NFs a filter kept it from (shared)
    cdef bint any_filter
    cdef uint32_t *takers               # per type: NFs whose sub() take it (before the fork)
    cdef uint32_t last_pub              # the message publish() took last
    cdef readonly uint32_t inflight     # K: epochs (and bursts) in flight, a power of two
    cdef uint32_t stack_region          # the stack's messages per epoch region (share / K)
    cdef uint32_t nf_region             # each NF's, per epoch region (nf_share / K)
    cdef mbx_pkt **slot_pkts            # per burst slot: its descriptors (shared)
    cdef object batches                 # the K Batch objects over the burst slots
    cdef uint32_t slot                  # the burst slot of the epoch being built/handled
    cdef uint32_t done_epoch            # the stack: last epoch whose end marker returned
    cdef bint need_slot                 # an NF: look the next epoch's burst slot up
    cdef readonly uint32_t max_ahead    # the stack: most epochs seen in flight at once
    cdef uint32_t deaths                # the stack: NF processes found dead
    cdef uint32_t spin                  # polls before yielding, then yields before
    cdef uint32_t yields                # blocking (fewer with more processes than cores)
    cdef object failure_names           # per NF: "open", "closed" or None (as given)
    cdef object reported                # NFs whose failure was reported
    cdef object logged                  # NFs whose last process's death is in restart_log
    cdef readonly uint64_t completed
    cdef uint32_t maxpos
    # the control path (see mbx_req_ring)
    cdef mbx_req_ring *reqs             # per NF, in the mapping after the burst
    cdef object terminator              # the TCP Monitor, when NFs may terminate flows
    cdef object req_error               # an error kept for dispatch to raise (applying
    #                                     requests mid-epoch, a group's merge function)
    cdef public object stack_memory     # StackMemory: mapped read-only in NF processes
    cdef readonly uint64_t requests     # requests applied (mb_up_sub, TERMINATE)
    cdef readonly uint64_t requests_early   # ... taken before their epoch completed
    # optional restart of a dead NF (see restart_nf)
    cdef uint32_t *restart_left         # per NF: restarts it may still have
    cdef uint64_t *restart_at           # per NF: not before this (now_ns), the back-off
    cdef uint32_t *started_epochs       # per NF: its epoch count when this process began
    cdef uint8_t *at_boundary           # per dead NF: its ring stops at an epoch's start
    cdef bint may_restart               # some NF has restarts left
    cdef object restart_conf            # per NF: (limit, back-off s)
    cdef object restart_log             # per NF: [death reasons], restarted or not
    cdef object restart_made            # per NF: restarts made
    cdef public object spawn            # spawn(k) -> (pid, pidfd): forks NF k again
    # the stack: the run's stop request (anything with is_set()); an NF that never
    # finishes its epoch must not keep a stopped run waiting (stack_wait gives up)
    cdef public object stop_event
    # ... and the run's --duration, as a CLOCK_MONOTONIC time in ns (0: none): the
    # stack's own deadline is looked at between bursts, never while it waits here
    cdef public int64_t stop_deadline_ns
    cdef int64_t stop_seen_ns           # when stack_wait first saw it (0: not yet)
    cdef readonly bint abandoned        # stack_wait gave up on the NFs: the run is ending
    cdef object stop_exc                # an exception a signal handler raised meanwhile
    # parallel groups (see the module): the fan-out and the stack's merge
    cdef uint32_t *gfirst               # per NF: the first and last NF of its stage
    cdef uint32_t *glast                # (itself, outside a group of two or more)
    cdef uint32_t *gdone                # per message: the group members done with it (shared)
    cdef uint32_t *mends                # the stack, per member: ends taken from its merge ring
    cdef uint32_t *hop_ends             # the stack, per ring after a group: ends it pushed
    cdef mbx_merge *merges              # the stack: per group, its merge state
    cdef uint32_t ngroups

    cdef inline mbx_proc *proc(self, uint32_t k) noexcept nogil
    cdef void wake_consumer(self, uint32_t r) noexcept nogil
    cdef void wake_producer(self, uint32_t r) noexcept nogil
    cdef void ring_drop(self, uint32_t idx, uint32_t r) noexcept nogil
    cdef void push_out(self, uint32_t r, mbx_proc *me, bint from_stack) noexcept nogil
    cdef bint drain_completions(self) noexcept nogil
    cdef bint pump(self, uint32_t k) noexcept nogil
    cdef void pump_one(self, uint32_t k, uint32_t idx) noexcept nogil
    cdef void pend_end(self, uint32_t k, uint32_t end) noexcept nogil
    cdef uint32_t region_of(self, uint32_t idx) noexcept nogil
    cdef bint check_deaths(self) noexcept nogil
    cdef void recover(self, uint32_t k) noexcept nogil
    cdef void stack_round(self) noexcept nogil
    cdef void stack_wait(self, uint32_t target) noexcept nogil
    cdef bint stop_pending(self) noexcept nogil
    cdef bint stop_asked(self)
    cdef int raise_stop_exc(self) except -1
    cdef void filter_mask(self, mbx_msg *m, uint32_t first) noexcept nogil
    cdef bint taken_from(self, mbx_msg *m, uint32_t h) noexcept nogil
    cdef uint32_t wait_input(self, uint32_t k, uint32_t *buf, uint32_t n) noexcept nogil
    cdef int deliver(self, uint32_t k, object nf, uint32_t limit) except -1
    cdef int push_request(self, mbx_req *q) except -1
    cdef bint requests_pressing(self) noexcept nogil
    cdef int apply_requests(self, uint32_t upto) except -1
    cdef void plan_restart(self, uint32_t k) noexcept nogil
    cdef bint restart_wanted(self, uint32_t k) noexcept nogil
    cdef bint restart_ready(self) noexcept nogil
    cdef inline bint member(self, uint32_t k) noexcept nogil
    cdef uint32_t hop_after(self, uint32_t k) noexcept nogil
    cdef uint32_t hop_room(self, uint32_t r) noexcept nogil
    cdef uint32_t hop_enqueue(self, uint32_t r, uint32_t *src, uint32_t n) noexcept nogil
    cdef uint32_t ends_into(self, uint32_t r) noexcept nogil
    cdef bint merge_groups(self) noexcept nogil
    cdef void merge_decide(self, mbx_merge *mg, uint32_t start, uint32_t region) noexcept nogil
    cdef bint merge_idle(self) noexcept nogil
