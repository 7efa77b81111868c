"""The ``mbx`` command: run an application over a port, make the example capture."""
import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time

from mbx._flow import CAPACITY_MAX
from mbx.errors import MbxError
from mbx.examples.capture import FLOWS_MAX as EXAMPLE_FLOWS_MAX
from mbx.flows import STREAM_WINDOW as FLOWS_WINDOW
from mbx.flows import STREAM_WINDOW_MAX as FLOWS_WINDOW_MAX

_EPILOG = """\
examples:
  mbx example-capture demo.pcap
  mbx run flow_stats+logger --in pcap:demo.pcap --set logger.path=events.jsonl
  mbx run l4lb --in pcap:demo.pcap --out pcap:lb.pcap \\
      --set l4lb.vip=198.18.3.1:80 --set l4lb.backends=198.18.2.1:80,198.18.2.2:80
"""

# `mbx flows --strict`: a summary written whole that a warning says is incomplete;
# apart from 2 (an error) and 130 (interrupted), so a script can tell the three apart
EXIT_INCOMPLETE = 3


def _parse_sets(items):
    options = {}
    for item in items or ():
        name, eq, value = item.partition("=")
        # the key is a keyword argument (no dots); the NF may be module.path:attr
        nf, dot, key = name.rpartition(".")
        if not eq or not dot or not nf or not key:
            raise MbxError(f"--set {item!r}: expected NF.KEY=VALUE, e.g. logger.path=out.jsonl")
        options.setdefault(nf, {})[key] = value
    return options


class Progress:
    """One status line on stderr (a terminal), refreshed by the stack's callback;
    ``listeners`` (the --stats view, the Prometheus exporter) get a snapshot of the
    counters at each call.  The caller leaves the line out (``enabled``) where the
    --stats table is drawn in its place; the exporter draws nothing."""

    def __init__(self, port, enabled, listeners=(), out=None):
        self.port = port
        self.out = out
        self.enabled = enabled
        self.listeners = list(listeners)
        self.t0 = time.monotonic()

    def __call__(self, stack):
        if self.listeners:
            from mbx.stats import snapshot

            snap = snapshot(stack, self.port, self.out)
            for listener in self.listeners:
                listener.update(snap)
        if not self.enabled:
            return
        dt = max(time.monotonic() - self.t0, 1e-9)
        size = getattr(self.port, "size", 0)
        pos = getattr(self.port, "position", 0)
        frac = f" {100.0 * pos / size:5.1f}%" if size else ""
        sys.stderr.write(
            f"\r{frac} {stack.pkts:>12,} pkts  {_rate(stack.pkts / dt):>11}  "
            f"{stack.bytes * 8 / dt / 1e9:6.2f} Gbit/s  flows {stack.flows.active:,}   ")
        sys.stderr.flush()

    def done(self):
        if self.enabled:            # once: ends the progress line
            sys.stderr.write("\n")
            self.enabled = False


def _shown(value):
    if isinstance(value, bool) or not isinstance(value, int | float):
        return value if isinstance(value, str) else json.dumps(value)
    return f"{value:,}" if isinstance(value, int) else f"{value:,.3f}"


def _rate(pps):
    # Mpps for a stack's rates; a slow run (a live link, a slow NF) in packets/s,
    # which "0.000 Mpps" would hide
    return f"{pps / 1e6:.3f} Mpps" if pps >= 10_000 else f"{pps:,.0f} pps"


