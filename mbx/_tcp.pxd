# Twin TCP state: both endpoints of one connection as a middlebox on the path sees
# them (paper §5, TCP Monitor; mOS keeps the same "client-side + server-side" pair).
# This file is the contract with the TCP Monitor μStack: it calls, per TCP segment
# and without the GIL, tcp_sender_update() and then tcp_receiver_update(), raises
# the sender side's events from the first result and the receiver side's from the
# second, and stores tcp_snapshot() in the message header of each event.
from libc.stdint cimport int32_t, int64_t, uint8_t, uint16_t, uint32_t, uint64_t

from mbx._packet cimport mbx_pkt

# ---------------------------------------------------------------------------
# Sequence space arithmetic, modulo 2^32 (RFC 793 §3.3, RFC 1982): a is before b
# when b - a, as a signed 32-bit distance, is positive.  Valid for points less than
# 2^31 apart, which any window is.  Inline so the stream code (reassembly, frontier)
# compares sequence numbers exactly as the state machine does.

cdef inline bint seq_lt(uint32_t a, uint32_t b) noexcept nogil:
    return <int32_t>(a - b) < 0

cdef inline bint seq_leq(uint32_t a, uint32_t b) noexcept nogil:
    return <int32_t>(a - b) <= 0

cdef inline bint seq_gt(uint32_t a, uint32_t b) noexcept nogil:
    return <int32_t>(a - b) > 0

cdef inline bint seq_geq(uint32_t a, uint32_t b) noexcept nogil:
    return <int32_t>(a - b) >= 0

# lo <= a < hi, for a window [lo, hi) shorter than 2^31.
cdef inline bint seq_in(uint32_t a, uint32_t lo, uint32_t hi) noexcept nogil:
    return a - lo < hi - lo

cdef inline uint32_t seq_max(uint32_t a, uint32_t b) noexcept nogil:
    return b if seq_lt(a, b) else a

cdef inline uint32_t seq_min(uint32_t a, uint32_t b) noexcept nogil:
    return a if seq_lt(a, b) else b

# ---------------------------------------------------------------------------
# One endpoint's state (RFC 793 §3.2).  A state is what that endpoint is in once
# the segment being processed has reached it: the monitor sits on the path and
# assumes what it forwards arrives.

cdef enum TcpState:
    TCPS_CLOSED = 0         # nothing heard yet, or closed (RST, LAST_ACK acked)
    # Declared for completeness: a passive opener is only seen once it receives a
    # SYN, and is then SYN_RCVD.
    TCPS_LISTEN = 1
    TCPS_SYN_SENT = 2
    TCPS_SYN_RCVD = 3
    TCPS_ESTABLISHED = 4
    TCPS_FIN_WAIT_1 = 5
    TCPS_FIN_WAIT_2 = 6
    TCPS_CLOSE_WAIT = 7
    TCPS_CLOSING = 8
    TCPS_LAST_ACK = 9
    TCPS_TIME_WAIT = 10
    TCPS_N = 11

# tcp_endpoint.flags
cdef enum TcpEndpointFlags:
    EP_SEQ_KNOWN = 0x01     # snd_nxt (and isn, when EP_SYN/EP_SYNACK) are known
    EP_ACK_KNOWN = 0x02     # ack holds an ACK this side sent
    EP_SYN = 0x04           # it sent a pure SYN (active open)
    EP_SYNACK = 0x08        # it sent a SYN+ACK
    EP_FIN = 0x10           # it sent a FIN; fin_seq is its sequence number
    EP_FIN_ACKED = 0x20     # the other side acknowledged that FIN
    EP_WIN_KNOWN = 0x40     # win holds a window it advertised
    EP_WIN_RAW = 0x80       # win is as advertised, its scale unknown (midstream)
    EP_WIN_SYN = 0x100      # win is its SYN's: never scaled (RFC 7323 §2.2), other units
    # its FIN came beyond a hole (not in sequence): the other side takes it only once
    # the hole fills, which the monitor learns from that side's ACK of the FIN
    EP_FIN_PENDING = 0x200

