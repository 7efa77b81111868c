"""Merge functions for parallel groups (``[groups.NAME] merge = "module:function"``).

A group's merge function is called once for each packet at least one member
dropped, after every member has run on it, with the frozenset of the names of the
members that dropped it; a true result drops the packet.  Packets no member dropped
pass without a call.  (Paper §3.3: the splitter that fans an event out to several
monitors decides from their replies whether to block or allow the packet.)
"""


def majority(dropped, members=3):
    """Drop what most of a group of ``members`` (3 unless bound otherwise) dropped."""
    return 2 * len(dropped) > members


def first_says(dropped, first="firewall"):
    """The member ``first`` decides alone; the others' drops are advice (logged by
    them, not acted on)."""
    return first in dropped
