"""``mbx flows``: a reassembly summary of every TCP connection in a capture.

The TCP Monitor runs with its connection summary on (no NF, no events): per
connection the twin state decides the client and the handshake, each direction's
stream is reassembled (overlaps keep the bytes first delivered, holes the peer's ACK
proves lost are skipped, data behind a hole never filled nor acknowledged is not
delivered) and hashed (SHA-256) as its frontier moves.  A later connection on the
same endpoints (a pure SYN with another ISN) is a new connection: ``#2``, ``#3``...
"""
import os

from mbx._parse import MAX_VLAN_TAGS
from mbx._stream import MAX_OOO_PIECES
from mbx.errors import PortError
from mbx.ports import capture_file, open_input
from mbx.runtime import App

SCHEMA = "mbx-flows/1"
CHUNK_SIZE = 2048
# MiB: the most out-of-order bytes a stream holds beyond its next byte (the largest
# hole it can reassemble across) by default, and at most: a stream maps at most
# 65,535 chunks (the stream pool's bound) of CHUNK_SIZE
STREAM_WINDOW = 64
STREAM_WINDOW_MAX = (0xFFFF * CHUNK_SIZE) >> 20


def number_keys(summary):
    """[(base key, record)] in order of first packet -> {key: record}, the second and
    later connections of one endpoint pair keyed ``#2``, ``#3``, ..."""
    seen = {}
    out = {}
    for key, rec in summary:
        n = seen.get(key, 0) + 1
        seen[key] = n
        out[key if n == 1 else f"{key}#{n}"] = rec
    return out


