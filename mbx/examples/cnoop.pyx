"""Example Cython NFs with C handlers (built as ``mbx.examples.cnoop``).

``make_noop()``: an NF whose handler does nothing (the benchmarks' dispatch cost);
``make_counter()``: counts events per direction in C, read from Python;
``make_dropper(dir)``: drops every packet sent in direction ``dir`` (``Dropper(dir,
etype)``: only on events of exactly that type).
"""
from libc.stdint cimport uint16_t, uint64_t

from mbx.cnf cimport MBX_DROP, MBX_PASS, chandler, mbx_msg, mbx_pkt

from mbx._events import NF, event_type


cdef int noop(void *ctx, const mbx_msg *m, mbx_pkt *p) noexcept nogil:
    return MBX_PASS


cdef struct dir_counts:
    uint64_t n[2]


cdef int count(void *ctx, const mbx_msg *m, mbx_pkt *p) noexcept nogil:
    (<dir_counts *>ctx).n[m.h.dir & 1] += 1
    return MBX_PASS


cdef struct drop_rule:
    uint64_t dir
    uint16_t type_idx           # 0xFFFF: any type


cdef int drop_dir(void *ctx, const mbx_msg *m, mbx_pkt *p) noexcept nogil:
    cdef const drop_rule *r = <const drop_rule *>ctx
    if m.h.dir == r.dir and (r.type_idx == 0xFFFF or m.h.type_idx == r.type_idx):
        return MBX_DROP
    return MBX_PASS


def noop_handler():
    """A C handler that passes everything."""
    return chandler(noop, NULL, None, "cnoop.noop")


cdef class Counter:
    """Events per direction (0: from the client, 1: from the server), counted in C."""
    cdef dir_counts c

    def handler(self):
        """The C handler that counts into this object (which it keeps alive)."""
        return chandler(count, &self.c, self, "cnoop.count")

    @property
    def c2s(self):
        return self.c.n[0]

    @property
    def s2c(self):
        return self.c.n[1]

    @property
    def total(self):
        return self.c.n[0] + self.c.n[1]


cdef class Dropper:
    """Drops the packets of events sent in direction ``dir`` (with ``etype``: of
    events of exactly that type only)."""
    cdef drop_rule rule

    def __init__(self, int dir, etype=None):
        if dir not in (0, 1):
            # any other value matches no event: the NF would silently drop nothing
            raise ValueError(f"Dropper: dir must be 0 (from the client) or 1 (from the "
                             f"server), not {dir}")
        self.rule.dir = dir
        self.rule.type_idx = 0xFFFF if etype is None else event_type(etype).idx

    def handler(self):
        return chandler(drop_dir, &self.rule, self, "cnoop.drop_dir")


def make_noop(name="cnoop", etype="PKT"):
    """An NF subscribed to ``etype`` with the no-op C handler."""
    nf = NF(name)
    nf.sub(etype, noop_handler())
    return nf


def make_counter(name="ccount", etype="PKT", side="sender"):
    """An NF counting ``etype`` events per direction; ``nf.counter`` has the counts."""
    nf = NF(name)
    nf.counter = Counter()
    nf.sub(etype, nf.counter.handler(), side=side)
    return nf


def make_dropper(dir=1, name="cdrop", etype="PKT"):
    """An NF dropping every packet sent in direction ``dir`` (1: by the server)."""
    nf = NF(name)
    nf.dropper = Dropper(dir)
    nf.sub(etype, nf.dropper.handler())
    return nf
