"""Twin TCP state: both endpoints of one connection as a middlebox sees them.

The TCP Monitor μStack keeps one ``tcp_conn`` (64 bytes of Stack Memory) per TCP
flow and, per segment, calls ``tcp_sender_update`` then ``tcp_receiver_update``
without the GIL; each returns the TcpEventBits the Monitor turns into events for
that side.  ``tcp_snapshot`` packs what a later segment would change into the 23
bytes an event message carries.  ``TcpConn``, ``snapshot_decode`` and the two
``bench_*`` functions are the Python face for tests and tools.

Semantics follow mOS's twin stacks (a segment changes its sender's side first, then
its receiver's, as if it arrived), with what mOS lacks: RSTs are checked against
the receiver's next sequence number (RFC 5961), a SYN with another ISN on the same
5-tuple starts a new connection, and nothing depends on the IP family.
"""
import time

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from mbx._packet cimport (
    TCPOPT_F_CUT,
    TCPOPT_F_MSS,
    TCPOPT_F_SACK_OK,
    TCPOPT_F_TS,
    TCPOPT_F_WSCALE,
    TH_ACK,
    TH_FIN,
    TH_RST,
    TH_SYN,
    mbx_pkt,
)
from mbx._parse cimport parse_packet

cdef extern from *:
    int __builtin_clz(unsigned int x) noexcept nogil

cdef enum:
    MAX_WSCALE = 14         # RFC 7323 §2.3: larger shifts are taken as 14
    # Window of a receiver that has not advertised one: the largest unscaled window.
    DEFAULT_WND = 65535

# The stack keeps one tcp_conn per flow: its size is part of the contract.
if sizeof(tcp_endpoint) != 28 or sizeof(tcp_conn) != 64:
    raise ImportError(f"tcp_conn is {sizeof(tcp_conn)} bytes, expected 64")

STATE_NAMES = ("CLOSED", "LISTEN", "SYN_SENT", "SYN_RCVD", "ESTABLISHED", "FIN_WAIT_1",
               "FIN_WAIT_2", "CLOSE_WAIT", "CLOSING", "LAST_ACK", "TIME_WAIT")
BITS = {
    "SYN": TCPEV_SYN, "SYNACK": TCPEV_SYNACK, "FIN": TCPEV_FIN, "RST": TCPEV_RST,
    "RETRANSMISSION": TCPEV_RETRANSMISSION, "STATE_CHANGE": TCPEV_STATE_CHANGE,
    "ESTABLISHED": TCPEV_ESTABLISHED, "TERMINATE": TCPEV_TERMINATE,
    "NEW_DATA": TCPEV_NEW_DATA, "ACK_ADVANCE": TCPEV_ACK_ADVANCE,
    "MIDSTREAM": TCPEV_MIDSTREAM, "RST_INVALID": TCPEV_RST_INVALID,
    "OUT_OF_WINDOW": TCPEV_OUT_OF_WINDOW, "NEW_CONNECTION": TCPEV_NEW_CONNECTION,
    "SYN_DATA": TCPEV_SYN_DATA, "RST_DATA": TCPEV_RST_DATA,
}
CONN_SIZE = sizeof(tcp_conn)
ENDPOINT_SIZE = sizeof(tcp_endpoint)
SNAPSHOT_SIZE = SNAP_SIZE

cdef uint16_t HS_ALL = CONN_HS_SYN | CONN_HS_SYNACK | CONN_HS_ACK


# ---------------------------------------------------------------------------
# The state machine (nogil)

cdef void tcp_init(tcp_conn *c) noexcept nogil:
    memset(c, 0, sizeof(tcp_conn))


cdef uint8_t tcp_client_dir(const tcp_conn *c) noexcept nogil:
    return c.client_dir


cdef inline void _set_client(tcp_conn *c, uint8_t d, uint8_t how) noexcept nogil:
    if c.client_how < how:
        c.client_dir = d
        c.client_how = how


cdef inline bint _pre_established(uint8_t st) noexcept nogil:
    return st <= TCPS_SYN_RCVD


# x takes the other side's FIN: it is in sequence (x's rcv_nxt reached it).
cdef inline void _take_fin(tcp_endpoint *x, bint live) noexcept nogil:
    if x.state == TCPS_FIN_WAIT_1:
        x.state = TCPS_CLOSING
    elif x.state == TCPS_FIN_WAIT_2:
        x.state = TCPS_TIME_WAIT
    elif _pre_established(x.state) and (live or x.state != TCPS_CLOSED) or \
            x.state == TCPS_ESTABLISHED:
        x.state = TCPS_CLOSE_WAIT


# The receive window of r in bytes as far as the monitor can bound it: a window
# whose scale was never seen (midstream) may be up to 2^14 times the field.
cdef inline uint32_t _rcv_wnd(const tcp_endpoint *r) noexcept nogil:
    if not (r.flags & EP_WIN_KNOWN):
        return DEFAULT_WND
    if r.flags & EP_WIN_RAW:
        return r.win << MAX_WSCALE
    return r.win


