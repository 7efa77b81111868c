"""μEvents: the type hierarchy, event messages, subscriptions and the dispatcher.

A type is a path (``EVENT/PKT/TCP/SYN``); each level owns LEVEL_BITS bits of a 64-bit
id, so "X/Y is a descendant of X" is ``(y.id & mask(x.depth)) == x.id``.  A message is
a 64-byte header plus the type's own fields, child fields after the parent's.

The EventBus holds Event Memory (a fixed pool of messages), two input queues per NF
(events from the stack, publications of the NFs before it; see ``next_ring``),
and per NF a small number of *handler sets*: tables from type index to handler,
resolved once through the hierarchy.  A flow uses set 0 (the NF's subscriptions)
unless ``mb_up_sub`` gave it another; publishing is a table lookup per NF, without
the GIL.  Dispatch (with the GIL) drains the queues in chain order, so the second
NF sees a packet's events only after the first is done with them, and an NF that
dropped the packet hides it from the rest of the chain.
"""
cimport cython
from cpython.buffer cimport PyBuffer_FillInfo
from cpython.mem cimport PyMem_Calloc, PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.pythread cimport PyThread_get_thread_ident
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from mbx._packet cimport (
    NO_FLOW, TH_ACK, TH_FIN, TH_PUSH, TH_RST, TH_SYN, TH_URG,
    VERDICT_DROP, Batch, mbx_pkt,
)
from mbx._rewrite cimport REWRITE_NO_PORTS, pkt_rewrite

import functools
import ipaddress
import operator
import threading


from mbx.errors import (
    EventTypeError, MbxError, PermissionDenied, SubscriptionError, code_place, did_you_mean,
    exc_text, user_code_line,
)


class NFError(MbxError):
    """An NF's handler raised; the message names the NF, the handler and the event."""


# ---------------------------------------------------------------------------------
# The type hierarchy

_KINDS = {
    # kind: (size, numpy dtype)
    "u8": (1, "u1"), "u16": (2, "<u2"), "u32": (4, "<u4"), "u64": (8, "<u8"),
    "i8": (1, "i1"), "i16": (2, "<i2"), "i32": (4, "<i4"), "i64": (8, "<i8"),
    "f32": (4, "<f4"), "f64": (8, "<f8"),
    "ip": (16, ("u1", 16)),     # an address of either family (IPv4 in the first 4 bytes)
}

# The header's fields as a numpy batch handler sees them.
_HEADER_FIELDS = [
    ("type_id", "<u8", 0), ("ts_ns", "<i8", 8), ("flow_slot", "<u4", 16),
    ("flow_gen", "<u4", 20), ("pkt", "<u4", 24), ("pos", "<u4", 28),
    ("type_idx", "<u2", 32), ("publisher", "<u2", 34), ("dir", "u1", 38),
    ("snapshot", ("u1", SNAPSHOT_SIZE), 40),
]
assert sizeof(mbx_msg_hdr) == 64, sizeof(mbx_msg_hdr)
# a batch record's header columns: a type's own field of one of these names would
# clash with them in its numpy dtype ("flow" is the Message attribute)
_HEADER_NAMES = frozenset(f[0] for f in _HEADER_FIELDS) | {"flow"}


cdef inline uint64_t depth_mask(uint32_t depth) noexcept nogil:
    if depth >= MAX_DEPTH:
        return 0xFFFFFFFFFFFFFFFF
    return ((<uint64_t>1) << (LEVEL_BITS * depth)) - 1


class EventType:
    """One event type: its path, hierarchical id, and the layout of its own fields."""

    __slots__ = ("path", "name", "id", "idx", "depth", "parent", "fields", "body_size",
                 "_dtype", "_children", "__weakref__")

    def __init__(self, path, parent, fields, builtin=False):
        self.path = path
        self.name = path[len("EVENT/"):] if path.startswith("EVENT/") else path
        self.parent = parent
        self.depth = 1 if parent is None else parent.depth + 1
        if self.depth > MAX_DEPTH:
            raise EventTypeError(f"event type {path}: deeper than {MAX_DEPTH} levels")
        self._children = 0
        if parent is not None and parent._children + 1 >= (1 << LEVEL_BITS):
            raise EventTypeError(
                f"event type {path}: {parent.path} already has "
                f"{(1 << LEVEL_BITS) - 1} children")
        self.fields = dict(parent.fields) if parent is not None else {}
        offset = parent.body_size if parent is not None else 0
        for fname, kind in fields:
            if kind not in _KINDS:
                raise EventTypeError(
                    f"event type {path}: field {fname!r} has unknown kind {kind!r} "
                    f"(known: {', '.join(_KINDS)})")
            # Built-in fields may mirror view properties (a view property that has no
            # packet to read raises AttributeError and falls back to the field).
            if not fname.isidentifier():
                raise EventTypeError(f"event type {path}: field name {fname!r} is not a "
                                     "name (letters, digits and _)")
            if fname in self.fields or (not builtin and (fname in _HEADER_NAMES
                                                         or hasattr(Event, fname))):
                raise EventTypeError(
                    f"event type {path}: field {fname!r} is already defined "
                    "by a parent type, the message header or the event view")
            size = _KINDS[kind][0]
            align = min(size, 8)
            offset = (offset + align - 1) // align * align
            self.fields[fname] = (offset, kind)
            offset += size
        if offset > MSG_BODY_SIZE:
            inherited = parent.body_size if parent is not None else 0
            raise EventTypeError(
                f"event type {path}: fields need {offset} bytes, a message body holds "
                f"{MSG_BODY_SIZE}" + (f", of which {parent.path}'s fields take "
                                      f"{inherited}, leaving {MSG_BODY_SIZE - inherited}"
                                      " (a field is aligned to its size, up to 8)"
                                      if inherited else ""))
        self.body_size = offset
        self._dtype = None
        # only a type that is valid takes its parent's next child number
        if parent is None:
            self.id = 1
        else:
            parent._children += 1
            self.id = parent.id | (parent._children << (LEVEL_BITS * parent.depth))

    @property
    def dtype(self):
        """The numpy dtype of a whole message of this type (batch handlers' records);
        numpy is imported only when some batch handler or tool asks."""
        if self._dtype is None:
            import numpy as np

            names = [f[0] for f in _HEADER_FIELDS]
            formats = [f[1] for f in _HEADER_FIELDS]
            offsets = [f[2] for f in _HEADER_FIELDS]
            for fname, (off, kind) in self.fields.items():
                names.append(fname)
                formats.append(_KINDS[kind][1])
                offsets.append(sizeof(mbx_msg_hdr) + off)
            self._dtype = np.dtype({"names": names, "formats": formats,
                                    "offsets": offsets, "itemsize": sizeof(mbx_msg)})
        return self._dtype

    def is_a(self, other):
        """True if this type is ``other`` or one of its descendants."""
        other = event_type(other)
        return (self.id & depth_mask(other.depth)) == other.id

    def overlaps(self, other):
        """True if one type is the other or a descendant of it: a subscription to
        either can receive messages of the other (DATA_RDY reaches a subscriber to
        EVENT), a port of either can carry them."""
        other = event_type(other)
        return self.is_a(other) or other.is_a(self)

    def __repr__(self):
        return f"<EventType {self.name} id={self.id:#x}>"

    def __str__(self):
        return self.name

    def __reduce__(self):
        return (event_type, (self.path,))


_types = []            # by dense index
_by_path = {}
_live_buses = [0]      # types cannot be added while a bus is running
# .nf: the NF whose handlers this thread is running (for the mb_* functions); per
# thread, as Apps may run in several threads at once
_dispatching = threading.local()


def dispatching_nf():
    """The NF whose handler is running now in this thread, or None outside handlers."""
    return getattr(_dispatching, "nf", None)


def _register(path, parent, fields, builtin=False):
    if len(_types) >= MAX_TYPES:
        raise EventTypeError(f"event type {path}: more than {MAX_TYPES} types")
    t = EventType(path, parent, fields, builtin)
    t.idx = len(_types)
    _types.append(t)
    _by_path[path] = t
    return t


def event_type(spec):
    """The EventType named by ``spec``: an EventType, a path such as ``"PKT/TCP"`` or
    ``"EVENT/FLOW/END"`` (any unique tail of the full path), or a type id."""
    if isinstance(spec, EventType):
        return spec
    if isinstance(spec, int):
        for t in _types:
            if t.id == spec:
                return t
        raise EventTypeError(f"no event type has id {spec:#x}")
    if not isinstance(spec, str) or not spec:
        raise EventTypeError(f"an event type is a name such as 'PKT/TCP', not {spec!r}")
    key = spec.strip().strip("/").upper().replace(".", "/")
    t = _by_path.get(key) or _by_path.get("EVENT/" + key)
    if t is not None:
        return t
    tail = "/" + key
    found = [t for t in _types if t.path.endswith(tail)]
    if len(found) == 1:
        return found[0]
    if len(found) > 1:
        raise EventTypeError(
            f"event type {spec!r} is ambiguous: {', '.join(t.path for t in found)}")
    names = [t.name for t in _types[1:]]
    # A typo has its close matches.  Otherwise all the names (a few dozen at most),
    # and the likelier cause: a type an NF file registers, named by an NF that the
    # chain loads before that file.
    raise EventTypeError(f"unknown event type {spec!r}" + (
        did_you_mean(key, names) or
        f" (known: {', '.join(names)}; a type an NF file defines exists once that file "
        "is loaded: list the file before the NF that uses the type)"))


def register_event_type(name, parent=None, fields=()):
    """Define a new event type (an NF's own publication, e.g. ``DPI_DETECT``).

    ``name`` is a path (``"PKT/TCP/HTTP"``: the parent is the path's head) or a bare
    name whose ``parent`` defaults to ``EVENT``.  ``fields`` is a sequence of
    ``(name, kind)`` (or a dict) with kinds u8..u64, i8..i64, f32, f64, ip; they follow
    the parent's fields in the message body.  Registering the same type again with the
    same layout returns the existing type.
    """
    if isinstance(fields, dict):
        fields = list(fields.items())
    try:
        fields = [(str(n), str(k)) for n, k in fields]
    except (TypeError, ValueError):
        raise EventTypeError(f"event type {name!r}: fields are (name, kind) pairs or a "
                             f"dict, not {fields!r}") from None
    key = str(name).strip().strip("/").upper()
    if not key or any(not part.replace("_", "").isalnum() for part in key.split("/")):
        raise EventTypeError(f"event type name {name!r}: use letters, digits, _ and /")
    if parent is None:
        head, _, leaf = key.rpartition("/")
        parent_t = event_type(head) if head else _by_path["EVENT"]
    else:
        if "/" in key:
            raise EventTypeError(f"event type name {name!r}: with parent= give a bare "
                                 f"name, or give the whole path without parent")
        parent_t = event_type(parent)
        leaf = key
    path = parent_t.path + "/" + leaf
    old = _by_path.get(path)
    own = [(n, k) for n, k in fields]
    if old is not None:
        old_own = [(n, k) for n, (o, k) in old.fields.items() if n not in parent_t.fields]
        if old_own != own:
            raise EventTypeError(
                f"event type {old.name} is already defined with fields {old_own}, "
                f"not {own}")
        return old
    if _live_buses[0]:
        raise EventTypeError(
            f"event type {path}: register event types before the run starts")
    return _register(path, parent_t, own)


def event_types():
    """Every registered type, in registration order."""
    return list(_types)


EVENT = _register("EVENT", None, [], True)
PKT = _register("EVENT/PKT", EVENT, [
    ("caplen", "u32"), ("wirelen", "u32"), ("sport", "u16"), ("dport", "u16"),
    ("proto", "u8"), ("ip_ver", "u8"), ("tcp_flags", "u8"), ("parse_status", "u8"),
    ("src", "ip"), ("dst", "ip")], True)
FLOW = _register("EVENT/FLOW", EVENT, [
    ("ip_ver", "u8"), ("proto", "u8"), ("end_reason", "u8"), ("_pad", "u8"),
    ("cli_port", "u16"), ("srv_port", "u16"), ("cli_addr", "ip"), ("srv_addr", "ip"),
    ("pkts_c2s", "u64"), ("pkts_s2c", "u64"), ("bytes_c2s", "u64"), ("bytes_s2c", "u64"),
    ("first_ns", "i64"), ("last_ns", "i64"), ("vlan", "u16"), ("inner_vlan", "u16"),
    ("_pad2", "u32")], True)
FLOW_START = _register("EVENT/FLOW/START", FLOW, [], True)
FLOW_END = _register("EVENT/FLOW/END", FLOW, [], True)
# The TCP Monitor's types (built in, so their indices are fixed for the C code).
# Fields mirror C structs in _events.pxd; the TCP events' dir is relative to the TCP
# client (0: client -> server), and their header carries the stack snapshot.
PKT_TCP = _register("EVENT/PKT/TCP", PKT, [
    ("seq", "u32"), ("ack", "u32"), ("win", "u32"), ("payload_len", "u32")], True)
PKT_TCP_SYN = _register("EVENT/PKT/TCP/SYN", PKT_TCP, [], True)
PKT_TCP_FIN = _register("EVENT/PKT/TCP/FIN", PKT_TCP, [], True)
PKT_TCP_RST = _register("EVENT/PKT/TCP/RST", PKT_TCP, [], True)
PKT_TCP_RETRANSMISSION = _register("EVENT/PKT/TCP/RETRANSMISSION", PKT_TCP, [], True)
FLOW_TCP = _register("EVENT/FLOW/TCP", FLOW, [
    ("offset", "u64"), ("length", "u64"), ("state_cli", "u8"), ("state_srv", "u8"),
    ("side", "u8"), ("reason", "u8"), ("stream_dir", "u8"), ("policy", "u8")], True)
FLOW_TCP_START = _register("EVENT/FLOW/TCP/START", FLOW_TCP, [], True)
FLOW_TCP_ESTABLISHED = _register("EVENT/FLOW/TCP/ESTABLISHED", FLOW_TCP, [], True)
FLOW_TCP_STATE = _register("EVENT/FLOW/TCP/STATE", FLOW_TCP, [
    ("old_state", "u8"), ("new_state", "u8")], True)
FLOW_TCP_TERMINATE = _register("EVENT/FLOW/TCP/TERMINATE", FLOW_TCP, [], True)
FLOW_TCP_GAP = _register("EVENT/FLOW/TCP/GAP", FLOW_TCP, [], True)
FLOW_TCP_OVERLAP_CONFLICT = _register("EVENT/FLOW/TCP/OVERLAP_CONFLICT", FLOW_TCP, [],
                                      True)
FLOW_TCP_MEMCAP = _register("EVENT/FLOW/TCP/MEMCAP", FLOW_TCP, [], True)
DATA_RDY = _register("EVENT/DATA_RDY", EVENT, [
    ("offset", "u64"), ("frontier", "u64"), ("length", "u32"), ("stream_dir", "u8")],
    True)
