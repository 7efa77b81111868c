"""Per NF statistics (events in, drops, handler time), ``mbx run --stats`` and the
Prometheus exporter."""
import argparse
import contextlib
import io
import json
import re
import socket
import sys
import threading
import time
import urllib.request

# a declared test dependency (the [test] extra): missing, these tests fail, not skip
import prometheus_client  # noqa: F401
import pytest

import mbx
from mbx import cli
from mbx.examples import cnoop


class Calls(mbx.NF):
    def __init__(self, name, etype="EVENT", drop_every=0):
        super().__init__(name)
        self.calls = 0
        self.drop_every = drop_every
        self.sub(etype, self.on_event)

    def on_event(self, ev):
        self.calls += 1
        if self.drop_every and ev.has_packet and self.calls % self.drop_every == 0:
            ev.drop()


def test_events_in_equal_delivered(run, example_pcap):
    a = Calls("a", "EVENT", drop_every=7)
    rows = []
    b = mbx.NF("b")
    b.sub("PKT", lambda recs: rows.append(len(recs)), batch=True)
    c = cnoop.make_counter("c", "FLOW")
    counters, _ = run([a, b, c], example_pcap)
    nfs = counters["nfs"]
    assert nfs["a"]["events"] == a.calls
    assert nfs["b"]["events"] == sum(rows)
    assert nfs["c"]["events"] == c.counter.total
    assert nfs["a"]["drops"] == counters["dropped_by_nf"] > 0
    assert nfs["b"]["drops"] == nfs["c"]["drops"] == 0
    # per NF per type sums to the bus's per type delivered counts
    for name, e in counters["events"].items():
        assert sum(n["types"].get(name, 0) for n in nfs.values()) == e["delivered"]
    assert sum(nfs["a"]["types"].values()) == a.calls
    assert nfs["a"]["handler_ns"] > 0 and nfs["a"]["mean_ns"] > 0
    assert nfs["b"]["handler_ns"] > 0


def test_handler_time_is_each_nfs_own(run, example_pcap):
    # Runs of calls are clocked as a whole: the time of a handler that sleeps on
    # some events is its own, not its neighbours' in the chain, and covers every
    # sleep (whether the sleeping call is first, inside or last in its run).
    import time

    class Sleepy(Calls):
        def on_event(self, ev):
            super().on_event(ev)
            if self.calls % 50 == 1:
                time.sleep(0.002)

    before, sleepy, after = Calls("before", "PKT"), Sleepy("sleepy", "PKT"), Calls("after", "PKT")
    counters, _ = run([before, sleepy, after], example_pcap)
    nfs = counters["nfs"]
    sleeps = (sleepy.calls + 49) // 50
    assert sleeps >= 3
    assert nfs["sleepy"]["handler_ns"] >= sleeps * 2_000_000
    for neighbour in ("before", "after"):
        assert nfs[neighbour]["handler_ns"] < nfs["sleepy"]["handler_ns"] / 2


def test_run_loop_cpu_time_is_counted(run, example_pcap):
    # The stack thread's CPU time in its run loop: some, and no more than the loop's
    # wall-clock time (a thread cannot run longer than the loop lasted).
    counters, _ = run([Calls("a")], example_pcap)
    t = counters["timing"]
    assert 0 < t["run_cpu_s"] <= t["run_s"] * 1.01 + 1e-4


def test_timing_off(run, example_pcap):
    from mbx.stats import nf_table

    a = Calls("a")
    counters, _ = run([a], example_pcap, nf_timing=False)
    assert counters["nfs"]["a"]["events"] == a.calls > 0
    assert counters["nfs"]["a"]["handler_ns"] == 0
    # the table says the time was not taken, not that it was 0 ns
    assert nf_table(counters["nfs"])[1].split()[-2:] == ["-", "0%"]
    timed, _ = run([Calls("a")], example_pcap)
    assert nf_table(timed["nfs"])[1].split()[-2].isdigit()


def test_no_nf_timing_says_what_it_does():
    # --help and the guide said it saved about 40 ns an event: that was the clock
    # per call; handler time is now clocked per run of calls and costs nothing
    # measurable (docs/results.md).  What the option does is what test_timing_off sees.
    import pathlib

    ap = argparse.ArgumentParser()
    cli._add_run_options(ap)
    help_text = " ".join(next(a.help for a in ap._actions
                              if "--no-nf-timing" in a.option_strings).split())
    guide = (pathlib.Path(__file__).parent.parent / "docs" / "guide.md").read_text()
    row = next(line for line in guide.splitlines() if line.startswith("| `--no-nf-timing`"))
    for text in (help_text, row):
        assert "40 ns" not in text and "measurable" in text
        assert "handler_ns" in text and "share one ring" in text


