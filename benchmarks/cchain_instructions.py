"""Chains of 1 and 6 no-op NFs counted in instructions, not time: on a shared VM whose
host takes the CPU away (timings moved by a third from run to run), the instructions
a packet costs are the figure that does not move, so this is the benchmark that can
tell a change of a few instructions per NF.

Each count is one process run under valgrind's callgrind (``apt-get install
valgrind``): ``cchain_figures.run_once`` for a chain of N over F TCP connections of
10 packets.  Two capture sizes cancel what does not grow with the packets (imports,
setup): per packet = (count at 3 F - count at F) / (20 F packets).  The children run
with ``PYTHONHASHSEED=0``, so that dict layouts, and the counts, repeat.  Printed: the
instructions per packet of the chain of 1 and of 6, their ratio (what the chain of 6
keeps of the chain of 1's throughput if instructions were time) and the
instructions each NF past the first adds per packet.

    python benchmarks/cchain_instructions.py [--handler c|batch|event] [--no-nf-timing]
                                             [--flows 1000]
"""
import argparse
import os
import re
import shutil
import subprocess
import sys

from _args import at_least

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = """
import sys
sys.path.insert(0, {here!r})
from captures import make_tcp64_capture
from cchain_figures import run_once
n, flows, handler, timing = {n}, {flows}, {handler!r}, {timing}
run_once(n, "pcap:" + make_tcp64_capture(flows, 10), flows, handler, timing)
"""


def instructions(n, flows, handler, timing):
    code = CHILD.format(here=HERE, n=n, flows=flows, handler=handler, timing=timing)
    out = subprocess.run(["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
                          sys.executable, "-c", code],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONHASHSEED": "0"}).stderr
    return int(re.search(r"Collected : (\d+)", out).group(1))


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--handler", choices=("c", "batch", "event"), default="c")
    ap.add_argument("--no-nf-timing", dest="nf_timing", action="store_false",
                    help="without per NF handler clocks")
    ap.add_argument("--flows", type=at_least(1), default=1000,
                    help="the smaller capture's TCP connections (1000; the larger has 3x)")
    args = ap.parse_args(argv)
    if shutil.which("valgrind") is None:
        sys.exit("cchain_instructions.py needs valgrind (apt-get install valgrind)")
    small, large = args.flows, 3 * args.flows
    for flows in (small, large):            # make the captures outside the counts
        instructions(0, flows, args.handler, args.nf_timing)
    packets = (large - small) * 10
    per = {n: (instructions(n, large, args.handler, args.nf_timing)
               - instructions(n, small, args.handler, args.nf_timing)) / packets
           for n in (1, 6)}
    print(f"{args.handler} handlers{'' if args.nf_timing else ', no handler clocks'}; "
          f"instructions per packet (callgrind, 64 B TCP, bursts of 64)")
    print(f"chain of 1: {per[1]:.0f}  chain of 6: {per[6]:.0f}  6/1 = "
          f"{per[1] / per[6]:.3f}x; each NF past the first adds "
          f"{(per[6] - per[1]) / 5:.1f} instructions per packet")


if __name__ == "__main__":
    main()
