"""What NF processes may do, pipelined: figures as ratios within one run.

    python benchmarks/nfproc_figures.py [--mb 32] [--runs 3]

1. Stack Memory in the shared arena against the heap: the TCP Monitor reassembling
   every stream for a no-op DATA_RDY handler, inline, tables from ``StackMemory``
   vs from the heap (what the pipelined deployment pays for sharing them);
2. stream reads in an NF process: an NF hashing every DATA_RDY's bytes (SHA-256),
   pipelined against inline (MB/s of payload);
3. mb_up_sub reaching the stack: an NF that reads each flow's first DATA_RDY and
   unsubscribes the flow, against one that reads them all, pipelined: bytes the
   stack still reassembles, and time.

Each figure is the median of ``--runs`` runs, the contenders alternating.  The
capture is ``captures.make_bulk_capture(MB, segment="small")`` (HTTP-like
connections, several exchanges each, 100-200-byte segments).
"""
import argparse
import gc
import hashlib
import statistics
import time

import captures
from _args import at_least

import mbx
from mbx._shm import StackMemory
from mbx.ports import open_input


class Hasher(mbx.NF):
    def __init__(self):
        super().__init__("hasher")
        self.sha = {}
        self.sub(mbx.DATA_RDY, self.on_data)

    def on_data(self, ev):
        self.sha.setdefault((ev.flow, ev.stream_dir), hashlib.sha256()).update(ev.read())


class FirstOnly(mbx.NF):
    def __init__(self, unsubscribe):
        super().__init__("first_only")
        self.unsubscribe = unsubscribe
        self.sub(mbx.DATA_RDY, self.on_data)

    def on_data(self, ev):
        hashlib.sha256(ev.read()).digest()
        if self.unsubscribe:
            self.up_sub(mbx.DATA_RDY, ev.flow, None)


def noop():
    nf = mbx.NF("noop")
    nf.sub(mbx.DATA_RDY, lambda ev: None)
    return [nf]


def run(path, nfs, deploy, arena=False):
    inp = open_input("pcap:" + path)
    try:
        gc.collect()
        app = mbx.App(nfs, deploy=deploy, stack="tcp", stream_memory=256 << 20)
        t = time.perf_counter()
        if arena:
            with StackMemory().building():
                counters = app.run(inp, burst=64)
        else:
            counters = app.run(inp, burst=64)
        return time.perf_counter() - t, counters, app.stack.pool.bytes_stored
    finally:
        inp.close()


def median_of(runs, contenders):
    times = {name: [] for name in contenders}
    last = {}
    for _ in range(runs):
        for name, fn in contenders.items():
            dt, counters, stored = fn()
            times[name].append(dt)
            last[name] = (counters, stored)
    return {n: statistics.median(v) for n, v in times.items()}, last


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=at_least(1), default=32, help="MB of TCP payload")
    ap.add_argument("--runs", type=at_least(1), default=3)
    args = ap.parse_args(argv)
    path = captures.make_bulk_capture(total_mb=args.mb, segment="small")
    print(f"capture: {path}")

    t, last = median_of(args.runs, {
        "heap": lambda: run(path, noop(), "inline"),
        "arena": lambda: run(path, noop(), "inline", arena=True),
    })
    mb = last["heap"][1] / 1e6
    print(f"1. Monitor, inline, {mb:.0f} MB reassembled: heap {mb / t['heap']:.0f} "
          f"MB/s, shared arena {mb / t['arena']:.0f} MB/s, "
          f"arena/heap {t['heap'] / t['arena']:.2f}x")

    t, last = median_of(args.runs, {
        "inline": lambda: run(path, [Hasher()], "inline"),
        "pipelined": lambda: run(path, [Hasher()], "pipelined"),
    })
    print(f"2. SHA-256 of every stream in the NF: inline {mb / t['inline']:.0f} MB/s, "
          f"pipelined {mb / t['pipelined']:.0f} MB/s, "
          f"pipelined/inline {t['inline'] / t['pipelined']:.2f}x")

    t, last = median_of(args.runs, {
        "all": lambda: run(path, [FirstOnly(False)], "pipelined"),
        "first": lambda: run(path, [FirstOnly(True)], "pipelined"),
    })
    (ca, sa), (cf, sf) = last["all"], last["first"]
    print(f"3. pipelined, first DATA_RDY then mb_up_sub(None) vs every DATA_RDY: "
          f"bytes reassembled {sf / 1e6:.1f} vs {sa / 1e6:.1f} MB "
          f"({sf / sa:.3f}x), DATA_RDY built {cf['events']['DATA_RDY']['published']} vs "
          f"{ca['events']['DATA_RDY']['published']}, time {t['first']:.2f} vs "
          f"{t['all']:.2f} s ({t['all'] / t['first']:.2f}x faster), "
          f"requests applied {cf['pipeline']['requests']}")


if __name__ == "__main__":
    main()