@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
def test_cli_stats(example_pcap, tmp_path, capsys, deploy):
    rc = cli.main(["run", "mbx.examples.cnoop:make_counter", "--in", "pcap:" + example_pcap,
                   "--stats", "--deploy", deploy, "--json", str(tmp_path / "c.json")])
    assert rc == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["nfs"]["ccount"]["events"] == c["events"]["PKT"]["delivered"] > 0
    out = capsys.readouterr().out
    assert "NF stats" in out
    line = next(x for x in out.splitlines() if x.strip().startswith("ccount"))
    assert int(line.split()[1].replace(",", "")) == c["nfs"]["ccount"]["events"]


BOOM_NF = """
import mbx


def make():
    nf = mbx.NF("boom")
    seen = [0]

    def on_pkt(ev):
        seen[0] += 1
        if seen[0] == 300:
            raise RuntimeError("boom")

    nf.sub("PKT", on_pkt)
    return nf
"""


@pytest.mark.parametrize("extra", [[], ["--stacks", "2"]])
def test_cli_stats_table_ends_a_failed_run_too(example_pcap, tmp_path, capsys, extra):
    # A run that failed kept its summary and --json, but --stats printed no table.
    path = tmp_path / "boom.py"
    path.write_text(BOOM_NF)
    rc = cli.main(["run", str(path), "--in", "pcap:" + example_pcap, "--stats",
                   "--json", str(tmp_path / "c.json"), *extra])
    assert rc == 2
    c = json.loads((tmp_path / "c.json").read_text())
    assert "boom" in c["error"]
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("boom "))
    assert int(line.split()[1].replace(",", "")) == c["nfs"]["boom"]["events"] > 0


def test_only_the_stats_table_takes_the_progress_lines_place(example_pcap, capsys,
                                                              monkeypatch):
    # --prometheus shows nothing on the terminal, yet it turned the progress line off.
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    for extra, shown in ((["--prometheus", "0"], True), (["--stats"], False), ([], True)):
        assert cli.main(["run", "l2fwd", "--in", "pcap:" + example_pcap, *extra]) == 0
        err = capsys.readouterr().err
        assert ("pkts" in err and "pps" in err) == shown, (extra, err)


def test_slow_rates_are_given_in_packets_per_second():
    # a slow run (a live link, a slow NF) printed "0.000 Mpps"
    assert cli._rate(904.4) == "904 pps" and cli._rate(9_999) == "9,999 pps"
    assert cli._rate(41_000) == "0.041 Mpps" and cli._rate(7.6e6) == "7.600 Mpps"


SLOW_NF = """
import time
import urllib.request

import mbx


def make(port, out):
    nf = mbx.NF("slow")

    def on_pkt(ev):
        time.sleep(0.0005)
        if ev.dir == 1:
            ev.drop()

    def stop():
        # the run is over: the exporter has the last counters and still serves
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            open(out, "w").write(r.read().decode())

    nf.sub("PKT", on_pkt)
    nf.stop = stop
    return nf
"""


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(text, name, labels=""):
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return None if m is None else float(m.group(1))


@contextlib.contextmanager
def scraping(url):
    """Scrape ``url`` every 50 ms in a thread while the block runs; yields the pages."""
    pages = []
    done = threading.Event()

    def scrape():
        while not done.is_set():
            try:
                with urllib.request.urlopen(url, timeout=2) as r:
                    pages.append(r.read().decode())
            except OSError:
                pass
            time.sleep(0.05)

    t = threading.Thread(target=scrape, daemon=True)
    t.start()
    try:
        yield pages
    finally:
        done.set()
        t.join()


@contextlib.contextmanager
def scraping_to_the_end(url):
    """Scrape ``url`` in a thread until a page says ``mbx_run_ended 1`` (60 s at
    most), for a run with --prometheus-linger; yields the pages, the final one last
    once the block is done."""
    pages = []

    def scrape():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(url, timeout=2) as r:
                pages.append(r.read().decode())
                if _metric(pages[-1], "mbx_run_ended") == 1:
                    return
            time.sleep(0.02)

    t = threading.Thread(target=scrape, daemon=True)
    t.start()
    try:
        yield pages
    finally:
        t.join()