def flows_json(capture, *, flow_capacity=1 << 20, stream_memory=1 << 30,
               stream_window=STREAM_WINDOW << 20, chunk_size=CHUNK_SIZE,
               checksums="ignore", vlan_in_flow_key=True, stop=None):
    """The ``mbx-flows/1`` object for ``capture`` and a list of warnings (anything
    that may make the summary incomplete: memory caps, a stream's window, evicted
    flows, holes the capture missed, TCP headers cut short).  A capture
    damaged midway gives the connections read before the damage and an ``error``
    key saying what stopped the reading.  ``stop``
    (anything with ``is_set()``) ends a live input: the summary then covers what
    came until then.  ``checksums="verify"`` leaves segments with a wrong checksum
    out (see ``TcpMonitor``); ``vlan_in_flow_key=False`` makes one connection of
    the same endpoints in different VLANs (see ``App``)."""
    inp = open_input(capture if ":" in capture and not os.path.exists(capture)
                     else "pcap:" + capture)
    # No idle timeout: a connection ends at a new SYN on its endpoints or at the end
    # of the capture, never because it paused.
    app = App([], flow_capacity=flow_capacity, idle_timeout=1e9, stack="tcp",
              summarise=True, max_streams=flow_capacity, stream_memory=stream_memory,
              chunk_size=chunk_size, stream_window=stream_window, checksums=checksums,
              vlan_in_flow_key=vlan_in_flow_key)
    error = None
    try:
        try:
            counters = app.run(inp, burst=256, stop=stop)
        except PortError as exc:
            # a capture damaged midway: the connections before the damage are summed
            # up (every flow still ended), and the error is told with them
            if app.stack is None:
                raise
            error = exc
            counters = app.counters()
        cut_short = inp.counters.get("truncated", 0)
        skipped = inp.counters.get("skipped", 0), inp.counters.get("skipped_linktype")
        raised = inp.counters.get("wirelen_raised", 0)
    finally:
        inp.close()
    named = capture if os.path.exists(capture) else capture_file(capture) or capture
    doc = {"schema": SCHEMA, "capture": os.path.basename(named),
           "connections": number_keys(app.stack.connections_summary())}
    if error is not None:
        doc["error"] = str(error)
    warnings = []
    if skipped[0]:
        many = skipped[0] != 1
        warnings.append(f"{skipped[0]} frame{'s' if many else ''} skipped: "
                        f"{'their' if many else 'its'} interface's link type is not one "
                        f"mbx reads (the first: {skipped[1]})")
    if cut_short:
        warnings.append("the capture ends in a record cut short (its writer stopped "
                        "mid-write); that packet is not in the summary")
    if raised:
        many = raised != 1
        warnings.append(f"{raised} record{'s' if many else ''} of the capture "
                        f"{'say' if many else 'says'} fewer bytes on the wire than "
                        f"{'they' if many else 'it'} captured (not valid pcap): read as "
                        "captured, every captured byte in the summary")
    steps = counters.get("clock_steps_back", 0)
    if steps:
        warnings.append(f"the capture's clock stepped back {steps} time"
                        f"{'s' if steps != 1 else ''}: a packet more than the idle timeout "
                        "behind the latest time seen (one stamped ahead of its "
                        "neighbours); connections seen at the later time go idle from "
                        "there")
    deep = counters["parse"].get("too_many_vlan_tags", 0)
    if deep:
        warnings.append(f"{deep} frame{'s' if deep != 1 else ''} behind more than "
                        f"{MAX_VLAN_TAGS} VLAN tags not looked at; any connection in "
                        f"{'them' if deep != 1 else 'it'} is not in the summary")
    tcp = counters["tcp"]
    if tcp["tcp_header_cut"]:
        n = tcp["tcp_header_cut"]
        many = n != 1
        warnings.append(f"{n} TCP packet{'s' if many else ''} not tracked: "
                        f"{'their' if many else 'its'} TCP header was cut short (by the "
                        "capture's snaplen, or an IP length too short for it); a "
                        "connection seen only in such packets is not in the summary")
    if tcp["cut_segments"]:
        n = tcp["cut_segments"]
        warnings.append(f"{n} segment{'s' if n != 1 else ''} cut by the capture's snaplen; "
                        "stream lengths and digests cover the captured bytes only")
    pieces = tcp["memcaps_pieces"]
    if pieces:
        warnings.append(f"{pieces} segments lost bytes: their stream held {MAX_OOO_PIECES} "
                        "out-of-order pieces already (the bound on a stream's holes; heavy "
                        "loss or reordering); their connections' digests are incomplete")
    window = tcp["memcaps_window"]
    if window:
        warnings.append(f"{window} segments lost bytes: they lay more than the stream "
                        f"window ({stream_window / (1 << 20):g} MiB) beyond their stream's "
                        "next byte (a hole that large): raise --stream-window; their "
                        "connections' digests are incomplete")
    no_stream = tcp["memcaps_streams"]     # said below, with the segments of no stream
    if tcp["memcaps"] - pieces - window - no_stream:
        warnings.append(f"{tcp['memcaps'] - pieces - window - no_stream} segments lost "
                        "bytes to memory caps: raise --stream-memory; their connections' "
                        "digests are incomplete")
    if tcp["streams_exhausted"]:
        warnings.append(f"{tcp['streams_exhausted']} segments found no stream (one per flow "
                        f"slot, all in use), {no_stream} of them with bytes lost: raise "
                        "--flows; their connections' digests are incomplete")
    if tcp["payload_after_close"]:
        n = tcp["payload_after_close"]
        warnings.append(f"{n} segment{'s' if n != 1 else ''} with payload came after "
                        "their connection closed with FINs, both acknowledged; their "
                        "bytes are not in the digests")
    if tcp["bad_checksums"]:
        n = tcp["bad_checksums"]
        warnings.append(f"{n} segment{'s' if n != 1 else ''} with a wrong checksum left "
                        "out, as their receiver drops them (--checksums verify); if they "
                        "are one host's, the capture was likely made on that host with "
                        "checksum offload: run with --checksums ignore")
    if tcp["payload_after_fin"]:
        n = tcp["payload_after_fin"]
        warnings.append(f"{n} segment{'s' if n != 1 else ''} with payload reached beyond "
                        f"{'their' if n != 1 else 'its'} sender's FIN (payload_after_fin); "
                        "a receiver drops those bytes, so they are in no digest")
    if tcp["edge_data_dropped"]:
        warnings.append(f"{tcp['edge_data_dropped']:,} bytes sent on or past their "
                        "receiver's window edge were held for an ACK that never took them "
                        "(edge_data_dropped): a receiver drops such bytes, so they are in "
                        "no digest; if the capture ended early, they may be missing")
    # the bytes a snaplen cut off are said once, by the cut segments' warning above
    n = tcp["gaps"] - tcp["cut_gaps"]
    if n:
        warnings.append(f"{n} hole{'s' if n != 1 else ''} the capture missed "
                        f"({tcp['gap_bytes'] - tcp['cut_gap_bytes']:,} bytes) the receiver "
                        f"acknowledged: skipped, those bytes are in no digest")
    held = app.stack.summary_held
    if held:
        warnings.append(f"{held} stream{'s' if held != 1 else ''} ended with bytes "
                        "behind a hole never filled nor acknowledged (the capture "
                        "missed a segment, or ended before its retransmission): those "
                        "bytes are in no digest")
    oom = app.stack.summary_oom
    if oom:
        warnings.append(f"{oom} connection{'s' if oom != 1 else ''} left out of the "
                        "summary: no memory for their records")
    if counters["flows"]["evicted"] or counters["flows"]["refused"]:
        warnings.append(f"flow table full ({counters['flows']['evicted']} evicted, "
                        f"{counters['flows']['refused']} refused): raise --flows")
    if warnings:
        # in the object too: a script that reads only the JSON learns that the
        # summary may be incomplete, and why
        doc["warnings"] = list(warnings)
    return doc, warnings
