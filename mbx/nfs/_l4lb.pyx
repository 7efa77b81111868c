"""The L4 load balancer's C handlers (the built-in ``l4lb``; see mbx.nfs.l4lb).

``Balancer(vip, backends)`` holds the translation state in C and gives the two
handlers the dispatcher calls without the GIL: ``packet_handler()`` for PKT and
``end_handler()`` for FLOW/END.  Its translation is that of ``PyL4LB`` (the Python
reference in mbx.nfs.l4lb), packet for packet:

- a flow whose first packet goes to the VIP is a *forward* flow: the backend is
  chosen by ``choose_backend`` (CRC-32 of the packed 5-tuple modulo the number of
  backends), its packets in that direction get the backend as destination, and
  (client, backend) goes into the reverse table;
- a flow whose first packet comes from a backend to a client in the reverse table
  is a *reply* flow: its packets in that direction get the VIP as source;
- a packet in the other direction of a forward or reply flow (from the VIP's
  address to the client, from the client to the backend) is let through untouched
  and counted as ``passed``: the stack's flow holds both directions, but the
  translation is only for the direction that made it;
- FLOW/END frees the flow's entry, and a forward flow's hold on its reverse entry,
  which goes with the last forward flow holding it (the same client address and
  port in two VLANs is two forward flows to one backend).

State: one entry per flow-table slot (grown as slots appear), tagged with the
slot's generation so a reused slot never inherits a translation, and an
open-addressing reverse table (linear probing, backward-shift deletion).  Memory
is allocated only when a slot or reverse entry is first needed; if an allocation
fails the packet is dropped and counted (``no_memory``): a load balancer that
forwards a packet untranslated sends a client's traffic somewhere it never asked
for.  A packet the translation cannot apply to (a backend of the other IP
version, a port change on a packet without ports) is dropped and counted
(``untranslatable``); the Python reference raises there.
A packet to the VIP that the stack gave no flow (its flow table full under
``--flow-policy refuse``, a malformed packet it forwards) is dropped and counted
(``no_flow``) for the same reason; other packets without a flow pass.  A TCP or
UDP packet to the VIP's address whose ports could not be read (its header cut
before them; the parser leaves them 0:0) can never be translated either: dropped
and counted (``no_ports``), flow or no flow.  Every packet lands in one counter:
``translated``, ``passed``, or one of the drops.
"""
from libc.stdint cimport uint8_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free, realloc
from libc.string cimport memcmp, memcpy, memset

from mbx.cnf cimport MBX_DROP, MBX_PASS, NO_FLOW, REWRITE_OK, chandler, mbx_msg, mbx_pkt
from mbx.cnf cimport pkt_rewrite
from mbx._packet cimport TH_ACK, TH_SYN

import ipaddress


cdef extern from "<zlib.h>" nogil:
    unsigned long crc32(unsigned long crc, const unsigned char *buf, unsigned int n)


cdef enum:
    FLOW_NONE = 0
    FLOW_FORWARD = 1        # client -> VIP: destination becomes the backend
    FLOW_REPLY = 2          # backend -> client: source becomes the VIP
    MIN_FLOWS = 1024
    MIN_REVERSE = 1024      # a power of two


# An address and port; compared with memcmp, so every byte (pad, unused address
# bytes) is always set.
ctypedef struct endpoint:
    uint8_t ip_ver
    uint8_t pad
    uint16_t port
    uint8_t addr[16]

ctypedef struct flow_entry:
    uint32_t gen            # the flow-table slot's generation this entry is for
    uint16_t kind           # FLOW_*
    uint16_t dir            # the packet direction (m.h.dir) the translation is for
    endpoint to             # forward: the backend; reply: the VIP
    endpoint client         # forward: the client (with `to`, its reverse key)
    uint32_t syn_seq        # forward, TCP: the sequence number of its last SYN ...
    uint32_t syn_seen       # ... when one was seen

ctypedef struct reverse_entry:
    uint32_t used
    # forward flows translating (client, backend): two flows can (the same client
    # address and port in two VLANs), and the entry must outlive the first to end
    uint32_t refs
    endpoint client
    endpoint backend

ctypedef struct lb_state:
    endpoint vip
    endpoint *backends
    uint32_t nbackends
    flow_entry *flows       # indexed by flow-table slot
    uint32_t nflows
    reverse_entry *rev
    uint32_t rev_mask       # capacity - 1
    uint32_t rev_used
    uint64_t translated
    uint64_t untranslatable
    uint64_t passed         # packets neither to the VIP nor a known reply: untouched
    uint64_t no_memory
    uint64_t no_flow        # packets to the VIP the stack gave no flow: dropped
    uint64_t no_ports       # TCP/UDP to the VIP's address, ports unread: dropped
    uint64_t tracked        # flows with an entry now (0 again once every flow ended)
    uint64_t connections    # flows to the VIP given a backend, and TCP connections
    #                         opened again on one (a SYN with a new sequence number)


