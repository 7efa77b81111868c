"""The mbx command: the main job on the example capture, and clear errors."""
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time

import dpkt
import pytest
from mbxtest import read_frames

import mbx

MBX = [sys.executable, "-m", "mbx.cli"]
IDS = os.path.join(os.path.dirname(mbx.__file__), "examples", "ids.py")


def mbx_cmd(*args, cwd=None):
    return subprocess.run([*MBX, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_main_job_on_the_example(tmp_path):
    cap = tmp_path / "example.pcap"
    r = mbx_cmd("example-capture", str(cap))
    assert r.returncode == 0, r.stderr
    n = int(r.stdout.split()[1].replace(",", ""))
    events = tmp_path / "events.jsonl"
    counters = tmp_path / "counters.json"
    r = mbx_cmd("run", "flow_stats+logger", "--in", f"pcap:{cap}",
                "--set", f"logger.path={events}", "--json", str(counters))
    assert r.returncode == 0, r.stderr
    assert "packets" in r.stdout and "FLOW/STATS" in r.stdout
    c = json.loads(counters.read_text())
    assert c["packets"] == n
    lines = [json.loads(line) for line in events.read_text().splitlines()]
    kinds = {rec["type"] for rec in lines}
    assert kinds == {"FLOW/START", "FLOW/END", "FLOW/STATS"}
    stats = [rec for rec in lines if rec["type"] == "FLOW/STATS"]
    assert len(stats) == c["flows"]["created"]
    for rec in stats:
        assert rec["packets"] == rec["pkts_c2s"] + rec["pkts_s2c"] > 0
        assert rec["duration_ns"] == rec["last_ns"] - rec["first_ns"] >= 0
    out = tmp_path / "lb.pcap"
    r = mbx_cmd("run", "l4lb", "--in", f"pcap:{cap}", "--out", f"pcap:{out}",
                "--set", "l4lb.vip=198.18.3.1:80")
    assert r.returncode == 0, r.stderr
    from mbx.examples.capture import BACKENDS, VIP

    with open(out, "rb") as fh:                 # dpkt reads what the LB wrote
        sent = [dpkt.ethernet.Ethernet(buf) for _, buf in dpkt.pcap.Reader(fh)]
    assert len(sent) == c["packets"] - c["fragments_held"]
    to_vip = [f for f in sent if isinstance(f.data, dpkt.ip.IP)
              and isinstance(f.data.data, dpkt.tcp.TCP) and f.data.data.dport == VIP[1]
              and f.data.dst == socket.inet_aton(VIP[0])]
    assert not to_vip                           # every VIP packet went to a backend
    backends = {socket.inet_aton(a) for a, _ in BACKENDS}
    assert sum(isinstance(f.data, dpkt.ip.IP) and f.data.dst in backends
               for f in sent) > 100
    # the LB's report: every packet it rewrote, to a backend or back from one
    from_vip = sum(isinstance(f.data, dpkt.ip.IP) and isinstance(f.data.data, dpkt.tcp.TCP)
                   and f.data.src == socket.inet_aton(VIP[0]) for f in sent)
    to_backends = sum(isinstance(f.data, dpkt.ip.IP) and f.data.dst in backends
                      and isinstance(f.data.data, dpkt.tcp.TCP) and f.data.data.dport == 80
                      for f in sent)
    # ... and the connections it balanced: the SYNs it sent to a backend
    syns = sum(isinstance(f.data, dpkt.ip.IP) and f.data.dst in backends
               and isinstance(f.data.data, dpkt.tcp.TCP) and f.data.data.dport == 80
               and bool(f.data.data.flags & dpkt.tcp.TH_SYN) for f in sent)
    assert (f"  l4lb                 translated {from_vip + to_backends:,}, "
            f"connections {syns:,}, tracked 0") in r.stdout


def test_listing1_ids_runs_and_alerts(tmp_path):
    cap = tmp_path / "example.pcap"
    assert mbx_cmd("example-capture", str(cap)).returncode == 0
    alerts = tmp_path / "alerts.jsonl"
    r = mbx_cmd("run", f"{IDS}+logger", "--in", f"pcap:{cap}",
                "--set", f"logger.path={alerts}", "--set", "logger.types=IDS_ALERT")
    assert r.returncode == 0, r.stderr
    recs = [json.loads(line) for line in alerts.read_text().splitlines()]
    # two of the five SQL clients send an injection (see the example capture)
    assert len(recs) == 2 and {rec["rule"] for rec in recs} == {1}
    assert "DPI_DETECT" in r.stdout
    # on its own, as the paper's run loop
    r = subprocess.run([sys.executable, IDS, "--in", f"pcap:{cap}"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "IDS_ALERT" in r.stdout


def test_types_lists_flow_stats():
    # the built-in NFs' types are there before any NF is loaded
    r = mbx_cmd("types", "--fields")
    assert r.returncode == 0, r.stderr
    line = next(x for x in r.stdout.splitlines() if x.split()[0] == "FLOW/STATS")
    assert f"id={mbx.FLOW_STATS.id:#018x}" in line and "duration_ns:i64" in line


@pytest.mark.parametrize("deploy", [["--deploy", "inline"], ["--stacks", "2"],
                                    ["--deploy", "pipelined"]])
def test_subscriber_of_flow_stats_ahead_of_flow_stats(example_pcap, tmp_path, deploy):
    # An NF that subscribes to FLOW/STATS is loaded before flow_stats, which publishes
    # it: the type must exist already.  Inline it receives them; pipelined, a
    # publication may not go backward, and that is what the error says.
    nf = tmp_path / "stats_sub.py"
    nf.write_text("import mbx\n\ndef make():\n    nf = mbx.NF('stats_sub')\n"
                  "    nf.sub('FLOW/STATS', lambda ev: None)\n    return nf\n")
    counters = tmp_path / "c.json"
    r = mbx_cmd("run", f"{nf}+flow_stats", "--in", f"pcap:{example_pcap}", "-q",
                *deploy, "--json", str(counters))
    if "pipelined" in deploy:
        assert r.returncode == 2
        assert ("NF stats_sub subscribes to FLOW/STATS, which NF flow_stats after it "
                "publishes") in r.stderr
        return
    assert r.returncode == 0, r.stderr
    c = json.loads(counters.read_text())
    flows = c["nfs"]["flow_stats"]["report"]["flows"]
    assert c["nfs"]["stats_sub"]["events"] == flows == c["flows"]["created"] > 0


@pytest.mark.parametrize("deploy", [["--deploy", "inline"], ["--stacks", "2"],
                                    ["--deploy", "pipelined"]])
def test_json_dash_is_all_that_stdout_carries(example_pcap, tmp_path, deploy):
    # "--json -": a script pipes the counters to jq; the summary and whatever an NF
    # prints (from its own process, pipelined or a stack process of its own) go to
    # stderr, so stdout is one JSON document
    nf = tmp_path / "chatty.py"
    nf.write_text("import mbx\n\ndef make():\n    nf = mbx.NF('chatty')\n"
                  "    nf.sub('FLOW/START', lambda ev: print('chatty saw', ev.cli_port))\n"
                  "    return nf\n")
    r = mbx_cmd("run", f"{nf}+l2fwd", "--in", f"pcap:{example_pcap}", *deploy,
                "--json", "-")
    assert r.returncode == 0, r.stderr
    c = json.loads(r.stdout)
    assert c["packets"] > 0 and c["nfs"]["chatty"]["events"] == c["flows"]["created"]
    assert f"packets        {c['packets']:,}" in r.stderr
    assert r.stderr.count("chatty saw") == c["flows"]["created"]


@pytest.mark.parametrize("deploy", [[], ["--stacks", "2"]])
@pytest.mark.parametrize("path", ["-", "/dev/stdout"], ids=["dash", "dev-stdout"])
def test_a_logger_on_stdout_has_it_to_itself(example_pcap, deploy, path):
    # logger.path=- wrote the summary among its JSON lines: standard output is then
    # the Logger's alone, the summary on stderr (as for --json - and --out on stdout)
    r = mbx_cmd("run", "flow_stats+logger", "--in", f"pcap:{example_pcap}", *deploy,
                "--set", f"logger.path={path}")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    records = [json.loads(line) for line in lines]
    assert records and {rec["type"] for rec in records} >= {"FLOW/START", "FLOW/END"}
    assert f"events {len(records):,}" in r.stderr and "packets        " in r.stderr


@pytest.mark.parametrize("path", ["-", "/dev/stdout"], ids=["dash", "dev-stdout"])
@pytest.mark.parametrize("other", [["--out", "pcap:-"], ["--json", "-"]],
                         ids=["capture", "counters"])
def test_a_logger_on_stdout_shares_it_with_nothing(example_pcap, path, other):
    # logger.path=/dev/stdout with --out pcap:- wrote its JSON lines into the
    # capture, exit 0 (tcpdump: "unknown file format"); with "-" the log went to
    # stderr unasked.  Two writers of one stream are refused, naming both.
    r = mbx_cmd("run", "flow_stats+logger", "--in", f"pcap:{example_pcap}", *other,
                "--set", f"logger.path={path}")
    assert r.returncode == 2, r.stderr
    assert "NF logger writes standard output, and " in r.stderr, r.stderr
    assert f"{other[0]} " in r.stderr and "give one of them a file" in r.stderr
    assert r.stdout == ""


def test_json_at_a_standard_stream_is_written_through_it(example_pcap, tmp_path):
    # --json /dev/stdout > FILE opened the file anew, truncating it, and wrote the
    # counters over the summary; --json /dev/stderr 2> FILE lost what stderr said
    # before.  /dev/stdout (or the file stdout goes to) is --json -; another
    # standard stream is written through its descriptor.
    for name in ("/dev/stdout", str(tmp_path / "both.txt")):
        with open(tmp_path / "both.txt", "wb") as fh:
            p = subprocess.run([*MBX, "run", "l2fwd", "--in", f"pcap:{example_pcap}",
                                "--json", name], stdout=fh, stderr=subprocess.PIPE,
                               text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        c = json.loads((tmp_path / "both.txt").read_text())
        assert f"packets        {c['packets']:,}" in p.stderr
    with open(tmp_path / "err.txt", "wb") as fh:
        fh.write(b"before\n")
        fh.flush()
        p = subprocess.run([*MBX, "run", "l2fwd", "--in", f"pcap:{example_pcap}",
                            "--json", "/dev/stderr"], stdout=subprocess.PIPE,
                           stderr=fh, text=True, timeout=120)
    assert p.returncode == 0
    err = (tmp_path / "err.txt").read_text()
    assert err.startswith("before\n{") and json.loads(err[len("before\n"):])["packets"] > 0
    # a capture on standard output too (>> kept what was there)
    (tmp_path / "app.bin").write_bytes(b"kept")
    with open(tmp_path / "app.bin", "ab") as fh:
        p = subprocess.run([*MBX, "run", "l2fwd", "--in", f"pcap:{example_pcap}",
                            "--out", "pcap:/dev/stdout", "-q"], stdout=fh,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    data = (tmp_path / "app.bin").read_bytes()
    assert data[:4] == b"kept" and len(data) > 4 + 24


def test_stdout_is_claimed_once(example_pcap, tmp_path):
    # --json - and a capture output on standard output would interleave; several
    # stack processes' captures in one stream too (and /dev/stdout redirected to a
    # file must not become /dev/stdout.stack0)
    r = mbx_cmd("run", "l2fwd", "--in", f"pcap:{example_pcap}", "--out", "pcap:/dev/stdout",
                "--json", "-")
    assert r.returncode == 2 and r.stdout == ""
    assert "--json - and --out pcap:/dev/stdout: both would write standard output" in r.stderr
    # said with the name given (it is taken as --json -)
    r = mbx_cmd("run", "l2fwd", "--in", f"pcap:{example_pcap}", "--out", "pcap:/dev/stdout",
                "--json", "/dev/stdout")
    assert r.returncode == 2 and r.stdout == ""
    assert "--json /dev/stdout and --out pcap:/dev/stdout: both would write" in r.stderr
    # alone, the capture is all standard output carries; the summary goes to stderr
    with open(tmp_path / "one.pcap", "wb") as fh:
        p = subprocess.run([*MBX, "run", "l2fwd", "--in", f"pcap:{example_pcap}", "--out",
                            "pcap:/dev/stdout"], stdout=fh, stderr=subprocess.PIPE,
                           text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "packets        " in p.stderr
    r = mbx_cmd("run", "l2fwd", "--in", f"pcap:{example_pcap}", "--out",
                f"pcap:{tmp_path / 'file.pcap'}", "-q")
    assert r.returncode == 0, r.stderr
    records = []
    for name in ("one.pcap", "file.pcap"):
        with open(tmp_path / name, "rb") as fh:
            records.append([bytes(buf) for _, buf in dpkt.pcap.Reader(fh)])
    assert records[0] == records[1] and records[0]
    with open(tmp_path / "st.pcap", "wb") as fh:
        p = subprocess.run([*MBX, "run", "l2fwd", "--in", f"pcap:{example_pcap}", "--out",
                            "pcap:/dev/stdout", "--stacks", "2"], stdout=fh,
                           stderr=subprocess.PIPE, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    assert "each stack process writes a capture of its own" in p.stderr
    assert not [f for f in os.listdir("/dev") if f.startswith("stdout.stack")]


def test_flows_output_dash_is_stdout(example_pcap, tmp_path):
    a = mbx_cmd("flows", str(example_pcap))
    b = mbx_cmd("flows", str(example_pcap), "-o", "-", cwd=tmp_path)
    assert a.returncode == b.returncode == 0, b.stderr
    assert b.stdout == a.stdout and json.loads(b.stdout)["connections"]
    assert not (tmp_path / "-").exists()



def test_checksums_verify_on_the_command_line(tmp_path):
    # --checksums verify (mbx run and mbx flows) leaves a segment whose TCP checksum
    # is wrong out of the stream, says how many in the summary, and mbx flows warns
    # with what to do when the capture's host offloaded its checksums
    import hashlib

    from mbx.examples.capture import ether, tcp4, write_pcap

    cli, srv = ("198.18.0.1", 40000), ("198.18.0.2", 80)

    def seg(a, b, seq, ack, flags, data=b""):
        return ether(tcp4(a[0], b[0], a[1], b[1], data, seq=seq, ack=ack, flags=flags))

    frames = [seg(cli, srv, 100, 0, 0x02), seg(srv, cli, 500, 101, 0x12),
              seg(cli, srv, 101, 501, 0x10), seg(cli, srv, 101, 501, 0x18, b"GOOD1"),
              seg(cli, srv, 106, 501, 0x18, b"GOOD2")[:-5] + b"GOXD2",
              seg(srv, cli, 501, 106, 0x10), seg(cli, srv, 106, 501, 0x18, b"GOOD2"),
              seg(srv, cli, 501, 111, 0x10)]
    cap = tmp_path / "bad.pcap"
    write_pcap(str(cap), [(1.0 + k / 1000, f) for k, f in enumerate(frames)])
    digests = {}
    for how in ("ignore", "verify"):
        r = mbx_cmd("flows", str(cap), "--checksums", how)
        assert r.returncode == 0, r.stderr
        conn = next(iter(json.loads(r.stdout)["connections"].values()))
        digests[how] = conn["c2s_sha256"]
        assert ("1 segment with a wrong checksum left out" in r.stderr) == (how == "verify")
    assert digests["verify"] == hashlib.sha256(b"GOOD1GOOD2").hexdigest()
    assert digests["ignore"] == hashlib.sha256(b"GOOD1GOXD2").hexdigest()
    r = mbx_cmd("run", "flow_stats", "--in", f"pcap:{cap}", "--stack", "tcp",
                "--checksums", "verify")
    assert r.returncode == 0 and "bad checksums 1 (left out" in r.stdout, r.stdout + r.stderr


def test_vlans_left_out_of_the_flow_key_on_the_command_line_and_in_a_file(tmp_path):
    # Router on a stick: a connection's client side in VLAN 10, its server side in
    # VLAN 20.  By default two flows (and two half connections in mbx flows);
    # --no-vlan-in-flow-key, or [stack] vlan_in_flow_key = false, one.
    from mbx.examples.capture import tcp_connection, write_pcap

    cli, srv = ("198.18.0.1", 40000), ("198.19.0.1", 80)
    frames = [(ts, f[:12] + struct.pack("!HH", 0x8100, 10 if f[26:30] == bytes(
        [198, 18, 0, 1]) else 20) + f[12:]) for ts, f in tcp_connection(
            cli, srv, srv, b"GET /", b"page", 1.0, 100, 500)]
    cap = tmp_path / "stick.pcap"
    write_pcap(str(cap), frames)
    key = "198.18.0.1:40000-198.19.0.1:80"
    r = mbx_cmd("flows", str(cap))
    assert r.returncode == 0, r.stderr
    assert sorted(json.loads(r.stdout)["connections"]) == [key + " vlan 10",
                                                          key + " vlan 20"]
    r = mbx_cmd("flows", str(cap), "--no-vlan-in-flow-key")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["connections"][key]["handshake"]
    (tmp_path / "app.toml").write_text(
        '[stack]\nvlan_in_flow_key = false\n[[nf]]\nuse = "flow_stats"\n')
    for args, flows in ((["flow_stats"], 2), (["flow_stats", "--no-vlan-in-flow-key"], 1),
                        ([str(tmp_path / "app.toml")], 1)):
        js = tmp_path / "c.json"
        r = mbx_cmd("run", *args, "--in", f"pcap:{cap}", "-q", "--json", str(js))
        assert r.returncode == 0, r.stderr
        assert json.loads(js.read_text())["flows"]["created"] == flows, args


def test_pcap_dash_is_standard_output_out_and_refused_in(example_pcap, tmp_path):
    # --out pcap:- made a file named "-"; --in pcap:- and mbx flows - said "no such
    # file".  Out, it is standard output, as tcpdump -w - has it (the summary goes to
    # standard error); in, standard input cannot be mapped: said, with what to do.
    r = subprocess.run([*MBX, "run", "l2fwd", "--in", f"pcap:{example_pcap}", "--out",
                        "pcap:-"], capture_output=True, cwd=tmp_path, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "-").exists()
    out = tmp_path / "out.pcap"
    out.write_bytes(r.stdout)
    f = mbx_cmd("run", "l2fwd", "--in", f"pcap:{example_pcap}", "--out", "pcap:f.pcap",
                cwd=tmp_path)
    assert f.returncode == 0, f.stderr
    assert read_frames(str(out)) == read_frames(str(tmp_path / "f.pcap"))
    assert b"l2fwd" in r.stderr         # the summary
    want = ("pcap:-: standard input cannot be read: captures are read by mapping the "
            "file; save the stream to a file first")
    for args in (["flows", "-"], ["run", "l2fwd", "--in", "pcap:-"]):
        r = mbx_cmd(*args, cwd=tmp_path)
        assert r.returncode != 0 and want in r.stderr, r.stderr


IDS = os.path.join(os.path.dirname(mbx.__file__), "examples", "ids.py")


@pytest.mark.parametrize("args, message", [
    (["run", "l2fwd", "--in", "pcap:/nonexistent/x.pcap"], "no such file"),
    (["run", "nosuchnf", "--in", "pcap:x.pcap"], "unknown NF 'nosuchnf': use a built-in"),
    # as an unknown event type is, a misspelt built-in is named
    (["run", "flowstats", "--in", "pcap:x.pcap"],
     "unknown NF 'flowstats' (did you mean flow_stats?): use a built-in"),
    (["run", "l2fwd", "--in", "tcp:x"], "unknown port scheme 'tcp' in 'tcp:x'; known schemes"),
    (["run", "l2fwd", "--in", "pcp:demo.pcap"], "unknown port scheme 'pcp' in 'pcp:demo.pcap'"),
    (["run", "l2fwd", "--in", "eth0"], "unknown port spec 'eth0'; expected SCHEME:ARG"),
    (["run", "logger", "--in", "pcap:x.pcap", "--set", "logger"], "NF.KEY=VALUE"),
    (["run", "l2fwd", "--in", "pcap:x.pcap", "--set", "other.a=1"],
     "options given for other, which the application 'l2fwd' does not name (--set "
     "KEY.OPTION: KEY is an item of the chain, a file's without .py: l2fwd)"),
    (["run", "logger", "--in", "pcap:x.pcap", "--set", "logger.path=."],
     "NF logger: path '.' is a directory"),
    (["run", "logger", "--in", "pcap:x.pcap", "--set", "logger.path=no/such/dir.jsonl"],
     "NF logger: path 'no/such/dir.jsonl': directory"),
    # refused before the run, not once its work is done
    (["run", "l2fwd", "--in", "pcap:x.pcap", "--json", "no/such/c.json"],
     "--json: path 'no/such/c.json': directory"),
    (["run", "l2fwd", "--in", "pcap:x.pcap", "--prometheus", "99999"],
     "'99999' is not a TCP port (0-65535"),
    (["flows", "x.pcap", "--json", "-o", "."], "-o: path '.' is a directory"),
    # out-of-range options are named by argparse, not tracebacks from the stack
    (["run", "l2fwd", "--in", "pcap:x.pcap", "--burst", "0"], "--burst: '0': must be at least 1"),
    # a traceback (MemoryError in Batch) for a burst too large to allocate
    (["run", "l2fwd", "--in", "pcap:x.pcap", "--burst", "2147483648"],
     "--burst: '2147483648': must be at most 65,536"),
    (["run", "l2fwd", "--in", "pcap:x.pcap", "--stacks", "1000"],
     "--stacks: '1000': must be at most 256"),
    (["run", "l2fwd", "--in", "pcap:x.pcap", "--stacks", "0"], "--stacks: '0': must be"),
    (["run", "l2fwd", "--in", "pcap:x.pcap", "--flows", "999999999999"],
     "--flows: '999999999999': must be at most 268,435,456"),
    (["run", "l2fwd", "--in", "pcap:x.pcap", "--max-packets", "-5"], "--max-packets: '-5'"),
    (["run", "l2fwd", "--in", "pcap:x.pcap", "--idle-timeout", "nan"],
     "--idle-timeout: 'nan': seconds must be 0 or more"),
    (["run", "l2fwd", "--in", "pcap:x.pcap", "--duration", "soon"],
     "'soon' is not a number of seconds"),
    (["run", "logger", "--in", "pcap:x.pcap", "--set", "logger.path="],
     "NF logger: the path is empty"),
    # a ring past 2**24 entries once overflowed a 32-bit size: SIGSEGV
    (["run", "l2fwd", "--in", "pcap:x.pcap", "--deploy", "pipelined", "--ring-size",
      "1073741824"], "--ring-size: '1073741824': must be a power of two from 2 to 16,777,216"),
    (["run", ":flow_stats", "--in", "pcap:x.pcap"], "expected module:attribute"),
    (["run", ".foo:bar", "--in", "pcap:x.pcap"], "expected module:attribute"),
    (["example-capture", "x.pcap", "--flows", "30000"], "must be at most 20,000"),
    (["example-capture", "."], "example-capture: path '.' is a directory, not a file"),
    (["example-capture", "/nonexistent/x.pcap"], "directory /nonexistent does not exist"),
    (["flows", ""], "mbx flows: name a capture file"),
    (["flows", "x.pcap", "--stream-window", "0"], "--stream-window: '0': must be at least 1"),
    # a stream maps at most 65,535 chunks of 2 KiB: past that the stack refused it
    (["flows", "x.pcap", "--stream-window", "128"],
     "--stream-window: '128': must be at most 127"),
    (["run", "l2fwd", "--in", "pcap:x.pcap", "--inflight", "2", "--ring-full", "drop"],
     "--inflight, --ring-full: for --deploy pipelined only (this run is inline)"),
    (["run", "l2fwd", "--in", "pcap:x.pcap", "--prometheus-linger", "5"],
     "--prometheus-linger: for --prometheus only"),
    (["run", "l2fwd", "--in", "afpacket:lo?ring=v3&retire_ms=0"],
     "retire_ms must be at least 1 with ring v3"),
    (["run", "l2fwd", "--in", "afpacket:lo?fanout_mode=bogus"],
     "fanout_mode 'bogus' is not one of"),
    (["run", "l2fwd", "--in", "pcap:x.pcap", "--deploy", "pipelined", "--ring-size", "3"],
     "argument --ring-size: '3': must be a power of two"),
    # it ran, and its replies reached stacks without their translation, uncounted
    (["run", "l4lb", "--in", "pcap:x.pcap", "--stacks", "2"],
     "NF l4lb rewrites addresses, so the replies of a flow hash elsewhere than its "
     "requests"),
    # a type only a later NF file defines: said so (the line named no NF)
    (["run", "logger+" + IDS, "--in", "pcap:x.pcap", "--set", "logger.types=IDS_ALERT"],
     "NF logger: unknown event type 'IDS_ALERT' (known: PKT, FLOW, "),
    (["run", "logger+" + IDS, "--in", "pcap:x.pcap", "--set", "logger.types=IDS_ALERT"],
     "FLOW/STATS; a type an NF file defines exists once that file is loaded: list the "
     "file before the NF that uses the type)"),
    # a typo has its close matches, and no such hint
    (["run", "logger", "--in", "pcap:x.pcap", "--set", "logger.types=FLOWW"],
     "NF logger: unknown event type 'FLOWW' (did you mean FLOW, FLOW/TCP, FLOW/END?)\n"),
])
def test_clear_errors(tmp_path, args, message):
    r = mbx_cmd(*args, cwd=tmp_path)
    assert r.returncode == 2
    assert message in r.stderr, r.stderr


def test_bad_capture_and_bad_nf_files(tmp_path):
    junk = tmp_path / "junk.pcap"
    junk.write_bytes(b"this is not a capture at all")
    r = mbx_cmd("run", "l2fwd", "--in", f"pcap:{junk}")
    assert r.returncode == 2 and "junk.pcap" in r.stderr
    nf = tmp_path / "typo.py"
    nf.write_text("import mbx\nmbx.mb_sub('FLOW/STRAT', print)\n")
    r = mbx_cmd("run", str(nf), "--in", f"pcap:{junk}")
    assert r.returncode == 2
    assert "typo.py, line 2" in r.stderr and "FLOW/STRAT" in r.stderr
    # (FLOW/STATS, built in too, is as close a match)
    assert re.search(r"did you mean [^)]*FLOW/START,", r.stderr)
    nf.write_text("import mbx\nmbx.mb_sub('PKT', 42)\n")
    r = mbx_cmd("run", str(nf), "--in", f"pcap:{junk}")
    assert r.returncode == 2 and "not callable" in r.stderr
    # a factory that fails: its error and where, not a traceback through mbx
    nf.write_text("import mbx\n\ndef make():\n    raise RuntimeError('no config')\n")
    r = mbx_cmd("run", str(nf), "--in", f"pcap:{junk}")
    assert r.returncode == 2, r.stderr
    assert "make(): RuntimeError: no config (at typo.py, line 4)" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_pipelined_backward_publication_names_the_nf_table_to_move(tmp_path):
    # the IDS before the DPI it listens to: the error says which [[nf]] to move
    import shutil

    shutil.copy(IDS, tmp_path / "ids.py")
    app = tmp_path / "rev.toml"
    app.write_text('[app]\nname = "rev"\n\n[[nf]]\nuse = "ids.py"\nname = "ids"\n\n'
                   '[[nf]]\nuse = "ids.py"\nname = "dpi"\n')
    cap = tmp_path / "ex.pcap"
    assert mbx_cmd("example-capture", str(cap)).returncode == 0
    r = mbx_cmd("run", str(app), "--in", f"pcap:{cap}", "--deploy", "pipelined")
    assert r.returncode == 2
    assert (f"{app}:4: pipelined deployment: NF ids subscribes to DPI_DETECT, "
            "which NF dpi after it publishes") in r.stderr
    assert mbx_cmd("run", str(app), "--in", f"pcap:{cap}", "-q").returncode == 0


def test_an_application_file_that_is_a_directory_is_named(tmp_path):
    (tmp_path / "d.toml").mkdir()
    r = mbx_cmd("check", "d.toml", cwd=tmp_path)
    assert r.returncode == 2 and "application file d.toml: a directory" in r.stderr


def test_run_checks_a_chain_as_check_does(tmp_path, example_pcap):
    # A subscription nothing publishes: mbx check refused it, mbx run ran on and the
    # NF never got an event.
    nf = tmp_path / "orphan.py"
    nf.write_text("import mbx\nT = mbx.register_event_type('FLOW/MYT')\n"
                  "nf = mbx.NF('orphan')\nnf.sub(T, print)\n")
    for cmd in ("check", "run"):
        r = mbx_cmd(cmd, str(nf), *(["--in", f"pcap:{example_pcap}"] if cmd == "run"
                                    else []))
        assert r.returncode == 2, (cmd, r.stderr)
        assert "NF orphan subscribes to FLOW/MYT, which nothing" in r.stderr, cmd


@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
def test_a_handler_error_names_the_nf_the_event_and_the_line(tmp_path, example_pcap,
                                                             deploy):
    nf = tmp_path / "boom.py"
    nf.write_text("import mbx\nnf = mbx.NF('boom')\n\ndef on_pkt(ev):\n"
                  "    return {}[ev.dport]\n\nnf.sub(mbx.PKT, on_pkt)\n")
    r = mbx_cmd("run", str(nf), "--in", f"pcap:{example_pcap}", "--deploy", deploy)
    assert r.returncode == 2, r.stderr
    assert "NF boom: on_pkt raised KeyError on a PKT event" in r.stderr
    assert "(at boom.py, line 5)" in r.stderr


def test_docs_show_listing1_as_it_runs():
    import pathlib

    doc = (pathlib.Path(__file__).parent.parent / "docs" / "listing1.md").read_text()
    code = doc.split("```python\n", 1)[1].rsplit("```", 1)[0]
    assert code == pathlib.Path(IDS).read_text()


def test_an_nf_file_may_bind_a_list_of_nfs(tmp_path, example_pcap):
    # it said "defines no NF"; a module:attribute could name a list already
    nf_file = tmp_path / "pair.py"
    nf_file.write_text("import mbx\n"
                       "chain = [mbx.NF('first'), mbx.NF('second')]\n"
                       "for nf in chain:\n"
                       "    nf.sub(mbx.PKT, lambda ev: None)\n"
                       "extra = chain[0]           # bound twice: listed once\n")
    r = mbx_cmd("check", str(nf_file), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1. NF first" in r.stdout and "2. NF second" in r.stdout
    assert "3. NF" not in r.stdout


def test_one_nf_of_a_file_of_several_by_its_name(tmp_path, example_pcap):
    # "ids.py:dpi" was read as module ids.py, attribute dpi: "No module named"
    r = mbx_cmd("check", f"{IDS}:ids+{IDS}:logger_of_nothing", cwd=tmp_path)
    assert r.returncode == 2
    assert f"NF file {IDS} defines no NF named 'logger_of_nothing' (it defines dpi, ids)" \
        in r.stderr
    r = mbx_cmd("check", f"{IDS}:dpi", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "1. NF dpi" in r.stdout and "2. NF" not in r.stdout
    r = mbx_cmd("run", f"{IDS}:dpi+{IDS}:ids", "--in", f"pcap:{example_pcap}", "-q",
                "--json", str(tmp_path / "c.json"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    nfs = json.loads((tmp_path / "c.json").read_text())["nfs"]
    assert list(nfs) == ["dpi", "ids"] and nfs["ids"]["events"] > 0


@pytest.mark.parametrize("deploy", [["--deploy", "inline"], ["--deploy", "pipelined"],
                                    ["--stacks", "2"]])
def test_duration_time_boxes_a_capture_and_says_so(tmp_path, example_pcap, deploy):
    # --duration on a capture cut the run short in silence: exit 0, "stopped": null
    # and the flows said to have "ended with the input", as if all of it was read.
    slow = tmp_path / "slow.py"
    slow.write_text("import time, mbx\n"
                    "def make():\n"
                    "    nf = mbx.NF('slow')\n"
                    "    nf.sub(mbx.PKT, lambda ev: time.sleep(0.002))\n"
                    "    return nf\n")
    counters = tmp_path / "c.json"
    r = mbx_cmd("run", str(slow), "--in", f"pcap:{example_pcap}", "--duration", "0.5",
                *deploy, "--json", str(counters))
    assert r.returncode == 0, r.stderr
    c = json.loads(counters.read_text())
    whole = sum(1 for _ in read_frames(example_pcap))
    assert c["stopped"] == "duration" and 0 < c["packets"] < whole
    assert "stopped        by duration after" in r.stdout
    assert f"ended at the stop {c['flows']['shutdown']:,}" in r.stdout
    assert "ended with the input" not in r.stdout
    # a capture read to its end within the duration was not cut short
    r = mbx_cmd("run", "l2fwd", "--in", f"pcap:{example_pcap}", "--duration", "600",
                *deploy, "--json", str(counters))
    assert r.returncode == 0, r.stderr
    c = json.loads(counters.read_text())
    assert c["stopped"] is None and c["packets"] == whole
    assert "ended with the input" in r.stdout


def test_signals_while_a_run_ends_lose_neither_summary_nor_counters(tmp_path):
    # The handler that turns SIGINT into "stop between bursts" was put back before
    # the output was closed and the summary and --json written: a second SIGINT then
    # (a double Ctrl-C, or `timeout` signalling the process and then its group)
    # ended mbx with "interrupted", no summary and no counters file.
    cap = tmp_path / "big.pcap"
    assert mbx_cmd("example-capture", str(cap), "--flows", "4000").returncode == 0
    slow = tmp_path / "slow.py"
    slow.write_text("import time, mbx\n"
                    "def make():\n"
                    "    nf = mbx.NF('slow')\n"
                    "    nf.sub(mbx.PKT, lambda ev: time.sleep(0.0005))\n"
                    "    return nf\n")
    counters = tmp_path / "c.json"
    p = subprocess.Popen([*MBX, "run", str(slow), "--in", f"pcap:{cap}", "--out",
                          f"pcap:{tmp_path / 'out.pcap'}", "--json", str(counters)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         cwd=tmp_path)
    time.sleep(3)                       # well into the run
    assert p.poll() is None, p.communicate()
    deadline = time.monotonic() + 30
    # again and again until its counters are written (after that, its end is its own)
    while p.poll() is None and not counters.exists() and time.monotonic() < deadline:
        p.send_signal(signal.SIGINT)
        time.sleep(0.002)
    out, err = p.communicate(timeout=30)
    assert p.returncode == 0, err
    assert "interrupted" not in err
    assert "packets" in out
    assert json.loads(counters.read_text())["packets"] > 0


# The console script as pip writes it (load the entry point, call it, exit with its
# return), timed from where code of mbx's can first catch a signal.  Done before:
# an editable install's rebuild, run by meson-python's loader when the package is
# first looked up, before any code of mbx's; and loading the entry point's module, if
# it is one of its own (its first line is that first chance), not in the package.
_CONSOLE_SCRIPT = """\
import importlib, importlib.util, sys
from importlib.metadata import entry_points
importlib.util.find_spec("mbx")
(ep,) = entry_points(group="console_scripts", name="mbx")
if ep.module.partition(".")[0] != "mbx":
    importlib.import_module(ep.module)
assert "mbx" not in sys.modules
sys.argv[0] = "mbx"
print("importing", flush=True)
sys.exit(ep.load()())
"""


@pytest.mark.parametrize("delay", [0.0, 0.005, 0.01, 0.02, 0.04, 0.2])
def test_ctrl_c_while_the_command_starts_is_a_clean_stop(tmp_path, delay):
    """A SIGINT while the command imports mbx (the Cython extensions, the runtime)
    or parses its arguments ends it as one during its work does: "interrupted" and
    130, no KeyboardInterrupt traceback.  The entry point was in mbx.cli, which only
    runs once the package has been imported."""
    # The capture is a FIFO no one reads, so the command waits in its open() until
    # the signal comes: it cannot end first, however long this process is held up
    # under load (a run that did read as "the signal was lost").
    fifo = tmp_path / "x.pcap"
    os.mkfifo(fifo)
    p = subprocess.Popen([sys.executable, "-c", _CONSOLE_SCRIPT, "example-capture",
                          str(fifo), "--flows", "5"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "importing\n"
        time.sleep(delay)
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
    assert "Traceback" not in err, err
    assert (p.returncode, err, out) == (130, "mbx: interrupted\n", "")


# Put before the console script: a SIGINT just as an extension of mbx's, while it is
# imported, registers its memoryview types with collections.abc.Sequence (inside a
# bare `except: pass` that Cython generates).  The hook says so on stdout first, so
# a Cython that no longer registers them fails the test instead of passing it idle.
_SIGINT_IN_ABC_REGISTER = """\
import abc, collections.abc, os, signal
Seq = collections.abc.Sequence
def register(cls):
    if cls.__module__.startswith("mbx."):
        del Seq.register
        print("registering", cls.__module__, flush=True)
        os.kill(os.getpid(), signal.SIGINT)
    return abc.ABCMeta.register(Seq, cls)
Seq.register = register
"""


def test_ctrl_c_while_an_extension_registers_its_types_is_a_clean_stop(tmp_path):
    # The KeyboardInterrupt raised there (seen once under load, at delay 0 above) was
    # swallowed by that except: the command wrote its capture and exited 0.
    r = subprocess.run([sys.executable, "-c", _SIGINT_IN_ABC_REGISTER + _CONSOLE_SCRIPT,
                        "example-capture", str(tmp_path / "x.pcap"), "--flows", "5"],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (130, "mbx: interrupted\n"), r.stdout
    assert re.fullmatch(r"importing\nregistering mbx\._\w+\n", r.stdout), r.stdout
    assert not (tmp_path / "x.pcap").exists()


def test_ctrl_c_between_the_entry_point_s_import_and_its_call_is_a_clean_stop():
    # The console script imports the entry point's module, then calls main(): a
    # SIGINT between the two (seen once in a full suite, at delay 0 above) raised
    # KeyboardInterrupt where no except of mbx's could catch it: a traceback.
    script = ("import os, signal, time\nimport _mbx_main\n"
              "os.kill(os.getpid(), signal.SIGINT)\ntime.sleep(5)\n_mbx_main.main()\n")
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=60)
    assert (r.returncode, r.stderr, r.stdout) == (130, "mbx: interrupted\n", "")


def test_an_output_that_takes_a_bridge_s_place_is_warned_of():
    from mbx.ports import bridge_output_note

    # the bridge forwarded nothing, and the summary still said frames were sent
    note = bridge_output_note("afpacket:m-cli,m-srv", "pcap:x.pcap")
    assert note == ("--out pcap:x.pcap: the bridge afpacket:m-cli,m-srv forwards "
                    "nothing between its interfaces; what passes goes to pcap:x.pcap "
                    "only (leave --out out to forward)")
    assert bridge_output_note("dpdk:net_ring0+net_ring1", "afpacket:lo")
    for inp, out in (("afpacket:a,b", None), ("afpacket:a,b", "afpacket:a,b"),
                     ("afpacket:a", "pcap:x.pcap"), ("pcap:y.pcap", "pcap:x.pcap")):
        assert bridge_output_note(inp, out) is None


def unaccounted(c):
    """Packets read that the counters put nowhere: none, in any run."""
    out_port = (c.get("ports") or {}).get("out") or {}
    return c["packets"] - (
        c["sent"] + c["dropped_by_nf"] + c["dropped_malformed"] + c["dropped_on_error"]
        + c["fragments_held"] + c["dropped_fragments"]
        + (c.get("pipeline") or {}).get("ring_dropped_pkts", 0)
        + (out_port.get("tx_dropped") or 0))


@pytest.mark.parametrize("deploy", ["inline", "pipelined", "stacks"])
def test_a_run_ended_by_an_error_still_reports_what_it_did(tmp_path, example_pcap,
                                                           deploy):
    # The error was all: no summary, no --json, the counters of every packet before
    # it lost (hours of a live run, for an NF that fails late).
    nf_file = tmp_path / "late.py"
    nf_file.write_text("import mbx\n"
                       "def make():\n"
                       "    nf = mbx.NF('late')\n"
                       "    seen = [0]\n"
                       "    def on(ev):\n"
                       "        seen[0] += 1\n"
                       "        if seen[0] == 500:\n"
                       "            raise ValueError('late failure')\n"
                       "    nf.sub(mbx.PKT, on)\n"
                       "    return nf\n")
    counters = tmp_path / "c.json"
    how = ("--stacks", "2") if deploy == "stacks" else ("--deploy", deploy)
    r = mbx_cmd("run", str(nf_file), "--in", f"pcap:{example_pcap}", "--json",
                str(counters), "--burst", "16", "--out", f"pcap:{tmp_path / 'out.pcap'}",
                "--stats", *how, cwd=tmp_path)
    assert r.returncode == 2
    assert "raised ValueError on a PKT event: late failure" in r.stderr
    assert r.stdout.startswith("packets")
    written = json.loads(counters.read_text())
    assert "late failure" in written["error"]
    assert 500 <= written["packets"] < len(read_frames(example_pcap))
    # The bursts in flight when the NF raised were neither sent nor dropped: every
    # packet read must be accounted for, and the summary and --stats say so.
    assert written["dropped_on_error"] > 0
    assert unaccounted(written) == 0, written
    lost = f"{written['dropped_on_error']:,}"
    assert f"in flight when the run failed {lost} " in r.stdout
    assert f"  {lost} packets in flight when the run failed were dropped" in r.stdout
    if deploy == "stacks":
        # the stack whose NF failed first at its 500th packet stopped the other, which
        # may have failed at its own 500th by then, or not
        assert 500 <= written["nfs"]["late"]["events"] <= 1000
        return
    assert written["nfs"]["late"]["events"] == 500
    if deploy == "pipelined":       # the NF process's own account, from its mapping
        assert written["pipeline"]["nfs"]["late"]["state"] == "failed"


def test_a_burst_the_stack_pass_had_not_finished_counts_when_an_nf_fails(tmp_path,
                                                                        example_pcap):
    # Event Memory of 256 messages takes a burst of 1024 in several rounds: an NF
    # that raises in an early one leaves packets the stack never reached.  They
    # were read all the same: they count as read and as dropped on the error.
    from mbx.ports import open_input, open_output
    from mbx.runtime import App

    nf = mbx.NF("late")
    seen = [0]

    def on(ev):
        seen[0] += 1
        if seen[0] == 100:
            raise ValueError("late failure")

    nf.sub(mbx.PKT, on)
    app = App([nf], msg_capacity=256)
    inp = open_input(f"pcap:{example_pcap}")
    out = open_output(f"pcap:{tmp_path / 'out.pcap'}")
    with inp, out, pytest.raises(mbx.NFError, match="late failure"):
        app.run(inp, out, burst=1024)
    c = app.counters()
    assert c["packets"] == inp.rx_pkts == 1024
    assert c["sent"] == 0 and c["dropped_on_error"] == 1024 - c["dropped_malformed"]
    assert c["bytes"] == inp.rx_bytes


def test_set_reaches_an_nf_named_by_module_path(tmp_path):
    # --set NF.KEY=VALUE splits at the last dot: the NF may be module.path:attr
    cap = tmp_path / "example.pcap"
    assert mbx_cmd("example-capture", str(cap)).returncode == 0
    events = tmp_path / "events.jsonl"
    r = mbx_cmd("run", "mbx.nfs.logger:make", "--in", f"pcap:{cap}",
                "--set", f"mbx.nfs.logger:make.path={events}")
    assert r.returncode == 0, r.stderr
    assert events.read_text().count("FLOW/START") > 0


def test_an_nf_that_cannot_start_ends_the_run_and_stops_those_started(tmp_path,
                                                                     example_pcap):
    from mbx.nfs.logger import Logger
    from mbx.ports import open_input
    from mbx.runtime import App

    class Tracked(mbx.NF):
        stopped = False

        def stop(self):
            self.stopped = True

    first = Tracked("first")
    first.sub(mbx.PKT, lambda ev: None)
    log = tmp_path / "gone" / "events.jsonl"
    log.parent.mkdir()
    logger = Logger("logger", str(log))
    log.parent.rmdir()              # the directory was there when the NF was built
    inp = open_input(f"pcap:{example_pcap}")
    try:
        with pytest.raises(mbx.MbxError, match="NF logger: cannot write .*events.jsonl"):
            App([first, logger]).run(inp)
    finally:
        inp.close()
    assert first.stopped


@pytest.mark.parametrize("options, message", [
    (dict(idle_timeout=-1.0), "stack options: idle_timeout must be"),
    # numbers past their C fields, and msg_capacity's range (once tracebacks)
    (dict(flow_capacity=-5), "stack options: flow_capacity must be a whole number "
                             "from 1 to 268,435,456, not -5"),
    (dict(stream_memory=-1), "stack options: stream_memory must be a whole number"),
    (dict(msg_capacity=0), "stack options: msg_capacity must be a whole number from "
                           "64 to 4,294,967,295, not 0"),
    (dict(msg_capacity=96), "stack options: msg_capacity must be a power of two, not "
                            "96"),
    # named as the App's keyword (the flow table's own error says "policy"), and
    # refused inline as pipelined
    (dict(flow_policy="x"), "stack options: flow_policy must be one of evict, refuse"),
    (dict(malformed="x"), "stack options: malformed must be one of"),
    (dict(vlan_in_flow_key="no"), "stack options: vlan_in_flow_key must be true or "
                                  "false, not 'no'"),
    (dict(ring_full="x"), "ring_full must be 'stall' or 'drop', not 'x'"),
])
def test_stack_option_out_of_range_is_an_app_error(example_pcap, options, message):
    from mbx.ports import open_input
    from mbx.runtime import App

    inp = open_input(f"pcap:{example_pcap}")
    try:
        with pytest.raises(mbx.AppError, match=message):
            App([], **options).run(inp)
    finally:
        inp.close()


def test_a_capture_cut_short_is_reported(tmp_path, example_pcap):
    # A writer killed mid-record leaves a partial last record: the run ends normally
    # and says so, in the summary, the JSON counters and mbx flows' warnings.
    data = open(example_pcap, "rb").read()
    cut = tmp_path / "cut.pcap"
    cut.write_bytes(data[:-7])
    counters = tmp_path / "c.json"
    r = mbx_cmd("run", "flow_stats", "--in", f"pcap:{cut}", "--json", str(counters))
    assert r.returncode == 0, r.stderr
    assert "the capture ends in a record cut short" in r.stdout
    assert json.loads(counters.read_text())["ports"]["in"]["truncated"] == 1
    r = mbx_cmd("flows", str(cut), "--json", "-o", str(tmp_path / "f.json"))
    assert r.returncode == 0, r.stderr
    assert "warning: the capture ends in a record cut short" in r.stderr
    r = mbx_cmd("run", "flow_stats", "--in", f"pcap:{example_pcap}")
    assert "cut short" not in r.stdout


def retagged(example_pcap, path, depth):
    """The example capture with ``depth`` VLAN tags in every frame (QinQ outermost)."""
    tags = b"".join(struct.pack("!HH", 0x88A8 if i == 0 else 0x8100, 10 + i)
                    for i in range(depth))
    with open(example_pcap, "rb") as fh, open(path, "wb") as out:
        r, w = dpkt.pcap.Reader(fh), dpkt.pcap.Writer(out, nano=True)
        for ts, buf in r:
            w.writepkt(bytes(buf[:12]) + tags + bytes(buf[12:]), ts=ts)


def test_a_deep_vlan_stack_is_read_through_and_a_deeper_one_said(tmp_path, example_pcap):
    # Three tags or more made every frame not_ip: mbx flows printed no connection,
    # no warning, exit 0, where tshark found them all.
    def untagged(connections):
        # the keys without their VLAN ids (the flow key's outer two, which the
        # tags added change: " vlan 10,11" in every key, not the example's own)
        return {re.sub(r" vlan [\d,]+", "", k): v for k, v in connections.items()}

    r = mbx_cmd("flows", example_pcap, "--json")
    want = json.loads(r.stdout)["connections"]
    assert want
    retagged(example_pcap, tmp_path / "t3.pcap", 3)
    r = mbx_cmd("flows", str(tmp_path / "t3.pcap"), "--json")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr
    got = json.loads(r.stdout)["connections"]
    assert all(" vlan 10,11" in k for k in got)
    assert untagged(got) == untagged(want)
    retagged(example_pcap, tmp_path / "t9.pcap", 9)
    r = mbx_cmd("flows", str(tmp_path / "t9.pcap"), "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["connections"] == {}
    assert re.search(r"warning: [\d,]+ frames behind more than 8 VLAN tags not looked at",
                     r.stderr), r.stderr
    r = mbx_cmd("run", "l2fwd", "--in", f"pcap:{tmp_path / 't9.pcap'}")
    assert r.returncode == 0, r.stderr
    assert re.search(r"parse +too_many_vlan_tags [\d,]+\n", r.stdout), r.stdout


def _snaplen_cut(src, dst, snap):
    """``src`` rewritten as a capture with snaplen ``snap`` would have taken it: each
    record cut to ``snap`` bytes, its length on the wire kept; its frames."""
    with open(src, "rb") as fh:
        frames = [(ts, bytes(buf)) for ts, buf in dpkt.pcap.Reader(fh)]
    with open(dst, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, snap, 1))
        for ts, buf in frames:
            sec, usec = divmod(round(ts * 1e6), 10**6)
            out.write(struct.pack("<IIII", sec, usec, min(len(buf), snap), len(buf))
                      + buf[:snap])
    return frames


# 58: 4 payload bytes of an untagged IPv4 segment; 70: an IPv6 TCP header cut; 80 and
# 96: more payload, tagged IPv6 headers whole
@pytest.mark.parametrize("snap", [58, 70, 80, 96])
def test_segments_cut_by_snaplen_are_warned_of_once(tmp_path, example_pcap, snap):
    # Stream lengths and digests of a capture cut by its snaplen covered the
    # captured bytes only, without a word.  Then the bytes cut off each segment were
    # told again as holes the capture missed (the ACK skipped them) or as bytes held
    # behind a hole at the end: a clean capture read as a lossy one.
    cut = tmp_path / f"snap{snap}.pcap"
    frames = _snaplen_cut(example_pcap, cut, snap)
    from mbx._parse import parse

    n = sum(1 for _, buf in frames
            if (f := parse(buf[:snap], wirelen=len(buf)))["l4_proto"] == 6
            and (f["status"] == "ok" or f["opts_cut"]) and "truncated" in f["flag_names"])
    assert n
    r = mbx_cmd("flows", str(cut), "--json")
    assert r.returncode == 0, r.stderr
    assert f"warning: {n} segments cut by the capture's snaplen; stream lengths and " \
        "digests cover the captured bytes only" in r.stderr, r.stderr
    assert "the capture missed" not in r.stderr, r.stderr
    assert "behind a hole" not in r.stderr, r.stderr
    # packets whose fixed TCP header the snaplen cut (at 70 every IPv6 one) are not
    # tracked: their connections are missing, which a warning must say
    header_cut = sum(1 for _, buf in frames
                     if (f := parse(buf[:snap], wirelen=len(buf)))["l4_proto"] == 6
                     and f["status"] == "trunc_l4" and not f["opts_cut"])
    if header_cut:
        said = re.search(r"warning: (\d+) TCP packets not tracked: their TCP header was "
                         r"cut short", r.stderr)
        assert said, r.stderr
        # at 58 a tagged IPv6 frame's ports are cut too: it keys no flow and never
        # reaches the Monitor, which counts the others
        assert int(said[1]) == header_cut or snap == 58 and 0 < int(said[1]) < header_cut
        v6 = [c for c in json.loads(r.stdout)["connections"] if c.startswith("[")]
        assert v6 == [] or snap != 70, v6
    else:
        assert "not tracked" not in r.stderr, r.stderr
    # the snaplen is still a reason for --strict to fail
    assert mbx_cmd("flows", str(cut), "--strict").returncode == 3
    r = mbx_cmd("flows", example_pcap, "--json")
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


def test_the_input_capture_is_never_the_output(tmp_path, example_pcap):
    # Writing the capture being read would destroy it (and, mapped, end the reader
    # with SIGBUS): refused, whatever the path's spelling, and the file is intact.
    cap = tmp_path / "in.pcap"
    cap.write_bytes(open(example_pcap, "rb").read())
    (tmp_path / "alias.pcap").symlink_to(cap)
    before = cap.read_bytes()
    for out in (f"pcap:{cap}", f"pcap:{tmp_path / 'alias.pcap'}"):
        r = mbx_cmd("run", "l2fwd", "--in", str(cap), "--out", out)
        assert r.returncode == 2, r.stderr
        assert "the output is the input capture" in r.stderr
    r = mbx_cmd("flows", str(cap), "--json", "-o", str(cap))
    assert r.returncode == 2 and "that is the capture itself" in r.stderr
    # nor the counters (--json) or a Logger's events, inline, pipelined or parallel
    for extra in (["--json", str(tmp_path / "alias.pcap")],
                  ["--set", f"logger.path={cap}"],
                  ["--set", f"logger.path={cap}", "--deploy", "pipelined"]):
        r = mbx_cmd("run", "l2fwd+logger", "--in", str(cap), *extra)
        assert r.returncode == 2, r.stderr
        assert "is the capture being read" in r.stderr or "that is the input" in r.stderr
    r = mbx_cmd("run", "l2fwd", "--in", str(cap), "--out", f"pcap:{tmp_path / 'o.pcap'}",
                "--json", str(tmp_path / "o.pcap"))
    assert r.returncode == 2 and "that is the output" in r.stderr
    assert cap.read_bytes() == before and not (tmp_path / "o.pcap").exists()


def test_a_result_that_cannot_be_written_is_named(tmp_path, example_pcap):
    # A full disk at the end of a run gave "[Errno 28] No space left on device", no
    # file named; a failed run's own error must still be the one it ends with.
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full (Linux has it)")
    r = mbx_cmd("flows", example_pcap, "--json", "-o", "/dev/full")
    assert r.returncode == 2
    assert "mbx: error: -o /dev/full: cannot write: No space left on device" in r.stderr
    r = mbx_cmd("run", "l2fwd", "--in", example_pcap, "--json", "/dev/full", "-q")
    assert r.returncode == 2 and "--json /dev/full: cannot write" in r.stderr
    boom = tmp_path / "boom.py"
    boom.write_text("import mbx\nnf = mbx.NF('boom')\n"
                    "nf.sub('PKT', lambda ev: 1 / 0)\n")
    r = mbx_cmd("run", str(boom), "--in", example_pcap, "--json", "/dev/full", "-q")
    assert r.returncode == 2 and "--json /dev/full: cannot write" in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("mbx: error: NF boom:")


def _mbx_with_file_limit(limit, *args, cwd):
    """``mbx`` with files limited to ``limit`` bytes (RLIMIT_FSIZE): a write past it
    fails with EFBIG, a full disk without root or a file system to fill."""
    import resource

    def limit_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # the error, not the signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run([*MBX, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300, preexec_fn=limit_files, restore_signals=False)


@pytest.mark.parametrize("clash", ["--json", "--out"])
def test_the_run_s_files_and_an_nf_s_are_told_apart_before_the_run(example_pcap, tmp_path,
                                                                    clash):
    # --json at a Logger's path wrote the counters over its log, exit 0; --out at it
    # was found only at start, once one of the two had truncated the file
    log = tmp_path / "log.jsonl"
    log.write_text("kept\n")
    given = ["--json", str(log)] if clash == "--json" else ["--out", f"pcap:{log}"]
    r = mbx_cmd("run", "logger", "--set", f"logger.path={log}", "--in",
                f"pcap:{example_pcap}", *given, "-q")
    assert r.returncode == 2, r.stderr
    assert ("that is NF logger's output" if clash == "--json" else
            "is already written by NF logger (its output)") in r.stderr, r.stderr
    assert log.read_text() == "kept\n"
    # /dev/null is no file to keep: both may write there
    r = mbx_cmd("run", "logger", "--set", "logger.path=/dev/null", "--in",
                f"pcap:{example_pcap}", "--json", "/dev/null", "-q")
    assert r.returncode == 0, r.stderr


ESTABLISHED_NF = """import mbx

class Est(mbx.NF):
    def __init__(self):
        super().__init__("est")
        self.n = 0
        self.sub(mbx.FLOW_TCP_ESTABLISHED, self.on)

    def on(self, ev):
        self.n += 1

    def report(self):
        return {"established": self.n}

def make():
    return Est()
"""


def test_stack_on_the_command_line_wins_over_the_application_file(example_pcap, tmp_path):
    # The file was checked with its own [app] stack and run with --stack: a valid
    # override (tcp over the file's network) was refused, telling the user to pass the
    # flag just passed, and a broken one (network under an NF of TCP events) ran and
    # gave it nothing, without a word.
    (tmp_path / "est.py").write_text(ESTABLISHED_NF)
    (tmp_path / "net.toml").write_text('[app]\nstack = "network"\n[[nf]]\nuse = "est.py"\n')
    (tmp_path / "auto.toml").write_text('[[nf]]\nuse = "est.py"\n')
    r = mbx_cmd("run", "net.toml", "--in", f"pcap:{example_pcap}", "--stack", "tcp",
                "--json", "c.json", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "c.json").read_text())[
        "nfs"]["est"]["report"]["established"] > 0
    r = mbx_cmd("run", "auto.toml", "--in", f"pcap:{example_pcap}", "--stack", "network",
                cwd=tmp_path)
    assert r.returncode == 2, r.stdout
    assert ("auto.toml:1: NF est subscribes to FLOW/TCP/ESTABLISHED, which nothing "
            "in the application publishes") in r.stderr, r.stderr


@pytest.mark.parametrize("stack", ["network", "tcp"])
def test_tables_that_do_not_fit_in_memory_are_an_error_naming_the_option(example_pcap,
                                                                          stack):
    # --flows within its range, but more than the process may allocate: a MemoryError
    # traceback, exit 1.  Now the error says which option sized the tables.
    import resource

    def limit_memory():
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    r = subprocess.run([*MBX, "run", "flow_stats", "--in", f"pcap:{example_pcap}",
                        "--flows", str(1 << 25), "--stack", stack, "-q"],
                       capture_output=True, text=True, timeout=300, preexec_fn=limit_memory)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    assert re.search(r"mbx: error: the (Network Layer|TCP Monitor)'s tables do not fit in "
                     r"memory \(cannot .*\): lower flow_capacity=33,554,432", r.stderr), r.stderr


@pytest.mark.parametrize("stacks", [1, 2])
def test_an_output_write_that_fails_mid_run_is_the_error_with_the_summary(tmp_path, stacks):
    # The capture output's write failed mid-run (a full disk), and closing the output
    # wrote its buffer again: that second failure, "write failed at close", replaced
    # the run's own error, and the summary and --json of a failed run were lost (a
    # stale --json left in place); with --stacks, every stack said "at close".
    cap = tmp_path / "big.pcap"
    r = mbx_cmd("example-capture", str(cap), "--flows", "1000")
    assert r.returncode == 0, r.stderr
    total = int(r.stdout.split()[1].replace(",", ""))
    counters = tmp_path / "c.json"
    counters.write_text("{}")           # a stale one, from an earlier run
    # each stack's output is larger than a writer's 1 MiB buffer: written mid-run
    r = _mbx_with_file_limit(256 << 10, "run", "l2fwd", "--in", f"pcap:{cap}",
                             "--out", "pcap:o.pcap", "--json", str(counters),
                             "--stacks", str(stacks), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert "at close" not in r.stderr
    err = r.stderr.strip().splitlines()[-1]
    if stacks == 1:
        assert err == "mbx: error: pcap:o.pcap: write failed: File too large"
    else:       # the other stack may have been stopped before its first write
        assert re.fullmatch(r"mbx: error: stack (\d): PortError: pcap:o\.pcap\.stack\1: write "
                            r"failed: File too large(; stack 1: .*)?", err), err
        assert err.count("write failed: File too large") == err.count("; ") + 1
    assert r.stdout.startswith("packets")
    c = json.loads(counters.read_text())
    assert c["error"] == err.removeprefix("mbx: error: ")
    assert 0 < c["packets"] < total     # ended where the write failed


def _whole_records(path):
    """The records of a pcap file (mbx's own: native byte order) that are there
    whole: a failed write may leave the last one, or its header, cut short."""
    data = open(path, "rb").read()
    at, n = 24, 0
    while at + 16 <= len(data):
        at += 16 + struct.unpack_from("=I", data, at + 8)[0]
        n += at <= len(data)
    return n


def _accounted(c):
    return (c["sent"] + c["dropped_by_nf"] + c["dropped_malformed"] + c["dropped_on_error"]
            + c["fragments_held"] + c["dropped_fragments"])


@pytest.mark.parametrize("stacks", [1, 2])
def test_an_output_write_that_fails_leaves_counters_that_add_up(tmp_path, stacks):
    # The burst the output failed on was counted nowhere (packets read but neither
    # sent nor dropped), and the records the failed write lost were still counted
    # in sent and the output's tx_pkts: sent overstated what the file holds.
    from mbx.examples.capture import ether, udp4, write_pcap

    cap = tmp_path / "udp.pcap"
    write_pcap(str(cap), [(1.0 + i * 1e-4, ether(udp4(f"198.18.0.{1 + i % 50}",
                                                      "198.18.1.1", 10000 + i % 100, 53,
                                                      b"x" * 200)))
                          for i in range(20000)])
    counters = tmp_path / "c.json"
    # past the first 1 MiB buffer of each stack, and part of the second
    r = _mbx_with_file_limit(1500 << 10, "run", "l2fwd", "--in", f"pcap:{cap}",
                             "--out", "pcap:o.pcap", "--json", str(counters),
                             "--stacks", str(stacks), cwd=tmp_path)
    assert r.returncode == 2 and "write failed: File too large" in r.stderr, r.stderr
    c = json.loads(counters.read_text())
    assert 0 < c["packets"] < 20000 and c["dropped_on_error"] > 0
    assert _accounted(c) == c["packets"]
    files = [tmp_path / "o.pcap"] if stacks == 1 else sorted(tmp_path.glob("o.pcap.stack*"))
    assert c["sent"] == sum(_whole_records(f) for f in files) > 0
    if stacks == 1:
        out = c["ports"]["out"]
        assert out["tx_pkts"] == c["sent"] and out["tx_lost"] > 0


@pytest.mark.parametrize("deploy", [["--deploy", "inline"], ["--deploy", "pipelined"],
                                    ["--stacks", "2"]])
def test_an_output_that_fails_mid_run_still_ends_the_flows(tmp_path, deploy):
    # An input's error ended every flow before the error was raised, an output's
    # skipped that: flows active at the end, shutdown 0, and no NF got FLOW/END.
    cap = tmp_path / "big.pcap"
    r = mbx_cmd("example-capture", str(cap), "--flows", "1000")
    assert r.returncode == 0, r.stderr
    counters = tmp_path / "c.json"
    r = _mbx_with_file_limit(256 << 10, "run", "l2fwd+flow_stats", "--in", f"pcap:{cap}",
                             "--out", "pcap:o.pcap", "--json", str(counters), *deploy,
                             cwd=tmp_path)
    assert r.returncode == 2 and "write failed: File too large" in r.stderr, r.stderr
    c = json.loads(counters.read_text())
    f = c["flows"]
    assert f["created"] > 0 and f["active"] == 0
    assert f["shutdown"] == f["created"] - f["expired"] - f["evicted"] - f["closed"]
    assert f"ended at the error {f['shutdown']:,}" in r.stdout
    assert c["events"]["FLOW/END"] == {"published": f["created"], "delivered": f["created"]}
    assert c["nfs"]["flow_stats"]["report"]["flows"] == f["created"]
    assert _accounted(c) == c["packets"]


STOP_RAISES_NF = """import mbx

class SaveFails(mbx.NF):
    def __init__(self):
        super().__init__("save_fails")
        self.sub(mbx.FLOW_END, lambda ev: None)

    def stop(self):
        raise RuntimeError("disk full while saving")

save_fails = SaveFails()
"""


@pytest.mark.parametrize("deploy", [["--deploy", "inline"], ["--deploy", "pipelined"],
                                    ["--stacks", "2"]])
def test_an_error_after_the_input_leaves_the_flows_ended_with_it(tmp_path, deploy):
    # An NF's stop() raised once the whole input was read and every flow had ended
    # with it: the summary must not say the flows "ended at the error" (which reads
    # as if the error cut them short), while the run still fails with the error.
    cap = tmp_path / "ex.pcap"
    assert mbx_cmd("example-capture", str(cap)).returncode == 0
    (tmp_path / "save_fails.py").write_text(STOP_RAISES_NF)
    r = mbx_cmd("run", "save_fails.py", "--in", f"pcap:{cap}", "--json", "c.json", *deploy,
                cwd=tmp_path)
    assert r.returncode == 2 and "stop() raised RuntimeError: disk full" in r.stderr, r.stderr
    c = json.loads((tmp_path / "c.json").read_text())
    f = c["flows"]
    assert f["shutdown"] == f["created"] > 0 and f["shutdown_early"] == 0
    assert c["events"]["FLOW/END"]["delivered"] == f["created"]
    assert f"ended with the input {f['shutdown']:,}" in r.stdout, r.stdout
    assert "at the error" not in r.stdout, r.stdout


def test_an_output_write_that_fails_as_it_closes_is_a_failed_run(tmp_path, example_pcap):
    # The output fits in the writer's buffer, written when it closes, after the run:
    # that failure ended mbx with no summary and no --json.
    counters = tmp_path / "c.json"
    r = _mbx_with_file_limit(64 << 10, "run", "l2fwd", "--in", example_pcap, "--out",
                             "pcap:o.pcap", "--json", str(counters), cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    err = "pcap:o.pcap: write failed at close (File too large)"
    assert r.stderr.strip().splitlines() == [f"mbx: error: {err}"]
    assert r.stdout.startswith("packets")
    c = json.loads(counters.read_text())
    assert c["error"] == err and c["packets"] > 0
    # what the failed write at close lost was not sent: counted dropped on the error
    assert c["sent"] == _whole_records(tmp_path / "o.pcap") < c["packets"] // 2
    assert _accounted(c) == c["packets"]


def test_one_file_has_one_writer(tmp_path, example_pcap):
    # A Logger's log that is also the pcap output (or another Logger's log) would mix
    # JSON lines into pcap records: refused in every deployment, naming both writers.
    out = tmp_path / "o.pcap"
    for deploy in (["--deploy", "inline"], ["--deploy", "pipelined"], ["--stacks", "2"]):
        r = mbx_cmd("run", "l2fwd+logger", "--in", example_pcap, "--out", f"pcap:{out}",
                    "--set", f"logger.path={out}", *deploy)
        assert r.returncode == 2, (deploy, r.stderr)
        # (said before the run, from the NF's declared file: neither was opened)
        assert "is already written by NF logger (its output)" in r.stderr, r.stderr
    app = tmp_path / "two.toml"
    log = tmp_path / "events.jsonl"
    app.write_text(f'[[nf]]\nuse = "logger"\nname = "a"\noptions = {{ path = "{log}" }}\n'
                   f'[[nf]]\nuse = "logger"\nname = "b"\noptions = {{ path = "{log}" }}\n')
    r = mbx_cmd("run", str(app), "--in", example_pcap)
    # (from the NFs' declared files, before either opened it)
    assert r.returncode == 2 and "NF b: " + repr(str(log)) + " is written by NF a (line 1) " \
        "too" in r.stderr, r.stderr
    # the other way round (the output open first), through the library
    from mbx._pcap import PcapWriter
    from mbx.errors import AppError
    from mbx.nfs.logger import Logger

    writer = PcapWriter(str(out))
    logger = Logger(path=str(out))
    with pytest.raises(AppError, match="already written by the pcap output"):
        logger.start()
    writer.close()
    logger.start()          # free again once the output is closed
    logger.stop()


def test_command_line_stack_options_win_over_the_application_file(tmp_path, example_pcap):
    app = tmp_path / "app.toml"
    app.write_text('[app]\nstack = "network"\n[stack]\nflow_capacity = 4096\n'
                   '[[nf]]\nuse = "l2fwd"\n')
    counters = tmp_path / "c.json"

    def run(*extra):
        r = mbx_cmd("run", str(app), "--in", f"pcap:{example_pcap}", "--json",
                    str(counters), "-q", *extra)
        assert r.returncode == 0, r.stderr
        return json.loads(counters.read_text())

    c = run()                                   # the file's options apply ...
    assert c["flows"]["capacity"] == 4096 and "tcp" not in c
    c = run("--flows", "1024", "--stack", "tcp")  # ... and what is given here wins
    assert c["flows"]["capacity"] == 1024 and c["tcp"]["tcp_packets"] > 0
    r = mbx_cmd("check", str(app), "--set", "l2fwd.x=1")
    assert r.returncode == 2 and "not --set" in r.stderr


@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
def test_a_run_that_fails_to_start_leaves_an_existing_output_alone(tmp_path, example_pcap,
                                                                   deploy):
    # The output used to be opened (so truncated) before the NFs started and the
    # stack was built: a run refused at start wiped the capture it was to replace.
    keep = tmp_path / "keep.pcap"
    keep.write_bytes(open(example_pcap, "rb").read())
    before = keep.read_bytes()
    nf = tmp_path / "late.py"
    nf.write_text("import mbx\n\nclass Late(mbx.NF):\n    def start(self):\n"
                  "        raise RuntimeError('no licence')\n\n"
                  "nf = Late('late')\nnf.sub(mbx.PKT, lambda ev: None)\n")
    r = mbx_cmd("run", str(nf), "--in", f"pcap:{example_pcap}", "--out", f"pcap:{keep}",
                "--deploy", deploy)
    assert r.returncode != 0 and "no licence" in r.stderr
    app = tmp_path / "app.toml"         # a stack option the stack refuses when built
    app.write_text('[app]\nstack = "tcp"\n[stack]\nchunk_size = 1000\n[[nf]]\nuse = "l2fwd"\n')
    r = mbx_cmd("run", str(app), "--in", f"pcap:{example_pcap}", "--out", f"pcap:{keep}",
                "--deploy", deploy)
    assert r.returncode == 2 and "chunk_size" in r.stderr, r.stderr
    assert keep.read_bytes() == before
    fresh = tmp_path / "fresh.pcap"     # nor is a new one left behind
    mbx_cmd("run", str(app), "--in", f"pcap:{example_pcap}", "--out", f"pcap:{fresh}")
    assert not fresh.exists()


def test_the_summary_says_what_a_live_input_lost(example_pcap):
    # The ring's overflow was counted (rx_dropped) but never shown: a 58 % loss
    # looked like a clean run.
    import io

    from mbx.cli import _print_counters
    from mbx.ports import open_input
    from mbx.runtime import App

    inp = open_input(f"pcap:{example_pcap}")
    try:
        c = App([]).run(inp)
    finally:
        inp.close()
    c["ports"] = {"in": {"rx_dropped": 300, "client": {"rx_dropped": 100,
                                                       "rx_truncated": 2},
                         "server": {"rx_dropped": 200, "link_errors": 1}}, "out": None}
    text = io.StringIO()
    _print_counters(c, 1.0, text)
    lines = text.getvalue().splitlines()
    assert "not received   300 frames: the receive ring was full" in lines[4]
    assert any(line.startswith("cut short      2 frames") for line in lines)
    assert any(line.startswith("link           1 link error (a port's link went down")
               for line in lines)
    assert not any(line.startswith(("long frames", "cut again", "unread")) for line in lines)
    # frames too large to take are in rx_dropped too, but not the ring's fault
    c["ports"]["in"]["client"]["rx_oversize"] = 100
    text = io.StringIO()
    _print_counters(c, 1.0, text)
    assert "not received   200 frames: the receive ring was full" in text.getvalue()
    assert "too large      100 frames larger than a whole burst's memory" in text.getvalue()
    # frames the input was stopped with still in its ring
    c["ports"]["in"]["server"]["rx_unread"] = 7
    text = io.StringIO()
    _print_counters(c, 1.0, text)
    assert "unread         7 frames still in the receive ring when the input ended" \
        in text.getvalue()
    # frames read whole past a slot, and frames not sent: say what may be why, but
    # only when frames were refused for their length (not for a link down or gone)
    c["ports"]["in"]["client"]["rx_whole"] = 3
    c["ports"]["out"] = {"tx_dropped": 1, "tx_error": "No such device or address",
                         "tx_cut": 2}
    text = io.StringIO()
    _print_counters(c, 1.0, text)
    assert "long frames" not in text.getvalue()
    c["ports"]["out"] = {"tx_dropped": 1, "tx_error": "Message too long", "tx_cut": 2,
                         "tx_too_long": 1}
    c["ports"]["in"]["server"]["tx_cut"] = 1
    text = io.StringIO()
    _print_counters(c, 1.0, text)
    assert "long frames    3 frames longer than a ring slot were read whole" \
        in text.getvalue()
    assert "cut again      3 datagrams longer than an output's link" in text.getvalue()
    c["ports"]["out"]["tx_cut"], c["ports"]["in"]["server"]["tx_cut"] = 1, 0
    text = io.StringIO()
    _print_counters(c, 1.0, text)
    assert "cut again      1 datagram longer" in text.getvalue()


def test_every_packet_is_counted_once(tmp_path, example_pcap):
    # Packets the stack dropped (malformed, refused fragments, full rings) were
    # counted as dropped by NFs too, so the counters added up to more than the input;
    # --max-packets read and lost the rest of its last burst.
    from mbx.ports import open_input, open_output
    from mbx.runtime import App, load_app

    def run(max_packets=0, **options):
        inp = open_input(f"pcap:{example_pcap}")
        out = open_output(f"pcap:{tmp_path / 'o.pcap'}")
        try:
            return App(load_app("l2fwd"), **options).run(inp, out, burst=64,
                                                         max_packets=max_packets)
        finally:
            inp.close()
            out.close()

    c = run(malformed="drop")
    assert c["dropped_malformed"] > 0 and c["dropped_by_nf"] == 0
    assert c["packets"] == c["sent"] + c["dropped_malformed"] + c["fragments_held"]
    c = run(deploy="pipelined", ring_size=16, ring_full="drop")
    lost = c["pipeline"]["ring_dropped_pkts"]
    assert lost > 0 and c["dropped_by_nf"] == 0 and c["packets"] == c["sent"] + lost + c[
        "fragments_held"]
    inp = open_input(f"pcap:{example_pcap}")
    try:
        c = App([]).run(inp, max_packets=100)
        assert c["packets"] == 100 == inp.counters["rx_pkts"]
    finally:
        inp.close()


@pytest.mark.parametrize("setting, message", [
    ("logger.pth=x", "NF logger: unknown option(s) pth; it takes path, types"),
    ("l2fwd.x=1", "NF l2fwd: unknown option(s) x; it takes only name"),
])
def test_a_misspelt_nf_option_names_the_ones_there_are(example_pcap, setting, message):
    # it was make()'s TypeError: "unexpected keyword argument 'pth'"
    nf = setting.split(".")[0]
    r = mbx_cmd("run", nf, "--in", example_pcap, "--set", setting, "-q")
    assert r.returncode == 2 and r.stderr.strip() == f"mbx: error: {message}"
    # the NF's own name is not a misspelling
    assert mbx_cmd("check", nf, "--set", f"{nf}.name=mine").returncode == 0


NF_SOURCES = {
    # options typed by annotation or default; report() tells what make() got
    "opts.py": """
import mbx
class O(mbx.NF):
    def __init__(self, **got):
        super().__init__("opts")
        self.got = got
        self.sub(mbx.PKT, lambda ev: None)
    def report(self):
        return {k: f"{type(v).__name__} {v}" for k, v in self.got.items()}
def make(min_len: int = 100, verbose=False, ratio=0.5, label="x"):
    return O(min_len=min_len, verbose=verbose, ratio=ratio, label=label)
""",
    "starts.py": """
import mbx
class S(mbx.NF):
    def __init__(self):
        super().__init__("starts")
        self.sub(mbx.PKT, lambda ev: None)
    def start(self):
        raise KeyError("cfg")
def make():
    return S()
""",
    "factory.py": """
import mbx
class F(mbx.NF):
    def __init__(self, t):
        super().__init__("factory")
        self.n = len(t)
def make(threshold=10):
    return F(threshold)
""",
    "nosuper.py": """
import mbx
class A(mbx.NF):
    def __init__(self):
        self.sub(mbx.PKT, lambda ev: None)
def make():
    return A()
""",
    "broken_mod.py": "import mbx\nnf = mbx.NF('b')\nx = 1 / 0\n",
    "plain_mod.py": "import mbx\nnf = mbx.NF('plain')\nnf.sub(mbx.PKT, lambda ev: None)\n",
    "selfish.py": """
import mbx
T = mbx.register_event_type("SELFISH", parent=mbx.PKT)
nf = mbx.NF("selfish")
port = nf.pub(T)
nf.sub(T, lambda ev: None)
""",
}


def test_nf_code_errors_name_the_nf_and_the_line(tmp_path, example_pcap):
    """What an NF's own code gets wrong is told as the NF, what it did, and the line
    (no traceback through mbx): start() raising, a TypeError inside make() (it was
    called "bad options"), a module:attribute whose import fails; a --set value is
    made the type make() declares, or refused naming the option; an NF subscribing
    to only its own publication is told so (the message listed it as published)."""
    for name, source in NF_SOURCES.items():
        (tmp_path / name).write_text(source)

    def run(*args):
        r = mbx_cmd("run", *args, "--in", example_pcap, "-q", cwd=tmp_path)
        return r.returncode, r.stderr.strip().splitlines()[-1] if r.stderr.strip() else ""

    assert run("starts.py") == (2, "mbx: error: NF starts: start() raised KeyError: "
                                   "'cfg' (at starts.py, line 8)")
    assert run("factory.py") == (2, "mbx: error: NF file factory.py: make(): TypeError: "
                                    "object of type 'int' has no len() (at factory.py, "
                                    "line 6)")
    assert run("broken_mod:nf") == (2, "mbx: error: NF broken_mod:nf: ZeroDivisionError: "
                                       "division by zero (at broken_mod.py, line 3)")
    assert run("plain_mod:nf")[0] == 0         # found in the current directory
    assert run("nosuper.py") == (2, "mbx: error: NF file nosuper.py: make(): AttributeError: "
                                    "A has no '_bus': its __init__ must call "
                                    "super().__init__(name) first (at nosuper.py, line 5)")
    code, err = run("selfish.py")
    assert code == 2 and "which only it publishes (PKT/SELFISH)" in err
    code, err = run("opts.py", "--set", "opts.min_len=0x10", "--set", "opts.verbose=yes",
                    "--set", "opts.ratio=2", "--set", "opts.label=7")
    assert code == 0, err
    # leading zeros are decimal ones, not an error (int(text, 0) refused them)
    r = mbx_cmd("run", "opts.py", "--in", example_pcap, "--set", "opts.min_len=0500",
                "--set", "opts.verbose=off", "--set", "opts.ratio=2", "--set",
                "opts.label=7", cwd=tmp_path)
    report = r.stdout[r.stdout.index("NF reports"):]
    for shown in ("int 500", "bool False", "float 2.0", "str 7"):
        assert shown in report, report
    assert run("opts.py", "--set", "opts.min_len=abc") == (
        2, "mbx: error: NF file opts.py: make(): option min_len='abc': expected an integer")
    assert run("opts.py", "--set", "opts.verbose=maybe") == (
        2, "mbx: error: NF file opts.py: make(): option verbose='maybe': expected true or "
           "false")


def test_a_tcp_stack_with_fewer_flow_slots_than_a_burst_has_flows_finishes(
        tmp_path, example_pcap):
    # The TCP Monitor's restart (a SYN on an old 5-tuple) looks the new flow up,
    # which in a full table evicts another; ended after the burst's last chunk, that
    # flow's FLOW/END was never published, and the stack spun on the burst forever
    # (at 99 % CPU, deaf to SIGTERM) for --flows 8 over the example capture.
    counters = tmp_path / "c.json"
    r = subprocess.run([*MBX, "run", "l2fwd", "--in", f"pcap:{example_pcap}", "--stack",
                        "tcp", "--flows", "8", "-q", "--json", str(counters)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    c = json.loads(counters.read_text())
    assert c["packets"] == len(read_frames(example_pcap))
    assert c["flows"]["evicted"] > 0
    # mbx flows runs the same Monitor, with reassembly
    r = subprocess.run([*MBX, "flows", example_pcap, "--json", "--flows", "4"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["connections"]
    # the segments that lost bytes lost them for want of a stream, not of memory
    assert "found no stream" in r.stderr and "raise --flows" in r.stderr
    assert "--stream-memory" not in r.stderr


def test_an_output_capture_that_cannot_be_written_is_refused_before_the_run(
        tmp_path, example_pcap):
    # It was opened once the run had started: an empty summary came first, then
    # the error, unlike --json or a Logger's path, refused before any work.
    r = mbx_cmd("run", "l2fwd", "--in", f"pcap:{example_pcap}", "--out",
                f"pcap:{tmp_path / 'missing' / 'o.pcap'}", "--json", str(tmp_path / "c.json"))
    assert r.returncode == 2
    assert "--out: path" in r.stderr and "does not exist" in r.stderr
    assert r.stdout == "" and not (tmp_path / "c.json").exists()


@pytest.mark.parametrize("stack", ["network", "tcp"])
def test_a_table_smaller_than_a_chunk_keeps_every_flow_s_events_in_order(
        tmp_path, example_pcap, stack):
    # The stack looks a chunk of 32 packets' flows up before it builds their events;
    # with fewer slots than that, the LRU evicted flows made earlier in the same
    # chunk: FLOW/END before (or without) FLOW/START, the slot's next flow started
    # twice, packets counted for no flow, and the TCP Monitor made new flows for
    # them (720 created for the example's 469 at --flows 8).
    def run(flows):
        events = tmp_path / f"e{flows}.jsonl"
        counters = tmp_path / f"c{flows}.json"
        r = mbx_cmd("run", "flow_stats+logger", "--in", f"pcap:{example_pcap}",
                    "--stack", stack, "--flows", str(flows), "--set",
                    f"logger.path={events}", "--json", str(counters), "-q")
        assert r.returncode == 0, r.stderr
        started, ended, pkts = set(), set(), 0
        for line in events.read_text().splitlines():
            e = json.loads(line)
            if e["type"] == "FLOW/START":
                assert e["flow"] not in started, "a flow started twice"
                started.add(e["flow"])
            elif e["type"] == "FLOW/END":
                assert e["flow"] in started - ended, "FLOW/END without its FLOW/START"
                ended.add(e["flow"])
                pkts += e["pkts_c2s"] + e["pkts_s2c"]
        c = json.loads(counters.read_text())
        assert len(started) == len(ended) == c["flows"]["created"]
        return c["flows"], pkts

    small, small_pkts = run(8)
    large, large_pkts = run(65536)
    assert small["evicted"] > 0 and large["evicted"] == 0
    # every packet counted in some flow's FLOW/END, however small the table
    assert small_pkts == large_pkts


HANGING_NF = """import time
import mbx

def make():
    nf = mbx.NF("hangs")
    seen = [0]
    def on(ev):
        seen[0] += 1
        if seen[0] == 100:
            open(__file__ + ".hung", "w").close()
            while True:
                time.sleep(1)
    nf.sub(mbx.PKT, on)
    return nf
"""


@pytest.mark.parametrize("deploy", ["pipelined", "inline"])
def test_a_run_whose_nf_hangs_still_stops(tmp_path, example_pcap, deploy):
    # Pipelined, the stack waited for the hung NF's epoch forever and no signal
    # ended the run; inline nothing can interrupt a handler that never returns
    # except a signal that raises: a second one, 3 s after the first, now does.
    nf = tmp_path / "hangs.py"
    nf.write_text(HANGING_NF)
    counters = tmp_path / "c.json"
    p = subprocess.Popen([*MBX, "run", f"{nf}+l2fwd", "--in", f"pcap:{example_pcap}",
                          "--deploy", deploy, "--json", str(counters)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "hangs.py.hung").exists():
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "the NF never got its 100th packet"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        if deploy == "inline":
            time.sleep(3.5)
            p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert out.startswith("packets"), err           # the summary came out
    c = json.loads(counters.read_text())
    assert c["stopped"] == "SIGINT"
    if deploy == "pipelined":
        assert p.returncode == 0, err
        death, = c["pipeline"]["nfs"]["hangs"]["deaths"]
        assert "did not stop within 1 s" in death
    else:
        assert p.returncode == 130
        # the handler that held the run is named, with its line
        held = ("stopped again: the run had not ended 3 s after the first signal; held "
                "in NF hangs: make.<locals>.on on a PKT event (at hangs.py, line 12)")
        assert c["error"] == held
        assert err.strip().splitlines()[-1] == f"mbx: interrupted: {held}"


def _run_slow_nf(tmp_path, example_pcap, *args):
    """``mbx run`` of an NF that takes 5 ms a packet over the example capture, with
    ``args``: the process, once the NF has seen its first packet."""
    nf = tmp_path / "slow.py"
    nf.write_text("import time\nimport mbx\n"
                  "def make():\n"
                  "    nf = mbx.NF('slow')\n"
                  "    def on(ev):\n"
                  "        open(__file__ + '.began', 'a').close()\n"
                  "        time.sleep(0.005)\n"
                  "    nf.sub(mbx.PKT, on)\n"
                  "    return nf\n")
    p = subprocess.Popen([*MBX, "run", str(nf), "--in", f"pcap:{example_pcap}", *args],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "slow.py.began").exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return p


def test_a_stop_is_seen_within_a_burst_or_two_of_slow_nfs(tmp_path, example_pcap):
    # The stack looked at the stop flag every 64 bursts: behind an NF that takes
    # 5 ms a packet that is 20 s, so a Ctrl-C waited for the whole example capture.
    counters = tmp_path / "c.json"
    p = _run_slow_nf(tmp_path, example_pcap, "-q", "--json", str(counters))
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    # stopped within a burst or two, far from the capture's end
    assert json.loads(counters.read_text())["packets"] <= 3 * 64


@pytest.mark.parametrize("deploy", [["--deploy", "inline"], ["--deploy", "pipelined"],
                                    ["--stacks", "2"]])
def test_a_run_a_signal_stopped_says_so(tmp_path, example_pcap, deploy):
    # Ctrl-C on a capture replay exited 0 with a summary and --json just like a
    # whole run's: nothing told a script the counters were of part of the input.
    counters = tmp_path / "c.json"
    p = _run_slow_nf(tmp_path, example_pcap, *deploy, "--json", str(counters))
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err           # a clean stop, as documented
    c = json.loads(counters.read_text())
    assert c["stopped"] == "SIGINT" and "error" not in c
    assert (f"stopped        by SIGINT after {c['packets']:,} packets: the run did not "
            "finish, the counters are of part of it\n") in out
    # a run to the input's end says it was not stopped
    r = mbx_cmd("run", "l2fwd", "--in", f"pcap:{example_pcap}", *deploy, "--json",
                str(counters))
    assert r.returncode == 0, r.stderr
    assert json.loads(counters.read_text())["stopped"] is None
    assert "stopped" not in r.stdout


def test_an_nf_process_killed_at_the_stop_is_said_even_quietly(tmp_path, example_pcap):
    # Pipelined, a signal during the end-of-input flush gives a slow NF a second and
    # kills it; its death was only in the summary, so with -q the run exited 0
    # saying nothing, and --json did not say the signal had cut the run short.
    nf = tmp_path / "slowend.py"
    nf.write_text("import time\nimport mbx\n"
                  "def make():\n"
                  "    nf = mbx.NF('slowend')\n"
                  "    def on(ev):\n"
                  "        open(__file__ + '.ending', 'a').close()\n"
                  "        time.sleep(0.02)\n"
                  "    nf.sub(mbx.FLOW_END, on)\n"
                  "    return nf\n")
    counters = tmp_path / "c.json"
    p = subprocess.Popen([*MBX, "run", str(nf), "--in", f"pcap:{example_pcap}", "-q",
                          "--deploy", "pipelined", "--json", str(counters)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not (tmp_path / "slowend.py.ending").exists():
        assert p.poll() is None, p.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err           # as documented: the stop is clean
    why = "killed by SIGKILL: it did not stop within 1 s of the run's end"
    assert err == f"mbx: warning: NF slowend: its process died: {why}\n"
    assert out == ""
    c = json.loads(counters.read_text())
    assert c["stopped"] == "SIGINT"
    n = c["pipeline"]["nfs"]["slowend"]
    assert n["state"] == "died" and n["deaths"] == [why]
    assert c["events"]["FLOW/END"]["delivered"] < c["events"]["FLOW/END"]["published"]


@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
def test_an_nf_whose_stop_raises_fails_the_run_in_every_deployment(
        tmp_path, example_pcap, deploy):
    # Pipelined, the NF process printed the error and the run still exited 0, the
    # NF's state "ok".
    nf = tmp_path / "stopper.py"
    nf.write_text("import mbx\n"
                  "def make():\n"
                  "    nf = mbx.NF('stopper')\n"
                  "    nf.sub(mbx.PKT, lambda ev: None)\n"
                  "    def stop():\n"
                  "        raise ValueError('cannot flush')\n"
                  "    nf.stop = stop\n"
                  "    return nf\n")
    counters = tmp_path / "c.json"
    r = mbx_cmd("run", f"{nf}+l2fwd", "--in", f"pcap:{example_pcap}", "--deploy",
                deploy, "--json", str(counters))
    assert r.returncode == 2
    assert r.stderr.count("stop() raised ValueError: cannot flush") == 1, r.stderr
    c = json.loads(counters.read_text())
    assert "cannot flush" in c["error"]
    if deploy == "pipelined":
        assert c["pipeline"]["nfs"]["stopper"]["state"] == "failed"


def test_an_evicted_flow_ends_when_the_packet_that_took_its_slot_came(
        tmp_path, example_pcap):
    # FLOW/END of a flow evicted for a new one carried the latest time its chunk
    # had seen, later than the new flow's FLOW/START that followed it.
    events = tmp_path / "e.jsonl"
    r = mbx_cmd("run", "logger", "--in", f"pcap:{example_pcap}", "--flows", "8",
                "--set", f"logger.path={events}", "-q")
    assert r.returncode == 0, r.stderr
    log = [json.loads(line) for line in events.read_text().splitlines()]
    evicted = [i for i, e in enumerate(log)
               if e["type"] == "FLOW/END" and e["end_reason"] == "evicted"]
    assert evicted
    for i in evicted:
        # the FLOW/START of the flow that took the slot follows, among its chunk's
        # (the FLOW/STARTs up to the next FLOW/END), at the same time
        chunk = []
        for e in log[i + 1:]:
            if e["type"] == "FLOW/END" and e["ts_ns"] != log[i]["ts_ns"] and chunk:
                break
            if e["type"] == "FLOW/START":
                chunk.append(e["ts_ns"])
        assert log[i]["ts_ns"] in chunk


def test_mbx_flows_names_the_capture_however_it_was_given(tmp_path, example_pcap):
    # "pcap:x.pcap" was kept whole while "pcap:/dir/x.pcap" became "x.pcap"
    cap = tmp_path / "named.pcap"
    cap.write_bytes(open(example_pcap, "rb").read())
    for spec in ("named.pcap", "pcap:named.pcap", f"pcap:{cap}", str(cap)):
        r = mbx_cmd("flows", spec, "--json", cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["capture"] == "named.pcap", spec


def test_a_reader_that_goes_away_is_no_error():
    # mbx types | head: the write failed with EPIPE and mbx printed "error: [Errno 32]
    # Broken pipe" (exit 2)
    p = subprocess.Popen([*MBX, "types", "--fields"], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    p.stdout.close()                # before mbx has written anything
    err = p.stderr.read()
    assert p.wait(timeout=60) in (0, 141) and err == "", err


@pytest.mark.parametrize("size", ["big", "small"])
@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
def test_a_capture_reader_that_goes_away_ends_the_run_quietly(tmp_path, example_pcap,
                                                                size, deploy):
    # mbx run ... --out pcap:- | tcpdump -r - -c 3: the write's EPIPE became a
    # PortError, a failed run (exit 2, "mbx: error: ... Broken pipe"), where mbx
    # types | head and tcpdump -w - | head stop quietly.  "big": written mid-run;
    # "small": the whole output in the writer's buffer, written as it closes.
    cap = example_pcap
    if size == "big":
        cap = str(tmp_path / "big.pcap")
        r = mbx_cmd("example-capture", cap, "--flows", "1000")
        assert r.returncode == 0, r.stderr
    counters = tmp_path / "c.json"
    p = subprocess.Popen([*MBX, "run", "flow_stats", "--in", f"pcap:{cap}", "--out",
                          "pcap:-", "--deploy", deploy, "--json", str(counters)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=False)
    assert len(p.stdout.read(8)) == 8       # a pcap file header's start
    p.stdout.close()
    err = p.stderr.read().decode()
    assert p.wait(timeout=120) == 141, err
    assert "mbx: error" not in err and err.startswith("packets"), err   # the summary
    c = json.loads(counters.read_text())
    assert "Broken pipe" in c["error"] and c["flows"]["active"] == 0


def _damaged_after(capture, tmp_path, n):
    """A copy of a classic pcap whose n-th record has an absurd captured length:
    a capture damaged midway."""
    data = bytearray(open(capture, "rb").read())
    pos = 24
    for _ in range(n):
        pos += 16 + struct.unpack_from("<I", data, pos + 8)[0]
    struct.pack_into("<I", data, pos + 8, 0x7FFFFFFF)
    out = tmp_path / "damaged.pcap"
    out.write_bytes(bytes(data))
    return out


def test_every_flow_ends_when_the_input_fails(tmp_path, example_pcap):
    """An input that fails mid-run (here a damaged record; live, an interface
    deleted) still ends every flow with FLOW/END, as the end of input does: the
    run stopped at the error and the Logger kept only FLOW/STARTs."""
    from mbxtest import read_frames

    cap, log = _damaged_after(example_pcap, tmp_path, 1000), tmp_path / "events.jsonl"
    r = mbx_cmd("run", "flow_stats+logger", "--in", str(cap), "--set",
                f"logger.path={log}", "-q")
    assert r.returncode == 2 and "damaged record" in r.stderr, r.stderr
    events = [json.loads(line)["type"] for line in log.read_text().splitlines()]
    assert events.count("FLOW/START") == events.count("FLOW/END") > 0
    assert len(read_frames(example_pcap)) > 1000


def test_mbx_flows_on_a_damaged_capture_sums_up_what_came_before(tmp_path, example_pcap):
    # it printed the error alone: the connections before the damage were lost
    cap = _damaged_after(example_pcap, tmp_path, 1000)
    r = mbx_cmd("flows", str(cap), "--json")
    assert r.returncode == 2 and "damaged record" in r.stderr
    doc = json.loads(r.stdout)
    assert "damaged record" in doc["error"] and len(doc["connections"]) > 10
    whole = json.loads(mbx_cmd("flows", example_pcap, "--json").stdout)["connections"]
    done = [k for k, c in doc["connections"].items() if c["close"] == "fin"
            and whole[k]["pkts_c2s"] == c["pkts_c2s"]]
    assert done and all(doc["connections"][k] == whole[k] for k in done)


def test_duration_ends_a_pipelined_run_whose_nf_hangs(tmp_path, example_pcap):
    # The stack looked at --duration only between bursts, never while it waited for
    # the hung NF's epoch: the run went on until a signal.  Now --duration stops it
    # as a signal does (a second's grace, then the NF process is killed).
    nf = tmp_path / "hangs.py"
    nf.write_text(HANGING_NF)
    counters = tmp_path / "c.json"
    t0 = time.monotonic()
    r = subprocess.run([*MBX, "run", f"{nf}+l2fwd", "--in", f"pcap:{example_pcap}",
                        "--out", f"pcap:{tmp_path / 'out.pcap'}", "--deploy",
                        "pipelined", "--duration", "2", "--json", str(counters)],
                       capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert took < 30, f"--duration 2 took {took:.1f} s"
    c = json.loads(counters.read_text())
    death, = c["pipeline"]["nfs"]["hangs"]["deaths"]
    assert "did not stop within 1 s" in death
    assert c["stopped"] == "duration"
    assert c["packets"] == (c["sent"] + c["dropped_by_nf"] + c["dropped_malformed"]
                            + c["dropped_on_error"])


def test_an_output_one_stack_cannot_write_is_refused_before_any_stack_runs(tmp_path):
    # stack 1's file was found a directory after stack 0 had written its whole file
    cap = tmp_path / "ex.pcap"
    assert mbx_cmd("example-capture", str(cap)).returncode == 0
    out = tmp_path / "o.pcap"
    (tmp_path / "o.pcap.stack1").mkdir()
    r = mbx_cmd("run", "l2fwd", "--in", f"pcap:{cap}", "--out", f"pcap:{out}",
                "--stacks", "2", "-q")
    assert r.returncode == 2
    assert f"--out: path '{out}.stack1' is a directory, not a file" in r.stderr
    assert not (tmp_path / "o.pcap.stack0").exists()


def test_payload_after_close_is_in_the_summary_and_flows_warns(tmp_path):
    # A data segment after both FINs were acknowledged: its bytes are not delivered
    # (the streams went back to the pool), which the run's summary and mbx flows say.
    from mbx.examples.capture import ether, tcp4, write_pcap

    c, s = ("10.0.0.1", 40000), ("10.0.0.2", 80)
    frames, t = [], 1.0
    for src, dst, seq, ack, flags, data in (
            (c, s, 1000, 0, 0x02, b""), (s, c, 5000, 1001, 0x12, b""),
            (c, s, 1001, 5001, 0x10, b""), (c, s, 1001, 5001, 0x18, b"hello"),
            (c, s, 1006, 5001, 0x11, b""), (s, c, 5001, 1007, 0x11, b""),
            (c, s, 1007, 5002, 0x10, b""),
            (s, c, 5002, 1007, 0x18, b"late")):     # after the close
        t += 0.001
        frames.append((t, ether(tcp4(src[0], dst[0], src[1], dst[1], data, seq=seq,
                                     ack=ack, flags=flags), 0x0800)))
    cap = tmp_path / "late.pcap"
    write_pcap(str(cap), frames)
    nf = tmp_path / "reader.py"
    nf.write_text("import mbx\nmbx.mb_sub(mbx.DATA_RDY, lambda ev: ev.read())\n")
    r = mbx_cmd("run", str(nf), "--in", f"pcap:{cap}")
    assert r.returncode == 0, r.stderr
    assert "payload after close 1 segment (not delivered" in r.stdout, r.stdout
    r = mbx_cmd("flows", str(cap), "--json")
    assert r.returncode == 0, r.stderr
    assert "warning: 1 segment with payload came after their connection closed with " \
        "FINs" in r.stderr, r.stderr


def test_the_summary_says_fragments_held_are_counted_in_all(tmp_path):
    # `held` counts every fragment the table ever took, those of a datagram given
    # up too: "held 2" next to nothing held any more read as two still waiting
    from mbx.examples.capture import ether, ipv4, udp4, write_pcap

    body = udp4("198.18.0.1", "198.18.0.2", 1000, 2000, b"x" * 40)[20:]
    first = ether(ipv4("198.18.0.1", "198.18.0.2", 17, body[:24], ident=7, frag=0x2000))
    second = ether(ipv4("198.18.0.1", "198.18.0.2", 17, body[24:32], ident=7,
                        frag=0x2000 | 3))
    cap = tmp_path / "lost_last.pcap"           # the last fragment never came
    write_pcap(cap, [(1.0, first), (1.001, second)])
    r = mbx_cmd("run", "l2fwd", "--in", f"pcap:{cap}", "--json", str(tmp_path / "c.json"))
    assert r.returncode == 0, r.stderr
    fr = json.loads((tmp_path / "c.json").read_text())["fragments"]
    assert (fr["held"], fr["pending_at_end"]) == (2, 1)
    # ... and where they went: both with their datagram, none still held
    assert (fr["held_completed"], fr["held_discarded"], fr["held_pending"]) == (0, 2, 0)
    assert ("fragments      held in all 2 (0 rebuilt into datagrams, 2 discarded with "
            "theirs), reassembled 0,") in r.stdout


def test_the_summary_says_a_stop_cut_the_fragments_short(tmp_path):
    # After a signal the flows line said "ended at the stop" and the fragments line
    # "incomplete at the end of the input", of the same run.
    import io

    from mbxtest import fragment4

    from mbx import cli
    from mbx.examples.capture import ether, udp4, write_pcap
    from mbx.ports import open_input

    first = fragment4(ether(udp4("198.18.0.1", "198.18.0.2", 1000, 53, b"x" * 3000)),
                      1200)[0]
    cap = str(tmp_path / "one.pcap")
    write_pcap(cap, [(1.0, first)])
    inp = open_input("pcap:" + cap)
    try:
        c = mbx.App([]).run(inp)
    finally:
        inp.close()
    # and a run an error ended (an interface deleted) was not stopped: "at the stop"
    # had the reader look for a stop that never came
    c["flows"]["shutdown"] = 1
    # an error after the input's end (an NF's stop() raised) left the flows ended with
    # the input: only those ended early (shutdown_early) by the error ended at it
    for stopped, error, at_error, said in ((None, None, 0, "end of the input"),
                                           ("SIGINT", None, 0, "stop"),
                                           (None, "PortError", 1, "error"),
                                           (None, "NFError", 0, "end of the input")):
        c["stopped"], c["error"] = stopped, error
        c["flows"]["shutdown_early"] = at_error
        text = io.StringIO()
        cli._print_counters(c, 1.0, text)
        assert f"incomplete at the {said} 1" in text.getvalue()
        flows = "with the input" if said == "end of the input" else f"at the {said}"
        assert f"ended {flows} 1" in text.getvalue()


HANGING_STOP_NF = """import time
import mbx

def make(name="hangs", marker=""):
    nf = mbx.NF(name)
    nf.sub(mbx.PKT, lambda ev: None)
    def stop():
        if marker:
            open(marker, "w").close()
            return
        open(__file__ + ".stopping", "w").close()
        while True:
            time.sleep(0.1)
    nf.stop = stop
    return nf
"""


def test_a_stop_that_hangs_is_interrupted_and_the_others_still_stop(tmp_path,
                                                                    example_pcap):
    # A second Ctrl-C interrupts a stop() that never returns: the run ends
    # interrupted (exit 130), as it did before every NF's stop() came to be run
    # whatever another's raised; and the NF after it still stops.
    import signal

    for name in ("a", "b"):
        (tmp_path / f"{name}.py").write_text(HANGING_STOP_NF)
    marker = tmp_path / "b.stopped"
    p = subprocess.Popen([*MBX, "run", f"{tmp_path / 'a.py'}+{tmp_path / 'b.py'}",
                          "--in", f"pcap:{example_pcap}", "--set", "a.name=a",
                          "--set", "b.name=b", "--set", f"b.marker={marker}"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "a.py.stopping").exists():
            assert p.poll() is None, p.communicate()
            assert time.monotonic() < deadline, "stop() was never called"
            time.sleep(0.05)
        p.send_signal(signal.SIGINT)
        time.sleep(3.5)                     # past STOP_FORCE_AFTER_S
        p.send_signal(signal.SIGINT)
        out, err = p.communicate(timeout=20)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 130, err
    assert "mbx: interrupted: stopped again" in err
    assert marker.exists()


@pytest.mark.parametrize("cmd", ["run", "check", "example-capture", "flows", "types"])
def test_every_option_of_a_command_says_what_it_is(cmd):
    # mbx check's --set, example-capture's path and --seed, types' --fields had no
    # help: argparse then prints the name alone, with no text after it or below it
    r = mbx_cmd(cmd, "--help")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.split("positional arguments:", 1)[-1].splitlines()
    bare = [line.strip() for i, line in enumerate(lines)
            if re.fullmatch(r"  \S.*", line) and "  " not in line.strip()
            and not (i + 1 < len(lines) and re.match(r" {8,}\S", lines[i + 1]))
            and not line.strip().endswith(":")]
    assert not bare, bare
    if cmd == "example-capture":
        assert "(1)" in r.stdout        # the default seed, as --flows shows (200)


def test_flows_json_flag_is_documented_as_changing_nothing(example_pcap):
    # JSON is mbx flows' only format: --json is accepted and changes nothing, which
    # the guide and README said nowhere (their synopses made it look required)
    with_flag, without = (mbx_cmd("flows", example_pcap, *flag) for flag in (["--json"], []))
    assert with_flag.returncode == without.returncode == 0, with_flag.stderr
    assert json.loads(with_flag.stdout) == json.loads(without.stdout)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for doc in ("README.md", os.path.join("docs", "guide.md")):
        with open(os.path.join(root, doc)) as fh:
            text = " ".join(fh.read().split())
        assert "mbx flows CAPTURE [--json]" in text and "mbx flows CAPTURE --json" not in text
    assert "`--json` changes nothing" in text


def test_set_takes_the_chain_items_name_not_the_nfs(tmp_path):
    # As the guide says: the key of --set is the file's name without .py, whatever
    # the NF calls itself; the NF's own name is refused, the right key given.
    (tmp_path / "my_ids.py").write_text(
        "import mbx\n"
        "def make(min_len: int = 100):\n"
        "    nf = mbx.NF('detector')\n"
        "    print('min_len', min_len)\n"
        "    return nf\n")
    r = mbx_cmd("check", "my_ids.py", "--set", "my_ids.min_len=50", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "min_len 50" in r.stdout
    r = mbx_cmd("check", "my_ids.py", "--set", "detector.min_len=50", cwd=tmp_path)
    assert r.returncode != 0
    assert "detector" in r.stderr and "my_ids" in r.stderr


def test_json_says_the_configuration_the_run_used_and_makes_it_again(tmp_path,
                                                                     example_pcap,
                                                                     monkeypatch):
    # --json held the counters alone: which options (the file's, --flows', App's
    # defaults), NFs and ports gave them was nowhere in it
    from mbx.ports import open_input
    from mbx.runtime import App, load_app

    app = tmp_path / "app.toml"
    # (a filter and a failure policy change what the run does: they are config too)
    app.write_text('[stack]\nidle_timeout = 5\n[[nf]]\nuse = "flow_stats"\n'
                   'failure = "open"\nfilter = { proto = 17 }\n'
                   '[[nf]]\nuse = "logger"\noptions = { types = "FLOW/END", '
                   'path = "ends.jsonl" }\n')
    out = tmp_path / "c.json"
    r = mbx_cmd("run", str(app), "--in", f"pcap:{example_pcap}", "--flows", "5000",
                "--json", str(out), "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    doc = json.loads(out.read_text())
    assert doc["packets"] > 0 and doc["flows"]["created"] > 0     # the keys as before
    config = doc["config"]
    assert config["app"] == str(app)
    stack = config["stack"]
    assert (stack["flow_capacity"], config["given_by"]["flow_capacity"]) == (5000,
                                                                             "command line")
    assert (stack["idle_timeout"], config["given_by"]["idle_timeout"]) == (5, "app file")
    assert (stack["msg_capacity"], config["given_by"]["msg_capacity"]) == (65536, "default")
    assert stack["stack"] == "network" and stack["deploy"] == "inline"
    assert set(config["given_by"]) == set(stack)
    assert config["nfs"] == [
        {"name": "flow_stats", "use": "flow_stats", "options": {}, "filter": {"proto": 17},
         "failure": "open", "restart": 0, "restart_backoff": 0.1},
        {"name": "logger", "use": "logger",
         "options": {"types": "FLOW/END", "path": "ends.jsonl"}, "failure": "closed",
         "restart": 0, "restart_backoff": 0.1}]
    assert config["ports"] == {"in": f"pcap:{example_pcap}", "out": None}
    assert (config["burst"], config["max_packets"], config["stacks"]) == (64, 0, 1)
    # the configuration alone makes the run again: the same counts
    monkeypatch.chdir(tmp_path)             # (where the Logger's file was written)
    chain = "+".join(nf["use"] for nf in config["nfs"])
    nfs = load_app(chain, {nf["use"]: nf["options"] for nf in config["nfs"]})
    for nf, made in zip(nfs, config["nfs"], strict=True):
        if "filter" in made:
            nf.filter(None, **made["filter"])
        nf.failure = made["failure"]
    inp = open_input(config["ports"]["in"])
    try:
        again = App(nfs, **config["stack"]).run(inp, burst=config["burst"])
    finally:
        inp.close()
    for key in ("packets", "bytes", "sent", "flows", "events", "parse"):
        assert again[key] == doc[key], key
    # the filter's doing: flow_stats saw the UDP flows alone
    assert doc["nfs"]["flow_stats"]["report"] == again["nfs"]["flow_stats"]["report"]
    assert doc["nfs"]["flow_stats"]["report"]["flows"] < doc["flows"]["created"]


def test_json_config_of_a_chain_has_the_set_options_as_given(tmp_path, example_pcap):
    out = tmp_path / "c.json"
    r = mbx_cmd("run", "flow_stats+logger", "--in", f"pcap:{example_pcap}",
                "--set", "logger.path=ev.jsonl", "--overlap", "last", "--json", str(out),
                "-q", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    config = json.loads(out.read_text())["config"]
    assert config["app"] == "flow_stats+logger"
    assert config["nfs"][1] == {"name": "logger", "use": "logger",
                                "options": {"path": "ev.jsonl"}, "failure": None,
                                "restart": 0, "restart_backoff": 0.1}
    assert (config["stack"]["overlap"], config["given_by"]["overlap"]) == ("last",
                                                                           "command line")
    assert config["given_by"]["stack"] == "default"
