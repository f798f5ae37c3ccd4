"""REST API on a fixed snapshot (tests/unit/api_fixture.py): flows, filters, pagination,
windows, Linkerd-style stat/routes/edges, Kiali graph, SMI, auth, bad parameters, the tap's
rate limit and stream, and that /metrics is the text writer's bytes."""
from __future__ import annotations

import asyncio
import logging

import pytest
from fastapi.testclient import TestClient

from meshlens.agent.identity.model import Workload
from meshlens.exporter.api import filters as F
from meshlens.exporter.api.tap import RateLimit, stream
from tests.unit.api_fixture import NOW, T0, FixedIdentity, app_and_agent, areas

SMI = "/apis/metrics.smi-spec.io/v1alpha1/namespaces/shop"


@pytest.fixture
def client() -> TestClient:
    app, _ = app_and_agent()
    return TestClient(app)


def flows(client: TestClient, **params) -> list:
    r = client.get("/api/v1/flows", params={"limit": 10000, **params})
    assert r.status_code == 200, r.text
    return r.json()["flows"]


def test_flows_of_a_pod_equal_the_chain_traffic(client) -> None:
    out = flows(client, pod="frontend", direction="outbound", protocol="tcp")
    assert len(out) == 1
    (f,) = out
    assert f["local"]["workload"] == "frontend" and f["peer"]["workload"] == "api" and f["port"] == 8080
    # two rounds (history record + now), each 97 requests of 4099 bytes on one connection
    assert (f["bytes_sent"], f["bytes_received"]) == (2 * 4099 * 97, 2 * 1009 * 97)
    assert (f["connections_opened"], f["connections_closed"], f["connections_active"]) == (2, 2, 0)
    assert f["http"]["by_status"] == {"200": 2 * 89, "503": 2 * 8}
    assert f["http"]["requests"] == 2 * 97 and f["http"]["errors"] == 16
    assert f["rtt_ms"]["p50"] is not None and f["connect_latency_ms"]["p99"] is not None


def test_since_subtracts_the_history_record(client) -> None:
    (f,) = flows(client, pod="frontend", direction="outbound", since="30s", protocol="tcp")
    assert f["bytes_sent"] == 4099 * 97 and f["http"]["requests"] == 97
    r = client.get("/api/v1/flows", params={"since": "30s"}).json()["window"]
    assert r["start"] == "2027-01-15T08:00:40.000Z" and r["seconds"] == 60.0 and not r["truncated"]


def test_until_in_the_past_ends_at_the_record(client) -> None:
    (f,) = flows(client, pod="frontend", direction="outbound", until="2027-01-15T08:00:50Z", protocol="tcp")
    assert f["bytes_sent"] == 4099 * 97


def test_filters_are_anded(client) -> None:
    assert {(f["local"]["workload"], f["direction"]) for f in flows(client, to_workload="db")} == \
        {("api", "outbound"), ("db", "inbound")}
    assert len(flows(client, to_workload="db", direction="inbound")) == 1
    assert flows(client, to_workload="db", port=8080) == []
    assert [f["peer"]["ip"] for f in flows(client, peer_ip="192.0.2.0/24")] == ["192.0.2.7"]
    assert {f["local"]["workload"] for f in flows(client, http_status="5+")} == {"frontend"}
    assert flows(client, http_status="404") == []
    assert all(f["l7"] == "http" for f in flows(client, protocol="http"))
    assert len(flows(client, namespace="shop")) == len(flows(client))
    assert flows(client, namespace="other") == []
    assert len(flows(client, pod="shop/db-")) == 2 and flows(client, pod="other/db-") == []


def test_dns_lookups_are_udp_flows(client) -> None:
    (d,) = flows(client, pod="frontend", protocol="dns")
    assert (d["protocol"], d["l7"], d["port"], d["peer"]["ip"]) == ("udp", "dns", 53, "10.0.0.53")
    assert d["dns"]["lookups"] == 14 and d["dns"]["by_rcode"] == {"NoError": 10, "NXDomain": 4}
    assert d["dns"]["answers"] == 10 and d["dns"]["latency_ms"]["p50"] is not None and d["http"] is None
    (w,) = flows(client, pod="frontend", protocol="udp", since="30s")
    assert w["dns"]["lookups"] == 7
    assert all(f["protocol"] == "tcp" for f in flows(client, protocol="tcp"))


def test_db_flows_count_retransmits_and_bytes(client) -> None:
    (f,) = flows(client, from_workload="deploy/api", to_workload="sts/db", direction="outbound")
    assert (f["connections_opened"], f["bytes_sent"], f["bytes_received"], f["retransmits"]) == (6, 6 * 211, 6 * 307, 6)


