"""Chains of no-op NFs on one consolidated TCP stack, inline: what each extra NF
costs (issue 4, Fig. 6's inline rows, measured finely).

A chain of 1 and a chain of 6 no-op NFs on PKT/TCP, each run ``--runs`` times
alternating, over one capture read from memory.  ``--handler``: ``c`` (default,
``mbx.examples.cnoop``'s C handler), ``batch`` (a Python batch handler) or
``event`` (a Python per-event handler).  Printed: CPU time per packet
(``time.thread_time``, this thread's: steadier than wall clock on a shared VM) and
throughput over the run loop, medians; the chain of 6 over the chain of 1, and the
nanoseconds each NF past the first adds per packet; then the least CPU time of each
and the median of the ratios of runs taken side by side.  ``--stack`` also runs the
stack alone (no NF).  ``--no-nf-timing`` runs without per NF handler clocks (then
C NFs with the same subscriptions share one ring and one pass, see the guide).

    python benchmarks/cchain_figures.py [--handler c|batch|event] [--flows 20000]
                                        [--runs 9] [--stack] [--no-nf-timing]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _args import at_least  # noqa: E402
from captures import make_tcp64_capture  # noqa: E402

import mbx  # noqa: E402
from mbx.examples import cnoop  # noqa: E402
from mbx.ports import open_input  # noqa: E402
from mbx.runtime import App  # noqa: E402

BURST = 64


def on_event(ev):
    pass


def on_batch(records):
    return None


def chain(n, handler="c"):
    nfs = []
    for i in range(n):
        nf = mbx.NF(f"{handler}{i}")
        if handler == "c":
            nf.sub(mbx.PKT_TCP, cnoop.noop_handler())
        else:
            nf.sub(mbx.PKT_TCP, on_batch if handler == "batch" else on_event,
                   batch=handler == "batch")
        nfs.append(nf)
    return nfs


def run_once(n, spec, n_flows, handler="c", nf_timing=True):
    """(CPU ns per packet, wall kpps over the run loop)."""
    inp = open_input(spec)
    try:
        app = App(chain(n, handler), stack="tcp", flow_capacity=2 * n_flows,
                  nf_timing=nf_timing)
        cpu0 = time.thread_time_ns()
        c = app.run(inp, burst=BURST)
        cpu = time.thread_time_ns() - cpu0
    finally:
        inp.close()
    return cpu / c["packets"], c["packets"] / c["timing"]["run_s"] / 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flows", type=at_least(1), default=20_000,
                    help="TCP connections of 10 packets (20000)")
    ap.add_argument("--runs", type=at_least(1), default=9)
    ap.add_argument("--stack", action="store_true", help="also the stack alone")
    ap.add_argument("--handler", choices=("c", "batch", "event"), default="c",
                    help="the NFs' no-op handler (c)")
    ap.add_argument("--no-nf-timing", dest="nf_timing", action="store_false",
                    help="no per NF handler clocks")
    args = ap.parse_args(argv)
    spec = "pcap:" + make_tcp64_capture(args.flows, 10)
    sizes = ([0] if args.stack else []) + [1, 6]
    cpu = {n: [] for n in sizes}
    kpps = {n: [] for n in sizes}
    run_once(1, spec, args.flows, args.handler, args.nf_timing)     # warm the caches
    for _ in range(args.runs):
        for n in sizes:
            c, k = run_once(n, spec, args.flows, args.handler, args.nf_timing)
            cpu[n].append(c)
            kpps[n].append(k)
    med = {n: (statistics.median(cpu[n]), statistics.median(kpps[n])) for n in sizes}
    print(f"{args.handler} handlers{'' if args.nf_timing else ', no handler clocks'}; "
          f"{args.flows:,} TCP connections x 10 packets (64 B), bursts of {BURST}, "
          f"median of {args.runs}, load average {os.getloadavg()[0]:.1f}")
    for n in sizes:
        print(f"chain of {n}: {med[n][0]:6.1f} CPU ns/packet  {med[n][1]:7.0f} kpps")
    print(f"chain of 6 / chain of 1: {med[1][0] / med[6][0]:.2f}x by CPU time, "
          f"{med[6][1] / med[1][1]:.2f}x by wall-clock kpps; each NF past the first "
          f"adds {(med[6][0] - med[1][0]) / 5:.1f} CPU ns per packet")
    # The run is deterministic CPU work: what the host takes from a run (a slower
    # clock, stolen cycles) only ever adds, so the least of each is the figure the
    # host disturbed least, and the median of the ratios of runs taken next to each
    # other pairs runs that saw the same host.
    best = {n: min(cpu[n]) for n in sizes}
    pairs = statistics.median(a / b for a, b in zip(cpu[1], cpu[6], strict=True))
    print(f"least CPU time: chain of 1 {best[1]:.1f}, chain of 6 {best[6]:.1f} ns/packet, "
          f"6/1 = {best[1] / best[6]:.2f}x ({(best[6] - best[1]) / 5:.1f} ns per extra "
          f"NF); median of the {args.runs} side-by-side ratios {pairs:.2f}x")


if __name__ == "__main__":
    main()
