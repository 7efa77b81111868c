"""The packet path end to end: stack events to NFs, chains, verdicts, per-flow
subscriptions, batch handlers, completion, and the flow lifecycle."""
import dpkt
import numpy as np
import pytest
from mbxtest import read_frames

import mbx
from mbx.examples.capture import ether, tcp4, udp4


class Recorder(mbx.NF):
    """Records (type name, flow, dir) of every event of the subscribed types."""

    def __init__(self, name, types=("EVENT",), **kw):
        super().__init__(name, **kw)
        self.seen = []
        for t in types:
            self.sub(t, self.on_event)

    def on_event(self, ev):
        self.seen.append((ev.type_name, ev.flow, ev.dir))

    def count(self, name):
        return sum(1 for s in self.seen if s[0] == name)


def test_every_packet_and_flow_reaches_a_subscriber(run, example_pcap):
    rec = Recorder("rec")
    counters, out = run([rec], example_pcap)
    frames = read_frames(example_pcap)
    held = counters["fragments_held"]
    assert counters["packets"] == len(frames)
    assert rec.count("PKT") == len(frames) - held
    created = counters["flows"]["created"]
    assert created > 100
    assert rec.count("FLOW/START") == created
    assert rec.count("FLOW/END") == created              # every flow ends (shutdown)
    # completion: everything leaves but the fragments held for reassembly (the one
    # that completes a datagram leaves as the whole datagram)
    assert counters["fragments"]["completed"] == 1
    assert len(out) == len(frames) - held
    assert counters["sent"] == len(out)
    ev = counters["events"]
    assert ev["PKT"]["published"] == ev["PKT"]["delivered"] == rec.count("PKT")


def test_flow_start_precedes_packets_and_end_follows(run, example_pcap):
    rec = Recorder("rec")
    run([rec], example_pcap)
    first = {}
    for i, (name, flow, _dir) in enumerate(rec.seen):
        if flow is None:
            continue
        if name == "FLOW/START":
            assert flow not in first
            first[flow] = i
        elif name == "PKT":
            assert flow in first, "a PKT event before its FLOW/START"
        elif name == "FLOW/END":
            assert flow in first
    assert first


def test_direction_is_relative_to_the_initiator(run, tmp_path):
    frames = [(1.0, ether(tcp4("198.18.1.1", "198.18.0.1", 1000, 80, flags=2))),
              (1.1, ether(tcp4("198.18.0.1", "198.18.1.1", 80, 1000, flags=0x12))),
              (1.2, ether(tcp4("198.18.1.1", "198.18.0.1", 1000, 80, flags=0x10)))]
    rec = Recorder("rec", types=("PKT",))
    run([rec], frames=frames)
    assert [d for _, _, d in rec.seen] == [0, 1, 0]
    assert len({f for _, f, _ in rec.seen}) == 1


def test_a_drop_hides_the_packet_from_the_rest_of_the_chain(run, example_pcap):
    class DropDns(mbx.NF):
        def __init__(self):
            super().__init__("drop_dns")
            self.sub(mbx.PKT, self.on_pkt)

        def on_pkt(self, ev):
            if ev.proto == 17 and 53 in (ev.sport, ev.dport):
                ev.drop()

    after = Recorder("after", types=("PKT",))
    counters, out = run([DropDns(), after], example_pcap)
    all_frames = read_frames(example_pcap)
    dns = 0
    for _, buf in all_frames:
        ip = dpkt.ethernet.Ethernet(buf).data
        if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.udp.UDP):
            dns += 53 in (ip.data.sport, ip.data.dport)
    assert dns > 0
    assert counters["dropped_by_nf"] == dns
    assert after.count("PKT") == len(all_frames) - counters["fragments_held"] - dns
    for _, buf in out:
        ip = dpkt.ethernet.Ethernet(buf).data
        if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.udp.UDP):
            assert 53 not in (ip.data.sport, ip.data.dport)


