"""Stubs for mbx.nfs._l4lb: the L4 load balancer's C handlers."""

from collections.abc import Iterable

from mbx._events import CHandler

class Balancer:
    translated: int
    tracked: int
    connections: int
    reverse_entries: int
    untranslatable: int
    no_memory: int
    passed: int
    no_flow: int
    no_ports: int
    def __init__(self, vip: tuple[str, int], backends: Iterable[tuple[str, int]]) -> None: ...
    def packet_handler(self) -> CHandler: ...
    def end_handler(self) -> CHandler: ...
