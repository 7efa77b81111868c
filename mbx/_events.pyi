from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from mbx.errors import MbxError

class NFError(MbxError): ...

class EventType:
    path: str
    name: str
    id: int
    idx: int
    depth: int
    parent: EventType | None
    fields: dict[str, tuple[int, str]]
    body_size: int
    dtype: np.dtype
    def is_a(self, other: EventType | str | int) -> bool: ...
    def overlaps(self, other: EventType | str | int) -> bool: ...

TypeSpec = EventType | str | int
Handler = Callable[[Event], object]

EVENT: EventType
PKT: EventType
FLOW: EventType
FLOW_START: EventType
FLOW_END: EventType
PKT_TCP: EventType
PKT_TCP_SYN: EventType
PKT_TCP_FIN: EventType
PKT_TCP_RST: EventType
PKT_TCP_RETRANSMISSION: EventType
FLOW_TCP: EventType
FLOW_TCP_START: EventType
FLOW_TCP_ESTABLISHED: EventType
FLOW_TCP_STATE: EventType
FLOW_TCP_TERMINATE: EventType
FLOW_TCP_GAP: EventType
FLOW_TCP_OVERLAP_CONFLICT: EventType
FLOW_TCP_MEMCAP: EventType
DATA_RDY: EventType
FLOW_STATS: EventType
SIDES: dict[str, int]
FILTER_KEYS: tuple[str, ...]
END_REASONS: dict[int, str]
TERMINATE_REASONS: dict[int, str]
PROTO_NAMES: dict[int, str]

def event_type(spec: TypeSpec) -> EventType: ...
def event_types() -> list[EventType]: ...
def register_event_type(name: str, parent: TypeSpec | None = None,
                        fields: Sequence[tuple[str, str]] | dict[str, str] = ()) -> EventType: ...
def message_size() -> tuple[int, int]: ...

MergeFunction = Callable[[frozenset[str]], object]
MERGES: tuple[str, ...]
def group_dependency(nfs: Sequence[NF]) -> str | None: ...
def merge_name(merge: str | MergeFunction) -> str: ...
def held_in(exc: KeyboardInterrupt, nf_name: str, handler: object,
            what: str) -> KeyboardInterrupt: ...
def merge_problem(merge: object, members: Sequence[str]) -> str | None: ...
def merge_call(fn: Callable[..., object], members: Sequence[str]) -> MergeFunction: ...

class CHandler:
    """A C handler (made in Cython with mbx.cnf.chandler); NF.sub takes it."""
    owner: object
    name: str
    def __call__(self, ev: Event) -> None: ...

class PubPort:
    nf: NF
    type: EventType
    writes: bool

class Filter:
    spec: dict[str, object]

class NF:
    name: str
    writes: bool
    group: str | None
    group_merge: str | MergeFunction
    subs: dict[int, tuple[Handler, bool, int]]     # handler, batch, side mask
    pubs: dict[int, PubPort]
    filters: dict[int | None, Filter]
    failure: str | None
    restart: int
    restart_backoff: float
    def __init__(self, name: str, *, writes: bool = False,
                 group: str | None = None) -> None: ...
    def sub(self, etype: TypeSpec, handler: Callable[..., object], *,
            batch: bool = False, side: str = "sender") -> EventType: ...
    def filter(self, etype: TypeSpec | None = None, **spec: object) -> None: ...
    def pub(self, etype: TypeSpec, *, writes: bool = False) -> PubPort: ...
    def up_sub(self, etype: TypeSpec, flow: int, handler: Callable[..., object] | None, *,
               batch: bool = False, side: str = "sender") -> None: ...
    def new_msg(self, etype: TypeSpec) -> Message: ...
    def publish(self, port: PubPort, msg: Message) -> None: ...
    def start(self) -> None: ...
    def stop(self) -> None: ...
    def report(self) -> dict[str, object] | None: ...

class Message:
    etype: EventType
    flow: int | None
    def __init__(self, etype: EventType) -> None: ...
    def fill_from(self, ev: Event) -> None: ...
    def __setattr__(self, name: str, value: Any) -> None: ...
    def __getattr__(self, name: str) -> Any: ...

class Event:
    type: EventType
    type_name: str
    ts: int
    time: float
    flow: int | None
    dir: int
    publisher: int
    has_packet: bool
    ip_ver: int
    proto: int
    src_ip: str | None
    dst_ip: str | None
    sport: int
    dport: int
    tcp_flags: int
    tcp_flags_str: str
    seq: int
    ack: int
    win: int
    caplen: int
    wirelen: int
    payload_len: int
    packet: memoryview
    payload: memoryview
    dropped: bool
    burst_pos: int
    snapshot: dict[str, Any] | None
    def drop(self) -> None: ...
    def read(self, offset: int | None = None, length: int | None = None,
             stream_dir: int | None = None) -> memoryview | bytes: ...
    def write(self, offset: int, data: bytes, stream_dir: int | None = None) -> int: ...
    def set_src(self, ip: str | None = None, port: int | None = None) -> None: ...
    def set_dst(self, ip: str | None = None, port: int | None = None) -> None: ...
    def fields(self) -> dict[str, Any]: ...
    def __getattr__(self, name: str) -> Any: ...

class EventBus:
    msg_capacity: int
    global_want: int
    published: int
    delivered: int
    nfs: list[NF]
    def __init__(self, nfs: Iterable[NF], flow_capacity: int = 0,
                 msg_capacity: int = 65536) -> None: ...
    def close(self) -> None: ...
    def attach_flowtable(self, flowtable: object, capacity: int) -> None: ...
    def dispatch(self) -> None: ...
    timing: bool
    def counters(self) -> dict[str, dict[str, int]]: ...
    def handler_sets(self) -> dict[str, int]: ...
    def nf_stats(self) -> dict[str, dict[str, Any]]: ...
    @property
    def pending(self) -> int: ...
    @property
    def msg_used_now(self) -> int: ...
