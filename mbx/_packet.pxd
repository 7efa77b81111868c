# The packet descriptor, the burst that carries packets through the stack, and the
# Port interface every backend (pcap, AF_PACKET, DPDK) implements.  This file is the
# contract between the extensions: _parse fills an mbx_pkt, _flow keys it, _events
# references it, ports fill and drain Batches.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t

cdef enum:
    NO_FLOW = 0xFFFFFFFF
    MAX_SACK_BLOCKS = 4
    # The most VLAN tags the parser, and the software-RSS walk with it (both must
    # agree, or a flow's directions could part), step over to the IP header: Linux's
    # VLAN_MAX_DEPTH, well past 802.1ad QinQ's two.  A frame with more is
    # PARSE_TOO_MANY_VLAN_TAGS.
    MAX_VLAN_TAGS = 8

cdef enum Verdict:
    VERDICT_PASS = 0
    VERDICT_DROP = 1
    VERDICT_HELD = 2        # consumed by the stack (an IP fragment waiting for the rest)

# Why a packet could not be parsed to the end.  PARSE_OK, PARSE_NOT_IP and
# PARSE_TOO_MANY_VLAN_TAGS are not errors; every other value is a named
# malformation counted by the stack.  The names (lower case, without the prefix)
# appear in counters and the CLI.
cdef enum ParseStatus:
    PARSE_OK = 0
    PARSE_NOT_IP            # ARP, LLDP, ...: no L3 to parse, forwarded as is
    PARSE_TRUNC_L2          # frame shorter than its Ethernet/VLAN headers (a raw-IP,
    #                         cooked or loopback record cut in its link header: empty)
    PARSE_TRUNC_L3          # shorter than the IP header
    PARSE_BAD_IP_VERSION    # version nibble disagrees with the ethertype
    PARSE_BAD_IHL           # IPv4 header length < 20 or past the frame
    PARSE_BAD_IP_LEN        # IP total/payload length smaller than the header, or
    #                         past the frame on the wire (past caplen only: TRUNCATED)
    PARSE_BAD_IP_OPTION     # IPv4 option length runs past the header
    PARSE_BAD_IPV6_EXT      # IPv6 extension header chain runs past the packet
    PARSE_BAD_IPV4_AH       # IPv4 Authentication Header runs past the datagram
    PARSE_BAD_FRAG          # absurd fragment offset/length
    PARSE_TRUNC_L4          # shorter than the TCP/UDP/ICMP header
    PARSE_BAD_TCP_OFF       # TCP data offset < 5 or past the segment
    PARSE_BAD_TCP_OPT       # TCP option length runs past the header
    PARSE_BAD_UDP_LEN       # UDP length field lies
    PARSE_FRAG_TIMEOUT      # never a packet's status: fragments held are not dropped
    #                         one by one, their datagram is given up whole (counted in
    #                         FragTable.timed_out / pending_at_end, not under `parse`)
    PARSE_FRAG_MEMCAP       # fragment dropped: reassembly memory exhausted
    # (new statuses go here, at the end: the numbers are in NFs' PKT events and logs)
    PARSE_TOO_MANY_VLAN_TAGS  # more than MAX_VLAN_TAGS VLAN tags: what they hide is
    #                         not looked at (forwarded as is; counted apart from not_ip,
    #                         as it may well be IP)
    PARSE_N                 # number of reasons

cdef enum PktFlags:
    PKT_F_FRAGMENT = 1          # an IP fragment (before reassembly)
    PKT_F_REASSEMBLED = 2       # data is a datagram rebuilt from fragments
    PKT_F_ICMP_ERROR = 4        # ICMP/ICMPv6 error quoting another packet
    PKT_F_IP_OPTIONS = 8        # IPv4 header carries options
    PKT_F_TRUNCATED = 16        # caplen < what the headers say (payload cut)
    PKT_F_RSS_HASH = 32         # hash already holds the flow table's hash: the port's
    #                             software-RSS walk computed it (mbx/_rss.pxd)
    PKT_F_STACK_DROP = 64       # dropped by the stack, not an NF (malformed, a refused
    #                             fragment, a full ring): counted where it happened

# What an interface left for the next one to do (AF_PACKET with offloads=True reads
# it from the kernel's virtio_net_hdr and hands it back on send).
cdef enum OffloadFlags:
    OFFLOAD_CSUM_PARTIAL = 1    # the L4 checksum field holds only the pseudo-header sum
    #                             (not complemented); the sending interface adds the
    #                             bytes from csum_start on and stores the complement

cdef enum TcpFlags:
    TH_FIN = 0x01
    TH_SYN = 0x02
    TH_RST = 0x04
    TH_PUSH = 0x08
    TH_ACK = 0x10
    TH_URG = 0x20
    TH_ECE = 0x40
    TH_CWR = 0x80

