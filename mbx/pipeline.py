"""Pipelined deployment: the μStack in this process, each NF in its own process.

The NFs are built (and their subscriptions resolved) before the fork, so every
process runs the same NF code with the same handler tables.  One anonymous shared
mapping holds what they share (see ``mbx._pipeline``): nothing is left behind in
/dev/shm, and children die with the stack (PR_SET_PDEATHSIG).
"""
import gc
import io
import json
import mmap
import os
import signal
import sys
import time
import traceback

from mbx import _events
from mbx._packet import Batch
from mbx._pipeline import PipeBus, check_inflight, layout
from mbx._shm import StackMemory
from mbx.errors import AppError, SubscriptionError, exc_text, user_code_line


def backward_link(nfs):
    """``(i, why)`` for the first NF ``nfs[i]`` subscribed to what an NF after it
    publishes, or None.  Publications travel down the chain with the events: the
    pipelined deployment cannot (yet) carry one back up."""
    types = _events.event_types()
    for i, a in enumerate(nfs):
        for j, b in enumerate(nfs[:i]):
            for p in a.pubs:
                for t in b.subs:
                    if types[p].is_a(types[t]) or types[t].is_a(types[p]):
                        return j, (f"pipelined deployment: NF {b.name} subscribes to "
                                   f"{types[t].name}, which NF {a.name} after it "
                                   "publishes; put the publisher first in the chain "
                                   "(or run inline)")
    return None


def _check(nfs):
    # (Within a parallel group the bus refuses a dependency in both deployments:
    # said first, it is the better reason.)
    why = _events.group_dependency(nfs)
    if why is not None:
        raise SubscriptionError(why)
    backward = backward_link(nfs)
    if backward is not None:
        raise AppError(backward[1])
    for nf in nfs:
        check_failure_policy(nf)


def check_failure_policy(nf):
    """Refuse (AppError naming the NF) a ``failure``, ``restart`` or
    ``restart_backoff`` that is not one there is, in every deployment (App.run,
    application files, this module): an NF that runs inline today must not fail
    when it is deployed pipelined, where they apply."""
    if nf.failure not in (None, "open", "closed"):
        raise AppError(f"NF {nf.name}: failure must be 'open' or 'closed', "
                       f"not {nf.failure!r}")
    restart_of(nf)


def restart_of(nf):
    """(restarts allowed, first back-off in seconds) of ``nf``: its ``restart``
    (default 0, never) and ``restart_backoff`` (default 0.1 s, doubled at each
    restart) attributes, as the application file or the NF's code set them."""
    n = nf.restart
    backoff = nf.restart_backoff
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 1000:
        raise AppError(f"NF {nf.name}: restart must be a whole number of restarts from "
                       f"0 to 1000, not {n!r}")
    if (isinstance(backoff, bool) or not isinstance(backoff, int | float)
            or not 0 <= backoff <= 3600):
        raise AppError(f"NF {nf.name}: restart_backoff must be seconds from 0 to 3600, "
                       f"not {backoff!r}")
    return n, float(backoff)


DEFAULT_INFLIGHT = 4


def _lock_step_reason(nfs, tcp=True):
    # What needs each burst to complete before the stack reads the next: stream
    # reads point into live stream buffers, which the stack reuses as soon as it
    # moves on, and a TERMINATE acts on its own epoch's burst and TCP state.  With
    # the TCP Monitor (tcp) a subscription to an ancestor of DATA_RDY (EVENT) gets
    # DATA_RDY too, and a port of an ancestor of TERMINATE (FLOW/TCP) can carry it.
    def takes(t, target):
        return t.overlaps(target) if tcp else t.is_a(target)

    types = _events.event_types()
    for nf in nfs:
        for idx in nf.subs:
            if takes(types[idx], _events.DATA_RDY):
                also = "" if types[idx].is_a(_events.DATA_RDY) else ", so DATA_RDY"
                return (f"NF {nf.name} reads stream bytes (subscribes to "
                        f"{types[idx].name}{also})")
        for idx in nf.pubs:
            if takes(types[idx], _events.FLOW_TCP_TERMINATE):
                also = ("" if types[idx].is_a(_events.FLOW_TCP_TERMINATE) else
                        ", which can carry FLOW/TCP/TERMINATE")
                return f"NF {nf.name} publishes {types[idx].name}{also}"
    return None