def test_up_sub_refuses_what_is_no_flow_id(run, example_pcap):
    # -1, a float, True: a bare OverflowError or TypeError, or True taken as flow 1
    seen = []

    class Bad(mbx.NF):
        def __init__(self):
            super().__init__("bad")
            self.sub(mbx.FLOW_START, self.on)

        def on(self, ev):
            if seen:
                return
            for flow in (-1, 1.5, True, 1 << 64):
                try:
                    self.up_sub(mbx.PKT, flow, lambda e: None)
                except mbx.errors.SubscriptionError as exc:
                    seen.append(str(exc))

    run([Bad()], example_pcap)
    assert seen == [f"NF bad: up_sub(PKT): {f!r} is not a flow id (an event's ev.flow)"
                    for f in (-1, 1.5, True, 1 << 64)]


def test_up_sub_none_stops_a_flow_and_the_stack_stops_building(run, example_pcap):
    class FirstOnly(mbx.NF):
        def __init__(self):
            super().__init__("first_only")
            self.per_flow = {}
            self.sub(mbx.PKT, self.on_pkt)

        def on_pkt(self, ev):
            self.per_flow[ev.flow] = self.per_flow.get(ev.flow, 0) + 1
            if ev.flow is not None:
                self.up_sub(mbx.PKT, ev.flow, None)

    nf = FirstOnly()
    # one packet per burst: the stack builds a burst's events before the NFs run, so
    # only with bursts of one is "stops building" exact
    counters, _ = run([nf], example_pcap, burst=1)
    flows = {f: n for f, n in nf.per_flow.items() if f is not None}
    assert flows and set(flows.values()) == {1}
    # the stack built PKT events only while someone wanted them
    pub = counters["events"]["PKT"]["published"]
    assert pub == sum(nf.per_flow.values())
    assert pub < counters["packets"] / 3


def test_up_sub_with_a_bound_method_written_in_the_call_shares_one_set(example_pcap):
    # ``self.on_end`` is a new bound method object at each call; handler sets were
    # told apart by identity, so every flow made a set of its own (about 27 KB, and
    # at most 65,535 per NF).
    from mbx.ports import open_input

    class PerFlow(mbx.NF):
        def __init__(self):
            super().__init__("perflow")
            self.ended = 0
            self.sub(mbx.FLOW_START, self.on_start)

        def on_start(self, ev):
            self.up_sub(mbx.FLOW_END, ev.flow, self.on_end)

        def on_end(self, ev):
            self.ended += 1

    nf = PerFlow()
    app = mbx.App([nf])
    counters = app.run(open_input(f"pcap:{example_pcap}"))
    assert counters["flows"]["created"] > 50
    assert nf.ended == counters["flows"]["created"]
    # the set of its sub() calls, and one with FLOW/END added, shared by every flow
    assert app.stack.bus.handler_sets() == {"perflow": 2}


class StartStop(mbx.NF):
    """Logs its start() and stop() calls in ``log``; ``fail_stop`` makes stop raise."""

    def __init__(self, name, log, fail_stop=False, **kw):
        super().__init__(name, **kw)
        self.log = log
        self.fail_stop = fail_stop
        self.sub(mbx.PKT, lambda ev: None)

    def start(self):
        self.log.append(("start", self.name))

    def stop(self):
        self.log.append(("stop", self.name))
        if self.fail_stop:
            raise RuntimeError("cannot close")


@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
def test_an_app_refused_after_its_nfs_started_stops_them(example_pcap, deploy):
    # A parallel group whose members disagree on their merge is refused when the bus
    # is built, after start(): stop() never ran, so what start() opened stayed open.
    from mbx.ports import open_input

    log = []
    x, y = StartStop("x", log, group="g"), StartStop("y", log, group="g")
    x.group_merge = "all"
    with pytest.raises(mbx.MbxError, match="must share one merge"):
        mbx.App([x, y], deploy=deploy).run(open_input(f"pcap:{example_pcap}"))
    assert log == [("start", "x"), ("start", "y"), ("stop", "x"), ("stop", "y")]


def test_an_nf_whose_stop_raises_does_not_keep_the_others_from_stopping(example_pcap):
    from mbx.ports import open_input

    log = []
    nfs = [StartStop("a", log, fail_stop=True), StartStop("b", log)]
    app = mbx.App(nfs)
    with pytest.raises(mbx.NFError, match=r"^NF a: stop\(\) raised RuntimeError: "
                                          r"cannot close \(at test_pipeline.py"):
        app.run(open_input(f"pcap:{example_pcap}"))
    assert log[-2:] == [("stop", "a"), ("stop", "b")]
    assert set(app.reports) == {"a", "b"}


