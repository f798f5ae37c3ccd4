"""The REST API and the CLI on a running agent (`meshlens run`, Kubernetes names from a fake
API server serving the test pods to the real client) with real traffic between netns pods:
frontend -HTTP-> api (nginx), frontend -TCP-> db (exact byte counts).

Ground truth: the client's own report and nginx's access log for requests by status, the
TCP workload's report for bytes and connections, the agent's Prometheus exposition for the
stat/routes counts, the requests this test sent for SMI and the tap; headless Chromium draws
the HTML service map, checked against the JSON (screenshot kept under test-artifacts/)."""
from __future__ import annotations

import collections
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import httpx
import pytest

from meshlens.agent.sources.l7.routes import template
from tests.integration.agent_proc import MESHLENS, AgentProcess
from tests.integration.l7_helpers import run_py
from tests.integration.pods import Node, Pod
from tests.integration.servers import Dnsmasq, Nginx, Prometheus, dns_query
from tests.integration.test_tcp_l4 import finish, run_json, start_listener
from tests.unit.fake_apiserver import FakeApiServer, kubeconfig, load_objects, owner_ref, pod_object

NODE_NAME = "node-1"
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TCP_CONNS, TCP_UP, TCP_DOWN = 13, 4099, 1009
REQUESTS = {"/status/200": 31, "/status/503": 7, "/status/404": 5}
DNS_LOOKUPS = {"db.shop.test": 5, "nope.shop.test": 2}     # NOERROR, NXDOMAIN

# keep-alive HTTP client: one connection, the given paths, prints {status: count}
CLIENT = r'''
import http.client, json, sys
host, port, plan = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
conn = http.client.HTTPConnection(host, port, timeout=10)
got = {}
for path, n in plan:
    for _ in range(n):
        conn.request("GET", path + "?user=secret-query-4099")
        r = conn.getresponse(); r.read()
        got[str(r.status)] = got.get(str(r.status), 0) + 1
conn.close()
print(json.dumps(got))
'''


def http_load(pod: Pod, host: str, plan: List[Tuple[str, int]]) -> Dict[str, int]:
    return json.loads(run_py(pod, CLIENT, host, "80", json.dumps(plan)).strip().splitlines()[-1])


class Live:
    def __init__(self, agent: AgentProcess, pods: Dict[str, Pod], nginx: Nginx, sent: Dict[str, int]) -> None:
        self.agent, self.pods, self.nginx, self.sent = agent, pods, nginx, sent
        self.base = f"http://{agent.addr}"

    def get(self, path: str, **params) -> dict:
        r = httpx.get(self.base + path, params=params, timeout=10)
        assert r.status_code == 200, r.text
        return r.json()

    def flows(self, **params) -> List[dict]:
        return self.get("/api/v1/flows", limit=10000, **params)["flows"]


def wait_until(pred, timeout: float = 20.0, step: float = 0.3):
    deadline = time.monotonic() + timeout
    while True:
        got = pred()
        if got or time.monotonic() > deadline:
            return got
        time.sleep(step)


