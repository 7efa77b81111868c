"""The Network Layer μStack: parse, reassemble fragments, track flows, publish
PKT and FLOW events, and hand finished packets to the output port.

Per burst: one pass without the GIL over the packets (parse, flow lookup, build the
events some NF wants), then dispatch with the GIL (NF handlers), then the packets
that passed go out.  Event Memory is fixed: when it runs low mid-burst the pass
stops, dispatches what it has, and resumes.
"""
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix.time cimport (
    CLOCK_MONOTONIC, CLOCK_REALTIME, CLOCK_THREAD_CPUTIME_ID, clock_gettime, timespec,
)

from mbx._events cimport (
    NO_PKT, PUBLISHER_STACK, T_FLOW_END, T_FLOW_START, T_PKT, EventBus, flow_body,
    mbx_msg, pkt_body,
)
from mbx._flow cimport (
    END_CLOSED, END_EVICTED, FlowTable, flow_count, flow_endpoints, flow_key_hash,
    flow_key_of, flow_trackable, mbx_flow, mbx_flow_key,
)
from mbx._packet cimport (
    NO_FLOW, PARSE_N, PARSE_NOT_IP, PARSE_OK, PARSE_TOO_MANY_VLAN_TAGS, PKT_F_FRAGMENT,
    PKT_F_RSS_HASH, PKT_F_STACK_DROP, PORT_EOF, PORT_ERROR, VERDICT_DROP, VERDICT_HELD,
    VERDICT_PASS, Batch, Port, clock_take, mbx_pkt,
)
from mbx._parse cimport (
    DEFRAG_DONE, DEFRAG_DROP, DEFRAG_HELD, DEFRAG_NO_ROOM, FragTable, parse_packet,
)
from mbx._rss cimport (
    RSS_FLOW, RSS_FRAGMENT, RSS_PARSE, rss_hash_of_frame, rss_share_of, rss_stack_of_frame,
    rss_stack_of_parsed,
)

from mbx import _events
from mbx._parse import status_names
from mbx.errors import MbxError, PortError

# what a malformed packet gets (``malformed=``)
MALFORMED_ACTIONS = ("forward", "drop")


cdef enum:
    CHUNK = 32      # packets parsed and looked up together


cdef inline double monotonic() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline double thread_cpu() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef void fill_flow_body(mbx_msg *m, const mbx_flow *f) noexcept nogil:
    cdef flow_body *b = <flow_body *>m.body
    b.ip_ver = f.key.ip_ver
    b.proto = f.key.proto
    b.end_reason = f.end_reason
    # the client is the flow's initiator (the flow table's init_side)
    flow_endpoints(f, f.init_side, b.cli_addr, b.srv_addr, &b.cli_port, &b.srv_port)
    b.pkts_c2s = f.pkts[0]
    b.pkts_s2c = f.pkts[1]
    b.bytes_c2s = f.bytes[0]
    b.bytes_s2c = f.bytes[1]
    b.first_ns = f.first_ns
    b.last_ns = f.last_ns
    b.vlan = f.key.vlan[0]
    b.inner_vlan = f.key.vlan[1]
    b.pad2 = 0
    if m.h.pkt != NO_PKT and m.h.ts_ns < f.last_ns:
        # An event of a packet shows the flow as of that packet, as its counts do:
        # the chunk's lookups have already moved last_ns on to the flow's later
        # packets in the same chunk (FlowTable._lookup_keyed)
        b.last_ns = m.h.ts_ns if m.h.ts_ns > f.first_ns else f.first_ns


cdef void fill_pkt_body(mbx_msg *m, const mbx_pkt *p) noexcept nogil:
    cdef pkt_body *b = <pkt_body *>m.body
    b.caplen = p.caplen
    b.wirelen = p.wirelen
    b.sport = p.sport
    b.dport = p.dport
    b.proto = p.l4_proto
    b.ip_ver = p.ip_ver
    b.tcp_flags = p.tcp_flags
    b.status = p.status
    memcpy(b.src, p.src.b, 16)
    memcpy(b.dst, p.dst.b, 16)


