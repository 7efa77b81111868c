"""Fig. 7b of the paper on this machine: 1 vs 2 stack processes on a replayed capture.

Each stack process reads the capture and keeps the flows whose symmetric hash is
its share (software RSS), so reading and parsing are done by every process and
only the flow work and the NFs are split.  Run it on an otherwise idle machine: the
two processes need the two cores.

    python benchmarks/rss_figures.py [--quick] [--runs 3]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from captures import make_capture  # noqa: E402

import mbx  # noqa: E402
from mbx.ports import open_input  # noqa: E402
from mbx.runtime import App, run_parallel  # noqa: E402


def noop_nf():
    nf = mbx.NF("noop")
    nf.sub(mbx.PKT, lambda ev: None)
    return [nf]


def spin(n=20_000_000):
    s = 0
    for i in range(n):
        s += i
    return s


def machine_scaling(runs):
    """How much faster two CPU-bound processes finish than one doing both jobs
    (2.0 on two idle, independent cores): the ceiling for any 2-process figure."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        spin()
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        pids = []
        for _ in range(2):
            pid = os.fork()
            if pid == 0:
                spin()
                os._exit(0)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)
        out.append(2 * one / (time.perf_counter() - t0))
    return statistics.median(out)


def timed(fn):
    t0 = time.perf_counter()
    counters = fn()
    return time.perf_counter() - t0, counters


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="200 k packets, 20 k flows")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args(argv)
    n, flows = (200_000, 20_000) if args.quick else (1_000_000, 100_000)
    cap = make_capture(n, flows, "64")
    spec = "pcap:" + cap
    rows = []
    for label, make in (("stack alone", list), ("PKT to a no-op Python NF", noop_nf)):
        one, two = [], []
        for _ in range(args.runs):      # alternate, so drifting load hits both alike
            dt, c = timed(lambda make=make: App(make(), flow_capacity=131072).run(
                open_input(spec)))
            assert c["packets"] == n
            one.append(dt)
            dt, (c, _) = timed(lambda make=make: run_parallel(make, spec, stacks=2,
                                                               flow_capacity=131072))
            assert c["packets"] == n
            two.append(dt)
        t1, t2 = statistics.median(one), statistics.median(two)
        rows.append((label, n / t1 / 1e6, n / t2 / 1e6, t1 / t2))
    print(f"capture: {n:,} packets over {flows:,} flows (64 B), median of {args.runs}")
    print(f"{'work':<28} {'1 stack Mpps':>13} {'2 stacks Mpps':>14} {'ratio':>7}")
    for label, a, b, r in rows:
        print(f"{label:<28} {a:>13.2f} {b:>14.2f} {r:>6.2f}x")
    ceiling = machine_scaling(args.runs)
    print(f"machine: two CPU-bound processes scale {ceiling:.2f}x here (2.00 = two "
          "free cores); the figures above as a share of that: "
          + ", ".join(f"{r / ceiling:.0%}" for *_, r in rows))
    print(f"load average now: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
