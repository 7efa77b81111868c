"""The paper's function form (mbx.api) and how a script or a file's NFs are found:
what runs is what the user wrote, and nothing else runs in its place."""
import json
import re
import subprocess
import sys
import textwrap

import pytest

import mbx

MBX = [sys.executable, "-m", "mbx.cli"]

COUNTER = """
import mbx

class C(mbx.NF):
    def __init__(self, name):
        super().__init__(name)
        self.n = 0
        self.sub(mbx.FLOW_START, self.on)

    def on(self, ev):
        self.n += 1

    def report(self):
        return {"n": self.n}
"""


def _script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(COUNTER + textwrap.dedent(body))
    return str(path)


def _python(path, *args):
    return subprocess.run([sys.executable, path, *args], capture_output=True, text=True,
                          timeout=300)


def test_script_on_its_own_runs_the_nfs_mbx_run_finds(tmp_path, example_pcap):
    # A list of NFs at top level: mbx run runs both, and so must the script run on
    # its own; it ran an empty implicit NF instead, and both counted 0.
    path = _script(tmp_path, "two.py", """
        nfs = [C("a"), C("b")]
        mbx.mb_nf_run()
        print("counted", *[nf.n for nf in nfs])
        """)
    r = _python(path, "--in", f"pcap:{example_pcap}", "-q")
    assert r.returncode == 0, r.stderr
    a, b = map(int, r.stdout.split("counted", 1)[1].split())
    assert a == b > 0


