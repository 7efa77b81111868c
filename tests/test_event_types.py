"""The μEvent type hierarchy: ids, the descendant rule, layouts, and errors."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import mbx
from mbx._events import message_size


def test_builtin_paths_and_short_names():
    assert mbx.event_type("PKT") is mbx.PKT
    assert mbx.event_type("EVENT/PKT") is mbx.PKT
    assert mbx.event_type("flow/end") is mbx.FLOW_END
    assert mbx.event_type("END") is mbx.FLOW_END
    assert mbx.event_type(mbx.FLOW_START.id) is mbx.FLOW_START
    assert str(mbx.FLOW_END) == "FLOW/END"


def test_descendant_rule_is_one_way():
    assert mbx.FLOW_END.is_a(mbx.FLOW)
    assert mbx.FLOW_END.is_a(mbx.EVENT)
    assert not mbx.FLOW.is_a(mbx.FLOW_END)
    assert not mbx.PKT.is_a(mbx.FLOW)
    assert not mbx.FLOW_START.is_a(mbx.FLOW_END)


def test_header_is_one_cache_line():
    header, whole = message_size()
    assert header == 64
    assert whole == 64 + 128


def test_child_record_starts_with_parent_record():
    t = mbx.register_event_type("FLOW/TEST_CHILD", fields=[("score", "u32")])
    for name, (off, kind) in mbx.FLOW.fields.items():
        assert t.fields[name] == (off, kind)
    assert t.fields["score"][0] >= mbx.FLOW.body_size
    assert t.is_a(mbx.FLOW) and t.is_a("FLOW") and not mbx.FLOW.is_a(t)


def test_reregistering_is_idempotent_but_layout_must_match():
    a = mbx.register_event_type("TEST_SAME", fields=[("x", "u16")])
    assert mbx.register_event_type("TEST_SAME", fields=[("x", "u16")]) is a
    with pytest.raises(mbx.EventTypeError, match="already defined"):
        mbx.register_event_type("TEST_SAME", fields=[("x", "u32")])


def test_errors_name_what_is_wrong():
    with pytest.raises(mbx.EventTypeError, match="unknown event type 'PKT/TCPX'"):
        mbx.event_type("PKT/TCPX")
    with pytest.raises(mbx.EventTypeError, match="did you mean"):
        mbx.event_type("FLOW/STRAT")
    with pytest.raises(mbx.EventTypeError, match="unknown kind"):
        mbx.register_event_type("TEST_BADKIND", fields=[("x", "u128")])
    with pytest.raises(mbx.EventTypeError, match="bytes"):
        mbx.register_event_type("TEST_TOOBIG", fields=[(f"f{i}", "u64") for i in range(17)])
    with pytest.raises(mbx.EventTypeError, match="already defined"):
        mbx.register_event_type("TEST_SHADOW", parent="FLOW", fields=[("proto", "u8")])


_names = st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ", min_size=1, max_size=6)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 10), _names), min_size=1, max_size=12))
def test_hierarchy_rule_matches_paths(spec):
    """For random trees, is_a (one mask compare) equals the path-prefix relation."""
    made = []
    for parent_pick, name in spec:
        parents = [mbx.EVENT] + made
        parent = parents[parent_pick % len(parents)]
        path = f"{parent.path}/HY{name}"
        if parent.depth >= 7:
            continue
        made.append(mbx.register_event_type(f"HY{name}", parent=parent))
        assert made[-1].path == path
    everything = [mbx.EVENT, mbx.PKT, mbx.FLOW, mbx.FLOW_END] + made
    for x in everything:
        for y in everything:
            by_path = x.path == y.path or x.path.startswith(y.path + "/")
            assert x.is_a(y) == by_path, (x, y)
