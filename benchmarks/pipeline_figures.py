"""Pipelined against inline, in the same run.

    python benchmarks/pipeline_figures.py [--quick] [--runs N] [--json out.json]

1. event delivery through a ring: PKT events/s to one no-op Python NF, per-event and
   batch handler, pipelined (the NF in its own process) against inline;
2. chains of 1..6 no-op NFs subscribed to PKT: throughput (Mpps) and per-packet
   latency, pipelined against inline.  With one burst in flight (this version), a
   packet waits for its whole burst: latency = time of a burst from read to send =
   elapsed / bursts.

Each figure is the median of ``--runs`` runs, inline and pipelined alternating.  The
machine's usable cores are printed: past them, NF processes share cores.
"""
import argparse
import gc
import json
import os
import statistics
import sys
import time

import captures

import mbx
from mbx.ports import open_input


def noop_nfs(k, batch=False):
    nfs = []
    for i in range(k):
        nf = mbx.NF(f"noop{i}")
        nf.sub(mbx.PKT, lambda ev: None, batch=batch)
        nfs.append(nf)
    return nfs


def once(path, k, deploy, batch, burst, capacity):
    inp = open_input("pcap:" + path)
    try:
        gc.collect()
        t = time.perf_counter()
        c = mbx.App(noop_nfs(k, batch), flow_capacity=capacity, deploy=deploy).run(
            inp, burst=burst)
        return time.perf_counter() - t, c
    finally:
        inp.close()


def measure(path, k, batch, runs, burst, capacity):
    times = {"inline": [], "pipelined": []}
    counters = {}
    for _ in range(runs):
        for deploy in times:
            dt, c = once(path, k, deploy, batch, burst, capacity)
            times[deploy].append(dt)
            counters[deploy] = c
    return {d: statistics.median(v) for d, v in times.items()}, counters


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="a small capture, 1 run")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--packets", type=int, default=400_000)
    p.add_argument("--burst", type=int, default=64)
    p.add_argument("--json", metavar="FILE")
    args = p.parse_args(argv)
    if args.quick:
        args.packets, args.runs = 100_000, 1
    flows = max(args.packets // 20, 1000)
    path = captures.make_capture(args.packets, flows, "64")
    capacity = 1 << max(16, (flows * 5 // 4 - 1).bit_length())
    cores = len(os.sched_getaffinity(0))
    print(f"capture {args.packets:,} packets, {flows:,} flows; burst {args.burst}; "
          f"{cores} usable cores; median of {args.runs}\n")
    rows = []
    hdr = (f"{'figure':<34} {'inline':>12} {'pipelined':>12} {'ratio p/i':>10}")
    print(hdr)
    print("-" * len(hdr))

    def row(name, a, b, unit):
        rows.append({"figure": name, "inline": a, "pipelined": b, "unit": unit,
                     "ratio": b / a if a else None})
        print(f"{name:<34} {a:>10.3f} {unit[:1]} {b:>10.3f} {unit[:1]} {b / a:>9.2f}x")
        sys.stdout.flush()

    for batch in (False, True):
        t, c = measure(path, 1, batch, args.runs, args.burst, capacity)
        ev = c["inline"]["events"]["PKT"]["delivered"]
        assert ev == c["pipelined"]["events"]["PKT"]["delivered"]
        row(f"1. events/s, 1 NF, {'batch' if batch else 'per-event'} (M)",
            ev / t["inline"] / 1e6, ev / t["pipelined"] / 1e6, "M events/s")
    for k in range(1, 7):
        t, c = measure(path, k, False, args.runs, args.burst, capacity)
        n = c["inline"]["packets"]
        bursts = -(-n // args.burst)
        row(f"2. chain of {k}: throughput (Mpps)", n / t["inline"] / 1e6,
            n / t["pipelined"] / 1e6, "Mpps")
        row(f"2. chain of {k}: latency (us/pkt)", t["inline"] / bursts * 1e6,
            t["pipelined"] / bursts * 1e6, "us")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"packets": args.packets, "burst": args.burst, "cores": cores,
                       "rows": rows}, fh, indent=1)


if __name__ == "__main__":
    main()
