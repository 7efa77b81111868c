"""Fig. 7b of the paper on this machine: 1 vs 2 stack processes on a replayed capture.

Each stack process replays the capture and keeps the flows whose symmetric hash is
its share (software RSS): the reader passes over the other process's frames after a
short header walk, before copying or parsing them, so what every process repeats is
reading the record headers and hashing.  Two figures per row: the wall-clock ratio
(needs two idle cores) and the CPU-time ratio, the 1-stack run's CPU seconds over
the busier stack process's, which is what the wall-clock ratio would be on two free
cores and holds up on a busy machine.  Then throughput while running, as the paper's
Fig. 7b reads it: packets over the slowest stack's run loop, process start and exit
left out (median of the rounds, the fastest run of each side, and every round's
ratio, which shows how much the host moves it).  Then the CPU per packet of one stack, and the
two stack processes' CPU together as a multiple of it (what a second process adds);
and the same split measured serially on one CPU (see serial()), the figure that
holds best on a machine shared with other work.  Last, two ceilings measured in
the same run: two spin loops, and two independent stacks each replaying the
whole capture (independent_round(), in every round right after the split, so the
two see the same host), which no split of the work can beat.  ``--json`` keeps
every round's figures, ``--plot`` draws them as the paper's Fig. 7b.

    python benchmarks/rss_figures.py [--quick] [--runs 3] [--packets 1000000]
                                     [--json FILE] [--plot FILE]
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _args import at_least, parse, writable  # noqa: E402
from captures import make_capture  # noqa: E402

import mbx  # noqa: E402
from mbx.runtime import run_parallel  # noqa: E402


def noop_nf():
    nf = mbx.NF("noop")
    nf.sub(mbx.PKT, lambda ev: None)
    return [nf]


def spin(n=20_000_000):
    s = 0
    for i in range(n):
        s += i
    return s


def machine_scaling(runs):
    """How much faster two CPU-bound processes finish than one doing both jobs
    (2.0 on two idle, independent cores): the ceiling for any 2-process figure."""
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        spin()
        one = time.perf_counter() - t0
        t0 = time.perf_counter()
        pids = []
        for _ in range(2):
            pid = os.fork()
            if pid == 0:
                spin()
                os._exit(0)
            pids.append(pid)
        for pid in pids:
            os.waitpid(pid, 0)
        out.append(2 * one / (time.perf_counter() - t0))
    return statistics.median(out)


def independent_round(make, spec):
    """How much faster two independent stacks, each replaying the whole capture,
    finish than one: the ceiling for this very work on this machine (2.0 on two
    free cores).  Nothing is split or shared but the file's page cache, so what
    it loses is the machine's: two vCPUs that share a physical core or its caches
    (the guest cannot see that) run each process slower than one alone.  Pinned as
    run_parallel pins its stack processes (process k on the k-th usable CPU)."""
    from mbx.ports import open_input
    from mbx.runtime import App

    cpus = sorted(os.sched_getaffinity(0))

    def whole():
        inp = open_input(spec)
        App(make(), flow_capacity=131072).run(inp)
        inp.close()

    def at_once(k):
        t0 = time.perf_counter()
        pids = []
        for i in range(k):
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    if k <= len(cpus):
                        os.sched_setaffinity(0, {cpus[i]})
                    whole()
                    code = 0
                finally:
                    os._exit(code)
            pids.append(pid)
        for pid in pids:
            _, status = os.waitpid(pid, 0)
            assert status == 0, f"a stack process failed: status {status}"
        return time.perf_counter() - t0

    return 2 * at_once(1) / at_once(2)


def stacks(k, make, spec, n):
    """Wall seconds of a run over k stack processes, the slowest process's seconds in
    its run loop, and each process's CPU seconds.  One stack runs through
    run_parallel too, so both sides pay the same process start (fork, Stack Memory
    faulted in fresh).

    The wall clock includes what a process does once, whatever the traffic: fork,
    allocating Stack Memory, opening the capture, reporting and exiting (15-25 ms
    here, the same for one stack or two, so it pulls the ratio towards 1).  The run
    loop's time (``timing.run_s``: first read to last flow closed, the capture's
    page faults and Stack Memory's first touches included) is what throughput
    means in the paper's Fig. 7b, a rate while running."""
    t0 = time.perf_counter()
    c, parts = run_parallel(make, spec, stacks=k, flow_capacity=131072)
    wall = time.perf_counter() - t0
    assert c["packets"] == n
    return wall, max(p["timing"]["run_s"] for p in parts), [p["cpu_s"] for p in parts]


