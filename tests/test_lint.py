"""ruff on the Python sources and cython-lint on the Cython sources, as tests."""
import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
    exe = shutil.which(name, path=os.path.dirname(sys.executable)) or shutil.which(name)
    if exe is None:
        pytest.fail(f"{name} is not installed: pip install --no-build-isolation -e "
                    f"'.[test]' installs it")
    return exe


def test_ruff():
    dirs = [d for d in ("mbx", "_mbx_main.py", "tests", "benchmarks")
            if os.path.exists(os.path.join(ROOT, d))]
    r = subprocess.run([_tool("ruff"), "check", *dirs], cwd=ROOT, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_cython_lint():
    # the core, and the Cython NFs (examples and built-ins)
    files = sorted(glob.glob(os.path.join(ROOT, "mbx", "*.pyx"))
                   + glob.glob(os.path.join(ROOT, "mbx", "*.pxd"))
                   + glob.glob(os.path.join(ROOT, "mbx", "examples", "*.pyx"))
                   + glob.glob(os.path.join(ROOT, "mbx", "nfs", "*.pyx")))
    assert files
    # cython-lint runs pycodestyle by name: find it beside this Python, which is not
    # on PATH when the venv's python is run without activating the venv.
    env = dict(os.environ, PATH=os.pathsep.join([os.path.dirname(sys.executable),
                                                 os.environ.get("PATH", "")]))
    r = subprocess.run([_tool("cython-lint"), *files], cwd=ROOT, capture_output=True,
                       text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
