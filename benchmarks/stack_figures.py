"""Foundation figures: the Network Layer stack and event dispatch, each against a
baseline measured in the same run.

    python benchmarks/stack_figures.py [--quick] [--json out.json] [--plot out.png]

1. parse + flow lookup, packets/s on one core: ``App([])`` (stack alone: parse,
   fragments, flow table, no events) reading a capture from /dev/shm, against a dpkt
   loop over the same frames preloaded in a list (parse, 5-tuple key, dict counters);
2. PKT events to a no-op per-event handler, to a batch handler, and through chains of
   2 and 4 no-op NFs: events/s end to end, and the dispatch overhead per event
   ((time with NFs - time of the stack alone) / events delivered) against a plain
   Python loop calling a no-op once per event;
3. Stack Memory per flow (flow table, 65536 and 1 M flows) and the event message
   size, against what the dpkt loop's dict holds per flow;
4. the pcap read rate alone (``PcapReader`` into a ``Batch``) against
   ``dpkt.pcap.Reader``.

Each timing is the median of ``--runs`` runs (3), mbx and baselines alternating
within each round.
"""
import argparse
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
import tracemalloc

import captures
import dpkt
from _args import at_least, writable

import mbx
from mbx._events import message_size
from mbx._flow import FlowTable
from mbx.ports import open_input


