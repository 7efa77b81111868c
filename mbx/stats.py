"""Run statistics: the live per NF view of ``mbx run --stats`` and the Prometheus
exporter of ``mbx run --prometheus PORT``.

Both are fed by the stack's progress callback (about every half second) with a
snapshot of the counters: the stack's (packets, bytes, flows, drops, events per
type) and the bus's per NF ones (events, drops, time in handlers).  With several
stack processes (``mbx run --stacks N``) each sends its snapshots to the parent
(``mbx.runtime.run_parallel``), which gives these the merged counters, each
process's own under ``"per_stack"``.
"""
import sys
import threading
import time

from mbx._parse import status_names
from mbx.errors import MbxError
from mbx.ports import port_total


def snapshot(stack, inp=None, out=None):
    """The counters of a running stack, with the per NF ones under ``"nfs"``, and
    its ports' under ``"ports"`` (``mbx.ports.port_counters``) when ``inp`` is
    given."""
    from mbx.ports import port_counters
    from mbx.runtime import nf_stats

    c = stack.counters()
    c["nfs"] = nf_stats(stack.bus)
    if inp is not None:
        c["ports"] = port_counters(inp, out)
    return c


def nf_table(nfs, rates=None):
    """The per NF table as lines of text: events (and events/s when ``rates`` gives
    them), drops, mean time in a handler ("-" when handlers were not clocked:
    ``--no-nf-timing``)."""
    head = f"  {'NF':<20} {'events':>14} {'events/s':>12} {'drops':>10} {'mean ns':>9}  C"
    lines = [head]
    for name, n in nfs.items():
        rate = f"{rates.get(name, 0.0):>12,.0f}" if rates is not None else f"{'':>12}"
        c = f"{100.0 * n['c_events'] / n['events']:.0f}%" if n["events"] else "-"
        mean = f"{n['mean_ns']:>9.0f}" if n["handler_ns"] else f"{'-':>9}"
        lines.append(f"  {name:<20} {n['events']:>14,} {rate} {n['drops']:>10,} "
                     f"{mean}  {c}")
    return lines


class StatsView:
    """A live per NF table on ``out`` (stderr), redrawn in place on a terminal at
    most once a second, or appended to a file or pipe every ``LOG_EVERY_S`` seconds
    (a log, not a screen: one table a second made a minute's run 60 of them);
    ``final()`` prints the table of the whole run."""

    LOG_EVERY_S = 10.0

    def __init__(self, out=None, every=None):
        self.out = out if out is not None else sys.stderr
        self.tty = self.out.isatty()
        self.every = every if every is not None else 1.0 if self.tty else self.LOG_EVERY_S
        self.t_last = time.monotonic()
        self.t0 = self.t_last
        self.last = {}
        self.drawn = 0
        self.latest = None

    def update(self, counters):
        self.latest = counters
        now = time.monotonic()
        if now - self.t_last < self.every:
            return
        dt = now - self.t_last
        nfs = counters["nfs"]
        rates = {k: (v["events"] - self.last.get(k, 0)) / dt for k, v in nfs.items()}
        self.last = {k: v["events"] for k, v in nfs.items()}
        self.t_last = now
        lost = counters.get("dropped_on_error")
        lines = [f"[{now - self.t0:7.1f} s] {counters['packets']:,} packets, "
                 f"{counters['dropped_by_nf']:,} dropped by NFs"
                 # (why, the final table says: a live snapshot knows of no error)
                 + (f", {lost:,} in flight and never sent" if lost else "")
                 ] + nf_table(nfs, rates)
        for k, c in enumerate(counters.get("per_stack") or ()):
            if c is not None:
                lines.append(f"  stack #{k}: {c['packets']:,} packets, "
                             f"{sum(n['events'] for n in c['nfs'].values()):,} NF events, "
                             f"{c['dropped_by_nf']:,} dropped by NFs")
        w = self.out.write
        if self.tty and self.drawn:
            w(f"\x1b[{self.drawn}F\x1b[J")      # up to the table's first line, clear
        w("\n".join(lines) + "\n")
        self.out.flush()
        self.drawn = len(lines)

    def final(self, counters, elapsed, out=None):
        nfs = counters.get("nfs") or {}
        rates = {k: v["events"] / elapsed if elapsed > 0 else 0.0 for k, v in nfs.items()}
        out = out if out is not None else sys.stdout
        out.write("NF stats       events / events per s of the run / drops / mean "
                  "handler ns / share to C handlers\n")
        out.write("\n".join(nf_table(nfs, rates)) + "\n")
        lost = counters.get("dropped_on_error")
        if lost:
            out.write(f"  {lost:,} packets {lost_in_flight(counters)} were dropped: "
                      "neither sent nor dropped by an NF\n")


