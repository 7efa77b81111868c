"""Capture-file ports: PcapReader/PcapWriter against dpkt and hand-built files."""

import json
import os
import random
import struct
import subprocess
import sys

import dpkt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from mbxtest import mapped_kb, read_frames, run_app

from mbx._packet import Batch
from mbx._pcap import PcapReader, PcapWriter
from mbx.errors import CaptureFormatError, PortError
from mbx.examples.capture import ether, udp4, write_example
from mbx.ports import open_input, open_output

NS = 1_000_000_000


def read_all(reader, capacity=7, arena_size=0):
    """Every (frame, ts_ns, wirelen) of reader, through small bursts."""
    batch = Batch(capacity, arena_size)
    out = []
    while True:
        batch.reset()
        n = reader.receive(batch)
        if n == -1:
            return out
        assert 0 <= n <= capacity and n == len(batch)
        out += [(batch.frame(i), batch.timestamp_ns(i), batch.wirelen(i)) for i in range(n)]


def random_frames(count, seed=1, lo=14, hi=1514):
    rng = random.Random(seed)
    return [rng.randbytes(rng.randint(lo, hi)) for _ in range(count)]


def dpkt_ns(ts, nano):
    """The timestamp dpkt.pcap.Writer stores for float ts, in ns."""
    mult = 10**9 if nano else 10**6
    return int(ts) * NS + dpkt.pcap.intround(ts % 1 * mult) * (NS // mult)


def write_with(frames, stamps_ns, path, nanosecond=True, **kw):
    with PcapWriter(path, nanosecond=nanosecond, **kw) as w:
        batch = Batch(16)
        for i, (f, t) in enumerate(zip(frames, stamps_ns, strict=True)):
            assert batch.append(f, t)
            if len(batch) == 16 or i == len(frames) - 1:
                # a frame of no bytes is left out (tx_empty)
                assert w.send(batch) == sum(1 for j in range(len(batch)) if batch.frame(j))
                batch.reset()
    return w


# ---------------------------------------------------------------- classic pcap


@pytest.mark.parametrize("nano", [False, True])
def test_dpkt_pcap_read_back(tmp_path, nano):
    path = tmp_path / "a.pcap"
    frames = random_frames(100)
    stamps = [1_700_000_000 + i * 0.001234567 for i in range(len(frames))]
    with open(path, "wb") as f:
        w = dpkt.pcap.Writer(f, snaplen=65535, nano=nano)
        for frame, ts in zip(frames, stamps, strict=True):
            w.writepkt(frame, ts)
    with PcapReader(path) as r:
        assert (r.format, r.linktype, r.nanosecond) == ("pcap", 1, nano)
        assert r.size == os.path.getsize(path) and r.path == str(path)
        got = read_all(r)
        assert r.position == r.size
        assert r.rx_pkts == len(frames)
        assert r.rx_bytes == sum(map(len, frames))
        assert (r.damaged, r.truncated) == (0, 0)
    assert [g[0] for g in got] == frames
    assert [g[1] for g in got] == [dpkt_ns(ts, nano) for ts in stamps]
    assert [g[2] for g in got] == [len(f) for f in frames]


def classic(records, big_endian=True, nano=False, linktype=1, snaplen=65535):
    """A classic pcap file from (sec, frac, frame, wirelen) records."""
    e = ">" if big_endian else "<"
    out = [struct.pack(e + "IHHiIII", 0xA1B23C4D if nano else 0xA1B2C3D4, 2, 4, 0, 0,
                       snaplen, linktype)]
    for sec, frac, frame, wirelen in records:
        out.append(struct.pack(e + "IIII", sec, frac, len(frame), wirelen) + frame)
    return b"".join(out)


@pytest.mark.parametrize("nano", [False, True])
def test_byte_swapped_classic(tmp_path, nano):
    frames = random_frames(20, seed=2)
    recs = [(1_600_000_000 + i, 999_999 - i, f, len(f) + 100) for i, f in enumerate(frames)]
    path = tmp_path / "be.pcap"
    path.write_bytes(classic(recs, big_endian=True, nano=nano))
    with PcapReader(path) as r:
        assert (r.linktype, r.snaplen, r.nanosecond) == (1, 65535, nano)
        got = read_all(r, capacity=3)
    mul = 1 if nano else 1000
    assert got == [(f, s * NS + fr * mul, wl) for s, fr, f, wl in recs]


def test_rewind_and_close(tmp_path):
    path = tmp_path / "r.pcap"
    frames = random_frames(10, seed=3)
    path.write_bytes(classic([(1, 0, f, len(f)) for f in frames], big_endian=False))
    r = PcapReader(path, port_id=3)
    first = read_all(r)
    r.rewind()
    assert r.position == 24
    assert read_all(r) == first
    assert r.rx_pkts == 20
    r.close()
    r.close()  # idempotent
    # read after close: an error, as rewind is (it was an empty input: a run
    # given a closed port read 0 packets without a word)
    with pytest.raises(PortError, match="closed: it cannot be read"):
        r.receive(Batch(4))
    with pytest.raises(PortError, match="closed"):
        r.rewind()


def test_port_id_and_counters_attributes(tmp_path):
    path = tmp_path / "p.pcap"
    path.write_bytes(classic([(1, 0, b"x" * 60, 60)], big_endian=False))
    with PcapReader(path, port_id=1) as r:
        assert r.port_id == 1 and r.name == f"pcap:{path}"
        assert len(read_all(r)) == 1
        assert r.counters["rx_pkts"] == 1


# ---------------------------------------------------------------- pcapng


def test_dpkt_pcapng_read_back(tmp_path):
    path = tmp_path / "a.pcapng"
    frames = random_frames(50, seed=4)
    stamps = [1_700_000_000.5 + i / 7 for i in range(len(frames))]
    with open(path, "wb") as f:
        w = dpkt.pcapng.Writer(f, snaplen=65535)
        for frame, ts in zip(frames, stamps, strict=True):
            w.writepkt(frame, ts)
    with PcapReader(path) as r:
        assert (r.format, r.linktype, r.nanosecond) == ("pcapng", 1, False)
        got = read_all(r)
        assert r.position == r.size
    assert [g[0] for g in got] == frames
    assert [g[1] for g in got] == [dpkt.pcapng.intround(ts * 1e6) * 1000 for ts in stamps]


def block(btype, body, e="<"):
    """A pcapng block: body padded to 4, both lengths."""
    body += b"\0" * (-len(body) % 4)
    n = len(body) + 12
    return struct.pack(e + "II", btype, n) + body + struct.pack(e + "I", n)


def opt(code, value, e="<"):
    return struct.pack(e + "HH", code, len(value)) + value + b"\0" * (-len(value) % 4)


def shb(e="<"):
    return block(0x0A0D0D0A, struct.pack(e + "IHHq", 0x1A2B3C4D, 1, 0, -1), e)


def idb(linktype, tsresol=None, snaplen=0, e="<", tsoffset=None, fcslen_bits=None):
    opts = b""
    if tsresol is not None:
        opts += opt(9, bytes([tsresol]), e)
    if fcslen_bits is not None:
        opts += opt(13, bytes([fcslen_bits]), e)
    if tsoffset is not None:
        opts += opt(14, struct.pack(e + "q", tsoffset), e)
    if opts:
        opts += opt(0, b"", e)
    return block(1, struct.pack(e + "HHI", linktype, 0, snaplen) + opts, e)


def epb(ifid, units, frame, wirelen=None, e="<"):
    wirelen = len(frame) if wirelen is None else wirelen
    return block(6, struct.pack(e + "IIIII", ifid, units >> 32, units & 0xFFFFFFFF,
                                len(frame), wirelen) + frame, e)


def spb(frame, wirelen=None, e="<"):
    return block(3, struct.pack(e + "I", len(frame) if wirelen is None else wirelen)
                 + frame, e)


def test_handmade_pcapng_two_interfaces_and_sections(tmp_path):
    eth = [bytes([i]) * (60 + i) for i in range(6)]
    ip4 = bytes.fromhex("450000140000000040000000") + b"\x0a\0\0\x01\x0a\0\0\x02"
    t = 1_700_000_000
    data = b"".join([
        shb(),
        idb(1, tsresol=9, snaplen=65535),                  # ns
        block(0x0BAD, b"unknown block, skipped"),
        idb(1, tsresol=0x80 | 10),                         # 1/1024 s
        epb(0, t * NS + 123_456_789, eth[0]),
        epb(1, t * 1024 + 512, eth[1], wirelen=1000),
        block(5, b"\0" * 8),                               # interface statistics
        epb(0, t * NS + 5, eth[2]),
        idb(1, tsresol=3, tsoffset=100),                   # ms, +100 s
        epb(2, t * 1000 + 7, eth[3]),
        spb(eth[4]),                                       # ts 0, interface 0
        # A second section, big-endian, whose interface is raw IP (µs default).
        shb(">"),
        idb(101, e=">"),
        epb(0, t * 10**6 + 1, ip4, e=">"),
        spb(ip4 + b"\0\0", wirelen=len(ip4), e=">"),
    ])
    path = tmp_path / "h.pcapng"
    path.write_bytes(data)
    with PcapReader(path) as r:
        assert (r.format, r.linktype, r.nanosecond, r.snaplen) == ("pcapng", 1, True, 65535)
        got = read_all(r, capacity=2)
        assert r.position == r.size and r.damaged == 0
    eth4 = b"\0" * 12 + b"\x08\x00" + ip4
    assert got == [
        (eth[0], t * NS + 123_456_789, len(eth[0])),
        (eth[1], t * NS + NS // 2, 1000),
        (eth[2], t * NS + 5, len(eth[2])),
        (eth[3], (t + 100) * NS + 7_000_000, len(eth[3])),
        (eth[4], 0, len(eth[4])),
        (eth4, t * NS + 1000, len(eth4)),
        (eth4, 0, len(eth4)),  # SPB caplen is cut to the wire length
    ]


def test_spb_respects_snaplen(tmp_path):
    frame = bytes(range(200))
    path = tmp_path / "s.pcapng"
    path.write_bytes(shb() + idb(1, snaplen=64) + spb(frame))
    with PcapReader(path) as r:
        assert read_all(r) == [(frame[:64], 0, 200)]


# ---------------------------------------------------------------- link types

IP4 = bytes.fromhex("4500001c00000000401100000a0000010a000002") + b"\0" * 8
IP6 = bytes.fromhex("6000000000081140") + bytes(32) + b"\0" * 8


@pytest.mark.parametrize("linktype,payload,ethertype", [
    (101, IP4, 0x0800), (101, IP6, 0x86DD), (101, b"\x10junk", 0),
    (12, IP4, 0x0800), (14, IP6, 0x86DD),       # DLT_RAW as old BSD writers put it
    (228, IP4, 0x0800), (229, IP6, 0x86DD),
    (113, struct.pack(">HHH8sH", 0, 1, 6, b"\1" * 8, 0x0800) + IP4, 0x0800),
    (113, struct.pack(">HHH8sH", 4, 1, 6, b"\1" * 8, 0x0806) + b"arp!", 0x0806),
    (276, struct.pack(">HHIHBB8s", 0x86DD, 0, 2, 1, 0, 6, b"\1" * 8) + IP6, 0x86DD),
    # BSD loopback (macOS lo0): a 4-byte address family in host (0) or network
    # (108) order, whose values differ between systems; the version nibble decides
    (0, struct.pack("<I", 2) + IP4, 0x0800), (0, struct.pack("<I", 30) + IP6, 0x86DD),
    (108, struct.pack(">I", 24) + IP6, 0x86DD), (108, struct.pack(">I", 2) + IP4, 0x0800),
])
@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_link_types_get_an_ethernet_header(tmp_path, linktype, payload, ethertype, fmt):
    hl = {113: 16, 276: 20, 0: 4, 108: 4}.get(linktype, 0)
    if fmt == "pcap":
        data = classic([(5, 6, payload, len(payload) + 10)], big_endian=False,
                       linktype=linktype)
    else:
        data = shb() + idb(linktype) + epb(0, 5_000_006, payload, len(payload) + 10)
    path = tmp_path / f"l.{fmt}"
    path.write_bytes(data)
    with PcapReader(path) as r:
        assert r.linktype == linktype
        got = read_all(r)
    l3 = payload[hl:]
    assert got == [(bytes(12) + struct.pack(">H", ethertype) + l3, 5_000_006_000,
                    14 + len(l3) + 10)]


SLL_IP4 = struct.pack(">HHH8sH", 0, 1, 6, b"\1" * 8, 0x0800)
SLL2_IP4 = struct.pack(">HHIHBB8s", 0x0800, 0, 2, 1, 0, 6, b"\1" * 8)


@pytest.mark.parametrize("linktype,record,reason", [
    # not one byte: no version nibble (101), nothing behind the link type's (228)
    (101, b"", "trunc_l2"), (228, b"", "trunc_l2"), (229, b"", "trunc_l2"),
    # an IP header begun: a real one, cut short, behind a made-up Ethernet header
    (101, b"\x45\x00\x00", "trunc_l3"), (228, b"\x45\x00\x00", "trunc_l3"),
    # cut inside the cooked header (16 and 20 bytes), its protocol read or not
    (113, SLL_IP4[:10], "trunc_l2"), (113, SLL_IP4[:15], "trunc_l2"),
    (276, SLL2_IP4[:10], "trunc_l2"), (276, SLL2_IP4[:3], "trunc_l2"),
    (0, b"\x02\x00", "trunc_l2"),
])
@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_a_record_cut_in_its_link_header_is_counted_not_made_a_frame(
        tmp_path, linktype, record, reason, fmt):
    # Such a record became a 14-byte empty Ethernet frame: of type 0 (not IP, so
    # forwarded and counted nowhere) or, for 228 and SLL2, of type IPv4 with nothing
    # in it.  Now it is delivered empty, which the parser counts as cut short at L2;
    # the wire length says what the Ethernet frame was had it been captured.
    wire = len(record) + 40
    if fmt == "pcap":
        data = classic([(5, 6, record, wire)], big_endian=False, linktype=linktype)
    else:
        data = shb() + idb(linktype) + epb(0, 5_000_006, record, wire)
    path = tmp_path / f"short.{fmt}"
    path.write_bytes(data)
    hl = {113: 16, 276: 20, 0: 4}.get(linktype, 0)
    with PcapReader(path) as r:
        got = read_all(r)
        assert (r.damaged, r.truncated) == (0, 0)
    if reason == "trunc_l2":
        assert got == [(b"", 5_000_006_000, 14 + wire - hl)]
    else:
        assert got == [(bytes(12) + b"\x08\x00" + record, 5_000_006_000, 14 + wire)]
    # under software RSS too (the same conversion): with no IP header, stack 0's
    for k in (0, 1):
        with PcapReader(path) as r:
            r.rss_share(k, 2)
            assert [g[0] for g in read_all(r)] == ([got[0][0]] if k == 0 else [])
    counters, out = run_app([], str(path))
    assert counters["parse"] == {reason: 1} and counters["packets"] == 1
    if reason == "trunc_l2":
        # forwarded, but a pcap output leaves it out: written, it was a record of
        # 0 bytes ("[Invalid header: caplen==0]" to tcpdump), its bytes lost anyway
        assert out == [] and counters["sent"] == 0
    else:
        assert len(out) == 1 and out[0][1] == got[0][0]    # forwarded as it came
    counters, out = run_app([], str(path), malformed="drop")
    assert counters["dropped_malformed"] == 1 and out == []


def test_captures_compressed_joined_or_oddly_named_are_told_how_to_read(tmp_path,
                                                                        example_pcap):
    # A .pcap.gz was "not a pcap or pcapng file (magic bytes 1f 8b 08 08 ...)"; two
    # captures joined with cat gave an empty frame dated 2055, then "damaged record";
    # tcpdump -C's x.pcap1 was an "unknown port spec" though the file was there.
    import gzip
    import shutil

    raw = open(example_pcap, "rb").read()
    gz = tmp_path / "x.pcap.gz"
    gz.write_bytes(gzip.compress(raw))
    with pytest.raises(CaptureFormatError, match=r": a gzip-compressed file, not a capture: "
                                                 r"decompress it first \(gunzip"):
        PcapReader(gz)
    xz = tmp_path / "x.pcap.xz"
    xz.write_bytes(b"\xfd7zXZ\x00" + bytes(30))
    with pytest.raises(CaptureFormatError, match=r": an xz-compressed file, not a capture"):
        PcapReader(xz)
    # the modified-pcap (Kuznetzov) format, either byte order, was "not a pcap or
    # pcapng file": named, with how to convert it
    for magic in (b"\x34\xcd\xb2\xa1", b"\xa1\xb2\xcd\x34"):
        kuz = tmp_path / "kuz.pcap"
        kuz.write_bytes(magic + bytes(20))
        with pytest.raises(CaptureFormatError, match=r"a modified pcap \(Kuznetzov\) file, "
                                                     r"magic a1 b2 cd 34.*editcap -F pcap"):
            PcapReader(kuz)
    joined = tmp_path / "joined.pcap"
    joined.write_bytes(raw + raw)
    with PcapReader(joined) as r:
        n = 0
        with pytest.raises(CaptureFormatError, match=rf"a second pcap file header at byte "
                                                     rf"offset {len(raw)}.*mergecap"):
            while (got := r.receive(Batch(64))) >= 0:
                n += got
    assert n == len(read_frames(example_pcap))      # the first capture, and nothing more
    other_order = tmp_path / "joined2.pcap"           # the second in the other byte order
    other_order.write_bytes(raw + classic([(1, 0, b"x" * 60, 60)], big_endian=True))
    with PcapReader(other_order) as r, pytest.raises(CaptureFormatError,
                                                     match="a second pcap file header"):
        while r.receive(Batch(64)) >= 0:
            pass
    rotated = tmp_path / "x.pcap1"
    shutil.copyfile(example_pcap, rotated)
    with pytest.raises(PortError, match=rf"is a file, but not named as a capture.*"
                                        rf"pcap:{rotated}"):
        open_input(str(rotated))
    open_input(f"pcap:{rotated}").close()


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_unsupported_link_type(tmp_path, fmt):
    path = tmp_path / f"wifi.{fmt}"
    if fmt == "pcap":
        path.write_bytes(classic([], big_endian=False, linktype=105))
    else:
        path.write_bytes(shb() + idb(147) + epb(0, 0, b"x"))
    with pytest.raises(CaptureFormatError, match=rf"{path}.*link type (105|147)"):
        PcapReader(path)


def test_supported_link_types_are_the_numbers_api_md_lists(tmp_path):
    # SUPPORTED_LINKTYPES was a sentence, which api.md cited as if a set of numbers:
    # it is now the set, taken from the reader's own dispatch, and each is read
    import re

    from mbx import _pcap

    api = open(os.path.join(os.path.dirname(__file__), "..", "docs", "api.md")).read()
    said = " ".join(api.split())
    listed = re.search(r"link types ([\d/, ]+) \(`mbx._pcap.SUPPORTED_LINKTYPES`", said)
    numbers = {int(n) for n in re.findall(r"\d+", listed.group(1))}
    assert _pcap.SUPPORTED_LINKTYPES == numbers
    assert all(str(n) in _pcap.SUPPORTED_LINKTYPES_TEXT for n in numbers)
    for n in sorted(numbers):
        path = tmp_path / f"l{n}.pcap"
        path.write_bytes(classic([], big_endian=False, linktype=n))
        with PcapReader(path) as r:
            assert r.linktype == n


def test_frames_of_an_interface_of_an_unsupported_link_type_are_skipped(tmp_path):
    # One such interface refused the whole capture (a macOS capture of en0 and an
    # 802.11 monitor interface, which tshark reads): its frames are skipped and
    # counted, the others read; a capture with no readable frame is still refused.
    path = tmp_path / "later.pcapng"
    path.write_bytes(shb() + idb(1) + epb(0, 0, b"a" * 20) + idb(147) + epb(1, 0, b"b")
                     + epb(0, 0, b"c" * 20) + epb(1, 0, b"d"))
    r = PcapReader(path)
    got = read_all(r)
    assert [f for f, _, _ in got] == [b"a" * 20, b"c" * 20]
    assert r.counters["skipped"] == 2 and r.counters["skipped_linktype"] == 147
    r.close()
    only = tmp_path / "only.pcapng"
    only.write_bytes(shb() + idb(147) + epb(0, 0, b"b") + idb(105) + epb(1, 0, b"d"))
    with pytest.raises(CaptureFormatError, match=r"unsupported link type 147 \(interface "
                                                 r"0\), and no frame of a supported one"):
        PcapReader(only)
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "run", "l2fwd", "--in",
                        f"pcap:{path}"], capture_output=True, text=True, timeout=60,
                       check=False)
    assert r.returncode == 0, r.stderr
    assert "input          2 frames skipped: their interface's link type is not one " \
           "mbx reads (the first: 147)" in r.stdout


