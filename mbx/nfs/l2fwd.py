"""L2 forwarder: passes every packet and counts them (a batch handler).

Frames go out as they came in, except IP fragments: the Network Layer delivers a
fragmented datagram rebuilt (one packet here), a ``pcap:`` output writes it as one
record and a live output cuts it again (docs/guide.md, "Ports").
"""
import mbx


class L2Fwd(mbx.NF):
    def __init__(self, name="l2fwd"):
        super().__init__(name)
        self.packets = 0
        self.sub(mbx.PKT, self.on_packets, batch=True)

    def on_packets(self, batch):
        self.packets += len(batch)

    def report(self):
        return {"packets": self.packets}


def make(name="l2fwd"):
    return L2Fwd(name)