def flow_capacity_for(n_flows):
    """A table that holds every flow of the capture with room to spare (no evictions)."""
    return 1 << max(16, (n_flows * 5 // 4 - 1).bit_length())


def machine():
    model = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "load_avg_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "mbx": mbx.__version__,
        "dpkt": dpkt.__version__,
    }


def _timed(fn):
    gc.collect()
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def run_app(path, nfs, capacity):
    return mbx.App(nfs, flow_capacity=capacity).run(open_input("pcap:" + path))


def noop_nfs(k, batch=False):
    nfs = []
    for i in range(k):
        nf = mbx.NF(f"noop{i}")
        nf.sub(mbx.PKT, lambda ev: None, batch=batch)
        nfs.append(nf)
    return nfs


def measure_capture(path, n_flows, runs, events=True, log=print):
    """Median seconds of every contender over ``path``, alternating within each round.

    Returns ({name: seconds}, {name: events delivered}, packets, dpkt flows dict,
    {name: [seconds of each run]})."""
    cap = flow_capacity_for(n_flows)
    log(f"  loading frames for the dpkt loop from {path} ...")
    frames = captures.load_frames(path)
    n = len(frames)
    contenders = {
        "stack": lambda: run_app(path, [], cap),
        "dpkt_flows": lambda: captures.dpkt_flows(frames),
        "mbx_read": lambda: captures.mbx_read(path),
        "dpkt_read": lambda: captures.dpkt_read(path),
    }
    if events:
        contenders.update({
            "noop_handler": lambda: run_app(path, noop_nfs(1), cap),
            "batch_handler": lambda: run_app(path, noop_nfs(1, batch=True), cap),
            "chain2": lambda: run_app(path, noop_nfs(2), cap),
            "chain4": lambda: run_app(path, noop_nfs(4), cap),
            "python_loop": lambda: captures.noop_calls(n),
        })
    times = {k: [] for k in contenders}
    delivered = {}
    flows = None
    for r in range(runs):
        for name, fn in contenders.items():
            dt, out = _timed(fn)
            times[name].append(dt)
            if isinstance(out, dict) and "events" in out:
                delivered[name] = sum(v["delivered"] for v in out["events"].values())
                if out["packets"] != n or out["flows"]["evicted"]:
                    raise RuntimeError(f"{name}: unexpected counters {out}")
            if name == "dpkt_flows":
                flows = out
        log(f"  round {r + 1}/{runs}: " + ", ".join(
            f"{k} {v[-1]:.3f}s" for k, v in times.items()))
    frames.clear()      # the lambdas keep the list; free the frames themselves
    return ({k: statistics.median(v) for k, v in times.items()}, delivered, n, flows,
            times)


def dpkt_bytes_per_flow(path, flows):
    """Per flow, what the dpkt loop's dict holds: deep size of the dict, and what
    tracemalloc sees allocated and still alive after building it (a second pass)."""
    deep = captures.deep_size(flows) / len(flows)
    frames = captures.load_frames(path)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    again = captures.dpkt_flows(frames)
    traced = (tracemalloc.get_traced_memory()[0] - base) / len(again)
    tracemalloc.stop()
    return deep, traced


def figures(args, log=print):
    n_packets, n_flows = (100_000, 10_000) if args.quick else (1_000_000, 100_000)
    rows = []
    raw = {}

    def row(figure, what, value, unit, base_what, base_value, ratio, ratio_means,
            base_unit=None):
        rows.append(dict(figure=figure, what=what, value=value, unit=unit,
                         baseline=base_what, baseline_value=base_value,
                         baseline_unit=base_unit or unit, ratio=ratio,
                         ratio_means=ratio_means))

    sizes = ["64"] if args.no_mixed else ["64", "mixed"]
    flows64 = None
    for size in sizes:
        label = "64 B frames" if size == "64" else "500-1500 B frames"
        log(f"capture: {n_packets} packets, {n_flows} flows, {label}")
        t = time.perf_counter()
        path = captures.make_capture(n_packets, n_flows, size)
        log(f"  {path} ready in {time.perf_counter() - t:.1f}s")
        med, delivered, n, flows, runs = measure_capture(path, n_flows, args.runs,
                                                         events=size == "64", log=log)
        raw[size] = runs
        if size == "64":
            flows64 = (path, flows)
        else:
            del flows
        mpps = {k: n / v / 1e6 for k, v in med.items()}
        row(f"1. parse + flow lookup ({label})", "mbx App([]) from /dev/shm",
            mpps["stack"], "Mpps", "dpkt loop, frames preloaded", mpps["dpkt_flows"],
            mpps["stack"] / mpps["dpkt_flows"], "x faster")
        row(f"4. pcap read alone ({label})", "mbx PcapReader -> Batch(64)",
            mpps["mbx_read"], "Mpps", "dpkt.pcap.Reader", mpps["dpkt_read"],
            mpps["mbx_read"] / mpps["dpkt_read"], "x faster")
        if size != "64":
            continue
        loop_ns = med["python_loop"] / n * 1e9
        for name, what in (("noop_handler", "no-op per-event handler"),
                           ("batch_handler", "no-op batch handler"),
                           ("chain2", "chain of 2 no-op NFs"),
                           ("chain4", "chain of 4 no-op NFs")):
            ev = delivered[name]
            if ev == n:
                rate = ev / med[name] / 1e6
                row(f"2. PKT events, {what}", "events/s end to end (stack + dispatch)",
                    rate, "M events/s", "stack alone", mpps["stack"],
                    rate / mpps["stack"], "of the stack's rate", "Mpps")
            else:   # a chain: every packet is an event for each NF
                row(f"2. PKT events, {what}", f"packets/s end to end ({ev // n} events "
                    "each)", mpps[name], "Mpps", "stack alone", mpps["stack"],
                    mpps[name] / mpps["stack"], "of the stack's rate")
            over = (med[name] - med["stack"]) / ev * 1e9
            row(f"2. PKT events, {what}", "dispatch overhead per event",
                over, "ns/event", "Python loop calling a no-op", loop_ns,
                over / loop_ns, "x a bare Python call")

    log("memory")
    for cap in (65536, 1 << 20):
        ft = FlowTable(cap)
        row(f"3. Stack Memory, flow table of {cap} flows", "FlowTable.bytes_per_flow",
            ft.bytes_per_flow, "B/flow", None, None, None, None)
        row(f"3. Stack Memory, flow table of {cap} flows", "FlowTable.memory_bytes",
            ft.memory_bytes / 2**20, "MiB", None, None, None, None)
        del ft
    hdr, whole = message_size()
    row("3. event message", "message (header + body)", whole, "B", "header", hdr,
        None, None)
    path, flows = flows64
    deep, traced = dpkt_bytes_per_flow(path, flows)
    bpf = FlowTable(flow_capacity_for(n_flows)).bytes_per_flow
    cap = flow_capacity_for(n_flows)
    held = FlowTable(cap).memory_bytes / n_flows
    row(f"3. per flow, {n_flows} flows", "mbx flow table, per slot", bpf, "B/flow",
        "dpkt dict entry, deep getsizeof", deep, bpf / deep, "x the dict's bytes")
    row(f"3. per flow, {n_flows} flows", "mbx flow table, per slot", bpf, "B/flow",
        "dpkt dict, tracemalloc", traced, bpf / traced, "x the dict's bytes")
    row(f"3. per flow, {n_flows} flows", f"mbx table of {cap} slots / {n_flows} flows",
        held, "B/flow", "dpkt dict, tracemalloc", traced, held / traced,
        "x the dict's bytes")
    return dict(packets=n_packets, flows=n_flows, rows=rows, seconds=raw)


def _fmt(v):
    if v is None:
        return "-"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def table(rows, markdown=False):
    head = ("figure", "mbx", "value", "baseline", "value", "ratio")
    lines = [head]
    for r in rows:
        lines.append((r["figure"], r["what"], f"{_fmt(r['value'])} {r['unit']}",
                      r["baseline"] or "-",
                      f"{_fmt(r['baseline_value'])} {r['baseline_unit']}" if r["baseline"]
                      else "-",
                      f"{_fmt(r['ratio'])} {r['ratio_means']}" if r["ratio"] else "-"))
    if markdown:
        out = ["| " + " | ".join(line) + " |" for line in lines]
        out.insert(1, "|" + "---|" * len(head))
        return "\n".join(out)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    out = []
    for k, line in enumerate(lines):
        out.append("  ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def plot(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    pk = [r for r in rows if r["figure"][0] in "14"]
    ev = [r for r in rows if r["figure"].startswith("2.") and r["unit"] != "ns/event"]
    over = {r["figure"]: r for r in rows if r["unit"] == "ns/event"}
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 5), gridspec_kw={"width_ratios": [1, 1]})
    w = 0.38
    xs = range(len(pk))
    a.bar([x - w / 2 for x in xs], [r["value"] * 1e6 for r in pk], w, label="mbx")
    a.bar([x + w / 2 for x in xs], [r["baseline_value"] * 1e6 for r in pk], w,
          label="dpkt baseline")
    for x, r in zip(xs, pk, strict=True):
        a.text(x, r["value"] * 1e6 * 1.15, f"{r['ratio']:.0f}x", ha="center", fontsize=9)
    a.set_xticks(list(xs), [r["figure"][3:].replace(" (", "\n(") for r in pk], fontsize=8)
    a.set_yscale("log")
    a.set_ylim(top=max(r["value"] for r in pk) * 1e6 * 3)
    a.set_ylabel("packets per second (log)")
    a.set_title("Packets/s, one core: mbx vs dpkt")
    a.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2)
    w = 0.27
    xs = range(len(ev))
    loop_rate = [1e9 / over[r["figure"]]["baseline_value"] for r in ev]
    disp_rate = [1e9 / over[r["figure"]]["value"] for r in ev]
    b.bar([x - w for x in xs], [r["value"] * 1e6 for r in ev], w,
          label="mbx end to end (stack + dispatch; events/s per NF)")
    b.bar(list(xs), disp_rate, w, label="mbx dispatch alone (1 / overhead)")
    b.bar([x + w for x in xs], loop_rate, w,
          label="baseline: Python loop calling a no-op")
    stack = ev[0]["baseline_value"] * 1e6
    b.axhline(stack, color="grey", ls="--", lw=1)
    b.text(len(ev) - 0.5, stack * 1.08, "stack alone, packets/s", ha="right",
           fontsize=8, color="grey")
    b.set_xticks(list(xs), [r["figure"].split(", ", 1)[1] for r in ev], fontsize=8)
    b.set_yscale("log")
    b.set_ylabel("events per second (log)")
    b.set_title("PKT events/s to no-op NFs")
    b.set_ylim(bottom=min(r["value"] * 1e6 for r in ev) / 3)
    b.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)
    fig.suptitle(f"mbx foundation figures: {result['packets']:,} packets, "
                 f"{result['flows']:,} flows; {result['machine']['cpu']}, "
                 f"{result['machine']['cores']} cores (median of {result['runs']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _load(avg):
    return "/".join(f"{x:.1f}" for x in avg) if avg else "?"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="100 k packets over 10 k flows instead of 1 M over 100 k")
    ap.add_argument("--runs", type=at_least(1), default=3, help="runs of each, median (3)")
    ap.add_argument("--no-mixed", action="store_true",
                    help="skip the 500-1500 byte frame variant")
    ap.add_argument("--json", type=writable, help="write the figures as JSON here")
    ap.add_argument("--plot", type=writable, help="write a bar chart (PNG) here")
    ap.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    args = ap.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable),
                                                *sys.argv])
    info = machine()

    def log(*a):
        print(*a, file=sys.stderr, flush=True)

    log(f"machine: {info['cpu']}, {info['cores']} cores")
    result = figures(args, log=log)
    info["load_avg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    result.update(command=command, machine=info, runs=args.runs)
    print(f"command: {command}")
    print(f"machine: {info['cpu']}, {info['cores']} cores ({info['usable_cores']} usable), "
          f"load average {_load(info['load_avg_at_start'])} at start, "
          f"{_load(info['load_avg_at_end'])} at end, Linux {info['kernel']}, "
          f"Python {info['python']}, mbx {info['mbx']}, dpkt {info['dpkt']}")
    print(f"capture: {result['packets']:,} packets over {result['flows']:,} flows "
          f"(TCP and UDP, both directions) in {captures.CACHE_DIR}; "
          f"median of {args.runs} runs, mbx and baselines alternating")
    print()
    print(table(result["rows"], markdown=args.markdown))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.plot:
        plot(result, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
