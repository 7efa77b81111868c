"""Optional restart of a dead NF process in the pipelined deployment: the stack
recovers what it held, applies its failure policy while it is down, and forks it again
from its pre-fork copy, which then gets the events of the following epochs."""
import json
import os
import pathlib
import signal
import subprocess
import sys

import pytest
from mbxtest import read_frames, run_app
from test_pipelined import FileRecorder, assert_baseline

import mbx
from mbx import cli
from mbx.controller import load_app_file
from mbx.nfs.logger import Logger
from mbx.pipeline import restart_of


class Crasher(mbx.NF):
    """Logs "pid ts" for each packet it handles (line-buffered, so a killed process
    loses nothing), and crashes on its ``after``-th packet: once (``marker`` is
    created then), or in every process (``marker`` None).  ``then_after`` is when a
    restarted process crashes, once the marker exists."""

    def __init__(self, log, after, how, marker=None, then_after=0, name="crash", **kw):
        super().__init__(name)
        self.log, self.after, self.how = str(log), after, how
        self.marker = str(marker) if marker else None
        self.then_after = then_after
        self.n = 0
        self.fh = None
        for key, value in kw.items():
            setattr(self, key, value)
        self.sub(mbx.PKT, self.on_pkt)

    def crash(self):
        if self.how == "raise":
            raise RuntimeError("kaput")
        if self.how == "exit":
            os._exit(7)
        os.kill(os.getpid(), signal.SIGKILL)

    def on_pkt(self, ev):
        self.n += 1
        if self.marker is None:
            if self.n == self.after:
                self.crash()
        elif not os.path.exists(self.marker):
            if self.n == self.after:
                open(self.marker, "w").close()
                self.crash()
        elif self.then_after and self.n == self.then_after:
            self.crash()
        if self.fh is None:
            self.fh = open(self.log, "a", buffering=1)
        self.fh.write(f"{os.getpid()} {ev.ts}\n")

    def stop(self):
        if self.fh is not None:
            self.fh.close()


def lives(log):
    """{pid: packets it logged}, in the order the processes started."""
    out = {}
    for line in log.read_text().splitlines():
        pid = int(line.split()[0])
        out[pid] = out.get(pid, 0) + 1
    return out


def gone(pids):
    return all(not os.path.exists(f"/proc/{pid}") for pid in pids)


REASONS = {"raise": "kaput", "exit": "exited with status 7", "kill": "killed by SIGKILL"}


@pytest.mark.parametrize("inflight", [1, 4, 16])
@pytest.mark.parametrize("failure", ["open", "closed"])
@pytest.mark.parametrize("how", ["raise", "exit", "kill"])
def test_restarted_nf_gets_later_events(example_pcap, tmp_path, failure, how, inflight):
    frames = read_frames(example_pcap)
    shm_before = set(os.listdir("/dev/shm"))
    log, rec = tmp_path / "crash.log", tmp_path / "after.rec"
    nfs = [Crasher(log, 100, how, tmp_path / "crashed", failure=failure, restart=3,
                   restart_backoff=0),
           FileRecorder("after", str(rec), types=("PKT",))]
    c, out = run_app(nfs, example_pcap, deploy="pipelined", burst=4, inflight=inflight)
    p = c["pipeline"]
    n = p["nfs"]["crash"]
    assert n["restarts"] == 1 and n["restart_limit"] == 3
    assert len(n["deaths"]) == 1 and REASONS[how] in n["deaths"][0]
    assert n["state"] == "ok" and p["nfs"]["after"]["state"] == "ok"
    assert n["forwarded_for_it"] > 0
    assert_baseline(c)
    pids = lives(log)
    assert len(pids) == 2, pids
    first, second = pids.values()
    assert first == 99 and second > 0           # the restarted process got events
    assert gone(pids) and set(os.listdir("/dev/shm")) <= shm_before
    held = c["fragments_held"]
    if failure == "open":
        # bypassed while down: every packet still leaves, the next NF sees them all
        assert len(out) == len(frames) - held
        assert len(rec.read_text().splitlines()) == len(out)
        assert n["drops"] == 0
    else:
        # what it did not handle (those while it was down, and the packet it died
        # on: killed holding it, or its handler raised on it without a verdict) is
        # dropped, and counted as its drops
        handled = first + second
        assert len(out) == handled < len(frames) - held
        assert c["dropped_by_nf"] == n["drops"] == len(frames) - held - handled


