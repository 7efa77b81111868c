from collections.abc import Callable
from typing import Any

from mbx._events import EventBus
from mbx._packet import Batch, Port

MALFORMED_ACTIONS: tuple[str, ...]  # malformed=: forward, drop

class NetworkLayer:
    flows: Any
    frags: Any
    bus: EventBus
    pkts: int
    bytes: int
    malformed_dropped: int
    frag_dropped: int
    frag_held: int
    nf_dropped: int
    sent: int
    error_dropped: int
    bursts: int
    rss_other: int
    stopped: bool       # the last run() ended on its stop flag or duration, its input not done
    timed_out: bool     # ... on its duration
    def __init__(self, bus: EventBus, *, flow_capacity: int = 65536,
                 idle_timeout: float = 60.0, flow_policy: str = "evict",
                 malformed: str = "forward", frag_memory: int = ...,
                 frag_timeout: float = 30.0, vlan_in_flow_key: bool = True,
                 rss: tuple[int, int] = (0, 1)) -> None: ...
    def process(self, batch: Batch) -> None: ...
    def expire(self, now_ns: int) -> None: ...
    def shutdown(self) -> None: ...
    def run(self, inp: Port, out: Port | None = None, *, burst: int = 64,
            max_packets: int = 0, progress: Callable[[NetworkLayer], object] | None = None,
            progress_every: float = 0.5, duration: float = 0, stop: Any = None,
            batch: Batch | None = None) -> None: ...
    def counters(self) -> dict[str, Any]: ...

def rss_owners(frame: bytes, n: int,
               wirelen: int | None = None) -> tuple[int, int, int | None, int | None]:
    """Software RSS on one frame over ``n`` stacks: (the short header walk's answer,
    -1 where it defers to the parser; the answer after the full parse; the hash the
    walk hands the flow table, or None; the table's hash of the parsed key, or
    None)."""
