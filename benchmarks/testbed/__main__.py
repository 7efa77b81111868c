"""``python -m benchmarks.testbed``: the load test bed (see docs/testbed.md).

    python -m benchmarks.testbed run --mode kernel,haproxy --workload all --runs 3 \\
        --duration 5 --json out.json
    python -m benchmarks.testbed setup --mode haproxy      # leave it up to poke at
    python -m benchmarks.testbed teardown
    python -m benchmarks.testbed report out.json --plot out.png
"""
import argparse
import json
import os
import sys

from . import bed as tb
from .load import TOOLS, WORKLOADS


def _size(text):
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    if t and t[-1] in units:
        return int(float(t[:-1]) * units[t[-1]])
    return int(t)


def _list(text, known, what):
    if text == "all":
        return list(known)
    items = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in items if x not in known]
    if bad:
        raise SystemExit(f"unknown {what}: {', '.join(bad)}; known: {', '.join(known)}")
    return items


def _bed_options(args):
    return {"offloads": args.offloads == "on", "rps": args.rps == "on",
            "http_reuse": args.http_reuse, "haproxy_mode": args.haproxy_mode,
            "mbx_port": args.mbx_port, "mbx_nf": args.mbx_nf}


def _add_bed_options(p):
    p.add_argument("--big-size", type=_size, default=tb.BIG_SIZE,
                   help="size of the correctness download (32M)")
    p.add_argument("--offloads", choices=("off", "on"), default="off",
                   help="veth offloads (off; on runs mbx's bridges with offloads=1, "
                        "and is refused for mbx-l4lb-dpdk and pybridge)")
    p.add_argument("--rps", choices=("off", "on"), default="off",
                   help="RPS over all CPUs on the veths (off: its IPIs cost every mode "
                        "on this machine; docs/testbed.md)")
    p.add_argument("--http-reuse", default="never", choices=("never", "safe", "aggressive",
                                                             "always"),
                   help="HAProxy http-reuse (never: one backend connection per client "
                        "connection, as a splicer or L4 LB has)")
    p.add_argument("--haproxy-mode", default="http", choices=("http", "tcp"))
    p.add_argument("--mbx-port", default="", metavar="OPTS",
                   help="AF_PACKET options of the mbx modes' bridge, as in a port spec "
                        "after '?' (e.g. ring=v3 to compare with the block ring)")
    p.add_argument("--mbx-nf", default="", metavar="NF",
                   help="mbx-l4lb: run this NF (a built-in name or a .py file with "
                        "make(name, vip, backends)) instead of l4lb, e.g. "
                        "benchmarks/testbed/l4lb_python.py (the Python-handler L4 LB)")


