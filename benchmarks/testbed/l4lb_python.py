"""The L4 load balancer with Python per-packet handlers (mbx.nfs.l4lb.PyL4LB), as an
NF file for ``python -m benchmarks.testbed run --mode mbx-l4lb --mbx-nf
benchmarks/testbed/l4lb_python.py``: the baseline the C-handler ``l4lb`` is measured
against."""
from mbx.nfs.l4lb import PyL4LB


def make(name="l4lb_python", vip="198.18.3.1:80",
         backends="198.18.2.1:80,198.18.2.2:80"):
    return PyL4LB(name, vip, backends)
