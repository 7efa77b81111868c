"""docs/ names what is public: the keys mbx run writes, the parameters of the
functions api.md gives a signature for, and the test bed's report options."""
import inspect
import json
import os
import re
import subprocess
import sys

import mbx
import mbx.flows
import mbx.ports

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _doc(name):
    with open(os.path.join(ROOT, "docs", name)) as fh:
        return " ".join(fh.read().split())


def test_api_md_names_every_key_of_mbx_run_json(example_pcap, tmp_path):
    # elapsed_s was written by every mbx run --json and named nowhere
    counters = tmp_path / "c.json"
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "run", "flow_stats", "--in",
                        f"pcap:{example_pcap}", "-q", "--json", str(counters)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    # named in code spans, alone or in a list (`packets bytes sent`)
    said = {w for span in re.findall(r"`([^`]+)`", _doc("api.md")) for w in span.split()}
    missing = [k for k in json.loads(counters.read_text()) if k not in said]
    assert not missing


def test_api_md_signatures_have_every_parameter():
    # open_input's sends_there and flows_json's stop were left out
    api = _doc("api.md")
    # (where the signature is given, not an example call)
    for fn, where in ((mbx.ports.open_input, "`mbx.ports.open_input(spec"),
                      (mbx.flows.flows_json, "`mbx.flows.flows_json(capture")):
        said = api[api.index(where) + where.index("(") + 1:]
        said = said[:said.index(")`")]
        for name in inspect.signature(fn).parameters:
            assert re.search(rf"\b{name}\b", said), (fn.__name__, name, said)


def test_chandler_is_named_where_it_is_exported():
    assert mbx.CHandler is mbx._events.CHandler and "CHandler" in mbx.__all__
    assert "`mbx.CHandler`" in _doc("api.md")


def test_testbed_md_names_every_report_option():
    # report --pending was in the code only
    r = subprocess.run([sys.executable, "-m", "benchmarks.testbed", "report", "--help"],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    options = set(re.findall(r"(--[a-z][a-z-]+)", r.stdout)) - {"--help"}
    assert options == {"--plot", "--pending"}
    doc = _doc("testbed.md")
    usage = doc[doc.index("`report FILE..."):]
    usage = usage[:usage.index("`", 1)]
    for opt in options:
        assert opt in usage, (opt, usage)


def test_guide_port_counter_runs_on_its_own_as_under_mbx_run(example_pcap, tmp_path):
    # The guide says the PortCounter file run on its own (its mb_nf_run()) runs the
    # same NFs as mbx run; its code had no mb_nf_run() and, run so, did nothing.
    with open(os.path.join(ROOT, "docs", "guide.md")) as fh:
        blocks = re.findall(r"```python\n(.*?)```", fh.read(), re.S)
    [code] = [b for b in blocks if "class PortCounter(mbx.NF)" in b]
    path = tmp_path / "port_counter.py"
    path.write_text(code)
    reports = []
    for cmd in ([sys.executable, str(path)], [sys.executable, "-m", "mbx.cli", "run",
                                              str(path)]):
        r = subprocess.run([*cmd, "--in", f"pcap:{example_pcap}"], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        [line] = [x for x in r.stdout.splitlines() if x.startswith("  port_counter ")]
        assert "port 80 " in line
        reports.append(line)
    assert reports[0] == reports[1]


def test_api_md_gives_statsview_its_defaults():
    # api.md said every=1.0; the default is None: 1 s on a terminal, 10 s otherwise
    from mbx.stats import StatsView

    assert f"`StatsView{inspect.signature(StatsView)}`" in _doc("api.md")
    assert StatsView.LOG_EVERY_S == 10.0 and "(10 s)" in _doc("api.md")


def test_api_md_names_every_public_method_of_event_type():
    # EventType.overlaps was public (and used by the checks) but named nowhere
    api = _doc("api.md")
    methods = [n for n in dir(mbx.EventType) if not n.startswith("_")
               and callable(getattr(mbx.EventType, n))]
    assert "overlaps" in methods
    assert not [n for n in methods if f"`{n}(" not in api]
    assert mbx.DATA_RDY.overlaps(mbx.EVENT) and mbx.EVENT.overlaps(mbx.DATA_RDY)
    assert not mbx.EVENT.is_a(mbx.DATA_RDY)


def test_guide_application_file_with_every_key_runs_clean(example_pcap, tmp_path):
    # its group "inspect" had one member: every check and run of the documented
    # example warned "parallel group(s) of one NF: 'inspect'"
    with open(os.path.join(ROOT, "docs", "guide.md")) as fh:
        blocks = re.findall(r"```toml\n(.*?)```", fh.read(), re.S)
    [app] = [b for b in blocks if "[app]" in b and 'group = "inspect"' in b]
    (tmp_path / "app.toml").write_text(app)
    with open(os.path.join(ROOT, "mbx", "examples", "ids.py")) as src:
        (tmp_path / "ids.py").write_text(src.read())
    for args in (["check", "app.toml"], ["run", "app.toml", "--in", f"pcap:{example_pcap}",
                                          "-q"]):
        r = subprocess.run([sys.executable, "-m", "mbx.cli", *args], capture_output=True,
                           text=True, timeout=300, cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert "warning" not in r.stderr, r.stderr
        if args[0] == "check":
            assert r.stdout.count("(parallel group inspect, merge any)") == 2, r.stdout


def test_guide_batch_blocklist_drops_what_the_record_layout_says(example_pcap):
    # The guide's batch blocklist relies on the record layout it documents (an ip
    # field is 16 bytes, IPv4 zero-padded, told apart by ip_ver): it must drop
    # exactly the blocked sources' packets.  And flow_slot/flow_gen make ev.flow.
    from mbxtest import run_app

    with open(os.path.join(ROOT, "docs", "guide.md")) as fh:
        blocks = re.findall(r"```python\n(.*?)```", fh.read(), re.S)
    [code] = [b for b in blocks if "class Blocklist(mbx.NF)" in b]
    ns = {}
    exec(compile(code, "blocklist.py", "exec"), ns)
    dropped = []

    class ByEvent(mbx.NF):      # the same, one event at a time
        def __init__(self):
            super().__init__("by_event")
            self.sub(mbx.PKT, self.on_pkt)

        def on_pkt(self, ev):
            if str(ev.src) in ns["BLOCKED"]:
                dropped.append(ev.ts)
                ev.drop()

    _, everything = run_app([], example_pcap)
    _, reference = run_app([ByEvent()], example_pcap)
    _, out = run_app([ns["nf"]], example_pcap)
    assert 0 < len(dropped) == ns["nf"].report()["dropped"]
    assert out == reference and len(out) < len(everything)

    flows, from_batch = [], []

    class Both(mbx.NF):
        def __init__(self):
            super().__init__("both")
            self.sub(mbx.FLOW_END, lambda ev: flows.append(ev.flow))
            self.sub(mbx.FLOW_START, self.on_batch, batch=True)

        def on_batch(self, recs):
            from_batch.extend(int(g) << 32 | int(s)
                              for g, s in zip(recs["flow_gen"], recs["flow_slot"],
                                              strict=True))

    run_app([Both()], example_pcap)
    assert flows and sorted(flows) == sorted(from_batch)
    dt = mbx.PKT.dtype
    assert dt["src"].shape == (16,) and dt["snapshot"].shape == (24,)
