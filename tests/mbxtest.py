"""Helpers the tests share: reading captures with the reference reader, running NFs
over a capture.  Imported as ``mbxtest`` (see conftest.py for why not from it)."""
import os

import dpkt

from mbx.examples.capture import write_pcap
from mbx.ports import open_input, open_output
from mbx.runtime import App


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
