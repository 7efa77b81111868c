"""Traffic patterns, one capture each, made by real clients against nginx.

Every scenario is ``fn(bed, outdir) -> Result``: it clears any path impairment left
behind, sets its own, captures on one of the router's veths (see ``netns``), runs
its clients with time limits, and checks that tcpdump wrote every packet.
``Result.expect`` lists, per TCP connection in order of first packet, what the
harness knows independently of any capture: the SHA-256 of each body the server
sent (from the files it served), how the connection closes, whether the handshake
completes.  ``SCENARIOS`` maps names to the functions.
"""
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field

import dpkt

from .netns import HTTP_PORT, SERVER_IP, CaptureResult

CURL_MAX_TIME = "10"
REUSED_PORT = 40123  # even, below the ephemeral range (32768+): never handed out by connect()


@dataclass
class Expect:
    """One connection: bodies (SHA-256 of each response body, in order) and close."""

    bodies: list
    close: str | tuple = "fin"    # or the closes a random impairment allows
    handshake: bool = True
    last_body_cut: bool = False  # the last body is a strict prefix of its file (aborted)


@dataclass
class Result:
    name: str
    capture: str
    cap: CaptureResult
    expect: list
    reused_port: int | None = None
    files: list = field(default_factory=list)  # the files requested, in order
    notes: str = ""
    removed: int = 0  # capture_gap: payload bytes deleted from the capture


def _curl(bed, urls, *opts, v6=False, check=True):
    argv = ["curl", "-sS", "--max-time", CURL_MAX_TIME, *(["-6"] if v6 else []), *opts]
    for u in urls:
        argv += ["-o", "/dev/null", u]
    return bed.exec("cli", argv, timeout=float(CURL_MAX_TIME) + 5, check=check)


def _begin(bed, outdir, name, impair=()):
    bed.clear_impairments()
    for direction, kw in impair:
        bed.impair(direction, **kw)
    return os.path.join(str(outdir), f"{name}.pcap")


def _end(bed, res):
    bed.clear_impairments()
    res.cap.raise_if_incomplete()
    return res


def _sha(bed, *names):
    return [bed.files[n].sha256 for n in names]


# -- a small HTTP client run in the client namespace ----------------------------------
# Modes: pipeline HOST PORT PATH...   (all GETs in one send, then read every response)
#        abort HOST PORT PATH BYTES    (read BYTES of the response, then close with RST)
#        reuse HOST PORT LPORT N PATH  (N connections from the same local port)
_CLIENT = r'''
import socket, struct, sys, time
mode, host, port, args = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4:]
fam = socket.AF_INET6 if ":" in host else socket.AF_INET
def req(path, close=False):
    c = "Connection: close\r\n" if close else ""
    return f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: mbx-interop\r\n{c}\r\n".encode()
def responses(s, n):
    buf, done = b"", 0
    while done < n:
        end = buf.find(b"\r\n\r\n")
        if end >= 0:
            head = buf[:end].decode("latin-1").lower()
            length = int(head.split("content-length:")[1].split("\r\n")[0])
            if len(buf) >= end + 4 + length:
                buf, done = buf[end + 4 + length:], done + 1
                continue
        d = s.recv(1 << 16)
        if not d:
            raise SystemExit(f"EOF after {done} of {n} responses")
        buf += d
if mode == "pipeline":
    s = socket.create_connection((host, port), timeout=10)
    s.sendall(b"".join(req(p) for p in args))
    responses(s, len(args))
    s.close()
elif mode == "abort":
    s = socket.create_connection((host, port), timeout=10)
    # linger 0: close() sends RST instead of FIN, as a killed or aborting client does
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.sendall(req(args[0]))
    got = 0
    while got < int(args[1]):
        d = s.recv(1 << 16)
        if not d:
            raise SystemExit("EOF before the abort point")
        got += len(d)
    s.close()
elif mode == "reuse":
    lport, n, path = int(args[0]), int(args[1]), args[2]
    for i in range(n):
        deadline = time.monotonic() + 5
        while True:
            s = socket.socket(fam, socket.SOCK_STREAM)
            s.settimeout(10)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind(("", lport))
                s.connect((host, port))
                break
            except OSError:  # the previous connection is still in LAST_ACK
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        # Connection: close makes nginx close first, so the TIME_WAIT is the server's
        # and the client may bind the same port again at once (Linux lets a SYN with
        # a higher sequence number reopen a TIME_WAIT connection).
        s.sendall(req(path, close=True))
        while s.recv(1 << 16):
            pass
        s.close()
'''


def _client(bed, *args, timeout=15.0, check=True):
    return bed.python("cli", _CLIENT, *args, timeout=timeout, check=check)


