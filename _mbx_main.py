"""The ``mbx`` command's entry point, outside the ``mbx`` package on purpose.

Naming ``mbx.cli:main`` as the entry point imports the package first (its Cython
extensions, the runtime), a good part of the command's start-up: a Ctrl-C in that
time raised KeyboardInterrupt before ``mbx.cli.main`` could catch it, and Python
printed a traceback.  Code here runs before any of ``mbx`` is imported.
"""
import sys


def main():
    try:
        from mbx.cli import main as cli_main

        return cli_main()
    except KeyboardInterrupt:
        # Interrupted before mbx.cli.main's own handling (importing, parsing the
        # arguments): the same stop as it makes for an interrupt it catches.
        print("mbx: interrupted", file=sys.stderr)
        return 130
