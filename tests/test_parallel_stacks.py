"""Parallel stacks (paper §4.2): several stack processes split the flows of one
capture by the symmetric hash; both directions of every flow reach the same one."""
import contextlib
import json
import os
import random
import re
import struct
import subprocess
import sys

import pytest
from mbxtest import fragment4, fragmented_flows, read_frames

import mbx
from mbx._parse import parse
from mbx.examples.capture import ether, tcp4, udp4, write_pcap
from mbx.nfs.l2fwd import L2Fwd
from mbx.ports import open_input, open_output
from mbx.runtime import App, run_parallel, stack_share


class FlowRecorder(mbx.NF):
    """Per flow (5-tuple, both directions): packets and which directions it saw;
    written to a file per process when the run ends."""

    def __init__(self, outdir):
        super().__init__("recorder")
        self.outdir = outdir
        self.flows = {}
        self.sub(mbx.PKT, self.on_pkt)

    def on_pkt(self, ev):
        if ev.flow is None:
            return
        a, b = (ev.src_ip, ev.sport), (ev.dst_ip, ev.dport)
        key = "|".join(map(str, sorted([a, b]) + [ev.proto]))
        rec = self.flows.setdefault(key, [0, 0, 0])
        rec[0] += 1
        rec[1 + (a > b)] += 1          # direction by endpoint order, not by flow

    def stop(self):
        with open(os.path.join(self.outdir, f"flows-{os.getpid()}.json"), "w") as fh:
            json.dump(self.flows, fh)


def many_flows_capture(path, flows=1500, packets=12000, seed=3):
    rng = random.Random(seed)
    ends = [(f"198.18.{rng.randrange(1, 250)}.{rng.randrange(1, 250)}",
             f"198.19.{rng.randrange(1, 250)}.{rng.randrange(1, 250)}",
             rng.randrange(1024, 65000), rng.choice([80, 443, 53])) for _ in range(flows)]
    frames = []
    for i in range(packets):
        src, dst, sp, dp = ends[rng.randrange(flows)]
        if rng.random() < 0.5:
            src, dst, sp, dp = dst, src, dp, sp
        make = udp4 if 53 in (sp, dp) else tcp4
        frames.append((1.0 + i * 1e-5, ether(make(src, dst, sp, dp, b"x" * 8))))
    write_pcap(path, frames)
    return len(frames)


def _read(outdir):
    per_process = []
    for name in sorted(os.listdir(outdir)):
        if name.startswith("flows-"):
            with open(os.path.join(outdir, name)) as fh:
                per_process.append(json.load(fh))
    return per_process


def test_two_stacks_split_flows_and_keep_both_directions_together(tmp_path):
    cap = str(tmp_path / "many.pcap")
    n = many_flows_capture(cap)
    one_dir, two_dir = tmp_path / "one", tmp_path / "two"
    one_dir.mkdir()
    two_dir.mkdir()
    single = App([FlowRecorder(str(one_dir))]).run(open_input("pcap:" + cap))
    merged, parts = run_parallel(lambda: [FlowRecorder(str(two_dir))], "pcap:" + cap,
                                 stacks=2)
    assert single["packets"] == merged["packets"] == n
    assert len(parts) == 2 and all(p["packets"] > n / 4 for p in parts)
    assert merged["flows"]["created"] == single["flows"]["created"]
    [alone] = _read(one_dir)
    first, second = _read(two_dir)
    assert not set(first) & set(second), "a flow was seen by both stacks"
    together = {**first, **second}
    assert together == alone              # same packets per flow, per direction
    assert sum(1 for rec in alone.values() if rec[1] and rec[2]) > 1000


@pytest.mark.parametrize("stacks", [2, 3])
def test_fragmented_datagrams_stay_with_their_flow(tmp_path, stacks):
    # Before, a datagram's fragments went to the stack their addresses picked and the
    # rebuilt datagram was tracked there, while the flow's whole packets went to the
    # stack their ports picked: one flow, two records, split counts.
    cap = str(tmp_path / "frag.pcap")
    frames, fragmented = fragmented_flows()
    write_pcap(cap, [(1.0 + i * 1e-4, f) for i, f in enumerate(frames)])
    one_dir, many_dir = tmp_path / "one", tmp_path / "many"
    one_dir.mkdir()
    many_dir.mkdir()
    single = App([FlowRecorder(str(one_dir))]).run(open_input("pcap:" + cap))
    merged, parts = run_parallel(lambda: [FlowRecorder(str(many_dir))], "pcap:" + cap,
                                 stacks=stacks)
    assert single["fragments"]["completed"] == fragmented
    [alone] = _read(one_dir)
    assert len(alone) == 120 and all(rec[0] == 6 for rec in alone.values())
    per_stack = _read(many_dir)
    seen = [key for flows in per_stack for key in flows]
    assert len(seen) == len(set(seen)), "a flow was seen by two stacks"
    assert {k: v for flows in per_stack for k, v in flows.items()} == alone
    # every frame and every rebuilt datagram counted once over all the stacks
    for key in ("packets", "bytes", "fragments_held"):
        assert merged[key] == single[key], key
    assert merged["packets"] == len(frames)
    assert merged["fragments"] == single["fragments"]
    assert merged["flows"]["created"] == single["flows"]["created"] == 120
    assert sum(p["fragments"]["completed"] for p in parts) == fragmented
    assert all(p["flows"]["created"] > 0 for p in parts)



def _write_records(path, records):
    """(ts, frame, wirelen) records as a classic pcap: wirelen > len(frame) is a
    frame the capture cut short."""
    with open(path, "wb") as fh:
        fh.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        for ts, frame, wirelen in records:
            usec = round(ts * 1e6)
            fh.write(struct.pack("<IIII", usec // 1_000_000, usec % 1_000_000, len(frame),
                                 wirelen))
            fh.write(frame)


def _outputs(path_prefix):
    return sorted(f for name in sorted(os.listdir(os.path.dirname(path_prefix)))
                  if name.startswith(os.path.basename(path_prefix))
                  for _, f in read_frames(os.path.join(os.path.dirname(path_prefix), name)))


