"""Raw AF_PACKET forwarding rates: mbx's BridgePorts vs a pure-Python packet loop.

    gen ns  g0 ---- mg  [forwarder]  ms ---- s0  sink ns

A generator (an mbx AfPacketPort sending 64-frame sendmmsg bursts) pushes N
minimum-size UDP frames into mg; the forwarder in the middle namespace sends each
out of ms; the sink's kernel drops them (they are addressed to another MAC).  Two
forwarders, measured in the same run over the same traffic:

- ``mbx``: ``BridgePorts`` receive -> send, one burst at a time (no stack, no NF),
  on the default TPACKET_V2 ring; ``mbx-v3`` the same on the TPACKET_V3 ring
  (``ring="v3"``); ``mbx-app`` the V2 bridge with ``App([L2Fwd()])`` (parse, flow
  table, PKT events);
- ``python``: ``socket(AF_PACKET)`` ``recv_into`` / ``send`` per packet.

Rates are forwarded packets per CPU second of the forwarder process (user + system,
from getrusage): "packets/s per core".  The wall-clock rate is printed too, but on a
2-core machine the generator, the veth softirq work and the forwarder share the
cores, so it mostly shows what the generator can offer.  Softirq work run on the
forwarder's behalf (its sendmmsg delivering into the sink namespace) is charged to
it as system time; receive-side softirq work is charged to whoever ran it.

Run as root: ``python benchmarks/afpacket_rates.py [--packets N]``.  Not a test.
"""
import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time

from _args import at_least

TAG = f"ar{os.getpid() % 100000}"
NS_G, NS_M, NS_S = f"{TAG}g", f"{TAG}m", f"{TAG}s"
HERE = os.path.abspath(__file__)


def sh(*cmd, check=True, **kw):
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=30, **kw)


def in_ns(ns, *cmd):
    return ["ip", "netns", "exec", ns, *cmd]


def setup():
    for ns in (NS_G, NS_M, NS_S):
        sh("ip", "netns", "add", ns)
        sh(*in_ns(ns, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"), check=False)
    sh("ip", "link", "add", "g0", "netns", NS_G, "type", "veth", "peer", "name", "mg",
       "netns", NS_M)
    sh("ip", "link", "add", "s0", "netns", NS_S, "type", "veth", "peer", "name", "ms",
       "netns", NS_M)
    for ns, dev in ((NS_G, "g0"), (NS_M, "mg"), (NS_M, "ms"), (NS_S, "s0")):
        sh("ip", "-n", ns, "link", "set", dev, "up")
        sh(*in_ns(ns, "ethtool", "-K", dev, "tx", "off", "rx", "off", "tso", "off",
                  "gso", "off", "gro", "off"), check=False)
        # Receive packet steering over both CPUs.  A flood from one generator would
        # otherwise run all receive work, the copies into the forwarders' rings
        # included, in the generator's context.  (The load test bed leaves RPS off:
        # for request/response traffic its IPIs cost more here; docs/testbed.md.)
        sh(*in_ns(ns, "sh", "-c", f"echo 3 > /sys/class/net/{dev}/queues/rx-0/rps_cpus"),
           check=False)
    rules = ("table netdev mbx {\n"
             " chain in_mg { type filter hook ingress device mg priority 0; policy drop; }\n"
             " chain in_ms { type filter hook ingress device ms priority 0; policy drop; }\n"
             "}\n")
    sh(*in_ns(NS_M, "nft", "-f", "-"), input=rules)


def teardown():
    for ns in (NS_G, NS_M, NS_S):
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def frame():
    # 60-byte UDP/IPv4 frame to a MAC nobody owns: the sink drops it at once.
    dst, src = b"\x02\x00\x00\x00\xbe\xef", b"\x02\x00\x00\x00\x00\x01"
    ip = bytes.fromhex("4500002e00000000401100000000000000000000")
    ip = ip[:12] + socket.inet_aton("198.18.7.1") + socket.inet_aton("198.18.8.1")
    udp = bytes.fromhex("4e200035001a0000")
    return (dst + src + b"\x08\x00" + ip + udp).ljust(60, b"\0")


# ---------------------------------------------------------------- inside namespaces


def generate(iface, n):
    from mbx._afpacket import AfPacketPort
    from mbx._packet import Batch
    port = AfPacketPort(iface, rx=False)
    batch = Batch(64)
    f = frame()
    for _ in range(64):
        batch.append(f)
    sent = 0
    t0 = time.perf_counter()
    while sent < n:
        sent += port.send(batch)
    dt = time.perf_counter() - t0
    print(json.dumps({"offered": sent, "tx_dropped": port.tx_dropped,
                      "offered_pps": sent / dt}))


def cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def user_seconds():
    return resource.getrusage(resource.RUSAGE_SELF).ru_utime


def forward(mode, n, idle_s=1.0):
    """Forward mg -> ms until n packets or idle_s without one after the first."""
    print("ready", flush=True)
    u0 = user_seconds()
    got = 0
    first = last = None
    if mode == "python":
        rx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(3))
        rx.bind(("mg", 0))
        rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 << 20)
        tx = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        tx.bind(("ms", 0))
        rx.settimeout(idle_s)
        buf = bytearray(2048)
        view = memoryview(buf)
        recv_into, send = rx.recv_into, tx.send
        c0 = cpu_seconds()
        while got < n:
            try:
                k = recv_into(buf)
            except TimeoutError:
                if got:
                    last = time.perf_counter() - idle_s
                    break
                continue
            if first is None:
                first = time.perf_counter()
            send(view[:k])
            got += 1
        last = last or time.perf_counter()
        cpu = cpu_seconds() - c0
        dropped = None
    else:
        from mbx._afpacket import BridgePorts
        from mbx._packet import Batch
        bridge = BridgePorts("mg", "ms", ring="v3" if mode == "mbx-v3" else "v2",
                             block_count=128, timeout_ms=10)
        if mode == "mbx-app":
            # The run ends when the bridge goes idle: a watchdog stops it.
            import threading

            from mbx.nfs.l2fwd import L2Fwd
            from mbx.runtime import App

            def watchdog():
                seen, quiet = -1, 0.0
                while True:
                    time.sleep(0.1)
                    now = bridge.rx_pkts
                    quiet = quiet + 0.1 if now == seen and now else 0.0
                    seen = now
                    if quiet >= idle_s or now >= n:
                        bridge.stop()
                        return
            threading.Thread(target=watchdog, daemon=True).start()
            c0 = cpu_seconds()
            first = time.perf_counter()
            App([L2Fwd()]).run(bridge, bridge)
            last = time.perf_counter() - idle_s
            cpu = cpu_seconds() - c0
            got = bridge.tx_pkts
        else:
            batch = Batch(64)
            receive, send = bridge.receive, bridge.send
            c0 = cpu_seconds()
            quiet_since = None
            while got < n:
                batch.reset()
                k = receive(batch)
                if k <= 0:
                    if got:
                        now = time.perf_counter()
                        quiet_since = quiet_since or now
                        if now - quiet_since >= idle_s:
                            break
                    continue
                quiet_since = None
                if first is None:
                    first = time.perf_counter()
                got += send(batch)
                last = time.perf_counter()
            cpu = cpu_seconds() - c0
        dropped = bridge.counters["rx_dropped"]
        bridge.close()
    wall = (last - first) if first and last and last > first else float("nan")
    print(json.dumps({"mode": mode, "forwarded": got, "cpu_s": cpu, "wall_s": wall,
                      "user_s": user_seconds() - u0, "rx_dropped": dropped}))


