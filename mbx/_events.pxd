# μEvents: the type hierarchy, fixed-size messages in Event Memory, per-NF input
# queues, subscriptions (with per-flow overrides) and the dispatcher.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from mbx._packet cimport Batch, mbx_pkt

cdef enum:
    LEVEL_BITS = 8          # each level of a type path owns 8 bits of the id
    MAX_DEPTH = 8           # so a 64-bit id holds 8 levels of 255 children each
    MAX_TYPES = 1024        # registered types (dense index)
    MAX_NFS = 32
    MSG_BODY_SIZE = 128
    NO_PKT = 0xFFFFFFFF
    SNAPSHOT_SIZE = 24      # room for the TCP Monitor's stack snapshot (<= 23 used)
    PUBLISHER_STACK = 0
    NO_RING = 0xFFFFFFFF
    # mbx_msg_hdr.flags: a sided TCP event (bit 0: from the server's stack, else the
    # client's; bit 1: a receiver-side update, else the sender's)
    MSG_F_SERVER = 0x01
    MSG_F_RECEIVER = 0x02
    MSG_F_SIDED = 0x80
    # The TCP client's flow direction when the Monitor published the event (bit 3,
    # valid with bit 2): a stream read maps the event's stream_dir (0: from the
    # client) to the flow's streams as they were then, though a later segment of the
    # burst (a SYN+ACK seen after data) may have turned the client around.
    MSG_F_CDIR_KNOWN = 0x04
    MSG_F_CDIR1 = 0x08

cdef enum:
    FAN_UNSIDED = 4     # mbx_msg_hdr.flags & 3 index the sided combinations
    FAN_CHECK = 5
    FAN_N = 6

cdef extern from *:
    """
    /* Set bit in *word and return it after; atomic, as the members of a parallel
       group (their drop votes, their replies) write from their own processes in
       the pipelined deployment. */
    static inline uint32_t mbx_vote(uint32_t *word, uint32_t bit) {
        return __atomic_or_fetch(word, bit, __ATOMIC_ACQ_REL);
    }
    """
    uint32_t mbx_vote(uint32_t *word, uint32_t bit) noexcept nogil

# One cache line: what every event has.  A type's own fields follow in body, a
# child type's fields after its parent's, so a handler for X reads X/Y unchanged.
ctypedef struct mbx_msg_hdr:
    uint64_t type_id        # hierarchical id (see EventType)
    int64_t ts_ns           # time of the event (the packet's capture time)
    uint32_t flow           # flow slot or NO_FLOW
    uint32_t flow_gen       # generation of that slot: (flow, flow_gen) names the flow
    uint32_t pkt            # packet reference (index in the burst) or NO_PKT
    uint32_t pos            # the burst position (packet index) that caused it
    uint16_t type_idx       # dense index of the type in the registry
    uint16_t publisher      # 0: a μStack; NFs from 1
    uint16_t refs           # NF queues still holding this message
    uint8_t dir             # direction of the packet within its flow
    uint8_t flags
    uint8_t snapshot[SNAPSHOT_SIZE]

ctypedef struct mbx_msg:
    mbx_msg_hdr h
    uint8_t body[MSG_BODY_SIZE]

# The body of every EVENT/FLOW message: the flow's identity and counters as of the
# event, copied, so FLOW/END stays readable after the slot is reused.
ctypedef struct flow_body:
    uint8_t ip_ver
    uint8_t proto
    uint8_t end_reason
    uint8_t pad
    uint16_t cli_port
    uint16_t srv_port
    uint8_t cli_addr[16]
    uint8_t srv_addr[16]
    uint64_t pkts_c2s
    uint64_t pkts_s2c
    uint64_t bytes_c2s
    uint64_t bytes_s2c
    int64_t first_ns
    int64_t last_ns
    # the flow key's VLAN ids (0: none; always 0 with vlan_in_flow_key off), named
    # as Zeek's conn.log names them
    uint16_t vlan           # the outer tag's
    uint16_t inner_vlan     # QinQ: the inner tag's
    uint32_t pad2

# The body of every EVENT/PKT message: the headers most NFs look at, copied so a
# batch handler's numpy view has them; the bytes stay in the packet.
ctypedef struct pkt_body:
    uint32_t caplen
    uint32_t wirelen
    uint16_t sport
    uint16_t dport
    uint8_t proto
    uint8_t ip_ver
    uint8_t tcp_flags
    uint8_t status
    uint8_t src[16]
    uint8_t dst[16]

# PKT/TCP: the PKT fields, then the TCP header's.
ctypedef struct pkt_tcp_body:
    pkt_body pkt
    uint32_t seq
    uint32_t ack
    uint32_t win            # as sent (unscaled)
    uint32_t payload_len

