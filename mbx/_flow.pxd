# The flow table (Stack Memory): canonical 5-tuple keys, a symmetric hash,
# fixed capacity, per-flow stats, idle expiry and a policy for when it is full.
cimport cython
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

from mbx._packet cimport PARSE_BAD_IP_LEN, PARSE_OK, PARSE_TRUNC_L4, mbx_pkt

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
# directions of a connection give the same key and the same hash.  The outer two
# VLAN ids (0: untagged) make the same 5-tuple in two VLANs, two address spaces
# that overlap on a trunk, two flows, as Suricata (vlan.use-for-tracking) and Zeek
# key them.  Both directions of a connection cross a trunk with the same tags;
# where they do not (router on a stick: the client's side in one VLAN, the
# server's in another), the flow table is made with VLAN keying off and the ids
# stay 0.
ctypedef struct mbx_flow_key:
    uint8_t a[16]
    uint8_t b[16]
    uint16_t a_port
    uint16_t b_port
    uint8_t proto
    uint8_t ip_ver
    uint8_t pad[2]
    # past the five hashed words (flow_key_hash): compared, not hashed
    uint16_t vlan[2]

# Does the table track p?  Parse statuses below PARSE_BAD_IP_LEN fail before the
# addresses are read.  A malformed packet whose parse stopped before its transport
# header (l4_off is still 0: a bad IP option, a total length shorter than the
# header, an IPv6 extension chain or IPv4 AH past the datagram) is not tracked
# whatever its l4_proto: that may be an extension header's number, not the
# transport's, and no ports were read.  Nor is a TCP, UDP or SCTP header cut before
# its ports (TRUNC_L4, or BAD_IP_LEN when the IP length lies).  Keyed 0:0, every
# connection between two hosts so malformed would be counted as one flow.
cdef inline bint flow_trackable(const mbx_pkt *p) noexcept nogil:
    if p.ip_ver == 0 or (p.status != PARSE_OK and p.status < PARSE_BAD_IP_LEN):
        return False
    return p.status == PARSE_OK or not (
        p.l4_off == 0
        or ((p.l4_proto == 6 or p.l4_proto == 17 or p.l4_proto == 132)
            and (p.l4_off + 4 > p.caplen or p.l4_off + 4 > p.l3_off + p.ip_len)))

# Builds p's canonical key into k and returns p's side (0: p's source is endpoint a);
# with_vlan: the parser's outer two VLAN ids go in the key, else 0s (the table's
# vlan_keyed; the hash is the same either way).  Inline here so the stack and a
# software-RSS dispatcher key packets exactly as the table does, without a call
# across modules.
cdef inline uint8_t flow_key_of(const mbx_pkt *p, mbx_flow_key *k,
                                bint with_vlan) noexcept nogil:
    cdef int c = memcmp(p.src.b, p.dst.b, 16)
    cdef uint8_t side = 1 if (c > 0 or (c == 0 and p.sport > p.dport)) else 0
    if side == 0:
        memcpy(k.a, p.src.b, 16)
        memcpy(k.b, p.dst.b, 16)
        k.a_port = p.sport
        k.b_port = p.dport
    else:
        memcpy(k.a, p.dst.b, 16)
        memcpy(k.b, p.src.b, 16)
        k.a_port = p.dport
        k.b_port = p.sport
    k.proto = p.l4_proto
    k.ip_ver = p.ip_ver
    # The pad bytes take part in hashing and memcmp, so they must be zero.
    k.pad[0] = 0
    k.pad[1] = 0
    # (a branch the same way for every packet of a table: predicted)
    if with_vlan:
        k.vlan[0] = p.vlan[0]       # the parser left both 0 on an untagged frame
        k.vlan[1] = p.vlan[1]
    else:
        k.vlan[0] = 0
        k.vlan[1] = 0
    return side