@pytest.fixture(scope="module")
def live() -> Iterator[Live]:
    node = Node()
    tmp = tempfile.mkdtemp(prefix="meshlens-api-")
    try:
        objects = load_objects("replicasets")
        pods: Dict[str, Pod] = {}
        for name, owner in (("frontend-7d4b9c6f5d-x2kq9", owner_ref("ReplicaSet", "frontend-7d4b9c6f5d")),
                            ("api-5f8d7b9c4-q8w2e", owner_ref("ReplicaSet", "api-5f8d7b9c4")),
                            ("db-0", owner_ref("StatefulSet", "db"))):
            pod = node.add_pod(name.split("-")[0], "shop", uid=str(uuid.uuid4()))
            pod.k8s_name = name  # type: ignore[attr-defined]
            objects.append(pod_object(name, "shop", pod.uid, pod.ipv4, node=NODE_NAME, owner=owner,
                                      container_id=pod.container_id))
            pods[name.split("-")[0]] = pod
        with FakeApiServer(objects) as api_server:
            kc = os.path.join(tmp, "kubeconfig")
            kubeconfig(kc, api_server.url)
            agent = AgentProcess("--kubeconfig", kc, "--node-name", NODE_NAME, "--history-interval", "0.5",
                                 "--history-length", "600", "--map-interval", "0.5")
            with agent, Nginx(pods["api"]) as nginx, Dnsmasq(pods["db"], {"db.shop.test": [pods["db"].ipv4]}) as dnsmasq:
                live = Live(agent, pods, nginx, {})
                # names come from the watch: wait until every resource has been listed once
                synced = wait_until(lambda: (lambda w: bool(w) and all(x["synced"] for x in w.values()))(
                    live.get("/api/v1/status")["identity"]["watches"]), timeout=30)
                assert synced, live.get("/api/v1/status")["identity"]
                fe, db = pods["frontend"], pods["db"]
                server = start_listener(db, "server", "--host", "0.0.0.0", "--port", "5432", "--count", str(TCP_CONNS),
                                        "--recv", str(TCP_UP), "--send", str(TCP_DOWN))
                run_json(fe, "client", "--host", db.ipv4, "--port", "5432", "--count", str(TCP_CONNS),
                         "--send", str(TCP_UP))
                finish(server)
                sent = http_load(fe, pods["api"].ipv4, list(REQUESTS.items()))
                assert sent == {"200": 31, "503": 7, "404": 5}
                for name, n in DNS_LOOKUPS.items():
                    for _ in range(n):
                        dns_query(fe, db.ipv4, name)
                live.sent = sent
                live.dnsmasq = dnsmasq  # type: ignore[attr-defined]
                yield live
    finally:
        node.close()
        shutil.rmtree(tmp, ignore_errors=True)


def _frontend_http(live: Live) -> List[dict]:
    return [f for f in live.flows(pod="frontend", direction="outbound", port=80) if f["http"]]


def test_flows_filtered_by_pod_equal_the_traffic(live: Live) -> None:
    fe = live.pods["frontend"]
    # `pod` matches either end (hubble's --pod): the frontend's outbound side and the db's
    # inbound side of the same connections
    both = wait_until(lambda: [f for f in live.flows(pod="frontend", to_workload="sts/db")
                               if f["connections_closed"] == TCP_CONNS])
    assert {g["direction"] for g in both} == {"outbound", "inbound"}, both
    tcp = [g for g in both if g["direction"] == "outbound"]
    (f,) = tcp
    assert f["local"] == {"namespace": "shop", "pod": fe.k8s_name, "workload_kind": "Deployment",  # type: ignore[attr-defined]
                          "workload": "frontend"}
    assert f["peer"]["pod"] == "db-0" and f["peer"]["ip"] == live.pods["db"].ipv4 and f["port"] == 5432
    assert (f["bytes_sent"], f["bytes_received"]) == (TCP_CONNS * TCP_UP, TCP_CONNS * TCP_DOWN)
    assert (f["connections_opened"], f["connections_active"]) == (TCP_CONNS, 0)
    http = wait_until(lambda: [g for g in _frontend_http(live) if g["http"]["requests"] == sum(REQUESTS.values())])
    assert http, _frontend_http(live)
    (h,) = http
    log = collections.Counter(str(e["status"]) for e in live.nginx.access_log_entries(expect=sum(REQUESTS.values())))
    assert h["http"]["by_status"] == dict(log) == live.sent
    assert h["http"]["errors"] == 7 and h["connections_opened"] == 1 and h["peer"]["workload"] == "api"
    # the same pod through its own path, and the db's inbound side from the peer's view
    own = live.get(f"/api/v1/namespaces/shop/pods/{fe.k8s_name}/flows")["flows"]  # type: ignore[attr-defined]
    assert {(g["peer"]["workload"], g["port"]) for g in own} >= {("db", 5432), ("api", 80)}
    (inbound,) = live.flows(pod="db-0", direction="inbound")
    assert (inbound["bytes_received"], inbound["connections_opened"]) == (TCP_CONNS * TCP_UP, TCP_CONNS)
    assert "secret-query" not in json.dumps(live.flows())          # no query string ever leaves


