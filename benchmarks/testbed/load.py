"""Load generators (wrk, ab), their output, CPU accounting and correctness checks.

Workloads (``WORKLOADS``): a new connection per request (``close-*``: wrk sends
``Connection: close``; ab without ``-k``, the paper's ab workload) or keep-alive
(``ka-*``), for the 64-byte and the 8 KiB file.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import resource
import subprocess
import threading
import time

from . import netns

WORKLOADS = {
    "close-64": {"file": "64", "keepalive": False},
    "close-8k": {"file": "8k", "keepalive": False},
    "ka-64": {"file": "64", "keepalive": True},
    "ka-8k": {"file": "8k", "keepalive": True},
}
TOOLS = ("wrk", "ab")

# wrk: percentiles and counters from done(), printed as one JSON line after a marker.
WRK_DONE_LUA = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'MBXJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%.1f,"p90_us":%.1f,"p99_us":%.1f,' ..
    '"max_us":%.1f,"mean_us":%.1f,"bad":%d}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(90),
    latency:percentile(99), latency.max, latency.mean, mbx_bad_total()))
end
"""

# The checking variant: every response's status and body compared with the file.
WRK_CHECK_LUA = r"""
local threads = {}
local expected = nil
setup = function(thread) table.insert(threads, thread) end
init = function(args)
  local f = assert(io.open(args[1], "rb"))
  expected = f:read("*all")
  f:close()
  bad = 0
  checked = 0
end
response = function(status, headers, body)
  checked = checked + 1
  if status ~= 200 or body ~= expected then bad = bad + 1 end
end
function mbx_bad_total()
  local n = 0
  for _, t in ipairs(threads) do n = n + t:get("bad") end
  return n
end
""" + WRK_DONE_LUA

WRK_PLAIN_LUA = "function mbx_bad_total() return 0 end\n" + WRK_DONE_LUA


def write_lua(workdir):
    paths = {}
    for name, text in (("plain", WRK_PLAIN_LUA), ("check", WRK_CHECK_LUA)):
        path = os.path.join(workdir, f"wrk-{name}.lua")
        with open(path, "w") as fh:
            fh.write(text)
        paths[name] = path
    return paths


def parse_wrk(stdout):
    """wrk's stdout -> the dict our done() printed (ValueError if absent)."""
    m = re.search(r"^MBXJSON (\{.*\})$", stdout, re.M)
    if not m:
        raise ValueError(f"no MBXJSON line in wrk output:\n{stdout[-2000:]}")
    d = json.loads(m.group(1))
    secs = d["duration_us"] / 1e6
    return {
        "requests": d["requests"], "duration_s": secs,
        "rps": d["requests"] / secs if secs > 0 else 0.0,
        "p50_us": d["p50_us"], "p90_us": d["p90_us"], "p99_us": d["p99_us"],
        "max_us": d["max_us"], "mean_us": d["mean_us"], "bytes": d["bytes"],
        "errors": {"non2xx": d["status"], "connect": d["connect"], "read": d["read"],
                   "write": d["write"], "timeout": d["timeout"], "body": d["bad"]},
    }


_AB_NUM = r"([\d.]+)"


def parse_ab(stdout, csv_text=""):
    """ab's report (and its ``-e`` CSV of percentiles, in ms) -> our dict."""
    def num(label, default=None):
        m = re.search(rf"^{re.escape(label)}:\s+{_AB_NUM}", stdout, re.M)
        if not m:
            if default is not None:
                return default
            raise ValueError(f"ab output has no {label!r}:\n{stdout[-2000:]}")
        return float(m.group(1))

    complete = int(num("Complete requests"))
    secs = num("Time taken for tests")
    failed = int(num("Failed requests"))
    detail = {"connect": 0, "receive": 0, "length": 0, "exceptions": 0}
    m = re.search(r"\(Connect: (\d+), Receive: (\d+), Length: (\d+), Exceptions: (\d+)\)",
                  stdout)
    if m:
        detail = dict(zip(detail, map(int, m.groups()), strict=True))
    pct = {}
    for line in csv_text.splitlines()[1:]:
        p, _, ms = line.partition(",")
        with _suppress():
            pct[int(float(p))] = float(ms) * 1000.0
    return {
        "requests": complete, "duration_s": secs,
        "rps": complete / secs if secs > 0 else 0.0,
        "p50_us": pct.get(50), "p90_us": pct.get(90), "p99_us": pct.get(99),
        "max_us": pct.get(100), "mean_us": num("Time per request", 0.0) * 1000.0,
        "bytes": int(num("Total transferred", 0)),
        "errors": {"non2xx": int(num("Non-2xx responses", 0)), "connect": detail["connect"],
                   "read": detail["receive"], "write": int(num("Write errors", 0)),
                   "timeout": 0, "length": detail["length"],
                   "exceptions": detail["exceptions"], "failed": failed},
    }


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, et, ev, tb):
        return et is not None and issubclass(et, ValueError)