cdef inline void endpoint_of(endpoint *e, uint8_t ip_ver, const uint8_t *addr,
                             uint16_t port) noexcept nogil:
    # mbx_addr keeps IPv4 in the first 4 bytes and zeros after: copy all 16
    e.ip_ver = ip_ver
    e.pad = 0
    e.port = port
    memcpy(e.addr, addr, 16)


cdef inline bint same(const endpoint *a, const endpoint *b) noexcept nogil:
    return memcmp(a, b, sizeof(endpoint)) == 0


cdef uint32_t choose_backend(const lb_state *s, const mbx_pkt *p) noexcept nogil:
    # CRC-32 of src, dst (4 or 16 bytes each), sport, dport (big-endian), proto:
    # the bytes mbx.nfs.l4lb.choose_backend hashes.
    cdef uint8_t key[37]
    cdef uint32_t alen = 4 if p.ip_ver == 4 else 16
    memcpy(key, p.src.b, alen)
    memcpy(key + alen, p.dst.b, alen)
    key[2 * alen] = p.sport >> 8
    key[2 * alen + 1] = p.sport & 0xFF
    key[2 * alen + 2] = p.dport >> 8
    key[2 * alen + 3] = p.dport & 0xFF
    key[2 * alen + 4] = p.l4_proto
    return <uint32_t>crc32(0, key, 2 * alen + 5) % s.nbackends


cdef inline uint32_t reverse_home(const lb_state *s, const endpoint *client,
                                  const endpoint *backend) noexcept nogil:
    cdef uint32_t h = <uint32_t>crc32(0, <const unsigned char *>client, sizeof(endpoint))
    return <uint32_t>crc32(h, <const unsigned char *>backend, sizeof(endpoint)) & s.rev_mask


cdef int reverse_find(const lb_state *s, const endpoint *client,
                      const endpoint *backend) noexcept nogil:
    # The slot holding (client, backend), or -1.
    cdef uint32_t i
    if s.rev == NULL:
        return -1
    i = reverse_home(s, client, backend)
    while s.rev[i].used:
        if same(&s.rev[i].client, client) and same(&s.rev[i].backend, backend):
            return <int>i
        i = (i + 1) & s.rev_mask
    return -1


cdef int reverse_grow(lb_state *s) noexcept nogil:
    # Double the table (or make the first one) and re-insert every entry.
    cdef uint32_t cap = MIN_REVERSE if s.rev == NULL else (s.rev_mask + 1) * 2
    cdef reverse_entry *old = s.rev
    cdef uint32_t old_cap = 0 if old == NULL else s.rev_mask + 1
    cdef reverse_entry *new = <reverse_entry *>calloc(cap, sizeof(reverse_entry))
    cdef uint32_t i, j
    if new == NULL:
        return -1
    s.rev = new
    s.rev_mask = cap - 1
    for i in range(old_cap):
        if old[i].used:
            j = reverse_home(s, &old[i].client, &old[i].backend)
            while new[j].used:
                j = (j + 1) & s.rev_mask
            new[j] = old[i]
    free(old)
    return 0


cdef int reverse_put(lb_state *s, const endpoint *client,
                     const endpoint *backend) noexcept nogil:
    cdef int found = reverse_find(s, client, backend)
    cdef uint32_t i
    if found >= 0:
        s.rev[found].refs += 1
        return 0
    if s.rev == NULL or (s.rev_used + 1) * 2 > s.rev_mask + 1:
        if reverse_grow(s) < 0:
            return -1
    i = reverse_home(s, client, backend)
    while s.rev[i].used:
        i = (i + 1) & s.rev_mask
    s.rev[i].used = 1
    s.rev[i].refs = 1
    s.rev[i].client = client[0]
    s.rev[i].backend = backend[0]
    s.rev_used += 1
    return 0


cdef void reverse_del(lb_state *s, const endpoint *client,
                      const endpoint *backend) noexcept nogil:
    # Backward-shift deletion: later entries of the probe run move up so every
    # lookup still finds them without tombstones.
    cdef int found = reverse_find(s, client, backend)
    cdef uint32_t i, j, k
    if found < 0:
        return
    i = <uint32_t>found
    s.rev[i].refs -= 1
    if s.rev[i].refs:
        return                  # another forward flow still translates it
    s.rev[i].used = 0
    s.rev_used -= 1
    j = i
    while True:
        j = (j + 1) & s.rev_mask
        if not s.rev[j].used:
            return
        k = reverse_home(s, &s.rev[j].client, &s.rev[j].backend)
        # move j into the hole at i unless its home lies cyclically in (i, j]
        if (i <= j and (k <= i or k > j)) or (i > j and k <= i and k > j):
            s.rev[i] = s.rev[j]
            s.rev[j].used = 0
            i = j


