"""``python -m benchmarks.testbed``: the load test bed (see docs/testbed.md).

    python -m benchmarks.testbed run --mode kernel,haproxy --workload all --runs 3 \\
        --duration 5 --json out.json
    python -m benchmarks.testbed setup --mode haproxy      # leave it up to poke at
    python -m benchmarks.testbed teardown
    python -m benchmarks.testbed report out.json --plot out.png
"""
import argparse
import json
import math
import os
import signal
import sys
import tempfile

from . import bed as tb
from .load import TOOLS, WORKLOADS

MAX_SECONDS = 86400.0      # a day: a bound for every time option
MAX_BIG_SIZE = 1 << 30     # the correctness download is built in memory


def _size(text):
    """An argparse type: a byte count such as 32M, 512k or 1G (1 byte to 1 GiB)."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    t = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = 1
    if t and t[-1] in units:
        t, unit = t[:-1], units[t[-1]]
    try:
        value = float(t) * unit
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 32M)") from None
    if not math.isfinite(value) or not 1 <= value <= MAX_BIG_SIZE:
        raise argparse.ArgumentTypeError(f"{text!r}: must be from 1 byte to 1G")
    return int(value)


def _selection(known, what):
    """An argparse type: comma-separated names from ``known``, or 'all'; at least one."""
    def parse(text):
        if text.strip() == "all":
            return list(known)
        items = list(dict.fromkeys(x.strip() for x in text.split(",") if x.strip()))
        bad = [x for x in items if x not in known]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(bad)}; known: "
                                             f"{', '.join(known)}")
        if not items:
            raise argparse.ArgumentTypeError(f"no {what} given; known: "
                                             f"{', '.join(known)} (or all)")
        return items
    return parse


def _tag(text):
    problem = tb.tag_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


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
                   help=f"{' and '.join(tb.L4LB_MODES)}: run this NF (a built-in name "
                        "or a .py file with make(name, vip, backends)) instead of l4lb, e.g. "
                        "benchmarks/testbed/l4lb_python.py (the Python-handler L4 LB)")


def _at_least(low, kind=int, high=None):
    """An argparse type: a finite number of ``kind`` from ``low`` to ``high`` (a
    bounded run needs at least one round, one connection and some seconds, and
    not days of them); seconds are bounded by ``MAX_SECONDS``."""
    if high is None and kind is float:
        high = MAX_SECONDS

    def parse(text):
        try:
            value = kind(text)
        except (ValueError, OverflowError):
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at least {low}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at most {high:g}")
        return value
    return parse


def _writable(parser, option, path):
    """Refuse at once (rc 2) an output file that cannot be written, before any work:
    its directory must exist and take a new file (a temporary one is made and removed),
    and the path must not be a directory."""
    if not path:
        return
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        parser.error(f"{option} {path}: is a directory")
    if not os.path.isdir(d):
        parser.error(f"{option} {path}: directory {d} does not exist")
    try:
        with tempfile.NamedTemporaryFile(dir=d, prefix=".mbx-testbed-probe-"):
            pass
    except OSError as exc:
        parser.error(f"{option} {path}: cannot write in {d}: {exc.strerror or exc}")


def _check_bed_options(parser, modes, args):
    """Every mode's preconditions before anything is set up or measured."""
    if args.mbx_nf and not any(m in tb.L4LB_MODES for m in modes):
        parser.error(f"--mbx-nf is for {', '.join(tb.L4LB_MODES)}, none of which is "
                     "selected")
    if args.mbx_port and not any(m in tb.MBX_MODES for m in modes):
        parser.error(f"--mbx-port is for {', '.join(tb.MBX_MODES)}, none of which is "
                     "selected")
    opts = _bed_options(args)
    # every mode's problems at once, each said once (modes often share one)
    reasons = dict.fromkeys(r for m in modes for r in tb.option_problems(m, **opts))
    if reasons:
        parser.error("\n  ".join(reasons))


