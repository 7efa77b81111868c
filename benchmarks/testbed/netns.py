"""Network-namespace plumbing shared by every bed of veths that mbx tests and
benchmarks build: the Table 3 test bed (``benchmarks/testbed/bed.py``), the interop
bed (``tests/interop/netns.py``) and the port tests (``tests/test_afpacket.py``,
``tests/test_dpdk.py``).

Namespaces are named ``PREFIX<pid>-ROLE`` after the process that made them, so a
later run can tell a namespace whose maker died (and delete it, killing what still
runs inside by PID) from one in use by a run going on in parallel.
"""
import contextlib
import os
import re
import signal
import subprocess

TIMEOUT = 20.0      # default bound for one command


class NetnsError(RuntimeError):
    """A namespace command failed (the beds raise their own subclass)."""

    __test__ = False


def run(argv, timeout=TIMEOUT, check=True, error=NetnsError, **kw):
    """Run ``argv`` with its output captured; raise ``error`` naming the command and
    its stderr when it fails and ``check`` is set, or when it outlives ``timeout``
    (whatever ``check``: a command that hangs has no result to look at)."""
    try:
        r = subprocess.run(argv, capture_output=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired:
        raise error(f"{' '.join(map(str, argv))}: still running after {timeout:g} s, "
                    "stopped") from None
    if check and r.returncode != 0:
        err = r.stderr.decode(errors="replace") if isinstance(r.stderr, bytes) else r.stderr
        raise error(f"{' '.join(map(str, argv))}: exit {r.returncode}: {err.strip()}")
    return r


def in_ns(ns, *argv):
    """``argv`` run inside namespace ``ns``."""
    return ["ip", "netns", "exec", ns, *argv]


def probe(prefix):
    """None if ``ip netns add`` works here, else why not (a namespace named after
    ``prefix`` and this process is made and deleted)."""
    name = f"{prefix}{os.getpid()}-probe"
    # a probe whose process was killed between the add and the delete (a suite cut
    # short by a timeout) is left behind, matched by no other pattern: reaped here
    reap_stale(re.compile(rf"^{re.escape(prefix)}(\d+)-probe$"))
    try:
        r = run(["ip", "netns", "add", name], check=False, timeout=10)
        if r.returncode != 0:
            return f"ip netns add fails here: {r.stderr.decode(errors='replace').strip()}"
    finally:
        run(["ip", "netns", "del", name], check=False, timeout=10)
    return None


def list_netns():
    r = run(["ip", "netns", "list"], check=False, timeout=10)
    return [line.split()[0] for line in r.stdout.decode().splitlines() if line.strip()]


def pid_alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie is not running: check its state
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


def proc_start(pid):
    """When process ``pid`` started (clock ticks since boot, /proc/PID/stat field 22),
    or None if there is no such process.  A PID with another start time is another
    process: the PID was reused."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return int(fh.read().rsplit(")", 1)[1].split()[19])
    except (OSError, IndexError, ValueError):
        return None


def ns_pids(ns):
    r = run(["ip", "netns", "pids", ns], check=False, timeout=10)
    return [int(t) for t in r.stdout.decode().split() if t.isdigit()]


def delete_ns(ns):
    """Kill what still runs in namespace ``ns`` (by PID) and delete it."""
    for pid in ns_pids(ns):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    run(["ip", "netns", "del", ns], check=False, timeout=10)


def reap_stale(pattern):
    """Delete the namespaces matching ``pattern`` (a compiled regex whose first
    group is the maker's PID) whose maker is gone."""
    for ns in list_netns():
        m = pattern.match(ns)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            delete_ns(ns)


# Offloads off on a veth: a user-space middlebox or capture must see wire-sized
# frames whose checksums are final, not 64 KiB GSO/GRO super-frames or frames with a
# partial checksum left for a NIC that does not exist.
OFFLOADS_OFF = ("rx", "off", "tx", "off", "tso", "off", "gso", "off", "gro", "off")


def offloads_off(ns, dev, check=True, error=NetnsError):
    return run(in_ns(ns, "ethtool", "-K", dev, *OFFLOADS_OFF), check=check, error=error)
