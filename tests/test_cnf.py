"""Cython NFs with C handlers: the same events as a Python NF with the same
subscription, drops that hide the packet downstream, per-flow overrides."""
import collections
import json
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mbxtest import read_frames

import mbx
from mbx.examples import cnoop
from mbx.ports import open_input


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
    assert py.per_dir()[0] > 0 and py.per_dir()[1] == 0   # later NFs never see them
    assert counters["nfs"]["cdrop"]["drops"] == dropped
    assert len(out) == len(frames) - dropped - counters["fragments_held"]
    # the packets that left are exactly those the client sent
    assert py.per_dir()[0] == counters["sent"]
    for wrong in (2, -1):           # matches no event: it would drop nothing, silently
        with pytest.raises(ValueError, match="dir must be 0 .* or 1"):
            cnoop.make_dropper(wrong)


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
    assert out == out_inline                    # the same frames, in the same order
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


class Unsubscriber(mbx.NF):
    """On every other flow's start, unsubscribes ``target`` from PKT for that flow."""

    def __init__(self, name, target):
        super().__init__(name)
        self.target = target
        self.flows = 0
        self.sub("FLOW/START", self.on_start)

    def on_start(self, ev):
        self.flows += 1
        if self.flows % 2:
            self.target.up_sub("PKT", ev.flow, None)


def c_chain(python_too):
    """A chain of C NFs: a drop in the middle, a filter, a voting group, one NF
    unsubscribed per flow by a Python NF ahead of it.  ``python_too`` gives every C
    NF also a Python handler (for FLOW/END), which takes it off the C-only path."""
    def nf(name, handler, group=None):
        n = mbx.NF(name, group=group)
        n.sub("PKT", handler)
        if python_too:
            n.sub("FLOW/END", lambda ev: None)
        return n

    counters = {name: cnoop.Counter() for name in ("first", "filt", "g2", "late")}
    late = nf("late", counters["late"].handler())
    g1 = nf("g1", cnoop.Dropper(0).handler(), group="g")
    g2 = nf("g2", counters["g2"].handler(), group="g")
    g1.group_merge = g2.group_merge = "all"    # g2 never drops: votes, no drops
    filt = nf("filt", counters["filt"].handler())
    filt.filter("PKT", proto="tcp")
    chain = [nf("first", counters["first"].handler()),
             nf("drop", cnoop.Dropper(1).handler()), filt, g1, g2,
             Unsubscriber("unsub", late), late]
    return chain, counters


def test_c_only_nfs_count_as_with_python_handlers(run, example_pcap):
    # NFs with only C handlers are drained by one C loop each, straight from
    # dispatch; the same NFs with a Python handler too go through the general
    # drain.  Everything about PKT is the same either way.
    got = {}
    for python_too in (False, True):
        chain, counts = c_chain(python_too)
        counters, out = run(chain, example_pcap)
        stats = counters["nfs"]
        got[python_too] = (
            {n: (c.c2s, c.s2c) for n, c in counts.items()},
            {n: (s["drops"], s["c_events"], {t: k for t, k in s["types"].items()
                                             if not t.startswith("FLOW")})
             for n, s in stats.items() if n != "unsub"},
            counters["dropped_by_nf"], len(out))
    assert got[False] == got[True]
    per_dir, per_nf, dropped, _ = got[False]
    assert dropped == per_nf["drop"][0] > 0 and per_nf["g1"][0] > 0
    assert per_dir["first"][1] > 0 and per_dir["late"][1] == 0    # the drop hides
    assert 0 < per_dir["filt"][0] < per_dir["first"][0]           # tcp only
    assert per_dir["g2"] == (per_dir["first"][0], 0)              # no group drop
    assert 0 < per_dir["late"][0] < per_dir["g2"][0]              # unsubscribed flows