def test_script_with_no_nf_it_can_find_is_refused(tmp_path, example_pcap):
    # An NF only a function's local holds: mbx run finds none, and says so; the
    # script on its own ran an implicit NF with no subscription, silently.
    path = _script(tmp_path, "local.py", """
        def main():
            a = C("a")
            mbx.mb_nf_run()
            print("counted", a.n)

        main()
        """)
    r = _python(path, "--in", f"pcap:{example_pcap}", "-q")
    # exit status 2 and the prefix, as mbx says an error (it was 1 and "error:")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("local.py: error: ") and "nor would mbx run" in r.stderr
    assert "mb_nf_run() found no NF" in r.stderr and "local.py" in r.stderr
    assert "counted" not in r.stdout
    r = subprocess.run([*MBX, "run", path, "--in", f"pcap:{example_pcap}", "-q"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "defines no NF" in r.stderr


MB_MAKE = """
import mbx
from mbx import mb_sub
from mbx.api import current_nf

def on(ev):
    pass

def make():
    mb_sub(mbx.FLOW_START, on)
    return current_nf()
"""


def test_mb_calls_in_make_act_on_an_nf_of_each_file(tmp_path, monkeypatch):
    # make() ran after the file's loading context had ended: its mb_* calls fell to
    # one NF named after __main__ ("mbx" under mbx run), shared by every such file,
    # so a second one failed ("already subscribed to FLOW/START").
    from mbx.runtime import load_app

    for name in ("api_one", "api_two", "api_mod"):
        (tmp_path / f"{name}.py").write_text(MB_MAKE)
    (tmp_path / "api_top.py").write_text(MB_MAKE.replace(
        "def make():", "mb_sub(mbx.FLOW_END, on)\nnf = current_nf()\n\ndef make():"))
    monkeypatch.syspath_prepend(str(tmp_path))
    nfs = load_app(f"{tmp_path / 'api_one.py'}+{tmp_path / 'api_two.py'}"
                   "+api_mod:make+api_top:nf")
    assert [nf.name for nf in nfs] == ["api_one", "api_two", "api_mod", "api_top"]
    assert len(set(map(id, nfs))) == 4
    assert all(len(nf.subs) == 1 for nf in nfs)


def test_mb_publish_event_publishes_as_the_nf_whose_handler_runs(run, example_pcap):
    # It published as the port's NF: NF a holding NF b's port published as b (a
    # subscriber saw b as the publisher), where a.publish(port_b, msg) is refused.
    from mbx import mb_new_msg, mb_publish_event
    from mbx.errors import SubscriptionError

    t = mbx.register_event_type("TEST_API_XPUB", fields=[("v", "u8")])
    a, b, c = mbx.NF("a"), mbx.NF("b"), mbx.NF("c")
    port_a, port_b = a.pub(t), b.pub(t)
    b.sub(mbx.FLOW_END, lambda ev: None)
    tried = []

    def on_start(ev):
        if tried:
            return
        for port in (port_b, port_a):
            msg = mb_new_msg(t)
            msg.v = 1
            try:
                mb_publish_event(port, msg)
                tried.append("published")
            except SubscriptionError as exc:
                tried.append(str(exc))

    a.sub(mbx.FLOW_START, on_start)
    publishers = []
    c.sub(t, lambda ev: publishers.append(ev.publisher))
    run([a, b, c], example_pcap)
    assert tried == ["NF a: <PubPort b:TEST_API_XPUB> is not one of this NF's "
                     "publication ports", "published"]
    assert publishers == [1]        # 1 + a's position in the chain, not b's 2


def test_mb_publish_event_refuses_what_is_no_port_before_making_an_nf():
    # outside a handler it fell back to the script's implicit NF, made for the
    # occasion (an empty NF that then ran), and the error named that NF
    from mbx import api, mb_publish_event

    before = api._stack().implicit
    with pytest.raises(TypeError, match="'not a port' is not an output port"):
        mb_publish_event("not a port", None)
    assert api._stack().implicit is before
    with api.loading("loaded") as created:
        with pytest.raises(TypeError, match="is not an output port"):
            mb_publish_event(None, None)
    assert created == []


def test_a_report_json_cannot_carry_becomes_an_error_and_json_stays_valid(
        tmp_path, example_pcap):
    # report() returning NaN or an infinity went into --json as NaN/Infinity,
    # which json.dumps writes by default and no JSON reader (jq, JSON.parse) takes.
    from mbx.runtime import take_report

    nf = _script(tmp_path, "nanr.py", """
        nf = C("nanr")
        nf.report = lambda: {"ratio": float("nan"), "peak": float("inf")}
        """)
    out = tmp_path / "counters.json"
    r = subprocess.run([*MBX, "run", nf, "--in", f"pcap:{example_pcap}", "-q",
                        "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    text = out.read_text()

    def refuse(const):
        raise AssertionError(f"--json wrote {const}")

    report = json.loads(text, parse_constant=refuse)["nfs"]["nanr"]["report"]
    assert report["error"].startswith("NF nanr: report(): ValueError: Out of range")
    neg = mbx.NF("neg")
    neg.report = lambda: {"low": float("-inf")}
    assert "error" in take_report(neg)


def test_set_converts_options_annotated_optional(tmp_path):
    # --set text reached make() as a str for an option annotated int | None (only
    # bare bool/int/float annotations were converted): "010" stayed "010".
    from mbx.runtime import load_app

    (tmp_path / "opt_nf.py").write_text(textwrap.dedent("""
        from typing import Optional

        import mbx

        def make(maybe: int | None = None, ratio: Optional[float] = None,
                 on: bool | None = None):
            nf = mbx.NF("opt_nf")
            nf.sub(mbx.FLOW_END, lambda ev: None)
            nf.got = (maybe, ratio, on)
            return nf
        """))
    path = str(tmp_path / "opt_nf.py")
    [nf] = load_app(path, {"opt_nf": {"maybe": "010", "ratio": "2.5", "on": "yes"}})
    assert nf.got == (10, 2.5, True)
    [nf] = load_app(path)
    assert nf.got == (None, None, None)
    [nf] = load_app(path, {"opt_nf": {"maybe": "None", "ratio": "none", "on": "NONE"}})
    assert nf.got == (None, None, None)
    # the same with `from __future__ import annotations`: annotations are strings
    text = (tmp_path / "opt_nf.py").read_text()
    (tmp_path / "opt_nf2.py").write_text("from __future__ import annotations\n" + text)
    [nf] = load_app(str(tmp_path / "opt_nf2.py"),
                    {"opt_nf2": {"maybe": "010", "ratio": "2.5", "on": "yes"}})
    assert nf.got == (10, 2.5, True)


def test_a_port_used_the_wrong_way_is_an_error(tmp_path):
    # App.run(output) read 0 packets, App.run(inp, closed or an input as out) "sent"
    # nothing: each without a word.
    from mbx.examples.capture import write_example
    from mbx.ports import open_input, open_output

    cap = str(tmp_path / "ex.pcap")
    write_example(cap, flows=5, seed=1)
    fwd = mbx.NF("fwd")
    fwd.sub(mbx.PKT, lambda ev: None)
    out = open_output(f"pcap:{tmp_path / 'out.pcap'}")
    with pytest.raises(mbx.PortError, match=r"out\.pcap: it is an output: it cannot be "
                                            r"read"):
        mbx.App([]).run(out)
    out.close()
    inp, other = open_input(f"pcap:{cap}"), open_input(f"pcap:{cap}")
    with pytest.raises(mbx.PortError, match=r"ex\.pcap: it is an input: it cannot send"):
        mbx.App([fwd]).run(inp, other)
    inp.close()
    other.close()
    with pytest.raises(mbx.PortError, match=r"ex\.pcap: closed: it cannot be read"):
        mbx.App([]).run(inp)


def test_an_error_without_a_message_is_quoted_without_an_empty_one(example_pcap):
    # "NF k1: stop() raised KeyboardInterrupt:  (at kbi.py, line 9)": a bare raise
    # left an empty message after its colon, in every error that quoted another.
    from mbx.errors import exc_text
    from mbx.ports import open_input

    assert exc_text(ValueError()) == "ValueError"
    assert exc_text(ValueError("bad")) == "ValueError: bad"
    nf = mbx.NF("e")

    def on(ev):
        raise ValueError()

    nf.sub(mbx.PKT, on)
    with pytest.raises(mbx.NFError) as err:
        mbx.App([nf]).run(open_input(f"pcap:{example_pcap}"))
    assert re.fullmatch(r"NF e: .*on raised ValueError on a PKT event \(at test_api\.py, "
                        r"line \d+\)", str(err.value)), str(err.value)


# None for an argument typed as one of mbx's C classes (a Batch, a Port, an
# EventBus, a Message) was read as the C struct it stands for: a segfault, not an
# error.  Each call runs in a child so that a regression kills the child, not pytest.
_NONE_CALLS = {
    "input receive": "open_input(cap).receive(None)",
    "input send": "open_input(cap).send(None)",
    "output send": "open_output(cap + '.out').send(None)",
    "stack bus": "NetworkLayer(None)",
    "stack process": "NetworkLayer(EventBus([])).process(None)",
    "stack run": "NetworkLayer(EventBus([])).run(None)",
    "monitor bus": "TcpMonitor(None)",
    "monitor process": "TcpMonitor(EventBus([])).process(None)",
    "bus publish_from": "EventBus([nf]).publish_from(nf, None)",
    "bridge_counters": "bridge_counters(None, None, None, 0)",
    "fill_from": "nf.new_msg('FLOW').fill_from(None)",
}


@pytest.mark.parametrize("call", sorted(_NONE_CALLS))
def test_none_for_a_c_class_argument_is_a_type_error_not_a_crash(call, example_pcap):
    code = textwrap.dedent(f"""
        from mbx import NF
        from mbx._events import EventBus
        from mbx._monitor import TcpMonitor
        from mbx._packet import bridge_counters
        from mbx._stack import NetworkLayer
        from mbx.ports import open_input, open_output
        cap, nf = "pcap:{example_pcap}", NF("n")
        try:
            {_NONE_CALLS[call]}
        except TypeError as e:
            print("TypeError:", e)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, f"rc {r.returncode}: {r.stderr[-2000:]}"
    assert re.match(r"TypeError: Argument '\w+' has incorrect type \(expected mbx\.\w+\.\w+, "
                    r"got NoneType\)", r.stdout), r.stdout + r.stderr


def test_script_on_its_own_fails_as_mbx_run_fails(tmp_path, example_pcap):
    # A script run on its own said errors as "error: ..." with exit status 1, where
    # mbx says "mbx: error: ..." with 2; and a make() meant for mbx run was answered
    # "nor would mbx run", which would call it.
    path = _script(tmp_path, "maker.py", """
        def make():
            return [C("a")]

        mbx.mb_nf_run()
        """)
    r = _python(path, "--in", f"pcap:{example_pcap}", "-q")
    assert r.returncode == 2, r.stderr
    assert "its make() is for mbx run" in r.stderr and "nor would" not in r.stderr
    path = _script(tmp_path, "one.py", """
        nfs = [C("a")]
        mbx.mb_nf_run()
        """)
    r = _python(path, "--in", f"pcap:{tmp_path}/missing.pcap", "-q")
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("one.py: error: pcap:"), r.stderr