cdef bint tcp_past_edge(const tcp_conn *c, const mbx_pkt *p) noexcept nogil:
    cdef const tcp_endpoint *r = &c.ep[(p.dir & 1) ^ 1]
    cdef uint32_t wnd
    if (r.flags & (EP_ACK_KNOWN | EP_WIN_KNOWN)) != EP_ACK_KNOWN | EP_WIN_KNOWN:
        return False
    wnd = _rcv_wnd(r)
    return seq_geq(p.seq, r.ack + wnd) and p.seq - (r.ack + wnd) < wnd


# Whether a RST from s is acceptable to r (the RST_INVALID rule, decided here):
# - r in SYN_SENT (its SYN unanswered): the RST must ACK that SYN (RFC 793 p. 66);
# - otherwise its seq must be r's rcv_nxt, as RFC 5961 §3.2 and Linux take it: any
#   other seq in the window only draws a challenge ACK, and the connection goes on.
#   The monitor knows rcv_nxt only within bounds: at least r's highest ACK, at most
#   the most s was seen sending (its snd_nxt; r's ACK if that is further, the
#   capture having missed s's bytes); before r sent an ACK, s's snd_nxt.  A RST
#   anywhere in those bounds is taken.  One beyond them is not, even in r's window
#   (RFC 793's wider test): the monitor would end a connection the receiver keeps,
#   and stop watching what a sender then says (a forged in-window RST is the
#   classic way past an IDS).  The opposite error, ignoring a real RST at a seq the
#   capture missed the bytes before, only keeps the flow until it idles out, and
#   its sender answers the challenge ACK with a RST at rcv_nxt anyway.
# - nothing known about either side (the connection's first segment): accepted.
cdef bint _rst_ok(const tcp_endpoint *s, const tcp_endpoint *r,
                  const mbx_pkt *p) noexcept nogil:
    cdef uint32_t lo, hi
    if r.state == TCPS_SYN_SENT and (r.flags & EP_SYN) and not (r.flags & EP_SYNACK):
        return (p.tcp_flags & TH_ACK) != 0 and p.ack == r.snd_nxt
    if r.flags & EP_ACK_KNOWN:
        lo = r.ack
    elif s.flags & EP_SEQ_KNOWN:
        lo = s.snd_nxt
    else:
        return True
    hi = lo
    if (s.flags & EP_SEQ_KNOWN) and seq_gt(s.snd_nxt, lo):
        hi = s.snd_nxt
    return seq_leq(lo, p.seq) and seq_leq(p.seq, hi)


# Decides the options both SYNs agree on, once each side's SYN has been seen.
cdef inline void _negotiate(tcp_conn *c) noexcept nogil:
    cdef uint8_t both
    if c.flags & CONN_OPTS_KNOWN:
        return
    if not (c.ep[0].flags & (EP_SYN | EP_SYNACK)) or not (c.ep[1].flags & (EP_SYN | EP_SYNACK)):
        return
    if (c.ep[0].opts | c.ep[1].opts) & TCPOPT_F_CUT:
        # A SYN whose options the capture's snaplen cut: whether it offered a window
        # scale is unknown, so nothing is decided and later windows stay raw, each
        # bounded as up to 2^14 times its field (as midstream).  Deciding "no
        # scaling" instead would read a scaled window as tiny and refuse the
        # segments the receiver took as OUT_OF_WINDOW; an unknown SACK or
        # timestamp option decides nothing the monitor needs.
        return
    both = c.ep[0].opts & c.ep[1].opts
    c.flags |= CONN_OPTS_KNOWN
    if both & TCPOPT_F_WSCALE:
        c.flags |= CONN_WSCALE
    if both & TCPOPT_F_SACK_OK:
        c.flags |= CONN_SACK
    if both & TCPOPT_F_TS:
        c.flags |= CONN_TS


cdef inline void _syn_options(tcp_endpoint *s, const mbx_pkt *p) noexcept nogil:
    s.opts = p.tcp_opts & (TCPOPT_F_MSS | TCPOPT_F_WSCALE | TCPOPT_F_SACK_OK | TCPOPT_F_TS
                           | TCPOPT_F_CUT)
    s.mss = p.mss if p.tcp_opts & TCPOPT_F_MSS else 0
    s.wscale = 0
    if p.tcp_opts & TCPOPT_F_WSCALE:
        s.wscale = p.wscale if p.wscale < MAX_WSCALE else MAX_WSCALE


# Whether the window ``win`` that s advertises in p is older than the one it holds
# (see the window update in tcp_sender_update).  Windows in other units (raw, scale
# unknown, against scaled) are not compared.  Nor is a SYN's: its window is never
# scaled (RFC 7323 §2.2), so a receiver offering 65160 in it offers 509 << 7 = 65152
# next, not a smaller window but the same one in other units; and a SYN is the
# first segment its sender sends, so any later window of that sender is newer.
cdef inline bint _older_window(const tcp_endpoint *s, const mbx_pkt *p, uint32_t win,
                               bint raw) noexcept nogil:
    if not (p.tcp_flags & TH_ACK) or (s.flags & EP_WIN_SYN) or \
            (s.flags & (EP_ACK_KNOWN | EP_WIN_KNOWN)) != EP_ACK_KNOWN | EP_WIN_KNOWN:
        return False
    if ((s.flags & EP_WIN_RAW) != 0) != raw:
        return False
    return seq_lt(p.ack, s.ack) or (p.ack == s.ack and win < s.win)


