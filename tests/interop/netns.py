"""A client, a router and an nginx server in three network namespaces, and tcpdump.

    client ns            router ns                         server ns
    c0 198.18.1.1 ---- r-cli 198.18.1.254 | r-srv 198.18.2.254 ---- s0 198.18.2.1
       2001:db8:1::1     2001:db8:1::fe   | 2001:db8:2::fe            2001:db8:2::1

The router (kernel forwarding) is where the path is impaired, on either side of the
capture point.  This machine's kernel has no ``sch_netem`` (CONFIG_NET_SCH_NETEM is
unset: "Specified qdisc kind is unknown"), so ``Testbed.impair`` builds the same
effects from what it does have: loss with an nftables ``numgen random ... drop`` in
the router's forward hook, duplication with ``dup to`` the next hop there, and
reordering by sending a random share of the segments through an HTB class with a
rate limit (``meta priority set 1:20``), so they leave behind later segments.

tcpdump runs in the router on one of its veths (``CAPTURE_POINTS``).  On
``router-server`` (the default) it sees the server's segments before the router
impairs them (the capture shows segments the client never got, then their
retransmissions) and the client's after (holes later filled); on ``router-client``
the other way round (the server's side shows holes, reordering and duplicates).
Only 198.18.0.0/15 and 2001:db8::/32 addresses are used, and only inside these
namespaces; nothing is added to the namespace the tests run in.

Everything is torn down by ``Testbed.close()``: from ``__exit__``, from ``atexit`` and
from a SIGTERM handler (SIGINT already raises KeyboardInterrupt).  Processes are
stopped by the PID we hold, namespaces are deleted, and ``close()`` checks that
none of ours is left.  Namespace names carry the PID of the run
(``mbxi<pid>x<n>-cli``); namespaces of earlier runs whose PID is gone are removed on
start, so a run that was SIGKILLed does not poison the next one.
"""
import atexit
import contextlib
import hashlib
import itertools
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

# The namespace plumbing is shared with the Table 3 bed (benchmarks/testbed).
_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)
from benchmarks.testbed import netns as _ns  # noqa: E402

CLIENT_IP = "198.18.1.1"
SERVER_IP = "198.18.2.1"
ROUTER_CLIENT_IP = "198.18.1.254"
ROUTER_SERVER_IP = "198.18.2.254"
CLIENT_IP6 = "2001:db8:1::1"
SERVER_IP6 = "2001:db8:2::1"
ROUTER_CLIENT_IP6 = "2001:db8:1::fe"
ROUTER_SERVER_IP6 = "2001:db8:2::fe"
HTTP_PORT = 80
CLIENT_RMEM_MAX = 1 << 20

# name -> size of the random files nginx serves (as /NAME.bin)
FILE_SIZES = {"0": 0, "64": 64, "8k": 8 << 10, "2m": 2 << 20, "16m": 16 << 20}

# where tcpdump can run: (namespace role, interface)
CAPTURE_POINTS = {"router-server": ("rtr", "r-srv"), "router-client": ("rtr", "r-cli")}
CAPTURE_AT = "router-server"
# direction -> (router interface the segments come in on, goes out on, next hop)
_PATHS = {"s2c": ("r-srv", "r-cli", CLIENT_IP), "c2s": ("r-cli", "r-srv", SERVER_IP)}
_IMPAIR_TABLE = "mbx_impair"
REORDER_CLASS_RATE = "100mbit"  # the slow lane: a 1514 B frame waits ~120 us per frame ahead

_PREFIX = "mbxi"
_NS_RE = re.compile(rf"^{_PREFIX}(\d+)(?:x\d+)?-(cli|rtr|srv)$")
_serial = itertools.count(1)
TIMEOUT = 20.0  # default bound for one command run in a namespace


class TestbedError(_ns.NetnsError):
    """The test bed could not be set up (or a command in it failed)."""


def _run(argv, timeout=TIMEOUT, check=True, **kw):
    return _ns.run(argv, timeout=timeout, check=check, error=TestbedError, **kw)