# The built-in Flow_Stats NF's type, registered with the stack's rather than when
# mbx.nfs.flow_stats is imported: an NF ahead of flow_stats in a chain subscribes to
# it before that module is loaded, and `mbx types` lists it.  It comes after the
# types the C code numbers, leaving their indices alone, and every process of a run
# (pipelined NFs, parallel stacks) is forked after this import, so all agree on its id.
FLOW_STATS = _register("EVENT/FLOW/STATS", FLOW, [
    ("duration_ns", "i64"), ("packets", "u64"), ("bytes", "u64")])
assert PKT.idx == T_PKT and FLOW_END.idx == T_FLOW_END and DATA_RDY.idx == T_DATA_RDY
assert PKT.body_size == sizeof(pkt_body) and FLOW.body_size == sizeof(flow_body)


cdef _check_layouts():
    # The registry's field offsets must be where the C structs put them.
    cdef pkt_tcp_body pt
    cdef flow_tcp_body ft
    cdef data_rdy_body dr
    cdef size_t b = <size_t>&pt
    assert PKT_TCP.fields["payload_len"][0] == <size_t>&pt.payload_len - b
    b = <size_t>&ft
    for name, at in (("offset", <size_t>&ft.offset), ("length", <size_t>&ft.length),
                     ("state_cli", <size_t>&ft.state_cli),
                     ("state_srv", <size_t>&ft.state_srv), ("side", <size_t>&ft.side),
                     ("stream_dir", <size_t>&ft.stream_dir),
                     ("policy", <size_t>&ft.policy), ("reason", <size_t>&ft.reason)):
        assert FLOW_TCP.fields[name][0] == at - b, name
    assert FLOW_TCP_STATE.fields["new_state"][0] == <size_t>&ft.new_state - b
    b = <size_t>&dr
    assert DATA_RDY.fields["stream_dir"][0] == <size_t>&dr.stream_dir - b
    assert DATA_RDY.fields["length"][0] == <size_t>&dr.length - b


_check_layouts()
cdef uint64_t _FLOW_ID = FLOW.id
cdef uint64_t _PKT_ID = PKT.id

END_REASONS = {0: "none", 1: "idle", 2: "evicted", 3: "shutdown", 4: "closed"}
TERMINATE_REASONS = {0: "none", 1: "fin", 2: "rst", 3: "nf"}
TCP_STATES = ("CLOSED", "LISTEN", "SYN_SENT", "SYN_RCVD", "ESTABLISHED", "FIN_WAIT_1",
              "FIN_WAIT_2", "CLOSE_WAIT", "CLOSING", "LAST_ACK", "TIME_WAIT")
PROTO_NAMES = {1: "icmp", 6: "tcp", 17: "udp", 58: "icmp6", 132: "sctp"}


def _addr_str(const uint8_t[::1] raw, int ip_ver):
    if ip_ver == 6:
        return str(ipaddress.IPv6Address(bytes(raw)))
    return str(ipaddress.IPv4Address(bytes(raw[:4])))


cdef object read_field(const uint8_t *body, int offset, str kind, int ip_ver):
    cdef const uint8_t *q = body + offset
    if kind == "u8":
        return q[0]
    if kind == "u16":
        return (<const uint16_t *>q)[0]
    if kind == "u32":
        return (<const uint32_t *>q)[0]
    if kind == "u64":
        return (<const uint64_t *>q)[0]
    if kind == "i8":
        return (<const signed char *>q)[0]
    if kind == "i16":
        return (<const short *>q)[0]
    if kind == "i32":
        return (<const int *>q)[0]
    if kind == "i64":
        return (<const int64_t *>q)[0]
    if kind == "f32":
        return (<const float *>q)[0]
    if kind == "f64":
        return (<const double *>q)[0]
    # ip: IPv6 unless the type says v4 or the address is all zeros past 4 bytes
    cdef int i
    if ip_ver == 0:
        ip_ver = 4
        for i in range(4, 16):
            if q[i]:
                ip_ver = 6
                break
    return _addr_str(<const uint8_t[:16]>q, ip_ver)


_U64_END = 1 << 64         # past the largest uint64_t: flow ids, stream offsets


cdef object _whole(object value):
    # A whole number as operator.index takes one (a numpy integer too; a float is
    # refused, not cut short), but not a bool: an int to Python, True in a count, a
    # port or an offset is a mistake (filters refuse it too).
    if not isinstance(value, bool):
        try:
            return operator.index(value)
        except TypeError:
            pass
    raise TypeError(f"expected a whole number, not {type(value).__name__}")


cdef int write_field(uint8_t *body, int offset, str kind, object value) except -1:
    cdef uint8_t *q = body + offset
    if kind != "ip" and kind[0] in "ui":
        value = _whole(value)
    if kind == "u8":
        q[0] = value
    elif kind == "u16":
        (<uint16_t *>q)[0] = value
    elif kind == "u32":
        (<uint32_t *>q)[0] = value
    elif kind == "u64":
        (<uint64_t *>q)[0] = value
    elif kind == "i8":
        (<signed char *>q)[0] = value
    elif kind == "i16":
        (<short *>q)[0] = value
    elif kind == "i32":
        (<int *>q)[0] = value
    elif kind == "i64":
        (<int64_t *>q)[0] = value
    elif kind == "f32":
        (<float *>q)[0] = value
    elif kind == "f64":
        (<double *>q)[0] = value
    else:
        raw = ipaddress.ip_address(value).packed if not isinstance(value, bytes) else value
        if len(raw) not in (4, 16):
            raise ValueError(f"an address is 4 or 16 bytes, not {len(raw)}")
        memset(q, 0, 16)
        memcpy(q, <const char *>raw, min(len(raw), 16))
    return 0


# ---------------------------------------------------------------------------------
# NFs, publication ports, new messages

# Which stack updates a sided message comes from: bit 0 of its flags is the server's
# stack (else the client's), bit 1 a receiver-side update (else the sender's).  A
# subscription keeps a 4-bit mask over those combinations.
SIDES = {
    "sender": 0b0011, "receiver": 0b1100, "client": 0b0101, "server": 0b1010,
    "both": 0b1111,
}


def side_mask(side):
    try:
        return SIDES[side]
    except KeyError:
        raise SubscriptionError(
            f"side must be one of {', '.join(SIDES)}, not {side!r}") from None


@cython.final
cdef class CHandler:
    """A handler written in C (a Cython NF's): ``NF.sub`` and ``up_sub`` take it like
    a Python callable, and the dispatcher calls its function pointer directly, in a
    tight loop over consecutive messages, without Python objects.  Made in Cython
    with ``chandler(fn, ctx, owner)`` (``mbx/cnf.pxd``); not batched (it is already
    the fast path).  Calling it from Python runs it on an Event (tests, fallbacks).
    """

    def __init__(self):
        raise TypeError("a CHandler is made in Cython with mbx.cnf.chandler(fn, ctx)")

    def __call__(self, Event ev not None):
        if self.c.fn(self.c.ctx, ev.m, ev.p) and ev.p != NULL:
            ev.drop()

    @property
    def __qualname__(self):
        return self.name

    def __repr__(self):
        return f"<CHandler {self.name}>"


cdef CHandler chandler(mbx_c_handler fn, void *ctx, object owner=None, str name=None):
    if fn == NULL:
        raise ValueError("a CHandler needs a function")
    cdef CHandler h = CHandler.__new__(CHandler)
    h.c.fn = fn
    h.c.ctx = ctx
    h.owner = owner
    h.name = name if name is not None else f"c@{<size_t>fn:#x}"
    return h


class PubPort:
    """An output port: what ``mb_pub`` returns and ``mb_publish_event`` takes."""

    __slots__ = ("nf", "type", "writes")

    def __init__(self, nf, etype, writes):
        self.nf = nf
        self.type = etype
        self.writes = writes

    def __repr__(self):
        return f"<PubPort {self.nf.name}:{self.type.name}{' writes' if self.writes else ''}>"


def _public_fields(t):
    """The names of ``t``'s fields an NF uses, for messages: padding left out."""
    return ", ".join(name for name in t.fields if not name.startswith("_"))


_NF_INIT_ATTRS = frozenset(("name", "writes", "group", "group_merge", "subs", "pubs",
                            "filters", "_bus", "_index"))


class NF:
    """A network function: its subscriptions, publications and the calls of the paper.

    ``writes=True`` declares that the NF rewrites packet headers (or stream bytes);
    only such NFs may, and the Controller serialises them.
    """

    # What the pipelined deployment does when the NF's process dies or its handler
    # raises (mbx.pipeline checks them): None ends the run, "open" passes its packets
    # on, "closed" drops them; and how often, and after how long, its process is
    # started again.  Class attributes, so that an NF has them whether or not its
    # code or an application file sets them.
    failure = None
    restart = 0                 # restarts allowed
    restart_backoff = 0.1       # the first back-off in seconds, doubled each restart
    # What mbx.runtime.load_app made it from: {"use": the chain item, "options": the
    # options it was given}, for a run's --json to say how to make it again (None: an
    # NF built in code).
    made_from = None

    def __init__(self, name, *, writes=False, group=None):
        if not name or not isinstance(name, str):
            raise SubscriptionError(f"an NF needs a name, not {name!r}")
        self.name = name
        self.writes = bool(writes)
        self.group = group      # NFs of one group run in parallel (read-only NFs)
        # how its group merges verdicts: "any" member's drop wins, "all" must drop, or
        # a merge function decides (see merge_problem)
        self.group_merge = "any"
        self.subs = {}          # type idx -> (handler, batch, side mask)
        self.pubs = {}          # type idx -> PubPort
        self.filters = {}       # type idx (or None: every subscription) -> Filter
        self._bus = None
        self._index = -1

    def __getattr__(self, attr):
        # Only reached when the attribute is missing: for those __init__ sets, a
        # subclass that never called it (the usual slip), said so.
        if attr in _NF_INIT_ATTRS:
            raise AttributeError(f"{type(self).__name__} has no {attr!r}: its __init__ "
                                 "must call super().__init__(name) first")
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {attr!r}")

    def __repr__(self):
        return f"<NF {self.name}>"

    def start(self):
        """Called once when a run starts, in the process that runs the stack, before
        the first packet and before any NF process is forked: open output files here,
        not in ``__init__`` (building an NF, as ``mbx check`` does, must not touch
        them, and an NF process restarted after a failure keeps what was opened)."""

    def stop(self):
        """Called once when the run ends (flush files, print summaries)."""

    def report(self):
        """The NF's own counters, a dict of numbers and text (or None: nothing to
        report), taken when the run ends, after ``stop()``.  They appear in the
        run's counters (``counters()["nfs"][name]["report"]``) and in ``mbx
        run``'s summary; pipelined, the NF's process sends them to the stack's as
        JSON (up to 4 KiB); with parallel stacks the numbers are summed."""
        return None

    def sub(self, etype, handler, *, batch=False, side="sender"):
        """Subscribe ``handler`` to ``etype`` and its descendants (``mb_sub``).

        ``side`` narrows TCP events, which the TCP Monitor raises from the client's
        and the server's stack as each updates for a packet: ``"sender"`` (one event
        per packet, from the stack of the endpoint that sent it), ``"receiver"``,
        ``"client"``, ``"server"`` or ``"both"``.  Other events ignore it.
        """
        t = event_type(etype)
        if not callable(handler):
            raise SubscriptionError(
                f"NF {self.name}: handler for {t.name} is not callable: {handler!r}")
        _check_c(self, t, handler, batch)
        if self._bus is not None:
            raise SubscriptionError(
                f"NF {self.name}: subscribe before the run starts; use up_sub to change "
                "one flow's subscription at run time")
        if t.idx in self.subs:
            raise SubscriptionError(
                f"NF {self.name}: already subscribed to {t.name} (one handler per type; "
                "use up_sub to change it for one flow)")
        self.subs[t.idx] = (handler, bool(batch), side_mask(side))
        return t

    def filter(self, etype=None, **spec):
        """Restrict this NF's subscription to ``etype`` (or all of them) to events
        whose packet (or flow) matches ``spec``: ``proto`` ("tcp", "udp", 6...),
        ``src_port``/``dst_port`` (ports, "a-b" ranges, lists), ``src_net``/``dst_net``
        (prefixes, lists).  Checked in C when the event is published.  Before the
        run only."""
        if self._bus is not None:
            raise SubscriptionError(f"NF {self.name}: filter before the run starts (the "
                                    "bus compiled the filters when it started)")
        key = None if etype is None else event_type(etype).idx
        if key in self.filters:
            # refused, not replaced (the first would be lost, silently) nor ANDed
            # (one Filter per subscription is what the bus compiles)
            what = "every subscription" if key is None else event_types()[key].name
            raise SubscriptionError(
                f"NF {self.name}: a second filter for {what} (it has "
                f"{self.filters[key]!r}; one filter per subscription: put every "
                "condition in one)")
        unknown = set(spec) - set(FILTER_KEYS)
        if unknown:
            raise SubscriptionError(f"filter: unknown key(s) {', '.join(sorted(unknown))} "
                                    f"(known: {', '.join(FILTER_KEYS)})")
        self.filters[key] = Filter(**spec)

    def pub(self, etype, *, writes=False):
        """Announce a publication of ``etype`` and get its output port (``mb_pub``).
        Before the run only: the Controller checks the application's links then."""
        if self._bus is not None:
            raise SubscriptionError(f"NF {self.name}: declare publications (pub) before "
                                    "the run starts")
        t = event_type(etype)
        port = PubPort(self, t, bool(writes) or self.writes)
        self.pubs[t.idx] = port
        return port

    def up_sub(self, etype, flow, handler, *, batch=False, side="sender"):
        """Change this NF's handler for ``etype`` on one flow (``mb_up_sub``).

        ``handler=None`` unsubscribes the flow; when no NF wants the type for the
        flow any more, the stack stops building it.
        """
        if self._bus is None:
            raise SubscriptionError(f"NF {self.name}: up_sub is for a running NF")
        t = event_type(etype)
        if handler is not None and not callable(handler):
            raise SubscriptionError(
                f"NF {self.name}: handler for {t.name} is not callable: {handler!r}")
        _check_c(self, t, handler, batch)
        offered = (<EventBus>self._bus).offered
        if handler is not None and offered is not None:
            stack, pubs, monitor_pubs = offered
            if not any(p.is_a(t) for p in pubs):
                # the stack never builds what no one publishes: the handler would
                # wait for nothing, silently
                hint = ("; the TCP Monitor does: run with --stack tcp (stack = \"tcp\" "
                        "in an application file or App), or sub() a TCP type so that "
                        "the Controller runs it" if any(p.is_a(t) for p in monitor_pubs)
                        else "")
                raise SubscriptionError(
                    f"NF {self.name}: up_sub({t.name}): nothing in this run publishes "
                    f"{t.name} or a descendant of it (the {stack} and the NFs publish "
                    f"{', '.join(sorted({p.name for p in pubs}))}){hint}")
            inflight = getattr(self._bus, "inflight", 1)
            if inflight > 1 and t.overlaps(DATA_RDY) and any(p.is_a(DATA_RDY) for p in pubs):
                # Stream bytes are read from the stack's own buffers, which it reuses
                # once it moves on: an NF process may not read them while the stack
                # runs bursts ahead (mbx.pipeline.inflight_for sees only sub()).
                raise SubscriptionError(
                    f"NF {self.name}: up_sub({t.name}) would hand it stream bytes "
                    f"(DATA_RDY), which a pipelined NF reads only with one burst in "
                    f"flight, not {inflight}: run with --inflight 1 (inflight = 1 in "
                    f"an application file or App), or also sub(DATA_RDY) before the "
                    f"run, with a filter, which makes 1 the default")
        (<EventBus>self._bus).up_sub(self._index, t, flow, handler, bool(batch),
                                     side_mask(side))

    def new_msg(self, etype):
        """A blank message of ``etype`` to fill and publish (``mb_new_msg``)."""
        return Message(event_type(etype))

    def publish(self, port, msg):
        """Publish ``msg`` on ``port`` (``mb_publish_event``)."""
        if not isinstance(msg, Message):
            raise TypeError(f"NF {self.name}: publish takes a Message (nf.new_msg(type)), "
                            f"not {type(msg).__name__}")
        if not isinstance(port, PubPort) or port.nf is not self:
            raise SubscriptionError(
                f"NF {self.name}: {port!r} is not one of this NF's publication ports")
        if not (<Message>msg).etype.is_a(port.type):
            raise EventTypeError(
                f"NF {self.name}: port {port.type.name} cannot carry a "
                f"{(<Message>msg).etype.name} message")
        if self._bus is None:
            raise SubscriptionError(f"NF {self.name}: publish is for a running NF (from "
                                    "its handlers), not before or after the run")
        _same_thread(<EventBus>self._bus, self, "publish")
        (<EventBus>self._bus).publish_from(self, <Message>msg)


