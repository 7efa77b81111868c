"""What the micro benchmarks of one pytest session recorded, for the ratios printed
at its end (``conftest.py``, ``test_bench_monitor.py``).  A module of its own, not
``conftest``: when ``tests/`` and ``benchmarks/`` are collected together, the name
``conftest`` is the tests' one."""

# median seconds of each benchmark of this session, by name (see ``record``)
MEDIANS = {}
# events delivered by the runs of a benchmark, by name
EVENTS = {}
# extra figures that are not timings (bytes), by name
FIGURES = {}
