"""Stack Memory in one anonymous shared mapping (the pipelined deployment)."""

from contextlib import AbstractContextManager

DEFAULT_RESERVE: int

class StackMemory:
    size: int
    used: int
    protected: bool
    def __init__(self, reserve: int = ...) -> None: ...
    @property
    def address(self) -> int: ...
    def building(self) -> AbstractContextManager[StackMemory]: ...
    def protect(self) -> None: ...

def mapped_read_only() -> list[tuple[int, int]]: ...
