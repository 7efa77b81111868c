"""Open packet ports from a spec string such as ``pcap:trace.pcap``.

A spec is ``SCHEME:ARG``.  Capture files are ``pcap:FILE``; live interfaces are
``afpacket:IF`` (one interface) or ``afpacket:CLIENT_IF,SERVER_IF`` (the middlebox
bridge between two interfaces: one object receives from both and sends each packet
out of the other one, so it is the input and the output of a run; see
:func:`open_ports`).  AF_PACKET options follow a ``?``:
``afpacket:veth0,veth1?fanout=7&block_count=128`` (keys: ``ring`` (``v2``, the
default, or ``v3``), ``fanout`` (a group id; a bridge's server side takes the next,
or ``G0,G1``; ``new``: ids the kernel picks), ``fanout_mode`` (``flow``, the
default, keeps every packet of a flow on one member; see ``AfPacketPort``),
``fanout_defrag``
(``1``, the default: the kernel rebuilds IPv4 datagrams before it picks a member),
``block_size``, ``block_count``,
``frame_size``, ``timeout_ms``, ``retire_ms``, ``promisc``, ``duration``,
``offloads``: ``offloads=1`` takes TSO/GRO super-frames and unfinished checksums
from the kernel and hands them back, see ``AfPacketPort``; ``outgoing``: whether one
interface's input receives what the host sends out of it too, by default yes
unless the run's output is that interface).  DPDK virtual devices
are ``dpdk:VDEV[,ARGS]`` (e.g. ``dpdk:net_pcap0,rx_pcap=in.pcap``), when mbx was
built with DPDK; mbx's own options follow a ``?``: ``link_wait=S`` (how long a port
that sends waits for its link, default 10 s), ``tx_wait_ms=N`` (how long a send waits
for room in the device's ring before it drops; default 500 for ``net_memif``, 0 for
other drivers) and, for a bridge of two devices (``dpdk:VDEV0[,ARGS]+VDEV1[,ARGS]``),
``idle_us=N``.  Option values are checked when
the spec is read (:func:`check_spec`), before anything is opened.  A bare path ending
in ``.pcap``, ``.pcapng`` or ``.cap`` is taken as a capture file, so shell
completion of file names works as expected.
"""

from __future__ import annotations

import contextlib
import os
import re

from mbx._packet import Port
from mbx._pcap import PcapReader, PcapWriter
from mbx.errors import PortError

__all__ = ["KNOWN_SCHEMES", "LINK_WAIT_S", "DeferredOutput", "check_spec", "check_stacks",
           "open_input", "open_output", "open_ports", "other_packet_sockets", "output_spec",
           "port_counters", "read_by_every_stack", "stack_spec", "written_files"]

#: Schemes this build can open.
KNOWN_SCHEMES: tuple[str, ...] = ("pcap", "afpacket", "dpdk")
_CAPTURE_SUFFIXES = (".pcap", ".pcapng", ".cap")
# A PCI address (0000:01:00.0 or 01:00.0): a NIC for DPDK, which needs EAL with
# PCI access and hugepages; the DPDK port attaches virtual devices only so far.
_PCI_ADDRESS = re.compile(r"^([0-9a-fA-F]{4}:)?[0-9a-fA-F]{2}:[0-9a-fA-F]{2}\.[0-7]$")


def _parse(spec: str) -> tuple[str, str]:
    """Split ``spec`` into (scheme, argument), or raise PortError."""
    if not isinstance(spec, str) or not spec:
        raise PortError(f"empty or non-string port spec {spec!r}; "
                        f"expected SCHEME:ARG with a scheme in {', '.join(KNOWN_SCHEMES)}")
    scheme, sep, arg = spec.partition(":")
    scheme = scheme.lower()
    if sep and scheme in KNOWN_SCHEMES:
        if not arg:
            what = {"afpacket": "interface", "dpdk": "vdev"}.get(scheme, "file")
            raise PortError(f"port spec {spec!r} names no {what} after '{scheme}:'")
        if scheme == "dpdk" and _PCI_ADDRESS.match(arg.partition(",")[0]):
            raise PortError(f"DPDK PCI devices ({spec!r}) are not available yet; known "
                            f"schemes: {', '.join(KNOWN_SCHEMES)} (dpdk with a virtual "
                            f"device, e.g. dpdk:net_pcap0,rx_pcap=FILE)")
        return scheme, arg
    if sep and re.fullmatch(r"[a-z][a-z0-9_]*", scheme) and not os.path.exists(spec):
        # "pcp:demo.pcap": a misspelt scheme, not a file of that name
        raise PortError(f"unknown port scheme {scheme!r} in {spec!r}; known schemes: "
                        f"{', '.join(KNOWN_SCHEMES)} (a bare capture file name works too)")
    if spec.lower().endswith(_CAPTURE_SUFFIXES):
        return "pcap", spec
    if os.path.isfile(spec):
        # a capture by another name (tcpdump -C's x.pcap1, x.pcap.gz): say how
        raise PortError(f"{spec!r} is a file, but not named as a capture (.pcap, "
                        f".pcapng, .cap): give it as pcap:{spec}")
    raise PortError(f"unknown port spec {spec!r}; expected SCHEME:ARG with a scheme in "
                    f"{', '.join(KNOWN_SCHEMES)} (or a file ending in "
                    f"{', '.join(_CAPTURE_SUFFIXES)})")


_TRUE, _FALSE = ("1", "yes", "true", "on"), ("0", "no", "false", "off")
_FLAG_VALUES = "use 1/0, yes/no, true/false, on/off"
_AFPACKET_INT = ("block_size", "block_count", "frame_size", "timeout_ms", "retire_ms")
_AFPACKET_KEYS = ("ring", "fanout") + _AFPACKET_INT + ("fanout_mode", "fanout_defrag",
                                                      "promisc", "duration", "offloads",
                                                      "outgoing")