def _handler_key(h):
    # A handler as a key: itself when hashable (bound methods of one object are
    # equal), else its identity.
    try:
        hash(h)
    except TypeError:
        return ("unhashable", id(h))
    return h


def _check_c(nf, t, handler, batch):
    # (any truthy value was taken for True: batch="no" subscribed a batch handler)
    if not isinstance(batch, bool):
        raise SubscriptionError(f"NF {nf.name}: batch for {t.name} is True or False, "
                                f"not {batch!r}")
    if batch and isinstance(handler, CHandler):
        raise SubscriptionError(
            f"NF {nf.name}: {handler!r} for {t.name} is a C handler; those are not "
            "batched (the dispatcher already calls them in a loop): drop batch=True")


FILTER_KEYS = ("proto", "src_port", "dst_port", "src_net", "dst_net")
_PROTOS = {"tcp": 6, "udp": 17, "icmp": 1, "icmp6": 58, "sctp": 132, "any": 0}


def _items(spec, what, kind):
    # A filter key's value as a list of its items; an empty list would leave the key
    # without a constraint, matching everything, the opposite of "any of none".
    items = list(spec) if isinstance(spec, list | tuple | set) else [spec]
    if not items:
        raise SubscriptionError(f"filter {what}: an empty list: give at least one "
                                f"{kind}, or leave {what} out to match any")
    return items


def _ports(spec, what):
    if spec is None:
        return []
    items = _items(spec, what, "port or range")
    out = []
    for item in items:
        text = str(item)
        lo, sep, hi = text.partition("-")
        try:
            a, b = int(lo), int(hi) if sep else int(lo)
        except ValueError:
            raise SubscriptionError(f"filter {what}: {item!r} is not a port or a range "
                                    "such as 8000-8080") from None
        if not (0 <= a <= 65535 and 0 <= b <= 65535):
            raise SubscriptionError(f"filter {what}: {item!r} is not within 0-65535")
        if a > b:
            raise SubscriptionError(f"filter {what}: {item!r} runs backwards: write "
                                    f"{b}-{a}")
        out.append((a, b))
    if len(out) > FILTER_MAX_PORT_RANGES:
        raise SubscriptionError(f"filter {what}: at most {FILTER_MAX_PORT_RANGES} ranges")
    return out


def _nets(spec, what):
    if spec is None:
        return []
    items = _items(spec, what, "prefix")
    out = []
    for item in items:
        try:
            out.append(ipaddress.ip_network(str(item)))
        except ValueError as exc:
            try:
                net = ipaddress.ip_network(str(item), strict=False)
            except ValueError:
                raise SubscriptionError(f"filter {what}: {exc}") from None
            # 10.0.0.1/8: a host or a network?  (tcpdump refuses it too)
            raise SubscriptionError(
                f"filter {what}: {item!r} has bits set past its prefix length: write "
                f"{net} for the network, or {ipaddress.ip_interface(str(item)).ip} for "
                f"the host") from None
    if len(out) > FILTER_MAX_PREFIXES:
        raise SubscriptionError(f"filter {what}: at most {FILTER_MAX_PREFIXES} prefixes")
    return out


@cython.final
cdef class Filter:
    """A compiled subscription filter (see ``NF.filter``)."""
    cdef mbx_filter f
    cdef readonly dict spec

    def __cinit__(self, proto=None, src_port=None, dst_port=None, src_net=None,
                  dst_net=None):
        memset(&self.f, 0, sizeof(mbx_filter))
        self.spec = {k: v for k, v in dict(proto=proto, src_port=src_port,
                                           dst_port=dst_port, src_net=src_net,
                                           dst_net=dst_net).items() if v is not None}
        if proto is not None:
            p = _PROTOS.get(str(proto).lower(), proto)
            if isinstance(p, str) and p.strip().isdigit():
                p = int(p)
            if isinstance(p, bool) or not isinstance(p, int) or not 0 <= p <= 255:
                # (a bool is an int to Python: true would have been ICMP)
                raise SubscriptionError(f"filter proto: {proto!r} is not tcp, udp, icmp, "
                                        "icmp6, sctp or a protocol number")
            if p in (1, 58) and (src_port is not None or dst_port is not None):
                raise SubscriptionError(f"filter: proto {proto!r} with src_port or dst_port "
                                        "matches nothing: ICMP has no ports")
            self.f.proto = p
        cdef int i
        for i, (lo, hi) in enumerate(_ports(src_port, "src_port")):
            self.f.sport_lo[i], self.f.sport_hi[i] = lo, hi
            self.f.n_sport = i + 1
        for i, (lo, hi) in enumerate(_ports(dst_port, "dst_port")):
            self.f.dport_lo[i], self.f.dport_hi[i] = lo, hi
            self.f.n_dport = i + 1
        for i, net in enumerate(_nets(src_net, "src_net")):
            self.f.src_ver[i] = net.version
            self.f.src_bits[i] = net.prefixlen
            raw = net.network_address.packed
            memcpy(self.f.src[i], <const char *>raw, len(raw))
            self.f.n_src = i + 1
        for i, net in enumerate(_nets(dst_net, "dst_net")):
            self.f.dst_ver[i] = net.version
            self.f.dst_bits[i] = net.prefixlen
            raw = net.network_address.packed
            memcpy(self.f.dst[i], <const char *>raw, len(raw))
            self.f.n_dst = i + 1

    def __repr__(self):
        return f"Filter({', '.join(f'{k}={v!r}' for k, v in self.spec.items())})"


cdef inline bint prefix_match(const uint8_t *addr, const uint8_t *net, uint8_t bits) noexcept nogil:
    cdef int i = 0
    while bits >= 8:
        if addr[i] != net[i]:
            return False
        bits -= 8
        i += 1
    if bits:
        return ((addr[i] ^ net[i]) & (0xFF << (8 - bits)) & 0xFF) == 0
    return True


cdef bint filter_match(const mbx_filter *f, uint8_t proto, uint8_t ip_ver, const uint8_t *src,
                       const uint8_t *dst, uint16_t sport, uint16_t dport) noexcept nogil:
    cdef int i
    cdef bint ok
    if f.proto and f.proto != proto:
        return False
    if f.n_sport:
        ok = False
        for i in range(f.n_sport):
            if f.sport_lo[i] <= sport <= f.sport_hi[i]:
                ok = True
        if not ok:
            return False
    if f.n_dport:
        ok = False
        for i in range(f.n_dport):
            if f.dport_lo[i] <= dport <= f.dport_hi[i]:
                ok = True
        if not ok:
            return False
    if f.n_src:
        ok = False
        for i in range(f.n_src):
            if f.src_ver[i] == ip_ver and prefix_match(src, f.src[i], f.src_bits[i]):
                ok = True
        if not ok:
            return False
    if f.n_dst:
        ok = False
        for i in range(f.n_dst):
            if f.dst_ver[i] == ip_ver and prefix_match(dst, f.dst[i], f.dst_bits[i]):
                ok = True
        if not ok:
            return False
    return True


@cython.final
cdef class Message:
    """A message an NF builds (``mb_new_msg``): set the type's fields as attributes.

    ``flow``, ``pkt``, ``dir`` and ``ts_ns`` default to those of the event being
    handled when it is published, so the new event belongs to the same packet.
    """
    cdef mbx_msg m
    cdef readonly object etype
    cdef public object flow

    def __cinit__(self, etype):
        memset(&self.m, 0, sizeof(mbx_msg))
        self.etype = etype
        self.m.h.type_id = etype.id
        self.m.h.type_idx = etype.idx
        self.m.h.flow = NO_FLOW
        self.m.h.pkt = NO_PKT
        self.flow = None
        if etype.idx == T_FLOW_TCP_TERMINATE:   # an NF asks: its subscribers see why
            f = etype.fields["reason"]
            write_field(self.m.body, f[0], f[1], 3)

    def __setattr__(self, name, value):
        if name == "flow":          # the flow it belongs to, not a field of the body
            if value is not None:
                # refused here, where the mistake is, not at publish (2**64 raised
                # OverflowError there) nor taken (True was flow 1)
                try:
                    value = _whole(value)
                except TypeError:
                    raise TypeError(f"{self.etype.name}: flow must be a flow id (ev.flow) "
                                    f"or None, not {value!r}") from None
                if not 0 <= value < _U64_END:
                    raise ValueError(f"{self.etype.name}: flow must be a flow id (ev.flow) "
                                     f"or None, not {value!r} (a flow id is 0 to 2**64-1)")
            self.flow = value
            return
        f = self.etype.fields.get(name)
        if f is None:
            raise AttributeError(f"{self.etype.name} has no field {name!r} "
                                 f"(fields: {_public_fields(self.etype) or 'none'})")
        try:
            write_field(self.m.body, f[0], f[1], value)
        except (OverflowError, TypeError, ValueError) as exc:
            raise type(exc)(f"{self.etype.name}.{name} ({f[1]}) = {value!r}: {exc}"
                            ) from None

    def __getattr__(self, name):
        f = self.etype.fields.get(name)
        if f is None:
            raise AttributeError(f"{self.etype.name} has no field {name!r}")
        return read_field(self.m.body, f[0], f[1], 0)

    def fill_from(self, Event ev not None):
        """Copy the fields ``ev`` has in common with this message: those of their
        nearest common type (a parent's record is a prefix of its children's, so an
        X event fills the X part of an X/Y, and unrelated types share none).  A
        FLOW/TCP/TERMINATE message keeps its ``reason`` unless ``ev`` is one too."""
        common = _types[ev.m.h.type_idx]
        while common is not None and not self.etype.is_a(common):
            common = common.parent
        cdef size_t n = min(common.body_size if common is not None else 0, MSG_BODY_SIZE)
        terminate = _types[T_FLOW_TCP_TERMINATE]
        # reason is FLOW/TCP's field but only TERMINATE's to say: every other FLOW/TCP
        # event carries 0 (none) there, which would overwrite the message's 3 (an NF
        # asks) and name no reason at all
        keep = self.etype.is_a(terminate) and common is not None and \
            not common.is_a(terminate)
        f = terminate.fields["reason"]
        reason = read_field(self.m.body, f[0], f[1], 0) if keep else None
        memcpy(self.m.body, ev.m.body, n)
        if keep:
            write_field(self.m.body, f[0], f[1], reason)
        self.flow = ev.flow
        self.m.h.ts_ns = ev.m.h.ts_ns
        self.m.h.dir = ev.m.h.dir


# ---------------------------------------------------------------------------------
# The event view handed to handlers

_packed_cache = {}
# The view's properties that read the event's packet (Event._pkt)
_PACKET_VIEWS = frozenset((
    "ip_ver", "proto", "src_ip", "dst_ip", "sport", "dport", "tcp_flags", "tcp_flags_str",
    "seq", "ack", "win", "caplen", "wirelen", "payload_len", "packet", "payload"))


cdef bytes _packed_address(object ip):
    # Rewriting NFs pass the same few addresses for every packet: parse each once.
    cdef bytes raw = _packed_cache.get(ip)
    if raw is None:
        raw = ip if isinstance(ip, bytes) else ipaddress.ip_address(ip).packed
        if len(_packed_cache) < 4096:
            _packed_cache[ip] = raw
    return raw


cdef str _flags_str(uint8_t f):
    cdef str s = ""
    if f & TH_SYN:
        s += "S"
    if f & TH_FIN:
        s += "F"
    if f & TH_RST:
        s += "R"
    if f & TH_PUSH:
        s += "P"
    if f & TH_ACK:
        s += "."
    if f & TH_URG:
        s += "U"
    return s


@cython.final
cdef class _PacketBytes:
    # Exports bytes of a burst's arena through the buffer protocol and keeps the
    # Batch alive, so a memoryview an NF holds on to past its handler can go stale
    # (the next burst reuses the arena) but never dangles.
    cdef object owner
    cdef uint8_t *ptr
    cdef Py_ssize_t length
    cdef bint writable

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        PyBuffer_FillInfo(buffer, self, self.ptr, self.length, not self.writable, flags)

    def __releasebuffer__(self, Py_buffer *buffer):
        pass


cdef _PacketBytes _view_of(object owner, uint8_t *ptr, Py_ssize_t length, bint writable):
    cdef _PacketBytes b = _PacketBytes.__new__(_PacketBytes)
    b.owner = owner
    b.ptr = ptr
    b.length = length
    b.writable = writable
    return b


cdef int _same_thread(EventBus bus, object nf, str call) except -1:
    # The Python-level calls only: the C handlers' path never comes here.
    if PyThread_get_thread_ident() != bus.thread_id:
        raise MbxError(f"NF {nf.name}: {call}() called from another thread than the "
                       "one that runs its handlers: an event view is reused for the "
                       "next event, so it would act on whichever that is; call it from "
                       "the handler")
    return 0


cdef object _stream_arg(object nf, str call, str arg, object value, object below):
    # Taken as _whole takes it: a float offset would be cut short silently, and True
    # is no offset.  The C side takes unsigned 64-bit numbers, and
    # a stream_dir past 1 names no stream of this connection (it indexed another's).
    try:
        v = _whole(value)
    except TypeError:
        raise TypeError(f"NF {nf.name}: ev.{call}(): {arg} is a whole number, not "
                        f"{type(value).__name__} {value!r}") from None
    if not 0 <= v < below:
        if arg == "stream_dir":
            raise ValueError(f"NF {nf.name}: ev.{call}(): stream_dir must be 0 (client "
                             f"-> server) or 1 (server -> client), not {v}")
        raise ValueError(f"NF {nf.name}: ev.{call}(): {arg} must be from 0 to "
                         f"{below - 1}, not {v}")
    return v