# -- the scenarios --------------------------------------------------------------------
def curl_small(bed, outdir):
    """Three curl runs (0 B, 64 B, 8 KiB): three connections, one body each."""
    path = _begin(bed, outdir, "curl_small")
    names = ["0", "64", "8k"]
    with bed.capture(path) as cap:
        for n in names:
            _curl(bed, [bed.url(n)])
    return _end(bed, Result("curl_small", path, cap, [Expect(_sha(bed, n)) for n in names],
                            files=names))


def curl_large(bed, outdir):
    """curl of the 16 MiB file: one connection, ~11.6k full-sized segments."""
    path = _begin(bed, outdir, "curl_large")
    with bed.capture(path) as cap:
        _curl(bed, [bed.url("16m")])
    return _end(bed, Result("curl_large", path, cap, [Expect(_sha(bed, "16m"))],
                            files=["16m"]))


def wget_2m(bed, outdir):
    """wget of the 2 MiB file (a second client implementation)."""
    path = _begin(bed, outdir, "wget_2m")
    with bed.capture(path) as cap:
        bed.exec("cli", ["wget", "-q", "--tries=1", "--timeout=5", "-O", "/dev/null",
                         bed.url("2m")], timeout=15)
    return _end(bed, Result("wget_2m", path, cap, [Expect(_sha(bed, "2m"))], files=["2m"]))


def keepalive(bed, outdir):
    """``curl URL URL URL URL``: four requests, one after another, on one connection."""
    path = _begin(bed, outdir, "keepalive")
    names = ["64", "8k", "2m", "0"]
    with bed.capture(path) as cap:
        _curl(bed, [bed.url(n) for n in names])
    return _end(bed, Result("keepalive", path, cap, [Expect(_sha(bed, *names))], files=names))


def pipelining(bed, outdir):
    """Five GETs in one send (HTTP/1.1 pipelining) from a raw socket; nginx answers
    them in order on the one connection."""
    path = _begin(bed, outdir, "pipelining")
    names = ["8k", "64", "2m", "0", "8k"]
    with bed.capture(path) as cap:
        _client(bed, "pipeline", SERVER_IP, HTTP_PORT, *[bed.files[n].url_path for n in names])
    return _end(bed, Result("pipelining", path, cap, [Expect(_sha(bed, *names))], files=names))


def abort_rst(bed, outdir):
    """A client that reads ~256 KiB of the 16 MiB file and closes with SO_LINGER 0:
    RST mid-transfer, with the server's segments still in flight."""
    path = _begin(bed, outdir, "abort_rst")
    with bed.capture(path) as cap:
        _client(bed, "abort", SERVER_IP, HTTP_PORT, bed.files["16m"].url_path, 256 << 10)
    return _end(bed, Result("abort_rst", path, cap,
                            [Expect(_sha(bed, "16m"), close="rst", last_body_cut=True)],
                            files=["16m"]))


def abort_curl(bed, outdir):
    """curl with ``--limit-rate 64k --max-time 0.5`` on the 16 MiB file: curl gives up
    with unread data in its socket, so the kernel closes with RST.  (curl 7.88 keeps
    the average rate only loosely over such a short run: megabytes get through.)"""
    path = _begin(bed, outdir, "abort_curl")
    with bed.capture(path) as cap:
        r = bed.exec("cli", ["curl", "-sS", "--limit-rate", "64k", "--max-time", "0.5",
                             "-o", "/dev/null", bed.url("16m")], timeout=10, check=False)
    if r.returncode != 28:  # 28: operation timed out
        raise AssertionError(f"curl --max-time 0.5 exited {r.returncode}, expected 28")
    return _end(bed, Result("abort_curl", path, cap,
                            [Expect(_sha(bed, "16m"), close="rst", last_body_cut=True)],
                            files=["16m"]))


def killed_curl(bed, outdir):
    """curl killed (SIGKILL, by its PID) 0.3 s into a rate-limited download of the
    16 MiB file: the kernel closes its socket, with unread data, by RST."""
    path = _begin(bed, outdir, "killed_curl")
    with bed.capture(path) as cap:
        p = bed.popen("cli", ["curl", "-sS", "--limit-rate", "64k", "--max-time", "5",
                              "-o", "/dev/null", bed.url("16m")],
                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.3)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=5)
    return _end(bed, Result("killed_curl", path, cap,
                            [Expect(_sha(bed, "16m"), close="rst", last_body_cut=True)],
                            files=["16m"]))


def lossy(bed, outdir):
    """2 % loss of the server's segments after the capture point (the capture has
    segments the client never got, then their retransmissions) and 2 % of the
    client's before it (holes in the capture, filled later); curl of 2 MiB then
    8 KiB on one connection."""
    impair = [("s2c", {"loss": 0.02}), ("c2s", {"loss": 0.02})]
    path = _begin(bed, outdir, "lossy", impair)
    names = ["2m", "8k"]
    with bed.capture(path) as cap:
        _curl(bed, [bed.url(n) for n in names])
    return _end(bed, Result("lossy", path, cap, [Expect(_sha(bed, *names))], files=names))