def error_total(errors):
    """Every counted failure (``failed`` in ab's report sums the others)."""
    return sum(v for k, v in errors.items() if k != "failed")


# -- CPU accounting ---------------------------------------------------------------------
CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_s(pid):
    """CPU seconds (user + system) of a process and all its threads so far, or None.
    /proc/PID/task/*/schedstat has nanoseconds; /proc/PID/stat ticks as a fallback."""
    try:
        total = 0
        tasks = os.listdir(f"/proc/{pid}/task")
        for tid in tasks:
            with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                total += int(fh.read().split()[0])
        return total / 1e9
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        pass
    try:
        with open(f"/proc/{pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / CLK_TCK  # utime, stime
    except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
        return None


def machine_cpu_s():
    """(busy, softirq) CPU seconds of the whole machine so far (/proc/stat)."""
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    busy = user + nice + system + irq + softirq + steal
    return busy / CLK_TCK, softirq / CLK_TCK


def children_cpu_s():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def all_procs_cpu_s():
    """{pid: CPU seconds} of every process on the machine."""
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as fh:
                    f = fh.read().rsplit(")", 1)[1].split()
                out[int(name)] = (int(f[11]) + int(f[12])) / CLK_TCK
            except (FileNotFoundError, ProcessLookupError, IndexError, ValueError):
                pass
    return out


def net_ns_of(pid):
    try:
        return os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return None


class CpuSample:
    """CPU used between ``start()`` and ``stop()`` by the middlebox processes, the
    servers (every process in their namespace), the client (our reaped children), the
    machine, and every other process on it (``others``: this machine is shared, so
    the machine-wide figures are only as good as ``others`` is small)."""

    def __init__(self, mb_pids, srv_pids, own_pids=()):
        self.mb_pids, self.srv_pids = list(mb_pids), list(srv_pids)
        self.own = set(self.mb_pids) | set(self.srv_pids) | set(own_pids) | {os.getpid()}

    @staticmethod
    def _sum(pids):
        vals = [proc_cpu_s(p) for p in pids]
        return sum(v for v in vals if v is not None)

    def _others(self):
        return {pid: v for pid, v in all_procs_cpu_s().items() if pid not in self.own}

    def start(self):
        self.t0 = time.monotonic()
        self.others0 = self._others()
        self.mb0 = self._sum(self.mb_pids)
        self.srv0 = self._sum(self.srv_pids)
        self.cli0 = children_cpu_s()
        self.busy0, self.soft0 = machine_cpu_s()

    def stop(self, client_ns=None):
        busy, soft = machine_cpu_s()
        mb = self._sum(self.mb_pids) - self.mb0 if self.mb_pids else None
        srv = self._sum(self.srv_pids) - self.srv0
        cli = children_cpu_s() - self.cli0
        others1 = self._others()
        # processes of the client namespace that outlive the load tool (none usually)
        others = sum(v - self.others0.get(pid, 0.0) for pid, v in others1.items()
                     if client_ns is None or net_ns_of(pid) != client_ns)
        self.result = {
            "wall_s": time.monotonic() - self.t0,
            "middlebox_s": mb, "servers_s": srv, "client_s": cli,
            "others_s": max(others, 0.0),
            "machine_busy_s": busy - self.busy0,
            "machine_softirq_s": soft - self.soft0,
        }
        return self.result


def background_cpus(window=1.0):
    """CPUs busy on the machine over ``window`` seconds (call it while the bed idles:
    it is the load of whatever else shares the machine)."""
    b0, _ = machine_cpu_s()
    t0 = time.monotonic()
    time.sleep(window)
    b1, _ = machine_cpu_s()
    return (b1 - b0) / (time.monotonic() - t0)


QUIET_SLACK = 2.0   # wait_quiet may last this much beyond max_wait (window + pause)


def wait_quiet(max_wait, threshold=0.3, window=1.0, log=None, every=10.0):
    """Wait (at most ``max_wait`` s, plus up to ``QUIET_SLACK``) until the background
    load is under ``threshold`` CPUs; returns the last measurement.  ``log`` hears
    that it waits, every ``every`` s how busy the machine still is, and how it ended,
    so a long wait does not look like a hang."""
    t0 = time.monotonic()
    deadline = t0 + max_wait
    next_note = t0
    while True:
        bg = background_cpus(window)
        now = time.monotonic()
        if bg < threshold or now >= deadline:
            if log and now - t0 > window + 0.1:
                log(f"{'idle' if bg < threshold else 'still busy'} after {now - t0:.0f} s "
                    f"({bg:.2f} CPUs busy)" + ("" if bg < threshold else
                                              "; measuring anyway"))
            return bg
        if log and now >= next_note:
            log(f"waiting up to {max(deadline - now, 0):.0f} s more for the machine to "
                f"idle: {bg:.2f} CPUs busy (under {threshold:g} wanted)")
            next_note = now + every
        time.sleep(0.5)


def per_request_us(cpu, requests):
    """CPU-µs per request of each part.  ``unattributed`` is the machine's busy time
    charged to no process (ours or others'): softirq network work and kernel threads;
    the kernel mode's forwarding and NAT live there.  ``bed`` is the client, servers
    and middlebox processes plus ``unattributed``: the machine's CPU per request
    without the other processes sharing it."""
    if requests <= 0:
        return {}
    out = {}
    for k in ("middlebox", "servers", "client", "others", "machine_busy",
              "machine_softirq"):
        v = cpu.get(f"{k}_s")
        out[k] = None if v is None else v / requests * 1e6
    ours = sum(cpu.get(f"{k}_s") or 0.0 for k in ("middlebox", "servers", "client"))
    # the test bed's share of the machine: its processes, plus the busy time charged
    # to no process (softirq/kernel threads: kernel forwarding and NAT are there)
    # (never below 0: the per-process and machine-wide counters are read a moment
    # apart, and a busy machine can make the difference slightly negative)
    out["unattributed"] = max(
        0.0, (cpu["machine_busy_s"] - ours - cpu["others_s"]) / requests * 1e6)
    out["bed"] = ours / requests * 1e6 + out["unattributed"]
    return out


# -- running the tools --------------------------------------------------------------------
def wrk_argv(url, duration, connections, keepalive, lua, timeout_s=2, args=()):
    # wrk takes whole seconds only
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s",
            f"--timeout={timeout_s}s",
            "--latency", "-s", lua]
    if not keepalive:
        argv += ["-H", "Connection: close"]
    argv.append(url)
    if args:
        argv += ["--", *args]
    return argv


