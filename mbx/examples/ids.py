"""Listing 1 of the Microboxes paper, the IDS signature-matching NF, in mbx.

The paper's C calls map one to one (the controller handle is implicit):
``mb_sub``, ``mb_pub``, ``mb_up_sub``, ``mb_new_msg``, ``mb_publish_event``,
``mb_nf_run``.  A tiny DPI NF stands in for the nDPI one: it classifies each flow
by its server port and publishes DPI_DETECT.  The IDS listens to every packet with
a no-op handler until DPI_DETECT tells it what the flow is, then switches that
flow, and only that flow, to the matching signature handler.  mb_up_sub takes
effect for the flow's later packets; the packet that classified the flow (its
first: a SYN carrying data, the first packet seen of a flow picked up mid-stream)
went to the no-op, so cb_detect runs the signature handler on it too: DPI_DETECT,
published while the DPI NF handled that packet's FLOW/START, carries that packet.

It matches each packet on its own, as Listing 1 does, so: a signature split
across two TCP segments (in order or not) raises no alert; a retransmitted segment
raises its alert again; and a flow picked up mid-stream whose first packet seen is
the server's is classified by the client's port (the stack takes the first
sender for the client), so usually not at all.  Matching the byte stream instead
would subscribe to DATA_RDY (``side="server"`` for the client's bytes) in place of
PKT and search ``ev.read()`` plus a few bytes kept from the previous read: the TCP
Monitor reassembles in order and delivers retransmitted bytes once.

Run it under mbx (``mbx run path/to/ids.py+logger --set logger.types=IDS_ALERT
--in pcap:FILE``) or on its own (``python ids.py --in pcap:FILE``).
The paper subscribes to PKT/TCP; PKT (its parent) serves until the TCP Monitor.
"""
import re

import mbx
from mbx import mb_new_msg, mb_nf_run, mb_pub, mb_publish_event, mb_sub, mb_up_sub

HTTP, SQL = 1, 2
DPI_DETECT = mbx.register_event_type("DPI_DETECT", fields=[("dpi_app_type", "u16")])
IDS_ALERT = mbx.register_event_type("IDS_ALERT", fields=[("rule", "u16")])

# --- the DPI stand-in -----------------------------------------------------------
dpi = mbx.NF("dpi")
dpi_port = dpi.pub(DPI_DETECT)
APP_BY_PORT = {80: HTTP, 8080: HTTP, 3306: SQL}


def dpi_on_flow(ev):
    app = APP_BY_PORT.get(ev.srv_port)
    if app is not None:
        msg = dpi.new_msg(DPI_DETECT)
        msg.dpi_app_type = app
        dpi.publish(dpi_port, msg)


dpi.sub(mbx.FLOW_START, dpi_on_flow)

# --- Listing 1 --------------------------------------------------------------------
SQL_INJECTION = re.compile(rb"'\s*(or|and)\s+\d+\s*=\s*\d+|union\s+select", re.I)
HTTP_ATTACK = re.compile(rb"\.\./\.\./|<script>", re.I)
alerts = []
port = None


def start_ids():
    global port
    mb_sub(mbx.PKT, cb_noop)                     # listing line 4
    mb_sub(DPI_DETECT, cb_detect)                # line 5
    port = mb_pub(IDS_ALERT)                     # line 7
    mb_nf_run()                                  # line 8


def cb_noop(m):
    pass


def cb_detect(m):                                # line 10
    if m.dpi_app_type == HTTP:                   # line 11
        mb_up_sub(mbx.PKT, m.flow, cb_http)      # line 12
        cb_http(m)                               # the packet that classified it
    elif m.dpi_app_type == SQL:                  # line 13
        mb_up_sub(mbx.PKT, m.flow, cb_sql)       # line 14
        cb_sql(m)


def cb_sql(m):                                   # line 16
    if sql_injection_attack(m.payload):          # line 17
        m2 = mb_new_msg(IDS_ALERT)               # line 18
        m2.rule = 1                              # line 19: fill in m2
        mb_publish_event(port, m2)               # line 20
        alerts.append(("sql", m.flow))


def cb_http(m):
    if HTTP_ATTACK.search(m.payload):
        m2 = mb_new_msg(IDS_ALERT)
        m2.rule = 2
        mb_publish_event(port, m2)
        alerts.append(("http", m.flow))


def sql_injection_attack(payload):
    return SQL_INJECTION.search(payload) is not None


start_ids()
