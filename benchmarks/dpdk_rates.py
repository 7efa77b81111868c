"""Packets per second on one core: DPDK vdev receive -> send, against the pcap port
and a pure-Python AF_PACKET receive loop.

    python benchmarks/dpdk_rates.py [--capture FILE] [--seconds 1.0] [--cpu N]

Each figure is the best of three runs of about ``--seconds``, moving Batches of 256
through ``Port.receive``/``Port.send`` (one Python call per burst, the copy loops in
C without the GIL).  The ratios at the end are against the pcap port from the same
run.  Needs mbx built with DPDK; the AF_PACKET baseline needs CAP_NET_RAW (skipped
without it).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import tempfile
import time

from _args import seconds

from mbx._packet import Batch
from mbx._pcap import PcapReader, PcapWriter
from mbx.errors import PortError
from mbx.examples.capture import write_example

BURST = 256


def _best(fn, seconds, runs=3):
    return max(fn(seconds) for _ in range(runs))


def forward_rate(make_in, make_out, seconds, rewind=None):
    """Mpps of receive -> send between two freshly made ports for ``seconds``."""
    inp, out = make_in(), make_out()
    batch = Batch(BURST)
    moved = 0
    try:
        t0 = time.perf_counter()
        deadline = t0 + seconds
        while True:
            for _ in range(64):
                batch.reset()
                n = inp.receive(batch)
                if n < 0:
                    if rewind is None:
                        break
                    rewind(inp)
                    continue
                moved += out.send(batch)
            else:
                if time.perf_counter() < deadline:
                    continue
            break
        dt = time.perf_counter() - t0
    finally:
        inp.close()
        out.close()
    return moved / dt / 1e6


def afpacket_python_rate(seconds, frames=20000):
    """Mpps of a pure-Python recv loop on AF_PACKET (lo), frames queued in advance;
    None without CAP_NET_RAW."""
    try:
        rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x88B5))
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    except PermissionError:
        return None
    try:
        rx.bind(("lo", 0x88B5))
        try:
            rx.setsockopt(socket.SOL_SOCKET, 33, 1 << 28)     # SO_RCVBUFFORCE
        except OSError:
            rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 26)
        tx.bind(("lo", 0))
        frame = b"\x00" * 12 + b"\x88\xb5" + b"\x00" * 50   # local experimental type
        best = 0.0
        end = time.perf_counter() + seconds * 3
        while time.perf_counter() < end:
            for _ in range(frames):
                tx.send(frame)
            got = 0
            t0 = time.perf_counter()
            try:
                while True:
                    rx.recv(2048, socket.MSG_DONTWAIT)
                    got += 1
            except BlockingIOError:
                pass
            dt = time.perf_counter() - t0
            if got:
                best = max(best, got / dt / 1e6)
        return best
    finally:
        rx.close()
        tx.close()


def capture_file(text):
    """A capture the pcap port can replay, refused before EAL starts."""
    try:
        with PcapReader(text) as r:
            got = r.receive(Batch(BURST))
    except PortError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if got <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: no frames to replay")
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--capture", type=capture_file,
                    help="capture to replay (default: mbx's example)")
    ap.add_argument("--seconds", type=seconds, default=1.0)
    allowed = sorted(os.sched_getaffinity(0))
    ap.add_argument("--cpu", type=int, choices=allowed, default=allowed[0], metavar="N",
                    help="pin to this CPU, one this process may use (default: the first)")
    args = ap.parse_args(argv)

    try:
        from mbx import _dpdkport
    except ImportError as exc:
        sys.exit(f"mbx was built without DPDK ({exc}); apt-get install libdpdk-dev and "
                 f"reinstall mbx")
    os.sched_setaffinity(0, {args.cpu})     # per core: EAL keeps this affinity
    # --no-huge memory is only touched as pools use it; a cached capture needs room.
    _dpdkport.eal_init(_dpdkport.default_eal_args(memory_mb=1024))
    with tempfile.TemporaryDirectory(prefix="mbx-dpdk-rates-") as tmp:
        capture = args.capture or os.path.join(tmp, "example.pcap")
        if not args.capture:
            write_example(capture, flows=2000, seed=1)
        report(_dpdkport.DpdkPort, capture, args.seconds, args.cpu, tmp)


def report(DpdkPort, capture, run_s, cpu, tmp):
    """Measure every path over ``capture`` and print the table; ``tmp`` takes the
    files the paths write."""
    with PcapReader(capture) as r:
        b = Batch(BURST)
        count = 0
        while (n := r.receive(b)) >= 0:
            count += n
            b.reset()
        size = r.rx_bytes / max(count, 1)
    print(f"capture {capture}: {count:,} frames, {size:.0f} B average; cpu {cpu}; "
          f"best of 3 x {run_s:.1f} s, bursts of {BURST}")
    serial = iter(range(100, 10**6))
    devnull = os.path.join(tmp, "out.pcap")

    def vdev(driver, extra="", mbufs=8192):
        name = f"{driver}{next(serial)}"
        return DpdkPort(f"{name},{extra}" if extra else name, mbufs=mbufs, burst=64)

    rates = {}
    rates["pcap port: file -> file"] = _best(lambda s: forward_rate(
        lambda: PcapReader(capture), lambda: PcapWriter(devnull), s,
        rewind=lambda p: p.rewind()), run_s)
    rates["dpdk net_pcap cached (infinite_rx) -> net_null"] = _best(lambda s: forward_rate(
        # infinite_rx keeps the whole capture in mbufs of the port's pool.
        lambda: vdev("net_pcap", f"rx_pcap={capture},infinite_rx=1",
                     mbufs=count + 8192),
        lambda: vdev("net_null"), s), run_s)
    rates["dpdk net_null -> net_null"] = _best(lambda s: forward_rate(
        lambda: vdev("net_null", "size=64"), lambda: vdev("net_null"), s), run_s)
    rates["dpdk net_pcap file -> net_pcap file"] = _best(lambda s: forward_rate(
        lambda: vdev("net_pcap", f"rx_pcap={capture}"),
        lambda: vdev("net_pcap", f"tx_pcap={devnull}"), s,
        rewind=None), run_s)
    py = afpacket_python_rate(run_s)

    base = rates["pcap port: file -> file"]
    print(f"{'path':<50} {'Mpps':>8} {'x pcap port':>12}")
    for name, mpps in rates.items():
        print(f"{name:<50} {mpps:8.2f} {mpps / base:12.2f}")
    if py is None:
        print(f"{'python AF_PACKET recv loop (lo)':<50} {'skipped: needs CAP_NET_RAW':>21}")
    else:
        print(f"{'python AF_PACKET recv loop (lo)':<50} {py:8.2f} {py / base:12.2f}")
        cached = rates["dpdk net_pcap cached (infinite_rx) -> net_null"]
        print(f"dpdk cached capture vs python AF_PACKET: {cached / py:.1f}x")
    print(f"dpdk cached capture vs pcap port: "
          f"{rates['dpdk net_pcap cached (infinite_rx) -> net_null'] / base:.1f}x")


if __name__ == "__main__":
    main()