cdef flow_entry *flow_slot(lb_state *s, uint32_t slot) noexcept nogil:
    # The entry of a flow-table slot; the array grows (zeroed) to cover it.
    cdef uint32_t n = s.nflows if s.nflows else MIN_FLOWS
    cdef flow_entry *grown
    if slot < s.nflows:
        return &s.flows[slot]
    while n <= slot:
        n *= 2
    grown = <flow_entry *>realloc(s.flows, n * sizeof(flow_entry))
    if grown == NULL:
        return NULL
    memset(grown + s.nflows, 0, (n - s.nflows) * sizeof(flow_entry))
    s.flows = grown
    s.nflows = n
    return &s.flows[slot]


cdef void forget(lb_state *s, flow_entry *f) noexcept nogil:
    if f.kind == FLOW_FORWARD:
        reverse_del(s, &f.client, &f.to)
    if f.kind != FLOW_NONE:
        s.tracked -= 1
    f.kind = FLOW_NONE


cdef inline bint portless_to_vip(const lb_state *s, const mbx_pkt *p) noexcept nogil:
    # TCP or UDP to the VIP's address with ports 0:0: what the parser leaves when
    # the header was cut before them.  No connection uses port 0 (nor does the
    # VIP), so whatever the ports were, the packet cannot be matched to a backend;
    # sent on, it would reach the VIP itself.
    return ((p.l4_proto == 6 or p.l4_proto == 17) and p.sport == 0 and p.dport == 0
            and p.ip_ver == s.vip.ip_ver and memcmp(p.dst.b, s.vip.addr, 16) == 0)


cdef int translate(lb_state *s, mbx_pkt *p, int which, const endpoint *to) noexcept nogil:
    if to.ip_ver != p.ip_ver or pkt_rewrite(p, which, to.addr, to.port) != REWRITE_OK:
        s.untranslatable += 1
        return MBX_DROP
    s.translated += 1
    return MBX_PASS


cdef inline bint is_syn(const mbx_pkt *p) noexcept nogil:
    return p.l4_proto == 6 and (p.tcp_flags & (TH_SYN | TH_ACK)) == TH_SYN


cdef inline void new_connection(lb_state *s, flow_entry *f, const mbx_pkt *p) noexcept nogil:
    # Without the TCP Monitor a client reusing its port within the idle timeout is
    # the same flow, and the same backend: its new SYN (another sequence number
    # than the last one's, a retransmission has the same) is still a connection.
    if f.syn_seen and f.syn_seq == p.seq:
        return
    f.syn_seq = p.seq
    f.syn_seen = 1
    s.connections += 1


cdef int on_packet(void *ctx, const mbx_msg *m, mbx_pkt *p) noexcept nogil:
    cdef lb_state *s = <lb_state *>ctx
    cdef flow_entry *f
    cdef endpoint a, b
    if p == NULL or p.ip_ver == 0 or (p.l4_proto != 6 and p.l4_proto != 17):
        # a TCP and UDP balancer: SCTP has ports too, but rewriting them would need
        # its CRC-32c done again, so it passes untouched as ICMP does
        s.passed += 1
        return MBX_PASS
    if portless_to_vip(s, p):
        # Checked before the flow: the stack gives no flow to a header cut before
        # its ports, but one whose IP length lies (bad_ip_len) it keys 0:0.
        s.no_ports += 1
        return MBX_DROP
    if m.h.flow == NO_FLOW:
        endpoint_of(&a, p.ip_ver, p.dst.b, p.dport)
        # No flow (the table full under --flow-policy refuse, a malformed packet
        # forwarded): nothing would keep the connection on one backend or bring its
        # replies back, and sent on untranslated it would reach the VIP, which no
        # server answers.
        if same(&a, &s.vip):
            s.no_flow += 1
            return MBX_DROP
        s.passed += 1
        return MBX_PASS
    f = flow_slot(s, m.h.flow)
    if f == NULL:
        s.no_memory += 1
        return MBX_DROP
    if f.kind != FLOW_NONE:
        if f.gen == m.h.flow_gen:
            # The stack's flow holds both directions; the translation is for the
            # direction that made it (to the VIP, or a backend's reply).  The other
            # direction (the VIP's address as a source, a client talking to a
            # backend directly) is not the balancer's to rewrite.
            if m.h.dir == f.dir:
                if f.kind == FLOW_FORWARD and is_syn(p):
                    new_connection(s, f, p)
                return translate(s, p, 1 if f.kind == FLOW_FORWARD else 0, &f.to)
            s.passed += 1
            return MBX_PASS
        forget(s, f)            # the slot's earlier flow ended without FLOW/END
    endpoint_of(&a, p.ip_ver, p.dst.b, p.dport)
    if same(&a, &s.vip):
        f.to = s.backends[choose_backend(s, p)]
        endpoint_of(&f.client, p.ip_ver, p.src.b, p.sport)
        if reverse_put(s, &f.client, &f.to) < 0:
            s.no_memory += 1
            return MBX_DROP
        f.gen = m.h.flow_gen
        f.kind = FLOW_FORWARD
        f.dir = m.h.dir
        f.syn_seen = 0
        s.tracked += 1
        if is_syn(p):
            new_connection(s, f, p)
        else:
            s.connections += 1
        return translate(s, p, 1, &f.to)
    endpoint_of(&b, p.ip_ver, p.src.b, p.sport)
    if reverse_find(s, &a, &b) >= 0:
        f.to = s.vip
        f.gen = m.h.flow_gen
        f.kind = FLOW_REPLY
        f.dir = m.h.dir
        s.tracked += 1
        return translate(s, p, 0, &f.to)
    s.passed += 1
    return MBX_PASS


