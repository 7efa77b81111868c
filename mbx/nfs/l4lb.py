"""L4 load balancer: a 5-tuple hash picks a backend for each connection to the VIP;
the destination is rewritten to it, and the backend's replies get the VIP back as
their source, so both directions stay consistent.  Checksums are updated
incrementally (RFC 1624) by the stack's rewrite calls.

Options: ``vip`` (``ADDR:PORT``), ``backends`` (comma-separated ``ADDR:PORT``).
"""
import ipaddress
import zlib

import mbx


def parse_endpoint(text):
    """``"198.18.3.1:80"`` or ``"[2001:db8::1]:80"`` -> (address string, port)."""
    text = text.strip()
    if text.startswith("["):
        addr, _, port = text[1:].partition("]:")
    else:
        addr, _, port = text.rpartition(":")
    try:
        return str(ipaddress.ip_address(addr)), int(port)
    except ValueError as exc:
        raise mbx.AppError(f"l4lb: bad endpoint {text!r}: expected ADDR:PORT") from exc


def choose_backend(src, sport, dst, dport, proto, backends):
    """The backend for a connection: a hash of its 5-tuple over the backend list."""
    key = f"{src}|{sport}|{dst}|{dport}|{proto}".encode()
    return backends[zlib.crc32(key) % len(backends)]


class L4LB(mbx.NF):
    def __init__(self, name="l4lb", vip="198.18.3.1:80",
                 backends="198.18.2.1:80,198.18.2.2:80"):
        super().__init__(name, writes=True)
        self.vip = parse_endpoint(vip) if isinstance(vip, str) else tuple(vip)
        if isinstance(backends, str):
            backends = [b for b in backends.split(",") if b.strip()]
        self.backends = [parse_endpoint(b) if isinstance(b, str) else tuple(b)
                         for b in backends]
        if not self.backends:
            raise mbx.AppError("l4lb: needs at least one backend")
        self.forward = {}       # flow id -> (backend, reverse key) (client -> VIP flows)
        self.reverse = {}       # (client, cport, backend, bport) -> VIP, for replies
        self.reply_flows = {}   # flow id -> VIP (backend -> client flows)
        self.translated = 0
        self.sub(mbx.PKT, self.on_packet)
        self.sub(mbx.FLOW_END, self.on_end)

    def on_packet(self, ev):
        flow = ev.flow
        if flow is None:
            return
        fwd = self.forward.get(flow)
        if fwd is not None:
            ev.set_dst(*fwd[0])
            self.translated += 1
            return
        vip = self.reply_flows.get(flow)
        if vip is not None:
            ev.set_src(*vip)
            self.translated += 1
            return
        src, dst, sport, dport = ev.src_ip, ev.dst_ip, ev.sport, ev.dport
        if (dst, dport) == self.vip:
            backend = choose_backend(src, sport, dst, dport, ev.proto, self.backends)
            key = (src, sport) + backend
            self.forward[flow] = (backend, key)
            self.reverse[key] = self.vip
            ev.set_dst(*backend)
            self.translated += 1
        else:
            vip = self.reverse.get((dst, dport, src, sport))
            if vip is not None:
                self.reply_flows[flow] = vip
                ev.set_src(*vip)
                self.translated += 1

    def on_end(self, ev):
        flow = ev.flow
        fwd = self.forward.pop(flow, None)
        if fwd is not None:
            self.reverse.pop(fwd[1], None)
        self.reply_flows.pop(flow, None)


def make(name="l4lb", vip="198.18.3.1:80", backends="198.18.2.1:80,198.18.2.2:80"):
    return L4LB(name, vip, backends)
