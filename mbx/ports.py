"""Open packet ports from a spec string such as ``pcap:trace.pcap``.

A spec is ``SCHEME:ARG``.  Capture files are ``pcap:FILE``; live interfaces are
``afpacket:IF`` (one interface) or ``afpacket:CLIENT_IF,SERVER_IF`` (the middlebox
bridge between two interfaces: one object receives from both and sends each packet
out of the other one, so it is the input and the output of a run; see
:func:`open_ports`).  AF_PACKET options follow a ``?``:
``afpacket:veth0,veth1?fanout=7&block_count=128`` (keys: ``ring`` (``v2``, the
default, or ``v3``), ``fanout``, ``fanout_mode``, ``block_size``, ``block_count``,
``frame_size``, ``timeout_ms``, ``retire_ms``, ``promisc``, ``duration``,
``offloads``: ``offloads=1`` takes TSO/GRO super-frames and unfinished checksums
from the kernel and hands them back, see ``AfPacketPort``).  DPDK virtual devices
are ``dpdk:VDEV[,ARGS]`` (e.g. ``dpdk:net_pcap0,rx_pcap=in.pcap``), when mbx was
built with DPDK.  A bare path ending
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

__all__ = ["KNOWN_SCHEMES", "DeferredOutput", "open_input", "open_output", "open_ports",
           "port_counters"]

#: Schemes this build can open.
KNOWN_SCHEMES: tuple[str, ...] = ("pcap", "afpacket", "dpdk")
# Schemes planned but not built yet: named so the error says "not available" rather
# than "unknown", which would suggest a typo.
_PLANNED_SCHEMES: tuple[str, ...] = ()
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
    if sep and scheme in _PLANNED_SCHEMES:
        raise PortError(f"port scheme {scheme!r} ({spec!r}) is not available yet; "
                        f"known schemes: {', '.join(KNOWN_SCHEMES)}")
    if sep and re.fullmatch(r"[a-z][a-z0-9_]*", scheme) and not os.path.exists(spec):
        # "pcp:demo.pcap": a misspelt scheme, not a file of that name
        raise PortError(f"unknown port scheme {scheme!r} in {spec!r}; known schemes: "
                        f"{', '.join(KNOWN_SCHEMES)} (a bare capture file name works too)")
    if spec.lower().endswith(_CAPTURE_SUFFIXES):
        return "pcap", spec
    raise PortError(f"unknown port spec {spec!r}; expected SCHEME:ARG with a scheme in "
                    f"{', '.join(KNOWN_SCHEMES)} (or a file ending in "
                    f"{', '.join(_CAPTURE_SUFFIXES)})")


_TRUE, _FALSE = ("1", "yes", "true", "on"), ("0", "no", "false", "off")
_AFPACKET_INT = ("fanout", "block_size", "block_count", "frame_size", "timeout_ms",
                  "retire_ms")


def _afpacket(spec: str, arg: str) -> tuple[list[str], dict]:
    """``IF[,IF2][?key=value&...]`` -> (interfaces, AfPacketPort keyword options)."""
    names, _, query = arg.partition("?")
    ifaces = [n.strip() for n in names.split(",")]
    if not 1 <= len(ifaces) <= 2 or not all(ifaces):
        raise PortError(f"port spec {spec!r}: expected afpacket:IF or afpacket:IF0,IF1")
    options: dict = {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        try:
            if key in _AFPACKET_INT:
                number = int(value, 0)
                if not 0 <= number <= 0x7FFFFFFF:   # what every such C field holds
                    raise ValueError(value)
                options["fanout_group" if key == "fanout" else key] = number
            elif key in ("fanout_mode", "ring"):
                options[key] = value
            elif key in ("promisc", "offloads"):
                flag = value.lower()
                if flag not in _TRUE + _FALSE:
                    raise ValueError(value)
                options[key] = flag in _TRUE
            elif key == "duration":
                options[key] = float(value)
                if not options[key] >= 0:       # also refuses nan
                    raise ValueError(value)
            else:
                known = ("ring",) + _AFPACKET_INT + ("fanout_mode", "promisc", "duration",
                                                     "offloads")
                raise PortError(f"port spec {spec!r}: unknown option {key!r}; known: "
                                f"{', '.join(known)}")
        except ValueError:
            raise PortError(f"port spec {spec!r}: bad value {value!r} for {key}") from None
    return ifaces, options


def _open_afpacket(spec: str, arg: str, port_id: int, rx: bool):
    from mbx._afpacket import AfPacketPort, BridgePorts
    ifaces, options = _afpacket(spec, arg)
    try:
        if len(ifaces) == 2:
            return BridgePorts(*ifaces, rx=rx, **options)
        return AfPacketPort(ifaces[0], port_id=port_id, rx=rx, **options)
    except ValueError as exc:
        raise PortError(f"port spec {spec!r}: {exc}") from None


def _dpdk_port(arg: str, port_id: int = 0) -> Port:
    """A DpdkPort on the vdev ``arg``, or a DpdkBridge for ``VDEV0+VDEV1[?idle_us=N]``;
    mbx._dpdkport is imported only here, so the rest of mbx works in a build without
    DPDK."""
    try:
        from mbx._dpdkport import DpdkBridge, DpdkPort
    except ImportError as exc:
        # Keep the original text: a missing DPDK symbol shows up only there.
        raise PortError(
            f"dpdk:{arg}: this mbx was built without DPDK (mbx._dpdkport cannot be "
            f"imported: {exc}). Install DPDK's development files (apt-get install "
            f"libdpdk-dev dpdk pkg-config) and reinstall mbx (pip install "
            f"--no-build-isolation .); add -Csetup-args=-Ddpdk=enabled to make a "
            f"missing libdpdk a build error") from exc
    if "+" not in arg:
        return DpdkPort(arg, port_id=port_id)
    # A bridge: vdev arguments use commas, so the two devices are joined by '+'.
    devices, _, query = arg.partition("?")
    sides = [d.strip() for d in devices.split("+")]
    if len(sides) != 2 or not all(sides):
        raise PortError(f"port spec 'dpdk:{arg}': expected dpdk:VDEV0[,ARGS]+VDEV1[,ARGS]"
                        f"[?idle_us=N] for a bridge")
    options = {}
    for item in filter(None, query.split("&")):
        key, _, value = item.partition("=")
        if key != "idle_us":
            raise PortError(f"port spec 'dpdk:{arg}': unknown option {key!r}; known: "
                            f"idle_us")
        try:
            options[key] = int(value, 0)
        except ValueError:
            raise PortError(f"port spec 'dpdk:{arg}': bad value {value!r} for "
                            f"{key}") from None
        if options[key] < 0:
            raise PortError(f"port spec 'dpdk:{arg}': {key} must be >= 0")
    return DpdkBridge(*sides, **options)


def open_input(spec: str, port_id: int = 0) -> Port:
    """Open the port ``spec`` for receiving; frames are tagged with ``port_id``.

    ``pcap:FILE`` (or a bare ``FILE.pcap``/``.pcapng``/``.cap``) replays a capture
    file.  Raises :class:`~mbx.errors.PortError` for an unknown scheme or a file that
    cannot be opened, :class:`~mbx.errors.CaptureFormatError` for one that is not a
    usable capture.  ``afpacket:IF`` receives live from an interface (and can send
    back out of it); ``afpacket:IF0,IF1`` is a :class:`~mbx._afpacket.BridgePorts`
    (port 0 client side, 1 server side).  ``dpdk:VDEV[,ARGS]`` receives from a DPDK
    virtual device (``net_pcap0,rx_pcap=FILE`` replays a capture and ends with it);
    ``dpdk:VDEV0[,ARGS]+VDEV1[,ARGS][?idle_us=N]`` is a
    :class:`~mbx._dpdkport.DpdkBridge` between two.
    """
    scheme, arg = _parse(spec)
    if scheme == "pcap":
        return PcapReader(arg, port_id)
    if scheme == "afpacket":
        return _open_afpacket(spec, arg, port_id, rx=True)
    if scheme == "dpdk":
        return _dpdk_port(arg, port_id)
    raise AssertionError(f"scheme {scheme!r} parsed but not handled")  # pragma: no cover


def open_output(spec: str) -> Port:
    """Open the port ``spec`` for sending.

    ``pcap:FILE`` writes a classic pcap file with nanosecond timestamps (the file is
    created or truncated).  A ``.pcapng`` name still gets classic pcap: every reader
    tells the two apart by their magic, not by the name.  Raises
    :class:`~mbx.errors.PortError` for an unknown scheme or a file that cannot be
    created.  ``afpacket:IF`` sends out of an interface (a send-only socket);
    ``afpacket:IF0,IF1`` a send-only bridge (prefer :func:`open_ports`, which
    makes the bridge of the input its output too).
    """
    scheme, arg = _parse(spec)
    if scheme == "pcap":
        return PcapWriter(arg)
    if scheme == "afpacket":
        return _open_afpacket(spec, arg, 0, rx=False)
    if scheme == "dpdk":
        return _dpdk_port(arg)
    raise AssertionError(f"scheme {scheme!r} parsed but not handled")  # pragma: no cover


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
    if out_spec and _same_capture(in_spec, out_spec):
        raise PortError(f"{out_spec}: the output is the input capture; writing it would "
                        "destroy what is being read: name another file")
    if out_spec:
        _parse(out_spec)            # a bad spec is refused before the input is opened
    inp = open_input(in_spec)
    try:
        if isinstance(inp, _bridge_type()) and (out_spec is None or out_spec == in_spec):
            return inp, inp
        if not out_spec:
            return inp, None
        return inp, DeferredOutput(out_spec) if defer_output else open_output(out_spec)
    except BaseException:
        inp.close()
        raise


def port_counters(inp, out) -> dict:
    """The ``ports`` block of a run's counters: ``in``, the input's counters, and
    ``out``, the output's when packets left by another port than the input (a
    bridge sends through its input; a deferred output never opened counts nothing)."""
    sent_by = out.port if isinstance(out, DeferredOutput) else out
    return {"in": inp.counters,
            "out": sent_by.counters if sent_by is not None and sent_by is not inp else None}


def capture_file(spec):
    """The file ``spec`` names if it is a capture (``pcap:FILE``, or a bare name
    ending in .pcap, .pcapng or .cap), else None."""
    try:
        scheme, arg = _parse(spec)
    except PortError:
        return None
    return arg if scheme == "pcap" else None


def _same_capture(in_spec, out_spec):
    """Whether both specs are capture files and the output is the input's file."""
    try:
        (si, ai), (so, ao) = _parse(in_spec), _parse(out_spec)
        return si == so == "pcap" and os.path.samefile(ai, ao)
    except (PortError, OSError):
        return False        # not both files, or the output does not exist yet


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
