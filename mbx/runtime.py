"""Inline deployment: load the NFs of an application and run them over a port.

An application here is a chain of NFs given as ``a+b+c`` where each item is a
built-in NF (``mbx.nfs``), a Python file, or ``module:attribute``.  (Application
files in TOML, with filters and parallel groups, build on this.)
"""
import contextlib
import importlib
import inspect
import os
import re
import runpy
import stat
import sys
import types
import typing

from mbx import _events, api
from mbx._events import NF, EventBus, NFError
from mbx._flow import CAPACITY_MAX, FLOW_POLICIES
from mbx._monitor import (
    CHECKSUM_POLICIES,
    OVERLAP_POLICIES,
    STREAM_DEFAULTS,
    TcpMonitor,
    check_stream_options,
)
from mbx._packet import Port
from mbx._pipeline import check_inflight
from mbx._stack import MALFORMED_ACTIONS, NetworkLayer
from mbx.errors import (
    AppError,
    CaptureFormatError,
    EventTypeError,
    MbxError,
    OptionError,
    PortError,
    did_you_mean,
    exc_text,
    raising_line,
    user_code_line,
)

# The types only the TCP Monitor produces: an application with a subscriber to one
# of them (or a publisher of FLOW/TCP/TERMINATE) runs the Monitor; otherwise the
# Network Layer alone does the work (no TCP state is kept that nobody asked for).
_TCP_TYPES = [_events.PKT_TCP, _events.FLOW_TCP, _events.DATA_RDY]
_MONITOR_OPTIONS = ("stream_memory", "chunk_size", "stream_window", "retain",
                    "max_streams", "overlap", "checksums", "summarise")

BUILTIN_NFS = ("l2fwd", "flow_stats", "logger", "l4lb")
FLOW_CAPACITY = 65536       # flows a stack tracks unless told otherwise
# a run still going this long after the first stop signal (an NF handler that never
# returns holds it) is interrupted by the next: mbx run, and run_parallel's stacks
STOP_FORCE_AFTER_S = 3.0
# ... and a stack process that even that leaves running is killed this much later
STOP_KILL_AFTER_S = 1.0

# (k, n): this process is stack process k of the n that run_parallel started.
_stack_process = (0, 1)


def opened(out):
    """``out``, or the port it opens when it is a function (see ``App.run``)."""
    return out() if callable(out) and not isinstance(out, Port) else out


def check_writable(path, what):
    """Refuse, before any work is done, a file that could not be written at the end
    of a run: ``what`` names the option or NF in the message."""
    if not path:
        raise AppError(f"{what}: the path is empty: name a file")
    where = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise AppError(f"{what}: path {path!r} is a directory, not a file")
    if not os.path.isdir(where):
        raise AppError(f"{what}: path {path!r}: directory {where} does not exist")
    if not os.access(where, os.W_OK) or (os.path.exists(path)
                                          and not os.access(path, os.W_OK)):
        raise AppError(f"{what}: path {path!r}: cannot write in {where}")


def check_output_free(path, what):
    """Refuse to write over a capture this process is reading as its input (its
    bytes would be gone mid-read) or a file it writes already (a pcap output, another
    NF's log: the two would interleave); PcapWriter refuses the same."""
    from mbx import _pcap

    try:
        st = os.stat(path)
    except OSError:
        return
    if (st.st_dev, st.st_ino) in _pcap._being_read:
        raise AppError(f"{what}: {path!r} is the capture being read as the input; "
                       "writing it would destroy it: name another file")
    try:
        _pcap.refuse_second_writer((st.st_dev, st.st_ino), path, what)
    except PortError as exc:
        raise AppError(str(exc)) from None


def output_clash(nfs, lines=None):
    """The first file two of ``nfs`` say they write (``writes_files``), as (j, why):
    NF j writes a file an NF before it writes too; else None.  ``lines`` (per NF,
    its line in an application file) places the first NF.  Found from the NFs'
    declarations, before any of them opens a file: at start() the second would be
    refused (``check_output_free``) only once the first had truncated the file,
    for a run that never happens."""
    seen = {}
    for j, nf in enumerate(nfs):
        for path in getattr(nf, "writes_files", ()):
            try:
                st = os.stat(path)
                key = (st.st_dev, st.st_ino)
            except OSError:     # not there yet: one file however it is spelt
                key = os.path.realpath(path)
            i = seen.setdefault(key, j)
            if i != j:
                first = f" (line {lines[i]})" if lines and lines[i] else ""
                return j, (f"NF {nf.name}: {path!r} is written by NF {nfs[i].name}"
                           f"{first} too; two writers would interleave their bytes: "
                           "name another file")
    return None


def output_path(path):
    """The file this process should write for ``path``: ``path`` itself, or
    ``path.stackK`` in stack process K of a ``run_parallel`` run, so that stack
    processes never write over one another (pcap outputs, Logger files); a path
    that is not a regular file (``writes_as_is``) is ``path`` in every process."""
    k, n = _stack_process
    return f"{path}.stack{k}" if n > 1 and not writes_as_is(path) else path


def inherited_fd(path):
    """The descriptor ``path`` names when it is one this process was given
    (/dev/stdout, /dev/stderr, /dev/fd/N, /proc/self/fd/N), else None.  Such a path
    is written through that descriptor (a ``dup`` of it), never opened anew: opened
    anew, a descriptor redirected to a regular file gives a second file offset,
    from 0 and truncated ("w"), so what the process writes through the other (the
    summary, another stack process's lines) and what it writes through this one
    overwrite each other."""
    p = os.path.abspath(path)
    named = {"/dev/stdin": 0, "/dev/stdout": 1, "/dev/stderr": 2}
    if p in named:
        return named[p]
    for head in ("/dev/fd/", "/proc/self/fd/"):
        if p.startswith(head) and p[len(head):].isdigit():
            return int(p[len(head):])
    return None


def writes_as_is(path):
    """Is ``path`` something other than a regular file (a device such as /dev/null
    or a terminal, a FIFO, a socket), or a descriptor the process was given
    (``inherited_fd``)?  Every stack process then writes it as it is:
    ``path.stackK`` beside it would be a new regular file (/dev/null.stack0), not
    what the user named.  A regular file under /dev (/dev/shm/log.jsonl) is a file
    like any other: one per stack process."""
    if inherited_fd(path) is not None:
        # /dev/stdout or /dev/fd/1 redirected to a file is a regular file to stat, but
        # a new file in /dev (/dev/stdout.stack0) is never what was meant
        return True
    try:
        return not stat.S_ISREG(os.stat(path).st_mode)
    except OSError:         # not there yet: a file the run creates
        return False


def _as_nfs(obj, where):
    if isinstance(obj, NF):
        return [obj]
    if isinstance(obj, list | tuple) and obj and all(isinstance(o, NF) for o in obj):
        return list(obj)
    raise AppError(f"{where}: expected an NF or a list of NFs, got {obj!r}")