def serial(make, spec, runs):
    """The work split, measured where a busy machine disturbs it least: in this
    process, on one CPU, one after another, the CPU seconds of the 1-stack run and of
    each of the two shares (software RSS 0 of 2, 1 of 2), each the least of ``runs``
    (other processes only ever add to it).  Misses what two stacks running at once
    share (L3, memory bandwidth); that is in the figures above."""
    from mbx.ports import open_input
    from mbx.runtime import App, stack_share

    def cpu(k, n):
        inp = open_input(spec)
        app = App(make(), flow_capacity=stack_share(131072, n), rss=(k, n))
        t0 = time.process_time()
        app.run(inp)
        spent = time.process_time() - t0
        inp.close()
        return spent

    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {max(mine)})
    try:
        best = [min(x) for x in zip(*[(cpu(0, 1), cpu(0, 2), cpu(1, 2))
                                       for _ in range(runs)], strict=True)]
    finally:
        os.sched_setaffinity(0, mine)
    return best


def plot(result, path):
    """Fig. 7b as the paper draws it, throughput while running for 1 and 2 stack
    processes per work, beside every round's ratio (the host's spread) and the goal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    works = result["works"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    x = range(len(works))
    left.bar([i - 0.2 for i in x], [w["running_mpps"][0] for w in works], 0.4,
             label="1 stack process")
    left.bar([i + 0.2 for i in x], [w["running_mpps"][1] for w in works], 0.4,
             label="2 stack processes")
    left.set_xticks(list(x), [w["work"] for w in works], fontsize=8)
    left.set_ylabel("Mpps while running (64 B)")
    left.legend(fontsize=8)
    left.grid(axis="y", alpha=0.3)
    for i, w in enumerate(works):
        rounds = w["rounds_running_ratio"]
        right.plot([i] * len(rounds), rounds, "o", alpha=0.5, color="C0")
        right.plot([i - 0.15, i + 0.15], [w["running_ratio"]] * 2, "-", color="C3", lw=2)
        right.plot([i], [w["independent"]], "^", color="C7")
    right.axhline(result["goal"], ls="--", color="C2", label=f"goal {result['goal']}x")
    right.plot([], [], "-", color="C3", label="median 1 stack / median 2 stacks")
    right.plot([], [], "^", color="C7", label="two independent stacks (ceiling)")
    right.set_xticks(list(x), [w["work"] for w in works], fontsize=8)
    right.set_xlim(-0.6, len(works) - 0.4)
    right.set_ylabel("2 stacks / 1 stack, each round")
    right.legend(fontsize=8)
    right.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Fig. 7b: {result['packets']:,} packets over {result['flows']:,} flows, "
                 f"{result['runs']} rounds, {result['cores']} cores (load average "
                 f"{result['load']:.2f} at the end)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true",
                    help="20 k flows, 200 k packets unless --packets is given")
    ap.add_argument("--runs", type=at_least(1), default=3)
    ap.add_argument("--packets", type=at_least(1), default=1_000_000,
                    help="packets in the capture (1,000,000)")
    ap.add_argument("--json", metavar="FILE", type=writable,
                    help="write every round's figures here")
    ap.add_argument("--plot", metavar="FILE", type=writable,
                    help="draw Fig. 7b here (needs matplotlib: pip install '.[bench]')")
    args = parse(ap, argv, {"packets": 200_000})
    n, flows = args.packets, 20_000 if args.quick else 100_000
    cap = make_capture(n, flows, "64")
    spec = "pcap:" + cap
    rows, works = [], []
    for label, make in (("stack alone", list), ("PKT to a no-op Python NF", noop_nf)):
        one, two, cpu1, cpu2, pair, skew, same, share = [], [], [], [], [], [], [], []
        loop1, loop2 = [], []
        for _ in range(args.runs):      # alternate, so drifting load hits both alike
            wall1, run1, [cpu] = stacks(1, make, spec, n)
            one.append(wall1)
            loop1.append(run1)
            cpu1.append(cpu)
            wall2, run2, cpus = stacks(2, make, spec, n)
            two.append(wall2)
            loop2.append(run2)
            cpu2.append(max(cpus))
            pair.append(sum(cpus))
            skew.append(max(cpus) / min(cpus))
            # The ceiling measured right after, so that both see the same host.
            same.append(independent_round(make, spec))
            share.append(wall1 / wall2 / same[-1])
        t1, t2 = statistics.median(one), statistics.median(two)
        r1, r2 = statistics.median(loop1), statistics.median(loop2)
        c1 = statistics.median(cpu1)
        rows.append((label, n / t1 / 1e6, n / t2 / 1e6, t1 / t2,
                     c1 / statistics.median(cpu2), n / r1 / 1e6, n / r2 / 1e6, r1 / r2,
                     min(loop1) / min(loop2),
                     sorted(a / b for a, b in zip(loop1, loop2, strict=True)),
                     c1 * 1e9 / n,
                     statistics.median(pair) / c1, statistics.median(skew),
                     statistics.median(same), statistics.median(share)))
        works.append({"work": label, "wall_s": [one, two], "run_loop_s": [loop1, loop2],
                      "cpu_s": [cpu1, cpu2], "pair_cpu_s": pair, "independent_rounds": same,
                      "running_mpps": [n / r1 / 1e6, n / r2 / 1e6], "running_ratio": r1 / r2,
                      "wall_ratio": t1 / t2,
                      "rounds_running_ratio": [a / b for a, b in zip(loop1, loop2,
                                                                      strict=True)],
                      "independent": statistics.median(same)})
    print(f"capture: {n:,} packets over {flows:,} flows (64 B), median of {args.runs}")
    print("wall clock, process start to exit:")
    print(f"{'work':<28} {'1 stack Mpps':>13} {'2 stacks Mpps':>14} {'ratio':>7} "
          f"{'CPU-time ratio':>15}")
    for label, a, b, r, rc, *_ in rows:
        print(f"{label:<28} {a:>13.2f} {b:>14.2f} {r:>6.2f}x {rc:>14.2f}x")
    print("throughput while running (packets over the slowest stack's run loop; "
          "process start and exit left out):")
    print(f"{'work':<28} {'1 stack Mpps':>13} {'2 stacks Mpps':>14} {'ratio':>7} "
          f"{'best of each':>13}   each round's ratio")
    for label, _a, _b, _r, _rc, a, b, r, best, each, *_ in rows:
        print(f"{label:<28} {a:>13.2f} {b:>14.2f} {r:>6.2f}x {best:>12.2f}x   "
              + " ".join(f"{x:.2f}" for x in each))
    # What the second process costs in CPU, whatever else runs on the machine: the
    # two stack processes' CPU seconds together over the single one's (1.00: no
    # work repeated; what each repeats is reading and walking the other's frames).
    # The two shares are the same work (the serial figure below), so CPU seconds
    # that differ between the two processes are the CPUs' speeds differing.
    for label, *_, ns, extra, skewed, _same, _share in rows:
        print(f"{label}: 1 stack {ns:.0f} ns CPU per packet; 2 stacks together "
              f"{extra:.2f}x that; the slower of the 2 took {skewed:.2f}x the "
              f"other's CPU time")
    print("one CPU, serially (least CPU time of the runs): the two shares' work "
          "against one stack's")
    for label, make in (("stack alone", list), ("PKT to a no-op Python NF", noop_nf)):
        t1, a, b = serial(make, spec, args.runs)
        print(f"{label}: 1 stack {t1 * 1e3:.0f} ms; shares {a * 1e3:.0f} + {b * 1e3:.0f}"
              f" ms = {(a + b) / t1:.2f}x; on two free cores {t1 / max(a, b):.2f}x")
    ceiling = machine_scaling(args.runs)
    print(f"machine: two CPU-bound processes scale {ceiling:.2f}x here (2.00 = two "
          "free cores); the figures above as a share of that: "
          + ", ".join(f"{row[3] / ceiling:.0%}" for row in rows))
    print("machine, this work: two independent stacks, each replaying the whole "
          "capture at once, against one (measured in each round right after the "
          "split; the share is the median of the rounds' split ratio over it)")
    for label, *_, same, share in rows:
        print(f"{label}: {same:.2f}x; 2 stacks' ratio as a share of it: {share:.0%}")
    load = os.getloadavg()[0]
    print(f"load average now: {load:.2f} on {os.cpu_count()} cores")
    result = {"packets": n, "flows": flows, "runs": args.runs, "cores": os.cpu_count(),
              "load": load, "goal": 1.8, "spin_scaling": ceiling, "works": works}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    if args.plot:
        plot(result, args.plot)


if __name__ == "__main__":
    main()
