"""The load test bed (benchmarks/testbed): its parsers and accounting everywhere, and a
short smoke run of each mode as root.

The smoke runs need root, ``ip netns`` and nginx, HAProxy, wrk, ab, curl, nftables and
ethtool: in CI (``CI=true``, root) a missing prerequisite is a failure, elsewhere a
skip that says why.  The mbx modes run only when mbx has the AF_PACKET port
(``open_input("afpacket:IF0,IF1")``), else they are skipped with that reason.
"""
import glob
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mbxtest import skip_or_fail_in_ci

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from benchmarks.testbed import __main__ as cli  # noqa: E402
from benchmarks.testbed import bed as tb  # noqa: E402
from benchmarks.testbed import load, report, runner  # noqa: E402

WRK_OUT = """Running 1s test @ http://198.18.3.1:80/64.bin
  1 threads and 4 connections
MBXJSON {"requests":1000,"duration_us":1000000,"bytes":300000,"connect":0,"read":1,\
"write":0,"status":2,"timeout":0,"p50_us":120.0,"p90_us":300.0,"p99_us":900.5,\
"max_us":2000.0,"mean_us":150.0,"bad":0}
"""

AB_OUT = """Concurrency Level:      4
Time taken for tests:   2.000 seconds
Complete requests:      5000
Failed requests:        3
   (Connect: 0, Receive: 1, Length: 2, Exceptions: 0)
Non-2xx responses:      4
Total transferred:      1500000 bytes
Requests per second:    2500.00 [#/sec] (mean)
Time per request:       1.600 [ms] (mean)
"""
AB_CSV = "Percentage served,Time in ms\n0,0.100\n50,1.250\n99,7.500\n100,9.000\n"


def test_parse_wrk():
    r = load.parse_wrk(WRK_OUT)
    assert r["requests"] == 1000 and r["rps"] == pytest.approx(1000.0)
    assert (r["p50_us"], r["p99_us"]) == (120.0, 900.5)
    assert r["errors"]["non2xx"] == 2 and r["errors"]["read"] == 1
    assert load.error_total(r["errors"]) == 3
    with pytest.raises(ValueError):
        load.parse_wrk("wrk: connection refused\n")


def test_parse_ab():
    r = load.parse_ab(AB_OUT, AB_CSV)
    assert r["requests"] == 5000 and r["rps"] == pytest.approx(2500.0)
    assert (r["p50_us"], r["p99_us"]) == (1250.0, 7500.0)
    assert r["errors"]["length"] == 2 and r["errors"]["non2xx"] == 4
    assert load.error_total(r["errors"]) == 7  # "failed" is the sum of the others


def test_length_check_and_per_request():
    res = {"requests": 100, "bytes": 100 * 300 + 150}
    assert load.length_check(res, 300, connections=4)
    assert not load.length_check({"requests": 100, "bytes": 100 * 299}, 300, 4)
    cpu = {"middlebox_s": 0.01, "servers_s": 0.02, "client_s": 0.03, "others_s": 0.5,
           "machine_busy_s": 0.6, "machine_softirq_s": 0.04, "wall_s": 1.0}
    us = load.per_request_us(cpu, 1000)
    assert us["middlebox"] == pytest.approx(10.0)
    assert us["unattributed"] == pytest.approx(40.0)
    assert us["bed"] == pytest.approx(100.0)
    kernel = dict(cpu, middlebox_s=None)
    assert load.per_request_us(kernel, 1000)["middlebox"] is None


def test_summarize_median_min_max():
    rows = []
    for i, rps in enumerate((10.0, 30.0, 20.0)):
        rows.append({"mode": "kernel", "tool": "wrk", "workload": "ka-64", "round": i,
                     "requests": 10, "rps": rps, "p50_us": 1.0, "p99_us": 2.0,
                     "errors": {"non2xx": 0}, "others_cpus": 0.1,
                     "cpu_us_per_req": {"middlebox": None, "machine_busy": 5.0, "bed": 4.0,
                                        "unattributed": 1.0, "machine_softirq": 0.5}})
    (s,) = runner.summarize(rows)
    assert s["rps"] == {"median": 20.0, "min": 10.0, "max": 30.0}
    assert s["mb_cpu_us"] is None and s["runs"] == 3 and s["errors_total"] == 0
    assert "| keep-alive, 64 B | wrk | kernel forwarding" in report.markdown({"summary": [s]})


def test_a_command_that_hangs_is_an_error_naming_it():
    with pytest.raises(tb.TestbedError, match="sleep 5: still running after 0.2 s"):
        tb.run(["sleep", "5"], timeout=0.2, check=False)


@pytest.mark.parametrize("option, value", [("--runs", "0"), ("--duration", "0"),
                                           ("--connections", "0"), ("--gap", "-1"),
                                           ("--check-seconds", "nan")])
