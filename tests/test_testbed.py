"""The load test bed (benchmarks/testbed): its parsers and accounting everywhere, and a
short smoke run of each mode as root.

The smoke runs need root, ``ip netns`` and nginx, HAProxy, wrk, ab, curl, nftables and
ethtool: in CI (``CI=true``, root) a missing prerequisite is a failure, elsewhere a
skip that says why.  The mbx modes run only when mbx has the AF_PACKET port
(``open_input("afpacket:IF0,IF1")``), else they are skipped with that reason.
"""
import json
import os
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

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
    assert f"argument {option}: '{value}': must be at least" in r.stderr


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


# -- smoke runs as root ---------------------------------------------------------------------
def _prereq(modes):
    reason = tb.unavailable(modes)
    if reason:
        if os.environ.get("CI") == "true" and "afpacket" not in reason:
            pytest.fail(f"CI runs the test bed, but {reason}")
        pytest.skip(f"test bed ({', '.join(modes)}): {reason}")


def _smoke(tmp_path, modes, workloads="close-64,ka-8k", extra=()):
    out = tmp_path / "tb.json"
    argv = [sys.executable, "-m", "benchmarks.testbed", "run", "--mode", ",".join(modes),
            "--workload", workloads, "--runs", "1", "--duration", "1", "--connections",
            "4", "--gap", "0.2", "--check-seconds", "1", "--check-connections", "2",
            "--big-size", "8M", "--json", str(out), *extra]
    p = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL)
    try:
        stdout, stderr = p.communicate(timeout=40 * len(modes))
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
