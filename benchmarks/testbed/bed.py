"""The test bed: three network namespaces joined by veth pairs, nginx backends, and a
middlebox in one of several modes.

    client ns                 middlebox ns                          servers ns
    c0 198.18.1.1/24 ---- m-cli [198.18.1.254] | m-srv [198.18.2.254] ---- s0 198.18.2.1/24
                                                                              198.18.2.2/24
    VIP 198.18.3.1:80 (routed by the client via 198.18.1.254)

Modes (``MODES``):

``kernel``
    ``ip_forward=1`` in the middlebox and an nftables DNAT of the VIP to the two
    backends (round robin, ``numgen inc``); conntrack reverse-translates the replies.
``haproxy``
    HAProxy owns the VIP (on the middlebox's ``lo``) and proxies to the backends; no
    forwarding.
``mbx-l2fwd``, ``mbx-l4lb``, ``pybridge``
    "Bridge" modes: the middlebox namespace has no addresses and no forwarding, and an
    nftables ``netdev`` ingress rule drops everything its kernel would receive on the
    two veths.  Packet sockets still see every frame, since they are served before that
    hook.  A user-space process bridges ``m-cli`` and ``m-srv``:
    ``mbx run l2fwd|l4lb --in afpacket:m-cli,m-srv`` or, for ``pybridge``, a naive
    Python AF_PACKET bridge (``benchmarks/testbed/pybridge.py``) that checks the
    plumbing without mbx.  The client's and the servers' neighbour entries for their
    gateways name the MAC address of the veth on the far side, so frames bridged
    unchanged arrive addressed to their receiver.  For ``mbx-l4lb`` the client talks to
    the VIP, mbx rewrites the destination to a backend, and the backends answer the
    client directly through the bridge, where mbx puts the VIP back as the source.
    ``mbx-l2fwd`` and ``pybridge`` do not translate: the client talks to backend 1.
``mbx-l4lb-dpdk``
    ``mbx-l4lb`` through DPDK's own AF_PACKET driver instead of mbx's port:
    ``--in dpdk:net_af_packet0,iface=m-cli,...+net_af_packet1,iface=m-srv,...`` (a
    ``DpdkBridge``), which polls and sleeps ``DPDK_IDLE_US`` once idle.

Everything is torn down by ``Bed.close()``: from ``__exit__``, ``atexit`` and the
SIGTERM/SIGHUP handlers that ``install_signal_handlers`` sets (they raise
``Interrupted``, a KeyboardInterrupt, as SIGINT does).  ``close()`` holds SIGINT,
SIGTERM and SIGHUP until it is done (``signals_held``), so a second Ctrl-C cannot cut
it short.  Processes are stopped by the PIDs we hold, namespaces are deleted
(anything still running in them is killed by PID first), and ``close()`` checks that
none is left.  Namespace names carry the PID of the run (``mbxt<pid>-cli``), and so
does its work directory (``/tmp/mbx-testbed-<pid>-XXXXXXXX``, with an ``.owner``
record); those of earlier runs whose process is gone are removed on start.
"""
from __future__ import annotations

import atexit
import contextlib
import hashlib
import importlib.util
import json
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

from . import netns

CLIENT_IP = "198.18.1.1"
MB_CLIENT_IP = "198.18.1.254"
MB_SERVER_IP = "198.18.2.254"
BACKENDS = ("198.18.2.1", "198.18.2.2")
VIP = "198.18.3.1"
HTTP_PORT = 80
PREFIX_LEN = 24

IF_CLIENT = "c0"       # in the client namespace
IF_MB_CLIENT = "m-cli"  # in the middlebox namespace, facing the client
IF_MB_SERVER = "m-srv"  # in the middlebox namespace, facing the servers
IF_SERVER = "s0"       # in the servers namespace

MODES = ("kernel", "haproxy", "mbx-l2fwd", "mbx-l4lb", "mbx-l4lb-dpdk", "pybridge")
BRIDGE_MODES = ("mbx-l2fwd", "mbx-l4lb", "mbx-l4lb-dpdk", "pybridge")
# Bridges that can run with the veths' offloads on: mbx's own AF_PACKET port with
# offloads=1 takes super-frames and unfinished checksums with the kernel's
# virtio_net_hdr and hands them back.  DPDK's net_af_packet and the Python bridge
# have no such header.
OFFLOAD_BRIDGE_MODES = ("mbx-l2fwd", "mbx-l4lb")
MBX_MODES = ("mbx-l2fwd", "mbx-l4lb", "mbx-l4lb-dpdk")
L4LB_MODES = ("mbx-l4lb", "mbx-l4lb-dpdk")
# mbx-l4lb-dpdk: the DPDK bridge polls; on cores shared with the client and the
# servers it sleeps this long once idle (DpdkBridge idle_us).
DPDK_IDLE_US = 20

# name -> size of the files nginx serves (as /NAME.bin); "big" is the correctness
# download, its size set by Bed(big_size=...)
FILE_SIZES = {"64": 64, "8k": 8 << 10}
BIG_SIZE = 32 << 20

