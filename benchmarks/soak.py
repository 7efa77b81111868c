"""Soak: mbx bridging real HTTP load for minutes, with its memory and counters watched.

    python benchmarks/soak.py --minutes 3 [--deploy pipelined] [--json soak.json]

Root.  Sets up the test bed's mbx-l4lb mode (client, two nginx backends, mbx
bridging the middlebox namespace's veths; docs/testbed.md) and runs an
application of two NFs over it: the L4 load balancer, then a TCP Monitor NF that
reads every request stream the clients send (DATA_RDY, so the Monitor reassembles
every connection) and checks that each starts with ``GET /``.  Flows go idle after
2 s, so flow entries, TCP state and stream pairs are taken and given back all the
time.  wrk drives the bed in slices of ``--slice`` seconds, turn by turn over the
four workloads (new connection per request and keep-alive, 64 B and 8 KiB).
After each slice: requests/s and errors, the resident memory (VmRSS) of the mbx
processes (the stack and, pipelined, its NF processes) and their CPU.  At the end
mbx gets SIGINT, and its final counters are read.

The memory a run needs is reached within the first minute (the flow table, Stack
and Event Memory are allocated up front; Python's and the allocator's pools fill
as traffic goes on), except shared memory, which pipelined counts in every
process as it touches pages of it, up to the mapping's size.  So the check is on
the anonymous memory (heaps) of the second half, and never the first minute (a
shorter run is not checked for growth): the exit status is 1 if it grew by more
than ``--max-growth`` MiB between the first sample of that stretch and the last,
if any slice had an error, if the NF found a stream that did not start with
``GET /``, or if mbx did not end cleanly with its counters.  Every load is
bounded (wrk's own duration, a time-out on each command), and the bed is always
torn down.
"""
import argparse
import json
import os
import shutil
import sys
import tempfile
import time

from _args import at_least, seconds, writable
from testbed import bed as tb
from testbed import load

NF_SOURCE = '''
"""Reads what each client sends (the TCP Monitor reassembles it) and checks that
every stream starts with an HTTP request line."""
import mbx


class RequestStreams(mbx.NF):
    def __init__(self):
        super().__init__("streams")
        self.streams = self.bytes = self.bad = 0
        self.sub(mbx.DATA_RDY, self.on_data, side="server")   # the client's bytes

    def on_data(self, ev):
        data = ev.read()
        if ev.offset == 0:
            self.streams += 1
            if bytes(data[:5]) != b"GET /":
                self.bad += 1
        self.bytes += len(data)

    def report(self):
        return {"streams": self.streams, "bytes": self.bytes, "not_http": self.bad}


def make():
    return RequestStreams()
'''

APP_TOML = """
[app]
name = "soak"
stack = "tcp"

[stack]
flow_capacity = 262144
idle_timeout = 2.0
max_streams = 131072
chunk_size = 2048

[[nf]]
use = "l4lb"
options = {{ vip = "{vip}", backends = "{backends}" }}

[[nf]]
use = "{nf}"
"""

WORKLOAD_ORDER = ("close-8k", "ka-8k", "close-64", "ka-64")
WARM_UP_S = 60.0    # memory is not checked before (see the module's docstring)


