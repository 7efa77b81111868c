"""DPDK ports: an ethdev (usually a virtual device) behind mbx's Port interface.

DPDK's Environment Abstraction Layer (EAL) exists once per process: ``eal_init``
starts it (with arguments that work without hugepages or a NIC of ours) and it is
cleaned up only at interpreter exit, after every port has been closed; a second
initialisation, even after cleanup, is impossible.  ``DpdkPort`` attaches a virtual
device by name and arguments (``net_pcap0,rx_pcap=in.pcap``, ``net_ring0``,
``net_null0``, ``net_af_packet0,iface=veth0``, ``net_memif0,role=server``) or takes
over a port EAL already probed, and moves frames between DPDK mbufs and Batches with
one copy each way, without the GIL.  A port is stopped, closed and detached in EAL's
interrupt thread, in step with the drivers' own control handlers (see "teardown").
"""
import atexit
import os
import re
import shlex
import sys
import threading
import time
import weakref

from libc.errno cimport ENOBUFS, ENOMEM, errno
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdio cimport FILE, fclose, fflush, stderr, stdout
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset, strdup
from posix.time cimport CLOCK_MONOTONIC, CLOCK_REALTIME, clock_gettime, nanosleep, timespec
from posix.unistd cimport close as close_fd
from posix.unistd cimport dup, dup2, read, usleep, write

from mbx._dpdk cimport (
    RTE_ETH_NAME_MAX_LEN,
    RTE_ETH_RX_OFFLOAD_TIMESTAMP,
    RTE_ETH_TX_OFFLOAD_MULTI_SEGS,
    RTE_PKTMBUF_HEADROOM,
    RTE_INTR_HANDLE_EXT,
    RTE_INTR_INSTANCE_F_PRIVATE,
    rte_eal_alarm_set, rte_eal_cleanup,
    rte_eal_hotplug_add,
    rte_eal_hotplug_remove,
    rte_eal_init,
    rte_errno,
    rte_eth_conf,
    rte_eth_dev_adjust_nb_rx_tx_desc,
    rte_eth_dev_close,
    rte_eth_dev_configure,
    rte_eth_dev_get_mtu,
    rte_eth_dev_get_name_by_port,
    rte_eth_dev_get_port_by_name,
    rte_eth_dev_info,
    rte_eth_dev_info_get,
    rte_eth_dev_is_valid_port,
    rte_eth_dev_socket_id,
    rte_eth_dev_start,
    rte_eth_dev_stop,
    rte_eth_link,
    rte_eth_link_get_nowait,
    rte_eth_promiscuous_disable,
    rte_eth_promiscuous_enable,
    rte_eth_promiscuous_get,
    rte_eth_rx_burst,
    rte_eth_rx_queue_setup,
    rte_eth_stats,
    rte_eth_stats_get,
    rte_eth_tx_burst,
    rte_eth_tx_queue_setup,
    rte_intr_callback_register,
    rte_intr_fd_set,
    rte_intr_handle,
    rte_intr_instance_alloc,
    rte_intr_instance_free,
    rte_intr_type_set,
    rte_mbuf,
    rte_mbuf_dyn_rx_timestamp_register,
    rte_mempool_avail_count,
    rte_mempool_free,
    rte_openlog_stream,
    rte_pktmbuf_alloc,
    rte_pktmbuf_append,
    rte_pktmbuf_chain,
    rte_pktmbuf_free,
    rte_pktmbuf_mtod,
    rte_pktmbuf_pool_create,
    rte_pktmbuf_read,
    rte_pktmbuf_tailroom,
    rte_socket_id,
    rte_strerror,
    mbuf_rx_timestamp,
)
from mbx._packet cimport PORT_EOF, PORT_ERROR, Batch, Port, bridge_tx_burst, mbx_pkt
from mbx._fragment cimport (
    FRAG_HDR_MAX, frag_header, frag_payload_at, frag_payload_len, frag_plan, frag_plan_for,
)
from mbx._rewrite cimport pkt_finish_csum

from mbx._packet import bridge_counters
from mbx.errors import PortError
from mbx.ports import (
    MBUFS_DEFAULT, MBUFS_MIN, PCAP_RX_KEYS, TX_WAIT_MAX_MS, vdev_arg, vdev_problem,
)

cdef extern from "<net/if.h>" nogil:
    unsigned int if_nametoindex(const char *name)


cdef extern from "<stdio.h>" nogil:
    FILE *open_memstream(char **ptr, size_t *sizeloc)

cdef extern from "<sched.h>" nogil:
    int sched_yield()

cdef extern from "rte_pause.h" nogil:
    void rte_pause()

cdef extern from "<sys/eventfd.h>" nogil:
    int eventfd(unsigned int initval, int flags)
    enum:
        EFD_NONBLOCK
        EFD_CLOEXEC

cdef extern from *:
    """
    /* Handing a request from one thread to another: a pointer slot the requester
       fills and the worker empties (or the requester takes back), and a flag the
       worker raises when done; each side sees what the other wrote before. */
    static inline void mbx_slot_put(void **slot, void *p) {
        __atomic_store_n(slot, p, __ATOMIC_RELEASE);
    }
    static inline void *mbx_slot_take(void **slot) {
        return __atomic_exchange_n(slot, (void *)0, __ATOMIC_ACQ_REL);
    }
    static inline int mbx_slot_take_back(void **slot, void *p) {
        return __atomic_compare_exchange_n(slot, &p, (void *)0, 0, __ATOMIC_ACQ_REL,
                                           __ATOMIC_ACQUIRE);
    }
    static inline void mbx_flag_raise(int *flag) { __atomic_store_n(flag, 1, __ATOMIC_RELEASE); }
    static inline int mbx_flag_up(int *flag) { return __atomic_load_n(flag, __ATOMIC_ACQUIRE); }

    /* A port's users against its close (Dekker's pattern, hence sequentially
       consistent): a user counts itself in, then looks for the closing flag; the
       close raises the flag, then waits for the count to fall to 0.  Either the
       close sees the user's count and waits for it, or the user sees the flag and
       backs out: no device call can run while the device is torn down. */
    static inline int mbx_use_begin(int *users, const int *closing) {
        __atomic_add_fetch(users, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(closing, __ATOMIC_SEQ_CST)) {
            __atomic_sub_fetch(users, 1, __ATOMIC_RELEASE);
            return 0;
        }
        return 1;
    }
    static inline void mbx_use_end(int *users) {
        __atomic_sub_fetch(users, 1, __ATOMIC_RELEASE);
    }
    static inline void mbx_close_begin(int *closing) {
        __atomic_store_n(closing, 1, __ATOMIC_SEQ_CST);
    }
    static inline int mbx_users(int *users) {
        return __atomic_load_n(users, __ATOMIC_SEQ_CST);
    }
    """
    void slot_put "mbx_slot_put"(void **slot, void *p) noexcept nogil
    void *slot_take "mbx_slot_take"(void **slot) noexcept nogil
    bint slot_take_back "mbx_slot_take_back"(void **slot, void *p) noexcept nogil
    void flag_raise "mbx_flag_raise"(int *flag) noexcept nogil
    int flag_up "mbx_flag_up"(int *flag) noexcept nogil
    bint use_begin "mbx_use_begin"(int *users, const int *closing) noexcept nogil
    void use_end "mbx_use_end"(int *users) noexcept nogil
    void close_begin "mbx_close_begin"(int *closing) noexcept nogil
    int users_now "mbx_users"(int *users) noexcept nogil

__all__ = ["DpdkBridge", "DpdkPort", "default_eal_args", "eal_args", "eal_init", "eal_initialized",
           "KNOWN_VDEV_DRIVERS"]

cdef enum EalState:
    EAL_NONE = 0
    EAL_RUNNING = 1
    EAL_CLEANED = 2

cdef enum:
    # net_pcap reports the end of a capture file only as empty polls: this many in a
    # row end the input (the file's reader never comes back empty before its end,
    # since this port frees every mbuf it receives before polling again).
    PCAP_IDLE_POLLS_EOF = 4
    MEMPOOL_CACHE = 256
    NS_PER_US = 1000
    # How long a close waits by default for EAL's interrupt thread to run it (see
    # _teardown) before doing it from the calling thread, and how often it looks.
    INTR_THREAD_WAIT_S = 10
    INTR_THREAD_POLL_NS = 100000
    # A send waiting for room in the device's ring (tx_wait_ms): this many retries
    # after a pause instruction each, then this many after a sched_yield (a peer on
    # the same CPU gets to run), then retries TX_WAIT_SLEEP_NS apart (plus the
    # kernel's timer slack); the link is looked at every TX_WAIT_LINK_EVERY tries.
    TX_WAIT_SPINS = 64
    TX_WAIT_YIELDS = 64
    TX_WAIT_SLEEP_NS = 20000
    TX_WAIT_LINK_EVERY = 64
    # How often an idle net_memif input looks whether its peer went away (ns).
    MEMIF_LINK_CHECK_NS = 10000000