def lost_in_flight(counters):
    """Why the packets counted ``dropped_on_error`` were neither sent nor dropped by
    an NF: the run failed, or (pipelined, a run with no error) its stop gave up on
    NF processes that still held their bursts, a clean stop by design."""
    if counters.get("stopped") and not counters.get("error"):
        return "in flight when the stop gave up on the NF processes"
    return "in flight when the run failed"


FLOW_COUNTS = ("created", "expired", "evicted", "closed", "shutdown", "refused")
# The reassembly table's counters (``fragments``) that count fragments, and those
# that count datagrams: two series, so that no sum over a label mixes the two.
# held = held_completed + held_discarded + held_pending (a gauge: held now).
FRAGMENT_COUNTS = ("held", "held_completed", "held_discarded", "memcap_drops", "bad")
DATAGRAM_COUNTS = ("completed", "timed_out", "pending_at_end", "no_room", "too_many")
# What the parser counts under ``parse`` (the summary's "parse" line): every reason a
# packet was flagged, each a series from the first scrape, so that an alert on one
# (too_many_vlan_tags, bad_tcp_opt...) has its series before the first such packet.
# Not frag_timeout: never a packet's status (a datagram given up is counted whole,
# mbx_fragment_datagrams_total{what="timed_out"}), its series would be 0 for ever
# and an alert on it never fire.
PARSE_REASONS = tuple(name for name in status_names() if name not in ("ok", "frag_timeout"))


# The TCP Monitor's counters served (with tcp=True): key, metric, kind, help.  The
# memcaps_* are parts of memcaps (segments whose bytes were dropped), not a split of
# it, so each is a metric of its own.
TCP_SERIES = (
    ("connections", "mbx_tcp_connections", "counter", "TCP connections tracked"),
    ("memcaps", "mbx_tcp_memcaps", "counter",
     "TCP segments whose bytes were dropped (stream memory, window, pieces, streams)"),
    ("memcaps_pieces", "mbx_tcp_memcaps_pieces", "counter",
     "... of them, because their stream held its bound of out-of-order pieces"),
    ("memcaps_streams", "mbx_tcp_memcaps_streams", "counter",
     "... of them, because no stream was free"),
    ("memcaps_window", "mbx_tcp_memcaps_window", "counter",
     "... of them, because they lay beyond their stream's window"),
    ("streams_exhausted", "mbx_tcp_streams_exhausted", "counter",
     "TCP connections that found no stream free"),
    ("gaps", "mbx_tcp_gaps", "counter", "Holes the TCP Monitor skipped in a stream"),
    ("conflicts", "mbx_tcp_conflicts", "counter",
     "Retransmissions whose bytes differ from those the stream had (OVERLAP_CONFLICT)"),
    ("bad_checksums", "mbx_tcp_bad_checksums", "counter",
     "TCP segments left out for a wrong checksum (checksums=verify)"),
    ("pool_chunks_in_use", "mbx_tcp_pool_chunks_in_use", "gauge",
     "Stream memory chunks holding bytes"),
)


def zero_snapshot(nfs=(), types=(), tcp=False):
    """The counters of a run before its first packet: every one 0, for the NFs and
    event types named, and the TCP Monitor's served ones with ``tcp``."""
    zero = {"packets": 0, "bytes": 0, "sent": 0, "dropped_by_nf": 0,
            "dropped_malformed": 0, "dropped_fragments": 0, "dropped_on_error": 0,
            "clock_steps_back": 0,
            "parse": dict.fromkeys(PARSE_REASONS, 0),
            "flows": dict.fromkeys(FLOW_COUNTS + ("active",), 0),
            "fragments": dict.fromkeys(FRAGMENT_COUNTS + DATAGRAM_COUNTS
                                       + ("held_pending",), 0),
            "events": {t: {"published": 0, "delivered": 0} for t in types},
            "nfs": {n: {"events": 0, "c_events": 0, "drops": 0, "handler_ns": 0,
                        "mean_ns": 0.0, "types": {}} for n in nfs}}
    if tcp:
        zero["tcp"] = {key: 0 for key, *_ in TCP_SERIES}
    return zero


