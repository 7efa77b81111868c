"""The TCP Monitor μStack: twin TCP state, frontier reassembly, snapshots, TCP events.

It extends the Network Layer: after a TCP packet's flow lookup, ``transport`` runs
the sender-side and then the receiver-side update of the connection's twin state
(``_tcp``), publishes the events of each side that some NF wants (PKT/TCP/*,
FLOW/TCP/*), and, for the flows whose bytes some NF wants (DATA_RDY) or that
``mbx flows`` summarises, adds the payload to that direction's stream (``_stream``),
skips holes the peer's ACK proves lost (FLOW/TCP/GAP) and publishes DATA_RDY when the
frontier moves.  Every TCP event carries the snapshot of the receiver's state as of
the event.  A flow nobody wants bytes of has no stream at all.

TCP events are oriented by the TCP client (the sender of the first pure SYN; see
``_tcp``): their ``dir`` is 0 for client -> server.  Sided events say which endpoint's
stack raised them (the header flags), so an NF can take the client's, the server's,
the sender's (the default: one per packet) or both.
"""
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset

from mbx._checksum cimport csum_add, csum_fold, csum_sum, csum_valid, store16
from mbx._events cimport (
    MSG_F_CDIR1, MSG_F_CDIR_KNOWN, MSG_F_RECEIVER, MSG_F_SERVER, MSG_F_SIDED,
    PUBLISHER_STACK, T_DATA_RDY,
    T_FLOW_START, T_FLOW_TCP_ESTABLISHED, T_FLOW_TCP_GAP, T_FLOW_TCP_MEMCAP,
    T_FLOW_TCP_OVERLAP_CONFLICT, T_FLOW_TCP_START, T_FLOW_TCP_STATE,
    T_FLOW_TCP_TERMINATE, T_PKT_TCP, T_PKT_TCP_FIN, T_PKT_TCP_RETRANSMISSION,
    T_PKT_TCP_RST, T_PKT_TCP_SYN, EventBus, data_rdy_body, flow_tcp_body, mbx_msg,
    pkt_tcp_body,
)
from mbx._flow cimport (
    END_CLOSED, FLOW_ACTIVE, flow_count, flow_endpoints, mbx_flow, vlan_ids,
)
from mbx._packet cimport (
    NO_FLOW, OFFLOAD_CSUM_PARTIAL, PARSE_BAD_TCP_OPT, PARSE_OK, PARSE_TRUNC_L4,
    PKT_F_TRUNCATED, TCPOPT_F_CUT, TH_ACK, TH_FIN, TH_RST, TH_SYN, VERDICT_DROP,
    Batch, Port, mbx_pkt,
)
from mbx._shm cimport stack_arena, stack_calloc, stack_free
from mbx._stack cimport NetworkLayer, fill_flow_body, fill_pkt_body
from mbx._stream cimport (
    NO_CHUNK, OVERLAP_FIRST, OVERLAP_LAST, STREAM_CONFLICT, STREAM_MAX_OOO, STREAM_MEMCAP,
    STREAM_PIECES,
    StreamPool, mbx_stream, stream_add, stream_free, stream_gap_end, stream_held_piece,
    stream_init, stream_offset_of, stream_read, stream_read_held, stream_read_run,
    stream_release, stream_skip_hole,
)
from mbx._tcp cimport (
    CONN_CLOSED_FIN, CONN_CLOSED_RST, CONN_HS_ACK, CONN_HS_SYN, CONN_HS_SYNACK,
    EP_ACK_KNOWN, EP_FIN, EP_SYN, EP_SYNACK, TCPEV_ESTABLISHED, TCPEV_FIN, TCPEV_NEW_CONNECTION,
    TCPEV_OUT_OF_WINDOW, TCPEV_RETRANSMISSION, TCPEV_RST, TCPEV_RST_INVALID,
    TCPEV_STATE_CHANGE, TCPEV_SYN, TCPEV_SYNACK,
    TCPEV_TERMINATE, seq_gt, seq_leq, seq_lt, tcp_client_dir, tcp_conn, tcp_init,
    tcp_past_edge, tcp_receiver_update, tcp_sender_update, tcp_snapshot,
)

import ipaddress

from mbx import _events
from mbx._stream import check_pool
from mbx.errors import MbxError, PermissionDenied

_POLICIES = {"first": OVERLAP_FIRST, "last": OVERLAP_LAST}
# round_from of a stream no DATA_RDY of the burst has named: no byte of it is kept for
# a reader, so a skipped hole may release any (stream_skip_hole's keep)
cdef uint64_t NO_KEEP = 0xFFFFFFFFFFFFFFFFULL
# Stack Memory per flow slot the Monitor keeps beside its tcp_conn (conn_meta), for
# the figures of bytes per flow
META_SIZE = sizeof(conn_meta)
OVERLAP_POLICIES = tuple(_POLICIES)     # ``overlap=``, for callers that check first
CHECKSUM_POLICIES = ("ignore", "verify")  # ``checksums=``


cdef enum:
    CSUM_BAD = 0
    CSUM_OK = 1
    CSUM_UNKNOWN = 2        # no way to check it here (see ipv6_final_dst)


cdef const uint8_t *ipv6_final_dst(const mbx_pkt *p) noexcept nogil:
    # The address the TCP pseudo-header holds (RFC 8200 §8.1): the final destination,
    # which a Routing header with segments left names in its list, not the header's
    # destination; NULL where it cannot be told (an unknown or compressed routing
    # type with segments left).  The walk stays within the chain the parser walked.
    cdef uint32_t off = p.l3_off + 40, n
    cdef uint8_t nh = p.data[p.l3_off + 6], rtype
    while off + 8 <= p.l4_off:
        if nh == 44:                        # fragment (a rebuilt datagram has none)
            n = 8
        elif nh == 51:                      # AH: length in 4-byte units, less 2
            n = (<uint32_t>p.data[off + 1] + 2) * 4
        else:                               # hop-by-hop, routing, destination options
            n = (<uint32_t>p.data[off + 1] + 1) * 8
        if nh == 43 and p.data[off + 3]:    # a Routing header, segments left
            rtype = p.data[off + 2]
            if rtype == 4 and off + 24 <= p.l4_off:
                return p.data + off + 8     # SRH: Segment List[0] is the last segment
            if (rtype == 0 or rtype == 2) and n >= 24 and off + n <= p.l4_off:
                return p.data + off + n - 16  # the last address of the list
            return NULL
        nh = p.data[off]
        off += n
    return p.dst.b


cdef int checksums_ok(const mbx_pkt *p) noexcept nogil:
    # The IPv4 header's checksum and the TCP checksum (over the pseudo-header and the
    # whole segment) of a segment captured whole.  A datagram rebuilt from fragments
    # has a header the reassembly wrote (its checksum recomputed); its segment's
    # checksum covers every fragment's bytes.
    cdef uint8_t pseudo[40]
    cdef uint32_t tcp_len = p.l3_off + p.ip_len - p.l4_off
    cdef uint64_t s
    cdef const uint8_t *dst
    if p.ip_ver == 4:
        if not csum_valid(csum_sum(p.data + p.l3_off, <size_t>(p.data[p.l3_off] & 0x0F) * 4,
                                   0)):
            return CSUM_BAD
        memcpy(pseudo, p.src.b, 4)
        memcpy(pseudo + 4, p.dst.b, 4)
        pseudo[8] = 0
        pseudo[9] = 6
        store16(pseudo + 10, <uint16_t>tcp_len)
        s = csum_sum(pseudo, 12, 0)
    else:
        dst = ipv6_final_dst(p)
        if dst == NULL:
            return CSUM_UNKNOWN
        memcpy(pseudo, p.src.b, 16)
        memcpy(pseudo + 16, dst, 16)
        pseudo[32] = <uint8_t>(tcp_len >> 24)
        pseudo[33] = <uint8_t>(tcp_len >> 16)
        store16(pseudo + 34, <uint16_t>tcp_len)
        memset(pseudo + 36, 0, 3)
        pseudo[39] = 6
        s = csum_sum(pseudo, 40, 0)
    return CSUM_OK if csum_valid(csum_sum(p.data + p.l4_off, tcp_len, s)) else CSUM_BAD


# The TCP Monitor's stream sizes when not given: TcpMonitor's keywords, and App's and
# an application file's [stack] options of the same names.
STREAM_DEFAULTS = {"stream_memory": 256 << 20, "chunk_size": 16384,
                   "stream_window": 4 << 20, "retain": 0, "max_streams": 16384}
_POOL_OPTIONS = ("stream_memory", "chunk_size", "stream_window", "retain")


def check_stream_options(**given):
    """Raise ValueError for stream sizes the TCP Monitor refuses, alone or together
    (``stream_window`` below ``chunk_size``, ``retain`` not below ``stream_window``,
    ...); sizes not given take STREAM_DEFAULTS.  Each message begins with the name
    of the option it refuses, so a caller can point at that option (an application
    file's line)."""
    sizes = dict(STREAM_DEFAULTS, **given)
    if not 1 <= sizes["max_streams"] <= 0xFFFFFFFF:
        raise ValueError(f"max_streams must be from 1 to {0xFFFFFFFF:,}, not "
                         f"{sizes['max_streams']!r}")
    check_pool(*(sizes[key] for key in _POOL_OPTIONS), names=_POOL_OPTIONS)


# Type ids by built-in index, for the nogil code (filled at import, below).
cdef uint64_t _type_ids[32]


cdef extern from *:
    void __builtin_prefetch(const void *addr) nogil


cdef inline uint8_t side_flags(uint8_t from_server, bint receiver) noexcept nogil:
    # The sender's stack is the server's when the packet comes from the server; the
    # receiver's is the other one.
    cdef uint8_t server = from_server if not receiver else (from_server ^ 1)
    return MSG_F_SIDED | (MSG_F_SERVER if server else 0) | (MSG_F_RECEIVER if receiver else 0)


cdef inline uint8_t cdir_flags(const tcp_conn *c) noexcept nogil:
    # the client's direction as of this event, for stream reads (see MSG_F_CDIR1)
    return MSG_F_CDIR_KNOWN | (MSG_F_CDIR1 if tcp_client_dir(c) else 0)


cdef inline uint8_t data_rdy_flags(uint8_t tdir) noexcept nogil:
    # DATA_RDY of stream tdir belongs to the endpoint that receives it (the server
    # for tdir 0), and counts as that stack's one event for the frontier move (not a
    # receiver-side update: the default side="sender" subscription must get it, and
    # "client"/"server" pick the stream that endpoint receives).
    return MSG_F_SIDED | (MSG_F_SERVER if tdir == 0 else 0)