def test_damage_after_only_skipped_frames_is_reported_as_damage(tmp_path):
    # The walk at open stopped at the damage having seen only frames of an
    # unsupported interface: the capture was refused for its link type, hiding the
    # damage and the Ethernet frames behind it.
    bad = bytearray(idb(1))
    struct.pack_into("<I", bad, len(bad) - 4, 999)       # trailing length lies
    at = len(shb() + idb(105) + epb(0, 0, b"w" * 32))
    path = tmp_path / "skip_then_damage.pcapng"
    path.write_bytes(shb() + idb(105) + epb(0, 0, b"w" * 32) + bytes(bad)
                     + epb(1, 1, b"e" * 34))
    r = PcapReader(path)
    with pytest.raises(CaptureFormatError,
                       match=f"damaged block at byte offset {at}: trailing length 999"):
        read_all(r)
    assert r.damaged == 1 and r.counters["skipped"] == 1


# ---------------------------------------------------------------- writer


def test_writer_leaves_out_a_time_a_record_cannot_hold(tmp_path):
    # A record's seconds are unsigned 32 bits: 2200-01-01 came out as 2063 (wrapped),
    # a time before 1970 as 1970, each a valid-looking wrong time.
    last = (2**32 - 1) * NS + NS - 1                    # 2106-02-07 06:28:15.999999999
    stamps = [1_700_000_000 * NS, 7_258_118_400 * NS, -1, last, last + 1]
    frames = random_frames(len(stamps), seed=3)
    path = tmp_path / "w.pcap"
    with PcapWriter(path) as w:
        batch = Batch(8)
        for f, t in zip(frames, stamps, strict=True):
            assert batch.append(f, t)
        assert w.send(batch) == 2
    assert (w.tx_pkts, w.tx_dropped, w.tx_bad_time) == (2, 3, 3)
    assert "frames whose time a pcap record cannot hold" in w.counters["tx_error"]
    raw = path.read_bytes()
    assert [f for _, f in read_frames(path)] == [frames[0], frames[3]]
    assert struct.unpack_from("=II", raw, 24) == (1_700_000_000, 0)
    assert struct.unpack_from("=II", raw, 24 + 16 + len(frames[0])) == (2**32 - 1, NS - 1)
    # a run says what its output left out, and does not count it sent
    cap = tmp_path / "y2200.pcapng"
    eth = b"\2" * 12 + b"\x08\x06" + b"\0" * 28
    cap.write_bytes(shb() + idb(1, tsresol=9) + epb(0, 1_700_000_000 * NS, eth)
                    + epb(0, 7_258_118_400 * NS, eth))
    out = tmp_path / "o.pcap"
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "run", "l2fwd", "--in",
                        f"pcap:{cap}", "--out", f"pcap:{out}", "--json", str(tmp_path / "c.json")],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    c = json.loads((tmp_path / "c.json").read_text())
    assert c["sent"] == 1 and c["ports"]["out"]["tx_bad_time"] == 1
    assert "not sent       1 packet, by the out port (last error: frames whose time a " \
           "pcap record cannot hold" in r.stdout
    assert len(read_frames(out)) == 1


