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


def test_ids_matches_each_packet_on_its_own_as_documented(run):
    # The limits its docstring and docs/listing1.md state: per-packet matching.
    split = [b"SELECT * FROM users WHERE name='' O", b"R 1=1 --"]
    frames = [
        # a signature split across two segments: no alert
        tcp4(CLI, DB, 41100, 3306, split[0], seq=1001, ack=1),
        tcp4(CLI, DB, 41100, 3306, split[1], seq=1001 + len(split[0]), ack=1),
        # a retransmitted attack: two alerts for one
        tcp4(CLI, DB, 41102, 3306, INJECTION, seq=1001, ack=1),
        tcp4(CLI, DB, 41102, 3306, INJECTION, seq=1001, ack=1),
        # mid-stream, the server's packet first: the client's port is taken for the
        # server's, and the flow is never classified
        tcp4(DB, CLI, 3306, 41104, b"ok", seq=9000, ack=2000),
        tcp4(CLI, DB, 41104, 3306, INJECTION, seq=2000, ack=9002),
    ]
    seen = _alerts(run, frames)
    assert len(seen) == 2 and len(set(seen)) == 1
    ids_py = open(IDS).read()
    assert "raises no alert" in ids_py and "raises its alert again" in ids_py
    assert "DATA_RDY" in ids_py
