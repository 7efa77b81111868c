"""The μEvent type hierarchy: ids, the descendant rule, layouts, and errors."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mbx
from mbx._events import message_size


def test_builtin_paths_and_short_names():
    assert mbx.event_type("PKT") is mbx.PKT
    assert mbx.event_type("EVENT/PKT") is mbx.PKT
    assert mbx.event_type("flow/end") is mbx.FLOW_END
    assert mbx.event_type("END") is mbx.FLOW_END
    assert mbx.event_type(mbx.FLOW_START.id) is mbx.FLOW_START
    assert str(mbx.FLOW_END) == "FLOW/END"


def test_descendant_rule_is_one_way():
    assert mbx.FLOW_END.is_a(mbx.FLOW)
    assert mbx.FLOW_END.is_a(mbx.EVENT)
    assert not mbx.FLOW.is_a(mbx.FLOW_END)
    assert not mbx.PKT.is_a(mbx.FLOW)
    assert not mbx.FLOW_START.is_a(mbx.FLOW_END)


def test_header_is_one_cache_line():
    header, whole = message_size()
    assert header == 64
    assert whole == 64 + 128


def test_child_record_starts_with_parent_record():
    t = mbx.register_event_type("FLOW/TEST_CHILD", fields=[("score", "u32")])
    for name, (off, kind) in mbx.FLOW.fields.items():
        assert t.fields[name] == (off, kind)
    assert t.fields["score"][0] >= mbx.FLOW.body_size
    assert t.is_a(mbx.FLOW) and t.is_a("FLOW") and not mbx.FLOW.is_a(t)


def test_reregistering_is_idempotent_but_layout_must_match():
    a = mbx.register_event_type("TEST_SAME", fields=[("x", "u16")])
    assert mbx.register_event_type("TEST_SAME", fields=[("x", "u16")]) is a
    with pytest.raises(mbx.EventTypeError, match="already defined"):
        mbx.register_event_type("TEST_SAME", fields=[("x", "u32")])


def test_errors_name_what_is_wrong():
    with pytest.raises(mbx.EventTypeError, match="unknown event type 'PKT/TCPX'"):
        mbx.event_type("PKT/TCPX")
    with pytest.raises(mbx.EventTypeError, match="did you mean"):
        mbx.event_type("FLOW/STRAT")
    with pytest.raises(mbx.EventTypeError, match="unknown kind"):
        mbx.register_event_type("TEST_BADKIND", fields=[("x", "u128")])
    with pytest.raises(mbx.EventTypeError, match="bytes"):
        mbx.register_event_type("TEST_TOOBIG", fields=[(f"f{i}", "u64") for i in range(17)])
    with pytest.raises(mbx.EventTypeError, match="already defined"):
        mbx.register_event_type("TEST_SHADOW", parent="FLOW", fields=[("proto", "u8")])
    # a header column's name broke a batch subscriber's dtype during the run
    with pytest.raises(mbx.EventTypeError, match="field 'pkt' is already defined by a "
                                                 "parent type, the message header"):
        mbx.register_event_type("TEST_HDRCLASH", fields=[("pkt", "u32")])
    with pytest.raises(mbx.EventTypeError, match="field name 'a b' is not a name"):
        mbx.register_event_type("TEST_SPACE", fields=[("a b", "u8")])
    with pytest.raises(mbx.EventTypeError, match="fields are \\(name, kind\\) pairs"):
        mbx.register_event_type("TEST_PAIRS", fields="abc")
    with pytest.raises(mbx.EventTypeError, match="with parent= give a bare name"):
        mbx.register_event_type("X/Y", parent="FLOW")


def test_a_child_of_flow_tcp_has_room_for_a_u64_and_an_error_says_the_room():
    # The FLOW body grew by the VLAN ids; FLOW/TCP's fields, 8-byte ones first,
    # still leave room for a u64 (in their old order they left 6 bytes)
    t = mbx.register_event_type("TEST_TCP_U64", parent="FLOW/TCP", fields=[("n", "u64")])
    assert t.body_size == 128
    with pytest.raises(mbx.EventTypeError,
                       match=r"need 129 bytes, a message body holds 128, of which "
                             r"EVENT/FLOW/TCP's fields take 118, leaving 10"):
        mbx.register_event_type("TEST_TCP_U64_U8", parent="FLOW/TCP",
                                fields=[("n", "u64"), ("m", "u8")])


def test_failed_registrations_do_not_use_up_child_numbers():
    parent = mbx.register_event_type("TEST_CHILDREN")
    for _ in range(300):                        # more than a level holds (255)
        with pytest.raises(mbx.EventTypeError):
            mbx.register_event_type("BAD", parent=parent, fields=[("x", "u128")])
    child = mbx.register_event_type("GOOD", parent=parent)
    assert child.id == parent.id | (1 << (8 * parent.depth))


_names = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10), _names), min_size=1, max_size=12))
def test_hierarchy_rule_matches_paths(spec):
    """For random trees, is_a (one mask compare) equals the path-prefix relation."""
    made = []
    for parent_pick, name in spec:
        parents = [mbx.EVENT] + made
        parent = parents[parent_pick % len(parents)]
        path = f"{parent.path}/HY{name}"
        if parent.depth >= 7:
            continue
        made.append(mbx.register_event_type(f"HY{name}", parent=parent))
        assert made[-1].path == path
    everything = [mbx.EVENT, mbx.PKT, mbx.FLOW, mbx.FLOW_END] + made
    for x in everything:
        for y in everything:
            by_path = x.path == y.path or x.path.startswith(y.path + "/")
            assert x.is_a(y) == by_path, (x, y)


def test_messages_name_the_field_a_bad_value_was_for():
    t = mbx.register_event_type("TEST_MSG_VALUES", fields=[("a", "u8"), ("ip", "ip")])
    msg = mbx.Message(t)
    with pytest.raises(OverflowError, match=r"TEST_MSG_VALUES.a \(u8\) = 300"):
        msg.a = 300
    with pytest.raises(TypeError, match=r"TEST_MSG_VALUES.a \(u8\) = 1.5: expected a "
                                        r"whole number"):
        msg.a = 1.5
    # a bool is an int to Python, and was stored as 1 (filters refuse it already)
    with pytest.raises(TypeError, match=r"TEST_MSG_VALUES.a \(u8\) = True: expected a "
                                        r"whole number, not bool"):
        msg.a = True
    with pytest.raises(ValueError, match=r"TEST_MSG_VALUES.ip \(ip\) = b'12345': an "
                                         r"address is 4 or 16 bytes"):
        msg.ip = b"12345"
    msg.a, msg.ip = 7, "198.18.0.1"
    assert (msg.a, msg.ip) == (7, "198.18.0.1")
    # the flow a message belongs to is set as the docs say
    msg.flow = 5 | (3 << 32)
    assert msg.flow == 5 | (3 << 32)
    with pytest.raises(TypeError, match="flow must be a flow id"):
        msg.flow = "x"
    # refused when set, not at publish (OverflowError) nor taken as flow 1
    with pytest.raises(ValueError, match=r"flow must be a flow id .* 0 to 2\*\*64-1"):
        msg.flow = 2**64
    with pytest.raises(TypeError, match="flow must be a flow id .* not True"):
        msg.flow = True
    # numpy integers are whole numbers (operator.index takes them)
    msg.flow, msg.a = np.uint64(9), np.uint16(7)
    assert (msg.flow, msg.a) == (9, 7) and type(msg.flow) is int


def test_fill_from_copies_only_what_the_types_share(run, example_pcap):
    other = mbx.register_event_type("TEST_FILL_OTHER", fields=[("app", "u16")])
    got = {}

    class Filler(mbx.NF):
        def __init__(self):
            super().__init__("filler")
            self.sub(mbx.FLOW_END, self.on_end)

        def on_end(self, ev):
            unrelated, same = mbx.Message(other), mbx.Message(mbx.FLOW_END)
            unrelated.fill_from(ev)
            same.fill_from(ev)
            if ev.pkts_c2s:
                got.setdefault("unrelated", unrelated.app)
                got.setdefault("same", (same.pkts_c2s, ev.pkts_c2s))

    run([Filler()], example_pcap)
    assert got["unrelated"] == 0            # was a piece of the flow record
    assert got["same"][0] == got["same"][1] > 0


def test_fill_from_keeps_a_terminate_message_s_reason(run, example_pcap):
    # reason is a FLOW/TCP field that only TERMINATE sets: filled from ESTABLISHED
    # (reason 0), an NF's TERMINATE message lost its documented reason 3 (an NF asks)
    got = {}

    class Filler(mbx.NF):
        def __init__(self):
            super().__init__("filler")
            for t in ("FLOW/TCP/ESTABLISHED", "FLOW/TCP/TERMINATE", "FLOW/END"):
                self.sub(t, self.on)

        def on(self, ev):
            msg = self.new_msg("FLOW/TCP/TERMINATE")
            msg.fill_from(ev)
            got.setdefault(ev.type_name, set()).add((msg.reason, msg.cli_port == ev.cli_port))

    run([Filler()], example_pcap)
    assert got["FLOW/TCP/ESTABLISHED"] == {(3, True)}
    assert got["FLOW/END"] == {(3, True)}
    # a TERMINATE event's own reason (1 fin, 2 rst) is what it has in common
    assert got["FLOW/TCP/TERMINATE"] and {r for r, _ in got["FLOW/TCP/TERMINATE"]} <= {1, 2}


def test_misused_views_and_ports_raise_instead_of_crashing():
    # Each of these was a segfault.
    t = mbx.register_event_type("TEST_MISUSE")
    nf = mbx.NF("misuse")
    port = nf.pub(t)
    with pytest.raises(TypeError, match="publish takes a Message"):
        nf.publish(port, "hello")
    # it said "publish from a running NF", which reads as the opposite of the rule
    with pytest.raises(mbx.SubscriptionError, match="NF misuse: publish is for a running "
                                                    "NF"):
        nf.publish(port, nf.new_msg(t))
    with pytest.raises(TypeError):
        mbx.Message(mbx.PKT).fill_from(None)
    ev = mbx.Event()                    # a view made by hand: a blank EVENT
    assert (ev.type_name, ev.flow, ev.has_packet) == ("EVENT", None, False)
    with pytest.raises(mbx.MbxError, match="not in a handler call"):
        ev.drop()
    with pytest.raises(mbx.MbxError, match="not in a handler call"):
        ev.read(0, 1)
    # said "a EVENT event", or (a property) that EVENT had no field 'payload'
    with pytest.raises(AttributeError, match="^this EVENT event carries no packet$"):
        ev.set_src("198.18.0.1", 1)
    with pytest.raises(AttributeError, match=r"this EVENT event carries no packet "
                                             r"\(ev.payload reads it\)"):
        ev.payload  # noqa: B018


def test_declarations_are_made_once_and_before_the_run(run, example_pcap):
    nf = mbx.NF("twice")
    # any truthy value was a batch subscription: "no" too
    with pytest.raises(mbx.SubscriptionError, match="NF twice: batch for PKT is True or "
                                                    "False, not 'yes'"):
        nf.sub(mbx.PKT, lambda ev: None, batch="yes")
    nf.sub(mbx.PKT, lambda ev: None)
    with pytest.raises(mbx.SubscriptionError, match="already subscribed to PKT"):
        nf.sub(mbx.PKT, lambda ev: None)     # replaced the first one silently
    late = mbx.register_event_type("TEST_LATE_PUB")
    for what in ("pub", "filter"):
        class Late(mbx.NF):
            def __init__(self, what=what):
                super().__init__(f"late_{what}")
                self.sub(mbx.FLOW_START, self.on_start)

            def on_start(self, ev, what=what):
                if what == "pub":
                    self.pub(late)          # got past the Controller's link check
                else:
                    self.filter(mbx.FLOW_START, proto="udp")   # was ignored

        with pytest.raises(mbx.NFError, match=f"{what}.* before the run starts"):
            run([Late()], example_pcap)


def test_current_nf_is_the_one_running_in_this_thread(example_pcap):
    # The running NF was one global: Apps in other threads saw each other's NF
    # (mb_up_sub, mb_new_msg then act on another App's NF).
    import threading

    from mbx.api import current_nf
    from mbx.ports import open_input
    from mbx.runtime import App

    wrong = []

    class Who(mbx.NF):
        def __init__(self, name):
            super().__init__(name)
            self.sub(mbx.PKT, self.on_pkt)

        def on_pkt(self, ev):
            if current_nf() is not self:
                wrong.append(self.name)

    def run_one(k):
        for _ in range(3):
            inp = open_input(f"pcap:{example_pcap}")
            try:
                App([Who(f"who{k}")]).run(inp)
            finally:
                inp.close()

    import sys

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)     # threads take turns often, inside dispatch too
    try:
        threads = [threading.Thread(target=run_one, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
    finally:
        sys.setswitchinterval(interval)
    assert not wrong, f"{len(wrong)} events saw another thread's NF"


def test_current_nf_comes_back_after_a_run_inside_a_handler(example_pcap):
    from mbx.api import current_nf
    from mbx.ports import open_input
    from mbx.runtime import App

    seen = []

    class Outer(mbx.NF):
        def __init__(self):
            super().__init__("outer")
            self.sub(mbx.FLOW_START, self.on_start)

        def on_start(self, ev):
            if seen:
                return
            inner = open_input(f"pcap:{example_pcap}")
            try:
                App([mbx.NF("inner")]).run(inner)
            finally:
                inner.close()
            seen.append(current_nf().name)

    inp = open_input(f"pcap:{example_pcap}")
    try:
        App([Outer()]).run(inp)
    finally:
        inp.close()
    assert seen == ["outer"]


def test_a_batch_subscription_prepares_numpy_before_the_run():
    # numpy was imported (about 80 ms) when the first batch was dispatched: on a
    # live bridge the first packet waited for it.
    import subprocess
    import sys

    code = ("import sys, mbx\n"
            "from mbx._events import EventBus\n"
            "nf = mbx.NF('b')\n"
            "nf.sub(mbx.PKT, lambda recs: None, batch=True)\n"
            "before = 'numpy' in sys.modules\n"
            "bus = EventBus([nf])\n"
            "print(before, 'numpy' in sys.modules)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=60)
    assert r.stdout.split() == ["False", "True"], r.stderr


def test_unknown_type_named_by_a_file_says_why(tmp_path):
    # An NF file subscribing by name to a type a file later in the chain registers
    # got "unknown event type 'PORTSCAN'": no names to choose from, though the guide
    # promises the closest, and no word of the chain's order.
    import subprocess
    import sys

    (tmp_path / "uses.py").write_text(
        "import mbx\nnf = mbx.NF('uses')\nnf.sub('PORTSCAN', lambda ev: None)\n")
    (tmp_path / "defines.py").write_text(
        "import mbx\nPS = mbx.register_event_type('PORTSCAN', fields=[('n', 'u16')])\n"
        "nf = mbx.NF('defines')\nnf.pub(PS)\n")

    def check(app):
        return subprocess.run([sys.executable, "-m", "mbx.cli", "check", app],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)

    r = check("uses.py+defines.py")
    assert r.returncode == 2
    assert "uses.py, line 3" in r.stderr and "unknown event type 'PORTSCAN'" in r.stderr
    assert "(known: PKT, FLOW, FLOW/START" in r.stderr
    assert "list the file before the NF that uses the type" in r.stderr
    r = check("defines.py+uses.py")
    assert r.returncode == 0, r.stderr
    # a typo has its close matches, and no such hint
    with pytest.raises(mbx.EventTypeError, match=r"\(did you mean FLOW/END, [^;]*\)$"):
        mbx.event_type("FLOW/ED")
