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


def _voters(drops, merge):
    """A parallel group of len(drops) members, member i dropping every packet when
    drops[i], merged by ``merge``."""
    group = []
    for i, drop in enumerate(drops):
        nf = mbx.NF(f"v{i}", group="g")
        nf.sub(mbx.PKT, (lambda ev: ev.drop()) if drop else (lambda ev: None))
        nf.group_merge = merge
        group.append(nf)
    return group


def _packets(n=4):
    return [(1_700_000_000 + k * 1e-3, ether(tcp4(CLI, DB, 41000 + k, 3306, b"x")))
            for k in range(n)]


@pytest.mark.parametrize("drops, dropped", [
    ((1, 1, 0), True), ((1, 0, 0), False),
    # it assumed three members: 2 of 5 dropped everything, 3 of 7 too
    ((1, 1, 0, 0, 0), False), ((1, 1, 1, 0, 0), True),
    ((1, 1, 1, 0, 0, 0, 0), False), ((1, 1, 0, 0), False), ((1, 1, 1, 0), True),
])
def test_majority_counts_the_whole_group(run, drops, dropped):
    from mbx.examples.votes import majority
    counters, out = run(_voters(drops, majority), frames=_packets())
    assert counters["dropped_by_nf"] == (4 if dropped else 0)
    assert len(out) == (0 if dropped else 4)


def test_majority_from_an_application_file(run, tmp_path):
    # members cannot be bound in TOML (\"members=3\" was the only size it knew):
    # the group gives them.  Two of five members drop.
    from mbx.controller import load_app_file
    (tmp_path / "voters.py").write_text(
        "import mbx\n"
        "def voter(name, drop):\n"
        "    nf = mbx.NF(name)\n"
        "    nf.sub(mbx.PKT, (lambda ev: ev.drop()) if drop else (lambda ev: None))\n"
        "    return nf\n"
        "nfs = [voter(f'v{i}', i < 2) for i in range(5)]\n")
    voters = tmp_path / "voters.py"
    body = "".join(f'[[nf]]\nuse = "{voters}:v{i}"\ngroup = "g"\n' for i in range(5))
    app = tmp_path / "vote5.toml"
    app.write_text('[app]\nname = "vote5"\n' + body +
                   '[groups.g]\nmerge = "mbx.examples.votes:majority"\n')
    counters, out = run(load_app_file(str(app)).nfs, frames=_packets())
    assert counters["dropped_by_nf"] == 0 and len(out) == 4


def test_first_says_refuses_a_group_without_that_member(run):
    import functools

    from mbx.examples.votes import first_says
    # no member named "firewall": it used to never drop anything, silently
    with pytest.raises(mbx.MbxError, match=r"merge function first_says .* raised "
                                           r"ValueError .*: first_says: the group "
                                           r"\(v0, v1, v2\) has no member named "
                                           r"'firewall' to decide"):
        run(_voters((1, 1, 0), first_says), frames=_packets())
    # bound to a member of the group: that member decides alone
    v1_says = functools.partial(first_says, first="v1")
    counters, _ = run(_voters((1, 0, 0), v1_says), frames=_packets())
    assert counters["dropped_by_nf"] == 0
    counters, _ = run(_voters((0, 1, 0), v1_says), frames=_packets())
    assert counters["dropped_by_nf"] == 4