def test_pod_flows_path(client) -> None:
    r = client.get("/api/v1/namespaces/shop/pods/db-0/flows").json()
    assert [(f["local"]["pod"], f["direction"]) for f in r["flows"]] == [("db-0", "inbound")]


def test_cursor_pagination_walks_every_flow_once(client) -> None:
    everything = flows(client)
    seen, cursor = [], None
    while True:
        page = client.get("/api/v1/flows", params={"limit": 2, **({"cursor": cursor} if cursor else {})}).json()
        seen += page["flows"]
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert seen == everything and len(everything) == 6


@pytest.mark.parametrize("query, param", [
    ("since=yesterday", "since"), ("until=2026-13-01T00:00:00Z", "until"), ("http_status=6xx", "http_status"),
    ("peer_ip=10.0.0.0/33", "peer_ip"), ("direction=sideways", "direction"), ("protocol=sctp", "protocol"),
    ("cursor=abc", "cursor"), ("workload=bogus/x", "workload"), ("since=5m&until=10m", "since"),
    ("since=2026-12-01T00:00:00", "since"),
])
def test_bad_flow_parameters_are_400_naming_the_parameter(client, query, param) -> None:
    r = client.get("/api/v1/flows?" + query)
    assert r.status_code == 400 and r.json()["detail"].startswith(param + ":"), r.text


@pytest.mark.parametrize("path", ["/api/v1/flows?limit=0", "/api/v1/flows?port=70000", "/api/v1/tap?max_rps=0",
                                  "/api/v1/servicemap?format=png", "/api/v1/flows?limit=x"])
def test_type_errors_are_422(client, path) -> None:
    r = client.get(path)
    assert r.status_code == 422 and r.json()["error"] == "bad parameter"


@pytest.mark.parametrize("path", ["/api/v1/stat?window=0s", "/api/v1/stat?window=forever", "/api/v1/stat?kind=blob",
                                  "/api/v1/stat?from=deploy/a&to=deploy/b", "/api/v1/routes?resource=/x",
                                  SMI + "/deployments/api?t=-1s"])
def test_bad_viz_parameters_are_400(client, path) -> None:
    assert client.get(path).status_code == 400


def test_stat_rows_are_linkerd_columns(client) -> None:
    rows = {r["name"]: r for r in client.get("/api/v1/stat", params={"window": "10m"}).json()["rows"]}
    api = rows["api"]
    assert api["requests"] == 2 * 98 and api["failure_count"] == 16 and api["success_count"] == 180
    assert api["success"] == pytest.approx(180 / 196)
    assert api["rps"] == pytest.approx(196 / 100.0)             # the window is the agent's 100 s
    assert api["latency_ms_p50"] <= api["latency_ms_p95"] <= api["latency_ms_p99"]
    assert api["tcp_read_bytes_rate"] == pytest.approx(2 * (4099 * 97 + 613) / 100.0)  # bytes api read from callers
    assert rows["frontend"]["success"] is None                  # serves nothing
    windowed = {r["name"]: r for r in client.get("/api/v1/stat", params={"window": "30s"}).json()["rows"]}
    assert windowed["api"]["requests"] == 98


def test_stat_from_and_to(client) -> None:
    to_api = client.get("/api/v1/stat", params={"to": "deploy/api", "window": "10m"}).json()["rows"]
    assert [(r["name"], r["requests"], r["failure_count"]) for r in to_api] == [("frontend", 194, 16)]
    from_fe = client.get("/api/v1/stat", params={"from": "deploy/frontend", "window": "10m"}).json()["rows"]
    assert [(r["name"], r["requests"]) for r in from_fe] == [("api", 194)]


def test_routes(client) -> None:
    rows = client.get("/api/v1/routes", params={"resource": "deploy/api", "window": "10m"}).json()["rows"]
    assert [(r["route"], r["authority"], r["requests"], r["failure_count"]) for r in rows] == [
        ("/health", "10.0.0.12:8080", 18, 0), ("/users/{id}", "10.0.0.12:8080", 178, 16)]
    to = client.get("/api/v1/routes", params={"resource": "frontend", "to": "deploy/api", "window": "10m"}).json()["rows"]
    assert [(r["route"], r["requests"]) for r in to] == [("/health", 18), ("/users/{id}", 176)]


