"""Fixtures of the micro benchmarks, and the ratios they print at the end.

Run with ``pytest benchmarks``.  The test command (``scripts/test.sh``) runs them
too, once each and untimed (``--benchmark-disable``), for what they assert.  Sizes
are small; ``stack_figures.py`` makes the full-size figures.
"""
import captures
import pytest
from bench_records import EVENTS, FIGURES, MEDIANS

N_PACKETS = 50_000
N_FLOWS = 5_000



@pytest.fixture(scope="session")
def capture64():
    return captures.make_capture(N_PACKETS, N_FLOWS, "64")


@pytest.fixture(scope="session")
def frames64(capture64):
    return captures.load_frames(capture64)


@pytest.fixture(scope="session")
def sizes():
    """(packets, flows) of the capture the benchmarks run over."""
    return N_PACKETS, N_FLOWS


@pytest.fixture
def record(benchmark):
    """``record(name, events=None, **figures)`` after a benchmark ran keeps its median
    (and the events it delivered, and figures that are not timings) for the ratios."""
    def _record(name, events=None, **figures):
        stats = getattr(benchmark, "stats", None)
        if stats is not None:       # None under --benchmark-disable
            MEDIANS[name] = stats.stats.median
        if events is not None:
            EVENTS[name] = events
        FIGURES.update(figures)
    return _record


def _ratio_lines():
    m, lines = MEDIANS, []
    n = N_PACKETS

    def rate(name, base, what):
        if name in m and base in m:
            a, b = n / m[name] / 1e6, n / m[base] / 1e6
            lines.append(f"{what}: mbx {a:.3g} Mpps, baseline {b:.3g} Mpps: {a / b:.3g}x")

    rate("stack", "dpkt_flows", "parse + flow lookup vs dpkt loop")
    rate("mbx_read", "dpkt_read", "pcap read vs dpkt.pcap.Reader")
    if "stack" in m and "python_loop" in m:
        loop = m["python_loop"] / n * 1e9
        for name in ("noop_handler", "batch_handler", "chain2", "chain4"):
            if name in m and name in EVENTS:
                over = (m[name] - m["stack"]) / EVENTS[name] * 1e9
                lines.append(f"{name}: dispatch {over:.3g} ns/event, a no-op Python call "
                             f"{loop:.3g} ns: {over / loop:.3g}x; end to end "
                             f"{m['stack'] / m[name]:.3g} of the stack's packet rate")
    f = FIGURES
    if "flow_bytes" in f and "dict_bytes" in f:
        lines.append(f"bytes per flow: mbx flow table {f['flow_bytes']:.0f} B, dpkt dict "
                     f"{f['dict_bytes']:.0f} B: {f['flow_bytes'] / f['dict_bytes']:.3g}x")
    return lines


def pytest_terminal_summary(terminalreporter):
    lines = _ratio_lines()
    if lines:
        terminalreporter.section("mbx vs baselines (medians of this run)")
        for line in lines:
            terminalreporter.write_line(line)