def ab_argv(url, duration, connections, keepalive, csv_path, max_requests=10_000_000,
            timeout_s=2):
    # -t first: it implies -n 50000, which the -n after it overrides (a count bound
    # beside the time bound)
    argv = ["ab", "-q", "-t", f"{max(1, round(duration))}", "-n", str(max_requests),
            "-c", str(connections), "-s", str(timeout_s), "-e", csv_path, "-r"]
    if keepalive:
        argv.append("-k")
    return [*argv, url]


def run_load(bed, tool, workload, duration, connections, lua=None, check=False):
    """One bounded load run from the client namespace; returns (parsed, cpu dict)."""
    wl = WORKLOADS[workload]
    url = bed.url(wl["file"])
    if tool == "wrk":
        argv = wrk_argv(url, duration, connections, wl["keepalive"],
                        lua["check" if check else "plain"],
                        args=(bed.files[wl["file"]]["path"],) if check else ())
    elif tool == "ab":
        csv_path = os.path.join(bed.workdir, "ab.csv")
        argv = ab_argv(url, duration, connections, wl["keepalive"], csv_path)
    else:
        raise ValueError(f"unknown tool {tool!r}")
    mb_pids = [pid for _, pid in bed.middlebox]
    from .bed import ns_pids
    sample = CpuSample(mb_pids, ns_pids(bed.ns["srv"]), bed.started_pids)
    client_ns = bed.netns_inode("cli")
    sample.start()
    r = bed.exec("cli", argv, timeout=duration + 30, check=False)
    cpu = sample.stop(client_ns)
    out = r.stdout.decode(errors="replace")
    if r.returncode != 0 and tool == "wrk":
        raise RuntimeError(f"{' '.join(argv)}: exit {r.returncode}: "
                           f"{r.stderr.decode(errors='replace')[-2000:]}")
    if tool == "wrk":
        res = parse_wrk(out)
    else:
        try:
            with open(csv_path) as fh:
                csv_text = fh.read()
        except FileNotFoundError:
            csv_text = ""
        res = parse_ab(out, csv_text)
        if r.returncode != 0:
            res["errors"]["exit"] = r.returncode or 1
            res["stderr"] = r.stderr.decode(errors="replace")[-500:]
    res["argv"] = argv
    return res, cpu