def test_run_options_out_of_range_are_refused(option, value):
    r = subprocess.run([sys.executable, "-m", "benchmarks.testbed", "run", "--mode",
                        "kernel", option, value], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    why = "must be a finite number" if value == "nan" else "must be at least"
    assert f"argument {option}: '{value}': {why}" in r.stderr


def test_failed_checks_are_named():
    chk = {"fetches": [{"file": "64", "ok": True}, {"file": "8k", "ok": False}],
           "checked_runs": [{"workload": "ka-8k", "ok": False, "error": "wrk: hung"},
                            {"workload": "close-64", "ok": True}],
           "big": [{"file": "big", "ok": False}]}
    assert runner._check_failures(chk) == ("8k fetch, checked ka-8k load: wrk: hung, "
                                           "big download")


def test_haproxy_config():
    bed = tb.Bed("haproxy", workdir="/nonexistent", http_reuse="never")
    cfg = bed.haproxy_config()
    assert "nbthread 1" in cfg and f"maxconn {tb.HAPROXY_MAXCONN}" in cfg
    assert "mode http" in cfg and "http-reuse never" in cfg
    assert f"bind {tb.VIP}:80" in cfg
    assert tb.HAPROXY_MAXCONN <= 9000  # the open-files limit here is 20000
    tcp = tb.Bed("haproxy", workdir="/nonexistent", haproxy_mode="tcp").haproxy_config()
    assert "mode tcp" in tcp and "http-reuse" not in tcp


def test_mbx_command_spec_strings():
    bed = tb.Bed("mbx-l4lb", workdir="/w")
    bed.mb_json = "/w/mbx.json"
    argv = bed.mbx_command()
    i = argv.index("run")
    assert argv[i + 1] == "l4lb"
    assert argv[argv.index("--in") + 1] == "afpacket:m-cli,m-srv"
    assert argv[argv.index("--out") + 1] == "afpacket:m-cli,m-srv"
    assert "l4lb.vip=198.18.3.1:80" in argv
    assert "l4lb.backends=198.18.2.1:80,198.18.2.2:80" in argv
    assert "--duration" in argv and "--json" in argv
    l2 = tb.Bed("mbx-l2fwd", workdir="/w")
    l2.mb_json = "/w/mbx.json"
    assert l2.mbx_command()[i + 1] == "l2fwd" and l2.target_ip == tb.BACKENDS[0]
    assert bed.target_ip == tb.VIP
    dpdk = tb.Bed("mbx-l4lb-dpdk", workdir="/w")
    dpdk.mb_json = "/w/mbx.json"
    argv = dpdk.mbx_command()
    assert argv[argv.index("--in") + 1] == argv[argv.index("--out") + 1] == (
        "dpdk:net_af_packet0,iface=m-cli,framecnt=2048+"
        f"net_af_packet1,iface=m-srv,framecnt=2048?idle_us={tb.DPDK_IDLE_US}")
    assert "l4lb.vip=198.18.3.1:80" in argv and dpdk.target_ip == tb.VIP


def test_afpacket_missing_is_a_clear_error(monkeypatch):
    from mbx import ports
    monkeypatch.setattr(ports, "KNOWN_SCHEMES", ("pcap",))
    reason = tb.afpacket_unavailable()
    assert reason.startswith("mbx was built without the afpacket port")
    with pytest.raises(tb.TestbedError, match="built without the afpacket port"):
        tb.Bed("mbx-l2fwd")._start_mbx()


def test_bridge_modes_without_offload_metadata_refuse_offloads():
    for mode in ("pybridge", "mbx-l4lb-dpdk"):
        with pytest.raises(tb.TestbedError, match="offloads must be off"):
            tb.Bed(mode, offloads=True)


def test_offloads_on_give_mbx_bridges_the_offloads_port_option():
    bed = tb.Bed("mbx-l4lb", workdir="/w", offloads=True, mbx_port="ring=v2")
    bed.mb_json = "/w/mbx.json"
    argv = bed.mbx_command()
    assert argv[argv.index("--in") + 1] == "afpacket:m-cli,m-srv?ring=v2&offloads=1"
    bed = tb.Bed("mbx-l2fwd", workdir="/w", offloads=True)
    bed.mb_json = "/w/mbx.json"
    assert bed.mbx_command()[bed.mbx_command().index("--out") + 1] == (
        "afpacket:m-cli,m-srv?offloads=1")


def _refused(monkeypatch, capsys, argv):
    """``argv`` is refused by argparse-style checks (rc 2) before any probe of root,
    tools or namespaces; returns the error text."""
    def probe(*a):
        raise AssertionError("probed the machine before refusing the options")
    monkeypatch.setattr(tb, "unavailable", probe)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    assert exc.value.code == 2
    return capsys.readouterr().err


@pytest.mark.parametrize("option, value, why", [
    ("--duration", "inf", "must be a finite number"),
    ("--gap", "inf", "must be a finite number"),
    ("--check-seconds", "inf", "must be a finite number"),
    ("--quiet-wait", "inf", "must be a finite number"),
    ("--duration", "1e300", "must be at most 86400"),
    ("--quiet-wait", "86401", "must be at most 86400"),
    ("--runs", "1e9", "is not a number"),
    ("--big-size", "infk", "must be from 1 byte to 1G"),
    ("--big-size", "-5k", "must be from 1 byte to 1G"),
    ("--big-size", "2G", "must be from 1 byte to 1G"),
    ("--big-size", "lots", "is not a size"),
    ("--mode", ",", "no modes given"),
    ("--workload", ",", "no workloads given"),
    ("--tool", ",", "no tools given"),
    ("--workload", "ka-64,nope", "unknown workloads: nope"),
])
def test_run_options_refused_at_parse(monkeypatch, capsys, option, value, why):
    err = _refused(monkeypatch, capsys, ["run", f"{option}={value}"])
    assert f"argument {option}: " in err and why in err, err


def test_sizes_and_selections_parse():
    assert cli._size("32M") == 32 << 20 and cli._size("1GiB") == 1 << 30
    assert cli._size("512k") == 512 << 10 and cli._size("100") == 100
    assert cli._selection(tb.MODES, "modes")("kernel, kernel,haproxy") == ["kernel",
                                                                           "haproxy"]
    assert cli._selection(tb.MODES, "modes")("all") == list(tb.MODES)


def test_mbx_nf_is_said_to_be_for_every_l4lb_mode():
    # the help and docs/testbed.md named mbx-l4lb only; the code takes both
    import argparse

    ap = argparse.ArgumentParser()
    cli._add_bed_options(ap)
    help_text = next(a.help for a in ap._actions if "--mbx-nf" in a.option_strings)
    with open(os.path.join(ROOT, "docs", "testbed.md")) as fh:
        doc = " ".join(fh.read().split())
    said = doc[doc.index("`--mbx-nf NF` runs"):][:120]
    words = help_text.replace(":", " ").split()
    assert len(tb.L4LB_MODES) == 2
    for mode in tb.L4LB_MODES:
        assert mode in words and f"`{mode}`" in said


def test_offloads_points_to_the_guide_section_that_explains_it():
    # it pointed to "Ports"; the virtio-net header text is under "Run an application"
    import re

    with open(os.path.join(ROOT, "docs", "testbed.md")) as fh:
        doc = fh.read()
    bullet = doc[doc.index("- **`--offloads on`**"):]
    section = re.search(r'\(guide: "([^"]+)"', bullet[:bullet.index("\n- ")]).group(1)
    with open(os.path.join(ROOT, "docs", "guide.md")) as fh:
        guide = fh.read()
    body = re.split(r"\n#+ ", guide.split(f"\n## {section}\n", 1)[1], maxsplit=1)[0]
    assert "`offloads=1`" in body and "virtio-net header" in body


@pytest.mark.parametrize("argv, why", [
    (["run", "--mode", "kernel,pybridge", "--offloads", "on"], "offloads must be off"),
    (["run", "--mode", "mbx-l4lb-dpdk", "--offloads", "on"], "offloads must be off"),
    (["run", "--mode", "mbx-l4lb", "--mbx-nf", "/nonexistent/nf.py"], "no such file"),
    (["run", "--mode", "mbx-l4lb", "--mbx-nf", "nosuchnf"], "not a built-in NF"),
    (["run", "--mode", "kernel", "--mbx-nf", "l4lb"], "none of which is selected"),
    (["run", "--mode", "mbx-l4lb", "--mbx-port", "bogus=1"], "unknown option 'bogus'"),
    (["run", "--mode", "mbx-l4lb-dpdk", "--mbx-port", "ring=v3"], "known: idle_us"),
    # values, not only keys, as mbx.ports checks them when mbx opens the bridge
    (["run", "--mode", "mbx-l2fwd", "--mbx-port", "ring=v9"],
     "ring 'v9' is not one of v2, v3"),
    (["run", "--mode", "mbx-l4lb", "--mbx-port", "fanout=70000"],
     "bad value '70000' for fanout"),
    (["run", "--mode", "mbx-l2fwd", "--mbx-port", "promisc=maybe"],
     "use 1/0, yes/no, true/false, on/off"),
    (["run", "--mode", "mbx-l2fwd", "--mbx-port", "ring=v3&retire_ms=0"],
     "retire_ms must be at least 1 with ring v3"),
    (["run", "--mode", "mbx-l4lb", "--offloads", "on", "--mbx-port", "frame_size=2048"],
     "offloads: super-frames of up to 64 KiB must fit whole"),
    (["run", "--mode", "mbx-l4lb-dpdk", "--mbx-port", "idle_us=99999999999"],
     "bad value '99999999999' for idle_us"),
    (["run", "--mode", "mbx-l4lb-dpdk", "--mbx-port", "link_wait=soon"],
     "bad value 'soon' for link_wait"),
    (["run", "--mode", "kernel", "--json", "/nonexistent-dir/tb.json"],
     "directory /nonexistent-dir does not exist"),
    (["run", "--mode", "kernel", "--json", "/"], "is a directory"),
    (["setup", "--tag", "aud3 x"], "a tag is 1-32 letters"),
    (["setup", "--tag", "x" * 33], "a tag is 1-32 letters"),
    (["setup", "--tag=-x"], "a tag is 1-32 letters"),
    (["setup", "--tag", "mbxt123"], "kept for the namespaces of runs"),
    (["teardown", "--tag", "../etc"], "a tag is 1-32 letters"),
    (["report", "x.json", "--plot", "/nonexistent-dir/x.png"], "does not exist"),
])
def test_mode_and_output_preconditions_refused_before_work(monkeypatch, capsys, argv, why):
    assert why in _refused(monkeypatch, capsys, argv)


def test_every_mode_s_problems_are_named_at_once(monkeypatch, capsys):
    # only the first was: fixing it only to be told the next took a run each
    assert {"mbx-l4lb", "mbx-l4lb-dpdk"} <= set(tb.L4LB_MODES)
    err = _refused(monkeypatch, capsys, ["run", "--mode", "pybridge,mbx-l4lb,mbx-l4lb-dpdk",
                                         "--mbx-nf", "/nonexistent/nf.py",
                                         "--offloads", "on"])
    assert "mode pybridge bridges raw frames" in err and "no such file" in err
    assert err.count("no such file") == 1       # both L4 LB modes run it: said once


def _row(mode, rps, runs=3, tool="wrk", workload="ka-64", failed=0):
    m = None if rps is None else {"median": rps, "min": rps, "max": rps}
    return {"mode": mode, "tool": tool, "workload": workload, "runs": runs,
            "failed_runs": failed, "requests": 0, "errors_total": 0, "rps": m,
            "p50_us": None, "p99_us": None, "mb_cpu_us": None, "bed_cpu_us": None,
            "others_cpus": None, "unattributed_cpu_us": None}


def test_report_ratio_is_na_when_kernel_has_no_throughput():
    table = report.markdown({"summary": [_row("kernel", 0.0), _row("haproxy", 500.0)]})
    haproxy = next(line for line in table.splitlines() if "HAProxy" in line)
    assert haproxy.split("|")[5].strip() == "n/a"
    table = report.markdown({"summary": [_row("kernel", 100.0), _row("haproxy", 50.0),
                                         _row("mbx-l4lb", None, runs=0, failed=1)]})
    assert "| 0.50 |" in table and "1 runs failed" in table


@pytest.mark.parametrize("content, why", [
    (None, "No such file"), ("{not json", "not a JSON file"),
    ('{"results": []}', "no 'summary' list"), ("[1, 2]", "no 'summary' list")])
def test_report_bad_files_are_one_line_errors(tmp_path, capsys, content, why):
    path = tmp_path / "r.json"
    if content is not None:
        path.write_text(content)
    assert cli.main(["report", str(path)]) == 2
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_report_plot_refuses_an_empty_summary(tmp_path, capsys):
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"summary": [], "complete": False}))
    assert cli.main(["report", str(path), "--plot", str(tmp_path / "p.png")]) == 2
    assert "nothing to plot" in capsys.readouterr().err
    assert not (tmp_path / "p.png").exists()


