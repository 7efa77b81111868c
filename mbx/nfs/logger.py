"""Logger: one JSON line per event received: its type, timestamp and field values.

Options: ``path`` (default ``mbx-events.jsonl``; ``-`` for stdout), ``types``
(comma-separated event types to subscribe to, default ``FLOW``: every flow event,
including FLOW/STATS from Flow_Stats).
"""
import json
import sys

import mbx
from mbx._events import END_REASONS, PROTO_NAMES


class Logger(mbx.NF):
    def __init__(self, name="logger", path="mbx-events.jsonl", types="FLOW"):
        super().__init__(name)
        self.path = path
        self.out = sys.stdout if path == "-" else open(path, "w", buffering=1 << 20)
        self.events = 0
        for t in str(types).split(","):
            self.sub(t.strip(), self.on_event)

    def on_event(self, ev):
        rec = {"type": ev.type_name, "ts_ns": ev.ts, "flow": ev.flow}
        rec.update(ev.fields())
        if "end_reason" in rec:
            rec["end_reason"] = END_REASONS.get(rec["end_reason"], rec["end_reason"])
        if "proto" in rec:
            rec["proto"] = PROTO_NAMES.get(rec["proto"], rec["proto"])
        self.out.write(json.dumps(rec, separators=(",", ":")) + "\n")
        self.events += 1

    def stop(self):
        if self.out is not sys.stdout:
            self.out.close()
        else:
            self.out.flush()


def make(name="logger", path="mbx-events.jsonl", types="FLOW"):
    return Logger(name, path, types)