def test_writer_leaves_out_a_frame_of_no_bytes(tmp_path):
    # what a record cut inside its cooked header becomes: written, a 0-byte record
    path = tmp_path / "w.pcap"
    with PcapWriter(path) as w:
        batch = Batch(4)
        assert batch.append(b"", NS, wirelen=40) and batch.append(b"e" * 60, 2 * NS)
        assert w.send(batch) == 1
    assert (w.tx_pkts, w.tx_dropped, w.tx_empty) == (1, 1, 1)
    assert w.counters["tx_error"].startswith("frames of no bytes (input records with no")
    assert read_frames(path) == [(2.0, b"e" * 60)]
    sll = tmp_path / "sll10.pcap"
    sll.write_bytes(classic([(5, 6, SLL_IP4[:10], 56)], big_endian=False, linktype=113))
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "run", "l2fwd", "--in",
                        f"pcap:{sll}", "--out", f"pcap:{tmp_path / 'o.pcap'}"],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert "not sent       1 packet, by the out port (last error: frames of no bytes" \
        in r.stdout
    # an Ethernet record of caplen 0 is empty for no link header: the text must not
    # blame one
    eth0 = tmp_path / "eth0.pcap"
    eth0.write_bytes(classic([(5, 6, b"", 60)], big_endian=False, linktype=1))
    with PcapReader(eth0) as r, PcapWriter(tmp_path / "o0.pcap") as w:
        batch = Batch(4)
        assert r.receive(batch) == 1 and w.send(batch) == 0
    assert w.tx_empty == 1
    assert w.counters["tx_error"] == (
        "frames of no bytes (input records with no captured bytes, or cut inside their "
        "link header), which no pcap reader takes: tx_empty")


