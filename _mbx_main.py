"""The ``mbx`` command's entry point, outside the ``mbx`` package on purpose.

Naming ``mbx.cli:main`` as the entry point imports the package first (its Cython
extensions, the runtime), a good part of the command's start-up: a Ctrl-C in that
time raised KeyboardInterrupt before ``mbx.cli.main`` could catch it, and Python
printed a traceback.  Code here runs before any of ``mbx`` is imported.
"""
import os
import signal
import sys


def _interrupted_early(signum, frame):
    # A Ctrl-C between this module's import and the end of main()'s import of mbx
    # (the console script's own lines, where no except can catch it, and the
    # extensions' init, where one may swallow it): nothing is done yet, so stop as
    # main() would, without a traceback.
    sys.stderr.write("mbx: interrupted\n")
    sys.stderr.flush()
    os._exit(130)


# Only where SIGINT is Python's usual KeyboardInterrupt (not ignored, as under
# nohup), and only until main() has imported mbx.
if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    signal.signal(signal.SIGINT, _interrupted_early)


def main():
    try:
        # Importing mbx keeps the early handler: each Cython extension that uses
        # memoryviews registers its types with collections.abc.Sequence inside a bare
        # ``except: pass`` of Cython's own, and Python runs a signal's handler there
        # (in the ABC's __subclasshook__), so a KeyboardInterrupt raised then was
        # swallowed and the command ran to its end with exit 0.  Nothing has been
        # done before the import ends, so exiting at once is a clean stop.
        from mbx.cli import main as cli_main

        if signal.getsignal(signal.SIGINT) is _interrupted_early:
            signal.signal(signal.SIGINT, signal.default_int_handler)
        return cli_main()
    except KeyboardInterrupt:
        # Interrupted before mbx.cli.main's own handling (parsing the arguments):
        # the same stop as it makes for an interrupt it catches.
        print("mbx: interrupted", file=sys.stderr)
        return 130