class Exits(StartStop):
    """stop() or report() raises ``exc[0](exc[1])`` (SystemExit, KeyboardInterrupt)."""

    def __init__(self, name, log, exc, where):
        super().__init__(name, log)
        self.exc, self.where = exc, where

    def stop(self):
        super().stop()
        if self.where == "stop":
            raise self.exc[0](self.exc[1])

    def report(self):
        if self.where == "report":
            raise self.exc[0](self.exc[1])
        return {"n": 1}


@pytest.mark.parametrize("exc", [(SystemExit, 4), (KeyboardInterrupt, "bye")],
                         ids=["exit", "interrupt"])
@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
def test_an_nf_whose_stop_or_report_exits_loses_nothing_else(example_pcap, deploy, exc):
    # Inline, SystemExit or KeyboardInterrupt from stop() left the later NFs
    # unstopped and every report lost, and report()'s escaped App.run; pipelined
    # the same stop() failed the run with NFError.
    from mbx.ports import open_input

    name = exc[0].__name__
    log = []
    app = mbx.App([Exits("a", log, exc, "stop"), Exits("b", log, exc, None)],
                  deploy=deploy)
    if exc[0] is KeyboardInterrupt and deploy == "inline":
        # a Ctrl-C in a stop() (mbx run's second signal on one that hangs): the
        # others still stop, and the run ends interrupted, not failed (exit 130)
        with pytest.raises(KeyboardInterrupt, match="bye"):
            app.run(open_input(f"pcap:{example_pcap}"))
    else:
        with pytest.raises(mbx.NFError, match=rf"^NF a: stop\(\) raised {name}"):
            app.run(open_input(f"pcap:{example_pcap}"))
    if deploy == "inline":      # (pipelined, each NF stops in its own process)
        assert log[-2:] == [("stop", "a"), ("stop", "b")]
    assert app.counters()["nfs"]["b"]["report"] == {"n": 1}
    app = mbx.App([Exits("a", log, exc, "report"), Exits("b", log, exc, None)],
                  deploy=deploy)
    nfs = app.run(open_input(f"pcap:{example_pcap}"))["nfs"]
    assert nfs["a"]["report"] == {"error": f"NF a: report(): {name}: {exc[1]}"}
    assert nfs["b"]["report"] == {"n": 1}


@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
def test_a_batch_verdict_that_is_no_flags_names_the_nf(example_pcap, deploy):
    # The records handed to it returned as the verdict: inline, numpy's raw TypeError
    # (no cast to bool) escaped with no NF named.
    from mbx.ports import open_input

    # Then it named neither the handler nor its line, and spelt out the records'
    # whole 20-field dtype.
    nf = mbx.NF("batcher")

    def verdicts(recs):
        return recs

    nf.sub(mbx.PKT, verdicts, batch=True)
    line = verdicts.__code__.co_firstlineno
    with pytest.raises(mbx.NFError) as err:
        mbx.App([nf], deploy=deploy).run(open_input(f"pcap:{example_pcap}"))
    text = str(err.value)
    assert text.startswith("NF batcher: batch handler test_a_batch_verdict_that_is_no_"
                           f"flags_names_the_nf.<locals>.verdicts (test_pipeline.py, "
                           f"line {line}) returned a structured array of 20 fields")
    assert "returns None or one drop flag per event" in text
    assert len(text) < 300 and "offsets" not in text