def test_c_chain_sides(run, example_pcap):
    # C NFs on the receiver's side of TCP events behind sender-side ones count
    # as their Python twins (the stack builds receiver-side events only when some
    # handler set takes them)
    chain = [cnoop.make_counter(f"s{i}", "PKT/TCP") for i in range(3)]
    chain.append(cnoop.make_counter("r", "PKT/TCP", side="receiver"))
    py_s, py_r = PyCounter("py_s", "PKT/TCP"), PyCounter("py_r", "PKT/TCP", "receiver")
    run(chain + [py_s, py_r], example_pcap)
    assert chain[3].counter.total > 0
    for nf in chain[:3]:
        assert [nf.counter.c2s, nf.counter.s2c] == py_s.per_dir()
    assert [chain[3].counter.c2s, chain[3].counter.s2c] == py_r.per_dir()


def voting_c_chain(python_too, calls):
    """C counters before and after a group of three C droppers (two drop what the
    client sends, one what the server sends) merged by a majority that records its
    calls; ``python_too`` as in ``c_chain``."""
    from mbx.examples import votes

    def majority(dropped, *, members):
        calls.append(dropped)
        return votes.majority(dropped, members=members)

    def nf(name, handler, group=None):
        n = mbx.NF(name, group=group)
        n.sub("PKT", handler)
        if python_too:
            n.sub("FLOW/END", lambda ev: None)
        if group:
            n.group_merge = majority
        return n

    counts = {"before": cnoop.Counter(), "after": cnoop.Counter()}
    chain = [nf("before", counts["before"].handler()),
             nf("v0", cnoop.Dropper(0).handler(), group="g"),
             nf("v1", cnoop.Dropper(0).handler(), group="g"),
             nf("v2", cnoop.Dropper(1).handler(), group="g"),
             nf("after", counts["after"].handler())]
    return chain, counts


def test_c_group_with_merge_function_decides_before_the_next_stage(run, example_pcap):
    # A voting group of C-only NFs between C-only NFs: the dispatcher runs a stretch
    # of C NFs together, and must stop after the group's last member so that its
    # merge function decides before the NF behind it sees the packets.  Two of
    # three members drop what the client sends, so a majority drops exactly that.
    got = {}
    for python_too in (False, True):
        calls = []
        chain, counts = voting_c_chain(python_too, calls)
        counters, out = run(chain, example_pcap)
        got[python_too] = ({n: (c.c2s, c.s2c) for n, c in counts.items()},
                           collections.Counter(calls), counters["dropped_by_nf"],
                           len(out))
    assert got[False] == got[True]
    per_dir, calls, dropped, _ = got[False]
    assert per_dir["before"][0] > 0 and per_dir["before"][1] > 0
    assert per_dir["after"] == (0, per_dir["before"][1])
    assert calls == {frozenset({"v0", "v1"}): per_dir["before"][0],
                     frozenset({"v2"}): per_dir["before"][1]}
    assert dropped == per_dir["before"][0]


def run_twice_sharing(make_chain, capture):
    """Run the chain ``make_chain()`` builds inline over ``capture`` with per NF
    handler clocks (every NF its own ring) and without (C NFs with the same plan
    share one ring and one pass); per run: the chain's shared rings, its counters
    and its output frames."""
    got = []
    for timing in (True, False):
        chain, counts = make_chain()
        app = mbx.App(chain, stack="tcp", nf_timing=timing)
        counters, out = run_app_with(app, capture)
        got.append((app.stack.bus.shared_rings, counters, counts, out))
    return got


def run_app_with(app, capture):
    from mbx.ports import open_input, open_output

    out_path = capture + ".out.pcap"
    inp, out = open_input("pcap:" + capture), open_output("pcap:" + out_path)
    try:
        counters = app.run(inp, out, burst=64)
    finally:
        inp.close()
        out.close()
    return counters, read_frames(out_path)


def seen(counters, counts):
    """What a run showed about its NFs: events per direction counted in C, and per
    NF its events, drops and events per type; the packets dropped by NFs."""
    return ({n: (c.c2s, c.s2c) for n, c in counts.items()},
            {n: (s["events"], s["c_events"], s["drops"], s["types"])
             for n, s in counters["nfs"].items()},
            counters["dropped_by_nf"])


