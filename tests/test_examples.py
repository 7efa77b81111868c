"""The examples: the paper's Listing 1 IDS (mbx/examples/ids.py) on hand-made flows,
and the merge functions of mbx/examples/votes.py."""
import os

import pytest

import mbx
from mbx.examples.capture import ether, tcp4
from mbx.runtime import load_app

IDS = os.path.join(os.path.dirname(mbx.__file__), "examples", "ids.py")
CLI, DB = "198.18.1.50", "198.18.0.33"
INJECTION = b"SELECT * FROM users WHERE name='' OR 1=1 --"


def _alerts(run, frames, burst=64):
    """The flows IDS_ALERT was published for, one entry per alert, in order."""
    seen = []
    nfs = load_app(IDS)             # registers IDS_ALERT
    sink = mbx.NF("alerts")
    sink.sub(mbx.event_type("IDS_ALERT"), lambda ev: seen.append(ev.flow))
    nfs.append(sink)
    run(nfs, frames=[(1_700_000_000 + k * 1e-3, ether(f)) for k, f in enumerate(frames)],
        burst=burst)
    return seen


@pytest.mark.parametrize("burst", [1, 64])
def test_ids_inspects_the_packet_that_classified_the_flow(run, burst):
    # DPI_DETECT comes from the flow's FLOW/START, and mb_up_sub takes effect for
    # the flow's later packets only: the first packet (mid-stream, or a SYN with
    # data) was never matched.
    frames = [
        tcp4(CLI, DB, 41105, 3306, INJECTION, flags=0x18, seq=3000, ack=1),  # first
        tcp4(CLI, DB, 41106, 3306, INJECTION, flags=0x02, seq=7),            # SYN+data
        tcp4(CLI, DB, 41107, 3306, b"SELECT 1", flags=0x18, seq=1, ack=1),   # clean
        tcp4(CLI, DB, 41107, 3306, INJECTION, flags=0x18, seq=9, ack=1),     # later
    ]
    seen = _alerts(run, frames, burst)
    assert len(seen) == 3 and len(set(seen)) == 3     # one per flow, none twice
