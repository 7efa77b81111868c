"""Twin TCP state: both endpoints of one connection as a middlebox sees them
(Python face of the TCP Monitor's per-flow state; the hot path is C, see _tcp.pxd)."""

from collections.abc import Mapping, Sequence
from typing import Any, Literal, TypedDict

from typing_extensions import Buffer

StateName = Literal[
    "CLOSED", "LISTEN", "SYN_SENT", "SYN_RCVD", "ESTABLISHED", "FIN_WAIT_1",
    "FIN_WAIT_2", "CLOSE_WAIT", "CLOSING", "LAST_ACK", "TIME_WAIT",
]

STATE_NAMES: tuple[StateName, ...]
BITS: dict[str, int]            # TcpEventBits by name (SYN, SYNACK, ... RST_DATA)
CONN_SIZE: int                  # sizeof(tcp_conn): 64
ENDPOINT_SIZE: int              # sizeof(tcp_endpoint): 28
SNAPSHOT_SIZE: int              # 23

class Endpoint(TypedDict):
    state: StateName
    isn: int | None
    snd_nxt: int | None         # highest seq + SYN + len + FIN it sent
    ack: int | None             # highest ACK it sent
    win: int | None             # its newest ACK's window, bytes (scaled once both SYNs agreed)
    win_scale_unknown: bool     # midstream: win is the raw field
    wscale: int | None
    mss: int | None
    sack_ok: bool
    ts: bool
    fin_seq: int | None
    fin_acked: bool
    syn: bool                   # sent a pure SYN
    synack: bool                # sent a SYN+ACK

class Snapshot(TypedDict):
    dir: int
    sender_state: StateName
    receiver_state: StateName
    receiver_seq_known: bool
    receiver_ack_known: bool
    receiver_win_known: bool
    established: bool
    midstream: bool
    terminated: bool
    closed_by_rst: bool
    receiver_snd_nxt: int
    receiver_ack: int
    receiver_win: int
    receiver_win_scale_unknown: bool
    receiver_is_client: bool
    receiver_fin: bool
    receiver_fin_acked: bool
    frontier: int               # mod 2^48
    ts_us32: int                # microseconds mod 2^32
    ts_ns: int | None           # unwrapped against ref_ns, when given

def snapshot_decode(data: Buffer, ref_ns: int | None = None) -> Snapshot: ...
def bit_names(bits: int) -> list[str]: ...

class TcpConn:
    def __init__(self) -> None: ...
    def reset(self) -> None: ...
    def update(
        self,
        segment: Buffer | Mapping[str, Any],
        dir: int,
        ts_ns: int = 0,
        restart: bool = True,
    ) -> tuple[list[str], list[str]]:
        """Both steps on one segment (a frame, or TCP fields by name); the names of
        the sender step's and the receiver step's bits."""
    def state(self, dir: int) -> StateName: ...
    @property
    def client_dir(self) -> int: ...
    @property
    def client_how(self) -> Literal["unknown", "first", "synack", "syn"]: ...
    @property
    def handshake(self) -> bool: ...
    @property
    def midstream(self) -> bool: ...
    @property
    def closed(self) -> bool: ...
    @property
    def closed_by(self) -> Literal["fin", "rst"] | None: ...
    @property
    def options(self) -> dict[str, bool] | None: ...
    def endpoint(self, dir: int) -> Endpoint: ...
    def snapshot(self, dir: int, frontier: int = 0, ts_ns: int = 0) -> bytes: ...
    def raw(self) -> bytes: ...

def bench_updates(segments: Sequence[tuple[Buffer, int]], repeat: int = 100) -> float:
    """Mean ns of tcp_sender_update + tcp_receiver_update per segment (nogil)."""

def bench_snapshot(conn: TcpConn, count: int = 1000000) -> float:
    """Mean ns of one tcp_snapshot (nogil)."""