def _option_names(factory):
    """The keyword options ``factory`` takes (None: any, or it cannot be told)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return None
    return [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _make(factory, options, where):
    known = _option_names(factory)
    unknown = sorted(set(options) - set(known)) if known is not None else []
    if unknown:
        shown = [k for k in known if k != "name"]     # the NF's name: not an option to tune
        raise OptionError(f"{where}: unknown option(s) {', '.join(unknown)}; it takes "
                          + (", ".join(shown) if shown else
                             "only name" if "name" in known else "none"), unknown[0])
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        signature = None
    if signature is not None:
        try:
            # annotations as types, also in a file with `from __future__ import
            # annotations`, where they are strings
            typed = inspect.signature(factory, eval_str=True)
        except Exception:       # a name the annotation uses is not defined
            typed = signature
        options = _typed_options(typed, options, where)
        try:
            signature.bind(**options)
        except TypeError as exc:
            given = f"options {options}" if options else "no options"
            raise AppError(f"{where}: cannot be called with {given}: {exc}") from None
    try:
        return _as_nfs(factory(**options), where)
    except EventTypeError as exc:
        # its options name a type nobody registered yet (the message says why)
        raise AppError(f"{where}: {exc}") from None
    except MbxError:
        raise
    except Exception as exc:
        raise AppError(f"{where}: {exc_text(exc)}{user_code_line(exc)}") from exc


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_KIND_WORDS = {bool: "true or false", int: "an integer", float: "a number",
               str: "a string"}


def _scalar(annotation):
    """bool, int or float when ``annotation`` is one, or one of them or None
    (``int | None``, ``Optional[int]``: the text is then that type's), else None."""
    if annotation in (bool, int, float):
        return annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if (typing.get_origin(annotation) in (typing.Union, types.UnionType)
            and len(args) == 1 and args[0] in (bool, int, float)):
        return args[0]
    return None


def _typed_options(signature, options, where):
    """Options given as text (``--set NF.KEY=VALUE``) made the type the factory
    declares for them, by annotation or else by its default's type (int, float,
    bool); text for parameters of other types passes as it is.  A value with a type
    of its own (an application file's ``options``) must be of that type already (an
    int for a float is made one; a bool is no int), or ``str`` where the annotation
    says so.  A value that does not fit is refused here, naming the option, not by
    make() or the NF's first packet."""
    typed = dict(options)
    for key, value in options.items():
        param = signature.parameters.get(key)
        if param is None:
            continue
        kind = _scalar(param.annotation) or (
            type(param.default) if type(param.default) in (bool, int, float) else None)
        if not isinstance(value, str):
            # a value with a type of its own (an application file's TOML) is held to
            # the type the text would be made, not passed for make() to trip on
            if value is None and type(None) in typing.get_args(param.annotation):
                continue
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                typed[key] = float(value)       # 2 where a number is wanted: 2.0
                continue
            if kind is None and str in (param.annotation, *typing.get_args(param.annotation)):
                kind = str
            if kind is not None and not (isinstance(value, kind) and (
                    kind is bool or not isinstance(value, bool))):
                raise OptionError(f"{where}: option {key}={value!r}: expected "
                                  f"{_KIND_WORDS[kind]}", key)
            continue
        if kind is None:
            continue
        text = value.strip().lower()
        if text == "none" and type(None) in typing.get_args(param.annotation):
            typed[key] = None           # int | None: the text can say "none" too
            continue
        if kind is bool:
            if text not in _TRUE + _FALSE:
                raise OptionError(f"{where}: option {key}={value!r}: expected "
                                  f"{_KIND_WORDS[bool]}", key)
            typed[key] = text in _TRUE
            continue
        try:
            # decimal digits are decimal even with leading zeros ("010" is 10, as a
            # user means it, where int(text, 0) refuses it); 0x/0o/0b prefixes work too
            typed[key] = ((int(text, 10) if text.lstrip("+-").isdigit() else int(text, 0))
                          if kind is int else float(text))
        except ValueError:
            raise OptionError(f"{where}: option {key}={value!r}: expected "
                              f"{_KIND_WORDS[kind]}", key) from None
    return typed


def _load_file(path, options):
    if not os.path.isfile(path):
        raise AppError(f"NF file {path}: no such file")
    stem = os.path.splitext(os.path.basename(path))[0]
    # its own directory first on the path, as Python runs a script: an NF file may
    # import a module beside it
    where = os.path.dirname(os.path.abspath(path))
    if where not in sys.path:
        sys.path.insert(0, where)
    with api.loading(stem) as created:
        try:
            scope = runpy.run_path(path, run_name="__main__")
        except AppError:
            raise
        except Exception as exc:
            at = raising_line(exc, path)
            at = f", line {at[1]}" if at else ""
            raise AppError(f"NF file {path}{at}: {exc_text(exc)}") from exc
        if callable(scope.get("make")):
            # inside the file's loading context: mb_* calls in make() act on the
            # file's own NF, named after it, not on one every such file would share
            return _make(scope["make"], options, f"NF file {path}: make()")
    if options:
        raise AppError(f"NF file {path}: options {sorted(options)} given but the file "
                       "defines no make(**options)")
    nfs = script_nfs(scope, created)
    if not nfs:
        raise AppError(f"NF file {path}: defines no NF (create mbx.NF(...) or call mb_sub)")
    return nfs


def script_nfs(scope, created):
    """The NFs a script defined: those, and lists of those, its globals hold under
    public names, in order, then ``created`` (the NF its mb_* calls made).  One rule
    for ``mbx run FILE`` and ``mb_nf_run()`` in the script run on its own, so that
    both run the same NFs (an NF only a function's local holds is found by neither)."""
    nfs = []
    for key, value in scope.items():
        if key.startswith("_"):
            continue
        group = value if isinstance(value, list | tuple) and value and all(
            isinstance(v, NF) for v in value) else [value]
        nfs += [v for v in group if isinstance(v, NF) and v not in nfs]
    for nf in created:
        if nf not in nfs:
            nfs.append(nf)
    return nfs


def load_app(spec, options=None):
    """The NFs of ``spec`` (``"flow_stats+logger"``, ``"my_nf.py"``, ``"ids.py:dpi"``:
    the NF of that name of a file that makes several, ``"pkg.mod:nf"``), in chain
    order.  ``options`` maps an item's name to keyword options for its
    ``make(**options)``."""
    options = dict(options or {})
    if spec and spec.endswith(".toml"):
        from mbx.controller import load_app_file

        if options:
            raise AppError(f"{spec}: an application file sets its NFs' options itself "
                           "([[nf]] options); load_app takes no options for it")
        return load_app_file(spec).nfs
    if not spec or not spec.strip("+"):
        raise AppError("an application names at least one NF")
    nfs = []
    used = set()
    files = {}      # a file named twice ("ids.py:dpi+ids.py:ids") is loaded once
    for item in spec.split("+"):
        item = item.strip()
        path, colon, wanted = item.rpartition(":")
        if not (colon and path.endswith(".py") and wanted and "/" not in wanted):
            path, wanted = item, None
        name = os.path.splitext(os.path.basename(path))[0] if path.endswith(".py") else item
        opts = options.get(name, {})
        used.add(name)
        first = len(nfs)
        if path.endswith(".py") or os.sep in path:
            if path not in files:
                files[path] = _load_file(path, opts)
            made = files[path]
            if wanted is not None:      # FILE.py:NAME, one NF of a file of several
                made = [nf for nf in made if nf.name == wanted]
                if not made:
                    raise AppError(f"NF file {path} defines no NF named {wanted!r} (it "
                                   f"defines {', '.join(nf.name for nf in files[path])})")
            nfs += made
        elif item in BUILTIN_NFS:
            module = importlib.import_module(f"mbx.nfs.{item}")
            nfs += _make(module.make, opts, f"NF {item}")
        elif ":" in item:
            mod_name, _, attr = item.partition(":")
            if not mod_name or not attr or mod_name.startswith("."):
                raise AppError(f"NF {item!r}: expected module:attribute, an absolute "
                               "module name and the NF, list or factory it defines")
            if os.getcwd() not in sys.path:
                sys.path.append(os.getcwd())    # as python -m would find it, last
            # as for an NF file: mb_* calls as the module loads, or in its factory,
            # act on an NF named after the module (mb_nf_run returns at once)
            with api.loading(mod_name.rpartition(".")[2]):
                try:
                    module = importlib.import_module(mod_name)
                except ModuleNotFoundError as exc:
                    # the module itself is missing, or one it imports (its line, then)
                    where = (" in the current directory, PYTHONPATH or the installed "
                             "packages") if exc.name == mod_name.partition(".")[0] else \
                        user_code_line(exc)
                    raise AppError(f"NF {item}: {exc}{where}") from exc
                except Exception as exc:
                    raise AppError(f"NF {item}: {exc_text(exc)}"
                                   f"{user_code_line(exc)}") from exc
                try:
                    obj = getattr(module, attr)
                except AttributeError as exc:
                    raise AppError(f"NF {item}: {exc}") from exc
                nfs += _make(obj, opts, f"NF {item}") if callable(obj) and not \
                    isinstance(obj, NF) else _as_nfs(obj, f"NF {item}")
        else:
            raise AppError(
                f"unknown NF {item!r}{did_you_mean(item, BUILTIN_NFS)}: use a built-in "
                f"({', '.join(BUILTIN_NFS)}), "
                "a .py file, or module:attribute")
        for nf in nfs[first:]:
            nf.made_from = {"use": item, "options": dict(opts)}
    unknown = set(options) - used
    if unknown:
        raise AppError(f"options given for {', '.join(sorted(unknown))}, which the "
                       f"application {spec!r} does not name (--set KEY.OPTION: KEY is "
                       f"an item of the chain, a file's without .py: "
                       f"{', '.join(sorted(used))})")
    return nfs


def stack_config(options):
    """Every stack option a run given ``options`` (App's keywords) uses: those, and
    App's and the TCP Monitor's defaults for the rest, so that a run's --json says
    all of them, not only those someone set."""
    defaults = {name: p.default for name, p in
                inspect.signature(App.__init__).parameters.items()
                if p.kind is p.KEYWORD_ONLY and name != "rss"}
    # (TcpMonitor's own defaults: a Cython class's signature does not show them)
    defaults.update(STREAM_DEFAULTS, overlap="first", checksums="ignore")
    return dict(defaults, **options)


def needs_monitor(nfs):
    """Does any NF subscribe to a TCP Monitor type or ask it to terminate flows?"""
    for nf in nfs:
        for idx in nf.subs:
            t = _events.event_types()[idx]
            if any(t.is_a(tcp) for tcp in _TCP_TYPES):
                return True
        for idx in nf.pubs:
            if _events.event_types()[idx].is_a(_events.FLOW_TCP_TERMINATE):
                return True
    return False


def runs_monitor(stack, nfs, options):
    """Does a run with ``stack`` ("auto", "network", "tcp"), these NFs and these stack
    options run the TCP Monitor (else the Network Layer alone)?"""
    return stack == "tcp" or (stack == "auto" and bool(
        needs_monitor(nfs) or options.get("summarise")))


def unused_monitor_options(stack, nfs, options):
    """The TCP Monitor's options among ``options`` when the run would not start the
    Monitor: given, and ignored, which the user should hear about."""
    if runs_monitor(stack, nfs, options):
        return []
    return [key for key in _MONITOR_OPTIONS if key in options]


class _TerminateSink(NF):
    """The TCP Monitor's own subscription to FLOW/TCP/TERMINATE (paper §4.2: NFs
    change stack state only by events)."""

    def __init__(self):
        super().__init__("tcp_monitor")
        self.monitor = None
        self.sub(_events.FLOW_TCP_TERMINATE, self.on_terminate)

    def on_terminate(self, ev):
        if self.monitor is not None and ev.publisher:
            self.monitor.terminate(ev)


# Whole-number options and the values they may take: up to what the C type the stack
# keeps them in holds (flow_capacity: what FlowTable takes), checked here, by name,
# because Cython's conversion error names neither.
_U32, _SIZE = (1 << 32) - 1, (1 << 64) - 1
WHOLE_STACK_OPTIONS = {"flow_capacity": (1, CAPACITY_MAX), "msg_capacity": (64, _U32),
                       "frag_memory": (0, _SIZE), "stream_memory": (0, _SIZE),
                       "chunk_size": (0, _U32), "stream_window": (0, _SIZE),
                       "retain": (0, _SIZE), "max_streams": (0, _U32)}


# Stack options that take one of a few words: the words, from the modules that use
# them.
STACK_CHOICES = {"flow_policy": FLOW_POLICIES, "malformed": MALFORMED_ACTIONS,
                 "overlap": OVERLAP_POLICIES, "checksums": CHECKSUM_POLICIES}
# ... and those that are on or off
STACK_SWITCHES = ("vlan_in_flow_key",)


def stack_options_problem(options):
    """``(option, why)`` for the first stack option (``App``'s keywords, an
    application file's ``[stack]``) that is not a whole number its C field can
    hold, not one of its words, or that the TCP Monitor's stream sizes refuse, alone
    or with the others (``stream_window`` below ``chunk_size``, ...); None when all
    are right.  What can be checked without building a stack is checked here, where
    an application file's line is still known."""
    for key, (low, top) in WHOLE_STACK_OPTIONS.items():
        value = options.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                  or not low <= value <= top):
            return key, (f"{key} must be a whole number from {low} to {top:,}, not "
                         f"{value!r}")
    for key, words in STACK_CHOICES.items():
        value = options.get(key)
        if value is not None and value not in words:
            return key, f"{key} must be one of {', '.join(words)}, not {value!r}"
    for key in STACK_SWITCHES:
        value = options.get(key)
        if value is not None and not isinstance(value, bool):
            return key, f"{key} must be true or false, not {value!r}"
    # what the tables refuse when built, in the options' names (FragTable says
    # "timeout")
    value = options.get("msg_capacity")
    if value is not None and value & (value - 1):
        return "msg_capacity", f"msg_capacity must be a power of two, not {value!r}"
    for key, zero_ok in (("idle_timeout", True), ("frag_timeout", False)):
        value = options.get(key)
        if value is None:
            continue
        if (isinstance(value, bool) or not isinstance(value, int | float)
                or not (0 <= value if zero_ok else 0 < value) or not value <= 1e9):
            span = "from 0 to 1e9" if zero_ok else "above 0, up to 1e9"
            return key, f"{key} must be seconds, {span}, not {value!r}"
    try:
        check_stream_options(**{key: options[key] for key in STREAM_DEFAULTS
                                if key in options})
    except ValueError as exc:
        why = str(exc)
        key = why.split()[0]            # the message begins with the option's name
        if key not in options:          # its default clashes with what was given
            why += f" (the default {key}: give one that fits)"
        return key, why
    return None