#: Seconds a net_memif end that sent frames keeps its link up when closed, as opened
#: by mbx.ports (``DpdkPort.linger_s``; the class's default is 0).  DPDK 22.11's
#: memif cannot say how much of its ring the peer has read, and closing takes the
#: ring away (the peer drops what it had not read): the peer gets this long to read
#: it, or until it goes away.  A peer that polls reads a ring of 16k frames in milliseconds, but an
#: `mbx run` server may meet its client before its loop polls: with 20 ms, 1 run in 6
#: of the guide's memif example lost every frame; with 100 ms, none in 6.
MEMIF_LINGER_S = 0.5

#: Milliseconds a net_memif end's send waits, by default, for room in its ring
#: (``DpdkPort(tx_wait_ms=...)``, ``?tx_wait_ms=N``).  The ring is drained by the
#: peer, another process that polls when it is scheduled: a sender faster than its
#: peer finds the ring (1,024 slots by default) full many times a second, and each
#: time it was dropping what did not fit.  Waiting passes the peer's pace back to
#: the sender.  Long enough for a peer that is busy, descheduled on a loaded machine
#: or not polling yet (an `mbx run` server that met its client before its loop
#: started, see MEMIF_LINGER_S); once a wait runs out, the next bursts do not wait
#: until the ring takes a frame again (a peer that stopped reading costs one wait).
MEMIF_TX_WAIT_MS = 500

#: Virtual-device drivers known to work without hugepages or a NIC (the vdev name is
#: one of these followed by an instance number, e.g. ``net_pcap0``).
KNOWN_VDEV_DRIVERS = ("net_pcap", "net_ring", "net_null", "net_af_packet", "net_memif",
                      "net_tap")

cdef int _eal_state = EAL_NONE
_eal_args = None
# The process that started the EAL.  A child forked from it shares the devices and
# EAL's memory but has no EAL threads: there, DPDK is left alone.
_eal_pid = 0
# argv handed to rte_eal_init: EAL may keep pointers into it, so it is never freed.
cdef char **_eal_argv = NULL
# Open ports, closed at exit before the EAL is cleaned up.
_live_ports = weakref.WeakSet()
cdef uint32_t _pool_serial = 0


# ---------------------------------------------------------------- the EAL log
# DPDK reports most failures only in its log (rte_errno is often 0), so calls that
# may fail run with the log captured; the text goes into the PortError and on to
# stderr.  Outside those calls the log goes to stderr, never to stdout (where the
# EAL sends it by default and where `mbx run` prints its results).

cdef class _EalLog:
    cdef FILE *stream
    cdef char *buf
    cdef size_t size

    def __cinit__(self):
        self.stream = open_memstream(&self.buf, &self.size)
        if self.stream != NULL:
            rte_openlog_stream(self.stream)

    cdef str finish(self, bint echo=True):
        """Stop capturing; the captured text (also written to stderr if echo: pass
        False where it goes into an error instead, said once)."""
        cdef str text = ""
        if self.stream != NULL:
            rte_openlog_stream(stderr)
            fflush(self.stream)
            fclose(self.stream)
            self.stream = NULL
            if self.buf != NULL:
                text = self.buf[:self.size].decode("utf-8", "replace")
        free(self.buf)
        self.buf = NULL
        if echo and text:
            sys.stderr.write(text)
            sys.stderr.flush()
        return text

    def __dealloc__(self):
        if self.stream != NULL:
            rte_openlog_stream(stderr)
            fclose(self.stream)
        free(self.buf)


cdef str _log_tail(str text, int lines=4):
    kept = [ln.strip() for ln in text.splitlines() if ln.strip()]
    if not kept:
        return "nothing in the DPDK log"
    return "DPDK log: " + " | ".join(kept[-lines:])


cdef list _driver_lines(str text, int lines=3):
    """The driver's own lines of a DPDK log (its function's name taken off), without
    the EAL's generic ones ("Driver cannot attach the device") or memif's note that
    it has no multi-process channel, which every memif attach prints."""
    kept = []
    for ln in text.splitlines():
        ln = ln.strip()
        if ln and not ln.startswith("EAL:") and "mp action callback" not in ln:
            kept.append(re.sub(r"^\w+\(\):\s*", "", ln))
    return kept[-lines:]


cdef str _err(int rc):
    """A DPDK return code (negative errno, or -1 with rte_errno) as text."""
    cdef int code = -rc if rc < -1 else rte_errno
    if code <= 0:
        return f"error {rc}"
    return f"{rte_strerror(code).decode('utf-8', 'replace')} (errno {code})"


def _cpu_list(cpus):
    """[0, 1, 2, 5] -> '0-2,5': the CPU set EAL's --lcores syntax takes."""
    out = []
    cpus = sorted(cpus)
    i = 0
    while i < len(cpus):
        j = i
        while j + 1 < len(cpus) and cpus[j + 1] == cpus[j] + 1:
            j += 1
        out.append(str(cpus[i]) if i == j else f"{cpus[i]}-{cpus[j]}")
        i = j + 1
    return ",".join(out)


def default_eal_args(memory_mb=256):
    """EAL arguments that work without hugepages, PCI access or root.

    ``--no-huge -m MEMORY_MB`` takes ordinary memory (only what pools use is
    touched); ``--no-shconf`` lets independent processes run side by side;
    ``--lcores=0@(CPUS)`` keeps the caller's CPU affinity instead of pinning it to
    one core.  ``MBX_EAL_ARGS`` in the environment (shell syntax) replaces them.
    """
    env = os.environ.get("MBX_EAL_ARGS")
    if env and env.strip():
        try:
            return tuple(shlex.split(env))
        except ValueError as exc:
            raise PortError(f"MBX_EAL_ARGS={env!r}: {exc} (shell syntax)") from None
    cpus = os.sched_getaffinity(0)
    return ("--no-huge", "-m", str(memory_mb), "--no-pci", "--no-telemetry",
            "--no-shconf", f"--lcores=0@({_cpu_list(cpus)})", "--log-level=*:warning")


def eal_initialized():
    """Is the EAL running in this process?"""
    return _eal_state == EAL_RUNNING


def eal_args():
    """The arguments the running EAL was started with, or None."""
    return _eal_args


def eal_init(args=None):
    """Start DPDK's EAL for this process with ``args`` (default: ``default_eal_args()``).

    Idempotent for the same arguments.  Raises :class:`PortError` when EAL is already
    running with other arguments (there is one EAL per process and it cannot be
    restarted), after it was cleaned up at exit, or when initialisation fails (the
    message quotes the DPDK log).  Returns the arguments in force.
    """
    global _eal_state, _eal_args, _eal_argv, _eal_pid
    cdef int argc, rc, i
    cdef char **argv
    cdef char **owned
    if args is None:
        args = default_eal_args()
    elif isinstance(args, str):
        try:
            args = shlex.split(args)
        except ValueError as exc:
            raise PortError(f"EAL arguments {args!r}: {exc} (shell syntax)") from None
    args = tuple(args)
    for a in args:
        if not isinstance(a, str):
            raise TypeError(f"EAL arguments must be strings, got {a!r}")
    if _eal_state == EAL_RUNNING and os.getpid() != _eal_pid:
        # The EAL's memory came with the fork, its threads did not: a port opened
        # here would be polled with no interrupt thread behind it and close devices
        # under the parent.
        raise PortError(
            f"DPDK EAL was initialised in process {_eal_pid}, and this process "
            f"({os.getpid()}) is a fork of it: DPDK cannot be used in a forked child of "
            "a process that started the EAL (open DPDK ports in the parent, or start "
            "the EAL only in the child)")
    if _eal_state == EAL_RUNNING:
        if args == _eal_args:
            return _eal_args
        raise PortError(
            f"DPDK EAL is already initialised in this process with "
            f"{shlex.join(_eal_args)!r}; it cannot be initialised again with "
            f"{shlex.join(args)!r} (one EAL per process: start another process)")
    if _eal_state == EAL_CLEANED:
        raise PortError("DPDK EAL was already cleaned up in this process and cannot be "
                        "started again")
    argc = len(args) + 1
    argv = <char **>malloc((argc + 1) * sizeof(char *))
    if argv == NULL:
        raise MemoryError("cannot allocate the EAL argument vector")
    argv[0] = strdup(b"mbx")
    for i, a in enumerate(args):
        argv[i + 1] = strdup(a.encode())
    argv[argc] = NULL
    # The EAL's option parser reorders argv (and writes argv[0] over one of them):
    # what to free after a failure is kept apart.
    owned = <char **>malloc((argc + 1) * sizeof(char *))
    if owned == NULL:
        for i in range(argc):
            free(argv[i])
        free(argv)
        raise MemoryError("cannot allocate the EAL argument vector")
    memcpy(owned, argv, (argc + 1) * sizeof(char *))
    log = _EalLog()
    # EAL prints its usage (some 100 lines) on standard output when an argument is
    # wrong, where `mbx run` may be writing a capture or JSON: it goes nowhere (the
    # error names the arguments and quotes the log; getopt names the bad option on
    # standard error).
    sys.stdout.flush()
    fflush(stdout)
    saved = dup(1)
    null = os.open(os.devnull, os.O_WRONLY) if saved >= 0 else -1
    if null >= 0:
        dup2(null, 1)
        os.close(null)
    with nogil:
        rc = rte_eal_init(argc, argv)
    code = rte_errno
    if saved >= 0:
        fflush(stdout)
        dup2(saved, 1)
        close_fd(saved)
    text = log.finish(rc >= 0)     # a failure's log is in its error
    if rc < 0:
        for i in range(argc):
            free(owned[i])
        free(owned)
        free(argv)
        why = rte_strerror(code).decode("utf-8", "replace") if code > 0 else f"error {rc}"
        raise PortError(f"DPDK EAL initialisation failed ({why}) with arguments "
                        f"{shlex.join(args)!r}; {_log_tail(text)}")
    free(owned)                     # argv's strings stay: the EAL may keep them
    _eal_argv = argv
    _eal_args = args
    _eal_state = EAL_RUNNING
    _eal_pid = os.getpid()
    atexit.register(_eal_cleanup)
    why = _watch_wake_fd()
    if why is not None:
        sys.stderr.write(f"mbx: DPDK ports will close from the calling thread, which can "
                         f"race a driver's own handlers (net_memif): {why}\n")
    return _eal_args


