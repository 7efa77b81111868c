"""The independent reference for ``mbx flows``: the same JSON, built from tshark.

``reference(capture)`` returns a ``Reference``: ``.flows`` is exactly the
``mbx flows --json`` object (``reference_flows(capture)`` returns only that),
``.payload[key]`` the reassembled (c2s, s2c) bytes, ``.notes[key]`` what tshark did
that the comparison must know about.

How each field is obtained
--------------------------
One ``tshark -T fields`` pass gives every TCP segment's addresses, ports, flags, raw
sequence and acknowledgement numbers and payload length.  From those, in plain
Python and by the spec's own words: the split into connections (a pure SYN whose
sequence number differs from the connection's first pure SYN starts the next
connection on that endpoint pair: ``#2``, ``#3``...), the client, the key, the packet
counts, ``handshake`` and ``close``.  These use no interpretation by tshark beyond
header parsing.

The reassembled bytes come from tshark's own reassembly, ``-z follow,tcp,raw,N``
(all streams of a capture in one pass, ``FOLLOW_BATCH`` per tshark run: one run per
stream would cost a full read of the capture each).  Its rules, checked on crafted
captures against tshark 4.0: data are delivered in sequence order; an overlap keeps
the bytes delivered first (a retransmission with different content only adds its
new tail); data in SYN and RST segments count; data behind a hole that is never
filled and never acknowledged are not delivered; a hole the peer acknowledges is
skipped, but tshark writes a text marker ``[N bytes missing in capture file]\\0``
in its place, which is removed here (and counted in ``notes[key]["gaps"]``).

Comparison rules (``compare``)
------------------------------
Exact, field by field: ``schema``, ``capture``, the set of keys, and for every
connection ``pkts_c2s``, ``pkts_s2c``, ``handshake``, ``close`` (header facts, one
definition), and ``c2s_len``/``c2s_sha256``/``s2c_len``/``s2c_sha256``.

Allowed to differ, and why:
* byte fields of a connection tshark does not see as exactly one ``tcp.stream`` of
  its own (``notes[key]["streams"]`` is not one stream used by this key alone).
  tshark splits a reused port pair by its own heuristics (a SYN after FIN/RST, a
  SYN with a new sequence number), which can disagree with the spec's rule in corner
  cases; the follow output then mixes or cuts connections and is not a reference.
  Counts, handshake and close are still compared exactly.
* nothing else.  In particular the acknowledged-hole case is compared exactly: both
  definitions skip it (tshark's marker is stripped), so ``notes[key]["gaps"]`` is
  only reported alongside a mismatch to point at the likely cause.

Where the definitions are known to part (none of it occurs in the captures the
harness makes, which start every connection with a SYN and are checked to be
complete): a connection whose first pure SYN comes after other segments takes that
SYN as its first; ``#n`` counts connections per unordered endpoint pair; ICMP
errors quoting a TCP header are not segments (filtered out).
"""
import hashlib
import ipaddress
import json
import os
import re
import subprocess
from dataclasses import dataclass, field

SCHEMA = "mbx-flows/1"
FOLLOW_BATCH = 64
TSHARK_TIMEOUT = 120

FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10
_FIELDS = ["tcp.stream", "ip.src", "ipv6.src", "tcp.srcport", "ip.dst", "ipv6.dst",
           "tcp.dstport", "tcp.flags", "tcp.seq_raw", "tcp.ack_raw", "tcp.len"]
_MISSING = re.compile(rb"^\[(\d+) bytes missing in capture file\]\x00$")
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


class ReferenceError(RuntimeError):
    """tshark failed or produced output this module cannot read."""


def _tshark(args, timeout=TSHARK_TIMEOUT):
    # -n: never resolve names (198.18/15 lookups can hang for minutes)
    r = subprocess.run(["tshark", "-n", *args], capture_output=True, timeout=timeout)
    if r.returncode != 0:
        raise ReferenceError(f"tshark {' '.join(args)}: exit {r.returncode}: "
                             f"{r.stderr.decode(errors='replace').strip()}")
    return r.stdout


def endpoint(ip, port):
    """``ip:port``; IPv6 in brackets, RFC 5952 (Python's ``compressed`` is)."""
    a = ipaddress.ip_address(ip)
    return f"[{a.compressed}]:{port}" if a.version == 6 else f"{a.compressed}:{port}"


@dataclass
class Segment:
    stream: int
    src: tuple
    dst: tuple
    flags: int
    seq: int
    ack: int
    length: int

    @property
    def pure_syn(self):
        return self.flags & (SYN | ACK) == SYN

    @property
    def syn_ack(self):
        return self.flags & (SYN | ACK) == SYN | ACK