# Every message header is filled here, whoever allocates the message (the inline
# bus, the pipelined one).
cdef inline void msg_header(mbx_msg *m, uint16_t type_idx, uint64_t type_id,
                            int64_t ts_ns, uint32_t flow, uint32_t gen, uint32_t pkt,
                            uint8_t dir, uint16_t publisher, uint32_t pos,
                            uint16_t refs) noexcept nogil:
    m.h.type_id = type_id
    m.h.ts_ns = ts_ns
    m.h.flow = flow
    m.h.flow_gen = gen
    m.h.pkt = pkt
    m.h.pos = pos
    m.h.type_idx = type_idx
    m.h.publisher = publisher
    m.h.refs = refs
    m.h.dir = dir
    m.h.flags = 0


# FLOW/TCP and its children: the FLOW fields (oriented by the TCP client), then
# these; each child type uses the fields that concern it.
# The 8-byte fields first and the bytes after them, packed: FLOW/TCP ends at 118
# bytes, so that a child type of an NF's still has room for a u64 field.
ctypedef struct flow_tcp_body:
    flow_body flow
    uint64_t offset         # GAP, OVERLAP_CONFLICT, MEMCAP: stream offset
    uint64_t length         # GAP: bytes skipped; MEMCAP: bytes dropped
    uint8_t state_cli       # TcpState of the client and the server
    uint8_t state_srv
    uint8_t side            # 0: both/none, 1: the client's stack, 2: the server's
    uint8_t reason          # TERMINATE: 1 fin, 2 rst, 3 an NF asked
    uint8_t stream_dir      # the stream concerned: 0 client -> server, 1 back
    uint8_t policy          # OVERLAP_CONFLICT: 0 first, 1 last
    uint8_t old_state       # STATE: the side's state before and after
    uint8_t new_state

ctypedef struct data_rdy_body:
    uint64_t offset         # first new byte
    uint64_t frontier       # end of the delivered stream (offset + length)
    uint32_t length
    uint8_t stream_dir      # 0: client -> server, 1: server -> client

# Built-in type indices (registered first, in this order, by _events).
cdef enum BuiltinType:
    T_EVENT = 0
    T_PKT = 1
    T_FLOW = 2
    T_FLOW_START = 3
    T_FLOW_END = 4
    T_PKT_TCP = 5
    T_PKT_TCP_SYN = 6
    T_PKT_TCP_FIN = 7
    T_PKT_TCP_RST = 8
    T_PKT_TCP_RETRANSMISSION = 9
    T_FLOW_TCP = 10
    T_FLOW_TCP_START = 11
    T_FLOW_TCP_ESTABLISHED = 12
    T_FLOW_TCP_STATE = 13
    T_FLOW_TCP_TERMINATE = 14
    T_FLOW_TCP_GAP = 15
    T_FLOW_TCP_OVERLAP_CONFLICT = 16
    T_FLOW_TCP_MEMCAP = 17
    T_DATA_RDY = 18
    T_BUILTIN_N = 19

# A subscription filter, compiled from an application file (paper §3.4: "dst_port =
# 80" routes the Splicer's FLOW_REQ to the HTTP load balancer).  Empty lists match
# anything; a message matches when every non-empty list has a match.
cdef enum:
    FILTER_MAX_PREFIXES = 8
    FILTER_MAX_PORT_RANGES = 16

ctypedef struct mbx_filter:
    uint8_t proto                   # 0: any
    uint8_t n_src
    uint8_t n_dst
    uint8_t n_sport
    uint8_t n_dport
    uint8_t src_ver[FILTER_MAX_PREFIXES]
    uint8_t src_bits[FILTER_MAX_PREFIXES]
    uint8_t src[FILTER_MAX_PREFIXES][16]
    uint8_t dst_ver[FILTER_MAX_PREFIXES]
    uint8_t dst_bits[FILTER_MAX_PREFIXES]
    uint8_t dst[FILTER_MAX_PREFIXES][16]
    uint16_t sport_lo[FILTER_MAX_PORT_RANGES]
    uint16_t sport_hi[FILTER_MAX_PORT_RANGES]
    uint16_t dport_lo[FILTER_MAX_PORT_RANGES]
    uint16_t dport_hi[FILTER_MAX_PORT_RANGES]

# A handler in C (a Cython NF's, see mbx/cnf.pxd): called by the dispatcher without
# Python objects, on the message and its packet (NULL for events without one).  The
# verdict: 0 (MBX_PASS) passes, anything else drops the packet (MBX_DROP, 1).
ctypedef int (*mbx_c_handler)(void *ctx, const mbx_msg *m, mbx_pkt *p) noexcept nogil