def test_c_nfs_sharing_a_ring_see_and_drop_as_with_rings_of_their_own(example_pcap):
    # Five C NFs on every event, the third dropping what the server sends, but only
    # on FLOW/TCP/STATE events, which come after their packet's PKT/TCP event:
    # sharing one pass, the NFs after it must still see neither (each packet's
    # events go to one NF after another, not each event to every NF in turn).
    def make_chain():
        counts = {n: cnoop.Counter() for n in ("a", "b", "d", "e")}
        chain = []
        for name in ("a", "b", "drop", "d", "e"):
            nf = mbx.NF(name)
            nf.sub("EVENT", cnoop.Dropper(1, "FLOW/TCP/STATE").handler() if name == "drop"
                   else counts[name].handler())
            chain.append(nf)
        return chain, counts

    (rings_own, c_own, n_own, out_own), (rings, c, n, out) = run_twice_sharing(
        make_chain, example_pcap)
    assert rings_own == [] and rings == [("a", "b", "drop", "d", "e")]
    assert seen(c, n) == seen(c_own, n_own)
    assert out == out_own
    per_dir, per_nf, dropped = seen(c, n)
    assert dropped == per_nf["drop"][2] > 0
    for t in ("PKT/TCP", "FLOW/TCP/STATE"):         # server packets' events hidden
        assert per_nf["a"][3][t] > per_nf["d"][3][t] > 0
    assert per_dir["a"] == per_dir["b"] and per_dir["d"] == per_dir["e"]
    assert per_dir["d"][0] == per_dir["a"][0] and per_dir["d"][1] < per_dir["a"][1]


def test_an_up_sub_takes_an_nf_out_of_its_shared_ring_with_nothing_lost(example_pcap):
    # A Python NF ahead of three C NFs sharing a ring unsubscribes the middle one
    # from some flows while the burst's events wait in the shared ring: it leaves
    # the group with its own copy of what is queued, and the counts are those of
    # rings of their own.
    def make_chain():
        counts = {n: cnoop.Counter() for n in ("c1", "late", "c3")}
        late = mbx.NF("late")
        late.sub("PKT", counts["late"].handler())
        chain = [Unsubscriber("unsub", late)]
        for name in ("c1", "late", "c3"):
            nf = late if name == "late" else mbx.NF(name)
            if nf is not late:
                nf.sub("PKT", counts[name].handler())
            chain.append(nf)
        return chain, counts

    (rings_own, c_own, n_own, out_own), (rings, c, n, out) = run_twice_sharing(
        make_chain, example_pcap)
    assert rings_own == [] and rings == []           # split by the first up_sub
    assert seen(c, n) == seen(c_own, n_own) and out == out_own
    per_dir = seen(c, n)[0]
    assert per_dir["c1"] == per_dir["c3"]
    assert 0 < sum(per_dir["late"]) < sum(per_dir["c1"])



def test_pipelined_nfs_keep_rings_of_their_own(example_pcap):
    # Pipelined, each NF has its own process and ring, handler clocks or not: two C
    # NFs with the same plan each get every event, as inline.
    def chain():
        return [cnoop.make_counter("a", "PKT/TCP"), cnoop.make_counter("b", "PKT/TCP")]

    got = {}
    for deploy in ("inline", "pipelined"):
        app = mbx.App(chain(), stack="tcp", nf_timing=False, deploy=deploy)
        counters, _ = run_app_with(app, example_pcap)
        got[deploy] = (app.stack.bus.shared_rings,
                       {n: s["events"] for n, s in counters["nfs"].items()})
    assert got["inline"][0] == [("a", "b")] and got["pipelined"][0] == []
    assert got["pipelined"][1] == got["inline"][1] and got["inline"][1]["a"] > 0


_DROP = st.tuples(st.integers(0, 1),                      # a dropper of this direction,
                  st.sampled_from([None, "PKT/TCP", "FLOW/TCP/STATE", "DATA_RDY"]))  # on
_C_RUN = st.tuples(                                       # NFs next to each other with
    st.sampled_from(["EVENT", "PKT/TCP", "FLOW/TCP/STATE", "PKT", "FLOW"]),   # one plan
    st.sampled_from(["sender", "both"]),
    st.booleans(),                                        # filtered (not shared then)
    st.lists(st.one_of(st.none(), _DROP), min_size=1, max_size=4))   # None: a counter


