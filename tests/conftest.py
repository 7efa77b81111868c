"""Shared fixtures: the example capture, and running NFs over captures (the helpers
themselves are in mbxtest.py, which tests import by that name: ``conftest`` is also
benchmarks/conftest.py when both directories are collected)."""
import signal

import pytest
from mbxtest import run_app

from mbx.examples.capture import write_example

# A suite started as a background job of a non-interactive shell (`cmd &` in a
# script) begins with SIGINT ignored: Python then installs no KeyboardInterrupt
# handler, and the programs the tests start inherit "ignored", so the tests that
# press Ctrl-C (a testbed's cleanup, mbx run's stop) saw nothing happen.  They act
# as a user's terminal would.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def example_pcap(tmp_path_factory):
    path = tmp_path_factory.mktemp("example") / "example.pcap"
    write_example(str(path), flows=120, seed=7)
    return str(path)


@pytest.fixture
def run(tmp_path):
    def _run(nfs, capture=None, frames=None, **config):
        return run_app(nfs, capture, tmp_path, frames, **config)
    return _run