cdef class TcpMonitor(NetworkLayer):
    """The TCP Monitor over an EventBus (all NetworkLayer options, plus):

    ``stream_memory`` bytes of Stack Memory for reassembled streams, in
    ``chunk_size`` chunks; at most ``stream_window`` bytes held per stream (the
    out-of-order window plus retention); ``retain`` bytes kept behind the frontier for
    late readers; ``max_streams`` flows reassembled at once; ``overlap`` policy
    ``"first"`` or ``"last"``; ``checksums``: ``"ignore"`` (the default: a segment
    counts whatever its checksums) or ``"verify"`` (a segment whose IPv4 header or
    TCP checksum is wrong is left out of TCP state and streams, as its receiver
    drops it; counted ``bad_checksums``); ``summarise=True`` keeps the per-connection summary of
    ``mbx flows``.
    """

    def __init__(self, EventBus bus not None, *, uint32_t flow_capacity=65536,
                 double idle_timeout=60.0, str flow_policy="evict",
                 str malformed="forward", size_t frag_memory=4 << 20,
                 double frag_timeout=30.0,
                 size_t stream_memory=STREAM_DEFAULTS["stream_memory"],
                 uint32_t chunk_size=STREAM_DEFAULTS["chunk_size"],
                 size_t stream_window=STREAM_DEFAULTS["stream_window"],
                 size_t retain=STREAM_DEFAULTS["retain"],
                 uint32_t max_streams=STREAM_DEFAULTS["max_streams"],
                 str overlap="first", str checksums="ignore", bint summarise=False,
                 bint vlan_in_flow_key=True, rss=(0, 1)):
        check_stream_options(stream_memory=stream_memory, chunk_size=chunk_size,
                             stream_window=stream_window, retain=retain,
                             max_streams=max_streams)
        NetworkLayer.__init__(self, bus, flow_capacity=flow_capacity, rss=rss,
                              idle_timeout=idle_timeout, flow_policy=flow_policy,
                              malformed=malformed, frag_memory=frag_memory,
                              frag_timeout=frag_timeout,
                              vlan_in_flow_key=vlan_in_flow_key)
        if overlap not in _POLICIES:
            raise ValueError(f"overlap must be 'first' or 'last', not {overlap!r}")
        self.policy = _POLICIES[overlap]
        if checksums not in CHECKSUM_POLICIES:
            raise ValueError(f"checksums must be 'ignore' or 'verify', not {checksums!r}")
        self.verify_checksums = checksums == "verify"
        self.capacity = flow_capacity
        self.pool = StreamPool(total_bytes=stream_memory, chunk_size=chunk_size,
                               max_stream_bytes=stream_window, retain=retain)
        # Stack Memory, shared with the NF processes when pipelined (stream reads
        # there need the connections, the streams and the burst's ended pairs).
        # calloc: pages are touched only as flows arrive
        self.stack_memory = stack_arena()
        self.shared_tables = self.stack_memory is not None
        self.conns = <tcp_conn *>stack_calloc(flow_capacity, sizeof(tcp_conn))
        self.meta = <conn_meta *>stack_calloc(flow_capacity, sizeof(conn_meta))
        self.max_pairs = max_streams
        self.streams = <mbx_stream *>stack_calloc(2 * max_streams, sizeof(mbx_stream))
        # only the stack reads held SYN data: private memory (its bytes are in the pool)
        self.held = <mbx_stream *>PyMem_Calloc(2 * max_streams, sizeof(mbx_stream))
        self.edge = <mbx_stream *>PyMem_Calloc(2 * max_streams, sizeof(mbx_stream))
        self.edge_lo = <uint32_t *>PyMem_Calloc(2 * max_streams, 4)
        self.edge_hi = <uint32_t *>PyMem_Calloc(2 * max_streams, 4)
        self.round_from = <uint64_t *>PyMem_Calloc(2 * max_streams, 8)
        self.free_pairs = <uint32_t *>stack_calloc(max_streams, 4)
        self.touched = <uint32_t *>stack_calloc(max_streams, 4)
        self.touched_mark = <uint8_t *>stack_calloc(max_streams, 1)
        self.pair_owner = <uint64_t *>stack_calloc(max_streams, 8)
        self.pair_cdir = <uint8_t *>stack_calloc(max_streams, 1)
        if (self.conns == NULL or self.meta == NULL or self.streams == NULL or self.held == NULL
                or self.edge == NULL or self.edge_lo == NULL or self.edge_hi == NULL
                or self.round_from == NULL
                or self.free_pairs == NULL or self.touched == NULL or self.touched_mark == NULL
                or self.pair_owner == NULL or self.pair_cdir == NULL):
            raise MemoryError("cannot allocate the TCP Monitor's Stack Memory")
        cdef uint32_t i
        for i in range(max_streams):
            self.free_pairs[i] = max_streams - 1 - i
        self.n_free_pairs = max_streams
        self.summarise = summarise
        if summarise:
            self.sums = <conn_sum **>PyMem_Calloc(flow_capacity, sizeof(conn_sum *))
            if self.sums == NULL:
                raise MemoryError()
        self.inject = Batch(64, 64 * 256)
        # Sender and receiver updates, state changes, data and gaps (a GAP and a
        # DATA_RDY per hole an ACK skips): room for them.
        self.events_per_pkt = 32 + 2 * STREAM_MAX_OOO
        bus.stream_reader = self

    def __dealloc__(self):
        cdef uint32_t i
        if self.sums != NULL:
            for i in range(self.capacity):
                free(self.sums[i])
        PyMem_Free(self.sums)
        stack_free(self.shared_tables, self.conns)
        stack_free(self.shared_tables, self.meta)
        stack_free(self.shared_tables, self.streams)
        PyMem_Free(self.held)
        PyMem_Free(self.edge)
        PyMem_Free(self.edge_lo)
        PyMem_Free(self.edge_hi)
        PyMem_Free(self.round_from)
        stack_free(self.shared_tables, self.free_pairs)
        stack_free(self.shared_tables, self.touched)
        stack_free(self.shared_tables, self.touched_mark)
        stack_free(self.shared_tables, self.pair_owner)
        stack_free(self.shared_tables, self.pair_cdir)
        PyMem_Free(self.after)
        PyMem_Free(self.after_flow)
        free(self.records)

    # ---------------------------------------------------------------- connections

    cdef void conn_start(self, uint32_t slot, mbx_pkt *p) noexcept nogil:
        self.free_pair(slot)
        tcp_init(&self.conns[slot])
        self.meta[slot].gen = p.flow_gen
        self.meta[slot].mark = 0
        self.connections += 1
        cdef conn_sum *cs
        if self.summarise:
            cs = <conn_sum *>malloc(sizeof(conn_sum))
            if cs == NULL:
                self.summary_oom += 1
            else:
                memset(cs, 0, sizeof(conn_sum))
                SHA256_Init(&cs.sha[0])
                SHA256_Init(&cs.sha[1])
                cs.first_pkt = self.pkt_no
            free(self.sums[slot])
            self.sums[slot] = cs

    cdef uint32_t restart(self, Batch batch, mbx_pkt *p) noexcept nogil:
        # A pure SYN of a new connection on the 5-tuple of an old one: the old flow
        # ends (FLOW/END, reason closed) and the packet starts a new flow.
        cdef uint32_t slot = p.flow
        cdef mbx_flow *old = &self.flows.flows[slot]
        self.new_connections += 1
        # the SYN belongs to the new flow, not to the one it ends: nor do its count
        # and its time (the lookups moved last_ns on to it, or to a later packet
        # of its chunk), so the old flow's last packet is the one before it
        old.pkts[p.dir] -= 1
        old.bytes[p.dir] -= p.wirelen
        old.last_ns = self.last_before
        self.flows.clock_ns = p.ts_ns       # it ends when the SYN comes
        if self.flows.end_flow(slot, END_CLOSED):
            self.publish_ended()
        slot = self.flows.lookup(p)
        if slot == NO_FLOW:
            return NO_FLOW
        flow_count(&self.flows.flows[slot], p)
        if (self.flows.created_last and self.bus.global_want & (1 << T_FLOW_START)
                and self.bus.wants(T_FLOW_START, slot, p.flow_gen, 0)):
            self.publish_flow(T_FLOW_START, self.flow_start_id, &self.flows.flows[slot],
                              slot, p.index, p.dir, p.ts_ns)
        self.conn_start(slot, p)
        return slot

    cdef void flow_ended(self, uint32_t slot, const mbx_flow *f) noexcept nogil:
        if slot >= self.capacity or self.meta[slot].gen != f.gen:
            return
        cdef uint32_t pair = self.meta[slot].pair - 1
        cdef uint8_t d
        if pair != NO_PAIR:
            # SYN data nothing decided on (no reply, no later segment, no FIN or RST
            # seen) when its flow ends: nothing showed that the receiver took it,
            # so it is dropped, and counted.  Delivered now, its DATA_RDY would carry
            # no packet: a subscription filter could not match it (it would reach
            # NFs filtered to other ports) and its packet fields would raise.
            for d in range(2):
                if self.held[2 * pair + d].live:
                    self.syn_data_dropped += self.held[2 * pair + d].frontier
                    self.meta[slot].mark |= MARK_SYN0 << d
        if self.summarise:
            # bytes held beyond a hole that was never filled nor proved lost are in
            # no digest: `mbx flows` says how many streams ended so
            if pair != NO_PAIR:
                for d in range(2):
                    if self.streams[2 * pair + d].live and self.streams[2 * pair + d].n_ooo:
                        self.summary_held += 1
            self.summary_end(slot, f)
        self.detach_pair(slot)
        self.free_pair(slot)
        self.meta[slot].gen = 0

    cdef void detach_pair(self, uint32_t slot) noexcept nogil:
        # The flow gives its stream pair up; DATA_RDY of this burst may still read
        # it: then it is freed at the burst's end (found by its owner), else now
        # by free_pair.
        cdef uint32_t pair = (self.meta[slot].pair - 1)
        if pair != NO_PAIR and self.touched_mark[pair]:
            self.touched_mark[pair] = 3
            self.pair_cdir[pair] = tcp_client_dir(&self.conns[slot])
            self.meta[slot].pair = 0
            self.meta[slot].mark &= ~(MARK_INIT0 | MARK_INIT1)

    cdef void close_streams(self, uint32_t slot) noexcept nogil:
        # A connection both sides closed with FINs (both acknowledged) sends no new
        # byte: its streams go back to the pool now, not when its flow idles out
        # (each kept a chunk: 8,192 such connections within the idle timeout took
        # the default pool, and reassembly stopped for every later one).
        self.detach_pair(slot)
        self.free_pair(slot)
        self.meta[slot].mark |= MARK_DONE

    cdef void free_pair(self, uint32_t slot) noexcept nogil:
        cdef uint32_t pair = (self.meta[slot].pair - 1)
        if pair == NO_PAIR:
            return
        self.free_pair_streams(pair)
        self.meta[slot].pair = 0
        self.meta[slot].mark &= ~(MARK_INIT0 | MARK_INIT1)

    cdef void free_pair_streams(self, uint32_t pair) noexcept nogil:
        # Every stream of the pair, and SYN data still held, back to the pool; the
        # pair back to the free list.
        cdef uint32_t k
        for k in range(2 * pair, 2 * pair + 2):
            stream_free(self.pool, &self.streams[k])
            stream_free(self.pool, &self.held[k])
            if self.edge[k].live:
                # held past the window's edge, and no ACK of the receiver took it
                self.edge_data_dropped += self.edge_held_bytes(k)
            stream_free(self.pool, &self.edge[k])
        self.free_pairs[self.n_free_pairs] = pair
        self.n_free_pairs += 1

    cdef uint32_t get_pair(self, uint32_t slot) noexcept nogil:
        cdef uint32_t pair = (self.meta[slot].pair - 1)
        if pair != NO_PAIR:
            return pair
        if self.n_free_pairs == 0:
            self.pairs_exhausted += 1
            return NO_PAIR
        self.n_free_pairs -= 1
        pair = self.free_pairs[self.n_free_pairs]
        memset(&self.streams[2 * pair], 0, 2 * sizeof(mbx_stream))
        self.meta[slot].pair = pair + 1
        self.pair_owner[pair] = slot | (<uint64_t>self.meta[slot].gen << 32)
        self.streams_opened += 1
        return pair

    # ---------------------------------------------------------------- events

    cdef void publish_pkt_tcp(self, uint16_t t, mbx_pkt *p, uint32_t slot, uint8_t tdir,
                              uint8_t flags, tcp_conn *c) noexcept nogil:
        if not self.bus.wants(t, slot, p.flow_gen, flags):
            return
        cdef mbx_msg *m = self.bus.new_msg(t, _type_ids[<int>t], p.ts_ns, slot, p.flow_gen,
                                           p.index, tdir, PUBLISHER_STACK, self.pos)
        if m == NULL:
            return
        m.h.flags = flags | cdir_flags(c)
        fill_pkt_body(m, p)
        cdef pkt_tcp_body *b = <pkt_tcp_body *>m.body
        b.seq = p.seq
        b.ack = p.ack
        b.win = p.win
        b.payload_len = p.payload_len
        tcp_snapshot(c, p.dir, self.frontier_of(slot, p.dir), p.ts_ns, m.h.snapshot)
        self.bus.publish(m)

    cdef uint64_t frontier_of(self, uint32_t slot, uint8_t d) noexcept nogil:
        cdef uint32_t pair = (self.meta[slot].pair - 1)
        if pair == NO_PAIR:
            return 0
        return self.streams[2 * pair + d].frontier

    cdef mbx_msg *flow_tcp_msg(self, uint16_t t, mbx_pkt *p, uint32_t slot, uint8_t flags,
                               tcp_conn *c) noexcept nogil:
        # A FLOW/TCP/* message with the flow's record oriented by the TCP client and
        # both states; the caller fills the type's own fields and publishes it.
        if not self.bus.wants(t, slot, p.flow_gen, flags):
            return NULL
        cdef uint8_t cdir = tcp_client_dir(c)
        cdef mbx_msg *m = self.bus.new_msg(t, _type_ids[<int>t], p.ts_ns, slot, p.flow_gen,
                                           p.index, p.dir ^ cdir, PUBLISHER_STACK,
                                           self.pos)
        if m == NULL:
            return NULL
        m.h.flags = flags | cdir_flags(c)
        fill_flow_body(m, &self.flows.flows[slot])
        cdef flow_tcp_body *b = <flow_tcp_body *>m.body
        cdef uint8_t tmp[16]
        cdef uint16_t port
        cdef uint64_t n
        if cdir == 1:
            # the flow's first packet came from the server: swap the orientation
            memcpy(tmp, b.flow.cli_addr, 16)
            memcpy(b.flow.cli_addr, b.flow.srv_addr, 16)
            memcpy(b.flow.srv_addr, tmp, 16)
            port = b.flow.cli_port
            b.flow.cli_port = b.flow.srv_port
            b.flow.srv_port = port
            n = b.flow.pkts_c2s
            b.flow.pkts_c2s = b.flow.pkts_s2c
            b.flow.pkts_s2c = n
            n = b.flow.bytes_c2s
            b.flow.bytes_c2s = b.flow.bytes_s2c
            b.flow.bytes_s2c = n
        b.state_cli = c.ep[cdir].state
        b.state_srv = c.ep[cdir ^ 1].state
        b.side = 0 if not (flags & MSG_F_SIDED) else (2 if flags & MSG_F_SERVER else 1)
        b.reason = 0
        b.offset = 0
        b.length = 0
        b.stream_dir = 0
        b.policy = self.policy
        b.old_state = 0
        b.new_state = 0
        tcp_snapshot(c, p.dir, self.frontier_of(slot, p.dir), p.ts_ns, m.h.snapshot)
        return m

    cdef void prefetch(self, mbx_pkt *p) noexcept nogil:
        if p.l4_proto == 6 and p.flow != NO_FLOW:
            __builtin_prefetch(&self.conns[p.flow])
            __builtin_prefetch(&self.meta[p.flow])

    cdef bint transport(self, Batch batch, mbx_pkt *p) noexcept nogil:
        if p.l4_proto != 6:
            return False
        # TRUNC_L4 with its options cut by a snaplen: the fixed header is whole, and
        # the segment is tracked as one whose payload was cut (PKT_F_TRUNCATED)
        if p.status != PARSE_OK and p.status != PARSE_BAD_TCP_OPT and not (
                p.status == PARSE_TRUNC_L4 and p.tcp_opts & TCPOPT_F_CUT):
            self.tcp_unparsed += 1          # no usable TCP header: PKT only
            # cut before its fixed 20 bytes (a snaplen): not malformed, but its
            # connection goes untracked, so `mbx flows` says so
            self.tcp_header_cut += p.status == PARSE_TRUNC_L4
            return False
        cdef int checked
        if self.verify_checksums:
            checked = CSUM_UNKNOWN
            if not (p.flags & PKT_F_TRUNCATED or p.offload & OFFLOAD_CSUM_PARTIAL
                    or p.l3_off + p.ip_len > p.caplen):
                checked = checksums_ok(p)
            if checked == CSUM_UNKNOWN:
                # cut by a snaplen, its checksum left to the sending interface, or
                # routed to a destination not told here: taken as it is
                self.unverifiable += 1
            elif checked == CSUM_BAD:
                # Its receiver drops it unseen (RFC 9293 §3.10.7.1 via the IP layer):
                # neither its sequence numbers, its ACK, nor its bytes count, or an
                # injected segment could win over the real one in the stream.
                self.bad_checksums += 1
                if (self.meta[p.flow].mark & MARK_KILLED
                        and self.meta[p.flow].gen == p.flow_gen):
                    # an NF terminated its connection: dropped as every packet of it
                    p.verdict = VERDICT_DROP
                    self.killed_drops += 1
                    return True
                return False
        cdef uint32_t slot = p.flow
        cdef mbx_flow *f = &self.flows.flows[slot]
        if f.gen != p.flow_gen or f.status != FLOW_ACTIVE:
            # Its flow was restarted by an earlier packet of the same chunk (a new
            # connection on the same 5-tuple): look it up again.
            slot = self.flows.lookup(p)
            if slot == NO_FLOW:
                return False
            flow_count(&self.flows.flows[slot], p)
            self.last_before = self.flows.last_before
        self.tcp_pkts += 1
        self.pkt_no += 1
        # a capture's snaplen cut its payload: the stream holds what was captured
        # and skips the rest as a gap, so lengths and digests cover less than was sent
        self.cut_segments += (p.flags & PKT_F_TRUNCATED) != 0
        if self.meta[slot].mark & MARK_KILLED and self.meta[slot].gen == p.flow_gen:
            p.verdict = VERDICT_DROP        # an NF terminated this connection
            self.killed_drops += 1
            return True
        cdef bint first = self.meta[slot].gen != p.flow_gen
        if first:
            self.conn_start(slot, p)
        cdef tcp_conn *c = &self.conns[slot]
        cdef uint8_t old_snd = c.ep[p.dir].state
        cdef uint8_t old_rcv = c.ep[p.dir ^ 1].state
        cdef uint32_t sb = tcp_sender_update(c, p)
        if sb & TCPEV_NEW_CONNECTION:
            slot = self.restart(batch, p)
            if slot == NO_FLOW:
                return False
            first = True
            c = &self.conns[slot]
            old_snd = c.ep[p.dir].state
            old_rcv = c.ep[p.dir ^ 1].state
            sb = tcp_sender_update(c, p)
        cdef uint32_t rb = tcp_receiver_update(c, p)
        cdef uint32_t both = sb | rb
        cdef uint8_t cdir = tcp_client_dir(c)
        cdef uint8_t tdir = p.dir ^ cdir
        cdef uint8_t snd = side_flags(tdir, False)
        cdef uint8_t rcv = side_flags(tdir, True)
        cdef uint16_t t
        cdef mbx_msg *m
        if self.summarise:
            self.summary_packet(slot, p)
        if first:
            m = self.flow_tcp_msg(T_FLOW_TCP_START, p, slot, 0, c)
            if m != NULL:
                self.bus.publish(m)
        if both & TCPEV_RETRANSMISSION:
            t = T_PKT_TCP_RETRANSMISSION
        elif both & TCPEV_RST:
            t = T_PKT_TCP_RST
        elif both & (TCPEV_SYN | TCPEV_SYNACK):
            t = T_PKT_TCP_SYN
        elif both & TCPEV_FIN:
            t = T_PKT_TCP_FIN
        else:
            t = T_PKT_TCP
        self.publish_pkt_tcp(t, p, slot, tdir, snd, c)
        self.publish_pkt_tcp(t, p, slot, tdir, rcv, c)
        if sb & TCPEV_STATE_CHANGE:
            m = self.flow_tcp_msg(T_FLOW_TCP_STATE, p, slot, snd, c)
            if m != NULL:
                (<flow_tcp_body *>m.body).old_state = old_snd
                (<flow_tcp_body *>m.body).new_state = c.ep[p.dir].state
                self.bus.publish(m)
        if rb & TCPEV_STATE_CHANGE:
            m = self.flow_tcp_msg(T_FLOW_TCP_STATE, p, slot, rcv, c)
            if m != NULL:
                (<flow_tcp_body *>m.body).old_state = old_rcv
                (<flow_tcp_body *>m.body).new_state = c.ep[p.dir ^ 1].state
                self.bus.publish(m)
        if both & TCPEV_ESTABLISHED:
            m = self.flow_tcp_msg(T_FLOW_TCP_ESTABLISHED, p, slot, 0, c)
            if m != NULL:
                self.bus.publish(m)
        self.stream_work(batch, p, slot, c, sb)
        if both & TCPEV_TERMINATE:
            m = self.flow_tcp_msg(T_FLOW_TCP_TERMINATE, p, slot, 0, c)
            if m != NULL:
                (<flow_tcp_body *>m.body).reason = 2 if c.flags & CONN_CLOSED_RST else 1
                self.bus.publish(m)
            if c.flags & CONN_CLOSED_FIN:
                self.close_streams(slot)
        if self.terminable and p.index < self.after_cap:
            # kept only when some NF may terminate connections (see terminate)
            self.after[p.index] = c[0]
            self.after_flow[p.index] = slot | (<uint64_t>p.flow_gen << 32)
        return True

    # ---------------------------------------------------------------- streams

    cdef bint wants_stream(self, uint32_t slot, mbx_pkt *p, uint8_t tdir) noexcept nogil:
        # The stream of direction tdir (from the TCP client: 0) is received by the
        # other endpoint: DATA_RDY is that endpoint's event, one per frontier move.
        return self.summarise or self.bus.wants(
            T_DATA_RDY, slot, p.flow_gen, data_rdy_flags(tdir))

    cdef void stream_work(self, Batch batch, mbx_pkt *p, uint32_t slot, tcp_conn *c,
                          uint32_t sbits) noexcept nogil:
        cdef uint8_t cdir = tcp_client_dir(c)
        cdef uint8_t d = p.dir, o = p.dir ^ 1
        cdef bint want_d = self.wants_stream(slot, p, d ^ cdir)
        cdef bint want_o = self.wants_stream(slot, p, o ^ cdir)
        cdef uint32_t pair
        cdef mbx_stream *s
        cdef mbx_stream *e
        cdef uint32_t seq, ack, end, seen
        cdef uint64_t before
        cdef int fl
        cdef mbx_msg *m
        cdef conn_meta *meta = &self.meta[slot]
        cdef uint8_t hi_d = MARK_HI0 << d
        cdef bint seen_d = (meta.mark & hi_d) != 0
        # What the receiver would not take (RFC 9293 §3.10.7.4), as the state machine
        # judged it: a segment out of its window, or a RST it found invalid.  Neither
        # its payload nor its ACK touches the streams.  A valid RST's data counts (as
        # tshark's follow counts it) only at the frontier (below), its ACK field
        # does not; and what follows a valid RST is still delivered: the RST the
        # Monitor saw may never reach the endpoint (a low TTL), and stopping there
        # would let a sender hide the rest.
        cdef bint accepted = not (sbits & (TCPEV_OUT_OF_WINDOW | TCPEV_RST_INVALID))
        # Payload bytes a snaplen cut off (the IP header says how many were sent):
        # they were on the wire, so they are skipped as a cut gap once the captured
        # bytes before them are delivered, not left as a hole for the ACK to skip as
        # one the capture missed.  SYN data is held apart (syn_hold): not here.
        cdef uint32_t cut = 0, wire_off
        if p.flags & PKT_F_TRUNCATED and not p.tcp_flags & TH_SYN:
            wire_off = p.l4_off + (p.data[p.l4_off + 12] >> 4) * 4
            if p.l3_off + p.ip_len > wire_off + p.payload_len:
                cut = p.l3_off + p.ip_len - wire_off - p.payload_len
        seq = p.seq + (1 if p.tcp_flags & TH_SYN else 0)
        seen = meta.sent_hi[d]
        if accepted:
            end = seq + p.payload_len + cut
            if not seen_d or seq_gt(end, seen):
                meta.sent_hi[d] = end
                meta.mark |= hi_d
        if meta.mark & MARK_DONE:
            # Closed by FINs: no new byte can come.  A retransmission of bytes its side
            # was seen sending is no loss (their stream had them; a copy can reach the
            # wire after the close when the kernel moves a flow that timed out to
            # another queue), so only a segment reaching beyond them counts.
            if p.payload_len and accepted and (not seen_d or seq_gt(end, seen)):
                self.after_close += 1
            return
        cdef uint32_t n = p.payload_len, fin_lim
        if not want_d and not want_o:
            self.free_pair(slot)            # nobody (any more) wants this flow's bytes
            return
        pair = self.get_pair(slot)
        if pair == NO_PAIR:
            if p.payload_len:
                m = self.flow_tcp_msg(T_FLOW_TCP_MEMCAP, p, slot, 0, c)
                if m != NULL:
                    (<flow_tcp_body *>m.body).length = p.payload_len
                    (<flow_tcp_body *>m.body).stream_dir = d ^ cdir
                    self.bus.publish(m)
                self.memcaps += 1
                self.memcaps_streams += 1
            return
        if accepted:
            # What became of SYN data held so far (syn_decide): the sender's next
            # segment with data starts where the receiver told it its bytes go on,
            # and the receiver's ACK says so itself.  A FIN or RST before either
            # ends the wait: the bytes are delivered (see flow_ended).
            if self.held[2 * pair + d].live and not p.tcp_flags & TH_SYN:
                if p.payload_len:
                    self.syn_decide(p, slot, c, pair, d, seq, False)
                elif p.tcp_flags & (TH_FIN | TH_RST):
                    self.syn_decide(p, slot, c, pair, d, 0, True)
            if self.held[2 * pair + o].live:
                if (p.tcp_flags & (TH_ACK | TH_RST)) == TH_ACK:
                    self.syn_decide(p, slot, c, pair, o, p.ack, False)
                elif p.tcp_flags & (TH_FIN | TH_RST):
                    self.syn_decide(p, slot, c, pair, o, 0, True)
        if want_d and p.payload_len and accepted and p.tcp_flags & TH_SYN:
            self.syn_hold(p, slot, c, pair, seq)
        elif want_d and (n or cut) and accepted:
            # the packet's payload, into its direction's stream
            s = &self.streams[2 * pair + d]
            if not meta.mark & (MARK_INIT0 << d):
                # offset 0 is the byte after the ISN when the SYN was seen, else (a
                # midstream pickup) where the sender's earlier segments, a pure ACK
                # say, put its next byte, if before this one and within the window
                # (so bytes that come later to fill in before it are not lost), else
                # this segment's first byte
                if c.ep[d].flags & (EP_SYN | EP_SYNACK):
                    stream_init(self.pool, s, c.ep[d].isn + 1, self.policy)
                elif seen_d and seq_gt(seq, seen) and \
                        seq - seen < self.pool.max_stream_bytes:
                    stream_init(self.pool, s, seen, self.policy)
                else:
                    stream_init(self.pool, s, seq, self.policy)
                meta.mark |= MARK_INIT0 << d
            # Bytes beyond the sender's FIN are none of its stream once its receiver
            # took that FIN (RFC 9293 §3.10.7.4): left in, they would sit behind the
            # FIN's sequence number, which no byte fills, as if behind a hole the
            # capture missed.  The proof is the receiver's ACK of exactly the FIN
            # (fin_seq + 1, not beyond) with no byte at the FIN's place delivered: a
            # FIN seen first is no proof, as a stale or injected one (inside acked
            # data, ahead of a hole) would cut off bytes the receiver acknowledged.
            # What came before the FIN is kept; the segment is counted
            # (payload_after_fin) and its later bytes go.
            if (n and c.ep[d].flags & EP_FIN and not p.tcp_flags & (TH_SYN | TH_RST)
                    and c.ep[o].flags & EP_ACK_KNOWN
                    and c.ep[o].ack == c.ep[d].fin_seq + 1
                    and stream_offset_of(s, c.ep[d].fin_seq) >= <int64_t>s.frontier
                    and seq_gt(seq + n + cut, c.ep[d].fin_seq)):
                self.after_fin += 1
                fin_lim = c.ep[d].fin_seq - seq if seq_lt(seq, c.ep[d].fin_seq) else 0
                if n > fin_lim:
                    n = fin_lim
                    cut = 0
                else:
                    cut = fin_lim - n
            e = &self.edge[2 * pair + d]
            if (e.live and n and not p.tcp_flags & TH_RST
                    and seq_leq(seq, self.edge_lo[2 * pair + d])
                    and seq_gt(seq + n, self.edge_lo[2 * pair + d])):
                self.edge_resent(p, slot, c, pair, seq, n)
            before = s.frontier
            if p.tcp_flags & TH_RST and (stream_offset_of(s, seq) != <int64_t>s.frontier
                                         or s.n_ooo):
                # A RST's text is diagnostics no receiver takes (Linux drops it): as
                # the next bytes due it is what a reader of the capture sees, but
                # anywhere else, or over real bytes held beyond the frontier, it
                # would stand for, or conflict with, what the sender really sent.
                fl = 0
            elif (n == 1 and seen_d and seq + 1 == seen
                    and stream_offset_of(s, seq) < <int64_t>s.frontier):
                # A keep-alive probe: the last byte sent again, which many stacks
                # fill with garbage (RFC 1122 §4.2.3.6); already delivered, it is
                # nothing new, and no conflict either.
                fl = 0
            else:
                fl = stream_add(self.pool, s, seq, p.data + p.payload_off, n)
            self.add_flags(p, slot, c, s, d, fl, seq, n)
            if s.frontier != before:
                self.data_ready(p, slot, c, pair, d, before)
            if (cut and not p.tcp_flags & TH_RST and stream_offset_of(
                    s, seq + n) <= <int64_t>s.frontier):
                # the captured bytes are delivered: the cut ones follow them
                self.skip_holes(p, slot, c, pair, d, seq + n + cut, True)
        elif (want_d and p.payload_len and sbits & TCPEV_OUT_OF_WINDOW
                and not p.tcp_flags & (TH_SYN | TH_RST)
                and meta.mark & (MARK_INIT0 << d)):
            s = &self.streams[2 * pair + d]
            if (p.payload_len > 1 or p.tcp_flags & TH_FIN
                    or stream_offset_of(s, seq) != <int64_t>s.frontier):
                if tcp_past_edge(c, p):
                    # Refused as starting on or past the right edge the receiver last
                    # showed: so would a receiver refuse it, unless it sent an ACK
                    # that opened its window first, which a capture can record after
                    # the data (two CPUs, a tap).  Held aside, delivered only when the
                    # receiver's ACK covers it (edge_take): taken at once, a segment
                    # the receiver dropped could win over the real bytes.  Data with
                    # a FIN is held too (the state machine refused its FIN, which
                    # is recorded only when its sender sends it again).
                    self.edge_hold(p, slot, c, pair, seq)
            else:
                # A zero-window probe's byte, refused as Linux refuses it (a probe
                # with other bytes than the real ones must not win over them), but
                # kept aside: an ACK that covers it before the frontier moves proves
                # this receiver took it, and then it is the stream's next byte, not
                # a 1-byte gap where the capture has the byte.
                s.probe = p.data[p.payload_off]
                s.probe_held = 1
        # the packet's ACK: holes in the other direction that the receiver got
        if (want_o and accepted and (p.tcp_flags & (TH_ACK | TH_RST)) == TH_ACK
                and meta.mark & (MARK_INIT0 << o)):
            s = &self.streams[2 * pair + o]
            e = &self.edge[2 * pair + o]
            if e.live and seq_gt(p.ack, self.edge_lo[2 * pair + o]):
                self.edge_take(p, slot, c, pair, o)
            if (s.probe_held and not c.ep[o].flags & EP_FIN
                    and seq_gt(p.ack, s.seq0 + <uint32_t>s.frontier)):
                # the receiver took the probe's byte (above)
                before = s.frontier
                s.probe_held = 0
                seq = s.seq0 + <uint32_t>before
                fl = stream_add(self.pool, s, seq, &s.probe, 1)
                self.add_flags(p, slot, c, s, o, fl, seq, 1)
                if seq_gt(seq + 1, meta.sent_hi[o]):
                    meta.sent_hi[o] = seq + 1
                if s.frontier != before:
                    self.data_ready(p, slot, c, pair, o, before)
            ack = p.ack
            if c.ep[o].flags & EP_FIN and seq_gt(ack, c.ep[o].fin_seq):
                ack = c.ep[o].fin_seq       # the FIN's sequence number is no data
            # An ACK beyond what the other side was seen sending acknowledges bytes
            # not seen yet: they may still come (a capture reorders an ACK before
            # its data), or the ACK is bogus (a blind injection would otherwise
            # skip the real bytes as a gap).  A hole is skipped once bytes beyond it
            # were seen, so that a lost segment is reported when its successor is.
            if meta.mark & (MARK_HI0 << o) and seq_gt(ack, meta.sent_hi[o]):
                ack = meta.sent_hi[o]
            self.skip_holes(p, slot, c, pair, o, ack, False)

    cdef void skip_holes(self, mbx_pkt *p, uint32_t slot, tcp_conn *c, uint32_t pair,
                         uint8_t o, uint32_t upto, bint cut) noexcept nogil:
        # Skips the holes of flow dir o's stream before seq upto, each a gap: the
        # receiver acknowledged them, or (cut) they are the bytes a snaplen cut off a
        # segment, which was on the wire but not captured.  Cut gaps are counted
        # apart, so that `mbx flows` tells the snaplen once, not again as holes the
        # capture missed.
        cdef mbx_stream *s = &self.streams[2 * pair + o]
        cdef uint8_t cdir = tcp_client_dir(c)
        cdef uint64_t gs, ge, n
        cdef mbx_msg *m
        while True:
            # a hole whose gap would release bytes this burst's DATA_RDY
            # delivered waits for an ACK after the burst's release point
            n = stream_skip_hole(self.pool, s, upto,
                                 self.round_from[2 * pair + o]
                                 if self.touched_mark[pair] else s.frontier,
                                 &gs, &ge)
            if n == 0:
                break
            s.probe_held = 0                # the frontier moved past it
            self.gaps += 1
            self.gap_bytes += n
            if cut:
                self.cut_gaps += 1
                self.cut_gap_bytes += n
            m = self.flow_tcp_msg(T_FLOW_TCP_GAP, p, slot, 0, c)
            if m != NULL:
                (<flow_tcp_body *>m.body).offset = gs
                (<flow_tcp_body *>m.body).length = n
                (<flow_tcp_body *>m.body).stream_dir = o ^ cdir
                self.bus.publish(m)
            # the held bytes the frontier ran through after this hole: their own
            # DATA_RDY, from the hole's end (a read cannot cross a hole)
            if s.frontier > ge:
                self.data_ready(p, slot, c, pair, o, ge)

    cdef void add_flags(self, mbx_pkt *p, uint32_t slot, tcp_conn *c, mbx_stream *s,
                        uint8_t d, int fl, uint32_t seq, uint32_t n) noexcept nogil:
        # What stream_add of n bytes at seq into s (of flow dir d) reported: counted
        # and published.
        cdef uint8_t cdir = tcp_client_dir(c)
        cdef mbx_msg *m
        if fl & STREAM_CONFLICT:
            self.conflicts += 1
            m = self.flow_tcp_msg(T_FLOW_TCP_OVERLAP_CONFLICT, p, slot, 0, c)
            if m != NULL:
                (<flow_tcp_body *>m.body).offset = s.conflict_off
                (<flow_tcp_body *>m.body).stream_dir = d ^ cdir
                self.bus.publish(m)
        if fl & STREAM_MEMCAP:
            self.memcaps += 1
            if fl & STREAM_PIECES:
                self.memcaps_pieces += 1
            elif self.pool.n_free and (self.pool.n_free_ooo or s.ooo != NO_CHUNK):
                # the pool had chunks and interval blocks left: the stream's own
                # window cut the bytes, which more stream memory would not have kept
                self.memcaps_window += 1
            m = self.flow_tcp_msg(T_FLOW_TCP_MEMCAP, p, slot, 0, c)
            if m != NULL:
                (<flow_tcp_body *>m.body).offset = <uint64_t>stream_offset_of(s, seq)
                (<flow_tcp_body *>m.body).length = n
                (<flow_tcp_body *>m.body).stream_dir = d ^ cdir
                self.bus.publish(m)

    cdef void syn_hold(self, mbx_pkt *p, uint32_t slot, tcp_conn *c, uint32_t pair,
                       uint32_t seq) noexcept nogil:
        # Data on a SYN (or SYN+ACK) is not the stream's yet: a receiver without a
        # TFO cookie for the sender throws it away (its SYN+ACK acknowledges the SYN
        # only) and gets the real bytes again at ISN + 1.  Held in a stream of its
        # own, from the pool, so it is bounded as stream bytes are (stream_window,
        # a full pool is MEMCAP; an IP packet carries less than 64 KiB anyway), and
        # a retransmitted SYN with other bytes is a conflict there.  Once decided,
        # later SYN data is none: the receiver answered the SYN already.
        cdef uint8_t d = p.dir
        cdef mbx_stream *h = &self.held[2 * pair + d]
        if self.meta[slot].mark & (MARK_SYN0 << d):
            self.syn_data_dropped += p.payload_len
            return
        if not h.live:
            stream_init(self.pool, h, c.ep[d].isn + 1, self.policy)
        self.add_flags(p, slot, c, h, d, stream_add(self.pool, h, seq, p.data + p.payload_off,
                                                    p.payload_len), seq, p.payload_len)

    cdef void syn_decide(self, mbx_pkt *p, uint32_t slot, tcp_conn *c, uint32_t pair,
                         uint8_t d, uint32_t upto, bint whole) noexcept nogil:
        # The receiver of flow dir d's SYN data took its bytes before seq upto (or,
        # whole, all of them): those go to the stream, ahead of anything after them;
        # the rest is dropped.
        cdef mbx_stream *h = &self.held[2 * pair + d]
        cdef mbx_stream *s = &self.streams[2 * pair + d]
        cdef int64_t keep = h.frontier if whole else <int32_t>(upto - h.seq0)
        self.meta[slot].mark |= MARK_SYN0 << d
        if keep < 0:
            keep = 0
        elif keep > <int64_t>h.frontier:
            keep = h.frontier
        self.syn_data_dropped += h.frontier - keep
        if keep and self.wants_stream(slot, p, d ^ tcp_client_dir(c)):
            if not self.meta[slot].mark & (MARK_INIT0 << d):
                stream_init(self.pool, s, h.seq0, self.policy)
                self.meta[slot].mark |= MARK_INIT0 << d
            self.take_held(p, slot, c, pair, d, h, keep)
        stream_free(self.pool, h)

    cdef void take_held(self, mbx_pkt *p, uint32_t slot, tcp_conn *c, uint32_t pair,
                        uint8_t d, mbx_stream *h, uint64_t keep) noexcept nogil:
        # The first keep bytes of SYN data held apart in h into flow dir d's
        # stream, which is initialised, as one segment.
        cdef mbx_stream *s = &self.streams[2 * pair + d]
        cdef uint64_t off = 0, before = s.frontier
        cdef const uint8_t *ptr
        cdef int k, fl = 0
        while off < keep:
            k = stream_read(self.pool, h, off, keep - off, &ptr)
            if k <= 0:
                break
            fl |= stream_add(self.pool, s, h.seq0 + <uint32_t>off, ptr, k)
            off += k
        self.add_flags(p, slot, c, s, d, fl, h.seq0, <uint32_t>keep)
        if s.frontier != before:
            self.data_ready(p, slot, c, pair, d, before)

    cdef void edge_hold(self, mbx_pkt *p, uint32_t slot, tcp_conn *c, uint32_t pair,
                        uint32_t seq) noexcept nogil:
        # p's data, refused as past its receiver's window edge (see the caller), into
        # the hold of its flow dir, which starts at the stream's frontier: a later
        # segment that starts before an earlier one keeps its head, and an overlap
        # is compared under the stream's policy (a conflict is published at the
        # stream's offset); bytes the pool refuses are a MEMCAP of the stream.
        cdef uint8_t d = p.dir
        cdef uint32_t k = 2 * pair + d
        cdef mbx_stream *e = &self.edge[k]
        cdef mbx_stream *s = &self.streams[k]
        cdef uint32_t end = seq + p.payload_len
        cdef mbx_msg *m
        cdef int fl
        if not e.live:
            stream_init(self.pool, e, s.seq0 + <uint32_t>s.frontier, self.policy)
            self.edge_lo[k] = seq
            self.edge_hi[k] = end
        if seq_lt(seq, self.edge_lo[k]):
            self.edge_lo[k] = seq
        if seq_gt(end, self.edge_hi[k]):
            self.edge_hi[k] = end
        fl = stream_add(self.pool, e, seq, p.data + p.payload_off, p.payload_len)
        if fl & STREAM_CONFLICT:
            self.conflicts += 1
            m = self.flow_tcp_msg(T_FLOW_TCP_OVERLAP_CONFLICT, p, slot, 0, c)
            if m != NULL:
                (<flow_tcp_body *>m.body).offset = <uint64_t>stream_offset_of(
                    s, e.seq0 + <uint32_t>e.conflict_off)
                (<flow_tcp_body *>m.body).stream_dir = d ^ tcp_client_dir(c)
                self.bus.publish(m)
        self.add_flags(p, slot, c, s, d, fl & (STREAM_MEMCAP | STREAM_PIECES), seq,
                       p.payload_len)

    cdef uint64_t edge_held_bytes(self, uint32_t k) noexcept nogil:
        # The bytes hold k has and no ACK took yet: those in [edge_lo, edge_hi) of its
        # delivered prefix and of its pieces, not the holes between them (never seen)
        cdef mbx_stream *e = &self.edge[k]
        cdef int64_t lo = stream_offset_of(e, self.edge_lo[k])
        cdef int64_t hi = stream_offset_of(e, self.edge_hi[k])
        cdef uint64_t off = 0, lim = e.frontier, total = 0
        cdef int64_t a, b
        cdef int i = -1
        while True:
            a = <int64_t>off if <int64_t>off > lo else lo
            b = <int64_t>lim if <int64_t>lim < hi else hi
            if a < b:
                total += <uint64_t>(b - a)
            i += 1
            if i >= e.n_ooo:
                return total
            stream_held_piece(self.pool, e, i, &off, &lim)

    cdef void edge_resent(self, mbx_pkt *p, uint32_t slot, tcp_conn *c, uint32_t pair,
                          uint32_t seq, uint32_t n) noexcept nogil:
        # p's n bytes from seq, sent into the window over the first byte held past
        # its edge and not taken yet (edge_lo): the receiver takes these, so they are
        # the stream's, and the held bytes they cover are not.  Those are compared
        # with them first (a difference is an OVERLAP_CONFLICT at its stream offset:
        # one of the two copies was not what the receiver got) and then let go; held
        # bytes beyond the segment stay held for the receiver's ACK, since a spurious
        # retransmission of the first of two held segments, or one byte injected
        # over the first, proves nothing about the rest.
        cdef uint8_t d = p.dir
        cdef uint32_t k = 2 * pair + d
        cdef mbx_stream *e = &self.edge[k]
        cdef uint32_t upto = seq + n if seq_lt(seq + n, self.edge_hi[k]) else self.edge_hi[k]
        cdef int64_t lo = stream_offset_of(e, self.edge_lo[k])
        cdef int64_t hi = stream_offset_of(e, upto)
        cdef const uint8_t *sent = p.data + p.payload_off
        cdef uint64_t off = 0, lim = e.frontier
        cdef int64_t a, b
        cdef const uint8_t *ptr
        cdef int i = -1, r, j
        cdef bint differ = False
        cdef mbx_msg *m
        while not differ:
            # the run [off, lim) of the hold (its prefix, then each piece), cut to
            # [lo, hi): held bytes the segment covers, compared up to the first
            # difference (one conflict per segment, as stream_add reports)
            a = <int64_t>off if <int64_t>off > lo else lo
            b = <int64_t>lim if <int64_t>lim < hi else hi
            while a < b and not differ:
                r = (stream_read(self.pool, e, <uint64_t>a, <size_t>(b - a), &ptr) if i < 0
                     else stream_read_held(self.pool, e, <uint64_t>a, <size_t>(b - a), &ptr))
                if r <= 0:
                    break
                j = 0
                while j < r and ptr[j] == sent[e.seq0 + <uint32_t>(a + j) - seq]:
                    j += 1
                if j < r:
                    differ = True
                    self.conflicts += 1
                    m = self.flow_tcp_msg(T_FLOW_TCP_OVERLAP_CONFLICT, p, slot, 0, c)
                    if m != NULL:
                        (<flow_tcp_body *>m.body).offset = <uint64_t>stream_offset_of(
                            &self.streams[k], e.seq0 + <uint32_t>(a + j))
                        (<flow_tcp_body *>m.body).stream_dir = d ^ tcp_client_dir(c)
                        self.bus.publish(m)
                a += r
            i += 1
            if i >= e.n_ooo:
                break
            stream_held_piece(self.pool, e, i, &off, &lim)
        if upto == self.edge_hi[k]:
            stream_free(self.pool, e)
        else:
            self.edge_lo[k] = upto

    cdef void edge_take(self, mbx_pkt *p, uint32_t slot, tcp_conn *c, uint32_t pair,
                        uint8_t d) noexcept nogil:
        # p's ACK covers the first byte held as past flow dir d's window and not
        # taken yet (edge_lo): the receiver took the bytes it covers, the window
        # having opened by an ACK the capture shows after them.  Those go into the
        # stream, from the hold's delivered prefix and its pieces beyond holes alike
        # (a hole among them is one the capture missed); bytes beyond the ACK stay
        # held, unproven.  The sender was seen sending what the ACK took, so that it
        # skips what the hold did not have, bytes the pool refused included, as a GAP.
        cdef uint32_t k = 2 * pair + d
        cdef mbx_stream *e = &self.edge[k]
        cdef mbx_stream *s = &self.streams[k]
        cdef conn_meta *meta = &self.meta[slot]
        cdef uint32_t first = self.edge_lo[k]
        cdef uint32_t upto = p.ack if seq_lt(p.ack, self.edge_hi[k]) else self.edge_hi[k]
        cdef int64_t lo = stream_offset_of(e, first), hi = stream_offset_of(e, upto)
        cdef uint64_t off = 0, lim = e.frontier, before = s.frontier
        cdef int64_t a, b
        cdef const uint8_t *ptr
        cdef int i = -1, r, fl = 0
        while True:
            # the run [off, lim) of the hold (its prefix, then each piece), cut to
            # [lo, hi): what is not taken yet and the ACK covers
            a = <int64_t>off if <int64_t>off > lo else lo
            b = <int64_t>lim if <int64_t>lim < hi else hi
            while a < b:
                r = (stream_read(self.pool, e, <uint64_t>a, <size_t>(b - a), &ptr) if i < 0
                     else stream_read_held(self.pool, e, <uint64_t>a, <size_t>(b - a), &ptr))
                if r <= 0:
                    break
                fl |= stream_add(self.pool, s, e.seq0 + <uint32_t>a, ptr, r)
                a += r
            i += 1
            if i >= e.n_ooo:
                break
            stream_held_piece(self.pool, e, i, &off, &lim)
        self.add_flags(p, slot, c, s, d, fl, first, upto - first)
        if s.frontier != before:
            self.data_ready(p, slot, c, pair, d, before)
        if not meta.mark & (MARK_HI0 << d) or seq_gt(upto, meta.sent_hi[d]):
            meta.sent_hi[d] = upto
            meta.mark |= MARK_HI0 << d
        self.edge_lo[k] = upto
        if upto == self.edge_hi[k]:
            stream_free(self.pool, e)

    cdef void data_ready(self, mbx_pkt *p, uint32_t slot, tcp_conn *c, uint32_t pair,
                         uint8_t d, uint64_t old_frontier) noexcept nogil:
        cdef mbx_stream *s = &self.streams[2 * pair + d]
        cdef uint8_t tdir = d ^ tcp_client_dir(c)
        cdef uint8_t flags = data_rdy_flags(tdir)
        s.probe_held = 0                # the frontier moved: a probe byte kept is old
        cdef mbx_msg *m
        cdef data_rdy_body *b
        cdef conn_sum *cs
        cdef uint64_t off
        cdef const uint8_t *ptr
        cdef int k
        if self.summarise:
            cs = self.sums[slot]
            if cs != NULL:
                off = old_frontier
                while off < s.frontier:
                    k = stream_read(self.pool, s, off, s.frontier - off, &ptr)
                    if k == -3:             # inside a skipped gap: no bytes there
                        off = stream_gap_end(self.pool, s, off)
                        continue
                    if k <= 0:
                        break
                    SHA256_Update(&cs.sha[d], ptr, k)
                    cs.len[d] += k
                    off += k
        if not self.touched_mark[pair]:
            self.touched_mark[pair] = 1
            # no reader yet: a skipped hole may release any delivered byte (the
            # summary above has hashed them)
            self.round_from[2 * pair] = NO_KEEP
            self.round_from[2 * pair + 1] = NO_KEEP
            self.touched[self.n_touched] = pair
            self.n_touched += 1
        if not self.bus.wants(T_DATA_RDY, slot, p.flow_gen, flags):
            return
        m = self.bus.new_msg(T_DATA_RDY, _type_ids[<int>T_DATA_RDY], p.ts_ns, slot, p.flow_gen,
                             p.index, p.dir ^ tcp_client_dir(c), PUBLISHER_STACK, self.pos)
        if m == NULL:
            return
        # The burst's NFs read this event's bytes, and may read what the other
        # direction delivered so far: holes skipped later in the burst keep both.
        if self.round_from[2 * pair + d] > old_frontier:
            self.round_from[2 * pair + d] = old_frontier
        if self.round_from[2 * pair + (d ^ 1)] > self.streams[2 * pair + (d ^ 1)].frontier:
            self.round_from[2 * pair + (d ^ 1)] = self.streams[2 * pair + (d ^ 1)].frontier
        m.h.flags = flags | cdir_flags(c)
        b = <data_rdy_body *>m.body
        b.offset = old_frontier
        b.frontier = s.frontier
        b.length = <uint32_t>(s.frontier - old_frontier)
        b.stream_dir = tdir
        tcp_snapshot(c, p.dir, s.frontier, p.ts_ns, m.h.snapshot)
        self.bus.publish(m)

    cpdef process(self, Batch batch):
        """One burst through the stack and the NFs, then the streams' delivered bytes
        (beyond what ``retain`` keeps) go back to the pool."""
        cdef uint32_t k
        # cpdef takes no "not None": None here would be read as a C struct.
        if batch is None:
            raise TypeError("Argument 'batch' has incorrect type (expected mbx._packet.Batch, "
                            "got NoneType)")
        self.current = batch
        if batch.count > self.after_cap:
            PyMem_Free(self.after)
            PyMem_Free(self.after_flow)
            self.after_cap = 0
            self.after = <tcp_conn *>PyMem_Malloc(batch.count * sizeof(tcp_conn))
            self.after_flow = <uint64_t *>PyMem_Malloc(batch.count * 8)
            if self.after == NULL or self.after_flow == NULL:
                raise MemoryError()
            self.after_cap = batch.count
        for k in range(batch.count):
            self.after_flow[k] = 0xFFFFFFFFFFFFFFFF
        NetworkLayer.process(self, batch)
        self.release_touched()

    cdef void release_touched(self) noexcept nogil:
        # The NFs are done with the DATA_RDY just dispatched: the pairs whose flow
        # ended go back to the pool, the others' delivered bytes (beyond retain).
        cdef uint32_t k, pair
        for k in range(self.n_touched):
            pair = self.touched[k]
            if self.touched_mark[pair] == 3:      # its flow ended during the burst
                self.free_pair_streams(pair)
            else:
                stream_release(self.pool, &self.streams[2 * pair],
                               self.streams[2 * pair].frontier)
                stream_release(self.pool, &self.streams[2 * pair + 1],
                               self.streams[2 * pair + 1].frontier)
            self.touched_mark[pair] = 0
        self.n_touched = 0

    cdef int finish(self, Batch batch, Port out) except -1:
        NetworkLayer.finish(self, batch, out)
        # RSTs the Monitor made for connections an NF terminated
        cdef mbx_pkt *ptrs[64]
        cdef uint32_t i
        cdef int n
        if out is not None and self.inject.count:
            for i in range(self.inject.count):
                ptrs[i] = &self.inject.pkts[i]
            with nogil:
                n = out.tx_burst(ptrs, self.inject.count)
            if n < 0:
                out.check()
        self.inject.clear()
        return 0

    # ---------------------------------------------------------------- mbx flows

    cdef void summary_packet(self, uint32_t slot, mbx_pkt *p) noexcept nogil:
        # close: "rst" when any segment had RST, valid or not (the brief of `mbx
        # flows`, as a capture tool reads it), else "fin" when any had FIN
        cdef conn_sum *cs = self.sums[slot]
        if cs == NULL:
            return
        cs.pkts[p.dir] += 1
        if p.tcp_flags & TH_RST:
            cs.close |= 2
        if p.tcp_flags & TH_FIN:
            cs.close |= 1

    cdef void summary_end(self, uint32_t slot, const mbx_flow *f) noexcept nogil:
        cdef conn_sum *cs = self.sums[slot]
        cdef tcp_conn *c = &self.conns[slot]
        cdef conn_record *r
        cdef uint8_t cdir, cli_side
        if cs == NULL:
            return
        self.sums[slot] = NULL
        if self.n_records == self.records_cap:
            r = <conn_record *>realloc(
                self.records, (self.records_cap * 2 + 1024) * sizeof(conn_record))
            if r == NULL:
                self.summary_oom += 1
                free(cs)
                return
            self.records = r
            self.records_cap = self.records_cap * 2 + 1024
        r = &self.records[self.n_records]
        self.n_records += 1
        cdir = tcp_client_dir(c)
        # flow dir 0 is the flow's first sender (canonical side init_side)
        cli_side = f.init_side ^ cdir
        flow_endpoints(f, cli_side, r.cli, r.srv, &r.cli_port, &r.srv_port)
        r.ip_ver = f.key.ip_ver
        r.vlan[0] = f.key.vlan[0]
        r.vlan[1] = f.key.vlan[1]
        r.handshake = (c.flags & (CONN_HS_SYN | CONN_HS_SYNACK | CONN_HS_ACK)) == (
            CONN_HS_SYN | CONN_HS_SYNACK | CONN_HS_ACK)
        r.close = cs.close
        r.c2s_len = cs.len[cdir]
        r.s2c_len = cs.len[cdir ^ 1]
        r.pkts_c2s = cs.pkts[cdir]
        r.pkts_s2c = cs.pkts[cdir ^ 1]
        r.first_pkt = cs.first_pkt
        SHA256_Final(r.c2s_sha, &cs.sha[cdir])
        SHA256_Final(r.s2c_sha, &cs.sha[cdir ^ 1])
        free(cs)

    def connections_summary(self):
        """The finished connections (``mbx flows``), in order of first packet."""
        out = []
        cdef size_t i
        cdef conn_record *r
        for i in range(self.n_records):
            r = &self.records[i]
            if r.ip_ver == 6:
                cli = ipaddress.IPv6Address(bytes(r.cli[:16])).compressed
                srv = ipaddress.IPv6Address(bytes(r.srv[:16])).compressed
                cli, srv = f"[{cli}]", f"[{srv}]"
            else:
                cli = str(ipaddress.IPv4Address(bytes(r.cli[:4])))
                srv = str(ipaddress.IPv4Address(bytes(r.srv[:4])))
            # in the key when it tells connections apart: the same endpoints in two
            # VLANs are two connections (VLAN ids in the flow key)
            vlans = ",".join(str(v) for v in vlan_ids(r.vlan))
            conn_key = f"{cli}:{r.cli_port}-{srv}:{r.srv_port}" + (
                f" vlan {vlans}" if vlans else "")
            out.append((r.first_pkt, conn_key, {
                "c2s_len": r.c2s_len, "c2s_sha256": bytes(r.c2s_sha[:32]).hex(),
                "s2c_len": r.s2c_len, "s2c_sha256": bytes(r.s2c_sha[:32]).hex(),
                "pkts_c2s": r.pkts_c2s, "pkts_s2c": r.pkts_s2c,
                "handshake": bool(r.handshake),
                "close": "rst" if r.close & 2 else ("fin" if r.close & 1 else "none"),
            }))
        out.sort(key=lambda rec: rec[0])
        return [(key, rec) for _, key, rec in out]

    # ---------------------------------------------------------------- NF side

    def terminate(self, ev):
        """FLOW/TCP/TERMINATE from an NF: RSTs to both endpoints, with the sequence
        numbers each expects, and the connection's later packets are dropped."""
        if ev.flow is None or ev.publisher == PUBLISHER_STACK:
            return False
        return self.terminate_flow(ev.flow, ev.burst_pos)

    def terminate_flow(self, flow, uint32_t pos):
        """Terminate ``flow`` as of burst position ``pos`` of the current burst (an
        NF's FLOW/TCP/TERMINATE: by event inline, by request from an NF process
        pipelined)."""
        if self.nf_side:
            raise MbxError("an NF process cannot change the TCP Monitor's state: "
                           "publish FLOW/TCP/TERMINATE")
        cdef uint32_t slot = <uint32_t>(flow & 0xFFFFFFFF)
        cdef uint32_t gen = <uint32_t>(flow >> 32)
        if slot >= self.capacity or self.meta[slot].gen != gen:
            return False                    # not a TCP connection we track (any more)
        if self.meta[slot].mark & MARK_KILLED:
            return False
        self.meta[slot].mark |= MARK_KILLED
        cdef Batch batch = self.current
        cdef mbx_pkt *tmpl = NULL
        cdef uint32_t i
        cdef tcp_conn *c = &self.conns[slot]
        if pos < self.after_cap and self.after_flow[pos] == slot | (<uint64_t>gen << 32):
            # the state as of the event: the later packets of this burst are dropped
            # below, the endpoints never see them
            c = &self.after[pos]
        cdef uint8_t cdir = tcp_client_dir(c)
        if batch is not None:
            for i in range(batch.count):
                if batch.pkts[i].flow == slot and batch.pkts[i].flow_gen == gen:
                    if tmpl == NULL:
                        tmpl = &batch.pkts[i]
                    if batch.pkts[i].index > pos:
                        batch.pkts[i].verdict = VERDICT_DROP
                        self.killed_drops += 1
        if tmpl == NULL or tmpl.l4_off == 0:
            return False
        # The RSTs leave after the burst's packets (finish), so they take the time of
        # its last one: an output capture stays in time order.
        cdef int64_t ts_ns = batch.pkts[batch.count - 1].ts_ns
        # to the server: as if sent by the client, and to the client: by the server
        self.craft_rst(tmpl, c, cdir, ts_ns)
        self.craft_rst(tmpl, c, cdir ^ 1, ts_ns)
        return True

    cdef int craft_rst(self, const mbx_pkt *tmpl, tcp_conn *c, uint8_t from_dir,
                       int64_t ts_ns) except -1:
        # A RST+ACK travelling in flow direction from_dir: its seq is what the
        # receiver expects next from that side, its ack what that side expects.
        cdef bint swap = tmpl.dir != from_dir
        cdef uint32_t l3 = tmpl.l3_off
        cdef uint32_t ip_len = 20 if tmpl.ip_ver == 4 else 40
        frame = bytearray(tmpl.data[:l3 + ip_len]) + bytearray(20)
        cdef uint8_t[::1] f = frame
        cdef uint8_t tmp[16]
        cdef uint32_t alen = 4 if tmpl.ip_ver == 4 else 16
        cdef uint32_t a_off = l3 + (12 if tmpl.ip_ver == 4 else 8)
        cdef uint32_t t = l3 + ip_len
        cdef uint32_t seq = c.ep[from_dir].snd_nxt
        cdef uint32_t ack = c.ep[from_dir ^ 1].snd_nxt
        cdef uint16_t sport = tmpl.sport, dport = tmpl.dport
        if swap:
            memcpy(tmp, &f[0], 6)
            memcpy(&f[0], &f[6], 6)
            memcpy(&f[6], tmp, 6)
            memcpy(tmp, &f[a_off], alen)
            memcpy(&f[a_off], &f[a_off + alen], alen)
            memcpy(&f[a_off + alen], tmp, alen)
            sport, dport = dport, sport
        if tmpl.ip_ver == 4:
            f[l3] = 0x45
            store16(&f[l3 + 2], 40)
            store16(&f[l3 + 4], 0)
            store16(&f[l3 + 6], 0x4000)
            f[l3 + 9] = 6
            store16(&f[l3 + 10], 0)
            store16(&f[l3 + 10], <uint16_t>(~csum_fold(csum_add(0, &f[l3], 20)) & 0xFFFF))
        else:
            store16(&f[l3 + 4], 20)
            f[l3 + 6] = 6
        store16(&f[t], sport)
        store16(&f[t + 2], dport)
        store16(&f[t + 4], seq >> 16)
        store16(&f[t + 6], seq & 0xFFFF)
        store16(&f[t + 8], ack >> 16)
        store16(&f[t + 10], ack & 0xFFFF)
        f[t + 12] = 5 << 4
        f[t + 13] = TH_RST | TH_ACK
        cdef mbx_pkt q
        memset(&q, 0, sizeof(mbx_pkt))
        q.data = &f[0]
        q.ip_ver = tmpl.ip_ver
        q.l4_off = t
        q.payload_off = t + 20
        q.payload_len = 0
        memcpy(q.src.b, &f[a_off], alen)
        memcpy(q.dst.b, &f[a_off + alen], alen)
        _tcp_checksum(&q)
        if self.inject.add(&f[0], len(frame), len(frame), ts_ns, tmpl.port) != NULL:
            self.rst_sent += 1
        return 0

    def counters_tcp(self):
        return {
            "tcp_packets": self.tcp_pkts, "tcp_unparsed": self.tcp_unparsed,
            "tcp_header_cut": self.tcp_header_cut,
            "bad_checksums": self.bad_checksums, "unverifiable": self.unverifiable,
            "cut_segments": self.cut_segments,
            "connections": self.connections, "new_connections": self.new_connections,
            "streams_opened": self.streams_opened, "streams_exhausted": self.pairs_exhausted,
            "gaps": self.gaps, "gap_bytes": self.gap_bytes,
            # of those: the bytes a snaplen cut off segments (not holes the capture
            # missed)
            "cut_gaps": self.cut_gaps, "cut_gap_bytes": self.cut_gap_bytes,
            # gaps that released bytes early (more held than STREAM_MAX_GAPS); holes
            # left for a later ACK because no block was free to hold their gap and
            # that would have released bytes whose DATA_RDY the burst's NFs had not
            # read yet; gap lists that were full with such bytes before the oldest
            # gap, so its two oldest gaps became one
            "gap_overflows": self.pool.gap_overflows,
            "gap_deferrals": self.pool.gap_deferrals,
            "gap_joins": self.pool.gap_joins,
            "conflicts": self.conflicts,
            # retransmitted bytes over stream bytes already released (beyond retain):
            # nothing left to compare them with, so a conflict there goes unseen
            "unchecked_bytes": self.pool.unchecked_bytes,
            "memcaps": self.memcaps, "memcaps_pieces": self.memcaps_pieces,
            "memcaps_streams": self.memcaps_streams, "memcaps_window": self.memcaps_window,
            "payload_after_close": self.after_close,
            "payload_after_fin": self.after_fin,
            "syn_data_dropped": self.syn_data_dropped,
            "edge_data_dropped": self.edge_data_dropped,
            "rst_sent": self.rst_sent,
            "dropped_terminated": self.killed_drops,
            "pool_chunks_in_use": self.pool.n_chunks - self.pool.n_free,
        }

    def counters(self):
        c = NetworkLayer.counters(self)
        c["tcp"] = self.counters_tcp()
        return c

    def read_stream(self, uint32_t slot, uint32_t gen, uint8_t tdir, uint64_t off,
                    uint64_t length, uint8_t flags=0, uint64_t run_from=0,
                    uint64_t run_to=0):
        """Stateless read of delivered stream bytes (``Event.read``): a zero-copy
        memoryview where they are contiguous in memory, else a copy.  ``flags``: the
        event's (``MSG_F_CDIR1``: the client's direction when it was published);
        ``[run_from, run_to)``: the bytes a DATA_RDY of this stream named."""
        cdef mbx_stream *s = self._stream(slot, gen, tdir, flags)
        cdef const uint8_t *ptr
        cdef int k = self._read_part(s, off, length, run_from, run_to, &ptr)
        if k < 0:
            raise MbxError(_READ_ERRORS.get(k, f"stream read error {k}").format(
                off=off, base=s.base, frontier=s.frontier))
        if k == length or k == 0:
            return memoryview(_StreamBytes.wrap(self, <uint8_t *>ptr, k))
        parts = [bytes(ptr[:k])]
        cdef uint64_t got = k
        while got < length:
            k = self._read_part(s, off + got, length - got, run_from, run_to, &ptr)
            if k <= 0:
                break
            parts.append(bytes(ptr[:k]))
            got += k
        return memoryview(b"".join(parts))

    cdef int _read_part(self, const mbx_stream *s, uint64_t off, uint64_t n,
                        uint64_t run_from, uint64_t run_to,
                        const uint8_t **ptr) noexcept nogil:
        # A DATA_RDY's own bytes were held and contiguous when it was published, and
        # stay held until its NFs are done; a full gap list may have joined gaps over
        # them since (stream_skip_hole), so they are read past the list.
        if run_from <= off < run_to:
            return stream_read_run(self.pool, s, off, min(n, run_to - off), ptr)
        return stream_read(self.pool, s, off, n, ptr)

    cdef mbx_stream *_stream(self, uint32_t slot, uint32_t gen, uint8_t tdir,
                             uint8_t flags) except NULL:
        # tdir counts from the client; the streams are kept by flow direction.  The
        # client's direction is the event's own (flags) where the Monitor published
        # it, else the flow's now.
        cdef uint32_t k, p
        cdef int cdir = (flags & MSG_F_CDIR1) != 0 if flags & MSG_F_CDIR_KNOWN else -1
        if tdir > 1:
            # tdir picks one of the pair's two streams and one MARK_INIT bit: any other
            # value names the next pair's stream (another connection's) or none
            raise MbxError(f"stream_dir must be 0 (client -> server) or 1 (server -> "
                           f"client), not {tdir}")
        if slot >= self.capacity or self.meta[slot].gen != gen or (
                self.meta[slot].pair == 0 and self.meta[slot].mark & MARK_DONE):
            # ended (or closed) during this burst: its streams stay until the
            # burst's end
            if self.nf_side:
                return self._ended_stream(slot, gen, tdir, cdir)
            for k in range(self.n_touched):
                p = self.touched[k]
                if (self.touched_mark[p] == 3
                        and self.pair_owner[p] == slot | (<uint64_t>gen << 32)):
                    return self._ended_pair_stream(p, tdir, cdir)
            raise MbxError("the event's flow has ended (or its connection closed): its "
                           "stream is gone")
        cdef uint32_t pair = (self.meta[slot].pair - 1)
        if cdir < 0:
            cdir = tcp_client_dir(&self.conns[slot])
        cdef uint8_t d = tdir ^ cdir
        if pair == NO_PAIR:
            raise MbxError("no stream is kept for this flow (an NF must subscribe to "
                           "DATA_RDY, for every flow or with up_sub for this one, to "
                           "have it reassembled)")
        if not self.meta[slot].mark & (MARK_INIT0 << d):
            raise MbxError("no byte of this stream has arrived yet")
        return &self.streams[2 * pair + d]

    cdef mbx_stream *_ended_stream(self, uint32_t slot, uint32_t gen, uint8_t tdir,
                                   int cdir) except NULL:
        # In an NF process the burst's list of touched pairs (n_touched is the
        # stack's private field) is not known: look through every pair's mark.
        cdef uint32_t p
        cdef uint64_t owner = slot | (<uint64_t>gen << 32)
        for p in range(self.max_pairs):
            if self.touched_mark[p] == 3 and self.pair_owner[p] == owner:
                return self._ended_pair_stream(p, tdir, cdir)
        raise MbxError("the event's flow has ended (or its connection closed): its "
                       "stream is gone")

    cdef mbx_stream *_ended_pair_stream(self, uint32_t p, uint8_t tdir,
                                        int cdir) except NULL:
        # pair p's flow ended this burst; pair_cdir is its client's direction then
        cdef mbx_stream *s = &self.streams[2 * p + (tdir ^ (self.pair_cdir[p] if cdir < 0
                                                            else cdir))]
        if not s.live:
            raise MbxError("the event's flow has ended (or its connection closed): its "
                           "stream is gone")
        return s

    def write_stream(self, nf, uint32_t slot, uint32_t gen, uint8_t tdir, uint64_t off,
                     data, uint8_t flags=0, uint64_t run_from=0, uint64_t run_to=0):
        """In-place rewrite of delivered stream bytes (same length) by a writer NF:
        the stream and the packets of this burst that carry those bytes change, and
        their TCP checksums follow.  Returns the bytes changed in packets.  Event.write
        checked that nf may write (against what it declared when the run started)."""
        if self.nf_side:
            raise PermissionDenied(
                f"NF {nf.name}: Event.write of stream bytes needs the inline "
                "deployment (in an NF process stream buffers are read-only Stack "
                "Memory, and no NF process may change them; run inline)")
        cdef const uint8_t[::1] new = data
        cdef uint64_t n = new.shape[0]
        cdef mbx_stream *s = self._stream(slot, gen, tdir, flags)
        cdef const uint8_t *ptr
        cdef uint64_t done = 0
        cdef int k
        if run_to and off + n > run_to:
            # judged against the DATA_RDY's frontier, not the stream's: the burst may
            # have delivered more already, bytes this NF was not shown (and how many
            # would depend on --burst)
            raise MbxError(f"NF {nf.name}: stream bytes [{off}, {off + n}) run past "
                           f"this DATA_RDY's frontier ({run_to}): not delivered yet")
        if off < s.base or off + n > s.frontier:
            raise MbxError(f"stream bytes [{off}, {off + n}) are not all held "
                           f"(held: [{s.base}, {s.frontier}))")
        while done < n:        # all of it writable first: never half a write
            k = self._read_part(s, off + done, n - done, run_from, run_to, &ptr)
            if k <= 0:
                raise MbxError(f"stream offset {off + done} cannot be written (gap)")
            done += k
        done = 0
        while done < n:
            k = self._read_part(s, off + done, n - done, run_from, run_to, &ptr)
            memcpy(<uint8_t *>ptr, &new[done], k)
            done += k
        # s is streams[2 * pair + flow dir]
        return self._patch_packets(slot, gen, <uint8_t>((s - self.streams) & 1), s, off,
                                   new)

    cdef uint64_t _patch_packets(self, uint32_t slot, uint32_t gen, uint8_t d,
                                 mbx_stream *s, uint64_t off,
                                 const uint8_t[::1] new) except? 0xFFFFFFFFFFFFFFFF:
        cdef Batch batch = self.current
        cdef uint32_t i
        cdef mbx_pkt *p
        cdef int64_t start
        # signed: a segment of the burst wholly before the stream's byte 0 (an old
        # or forged one) has an end below 0, to be skipped, not a huge length
        cdef int64_t lo, hi
        cdef uint64_t changed = 0, n = new.shape[0]
        if batch is None:
            return 0
        for i in range(batch.count):
            p = &batch.pkts[i]
            if (p.flow != slot or p.flow_gen != gen or p.dir != d or p.l4_proto != 6
                    or not p.payload_len or p.verdict == VERDICT_DROP):
                continue
            start = stream_offset_of(s, p.seq + (1 if p.tcp_flags & TH_SYN else 0))
            lo = max(<int64_t>off, start)
            hi = min(<int64_t>(off + n), start + <int64_t>p.payload_len)
            if lo >= hi:
                continue
            memcpy(p.data + p.payload_off + (lo - start), &new[lo - off], hi - lo)
            changed += hi - lo
            _tcp_checksum(p)
        return changed


