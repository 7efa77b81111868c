"""Live interfaces through Linux AF_PACKET sockets.

``AfPacketPort`` receives from a ring mapped into our memory and copies each frame
into the batch arena once (the stack parses and rewrites there), without the GIL.
Two ring formats, chosen by ``ring``:

- ``"v2"`` (TPACKET_V2, the default): one fixed-size slot per frame; the kernel hands
  each frame over (TP_STATUS_USER) as soon as it is written and wakes ``poll()``
  per frame.  A bridging middlebox forwards request/response traffic whose next
  packet waits for this one, so the time a frame sits in the ring is added to every
  round trip: V2 adds none.
- ``"v3"`` (TPACKET_V3): frames packed into blocks; the kernel hands a block over
  when it is full or ``retire_ms`` (at least 1 ms) after its first frame, and wakes
  ``poll()`` per block.  Fewer wake-ups and denser memory for capture-heavy
  receive, but up to ``retire_ms`` of added latency per hop at low or moderate
  rates (Table 3's keep-alive runs lost 2-3x to it).

Both drain every ready frame per call (a burst), never allocate per packet, and
keep the same counters.  It sends with ``sendmmsg``: one system call per burst of
up to 64 frames.

Why ``sendmmsg`` and not a PACKET_TX_RING: the TX ring is zero-copy past the Ethernet
header (the skb points into the ring's pages) and a frame slot is released when the
skb is orphaned, which on a veth happens when the peer receives it, while the peer's
socket may still hold those pages; rewriting the slot could then change data already
queued on the receiver.  ``sendmmsg`` copies, so the batch arena is free again as soon
as the call returns, and it costs the same one system call per burst.

``BridgePorts`` is the middlebox between two interfaces: it reads both rings (frames
from the client side get port 0, from the server side port 1) and sends each packet
out of the other interface.
"""
import os
import struct

from cpython.exc cimport PyErr_CheckSignals
from libc.errno cimport (
    EAGAIN, EINTR, EINVAL, EMSGSIZE, ENETDOWN, ENOBUFS, ENODEV, ENOMEM, ENXIO, EPERM,
    EACCES, errno,
)
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset, strerror, strncpy
from posix.mman cimport MAP_FAILED, MAP_SHARED, PROT_READ, PROT_WRITE, mmap, munmap
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec
from posix.uio cimport iovec
from posix.unistd cimport close as c_close

from mbx._packet cimport (
    OFFLOAD_CSUM_PARTIAL, PORT_EOF, PORT_ERROR, Batch, Port, bridge_tx_burst, mbx_pkt,
)
from mbx._fragment cimport (
    FRAG_HDR_MAX, frag_header, frag_payload_at, frag_payload_len, frag_plan, frag_plan_for,
)
from mbx._rewrite cimport pkt_finish_csum

from mbx._packet import bridge_counters
from mbx.errors import PortError


cdef extern from "<sys/socket.h>" nogil:
    ctypedef unsigned int socklen_t
    struct sockaddr:
        pass
    struct msghdr:
        void *msg_name
        socklen_t msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    struct mmsghdr:
        msghdr msg_hdr
        unsigned int msg_len
    enum:
        AF_PACKET
        AF_INET
        SOCK_RAW
        SOCK_DGRAM
        SOCK_CLOEXEC
        SOL_PACKET
        SOL_SOCKET
        SO_ERROR
        SO_RCVBUF
        SO_RCVBUFFORCE
        MSG_DONTWAIT
        MSG_TRUNC
    int socket(int domain, int type, int protocol)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int bind(int fd, const sockaddr *addr, socklen_t len)
    int setsockopt(int fd, int level, int name, const void *val, socklen_t len)
    int getsockopt(int fd, int level, int name, void *val, socklen_t *len)
    int sendmmsg(int fd, mmsghdr *msgs, unsigned int n, int flags)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    enum:
        POLLIN
        POLLOUT
        POLLERR
        POLLHUP
        POLLNVAL
    int poll(pollfd *fds, unsigned long nfds, int timeout)

cdef extern from "<arpa/inet.h>" nogil:
    uint16_t htons(uint16_t x)

cdef extern from "<sys/ioctl.h>" nogil:
    int ioctl(int fd, unsigned long request, ...)

cdef extern from "<net/if.h>" nogil:
    enum:
        IFNAMSIZ
    enum:
        IFF_UP
        IFF_RUNNING
    struct ifreq:
        char ifr_name[16]
        int ifr_mtu             # macros over the ifr_ifru union
        short ifr_flags
        char *ifr_data
    unsigned int if_nametoindex(const char *name)

cdef extern from "<linux/sockios.h>":
    enum:
        SIOCGIFMTU
        SIOCGIFFLAGS
        SIOCETHTOOL

cdef extern from "<linux/ethtool.h>" nogil:
    enum:
        ETHTOOL_GLINK
        ETHTOOL_GGRO
        ETHTOOL_GFLAGS
        ETH_FLAG_LRO
    struct ethtool_value:
        uint32_t cmd
        uint32_t data

cdef extern from "<linux/if_ether.h>":
    enum:
        ETH_P_ALL
        ETH_P_8021Q

cdef extern from "<linux/if_packet.h>" nogil:
    struct sockaddr_ll:
        unsigned short sll_family
        uint16_t sll_protocol
        int sll_ifindex
        unsigned short sll_hatype
        unsigned char sll_pkttype
        unsigned char sll_halen
        unsigned char sll_addr[8]
    struct packet_mreq:
        int mr_ifindex
        unsigned short mr_type
        unsigned short mr_alen
        unsigned char mr_address[8]
    struct tpacket_req:
        unsigned int tp_block_size
        unsigned int tp_block_nr
        unsigned int tp_frame_size
        unsigned int tp_frame_nr
    struct tpacket_req3:
        unsigned int tp_block_size
        unsigned int tp_block_nr
        unsigned int tp_frame_size
        unsigned int tp_frame_nr
        unsigned int tp_retire_blk_tov
        unsigned int tp_sizeof_priv
        unsigned int tp_feature_req_word
    struct tpacket_hdr_v1:
        uint32_t block_status
        uint32_t num_pkts
        uint32_t offset_to_first_pkt
        uint32_t blk_len
    union tpacket_bd_header_u:
        tpacket_hdr_v1 bh1
    struct tpacket_block_desc:
        uint32_t version
        uint32_t offset_to_priv
        tpacket_bd_header_u hdr
    struct tpacket2_hdr:
        uint32_t tp_status
        uint32_t tp_len
        uint32_t tp_snaplen
        uint16_t tp_mac
        uint16_t tp_net
        uint32_t tp_sec
        uint32_t tp_nsec
        uint16_t tp_vlan_tci
        uint16_t tp_vlan_tpid
    struct tpacket_hdr_variant1:
        uint32_t tp_rxhash
        uint32_t tp_vlan_tci
        uint16_t tp_vlan_tpid
    struct tpacket3_hdr:
        uint32_t tp_next_offset
        uint32_t tp_sec
        uint32_t tp_nsec
        uint32_t tp_snaplen
        uint32_t tp_len
        uint32_t tp_status
        uint16_t tp_mac
        uint16_t tp_net
        tpacket_hdr_variant1 hv1
    struct tpacket_stats_v3:
        unsigned int tp_packets
        unsigned int tp_drops
        unsigned int tp_freeze_q_cnt
    enum:
        PACKET_ADD_MEMBERSHIP
        PACKET_COPY_THRESH
        PACKET_MR_PROMISC
        PACKET_RX_RING
        PACKET_STATISTICS
        PACKET_VERSION
        PACKET_FANOUT
        PACKET_IGNORE_OUTGOING
        PACKET_VNET_HDR
        PACKET_OUTGOING
        TPACKET_V2
        TPACKET_V3
        TP_STATUS_KERNEL
        TP_STATUS_USER
        TP_STATUS_COPY
        TP_STATUS_CSUMNOTREADY
        TP_STATUS_VLAN_VALID
        TP_STATUS_VLAN_TPID_VALID
        PACKET_FANOUT_HASH
        PACKET_FANOUT_LB
        PACKET_FANOUT_CPU
        PACKET_FANOUT_ROLLOVER
        PACKET_FANOUT_RND
        PACKET_FANOUT_QM
        PACKET_FANOUT_CBPF
        PACKET_FANOUT_DATA
        PACKET_FANOUT_FLAG_DEFRAG
        PACKET_FANOUT_FLAG_ROLLOVER
        PACKET_FANOUT_FLAG_UNIQUEID
    size_t TPACKET_ALIGN(size_t x)

cdef extern from "<linux/filter.h>" nogil:
    struct sock_filter:
        uint16_t code
        uint8_t jt
        uint8_t jf
        uint32_t k
    struct sock_fprog:
        unsigned short len
        sock_filter *filter
    enum:
        BPF_LD
        BPF_LDX
        BPF_ST
        BPF_ALU
        BPF_JMP
        BPF_RET
        BPF_MISC
        BPF_W
        BPF_H
        BPF_B
        BPF_ABS
        BPF_IND
        BPF_MEM
        BPF_K
        BPF_X
        BPF_A
        BPF_AND
        BPF_LSH
        BPF_RSH
        BPF_XOR
        BPF_MUL
        BPF_JA
        BPF_JEQ
        BPF_JGE
        BPF_JSET
        BPF_TAX
        SKF_AD_OFF
        SKF_AD_PROTOCOL
        SKF_NET_OFF

cdef extern from "<linux/virtio_net.h>" nogil:
    # Fields in host byte order (legacy virtio on a little-endian host, which is what
    # AF_PACKET uses).
    struct virtio_net_hdr:
        uint8_t flags
        uint8_t gso_type
        uint16_t hdr_len
        uint16_t gso_size
        uint16_t csum_start
        uint16_t csum_offset
    enum:
        VIRTIO_NET_HDR_F_NEEDS_CSUM
        VIRTIO_NET_HDR_GSO_NONE

