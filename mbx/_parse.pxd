# The one packet parser of the project, and IP fragment reassembly.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from mbx._packet cimport Batch, mbx_pkt

# Parses L2..L4 of p.data[0:p.caplen] into p's fields; sets and returns p.status
# (a ParseStatus).  Never reads outside the frame, whatever the bytes say.
# Conventions the rest of the stack can rely on:
# - the parser fields are zeroed first (PKT_F_REASSEMBLED survives), so it can run
#   again on the same descriptor; fields learnt before a malformation stay filled
#   (addresses before BAD_IHL, ports before BAD_TCP_OFF, options before BAD_TCP_OPT,
#   the ports of a TCP/UDP header cut short when its first 4 bytes were captured);
# - a lying header (a length past wirelen or past the enclosing length) is BAD_*, a
#   short capture (past caplen only) is TRUNC_*;
# - up to MAX_VLAN_TAGS VLAN tags are stepped over (nvlan counts them, vlan holds
#   the outer two ids); more: PARSE_TOO_MANY_VLAN_TAGS, ethertype = the TPID past
#   the bound (forwarded untouched rather than counted as malformed);
# - a fragment (PKT_F_FRAGMENT): l4_proto is set, l4_off = 0, ports 0, and
#   payload_off/payload_len are the fragment's data, which is what FragTable copies;
# - Authentication Headers (IPv4 and IPv6) are walked like IPv6 extension headers:
#   l4_proto, l4_off and the ports are the transport's inside them;
# - ICMP errors: payload_off is the quoted packet; transport fields stay 0;
# - other transports (SCTP, GRE, ESP, ...): payload_off = l4_off; SCTP's ports are
#   read as TCP's and UDP's are (its flows keyed by them).
cdef int parse_packet(mbx_pkt *p) noexcept nogil

# The most fragments a datagram may come in; one with more is dropped (counted,
# FragTable.too_many).  Each fragment is checked against the pieces already held, so
# the cap bounds that work.  Generous: a 64 KiB datagram is 45 fragments at a
# 1,500-byte MTU, 52 at IPv6's minimum of 1,280, 119 at IPv4's minimum datagram of
# 576 bytes; FreeBSD allows 16 (net.inet.ip.maxfragsperpacket).
cdef enum:
    FRAG_MAX_PIECES = 128

cdef enum DefragResult:
    DEFRAG_NONE = 0     # not a fragment: nothing to do
    DEFRAG_HELD = 1     # fragment kept; p.verdict = VERDICT_HELD, no further processing
    DEFRAG_DONE = 2     # p now holds the whole datagram (in the batch arena), re-parsed
    DEFRAG_DROP = 3     # fragment refused (p.status says why); p.verdict = VERDICT_DROP
    DEFRAG_NO_ROOM = 4  # p holds the whole datagram, re-parsed, but outside the batch
    #                     (its arena was full): it cannot go out.  The caller drops it
    #                     with drop_no_room, or leaves it to the stack owning its flow
# NONE is also returned for a fragment that was captured short (PKT_F_TRUNCATED):
# it can never be rebuilt, so it goes on as it is.  DROP with PARSE_BAD_FRAG takes
# the whole pending datagram with it (overlap with different bytes, a piece past the
# known end, a non-last piece not a multiple of 8, a datagram over 65535 bytes, more
# than FRAG_MAX_PIECES pieces);
# DROP with PARSE_FRAG_MEMCAP means the byte budget or the datagram slots ran out
# (the pending datagram is dropped too: it could never complete).

# One held fragment: its bytes follow the struct in the same allocation, so a
# fragment costs one malloc and is charged to the budget in one piece.
cdef struct frag_piece:
    frag_piece *next        # next piece by offset (the list stays sorted)
    uint32_t off            # byte offset in the fragmentable part
    uint32_t length

