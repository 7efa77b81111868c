# The Network Layer μStack: the first stack every packet meets.  Later μStacks (the
# TCP Monitor) extend it, so its state and steps are declared here.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from mbx._events cimport EventBus, mbx_msg
from mbx._flow cimport FlowTable, mbx_flow
from mbx._packet cimport PARSE_N, Batch, Port, mbx_pkt
from mbx._parse cimport FragTable


# The bodies of FLOW and PKT messages, filled from the flow record and the packet.
cdef void fill_flow_body(mbx_msg *m, const mbx_flow *f) noexcept nogil
cdef void fill_pkt_body(mbx_msg *m, const mbx_pkt *p) noexcept nogil


cdef class NetworkLayer:
    cdef readonly FlowTable flows
    cdef readonly FragTable frags
    cdef readonly EventBus bus
    cdef uint64_t status_count[PARSE_N]
    cdef readonly uint64_t pkts
    cdef readonly uint64_t bytes
    cdef readonly uint64_t malformed_dropped
    cdef readonly uint64_t frag_dropped     # fragments the reassembly table refused
    cdef readonly uint64_t frag_held
    cdef readonly uint64_t nf_dropped
    cdef readonly uint64_t sent
    # in flight when the run failed, or when a stop gave up on the NF processes:
    # never sent (with what the output took and a failed write then lost:
    # counters() adds its tx_lost)
    cdef readonly uint64_t error_dropped
    cdef uint32_t passed            # packets of the burst in process() the pass reached
    cdef bint finishing             # finish() is sending a burst (an output may fail)
    # The output of the last run, and its tx_lost when the run began: what it took
    # and then lost (a capture writer's failed write) counters() moves from sent.
    cdef Port output
    cdef uint64_t output_lost_at_start
    cdef readonly uint64_t bursts
    cdef readonly uint64_t retired      # bursts sent (or finished without an output)
    cdef readonly double latency_s      # their total time from read to send
    cdef readonly double run_s          # time spent in run()
    cdef readonly double run_cpu_s      # the running thread's CPU time in run()
    cdef readonly bint stopped          # the last run() ended on its stop flag or duration
    cdef readonly bint timed_out        # ... on its duration
    cdef readonly uint64_t shut_early   # flows ended before the input's end (stop, failure)
    cdef bint drop_malformed
    cdef int64_t now_ns
    cdef int64_t next_expire_ns
    cdef readonly uint64_t clock_steps_back   # times clock_take stepped now_ns back
    cdef int64_t expire_every_ns
    cdef uint32_t ended_pos         # FLOW/END published so far from the ended list
    cdef uint32_t pos               # burst position of the packet being processed
    cdef int64_t last_before        # when its flow had its previous packet (transport)
    cdef uint64_t flow_start_id     # type ids, read once per burst
    cdef uint64_t flow_end_id
    cdef uint64_t pkt_id
    cdef uint32_t events_per_pkt    # most events one packet can make (Event Memory room)
    cdef bint leave_half            # fill half of Event Memory a round (NFs publish)
    cdef uint32_t rss_k             # this stack process's share of the flows ...
    cdef uint32_t rss_n             # ... out of rss_n (software RSS)
    cdef readonly uint64_t rss_other    # packets left to the other stack processes
    cdef Port rss_input                 # an input that leaves them unread, if any

    cdef uint32_t msg_room(self) noexcept nogil
    cdef bint room(self, uint32_t n) noexcept nogil
    cdef void clock_stepped_back(self) noexcept nogil
    cdef void publish_flow(self, uint16_t t, uint64_t type_id, const mbx_flow *f,
                           uint32_t slot, uint32_t pkt, uint8_t dir,
                           int64_t ts) noexcept nogil
    cdef void publish_ended(self) noexcept nogil
    cdef int drain_ended(self) except -1
    cdef uint32_t stack_pass(self, Batch batch, uint32_t i) noexcept nogil
    cdef void chunk_events(self, Batch batch, mbx_pkt **tracked, uint8_t *created,
                           int64_t *before, int start, int done,
                           uint64_t want) noexcept nogil
    cdef bint transport(self, Batch batch, mbx_pkt *p) noexcept nogil
    cdef void flow_ended(self, uint32_t slot, const mbx_flow *f) noexcept nogil
    cdef void prefetch(self, mbx_pkt *p) noexcept nogil
    cpdef process(self, Batch batch)
    cdef int finish(self, Batch batch, Port out) except -1
    cdef void fail_burst(self, Batch batch, uint32_t start, uint32_t passed) noexcept nogil
    cdef bint retire(self, Batch batch, uint32_t mark, Port out, bint wait,
                     double t_read) except -1