# What an Event made by hand views: a blank EVENT with no flow and no packet.
cdef mbx_msg _NO_MSG
_NO_MSG.h.flow = NO_FLOW
_NO_MSG.h.pkt = NO_PKT


@cython.final
cdef class Event:
    """The reused view a handler receives: header, packet and the type's fields.

    Valid only during the handler call; keep values, not the view.
    """
    cdef mbx_msg *m
    cdef mbx_pkt *p
    cdef EventBus bus
    cdef object nf

    def __cinit__(self):
        # The bus points m at the message it hands over; until then (an Event made by
        # hand, e.g. to test a handler) at a blank EVENT, never at nothing.
        self.m = &_NO_MSG

    cdef int _live(self, str call) except -1:
        if self.bus is None or self.nf is None or self.nf._index < 0:
            raise MbxError("this event view is not in a handler call of a running NF")
        _same_thread(self.bus, self.nf, call)
        return 0

    @property
    def type(self):
        return _types[self.m.h.type_idx]

    @property
    def type_name(self):
        return _types[self.m.h.type_idx].name

    @property
    def ts(self):
        """Timestamp, ns since the epoch."""
        return self.m.h.ts_ns

    @property
    def time(self):
        """Timestamp, seconds since the epoch (float)."""
        return self.m.h.ts_ns * 1e-9

    @property
    def flow(self):
        """The flow id (pass it to ``mb_up_sub``), or None."""
        if self.m.h.flow == NO_FLOW:
            return None
        return ((<uint64_t>self.m.h.flow_gen) << 32) | self.m.h.flow

    @property
    def dir(self):
        """0: sent by the flow's initiator (client); 1: by the responder."""
        return self.m.h.dir

    @property
    def publisher(self):
        return self.m.h.publisher

    @property
    def burst_pos(self):
        """Position in its burst of the packet that caused the event."""
        return self.m.h.pos

    @property
    def has_packet(self):
        return self.p != NULL

    cdef inline mbx_pkt *_pkt(self) except NULL:
        if self.p == NULL:
            raise AttributeError(f"this {self.type_name} event carries no packet")
        return self.p

    @property
    def ip_ver(self):
        return self._pkt().ip_ver

    @property
    def proto(self):
        return self._pkt().l4_proto

    @property
    def src_ip(self):
        cdef mbx_pkt *p = self._pkt()
        return _addr_str(<const uint8_t[:16]>p.src.b, p.ip_ver) if p.ip_ver else None

    @property
    def dst_ip(self):
        cdef mbx_pkt *p = self._pkt()
        return _addr_str(<const uint8_t[:16]>p.dst.b, p.ip_ver) if p.ip_ver else None

    @property
    def sport(self):
        return self._pkt().sport

    @property
    def dport(self):
        return self._pkt().dport

    @property
    def tcp_flags(self):
        return self._pkt().tcp_flags

    @property
    def tcp_flags_str(self):
        return _flags_str(self._pkt().tcp_flags)

    @property
    def seq(self):
        return self._pkt().seq

    @property
    def ack(self):
        return self._pkt().ack

    @property
    def win(self):
        return self._pkt().win

    @property
    def caplen(self):
        return self._pkt().caplen

    @property
    def wirelen(self):
        return self._pkt().wirelen

    @property
    def payload_len(self):
        return self._pkt().payload_len

    @property
    def packet(self):
        """The frame's bytes (a zero-copy, read-only memoryview: header changes go
        through set_src/set_dst so checksums follow)."""
        cdef mbx_pkt *p = self._pkt()
        return memoryview(_view_of(self.bus.batch, p.data, p.caplen, False))

    @property
    def payload(self):
        """The transport payload (a zero-copy, read-only memoryview)."""
        cdef mbx_pkt *p = self._pkt()
        return memoryview(_view_of(self.bus.batch, p.data + p.payload_off, p.payload_len,
                                   False))

    @property
    def dropped(self):
        return self.p != NULL and self.p.verdict == VERDICT_DROP

    def drop(self):
        """Drop this event's packet: it is not sent, and later NFs do not see it
        (NFs of the same parallel group still do)."""
        self._live("ev.drop")
        if self.bus.nf_drop(self.nf._index, self._pkt()):
            self.bus.nf_drops[self.nf._index] += 1

    def set_src(self, ip=None, port=None):
        """Rewrite the source address and/or port (writer NFs); checksums follow."""
        self._rewrite(0, ip, port)

    def set_dst(self, ip=None, port=None):
        """Rewrite the destination address and/or port (writer NFs); checksums follow."""
        self._rewrite(1, ip, port)

    cdef _rewrite(self, int which, object ip, object port):
        cdef mbx_pkt *p = self._pkt()
        cdef const uint8_t *newb = NULL
        cdef int new_port = -1 if port is None else <uint16_t>port
        cdef bytes raw
        # as drop(): a view kept past its NF's run (stop() included) rewrites nothing
        self._live("ev.set_dst" if which else "ev.set_src")
        if not self.bus.nf_writes >> self.nf._index & 1:
            raise PermissionDenied(
                f"NF {self.nf.name} rewrote a packet but did not declare writes=True "
                "(before the run: it is fixed when the run starts)")
        if p.ip_ver == 0:
            raise MbxError("cannot rewrite addresses of a non-IP packet")
        if ip is not None:
            raw = _packed_address(ip)
            if len(raw) != (4 if p.ip_ver == 4 else 16):
                raise MbxError(f"cannot put {ip} into an IPv{p.ip_ver} header")
            newb = raw
        if pkt_rewrite(p, which, newb, new_port) == REWRITE_NO_PORTS:
            raise MbxError("cannot rewrite the port of a packet without TCP/UDP ports")

    def __getattr__(self, name):
        t = _types[self.m.h.type_idx]
        f = t.fields.get(name)
        if f is None:
            if name in _PACKET_VIEWS:
                # a property of the view that reads the packet raised (there is none),
                # and Python then asks here: say that, not "no field"
                raise AttributeError(f"this {t.name} event carries no packet "
                                     f"(ev.{name} reads it)")
            raise AttributeError(f"{t.name} event has no field {name!r}")
        ip_ver = 0
        if f[1] == "ip" and "ip_ver" in t.fields:
            ip_ver = self.m.body[t.fields["ip_ver"][0]]
        return read_field(self.m.body, f[0], f[1], ip_ver)

    @property
    def snapshot(self):
        """The TCP stack snapshot the event carries, decoded (a dict): the receiver's
        sequence state and both sides' status as of the event.  None on events that
        carry none: those not from the TCP Monitor (the Network Layer's, NFs')."""
        from mbx._tcp import snapshot_decode

        if self.m.h.publisher != 0 or not T_PKT_TCP <= self.m.h.type_idx <= T_DATA_RDY:
            return None
        return snapshot_decode(bytes(self.m.h.snapshot[:23]), self.m.h.ts_ns)

    def read(self, offset=None, length=None, stream_dir=None):
        """Stateless read of delivered TCP stream bytes (paper §6): ``length`` bytes
        at ``offset`` of the stream ``stream_dir`` (0: client -> server).  On a
        DATA_RDY event the defaults are its stream and its new bytes, and a read of
        its stream ends at its frontier.  A zero-copy memoryview where the bytes are
        contiguous in memory, else a copy."""
        self._live("ev.read")
        reader = self.bus.stream_reader
        if reader is None:
            raise MbxError("no TCP Monitor is running: subscribe to DATA_RDY")
        if self.m.h.flow == NO_FLOW:
            raise MbxError(f"a {self.type_name} event has no flow to read")
        rdy = self.m.h.type_idx == T_DATA_RDY
        cdef data_rdy_body *b = <data_rdy_body *>self.m.body
        if stream_dir is None:
            stream_dir = b.stream_dir if rdy else self.m.h.dir
        stream_dir = _stream_arg(self.nf, "read", "stream_dir", stream_dir, 2)
        if offset is None:
            if not rdy:
                raise MbxError("read() needs an offset outside DATA_RDY events")
            offset = b.offset
        offset = _stream_arg(self.nf, "read", "offset", offset, _U64_END)
        if length is None:
            if not rdy:
                raise MbxError("read() needs a length outside DATA_RDY events")
            length = max(0, b.frontier - offset)
        length = _stream_arg(self.nf, "read", "length", length, _U64_END - offset)
        if rdy and stream_dir == b.stream_dir:
            # The stack handles a whole burst before its NFs: the stream may be
            # delivered past this event's frontier already, by as much as the burst
            # held.  A read is judged against the event's frontier, so what it returns
            # or refuses does not depend on the burst's size (those bytes come with
            # the next DATA_RDY).
            if offset > b.frontier:
                raise MbxError(
                    f"NF {self.nf.name}: stream offset {offset} is beyond this "
                    f"DATA_RDY's frontier ({b.frontier}): not delivered yet")
            length = min(length, b.frontier - offset)
            # its own bytes: read even where gaps were joined over them since
            return reader.read_stream(self.m.h.flow, self.m.h.flow_gen, stream_dir,
                                      offset, length, self.m.h.flags, b.offset,
                                      b.frontier)
        return reader.read_stream(self.m.h.flow, self.m.h.flow_gen, stream_dir, offset,
                                  length, self.m.h.flags)

    def write(self, offset, data, stream_dir=None):
        """Rewrite delivered stream bytes in place, same length (writer NFs, on
        DATA_RDY): the stream and this burst's packets carrying them change, their
        checksums follow.  Returns the bytes changed in packets."""
        self._live("ev.write")
        reader = self.bus.stream_reader
        if reader is None:
            raise MbxError("no TCP Monitor is running: subscribe to DATA_RDY")
        cdef data_rdy_body *b = <data_rdy_body *>self.m.body
        cdef bint rdy = self.m.h.type_idx == T_DATA_RDY
        if not self.bus.nf_writes >> self.nf._index & 1:
            raise PermissionDenied(
                f"NF {self.nf.name} rewrote stream bytes but did not declare writes=True "
                "(before the run: it is fixed when the run starts)")
        if stream_dir is None:
            stream_dir = b.stream_dir if rdy else self.m.h.dir
        stream_dir = _stream_arg(self.nf, "write", "stream_dir", stream_dir, 2)
        offset = _stream_arg(self.nf, "write", "offset", offset, _U64_END)
        if rdy and stream_dir == b.stream_dir:     # its own bytes: as read() has them
            return reader.write_stream(self.nf, self.m.h.flow, self.m.h.flow_gen,
                                       stream_dir, offset, data, self.m.h.flags,
                                       b.offset, b.frontier)
        return reader.write_stream(self.nf, self.m.h.flow, self.m.h.flow_gen, stream_dir,
                                   offset, data, self.m.h.flags)

    def fields(self):
        """The type's own fields as a dict (allocates; for logging and tests)."""
        t = _types[self.m.h.type_idx]
        return {name: getattr(self, name) for name in t.fields if not name.startswith("_")}

    def __repr__(self):
        return f"<Event {self.type_name} flow={self.flow} ts={self.m.h.ts_ns}>"


# ---------------------------------------------------------------------------------
# The bus

MERGES = ("any", "all")


def merge_name(merge):
    """How a group's merge reads in messages and graphs: "any", "all", or the merge
    function's name with its file and line."""
    if isinstance(merge, str):
        return merge
    return code_name(merge)


def _verdicts_text(verdicts):
    # what a batch handler returned in place of its flags, in a few words
    dt = getattr(verdicts, "dtype", None)
    shape = getattr(verdicts, "shape", None)
    if dt is not None and dt.names:
        return f"a structured array of {len(dt.names)} fields, shape {shape}"
    if dt is not None:
        return f"an array of {dt}, shape {shape}"
    return f"a {type(verdicts).__name__}"


def code_name(fn):
    """A function of the NF's code by its name, file and line ("B.on_batch (b.py,
    line 5)"): how a message names one that did wrong without raising."""
    if isinstance(fn, functools.partial):
        # some of its arguments bound: named by the function
        fn = fn.func
    name = getattr(fn, "__qualname__", None) or repr(fn)
    code = getattr(fn, "__code__", None)
    if code is None:
        return name
    return f"{name} ({code_place(code.co_filename, code.co_firstlineno)})"


def held_in(exc, nf_name, handler, what):
    """The KeyboardInterrupt that ``exc`` (one) becomes when it stopped an NF's
    handler (a second stop signal, the run held there): its message names the NF,
    the handler, what it was handling and its line, for the user to find the code
    that never returned."""
    held = (f"held in NF {nf_name}: {getattr(handler, '__qualname__', handler)} on a "
            f"{what}{user_code_line(exc)}")
    return KeyboardInterrupt(f"{exc}; {held}" if str(exc) else held)


def _takes_members(fn):
    # A merge function with a keyword-only parameter `members` is given the whole
    # group: the votes alone do not say how many members there are.
    import inspect

    try:
        param = inspect.signature(fn).parameters.get("members")
    except (TypeError, ValueError):
        return False
    return param is not None and param.kind == param.KEYWORD_ONLY


def merge_call(fn, members):
    """The one-argument callable the bus calls for a merge function of the group of
    NFs named ``members``: ``fn`` itself, or ``fn`` with ``members`` bound (the
    frozenset of the group's names) when it declares ``*, members``."""
    if _takes_members(fn):
        return functools.partial(fn, members=frozenset(members))
    return fn


def merge_problem(merge, members):
    """Why ``merge`` cannot merge the verdicts of the group of NFs named ``members``,
    or None.  A merge function is called as ``fn(dropped)``, ``dropped`` the frozenset
    of the names of the members that dropped the packet, and returns true to drop it;
    one with a keyword-only parameter ``members`` as ``fn(dropped, members=...)``, the
    frozenset of the names of all the group's members."""
    import inspect

    if isinstance(merge, str):
        if merge in MERGES:
            return None
        return f"use \"any\", \"all\" or a merge function, not {merge!r}"
    fn = merge
    if not callable(fn):
        return f"{fn!r} is not callable"
    if len(members) < 2:
        return (f"a merge function needs two or more members (NF {members[0]} is "
                "alone)")
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None             # (a builtin without a signature: called as it is)
    try:
        if _takes_members(fn):
            sig.bind(frozenset(), members=frozenset())
        else:
            sig.bind(frozenset())
    except TypeError:
        return (f"{merge_name(fn)} must take one argument (the frozenset of the names "
                f"of the members that dropped the packet), and optionally a "
                f"keyword-only members (all the group's names), not {sig}")
    return None


def group_dependency(nfs):
    """A member of a parallel group that subscribes to what another member publishes,
    said (or None).  Members do not depend on each other: they run side by side
    pipelined, and in either order inline, so one cannot handle another's events.
    Refused for both deployments (the bus; the Controller, so mbx check says it)."""
    for y in nfs:
        if y.group is None:
            continue
        for x in nfs:
            if x is y or x.group != y.group:
                continue
            for p, port in x.pubs.items():
                for t in y.subs:
                    if _types[p].is_a(_types[t]):
                        return (f"NF {y.name} subscribes to {_types[t].name}, which NF "
                                f"{x.name} of its parallel group {y.group!r} publishes "
                                f"(its port {port.type.name}): the members of a group do "
                                f"not depend on each other; put NF {x.name} before the "
                                f"group, or NF {y.name} after it")
    return None