ctypedef struct tcp_endpoint:           # 28 bytes
    uint32_t isn            # initial sequence number (its SYN's seq)
    uint32_t snd_nxt        # next seq it will send: highest seq + SYN + len + FIN seen
    uint32_t ack            # highest ACK it sent: the monitor's view of its RCV.NXT
    uint32_t win            # window of its newest ACK, in bytes (scaled once agreed)
    uint32_t fin_seq        # sequence number of its FIN (EP_FIN)
    uint16_t mss            # from its SYN (0: none)
    uint8_t state           # TcpState
    uint8_t wscale          # shift it offered in its SYN (0..14)
    uint16_t flags          # TcpEndpointFlags
    uint8_t opts            # TCPOPT_F_* options its SYN carried (MSS, WSCALE, SACK_OK, TS)
    uint8_t pad

# tcp_conn.flags
cdef enum TcpConnFlags:
    CONN_SEEN = 0x0001          # at least one segment processed
    CONN_HS_SYN = 0x0002        # the handshake's pure SYN (from the client) was seen
    CONN_HS_SYNACK = 0x0004     # the server's SYN+ACK was seen
    CONN_HS_ACK = 0x0008        # the client ACKed the SYN+ACK (ack > server ISN)
    CONN_ESTABLISHED = 0x0010   # all three seen (any order); ESTABLISHED was raised
    CONN_MIDSTREAM = 0x0020     # picked up after the handshake: states guessed
    CONN_CLOSED_FIN = 0x0040    # ended by FINs (both acked, or a side in TIME_WAIT)
    CONN_CLOSED_RST = 0x0080    # ended by a valid RST
    CONN_TERMINATED = 0x0100    # TERMINATE was raised (exactly once per connection)
    CONN_OPTS_KNOWN = 0x0200    # both sides' SYNs seen: the options below are decided
    CONN_WSCALE = 0x0400        # window scaling agreed (both SYNs offered it)
    CONN_SACK = 0x0800          # SACK permitted by both
    CONN_TS = 0x1000            # timestamps offered by both

# tcp_conn.client_how: how client_dir was decided (a stronger reason replaces a
# weaker one, once).
cdef enum TcpClientHow:
    CLIENT_UNKNOWN = 0
    CLIENT_BY_FIRST = 1     # the sender of the first segment seen
    CLIENT_BY_SYNACK = 2    # the receiver of the first SYN+ACK
    CLIENT_BY_SYN = 3       # the sender of the first pure SYN

# tcp_conn.pkt: what tcp_sender_update found out about the segment for
# tcp_receiver_update (the pair runs on the same segment, in that order).
cdef enum TcpPktFlags:
    PK_SENDER_DONE = 0x01   # tcp_sender_update ran on this segment
    PK_RESTART = 0x02       # NEW_CONNECTION: the receiver step does nothing
    PK_OOW = 0x04           # out of the receiver's window: no state changes
    PK_RST_VALID = 0x08
    PK_RST_INVALID = 0x10
    PK_NEW_FIN = 0x20       # a FIN not sent before
    PK_ACK_OK = 0x40        # the ACK field may be processed
    PK_MIDSTREAM = 0x80     # the first segment, not a SYN: pick the state up

# The Stack Memory of one TCP flow: 64 bytes (checked at import).
ctypedef struct tcp_conn:
    tcp_endpoint ep[2]      # indexed by packet dir (0: the flow's first-packet sender)
    uint16_t flags          # TcpConnFlags
    uint8_t client_dir      # dir of the TCP client (0 until client_how says otherwise)
    uint8_t client_how      # TcpClientHow
    uint8_t pkt             # TcpPktFlags of the segment in progress
    uint8_t pad[3]