@settings(max_examples=30, deadline=None)
@given(st.lists(_C_RUN, min_size=1, max_size=3))
def test_any_c_chain_counts_and_drops_the_same_with_shared_rings(example_pcap, runs):
    # Random chains of C counters and droppers in runs of NFs with one plan (so that
    # they share rings), on types with one event per packet and with several, some
    # sided both ways, some filtered (which keeps them out of a shared ring):
    # sharing rings must change nothing anyone can see.
    def make_chain():
        counts, chain = {}, []
        for etype, side, filtered, members in runs:
            for drop in members:
                nf = mbx.NF(f"n{len(chain)}")
                if drop is None:
                    counts[nf.name] = cnoop.Counter()
                    nf.sub(etype, counts[nf.name].handler(), side=side)
                else:
                    nf.sub(etype, cnoop.Dropper(*drop).handler(), side=side)
                if filtered:
                    nf.filter(etype, dst_port=[80, 443])
                chain.append(nf)
        return chain, counts

    (rings_own, c_own, n_own, out_own), (_, c, n, out) = run_twice_sharing(
        make_chain, example_pcap)
    assert rings_own == []
    assert seen(c, n) == seen(c_own, n_own)
    assert out == out_own


def test_handler_timing_changes_only_between_bursts():
    # Turning handler clocks off re-plans the rings; with events queued that would
    # strand them in rings nobody reads, so the bus refuses until they are handled.
    from mbx._events import EventBus
    from mbx.errors import MbxError

    tick = mbx.register_event_type("TEST_CNF_TICK")
    got = []
    pub, sub = mbx.NF("pub"), mbx.NF("sub")
    port = pub.pub(tick)
    sub.sub(tick, got.append)
    bus = EventBus([pub, sub])
    try:
        pub.publish(port, pub.new_msg(tick))
        with pytest.raises(MbxError, match="while events are queued"):
            bus.timing = False
        assert bus.timing and bus.pending == 1
        bus.dispatch()
        assert len(got) == 1 and bus.pending == 0
        bus.timing = False
        assert not bus.timing
    finally:
        bus.close()


OWN_C_NF = """
from libc.stdint cimport uint64_t

from mbx.cnf cimport MBX_DROP, MBX_PASS, chandler, mbx_msg, mbx_pkt

import mbx


cdef int by_dir(void *ctx, const mbx_msg *m, mbx_pkt *p) noexcept nogil:
    (<uint64_t *>ctx)[m.h.dir & 1] += 1
    return MBX_DROP if m.h.dir == 1 else MBX_PASS


cdef class Counts:
    cdef uint64_t n[2]

    def handler(self):
        return chandler(by_dir, self.n, self, "mine.by_dir")

    def both(self):
        return {"c2s": self.n[0], "s2c": self.n[1]}


class Mine(mbx.NF):
    def __init__(self):
        super().__init__("mine")
        self.counts = Counts()
        self.sub(mbx.PKT, self.counts.handler())

    def report(self):
        return self.counts.both()


def make():
    return Mine()
"""

BUILD_OWN = """
import mbx
from Cython.Build import cythonize
from setuptools import Extension, setup

setup(ext_modules=cythonize([Extension("mine", ["mine.pyx"])],
                            include_path=[mbx.get_include()], language_level=3),
      script_args=["build_ext", "--inplace"])
"""


def test_a_c_nf_of_ones_own_builds_with_get_include_and_runs(example_pcap, tmp_path):
    # The guide's recipe for a .pyx outside mbx: Cython finds mbx/cnf.pxd through
    # mbx.get_include(), also in an editable install, where mbx's checkout is not
    # on sys.path as a directory.
    (tmp_path / "mine.pyx").write_text(OWN_C_NF)
    (tmp_path / "build.py").write_text(BUILD_OWN)
    r = subprocess.run([sys.executable, "build.py"], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "run", "mine:make", "--in",
                        f"pcap:{example_pcap}", "--json", "c.json", "-q"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    c = json.loads((tmp_path / "c.json").read_text())
    ref = cnoop.make_counter()
    with open_input(f"pcap:{example_pcap}") as inp:
        mbx.App([ref]).run(inp)
    assert c["nfs"]["mine"]["report"] == {"c2s": ref.counter.c2s, "s2c": ref.counter.s2c}
    assert c["dropped_by_nf"] == ref.counter.s2c > 0