cdef uint32_t tcp_sender_update(tcp_conn *c, const mbx_pkt *p) noexcept nogil:
    cdef uint8_t d = p.dir & 1
    cdef tcp_endpoint *s = &c.ep[d]
    cdef tcp_endpoint *r = &c.ep[d ^ 1]
    cdef tcp_endpoint *cli
    cdef uint8_t fl = p.tcp_flags
    cdef uint8_t old = s.state
    cdef uint32_t bits = 0, length = p.payload_len
    cdef uint32_t dstart, dend, end, win
    cdef bint first = not (c.flags & CONN_SEEN)
    cdef bint syn = (fl & TH_SYN) != 0, ackf = (fl & TH_ACK) != 0
    cdef bint fin = (fl & TH_FIN) != 0
    cdef bint syn_new = False, syn_again = False, restart = False, raw, fin_in_seq
    c.pkt = PK_SENDER_DONE
    c.flags |= CONN_SEEN

    # RST: validated, never stream data, its other fields ignored.
    if fl & TH_RST:
        bits |= TCPEV_RST
        if length:
            bits |= TCPEV_RST_DATA
        if first:
            c.flags |= CONN_MIDSTREAM
            _set_client(c, d, CLIENT_BY_FIRST)
            bits |= TCPEV_MIDSTREAM
        if first or _rst_ok(s, r, p):
            c.pkt |= PK_RST_VALID
            if s.state != TCPS_CLOSED:
                s.state = TCPS_CLOSED
                bits |= TCPEV_STATE_CHANGE
            if not (c.flags & CONN_TERMINATED):
                c.flags |= CONN_TERMINATED | CONN_CLOSED_RST
                bits |= TCPEV_TERMINATE
        else:
            c.pkt |= PK_RST_INVALID
            bits |= TCPEV_RST_INVALID
        return bits

    if syn and not ackf:
        bits |= TCPEV_SYN
        if s.flags & EP_SYN:
            restart = p.seq != s.isn
            syn_again = not restart
        elif first:
            pass
        elif c.flags & (CONN_TERMINATED | CONN_MIDSTREAM):
            restart = True
        elif s.flags & EP_SYNACK:
            restart = p.seq != s.isn
        elif s.flags & EP_SEQ_KNOWN:
            # Its seq is known from later segments: this can only be the
            # handshake's SYN, reordered, if it comes before all of them.
            restart = not seq_lt(p.seq, s.snd_nxt)
        if restart:
            c.pkt |= PK_RESTART
            return bits | TCPEV_NEW_CONNECTION
        _set_client(c, d, CLIENT_BY_SYN)
        if d == c.client_dir:
            c.flags |= CONN_HS_SYN
        if not syn_again:
            syn_new = True
            s.flags |= EP_SYN
            if s.state == TCPS_CLOSED or s.state == TCPS_LISTEN:
                s.state = TCPS_SYN_SENT
    elif syn:
        bits |= TCPEV_SYNACK
        if ((s.flags & EP_SYNACK) or (s.flags & EP_SYN)) and p.seq != s.isn:
            # Another ISN from a side that already chose one: not this
            # connection's, and not a new one either (that starts with a pure SYN).
            c.pkt |= PK_OOW
            return bits | TCPEV_OUT_OF_WINDOW
        _set_client(c, d ^ 1, CLIENT_BY_SYNACK)
        if s.flags & EP_SYNACK:
            syn_again = True
        else:
            syn_new = True
            s.flags |= EP_SYNACK
            if d != c.client_dir:
                c.flags |= CONN_HS_SYNACK
                # The client's ACK may have gone by first.
                cli = &c.ep[d ^ 1]
                if (cli.flags & EP_ACK_KNOWN) and seq_gt(cli.ack, p.seq):
                    c.flags |= CONN_HS_ACK
            if (s.state == TCPS_CLOSED and not (c.flags & CONN_TERMINATED)) or \
                    s.state == TCPS_LISTEN or s.state == TCPS_SYN_SENT:
                s.state = TCPS_SYN_RCVD
    elif first:
        c.flags |= CONN_MIDSTREAM
        c.pkt |= PK_MIDSTREAM
        _set_client(c, d, CLIENT_BY_FIRST)
        bits |= TCPEV_MIDSTREAM
        s.state = TCPS_ESTABLISHED
    else:
        # r still opening, its SYN sent: a segment whose ACK does not acknowledge
        # that SYN is not this connection's (a late segment of the previous one on
        # the 5-tuple, say); RFC 9293 §3.10.7.3 drops it, and so does the monitor.
        if ackf and r.state == TCPS_SYN_SENT and (r.flags & EP_SYN) and \
                not (seq_gt(p.ack, r.isn) and seq_leq(p.ack, r.snd_nxt)):
            c.pkt |= PK_OOW
            bits |= TCPEV_OUT_OF_WINDOW
            if fin:
                bits |= TCPEV_FIN
            return bits
        # Right edge of what r accepts, rcv_nxt + window: data must start before it
        # (RFC 9293 §3.10.7.4; Linux's tcp_data_queue drops the rest, zero-window
        # probes included), a segment without data may sit on it (an ACK into a
        # zero window); everything before is at worst a retransmission.  Taking
        # every probe would let one with other bytes than the sender's real ones
        # win over them where the receiver, as Linux does, drops it; the TCP
        # Monitor keeps a one-byte probe aside and delivers it only when the
        # receiver's ACK shows it took it.
        if (r.flags & (EP_ACK_KNOWN | EP_WIN_KNOWN)) == EP_ACK_KNOWN | EP_WIN_KNOWN and \
                (seq_gt(p.seq, r.ack + _rcv_wnd(r))
                 or (length and p.seq == r.ack + _rcv_wnd(r))):
            c.pkt |= PK_OOW
            bits |= TCPEV_OUT_OF_WINDOW
            if fin:
                bits |= TCPEV_FIN
            return bits
        # A side we never saw open is evidently open once it ACKs something
        # (its SYN or SYN+ACK went by unseen, or we saw it but not the reply).
        if ackf and _pre_established(s.state) and not (c.flags & CONN_TERMINATED):
            s.state = TCPS_ESTABLISHED

    if syn_new:
        if not (s.flags & EP_SEQ_KNOWN):
            s.snd_nxt = p.seq
        s.isn = p.seq
        _syn_options(s, p)
        _negotiate(c)
    if syn_again:
        bits |= TCPEV_RETRANSMISSION

    # Sequence space: SYN, data, FIN.
    dstart = p.seq + (1 if syn else 0)
    dend = dstart + length
    end = dend + (1 if fin else 0)
    if syn and length:
        bits |= TCPEV_SYN_DATA
    # A FIN is in sequence when nothing before it is known missing: its segment
    # starts at or before the most s was seen sending, or r acknowledged all
    # before it.  One beyond a hole waits, as a receiver queues it (RFC 9293
    # §3.10.7.4: a FIN is processed only once the segment text before it is).
    fin_in_seq = not (s.flags & EP_SEQ_KNOWN) or seq_leq(dstart, s.snd_nxt) or (
        (r.flags & EP_ACK_KNOWN) != 0 and seq_leq(dstart, r.ack))
    if s.flags & EP_SEQ_KNOWN:
        if not syn and (length or fin) and seq_leq(end, s.snd_nxt):
            bits |= TCPEV_RETRANSMISSION
        if length and seq_gt(dend, s.snd_nxt):
            bits |= TCPEV_NEW_DATA
        if seq_gt(end, s.snd_nxt):
            s.snd_nxt = end
    else:
        if length:
            bits |= TCPEV_NEW_DATA
        s.snd_nxt = end
        s.flags |= EP_SEQ_KNOWN

    # Window: a SYN's is never scaled; later ones are once both SYNs agreed.  One
    # sender's segments can be seen out of order (a tap fed by two CPUs, a
    # multipath), so the last one seen need not carry the current window.  A
    # higher ACK is newer: its window is taken.  A lower one is older (RFC 9293
    # §3.10.7.4 takes a window only if SEG.ACK >= SND.WL2): its window is not.  At
    # the same ACK the larger window is the newer, as a receiver does not shrink
    # its window (§3.8.6.2.2; Linux does not by default).  Pairing an older, smaller
    # window with the newest ACK would put the receiver's right edge short of what it
    # offered, and a segment it accepted would be refused as OUT_OF_WINDOW.  A SYN
    # is its sender's first segment, so a SYN seen after a window of a later one (a
    # retransmission, a reordered capture) is older than that window, in other
    # units too: it is not taken.
    if syn:
        if not (s.flags & EP_WIN_KNOWN) or (s.flags & EP_WIN_SYN):
            s.win = p.win
            s.flags = (s.flags | EP_WIN_KNOWN | EP_WIN_SYN) & ~EP_WIN_RAW
    else:
        raw = not (c.flags & CONN_OPTS_KNOWN)
        win = p.win if raw else (<uint32_t>p.win) << (s.wscale if c.flags & CONN_WSCALE else 0)
        if not _older_window(s, p, win, raw):
            s.win = win
            if raw:
                s.flags = (s.flags | EP_WIN_KNOWN | EP_WIN_RAW) & ~EP_WIN_SYN
            else:
                s.flags = (s.flags | EP_WIN_KNOWN) & ~(EP_WIN_RAW | EP_WIN_SYN)

    if ackf:
        c.pkt |= PK_ACK_OK
        if not (s.flags & EP_ACK_KNOWN) or seq_gt(p.ack, s.ack):
            s.ack = p.ack
            s.flags |= EP_ACK_KNOWN
            bits |= TCPEV_ACK_ADVANCE
        if d == c.client_dir and c.client_how >= CLIENT_BY_SYNACK and \
                (r.flags & EP_SYNACK) and seq_gt(p.ack, r.isn):
            c.flags |= CONN_HS_ACK
        if (r.flags & EP_FIN_PENDING) and seq_gt(p.ack, r.fin_seq):
            # s acknowledges r's FIN that came beyond a hole: the hole filled and s
            # took the FIN (and this ACK says so, which r's side takes below)
            r.flags &= ~EP_FIN_PENDING
            _take_fin(s, not (c.flags & CONN_TERMINATED))

    if fin:
        bits |= TCPEV_FIN
        if not (s.flags & EP_FIN):
            s.flags |= EP_FIN
            s.fin_seq = dend
            if fin_in_seq:
                c.pkt |= PK_NEW_FIN
            else:
                s.flags |= EP_FIN_PENDING
            if s.state == TCPS_CLOSE_WAIT:
                # Had it received r's FIN before sending its own, this FIN ACKs
                # it: a normal close; if not, both FINs crossed (simultaneous
                # close) and it is FIN_WAIT_1 with r's FIN received: CLOSING.
                if ackf and (r.flags & EP_FIN) and seq_gt(p.ack, r.fin_seq):
                    s.state = TCPS_LAST_ACK
                else:
                    s.state = TCPS_CLOSING
            elif s.state >= TCPS_SYN_SENT and s.state <= TCPS_ESTABLISHED:
                s.state = TCPS_FIN_WAIT_1

    if s.state != old:
        bits |= TCPEV_STATE_CHANGE
    return bits