# ---------------------------------------------------------------------------
# What one update step saw.  tcp_sender_update() reports about the side that sent
# the segment, tcp_receiver_update() about the side it goes to.  "both" bits can
# come from either step; the others from the step named.
cdef enum TcpEventBits:
    TCPEV_SYN = 0x0001              # both: a pure SYN
    TCPEV_SYNACK = 0x0002           # both: a SYN+ACK
    TCPEV_FIN = 0x0004              # both: a FIN
    TCPEV_RST = 0x0008              # both: a RST (valid or not; see RST_INVALID)
    # sender: data, SYN or FIN already sent (seq + SYN + len + FIN <= its snd_nxt,
    # a SYN or SYN+ACK again with the same ISN); a reordered earlier segment counts
    # too: the monitor cannot tell it from a retransmission
    TCPEV_RETRANSMISSION = 0x0010
    TCPEV_STATE_CHANGE = 0x0020     # both: the state of the side that step updates
    # receiver: the handshake is now complete (the client's pure SYN, the server's
    # SYN+ACK and the client's ACK of it, seen in any order); once
    TCPEV_ESTABLISHED = 0x0040
    # sender (a valid RST) or receiver (both FINs acked, or a side in TIME_WAIT):
    # the connection is over; once per connection
    TCPEV_TERMINATE = 0x0080
    TCPEV_NEW_DATA = 0x0100         # sender: payload beyond what it had sent
    TCPEV_ACK_ADVANCE = 0x0200      # sender: its ACK moved forward (or was first seen)
    # sender: the connection's first segment, not a SYN: both sides are picked up
    # as ESTABLISHED from its seq/ack (ESTABLISHED is not raised)
    TCPEV_MIDSTREAM = 0x0400
    # both: the RST is outside the receiver's window (rule at _rst_ok in _tcp.pyx:
    # seq in [rcv_nxt, rcv_nxt + window), or in SYN_SENT an ACK of the SYN);
    # it changes nothing
    TCPEV_RST_INVALID = 0x0800
    # both: the segment starts past the receiver's right edge (its last ack +
    # window), or is a SYN+ACK with another ISN: it changes nothing
    TCPEV_OUT_OF_WINDOW = 0x1000
    # sender: a pure SYN that cannot belong to this connection (a different ISN
    # from its sender's first SYN, or any SYN after a close or a midstream
    # pickup): nothing was changed; the caller ends the connection, calls
    # tcp_init() and runs both steps again on the same segment
    TCPEV_NEW_CONNECTION = 0x2000
    # sender: payload in a SYN or SYN+ACK (TCP Fast Open); stream data only once
    # the receiver took it (the TCP Monitor holds it until then; NEW_DATA is set
    # as well when it is new)
    TCPEV_SYN_DATA = 0x4000
    # sender: payload in a RST (RFC 1122 diagnostic text; never stream data)
    TCPEV_RST_DATA = 0x8000
    TCPEV_N_BITS = 16

# Resets c to "nothing seen".
cdef void tcp_init(tcp_conn *c) noexcept nogil
# The dir of the TCP client (see client_how for how sure that is).
cdef uint8_t tcp_client_dir(const tcp_conn *c) noexcept nogil
# The two steps, for a TCP segment p (p.dir is its direction), in this order.
cdef uint32_t tcp_sender_update(tcp_conn *c, const mbx_pkt *p) noexcept nogil
cdef uint32_t tcp_receiver_update(tcp_conn *c, const mbx_pkt *p) noexcept nogil
# Whether p's data starts on or beyond the right edge its receiver last showed
# (ACK + window), by less than one window: a segment the window check refuses
# (OUT_OF_WINDOW) that its sender could have sent after a newer ACK of the receiver
# the capture has later (records out of order), rather than one into a window that
# never opened (a zero window's probe, an injection far ahead).
cdef bint tcp_past_edge(const tcp_conn *c, const mbx_pkt *p) noexcept nogil

# ---------------------------------------------------------------------------
# Snapshot (paper §4.2, §6): what an event's reader needs that a later segment
# would change and the packet itself does not say: the state of the side the
# segment goes to.  Little-endian, SNAP_SIZE = 23 bytes (the message has 24):
#
#   off size  field
#    0   1    states: low nibble the sender's (side dir) TcpState, high the receiver's
#    1   1    bit 0 dir, 1 receiver seq known, 2 receiver ack known, 3 receiver window
#             known, 4 connection established (handshake seen), 5 midstream pickup,
#             6 terminated, 7 terminated by RST
#    2   4    receiver's snd_nxt (next sequence number it will send)
#    6   4    receiver's ack (highest ACK it sent = what it has received in order)
#   10   2    receiver's last window, as raw << shift = bytes (exact: raw is the
#             field it sent when the window fits 16 bits or was scaled by shift)
#   12   1    low nibble: that shift; bit 4 the window's scale is unknown (midstream:
#             up to 14 more), bit 5 receiver is the client, bit 6 receiver sent a
#             FIN, bit 7 and it was acked
#   13   6    frontier: the stream offset of direction dir (mod 2^48: 256 TiB, more
#             than six hours of one flow at 100 Gbit/s before it wraps)
#   19   4    timestamp in microseconds mod 2^32 (wraps every 71.6 minutes; the
#             message header has the full time to unwrap it against)
cdef enum:
    SNAP_SIZE = 23

cdef int tcp_snapshot(const tcp_conn *c, uint8_t dir, uint64_t frontier, int64_t ts_ns,
                      uint8_t *out) noexcept nogil
