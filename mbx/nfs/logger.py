"""Logger: one JSON line per event received: its type, timestamp and field values.

Options: ``path`` (default ``mbx-events.jsonl``; ``-`` for stdout), ``types``
(comma-separated event types to subscribe to, default ``FLOW``: every flow event,
including FLOW/STATS from Flow_Stats).

The file is opened when the run starts (``start``), so ``mbx check`` leaves an
existing log alone.  With ``--stacks N`` each
stack process writes ``PATH.stackK`` (``mbx.runtime.output_path``), or PATH itself
when it is not a regular file (/dev/null, a FIFO) or is a descriptor the process
was given (``-``, /dev/stdout, /dev/fd/N): then in whole lines (``_LineSink``), so
that the processes' lines never cut into one another.
"""
import json
import os
import select
import sys

import mbx
from mbx._events import END_REASONS, PROTO_NAMES
from mbx._pcap import claim_output, release_output
from mbx.errors import AppError, OptionError
from mbx.runtime import (
    check_output_free,
    check_writable,
    inherited_fd,
    output_path,
    writes_as_is,
)


class _LineSink:
    """Whole lines to a descriptor other processes may write at the same time
    (standard output, a pipe, a FIFO, a terminal, shared by --stacks processes).
    Each write() carries whole lines, at most PIPE_BUF bytes of them, which the
    kernel neither splits nor interleaves with another writer's; a longer line goes
    alone.  (A buffered file flushes wherever its buffer fills, mid-line.)"""

    def __init__(self, fd):
        self.fd = fd
        self.lines = []
        self.size = 0

    def write(self, text):
        data = text.encode()
        if self.size + len(data) > select.PIPE_BUF:
            self.flush()
        self.lines.append(data)
        self.size += len(data)

    def flush(self):
        if not self.lines:
            return
        data = memoryview(b"".join(self.lines))
        self.lines = []
        self.size = 0
        while data:
            data = data[os.write(self.fd, data):]

    def fileno(self):
        return self.fd

    def close(self):
        try:
            self.flush()
        finally:
            os.close(self.fd)


class Logger(mbx.NF):
    def __init__(self, name="logger", path="mbx-events.jsonl", types="FLOW"):
        super().__init__(name)
        self.path = path
        if path != "-":
            check_writable(path, f"NF {name}")
        self.out = None         # opened by start()
        self.written_key = None     # the log's entry among the files this process writes
        self.events = 0
        if not isinstance(types, str):
            # a TOML list reached str() as "['FLOW', 'PKT']" and was read as names
            raise OptionError(f"NF {name}: types must be a string of comma-separated "
                              f"event types (\"FLOW,PKT\"), not {types!r}", "types")
        wanted = [t.strip() for t in types.split(",") if t.strip()]
        if not wanted:
            raise OptionError(f"NF {name}: types names no event type", "types")
        subscribed = set()
        for t in wanted:
            etype = mbx.event_type(t)
            if etype.idx not in subscribed:     # "FLOW/END,FLOW/END": once
                subscribed.add(etype.idx)
                self.sub(etype, self.on_event)

    @property
    def writes_stdout(self):
        # mbx run then prints its summary on standard error, not among these lines
        return self.path == "-" or inherited_fd(self.path) == 1

    @property
    def writes_files(self):
        # the file this log is, for mbx.runtime.output_clash; a descriptor the run
        # was given ("-", /dev/stdout) is none: every writer there writes whole lines
        return () if self.path == "-" or inherited_fd(self.path) is not None else (
            self.path,)

    def start(self):
        # "-": where print() goes (standard error while a capture is written to
        # standard output: mbx run --out pcap:/dev/stdout)
        fd = sys.stdout.fileno() if self.path == "-" else inherited_fd(self.path)
        path = output_path(self.path)
        try:
            if fd is not None:
                sys.stdout.flush()
                # written through the descriptor itself: opened anew, a standard
                # output redirected to a file would be truncated, and written from
                # offset 0 over what the run prints there
                self.out = _LineSink(os.dup(fd))
                return
            check_output_free(path, f"NF {self.name}")
            if writes_as_is(path):      # a FIFO, a terminal: maybe every stack's
                self.out = _LineSink(os.open(path, os.O_WRONLY | os.O_CLOEXEC))
            else:
                self.out = open(path, "w", buffering=1 << 20)
        except OSError as exc:
            raise AppError(f"NF {self.name}: cannot write {path!r}: {exc.strerror}") from None
        self.written_key = claim_output(self.out.fileno(), path, f"NF {self.name} (its log)")

    def on_event(self, ev):
        rec = {"type": ev.type_name, "ts_ns": ev.ts, "flow": ev.flow}
        rec.update(ev.fields())
        if "end_reason" in rec:
            rec["end_reason"] = END_REASONS.get(rec["end_reason"], rec["end_reason"])
        if "proto" in rec:
            rec["proto"] = PROTO_NAMES.get(rec["proto"], rec["proto"])
        self.out.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self.events += 1

    def report(self):
        return {"events": self.events}

    def stop(self):
        if self.out is not None:
            release_output(self.written_key)
            self.written_key = None
            self.out.close()
            self.out = None


def make(name="logger", path: str = "mbx-events.jsonl", types="FLOW"):
    return Logger(name, path, types)
