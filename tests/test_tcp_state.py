"""Twin TCP state (mbx._tcp): scenarios crafted with dpkt, a model-based
state-machine test, and snapshots."""
import ipaddress
import socket

import dpkt
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

from mbx._parse import parse
from mbx._tcp import (
    BITS,
    CONN_SIZE,
    SNAPSHOT_SIZE,
    TcpConn,
    snapshot_decode,
)

M32 = 0xFFFFFFFF
SYN, ACK, FIN, RST, PSH = (dpkt.tcp.TH_SYN, dpkt.tcp.TH_ACK, dpkt.tcp.TH_FIN, dpkt.tcp.TH_RST,
                           dpkt.tcp.TH_PUSH)


# ---------------------------------------------------------------------------
# Frames

def syn_opts(mss=1460, wscale=None, sack_ok=False, ts=None) -> bytes:
    o = b"\x02\x04" + mss.to_bytes(2, "big")
    if wscale is not None:
        o += b"\x01\x03\x03" + bytes([wscale])
    if sack_ok:
        o += b"\x01\x01\x04\x02"
    if ts is not None:
        o += b"\x01\x01\x08\x0a" + ts[0].to_bytes(4, "big") + ts[1].to_bytes(4, "big")
    return o + b"\x00" * (-len(o) % 4)


