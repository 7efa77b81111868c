"""mbx: Microboxes network functions in Python over a shared Cython stack.

An NF subscribes to typed events (``mb_sub``), publishes its own (``mb_pub``,
``mb_new_msg``, ``mb_publish_event``) and changes one flow's subscription at run
time (``mb_up_sub``).  The protocol work (parsing, flows, fragments) is done once,
in the μStacks, for every NF of the application.
"""
from mbx._events import (
    DATA_RDY,
    EVENT,
    FLOW,
    FLOW_END,
    FLOW_START,
    FLOW_STATS,
    FLOW_TCP,
    FLOW_TCP_ESTABLISHED,
    FLOW_TCP_GAP,
    FLOW_TCP_MEMCAP,
    FLOW_TCP_OVERLAP_CONFLICT,
    FLOW_TCP_START,
    FLOW_TCP_STATE,
    FLOW_TCP_TERMINATE,
    NF,
    PKT,
    PKT_TCP,
    PKT_TCP_FIN,
    PKT_TCP_RETRANSMISSION,
    PKT_TCP_RST,
    PKT_TCP_SYN,
    CHandler,
    Event,
    EventType,
    Message,
    NFError,
    PubPort,
    event_type,
    event_types,
    register_event_type,
)
from mbx.api import (
    current_nf,
    mb_new_msg,
    mb_nf_run,
    mb_pub,
    mb_publish_event,
    mb_sub,
    mb_up_sub,
)
from mbx.errors import (
    AppError,
    CaptureFormatError,
    EventTypeError,
    MbxError,
    PermissionDenied,
    PortError,
    SubscriptionError,
)
from mbx.runtime import App, load_app

__version__ = "0.1.0"


def get_include() -> str:
    """The directory to give Cython (``include_path``) to build an NF of your own
    that cimports ``mbx.cnf``: the one holding the ``mbx`` package's ``.pxd``
    files, in an installed mbx as in an editable install's checkout (which Cython
    cannot find through the import system)."""
    import os

    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

__all__ = [
    "EVENT", "PKT", "FLOW", "FLOW_START", "FLOW_END",
    "PKT_TCP", "PKT_TCP_SYN", "PKT_TCP_FIN", "PKT_TCP_RST", "PKT_TCP_RETRANSMISSION",
    "FLOW_TCP", "FLOW_TCP_START", "FLOW_TCP_ESTABLISHED", "FLOW_TCP_STATE",
    "FLOW_TCP_TERMINATE", "FLOW_TCP_GAP", "FLOW_TCP_OVERLAP_CONFLICT", "FLOW_TCP_MEMCAP",
    "DATA_RDY", "FLOW_STATS",
    "NF", "Event", "EventType", "Message", "PubPort", "CHandler",
    "event_type", "event_types", "register_event_type",
    "mb_sub", "mb_pub", "mb_up_sub", "mb_new_msg", "mb_publish_event", "mb_nf_run",
    "current_nf", "App", "load_app", "get_include",
    "MbxError", "PortError", "CaptureFormatError", "EventTypeError", "SubscriptionError",
    "PermissionDenied", "AppError", "NFError",
]