def _ensure_eal():
    if _eal_state != EAL_RUNNING or os.getpid() != _eal_pid:
        eal_init()              # starts it, or says why it cannot be used here


def _eal_cleanup():
    """At exit: close what is still open, then release the EAL (never earlier: any
    DPDK call after rte_eal_cleanup crashes the process)."""
    global _eal_state
    if _eal_state != EAL_RUNNING or os.getpid() != _eal_pid:
        return
    for port in list(_live_ports):
        try:
            port.close()
        except Exception as exc:    # noqa: BLE001 -- exit must go on
            sys.stderr.write(f"mbx: closing {port.name} at exit: {exc}\n")
    _eal_state = EAL_CLEANED
    with nogil:
        rte_eal_cleanup()


cdef inline int64_t _now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


def _memif_slot_size(devargs):
    """The bytes of one net_memif ring slot: its ``bsize`` argument, else DPDK's
    default of 2048."""
    for arg in devargs.split(","):
        key, _, value = arg.partition("=")
        if key.strip() == "bsize":
            try:
                return int(value, 0)
            except ValueError:
                break       # the driver refuses it when the device is attached
    return 2048


cdef inline int64_t _mono_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


# ---------------------------------------------------------------- teardown
# A device is stopped, closed and detached in EAL's interrupt thread, never in the
# thread that calls close().  Drivers handle their control events in that thread,
# and DPDK 22.11's net_memif does so without a lock against the application: when
# the other end of a pair goes away, the interrupt thread runs memif_disconnect on
# this end (freeing its shared-memory regions) while close() in the calling thread
# did the same and went on to free the device, a double free that crashed the
# interrupt thread with SIGSEGV in memif_free_regions -> rte_free (1 run in 15-50
# under load: benchmarks/memif_teardown.py).  The interrupt thread runs one
# callback at a time, so a teardown run there cannot overlap memif's handlers, and
# a handler that comes after finds the device's callbacks unregistered.
#
# The request goes through an eventfd of ours that the interrupt thread watches.
# Not an alarm (rte_eal_alarm_set): rte_eal_cleanup then unregisters the alarm
# source, which makes the interrupt thread rebuild its wait list, reading every
# source's handle, while the cleanup unmaps EAL's memory; net_memif never
# unregisters a server's listening socket (memif_socket_remove_device), whose
# handle lives in that memory: SIGSEGV in rte_intr_fd_get at exit.  Our source is
# registered once and never unregistered, so the cleanup leaves the list alone.

cdef struct Teardown:
    uint16_t port
    bint promisc_off        # rte_eth_promiscuous_disable: we turned it on
    bint stop               # rte_eth_dev_stop
    const char *vdev        # close the device and detach this vdev; NULL: neither
    int done                # raised once done, by whichever thread ran it

cdef int _wake_fd = -1              # the eventfd; -1: teardowns run in the caller
cdef int _close_wait_s = INTR_THREAD_WAIT_S
cdef void *_request = NULL          # the Teardown the interrupt thread is to run
# One request at a time (reentrant: a port freed by the garbage collector while
# another closes, outside the wait, closes too).
_request_lock = threading.RLock()


cdef void _teardown(void *arg) noexcept nogil:
    cdef Teardown *t = <Teardown *>arg
    if t.promisc_off:
        # net_af_packet and net_tap set the kernel interface's IFF_PROMISC flag
        # itself, which outlives the process unless it is cleared
        rte_eth_promiscuous_disable(t.port)
    if t.stop:
        rte_eth_dev_stop(t.port)
    if t.vdev != NULL:
        rte_eth_dev_close(t.port)
        rte_eal_hotplug_remove(b"vdev", t.vdev)
    flag_raise(&t.done)


cdef void _on_wake(void *arg) noexcept nogil:
    """In the interrupt thread: run the request, if it was not taken back."""
    cdef uint64_t count
    cdef void *t
    read(_wake_fd, &count, sizeof(count))   # EAL reads no EXT source: re-arm it
    t = slot_take(&_request)
    if t != NULL:
        _teardown(t)


cdef str _watch_wake_fd():
    """Start the interrupt thread watching our eventfd; why not, or None."""
    global _wake_fd
    cdef int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)
    cdef rte_intr_handle *handle
    if fd < 0:
        return f"eventfd: {os.strerror(errno)}"
    # A private handle (malloc'd): it stays valid after rte_eal_cleanup.
    handle = rte_intr_instance_alloc(RTE_INTR_INSTANCE_F_PRIVATE)
    if handle == NULL:
        close_fd(fd)
        return "cannot allocate an interrupt handle"
    if (rte_intr_fd_set(handle, fd) != 0 or rte_intr_type_set(handle, RTE_INTR_HANDLE_EXT) != 0
            or rte_intr_callback_register(handle, _on_wake, NULL) != 0):
        rte_intr_instance_free(handle)
        close_fd(fd)
        return "cannot register an interrupt callback"
    _wake_fd = fd
    return None


cdef int _holding = 0               # raised once _hold has started


cdef void _hold(void *arg) noexcept nogil:
    cdef timespec pause
    pause.tv_sec = <uint64_t>arg // 1000000000
    pause.tv_nsec = <uint64_t>arg % 1000000000
    flag_raise(&_holding)
    nanosleep(&pause, NULL)


def _hold_interrupt_thread(double seconds):
    """For tests: keep EAL's interrupt thread busy for ``seconds`` (an alarm that
    sleeps there), so that a close meets a thread that does not answer.  Returns once
    the hold has started."""
    global _holding
    cdef timespec pause
    if _eal_state != EAL_RUNNING:
        raise PortError("DPDK EAL is not running")
    _holding = 0
    if rte_eal_alarm_set(1, _hold, <void *><uint64_t>(seconds * 1e9)) != 0:
        raise PortError("rte_eal_alarm_set failed")
    pause.tv_sec = 0
    pause.tv_nsec = INTR_THREAD_POLL_NS
    for _ in range(100000):             # 10 s
        if flag_up(&_holding):
            return
        with nogil:
            nanosleep(&pause, NULL)
    raise PortError("EAL's interrupt thread did not start the hold within 10 s")


def _set_close_wait(int seconds):
    """For tests: how long a close waits for the interrupt thread (default 10 s)."""
    global _close_wait_s
    if seconds < 0:
        raise ValueError(f"a wait of {seconds} s")
    _close_wait_s = seconds


cdef bint _teardown_in_interrupt_thread(Teardown *t) noexcept nogil:
    """Run _teardown(t) in EAL's interrupt thread and wait for it; False (and nothing
    done) if there is none to ask or it did not take it within _close_wait_s."""
    cdef timespec pause, now
    cdef int64_t deadline
    cdef uint64_t one = 1
    if _wake_fd < 0:
        return False
    slot_put(&_request, t)
    if write(_wake_fd, &one, sizeof(one)) != sizeof(one):
        if slot_take_back(&_request, t):
            return False
    pause.tv_sec = 0
    pause.tv_nsec = INTR_THREAD_POLL_NS
    clock_gettime(CLOCK_MONOTONIC, &now)
    deadline = now.tv_sec + _close_wait_s
    while not flag_up(&t.done):
        clock_gettime(CLOCK_MONOTONIC, &now)
        if now.tv_sec > deadline:
            if slot_take_back(&_request, t):
                return False
            deadline = now.tv_sec + 365 * 86400     # taken: it is running, wait
        nanosleep(&pause, NULL)
    return True


