"""Fig. 7a of the paper, pipelined: N read-only NFs as a sequential chain against one
parallel group (fanned out to every member, merged by the stack), N = 2 and 6.

Each NF subscribes to PKT/TCP and does ``--work-us`` µs of CPU work per event (a
loop calibrated at the start: a read-only NF with a fixed cost per packet; 0 makes
them no-ops).  The stack is in this process,
each NF in its own.  Latency is the mean time a burst of 64 packets spends from its
read to its send (the stack measures it), with one burst in flight (K = 1, so a
burst is not queued behind others) and with ``--inflight`` bursts; throughput is
packets per second over the stack's run loop.  The four layouts take turns in every
round; each figure is the median of ``--runs`` rounds, and the ratio parallel /
sequential is taken within the same run.

The model for more cores: a sequential chain of N costs s + N d per burst (s: the
stack's part, d: one NF stage, both fitted from the sequential N = 2 and N = 6
latencies); a parallel group whose members run c at a time costs s + ceil(N / c) d
plus the merge.  With K = 1 the stack waits while the NFs work, so on C cores c = C.

    python benchmarks/group_figures.py [--quick] [--runs 5] [--work-us 10] [--no-pin]
                                       [--inflight 4] [--json FILE] [--plot FILE]
"""
import argparse
import json
import math
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _args import at_least, inflight, non_negative, writable  # noqa: E402
from captures import make_tcp64_capture  # noqa: E402

import mbx  # noqa: E402
from mbx.ports import open_input  # noqa: E402
from mbx.runtime import App  # noqa: E402

BURST = 64


def calibrate(work_ns):
    """Loop iterations that take ``work_ns`` of CPU here (a fixed amount of work,
    not a wait on the clock, which a process that is not running would also pass)."""
    if work_ns <= 0:
        return 0
    n = 100_000
    t0 = time.process_time_ns()
    for _ in range(n):
        pass
    return max(1, round(n * work_ns / max(time.process_time_ns() - t0, 1)))


def readers(n, iters, group=None, pin=True):
    """N read-only NFs on PKT/TCP, each doing ``iters`` loop iterations per event.
    ``pin``: NF i's process pins itself to core i mod cores at its first event (the
    paper gives each NF a core; unpinned, Linux wakes the members of a group on the
    core of the process that woke them and leaves them there for bursts this short,
    so they take turns on one core while the other idles)."""
    cores = sorted(os.sched_getaffinity(0))

    def make(i):
        nf = mbx.NF(f"nf{i}", group=group)
        pinned = [not pin]

        def on_pkt(ev):
            if not pinned[0]:
                os.sched_setaffinity(0, {cores[i % len(cores)]})
                pinned[0] = True
            for _ in range(iters):
                pass

        nf.sub(mbx.PKT_TCP, on_pkt)
        return nf
    return [make(i) for i in range(n)]


