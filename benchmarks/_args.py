"""Option types and checks shared by the benchmark scripts.

Each type refuses a value the script cannot measure anything with, so a bad option
ends in argparse's one-line error naming it (exit 2), not a traceback or a table of
nan after minutes of work.  The scripts run as ``python benchmarks/x.py``, which puts
this directory first on ``sys.path``: ``import _args`` works there and under pytest.
"""
import argparse
import math
import os
import shutil

from mbx.cli import int_at_least as at_least  # noqa: F401  (the check mbx run uses)


def _finite(text):
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number")
    return x


def seconds(text):
    """A finite time above zero (nan and inf would never end or never start)."""
    x = _finite(text)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be more than 0 seconds")
    return x


def non_negative(text):
    """A finite number, 0 or more."""
    x = _finite(text)
    if x < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: must be 0 or more")
    return x


def inflight(text):
    """Bursts a pipelined stack runs ahead of its NFs, as mbx accepts them."""
    from mbx._pipeline import check_inflight

    k = at_least(1)(text)
    try:
        check_inflight(k)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc}") from None
    return k


def existing_file(text):
    """A file this process can read (an input, such as a capture to replay)."""
    if not os.path.isfile(text) or not os.access(text, os.R_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: no such readable file")
    return text


def program(text):
    """A program to run: a path to an executable, or a name found on PATH."""
    found = shutil.which(text)
    if found is None:
        raise argparse.ArgumentTypeError(f"{text!r}: no such executable")
    return found


def writable(text):
    """An output file, checked when the options are read, before the work: a run of
    minutes must not end in a traceback over where its figures go.  Missing parent
    directories are made, as the figures would have needed them anyway."""
    path = os.path.abspath(text)
    existed = os.path.exists(path)
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"{text!r}: {exc.strerror}") from None
    if not existed:
        os.remove(path)
    return text


def parse(parser, argv, quick):
    """Parse ``argv``; with ``--quick``, ``quick`` ({dest: value}) replaces the
    defaults, so options given explicitly still win over it."""
    args = parser.parse_args(argv)
    if args.quick:
        parser.set_defaults(**quick)
        args = parser.parse_args(argv)
    return args