@pytest.mark.parametrize("nano", [False, True])
def test_writer_read_by_dpkt(tmp_path, nano):
    frames = random_frames(300, seed=5)
    stamps = [1_700_000_000 * NS + i * 1_234_567_891 for i in range(len(frames))]
    path = tmp_path / "w.pcap"
    w = write_with(frames, stamps, path, nanosecond=nano)
    assert w.tx_pkts == len(frames) and w.tx_bytes == sum(map(len, frames))
    with open(path, "rb") as f:
        rd = dpkt.pcap.Reader(f)
        assert rd.datalink() == 1 and rd.snaplen == 262144
        got = list(rd)
    assert [bytes(b) for _, b in got] == frames
    mult = 10**9 if nano else 10**6
    raw = path.read_bytes()
    off = 24
    for (ts, buf), want in zip(got, stamps, strict=True):
        sec, frac, caplen, wirelen = struct.unpack_from("=IIII", raw, off)
        off += 16 + caplen
        assert sec * NS + frac * (NS // mult) == want - want % (NS // mult)
        assert abs(float(ts) - want / NS) < 1e-5
        assert caplen == wirelen == len(buf)
    assert off == len(raw)


def test_writer_snaplen_and_wirelen(tmp_path):
    path = tmp_path / "snap.pcap"
    with PcapWriter(path, snaplen=100, linktype=101) as w:
        b = Batch(4)
        b.append(b"a" * 300, 7)
        b.append(b"b" * 50, 8, wirelen=1500)
        assert w.send(b) == 2
    with PcapReader(path) as r:
        assert (r.snaplen, r.linktype, r.nanosecond) == (100, 101, True)
    with open(path, "rb") as f:
        rd = dpkt.pcap.Reader(f)
        assert rd.snaplen == 100 and rd.datalink() == 101
    raw = path.read_bytes()
    assert struct.unpack_from("=IIII", raw, 24) == (0, 7, 100, 300)
    assert struct.unpack_from("=IIII", raw, 24 + 16 + 100) == (0, 8, 50, 1500)


def test_writer_errors(tmp_path):
    missing = tmp_path / "no" / "such" / "dir"
    with pytest.raises(PortError, match=f"{missing}.*does not exist"):
        PcapWriter(missing / "x.pcap")
    with pytest.raises(ValueError, match="snaplen"):
        PcapWriter(tmp_path / "x.pcap", snaplen=0)
    w = PcapWriter(tmp_path / "y.pcap")
    w.close()
    w.close()  # idempotent
    b = Batch(2)
    b.append(b"z" * 20)
    with pytest.raises(PortError, match="closed"):
        w.send(b)


def test_writer_dealloc_flushes(tmp_path):
    path = tmp_path / "d.pcap"
    w = PcapWriter(path)
    b = Batch(2)
    b.append(b"q" * 64, 1)
    w.send(b)
    del w
    with PcapReader(path) as r:
        assert read_all(r) == [(b"q" * 64, 1, 64)]


def test_writer_full_disk(tmp_path):
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    w = PcapWriter("/dev/full")
    b = Batch(64)
    for _ in range(64):
        b.append(b"\xff" * 1500)
    with pytest.raises(PortError, match="/dev/full.*write failed"):
        for _ in range(20):  # more than the 1 MiB buffer
            w.send(b)
    # every record it took is lost, none in the file: tx_pkts counted them all
    # while they were only buffered
    assert w.tx_pkts == 0 and w.tx_bytes == 0
    assert w.tx_lost > 64 and w.counters["tx_lost"] == w.tx_lost
    # raised once, where it happened: close() neither writes the buffer again (part
    # of it may be in the file already) nor hides that error under "at close"
    with pytest.raises(PortError, match=r"write failed: No space left on device"):
        w.send(b)
    w.close()
    with pytest.raises(PortError, match="closed writer"):
        w.send(b)
    # a failure first met at close is raised there
    w = PcapWriter("/dev/full")
    w.send(b)
    with pytest.raises(PortError, match="write failed at close"):
        w.close()
    assert (w.tx_pkts, w.tx_lost) == (0, 64)
    # flush() says it as send() does, the documented form `mbx run` prints: it said
    # "write failed (REASON)"
    w = PcapWriter("/dev/full")
    w.send(b)
    with pytest.raises(PortError) as exc:
        w.flush()
    assert str(exc.value) == f"{w.name}: write failed: No space left on device"
    with pytest.raises(PortError) as again:
        w.send(b)
    assert str(again.value) == str(exc.value)
    w.close()


def test_round_trip_thousands_of_frames(tmp_path):
    rng = random.Random(6)
    frames = random_frames(5000, seed=6, lo=1, hi=9000)
    stamps = sorted(rng.randrange(0, 2**32 * NS) for _ in frames)
    path = tmp_path / "rt.pcap"
    write_with(frames, stamps, path)
    with PcapReader(path) as r:
        got = read_all(r, capacity=33)
    assert [g[0] for g in got] == frames
    assert [g[1] for g in got] == stamps
    # ... and again through a second writer: byte-identical files.
    write_with([g[0] for g in got], [g[1] for g in got], tmp_path / "rt2.pcap")
    assert (tmp_path / "rt2.pcap").read_bytes() == path.read_bytes()


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frames=st.lists(st.binary(min_size=0, max_size=2000), max_size=60),
       nano=st.booleans(), capacity=st.integers(1, 9))
