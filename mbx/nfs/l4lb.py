"""L4 load balancer: a 5-tuple hash picks a backend for each connection to the VIP;
the destination is rewritten to it, and the backend's replies get the VIP back as
their source, so both directions stay consistent.  Checksums are updated
incrementally (RFC 1624) by the stack's rewrite helper.

Each translation is for one direction of the stack's (two-way) flow, the one that
made it: a connection's packets to the VIP, a backend's replies to the client.  A
packet in the flow's other direction (from the VIP's address to the client, from
the client straight to the backend) is not the balancer's and passes untouched.

Options: ``vip`` (``ADDR:PORT``), ``backends`` (comma-separated ``ADDR:PORT``).

Two implementations of one translation:

- ``L4LB`` (the built-in ``l4lb``, what ``make()`` returns): C handlers
  (mbx.nfs._l4lb) that the dispatcher calls without the GIL, its state in C tables
  freed at FLOW/END.  This is the one to deploy.
- ``PyL4LB``: the same translation with Python handlers and dicts, readable in a
  minute; the reference the C one is tested against (same output, byte for byte)
  and the example of a Python NF that rewrites packets.
"""
import ipaddress
import struct
import zlib

import mbx
from mbx.errors import OptionError
from mbx.nfs._l4lb import Balancer

DEFAULT_VIP = "198.18.3.1:80"
DEFAULT_BACKENDS = "198.18.2.1:80,198.18.2.2:80"


def parse_endpoint(text, where="l4lb"):
    """``"198.18.3.1:80"`` or ``"[2001:db8::1]:80"`` -> (address string, port);
    ``AppError`` starting with ``where`` (the NF and its option) says why not."""
    text = text.strip()
    if text.startswith("["):
        addr, _, port = text[1:].partition("]:")
    else:
        addr, _, port = text.rpartition(":")
        if ":" in addr:
            # "2001:db8::1:2" reads as a port on an address and as an address alone
            raise mbx.AppError(f"{where}: {text!r}: an IPv6 endpoint is written "
                               f"[ADDR]:PORT")
    if not port.isascii() or not port.isdigit():
        raise mbx.AppError(f"{where}: {text!r} is not ADDR:PORT (or [ADDR]:PORT for "
                           f"IPv6)")
    if not 1 <= int(port) <= 0xFFFF:       # no connection is made to port 0
        raise mbx.AppError(f"{where}: {text!r}: port {int(port)} is not in 1..65535")
    if "%" in addr:
        # packets carry no scope: the C handlers would match fe80::1%eth0 as fe80::1
        # on every link, the Python ones never
        raise mbx.AppError(f"{where}: {text!r}: a scoped address ({addr!r}) cannot "
                           f"be matched; give the address without %SCOPE")
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        raise mbx.AppError(f"{where}: {text!r}: {addr!r} is not an IPv4 or IPv6 "
                           f"address") from None
    if ip.is_unspecified or ip.is_multicast or ip == ipaddress.ip_address("255.255.255.255"):
        # no host has it: no connection is made to it, and none can be sent to it
        raise mbx.AppError(f"{where}: {text!r}: {ip} is not a host's address "
                           f"(unspecified, multicast or broadcast)")
    if ip.version == 6 and ip.ipv4_mapped is not None:
        # ::ffff:a.b.c.d is how a dual-stack socket shows an IPv4 peer; on the wire
        # the packets are IPv4 (RFC 4291 §2.5.5.2), so such a VIP matched nothing
        raise mbx.AppError(f"{where}: {text!r}: an IPv4-mapped address never appears "
                           f"in packets; write {ip.ipv4_mapped}:{port}")
    return str(ip), int(port)


def choose_backend(src, sport, dst, dport, proto, backends):
    """The backend for a connection: CRC-32 of its packed 5-tuple (addresses as 4 or
    16 bytes, ports big-endian, protocol) modulo the number of backends.  Bytes, not
    text, so the C handler hashes exactly the same key."""
    key = (ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed
           + struct.pack("!HHB", sport, dport, proto))
    return backends[zlib.crc32(key) % len(backends)]