HAPROXY_MAXCONN = 9000  # the open-files hard limit here is 20000: more is refused
PREFIX = "mbxt"
_NS_RE = re.compile(rf"^{PREFIX}(\d+)-(cli|mb|srv)$")
STATE_DIR = "/run/mbx-testbed"
TIMEOUT = 20.0


class TestbedError(netns.NetnsError):
    """The test bed could not be set up, or a command in it failed."""

    __test__ = False


class CleanupError(TestbedError):
    """Clean-up left namespaces behind: nothing more should be set up."""


class Interrupted(KeyboardInterrupt):
    """SIGTERM or SIGHUP (``install_signal_handlers``): unwinds like Ctrl-C."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


WORKDIR_PREFIX = "mbx-testbed-"
_WORKDIR_RE = re.compile(rf"^{WORKDIR_PREFIX}(\d+)-[a-z0-9_]{{8}}$")
OWNER_FILE = ".owner"   # {"pid", "start"} of the run that made a work directory
# `setup --tag`: namespace names are TAG-cli etc. and the state file TAG.json
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,31}$")


def tag_problem(tag):
    """None if ``tag`` can name a bed set up by hand, else what is wrong with it."""
    if not TAG_RE.match(tag):
        return ("a tag is 1-32 letters, digits, '_' or '-', starting with a letter or "
                "digit")
    if re.match(rf"^{PREFIX}\d+$", tag):
        return f"{PREFIX}<digits> is kept for the namespaces of runs"
    return None


def check_options(mode, **options):
    """None if ``mode`` can run with these bed options, else why not (every reason,
    joined by "; ")."""
    return "; ".join(option_problems(mode, **options)) or None


def option_problems(mode, offloads=False, mbx_port="", mbx_nf="", **_):
    """Why ``mode`` cannot run with these bed options, every reason ([] if it can):
    checked for every mode of a run before anything is measured."""
    if mode not in MODES:
        return [f"unknown mode {mode!r}; modes: {', '.join(MODES)}"]
    reasons = []
    if mode in BRIDGE_MODES and offloads and mode not in OFFLOAD_BRIDGE_MODES:
        reasons.append(f"mode {mode} bridges raw frames without the kernel's "
                       "offload metadata: offloads must be off (modes that "
                       f"can have them: {', '.join(OFFLOAD_BRIDGE_MODES)})")
    if mbx_port and mode in MBX_MODES:
        reasons.append(_port_options_problem(mode, mbx_port,
                                             offloads and mode in OFFLOAD_BRIDGE_MODES))
    if mbx_nf and mode in L4LB_MODES:
        reasons.append(_nf_problem(mbx_nf))
    return [r for r in reasons if r]


def mbx_bridge_spec(mode, mbx_port="", offloads=False):
    """The port spec of the bridge an mbx mode runs (its --in and --out): what
    ``Bed.mbx_command`` runs and ``check_options`` checks up front."""
    if mode == "mbx-l4lb-dpdk":
        # DPDK's own AF_PACKET driver on each veth; framecnt above its default
        # 512, which drops under load (docs/guide.md).
        spec = "dpdk:" + "+".join(f"net_af_packet{k},iface={dev},framecnt=2048"
                                  for k, dev in enumerate((IF_MB_CLIENT, IF_MB_SERVER)))
        return spec + "?" + (mbx_port or f"idle_us={DPDK_IDLE_US}")
    options = [o for o in (mbx_port, "offloads=1" if offloads else "") if o]
    spec = f"afpacket:{IF_MB_CLIENT},{IF_MB_SERVER}"
    return spec + "?" + "&".join(options) if options else spec


def _port_options_problem(mode, opts, offloads=False):
    """The bridge's spec checked as ``mbx run`` will check it when it opens the
    bridge (mbx.ports.check_spec: every option and value, AF_PACKET or DPDK), so
    that a bad --mbx-port is refused before the bed is set up."""
    try:
        from mbx.errors import MbxError
        from mbx.ports import check_spec
    except ImportError:  # pragma: no cover (the mode is refused as unavailable)
        return None
    try:
        check_spec(mbx_bridge_spec(mode, opts, offloads))
    except MbxError as exc:
        return f"--mbx-port {opts!r}: {exc}"
    return None


def _nf_problem(nf):
    if nf.endswith(".py") or os.sep in nf:
        if not os.path.isfile(nf):
            return f"--mbx-nf {nf}: no such file"
        return None
    try:
        from mbx.runtime import BUILTIN_NFS
    except ImportError:  # pragma: no cover
        return None
    if nf not in BUILTIN_NFS and ":" not in nf:
        return (f"--mbx-nf {nf!r}: not a built-in NF ({', '.join(BUILTIN_NFS)}), a .py "
                "file or module:attribute")
    return None


def run(argv, timeout=TIMEOUT, check=True, **kw):
    return netns.run(argv, timeout=timeout, check=check, error=TestbedError, **kw)


REQUIRED_TOOLS = {"ip": "iproute2", "nft": "nftables", "ethtool": "ethtool",
                  "sysctl": "procps", "nginx": "nginx-light", "curl": "curl",
                  "wrk": "wrk", "ab": "apache2-utils"}
MODE_TOOLS = {"haproxy": {"haproxy": "haproxy"}}


def unavailable(modes=()):
    """None if the test bed can run ``modes`` here, else the reason it cannot."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, veths, nftables)"
    tools = dict(REQUIRED_TOOLS)
    for m in modes:
        tools.update(MODE_TOOLS.get(m, {}))
    missing = sorted({pkg for tool, pkg in tools.items() if shutil.which(tool) is None})
    if missing:
        return f"missing Debian packages: {' '.join(missing)}"
    reason = netns.probe(PREFIX)
    if reason:
        return reason
    for m in modes:
        if m in MBX_MODES:
            reason = dpdk_unavailable() if m == "mbx-l4lb-dpdk" else afpacket_unavailable()
            if reason:
                return reason
    return None