def test_round_trip_property(tmp_path, frames, nano, capacity):
    stamps = [i * 1_000_001_000 + 1000 for i in range(len(frames))]
    path = tmp_path / "prop.pcap"
    write_with(frames, stamps, path, nanosecond=nano)
    with PcapReader(path) as r:
        got = read_all(r, capacity=capacity)
    assert got == [(f, t, len(f)) for f, t in zip(frames, stamps, strict=True) if f]


# ---------------------------------------------------------------- errors


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pcap"
    with pytest.raises(PortError, match=f"pcap:{path}: no such file"):
        PcapReader(path)


def test_directory(tmp_path):
    with pytest.raises(PortError, match="directory"):
        PcapReader(tmp_path)


def test_a_pipe_is_refused_with_what_to_do(tmp_path):
    fifo = tmp_path / "cap.fifo"
    os.mkfifo(fifo)
    with pytest.raises(PortError, match="not a regular file .*save it to a file first"):
        PcapReader(fifo)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pcap"
    path.write_bytes(b"")
    with pytest.raises(CaptureFormatError, match=f"{path}: empty file"):
        PcapReader(path)


@pytest.mark.parametrize("data,seen", [
    (b"\xde\xad\xbe\xef" + b"\0" * 40, "de ad be ef"),
    (b"GET / HTTP/1.1\r\n", "47 45 54 20"),
    (b"\x01", "01"),
])
def test_garbage_file(tmp_path, data, seen):
    path = tmp_path / "garbage.pcap"
    path.write_bytes(data)
    with pytest.raises(CaptureFormatError, match=f"{path}: not a pcap.*{seen}"):
        PcapReader(path)


def test_short_headers(tmp_path):
    path = tmp_path / "short.pcap"
    path.write_bytes(struct.pack("<I", 0xA1B2C3D4) + b"\0" * 10)
    with pytest.raises(CaptureFormatError, match=f"{path}: file header truncated"):
        PcapReader(path)
    path.write_bytes(shb()[:8] + b"\xff" * 8)
    with pytest.raises(CaptureFormatError, match=f"{path}: .*byte-order magic"):
        PcapReader(path)


def test_damaged_record_length(tmp_path):
    frames = random_frames(10, seed=7, lo=60, hi=60)
    data = bytearray(classic([(1, 2, f, 60) for f in frames], big_endian=False))
    bad = 24 + 4 * (16 + 60)
    struct.pack_into("<I", data, bad + 8, 0x7FFFFFF0)
    path = tmp_path / "damaged.pcap"
    path.write_bytes(data)
    r = PcapReader(path)
    batch = Batch(16)
    assert r.receive(batch) == 4  # what precedes the damage is delivered
    with pytest.raises(CaptureFormatError, match=f"pcap:{path}: .*byte offset {bad}"):
        r.receive(batch)
    assert r.damaged == 1 and r.position == bad
    assert r.receive(batch) == -1


def test_caplen_wildly_over_snaplen(tmp_path):
    data = classic([(0, 0, b"x" * 100, 100)], big_endian=False, snaplen=96)
    data = data[:24 + 8] + struct.pack("<I", 96 + 70000) + data[24 + 12:]
    path = tmp_path / "over.pcap"
    path.write_bytes(data)
    with PcapReader(path) as r, pytest.raises(CaptureFormatError, match="snaplen 96"):
        read_all(r)


@pytest.mark.parametrize("cut", [1, 10, 16, 17, 50])
def test_truncated_last_record(tmp_path, cut):
    frames = random_frames(5, seed=8, lo=60, hi=60)
    data = classic([(1, 2, f, 60) for f in frames], big_endian=False)
    path = tmp_path / "cut.pcap"
    path.write_bytes(data[:len(data) - 76 + cut])
    with PcapReader(path) as r:
        got = read_all(r)
        assert (r.truncated, r.damaged) == (1, 0)
    assert [g[0] for g in got] == frames[:4]


