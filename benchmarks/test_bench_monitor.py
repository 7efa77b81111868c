"""Micro benchmarks of the TCP Monitor, each beside its baseline (same group); the
session ends with the ratios (see conftest.py).  ``monitor_figures.py`` makes the
full-size figures.

The assertions check what ran (packets, connections, digests), never how fast.
"""
import json

import captures
import pytest
import reassemblers
from bench_records import FIGURES, MEDIANS
from monitor_figures import (
    MONITOR_SLOT_ARRAYS,
    check_tcpflow,
    mbx_cli,
    monitor_alone,
    snapshot_figures,
    tcpflow,
)

from mbx import _tcp
from mbx._flow import FlowTable
from mbx.flows import flows_json

BULK_MB = 4             # MB of payload in each bulk capture
TCP64_FLOWS = 5_000     # 64-byte capture: flows of 10 packets each
# flows_json sized for these captures: its default (1 M flows, as ``mbx flows``) would
# make the micro figures mostly the allocation of that table (~0.1 s each run).
CAPACITY = 1 << 12


def _flows_json(path):
    return flows_json(path, flow_capacity=CAPACITY)


@pytest.fixture(scope="session")
def bulk_1448():
    return captures.make_bulk_capture(BULK_MB, 1448, 8)


@pytest.fixture(scope="session")
def bulk_small():
    return captures.make_bulk_capture(BULK_MB, "small", 32)


@pytest.fixture(scope="session")
def tcp64():
    return captures.make_tcp64_capture(TCP64_FLOWS, 10)


def _payload(conns):
    return sum(r["c2s_len"] + r["s2c_len"] for r in conns.values())


@pytest.mark.benchmark(group="reassembly, 1448 B segments")
def test_flows_json_1448(benchmark, record, bulk_1448):
    doc, warnings = benchmark.pedantic(_flows_json, (bulk_1448,), rounds=5,
                                       warmup_rounds=1)
    record("mon_flows_json_1448", payload_1448=_payload(doc["connections"]))
    assert not warnings and len(doc["connections"]) == 64


@pytest.mark.benchmark(group="reassembly, 1448 B segments")
def test_dpkt_reassembler_1448(benchmark, record, bulk_1448):
    ref = benchmark.pedantic(reassemblers.reassemble, (bulk_1448,), rounds=3)
    record("mon_dpkt_1448")
    doc, _ = flows_json(bulk_1448)
    assert reassemblers.differences(doc["connections"], ref) == []


@pytest.mark.benchmark(group="reassembly, 1448 B segments")
def test_mbx_flows_process_1448(benchmark, record, bulk_1448, tmp_path):
    out = tmp_path / "flows.json"
    benchmark.pedantic(mbx_cli, (bulk_1448, str(out)), rounds=3)
    record("mon_cli_1448")
    # what the process wrote: every connection, each direction's length and SHA-256
    # as dpkt's reassembly of the capture gives them
    doc = json.loads(out.read_text())
    ref = reassemblers.reassemble(bulk_1448)
    assert len(doc["connections"]) == len(ref) == 64
    assert reassemblers.differences(doc["connections"], ref) == []


@pytest.mark.benchmark(group="reassembly, 1448 B segments")
def test_tcpflow_1448(benchmark, record, bulk_1448, tmp_path):
    benchmark.pedantic(tcpflow, (bulk_1448, str(tmp_path / "out")), rounds=3)
    record("mon_tcpflow_1448")
    assert len(list((tmp_path / "out").iterdir())) == 128
    # tcpflow (an independent reassembler) wrote the bytes mbx's digests describe
    doc, _ = _flows_json(bulk_1448)
    assert check_tcpflow(doc["connections"], str(tmp_path / "out")) == []


@pytest.mark.benchmark(group="reassembly, 100-200 B segments")
def test_flows_json_small(benchmark, record, bulk_small):
    doc, warnings = benchmark.pedantic(_flows_json, (bulk_small,), rounds=5,
                                       warmup_rounds=1)
    record("mon_flows_json_small", payload_small=_payload(doc["connections"]))
    ref = reassemblers.reassemble(bulk_small)
    assert not warnings and len(doc["connections"]) == len(ref) > 100
    assert reassemblers.differences(doc["connections"], ref) == []


@pytest.mark.benchmark(group="reassembly, 100-200 B segments")
def test_dpkt_reassembler_small(benchmark, record, bulk_small):
    ref = benchmark.pedantic(reassemblers.reassemble, (bulk_small,), rounds=1)
    record("mon_dpkt_small")
    doc, _ = flows_json(bulk_small)
    assert reassemblers.differences(doc["connections"], ref) == []