# ---------------------------------------------------------------- driver


def measure(mode, n):
    fwd = subprocess.Popen(in_ns(NS_M, sys.executable, HERE, "forward", mode, str(n)),
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert fwd.stdout.readline().strip() == "ready", fwd.stderr.read()
        time.sleep(0.3)
        gen = sh(*in_ns(NS_G, sys.executable, HERE, "generate", "g0", str(n)))
        out, err = fwd.communicate(timeout=120)
        if fwd.returncode:
            raise RuntimeError(err)
    finally:
        if fwd.poll() is None:
            fwd.kill()
            fwd.wait()
    res = json.loads(out.strip().splitlines()[-1])
    res.update(json.loads(gen.stdout.strip().splitlines()[-1]))
    res["pps_per_core"] = res["forwarded"] / res["cpu_s"] if res["cpu_s"] else 0.0
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--packets", type=at_least(1), default=1_000_000)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("needs root (network namespaces, AF_PACKET)")
    teardown()
    try:
        setup()
        results = {m: measure(m, args.packets)
                   for m in ("mbx", "mbx-v3", "mbx-app", "python")}
    finally:
        teardown()
    print(f"{'forwarder':<10} {'offered':>9} {'offer pps':>10} {'forwarded':>9} "
          f"{'dropped':>8} {'cpu s':>6} {'user s':>6} {'pps/core':>10} {'wall pps':>10}")
    for m, r in results.items():
        wall_pps = r["forwarded"] / r["wall_s"] if r["wall_s"] == r["wall_s"] else 0
        print(f"{m:<10} {r['offered']:>9} {r['offered_pps']:>10,.0f} {r['forwarded']:>9} "
              f"{r['offered'] - r['forwarded']:>8} {r['cpu_s']:>6.2f} {r['user_s']:>6.2f} "
              f"{r['pps_per_core']:>10,.0f} {wall_pps:>10,.0f}")
    py = results["python"]["pps_per_core"]
    for m in ("mbx", "mbx-v3", "mbx-app"):
        ratio = results[m]["pps_per_core"] / py if py else float("nan")
        print(f"ratio {m} / python (packets per CPU second): {ratio:.1f}x")
    v2, v3 = results["mbx"]["pps_per_core"], results["mbx-v3"]["pps_per_core"]
    print(f"ratio mbx (V2 ring) / mbx-v3 (packets per CPU second): "
          f"{v2 / v3 if v3 else float('nan'):.2f}x")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "generate":
        generate(sys.argv[2], int(sys.argv[3]))
    elif len(sys.argv) > 1 and sys.argv[1] == "forward":
        forward(sys.argv[2], int(sys.argv[3]))
    else:
        main()