def test_edges_and_graph_agree(client) -> None:
    edges = client.get("/api/v1/edges", params={"window": "10m"}).json()["rows"]
    pairs = {(e["src"], e["dst"]) for e in edges}
    assert pairs == {("frontend", "api"), ("api", "db"), ("192.0.2.7", "api"), ("unknown", "api")}
    fe = next(e for e in edges if e["src"] == "frontend")
    assert (fe["requests"], fe["failures"], fe["src_namespace"], fe["dst_namespace"]) == (194, 16, "shop", "shop")
    g = client.get("/api/v1/servicemap", params={"window": "10m"}).json()
    labels = {n["data"]["id"]: n["data"]["workload"] for n in g["elements"]["nodes"]}
    drawn = {(labels[e["data"]["source"]], labels[e["data"]["target"]]) for e in g["elements"]["edges"]}
    assert drawn == pairs
    http_edge = next(e["data"] for e in g["elements"]["edges"] if labels[e["data"]["source"]] == "frontend")
    assert http_edge["traffic"]["protocol"] == "http"
    assert float(http_edge["traffic"]["rates"]["http"]) == pytest.approx(1.94)
    assert float(http_edge["traffic"]["rates"]["httpPercentErr"]) == pytest.approx(100 * 16 / 194, abs=0.05)
    dot = client.get("/api/v1/servicemap", params={"window": "10m", "format": "dot"}).text
    assert dot.startswith("digraph meshlens {") and dot.count("->") == 4
    page = client.get("/api/v1/servicemap", params={"window": "10m", "format": "html"})
    assert page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text.replace('xmlns="http://www.w3.org/2000/svg"', "").replace(
        '"http://www.w3.org/2000/svg"', "")  # nothing loaded from the internet


def test_smi_traffic_metrics(client) -> None:
    m = client.get(SMI + "/deployments/api", params={"t": "10m"}).json()
    values = {x["name"]: x for x in m["metrics"]}
    assert values["success_count"]["value"] == "180" and values["failure_count"]["value"] == "16"
    assert values["p99_response_latency"]["unit"] == "ms" and float(values["p99_response_latency"]["value"]) > 0
    assert m["resource"] == {"kind": "Deployment", "namespace": "shop", "name": "api"} and m["window"] == "100s"
    e = client.get(SMI + "/deployments/api/edges", params={"t": "10m"}).json()
    dirs = {(i["edge"]["direction"], i["edge"]["resource"]["name"]) for i in e["items"]}
    assert dirs == {("from", "frontend"), ("from", "192.0.2.7"), ("from", "unknown"), ("to", "db")}
    fe = next(i for i in e["items"] if i["edge"]["resource"]["name"] == "frontend")
    assert {x["name"]: x["value"] for x in fe["metrics"]}["failure_count"] == "16"
    assert client.get(SMI + "/gizmos/api").status_code == 404
    pod = client.get(SMI + "/pods/api-5f4-def", params={"t": "10m"}).json()
    assert {x["name"]: x["value"] for x in pod["metrics"]}["success_count"] == "180"


def test_status_and_health(client) -> None:
    s = client.get("/api/v1/status").json()
    assert s["ready"] and s["sweeps"] == 7 and s["uptime_seconds"] == 100.0
    assert s["attach"][0]["chosen"] == "tracepoint" and s["flows"]["rollups"] == 5
    assert client.get("/healthz").json() == {"status": "ok"} and client.get("/readyz").status_code == 200