# The block status word is shared with the kernel: read it with acquire (the frames
# written before it are visible) and hand the block back with release (our reads of
# the block are done before the kernel may refill it).
cdef extern from *:
    """
    #include <stdint.h>
    static inline uint32_t mbx_load_acquire(const uint32_t *p) {
        return __atomic_load_n(p, __ATOMIC_ACQUIRE);
    }
    static inline void mbx_store_release(uint32_t *p, uint32_t v) {
        __atomic_store_n(p, v, __ATOMIC_RELEASE);
    }
    """
    uint32_t load_acquire "mbx_load_acquire"(const uint32_t *p) noexcept nogil
    void store_release "mbx_store_release"(uint32_t *p, uint32_t v) noexcept nogil


cdef enum:
    SIGNAL_CHECK_EVERY = 256    # rx calls between checks for Ctrl-C under load
    VLAN_HLEN = 4
    VNET_HLEN = 10              # sizeof(struct virtio_net_hdr)
    # offloads=True: a V2 slot (a V3 block) must hold a 64 KiB super-frame and its
    # headers whole.
    OFFLOAD_FRAME_SIZE = 65536 + 256
    # How often a sending port looks at its link again (carrier and MTU): for this long
    # (and as long as the kernel takes to mark the link down) frames the kernel drops
    # at the start of an outage count as sent, and at its end frames are not sent
    # though the link is back.
    LINK_CHECK_NS = 5000000

# fanout_group=NEW_GROUP: a group of an id the kernel picks, unused in the namespace.
NEW_GROUP = "new"

# The ring formats the ``ring`` option names (see the module docstring for the choice).
RING_VERSIONS = {"v2": TPACKET_V2, "v3": TPACKET_V3}

FANOUT_MODES = {
    "flow": PACKET_FANOUT_CBPF, "hash": PACKET_FANOUT_HASH, "lb": PACKET_FANOUT_LB,
    "cpu": PACKET_FANOUT_CPU, "rollover": PACKET_FANOUT_ROLLOVER,
    "random": PACKET_FANOUT_RND, "queue": PACKET_FANOUT_QM,
}


def _assemble(listing):
    """Classic BPF as the kernel takes it (``struct sock_filter`` in host byte
    order) from ``(code, k)`` or ``(code, k, jt, jf)`` tuples and label names: a
    jump target (``jt``, ``jf``, or a BPF_JA's ``k``) may name a label, and becomes
    the count of instructions it skips, which is what the kernel wants and what is
    easy to get wrong by hand."""
    at, insns = {}, []
    for item in listing:
        if isinstance(item, str):
            at[item] = len(insns)
        else:
            insns.append(item)
    out = bytearray()
    for i, (code, k, *jumps) in enumerate(insns):
        jt, jf = (jumps + [0, 0])[:2]
        skip = [at[j] - i - 1 if isinstance(j, str) else j for j in (k, jt, jf)]
        k = skip[0] if code == BPF_JMP | BPF_JA else k
        out += struct.pack("=HBBI", code, skip[1], skip[2], k & 0xFFFFFFFF)
    return bytes(out)


# fanout_mode="flow": the member a frame goes to is this program's result modulo
# the group's size (PACKET_FANOUT_CBPF).  The kernel's own symmetric hash
# ("hash") takes the ports of a whole IPv6 packet but not of an IPv6 fragment,
# which it never rebuilds, so a flow whose datagrams were sometimes fragmented
# went to two members.  This one hashes what every packet of a flow carries, the
# same both ways: IPv4 (whole, once the defrag flag rebuilt it) by its addresses
# and TCP/UDP/SCTP ports (the ports mbx's flow key holds), a fragment the kernel
# left alone and a header shorter than 20 bytes (keyed without ports) by its
# addresses;
# IPv6 by its addresses only, as a fragment has no ports to give.  Loads are from
# the network header (SKF_NET_OFF): that is where a received frame's data starts,
# but a frame the host sends (outgoing) still starts at its Ethernet header.
# The kernel has already taken the outer VLAN tag off (skb->protocol is what it
# carried); anything else (ARP, a second tag, a frame too short to load from)
# gets 0, the first member.  No VLAN id is hashed, as the flow table's hash leaves
# them out (mbx/_flow.pxd, flow_key_hash): both directions of a flow carry the same
# tags, so they meet on one member either way, and flows told apart only by their
# VLANs share one, each its own flow there.
_FLOW_HASH = _assemble([
    (BPF_LD | BPF_H | BPF_ABS, SKF_AD_OFF + SKF_AD_PROTOCOL),
    (BPF_JMP | BPF_JEQ | BPF_K, 0x0800, 0, "ipv6"),
    # IPv4: M[0] = source ^ destination
    (BPF_LD | BPF_W | BPF_ABS, SKF_NET_OFF + 12),
    (BPF_MISC | BPF_TAX, 0),
    (BPF_LD | BPF_W | BPF_ABS, SKF_NET_OFF + 16),
    (BPF_ALU | BPF_XOR | BPF_X, 0),
    (BPF_ST, 0),
    (BPF_LD | BPF_H | BPF_ABS, SKF_NET_OFF + 6),     # a fragment: MF or an offset
    (BPF_JMP | BPF_JSET | BPF_K, 0x3FFF, "addresses", 0),
    (BPF_LD | BPF_B | BPF_ABS, SKF_NET_OFF + 9),
    (BPF_JMP | BPF_JEQ | BPF_K, 6, "ports", 0),
    (BPF_JMP | BPF_JEQ | BPF_K, 17, "ports", 0),
    (BPF_JMP | BPF_JEQ | BPF_K, 132, "ports", "addresses"),
    "ports",                                        # ^ source port ^ destination port
    (BPF_LD | BPF_B | BPF_ABS, SKF_NET_OFF),
    (BPF_ALU | BPF_AND | BPF_K, 0xF),
    (BPF_ALU | BPF_LSH | BPF_K, 2),
    # a header length below 20 (the parser's bad_ihl, keyed without ports) would
    # have "ports" read from inside the IP header, which differ packet by packet
    (BPF_JMP | BPF_JGE | BPF_K, 20, 0, "addresses"),
    (BPF_MISC | BPF_TAX, 0),                        # X = the header's length
    (BPF_LD | BPF_H | BPF_IND, SKF_NET_OFF),
    (BPF_ST, 1),
    (BPF_LD | BPF_H | BPF_IND, SKF_NET_OFF + 2),
    (BPF_LDX | BPF_W | BPF_MEM, 1),
    (BPF_ALU | BPF_XOR | BPF_X, 0),
    (BPF_LDX | BPF_W | BPF_MEM, 0),
    (BPF_ALU | BPF_XOR | BPF_X, 0),
    (BPF_JMP | BPF_JA, "mix"),
    "addresses",
    (BPF_LD | BPF_W | BPF_MEM, 0),
    (BPF_JMP | BPF_JA, "mix"),
    "ipv6",                                         # the XOR of the addresses' 8 words
    (BPF_JMP | BPF_JEQ | BPF_K, 0x86DD, 0, "other"),
    (BPF_LD | BPF_W | BPF_ABS, SKF_NET_OFF + 8),
    *[insn for at in range(12, 40, 4) for insn in (
        (BPF_MISC | BPF_TAX, 0),
        (BPF_LD | BPF_W | BPF_ABS, SKF_NET_OFF + at),
        (BPF_ALU | BPF_XOR | BPF_X, 0))],
    # The kernel takes the result modulo the group's size, that is its low bits, so
    # every bit of the XOR is folded and multiplied into them.
    "mix",
    (BPF_MISC | BPF_TAX, 0),
    (BPF_ALU | BPF_RSH | BPF_K, 16),
    (BPF_ALU | BPF_XOR | BPF_X, 0),
    (BPF_ALU | BPF_MUL | BPF_K, 0x9E3779B1),
    (BPF_MISC | BPF_TAX, 0),
    (BPF_ALU | BPF_RSH | BPF_K, 16),
    (BPF_ALU | BPF_XOR | BPF_X, 0),
    (BPF_RET | BPF_A, 0),
    "other",
    (BPF_RET | BPF_K, 0),
])


def check_fanout_mode(mode):
    """ValueError unless ``mode`` names a PACKET_FANOUT mode: the one place the
    rule lives (mbx.ports refuses a spec by it, AfPacketPort its keyword)."""
    if mode not in FANOUT_MODES:
        raise ValueError(f"fanout_mode {mode!r} is not one of {', '.join(FANOUT_MODES)}")


RING_DEFAULTS = {
    # (ring, offloads): frame_size, block_size, block_count for a value given as 0.
    # With offloads a V2 slot must hold a 64 KiB super-frame with its headers (V2 cuts
    # longer frames short), so slots are that large and blocks hold 15 of them.
    ("v2", False): (2048, 1 << 17, 64), ("v3", False): (2048, 1 << 17, 64),
    ("v2", True): (OFFLOAD_FRAME_SIZE, 1 << 20, 16), ("v3", True): (2048, 1 << 17, 64),
}