cdef class DpdkPort(Port):
    """A DPDK ethdev as a port: 1 Rx and 1 Tx queue, frames copied to and from Batches.

    ``DpdkPort("net_pcap0,rx_pcap=in.pcap")`` attaches a virtual device (name, then
    the driver's arguments after the first comma) with ``rte_eal_hotplug_add`` and
    removes it at ``close()``; ``DpdkPort(3)`` uses DPDK port 3 as EAL probed it
    (a ``--vdev`` or a NIC) and leaves it attached.  EAL is started with
    ``default_eal_args()`` if ``eal_init`` was not called first.

    ``port_id`` tags received packets (as for every port); ``mbufs`` buffers of
    ``mbuf_size`` bytes (headroom included) make this port's pool; ``burst`` is the
    most frames asked of the driver per poll.  ``eof_after_idle_polls=N`` ends the
    input after N empty polls in a row (0: never); it defaults to a few for a
    ``net_pcap`` reading a file once (which signals its end no other way) and to 0
    otherwise.

    Received frames carry the capture time for ``net_pcap`` (microseconds) and the
    receive time otherwise.  Frames the batch cannot take yet stay in the port for
    the next call.  Multi-segment mbufs are copied segment by segment; frames over
    256 KiB are dropped (``rx_oversize``).  A send that finds the pool empty hands
    the driver the frames of the burst it holds (which gives their mbufs back, for
    a driver that copies) and goes on; one that finds it empty with none in hand
    drops and counts (``tx_nombuf``, ``tx_dropped``).  An IP datagram longer than a
    ``net_af_packet`` device's MTU or a ``net_memif`` slot goes as fragments
    (``tx_cut``; ``_fragment.pxd``: IPv4 without DF; IPv4 with DF and IPv6 that mbx
    rebuilt) where it may be cut, and a frame received cut short is not sent on
    (``tx_partial``); other drivers send frames as they are.

    ``tx_wait_ms``: when the driver takes only part of a burst (its ring is full),
    the send retries the rest for up to this many milliseconds (spinning, yielding,
    then sleeping 20 µs between tries) before it drops what is left (``tx_full``,
    ``tx_dropped``); ``tx_waits`` counts the bursts that waited.  Default (None):
    ``MEMIF_TX_WAIT_MS`` for ``net_memif``, whose peer is another process draining
    the ring at its own pace, and 0 (drop at once) for every other driver, where a
    full ring means overload (``net_af_packet``, a NIC: the link is slower than the
    offered load, and waiting would only hold up the receive side of the same run)
    or cannot empty while the sender waits (``net_ring``, read by the same process;
    ``net_pcap`` and ``net_null`` take everything).  A wait that runs out marks the
    ring stalled: later bursts drop at once what it cannot take, until it takes a
    frame again.  A wait ends at once when the link goes down (the peer went away)
    or another thread closes the port.
    """

    def __cinit__(self, *args, **kwargs):
        self.pool = NULL
        self.scratch = NULL
        self.attached = False
        self.started = False
        self.held_head = 0
        self.held_count = 0
        self.vdev = ""
        self.devargs = ""
        self.driver = ""
        self.rx_capture = ""

    def __init__(self, vdev_or_port, *, int port_id=0, uint32_t rx_queue_size=1024,
                 uint32_t tx_queue_size=1024, uint32_t mbufs=MBUFS_DEFAULT, uint32_t mbuf_size=2176,
                 uint32_t burst=32, eof_after_idle_polls=None, tx_wait_ms=None):
        global _pool_serial
        cdef uint16_t pid
        cdef int rc, socket
        cdef uint16_t nrx, ntx, mtu = 0
        cdef rte_eth_dev_info info
        cdef rte_eth_conf conf
        cdef char ethname[RTE_ETH_NAME_MAX_LEN]
        cdef const char *cname
        cdef const char *cargs
        if self.pool != NULL or self.attached:
            raise PortError(f"{self.name}: already open")
        if not 0 <= port_id <= 0xFFFF:
            raise ValueError(f"port_id {port_id} is not in 0..65535")
        if not 1 <= burst <= DPDK_MAX_BURST:
            raise ValueError(f"burst {burst} is not in 1..{DPDK_MAX_BURST}")
        if not RTE_PKTMBUF_HEADROOM + 64 <= mbuf_size <= 0xFFFF:
            raise ValueError(f"mbuf_size {mbuf_size} is not in "
                             f"{RTE_PKTMBUF_HEADROOM + 64}..65535 (headroom included)")
        if mbufs < MBUFS_MIN:
            raise ValueError(f"mbufs {mbufs} is below {MBUFS_MIN}")
        if not 1 <= rx_queue_size <= 0xFFFF or not 1 <= tx_queue_size <= 0xFFFF:
            raise ValueError("rx_queue_size and tx_queue_size must be in 1..65535")
        if tx_wait_ms is not None and not (isinstance(tx_wait_ms, int)
                                           and 0 <= tx_wait_ms <= TX_WAIT_MAX_MS):
            raise ValueError(f"tx_wait_ms {tx_wait_ms!r} is not a whole number of "
                             f"milliseconds in 0..{TX_WAIT_MAX_MS}")
        self.port_id = port_id
        self.burst = burst
        self.mbufs = mbufs
        self.mbuf_size = mbuf_size
        _ensure_eal()

        if isinstance(vdev_or_port, int):
            if not 0 <= vdev_or_port <= 0xFFFF or not rte_eth_dev_is_valid_port(vdev_or_port):
                raise PortError(f"dpdk:{vdev_or_port}: no such DPDK port (EAL probed "
                                f"none with that id; attach a vdev by name instead)")
            pid = vdev_or_port
            rte_eth_dev_get_name_by_port(pid, ethname)
            self.name = f"dpdk:{ethname.decode()}"
        elif isinstance(vdev_or_port, str):
            self.name = f"dpdk:{vdev_or_port}"
            name, _, devargs = vdev_or_port.partition(",")
            name = name.strip()
            if not name or any(c in name for c in " =:/"):
                raise PortError(
                    f"dpdk:{vdev_or_port}: expected a vdev name such as net_pcap0 (a driver "
                    f"name and an instance number), then its arguments after a comma")
            problem = vdev_problem(vdev_or_port)
            if problem:     # refused before the driver opens (truncates) any file
                raise PortError(f"dpdk:{vdev_or_port}: {problem}")
            self.vdev = name
            self.devargs = devargs
            bname = name.encode()
            if rte_eth_dev_get_port_by_name(bname, &pid) == 0:
                raise PortError(f"dpdk:{vdev_or_port}: a device named {name!r} is already "
                                f"attached (DPDK port {pid}); give this one another "
                                f"instance number")
            bargs = devargs.encode()
            cname = bname
            cargs = bargs
            log = _EalLog()
            with nogil:
                rc = rte_eal_hotplug_add(b"vdev", cname, cargs)
            text = log.finish(rc >= 0)     # a failure's log is in its error
            if rc < 0:
                if "failed to parse device" in text or not name.startswith(
                        KNOWN_VDEV_DRIVERS):
                    why = (f"no virtual-device driver matches the name (it must start "
                           f"with a driver name, e.g. {', '.join(KNOWN_VDEV_DRIVERS)})")
                elif "Address already in use" in text:
                    # memif: the driver's return code says ENOENT; its log says why
                    why = ("its socket path is in use: another run is listening there, "
                           "or a run that was killed left the socket file behind "
                           "(remove it if no run uses it)")
                elif _driver_lines(text):
                    # the errno the EAL returns is the probe's, often not the reason
                    # (EOPNOTSUPP for a missing interface): the driver's log says it
                    why = (f"the driver says: {' | '.join(_driver_lines(text))} (check "
                           f"the arguments {devargs!r})")
                    text = ""
                else:
                    why = (f"the driver refused it ({_err(rc)}; check the arguments "
                           f"{devargs!r})")
                raise PortError(f"dpdk:{vdev_or_port}: cannot attach vdev {name!r}: "
                                f"{why}" + (f"; {_log_tail(text)}" if text else ""))
            self.attached = True
            _live_ports.add(self)       # closed at exit even if the rest fails
            if rte_eth_dev_get_port_by_name(bname, &pid) != 0:
                # A driver can probe without creating an ethdev (or a bus other
                # than the one we meant took the name).
                self._release()
                raise PortError(f"dpdk:{vdev_or_port}: vdev {name!r} attached but no "
                                f"ethdev port appeared; {_log_tail(text)}")
        else:
            raise TypeError(f"expected a vdev spec (str) or a DPDK port id (int), got "
                            f"{vdev_or_port!r}")
        self.dpdk_port = pid
        _live_ports.add(self)

        rc = rte_eth_dev_info_get(pid, &info)
        if rc != 0:
            self._release()
            raise PortError(f"{self.name}: cannot read the device info: {_err(rc)}")
        self.driver = (info.driver_name or b"").decode("utf-8", "replace")
        iface = vdev_arg(f"{self.name},{self.devargs}", "iface", "").encode() if (
            self.driver == "net_af_packet") else b""
        memset(self.kernel_iface, 0, sizeof(self.kernel_iface))
        if len(iface) < sizeof(self.kernel_iface):
            memcpy(self.kernel_iface, <const char *>iface, len(iface))
        socket = rte_eth_dev_socket_id(pid)
        if socket < 0:
            socket = rte_socket_id()

        self.scratch = <uint8_t *>malloc(DPDK_MAX_FRAME)
        if self.scratch == NULL:
            self._release()
            raise MemoryError(f"{self.name}: cannot allocate a frame buffer")
        pool_name = f"mbx_pool{_pool_serial}".encode()
        _pool_serial += 1
        log = _EalLog()
        self.pool = rte_pktmbuf_pool_create(pool_name, mbufs, min(MEMPOOL_CACHE, mbufs // 4),
                                            0, mbuf_size, socket)
        code = rte_errno
        text = log.finish(self.pool != NULL)
        if self.pool == NULL:
            self._release()
            msg = rte_strerror(code).decode("utf-8", "replace") if code > 0 else "failed"
            hint = ""
            if code == ENOMEM or code == ENOBUFS or code == 0:
                # ENOBUFS: what DPDK 22.11 returns for some sizes EAL's memory
                # cannot hold (200,000 mbufs with -m 256), ENOMEM for others
                hint = (f"; EAL has the memory of its -m option ({shlex.join(_eal_args)!r}):"
                        f" start it with a larger -m (eal_init or MBX_EAL_ARGS) or use "
                        f"fewer mbufs")
            raise PortError(f"{self.name}: cannot create a pool of {mbufs} mbufs of "
                            f"{mbuf_size} bytes: {msg}{hint}; {_log_tail(text)}")
        self.seg_room = mbuf_size - RTE_PKTMBUF_HEADROOM

        memset(&conf, 0, sizeof(conf))
        self.timestamps = False
        # Drivers that stamp only on request (not net_pcap in 22.11, which always
        # does) are asked to; the stamp is trusted only from net_pcap, where it is
        # the capture time in microseconds (elsewhere its clock is the device's).
        if info.rx_offload_capa & RTE_ETH_RX_OFFLOAD_TIMESTAMP:
            conf.rxmode.offloads |= RTE_ETH_RX_OFFLOAD_TIMESTAMP
        if info.tx_offload_capa & RTE_ETH_TX_OFFLOAD_MULTI_SEGS:
            conf.txmode.offloads |= RTE_ETH_TX_OFFLOAD_MULTI_SEGS
        nrx = rx_queue_size
        ntx = tx_queue_size
        log = _EalLog()
        rc = rte_eth_dev_configure(pid, 1, 1, &conf)
        step = "configure 1 Rx + 1 Tx queue"
        if rc == 0:
            rc = rte_eth_dev_adjust_nb_rx_tx_desc(pid, &nrx, &ntx)
            step = "adjust the queue sizes"
        if rc == 0:
            rc = rte_eth_rx_queue_setup(pid, 0, nrx, socket, NULL, self.pool)
            step = f"set up the Rx queue ({nrx} descriptors)"
        if rc == 0:
            rc = rte_eth_tx_queue_setup(pid, 0, ntx, socket, NULL)
            step = f"set up the Tx queue ({ntx} descriptors)"
        if rc == 0:
            with nogil:
                rc = rte_eth_dev_start(pid)
            step = "start the device"
        text = log.finish(rc == 0)
        if rc != 0:
            self._release()
            hint = ""
            if self.driver == "net_memif" and "Failed to connect socket" in text:
                # a client connects when it starts: its server must be listening
                hint = (" (no memif server listens on its socket: start the other end, "
                        "role=server, first)")
            elif "mbufs per queue is required" in text:
                # net_pcap's infinite_rx holds the whole capture in the pool
                hint = (f" (the pool has {mbufs} mbufs: give more, "
                        f"dpdk:VDEV,ARGS?mbufs=N or DpdkPort(mbufs=N))")
            raise PortError(f"{self.name}: cannot {step}: {_err(rc)}{hint}; "
                            f"{_log_tail(text)}")
        self.started = True
        # Not every vdev has a promiscuous mode; those that do (af_packet, tap) need
        # it to see traffic for other MACs.
        log = _EalLog()
        if rte_eth_promiscuous_get(pid) == 0:
            self.promisc_set = rte_eth_promiscuous_enable(pid) == 0
        log.finish(False)
        if self.driver == "net_pcap":
            # Registering finds the field and flag the driver registered at probe.
            self.timestamps = rte_mbuf_dyn_rx_timestamp_register(
                &self.ts_offset, &self.ts_flag) == 0

        once = (self.driver == "net_pcap" and "rx_pcap=" in self.devargs
                and "infinite_rx=1" not in self.devargs.replace(" ", ""))
        if once:
            self.rx_capture = vdev_arg(f"{self.name},{self.devargs}", "rx_pcap", "")
        keys = {item.partition("=")[0].strip() for item in self.devargs.split(",")}
        # a net_pcap device with no file or interface to read (tx_pcap only) polls an
        # empty queue: its input, which never comes, ends at once (a bridge reads
        # its other side to the end)
        silent = self.driver == "net_pcap" and not keys & set(PCAP_RX_KEYS)
        if eof_after_idle_polls is None:
            eof_after_idle_polls = PCAP_IDLE_POLLS_EOF if once or silent else 0
        if eof_after_idle_polls < 0:
            raise ValueError("eof_after_idle_polls must be >= 0")
        self.eof_after_idle_polls = eof_after_idle_polls
        self.idle_polls = 0
        if tx_wait_ms is None:
            # See the class's docstring and MEMIF_TX_WAIT_MS.
            tx_wait_ms = MEMIF_TX_WAIT_MS if self.driver == "net_memif" else 0
        self.tx_max_len = 0
        if self.driver == "net_memif":
            # DPDK 22.11's memif corrupts the ring after a frame longer than one slot
            # (it leaves a "next" flag on the slot, and a frame written there a ring
            # later reaches the peer merged with the ones after it): such a frame is
            # not sent (tx_oversize), so it cannot spoil the others.
            self.tx_max_len = _memif_slot_size(self.devargs)
        # A datagram mbx rebuilt (or the kernel, for net_af_packet's fanout group) is
        # longer than the link it leaves on: cut it as the AF_PACKET port does, where
        # the device has a link MTU (net_af_packet: a longer frame is dropped by the
        # driver or the kernel, unseen) or a slot (memif).  Files and loops take any
        # length, as the pcap port writes the datagram whole.
        self.tx_mtu = 0
        if self.driver == "net_af_packet" and rte_eth_dev_get_mtu(pid, &mtu) == 0:
            self.tx_mtu = mtu
        self.tx_wait_ms = tx_wait_ms
        self.tx_stalled = False
        self.memif = self.driver == "net_memif"

    # ------------------------------------------------------------ receive

    cdef int _copy_held(self, Batch batch, int64_t now_ns) noexcept nogil:
        cdef rte_mbuf *m
        cdef const uint8_t *data
        cdef uint32_t length
        cdef int64_t ts
        cdef int n = 0
        cdef uint64_t nbytes = 0
        while self.held_count:
            m = self.held[self.held_head]
            length = m.pkt_len
            if length > DPDK_MAX_FRAME:
                self.rx_oversize = self.rx_oversize + 1
                self.rx_dropped = self.rx_dropped + 1
            else:
                if m.nb_segs != 1:
                    data = <const uint8_t *>rte_pktmbuf_read(m, 0, length, self.scratch)
                elif m.data_len >= length and \
                        <uint32_t>m.data_off + m.data_len <= m.buf_len:
                    data = rte_pktmbuf_mtod(m)
                else:
                    # a driver whose lengths claim more than its one segment's buffer
                    # holds (net_null with size= beyond the mbuf): never read past it
                    data = NULL
                if data == NULL:
                    self.rx_dropped = self.rx_dropped + 1
                    self.rx_bad_length = self.rx_bad_length + 1
                    rte_pktmbuf_free(m)
                    self.held_head = self.held_head + 1
                    self.held_count = self.held_count - 1
                    continue
                ts = now_ns
                if self.timestamps and (m.ol_flags & self.ts_flag):
                    ts = <int64_t>mbuf_rx_timestamp(m, self.ts_offset) * NS_PER_US
                if batch.add(data, length, length, ts, self.port_id) == NULL:
                    if batch.count:
                        break           # full: the frame waits for the next call
                    # Not even an empty batch holds it.
                    self.rx_oversize = self.rx_oversize + 1
                    self.rx_dropped = self.rx_dropped + 1
                else:
                    n += 1
                    nbytes += length
            rte_pktmbuf_free(m)
            self.held_head = self.held_head + 1
            self.held_count = self.held_count - 1
        self.rx_pkts = self.rx_pkts + n
        self.rx_bytes = self.rx_bytes + nbytes
        return n

    cdef int rx_burst(self, Batch batch) noexcept nogil:
        cdef int n
        if not use_begin(&self.users, &self.closing):
            return PORT_EOF
        n = self._rx_burst(batch)
        use_end(&self.users)
        return n

    cdef int _rx_burst(self, Batch batch) noexcept nogil:
        cdef int n = 0, k
        cdef uint32_t room, want
        cdef uint16_t got = 1          # a call that finds the batch full is not idle
        cdef int64_t now
        if not self.started:
            return PORT_EOF
        now = _now_ns()
        if self.held_count:
            n = self._copy_held(batch, now)
            if self.held_count:
                return n
        # Poll until the batch is full or the driver has no more for now.
        while True:
            room = batch.capacity - batch.count
            if room == 0:
                break
            want = room if room < self.burst else self.burst
            got = rte_eth_rx_burst(self.dpdk_port, 0, self.held, <uint16_t>want)
            self.held_head = 0
            self.held_count = got
            if got:
                k = self._copy_held(batch, now)
                n += k
                if k == 0 and not self.held_count:
                    # every frame dropped (too large, bad): back to the caller, who
                    # looks at the clock and the stop flag, rather than poll on
                    break
            if got < want or self.held_count:
                break
        if n:
            self.idle_polls = 0
            self.link_was_up = True
            return n
        if got == 0:
            if self.memif and now - self.link_checked_ns > MEMIF_LINK_CHECK_NS:
                self.link_checked_ns = now
                if self._peer_went_away():
                    # its input ended, as a pipe's when the writer closes (a peer that
                    # finished and one that died look the same from here)
                    self.at_end = True
                    return PORT_EOF
            self.idle_polls = self.idle_polls + 1
            if self.eof_after_idle_polls and self.idle_polls >= self.eof_after_idle_polls:
                self.at_end = True
                return PORT_EOF
            if self.kernel_iface[0] and now - self.iface_checked_ns > 1000000000:
                self.iface_checked_ns = now
                if if_nametoindex(self.kernel_iface) == 0:
                    # deleted (or moved to another namespace): the driver would poll
                    # its socket for ever
                    self.set_error(b"its interface is gone (deleted, or moved to "
                                   b"another network namespace)")
                    return PORT_ERROR
        return 0

    # ------------------------------------------------------------ send

    cdef int tx_burst(self, mbx_pkt **pkts, int n) noexcept nogil:
        cdef int sent
        if not use_begin(&self.users, &self.closing):
            self.set_error(b"send on a closed port")
            return PORT_ERROR
        sent = self._tx_burst(pkts, n)
        use_end(&self.users)
        return sent

    cdef uint32_t _cut_mtu(self, const mbx_pkt *p) noexcept nogil:
        # The IP bytes a frame like p may carry on this device, if longer ones are
        # cut (see __init__); 0: none are.
        if self.tx_mtu:
            return self.tx_mtu
        if self.tx_max_len > p.l3_off + 68:     # memif: what a slot leaves for IP
            return self.tx_max_len - p.l3_off
        return 0

    cdef int _fill_parts(self, rte_mbuf *head, const uint8_t *a, uint32_t alen,
                         const uint8_t *b, uint32_t blen) noexcept nogil:
        """Copy a then b into head (a frame: b empty; a fragment: its headers, then
        its payload), chaining more mbufs where one is not enough; -1: the pool ran dry, -2: the
        chain would be too long."""
        cdef rte_mbuf *seg = head
        cdef const uint8_t *src[2]
        cdef uint32_t left[2]
        cdef uint32_t room, chunk
        cdef int part = 0
        cdef char *dst
        src[0], src[1], left[0], left[1] = a, b, alen, blen
        while True:
            room = rte_pktmbuf_tailroom(seg)
            while part < 2:
                if left[part] == 0:
                    part += 1
                    continue
                if room == 0:
                    break
                chunk = left[part] if left[part] < room else room
                dst = rte_pktmbuf_append(seg, <uint16_t>chunk)
                memcpy(dst, src[part], chunk)
                src[part] += chunk
                left[part] -= chunk
                room -= chunk
            if seg != head and rte_pktmbuf_chain(head, seg) != 0:
                rte_pktmbuf_free(seg)
                return -2
            if part == 2:
                return 0
            seg = rte_pktmbuf_alloc(self.pool)
            if seg == NULL:
                return -1

    cdef int _tx_burst(self, mbx_pkt **pkts, int n) noexcept nogil:
        cdef rte_mbuf *out[DPDK_MAX_BURST]
        cdef uint32_t lens[DPDK_MAX_BURST]
        cdef uint8_t ends[DPDK_MAX_BURST]      # 1: its packet's last (or only) frame
        cdef uint8_t hdr[FRAG_HDR_MAX]
        cdef frag_plan plan
        cdef rte_mbuf *m
        cdef mbx_pkt *p
        cdef int i = 0
        cdef int k, j, rc, k0
        cdef uint32_t mtu, piece, hlen, at, plen
        cdef uint16_t sent
        cdef int total = 0
        cdef uint64_t nbytes
        cdef bint gone
        if not self.started:
            self.set_error(b"send on a closed port")
            return PORT_ERROR
        while i < n:
            k = 0
            while i < n and k < DPDK_MAX_BURST:
                p = pkts[i]
                if p.caplen < p.wirelen and (self.tx_mtu or self.tx_max_len):
                    # a device with a link (see __init__): a frame had only in part
                    # would carry headers that promise bytes that are not there (a
                    # net_pcap file keeps it, as the pcap port does)
                    self.tx_partial = self.tx_partial + 1
                    self.tx_dropped = self.tx_dropped + 1
                    i += 1
                    continue
                # No offload metadata goes to the device: a checksum an AF_PACKET
                # port with offloads left for the sender is finished here.
                pkt_finish_csum(p)
                mtu = self._cut_mtu(p)
                plan.count = 0
                if (mtu and p.caplen > mtu + p.l3_off and p.gso_size == 0
                        and frag_plan_for(p, mtu, &plan)
                        and plan.count <= DPDK_MAX_BURST):
                    if k + <int>plan.count > DPDK_MAX_BURST:
                        break               # its fragments go in the next burst, together
                    k0 = k
                    for piece in range(plan.count):
                        m = rte_pktmbuf_alloc(self.pool)
                        if m == NULL:
                            rc = -1
                            break
                        hlen = frag_header(p, &plan, piece, hdr)
                        at = frag_payload_at(&plan, piece)
                        plen = frag_payload_len(&plan, piece)
                        rc = self._fill_parts(m, hdr, hlen, p.data + at, plen)
                        if rc != 0:
                            rte_pktmbuf_free(m)
                            break
                        lens[k] = hlen + plen
                        ends[k] = piece + 1 == plan.count
                        out[k] = m
                        k += 1
                    if k - k0 == <int>plan.count:
                        self.tx_cut = self.tx_cut + 1
                    else:
                        # a datagram goes whole or not at all
                        for j in range(k0, k):
                            rte_pktmbuf_free(out[j])
                        k = k0
                        if rc == -1 and k:
                            break       # the pool ran dry: see below
                        if rc == -1:
                            self.tx_nombuf = self.tx_nombuf + 1
                        else:
                            self.tx_oversize = self.tx_oversize + 1
                        self.tx_dropped = self.tx_dropped + 1
                    i += 1
                    continue
                if self.tx_max_len and p.caplen > self.tx_max_len:
                    self.tx_oversize = self.tx_oversize + 1     # see __init__
                    self.tx_dropped = self.tx_dropped + 1
                    i += 1
                    continue
                m = rte_pktmbuf_alloc(self.pool)
                if m == NULL and k:
                    # The pool ran dry filling this burst (a pool smaller than a
                    # burst): send what it holds, which gives the driver's copies
                    # back to the pool (net_pcap, memif), then take this packet again.
                    break
                if m == NULL:
                    self.tx_nombuf = self.tx_nombuf + 1
                    self.tx_dropped = self.tx_dropped + 1
                    i += 1
                    continue
                rc = self._fill_parts(m, p.data, p.caplen, NULL, 0)
                if rc == -1 and k:
                    rte_pktmbuf_free(m)
                    break               # as above
                if rc != 0:
                    rte_pktmbuf_free(m)
                    if rc == -1:
                        self.tx_nombuf = self.tx_nombuf + 1
                    else:
                        self.tx_oversize = self.tx_oversize + 1
                    self.tx_dropped = self.tx_dropped + 1
                else:
                    lens[k] = p.caplen
                    ends[k] = 1
                    out[k] = m
                    k += 1
                i += 1
            if k == 0:
                continue
            sent = rte_eth_tx_burst(self.dpdk_port, 0, out, <uint16_t>k)
            if sent:
                self.tx_stalled = False
                self.link_was_up = True
            if sent < k and self.tx_wait_ms and not self.tx_stalled:
                sent += self._tx_wait(&out[sent], k - sent)
            gone = sent < k and self._peer_went_away()
            nbytes = 0
            for j in range(sent):
                nbytes += lens[j]
                total += ends[j]        # packets: a cut one once all its fragments went
            # What the driver did not take (after any wait) is ours to free.
            for j in range(sent, k):
                rte_pktmbuf_free(out[j])
            if gone:
                self.tx_link_down = self.tx_link_down + (k - sent)
            else:
                self.tx_full = self.tx_full + (k - sent)
            self.tx_dropped = self.tx_dropped + (k - sent)
            self.tx_pkts = self.tx_pkts + sent
            self.tx_bytes = self.tx_bytes + nbytes
            if gone:
                # Nothing sent from now on can reach it, however long the run lasts:
                # end it, as an AF_PACKET output whose interface was deleted does
                # (what this burst had left counts as dropped on the error).
                self.set_error(b"the memif peer went away (its link went down): "
                               b"nothing sent from now on could reach it")
                return PORT_ERROR
        return total

    cdef bint _peer_went_away(self) noexcept nogil:
        """net_memif: whether its link, up before, is down now (the peer closed or
        died).  A memif pair is one link between two runs, and a peer that comes back
        later is another run: mbx does not wait for one.  Looking also records a link
        seen up."""
        cdef rte_eth_link link
        if not self.memif:
            return False
        if self.peer_gone:
            return True
        if rte_eth_link_get_nowait(self.dpdk_port, &link) != 0:
            return False
        if link.link_status:
            self.link_was_up = True
        elif self.link_was_up:
            self.peer_gone = True
        return self.peer_gone

    cdef int _tx_wait(self, rte_mbuf **out, int left) noexcept nogil:
        """Offer the driver ``out[:left]`` (what its ring had no room for) again until
        it takes them all or tx_wait_ms passes; how many it took.  Gives up at once
        when another thread closes the port (close() waits for this send to leave)
        or the link goes down (a peer that went away drains nothing); a wait that
        runs out marks the ring stalled (see the class's docstring)."""
        cdef int taken = 0
        cdef uint32_t tries = 0
        cdef int64_t deadline
        cdef timespec pause
        cdef rte_eth_link link
        if flag_up(&self.closing):
            return 0
        self.tx_waits = self.tx_waits + 1
        deadline = _mono_ns() + <int64_t>self.tx_wait_ms * 1000000
        pause.tv_sec = 0
        pause.tv_nsec = TX_WAIT_SLEEP_NS
        while True:
            if tries < TX_WAIT_SPINS:
                rte_pause()
            elif tries < TX_WAIT_SPINS + TX_WAIT_YIELDS:
                sched_yield()
            else:
                nanosleep(&pause, NULL)
            tries += 1
            taken += rte_eth_tx_burst(self.dpdk_port, 0, &out[taken],
                                      <uint16_t>(left - taken))
            if taken == left or flag_up(&self.closing):
                break
            if _mono_ns() >= deadline:
                self.tx_stalled = True
                break
            if tries % TX_WAIT_LINK_EVERY == 0:
                if rte_eth_link_get_nowait(self.dpdk_port, &link) == 0 \
                        and not link.link_status:
                    break
        return taken

    # ------------------------------------------------------------ life cycle

    cdef void _release(self) noexcept:
        """Stop, close and detach what this port holds; safe to call twice."""
        cdef uint16_t pid = self.dpdk_port
        cdef rte_mbuf *drain[DPDK_MAX_BURST]
        cdef uint16_t got
        cdef uint32_t polls = 0
        cdef Teardown t
        cdef bint ran
        if os.getpid() == _eal_pid:
            self._wait_for_users()
        else:
            # A forked child: the count may hold the parent's threads, which the
            # child does not have, and nothing below calls DPDK here.
            close_begin(&self.closing)
        if _eal_state != EAL_RUNNING or os.getpid() != _eal_pid:
            # After rte_eal_cleanup every DPDK call crashes, and a forked child
            # closing a device would close it under its parent: only forget.
            self.pool = NULL
            self.started = False
            self.attached = False
            self.held_count = 0
            free(self.scratch)
            self.scratch = NULL
            return
        while self.held_count:
            rte_pktmbuf_free(self.held[self.held_head])
            self.held_head += 1
            self.held_count -= 1
            self.rx_unread += 1
        if self.started and self.driver == "net_ring":
            # net_ring hands over mbuf pointers: mbufs of our pool still queued would
            # outlive it (the ring of a vdev of the same name is found again).
            got = 1
            while got and polls < self.mbufs // DPDK_MAX_BURST + 2:
                got = rte_eth_rx_burst(pid, 0, drain, DPDK_MAX_BURST)
                for j in range(got):
                    rte_pktmbuf_free(drain[j])
                self.rx_unread += got
                self.tx_unread += got      # what it sent into the ring, never read
                polls += 1
        if self.started or self.attached:
            bname = self.vdev.encode()
            t.port = pid
            t.promisc_off = self.promisc_set
            t.stop = self.started
            t.vdev = NULL
            if self.attached:
                t.vdev = bname
            t.done = 0
            with _request_lock:
                with nogil:
                    ran = _teardown_in_interrupt_thread(&t)
            if not ran:
                # Stuck (or our eventfd could not be watched): better closed from
                # here, racing as described above, than left open.
                if _wake_fd >= 0:
                    sys.stderr.write(f"mbx: {self.name}: EAL's interrupt thread did not "
                                     f"run the close within {_close_wait_s} s; "
                                     f"closing from this thread\n")
                with nogil:
                    _teardown(&t)
            self.started = False
            self.attached = False
        if self.pool != NULL:
            rte_mempool_free(self.pool)
            self.pool = NULL
        free(self.scratch)
        self.scratch = NULL

    cdef void _wait_for_users(self) noexcept:
        """Refuse new receives, sends and counter reads, and wait until none is left
        in another thread: DPDK has no guard of its own against a burst on a device
        that is being stopped, and the pool is freed after.  Each takes
        microseconds; a thread stopped inside one (a debugger) is waited for, and
        said so once."""
        cdef int64_t start = _mono_ns()     # an interval: not the wall clock
        cdef bint told = False
        close_begin(&self.closing)
        while users_now(&self.users):
            with nogil:
                usleep(50)
            if not told and _mono_ns() - start > <int64_t>_close_wait_s * 1000000000:
                sys.stderr.write(f"mbx: {self.name}: close() is waiting for another "
                                 f"thread to leave a receive or send on this port\n")
                told = True

    def close(self):
        """Stop the device, detach a vdev this port attached, free the pool.
        Idempotent; also done at exit for ports still open.  Safe while other
        threads receive or send on the port: those calls finish first, later ones
        see the end of input (receive) or a closed port (send).  A port that sent
        frames first keeps its link up for ``linger_s`` seconds, or until the peer
        goes away (a net_memif end opened by mbx.ports: MEMIF_LINGER_S), for the
        peer to read what is still in the ring."""
        if self.attached or self.started or self.pool != NULL:
            if self.linger_s > 0 and self.tx_pkts and os.getpid() == _eal_pid:
                # See MEMIF_LINGER_S: the peer may not have read the ring yet.  A
                # peer that went away has nothing more to read.
                deadline = time.monotonic() + self.linger_s
                while self.link_up and time.monotonic() < deadline:
                    time.sleep(0.005)
            self._last_stats = self.device_stats
            log = _EalLog()
            self._release()
            log.finish()
        self.closed = True
        _live_ports.discard(self)

    def __dealloc__(self):
        if self.attached or self.started or self.pool != NULL or self.scratch != NULL:
            self._release()

    # ------------------------------------------------------------ counters

    @property
    def device_stats(self):
        """The device's own counters (rte_eth_stats), or {} once closed."""
        cdef rte_eth_stats st
        cdef int rc
        if not self.started or _eal_state != EAL_RUNNING:
            return dict(self._last_stats or {})
        if not use_begin(&self.users, &self.closing):
            return dict(self._last_stats or {})
        rc = rte_eth_stats_get(self.dpdk_port, &st)
        use_end(&self.users)
        if rc != 0:
            return {}
        return {"ipackets": st.ipackets, "opackets": st.opackets, "ibytes": st.ibytes,
                "obytes": st.obytes, "imissed": st.imissed, "ierrors": st.ierrors,
                "oerrors": st.oerrors, "rx_nombuf": st.rx_nombuf}

    @property
    def link_up(self):
        """Whether the device reports its link up (a memif pair once both ends have
        connected; False once closed)."""
        cdef rte_eth_link link
        cdef int rc
        if not self.started or _eal_state != EAL_RUNNING:
            return False
        if not use_begin(&self.users, &self.closing):
            return False
        rc = rte_eth_link_get_nowait(self.dpdk_port, &link)
        use_end(&self.users)
        if rc == 0 and link.link_status:
            self.link_was_up = True     # a link seen up that goes down: the peer left
        return rc == 0 and bool(link.link_status)

    def wait_for_link(self, double seconds, cancel=None):
        """Return True once the device reports its link up, within ``seconds`` (0:
        only look); raise :class:`PortError` if it does not come up by then.  Return
        False, without waiting longer, once ``cancel`` (anything with ``is_set()``: a
        run's stop event) is set: the run is stopping, which is no failure of the
        port, and it sends nothing.  A memif end is up once its peer has connected
        over the socket, which happens in EAL's interrupt thread after the device
        started: frames sent before are lost."""
        cdef double deadline
        if not seconds >= 0:            # also refuses nan
            raise ValueError(f"link wait {seconds} s: must be 0 or more")
        deadline = time.monotonic() + seconds
        while not self.link_up:
            if not self.started:
                raise PortError(f"{self.name}: closed while waiting for its link")
            if cancel is not None and cancel.is_set():
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                raise PortError(self._link_down_text(seconds))
            time.sleep(min(left, 0.005))
        return True

    def _link_down_text(self, double seconds):
        if self.driver != "net_memif":
            return f"{self.name}: link not up after {seconds:g} s"
        args = {}
        for item in self.devargs.split(","):
            key, _, value = item.partition("=")
            args[key.strip()] = value.strip()
        # the driver's defaults (DPDK 22.11 net_memif)
        other = "client" if args.get("role", "server") == "server" else "server"
        where = args.get("socket", "/run/memif.sock")
        if args.get("socket-abstract", "yes") != "no":
            where += " (abstract)"
        return (f"memif link {self.name} not up after {seconds:g} s: is the other end "
                f"(role={other}, id={args.get('id', '0')}) running on socket {where}?")

    @property
    def mbufs_free(self):
        """Mbufs available in this port's pool (0 once closed)."""
        cdef unsigned int n
        if self.pool == NULL or _eal_state != EAL_RUNNING:
            return 0
        if not use_begin(&self.users, &self.closing):
            return 0
        n = rte_mempool_avail_count(self.pool)
        use_end(&self.users)
        return n

    @property
    def counters(self):
        c = {"rx_pkts": self.rx_pkts, "rx_bytes": self.rx_bytes,
             "tx_pkts": self.tx_pkts, "tx_bytes": self.tx_bytes,
             "rx_dropped": self.rx_dropped, "tx_dropped": self.tx_dropped,
             "rx_oversize": self.rx_oversize, "rx_bad_length": self.rx_bad_length,
             "rx_unread": self.rx_unread, "tx_unread": self.tx_unread,
             "tx_nombuf": self.tx_nombuf,
             "tx_oversize": self.tx_oversize, "tx_full": self.tx_full,
             "tx_waits": self.tx_waits, "tx_cut": self.tx_cut,
             "tx_partial": self.tx_partial, "tx_link_down": self.tx_link_down}
        if self.peer_gone:
            c["peer_gone"] = 1          # a memif peer went away: the end of input
        # why frames were not sent, for mbx run's summary (the most telling first)
        if self.tx_oversize and self.tx_max_len:
            c["tx_error"] = (f"frames longer than a memif slot ({self.tx_max_len} bytes): "
                             "raise bsize on both ends")
        elif self.tx_partial:
            c["tx_error"] = f"{self.tx_partial} received cut short, so not sent on"
        elif self.tx_link_down:
            c["tx_error"] = "the memif peer went away (its link went down)"
        elif self.tx_full:
            c["tx_error"] = "the device's ring stayed full"
        elif self.tx_nombuf:
            c["tx_error"] = "no mbuf free in the port's pool"
        st = self.device_stats
        if st:
            # Frames the driver lost before we polled: no mbuf, or the device missed.
            c["rx_nombuf"] = st["rx_nombuf"]
            c["rx_missed"] = st["imissed"]
        if self.at_end and self.rx_capture:
            c.update(self._capture_end())
        return c

    def _capture_end(self):
        """How the ``rx_pcap`` file ends, as the pcap port counts it: ``truncated``
        (a final record cut short, which net_pcap, as the pcap port, does not
        deliver) or ``damage`` (the pcap port's error there; net_pcap stops at it or
        reads on through it, without a word either way).  Walked once, at the end of
        input, when the file has just been read."""
        from mbx._pcap import PcapReader
        from mbx.errors import CaptureFormatError

        if self.capture_end is None:
            found = {}
            try:
                reader = PcapReader(self.rx_capture)
            except (OSError, PortError):
                reader = None           # gone or replaced since: nothing to say
            if reader is not None:
                try:
                    reader.walk_to_end()
                    found["truncated"] = reader.truncated
                except CaptureFormatError as exc:
                    found["damage"] = str(exc)
                finally:
                    reader.close()
            self.capture_end = found
        return self.capture_end

    def __repr__(self):
        state = "closed" if self.closed else f"port {self.dpdk_port}"
        return f"<DpdkPort {self.name!r} {self.driver} {state} rx={self.rx_pkts} " \
               f"tx={self.tx_pkts}>"


cdef enum:
    # Empty polls of both sides before a bridge with idle_us sleeps: a frame that is
    # on its way (the peer's reply) is still met by polling.
    BRIDGE_SPIN_POLLS = 64


cdef class DpdkBridge(Port):
    """The middlebox between two DPDK devices, as one port for input and output.

    ``DpdkBridge(client_vdev, server_vdev, idle_us=0, **options)``: frames received
    on the client-side device get port 0, those from the server side port 1;
    ``tx_burst`` sends a packet with port 0 out of the server side and one with
    port 1 out of the client side (any other port id is dropped and counted in
    ``misrouted``).  ``options`` go to both ``DpdkPort``s.  The spec
    ``dpdk:VDEV0[,ARGS]+VDEV1[,ARGS][?idle_us=N]`` opens one.  Use the same object
    as input and output of a run; its input ends once both sides' have ended (one
    side's capture running out leaves the other to be read to its end, as two
    captures given in turn would be).

    DPDK drivers poll and never sleep, which is right on a core of its own.  On
    cores shared with other work (the test bed's 2 cores, with the client and the
    servers), ``idle_us=N`` sleeps N µs once both sides have been empty for
    BRIDGE_SPIN_POLLS polls in a row, giving the core back (never while a pipelined
    stack has bursts in flight); a frame arriving then waits up to that long (plus
    the kernel's timer slack).
    """

    def __init__(self, str client_vdev, str server_vdev, *, uint32_t idle_us=0,
                 **options):
        if "port_id" in options:
            raise TypeError("DpdkBridge sets port_id itself (0 client, 1 server side)")
        if client_vdev.partition(",")[0] == server_vdev.partition(",")[0]:
            raise PortError(f"dpdk:{client_vdev}+{server_vdev}: a bridge needs two "
                            f"different devices")
        self.name = f"dpdk:{client_vdev}+{server_vdev}"
        self.idle_us = idle_us
        self.client = DpdkPort(client_vdev, port_id=0, **options)
        try:
            self.server = DpdkPort(server_vdev, port_id=1, **options)
        except BaseException:
            self.client.close()
            raise

    def close(self):
        """Close both sides.  Idempotent."""
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.close()
        self.closed = True

    @property
    def ports(self):
        """(client side, server side)."""
        return (self.client, self.server)

    @property
    def live(self):
        """Frames are stamped when received: the stack may expire idle flows by the
        wall clock while nothing arrives.  Not a bridge replaying a capture
        (``net_pcap`` with ``rx_pcap``): its frames carry the capture's times."""
        return not any("rx_pcap=" in side.devargs for side in (self.client, self.server))

    @property
    def counters(self):
        return bridge_counters(self, self.client, self.server, self.misrouted)

    def __repr__(self):
        return f"<DpdkBridge {self.client.name!r} <-> {self.server.name!r}>"

    cdef int rx_burst(self, Batch batch) noexcept nogil:
        cdef int a, b, n
        cdef timespec pause
        if self.ended:
            return PORT_EOF
        # Alternate which side goes first, so one busy side cannot starve the other.
        self.turn ^= 1
        a = b = PORT_EOF
        if self.turn:
            if not self.client_ended:
                a = self.client.rx_burst(batch)
            if not self.server_ended:
                b = self.server.rx_burst(batch)
        else:
            if not self.server_ended:
                b = self.server.rx_burst(batch)
            if not self.client_ended:
                a = self.client.rx_burst(batch)
        if a == PORT_ERROR:
            self.adopt_error(self.client)
            return PORT_ERROR
        if b == PORT_ERROR:
            self.adopt_error(self.server)
            return PORT_ERROR
        # A side that ended is polled no more (a net_pcap file is not read again);
        # what the other side returned is delivered.
        if a == PORT_EOF:
            self.client_ended = True
        if b == PORT_EOF:
            self.server_ended = True
        self.ended = self.client_ended and self.server_ended
        n = (a if a > 0 else 0) + (b if b > 0 else 0)
        self.rx_pkts = self.client.rx_pkts + self.server.rx_pkts
        self.rx_bytes = self.client.rx_bytes + self.server.rx_bytes
        if n == 0 and self.ended:
            return PORT_EOF
        if n or batch.count:
            self.idle_polls = 0
        elif self.idle_us and not self.rx_nowait:
            self.idle_polls = self.idle_polls + 1
            if self.idle_polls >= BRIDGE_SPIN_POLLS:
                pause.tv_sec = self.idle_us // 1000000
                pause.tv_nsec = (self.idle_us % 1000000) * 1000
                nanosleep(&pause, NULL)
        return n

    cdef int tx_burst(self, mbx_pkt **pkts, int n) noexcept nogil:
        return bridge_tx_burst(self, self.client, self.server, pkts, n, &self.misrouted)
