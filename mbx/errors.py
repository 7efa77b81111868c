"""The error types of mbx: one per kind of failure, all under MbxError."""


class MbxError(Exception):
    """Base of every error mbx raises on purpose."""


class PortError(MbxError):
    """A packet port could not be opened, read or written."""


class CaptureFormatError(PortError):
    """A capture file is not a pcap/pcapng file or is damaged."""


class EventTypeError(MbxError):
    """An unknown event type, a bad type definition, or a type mismatch."""


class SubscriptionError(MbxError):
    """A subscription or publication that cannot be honoured."""


class PermissionDenied(MbxError):
    """An NF tried something it did not declare (writing a packet it may only read)."""


class AppError(MbxError):
    """An application description that cannot be loaded or linked."""