ctypedef struct mbx_chandler:
    mbx_c_handler fn
    void *ctx

# The Python face of a C handler: NF.sub and up_sub take it like a callable; the
# bus's tables point at its mbx_chandler (the bus keeps the object alive).
cdef class CHandler:
    cdef mbx_chandler c
    cdef readonly object owner      # keeps whatever ctx points into alive
    cdef readonly str name

# A CHandler for fn(ctx, ...); owner is kept alive as long as the handler is.
cdef CHandler chandler(mbx_c_handler fn, void *ctx, object owner=*, str name=*)

cdef enum:
    MBX_PASS = 0
    MBX_DROP = 1

ctypedef mbx_chandler *c_entry
ctypedef c_entry *c_table         # type index -> C handler (NULL: a Python one or none)
ctypedef void **handler_table     # type index -> PyObject* handler (NULL: none)
ctypedef mbx_filter *filter_ptr
ctypedef filter_ptr *filter_table  # type index -> filter (NULL: none)

cdef class EventBus:
    cdef mbx_msg *msgs
    cdef bint msgs_shared           # msgs is shared memory a deployment owns (not freed)
    cdef readonly uint32_t msg_capacity
    cdef uint32_t msg_used
    cdef uint32_t nnf
    cdef uint32_t *queues           # 2 rings per NF (stack events, NF publications)
    cdef uint32_t *qhead
    cdef uint32_t *qtail
    # handler tables: for each NF, a list of handler sets; a set maps type index to
    # a handler (PyObject*, NULL = not subscribed) resolved through the hierarchy.
    cdef handler_table **sets       # sets[nf][set]
    # the same shape: 1 + the subscribed type's index where the handler takes
    # batches, else 0
    cdef uint16_t ***set_batch
    cdef uint8_t ***set_side        # the same shape: 4-bit side mask (see SIDES)
    cdef filter_table **set_filter  # the same shape: a filter or NULL
    cdef c_table **set_c            # the same shape: the C handler, or NULL
    cdef uint8_t *nf_has_c          # per NF: some set of it has a C handler
    cdef uint8_t nf_has_py[MAX_NFS]  # per NF: some set of it has a Python handler
    # bit i: NF i declared writes=True when the run started; what its rewrites are
    # checked against (nf.writes set during the run would let a read-only NF, even a
    # parallel group's, rewrite packets its group mates are reading)
    cdef uint32_t nf_writes
    # threading.get_ident() of the thread that built the bus, which dispatches (and,
    # pipelined, of the NF process's, forked from it): an Event's methods called
    # from another thread act on whatever event its reused view is handed by then
    cdef unsigned long thread_id
    cdef uint8_t *nf_stage          # per NF: its chain stage (parallel NFs share one)
    # per NF: 0 when its drop is the packet's (any drop wins), else the chain-index
    # bits of its parallel group, whose every member must drop (merge = "all")
    cdef uint32_t *nf_votemask
    # per NF: 1 + the index in fn_groups of its group when a merge function decides
    # it (its drop is then only a vote), else 0; per such group: votes not decided
    cdef uint8_t *nf_fngroup
    cdef uint32_t *fn_pending
    cdef object fn_groups
    cdef uint32_t *nsets
    cdef uint16_t **flow_set        # per NF, per flow slot: handler set (0 = default)
    cdef uint32_t **flow_set_gen
    cdef uint32_t flow_capacity
    cdef readonly uint64_t global_want    # bit t: some NF wants built-in type t at all
    cdef uint8_t want_side[64]       # per built-in type: the union of its side masks
    # per type, FAN_N words: for each side combination (FAN_UNSIDED: unsided) the NFs
    # taking it whatever the flow, and (FAN_CHECK) those whose tables publish must
    # ask per message (per-flow sets, a filter); see plan_fanout
    cdef uint32_t *fan
    cdef Batch batch                # the burst whose packets events reference
    cdef mbx_pkt *pkts              # its descriptors
    cdef readonly object nfs        # list of NF, in chain order
    cdef object set_keys            # per NF: {frozen mapping: set index}
    cdef object set_maps            # per NF: [mapping] (type idx -> (handler, batch))
    cdef object keep                # strong refs to every handler in the tables
    cdef object views               # per NF: a reused Event view
    cdef object stage               # numpy buffer for batch handlers
    cdef mbx_msg *stage_buf         # its memory
    cdef object np                  # numpy, imported when a batch handler first runs
    cdef object stage_views         # per type idx, per length: typed numpy view of stage
    cdef object flowtable           # the stack's FlowTable (for want masks and lookups)
    cdef uint32_t *taken            # scratch for batch runs
    cdef bint ordered               # dispatch in per-packet waves (see dispatch)
    # per message: 1 when it is not for the NF draining it (the pipelined deployment:
    # a filter said so when it was published); NULL inline, where publish decides
    cdef uint8_t *skip
    cdef readonly uint64_t published
    cdef readonly uint64_t delivered
    cdef uint64_t *per_type_published
    cdef uint64_t *per_type_delivered
    # per NF: events delivered (to C handlers among them), drops asked for, ns spent
    # in handlers; per NF and type: events delivered (nnf * MAX_TYPES)
    cdef uint64_t *nf_events
    cdef uint64_t *nf_c_events
    cdef uint64_t *nf_drops
    cdef uint64_t *nf_ns
    cdef uint64_t *nf_type_events
    cdef bint timed                 # clock the handlers (the ``timing`` property)
    # Ring sharing (plan_rings): per NF, how many NFs after it take their events
    # from its ring (0: none), and whether it takes its own from an earlier NF's;
    # the bits of the NFs publish enqueues to; replan: plan again once the rings
    # are empty (an mb_up_sub split a sharing group)
    cdef uint8_t nf_sharers[MAX_NFS]
    cdef uint8_t nf_shares[MAX_NFS]
    cdef uint32_t ring_mask
    cdef bint replan
    cdef bint may_share             # False in the pipelined deployment (PipeBus)
    cdef object current_nf
    cdef object current_msg_idx
    cdef bint closed
    cdef public object stream_reader  # the TCP Monitor, for Event.read/write
    # (μStack name, the EventTypes it and the NFs publish) in this run, or None:
    # mb_up_sub refuses a type none of them can deliver
    cdef public object offered

    # Does any NF want type_idx for this flow?  (cheap: the stack asks before it builds)
    cdef bint wants(self, uint16_t type_idx, uint32_t flow, uint32_t gen,
                    uint8_t flags) noexcept nogil
    # A new message of the given type, header filled; NULL when Event Memory is full
    # (the caller dispatches and retries).
    cdef mbx_msg *new_msg(self, uint16_t type_idx, uint64_t type_id, int64_t ts_ns,
                          uint32_t flow, uint32_t gen, uint32_t pkt, uint8_t dir,
                          uint16_t publisher, uint32_t pos) noexcept nogil
    # Enqueue m to every NF subscribed to it for its flow; frees it when none is.
    cdef void publish(self, mbx_msg *m) noexcept nogil
    cdef uint32_t handler_set(self, uint32_t nf, uint32_t flow, uint32_t gen) noexcept nogil
    cpdef dispatch(self)
    cdef void reset_pool(self) noexcept nogil
    # A burst's completion: a mark taken after its last dispatch, then asked (or
    # waited for) until every NF is done with it (inline: at once).
    cpdef uint32_t burst_mark(self)
    cpdef bint burst_done(self, Batch batch, uint32_t mark, bint wait) except -1
    cdef void attach_batch(self, Batch batch)
    cdef uint32_t _add_set(self, uint32_t nf, dict mapping) except? 0xFFFFFFFF
    cdef void want_set(self, uint32_t nf, uint32_t s) noexcept
    cdef void plan_fanout(self, uint32_t nf) noexcept
    cdef void plan_rings(self) noexcept nogil
    cdef void release(self, mbx_msg *m) noexcept nogil
    cdef bint nf_drop(self, uint32_t i, mbx_pkt *p) noexcept nogil
    # NF i's handler raised on an event of packet p (NULL: none): what becomes of p
    cdef void handler_failed(self, uint32_t i, mbx_pkt *p) noexcept nogil
    cdef int merge_votes(self, uint32_t g) except -1
    cdef int merge_packet(self, object group, object fn, dict names, uint32_t mask,
                          uint8_t stage, mbx_pkt *p) except -1
    cdef bint passes(self, const mbx_filter *f, const mbx_msg *m) noexcept nogil
    cdef uint32_t next_ring(self, uint32_t i, uint32_t limit) noexcept nogil
    cdef uint32_t pop(self, uint32_t r) noexcept nogil
    cdef _drain(self, uint32_t i, uint32_t limit)
    cdef void _run_cs(self, uint32_t first, uint32_t end, uint32_t limit) noexcept nogil
    cdef void _run_c_timed(self, uint32_t i, uint32_t limit) noexcept nogil
    cdef uint32_t _run_c(self, uint32_t i, uint32_t limit) noexcept nogil
    cdef uint32_t _run_shared(self, uint32_t lead, uint32_t end, uint32_t limit) noexcept nogil
    cdef _make_stage(self)
    cdef _run_batch(self, uint32_t i, uint32_t first, void *h, uint16_t bt, uint32_t limit)
