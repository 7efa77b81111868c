"""Runs of the load matrix (modes × tools × workloads × rounds) and their summary."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from . import bed as tb
from .load import (
    QUIET_SLACK,
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
# What a failed measured run raises: a command that hung or failed (TestbedError and
# NetnsError are RuntimeErrors), a load tool's unreadable output (ValueError), a file
# or process that could not be opened (OSError).  Recorded as that run's error.
RUN_ERRORS = (RuntimeError, ValueError, OSError)
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


def mbx_budget(workloads, tools, duration, gap, check_seconds, quiet_wait):
    """Seconds the mbx/pybridge process of one mode and round may run (its
    ``--duration``, a bound should we die): every command of the round at its
    time-out, the quiet wait included, with room to spare."""
    quiet = quiet_wait + QUIET_SLACK if quiet_wait > 0 else 0.0
    # a load: its gap, the quiet wait, the tool (duration + 30 s time-out) and the
    # response-length probe (10 s); a check: the wrk (+30 s) and the big download (90 s)
    per_run = gap + quiet + duration + 30 + 10 + 5
    per_check = check_seconds + 30 + 90
    return len(tools) * len(workloads) * per_run + len(workloads) * per_check + 180


def write_json(path, doc):
    """Write ``doc`` to ``path`` atomically: a temporary file in the same directory,
    then ``os.replace``, signals held meanwhile; a reader sees the old or the new
    file, never half of one."""
    text = json.dumps(doc, indent=1) + "\n"
    d = os.path.dirname(os.path.abspath(path))
    with tb.signals_held():
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.",
                                   suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as fh:
                fh.write(text)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise


def _stopped_by(exc):
    if isinstance(exc, KeyboardInterrupt):
        import signal
        sig = getattr(exc, "signum", signal.SIGINT)
        return f"interrupted ({signal.Signals(sig).name})"
    return f"{type(exc).__name__}: {exc}"


def run_matrix(modes, workloads, tools=("wrk",), runs=3, duration=5.0, connections=32,
               gap=1.0, check_seconds=1.0, check_connections=8, big_size=tb.BIG_SIZE,
               quiet_wait=0.0, bed_options=None, log=print, save=None):
    """Each round sets every mode up afresh, checks correctness, then runs every tool
    and workload once; rounds alternate the modes so slow drift of the machine
    affects all of them alike.  Returns the JSON document.

    ``save(doc)`` is called after every check and run, with ``complete`` false until
    the end, and once more if anything stops the matrix (``stopped`` says what), so a
    file written by it keeps what was measured.  A run that fails (a load tool that
    hangs or exits with an error, unreadable output, a bed that cannot be set up) is
    recorded in ``failed_runs`` and the matrix goes on; ``ok`` is then false."""
    bed_options = dict(bed_options or {})
    doc = {"schema": SCHEMA, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "complete": False, "stopped": None,
           "command": sys.argv, "machine": machine_info(),
           "config": {"modes": list(modes), "workloads": list(workloads),
                      "tools": list(tools), "runs": runs, "duration_s": duration,
                      "connections": connections, "gap_s": gap,
                      "check_seconds": check_seconds, "big_size": big_size,
                      "quiet_wait_s": quiet_wait,
                      "wrk_threads": 1, **bed_options},
           "results": [], "failed_runs": [], "checks": [], "middlebox_counters": [],
           "pids": [], "notes": []}
    mbx_duration = mbx_budget(workloads, tools, duration, gap, check_seconds, quiet_wait)

    def saved():
        _finish(doc)
        if save is not None:
            save(doc)

    def fail(rnd, mode, stage, exc, tool=None, workload=None):
        doc["failed_runs"].append({"mode": mode, "tool": tool, "workload": workload,
                                   "round": rnd, "stage": stage,
                                   "error": f"{type(exc).__name__}: {exc}"})
        what = " ".join(x for x in (mode, tool, workload) if x)
        log(f"[round {rnd + 1}/{runs}] {what}: {stage} FAILED: "
            f"{str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}")
        saved()

    try:
        for rnd in range(runs):
            for mode in modes:
                log(f"[round {rnd + 1}/{runs}] {mode}: setting up")
                stage = ["setting up"]
                try:
                    with tb.Bed(mode, big_size=big_size, mbx_duration=mbx_duration,
                                **bed_options) as bed:
                        _mode_round(doc, bed, rnd, runs, mode, workloads, tools,
                                    duration, connections, gap, check_seconds,
                                    check_connections, quiet_wait, log, saved, fail,
                                    stage)
                except tb.CleanupError:
                    raise   # namespaces left behind: set nothing more up
                except RUN_ERRORS as exc:
                    fail(rnd, mode, stage[0], exc)
        doc["machine"]["loadavg_end"] = open("/proc/loadavg").read().split()[:3]
        doc["complete"] = True
    except BaseException as exc:
        doc["stopped"] = _stopped_by(exc)
        saved()
        raise
    saved()
    return doc


def _finish(doc):
    """The summary and the verdict of what has been measured so far."""
    doc["summary"] = summarize(doc["results"], doc["failed_runs"])
    doc["ok"] = (doc["complete"] and not doc["failed_runs"]
                 and all(c["ok"] for c in doc["checks"])
                 and all(r["errors_total"] == 0 for r in doc["summary"]))


def _mode_round(doc, bed, rnd, runs, mode, workloads, tools, duration, connections, gap,
                check_seconds, check_connections, quiet_wait, log, saved, fail, stage):
    """The correctness pass and the measured runs of one mode in one round."""
    doc["pids"].extend(bed.started_pids)
    stage[0] = "correctness pass"
    lua = write_lua(bed.workdir)
    chk = correctness_pass(bed, lua, workloads, check_connections, check_seconds)
    chk.update(mode=mode, round=rnd)
    doc["checks"].append(chk)
    saved()
    log(f"[round {rnd + 1}/{runs}] {mode}: correctness {'ok' if chk['ok'] else 'FAILED'}")
    if not chk["ok"]:
        # The figures of a middlebox that loses or corrupts traffic mean nothing, and
        # its loads would only wait for answers.
        why = _check_failures(chk)
        doc["notes"].append(f"round {rnd + 1}, {mode}: correctness failed ({why}); its "
                            "loads were not run")
        log(f"[round {rnd + 1}/{runs}] {mode}: {why}; skipping its loads")
        saved()
        return
    stage[0] = "measured runs"
    dead = None
    for tool in tools:
        for wl in workloads:
            if dead:
                fail(rnd, mode, "load", tb.TestbedError(f"not run: {dead}"), tool, wl)
                continue
            try:
                res = _measured_run(doc, bed, rnd, runs, mode, tool, wl, duration,
                                    connections, gap, quiet_wait, lua, log)
            except RUN_ERRORS as exc:
                fail(rnd, mode, "load", exc, tool, wl)
                dead = _middlebox_gone(bed)
                continue
            doc["results"].append(res)
            saved()
    stage[0] = "stopping the middlebox"
    bed.stop_middlebox()
    if bed.mb_counters is not None:
        doc["middlebox_counters"].append({"mode": mode, "round": rnd,
                                          "counters": bed.mb_counters})
        saved()


def _middlebox_gone(bed):
    """Why the rest of a mode's runs cannot run (its middlebox process exited), or
    None."""
    for name, p in bed.procs:
        if (name, p.pid) in bed.middlebox and p.poll() is not None:
            return f"{name} exited {p.returncode}"
    return None


def _measured_run(doc, bed, rnd, runs, mode, tool, wl, duration, connections, gap,
                  quiet_wait, lua, log):
    def note(msg):
        log(f"[round {rnd + 1}/{runs}] {mode} {tool} {wl}: {msg}")

    resp_len = response_length(bed, wl)
    _conntrack_guard(bed, doc["notes"])
    time.sleep(gap)
    bg = wait_quiet(quiet_wait, log=note) if quiet_wait > 0 else None
    res, cpu = run_load(bed, tool, wl, duration, connections, lua=lua)
    res.update(mode=mode, tool=tool, workload=wl, round=rnd, cpu=cpu,
               response_bytes=resp_len, background_cpus_before=bg,
               others_cpus=cpu["others_s"] / cpu["wall_s"],
               cpu_us_per_req=per_request_us(cpu, res["requests"]))
    if tool == "wrk":
        res["length_ok"] = length_check(res, resp_len, connections)
        if not res["length_ok"]:
            res["errors"]["length"] = 1
    note(f"{res['rps']:,.0f} req/s, p50 {res['p50_us'] or 0:.0f} µs, "
         f"p99 {res['p99_us'] or 0:.0f} µs, errors {error_total(res['errors'])}, "
         f"mb {_fmt(res['cpu_us_per_req'].get('middlebox'))} µs/req, "
         f"bed {_fmt(res['cpu_us_per_req'].get('bed'))} µs/req, "
         f"others {res['others_cpus']:.2f} CPUs")
    return res


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


def summarize(results, failed_runs=()):
    """Median, min and max of each metric per (mode, tool, workload); ``failed_runs``
    counts the runs of each that failed (a row with only those has no metrics)."""
    groups = {}
    for r in results:
        groups.setdefault((r["mode"], r["tool"], r["workload"]), []).append(r)
    failed = {}
    for f in failed_runs:
        if f.get("tool") and f.get("workload"):
            key = (f["mode"], f["tool"], f["workload"])
            failed[key] = failed.get(key, 0) + 1
            groups.setdefault(key, [])
    out = []
    for (mode, tool, wl), rs in groups.items():
        row = {"mode": mode, "tool": tool, "workload": wl, "runs": len(rs),
               "failed_runs": failed.get((mode, tool, wl), 0),
               "requests": sum(r["requests"] for r in rs),
               "errors_total": sum(error_total(r["errors"]) for r in rs)}
        for m in METRICS:
            vals = [v for v in (_metrics(r)[m] for r in rs) if v is not None]
            row[m] = ({"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
                      if vals else None)
        out.append(row)
    return out


__all__ = ["run_matrix", "summarize", "write_json", "WORKLOADS"]