def afpacket_unavailable():
    """None if this mbx can open ``afpacket:IF0,IF1`` bridges, else why not."""
    try:
        from mbx import ports
    except ImportError as exc:  # pragma: no cover (mbx is installed with the bench)
        return f"mbx is not importable: {exc}"
    schemes = getattr(ports, "KNOWN_SCHEMES", ())
    if "afpacket" not in schemes or importlib.util.find_spec("mbx._afpacket") is None:
        return ("mbx was built without the afpacket port (mbx.ports knows "
                f"{', '.join(schemes) or 'no'} schemes; modes {', '.join(MBX_MODES)} need "
                "open_input('afpacket:IF0,IF1'))")
    return None


def dpdk_unavailable():
    """None if this mbx has the DPDK port (``dpdk:VDEV0+VDEV1`` bridges), else why
    not."""
    if importlib.util.find_spec("mbx._dpdkport") is None:
        return ("mbx was built without DPDK (mode mbx-l4lb-dpdk needs mbx._dpdkport: "
                "apt-get install libdpdk-dev dpdk pkg-config, then reinstall mbx)")
    return None


list_netns = netns.list_netns
pid_alive = netns.pid_alive
ns_pids = netns.ns_pids
delete_ns = netns.delete_ns


def reap_stale(tmp=None):
    """Delete namespaces and work directories of earlier runs whose process is gone."""
    netns.reap_stale(_NS_RE)
    reap_workdirs(tmp)


def _owner_gone(path, pid):
    """True if the work directory ``path`` (named after ``pid``) is the bed's own and
    its owner is gone: its ``.owner`` record names that PID, and that process is not
    running or is another one (another start time)."""
    try:
        st = os.lstat(path)
        if not os.path.isdir(path) or os.path.islink(path) or st.st_uid != os.geteuid():
            return False
        owner = os.path.join(path, OWNER_FILE)
        if os.path.islink(owner):
            return False
        with open(owner) as fh:
            rec = json.load(fh)
    except (OSError, ValueError):
        return False    # no record (a kept or set-up bed, or not ours): left alone
    if not isinstance(rec, dict) or rec.get("pid") != pid or pid == os.getpid():
        return False
    return not pid_alive(pid) or netns.proc_start(pid) != rec.get("start")


