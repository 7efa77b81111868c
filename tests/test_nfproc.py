"""What NF processes may do in the pipelined deployment: mb_up_sub reaches the stack
(it stops building what nobody wants), TERMINATE reaches the TCP Monitor, DATA_RDY
bytes are readable, Stack Memory is read-only (a writer faults alone), and an NF
cannot publish a type it did not declare.  Each against the inline deployment."""
import ctypes
import faulthandler
import hashlib
import ipaddress
import json
import os
import resource
import shutil
import signal
import subprocess
import sys

import pytest
from mbxtest import read_frames

import mbx
from mbx.ports import open_input, open_output
from mbx.runtime import App

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from benchmarks.captures import make_bulk_capture  # noqa: E402


def run_both(make, capture, tmp_path, **config):
    """Run ``make(tag)``'s NFs inline and pipelined over ``capture``; returns
    {deploy: (counters, output frames, App)}."""
    out = {}
    burst = config.pop("burst", 16)
    for deploy in ("inline", "pipelined"):
        cap = str(tmp_path / f"{deploy}.pcap")
        shutil.copyfile(capture, cap)
        inp, outp = open_input("pcap:" + cap), open_output("pcap:" + cap + ".out")
        app = App(make(deploy), deploy=deploy, **config)
        try:
            counters = app.run(inp, outp, burst=burst)
        finally:
            inp.close()
            outp.close()
        out[deploy] = (counters, read_frames(cap + ".out"), app)
    return out


class Sampler(mbx.NF):
    """Reads the first DATA_RDY of each flow and then unsubscribes that flow
    (mb_up_sub(ev, DATA_RDY, None): the stack may stop reassembling it); logs every
    event it gets, to a file (it runs in its own process when pipelined)."""

    def __init__(self, path, unsubscribe=True):
        super().__init__("sampler")
        self.fh = open(path, "w")
        self.unsubscribe = unsubscribe
        self.sub(mbx.DATA_RDY, self.on_data)
        self.sub(mbx.FLOW_TCP_TERMINATE, self.on_event)

    def on_data(self, ev):
        data = bytes(ev.read())
        self.fh.write(json.dumps([ev.type_name, ev.flow, ev.burst_pos, ev.stream_dir,
                                  ev.offset, ev.length,
                                  hashlib.sha256(data).hexdigest()]) + "\n")
        if self.unsubscribe:
            self.up_sub(mbx.DATA_RDY, ev.flow, None)

    def on_event(self, ev):
        self.fh.write(json.dumps([ev.type_name, ev.flow, ev.burst_pos, ev.publisher])
                      + "\n")

    def stop(self):
        self.fh.close()


def capture_of(name, example_pcap):
    # the example (HTTP-like, one exchange a connection) or HTTP-like connections of
    # several exchanges in small segments
    return example_pcap if name == "example" else make_bulk_capture(
        total_mb=4, segment="small")


@pytest.mark.parametrize("capture", ["example", "bulk"])
def test_up_sub_from_an_nf_process_reaches_the_stack(example_pcap, tmp_path, capture):
    capture = capture_of(capture, example_pcap)
    r = run_both(lambda tag: [Sampler(str(tmp_path / f"{tag}.log"))], capture,
                 tmp_path)
    (ci, fi, ai), (cp, fp, ap) = r["inline"], r["pipelined"]
    log = (tmp_path / "inline.log").read_text()
    assert log and log == (tmp_path / "pipelined.log").read_text()
    assert fi == fp
    # the stack built the same events and reassembled the same bytes
    assert ci["events"] == cp["events"]
    assert ci["tcp"] == cp["tcp"]
    assert ai.stack.pool.bytes_stored == ap.stack.pool.bytes_stored
    # ... fewer than when nobody unsubscribes: the stack followed the NF's request
    full = run_both(lambda tag: [Sampler(str(tmp_path / f"full.{tag}.log"), False)],
                    capture, tmp_path)
    for deploy in ("inline", "pipelined"):
        c, _, app = full[deploy]
        assert (c["events"]["DATA_RDY"]["published"]
                > cp["events"]["DATA_RDY"]["published"] > 0)
        assert app.stack.pool.bytes_stored > ap.stack.pool.bytes_stored