def test_prometheus_scrape(example_pcap, tmp_path):
    path = tmp_path / "slow.py"
    path.write_text(SLOW_NF)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with scraping(url) as live:
        rc = cli.main(["run", str(path), "--in", "pcap:" + example_pcap, "--burst", "1",
                       "--set", f"slow.port={port}", "--set", f"slow.out={tmp_path / 'end'}",
                       "--prometheus", str(port), "-q", "--json", str(tmp_path / "c.json")])
    assert rc == 0
    c = json.loads((tmp_path / "c.json").read_text())
    # scraped while it ran: counters on their way
    during = [v for v in (_metric(x, "mbx_packets_total") for x in live) if v is not None]
    assert during and any(0 < v < c["packets"] for v in during)
    # scraped at the end (by the NF's stop()): the final figures
    text = (tmp_path / "end").read_text()
    assert _metric(text, "mbx_packets_total") == c["packets"]
    assert _metric(text, "mbx_bytes_total") == c["bytes"]
    assert _metric(text, "mbx_dropped_total", '{by="nf"}') == c["dropped_by_nf"] > 0
    assert _metric(text, "mbx_flows_total", '{what="created"}') == c["flows"]["created"]
    assert (_metric(text, "mbx_events_delivered_total", '{type="PKT"}')
            == c["events"]["PKT"]["delivered"])
    assert _metric(text, "mbx_nf_events_total", '{nf="slow"}') == c["nfs"]["slow"]["events"]
    assert _metric(text, "mbx_nf_drops_total", '{nf="slow"}') == c["dropped_by_nf"]
    assert _metric(text, "mbx_nf_handler_seconds_total", '{nf="slow"}') > 0.0005 * 100
    # the ports' counters are in the live snapshots too
    assert _metric(text, "mbx_port_dropped_total", '{dir="rx",port="in"}') == 0
    with pytest.raises(OSError):        # the server ends with the run
        urllib.request.urlopen(url, timeout=1)


@pytest.mark.parametrize("extra", [[], ["--stacks", "2"]])
def test_prometheus_linger_serves_the_final_counters_until_a_scrape(
        example_pcap, tmp_path, capsys, extra):
    # A run shorter than Prometheus's scrape interval ended with its exporter, and
    # its counts were never scraped: --prometheus-linger keeps the final counters
    # up until a scrape has read them.
    port = _free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with scraping_to_the_end(url) as pages:
        t0 = time.monotonic()
        rc = cli.main(["run", "l2fwd", "--in", "pcap:" + example_pcap, "--prometheus",
                       str(port), "--prometheus-linger", "60", "--json",
                       str(tmp_path / "c.json")] + extra)
        took = time.monotonic() - t0
    final = [page for page in pages if _metric(page, "mbx_run_ended") == 1]
    assert rc == 0
    assert took < 40        # ended by the scrape, not by the 60 s
    c = json.loads((tmp_path / "c.json").read_text())
    err = capsys.readouterr().err
    assert "serving the final counters until a scrape reads them (at most 60 s)" in err
    assert "no scrape read" not in err
    assert final, "no scrape saw mbx_run_ended 1"
    if extra:
        total = sum(_metric(final[0], "mbx_packets_total", f'{{stack="{k}"}}')
                    for k in range(2))
    else:
        total = _metric(final[0], "mbx_packets_total")
    assert total == c["packets"] > 0
    with pytest.raises(OSError):        # and then it ends
        urllib.request.urlopen(url, timeout=1)


def test_prometheus_linger_without_a_scrape_ends_and_says_so(example_pcap, capsys):
    port = _free_port()
    rc = cli.main(["run", "l2fwd", "--in", "pcap:" + example_pcap, "--prometheus",
                   str(port), "--prometheus-linger", "0.3", "-q"])
    assert rc == 0
    err = capsys.readouterr().err
    assert ("mbx: warning: --prometheus-linger: no scrape read the final counters "
            "(within 0.3 s)") in err
    assert "serving the final counters" not in err      # -q


