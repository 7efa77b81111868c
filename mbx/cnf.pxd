# The C side of an NF (cimport this from a Cython NF): the message and packet
# structs, the handler type and its verdicts, chandler() to hand a handler to
# NF.sub / NF.up_sub, and pkt_rewrite() to change addresses and ports (checksums
# follow, exactly as Event.set_src/set_dst; the NF must be made with writes=True).
# A packet from a port with offloads may leave its L4 checksum to the sending
# device (p.offload & OFFLOAD_CSUM_PARTIAL): pkt_rewrite knows; a handler that
# changes other bytes leaves such a checksum alone, or finishes it first with
# pkt_finish_csum(p) if it must read a final one.
# A handler runs inside the dispatcher's loop, maybe without the GIL: it must not
# touch Python objects, and must not block.
#
#     from mbx.cnf cimport MBX_PASS, chandler, mbx_msg, mbx_pkt
#
#     cdef int on_pkt(void *ctx, const mbx_msg *m, mbx_pkt *p) noexcept nogil:
#         return MBX_PASS
#
#     nf.sub("PKT", chandler(on_pkt, NULL, None, "on_pkt"))
from mbx._events cimport (
    MBX_DROP, MBX_PASS, T_DATA_RDY, T_FLOW, T_FLOW_END, T_FLOW_START, T_PKT, T_PKT_TCP,
    CHandler, chandler, data_rdy_body, flow_body, mbx_c_handler, mbx_msg, mbx_msg_hdr,
    pkt_body, pkt_tcp_body,
)
from mbx._packet cimport NO_FLOW, OFFLOAD_CSUM_PARTIAL, VERDICT_DROP, mbx_pkt
from mbx._rewrite cimport REWRITE_OK, pkt_finish_csum, pkt_rewrite