def _print_counters(c, elapsed, out=None):
    from mbx.ports import port_total
    from mbx.stats import lost_in_flight

    out = out if out is not None else sys.stdout     # the stream of now, not of import
    pps = c["packets"] / elapsed if elapsed > 0 else 0.0
    w = out.write
    w(f"packets        {c['packets']:,} ({c['bytes']:,} bytes) in {elapsed:.3f} s, "
      f"{_rate(pps)}\n")
    if c.get("stopped"):
        # a script or a reader must not take these counters for the whole input's
        w(f"stopped        by {c['stopped']} after {c['packets']:,} packets: the run did "
          "not finish, the counters are of part of it\n")
    w(f"sent           {c['sent']:,}\n")
    w(f"dropped        by NFs {c['dropped_by_nf']:,}, malformed {c['dropped_malformed']:,}"
      + (f", fragments {c['dropped_fragments']:,} (refused by reassembly, see fragments)"
         if c["dropped_fragments"] else "")
      + (f", {lost_in_flight(c)} {c['dropped_on_error']:,} (neither sent nor dropped "
         "by an NF)" if c["dropped_on_error"] else "") + "\n")
    f = c["flows"]
    # What ended the flows and cut fragments short: a stop; an error that cut the run
    # short (its port's, or another stack's, whose failure stopped this one): the
    # flows then ended early; or the input's end, also where an error came after it
    # (an NF's stop() raising).  With --stacks, some processes may have read to the end.
    early = f.get("shutdown_early", 0)
    ended_by = ("stop" if c.get("stopped") else "error" if c.get("error") and early
                else "end of the input")
    at_error = early if ended_by == "error" else 0
    rest = f.get("shutdown", 0) - at_error
    w(f"flows          created {f['created']:,}, expired {f['expired']:,}, "
      f"evicted {f['evicted']:,}"
      + (f", closed {f['closed']:,}" if f.get("closed") else "")
      + (f", ended at the stop {f['shutdown']:,}" if ended_by == "stop" and f.get("shutdown")
         else (f", ended with the input {rest:,}" if rest else "")
         + (f", ended at the error {at_error:,}" if at_error else ""))
      + (f", refused {f['refused']:,} packets (no room for their flow)" if f["refused"]
         else "") + "\n")
    for side, port in (c.get("ports") or {}).items():
        unsent = (port or {}).get("tx_dropped")
        if unsent:
            why = "; ".join(f"{k}: {v['tx_error']}" for k, v in port.items()
                            if isinstance(v, dict) and v.get("tx_error")) or port.get("tx_error")
            w(f"not sent       {unsent:,} packet{'s' if unsent != 1 else ''}, by the {side} port"
              + (f" (last error: {why})" if why else "") + "\n")
    inp = (c.get("ports") or {}).get("in") or {}
    lost, oversize, cut, whole, unread, bad = (port_total(inp, key) for key in (
        "rx_dropped", "rx_oversize", "rx_truncated", "rx_whole", "rx_unread",
        "rx_bad_length"))
    if lost - oversize - bad:
        w(f"not received   {lost - oversize - bad:,} frames: the receive ring was full "
          "(raise block_count, or use ring=v3 for floods of small frames)\n")
    if bad:
        w(f"bad length     {bad:,} frame{'s' if bad != 1 else ''} whose length the "
          "driver gave is more than its buffer holds: not received\n")
    if oversize:
        w(f"too large      {oversize:,} frame{'s' if oversize != 1 else ''} larger than a "
          "whole burst's memory (raise --burst), or than the 256 KiB a DPDK port takes: "
          "not received\n")
    if unread:
        w(f"unread         {unread:,} frame{'s' if unread != 1 else ''} still in the receive "
          "ring when the input ended (--duration, --max-packets, a signal or an error): "
          "neither processed nor sent\n")
    discarded = (port_total((c.get("ports") or {}).get("out") or {}, "tx_unread")
                 if (c.get("ports") or {}).get("out") else port_total(inp, "tx_unread"))
    if discarded:
        w(f"discarded      {discarded:,} frame{'s' if discarded != 1 else ''} sent into a "
          "net_ring that nothing read before it closed: counted as sent, read by no one\n")
    if port_total(inp, "peer_gone"):
        w("input          ended when its memif peer went away (the link went down)\n")
    if cut:
        w(f"cut short      {cut:,} frames longer than a ring slot (raise frame_size; "
          "super-frames from senders with TSO/GSO, a veth's default, or merged by GRO "
          "or LRO on mbx's own interfaces, need ?offloads=1, or those offloads off)\n")
    cut_again = sum(port_total(port or {}, "tx_cut")
                    for port in (c.get("ports") or {}).values())
    if cut_again:
        w(f"cut again      {cut_again:,} datagram{'s' if cut_again != 1 else ''} longer than "
          "an output's link, sent as fragments\n")
    too_long = sum(port_total(port or {}, "tx_too_long")
                   for port in (c.get("ports") or {}).values())
    if whole and too_long:
        # read whole past a ring slot, and frames refused as too long: a TCP
        # super-frame (DF set) cannot be cut as a rebuilt datagram is.  Not for frames
        # unsent for another reason (a link down or gone): the MTU is not why.
        w(f"long frames    {whole:,} frames longer than a ring slot were read whole; one "
          "longer than an output's MTU leaves only as fragments, and not at all if it "
          "may not be cut: a datagram with DF set or an IPv6 one its source did not "
          "fragment (the two sides' MTUs differ?), a super-frame from a sender with "
          "TSO/GSO (a veth's default) or merged by GRO or LRO on the interface mbx "
          "reads (a NIC's default; use ?offloads=1, or those offloads off), or one "
          "the kernel rebuilt for --stacks from fragments with DF set\n")
    link = sum(port_total(port or {}, "link_errors")      # an output's too
               for port in (c.get("ports") or {}).values())
    if link:
        w(f"link           {link:,} link error{'s' if link != 1 else ''} (a port's link went "
          "down: an error raised on its socket, or no carrier when it sent); frames sent "
          "meanwhile count as not sent\n")
    if inp.get("skipped"):
        n = inp["skipped"]
        w(f"input          {n:,} frame{'s' if n != 1 else ''} skipped: "
          f"{'their' if n != 1 else 'its'} interface's link type is not one mbx reads "
          f"(the first: {inp['skipped_linktype']})\n")
    if port_total(inp, "truncated"):
        w("input          the capture ends in a record cut short (its writer stopped "
          "mid-write): that record was not read\n")
    raised = port_total(inp, "wirelen_raised")
    if raised:
        w(f"input          {raised:,} record{'s' if raised != 1 else ''} with a wire length "
          "under the captured length (not valid pcap): read, and written to a pcap "
          "output, with the captured length as the wire length\n")
    steps = c.get("clock_steps_back", 0)
    if steps:
        w(f"clock          stepped back {steps:,} time{'s' if steps != 1 else ''}: a packet "
          "came more than the idle timeout (at least 1 s) behind the latest time seen "
          "(one stamped ahead of its neighbours, or a clock set back), and the clock "
          "went back to it; flows seen at the later time go idle from there\n")
    for side in [inp] + [inp[s] for s in ("client", "server") if isinstance(inp.get(s), dict)]:
        if side.get("damage"):
            # DPDK net_pcap's file: the pcap port would have ended the run here
            w(f"input          the capture is damaged ({side['damage']}): net_pcap "
              "reads such a file without an error, so frames it gave from there on, "
              "if any, are not the capture's\n")
    fr = c["fragments"]
    if any(fr.values()):
        # held: every fragment the table ever took, not what it holds now; each of
        # them went into a rebuilt datagram, was discarded with its own, or waits
        w(f"fragments      held in all {fr['held']:,} ({fr['held_completed']:,} rebuilt "
          f"into datagrams, {fr['held_discarded']:,} discarded with theirs"
          + (f", {fr['held_pending']:,} still held" if fr.get("held_pending") else "")
          + f"), reassembled {fr['completed']:,}, "
          f"timed out {fr['timed_out']:,}, memcap {fr['memcap_drops']:,}, bad {fr['bad']:,}"
          + (f", incomplete at the {ended_by} {fr['pending_at_end']:,}"
             if fr.get("pending_at_end") else "")
          + (f", no room in their burst {fr['no_room']:,} (lower --burst)"
             if fr.get("no_room") else "")
          + (f", too many pieces {fr['too_many']:,}" if fr.get("too_many") else "") + "\n")
    if c["parse"]:
        w("parse          " + ", ".join(f"{k} {v:,}" for k, v in sorted(c["parse"].items()))
          + "\n")
    t = c.get("tcp")
    if t:
        from mbx._stream import MAX_OOO_PIECES

        w(f"tcp            packets {t['tcp_packets']:,}, connections {t['connections']:,}, "
          f"streams {t['streams_opened']:,}, gaps {t['gaps']:,} ({t['gap_bytes']:,} bytes), "
          f"conflicts {t['conflicts']:,}"
          + (f" ({t['unchecked_bytes']:,} retransmitted bytes not compared: released "
             "already, see retain)" if t.get("unchecked_bytes") else "")
          + f", memcap {t['memcaps']:,}"
          + (f" ({t['memcaps_pieces']:,} of them: {MAX_OOO_PIECES} out-of-order pieces held "
             "already)" if t.get("memcaps_pieces") else "")
          + (f", SYN data the receiver did not take {t['syn_data_dropped']:,} bytes"
             if t.get("syn_data_dropped") else "")
          + (f", data past the window's edge no ACK took {t['edge_data_dropped']:,} "
             "bytes" if t.get("edge_data_dropped") else "")
          + (f", payload after close {t['payload_after_close']:,} "
             f"segment{'s' if t['payload_after_close'] != 1 else ''} (not delivered: "
             "both FINs acknowledged)" if t.get("payload_after_close") else "")
          + (f", payload after FIN {t['payload_after_fin']:,} "
             f"segment{'s' if t['payload_after_fin'] != 1 else ''} (not delivered: beyond "
             "the sender's FIN)" if t.get("payload_after_fin") else "")
          + (f", bad checksums {t['bad_checksums']:,} (left out, as their receiver "
             "drops them)" if t.get("bad_checksums") else "")
          + (f", not verifiable {t['unverifiable']:,} (cut by the snaplen or "
             "checksum offloaded: taken as they are)" if t.get("unverifiable") else "")
          + f", rst sent {t['rst_sent']:,}\n")
    if c["events"]:
        w("events         type: published / delivered\n")
        for name, e in c["events"].items():
            w(f"  {name:<24} {e['published']:>12,} / {e['delivered']:,}\n")
    p = c.get("pipeline")
    if p:
        w(f"pipeline       epochs {p['epochs']:,} (up to {p['max_in_flight']} of "
          f"{p['inflight']} in flight; the stack waited {p['stack_wait_s']:.3f} s), "
          f"ring drops {p['ring_dropped']:,} ({p['ring_dropped_pkts']:,} packets), "
          f"lost {p['lost']:,}\n")
        # ring drops: at the NF's own ring, so the column adds up to the line above
        w(f"  {'NF process':<20} {'events in':>12} {'handled':>12} {'drops':>10} "
          f"{'ring drops':>10} {'handler s':>10}  state\n")
        for name, n in p["nfs"].items():
            w(f"  {name:<20} {n['events_in']:>12,} {n['delivered']:>12,} {n['drops']:>10,}"
              f" {n['ring_dropped']:>10,} {n['handler_s']:>10.3f}  {n['state']}"
              f"{' (failure ' + (n['failure'] or 'none') + ')' if n['state'] != 'ok' else ''}"
              "\n")
            if n.get("restart_limit"):
                w(f"    restarts {n['restarts']} of {n['restart_limit']}\n")
            for why in n["deaths"]:         # with or without a restart policy
                w(f"    died: {why}\n")
    reports = {name: n["report"] for name, n in (c.get("nfs") or {}).items()
               if n.get("report")}
    if reports:
        w("NF reports     what each NF counted (its report())\n")
        for name, report in reports.items():
            w(f"  {name:<20} " + ", ".join(f"{key} {_shown(value)}"
                                           for key, value in report.items()) + "\n")


