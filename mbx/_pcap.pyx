"""Capture-file ports: replay pcap/pcapng files into Batches and record Batches to pcap.

The reader maps the file read-only and walks record headers in C without the GIL, so
replaying a capture costs one memcpy per frame into the batch arena and no Python
object per packet.  Every frame leaves the reader as an Ethernet frame: raw-IP and
Linux cooked captures get a synthesised Ethernet header, because the parser and
everything after it speak Ethernet only (a record cut inside its link header leaves
empty, for the parser to count as ``trunc_l2``, and a pcap output to leave out).
"""
import os
import stat

from libc.errno cimport EINTR, EPIPE, errno
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdio cimport snprintf
from libc.stdlib cimport free, malloc, realloc
from libc.string cimport memcpy, memset
from posix.mman cimport MADV_DONTNEED, MADV_SEQUENTIAL, MAP_FAILED, MAP_PRIVATE, PROT_READ
from posix.mman cimport madvise, mmap, munmap
from posix.stat cimport fstat
from posix.stat cimport struct_stat as stat_t
from posix.unistd cimport _SC_PAGESIZE, sysconf, write
from posix.unistd cimport close as c_close

from mbx._packet cimport (
    PKT_F_FRAGMENT, PKT_F_RSS_HASH, PORT_EOF, PORT_ERROR, Batch, Port, clock_take, mbx_pkt,
)
from mbx._parse cimport parse_packet
from mbx._rewrite cimport pkt_finish_csum
from mbx._rss cimport (
    RSS_FLOW, RSS_FRAGMENT, RSS_PARSE, rss_hash_of_frame, rss_share_of, rss_stack_of_parsed,
)

from mbx.errors import CaptureFormatError, PortError, ReaderGoneError