def check_stack_options(options, where="stack options:"):
    """Raise ``AppError`` (``where`` first) for :func:`stack_options_problem`."""
    problem = stack_options_problem(options)
    if problem:
        raise AppError(f"{where} {problem[1]}")


# A ring holds message numbers, and a ring larger than Event Memory's messages is
# never filled: 2**24 entries (64 MiB a ring) is room for the largest msg_capacity
# that makes sense, and keeps the ring's byte sizes far from 32-bit limits.
RING_SIZE_MAX = 1 << 24


def stop_all(nfs):
    """Call each NF's ``stop()``, every one even when an earlier one raised (each may
    hold files to close); returns what the caller raises: the first failure as an
    NFError naming its NF (``sys.exit()`` included: pipelined, where an NF process
    ignores signals, it is an NF error too), or a KeyboardInterrupt that
    interrupted a ``stop()``, or None.  A KeyboardInterrupt is a Ctrl-C (Python's,
    or mbx run's second signal, STOP_FORCE_AFTER_S, on a ``stop()`` that hangs):
    the other NFs still stop, and then the run ends interrupted (mbx run: exit 130),
    not failed."""
    first = interrupt = None
    for nf in nfs:
        try:
            nf.stop()
        except KeyboardInterrupt as exc:
            if interrupt is None:
                interrupt = exc
        except BaseException as exc:    # noqa: BLE001 (told to the caller)
            if first is None:
                first = NFError(f"NF {nf.name}: stop() raised {exc_text(exc)}"
                                f"{user_code_line(exc)}")
                first.__cause__ = exc
    return interrupt if interrupt is not None else first