def reorder_dup(bed, outdir):
    """The server's segments before the capture point: 10 % reordered, 2 %
    duplicated, 1 % lost (captured on the router's client side, so the capture shows
    out-of-order segments, duplicates, holes filled by retransmissions); curl of 2 MiB."""
    impair = [("s2c", {"loss": 0.01, "dup": 0.02, "reorder": 0.10})]
    path = _begin(bed, outdir, "reorder_dup", impair)
    with bed.capture(path, where="router-client") as cap:
        _curl(bed, [bed.url("2m")])
    # A duplicated server FIN can reach the client after the first copy closed the
    # connection: the client's TIME_WAIT re-ACKs it, and the server, whose socket is
    # gone by then, answers that ACK with a RST.  So in a few runs in a hundred (the
    # FIN's chance of a duplicate) a cleanly closed connection also carries a RST.
    return _end(bed, Result("reorder_dup", path, cap,
                            [Expect(_sha(bed, "2m"), close=("fin", "rst"))],
                            files=["2m"]))


def heavy_reorder(bed, outdir):
    """The server's segments before the capture point: 25 % reordered, 3 % lost, on
    the 16 MiB download (captured on the router's client side): 25-33 holes at once
    in the capture, past the 16 out-of-order pieces a stream held before (where
    every segment after a refused one was refused too, losing 1-4 % of the stream)."""
    impair = [("s2c", {"loss": 0.03, "reorder": 0.25})]
    path = _begin(bed, outdir, "heavy_reorder", impair)
    with bed.capture(path, where="router-client") as cap:
        _curl(bed, [bed.url("16m")])
    # The server's FIN can be sent twice (lost, or held back long enough to be sent
    # again): the client's TIME_WAIT re-ACKs the second copy, and the server, whose
    # socket the first ACK closed, answers with a RST, as in reorder_dup.
    return _end(bed, Result("heavy_reorder", path, cap,
                            [Expect(_sha(bed, "16m"), close=("fin", "rst"))],
                            files=["16m"]))


def reused_port(bed, outdir):
    """Three connections from 198.18.1.1:40123 to the server, one after another
    (SO_REUSEADDR + bind): keys ``...``, ``...#2``, ``...#3``."""
    path = _begin(bed, outdir, "reused_port")
    with bed.capture(path) as cap:
        _client(bed, "reuse", SERVER_IP, HTTP_PORT, REUSED_PORT, 3, bed.files["64"].url_path)
    return _end(bed, Result("reused_port", path, cap, [Expect(_sha(bed, "64"))] * 3,
                            reused_port=REUSED_PORT, files=["64"] * 3))


def ipv6(bed, outdir):
    """curl over IPv6 (2001:db8::/32 inside the namespaces): bracketed keys."""
    path = _begin(bed, outdir, "ipv6")
    names = ["8k", "64"]
    with bed.capture(path) as cap:
        _curl(bed, [bed.url(n, v6=True) for n in names], v6=True)
    return _end(bed, Result("ipv6", path, cap, [Expect(_sha(bed, *names))], files=names))


SCENARIOS = {f.__name__: f for f in (curl_small, curl_large, wget_2m, keepalive, pipelining,
                                     abort_rst, abort_curl, killed_curl, lossy, reorder_dup,
                                     heavy_reorder, reused_port, ipv6)}


# -- derived from a real capture -------------------------------------------------------
def capture_gap(src, outdir, name="capture_gap"):
    """``src``'s capture with one server data segment (from the middle) deleted: a
    capture loss the client's ACKs prove, i.e. a hole the reassembly must skip.
    ``Result.removed`` is the number of payload bytes deleted."""
    with open(src.capture, "rb") as fh:
        rd = dpkt.pcap.Reader(fh)
        linktype = rd.datalink()
        frames = list(rd)
    data_idx = []
    for i, (_, buf) in enumerate(frames):
        ip = dpkt.ethernet.Ethernet(buf).data
        tcp = getattr(ip, "data", None)
        if isinstance(tcp, dpkt.tcp.TCP) and tcp.sport == HTTP_PORT and tcp.data:
            data_idx.append((i, tcp.seq, len(tcp.data)))
    i, seq, removed = data_idx[len(data_idx) // 2]
    # every copy of that sequence range goes (a retransmission would fill the hole)
    drop = {j for j, s, n in data_idx if s == seq and n == removed}
    path = os.path.join(str(outdir), f"{name}.pcap")
    with open(path, "wb") as fh:
        w = dpkt.pcap.Writer(fh, linktype=linktype, snaplen=262144)
        for j, (ts, buf) in enumerate(frames):
            if j not in drop:
                w.writepkt(buf, ts)
    exp = [Expect(e.bodies, e.close, e.handshake, e.last_body_cut) for e in src.expect]
    return Result(name, path, src.cap, exp, files=src.files,
                  notes=f"{removed} bytes at seq {seq} removed", removed=removed)