def test_prometheus_has_the_ports_drops_and_the_clocks_steps():
    # An operator alerts on frames a port could not take in or send; the exporter
    # had packets and flows only.  A bridge's sides count their own, added up.
    from mbx.stats import Prometheus, zero_snapshot

    c = zero_snapshot(["n"], ["PKT"])
    with Prometheus(0, nfs=["n"], types=["PKT"]) as prom:
        url = f"http://127.0.0.1:{prom.port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        for port in ("in", "out"):          # there before any counters came
            for way in ("rx", "tx"):
                assert _metric(text, "mbx_port_dropped_total",
                               f'{{dir="{way}",port="{port}"}}') == 0
        assert _metric(text, "mbx_clock_steps_back_total") == 0
        c["ports"] = {"in": {"client": {"rx_dropped": 3, "tx_dropped": 1},
                             "server": {"rx_dropped": 4, "tx_dropped": 0}},
                      "out": {"rx_dropped": 0, "tx_dropped": 9}}
        c["clock_steps_back"] = 2
        prom.update(c)
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
    assert _metric(text, "mbx_port_dropped_total", '{dir="rx",port="in"}') == 7
    assert _metric(text, "mbx_port_dropped_total", '{dir="tx",port="in"}') == 1
    assert _metric(text, "mbx_port_dropped_total", '{dir="tx",port="out"}') == 9
    assert _metric(text, "mbx_clock_steps_back_total") == 2


@pytest.mark.parametrize("stack", ["tcp", "network"])
def test_prometheus_has_the_tcp_monitors_series_when_it_runs(example_pcap, tmp_path,
                                                              stack):
    # Bytes the TCP Monitor dropped (memory, window, out-of-order bound) were in the
    # summary and --json only: nothing to alert on.
    port = _free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    with scraping_to_the_end(url) as pages:
        rc = cli.main(["run", "l2fwd", "--in", "pcap:" + example_pcap, "--stack", stack,
                       "--prometheus", str(port), "--prometheus-linger", "60", "-q",
                       "--json", str(tmp_path / "c.json")])
    assert rc == 0 and pages
    c = json.loads((tmp_path / "c.json").read_text())
    if stack == "network":
        assert not any("mbx_tcp_" in page for page in pages)
        return
    for page in pages:          # from the first scrape on
        assert _metric(page, "mbx_tcp_memcaps_window_total") is not None
    final = pages[-1]
    assert _metric(final, "mbx_tcp_connections_total") == c["tcp"]["connections"] > 0
    assert _metric(final, "mbx_tcp_gaps_total") == c["tcp"]["gaps"]
    assert _metric(final, "mbx_tcp_conflicts_total") == c["tcp"]["conflicts"]
    assert _metric(final, "mbx_tcp_bad_checksums_total") == c["tcp"]["bad_checksums"]
    assert _metric(final, "mbx_tcp_memcaps_total") == c["tcp"]["memcaps"]
    assert _metric(final, "mbx_tcp_pool_chunks_in_use") == c["tcp"]["pool_chunks_in_use"]


SCRAPING_NF = """
import urllib.request

import mbx
from mbx import runtime


def make(port, out):
    nf = mbx.NF("scraper")

    def scrape(when):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            open(f"{out}.{when}", "w").write(r.read().decode())

    # start(): this stack's run has begun, its first snapshot is half a second away
    # (with --stacks each process's own: another may be under way already)
    nf.start = lambda: scrape(f"start{runtime._stack_process[0]}")
    nf.stop = lambda: scrape("stop")
    nf.sub("PKT", lambda ev: None)
    return nf
"""


def _series(text):
    """{series (name and labels): value} of the mbx metrics on a scraped page."""
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^(mbx_\S+) (\S+)$", text, re.M)}