@contextlib.contextmanager
def _json_on_stdout(args):
    """``--json -``: the counters are all a run writes on standard output.  What it
    prints besides (the summary, an NF's prints, a driver's log) goes to standard
    error meanwhile, moved at the file descriptor so that the processes a run forks
    (pipelined NFs, --stacks) follow; the counters go to the saved descriptor."""
    if args.json != "-":
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    args.json_stdout = os.fdopen(saved, "w")
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        args.json_stdout.close()


def _run_config(args, nfs, config, given_by):
    """The --json ``config``: what the run was given, all of it, so that its counters
    can be told apart from another run's and the run made again from them alone:
    every stack option (App's defaults where none was given; ``stack`` as it ran,
    the TCP Monitor or the Network Layer alone) and where each was given, the NFs in
    chain order with what each was made from, the ports and the run's bounds."""
    from mbx.runtime import runs_monitor, stack_config

    stack = stack_config(config)
    stack["stack"] = "tcp" if runs_monitor(config.get("stack", "auto"), nfs, config) \
        else "network"
    made = []
    for nf in nfs:
        entry = {"name": nf.name, **(nf.made_from or {}), "failure": nf.failure,
                 "restart": nf.restart, "restart_backoff": nf.restart_backoff}
        if nf.group is not None:
            # a merge function is named by where it is, as an application file names it
            merge = nf.group_merge
            entry.update(group=nf.group, merge=merge if isinstance(merge, str) else
                         f"{getattr(merge, '__module__', '?')}:"
                         f"{getattr(merge, '__qualname__', merge)}")
        made.append(entry)
    run = {"app": getattr(args, "app", None) or os.path.basename(sys.argv[0]),
           "stack": stack,
           "given_by": {key: given_by.get(key, "default") for key in stack},
           "nfs": made,
           "ports": {"in": args.inp, "out": args.out},
           "burst": args.burst, "max_packets": args.max_packets,
           "duration": args.duration, "stacks": args.stacks}
    # an option's value JSON has no type for (a TOML date) as its text
    return json.loads(json.dumps(run, default=str))


def _write_json(args, counters):
    if getattr(args, "run_config", None) is not None:
        counters = dict(counters, config=args.run_config)
    try:
        # never NaN/Infinity, which json.dumps writes by default and no JSON reader
        # takes (NF reports are checked for them in take_report)
        text = json.dumps(counters, indent=2, allow_nan=False)
    except ValueError as exc:
        raise MbxError(f"--json {args.json}: the counters hold a value JSON cannot "
                       f"carry ({exc}): nothing written") from None
    if args.json == "-":
        args.json_stdout.write(text + "\n")
        args.json_stdout.flush()
    else:
        write_output(args.json, text, "--json")


def write_output(path, text, what):
    """Write ``text`` to ``path`` at the end of a run; MbxError names the file and
    why it could not be written (a full disk, a file system that refuses it)."""
    from mbx.runtime import inherited_fd

    given = inherited_fd(path)
    try:
        # /dev/stderr, /dev/fd/N: through the descriptor itself (opened anew, a file
        # it goes to would be truncated, and what went there before overwritten)
        with (os.fdopen(os.dup(given), "w") if given is not None else
              open(path, "w")) as fh:
            fh.write(text)
    except OSError as exc:
        raise MbxError(f"{what} {path}: cannot write: {exc.strerror}") from None


def _same_file(a, b):
    """Whether paths a and b name one file, existing (links too) or to be made."""
    if os.path.exists(a) and os.path.exists(b):
        return os.path.samefile(a, b)
    return os.path.realpath(a) == os.path.realpath(b)


def _names_stdout(path):
    """Is ``path`` this process's standard output (/dev/stdout, /dev/fd/1, or the
    file or pipe it goes to)?"""
    if os.path.abspath(path) in ("/dev/stdout", "/dev/fd/1", "/proc/self/fd/1"):
        return True
    try:
        st, out = os.stat(path), os.fstat(1)
    except OSError:
        return False
    return (st.st_dev, st.st_ino) == (out.st_dev, out.st_ino)


def _port_writes(args):
    """``[(option, path)]``: the files the run's ports write (a capture output's, a
    DPDK ``net_pcap`` device's ``tx_pcap``, in the input too), each with the option
    that names it: one list for every check of where packets are written."""
    from mbx.ports import written_files

    ports = [("--out", args.out, True)] if args.out else []
    ports.append(("--in", args.inp, False))
    return [(f"{opt} {spec}", path) for opt, spec, output in ports
            for path in written_files(spec, output=output)]


@contextlib.contextmanager
def _summary_stream(args):
    """Where the summary goes: standard error when an NF writes standard output (a
    Logger with path ``-``), so that standard output carries its lines alone.  Only
    the summary moves, not the run: the Logger takes standard output as it starts."""
    if not getattr(args, "summary_stderr", False):
        yield
        return
    with contextlib.redirect_stdout(sys.stderr):
        yield