class Killer(mbx.NF):
    """Terminates every third connection on its client's first data segment."""

    def __init__(self):
        super().__init__("killer")
        self.port = self.pub(mbx.FLOW_TCP_TERMINATE)
        self.sub(mbx.PKT_TCP, self.on)
        self.n = 0
        self.done = set()

    def on(self, ev):
        if ev.dir == 0 and ev.payload_len and ev.flow not in self.done:
            self.done.add(ev.flow)
            self.n += 1
            if self.n % 3 == 0:
                self.publish(self.port, self.new_msg(mbx.FLOW_TCP_TERMINATE))


def test_terminate_from_an_nf_process(example_pcap, tmp_path):
    r = run_both(lambda tag: [Killer(), Sampler(str(tmp_path / f"{tag}.log"), False)],
                 example_pcap, tmp_path)
    (ci, fi, _), (cp, fp, _) = r["inline"], r["pipelined"]
    assert ci["tcp"]["rst_sent"] > 10
    assert fi == fp                     # the same RSTs, the same packets dropped
    for key in ("rst_sent", "dropped_terminated", "connections"):
        assert ci["tcp"][key] == cp["tcp"][key]
    # the later NF got the killer's TERMINATE events themselves, as inline
    def killed(tag):
        return [line for line in (tmp_path / f"{tag}.log").read_text().splitlines()
                if "FLOW/TCP/TERMINATE" in line and not line.endswith(", 0]")]

    assert len(killed("inline")) > 10
    assert killed("inline") == killed("pipelined")
    assert cp["pipeline"]["nfs"]["killer"]["state"] == "ok"


class Hasher(mbx.NF):
    """SHA-256 of every stream, from DATA_RDY reads; the digests go to a file."""

    def __init__(self, path):
        super().__init__("hasher")
        self.path = path
        self.sha = {}
        self.sub(mbx.DATA_RDY, self.on_data)

    def on_data(self, ev):
        # keyed by the stream's sender and receiver, as the dpkt reference is
        ends = [f"{ev.src_ip}:{ev.sport}", f"{ev.dst_ip}:{ev.dport}"]
        key = ">".join(ends if ev.dir == ev.stream_dir else ends[::-1])
        self.sha.setdefault(key, hashlib.sha256()).update(ev.read())

    def stop(self):
        with open(self.path, "w") as fh:
            json.dump({k: h.hexdigest() for k, h in self.sha.items()}, fh)


@pytest.mark.parametrize("capture", ["example", "bulk"])
def test_stream_reads_in_nf_processes(example_pcap, tmp_path, capture):
    r = run_both(lambda tag: [Hasher(str(tmp_path / f"{tag}.json"))],
                 capture_of(capture, example_pcap), tmp_path,
                 stream_memory=64 << 20)
    inline = json.loads((tmp_path / "inline.json").read_text())
    assert inline == json.loads((tmp_path / "pipelined.json").read_text())
    assert r["inline"][0]["tcp"]["gaps"] == r["pipelined"][0]["tcp"]["gaps"] == 0
    # and both are the bytes an independent dpkt reassembler finds in the capture
    assert inline == _reference_digests(capture_of(capture, example_pcap), capture)
    assert len(inline) > 10


def _reference_digests(path, capture):
    """{"sender>receiver": SHA-256 of the stream} from dpkt: the example capture sends
    every segment once, in order (IPv6 too); the bulk one reorders and retransmits,
    which benchmarks/reassemblers.py (IPv4, by sequence number) sorts out."""
    if capture == "example":
        from test_monitor import _expected_streams

        return {f"{ipaddress.ip_address(src)}:{sp}>{ipaddress.ip_address(dst)}:{dp}":
                hashlib.sha256(data).hexdigest()
                for (src, sp, dst, dp), data in _expected_streams(path).items()}
    from benchmarks.reassemblers import reassemble

    out = {}
    for key, rec in reassemble(path).items():
        cli, srv = key.split("-")
        for ends, n, sha in ((f"{cli}>{srv}", rec["c2s_len"], rec["c2s_sha256"]),
                             (f"{srv}>{cli}", rec["s2c_len"], rec["s2c_sha256"])):
            if n:
                out[ends] = sha
    return out