class Host:
    """One side of a connection; frame() builds what it sends, with dpkt."""

    def __init__(self, addr, port, peer, peer_port, v6=False):
        self.addr, self.port, self.peer, self.peer_port, self.v6 = addr, port, peer, peer_port, v6

    def frame(self, flags, seq, ack=0, win=65535, data=b"", opts=b"") -> bytes:
        tcp = dpkt.tcp.TCP(sport=self.port, dport=self.peer_port, seq=seq & M32, ack=ack & M32,
                           flags=flags, win=win, opts=opts, off=5 + len(opts) // 4, data=data)
        if self.v6:
            ip = dpkt.ip6.IP6(src=ipaddress.ip_address(self.addr).packed,
                              dst=ipaddress.ip_address(self.peer).packed, nxt=6, hlim=64,
                              plen=len(tcp), data=tcp)
            ip.extension_hdrs = {}
            etype = dpkt.ethernet.ETH_TYPE_IP6
        else:
            ip = dpkt.ip.IP(src=socket.inet_aton(self.addr), dst=socket.inet_aton(self.peer),
                            p=6, ttl=64, len=20 + len(tcp), data=tcp)
            etype = dpkt.ethernet.ETH_TYPE_IP
        return bytes(dpkt.ethernet.Ethernet(src=b"\x02" * 6, dst=b"\x04" * 6, type=etype, data=ip))


def pair(v6=False):
    if v6:
        return (Host("2001:db8::1", 40000, "2001:db8::2", 80, True),
                Host("2001:db8::2", 80, "2001:db8::1", 40000, True))
    return Host("10.0.0.1", 40000, "10.0.0.2", 80), Host("10.0.0.2", 80, "10.0.0.1", 40000)


def handshake(c, cli, srv, isn_c=1000, isn_s=5000, cdir=0, swin=65535, cwin=65535, **kw):
    """SYN, SYN+ACK (window ``swin``), ACK (window ``cwin``).  A window narrowed later
    at the same ACK is taken as an older one seen late (receivers do not shrink
    theirs), so a test that wants a narrow window offers it here."""
    sdir = cdir ^ 1
    c.update(cli.frame(SYN, isn_c, opts=syn_opts(**kw.get("copts", {}))), cdir)
    c.update(srv.frame(SYN | ACK, isn_s, isn_c + 1, win=swin,
                       opts=syn_opts(**kw.get("sopts", {}))), sdir)
    return c.update(cli.frame(ACK, isn_c + 1, isn_s + 1, win=cwin), cdir)


def states(c):
    return c.state(0), c.state(1)


# ---------------------------------------------------------------------------
# Scenarios

@pytest.mark.parametrize("v6", [False, True])
def test_handshake_data_and_fin_close(v6):
    cli, srv = pair(v6)
    c = TcpConn()
    s, r = c.update(cli.frame(SYN, 1000, opts=syn_opts()), 0)
    assert s == ["SYN", "STATE_CHANGE"] and r == ["SYN", "STATE_CHANGE"]
    assert states(c) == ("SYN_SENT", "SYN_RCVD") and c.client_dir == 0
    s, r = c.update(srv.frame(SYN | ACK, 5000, 1001, opts=syn_opts(mss=1400)), 1)
    assert "SYNACK" in s and "ACK_ADVANCE" in s and "STATE_CHANGE" in r
    assert states(c) == ("ESTABLISHED", "SYN_RCVD") and not c.handshake
    s, r = c.update(cli.frame(ACK, 1001, 5001), 0)
    assert "ESTABLISHED" in r and "STATE_CHANGE" in r and c.handshake
    assert states(c) == ("ESTABLISHED", "ESTABLISHED")
    assert c.endpoint(1)["mss"] == 1400 and c.endpoint(0)["isn"] == 1000
    s, r = c.update(cli.frame(ACK | PSH, 1001, 5001, data=b"x" * 100), 0)
    assert s == ["NEW_DATA"] and r == []
    s, _ = c.update(srv.frame(ACK | PSH, 5001, 1101, data=b"y" * 10), 1)
    assert s == ["NEW_DATA", "ACK_ADVANCE"]
    assert c.endpoint(0)["snd_nxt"] == 1101 and c.endpoint(1)["ack"] == 1101
    # client closes first
    s, r = c.update(cli.frame(FIN | ACK, 1101, 5011), 0)
    assert "FIN" in s and "FIN" in r and "ACK_ADVANCE" in s
    assert states(c) == ("FIN_WAIT_1", "CLOSE_WAIT")
    c.update(srv.frame(ACK, 5011, 1102), 1)
    assert states(c) == ("FIN_WAIT_2", "CLOSE_WAIT") and not c.closed
    s, r = c.update(srv.frame(FIN | ACK, 5011, 1102), 1)
    assert states(c) == ("TIME_WAIT", "LAST_ACK") and "TERMINATE" in r and c.closed
    s, r = c.update(cli.frame(ACK, 1102, 5012), 0)
    assert states(c) == ("TIME_WAIT", "CLOSED") and "TERMINATE" not in s + r
    assert c.closed_by == "fin"


def test_server_closes_first():
    cli, srv = pair()
    c = TcpConn()
    handshake(c, cli, srv)
    c.update(srv.frame(FIN | ACK, 5001, 1001), 1)
    assert states(c) == ("CLOSE_WAIT", "FIN_WAIT_1")
    # the client's FIN ACKs the server's in the same segment
    _, r = c.update(cli.frame(FIN | ACK, 1001, 5002), 0)
    assert states(c) == ("LAST_ACK", "TIME_WAIT") and "TERMINATE" in r
    _, r = c.update(srv.frame(ACK, 5002, 1002), 1)
    assert states(c) == ("CLOSED", "TIME_WAIT")
    assert c.endpoint(0)["fin_acked"] and c.endpoint(1)["fin_acked"]


def test_simultaneous_close():
    cli, srv = pair()
    c = TcpConn()
    handshake(c, cli, srv)
    c.update(cli.frame(FIN | ACK, 1001, 5001), 0)
    # the server's FIN crossed the client's: it does not ACK it
    s, r = c.update(srv.frame(FIN | ACK, 5001, 1001), 1)
    assert states(c) == ("CLOSING", "CLOSING") and not c.closed
    _, r = c.update(cli.frame(ACK, 1002, 5002), 0)
    assert c.state(1) == "TIME_WAIT" and "TERMINATE" in r
    c.update(srv.frame(ACK, 5002, 1002), 1)
    assert states(c) == ("TIME_WAIT", "TIME_WAIT")


def test_rst_valid_and_out_of_window():
    cli, srv = pair()
    c = TcpConn()
    handshake(c, cli, srv, cwin=1000)
    c.update(cli.frame(ACK, 1001, 5001, win=1000, data=b"a" * 10), 0)
    c.update(srv.frame(ACK, 5001, 1011, win=2000), 1)
    # blind RSTs outside the receiver's window change nothing
    for seq in (5001 + 1000 + 1, 5001 - 1, 5001 + 100000):
        s, r = c.update(srv.frame(RST, seq), 1)
        assert s == ["RST", "RST_INVALID"] and r == ["RST", "RST_INVALID"]
    # in window but not rcv_nxt: a challenge ACK, not a reset (RFC 5961 §3.2)
    s, r = c.update(srv.frame(RST | ACK, 5001 + 999, 1011), 1)
    assert s == ["RST", "RST_INVALID"] and r == ["RST", "RST_INVALID"]
    assert states(c) == ("ESTABLISHED", "ESTABLISHED") and not c.closed
    # at rcv_nxt: accepted
    s, r = c.update(srv.frame(RST | ACK, 5001, 1011), 1)
    assert s == ["RST", "STATE_CHANGE", "TERMINATE"] and r == ["RST", "STATE_CHANGE"]
    assert states(c) == ("CLOSED", "CLOSED") and c.closed_by == "rst"


@pytest.mark.parametrize("offset, ok", [(-1, False), (0, True), (5, True), (10, True),
                                        (11, False), (999, False)])
def test_rst_between_the_receiver_s_ack_and_the_sender_s_snd_nxt(offset, ok):
    # The receiver's rcv_nxt, the one seq it resets at (RFC 5961 §3.2), is at least
    # its last ACK (5011) and at most what the sender sent (5021): the Monitor takes
    # a RST anywhere there, and none past it, though the window (1000) reaches on.
    # RFC 793's whole-window test took 5011 + 999 too: a forged RST the receiver
    # ignores ended the connection in the Monitor's view.
    cli, srv = pair()
    c = TcpConn()
    handshake(c, cli, srv, cwin=1000)
    c.update(srv.frame(ACK | PSH, 5001, 1001, data=b"r" * 20), 1)
    c.update(cli.frame(ACK, 1001, 5011, win=1000), 0)
    s, r = c.update(srv.frame(RST, 5011 + offset), 1)
    if ok:
        assert s == ["RST", "STATE_CHANGE", "TERMINATE"] and r == ["RST", "STATE_CHANGE"]
        assert states(c) == ("CLOSED", "CLOSED") and c.closed_by == "rst"
    else:
        assert s == ["RST", "RST_INVALID"] and r == ["RST", "RST_INVALID"]
        assert states(c) == ("ESTABLISHED", "ESTABLISHED") and not c.closed


@pytest.mark.parametrize("offset, ok", [(-1, False), (0, True), (1, False)])
def test_rst_against_a_zero_window_must_hit_rcv_nxt(offset, ok):
    # with no window RFC 9293 takes only SEG.SEQ = RCV.NXT
    cli, srv = pair()
    c = TcpConn()
    handshake(c, cli, srv)
    c.update(srv.frame(ACK, 5001, 1001, data=b"f" * 10), 1)
    c.update(cli.frame(ACK, 1001, 5011, win=0), 0)      # those 10 bytes filled it
    s, _ = c.update(srv.frame(RST, 5011 + offset), 1)
    assert ("RST_INVALID" not in s) == ok and c.closed == ok


def test_rst_refusing_a_syn():
    cli, srv = pair()
    c = TcpConn()
    c.update(cli.frame(SYN, 1000), 0)
    # a RST that does not ACK the SYN is not acceptable in SYN_SENT
    s, _ = c.update(srv.frame(RST, 0), 1)
    assert "RST_INVALID" in s and c.state(0) == "SYN_SENT"
    s, r = c.update(srv.frame(RST | ACK, 0, 1001, data=b"port closed"), 1)
    assert "RST_DATA" in s and "TERMINATE" in s and "RST_INVALID" not in s
    assert c.state(0) == "CLOSED" and c.endpoint(0)["snd_nxt"] == 1001


def test_data_outside_the_window():
    cli, srv = pair()
    c = TcpConn()
    handshake(c, cli, srv, swin=1000)
    s, r = c.update(cli.frame(ACK, 1001 + 1001, 5001, data=b"z" * 10), 0)
    assert s == ["OUT_OF_WINDOW"] and r == ["OUT_OF_WINDOW"]
    assert c.endpoint(0)["snd_nxt"] == 1001
    s, _ = c.update(cli.frame(ACK, 1001 + 990, 5001, data=b"z" * 10), 0)
    assert s == ["NEW_DATA"]          # inside the window, past a gap
    s, _ = c.update(cli.frame(ACK, 1001 + 1000, 5001, data=b"z"), 0)
    assert s == ["OUT_OF_WINDOW"]     # data starting on the right edge (RFC 9293)
    s, _ = c.update(cli.frame(ACK, 1001 + 1000, 5001), 0)
    assert "OUT_OF_WINDOW" not in s   # a bare ACK may sit there


def test_a_zero_window_takes_no_data():
    cli, srv = pair()
    c = TcpConn()
    handshake(c, cli, srv)
    c.update(srv.frame(ACK, 5001, 1001, win=0), 1)
    s, _ = c.update(cli.frame(ACK, 1001, 5001, data=b"p"), 0)
    assert s == ["OUT_OF_WINDOW"] and c.endpoint(0)["snd_nxt"] == 1001
    s, _ = c.update(cli.frame(ACK, 1001, 5001), 0)
    assert "OUT_OF_WINDOW" not in s


def test_retransmissions():
    cli, srv = pair()
    c = TcpConn()
    s, _ = c.update(cli.frame(SYN, 1000), 0)
    s, r = c.update(cli.frame(SYN, 1000), 0)
    assert s == ["SYN", "RETRANSMISSION"] and r == ["SYN"]
    c.update(srv.frame(SYN | ACK, 5000, 1001), 1)
    s, _ = c.update(srv.frame(SYN | ACK, 5000, 1001), 1)
    assert "RETRANSMISSION" in s and "SYNACK" in s
    c.update(cli.frame(ACK, 1001, 5001), 0)
    c.update(cli.frame(ACK, 1001, 5001, data=b"0123456789"), 0)
    s, _ = c.update(cli.frame(ACK, 1001, 5001, data=b"0123456789"), 0)
    assert s == ["RETRANSMISSION"]
    s, _ = c.update(cli.frame(ACK, 1006, 5001, data=b"56789abcde"), 0)   # half new
    assert s == ["NEW_DATA"]
    c.update(cli.frame(FIN | ACK, 1016, 5001), 0)
    s, r = c.update(cli.frame(FIN | ACK, 1016, 5001), 0)
    assert s == ["FIN", "RETRANSMISSION"] and r == ["FIN"]
    assert states(c) == ("FIN_WAIT_1", "CLOSE_WAIT")


def test_midstream_pickup():
    cli, srv = pair()
    c = TcpConn()
    s, r = c.update(srv.frame(ACK | PSH, 7000, 3000, data=b"hello"), 1)
    assert s == ["STATE_CHANGE", "NEW_DATA", "ACK_ADVANCE", "MIDSTREAM"]
    assert r == ["STATE_CHANGE"] and c.midstream and not c.handshake
    assert states(c) == ("ESTABLISHED", "ESTABLISHED") and c.client_dir == 1
    assert c.endpoint(1)["snd_nxt"] == 7005 and c.endpoint(0)["snd_nxt"] == 3000
    assert c.endpoint(1)["win_scale_unknown"]
    s, _ = c.update(cli.frame(ACK, 3000, 7005, win=4), 0)
    assert s == ["ACK_ADVANCE"]
    # the scale is unknown: a segment up to 4 << 14 bytes ahead is not flagged
    s, _ = c.update(srv.frame(ACK, 7005 + 60000, 3000, data=b"x"), 1)
    assert "OUT_OF_WINDOW" not in s
    # a pure SYN on a picked-up connection is a new connection
    s, _ = c.update(cli.frame(SYN, 123), 0, restart=False)
    assert s == ["SYN", "NEW_CONNECTION"]


def test_fast_open_data_in_syn():
    cli, srv = pair()
    c = TcpConn()
    s, _ = c.update(cli.frame(SYN, 1000, data=b"GET / HTTP/1.1\r\n\r\n"), 0)
    assert s == ["SYN", "STATE_CHANGE", "NEW_DATA", "SYN_DATA"]
    assert c.endpoint(0)["snd_nxt"] == 1000 + 1 + 18
    c.update(srv.frame(SYN | ACK, 5000, 1019), 1)
    _, r = c.update(cli.frame(ACK, 1019, 5001), 0)
    assert "ESTABLISHED" in r
    s, _ = c.update(cli.frame(SYN, 1000, data=b"GET / HTTP/1.1\r\n\r\n"), 0)
    assert "RETRANSMISSION" in s and "NEW_DATA" not in s


def test_window_scaling():
    cli, srv = pair()
    c = TcpConn()
    handshake(c, cli, srv, cwin=100, copts={"wscale": 7, "sack_ok": True, "ts": (1, 0)},
              sopts={"wscale": 9, "sack_ok": True})
    assert c.options == {"wscale": True, "sack": True, "ts": False}
    assert c.endpoint(1)["win"] == 65535          # the SYN+ACK's window: never scaled
    assert c.endpoint(0)["win"] == 100 << 7
    c.update(srv.frame(ACK, 5001, 1001, win=200), 1)
    assert c.endpoint(1)["win"] == 200 << 9
    # one side without the option: no scaling either way
    c = TcpConn()
    handshake(c, cli, srv, cwin=100, copts={"wscale": 7}, sopts={})
    assert c.options["wscale"] is False and c.endpoint(0)["win"] == 100



def test_a_syn_whose_options_the_snaplen_cut_decides_no_options():
    """A SYN cut by a snaplen inside its options is tracked on its fixed header, but
    what it offered is unknown: taken as "no window scale", the server's scaled
    windows read as tiny and the data the client took came OUT_OF_WINDOW.  Nothing
    is decided, and windows stay raw, as midstream."""
    cli, srv = pair()
    c = TcpConn()
    syn = cli.frame(SYN, 1000, opts=syn_opts(wscale=7, sack_ok=True))
    f = parse(syn[:14 + 20 + 22], wirelen=len(syn))
    assert (f["status"], f["opts_cut"], f["wscale"], f["seq"]) == ("trunc_l4", True, None,
                                                                     1000)
    c.update(f, 0)
    c.update(srv.frame(SYN | ACK, 5000, 1001, opts=syn_opts(wscale=7)), 1)
    c.update(cli.frame(ACK, 1001, 5001, win=4), 0)          # 4 << 7 offered
    assert c.options is None and c.endpoint(0)["opts_cut"]
    assert c.endpoint(0)["win_scale_unknown"]
    s, _ = c.update(srv.frame(ACK, 5001 + 100, 1001, data=b"x" * 100), 1)
    assert "OUT_OF_WINDOW" not in s and "NEW_DATA" in s

def test_the_window_is_the_newest_ack_s():
    """ACKs seen out of order: the window of a lower ACK, or a smaller one at the same
    ACK (sent before a window update), is older than the one held and not taken; a
    higher ACK's is taken even if smaller (the receiver's buffer filled)."""
    cli, srv = pair()
    c = TcpConn()
    handshake(c, cli, srv, cwin=1000)
    c.update(srv.frame(ACK, 5001, 1001, data=b"s" * 500), 1)
    c.update(cli.frame(ACK, 1001, 5501, win=3000), 0)
    c.update(cli.frame(ACK, 1001, 5201, win=800), 0)        # lower ACK: older
    assert (c.endpoint(0)["ack"], c.endpoint(0)["win"]) == (5501, 3000)
    c.update(cli.frame(ACK, 1001, 5501, win=2000), 0)       # same ACK, smaller: older
    assert c.endpoint(0)["win"] == 3000
    c.update(cli.frame(ACK, 1001, 5501, win=4000), 0)       # same ACK, larger: an update
    assert c.endpoint(0)["win"] == 4000
    s, _ = c.update(srv.frame(ACK, 5501 + 3999, 1001, data=b"e"), 1)
    assert "OUT_OF_WINDOW" not in s
    c.update(cli.frame(ACK, 1001, 5502, win=10), 0)         # higher ACK: taken
    assert c.endpoint(0)["win"] == 10
    s, _ = c.update(srv.frame(ACK, 5502 + 11, 1001, data=b"e"), 1)
    assert s == ["OUT_OF_WINDOW"]


def test_the_first_window_after_a_syn_replaces_the_syn_s():
    """A SYN's window is never scaled, so it is not weighed against later, scaled
    ones at the same ACK: Linux offers 65160 in its SYN+ACK and 509 << 7 = 65152
    after it (a server-first protocol, an SSH or SMTP banner, at the SYN's ACK).
    Taken as a smaller, older window, the SYN+ACK's stayed the server's, in its
    snapshot and in the window a client segment is checked against."""
    cli, srv = pair()
    c = TcpConn()
    wscale = {"wscale": 7}
    handshake(c, cli, srv, swin=65160, cwin=502, copts=wscale, sopts=wscale)
    assert c.endpoint(1)["win"] == 65160
    c.update(srv.frame(ACK | PSH, 5001, 1001, win=509, data=b"SSH-2.0-banner\r\n"), 1)
    assert c.endpoint(1)["win"] == 509 << 7
    d = snapshot_decode(c.snapshot(0, frontier=0, ts_ns=0))
    assert d["receiver_win"] == 509 << 7


def test_a_narrow_window_after_the_syn_is_enforced():
    """The server's first window after its SYN+ACK (65535, unscaled) is 1 << 7 = 128
    bytes at the same ACK: it is taken, and a client segment 10 KB past it is refused;
    the SYN+ACK's window held on let it through as NEW_DATA."""
    cli, srv = pair()
    c = TcpConn()
    wscale = {"wscale": 7}
    handshake(c, cli, srv, swin=65535, cwin=502, copts=wscale, sopts=wscale)
    c.update(srv.frame(ACK, 5001, 1001, win=1), 1)
    assert c.endpoint(1)["win"] == 128
    s, r = c.update(cli.frame(ACK | PSH, 1001 + 10_000, 5001, win=502, data=b"x" * 100), 0)
    assert s == ["OUT_OF_WINDOW"] and r == ["OUT_OF_WINDOW"]
    # once a scaled window is held, a smaller one at the same ACK is older again
    c.update(srv.frame(ACK, 5001, 1001, win=2), 1)
    c.update(srv.frame(ACK, 5001, 1001, win=1), 1)
    assert c.endpoint(1)["win"] == 2 << 7


def test_a_syn_seen_again_late_keeps_the_window_learned_since():
    """A SYN is its sender's first segment: one seen again after a later window (a
    retransmission, a reordered capture) is older, and its unscaled window is not
    taken.  Taken, the SYN+ACK's 65535 replaced the server's 128 bytes and let a
    client segment 10 KB past them through as NEW_DATA; the client's SYN likewise."""
    cli, srv = pair()
    c = TcpConn()
    wscale = {"wscale": 7}
    handshake(c, cli, srv, swin=65535, cwin=502, copts=wscale, sopts=wscale)
    assert c.endpoint(0)["win"] == 502 << 7
    c.update(srv.frame(ACK, 5001, 1001, win=1), 1)
    s, _ = c.update(srv.frame(SYN | ACK, 5000, 1001, win=65535, opts=syn_opts(**wscale)), 1)
    assert "RETRANSMISSION" in s
    assert c.endpoint(1)["win"] == 128
    assert snapshot_decode(c.snapshot(0, frontier=0, ts_ns=0))["receiver_win"] == 128
    s, r = c.update(cli.frame(ACK | PSH, 1001 + 10_000, 5001, win=502, data=b"x" * 100), 0)
    assert s == ["OUT_OF_WINDOW"] and r == ["OUT_OF_WINDOW"]
    c.update(cli.frame(SYN, 1000, win=64240, opts=syn_opts(**wscale)), 0)
    assert c.endpoint(0)["win"] == 502 << 7
    # a SYN's window still replaces a SYN's (no later window of its sender seen)
    c = TcpConn()
    c.update(cli.frame(SYN, 1000, win=1000, opts=syn_opts()), 0)
    c.update(cli.frame(SYN, 1000, win=2000, opts=syn_opts()), 0)
    assert c.endpoint(0)["win"] == 2000


@pytest.mark.parametrize("v6", [False, True])
def test_sequence_numbers_wrap(v6):
    cli, srv = pair(v6)
    c = TcpConn()
    ic, is_ = 2**32 - 50, 2**32 - 1
    handshake(c, cli, srv, ic, is_)
    seq = ic + 1
    for _ in range(5):                    # crosses 2^32 on the second segment
        s, _ = c.update(cli.frame(ACK, seq, is_ + 1, data=b"q" * 30), 0)
        assert s == ["NEW_DATA"]
        s, _ = c.update(cli.frame(ACK, seq, is_ + 1, data=b"q" * 30), 0)
        assert s == ["RETRANSMISSION"]
        seq += 30
        s, _ = c.update(srv.frame(ACK, is_ + 1, seq), 1)
        assert s == ["ACK_ADVANCE"]
    assert c.endpoint(0)["snd_nxt"] == seq & M32 and c.endpoint(1)["ack"] == seq & M32
    c.update(cli.frame(FIN | ACK, seq, is_ + 1), 0)
    c.update(srv.frame(FIN | ACK, is_ + 1, seq + 1), 1)
    assert c.closed and states(c) == ("TIME_WAIT", "LAST_ACK")


def test_reused_five_tuple():
    cli, srv = pair()
    c = TcpConn()
    handshake(c, cli, srv)
    c.update(cli.frame(FIN | ACK, 1001, 5001), 0)
    c.update(srv.frame(FIN | ACK, 5001, 1002), 1)
    c.update(cli.frame(ACK, 1002, 5002), 0)
    assert c.closed
    # the old SYN again is a retransmission, not a new connection
    s, _ = c.update(cli.frame(SYN, 1000), 0)
    assert "RETRANSMISSION" in s and "NEW_CONNECTION" not in s and c.closed
    # a new ISN: the same 5-tuple carries a new connection (here opened by the server)
    s, r = c.update(srv.frame(SYN, 90000), 1, restart=False)
    assert s == ["SYN", "NEW_CONNECTION"] and r == []
    s, r = c.update(srv.frame(SYN, 90000), 1)
    assert s[0] == "NEW_CONNECTION" and "SYN" in s and not c.closed
    assert c.client_dir == 1 and states(c) == ("SYN_RCVD", "SYN_SENT")
    # also while open: another ISN from the client
    c = TcpConn()
    handshake(c, cli, srv)
    s, _ = c.update(cli.frame(SYN, 2000), 0)
    assert s[0] == "NEW_CONNECTION" and states(c) == ("SYN_SENT", "SYN_RCVD")


def test_handshake_in_any_order():
    cli, srv = pair()
    c = TcpConn()
    # seen: the SYN+ACK first, then the client's ACK, then the SYN (reordered)
    c.update(srv.frame(SYN | ACK, 5000, 1001), 1)
    assert c.client_dir == 0 and c.client_how == "synack"
    c.update(cli.frame(ACK, 1001, 5001), 0)
    assert not c.handshake
    s, r = c.update(cli.frame(SYN, 1000), 0)
    assert "NEW_CONNECTION" not in s and "ESTABLISHED" in r
    assert states(c) == ("ESTABLISHED", "ESTABLISHED") and c.client_how == "syn"


def test_simultaneous_open():
    a, b = pair()
    c = TcpConn()
    c.update(a.frame(SYN, 100), 0)
    c.update(b.frame(SYN, 900), 1)
    assert states(c) == ("SYN_RCVD", "SYN_RCVD") and c.client_dir == 0
    c.update(a.frame(SYN | ACK, 100, 901), 0)
    _, r = c.update(b.frame(SYN | ACK, 900, 101), 1)
    assert states(c) == ("ESTABLISHED", "ESTABLISHED") and "ESTABLISHED" in r


def test_size():
    assert CONN_SIZE <= 96 and CONN_SIZE == 64
    assert len(BITS) == 16 and len(set(BITS.values())) == 16


# ---------------------------------------------------------------------------
# Snapshots

def test_snapshot_round_trip_and_isolation():
    cli, srv = pair()
    c = TcpConn()
    handshake(c, cli, srv, copts={"wscale": 3}, sopts={"wscale": 5})
    c.update(srv.frame(ACK, 5001, 1001, win=3000), 1)
    c.update(cli.frame(ACK | PSH, 1001, 5001, data=b"d" * 50), 0)
    ts = 1_700_000_000_987_654_321
    snap = c.snapshot(0, frontier=(1 << 47) + 50, ts_ns=ts)
    assert len(snap) == SNAPSHOT_SIZE <= 23
    d = snapshot_decode(snap, ref_ns=ts + 5_000_000)
    assert d["dir"] == 0 and d["sender_state"] == "ESTABLISHED"
    assert d["receiver_state"] == "ESTABLISHED" and d["established"]
    assert d["receiver_snd_nxt"] == 5001 and d["receiver_ack"] == 1001
    assert d["receiver_win"] == 3000 << 5 and not d["receiver_is_client"]
    assert d["frontier"] == (1 << 47) + 50 and d["ts_ns"] == ts // 1000 * 1000
    # later segments change the connection, not the snapshot taken before them
    c.update(srv.frame(ACK | PSH, 5001, 1051, win=7, data=b"r" * 20), 1)
    c.update(srv.frame(RST, 5021), 1)
    assert c.closed
    assert snapshot_decode(snap, ref_ns=ts) == d
    after = snapshot_decode(c.snapshot(0, (1 << 47) + 50, ts), ref_ns=ts)
    assert after["receiver_snd_nxt"] == 5021 and after["receiver_state"] == "CLOSED"
    assert after["terminated"] and after["closed_by_rst"]
    # the timestamp unwraps across its 2^32 us wrap
    d = snapshot_decode(c.snapshot(1, 0, (1 << 32) * 1000 + 5000), ref_ns=(1 << 32) * 1000 - 7000)
    assert d["ts_ns"] == (1 << 32) * 1000 + 5000 and d["receiver_is_client"]
    with pytest.raises(ValueError):
        snapshot_decode(snap[:-1])


def test_snapshot_midstream_window():
    cli, srv = pair()
    c = TcpConn()
    c.update(cli.frame(ACK, 10, 20, win=300), 0)
    c.update(srv.frame(ACK, 20, 10, win=77), 1)
    d = snapshot_decode(c.snapshot(0))
    assert d["midstream"] and d["receiver_win"] == 77 and d["receiver_win_scale_unknown"]


# ---------------------------------------------------------------------------
# Model-based: both endpoints per RFC 793, segments delivered as the monitor sees
# them, against TcpConn.

class Side:
    def __init__(self, isn):
        self.isn = isn
        self.state = "CLOSED"
        self.snd_nxt = isn
        self.rcv_nxt = None        # what it has received in order (its ACK)
        self.last_ack = None       # the last ACK it sent
        self.fin_seq = None
        self.fin_acked = False
        self.sent = []             # (flags, seq, ack, payload) it sent


class TwinModel(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.conn = TcpConn()
        self.hosts = pair()
        self.sides = None
        self.client = 0
        self.started = False
        self.handshake = False
        self.terminated = False
        self.expect_terminate = False

    # -- helpers --
    def _send(self, d, flags, seq, ack, payload=b"", record=True):
        side = self.sides[d]
        if flags & ACK:
            side.last_ack = ack
        if record:
            side.sent.append((flags, seq, ack, payload))
        return self.conn.update(self.hosts[d].frame(flags, seq, ack, data=payload), d)

    def _deliver_ack(self, r, ack):
        """Receiver r processes an acceptable ACK (RFC 793 p. 72)."""
        if r.state == "SYN_RCVD" and (ack - r.isn) & M32 and ((ack - r.isn) & M32) < 1 << 31:
            r.state = "ESTABLISHED"
        if r.fin_seq is not None and not r.fin_acked and 0 < (ack - r.fin_seq) & M32 < 1 << 31:
            r.fin_acked = True
            r.state = {"FIN_WAIT_1": "FIN_WAIT_2", "CLOSING": "TIME_WAIT",
                       "LAST_ACK": "CLOSED"}.get(r.state, r.state)

    def _ended(self, before):
        s0, s1 = self.sides
        if self.terminated:
            return False
        done = ("TIME_WAIT" in (s0.state, s1.state) or (s0.fin_acked and s1.fin_acked)
                or "LAST_ACK" in before and "CLOSED" in (s0.state, s1.state))
        if done:
            self.terminated = True
            event("closed by FIN")
        return done

    def _check(self, res, *, retrans=False, established=False, terminate=False):
        s, r = res
        assert ("RETRANSMISSION" in s) == retrans, res
        assert ("ESTABLISHED" in r) == established, res
        assert ("TERMINATE" in s + r) == terminate, res
        assert "NEW_CONNECTION" not in s and "OUT_OF_WINDOW" not in s, res

    def _opened(self, d):
        return any(f & SYN for f, *_ in self.sides[d].sent)

    def _room(self, d):
        peer = self.sides[d ^ 1]
        base = peer.last_ack if peer.last_ack is not None else self.sides[d].snd_nxt
        return 60000 - ((self.sides[d].snd_nxt - base) & M32)

    # -- rules --
    @initialize(client=st.integers(0, 1), isn_c=st.integers(2**32 - 3000, M32),
          isn_s=st.integers(2**32 - 3000, M32))
    def open(self, client, isn_c, isn_s):
        self.client = client
        sides = [None, None]
        sides[client], sides[client ^ 1] = Side(isn_c), Side(isn_s)
        self.sides = sides
        self.started = True
        c, s = sides[client], sides[client ^ 1]
        c.state, c.snd_nxt = "SYN_SENT", (isn_c + 1) & M32
        s.state, s.rcv_nxt = "SYN_RCVD", c.snd_nxt
        self._check(self._send(client, SYN, isn_c, 0))
        assert self.conn.client_dir == client

    @precondition(lambda self: self.started and not self.terminated
                  and self.sides[self.client ^ 1].state == "SYN_RCVD"
                  and not any(f & SYN for f, *_ in self.sides[self.client ^ 1].sent))
    @rule()
    def synack(self):
        d = self.client ^ 1
        s, c = self.sides[d], self.sides[self.client]
        s.snd_nxt = (s.isn + 1) & M32
        c.rcv_nxt = s.snd_nxt
        c.state = "ESTABLISHED"
        self._check(self._send(d, SYN | ACK, s.isn, s.rcv_nxt))

    @rule(d=st.integers(0, 1), n=st.integers(1, 1400))
    def data(self, d, n):
        if self.terminated:
            return
        x, y = self.sides[d], self.sides[d ^ 1]
        if x.state not in ("ESTABLISHED", "CLOSE_WAIT") or self._room(d) < n:
            return
        seq = x.snd_nxt
        x.snd_nxt = (seq + n) & M32
        was = self.handshake
        self._deliver_ack(y, x.rcv_nxt)
        y.rcv_nxt = x.snd_nxt
        est = self._update_handshake(was)
        res = self._send(d, ACK | PSH, seq, x.rcv_nxt, b"D" * n)
        self._check(res, established=est)
        assert "NEW_DATA" in res[0]

    @rule(d=st.integers(0, 1), n=st.integers(1, 700))
    def data_reordered(self, d, n):
        if self.terminated:
            return
        x, y = self.sides[d], self.sides[d ^ 1]
        if x.state not in ("ESTABLISHED", "CLOSE_WAIT") or self._room(d) < 2 * n:
            return
        was = self.handshake
        seq = x.snd_nxt
        x.snd_nxt = (seq + 2 * n) & M32
        self._deliver_ack(y, x.rcv_nxt)
        y.rcv_nxt = x.snd_nxt
        est = self._update_handshake(was)
        self._check(self._send(d, ACK, (seq + n) & M32, x.rcv_nxt, b"2" * n), established=est)
        # the earlier half, seen second: the monitor calls it a retransmission
        self._check(self._send(d, ACK, seq, x.rcv_nxt, b"1" * n), retrans=True)

    def _update_handshake(self, was):
        c, s = self.sides[self.client], self.sides[self.client ^ 1]
        if not was and c.state != "SYN_SENT" and s.state not in ("SYN_RCVD", "CLOSED") \
                and any(f & SYN for f, *_ in s.sent):
            self.handshake = True
            return True
        return False

    @rule(d=st.integers(0, 1))
    def ack(self, d):
        x, y = self.sides[d], self.sides[d ^ 1]
        if x.rcv_nxt is None or x.state in ("CLOSED", "SYN_SENT", "SYN_RCVD") \
                or not self._opened(d):
            return
        was, before = self.handshake, (x.state, y.state)
        self._deliver_ack(y, x.rcv_nxt)
        est = self._update_handshake(was)
        term = self._ended(before)
        self._check(self._send(d, ACK, x.snd_nxt, x.rcv_nxt), established=est, terminate=term)

    @rule(d=st.integers(0, 1), stale=st.booleans())
    def fin(self, d, stale):
        if self.terminated:
            return
        x, y = self.sides[d], self.sides[d ^ 1]
        if x.state not in ("ESTABLISHED", "CLOSE_WAIT"):
            return
        ack = x.rcv_nxt
        if stale:
            # a FIN sent before the peer's FIN arrived (simultaneous close)
            if x.state != "CLOSE_WAIT" or (x.last_ack is not None
                                            and (y.fin_seq - x.last_ack) & M32 >= 1 << 31):
                return
            ack = y.fin_seq
        was, before = self.handshake, (x.state, y.state)
        x.fin_seq = x.snd_nxt
        x.snd_nxt = (x.snd_nxt + 1) & M32
        if x.state == "ESTABLISHED":
            x.state = "FIN_WAIT_1"
        else:
            x.state = "CLOSING" if stale else "LAST_ACK"
        self._deliver_ack(y, ack)
        y.rcv_nxt = x.snd_nxt
        y.state = {"ESTABLISHED": "CLOSE_WAIT", "FIN_WAIT_1": "CLOSING",
                   "FIN_WAIT_2": "TIME_WAIT"}[y.state]
        est = self._update_handshake(was)
        term = self._ended(before)
        event("simultaneous close" if stale else "FIN")
        res = self._send(d, FIN | ACK, x.fin_seq, ack)
        self._check(res, established=est, terminate=term)

    @rule(d=st.integers(0, 1), kind=st.integers(0, 5))
    def rst(self, d, kind):
        if self.terminated:
            return
        x, y = self.sides[d], self.sides[d ^ 1]
        if x.state == "CLOSED" or kind > 1:     # RSTs are rare: leave room for FINs
            return
        if kind == 0:
            if x.rcv_nxt is None:
                return
            s, r = self._send(d, RST | ACK, x.snd_nxt, x.rcv_nxt, record=False)
            assert "RST_INVALID" not in s and "TERMINATE" in s, (s, r)
            x.state = y.state = "CLOSED"
            self.terminated = True
            event("valid RST")
        else:
            base = y.last_ack if y.last_ack is not None else x.snd_nxt
            s, r = self._send(d, RST, base + (1 << 20), 0, record=False)
            assert "RST_INVALID" in s and "RST_INVALID" in r and "TERMINATE" not in s
            event("invalid RST")

    @rule(d=st.integers(0, 1), pick=st.integers(0, 10**6))
    def retransmit(self, d, pick):
        x = self.sides[d]
        old = [seg for seg in x.sent if seg[0] & (SYN | FIN) or seg[3]]
        if not old:
            return
        flags, seq, ack, payload = old[pick % len(old)]
        event("retransmitted " + ("SYN" if flags & SYN else "FIN" if flags & FIN else "data"))
        res = self._send(d, flags, seq, ack, payload, record=False)
        self._check(res, retrans=True)

    @rule(d=st.integers(0, 1), delta=st.integers(1 << 16, 1 << 30), kind=st.integers(0, 3))
    def new_connection(self, d, delta, kind):
        x, y = self.sides[d], self.sides[d ^ 1]
        if kind or not (self._opened(d) or self.terminated):
            return                  # a first SYN from this side: simultaneous open
        isn = (x.isn + delta) & M32
        s, r = self._send(d, SYN, isn, 0, record=False)
        assert s[0] == "NEW_CONNECTION" and "SYN" in s, (s, r)
        sides = [None, None]
        sides[d], sides[d ^ 1] = Side(isn), Side(y.snd_nxt)
        sides[d].state, sides[d].snd_nxt = "SYN_SENT", (isn + 1) & M32
        sides[d].sent.append((SYN, isn, 0, b""))
        sides[d ^ 1].state, sides[d ^ 1].rcv_nxt = "SYN_RCVD", (isn + 1) & M32
        self.sides, self.client = sides, d
        event("new connection" + (" after close" if self.terminated else " while open"))
        self.handshake = self.terminated = False
        assert self.conn.client_dir == d

    @invariant()
    def same_states(self):
        if self.sides is None:
            return
        assert (self.conn.state(0), self.conn.state(1)) == (self.sides[0].state,
                                                             self.sides[1].state)
        assert self.conn.handshake == self.handshake
        assert self.conn.closed == self.terminated
        for d in (0, 1):
            if self.sides[d].sent:          # before that the monitor knows nothing
                assert self.conn.endpoint(d)["snd_nxt"] == self.sides[d].snd_nxt


TwinModel.TestCase.settings = settings(max_examples=300, stateful_step_count=50,
                                       deadline=None)
test_twin_model = TwinModel.TestCase