def _run(nfs, args, spec=None):
    args.summary_stderr = any(getattr(nf, "writes_stdout", False) for nf in nfs)
    given = args.json
    if args.json and args.json != "-" and _names_stdout(args.json):
        # --json /dev/stdout, or the file standard output goes to: as --json -, so
        # that the counters are not written over the summary (or it over them)
        args.json = "-"
    # the port that writes its packets to standard output, if one does
    out_stdout = next((opt for opt, path in _port_writes(args) if _names_stdout(path)), None)
    if out_stdout and args.json == "-":
        raise MbxError(f"--json {given} and {out_stdout}: both would write "
                       "standard output, the counters into the packets: give one "
                       "of them a file")
    writer = next((nf for nf in nfs if getattr(nf, "writes_stdout", False)), None)
    if writer is not None and (out_stdout or args.json == "-"):
        # one stream, two writers: the NF's lines would land inside the capture or
        # the counters' JSON, and nothing would say so until their reader choked
        raise MbxError(f"NF {writer.name} writes standard output, and "
                       + (out_stdout if out_stdout else f"--json {given}")
                       + " would too: give one of them a file")
    if out_stdout:
        # the capture is all that standard output carries (mbx run ... | tcpdump -r -):
        # the summary, and what NFs print, go to standard error
        with contextlib.redirect_stdout(sys.stderr):
            return _run_checked(nfs, args, spec)
    with _json_on_stdout(args):
        return _run_checked(nfs, args, spec)


def _run_checked(nfs, args, spec):
    from mbx import ports
    from mbx.controller import (
        check,
        lone_groups_warning,
        loop_warning,
        publication_loop,
        unused_warning,
    )
    from mbx.ports import (
        bridge_output_note,
        capture_file,
        coalescing_not_sendable,
        links_not_ready,
        read_files,
        written_files,
    )
    from mbx.runtime import App, check_writable, unused_monitor_options, writes_as_is

    if spec is None:    # a chain: the links mbx check would refuse, refused here too
        check(args.app if hasattr(args, "app") else "the NFs", "", args.stack or "auto",
              {}, nfs)

    out_file = capture_file(args.out) if args.out else None
    # what the NFs say they write (writes_files: a Logger's log), told apart from the
    # run's own files before anything is opened: a clash found at start() would come
    # once one of the two had truncated the file
    nf_files = [(f, nf.name) for nf in nfs
                for f in getattr(nf, "writes_files", ())
                if os.path.realpath(f) != os.devnull]
    if args.json and args.json != "-":
        check_writable(args.json, "--json")     # not only once the run is over
        files = [(f, "the input capture") for f in read_files(args.inp)] + [
            (f, "the output") for f in (written_files(args.out) if args.out else [])
        ] + [(f, f"NF {name}'s output") for f, name in nf_files]
        for capture, what in files:
            if _same_file(args.json, capture):
                raise MbxError(f"--json {args.json}: that is {what}; writing it would "
                               "destroy it: name another file")
    for path, name in nf_files:
        for capture in (written_files(args.out) if args.out else []):
            if _same_file(path, capture):
                raise MbxError(f"--out: {capture} is already written by NF {name} (its "
                               "output); two writers would interleave their bytes: name "
                               "another file")
    streams = [opt for opt, path in _port_writes(args)
               if writes_as_is(path) and os.path.realpath(path) != os.devnull]
    if streams and args.stacks > 1:
        # a stream (a terminal, a pipe, /dev/stdout): every stack process would write
        # its own capture into it, interleaved, which no pcap reader takes
        raise MbxError(f"{streams[0]} with --stacks {args.stacks}: each stack "
                       "process writes a capture of its own, and in one stream they "
                       "would interleave: give a file (each process then writes "
                       "FILE.stackK)")
    if out_file:
        # the output opens once the run has started (an existing file survives a
        # failed start), so a path it cannot write is refused here, before the run;
        # each stack process writes its own (mbx.runtime.output_path), and one that
        # could not would fail only after the others had written theirs
        for path in ([out_file] if args.stacks <= 1 or writes_as_is(out_file) else
                     [f"{out_file}.stack{k}" for k in range(args.stacks)]):
            check_writable(path, "--out")

    given = [opt for opt, value in (("--ring-size", args.ring_size),
                                    ("--inflight", args.inflight),
                                    ("--ring-full", args.ring_full)) if value is not None]
    if given and args.deploy != "pipelined":
        raise MbxError(f"{', '.join(given)}: for --deploy pipelined only (this run is "
                       f"{args.deploy})")
    if args.prometheus_linger and args.prometheus is None:
        raise MbxError("--prometheus-linger: for --prometheus only (there is no "
                       "exporter to keep serving)")
    if args.deploy == "pipelined" and spec is not None:
        # refused by the run too, but only here with the line of the NF to move
        from mbx.pipeline import backward_link

        backward = backward_link(nfs)
        if backward is not None:
            raise MbxError(f"{spec.where(backward[0])}: {backward[1]}")
    # stack options left out everywhere take App's own defaults
    config = dict(deploy=args.deploy, ring_size=args.ring_size or 0,
                  ring_full=args.ring_full or "stall", inflight=args.inflight,
                  nf_timing=args.nf_timing)
    # where each option given came from, for --json (the rest are App's defaults)
    given_by = {key: "command line" for key, given in (
        ("deploy", args.deploy != "inline"), ("ring_size", args.ring_size is not None),
        ("ring_full", args.ring_full is not None), ("inflight", args.inflight is not None),
        ("nf_timing", not args.nf_timing)) if given}
    if spec is not None:        # an application file's [app] stack and [stack] options
        config.update(spec.options, stack=spec.stack)
        given_by.update(dict.fromkeys([*spec.options, "stack"], "app file"))
    # ... and what the command line says wins over both (argparse leaves None where
    # an option was not given)
    typed = {key: value for key, value in
             ((key, getattr(args, dest)) for dest, key in _STACK_OPTIONS.items())
             if value is not None}
    config.update(typed)
    given_by.update(dict.fromkeys(typed, "command line"))
    note = bridge_output_note(args.inp, args.out)
    if note:
        print(f"mbx: warning: {note}", file=sys.stderr)
    for link in links_not_ready(args.inp, args.out) + coalescing_not_sendable(args.inp,
                                                                              args.out):
        print(f"mbx: warning: {link}", file=sys.stderr)
    loop = publication_loop(nfs)
    if loop:
        print(f"mbx: warning: {loop_warning(loop)}", file=sys.stderr)
    lone = lone_groups_warning(nfs)
    if lone:
        print(f"mbx: warning: {lone}", file=sys.stderr)
    stack = config.get("stack", "auto")
    args.run_config = _run_config(args, nfs, config, given_by)
    unused = unused_monitor_options(stack, nfs, config)
    if unused:
        # said of the stack as the user chose it: an application file's "network"
        # may be the Controller's answer to a stack left to it
        chosen = (args.stack if args.stack is not None else
                  spec.declared_stack if spec is not None else stack)
        print(f"mbx: warning: {unused_warning(unused, chosen)}", file=sys.stderr)
    listeners = []
    view = prom = None
    if args.stats:
        from mbx.stats import StatsView

        view = StatsView()
        listeners.append(view)
    if args.prometheus is not None:
        from mbx.controller import publications
        from mbx.runtime import runs_monitor
        from mbx.stats import Prometheus

        # every series from the first scrape: the NFs, and the event types this
        # run's stack and NFs may publish
        tcp = runs_monitor(stack, nfs, config)
        types = publications(tcp, nfs)[1]
        prom = Prometheus(args.prometheus, nfs=[nf.name for nf in nfs],
                          types=[t.name for t in types], stacks=args.stacks, tcp=tcp)
        listeners.append(prom)
        if not args.quiet or args.prometheus == 0:     # a port picked for us: always say it
            print(f"prometheus     http://127.0.0.1:{prom.port}/metrics", file=sys.stderr)
    try:
        with stop_on_signals() as stop:
            ports.wait_cancel = stop        # a DPDK output waiting for its link, too
            if args.stacks > 1:
                return _run_parallel(nfs, args, config, listeners, view)
            return _run_app(App(nfs, **config), args, listeners, view, stop)
    finally:
        ports.wait_cancel = None
        if prom is not None and args.prometheus_linger and prom.latest is not None:
            # the run's final counters are the exporter's (a run that never started
            # has none to serve)
            _linger(prom, args)
        for listener in listeners:
            if hasattr(listener, "close"):
                listener.close()