def test_report_merge_keeps_the_configuration_and_counts_runs_per_panel():
    a = {"summary": [_row("kernel", 1.0, runs=3)], "config": {"offloads": True}}
    b = {"summary": [_row("kernel", 1.0, runs=5, tool="ab")], "config": {"offloads": True}}
    assert report.merge([a])["config"]["offloads"] is True
    assert report.merge([a, b])["config"] == {"offloads": True}
    assert report.merge([a, dict(b, config={})])["config"] == {"offloads": "mixed"}
    assert report._runs_label([_row("kernel", 1.0, runs=3)]) == "median of 3"
    assert report._runs_label([_row("kernel", 1.0, runs=3),
                               _row("haproxy", 1.0, runs=2)]) == "median of 2-3"


class _FakeBed:
    """Bed's face as the runner sees it, with no namespaces."""

    def __init__(self, mode, **kw):
        self.mode, self.workdir, self.started_pids = mode, "/nonexistent", [1]
        self.procs, self.middlebox, self.mb_counters = [], [], None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass

    def stop_middlebox(self):
        pass


def _fake_matrix(monkeypatch, run_load):
    monkeypatch.setattr(runner.tb, "Bed", _FakeBed)
    monkeypatch.setattr(runner, "machine_info", lambda: {})
    monkeypatch.setattr(runner, "write_lua", lambda workdir: {})
    monkeypatch.setattr(runner, "correctness_pass",
                        lambda *a, **kw: {"ok": True, "fetches": [], "checked_runs": [],
                                          "big": []})
    monkeypatch.setattr(runner, "response_length", lambda bed, wl: 300)
    monkeypatch.setattr(runner, "_conntrack_guard", lambda bed, notes: None)
    monkeypatch.setattr(runner, "run_load", run_load)