@pytest.mark.parametrize("extra", [[], ["--deploy", "pipelined"], ["--stacks", "2"]])
def test_prometheus_has_every_series_from_the_first_scrape(example_pcap, tmp_path, extra):
    # A scrape before the first snapshot returned no mbx series at all: dashboards
    # and alerts saw every series appear half a second into the run.
    path = tmp_path / "scraper.py"
    path.write_text(SCRAPING_NF)
    port = _free_port()
    out = tmp_path / "page"
    rc = cli.main(["run", str(path), "--in", "pcap:" + example_pcap, "--set",
                   f"scraper.port={port}", "--set", f"scraper.out={out}",
                   "--prometheus", str(port), "-q", "--json", str(tmp_path / "c.json"),
                   *extra])
    assert rc == 0
    c = json.loads((tmp_path / "c.json").read_text())
    end = _series((tmp_path / "page.stop").read_text())
    stacks = ['stack="0"', 'stack="1"'] if extra[:1] == ["--stacks"] else [""]
    for k, at in enumerate(stacks):
        start = _series((tmp_path / f"page.start{k}").read_text())
        assert start.keys() == end.keys()       # none came, none went
        # this stack's series, at 0 before its first snapshot
        mine = {key: v for key, v in start.items() if at in key}
        assert mine and all(v == 0.0 for v in mine.values()), mine
        for name, labels in (("mbx_packets_total", ""), ("mbx_dropped_total", 'by="nf"'),
                             ("mbx_dropped_total", 'by="run_error"'),
                             ("mbx_dropped_total", 'by="fragments"'),
                             ("mbx_flows_total", 'what="created"'),
                             ("mbx_fragments_total", 'what="held_discarded"'),
                             ("mbx_fragment_datagrams_total", 'what="timed_out"'),
                             ("mbx_fragments_held", ""),
                             ("mbx_events_published_total", 'type="PKT"'),
                             ("mbx_events_delivered_total", 'type="FLOW/END"'),
                             ("mbx_nf_events_total", 'nf="scraper"')):
            # the exposition writes labels sorted by name
            both = ",".join(sorted(x for x in (at, labels) if x))
            key = f"{name}{{{both}}}" if both else name
            assert start.get(key) == 0.0, (key, sorted(start))
    assert c["packets"] > 0


def test_prometheus_any_free_port_is_printed(example_pcap, capsys):
    rc = cli.main(["run", "l2fwd", "--in", "pcap:" + example_pcap, "--prometheus", "0"])
    assert rc == 0
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("prometheus")]
    assert len(line) == 1 and line[0].endswith("/metrics")
    assert int(line[0].split(":")[-1].split("/")[0]) > 0


def test_prometheus_missing(monkeypatch, example_pcap, capsys):
    import builtins

    real = builtins.__import__

    def fake(name, *a, **kw):
        if name.startswith("prometheus_client"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", fake)
    rc = cli.main(["run", "mbx.examples.cnoop:make_noop", "--in", "pcap:" + example_pcap,
                   "--prometheus", "0"])
    assert rc == 2
    assert "prometheus-client" in capsys.readouterr().err


# registered at import: a type is registered only while no event bus is alive, and
# one an earlier test in this process left for the collector would refuse it
LIVE_ECHO = mbx.register_event_type("TEST_LIVE_ECHO")


def test_pipelined_live_counters_count_the_nf_processes_events(example_pcap):
    # Pipelined, the NF processes count what they are delivered and publish in
    # shared memory, and the stack added those counts to its per type ones only at
    # the end: every snapshot the live views got (--stats, --prometheus) said
    # 0 events delivered, and the pipeline's published total left out the NFs'.
    from mbx.ports import open_input
    from mbx.stats import snapshot

    echo = LIVE_ECHO
    class Slow(mbx.NF):
        def __init__(self):
            super().__init__("slow")
            self.n = 0
            self.sub(mbx.PKT, self.on_pkt)
            self.port = self.pub(echo)

        def on_pkt(self, ev):
            self.n += 1
            self.publish(self.port, self.new_msg(echo))
            if self.n % 20 == 0:
                time.sleep(0.03)    # a run of about 2 s: progress calls

    hears = mbx.NF("hears")
    hears.sub(echo, lambda ev: None)
    snaps = []
    app = mbx.App([Slow(), hears], deploy="pipelined")
    final = app.run(open_input(f"pcap:{example_pcap}"), burst=8,
                    progress=lambda stack: snaps.append(
                        (snapshot(stack), stack.bus.pipeline_counters())))
    total = final["events"]["PKT"]["delivered"]
    assert total == final["events"]["TEST_LIVE_ECHO"]["delivered"] > 0
    mid = [(s, p) for s, p in snaps if 0 < s["nfs"]["slow"]["events"] < total]
    assert mid, "no snapshot taken while the run went on"
    for s, p in mid:
        # the per type counts are read before the per NF ones, which only grow
        assert 0 < s["events"]["PKT"]["delivered"] <= s["nfs"]["slow"]["types"]["PKT"]
        assert (s["events"]["TEST_LIVE_ECHO"]["published"]
                <= p["nfs"]["slow"]["published"] <= p["published"])
        assert p["stack_published"] >= 0
    assert final["pipeline"]["published"] == (final["pipeline"]["stack_published"]
                                              + final["pipeline"]["nfs"]["slow"]["published"])


def test_stats_view_renders():
    import io

    from mbx.stats import StatsView

    buf = io.StringIO()
    v = StatsView(out=buf, every=0)
    snap = {"packets": 10, "dropped_by_nf": 1,
            "nfs": {"x": {"events": 10, "c_events": 10, "drops": 1, "handler_ns": 100,
                          "mean_ns": 10.0, "types": {"PKT": 10}}}}
    v.update(snap)
    assert "x" in buf.getvalue() and "100%" in buf.getvalue()


# -- several stack processes (--stacks N): snapshots sent to the parent, merged ----------


def test_cli_stats_stacks(example_pcap, tmp_path, capsys):
    rc = cli.main(["run", "mbx.examples.cnoop:make_counter", "--in", "pcap:" + example_pcap,
                   "--stats", "--stacks", "2", "--json", str(tmp_path / "c.json")])
    assert rc == 0
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["nfs"]["ccount"]["events"] == c["events"]["PKT"]["delivered"] > 0
    assert all(s["packets"] > 0 for s in c["stacks"])
    assert sum(s["packets"] for s in c["stacks"]) == c["packets"]
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.strip().startswith("ccount"))
    assert int(line.split()[1].replace(",", "")) == c["nfs"]["ccount"]["events"]