def _linger(prom, args):
    """--prometheus-linger: serve the final counters until a scrape has read them,
    at most the given seconds; a signal ends the wait (the run is over already: its
    exit status stays)."""
    prom.end()
    secs = args.prometheus_linger
    if not args.quiet:
        print(f"prometheus     serving the final counters until a scrape reads them "
              f"(at most {secs:g} s)", file=sys.stderr)
    with stop_on_signals() as stop:
        scraped = prom.linger(secs, stop)
    if not scraped:
        why = f"stopped by {stop.signal}" if stop.signal else f"within {secs:g} s"
        print(f"mbx: warning: --prometheus-linger: no scrape read the final counters "
              f"({why})", file=sys.stderr)


class StopSignal(threading.Event):
    """The Event stop_on_signals yields; ``signal``: the name of the signal that set
    it (None until then), for the summary and --json to say why the run ended."""

    signal = None


@contextlib.contextmanager
def stop_on_signals():
    """A StopSignal that SIGINT, SIGTERM and SIGHUP set, for a run to end between
    bursts: every flow ends, NFs stop, ports are closed, counters are printed and
    written.  The handlers stay until all of that is done, so a second signal (a
    double Ctrl-C, `timeout` signalling the process and then its group) does not
    lose the summary or the output file, and a signal the shell had set to be
    ignored (a background job) still stops it.  (run_parallel puts its own in place
    while its stack processes run.)  Only a run that has not ended 3 s after the
    first signal (an NF's handler that never returns holds it) is interrupted by the
    next (KeyboardInterrupt, from wherever it is: the run fails, its summary and
    output still come out)."""
    from mbx.runtime import STOP_FORCE_AFTER_S

    stop = StopSignal()
    asked = []

    def on_signal(sig, _):
        if asked and time.monotonic() - asked[0] > STOP_FORCE_AFTER_S:
            raise KeyboardInterrupt("stopped again: the run had not ended "
                                    f"{STOP_FORCE_AFTER_S:g} s after the first signal")
        if not asked:
            asked.append(time.monotonic())
            stop.signal = signal.Signals(sig).name
        stop.set()

    handlers = {sig: signal.signal(sig, on_signal)
                for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    try:
        yield stop
    finally:
        for sig, h in handlers.items():
            signal.signal(sig, h)


def _run_app(app, args, listeners, view, stop):
    from mbx.ports import close_ports, open_ports, other_packet_sockets, port_counters

    # an AF_PACKET bridge is its own output unless --out says otherwise; any other
    # output is opened once the run has started (an existing file survives a failed
    # start)
    inp, out = open_ports(args.inp, args.out, defer_output=True)
    _warn_other_sockets(other_packet_sockets(inp))
    progress = Progress(inp, sys.stderr.isatty() and not args.quiet and view is None,
                        listeners, out)
    t0 = time.perf_counter()
    try:
        counters = app.run(inp, out, burst=args.burst, max_packets=args.max_packets,
                           progress=progress, duration=args.duration, stop=stop)
        progress.done()
        # inside the run: an output's last write, as it closes, can fail as any other
        close_ports(inp, out)
    except (MbxError, KeyboardInterrupt) as exc:
        progress.done()
        # closed first: a port counts some things as it closes (frames left unread)
        try:
            close_ports(inp, out)
        except MbxError as again:   # said beside the run's own error, the one raised
            print(f"mbx: error: {again}", file=sys.stderr)
        _report_failed_run(app, args, inp, out, exc, time.perf_counter() - t0, listeners,
                           view, stop)
        raise
    finally:
        progress.done()
        # closed already unless the run ended in an error of another kind: that one
        # is the one raised
        with contextlib.suppress(MbxError):
            close_ports(inp, out)
    elapsed = time.perf_counter() - t0
    # (before the views' last update: it says why packets were lost in flight)
    counters["stopped"] = _stopped_by(app, stop)
    # the views end on the final counters, the ones printed below (pipelined, the NF
    # processes' per-type counts join the stack's only when they stop)
    for listener in listeners:
        listener.update(counters)
    counters["elapsed_s"] = elapsed
    counters["ports"] = port_counters(inp, out)
    for name, n in ((counters.get("pipeline") or {}).get("nfs") or {}).items():
        for why in n["deaths"]:
            # the run went on without it (its policy, or the stop gave up on it): said
            # even with -q, where the summary's "died" lines are not printed
            print(f"mbx: warning: NF {name}: its process died: {why}", file=sys.stderr)
    if not args.quiet:
        with _summary_stream(args):
            _print_counters(counters, elapsed)
    if view is not None:
        view.final(counters, elapsed)
    if args.json:
        _write_json(args, counters)
    return counters


def _warn_other_sockets(found):
    for iface, n in found.items():
        # two bridges on one interface both forward every frame: say so at the start
        print(f"mbx: warning: {n} other packet socket{'s' if n > 1 else ''} "
              f"receive{'' if n > 1 else 's'} on {iface} (a capture such as tcpdump is "
              "harmless; another bridge there forwards every frame a second time)",
              file=sys.stderr)


def _stopped_by(app, stop):
    """What cut the run short, before its input's end or (pipelined) at its end,
    giving up on NF processes that still held events: the signal, ``"duration"``
    (--duration), or None (it was not cut short)."""
    if app.stack.timed_out:
        return "duration"
    if app.stack.stopped or getattr(app.stack.bus, "abandoned", False):
        # the bus gives up on its NFs for a signal or for the deadline (the input
        # already read)
        return stop.signal or "duration"
    return None


def _report_failed_run(app, args, inp, out, exc, elapsed, listeners, view, stop):
    # A run that ended in an error (an NF's, an interface gone) after it started:
    # what it did until then is not lost.
    from mbx.ports import port_counters

    if app.stack is None:       # it never started
        return
    counters = app.counters()
    for listener in listeners:      # the live views end on these counters too
        listener.update(counters)
    counters["elapsed_s"] = elapsed
    counters["ports"] = port_counters(inp, out)
    counters["error"] = str(exc)
    # interrupted (KeyboardInterrupt) by a second signal: stopped by the first too
    counters["stopped"] = (stop.signal if isinstance(exc, KeyboardInterrupt)
                           else _stopped_by(app, stop))
    if not args.quiet:
        with _summary_stream(args):
            _print_counters(counters, elapsed)
    if view is not None:
        view.final(counters, elapsed)
    if args.json:
        _write_failed_json(args, counters)


def _write_failed_json(args, counters):
    # the run's own error is the one raised: this one is said beside it
    try:
        _write_json(args, counters)
    except MbxError as exc:
        print(f"mbx: error: {exc}", file=sys.stderr)


def _per_stack(parts):
    """The --json "stacks" table: for each stack process that reported (stack number
    -> its counters), what it did."""
    return [{"stack": k, "packets": c["packets"], "sent": c["sent"], "cpu_s": c["cpu_s"],
             "flows": c["flows"]["created"], "flow_capacity": c["flows"]["capacity"],
             "evicted": c["flows"]["evicted"], "refused": c["flows"]["refused"],
             # the summed reports are wrong for a maximum or a ratio: each process's
             # own are kept
             "reports": {name: n["report"] for name, n in (c.get("nfs") or {}).items()
                         if n.get("report") is not None}}
            for k, c in sorted(parts.items())]


def _print_stacks(stacks):
    # each stack's table holds its share of --flows: say which share overflowed
    if stacks:
        print("stacks         " + ", ".join(
            f"#{c['stack']}: {c['packets']:,} pkts, {c['flows']:,} flows in a table of "
            f"{c['flow_capacity']:,}" + (f" ({c['evicted']:,} evicted, {c['refused']:,} "
                                         "refused: the share is full)"
                                         if c["evicted"] or c["refused"] else "")
            for c in stacks))


def _run_parallel(nfs, args, config, listeners, view):
    from mbx.ports import packet_sockets_before, read_by_every_stack, written_files
    from mbx.runtime import check_one_stack, merge_snapshots, run_parallel, writes_as_is

    if config.get("deploy", "inline") != "inline":
        raise MbxError("--stacks runs inline stack processes; drop --deploy")
    check_one_stack(nfs, args.stacks)       # before any process is started
    _warn_other_sockets(packet_sockets_before(args.inp))
    latest = [None] * args.stacks
    every = read_by_every_stack(args.inp)

    def on_snapshot(k, snap):
        # each process's latest counters, merged for the live views
        latest[k] = snap
        merged = merge_snapshots([c for c in latest if c is not None], every)
        merged["per_stack"] = latest
        for listener in listeners:
            listener.update(merged)

    t0 = time.perf_counter()
    # each stack process gets its own copy of the NFs (fork)
    try:
        counters, parts = run_parallel(lambda: nfs, args.inp, args.out,
                                       stacks=args.stacks, burst=args.burst,
                                       max_packets=args.max_packets, duration=args.duration,
                                       on_snapshot=on_snapshot if listeners else None,
                                       **config)
    except (MbxError, KeyboardInterrupt) as exc:
        # a failed run keeps what its stacks did until then, as one stack's does
        # (interrupted: stacks held by their NFs were stopped where they were)
        failed = getattr(exc, "counters", None)
        if failed is not None:
            for listener in listeners:
                listener.update(failed)
            failed["elapsed_s"] = time.perf_counter() - t0
            failed["error"] = str(exc)
            # the stacks that reported (a lost one is left out: its number says so)
            failed["stacks"] = _per_stack(getattr(exc, "per_stack", {}))
            if not args.quiet:
                with _summary_stream(args):
                    _print_counters(failed, failed["elapsed_s"])
                    _print_stacks(failed["stacks"])
            if view is not None:
                view.final(failed, failed["elapsed_s"])
            if args.json:
                _write_failed_json(args, failed)
        raise
    elapsed = time.perf_counter() - t0
    # the views end on the final counters, the ones printed below
    final = dict(counters, per_stack=parts)
    for listener in listeners:
        listener.update(final)
    counters["elapsed_s"] = elapsed
    counters["stacks"] = _per_stack(dict(enumerate(parts)))
    if not args.quiet:
        with _summary_stream(args):
            _print_counters(counters, elapsed)
            _print_stacks(counters["stacks"])
            # run_parallel gives each process its own files (output_path): a capture
            # output's, and a DPDK net_pcap device's tx_pcap file, in the input too
            files = written_files(args.inp, output=False)
            if args.out and args.out != args.inp:
                files += written_files(args.out)
            for path in dict.fromkeys(files):
                if not writes_as_is(path):
                    print(f"written        {path}.stack0 .. .stack{args.stacks - 1}, "
                          "one per stack process (as are the files a Logger writes)")
    if view is not None:
        view.final(final, elapsed)
    if args.json:
        _write_json(args, counters)
    return counters


BURST_MAX = 65536
# more stack processes than that is a fork storm on any machine mbx targets
STACKS_MAX = 256


def int_at_least(low, most=None):
    """An argparse type: a whole number from ``low`` to ``most`` (no upper bound
    without one); the benchmark scripts use it too."""
    def parse(text):
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at least {low:,}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"{text!r}: must be at most {most:,}")
        return value
    return parse