@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
def test_event_calls_from_another_thread_are_refused(example_pcap, deploy):
    # From a thread the NF started, ev.drop() (and publish, set_dst, read) acted on
    # whatever packet the reused view pointed at by then.
    import threading

    from mbx.ports import open_input

    t = mbx.register_event_type("TEST_PIPELINE_THREAD", fields=[("v", "u8")])

    class Threaded(mbx.NF):
        def __init__(self):
            super().__init__("threaded", writes=True)
            self.port = self.pub(t)
            self.sub(mbx.PKT, self.on)
            self.tried = {}

        def on(self, ev):
            if self.tried:
                return
            calls = {"drop": ev.drop, "set_dst": lambda: ev.set_dst(port=9),
                     "read": lambda: ev.read(0, 1, 0),
                     "publish": lambda: self.publish(self.port, self.new_msg(t))}

            def other():
                for what, call in calls.items():
                    try:
                        call()
                        self.tried[what] = "accepted"
                    except mbx.MbxError as exc:
                        self.tried[what] = str(exc)

            th = threading.Thread(target=other)
            th.start()
            th.join()

        def report(self):
            return self.tried

    sink = mbx.NF("sink")
    sink.sub(t, lambda ev: None)
    counters = mbx.App([Threaded(), sink], deploy=deploy).run(
        open_input(f"pcap:{example_pcap}"))
    tried = counters["nfs"]["threaded"]["report"]
    assert sorted(tried) == ["drop", "publish", "read", "set_dst"]
    for what, why in tried.items():
        assert why.startswith(f"NF threaded: {'' if what == 'publish' else 'ev.'}{what}() "
                              "called from another thread"), (what, why)
    assert counters["dropped_by_nf"] == 0


@pytest.mark.parametrize("batch", [False, True])
@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
def test_an_nf_s_drops_count_packets_not_calls(example_pcap, deploy, batch):
    # ev.drop(); ev.drop() counted 2 drops a packet, as did a drop on each of a
    # packet's events (its FLOW/START and its PKT), by a handler or a batch verdict.
    from mbx.ports import open_input

    class Dropper(mbx.NF):
        def __init__(self):
            super().__init__("dropper")
            if batch:
                self.sub(mbx.PKT, lambda evs: np.ones(len(evs), dtype=bool), batch=True)
            else:
                self.sub(mbx.PKT, self.on)
            self.sub(mbx.FLOW_START, self.on)
            self.firsts = 0

        def on(self, ev):
            self.firsts += ev.type_name == "FLOW/START" and ev.has_packet
            ev.drop()
            ev.drop()

        def report(self):
            return {"firsts": self.firsts}

    counters = mbx.App([Dropper()], deploy=deploy).run(open_input(f"pcap:{example_pcap}"))
    nf = counters["nfs"]["dropper"]
    assert nf["report"]["firsts"] > 100         # packets with two dropping events
    assert nf["drops"] == counters["dropped_by_nf"] == nf["types"]["PKT"]


@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
def test_stop_cannot_drop_a_kept_event_nor_publish(example_pcap, deploy):
    # Pipelined, stop() ran while the NF was still attached to its process's bus:
    # a kept event's drop() and a publish were accepted and lost; inline refused both.
    from mbx.ports import open_input

    t = mbx.register_event_type("TEST_PIPELINE_LATE", fields=[("v", "u8")])

    class Late(mbx.NF):
        def __init__(self):
            super().__init__("late", writes=True)
            self.port = self.pub(t)
            self.sub(mbx.PKT, self.on)
            self.kept = None
            self.tried = {}

        def on(self, ev):
            self.kept = ev

        def stop(self):
            for what, call in (("drop", self.kept.drop),
                               ("set_src", lambda: self.kept.set_src(port=1)),
                               ("publish", lambda: self.publish(self.port,
                                                                self.new_msg(t)))):
                try:
                    call()
                except mbx.MbxError as exc:
                    self.tried[what] = str(exc)

        def report(self):
            return self.tried

    late, sink = Late(), mbx.NF("sink")
    sink.sub(t, lambda ev: None)
    counters = mbx.App([late, sink], deploy=deploy).run(
        open_input(f"pcap:{example_pcap}"))
    assert counters["nfs"]["late"]["report"] == {
        "drop": "this event view is not in a handler call of a running NF",
        "set_src": "this event view is not in a handler call of a running NF",
        "publish": "NF late: publish is for a running NF (from its handlers), not "
                   "before or after the run"}
    assert counters["nfs"]["late"]["drops"] == 0