@pytest.mark.parametrize("case", ["cut_short", "memcap"])
def test_stacks_pass_on_every_fragment_once_as_one_stack_does(tmp_path, case):
    # cut_short: a fragment the capture cut short cannot be rebuilt and goes on as it
    # is; every stack takes every fragment, and every one passed it on (written,
    # tracked and counted once per stack).  memcap: with little frag_memory each
    # stack gave up datagrams past their time by its own clock (its own packets), so
    # the tables differed, and the stack that owned a datagram's flow refused it
    # for memory while another rebuilt it and left it to the owner: lost, uncounted.
    frames, _ = fragmented_flows(flows=24)
    records = [(1.0 + i * 1e-3, f, len(f)) for i, f in enumerate(frames)]
    config = {}
    if case == "cut_short":
        at = next(i for i, f in enumerate(frames) if len(f) > 1000 and
                  "fragment" in parse(f)["flag_names"])
        records[at] = (records[at][0], frames[at][:200], len(frames[at]))
    else:
        # a datagram that never completes, then its time runs out while the other
        # flows send: the tables must give it up before refusing the next ones
        head = [(0.5, frames_of_a_lost_datagram()[0], None)]
        records = [(ts, f, n or len(f)) for ts, f, n in head] + [
            (ts + 5.0, f, n) for ts, f, n in records]
        config = {"frag_memory": 4000, "frag_timeout": 2.0}
    cap = str(tmp_path / "in.pcap")
    _write_records(cap, records)
    one, many = str(tmp_path / "one.pcap"), str(tmp_path / "many.pcap")
    inp, out = open_input("pcap:" + cap), open_output("pcap:" + one)
    try:
        single = App([L2Fwd()], **config).run(inp, out)
    finally:
        inp.close()
        out.close()
    merged, _ = run_parallel(lambda: [L2Fwd()], "pcap:" + cap, "pcap:" + many, stacks=3,
                             **config)
    for key in ("packets", "sent", "fragments_held"):
        assert merged[key] == single[key], key
    assert merged["fragments"] == single["fragments"]
    assert merged["flows"]["created"] == single["flows"]["created"]
    assert merged["ports"]["in"]["rx_pkts"] == inp.rx_pkts == len(records)
    assert _outputs(many) == _outputs(one)


@pytest.mark.parametrize("stacks", [2, 3])
def test_stacks_count_the_fragments_and_their_drops_as_one_stack_does(tmp_path, stacks):
    # Every stack takes every fragment and counts only those its addresses pick: the
    # merged fragment counters and drop totals must be one stack's, for datagrams
    # rebuilt, timed out, refused (an overlap that disagrees, the parser's bad_frag,
    # the memory cap) and cut off by the end of the input, over many address pairs.
    rnd = random.Random(5)
    frames = []
    for k in range(40):
        src, dst = f"198.18.{k % 7}.{1 + k}", f"198.19.{k % 3}.1"
        frags = fragment4(ether(udp4(src, dst, 1000 + k, 53, bytes([k]) * 600)), 200)
        fate = k % 5
        if fate == 1:                           # the last one never comes
            frags = frags[:-1]
        elif fate == 2:                         # an overlap with other bytes
            frags.insert(2, frags[1][:-1] + bytes([frags[1][-1] ^ 0xFF]))
        elif fate == 3:                         # an offset no datagram has: bad_frag
            bad = bytearray(frags[0])
            bad[20:22] = struct.pack("!H", 0x2000 | 8190)
            frags.insert(1, bytes(bad))
        rnd.shuffle(frags)
        frames += frags
    records = [(1.0 + i * 0.05, f, len(f)) for i, f in enumerate(frames)]
    cap = str(tmp_path / "in.pcap")
    _write_records(cap, records)
    config = {"frag_memory": 3000, "frag_timeout": 2.0}
    inp = open_input("pcap:" + cap)
    try:
        single = App([L2Fwd()], **config).run(inp)
    finally:
        inp.close()
    merged, _ = run_parallel(lambda: [L2Fwd()], "pcap:" + cap, None, stacks=stacks,
                             **config)
    fr = single["fragments"]
    assert fr["completed"] and fr["timed_out"] and fr["bad"] and fr["memcap_drops"]
    assert fr["pending_at_end"] and fr["held_discarded"]
    assert merged["fragments"] == fr
    for key in ("packets", "fragments_held", "dropped_fragments", "dropped_malformed",
                "dropped_by_nf", "dropped_on_error"):
        assert merged[key] == single[key], key
    assert single["dropped_fragments"] == fr["bad"] + fr["memcap_drops"]


def frames_of_a_lost_datagram():
    """The first fragment of a 3,000-byte UDP datagram whose others never come."""
    frame = ether(udp4("198.18.250.1", "198.19.250.1", 7000, 53, bytes(3000)))
    frame = frame[:18] + struct.pack("!H", 999) + frame[20:]
    return fragment4(frame, 1480)[:1]


def test_stacks_may_write_beside_the_input_capture_under_its_name(tmp_path):
    # Each stack writes FILE.stackK, so --out naming the input overwrites nothing;
    # it was refused in every stack ("the output is the input capture").
    cap = str(tmp_path / "self.pcap")
    n = many_flows_capture(cap, flows=50, packets=500)
    merged, _ = run_parallel(lambda: [L2Fwd()], "pcap:" + cap, "pcap:" + cap, stacks=2)
    assert merged["sent"] == n
    assert sum(len(read_frames(f"{cap}.stack{k}")) for k in range(2)) == n
    assert len(read_frames(cap)) == n               # the input is as it was

def test_a_path_that_is_not_a_regular_file_is_written_as_it_is(tmp_path, monkeypatch):
    # A Logger's path (or a pcap output) of /dev/null or a FIFO became
    # PATH.stackK in each stack process: new regular files, /dev/null.stack0 ...
    from mbx import runtime
    from mbx.nfs.logger import make as logger

    fifo = str(tmp_path / "events.fifo")
    os.mkfifo(fifo)
    monkeypatch.setattr(runtime, "_stack_process", (1, 2))
    assert runtime.output_path("/dev/null") == "/dev/null"
    assert runtime.output_path(fifo) == fifo
    assert runtime.output_path(str(tmp_path / "log")) == str(tmp_path / "log.stack1")
    monkeypatch.undo()
    cap = str(tmp_path / "many.pcap")
    many_flows_capture(cap, flows=50, packets=500)
    # this process holds both ends, so that neither stack's open waits for a reader
    # and the reader's end of file waits for the run: 50 lines fit in the pipe
    r = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(fifo, os.O_WRONLY)
    try:
        merged, _ = run_parallel(lambda: [logger(path=fifo, types="FLOW/START")],
                                 "pcap:" + cap, stacks=2)
    finally:
        os.close(w)
    with os.fdopen(r, "rb") as fh:
        lines = fh.read().splitlines()
    assert sorted(os.listdir(tmp_path)) == ["events.fifo", "many.pcap"]
    assert len(lines) == merged["nfs"]["logger"]["report"]["events"] == 50