def test_restart_limit_reached(example_pcap, tmp_path):
    # It crashes on its 40th packet in every process: 2 restarts, then it stays down
    # (fail-open: bypassed to the end).
    frames = read_frames(example_pcap)
    log = tmp_path / "crash.log"
    nfs = [Crasher(log, 40, "raise", failure="open", restart=2, restart_backoff=0)]
    c, out = run_app(nfs, example_pcap, deploy="pipelined", burst=4)
    n = c["pipeline"]["nfs"]["crash"]
    assert n["restarts"] == 2 and n["state"] == "failed"
    assert len(n["deaths"]) == 3 and n["deaths"][-1].endswith("restart limit reached")
    assert list(lives(log).values()) == [39, 39, 39]
    assert len(out) == len(frames) - c["fragments_held"]
    assert_baseline(c)


def test_no_restart_loop_when_it_fails_at_once(example_pcap, tmp_path):
    # Restarted, it dies on its first packet, before finishing an epoch: it is not
    # restarted again, however many restarts are left (fail-closed from then on).
    log = tmp_path / "crash.log"
    nfs = [Crasher(log, 50, "kill", tmp_path / "crashed", then_after=1, failure="closed",
                   restart=5, restart_backoff=0)]
    c, out = run_app(nfs, example_pcap, deploy="pipelined", burst=4)
    n = c["pipeline"]["nfs"]["crash"]
    assert n["restarts"] == 1 and n["state"] == "died"
    assert len(n["deaths"]) == 2
    assert n["deaths"][-1] == ("killed by SIGKILL; not restarted: it died before "
                               "finishing an epoch")
    assert list(lives(log).values()) == [49]
    assert len(out) == 49
    assert_baseline(c)


def test_backoff_keeps_it_down(example_pcap, tmp_path):
    # A back-off longer than the run: it stays down under its policy, and the run
    # does not wait for it.
    frames = read_frames(example_pcap)
    log = tmp_path / "crash.log"
    nfs = [Crasher(log, 30, "raise", tmp_path / "crashed", failure="open", restart=1,
                   restart_backoff=3600)]
    c, out = run_app(nfs, example_pcap, deploy="pipelined", burst=4)
    n = c["pipeline"]["nfs"]["crash"]
    assert n["restarts"] == 0 and n["state"] == "failed"
    assert len(lives(log)) == 1
    assert len(out) == len(frames) - c["fragments_held"]
    assert_baseline(c)


def test_no_policy_but_restart_keeps_the_run(example_pcap, tmp_path):
    # Without a failure policy a handler error ends the run, unless it is restarted.
    log = tmp_path / "crash.log"
    c, _ = run_app([Crasher(log, 30, "raise", tmp_path / "crashed", restart=1,
                            restart_backoff=0)],
                   example_pcap, deploy="pipelined", burst=4)
    assert c["pipeline"]["nfs"]["crash"]["restarts"] == 1
    with pytest.raises(mbx.MbxError, match="kaput"):
        run_app([Crasher(tmp_path / "again.log", 30, "raise", restart=0)],
                example_pcap, deploy="pipelined", burst=4)


@pytest.mark.parametrize("how", ["raise", "exit", "kill"])
def test_death_the_run_end_overtook_is_recorded(example_pcap, tmp_path, how):
    # Seen dead, its restart waiting for a back-off the run does not last: the death
    # is still recorded, and why it was not restarted.
    log = tmp_path / "crash.log"
    nfs = [Crasher(log, 300, how, failure="open", restart=2, restart_backoff=3600)]
    c, _ = run_app(nfs, example_pcap, deploy="pipelined", burst=4)
    n = c["pipeline"]["nfs"]["crash"]
    assert n["restarts"] == 0 and n["restart_limit"] == 2
    assert len(n["deaths"]) == 1 and REASONS[how] in n["deaths"][0]
    assert n["deaths"][0].endswith("; not restarted: the run ended")
    assert_baseline(c)


