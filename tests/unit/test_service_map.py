"""Service map from synthetic L4/L7 snapshots: a three-tier chain gives exactly its edges,
each counted once, with window rates, error rates and percentiles."""
from __future__ import annotations

from typing import Dict

import pytest

from meshlens.agent.aggregate.flows import FlowTable
from tests.unit.flow_helpers import closed, key, opened
from meshlens.agent.sources.l7.http import HttpSeriesKey, HttpSnapshot, HttpStats
from meshlens.agent.identity.model import Workload, external
from meshlens.agent.aggregate.service_map import UNKNOWN_CALLER, ServiceMap, edge_totals, quantile

FRONTEND = Workload("shop", "frontend-7d9-abc", "Deployment", "frontend")
API = Workload("shop", "api-5f4-def", "Deployment", "api")
DB = Workload("shop", "db-0", "StatefulSet", "db")
PODS = {1: ("10.0.0.11", FRONTEND), 2: ("10.0.0.12", API), 3: ("10.0.0.13", DB)}


class FakeIdentity:
    def local(self, cgroup_id: int, netns: int, process: str) -> Workload:
        return PODS[cgroup_id][1]

    def peer(self, address: str) -> Workload:
        for ip, w in PODS.values():
            if ip == address:
                return w
        return external(address)


class Clock:
    t = 0.0

    def __call__(self) -> float:
        return self.t


def conn(table: FlowTable, sk: int, cg: int, direction: str, peer_cg: int, port: int, sent: int, recv: int) -> None:
    k = key(direction, "p", cg, cg, PODS[peer_cg][0], port)
    opened(table, k)
    closed(table, k, sent=sent, received=recv)


def http(series: Dict, role: str, cg: int, status: int, n: int, server_cg: int, bucket: int) -> None:
    key = HttpSeriesKey(role, "p", cg, cg, "GET", status, "/x", PODS[server_cg][0], 80)
    st = series.setdefault(key, HttpStats())
    st.count += n
    st.duration.counts[bucket] += n
    st.duration.count += n


def chain(tcp_conns: int = 1, ok: int = 90, fail: int = 10) -> Dict[str, object]:
    t = FlowTable()
    sk = 0
    for client, server, port in ((1, 2, 80), (2, 3, 5432)):
        for _ in range(tcp_conns):
            sk += 1
            conn(t, sk, client, "outbound", server, port, 1000, 5000)       # seen by the caller
            sk += 1
            conn(t, sk, server, "inbound", client, port, 5000, 1000)        # and by the callee
    series: Dict = {}
    http(series, "client", 1, 200, ok, 2, bucket=3)
    http(series, "client", 1, 503, fail, 2, bucket=6)
    http(series, "server", 2, 200, ok, 2, bucket=3)
    http(series, "server", 2, 503, fail, 2, bucket=6)
    return {"tcp": t.snapshot(), "http": HttpSnapshot(series, {}, 0, 0)}


def test_three_tier_chain_has_exactly_its_edges_counted_once() -> None:
    edges = edge_totals(chain(tcp_conns=3), FakeIdentity())
    assert set(edges) == {(FRONTEND, API), (API, DB)}
    fa, ad = edges[(FRONTEND, API)], edges[(API, DB)]
    assert (fa.connections, fa.bytes_sent, fa.bytes_received) == (3, 3000, 15000)
    assert (ad.connections, ad.bytes_sent, ad.bytes_received) == (3, 3000, 15000)
    assert (fa.requests, fa.errors) == (100, 10)
    assert (ad.requests, ad.errors) == (0, 0)


def test_callee_view_adds_callers_from_elsewhere() -> None:
    t = FlowTable()
    opened(t, key("inbound", "p", 2, 2, "192.0.2.7", 80))
    series: Dict = {}
    http(series, "server", 2, 200, 4, 2, bucket=2)
    edges = edge_totals({"tcp": t.snapshot(), "http": HttpSnapshot(series, {}, 0, 0)}, FakeIdentity())
    assert edges[(external("192.0.2.7"), API)].connections == 1
    assert edges[(UNKNOWN_CALLER, API)].requests == 4


def test_window_rates_and_percentiles() -> None:
    clock = Clock()
    sm = ServiceMap(window_s=10, clock=clock, identity=FakeIdentity())
    sm.observe(chain(ok=0, fail=0))
    clock.t = 10.0
    sm.observe(chain(ok=90, fail=10))
    (fa,) = [e for e in sm.window() if e.client == FRONTEND]
    assert fa.requests == 100 and fa.request_rate == pytest.approx(10.0)
    assert fa.error_rate == pytest.approx(0.10)
    # 90 observations in bucket 3 (0.025..0.05 s), 10 in bucket 6 (0.1..0.25 s)
    assert 0.025 < fa.latency_p50_s <= 0.05
    assert 0.1 < fa.latency_p99_s <= 0.25
    assert fa.window_s == pytest.approx(10.0)


def test_window_forgets_what_is_older_than_the_window() -> None:
    clock = Clock()
    sm = ServiceMap(window_s=10, clock=clock, identity=FakeIdentity())
    for t, ok in ((0, 0), (5, 50), (20, 50), (30, 80)):
        clock.t = float(t)
        sm.observe(chain(ok=ok, fail=0))
    (fa,) = [e for e in sm.window() if e.client == FRONTEND]
    assert fa.requests == 30 and fa.request_rate == pytest.approx(3.0)


def test_quantile_matches_histogram_quantile() -> None:
    bounds = (0.1, 0.2, 0.4)
    assert quantile(0.5, bounds, [0, 10, 0, 0]) == pytest.approx(0.15)
    assert quantile(0.99, bounds, [0, 0, 0, 5]) == 0.4  # +Inf bucket answers the top bound
    assert quantile(0.5, bounds, [0, 0, 0, 0]) is None
