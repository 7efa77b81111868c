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

TypeSpec = EventType | str | int
Handler = Callable[[Event], object]

EVENT: EventType
PKT: EventType
FLOW: EventType
FLOW_START: EventType
FLOW_END: EventType
END_REASONS: dict[int, str]
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
def merge_problem(merge: object, members: Sequence[str]) -> str | None: ...

class CHandler:
    """A C handler (made in Cython with mbx.cnf.chandler); NF.sub takes it."""
    owner: object
    name: str
    def __call__(self, ev: Event) -> None: ...

class PubPort:
    nf: NF
    type: EventType
    writes: bool

class NF:
    name: str
    writes: bool
    group: str | None
    group_merge: str | MergeFunction
    subs: dict[int, tuple[Handler, bool]]
    pubs: dict[int, PubPort]
    def __init__(self, name: str, *, writes: bool = False,
                 group: str | None = None) -> None: ...
    def sub(self, etype: TypeSpec, handler: Callable[..., object], *,
            batch: bool = False) -> EventType: ...
    def pub(self, etype: TypeSpec, *, writes: bool = False) -> PubPort: ...
    def up_sub(self, etype: TypeSpec, flow: int, handler: Callable[..., object] | None, *,
               batch: bool = False) -> None: ...
    def new_msg(self, etype: TypeSpec) -> Message: ...
    def publish(self, port: PubPort, msg: Message) -> None: ...
    def stop(self) -> None: ...

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
    def drop(self) -> None: ...
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
    def nf_stats(self) -> dict[str, dict[str, Any]]: ...
    @property
    def pending(self) -> int: ...
    @property
    def msg_used_now(self) -> int: ...
