"""Stubs for mbx._pcap: capture-file ports."""

import os

from mbx._packet import Port

SUPPORTED_LINKTYPES: frozenset[int]   # the link type numbers read
SUPPORTED_LINKTYPES_TEXT: str         # the same in words, as errors give them

def non_ethernet_interface(path: str | os.PathLike[str]) -> tuple[int | None, int] | None: ...

class PcapReader(Port):
    """Replay a pcap or pcapng file as Ethernet frames with ns timestamps."""

    path: str
    format: str
    linktype: int
    nanosecond: bool
    snaplen: int
    size: int
    damaged: int
    truncated: int
    wirelen_raised: int
    port_id: int
    def __init__(self, path: str | os.PathLike[str], port_id: int = 0) -> None: ...
    @property
    def position(self) -> int: ...
    def rewind(self) -> None: ...
    def walk_to_end(self) -> None: ...
    def close(self) -> None: ...

class PcapWriter(Port):
    """Record packets to a classic pcap file in native byte order."""

    path: str
    nanosecond: bool
    snaplen: int
    linktype: int
    def __init__(
        self,
        path: str | os.PathLike[str],
        nanosecond: bool = True,
        snaplen: int = 262144,
        linktype: int = 1,
    ) -> None: ...
    @property
    def tx_bad_time(self) -> int: ...
    @property
    def tx_empty(self) -> int: ...
    def flush(self) -> None: ...
    def close(self) -> None: ...
    @property
    def counters(self) -> dict[str, int | str]: ...