def test_walk_to_end_tells_how_a_capture_ends_without_delivering(tmp_path):
    # For a capture DPDK's net_pcap read, which ends at a cut or damage silently.
    frames = random_frames(5, seed=8, lo=60, hi=60)
    data = classic([(1, 2, f, 60) for f in frames], big_endian=False)
    for name, body, truncated in [("whole", data, 0), ("cut", data[:-7], 1)]:
        (tmp_path / name).write_bytes(body)
        with PcapReader(tmp_path / name) as r:
            r.walk_to_end()
            assert (r.truncated, r.damaged, r.rx_pkts) == (truncated, 0, 0)
            assert r.position == len(data) - (76 if truncated else 0)
    bad = bytearray(data)
    struct.pack_into("<I", bad, 24 + 2 * 76 + 8, 1 << 30)     # third record's caplen
    (tmp_path / "bad").write_bytes(bytes(bad))
    with PcapReader(tmp_path / "bad") as r, \
            pytest.raises(CaptureFormatError, match=f"damaged record at byte offset {24 + 2 * 76}"):
        r.walk_to_end()


def test_pcapng_damage(tmp_path):
    good = shb() + idb(1) + epb(0, 1, b"a" * 64)
    bad = bytearray(epb(0, 2, b"b" * 64))
    struct.pack_into("<I", bad, len(bad) - 4, 999)       # trailing length lies
    path = tmp_path / "bad.pcapng"
    path.write_bytes(good + bad + epb(0, 3, b"c" * 64))
    r = PcapReader(path)
    assert [g[0] for g in read_all_until_error(r)] == [b"a" * 64]
    assert r.damaged == 1

    for name, blob in [
        ("length 13", block(6, b"\0" * 40)[:4] + struct.pack("<I", 13) + b"\0" * 40),
        ("interface 5", epb(5, 0, b"x")),
        ("captured length", block(6, struct.pack("<IIIII", 0, 0, 0, 500, 500) + b"x")),
        ("runs past the end", struct.pack("<II", 6, 0x7FFFFFF0) + b"\0" * 40),
    ]:
        path.write_bytes(good + blob)
        r = PcapReader(path)
        with pytest.raises(CaptureFormatError, match=f"{path}: .*{name}"):
            read_all(r)
        assert r.damaged == 1, name


def read_all_until_error(reader):
    got = []
    with pytest.raises(CaptureFormatError, match="byte offset"):
        while True:
            batch = Batch(4)
            if reader.receive(batch) == -1:
                break
            got += [(batch.frame(i),) for i in range(len(batch))]
    return got


@pytest.mark.parametrize("cut", [4, 12, 40])
def test_pcapng_truncated_last_block(tmp_path, cut):
    data = shb() + idb(1) + epb(0, 1, b"a" * 64) + epb(0, 2, b"b" * 64)[:cut]
    path = tmp_path / "cut.pcapng"
    path.write_bytes(data)
    with PcapReader(path) as r:
        assert [g[0] for g in read_all(r)] == [b"a" * 64]
        assert (r.truncated, r.damaged) == (1, 0)


def test_frame_larger_than_an_empty_batch(tmp_path):
    path = tmp_path / "big.pcap"
    path.write_bytes(classic([(0, 0, b"x" * 500, 500)], big_endian=False))
    with PcapReader(path) as r:
        with pytest.raises(PortError, match="does not fit an empty batch") as exc:
            read_all(r, capacity=2, arena_size=256)
        assert not isinstance(exc.value, CaptureFormatError)


# ---------------------------------------------------------------- port specs


def test_port_specs(tmp_path):
    path = tmp_path / "s.pcap"
    write_with([b"x" * 60], [5], path)
    for spec in (f"pcap:{path}", str(path), f"PCAP:{path}"):
        with open_input(spec, port_id=1) as r:
            assert isinstance(r, PcapReader) and r.port_id == 1
            assert read_all(r) == [(b"x" * 60, 5, 60)]
    with open_output(f"pcap:{tmp_path / 'o.pcapng'}") as w:
        assert isinstance(w, PcapWriter)
    with open_output(str(tmp_path / "o.cap")) as w:
        assert w.path == str(tmp_path / "o.cap")


@pytest.mark.parametrize("spec,message", [
    ("afpacket:", "names no interface"),
    ("dpdk:0000:01:00.0", "not available yet; known schemes: pcap"),
    ("eth0", "unknown port spec 'eth0'.*pcap"),
    ("tap:x", "unknown port scheme .tap. in .tap:x.; known schemes: pcap"),
    ("capture", "unknown port spec .capture.; expected SCHEME:ARG"),
    ("pcap:", "names no file"),
    ("", "empty"),
])
def test_bad_port_specs(spec, message):
    with pytest.raises(PortError, match=message):
        open_input(spec)
    with pytest.raises(PortError, match=message):
        open_output(spec)


def test_a_writer_refuses_a_capture_a_reader_has_open(tmp_path, example_pcap):
    # Truncating a mapped capture took its pages away: SIGBUS on the next read, and
    # the capture lost.  The CLI refused it; the API did not.
    import shutil

    from mbx.errors import PortError

    cap = tmp_path / "x.pcap"
    shutil.copyfile(example_pcap, cap)
    before = cap.read_bytes()
    r = PcapReader(cap)
    with pytest.raises(PortError, match="this capture is being read as an input"):
        PcapWriter(cap)
    assert cap.read_bytes() == before
    r.close()
    PcapWriter(cap).close()             # once it is closed, it may be written


SHRINK = """
import os, sys
from mbx._packet import Batch
from mbx._pcap import PcapReader
from mbx.errors import PortError
from mbx.examples.capture import ether, udp4, write_example
path = sys.argv[1]
write_example(path, flows=400, seed=3)
r = PcapReader(path)
b = Batch(64)
first = r.receive(b)
os.truncate(path, 4096)         # as tcpdump -w onto it, or a cp over it, would
try:
    while True:
        b.reset()
        if r.receive(b) < 0:
            break
    print("no error")
except PortError as e:
    print(first, e)
"""