def test_stats_view_per_stack():
    import io

    from mbx.runtime import merge_snapshots
    from mbx.stats import StatsView

    def part(events, ns):
        return {"packets": events, "dropped_by_nf": 0,
                "nfs": {"x": {"events": events, "c_events": 0, "drops": 0,
                              "handler_ns": ns, "mean_ns": ns / events, "types": {}}}}

    merged = merge_snapshots([part(10, 100), part(30, 900)])
    assert merged["nfs"]["x"]["events"] == 40
    assert merged["nfs"]["x"]["mean_ns"] == 25.0       # over both, not 10 + 30
    merged["per_stack"] = [part(10, 100), None]         # stack #1 not heard from yet
    buf = io.StringIO()
    StatsView(out=buf, every=0).update(merged)
    text = buf.getvalue()
    assert "stack #0: 10 packets, 10 NF events" in text and "stack #1" not in text


SLOW_PLAIN = """
import time

import mbx

nf = mbx.NF("slow")


def on_pkt(ev):
    time.sleep(0.002)   # about 1.4 s a process: progress calls
    if ev.dir == 1:
        ev.drop()


nf.sub("PKT", on_pkt)
"""


def test_prometheus_stacks(example_pcap, tmp_path, monkeypatch):
    from mbx import stats

    path = tmp_path / "slow.py"
    path.write_text(SLOW_PLAIN)
    port = _free_port()
    url = f"http://127.0.0.1:{port}/metrics"
    final = []
    close = stats.Prometheus.close

    def scrape_then_close(self):
        # the run is over: the exporter has the final counters
        with urllib.request.urlopen(url, timeout=5) as r:
            final.append(r.read().decode())
        close(self)

    monkeypatch.setattr(stats.Prometheus, "close", scrape_then_close)
    with scraping(url) as live:
        rc = cli.main(["run", str(path), "--in", "pcap:" + example_pcap, "--burst", "1",
                       "--stacks", "2", "--prometheus", str(port), "-q",
                       "--json", str(tmp_path / "c.json")])
    assert rc == 0
    c = json.loads((tmp_path / "c.json").read_text())
    # scraped while it ran: each process's counters on their way
    for k in ("0", "1"):
        during = [v for v in (_metric(x, "mbx_packets_total", f'{{stack="{k}"}}')
                              for x in live) if v is not None]
        assert during and any(0 < v < c["packets"] for v in during)
    # at the end: per process, summing to the merged counters the run printed
    text = final[0]

    def total(name, label=""):
        # the exposition writes labels sorted by name
        def at(k):
            labels = sorted([label, f'stack="{k}"'] if label else [f'stack="{k}"'])
            return "{" + ",".join(labels) + "}"
        return sum(_metric(text, name, at(k)) for k in "01")

    assert total("mbx_packets_total") == c["packets"]
    assert total("mbx_dropped_total", 'by="nf"') == c["dropped_by_nf"] > 0
    assert total("mbx_flows_total", 'what="created"') == c["flows"]["created"]
    assert total("mbx_nf_events_total", 'nf="slow"') == c["nfs"]["slow"]["events"]
    assert total("mbx_nf_drops_total", 'nf="slow"') == c["dropped_by_nf"]
    assert total("mbx_nf_handler_seconds_total", 'nf="slow"') > 0.002 * 100


