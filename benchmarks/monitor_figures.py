"""TCP Monitor figures, each against a baseline measured in the same run.

    python benchmarks/monitor_figures.py [--quick] [--json F] [--plot F] [--markdown]

1. bulk reassembly, Gbit/s of delivered payload on one core, over a capture of
   1448-byte segments (64 connections of several MB, 32 open at once) and one of
   100-200-byte segments (HTTP-like exchanges): ``mbx flows`` as a whole process and
   ``flows_json`` in process, against ``tcpflow`` writing every flow to files in
   /dev/shm and against a dpkt reassembler in Python (``reassemblers.py``), whose
   digests must equal mbx's (checked, as are tcpflow's files).  For where the time
   goes: the Monitor's twin state alone, the Network Layer alone, ``stream_add``
   alone and SHA-256 alone (hashlib) over as many bytes;
2. the Monitor without reassembly (``App([], stack="tcp")``) on 64-byte TCP frames,
   packets/s, against the Network Layer alone (``App([])``) on the same file;
3. the snapshot: its size and ns per snapshot, against the paper's (23 bytes, ~76
   cycles), and ns per twin-state update (sender + receiver side);
4. bytes per flow without reassembly: flow table + ``tcp_conn`` + the Monitor's
   per-slot arrays (known sizes), and as measured in figure 5;
5. the resident memory of a Monitor holding 1 M concurrent TCP flows (one SYN each),
   measured in a fresh process (``/proc/self/status`` VmRSS), against the Network
   Layer alone holding the same flows.

Timings are the median of ``--runs`` runs (3), contenders alternating in each round.
"""
import argparse
import gc
import hashlib
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import captures
import reassemblers
from _args import at_least, writable
from stack_figures import _fmt, _load, flow_capacity_for, machine

import mbx
from mbx import _monitor, _tcp
from mbx._flow import FlowTable
from mbx._stream import bench_add
from mbx.examples.capture import tcp_connection
from mbx.flows import flows_json
from mbx.ports import open_input

# The Monitor's own Stack Memory per flow slot besides tcp_conn (conn_meta).
MONITOR_SLOT_ARRAYS = _monitor.META_SIZE
PAPER_SNAPSHOT_BYTES = 23
PAPER_SNAPSHOT_CYCLES = 76
GOALS = {
    "tcpflow": 2.0, "dpkt": 12.0, "gbps_1448": 10.0, "mpps": 10.0,
    "snapshot_bytes": 23, "bytes_per_flow": 256,
}


def cpu_ghz():
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("cpu MHz"):
                    return float(line.split(":")[1]) / 1000
    except OSError:
        pass
    return None


def _timed(fn):
    gc.collect()
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


# ---------------------------------------------------------------- contenders

def mbx_cli(path, out=os.devnull):
    """``mbx flows`` as a whole process: interpreter start-up, imports, the run (its
    JSON written to ``out``)."""
    subprocess.run([sys.executable, "-m", "mbx.cli", "flows", path, "--json", "-o",
                    out], check=True)