def run(n, parallel, inflight, spec, n_flows, iters, pin=True):
    """(packets/s, µs a burst waited from read to send)."""
    nfs = readers(n, iters, "g" if parallel else None, pin)
    inp = open_input(spec)
    try:
        c = App(nfs, stack="tcp", flow_capacity=2 * n_flows, deploy="pipelined",
                inflight=inflight).run(inp, burst=BURST)
    finally:
        inp.close()
    t = c["timing"]
    return c["packets"] / t["run_s"], t["burst_wait_s"] / max(t["bursts_done"], 1) * 1e6


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    rows = result["rows"]
    for ax, key, label in ((axes[0], "us_k1", "µs per burst (K = 1)"),
                           (axes[1], "kpps_k", f"kpps (K = {result['inflight']})")):
        x = range(len(rows))
        ax.bar([i - 0.2 for i in x], [r["seq"][key] for r in rows], 0.4,
               label="sequential chain")
        ax.bar([i + 0.2 for i in x], [r["par"][key] for r in rows], 0.4,
               label="one parallel group")
        ax.set_xticks(list(x), [f"N = {r['n']}" for r in rows])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    model = result["model"]
    cores = sorted(model["parallel_us"], key=int)
    axes[0].plot([len(rows) - 1 + 0.2] * len(cores),
                 [model["parallel_us"][c] for c in cores], "k_", markersize=18,
                 label="model, N = 6 parallel on " + ", ".join(cores) + " cores")
    axes[0].legend(fontsize=8)
    fig.suptitle(f"Fig. 7a pipelined: read-only NFs ({result['work_us']} µs per event), "
                 f"{result['cores']} cores shared with other work (load "
                 f"{result['load_start']:.1f} -> {result['load']:.1f}), median of "
                 f"{result['runs']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1 k connections (10 k packets)")
    ap.add_argument("--runs", type=at_least(1), default=5)
    ap.add_argument("--work-us", type=non_negative, default=10.0,
                    help="µs of CPU work each NF does per event (10)")
    ap.add_argument("--inflight", type=inflight, default=4,
                    help="bursts in flight for the throughput figure (4)")
    ap.add_argument("--no-pin", action="store_true",
                    help="leave the NF processes where Linux puts them")
    ap.add_argument("--json", metavar="FILE", type=writable)
    ap.add_argument("--plot", metavar="FILE", type=writable, help="plot to FILE (png)")
    args = ap.parse_args(argv)
    n_flows = 1_000 if args.quick else 5_000
    spec = "pcap:" + make_tcp64_capture(n_flows, 10)
    iters = calibrate(int(args.work_us * 1000))
    cores = len(os.sched_getaffinity(0))
    load_start = os.getloadavg()[0]
    print(f"capture: {n_flows:,} TCP connections x 10 packets (64 B), bursts of {BURST}; "
          f"NFs work {args.work_us} µs per event ({iters} loop iterations); median of "
          f"{args.runs} alternating rounds; this machine has {cores} usable cores (load average "
          f"{load_start:.1f}), so at most {cores} processes run at once")
    layouts = [(n, par) for n in (2, 6) for par in (False, True)]
    samples = {lay: {"us_k1": [], "kpps_k1": [], "us_k": [], "kpps_k": []}
               for lay in layouts}
    ratios = {n: {"us_k1": [], "kpps_k": []} for n in (2, 6)}
    for _ in range(args.runs):
        got = {}
        for lay in layouts:
            pps1, us1 = run(*lay, 1, spec, n_flows, iters, not args.no_pin)
            ppsk, usk = run(*lay, args.inflight, spec, n_flows, iters,
                             not args.no_pin)
            got[lay] = {"us_k1": us1, "kpps_k1": pps1 / 1e3, "us_k": usk,
                        "kpps_k": ppsk / 1e3}
            for k, v in got[lay].items():
                samples[lay][k].append(v)
        for n in (2, 6):
            for k in ratios[n]:
                ratios[n][k].append(got[(n, True)][k] / got[(n, False)][k])
    med = {lay: {k: statistics.median(v) for k, v in s.items()}
           for lay, s in samples.items()}
    print(f"\n{'N':>2} {'layout':<15} {'µs/burst K=1':>13} {'kpps K=1':>9} "
          f"{'µs/burst K=' + str(args.inflight):>13} {'kpps K=' + str(args.inflight):>9}")
    rows = []
    for n in (2, 6):
        for par in (False, True):
            m = med[(n, par)]
            print(f"{n:>2} {'parallel group' if par else 'sequential':<15} "
                  f"{m['us_k1']:>13.0f} {m['kpps_k1']:>9.0f} {m['us_k']:>13.0f} "
                  f"{m['kpps_k']:>9.0f}")
        r_lat = statistics.median(ratios[n]["us_k1"])
        r_tput = statistics.median(ratios[n]["kpps_k"])
        print(f"   N = {n}: parallel / sequential latency (K=1) {r_lat:.2f}x, "
              f"throughput (K={args.inflight}) {r_tput:.2f}x (medians of per-round ratios)")
        rows.append({"n": n, "seq": med[(n, False)], "par": med[(n, True)],
                     "latency_ratio": r_lat, "throughput_ratio": r_tput})
    # the model, fitted from the sequential latencies
    d = (med[(6, False)]["us_k1"] - med[(2, False)]["us_k1"]) / 4
    s = med[(2, False)]["us_k1"] - 2 * d
    model = {str(c): s + math.ceil(6 / c) * d for c in (2, 3, 6)}
    print(f"\nmodel (K = 1): stack part s = {s:.0f} µs, one NF stage d = {d:.0f} µs per "
          f"burst; 6 NFs sequential s + 6d = {s + 6 * d:.0f} µs; a group of 6 on c cores "
          "s + ceil(6/c) d (+ the merge): "
          + ", ".join(f"{c} cores {v:.0f} µs ({v / (s + 6 * d):.2f}x)"
                      for c, v in model.items()))
    result = {"rows": rows, "runs": args.runs, "pinned": not args.no_pin, "cores": cores,
              "flows": n_flows, "work_us": args.work_us, "inflight": args.inflight,
              "load_start": load_start, "load": os.getloadavg()[0],
              "model": {"s_us": s, "d_us": d, "parallel_us": model}}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.plot:
        plot(result, args.plot)
    print(f"load average now: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
