"""Pipelined against inline, in the same run: one burst in flight against several.

    python benchmarks/pipeline_figures.py [--quick] [--runs N] [--inflight K] [--json out.json]

1. event delivery through a ring: PKT events/s to one no-op Python NF, per-event and
   batch handler;
2. chains of 1..6 no-op NFs subscribed to PKT: throughput (Mpps) and latency (the
   mean time from a burst's read to its send, as the stack measures it:
   ``timing.burst_wait_s / timing.bursts_done``).

Throughput is over the stack's run loop (``timing.run_s``: from the first read to
the last event done), so the pipelined deployment's fork and teardown (tens of ms,
fixed) do not count against it.

Three deployments each time: inline, pipelined with one burst in flight (K = 1, the
stack waits for the whole chain before it reads the next burst) and pipelined with
K bursts in flight (``--inflight``, 4 by default).  Each figure is the median of
``--runs`` runs, the three alternating.  The ratios printed are K/inline and K/1.
The machine's usable cores are printed: past them, NF processes share cores.
"""
import argparse
import gc
import json
import os
import statistics
import sys

import captures
from _args import at_least, inflight, parse, writable

import mbx
from mbx.ports import open_input


def noop_nfs(k, batch=False):
    nfs = []
    for i in range(k):
        nf = mbx.NF(f"noop{i}")
        nf.sub(mbx.PKT, lambda ev: None, batch=batch)
        nfs.append(nf)
    return nfs


def once(path, k, deploy, inflight, batch, burst, capacity):
    inp = open_input("pcap:" + path)
    try:
        gc.collect()
        c = mbx.App(noop_nfs(k, batch), flow_capacity=capacity, deploy=deploy,
                    inflight=inflight).run(inp, burst=burst)
        return c["timing"]["run_s"], c
    finally:
        inp.close()


def measure(path, k, batch, runs, burst, capacity, inflight):
    """{deployment: (median seconds, median µs a burst waited)}, counters."""
    modes = {"inline": ("inline", 1), "K=1": ("pipelined", 1),
             f"K={inflight}": ("pipelined", inflight)}
    times = {m: [] for m in modes}
    waits = {m: [] for m in modes}
    counters = {}
    for _ in range(runs):
        for m, (deploy, K) in modes.items():
            dt, c = once(path, k, deploy, K, batch, burst, capacity)
            times[m].append(dt)
            waits[m].append(c["timing"]["burst_wait_s"] / c["timing"]["bursts_done"]
                            * 1e6)
            counters[m] = c
    return ({m: (statistics.median(times[m]), statistics.median(waits[m]))
             for m in modes}, counters)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="100 k packets, 1 run (unless given explicitly)")
    p.add_argument("--runs", type=at_least(1), default=3)
    p.add_argument("--packets", type=at_least(1), default=400_000)
    p.add_argument("--burst", type=at_least(1), default=64)
    p.add_argument("--inflight", type=inflight, default=4, help="K of the run-ahead column")
    p.add_argument("--json", metavar="FILE", type=writable)
    args = parse(p, argv, {"packets": 100_000, "runs": 1})
    flows = max(args.packets // 20, 1000)
    path = captures.make_capture(args.packets, flows, "64")
    capacity = 1 << max(16, (flows * 5 // 4 - 1).bit_length())
    cores = len(os.sched_getaffinity(0))
    K = f"K={args.inflight}"
    print(f"capture {args.packets:,} packets, {flows:,} flows; burst {args.burst}; "
          f"{cores} usable cores; load average {os.getloadavg()[0]:.1f}; "
          f"median of {args.runs}\n")
    rows = []
    hdr = (f"{'figure':<34} {'inline':>10} {'K=1':>10} {K:>10} {K + '/inline':>11} "
           f"{K + '/K=1':>9}")
    print(hdr)
    print("-" * len(hdr))

    def row(name, vals, unit):
        a, b, c = vals["inline"], vals["K=1"], vals[K]
        rows.append({"figure": name, "inline": a, "pipelined_k1": b, "pipelined_k": c,
                     "inflight": args.inflight, "unit": unit})
        print(f"{name:<34} {a:>10.3f} {b:>10.3f} {c:>10.3f} {c / a:>10.2f}x "
              f"{c / b:>8.2f}x")
        sys.stdout.flush()

    for batch in (False, True):
        t, c = measure(path, 1, batch, args.runs, args.burst, capacity, args.inflight)
        ev = c["inline"]["events"]["PKT"]["delivered"]
        assert all(v["events"]["PKT"]["delivered"] == ev for v in c.values())
        row(f"1. events/s, 1 NF, {'batch' if batch else 'per-event'} (M)",
            {m: ev / v[0] / 1e6 for m, v in t.items()}, "M events/s")
    for k in range(1, 7):
        t, c = measure(path, k, False, args.runs, args.burst, capacity, args.inflight)
        n = c["inline"]["packets"]
        row(f"2. chain of {k}: throughput (Mpps)",
            {m: n / v[0] / 1e6 for m, v in t.items()}, "Mpps")
        row(f"2. chain of {k}: latency (us/burst)", {m: v[1] for m, v in t.items()}, "us")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"packets": args.packets, "burst": args.burst, "cores": cores,
                       "inflight": args.inflight, "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
