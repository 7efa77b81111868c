"""What NF restart costs in the pipelined deployment, in the same run.

    python benchmarks/restart_figures.py [--quick] [--runs N] [--packets N]

Three configurations of one chain of two no-op NF processes (PKT), K = 4 bursts in
flight, alternating, each the median of ``--runs`` runs over the stack's run loop
(``timing.run_s``):

- ``base``: no restart (the default);
- ``armed``: ``restart = 3`` on both NFs, none dies: the price of being ready;
- ``restarted``: the first NF SIGKILLs itself once, a tenth of the way in, fail-open
  and restarted at once (``restart_backoff = 0``): the price of a death and a
  restart, with its recovery, against the same packets.

Printed: packets per second of each, and armed/base, restarted/base.
"""
import argparse
import gc
import os
import signal
import statistics
import tempfile

import captures
from _args import at_least, parse

import mbx
from mbx.ports import open_input

MIN_PACKETS = 10_000


def chain(mode, kill_at, marker):
    nfs = []
    for i in range(2):
        nf = mbx.NF(f"noop{i}")
        nf.failure = "open"
        nf.restart = 0 if mode == "base" else 3
        nf.restart_backoff = 0
        nfs.append(nf)
    seen = [0]

    def first(ev):
        seen[0] += 1
        if mode == "restarted" and seen[0] == kill_at and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)

    nfs[0].sub(mbx.PKT, first)
    nfs[1].sub(mbx.PKT, lambda ev: None)
    return nfs


def once(path, mode, kill_at, burst):
    # the marker makes it die once: the restarted process runs to the end
    inp = open_input("pcap:" + path)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            gc.collect()
            c = mbx.App(chain(mode, kill_at, os.path.join(tmp, "died")),
                        deploy="pipelined", inflight=4).run(inp, burst=burst)
    finally:
        inp.close()
    n = c["pipeline"]["nfs"]["noop0"]
    if n["restarts"] != (mode == "restarted") or c["pipeline"]["lost"]:
        raise SystemExit(f"{mode}: unexpected run: {n['restarts']} restarts, "
                         f"{c['pipeline']['lost']} lost")
    return c["timing"]["run_s"], c["packets"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="50 k packets, 1 run (unless given explicitly)")
    p.add_argument("--runs", type=at_least(1), default=5)
    # The NF dies a tenth of the way in; the bursts in flight then and the restart
    # need packets after it, or no death is measured.
    p.add_argument("--packets", type=at_least(MIN_PACKETS), default=400_000)
    p.add_argument("--burst", type=at_least(1), default=64)
    args = parse(p, argv, {"runs": 1, "packets": 50_000})
    path = captures.make_capture(args.packets, 10_000, "64")
    modes = ("base", "armed", "restarted")
    times = {m: [] for m in modes}
    packets = 0
    for _ in range(args.runs):
        for m in modes:
            t, packets = once(path, m, args.packets // 10, args.burst)
            times[m].append(t)
    pps = {m: packets / statistics.median(times[m]) for m in modes}
    print(f"cores {len(os.sched_getaffinity(0))}, {packets:,} packets, "
          f"median of {args.runs} runs, alternating")
    for m in modes:
        print(f"  {m:<10} {pps[m] / 1e3:10.1f} kpps")
    print(f"armed/base {pps['armed'] / pps['base']:.3f}  "
          f"restarted/base {pps['restarted'] / pps['base']:.3f}")


if __name__ == "__main__":
    main()