@pytest.mark.benchmark(group="TCP Monitor, 64 B frames")
def test_monitor_64(benchmark, record, tcp64):
    out = benchmark.pedantic(monitor_alone, (tcp64, TCP64_FLOWS), rounds=15,
                             warmup_rounds=1)
    record("mon_monitor_64", packets_64=out["packets"])
    assert out["tcp"]["tcp_packets"] == 10 * TCP64_FLOWS
    assert out["tcp"]["connections"] == TCP64_FLOWS and not out["flows"]["evicted"]


@pytest.mark.benchmark(group="TCP Monitor, 64 B frames")
def test_network_layer_64(benchmark, record, tcp64):
    out = benchmark.pedantic(monitor_alone, (tcp64, TCP64_FLOWS, False), rounds=15,
                             warmup_rounds=1)
    record("mon_network_64")
    assert out["packets"] == 10 * TCP64_FLOWS and "tcp" not in out


@pytest.mark.benchmark(group="snapshot")
def test_snapshot(benchmark, record):
    # Timed: the nogil loops themselves; their ns per snapshot and per update go to
    # extra_info (and the session's ratios) beside the paper's 76 cycles.
    snap_ns, upd_ns, _ = benchmark.pedantic(snapshot_figures, rounds=3)
    record("mon_snapshot", snapshot_ns=snap_ns, update_ns=upd_ns,
           snapshot_bytes=_tcp.SNAPSHOT_SIZE)
    benchmark.extra_info.update(snapshot_ns=snap_ns, update_ns=upd_ns,
                                snapshot_bytes=_tcp.SNAPSHOT_SIZE)
    assert _tcp.SNAPSHOT_SIZE <= 23 and snap_ns > 0 and upd_ns > 0


def test_bytes_per_flow():
    per_flow = FlowTable(1 << 16).bytes_per_flow + _tcp.CONN_SIZE + MONITOR_SLOT_ARRAYS
    FIGURES["monitor_bytes_per_flow"] = per_flow
    assert _tcp.CONN_SIZE == 64 and per_flow > 64


class _MonitorRatios:
    """Prints this module's ratios at the end of the session (beside conftest's)."""

    def pytest_terminal_summary(self, terminalreporter):
        m, f, lines = MEDIANS, FIGURES, []
        for seg in ("1448", "small"):
            mbx_t = m.get(f"mon_flows_json_{seg}")
            payload = f.get(f"payload_{seg}")
            if mbx_t is None or not payload:
                continue
            gbps = payload * 8 / mbx_t / 1e9
            for base, what in ((f"mon_dpkt_{seg}", "dpkt reassembler"),
                               (f"mon_tcpflow_{seg}", "tcpflow"),
                               (f"mon_cli_{seg}", "mbx flows as a process")):
                if base in m:
                    b = payload * 8 / m[base] / 1e9
                    lines.append(f"reassembly ({seg}): flows_json {gbps:.3g} Gbit/s, "
                                 f"{what} {b:.3g} Gbit/s: {gbps / b:.3g}x")
        if "mon_monitor_64" in m and "mon_network_64" in m:
            n = f.get("packets_64", 0)
            a, b = n / m["mon_monitor_64"] / 1e6, n / m["mon_network_64"] / 1e6
            lines.append(f"64 B TCP frames: Monitor {a:.3g} Mpps, Network Layer "
                         f"{b:.3g} Mpps: {a / b:.3g} of its rate; "
                         f"{(m['mon_monitor_64'] - m['mon_network_64']) / n * 1e9:.3g} "
                         "ns/pkt more")
        if "snapshot_ns" in f:
            lines.append(f"snapshot: {f['snapshot_bytes']} B (paper 23 B), "
                         f"{f['snapshot_ns']:.3g} ns; twin-state update "
                         f"{f['update_ns']:.3g} ns/segment")
        if "monitor_bytes_per_flow" in f:
            lines.append(f"Monitor bytes per flow (no reassembly): "
                         f"{f['monitor_bytes_per_flow']:.0f} B (goal <= 256)")
        if lines:
            terminalreporter.section("TCP Monitor vs baselines (medians of this run)")
            for line in lines:
                terminalreporter.write_line(line)


@pytest.fixture(scope="module", autouse=True)
def _monitor_ratios(request):
    plugin = _MonitorRatios()
    if not request.config.pluginmanager.is_registered(plugin):
        request.config.pluginmanager.register(plugin, "mbx-monitor-ratios")