def inflight_for(nfs, inflight=None, tcp=True):
    """The bursts in flight for ``nfs``: ``inflight``, or by default 4; but 1 where an
    NF process reads stream bytes or terminates flows (see ``_lock_step_reason``;
    ``tcp``: the TCP Monitor runs), and then a larger ``inflight`` asked for
    explicitly is refused."""
    reason = _lock_step_reason(nfs, tcp)
    if inflight is None:
        return 1 if reason else DEFAULT_INFLIGHT
    check_inflight(inflight)
    if reason and inflight > 1:
        raise AppError(f"pipelined deployment: {reason}, which needs one burst in "
                       f"flight (inflight=1), not {inflight}")
    return inflight


# An NF process's exit status when its stop() raised (3: its handler raised).
STOP_FAILED = 4


def flush_files():
    """Flush every open Python file object that buffers writes, as C programs
    fflush(NULL) before fork().  What an NF's start() wrote into a file's buffer (a
    CSV header) would otherwise be in both processes' copies and reach the file
    twice: from the NF process, and again when the stack's copy is flushed as it is
    freed at exit (or when a restarted NF process, forked from that copy, writes).
    It looks at every object the collector tracks: about 0.35 µs each (a few ms for
    an ordinary NF, 1.8 s at five million objects), paid at start and before a
    restart's fork."""
    sys.stdout.flush()
    sys.stderr.flush()
    for obj in gc.get_objects():
        # a raw FileIO holds no buffer; gc tracks the buffered and text layers
        if isinstance(obj, (io.BufferedIOBase, io.TextIOBase)):
            try:
                if obj.closed or not obj.writable():
                    continue
                obj.flush()
            except (ValueError, OSError):
                # detached or closed meanwhile; or the file's own error (a pipe whose
                # reader left), which is its NF's to meet when it writes, not the run's
                pass


def _child(bus, k, nf):
    # The NF's process: never returns.
    code = 0
    try:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        bus.nf_main(k)
    except BaseException as exc:     # noqa: BLE001 (the process ends here either way)
        text = str(exc) if isinstance(exc, _events.NFError) else (
            f"NF {nf.name}: {exc_text(exc)}")
        if not isinstance(exc, _events.NFError):
            # not a handler's error, whose one line (with the NF's file and line)
            # the stack prints: a traceback helps whoever reports it
            traceback.print_exc()
        try:
            bus.nf_failed(k, text)
        except BaseException:        # noqa: BLE001
            pass
        code = 3
    # Detached before stop(), as inline, where the bus is closed first: an event
    # kept from a handler may no longer drop, nor the NF publish (the stack has
    # ended, and what they did was lost, silently).
    nf._bus = None
    nf._index = -1
    try:
        nf.stop()
    except BaseException as exc:     # noqa: BLE001
        text = (f"NF {nf.name}: stop() raised {exc_text(exc)}"
                f"{user_code_line(exc)}")
        if code:                     # failed already: the stack reports that error
            print(f"mbx: error: {text}", file=sys.stderr)
        else:                        # the run fails for it, as inline (stop_failures)
            try:
                bus.nf_failed(k, text)
            except BaseException:    # noqa: BLE001
                print(f"mbx: error: {text}", file=sys.stderr)
            code = STOP_FAILED
    try:
        from mbx.runtime import take_report

        report = take_report(nf)
        if report is not None:
            bus.nf_report(k, json.dumps(report))
        bus.nf_exit(k)
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(code)


