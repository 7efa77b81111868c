#!/usr/bin/env bash
# Install mbx and run the main job on the built-in example capture:
# Flow_Stats + Logger over it, then the L4 load balancer writing a translated capture.
source "$(dirname "$0")/_env.sh"
"$PY" -m pip install -q --no-build-isolation -e .
MBX="$VENV/bin/mbx"
mkdir -p out
"$MBX" example-capture out/example.pcap
"$MBX" run flow_stats+logger --in pcap:out/example.pcap --set logger.path=out/events.jsonl
echo "--- first events logged (out/events.jsonl):"
head -n 3 out/events.jsonl
"$MBX" run l4lb --in pcap:out/example.pcap --out pcap:out/l4lb.pcap \
    --set l4lb.vip=198.18.3.1:80 --set l4lb.backends=198.18.2.1:80,198.18.2.2:80
echo "--- translated capture: out/l4lb.pcap"
