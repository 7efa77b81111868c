"""The flow table (Stack Memory): canonical 5-tuple keys, a symmetric hash, fixed
capacity, per-flow stats, idle expiry and a policy for when it is full."""

from collections.abc import Sequence
from typing import Literal, TypedDict

_Packet = tuple[str, str, int, int, int, int] | tuple[str, str, int, int, int, int, int]

CAPACITY_MAX: int                   # the largest flow table
FLOW_POLICIES: tuple[str, ...]      # policy= (when the table is full): evict, refuse

class FlowRecord(TypedDict):
    slot: int
    gen: int
    hash: int
    src: str            # initiator address
    dst: str            # responder address
    sport: int
    dport: int
    proto: int
    ip_ver: int
    vlan: list[int]             # the VLAN ids in its key, outer first; [] untagged
    pkts: tuple[int, int]       # (initiator -> responder, responder -> initiator)
    bytes: tuple[int, int]      # wire bytes, same directions
    first_ns: int
    last_ns: int
    status: Literal["free", "active", "expired"]
    end_reason: Literal["none", "idle", "evicted", "shutdown", "closed"]

class FlowTable:
    @property
    def capacity(self) -> int: ...
    @property
    def active(self) -> int: ...
    @property
    def idle_timeout_ns(self) -> int: ...
    @property
    def idle_timeout(self) -> float: ...
    @property
    def policy(self) -> int: ...
    @property
    def policy_name(self) -> Literal["evict", "refuse"]: ...
    @property
    def vlan_keyed(self) -> bool: ...
    @property
    def n_ended(self) -> int: ...
    @property
    def ended_capacity(self) -> int: ...
    @property
    def created_last(self) -> bool: ...
    @property
    def last_before(self) -> int: ...
    @property
    def lookups(self) -> int: ...
    @property
    def created(self) -> int: ...
    @property
    def expired(self) -> int: ...
    @property
    def evicted(self) -> int: ...
    @property
    def refused(self) -> int: ...
    @property
    def n_buckets(self) -> int: ...
    @property
    def bytes_per_flow(self) -> float: ...
    @property
    def memory_bytes(self) -> int: ...
    @property
    def counters(self) -> dict[str, int]: ...
    def __init__(
        self,
        capacity: int = 65536,
        idle_timeout: float = 60.0,
        policy: Literal["evict", "refuse"] = "evict",
        ended_capacity: int = 320,
        vlan_in_flow_key: bool = True,
    ) -> None: ...
    def lookup_tuple(
        self,
        src: str,
        dst: str,
        sport: int,
        dport: int,
        proto: int,
        ts_ns: int,
        wirelen: int = 60,
        status: int = 0,
        tcp_flags: int = 0,
        vlan: Sequence[int] = (),
    ) -> tuple[int, int, int, bool]: ...
    def lookup_burst_py(
        self, packets: Sequence[_Packet]
    ) -> list[tuple[int, int, int, bool]]: ...
    def expire_py(self, now_ns: int) -> int: ...
    def end_all_py(self) -> int: ...
    def end_flow_py(self, slot: int, reason: int = 4) -> bool: ...  # 4: END_CLOSED
    def take_ended(self) -> list[FlowRecord]: ...
    def flow(self, slot: int) -> FlowRecord | None: ...
    def chain_lengths(self) -> list[int]: ...
    def __len__(self) -> int: ...

def flow_hash(src: str, dst: str, sport: int, dport: int, proto: int) -> int: ...
def bench_lookups(
    n_flows: int = 100_000, n_packets: int = 1_000_000, seed: int = 1, burst: int = 0
) -> float: ...