def _seconds(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not value >= 0:      # also refuses nan
        raise argparse.ArgumentTypeError(f"{text!r}: seconds must be 0 or more")
    return value


def _ring_size(text):
    """--ring-size: checked here, so that the error names the option, not App's
    keyword (App checks the same, for the API)."""
    from mbx.runtime import RING_SIZE_MAX

    value = int_at_least(0)(text)
    if value and (not 2 <= value <= RING_SIZE_MAX or value & (value - 1)):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a power of two from 2 to "
                                         f"{RING_SIZE_MAX:,} (or 0: room for all of "
                                         "Event Memory)")
    return value


def _tcp_port(text):
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port (0-65535; 0: any "
                                         "free port)")
    return port


# command-line option (dest) -> App option, for those an application file's [app]
# stack or [stack] table can also set; argparse leaves them None when not given (App
# applies its defaults), so that an option given on the command line is told from
# one left out
_STACK_OPTIONS = {"flows": "flow_capacity", "idle_timeout": "idle_timeout",
                  "flow_policy": "flow_policy", "malformed": "malformed",
                  "stack": "stack", "overlap": "overlap", "checksums": "checksums",
                  "vlan_in_flow_key": "vlan_in_flow_key"}


def _output_spec(spec):
    # pcap:- as pcap:/dev/stdout from the start, so that every check of the run (the
    # summary moved to standard error, --json -, --stacks) sees standard output
    from mbx.ports import output_spec

    return output_spec(spec)


