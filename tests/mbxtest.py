"""Helpers the tests share: reading captures with the reference reader, running NFs
over a capture, fragmenting IP datagrams, skipping what this machine lacks (but not
in CI).  Imported as ``mbxtest`` (see conftest.py for why not from it)."""
import os
import random
import struct

import dpkt
import pytest

from mbx.examples.capture import ether, tcp6, udp4, write_pcap
from mbx.ports import open_input, open_output
from mbx.runtime import App


def skip_or_fail_in_ci(reason, what="this test", allow_module_level=False):
    """A test cannot run here (``reason``: root, a tool, libdpdk is missing): in CI
    (``CI=true``), whose image provides all of them, it fails saying so; elsewhere it
    is skipped with the reason, never silently."""
    __tracebackhide__ = True        # reported where the test called it
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run {what}: {reason}", pytrace=False)
    pytest.skip(reason, allow_module_level=allow_module_level)


def read_frames(path):
    """[(ts_seconds, bytes)] of a capture, read by dpkt (the reference reader)."""
    with open(path, "rb") as fh:
        return [(ts, bytes(buf)) for ts, buf in dpkt.pcap.Reader(fh)]


def run_app(nfs, capture, tmp_path=None, frames=None, **config):
    """Run ``nfs`` inline over ``capture`` (a path, or ``frames`` written to one);
    returns (counters, output frames)."""
    if frames is not None:
        capture = os.path.join(str(tmp_path), "in.pcap")
        write_pcap(capture, frames)
    out_path = capture + ".out.pcap"
    burst = config.pop("burst", 64)
    inp, out = open_input("pcap:" + capture), open_output("pcap:" + out_path)
    try:
        counters = App(nfs, **config).run(inp, out, burst=burst)
    finally:
        inp.close()
        out.close()
    return counters, read_frames(out_path)


def mapped_kb(path, pid="self"):
    """Resident kB of the mappings of the file ``path`` in process ``pid`` (None: it
    has none): its RssFile, or RssShmem on tmpfs, as smaps counts it per mapping."""
    kb, inside = None, False
    with open(f"/proc/{pid}/smaps") as fh:
        for line in fh:
            head = line.split()
            if head and "-" in head[0] and len(head) >= 5:
                inside = line.rstrip("\n").endswith(" " + path)
            elif inside and head[0] == "Rss:":
                kb = (kb or 0) + int(head[1])
    return kb


def ip_checksum(hdr: bytes) -> int:
    s = sum(struct.unpack(f"!{len(hdr) // 2}H", hdr))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def fragment4(frame: bytes, size: int) -> list[bytes]:
    """Split the IPv4 datagram of an untagged frame into fragments of size bytes."""
    hl = (frame[14] & 0x0F) * 4
    body = frame[14 + hl:]
    out = []
    for off in range(0, len(body), size):
        chunk = body[off:off + size]
        more = off + size < len(body)
        h = bytearray(frame[14:14 + hl])
        h[2:4] = struct.pack("!H", hl + len(chunk))
        h[6:8] = struct.pack("!H", (0x2000 if more else 0) | (off // 8))
        h[10:12] = b"\0\0"
        h[10:12] = struct.pack("!H", ip_checksum(bytes(h)))
        out.append(frame[:14] + bytes(h) + chunk)
    return out


def fragment6(frame: bytes, size: int, unfrag: int, ident: int) -> list[bytes]:
    """Split an untagged IPv6 frame: unfrag bytes of extension headers stay in front."""
    hdr = bytearray(frame[14:54 + unfrag])
    body = frame[54 + unfrag:]
    # The next-header byte that names the fragmentable part.
    if unfrag:
        nh_pos = 40
        while nh_pos + (hdr[nh_pos + 1] + 1) * 8 < len(hdr):
            nh_pos += (hdr[nh_pos + 1] + 1) * 8
    else:
        nh_pos = 6
    inner = hdr[nh_pos]
    hdr[nh_pos] = 44
    out = []
    for off in range(0, len(body), size):
        chunk = body[off:off + size]
        more = off + size < len(body)
        fh = bytes([inner, 0]) + struct.pack("!HI", off | int(more), ident)
        h = bytearray(hdr)
        h[4:6] = struct.pack("!H", len(h) - 40 + 8 + len(chunk))
        out.append(frame[:14] + bytes(h) + fh + chunk)
    return out


def fragmented_flows(flows=120, seed=11):
    """UDP over IPv4 and TCP over IPv6, both directions, where every third datagram
    is sent in fragments (some out of order), the rest whole: a fragment carries no
    ports, so only the rebuilt datagram names its flow.  Returns (frames, datagrams
    sent in fragments).  Each flow makes six PKT events, whole or rebuilt."""
    rng = random.Random(seed)
    frames, fragmented, ident = [], 0, 0
    for i in range(flows):
        v6 = i % 4 == 3
        a = f"2001:db8:1::{i + 1:x}" if v6 else f"198.18.{i % 200}.{1 + i // 200}"
        b = "2001:db8:2::1" if v6 else "198.19.0.1"
        ends = (a, b, 20000 + i, 443 if v6 else 53)
        for k in range(6):
            src, dst, sp, dp = ends if k % 2 == 0 else (ends[1], ends[0], ends[3], ends[2])
            big = k % 3 == 2
            payload = bytes([k]) * (3000 if big else 60)
            if v6:
                frame = ether(tcp6(src, dst, sp, dp, payload, seq=1 + 3000 * k),
                              ethertype=0x86DD)
            else:
                frame = ether(udp4(src, dst, sp, dp, payload))
            if not big:
                frames.append(frame)
                continue
            ident += 1
            if v6:
                pieces = fragment6(frame, 1232, 0, ident)
            else:
                frame = frame[:18] + struct.pack("!H", ident) + frame[20:]
                pieces = fragment4(frame, 1480)
            if rng.random() < 0.5:
                pieces.reverse()
            frames += pieces
            fragmented += 1
    return frames, fragmented
