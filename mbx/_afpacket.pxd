# Live interfaces through Linux AF_PACKET sockets: AfPacketPort (one interface, a
# TPACKET_V2 or V3 receive ring and sendmmsg batches) and BridgePorts (the middlebox
# between a client-facing and a server-facing interface).  Declared here so other
# extensions can cimport them and call rx_burst/tx_burst directly.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from mbx._packet cimport Batch, Port, mbx_pkt

cdef enum:
    AFP_TX_CHUNK = 64       # messages handed to one sendmmsg call
    AFP_ERRMSG = 256
    WHOLE_FRAME_MAX = 65536 + 256   # a frame read whole from the socket (IPv4/6 max + L2)
    WHOLE_QUEUE_BYTES = 16 << 20    # V2: receive buffer for the kernel's whole copies
    NO_CARRIER = -1         # last_tx_errno/last_link_errno: no errno, the link had no carrier


cdef class AfPacketPort(Port):
    cdef readonly str iface
    cdef readonly int ifindex
    cdef readonly int mtu               # read at open, then again by check_link
    cdef readonly uint16_t port_id
    cdef readonly str ring_version      # "v2" (a slot per frame) or "v3" (packed blocks)
    cdef int tpacket_version            # TPACKET_V2 or TPACKET_V3
    cdef readonly uint32_t block_size
    cdef readonly uint32_t block_count
    cdef readonly uint32_t frame_size
    cdef uint32_t frames_per_block      # V2: slots per block
    cdef uint32_t frame_count           # V2: slots in the ring
    cdef uint32_t cur_frame             # V2: slot being read (or waited for)
    cdef readonly int timeout_ms        # poll() wait when no block is ready
    cdef readonly int retire_ms         # V3: kernel hands over a partly filled block after this
    cdef readonly object fanout_group   # None or 0..65535
    cdef readonly str fanout_mode
    cdef readonly bint rx
    cdef readonly bint tx
    cdef readonly bint promisc
    cdef readonly bint offloads         # frames carry a virtio_net_hdr (PACKET_VNET_HDR)
    cdef readonly bint ignore_outgoing  # the kernel filters our own frames (>= 4.20)
    cdef readonly bint outgoing         # frames the host sends out are received too
    cdef readonly uint64_t rx_outgoing  # own/outgoing frames skipped in user space
    cdef readonly uint64_t rx_vlan      # frames whose stripped 802.1Q tag was put back
    cdef readonly uint64_t rx_truncated  # frames cut short (a slot too small, no copy)
    cdef readonly uint64_t rx_whole     # V2: frames longer than a slot, read whole from
    #                                     the socket's queue (TP_STATUS_COPY)
    cdef readonly uint64_t rx_gso       # offloads: super-frames received (gso_size set)
    cdef readonly uint64_t rx_csum_partial  # frames with a checksum to finish (offloads:
    #                                         the virtio-net header says; without, the
    #                                         ring's TP_STATUS_CSUMNOTREADY)
    cdef readonly uint64_t tx_csum_done  # partial checksums finished here (no offloads,
    #                                      a datagram cut, or a place the input lacked)
    cdef readonly uint64_t tx_cut       # datagrams longer than the MTU sent as fragments
    cdef readonly uint64_t tx_partial   # frames not sent: received cut short (in tx_dropped)
    cdef readonly uint64_t tx_too_long  # frames the kernel refused as longer than the MTU
    #                                     (EMSGSIZE; in tx_dropped)
    cdef readonly uint64_t kernel_packets   # PACKET_STATISTICS, accumulated
    cdef readonly uint64_t rx_unread    # frames still in the ring when it was closed
    cdef readonly uint64_t rx_oversize  # frames larger than an empty batch holds (in rx_dropped)
    cdef readonly uint64_t kernel_freezes   # blocks the kernel found still in user hands
    cdef readonly int last_tx_errno     # errno of the last send that dropped frames
    #                                     (or NO_CARRIER)
    cdef readonly uint64_t link_errors  # times the link went down: an error the kernel
    #                                     raised on the socket (ENETDOWN; rx=False: a send
    #                                     refused so), or the carrier found lost when sending
    cdef readonly int last_link_errno   # the last of those (an errno or NO_CARRIER)
    cdef bint no_carrier                # up, without carrier, when last looked at
    cdef bint send_down                 # rx=False: a send found the link down (ENETDOWN)
    cdef int64_t link_checked_ns        # when (CLOCK_MONOTONIC)
    cdef char ifname[16]                # iface, for the nogil check that it still exists

    cdef int fd
    cdef uint8_t *ring                  # the mmapped receive ring, NULL without one
    cdef size_t ring_len
    cdef uint32_t cur_block             # V3: block being read (or waited for)
    cdef uint32_t left_in_block         # V3: frames of cur_block not yet delivered
    cdef uint8_t *next_frame            # V3: the next of those
    cdef uint8_t *scratch               # a frame getting its VLAN tag back
    cdef uint8_t *whole                 # V2: a frame longer than a slot, read whole
    cdef uint32_t whole_len             # its length while it waits for a batch (0: none)
    cdef uint8_t *frag_hdrs             # tx: each message's fragment headers, if cut
    cdef bint stopping
    cdef int64_t deadline_ns            # 0: none; else rx ends at this CLOCK_MONOTONIC time
    cdef double duration
    cdef readonly bint interrupted     # Ctrl-C ended the input
    cdef uint32_t calls
    cdef char errmsg[AFP_ERRMSG]

    cdef int take_frame(self, Batch batch, const uint8_t *frame, uint32_t caplen,
                        uint32_t wirelen, int64_t ts_ns, uint32_t status,
                        uint16_t vlan_tci, uint16_t vlan_tpid, uint8_t pkttype,
                        uint16_t port_id) noexcept nogil
    cdef void take_offloads(self, mbx_pkt *p, const uint8_t *frame,
                            bint tagged) noexcept nogil
    cdef int rx_ready(self, Batch batch, uint16_t port_id) noexcept nogil
    cdef int rx_ready_v2(self, Batch batch, uint16_t port_id) noexcept nogil
    cdef int rx_ready_v3(self, Batch batch, uint16_t port_id) noexcept nogil
    cdef int wait(self) noexcept nogil
    cdef int socket_error(self, short revents) noexcept nogil
    cdef int idle_check(self) noexcept nogil
    cdef void gone(self) noexcept nogil
    cdef void check_link(self) noexcept nogil
    cdef int send_frames(self, mbx_pkt **pkts, int n) noexcept nogil
    cdef void refresh_stats(self) noexcept nogil
    cdef uint64_t count_unread(self) noexcept nogil
    cdef int live_check(self) noexcept nogil
    cdef int poll_signals(self) noexcept with gil
    cdef void release(self) noexcept nogil


cdef class BridgePorts(Port):
    cdef readonly AfPacketPort client     # port id 0
    cdef readonly AfPacketPort server     # port id 1
    cdef readonly uint64_t misrouted      # packets sent with a port id other than 0/1
    cdef uint32_t turn

    cdef int read_both(self, Batch batch) noexcept nogil