def test_stream_write_refused_in_nf_processes(example_pcap):
    class Rewriter(mbx.NF):
        def __init__(self):
            super().__init__("rewriter", writes=True)
            self.sub(mbx.DATA_RDY, self.on_data)

        def on_data(self, ev):
            ev.write(ev.offset, bytes(ev.length))

    inp, out = open_input("pcap:" + example_pcap), None
    try:
        with pytest.raises(mbx.MbxError, match="rewriter.*needs the inline deployment"):
            App([Rewriter()], deploy="pipelined").run(inp, out)
    finally:
        inp.close()


class Vandal(mbx.NF):
    """At its ``after``-th packet, writes into Stack Memory (the flow table, TCP
    state and streams the stack shares with NF processes) through ctypes."""

    def __init__(self, after):
        super().__init__("vandal")
        self.failure = "open"
        self.after = after
        self.n = 0
        self.sub(mbx.PKT, self.on_pkt)

    def on_pkt(self, ev):
        self.n += 1
        if self.n == self.after:
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))    # no core file
            faulthandler.disable()      # pytest's: no traceback dump for an expected fault
            for address, size in mbx._shm.mapped_read_only():
                ctypes.memset(address, 0xAB, min(size, 1 << 20))


def test_stack_memory_is_read_only_in_nf_processes(example_pcap, tmp_path):
    import mbx._shm  # noqa: F401 (the Vandal finds the mapping there)

    frames = read_frames(example_pcap)
    rec = tmp_path / "after.log"
    cap = str(tmp_path / "in.pcap")
    shutil.copyfile(example_pcap, cap)
    inp, out = open_input("pcap:" + cap), open_output("pcap:" + cap + ".out")
    try:
        app = App([Vandal(50), Sampler(str(rec), False)], deploy="pipelined")
        c = app.run(inp, out)
    finally:
        inp.close()
        out.close()
    p = c["pipeline"]["nfs"]
    assert p["vandal"]["state"] == "died"
    status = p["vandal"]["exit_status"]
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV
    assert p["sampler"]["state"] == "ok"
    # fail-open: every packet still leaves, and the stack's tables were untouched:
    # the later NF read the same streams as with no vandal at all
    assert len(read_frames(cap + ".out")) == len(frames) - c["fragments_held"]
    clean = tmp_path / "clean.log"
    inp = open_input("pcap:" + cap)
    try:
        App([Sampler(str(clean), False)], deploy="inline").run(inp, None)
    finally:
        inp.close()
    assert rec.read_text() == clean.read_text() != ""


def test_undeclared_publication_refused_in_nf_process(example_pcap):
    other = mbx.register_event_type("NFPROC_OTHER", fields=[("x", "u16")])

    class Liar(mbx.NF):
        def __init__(self):
            super().__init__("liar")
            self.port = self.pub(mbx.FLOW_TCP_TERMINATE)
            self.sub(mbx.PKT, self.on_pkt)

        def on_pkt(self, ev):
            self.publish(self.port, self.new_msg(other))

    inp = open_input("pcap:" + example_pcap)
    try:
        with pytest.raises(mbx.MbxError, match="liar.*cannot carry a NFPROC_OTHER"):
            App([Liar()], deploy="pipelined").run(inp, None)
    finally:
        inp.close()


class Churn(Sampler):
    """A Sampler that also changes a subscription four times on every TCP packet:
    more requests in one epoch than the NF's request ring holds."""

    def __init__(self, path):
        super().__init__(path)
        self.sub(mbx.PKT_TCP, self.on_tcp)

    def on_tcp(self, ev):
        for handler in (None, self.on_event, None, self.on_event):
            self.up_sub(mbx.FLOW_TCP_STATE, ev.flow, handler)


