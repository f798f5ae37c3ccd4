"""Flows per second through `meshlens relay`, and what it costs the relay.

Setup: N synthetic agents, each a separate Python process serving the real Observer
(exporter/grpc/observer.ObserverServicer over a FlowHub, grpcio server) and publishing
connection-close flows as fast as it can (or at --rate per agent), built by the real
conversion (exporter/grpc/convert.conn_flow); one real `meshlens relay` subprocess
following them with its sort window; this process follows the relay and counts flows.
The agents are synthetic so the relay, not traffic generation, is what saturates: the
number is the relay's merge + fan-out throughput on this machine (2 cores shared by the
producers, the relay and the counting client, so a lower bound).

    python -m bench.relay                  # 3 agents, 3 rounds of 10 s, writes bench/relay.md
    python -m bench.relay --rate 300 --append   # a load it sustains: every flow through, none lost
    python -m bench.relay --agents 2 --seconds 5 --rounds 1 --no-write

Not part of `make bench` or `make test`: a report, nothing fails.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import grpc
import psutil

from meshlens.exporter.proto import observer_pb2 as pb
from meshlens.exporter.proto import observer_pb2_grpc as pbg

HERE = Path(__file__).resolve().parent
MESHLENS = str(Path(sys.executable).with_name("meshlens"))


def producer(port: int, node: str, rate: float) -> None:
    """A synthetic agent: the real servicer and hub, flows published in a loop."""
    from meshlens.agent.identity.model import Workload
    from meshlens.exporter.grpc.convert import conn_flow, response
    from meshlens.exporter.grpc.hub import FlowHub
    from meshlens.exporter.grpc.observer import GrpcServer, ObserverServicer
    from tests.unit.grpc_fakes import PodIdentity, conn

    ident = PodIdentity({101: Workload("shop", f"client-{node}", "Deployment", "client")},
                        {"10.1.0.3": Workload("shop", f"web-{node}", "Deployment", "web")})
    hub = FlowHub(node, ring_size=4096, queue_size=8192)

    def status() -> pb.ServerStatusResponse:
        return pb.ServerStatusResponse(seen_flows=hub.seen_flows, num_connected_nodes=1)
    servicer = ObserverServicer(hub, status, lambda: [pb.Node(name=node, state=pb.Node.NODE_CONNECTED)])
    server = GrpcServer(servicer, f"127.0.0.1:{port}").start()  # noqa: F841 - kept: a collected server stops
    print("ready", flush=True)
    i = 0
    while not hub.subscribers:
        time.sleep(0.01)
    start = time.monotonic()
    while True:
        ev = conn("close", 101, "outbound", "10.1.0.2", 30000 + i % 30000, "10.1.0.3", 80, bytes_sent=4099,
                  bytes_received=1009, duration_s=0.013)
        hub.publish(response(conn_flow(ev, ident, node, time.time_ns())))
        i += 1
        if rate > 0:
            ahead = i / rate - (time.monotonic() - start)
            if ahead > 0:
                time.sleep(ahead)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seen(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        return pbg.ObserverStub(ch).ServerStatus(pb.ServerStatusRequest(), timeout=5).seen_flows


def received(metrics_port: int) -> float:
    """Flows the relay has received from all agents (its own /metrics)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return sum(s.value for fam in text_string_to_metric_families(text) for s in fam.samples
               if s.name == "meshlens_relay_node_flows_total")


