"""Open, use and close DPDK memif pairs many times under CPU load; count crashes.

    python benchmarks/memif_teardown.py [--runs 200] [--hogs 2] [--pairs 3]

Each run is a fresh process (one EAL each) in one of two layouts, alternating:

- ``pair``: both ends of a memif pair in one process; ``--pairs`` pairs opened,
  used and closed one after the other;
- ``split``: the server end in one process, the client end in another, closing at
  about the same time (a user's port talking to another program).

Every pair waits for its link, carries ``--frames`` frames client -> server, checks
they all arrived, then closes both ends.  A run that dies of a signal is a crash;
one that exits non-zero otherwise is a failure, one still running after
``--timeout`` (killed then) a timeout; each has its stderr printed.  ``--hogs``
busy processes (default: one per CPU) keep the cores loaded meanwhile, since the
teardown races DPDK's interrupt thread only when it is slow to be scheduled.

DPDK 22.11's memif crashed (SIGSEGV in its interrupt thread, in
``memif_free_regions``) in about 1 run in 15-50 of this loop before the close was
moved into EAL's interrupt thread (see ``DpdkPort.close``).  Not a test (it takes
minutes): it prints the count of crashes, which must be 0.
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time

from _args import at_least, seconds

HERE = os.path.abspath(__file__)
LINK_WAIT_S = 10.0
RING_LOG2 = 12          # memif rsize: a ring of 2**12 frames


def _frames(n):
    """n distinct Ethernet frames (60-1514 bytes): enough to fill memif's rings."""
    out = []
    for i in range(n):
        size = 60 + (i * 37) % 1455
        out.append(bytes([0x02, 0, 0, 0, 0, 1, 0x02, 0, 0, 0, 0, 2, 0x08, 0x00])
                   + bytes((i + k) & 0xFF for k in range(size - 14)))
    return out


def _open_end(role, serial, sock, **kw):
    from mbx._dpdkport import DpdkPort

    # a ring holds every frame sent before the other end reads (--frames at most)
    return DpdkPort(f"net_memif{serial},role={role},socket={sock},socket-abstract=no,"
                    f"rsize={RING_LOG2}", **kw)


def _wait_link(*ports):
    deadline = time.monotonic() + LINK_WAIT_S
    while not all(p.link_up for p in ports):
        if time.monotonic() > deadline:
            raise SystemExit(f"memif ends {[p.name for p in ports]} did not connect in "
                             f"{LINK_WAIT_S:.0f} s")
        time.sleep(0.005)


def _send(port, frames):
    from mbx._packet import Batch

    batch = Batch(len(frames), arena_size=sum(len(f) + 16 for f in frames) + 64)
    for f in frames:
        batch.append(f)
    sent = port.send(batch)
    if sent != len(frames):
        raise SystemExit(f"{port.name}: sent {sent} of {len(frames)} frames")


def _receive(port, frames):
    from mbx._packet import Batch

    got = []
    batch = Batch(64)
    deadline = time.monotonic() + LINK_WAIT_S
    while len(got) < len(frames) and time.monotonic() < deadline:
        batch.reset()
        port.receive(batch)
        got += [batch.frame(i) for i in range(len(batch))]
    if got != frames:
        raise SystemExit(f"{port.name}: received {len(got)} of {len(frames)} frames, "
                         f"{'in order' if got == frames[:len(got)] else 'not as sent'}")


def child_pair(workdir, pairs, nframes):
    """Both ends in this process, ``pairs`` times over."""
    frames = _frames(nframes)
    for k in range(pairs):
        sock = os.path.join(workdir, f"pair{k}.sock")
        with _open_end("server", 2 * k, sock) as server, \
                _open_end("client", 2 * k + 1, sock) as client:
            _wait_link(server, client)
            _send(client, frames)
            _receive(server, frames)


def child_end(role, workdir, nframes):
    """One end; the other is another process.  The client sends, the server
    receives; both then meet at a file barrier so that they close together."""
    frames = _frames(nframes)
    sock = os.path.join(workdir, "split.sock")
    if role == "client":
        deadline = time.monotonic() + LINK_WAIT_S
        while not os.path.exists(sock):             # the server made its socket
            if time.monotonic() > deadline:
                raise SystemExit(f"no memif server socket at {sock}")
            time.sleep(0.005)
    with _open_end(role, 0, sock) as port:
        _wait_link(port)
        if role == "client":
            _send(port, frames)
        else:
            _receive(port, frames)
        open(os.path.join(workdir, f"{role}.done"), "w").close()
        other = os.path.join(workdir, ("server" if role == "client" else "client") + ".done")
        deadline = time.monotonic() + LINK_WAIT_S
        while not os.path.exists(other) and time.monotonic() < deadline:
            time.sleep(0.001)