@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
def test_app_refuses_a_writer_in_a_parallel_group(example_pcap, deploy):
    # Only application files refused it; App ran it, and pipelined the writer
    # rewrote packets the other members were reading at the same time.
    from mbx.ports import open_input

    reader, writer = mbx.NF("r", group="g"), mbx.NF("w", writes=True, group="g")
    reader.sub(mbx.PKT, lambda ev: None)
    writer.sub(mbx.PKT, lambda ev: None)
    with pytest.raises(mbx.SubscriptionError, match="NF w writes packets and cannot "
                                                    "run in the parallel group 'g'"):
        mbx.App([reader, writer], deploy=deploy).run(open_input(f"pcap:{example_pcap}"))


@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
def test_writes_set_during_the_run_grants_nothing(example_pcap, deploy):
    # A read-only member of a parallel group that set self.writes = True in its
    # handler rewrote packets (pipelined: while its group mate read them).
    from mbx.ports import open_input

    class Sneaky(mbx.NF):
        def __init__(self):
            super().__init__("sneaky", group="g")
            self.sub(mbx.PKT, self.on)

        def on(self, ev):
            self.writes = True
            ev.set_dst(port=9)

    reader = mbx.NF("r", group="g")
    reader.sub(mbx.PKT, lambda ev: None)
    with pytest.raises(mbx.NFError, match="NF sneaky rewrote a packet but did not "
                                          "declare writes=True"):
        mbx.App([Sneaky(), reader], deploy=deploy).run(open_input(f"pcap:{example_pcap}"))


def test_up_sub_switches_one_flows_handler(run, example_pcap):
    class Switch(mbx.NF):
        def __init__(self):
            super().__init__("switch")
            self.default = 0
            self.special = 0
            self.target = None
            self.sub(mbx.PKT, self.on_default)

        def on_default(self, ev):
            self.default += 1
            if self.target is None and ev.flow is not None and ev.proto == 6:
                self.target = ev.flow
                self.up_sub(mbx.PKT, ev.flow, self.on_special)

        def on_special(self, ev):
            assert ev.flow == self.target
            self.special += 1

    nf = Switch()
    counters, _ = run([nf], example_pcap)
    assert nf.special >= 3          # the rest of that (client -> VIP) connection
    assert nf.default + nf.special == counters["events"]["PKT"]["delivered"]


@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
def test_up_sub_to_a_type_nothing_in_the_run_publishes_is_refused(example_pcap, deploy):
    # Listing 1's pattern (up_sub(PKT/TCP) at FLOW/START) with no static TCP
    # subscription: the Controller ran the Network Layer alone, and the handler waited
    # for events no μStack would ever build, silently.
    from mbx.ports import open_input

    class Pick(mbx.NF):
        def __init__(self):
            super().__init__("pick")
            self.seen = 0
            self.sub(mbx.FLOW_START, self.on_start)

        def on_start(self, ev):
            if ev.proto == 6:
                self.up_sub(mbx.PKT_TCP, ev.flow, self.on_pkt)
                self.up_sub(mbx.PKT, ev.flow, None)     # nothing to build: allowed

        def on_pkt(self, ev):
            self.seen += 1

    def run(**config):
        nf = Pick()
        inp = open_input(f"pcap:{example_pcap}")
        try:
            mbx.App([nf], deploy=deploy, **config).run(inp)
        finally:
            inp.close()
        return nf

    with pytest.raises(mbx.MbxError, match=r"NF pick: up_sub\(PKT/TCP\): nothing in this "
                       r"run publishes PKT/TCP .*the Network Layer .*--stack tcp"):
        run()
    nf = run(stack="tcp")
    if deploy == "inline":          # (pipelined, the count is the NF process's)
        assert nf.seen > 50


def test_batch_handler_gets_numpy_records_and_can_drop(run, example_pcap):
    class Batchy(mbx.NF):
        def __init__(self):
            super().__init__("batchy")
            self.sizes = []
            self.dports = []
            self.sub(mbx.PKT, self.on_batch, batch=True)

        def on_batch(self, recs):
            assert isinstance(recs, np.ndarray)
            self.sizes.append(len(recs))
            self.dports.extend(recs["dport"].tolist())
            return (recs["proto"] == 17) & (recs["dport"] == 53)

    nf = Batchy()
    counters, out = run([nf], example_pcap, burst=32)
    assert sum(nf.sizes) == counters["events"]["PKT"]["delivered"]
    assert max(nf.sizes) > 1
    assert 80 in nf.dports and 53 in nf.dports
    assert counters["dropped_by_nf"] == nf.dports.count(53) > 0
    for _, buf in out:
        ip = dpkt.ethernet.Ethernet(buf).data
        if isinstance(ip, dpkt.ip.IP) and isinstance(ip.data, dpkt.udp.UDP):
            assert ip.data.dport != 53


