"""The paper's NF calls as functions (Listing 1 style).

They act on the *current* NF: the one the application loader is building while it
runs an NF file, or, in a script run on its own, an NF named after the script.
``mb_nf_run()`` enters the run loop: in a script run on its own it reads the ports
from the command line (``--in pcap:FILE [--out pcap:FILE]``); under ``mbx run`` the
loader runs the application itself and ``mb_nf_run()`` returns at once.
"""
import os
import sys
import threading

from mbx._events import NF, PubPort, dispatching_nf

_state = threading.local()


def _stack():
    if not hasattr(_state, "loading"):
        _state.loading = []         # [(collected NFs list, default name)]
        _state.implicit = None
    return _state


def current_nf():
    """The NF the mb_* calls act on: the one whose handler is running, else the one
    being loaded (created on first use)."""
    running = dispatching_nf()
    if running is not None:
        return running
    st = _stack()
    if st.loading:
        created, name = st.loading[-1]
        for nf in created:
            if getattr(nf, "_implicit", False):
                return nf
        nf = NF(name)
        nf._implicit = True
        created.append(nf)
        return nf
    if st.implicit is None:
        main = sys.modules.get("__main__")
        path = getattr(main, "__file__", None) or "nf"
        st.implicit = NF(os.path.splitext(os.path.basename(path))[0])
    return st.implicit


class loading:
    """Context of the app loader: NFs created inside are collected, mb_nf_run returns."""

    def __init__(self, default_name):
        self.created = []
        self.default_name = default_name

    def __enter__(self):
        _stack().loading.append((self.created, self.default_name))
        return self.created

    def __exit__(self, *exc):
        _stack().loading.pop()


def mb_sub(etype, handler, *, batch=False, side="sender"):
    """Subscribe ``handler`` to ``etype`` (and its descendants); ``side`` as for
    ``NF.sub``."""
    return current_nf().sub(etype, handler, batch=batch, side=side)


def mb_pub(etype, *, writes=False):
    """Announce a publication; returns the output port for ``mb_publish_event``."""
    return current_nf().pub(etype, writes=writes)


def mb_up_sub(etype, flow, handler, *, batch=False, side="sender"):
    """Switch this NF's handler for ``etype`` on ``flow`` (None unsubscribes)."""
    return current_nf().up_sub(etype, flow, handler, batch=batch, side=side)


def mb_new_msg(etype):
    """A new message of ``etype`` to fill in and publish."""
    return current_nf().new_msg(etype)


def mb_publish_event(port, msg):
    """Publish ``msg`` on the output port ``port``: as the NF whose handler is
    running (a port of another NF is refused, as ``NF.publish`` refuses it), else as
    the port's NF."""
    # never as port.nf from inside a handler: NF a holding NF b's port would publish
    # as b, and a subscriber would see b as the publisher of what a sent
    if not isinstance(port, PubPort):
        # said here, before current_nf() would make the script's implicit NF for it
        raise TypeError(f"mb_publish_event: {port!r} is not an output port (mb_pub() "
                        "returns one)")
    running = dispatching_nf()
    return (running if running is not None else port.nf).publish(port, msg)


def mb_nf_run(argv=None):
    """Enter the run loop (see the module doc)."""
    st = _stack()
    if st.loading:
        return None
    from mbx.cli import run_script
    from mbx.runtime import script_nfs

    # A script run on its own: the NFs mbx run would find in it (not an implicit NF
    # made here, which would run with nothing subscribed and count nothing)
    main = sys.modules.get("__main__", sys)
    nfs = script_nfs(vars(main), [st.implicit] if st.implicit is not None else [])
    if not nfs:
        # as run_script says an error: the command line's, no traceback
        from mbx.cli import failed
        from mbx.errors import AppError

        name = os.path.basename(getattr(main, "__file__", None) or sys.argv[0] or "python")
        why = ("its make() is for mbx run, which calls it: run the file so (mbx run "
               f"{name} --in PORT), or create its NFs at the top level"
               if callable(vars(main).get("make")) else
               "nor would mbx run: create mbx.NF(...) under a global name, or a list of "
               "them, or call mb_sub before it")
        # said under the script's own name, as its other errors are
        sys.exit(failed(AppError(f"mb_nf_run() found no NF ({why})"), name))
    return run_script(nfs, sys.argv[1:] if argv is None else argv)
