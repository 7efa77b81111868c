"""The paper's function form (mbx.api) and how a script or a file's NFs are found:
what runs is what the user wrote, and nothing else runs in its place."""
import subprocess
import sys
import textwrap

MBX = [sys.executable, "-m", "mbx.cli"]

COUNTER = """
import mbx

class C(mbx.NF):
    def __init__(self, name):
        super().__init__(name)
        self.n = 0
        self.sub(mbx.FLOW_START, self.on)

    def on(self, ev):
        self.n += 1

    def report(self):
        return {"n": self.n}
"""


def _script(tmp_path, name, body):
    path = tmp_path / name
    path.write_text(COUNTER + textwrap.dedent(body))
    return str(path)


def _python(path, *args):
    return subprocess.run([sys.executable, path, *args], capture_output=True, text=True,
                          timeout=300)


def test_script_on_its_own_runs_the_nfs_mbx_run_finds(tmp_path, example_pcap):
    # A list of NFs at top level: mbx run runs both, and so must the script run on
    # its own; it ran an empty implicit NF instead, and both counted 0.
    path = _script(tmp_path, "two.py", """
        nfs = [C("a"), C("b")]
        mbx.mb_nf_run()
        print("counted", *[nf.n for nf in nfs])
        """)
    r = _python(path, "--in", f"pcap:{example_pcap}", "-q")
    assert r.returncode == 0, r.stderr
    a, b = map(int, r.stdout.split("counted", 1)[1].split())
    assert a == b > 0


def test_script_with_no_nf_it_can_find_is_refused(tmp_path, example_pcap):
    # An NF only a function's local holds: mbx run finds none, and says so; the
    # script on its own ran an implicit NF with no subscription, silently.
    path = _script(tmp_path, "local.py", """
        def main():
            a = C("a")
            mbx.mb_nf_run()
            print("counted", a.n)

        main()
        """)
    r = _python(path, "--in", f"pcap:{example_pcap}", "-q")
    assert r.returncode != 0
    assert "mb_nf_run() found no NF" in r.stderr and "local.py" in r.stderr
    assert "counted" not in r.stdout
    r = subprocess.run([*MBX, "run", path, "--in", f"pcap:{example_pcap}", "-q"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode != 0 and "defines no NF" in r.stderr
