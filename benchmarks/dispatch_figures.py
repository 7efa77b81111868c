"""Dispatch cost: PKT events through the bus (inline) to a no-op NF, per kind of
handler, against the stack alone, in the same run.

    python benchmarks/dispatch_figures.py [--quick] [--runs N] [--json out.json]

Handlers: a Cython NF's C handler (``mbx.examples.cnoop``), a Python per-event
handler (clocked for the per NF stats, and with ``nf_timing=False``), a Python batch
handler.  Dispatch overhead per event = (time with the NF - time of the stack
alone) / events: building, publishing, queueing and delivering the event.  The
issue's goals: >= 5 M events/s to a batch handler, <= 150 ns of dispatch overhead
per event.  Each figure is the median of ``--runs`` runs, the cases interleaved.
"""
import argparse
import gc
import json
import statistics
import sys
import time

import captures
from _args import at_least, parse, writable

import mbx
from mbx.examples import cnoop
from mbx.ports import open_input


def _py_nf():
    nf = mbx.NF("py")
    nf.sub(mbx.PKT, lambda ev: None)
    return nf


def _batch_nf():
    nf = mbx.NF("batch")
    nf.sub(mbx.PKT, lambda recs: None, batch=True)
    return nf


CASES = {
    "stack alone": (lambda: [], {}),
    "C handler (cnoop)": (lambda: [cnoop.make_noop()], {}),
    "Python batch": (lambda: [_batch_nf()], {}),
    "Python per event": (lambda: [_py_nf()], {}),
    "Python per event, no timing": (lambda: [_py_nf()], {"nf_timing": False}),
}


def once(path, make, config, burst, capacity):
    inp = open_input("pcap:" + path)
    try:
        gc.collect()
        t = time.perf_counter()
        c = mbx.App(make(), flow_capacity=capacity, **config).run(inp, burst=burst)
        return time.perf_counter() - t, c
    finally:
        inp.close()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="200k packets, 3 runs (unless given explicitly)")
    ap.add_argument("--runs", type=at_least(1), default=5)
    ap.add_argument("--packets", type=at_least(1), default=1_000_000)
    ap.add_argument("--flows", type=at_least(1), default=10_000)
    ap.add_argument("--burst", type=at_least(1), default=64)
    ap.add_argument("--json", metavar="FILE", type=writable)
    args = parse(ap, argv, {"packets": 200_000, "runs": 3})
    path = captures.make_capture(args.packets, args.flows)
    capacity = 1 << max(args.flows * 2 - 1, 1).bit_length()
    times = {k: [] for k in CASES}
    counters = {}
    for _ in range(args.runs):
        for name, (make, config) in CASES.items():
            dt, c = once(path, make, config, args.burst, capacity)
            times[name].append(dt)
            counters[name] = c
    med = {k: statistics.median(v) for k, v in times.items()}
    base = med["stack alone"]
    pkts = counters["stack alone"]["packets"]
    rows = []
    for name in CASES:
        if name == "stack alone":
            continue
        events = counters[name]["events"]["PKT"]["delivered"]
        over = max(med[name] - base, 1e-12)
        rows.append({"case": name, "events": events, "seconds": med[name],
                     "events_per_s": events / med[name],
                     "dispatch_events_per_s": events / over,
                     "overhead_ns": over / events * 1e9})
    ref = next(r for r in rows if r["case"] == "Python per event")
    print(f"{pkts:,} packets, {args.flows:,} flows, burst {args.burst}, median of "
          f"{args.runs}; stack alone {base:.3f} s ({pkts / base / 1e6:.2f} Mpps)")
    print(f"{'handler':<30} {'events/s':>10} {'dispatch ev/s':>14} {'ns/event':>9} "
          f"{'vs Python':>10}")
    for r in rows:
        print(f"{r['case']:<30} {r['events_per_s'] / 1e6:>8.2f} M "
              f"{r['dispatch_events_per_s'] / 1e6:>12.2f} M {r['overhead_ns']:>9.1f} "
              f"{ref['overhead_ns'] / r['overhead_ns']:>9.2f}x")
    by = {r["case"]: r for r in rows}
    timing_ns = by["Python per event"]["overhead_ns"] - by[
        "Python per event, no timing"]["overhead_ns"]
    print(f"handler clock (nf_timing) costs {timing_ns:.1f} ns per Python event")
    b = by["Python batch"]
    c = by["C handler (cnoop)"]
    print(f"goal >= 5 M events/s to a batch handler: {b['dispatch_events_per_s'] / 1e6:.2f} M"
          f" dispatch-only, {b['events_per_s'] / 1e6:.2f} M with the stack: "
          f"{'met' if b['dispatch_events_per_s'] >= 5e6 else 'NOT met'}")
    print(f"goal <= 150 ns dispatch overhead per event: C {c['overhead_ns']:.1f} ns, "
          f"batch {b['overhead_ns']:.1f} ns, Python {ref['overhead_ns']:.1f} ns")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"stack_alone_s": base, "packets": pkts, "rows": rows}, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
