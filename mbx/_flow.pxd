# The flow table (Stack Memory): canonical 5-tuple keys, a symmetric hash,
# fixed capacity, per-flow stats, idle expiry and a policy for when it is full.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from mbx._packet cimport mbx_pkt

cdef enum FlowStatus:
    FLOW_FREE = 0
    FLOW_ACTIVE = 1
    FLOW_EXPIRED = 2

cdef enum FlowEndReason:
    END_NONE = 0
    END_IDLE = 1        # idle timeout
    END_EVICTED = 2     # table full, oldest idle flow evicted for a new one
    END_SHUTDOWN = 3    # end of input / stack shutdown
    END_CLOSED = 4      # a protocol stack declared the flow over (TCP close)

cdef enum FullPolicy:
    FULL_EVICT_OLDEST = 0
    FULL_REFUSE = 1

# Canonical key: endpoint a is the smaller (address, port) of the two, so both
# directions of a connection give the same key and the same hash.
ctypedef struct mbx_flow_key:
    uint8_t a[16]
    uint8_t b[16]
    uint16_t a_port
    uint16_t b_port
    uint8_t proto
    uint8_t ip_ver
    uint8_t pad[2]

ctypedef struct mbx_flow:
    mbx_flow_key key
    uint32_t hash
    uint32_t gen            # bumped each time the slot is reused: (slot, gen) names a flow
    uint32_t hnext          # next slot in the hash chain (NO_FLOW ends it)
    uint32_t lru_prev       # idle order, least recently active first
    uint32_t lru_next
    uint32_t want           # event classes some NF still wants for this flow (stack-owned)
    uint8_t status          # FlowStatus
    uint8_t init_side       # canonical side (0: a, 1: b) that sent the first packet
    uint8_t end_reason      # FlowEndReason once ended
    uint8_t pad
    uint64_t pkts[2]        # [0] initiator -> responder, [1] responder -> initiator
    uint64_t bytes[2]       # wire bytes, same directions
    int64_t first_ns
    int64_t last_ns

cdef class FlowTable:
    cdef mbx_flow *flows
    cdef uint32_t *buckets
    cdef uint32_t bucket_mask
    cdef uint32_t free_head
    cdef uint32_t lru_head
    cdef uint32_t lru_tail
    cdef readonly uint32_t capacity
    cdef readonly uint32_t active
    cdef readonly int64_t idle_timeout_ns
    cdef readonly int policy
    # Final records of flows that ended (expired, evicted, shut down), in order;
    # the stack publishes FLOW/END for each and then calls clear_ended().
    cdef mbx_flow *ended
    cdef uint32_t *ended_slot
    cdef readonly uint32_t n_ended
    cdef uint32_t ended_cap
    cdef readonly bint created_last     # the last lookup() created its flow
    cdef readonly uint64_t lookups
    cdef readonly uint64_t created
    cdef readonly uint64_t expired
    cdef readonly uint64_t evicted
    cdef readonly uint64_t refused

    # Finds or creates p's flow; fills p.hash, p.flow, p.flow_gen and p.dir and
    # counts the packet.  NO_FLOW when p is not IP or the table refused it.
    cdef uint32_t lookup(self, mbx_pkt *p) noexcept nogil
    # Ends flows idle since before now_ns - timeout, oldest first, while the ended
    # list has room; returns how many ended.
    cdef int expire(self, int64_t now_ns) noexcept nogil
    # Ends every active flow (reason END_SHUTDOWN) while the ended list has room.
    cdef int end_all(self) noexcept nogil
    # Ends one flow now (e.g. TCP close) if the ended list has room; 0 when it had none.
    cdef int end_flow(self, uint32_t slot, uint8_t reason) noexcept nogil
    cdef void clear_ended(self) noexcept nogil