cdef uint32_t tcp_receiver_update(tcp_conn *c, const mbx_pkt *p) noexcept nogil:
    cdef uint8_t d = p.dir & 1
    cdef tcp_endpoint *s = &c.ep[d]
    cdef tcp_endpoint *r = &c.ep[d ^ 1]
    cdef uint8_t fl = p.tcp_flags
    cdef uint8_t pk = c.pkt
    cdef uint8_t old = r.state
    cdef uint32_t bits = 0
    cdef bint live = not (c.flags & CONN_TERMINATED)
    cdef int i
    c.pkt = 0
    if not (pk & PK_SENDER_DONE) or (pk & PK_RESTART):
        return 0
    if fl & TH_RST:
        bits |= TCPEV_RST
        if pk & PK_RST_INVALID:
            return bits | TCPEV_RST_INVALID
        if r.state != TCPS_CLOSED:
            r.state = TCPS_CLOSED
            bits |= TCPEV_STATE_CHANGE
        return bits
    if fl & TH_SYN:
        bits |= TCPEV_SYNACK if fl & TH_ACK else TCPEV_SYN
    if fl & TH_FIN:
        bits |= TCPEV_FIN
    if pk & PK_OOW:
        return bits | TCPEV_OUT_OF_WINDOW

    if pk & PK_MIDSTREAM:
        r.state = TCPS_ESTABLISHED
    elif (fl & (TH_SYN | TH_ACK)) == TH_SYN:
        # A passive open (or the crossing SYN of a simultaneous open).
        if (r.state == TCPS_CLOSED and live) or r.state == TCPS_LISTEN or \
                r.state == TCPS_SYN_SENT:
            r.state = TCPS_SYN_RCVD
    elif fl & TH_SYN:
        # A SYN+ACK opens r if it ACKs r's SYN (or r's SYN was not seen).
        if _pre_established(r.state) and (live or r.state != TCPS_CLOSED) and \
                (not (r.flags & EP_SYN) or seq_gt(p.ack, r.isn)):
            r.state = TCPS_ESTABLISHED

    if pk & PK_ACK_OK:
        # An ACK beyond what r was seen sending: r sent it unseen.
        if not (r.flags & EP_SEQ_KNOWN) or seq_gt(p.ack, r.snd_nxt):
            r.snd_nxt = p.ack
            r.flags |= EP_SEQ_KNOWN
        if r.state == TCPS_SYN_RCVD and not (fl & TH_SYN) and \
                (r.flags & (EP_SYN | EP_SYNACK)) and seq_gt(p.ack, r.isn):
            r.state = TCPS_ESTABLISHED
        if (r.flags & (EP_FIN | EP_FIN_ACKED)) == EP_FIN and seq_gt(p.ack, r.fin_seq):
            r.flags |= EP_FIN_ACKED
            if r.state == TCPS_FIN_WAIT_1:
                r.state = TCPS_FIN_WAIT_2
            elif r.state == TCPS_CLOSING:
                r.state = TCPS_TIME_WAIT
            elif r.state == TCPS_LAST_ACK:
                r.state = TCPS_CLOSED

    if pk & PK_NEW_FIN:
        _take_fin(r, live)

    if (c.flags & HS_ALL) == HS_ALL and not (c.flags & CONN_ESTABLISHED):
        c.flags |= CONN_ESTABLISHED
        bits |= TCPEV_ESTABLISHED
        # With the handshake complete, a side still opening missed nothing but
        # the order in which the monitor saw the segments.
        for i in range(2):
            if c.ep[i].state == TCPS_SYN_SENT or c.ep[i].state == TCPS_SYN_RCVD:
                c.ep[i].state = TCPS_ESTABLISHED

    if live and (r.state == TCPS_TIME_WAIT or (old == TCPS_LAST_ACK and r.state == TCPS_CLOSED)
                 or (r.flags & s.flags & EP_FIN_ACKED)):
        c.flags |= CONN_TERMINATED | CONN_CLOSED_FIN
        bits |= TCPEV_TERMINATE
    if r.state != old:
        bits |= TCPEV_STATE_CHANGE
    return bits