# Unaligned, byte-order-aware field reads: classic pcap records start at any offset,
# so a cast-and-load would be undefined behaviour; memcpy compiles to a plain load.
cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    static inline uint16_t mbx_rd16(const uint8_t *p, int swap) {
        uint16_t v; memcpy(&v, p, 2); return swap ? __builtin_bswap16(v) : v;
    }
    static inline uint32_t mbx_rd32(const uint8_t *p, int swap) {
        uint32_t v; memcpy(&v, p, 4); return swap ? __builtin_bswap32(v) : v;
    }
    static inline uint64_t mbx_rd64(const uint8_t *p, int swap) {
        uint64_t v; memcpy(&v, p, 8); return swap ? __builtin_bswap64(v) : v;
    }
    static inline void mbx_wr32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }
    """
    uint16_t rd16 "mbx_rd16"(const uint8_t *p, int swap) noexcept nogil
    uint32_t rd32 "mbx_rd32"(const uint8_t *p, int swap) noexcept nogil
    uint64_t rd64 "mbx_rd64"(const uint8_t *p, int swap) noexcept nogil
    # A hint only (gcc and clang); never faults, even past the mapping's end.
    void __builtin_prefetch(const void *addr) noexcept nogil
    void wr32 "mbx_wr32"(uint8_t *p, uint32_t v) noexcept nogil

cdef enum:
    MAGIC_US = 0xa1b2c3d4
    MAGIC_NS = 0xa1b23c4d
    MAGIC_US_SWAPPED = 0xd4c3b2a1
    MAGIC_NS_SWAPPED = 0x4d3cb2a1
    PCAP_FILE_HDR = 24
    PCAP_REC_HDR = 16
    PCAP_MAX_SECONDS = 0xFFFFFFFF   # a record's seconds: 2106-02-07 06:28:15 UTC
    # pcapng block types and option codes
    BT_SHB = 0x0A0D0D0A
    BT_IDB = 1
    BT_PB = 2               # obsolete Packet Block, still written by old tools
    BT_SPB = 3
    BT_EPB = 6
    BYTE_ORDER_MAGIC = 0x1A2B3C4D
    BYTE_ORDER_SWAPPED = 0x4D3C2B1A
    OPT_ENDOFOPT = 0
    OPT_IF_TSRESOL = 9
    OPT_IF_FCSLEN = 13
    OPT_IF_TSOFFSET = 14
    # classic pcap: the link-type field's top bits say whether, and how long, an FCS
    # ends each frame (in 16-bit words)
    LT_FCS_PRESENT = 0x04000000
    # A block longer than the file by no more than this is a capture cut short;
    # anything longer is a length field that lies.
    PCAPNG_MAX_BLOCK = PCAP_MAX_CAPLEN + 65536
    WRITE_BUFFER = 1 << 20
    PREFETCH_AHEAD = 2048   # bytes of the file asked for ahead of the record walked

cdef int64_t NS = 1000000000
cdef uint64_t POW10[20]
POW10[0] = 1
for _i in range(1, 20):
    POW10[_i] = POW10[_i - 1] * 10

# The link types read, in words, for the errors that refuse another one
SUPPORTED_LINKTYPES_TEXT = ("1 (Ethernet), 101/228/229 (raw IP; also 12 and 14, the BSDs' "
                            "DLT_RAW, which old writers put in files), 113 (Linux "
                            "SLL), 276 (Linux SLL2), 0/108 (BSD loopback)")


_SUPPORTED_B = SUPPORTED_LINKTYPES_TEXT.encode()
cdef const char *_SUPPORTED_C = _SUPPORTED_B


cdef inline uint8_t link_mode(uint32_t linktype) noexcept nogil:
    if linktype == 1:
        return LINK_ETHER
    if linktype == 101 or linktype == 12 or linktype == 14:
        return LINK_RAW
    if linktype == 228:
        return LINK_IPV4
    if linktype == 229:
        return LINK_IPV6
    if linktype == 113:
        return LINK_SLL
    if linktype == 276:
        return LINK_SLL2
    if linktype == 0 or linktype == 108:
        # The family word's byte order and values differ between systems (AF_INET6
        # is 24, 28 or 30): the IP version nibble says more, as for raw IP.
        return LINK_NULL
    return LINK_UNSUPPORTED


cdef frozenset _read_linktypes():
    cdef uint32_t t
    return frozenset([t for t in range(1 << 16) if link_mode(t) != LINK_UNSUPPORTED])


# The link type numbers read, taken from link_mode itself (the one that decides)
SUPPORTED_LINKTYPES = _read_linktypes()


cdef inline int64_t units_to_ns(const pcapng_if *itf, uint64_t t) noexcept nogil:
    cdef uint64_t sec, frac
    cdef uint32_t e = itf.exp
    if itf.pow2:
        sec = t >> e
        frac = t & ((<uint64_t>1 << e) - 1)
        # frac * 1e9 must fit 64 bits: drop sub-nanosecond bits first.
        if e > 32:
            frac >>= e - 32
            e = 32
        return <int64_t>(sec * NS + ((frac * NS) >> e)) + itf.offset_ns
    if itf.mul:
        return <int64_t>(t * itf.mul) + itf.offset_ns
    return <int64_t>(t / itf.div) + itf.offset_ns


cdef inline void drop_fcs(pcap_rec *r, uint32_t fcs) noexcept nogil:
    # The frame check sequence a capture kept is not part of the frame a stack
    # parses or a port sends: the wire length loses it, and the captured bytes lose
    # whatever of it they hold.
    if r.wirelen >= fcs:
        r.wirelen -= fcs
    if r.caplen > r.wirelen:
        r.caplen = r.wirelen


cdef inline void set_tsresol(pcapng_if *itf, uint8_t resol) noexcept nogil:
    cdef uint8_t e
    itf.mul = 0
    itf.div = 0
    if resol & 0x80:
        itf.pow2 = 1
        # A shift of 64 or more is undefined in C; such a clock is absurd anyway.
        itf.exp = min(resol & 0x7F, 63)
    else:
        itf.pow2 = 0
        # 10^19 is the largest power of ten a uint64 holds.
        e = min(resol, 28)
        itf.exp = e
        if e <= 9:
            itf.mul = POW10[9 - e]
        else:
            itf.div = POW10[e - 9]


cdef long _page = sysconf(_SC_PAGESIZE)
cdef size_t PAGE = <size_t>_page if _page > 0 else 4096


cdef inline void _give_back(PcapReader rd) noexcept nogil:
    # Pages of the mapping once read stay mapped and resident in the process (RssFile,
    # or RssShmem for a file on tmpfs; a memory cgroup's file_mapped) until unmapped,
    # so a replay would look like a process holding the whole capture.
    # Every frame leaves the reader copied (Batch.add, or _ethernet's scratch first):
    # no burst in flight, retired or being sent (pcap or AF_PACKET output, pipelined
    # stages) points into the mapping.  What the reader itself may still read starts
    # at the first decided record of ours not yet delivered (software RSS walks ahead
    # of them), else at pos (a record left for the next burst, or one straddling a
    # page, starts there); whole pages below that are read past for good.
    # MADV_DONTNEED on them, not munmap: the mapping is private and read-only, so it
    # has no copied-on-write pages to lose and a later touch (rewind) reads the file
    # again (a page given back too early would cost a fault, never wrong bytes), and
    # base and the SIGBUS watch stay one mapping.  The page cache is left alone:
    # other stack processes replay the same file.  Once per GIVE_BACK_STEP bytes
    # passed: a compare per burst or walked record, a syscall per 32 MiB.
    cdef size_t low = rd.own[rd.own_i].at if rd.own_i < rd.own_n else rd.pos
    if low < rd.given_back + GIVE_BACK_STEP or rd.base == NULL:
        return
    low &= ~(PAGE - 1)
    # a failure loses nothing but the memory saving: the pages stay mapped
    madvise(<void *>(rd.base + rd.given_back), low - rd.given_back, MADV_DONTNEED)
    rd.given_back = low


cdef inline int _next_record(PcapReader rd, pcap_rec *r) noexcept nogil:
    # The next record of either format.  The file streams through: ask for it ahead
    # of the reader (about 1.5 ns a frame less here, where the RSS walk is all the
    # work a skipped frame costs).  A function, not a method: called directly.
    cdef int got
    if rd.cut_under_us:
        rd._shrank()            # the file shrank: nothing more can be read
        return -1
    got = rd._next_pcapng(r) if rd.is_pcapng else rd._next_pcap(r)
    if got > 0:
        __builtin_prefetch(r.data + PREFETCH_AHEAD)
    return got


def _unsupported(text, linktype, iface):
    # the refusal of a link type, with it and its pcapng interface (None in a classic
    # pcap) as attributes: a reader of other link types (net_pcap) words its own
    exc = CaptureFormatError(text)
    exc.linktype = linktype
    exc.iface = iface
    return exc


def non_ethernet_interface(path):
    """``(interface, link type)`` of the first interface of the capture at ``path``
    whose frames are not Ethernet (interface None in a classic pcap, which has one
    link type), or None when all of theirs are: for a reader that
    takes every frame for an Ethernet one as it is (DPDK's ``net_pcap``).  A classic
    pcap says it in its header; a pcapng file may describe an interface in any
    block, so its blocks are walked (headers only) up to the first such interface
    or the end.  Raises as :class:`PcapReader` does for a file it cannot read."""
    cdef PcapReader reader = PcapReader(path)
    cdef pcap_rec r
    try:
        with nogil:
            while not reader.other_link_seen and reader.state == READ_OK and \
                    _next_record(reader, &r) > 0:
                reader.pos = r.next_pos
                _give_back(reader)
        if reader.other_link_seen:
            return (reader.other_iface if reader.is_pcapng else None,
                    reader.other_linktype)
        return None
    finally:
        reader.close()


# Another program may shorten a capture while it is mapped here (tcpdump -w onto it,
# a cp over it, a log rotation): touching the pages past its new end raises SIGBUS,
# which kills the process, with no summary and no error.  mbx_on_sigbus, for a fault
# inside a mapping a PcapReader watches, maps zeros over the rest of that mapping
# and raises the reader's flag, so the faulting read goes on and the reader, which
# looks at the flag after each frame it copies, stops with an error instead.  A
# fault anywhere else goes to the handler that was there before (Python's
# faulthandler, say), or ends the process as it would have.
cdef extern from *:
    """
    #include <signal.h>
    #include <stdint.h>
    #include <string.h>
    #include <sys/mman.h>
    #include <unistd.h>
    #define MBX_WATCHED_MAPS 256
    typedef struct { const char *base; size_t len; int *hit; } mbx_watched_map;
    static mbx_watched_map mbx_watched[MBX_WATCHED_MAPS];
    static struct sigaction mbx_sigbus_before;
    static int mbx_sigbus_on = 0;
    static size_t mbx_page_size = 4096;

    static void mbx_on_sigbus(int sig, siginfo_t *si, void *uc) {
        const char *a = (const char *)si->si_addr;
        int i;
        if (si->si_code > 0) {          /* a fault, not kill() or raise() */
            for (i = 0; i < MBX_WATCHED_MAPS; i++) {
                const char *b = __atomic_load_n(&mbx_watched[i].base, __ATOMIC_ACQUIRE);
                if (b != NULL && a >= b && a < b + mbx_watched[i].len) {
                    char *page = (char *)((uintptr_t)a & ~(uintptr_t)(mbx_page_size - 1));
                    size_t rest = (size_t)(b + mbx_watched[i].len - page);
                    rest = (rest + mbx_page_size - 1) & ~(mbx_page_size - 1);
                    if (mmap(page, rest, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED,
                             -1, 0) != MAP_FAILED) {
                        *mbx_watched[i].hit = 1;
                        return;
                    }
                }
            }
        }
        if (mbx_sigbus_before.sa_flags & SA_SIGINFO) {
            if (mbx_sigbus_before.sa_sigaction != NULL) {
                mbx_sigbus_before.sa_sigaction(sig, si, uc);
                return;
            }
        } else if (mbx_sigbus_before.sa_handler != SIG_DFL
                   && mbx_sigbus_before.sa_handler != SIG_IGN) {
            mbx_sigbus_before.sa_handler(sig);
            return;
        }
        signal(SIGBUS, SIG_DFL);        /* the fault comes again, fatal as it was */
    }

    /* Watch [base, base + len) for the file shrinking under it; 0, or -1 when it
       cannot be watched (reading goes on unguarded, as before). */
    static int mbx_watch_map(const void *base, size_t len, int *hit) {
        int i;
        if (!mbx_sigbus_on) {
            struct sigaction sa;
            long page = sysconf(_SC_PAGESIZE);
            if (page > 0)
                mbx_page_size = (size_t)page;
            memset(&sa, 0, sizeof sa);
            sa.sa_sigaction = mbx_on_sigbus;
            sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
            sigemptyset(&sa.sa_mask);
            if (sigaction(SIGBUS, &sa, &mbx_sigbus_before) != 0)
                return -1;
            mbx_sigbus_on = 1;
        }
        for (i = 0; i < MBX_WATCHED_MAPS; i++) {
            if (mbx_watched[i].base == NULL) {
                mbx_watched[i].len = len;
                mbx_watched[i].hit = hit;
                __atomic_store_n(&mbx_watched[i].base, (const char *)base, __ATOMIC_RELEASE);
                return 0;
            }
        }
        return -1;
    }

    static void mbx_unwatch_map(const void *base) {
        int i;
        for (i = 0; i < MBX_WATCHED_MAPS; i++)
            if (mbx_watched[i].base == (const char *)base)
                __atomic_store_n(&mbx_watched[i].base, (const char *)NULL, __ATOMIC_RELEASE);
    }
    """
    int mbx_watch_map(const void *base, size_t length, int *hit) nogil
    void mbx_unwatch_map(const void *base) nogil


# The files PcapReaders of this process have mapped, (st_dev, st_ino) -> readers: a
# PcapWriter refuses to truncate one, which would take the pages from under the
# mapping (SIGBUS on the next read) and destroy the capture.
_being_read = {}

# The files this process is writing, (st_dev, st_ino) -> who writes it ("the pcap
# output pcap:FILE", "NF logger's log"): a second writer of one file is refused, as
# the two would interleave their bytes into neither's file (mbx.runtime.claim_output).
_being_written = {}


def refuse_second_writer(key, path, what):
    """Raise PortError if ``key`` (st_dev, st_ino) is a file this process writes."""
    other = _being_written.get(key)
    if other is not None:
        raise PortError(f"{what}: {path!r} is already written by {other}; two writers "
                        "would interleave their bytes: name another file")


def claim_output(fd, path, what):
    """Record that ``what`` writes the open file ``fd`` (``path``), refused as
    ``refuse_second_writer`` says.  Returns the key ``release_output`` takes."""
    st = os.fstat(fd)
    key = (st.st_dev, st.st_ino)
    refuse_second_writer(key, path, what)
    _being_written[key] = what
    return key


def release_output(key):
    if key is not None and _being_written is not None:     # None: interpreter exit
        _being_written.pop(key, None)


# Compressed files given as captures: magic -> (what, how to undo it).
# (what it is, with its article: "an xz", "a gzip"; how to decompress it)
_COMPRESSED = {b"\x1f\x8b": ("a gzip", "gunzip -k FILE, or zcat FILE > OUT"),
               b"\x28\xb5\x2f\xfd": ("a zstd", "zstd -d FILE"),
               b"\xfd\x37\x7a\x58": ("an xz", "xz -dk FILE"),
               b"\x42\x5a\x68": ("a bzip2", "bunzip2 -k FILE")}
# Alexey Kuznetzov's modified pcap (its records carry 8 more bytes: ifindex,
# protocol, packet type), in either byte order: a format of its own that mbx does
# not read, named so its user knows what to convert
_MAGIC_MODIFIED_PCAP = (b"\xa1\xb2\xcd\x34", b"\x34\xcd\xb2\xa1")


cdef enum:
    # an own_kind: a fragment handed to this process, which another one counts
    FRAGMENT_COUNTED_ELSEWHERE = 100


cdef class PcapReader(Port):
    """Replay a pcap or pcapng capture file as a port.

    ``PcapReader(path, port_id=0)`` maps the file and checks its header; frames come
    out through ``receive(batch)`` (or ``rx_burst`` from Cython) as Ethernet frames
    with nanosecond timestamps.  Damaged length fields stop the replay with a
    :class:`CaptureFormatError` naming the byte offset; a final record cut short (a
    capture whose writer was killed) ends it normally and is counted in
    ``truncated``.
    """

    def __cinit__(self, *args, **kwargs):
        self.base = NULL
        self.map_fd = -1
        self.ifaces = NULL
        self.scratch = NULL
        self.own_n = self.own_i = 0
        self.state = READ_END
        self.format = ""
        self.path = ""
        self.file_key = None

    def __init__(self, path, int port_id=0):
        cdef const uint8_t *m
        cdef void *mapped
        cdef uint32_t magic
        cdef uint64_t size
        cdef pcap_rec probe
        if not 0 <= port_id <= 0xFFFF:
            raise ValueError(f"port_id {port_id} is not in 0..65535")
        if self.base != NULL:
            raise PortError(f"{self.name}: already open")
        path = os.fspath(path)
        self.path = path
        self.name = f"pcap:{path}"
        self.port_id = port_id
        if path == "-":
            # not standard input, as "-" is to tcpdump -r: a capture is read by
            # mapping its file, and a pipe cannot be mapped
            raise PortError("pcap:-: standard input cannot be read: captures are read "
                            "by mapping the file; save the stream to a file first and "
                            "give its name (a file named - is ./-)")
        try:
            # O_NONBLOCK: opening a FIFO would otherwise wait for a writer, before
            # the check below can refuse it (no effect on a regular file)
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError as e:
            raise PortError(f"pcap:{path}: no such file ({e.strerror})") from None
        except OSError as e:
            raise PortError(f"pcap:{path}: cannot open ({e.strerror})") from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise PortError(f"pcap:{path}: is a directory, not a capture file")
            if not stat.S_ISREG(st.st_mode):
                raise PortError(f"pcap:{path}: not a regular file (a pipe or a device): "
                                "captures are read by mapping the file; save it to a "
                                "file first")
            size = st.st_size
            if size == 0:
                raise CaptureFormatError(f"pcap:{path}: empty file, not a pcap or pcapng capture")
            mapped = mmap(NULL, size, PROT_READ, MAP_PRIVATE, fd, 0)
            if mapped == MAP_FAILED:
                raise PortError(f"pcap:{path}: cannot map the file ({os.strerror(errno)})")
        except BaseException:
            os.close(fd)
            raise
        self.map_fd = fd
        # Reading is one forward pass: let the kernel read ahead aggressively.
        madvise(mapped, size, MADV_SEQUENTIAL)
        self.cut_under_us = 0
        mbx_watch_map(mapped, size, &self.cut_under_us)
        self.base = m = <const uint8_t *>mapped
        self.size = size
        self.given_back = 0
        self.scratch = <uint8_t *>malloc(PCAP_MAX_CAPLEN + ETH_HLEN)
        if self.scratch == NULL:
            self._unmap()
            raise MemoryError(f"{self.name}: cannot allocate a frame buffer")

        magic = rd32(m, 0) if size >= 4 else 0
        try:
            if magic == BT_SHB:
                self._open_pcapng(&probe)
            elif magic in (MAGIC_US, MAGIC_NS, MAGIC_US_SWAPPED, MAGIC_NS_SWAPPED):
                self._open_pcap(magic)
            elif bytes(m[:min(size, 4)]).startswith(tuple(_COMPRESSED)):
                kind, tool = next(v for k, v in _COMPRESSED.items()
                                  if bytes(m[:min(size, 4)]).startswith(k))
                raise CaptureFormatError(
                    f"pcap:{path}: {kind}-compressed file, not a capture: decompress "
                    f"it first ({tool})")
            elif bytes(m[:min(size, 4)]) in _MAGIC_MODIFIED_PCAP:
                raise CaptureFormatError(
                    f"pcap:{path}: a modified pcap (Kuznetzov) file, magic a1 b2 cd 34, "
                    f"which mbx does not read: convert it to pcap first (editcap -F "
                    f"pcap FILE OUT)")
            else:
                seen = bytes(m[:min(size, 4)]).hex(" ")
                raise CaptureFormatError(
                    f"pcap:{path}: not a pcap or pcapng file (magic bytes {seen}; expected "
                    f"a1 b2 c3 d4, a1 b2 3c 4d in either byte order, or 0a 0d 0d 0a)")
        except BaseException:
            self._unmap()
            raise
        self.file_key = (st.st_dev, st.st_ino)
        _being_read[self.file_key] = _being_read.get(self.file_key, 0) + 1

    cdef int _open_pcap(self, uint32_t magic) except -1:
        cdef const uint8_t *m = self.base
        cdef bint sw = magic in (MAGIC_US_SWAPPED, MAGIC_NS_SWAPPED)
        if self.size < PCAP_FILE_HDR:
            raise CaptureFormatError(
                f"pcap:{self.path}: file header truncated ({self.size} of "
                f"{PCAP_FILE_HDR} bytes)")
        self.format = "pcap"
        self.is_pcapng = False
        self.swapped = sw
        self.nanosecond = magic in (MAGIC_NS, MAGIC_NS_SWAPPED)
        self.frac_mul = 1 if self.nanosecond else 1000
        self.snaplen = rd32(m + 16, sw)
        # The top bits carry FCS information, not the link type.
        self.linktype = rd32(m + 20, sw) & 0x03FFFFFF
        if rd32(m + 20, sw) & LT_FCS_PRESENT:
            self.fcs_len = (rd32(m + 20, sw) >> 28) * 2
        self.mode = link_mode(self.linktype)
        if self.linktype != 1:
            self.other_link_seen = True
            self.other_linktype = self.linktype
        if self.mode == LINK_UNSUPPORTED:
            raise _unsupported(f"pcap:{self.path}: unsupported link type {self.linktype}; "
                               f"supported: {SUPPORTED_LINKTYPES_TEXT}", self.linktype, None)
        self.start = self.pos = PCAP_FILE_HDR
        self.state = READ_OK
        return 0

    cdef int _open_pcapng(self, pcap_rec *probe) except -1:
        cdef uint32_t bom
        if self.size < 12:
            raise CaptureFormatError(
                f"pcap:{self.path}: pcapng section header truncated ({self.size} bytes)")
        bom = rd32(self.base + 8, 0)
        if bom != BYTE_ORDER_MAGIC and bom != BYTE_ORDER_SWAPPED:
            raise CaptureFormatError(
                f"pcap:{self.path}: pcapng section header has a bad byte-order magic "
                f"({bytes(self.base[8:12]).hex(' ')})")
        self.format = "pcapng"
        self.is_pcapng = True
        self.start = self.pos = 0
        self.state = READ_OK
        # Walk the leading blocks up to the first packet to learn the link type and
        # resolution now, and to refuse an unsupported link type at open.  Damage
        # found here is left for reading to report at its offset.
        got = self._next_pcapng(probe)
        if self.state == READ_FAILED and not self.damaged:
            raise CaptureFormatError(f"pcap:{self.path}: {self.errmsg.decode('utf-8')}")
        if got <= 0 and self.skipped and self.state != READ_FAILED:
            # every frame up to the end is of a link type mbx does not read; when
            # the walk stopped at damage instead, the frames after it are unknown,
            # and the damage (at its offset) is what reading reports
            raise _unsupported(
                f"pcap:{self.path}: unsupported link type {self.skipped_linktype} "
                f"(interface {self.skipped_iface}), and no frame of a supported one; "
                f"supported: {SUPPORTED_LINKTYPES_TEXT}", self.skipped_linktype,
                self.skipped_iface)
        if self.n_ifaces:
            self.linktype = self.ifaces[0].linktype
            self.snaplen = self.ifaces[0].snaplen
            self.nanosecond = (self.ifaces[0].exp >= 20 if self.ifaces[0].pow2
                               else self.ifaces[0].exp > 6)
        else:
            self.linktype = 1
        self.damaged = 0
        self.truncated = 0
        self.wirelen_raised = 0
        self.skipped = 0
        self.n_ifaces = 0
        self.pos = 0
        self.state = READ_OK
        return 0

    def __dealloc__(self):
        self._unmap()
        self._forget()

    def _forget(self):
        if self.file_key is not None:
            left = _being_read.pop(self.file_key, 1) - 1
            if left:
                _being_read[self.file_key] = left
            self.file_key = None

    cdef void _unmap(self) noexcept nogil:
        if self.base != NULL:
            mbx_unwatch_map(self.base)
            munmap(<void *>self.base, self.size)
            self.base = NULL
        if self.map_fd >= 0:
            c_close(self.map_fd)
            self.map_fd = -1
        free(self.ifaces)
        self.ifaces = NULL
        self.n_ifaces = self.cap_ifaces = 0
        free(self.scratch)
        self.scratch = NULL
        self.own_n = self.own_i = 0
        self.state = READ_END

    def close(self):
        """Unmap the file; later receives return end of input.  Idempotent."""
        self._unmap()
        self._forget()
        self.closed = True

    def rewind(self):
        """Start the replay again from the first record (counters keep counting)."""
        if self.base == NULL:
            raise PortError(f"{self.name}: rewind on a closed reader")
        self.pos = self.start
        self.given_back = 0         # the pages read again are given back again
        self.n_ifaces = 0
        self.own_n = self.own_i = 0
        self.walk_max_ns = self.walked_ns = 0
        self.state = READ_OK
        self._error = None

    def walk_to_end(self):
        """Step over the records left, delivering none (their headers are read, not
        their frames), to learn how the capture ends: afterwards ``truncated`` is 1
        when it ends in a record cut short, and damage raises its
        :class:`CaptureFormatError` here.  For a capture another reader took the
        frames of (DPDK's ``net_pcap``, which ends at either without a word)."""
        cdef pcap_rec r
        if self.base == NULL:
            raise PortError(f"{self.name}: walk_to_end on a closed reader")
        with nogil:
            while self.state == READ_OK and _next_record(self, &r) > 0:
                self.pos = r.next_pos
                _give_back(self)
        if self.state == READ_FAILED:
            self.state = READ_END
            self.set_error(self.errmsg)
            error, self._error = self._error, None
            raise error

    @property
    def position(self):
        """Bytes of the file consumed so far (for progress reporting)."""
        return self.pos

    @property
    def counters(self):
        """The port's counters, ``truncated``: 1 when the capture ends in a record
        cut short, which is not delivered; ``wirelen_raised``: records whose wire
        length is less than their captured length (not valid pcap), delivered with
        the captured length as their wire length; and ``skipped``: pcapng frames of
        an interface whose link type mbx does not read (``skipped_linktype``, the
        first such)."""
        c = Port.counters.__get__(self)
        c["truncated"] = self.truncated
        if self.wirelen_raised:
            c["wirelen_raised"] = self.wirelen_raised
        if self.skipped:
            c["skipped"] = self.skipped
            c["skipped_linktype"] = self.skipped_linktype
        return c

    def __repr__(self):
        return (f"<PcapReader {self.path!r} {self.format} linktype={self.linktype} "
                f"position={self.pos}/{self.size}>")

    cdef void set_error(self, const char *message) noexcept with gil:
        if self._error is None:
            kind = CaptureFormatError if self.error_is_format else PortError
            self._error = kind(f"{self.name}: {message.decode('utf-8', 'replace')}")

    cdef int _fail(self, bint damage) noexcept nogil:
        # The message is already in errmsg; the next rx_burst returning nothing
        # reports it, so frames read before the damage are still delivered.
        # (Counters are bumped as x = x + 1 throughout: the debug build's nonecheck
        # rejects in-place operators on attributes without the GIL.)
        if damage:
            self.damaged = self.damaged + 1
        self.error_is_format = True
        self.state = READ_FAILED
        return -1

    cdef int _next_pcap(self, pcap_rec *r) noexcept nogil:
        cdef size_t pos = self.pos
        cdef size_t left
        cdef const uint8_t *h
        cdef uint32_t caplen, limit
        if pos >= self.size:
            self.state = READ_END
            return 0
        left = self.size - pos
        if left < PCAP_REC_HDR:
            self.truncated = self.truncated + 1
            self.state = READ_END
            return 0
        h = self.base + pos
        if (rd32(h, 0) in (MAGIC_US, MAGIC_NS, MAGIC_US_SWAPPED, MAGIC_NS_SWAPPED)
                and left >= PCAP_FILE_HDR
                and ((rd16(h + 4, 0) == 2 and rd16(h + 6, 0) == 4)
                     or (rd16(h + 4, 1) == 2 and rd16(h + 6, 1) == 4))):
            # read as a record, it would be an empty frame of 2055, then damage
            snprintf(self.errmsg, sizeof(self.errmsg),
                     "a second pcap file header at byte offset %zu: this file is two "
                     "captures joined end to end (cat a b > c); join captures with "
                     "mergecap -a, or read them one by one", pos)
            return self._fail(True)
        caplen = rd32(h + 8, self.swapped)
        # Writers round snaplen oddly, so a record may exceed it a little; a length
        # far beyond it (or beyond libpcap's maximum) is a corrupt header.
        limit = PCAP_MAX_CAPLEN
        if 0 < self.snaplen < PCAP_MAX_CAPLEN - 65536:
            limit = self.snaplen + 65536
        if caplen > limit:
            snprintf(self.errmsg, sizeof(self.errmsg),
                     "damaged record at byte offset %zu: captured length %u exceeds %u "
                     "(snaplen %u)", pos, caplen, limit, self.snaplen)
            return self._fail(True)
        if caplen > left - PCAP_REC_HDR:
            self.truncated = self.truncated + 1
            self.state = READ_END
            return 0
        r.data = h + PCAP_REC_HDR
        r.caplen = caplen
        r.wirelen = rd32(h + 12, self.swapped)
        if self.fcs_len:
            drop_fcs(r, self.fcs_len)
        r.ts_ns = (<int64_t>rd32(h, self.swapped) * NS
                   + <int64_t>rd32(h + 4, self.swapped) * self.frac_mul)
        r.mode = self.mode
        r.at = pos
        r.next_pos = pos + PCAP_REC_HDR + caplen
        return 1

    cdef int _next_pcapng(self, pcap_rec *r) noexcept nogil:
        cdef size_t pos, left
        cdef const uint8_t *b
        cdef uint32_t btype, blen, bom, body, ifid, caplen, wirelen, o, olen, code
        cdef bint sw
        cdef pcapng_if *itf
        cdef void *grown
        while True:
            pos = self.pos
            if pos >= self.size:
                self.state = READ_END
                return 0
            left = self.size - pos
            if left < 12:
                self.truncated = self.truncated + 1
                self.state = READ_END
                return 0
            b = self.base + pos
            # The SHB type reads the same in both byte orders; its byte-order magic
            # sets the order of everything up to the next section.
            if rd32(b, 0) == BT_SHB:
                bom = rd32(b + 8, 0)
                if bom == BYTE_ORDER_MAGIC:
                    self.swapped = False
                elif bom == BYTE_ORDER_SWAPPED:
                    self.swapped = True
                else:
                    snprintf(self.errmsg, sizeof(self.errmsg),
                             "damaged section header at byte offset %zu: byte-order "
                             "magic 0x%08x", pos, bom)
                    return self._fail(True)
                self.n_ifaces = 0
            sw = self.swapped
            btype = rd32(b, sw)
            blen = rd32(b + 4, sw)
            if blen < 12 or blen & 3:
                snprintf(self.errmsg, sizeof(self.errmsg),
                         "damaged block at byte offset %zu: length %u is not a multiple "
                         "of 4 of at least 12", pos, blen)
                return self._fail(True)
            if blen > left:
                if blen <= PCAPNG_MAX_BLOCK:
                    self.truncated = self.truncated + 1
                    self.state = READ_END
                    return 0
                snprintf(self.errmsg, sizeof(self.errmsg),
                         "damaged block at byte offset %zu: length %u runs past the end "
                         "of the file (%zu bytes left)", pos, blen, left)
                return self._fail(True)
            if rd32(b + blen - 4, sw) != blen:
                snprintf(self.errmsg, sizeof(self.errmsg),
                         "damaged block at byte offset %zu: trailing length %u differs "
                         "from leading length %u", pos, rd32(b + blen - 4, sw), blen)
                return self._fail(True)
            body = blen - 12
            b += 8
            if btype == BT_EPB or btype == BT_PB:
                if body < 20:
                    snprintf(self.errmsg, sizeof(self.errmsg),
                             "damaged packet block at byte offset %zu: %u bytes long",
                             pos, blen)
                    return self._fail(True)
                ifid = rd32(b, sw) if btype == BT_EPB else rd16(b, sw)
                if ifid >= self.n_ifaces:
                    snprintf(self.errmsg, sizeof(self.errmsg),
                             "damaged packet block at byte offset %zu: interface %u but "
                             "the section has %u", pos, ifid, self.n_ifaces)
                    return self._fail(True)
                caplen = rd32(b + 12, sw)
                if caplen > body - 20 or caplen > PCAP_MAX_CAPLEN:
                    snprintf(self.errmsg, sizeof(self.errmsg),
                             "damaged packet block at byte offset %zu: captured length "
                             "%u exceeds the block's %u bytes", pos, caplen, body - 20)
                    return self._fail(True)
                itf = &self.ifaces[ifid]
                if itf.mode == LINK_UNSUPPORTED:
                    self._skip_frame(itf.linktype, ifid)
                    self.pos = pos + blen
                    continue
                r.data = b + 20
                r.caplen = caplen
                r.wirelen = rd32(b + 16, sw)
                if itf.fcs_len:
                    drop_fcs(r, itf.fcs_len)
                r.ts_ns = units_to_ns(
                    itf, (<uint64_t>rd32(b + 4, sw) << 32) | rd32(b + 8, sw))
                r.mode = itf.mode
                r.at = pos
                r.next_pos = pos + blen
                return 1
            if btype == BT_SPB:
                if self.n_ifaces == 0 or body < 4:
                    snprintf(self.errmsg, sizeof(self.errmsg),
                             "damaged simple packet block at byte offset %zu: %u bytes long, "
                             "%u interfaces described before it", pos, blen, self.n_ifaces)
                    return self._fail(True)
                itf = &self.ifaces[0]
                if itf.mode == LINK_UNSUPPORTED:
                    self._skip_frame(itf.linktype, 0)
                    self.pos = pos + blen
                    continue
                # An SPB has no captured length: what fits the block, the
                # interface's snaplen and the wire length, whichever is least.
                wirelen = rd32(b, sw)
                caplen = min(wirelen, body - 4)
                if itf.snaplen:
                    caplen = min(caplen, itf.snaplen)
                caplen = min(caplen, <uint32_t>PCAP_MAX_CAPLEN)
                r.data = b + 4
                r.caplen = caplen
                r.wirelen = wirelen
                if itf.fcs_len:
                    drop_fcs(r, itf.fcs_len)
                r.ts_ns = 0
                r.mode = itf.mode
                r.at = pos
                r.next_pos = pos + blen
                return 1
            if btype == BT_IDB:
                if body < 8:
                    snprintf(self.errmsg, sizeof(self.errmsg),
                             "damaged interface block at byte offset %zu: %u bytes long",
                             pos, blen)
                    return self._fail(True)
                if self.n_ifaces == self.cap_ifaces:
                    grown = realloc(self.ifaces,
                                    (self.cap_ifaces * 2 + 4) * sizeof(pcapng_if))
                    if grown == NULL:
                        snprintf(self.errmsg, sizeof(self.errmsg),
                                 "out of memory for interface %u at byte offset %zu",
                                 self.n_ifaces, pos)
                        return self._fail(False)
                    self.ifaces = <pcapng_if *>grown
                    self.cap_ifaces = self.cap_ifaces * 2 + 4
                itf = &self.ifaces[self.n_ifaces]
                memset(itf, 0, sizeof(pcapng_if))
                itf.linktype = rd16(b, sw)
                itf.snaplen = rd32(b + 4, sw)
                itf.mode = link_mode(itf.linktype)
                if itf.linktype != 1 and not self.other_link_seen:
                    self.other_link_seen = True
                    self.other_linktype = itf.linktype
                    self.other_iface = self.n_ifaces
                set_tsresol(itf, 6)
                # An interface of a link type mbx does not read: its frames are
                # skipped and counted (a macOS capture of en0 and an 802.11 monitor
                # interface, say), unless no interface at all is readable (open).
                # Options are read leniently: one that runs past the block ends the
                # list rather than the capture.
                o = 8
                while o + 4 <= body:
                    code = rd16(b + o, sw)
                    olen = rd16(b + o + 2, sw)
                    if code == OPT_ENDOFOPT or olen > body - o - 4:
                        break
                    if code == OPT_IF_TSRESOL and olen >= 1:
                        set_tsresol(itf, b[o + 4])
                    elif code == OPT_IF_FCSLEN and olen >= 1:
                        itf.fcs_len = b[o + 4] // 8     # given in bits
                    elif code == OPT_IF_TSOFFSET and olen >= 8:
                        itf.offset_ns = <int64_t>rd64(b + o + 4, sw) * NS
                    o += 4 + ((olen + 3) & ~(<uint32_t>3))
                self.n_ifaces = self.n_ifaces + 1
            elif btype == BT_SHB and body < 16:
                snprintf(self.errmsg, sizeof(self.errmsg),
                         "damaged section header at byte offset %zu: %u bytes long",
                         pos, blen)
                return self._fail(True)
            # Anything else (name resolution, statistics, custom, ...) is skipped.
            self.pos = pos + blen

    cdef void _skip_frame(self, uint32_t linktype, uint32_t ifid) noexcept nogil:
        if self.skipped == 0:
            self.skipped_linktype = linktype
            self.skipped_iface = ifid
        self.skipped = self.skipped + 1

    cdef void _ethernet(self, pcap_rec *r) noexcept nogil:
        # Gives a raw-IP, Linux cooked or loopback record an Ethernet header, in a scratch
        # buffer because the mapping is read-only; r then describes that frame.
        cdef const uint8_t *d = r.data
        cdef uint32_t hl = 0, l3len, wl
        cdef uint16_t etype = 0
        cdef uint8_t *s
        if r.mode == LINK_SLL:
            hl = 16
            if r.caplen >= 16:
                etype = (d[14] << 8) | d[15]
        elif r.mode == LINK_SLL2:
            hl = 20
            if r.caplen >= 2:
                etype = (d[0] << 8) | d[1]
        elif r.mode == LINK_IPV4:
            etype = 0x0800
        elif r.mode == LINK_IPV6:
            etype = 0x86DD
        else:
            if r.mode == LINK_NULL:
                hl = 4
            if r.caplen >= hl + 1:
                if d[hl] >> 4 == 4:
                    etype = 0x0800
                elif d[hl] >> 4 == 6:
                    etype = 0x86DD
        l3len = r.caplen - hl if r.caplen > hl else 0
        wl = r.wirelen - hl if r.wirelen > hl else 0
        if r.caplen < hl or r.caplen == 0:
            # Cut before its link header ends (or, raw IP, with not one byte): no
            # bytes to put behind an Ethernet header, whose type would be a guess.
            # An empty frame, never a made-up 14-byte one: the parser counts it cut
            # short at L2 (trunc_l2), as it does an Ethernet record under 14 bytes.
            r.caplen = 0
            r.wirelen = ETH_HLEN + wl if wl else 0
            r.mode = LINK_ETHER
            return
        s = self.scratch
        memset(s, 0, 12)
        s[12] = etype >> 8
        s[13] = etype & 0xFF
        memcpy(s + ETH_HLEN, d + hl, l3len)
        r.data = s
        r.caplen = ETH_HLEN + l3len
        r.wirelen = ETH_HLEN + wl
        r.mode = LINK_ETHER

    cpdef bint rss_share(self, uint32_t k, uint32_t n) except -1:
        # Every stack process replays the whole file (paper §4.2), so passing over
        # the others' frames here, before the copy into the batch, is most of what
        # a second process saves; what is delivered is exactly this process's share.
        Port.rss_share(self, k, n)
        if self.own_i < self.own_n:
            # records decided for the old share and not yet delivered would be lost
            raise PortError(f"{self.name}: rss_share({k}, {n}) while frames decided for "
                            f"share {self.rss_k} of {self.rss_n} wait: set the share "
                            "before reading, or rewind() first")
        self.rss_k = k
        self.rss_n = n
        return True

    cdef int _rss_decide(self) noexcept nogil:
        # Software RSS: walks up to RSS_AHEAD records from pos and keeps this
        # process's, in order.  Deciding a run of records before delivering any
        # lets the walk and hash of one overlap the next's (no branch on the owner
        # in between, which is a coin toss per frame); the walk answers for almost
        # every frame, the rest are parsed where they lie (the parser only reads),
        # so nothing is copied before the answer is known.  Returns the records
        # walked (0: none left).
        cdef pcap_rec r
        cdef mbx_pkt probe
        cdef uint32_t h, m = 0, seen = 0
        cdef int kind, owner, got
        cdef bint converted
        self.own_n = self.own_i = 0
        while seen < RSS_AHEAD and self.state == READ_OK:
            got = _next_record(self, &r)
            if got <= 0:
                break
            converted = r.mode != LINK_ETHER
            if converted:
                self._ethernet(&r)
            # every process walks every record once: counted of the whole input
            self._check_wirelen(&r)
            h = 0
            kind = rss_hash_of_frame(r.data, r.caplen, r.wirelen, &h)
            if kind == RSS_PARSE:
                memset(&probe, 0, sizeof(mbx_pkt))
                probe.data = <uint8_t *>r.data
                probe.caplen = r.caplen
                probe.wirelen = r.wirelen
                parse_packet(&probe)
                owner = rss_stack_of_parsed(&probe, self.rss_n)
                if probe.flags & PKT_F_FRAGMENT:
                    kind = RSS_FRAGMENT
            else:
                owner = rss_share_of(h, self.rss_n)
            if kind == RSS_FRAGMENT:
                # every stack rebuilds every datagram: only then are its ports, and
                # so its flow's stack, known.  The process its addresses pick counts
                # it (here and in the stack); for the others it is another's.
                if owner != <int>self.rss_k:
                    kind = FRAGMENT_COUNTED_ELSEWHERE
                owner = self.rss_k
            clock_take(&self.walk_max_ns, r.ts_ns, self.clock_step_ns)
            self.own[m] = r
            self.own_hash[m] = h
            self.own_kind[m] = <int8_t>kind
            self.own_upto_ns[m] = self.walk_max_ns
            m += owner == <int>self.rss_k
            self.pos = r.next_pos
            seen += 1
            if converted and owner == <int>self.rss_k:
                break       # the frame is in scratch: delivered before the next record
        self.own_n = m
        self.rss_skipped = self.rss_skipped + (seen - m)
        return seen

    cdef int _rss_burst(self, Batch batch) noexcept nogil:
        # rx_burst for one of several stack processes: this process's frames only,
        # with the flow hash the walk found (the flow table then skips its own).
        cdef const pcap_rec *r
        cdef mbx_pkt *p
        cdef int n = 0, counted = 0
        cdef uint64_t nbytes = 0
        while True:
            if self.own_i == self.own_n:
                # all of ours delivered: the walk's later records are others', and
                # their time has come
                self.walked_ns = self.walk_max_ns
                if self.state != READ_OK or self._rss_decide() == 0:
                    break
                continue
            r = &self.own[self.own_i]
            p = batch.add(r.data, r.caplen, r.wirelen, r.ts_ns, self.port_id)
            if p == NULL:
                # Full batch: the record stays for the next call.
                if batch.count == 0:
                    self._too_big(r, batch)
                break
            if self._taken_back(batch, p, r.at):
                break
            if self.own_kind[self.own_i] == RSS_FLOW:
                p.hash = self.own_hash[self.own_i]
                p.flags = PKT_F_RSS_HASH
            if self.own_kind[self.own_i] == FRAGMENT_COUNTED_ELSEWHERE:
                self.rss_skipped = self.rss_skipped + 1
            else:
                counted += 1
                nbytes += p.caplen
            self.walked_ns = self.own_upto_ns[self.own_i]
            self.own_i += 1
            n += 1
        return self._burst_end(n, counted, nbytes)

    cdef void _check_wirelen(self, pcap_rec *r) noexcept nogil:
        # A record that says fewer bytes were on the wire than it captured is not
        # valid pcap (tcpdump: "Invalid header", Wireshark: "Frame length is less
        # than captured length").  The stack needs wirelen >= caplen (the parser
        # judges IP lengths against it, a port sends every captured byte), so the
        # wire length is raised to the captured one, as a pcap output then writes
        # it, and the record counted so that the change is not silent.  Once per
        # record taken: a record left for the next burst is not counted twice.
        if r.caplen > r.wirelen:
            r.wirelen = r.caplen
            self.wirelen_raised = self.wirelen_raised + 1

    cdef bint _taken_back(self, Batch batch, mbx_pkt *p, size_t at) noexcept nogil:
        # After each frame copied: if the file shrank under the mapping meanwhile
        # (mbx_on_sigbus), the frame may hold zeros for bytes it never had: take it
        # back out of the batch and stop with an error.  Past a new end inside the
        # last page no SIGBUS comes: those bytes read as zeros, pcap records of
        # length 0, so a record (at byte offset at) that says 0 bytes is checked
        # against the file's size.
        cdef stat_t st
        if not self.cut_under_us:
            if self.is_pcapng or rd32(self.base + at + 8, 0) != 0 or self.map_fd < 0 \
                    or fstat(self.map_fd, &st) != 0 \
                    or <size_t>st.st_size >= at + PCAP_REC_HDR:
                return False
            self.cut_under_us = 1
        batch.count = batch.count - 1
        batch.arena_used = <size_t>(p.data - batch.arena)
        self._shrank()
        return True

    cdef void _shrank(self) noexcept nogil:
        if self.state != READ_FAILED:
            snprintf(self.errmsg, sizeof(self.errmsg),
                     "the file was cut short by another program while it was read "
                     "(near byte offset %zu): reading stops", self.pos)
            self._fail(False)
            self.error_is_format = False
        self.own_i = self.own_n             # reading stops here

    cdef void _too_big(self, const pcap_rec *r, Batch batch) noexcept nogil:
        # Only a frame that cannot fit even an empty batch is an error.
        snprintf(self.errmsg, sizeof(self.errmsg),
                 "a %u-byte frame at byte offset %zu does not fit an empty "
                 "batch (arena of %zu bytes)", r.caplen, r.at, batch.arena_size)
        self._fail(False)
        self.error_is_format = False
        self.own_i = self.own_n         # reading stops here

    cdef int _burst_end(self, int n, int counted, uint64_t nbytes) noexcept nogil:
        # Counts a burst of n frames (counted of them this process's, nbytes their
        # bytes); what rx_burst returns after it.
        self.rx_pkts = self.rx_pkts + counted
        self.rx_bytes = self.rx_bytes + nbytes
        _give_back(self)
        if n:
            return n
        if self.own_i < self.own_n:
            return 0            # the batch was full: frames of ours wait for the next call
        if self.state == READ_FAILED:
            self.state = READ_END
            self.set_error(self.errmsg)
            return PORT_ERROR
        if self.state == READ_END:
            return PORT_EOF
        return 0

    cdef int rx_burst(self, Batch batch) noexcept nogil:
        cdef pcap_rec r
        cdef mbx_pkt *p
        cdef int n = 0
        cdef int got
        cdef uint64_t nbytes = 0
        if self.base == NULL:
            self.set_error(b"closed: it cannot be read")
            return PORT_ERROR
        if self.rss_n > 1:
            return self._rss_burst(batch)
        while self.state == READ_OK:
            got = _next_record(self, &r)
            if got <= 0:
                break
            if r.mode != LINK_ETHER:
                self._ethernet(&r)
            p = batch.add(r.data, r.caplen, r.wirelen, r.ts_ns, self.port_id)
            if p == NULL:
                # Full batch: the record stays for the next call.
                if batch.count == 0:
                    self._too_big(&r, batch)
                break
            if self._taken_back(batch, p, r.at):
                break
            self._check_wirelen(&r)
            self.pos = r.next_pos
            n += 1
            nbytes += p.caplen
        return self._burst_end(n, n, nbytes)


cdef class PcapWriter(Port):
    """Record sent packets to a classic pcap file (native byte order, buffered).

    ``PcapWriter(path, nanosecond=True, snaplen=262144, linktype=1)``; frames longer
    than ``snaplen`` are cut and keep their wire length.  ``close()`` flushes.
    A frame whose time a pcap record cannot hold (before 1970, after 2106-02-07
    06:28:15 UTC) is not written: counted in ``tx_dropped`` and ``tx_bad_time``;
    nor is a frame of no bytes (``tx_empty``, in ``tx_dropped`` too).
    A checksum a live port left for the sending interface (AF_PACKET ``offloads``)
    is finished first, so the capture shows the checksums the wire would carry.
    """

    def __cinit__(self, *args, **kwargs):
        self.fd = -1
        self.buf = NULL
        self.path = ""

    def __init__(self, path, bint nanosecond=True, uint32_t snaplen=PCAP_MAX_CAPLEN,
                 uint32_t linktype=1):
        cdef uint8_t *h
        cdef uint16_t major = 2, minor = 4
        if self.fd >= 0:
            raise PortError(f"{self.name}: already open")
        if not 0 < snaplen <= PCAP_MAX_CAPLEN:
            raise ValueError(f"snaplen {snaplen} is not in 1..{PCAP_MAX_CAPLEN}")
        path = os.fspath(path)
        self.path = path
        self.name = f"pcap:{path}"
        self.nanosecond = nanosecond
        self.snaplen = snaplen
        self.linktype = linktype
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is not None and (st.st_dev, st.st_ino) in _being_read:
            raise PortError(f"pcap:{path}: this capture is being read as an input; writing "
                            "it would destroy it: name another file")
        if st is not None:
            # refused before O_TRUNC empties what the other writer has written
            refuse_second_writer((st.st_dev, st.st_ino), path, self.name)
        from mbx.runtime import inherited_fd
        given = inherited_fd(path)
        try:
            if given is not None:
                # /dev/stdout, /dev/fd/N: the descriptor itself; opened anew, a file
                # it was redirected to would be truncated and written from offset 0,
                # whatever the shell opened it for (>>) or wrote there before
                fd = os.dup(given)
            else:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                             0o666)
        except FileNotFoundError as e:
            where = os.path.dirname(os.path.abspath(path))
            raise PortError(f"pcap:{path}: cannot create: directory {where} does not exist "
                            f"({e.strerror})") from None
        except OSError as e:
            raise PortError(f"pcap:{path}: cannot create ({e.strerror})") from None
        try:
            self.written_key = claim_output(fd, path, f"the pcap output {self.name}")
        except BaseException:
            os.close(fd)
            raise
        self.buf = <uint8_t *>malloc(WRITE_BUFFER)
        if self.buf == NULL:
            os.close(fd)
            release_output(self.written_key)
            raise MemoryError(f"{self.name}: cannot allocate the write buffer")
        self.fd = fd
        h = self.buf
        wr32(h, MAGIC_NS if nanosecond else MAGIC_US)
        # Version 2.4, in native order like every other field.
        memcpy(h + 4, &major, 2)
        memcpy(h + 6, &minor, 2)
        wr32(h + 8, 0)
        wr32(h + 12, 0)
        wr32(h + 16, snaplen)
        wr32(h + 20, linktype)
        self.used = self.buf_first = PCAP_FILE_HDR

    cdef int _flush(self) noexcept nogil:
        cdef size_t done = 0
        cdef ssize_t k
        if self.io_errno:
            # A failed write may have put part of the buffer in the file already:
            # writing it again would leave those records twice (a damaged capture),
            # and the failure was raised where it happened.
            return -1
        while done < self.used:
            k = write(self.fd, self.buf + done, self.used - done)
            if k < 0:
                if errno == EINTR:
                    continue
                self.io_errno = errno
                self._lose_unwritten(done)
                return -1
            done += k
        self.used = 0
        self.buf_first = 0
        self.buf_records = 0
        return 0

    cdef void _lose_unwritten(self, size_t done) noexcept nogil:
        # The records of the buffer a failed write did not put in the file whole
        # were counted sent when they were buffered: they move from tx_pkts to
        # tx_lost, for tx_pkts to count what the file holds and for the stack to
        # count them unsent (a record cut short in the file is one of them).
        cdef size_t at = self.buf_first, size
        cdef uint32_t i
        for i in range(self.buf_records):
            size = PCAP_REC_HDR + rd32(self.buf + at + 8, 0)
            if at + size > done:
                self.tx_pkts = self.tx_pkts - (self.buf_records - i)
                self.tx_lost = self.tx_lost + (self.buf_records - i)
                self.tx_bytes = self.tx_bytes - (self.used - at
                                                 - (self.buf_records - i) * PCAP_REC_HDR)
                break
            at += size
        self.buf_records = 0

    cdef int tx_burst(self, mbx_pkt **pkts, int n) noexcept nogil:
        cdef int i, written = 0
        cdef mbx_pkt *p
        cdef uint32_t caplen
        cdef int64_t ts
        cdef uint8_t *h
        if self.fd < 0:
            self.set_error(b"write on a closed writer")
            return PORT_ERROR
        for i in range(n):
            p = pkts[i]
            ts = p.ts_ns
            if ts < 0 or ts // NS > PCAP_MAX_SECONDS:
                # The record's seconds are unsigned 32 bits from 1970: written, such
                # a time would read back as another, valid-looking one (wrapped, or
                # 1970).  No time is better than a wrong one: left out, counted.
                self.tx_bad_time = self.tx_bad_time + 1
                self.tx_dropped = self.tx_dropped + 1
                continue
            if p.caplen == 0:
                # What the reader delivers for a record with no captured bytes (an
                # Ethernet one of caplen 0), or one cut inside its cooked, raw or
                # loopback link header (its bytes are not Ethernet): an empty record
                # is a broken one to every reader.
                self.tx_empty = self.tx_empty + 1
                self.tx_dropped = self.tx_dropped + 1
                continue
            pkt_finish_csum(p)
            caplen = min(p.caplen, self.snaplen)
            # after a failed write nothing is taken, even what would fit the buffer
            if self.io_errno or self.used + PCAP_REC_HDR + caplen > WRITE_BUFFER:
                if self._flush() < 0:
                    self.record_write_error()
                    return PORT_ERROR
            h = self.buf + self.used
            wr32(h, <uint32_t>(ts // NS))
            wr32(h + 4, <uint32_t>(ts % NS if self.nanosecond else (ts % NS) // 1000))
            wr32(h + 8, caplen)
            wr32(h + 12, p.wirelen if p.wirelen > caplen else caplen)
            memcpy(h + PCAP_REC_HDR, p.data, caplen)
            self.used = self.used + PCAP_REC_HDR + caplen
            # counted as buffered, each on its own: a failed write that loses the
            # buffer moves its records out again (_lose_unwritten), those this
            # call put there included
            self.buf_records += 1
            self.tx_pkts = self.tx_pkts + 1
            self.tx_bytes = self.tx_bytes + caplen
            written += 1
        return written

    def flush(self):
        """Write out what is buffered."""
        cdef int rc = 0
        if self.fd < 0:
            return
        with nogil:
            rc = self._flush()
        if rc < 0:
            raise self.write_error("write failed: {}")

    cdef object write_error(self, str how):
        # EPIPE: the pipe's reader went away (--out pcap:- | head), no failure of the
        # run's: ReaderGoneError is also a BrokenPipeError, which mbx ends quietly on
        cls = ReaderGoneError if self.io_errno == EPIPE else PortError
        return cls(f"{self.name}: {how.format(os.strerror(self.io_errno))}")

    cdef void record_write_error(self) noexcept with gil:
        # send's failed write, raised by check() as set_error's are
        if self._error is None:
            self._error = self.write_error("write failed: {}")

    def close(self):
        """Flush and close the file.  Idempotent.  A write that failed before (raised
        by ``send`` or ``flush``) is not raised again: the run that met it ends with
        that error, the moment it happened, not a second one from its clean-up."""
        cdef int rc = 0
        cdef bint failed_before = self.io_errno != 0
        if self.fd >= 0:
            with nogil:
                rc = self._flush()
            os.close(self.fd)
            self.fd = -1
            release_output(self.written_key)
            self.written_key = None
        free(self.buf)
        self.buf = NULL
        self.closed = True
        if rc < 0 and not failed_before:
            raise self.write_error("write failed at close ({})")

    def __dealloc__(self):
        # A writer dropped without close() still leaves a complete file behind.
        if self.fd >= 0:
            self._flush()
            c_close(self.fd)
            self.fd = -1
            release_output(self.written_key)
        free(self.buf)
        self.buf = NULL

    @property
    def counters(self):
        """The port's counters, ``tx_lost``: records taken (returned as sent) that a
        failed write then lost, not in the file whole and not in ``tx_pkts``;
        ``tx_bad_time``: frames not written for a time a pcap record cannot hold, and
        ``tx_empty``: frames of no bytes, not written (both in ``tx_dropped``, and
        said in ``tx_error``)."""
        c = Port.counters.__get__(self)
        c["tx_lost"] = self.tx_lost
        c["tx_bad_time"] = self.tx_bad_time
        c["tx_empty"] = self.tx_empty
        # no counts in the text: the counters above carry them, and texts are not
        # added up over stack processes as numbers are
        why = []
        if self.tx_bad_time:
            why.append("frames whose time a pcap record cannot hold (before 1970 or "
                       "after 2106-02-07 06:28:15 UTC): tx_bad_time")
        if self.tx_empty:
            why.append("frames of no bytes (input records with no captured bytes, or "
                       "cut inside their link header), which no pcap reader takes: "
                       "tx_empty")
        if why:
            c["tx_error"] = "; ".join(why)
        return c

    def __repr__(self):
        return f"<PcapWriter {self.path!r} packets={self.tx_pkts}>"