def run_once(layout, pairs, nframes, timeout):
    """One run; a list of (verdict, returncode, stderr tail), one per process."""
    with tempfile.TemporaryDirectory(prefix="mbx-memif-") as workdir:
        if layout == "pair":
            cmds = [[sys.executable, HERE, "--child", "pair", workdir, str(pairs),
                     str(nframes)]]
        else:
            cmds = [[sys.executable, HERE, "--child", role, workdir, "0", str(nframes)]
                    for role in ("server", "client")]
        procs = [subprocess.Popen(c, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True) for c in cmds]
        out = []
        for p in procs:
            try:
                _, err = p.communicate(timeout=timeout)
            except subprocess.TimeoutExpired:
                # our own SIGKILL: a hang, which a crash count must not take in
                p.kill()
                _, err = p.communicate()
                out.append(("timeout", p.returncode, err))
                continue
            verdict = "ok" if p.returncode == 0 else "crash" if p.returncode < 0 else "failed"
            out.append((verdict, p.returncode, err))
        return out


def start_hogs(n, seconds):
    """n busy processes, each ending by itself after ``seconds`` or once this
    process is gone (however it ended)."""
    code = ("import os, time\n"
            f"parent, end = {os.getpid()}, time.monotonic() + {seconds}\n"
            "while time.monotonic() < end and os.getppid() == parent:\n"
            "    for _ in range(100000): pass\n")
    return [subprocess.Popen([sys.executable, "-c", code]) for _ in range(n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=at_least(1), default=200, help="processes' runs in all")
    ap.add_argument("--hogs", type=at_least(0), default=len(os.sched_getaffinity(0)),
                    help="busy processes meanwhile (default: one per CPU)")
    ap.add_argument("--pairs", type=at_least(1), default=3, help="pairs per 'pair' run")
    ap.add_argument("--frames", type=at_least(1, 1 << RING_LOG2), default=2000,
                    help="frames each pair carries")
    ap.add_argument("--layout", choices=("both", "pair", "split"), default="both")
    ap.add_argument("--timeout", type=seconds, default=120.0, help="seconds per run at most")
    ap.add_argument("--child", nargs=4, metavar=("ROLE", "DIR", "PAIRS", "FRAMES"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        role, workdir, pairs, nframes = args.child
        if role == "pair":
            child_pair(workdir, int(pairs), int(nframes))
        else:
            child_end(role, workdir, int(nframes))
        return 0

    layouts = ("pair", "split") if args.layout == "both" else (args.layout,)
    hogs = start_hogs(args.hogs, seconds=args.runs * args.timeout)
    counts = {lay: {"ok": 0, "crash": 0, "failed": 0, "timeout": 0} for lay in layouts}
    t0 = time.monotonic()
    try:
        for i in range(args.runs):
            layout = layouts[i % len(layouts)]
            for verdict, rc, err in run_once(layout, args.pairs, args.frames, args.timeout):
                counts[layout][verdict] += 1
                if verdict != "ok":
                    what = (f"timed out after {args.timeout:g} s" if verdict == "timeout"
                            else f"signal {signal.Signals(-rc).name}" if rc < 0
                            else f"exit {rc}")
                    print(f"run {i + 1} ({layout}): {what}: {err.strip()[-600:]}",
                          file=sys.stderr)
    finally:
        for h in hogs:
            h.kill()
            h.wait()
    elapsed = time.monotonic() - t0
    print(f"memif open/carry/close, {args.runs} runs under {args.hogs} CPU hogs, "
          f"{elapsed:.0f} s ({'; '.join(layouts)}; {args.pairs} pairs per 'pair' run, "
          f"{args.frames} frames per pair):")
    for layout, c in counts.items():
        print(f"  {layout:<6} processes: {c['ok']} exited 0, {c['crash']} crashed, "
              f"{c['failed']} failed, {c['timeout']} timed out")
    crashes, failures, timeouts = (sum(c[k] for c in counts.values())
                                   for k in ("crash", "failed", "timeout"))
    print(f"crashes: {crashes}, failures: {failures}, timeouts: {timeouts}")
    return 1 if crashes or failures or timeouts else 0


if __name__ == "__main__":
    sys.exit(main())
