"""Before/after for ``cchain_figures.py``: the same benchmark under two builds of mbx,
alternating, one round after the other (so both see the same machine load).
Per-process effects (where memory landed, the host's mood) move a process's whole
figure by up to a third on the shared VM, so each figure is taken within one
process (chain of 1 and of 6 alternating there) and the medians are over rounds.

Each build is a Python whose ``import mbx`` gives it (a venv with an editable install
of one revision, e.g. ``git archive REV | tar -x -C DIR`` then
``pip install --no-build-isolation -e DIR`` in a venv of DIR).  Printed per build:
the medians over all rounds of CPU ns per packet for the chain of 1 and 6, their
ratio, and ns per extra NF.

    python benchmarks/cchain_ab.py BEFORE_PYTHON AFTER_PYTHON [--rounds 5] [--runs 3]
                                   [--handler c|batch|event] [--no-nf-timing]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys

from _args import at_least, program

HERE = os.path.dirname(os.path.abspath(__file__))
LINE = re.compile(r"chain of (\d+):\s+([\d.]+) CPU ns/packet\s+(\d+) kpps")
RATIO = re.compile(r"([\d.]+)x by CPU time, ([\d.]+)x by wall-clock kpps; each NF past "
                   r"the first adds ([\d.-]+) CPU ns")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before", type=program)
    ap.add_argument("after", type=program)
    ap.add_argument("--rounds", type=at_least(1), default=5)
    ap.add_argument("--runs", type=at_least(1), default=3)
    ap.add_argument("--flows", type=at_least(1), default=20_000)
    ap.add_argument("--handler", choices=("c", "batch", "event"), default="c")
    ap.add_argument("--no-nf-timing", dest="nf_timing", action="store_false",
                    help="both builds without per NF handler clocks")
    args = ap.parse_args(argv)
    got = {"before": [], "after": []}
    for _ in range(args.rounds):
        for name in ("before", "after"):
            out = subprocess.run(
                [getattr(args, name), os.path.join(HERE, "cchain_figures.py"),
                 "--runs", str(args.runs), "--flows", str(args.flows),
                 "--handler", args.handler] + ([] if args.nf_timing else ["--no-nf-timing"]),
                capture_output=True, text=True, check=True).stdout
            ns = {int(n): float(v) for n, v, _ in LINE.findall(out)}
            ratio, kratio, extra = RATIO.search(out).groups()
            got[name].append((ns[1], ns[6], float(ratio), float(kratio), float(extra)))
    print(f"{args.rounds} rounds alternating x {args.runs} runs each, load average "
          f"{os.getloadavg()[0]:.1f}; medians over rounds")
    for name in ("before", "after"):
        one, six, ratio, kratio, extra = (statistics.median(col)
                                          for col in zip(*got[name], strict=True))
        print(f"{name:>6}: chain of 1 {one:6.1f} CPU ns/packet, chain of 6 {six:6.1f}; "
              f"6/1 = {ratio:.2f}x by CPU time ({kratio:.2f}x by kpps), {extra:.1f} ns "
              f"per extra NF  (rounds: {', '.join(f'{r[4]:.1f}' for r in got[name])})")

if __name__ == "__main__":
    sys.exit(main())