def test_more_requests_than_the_ring_holds(example_pcap, tmp_path):
    r = run_both(lambda tag: [Churn(str(tmp_path / f"{tag}.log"))], example_pcap,
                 tmp_path, burst=512)
    (ci, fi, _), (cp, fp, _) = r["inline"], r["pipelined"]
    ev = ci["events"]
    tcp = sum(v["delivered"] for k, v in ev.items() if k.startswith("PKT/TCP"))
    assert cp["pipeline"]["requests"] == 4 * tcp + ev["DATA_RDY"]["delivered"]
    assert cp["pipeline"]["requests_early"] > 0         # a ring filled up
    log = (tmp_path / "inline.log").read_text()
    assert "FLOW/TCP/STATE" in log and log == (tmp_path / "pipelined.log").read_text()
    assert ci["events"] == cp["events"] and ci["tcp"] == cp["tcp"] and fi == fp


class EndReader(mbx.NF):
    """Hashes each stream whole when its flow ends (FLOW/END: the stream is kept
    until the end of that burst, and retain keeps its bytes)."""

    def __init__(self, path):
        super().__init__("end_reader")
        self.path = path
        self.frontier = {}
        self.out = {}
        self.sub(mbx.DATA_RDY, self.on_data)
        self.sub(mbx.FLOW_END, self.on_end)

    def on_data(self, ev):
        self.frontier[(ev.flow, ev.stream_dir)] = ev.frontier

    def on_end(self, ev):
        cli, srv = f"{ev.cli_addr}:{ev.cli_port}", f"{ev.srv_addr}:{ev.srv_port}"
        for d in (0, 1):
            n = self.frontier.pop((ev.flow, d), 0)
            if n:
                try:
                    data = hashlib.sha256(ev.read(0, n, d)).hexdigest()
                except mbx.MbxError as exc:     # ended outside a burst (at shutdown)
                    data = str(exc)
                self.out[f"{cli}>{srv}" if d == 0 else f"{srv}>{cli}"] = data

    def stop(self):
        with open(self.path, "w") as fh:
            json.dump(self.out, fh)


def test_reading_an_ended_flows_stream_in_an_nf_process(example_pcap, tmp_path):
    run_both(lambda tag: [EndReader(str(tmp_path / f"{tag}.json"))], example_pcap,
             tmp_path, retain=1 << 20, idle_timeout=0.01)
    inline = json.loads((tmp_path / "inline.json").read_text())
    assert inline == json.loads((tmp_path / "pipelined.json").read_text())
    # the streams read at their flow's end are the bytes dpkt finds; those that end
    # at shutdown, outside any burst, say why they cannot be read
    want = _reference_digests(example_pcap, "example")
    read = {k: v for k, v in inline.items() if len(v) == 64}
    assert len(read) > 10 and all(want[k] == v for k, v in read.items())
    assert {v for k, v in inline.items() if k not in read} <= {
        "the event's flow has ended (or its connection closed): its stream is gone"}


def test_stream_readers_and_terminators_run_one_burst_in_flight(example_pcap, tmp_path):
    # Stream bytes and a TERMINATE's burst are state the stack moves on with when it
    # runs ahead: such apps default to one burst in flight, and refuse more.
    results = run_both(lambda tag: [Sampler(str(tmp_path / f"{tag}.log"))],
                       example_pcap, tmp_path)
    assert results["pipelined"][0]["pipeline"]["inflight"] == 1

    class Plain(mbx.NF):
        def __init__(self):
            super().__init__("plain")
            self.sub(mbx.PKT, lambda ev: None)

    inp = open_input("pcap:" + example_pcap)
    try:
        counters = App([Plain()], deploy="pipelined").run(inp, None)
    finally:
        inp.close()
    assert counters["pipeline"]["inflight"] == 4

    inp = open_input("pcap:" + example_pcap)
    try:
        with pytest.raises(mbx.AppError, match=r"NF sampler reads stream bytes.*"
                                               r"inflight=1\), not 4"):
            App([Sampler(str(tmp_path / "x.log"))], deploy="pipelined",
                inflight=4).run(inp, None)
    finally:
        inp.close()