cdef enum TcpOptFlags:
    TCPOPT_F_MSS = 1
    TCPOPT_F_WSCALE = 2
    TCPOPT_F_SACK_OK = 4
    TCPOPT_F_SACK = 8
    TCPOPT_F_TS = 16
    TCPOPT_F_CUT = 32       # the capture's snaplen cut the options (the fixed 20-byte
    #                         header was captured): the others above are unknown, not
    #                         absent (status TRUNC_L4, flags TRUNCATED)

# An address of either family: IPv4 in b[0:4], the rest zero.
ctypedef struct mbx_addr:
    uint8_t b[16]

ctypedef struct mbx_pkt:
    # filled by the port
    uint8_t *data           # frame start (in the batch arena; writable)
    uint32_t caplen         # bytes captured
    uint32_t wirelen        # bytes on the wire
    int64_t ts_ns           # capture timestamp, ns since the epoch
    uint32_t index          # position in its batch
    uint16_t port           # receiving port id (bridge: 0 client side, 1 server side)
    uint8_t verdict         # Verdict
    uint8_t status          # ParseStatus
    # filled by a port that takes offloaded frames (all zero otherwise): a frame of
    # up to 64 KiB the sending interface cuts into gso_size-byte segments, and/or a
    # checksum it finishes (OffloadFlags)
    uint16_t gso_size       # payload bytes per segment; 0: send as one frame
    uint16_t csum_start     # OFFLOAD_CSUM_PARTIAL: the sum covers data[csum_start:] ...
    uint16_t csum_offset    # ... and goes to csum_start + csum_offset
    uint8_t gso_type        # VIRTIO_NET_HDR_GSO_* (TCPV4, TCPV6, ...; ECN bit kept)
    uint8_t offload         # OffloadFlags
    # filled by the parser
    uint16_t ethertype      # innermost ethertype
    uint8_t nvlan           # VLAN tags stepped over: 0, 1 (802.1Q), 2 (QinQ), ...
    #                         up to MAX_VLAN_TAGS
    uint8_t flags           # PktFlags
    uint16_t vlan[2]        # the ids of the outer two tags, outer first (no reader
    #                         needs the inner ones: they stay out of the descriptor)
    uint8_t ip_ver          # 0 (not IP), 4 or 6
    uint8_t l4_proto        # IP protocol of the transport header (after IPv6 ext headers)
    uint8_t ttl             # TTL / hop limit
    uint8_t icmp_type
    uint32_t l3_off         # offset of the IP header
    uint32_t l4_off         # offset of the transport header
    uint32_t payload_off    # offset of the transport payload
    uint32_t payload_len    # captured payload bytes (never past caplen)
    uint32_t ip_len         # IP datagram length as the header says (v6: 40 + payload length)
    uint16_t frag_off       # fragment offset in bytes / 8 (raw field value)
    uint16_t frag_more      # more-fragments bit
    uint32_t frag_id        # IPv4 id or IPv6 fragment identification
    mbx_addr src
    mbx_addr dst
    uint16_t sport          # TCP/UDP ports; ICMP: 0
    uint16_t dport
    uint8_t icmp_code
    uint8_t tcp_flags       # TcpFlags
    uint8_t tcp_opts        # TcpOptFlags present
    uint8_t wscale
    uint32_t seq
    uint32_t ack
    uint16_t win
    uint16_t mss
    uint32_t tsval
    uint32_t tsecr
    uint8_t nsack
    uint8_t pad0
    uint16_t frag_size      # a datagram FragTable rebuilt: its fragments' longest payload
    #                         (set after the re-parse; an output that cuts it again
    #                         makes no longer ones, see _fragment.pxd); 0 otherwise
    uint32_t sack[8]        # up to 4 (left, right) edges
    # filled by the flow table
    uint32_t hash           # symmetric: the same for both directions
    uint32_t flow           # flow slot, or NO_FLOW
    uint32_t flow_gen       # generation of that slot when looked up
    uint8_t dir             # 0: sent by the flow's initiator; 1: by the responder
    uint8_t drop_stage      # chain stage of the NF that dropped it (parallel NFs share one)
    # filled by the event core
    uint16_t refs           # event messages still referencing this packet
    uint32_t votes          # bit per chain index: the NFs that dropped it (in a
    #                         merge = "all" group, voted to: the last of them drops it;
    #                         see EventBus.nf_drop)


# A burst of packets and the bytes they live in.  A port copies frames in once;
# parsing, NFs and rewrites all work on the arena in place; the output port sends
# what passed.  A Batch is reused burst after burst: nothing is allocated per packet.
# The arena a Batch of this many packets gets by default: room for a burst of
# 2 KiB frames, and 512 KiB more for jumbo or oversized frames and for datagrams
# rebuilt from fragments (half of it is kept for those: Batch.rebuild_room).
cdef inline size_t default_arena(uint32_t capacity) noexcept nogil:
    return <size_t>capacity * 2048 + (512 << 10)


