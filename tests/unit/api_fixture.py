"""A fixed agent for API unit and golden tests: a three-tier chain (frontend -HTTP-> api
-TCP-> db, plus an external caller of api) built through the real FlowTable and HTTP series
types, with one history record, a fixed wall clock and a tap deque."""
from __future__ import annotations

from typing import Dict, List, Tuple

from meshlens.agent.aggregate.flows import FlowTable
from meshlens.agent.aggregate.history import SnapshotHistory
from meshlens.agent.aggregate.snapshot import AgentSnapshot, ProcessStats
from meshlens.agent.identity.model import Workload, external
from meshlens.agent.sources.base import AttachChoice, SourceHealth
from meshlens.agent.sources.l7.dns import DnsSeriesKey, DnsSnapshot, DnsStats
from meshlens.agent.sources.l7.http import HttpSeriesKey, HttpSnapshot, HttpStats, TapRecord
from tests.unit.flow_helpers import closed, key, opened

T0 = 1_800_000_000.0          # wall clock of the agent's start (2027-01-15T08:00:00Z)
NOW = T0 + 100.0              # "now" for every request

FRONTEND = Workload("shop", "frontend-7d9-abc", "Deployment", "frontend")
API = Workload("shop", "api-5f4-def", "Deployment", "api")
DB = Workload("shop", "db-0", "StatefulSet", "db")
PODS = {1: ("10.0.0.11", FRONTEND), 2: ("10.0.0.12", API), 3: ("10.0.0.13", DB)}


class FixedIdentity:
    def local(self, cgroup_id: int, netns: int, process: str) -> Workload:
        return PODS[cgroup_id][1]

    def peer(self, address: str) -> Workload:
        for ip, w in PODS.values():
            if ip == address:
                return w
        return external(address)

    def expired(self, workload: Workload) -> bool:
        return False


def _conn(t: FlowTable, sk: int, cg: int, direction: str, peer: str, port: int, sent: int, recv: int,
          retrans: int = 0) -> None:
    """One connection as the kernel reports it: its open, then its close (server port: the
    remote one outbound, the local one inbound)."""
    k = key(direction, "p", cg, cg, peer, port)
    opened(t, k, 0.0003)
    closed(t, k, sent=sent, received=recv, rtt_us=120, duration_s=0.5, retrans=retrans)


def _http(series: Dict, role: str, cg: int, status: int, n: int, server: str, port: int, route: str,
          bucket: int) -> None:
    key = HttpSeriesKey(role, "p", cg, cg, "GET", status, route, server, port)
    st = series.setdefault(key, HttpStats())
    st.count += n
    st.duration.counts[bucket] += n
    st.duration.count += n


def areas(scale: int) -> Dict[str, object]:
    """The chain after `scale` rounds of traffic (scale 1 = the history record, 2 = now)."""
    t = FlowTable(clock=lambda: 0.0)
    sk = 0
    for _ in range(scale):
        sk += 1
        _conn(t, sk, 1, "outbound", "10.0.0.12", 8080, 4099 * 97, 1009 * 97)   # frontend -> api
        sk += 1
        _conn(t, sk, 2, "inbound", "10.0.0.11", 8080, 1009 * 97, 4099 * 97)    # api <- frontend
        for _ in range(3):
            sk += 1
            _conn(t, sk, 2, "outbound", "10.0.0.13", 5432, 211, 307, retrans=1)  # api -> db
            sk += 1
            _conn(t, sk, 3, "inbound", "10.0.0.12", 5432, 307, 211)
        sk += 1
        _conn(t, sk, 2, "inbound", "192.0.2.7", 8080, 61, 613)                  # an external caller
    series: Dict = {}
    for _ in range(scale):
        _http(series, "client", 1, 200, 80, "10.0.0.12", 8080, "/users/{id}", 3)
        _http(series, "client", 1, 503, 8, "10.0.0.12", 8080, "/users/{id}", 6)
        _http(series, "client", 1, 200, 9, "10.0.0.12", 8080, "/health", 1)
        _http(series, "server", 2, 200, 81, "10.0.0.12", 8080, "/users/{id}", 2)
        _http(series, "server", 2, 503, 8, "10.0.0.12", 8080, "/users/{id}", 5)
        _http(series, "server", 2, 200, 9, "10.0.0.12", 8080, "/health", 0)
    tap = tuple(TapRecord(1_000 + i, HttpSeriesKey("server", "p", 2, 2, "GET", 200 if i % 4 else 503, "/users/{id}",
                                                    "10.0.0.12", 8080), 0.0021, None, 4099, "10.0.0.11")
                for i in range(8))
    dns: Dict = {}
    for _ in range(scale):
        for qtype, rcode, n in (("A", "NoError", 5), ("AAAA", "NXDomain", 2)):
            k = DnsSeriesKey("p", 1, 1, "10.0.0.53", 53, qtype, rcode, "db.shop.svc")
            st = dns.setdefault(k, DnsStats())
            st.count += n
            st.answers += n if rcode == "NoError" else 0
            st.duration.counts[2] += n
            st.duration.count += n
    return {"tcp": t.snapshot(), "http": HttpSnapshot(series, {}, 0, 0, tap), "dns": DnsSnapshot(dns, 0, 0, 0, 0)}


class FixedAgent:
    """An AgentPort over fixed snapshots: `areas(1)` recorded at T0+40, `areas(2)` live."""

    def __init__(self) -> None:
        self.started_wall = T0
        self.history = SnapshotHistory(interval_s=5.0, length=25, clock=lambda: 40.0, wall=lambda: T0)
        self.history._wall = lambda: T0 + 40.0  # the one record is taken 40 s after the start
        self.history.record(areas(1))
        self.live = areas(2)
        self.opened: List[int] = []
        self._tap = 0

    def snapshot(self) -> AgentSnapshot:
        return AgentSnapshot(
            areas=self.live,
            health={"tcp": SourceHealth({"close": 12}, {"ringbuf_full": 0}, {"conns": 3}, {"conns": 65536}, {})},
            attach={"tcp": [AttachChoice("tcp_state", "tracepoint", ["handle_set_state"])]},
            process=ProcessStats(1.5, 0.5, 80 * 2 ** 20), sweeps=7, identity=FixedIdentity())

    def area(self, name: str) -> object:
        return self.live.get(name)

    def tap_open(self, every: int = 1) -> bool:
        self._tap += 1
        self.opened.append(every)
        return True

    def tap_close(self) -> None:
        self._tap -= 1

    @property
    def tap_clients(self) -> int:
        return self._tap


def app_and_agent(token: str = "") -> Tuple[object, FixedAgent]:
    from meshlens.exporter.api.app import create_app

    class NoMetrics:
        def collect(self):  # noqa: ANN202
            return iter(())

    agent = FixedAgent()
    return create_app(agent, NoMetrics(), token or None, wall=lambda: NOW), agent