def one_round(n_agents: int, seconds: float, rate: float, window: float) -> Dict[str, float]:
    ports = [free_port() for _ in range(n_agents)]
    procs = [subprocess.Popen([sys.executable, "-m", "bench.relay", "--producer", str(p), f"node-{i}", str(rate)],
                              stdout=subprocess.PIPE, cwd=HERE.parent) for i, p in enumerate(ports)]
    relay = None
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == b"ready"
        rport, mport = free_port(), free_port()
        relay = subprocess.Popen([MESHLENS, "--log-level", "WARNING", "relay", "--agents", ",".join(f"127.0.0.1:{p}" for p in ports),
                                  "--listen", f"127.0.0.1:{rport}", "--metrics-addr", f"127.0.0.1:{mport}",
                                  "--sort-window", str(window)])
        ch = grpc.insecure_channel(f"127.0.0.1:{rport}")
        grpc.channel_ready_future(ch).result(timeout=15)
        call = pbg.ObserverStub(ch).GetFlows(pb.GetFlowsRequest(follow=True))
        counts = {"flows": 0, "lost": 0, "late": 0}
        last = [0]

        def read() -> None:
            try:
                for r in call:
                    k = r.WhichOneof("response_types")
                    if k == "flow":
                        counts["flows"] += 1
                        t = r.time.ToNanoseconds()
                        if t < last[0]:
                            counts["late"] += 1
                        last[0] = t
                    elif k == "lost_events":
                        counts["lost"] += r.lost_events.num_events_lost
            except grpc.RpcError:
                pass
        t = threading.Thread(target=read, daemon=True)
        t.start()
        time.sleep(window + 3.0)             # connected, the window filled: steady state
        rp, me = psutil.Process(relay.pid), psutil.Process()
        m0 = me.cpu_times()
        c0, f0, s0, i0 = rp.cpu_times(), counts["flows"], sum(seen(p) for p in ports), received(mport)
        t0 = time.monotonic()
        time.sleep(seconds)
        el = time.monotonic() - t0
        c1, f1, s1, i1 = rp.cpu_times(), counts["flows"], sum(seen(p) for p in ports), received(mport)
        rss = rp.memory_info().rss
        m1 = me.cpu_times()
        call.cancel()
        ch.close()
        return {"relayed_per_s": (f1 - f0) / el, "produced_per_s": (s1 - s0) / el, "received_per_s": (i1 - i0) / el,
                "relay_cpu": (c1.user + c1.system - c0.user - c0.system) / el,
                "client_cpu": (m1.user + m1.system - m0.user - m0.system) / el, "relay_rss_mib": rss / 2**20,
                "lost": counts["lost"], "late": counts["late"]}
    finally:
        if relay is not None:
            relay.terminate()
            relay.wait(10)
        for p in procs:
            p.kill()
            p.wait()


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--producer", nargs=3, metavar=("PORT", "NODE", "RATE"), help=argparse.SUPPRESS)
    ap.add_argument("--agents", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--rate", type=float, default=0.0, help="flows/s per agent (0: as fast as it can)")
    ap.add_argument("--sort-window", type=float, default=2.0)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--append", action="store_true", help="add this run to bench/relay.md instead of replacing it")
    a = ap.parse_args(argv)
    if a.producer:
        producer(int(a.producer[0]), a.producer[1], float(a.producer[2]))
        return 0
    rounds = [one_round(a.agents, a.seconds, a.rate, a.sort_window) for _ in range(a.rounds)]
    for r in rounds:
        print({k: round(v, 1) for k, v in r.items()})
    med = {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
    rng = {k: (min(r[k] for r in rounds), max(r[k] for r in rounds)) for k in rounds[0]}
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=HERE).stdout.strip()
    except OSError:
        commit = "?"

    def cell(k: str, fmt: str = "{:.0f}") -> str:
        return f"{fmt.format(med[k])} [{fmt.format(rng[k][0])}–{fmt.format(rng[k][1])}]"
    text = f"""# Flows per second through `meshlens relay`

Measured by `python -m bench.relay --agents {a.agents} --seconds {a.seconds:g} --rounds {a.rounds} \\
--sort-window {a.sort_window:g}{f' --rate {a.rate:g}' if a.rate else ''}` (see the module's docstring for the set-up:
{a.agents} synthetic agents in their own processes serving the real Observer, the real relay
subprocess, one following client counting what it gets). Commit {commit}, {platform.node()},
{os.cpu_count()} CPUs (load average {os.getloadavg()[0]:.1f} at the end: the machine is shared), Python
{platform.python_version()}, grpcio {grpc.__version__}.
Median [min–max] over {a.rounds} rounds of {a.seconds:g} s, after {a.sort_window + 3:g} s to reach steady state.

| what | value |
|---|---|
| flows/s out of the relay (what the client received) | {cell('relayed_per_s')} |
| flows/s the agents published | {cell('produced_per_s')} |
| flows/s the relay received from the agents | {cell('received_per_s')} |
| relay CPU (cores) | {cell('relay_cpu', '{:.2f}')} |
| counting client's CPU (cores) | {cell('client_cpu', '{:.2f}')} |
| relay RSS (MiB) | {cell('relay_rss_mib', '{:.1f}')} |
| lost_events reported to the client (whole round) | {cell('lost')} |
| flows out of time order at the client | {cell('late')} |

Reading it: the agents publish {f'{a.rate:g} flows/s each' if a.rate else 'as fast as one Python process each can'};
whatever the relay cannot take in time is dropped at the agents' per-client queues (or at
the relay's queue for its client) and reported as lost_events: nothing is silent. The
machine's cores are shared by the {a.agents} producers, the relay and the client, so the
relay's own ceiling on a quiet machine is at least this. The limit is per-message cost in
Python gRPC (every flow is one message through the C core and back into Python, three
times: agent out, relay in, relay out); the sort window and hub are a few percent of the
relay's profile (py-spy). Batching flows per message or a relay in a compiled language
would be the next step if clusters need more.
"""
    if a.append:
        text = "\n## " + text.split("\n", 1)[1].lstrip("\n").replace("Measured by", "Also measured by", 1)
    if not a.no_write:
        with open(HERE / "relay.md", "a" if a.append else "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
