"""Cython NFs with C handlers: the same events as a Python NF with the same
subscription, drops that hide the packet downstream, per-flow overrides."""
import collections

import pytest
from conftest import read_frames

import mbx
from mbx.examples import cnoop


class PyCounter(mbx.NF):
    """The Python twin of cnoop's counter: events per (type, direction)."""

    def __init__(self, name, etype, side="sender"):
        super().__init__(name)
        self.n = collections.Counter()
        self.sub(etype, self.on_event, side=side)

    def on_event(self, ev):
        self.n[ev.type_name, ev.dir] += 1

    def per_dir(self):
        out = [0, 0]
        for (_, d), k in self.n.items():
            out[d] += k
        return out


@pytest.mark.parametrize("etype", ["PKT", "FLOW/START", "FLOW/END", "FLOW", "EVENT"])
def test_c_nf_gets_what_a_python_nf_gets(run, example_pcap, etype):
    c = cnoop.make_counter("c", etype)
    py = PyCounter("py", etype)
    counters, _ = run([c, py], example_pcap)
    assert c.counter.total > 0
    assert [c.counter.c2s, c.counter.s2c] == py.per_dir()
    stats = counters["nfs"]
    assert stats["c"]["types"] == stats["py"]["types"]
    assert stats["c"]["c_events"] == stats["c"]["events"] == c.counter.total
    assert stats["py"]["c_events"] == 0


def test_c_nf_tcp_events_both_sides(run, example_pcap):
    # TCP Monitor types, sided: each side's events counted alike
    c = cnoop.make_counter("c", "PKT/TCP", side="both")
    py = PyCounter("py", "PKT/TCP", side="both")
    counters, _ = run([c, py], example_pcap)
    assert "tcp" in counters
    assert c.counter.total > 0
    assert [c.counter.c2s, c.counter.s2c] == py.per_dir()
    assert counters["nfs"]["c"]["types"] == counters["nfs"]["py"]["types"]


def test_c_drop_hides_the_packet(run, example_pcap):
    drop = cnoop.make_dropper(1)                # every packet the server sends
    py = PyCounter("after", "PKT")
    counters, out = run([drop, py], example_pcap)
    frames = read_frames(example_pcap)
    dropped = counters["dropped_by_nf"]
    assert dropped > 0
    assert py.per_dir() == [py.per_dir()[0], 0]     # later NFs never see them
    assert counters["nfs"]["cdrop"]["drops"] == dropped
    assert len(out) == len(frames) - dropped - counters["fragments_held"]
    # the packets that left are exactly those the client sent
    assert py.per_dir()[0] == counters["sent"]


def test_c_and_python_handlers_in_one_nf(run, example_pcap):
    # a C handler for PKT and a Python one for FLOW/START: runs alternate
    nf = mbx.NF("mixed")
    counter = cnoop.Counter()
    nf.sub("PKT", counter.handler())
    starts = []
    nf.sub("FLOW/START", lambda ev: starts.append(ev.flow))
    py = PyCounter("py", "PKT")
    counters, _ = run([nf, py], example_pcap)
    assert [counter.c2s, counter.s2c] == py.per_dir()
    assert len(starts) == counters["flows"]["created"]
    assert counters["nfs"]["mixed"]["events"] == counter.total + len(starts)


class UpSub(mbx.NF):
    """On every other flow's start, moves PKT of that flow to ``handler``."""

    def __init__(self, name, handler):
        super().__init__(name)
        self.handler = handler
        self.flows = 0
        self.sub("FLOW/START", self.on_start)

    def on_start(self, ev):
        self.flows += 1
        if self.flows % 2:
            self.up_sub("PKT", ev.flow, self.handler)


def test_c_handler_under_up_sub(run, example_pcap):
    counter = cnoop.Counter()
    c = UpSub("c", counter.handler())
    seen = [0, 0]
    py = UpSub("py", lambda ev: seen.__setitem__(ev.dir, seen[ev.dir] + 1))
    counters, _ = run([c, py], example_pcap)
    assert counter.total > 0
    assert [counter.c2s, counter.s2c] == seen
    assert counters["nfs"]["c"]["c_events"] == counter.total


def test_c_handler_is_not_batched():
    nf = mbx.NF("x")
    with pytest.raises(mbx.SubscriptionError, match="not batched"):
        nf.sub("PKT", cnoop.noop_handler(), batch=True)
    with pytest.raises(TypeError):
        mbx._events.CHandler()


def test_c_drop_pipelined(run, example_pcap):
    # the pipelined bus reuses the dispatcher's C path in each NF process
    drop = cnoop.make_dropper(1)
    py = PyCounter("after", "PKT")
    inline, out_inline = run([cnoop.make_dropper(1), PyCounter("after", "PKT")],
                             example_pcap)
    counters, out = run([drop, py], example_pcap, deploy="pipelined")
    assert counters["dropped_by_nf"] == inline["dropped_by_nf"] > 0
    assert len(out) == len(out_inline)
    assert counters["nfs"]["cdrop"]["drops"] == inline["dropped_by_nf"]


def test_pipelined_nf_stats_like_inline(run, example_pcap):
    # NF processes share what the inline bus counts per NF: events (to C handlers
    # among them), drops, handler time, events per type; C and Python alike.
    def make():
        nf = mbx.NF("mixed")
        nf.sub("PKT", cnoop.Counter().handler())
        nf.sub("FLOW/START", lambda ev: None)
        return [nf, cnoop.make_dropper(1), PyCounter("py", "EVENT")]

    inline, _ = run(make(), example_pcap)
    piped, _ = run(make(), example_pcap, deploy="pipelined")
    for name in ("mixed", "cdrop", "py"):
        a, b = inline["nfs"][name], piped["nfs"][name]
        for key in ("events", "c_events", "drops", "types"):
            assert a[key] == b[key], (name, key)
        assert b["handler_ns"] > 0
    assert piped["nfs"]["mixed"]["c_events"] == piped["nfs"]["mixed"]["types"]["PKT"] > 0
    assert piped["nfs"]["cdrop"]["c_events"] == piped["nfs"]["cdrop"]["events"] > 0
    assert piped["nfs"]["py"]["c_events"] == 0