def _fake_result(requests=100):
    cpu = {"middlebox_s": 0.01, "servers_s": 0.01, "client_s": 0.01, "others_s": 0.0,
           "machine_busy_s": 0.04, "machine_softirq_s": 0.0, "wall_s": 1.0}
    return ({"requests": requests, "rps": float(requests), "p50_us": 1.0, "p99_us": 2.0,
             "bytes": requests * 300, "errors": {"non2xx": 0}}, cpu)


def test_failed_runs_are_recorded_and_every_run_is_saved(monkeypatch, tmp_path):
    def run_load(bed, tool, wl, duration, connections, lua=None):
        if wl == "close-64":
            raise tb.TestbedError("ip netns exec mbxt1-cli wrk ...: still running after "
                                  "32 s, stopped")
        if wl == "ka-8k":
            raise ValueError("ab output has no 'Complete requests'")
        return _fake_result()

    _fake_matrix(monkeypatch, run_load)
    out = tmp_path / "tb.json"
    saves = []

    def save(doc):
        runner.write_json(str(out), doc)
        saves.append(json.loads(out.read_text()))

    doc = runner.run_matrix(["kernel"], ["close-64", "ka-64", "ka-8k"], runs=1,
                            duration=1, gap=0, log=lambda m: None, save=save)
    assert [r["workload"] for r in doc["results"]] == ["ka-64"]
    assert [(f["workload"], f["stage"]) for f in doc["failed_runs"]] == [
        ("close-64", "load"), ("ka-8k", "load")]
    assert "still running after 32 s" in doc["failed_runs"][0]["error"]
    assert doc["complete"] and not doc["ok"]
    assert all(not s["complete"] for s in saves[:-1]) and saves[-1]["complete"]
    assert len(saves) >= 4   # the check, each run or failure, the end
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc))
    rows = {r["workload"]: r for r in doc["summary"]}
    assert rows["close-64"]["failed_runs"] == 1 and rows["close-64"]["rps"] is None
    assert rows["ka-64"]["runs"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["tb.json"]  # no temporary left


def test_an_interrupted_matrix_keeps_what_was_measured(monkeypatch, tmp_path):
    calls = []

    def run_load(bed, tool, wl, duration, connections, lua=None):
        calls.append(wl)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return _fake_result()

    _fake_matrix(monkeypatch, run_load)
    out = tmp_path / "tb.json"
    with pytest.raises(KeyboardInterrupt):
        runner.run_matrix(["kernel"], ["ka-64", "ka-8k"], runs=1, duration=1, gap=0,
                          log=lambda m: None,
                          save=lambda doc: runner.write_json(str(out), doc))
    doc = json.loads(out.read_text())
    assert doc["complete"] is False and doc["stopped"] == "interrupted (SIGINT)"
    assert [r["workload"] for r in doc["results"]] == ["ka-64"]
    assert not doc["ok"] and doc["summary"][0]["runs"] == 1


def test_a_failed_setup_is_recorded_and_the_next_mode_runs(monkeypatch):
    class Broken(_FakeBed):
        def __enter__(self):
            if self.mode == "haproxy":
                raise tb.TestbedError("haproxy exited 1: bad config")
            return self

    _fake_matrix(monkeypatch, lambda *a, **kw: _fake_result())
    monkeypatch.setattr(runner.tb, "Bed", Broken)
    doc = runner.run_matrix(["haproxy", "kernel"], ["ka-64"], runs=1, duration=1, gap=0,
                            log=lambda m: None)
    assert [(f["mode"], f["stage"]) for f in doc["failed_runs"]] == [("haproxy",
                                                                       "setting up")]
    assert [r["mode"] for r in doc["results"]] == ["kernel"] and not doc["ok"]


def test_mbx_budget_covers_the_quiet_wait():
    base = runner.mbx_budget(["ka-64"], ["wrk"], 2, 1, 1, 0)
    waited = runner.mbx_budget(["ka-64", "ka-8k"], ["wrk"], 2, 1, 1, 100)
    assert waited >= runner.mbx_budget(["ka-64", "ka-8k"], ["wrk"], 2, 1, 1, 0) + 200
    assert base >= 2 + 1 + 30   # a run at its time-out


def test_wait_quiet_says_it_waits(monkeypatch):
    busy = iter([1.0, 1.0, 0.1])
    monkeypatch.setattr(load, "background_cpus", lambda window: next(busy))
    monkeypatch.setattr(load.time, "sleep", lambda s: None)
    said = []
    assert load.wait_quiet(30, window=0.0, log=said.append, every=0) == 0.1
    assert said and "waiting up to" in said[0] and "CPUs busy" in said[0]


def test_setup_bridge_has_no_time_limit():
    bed = tb.Bed("mbx-l4lb", workdir="/w", mbx_duration=0)
    bed.mb_json = "/w/mbx.json"
    assert "--duration" not in bed.mbx_command()


def test_signals_held_until_the_block_ends():
    done = []
    with pytest.raises(KeyboardInterrupt):
        with tb.signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            done.append(1)
    assert done == [1]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def _sleeper():
    return subprocess.Popen(["sleep", "30"], stdin=subprocess.DEVNULL)


def test_teardown_signals_only_the_recorded_process(monkeypatch, tmp_path):
    monkeypatch.setattr(tb, "delete_ns", lambda ns: None)
    p = _sleeper()
    try:
        start = tb.netns.proc_start(p.pid)
        assert start is not None and tb.same_process(p.pid, start)
        assert not tb.same_process(p.pid, start + 1)
        state = tmp_path / "t.json"
        st = {"tag": "t", "ns": {"cli": "t-cli"}, "workdir": str(tmp_path / "nope"),
              "own_workdir": True, "pids": [["nginx0", p.pid, start + 1]]}
        state.write_text(json.dumps(st))
        got = tb.teardown_state(str(state))
        assert got["skipped"] == [["nginx0", p.pid, "another process has that PID now"]]
        assert p.poll() is None and not state.exists()
        state.write_text(json.dumps(dict(st, pids=[["nginx0", p.pid, start]])))
        assert tb.teardown_state(str(state))["stopped"] == [["nginx0", p.pid]]
        assert p.wait(timeout=10) is not None
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()


def test_stale_workdirs_are_removed_only_when_ours_and_their_owner_is_gone(tmp_path):
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = _sleeper()
    try:
        dead_dir = tmp_path / f"mbx-testbed-{gone.pid}-abcd_123"
        live_dir = tmp_path / f"mbx-testbed-{alive.pid}-abcd_123"
        bare = tmp_path / f"mbx-testbed-{gone.pid}-zzzzzzzz"     # no owner record
        other = tmp_path / "mbx-testbed-jh1tr8yc"                 # not named after a PID
        wrong = tmp_path / f"mbx-testbed-{gone.pid}-wrongpid"     # record names another
        for d in (dead_dir, live_dir, bare, other, wrong):
            d.mkdir()
            (d / "www").mkdir()
        tb.write_owner(str(dead_dir), gone.pid)
        tb.write_owner(str(live_dir), alive.pid)
        tb.write_owner(str(other), gone.pid)
        tb.write_owner(str(wrong), alive.pid)
        assert tb.reap_workdirs(str(tmp_path)) == [str(dead_dir)]
        assert not dead_dir.exists()
        assert all(d.exists() for d in (live_dir, bare, other, wrong))
    finally:
        alive.kill()
        alive.wait()


# -- smoke runs as root ---------------------------------------------------------------------
def _prereq(modes):
    reason = tb.unavailable(modes)
    if reason:
        # the afpacket port is always built: CI has no excuse for any of these
        skip_or_fail_in_ci(f"test bed ({', '.join(modes)}): {reason}", "the test bed")


def _smoke(tmp_path, modes, workloads="close-64,ka-8k", extra=()):
    out = tmp_path / "tb.json"
    argv = [sys.executable, "-m", "benchmarks.testbed", "run", "--mode", ",".join(modes),
            "--workload", workloads, "--runs", "1", "--duration", "1", "--connections",
            "4", "--gap", "0.2", "--check-seconds", "1", "--check-connections", "2",
            "--big-size", "8M", "--json", str(out), *extra]
    p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    try:
        # a bound, not a speed check: a loaded machine once took longer than 40 s
        stdout, stderr = p.communicate(timeout=90 * len(modes))
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGINT)        # the bed cleans up and keeps its JSON
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert out.exists(), stderr.decode(errors="replace")[-3000:]
    doc = json.loads(out.read_text())
    return p, doc, stderr.decode(errors="replace")