def ring_layout(ring="v2", *, offloads=False, rx=True, frame_size=0, block_size=0,
                block_count=0, retire_ms=1):
    """The ring ``AfPacketPort`` would map for these options: ``(frame_size,
    block_size, block_count)``, each 0 replaced by its default.  Raises ValueError,
    naming every option it refuses and the value in force.  The one place these
    rules live: ``mbx.ports`` calls it to refuse a port spec before anything is set
    up."""
    problems = []
    if ring not in RING_VERSIONS:
        problems.append(f"ring {ring!r} is not one of {', '.join(RING_VERSIONS)}")
        ring = "v2"                 # judge the sizes as for the default
    if retire_ms < 0:
        problems.append(f"retire_ms {retire_ms} is negative")
    elif ring == "v3" and retire_ms < 1:
        # 0 hands the choice to the kernel: several ms of latency per hop
        problems.append(f"retire_ms must be at least 1 with ring v3, not {retire_ms} "
                        f"(0 leaves the block timeout to the kernel: several ms a hop)")
    defaults = RING_DEFAULTS[ring, bool(offloads)]
    given = (frame_size, block_size, block_count)
    frame, block, count = (value or default for value, default in zip(given, defaults))
    if not rx:
        if problems:
            raise ValueError("; ".join(problems))
        return frame, block, count      # a send-only port maps no ring

    def named(key, value, was_given):   # "frame_size 2048 (the default)"
        return f"{key} {value}" + ("" if was_given else " (the default)")

    # A super-frame cut short cannot be sent on: its segments would be wrong.
    # (A V3 frame may fill its block whatever frame_size says.)
    room, key, was = (frame, "frame_size", frame_size) if ring == "v2" else (
        block, "block_size", block_size)
    if offloads and room < OFFLOAD_FRAME_SIZE:
        problems.append(f"offloads: super-frames of up to 64 KiB must fit whole, but "
                        f"{named(key, room, was)} is below {OFFLOAD_FRAME_SIZE} (leave "
                        f"{key} out for a size that fits)")
    if block < 4096 or block & (block - 1):
        problems.append(f"block_size {block} is not a power of two, 4096 or more")
    if frame < 128 or frame % 16 or frame > block:
        problems.append(f"{named('frame_size', frame, frame_size)}: use a multiple of 16 "
                        f"from 128 up to {named('block_size', block, block_size)}")
    if count < 2:
        problems.append(f"block_count {count} is below 2")
    if problems:
        raise ValueError("; ".join(problems))
    return frame, block, count


cdef enum:
    LINK_UP = 0
    LINK_DOWN = 1           # IFF_UP clear: the kernel refuses sends (ENETDOWN)
    LINK_NO_CARRIER = 2     # up, but its far end down: the kernel drops what is sent
    LINK_GONE = 3           # no such interface (in this namespace)


cdef int link_state(int fd, const char *ifname, int *mtu) noexcept nogil:
    # The state of interface ifname, asked through any socket fd; its MTU into *mtu
    # (0 when unknown).  See AfPacketPort.check_link for why a clear IFF_RUNNING is
    # checked against the carrier itself.
    cdef ifreq ifr
    cdef ethtool_value link
    memset(&ifr, 0, sizeof(ifr))
    strncpy(ifr.ifr_name, ifname, IFNAMSIZ - 1)
    mtu[0] = ifr.ifr_mtu if ioctl(fd, SIOCGIFMTU, &ifr) == 0 else 0
    if ioctl(fd, SIOCGIFFLAGS, &ifr) < 0:
        return LINK_GONE
    if not ifr.ifr_flags & IFF_UP:
        return LINK_DOWN
    if ifr.ifr_flags & IFF_RUNNING:
        return LINK_UP
    link.cmd = ETHTOOL_GLINK
    link.data = 0
    ifr.ifr_data = <char *>&link
    if ioctl(fd, SIOCETHTOOL, &ifr) == 0 and link.data:
        return LINK_UP
    return LINK_NO_CARRIER


def interface_link(iface):
    """``"up"``, ``"down"``, ``"no carrier"`` (up, its link's far end down) or None
    (no such interface) for ``iface`` now, as a sending port judges it."""
    cdef int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0)     # any socket asks
    cdef int mtu = 0
    cdef int state
    if fd < 0:
        raise PortError(f"{iface}: cannot look at its link: {os.strerror(errno)}")
    name = iface.encode()
    state = link_state(fd, name, &mtu)
    c_close(fd)
    return (None if state == LINK_GONE else "down" if state == LINK_DOWN
            else "no carrier" if state == LINK_NO_CARRIER else "up")


def interface_coalescing(iface):
    """The receive offloads on ``iface`` that merge a TCP stream's segments into
    frames longer than its MTU: ``"GRO"`` and ``"LRO"``, those that are on (an
    empty list when neither is, or the interface cannot say).  A packet socket
    reads frames after GRO, so a port without ``offloads=1`` gets super-frames it
    cannot send on whole (they are refused as too long), as from a sender's TSO."""
    cdef int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0)
    cdef ifreq ifr
    cdef ethtool_value value
    if fd < 0:
        raise PortError(f"{iface}: cannot look at its offloads: {os.strerror(errno)}")
    name = iface.encode()
    found = []
    try:
        for cmd, flag, label in ((ETHTOOL_GGRO, 0, "GRO"),
                                 (ETHTOOL_GFLAGS, ETH_FLAG_LRO, "LRO")):
            memset(&ifr, 0, sizeof(ifr))
            strncpy(ifr.ifr_name, name, IFNAMSIZ - 1)
            value.cmd = cmd
            value.data = 0
            ifr.ifr_data = <char *>&value
            # an interface without ethtool support answers EOPNOTSUPP: nothing known
            if ioctl(fd, SIOCETHTOOL, &ifr) == 0 and (value.data & flag if flag
                                                      else value.data):
                found.append(label)
    finally:
        c_close(fd)
    return found


cdef inline int64_t monotonic_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


def _errno_text(int e):
    return f"{os.strerror(e)} (errno {e})"


def _is_loopback(iface):
    """Whether ``iface`` is a loopback device (ARPHRD_LOOPBACK), by sysfs."""
    try:
        with open(f"/sys/class/net/{iface}/type") as fh:
            return fh.read().strip() == "772"
    except (OSError, ValueError):
        return False


