"""Fig. 6 and Fig. 7a of the paper on this machine: chains of NFs on one consolidated
TCP stack against a stack per NF, and sequential against parallel NFs.

Fig. 6.  A chain of N no-op NFs subscribed to the TCP Monitor's PKT/TCP events.
*Consolidated* (mbx): one Network Layer + TCP Monitor, the N NFs behind it.
*Per-NF stack* (the baseline, as chained mOS instances would be): each NF runs with
its own Network Layer + TCP Monitor over the packets, one after the other, so the
stack work is done N times.  Both inline (one process), per-event and batch
handlers; the consolidated chain also pipelined (each NF its own process).
Throughput is packets per second of the whole chain; latency is the time a burst
of 64 packets spends in the chain (every packet of a burst waits for it).

Fig. 7a.  Six read-only NFs, sequential vs one parallel group.  Inline, one process
runs them one after another either way, so the measured latency is the same; with
N cores a parallel group's latency is the slowest member's plus the merge, which the
printed model gives from the measured per-NF times.

    python benchmarks/chain_figures.py [--quick] [--runs 3]
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from captures import make_tcp64_capture  # noqa: E402

import mbx  # noqa: E402
from mbx.ports import open_input  # noqa: E402
from mbx.runtime import App  # noqa: E402

BURST = 64


def noop_chain(n, batch, group=None):
    nfs = []
    for i in range(n):
        nf = mbx.NF(f"nf{i}", group=group)
        if batch:
            nf.sub(mbx.PKT_TCP, lambda recs: None, batch=True)
        else:
            nf.sub(mbx.PKT_TCP, lambda ev: None)
        nfs.append(nf)
    return nfs


def run(nfs, spec, n_flows, **kw):
    t0 = time.perf_counter()
    c = App(nfs, stack="tcp", flow_capacity=2 * n_flows, **kw).run(open_input(spec),
                                                                    burst=BURST)
    return time.perf_counter() - t0, c["packets"]


def consolidated(n, batch, spec, n_flows, **kw):
    return run(noop_chain(n, batch), spec, n_flows, **kw)


def per_nf_stack(n, batch, spec, n_flows):
    total, pkts = 0.0, 0
    for nf in noop_chain(n, batch):
        dt, pkts = run([nf], spec, n_flows)
        total += dt
    return total, pkts


def median_rate(fn, runs):
    times = []
    pkts = 0
    for _ in range(runs):
        dt, pkts = fn()
        times.append(dt)
    dt = statistics.median(times)
    return pkts / dt, dt / (pkts / BURST) * 1e6      # pps, µs per burst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2 k connections (20 k packets)")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--pipelined", action="store_true",
                    help="also the consolidated chain with each NF in its own process")
    args = ap.parse_args(argv)
    n_flows = 2_000 if args.quick else 20_000
    spec = "pcap:" + make_tcp64_capture(n_flows, 10)
    print(f"capture: {n_flows:,} TCP connections x 10 packets (64 B), median of "
          f"{args.runs}, bursts of {BURST}")
    print("\nFig. 6: chain of N no-op NFs on PKT/TCP")
    head = (f"{'N':>2} {'handler':<9} {'consolidated kpps':>18} {'per-NF stack kpps':>18} "
            f"{'ratio':>6} {'cons. µs/burst':>15} {'per-NF µs/burst':>16}")
    if args.pipelined:
        head += f" {'pipelined kpps':>15}"
    print(head)
    base1 = {}
    for batch in (False, True):
        for n in range(1, 7):
            c_pps, c_lat = median_rate(
                lambda n=n, batch=batch: consolidated(n, batch, spec, n_flows), args.runs)
            b_pps, b_lat = median_rate(
                lambda n=n, batch=batch: per_nf_stack(n, batch, spec, n_flows), args.runs)
            if n == 1:
                base1[batch] = c_pps
            line = (f"{n:>2} {'batch' if batch else 'event':<9} {c_pps / 1e3:>18.0f} "
                    f"{b_pps / 1e3:>18.0f} {c_pps / b_pps:>5.2f}x {c_lat:>15.0f} "
                    f"{b_lat:>16.0f}")
            if args.pipelined:
                p_pps, _ = median_rate(
                    lambda n=n, batch=batch: consolidated(n, batch, spec, n_flows,
                                                          deploy="pipelined"), 1)
                line += f" {p_pps / 1e3:>15.0f}"
            print(line + (f"   chain of {n} keeps {c_pps / base1[batch]:.2f}x the chain "
                          "of 1" if n == 6 else ""))
    print("\nFig. 7a: 6 read-only NFs, sequential vs one parallel group (inline)")
    seq_pps, seq_lat = median_rate(
        lambda: run(noop_chain(6, False), spec, n_flows), args.runs)
    par_pps, par_lat = median_rate(
        lambda: run(noop_chain(6, False, group="g"), spec, n_flows), args.runs)
    one_pps, one_lat = median_rate(
        lambda: run(noop_chain(1, False), spec, n_flows), args.runs)
    stack_pps, stack_lat = median_rate(lambda: run([], spec, n_flows), args.runs)
    per_nf = (seq_lat - stack_lat) / 6
    print(f"measured, µs per burst: stack alone {stack_lat:.0f}, 1 NF {one_lat:.0f}, "
          f"6 sequential {seq_lat:.0f}, 6 in a parallel group {par_lat:.0f} "
          f"(one process runs them one after another either way)")
    print(f"model for 6 cores (one NF per core, latency = stack + slowest NF + merge): "
          f"{stack_lat + per_nf:.0f} µs vs sequential {seq_lat:.0f} µs "
          f"({(stack_lat + per_nf) / seq_lat:.2f}x); each NF costs {per_nf:.0f} µs per "
          f"burst here; on this 2-core machine at most 2 NFs can run at once")
    print(f"load average now: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