def _endpoint(value, where):
    # "ADDR:PORT", or (address, port) as an application file's list gives it
    if isinstance(value, str):
        return parse_endpoint(value, where)
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise mbx.AppError(f"{where}: {value!r} is not \"ADDR:PORT\" or [ADDR, PORT]")
    addr, port = value
    return parse_endpoint(f"[{addr}]:{port}" if ":" in str(addr) else f"{addr}:{port}",
                          where)


def _endpoints(name, vip, backends):
    # The (vip, backends) of NF `name`; OptionError names the NF and the option.
    try:
        vip = _endpoint(vip, f"NF {name}: vip")
    except mbx.AppError as exc:
        raise OptionError(str(exc), "vip") from None
    try:
        return vip, _backends(name, vip, backends)
    except mbx.AppError as exc:
        raise OptionError(str(exc), "backends") from None


def _backends(name, vip, backends):
    where = f"NF {name}: backends"
    given = backends
    if isinstance(backends, str):
        backends = [b for b in backends.split(",") if b.strip()]
    elif not isinstance(backends, list | tuple):
        raise mbx.AppError(f"{where}: {backends!r} is not a comma-separated string or "
                           f"a list of endpoints")
    backends = [_endpoint(b, where) for b in backends]
    if not backends:
        raise mbx.AppError(f"{where}: needs at least one backend")
    version = ipaddress.ip_address(vip[0]).version
    for b in backends:
        # the balancer rewrites the destination in place: an IPv4 packet cannot be
        # given an IPv6 backend (its packets were dropped, uncounted)
        if ipaddress.ip_address(b[0]).version != version:
            if given == DEFAULT_BACKENDS:
                raise mbx.AppError(f"{where}: the VIP {_show(vip)} is IPv{version} and "
                                   f"the default backends ({DEFAULT_BACKENDS}) are not: "
                                   f"give the backends option")
            raise mbx.AppError(f"{where}: {_show(b)} is not IPv{version} like the VIP "
                               f"{_show(vip)}")
        if b == vip:
            raise mbx.AppError(f"{where}: {_show(b)} is the VIP itself")
        if backends.count(b) > 1:
            raise mbx.AppError(f"{where}: {_show(b)} is listed twice")
    return backends


def _show(endpoint):
    addr, port = endpoint
    return f"[{addr}]:{port}" if ":" in addr else f"{addr}:{port}"


class L4LB(mbx.NF):
    """The L4 load balancer with C handlers; ``translated``, ``connections`` (flows to
    the VIP given a backend, and TCP connections opened again on one), ``tracked``
    (flows with state now: 0 once every flow has ended, as at the end of a run) and
    the drop counters come from its C state (``self.core``)."""

    # A reply comes back under the backend's address, which hashes to another flow,
    # maybe another stack process, which has no translation for it (run_parallel).
    rewrites_addresses = True

    def __init__(self, name="l4lb", vip=DEFAULT_VIP, backends=DEFAULT_BACKENDS):
        super().__init__(name, writes=True)
        self.vip, self.backends = _endpoints(name, vip, backends)
        self.core = Balancer(self.vip, self.backends)
        self.sub(mbx.PKT, self.core.packet_handler())
        self.sub(mbx.FLOW_END, self.core.end_handler())

    @property
    def translated(self):
        return self.core.translated

    @property
    def tracked(self):
        return self.core.tracked

    def report(self):
        return {"translated": self.translated, "connections": self.core.connections,
                "tracked": self.tracked, "untranslatable": self.core.untranslatable,
                "no_memory": self.core.no_memory, "no_flow": self.core.no_flow,
                "no_ports": self.core.no_ports, "passed": self.core.passed}


def _is_syn(ev):
    return ev.proto == 6 and ev.tcp_flags & 0x12 == 0x02      # SYN without ACK


