# Stack Memory (paper §3.3): the μStacks' tables (flow table, TCP state, stream
# buffers).  Inline it is ordinary heap; the pipelined deployment opens a shared
# arena while it builds the stack, before the fork, so the NF processes see the
# stack's tables as they change (and map them read-only, see StackMemory.protect).

cdef class StackMemory:
    cdef char *base
    cdef readonly size_t size           # bytes reserved (address space, see __cinit__)
    cdef readonly size_t used
    cdef readonly bint protected        # read-only in this process
    cdef void *take(self, size_t n) except NULL

# The arena allocations come from now (None: the heap); whoever allocates keeps it
# (an object field, so the arena outlives its tables) and remembers whether it was
# one in a C field (a garbage collector's clear may have emptied the object field by
# the time __dealloc__ runs).
cdef object stack_arena()
# Zeroed memory for n items of size bytes, from the current arena or the heap.
cdef void *stack_calloc(size_t n, size_t size) except NULL
cdef void stack_free(bint shared, void *p) noexcept
