"""Stubs for mbx._dpdkport: DPDK ports (built only when libdpdk was found)."""

from collections.abc import Sequence

from mbx._packet import Port

KNOWN_VDEV_DRIVERS: tuple[str, ...]
MEMIF_LINGER_S: float
MEMIF_TX_WAIT_MS: int

def default_eal_args(memory_mb: int = 256) -> tuple[str, ...]:
    """EAL arguments that work without hugepages, PCI access or root."""

def eal_init(args: Sequence[str] | str | None = None) -> tuple[str, ...]:
    """Start the EAL once per process (idempotent for the same arguments)."""

def eal_initialized() -> bool: ...
def eal_args() -> tuple[str, ...] | None: ...

class DpdkPort(Port):
    """A DPDK ethdev (a vdev attached by name, or a probed port id) as a port."""

    vdev: str
    devargs: str
    dpdk_port: int
    port_id: int
    driver: str
    burst: int
    mbufs: int
    mbuf_size: int
    eof_after_idle_polls: int
    rx_oversize: int
    tx_nombuf: int
    tx_oversize: int
    tx_full: int
    tx_waits: int
    tx_link_down: int
    tx_unread: int
    tx_wait_ms: int
    tx_max_len: int     # net_memif: longer frames are not sent (one ring slot); 0: any
    linger_s: float
    def __init__(
        self,
        vdev_or_port: str | int,
        *,
        port_id: int = 0,
        rx_queue_size: int = 1024,
        tx_queue_size: int = 1024,
        mbufs: int = 8192,
        mbuf_size: int = 2176,
        burst: int = 32,
        eof_after_idle_polls: int | None = None,
        tx_wait_ms: int | None = None,
    ) -> None: ...
    @property
    def device_stats(self) -> dict[str, int]: ...
    @property
    def mbufs_free(self) -> int: ...
    @property
    def link_up(self) -> bool: ...
    def wait_for_link(self, seconds: float, cancel: object = None) -> bool:
        """True once the link is up within ``seconds``, False once ``cancel`` is
        set; PortError otherwise."""
    @property
    def counters(self) -> dict[str, int]: ...
    def close(self) -> None: ...
    def __enter__(self) -> DpdkPort: ...