def segments(capture):
    """Every TCP segment of ``capture`` (not ICMP-quoted ones), in capture order."""
    args = ["-r", capture, "-Y", "tcp && !icmp && !icmpv6", "-T", "fields",
            "-E", "separator=/t", "-E", "occurrence=f"]
    for f in _FIELDS:
        args += ["-e", f]
    out = []
    for line in _tshark(args).decode().splitlines():
        if not line.strip():
            continue
        st, s4, s6, sp, d4, d6, dp, fl, seq, ack, ln = line.split("\t")
        out.append(Segment(int(st), (ipaddress.ip_address(s4 or s6).compressed, int(sp)),
                           (ipaddress.ip_address(d4 or d6).compressed, int(dp)),
                           int(fl, 16), int(seq), int(ack or 0), int(ln or 0)))
    return out


@dataclass
class _Conn:
    pair: frozenset
    index: int  # 1 for the first connection on the pair, 2 for #2...
    segs: list = field(default_factory=list)
    first_syn_seq: int | None = None


def split_connections(segs):
    """Segments grouped into connections by the spec's rule, in order of first packet."""
    by_pair, conns = {}, []
    for s in segs:
        pair = frozenset((s.src, s.dst))
        cur = by_pair.get(pair)
        if s.pure_syn and cur is not None and cur.first_syn_seq is not None \
                and s.seq != cur.first_syn_seq:
            cur = None
        if cur is None:
            n = by_pair[pair].index + 1 if pair in by_pair else 1
            cur = by_pair[pair] = _Conn(pair, n)
            conns.append(cur)
        if s.pure_syn and cur.first_syn_seq is None:
            cur.first_syn_seq = s.seq
        cur.segs.append(s)
    return conns


def _client_server(c):
    for s in c.segs:
        if s.pure_syn:
            return s.src, s.dst
    for s in c.segs:
        if s.syn_ack:
            return s.dst, s.src
    s = c.segs[0]
    return s.src, s.dst


def _handshake(segs, cli, srv):
    syn = any(s.pure_syn and s.src == cli for s in segs)
    synack_seqs = {(s.seq + 1) & 0xFFFFFFFF for s in segs if s.syn_ack and s.src == srv}
    ack = any(s.src == cli and s.flags & ACK and not s.flags & SYN and s.ack in synack_seqs
              for s in segs)
    return syn and bool(synack_seqs) and ack


def follow_streams(capture, streams):
    """{stream: {(ip, port): [chunks...]}} from tshark's follow,tcp,raw (with the
    missing-data markers still in, each its own chunk)."""
    result = {}
    streams = sorted(set(streams))
    for i in range(0, len(streams), FOLLOW_BATCH):
        args = ["-r", capture, "-q"]
        for n in streams[i:i + FOLLOW_BATCH]:
            args += ["-z", f"follow,tcp,raw,{n}"]
        cur, nodes = None, {}
        for line in _tshark(args).split(b"\n"):
            if line.startswith(b"Filter: tcp.stream eq "):
                cur = int(line.split()[-1])
                nodes = {}
                result[cur] = {}
            elif line.startswith(b"Node ") and cur is not None:
                n, addr = line[5:].decode().split(": ", 1)
                ip, _, port = addr.rpartition(":")
                ep = (ipaddress.ip_address(ip.strip("[]")).compressed, int(port)) \
                    if ip else None
                nodes[int(n)] = ep
                result[cur][ep] = []
            elif line.startswith(b"=") or line.startswith(b"Follow:") or cur is None:
                continue
            elif line.strip():
                side = 1 if line.startswith(b"\t") else 0
                try:
                    result[cur][nodes[side]].append(bytes.fromhex(line.strip().decode()))
                except (KeyError, ValueError) as e:
                    raise ReferenceError(f"tshark follow output for stream {cur}: {e}") \
                        from e
    return result


def _join(chunks):
    """Payload bytes with tshark's missing-data markers removed; (bytes, gaps, gap bytes)."""
    data, gaps, gap_bytes = [], 0, 0
    for c in chunks:
        m = _MISSING.match(c)
        if m:
            gaps += 1
            gap_bytes += int(m.group(1))
        else:
            data.append(c)
    return b"".join(data), gaps, gap_bytes


@dataclass
class Reference:
    flows: dict
    payload: dict  # key -> (c2s bytes, s2c bytes), None where not comparable
    notes: dict    # key -> {"streams": [...], "bytes_comparable": bool, "gaps": {...}}


