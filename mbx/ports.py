"""Open packet ports from a spec string such as ``pcap:trace.pcap``.

A spec is ``SCHEME:ARG``.  Only capture files (``pcap:FILE``) exist so far; live
interfaces (``afpacket:IF``) and DPDK ports (``dpdk:ARGS``) come later and are
refused with a message that says which schemes this build knows.  A bare path ending
in ``.pcap``, ``.pcapng`` or ``.cap`` is taken as a capture file, so shell
completion of file names works as expected.
"""

from __future__ import annotations

from mbx._pcap import PcapReader, PcapWriter
from mbx.errors import PortError

__all__ = ["KNOWN_SCHEMES", "open_input", "open_output"]

#: Schemes this build can open.
KNOWN_SCHEMES: tuple[str, ...] = ("pcap",)
# Schemes planned but not built yet: named so the error says "not available" rather
# than "unknown", which would suggest a typo.
_PLANNED_SCHEMES = ("afpacket", "dpdk")
_CAPTURE_SUFFIXES = (".pcap", ".pcapng", ".cap")


def _parse(spec: str) -> tuple[str, str]:
    """Split ``spec`` into (scheme, argument), or raise PortError."""
    if not isinstance(spec, str) or not spec:
        raise PortError(f"empty or non-string port spec {spec!r}; "
                        f"expected SCHEME:ARG with a scheme in {', '.join(KNOWN_SCHEMES)}")
    scheme, sep, arg = spec.partition(":")
    scheme = scheme.lower()
    if sep and scheme in KNOWN_SCHEMES:
        if not arg:
            raise PortError(f"port spec {spec!r} names no file after '{scheme}:'")
        return scheme, arg
    if sep and scheme in _PLANNED_SCHEMES:
        raise PortError(f"port scheme {scheme!r} ({spec!r}) is not available yet; "
                        f"known schemes: {', '.join(KNOWN_SCHEMES)}")
    if spec.lower().endswith(_CAPTURE_SUFFIXES):
        return "pcap", spec
    raise PortError(f"unknown port spec {spec!r}; expected SCHEME:ARG with a scheme in "
                    f"{', '.join(KNOWN_SCHEMES)} (or a file ending in "
                    f"{', '.join(_CAPTURE_SUFFIXES)})")


def open_input(spec: str, port_id: int = 0) -> PcapReader:
    """Open the port ``spec`` for receiving; frames are tagged with ``port_id``.

    ``pcap:FILE`` (or a bare ``FILE.pcap``/``.pcapng``/``.cap``) replays a capture
    file.  Raises :class:`~mbx.errors.PortError` for an unknown scheme or a file that
    cannot be opened, :class:`~mbx.errors.CaptureFormatError` for one that is not a
    usable capture.
    """
    scheme, arg = _parse(spec)
    if scheme == "pcap":
        return PcapReader(arg, port_id)
    raise AssertionError(f"scheme {scheme!r} parsed but not handled")  # pragma: no cover


def open_output(spec: str) -> PcapWriter:
    """Open the port ``spec`` for sending.

    ``pcap:FILE`` writes a classic pcap file with nanosecond timestamps (the file is
    created or truncated).  A ``.pcapng`` name still gets classic pcap: every reader
    tells the two apart by their magic, not by the name.  Raises
    :class:`~mbx.errors.PortError` for an unknown scheme or a file that cannot be
    created.
    """
    scheme, arg = _parse(spec)
    if scheme == "pcap":
        return PcapWriter(arg)
    raise AssertionError(f"scheme {scheme!r} parsed but not handled")  # pragma: no cover
