# The TCP Monitor μStack (paper §5): twin TCP state for every TCP flow, optional
# bidirectional reassembly for the flows some NF wants bytes of, snapshots in every
# TCP event, and the connection summary behind `mbx flows`.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from mbx._events cimport mbx_msg
from mbx._flow cimport mbx_flow
from mbx._packet cimport Batch, Port, mbx_pkt
from mbx._stack cimport NetworkLayer
from mbx._stream cimport StreamPool, mbx_stream
from mbx._tcp cimport tcp_conn


cdef extern from "openssl/sha.h" nogil:
    ctypedef struct SHA256_CTX:
        pass
    int SHA256_Init(SHA256_CTX *c)
    int SHA256_Update(SHA256_CTX *c, const void *data, size_t n)
    int SHA256_Final(unsigned char *md, SHA256_CTX *c)


cdef enum:
    NO_PAIR = 0xFFFFFFFF
    # conn_mark bits
    MARK_KILLED = 1         # an NF terminated the connection: drop what follows
    MARK_INIT0 = 2          # stream of flow dir 0 initialised
    MARK_INIT1 = 4          # stream of flow dir 1 initialised
    MARK_HI0 = 8            # sent_hi[0] holds what flow dir 0 was seen sending
    MARK_HI1 = 16           # sent_hi[1] likewise
    MARK_DONE = 32          # closed by FINs: its streams are freed, nothing more comes
    MARK_SYN0 = 64          # what became of flow dir 0's SYN data is decided (see held)
    MARK_SYN1 = 128         # likewise for flow dir 1


# Per flow slot, beside its tcp_conn: one small record, so a packet costs one cache
# miss here, not one per field.
ctypedef struct conn_meta:
    uint32_t gen            # flow generation conns[slot] belongs to (0: none)
    uint32_t pair           # its stream pair + 1 (0: none)
    # by flow dir: the end of the sequence space its acceptable segments covered
    # (SYN and payload; a pure ACK's seq too), so what it was seen sending.  An ACK
    # skips a hole only up to there: it cannot make a gap of bytes not yet seen.
    uint32_t sent_hi[2]
    uint8_t mark            # MARK_* bits
    uint8_t pad[3]


# What `mbx flows` keeps per connection while it runs (allocated on its first
# packet, freed when it is summarised).
ctypedef struct conn_sum:
    SHA256_CTX sha[2]       # by flow dir
    uint64_t len[2]
    uint64_t pkts[2]
    uint64_t first_pkt      # packet number of its first segment: the output order
    uint8_t close           # 1: a FIN was seen, 2: a RST was seen

# A finished connection, as `mbx flows` prints it.
ctypedef struct conn_record:
    uint8_t cli[16]
    uint8_t srv[16]
    uint16_t cli_port
    uint16_t srv_port
    uint8_t ip_ver
    uint8_t handshake
    uint8_t close
    uint8_t pad
    uint16_t vlan[2]        # the flow key's VLAN ids (0: none, or not keyed by them)
    uint64_t c2s_len
    uint64_t s2c_len
    uint64_t pkts_c2s
    uint64_t pkts_s2c
    uint64_t first_pkt
    unsigned char c2s_sha[32]
    unsigned char s2c_sha[32]