def reap_workdirs(tmp=None):
    """Remove work directories of runs that died without cleaning up (SIGKILL): only
    ``mbx-testbed-<pid>-XXXXXXXX`` directories holding an owner record whose process
    is gone.  Returns the removed paths."""
    tmp = tmp or tempfile.gettempdir()
    removed = []
    try:
        names = os.listdir(tmp)
    except OSError:
        return removed
    for name in names:
        m = _WORKDIR_RE.match(name)
        path = os.path.join(tmp, name)
        if m and _owner_gone(path, int(m.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def write_owner(workdir, pid=None):
    """Record the process that owns ``workdir`` (``reap_workdirs`` checks it)."""
    pid = os.getpid() if pid is None else pid
    with open(os.path.join(workdir, OWNER_FILE), "w") as fh:
        json.dump({"pid": pid, "start": netns.proc_start(pid)}, fh)


def _drop_owner(workdir):
    """The work directory outlives its run (``setup``, MBX_TESTBED_KEEP): never reap it."""
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(workdir, OWNER_FILE))


HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def signals_held():
    """Run the block to its end whatever SIGINT/SIGTERM/SIGHUP arrive, then act on
    them as usual (Ctrl-C's KeyboardInterrupt once the block is done).  They are
    blocked in this thread, so the commands the block starts (``ip netns del``)
    inherit the mask and a Ctrl-C to the terminal's process group spares them, and
    recorded by a quiet handler should another thread take one.  In another thread
    than the main one (where Python handles signals) this is a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = {sig: signal.signal(sig, lambda signum, frame: caught.append(signum))
           for sig in HELD_SIGNALS}
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, HELD_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        for sig, handler in old.items():
            signal.signal(sig, handler)
        for sig in dict.fromkeys(caught):
            signal.raise_signal(sig)


def stop_pid(pid, sig=signal.SIGTERM, timeout=5.0, popen=None):
    """Stop one process we started, by its PID: ``sig``, wait, then SIGKILL."""
    if popen is not None:
        if popen.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            popen.send_signal(sig)
        try:
            popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            popen.kill()
            popen.wait(timeout=timeout)
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _read(path):
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return b""


def mac_of(bed, role, dev):
    r = bed.ip(role, "-j", "link", "show", dev)
    return json.loads(r.stdout)[0]["address"]


def cpu_mask():
    n = os.cpu_count() or 1
    return format((1 << n) - 1, "x")


class Bed:
    """``with Bed(mode) as bed: ...``; see the module docstring."""

    __test__ = False

    def __init__(self, mode, workdir=None, big_size=BIG_SIZE, offloads=False, rps=False,
                 static_neigh=True, http_reuse="never", haproxy_mode="http", tag=None,
                 mbx_duration=3600.0, mbx_argv=None, new_session=False, mbx_port="",
                 mbx_nf=""):
        reason = check_options(mode, offloads=offloads)
        if reason:
            raise TestbedError(reason)
        self.mode = mode
        self.workdir = workdir
        self.big_size = big_size
        self.offloads = offloads
        self.rps = rps
        self.static_neigh = static_neigh
        self.http_reuse = http_reuse
        self.haproxy_mode = haproxy_mode
        self.tag = tag or f"{PREFIX}{os.getpid()}"
        # bound of the mbx/pybridge process in seconds (0: none; `setup`, which has an
        # explicit teardown)
        self.mbx_duration = mbx_duration
        self.new_session = new_session  # `setup`: daemons outlive us, away from the tty
        self.mbx_argv = mbx_argv  # override of the mbx command (tests, integration)
        self.mbx_port = mbx_port  # AF_PACKET options of the mbx bridge ("ring=v3&...")
        self.mbx_nf = mbx_nf      # mbx-l4lb: the NF to run instead of the built-in l4lb
        self.ns = {}
        self.files = {}          # name -> {"path", "size", "sha256", "url_path"}
        self.procs = []          # [(role name, Popen)] in start order
        self.middlebox = []      # [(name, pid)] whose CPU is the middlebox's
        self.started_pids = []   # every daemon we started (checked after close)
        self.pid_starts = {}     # pid -> its start time (teardown checks it is the same)
        self.mb_json = None      # mbx/pybridge --json counters file
        self.mb_counters = None  # ... read back after the process stopped
        self._closed = False
        self._own_workdir = False
        self._detached = False
        self._old_handlers = {}

    # -- context ----------------------------------------------------------------------
    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def target_ip(self):
        """Where the client sends its requests."""
        return BACKENDS[0] if self.mode in ("mbx-l2fwd", "pybridge") else VIP

    def url(self, name):
        return f"http://{self.target_ip}:{HTTP_PORT}/{name}.bin"

    # -- commands in the namespaces ---------------------------------------------------
    def ip(self, role, *args, check=True):
        return run(["ip", "-n", self.ns[role], *args], check=check)

    def exec(self, role, argv, timeout=TIMEOUT, check=True, **kw):
        return run(["ip", "netns", "exec", self.ns[role], *argv], timeout=timeout,
                   check=check, **kw)

    def sysctl(self, role, key, value, check=True):
        return self.exec(role, ["sysctl", "-q", "-w", f"{key}={value}"], check=check)

    def write_sys(self, role, path, value):
        # /sys of the namespace: `ip netns exec` mounts the namespace's own sysfs
        return self.exec(role, ["sh", "-c", f"echo {value} > {path}"])

    def nft(self, role, script):
        return self.exec(role, ["nft", "-f", "-"], input=script.encode())

    def popen(self, role, name, argv, middlebox=False, **kw):
        """Start ``argv`` in a namespace; ``ip netns exec`` execs it, so the PID we hold
        is the program's own.  Stopped by that PID in ``close()``."""
        kw.setdefault("stdin", subprocess.DEVNULL)
        kw.setdefault("start_new_session", self.new_session)
        p = subprocess.Popen(["ip", "netns", "exec", self.ns[role], *argv], **kw)
        self.procs.append((name, p))
        self.started_pids.append(p.pid)
        self.pid_starts[p.pid] = netns.proc_start(p.pid)
        if middlebox:
            self.middlebox.append((name, p.pid))
        return p

    @contextlib.contextmanager
    def checksums_verified(self):
        """Within the block every checksum that leaves the middlebox is finished in
        software and verified by the receiving TCP.  With offloads off that is so
        anyway.  With offloads on a receiver trusts a checksum left to the device
        (CHECKSUM_PARTIAL crosses a veth unverified), so a wrong one, such as a
        bridge's bad update of a partial checksum, would pass every check: tx
        checksumming goes off on the middlebox's two veths (TSO with it; the kernel
        then cuts super-frames and finishes checksums on the way out), and the
        features are put back as they were, which is checked, after the block."""
        if not self.offloads:
            yield
            return
        devs = (IF_MB_CLIENT, IF_MB_SERVER)

        def features(dev):
            return self.exec("mb", ["ethtool", "-k", dev]).stdout

        before = {dev: features(dev) for dev in devs}
        try:
            for dev in devs:
                self.exec("mb", ["ethtool", "-K", dev, "tx", "off"])
            yield
        finally:
            for dev in devs:
                self.exec("mb", ["ethtool", "-K", dev, "tx", "on"], check=False)
            changed = [dev for dev in devs if features(dev) != before[dev]]
            if changed:
                raise TestbedError(f"offload features of {', '.join(changed)} not "
                                   "restored after the checksum-verified checks")

    def netns_inode(self, role):
        """``net:[inode]`` of a namespace, as /proc/PID/ns/net reads for its processes."""
        st = os.stat(f"/run/netns/{self.ns[role]}")
        return f"net:[{st.st_ino}]"

    # -- set-up -----------------------------------------------------------------------
    def start(self):
        atexit.register(self.close)
        reap_stale()
        if self.workdir is None:
            # named after us, with an owner record: a later bed removes it should we
            # die without cleaning up (reap_workdirs)
            self.workdir = tempfile.mkdtemp(prefix=f"{WORKDIR_PREFIX}{os.getpid()}-")
            self._own_workdir = True
            write_owner(self.workdir)
        os.makedirs(self.workdir, exist_ok=True)
        os.chmod(self.workdir, 0o755)  # nginx workers run as nobody
        self.ns = {role: f"{self.tag}-{role}" for role in ("cli", "mb", "srv")}
        for role, name in self.ns.items():
            if name in list_netns():
                raise TestbedError(f"namespace {name} exists already (teardown first)")
            run(["ip", "netns", "add", name])
            # No IPv6 at all: no router solicitations, MLD or DAD frames through the
            # bridge (and none to account for in the middlebox's packet counts).
            self.sysctl(role, "net.ipv6.conf.all.disable_ipv6", "1")
            self.sysctl(role, "net.ipv6.conf.default.disable_ipv6", "1")
            self.ip(role, "link", "set", "lo", "up")
        self.ip("cli", "link", "add", IF_CLIENT, "type", "veth", "peer", "name",
                IF_MB_CLIENT, "netns", self.ns["mb"])
        self.ip("srv", "link", "add", IF_SERVER, "type", "veth", "peer", "name",
                IF_MB_SERVER, "netns", self.ns["mb"])
        links = [("cli", IF_CLIENT), ("mb", IF_MB_CLIENT), ("mb", IF_MB_SERVER),
                 ("srv", IF_SERVER)]
        for role, dev in links:
            if not self.offloads:
                # Offloads off on every veth (the default).  A user-space middlebox
                # that reads plain frames would see 64 KiB TSO/GSO super-frames it
                # cannot send out of a 1500-byte link, checksums left unfinished for
                # the sending device (the L4LB updates them incrementally, so they
                # must be right), and GRO merges.  The same settings in every mode,
                # so the kernel and HAProxy rows are not favoured by offloads a
                # bridge without them cannot use.  With offloads on, the mbx bridges
                # use the AF_PACKET port's offloads=1 (the kernel's virtio_net_hdr
                # with each frame), so every mode gets the offloads.
                netns.offloads_off(self.ns[role], dev, error=TestbedError)
            self.ip(role, "link", "set", dev, "up")
            if self.rps:
                # Off by default.  A veth hands a packet over in the sender's context;
                # RPS spreads that receive work over the CPUs, but each hand-over is
                # an IPI, which in this KVM guest costs more than the spread gains
                # (docs/testbed.md, "Link settings").
                self.write_sys(role, f"/sys/class/net/{dev}/queues/rx-0/rps_cpus",
                               cpu_mask())
        self.ip("cli", "addr", "add", f"{CLIENT_IP}/{PREFIX_LEN}", "dev", IF_CLIENT)
        for b in BACKENDS:
            self.ip("srv", "addr", "add", f"{b}/{PREFIX_LEN}", "dev", IF_SERVER)
        self.ip("cli", "route", "add", f"{VIP}/32", "via", MB_CLIENT_IP)
        self.ip("cli", "route", "add", f"{BACKENDS[0].rsplit('.', 1)[0]}.0/{PREFIX_LEN}",
                "via", MB_CLIENT_IP)
        self.ip("srv", "route", "add", "default", "via", MB_SERVER_IP)
        # Many short connections: the whole ephemeral range on every side, and
        # TIME_WAIT reuse for outgoing connections (HAProxy's to the backends).
        for role in ("cli", "mb", "srv"):
            self.sysctl(role, "net.ipv4.ip_local_port_range", "1024 65000")
            self.sysctl(role, "net.ipv4.tcp_tw_reuse", "1")
            self.sysctl(role, "net.core.somaxconn", "4096")
            self.sysctl(role, "net.ipv4.tcp_max_syn_backlog", "4096")
        if self.mode in BRIDGE_MODES:
            self._setup_bridge_plumbing()
        else:
            self._setup_router_plumbing()
        self._make_files()
        self._start_nginx()
        if self.mode == "kernel":
            self._setup_kernel_lb()
        elif self.mode == "haproxy":
            self._start_haproxy()
        elif self.mode in MBX_MODES:
            self._start_mbx()
        elif self.mode == "pybridge":
            self._start_pybridge()

    def _setup_router_plumbing(self):
        self.ip("mb", "addr", "add", f"{MB_CLIENT_IP}/{PREFIX_LEN}", "dev", IF_MB_CLIENT)
        self.ip("mb", "addr", "add", f"{MB_SERVER_IP}/{PREFIX_LEN}", "dev", IF_MB_SERVER)
        if self.static_neigh:
            # ARP off the measured path (in every mode alike)
            c0, s0 = mac_of(self, "cli", IF_CLIENT), mac_of(self, "srv", IF_SERVER)
            mcli, msrv = mac_of(self, "mb", IF_MB_CLIENT), mac_of(self, "mb", IF_MB_SERVER)
            self.ip("cli", "neigh", "replace", MB_CLIENT_IP, "lladdr", mcli, "dev",
                    IF_CLIENT, "nud", "permanent")
            self.ip("srv", "neigh", "replace", MB_SERVER_IP, "lladdr", msrv, "dev",
                    IF_SERVER, "nud", "permanent")
            self.ip("mb", "neigh", "replace", CLIENT_IP, "lladdr", c0, "dev", IF_MB_CLIENT,
                    "nud", "permanent")
            for b in BACKENDS:
                self.ip("mb", "neigh", "replace", b, "lladdr", s0, "dev", IF_MB_SERVER,
                        "nud", "permanent")

    def _setup_bridge_plumbing(self):
        # No addresses, no forwarding: the middlebox's kernel must not answer, route or
        # reset anything; and it drops whatever it would receive on the two veths.
        # The packet sockets of the user-space bridge are served before this hook
        # (taps come before ingress in __netif_receive_skb_core), so they see all.
        self.sysctl("mb", "net.ipv4.ip_forward", "0")
        self.nft("mb", f"""
table netdev mbxt_bridge {{
    chain from_client {{ type filter hook ingress device "{IF_MB_CLIENT}" priority 0;
                         policy drop; }}
    chain from_servers {{ type filter hook ingress device "{IF_MB_SERVER}" priority 0;
                          policy drop; }}
}}
""")
        # The gateways' neighbour entries name the far side's MAC: a frame the bridge
        # passes unchanged is addressed to the veth that receives it.  Nobody owns the
        # gateway addresses in this mode, so these entries are required (ARP requests
        # would be bridged and go unanswered).
        c0, s0 = mac_of(self, "cli", IF_CLIENT), mac_of(self, "srv", IF_SERVER)
        self.ip("cli", "neigh", "replace", MB_CLIENT_IP, "lladdr", s0, "dev", IF_CLIENT,
                "nud", "permanent")
        self.ip("srv", "neigh", "replace", MB_SERVER_IP, "lladdr", c0, "dev", IF_SERVER,
                "nud", "permanent")

    def _setup_kernel_lb(self):
        self.sysctl("mb", "net.ipv4.ip_forward", "1")
        b0, b1 = BACKENDS
        self.nft("mb", f"""
table ip mbxt_lb {{
    chain prerouting {{
        type nat hook prerouting priority dstnat; policy accept;
        ip daddr {VIP} tcp dport {HTTP_PORT} dnat to numgen inc mod 2 map {{ 0 : {b0}, 1 : {b1} }}
    }}
}}
""")

    def _make_files(self):
        www = os.path.join(self.workdir, "www")
        os.makedirs(www, exist_ok=True)
        os.chmod(www, 0o755)
        rng = random.Random(20180820)  # the same bodies every run
        sizes = dict(FILE_SIZES, big=self.big_size)
        for name, size in sizes.items():
            data = rng.randbytes(size)
            path = os.path.join(www, f"{name}.bin")
            with open(path, "wb") as fh:
                fh.write(data)
            os.chmod(path, 0o644)
            self.files[name] = {"path": path, "size": size, "url_path": f"/{name}.bin",
                                "sha256": hashlib.sha256(data).hexdigest()}

    def _start_nginx(self):
        for i, addr in enumerate(BACKENDS):
            d = os.path.join(self.workdir, f"nginx{i}")
            os.makedirs(d, exist_ok=True)
            conf = f"""
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 8192;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{ worker_connections 4096; multi_accept on; }}
http {{
    access_log off;
    client_body_temp_path {d}/body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_timeout 60s;
    keepalive_requests 1000000;
    server {{
        listen {addr}:{HTTP_PORT} backlog=4096;
        root {self.workdir}/www;
    }}
}}
"""
            path = os.path.join(d, "nginx.conf")
            with open(path, "w") as fh:
                fh.write(conf)
            with open(os.path.join(d, "stderr.log"), "wb") as log:
                self.popen("srv", f"nginx{i}", ["nginx", "-p", d, "-c", path, "-e",
                                                f"{d}/error.log"], stdout=log, stderr=log)
        for i, addr in enumerate(BACKENDS):
            self._wait_listen("srv", addr, f"nginx{i}",
                              os.path.join(self.workdir, f"nginx{i}", "error.log"))

    def _wait_listen(self, role, addr, name, log, timeout=10.0):
        proc = dict(self.procs)[name]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise TestbedError(f"{name} exited {proc.returncode}: "
                                   f"{_read(log).decode(errors='replace')[-2000:]}")
            r = run(["ss", "-N", self.ns[role], "-Hltn", f"src {addr}:{HTTP_PORT}"],
                    check=False, timeout=5)
            if r.stdout.strip():
                return
            time.sleep(0.05)
        raise TestbedError(f"{name} did not listen on {addr}:{HTTP_PORT} within {timeout} s")

    def haproxy_config(self):
        d = os.path.join(self.workdir, "haproxy")
        servers = "\n".join(f"    server s{i} {b}:{HTTP_PORT}" for i, b in enumerate(BACKENDS))
        http = self.haproxy_mode == "http"
        return f"""
global
    nbthread 1
    maxconn {HAPROXY_MAXCONN}
    pidfile {d}/haproxy.pid
    # no log target: nothing to syslog inside the namespace

defaults
    mode {self.haproxy_mode}
    timeout connect 5s
    timeout client 30s
    timeout server 30s
{"    timeout http-request 10s" if http else ""}
{"    timeout http-keep-alive 30s" if http else ""}
{"    option http-keep-alive" if http else ""}
{f"    http-reuse {self.http_reuse}" if http else ""}

frontend fe
    bind {VIP}:{HTTP_PORT}
    maxconn {HAPROXY_MAXCONN}
    default_backend be

backend be
    balance roundrobin
{servers}
"""

    def _start_haproxy(self):
        d = os.path.join(self.workdir, "haproxy")
        os.makedirs(d, exist_ok=True)
        self.ip("mb", "addr", "add", f"{VIP}/32", "dev", "lo")
        path = os.path.join(d, "haproxy.cfg")
        with open(path, "w") as fh:
            fh.write(self.haproxy_config())
        run(["haproxy", "-c", "-q", "-f", path])
        log = os.path.join(d, "stderr.log")
        with open(log, "wb") as fh:
            # -db: foreground, no master process: the PID we hold is the one process
            # (one thread) that does all the work
            self.popen("mb", "haproxy", ["haproxy", "-db", "-f", path], middlebox=True,
                       stdout=fh, stderr=fh)
        self._wait_listen("mb", VIP, "haproxy", log)

    def mbx_command(self):
        """The middlebox process of the mbx modes (argv, run in the middlebox ns)."""
        if self.mbx_argv is not None:
            return list(self.mbx_argv)
        spec = mbx_bridge_spec(self.mode, self.mbx_port, self.offloads)
        app = "l2fwd" if self.mode == "mbx-l2fwd" else (self.mbx_nf or "l4lb")
        # the name `mbx run` gives the NF, which its --set options must use
        key = os.path.splitext(os.path.basename(app))[0] if app.endswith(".py") else app
        # --out names the same bridge: mbx.ports.open_ports() makes the input bridge
        # its own output then (one object receives on both veths and sends each
        # packet out of the other one); --duration bounds the run even if we die
        # (none for `setup`: it runs until teardown).
        argv = [sys.executable, "-c", "import sys; from mbx.cli import main; "
                "sys.argv[0] = 'mbx'; sys.exit(main())",
                "run", app, "--in", spec, "--out", spec]
        if self.mbx_duration:
            argv += ["--duration", f"{self.mbx_duration:g}"]
        argv += ["--json", self.mb_json, "-q"]
        if self.mode in L4LB_MODES:
            argv += ["--set", f"{key}.vip={VIP}:{HTTP_PORT}", "--set",
                     f"{key}.backends=" + ",".join(f"{b}:{HTTP_PORT}" for b in BACKENDS)]
        return argv

    def _start_mbx(self):
        reason = (dpdk_unavailable() if self.mode == "mbx-l4lb-dpdk"
                  else afpacket_unavailable())
        if reason and self.mbx_argv is None:
            raise TestbedError(f"mode {self.mode}: {reason}")
        self.mb_json = os.path.join(self.workdir, "mbx-counters.json")
        self._start_bridge_process("mbx", self.mbx_command())

    def _start_pybridge(self):
        self.mb_json = os.path.join(self.workdir, "pybridge-counters.json")
        script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "pybridge.py")
        self._start_bridge_process("pybridge", [
            sys.executable, script, IF_MB_CLIENT, IF_MB_SERVER, "--duration",
            f"{self.mbx_duration or 0:g}", "--json", self.mb_json, "--ready",
            os.path.join(self.workdir, "pybridge.ready")])

    def _start_bridge_process(self, name, argv):
        log = os.path.join(self.workdir, f"{name}.log")
        with open(log, "wb") as fh:
            p = self.popen("mb", name, argv, middlebox=True, stdout=fh, stderr=fh)
        # Ready when a request goes through: the process has its sockets open.
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if p.poll() is not None:
                raise TestbedError(f"{name} exited {p.returncode}: "
                                   f"{_read(log).decode(errors='replace')[-3000:]}")
            r = self.exec("cli", ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                  "--max-time", "1", self.url("64")], check=False, timeout=5)
            if r.stdout == b"200":
                return
            time.sleep(0.1)
        raise TestbedError(f"{name}: no request went through within 20 s: "
                           f"{_read(log).decode(errors='replace')[-3000:]}")

    # -- state for `setup` / `teardown` -----------------------------------------------
    def state(self):
        return {"tag": self.tag, "mode": self.mode, "ns": self.ns, "workdir": self.workdir,
                "own_workdir": self._own_workdir,
                # [name, pid, start time]: teardown signals only the same process
                "pids": [(name, p.pid, self.pid_starts.get(p.pid))
                         for name, p in self.procs],
                "url": {n: self.url(n) for n in self.files}}

    def detach(self, state_path):
        """Leave everything running (``setup``): ``teardown_state`` stops it later."""
        os.makedirs(os.path.dirname(state_path), exist_ok=True)
        with open(state_path, "w") as fh:
            json.dump(self.state(), fh, indent=1)
        if self._own_workdir:
            _drop_owner(self.workdir)   # teardown removes it, not a later run
        self._detached = True
        self._closed = True
        atexit.unregister(self.close)

    # -- tear-down ----------------------------------------------------------------------
    def stop_middlebox(self):
        """Stop the middlebox process(es) (SIGINT: mbx prints and writes its counters)
        and read their counters back."""
        for name, p in self.procs:
            if (name, p.pid) in self.middlebox:
                stop_pid(p.pid, signal.SIGINT if name != "haproxy" else signal.SIGTERM,
                         timeout=10, popen=p)
        if self.mb_json and os.path.exists(self.mb_json):
            with contextlib.suppress(ValueError, OSError):
                with open(self.mb_json) as fh:
                    self.mb_counters = json.load(fh)

    def close(self):
        """Stop everything and delete the namespaces, to the end: signals are held
        meanwhile (``signals_held``) and a failing step does not skip the next."""
        if self._closed:
            return
        self._closed = True
        with signals_held():
            self._close()

    def _close(self):
        failed = []

        def step(what, fn, *args, **kw):
            try:
                fn(*args, **kw)
            except Exception as exc:
                failed.append(f"{what}: {exc}")

        step("stopping the middlebox", self.stop_middlebox)
        for name, p in reversed(self.procs):
            step(f"stopping {name}", stop_pid, p.pid, signal.SIGQUIT if
                 name.startswith("nginx") else signal.SIGTERM, popen=p)
        left = list(self.ns.values())
        for _ in range(2):
            for name in left:
                step(f"deleting {name}", delete_ns, name)
            try:
                left = [n for n in list_netns() if n in self.ns.values()]
            except netns.NetnsError as exc:
                failed.append(f"listing namespaces: {exc}")
            if not left:
                break
        atexit.unregister(self.close)
        if self._own_workdir and self.workdir:
            if os.environ.get("MBX_TESTBED_KEEP"):
                _drop_owner(self.workdir)
            else:
                shutil.rmtree(self.workdir, ignore_errors=True)
        if left:
            raise CleanupError(f"namespaces left behind: {left}"
                               + (f" ({'; '.join(failed)})" if failed else ""))