def test_dns_lookups_are_udp_flows_equal_to_what_dnsmasq_answered(live: Live) -> None:
    got = wait_until(lambda: [f for f in live.flows(pod="frontend", protocol="dns") if f["dns"]["lookups"] == 7])
    assert got, live.flows(pod="frontend", protocol="dns")
    (d,) = got
    log = live.dnsmasq.query_log()  # type: ignore[attr-defined]
    assert len([line for line in log if "query[A]" in line]) == 7
    assert d["dns"]["by_rcode"] == {"NoError": 5, "NXDomain": 2} and d["dns"]["answers"] == 5
    assert (d["protocol"], d["port"], d["peer"]["pod"]) == ("udp", 53, "db-0")


def _metrics_sum(live: Live, name: str, **labels: str) -> float:
    return live.agent.total(name, **labels)


def test_stat_and_routes_equal_the_prometheus_series(live: Live) -> None:
    """A real Prometheus scrapes the agent; its series (counters since the agent started)
    equal stat/routes over a window reaching back past the agent's start."""
    assert wait_until(lambda: _frontend_http(live) and _frontend_http(live)[0]["http"]["requests"] == 43)
    sel = 'k8s_namespace_name="shop",k8s_owner_name="api"'
    count = "http_server_request_duration_seconds_count"
    # 3 s scrapes: /metrics holds every rollup on this shared machine and takes its time under load
    with Prometheus([live.agent.addr], scrape_interval="3s") as prom:
        try:
            got = prom.wait_for(f"sum({count}{{{sel}}})", lambda r: bool(r) and float(r[0]["value"][1]) == 43, timeout=45)
        except TimeoutError:
            with urllib.request.urlopen(prom.url + "/api/v1/targets", timeout=10) as r:
                raise AssertionError("Prometheus never read the series; targets: " + r.read().decode()[:2000]) from None
        total = float(got[0]["value"][1])
        fails = float(prom.query(f'sum({count}{{{sel},http_response_status_code=~"5.."}})')[0]["value"][1])
        by_route = {r["metric"]["http_route"]: float(r["value"][1])
                    for r in prom.query(f"sum by (http_route) ({count}{{{sel}}})")}
        callers = float(prom.query(
            f'sum(http_client_request_duration_seconds_count{{k8s_owner_name="frontend",server_port="80"}})')[0]["value"][1])
    (row,) = live.get("/api/v1/stat", resource="deploy/api", window="10m")["rows"]
    assert row["requests"] == total == 43 and row["failure_count"] == fails == 7
    assert row["success"] == pytest.approx(36 / 43) and row["success_count"] == 36
    assert total == _metrics_sum(live, count, k8s_namespace_name="shop", k8s_owner_name="api")  # the exposition too
    routes = {r["route"]: r for r in live.get("/api/v1/routes", resource="deploy/api", window="10m")["rows"]}
    expected = collections.Counter()
    for path, n in REQUESTS.items():
        expected[template(path)] += n            # /status/503 -> /status/{id}, as the agent templates
    assert {k: r["requests"] for k, r in routes.items()} == by_route == dict(expected)
    for route in expected:
        assert routes[route]["authority"] == f"{live.pods['api'].ipv4}:80"
    (caller,) = live.get("/api/v1/stat", to="deploy/api", window="10m")["rows"]
    assert (caller["name"], caller["requests"], caller["failure_count"]) == ("frontend", callers, 7)
    edges = {(e["src"], e["dst"]): e for e in live.get("/api/v1/edges", namespace="shop", window="10m")["rows"]}
    assert edges[("frontend", "api")]["requests"] == 43 and edges[("frontend", "db")]["connections_opened"] == TCP_CONNS