cdef class TcpMonitor(NetworkLayer):
    cdef tcp_conn *conns            # Stack Memory: one per flow slot
    cdef conn_meta *meta            # the Monitor's bookkeeping, one per flow slot
    cdef mbx_stream *streams        # 2 per pair, by flow dir
    # 2 per pair, by flow dir: the data of its SYN (or SYN+ACK), held out of the
    # stream until the receiver is known to have taken it (syn_decide)
    cdef mbx_stream *held
    # 2 per pair, by flow dir: data refused as starting on or past its receiver's
    # right edge as last seen, held until that receiver's ACK shows it took it
    # (edge_take) or the sender sends those bytes again in the window
    cdef mbx_stream *edge
    # 2 per pair, by flow dir: the first and the end sequence numbers of what edge
    # was given, bytes the pool refused included (edge starts at the stream's
    # frontier, before them all: segments held in any order meet there as in the
    # stream itself); the ACK that takes them skips up to edge_hi, so that refused
    # bytes become a GAP
    cdef uint32_t *edge_lo
    cdef uint32_t *edge_hi
    cdef uint32_t *free_pairs
    cdef uint32_t n_free_pairs
    cdef readonly uint32_t max_pairs
    cdef readonly StreamPool pool
    cdef uint8_t policy
    cdef uint32_t *touched          # pairs whose frontier moved this burst
    cdef uint8_t *touched_mark      # 1: touched; 3: and its flow ended (free at burst end)
    # 2 per pair, by flow dir, valid while the pair is touched: the frontier when it
    # was first touched this burst; bytes from there on have DATA_RDY readers still
    cdef uint64_t *round_from
    cdef uint64_t *pair_owner       # per pair: slot | gen << 32 of its flow
    cdef uint8_t *pair_cdir         # per pair whose flow ended: its client's flow dir
    cdef uint32_t n_touched
    cdef uint32_t capacity
    cdef conn_sum **sums            # per flow slot, when summarising
    cdef bint summarise
    cdef conn_record *records
    cdef size_t n_records
    cdef size_t records_cap
    cdef uint64_t pkt_no
    cdef Batch inject               # frames the Monitor sends itself (RSTs)
    # per burst position: the connection's state right after that packet, and whose
    # (slot | gen << 32), so a TERMINATE uses the state as of its event
    cdef tcp_conn *after
    cdef uint64_t *after_flow
    cdef uint32_t after_cap
    cdef public bint terminable     # an NF publishes FLOW/TCP/TERMINATE
    cdef object stack_memory        # the shared arena the tables are in (None: heap)
    cdef bint shared_tables         # they are: freed with it, not one by one
    # This copy runs in an NF process (pipelined): only what is in Stack Memory is
    # current here, the object's own fields are as of the fork; it only reads.
    cdef public bint nf_side
    cdef Batch current
    # counters
    cdef readonly uint64_t tcp_pkts
    cdef readonly uint64_t tcp_unparsed
    cdef readonly uint64_t tcp_header_cut   # of those: the TCP header cut short (trunc_l4)
    cdef readonly bint verify_checksums     # checksums="verify"
    cdef readonly uint64_t bad_checksums    # segments left out for a wrong checksum
    cdef readonly uint64_t unverifiable     # segments it could not check (cut, offloaded)
    cdef readonly uint64_t cut_segments     # payload cut short by the capture (snaplen)
    cdef readonly uint64_t connections
    cdef readonly uint64_t new_connections
    cdef readonly uint64_t pairs_exhausted
    cdef readonly uint64_t streams_opened
    cdef readonly uint64_t gaps
    cdef readonly uint64_t gap_bytes
    # of those: the bytes a snaplen cut off a segment seen on the wire
    cdef readonly uint64_t cut_gaps
    cdef readonly uint64_t cut_gap_bytes
    cdef readonly uint64_t conflicts
    cdef readonly uint64_t memcaps
    cdef readonly uint64_t memcaps_pieces  # of those: STREAM_MAX_OOO pieces held already
    cdef readonly uint64_t memcaps_streams  # of those: no stream free (max_streams in use)
    cdef readonly uint64_t memcaps_window   # of those: beyond the stream's window
    cdef readonly uint64_t after_close      # segments with payload after a FIN close
    cdef readonly uint64_t after_fin        # segments with payload beyond their sender's FIN
    cdef readonly uint64_t syn_data_dropped  # SYN data bytes no receiver took
    cdef readonly uint64_t edge_data_dropped  # bytes held past the window's edge no ACK took
    cdef readonly uint64_t rst_sent
    cdef readonly uint64_t killed_drops
    cdef readonly uint64_t summary_oom    # connections left out: no memory for theirs
    cdef readonly uint64_t summary_held   # streams that ended with bytes behind a hole

    cdef void prefetch(self, mbx_pkt *p) noexcept nogil
    cdef void conn_start(self, uint32_t slot, mbx_pkt *p) noexcept nogil
    cdef uint32_t restart(self, Batch batch, mbx_pkt *p) noexcept nogil
    cdef void free_pair(self, uint32_t slot) noexcept nogil
    cdef void free_pair_streams(self, uint32_t pair) noexcept nogil
    cdef void release_touched(self) noexcept nogil
    cdef void detach_pair(self, uint32_t slot) noexcept nogil
    cdef void close_streams(self, uint32_t slot) noexcept nogil
    cdef uint32_t get_pair(self, uint32_t slot) noexcept nogil
    cdef void publish_pkt_tcp(self, uint16_t t, mbx_pkt *p, uint32_t slot, uint8_t tdir,
                              uint8_t flags, tcp_conn *c) noexcept nogil
    cdef mbx_msg *flow_tcp_msg(self, uint16_t t, mbx_pkt *p, uint32_t slot, uint8_t flags,
                               tcp_conn *c) noexcept nogil
    cdef void stream_work(self, Batch batch, mbx_pkt *p, uint32_t slot, tcp_conn *c,
                          uint32_t sbits) noexcept nogil
    cdef void skip_holes(self, mbx_pkt *p, uint32_t slot, tcp_conn *c, uint32_t pair,
                         uint8_t o, uint32_t upto, bint cut) noexcept nogil
    cdef void data_ready(self, mbx_pkt *p, uint32_t slot, tcp_conn *c, uint32_t pair,
                         uint8_t d, uint64_t old_frontier) noexcept nogil
    cdef void add_flags(self, mbx_pkt *p, uint32_t slot, tcp_conn *c, mbx_stream *s,
                        uint8_t d, int fl, uint32_t seq, uint32_t n) noexcept nogil
    cdef void syn_hold(self, mbx_pkt *p, uint32_t slot, tcp_conn *c, uint32_t pair,
                       uint32_t seq) noexcept nogil
    cdef void syn_decide(self, mbx_pkt *p, uint32_t slot, tcp_conn *c, uint32_t pair,
                         uint8_t d, uint32_t upto, bint whole) noexcept nogil
    cdef void take_held(self, mbx_pkt *p, uint32_t slot, tcp_conn *c, uint32_t pair,
                        uint8_t d, mbx_stream *h, uint64_t keep) noexcept nogil
    cdef void edge_hold(self, mbx_pkt *p, uint32_t slot, tcp_conn *c, uint32_t pair,
                        uint32_t seq) noexcept nogil
    cdef uint64_t edge_held_bytes(self, uint32_t k) noexcept nogil
    cdef void edge_resent(self, mbx_pkt *p, uint32_t slot, tcp_conn *c, uint32_t pair,
                          uint32_t seq, uint32_t n) noexcept nogil
    cdef void edge_take(self, mbx_pkt *p, uint32_t slot, tcp_conn *c, uint32_t pair,
                        uint8_t d) noexcept nogil
    cdef void summary_packet(self, uint32_t slot, mbx_pkt *p) noexcept nogil
    cdef void summary_end(self, uint32_t slot, const mbx_flow *f) noexcept nogil
    cdef int craft_rst(self, const mbx_pkt *tmpl, tcp_conn *c, uint8_t from_dir,
                       int64_t ts_ns) except -1
    cdef uint64_t frontier_of(self, uint32_t slot, uint8_t d) noexcept nogil
    cdef bint wants_stream(self, uint32_t slot, mbx_pkt *p, uint8_t tdir) noexcept nogil
    cdef int _read_part(self, const mbx_stream *s, uint64_t off, uint64_t n,
                        uint64_t run_from, uint64_t run_to,
                        const uint8_t **ptr) noexcept nogil
    cdef mbx_stream *_stream(self, uint32_t slot, uint32_t gen, uint8_t tdir,
                             uint8_t flags) except NULL
    cdef mbx_stream *_ended_stream(self, uint32_t slot, uint32_t gen, uint8_t tdir,
                                   int cdir) except NULL
    cdef mbx_stream *_ended_pair_stream(self, uint32_t p, uint8_t tdir,
                                        int cdir) except NULL
    cdef uint64_t _patch_packets(self, uint32_t slot, uint32_t gen, uint8_t d,
                                 mbx_stream *s, uint64_t off,
                                 const uint8_t[::1] new) except? 0xFFFFFFFFFFFFFFFF
