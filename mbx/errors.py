"""The error types of mbx: one per kind of failure, all under MbxError."""


class MbxError(Exception):
    """Base of every error mbx raises on purpose."""


class PortError(MbxError):
    """A packet port could not be opened, read or written."""


class CaptureFormatError(PortError):
    """A capture file is not a pcap/pcapng file or is damaged."""


class ReaderGoneError(PortError, BrokenPipeError):
    """A capture written to a pipe whose reader went away (``mbx run ... --out pcap:-
    | head``): a BrokenPipeError too, so that ``mbx`` stops quietly with exit status
    141, as it does when its own output's reader goes away and as other tools do."""


class EventTypeError(MbxError):
    """An unknown event type, a bad type definition, or a type mismatch."""


class SubscriptionError(MbxError):
    """A subscription or publication that cannot be honoured."""


class PermissionDenied(MbxError):
    """An NF tried something it did not declare (writing a packet it may only read)."""


class AppError(MbxError):
    """An application description that cannot be loaded or linked."""


class OptionError(AppError):
    """An option an NF's factory does not take, or of a value that does not fit it;
    ``option``: its name, for an application file to give the line it is on."""

    def __init__(self, message, option):
        super().__init__(message)
        self.option = option


def raising_line(exc, filename=None):
    """(file, line) of the innermost frame of ``exc``'s traceback in ``filename``, or,
    without one, outside mbx's own code (the NF's code that raised); None if none."""
    import os
    import traceback

    here = os.path.dirname(os.path.abspath(__file__)) + os.sep
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        name = frame.filename
        if filename is not None:
            mine = name == filename
        else:
            # Cython frames name their .pyx relative to the build ("mbx/_events.pyx");
            # the import machinery's frames are "<frozen importlib._bootstrap>"
            mine = not (os.path.abspath(name).startswith(here)
                        or name.startswith("mbx" + os.sep) or name.startswith("<frozen "))
        if mine:
            return name, frame.lineno
    return None


def code_place(path, line):
    """``"FILE, line N"``: how messages and graphs place the NF's own code (a handler
    that raised, a merge function), by the file's name alone, as the user wrote it
    beside the application, not by the absolute path Python compiled it under."""
    return f"{path.rsplit('/', 1)[-1]}, line {line}"


def user_code_line(exc):
    """``" (at FILE, line N)"`` for the NF's code that raised ``exc``, or ``""``:
    error messages carry it so that a user finds the failing line without a
    traceback through mbx."""
    at = raising_line(exc)
    return f" (at {code_place(*at)})" if at else ""


def exc_text(exc):
    """``"Type: message"`` of an exception, or ``"Type"`` when it has none (a bare
    ``raise KeyboardInterrupt``): how every error message quotes another error."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def did_you_mean(name, known):
    """" (did you mean A, B?)" with the names of ``known`` closest to ``name`` (up to
    three), or "" when none is close: how every error about an unknown name suggests
    the one that was meant."""
    import difflib

    near = difflib.get_close_matches(name, list(known), n=3)
    return f" (did you mean {', '.join(near)}?)" if near else ""