def same_process(pid, start, netns_names=()):
    """True if ``pid`` still is the process that was recorded: the same start time,
    or, for a record without one (older state files), a process inside one of the
    bed's namespaces ``netns_names``."""
    if not pid_alive(pid):
        return False
    if start is not None:
        return netns.proc_start(pid) == start
    try:
        mine = os.readlink(f"/proc/{pid}/ns/net")
    except OSError:
        return False
    for ns in netns_names:
        with contextlib.suppress(OSError):
            if mine == f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]":
                return True
    return False


def teardown_state(state_path):
    """Stop what ``setup`` left running (by the PIDs it recorded, each only if it is
    still the process recorded) and delete it.  The state read back gains
    ``stopped`` and ``skipped`` ([name, pid, why])."""
    with open(state_path) as fh:
        st = json.load(fh)
    st["stopped"], st["skipped"] = [], []
    with signals_held():
        for entry in reversed(st["pids"]):
            name, pid = entry[0], entry[1]
            start = entry[2] if len(entry) > 2 else None
            if not pid_alive(pid):
                st["skipped"].append([name, pid, "not running"])
            elif not same_process(pid, start, st["ns"].values()):
                st["skipped"].append([name, pid, "another process has that PID now"])
            else:
                stop_pid(pid, signal.SIGQUIT if name.startswith("nginx")
                         else signal.SIGTERM)
                st["stopped"].append([name, pid])
        for ns in st["ns"].values():
            delete_ns(ns)
    workdir = st.get("workdir") or ""
    # only a directory the bed made (its name), never one a stale or edited state
    # file points at
    if (st.get("own_workdir") and os.path.basename(workdir).startswith(WORKDIR_PREFIX)
            and os.path.isdir(workdir) and not os.path.islink(workdir)):
        shutil.rmtree(workdir, ignore_errors=True)
    os.unlink(state_path)
    return st


def install_signal_handlers():
    """SIGTERM and SIGHUP unwind like SIGINT (through ``finally`` and ``close()``)."""
    def handler(signum, frame):
        raise Interrupted(signum)

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, handler)