def _check_doc(p, doc, stderr, modes, workloads):
    assert doc["schema"] == runner.SCHEMA
    assert p.returncode == 0, stderr[-3000:]
    assert doc["ok"], stderr[-3000:]
    got = {(r["mode"], r["workload"]) for r in doc["results"]}
    assert got == {(m, w) for m in modes for w in workloads}
    for r in doc["results"]:
        for key in ("rps", "p50_us", "p99_us", "requests", "errors", "cpu",
                    "cpu_us_per_req", "length_ok"):
            assert key in r, key
        assert r["requests"] > 0 and r["rps"] > 0 and r["p99_us"] >= r["p50_us"] > 0
        assert load.error_total(r["errors"]) == 0, r["errors"]
        assert r["length_ok"]
        c = r["cpu_us_per_req"]
        assert c["bed"] > 0
        if r["mode"] == "kernel":
            assert c["middlebox"] is None  # forwarding is softirq work, in no process
        else:
            assert c["middlebox"] > 0
    for chk in doc["checks"]:
        assert chk["ok"], chk
        assert chk["checksums_verified"]
        assert all(b["ok"] and b["size"] == 8 << 20 for b in chk["big"]), chk["big"]
        assert all(c["ok"] for c in chk["checked_runs"]), chk["checked_runs"]
    for s in doc["summary"]:
        for m in ("rps", "p50_us", "p99_us", "bed_cpu_us"):
            assert set(s[m]) == {"median", "min", "max"}
    # clean-up: no namespace of that run, none of its processes
    ours = [n for n in tb.list_netns() if n.startswith(f"{tb.PREFIX}{p.pid}-")]
    assert not ours, ours
    deadline = time.monotonic() + 5
    while any(tb.pid_alive(pid) for pid in doc["pids"]) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not [pid for pid in doc["pids"] if tb.pid_alive(pid)]
    assert doc["pids"]


