"""A naive Python AF_PACKET bridge between two interfaces (the ``pybridge`` mode).

Not a contender: it checks the bridge-mode plumbing of the test bed (no addresses in
the middlebox, the nftables ingress drop, static neighbours, offloads off) without
mbx, and gives a floor to compare the mbx modes with.  One packet socket per
interface; each frame received on one is sent out of the other.  Frames the kernel
reports as our own outgoing ones (``PACKET_OUTGOING``) are skipped.

    python pybridge.py IF0 IF1 [--duration S] [--json FILE] [--ready FILE]

Stops after ``--duration`` seconds (0: no limit) or on SIGINT/SIGTERM, then writes
its counters.
"""
import argparse
import json
import selectors
import signal
import socket
import sys
import time

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
PACKET_IGNORE_OUTGOING = 23  # linux/if_packet.h (4.20+)
SOL_PACKET = 263


def open_socket(iface):
    s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    try:
        s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
    except OSError:
        pass  # older kernel: filtered by sll_pkttype below
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.bind((iface, 0))
    s.setblocking(False)
    return s


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("if0")
    p.add_argument("if1")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--json")
    p.add_argument("--ready")
    args = p.parse_args(argv)
    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))
    socks = [open_socket(args.if0), open_socket(args.if1)]
    peer = {socks[0].fileno(): socks[1], socks[1].fileno(): socks[0]}
    counters = {"received": [0, 0], "sent": [0, 0], "send_errors": 0}
    index = {socks[0].fileno(): 0, socks[1].fileno(): 1}
    sel = selectors.DefaultSelector()
    for s in socks:
        sel.register(s, selectors.EVENT_READ)
    if args.ready:
        open(args.ready, "w").close()
    t_end = time.monotonic() + args.duration if args.duration > 0 else float("inf")
    t0 = time.monotonic()
    while not stop and time.monotonic() < t_end:
        for key, _ in sel.select(timeout=0.2):
            s = key.fileobj
            i = index[s.fileno()]
            out = peer[s.fileno()]
            for _ in range(64):
                try:
                    frame, addr = s.recvfrom(65535)
                except BlockingIOError:
                    break
                except InterruptedError:
                    continue
                if addr[2] == PACKET_OUTGOING:
                    continue
                counters["received"][i] += 1
                try:
                    out.send(frame)
                    counters["sent"][1 - i] += 1
                except OSError:
                    counters["send_errors"] += 1
    counters["elapsed_s"] = time.monotonic() - t0
    for s in socks:
        s.close()
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(counters, fh)
    print(json.dumps(counters))
    return 0


if __name__ == "__main__":
    sys.exit(main())