def test_published_events_reach_subscribers_with_fields(run, example_pcap):
    alert = mbx.register_event_type("TEST_BIG_FLOW", parent="FLOW", fields=[("total", "u64")])

    class Detect(mbx.NF):
        def __init__(self):
            super().__init__("detect")
            self.port = self.pub(alert)
            self.sub(mbx.FLOW_END, self.on_end)

        def on_end(self, ev):
            total = ev.bytes_c2s + ev.bytes_s2c
            if total > 5000:
                msg = self.new_msg(alert)
                msg.fill_from(ev)
                msg.total = total
                self.publish(self.port, msg)

    got = []

    class Sink(mbx.NF):
        def __init__(self):
            super().__init__("sink")
            self.sub(alert, lambda ev: got.append((ev.total, ev.cli_port, ev.srv_port,
                                                   ev.flow)))

    run([Detect(), Sink()], example_pcap)
    assert got and all(total > 5000 for total, *_ in got)
    # the server side of a connection to the VIP, or a backend's reply flow
    assert all(80 in (cli, srv) or 443 in (cli, srv) for _, cli, srv, _ in got)


def test_publishing_an_undeclared_type_is_refused():
    nf = mbx.NF("undeclared")
    port = nf.pub(mbx.FLOW_END)
    with pytest.raises(mbx.EventTypeError, match="cannot carry"):
        nf.publish(port, nf.new_msg(mbx.FLOW))
    other = mbx.NF("other")
    with pytest.raises(mbx.SubscriptionError, match="not one of this NF"):
        other.publish(port, other.new_msg(mbx.FLOW_END))


def test_an_unknown_message_field_lists_the_fields_an_nf_can_set():
    msg = mbx.NF("lister").new_msg(mbx.FLOW_START)
    with pytest.raises(AttributeError, match="has no field 'nope'") as err:
        msg.nope = 1
    listed = str(err.value).split("(fields: ")[1].rstrip(")").split(", ")
    assert "cli_port" in listed and "end_reason" in listed
    assert not [name for name in listed if name.startswith("_")]


def test_a_reader_cannot_rewrite(run, tmp_path):
    class Sneaky(mbx.NF):
        def __init__(self):
            super().__init__("sneaky")
            self.sub(mbx.PKT, lambda ev: ev.set_dst("198.18.9.9"))

    frames = [(1.0, ether(udp4("198.18.1.1", "198.18.0.1", 1, 2, b"x")))]
    with pytest.raises(mbx.NFError, match="sneaky.*writes=True"):
        run([Sneaky()], frames=frames)


def test_handler_errors_name_the_nf_handler_and_event(run, tmp_path):
    def broken(ev):
        raise ValueError("boom")

    nf = mbx.NF("fragile")
    nf.sub(mbx.FLOW_START, broken)
    frames = [(1.0, ether(udp4("198.18.1.1", "198.18.0.1", 1, 2, b"x")))]
    with pytest.raises(mbx.NFError, match=r"fragile: .*broken raised ValueError on a "
                                          r"FLOW/START event: boom"):
        run([nf], frames=frames)
    # the NF is released and can run again
    nf2 = mbx.NF("fragile2")
    nf2.sub(mbx.FLOW_START, lambda ev: None)
    run([nf2], frames=frames)


def test_idle_flows_expire_mid_capture(run, tmp_path):
    frames = [(float(t), ether(udp4("198.18.1.1", "198.18.0.1", 5000 + t, 53, b"q")))
              for t in range(0, 100, 10)]
    nf = mbx.NF("ends")
    ends = []
    nf.sub("FLOW/END", lambda ev: ends.append((ev.end_reason, ev.pkts_c2s)))
    counters, _ = run([nf], frames=frames, idle_timeout=5.0)
    assert counters["flows"]["expired"] == 9        # all but the last end while running
    assert ends.count((1, 1)) == 9 and ends[-1] == (3, 1)