def test_auth(caplog) -> None:
    token = "s3cr3t-token-4099"
    app, _ = app_and_agent(token)
    c = TestClient(app)
    caplog.set_level(logging.DEBUG)
    assert c.get("/api/v1/flows").status_code == 401
    assert c.get("/metrics").status_code == 401
    assert c.get("/openapi.json").status_code == 401
    r = c.get("/api/v1/flows", headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.headers["www-authenticate"].startswith("Bearer")
    assert c.get("/api/v1/flows", headers={"Authorization": token}).status_code == 401  # no scheme
    assert c.get("/api/v1/flows", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert c.get("/healthz").status_code == 200 and c.get("/readyz").status_code == 200
    assert token not in caplog.text


def test_metrics_is_the_text_writer_output() -> None:
    from meshlens.exporter.api.app import create_app
    from meshlens.exporter.prometheus.collector import MeshlensCollector
    from meshlens.exporter.prometheus.text_format import CONTENT_TYPE, render
    from tests.unit.api_fixture import FixedAgent

    agent = FixedAgent()
    collector = MeshlensCollector(agent.snapshot)
    r = TestClient(create_app(agent, collector)).get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"] == CONTENT_TYPE
    assert r.content == render(collector.collect()) and b"meshlens_tcp_sent_bytes_total" in r.content


# ---- filters and the tap, without HTTP -----------------------------------------------------

def test_time_and_status_parsing() -> None:
    assert F.parse_time("since", "5m", 1000.0) == 700.0
    assert F.parse_time("since", "2027-01-15T08:00:00Z", 0) == T0
    assert F.parse_time("since", "2027-01-15T09:00:00+01:00", 0) == T0
    assert F.parse_status("s", "5+").matches(503) and not F.parse_status("s", "5+").matches(404)
    assert F.parse_status("s", "40+").matches(404) and not F.parse_status("s", "40+").matches(410)
    assert F.ip_in("::ffff:10.1.2.3", F.parse_cidr("p", "10.0.0.0/8"))
    assert not F.ip_in("fd00::1", F.parse_cidr("p", "10.0.0.0/8"))


def test_rate_limit_splits_max_rps_across_pods() -> None:
    t = [0.0]
    lim = RateLimit(10.0, clock=lambda: t[0])
    a, b = Workload("n", "a", "Pod", "a"), Workload("n", "b", "Pod", "b")
    allowed = {a: 0, b: 0}
    for step in range(1000):                      # 10 s, both pods asking 100 times a second
        t[0] = step * 0.01
        for p in (a, b):
            allowed[p] += lim.allow(p)
    # 5/s each for 10 s, plus at most one second's share as the first burst
    assert 48 <= allowed[a] <= 56 and 48 <= allowed[b] <= 56 and sum(allowed.values()) <= 10 * 10 + 10


def test_tap_stream_shows_only_newer_records_once_and_filters() -> None:
    recs = areas(1)["http"].tap                   # 8 records, ts_ns 1000..1007, statuses 503 every 4th

    async def take(flt: F.FlowFilter, since_ns: int) -> list:
        out = []
        gen = stream(lambda: recs, FixedIdentity(), flt, 1000.0, since_ns, until_mono=None)
        try:
            while True:
                out.append(await asyncio.wait_for(gen.__anext__(), 0.5))
        except (asyncio.TimeoutError, StopAsyncIteration):
            pass
        await gen.aclose()
        return out

    evs = asyncio.run(take(F.FlowFilter(), 1004))
    assert [e for e, _ in evs] == ["request_init", "response_init", "response_end"] * 4
    req = evs[0][1]
    assert req["source"]["workload"] == "frontend" and req["destination"]["workload"] == "api"
    assert req["route"] == "/users/{id}" and req["authority"] == "10.0.0.12:8080" and req["direction"] == "inbound"
    assert evs[1][1]["latency_ms"] == 2.1 and evs[2][1]["response_bytes"] == 4099
    only_5xx = asyncio.run(take(F.FlowFilter(http_status=F.parse_status("s", "5+")), 0))
    assert [d["status"] for e, d in only_5xx if e == "response_init"] == [503, 503]
    assert asyncio.run(take(F.FlowFilter(direction="outbound"), 0)) == []


def test_tap_endpoint_switches_sampling_on_and_off() -> None:
    app, agent = app_and_agent()
    with TestClient(app) as c:
        r = c.get("/api/v1/tap", params={"duration": "300ms"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert agent.opened == [1] and agent.tap_clients == 0


def test_window_reports_truncation_when_history_is_short() -> None:
    from meshlens.agent.aggregate.history import SnapshotHistory

    now = [0.0]
    h = SnapshotHistory(interval_s=1.0, length=2, clock=lambda: now[0], wall=lambda: 1000.0 + now[0])
    for i in range(4):
        now[0] = float(i + 1)
        h.record({"i": i})
    b = h.base(1000.5)
    assert b.truncated and b.record.areas == {"i": 2}
    assert h.base(1003.5).record.areas == {"i": 2} and not h.base(1003.5).truncated
    assert NOW - T0 == 100.0


def test_tap_sampling_backs_off_only_when_records_are_lost() -> None:
    from meshlens.agent.sources.l7.http import HttpConfig, HttpSource

    writes: list = []

    class Map:
        def update_raw(self, key: bytes, value: bytes) -> None:
            writes.append(int.from_bytes(value, "little"))

    class Obj:
        def map(self, name: str) -> Map:
            assert name == "tap_ctl"
            return Map()

    src = HttpSource(HttpConfig(tap_len=1000), features=object())  # type: ignore[arg-type]
    src.obj = Obj()  # type: ignore[assignment]
    src.set_tap_sampling(1)
    src._tap_mark, src._tap_new = 0.0, 900            # many records, none lost: keep every request
    src._adapt_tap(1.0)
    src._tap_new, src._tap_dropped = 1000, 400        # the deque overflowed: sample 1 in 2
    src._adapt_tap(2.0)
    src._kernel = {"ringbuf_full": 3}                 # the ring buffer was full: 1 in 4
    src._adapt_tap(3.0)
    src._tap_new = 100                                # calm again: back towards every request
    src._adapt_tap(4.0)
    src.set_tap_sampling(0)
    assert writes == [1, 2, 4, 2, 0]
    src.obj = None