def netns_available():
    """None if namespaces can be made here, else the reason they cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veths, tc)"
    for tool in ("ip", "ss", "tc", "nft", "ethtool", "nginx", "tcpdump", "tshark", "curl",
                 "wget"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (scripts/test.sh installs it as root)"
    return _ns.probe(_PREFIX)


list_netns = _ns.list_netns
_delete_ns = _ns.delete_ns


def reap_stale():
    """Delete namespaces left by earlier runs of this harness whose process is gone."""
    _ns.reap_stale(_NS_RE)


@dataclass
class ServedFile:
    name: str
    path: str
    size: int
    sha256: str

    @property
    def url_path(self):
        return f"/{self.name}.bin"


@dataclass
class CaptureResult:
    path: str
    captured: int = -1  # tcpdump's "packets captured" (written to the file)
    received: int = -1  # tcpdump's "packets received by filter"
    dropped: int = -1   # tcpdump's "packets dropped by kernel"
    stderr: str = ""

    @property
    def complete(self):
        return self.captured >= 0 and self.dropped == 0 and self.captured == self.received

    def raise_if_incomplete(self):
        """A capture missing packets has holes no TCP endpoint saw (body checks would
        fail for that reason, not the reassembly's): refuse it."""
        if not self.complete:
            raise TestbedError(f"incomplete capture {self.path}: {self.stderr.strip()}")


@dataclass
class Testbed:
    """Context manager: ``with Testbed() as bed: ...``.  See the module docstring."""

    __test__ = False  # not a pytest test class

    workdir: str | None = None
    ipv6: bool = True
    ns: dict = field(default_factory=dict)
    files: dict = field(default_factory=dict)
    _procs: list = field(default_factory=list)
    _nginx: subprocess.Popen | None = None
    _closed: bool = False
    _own_workdir: bool = False
    _old_sigterm: object = None

    # -- set-up -----------------------------------------------------------------------
    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    def start(self):
        if self.workdir is None:
            self.workdir = tempfile.mkdtemp(prefix="mbx-interop-")
            self._own_workdir = True
        # nginx workers run as nobody and must reach the files
        os.chmod(self.workdir, 0o755)
        atexit.register(self.close)
        if threading.current_thread() is threading.main_thread():
            self._old_sigterm = signal.signal(signal.SIGTERM, self._on_sigterm)
        reap_stale()
        tag = f"{_PREFIX}{os.getpid()}x{next(_serial)}"  # beds may coexist in a process
        self.ns = {role: f"{tag}-{role}" for role in ("cli", "rtr", "srv")}
        for role, name in self.ns.items():
            _run(["ip", "netns", "add", name])
            # Before the veths exist, so they inherit it: no duplicate address
            # detection, or IPv6 addresses stay tentative for a second or two.
            self.sysctl(role, "net.ipv6.conf.default.accept_dad", "0")
            self.sysctl(role, "net.ipv6.conf.all.accept_dad", "0")
            self.ip(role, "link", "set", "lo", "up")
        self.ip("cli", "link", "add", "c0", "type", "veth", "peer", "name", "r-cli",
                "netns", self.ns["rtr"])
        self.ip("srv", "link", "add", "s0", "type", "veth", "peer", "name", "r-srv",
                "netns", self.ns["rtr"])
        addrs = [("cli", "c0", CLIENT_IP, CLIENT_IP6), ("rtr", "r-cli", ROUTER_CLIENT_IP,
                 ROUTER_CLIENT_IP6), ("rtr", "r-srv", ROUTER_SERVER_IP, ROUTER_SERVER_IP6),
                 ("srv", "s0", SERVER_IP, SERVER_IP6)]
        for role, dev, a4, a6 in addrs:
            self.ip(role, "addr", "add", f"{a4}/24", "dev", dev)
            if self.ipv6:
                self.ip(role, "-6", "addr", "add", f"{a6}/64", "dev", dev, "nodad")
            # Offloads off: a capture must show wire-sized segments with their final
            # checksums, as a middlebox on a real link would see them.  With TSO/GSO
            # the veth hands tcpdump 64 KiB super-segments, with GRO it merges them on
            # receive, and with tx checksum offload the checksums are left unfinished.
            _ns.offloads_off(self.ns[role], dev, error=TestbedError)
            self.ip(role, "link", "set", dev, "up")
        self.sysctl("rtr", "net.ipv4.ip_forward", "1")
        # The client's receive buffer may grow to CLIENT_RMEM_MAX only (the default
        # maximum here is 32 MiB, more than the largest file): a client that stops
        # reading, or reads slowly, must hold the server back as on a real path, so
        # an aborted download is aborted mid-transfer.
        self.sysctl("cli", "net.ipv4.tcp_rmem", f"4096 131072 {CLIENT_RMEM_MAX}")
        self.ip("cli", "route", "add", "default", "via", ROUTER_CLIENT_IP)
        self.ip("srv", "route", "add", "default", "via", ROUTER_SERVER_IP)
        if self.ipv6:
            self.sysctl("rtr", "net.ipv6.conf.all.forwarding", "1")
            self.ip("cli", "-6", "route", "add", "default", "via", ROUTER_CLIENT_IP6)
            self.ip("srv", "-6", "route", "add", "default", "via", ROUTER_SERVER_IP6)
        self._make_files()
        self._start_nginx()

    def _make_files(self):
        www = os.path.join(self.workdir, "www")
        os.makedirs(www, exist_ok=True)
        os.chmod(www, 0o755)
        rng = random.Random(20180820)  # fixed seed: the same bodies every run
        for name, size in FILE_SIZES.items():
            data = rng.randbytes(size)
            path = os.path.join(www, f"{name}.bin")
            with open(path, "wb") as fh:
                fh.write(data)
            os.chmod(path, 0o644)
            self.files[name] = ServedFile(name, path, size, hashlib.sha256(data).hexdigest())

    def _start_nginx(self):
        d = os.path.join(self.workdir, "nginx")
        os.makedirs(d, exist_ok=True)
        listen6 = f"listen [{SERVER_IP6}]:{HTTP_PORT};" if self.ipv6 else ""
        conf = f"""
daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type application/octet-stream;
    sendfile on;
    keepalive_timeout 30s;
    keepalive_requests 1000;
    server {{
        listen {SERVER_IP}:{HTTP_PORT};
        {listen6}
        root {self.workdir}/www;
    }}
}}
"""
        path = os.path.join(d, "nginx.conf")
        with open(path, "w") as fh:
            fh.write(conf)
        log = open(os.path.join(d, "stderr.log"), "wb")  # noqa: SIM115 (closed with nginx)
        self._nginx = self.popen("srv", ["nginx", "-p", d, "-c", path, "-e",
                                         f"{d}/error.log"], stdout=log, stderr=log)
        log.close()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self._nginx.poll() is not None:
                raise TestbedError(f"nginx exited {self._nginx.returncode}: "
                                   f"{open(os.path.join(d, 'error.log')).read()}")
            r = _run(["ss", "-N", self.ns["srv"], "-Hltn", f"sport = :{HTTP_PORT}"],
                     check=False, timeout=5)
            if r.stdout.strip():
                return
            time.sleep(0.05)
        raise TestbedError("nginx did not listen within 10 s")

    # -- commands in the namespaces ----------------------------------------------------
    def ip(self, role, *args):
        return _run(["ip", "-n", self.ns[role], *args])

    def sysctl(self, role, key, value):
        return self.exec(role, ["sysctl", "-q", "-w", f"{key}={value}"], timeout=10)

    def exec(self, role, argv, timeout=TIMEOUT, check=True, **kw):
        """Run ``argv`` in a namespace and wait (bounded); CompletedProcess."""
        return _run(["ip", "netns", "exec", self.ns[role], *argv], timeout=timeout,
                    check=check, **kw)

    def python(self, role, code, *args, timeout=TIMEOUT, check=True):
        """Run a Python snippet (``python -c``) in a namespace."""
        return self.exec(role, [sys.executable, "-c", code, *map(str, args)],
                         timeout=timeout, check=check)

    def popen(self, role, argv, **kw):
        """Start ``argv`` in a namespace; ``ip netns exec`` execs it, so the PID we hold
        is the program's own.  Stopped (by that PID) in ``close()`` if still running."""
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[role], *argv], **kw)
        self._procs.append(p)
        return p

    def url(self, name, v6=False):
        host = f"[{SERVER_IP6}]" if v6 else SERVER_IP
        return f"http://{host}:{HTTP_PORT}{self.files[name].url_path}"

    # -- path impairments --------------------------------------------------------------
    def impair(self, direction, loss=0.0, dup=0.0, reorder=0.0):
        """Impair IPv4 TCP segments going ``direction`` ("s2c" or "c2s") through the
        router: drop a share ``loss``, duplicate a share ``dup``, delay a share
        ``reorder`` behind later segments (fractions, 0..1).  Adds to what is set."""
        iif, oif, nexthop = _PATHS[direction]
        rules = []
        if loss:
            rules.append(f"numgen random mod 10000 < {round(loss * 10000)} drop")
        if dup:
            rules.append(f"numgen random mod 10000 < {round(dup * 10000)} "
                         f'dup to {nexthop} device "{oif}"')
        if reorder:
            self._slow_lane(oif)
            rules.append(f"numgen random mod 10000 < {round(reorder * 10000)} "
                         "meta priority set 1:20")
        if not rules:
            return
        script = [f"add table ip {_IMPAIR_TABLE}",
                  f"add chain ip {_IMPAIR_TABLE} impair {{ type filter hook forward priority 0;"
                  " policy accept; }"]
        script += [f'add rule ip {_IMPAIR_TABLE} impair iifname "{iif}" ip protocol tcp {r}'
                   for r in rules]
        self.exec("rtr", ["nft", "-f", "-"], input=("\n".join(script) + "\n").encode(), timeout=10)

    def _slow_lane(self, dev):
        tc = ["tc"]
        self.exec("rtr", [*tc, "qdisc", "replace", "dev", dev, "root", "handle", "1:", "htb",
                          "default", "10"], timeout=10)
        self.exec("rtr", [*tc, "class", "replace", "dev", dev, "parent", "1:", "classid",
                          "1:10", "htb", "rate", "10gbit"], timeout=10)
        self.exec("rtr", [*tc, "class", "replace", "dev", dev, "parent", "1:", "classid",
                          "1:20", "htb", "rate", REORDER_CLASS_RATE, "ceil",
                          REORDER_CLASS_RATE, "burst", "1600", "cburst", "1600"], timeout=10)

    def clear_impairments(self):
        self.exec("rtr", ["nft", "delete", "table", "ip", _IMPAIR_TABLE], check=False,
                  timeout=10)
        for dev in ("r-cli", "r-srv"):
            self.exec("rtr", ["tc", "qdisc", "del", "dev", dev, "root"], check=False,
                      timeout=10)

    # -- captures ----------------------------------------------------------------------
    @contextlib.contextmanager
    def capture(self, path, where=CAPTURE_AT, settle=0.3):
        """tcpdump on CAPTURE_POINTS[where] into ``path`` for the duration of the block.

        Stopped with SIGINT (then waited for) so the file is complete, after
        ``settle`` seconds for the last FIN/ACKs in flight.  Yields a CaptureResult
        whose counters are filled in on exit."""
        role, dev = CAPTURE_POINTS[where]
        errpath = path + ".tcpdump.log"
        err = open(errpath, "wb")  # noqa: SIM115 (closed below)
        # -Z root: tcpdump would otherwise drop to its own user before opening the file.
        # -B: a 64 MiB kernel buffer so a 16 MiB transfer is not dropped by the tap.
        # --immediate-mode: libpcap's TPACKET_V3 ring otherwise hands packets over a
        # block at a time, and what sits in a half-full block when SIGINT arrives is
        # counted as "received by filter" but never written (seen: 0 of 22 written).
        p = self.popen(role, ["tcpdump", "-i", dev, "-w", path, "-n", "-U", "-s", "0",
                              "-B", "65536", "--immediate-mode", "-Z", "root", "tcp"],
                       stdout=subprocess.DEVNULL, stderr=err)
        err.close()
        res = CaptureResult(path)
        try:
            deadline = time.monotonic() + 10
            while b"listening on" not in _read(errpath):
                if p.poll() is not None or time.monotonic() > deadline:
                    raise TestbedError(f"tcpdump did not start: {_read(errpath).decode()}")
                time.sleep(0.02)
            yield res
            time.sleep(settle)
        finally:
            _stop(p, signal.SIGINT)
            res.stderr = _read(errpath).decode(errors="replace")
            m = re.search(r"(\d+) packets? captured", res.stderr)
            res.captured = int(m.group(1)) if m else -1
            m = re.search(r"(\d+) packets? received by filter", res.stderr)
            res.received = int(m.group(1)) if m else -1
            m = re.search(r"(\d+) packets? dropped by kernel", res.stderr)
            res.dropped = int(m.group(1)) if m else -1

    # -- tear-down ---------------------------------------------------------------------
    def _on_sigterm(self, signum, frame):
        raise SystemExit(128 + signum)  # unwinds through the with-blocks and close()

    def close(self):
        if self._closed:
            return
        self._closed = True
        try:
            for p in reversed(self._procs):
                _stop(p, signal.SIGQUIT if p is self._nginx else signal.SIGTERM)
            for name in self.ns.values():
                _delete_ns(name)
            left = [n for n in list_netns() if n in self.ns.values()]
            if left:
                raise TestbedError(f"namespaces left behind: {left}")
        finally:
            if self._old_sigterm is not None:
                with contextlib.suppress(ValueError):
                    signal.signal(signal.SIGTERM, self._old_sigterm)
            atexit.unregister(self.close)
            if self._own_workdir and not os.environ.get("MBX_INTEROP_KEEP"):
                shutil.rmtree(self.workdir, ignore_errors=True)


def _read(path):
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return b""


def _stop(p, sig, timeout=5.0):
    """Stop one process we started, by its PID: ``sig``, wait, then SIGKILL."""
    if p.poll() is not None:
        return p.returncode
    with contextlib.suppress(ProcessLookupError):
        p.send_signal(sig)
    try:
        return p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        return p.wait(timeout=timeout)