@pytest.mark.parametrize("policy", ["evict", "refuse"])
def test_full_flow_table_policy(run, tmp_path, policy):
    frames = [(1.0 + i * 0.001, ether(udp4("198.18.1.1", "198.18.0.1", 6000 + i, 53, b"q")))
              for i in range(100)]
    rec = Recorder("rec", types=("FLOW", "PKT"))
    counters, out = run([rec], frames=frames, flow_capacity=16, flow_policy=policy)
    f = counters["flows"]
    if policy == "evict":
        assert f["evicted"] == 100 - 16 and f["refused"] == 0
        assert rec.count("FLOW/START") == 100 and rec.count("FLOW/END") == 100
    else:
        assert f["refused"] == 100 - 16 and f["evicted"] == 0
        assert rec.count("FLOW/START") == 16
    assert len(out) == 100          # tracking or not, nothing is lost


def test_non_ip_and_malformed_frames_follow_the_policy(run, example_pcap):
    counters, out = run([Recorder("r")], example_pcap)
    assert counters["parse"].get("not_ip", 0) >= 1
    bad = sum(v for k, v in counters["parse"].items() if k != "not_ip")
    assert bad >= 2
    counters2, out2 = run([Recorder("r2")], example_pcap, malformed="drop")
    assert counters2["dropped_malformed"] == bad
    assert len(out2) == len(out) - bad


def test_event_memory_smaller_than_a_burst_still_delivers_everything(run, example_pcap):
    big = Recorder("big")
    c1, _ = run([big], example_pcap)
    small = Recorder("small")
    c2, _ = run([small], example_pcap, msg_capacity=64, burst=256)
    assert small.seen == big.seen


def test_batch_handler_sees_and_counts_what_a_per_event_handler_does(run, example_pcap):
    # One batch handler on every event type of the TCP stack takes runs that mix
    # types (its records are then the header's): it must get the same events, in
    # the same order, as a per-event handler ahead of it, and its per-type counts
    # must be that handler's.  Its drops (every packet of TCP port 443's flows)
    # reach the NF behind it, which sees none of those packets' later events.
    seen = {"each": [], "batch": [], "after": []}

    class Each(mbx.NF):
        def __init__(self):
            super().__init__("each")
            self.sub("EVENT", lambda ev: seen["each"].append(
                (ev.type_name, ev.flow, ev.burst_pos)))

    class Batch(mbx.NF):
        def __init__(self):
            super().__init__("batch")
            self.sub("EVENT", self.on_batch, batch=True)

        def on_batch(self, recs):
            names = [mbx.event_type(int(t)).name for t in recs["type_id"]]
            flows = (recs["flow_gen"].astype(np.uint64) << 32) | recs["flow_slot"]
            ids = [None if slot == 0xFFFFFFFF else f            # no flow: None
                   for slot, f in zip(recs["flow_slot"].tolist(), flows.tolist(),
                                      strict=True)]
            seen["batch"].extend(zip(names, ids, recs["pos"].tolist(), strict=True))
            return np.array([n.startswith("PKT") for n in names]) & np.isin(
                flows, list(https_flows))

    class After(mbx.NF):
        def __init__(self):
            super().__init__("after")
            self.sub("PKT", lambda ev: seen["after"].append(ev.flow))

    class Https(mbx.NF):
        def __init__(self):
            super().__init__("https")
            self.sub("FLOW/START", self.on_start)

        def on_start(self, ev):
            if 443 in (ev.cli_port, ev.srv_port):
                https_flows.add(ev.flow)

    https_flows = set()
    counters, _ = run([Https(), Each(), Batch(), After()], example_pcap, stack="tcp")
    assert seen["batch"] == seen["each"]
    assert len({name for name, _, _ in seen["each"]}) >= 4       # runs mix types
    stats = counters["nfs"]
    assert stats["batch"]["types"] == stats["each"]["types"]
    assert stats["batch"]["events"] == len(seen["batch"])
    assert https_flows and not https_flows & set(seen["after"])
    assert stats["batch"]["drops"] == counters["dropped_by_nf"] > 0
