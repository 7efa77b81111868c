# Capture-file ports: PcapReader replays a pcap/pcapng file into Batches, PcapWriter
# records what an NF passed.  Declared here so other extensions (the CLI driver, the
# test harness of the stack) can cimport them and call rx_burst/tx_burst directly.
from libc.stdint cimport int8_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from mbx._packet cimport Batch, Port, mbx_pkt

cdef enum:
    # libpcap's own ceiling (MAXIMUM_SNAPLEN): a larger record length is corruption.
    PCAP_MAX_CAPLEN = 262144
    # Ethernet header synthesised in front of raw-IP / cooked captures.
    ETH_HLEN = 14
    # Records a software-RSS reader decides at a time (PcapReader._rss_decide).
    RSS_AHEAD = 64
    # Bytes of the mapping read past before their pages are given back (_give_back).
    GIVE_BACK_STEP = 32 << 20

# How the frames of a link type become Ethernet frames.
cdef enum LinkMode:
    LINK_ETHER = 0          # passed through
    LINK_RAW = 1            # raw IP, version nibble picks the ethertype
    LINK_IPV4 = 2
    LINK_IPV6 = 3
    LINK_SLL = 4            # Linux cooked v1: 16-byte header, protocol at 14
    LINK_SLL2 = 5           # Linux cooked v2: 20-byte header, protocol at 0
    LINK_NULL = 6           # BSD loopback: 4-byte address family, then IP (nibble)
    LINK_UNSUPPORTED = 255

# Where reading stands: anything but READ_OK ends the replay once reported.
cdef enum ReadState:
    READ_OK = 0
    READ_END = 1            # clean end (or truncated tail): PORT_EOF from now on
    READ_FAILED = 2         # damage or bad content found; reported by the next call

# One pcapng interface (IDB) of the current section.
ctypedef struct pcapng_if:
    uint32_t linktype
    uint32_t snaplen
    uint8_t mode            # LinkMode
    uint8_t pow2            # if_tsresol is a power of two
    uint8_t exp             # its exponent
    uint64_t mul            # power of ten, ns = units * mul ...
    uint64_t div            # ... or units / div
    int64_t offset_ns       # if_tsoffset
    uint32_t fcs_len        # bytes of frame check sequence each frame ends with (if_fcslen)

# The next packet found in the file, before it is copied into a batch.
ctypedef struct pcap_rec:
    const uint8_t *data
    uint32_t caplen
    uint32_t wirelen
    int64_t ts_ns
    uint8_t mode            # LinkMode of its interface
    size_t at               # file offset of this record
    size_t next_pos         # file offset after this record


