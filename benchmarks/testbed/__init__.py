"""The load test bed of mbx (Table 3 of the paper): client, middlebox and servers in
network namespaces, nginx backends, wrk/ab loads through the middle in a chosen mode.

``python -m benchmarks.testbed --help``; docs/testbed.md describes it.
"""