cdef class AfPacketPort(Port):
    """One live interface through an AF_PACKET socket.

    ``AfPacketPort(iface, *, port_id=0, ring="v2", block_size=0, block_count=0,
    frame_size=0, fanout_group=None, fanout_mode="flow", fanout_defrag=True,
    rx=True, tx=True, timeout_ms=5, retire_ms=1, promisc=True, duration=0.0,
    offloads=False)``

    Receiving maps a ring of ``block_count`` blocks of ``block_size`` bytes (0: 64
    blocks of 128 KiB and 2048-byte slots; with ``offloads`` and V2, 16 blocks of
    1 MiB and 65792-byte slots; ``ring_layout()`` gives the sizes in force and
    refuses what the port refuses).  With
    ``ring="v2"`` (TPACKET_V2) each block holds ``block_size // frame_size`` slots
    of ``frame_size`` bytes, one frame each, handed over as soon as it arrives; a
    frame longer than a slot's room (``frame_size`` minus about 70 bytes of
    header: a jumbo frame, a datagram the kernel rebuilt for the fanout group) is
    also queued whole on the socket, and read from there (``rx_whole``); one the
    kernel could not queue (the socket's receive buffer full) stays cut short
    and counts in ``rx_truncated``.  With ``ring="v3"``
    (TPACKET_V3) frames are packed into blocks and the kernel hands a block over
    when it is full or ``retire_ms`` after its first frame, so ``retire_ms``
    bounds the latency the ring adds at low rates (V2 ignores it).
    ``rx_burst`` waits at most ``timeout_ms`` in ``poll()`` when nothing is
    ready (not at all while a pipelined stack has bursts in flight), then returns
    0.  Frames this socket (or any socket) sent out of the
    interface are not received.

    ``fanout_group`` (0..65535) joins a PACKET_FANOUT group: sockets in one group
    share the interface's frames (``"new"``: a new group of an id the kernel picks,
    unused in the network namespace, then in ``fanout_group``).  ``fanout_mode``
    ``"flow"`` (the default) keeps every packet of a flow, both directions and
    every fragment, on one member: the group runs mbx's own symmetric hash
    (PACKET_FANOUT_CBPF, each member sets the program), of IPv4 addresses and
    TCP/UDP/SCTP ports and of IPv6 addresses only, since the kernel does not
    rebuild IPv6 fragments and a fragment has no ports; so IPv6 flows between one
    pair of hosts all go to one member.  ``"hash"`` is the kernel's symmetric
    hash, ports included for IPv6 too, which sends an IPv6 fragment by its
    addresses and so may part it from the rest of its flow (for sharing a group
    another program made in that mode); ``"lb"``, ``"cpu"``, ``"rollover"``,
    ``"random"`` and ``"queue"`` are the kernel's modes that ignore flows.
    ``fanout_defrag`` (the default) has the kernel rebuild IPv4 datagrams from
    their fragments before it picks a member: a fragment has no ports, so
    otherwise a fragmented datagram went to the member its addresses picked,
    away from the rest of its flow (the rebuilt datagram arrives as one frame,
    read whole however long).  Every member of a group must join it with the
    same mode and flags.  ``rx=False`` makes a send-only port (no ring, receives
    nothing).

    ``offloads=True`` keeps the interface's segmentation and checksum offloads
    usable (PACKET_VNET_HDR): each frame comes with the kernel's virtio_net_hdr, so a
    TCP super-frame of up to 64 KiB (TSO/GSO/GRO) arrives whole with its segment size
    (``mbx_pkt.gso_size``) and a checksum left for the sending interface is marked
    (``OFFLOAD_CSUM_PARTIAL``); on send the header goes back to the kernel, which
    segments and finishes checksums, in hardware or software.  A bridge then moves
    one super-frame where it would move a dozen wire-size frames.  Ring defaults
    change to hold such frames whole (``ring="v2"``: ``frame_size`` 65792,
    ``block_size`` 1 MiB, ``block_count`` 16: 240 slots, 16 MiB), and sizes that
    would cut them short are refused.  A port
    without offloads finishes partial checksums in software before sending; a
    super-frame larger than its MTU cannot go and counts in ``tx_dropped``.  Without
    offloads, a frame whose checksum its sender left to the device (the ring says
    TP_STATUS_CSUMNOTREADY) is marked so too (``rx_csum_partial``), and is finished
    by the output where its parsed TCP or UDP header puts the checksum.

    A live port never ends by itself: ``stop()`` (from another thread), a
    ``duration`` in seconds (counted from the first receive) or Ctrl-C make
    ``rx_burst`` return end of input, so the run loop finishes normally.
    Counters: ``rx_dropped`` are frames the kernel could not put in the ring
    (PACKET_STATISTICS, fetched by ``counters``, when idle and at close) and frames
    larger than an empty batch holds (``rx_oversize``, counted in it too);
    ``rx_unread`` frames still in the ring at close; ``tx_dropped``
    frames refused by the interface (full queue, too big, link down) or sent while it
    had no carrier (the far end down: the kernel would drop them without an error;
    the port looks every ``LINK_CHECK_NS``, 5 ms, and reads ``mtu`` again then, and
    when a frame is refused as too long); ``link_errors`` times the link went
    down (an error on the socket, a carrier loss found when sending, or on a
    send-only port the first send refused as ``ENETDOWN``); ``tx_cut`` IP datagrams
    longer than the MTU sent as fragments (``_fragment.pxd``: IPv4 without DF;
    IPv4 with DF and IPv6 that mbx rebuilt); ``kernel_freezes`` (V3 only) blocks the
    kernel found still in our hands.
    """

    def __cinit__(self, *args, **kwargs):
        self.fd = -1
        self.ring = NULL
        self.scratch = NULL
        self.iface = ""
        self.fanout_mode = ""

    def __init__(self, str iface, *, int port_id=0, str ring="v2",
                 uint32_t block_size=0, uint32_t block_count=0, uint32_t frame_size=0,
                 fanout_group=None, str fanout_mode="flow", bint fanout_defrag=True,
                 bint rx=True, bint tx=True, int timeout_ms=5, int retire_ms=1,
                 bint promisc=True, double duration=0.0, bint offloads=False,
                 bint outgoing=False):
        cdef sockaddr_ll sll
        cdef tpacket_req3 req3
        cdef tpacket_req req
        cdef packet_mreq mreq
        cdef ifreq ifr
        cdef sock_fprog fprog
        cdef bytes flow_hash = _FLOW_HASH
        cdef int fd, val, e
        cdef socklen_t optlen
        cdef void *mapped
        cdef bytes name_b
        if self.fd >= 0:
            raise PortError(f"{self.name}: already open")
        if not 0 <= port_id <= 0xFFFF:
            raise ValueError(f"port_id {port_id} is not in 0..65535")
        if not rx and not tx:
            raise ValueError("an AfPacketPort needs rx, tx or both")
        frame_size, block_size, block_count = ring_layout(
            ring, offloads=offloads, rx=rx, frame_size=frame_size,
            block_size=block_size, block_count=block_count, retire_ms=retire_ms)
        if timeout_ms < 0:
            raise ValueError("timeout_ms cannot be negative")
        check_fanout_mode(fanout_mode)
        if fanout_group is not None:
            if not rx:
                raise ValueError("fanout needs rx=True")
            if fanout_group != NEW_GROUP and not (
                    isinstance(fanout_group, int) and 0 <= fanout_group <= 0xFFFF):
                raise ValueError(f"fanout_group {fanout_group!r} is not in 0..65535 or "
                                 f"{NEW_GROUP!r}")
        self.iface = iface
        self.name = f"afpacket:{iface}"
        self.port_id = port_id
        self.ring_version = ring
        self.tpacket_version = RING_VERSIONS[ring]
        self.block_size = block_size
        self.block_count = block_count
        self.frame_size = frame_size
        self.frames_per_block = block_size // frame_size
        self.frame_count = self.frames_per_block * block_count
        self.timeout_ms = timeout_ms
        self.retire_ms = retire_ms
        self.fanout_group = fanout_group
        self.fanout_mode = fanout_mode
        self.rx = rx
        self.tx = tx
        self.promisc = promisc and rx
        self.duration = duration
        self.offloads = offloads
        self.outgoing = outgoing and rx
        name_b = iface.encode()
        if not name_b or len(name_b) >= IFNAMSIZ or b"/" in name_b or b"\0" in name_b:
            raise PortError(f"{self.name}: {iface!r} is not a valid interface name")
        strncpy(self.ifname, name_b, IFNAMSIZ - 1)
        self.ifindex = if_nametoindex(name_b)
        if self.ifindex == 0:
            e = errno
            raise PortError(f"{self.name}: no such interface in this network namespace "
                            f"(if_nametoindex: {_errno_text(e)})")
        if self.outgoing and _is_loopback(iface):
            # On a loopback every frame sent also comes back received (PACKET_HOST):
            # its outgoing copy would count each frame twice (libpcap drops it too)
            self.outgoing = False

        # Protocol 0 at creation: the socket receives nothing until bind() names the
        # interface, so no frame of another interface slips into the ring.
        fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0)
        if fd < 0:
            self._raise("socket(AF_PACKET, SOCK_RAW)", errno)
        self.fd = fd
        try:
            memset(&ifr, 0, sizeof(ifr))
            strncpy(ifr.ifr_name, name_b, IFNAMSIZ - 1)
            if ioctl(fd, SIOCGIFMTU, &ifr) < 0:
                e = errno
                self._raise("ioctl(SIOCGIFMTU)", e)
            self.mtu = ifr.ifr_mtu
            if tx:
                self.frag_hdrs = <uint8_t *>malloc(AFP_TX_CHUNK * FRAG_HDR_MAX)
                if self.frag_hdrs == NULL:
                    raise MemoryError(f"{self.name}: cannot allocate fragment headers")
            if offloads:
                # Before the ring: the kernel sizes ring frames with the header.
                val = 1
                if setsockopt(fd, SOL_PACKET, PACKET_VNET_HDR, &val, sizeof(val)) < 0:
                    e = errno
                    self._raise("setsockopt(PACKET_VNET_HDR) for offloads=True", e)
            if rx:
                val = self.tpacket_version
                if setsockopt(fd, SOL_PACKET, PACKET_VERSION, &val, sizeof(val)) < 0:
                    e = errno
                    self._raise(f"setsockopt(PACKET_VERSION, TPACKET_V{val})", e)
                if self.tpacket_version == TPACKET_V3:
                    memset(&req3, 0, sizeof(req3))
                    req3.tp_block_size = block_size
                    req3.tp_block_nr = block_count
                    req3.tp_frame_size = frame_size
                    req3.tp_frame_nr = self.frame_count
                    req3.tp_retire_blk_tov = retire_ms
                    val = setsockopt(fd, SOL_PACKET, PACKET_RX_RING, &req3, sizeof(req3))
                else:
                    req.tp_block_size = block_size
                    req.tp_block_nr = block_count
                    req.tp_frame_size = frame_size
                    req.tp_frame_nr = self.frame_count
                    val = setsockopt(fd, SOL_PACKET, PACKET_RX_RING, &req, sizeof(req))
                if val < 0:
                    e = errno
                    self._raise(f"setsockopt(PACKET_RX_RING, {block_count} blocks of "
                                f"{block_size} bytes)", e)
                self.ring_len = <size_t>block_size * block_count
                mapped = mmap(NULL, self.ring_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0)
                if mapped == MAP_FAILED:
                    self.ring_len = 0
                    e = errno
                    self._raise(f"mmap of the {block_size * block_count}-byte ring", e)
                self.ring = <uint8_t *>mapped
                self.scratch = <uint8_t *>malloc(max(block_size, WHOLE_FRAME_MAX) + VLAN_HLEN)
                if self.scratch == NULL:
                    raise MemoryError(f"{self.name}: cannot allocate a frame buffer")
                if self.tpacket_version == TPACKET_V2 and not offloads:
                    # A frame longer than a V2 slot (a jumbo frame, a datagram the
                    # kernel rebuilt for a fanout group with the defrag flag) is cut
                    # short in the slot; with a copy threshold the kernel also queues
                    # it whole on the socket (TP_STATUS_COPY), and take_frame reads it
                    # from there.  (A V3 frame may fill its block; with offloads a
                    # slot holds 64 KiB.)
                    self.whole = <uint8_t *>malloc(WHOLE_FRAME_MAX)
                    if self.whole == NULL:
                        raise MemoryError(f"{self.name}: cannot allocate a frame buffer")
                    val = 1
                    if setsockopt(fd, SOL_PACKET, PACKET_COPY_THRESH, &val,
                                  sizeof(val)) < 0:
                        e = errno
                        self._raise("setsockopt(PACKET_COPY_THRESH)", e)
                    # The kernel queues a copy only while the socket's receive
                    # buffer has room: the default (about 200 KiB) holds a handful
                    # of jumbo frames, and a burst of them came out cut short.  As
                    # large as root may make it, else as rmem_max allows.
                    val = WHOLE_QUEUE_BYTES
                    if setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &val, sizeof(val)) < 0:
                        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &val, sizeof(val))
                # Our own frames (and those of every socket) leaving the interface
                # are not wanted: a bridge would loop them.  Older kernels lack the
                # option; rx_burst also skips PACKET_OUTGOING frames itself.  A
                # monitor of one interface (outgoing) wants the host's sends too, as
                # tcpdump sees them (the kernel never loops a socket's own sends back
                # to it).
                if not self.outgoing:
                    val = 1
                    self.ignore_outgoing = setsockopt(
                        fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &val, sizeof(val)) == 0
            memset(&sll, 0, sizeof(sll))
            sll.sll_family = AF_PACKET
            sll.sll_protocol = htons(ETH_P_ALL) if rx else 0
            sll.sll_ifindex = self.ifindex
            if bind(fd, <sockaddr *>&sll, sizeof(sll)) < 0:
                e = errno
                self._raise("bind", e)
            if self.promisc:
                memset(&mreq, 0, sizeof(mreq))
                mreq.mr_ifindex = self.ifindex
                mreq.mr_type = PACKET_MR_PROMISC
                if setsockopt(fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mreq,
                              sizeof(mreq)) < 0:
                    e = errno
                    self._raise("setsockopt(PACKET_ADD_MEMBERSHIP, PACKET_MR_PROMISC)", e)
            if fanout_group is not None:
                val = FANOUT_MODES[fanout_mode]
                if fanout_defrag:
                    val |= PACKET_FANOUT_FLAG_DEFRAG
                if fanout_group == NEW_GROUP:
                    # the kernel picks an id no group in this namespace has, so the
                    # group cannot be another program's (joining an existing id with
                    # the same mode shares that group's frames, silently)
                    val = (val | PACKET_FANOUT_FLAG_UNIQUEID) << 16
                else:
                    val = (val << 16) | <int>fanout_group
                if setsockopt(fd, SOL_PACKET, PACKET_FANOUT, &val, sizeof(val)) < 0:
                    e = errno
                    self._raise(f"setsockopt(PACKET_FANOUT, group {fanout_group}, "
                                f"{fanout_mode})" + (
                                    " (another program's group of that id, with another "
                                    "mode, other flags (fanout_defrag) or on another "
                                    "interface)" if e == EINVAL
                                    and fanout_group != NEW_GROUP else ""), e)
                if fanout_mode == "flow":
                    # The group's program, set by every member alike (the last
                    # one set is the group's); until the first has set it the
                    # kernel gives every frame to member 0, the only one then.
                    fprog.len = <unsigned short>(len(flow_hash) // sizeof(sock_filter))
                    fprog.filter = <sock_filter *><char *>flow_hash
                    if setsockopt(fd, SOL_PACKET, PACKET_FANOUT_DATA, &fprog,
                                  sizeof(fprog)) < 0:
                        e = errno
                        self._raise(f"setsockopt(PACKET_FANOUT_DATA, the flow hash of "
                                    f"fanout_mode 'flow', group {fanout_group})", e)
                optlen = sizeof(val)
                if getsockopt(fd, SOL_PACKET, PACKET_FANOUT, &val, &optlen) < 0:
                    e = errno
                    self._raise("getsockopt(PACKET_FANOUT)", e)
                self.fanout_group = val & 0xFFFF       # the id others join
            # Start the kernel counters from zero: what was counted before the ring
            # existed is not ours.
            self.refresh_stats()
            self.kernel_packets = 0
            self.rx_dropped = 0
            self.kernel_freezes = 0
        except BaseException:
            self.release()
            raise

    def _raise(self, call, int e):
        hint = ""
        if e in (EPERM, EACCES):
            hint = " (needs CAP_NET_RAW: run as root or grant the capability)"
        elif e == ENOMEM:
            hint = " (ring too large for the memory or locked-memory limit?)"
        elif e == ENODEV or e == ENXIO:
            hint = " (interface gone?)"
        raise PortError(f"{self.name}: {call}: {_errno_text(e)}{hint}")

    cdef void release(self) noexcept nogil:
        if self.ring != NULL:
            munmap(self.ring, self.ring_len)
            self.ring = NULL
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1
        free(self.scratch)
        self.scratch = NULL
        free(self.whole)
        self.whole = NULL
        free(self.frag_hdrs)
        self.frag_hdrs = NULL
        self.whole_len = 0
        self.next_frame = NULL

    def close(self):
        """Unmap the ring and close the socket.  Idempotent.  Frames the kernel had
        put in the ring that were never read (the input was stopped with them there)
        are counted in ``rx_unread``."""
        if self.fd >= 0 and self.rx:
            self.refresh_stats()
            self.rx_unread += self.count_unread()
        self.release()
        self.closed = True

    cdef uint64_t count_unread(self) noexcept nogil:
        # The kernel fills the ring in order and stops at a slot (block) still in
        # our hands, so the frames it handed over and we did not read are the run
        # of user-owned slots (blocks) from where reading would resume.
        cdef uint64_t n = 0
        cdef uint32_t i, at
        cdef tpacket2_hdr *h
        cdef tpacket_block_desc *bd
        if self.ring == NULL:
            return 0
        if self.tpacket_version == TPACKET_V2:
            for i in range(self.frame_count):
                at = (self.cur_frame + i) % self.frame_count
                h = <tpacket2_hdr *>(self.ring + <size_t>(at // self.frames_per_block)
                                     * self.block_size
                                     + <size_t>(at % self.frames_per_block)
                                     * self.frame_size)
                if not (load_acquire(&h.tp_status) & TP_STATUS_USER):
                    break
                n += 1
            return n
        i = 0
        if self.next_frame != NULL:         # a block read in part
            n += self.left_in_block
            i = 1
        while i < self.block_count:
            bd = <tpacket_block_desc *>(self.ring + <size_t>(
                (self.cur_block + i) % self.block_count) * self.block_size)
            if not (load_acquire(&bd.hdr.bh1.block_status) & TP_STATUS_USER):
                break
            n += bd.hdr.bh1.num_pkts
            i += 1
        return n

    def __dealloc__(self):
        self.release()

    def fileno(self):
        """The packet socket's descriptor (-1 once closed)."""
        return self.fd

    def stop(self):
        """End the live input: the next receive returns end of input (thread-safe)."""
        self.stopping = True

    @property
    def live(self):
        """Timestamps are the receive time: the stack may expire idle flows by the
        wall clock while nothing arrives."""
        return True

    @property
    def counters(self):
        """All counters; the kernel's (``kernel_packets``, ``rx_dropped``,
        ``kernel_freezes``) fetched afresh while the socket is open."""
        if self.fd >= 0 and self.rx:
            self.refresh_stats()
        c = Port.counters.__get__(self)
        c.update(kernel_packets=self.kernel_packets, kernel_freezes=self.kernel_freezes,
                 rx_unread=self.rx_unread, rx_oversize=self.rx_oversize,
                 rx_outgoing=self.rx_outgoing, rx_vlan=self.rx_vlan,
                 rx_truncated=self.rx_truncated, rx_whole=self.rx_whole,
                 rx_gso=self.rx_gso,
                 rx_csum_partial=self.rx_csum_partial, tx_csum_done=self.tx_csum_done,
                 tx_cut=self.tx_cut, tx_partial=self.tx_partial,
                 tx_too_long=self.tx_too_long,
                 link_errors=self.link_errors)
        if self.link_errors:
            # e.g. "Network is down": the link went down at least once
            c["link_error"] = self._why(self.last_link_errno)
        if self.tx_dropped:
            # why the last frames were not sent (EMSGSIZE: larger than the MTU, ...)
            why = [self._why(self.last_tx_errno)] if self.last_tx_errno else []
            if self.tx_partial:
                why.append(f"{self.tx_partial} received cut short, so not sent on")
            c["tx_error"] = "; ".join(why) or None
        return c

    def _why(self, int e):
        if e == NO_CARRIER:
            return f"no carrier on {self.iface} (the link's far end is down or unplugged)"
        return os.strerror(e)

    def __repr__(self):
        return (f"<AfPacketPort {self.iface!r} ifindex={self.ifindex} mtu={self.mtu} "
                f"ring={self.ring_version}{' offloads' if self.offloads else ''} "
                f"rx={self.rx_pkts} tx={self.tx_pkts}"
                f"{' closed' if self.fd < 0 else ''}>")

    cdef void refresh_stats(self) noexcept nogil:
        # PACKET_STATISTICS counts since the previous read, so accumulate.
        cdef tpacket_stats_v3 st
        cdef socklen_t n = sizeof(st)
        if self.fd < 0 or self.ring == NULL:
            return
        # A V2 socket fills only the first two fields (struct tpacket_stats).
        memset(&st, 0, sizeof(st))
        if getsockopt(self.fd, SOL_PACKET, PACKET_STATISTICS, &st, &n) == 0:
            self.kernel_packets = self.kernel_packets + st.tp_packets
            self.rx_dropped = self.rx_dropped + st.tp_drops
            self.kernel_freezes = self.kernel_freezes + st.tp_freeze_q_cnt

    cdef int poll_signals(self) noexcept with gil:
        # The run loop is C; without this, Ctrl-C would wait for the input to end,
        # which a live input never does.  KeyboardInterrupt ends the input cleanly
        # (flows get FLOW/END, counters come out); another exception a signal
        # handler raises becomes this port's error.
        try:
            PyErr_CheckSignals()
        except KeyboardInterrupt:
            self.interrupted = True
            return 1
        except BaseException as exc:
            if self._error is None:
                self._error = exc
            return -1
        return 0

    cdef int live_check(self) noexcept nogil:
        # 1: the input is over (stop(), duration, Ctrl-C); -1: error; 0: go on.
        cdef int r
        if self.stopping or self.interrupted:
            return 1
        if self.duration > 0:
            if self.deadline_ns == 0:
                self.deadline_ns = monotonic_ns() + <int64_t>(self.duration * 1e9)
            elif monotonic_ns() >= self.deadline_ns:
                return 1
        self.calls = self.calls + 1
        if self.calls % SIGNAL_CHECK_EVERY == 0:
            r = self.poll_signals()
            if r:
                return r
        return 0

    cdef int take_frame(self, Batch batch, const uint8_t *frame, uint32_t caplen,
                        uint32_t wirelen, int64_t ts_ns, uint32_t status,
                        uint16_t vlan_tci, uint16_t vlan_tpid, uint8_t pkttype,
                        uint16_t port_id) noexcept nogil:
        # One ring frame into the batch: 1 added, 0 skipped (ours, or too large for
        # any batch: dropped), -1 the batch is full (leave the frame in the ring).
        cdef uint8_t *s
        cdef uint16_t tpid
        cdef mbx_pkt *p
        cdef const uint8_t *received
        cdef bint tagged = False
        cdef bint truncated
        cdef ssize_t got
        if status & TP_STATUS_COPY and self.whole != NULL:
            # The slot holds the frame cut short; the kernel queued it whole on the
            # socket, one copy per such slot in ring order.  Read it once (a full
            # batch sends us back to this slot: whole_len keeps it till then).
            if self.whole_len == 0:
                got = recv(self.fd, self.whole, WHOLE_FRAME_MAX, MSG_DONTWAIT | MSG_TRUNC)
                if got > 0:
                    self.whole_len = <uint32_t>min(got, <ssize_t>WHOLE_FRAME_MAX)
            if self.whole_len:
                frame = self.whole
                caplen = self.whole_len
                status &= ~(<uint32_t>TP_STATUS_COPY)
        received = frame
        truncated = status & TP_STATUS_COPY or caplen < wirelen
        if pkttype == PACKET_OUTGOING and not self.outgoing:
            self.whole_len = 0
            self.rx_outgoing = self.rx_outgoing + 1
            return 0
        if status & TP_STATUS_VLAN_VALID and caplen >= 12:
            # The kernel strips the 802.1Q tag before packet sockets see the frame;
            # a transparent middlebox puts it back.
            tpid = vlan_tpid if status & TP_STATUS_VLAN_TPID_VALID else ETH_P_8021Q
            s = self.scratch
            memcpy(s, frame, 12)
            s[12] = tpid >> 8
            s[13] = tpid & 0xFF
            s[14] = (vlan_tci >> 8) & 0xFF
            s[15] = vlan_tci & 0xFF
            memcpy(s + 16, frame + 12, caplen - 12)
            frame = s
            caplen += VLAN_HLEN
            wirelen += VLAN_HLEN
            tagged = True
        p = batch.add(frame, caplen, wirelen, ts_ns, port_id)
        if p == NULL:
            if batch.count:
                return -1               # counted when the next call takes it
            # Larger than an empty batch's arena: it can never go.
            self.whole_len = 0
            self.rx_oversize = self.rx_oversize + 1
            self.rx_dropped = self.rx_dropped + 1
            return 0
        if received == self.whole:
            self.whole_len = 0
            self.rx_whole = self.rx_whole + 1
        if self.offloads:
            self.take_offloads(p, received, tagged)
        elif status & TP_STATUS_CSUMNOTREADY:
            # Sent from this host by an interface that was to finish the L4 checksum
            # (a veth's default tx checksumming): the field holds only the
            # pseudo-header sum.  An output finishes it (pkt_finish_csum, where the
            # parsed headers say; csum_start 0: not known here), or every such frame
            # would leave with a wrong checksum.
            p.offload = OFFLOAD_CSUM_PARTIAL
            p.csum_start = 0
            p.csum_offset = 0
            self.rx_csum_partial = self.rx_csum_partial + 1
        if truncated:
            self.rx_truncated = self.rx_truncated + 1
        if tagged:
            self.rx_vlan = self.rx_vlan + 1
        self.rx_pkts = self.rx_pkts + 1
        self.rx_bytes = self.rx_bytes + caplen
        return 1

    cdef void take_offloads(self, mbx_pkt *p, const uint8_t *frame,
                            bint tagged) noexcept nogil:
        # The kernel's virtio_net_hdr sits right before the frame in the ring.
        cdef const virtio_net_hdr *vh = <const virtio_net_hdr *>(frame - VNET_HLEN)
        if vh.gso_type != VIRTIO_NET_HDR_GSO_NONE and vh.gso_size:
            p.gso_type = vh.gso_type
            p.gso_size = vh.gso_size
            self.rx_gso = self.rx_gso + 1
        if vh.flags & VIRTIO_NET_HDR_F_NEEDS_CSUM:
            p.offload = OFFLOAD_CSUM_PARTIAL
            # The offsets count from the frame as received; a tag put back moves them.
            p.csum_start = vh.csum_start + (VLAN_HLEN if tagged else 0)
            p.csum_offset = vh.csum_offset
            self.rx_csum_partial = self.rx_csum_partial + 1

    cdef int rx_ready(self, Batch batch, uint16_t port_id) noexcept nogil:
        # Copy the frames the kernel has handed over into the batch, until it is
        # full or none is ready; never waits.  Returns the count added.
        if self.ring == NULL:
            return 0
        if self.tpacket_version == TPACKET_V2:
            return self.rx_ready_v2(batch, port_id)
        return self.rx_ready_v3(batch, port_id)

    cdef int rx_ready_v2(self, Batch batch, uint16_t port_id) noexcept nogil:
        # Slot by slot from cur_frame; each goes back to the kernel once copied.
        cdef tpacket2_hdr *h
        cdef const sockaddr_ll *sll
        cdef uint8_t *slot
        cdef int n = 0, r
        cdef size_t sll_off = TPACKET_ALIGN(sizeof(tpacket2_hdr))
        while True:
            slot = (self.ring + <size_t>(self.cur_frame // self.frames_per_block)
                    * self.block_size
                    + <size_t>(self.cur_frame % self.frames_per_block) * self.frame_size)
            h = <tpacket2_hdr *>slot
            if not (load_acquire(&h.tp_status) & TP_STATUS_USER):
                break
            sll = <const sockaddr_ll *>(slot + sll_off)
            r = self.take_frame(batch, slot + h.tp_mac, h.tp_snaplen, h.tp_len,
                                <int64_t>h.tp_sec * 1000000000 + h.tp_nsec, h.tp_status,
                                h.tp_vlan_tci, h.tp_vlan_tpid, sll.sll_pkttype, port_id)
            if r < 0:
                break                   # full: this slot is read again next call
            n += r
            store_release(&h.tp_status, TP_STATUS_KERNEL)
            self.cur_frame += 1
            if self.cur_frame == self.frame_count:
                self.cur_frame = 0
        return n

    cdef int rx_ready_v3(self, Batch batch, uint16_t port_id) noexcept nogil:
        # A block goes back to the kernel once all its frames are out; a full batch
        # leaves the position inside the block for the next call.
        cdef tpacket_block_desc *bd
        cdef tpacket3_hdr *h
        cdef const sockaddr_ll *sll
        cdef int n = 0, r
        cdef size_t sll_off = TPACKET_ALIGN(sizeof(tpacket3_hdr))
        while True:
            bd = <tpacket_block_desc *>(self.ring + <size_t>self.cur_block * self.block_size)
            if self.next_frame == NULL:
                if not (load_acquire(&bd.hdr.bh1.block_status) & TP_STATUS_USER):
                    break
                self.left_in_block = bd.hdr.bh1.num_pkts
                self.next_frame = <uint8_t *>bd + bd.hdr.bh1.offset_to_first_pkt
            while self.left_in_block:
                h = <tpacket3_hdr *>self.next_frame
                sll = <const sockaddr_ll *>(self.next_frame + sll_off)
                r = self.take_frame(batch, self.next_frame + h.tp_mac, h.tp_snaplen,
                                    h.tp_len, <int64_t>h.tp_sec * 1000000000 + h.tp_nsec,
                                    h.tp_status, h.hv1.tp_vlan_tci, h.hv1.tp_vlan_tpid,
                                    sll.sll_pkttype, port_id)
                if r < 0:
                    return n            # full: resume here next call
                n += r
                self.next_frame += h.tp_next_offset
                self.left_in_block -= 1
            store_release(&bd.hdr.bh1.block_status, TP_STATUS_KERNEL)
            self.next_frame = NULL
            self.cur_block = (self.cur_block + 1) % self.block_count
        return n

    cdef int wait(self) noexcept nogil:
        # Sleep in poll() until a block is ready or timeout_ms pass; -1: the
        # interface is gone (socket_error).
        cdef pollfd pfd
        pfd.fd = self.fd
        pfd.events = POLLIN
        pfd.revents = 0
        if poll(&pfd, 1, 0 if self.rx_nowait else self.timeout_ms) == 0:
            self.refresh_stats()       # idle: a cheap moment to fetch drop counts
            return self.idle_check()
        return self.socket_error(pfd.revents)

    cdef int idle_check(self) noexcept nogil:
        # Nothing arrived for timeout_ms.  After a link error, look whether the
        # interface is still there: a deletion takes the link down first (the
        # socket's error, read by socket_error while the name still resolves) and
        # then unregisters it without another error, so socket_error may never see
        # it gone.  -1 (error set): gone.
        if self.link_errors and if_nametoindex(self.ifname) != <unsigned int>self.ifindex:
            self.gone()
            return -1
        return 0

    cdef void gone(self) noexcept nogil:
        snprintf(self.errmsg, sizeof(self.errmsg),
                 "interface %s is gone (deleted, or moved to another namespace)",
                 self.ifname)
        self.set_error(self.errmsg)

    cdef void check_link(self) noexcept nogil:
        # The link as the kernel has it now: its MTU (changed under a running port:
        # datagrams longer than the new one were refused, EMSGSIZE, or cut to the
        # old, smaller one) and its carrier.  An interface that is up without carrier
        # (a veth whose peer is down, a NIC without a cable) raises no error on the
        # socket, as a link going down does (ENETDOWN): sendmmsg takes the frames and
        # the kernel drops them.  SIOCGIFMTU and SIOCGIFFLAGS read the device under
        # RCU, with no lock; IFF_RUNNING is the operstate, which the kernel sets
        # as it acts on a carrier change (the interface's tx_dropped would count
        # other senders' losses too, and misses a NIC's).  But it acts on most
        # changes in a batch up to a second later (those of a NIC, or of a veth whose
        # peer has the same ifindex in its namespace): an interface just brought up
        # with its carrier on sends at once while IFF_RUNNING is still clear.  So a
        # clear IFF_RUNNING is checked against the carrier itself (ETHTOOL_GLINK;
        # IFF_LOWER_UP does not fit in SIOCGIFFLAGS' short), asked only then since it
        # takes the RTNL; a driver that cannot say leaves IFF_RUNNING's word.  An
        # interface that is down (IFF_UP clear) is left to ENETDOWN.
        cdef int mtu = 0
        cdef int state
        cdef bint lost
        self.link_checked_ns = monotonic_ns()
        state = link_state(self.fd, self.ifname, &mtu)
        if mtu > 0:
            self.mtu = mtu
        if state == LINK_GONE:
            return          # sendmmsg and the receive side say so
        lost = state == LINK_NO_CARRIER
        if lost and not self.no_carrier:
            self.link_errors = self.link_errors + 1
            self.last_link_errno = NO_CARRIER
        self.no_carrier = lost

    cdef int socket_error(self, short revents) noexcept nogil:
        # When its link goes down or its interface goes away, the kernel sets an
        # error on the socket (ENETDOWN), and poll() then returns at once, POLLERR,
        # until someone reads it: reading it here keeps a downed link from spinning
        # a core.  A link that comes back up delivers again; an interface that is
        # gone (deleted, moved to another namespace, or replaced by one of the same
        # name) never will: that ends the input with an error (-1).
        cdef int err = 0
        cdef socklen_t n = sizeof(int)
        if not revents & (POLLERR | POLLHUP | POLLNVAL):
            return 0
        if getsockopt(self.fd, SOL_SOCKET, SO_ERROR, &err, &n) == 0 and err:
            self.link_errors = self.link_errors + 1
            self.last_link_errno = err
        if if_nametoindex(self.ifname) != <unsigned int>self.ifindex:
            self.gone()
            return -1
        if not err:
            poll(NULL, 0, self.timeout_ms)     # an error poll() keeps reporting: wait
        return 0

    cdef int rx_burst(self, Batch batch) noexcept nogil:
        cdef int n, r
        if self.ring == NULL:
            return PORT_EOF
        r = self.live_check()
        if r:
            return PORT_ERROR if r < 0 else PORT_EOF
        n = self.rx_ready(batch, self.port_id)
        if n or batch.count:
            return n
        if self.wait() < 0:
            return PORT_ERROR
        r = self.poll_signals()
        if r:
            return PORT_ERROR if r < 0 else PORT_EOF
        return self.rx_ready(batch, self.port_id)

    cdef int send_frames(self, mbx_pkt **pkts, int n) noexcept nogil:
        # sendmmsg in chunks; frames the interface refuses are dropped and counted,
        # never waited for beyond one short poll for room.  With offloads each frame
        # goes after its virtio_net_hdr (an iovec of its own); without, a checksum
        # left for the interface is finished here first (with offloads too, where the
        # input could not say where it is).  An IP datagram longer than the MTU that
        # may be cut (_fragment.pxd: IPv4 without DF; IPv4 with DF and IPv6 that mbx
        # or the kernel rebuilt) goes as fragments, a message each: its headers
        # written in frag_hdrs, its payload an iovec into the datagram.  (i, piece)
        # is the next message to send: packet i, and its fragment piece when it is
        # being cut.  Returns the packets sent (all of a cut one's fragments).
        # Counters: tx_pkts and tx_bytes count the frames that left (each fragment
        # one); tx_dropped counts packets (a datagram lost while being cut is one).
        cdef mmsghdr msgs[AFP_TX_CHUNK]
        cdef iovec iov[3 * AFP_TX_CHUNK]
        cdef virtio_net_hdr vh[AFP_TX_CHUNK]
        cdef int msg_pkt[AFP_TX_CHUNK]          # each message's packet ...
        cdef uint32_t msg_piece[AFP_TX_CHUNK]   # ... and fragment
        cdef uint32_t msg_len[AFP_TX_CHUNK]
        cdef uint8_t msg_cuts[AFP_TX_CHUNK]     # 1: the first fragment of a datagram
        cdef uint8_t msg_ends[AFP_TX_CHUNK]     # 1: its packet's last (or only) message
        cdef frag_plan plan
        cdef int plan_of = -1                   # the packet plan was made for
        cdef mbx_pkt *p
        cdef pollfd pfd
        cdef int i = 0, ci, j, k, r, e, old_mtu
        cdef uint32_t piece = 0, cpiece, hlen, at
        cdef socklen_t elen
        cdef int sent = 0
        cdef uint64_t nbytes = 0
        cdef uint64_t dropped = 0, cuts = 0
        cdef int done = 0                       # packets whose every message went
        cdef bint waited = False, cut
        cdef iovec *v
        if self.fd < 0 or not self.tx:
            self.set_error(b"send on a closed port" if self.fd < 0
                           else b"send on a receive-only port")
            return PORT_ERROR
        if monotonic_ns() - self.link_checked_ns >= LINK_CHECK_NS:
            self.check_link()
        if self.no_carrier:
            # The kernel would take these and drop them without a word: not sent.
            self.last_tx_errno = NO_CARRIER
            self.tx_dropped = self.tx_dropped + n
            return 0
        while i < n:
            k = 0
            ci = i
            cpiece = piece
            memset(msgs, 0, AFP_TX_CHUNK * sizeof(mmsghdr))
            while k < <int>AFP_TX_CHUNK and ci < n:
                p = pkts[ci]
                if p.caplen < p.wirelen:
                    # received (or captured) only in part: on the wire its headers
                    # would promise bytes that are not there.  Dropped once it is
                    # first in line (what comes before it goes first), so a chunk
                    # sent in part never meets it twice.
                    if k:
                        break
                    self.tx_partial = self.tx_partial + 1
                    dropped += 1
                    ci += 1
                    i = ci
                    continue
                v = &iov[3 * k]
                msg_pkt[k] = ci
                msg_piece[k] = cpiece
                cut = False
                if p.caplen > <uint32_t>self.mtu + p.l3_off and p.gso_size == 0:
                    if plan_of != ci:
                        if p.offload & OFFLOAD_CSUM_PARTIAL and pkt_finish_csum(p) == 0:
                            self.tx_csum_done = self.tx_csum_done + 1
                        plan.count = 0
                        frag_plan_for(p, <uint32_t>self.mtu, &plan)
                        plan_of = ci
                    cut = plan.count > 1
                if self.offloads:
                    memset(&vh[k], 0, sizeof(virtio_net_hdr))
                    vh[k].gso_type = VIRTIO_NET_HDR_GSO_NONE
                    if (not cut and p.offload & OFFLOAD_CSUM_PARTIAL and p.csum_start == 0
                            and pkt_finish_csum(p) == 0):
                        # from a port without offloads, which knew only that the
                        # checksum was not ready, not where it is: the kernel would
                        # take offset 0 for its place, so finish it here
                        self.tx_csum_done = self.tx_csum_done + 1
                    if not cut:
                        vh[k].flags = (VIRTIO_NET_HDR_F_NEEDS_CSUM
                                       if p.offload & OFFLOAD_CSUM_PARTIAL else 0)
                        vh[k].gso_type = (p.gso_type if p.gso_size
                                          else VIRTIO_NET_HDR_GSO_NONE)
                        vh[k].gso_size = p.gso_size
                        vh[k].csum_start = p.csum_start
                        vh[k].csum_offset = p.csum_offset
                    v[0].iov_base = &vh[k]
                    v[0].iov_len = VNET_HLEN
                    msgs[k].msg_hdr.msg_iov = v
                else:
                    if (not cut and p.offload & OFFLOAD_CSUM_PARTIAL
                            and pkt_finish_csum(p) == 0):
                        self.tx_csum_done = self.tx_csum_done + 1
                    msgs[k].msg_hdr.msg_iov = v + 1
                if cut:
                    hlen = frag_header(p, &plan, cpiece, self.frag_hdrs + k * FRAG_HDR_MAX)
                    at = frag_payload_at(&plan, cpiece)
                    v[1].iov_base = self.frag_hdrs + k * FRAG_HDR_MAX
                    v[1].iov_len = hlen
                    v[2].iov_base = p.data + at
                    v[2].iov_len = frag_payload_len(&plan, cpiece)
                    msgs[k].msg_hdr.msg_iovlen = 2
                    msg_len[k] = hlen + <uint32_t>v[2].iov_len
                    msg_cuts[k] = cpiece == 0
                    cpiece += 1
                    msg_ends[k] = cpiece == plan.count
                    if cpiece == plan.count:
                        ci += 1
                        cpiece = 0
                else:
                    v[1].iov_base = p.data
                    v[1].iov_len = p.caplen
                    msgs[k].msg_hdr.msg_iovlen = 1
                    msg_len[k] = p.caplen
                    msg_cuts[k] = 0
                    msg_ends[k] = 1
                    ci += 1
                if self.offloads:
                    msgs[k].msg_hdr.msg_iovlen += 1
                k += 1
            if k == 0:
                continue                # only frames that cannot go, all dropped
            r = sendmmsg(self.fd, msgs, k, MSG_DONTWAIT)
            if r > 0:
                for j in range(r):
                    nbytes += msg_len[j]
                    cuts += msg_cuts[j]
                    done += msg_ends[j]
                sent += r
                self.send_down = False
                if r == k:
                    i = ci
                    piece = cpiece
                else:
                    i = msg_pkt[r]
                    piece = msg_piece[r]
                continue
            e = errno
            if e == EINTR:
                continue
            if e == EAGAIN and not waited:
                # The socket's send budget is used up by frames still queued: give
                # the device one short moment, then drop what does not fit.
                waited = True
                pfd.fd = self.fd
                pfd.events = POLLOUT
                pfd.revents = 0
                poll(&pfd, 1, 1)
                continue
            if e == ENETDOWN and not waited:
                # Maybe an error left on the socket from a link that was down and is
                # up again (sendmmsg reports the one a partial batch left): clear it
                # and try once more before dropping the burst.
                waited = True
                elen = sizeof(int)
                getsockopt(self.fd, SOL_SOCKET, SO_ERROR, &e, &elen)
                continue
            if e == EMSGSIZE and piece == 0:
                # Longer than the MTU as last read: it may have changed since.  If it
                # has, this packet goes again, cut to the new one where it may be cut.
                # Not a fragment after the first: those before it went cut to the old
                # MTU, and fragments cut to another would overlap them, for which a
                # receiver drops the whole datagram (RFC 5722; Linux for IPv4 too).
                old_mtu = self.mtu
                self.check_link()
                if self.mtu != old_mtu:
                    plan_of = -1
                    continue
            if (e == ENXIO or e == ENODEV) and if_nametoindex(
                    self.ifname) != <unsigned int>self.ifindex:
                # The socket is bound to an interface that is no more; one of the same
                # name is another (another ifindex).  A send-only port has no receive
                # side to find this out by: nothing it sends can ever go again.
                self.last_tx_errno = e
                self.tx_pkts = self.tx_pkts + sent
                self.tx_bytes = self.tx_bytes + nbytes
                self.tx_dropped = self.tx_dropped + dropped
                self.tx_cut = self.tx_cut + cuts
                self.gone()
                return PORT_ERROR
            if e == ENETDOWN and self.ring == NULL and not self.send_down:
                # The link went down.  A receiving socket is told so by an error the
                # kernel raises on it (socket_error counts that); a send-only one only
                # by its sends refused: one outage, one link error.
                self.send_down = True
                self.link_errors = self.link_errors + 1
                self.last_link_errno = e
            self.last_tx_errno = e          # why frames are dropped from here on
            if e == EMSGSIZE or e == EINVAL:
                # this frame cannot go (larger than the MTU); a fragment that cannot
                # takes its datagram's other fragments with it
                dropped += 1
                if e == EMSGSIZE:
                    self.tx_too_long = self.tx_too_long + 1
                i = msg_pkt[0] + 1
                piece = 0
            elif e == EAGAIN or e == ENOBUFS or e == ENETDOWN or e == ENXIO or e == ENOMEM:
                dropped += n - i        # the interface takes nothing right now
                i = n
            else:
                self.tx_pkts = self.tx_pkts + sent
                self.tx_bytes = self.tx_bytes + nbytes
                self.tx_dropped = self.tx_dropped + dropped
                self.tx_cut = self.tx_cut + cuts
                snprintf(self.errmsg, sizeof(self.errmsg), "sendmmsg: %s (errno %d)",
                         strerror(e), e)
                self.set_error(self.errmsg)
                return PORT_ERROR
        self.tx_pkts = self.tx_pkts + sent
        self.tx_bytes = self.tx_bytes + nbytes
        self.tx_dropped = self.tx_dropped + dropped
        self.tx_cut = self.tx_cut + cuts
        return done

    cdef int tx_burst(self, mbx_pkt **pkts, int n) noexcept nogil:
        return self.send_frames(pkts, n)


cdef class BridgePorts(Port):
    """The middlebox between two interfaces, as one port for input and output.

    ``BridgePorts(client_iface, server_iface, **options)``: frames received on the
    client-facing interface get port 0, those from the server-facing one port 1;
    ``tx_burst`` sends a packet with port 0 out of the server side and one with
    port 1 out of the client side (any other port id is dropped and counted).
    ``options`` go to both sides' ``AfPacketPort`` (``rx=False`` gives a send-only
    bridge).  ``fanout_group=G``: the client side joins fanout group G and the server
    side group G + 1 (mod 65536; Linux ties a group to one interface), so several
    bridge processes given the same G share the traffic flow by flow;
    ``fanout_group=(G0, G1)`` names the two; ``fanout_group="new"`` makes two new
    groups of ids the kernel picks (``fanout_groups`` says which, for the others to
    join).  A flow's two
    directions reach the same process when the processes joined both groups in the
    same order (``run_parallel`` opens their ports one after another) and the flow
    keeps its addresses across the bridge: the kernel's symmetric hash of the
    5-tuple picks the member.  An NF that rewrites addresses (the L4 LB) sees the
    return traffic under other addresses, which may hash to another process.  Use
    the same object as input and output of a run.  ``stop()``, ``duration`` and
    Ctrl-C end the input as for ``AfPacketPort``.
    """

    def __init__(self, str client_iface, str server_iface, **options):
        if client_iface == server_iface:
            raise PortError(f"afpacket:{client_iface},{server_iface}: a bridge needs two "
                            "different interfaces")
        if "port_id" in options:
            raise TypeError("BridgePorts sets port_id itself (0 client, 1 server side)")
        if options.get("outgoing"):
            raise ValueError("outgoing: a bridge sends what it receives out of the other "
                             "interface, where it would receive it again")
        self.name = f"afpacket:{client_iface},{server_iface}"
        group = options.get("fanout_group")
        if isinstance(group, tuple):        # (client side's, server side's)
            options["fanout_group"] = group[0]
        self.client = AfPacketPort(client_iface, port_id=0, **options)
        if isinstance(group, tuple):
            options["fanout_group"] = group[1]
        elif group is not None and group != NEW_GROUP:
            options["fanout_group"] = (group + 1) & 0xFFFF
        try:
            self.server = AfPacketPort(server_iface, port_id=1, **options)
        except BaseException:
            self.client.close()
            raise
        # Only the client side counts time and signals, so the two agree.
        self.server.duration = 0.0

    @property
    def fanout_groups(self):
        """(client side's, server side's) fanout group ids, or None without fanout:
        what other processes join to share the bridge's traffic."""
        if self.client is None or self.client.fanout_group is None:
            return None
        return (self.client.fanout_group, self.server.fanout_group)

    def close(self):
        """Close both sides.  Idempotent."""
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.close()     # each side fetches its kernel counters first
            self.rx_dropped = self.client.rx_dropped + self.server.rx_dropped
        self.closed = True

    def stop(self):
        """End the live input: the next receive returns end of input (thread-safe)."""
        self.client.stopping = True
        self.server.stopping = True

    @property
    def interrupted(self):
        return self.client.interrupted

    @property
    def ports(self):
        """(client side, server side)."""
        return (self.client, self.server)

    @property
    def live(self):
        """Timestamps are the receive time: the stack may expire idle flows by the
        wall clock while nothing arrives."""
        return True

    @property
    def counters(self):
        """The bridge's counters, and each side's under ``client`` and ``server``
        (each side's kernel counters fetched afresh while it is open)."""
        c = bridge_counters(self, self.client, self.server, self.misrouted)
        self.rx_dropped = self.client.rx_dropped + self.server.rx_dropped
        c["rx_dropped"] = self.rx_dropped
        return c

    def __repr__(self):
        return f"<BridgePorts {self.client.iface!r} <-> {self.server.iface!r}>"

    cdef int read_both(self, Batch batch) noexcept nogil:
        cdef int n
        if self.turn:
            n = self.client.rx_ready(batch, 0)
            return n + self.server.rx_ready(batch, 1)
        n = self.server.rx_ready(batch, 1)
        return n + self.client.rx_ready(batch, 0)

    cdef int rx_burst(self, Batch batch) noexcept nogil:
        cdef int n, r
        cdef pollfd pfd[2]
        if (self.client.fd < 0 or self.server.fd < 0 or self.client.ring == NULL
                or self.server.ring == NULL):
            return PORT_EOF     # closed, or a send-only bridge: nothing to receive
        r = self.client.live_check()
        if r == 0 and self.server.stopping:
            r = 1
        if r:
            if r < 0:
                self.adopt_error(self.client)
                return PORT_ERROR
            return PORT_EOF
        # Alternate which side goes first, so one busy side cannot starve the other.
        self.turn ^= 1
        n = self.read_both(batch)
        if n == 0 and batch.count == 0:
            pfd[0].fd = self.client.fd
            pfd[0].events = POLLIN
            pfd[0].revents = 0
            pfd[1].fd = self.server.fd
            pfd[1].events = POLLIN
            pfd[1].revents = 0
            if poll(pfd, 2, 0 if self.rx_nowait else self.client.timeout_ms) == 0:
                self.client.refresh_stats()
                self.server.refresh_stats()
                self.rx_dropped = self.client.rx_dropped + self.server.rx_dropped
                if self.client.idle_check() < 0:
                    self.adopt_error(self.client)
                    return PORT_ERROR
                if self.server.idle_check() < 0:
                    self.adopt_error(self.server)
                    return PORT_ERROR
            elif self.client.socket_error(pfd[0].revents) < 0:
                self.adopt_error(self.client)
                return PORT_ERROR
            elif self.server.socket_error(pfd[1].revents) < 0:
                self.adopt_error(self.server)
                return PORT_ERROR
            r = self.client.poll_signals()
            if r:
                if r < 0:
                    self.adopt_error(self.client)
                    return PORT_ERROR
                return PORT_EOF
            n = self.read_both(batch)
        self.rx_pkts = self.client.rx_pkts + self.server.rx_pkts
        self.rx_bytes = self.client.rx_bytes + self.server.rx_bytes
        return n

    cdef int tx_burst(self, mbx_pkt **pkts, int n) noexcept nogil:
        return bridge_tx_burst(self, self.client, self.server, pkts, n, &self.misrouted)