cdef inline void drop_at(mbx_pkt *p, uint8_t stage) noexcept nogil:
    if p.verdict != VERDICT_DROP or stage < p.drop_stage:
        p.drop_stage = stage
    p.verdict = VERDICT_DROP


cdef enum:
    C_RUN_NOGIL = 64        # queued messages past which a C run lets go of the GIL
    # ring entries between where two rings start a burst (reset_pool): 5 cache lines,
    # so 12 rings of a burst's entries share no cache set
    RING_STAGGER = 80
    BATCH_VIEWS_KEPT = 256  # batch lengths whose staging views are kept per type
    NO_MSG = 0xFFFFFFFF     # next_msg: nothing queued up to the limit


cdef inline uint64_t mono_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


cdef extern from *:
    int __builtin_ctz(unsigned int x) noexcept nogil   # x != 0


cdef inline uint32_t flow_set_of(const uint16_t *flow_set, const uint32_t *flow_set_gen,
                                 uint32_t capacity, uint32_t flow,
                                 uint32_t gen) noexcept nogil:
    # An NF's handler set for a flow (its per-flow tables hoisted by the caller, as
    # the hot loops run over many messages of one NF): 0 unless mb_up_sub gave this
    # generation of the slot another.
    if flow_set == NULL or flow >= capacity or flow_set_gen[flow] != gen:
        return 0
    return flow_set[flow]


cdef inline bint side_ok(uint8_t mask, uint8_t flags) noexcept nogil:
    # Unsided messages reach every subscriber; sided ones those whose mask has
    # their (stack, sender/receiver) combination.
    return not (flags & MSG_F_SIDED) or (mask >> (flags & 3)) & 1


cdef inline uint32_t next_msg(EventBus bus, uint32_t i, uint32_t limit,
                              uint32_t *ring) noexcept nogil:
    # NF i's next queued message at a position <= limit (its index, and in ring the
    # ring it heads), or NO_MSG.  With no publications of other NFs queued (the usual
    # case) the stack's ring alone, without next_ring's comparison of the two heads.
    cdef uint32_t rs = 2 * i, cap = bus.msg_capacity, idx
    if bus.qhead[rs + 1] == bus.qtail[rs + 1]:
        if bus.qhead[rs] == bus.qtail[rs]:
            return NO_MSG
        idx = bus.queues[<size_t>rs * cap + (bus.qhead[rs] & (cap - 1))]
        if bus.msgs[idx].h.pos > limit:
            return NO_MSG
        ring[0] = rs
        return idx
    ring[0] = bus.next_ring(i, limit)
    if ring[0] == NO_RING:
        return NO_MSG
    return bus.queues[<size_t>ring[0] * cap + (bus.qhead[ring[0]] & (cap - 1))]


cdef inline bint offer_c(EventBus bus, uint32_t j, mbx_msg *m, mbx_pkt *p,
                         mbx_chandler *c, uint8_t stage, uint64_t *drops) noexcept nogil:
    # Hand m to NF j's C handler c (NULL: none for m's type) unless an earlier stage
    # dropped its packet; True when it did.
    if c == NULL or (p != NULL and p.verdict == VERDICT_DROP and p.drop_stage < stage):
        return False
    if c.fn(c.ctx, m, p) != MBX_PASS and p != NULL and bus.nf_drop(j, p):
        drops[0] += 1
    return True