def tree_pids(pid):
    """``pid`` and its descendants (pipelined: the NF processes)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as fh:
                    todo += [int(c) for c in fh.read().split()]
        except (FileNotFoundError, ProcessLookupError):
            pass
    return out


def rss_mib(pids):
    """Resident MiB of ``pids``: (total, anonymous, shared memory).  Shared memory
    (Stack and Event Memory, the rings, pipelined) is counted in each process that
    touched a page, and grows until every page has been touched; anonymous memory
    (heaps) is what a leak would grow."""
    total = {"VmRSS:": 0, "RssAnon:": 0, "RssShmem:": 0}
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as fh:
                for line in fh:
                    key = line.split(None, 1)[0] if line.strip() else ""
                    if key in total:
                        total[key] += int(line.split()[1])
        except (FileNotFoundError, ProcessLookupError):
            pass
    return tuple(round(total[k] / 1024, 1) for k in ("VmRSS:", "RssAnon:", "RssShmem:"))


def cpu_s(pids):
    return sum(load.proc_cpu_s(p) or 0.0 for p in pids)


def soak(args, log=print):
    workdir = tempfile.mkdtemp(prefix="mbx-soak-")
    os.chmod(workdir, 0o755)                # nginx workers run as nobody
    nf = os.path.join(workdir, "request_streams.py")
    with open(nf, "w") as fh:
        fh.write(NF_SOURCE)
    app = os.path.join(workdir, "soak.toml")
    with open(app, "w") as fh:
        fh.write(APP_TOML.format(vip=f"{tb.VIP}:{tb.HTTP_PORT}", nf=nf,
                                 backends=",".join(f"{b}:{tb.HTTP_PORT}"
                                                   for b in tb.BACKENDS)))
    spec = f"afpacket:{tb.IF_MB_CLIENT},{tb.IF_MB_SERVER}"
    argv = [sys.executable, "-c", "import sys; from mbx.cli import main; "
            "sys.argv[0] = 'mbx'; sys.exit(main())", "run", app, "--in", spec,
            "--out", spec, "--deploy", args.deploy,
            # a bound of its own, should we die before stopping it
            "--duration", f"{args.minutes * 60 + 240:g}",
            "--json", os.path.join(workdir, "mbx-counters.json"), "-q"]
    try:
        with tb.Bed("mbx-l4lb", workdir=workdir, mbx_argv=argv) as bed:
            return _drive(bed, args, log)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _drive(bed, args, log):
    (mbx_pid,) = [p for n, p in bed.middlebox if n == "mbx"]
    lua = load.write_lua(bed.workdir)
    slices = max(2, round(args.minutes * 60 / args.slice))
    rows = []
    t0 = time.monotonic()
    for k in range(slices):
        wl = WORKLOAD_ORDER[k % len(WORKLOAD_ORDER)]
        pids = tree_pids(mbx_pid)
        c0 = cpu_s(pids)
        res, _ = load.run_load(bed, "wrk", wl, args.slice, args.connections, lua)
        pids = tree_pids(mbx_pid)
        row = {"slice": k + 1, "t_s": round(time.monotonic() - t0, 1), "workload": wl,
               "rps": res.get("rps"), "errors": load.error_total(res["errors"]),
               "processes": len(pids),
               "mbx_cpu_s": round(cpu_s(pids) - c0, 2)}
        row["rss_mib"], row["anon_mib"], row["shmem_mib"] = rss_mib(pids)
        rows.append(row)
        log(f"[{row['slice']:>3}/{slices}] {row['t_s']:>6.1f} s  {wl:<8} "
            f"{row['rps'] or 0:>9,.0f} req/s  errors {row['errors']}  "
            f"VmRSS {row['rss_mib']:.1f} MiB (anon {row['anon_mib']:.1f}, shmem "
            f"{row['shmem_mib']:.1f}; {row['processes']} processes)  "
            f"mbx CPU {row['mbx_cpu_s']:.2f} s")
        if bed.procs and any(p.poll() is not None for n, p in bed.procs if n == "mbx"):
            log("mbx exited during the soak")
            break
    bed.stop_middlebox()
    counters = bed.mb_counters
    # the second half, and none of the first minute: tables allocated up front are
    # still being touched for the first time then
    start = max(WARM_UP_S, rows[-1]["t_s"] / 2) if rows else 0
    half = [r for r in rows if r["t_s"] >= start]
    growth = half[-1]["anon_mib"] - half[0]["anon_mib"] if len(half) > 1 else None
    problems = []
    if any(r["errors"] for r in rows):
        problems.append(f"{sum(r['errors'] for r in rows)} errors in "
                        f"{sum(1 for r in rows if r['errors'])} slices")
    if growth is not None and growth > args.max_growth:
        problems.append(f"anonymous memory grew {growth:.1f} MiB over the second half (more than "
                        f"{args.max_growth:g})")
    if len(rows) < slices:
        problems.append(f"mbx ended after {len(rows)} of {slices} slices")
    report = None
    if counters is None:
        problems.append("mbx wrote no final counters")
    else:
        report = counters.get("nfs", {}).get("streams", {}).get("report")
        if not report or report.get("error"):
            problems.append(f"the stream NF reported {report!r}")
        elif report["not_http"]:
            problems.append(f"{report['not_http']} streams did not start with 'GET /'")
    summary = {"deploy": args.deploy, "slices": rows, "growth_second_half_mib": growth,
               "final_counters": counters, "nf_report": report, "problems": problems}
    return summary


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=seconds, default=3.0,
                   help="how long to drive load (default 3)")
    p.add_argument("--slice", type=seconds, default=10.0,
                   help="seconds of wrk between samples (default 10)")
    p.add_argument("--connections", type=at_least(1), default=32)
    p.add_argument("--deploy", choices=("inline", "pipelined"), default="inline")
    p.add_argument("--max-growth", type=seconds, default=8.0, metavar="MIB",
                   help="growth of anonymous memory allowed over the second half "
                        "(default 8 MiB)")
    p.add_argument("--json", type=writable, metavar="FILE")
    args = p.parse_args(argv)
    reason = tb.unavailable(["mbx-l4lb"])
    if reason:
        p.error(reason)
    tb.install_signal_handlers()
    summary = soak(args)
    f = summary["final_counters"] or {}
    flows, tcp = f.get("flows", {}), f.get("tcp", {})
    first, last = summary["slices"][0], summary["slices"][-1]
    print(f"VmRSS {first['rss_mib']:.1f} MiB after the first slice (anon "
          f"{first['anon_mib']:.1f}, shmem {first['shmem_mib']:.1f}), {last['rss_mib']:.1f} "
          f"after the last (anon {last['anon_mib']:.1f}, shmem {last['shmem_mib']:.1f}); "
          + (f"anonymous memory grew {summary['growth_second_half_mib']:+.1f} MiB over the "
             "second half" if summary["growth_second_half_mib"] is not None else
             f"growth not checked: a run of under {2 * WARM_UP_S:g} s is all warm-up"))
    if f:
        print(f"mbx: {f.get('packets', 0):,} packets, flows created "
              f"{flows.get('created', 0):,} expired {flows.get('expired', 0):,} evicted "
              f"{flows.get('evicted', 0):,}; streams {tcp.get('streams_opened', 0):,}, "
              f"memcaps {tcp.get('memcaps', 0):,}; NF {summary['nf_report']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(summary, fh, indent=1)
    for problem in summary["problems"]:
        print(f"soak: {problem}")
    print("soak: " + ("FAILED" if summary["problems"] else "ok"))
    return 1 if summary["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