class DiesInStop(Crasher):
    """A Crasher whose process, unless it crashed, exits with status 7 in stop(),
    after the run's last epoch: no check during the run sees it die."""

    crashed = False

    def crash(self):
        self.crashed = True
        super().crash()

    def stop(self):
        super().stop()
        if not self.crashed:
            os._exit(7)


@pytest.mark.parametrize("restart, why", [
    (0, "exited with status 7"),
    (1, "exited with status 7; not restarted: the run ended"),
])
def test_death_after_the_last_epoch_is_recorded(example_pcap, tmp_path, restart, why):
    nf = DiesInStop(tmp_path / "crash.log", 0, "exit", failure="open", restart=restart,
                    restart_backoff=0)
    c, _ = run_app([nf], example_pcap, deploy="pipelined", burst=4)
    n = c["pipeline"]["nfs"]["crash"]
    assert n["state"] == "died" and n["deaths"] == [why]
    assert os.waitstatus_to_exitcode(n["exit_status"]) == 7


def test_restarted_process_of_a_failed_nf_can_die_too(example_pcap, tmp_path):
    # Its first process's handler raises (that process then leaves cleanly); the
    # restarted one exits in stop(): both deaths are recorded, and its state is "died".
    nf = DiesInStop(tmp_path / "crash.log", 100, "raise", tmp_path / "crashed",
                    failure="open", restart=3, restart_backoff=0)
    c, _ = run_app([nf], example_pcap, deploy="pipelined", burst=4)
    n = c["pipeline"]["nfs"]["crash"]
    assert n["restarts"] == 1 and n["state"] == "died"
    assert len(n["deaths"]) == 2 and "kaput" in n["deaths"][0]
    assert n["deaths"][1] == "exited with status 7; not restarted: the run ended"


@pytest.mark.parametrize("bad, why", [
    ("restart = -1", "restart must be a whole number"),
    ("restart = 1.5", "restart must be a whole number"),
    ("restart_backoff = \"soon\"", "restart_backoff must be seconds"),
])
def test_app_file_restart_refused(tmp_path, bad, why):
    app = tmp_path / "app.toml"
    app.write_text(f'[[nf]]\nuse = "l2fwd"\nfailure = "open"\n{bad}\n')
    with pytest.raises(mbx.AppError, match=f"NF l2fwd: {why}"):
        load_app_file(str(app))


@pytest.mark.parametrize("deploy", ["inline", "pipelined"])
@pytest.mark.parametrize("attr, value, why", [
    ("failure", "maybe", "failure must be 'open' or 'closed', not 'maybe'"),
    ("restart", 5000, "restart must be a whole number of restarts from 0 to 1000"),
    ("restart_backoff", -1, "restart_backoff must be seconds"),
])
def test_bad_failure_policy_refused_in_every_deployment(example_pcap, deploy, attr, value,
                                                        why):
    # Inline, an App took them in silence (they apply only pipelined), while
    # pipelined runs and application files refused them.
    nf = mbx.NF("policy")
    nf.sub(mbx.PKT, lambda ev: None)
    setattr(nf, attr, value)
    with pytest.raises(mbx.AppError, match=f"NF policy: {why}"):
        run_app([nf], example_pcap, deploy=deploy)


def test_app_file_restart(tmp_path):
    app = tmp_path / "app.toml"
    app.write_text('[[nf]]\nuse = "l2fwd"\nfailure = "open"\nrestart = 3\n'
                   'restart_backoff = 0.5\n')
    nf = load_app_file(str(app)).nfs[0]
    assert (nf.restart, nf.restart_backoff) == (3, 0.5)


