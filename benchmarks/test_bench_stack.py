"""Micro benchmarks of the Network Layer stack and event dispatch, each beside its
baseline (same group); the session ends with the ratios (see conftest.py).

The assertions check what ran (packets, flows, events), never how fast.
"""
import captures
import pytest

import mbx
from mbx._events import message_size
from mbx._flow import FlowTable
from mbx.ports import open_input

CAPACITY = 1 << 16       # holds every flow of the capture: no evictions


def _run(path, nfs):
    return mbx.App(nfs, flow_capacity=CAPACITY).run(open_input("pcap:" + path))


def _noop_nfs(k, batch=False):
    nfs = []
    for i in range(k):
        nf = mbx.NF(f"noop{i}")
        nf.sub(mbx.PKT, lambda ev: None, batch=batch)
        nfs.append(nf)
    return nfs


@pytest.mark.benchmark(group="parse + flow lookup")
def test_stack_alone(benchmark, record, capture64, sizes):
    out = benchmark.pedantic(_run, (capture64, []), rounds=15, warmup_rounds=1)
    record("stack")
    assert out["packets"] == sizes[0]
    assert out["flows"]["created"] == sizes[1]
    assert out["flows"]["evicted"] == 0 and not out["parse"] and not out["events"]


@pytest.mark.benchmark(group="parse + flow lookup")
def test_dpkt_loop(benchmark, record, frames64, sizes):
    flows = benchmark.pedantic(captures.dpkt_flows, (frames64,), rounds=3)
    record("dpkt_flows")
    assert len(flows) == sizes[1]
    assert sum(c[0] + c[1] for c in flows.values()) == sizes[0]


@pytest.mark.benchmark(group="PKT events")
@pytest.mark.parametrize("name, k, batch", [("noop_handler", 1, False),
                                            ("batch_handler", 1, True),
                                            ("chain2", 2, False),
                                            ("chain4", 4, False)])
def test_noop_nfs(benchmark, record, capture64, sizes, name, k, batch):
    # NFs are made per round (setup, not timed): an NF belongs to one application.
    def setup():
        return (capture64, _noop_nfs(k, batch)), {}

    out = benchmark.pedantic(_run, setup=setup, rounds=15, warmup_rounds=1)
    record(name, events=out["events"]["PKT"]["delivered"])
    assert out["events"]["PKT"] == {"published": sizes[0], "delivered": k * sizes[0]}


@pytest.mark.benchmark(group="PKT events")
def test_python_noop_loop(benchmark, record, sizes):
    n = benchmark(captures.noop_calls, sizes[0])
    record("python_loop")
    assert n == sizes[0]


@pytest.mark.benchmark(group="pcap read")
def test_pcap_read_mbx(benchmark, record, capture64, sizes):
    assert benchmark(captures.mbx_read, capture64) == sizes[0]
    record("mbx_read")


@pytest.mark.benchmark(group="pcap read")
def test_pcap_read_dpkt(benchmark, record, capture64, sizes):
    n = benchmark.pedantic(captures.dpkt_read, (capture64,), rounds=5)
    record("dpkt_read")
    assert n == sizes[0]


@pytest.mark.benchmark(group="Stack Memory")
def test_flow_table_memory(benchmark, record, frames64):
    # Timed: allocating the table; the figures of interest are its bytes per flow,
    # kept in extra_info beside what the dpkt loop's dict holds per flow.
    table = benchmark(FlowTable, CAPACITY)
    flows = captures.dpkt_flows(frames64)
    dict_bytes = captures.deep_size(flows) / len(flows)
    record("flow_table_alloc", flow_bytes=table.bytes_per_flow, dict_bytes=dict_bytes)
    benchmark.extra_info.update(
        bytes_per_flow=table.bytes_per_flow, memory_bytes=table.memory_bytes,
        bytes_per_flow_1m=FlowTable(1 << 20).bytes_per_flow,
        message_size=message_size()[1], dpkt_dict_bytes_per_flow=dict_bytes)
    assert table.memory_bytes >= CAPACITY * table.bytes_per_flow
    assert message_size()[0] < message_size()[1]