def test_smi_counts_equal_the_requests_sent(live: Live) -> None:
    assert wait_until(lambda: _frontend_http(live) and _frontend_http(live)[0]["http"]["requests"] == 43)
    base = "/apis/metrics.smi-spec.io/v1alpha1/namespaces/shop"
    m = {x["name"]: x["value"] for x in live.get(f"{base}/deployments/api", t="10m")["metrics"]}
    assert (int(m["success_count"]), int(m["failure_count"])) == (live.sent["200"] + live.sent["404"], live.sent["503"])
    assert float(m["p99_response_latency"]) >= float(m["p50_response_latency"]) > 0
    edges = live.get(f"{base}/deployments/api/edges", t="10m")["items"]
    (fe,) = [i for i in edges if i["edge"]["direction"] == "from" and i["edge"]["resource"]["name"] == "frontend"]
    fm = {x["name"]: x["value"] for x in fe["metrics"]}
    assert (int(fm["success_count"]), int(fm["failure_count"])) == (36, 7)


def _tap(live: Live, seconds: float, out: list, **params) -> threading.Thread:
    def run() -> None:
        with httpx.stream("GET", live.base + "/api/v1/tap", params={"duration": f"{seconds}s", **params},
                          timeout=httpx.Timeout(10, read=seconds + 10)) as r:
            assert r.status_code == 200
            event = None
            for line in r.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    out.append((event, json.loads(line[5:])))
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _tap_clients(live: Live) -> int:
    return live.get("/api/v1/status")["tap_clients"]


def test_tap_shows_requests_made_while_open_and_nothing_older(live: Live) -> None:
    events: list = []
    t = _tap(live, 12, events, to_workload="deploy/api", direction="inbound")  # long enough on a busy machine
    assert wait_until(lambda: _tap_clients(live) == 1, timeout=5, step=0.05)
    time.sleep(0.3)  # the switch is written before the stream starts; give the first sweep a moment
    assert http_load(live.pods["frontend"], live.pods["api"].ipv4, [("/status/201", 23)]) == {"201": 23}
    t.join(20)
    reqs = [d for e, d in events if e == "request_init"]
    rsps = [d for e, d in events if e == "response_init"]
    assert len(reqs) == 23 and {r["route"] for r in reqs} == {template("/status/201")}, reqs[:3]
    assert {r["status"] for r in rsps} == {201} and len([e for e, _ in events if e == "response_end"]) == 23
    assert all(r["source"]["workload"] == "frontend" and r["destination"]["pod"] == live.pods["api"].k8s_name  # type: ignore[attr-defined]
               for r in reqs)
    assert "secret-query" not in json.dumps(events)
    assert wait_until(lambda: _tap_clients(live) == 0, timeout=5, step=0.1)   # sampling off again


def test_tap_respects_max_rps(live: Live) -> None:
    events: list = []
    seconds = 8.0
    t = _tap(live, seconds, events, to_workload="deploy/api", direction="inbound", max_rps="5")
    assert wait_until(lambda: _tap_clients(live) == 1, timeout=5, step=0.05)
    time.sleep(0.3)
    assert http_load(live.pods["frontend"], live.pods["api"].ipv4, [("/status/200", 300)]) == {"200": 300}
    t.join(20)
    shown = len([1 for e, _ in events if e == "request_init"])
    assert 1 <= shown <= 5 * seconds + 5, shown          # a one-second burst, then 5 per second


def test_cli_end_to_end(live: Live) -> None:
    assert wait_until(lambda: _frontend_http(live) and _frontend_http(live)[0]["http"]["requests"] >= 43)
    run = lambda *a: subprocess.run([MESHLENS, *a, "--server", live.agent.addr], capture_output=True,  # noqa: E731
                                    text=True, timeout=30)
    out = run("observe", "--pod", "frontend", "--to-workload", "sts/db", "--direction", "egress", "--protocol", "tcp", "-o", "json")
    assert out.returncode == 0, out.stderr
    (f,) = json.loads(out.stdout)["flows"]
    assert f["bytes_sent"] == TCP_CONNS * TCP_UP
    table = run("stat", "deploy", "-n", "shop", "-t", "10m")
    assert table.returncode == 0 and re.search(r"deployment/api\s+\d+\.\d+%", table.stdout), table.stdout
    assert run("edges", "-n", "shop", "-t", "10m").stdout.count("shop") >= 2
    dot = run("servicemap", "-n", "shop", "-t", "10m")
    assert dot.stdout.startswith("digraph meshlens") and '"shop/api"' in dot.stdout.replace("label=", "")
    bad = run("stat", "--to", "nosuchkind/x")
    assert bad.returncode == 1 and bad.stderr.startswith("meshlens: the agent answered 400: to: unknown kind")