class App:
    """NFs over the μStacks they need.

    ``deploy="inline"``: one process, events by function call.  ``"pipelined"``:
    the stack in this process and each NF in its own, events over shared-memory
    rings (see ``mbx.pipeline``); ``ring_size`` (entries, a power of two; default
    room for all of Event Memory) and ``ring_full`` (``"stall"`` the producer, or
    ``"drop"`` the event and its packet, counted) tune its rings; ``inflight`` (a
    power of two, 1 to 16; default 4, or 1 where an NF reads stream bytes or
    terminates flows, see ``mbx.pipeline.inflight_for``) is how many bursts the stack
    runs ahead of the NF processes (1: each burst waits for the whole chain before
    the next is read).

    ``stack`` is ``"auto"`` (the TCP Monitor when some NF wants TCP events, else the
    Network Layer), ``"network"`` or ``"tcp"``.  ``vlan_in_flow_key`` (the default)
    keys flows by their outer two VLAN ids too, so the same 5-tuple in two VLANs is
    two flows; False where a connection crosses the middlebox in a different VLAN
    each way (router on a stick).  TCP Monitor options:
    ``stream_memory``, ``chunk_size``, ``stream_window``, ``retain``, ``max_streams``,
    ``overlap``, ``checksums`` (see ``TcpMonitor``).

    ``nf_timing`` clocks the NFs' handlers (per NF handler time in
    ``counters()["nfs"]``; two clock reads per run of an NF's consecutive calls, so
    the time includes the dispatch of its events); turn it off for the last percent.
    """

    def __init__(self, nfs, *, flow_capacity=FLOW_CAPACITY, idle_timeout=60.0, flow_policy="evict",
                 malformed="forward", msg_capacity=65536, frag_memory=4 << 20,
                 frag_timeout=30.0, stack="auto", deploy="inline", ring_size=0,
                 ring_full="stall", inflight=None, rss=(0, 1), nf_timing=True,
                 vlan_in_flow_key=True, **monitor_options):
        unknown = set(monitor_options) - set(_MONITOR_OPTIONS)
        if unknown:
            raise AppError(f"unknown App option(s): {', '.join(sorted(unknown))}")
        if stack not in ("auto", "network", "tcp"):
            raise AppError(f"stack must be 'auto', 'network' or 'tcp', not {stack!r}")
        if deploy not in ("inline", "pipelined"):
            raise AppError(f"deploy must be 'inline' or 'pipelined', not {deploy!r}")
        try:
            if inflight is not None:
                check_inflight(inflight)
        except ValueError as exc:
            raise AppError(str(exc)) from None
        check_stack_options(dict(monitor_options, flow_capacity=flow_capacity,
                                 msg_capacity=msg_capacity, frag_memory=frag_memory,
                                 idle_timeout=idle_timeout, frag_timeout=frag_timeout,
                                 flow_policy=flow_policy, malformed=malformed,
                                 vlan_in_flow_key=vlan_in_flow_key))
        # checked whatever the deployment, as every other option is, so that an App
        # that runs inline today does not fail when it is deployed pipelined
        if ring_full not in ("stall", "drop"):
            raise AppError(f"ring_full must be 'stall' or 'drop', not {ring_full!r}")
        if ring_size and (not 2 <= ring_size <= RING_SIZE_MAX
                          or ring_size & (ring_size - 1)):
            raise AppError(f"ring_size must be a power of two from 2 to "
                           f"{RING_SIZE_MAX:,} (or 0: sized to Event Memory), not "
                           f"{ring_size}")
        self.deploy = deploy
        self.ring_size = ring_size
        self.ring_full = ring_full
        self.inflight = inflight
        self.pipeline = None
        self.stack_kind = stack
        self.monitor_options = monitor_options
        # no NFs is allowed: the stack alone (benchmarks, mbx flows)
        self.nfs = _as_nfs(nfs, "App") if nfs else []
        self.config = dict(flow_capacity=flow_capacity, idle_timeout=idle_timeout,
                           flow_policy=flow_policy, malformed=malformed,
                           frag_memory=frag_memory, frag_timeout=frag_timeout,
                           vlan_in_flow_key=vlan_in_flow_key, rss=rss)
        self.msg_capacity = msg_capacity
        self.nf_timing = bool(nf_timing)
        self.stack = None
        self.reports = {}       # inline: each NF's report() after the run

    def run(self, inp, out=None, *, burst=64, max_packets=0, progress=None, duration=0,
            stop=None):
        """Run ``inp`` through the stack and NFs (to its end, ``max_packets``,
        ``duration`` seconds or until ``stop.is_set()``); returns the counters.

        ``out`` is a port, or a function returning one (``mbx.ports.DeferredOutput``):
        it is called once the NFs have started and the stack is built, so a run that
        fails before its first packet has not created or truncated its output."""
        from mbx.pipeline import check_failure_policy

        # checked inline too, as the App options are: set in the NF's code, they may
        # change after the App is made
        for nf in self.nfs:
            check_failure_policy(nf)
        tcp = runs_monitor(self.stack_kind, self.nfs, self.monitor_options)
        nfs = list(self.nfs)
        self.reports = {}
        self.stack = self.pipeline = None       # this run's, once it has them
        sink = None
        # a port of FLOW/TCP (or EVENT) can carry a TERMINATE too
        if tcp and any(_events.event_types()[i].overlaps(_events.FLOW_TCP_TERMINATE)
                       for nf in nfs for i in nf.pubs):
            sink = _TerminateSink()
            nfs.append(sink)
        clash = output_clash(nfs)
        if clash is not None:       # before the first NF truncates the file
            raise AppError(clash[1])
        started = []
        try:
            for nf in nfs:
                try:
                    nf.start()
                except MbxError:
                    raise               # says which NF already
                except Exception as exc:
                    raise NFError(f"NF {nf.name}: start() raised {exc_text(exc)}"
                                  f"{user_code_line(exc)}") from exc
                started.append(nf)
        except BaseException:
            stop_all(started)           # what they opened is closed again
            raise
        if self.deploy == "pipelined":
            # each NF process stops its copy; pipeline.run stops these if it fails
            # before it forks them
            return self._run_pipelined(nfs, sink, tcp, inp, out, burst=burst,
                                       max_packets=max_packets, progress=progress,
                                       duration=duration, stop=stop)
        bus = None
        try:
            bus = EventBus(nfs, msg_capacity=self.msg_capacity)
            bus.timing = self.nf_timing
            self.stack = self._make_stack(bus, tcp)
            if sink is not None:
                sink.monitor = self.stack
                self.stack.terminable = True
            self.stack.run(inp, opened(out), burst=burst, max_packets=max_packets,
                           progress=progress, duration=duration, stop=stop)
        finally:
            if bus is not None:
                bus.close()
            if sink is not None:
                sink.monitor = None     # it points back at the stack
            failed = stop_all(started)
            self.reports = {nf.name: take_report(nf) for nf in self.nfs}
        if failed is not None:
            raise failed
        return self.counters()

    def _make_stack(self, bus, tcp):
        from mbx.controller import publications

        try:
            if tcp:
                stack = TcpMonitor(bus, **self.config, **self.monitor_options)
            else:
                stack = NetworkLayer(bus, **self.config)
        except ValueError as exc:       # an option out of its range, named in exc
            raise AppError(f"stack options: {exc}") from None
        except MemoryError as exc:
            # the tables are sized by these options up front, not as flows come
            sized = ", ".join(f"{key}={self.config[key]:,}" if key in self.config else
                              f"{key}={self.monitor_options[key]:,}"
                              for key in ("flow_capacity", "max_streams", "stream_memory")
                              if key in self.config or (tcp and key in self.monitor_options))
            raise AppError(f"the {'TCP Monitor' if tcp else 'Network Layer'}'s tables "
                           f"do not fit in memory ({exc}): lower {sized} (--flows, or "
                           "[stack] in an application file)") from None
        bus.offered = publications(tcp, self.nfs)
        return stack

    def _run_pipelined(self, nfs, sink, tcp, inp, out, **run):
        from mbx import pipeline

        if sink is not None:
            # The Monitor takes FLOW/TCP/TERMINATE from NF processes as requests on
            # the control path (mbx._pipeline), not through a sink NF of its own.
            nfs.remove(sink)

        def make_stack(bus):
            stack = self._make_stack(bus, tcp)
            if sink is not None:
                stack.terminable = True
                bus.enable_terminate(stack)
            return stack

        def ended(stack, counters):     # kept when the run fails too (counters())
            self.stack, self.pipeline = stack, counters

        pipeline.run(nfs, make_stack, inp, out, msg_capacity=self.msg_capacity,
                     nf_timing=self.nf_timing, ring_size=self.ring_size,
                     ring_full=self.ring_full, inflight=self.inflight, tcp=tcp,
                     ended=ended, **run)
        return self.counters()

    def counters(self):
        out = self.stack.counters() if self.stack is not None else {}
        if self.pipeline is not None:
            out["pipeline"] = self.pipeline
        if self.stack is not None:
            out["nfs"] = nf_stats(self.stack.bus, self.pipeline)
            for name, report in self.reports.items():     # inline: taken after stop()
                if report is not None and name in out["nfs"]:
                    out["nfs"][name]["report"] = report
        return out