def test_the_live_table_is_a_log_every_ten_seconds_off_a_terminal():
    # a minute's run to a file or pipe wrote 60 tables, one a second
    from mbx.stats import StatsView

    class Tty(io.StringIO):
        def isatty(self):
            return True

    assert StatsView(out=io.StringIO()).every == StatsView.LOG_EVERY_S == 10.0
    assert StatsView(out=Tty()).every == 1.0


def test_prometheus_says_where_the_fragments_went(tmp_path):
    # the fragment counters were in the summary and --json only: a dashboard could
    # not see fragments held, nor what became of them
    from mbxtest import fragment4, run_app

    from mbx.examples.capture import ether, udp4
    from mbx.stats import Prometheus

    whole = fragment4(ether(udp4("198.18.0.1", "198.18.0.2", 1000, 53, bytes(100))), 32)
    lost = fragment4(ether(udp4("198.18.0.3", "198.18.0.2", 1001, 53, bytes(100))), 32)
    c, _ = run_app([], None, tmp_path, [(1.0 + i / 1000, f)
                                        for i, f in enumerate(whole + lost[:2])])
    with Prometheus(0) as prom:
        prom.update(c)
        text = prometheus_client.generate_latest(prom.registry).decode()
    fr = c["fragments"]
    assert (fr["held"], fr["held_completed"], fr["held_discarded"]) == (5, 3, 2)
    for what in ("held", "held_completed", "held_discarded", "bad"):
        assert _metric(text, "mbx_fragments_total", f'{{what="{what}"}}') == fr[what]
    for what in ("completed", "pending_at_end"):
        assert _metric(text, "mbx_fragment_datagrams_total", f'{{what="{what}"}}') == 1
    assert _metric(text, "mbx_fragments_held") == 0


def test_prometheus_has_the_parsers_counts_by_reason(tmp_path):
    # the parse counters (malformed packets by reason, deep VLAN stacks, fragments
    # refused for memory) were in the summary and --json only: no alert could see them
    import struct

    from mbxtest import fragment4, run_app
    from prometheus_client.parser import text_string_to_metric_families

    from mbx._parse import status_names
    from mbx.examples.capture import ether, ipv4, tcp4, udp4
    from mbx.stats import Prometheus

    def cut(frame, at, value):
        return frame[:at] + bytes([value]) + frame[at + 1:]

    bad_opt = ether(tcp4("198.18.0.1", "198.18.0.2", 1000, 80, b"p",
                         opts=b"\x02\x04\x05\xb4\x08\x0c\x00\x00"))   # TS longer than left
    deep = (b"\x02" * 12 + struct.pack("!HH", 0x8100, 7) * 9 + b"\x08\x00"
            + udp4("198.18.0.1", "198.18.0.2", 1001, 53, b"q"))
    short = ether(ipv4("198.18.0.1", "198.18.0.2", 6, bytes(10)))   # 10 bytes of TCP
    bad_ihl = cut(ether(udp4("198.18.0.3", "198.18.0.2", 1002, 53, b"r")), 14, 0x44)
    big = fragment4(ether(udp4("198.18.0.4", "198.18.0.2", 1003, 53, bytes(6000))), 1200)
    frames = [bad_opt, bad_opt, deep, short, short, short, bad_ihl] + big
    c, _ = run_app([], None, tmp_path, [(1.0 + i / 1000, f) for i, f in enumerate(frames)],
                   frag_memory=4096)
    assert c["parse"] == {"bad_tcp_opt": 2, "too_many_vlan_tags": 1, "trunc_l4": 3,
                          "bad_ihl": 1, "frag_memcap": 1}
    with Prometheus(0) as prom:
        prom.update(c)
        text = prometheus_client.generate_latest(prom.registry).decode()
    family, = [f for f in text_string_to_metric_families(text)
               if f.name == "mbx_parse_errors"]
    assert family.type == "counter"
    counts = {s.labels["reason"]: s.value for s in family.samples
              if s.name == "mbx_parse_errors_total"}
    # every reason a packet can have has its series, 0 where none was counted (not
    # frag_timeout: never a packet's status, its series would never move)
    assert counts == {reason: c["parse"].get(reason, 0) for reason in status_names()
                      if reason not in ("ok", "frag_timeout")}
    assert counts["bad_tcp_opt"] == 2