@pytest.mark.root
def test_smoke_kernel_haproxy_pybridge(tmp_path):
    modes = ["kernel", "haproxy", "pybridge"]
    _prereq(modes)
    p, doc, stderr = _smoke(tmp_path, modes)
    _check_doc(p, doc, stderr, modes, ["close-64", "ka-8k"])
    hap = [r for r in doc["results"] if r["mode"] == "haproxy"]
    assert all(r["cpu"]["middlebox_s"] > 0 for r in hap)


@pytest.mark.root
def test_smoke_mbx_modes(tmp_path):
    modes = ["mbx-l2fwd", "mbx-l4lb"]
    _prereq(modes)
    p, doc, stderr = _smoke(tmp_path, modes, "close-64")
    _check_doc(p, doc, stderr, modes, ["close-64"])
    assert {c["mode"] for c in doc["middlebox_counters"]} == set(modes)


@pytest.mark.root
def test_smoke_mbx_l4lb_with_offloads_checks_checksums(tmp_path):
    # Offloads on: the bridge carries super-frames and partial checksums, and the
    # correctness pass has the kernel finish every checksum leaving the middlebox in
    # software so that the receivers verify the L4 LB's updates of them (a wrong
    # one stalls the connection and fails the checks).
    modes = ["mbx-l4lb"]
    _prereq(modes)
    p, doc, stderr = _smoke(tmp_path, modes, "close-64,ka-8k", extra=["--offloads", "on"])
    _check_doc(p, doc, stderr, modes, ["close-64", "ka-8k"])
    assert doc["config"]["offloads"] is True
    [mc] = doc["middlebox_counters"]
    sides = mc["counters"]["ports"]["in"]
    assert sides["client"]["rx_csum_partial"] > 0 and sides["server"]["rx_gso"] > 0