def _first_line(text):
    text = str(text).strip()
    return text.splitlines()[0] if text else ""


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.testbed", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="set up, load, measure, tear down (bounded)")
    r.add_argument("--mode", default="kernel,haproxy", type=_selection(tb.MODES, "modes"),
                   help=f"comma-separated modes or 'all' ({', '.join(tb.MODES)})")
    r.add_argument("--workload", default="all", type=_selection(WORKLOADS, "workloads"),
                   help=f"comma-separated workloads or 'all' ({', '.join(WORKLOADS)})")
    r.add_argument("--tool", default="wrk", type=_selection(TOOLS, "tools"),
                   help="wrk, ab or wrk,ab")
    r.add_argument("--runs", type=_at_least(1, int, 1000), default=3,
                   help="rounds (3); medians over them")
    r.add_argument("--duration", type=_at_least(1, float), default=5.0,
                   help="seconds per run (5)")
    r.add_argument("--connections", type=_at_least(1, int, 10000), default=32,
                   help="concurrent connections (32)")
    r.add_argument("--gap", type=_at_least(0, float), default=1.0,
                   help="pause before each run (1 s)")
    r.add_argument("--check-seconds", type=_at_least(1, float), default=1.0,
                   help="seconds of checked load per workload in the correctness pass (1)")
    r.add_argument("--check-connections", type=_at_least(1, int, 10000), default=8)
    r.add_argument("--quiet-wait", type=_at_least(0, float), default=0.0,
                   help="before each run wait up to S seconds for the machine to idle "
                        "(under 0.3 busy CPUs): it may be shared (0: do not wait)")
    r.add_argument("--json", help="write the results here (after every run: a partial "
                                   "file says complete: false)")
    r.add_argument("--markdown", action="store_true", help="print the summary table")
    _add_bed_options(r)
    s = sub.add_parser("setup", help="set up one mode and leave it running")
    s.add_argument("--mode", default="kernel", choices=tb.MODES)
    s.add_argument("--tag", default="mbxt-manual", type=_tag,
                   help="namespace prefix (mbxt-manual: mbxt-manual-cli, -mb, -srv); "
                        "letters, digits, '_' and '-', up to 32")
    _add_bed_options(s)
    t = sub.add_parser("teardown", help="stop and delete what setup left")
    t.add_argument("--tag", default="mbxt-manual", type=_tag)
    rep = sub.add_parser("report", help="markdown table (and a plot) from a results file")
    rep.add_argument("json", nargs="+", help="results files (their rows are merged)")
    rep.add_argument("--plot", help="write a bar chart (PNG) here")
    rep.add_argument("--pending", default="", help="modes to list as pending")
    args = p.parse_args(argv)
    p = {"run": r, "setup": s, "teardown": t, "report": rep}[args.cmd]  # its errors

    if args.cmd == "report":
        _writable(p, "--plot", args.plot)
        return _report(args)

    if args.cmd == "teardown":
        path = os.path.join(tb.STATE_DIR, f"{args.tag}.json")
        if not os.path.exists(path):
            print(f"nothing to tear down ({path} does not exist)", file=sys.stderr)
            return 1
        st = tb.teardown_state(path)
        print(f"stopped {len(st['stopped'])} processes, deleted "
              f"{', '.join(st['ns'].values())}")
        for name, pid, why in st["skipped"]:
            print(f"  not signalled: {name} (PID {pid}): {why}")
        return 0

    modes = args.mode if args.cmd == "run" else [args.mode]
    _check_bed_options(p, modes, args)
    if args.cmd == "run":
        _writable(p, "--json", args.json)
    tb.install_signal_handlers()
    try:
        reason = tb.unavailable(modes)
        if reason:
            print(f"testbed: cannot run {', '.join(modes)}: {reason}", file=sys.stderr)
            return 2
        if args.cmd == "setup":
            return _setup(args)
        return _run(args, modes)
    except KeyboardInterrupt as exc:
        # Ctrl-C, SIGTERM or SIGHUP: the beds have cleaned up on the way here (they
        # hold further signals while they do); hold them for the last words too.
        for sig in tb.HELD_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        signum = getattr(exc, "signum", signal.SIGINT)
        left = [n for n in tb.list_netns()
                if n.startswith(f"{tb.PREFIX}{os.getpid()}-")]
        what = f"namespaces left: {', '.join(left)}" if left else "cleaned up"
        print(f"testbed: interrupted ({signal.Signals(signum).name}): {what}"
              + _saved_note(args), file=sys.stderr)
        return 128 + signum