def _pow2(n):
    p = 2
    while p < n:
        p <<= 1
    return p


def run(nfs, make_stack, inp, out, *, msg_capacity, burst, ring_size=0, ring_full="stall",
        inflight=None, nf_timing=True, max_packets=0, progress=None, duration=0,
        stop=None, tcp=True, ended=None):
    """Run ``nfs`` pipelined; ``make_stack(bus)`` builds the μStack over the bus, its
    tables in shared Stack Memory (read-only in the NF processes).  Up to
    ``inflight`` bursts are in flight (the stack reads and parses ahead while the NF
    processes work on earlier ones; see ``inflight_for``).  Returns (stack, pipeline
    counters); ``ended(stack, counters)``, if given, gets them too once the NF
    processes are done, also when the run ends in an error."""
    from mbx.runtime import stop_all

    bus = None
    pidfds = []
    forked = False
    stop_failures = []
    try:
        _check(nfs)
        inflight = inflight_for(nfs, inflight, tcp)
        if msg_capacity < 64 * max(len(nfs), 1):
            raise AppError(f"msg_capacity {msg_capacity} is too small for {len(nfs)} "
                           f"NF processes: give at least {_pow2(64 * len(nfs))} (64 "
                           "messages a process, a power of two)")
        ring_size = int(ring_size) or _pow2(msg_capacity + 64)
        bus = PipeBus(nfs, 0, msg_capacity)
        size, slots = layout(len(nfs), msg_capacity, ring_size,
                             Batch.shared_size(burst), inflight, bus.fanout_members())
        shm = mmap.mmap(-1, size)       # MAP_SHARED | MAP_ANONYMOUS: no file anywhere
        bus.timing = nf_timing
        bus.setup(shm, ring_size, ring_full == "drop",
                  [nf.failure for nf in nfs], inflight,
                  [restart_of(nf) for nf in nfs])
        batches = [Batch.over(memoryview(shm)[at:], burst) for at in slots]
        bus.attach_shared_batches(batches)
        bus.stack_memory = StackMemory()
        with bus.stack_memory.building():
            stack = make_stack(bus)
        from mbx.runtime import opened

        out = opened(out)       # once the stack is built (see App.run)
        flush_files()
        pids = []
        try:
            for k, nf in enumerate(nfs):
                pid = os.fork()
                if pid == 0:
                    _child(bus, k, nf)
                pids.append(pid)
            for pid in pids:
                pidfds.append(os.pidfd_open(pid))
        except BaseException:
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            raise
        bus.become_stack(pids, pidfds)
        forked = True

        def spawn(k):
            # A dead NF again (PipeBus.restart_nf), from this process's pre-fork
            # copy of it; its pidfd is closed with the others.
            flush_files()
            pid = os.fork()
            if pid == 0:
                _child(bus, k, nfs[k])
            pidfds.append(os.pidfd_open(pid))
            return pid, pidfds[-1]

        bus.spawn = spawn
        bus.stop_event = stop
        # the stack's deadline, also while it waits for an NF that never finishes
        bus.stop_deadline_ns = (time.monotonic_ns() + int(duration * 1e9)
                                if duration and duration > 0 else 0)
        stack.run(inp, out, burst=burst, max_packets=max_packets, progress=progress,
                  duration=duration, stop=stop, batches=batches)
    finally:
        if forked:
            bus.finish_run()
            stop_failures = bus.stop_failures(STOP_FAILED)
            if ended is not None:
                # the counters as the run left them, an error or not: they live in
                # the shared mapping, which close() unmaps
                ended(stack, bus.pipeline_counters())
        else:       # the caller started them, and no NF process will stop them
            stop_all(nfs)
        for fd in pidfds:
            os.close(fd)
        if bus is not None:
            bus.close()
    if stop_failures:
        raise _events.NFError(stop_failures[0])
    return stack, bus.pipeline_counters()