def test_service_map_html_in_headless_chromium(live: Live) -> None:
    chromium = shutil.which("chromium")
    assert chromium, "chromium is installed by the Makefile (Debian package)"
    assert wait_until(lambda: _frontend_http(live))
    time.sleep(0.6)
    params = "namespace=shop&window=10m"
    graph = live.get("/api/v1/servicemap", namespace="shop", window="10m")
    profile = tempfile.mkdtemp(prefix="meshlens-chromium-")
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "servicemap.png"
    flags = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
             "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}"]
    url = f"{live.base}/api/v1/servicemap?{params}&format=html"
    try:
        dom = subprocess.run(flags + ["--dump-dom", url], capture_output=True, text=True, timeout=60).stdout
        subprocess.run(flags + [f"--screenshot={shot}", "--window-size=1200,600", url], capture_output=True,
                       timeout=60, check=True)
    finally:
        shutil.rmtree(profile, ignore_errors=True)
    assert 'data-drawn="true"' in dom, dom[:2000]
    drawn_nodes = set(re.findall(r'<g class="node [^"]*" data-id="([0-9a-f]+)"', dom))
    drawn_edges = set(re.findall(r'<g class="edge[^"]*" data-source="([0-9a-f]+)" data-target="([0-9a-f]+)"', dom))
    assert drawn_nodes == {n["data"]["id"] for n in graph["elements"]["nodes"]}
    assert drawn_edges == {(e["data"]["source"], e["data"]["target"]) for e in graph["elements"]["edges"]}
    names = {n["data"]["id"]: n["data"]["workload"] for n in graph["elements"]["nodes"]}
    assert {("frontend", "api"), ("frontend", "db")} <= {(names[s], names[t]) for s, t in drawn_edges}
    assert shot.stat().st_size > 1000


def test_bearer_token_auth_and_no_token_in_logs(tmp_path) -> None:
    token = "tok-" + uuid.uuid4().hex
    tf = tmp_path / "token"
    tf.write_text(token + "\n")
    with AgentProcess("--features", "l4", "--auth-token-file", str(tf)) as agent:
        base = f"http://{agent.addr}"
        assert httpx.get(base + "/api/v1/flows").status_code == 401
        assert httpx.get(base + "/api/v1/flows", headers={"Authorization": "Bearer nope"}).status_code == 401
        assert httpx.get(base + "/metrics").status_code == 401
        ok = httpx.get(base + "/api/v1/status", headers={"Authorization": f"Bearer {token}"})
        assert ok.status_code == 200 and ok.json()["ready"] in (True, False)
        assert httpx.get(base + "/healthz").status_code == 200
        assert httpx.get(base + "/readyz").status_code in (200, 503)
        cli = subprocess.run([MESHLENS, "stat", "--server", agent.addr, "--token-file", str(tf)], capture_output=True,
                             text=True, timeout=30)
        assert cli.returncode == 0, cli.stderr
        denied = subprocess.run([MESHLENS, "stat", "--server", agent.addr], capture_output=True, text=True, timeout=30,
                                env={k: v for k, v in os.environ.items() if k != "MESHLENS_AUTH_TOKEN"})
        assert denied.returncode == 1 and "bearer token" in denied.stderr
        time.sleep(0.3)
        log = Path(agent.log_path).read_text(errors="replace")
    assert "meshlens running" in log and "auth on" in log
    assert token not in log and "nope" not in log