def test_a_capture_cut_short_by_another_program_while_read_is_an_error(tmp_path):
    # The file is mapped: another program shortening it took the pages past its new
    # end, and the next read killed the process (SIGBUS, exit 135): no error, no
    # summary, no --json, the output's last buffer lost.
    r = subprocess.run([sys.executable, "-c", SHRINK, str(tmp_path / "x.pcap")],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, (r.returncode, r.stderr)
    assert r.stdout.startswith("64 pcap:"), r.stdout
    assert "the file was cut short by another program while it was read" in r.stdout
    # the same under mbx run, the file cut by an NF's handler after 100 packets: the
    # run ends with the error, its summary and --json, and the frames read before
    # are in the output.  Cut inside a page (50,000), the rest of that page reads as
    # zeros without a SIGBUS: those were delivered as hundreds of empty frames.
    for size in (4096, 50_000):
        cap = tmp_path / "y.pcap"
        write_example(str(cap), flows=400, seed=3)
        nf = tmp_path / "cutter.py"
        nf.write_text("import os\nimport mbx\n"
                      "def make():\n"
                      "    nf = mbx.NF('cutter')\n"
                      "    seen = [0]\n"
                      "    def on(ev):\n"
                      "        seen[0] += 1\n"
                      f"        if seen[0] == 100:\n"
                      f"            os.truncate({str(cap)!r}, {size})\n"
                      "    nf.sub(mbx.PKT, on)\n"
                      "    return nf\n")
        out, counters = tmp_path / "out.pcap", tmp_path / "c.json"
        r = subprocess.run([sys.executable, "-m", "mbx.cli", "run", f"{nf}+l2fwd", "--in",
                            f"pcap:{cap}", "--out", f"pcap:{out}", "--json", str(counters),
                            "--burst", "16"], capture_output=True, text=True, timeout=60,
                           check=False, cwd=tmp_path)
        assert r.returncode == 2, (r.returncode, r.stderr)
        assert "cut short by another program" in r.stderr
        assert r.stdout.startswith("packets")
        written = json.loads(counters.read_text())
        assert "cut short by another program" in written["error"]
        frames = read_frames(out)
        assert 100 <= written["sent"] == len(frames)
        assert all(len(f) for _, f in frames), f"cut at {size}: empty frames delivered"


@pytest.mark.parametrize("fmt", ["pcap", "pcapng"])
def test_a_frame_check_sequence_the_capture_kept_is_dropped(tmp_path, fmt):
    # Captures that say their frames end with an FCS (the link-type field's FCS bits
    # in pcap, if_fcslen in pcapng) had those 4 bytes parsed and forwarded as frame.
    frames = random_frames(5, seed=7)
    fcs = b"\xde\xad\xbe\xef"
    if fmt == "pcap":
        # FCS present (0x04000000), 2 words of 16 bits (top 4 bits)
        data = classic([(1, 0, f + fcs, len(f) + 4) for f in frames], big_endian=False,
                       linktype=1 | 0x04000000 | (2 << 28))
    else:
        data = shb() + idb(1, fcslen_bits=32) + b"".join(
            epb(0, 1_000_000, f + fcs) for f in frames)
    path = tmp_path / f"fcs.{fmt}"
    path.write_bytes(data)
    with PcapReader(path) as r:
        assert r.linktype == 1
        got = read_all(r)
    assert [(f, wl) for f, _, wl in got] == [(f, len(f)) for f in frames]


@pytest.mark.parametrize("options,message", [
    # what AfPacketPort refuses, refused when the spec is read, in the spec's words
    ("ring=v9", "ring 'v9' is not one of v2, v3"),
    ("fanout=70000", "bad value '70000' for fanout: a PACKET_FANOUT group id from 0 "
                     "to 65535"),
    ("fanout_mode=spray", "fanout_mode 'spray' is not one of flow, hash, lb, cpu"),
    ("promisc=maybe", "bad value 'maybe' for promisc: use 1/0, yes/no, true/false, "
                      "on/off"),
    ("ring=v3&retire_ms=0", "retire_ms must be at least 1 with ring v3"),
    ("block_size=5000", "block_size 5000 is not a power of two, 4096 or more"),
    ("frame_size=100", r"frame_size 100: use a multiple of 16 from 128 up to "
                       r"block_size 131072 \(the default\)"),
    ("block_count=1", "block_count 1 is below 2"),
    ("offloads=1&frame_size=2048", "offloads: super-frames of up to 64 KiB must fit "
                                   "whole, but frame_size 2048 is below 65792"),
])
def test_afpacket_option_values_are_refused_when_the_spec_is_read(options, message):
    from mbx.ports import check_spec

    # No interface is looked at: the interface does not exist, and the value is named.
    spec = f"afpacket:mbx-nope0,mbx-nope1?{options}"
    with pytest.raises(PortError, match=message):
        check_spec(spec)
    with pytest.raises(PortError, match=message):
        open_input(spec)


def test_every_problem_of_an_afpacket_spec_is_named_at_once():
    from mbx.ports import check_spec

    # The spec was refused at its first problem: fixing it showed the next, one run
    # at a time.
    spec = ("afpacket:mbx-nope0?ring=v9&block_count=x&promisc=maybe&bogus=1&ring=v2"
            "&fanout_defrag=2")
    with pytest.raises(PortError) as err:
        check_spec(spec)
    text = str(err.value)
    for problem in ("bad value 'x' for block_count", "bad value 'maybe' for promisc",
                    "unknown option 'bogus'", "ring is given twice",
                    "bad value '2' for fanout_defrag", "ring 'v9' is not one of v2, v3"):
        assert text.count(problem) == 1, (problem, text)
    # the ring's sizes, judged together, each named too
    with pytest.raises(PortError) as err:
        check_spec("afpacket:mbx-nope0?frame_size=100&block_size=3000&block_count=1")
    for problem in ("block_size 3000 is not a power of two", "frame_size 100: use a "
                    "multiple of 16", "block_count 1 is below 2"):
        assert problem in str(err.value), (problem, str(err.value))


def test_an_output_is_checked_as_a_send_only_port():
    from mbx.ports import check_spec

    # ring sizes are a receiving port's: a send-only one takes (and ignores) them
    check_spec("afpacket:mbx-nope0?block_size=5000", rx=False)
    with pytest.raises(PortError, match="fanout: only a receiving port"):
        check_spec("afpacket:mbx-nope0?fanout=3", rx=False)
    with pytest.raises(PortError, match="fanout: only a receiving port"):
        open_output("afpacket:mbx-nope0?fanout=3")


def _afpacket_refuses(options, rx):
    """Whether AfPacketPort itself refuses ``options`` (a ValueError before it looks
    for the interface, which does not exist)."""
    from mbx._afpacket import AfPacketPort

    try:
        AfPacketPort("mbx-nope0", rx=rx, **options)
    except ValueError:
        return True
    except PortError as exc:
        assert "no such interface" in str(exc)
        return False
    raise AssertionError("opened an interface that does not exist")


def test_the_spec_parser_refuses_exactly_what_the_afpacket_port_refuses():
    # The parser asks AfPacketPort's rules (ring_layout) before anything is set up,
    # after turning the spec's words into the port's keywords: the two must agree on
    # every combination, so no option is lost or misnamed on the way.
    import itertools

    from mbx.ports import check_spec

    values = {"ring": [None, "v2", "v3"], "offloads": [None, "1"],
              "block_size": [None, "0", "4096", "5000", "65536", "1048576"],
              "frame_size": [None, "0", "100", "2048", "2056", "65792", "131072"],
              "block_count": [None, "0", "1", "2"], "retire_ms": [None, "0", "2"],
              "fanout": [None, "7"]}
    checked = 0
    for combo in itertools.product(*values.values()):
        given = {k: v for k, v in zip(values, combo, strict=True) if v is not None}
        options = {("fanout_group" if k == "fanout" else k): v if k == "ring" else
                   bool(int(v)) if k == "offloads" else int(v) for k, v in given.items()}
        spec = "afpacket:mbx-nope0?" + "&".join(f"{k}={v}" for k, v in given.items())
        for rx in (True, False):
            try:
                check_spec(spec, rx=rx)
                parser = False
            except PortError:
                parser = True
            assert parser == _afpacket_refuses(options, rx), (spec, rx)
            checked += 1
    assert checked > 5000


def test_a_record_whose_wire_length_is_under_its_captured_length_is_counted(tmp_path):
    # pcap does not allow it (tcpdump: "Invalid header", Wireshark: "Frame length is
    # less than captured length"); the stack needs wirelen >= caplen, so it is read
    # with its captured length on the wire, and counted: never changed silently
    from mbx.examples.capture import ether, udp4

    frames = [ether(udp4("198.18.0.1", "198.18.0.2", 1000 + i, 2000, b"x" * 11))
              for i in range(3)]
    path = tmp_path / "short_wire.pcap"
    path.write_bytes(classic([(1, 0, frames[0], 20), (2, 0, frames[1], len(frames[1])),
                              (3, 0, frames[2], 30)], big_endian=False))
    with PcapReader(path) as r:
        got = read_all(r, capacity=1)       # records left for a later burst: once each
        assert [w for _, _, w in got] == [len(f) for f in frames]
        assert r.wirelen_raised == 2 and r.counters["wirelen_raised"] == 2
    from mbx.flows import flows_json

    _, warnings = flows_json(str(path))     # mbx flows says it too
    assert warnings == ["2 records of the capture say fewer bytes on the wire than they "
                        "captured (not valid pcap): read as captured, every captured byte "
                        "in the summary"]
    for k in (0, 1):                        # every stack process walks every record
        with PcapReader(path) as r:
            r.rss_share(k, 2)
            read_all(r)
            assert r.wirelen_raised == 2
    out = tmp_path / "o.pcap"
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "run", "l2fwd", "--in",
                        f"pcap:{path}", "--out", f"pcap:{out}", "--json",
                        str(tmp_path / "c.json")],
                       capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    assert "input          2 records with a wire length under the captured length" in r.stdout
    assert json.loads((tmp_path / "c.json").read_text())["ports"]["in"]["wirelen_raised"] == 2
    assert [len(f) for _, f in read_frames(out)] == [len(f) for f in frames]