class PyL4LB(mbx.NF):
    """The L4 load balancer with Python handlers: the reference for ``L4LB``."""

    rewrites_addresses = True       # see L4LB

    def __init__(self, name="l4lb", vip=DEFAULT_VIP, backends=DEFAULT_BACKENDS):
        super().__init__(name, writes=True)
        self.vip, self.backends = _endpoints(name, vip, backends)
        self.forward = {}       # flow id -> (backend, reverse key, dir, SYN seq) (client -> VIP)
        # (client, cport, backend, bport) -> [VIP, forward flows translating it], for
        # replies: the same client address and port in two VLANs is two flows, and the
        # entry must outlive the first to end
        self.reverse = {}
        self.reply_flows = {}   # flow id -> (VIP, dir) (backend -> client flows)
        self.translated = 0
        self.connections = 0    # flows to the VIP given a backend, and TCP connections
        #                         opened again on one (a SYN with a new sequence number)
        self.passed = 0         # packets neither to the VIP nor a known reply
        self.no_flow = 0        # packets to the VIP without a flow, dropped
        self.no_ports = 0       # TCP/UDP to the VIP's address, ports unread, dropped
        self.sub(mbx.PKT, self.on_packet)
        self.sub(mbx.FLOW_END, self.on_end)

    @property
    def tracked(self):
        return len(self.forward) + len(self.reply_flows)

    def report(self):
        return {"translated": self.translated, "connections": self.connections,
                "tracked": self.tracked, "no_flow": self.no_flow, "no_ports": self.no_ports,
                "passed": self.passed}

    def on_packet(self, ev):
        if ev.proto not in (6, 17):
            # TCP and UDP only, as the C balancer (SCTP's ports would need its
            # CRC-32c done again): everything else passes untouched
            self.passed += 1
            return
        if ev.sport == ev.dport == 0 and ev.dst_ip == self.vip[0]:
            # ports cut off (the parser leaves them 0:0, which no connection uses):
            # no backend can be chosen, and sent on it would reach the VIP itself
            ev.drop()
            self.no_ports += 1
            return
        flow = ev.flow
        if flow is None:
            # without a flow nothing keeps a connection on one backend, and sent on
            # untranslated a packet to the VIP reaches no server: dropped
            if ev.dst_ip is not None and (ev.dst_ip, ev.dport) == self.vip:
                ev.drop()
                self.no_flow += 1
            else:
                self.passed += 1
            return
        # a flow holds both directions; its translation is for the direction that
        # made it, and the other direction passes untouched (as in the C one)
        fwd = self.forward.get(flow)
        if fwd is not None:
            if ev.dir == fwd[2]:
                if _is_syn(ev) and ev.seq != fwd[3]:
                    # the client's port reused within the idle timeout: the same
                    # flow (without the TCP Monitor), a new connection
                    self.forward[flow] = fwd[:3] + (ev.seq,)
                    self.connections += 1
                ev.set_dst(*fwd[0])
                self.translated += 1
            else:
                self.passed += 1
            return
        reply = self.reply_flows.get(flow)
        if reply is not None:
            if ev.dir == reply[1]:
                ev.set_src(*reply[0])
                self.translated += 1
            else:
                self.passed += 1
            return
        src, dst, sport, dport = ev.src_ip, ev.dst_ip, ev.sport, ev.dport
        if (dst, dport) == self.vip:
            backend = choose_backend(src, sport, dst, dport, ev.proto, self.backends)
            key = (src, sport) + backend
            self.forward[flow] = (backend, key, ev.dir, ev.seq if _is_syn(ev) else None)
            self.connections += 1
            self.reverse.setdefault(key, [self.vip, 0])[1] += 1
            ev.set_dst(*backend)
            self.translated += 1
        else:
            entry = self.reverse.get((dst, dport, src, sport))
            if entry is not None:
                vip = entry[0]
                self.reply_flows[flow] = (vip, ev.dir)
                ev.set_src(*vip)
                self.translated += 1
            else:
                self.passed += 1

    def on_end(self, ev):
        flow = ev.flow
        fwd = self.forward.pop(flow, None)
        if fwd is not None:
            entry = self.reverse[fwd[1]]
            entry[1] -= 1
            if not entry[1]:
                del self.reverse[fwd[1]]
        self.reply_flows.pop(flow, None)


def make(name="l4lb", vip=DEFAULT_VIP, backends=DEFAULT_BACKENDS):
    return L4LB(name, vip, backends)