def test_failure_policy_defaults_on_every_nf(tmp_path):
    # An NF has the three attributes api.md documents whether or not its code sets
    # them; an application file that leaves restart out keeps what the code set.
    nf = mbx.NF("plain")
    assert (nf.failure, nf.restart, nf.restart_backoff) == (None, 0, 0.1)
    assert restart_of(nf) == (0, 0.1)
    src = tmp_path / "keeps.py"
    src.write_text("import mbx\n"
                   "def make():\n"
                   "    nf = mbx.NF('keeps')\n"
                   "    nf.restart = 2\n"
                   "    return nf\n")
    app = tmp_path / "app.toml"
    app.write_text('[[nf]]\nuse = "keeps.py"\n')
    nf = load_app_file(str(app)).nfs[0]
    assert (nf.failure, nf.restart, nf.restart_backoff) == ("closed", 2, 0.1)


FULL_RINGS_LIMIT = 60         # seconds


class Slow(mbx.NF):
    """After the crasher: slow enough that the rings hold several epochs."""

    def __init__(self):
        super().__init__("slow")
        self.sub(mbx.PKT, self.on_pkt)

    def on_pkt(self, ev):
        for _ in range(2000):
            pass


def run_with_full_rings(capture, tmp, failure):
    """test_restart_with_full_rings's run: its counters and how many frames it sent
    (called in a process of its own)."""
    tmp = pathlib.Path(tmp)
    nfs = [Crasher(tmp / "crash.log", 300, "kill", tmp / "crashed", failure=failure,
                   restart=1, restart_backoff=0), Slow()]
    c, out = run_app(nfs, capture, deploy="pipelined", burst=4, inflight=16, ring_size=64)
    return c, len(out)