# Symmetric because the key is canonical.  Multiply/xor-shift over the key's first
# five 8-byte words (the addresses, ports and protocol), then the murmur3 fmix64
# finalizer so the low bits (bucket index) and the high bits (the stack index under
# software RSS) depend on every bit of them.  The seed is fixed, not per process:
# stack processes must agree on it.
#
# The VLAN ids are left out of the hash (the key comparison tells the VLANs apart).
# Software RSS picks a flow's stack by this hash, and so it needs no VLAN: both
# directions of a flow carry the same tags, so they meet on one stack either way;
# the same 5-tuple in two VLANs, two flows, just lands on one stack and in one
# bucket chain, which is correct.  A flow whose directions cross in different VLANs
# (vlan_keyed off) still meets on one stack, and the RSS walk and the table keep one
# hash whatever the option says.
cdef inline uint32_t flow_hash_words(const uint64_t *w) noexcept nogil:
    cdef uint64_t h = 0x6a09e667f3bcc909ULL
    cdef int i
    for i in range(5):
        h = (h ^ w[i]) * 0x9e3779b97f4a7c15ULL
        h ^= h >> 32
    h ^= h >> 33
    h *= 0xff51afd7ed558ccdULL
    h ^= h >> 33
    h *= 0xc4ceb9fe1a85ec53ULL
    h ^= h >> 33
    return <uint32_t>h

cdef inline uint32_t flow_key_hash(const mbx_flow_key *k) noexcept nogil:
    cdef uint64_t w[5]
    # memcpy, not a cast: the key is only 2-byte aligned inside other structs.
    # The first 40 bytes: the VLAN ids after them are not hashed (above).
    memcpy(w, k, 40)
    return flow_hash_words(w)

ctypedef struct mbx_flow:
    mbx_flow_key key
    uint32_t hash
    uint32_t gen            # bumped each time the slot is reused: (slot, gen) names a flow
    uint32_t hnext          # next slot in the hash chain (NO_FLOW ends it)
    uint32_t lru_prev       # idle order, least recently active first
    uint32_t lru_next
    uint32_t want           # event classes some NF still wants for this flow (stack-owned)
    uint8_t status          # FlowStatus
    uint8_t init_side       # canonical side (0: a, 1: b) that opened the flow
    uint8_t end_reason      # FlowEndReason once ended
    uint8_t pad
    uint64_t pkts[2]        # [0] initiator -> responder, [1] responder -> initiator
    uint64_t bytes[2]       # wire bytes, same directions
    int64_t first_ns
    int64_t last_ns


# final: other extensions call lookup() per packet, and a final class lets Cython
# call its C methods directly instead of through the vtable.
# The flow's endpoints with the one on canonical side ``side`` (0: key.a, 1: key.b)
# as the client: its address and port, then the other's.
cdef inline void flow_endpoints(const mbx_flow *f, int side, uint8_t *cli, uint8_t *srv,
                                uint16_t *cli_port, uint16_t *srv_port) noexcept nogil:
    if side == 0:
        memcpy(cli, f.key.a, 16)
        memcpy(srv, f.key.b, 16)
        cli_port[0] = f.key.a_port
        srv_port[0] = f.key.b_port
    else:
        memcpy(cli, f.key.b, 16)
        memcpy(srv, f.key.a, 16)
        cli_port[0] = f.key.b_port
        srv_port[0] = f.key.a_port


cdef inline void flow_count(mbx_flow *f, const mbx_pkt *p) noexcept nogil:
    f.pkts[p.dir] += 1
    f.bytes[p.dir] += p.wirelen


# A key's VLAN ids for people (flow records, `mbx flows`)
cdef list vlan_ids(const uint16_t *vlan)