def take_report(nf):
    """``nf.report()``, checked: a dict that JSON can carry in at most
    ``REPORT_MAX`` bytes, or None.  A report that raises, is of another kind or is
    larger becomes ``{"error": why}`` (the run's counters and the NF's other results
    are not lost to it), also one that raises SystemExit or KeyboardInterrupt (the
    run has ended by then: the other NFs' reports are what is left to lose).  The
    size is the pipelined deployment's, where a report crosses shared memory; inline
    and in parallel stacks it is held to the same, so that an NF reports the same
    whichever way it is deployed."""
    import json

    from mbx._pipeline import REPORT_MAX

    try:
        report = nf.report()
        if report is None:
            return None
        if not isinstance(report, dict):
            raise TypeError(f"report() returned {type(report).__name__}, not a dict")
        # NaN and infinities refused: json.dumps writes them as NaN/Infinity by
        # default, which no JSON reader takes (--json would write invalid JSON)
        text = json.dumps(report, allow_nan=False)
    except BaseException as exc:        # noqa: BLE001 (kept in the counters instead)
        return {"error": f"NF {nf.name}: report(): {exc_text(exc)}"}
    size = len(text.encode("utf-8"))
    if size > REPORT_MAX:
        return {"error": f"NF {nf.name}: report(): {size:,} bytes as JSON, more than "
                         f"{REPORT_MAX:,}"}
    return json.loads(text)


def nf_stats(bus, pipeline=None):
    """Per NF: events, drops, handler time (see ``EventBus.nf_stats``).  Pipelined,
    the NFs count in their own processes and share the counts with the stack: the
    figures are the pipeline's per process counters (``pipeline`` or, during the
    run, the bus's live ones)."""
    if pipeline is None and hasattr(bus, "pipeline_counters"):
        pipeline = bus.pipeline_counters()
    if pipeline is None:
        return bus.nf_stats()
    out = {}
    for name, n in pipeline["nfs"].items():
        ns = n["handler_ns"]
        out[name] = {"events": n["delivered"], "c_events": n["c_events"],
                     "drops": n["drops"], "handler_ns": ns,
                     "mean_ns": ns / n["delivered"] if n["delivered"] else 0.0,
                     "types": dict(n["types"])}
        if n.get("report") is not None:
            out[name]["report"] = n["report"]
    return out


# Port counters that name something (the link type of a capture's first skipped
# frames): the same in every process that has them, never added up
IDENTIFIERS = ("skipped_linktype",)
# An input's counters of the input as a whole, not of a process's share: where every
# stack process reads all of the input (mbx.ports.read_by_every_stack), each counts
# them alike.  A capture's cut-short end and its frames of a link type mbx does not
# read, its records whose wire length was raised to the captured one; its damage (a
# text) is one too.
WHOLE_INPUT = ("truncated", "skipped", "wirelen_raised")
# ... and, from an input that hands every process every frame (a DPDK net_pcap
# device; a capture reader instead skips the others' frames and counts only its own),
# what it received
WHOLE_INPUT_RX = ("rx_pkts", "rx_bytes", "rx_oversize", "rx_bad_length")


def merge_counters(parts):
    """Sum the counters of several stack processes (numbers add, dicts merge; an
    identifier, one of ``IDENTIFIERS``, and a text are the first process's)."""
    out = {}
    for part in parts:
        for key, value in part.items():
            if isinstance(value, dict):
                out[key] = merge_counters([out.get(key) or {}, value])
            elif (isinstance(value, int | float) and not isinstance(value, bool)
                  and key not in IDENTIFIERS):
                out[key] = out.get(key, 0) + value
            elif key not in out:
                out[key] = value
    return out


def _take_once(merged, inputs):
    """In ``merged``, an input's merged counters, the counters of the input as a
    whole taken once from ``inputs``, each process's (the largest: a process stopped
    early read less), on a bridge's sides too."""
    rss = "rss_skipped" in merged
    for key in WHOLE_INPUT + (() if rss else WHOLE_INPUT_RX):
        seen = [c[key] for c in inputs if isinstance(c.get(key), int)]
        if seen:
            merged[key] = max(seen)
    if rss:
        # each process's input counted the frames it left to the others: summed, they
        # would be the input (N - 1) times over
        merged["rss_skipped"] = 0
    for side in ("client", "server"):
        if isinstance(merged.get(side), dict):
            _take_once(merged[side], [c.get(side) or {} for c in inputs])