@pytest.mark.root
def test_smoke_mbx_l4lb_over_dpdk_net_af_packet(tmp_path):
    # The L4 LB bridging the veths through DPDK's own AF_PACKET driver (a DpdkBridge)
    # instead of mbx's port: the same checks (every response, the big file's
    # SHA-256), both devices carried traffic, nothing went to a third port.
    modes = ["mbx-l4lb-dpdk"]
    _prereq(modes)
    p, doc, stderr = _smoke(tmp_path, modes)
    _check_doc(p, doc, stderr, modes, ["close-64", "ka-8k"])
    [mc] = doc["middlebox_counters"]
    ports = mc["counters"]["ports"]["in"]
    assert ports["client"]["rx_pkts"] > 0 and ports["server"]["rx_pkts"] > 0
    assert ports["client"]["tx_pkts"] > 0 and ports["server"]["tx_pkts"] > 0
    assert ports["misrouted"] == 0


def _comm(pid):
    # the name of a process that may leave at any moment (the checks' curls do)
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None


@pytest.mark.root
def test_interrupted_run_cleans_up(tmp_path):
    _prereq(["kernel"])
    argv = [sys.executable, "-m", "benchmarks.testbed", "run", "--mode", "kernel",
            "--workload", "ka-64", "--runs", "1", "--duration", "20", "--connections",
            "2", "--check-seconds", "1", "--big-size", "1M"]
    p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    prefix = f"{tb.PREFIX}{p.pid}-"
    try:
        deadline = time.monotonic() + 20
        # wait until the load runs (the namespaces exist and wrk is in the client)
        while time.monotonic() < deadline:
            names = [n for n in tb.list_netns() if n.startswith(prefix)]
            if len(names) == 3 and any(_comm(pid) == "wrk"
                                       for pid in tb.ns_pids(f"{prefix}cli")):
                break
            time.sleep(0.1)
        else:
            pytest.fail("the load never started")
        p.terminate()
        p.wait(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0
    assert not [n for n in tb.list_netns() if n.startswith(prefix)]


# Deletes the namespaces slowly and says so, so that a signal lands inside clean-up.
SLOW_CLEANUP = """
import sys, time
from benchmarks.testbed import __main__ as cli, bed as tb
delete = tb.delete_ns
def slow(ns):
    print("deleting", ns, file=sys.stderr, flush=True)
    time.sleep(0.5)
    delete(ns)
tb.delete_ns = slow
sys.exit(cli.main(sys.argv[1:]))
"""


def _wait_for(p, text, timeout):
    """Read ``p``'s stderr until a line has ``text``; the lines read so far."""
    lines = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = p.stderr.readline()
        if not line:
            break
        lines.append(line)
        if text in line:
            return lines
    pytest.fail(f"never saw {text!r}: {''.join(lines)[-2000:]}")


@pytest.mark.root
def test_signals_during_cleanup_do_not_cut_it_short(tmp_path):
    # Ctrl-C in a measured run, then Ctrl-C and SIGTERM while the namespaces are being
    # deleted: clean-up still finishes, the JSON keeps what was measured (partial),
    # one line says so, rc 130.
    _prereq(["kernel"])
    out = tmp_path / "tb.json"
    p = subprocess.Popen([sys.executable, "-c", SLOW_CLEANUP, "run", "--mode", "kernel",
                          "--workload", "ka-64", "--runs", "1", "--duration", "2",
                          "--big-size", "1M", "--json", str(out)], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    prefix = f"{tb.PREFIX}{p.pid}-"
    try:
        _wait_for(p, "correctness ok", 60)
        time.sleep(0.5)
        p.send_signal(signal.SIGINT)
        _wait_for(p, "deleting", 20)
        p.send_signal(signal.SIGINT)
        time.sleep(0.1)
        p.send_signal(signal.SIGTERM)
        rest = p.stderr.read()
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 130, rest
    assert "Traceback" not in rest and "interrupted (SIGINT): cleaned up" in rest, rest
    assert not [n for n in tb.list_netns() if n.startswith(prefix)]
    doc = json.loads(out.read_text())
    assert doc["complete"] is False and doc["stopped"] == "interrupted (SIGINT)"
    assert not glob.glob(f"/tmp/{tb.WORKDIR_PREFIX}{p.pid}-*")


@pytest.mark.root
def test_a_killed_runs_namespaces_and_workdir_are_reaped():
    _prereq(["kernel"])
    p = subprocess.Popen([sys.executable, "-m", "benchmarks.testbed", "run", "--mode",
                          "kernel", "--workload", "ka-64", "--runs", "1", "--duration",
                          "2", "--big-size", "1M"], cwd=ROOT, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    try:
        _wait_for(p, "correctness ok", 60)
    finally:
        p.kill()
        p.wait()
    [workdir] = glob.glob(f"/tmp/{tb.WORKDIR_PREFIX}{p.pid}-*")
    tb.reap_stale()
    assert not os.path.exists(workdir)
    assert not [n for n in tb.list_netns() if n.startswith(f"{tb.PREFIX}{p.pid}-")]


@pytest.mark.root
def test_rps_is_off_on_every_veth_unless_asked_for():
    # RPS costs every mode here (docs/testbed.md), so the bed leaves it off unless
    # --rps on; with it, every veth spreads its receive work over every CPU.
    _prereq(["kernel"])
    links = [("cli", tb.IF_CLIENT), ("mb", tb.IF_MB_CLIENT), ("mb", tb.IF_MB_SERVER),
             ("srv", tb.IF_SERVER)]
    every_cpu = int(tb.cpu_mask(), 16)
    for options, want in (({}, 0), ({"rps": True}, every_cpu)):
        with tb.Bed("kernel", big_size=1 << 20, **options) as bed:
            for role, dev in links:
                mask = bed.exec(role, ["cat", f"/sys/class/net/{dev}/queues/rx-0/rps_cpus"]
                                ).stdout.decode().strip()
                assert int(mask.replace(",", ""), 16) == want, (options, role, dev, mask)


def test_a_bad_mbx_port_value_exits_2_before_the_bed_is_set_up():
    # It passed the up-front check and failed once the whole bed was set up (exit 1).
    r = subprocess.run([sys.executable, "-m", "benchmarks.testbed", "run", "--mode",
                        "mbx-l2fwd", "--mbx-port", "ring=v9"], cwd=ROOT,
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 2, r.stderr
    assert "--mbx-port 'ring=v9'" in r.stderr and "ring 'v9' is not one of v2, v3" in \
        r.stderr, r.stderr


def test_the_mbx_modes_run_the_spec_they_check():
    for mode, port, offloads in (("mbx-l4lb-dpdk", "", False),
                                 ("mbx-l4lb-dpdk", "idle_us=5", False),
                                 ("mbx-l4lb", "ring=v3", True), ("mbx-l2fwd", "", False)):
        bed = tb.Bed(mode, workdir="/w", offloads=offloads, mbx_port=port)
        argv = bed.mbx_command()
        spec = tb.mbx_bridge_spec(mode, port, offloads)
        assert argv[argv.index("--in") + 1] == argv[argv.index("--out") + 1] == spec


@pytest.mark.root
@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
def test_soak_script_runs_and_checks_what_it_says(tmp_path, deploy):
    # benchmarks/soak.py (docs/results.md, "Soak"), briefly: every slice measured,
    # memory sampled, the stream NF's report back with every stream an HTTP request.
    _prereq(["mbx-l4lb"])
    out = tmp_path / "soak.json"
    r = subprocess.run([sys.executable, "benchmarks/soak.py", "--minutes", "0.1",
                        "--slice", "2", "--connections", "4", "--deploy", deploy,
                        "--json", str(out)], cwd=ROOT, capture_output=True, text=True,
                       timeout=180, stdin=subprocess.DEVNULL)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert r.stdout.rstrip().endswith("soak: ok")
    doc = json.loads(out.read_text())
    assert len(doc["slices"]) == 3 and doc["problems"] == []
    assert doc["growth_second_half_mib"] is None       # 6 s: all warm-up, not checked
    assert "growth not checked" in r.stdout
    for row in doc["slices"]:
        assert row["rps"] > 0 and row["errors"] == 0
        assert row["anon_mib"] > 0 and row["processes"] == (1 if deploy == "inline" else 3)
    report = doc["final_counters"]["nfs"]["streams"]["report"]
    assert report["streams"] > 0 and report["bytes"] > 0 and report["not_http"] == 0
    assert not [n for n in tb.list_netns() if n.startswith(tb.PREFIX)]


@pytest.mark.root
def test_a_probe_namespace_left_by_a_killed_process_is_reaped():
    # netns.probe adds a namespace and deletes it; a process killed in between (a
    # suite cut short) left "<prefix><pid>-probe" behind for good: no reaper's
    # pattern matched it.  The next probe of that prefix now deletes it.
    from benchmarks.testbed import netns

    _prereq(["kernel"])
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"mbxprobetest{dead.pid}-probe"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=10)
    try:
        assert netns.probe("mbxprobetest") is None
        assert stale not in netns.list_netns()
    finally:
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, timeout=10)
