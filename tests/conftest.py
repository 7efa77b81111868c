"""Shared fixtures: the example capture, and running NFs over captures (the helpers
themselves are in mbxtest.py, which tests import by that name: ``conftest`` is also
benchmarks/conftest.py when both directories are collected)."""
import pytest
from mbxtest import run_app

from mbx.examples.capture import write_example


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
