"""Property: ``mbx flows`` reassembles any segmentation, bounded reordering and
duplication of a connection's bytes (IPv4 or IPv6, ISNs near 2^32) to the bytes
sent: the same lengths and SHA-256 digests."""
import hashlib
import os
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_monitor import ACK, CLI4, CLI6, FIN, PSH, SRV4, SRV6, Conn

from mbx.examples.capture import write_pcap
from mbx.flows import flows_json

M32 = 0xFFFFFFFF


@st.composite
def direction(draw):
    """(data, [(offset, length)] in sending order)."""
    data = draw(st.binary(min_size=0, max_size=3000))
    cuts = sorted(set(draw(st.lists(st.integers(1, max(1, len(data) - 1)), max_size=12))))
    cuts = [c for c in cuts if 0 < c < len(data)]
    bounds = [0, *cuts, len(data)] if data else []
    segs = [(a, b - a) for a, b in zip(bounds, bounds[1:], strict=False)]
    # bounded reordering: each segment moves at most `window` places
    window = draw(st.integers(0, 3))
    keys = [i + draw(st.integers(0, window)) for i in range(len(segs))]
    order = [s for _, s in sorted(zip(keys, segs, strict=True), key=lambda kv: kv[0])]
    out = []
    for seg in order:
        out.append(seg)
        if draw(st.integers(0, 4)) == 0:      # duplicated, consistent bytes
            out.append(seg)
    return data, out


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(c2s=direction(), s2c=direction(), v6=st.booleans(),
       isn_c=st.integers(M32 - 4000, M32), isn_s=st.one_of(st.integers(M32 - 4000, M32),
                                                         st.integers(0, M32)))
def test_flows_digest_matches(c2s, s2c, v6, isn_c, isn_s):
    (req, req_segs), (resp, resp_segs) = c2s, s2c
    cli, srv = (CLI6, SRV6) if v6 else (CLI4, SRV4)
    conn = Conn(cli=cli, srv=srv, isn_c=isn_c, isn_s=isn_s, v6=v6)
    conn.handshake()
    for off, n in req_segs:
        conn.c(1 + off, 1, PSH | ACK, req[off:off + n])
    conn.s(1, 1 + len(req))
    for off, n in resp_segs:
        conn.s(1 + off, 1 + len(req), PSH | ACK, resp[off:off + n])
    conn.c(1 + len(req), 1 + len(resp))
    conn.c(1 + len(req), 1 + len(resp), FIN | ACK)
    conn.s(1 + len(resp), 2 + len(req), FIN | ACK)
    conn.c(2 + len(req), 2 + len(resp))
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "p.pcap")
        write_pcap(path, conn.frames)
        doc, warnings = flows_json(path, flow_capacity=64, stream_memory=1 << 20)
    assert warnings == []
    (key, rec), = doc["connections"].items()
    assert key.startswith(f"[{cli[0]}]:" if v6 else f"{cli[0]}:")
    assert rec["c2s_len"] == len(req) and rec["s2c_len"] == len(resp)
    assert rec["c2s_sha256"] == hashlib.sha256(req).hexdigest()
    assert rec["s2c_sha256"] == hashlib.sha256(resp).hexdigest()
    assert rec["pkts_c2s"] == 2 + len(req_segs) + 3 and rec["pkts_s2c"] == 3 + len(resp_segs)
    assert rec["handshake"] is True and rec["close"] == "fin"
