"""Interop test bed: real clients and servers in network namespaces, real captures of
them, and an independent reference (tshark) for ``mbx flows`` to be checked against.

``netns``     the namespaces, veths, nginx and tcpdump (``Testbed``)
``scenarios`` one function per traffic pattern, each producing one capture
``reference`` ``reference_flows(capture)`` in the ``mbx flows`` JSON shape, and the
              rules for comparing the two
"""