cdef class Batch:
    cdef mbx_pkt *pkts
    cdef uint8_t *arena
    cdef readonly uint32_t capacity
    cdef readonly size_t arena_size
    cdef uint32_t count
    cdef size_t arena_used
    cdef object owner               # the buffer pkts and arena live in, or None (malloc'd)
    # Arena bytes add() leaves free for reserve(): the stack rebuilds fragmented
    # datagrams (up to 64 KiB each) in the arena of the burst their last fragment is
    # in, which frames alone (jumbo frames, say) could otherwise fill.
    cdef public size_t rebuild_room

    cdef void clear(self) noexcept nogil
    # Copies a frame in; NULL when the batch is out of slots or arena bytes.
    cdef mbx_pkt *add(self, const uint8_t *frame, uint32_t caplen, uint32_t wirelen,
                      int64_t ts_ns, uint16_t port) noexcept nogil
    # Room for len bytes in the arena (e.g. a reassembled datagram); NULL when full.
    cdef uint8_t *reserve(self, size_t length) noexcept nogil


# The interface of every packet I/O backend.  rx_burst and tx_burst run without the
# GIL; a backend that fails records the error (set_error) and returns PORT_ERROR, and
# the caller raises it with check() once it holds the GIL again.
cdef enum:
    PORT_EOF = -1
    PORT_ERROR = -2


# The input's clock (the stack's, and a pcap port's walk over other stacks' frames):
# the latest packet time seen, except that a packet more than step_ns behind it
# steps it back to that packet's time (returns True then).  One packet stamped
# days ahead (a merged or rewritten capture; a live clock stepped back) would
# otherwise hold the clock there: no flow would go idle for the rest of the run,
# and a full table under the refuse policy would refuse every new flow.  step_ns
# 0: the latest time only.
cdef inline bint clock_take(int64_t *clock, int64_t ts, int64_t step_ns) noexcept nogil:
    if ts > clock[0]:
        clock[0] = ts
    elif step_ns > 0 and <uint64_t>clock[0] - <uint64_t>ts > <uint64_t>step_ns:
        clock[0] = ts
        return True
    return False

cdef class Port:
    cdef readonly str name
    cdef readonly uint64_t rx_pkts
    cdef readonly uint64_t rx_bytes
    cdef readonly uint64_t tx_pkts
    cdef readonly uint64_t tx_bytes
    cdef readonly uint64_t rx_dropped      # frames the backend could not deliver
    cdef readonly uint64_t tx_dropped      # frames the backend could not send
    # frames a send took (returned as sent) that never went after all, moved out of
    # tx_pkts: a capture writer's buffered records that a failed write lost
    cdef readonly uint64_t tx_lost
    cdef readonly uint64_t rss_skipped     # frames passed over for other stack processes
    # The latest capture time of the frames this port has read up to the last one it
    # delivered, those passed over for other stack processes included (0: it does not
    # pass frames over): the stack's clock for idle flows, as one stack would see it.
    cdef readonly int64_t walked_ns
    # ... kept by clock_take with this step (the stack's; 0: the latest time only)
    cdef public int64_t clock_step_ns
    cdef uint32_t rss_k                    # deliver share rss_k of rss_n (see rss_share)
    cdef uint32_t rss_n                    # 0 or 1: deliver everything
    cdef object _error
    cdef bint closed
    # Set by the stack while bursts are in flight (pipelined): rx_burst returns at
    # once with what is ready instead of waiting for frames.  A port waits on its
    # input only, not on the NF processes' completion: a lone frame would otherwise
    # leave only once the next one came or the port's wait ran out.
    cdef bint rx_nowait

    # Appends up to the batch's free room; returns the count added (0: nothing yet),
    # PORT_EOF at the end of the input, or PORT_ERROR.
    cdef int rx_burst(self, Batch batch) noexcept nogil
    # Sends n packets; returns the count sent or PORT_ERROR.
    cdef int tx_burst(self, mbx_pkt **pkts, int n) noexcept nogil
    cdef void set_error(self, const char *message) noexcept with gil
    # Take over the error a port this one is made of recorded (a bridge's sides).
    cdef void adopt_error(self, Port part) noexcept with gil
    cpdef check(self)
    cpdef bint rss_share(self, uint32_t k, uint32_t n) except -1


# A bridge's send: each packet received on the client side (port 0) goes out of
# the server side and the other way round, in order per side; other port ids are
# dropped and counted in *misrouted.  Keeps the bridge's tx counters as the sum of
# its sides'.  The count sent, or PORT_ERROR (the side's error adopted).
cdef int bridge_tx_burst(Port bridge, Port client, Port server, mbx_pkt **pkts, int n,
                         uint64_t *misrouted) noexcept nogil