def tcpflow(path, outdir):
    """tcpflow writing each flow's bytes to a file under ``outdir`` (no report.xml:
    the DFXML report is extra work mbx does not do)."""
    shutil.rmtree(outdir, ignore_errors=True)
    os.makedirs(outdir)
    subprocess.run(["tcpflow", "-r", path, "-o", outdir, "-S", "enable_report=NO"],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def tcpflow_digests(outdir):
    """{file name: SHA-256} of tcpflow's flow files."""
    out = {}
    for name in os.listdir(outdir):
        with open(os.path.join(outdir, name), "rb") as fh:
            out[name] = hashlib.file_digest(fh, "sha256").hexdigest()
    return out


def tcpflow_name(addr, port):
    return ".".join(f"{int(x):03d}" for x in addr.split(".")) + f".{port:05d}"


def check_tcpflow(connections, outdir):
    """tcpflow's files hash to mbx's digests (a direction with no bytes has no file)."""
    got = tcpflow_digests(outdir)
    bad = []
    for key, rec in connections.items():
        cli, srv = key.split("#")[0].split("-")
        ca, cp = cli.rsplit(":", 1)
        sa, sp = srv.rsplit(":", 1)
        c, s = tcpflow_name(ca, int(cp)), tcpflow_name(sa, int(sp))
        for name, n, sha in ((f"{c}-{s}", rec["c2s_len"], rec["c2s_sha256"]),
                             (f"{s}-{c}", rec["s2c_len"], rec["s2c_sha256"])):
            if n and got.get(name) != sha:
                bad.append(name)
    return bad


def monitor_alone(path, n_flows, tcp=True):
    """The Monitor's twin state with nobody wanting bytes (or the Network Layer)."""
    cap = flow_capacity_for(n_flows)
    return mbx.App([], flow_capacity=cap, stack="tcp" if tcp else "network").run(
        open_input("pcap:" + path))


def sha256_alone(nbytes):
    """hashlib SHA-256 over ``nbytes`` (a 4 MiB block again and again): the floor of
    any reassembler that hashes what it delivers."""
    block = os.urandom(4 << 20)
    h = hashlib.sha256()
    left = nbytes
    while left > 0:
        h.update(block[:left] if left < len(block) else block)
        left -= len(block)
    return h.hexdigest()


def bulk_figures(path, label, runs, log):
    """Figure 1 for one capture: {name: [seconds]} and the delivered payload bytes."""
    log(f"  checking digests on {os.path.basename(path)} ...")
    doc, warnings = flows_json(path)
    if warnings:
        raise RuntimeError(f"mbx flows warnings on {path}: {warnings}")
    conns = doc["connections"]
    ref = reassemblers.reassemble(path)
    diffs = reassemblers.differences(conns, ref)
    assert not diffs, f"dpkt reassembler and mbx flows disagree: {diffs[:5]}"
    payload = sum(r["c2s_len"] + r["s2c_len"] for r in conns.values())
    n_conns = len(conns)
    outdir = tempfile.mkdtemp(prefix="mbx-bench-tcpflow-", dir=captures.CACHE_DIR)
    tcpflow(path, outdir)
    bad = check_tcpflow(conns, outdir)
    assert not bad, f"tcpflow's files differ from mbx's digests: {bad[:5]}"
    log(f"  {n_conns} connections, {payload / 1e6:.1f} MB of payload: mbx, dpkt "
        "and tcpflow agree on every digest")
    tiny = captures.make_tcp64_capture(1, 1)     # one SYN: the fixed costs alone
    contenders = {
        "mbx_cli_fixed": lambda: mbx_cli(tiny),
        "mbx_flows_json_fixed": lambda: flows_json(tiny),
        "mbx_cli": lambda: mbx_cli(path),
        "mbx_flows_json": lambda: flows_json(path),
        "tcpflow": lambda: tcpflow(path, outdir),
        "dpkt_reassembler": lambda: reassemblers.reassemble(path),
        "monitor_twin_state": lambda: monitor_alone(path, n_conns),
        "network_layer": lambda: monitor_alone(path, n_conns, tcp=False),
        "sha256_alone": lambda: sha256_alone(payload),
    }
    times = {k: [] for k in contenders}
    for r in range(runs):
        for name, fn in contenders.items():
            dt, _ = _timed(fn)
            times[name].append(dt)
        log(f"  round {r + 1}/{runs} ({label}): " + ", ".join(
            f"{k} {v[-1]:.2f}s" for k, v in times.items()))
    shutil.rmtree(outdir, ignore_errors=True)
    return times, payload, n_conns


# ---------------------------------------------------------------- memory (child)

def _vm(field):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0


def rss_child(path, stack, capacity):
    """Run in a fresh process: VmRSS before the stack exists and after it ran over
    ``path`` (printed as JSON)."""
    gc.collect()
    before = _vm("VmRSS")
    app = mbx.App([], flow_capacity=capacity, stack=stack)
    out = app.run(open_input("pcap:" + path))
    after = _vm("VmRSS")
    print(json.dumps({"before": before, "after": after, "hwm": _vm("VmHWM"),
                      "flows": out["flows"], "packets": out["packets"],
                      "tcp": out.get("tcp"),
                      "table_bytes": app.stack.flows.memory_bytes}))


def rss_of(path, stack, capacity):
    res = subprocess.run([sys.executable, os.path.abspath(__file__), "--rss-child",
                          stack, str(capacity), path], check=True, capture_output=True,
                         text=True)
    return json.loads(res.stdout)


# ---------------------------------------------------------------- figures

def snapshot_figures():
    """ns per snapshot of an established connection, ns per twin-state update over
    one whole connection (handshake, 64 KB response, FINs)."""
    frames = tcp_connection(("10.0.0.1", 40000), ("10.0.0.2", 80), ("10.0.0.2", 80),
                            b"GET / HTTP/1.1\r\n\r\n", os.urandom(64 << 10), 0.0,
                            1000, 5000)
    cli = bytes([10, 0, 0, 1])
    segs = [(f, 0 if f[26:30] == cli else 1) for _ts, f in frames]
    conn = _tcp.TcpConn()
    for f, d in segs[:6]:
        conn.update(f, d)
    snap = min(_tcp.bench_snapshot(conn, 2_000_000) for _ in range(3))
    upd = min(_tcp.bench_updates(segs, 2000) for _ in range(3))
    return snap, upd, len(segs)


def figures(args, log=print):
    q = args.quick
    rows = []
    raw = {}
    ghz = cpu_ghz()

    def row(figure, what, value, unit, base_what=None, base_value=None, ratio=None,
            ratio_means=None, base_unit=None, goal=None):
        rows.append(dict(figure=figure, what=what, value=value, unit=unit,
                         baseline=base_what, baseline_value=base_value,
                         baseline_unit=base_unit or unit, ratio=ratio,
                         ratio_means=ratio_means, goal=goal))

    # 1. bulk reassembly
    bulk = {}
    for seg, mb, label in ((1448, 20 if q else 300, "1448 B segments"),
                           ("small", 10 if q else 100, "100-200 B segments")):
        log(f"capture: {mb} MB of TCP payload, {label}")
        t = time.perf_counter()
        path = captures.make_bulk_capture(mb, seg)
        log(f"  {path} ready in {time.perf_counter() - t:.1f}s "
            f"({os.path.getsize(path) / 1e6:.0f} MB)")
        times, payload, n_conns = bulk_figures(path, label, args.runs, log)
        raw[label] = times
        med = {k: statistics.median(v) for k, v in times.items()}
        gbps = {k: payload * 8 / v / 1e9 for k, v in med.items()}
        bulk[label] = dict(gbps=gbps, payload=payload, conns=n_conns,
                           file_bytes=os.path.getsize(path), path=path)
        f = f"1. reassembly, {label}"
        row(f, "mbx flows, whole process", gbps["mbx_cli"], "Gbit/s",
            "tcpflow -o /dev/shm/…", gbps["tcpflow"], gbps["mbx_cli"] / gbps["tcpflow"],
            "x tcpflow", goal=f">= {GOALS['tcpflow']:g}x tcpflow")
        row(f, "mbx flows, whole process", gbps["mbx_cli"], "Gbit/s",
            "dpkt reassembler", gbps["dpkt_reassembler"],
            gbps["mbx_cli"] / gbps["dpkt_reassembler"], "x dpkt",
            goal=f">= {GOALS['dpkt']:g}x dpkt")
        row(f, "flows_json in process", gbps["mbx_flows_json"], "Gbit/s",
            "tcpflow -o /dev/shm/…", gbps["tcpflow"],
            gbps["mbx_flows_json"] / gbps["tcpflow"], "x tcpflow",
            goal=f">= {GOALS['gbps_1448']:g} Gbit/s" if seg == 1448 else None)
        row(f, "flows_json in process", gbps["mbx_flows_json"], "Gbit/s",
            "dpkt reassembler", gbps["dpkt_reassembler"],
            gbps["mbx_flows_json"] / gbps["dpkt_reassembler"], "x dpkt")
        row(f, "Monitor twin state, no reassembly", gbps["monitor_twin_state"],
            "Gbit/s", "Network Layer alone", gbps["network_layer"],
            gbps["monitor_twin_state"] / gbps["network_layer"], "of its rate")
        net = med["mbx_flows_json"] - med["mbx_flows_json_fixed"]
        row(f, "flows_json less its fixed cost", payload * 8 / net / 1e9, "Gbit/s",
            "SHA-256 alone (hashlib)", gbps["sha256_alone"],
            payload * 8 / net / 1e9 / gbps["sha256_alone"], "of its rate")
        row(f, "fixed cost: flows_json, 1-packet capture", med["mbx_flows_json_fixed"],
            "s", "mbx flows process, 1-packet capture", med["mbx_cli_fixed"],
            med["mbx_flows_json_fixed"] / med["mbx_cli_fixed"], "of it")
        row(f, "flows_json in process", gbps["mbx_flows_json"], "Gbit/s",
            "SHA-256 alone (hashlib)", gbps["sha256_alone"],
            gbps["mbx_flows_json"] / gbps["sha256_alone"], "of its rate")

    log("stream_add alone (bench_add)")
    for seg in (1448, 150):
        b = bench_add(64 << 20 if q else 512 << 20, seg)
        row(f"1. stream_add alone, {seg} B segments", "stream_add + release",
            b["mb_per_s"] * 8 / 1000, "Gbit/s", "memcpy of the same segments",
            b["memcpy_mb_per_s"] * 8 / 1000, b["mb_per_s"] / b["memcpy_mb_per_s"],
            "of its rate")

    # 2. Monitor without reassembly, 64-byte frames
    n_flows, ppf = (10_000, 10) if q else (100_000, 10)
    log(f"capture: {n_flows * ppf} 64-byte TCP frames over {n_flows} flows")
    path64 = captures.make_tcp64_capture(n_flows, ppf)
    n = n_flows * ppf
    times = {"monitor": [], "network_layer": []}
    for r in range(args.runs):
        for name, tcp in (("monitor", True), ("network_layer", False)):
            dt, out = _timed(lambda tcp=tcp: monitor_alone(path64, n_flows, tcp))
            times[name].append(dt)
            if (out["packets"] != n or out["flows"]["created"] != n_flows
                    or out["flows"]["evicted"] or out["flows"]["refused"]):
                raise RuntimeError(f"{name}: unexpected counters {out}")
            if tcp and out["tcp"]["tcp_packets"] != n:
                raise RuntimeError(f"monitor saw {out['tcp']['tcp_packets']} TCP packets")
        log(f"  round {r + 1}/{args.runs}: " + ", ".join(
            f"{k} {v[-1]:.3f}s" for k, v in times.items()))
    raw["tcp64"] = times
    med = {k: statistics.median(v) for k, v in times.items()}
    mpps = {k: n / v / 1e6 for k, v in med.items()}
    f = "2. Monitor, no reassembly, 64 B TCP frames"
    row(f, "App([], stack='tcp')", mpps["monitor"], "Mpps", "Network Layer App([])",
        mpps["network_layer"], mpps["monitor"] / mpps["network_layer"], "of its rate",
        goal=f">= {GOALS['mpps']:g} Mpps")
    extra = (med["monitor"] - med["network_layer"]) / n * 1e9
    row(f, "the Monitor's extra time", extra, "ns/pkt", "Network Layer's time",
        med["network_layer"] / n * 1e9, extra / (med["network_layer"] / n * 1e9),
        "of it")

    # 3. snapshots and twin-state updates
    log("snapshot and update micro figures")
    snap_ns, upd_ns, n_segs = snapshot_figures()
    paper_ns = PAPER_SNAPSHOT_CYCLES / ghz if ghz else None
    row("3. snapshot", "SNAPSHOT_SIZE", _tcp.SNAPSHOT_SIZE, "B", "paper",
        PAPER_SNAPSHOT_BYTES, _tcp.SNAPSHOT_SIZE / PAPER_SNAPSHOT_BYTES, "x the paper's",
        goal=f"<= {GOALS['snapshot_bytes']} B")
    row("3. snapshot", f"tcp_snapshot (~{snap_ns * ghz:.0f} cycles at {ghz:.2f} GHz)"
        if ghz else "tcp_snapshot", snap_ns, "ns",
        "paper: ~76 cycles", paper_ns, snap_ns / paper_ns if paper_ns else None,
        "x the paper's")
    row("3. twin-state update", f"sender + receiver update ({n_segs}-segment "
        "connection)", upd_ns, "ns/segment")

    # 4. and 5. memory
    log("memory with 1 M concurrent flows (fresh processes)")
    cap = 1 << 20
    n_big = 100_000 if q else 1 << 20
    syn = captures.make_tcp64_capture(n_big, 1)
    ft = FlowTable(cap)
    known = ft.bytes_per_flow + _tcp.CONN_SIZE + MONITOR_SLOT_ARRAYS
    del ft
    mon = rss_of(syn, "tcp", cap)
    net = rss_of(syn, "network", cap)
    for name, r in (("monitor", mon), ("network", net)):
        fl = r["flows"]
        if fl["created"] != n_big or fl["evicted"] or fl["refused"] or fl["expired"]:
            raise RuntimeError(f"{name}: flows {fl}")
    raw["rss"] = {"monitor": mon, "network": net}
    mon_bpf = (mon["after"] - mon["before"]) / n_big
    net_bpf = (net["after"] - net["before"]) / n_big
    row("4. bytes per flow, no reassembly", "flow table + tcp_conn + slot arrays "
        "(known sizes)", known, "B/flow", "flow table alone", known - _tcp.CONN_SIZE
        - MONITOR_SLOT_ARRAYS, known / (known - _tcp.CONN_SIZE - MONITOR_SLOT_ARRAYS),
        "x", goal=f"<= {GOALS['bytes_per_flow']} B")
    row("4. bytes per flow, no reassembly", f"VmRSS growth / {n_big:,} flows", mon_bpf,
        "B/flow", "Network Layer, same", net_bpf, mon_bpf / net_bpf, "x")
    row(f"5. {n_big:,} concurrent TCP flows, table of {cap:,}",
        "Monitor VmRSS after the run", mon["after"] / 2**20, "MiB",
        "Network Layer VmRSS", net["after"] / 2**20, mon["after"] / net["after"], "x")
    row(f"5. {n_big:,} concurrent TCP flows, table of {cap:,}",
        "Monitor VmRSS growth", (mon["after"] - mon["before"]) / 2**20, "MiB",
        "Network Layer growth", (net["after"] - net["before"]) / 2**20,
        (mon["after"] - mon["before"]) / (net["after"] - net["before"]), "x")
    return dict(rows=rows, seconds=raw, bulk=bulk, ghz=ghz, n64=n, flows64=n_flows,
                n_concurrent=n_big, rss={"monitor": mon, "network": net})


def table(rows, markdown=False):
    head = ("figure", "mbx", "value", "baseline", "value", "ratio", "goal")
    lines = [head]
    for r in rows:
        lines.append((r["figure"], r["what"], f"{_fmt(r['value'])} {r['unit']}",
                      r["baseline"] or "-",
                      f"{_fmt(r['baseline_value'])} {r['baseline_unit']}"
                      if r["baseline_value"] is not None else "-",
                      f"{_fmt(r['ratio'])} {r['ratio_means']}" if r["ratio"] else "-",
                      r["goal"] or "-"))
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

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15, 5),
                                  gridspec_kw={"width_ratios": [2.2, 1, 1]})
    names = [("mbx_cli", "mbx flows\n(process)"), ("mbx_flows_json", "flows_json\n"
             "(in process)"), ("tcpflow", "tcpflow\n(files)"),
             ("dpkt_reassembler", "dpkt\nreassembler"),
             ("monitor_twin_state", "Monitor\nno reassembly"),
             ("sha256_alone", "SHA-256\nalone")]
    labels = list(result["bulk"])
    w = 0.8 / len(labels)
    xs = range(len(names))
    for i, label in enumerate(labels):
        g = result["bulk"][label]["gbps"]
        vals = [g[k] for k, _ in names]
        bars = a.bar([x + (i - (len(labels) - 1) / 2) * w for x in xs], vals, w,
                     label=label)
        for bar, v in zip(bars, vals, strict=True):
            a.text(bar.get_x() + bar.get_width() / 2, v * 1.08, f"{v:.2g}", ha="center",
                   fontsize=7)
    a.axhline(GOALS["gbps_1448"], color="grey", ls="--", lw=1)
    a.text(len(names) - 0.6, GOALS["gbps_1448"] * 1.08, "goal 10 Gbit/s", ha="right",
           fontsize=8, color="grey")
    a.set_xticks(list(xs), [n for _, n in names], fontsize=8)
    a.set_yscale("log")
    a.set_ylabel("Gbit/s of payload, one core (log)")
    a.set_title("1. Reassembly + SHA-256 per direction")
    a.legend(fontsize=8)
    rows = {r["figure"]: r for r in result["rows"] if r["unit"] == "Mpps"}
    r = next(iter(rows.values()))
    b.bar([0, 1], [r["value"], r["baseline_value"]], 0.6, color=["C0", "C7"])
    b.axhline(GOALS["mpps"], color="grey", ls="--", lw=1)
    b.text(1.3, GOALS["mpps"] * 1.02, "goal 10 Mpps", ha="right", fontsize=8,
           color="grey")
    for x, v in enumerate([r["value"], r["baseline_value"]]):
        b.text(x, v * 1.02, f"{v:.2f}", ha="center", fontsize=8)
    b.set_xticks([0, 1], ["TCP Monitor\nApp([], stack='tcp')",
                          "Network Layer\nApp([])"], fontsize=8)
    b.set_ylabel("Mpps, one core")
    b.set_title(f"2. 64 B TCP frames, {result['flows64']:,} flows")
    rss = result["rss"]
    n = result["n_concurrent"]
    mon = (rss["monitor"]["after"] - rss["monitor"]["before"]) / n
    net = (rss["network"]["after"] - rss["network"]["before"]) / n
    known = next(x for x in result["rows"] if x["figure"].startswith("4."))["value"]
    c.bar([0, 1, 2], [known, mon, net], 0.6, color=["C0", "C0", "C7"])
    c.axhline(GOALS["bytes_per_flow"], color="grey", ls="--", lw=1)
    c.text(2.3, GOALS["bytes_per_flow"] * 1.02, "goal 256 B", ha="right", fontsize=8,
           color="grey")
    for x, v in enumerate([known, mon, net]):
        c.text(x, v * 1.02, f"{v:.0f}", ha="center", fontsize=8)
    c.set_xticks([0, 1, 2], ["Monitor\n(known sizes)", "Monitor\n(VmRSS)",
                             "Network Layer\n(VmRSS)"], fontsize=8)
    c.set_ylabel("bytes per flow")
    c.set_title(f"4-5. Memory, {n:,} concurrent flows")
    fig.suptitle(f"mbx TCP Monitor figures; {result['machine']['cpu']}, "
                 f"{result['machine']['cores']} cores (median of {result['runs']})",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    if argv is None and len(sys.argv) > 1 and sys.argv[1] == "--rss-child":
        rss_child(sys.argv[4], sys.argv[2], int(sys.argv[3]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help="20 + 10 MB bulk captures, 100 k 64-byte frames, 100 k "
                         "concurrent flows, for a smoke run")
    ap.add_argument("--runs", type=at_least(1), default=3, help="runs of each, median (3)")
    ap.add_argument("--json", type=writable, help="write the figures as JSON here")
    ap.add_argument("--plot", type=writable, help="write a bar chart (PNG) here")
    ap.add_argument("--markdown", action="store_true", help="print the table in Markdown")
    args = ap.parse_args(argv)
    command = " ".join(shlex.quote(a) for a in [os.path.basename(sys.executable),
                                                *sys.argv])
    info = machine()
    try:
        info["tcpflow"] = subprocess.run(["tcpflow", "-V"], capture_output=True,
                                         text=True).stdout.strip()
    except OSError:
        raise SystemExit("tcpflow is not installed (apt-get install tcpflow)") from None

    def log(*a):
        print(*a, file=sys.stderr, flush=True)

    log(f"machine: {info['cpu']}, {info['cores']} cores")
    t0 = time.perf_counter()
    result = figures(args, log=log)
    info["load_avg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    info["seconds"] = time.perf_counter() - t0
    result.update(command=command, machine=info, runs=args.runs)
    print(f"command: {command}")
    print(f"machine: {info['cpu']} (~{result['ghz'] or 0:.2f} GHz), {info['cores']} "
          f"cores ({info['usable_cores']} usable), load average "
          f"{_load(info['load_avg_at_start'])} at start, "
          f"{_load(info['load_avg_at_end'])} at end, Linux {info['kernel']}, Python "
          f"{info['python']}, mbx {info['mbx']}, dpkt {info['dpkt']}, "
          f"{info['tcpflow']}; {info['seconds']:.0f} s")
    for label, b in result["bulk"].items():
        print(f"capture ({label}): {b['conns']} connections, {b['payload'] / 1e6:.0f} MB "
              f"of payload in a {b['file_bytes'] / 1e6:.0f} MB file in "
              f"{captures.CACHE_DIR}")
    print(f"median of {args.runs} runs, contenders alternating")
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
