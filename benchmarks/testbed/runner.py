"""Runs of the load matrix (modes × tools × workloads × rounds) and their summary."""
from __future__ import annotations

import contextlib
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

from . import bed as tb
from .load import (
    WORKLOADS,
    correctness_pass,
    error_total,
    length_check,
    per_request_us,
    response_length,
    run_load,
    wait_quiet,
    write_lua,
)

SCHEMA = "mbx-testbed/1"
METRICS = ("rps", "p50_us", "p99_us", "mb_cpu_us", "bed_cpu_us", "machine_cpu_us",
           "unattributed_cpu_us", "softirq_cpu_us", "others_cpus")


def _version(argv):
    try:
        r = subprocess.run(argv, capture_output=True, timeout=5)
        text = (r.stdout + r.stderr).decode(errors="replace").strip().splitlines()
        return text[0] if text else ""
    except (OSError, subprocess.TimeoutExpired):
        return None


def machine_info():
    with open("/proc/loadavg") as fh:
        load = fh.read().split()[:3]
    model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as fh:
        for line in fh:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    # New namespaces inherit the host's TCP congestion control (BBR here, which
    # paces; cubic, Linux's default, does not); it moves every mode's figures.
    cc = ""
    with contextlib.suppress(OSError), \
            open("/proc/sys/net/ipv4/tcp_congestion_control") as fh:
        cc = fh.read().strip()
    return {"cpus": os.cpu_count(), "cpu_model": model, "kernel": platform.release(),
            "python": platform.python_version(), "loadavg": load,
            "tcp_congestion_control": cc,
            "versions": {"nginx": _version(["nginx", "-v"]),
                         "haproxy": _version(["haproxy", "-v"]),
                         "wrk": _version(["wrk", "-v"]),
                         "ab": _version(["ab", "-V"]),
                         "curl": _version(["curl", "--version"])}}


def _conntrack_guard(bed, notes):
    """Kernel mode: the middlebox's conntrack table fills with TIME_WAIT entries of the
    new-connection runs (120 s each); flush it between runs when it is half full."""
    if bed.mode != "kernel":
        return
    r = bed.exec("mb", ["cat", "/proc/sys/net/netfilter/nf_conntrack_count",
                        "/proc/sys/net/netfilter/nf_conntrack_max"], check=False)
    try:
        count, cmax = map(int, r.stdout.split())
    except ValueError:
        return
    if count > cmax // 2:
        if shutil.which("conntrack"):
            bed.exec("mb", ["conntrack", "-F"], check=False)
        else:
            notes.append(f"conntrack table {count}/{cmax} and no conntrack tool to flush it")