cdef class EventBus:
    """Event Memory, two input queues per NF, handler tables, and dispatch."""

    def __cinit__(self, nfs, uint32_t flow_capacity=0, uint32_t msg_capacity=65536):
        cdef uint32_t i
        self.closed = True          # until registered as live, below
        nfs = list(nfs)
        if len(nfs) > MAX_NFS:
            raise SubscriptionError(f"at most {MAX_NFS} NFs on one bus, not {len(nfs)}")
        names = [nf.name for nf in nfs]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise SubscriptionError(f"two NFs are named {', '.join(sorted(dup))}")
        if msg_capacity < 64 or msg_capacity & (msg_capacity - 1):
            raise ValueError(f"msg_capacity must be a power of two >= 64, not {msg_capacity}")
        # How a group merges its members' verdicts: "any" (the default) drops a
        # packet one member dropped; "all" only one every member dropped.
        # A merge function decides once every member ran on the packet (merge_votes).
        voting = {}
        deciding = {}
        for g in {nf.group for nf in nfs if nf.group is not None}:
            at = [i for i in range(len(nfs)) if nfs[i].group == g]
            for i in at:
                if nfs[i].writes:
                    # members see each packet at once (pipelined: in parallel), so
                    # a rewrite would race the others' reads
                    raise SubscriptionError(
                        f"NF {nfs[i].name} writes packets and cannot run in the "
                        f"parallel group {g!r}: writers are serialised")
            merges = {id(nfs[i].group_merge): nfs[i].group_merge for i in at}
            merge = next(iter(merges.values()))
            if len(merges) > 1:
                raise SubscriptionError(
                    f"parallel group {g!r}: its NFs must share one merge, \"any\", "
                    f"\"all\" or a merge function, not "
                    f"{', '.join(sorted(merge_name(m) for m in merges.values()))}")
            why = merge_problem(merge, [nfs[i].name for i in at])
            if why is not None:
                raise SubscriptionError(f"parallel group {g!r}: merge: {why}")
            if merge == "all":
                voting[g] = at
            elif not isinstance(merge, str):
                voting[g] = at
                deciding[g] = merge
        why = group_dependency(nfs)
        if why is not None:
            raise SubscriptionError(why)
        self.nfs = nfs
        self.nnf = len(nfs)
        self.thread_id = PyThread_get_thread_ident()
        self.msg_capacity = msg_capacity
        self.flow_capacity = flow_capacity
        self.msgs = <mbx_msg *>PyMem_Calloc(msg_capacity, sizeof(mbx_msg))
        # two rings per NF: events from the stack, and publications of other NFs (not
        # zeroed: an entry is written before it is read, and a run touches only the
        # first pages of each ring, see reset_pool)
        self.queues = <uint32_t *>PyMem_Malloc(2 * max(self.nnf, 1) * msg_capacity * 4)
        self.qhead = <uint32_t *>PyMem_Calloc(2 * MAX_NFS, 4)
        self.qtail = <uint32_t *>PyMem_Calloc(2 * MAX_NFS, 4)
        self.taken = <uint32_t *>PyMem_Malloc(msg_capacity * 4)
        self.sets = <handler_table **>PyMem_Calloc(MAX_NFS, sizeof(handler_table *))
        self.set_batch = <uint16_t ***>PyMem_Calloc(MAX_NFS, sizeof(uint16_t **))
        self.set_side = <uint8_t ***>PyMem_Calloc(MAX_NFS, sizeof(uint8_t **))
        self.set_filter = <filter_table **>PyMem_Calloc(MAX_NFS, sizeof(filter_table *))
        self.set_c = <c_table **>PyMem_Calloc(MAX_NFS, sizeof(c_table *))
        self.nf_has_c = <uint8_t *>PyMem_Calloc(MAX_NFS, 1)
        self.nf_events = <uint64_t *>PyMem_Calloc(MAX_NFS, 8)
        self.nf_c_events = <uint64_t *>PyMem_Calloc(MAX_NFS, 8)
        self.nf_drops = <uint64_t *>PyMem_Calloc(MAX_NFS, 8)
        self.nf_ns = <uint64_t *>PyMem_Calloc(MAX_NFS, 8)
        self.nf_type_events = <uint64_t *>PyMem_Calloc(max(self.nnf, 1) * MAX_TYPES, 8)
        self.timed = True
        self.nf_stage = <uint8_t *>PyMem_Calloc(MAX_NFS, 1)
        self.nf_votemask = <uint32_t *>PyMem_Calloc(MAX_NFS, 4)
        self.nf_fngroup = <uint8_t *>PyMem_Calloc(MAX_NFS, 1)
        self.fn_pending = <uint32_t *>PyMem_Calloc(MAX_NFS, 4)
        self.nsets = <uint32_t *>PyMem_Calloc(MAX_NFS, 4)
        self.flow_set = <uint16_t **>PyMem_Calloc(MAX_NFS, sizeof(uint16_t *))
        self.flow_set_gen = <uint32_t **>PyMem_Calloc(MAX_NFS, sizeof(uint32_t *))
        self.per_type_published = <uint64_t *>PyMem_Calloc(MAX_TYPES, 8)
        self.per_type_delivered = <uint64_t *>PyMem_Calloc(MAX_TYPES, 8)
        self.fan = <uint32_t *>PyMem_Calloc(MAX_TYPES * FAN_N, 4)
        if (self.msgs == NULL or self.queues == NULL or self.sets == NULL
                or self.per_type_delivered == NULL or self.taken == NULL or self.fan == NULL
                or self.set_c == NULL or self.nf_has_c == NULL or self.nf_events == NULL
                or self.nf_c_events == NULL or self.nf_drops == NULL or self.nf_ns == NULL
                or self.nf_type_events == NULL or self.nf_votemask == NULL
                or self.nf_fngroup == NULL or self.fn_pending == NULL):
            raise MemoryError("cannot allocate Event Memory")
        self.set_keys = [{} for _ in nfs]
        self.set_maps = [[] for _ in nfs]
        self.keep = []
        self.views = []
        self.stage = None           # the batch handlers' buffer, made on first use
        self.stage_views = {}
        self.flowtable = None
        self.closed = False
        _live_buses[0] += 1
        for i in range(self.nnf):
            nf = nfs[i]
            if nf._bus is not None:
                raise SubscriptionError(f"NF {nf.name} is already running on another bus")
            nf._bus = self
            nf._index = i
            if nf.writes:
                self.nf_writes |= 1u << i
            self._add_set(i, dict(nf.subs))
            v = Event.__new__(Event)
            (<Event>v).bus = self
            (<Event>v).nf = nf
            self.views.append(v)
        # Chain stages: each NF its own, the NFs of one parallel group the same one (a
        # drop hides a packet from later stages only, so parallel NFs all see it and
        # any drop among them wins).
        cdef uint8_t stage_no = 0
        prev_group = None
        for i in range(self.nnf):
            g = nfs[i].group
            if g is None or g != prev_group:
                stage_no += 1
            self.nf_stage[i] = stage_no
            prev_group = g
        for at in voting.values():
            for i in at:
                self.nf_votemask[i] = sum(1 << j for j in at)
        # per group with a merge function: (name, function, vote mask, chain stage,
        # {vote mask: frozenset of member names}); nf_fngroup is 1 + its index
        self.fn_groups = []
        for g, fn in deciding.items():
            at = voting[g]
            self.fn_groups.append((g, merge_call(fn, [nfs[i].name for i in at]),
                                   self.nf_votemask[at[0]], self.nf_stage[at[0]], {}))
            for i in at:
                self.nf_fngroup[i] = len(self.fn_groups)
        # Waves matter only when an NF subscribes to what another NF publishes.
        self.ordered = False
        for a in nfs:
            for b in nfs:
                if a is not b and any(_types[p].is_a(_types[t]) or _types[t].is_a(_types[p])
                                      for p in a.pubs for t in b.subs):
                    self.ordered = True
        self.global_want = 0
        memset(self.want_side, 0, sizeof(self.want_side))
        for i in range(self.nnf):
            self.want_set(i, 0)
            self.plan_fanout(i)
        self.may_share = True
        self.plan_rings()

    @property
    def timing(self):
        """Clock each NF's handlers (its handler time in the stats).  Off, consecutive
        NFs with only C handlers and the same subscriptions also share one ring and
        one pass over it (see plan_rings): a shared pass has no time of each NF's."""
        return self.timed

    @timing.setter
    def timing(self, bint on):
        cdef uint32_t r
        for r in range(2 * self.nnf):
            if self.qhead[r] != self.qtail[r]:
                raise MbxError("cannot turn handler timing on or off while events are queued")
        self.timed = on
        self.plan_rings()

    def __dealloc__(self):
        cdef uint32_t i, s
        if not self.closed:
            _live_buses[0] -= 1
        if self.sets != NULL:
            for i in range(MAX_NFS):
                if self.sets[i] != NULL:
                    for s in range(self.nsets[i]):
                        PyMem_Free(self.sets[i][s])
                        PyMem_Free(self.set_batch[i][s])
                        PyMem_Free(self.set_side[i][s])
                        PyMem_Free(self.set_filter[i][s])
                        PyMem_Free(self.set_c[i][s])
                    PyMem_Free(self.sets[i])
                    PyMem_Free(self.set_c[i])
                    PyMem_Free(self.set_batch[i])
                    PyMem_Free(self.set_side[i])
                    PyMem_Free(self.set_filter[i])
                PyMem_Free(self.flow_set[i])
                PyMem_Free(self.flow_set_gen[i])
        PyMem_Free(self.sets)
        PyMem_Free(self.set_batch)
        PyMem_Free(self.set_side)
        PyMem_Free(self.set_filter)
        PyMem_Free(self.set_c)
        PyMem_Free(self.nf_has_c)
        PyMem_Free(self.nf_events)
        PyMem_Free(self.nf_c_events)
        PyMem_Free(self.nf_drops)
        PyMem_Free(self.nf_ns)
        PyMem_Free(self.nf_type_events)
        PyMem_Free(self.nf_stage)
        PyMem_Free(self.nf_votemask)
        PyMem_Free(self.nf_fngroup)
        PyMem_Free(self.fn_pending)
        PyMem_Free(self.nsets)
        PyMem_Free(self.flow_set)
        PyMem_Free(self.flow_set_gen)
        if not self.msgs_shared:
            PyMem_Free(self.msgs)
        PyMem_Free(self.queues)
        PyMem_Free(self.qhead)
        PyMem_Free(self.qtail)
        PyMem_Free(self.taken)
        PyMem_Free(self.per_type_published)
        PyMem_Free(self.per_type_delivered)
        PyMem_Free(self.fan)

    def close(self):
        """Detach the NFs so they can run again on another bus, and let go of what
        points back at it (the handlers' Event views, the TCP Monitor that reads
        streams for them): a run's Stack Memory and Event Memory are freed as soon
        as nothing uses them, not at the next full garbage collection, which the
        size of those buffers does not hasten (each run of an App in one process
        held another 10 MiB until then)."""
        if not self.closed:
            self.closed = True
            _live_buses[0] -= 1
        self.views = []
        self.stream_reader = None
        for nf in self.nfs:
            if nf._bus is self:
                nf._bus = None
                nf._index = -1

    cdef uint32_t _add_set(self, uint32_t nf, dict mapping) except? 0xFFFFFFFF:
        # Interned: flows that share a subscription pattern share one table.  Handlers
        # compare by equality: ``self.on_data`` is a new bound method object at each
        # up_sub, equal to the last, and must not make a set per flow.
        key = frozenset((k, _handler_key(h), b, sm) for k, (h, b, sm) in mapping.items())
        nf_obj = self.nfs[nf]
        found = self.set_keys[nf].get(key)
        if found is not None:
            return found
        cdef uint32_t s = self.nsets[nf]
        if s >= 0xFFFF:
            raise SubscriptionError(
                f"NF {self.nfs[nf].name}: too many distinct per-flow subscription sets")
        cdef void **table = <void **>PyMem_Calloc(MAX_TYPES, sizeof(void *))
        cdef uint16_t *btab = <uint16_t *>PyMem_Calloc(MAX_TYPES, 2)
        cdef uint8_t *stab = <uint8_t *>PyMem_Calloc(MAX_TYPES, 1)
        cdef filter_table ftab = <filter_table>PyMem_Calloc(MAX_TYPES, sizeof(filter_ptr))
        cdef c_table ctab = <c_table>PyMem_Calloc(MAX_TYPES, sizeof(c_entry))
        if table == NULL or btab == NULL or stab == NULL or ftab == NULL or ctab == NULL:
            raise MemoryError()
        self.sets[nf] = <handler_table *>PyMem_Realloc(self.sets[nf],
                                                       (s + 1) * sizeof(handler_table))
        self.set_batch[nf] = <uint16_t **>PyMem_Realloc(self.set_batch[nf],
                                                        (s + 1) * sizeof(uint16_t *))
        self.sets[nf][s] = table
        self.set_batch[nf][s] = btab
        self.set_side[nf] = <uint8_t **>PyMem_Realloc(self.set_side[nf],
                                                      (s + 1) * sizeof(uint8_t *))
        self.set_side[nf][s] = stab
        self.set_filter[nf] = <filter_table *>PyMem_Realloc(
            self.set_filter[nf], (s + 1) * sizeof(filter_table))
        self.set_filter[nf][s] = ftab
        self.set_c[nf] = <c_table *>PyMem_Realloc(self.set_c[nf], (s + 1) * sizeof(c_table))
        self.set_c[nf][s] = ctab
        self.nsets[nf] = s + 1
        # Resolve every type to its most specific subscribed ancestor.
        for t in _types:
            a = t
            while a is not None and a.idx not in mapping:
                a = a.parent
            if a is None:
                continue
            handler, batch, smask = mapping[a.idx]
            if handler is None:
                continue
            self.keep.append(handler)
            table[t.idx] = <void *>handler
            if t.idx == T_DATA_RDY:
                # One DATA_RDY per frontier move, flagged as the receiving endpoint's
                # sender-side update (the default "sender" takes every stream): the
                # receiver's stack is that endpoint's too, so "receiver" (and the
                # receiver-side half of "client"/"server") means the same streams.
                smask = smask | (smask >> 2)
            stab[t.idx] = smask
            flt = nf_obj.filters.get(a.idx, nf_obj.filters.get(None))
            if flt is not None:
                self.keep.append(flt)
                ftab[t.idx] = &(<Filter>flt).f
            if isinstance(handler, CHandler):
                ctab[t.idx] = &(<CHandler>handler).c
                self.nf_has_c[nf] = 1
            else:
                self.nf_has_py[nf] = 1
                if batch:
                    btab[t.idx] = a.idx + 1
                    # numpy (about 80 ms to import), the staging buffer and the
                    # record type now, when the subscription is planned (before
                    # the run), not while the first packet waits
                    self._make_stage()
                    _types[a.idx].dtype
        self.set_keys[nf][key] = s
        self.set_maps[nf].append(mapping)
        return s

    cdef void attach_batch(self, Batch batch):
        self.batch = batch
        self.pkts = batch.pkts

    def attach_flowtable(self, flowtable, uint32_t capacity):
        self.flowtable = flowtable
        self.flow_capacity = capacity

    cdef uint32_t handler_set(self, uint32_t nf, uint32_t flow, uint32_t gen) noexcept nogil:
        return flow_set_of(self.flow_set[nf], self.flow_set_gen[nf], self.flow_capacity,
                           flow, gen)

    cdef bint wants(self, uint16_t type_idx, uint32_t flow, uint32_t gen,
                    uint8_t flags) noexcept nogil:
        # publish's plan (plan_fanout) answers for the NFs whose handler set does
        # not depend on the flow; the others' tables are asked for this flow.
        # global_want covers the built-in types only (want_set), so the short cut
        # must not answer for a type NFs registered.
        cdef uint32_t i, s
        if type_idx < T_BUILTIN_N and (not (self.global_want >> type_idx) & 1
                                       or not side_ok(self.want_side[type_idx], flags)):
            return False
        cdef const uint32_t *fan = self.fan + <size_t>type_idx * FAN_N
        if fan[flags & 3] if flags & MSG_F_SIDED else fan[FAN_UNSIDED]:
            return True
        cdef uint32_t check = fan[FAN_CHECK]
        while check:
            i = <uint32_t>__builtin_ctz(check)
            check &= check - 1
            s = self.handler_set(i, flow, gen)
            if (self.sets[i][s][type_idx] != NULL
                    and side_ok(self.set_side[i][s][type_idx], flags)):
                return True
        return False

    cdef mbx_msg *new_msg(self, uint16_t type_idx, uint64_t type_id, int64_t ts_ns,
                          uint32_t flow, uint32_t gen, uint32_t pkt, uint8_t dir,
                          uint16_t publisher, uint32_t pos) noexcept nogil:
        if self.msg_used >= self.msg_capacity:
            return NULL
        cdef mbx_msg *m = &self.msgs[self.msg_used]
        self.msg_used += 1
        msg_header(m, type_idx, type_id, ts_ns, flow, gen, pkt, dir, publisher, pos, 0)
        return m

    cdef void publish(self, mbx_msg *m) noexcept nogil:
        cdef uint32_t i, s, r, pos
        cdef uint32_t *queues = self.queues
        cdef uint32_t *qtail = self.qtail
        cdef uint32_t idx = <uint32_t>(m - self.msgs)
        cdef uint32_t cap = self.msg_capacity, mask = cap - 1
        cdef uint32_t flow = m.h.flow, gen = m.h.flow_gen, fcap = self.flow_capacity
        cdef uint16_t t = m.h.type_idx
        cdef uint8_t flags = m.h.flags
        cdef uint32_t from_nf = m.h.publisher != PUBLISHER_STACK
        cdef uint16_t refs = 0
        cdef filter_ptr f
        cdef const uint32_t *fan = self.fan + <size_t>t * FAN_N
        cdef uint32_t check = fan[FAN_CHECK]
        # the NFs that take m: those the plan names for its side, and those whose
        # tables must say (per-flow sets, filters); an NF does not receive its own
        # publications
        cdef uint32_t take = (fan[flags & 3] if flags & MSG_F_SIDED
                              else fan[FAN_UNSIDED]) | check
        take &= self.ring_mask          # NFs sharing a ring take it from there
        if from_nf:
            take &= ~((<uint32_t>1) << (m.h.publisher - 1))
        if check == 0:
            # The usual case: the plan decided every taker, so each is one ring
            # entry (a loop that also asks tables keeps fewer of its values in
            # registers, about twice the instructions per NF)
            while take:
                r = 2 * <uint32_t>__builtin_ctz(take) + from_nf
                take &= take - 1
                pos = qtail[r]
                queues[<size_t>r * cap + (pos & mask)] = idx
                qtail[r] = pos + 1
                refs += 1
        while take:
            i = <uint32_t>__builtin_ctz(take)
            take &= take - 1
            if (check >> i) & 1:
                s = flow_set_of(self.flow_set[i], self.flow_set_gen[i], fcap, flow, gen)
                if (self.sets[i][s][t] == NULL
                        or not side_ok(self.set_side[i][s][t], flags)):
                    continue
                f = self.set_filter[i][s][t]
                if f != NULL and not self.passes(f, m):
                    continue
            r = 2 * i + from_nf
            pos = qtail[r]              # read once: the store below may alias it
            queues[<size_t>r * cap + (pos & mask)] = idx
            qtail[r] = pos + 1
            refs += 1
        m.h.refs += refs
        self.published += 1
        self.per_type_published[t] += 1
        if m.h.refs and m.h.pkt != NO_PKT:
            self.pkts[m.h.pkt].refs += 1

    cdef bint passes(self, const mbx_filter *f, const mbx_msg *m) noexcept nogil:
        # A PKT event: its packet's headers as they are.  A FLOW event: its flow's
        # (client as source, server as destination).  Any other event with a packet
        # (DATA_RDY, an NF's own types): that packet's headers seen as the flow sees
        # them, from the client; a stream event rides on either direction's packet
        # (the server's ACK that proves the client's hole), and a filter that asks
        # for connections to port 80 must not lose the ones the server carried.
        cdef const mbx_pkt *p
        cdef const flow_body *b
        cdef uint64_t family = m.h.type_id & 0xFFFF
        if family == (<uint64_t>_FLOW_ID & 0xFFFF):
            b = <const flow_body *>m.body
            return filter_match(f, b.proto, b.ip_ver, b.cli_addr, b.srv_addr, b.cli_port,
                                b.srv_port)
        if m.h.pkt == NO_PKT:
            return True
        p = &self.pkts[m.h.pkt]
        if family == (<uint64_t>_PKT_ID & 0xFFFF) or p.dir == 0:
            return filter_match(f, p.l4_proto, p.ip_ver, p.src.b, p.dst.b, p.sport, p.dport)
        return filter_match(f, p.l4_proto, p.ip_ver, p.dst.b, p.src.b, p.dport, p.sport)

    cdef void release(self, mbx_msg *m) noexcept nogil:
        m.h.refs -= 1
        if m.h.refs == 0 and m.h.pkt != NO_PKT:
            self.pkts[m.h.pkt].refs -= 1

    cdef void reset_pool(self) noexcept nogil:
        cdef uint32_t r
        self.msg_used = 0
        # The rings are empty after dispatch: start each over at the same place, so
        # the next burst's entries land in the cache lines this one used.  Left
        # running, the positions sweep every ring's whole region (4 bytes x
        # msg_capacity, two rings per NF: 3 MB for a chain of 6) and push the flow
        # table and the TCP state out of the cache.  The places are staggered: the
        # regions are a power of two apart, so rings all starting at their tops
        # would fall in the same cache sets and evict each other.
        for r in range(2 * self.nnf):
            if self.qhead[r] == self.qtail[r]:
                self.qhead[r] = (r * RING_STAGGER) & (self.msg_capacity - 1)
                self.qtail[r] = self.qhead[r]
        if self.replan:
            self.plan_rings()

    cpdef uint32_t burst_mark(self):
        """A mark for the burst just processed (see ``burst_done``)."""
        return 0

    cpdef bint burst_done(self, Batch batch, uint32_t mark, bint wait) except -1:
        """Is every NF done with ``batch`` (processed up to ``mark``), so its verdicts
        are final and it may be sent?  ``wait``: block until it is.  Inline, dispatch
        returns only when it is."""
        return True

    @property
    def msg_used_now(self):
        return self.msg_used

    def publish_from(self, nf, Message msg not None):
        """An NF's publication: into Event Memory and to its subscribers."""
        cdef mbx_msg *cur = NULL
        cdef uint32_t flow = msg.m.h.flow, gen = msg.m.h.flow_gen, pkt = NO_PKT, pos = 0
        cdef int64_t ts = msg.m.h.ts_ns
        cdef uint8_t dir = msg.m.h.dir
        if self.current_msg_idx is not None:
            cur = &self.msgs[<uint32_t>self.current_msg_idx]
            pkt = cur.h.pkt
            pos = cur.h.pos
            if msg.flow is None:
                flow = cur.h.flow
                gen = cur.h.flow_gen
                dir = cur.h.dir
            if ts == 0:
                ts = cur.h.ts_ns
        if msg.flow is not None:
            flow = <uint32_t>(msg.flow & 0xFFFFFFFF)
            gen = <uint32_t>(msg.flow >> 32)
        cdef mbx_msg *m = self.new_msg(msg.m.h.type_idx, msg.m.h.type_id, ts, flow, gen,
                                       pkt, dir, nf._index + 1, pos)
        if m == NULL:
            raise MbxError(f"NF {nf.name}: {self.full_text()}; raise msg_capacity, "
                           "unless NFs publish to each other in a loop (mbx check "
                           "warns of one)")
        memcpy(m.body, msg.m.body, MSG_BODY_SIZE)
        self.publish(m)

    def full_text(self):
        """What filled up when an NF's publication found no message free."""
        return f"Event Memory is full ({self.msg_capacity} messages)"

    def up_sub(self, uint32_t nf, etype, flow, handler, bint batch, uint8_t smask):
        if flow is None:
            raise SubscriptionError(f"NF {self.nfs[nf].name}: up_sub needs a flow id")
        if isinstance(flow, bool) or not isinstance(flow, int) or not 0 <= flow < 1 << 64:
            raise SubscriptionError(f"NF {self.nfs[nf].name}: up_sub({etype.name}): "
                                    f"{flow!r} is not a flow id (an event's ev.flow)")
        cdef uint32_t slot = <uint32_t>(flow & 0xFFFFFFFF)
        cdef uint32_t gen = <uint32_t>(flow >> 32)
        if slot >= self.flow_capacity:
            raise SubscriptionError(f"NF {self.nfs[nf].name}: {flow} is not a flow id")
        if self.flow_set[nf] == NULL:
            self.flow_set[nf] = <uint16_t *>PyMem_Calloc(self.flow_capacity, 2)
            self.flow_set_gen[nf] = <uint32_t *>PyMem_Calloc(self.flow_capacity, 4)
            if self.flow_set[nf] == NULL or self.flow_set_gen[nf] == NULL:
                raise MemoryError()
            self.plan_fanout(nf)        # its handler set now depends on the flow
        cdef uint32_t cur = self.handler_set(nf, slot, gen)
        mapping = dict(self.set_maps[nf][cur])
        mapping[etype.idx] = (handler, batch, smask)
        cdef uint32_t s = self._add_set(nf, mapping)
        self.flow_set[nf][slot] = s
        self.flow_set_gen[nf][slot] = gen
        # a type no NF wanted by default may be wanted now, for this flow (wants()
        # still asks per flow)
        self.want_set(nf, s)
        if self.nf_shares[nf] or self.nf_sharers[nf]:
            self.plan_rings()           # nf now has a plan of its own

    cdef void plan_fanout(self, uint32_t nf) noexcept:
        # Where publish sends NF nf's messages without asking its tables: a type its
        # default set takes, per side combination, unless a filter must judge each
        # message; an NF with per-flow sets is asked per message for every type.
        cdef uint32_t t, c, bit = (<uint32_t>1) << nf
        cdef uint32_t *fan
        cdef bint dynamic = self.flow_set[nf] != NULL
        for t in range(MAX_TYPES):
            fan = self.fan + <size_t>t * FAN_N
            for c in range(FAN_N):
                fan[c] &= ~bit
            if dynamic or self.set_filter[nf][0][t] != NULL:
                fan[FAN_CHECK] |= bit
            elif self.sets[nf][0][t] != NULL:
                for c in range(4):
                    if side_ok(self.set_side[nf][0][t], MSG_F_SIDED | c):
                        fan[c] |= bit
                fan[FAN_UNSIDED] |= bit

    cdef void plan_rings(self) noexcept nogil:
        # NFs that take the same events the same way need not each have them queued
        # and looped over: consecutive NFs with only C handlers and the same plan
        # for every type and side (no filters, no per-flow sets) and no merge
        # function between them share the first one's ring, and _run_shared hands
        # each event to each of them in chain order.  Not when each NF's handler
        # time is clocked (a shared pass has no time of each NF's), not when NFs
        # take NF publications (dispatch's waves), not pipelined (may_share: there
        # each NF has its own process and ring).
        cdef uint32_t i, j, k, t, c, r, idx, pos, ls, js, lead = 0
        cdef uint32_t cap = self.msg_capacity, mask = cap - 1
        cdef uint32_t lbit, ibit, col
        cdef const uint32_t *fan
        cdef bint same
        # NFs leaving a group (an mb_up_sub gave one a plan of its own) get what
        # the group's ring still holds for them
        for i in range(self.nnf):
            ls = 2 * i
            for j in range(i + 1, i + 1 + self.nf_sharers[i]):
                js = 2 * j
                k = self.qhead[ls]
                while k != self.qtail[ls]:
                    idx = self.queues[<size_t>ls * cap + (k & mask)]
                    pos = self.qtail[js]
                    self.queues[<size_t>js * cap + (pos & mask)] = idx
                    self.qtail[js] = pos + 1
                    self.msgs[idx].h.refs += 1
                    k += 1
            self.nf_sharers[i] = 0
        memset(self.nf_shares, 0, MAX_NFS)
        self.ring_mask = 0xFFFFFFFF
        self.replan = False
        if self.timed or self.ordered or not self.may_share:
            return
        for i in range(1, self.nnf):
            lbit = (<uint32_t>1) << lead
            ibit = (<uint32_t>1) << i
            same = (not self.nf_has_py[lead] and not self.nf_has_py[i]
                    and self.nf_has_c[lead] and self.nf_has_c[i]
                    and self.flow_set[lead] == NULL and self.flow_set[i] == NULL
                    and not self.nf_fngroup[lead] and not self.nf_fngroup[i])
            t = 0
            while same and t < MAX_TYPES:
                fan = self.fan + <size_t>t * FAN_N
                if (fan[FAN_CHECK] & (lbit | ibit)) != 0:
                    same = False
                for c in range(FAN_N):
                    col = fan[c]
                    if ((col & lbit) != 0) != ((col & ibit) != 0):
                        same = False
                t += 1
            if same:
                # only between bursts (rings empty): entries queued before would
                # not be the new member's
                for k in range(4):
                    r = 2 * (lead if k < 2 else i) + (k & 1)
                    if self.qhead[r] != self.qtail[r]:
                        same = False
                if not same:
                    self.replan = True
            if same:
                self.nf_sharers[lead] += 1
                self.nf_shares[i] = 1
                self.ring_mask &= ~ibit
            else:
                lead = i

    cdef void want_set(self, uint32_t nf, uint32_t s) noexcept:
        # What the stack may skip building: the built-in types and sides no handler
        # set of any NF takes (wants() asks per flow only past these).
        cdef uint32_t t
        for t in range(T_BUILTIN_N):
            if self.sets[nf][s][t] != NULL:
                self.global_want |= (<uint64_t>1) << t
                self.want_side[t] |= self.set_side[nf][s][t]

    cdef uint32_t next_ring(self, uint32_t i, uint32_t limit) noexcept nogil:
        # Which of NF i's two rings (stack events, NF publications) holds its next
        # message at a position <= limit: the lower position first, the stack's on a
        # tie (an NF's publication follows the event it answers).  NO_RING if none.
        cdef uint32_t rs = 2 * i, rp = 2 * i + 1, mask = self.msg_capacity - 1
        cdef uint32_t best = NO_RING, pos_s = 0, pos_p
        if self.qhead[rs] != self.qtail[rs]:
            pos_s = self.msgs[self.queues[rs * self.msg_capacity
                                          + (self.qhead[rs] & mask)]].h.pos
            if pos_s <= limit:
                best = rs
        if self.qhead[rp] != self.qtail[rp]:
            pos_p = self.msgs[self.queues[rp * self.msg_capacity
                                          + (self.qhead[rp] & mask)]].h.pos
            if pos_p <= limit and (best == NO_RING or pos_p < pos_s):
                best = rp
        return best

    cdef uint32_t pop(self, uint32_t r) noexcept nogil:
        cdef uint32_t idx = self.queues[r * self.msg_capacity
                                        + (self.qhead[r] & (self.msg_capacity - 1))]
        self.qhead[r] += 1
        return idx

    cpdef dispatch(self):
        """Deliver every queued message until all are done.

        Chain order per packet: in waves of increasing position (the packet whose
        processing published a message), every NF in chain order handles what it
        has up to that position, so an event an NF publishes while handling packet k
        reaches the NFs after it before their events of packet k+1.  When no NF
        subscribes to another NF's publications the waves change nothing, and each
        NF drains its whole queue at once (larger batches).
        """
        cdef uint32_t i, j, r, wave, pos, queued
        cdef uint8_t g
        cdef uint32_t mask = self.msg_capacity - 1
        outer = getattr(_dispatching, "nf", None)   # a run inside a handler: restored
        try:
            while True:
                wave = NO_RING
                for r in range(2 * self.nnf):
                    if self.qhead[r] != self.qtail[r]:
                        pos = self.msgs[self.queues[r * self.msg_capacity
                                                    + (self.qhead[r] & mask)]].h.pos
                        if pos < wave:
                            wave = pos
                if wave == NO_RING:
                    break
                if not self.ordered:
                    wave = NO_RING - 1
                i = 0
                while i < self.nnf:
                    if not self.nf_has_py[i]:
                        # NFs with only C handlers, i up to j: each one's C run is its
                        # whole drain, and needs neither its Python objects nor the
                        # GIL, which the stretch lets go of once when it has enough
                        # to do (a stretch ends where a merge function must decide)
                        j = i
                        queued = 0
                        while True:
                            queued += (self.qtail[2 * j] - self.qhead[2 * j]
                                       + self.qtail[2 * j + 1] - self.qhead[2 * j + 1])
                            j += 1
                            if (j == self.nnf or self.nf_has_py[j]
                                    or (self.nf_fngroup[j - 1]
                                        and self.nf_fngroup[j] != self.nf_fngroup[j - 1])):
                                break
                        if queued >= C_RUN_NOGIL:
                            with nogil:
                                self._run_cs(i, j, wave)
                        elif queued:
                            self._run_cs(i, j, wave)
                        i = j - 1
                    elif self.next_ring(i, wave) != NO_RING:
                        _dispatching.nf = self.nfs[i]
                        self._drain(i, wave)
                    g = self.nf_fngroup[i]
                    if g and self.fn_pending[g - 1] and (
                            i + 1 == self.nnf or self.nf_fngroup[i + 1] != g):
                        # the group's last member is done up to the wave, so every
                        # member has run on what it voted on: its merge function
                        # decides, before a later stage sees the packets
                        _dispatching.nf = None
                        self.merge_votes(g - 1)
                    i += 1
        finally:
            _dispatching.nf = outer
            self.current_msg_idx = None

    cdef _drain(self, uint32_t i, uint32_t limit):
        cdef uint32_t idx, s, r
        cdef mbx_msg *m
        cdef mbx_pkt *p
        cdef void *h
        cdef uint16_t bt
        # With timing on, a run of per-event calls is clocked as a whole: one reading
        # before its first call and one after its last (the dispatch between the
        # calls, NF i's own, counts as its time); two readings per call cost about
        # 40 ns, as much as the rest of a call's dispatch.
        cdef uint64_t t_run = 0
        cdef bint timing = self.timed
        cdef bint has_c = self.nf_has_c[i]
        cdef Event view = <Event>self.views[i]
        nf = self.nfs[i]
        while True:
            if has_c:
                if t_run:
                    self.nf_ns[i] += mono_ns() - t_run
                    t_run = 0
                # C handlers first: the run at the head of the queue goes in one C
                # loop, without the GIL when it is long enough to pay for letting go
                if (self.qtail[2 * i] - self.qhead[2 * i] + self.qtail[2 * i + 1]
                        - self.qhead[2 * i + 1]) >= C_RUN_NOGIL:
                    with nogil:
                        self._run_c_timed(i, limit)
                else:
                    self._run_c_timed(i, limit)
            r = self.next_ring(i, limit)
            if r == NO_RING:
                if t_run:
                    self.nf_ns[i] += mono_ns() - t_run
                break
            idx = self.pop(r)
            m = &self.msgs[idx]
            p = NULL if m.h.pkt == NO_PKT else &self.pkts[m.h.pkt]
            if p != NULL and p.verdict == VERDICT_DROP and p.drop_stage < self.nf_stage[i]:
                self.release(m)
                continue
            if self.skip != NULL and self.skip[idx]:
                self.release(m)
                continue
            s = self.handler_set(i, m.h.flow, m.h.flow_gen)
            h = self.sets[i][s][m.h.type_idx]
            if h == NULL or not side_ok(self.set_side[i][s][m.h.type_idx], m.h.flags):
                self.release(m)         # unsubscribed for this flow since it was queued
                continue
            bt = self.set_batch[i][s][m.h.type_idx]
            if bt:
                if t_run:
                    self.nf_ns[i] += mono_ns() - t_run
                    t_run = 0
                self._run_batch(i, idx, h, bt, limit)
                continue
            view.m = m
            view.p = p
            self.current_msg_idx = idx
            self.per_type_delivered[m.h.type_idx] += 1
            self.delivered += 1
            self.nf_events[i] += 1
            self.nf_type_events[<size_t>i * MAX_TYPES + m.h.type_idx] += 1
            if timing and t_run == 0:
                t_run = mono_ns()
            try:
                (<object>h)(view)
            except (Exception, SystemExit) as exc:  # sys.exit() in a handler too
                self.handler_failed(i, p)
                self.release(m)
                raise NFError(
                    f"NF {nf.name}: {getattr(<object>h, '__qualname__', <object>h)} raised "
                    f"{type(exc).__name__} on a {_types[m.h.type_idx].name} event"
                    f"{': ' if str(exc) else ''}{exc}{user_code_line(exc)}") from exc
            except KeyboardInterrupt as exc:
                # a second stop signal that found the run held in this handler (one
                # that never returns): the error names it, as a handler's own does
                self.release(m)
                raise held_in(exc, nf.name, <object>h,
                              _types[m.h.type_idx].name + " event") from exc
            self.release(m)

    cdef void handler_failed(self, uint32_t i, mbx_pkt *p) noexcept nogil:
        # Inline a handler's error ends the run: nothing more is sent.
        pass

    cdef bint nf_drop(self, uint32_t i, mbx_pkt *p) noexcept nogil:
        # NF i drops p: at once, or (a merge = "all" group) once its last member has,
        # or (a group with a merge function) as the function decides (merge_votes).
        # Its bit in p.votes says it did, in every case: a dead NF's stand-in (the
        # pipelined stack) counts as its drops only the packets it had not dropped
        # itself, which the verdict cannot tell where group mates drop too.  True
        # the first time NF i drops p: its drops count packets, not calls (drop()
        # twice, or a drop on each of a packet's events).  Only NF i sets its bit,
        # so testing it before the atomic vote races nothing.
        cdef uint32_t bit = (<uint32_t>1) << i
        cdef uint32_t mask = self.nf_votemask[i]
        if p.votes & bit:
            return False
        cdef uint32_t votes = mbx_vote(&p.votes, bit)
        if mask == 0:
            drop_at(p, self.nf_stage[i])
        elif self.nf_fngroup[i]:
            self.fn_pending[self.nf_fngroup[i] - 1] += 1
        elif votes & mask == mask:
            drop_at(p, self.nf_stage[i])
        return True

    cdef int merge_votes(self, uint32_t g) except -1:
        # Inline: every packet of the burst some member of group g voted to drop.
        cdef uint32_t j
        name, fn, mask, stage, names = self.fn_groups[g]
        self.fn_pending[g] = 0
        for j in range(self.batch.count):
            if self.pkts[j].votes & <uint32_t>mask:
                self.merge_packet(name, fn, names, mask, stage, &self.pkts[j])
        return 0

    cdef int merge_packet(self, object group, object fn, dict names, uint32_t mask,
                          uint8_t stage, mbx_pkt *p) except -1:
        # A group's merge function (an entry of fn_groups, unpacked once per run of
        # packets) decides p from its members' votes, which are then cleared
        # (decided once).  Its error ends the run, as a handler's does.
        cdef uint32_t votes = p.votes & mask
        p.votes &= ~mask
        dropped = names.get(votes)
        if dropped is None:
            dropped = frozenset(self.nfs[i].name for i in range(self.nnf)
                                if (votes >> i) & 1)
            names[votes] = dropped
        try:
            verdict = fn(dropped)
        except Exception as exc:
            drop_at(p, stage)
            raise NFError(
                f"parallel group {group!r}: merge function {merge_name(fn)} raised "
                f"{type(exc).__name__} on a packet dropped by "
                f"{', '.join(sorted(dropped))}: {exc}") from exc
        try:
            drop = bool(verdict)
        except Exception as exc:
            # (a numpy array of two or more is neither true nor false)
            drop_at(p, stage)
            raise NFError(
                f"parallel group {group!r}: merge function {merge_name(fn)} returned "
                f"{type(verdict).__name__}, which is neither true nor false (a drop "
                f"verdict is a bool): {exc_text(exc)}") from exc
        if drop:
            drop_at(p, stage)
        return 0

    cdef void _run_cs(self, uint32_t first, uint32_t end, uint32_t limit) noexcept nogil:
        # The C runs of NFs first..end-1 (each with only C handlers), in chain order,
        # clocked (with timing on) by one reading between two NFs' runs.
        cdef uint32_t i
        cdef uint64_t t0, t1
        if not self.timed:
            i = first
            while i < end:
                if self.nf_sharers[i]:
                    self._run_shared(i, i + 1 + self.nf_sharers[i], limit)
                    i += 1 + self.nf_sharers[i]
                else:
                    self._run_c(i, limit)
                    i += 1
            return
        t0 = mono_ns()
        for i in range(first, end):
            if self._run_c(i, limit):
                t1 = mono_ns()
                self.nf_ns[i] += t1 - t0
                t0 = t1

    cdef void _run_c_timed(self, uint32_t i, uint32_t limit) noexcept nogil:
        # NF i's C run, clocked when timing is on.
        cdef uint64_t t0
        if not self.timed:
            self._run_c(i, limit)
            return
        t0 = mono_ns()
        if self._run_c(i, limit):
            self.nf_ns[i] += mono_ns() - t0

    cdef uint32_t _run_c(self, uint32_t i, uint32_t limit) noexcept nogil:
        # Deliver from the head of NF i's queue every message bound for a C handler
        # (and let go of those nobody takes any more: dropped earlier in the chain,
        # filtered, unsubscribed), up to the first one a Python handler takes.
        # This loop is what each NF of a chain of C NFs costs per event: NF i's
        # tables and queues are looked up once here, not per message.
        cdef uint32_t r, idx, s, n = 0, h
        cdef uint32_t cap = self.msg_capacity, mask = cap - 1
        cdef uint32_t rs = 2 * i, rp = 2 * i + 1
        cdef const uint32_t *qs = self.queues + <size_t>rs * cap
        cdef handler_table *sets = self.sets[i]
        cdef c_table *csets = self.set_c[i]
        cdef uint8_t **sides = self.set_side[i]
        cdef const uint16_t *fset = self.flow_set[i]
        cdef const uint32_t *fgen = self.flow_set_gen[i]
        cdef uint32_t fcap = self.flow_capacity
        cdef const uint8_t *skip = self.skip
        cdef mbx_msg *msgs = self.msgs
        cdef mbx_pkt *pkts = self.pkts
        cdef uint64_t *delivered = self.per_type_delivered
        cdef uint16_t t
        cdef mbx_msg *m
        cdef mbx_pkt *p
        cdef mbx_chandler *c
        cdef uint8_t stage = self.nf_stage[i]
        cdef uint64_t drops = 0
        cdef uint64_t *tev = self.nf_type_events + <size_t>i * MAX_TYPES
        cdef uint32_t end
        cdef c_table cset0
        cdef uint16_t run_t = 0
        cdef uint64_t run_n = 0
        if fset == NULL and skip == NULL and self.qhead[rp] == self.qtail[rp]:
            # The usual case, lean: NF i has only its default handlers (no mb_up_sub
            # yet) and only stack events are queued, so publish's plan already chose
            # every message in its ring for this NF's side and filters; what is left
            # to ask per message is whether its handler is C and whether an earlier
            # stage dropped its packet.
            cset0 = csets[0]
            h = self.qhead[rs]
            end = self.qtail[rs]
            while h != end:
                m = &msgs[qs[h & mask]]
                if m.h.pos > limit:
                    break
                t = m.h.type_idx
                c = cset0[t]
                if c == NULL and sets[0][t] != NULL:
                    break               # a Python handler's: _drain takes it
                h += 1
                p = NULL if m.h.pkt == NO_PKT else &pkts[m.h.pkt]
                if c != NULL and (p == NULL or p.verdict != VERDICT_DROP
                                  or p.drop_stage >= stage):
                    # counted per run of one type: a counter in memory bumped per
                    # message would chain every iteration to the last one's store
                    if t != run_t:
                        if run_n:
                            delivered[run_t] += run_n
                            tev[run_t] += run_n
                        run_t = t
                        run_n = 0
                    run_n += 1
                    n += 1
                    if c.fn(c.ctx, m, p) != MBX_PASS and p != NULL and self.nf_drop(i, p):
                        drops += 1
                m.h.refs -= 1           # release(m), inline
                if m.h.refs == 0 and p != NULL:
                    p.refs -= 1
            self.qhead[rs] = h
            if run_n:
                delivered[run_t] += run_n
                tev[run_t] += run_n
        else:
            while True:
                idx = next_msg(self, i, limit, &r)
                if idx == NO_MSG:
                    break
                m = &msgs[idx]
                t = m.h.type_idx
                p = NULL if m.h.pkt == NO_PKT else &pkts[m.h.pkt]
                s = flow_set_of(fset, fgen, fcap, m.h.flow, m.h.flow_gen)
                c = csets[s][t]
                if ((p != NULL and p.verdict == VERDICT_DROP and p.drop_stage < stage)
                        or (skip != NULL and skip[idx])
                        or (c == NULL and sets[s][t] == NULL)  # a C handler is in sets
                        or not side_ok(sides[s][t], m.h.flags)):
                    self.qhead[r] += 1
                    self.release(m)
                    continue
                if c == NULL:
                    break               # a Python handler's: _drain takes it
                self.qhead[r] += 1
                n += 1
                delivered[t] += 1
                tev[t] += 1
                if c.fn(c.ctx, m, p) != MBX_PASS and p != NULL and self.nf_drop(i, p):
                    drops += 1
                self.release(m)
        if n:
            self.delivered += n
            self.nf_events[i] += n
            self.nf_c_events[i] += n
            self.nf_drops[i] += drops
        return n

    cdef uint32_t _run_shared(self, uint32_t lead, uint32_t end, uint32_t limit) noexcept nogil:
        # NFs lead..end-1 share lead's ring (plan_rings).  Each packet's events go to
        # each NF in chain order before the next packet's, so a drop hides the rest
        # of its events from the NFs after it, as with rings of their own (and as
        # dispatch's waves order NFs).  What one pass saves per further NF: the
        # ring entry, the loop, reading the message and finding its packet, and the
        # counting: a packet's only event is counted once for all (per run of one
        # type, see _run_c) as if each NF took it, and taken back for one that did
        # not; the events of a packet with several are counted as each NF takes them.
        cdef uint32_t cap = self.msg_capacity, mask = cap - 1
        cdef const uint32_t *qs = self.queues + <size_t>(2 * lead) * cap
        cdef mbx_msg *msgs = self.msgs
        cdef mbx_pkt *pkts = self.pkts
        cdef uint64_t *delivered = self.per_type_delivered
        cdef uint32_t h = self.qhead[2 * lead], tail = self.qtail[2 * lead]
        cdef uint32_t e, k, j, pos, members = end - lead
        cdef uint64_t seen = 0, run_n = 0, n = 0
        cdef uint16_t t, run_t = 0
        cdef mbx_msg *m
        cdef mbx_pkt *p
        cdef c_table cset[MAX_NFS]
        cdef uint8_t stage[MAX_NFS]
        cdef uint64_t *tev[MAX_NFS]
        cdef uint64_t missed[MAX_NFS]
        cdef uint64_t drops[MAX_NFS]
        for j in range(lead, end):
            cset[j] = self.set_c[j][0]
            stage[j] = self.nf_stage[j]
            tev[j] = self.nf_type_events + <size_t>j * MAX_TYPES
            missed[j] = 0
            drops[j] = 0
        while h != tail:
            m = &msgs[qs[h & mask]]
            pos = m.h.pos
            if pos > limit:
                break
            t = m.h.type_idx
            e = h + 1
            if e == tail or msgs[qs[e & mask]].h.pos != pos:
                # the packet's only event (the usual case): read once for all NFs
                if t != run_t:
                    if run_n:
                        for j in range(lead, end):
                            tev[j][run_t] += run_n
                        delivered[run_t] += run_n * members
                    run_t = t
                    run_n = 0
                run_n += 1
                p = NULL if m.h.pkt == NO_PKT else &pkts[m.h.pkt]
                for j in range(lead, end):
                    if not offer_c(self, j, m, p, cset[j][t], stage[j], &drops[j]):
                        missed[j] += 1  # counted already: take it back
                        tev[j][t] -= 1
                        delivered[t] -= 1
                m.h.refs -= 1           # release(m), inline: the ring held one reference
                if m.h.refs == 0 and p != NULL:
                    p.refs -= 1
                h = e
                continue
            while e != tail and msgs[qs[e & mask]].h.pos == pos:
                e += 1
            for j in range(lead, end):  # the packet's events, one NF after another
                for k in range(h, e):
                    m = &msgs[qs[k & mask]]
                    t = m.h.type_idx
                    p = NULL if m.h.pkt == NO_PKT else &pkts[m.h.pkt]
                    if offer_c(self, j, m, p, cset[j][t], stage[j], &drops[j]):
                        tev[j][t] += 1
                        delivered[t] += 1
                    else:
                        missed[j] += 1
            for k in range(h, e):
                m = &msgs[qs[k & mask]]
                m.h.refs -= 1
                if m.h.refs == 0 and m.h.pkt != NO_PKT:
                    pkts[m.h.pkt].refs -= 1
            h = e
        seen = h - self.qhead[2 * lead]
        self.qhead[2 * lead] = h
        if run_n:
            for j in range(lead, end):
                tev[j][run_t] += run_n
            delivered[run_t] += run_n * members
        for j in range(lead, end):
            n += seen - missed[j]
            self.nf_events[j] += seen - missed[j]
            self.nf_c_events[j] += seen - missed[j]
            self.nf_drops[j] += drops[j]
        self.delivered += n
        return <uint32_t>n

    cdef _make_stage(self):
        # The batch handlers' staging buffer (numpy is imported only by a bus that
        # has some batch handler).
        cdef uint8_t[::1] stage_mem
        if self.stage is None:
            import numpy as np

            self.np = np
            self.stage = np.zeros(self.msg_capacity * sizeof(mbx_msg), dtype=np.uint8)
            stage_mem = self.stage
            self.stage_buf = <mbx_msg *>&stage_mem[0]

    cdef _run_batch(self, uint32_t i, uint32_t first, void *h, uint16_t bt,
                    uint32_t limit):
        # Gather the run of queued messages that resolve to the same batch handler
        # into the staging buffer, and hand them over as one numpy view.
        self._make_stage()
        cdef mbx_msg *stage = self.stage_buf
        cdef uint32_t n = 0, idx, s, r, j
        cdef mbx_msg *m
        cdef mbx_pkt *p
        cdef uint32_t *taken = self.taken
        cdef uint64_t t0
        # NF i's tables, looked up once for the run (see _run_c)
        cdef handler_table *sets = self.sets[i]
        cdef uint16_t **sbatch = self.set_batch[i]
        cdef uint8_t **sides = self.set_side[i]
        cdef const uint16_t *fset = self.flow_set[i]
        cdef const uint32_t *fgen = self.flow_set_gen[i]
        cdef const uint8_t *skip = self.skip
        cdef mbx_msg *msgs = self.msgs
        cdef mbx_pkt *pkts = self.pkts
        cdef uint8_t stage_no = self.nf_stage[i]
        cdef uint64_t *tev = self.nf_type_events + <size_t>i * MAX_TYPES
        cdef uint16_t t, run_t
        cdef uint64_t run_n = 0
        try:
            idx = first
            run_t = msgs[idx].h.type_idx
            while True:
                m = &msgs[idx]
                memcpy(&stage[n], m, sizeof(mbx_msg))
                taken[n] = idx
                n += 1
                t = m.h.type_idx
                if t != run_t:          # counted per run of one type
                    self.per_type_delivered[run_t] += run_n
                    tev[run_t] += run_n
                    run_t = t
                    run_n = 0
                run_n += 1
                idx = next_msg(self, i, limit, &r)
                if idx == NO_MSG:
                    break
                m = &msgs[idx]
                t = m.h.type_idx
                p = NULL if m.h.pkt == NO_PKT else &pkts[m.h.pkt]
                s = flow_set_of(fset, fgen, self.flow_capacity, m.h.flow, m.h.flow_gen)
                if (sets[s][t] != h
                        or (skip != NULL and skip[idx])
                        or sbatch[s][t] != bt
                        or not side_ok(sides[s][t], m.h.flags)
                        or (p != NULL and p.verdict == VERDICT_DROP
                            and p.drop_stage < stage_no)):
                    break
                self.qhead[r] += 1
            self.per_type_delivered[run_t] += run_n
            tev[run_t] += run_n
            self.delivered += n
            self.nf_events[i] += n
            # the first n records of the staging buffer as type bt's records: kept
            # per type and length up to BATCH_VIEWS_KEPT (a slice per call costs more
            # than the lookup; runs are mostly a burst's events of one type)
            views = self.stage_views.get(bt)
            if views is None:
                views = self.stage_views[bt] = {}
            view = views.get(n)
            if view is None:
                view = self.stage.view(_types[bt - 1].dtype)[:n]
                if n <= BATCH_VIEWS_KEPT:
                    views[n] = view
            self.current_msg_idx = first
            t0 = mono_ns() if self.timed else 0
            try:
                verdicts = (<object>h)(view)
                if self.timed:
                    self.nf_ns[i] += mono_ns() - t0
            except Exception as exc:
                raise NFError(
                    f"NF {self.nfs[i].name}: batch handler "
                    f"{getattr(<object>h, '__qualname__', <object>h)} raised "
                    f"{exc_text(exc)}{user_code_line(exc)}") from exc
            except KeyboardInterrupt as exc:
                raise held_in(exc, self.nfs[i].name, <object>h,
                              f"batch of {n} {_types[bt - 1].name} events") from exc
            if verdicts is not None:
                try:
                    drops = self.np.asarray(verdicts, dtype=bool)
                except (TypeError, ValueError):
                    # (a structured array, such as the records it was handed, has no
                    # cast to bool; numpy's error would spell out the whole dtype)
                    drops = None
                if drops is None or drops.shape != (n,):
                    raise NFError(
                        f"NF {self.nfs[i].name}: batch handler {code_name(<object>h)} "
                        f"returned {_verdicts_text(verdicts)}: it returns None or one "
                        f"drop flag per event ({n} here)")
                for k in self.np.flatnonzero(drops):
                    j = k
                    m = &self.msgs[taken[j]]
                    if m.h.pkt != NO_PKT and self.nf_drop(i, &self.pkts[m.h.pkt]):
                        self.nf_drops[i] += 1
        finally:
            for j in range(n):
                self.release(&self.msgs[taken[j]])

    def counters(self):
        """Events published and delivered, per type name."""
        out = {}
        for t in _types:
            pub = self.per_type_published[t.idx]
            dlv = self.per_type_delivered[t.idx]
            if pub or dlv:
                out[t.name] = {"published": pub, "delivered": dlv}
        return out

    def handler_sets(self):
        """Per NF name: the handler sets its subscriptions made in this process (one
        for its ``sub`` calls, one more per distinct per-flow pattern of ``up_sub``;
        at most 65,535)."""
        return {nf.name: self.nsets[i] for i, nf in enumerate(self.nfs)}

    def nf_stats(self):
        """Per NF: events delivered (``events``; ``c_events`` of them to C handlers),
        packet drops it asked for, time in its handlers (``handler_ns``, 0 when
        ``timing`` is off) and its mean per event, and events per type."""
        cdef uint32_t i
        cdef uint64_t *tev
        out = {}
        for i in range(self.nnf):
            tev = self.nf_type_events + <size_t>i * MAX_TYPES
            n = self.nf_events[i]
            out[self.nfs[i].name] = {
                "events": n, "c_events": self.nf_c_events[i], "drops": self.nf_drops[i],
                "handler_ns": self.nf_ns[i],
                "mean_ns": self.nf_ns[i] / n if n else 0.0,
                "types": {t.name: tev[t.idx] for t in _types if tev[t.idx]},
            }
        return out

    @property
    def shared_rings(self):
        """The groups of NFs (names, in chain order) that share one ring and one pass
        over it (see ``timing``); empty when every NF has its own."""
        cdef uint32_t i
        return [tuple(self.nfs[j].name for j in range(i, i + 1 + self.nf_sharers[i]))
                for i in range(self.nnf) if self.nf_sharers[i]]

    @property
    def pending(self):
        """Messages still queued, over all NFs (0 after dispatch)."""
        cdef uint32_t i
        cdef uint64_t n = 0
        for i in range(2 * self.nnf):
            n += self.qtail[i] - self.qhead[i]
        return n


def message_size():
    """Bytes of one event message: (header, whole message)."""
    return sizeof(mbx_msg_hdr), sizeof(mbx_msg)
