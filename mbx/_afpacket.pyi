"""Stubs for mbx._afpacket: live interfaces through AF_PACKET sockets."""

from mbx._packet import Port

FANOUT_MODES: dict[str, int]
RING_VERSIONS: dict[str, int]
RING_DEFAULTS: dict[tuple[str, bool], tuple[int, int, int]]
NEW_GROUP: str      # fanout_group=NEW_GROUP: a group of an id the kernel picks

def check_fanout_mode(mode: str) -> None: ...
def ring_layout(ring: str = ..., *, offloads: bool = ..., rx: bool = ...,
                frame_size: int = ..., block_size: int = ..., block_count: int = ...,
                retire_ms: int = ...) -> tuple[int, int, int]: ...
def interface_coalescing(iface: str) -> list[str]: ...
def interface_link(iface: str) -> str | None:
    """"up", "down", "no carrier" or None (no such interface)."""

class AfPacketPort(Port):
    """One interface: a TPACKET_V2 (default) or V3 receive ring, sendmmsg bursts,
    optional fanout and offloads.  A size of 0 takes the default: block_size 128 KiB,
    block_count 64, frame_size 2048, or with offloads and ring "v2" frame_size 65792
    in 16 blocks of 1 MiB."""

    iface: str
    ifindex: int
    mtu: int
    port_id: int
    ring_version: str
    block_size: int
    block_count: int
    frame_size: int
    timeout_ms: int
    retire_ms: int
    fanout_group: int | None    # the id joined (NEW_GROUP resolved)
    fanout_mode: str
    rx: bool
    tx: bool
    promisc: bool
    offloads: bool
    ignore_outgoing: bool
    outgoing: bool      # frames the host sends out are received too
    interrupted: bool
    rx_outgoing: int
    rx_vlan: int
    rx_truncated: int
    rx_whole: int
    rx_gso: int
    rx_csum_partial: int
    tx_csum_done: int
    tx_cut: int
    tx_partial: int
    kernel_packets: int
    rx_unread: int
    rx_oversize: int
    kernel_freezes: int
    last_tx_errno: int
    link_errors: int
    last_link_errno: int
    def __init__(
        self,
        iface: str,
        *,
        port_id: int = 0,
        ring: str = "v2",
        block_size: int = 0,
        block_count: int = 0,
        frame_size: int = 0,
        fanout_group: int | str | None = None,
        fanout_mode: str = "flow",
        fanout_defrag: bool = True,
        rx: bool = True,
        tx: bool = True,
        timeout_ms: int = 5,
        retire_ms: int = 1,
        promisc: bool = True,
        duration: float = 0.0,
        offloads: bool = False,
        outgoing: bool = False,
    ) -> None: ...
    def fileno(self) -> int: ...
    @property
    def counters(self) -> dict: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> AfPacketPort: ...

class BridgePorts(Port):
    """The middlebox between a client-facing (port 0) and a server-facing (port 1)
    interface; each packet leaves by the other one."""

    client: AfPacketPort
    server: AfPacketPort
    misrouted: int
    def __init__(
        self,
        client_iface: str,
        server_iface: str,
        *,
        ring: str = "v2",
        block_size: int = 0,
        block_count: int = 0,
        frame_size: int = 0,
        fanout_group: int | str | tuple[int, int] | None = None,
        fanout_mode: str = "flow",
        fanout_defrag: bool = True,
        rx: bool = True,
        tx: bool = True,
        timeout_ms: int = 5,
        retire_ms: int = 1,
        promisc: bool = True,
        duration: float = 0.0,
        offloads: bool = False,
    ) -> None: ...
    @property
    def fanout_groups(self) -> tuple[int, int] | None: ...
    @property
    def counters(self) -> dict: ...
    @property
    def interrupted(self) -> bool: ...
    @property
    def ports(self) -> tuple[AfPacketPort, AfPacketPort]: ...
    def stop(self) -> None: ...
    def close(self) -> None: ...
    def __enter__(self) -> BridgePorts: ...