def run_matrix(modes, workloads, tools=("wrk",), runs=3, duration=5.0, connections=32,
               gap=1.0, check_seconds=1.0, check_connections=8, big_size=tb.BIG_SIZE,
               quiet_wait=0.0, bed_options=None, log=print):
    """Each round sets every mode up afresh, checks correctness, then runs every tool
    and workload once; rounds alternate the modes so slow drift of the machine
    affects all of them alike.  Returns the JSON document."""
    bed_options = dict(bed_options or {})
    doc = {"schema": SCHEMA, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": sys.argv, "machine": machine_info(),
           "config": {"modes": list(modes), "workloads": list(workloads),
                      "tools": list(tools), "runs": runs, "duration_s": duration,
                      "connections": connections, "gap_s": gap,
                      "check_seconds": check_seconds, "big_size": big_size,
                      "quiet_wait_s": quiet_wait,
                      "wrk_threads": 1, **bed_options},
           "results": [], "checks": [], "middlebox_counters": [], "pids": [], "notes": []}
    mbx_duration = (len(tools) * len(workloads) * (duration + gap + 3)
                    + len(workloads) * (check_seconds + 8) + 60)
    for rnd in range(runs):
        for mode in modes:
            log(f"[round {rnd + 1}/{runs}] {mode}: setting up")
            with tb.Bed(mode, big_size=big_size, mbx_duration=mbx_duration,
                        **bed_options) as bed:
                doc["pids"].extend(bed.started_pids)
                lua = write_lua(bed.workdir)
                chk = correctness_pass(bed, lua, workloads, check_connections, check_seconds)
                chk.update(mode=mode, round=rnd)
                doc["checks"].append(chk)
                log(f"[round {rnd + 1}/{runs}] {mode}: correctness "
                    f"{'ok' if chk['ok'] else 'FAILED'}")
                if not chk["ok"]:
                    # The figures of a middlebox that loses or corrupts traffic mean
                    # nothing, and its loads would only wait for answers.
                    why = _check_failures(chk)
                    doc["notes"].append(f"round {rnd + 1}, {mode}: correctness failed "
                                        f"({why}); its loads were not run")
                    log(f"[round {rnd + 1}/{runs}] {mode}: {why}; skipping its loads")
                    continue
                for tool in tools:
                    for wl in workloads:
                        resp_len = response_length(bed, wl)
                        _conntrack_guard(bed, doc["notes"])
                        time.sleep(gap)
                        bg = wait_quiet(quiet_wait) if quiet_wait > 0 else None
                        res, cpu = run_load(bed, tool, wl, duration, connections, lua=lua)
                        res.update(mode=mode, tool=tool, workload=wl, round=rnd,
                                   cpu=cpu, response_bytes=resp_len,
                                   background_cpus_before=bg,
                                   others_cpus=cpu["others_s"] / cpu["wall_s"],
                                   cpu_us_per_req=per_request_us(cpu, res["requests"]))
                        if tool == "wrk":
                            res["length_ok"] = length_check(res, resp_len, connections)
                            if not res["length_ok"]:
                                res["errors"]["length"] = 1
                        doc["results"].append(res)
                        log(f"[round {rnd + 1}/{runs}] {mode} {tool} {wl}: "
                            f"{res['rps']:,.0f} req/s, p50 {res['p50_us'] or 0:.0f} µs, "
                            f"p99 {res['p99_us'] or 0:.0f} µs, "
                            f"errors {error_total(res['errors'])}, "
                            f"mb {_fmt(res['cpu_us_per_req'].get('middlebox'))} µs/req, "
                            f"bed {_fmt(res['cpu_us_per_req'].get('bed'))} µs/req, "
                            f"others {res['others_cpus']:.2f} CPUs")
                bed.stop_middlebox()
                if bed.mb_counters is not None:
                    doc["middlebox_counters"].append({"mode": mode, "round": rnd,
                                                      "counters": bed.mb_counters})
    doc["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
    doc["summary"] = summarize(doc["results"])
    doc["ok"] = all(c["ok"] for c in doc["checks"]) and all(
        r["errors_total"] == 0 for r in doc["summary"])
    return doc


def _check_failures(chk):
    """What failed in a correctness pass, in a few words."""
    out = [f"{f['file']} fetch" for f in chk["fetches"] if not f["ok"]]
    out += [f"checked {c['workload']} load" + (f": {c['error']}" if "error" in c else "")
            for c in chk["checked_runs"] if not c["ok"]]
    out += [f"{b.get('file', 'big')} download" for b in chk["big"] if not b["ok"]]
    return ", ".join(out) or "no detail"


def _fmt(v):
    return "-" if v is None else f"{v:.1f}"


def _metrics(res):
    c = res["cpu_us_per_req"]
    return {"rps": res["rps"], "p50_us": res["p50_us"], "p99_us": res["p99_us"],
            "mb_cpu_us": c.get("middlebox"), "machine_cpu_us": c.get("machine_busy"),
            "bed_cpu_us": c.get("bed"), "others_cpus": res.get("others_cpus"),
            "unattributed_cpu_us": c.get("unattributed"),
            "softirq_cpu_us": c.get("machine_softirq")}


def summarize(results):
    """Median, min and max of each metric per (mode, tool, workload)."""
    groups = {}
    for r in results:
        groups.setdefault((r["mode"], r["tool"], r["workload"]), []).append(r)
    out = []
    for (mode, tool, wl), rs in groups.items():
        row = {"mode": mode, "tool": tool, "workload": wl, "runs": len(rs),
               "requests": sum(r["requests"] for r in rs),
               "errors_total": sum(error_total(r["errors"]) for r in rs)}
        for m in METRICS:
            vals = [v for v in (_metrics(r)[m] for r in rs) if v is not None]
            row[m] = ({"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
                      if vals else None)
        out.append(row)
    return out


__all__ = ["run_matrix", "summarize", "WORKLOADS"]
