"""Logger: one JSON line per event received: its type, timestamp and field values.

Options: ``path`` (default ``mbx-events.jsonl``; ``-`` for stdout), ``types``
(comma-separated event types to subscribe to, default ``FLOW``: every flow event,
including FLOW/STATS from Flow_Stats).

The file is opened when the run starts (``start``), so ``mbx check`` leaves an
existing log alone.  With ``--stacks N`` each
stack process writes ``PATH.stackK`` (``mbx.runtime.output_path``), or PATH itself
when it is not a regular file (/dev/null, a FIFO).
"""
import json
import sys

import mbx
from mbx._events import END_REASONS, PROTO_NAMES
from mbx._pcap import claim_output, release_output
from mbx.errors import AppError
from mbx.runtime import check_output_free, check_writable, output_path


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
            raise AppError(f"NF {name}: types must be a string of comma-separated "
                           f"event types (\"FLOW,PKT\"), not {types!r}")
        wanted = [t.strip() for t in types.split(",") if t.strip()]
        if not wanted:
            raise AppError(f"NF {name}: types names no event type")
        subscribed = set()
        for t in wanted:
            etype = mbx.event_type(t)
            if etype.idx not in subscribed:     # "FLOW/END,FLOW/END": once
                subscribed.add(etype.idx)
                self.sub(etype, self.on_event)

    def start(self):
        if self.path == "-":
            self.out = sys.stdout
            return
        path = output_path(self.path)
        check_output_free(path, f"NF {self.name}")
        try:
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
        if self.out is sys.stdout:
            self.out.flush()
        elif self.out is not None:
            release_output(self.written_key)
            self.written_key = None
            self.out.close()


def make(name="logger", path="mbx-events.jsonl", types="FLOW"):
    return Logger(name, path, types)