@pytest.mark.parametrize("failure", ["open", "closed"])
def test_restart_with_full_rings(example_pcap, tmp_path, failure):
    # It dies holding several epochs in flight, its ring full behind it: the stack
    # recovers them by its policy and the restarted process takes the ring over at
    # an epoch boundary, with nothing lost or seen twice.
    # Run in a process of its own with a time limit: a ring overrun (entries pushed
    # past a full ring) made this run hang rather than fail.
    frames = read_frames(example_pcap)
    code = (f"import json, sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); "
            f"from test_restart import run_with_full_rings; print(json.dumps("
            f"run_with_full_rings({example_pcap!r}, {str(tmp_path)!r}, {failure!r})))")
    # a session of its own: on time-out its NF processes are killed with it
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=FULL_RINGS_LIMIT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        _, stderr = proc.communicate()
        pytest.fail(f"the pipelined run with full rings did not end within "
                    f"{FULL_RINGS_LIMIT} s (it takes well under one): hung; "
                    f"stderr: {stderr[-2000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    c, sent = json.loads(stdout.splitlines()[-1])
    p = c["pipeline"]
    assert p["nfs"]["crash"]["restarts"] == 1 and p["max_in_flight"] > 1
    assert_baseline(c)
    first, second = lives(tmp_path / "crash.log").values()
    assert first == 299 and second > 0
    held = c["fragments_held"]
    if failure == "open":
        assert sent == len(frames) - held
    else:
        assert sent == first + second
        assert c["dropped_by_nf"] == len(frames) - held - first - second


def test_cli_summary_shows_restarts(example_pcap, tmp_path, capsys):
    nf_file = tmp_path / "crashy.py"
    nf_file.write_text(f"""
import os
import mbx
from mbx import cli

nf = mbx.NF("crashy")
n = [0]


def on_pkt(ev):
    n[0] += 1
    if n[0] == 200 and not os.path.exists({str(tmp_path / "crashed")!r}):
        open({str(tmp_path / "crashed")!r}, "w").close()
        os._exit(5)


nf.sub("PKT", on_pkt)
""")
    app = tmp_path / "app.toml"
    app.write_text(f'[[nf]]\nuse = "{nf_file}"\nfailure = "open"\nrestart = 2\n'
                   'restart_backoff = 0\n')
    rc = cli.main(["run", str(app), "--deploy", "pipelined", "--in", "pcap:" + example_pcap,
                   "--burst", "8"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "restarts 1 of 2\n    died: exited with status 5\n" in out


def test_cli_summary_shows_a_death_the_run_end_overtook(example_pcap, tmp_path, capsys):
    # The NF of the report: it dies on its 500th event, and the run ends before its
    # restart (a back-off longer than the run).
    nf_file = tmp_path / "nf.py"
    nf_file.write_text("""
import os
import mbx

nf = mbx.NF("crashy")
nf.failure, nf.restart, nf.restart_backoff = "open", 2, 3600
n = [0]


def on_pkt(ev):
    n[0] += 1
    if n[0] == 500:
        os._exit(7)


nf.sub("PKT", on_pkt)
""")
    rc = cli.main(["run", str(nf_file), "--deploy", "pipelined", "--in",
                   "pcap:" + example_pcap])
    assert rc == 0
    out = capsys.readouterr().out
    assert ("died (failure open)\n    restarts 0 of 2\n"
            "    died: exited with status 7; not restarted: the run ended\n") in out
    # without a restart policy the death is shown too (it was only with one)
    nf_file.write_text(nf_file.read_text().replace(
        'nf.failure, nf.restart, nf.restart_backoff = "open", 2, 3600',
        'nf.failure = "open"'))
    assert cli.main(["run", str(nf_file), "--deploy", "pipelined", "--in",
                     "pcap:" + example_pcap]) == 0
    out = capsys.readouterr().out
    assert "died (failure open)\n    died: exited with status 7" in out
    assert "restarts" not in out


@pytest.mark.parametrize("inflight", [1, 4])
@pytest.mark.parametrize("lead", [True, False])
@pytest.mark.parametrize("failure, merge", [("open", "any"), ("closed", "any"),
                                            ("closed", "all")])
def test_restarted_group_member_rejoins_the_fan_out(example_pcap, tmp_path, failure, merge,
                                                    lead, inflight):
    # A member of a parallel group of two dies on its 100th packet and is restarted:
    # bypassed (open) or its packets dropped (closed: its votes, with merge "all")
    # while down, then it gets the group's messages again from the next epoch on;
    # its mate sees every packet, and the stack's merge waits for it as for any
    # member.
    frames = read_frames(example_pcap)
    log, rec = tmp_path / "crash.log", tmp_path / "after.rec"
    crash = Crasher(log, 100, "kill", tmp_path / "crashed", group="g", failure=failure,
                    restart=3, restart_backoff=0)
    mate = FileRecorder("mate", str(tmp_path / "mate.rec"), types=("PKT",), group="g")
    crash.group_merge = mate.group_merge = merge
    nfs = ([crash, mate] if lead else [mate, crash]) + [
        FileRecorder("after", str(rec), types=("PKT",))]
    c, out = run_app(nfs, example_pcap, deploy="pipelined", burst=4, inflight=inflight)
    p = c["pipeline"]
    n = p["nfs"]["crash"]
    assert n["restarts"] == 1 and len(n["deaths"]) == 1 and "SIGKILL" in n["deaths"][0]
    assert n["state"] == p["nfs"]["mate"]["state"] == p["nfs"]["after"]["state"] == "ok"
    assert n["parallel_with"] == ["mate"] and n["forwarded_for_it"] > 0
    assert_baseline(c)
    held = c["fragments_held"]
    first, second = lives(log).values()
    assert first == 99 and second > 0
    # the mate sees every packet whatever happens to the crashing member
    assert len((tmp_path / "mate.rec").read_text().splitlines()) == len(frames) - held
    seen = len(rec.read_text().splitlines())
    handled = first + second
    if failure == "open":
        assert len(out) == len(frames) - held == seen
        assert n["drops"] == 0
    elif merge == "any":
        # dropped: what it did not handle (while down, and the packet it was killed on)
        assert len(out) == seen == handled < len(frames) - held
        assert c["dropped_by_nf"] == n["drops"] == len(frames) - held - handled
    else:
        # its votes to drop those, which its mate (never dropping) outvotes
        assert len(out) == len(frames) - held == seen
        assert c["dropped_by_nf"] == 0 and n["drops"] == len(frames) - held - handled


def test_restart_of_a_group_member_from_an_app_file(example_pcap, tmp_path):
    # restart = N on a member of a group: accepted (it used to be refused)
    app = tmp_path / "app.toml"
    app.write_text('[[nf]]\nuse = "flow_stats"\ngroup = "g"\nrestart = 2\n'
                   '[[nf]]\nuse = "l2fwd"\ngroup = "g"\n')
    spec = load_app_file(str(app))
    assert [nf.restart for nf in spec.nfs] == [2, 0]
    c, _ = run_app(spec.nfs, example_pcap, deploy="pipelined")
    assert c["pipeline"]["nfs"]["flow_stats"]["restart_limit"] == 2


def test_restarted_member_of_a_group_with_a_merge_function(example_pcap, tmp_path):
    # 2 of 3 decide; the crashing member (closed) votes to drop everything it misses
    # while down, and its mate "a" drops web and DNS: the function sees those votes, and
    # the restarted member's (none) after it rejoined.
    from test_pipelined import DropPort

    frames = read_frames(example_pcap)
    log = tmp_path / "crash.log"
    calls = []

    def two_of_three(dropped):
        calls.append(dropped)
        return len(dropped) >= 2

    crash = Crasher(log, 100, "kill", tmp_path / "crashed", group="g", failure="closed",
                    restart=3, restart_backoff=0)
    a, c = DropPort("a", (80, 53)), DropPort("c", ())
    nfs = [a, crash, c]
    for nf in nfs:
        nf.group_merge = two_of_three
    counters, out = run_app(nfs, example_pcap, deploy="pipelined", burst=4, inflight=4)
    n = counters["pipeline"]["nfs"]["crash"]
    assert n["restarts"] == 1 and n["state"] == "ok"
    assert_baseline(counters)
    handled = sum(lives(log).values())
    missed = len(frames) - counters["fragments_held"] - handled
    assert missed > 0
    # its votes while down, each seen by the function once; and a's
    assert sum("crash" in d for d in calls) == n["drops"] == missed
    assert sum("a" in d for d in calls) == counters["nfs"]["a"]["drops"] > 0
    assert all(d <= {"a", "crash"} for d in calls)
    both_ = sum(d == {"a", "crash"} for d in calls)
    assert counters["dropped_by_nf"] == both_ > 0
    assert len(out) == len(frames) - counters["fragments_held"] - both_


class CrashingLogger(Logger):
    """The built-in Logger, each line flushed, crashing once on its 60th event."""

    def __init__(self, path, marker):
        super().__init__("logger", path, types="PKT")
        self.marker = str(marker)
        self.failure, self.restart, self.restart_backoff = "open", 1, 0

    def on_event(self, ev):
        super().on_event(ev)
        self.out.flush()
        if self.events == 60 and not os.path.exists(self.marker):
            open(self.marker, "w").close()
            os._exit(7)


def test_restarted_logger_appends_to_the_file_the_run_opened(example_pcap, tmp_path):
    # The file is opened once, by NF.start() before the NF process is forked: the
    # restarted process writes on after the lines of the first, and does not start
    # the file afresh.
    log = tmp_path / "events.jsonl"
    c, _ = run_app([CrashingLogger(log, tmp_path / "crashed")], example_pcap,
                   deploy="pipelined", burst=4)
    assert c["pipeline"]["nfs"]["logger"]["restarts"] == 1
    ts = [json.loads(line)["ts_ns"] for line in log.read_text().splitlines()]
    assert len(ts) > 60 and ts == sorted(ts)
    first_ts, _ = read_frames(example_pcap)[0]
    assert round(ts[0] / 1000) == round(first_ts * 1e6)     # the first life's lines
