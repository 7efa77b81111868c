"""Stack Memory in one anonymous shared mapping, for the pipelined deployment.

The stack's tables are built while ``StackMemory.building()`` is active, so they are
carved out of the mapping instead of the heap; the mapping is made before the fork,
so every NF process has it at the same address and reads the stack's state as it
changes.  ``protect()`` (in each NF process) maps it read-only there: an NF that
writes to it faults in its own process, never in the stack's tables.
"""
from cpython.mem cimport PyMem_Calloc, PyMem_Free

from mbx.errors import MbxError

cdef extern from "sys/mman.h" nogil:
    void *mmap(void *addr, size_t length, int prot, int flags, int fd, long offset)
    int munmap(void *addr, size_t length)
    int mprotect(void *addr, size_t length, int prot)
    void *MAP_FAILED
    enum:
        PROT_READ
        PROT_WRITE
        MAP_SHARED
        MAP_ANONYMOUS
        MAP_NORESERVE

cdef enum:
    ALIGN = 64

# Address space only: pages cost memory when first touched, and MAP_NORESERVE keeps
# the reservation out of the kernel's commit accounting.  The tables are sized by
# configuration (flow_capacity, stream_memory, ...), so this bounds a deployment far
# above any of them.
DEFAULT_RESERVE = 64 << 30
MIN_RESERVE = 1 << 20

cdef list _building = []
cdef list _mapped = []


cdef class StackMemory:
    """``StackMemory(reserve=64 GiB)``: the shared arena (see the module)."""

    def __cinit__(self, size_t reserve=DEFAULT_RESERVE):
        cdef void *p = MAP_FAILED
        cdef size_t asked = reserve
        # Where the kernel does account MAP_NORESERVE (vm.overcommit_memory = 2),
        # settle for less address space: the tables then fail to fit with a clear
        # MemoryError, not the mapping.
        while p == MAP_FAILED and reserve >= MIN_RESERVE:
            p = mmap(NULL, reserve, PROT_READ | PROT_WRITE,
                     MAP_SHARED | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            if p == MAP_FAILED:
                reserve >>= 1
        if p == MAP_FAILED:
            raise MemoryError(f"cannot map shared Stack Memory (asked {asked} bytes)")
        self.base = <char *>p
        self.size = reserve

    def __dealloc__(self):
        if self.base != NULL:
            munmap(self.base, self.size)

    cdef void *take(self, size_t n) except NULL:
        cdef size_t at = (self.used + ALIGN - 1) & ~(<size_t>ALIGN - 1)
        if self.protected:
            raise MbxError("Stack Memory is read-only in this process")
        if n > self.size or at > self.size - n:
            raise MemoryError(f"Stack Memory: {n} more bytes do not fit in the "
                              f"{self.size} reserved ({self.used} used)")
        self.used = at + n
        return self.base + at       # fresh pages of an anonymous mapping are zero

    @property
    def address(self):
        """Where the arena starts in this process (the same in every process)."""
        return <size_t>self.base

    def building(self):
        """Context manager: tables allocated inside it come from this arena."""
        return _Building(self)

    def protect(self):
        """Map the arena read-only in this process (an NF process, after the fork)."""
        if mprotect(self.base, self.size, PROT_READ) != 0:
            raise OSError("mprotect of Stack Memory failed")
        self.protected = True
        _mapped.append(self)


class _Building:
    def __init__(self, arena):
        self.arena = arena

    def __enter__(self):
        _building.append(self.arena)
        return self.arena

    def __exit__(self, *exc):
        _building.remove(self.arena)


def mapped_read_only():
    """(address, bytes) of each Stack Memory arena mapped read-only in this process."""
    return [(a.address, a.size) for a in _mapped]


cdef object stack_arena():
    return _building[len(_building) - 1] if _building else None


cdef void *stack_calloc(size_t n, size_t size) except NULL:
    cdef void *p
    if n and size > (<size_t>-1) // n:
        raise MemoryError(f"{n} x {size} bytes overflow")
    if _building:
        return (<StackMemory>_building[len(_building) - 1]).take(max(n * size, 1))
    p = PyMem_Calloc(max(n, 1), max(size, 1))
    if p == NULL:
        raise MemoryError(f"cannot allocate {n * size} bytes of Stack Memory")
    return p


cdef void stack_free(bint shared, void *p) noexcept:
    # Arena memory goes with its mapping (the arena is unmapped when its last
    # table goes), never piece by piece.
    if not shared:
        PyMem_Free(p)