# The ring options' values are AfPacketPort's to judge (mbx._afpacket.ring_layout),
# asked here so that a bad value is refused when the spec is read, before anything is
# set up (the test bed checks its --mbx-port options this way).


def _afpacket(spec: str, arg: str, rx: bool = True) -> tuple[list[str], dict]:
    """``IF[,IF2][?key=value&...]`` -> (interfaces, AfPacketPort keyword options).

    Every value the port would refuse is refused here, worded with the keys of the
    spec (``fanout``, not the keyword ``fanout_group``), all of a spec's problems in
    one error; ``rx``: for a port that receives (an output checks only what a
    send-only port uses)."""
    names, _, query = arg.partition("?")
    ifaces = [n.strip() for n in names.split(",")]
    if not 1 <= len(ifaces) <= 2 or not all(ifaces):
        raise PortError(f"port spec {spec!r}: expected afpacket:IF or afpacket:IF0,IF1")
    options: dict = {}
    problems = []
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key not in _AFPACKET_KEYS:
            problems.append(f"unknown option {key!r}; known: {', '.join(_AFPACKET_KEYS)}")
        elif key in options or (key == "fanout" and "fanout_group" in options):
            problems.append(f"{key} is given twice")
        else:
            try:
                options.update(_afpacket_option(key, value, len(ifaces)))
            except ValueError as exc:
                problems.append(str(exc))
    problem = _afpacket_ring_problem(options, rx)     # the sizes together (those valid)
    if problem:
        problems.append(problem)
    if options.get("outgoing") and len(ifaces) == 2:
        problems.append("outgoing: a bridge sends what it receives out of the other "
                        "interface, where it would receive it again")
    if problems:
        raise PortError(f"port spec {spec!r}: {'; '.join(problems)}")
    return ifaces, options


def _whole_number(value: str) -> int:
    """A spec's whole number: decimal (leading zeros allowed) or 0x hexadecimal;
    -1 for anything else, which every caller's range refuses."""
    text = value.strip().lower()
    if re.fullmatch(r"[0-9]+", text):
        return int(text, 10)
    if re.fullmatch(r"0x[0-9a-f]+", text):
        return int(text, 16)
    return -1


def _afpacket_option(key, value, sides):
    """One AF_PACKET option of a spec as AfPacketPort's keyword and value; ValueError
    saying what is wrong with the value."""
    bad = f"bad value {value!r} for {key}"
    if key == "fanout":
        return {"fanout_group": _fanout_groups(value, sides, bad)}
    if key in _AFPACKET_INT:
        number = _whole_number(value)
        if not 0 <= number <= 0x7FFFFFFF:              # what the C field holds
            raise ValueError(f"{bad}: a whole number from 0 to {0x7FFFFFFF}")
        return {key: number}
    if key == "ring":
        return {key: value}         # judged with the sizes (_afpacket_ring_problem)
    if key == "fanout_mode":
        from mbx._afpacket import check_fanout_mode
        check_fanout_mode(value)
        return {key: value}
    if key in ("promisc", "offloads", "fanout_defrag", "outgoing"):
        flag = value.lower()
        if flag not in _TRUE + _FALSE:
            raise ValueError(f"{bad}: {_FLAG_VALUES}")
        return {key: flag in _TRUE}
    try:                        # duration
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:        # also refuses nan
        raise ValueError(f"{bad}: seconds, 0 or more")
    return {key: seconds}


def _fanout_groups(value, sides, bad):
    """``fanout=`` as AfPacketPort's ``fanout_group``: a group id (a bridge's server
    side takes the next one), ``G0,G1`` (a bridge's two), or ``new`` (ids the kernel
    picks, unused: what ``--stacks`` uses, so that no other program's group is
    joined by accident).  ValueError for anything else."""
    from mbx._afpacket import NEW_GROUP
    if value == NEW_GROUP:
        return NEW_GROUP
    parts = value.split(",")
    ids = []
    for part in parts:
        ids.append(_whole_number(part))
    if len(parts) > sides or not all(0 <= g <= 0xFFFF for g in ids):
        two = ", or G0,G1 for a bridge's two sides" if sides == 2 else ""
        raise ValueError(f"{bad}: a PACKET_FANOUT group id from 0 to 65535{two}, or "
                         f"{NEW_GROUP} (ids the kernel picks)")
    if len(ids) == 2 and ids[0] == ids[1]:
        raise ValueError(f"{bad}: the two sides need two groups (Linux ties a fanout "
                         f"group to one interface)")
    return tuple(ids) if len(ids) == 2 else ids[0]


def _afpacket_ring_problem(options, rx):
    """What AfPacketPort would refuse in a combination of valid values, or None."""
    from mbx._afpacket import ring_layout
    if not rx and "fanout_group" in options:
        return "fanout: only a receiving port (an input) joins a fanout group"
    sizes = ("ring", "offloads", "frame_size", "block_size", "block_count", "retire_ms")
    try:
        ring_layout(rx=rx, **{key: options[key] for key in sizes if key in options})
    except ValueError as exc:
        return str(exc)
    return None


def _open_afpacket(spec: str, arg: str, port_id: int, rx: bool, sends_there=False):
    from mbx._afpacket import AfPacketPort, BridgePorts
    ifaces, options = _afpacket(spec, arg, rx)
    try:
        if len(ifaces) == 2:
            return BridgePorts(*ifaces, rx=rx, **options)
        if rx and "outgoing" not in options:
            # One interface: both directions, as tcpdump sees them, unless the run
            # sends out of it too (it would receive what it sent)
            options["outgoing"] = not sends_there
        elif options.get("outgoing") and sends_there:
            raise PortError(f"port spec {spec!r}: outgoing=1, and the run sends out of "
                            f"{ifaces[0]} too: it would receive what it sent again")
        return AfPacketPort(ifaces[0], port_id=port_id, rx=rx, **options)
    except ValueError as exc:
        raise PortError(f"port spec {spec!r}: {exc}") from None


