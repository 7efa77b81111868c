"""The one packet parser of mbx, and IP fragment reassembly (Python face)."""
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Literal

from typing_extensions import Buffer

DefragVerdict = Literal["none", "held", "done", "drop"]

MAX_FRAGMENTS: int
MAX_VLAN_TAGS: int

def status_names() -> list[str]:
    """The ParseStatus names in enum order (lower case, no ``PARSE_`` prefix)."""

def parse(frame: Buffer, wirelen: int | None = None) -> dict[str, Any]:
    """Parse one Ethernet frame (a copy) and return the descriptor fields by name.

    Keys: status (name), status_code, ethertype, nvlan, vlan, ip_ver, l3_off, l4_proto,
    ttl, ip_len, src, dst (str or None), frag_off, frag_more, frag_id, l4_off,
    payload_off, payload_len, payload (bytes), sport, dport, tcp_flags, seq, ack, win,
    tcp_opts, mss, wscale (None when absent), sack_ok, sack (list of (left, right)),
    ts ((tsval, tsecr) or None), tsval, tsecr, opts_cut (the snaplen cut the TCP
    options: those above unknown), icmp_type, icmp_code, flags,
    flag_names.
    """

def parse_many(frames: Sequence[Buffer], repeat: int = 1) -> float:
    """Parse every frame ``repeat`` times without the GIL; mean ns per packet."""

class FragTable:
    """IPv4/IPv6 fragment reassembly: bounded bytes and datagrams, idle timeout."""

    @property
    def held(self) -> int: ...
    @property
    def held_completed(self) -> int: ...
    @property
    def held_discarded(self) -> int: ...
    @property
    def held_pending(self) -> int: ...
    @property
    def completed(self) -> int: ...
    @property
    def timed_out(self) -> int: ...
    @property
    def pending_at_end(self) -> int: ...
    @property
    def memcap_drops(self) -> int: ...
    @property
    def bad(self) -> int: ...
    @property
    def no_room(self) -> int: ...
    @property
    def too_many(self) -> int: ...
    @property
    def max_bytes(self) -> int: ...
    @property
    def max_datagrams(self) -> int: ...
    @property
    def timeout_ns(self) -> int: ...
    @property
    def bytes_used(self) -> int: ...
    @property
    def pending(self) -> int: ...
    @property
    def counters(self) -> dict[str, int]: ...
    def __init__(
        self, max_bytes: int = 4 << 20, max_datagrams: int = 1024, timeout: float = 30.0
    ) -> None: ...
    def push(
        self, frame: Buffer, ts_ns: int = 0, mtu: int = 0, wirelen: int | None = None
    ) -> tuple[DefragVerdict, bytes | list[bytes] | None]:
        """Parse and offer one frame (``wirelen``: its length on the wire, when cut
        short); the reassembled frame comes back with "done" (with ``mtu``: the frames
        an output of that MTU sends for it)."""
    def sweep(self, now_ns: int) -> int:
        """Give up datagrams older than the timeout at ``now_ns``; how many."""
    def finish(self) -> int:
        """Give up every pending datagram as cut off by the end of the input
        (``pending_at_end``); how many.  ``close()`` frees them uncounted."""
    def close(self) -> None: ...
    def __enter__(self) -> FragTable: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
