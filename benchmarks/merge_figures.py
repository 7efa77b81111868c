"""What a parallel group's Python merge function costs, against merge = "all".

Three members in one group each vote to drop every packet sent by the server
(direction 1: about half the packets), so both merges drop the same packets:
``merge = "all"`` decides in C as the last vote comes in; the merge function
(``len(dropped) == 3``) is a Python call per voted packet, after every member ran
on it (inline in the dispatcher, pipelined in the stack's merge).  Members are C
handlers (``mbx.examples.cnoop``: the worst case, nothing else in Python) or Python
handlers (the usual case).  The two merges take turns in every round; the figure
is packets per second over the stack's run loop, median of ``--runs`` rounds, and
the ratio function / "all" is taken within the same run.

    python benchmarks/merge_figures.py [--runs 5] [--packets 200000] [--quick]
"""
import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _args import at_least, parse  # noqa: E402
from captures import make_capture  # noqa: E402

import mbx  # noqa: E402
from mbx.examples import cnoop  # noqa: E402
from mbx.ports import open_input  # noqa: E402
from mbx.runtime import App  # noqa: E402

FLOWS = 10_000


def all_three(dropped):
    return len(dropped) == 3


def members(kind, merge):
    if kind == "C":
        nfs = [cnoop.make_dropper(1, name=f"m{i}") for i in range(3)]
    else:
        def make(i):
            nf = mbx.NF(f"m{i}")

            def on_pkt(ev):
                if ev.dir == 1:
                    ev.drop()
            nf.sub(mbx.PKT, on_pkt)
            return nf
        nfs = [make(i) for i in range(3)]
    for nf in nfs:
        nf.group = "g"
        nf.group_merge = merge
    return nfs


def run(kind, merge, deploy, spec):
    """(packets/s, packets dropped)."""
    inp = open_input(spec)
    try:
        c = App(members(kind, merge), stack="network", flow_capacity=1 << 16,
                deploy=deploy).run(inp, burst=64)
    finally:
        inp.close()
    return c["packets"] / c["timing"]["run_s"], c["dropped_by_nf"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=at_least(1), default=5)
    # Each flow opens with a client packet and the members drop the server's, so a
    # capture of no more packets than flows has nothing to drop and no merge to time.
    ap.add_argument("--packets", type=at_least(2 * FLOWS), default=200_000)
    ap.add_argument("--quick", action="store_true",
                    help="2 runs of 50,000 packets (unless given explicitly)")
    args = parse(ap, argv, {"runs": 2, "packets": 50_000})
    spec = "pcap:" + make_capture(args.packets, FLOWS)
    print(f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}; {args.packets:,} "
          f"packets, median of {args.runs}")
    print(f"{'members':<8} {'deploy':<10} {'all Mpps':>9} {'fn Mpps':>9} {'fn/all':>7}")
    for kind in ("C", "Python"):
        for deploy in ("inline", "pipelined"):
            pps = {"all": [], "fn": []}
            for _ in range(args.runs):
                a, dropped_a = run(kind, "all", deploy, spec)
                f, dropped_f = run(kind, all_three, deploy, spec)
                if dropped_a != dropped_f or not dropped_a:
                    raise SystemExit(f"the merges disagree: {dropped_a} / {dropped_f}")
                pps["all"].append(a)
                pps["fn"].append(f)
            a, f = statistics.median(pps["all"]), statistics.median(pps["fn"])
            print(f"{kind:<8} {deploy:<10} {a / 1e6:>9.3f} {f / 1e6:>9.3f} {f / a:>6.2f}x")


if __name__ == "__main__":
    main()
