"""Before/after for ``cchain_figures.py``: the same benchmark under two builds of mbx,
alternating, one round after the other (so both see the same machine load).

Each build is a Python whose ``import mbx`` gives it (a venv with an editable install
of one revision, e.g. ``git archive REV | tar -x -C DIR`` then ``pip install -e DIR``
in a venv of DIR).  Printed per build: the medians over all rounds of CPU ns per
packet for the chain of 1 and 6, their ratio, and ns per extra NF.

    python benchmarks/cchain_ab.py BEFORE_PYTHON AFTER_PYTHON [--rounds 5] [--runs 3]
"""
import argparse
import os
import re
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
LINE = re.compile(r"chain of (\d+):\s+([\d.]+) CPU ns/packet\s+(\d+) kpps")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("before")
    ap.add_argument("after")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--flows", type=int, default=20_000)
    args = ap.parse_args(argv)
    got = {"before": {1: [], 6: []}, "after": {1: [], 6: []}}
    kpps = {"before": {1: [], 6: []}, "after": {1: [], 6: []}}
    for _ in range(args.rounds):
        for name in ("before", "after"):
            out = subprocess.run(
                [getattr(args, name), os.path.join(HERE, "cchain_figures.py"),
                 "--runs", str(args.runs), "--flows", str(args.flows)],
                capture_output=True, text=True, check=True).stdout
            for n, ns, k in LINE.findall(out):
                got[name][int(n)].append(float(ns))
                kpps[name][int(n)].append(float(k))
    print(f"{args.rounds} rounds alternating x {args.runs} runs, load average "
          f"{os.getloadavg()[0]:.1f}")
    for name in ("before", "after"):
        one, six = (statistics.median(got[name][n]) for n in (1, 6))
        k1, k6 = (statistics.median(kpps[name][n]) for n in (1, 6))
        print(f"{name:>6}: chain of 1 {one:6.1f} ns/packet, chain of 6 {six:6.1f}: "
              f"6/1 = {one / six:.2f}x by CPU time ({k6 / k1:.2f}x by kpps), "
              f"{(six - one) / 5:.1f} ns per extra NF")


if __name__ == "__main__":
    sys.exit(main())