cdef void _tcp_checksum(mbx_pkt *p) noexcept nogil:
    # Whole TCP checksum again (pseudo-header + segment): used only for segments an
    # NF rewrote, so its cost does not matter.  A checksum the sending interface
    # finishes (OFFLOAD_CSUM_PARTIAL) covers the new bytes by itself.
    cdef uint8_t *tcp = p.data + p.l4_off
    cdef uint32_t seg_len = p.payload_off + p.payload_len - p.l4_off
    cdef uint32_t s = 0
    if p.offload & OFFLOAD_CSUM_PARTIAL:
        return
    store16(tcp + 16, 0)
    if p.ip_ver == 4:
        s = csum_add(s, p.src.b, 4)
        s = csum_add(s, p.dst.b, 4)
        s += 6 + seg_len
    else:
        s = csum_add(s, p.src.b, 16)
        s = csum_add(s, p.dst.b, 16)
        s += (seg_len >> 16) + (seg_len & 0xFFFF) + 6
    s = csum_add(s, tcp, seg_len)
    store16(tcp + 16, <uint16_t>(~csum_fold(s) & 0xFFFF))


_READ_ERRORS = {
    -1: ("stream offset {off} is no longer held (held from {base}: the bytes before "
         "were released, or never arrived and were skipped as a gap)"),
    -2: "stream offset {off} is beyond the frontier ({frontier}): not delivered yet",
    -3: ("stream offset {off} lies in a gap the stream skipped (there are no bytes), "
         "or between gaps a full gap list joined (gap_joins: only the DATA_RDY that "
         "named those bytes reads them)"),
}


def _init_type_ids():
    for t in _events.event_types():
        if t.idx < 32:
            _type_ids[t.idx] = t.id


_init_type_ids()


cdef class _StreamBytes:
    # Exports stream bytes through the buffer protocol and keeps the Monitor (and
    # so the pool) alive; the bytes stay valid until the stream releases them.
    cdef object owner
    cdef uint8_t *ptr
    cdef Py_ssize_t length

    @staticmethod
    cdef _StreamBytes wrap(object owner, uint8_t *ptr, Py_ssize_t length):
        cdef _StreamBytes b = _StreamBytes.__new__(_StreamBytes)
        b.owner = owner
        b.ptr = ptr
        b.length = length
        return b

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        PyBuffer_FillInfo(buffer, self, self.ptr, self.length, 1, flags)

    def __releasebuffer__(self, Py_buffer *buffer):
        pass
