"""Flow_Stats: publishes one FLOW/STATS event per flow when the flow ends.

FLOW/STATS (``mbx.FLOW_STATS``, registered with the stack's types so that an NF
loaded before this one can subscribe to it) extends FLOW (the flow's identity and
counters) with the duration and totals, so a subscriber of FLOW (the Logger, say)
receives it too.
"""
import mbx
from mbx import FLOW_STATS


class FlowStats(mbx.NF):
    def __init__(self, name="flow_stats"):
        super().__init__(name)
        self.flows = 0
        self.sub(mbx.FLOW_END, self.on_end)
        self.port = self.pub(FLOW_STATS)

    def on_end(self, ev):
        msg = self.new_msg(FLOW_STATS)
        msg.fill_from(ev)
        msg.duration_ns = ev.last_ns - ev.first_ns
        msg.packets = ev.pkts_c2s + ev.pkts_s2c
        msg.bytes = ev.bytes_c2s + ev.bytes_s2c
        self.publish(self.port, msg)
        self.flows += 1

    def report(self):
        return {"flows": self.flows}


def make(name="flow_stats"):
    return FlowStats(name)