@cython.final
cdef class FlowTable:
    cdef mbx_flow *flows
    cdef uint32_t *buckets
    cdef uint32_t bucket_mask
    cdef uint32_t free_head
    cdef uint32_t next_unused      # slots from here on were never used
    cdef uint32_t lru_head
    cdef uint32_t lru_tail
    cdef readonly uint32_t capacity
    cdef readonly uint32_t active
    cdef readonly int64_t idle_timeout_ns
    # A step back of the input's clock longer than this is taken as one (clock_take):
    # the idle timeout, and at least a second (timestamps merged from several
    # interfaces may be out of order by that much)
    cdef readonly int64_t clock_step_ns
    cdef readonly int policy
    # The parser's outer two VLAN ids are part of each flow's key (flow_key_of)
    cdef readonly bint vlan_keyed
    # Final records of flows that ended (expired, evicted, shut down), in order;
    # the stack publishes FLOW/END for each and then calls clear_ended().
    cdef mbx_flow *ended
    cdef uint32_t *ended_slot
    cdef int64_t *ended_ns          # when each ended: the evicting packet's time, ...
    cdef int64_t clock_ns           # ... the time of the packet being looked up (or
    #                                 the time expire() was given)
    cdef readonly uint32_t n_ended
    cdef uint32_t ended_cap
    cdef object stack_memory        # the shared arena the arrays are in (None: heap)
    cdef bint shared_tables         # they are: freed with it, not one by one
    cdef readonly bint created_last     # the last lookup() created its flow
    # the last lookup()'s flow's last_ns before that packet (the packet's own time
    # for a flow it created): when its previous packet came
    cdef readonly int64_t last_before
    # The caller counts packets itself (flow_count) when it handles each one, so
    # an event built for a packet sees the counters as of that packet even when
    # its chunk was looked up together (lookup_burst).
    cdef public bint defer_count
    # lookup_burst's packets looked up so far: a flow one of them touched, found idle
    # by a later one, ends only once the caller has handled them (see split)
    cdef mbx_pkt **guard
    cdef int guard_n
    cdef bint split
    cdef readonly uint64_t lookups
    cdef readonly uint64_t created
    cdef readonly uint64_t expired
    cdef readonly uint64_t evicted
    cdef readonly uint64_t closed       # ended by their transport (TCP close, restart)
    cdef readonly uint64_t shut         # ended at the end of the input
    cdef readonly uint64_t refused

    # Finds or creates p's flow; fills p.hash, p.flow, p.flow_gen and p.dir and
    # counts the packet.  NO_FLOW when p is not IP or the table refused it.
    cdef uint32_t lookup(self, mbx_pkt *p) noexcept nogil
    # The same as lookup() on each of pkts[0:n] in order, with the cache misses of
    # neighbouring packets overlapped.  created[i] (if created is not NULL) is set to
    # whether pkts[i] created its flow, before[i] (if before is not NULL) to its
    # flow's last_before (the lookups of a chunk move last_ns past the packets
    # handled later, one by one).  Returns how many packets it looked up: all
    # n, or fewer when a packet finds its flow idle past the timeout while an
    # earlier packet of the same call touched it (that flow's FLOW/END must follow
    # those packets' events): the caller handles those and calls again for the rest.
    cdef int lookup_burst(self, mbx_pkt **pkts, int n, uint8_t *created,
                          int64_t *before) noexcept nogil
    # Ends flows idle since before now_ns - timeout, oldest first, while the ended
    # list has room; returns how many ended.
    cdef int expire(self, int64_t now_ns) noexcept nogil
    # Ends every active flow (reason END_SHUTDOWN) while the ended list has room.
    cdef int end_all(self) noexcept nogil
    # Ends one flow now (e.g. TCP close) if the ended list has room; 0 when it had none.
    cdef int end_flow(self, uint32_t slot, uint8_t reason) noexcept nogil
    cdef void clear_ended(self) noexcept nogil

    # Internals (declared here because the class is declared here).
    cdef size_t mem_bytes               # everything allocated at construction
    cdef void _lru_unlink(self, uint32_t slot) noexcept nogil
    cdef void _lru_append(self, uint32_t slot) noexcept nogil
    cdef void _finish(self, uint32_t slot, uint8_t reason) noexcept nogil
    cdef uint32_t _untracked(self, mbx_pkt *p) noexcept nogil
    cdef bint _touched_in_burst(self, uint32_t slot, uint32_t gen) noexcept nogil
    cdef uint32_t _lookup_keyed(self, mbx_pkt *p, const mbx_flow_key *k, uint8_t side,
                                uint32_t h) noexcept nogil
