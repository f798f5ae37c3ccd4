"""Service map of a real three-tier chain (frontend -HTTP-> api -TCP-> db) in netns pods,
named through the Kubernetes watch (real client, fake API server serving the pods): exactly
the two expected edges, with the request, error, byte and connection counts the workload
produced, both in the windowed map and in the meshlens_edge_* series."""
from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

from meshlens.agent.identity.resolver import IdentityResolver
from meshlens.agent.identity.k8s_state import ClusterState
from meshlens.agent.identity.k8s_watch import Backoff, KubeWatcher, WatchConfig, api_client
from meshlens.agent.identity.netns import NetnsLocator
from meshlens.agent.runner import Agent, AgentConfig
from meshlens.exporter.prometheus.collector import make_registry
from tests.integration.pods import Pod
from tests.unit.fake_apiserver import FakeApiServer, load_objects, owner_ref, pod_object

CHAIN = str(Path(__file__).with_name("chain_workload.py"))
NODE_NAME = "node-1"
REQUESTS, FAILS, DB_SEND, DB_ANSWER = 97, 8, 211, 307


def listen(pod: Pod, *args: str) -> subprocess.Popen:
    proc = pod.popen([sys.executable, CHAIN, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "listening", proc.stderr.read()
    return proc


def edge_labels(client: str, server: str) -> dict:
    return {"k8s_namespace_name": "shop", "k8s_owner_kind": "Deployment", "k8s_owner_name": client,
            "peer_k8s_namespace_name": "shop", "peer_k8s_owner_kind": "StatefulSet" if server == "db" else "Deployment",
            "peer_k8s_owner_name": server}


def test_three_tier_chain_service_map(node, capsys) -> None:
    pods = {}
    objects = load_objects("replicasets")
    for name, owner in (("frontend-7d4b9c6f5d-x2kq9", owner_ref("ReplicaSet", "frontend-7d4b9c6f5d")),
                        ("api-5f8d7b9c4-q8w2e", owner_ref("ReplicaSet", "api-5f8d7b9c4")),
                        ("db-0", owner_ref("StatefulSet", "db"))):
        pod = node.add_pod(name.split("-")[0], "shop", uid=str(uuid.uuid4()))
        objects.append(pod_object(name, "shop", pod.uid, pod.ipv4, node=NODE_NAME, owner=owner,
                                  container_id=pod.container_id))
        pods[name.split("-")[0]] = pod
    with FakeApiServer(objects) as server:
        state = ClusterState()
        watcher = KubeWatcher(api_client(host=server.url), state, WatchConfig(node_name=NODE_NAME, backoff=Backoff(0.02, 0.1)))
        watcher.start()
        identity = IdentityResolver(state, netns=NetnsLocator())
        agent = Agent(AgentConfig(sweep_interval_s=0.2, map_interval_s=0.5, map_window_s=300),
                      identity=identity, watch_status=watcher.status)
        stop = threading.Event()
        agent.start()
        loop = threading.Thread(target=agent.run, args=(stop,), daemon=True)
        loop.start()
        try:
            assert watcher.wait_synced(10)
            db, api, fe = pods["db"], pods["api"], pods["frontend"]
            listen(db, "db", "--port", "5432", "--recv", str(DB_SEND), "--send", str(DB_ANSWER))
            listen(api, "api", "--port", "8080", "--db-host", db.ipv4, "--db-port", "5432", "--db-send", str(DB_SEND))
            out = fe.run([sys.executable, CHAIN, "frontend", "--api-host", api.ipv4, "--api-port", "8080",
                          "--count", str(REQUESTS), "--fail", str(FAILS)]).stdout
            assert json.loads(out.strip().splitlines()[-1]) == {"503": FAILS, "200": REQUESTS - FAILS}

            registry = make_registry(agent.snapshot)
            fa, ad = edge_labels("frontend", "api"), edge_labels("api", "db")
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline:
                agent.observe_service_map()
                if (registry.get_sample_value("meshlens_edge_connections_opened_total", ad) == REQUESTS
                        and registry.get_sample_value("meshlens_edge_requests_total", fa) == REQUESTS):
                    break
                time.sleep(0.3)
            assert registry.get_sample_value("meshlens_edge_requests_total", fa) == REQUESTS
            assert registry.get_sample_value("meshlens_edge_request_errors_total", fa) == FAILS
            assert registry.get_sample_value("meshlens_edge_connections_opened_total", fa) == 1  # one keep-alive
            assert registry.get_sample_value("meshlens_edge_connections_opened_total", ad) == REQUESTS
            assert registry.get_sample_value("meshlens_edge_sent_bytes_total", ad) == REQUESTS * DB_SEND
            assert registry.get_sample_value("meshlens_edge_received_bytes_total", ad) == REQUESTS * DB_ANSWER
            assert registry.get_sample_value("meshlens_edge_requests_total", ad) == 0  # db speaks no HTTP

            def shop_window() -> list:
                agent.observe_service_map()
                return [e for e in agent.service_map.window()
                        if e.client.namespace == "shop" or e.server.namespace == "shop"]

            # the window is a record of the map at observation time: observe again until the
            # last request's sweep is in it (it raced the counters' check above under load)
            window = shop_window()
            while time.monotonic() < deadline + 10 and sum(e.requests for e in window) < REQUESTS:
                time.sleep(0.3)
                window = shop_window()
            edges = {(e.client.owner_name, e.server.owner_name) for e in window}
            assert edges == {("frontend", "api"), ("api", "db")}
            (f2a,) = [e for e in window if e.server.owner_name == "api"]
            assert f2a.requests == REQUESTS and f2a.errors == FAILS
            assert abs(f2a.error_rate - FAILS / REQUESTS) < 1e-9
            assert f2a.latency_p50_s is not None and 0 < f2a.latency_p50_s <= f2a.latency_p99_s
            with capsys.disabled():
                print("\nservice map (window):")
                for e in window:
                    p50 = f"{e.latency_p50_s * 1000:.1f}" if e.latency_p50_s is not None else "-"
                    p99 = f"{e.latency_p99_s * 1000:.1f}" if e.latency_p99_s is not None else "-"
                    print(f"  {e.client.owner_kind}/{e.client.owner_name} -> {e.server.owner_kind}/{e.server.owner_name}:"
                          f" {e.requests} req ({e.request_rate:.1f}/s), errors {e.error_rate:.1%},"
                          f" p50 {p50} ms p99 {p99} ms, {e.connections_opened} conns,"
                          f" {e.bytes_sent} B sent / {e.bytes_received} B received")
        finally:
            stop.set()
            loop.join(10)
            agent.stop()
            watcher.stop()
            watcher.api.close()
