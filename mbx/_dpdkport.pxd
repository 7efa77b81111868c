# The DPDK port: an ethdev (a vdev attached by name, or a port EAL already probed)
# behind the Port interface.  Declared here so other extensions can cimport DpdkPort
# and call rx_burst/tx_burst directly; only this module includes DPDK's headers.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from mbx._dpdk cimport rte_mbuf, rte_mempool
from mbx._packet cimport Batch, Port, mbx_pkt

cdef enum:
    # The most mbufs asked of the driver in one call (and held between calls).
    DPDK_MAX_BURST = 256
    # Frames of more bytes than this are dropped on receive (counted in rx_oversize).
    DPDK_MAX_FRAME = 262144


cdef class DpdkPort(Port):
    cdef readonly str vdev              # the vdev name we attached, "" for a probed port
    cdef readonly str devargs
    cdef readonly uint16_t dpdk_port    # DPDK's ethdev port id
    cdef readonly uint16_t port_id      # the mbx port tag put on received packets
    cdef readonly str driver
    cdef readonly uint32_t burst
    cdef readonly uint32_t mbufs
    cdef readonly uint32_t mbuf_size
    cdef readonly uint32_t eof_after_idle_polls     # 0: never report the end of input
    cdef readonly uint64_t rx_oversize  # frames larger than DPDK_MAX_FRAME
    cdef readonly uint64_t rx_bad_length  # mbufs whose length their data does not have
    # frames received from the driver, or queued in a net_ring of ours, and never
    # delivered: the input ended (--duration, a signal) before they were
    cdef readonly uint64_t rx_unread
    # frames this port sent into its own net_ring (rx and tx are one ring) that no
    # receive took before it closed: counted as sent, but read by no one
    cdef readonly uint64_t tx_unread
    cdef readonly uint64_t tx_nombuf    # frames not sent: the mempool had no mbuf
    cdef readonly uint64_t tx_oversize  # frames not sent: more segments than allowed
    cdef readonly uint64_t tx_full      # frames not sent: the driver's ring had no room
    cdef readonly uint64_t tx_waits     # bursts that waited for room (tx_wait_ms)
    cdef readonly uint64_t tx_link_down  # frames not sent: the link was down
    # Milliseconds a send waits for room in the driver's ring before it drops what is
    # left (0: drop at once); see DpdkPort's docstring
    cdef readonly uint32_t tx_wait_ms
    cdef readonly uint32_t tx_max_len   # frames longer are not sent (memif: a slot); 0: any
    # net_af_packet: the device's MTU, past which an IP datagram is cut into fragments
    # (memif: a slot's room; see _fragment.pxd); 0: never cut
    cdef readonly uint32_t tx_mtu
    cdef readonly uint64_t tx_cut       # datagrams sent as fragments
    cdef readonly uint64_t tx_partial   # frames not sent: received cut short (a device
    #                                     with a link only; in tx_dropped)
    # Seconds close() keeps a connected net_memif end that sent up, for its peer to
    # read the ring (MEMIF_LINGER_S; 0: close at once)
    cdef public double linger_s
    # net_pcap reading a file once (rx_pcap, not infinite_rx): its path, walked at the
    # end of input for how the file ends (net_pcap ends at a record cut short, or at
    # damage, without a word); "" otherwise
    cdef readonly str rx_capture
    cdef object capture_end             # what that walk found, once it ran (a dict)
    cdef bint at_end                    # rx_burst reported the end of input

    cdef rte_mempool *pool
    cdef bint attached                  # we hot-plugged the vdev: remove it at close
    cdef bint started
    cdef bint promisc_set       # we turned promiscuous mode on: off again at close
    # Threads inside a receive, send or counter read, and the flag a close raises
    # before it waits for them to leave (see mbx_use_begin).
    cdef int users
    cdef int closing
    cdef bint timestamps                # the driver stamps mbufs (rx timestamp dynfield)
    cdef int ts_offset
    cdef uint64_t ts_flag
    cdef uint32_t idle_polls
    # net_af_packet: its kernel interface, looked for once a second while idle (the
    # driver goes on polling a deleted one); "" for other drivers
    cdef char kernel_iface[16]
    cdef int64_t iface_checked_ns
    cdef bint seen_data
    # net_memif: its link has been up (the peer connected) and went down since (the
    # peer closed or died): the end of input, and an error for a send
    cdef bint memif
    cdef bint link_was_up
    cdef bint peer_gone
    cdef int64_t link_checked_ns
    cdef bint tx_stalled                # a wait ran out and the ring took nothing since
    cdef uint16_t seg_room              # bytes of data per tx mbuf
    # Received mbufs not yet copied into a batch (the batch filled up first).
    cdef rte_mbuf *held[DPDK_MAX_BURST]
    cdef uint32_t held_head
    cdef uint32_t held_count
    cdef uint8_t *scratch               # a multi-segment frame made contiguous
    cdef object _last_stats             # the device counters when it was closed
    cdef object __weakref__

    cdef int _copy_held(self, Batch batch, int64_t now_ns) noexcept nogil
    cdef int _rx_burst(self, Batch batch) noexcept nogil
    cdef int _tx_burst(self, mbx_pkt **pkts, int n) noexcept nogil
    cdef int _tx_wait(self, rte_mbuf **out, int left) noexcept nogil
    cdef bint _peer_went_away(self) noexcept nogil
    cdef void _wait_for_users(self) noexcept
    cdef int _fill_parts(self, rte_mbuf *head, const uint8_t *a, uint32_t alen,
                         const uint8_t *b, uint32_t blen) noexcept nogil
    cdef uint32_t _cut_mtu(self, const mbx_pkt *p) noexcept nogil
    cdef void _release(self) noexcept


cdef class DpdkBridge(Port):
    cdef readonly DpdkPort client       # port id 0
    cdef readonly DpdkPort server       # port id 1
    cdef readonly uint32_t idle_us      # sleep this long once both sides are idle
    cdef readonly uint64_t misrouted    # packets sent with a port id other than 0/1
    cdef uint32_t idle_polls
    cdef uint32_t turn
    cdef bint client_ended              # that side's input ended: not polled again
    cdef bint server_ended
    cdef bint ended                     # both have: the bridge's input ended