def _json_lines(data):
    """(log lines that parse as JSON objects, lines that do not, other lines)."""
    good, bad, other = 0, 0, []
    for line in data.decode().splitlines():
        if not line.startswith('{"'):
            other.append(line)
            continue
        try:
            json.loads(line)
            good += 1
        except ValueError:
            bad += 1
    return good, bad, other


def test_a_log_on_standard_output_keeps_every_line_whole(tmp_path):
    # With --stacks each process's Logger buffered 1 MiB and wrote it wherever the
    # buffer filled: on a pipe the processes' lines cut into one another (90 broken
    # lines of 54,269); at /dev/stdout redirected to a file each process opened it
    # anew, from offset 0, truncating: half the lines were lost, and the summary
    # was written over the start of a one-stack log.
    cap = str(tmp_path / "many.pcap")
    n = many_flows_capture(cap, flows=1500, packets=30000)
    cmd = [sys.executable, "-m", "mbx.cli", "run", "logger", "--in", f"pcap:{cap}",
           "--set", "logger.types=PKT", "--stacks", "2"]
    for path in ("/dev/stdout", "-"):
        piped = subprocess.run(cmd + ["--set", f"logger.path={path}", "-q"],
                               capture_output=True, timeout=300)
        assert piped.returncode == 0, piped.stderr
        assert _json_lines(piped.stdout) == (n, 0, [])
    out = tmp_path / "out.txt"
    for stacks in ("1", "2"):
        with open(out, "wb") as fh:
            r = subprocess.run(cmd[:-1] + [stacks, "--set", "logger.path=/dev/stdout"],
                               stdout=fh, stderr=subprocess.PIPE, timeout=300)
        assert r.returncode == 0, r.stderr
        # the log alone: the summary goes to stderr when a Logger writes stdout
        assert _json_lines(out.read_bytes()) == (n, 0, [])
        summary = r.stderr.decode().splitlines()
        assert summary[0].startswith(f"packets        {n:,} ")
        assert ["logger", "events", f"{n:,}"] in [line.split() for line in summary]