# An NF as the guide has it: its file opened in start(), a header written there (still
# in the file object's buffer when the NF processes are forked), a row per flow; with
# CRASH, its process dies once, on the 200th packet, and is forked again.
CSV_NF = '''
import csv, os, mbx
class Rows(mbx.NF):
    def __init__(self):
        super().__init__("rows")
        self.n = 0
        self.restart, self.restart_backoff = 3, 0
        self.sub(mbx.PKT, self.on_pkt)
        self.sub(mbx.FLOW_END, self.on_end)
    def start(self):
        self.f = open(mbx.runtime.output_path("rows.csv"), "w", newline="")
        self.w = csv.writer(self.f)
        self.w.writerow(["flow"])
    def on_pkt(self, ev):
        self.n += 1
        if CRASH and self.n == 200 and not os.path.exists("crashed"):
            open("crashed", "w").close()
            raise RuntimeError("once")
    def on_end(self, ev):
        self.w.writerow([ev.cli_addr, ev.cli_port, ev.srv_addr, ev.srv_port, ev.first_ns])
    def stop(self):
        self.f.close()
nf = Rows()
'''


@pytest.mark.parametrize("how", [["--deploy", "pipelined"], ["--deploy", "pipelined", "crash"],
                                 ["--stacks", "2"]],
                         ids=["pipelined", "restarted", "stacks"])
def test_files_an_nf_writes_are_written_once(example_pcap, tmp_path, how):
    # The stack's process keeps its pre-fork copy of the NF, and with it the file
    # object's buffer, which it flushes as it exits, and a restarted NF process is
    # forked from it: the file must still come out as inline, each line once.
    def run(tag, args, crash=False):
        d = tmp_path / tag
        d.mkdir()
        (d / "rows.py").write_text(f"CRASH = {crash}\n" + CSV_NF)
        p = subprocess.run([sys.executable, "-m", "mbx.cli", "run", "rows.py", "--in",
                            f"pcap:{example_pcap}", "-q", *args], cwd=d,
                           capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        assert crash == (d / "crashed").exists()
        return [f.read_text().splitlines() for f in sorted(d.glob("rows.csv*"))]

    [inline] = run("inline", [])
    assert inline[0] == "flow" and len(inline) > 100
    files = run("other", [a for a in how if a != "crash"], crash="crash" in how)
    if "--stacks" in how:   # a file each, the flows split between them
        assert len(files) == 2
        assert all(lines[0] == "flow" for lines in files)
        assert sorted(row for lines in files for row in lines[1:]) == sorted(inline[1:])
    else:
        assert files == [inline]


PIPE_NF = """
import subprocess, mbx
class Pipey(mbx.NF):
    def __init__(self):
        super().__init__("pipey")
        self.sub(mbx.PKT, lambda ev: None)
    def start(self):
        self.p = subprocess.Popen(["true"], stdin=subprocess.PIPE)
        self.p.wait()
        self.p.stdin.write(b"header\\n")     # buffered; its reader is gone
nf = Pipey()
"""


def test_a_file_that_cannot_be_flushed_before_the_fork_is_the_nf_s_own(example_pcap,
                                                                         tmp_path):
    # Flushing every file before forking the NF processes met a pipe whose reader had
    # gone: the BrokenPipeError ended mbx with exit 141 and no word, as if its own
    # standard output had gone away; inline the same NF ran.  The file is the NF's.
    (tmp_path / "pipey.py").write_text(PIPE_NF)
    p = subprocess.run([sys.executable, "-m", "mbx.cli", "run", "pipey.py", "--in",
                        f"pcap:{example_pcap}", "--deploy", "pipelined"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("packets "), p.stdout