# A datagram being reassembled.  Slots live in one preallocated array; a free slot
# has used == 0 and sits on the free list through hnext.
ctypedef struct frag_dgram:
    uint8_t src[16]
    uint8_t dst[16]
    uint16_t vlan[2]        # the outer two VLAN ids (part of the key: see _lookup)
    uint32_t ident
    uint32_t hash
    uint32_t hnext          # next slot in the bucket chain / free list
    uint8_t ver
    uint8_t proto           # IPv4 protocol (part of the key); IPv6: 0
    uint8_t used
    uint8_t counted         # its datagram counters are this table's (see defrag)
    uint16_t npieces        # pieces held (at most FRAG_MAX_PIECES)
    uint32_t nheld          # fragments counted in `held` for it (duplicates too)
    int32_t end             # fragmentable length once the last fragment came; -1 before
    uint32_t piece_max      # the longest fragment payload held (what the sender chose)
    int64_t first_ns        # arrival of the first fragment: the timeout runs from here
    frag_piece *pieces
    uint8_t *head           # first fragment's L2 + IP headers (up to its data), or NULL
    uint32_t head_len
    uint32_t l3_off         # IP header offset in head
    size_t charged          # bytes charged to the table's budget

# IPv4 and IPv6 fragment reassembly with bounded memory and a timeout.
cdef class FragTable:
    cdef readonly uint64_t held             # fragments accepted into a pending datagram
    # ... and where each went: held = held_completed + held_discarded + held_pending
    cdef readonly uint64_t held_completed   # into a datagram rebuilt
    cdef readonly uint64_t held_discarded   # dropped with their datagram (any reason)
    cdef readonly uint64_t held_pending     # still waiting for the rest of theirs
    cdef readonly uint64_t completed        # datagrams rebuilt
    cdef readonly uint64_t timed_out        # datagrams abandoned at the timeout
    cdef readonly uint64_t pending_at_end   # datagrams still incomplete when the input
    #                                         ended (end_all), before their timeout
    cdef readonly uint64_t memcap_drops     # fragments refused for lack of memory
    cdef readonly uint64_t bad              # fragments refused as malformed/overlapping
    cdef readonly uint64_t no_room          # datagrams rebuilt but with no room in their
    #                                         burst's arena to go out (drop_no_room)
    cdef readonly uint64_t too_many         # datagrams dropped at a fragment past
    #                                         FRAG_MAX_PIECES
    cdef readonly size_t max_bytes          # budget for held fragment bytes + bookkeeping
    cdef readonly uint32_t max_datagrams
    cdef readonly int64_t timeout_ns
    cdef readonly size_t bytes_used
    cdef readonly uint32_t pending          # datagrams waiting for more fragments
    cdef frag_dgram *dgrams
    cdef uint32_t *buckets
    cdef uint32_t bucket_mask
    cdef uint32_t free_head
    cdef uint32_t seed
    cdef Batch _scratch                     # push() only: the Python test/tool path
    cdef bint counting                      # the fragment in hand counts here (defrag)
    cdef uint8_t *spill                     # a datagram rebuilt where its burst had no room

    # counted=False: reassemble the fragment but leave it out of the counters (a
    # parallel stack that rebuilds every datagram, but counts only the fragments
    # whose addresses pick it; the datagram's counters follow its first fragment,
    # but for no_room: the stack that drops the datagram counts it, drop_no_room).
    cdef int defrag(self, Batch batch, mbx_pkt *p, bint counted=*) noexcept nogil
    # Abandons datagrams idle for longer than the timeout; returns how many.
    cdef int expire(self, int64_t now_ns) noexcept nogil
    # Abandons every pending datagram at the end of the input; returns how many.
    cdef int end_all(self) noexcept nogil

    cdef uint32_t _lookup(self, mbx_pkt *p, bint create) noexcept nogil
    cdef void _release(self, uint32_t slot) noexcept nogil
    cdef int _refuse(self, mbx_pkt *p, uint32_t slot, int status) noexcept nogil
    cdef int _rebuild(self, Batch batch, mbx_pkt *p, uint32_t slot) noexcept nogil
    # Drops the datagram of a DEFRAG_NO_ROOM (counted: no_room); returns DEFRAG_DROP.
    cdef int drop_no_room(self, mbx_pkt *p) noexcept nogil
    cdef void _free_all(self) noexcept nogil
