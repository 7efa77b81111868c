"""Shared fixtures: the example capture, and running NFs over captures."""
import os

import dpkt
import pytest

from mbx.examples.capture import write_example, write_pcap
from mbx.ports import open_input, open_output
from mbx.runtime import App


@pytest.fixture(scope="session")
def example_pcap(tmp_path_factory):
    path = tmp_path_factory.mktemp("example") / "example.pcap"
    write_example(str(path), flows=120, seed=7)
    return str(path)


def read_frames(path):
    """[(ts_seconds, bytes)] of a capture, read by dpkt (the reference reader)."""
    with open(path, "rb") as fh:
        return [(ts, bytes(buf)) for ts, buf in dpkt.pcap.Reader(fh)]


def run_app(nfs, capture, tmp_path=None, frames=None, **config):
    """Run ``nfs`` inline over ``capture`` (a path, or ``frames`` written to one);
    returns (counters, output frames)."""
    if frames is not None:
        capture = os.path.join(str(tmp_path), "in.pcap")
        write_pcap(capture, frames)
    out_path = capture + ".out.pcap"
    burst = config.pop("burst", 64)
    inp, out = open_input("pcap:" + capture), open_output("pcap:" + out_path)
    try:
        counters = App(nfs, **config).run(inp, out, burst=burst)
    finally:
        inp.close()
        out.close()
    return counters, read_frames(out_path)


@pytest.fixture
def run(tmp_path):
    def _run(nfs, capture=None, frames=None, **config):
        return run_app(nfs, capture, tmp_path, frames, **config)
    return _run
