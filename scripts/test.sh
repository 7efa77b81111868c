#!/usr/bin/env bash
# Install mbx with its test tools and run the whole test suite (lint included).
source "$(dirname "$0")/_env.sh"
# tshark checks the L4 load balancer's output capture, tcpflow the Monitor's
# reassembly (an independent reassembler); tcpdump and the test bed's tools follow.
apt_install tshark tcpflow nginx-light tcpdump curl wget iproute2 ethtool nftables haproxy wrk \
    apache2-utils
"$PY" -m pip install -q --no-build-isolation -e ".[test]"
# benchmarks/ is a test path too: --benchmark-disable runs each micro benchmark once,
# untimed, for what it asserts (timing belongs to `pytest benchmarks`).
exec "$PY" -m pytest -q --benchmark-disable "$@"