def test_a_regular_file_under_dev_is_a_file_of_each_stack(tmp_path):
    # /dev/shm/x.pcap was taken for a stream because of where it is: --stacks
    # refused it ("give a file"), and a Logger's /dev/shm log was written by every
    # stack process at once, each truncating the others'.
    from mbx.runtime import writes_as_is

    cap = str(tmp_path / "many.pcap")
    n = many_flows_capture(cap, flows=100, packets=1000)
    base = f"/dev/shm/mbx-test-{os.getpid()}"
    assert writes_as_is("/dev/stdout") and writes_as_is("/dev/fd/1")
    assert not writes_as_is(base + ".pcap")
    try:
        r = subprocess.run([sys.executable, "-m", "mbx.cli", "run", "l2fwd+logger",
                            "--in", f"pcap:{cap}", "--out", f"pcap:{base}.pcap",
                            "--set", f"logger.path={base}.jsonl", "--set",
                            "logger.types=PKT", "--stacks", "2", "-q"],
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        frames = sum(len(read_frames(f"{base}.pcap.stack{k}")) for k in range(2))
        lines = sum(len(open(f"{base}.jsonl.stack{k}").read().splitlines())
                    for k in range(2))
        assert frames == lines == n
        assert not os.path.exists(base + ".pcap") and not os.path.exists(base + ".jsonl")
    finally:
        for k in range(2):
            for ext in ("pcap", "jsonl"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(f"{base}.{ext}.stack{k}")


def _one_from_the_future(path, jump_s):
    # one UDP flow, one packet jump_s ahead of its neighbours, then a new one-packet
    # flow every second for 600 s
    t = 1_700_000_000.0

    def udp(ts, port):
        return (ts, ether(udp4("198.18.0.1", "198.18.0.2", port, 53, b"q")))

    write_pcap(path, [udp(t, 1001), udp(t + 1 + jump_s, 1002)]
               + [udp(t + 2 + k, 2000 + k) for k in range(600)])


@pytest.mark.parametrize("how", [{}, {"deploy": "pipelined"}, {"stacks": 2},
                                 {"flow_capacity": 64, "flow_policy": "refuse"}])
def test_one_packet_stamped_days_ahead_does_not_stop_idle_expiry(tmp_path, how):
    # The clock was the latest packet time ever seen: after one packet stamped 10
    # days ahead no flow went idle for the rest of the run (1 expired of 602), and a
    # full table under the refuse policy refused every new flow after it.  The
    # clock now steps back to a packet more than the idle timeout behind it.
    how = dict(how)
    stacks = how.pop("stacks", 1)
    counts = []
    for jump in (0, 10 * 86400):
        cap = str(tmp_path / f"jump{jump}.pcap")
        _one_from_the_future(cap, jump)
        if stacks > 1:
            c, _ = run_parallel(list, "pcap:" + cap, stacks=stacks, idle_timeout=60)
        else:
            inp = open_input("pcap:" + cap)
            try:
                c = App([mbx.NF("idle")], idle_timeout=60, **how).run(inp)
            finally:
                inp.close()
        counts.append(c)
    plain, jumped = counts
    assert plain["clock_steps_back"] == 0 and jumped["clock_steps_back"] >= 1
    assert plain["flows"]["expired"] > 290
    # the flow live at the jump (1 s old) is ended by it: one more expiry, at most
    for what in ("expired", "refused", "created"):
        assert abs(jumped["flows"][what] - plain["flows"][what]) <= 1, what


def test_each_stack_holds_its_share_of_the_flow_capacity(tmp_path):
    assert [stack_share(100, k) for k in (1, 2, 3, 4)] == [100, 64, 64, 32]
    assert stack_share(131072, 2) == 65536 and stack_share(1, 2) == 1
    cap = str(tmp_path / "many.pcap")
    n = many_flows_capture(cap, flows=300, packets=3000)
    # room for all 300 flows: each stack's table is its share, nothing overflows
    merged, parts = run_parallel(list, "pcap:" + cap, stacks=2, flow_capacity=512)
    assert [p["flows"]["capacity"] for p in parts] == [256, 256]
    assert merged["flows"]["created"] == 300 and merged["flows"]["evicted"] == 0
    # 100 flows for 300: each share (64) fills, and each stack counts what it evicted
    # or refused, as one stack with a full table does
    for policy, what in (("evict", "evicted"), ("refuse", "refused")):
        merged, parts = run_parallel(list, "pcap:" + cap, stacks=2, flow_capacity=100,
                                     flow_policy=policy)
        assert merged["packets"] == n
        assert [p["flows"]["capacity"] for p in parts] == [64, 64]
        assert all(p["flows"][what] > 0 for p in parts)


@pytest.mark.parametrize("stacks", [2, 3])
def test_flows_go_idle_in_capture_time_however_many_stacks(tmp_path, stacks):
    # A stack process's clock used to move only with its own share of the frames:
    # flows idle over a capture's quiet stretch stayed until the end of the input
    # (reason shutdown) in a process that saw no frame of its own after them.

    frames = [(0.0, ether(udp4(f"198.18.0.{i}", "198.18.1.1", 5000 + i, 53, b"q")))
              for i in range(1, 9)]
    frames += [(0.0, ether(udp4("198.18.0.99", "198.18.1.1", 7000, 53, b"q"))),
               (10.0, ether(udp4("198.18.0.99", "198.18.1.1", 7000, 53, b"q")))]
    cap = str(tmp_path / "quiet.pcap")
    write_pcap(cap, frames)
    one = App([], idle_timeout=1.0)
    inp = open_input("pcap:" + cap)
    try:
        alone = one.run(inp)["flows"]
    finally:
        inp.close()
    assert (alone["created"], alone["expired"], alone["shutdown"]) == (10, 9, 1)
    merged, parts = run_parallel(list, "pcap:" + cap, stacks=stacks, idle_timeout=1.0)
    assert all(p["packets"] for p in parts)      # the flows are split
    assert {k: merged["flows"][k] for k in ("created", "expired", "shutdown")} == {
        "created": 10, "expired": 9, "shutdown": 1}


@pytest.mark.parametrize("scheme", ["pcap:", ""])     # a bare capture name too
def test_cli_stacks_option(tmp_path, scheme):
    import subprocess
    import sys

    cap = str(tmp_path / "many.pcap")
    many_flows_capture(cap, flows=200, packets=2000)
    out = tmp_path / "c.json"
    log = tmp_path / "events.jsonl"
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "run", "flow_stats+logger", "--in",
                        f"pcap:{cap}", "--stacks", "2", "--json", str(out),
                        "--set", f"logger.path={log}", "--set", "logger.types=FLOW/STATS",
                        "--out", f"{scheme}{tmp_path / 'o.pcap'}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    c = json.loads(out.read_text())
    assert c["packets"] == 2000 and len(c["stacks"]) == 2
    assert c["other_stacks"] == 0       # summed, it was the input once per extra stack
    assert sum(s["packets"] for s in c["stacks"]) == 2000
    assert sum(s["sent"] for s in c["stacks"]) == 2000
    assert all(s["cpu_s"] > 0 for s in c["stacks"])
    # the ports: each stack's share of the capture and each stack's file, summed
    assert c["ports"]["in"]["rx_pkts"] == 2000 and c["ports"]["in"]["rss_skipped"] == 0
    assert c["ports"]["out"]["tx_pkts"] == 2000
    # each stack's table is half of --flows (65536), and no share was full
    assert [s["flow_capacity"] for s in c["stacks"]] == [32768, 32768]
    assert "in a table of 32,768" in r.stdout and "the share is full" not in r.stdout
    assert f"written        {tmp_path / 'o.pcap'}.stack0 .. .stack1" in r.stdout
    sent = sum(len(open_frames(tmp_path / f"o.pcap.stack{k}")) for k in range(2))
    assert sent == 2000 and not (tmp_path / "o.pcap").exists()
    # Each stack's Logger writes its own file, whole lines that nobody overwrote:
    # one FLOW/STATS per flow of that stack, and every packet counted once.
    assert not log.exists()
    stats = [[json.loads(line) for line in open(f"{log}.stack{k}")] for k in range(2)]
    assert [len(s) for s in stats] == [p["flows"] for p in c["stacks"]]
    assert sum(rec["packets"] for s in stats for rec in s) == 2000
    # the NFs' reports, summed over the stacks
    assert c["nfs"]["flow_stats"]["report"] == {"flows": sum(len(s) for s in stats)}
    assert c["nfs"]["logger"]["report"] == {"events": sum(len(s) for s in stats)}
    # ... and each stack's own (a maximum or a ratio cannot be summed)
    assert [s["reports"] for s in c["stacks"]] == [
        {"flow_stats": {"flows": len(s)}, "logger": {"events": len(s)}} for s in stats]


SLOW_NF = """
import os, time
import mbx

class Slow(mbx.NF):
    def __init__(self):
        super().__init__("slow")
        self.sub(mbx.PKT, self.on_pkt)

    def start(self):
        open(os.path.join(OUT, f"started-{os.getpid()}"), "w").close()

    def on_pkt(self, ev):
        time.sleep(0.0005)

    def stop(self):
        open(os.path.join(OUT, f"stopped-{os.getpid()}"), "w").close()

nf = Slow()
"""


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM", "SIGHUP"])
def test_a_signal_stops_every_stack_process_with_its_counters(tmp_path, sig):
    # Before, the stack processes (which ignore SIGINT) ran on as orphans and the
    # parent died with a traceback and no counters.
    import signal
    import time

    out = tmp_path / "c.json"
    p, _ = _slow_stacks(tmp_path, 20000, "--json", str(out))    # about 10 s per process
    try:
        time.sleep(0.5)
        p.send_signal(getattr(signal, sig))
        stdout, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, stderr
    started = {f.name.split("-")[1] for f in tmp_path.glob("started-*")}
    stopped = {f.name.split("-")[1] for f in tmp_path.glob("stopped-*")}
    assert len(started) == 2 and stopped == started       # both ended their run
    for pid in started:
        with pytest.raises(ProcessLookupError):
            os.kill(int(pid), 0)
    c = json.loads(out.read_text())
    assert 0 < c["packets"] < 20000 and len(c["stacks"]) == 2
    assert c["stopped"] == sig
    assert "stacks         #0:" in stdout


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_signal_to_the_process_group_stops_every_stack_cleanly(tmp_path, sig):
    # `timeout`, systemd and a closed terminal signal the whole process group: each
    # stack process got that signal and then the parent's stop, took the second for
    # a forced stop, and the run failed at once ("still running 3 s after the first
    # signal ... interrupted", packets dropped on error) instead of stopping cleanly.
    import signal
    import time

    out = tmp_path / "c.json"
    p, _ = _slow_stacks(tmp_path, 20000, "--json", str(out), start_new_session=True)
    try:
        time.sleep(0.5)
        os.killpg(p.pid, getattr(signal, sig))
        _, stderr = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
    assert p.returncode == 0, stderr
    c = json.loads(out.read_text())
    assert "error" not in c and c["stopped"] == sig
    assert 0 < c["packets"] < 20000 and c["dropped_on_error"] == 0
    started = {f.name.split("-")[1] for f in tmp_path.glob("started-*")}
    stopped = {f.name.split("-")[1] for f in tmp_path.glob("stopped-*")}
    assert len(started) == 2 and stopped == started       # both ended their run


def _slow_stacks(tmp_path, packets=40000, *args, **popen):
    """``mbx run`` of SLOW_NF with ``--stacks 2`` and ``args`` over ``packets`` of 200
    flows (``popen``: more Popen keywords): the process once both stacks have
    started, and their PIDs."""
    import subprocess
    import sys
    import time

    cap = str(tmp_path / "many.pcap")
    many_flows_capture(cap, flows=200, packets=packets)
    nf = tmp_path / "slow.py"
    nf.write_text(f"OUT = {str(tmp_path)!r}\n" + SLOW_NF)
    p = subprocess.Popen([sys.executable, "-m", "mbx.cli", "run", str(nf), "--in", cap,
                          "--stacks", "2", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    deadline = time.monotonic() + 60
    while len(list(tmp_path.glob("started-*"))) < 2:
        assert p.poll() is None and time.monotonic() < deadline, p.communicate()
        time.sleep(0.05)
    return p, sorted(int(f.name.split("-")[1]) for f in tmp_path.glob("started-*"))


def _gone_within(pids, seconds):
    import time

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                os.kill(pid, 0)
                alive.append(pid)
            except ProcessLookupError:
                pass
        if not alive:
            return True
        time.sleep(0.05)
    return False


def test_a_stack_process_that_dies_ends_the_run_at_once(tmp_path):
    # Before, the parent noticed only at the end of the input (or never, live) and
    # then said "exited without a report".
    import signal
    import time

    p, (a, b) = _slow_stacks(tmp_path)
    try:
        os.kill(a, signal.SIGKILL)
        t0 = time.monotonic()
        _, err = p.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 2
    assert "killed by SIGKILL without a report; the other stacks were stopped" in err
    assert took < 5, f"the run went on {took:.1f} s after a stack died"
    assert _gone_within([b], 5)


def test_a_killed_stack_keeps_its_last_snapshot_and_the_failed_run_its_stacks(tmp_path):
    # The run's totals fell below what --stats had shown live: the killed stack's
    # counters were thrown away, though its snapshots had come every half second;
    # and a failed run's --json had no per-stack table, a good run's has
    import signal
    import time

    counters = tmp_path / "c.json"
    p, (a, _) = _slow_stacks(tmp_path, 40000, "--stats", "--json", str(counters))
    try:
        time.sleep(1.5)                 # snapshots come about every 0.5 s
        os.kill(a, signal.SIGKILL)
        out, err = p.communicate(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 2, err
    assert ("killed by SIGKILL without a report (its counters as of its last live "
            "snapshot); the other stacks were stopped") in err
    c = json.loads(counters.read_text())
    stacks = {s["stack"]: s for s in c["stacks"]}
    assert set(stacks) == {0, 1} and stacks[0]["packets"] > 0, c["stacks"]
    assert c["packets"] == stacks[0]["packets"] + stacks[1]["packets"]
    assert re.search(r"stacks +#0: [\d,]+ pkts, .*#1: ", out), out
    assert "ended at the stop" in out or "ended with" not in out


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGHUP"])
def test_a_stack_process_another_program_stops_fails_the_run(tmp_path, sig):
    # A stack process took any SIGTERM for its parent's stop: one signalled by
    # another program stopped cleanly, the others ran to the end and the run
    # "succeeded" (exit 0) with that stack's share of the input missing.
    import signal
    import time

    p, (a, b) = _slow_stacks(tmp_path)
    try:
        os.kill(a, getattr(signal, sig))
        t0 = time.monotonic()
        out, err = p.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 2, err
    assert f"stopped by {sig} sent to its process alone, not by mbx: its share of the " \
           "input was not all read; the other stacks were stopped" in err
    assert out.startswith("packets")    # what the stacks did, the stopped one's too
    assert took < 5, f"the run went on {took:.1f} s after a stack was stopped"
    assert _gone_within([b], 5)


HANGING_NF = """import os
import mbx
from mbx import runtime

def make():
    nf = mbx.NF("hangs")
    seen = [0]
    def on(ev):
        seen[0] += 1
        if seen[0] == 100 and runtime._stack_process[0] == 0:
            with open(__file__ + ".hung", "w") as fh:
                fh.write(str(os.getpid()))
            while True:
                try:
                    while True:
                        pass
                except BaseException:
                    if not SWALLOWS:
                        raise

    def stop():
        if runtime._stack_process[0] == 1:      # stack 1 read all of its share
            open(__file__ + ".done", "w").close()
    nf.sub(mbx.PKT, on)
    nf.stop = stop
    return nf
"""


@pytest.mark.parametrize("swallows", [False, True])
def test_a_stack_held_by_its_nf_is_interrupted_by_a_second_signal(tmp_path, swallows):
    # No number of signals ended a --stacks run whose NF handler never returns: the
    # parent only sent SIGTERM again, which the held stack process cannot act on.
    # Now a second signal, 3 s after the first, interrupts it as one stack is (and
    # one that even that leaves running is killed a second later): exit 130, with
    # the summary and --json of what the stacks did.
    import signal
    import time

    cap = str(tmp_path / "many.pcap")
    many_flows_capture(cap, flows=200, packets=4000)
    nf = tmp_path / "hangs.py"
    nf.write_text(f"SWALLOWS = {swallows}\n" + HANGING_NF)
    counters = tmp_path / "c.json"
    p = subprocess.Popen([sys.executable, "-m", "mbx.cli", "run", str(nf), "--in", cap,
                          "--stacks", "2", "--json", str(counters)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        # stack 0 held, and stack 1 through its share (on a loaded machine it may
        # not even have started when stack 0 got its 100th packet)
        while not ((tmp_path / "hangs.py.hung").exists()
                   and (tmp_path / "hangs.py.done").exists()):
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "stack 0's NF never got its 100th " \
                "packet, or stack 1 never finished its share"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        time.sleep(1)
        p.send_signal(signal.SIGINT)        # too soon: the stop is still awaited
        time.sleep(2.5)
        assert p.poll() is None
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            # the held stack process too: it keeps the output pipes open
            with contextlib.suppress(ProcessLookupError, ValueError, FileNotFoundError):
                os.kill(int((tmp_path / "hangs.py.hung").read_text()), signal.SIGKILL)
            p.communicate()
    assert p.returncode == 130, err
    assert out.startswith("packets"), err       # the summary came out
    c = json.loads(counters.read_text())
    held = ("stack 0: still running 3 s after the first signal (held by an NF handler "
            "that never returns?)" + (", and 1 s after it was interrupted: killed "
                                      "(counters lost)" if swallows else
                                      ": interrupted; held in NF hangs: make.<locals>.on "
                                      "on a PKT event (at hangs.py, line LINE)"))
    # the line is the loop's, or its body's: where the interrupt found it
    assert re.fullmatch(re.escape("stopped again: the run had not ended 3 s after the "
                                  f"first signal; {held}").replace("LINE", "1[56]"),
                        c["error"]), c["error"]
    assert c["stopped"] == "SIGINT"
    # stack 1 ran to its end: its share, about half, is there
    assert c["packets"] > 1000


def test_a_stack_process_that_fails_ends_the_run_at_once(tmp_path):
    import subprocess
    import sys
    import time

    cap = str(tmp_path / "many.pcap")
    many_flows_capture(cap, flows=200, packets=40000)
    nf = tmp_path / "fails.py"
    nf.write_text(f"OUT = {str(tmp_path)!r}\n" + SLOW_NF + """
from mbx import runtime
slow_pkt = nf.on_pkt

def on_pkt(ev, n=[0]):
    n[0] += 1
    if runtime._stack_process[0] == 0 and n[0] == 100:
        raise RuntimeError("stack 0 gives up")
    slow_pkt(ev)

nf.subs.clear()
nf.sub(mbx.PKT, on_pkt)
""")
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "run", str(nf), "--in", cap,
                        "--stacks", "2"], capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert r.returncode == 2 and "stack 0: NFError" in r.stderr, r.stderr
    assert "stack 0 gives up" in r.stderr
    assert took < 8, f"the other stack ran on {took:.1f} s after stack 0 failed"


def test_stack_processes_end_when_mbx_is_killed(tmp_path):
    import signal

    p, pids = _slow_stacks(tmp_path)
    try:
        p.send_signal(signal.SIGKILL)
        p.wait(30)
        assert _gone_within(pids, 10), "stack processes ran on without their parent"
    finally:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_parallel_stacks_refuse_the_pipelined_deployment(example_pcap):
    with pytest.raises(mbx.AppError, match="inline: drop deploy='pipelined'"):
        run_parallel(lambda: [], f"pcap:{example_pcap}", deploy="pipelined")


def open_frames(path):
    import dpkt

    with open(path, "rb") as fh:
        return list(dpkt.pcap.Reader(fh))


@pytest.mark.parametrize("pin", [None, False])
def test_stack_processes_pinned_one_per_cpu(example_pcap, tmp_path, pin):
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip(f"needs 2 usable CPUs to pin 2 stacks, this process has {cpus}")

    def make_nfs():
        # runs in each stack process: note where it may run
        (tmp_path / f"cpus.{os.getpid()}").write_text(
            " ".join(map(str, sorted(os.sched_getaffinity(0)))))
        return []

    run_parallel(make_nfs, "pcap:" + example_pcap, stacks=2, pin=pin)
    seen = sorted(f.read_text() for f in tmp_path.glob("cpus.*"))
    if pin is None:         # the default with enough CPUs: one each, distinct
        assert seen == [str(cpus[0]), str(cpus[1])]
    else:
        assert seen == [" ".join(map(str, cpus))] * 2


def test_each_stack_process_writes_its_own_files():
    # A DPDK net_pcap device's tx_pcap file was opened by every stack process: one
    # file written by two, which dpkt could not read.  It is FILE.stackK, as a
    # pcap: output is, in an input's device too; what is read stays as it is.
    from mbx.ports import stack_spec, written_files

    def rename(path):
        return path + ".stack1"

    assert stack_spec("pcap:o.pcap", rename) == "pcap:o.pcap.stack1"
    assert stack_spec("o.pcap", rename) == "pcap:o.pcap.stack1"
    assert stack_spec("pcap:in.pcap", rename, output=False) == "pcap:in.pcap"
    assert stack_spec("dpdk:net_pcap1,tx_pcap=/t/o.pcap", rename) == \
        "dpdk:net_pcap1,tx_pcap=/t/o.pcap.stack1"
    assert stack_spec("dpdk:net_pcap0,rx_pcap=i.pcap,tx_pcap=o.pcap", rename,
                      output=False) == "dpdk:net_pcap0,rx_pcap=i.pcap,tx_pcap=o.pcap.stack1"
    bridge = ("dpdk:eth_pcap0,rx_pcap=a.pcap,tx_pcap=b.pcap+net_pcap1,rx_iface=eth1,"
              "tx_pcap=c.pcap?idle_us=5")
    assert stack_spec(bridge, rename) == (
        "dpdk:eth_pcap0,rx_pcap=a.pcap,tx_pcap=b.pcap.stack1+net_pcap1,rx_iface=eth1,"
        "tx_pcap=c.pcap.stack1?idle_us=5")
    # other devices and AF_PACKET ports are opened as they are
    for spec in ("dpdk:net_ring0", "dpdk:net_af_packet0,iface=eth0", "afpacket:a,b"):
        assert stack_spec(spec, rename) == spec
    assert written_files(bridge) == ["b.pcap", "c.pcap"]
    assert written_files("pcap:in.pcap", output=False) == []
    assert written_files("pcap:o.pcap") == ["o.pcap"]


@pytest.mark.parametrize("spec, message", [
    ("dpdk:net_memif0,role=client,socket=/tmp/x.sock",
     "a memif interface is one link to one peer \\(socket /tmp/x.sock\\)"),
    ("dpdk:net_ring0+net_memif3", "memif interface is one link .*socket /run/memif.sock"),
    ("dpdk:net_tap0,iface=t0", "a tap device is one kernel interface \\(t0\\)"),
    # a fanout group of each process's own, with the defrag flag: the kernel rebuilt
    # each fragmented IPv4 datagram for one group, and with 2 stacks about half the
    # datagrams were lost without a count (DPDK 22.11 gives no option to change it)
    ("dpdk:net_af_packet0,iface=v0", "net_af_packet puts each of the 2 stack processes "
     "\\(--stacks 2\\) in a fanout group of its own with the kernel's defrag flag.*"
     "use afpacket:v0"),
])
def test_ports_the_stack_processes_cannot_each_open_are_refused_up_front(
        example_pcap, tmp_path, spec, message):
    from mbx.errors import PortError
    from mbx.ports import check_stacks

    with pytest.raises(PortError, match=message + ".*(the 2 stack processes of a "
                                                  "parallel run \\(--stacks 2\\)|one "
                                                  "stack process)"):
        check_stacks(spec, 2)
    check_stacks(spec, 1)
    for ok in ("dpdk:net_pcap0,tx_pcap=o.pcap", "dpdk:net_ring0", "dpdk:net_null0",
               "afpacket:a,b", "pcap:o.pcap"):
        check_stacks(ok, 2)
    # before any stack process starts (no DPDK needed to refuse it), as --in or --out
    with pytest.raises(PortError, match=message):
        run_parallel(lambda: [], f"pcap:{example_pcap}", spec, stacks=2)
    with pytest.raises(PortError, match=message):
        run_parallel(lambda: [], spec, stacks=2)
    r = subprocess.run([sys.executable, "-m", "mbx.cli", "run", "l2fwd", "--in",
                        f"pcap:{example_pcap}", "--out", spec, "--stacks", "2"],
                       capture_output=True, text=True, timeout=60, check=False,
                       cwd=tmp_path)
    assert r.returncode == 2 and "--stacks 2" in r.stderr and r.stderr.count("\n") == 1, \
        r.stderr


def _pcapng_with_a_foreign_interface(path, frames, every=10):
    """A pcapng of ``frames`` on an Ethernet interface and, after every ``every``-th,
    a frame on a second interface of link type 147 (USER0), which mbx skips."""
    def block(kind, body):
        body += b"\0" * (-len(body) % 4)
        return struct.pack("<II", kind, 12 + len(body)) + body + \
            struct.pack("<I", 12 + len(body))

    out = [block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1)),
           block(1, struct.pack("<HHI", 1, 0, 65535)),
           block(1, struct.pack("<HHI", 147, 0, 65535))]
    foreign = 0
    for i, (ts, frame) in enumerate(frames):
        us = int(ts * 1e6)
        out.append(block(6, struct.pack("<IIIII", 0, us >> 32, us & 0xFFFFFFFF,
                                        len(frame), len(frame)) + frame))
        if i % every == 0:
            out.append(block(6, struct.pack("<IIIII", 1, us >> 32, us & 0xFFFFFFFF, 5, 5)
                             + b"hello"))
            foreign += 1
    with open(path, "wb") as fh:
        fh.write(b"".join(out))
    return foreign


def test_stacks_count_what_is_of_the_whole_capture_once(tmp_path):
    # Every stack process reads the whole capture, yet the counters of the capture
    # as a whole were summed: 218 frames of an interface mbx skips were 436 with two
    # stacks, their link type 147 became 294, and a capture cut short was 2 truncated.
    cap = str(tmp_path / "many.pcap")
    many_flows_capture(cap, flows=200, packets=2000)
    frames = [(ts, frame) for ts, frame in read_frames(cap)]
    ng = str(tmp_path / "two-interfaces.pcapng")
    foreign = _pcapng_with_a_foreign_interface(ng, frames)
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(open(cap, "rb").read()[:-7])
    for stacks in (1, 2, 3):
        c, parts = run_parallel(lambda: [], f"pcap:{ng}", stacks=stacks)
        inp = c["ports"]["in"]
        assert (inp["skipped"], inp["skipped_linktype"]) == (foreign, 147), stacks
        assert inp["rx_pkts"] == c["packets"] == len(frames), stacks
        assert all(p["ports"]["in"]["skipped"] == foreign for p in parts)
        c, _ = run_parallel(lambda: [], f"pcap:{cut}", stacks=stacks)
        assert c["ports"]["in"]["truncated"] == 1, stacks
        assert c["packets"] == len(frames) - 1


def test_a_damaged_capture_is_said_once_for_every_stack(tmp_path):
    # every process reads the damage and fails alike: the error was said once per
    # stack, on one line
    cap = tmp_path / "damaged.pcap"
    write_pcap(str(cap), [(1.0, ether(tcp4("198.18.0.1", "198.18.0.2", 1, 2, b"x")))])
    data = bytearray(cap.read_bytes())
    data[24 + 8:24 + 12] = struct.pack("<I", 1 << 30)      # a record of 1 GiB
    cap.write_bytes(bytes(data))
    with pytest.raises(mbx.MbxError) as err:
        run_parallel(lambda: [], f"pcap:{cap}", stacks=3)
    text = str(err.value)
    # each read up to the damage: the first to meet it stopped none of the others
    assert re.match(r"stacks 0, 1, 2: CaptureFormatError: ", text), text
    assert text.count("damaged.pcap") == 1, text


def test_a_damaged_capture_is_read_up_to_the_damage_by_every_stack(tmp_path):
    # The first stack to meet the damage used to stop the others where they were:
    # a slower stack's share was cut short at random (in 3 runs of 12, one stack
    # had counted nothing).  Stack 1 is made slow here, so the first to fail is
    # stack 0; every packet before the damage must still be counted once.
    import time

    from mbx import runtime

    cap = tmp_path / "damaged.pcap"
    many_flows_capture(str(cap), flows=60, packets=600)
    data = bytearray(cap.read_bytes())
    off = 24
    for _ in range(400):                # record 400 claims 2 GiB
        off += 16 + struct.unpack_from("<I", data, off + 8)[0]
    data[off + 8:off + 12] = struct.pack("<I", 0x7FFFFFFF)
    cap.write_bytes(bytes(data))

    def make():
        nf = mbx.NF("slow_in_stack_1")
        if runtime._stack_process[0] == 1:
            nf.sub(mbx.PKT, lambda ev: time.sleep(0.002))
        return [nf]

    with pytest.raises(mbx.MbxError) as one:
        run_parallel(make, f"pcap:{cap}", stacks=1)
    with pytest.raises(mbx.MbxError) as two:
        run_parallel(make, f"pcap:{cap}", stacks=2)
    assert re.match(r"stacks 0, 1: CaptureFormatError: ", str(two.value)), str(two.value)
    assert one.value.counters["packets"] == 400
    assert two.value.counters["packets"] == 400
    assert all(part["packets"] > 0 for part in two.value.per_stack.values())
    assert two.value.counters["flows"]["created"] == one.value.counters["flows"]["created"]


STUBBORN_NF = """import os, time
import mbx

def make():
    nf = mbx.NF("stubborn")
    def on(ev):
        open(os.path.join(OUT, f"held-{os.getpid()}"), "w").close()
        while True:
            try:
                time.sleep(100)
            except BaseException:
                pass
    nf.sub(mbx.PKT, on)
    return nf
"""


def test_a_run_whose_every_stack_is_killed_still_writes_its_summary(tmp_path):
    # Every stack held by an NF that swallows the interrupt, so each is killed and
    # none reports: the run exited 130 with the error, but without the summary and
    # the --json the guide promises (the failed run's counters were None).  Now
    # they say that nothing was counted, and why.
    import signal
    import time

    cap = str(tmp_path / "many.pcap")
    many_flows_capture(cap, flows=200, packets=2000)
    nf = tmp_path / "stubborn.py"
    nf.write_text(f"OUT = {str(tmp_path)!r}\n" + STUBBORN_NF)
    counters = tmp_path / "c.json"
    p = subprocess.Popen([sys.executable, "-m", "mbx.cli", "run", str(nf), "--in", cap,
                          "--stacks", "2", "--flows", "1000", "--json", str(counters)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(tmp_path.glob("held-*"))) < 2:
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "the stacks' NFs never got a packet"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        time.sleep(3.5)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 130, err
    assert out.startswith("packets        0 "), out
    c = json.loads(counters.read_text())
    assert "stacks 0, 1: still running 3 s after the first signal" in c["error"]
    assert "killed (counters lost)" in c["error"]
    assert c["error"] in err
    assert (c["packets"], c["sent"], c["stopped"]) == (0, 0, "SIGINT")
    assert c["flows"]["capacity"] == 2 * stack_share(1000, 2)


def _datagrams_completing_together(path, seed=1):
    """12 UDP datagrams of 60 KB, cut into 1,480-byte fragments sent in turn, so
    that their last fragments come a few records apart, between small flows' frames;
    returns the record count."""
    rng = random.Random(seed)
    datagrams = []
    for k in range(12):
        frame = ether(udp4(f"198.18.200.{k + 1}", f"198.19.200.{k + 1}", 5000 + k, 53,
                           bytes([k]) * 60000))
        frame = frame[:18] + struct.pack("!H", 100 + k) + frame[20:]
        datagrams.append(fragment4(frame, 1480))
    frames = []
    for i in range(len(datagrams[0])):
        for pieces in datagrams:
            frames.append(pieces[i])
            for _ in range(rng.randrange(4)):
                src = f"198.18.{rng.randrange(1, 250)}.{rng.randrange(1, 250)}"
                dst = f"198.19.{rng.randrange(1, 250)}.{rng.randrange(1, 250)}"
                make = rng.choice([udp4, tcp4])
                frames.append(ether(make(src, dst, rng.randrange(1024, 65000), 80, b"y")))
    write_pcap(path, [(1.0 + i * 1e-5, f) for i, f in enumerate(frames)])
    return len(frames)


@pytest.mark.parametrize("stacks", [2, 3, 4])
def test_a_datagram_with_no_room_in_a_burst_is_dropped_once_by_its_flows_stack(
        tmp_path, stacks):
    # Every stack rebuilds every datagram, each in bursts of its own: datagrams
    # completing close together left one stack's burst without room for one
    # (no_room) while another's had it.  The stack that counted the last fragment
    # (its addresses') dropped it and counted the drop, or held it for the flow's
    # stack, which had sent it or dropped it uncounted: a frame sent and dropped, or
    # in no counter at all.  Now the flow's stack alone decides and counts.
    cap = str(tmp_path / "in.pcap")
    n = _datagrams_completing_together(cap)
    no_room = 0
    for burst in (8, 16, 32):
        out = str(tmp_path / f"out-{burst}.pcap")
        merged, parts = run_parallel(lambda: [L2Fwd()], "pcap:" + cap, "pcap:" + out,
                                     stacks=stacks, burst=burst)
        assert merged["packets"] == n and all(
            p["packets"] + p["other_stacks"] == n for p in parts), burst
        assert merged["packets"] == (
            merged["sent"] + merged["fragments_held"] + merged["dropped_fragments"]
            + merged["dropped_malformed"] + merged["dropped_by_nf"]
            + merged["dropped_on_error"]), burst
        fr = merged["fragments"]
        assert fr["completed"] == 12 and fr["held_completed"] == 12 * 40, (burst, fr)
        assert merged["dropped_fragments"] == merged["parse"].get("frag_memcap", 0) \
            == fr["no_room"], burst
        sent = _outputs(out + ".stack")
        assert len(sent) == merged["sent"], burst
        assert sum(1 for f in sent if len(f) > 60000) + fr["no_room"] == 12, burst
        no_room += fr["no_room"]
    assert no_room, "no burst ran out of room: the case is not exercised"