class Prometheus:
    """Counters for a Prometheus scrape on http://127.0.0.1:PORT/metrics, from the
    latest snapshot ``update()`` was given.  Needs prometheus-client (the
    ``prometheus`` extra).

    Every series is there from the first scrape, 0 until the run counts something,
    and stays: a scrape before the first snapshot (NFs starting, the first half
    second) sees the NFs named by ``nfs``, the event types named by ``types`` (those
    the run's stack and NFs may publish) and, with ``stacks`` > 1, each stack
    process's series; a type or NF a later snapshot no longer lists (types are
    listed once counted) keeps its series.  A dashboard or an alert never sees a
    series come and go."""

    def __init__(self, port, addr="127.0.0.1", *, nfs=(), types=(), stacks=1,
                 tcp=False):
        try:
            import prometheus_client
            from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
        except ImportError:
            raise MbxError("--prometheus needs prometheus-client: pip install "
                           "prometheus-client (in the repository: pip install "
                           "--no-build-isolation -e '.[prometheus]')") from None
        self._counter = CounterMetricFamily
        self._gauge = GaugeMetricFamily
        self.nfs = dict.fromkeys(nfs)       # (dicts: ordered sets) the series kept
        self.types = dict.fromkeys(types)
        self.stacks = stacks
        self.tcp = tcp                      # the run has the TCP Monitor: its series
        self.latest = None
        self.ended = False                  # latest holds the run's final counters
        self.final_scraped = threading.Event()
        self.registry = prometheus_client.CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        try:
            self.server, self.thread = prometheus_client.start_http_server(
                int(port), addr=addr, registry=self.registry)
        except OSError as exc:
            raise MbxError(f"--prometheus {port}: cannot listen on {addr}:{port}: "
                           f"{exc.strerror or exc}") from None
        self.port = self.server.server_address[1]

    def update(self, counters):
        if self.stacks > 1 and not counters.get("per_stack"):
            # merged counters alone (a failed run's): the series are per stack
            # process, and keep each one's last snapshot rather than go back to 0
            return
        for part in [counters] + list(counters.get("per_stack") or ()):
            if part is not None:
                self.types.update(dict.fromkeys(part.get("events") or ()))
                self.nfs.update(dict.fromkeys(part.get("nfs") or ()))
        self.latest = counters

    def end(self):
        """The run is over: ``latest`` holds its final counters (``linger`` waits for
        a scrape to read them)."""
        self.ended = True

    def linger(self, seconds, stop):
        """Keep serving the final counters until a scrape has read them, ``seconds``
        at most, or until ``stop`` is set: a run shorter than the scrape interval
        (15 s by default) would otherwise end unseen, and the counts of its last
        half second would never reach Prometheus.  True if a scrape read them."""
        deadline = time.monotonic() + seconds
        while not stop.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if self.final_scraped.wait(min(left, 0.1)):
                # the page is built; give its thread time to write it out
                time.sleep(self.WRITE_GRACE_S)
                return True
        return self.final_scraped.is_set()

    WRITE_GRACE_S = 0.2

    def close(self):
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def describe(self):
        return []

    def collect(self):
        # One series per stack process (label ``stack``) when there are several; a
        # process not heard from yet has its series at 0.
        zero = zero_snapshot(self.nfs, self.types, self.tcp)
        ended = self.ended                  # read with latest: the page is of these
        c = self.latest or {}
        if self.stacks > 1 or c.get("per_stack"):
            per = list(c.get("per_stack") or ())
            per += [None] * (self.stacks - len(per))
            parts = [((str(k),), p or zero) for k, p in enumerate(per)]
            head = ["stack"]
        else:
            parts, head = [((), c or zero)], []
        C, G = self._counter, self._gauge

        def family(kind, name, text, *labels):
            return kind(name, text, labels=head + list(labels))

        fams = {
            "packets": family(C, "mbx_packets", "Packets read"),
            "bytes": family(C, "mbx_bytes", "Bytes read"),
            "sent": family(C, "mbx_sent", "Packets sent"),
            "drops": family(C, "mbx_dropped", "Packets dropped", "by"),
            "flows": family(C, "mbx_flows", "Flows", "what"),
            "active": family(G, "mbx_flows_active", "Flows in the flow table"),
            "frags": family(C, "mbx_fragments", "IP fragments the reassembly table "
                            "held (and where they went) or refused", "what"),
            "dgrams": family(C, "mbx_fragment_datagrams", "Fragmented datagrams "
                             "rebuilt or given up", "what"),
            "held": family(G, "mbx_fragments_held", "IP fragments held for datagrams "
                           "still incomplete"),
            "pub": family(C, "mbx_events_published", "Events published", "type"),
            "dlv": family(C, "mbx_events_delivered", "Events delivered to NFs", "type"),
            "ev": family(C, "mbx_nf_events", "Events delivered to an NF", "nf"),
            "nd": family(C, "mbx_nf_drops", "Packet drops an NF asked for", "nf"),
            "ns": family(C, "mbx_nf_handler_seconds", "Time in an NF's handlers", "nf"),
            "portdrops": family(C, "mbx_port_dropped", "Frames a port could not "
                                "deliver (rx: its ring or the kernel's queue was full) or "
                                "send (tx)", "port", "dir"),
            "clock": family(C, "mbx_clock_steps_back", "Times the capture-time clock "
                            "stepped back to a packet far behind it"),
            "parse": family(C, "mbx_parse_errors", "Packets the parser flagged (malformed, "
                            "or refused by fragment reassembly), by reason", "reason"),
        }
        if self.tcp:
            for key, name, kind, text in TCP_SERIES:
                fams[key] = family(C if kind == "counter" else G, name, text)
        for at, p in parts:
            at = list(at)
            fams["packets"].add_metric(at, p["packets"])
            fams["bytes"].add_metric(at, p["bytes"])
            fams["sent"].add_metric(at, p["sent"])
            fams["drops"].add_metric(at + ["nf"], p["dropped_by_nf"])
            fams["drops"].add_metric(at + ["malformed"], p["dropped_malformed"])
            fams["drops"].add_metric(at + ["fragments"], p["dropped_fragments"])
            fams["drops"].add_metric(at + ["run_error"], p["dropped_on_error"])
            for what in FLOW_COUNTS:
                fams["flows"].add_metric(at + [what], p["flows"][what])
            fams["active"].add_metric(at, p["flows"]["active"])
            for what in FRAGMENT_COUNTS:
                fams["frags"].add_metric(at + [what], p["fragments"][what])
            for what in DATAGRAM_COUNTS:
                fams["dgrams"].add_metric(at + [what], p["fragments"][what])
            fams["held"].add_metric(at, p["fragments"]["held_pending"])
            for side in ("in", "out"):
                port = (p.get("ports") or {}).get(side) or {}
                for way in ("rx", "tx"):
                    fams["portdrops"].add_metric(at + [side, way],
                                                 port_total(port, f"{way}_dropped"))
            fams["clock"].add_metric(at, p.get("clock_steps_back", 0))
            for reason in PARSE_REASONS:
                fams["parse"].add_metric(at + [reason], (p.get("parse") or {}).get(reason, 0))
            if self.tcp:
                tcp = p.get("tcp") or zero["tcp"]
                for key, *_ in TCP_SERIES:
                    fams[key].add_metric(at, tcp.get(key, 0))
            for name, e in dict(zero["events"], **p["events"]).items():
                fams["pub"].add_metric(at + [name], e["published"])
                fams["dlv"].add_metric(at + [name], e["delivered"])
            for name, n in dict(zero["nfs"], **(p.get("nfs") or {})).items():
                fams["ev"].add_metric(at + [name], n["events"])
                fams["nd"].add_metric(at + [name], n["drops"])
                fams["ns"].add_metric(at + [name], n["handler_ns"] * 1e-9)
        yield from fams.values()
        done = G("mbx_run_ended", "1 once the counters are the run's final ones")
        done.add_metric([], 1 if ended else 0)
        yield done
        if ended:
            self.final_scraped.set()