def response_length(bed, workload):
    """Bytes of one response (headers + body) as the load tool gets it on this path."""
    wl = WORKLOADS[workload]
    hdr = [] if wl["keepalive"] else ["-H", "Connection: close"]
    r = bed.exec("cli", ["curl", "-s", "-i", "--max-time", "5", "-o", "/dev/null", "-w",
                         "%{size_header} %{size_download} %{http_code}", *hdr,
                         bed.url(wl["file"])], timeout=10)
    h, b, code = r.stdout.decode().split()
    if code != "200":
        raise RuntimeError(f"{bed.url(wl['file'])}: HTTP {code}")
    return int(h) + int(b)


def length_check(res, resp_len, connections):
    """wrk counts the bytes it read: complete responses of the right length add up to
    ``requests × length``, plus at most one unfinished response per connection."""
    lo = res["requests"] * resp_len
    hi = (res["requests"] + connections) * resp_len
    return lo <= res["bytes"] <= hi


def fetch_digest(bed, name, timeout=60.0):
    """Download ``name`` through the middlebox with curl, hashing the body as it
    streams in; {"http", "size", "sha256", "ok", ...}."""
    p = subprocess.Popen(["ip", "netns", "exec", bed.ns["cli"], "curl", "-s", "-S",
                          "--max-time", f"{timeout:g}", "-o", "-",
                          "-w", "%{stderr}\\nHTTP %{http_code}\\n", bed.url(name)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    h = hashlib.sha256()
    size = 0
    try:
        while True:
            chunk = p.stdout.read1(1 << 20)
            if not chunk:
                break
            h.update(chunk)
            size += len(chunk)
        err = p.stderr.read().decode(errors="replace")
        p.wait(timeout=timeout + 5)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    m = re.search(r"^HTTP (\d+)$", err, re.M)
    code = int(m.group(1)) if m else None
    f = bed.files[name]
    return {"file": name, "http": code, "size": size, "sha256": h.hexdigest(),
            "curl_exit": p.returncode,
            "ok": code == 200 and size == f["size"] and h.hexdigest() == f["sha256"]
            and p.returncode == 0}


def correctness_pass(bed, lua, workloads, connections, seconds=1.0):
    """Correctness under load: for each workload a checked wrk run (every response's
    status and body compared with the file) while the big file is downloaded through
    the middlebox and its SHA-256 compared; plus each small file fetched by curl four
    times (both backends) with its digest checked.  Every checksum leaving the
    middlebox is verified by its receiver, offloads on or off
    (``Bed.checksums_verified``)."""
    with bed.checksums_verified():
        out = _checked_load(bed, lua, workloads, connections, seconds)
    out["checksums_verified"] = True
    return out


def _checked_load(bed, lua, workloads, connections, seconds):
    out = {"fetches": [], "checked_runs": [], "big": []}
    for name in ("64", "8k"):
        for _ in range(4):
            out["fetches"].append(fetch_digest(bed, name, timeout=10))
    for wl in workloads:
        box = {}
        t = threading.Thread(target=lambda b=box: b.update(fetch_digest(bed, "big")))
        t.start()
        try:
            res, _ = run_load(bed, "wrk", wl, seconds, connections, lua=lua, check=True)
        except netns.NetnsError as exc:
            # wrk hung (connections that never complete): a failed check, not a crash
            res = {"requests": 0, "errors": {}, "error": str(exc)}
        finally:
            t.join(timeout=90)
        run = {"workload": wl, "requests": res["requests"], "errors": res["errors"],
               "ok": error_total(res["errors"]) == 0 and res["requests"] > 0}
        if "error" in res:
            run["error"] = res["error"]
        out["checked_runs"].append(run)
        out["big"].append(box or {"file": "big", "ok": False, "error": "no result"})
    out["ok"] = (all(f["ok"] for f in out["fetches"]) and all(c["ok"] for c in
                 out["checked_runs"]) and all(b["ok"] for b in out["big"]))
    return out