#: A caller whose run may be stopped (``mbx run``'s signal handlers) sets this to its
#: stop event (anything with ``is_set()``): a port waiting for its link stops waiting
#: when it is set, instead of holding a Ctrl-C for up to ``link_wait`` seconds, and is
#: returned as it is, for a run that stops before its first burst (a signal is a
#: clean stop, not a failure of the port).
wait_cancel = None

#: How long a DPDK port that sends waits, by default, for its link to come up (a memif
#: end for its peer): ``?link_wait=S`` changes it.
LINK_WAIT_S = 10.0
#: The most ``?tx_wait_ms=N`` takes (a minute per burst); DpdkPort holds to it too.
TX_WAIT_MAX_MS = 60000
#: A DPDK port's pool, ``?mbufs=N`` (DpdkPort's ``mbufs``): its default and least.
MBUFS_DEFAULT = 8192
MBUFS_MIN = 64


def _dpdk_spec(spec: str, arg: str) -> tuple[list[str], dict]:
    """``VDEV[,ARGS][?link_wait=S&tx_wait_ms=N&mbufs=N]`` or
    ``VDEV0[,ARGS]+VDEV1[,ARGS][?idle_us=N&link_wait=S&tx_wait_ms=N&mbufs=N]`` ->
    (devices, options), every option value checked."""
    # vdev arguments use commas, so a bridge's two devices are joined by '+', and
    # mbx's own options follow a '?'
    devices, _, query = arg.partition("?")
    sides = [d.strip() for d in devices.split("+")]
    bridge = len(sides) > 1
    if bridge and (len(sides) != 2 or not all(sides)):
        raise PortError(f"port spec {spec!r}: expected dpdk:VDEV0[,ARGS]+VDEV1[,ARGS]"
                        f"[?idle_us=N&link_wait=S] for a bridge")
    if not sides[0]:
        raise PortError(f"port spec {spec!r}: names no vdev before '?'")
    if bridge:
        # two drivers on one kernel interface: each frame would go back out of the
        # interface it came from (afpacket:IF,IF is refused the same way)
        ifaces = [vdev_arg(side, "iface", "") for side in sides]
        if ifaces[0] and ifaces[0] == ifaces[1]:
            raise PortError(f"port spec {spec!r}: a bridge needs two different "
                            f"interfaces, not {ifaces[0]} twice")
    for side in sides:
        problem = vdev_problem(side)
        if problem:
            raise PortError(f"port spec {spec!r}: {problem}")
    known = (("idle_us",) if bridge else ()) + ("link_wait", "tx_wait_ms", "mbufs")
    options: dict = {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key not in known:
            why = (" (idle_us is for a bridge, dpdk:VDEV0+VDEV1: one device never "
                   "sleeps)" if key == "idle_us" else "")
            raise PortError(f"port spec {spec!r}: unknown option {key!r}; known: "
                            f"{', '.join(known)}{why}")
        if key in options:      # as afpacket: refuses it, not the last one winning
            raise PortError(f"port spec {spec!r}: {key} is given twice")
        bad = f"port spec {spec!r}: bad value {value!r} for {key}"
        if key == "idle_us":
            number = _whole_number(value)
            if not 0 <= number <= 0xFFFFFFFF:       # DpdkBridge's field
                raise PortError(f"{bad}: microseconds, a whole number from 0 to "
                                f"{0xFFFFFFFF}")
            options[key] = number
        elif key == "mbufs":
            number = _whole_number(value)
            if not MBUFS_MIN <= number <= 0xFFFFFFFF:     # DpdkPort's field
                raise PortError(f"{bad}: mbufs in each device's pool, a whole number "
                                f"from {MBUFS_MIN} to {0xFFFFFFFF} (default "
                                f"{MBUFS_DEFAULT})")
            options[key] = number
        elif key == "tx_wait_ms":
            number = _whole_number(value)
            if not 0 <= number <= TX_WAIT_MAX_MS:
                raise PortError(f"{bad}: milliseconds a send waits for room in the "
                                f"device's ring, a whole number from 0 (drop at once) "
                                f"to {TX_WAIT_MAX_MS}")
            options[key] = number
        else:   # link_wait
            try:
                seconds = float(value)
            except ValueError:
                seconds = -1.0
            if not 0 <= seconds < float("inf"):     # also refuses nan
                raise PortError(f"{bad}: seconds, 0 or more")
            options[key] = seconds
    return sides, options


def _refuse_input_sending(spec: str, devices: list[str]) -> None:
    """Refuse a lone DPDK input device given a file or interface to send to
    (net_pcap's ``tx_pcap``, ``tx_iface``): only a bridge sends out of its input, so
    nothing would ever be sent there, and net_pcap truncates a ``tx_pcap`` file as
    the device attaches, even for a run that then fails to start."""
    if len(devices) != 1 or _vdev_driver(devices[0]) != "net_pcap":
        return
    for key in ("tx_pcap", "tx_iface"):
        where = vdev_arg(devices[0], key, "")
        if where:
            raise PortError(f"port spec {spec!r}: {key}={where} on an input: a DPDK "
                            f"input sends nothing (only a bridge, dpdk:VDEV0+VDEV1, "
                            f"sends out of its input), so it would only be emptied: "
                            f"give it as the output (--out dpdk:net_pcap1,{key}=...)")


def _dpdk_port(spec: str, arg: str, port_id: int = 0, output: bool = False) -> Port:
    """A DpdkPort on the vdev ``arg``, or a DpdkBridge for ``VDEV0+VDEV1[?idle_us=N]``;
    mbx._dpdkport is imported only here, so the rest of mbx works in a build without
    DPDK.  A port that sends (``output``, a bridge, or any given ``link_wait``) is
    returned once its link is up (or once ``wait_cancel`` is set): a memif end sends
    nothing until its peer has connected, and what it is given before that is lost.
    A memif end keeps its link
    up for MEMIF_LINGER_S when it closes after it sent, for the peer to read the
    ring.  ``tx_wait_ms`` goes to each DpdkPort (its default depends on the driver:
    see MEMIF_TX_WAIT_MS)."""
    devices, options = _dpdk_spec(spec, arg)
    if not output:
        _refuse_input_sending(spec, devices)
    for path in read_files(spec):
        _refuse_non_ethernet(spec, path)
    try:
        from mbx._dpdkport import MEMIF_LINGER_S, DpdkBridge, DpdkPort
    except ImportError as exc:
        # Keep the original text: a missing DPDK symbol shows up only there.
        raise PortError(
            f"dpdk:{arg}: this mbx was built without DPDK (mbx._dpdkport cannot be "
            f"imported: {exc}). Install DPDK's development files (apt-get install "
            f"libdpdk-dev dpdk pkg-config) and reinstall mbx (pip install "
            f"--no-build-isolation .); add -Csetup-args=-Ddpdk=enabled to make a "
            f"missing libdpdk a build error") from exc
    wait = output or len(devices) == 2 or "link_wait" in options
    link_wait = options.pop("link_wait", LINK_WAIT_S)
    if len(devices) == 1:
        port = DpdkPort(devices[0], port_id=port_id, **options)
    else:
        port = DpdkBridge(*devices, **options)
    sides = port.ports if len(devices) == 2 else (port,)
    for side in sides:
        if side.driver == "net_memif":
            # closing takes the ring, and what the peer has not read yet, away
            side.linger_s = MEMIF_LINGER_S
    if wait:
        try:
            for side in sides:
                if not side.wait_for_link(link_wait, wait_cancel):
                    break       # the run is stopping: it stops before its first burst
        except BaseException:
            port.close()
            raise
    return port


def check_spec(spec: str, *, rx: bool = True) -> None:
    """Refuse (:class:`~mbx.errors.PortError`) a spec that opening it would refuse for
    its form or an option's value, without opening anything: an unknown scheme, an
    AF_PACKET option value ``AfPacketPort`` does not take (``rx=False``: checked as
    for a send-only port), a DPDK bridge or ``?`` option that is wrong, a vdev key
    its driver does not take, and (``rx``) a lone DPDK input device given a
    ``tx_pcap`` or ``tx_iface`` (only a bridge sends out of its input).  What only
    opening can tell (a missing interface or file, a driver's arguments) is left to
    the opening."""
    scheme, arg = _parse(spec)
    if scheme == "afpacket":
        _afpacket(spec, arg, rx)
    elif scheme == "dpdk":
        devices = _dpdk_spec(spec, arg)[0]
        if rx:
            _refuse_input_sending(spec, devices)


# ---------------------------------------------------------------- parallel stacks
# Each stack process of a parallel run (mbx.runtime.run_parallel, `mbx run --stacks N`)
# opens the run's ports itself.  Software RSS needs every process to see every frame
# of the input (each keeps its share of the flows), and no two may write one file.

def _vdev_driver(device: str) -> str:
    """``net_pcap1,tx_pcap=x`` -> ``net_pcap`` (DPDK also takes ``eth_`` for ``net_``)."""
    name = device.partition(",")[0].strip().lower()
    if name.startswith("eth_"):
        name = "net_" + name[4:]
    return name.rstrip("0123456789")


#: net_pcap's keys that give it something to receive (a file or an interface)
PCAP_RX_KEYS = ("rx_pcap", "rx_iface", "rx_iface_in", "iface")
# net_pcap makes a queue of each of these it is given (``iface``: one each way)
_PCAP_QUEUE_KEYS = (PCAP_RX_KEYS, ("tx_pcap", "tx_iface", "iface"))


#: The keys each documented driver takes (DPDK 22.11, from each driver's parameter
#: list).  DPDK's net_memif ignores its whole argument list when one key is unknown
#: (a typo in one throws away the socket and role), and the errors other drivers give
#: for one do not name it ("No such file or directory", "Operation not supported").
VDEV_KEYS = {
    "net_pcap": ("rx_pcap", "tx_pcap", "rx_iface", "rx_iface_in", "tx_iface", "iface",
                 "phy_mac", "infinite_rx"),
    "net_null": ("size", "copy", "no-rx"),
    "net_ring": ("nodeaction", "internal"),
    "net_memif": ("id", "role", "bsize", "rsize", "socket", "socket-abstract", "mac",
                  "zero-copy", "secret"),
    "net_af_packet": ("iface", "qpairs", "blocksz", "framesz", "framecnt", "qdisc_bypass"),
    "net_tap": ("iface", "mac", "remote", "persist"),
}


def vdev_problem(device: str) -> str | None:
    """Why mbx refuses a vdev's arguments before the driver sees them, or None: a
    key the driver does not take, or spaces around one (DPDK takes neither, and says
    so badly or not at all), for the drivers in VDEV_KEYS (others are passed on as
    they are); more queues than a DpdkPort uses (:func:`vdev_queue_problem`)."""
    driver = _vdev_driver(device)
    known = VDEV_KEYS.get(driver)
    for item in device.split(",")[1:] if known else ():
        key, _, value = item.partition("=")
        if key != key.strip() or value != value.strip():
            return (f"{item!r}: DPDK takes no spaces around a key or value of "
                    f"{driver}'s arguments: write {item.strip()!r}")
        if key not in known:
            return f"unknown key {key!r} for {driver} (known: {', '.join(known)})"
    return vdev_queue_problem(device)


def vdev_queue_problem(device: str) -> str | None:
    """Why a vdev's arguments would give it more queues than the one of each way a
    DpdkPort uses, or None: ``net_pcap`` makes a receive queue of each ``rx_pcap``
    (``rx_iface``, ...) and a send queue of each ``tx_pcap``, and a second file's
    frames would never be read, a second file never written, without a word."""
    if _vdev_driver(device) != "net_pcap":
        return None
    given = [item.partition("=")[0].strip() for item in device.split(",")[1:]]
    for rx, keys in zip((True, False), _PCAP_QUEUE_KEYS, strict=True):
        queues = [k for k in given if k in keys]
        if len(queues) < 2:
            continue
        what = (f"{queues[0]} is given twice" if len(set(queues)) == 1 else
                f"{' and '.join(dict.fromkeys(queues))} are given together")
        if rx:
            return (f"{what}: a DPDK port reads one receive queue, and the frames of "
                    f"another would never be read: give one" + (
                        " (merge the captures into one file first: mergecap -w all.pcap "
                        "a.pcap b.pcap)" if set(queues) == {"rx_pcap"} else ""))
        return (f"{what}: a DPDK port sends on one queue, and another file or "
                f"interface would get nothing: give one")
    return None


def vdev_arg(device: str, key: str, default: str) -> str:
    """The value of ``key`` in a vdev's ``NAME,k=v,k=v`` string, else ``default``."""
    for item in device.split(",")[1:]:
        k, _, value = item.partition("=")
        if k.strip() == key:
            return value.strip()
    return default


def check_stacks(spec: str, stacks: int) -> None:
    """Refuse (PortError) a port the ``stacks`` processes of a parallel run cannot
    each open: a DPDK ``net_memif`` end (one link to one peer over one socket: a
    second server finds the path taken, a second client is refused by the peer) or
    ``net_tap`` (one kernel interface, whose frames the kernel would share out
    between the processes by its own hash, not by the flows' symmetric one, so
    frames would reach a process that does not keep them), and ``net_af_packet``
    (a fanout group of each process's own, made with the defrag flag: the kernel
    rebuilds a fragmented datagram for one of the groups only).  Capture files and
    ``net_pcap`` ``tx_pcap`` files are written per process (:func:`stack_spec`);
    every other device is opened in each process and sees every frame (``net_pcap``
    files and interfaces) or lives in the process (``net_ring``, ``net_null``)."""
    if stacks <= 1:
        return
    scheme, arg = _parse(spec)
    if scheme != "dpdk":
        return
    for device in _dpdk_spec(spec, arg)[0]:
        driver = _vdev_driver(device)
        if driver == "net_memif":
            where = vdev_arg(device, "socket", "/run/memif.sock")
            why = f"a memif interface is one link to one peer (socket {where})"
        elif driver == "net_tap":
            why = (f"a tap device is one kernel interface "
                   f"({vdev_arg(device, 'iface', 'dtap0')}), whose frames the kernel "
                   f"would share out by its own hash, not by the flows' symmetric one")
        elif driver == "net_af_packet":
            # DPDK 22.11 joins each socket to a fanout group of its own with the
            # kernel's defrag flag, which it gives no option to change.  The kernel
            # keeps one reassembly queue per datagram for all AF_PACKET groups (the
            # queue's key has no group), so each fragmented datagram is rebuilt
            # once, for the group whose copy of a fragment completes it: the other
            # processes never see it, and a stack that does but does not own its
            # flow drops it (about half the datagrams lost with 2 stacks).
            iface = vdev_arg(device, "iface", "IF")
            raise PortError(f"port spec {spec!r}: net_af_packet puts each of the "
                            f"{stacks} stack processes (--stacks {stacks}) in a fanout "
                            f"group of its own with the kernel's defrag flag, and the "
                            f"kernel rebuilds each fragmented IPv4 datagram for one "
                            f"group only, so the other processes lose it: use "
                            f"afpacket:{iface}, whose one fanout group splits the flows "
                            f"among the processes, or run it in one stack process")
        else:
            continue
        raise PortError(f"port spec {spec!r}: {why}; the {stacks} stack processes of a "
                        f"parallel run (--stacks {stacks}) cannot each open it: run it "
                        f"in one stack process")


def read_by_every_stack(spec: str) -> bool:
    """Whether each stack process of a parallel run reads all of the input ``spec``
    (a capture file, a DPDK ``net_pcap`` device's file or interface), keeping its
    share: then what each counts of the input as a whole (its frames, for a device
    that hands them all over; a capture's cut-short end, its skipped frames) is the
    same in every process and merged once (``mbx.runtime.merge_snapshots``).  False
    where each frame reaches one process: an AF_PACKET fanout group, and the devices
    that live in each process (``net_null``, ``net_ring``), whose frames of other
    stacks' flows no other process sees."""
    scheme, arg = _parse(spec)
    if scheme == "pcap":
        return True
    if scheme != "dpdk":
        return False
    return all(_vdev_driver(device) == "net_pcap" for device in _dpdk_spec(spec, arg)[0])


def _dpdk_rewrite(arg: str, rename) -> str:
    """``arg`` with each net_pcap ``tx_pcap=FILE`` as ``tx_pcap=rename(FILE)``."""
    devices, sep, query = arg.partition("?")
    out = []
    for device in devices.split("+"):
        if _vdev_driver(device) == "net_pcap":
            items = device.split(",")
            for i, item in enumerate(items[1:], 1):
                key, eq, value = item.partition("=")
                if eq and key.strip() == "tx_pcap":
                    items[i] = f"{key}={rename(value.strip())}"
            device = ",".join(items)
        out.append(device)
    return "+".join(out) + sep + query


def stack_spec(spec: str, rename, *, output: bool = True) -> str:
    """The spec a stack process of a parallel run opens for ``spec``, each file it
    writes renamed by ``rename`` (``mbx.runtime.output_path``: ``FILE.stackK`` in
    stack process K): a capture output (``output``) and a DPDK ``net_pcap``
    device's ``tx_pcap`` file, in an input too."""
    scheme, arg = _parse(spec)
    if scheme == "pcap":
        return f"pcap:{rename(arg)}" if output else spec
    if scheme == "dpdk":
        return f"{spec.partition(':')[0]}:{_dpdk_rewrite(arg, rename)}"
    return spec


def written_files(spec: str, *, output: bool = True) -> list[str]:
    """The files a port opened from ``spec`` writes: a capture output's, and the
    ``tx_pcap`` file of each DPDK ``net_pcap`` device (input or output)."""
    files: list[str] = []
    try:
        stack_spec(spec, lambda path: files.append(path) or path, output=output)
    except PortError:
        return []
    return files


def open_input(spec: str, port_id: int = 0, *, sends_there: bool = False) -> Port:
    """Open the port ``spec`` for receiving; frames are tagged with ``port_id``.

    ``pcap:FILE`` (or a bare ``FILE.pcap``/``.pcapng``/``.cap``) replays a capture
    file.  Raises :class:`~mbx.errors.PortError` for an unknown scheme or a file that
    cannot be opened, :class:`~mbx.errors.CaptureFormatError` for one that is not a
    usable capture.  ``afpacket:IF`` receives live from an interface (and can send
    back out of it); ``afpacket:IF0,IF1`` is a :class:`~mbx._afpacket.BridgePorts`
    (port 0 client side, 1 server side).  One interface receives both directions,
    what the host sends out too (``?outgoing=1``, its default), unless
    ``sends_there`` (the run's output is that interface: it would receive what it
    sent) or ``?outgoing=0``.  ``dpdk:VDEV[,ARGS]`` receives from a DPDK
    virtual device (``net_pcap0,rx_pcap=FILE`` replays a capture and ends with it);
    ``dpdk:VDEV0[,ARGS]+VDEV1[,ARGS][?idle_us=N&link_wait=S]`` is a
    :class:`~mbx._dpdkport.DpdkBridge` between two, returned once both links are up
    (within ``link_wait`` seconds, default :data:`LINK_WAIT_S`; a single device waits
    only when given ``?link_wait=S``).
    """
    scheme, arg = _parse(spec)
    if scheme == "pcap":
        return PcapReader(arg, port_id)
    if scheme == "afpacket":
        return _open_afpacket(spec, arg, port_id, rx=True, sends_there=sends_there)
    if scheme == "dpdk":
        return _dpdk_port(spec, arg, port_id)
    raise AssertionError(f"scheme {scheme!r} parsed but not handled")  # pragma: no cover


def open_output(spec: str) -> Port:
    """Open the port ``spec`` for sending.

    ``pcap:FILE`` writes a classic pcap file with nanosecond timestamps (the file is
    created or truncated).  A ``.pcapng`` name still gets classic pcap: every reader
    tells the two apart by their magic, not by the name.  Raises
    :class:`~mbx.errors.PortError` for an unknown scheme or a file that cannot be
    created.  ``afpacket:IF`` sends out of an interface (a send-only socket);
    ``afpacket:IF0,IF1`` a send-only bridge (prefer :func:`open_ports`, which
    makes the bridge of the input its output too).  ``dpdk:VDEV[,ARGS][?link_wait=S]``
    is returned once the device's link is up: a ``net_memif`` end once its peer has
    connected (what is sent before is lost); PortError if that takes more than
    ``link_wait`` seconds (default :data:`LINK_WAIT_S`; 0 does not wait but only
    looks: PortError unless the link is up already).
    """
    scheme, arg = _parse(output_spec(spec))
    if scheme == "pcap":
        return PcapWriter(arg)
    if scheme == "afpacket":
        return _open_afpacket(spec, arg, 0, rx=False)
    if scheme == "dpdk":
        return _dpdk_port(spec, arg, output=True)
    raise AssertionError(f"scheme {scheme!r} parsed but not handled")  # pragma: no cover


def output_spec(spec: str) -> str:
    """``spec`` as an output takes it: ``pcap:-`` is standard output, as ``tcpdump
    -w -`` has it, written through /dev/stdout (the descriptor itself, see
    ``mbx.runtime.inherited_fd``; ``mbx run`` then prints its summary on standard
    error), not a file named "-"."""
    return "pcap:/dev/stdout" if spec.lower() == "pcap:-" else spec


class DeferredOutput:
    """An output port opened only when called: ``App.run`` calls it once the NFs
    have started and the stack is built, so a run that fails before its first
    packet leaves an existing output file as it was.  ``port`` is the opened port
    (None until then); ``close()`` closes it if it was opened."""

    def __init__(self, spec: str):
        self.spec = spec
        self.port = None

    def __call__(self) -> Port:
        if self.port is None:
            self.port = open_output(self.spec)
        return self.port

    def close(self):
        if self.port is not None:
            self.port.close()

    def __repr__(self):
        return f"<DeferredOutput {self.spec!r}{' (open)' if self.port else ''}>"


def open_ports(in_spec: str, out_spec: str | None = None, *, defer_output=False
               ) -> tuple[Port, Port | DeferredOutput | None]:
    """The (input, output) ports of a run.

    A bridge (``afpacket:IF0,IF1``, ``dpdk:VDEV0+VDEV1``) given as input is also the
    output when ``out_spec`` is omitted or names the same bridge: the middlebox sends what
    passes back out of the other interface, through the same sockets.  Otherwise
    each spec is opened on its own (no ``out_spec``: no output); with
    ``defer_output`` the output is a :class:`DeferredOutput` for ``App.run``.
    """
    if _same_capture(in_spec, out_spec):
        raise PortError(f"{out_spec or in_spec}: the output is the input capture; writing "
                        "it would destroy what is being read: name another file")
    if out_spec:
        # a bad spec or option value is refused before the input is opened
        check_spec(out_spec, rx=out_spec == in_spec)
    inp = open_input(in_spec, sends_there=_sends_to_input(in_spec, out_spec))
    try:
        if isinstance(inp, _bridge_type()) and (out_spec is None or out_spec == in_spec):
            return inp, inp
        if not out_spec:
            return inp, None
        return inp, DeferredOutput(out_spec) if defer_output else open_output(out_spec)
    except BaseException:
        inp.close()
        raise


def _sends_to_input(in_spec: str, out_spec: str | None) -> bool:
    """Whether the run's output sends out of the interface its ``afpacket:``
    input receives from (an AF_PACKET output of the same interface, or a DPDK
    ``net_af_packet`` device on it)."""
    if not out_spec:
        return False
    try:
        (si, ai), (so, ao) = _parse(in_spec), _parse(out_spec)
    except PortError:
        return False
    if si != "afpacket":
        return False
    ifaces = {n.strip() for n in ai.partition("?")[0].split(",")}
    if so == "afpacket":
        return bool(ifaces & {n.strip() for n in ao.partition("?")[0].split(",")})
    return so == "dpdk" and bool({f"iface={i}" for i in ifaces}
                                 & set(re.split(r"[,+?&]", ao)))


def bridge_output_note(in_spec: str, out_spec: str | None) -> str | None:
    """What a user should hear when ``out_spec`` takes a bridge input's place as the
    output: the bridge then forwards nothing between its interfaces (a tap that
    only records, perhaps, but often a mistake), or (another bridge, or the same
    interfaces the other way round) sends frames somewhere else.  None otherwise."""
    if not out_spec or out_spec == in_spec:
        return None
    scheme, arg = _parse(in_spec)
    bridge = (scheme == "afpacket" and "," in arg.partition("?")[0]) or (
        scheme == "dpdk" and "+" in arg.partition("?")[0])
    if not bridge:
        return None
    return (f"--out {out_spec}: the bridge {in_spec} forwards nothing between its "
            f"interfaces; what passes goes to {out_spec} only (leave --out out to "
            "forward)")


def other_packet_sockets(port) -> dict[str, int]:
    """{interface: how many other packet sockets of this network namespace are
    bound to it} for an AF_PACKET port or bridge that receives without a fanout
    group ({} otherwise).  A capture (tcpdump) there is harmless; a second bridge
    forwards every frame again, so the receiver gets each one twice."""
    sides = getattr(port, "ports", None) or (port,)
    ours = [p for p in sides if hasattr(p, "ifindex") and p.rx and p.fanout_group is None]
    own = {os.fstat(p.fileno()).st_ino for p in ours if p.fileno() >= 0}
    return _packet_sockets({p.iface: p.ifindex for p in ours}, own)


def packet_sockets_before(spec: str) -> dict[str, int]:
    """{interface: packet sockets bound to it} for the interfaces of an
    ``afpacket:`` spec, before this process opens any ({} for other schemes): what
    ``mbx run --stacks N`` warns of, as :func:`other_packet_sockets` does for one
    stack (its own processes' sockets join fanout groups of their own)."""
    import socket
    scheme, arg = _parse(spec)
    if scheme != "afpacket":
        return {}
    names = {}
    for iface in _afpacket(spec, arg)[0]:
        try:
            names[iface] = socket.if_nametoindex(iface)
        except OSError:
            pass        # opening the port says it better
    return _packet_sockets(names, set())


def links_not_ready(spec: str, out_spec: str | None = None) -> list[str]:
    """What is wrong now with the links of the ``afpacket:`` interfaces a run would
    use (``spec``, and ``out_spec``), one line each: down, or up without carrier
    (its far end down).  The run still starts and uses them once they come up, but
    until then nothing flows, which a user starting it should hear of at once, not
    only from the final counters.  Interfaces that do not exist are left to opening
    the port, which says so."""
    found = []
    for one in (spec, out_spec):
        if not one:
            continue
        try:
            scheme, arg = _parse(one)
        except PortError:
            continue
        if scheme != "afpacket":
            continue
        from mbx._afpacket import interface_link

        for iface in _afpacket(one, arg)[0]:
            state = interface_link(iface)
            if state == "down":
                found.append(f"interface {iface} is down: nothing flows through it "
                             f"until it is up (ip link set {iface} up)")
            elif state == "no carrier":
                found.append(f"interface {iface} has no carrier (its link's far end "
                             "is down or unplugged): nothing flows through it until "
                             "it has")
    return list(dict.fromkeys(found))


def coalescing_not_sendable(spec: str, out_spec: str | None = None) -> list[str]:
    """One line for each interface an ``afpacket:`` input without ``offloads=1``
    reads with GRO or LRO on, when what it reads is sent on by a live port (the
    bridge itself, or an ``afpacket:``/``dpdk:`` output).  The kernel hands a
    packet socket the frames those offloads merged, longer than the MTU and with DF
    set, so the output refuses them as too long and TCP through the middlebox
    stalls: a real NIC's default, said before the run rather than only in its
    final counters.  A capture output takes such frames as they are."""
    try:
        scheme, arg = _parse(spec)
        if scheme != "afpacket":
            return []
        ifaces, options = _afpacket(spec, arg)
        out_scheme = _parse(out_spec)[0] if out_spec else None
    except PortError:
        return []       # opening the port says what is wrong with the spec
    if options.get("offloads"):
        return []
    # sent on by a live port: the bridge itself (no other output given), or a live
    # output; a bridge whose place a capture output takes sends nothing
    if out_scheme not in ("afpacket", "dpdk") and not (len(ifaces) == 2 and not out_spec):
        return []
    from mbx._afpacket import interface_coalescing

    found = []
    for iface in ifaces:
        try:
            merged = interface_coalescing(iface)
        except PortError:
            continue
        if merged:
            what = " and ".join(merged)
            found.append(f"interface {iface} has {what} on: it merges the segments it "
                         "receives into frames longer than the MTU, which no port sends "
                         f"on whole (TCP through mbx would stall): turn it off (ethtool "
                         f"-K {iface} {' '.join(m.lower() + ' off' for m in merged)}) "
                         "or keep it and add ?offloads=1 to the port")
    return found


def _packet_sockets(ifindexes: dict[str, int], own: set[int]) -> dict[str, int]:
    # {name: sockets bound to its ifindex, not counting the inodes in own}
    if not ifindexes:
        return {}
    try:
        with open("/proc/net/packet") as fh:
            rows = [line.split() for line in fh.readlines()[1:]]
        # sk RefCnt Type Proto Iface R Rmem User Inode; R: receiving (a send-only
        # socket, bound with protocol 0, gets no frames)
        bound = [(int(r[4]), int(r[8])) for r in rows if len(r) >= 9 and r[5] == "1"]
    except (OSError, ValueError):
        return {}
    out = {}
    for name, index in ifindexes.items():
        n = sum(1 for ifindex, inode in bound if ifindex == index and inode not in own)
        if n:
            out[name] = n
    return out


def close_ports(inp, out) -> None:
    """Close a run's ports, the input first (it counts frames left unread as it
    closes), the output even when the input raises.  Called as the run's last step:
    an output's last write (a capture's buffer) can fail there as any other."""
    try:
        inp.close()
    finally:
        if out is not None and out is not inp:
            out.close()


def port_counters(inp, out) -> dict:
    """The ``ports`` block of a run's counters: ``in``, the input's counters, and
    ``out``, the output's when packets left by another port than the input (a
    bridge sends through its input; a deferred output never opened counts nothing)."""
    sent_by = out.port if isinstance(out, DeferredOutput) else out
    return {"in": inp.counters,
            "out": sent_by.counters if sent_by is not None and sent_by is not inp else None}


def port_total(port, key):
    """Counter ``key`` of a port's counters (a ``port_counters`` entry): a bridge's
    sides (``client``, ``server``) each count their own, and are added up."""
    sides = [port[s] for s in ("client", "server") if isinstance(port.get(s), dict)]
    return sum(side.get(key) or 0 for side in sides) if sides else port.get(key) or 0


def capture_file(spec):
    """The file ``spec`` names if it is a capture (``pcap:FILE``, or a bare name
    ending in .pcap, .pcapng or .cap), else None."""
    try:
        scheme, arg = _parse(spec)
    except PortError:
        return None
    return arg if scheme == "pcap" else None


def _refuse_non_ethernet(spec: str, path: str) -> None:
    """Refuse an ``rx_pcap`` capture whose frames (any pcapng interface's) are not
    Ethernet: net_pcap hands each record over as it is, so a raw IP packet (101, 228)
    or a Linux cooked one (113, 276) would be parsed as Ethernet, every frame "not
    IP", without a word (and libpcap stops reading a pcapng file, as silently, at an
    interface of another link type than its first's)."""
    from mbx._pcap import SUPPORTED_LINKTYPES, non_ethernet_interface
    from mbx.errors import CaptureFormatError

    def refuse(link, where=""):
        # pcap: is the way out only for the link types it gives an Ethernet header
        instead = (f": read it with pcap:{path} instead, which gives raw IP, Linux "
                   "cooked and loopback frames an Ethernet header"
                   if link in SUPPORTED_LINKTYPES else
                   "; net_pcap reads Ethernet frames only")
        raise PortError(f"{spec}: rx_pcap {path} holds link type {link} frames{where}, "
                        f"not Ethernet (1), and net_pcap passes them on as they "
                        f"are{instead}")

    try:
        other = non_ethernet_interface(path)
    except CaptureFormatError as exc:   # not a capture mbx reads (a link type, damage)
        if getattr(exc, "linktype", None) is not None:
            refuse(exc.linktype, "" if exc.iface is None else
                   f" (pcapng interface {exc.iface})")
        raise PortError(f"{spec}: rx_pcap {path}: {str(exc).removeprefix(f'pcap:{path}: ')}"
                        ) from None
    except PortError:
        return      # missing or unreadable: the driver says so as it attaches
    if other is not None:
        iface, link = other
        refuse(link, "" if iface is None else f" (pcapng interface {iface})")


def read_files(spec: str) -> list[str]:
    """The capture files a port opened from ``spec`` reads: ``pcap:FILE``'s, and the
    ``rx_pcap`` file of each DPDK ``net_pcap`` device."""
    try:
        scheme, arg = _parse(spec)
    except PortError:
        return []
    if scheme == "pcap":
        return [arg]
    files = []
    if scheme == "dpdk":
        for device in arg.partition("?")[0].split("+"):
            for item in device.split(",")[1:]:
                key, eq, value = item.partition("=")
                if eq and key.strip() == "rx_pcap":
                    files.append(value.strip())
    return files


def _same_capture(in_spec, out_spec):
    """Whether the run would write a capture file its input reads (the output's, or
    a DPDK input's own ``tx_pcap``), whatever the spelling of the two paths."""
    written = written_files(in_spec, output=False) + (
        written_files(out_spec) if out_spec else [])
    for w in written:
        for r in read_files(in_spec):
            try:
                if os.path.samefile(w, r):
                    return True
            except OSError:
                continue    # the output does not exist yet, or the input does not
    return False


def _bridge_type():
    """The bridge classes this build has (an input that is its own output)."""
    types = []
    with contextlib.suppress(ImportError):
        from mbx._afpacket import BridgePorts
        types.append(BridgePorts)
    with contextlib.suppress(ImportError):
        from mbx._dpdkport import DpdkBridge
        types.append(DpdkBridge)
    return tuple(types)