def _saved_note(args):
    path = getattr(args, "json", None)
    doc = _LAST_SAVED.get("doc")
    if not path or doc is None:
        return ""
    return (f"; {len(doc['results'])} runs, {len(doc['failed_runs'])} failed, in "
            f"{path} (complete: {str(doc['complete']).lower()})")


_LAST_SAVED = {}


def _run(args, modes):
    from .runner import run_matrix, write_json

    def save(doc):
        _LAST_SAVED["doc"] = doc
        if args.json:
            write_json(args.json, doc)

    doc = run_matrix(modes, args.workload, args.tool, runs=args.runs,
                     duration=args.duration, connections=args.connections, gap=args.gap,
                     check_seconds=args.check_seconds,
                     check_connections=args.check_connections, big_size=args.big_size,
                     quiet_wait=args.quiet_wait, bed_options=_bed_options(args),
                     log=lambda m: print(m, file=sys.stderr, flush=True), save=save)
    if args.markdown or not args.json:
        from .report import markdown
        print(markdown(doc))
    failed_checks = [c for c in doc["checks"] if not c["ok"]]
    for f in doc["failed_runs"]:
        what = " ".join(str(x) for x in (f["mode"], f["tool"], f["workload"]) if x)
        print(f"testbed: round {f['round'] + 1} {what}: {f['stage']} failed: "
              f"{_first_line(f['error'])}", file=sys.stderr)
    if doc["ok"]:
        print(f"testbed: {len(doc['results'])} runs, all checks passed"
              + (f"; results in {args.json}" if args.json else ""), file=sys.stderr)
        return 0
    reasons = []
    if doc["failed_runs"]:
        reasons.append(f"{len(doc['failed_runs'])} runs failed")
    if failed_checks:
        reasons.append(f"{len(failed_checks)} correctness passes failed")
    errs = sum(r["errors_total"] for r in doc["summary"])
    if errs:
        reasons.append(f"{errs} request errors")
    print(f"testbed: not ok: {', '.join(reasons) or 'see the results'}"
          + (f"; results in {args.json}" if args.json else ""), file=sys.stderr)
    return 1


def _setup(args):
    path = os.path.join(tb.STATE_DIR, f"{args.tag}.json")
    if os.path.exists(path):
        print(f"{path} exists: run teardown --tag {args.tag} first", file=sys.stderr)
        return 1
    # no --duration for the bridge: it runs until teardown
    bed = tb.Bed(args.mode, tag=args.tag, big_size=args.big_size, new_session=True,
                 mbx_duration=0, **_bed_options(args))
    with bed:
        bed.detach(path)
    st = bed.state()
    print(json.dumps(st, indent=1))
    print(f"\ntry: ip netns exec {st['ns']['cli']} curl -s {st['url']['64']} | wc -c\n"
          f"     ip netns exec {st['ns']['cli']} wrk -c32 -d5s {st['url']['8k']}\n"
          f"then: python -m benchmarks.testbed teardown --tag {args.tag}")
    return 0


def _report(args):
    from .report import ReportError, load, markdown, merge, plot
    try:
        docs = [load(path) for path in args.json]
        doc = merge(docs)
        print(markdown(doc, [m for m in args.pending.split(",") if m]))
        if args.plot:
            plot(doc, args.plot)
    except ReportError as exc:
        print(f"testbed report: {exc}", file=sys.stderr)
        return 2
    for path, d in zip(args.json, docs, strict=True):
        if d.get("complete") is False:
            why = d.get("stopped") or "the run did not finish"
            print(f"testbed report: {path}: partial results ({why})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
