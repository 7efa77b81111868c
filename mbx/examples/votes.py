"""Merge functions for parallel groups (``[groups.NAME] merge = "module:function"``).

A group's merge function is called once for each packet at least one member
dropped, after every member has run on it, with the frozenset of the names of the
members that dropped it; a true result drops the packet.  Packets no member dropped
pass without a call.  A merge function with a keyword-only parameter ``members`` is
also given the frozenset of the names of all the group's members: the votes alone
do not say how large the group is.  (Paper §3.3: the splitter that fans an event
out to several monitors decides from their replies whether to block or allow the
packet.)
"""


def majority(dropped, *, members):
    """Drop what more than half of the group's members dropped."""
    return 2 * len(dropped) > len(members)


def first_says(dropped, *, members, first="firewall"):
    """The member ``first`` decides alone; the others' drops are advice (logged by
    them, not acted on).  Another member than ``firewall`` is bound in a file of
    your own: ``ids_says = functools.partial(first_says, first="ids")``."""
    if first not in members:
        # otherwise the group would silently never drop anything
        raise ValueError(f"first_says: the group ({', '.join(sorted(members))}) has no "
                         f"member named {first!r} to decide")
    return first in dropped