def _add_run_options(p):
    p.add_argument("--in", dest="inp", required=True, metavar="PORT",
                   help="input port: pcap:FILE, afpacket:IF, afpacket:IF0,IF1 (a bridge: "
                        "also the output), dpdk:VDEV[,ARGS]")
    p.add_argument("--out", metavar="PORT", type=_output_spec,
                   help="output port for packets that pass: pcap:FILE (pcap:- for "
                        "standard output), afpacket:IF, dpdk:VDEV[,ARGS]")
    p.add_argument("--flows", type=int_at_least(1, CAPACITY_MAX),
                   help="flow table capacity (65536)")
    p.add_argument("--idle-timeout", type=_seconds,
                   help="seconds before an idle flow ends (60)")
    p.add_argument("--flow-policy", choices=("evict", "refuse"),
                   help="when the flow table is full: evict the oldest idle flow, or "
                        "refuse new flows (evict)")
    p.add_argument("--malformed", choices=("forward", "drop"),
                   help="what to do with packets the parser flags (forward)")
    p.add_argument("--no-vlan-in-flow-key", dest="vlan_in_flow_key",
                   action="store_const", const=False,
                   help="leave VLAN ids out of the flow key: a connection whose two "
                        "directions cross in different VLANs (router on a stick) is "
                        "one flow; by default the same 5-tuple in two VLANs is two")
    # a burst's memory is about 2 KiB a packet (Batch's arena): 65,536 is 128 MiB
    p.add_argument("--burst", type=int_at_least(1, BURST_MAX), default=64,
                   help=f"packets per burst (64; at most {BURST_MAX:,})")
    p.add_argument("--max-packets", type=int_at_least(0), default=0,
                   help="stop after N packets (0, the default: all; in each stack "
                        "process with --stacks)")
    p.add_argument("--stacks", type=int_at_least(1, STACKS_MAX), default=1,
                   help="stack processes, flows split by a symmetric hash (software RSS "
                        "over a capture, a fanout group on an AF_PACKET port) (1)")
    p.add_argument("--duration", type=_seconds, default=0,
                   help="stop after S seconds, a live port or a capture not yet read to "
                        "its end (the run is then reported stopped by duration); "
                        "SIGINT/SIGTERM/SIGHUP stop cleanly too")
    p.add_argument("--stack", choices=("auto", "network", "tcp"),
                   help="μStacks: auto runs the TCP Monitor only when an NF subscribes "
                        "to TCP events (auto)")
    p.add_argument("--overlap", choices=("first", "last"),
                   help="TCP reassembly: which bytes win a conflicting overlap (first)")
    p.add_argument("--checksums", choices=("ignore", "verify"),
                   help="TCP Monitor: verify leaves segments with a wrong IPv4 header or "
                        "TCP checksum out of TCP state and streams, as their receiver "
                        "drops them; ignore takes every segment, as a capture made on a "
                        "host with checksum offload needs (ignore)")
    p.add_argument("--deploy", choices=("inline", "pipelined"), default="inline",
                   help="inline: NFs in this process; pipelined: each NF in its own "
                        "process, events over shared-memory rings (inline)")
    p.add_argument("--ring-size", type=_ring_size, metavar="N",
                   help="pipelined: entries per ring, a power of two (room for all of "
                        "Event Memory)")
    p.add_argument("--inflight", type=int_at_least(1), default=None, metavar="K",
                   help="pipelined: bursts the stack runs ahead of the NF processes, a "
                        "power of two from 1 to 16 (4; 1 where an NF reads stream "
                        "bytes or terminates flows)")
    p.add_argument("--ring-full", choices=("stall", "drop"),
                   help="pipelined: a full ring stalls its producer, or drops the event "
                        "and its packet, counted (stall)")
    p.add_argument("--stats", action="store_true",
                   help="a live per NF table on stderr (events/s, drops, mean handler "
                        "time), and the table of the whole run at the end")
    p.add_argument("--prometheus", type=_tcp_port, metavar="PORT",
                   help="serve the counters for Prometheus on http://127.0.0.1:PORT/metrics (0: "
                        "any free port, printed) "
                        "while the run lasts (needs prometheus-client)")
    p.add_argument("--prometheus-linger", type=_seconds, metavar="SECONDS",
                   help="with --prometheus: after the run, serve its final counters "
                        "until a scrape reads them, at most SECONDS (a run shorter "
                        "than the scrape interval is otherwise never seen)")
    p.add_argument("--no-nf-timing", dest="nf_timing", action="store_false",
                   help="do not clock the NFs' handlers (two clock reads per run of an "
                        "NF's calls, no measurable cost): handler_ns is then 0 and "
                        "--stats shows '-'; inline, NFs with only C handlers and the "
                        "same subscriptions share one ring")
    p.add_argument("--json", metavar="FILE", help="write the final counters as JSON "
                   "(-: on standard output, the summary then on standard error)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress, no summary")


SET_HELP = "an option for one NF (repeatable)"     # mbx run's and mbx check's


def run_script(nfs, argv):
    """``mb_nf_run()`` in a script run on its own: ports from the command line."""
    p = argparse.ArgumentParser(prog=os.path.basename(sys.argv[0]),
                                description="Run this NF over a port.")
    _add_run_options(p)
    args = p.parse_args(argv)
    try:
        return _run(nfs, args)
    except (MbxError, OSError, KeyboardInterrupt) as exc:
        # as mbx run ends: exit status 2 for an error, 130 interrupted
        sys.exit(failed(exc, p.prog))