def reference(capture, name=None):
    segs = segments(capture)
    conns = split_connections(segs)
    stream_users = {}
    for c in conns:
        for st in {s.stream for s in c.segs}:
            stream_users.setdefault(st, set()).add(id(c))
    comparable = {id(c): len({s.stream for s in c.segs}) == 1
                  and len(stream_users[c.segs[0].stream]) == 1 for c in conns}
    followed = follow_streams(capture, [c.segs[0].stream for c in conns
                                        if comparable[id(c)]])
    flows, payload, notes = {}, {}, {}
    for c in conns:
        cli, srv = _client_server(c)
        key = f"{endpoint(*cli)}-{endpoint(*srv)}" + (f"#{c.index}" if c.index > 1 else "")
        rec = {}
        note = {"streams": sorted({s.stream for s in c.segs}),
                "bytes_comparable": comparable[id(c)], "gaps": {}}
        if comparable[id(c)]:
            by_ep = followed.get(c.segs[0].stream, {})
            c2s, g1, b1 = _join(by_ep.get(cli, []))
            s2c, g2, b2 = _join(by_ep.get(srv, []))
            note["gaps"] = {d: (g, b) for d, g, b in (("c2s", g1, b1), ("s2c", g2, b2)) if g}
            payload[key] = (c2s, s2c)
        else:  # tshark's streams do not line up with the spec's connection
            c2s = s2c = b""
            payload[key] = None
        rec["c2s_len"] = len(c2s)
        rec["c2s_sha256"] = hashlib.sha256(c2s).hexdigest()
        rec["s2c_len"] = len(s2c)
        rec["s2c_sha256"] = hashlib.sha256(s2c).hexdigest()
        rec["pkts_c2s"] = sum(1 for s in c.segs if s.src == cli)
        rec["pkts_s2c"] = sum(1 for s in c.segs if s.src == srv)
        rec["handshake"] = _handshake(c.segs, cli, srv)
        rec["close"] = ("rst" if any(s.flags & RST for s in c.segs)
                        else "fin" if any(s.flags & FIN for s in c.segs) else "none")
        flows[key] = rec
        notes[key] = note
    doc = {"schema": SCHEMA, "capture": name or os.path.basename(capture),
           "connections": flows}
    return Reference(doc, payload, notes)


def reference_flows(capture, name=None):
    """The ``mbx flows --json`` object for ``capture``, built from tshark."""
    return reference(capture, name).flows


_BYTE_FIELDS = ("c2s_len", "c2s_sha256", "s2c_len", "s2c_sha256")
_EXACT_FIELDS = ("pkts_c2s", "pkts_s2c", "handshake", "close")


def compare(actual, ref):
    """Differences between an ``mbx flows`` object and a ``Reference`` that the rules
    in this module's docstring do not allow; [] when they agree."""
    problems = []
    exp = ref.flows
    for k in ("schema", "capture"):
        if actual.get(k) != exp[k]:
            problems.append(f"{k}: mbx {actual.get(k)!r} != reference {exp[k]!r}")
    got = actual.get("connections", {})
    for key in sorted(set(exp["connections"]) - set(got)):
        problems.append(f"{key}: missing from mbx flows")
    for key in sorted(set(got) - set(exp["connections"])):
        problems.append(f"{key}: not a connection in the reference")
    for key, e in exp["connections"].items():
        a = got.get(key)
        if a is None:
            continue
        note = ref.notes[key]
        fields = _EXACT_FIELDS + (_BYTE_FIELDS if note["bytes_comparable"] else ())
        for f in fields:
            if a.get(f) != e[f]:
                hint = f" (tshark skipped acknowledged holes: {note['gaps']})" \
                    if note["gaps"] and f in _BYTE_FIELDS else ""
                problems.append(f"{key}.{f}: mbx {a.get(f)!r} != reference {e[f]!r}{hint}")
    return problems


# -- HTTP bodies in a reassembled s2c stream ------------------------------------------
@dataclass
class HttpResponse:
    status: int
    length: int | None  # Content-Length
    body: bytes

    @property
    def complete(self):
        return self.length is not None and len(self.body) == self.length

    @property
    def sha256(self):
        return hashlib.sha256(self.body).hexdigest()


def http_responses(s2c):
    """The HTTP/1.1 responses in a server's reassembled byte stream, in order (the
    last one cut short if the transfer was).  nginx sends Content-Length for files."""
    out, pos = [], 0
    while pos < len(s2c):
        end = s2c.find(b"\r\n\r\n", pos)
        if end < 0:
            raise ValueError(f"no end of headers after offset {pos}")
        head = s2c[pos:end].decode("latin-1").split("\r\n")
        status = int(head[0].split()[1])
        length = None
        for h in head[1:]:
            name, _, value = h.partition(":")
            if name.strip().lower() == "content-length":
                length = int(value.strip())
        if length is None:
            raise ValueError(f"response at offset {pos} has no Content-Length")
        body = s2c[end + 4:end + 4 + length]
        out.append(HttpResponse(status, length, body))
        pos = end + 4 + length
    return out


def dumps(flows):
    return json.dumps(flows, indent=1, sort_keys=False)