def merge_snapshots(parts, read_by_every_stack=True):
    """The counters of several stack processes as one: ``merge_counters``, with each
    NF's mean handler time taken over all of them (not summed).

    ``read_by_every_stack`` (``mbx.ports.read_by_every_stack`` of the input): each
    process read all of the input, so what it counted of the input as a whole
    (``WHOLE_INPUT``) is taken once, and each frame one process left to another
    (``other_stacks``) was another's packet: the merged counters leave none to
    anyone.  Otherwise each frame reached one process (a fanout group; a device
    that lives in each process, such as ``net_null``), and the frames a process
    received for other stacks' flows reached no other: ``other_stacks`` is summed,
    so that the input's received frames are the packets plus ``other_stacks``."""
    out = merge_counters(parts)
    if read_by_every_stack:
        if "other_stacks" in out:
            out["other_stacks"] = 0
        inp = (out.get("ports") or {}).get("in")
        if inp:
            _take_once(inp, [((part.get("ports") or {}).get("in") or {}) for part in parts])
    for n in out.get("nfs", {}).values():
        n["mean_ns"] = n["handler_ns"] / n["events"] if n["events"] else 0.0
    return out


def stack_share(capacity, stacks):
    """The flow capacity of each of ``stacks`` stack processes that split
    ``capacity`` flows: its share, rounded up to a power of two (1 stack: all of it).

    Each process tracks only its share of the flows, so a full-size table in each
    would be Stack Memory (and cache) that no flow ever uses; a stack whose share
    fills up evicts or refuses by policy and counts it, as one stack does."""
    if stacks <= 1:
        return capacity
    return 1 << max(0, -(-capacity // stacks) - 1).bit_length()


def check_one_stack(nfs, stacks):
    """Refuse (AppError) NFs that need every packet of a connection in one stack
    process, when there are ``stacks`` > 1: a flow's two directions meet in one
    process only if they keep their addresses, and an NF that rewrites them (a NAT,
    the L4 LB: ``rewrites_addresses = True``) sees its replies under other
    addresses, hashed to a process with no state for them."""
    movers = [nf.name for nf in nfs if getattr(nf, "rewrites_addresses", False)]
    if stacks > 1 and movers:
        raise AppError(f"NF {', '.join(movers)} rewrites addresses, so the replies of a "
                       f"flow hash elsewhere than its requests and may reach a stack "
                       f"process with no state for them: run it in one stack process "
                       f"(without --stacks)")


def _zero_counters(config):
    """The counters of a stack process that counted nothing, shaped as one's are
    (every count 0; ``config``: the run's App options), for a parallel run whose
    every stack process was lost before it reported."""
    app = App([], **config)
    bus = EventBus([], msg_capacity=app.msg_capacity)
    try:
        counters = NetworkLayer(bus, **app.config).counters()
    finally:
        bus.close()
    counters["nfs"] = {}
    return counters


def _read_line(fd):
    """Bytes from ``fd`` up to a newline (or its end), without it."""
    line = b""
    while not line.endswith(b"\n"):
        data = os.read(fd, 1)
        if not data:
            break
        line += data
    return line.rstrip(b"\n")


def _write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _stop_with_parent(parent):
    """Have the kernel send this (forked) process SIGTERM when its parent dies, so a
    stack process never runs on alone after the parent was killed (SIGKILL)."""
    import ctypes
    import signal

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))
    if os.getppid() != parent:          # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def run_parallel(make_nfs, in_spec, out_spec=None, *, stacks=2, burst=64,
                 max_packets=0, duration=0, on_snapshot=None, pin=None, **config):
    """Run ``stacks`` stack processes over one input (paper §4.2 "Parallel Stacks"),
    each with its own NFs (``make_nfs()`` is called in each) and its own Stack
    Memory.  A capture is split by software RSS: every process reads it and keeps
    the flows whose symmetric hash is its share, so both directions of a flow meet
    in one process.  An AF_PACKET input is split by the kernel (a fanout group, in
    the port's default mode ``flow``: every packet of a flow, both ways and each
    fragment, to one member).
    Each process writes its own output (``FILE.stackK`` for ``pcap:FILE`` and for a
    DPDK ``net_pcap`` device's ``tx_pcap=FILE``, in the input too; see
    ``output_path`` and ``mbx.ports.stack_spec``).  A port the processes cannot
    each open (a DPDK ``net_memif``, ``net_tap`` or ``net_af_packet`` device) is
    refused before any process starts (``mbx.ports.check_stacks``), as is a bad spec.
    Returns (merged counters, [each process's counters]); each process's counters
    carry its CPU seconds (``cpu_s``, summed in the merged ones).

    ``flow_capacity`` is shared out: each process's flow table (and everything
    sized by it) holds ``stack_share(flow_capacity, stacks)`` flows.

    ``pin``: pin stack process k to the k-th CPU this process may use (default: when
    there are at least as many CPUs as stacks).  Left to itself the scheduler
    often runs two busy stack processes on one core by turns for a while: on this
    2-core machine pinning took 2 stacks from 1.39x to 1.76x one stack.

    ``on_snapshot(k, counters)`` is called here with each process's counters as its
    stack's progress callback takes them (about every half second; see
    ``mbx.stats.snapshot``): each process writes them, a JSON line, to the pipe its
    final counters come back on.

    ``max_packets`` and ``duration`` hold for each process.  SIGINT or SIGTERM to this
    process (when it runs in the main thread), or to its process group, stops every
    stack process cleanly, between bursts, as ``mbx run`` stops one stack: their
    counters still come back.
    The stack processes ignore SIGINT, so a Ctrl-C to the terminal's process group
    reaches them only this way.  A stack process that dies, fails, or is stopped by
    a signal this process did not send (its share of the input then not all read)
    stops the others and the run raises AppError, with ``counters`` of what the
    stacks did until then.  A stack process held by an NF handler that never returns
    cannot stop itself: a second signal, ``STOP_FORCE_AFTER_S`` after the first,
    interrupts those still running (``KeyboardInterrupt`` there, so that what they
    did is still reported; killed ``STOP_KILL_AFTER_S`` later if that does not end
    them) and the run raises KeyboardInterrupt, with the same ``counters``.
    """
    import json
    import mmap
    import selectors
    import signal
    import threading
    import time

    from mbx._afpacket import NEW_GROUP
    from mbx.ports import (
        capture_file,
        check_spec,
        check_stacks,
        close_ports,
        open_ports,
        port_counters,
        read_by_every_stack,
        stack_spec,
    )

    if stacks < 1:
        raise AppError(f"stacks must be at least 1, not {stacks}")
    if config.get("deploy", "inline") != "inline":
        raise AppError("parallel stacks run their NFs inline: drop deploy="
                       f"{config['deploy']!r}")
    config["flow_capacity"] = stack_share(config.get("flow_capacity", FLOW_CAPACITY),
                                          stacks)
    afpacket = in_spec.lower().startswith("afpacket:")
    every_stack_reads_all = read_by_every_stack(in_spec)
    if afpacket and re.search(r"[?&]fanout=", in_spec):
        raise AppError(f"{in_spec}: --stacks makes the fanout groups its processes share "
                       "(new ones, of ids the kernel picks): drop fanout= from the spec")
    cpus = sorted(os.sched_getaffinity(0))
    if pin is None:
        pin = 1 < stacks <= len(cpus)
    # Refused here, once, rather than by every stack process: a bad spec, and a port
    # the processes cannot each open.
    for spec, rx in ((in_spec, True), (out_spec, out_spec == in_spec)):
        if spec:
            check_spec(spec, rx=rx)
            check_stacks(spec, stacks)
    parent = os.getpid()
    # An AF_PACKET fanout group hands a flow to the member at the index its hash
    # picks, members indexed in the order they joined.  A bridge's two sides are two
    # groups, so both directions of a flow meet in one process only if process k is
    # member k of both: the processes open their ports one after another, each
    # waiting for its go pipe, which the parent writes once the one before it has
    # opened its ports (or failed).  The first makes new groups, of ids the kernel
    # picks (an id chosen here could be another program's group, whose frames the
    # processes would then share with it, silently); the go message carries them to
    # the others.
    gos = []
    children = []
    # force[k]: set by this process before the SIGTERM that interrupts stack process
    # k (on_signal), for it to tell that one from a signal sent to the process group,
    # which reaches it as well as this process's own stop (shared: made before fork)
    force = mmap.mmap(-1, stacks)
    for k in range(stacks):
        rfd, wfd = os.pipe()
        go_r, go_w = os.pipe() if afpacket else (-1, -1)
        pid = os.fork()
        if pid == 0:                                    # a stack process
            os.close(rfd)
            for fd in (go_w, *gos):
                if fd >= 0:
                    os.close(fd)
            code = 1
            partial = None          # a failed run's counters, once it ran
            try:
                signal.signal(signal.SIGINT, signal.SIG_IGN)    # the parent stops us
                stop = threading.Event()                # ... with SIGTERM, between bursts
                stopped_by = []     # the signal that did, for the report, and when

                def on_stop(sig, _, stop=stop, stopped_by=stopped_by, k=k):
                    # A signal to the process group (`timeout`, systemd, a closed
                    # terminal) reaches this process and the parent, whose stop
                    # follows at once: a second signal alone is no reason to
                    # interrupt.  Only the parent's forced stop (sent once its first
                    # signal has not stopped the run in STOP_FORCE_AFTER_S: an NF
                    # handler that never returns), or a signal this long after this
                    # process's own first, interrupts it where it is, as one stack
                    # is, and what it did until then is still reported.
                    if not stopped_by:
                        stopped_by[:] = [signal.Signals(sig).name, time.monotonic()]
                        stop.set()
                    elif force[k] or time.monotonic() - stopped_by[1] > STOP_FORCE_AFTER_S:
                        raise KeyboardInterrupt(
                            f"still running {STOP_FORCE_AFTER_S:g} s after the first "
                            "signal (held by an NF handler that never returns?): "
                            "interrupted")

                for sig in (signal.SIGTERM, signal.SIGHUP):
                    signal.signal(sig, on_stop)
                _stop_with_parent(parent)
                if pin:
                    os.sched_setaffinity(0, {cpus[k % len(cpus)]})
                global _stack_process
                _stack_process = (k, stacks)
                # the files this process writes are its own (output_path)
                spec = stack_spec(in_spec, output_path, output=False)
                if afpacket:
                    go = _read_line(go_r)       # "g", and the groups to join
                    if not go.startswith(b"g"):
                        raise AppError("stopped before its ports were opened")
                    groups = go[1:].decode().strip() or NEW_GROUP
                    spec += ("&" if "?" in spec else "?") + f"fanout={groups}"
                # an output naming the input's bridge is that bridge (open_ports
                # sends through the input's sockets), fanout and all; one naming the
                # input capture is this process's FILE.stackK, as any capture output
                out = (spec if out_spec == in_spec and capture_file(in_spec) is None else
                       stack_spec(out_spec, output_path) if out_spec else None)
                inp, outp = open_ports(spec, out, defer_output=True)
                if afpacket:
                    made = getattr(inp, "fanout_groups", None) or (inp.fanout_group,)
                    _write_all(wfd, (json.dumps({"opened": ",".join(map(str, made))})
                                     + "\n").encode())
                progress = None
                if on_snapshot is not None:
                    from mbx.stats import snapshot

                    def progress(stack, fd=wfd, inp=inp, outp=outp):
                        _write_all(fd, (json.dumps({"snap": snapshot(stack, inp, outp)})
                                        + "\n").encode())
                try:
                    nfs = make_nfs()
                    check_one_stack(nfs, stacks)
                    app = App(nfs, **config, rss=(0, 1) if afpacket else (k, stacks))
                    try:
                        counters = app.run(inp, outp, burst=burst,
                                           max_packets=max_packets, duration=duration,
                                           progress=progress, stop=stop)
                        # inside the run: an output's last write can fail as it closes
                        close_ports(inp, outp)
                    except BaseException:
                        if app.stack is not None:   # it ran: what it did is not lost
                            partial = app.counters()
                            # closed first, as a port counts frames left unread
                            try:
                                close_ports(inp, outp)
                            except MbxError as again:
                                # said beside the run's own error, the one reported
                                print(f"mbx: error: stack {k}: {again}", file=sys.stderr)
                            partial["ports"] = port_counters(inp, outp)
                        raise
                finally:
                    with contextlib.suppress(MbxError):     # the error raised is the run's
                        close_ports(inp, outp)
                counters["ports"] = port_counters(inp, outp)
                # a signal that ended the run before its input did: the parent tells
                # its own stop from another program's (which leaves part undone);
                # or the duration, a time box every stack keeps
                stopped = ("duration" if app.stack.timed_out else
                           stopped_by[0] if app.stack.stopped else None)
                _write_all(wfd, (json.dumps({"ok": counters, "stopped": stopped})
                                 + "\n").encode())
                code = 0
            except BaseException as exc:            # report, never return into the parent
                report = {"error": str(exc) if isinstance(exc, KeyboardInterrupt)
                          else f"{exc_text(exc)}"}
                if isinstance(exc, CaptureFormatError) and every_stack_reads_all:
                    # every stack reads the whole capture and meets the damage at the
                    # same record: the others read up to it too (see the parent)
                    report["damaged_input"] = True
                if partial is not None:
                    report["partial"] = partial
                _write_all(wfd, (json.dumps(report, default=str) + "\n").encode())
            finally:
                os._exit(code)
        os.close(wfd)
        if afpacket:
            os.close(go_r)
            gos.append(go_w)
        children.append((pid, rfd))
    released = 0
    groups = b""        # the fanout groups the first process made, for the others

    def release_next():
        # let the next stack process open its ports
        nonlocal released
        if released < len(gos):
            if gos[released] >= 0:          # not closed by stop_children
                try:
                    os.write(gos[released], b"g" + groups + b"\n")
                except BrokenPipeError:     # it died: its report says why
                    pass
                os.close(gos[released])
                gos[released] = -1
            released += 1

    asked = []          # set once this process has asked the stacks to stop
    signalled = []      # (the signal that stopped the run, when it came)
    forced = []         # when a second signal interrupted the stacks still running
    # the stacks stopped by a signal this process did not send (another program's:
    # their share of the input was not all read), those a second signal interrupted,
    # and those killed when not even that ended them
    unasked = [False] * stacks
    interrupted = [False] * stacks
    killed = [False] * stacks
    last = [None] * stacks
    snaps = [None] * stacks     # each one's latest live counters (with on_snapshot)

    def stop_children():
        if asked:       # once: a second SIGTERM interrupts a stack process (on_signal)
            return
        asked.append(True)
        for k in range(released, len(gos)):     # those still waiting to open: go away
            if gos[k] >= 0:
                os.close(gos[k])
                gos[k] = -1
        for pid, _ in children:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def on_signal(sig, _):
        now = time.monotonic()
        if not signalled:
            signalled.append((signal.Signals(sig).name, now))
            stop_children()
        elif now - signalled[0][1] > STOP_FORCE_AFTER_S and not forced:
            # as one stack is interrupted: a stack still running this long after the
            # first signal is held (an NF handler that never returns) and cannot
            # stop itself; a second SIGTERM interrupts it (see on_stop)
            forced.append(now)
            for k, (pid, _) in enumerate(children):
                if last[k] is None:
                    interrupted[k] = True
                    force[k] = 1            # this SIGTERM is the forced stop
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGTERM)

    def kill_held():
        # interrupted STOP_KILL_AFTER_S ago and still running (held in C code, or
        # the interrupt caught by the NF): killed, its counters lost
        for k, (pid, _) in enumerate(children):
            if last[k] is None and not killed[k]:
                killed[k] = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, on_signal)
                    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)}
    # Read every process's pipe as it writes (a snapshot waits for room in it), to
    # the end: the last line is its final report.
    buffers = [b""] * stacks
    usages = [None] * stacks
    reading = {rfd for _, rfd in children}
    try:
        release_next()
        with selectors.DefaultSelector() as sel:
            for k, (_, rfd) in enumerate(children):
                sel.register(rfd, selectors.EVENT_READ, k)
            while sel.get_map():
                if forced and time.monotonic() >= forced[0] + STOP_KILL_AFTER_S:
                    kill_held()
                # a bounded wait, to look at that clock: a signal handler that runs
                # during select cannot end the wait it retries
                for key, _ in sel.select(0.25):
                    k = key.data
                    data = os.read(key.fd, 1 << 16)
                    if not data:
                        sel.unregister(key.fd)
                        os.close(key.fd)
                        reading.discard(key.fd)
                        if released == k + 1:   # it failed before it opened its ports
                            release_next()
                        if last[k] is None or unasked[k] or (
                                "error" in last[k] and not last[k].get("damaged_input")):
                            # it died, failed or was stopped by another program: its
                            # share of the flows has no stack any more, so the run
                            # ends now, not at the input's end.  Not for a damaged
                            # capture: each stack stops at the same record, and
                            # stopping the others at once would leave their shares
                            # cut wherever they happened to be (a run's totals would
                            # then depend on timing; one stack's may be nothing)
                            stop_children()
                        continue
                    *lines, buffers[k] = (buffers[k] + data).split(b"\n")
                    for line in lines:
                        msg = json.loads(line)
                        if "snap" in msg:
                            snaps[k] = msg["snap"]
                            on_snapshot(k, msg["snap"])
                        elif "opened" in msg:
                            if not groups:
                                groups = msg["opened"].encode()
                            release_next()
                        else:
                            last[k] = msg
                            unasked[k] = (msg.get("stopped") not in (None, "duration")
                                          and not asked)
    except BaseException:
        stop_children()         # never leave stack processes running on their own
        for rfd in reading:     # ... nor blocked writing to a pipe nobody reads
            os.close(rfd)
        raise
    finally:
        statuses = [0] * stacks
        for k, (pid, _) in enumerate(children):
            _, statuses[k], usages[k] = os.wait4(pid, 0)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    parts, errors, partials = [], {}, []
    reported = {}       # stack -> its counters, for a failed run's per-stack table
    for k in range(stacks):
        usage = usages[k]
        code = os.waitstatus_to_exitcode(statuses[k])
        msg = last[k] or {"error": (f"killed by {signal.Signals(-code).name}" if code < 0
                                    else f"exited with status {code}")
                          + " without a report" + (
                              " (its counters as of its last live snapshot)"
                              if snaps[k] is not None else "")
                          + "; the other stacks were stopped"}
        if last[k] is None and snaps[k] is not None:
            # what it had done by its last snapshot: better than nothing, so the
            # totals do not fall below what --stats showed live
            msg["partial"] = snaps[k]
        if killed[k] and last[k] is None:
            msg = {"error": f"still running {STOP_FORCE_AFTER_S:g} s after the first "
                            "signal (held by an NF handler that never returns?), and "
                            f"{STOP_KILL_AFTER_S:g} s after it was interrupted: killed "
                            "(counters lost)"}
        # the process's own CPU time: on a busy machine, how the work was split
        cpu_s = usage.ru_utime + usage.ru_stime
        if "error" in msg:
            errors.setdefault(msg["error"], []).append(k)
            if "partial" in msg:
                partials.append(dict(msg["partial"], cpu_s=cpu_s))
                reported[k] = partials[-1]
        elif unasked[k] and not signalled:
            # (a signal to the whole process group reaches this process too: then
            # the stop is the run's own)
            errors.setdefault(f"stopped by {msg['stopped']} sent to its process alone, "
                              "not by mbx: its share of the input was not all read; the "
                              "other stacks were stopped", []).append(k)
            partials.append(dict(msg["ok"], cpu_s=cpu_s))
            reported[k] = partials[-1]
        else:
            msg["ok"]["cpu_s"] = cpu_s
            parts.append(msg["ok"])
            reported[k] = msg["ok"]
    # the signal that ended the run before its input did, or "duration" when that
    # ended some stack's (None: the input ended, or max_packets did); interrupted, a
    # signal stopped the run too
    stopped = signalled[0][0] if signalled and (any(interrupted) or any(
        msg and msg.get("stopped") for msg in last)) else None
    if stopped is None and any(msg and msg.get("stopped") == "duration" for msg in last):
        stopped = "duration"
    if errors:
        # each error once, naming its stacks: a damaged capture fails every process
        # that reads it alike
        errors = [("stack " if len(ks) == 1 else "stacks ") + ", ".join(map(str, ks))
                  + f": {why}" for why, ks in errors.items()]
        if any(interrupted):
            # interrupted, as one stack is (mbx run: exit 130)
            exc = KeyboardInterrupt(f"stopped again: the run had not ended "
                                    f"{STOP_FORCE_AFTER_S:g} s after the first signal; "
                                    + "; ".join(errors))
        else:
            exc = AppError("; ".join(errors))
        # what the stacks did until then, for the failed run's summary and --json;
        # every stack lost (killed while held), none: that is nothing counted, said
        # with the error as a run that did something is
        exc.counters = (merge_snapshots(parts + partials, every_stack_reads_all)
                        if parts or partials else _zero_counters(config))
        # the table of every stack, the lost ones' too, as a run that ends well has
        exc.counters["flows"]["capacity"] = config["flow_capacity"] * stacks
        exc.counters["stopped"] = stopped
        exc.per_stack = reported        # stack -> counters, of those that reported
        raise exc
    merged = merge_snapshots(parts, every_stack_reads_all)
    merged["stopped"] = stopped
    return merged, parts