cdef class PcapReader(Port):
    cdef readonly str path
    cdef object file_key                # (st_dev, st_ino) while mapped (see _being_read)
    cdef readonly str format            # "pcap" or "pcapng"
    cdef readonly uint32_t linktype     # of the file (pcapng: of its first interface)
    cdef readonly bint nanosecond       # native resolution finer than microseconds
    cdef readonly uint32_t snaplen
    cdef readonly uint32_t fcs_len      # classic pcap: FCS bytes each frame ends with
    cdef readonly uint64_t size         # file bytes
    cdef readonly uint64_t damaged      # records/blocks whose lengths lie (reading stops)
    cdef readonly uint64_t truncated    # final record cut short (reading ends normally)
    cdef readonly uint64_t wirelen_raised   # records whose wire length was under caplen
    cdef readonly uint64_t skipped      # pcapng frames of interfaces of unsupported link types
    cdef readonly uint32_t skipped_linktype     # the first of those link types ...
    cdef readonly uint32_t skipped_iface        # ... and its interface
    # The first interface (classic pcap: the file) whose frames are not Ethernet,
    # supported or not, for non_ethernet_interface: in pcapng any block may add one.
    cdef bint other_link_seen
    cdef uint32_t other_linktype
    cdef uint32_t other_iface
    cdef readonly uint16_t port_id

    cdef const uint8_t *base            # the read-only mapping, NULL once closed
    # Set (by mbx_on_sigbus) when the file shrank under the mapping: the pages past
    # its new end read as zeros from then on, and reading stops with an error.
    cdef int cut_under_us
    # The file, kept open while mapped: a zero-length record may be the zeros past
    # a new end inside its last page (no SIGBUS there), which fstat tells.
    cdef int map_fd
    cdef size_t pos
    cdef size_t start                   # offset of the first record
    # The mapping's bytes below this (whole pages) are given back: read past, and no
    # frame still to be delivered lies there (_give_back).
    cdef size_t given_back
    cdef bint is_pcapng
    cdef bint swapped                   # file (section) byte order is not ours
    cdef uint8_t mode                   # classic pcap: LinkMode of the file
    cdef uint32_t frac_mul              # classic pcap: 1000 (us) or 1 (ns)
    cdef uint8_t state                  # ReadState
    cdef pcapng_if *ifaces
    cdef uint32_t n_ifaces
    cdef uint32_t cap_ifaces
    cdef uint8_t *scratch               # a frame being given an Ethernet header
    cdef bint error_is_format           # pending error: CaptureFormatError vs PortError
    cdef char errmsg[512]
    # Software RSS: this process's records among those decided ahead of pos, in file
    # order, with the hash the walk found (own_kind: an rss_hash_of_frame result).
    cdef pcap_rec own[RSS_AHEAD]
    cdef uint32_t own_hash[RSS_AHEAD]
    cdef int8_t own_kind[RSS_AHEAD]
    cdef uint32_t own_n                 # decided records of ours ...
    cdef uint32_t own_i                 # ... of which delivered
    # the latest capture time among the records walked up to each of ours, and over
    # the whole walk: the capture's clock, others' records included (Port.walked_ns)
    cdef int64_t own_upto_ns[RSS_AHEAD]
    cdef int64_t walk_max_ns

    cdef int _next_pcap(self, pcap_rec *r) noexcept nogil
    cdef int _next_pcapng(self, pcap_rec *r) noexcept nogil
    cdef void _ethernet(self, pcap_rec *r) noexcept nogil
    cdef void _skip_frame(self, uint32_t linktype, uint32_t ifid) noexcept nogil
    cdef int _rss_decide(self) noexcept nogil
    cdef int _rss_burst(self, Batch batch) noexcept nogil
    cdef void _too_big(self, const pcap_rec *r, Batch batch) noexcept nogil
    cdef void _check_wirelen(self, pcap_rec *r) noexcept nogil
    cdef bint _taken_back(self, Batch batch, mbx_pkt *p, size_t at) noexcept nogil
    cdef void _shrank(self) noexcept nogil
    cdef int _burst_end(self, int n, int counted, uint64_t nbytes) noexcept nogil
    cdef int _open_pcap(self, uint32_t magic) except -1
    cdef int _open_pcapng(self, pcap_rec *probe) except -1
    cdef int _fail(self, bint damage) noexcept nogil
    cdef void _unmap(self) noexcept nogil


cdef class PcapWriter(Port):
    cdef readonly str path
    cdef readonly bint nanosecond
    cdef readonly uint32_t snaplen
    cdef readonly uint32_t linktype
    cdef int fd
    cdef uint8_t *buf
    cdef size_t used
    cdef size_t buf_first       # where the buffer's first record starts (after the file header)
    cdef uint32_t buf_records   # records in the buffer, counted in tx_pkts
    cdef int io_errno
    cdef object written_key     # its entry in _being_written while open
    # frames not written (in tx_dropped): their time has no place in a pcap record's
    # unsigned 32-bit seconds (before 1970, or after 2106-02-07 06:28:15 UTC)
    cdef readonly uint64_t tx_bad_time
    # frames of no bytes not written (in tx_dropped): a record cut inside its
    # non-Ethernet link header reaches the stack empty, and a record of no bytes
    # is no record to a reader ("[Invalid header: caplen==0]", tcpdump says)
    cdef readonly uint64_t tx_empty

    cdef int _flush(self) noexcept nogil
    cdef void _lose_unwritten(self, size_t done) noexcept nogil
    cdef object write_error(self, str how)
    cdef void record_write_error(self) noexcept with gil
