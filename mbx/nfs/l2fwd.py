"""L2 forwarder: passes every frame unchanged and counts them (a batch handler)."""
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