def main(argv=None):
    p = argparse.ArgumentParser(prog="mbx", description=__doc__, epilog=_EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run an application (NF chain) over a port")
    r.add_argument("app", help="an application file (.toml), or an NF chain: built-ins "
                              "(l2fwd, flow_stats, logger, l4lb), .py files or "
                              "module:attr, joined by +; the stack options given here "
                              "(--stack, --flows, ...) win over the file's")
    r.add_argument("--set", action="append", metavar="NF.KEY=VALUE", help=SET_HELP)
    _add_run_options(r)
    c = sub.add_parser("check", help="load an application, type-check its links and "
                                     "print the graph")
    c.add_argument("app", help="an application file (.toml) or an NF chain as for run")
    c.add_argument("--set", action="append", metavar="NF.KEY=VALUE", help=SET_HELP)
    g = sub.add_parser("example-capture", help="write the built-in example capture")
    g.add_argument("path", help="the pcap file to write")
    g.add_argument("--flows", type=int_at_least(1, EXAMPLE_FLOWS_MAX), default=200,
                   help="TCP connections (200)")
    g.add_argument("--seed", type=int, default=1,
                   help="the random seed of the connections' contents: the same seed, the "
                        "same capture (1)")
    f = sub.add_parser("flows", help="summarise every TCP connection of a capture "
                                     "(reassembled bytes, counts, handshake, close)")
    f.add_argument("capture", help="a pcap or pcapng file (or a live port spec such as "
                                   "afpacket:IF, summarised when Ctrl-C ends it)")
    f.add_argument("--json", action="store_true",
                   help="accepted, changes nothing: the mbx-flows/1 JSON object is "
                        "the only format so far, written with or without it")
    f.add_argument("-o", "--output", metavar="FILE",
                   help="write to FILE, not standard output (-: standard output)")
    f.add_argument("--flows", type=int_at_least(1, CAPACITY_MAX), default=1 << 20,
                   help="concurrent connections tracked (1048576)")
    f.add_argument("--stream-memory", type=int_at_least(1), default=1024,
                   help="MiB for out-of-order data waiting for its hole (1024)")
    f.add_argument("--stream-window", type=int_at_least(1, FLOWS_WINDOW_MAX),
                   default=FLOWS_WINDOW,
                   help="MiB a stream holds beyond its next byte: the largest hole it "
                        f"reassembles across ({FLOWS_WINDOW}, at most {FLOWS_WINDOW_MAX})")
    f.add_argument("--checksums", choices=("ignore", "verify"), default="ignore",
                   help="verify leaves segments with a wrong IPv4 header or TCP checksum "
                        "out, as their receiver drops them (ignore)")
    f.add_argument("--no-vlan-in-flow-key", dest="vlan_in_flow_key",
                   action="store_false",
                   help="leave VLAN ids out of the connection key: one connection "
                        "whose directions cross in different VLANs is one, not two")
    f.add_argument("--strict", action="store_true",
                   help=f"exit {EXIT_INCOMPLETE} after any warning (the summary may "
                        "be incomplete; it is still written)")
    t = sub.add_parser("types", help="list the registered event types")
    t.add_argument("--fields", action="store_true",
                   help="each type's fields too (name:kind)")
    args = p.parse_args(argv)
    try:
        if args.cmd == "run":
            from mbx.controller import is_app_file, load_app_file
            from mbx.runtime import load_app

            if is_app_file(args.app):
                if args.set:
                    raise MbxError("give NF options in the application file, not --set")
                spec = load_app_file(args.app, stack=args.stack)
                _run(spec.nfs, args, spec)
            else:
                _run(load_app(args.app, _parse_sets(args.set)), args)
        elif args.cmd == "check":
            from mbx.controller import check, is_app_file, load_app_file
            from mbx.runtime import load_app

            if is_app_file(args.app):
                if args.set:
                    raise MbxError("give NF options in the application file, not --set")
                spec = load_app_file(args.app)
            else:
                spec = check(args.app, args.app, "auto", {},
                             load_app(args.app, _parse_sets(args.set)))
            print(spec.graph())
        elif args.cmd == "example-capture":
            from mbx.examples.capture import write_example
            from mbx.runtime import check_writable

            check_writable(args.path, "example-capture")
            n = write_example(args.path, flows=args.flows, seed=args.seed)
            print(f"wrote {n:,} packets to {args.path}")
        elif args.cmd == "flows":
            from mbx.flows import flows_json
            from mbx.runtime import check_writable

            if not args.capture:
                raise MbxError("mbx flows: name a capture file")
            if args.output == "-":
                args.output = None
            if args.output:
                check_writable(args.output, "-o")
                if os.path.exists(args.output) and os.path.samefile(args.output,
                                                                    args.capture):
                    raise MbxError(f"-o {args.output}: that is the capture itself; "
                                   "name another file")
            with stop_on_signals() as stop:     # a live port: the summary so far
                doc, warnings = flows_json(args.capture, flow_capacity=args.flows,
                                           stream_memory=args.stream_memory << 20,
                                           stream_window=args.stream_window << 20,
                                           checksums=args.checksums,
                                           vlan_in_flow_key=args.vlan_in_flow_key,
                                           stop=stop)
            text = json.dumps(doc, indent=1) + "\n"
            if args.output:
                write_output(args.output, text, "-o")
            else:
                sys.stdout.write(text)
            for w in warnings:
                print(f"mbx flows: warning: {w}", file=sys.stderr)
            if "error" in doc:      # the summary is of what came before it
                raise MbxError(doc["error"])
            if warnings and args.strict:
                # a warning alone leaves the status 0, as everywhere in mbx: a script
                # that must not take a partial summary for a whole one asks for this
                return EXIT_INCOMPLETE
        elif args.cmd == "types":
            import mbx

            width = max(len(t.name) for t in mbx.event_types())
            for t in mbx.event_types():
                line = f"{t.name:<{width}}  id={t.id:#018x}"
                if args.fields:
                    line += "  " + ", ".join(f"{k}:{v[1]}" for k, v in t.fields.items()
                                             if not k.startswith("_"))    # padding
                print(line)
    except (MbxError, OSError, KeyboardInterrupt) as exc:
        return failed(exc, "mbx")
    return 0


def failed(exc, prog):
    """The exit status of a command ``prog`` that raised ``exc`` (an ``MbxError``,
    ``OSError`` or ``KeyboardInterrupt``), said on standard error as every mbx command
    says it: ``mbx`` itself and a script run on its own (``mb_nf_run()``) alike."""
    if isinstance(exc, BrokenPipeError):
        # what read the output went away (mbx types | head): stop quietly, as other
        # tools do, and keep the interpreter's last flush from failing too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13
    if isinstance(exc, KeyboardInterrupt):  # a run stops cleanly on its own; the rest stop
        # a run interrupted by a second signal says what held it (the NF's handler)
        print(f"{prog}: interrupted" + (f": {exc}" if str(exc) else ""), file=sys.stderr)
        return 130
    # an OSError: a path that cannot be read or written, its errno says why
    print(f"{prog}: error: {exc}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