cdef class NetworkLayer:
    """The Network Layer μStack over an EventBus.

    ``flow_capacity`` flows are preallocated (Stack Memory); ``idle_timeout`` (s)
    ends idle flows; ``flow_policy`` is ``"evict"`` (end the least recently active
    flow for a new one) or ``"refuse"``; ``malformed`` is ``"forward"`` or ``"drop"``
    for packets the parser flags; fragments are reassembled within ``frag_memory``
    bytes and ``frag_timeout`` seconds.  ``vlan_in_flow_key`` (the default) keys
    flows by their outer two VLAN ids too: False for a middlebox that sees a
    connection's two directions in different VLANs.
    """

    def __init__(self, EventBus bus not None, *, uint32_t flow_capacity=65536,
                 double idle_timeout=60.0, str flow_policy="evict",
                 str malformed="forward", size_t frag_memory=4 << 20,
                 double frag_timeout=30.0, bint vlan_in_flow_key=True, rss=(0, 1)):
        if malformed not in MALFORMED_ACTIONS:
            raise ValueError(f"malformed must be 'forward' or 'drop', not {malformed!r}")
        self.flows = FlowTable(flow_capacity, idle_timeout=idle_timeout, policy=flow_policy,
                               vlan_in_flow_key=vlan_in_flow_key)
        self.flows.defer_count = True       # counted per packet in stack_pass
        self.frags = FragTable(max_bytes=frag_memory, timeout=frag_timeout)
        self.bus = bus
        bus.attach_flowtable(self.flows, flow_capacity)
        self.drop_malformed = malformed == "drop"
        self.events_per_pkt = 3
        # Room the stack leaves in Event Memory for what NFs publish on its events
        # in the same dispatch round: half, when an NF publishes inline (one
        # publication per event taken is the common case: flow_stats' FLOW/STATS
        # per FLOW/END).  Filled to the brim, a burst of tens of thousands of
        # packets left an NF no room to publish, and the run failed.  A burst of 64
        # makes at most a few hundred events, so only bursts near Event Memory's
        # size notice.  Pipelined, the NF processes have shares of their own.
        self.leave_half = type(bus) is EventBus and any(nf.pubs for nf in bus.nfs)
        self.rss_k, self.rss_n = rss
        if not 0 <= self.rss_k < self.rss_n:
            raise ValueError(f"rss must be (k, n) with 0 <= k < n, not {rss!r}")
        memset(self.status_count, 0, sizeof(self.status_count))
        self.now_ns = 0
        self.next_expire_ns = 0
        # Idle expiry is checked about ten times per timeout, not per packet.
        self.expire_every_ns = max(<int64_t>(idle_timeout * 1e8), 1000000)

    cdef uint32_t msg_room(self) noexcept nogil:
        # the part of Event Memory the stack fills this round (read each pass: the
        # pipelined bus changes its capacity from one burst's region to the next)
        if self.leave_half:
            return max(self.bus.msg_capacity // 2, 1)
        return self.bus.msg_capacity

    cdef bint room(self, uint32_t n) noexcept nogil:
        return self.bus.msg_used + n <= self.bus.msg_capacity

    cdef void publish_flow(self, uint16_t t, uint64_t type_id, const mbx_flow *f,
                           uint32_t slot, uint32_t pkt, uint8_t dir,
                           int64_t ts) noexcept nogil:
        cdef mbx_msg *m = self.bus.new_msg(t, type_id, ts, slot, f.gen, pkt, dir,
                                           PUBLISHER_STACK, self.pos)
        if m != NULL:
            fill_flow_body(m, f)
            self.bus.publish(m)

    cdef void publish_ended(self) noexcept nogil:
        # FLOW/END for the flows the table ended (evicted, idle, shutdown), as many
        # as Event Memory has room for; the list is cleared once all are out.
        cdef const mbx_flow *f
        cdef uint32_t slot
        while self.ended_pos < self.flows.n_ended:
            if not self.room(1):
                return
            f = &self.flows.ended[self.ended_pos]
            slot = self.flows.ended_slot[self.ended_pos]
            self.ended_pos += 1
            self.flow_ended(slot, f)
            if self.bus.wants(T_FLOW_END, slot, f.gen, 0):
                # an evicted flow ended when the packet that took its slot came, a
                # closed one when the SYN of the next connection did, not at the
                # latest time its chunk has seen
                self.publish_flow(T_FLOW_END, self.flow_end_id, f, slot, NO_PKT, 0,
                                  self.flows.ended_ns[self.ended_pos - 1]
                                  if f.end_reason == END_EVICTED
                                  or f.end_reason == END_CLOSED else self.now_ns)
        self.ended_pos = 0
        self.flows.clear_ended()

    cdef int drain_ended(self) except -1:
        self.pos = 0
        while self.flows.n_ended:
            self.publish_ended()
            self.bus.dispatch()
            self.bus.reset_pool()
        return 0

    cdef uint32_t stack_pass(self, Batch batch, uint32_t i) noexcept nogil:
        # Process packets from i on, a chunk at a time: parse (and defragment) the
        # chunk, look its flows up together (the table prefetches, so the cache
        # misses of a chunk overlap), then build the events.  Returns the index
        # reached: it stops early when Event Memory runs low, so the caller can
        # dispatch and resume.
        cdef mbx_pkt *p
        cdef mbx_pkt *tracked[CHUNK]
        cdef uint8_t created[CHUNK]
        cdef int64_t before[CHUNK]
        cdef int st, r, k, n, ntracked, owner, kind, start, done
        cdef bint counted
        cdef uint32_t free_msgs, room, h = 0
        cdef uint64_t want = self.bus.global_want
        while True:
            if self.flows.n_ended:
                # left over when Event Memory filled up, or ended by a transport
                # μStack after the chunk's lookup (the TCP Monitor's restart looks a
                # flow up again, which may evict one): out before the caller returns
                self.publish_ended()
                if self.flows.n_ended:
                    return i
            if i >= batch.count:
                return i
            # Room for the most events one packet can make (here: FLOW/END of a flow
            # evicted for it, FLOW/START, PKT; a transport μStack adds its own).
            room = self.msg_room()
            free_msgs = room - self.bus.msg_used if self.bus.msg_used < room else 0
            # A chunk's flows are looked up before its events are built, so a chunk
            # must not touch more flows than the table holds: the LRU would evict a
            # flow made earlier in the same chunk, whose FLOW/END would then come
            # before its FLOW/START and its packets would count for no flow.
            n = min(<uint32_t>CHUNK, self.flows.capacity, batch.count - i,
                    free_msgs // self.events_per_pkt)
            if n == 0:
                return i
            ntracked = 0
            for k in range(n):
                p = &batch.pkts[i + k]
                if clock_take(&self.now_ns, p.ts_ns, self.flows.clock_step_ns):
                    self.clock_stepped_back()
                st = -1
                if self.rss_n > 1 and self.rss_input is None:
                    # Software RSS here, for an input that cannot filter: another
                    # process's packet costs a short header walk, not a parse; the
                    # full parse decides where the walk cannot.  Fragments go on
                    # (below).
                    h = 0                   # stays 0 where there is no IP: stack 0
                    kind = rss_hash_of_frame(p.data, p.caplen, p.wirelen, &h)
                    if kind == RSS_PARSE:
                        st = parse_packet(p)
                        owner = rss_stack_of_parsed(p, self.rss_n)
                        if p.flags & PKT_F_FRAGMENT:
                            kind = RSS_FRAGMENT
                    else:
                        owner = rss_share_of(h, self.rss_n)
                        if kind == RSS_FLOW:
                            p.hash = h          # the flow table's own: not hashed again
                            p.flags |= PKT_F_RSS_HASH
                    if owner != <int>self.rss_k and kind != RSS_FRAGMENT:
                        p.verdict = VERDICT_HELD
                        self.rss_other += 1
                        continue
                if st < 0:
                    st = parse_packet(p)
                counted = True
                if p.flags & PKT_F_FRAGMENT and self.rss_n > 1:
                    # A fragment's ports are in its datagram's first fragment, if
                    # anywhere, so which stack owns the datagram's flow is known only
                    # once it is rebuilt: every stack rebuilds every datagram (the
                    # inputs give fragments to all), and counts the fragments its
                    # addresses pick (the hash of a key without ports), so that each
                    # is counted once.
                    counted = rss_stack_of_parsed(p, self.rss_n) == <int>self.rss_k
                if counted:
                    self.pkts += 1
                    self.bytes += p.wirelen
                    self.status_count[st] += 1
                elif self.rss_input is None:
                    self.rss_other += 1     # (an RSS input counts it in rss_skipped)
                if p.flags & PKT_F_FRAGMENT:
                    r = self.frags.defrag(batch, p, counted)
                    if r == DEFRAG_HELD:
                        self.frag_held += counted
                        continue
                    if r == DEFRAG_DROP:
                        # refused for what the table found (an overlap, no memory);
                        # a malformation the parser found was counted above.  Dropped
                        # whatever `malformed` says (a fragment goes on only as part
                        # of its datagram), and counted with the drops, so that every
                        # packet read is sent, held or dropped somewhere
                        if p.status != st:
                            self.status_count[p.status] += counted
                        self.frag_dropped += counted
                        continue
                    if r == DEFRAG_NO_ROOM:
                        # rebuilt, but with no room in this burst to go out: dropped
                        # and counted by the stack that owns its flow, whoever counted
                        # the fragment (the one its addresses pick), as it would have
                        # sent it; the others leave it to that one (defrag's _rebuild)
                        if (self.rss_n > 1 and rss_stack_of_parsed(p, self.rss_n)
                                != <int>self.rss_k):
                            p.verdict = VERDICT_HELD
                            continue
                        self.frags.drop_no_room(p)
                        self.status_count[p.status] += 1
                        self.frag_dropped += 1
                        continue
                    st = p.status
                    if self.rss_n > 1 and (
                            rss_stack_of_parsed(p, self.rss_n) != <int>self.rss_k
                            if r == DEFRAG_DONE else not counted):
                        # a rebuilt datagram of another stack's flow, or a fragment
                        # passed on as it is (cut short by the capture) that the
                        # stack its addresses pick passes on: that stack sends it
                        p.verdict = VERDICT_HELD
                        continue
                    if r == DEFRAG_DONE and st != PARSE_OK:
                        # The rebuilt datagram was parsed anew, past the headers its
                        # fragments showed: a malformation there (a lying UDP length)
                        # is counted as it would be unfragmented, by the stack that
                        # owns its flow, which is the one that drops it.
                        self.status_count[st] += 1
                if (st != PARSE_OK and st != PARSE_NOT_IP
                        and st != PARSE_TOO_MANY_VLAN_TAGS and self.drop_malformed):
                    p.verdict = VERDICT_DROP
                    p.flags |= PKT_F_STACK_DROP
                    self.malformed_dropped += 1
                    continue
                tracked[ntracked] = p
                ntracked += 1
            start = 0
            while start < ntracked:
                # one pass, unless a flow of the chunk went idle within it: then
                # its packets before the pause are handled, and its FLOW/END
                # published, before the packet that starts the next flow
                done = start + self.flows.lookup_burst(tracked + start, ntracked - start,
                                                       created + start, before + start)
                self.chunk_events(batch, tracked, created, before, start, done, want)
                start = done
            i += n

    cdef void chunk_events(self, Batch batch, mbx_pkt **tracked, uint8_t *created,
                           int64_t *before, int start, int done,
                           uint64_t want) noexcept nogil:
        # The events of tracked[start:done], looked up together.
        cdef int k
        cdef mbx_pkt *p
        cdef uint32_t slot
        cdef mbx_msg *m
        for k in range(start, done):
            self.prefetch(tracked[k])
        if self.flows.n_ended:
            # FLOW/END of flows evicted (or gone idle) for this chunk's new ones,
            # first
            self.pos = tracked[start].index
            self.publish_ended()
        for k in range(start, done):
            p = tracked[k]
            self.pos = p.index
            slot = p.flow
            if slot != NO_FLOW and self.flows.flows[slot].gen == p.flow_gen:
                # (a transport μStack may have restarted the flow since the
                # chunk's lookup: then it counts the packet itself)
                flow_count(&self.flows.flows[slot], p)
            if (slot != NO_FLOW and created[k] and want & (1 << T_FLOW_START)
                    and self.bus.wants(T_FLOW_START, slot, p.flow_gen, 0)):
                self.publish_flow(T_FLOW_START, self.flow_start_id,
                                  &self.flows.flows[slot], slot, p.index, p.dir,
                                  p.ts_ns)
            # (the chunk's lookups have moved the flow's last_ns past this packet:
            # a transport that ends the flow at it needs the time before)
            self.last_before = before[k]
            if slot != NO_FLOW and self.transport(batch, p):
                continue            # the transport μStack published its events
            if want & (1 << T_PKT) and self.bus.wants(T_PKT, slot, p.flow_gen, 0):
                m = self.bus.new_msg(T_PKT, self.pkt_id, p.ts_ns, slot, p.flow_gen,
                                     p.index, p.dir, PUBLISHER_STACK, self.pos)
                if m != NULL:
                    fill_pkt_body(m, p)
                    self.bus.publish(m)

    cdef void flow_ended(self, uint32_t slot, const mbx_flow *f) noexcept nogil:
        # A μStack extending this one frees what it kept for the flow here.
        pass

    cdef void prefetch(self, mbx_pkt *p) noexcept nogil:
        # ... and asks for its per-flow state early, a chunk at a time.
        pass

    cdef bint transport(self, Batch batch, mbx_pkt *p) noexcept nogil:
        # A μStack that extends this one (the TCP Monitor) does its per-packet work
        # here, after the flow lookup; True when it published the packet's events
        # itself (a more specific PKT type), so PKT is not published again.
        return False

    cpdef process(self, Batch batch):
        """Run one burst through the stack and the NFs; verdicts are then final."""
        cdef uint32_t i = 0
        # cpdef takes no "not None": None here would be read as a C struct.
        if batch is None:
            raise TypeError("Argument 'batch' has incorrect type (expected mbx._packet.Batch, "
                            "got NoneType)")
        self.flow_start_id = _events.FLOW_START.id
        self.flow_end_id = _events.FLOW_END.id
        self.pkt_id = _events.PKT.id
        self.bus.attach_batch(batch)
        self.bursts += 1
        if self.msg_room() < self.bus.msg_used + self.events_per_pkt:
            raise MbxError(
                f"Event Memory: {self.msg_room() - min(self.bus.msg_used, self.msg_room())} "
                f"messages per dispatch round (of {self.bus.msg_capacity}: half is left "
                "to what NFs publish when one publishes), this stack needs "
                f"{self.events_per_pkt} for one packet: raise msg_capacity (pipelined, "
                "the bursts in flight share it)")
        while i < batch.count or self.flows.n_ended:
            with nogil:
                i = self.stack_pass(batch, i)
            self.passed = i             # what the packets from i on missed, if NFs fail
            self.bus.dispatch()
            self.bus.reset_pool()
        if self.now_ns >= self.next_expire_ns:
            self.expire(self.now_ns)
            self.next_expire_ns = self.now_ns + self.expire_every_ns

    cdef void clock_stepped_back(self) noexcept nogil:
        # The clock went back to a packet's time (clock_take): the next idle check
        # is due an interval from there, not from the time it left.
        self.clock_steps_back += 1
        self.next_expire_ns = self.now_ns + self.expire_every_ns

    def expire(self, int64_t now_ns):
        """End flows (and fragment queues) idle at ``now_ns``; publish FLOW/END."""
        self.frags.expire(now_ns)
        self.drain_ended()
        while self.flows.expire(now_ns):
            self.drain_ended()

    def shutdown(self):
        """End every flow (FLOW/END, reason shutdown) at the end of the input."""
        # datagrams past their time by the input's clock timed out; the rest were
        # cut off by the end of the input
        self.frags.expire(self.now_ns)
        self.frags.end_all()
        self.drain_ended()
        while self.flows.end_all():
            self.drain_ended()

    cdef int finish(self, Batch batch, Port out) except -1:
        # Completion: every NF is done with the burst; send what passed, in order.
        cdef mbx_pkt *ptrs[256]
        cdef uint32_t i = 0
        cdef int k, n
        cdef uint64_t taken
        while i < batch.count:
            k = 0
            while i < batch.count and k < 256:
                if batch.pkts[i].verdict == VERDICT_PASS:
                    if out is not None:
                        ptrs[k] = &batch.pkts[i]
                        k += 1
                elif (batch.pkts[i].verdict == VERDICT_DROP
                      and not batch.pkts[i].flags & PKT_F_STACK_DROP):
                    self.nf_dropped += 1
                i += 1
            if k:
                taken = out.tx_pkts + out.tx_lost
                with nogil:
                    n = out.tx_burst(ptrs, k)
                if n == PORT_ERROR:
                    # The output failed: what it took before that is sent (and what
                    # a capture writer then lost is in its tx_lost, see counters());
                    # the rest of the chunk and of the burst was never sent, and
                    # every packet stays accounted for.
                    n = <int>min(out.tx_pkts + out.tx_lost - taken, <uint64_t>k)
                    self.sent += n
                    self.error_dropped += k - n
                    self.fail_burst(batch, i, batch.count)
                    out.check()                 # raises what the port recorded
                    return 0
                self.sent += n
        return 0

    cdef void fail_burst(self, Batch batch, uint32_t start,
                         uint32_t passed) noexcept nogil:
        # The run failed with this burst in flight (an NF's handler raised): it is
        # never finished, so each packet finish would have sent is counted dropped on
        # the error, and each an NF dropped as its drop; every packet read stays
        # accounted for.  The packets from `passed` on never met the stack pass (it
        # had stopped for Event Memory): counted read here, and dropped, unless
        # software RSS leaves them to another stack process, as the pass would have.
        # Those before `start` were counted already (finish() sent them).
        cdef uint32_t i
        cdef mbx_pkt *p
        for i in range(start, passed):
            p = &batch.pkts[i]
            if p.verdict == VERDICT_PASS:
                self.error_dropped += 1
            elif p.verdict == VERDICT_DROP and not p.flags & PKT_F_STACK_DROP:
                self.nf_dropped += 1
        for i in range(passed, batch.count):
            p = &batch.pkts[i]
            if self.rss_n > 1 and self.rss_input is None:
                parse_packet(p)
                if rss_stack_of_parsed(p, self.rss_n) != <int>self.rss_k:
                    self.rss_other += 1
                    continue
            self.pkts += 1
            self.bytes += p.wirelen
            self.error_dropped += 1

    def run(self, Port inp not None, Port out=None, *, uint32_t burst=64,
            uint64_t max_packets=0,
            progress=None, double progress_every=0.5, double duration=0, stop=None,
            batches=None):
        """Read ``inp`` through the stack and the NFs to ``out`` until the input ends,
        ``max_packets`` were read, ``duration`` seconds passed, or ``stop`` (anything
        with ``is_set()``, e.g. a threading.Event) is set; then every flow ends.
        ``stopped`` says afterwards whether ``stop`` or ``duration`` ended it before its
        input did (the counters are of part of the input; a ``stop`` set already when
        it is called: nothing is read), ``timed_out`` whether it was ``duration``: on a
        capture as on a live port, a time box.

        ``progress(stack)`` is called about every ``progress_every`` seconds.  A
        deployment that shares bursts with other processes passes its ``batches``:
        with several, as many bursts are in flight (the next is read and processed
        while the NFs still work on earlier ones); each is sent once the bus says
        every NF is done with it (``EventBus.burst_done``), in the order read.
        """
        if not batches:
            batches = [Batch(burst)]
        cdef uint32_t nslots = len(batches)
        cdef uint32_t head = 0          # the oldest burst in flight ...
        cdef uint32_t inflight = 0      # ... and how many there are
        cdef uint32_t marks[64]
        cdef double t_read[64]          # when each burst in flight was read
        cdef Batch batch
        if self.rss_n > 1 and inp.rss_share(self.rss_k, self.rss_n):
            self.rss_input = inp        # it counts what it passed over
            inp.clock_step_ns = self.flows.clock_step_ns    # its walk keeps our clock
        cdef int n
        cdef double now = monotonic()
        cdef double started = now
        cdef double cpu_started = thread_cpu()
        cdef double next_report = now + progress_every
        cdef double next_check = now + 0.05
        cdef double deadline = now + duration if duration > 0 else 0
        cdef uint64_t limit = max_packets
        cdef uint32_t idle = 0, full
        cdef bint live = bool(getattr(inp, "live", False))
        cdef bint processing = False    # the burst just read is in process()
        cdef timespec wall
        cdef object failure = None
        cdef uint64_t shut_before
        if nslots > 64:
            raise ValueError(f"at most 64 bursts in flight, not {nslots}")
        for batch in batches:
            # room kept for datagrams rebuilt in the burst (five of 64 KiB by default)
            batch.rebuild_room = batch.arena_size // 2
        self.finishing = False
        # A stop that came before the first burst (a signal while the output waited
        # for its link) reads nothing: the burst read before the first look at the
        # flag could be the whole input of a capture, sent to a link that is not up.
        self.stopped = stop is not None and stop.is_set()
        self.timed_out = False
        self.output = out
        self.output_lost_at_start = out.tx_lost if out is not None else 0
        try:
            try:
                while not self.stopped:
                    if inflight == nslots:
                        # every slot is in flight: the oldest burst must leave first
                        self.retire(batches[head], marks[head], out, True, t_read[head])
                        head = (head + 1) % nslots
                        inflight -= 1
                    batch = batches[(head + inflight) % nslots]
                    batch.clear()
                    full = 0
                    if limit and limit - self.pkts < batch.capacity:
                        # read no more than the limit: frames read past it would be lost
                        full = batch.capacity
                        batch.capacity = <uint32_t>(limit - self.pkts)
                    # With bursts in flight, a quiet input must not hold up their sending
                    # (see Port.rx_nowait): they are waited for below when nothing came.
                    inp.rx_nowait = inflight > 0
                    with nogil:
                        n = inp.rx_burst(batch)
                    inp.rx_nowait = False
                    if full:
                        batch.capacity = full
                    if n == PORT_ERROR:
                        try:
                            inp.check()
                        except PortError as exc:
                            # The input failed (an interface deleted, a damaged capture):
                            # what was read still goes out and every flow still ends, as at
                            # the end of the input; then the error is raised.
                            failure = exc
                            break
                    if n == PORT_EOF:
                        break
                    if limit and self.pkts + batch.count > limit:
                        batch.count = <uint32_t>(limit - self.pkts)
                    if batch.count:
                        t_read[(head + inflight) % nslots] = monotonic()
                        self.passed = 0
                        processing = True
                        self.process(batch)
                        processing = False
                        marks[(head + inflight) % nslots] = self.bus.burst_mark()
                        inflight += 1
                    if inp.walked_ns and inp.walked_ns != self.now_ns:
                        # Software RSS on a capture: the other stack processes' frames move
                        # the capture's clock too, so that flows go idle in capture time as
                        # with one stack (not only when this process's next frame comes)
                        if clock_take(&self.now_ns, inp.walked_ns, self.flows.clock_step_ns):
                            self.clock_stepped_back()
                        if self.now_ns >= self.next_expire_ns:
                            self.expire(self.now_ns)
                            self.next_expire_ns = self.now_ns + self.expire_every_ns
                    # send what the NFs are done with (a live link that went quiet: all of it)
                    while inflight and self.retire(batches[head], marks[head], out, n == 0,
                                                   t_read[head]):
                        head = (head + 1) % nslots
                        inflight -= 1
                    if limit and self.pkts >= limit:
                        break
                    # Live ports return 0 when nothing came in time: look at the clock and
                    # the stop flag then, and every 64 bursts or 50 ms otherwise (bursts
                    # that slow NFs make long would leave a Ctrl-C waiting for 64 of them).
                    idle += 1
                    if n == 0 or idle >= 64 or monotonic() >= next_check:
                        idle = 0
                        now = monotonic()
                        next_check = now + 0.05
                        if deadline and now >= deadline:
                            self.stopped = self.timed_out = True
                            break
                        if stop is not None and stop.is_set():
                            # told apart from the input's end: the counters are of part of it
                            self.stopped = True
                            break
                        if live and n == 0:
                            # a quiet live link: flows still go idle by the clock
                            clock_gettime(CLOCK_REALTIME, &wall)
                            self.expire(wall.tv_sec * 1000000000 + wall.tv_nsec)
                        if progress is not None and now >= next_report:
                            progress(self)
                            next_report = now + progress_every
                while inflight:
                    self.retire(batches[head], marks[head], out, True, t_read[head])
                    head = (head + 1) % nslots
                    inflight -= 1
            except Exception as exc:
                if not self.finishing:
                    raise
                # The output failed (finish() raised what the port recorded, having
                # counted the burst it failed on): as after an input's error, every flow
                # still ends (FLOW/END, counted shutdown), then the error is raised.
                # Nothing more goes to the failed output: the NFs finish the bursts
                # still in flight, and their packets are counted dropped on the error.
                self.finishing = False
                head = (head + 1) % nslots
                inflight -= 1
                if failure is None:
                    failure = exc
                while inflight:
                    self.bus.burst_done(batches[head], marks[head], True)
                    batch = batches[head]
                    self.fail_burst(batch, 0, batch.count)
                    head = (head + 1) % nslots
                    inflight -= 1
            shut_before = self.flows.shut
            self.shutdown()
            if failure is not None or self.stopped:
                # ended before the input's end, by a stop (a signal, the duration, a
                # parent stopping the other stacks of a failed run) or by the port's
                # error: the summary tells them from flows that ended with the input,
                # which an error after the run (an NF's stop() raising) leaves so
                self.shut_early += self.flows.shut - shut_before
            self.bus.burst_done(None, self.bus.burst_mark(), True)
            self.run_s += monotonic() - started
            self.run_cpu_s += thread_cpu() - cpu_started
            if progress is not None:
                progress(self)
        except BaseException:
            # The run failed (an NF's handler raised, or a second stop signal
            # interrupted one): the bursts in flight are never sent.  Their packets
            # are counted (dropped_on_error), so that a failed run's counters still
            # add up to the packets read.  (An output's failure ends the flows first,
            # above; a burst finish() was in when interrupted counted itself.)
            if processing:
                self.fail_burst(batches[(head + inflight) % nslots], 0, self.passed)
            if inflight and self.finishing:
                head = (head + 1) % nslots
                inflight -= 1
            while inflight:
                batch = batches[head]
                self.fail_burst(batch, 0, batch.count)
                head = (head + 1) % nslots
                inflight -= 1
            raise
        if failure is not None:
            raise failure

    cdef bint retire(self, Batch batch, uint32_t mark, Port out, bint wait,
                     double t_read) except -1:
        # Completion: when every NF is done with the burst (processed up to the bus's
        # mark), send what passed.  True once the burst has left its slot.
        if not self.bus.burst_done(batch, mark, wait):
            if not wait:
                return False
            # Waited for, and still not done: the bus gave up on its NFs (a stop that
            # an NF process holding an epoch outlasted, see PipeBus.stop_pending).
            # The burst is never sent; its packets are counted as a failed run's
            # are, or they would vanish from the totals.
            self.fail_burst(batch, 0, batch.count)
            return True
        self.finishing = True
        self.finish(batch, out)
        self.finishing = False
        self.latency_s += monotonic() - t_read
        self.retired += 1
        return True

    def counters(self):
        """Everything counted so far, as a plain dict."""
        cdef int i
        names = status_names()
        parse = {}
        for i in range(<int>PARSE_N):
            if self.status_count[i] and i != <int>PARSE_OK:
                parse[names[i]] = self.status_count[i]
        # what the output took and then lost (a capture writer's buffer whose write
        # failed, at the latest as it closed) was never sent
        lost = (self.output.tx_lost - self.output_lost_at_start
                if self.output is not None else 0)
        return {
            "packets": self.pkts,
            "bytes": self.bytes,
            "sent": self.sent - lost,
            "dropped_by_nf": self.nf_dropped,
            "dropped_malformed": self.malformed_dropped,
            "dropped_fragments": self.frag_dropped,
            "dropped_on_error": self.error_dropped + lost,
            "other_stacks": self.rss_other + (
                self.rss_input.rss_skipped if self.rss_input is not None else 0),
            "fragments_held": self.frag_held,
            "clock_steps_back": self.clock_steps_back,
            "parse": parse,
            "flows": {
                "capacity": self.flows.capacity,
                "created": self.flows.created, "active": self.flows.active,
                "expired": self.flows.expired, "evicted": self.flows.evicted,
                "closed": self.flows.closed, "shutdown": self.flows.shut,
                "shutdown_early": self.shut_early,
                "refused": self.flows.refused,
            },
            "fragments": {
                "held": self.frags.held, "held_completed": self.frags.held_completed,
                "held_discarded": self.frags.held_discarded,
                "held_pending": self.frags.held_pending,
                "completed": self.frags.completed,
                "timed_out": self.frags.timed_out,
                "pending_at_end": self.frags.pending_at_end,
                "memcap_drops": self.frags.memcap_drops,
                "bad": self.frags.bad, "no_room": self.frags.no_room,
                "too_many": self.frags.too_many,
            },
            "events": self.bus.counters(),
            # Clock readings, apart so that the counts above compare across runs.
            # Bursts completed and their total time from read to send (the mean is
            # what a packet waited in the stack and the NFs; totals, so that the
            # counters of parallel stacks add up), and the time in run() from the
            # first read to the last FLOW/END done (a deployment's start and stop,
            # such as forking NF processes, excluded).
            "timing": {"bursts_done": self.retired, "burst_wait_s": self.latency_s,
                       "run_s": self.run_s, "run_cpu_s": self.run_cpu_s},
        }


def rss_owners(frame, uint32_t n, wirelen=None):
    """Software RSS on one frame over ``n`` stacks (``wirelen``: the frame's length on
    the wire, when it was captured cut short): (the short header walk's answer,
    or -1 where it defers to the parser; the answer after the full parse; the hash
    the walk hands to the flow table, or None where the table hashes the key itself;
    the flow table's hash of the parsed frame's key, or None where it tracks none).

    Tests and tools only: the stack decides on its own batches.  Wherever the first
    is not -1 the first two must be equal, or a flow's directions could part; where
    the third and the fourth are not None they must be equal, or the table would file
    a flow's packets under two hashes.
    """
    cdef const uint8_t[::1] view = frame
    cdef uint32_t caplen = view.shape[0]
    cdef Batch b = Batch(1, caplen + 16)
    cdef mbx_pkt *p
    cdef mbx_flow_key key
    cdef uint32_t h = 0
    cdef int kind
    if n == 0:
        raise ValueError("rss_owners: n (the number of stacks) must be at least 1")
    p = b.add(&view[0] if caplen else <const uint8_t *>b"", caplen,
              caplen if wirelen is None or wirelen < caplen else wirelen, 0, 0)
    fast = rss_stack_of_frame(p.data, p.caplen, p.wirelen, n)
    kind = rss_hash_of_frame(p.data, p.caplen, p.wirelen, &h)
    parse_packet(p)
    table = None
    if flow_trackable(p):
        flow_key_of(p, &key, False)     # (the hash is the same with the VLANs)
        table = flow_key_hash(&key)
    return fast, rss_stack_of_parsed(p, n), h if kind == RSS_FLOW else None, table