def _at_least(low, kind=int):
    """An argparse type: a number of ``kind`` not below ``low`` (a bounded run
    needs at least one round, one connection and some seconds)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not value >= low:        # also refuses nan
            raise argparse.ArgumentTypeError(f"{text!r}: must be at least {low}")
        return value
    return parse


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.testbed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="set up, load, measure, tear down (bounded)")
    r.add_argument("--mode", default="kernel,haproxy",
                   help=f"comma-separated modes or 'all' ({', '.join(tb.MODES)})")
    r.add_argument("--workload", default="all",
                   help=f"comma-separated workloads or 'all' ({', '.join(WORKLOADS)})")
    r.add_argument("--tool", default="wrk", help="wrk, ab or wrk,ab")
    r.add_argument("--runs", type=_at_least(1), default=3,
                   help="rounds (3); medians over them")
    r.add_argument("--duration", type=_at_least(1, float), default=5.0,
                   help="seconds per run (5)")
    r.add_argument("--connections", type=_at_least(1), default=32,
                   help="concurrent connections (32)")
    r.add_argument("--gap", type=_at_least(0, float), default=1.0,
                   help="pause before each run (1 s)")
    r.add_argument("--check-seconds", type=_at_least(1, float), default=1.0,
                   help="seconds of checked load per workload in the correctness pass (1)")
    r.add_argument("--check-connections", type=_at_least(1), default=8)
    r.add_argument("--quiet-wait", type=_at_least(0, float), default=0.0,
                   help="before each run wait up to S seconds for the machine to idle "
                        "(under 0.3 busy CPUs): it may be shared (0: do not wait)")
    r.add_argument("--json", help="write the results here")
    r.add_argument("--markdown", action="store_true", help="print the summary table")
    _add_bed_options(r)
    s = sub.add_parser("setup", help="set up one mode and leave it running")
    s.add_argument("--mode", default="kernel", choices=tb.MODES)
    s.add_argument("--tag", default="mbxt-manual",
                   help="namespace prefix (mbxt-manual: mbxt-manual-cli, -mb, -srv)")
    _add_bed_options(s)
    t = sub.add_parser("teardown", help="stop and delete what setup left")
    t.add_argument("--tag", default="mbxt-manual")
    rep = sub.add_parser("report", help="markdown table (and a plot) from a results file")
    rep.add_argument("json", nargs="+", help="results files (their rows are merged)")
    rep.add_argument("--plot", help="write a bar chart (PNG) here")
    rep.add_argument("--pending", default="", help="modes to list as pending")
    args = p.parse_args(argv)

    if args.cmd == "report":
        from .report import markdown, merge, plot
        docs = []
        for path in args.json:
            with open(path) as fh:
                docs.append(json.load(fh))
        doc = merge(docs)
        print(markdown(doc, [m for m in args.pending.split(",") if m]))
        if args.plot:
            plot(doc, args.plot)
        return 0

    if args.cmd == "teardown":
        path = os.path.join(tb.STATE_DIR, f"{args.tag}.json")
        if not os.path.exists(path):
            print(f"nothing to tear down ({path} does not exist)", file=sys.stderr)
            return 1
        st = tb.teardown_state(path)
        print(f"stopped {len(st['pids'])} processes, deleted {', '.join(st['ns'].values())}")
        return 0

    modes = _list(args.mode, tb.MODES, "modes") if args.cmd == "run" else [args.mode]
    reason = tb.unavailable(modes)
    if reason:
        print(f"testbed: cannot run {', '.join(modes)}: {reason}", file=sys.stderr)
        return 2
    tb.install_signal_handlers()

    if args.cmd == "setup":
        path = os.path.join(tb.STATE_DIR, f"{args.tag}.json")
        if os.path.exists(path):
            print(f"{path} exists: run teardown --tag {args.tag} first", file=sys.stderr)
            return 1
        bed = tb.Bed(args.mode, tag=args.tag, big_size=args.big_size, new_session=True,
                     **_bed_options(args))
        with bed:
            bed.detach(path)
        st = bed.state()
        print(json.dumps(st, indent=1))
        print(f"\ntry: ip netns exec {st['ns']['cli']} curl -s {st['url']['64']} | wc -c\n"
              f"     ip netns exec {st['ns']['cli']} wrk -c32 -d5s {st['url']['8k']}\n"
              f"then: python -m benchmarks.testbed teardown --tag {args.tag}")
        return 0

    from .runner import run_matrix
    workloads = _list(args.workload, WORKLOADS, "workloads")
    tools = _list(args.tool, TOOLS, "tools")
    doc = run_matrix(modes, workloads, tools, runs=args.runs, duration=args.duration,
                     connections=args.connections, gap=args.gap,
                     check_seconds=args.check_seconds,
                     check_connections=args.check_connections, big_size=args.big_size,
                     quiet_wait=args.quiet_wait,
                     bed_options=_bed_options(args),
                     log=lambda m: print(m, file=sys.stderr, flush=True))
    text = json.dumps(doc, indent=1)
    if args.json:
        with open(args.json, "w") as fh:
            fh.write(text + "\n")
    if args.markdown or not args.json:
        from .report import markdown
        print(markdown(doc))
    return 0 if doc["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