cdef int on_flow_end(void *ctx, const mbx_msg *m, mbx_pkt *p) noexcept nogil:
    cdef lb_state *s = <lb_state *>ctx
    cdef flow_entry *f
    if m.h.flow < s.nflows:
        f = &s.flows[m.h.flow]
        if f.kind != FLOW_NONE and f.gen == m.h.flow_gen:
            forget(s, f)
    return MBX_PASS


cdef void set_endpoint(endpoint *e, object addr, int port) except *:
    cdef bytes raw = ipaddress.ip_address(addr).packed
    memset(e, 0, sizeof(endpoint))
    e.ip_ver = 4 if len(raw) == 4 else 6
    e.port = port
    memcpy(e.addr, <const uint8_t *>raw, len(raw))


cdef class Balancer:
    """The C state and handlers of an L4 load balancer.

    ``Balancer(vip, backends)``: ``vip`` an (address, port) pair, ``backends`` a
    non-empty list of them (addresses as text).  Counters: ``translated`` packets
    rewritten, ``tracked`` flows holding an entry now, ``reverse_entries`` client
    connections whose replies are awaited, ``untranslatable``, ``no_memory``,
    ``no_flow`` and ``no_ports`` packets dropped, ``passed`` packets let through untouched (not to
    the VIP, not a reply to a connection it sent to a backend: with ``--stacks``,
    say, a reply whose request another process saw).  Each packet is counted once,
    in one of these.
    """
    cdef lb_state s

    def __cinit__(self, vip, backends):
        cdef uint32_t i
        memset(&self.s, 0, sizeof(lb_state))
        backends = list(backends)
        if not backends:
            raise ValueError("l4lb: needs at least one backend")
        set_endpoint(&self.s.vip, vip[0], vip[1])
        self.s.backends = <endpoint *>calloc(len(backends), sizeof(endpoint))
        if self.s.backends == NULL:
            raise MemoryError("l4lb: cannot allocate the backend table")
        self.s.nbackends = len(backends)
        for i, (addr, port) in enumerate(backends):
            set_endpoint(&self.s.backends[i], addr, port)

    def __dealloc__(self):
        free(self.s.backends)
        free(self.s.flows)
        free(self.s.rev)

    def packet_handler(self):
        """The C handler for PKT (keeps this object alive)."""
        return chandler(on_packet, &self.s, self, "l4lb.packet")

    def end_handler(self):
        """The C handler for FLOW/END (keeps this object alive)."""
        return chandler(on_flow_end, &self.s, self, "l4lb.flow_end")

    @property
    def translated(self):
        return self.s.translated

    @property
    def tracked(self):
        return self.s.tracked

    @property
    def connections(self):
        return self.s.connections

    @property
    def reverse_entries(self):
        return self.s.rev_used

    @property
    def untranslatable(self):
        return self.s.untranslatable

    @property
    def no_memory(self):
        return self.s.no_memory

    @property
    def passed(self):
        return self.s.passed

    @property
    def no_flow(self):
        return self.s.no_flow

    @property
    def no_ports(self):
        return self.s.no_ports