# ---------------------------------------------------------------------------
# Snapshots

cdef inline void _st32(uint8_t *o, uint32_t v) noexcept nogil:
    o[0] = <uint8_t>v
    o[1] = <uint8_t>(v >> 8)
    o[2] = <uint8_t>(v >> 16)
    o[3] = <uint8_t>(v >> 24)


cdef int tcp_snapshot(const tcp_conn *c, uint8_t dir, uint64_t frontier, int64_t ts_ns,
                      uint8_t *out) noexcept nogil:
    cdef uint8_t d = dir & 1
    cdef const tcp_endpoint *s = &c.ep[d]
    cdef const tcp_endpoint *r = &c.ep[d ^ 1]
    cdef uint8_t f = d, shift = 0
    cdef uint32_t win = r.win
    cdef uint64_t us = <uint64_t>(ts_ns // 1000) if ts_ns >= 0 else 0
    cdef int i
    out[0] = (s.state & 0x0F) | (r.state << 4)
    if r.flags & EP_SEQ_KNOWN:
        f |= 0x02
    if r.flags & EP_ACK_KNOWN:
        f |= 0x04
    if r.flags & EP_WIN_KNOWN:
        f |= 0x08
    if c.flags & CONN_ESTABLISHED:
        f |= 0x10
    if c.flags & CONN_MIDSTREAM:
        f |= 0x20
    if c.flags & CONN_TERMINATED:
        f |= 0x40
    if c.flags & CONN_CLOSED_RST:
        f |= 0x80
    out[1] = f
    _st32(out + 2, r.snd_nxt)
    _st32(out + 6, r.ack)
    # The smallest shift that fits the window in 16 bits loses nothing: a scaled
    # window is raw << wscale, so its low bits are zero up to that shift.
    if win > 0xFFFF:
        shift = <uint8_t>(16 - __builtin_clz(win))
    win >>= shift
    out[10] = <uint8_t>win
    out[11] = <uint8_t>(win >> 8)
    f = shift
    if r.flags & EP_WIN_RAW:
        f |= 0x10
    if c.client_dir == d ^ 1:
        f |= 0x20
    if r.flags & EP_FIN:
        f |= 0x40
    if r.flags & EP_FIN_ACKED:
        f |= 0x80
    out[12] = f
    for i in range(6):
        out[13 + i] = <uint8_t>(frontier >> (8 * i))
    _st32(out + 19, <uint32_t>us)
    return SNAP_SIZE


def snapshot_decode(data, ref_ns=None):
    """Decode a snapshot made by ``tcp_snapshot`` (``TcpConn.snapshot``).

    The timestamp is kept as microseconds mod 2^32 (``ts_us32``); given ``ref_ns``
    (the event's full time, e.g. the message header's), ``ts_ns`` is the time
    nearest to it with those low bits.
    """
    cdef bytes b = bytes(data)
    if len(b) != SNAP_SIZE:
        raise ValueError(f"a snapshot is {SNAP_SIZE} bytes, got {len(b)}")
    f, g = b[1], b[12]
    raw = int.from_bytes(b[10:12], "little")
    us32 = int.from_bytes(b[19:23], "little")
    out = {
        "dir": f & 1,
        "sender_state": STATE_NAMES[b[0] & 0x0F],
        "receiver_state": STATE_NAMES[b[0] >> 4],
        "receiver_seq_known": bool(f & 0x02),
        "receiver_ack_known": bool(f & 0x04),
        "receiver_win_known": bool(f & 0x08),
        "established": bool(f & 0x10),
        "midstream": bool(f & 0x20),
        "terminated": bool(f & 0x40),
        "closed_by_rst": bool(f & 0x80),
        "receiver_snd_nxt": int.from_bytes(b[2:6], "little"),
        "receiver_ack": int.from_bytes(b[6:10], "little"),
        "receiver_win": raw << (g & 0x0F),
        "receiver_win_scale_unknown": bool(g & 0x10),
        "receiver_is_client": bool(g & 0x20),
        "receiver_fin": bool(g & 0x40),
        "receiver_fin_acked": bool(g & 0x80),
        "frontier": int.from_bytes(b[13:19], "little"),
        "ts_us32": us32,
        "ts_ns": None,
    }
    if ref_ns is not None:
        ref_us = ref_ns // 1000
        full = ref_us - ((ref_us - us32) % (1 << 32))
        if ref_us - full >= 1 << 31:
            full += 1 << 32
        out["ts_ns"] = full * 1000
    return out


# ---------------------------------------------------------------------------
# Python face (tests and tools; not the packet path)

def bit_names(uint32_t bits):
    """The names of the TcpEventBits set in ``bits``, lowest bit first."""
    return [name for name, bit in BITS.items() if bits & bit]


cdef int _fill_from_fields(mbx_pkt *p, fields) except -1:
    cdef uint8_t opts = 0
    flags = fields.get("tcp_flags", fields.get("flags", 0))
    if isinstance(flags, str):
        flags = sum({"F": TH_FIN, "S": TH_SYN, "R": TH_RST, "P": 0x08, "A": TH_ACK,
                     "U": 0x20}[ch] for ch in flags.upper())
    p.tcp_flags = flags
    p.seq = fields.get("seq", 0) & 0xFFFFFFFF
    p.ack = fields.get("ack", 0) & 0xFFFFFFFF
    p.win = fields.get("win", 65535)
    payload = fields.get("payload")
    p.payload_len = fields.get("payload_len", len(payload) if payload is not None else 0)
    if fields.get("mss") is not None:
        opts |= TCPOPT_F_MSS
        p.mss = fields["mss"]
    if fields.get("wscale") is not None:
        opts |= TCPOPT_F_WSCALE
        p.wscale = fields["wscale"]
    if fields.get("sack_ok"):
        opts |= TCPOPT_F_SACK_OK
    if fields.get("ts") is not None:
        opts |= TCPOPT_F_TS
        p.tsval, p.tsecr = fields["ts"]
    if fields.get("opts_cut"):
        opts |= TCPOPT_F_CUT
    p.tcp_opts = opts
    p.l4_proto = 6
    return 0


cdef class TcpConn:
    """One connection's twin TCP state, driven a segment at a time.

    ``update(segment, dir)`` takes an Ethernet frame (bytes-like, parsed by the
    project's parser) or a mapping of TCP fields (``seq``, ``ack``, ``tcp_flags`` or
    ``flags`` as an int or a string such as ``"SA"``, ``win``, ``payload_len`` or
    ``payload``, ``mss``, ``wscale``, ``sack_ok``, ``ts``, ``opts_cut``; ``mbx._parse.parse``
    output works) and returns the names of the bits the two steps returned.
    """
    cdef tcp_conn c

    def __cinit__(self):
        tcp_init(&self.c)

    def reset(self):
        tcp_init(&self.c)

    def update(self, segment, int dir, int64_t ts_ns=0, bint restart=True):
        """Run both steps on one segment; ``(sender bit names, receiver bit names)``.

        On NEW_CONNECTION, with ``restart`` (the default) the connection starts over
        from this segment as the Monitor does, and the sender names list
        NEW_CONNECTION followed by the new connection's bits.
        """
        cdef uint32_t sb, rb, again
        cdef mbx_pkt pkt
        cdef uint8_t *buf = NULL
        cdef const uint8_t[::1] view
        memset(&pkt, 0, sizeof(mbx_pkt))
        try:
            if isinstance(segment, dict) or hasattr(segment, "keys"):
                _fill_from_fields(&pkt, segment)
            else:
                view = segment
                buf = <uint8_t *>malloc(view.shape[0] if view.shape[0] else 1)
                if buf == NULL:
                    raise MemoryError()
                if view.shape[0]:
                    memcpy(buf, &view[0], view.shape[0])
                pkt.data = buf
                pkt.caplen = pkt.wirelen = view.shape[0]
                parse_packet(&pkt)
                if pkt.l4_proto != 6 or pkt.l4_off == 0:
                    raise ValueError("not a TCP segment")
            pkt.dir = dir & 1
            pkt.ts_ns = ts_ns
            sb = tcp_sender_update(&self.c, &pkt)
            rb = tcp_receiver_update(&self.c, &pkt)
            if (sb & TCPEV_NEW_CONNECTION) and restart:
                tcp_init(&self.c)
                again = tcp_sender_update(&self.c, &pkt)
                rb = tcp_receiver_update(&self.c, &pkt)
                return ["NEW_CONNECTION"] + bit_names(again), bit_names(rb)
            return bit_names(sb), bit_names(rb)
        finally:
            free(buf)

    def state(self, int dir):
        """The TcpState name of side ``dir``."""
        return STATE_NAMES[self.c.ep[dir & 1].state]

    @property
    def client_dir(self):
        return tcp_client_dir(&self.c)

    @property
    def client_how(self):
        return ("unknown", "first", "synack", "syn")[self.c.client_how]

    @property
    def handshake(self):
        """Whether the whole handshake was seen (ESTABLISHED was raised)."""
        return bool(self.c.flags & CONN_ESTABLISHED)

    @property
    def midstream(self):
        return bool(self.c.flags & CONN_MIDSTREAM)

    @property
    def closed(self):
        """Whether the connection ended (TERMINATE was raised)."""
        return bool(self.c.flags & CONN_TERMINATED)

    @property
    def closed_by(self):
        if self.c.flags & CONN_CLOSED_RST:
            return "rst"
        if self.c.flags & CONN_CLOSED_FIN:
            return "fin"
        return None

    @property
    def options(self):
        """What both SYNs agreed on (None before both were seen)."""
        if not (self.c.flags & CONN_OPTS_KNOWN):
            return None
        return {"wscale": bool(self.c.flags & CONN_WSCALE),
                "sack": bool(self.c.flags & CONN_SACK),
                "ts": bool(self.c.flags & CONN_TS)}

    def endpoint(self, int dir):
        """Side ``dir``'s state as a dict (fields whose flag is unset are None)."""
        cdef tcp_endpoint *e = &self.c.ep[dir & 1]
        return {
            "state": STATE_NAMES[e.state],
            "isn": e.isn if e.flags & (EP_SYN | EP_SYNACK) else None,
            "snd_nxt": e.snd_nxt if e.flags & EP_SEQ_KNOWN else None,
            "ack": e.ack if e.flags & EP_ACK_KNOWN else None,
            "win": e.win if e.flags & EP_WIN_KNOWN else None,
            "win_scale_unknown": bool(e.flags & EP_WIN_RAW),
            "wscale": e.wscale if e.opts & TCPOPT_F_WSCALE else None,
            "mss": e.mss if e.opts & TCPOPT_F_MSS else None,
            "sack_ok": bool(e.opts & TCPOPT_F_SACK_OK),
            "ts": bool(e.opts & TCPOPT_F_TS),
            "opts_cut": bool(e.opts & TCPOPT_F_CUT),
            "fin_seq": e.fin_seq if e.flags & EP_FIN else None,
            "fin_acked": bool(e.flags & EP_FIN_ACKED),
            "syn": bool(e.flags & EP_SYN),
            "synack": bool(e.flags & EP_SYNACK),
        }

    def snapshot(self, int dir, uint64_t frontier=0, int64_t ts_ns=0):
        """The snapshot an event about a segment in direction ``dir`` carries."""
        cdef uint8_t out[SNAP_SIZE]
        cdef int n = tcp_snapshot(&self.c, dir, frontier, ts_ns, out)
        return (<char *>out)[:n]

    def raw(self):
        """The tcp_conn bytes (for debugging and layout checks)."""
        return (<char *>&self.c)[:sizeof(tcp_conn)]


def bench_updates(segments, uint32_t repeat=100):
    """Mean ns of tcp_sender_update + tcp_receiver_update per segment.

    ``segments`` is a list of (frame, dir); they are parsed once, then replayed
    ``repeat`` times (a fresh tcp_conn each time) without the GIL.
    """
    cdef Py_ssize_t n = len(segments), i, off = 0
    cdef mbx_pkt *pkts
    cdef uint8_t *buf
    cdef tcp_conn c
    cdef uint32_t _rep, acc = 0
    cdef const uint8_t[::1] view
    total = sum(len(f) for f, _ in segments)
    if n == 0 or repeat == 0:
        return 0.0
    pkts = <mbx_pkt *>malloc(n * sizeof(mbx_pkt))
    buf = <uint8_t *>malloc(total if total else 1)
    if pkts == NULL or buf == NULL:
        free(pkts)
        free(buf)
        raise MemoryError()
    try:
        for i in range(n):
            frame, d = segments[i]
            view = frame
            memset(&pkts[i], 0, sizeof(mbx_pkt))
            pkts[i].data = buf + off
            pkts[i].caplen = pkts[i].wirelen = view.shape[0]
            memcpy(buf + off, &view[0], view.shape[0])
            off += view.shape[0]
            parse_packet(&pkts[i])
            pkts[i].dir = d
        t0 = time.perf_counter_ns()
        with nogil:
            for _rep in range(repeat):
                tcp_init(&c)
                for i in range(n):
                    acc += tcp_sender_update(&c, &pkts[i])
                    acc += tcp_receiver_update(&c, &pkts[i])
        t1 = time.perf_counter_ns()
        if acc == 0xFFFFFFFF:       # keeps the loop from being optimised away
            print(acc)
        return (t1 - t0) / (<double>n * repeat)
    finally:
        free(pkts)
        free(buf)


def bench_snapshot(TcpConn conn not None, uint32_t count=1000000):
    """Mean ns of one tcp_snapshot of ``conn`` (nogil loop)."""
    cdef uint8_t out[SNAP_SIZE]
    cdef uint32_t i, acc = 0
    if count == 0:
        return 0.0
    t0 = time.perf_counter_ns()
    with nogil:
        for i in range(count):
            tcp_snapshot(&conn.c, <uint8_t>(i & 1), i, <int64_t>i * 1000, out)
            acc += out[1 + (i & 15)]
    t1 = time.perf_counter_ns()
    if acc == 0xFFFFFFFF:
        print(acc)
    return (t1 - t0) / <double>count
