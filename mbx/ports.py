"""Open packet ports from a spec string such as ``pcap:trace.pcap``.

A spec is ``SCHEME:ARG``: capture files (``pcap:FILE``) and DPDK virtual devices
(``dpdk:VDEV[,ARGS]``, e.g. ``dpdk:net_pcap0,rx_pcap=in.pcap``, when mbx was built
with DPDK); live interfaces (``afpacket:IF``) come later and are refused with a
message that says which schemes this build knows.  A bare path ending
in ``.pcap``, ``.pcapng`` or ``.cap`` is taken as a capture file, so shell
completion of file names works as expected.
"""

from __future__ import annotations

import re

from mbx._packet import Port
from mbx._pcap import PcapReader, PcapWriter
from mbx.errors import PortError

__all__ = ["KNOWN_SCHEMES", "open_input", "open_output"]

#: Schemes this build can open.
KNOWN_SCHEMES: tuple[str, ...] = ("pcap", "dpdk")
# Schemes planned but not built yet: named so the error says "not available" rather
# than "unknown", which would suggest a typo.
_PLANNED_SCHEMES = ("afpacket",)
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
            what = "vdev" if scheme == "dpdk" else "file"
            raise PortError(f"port spec {spec!r} names no {what} after '{scheme}:'")
        if scheme == "dpdk" and _PCI_ADDRESS.match(arg.partition(",")[0]):
            raise PortError(f"DPDK PCI devices ({spec!r}) are not available yet; known "
                            f"schemes: {', '.join(KNOWN_SCHEMES)} (dpdk with a virtual "
                            f"device, e.g. dpdk:net_pcap0,rx_pcap=FILE)")
        return scheme, arg
    if sep and scheme in _PLANNED_SCHEMES:
        raise PortError(f"port scheme {scheme!r} ({spec!r}) is not available yet; "
                        f"known schemes: {', '.join(KNOWN_SCHEMES)}")
    if spec.lower().endswith(_CAPTURE_SUFFIXES):
        return "pcap", spec
    raise PortError(f"unknown port spec {spec!r}; expected SCHEME:ARG with a scheme in "
                    f"{', '.join(KNOWN_SCHEMES)} (or a file ending in "
                    f"{', '.join(_CAPTURE_SUFFIXES)})")


def _dpdk_port(arg: str, port_id: int = 0) -> Port:
    """A DpdkPort on the vdev ``arg``; mbx._dpdkport is imported only here, so the
    rest of mbx works in a build without DPDK."""
    try:
        from mbx._dpdkport import DpdkPort
    except ImportError as exc:
        # Keep the original text: a missing DPDK symbol shows up only there.
        raise PortError(
            f"dpdk:{arg}: this mbx was built without DPDK (mbx._dpdkport cannot be "
            f"imported: {exc}). Install DPDK's development files (apt-get install "
            f"libdpdk-dev dpdk pkg-config) and reinstall mbx (pip install "
            f"--no-build-isolation .); add -Csetup-args=-Ddpdk=enabled to make a "
            f"missing libdpdk a build error") from exc
    return DpdkPort(arg, port_id=port_id)


def open_input(spec: str, port_id: int = 0) -> Port:
    """Open the port ``spec`` for receiving; frames are tagged with ``port_id``.

    ``pcap:FILE`` (or a bare ``FILE.pcap``/``.pcapng``/``.cap``) replays a capture
    file.  Raises :class:`~mbx.errors.PortError` for an unknown scheme or a file that
    cannot be opened, :class:`~mbx.errors.CaptureFormatError` for one that is not a
    usable capture.
    """
    scheme, arg = _parse(spec)
    if scheme == "pcap":
        return PcapReader(arg, port_id)
    if scheme == "dpdk":
        return _dpdk_port(arg, port_id)
    raise AssertionError(f"scheme {scheme!r} parsed but not handled")  # pragma: no cover


def open_output(spec: str) -> Port:
    """Open the port ``spec`` for sending.

    ``pcap:FILE`` writes a classic pcap file with nanosecond timestamps (the file is
    created or truncated).  A ``.pcapng`` name still gets classic pcap: every reader
    tells the two apart by their magic, not by the name.  ``dpdk:VDEV[,ARGS]`` sends
    through a DPDK virtual device (``net_pcap1,tx_pcap=FILE`` records).  Raises
    :class:`~mbx.errors.PortError` for an unknown scheme or a file that cannot be
    created.
    """
    scheme, arg = _parse(spec)
    if scheme == "pcap":
        return PcapWriter(arg)
    if scheme == "dpdk":
        return _dpdk_port(arg)
    raise AssertionError(f"scheme {scheme!r} parsed but not handled")  # pragma: no cover