# What the reader gives back as it goes (_give_back in _pcap.pyx): every GIVE_BACK_STEP
# bytes passed, the pages below what it may still read.  A capture several steps long
# must end with about one step of it resident, never the whole file.
GIVE_BACK_STEP = 32 << 20
BIG_FRAMES = 60_000             # of 1,400 bytes: an 85 MB capture
BIG_T0_NS = 1_700_000_000 * NS


@pytest.fixture(scope="module")
def big_capture(tmp_path_factory):
    """(path, frames): a capture of BIG_FRAMES frames over 400 flows, one every
    10 µs, in a file far larger than GIVE_BACK_STEP."""
    rng = random.Random(5)
    templates = [ether(udp4(f"10.1.{k >> 8}.{k & 255}", "172.16.0.1", 1024 + k, 53,
                            bytes(1400 - 42))) for k in range(400)]
    frames = [templates[rng.randrange(400)] for _ in range(BIG_FRAMES)]
    path = os.path.realpath(tmp_path_factory.mktemp("big") / "big.pcap")
    with open(path, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B23C4D, 2, 4, 0, 0, 262144, 1))
        for i, f in enumerate(frames):
            ts = BIG_T0_NS + i * 10_000
            fh.write(struct.pack("<IIII", ts // NS, ts % NS, len(f), len(f)) + f)
    assert os.path.getsize(path) > 2.5 * GIVE_BACK_STEP
    yield path, frames
    os.unlink(path)


def test_pages_read_past_are_given_back(big_capture):
    path, frames = big_capture
    size_kb = os.path.getsize(path) >> 10
    limit_kb = (GIVE_BACK_STEP >> 10) + 8192        # one step, and the readahead
    batch = Batch(64)

    def drain(reader):
        got = []
        while True:
            batch.reset()
            if reader.receive(batch) == -1:
                return got
            got += [batch.frame(i) for i in range(len(batch))]

    with PcapReader(path) as r:
        got = drain(r)
        assert got == frames and r.rx_bytes == sum(map(len, frames))
        assert r.position == os.path.getsize(path)
        # read to its end, still mapped: no more than a step of it resident
        assert mapped_kb(path) is not None and mapped_kb(path) < limit_kb < size_kb / 2
        r.rewind()              # the pages given back are read again from the file
        assert drain(r) == frames
        assert mapped_kb(path) < limit_kb
    # software RSS walks records ahead of those it delivers: what it gives back must
    # not be any of those (the frames of both shares, together, are the capture's)
    shares = []
    for k in range(2):
        with PcapReader(path) as r:
            r.rss_share(k, 2)
            shares.append(drain(r))
            assert r.rx_pkts == len(shares[-1]) > 0
            assert mapped_kb(path) < limit_kb
    assert sorted(shares[0] + shares[1]) == sorted(frames)
    with PcapReader(path) as r:
        r.walk_to_end()
        assert r.position == os.path.getsize(path)
        assert mapped_kb(path) < limit_kb


PROBE_NF = """
import os
import mbx
from mbxtest import mapped_kb

class CaptureRss(mbx.NF):
    # At the first packet 90 % into the capture, the resident kB of the capture's
    # mapping in the process that reads it: this one (inline, each of --stacks) or
    # its parent (pipelined: the stack, ahead by the bursts in flight, still reading;
    # this NF process has the mapping too, from the fork, but reads none of it).
    def __init__(self):
        super().__init__("capture_rss")
        self.kb = None
        self.sub(mbx.PKT, self.on_pkt)

    def on_pkt(self, ev):
        if self.kb is None and ev.ts >= {at_ns}:
            found = [mapped_kb({path!r}, pid) for pid in (os.getpid(), os.getppid())]
            self.kb = max((kb for kb in found if kb is not None), default=-1)

    def report(self):
        return {{"kb": self.kb}}

def make():
    return CaptureRss()
"""


@pytest.mark.parametrize("how", [[], ["--deploy", "pipelined"], ["--stacks", "2"]],
                         ids=["inline", "pipelined", "stacks2"])
def test_a_run_over_a_big_capture_keeps_little_of_it_resident(tmp_path, big_capture, how):
    path, frames = big_capture
    nf = tmp_path / "capture_rss.py"
    nf.write_text(PROBE_NF.format(path=path,
                                  at_ns=BIG_T0_NS + BIG_FRAMES * 9 // 10 * 10_000))
    out, js = tmp_path / "out.pcap", tmp_path / "c.json"
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "run", str(nf), "--in", f"pcap:{path}",
                        "--out", f"pcap:{out}", "--json", str(js), "-q", *how],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "PYTHONPATH": os.path.dirname(__file__)})
    assert r.returncode == 0, r.stderr
    c = json.loads(js.read_text())
    assert c["packets"] == BIG_FRAMES and c["sent"] == BIG_FRAMES
    if how[:1] == ["--stacks"]:
        kbs = [s["reports"]["capture_rss"]["kb"] for s in c["stacks"]]
        sent = [read_frames(f"{out}.stack{k}") for k in range(2)]
        assert all(sent) and sorted(f for s in sent for _, f in s) == sorted(frames)
    else:
        kbs = [c["nfs"]["capture_rss"]["report"]["kb"]]
        assert [f for _, f in read_frames(out)] == frames
    # mapped and read 90 % in, yet no more than a step of it resident
    assert all(0 < kb < (GIVE_BACK_STEP >> 10) + 8192 for kb in kbs), kbs
