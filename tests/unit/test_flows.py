"""Flow table and the TCP source's rollup reading: deltas between sweeps of the kernel's
cumulative rollups, overflow records folded like map entries, the rollup cap, TTL expiry and
eviction from the kernel map, all with an injected clock and synthetic kernel bytes."""
from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from meshlens.agent.aggregate.flows import OVERFLOW_KEY, FlowTable, RollupKey
from meshlens.agent.sources.histogram import DURATION_BUCKETS, LATENCY_BUCKETS
from meshlens.agent.sources.tcp import structs as S
from meshlens.agent.sources.tcp.source import TcpConfig, TcpSource, delta_words

HEADER = Path(__file__).resolve().parents[2] / "bpf" / "include" / "tcpconn.h"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> Clock:
    return Clock()


KEY = RollupKey("outbound", "curl", 7, 99, "10.0.0.3", 8080)


def words(**kw: int) -> List[int]:
    w = [0] * S.ROLLUP_WORDS
    for name, v in kw.items():
        w[getattr(S, "R_" + name.upper())] = v
    return w


def only(table: FlowTable):
    (key, roll), = table.snapshot().rollups.items()
    return key, roll


def test_kernel_histogram_bounds_are_the_exporters() -> None:
    """tcpconn.h buckets by the exporter's own bounds (ns), so kernel slots map 1:1."""
    text = HEADER.read_text()

    def bounds(name: str) -> Tuple[int, ...]:
        body = re.search(rf"#define {name} (.*?)\n#define", text, re.S).group(1)
        return tuple(int(x) for x in re.findall(r"(\d+)ULL", body))

    assert bounds("ML_LAT_BOUNDS_NS") == S.LAT_BOUNDS_NS
    assert bounds("ML_DUR_BOUNDS_NS") == S.DUR_BOUNDS_NS
    assert tuple(round(b * 1e9) for b in LATENCY_BUCKETS) == S.LAT_BOUNDS_NS
    assert tuple(round(b * 1e9) for b in DURATION_BUCKETS) == S.DUR_BOUNDS_NS


def test_deltas_add_up_with_histograms_and_failures(clock: Clock) -> None:
    t = FlowTable(clock=clock)
    t.add(KEY, delta_words(S.D_OPENED | S.D_CONNECT, 0, 1, 0, 0, 0, 0, 0, 1_100_000, 0, 0))
    t.add(KEY, words(bytes_sent=4099, bytes_received=613, segs_retrans=3))
    t.add(KEY, delta_words(S.D_CLOSED | S.D_RTT | S.D_DURATION, 0, -1, 904, 0, 0, 0, 1, 0, 250, 1_500_000_000))
    t.add(KEY, delta_words(0, 1, 0, 0, 0, 2, 0, 1, 0, 0, 0))  # a refused connect with 2 SYN retries
    key, r = only(t)
    assert key == KEY
    assert (r.opened, r.closed, r.bytes_sent, r.bytes_received, r.segs_retrans, r.rsts_received) == \
        (1, 1, 5003, 613, 5, 2)
    assert r.connect_failures == {"refused": 1}
    assert r.connect_latency.count == 1 and r.connect_latency.total == pytest.approx(0.0011)
    assert r.connect_latency.counts[LATENCY_BUCKETS.index(0.0025)] == 1  # 1.1 ms <= 2.5 ms
    assert r.rtt.count == 1 and r.rtt.total == pytest.approx(0.00025)
    assert r.rtt.counts[LATENCY_BUCKETS.index(0.00025)] == 1             # le is inclusive
    assert r.duration.count == 1 and r.duration.counts[DURATION_BUCKETS.index(5.0)] == 1
    assert r.active == 0 and len(t) == 0


def test_rollup_cap_folds_new_keys_into_overflow(clock: Clock) -> None:
    t = FlowTable(max_rollups=3, clock=clock)
    for i in range(5):
        t.add(RollupKey("outbound", "curl", 7, 99, f"10.0.1.{i}", 80), words(closed=1, bytes_sent=10))
    snap = t.snapshot()
    assert len(snap.rollups) == 3 + 1  # three real keys and the overflow key
    assert snap.rollups[OVERFLOW_KEY].closed == 2 and snap.rollups[OVERFLOW_KEY].bytes_sent == 20
    assert snap.rollup_overflows == 2
    assert sum(r.closed for r in snap.rollups.values()) == 5  # nothing lost, only folded


def test_idle_rollups_expire_after_ttl_but_live_ones_stay(clock: Clock) -> None:
    t = FlowTable(ttl=60, clock=clock)
    live, done = (RollupKey("outbound", "c", 1, 2, a, 80) for a in ("10.0.0.5", "10.0.0.6"))
    t.add(live, words(opened=1, active=1))
    t.add(done, words(opened=1, active=1))
    t.add(done, words(closed=1, active=-1))
    clock.t += 59
    assert t.expire() == 0
    clock.t += 2
    assert t.expire() == 1
    assert [k.peer_address for k in t.snapshot().rollups] == ["10.0.0.5"] and t.rollups_expired == 1


def test_closes_of_connections_older_than_the_agent_never_go_negative(clock: Clock) -> None:
    t = FlowTable(clock=clock)
    t.add(KEY, words(closed=1, active=-1))
    _, r = only(t)
    assert r.active == 0 and t.snapshot().live_connections == 0


# ---- the source's reading of the kernel map, with a fake map -----------------------------

class FakeMap:
    def __init__(self) -> None:
        self.entries: Dict[bytes, bytes] = {}
        self.late: Dict[bytes, bytes] = {}  # what a program adds between our read and the delete

    def items_raw(self) -> List[Tuple[bytes, bytes]]:
        return list(self.entries.items())

    def lookup_and_delete_raw(self, key: bytes) -> Optional[bytes]:
        v = self.late.pop(key, None) or self.entries.get(key)
        self.entries.pop(key, None)
        return v


class FakeObj:
    def __init__(self, m: FakeMap) -> None:
        self.m = m

    def map(self, name: str) -> FakeMap:
        assert name == "rollups"
        return self.m


def raw_key(peer: str, port: int, comm: bytes = b"curl") -> bytes:
    return struct.pack("<Q16sIHHB7x16s", 7, bytes(map(int, peer.split("."))) + bytes(12), 99, port, S.AF_INET,
                       S.DIR_OUTBOUND, comm)


def raw_value(**kw: int) -> bytes:
    return struct.pack("<QQq" + "Q" * (S.ROLLUP_WORDS - 3), *words(**kw))


def source(clock: Clock, ttl: float = 60.0) -> Tuple[TcpSource, FlowTable, FakeMap]:
    flows = FlowTable(ttl=ttl, clock=clock)
    src = TcpSource(flows, TcpConfig(rollup_ttl_s=ttl), features=object(), clock=clock)  # type: ignore[arg-type]
    m = FakeMap()
    src.obj = FakeObj(m)  # type: ignore[assignment]
    return src, flows, m


def test_sweeps_credit_only_what_changed_in_the_kernel(clock: Clock) -> None:
    src, flows, m = source(clock)
    k = raw_key("10.0.0.3", 8080)
    m.entries[k] = raw_value(opened=1, active=1, bytes_sent=1000)
    src._read_rollups()
    src._read_rollups()  # unchanged: nothing added
    m.entries[k] = raw_value(opened=1, closed=1, active=0, bytes_sent=4099)
    src._read_rollups()
    key, r = only(flows)
    assert key == RollupKey("outbound", "curl", 7, 99, "10.0.0.3", 8080)
    assert (r.opened, r.closed, r.bytes_sent, r.active) == (1, 1, 4099, 0)


def test_idle_kernel_rollups_are_evicted_and_their_last_deltas_kept(clock: Clock) -> None:
    src, flows, m = source(clock, ttl=60)
    idle, busy = raw_key("10.0.0.3", 80), raw_key("10.0.0.4", 80)
    m.entries[idle] = raw_value(opened=1, closed=1, bytes_sent=10)
    m.entries[busy] = raw_value(opened=1, active=1)
    src._read_rollups()
    clock.t += 61
    m.late[idle] = raw_value(opened=1, closed=1, bytes_sent=17)  # arrives as we evict
    src._read_rollups()
    assert idle not in m.entries and busy in m.entries  # a live connection keeps its rollup
    assert src.rollups_evicted == 1
    totals = {k.peer_address: r.bytes_sent for k, r in flows.snapshot().rollups.items()}
    assert totals == {"10.0.0.3": 17, "10.0.0.4": 0}
    m.entries[idle] = raw_value(opened=1, bytes_sent=5, active=1)  # the key comes back: from zero
    src._read_rollups()
    r = flows.snapshot().rollups[RollupKey("outbound", "curl", 7, 99, "10.0.0.3", 80)]
    assert (r.opened, r.bytes_sent) == (2, 22)


def test_overflow_record_folds_like_a_map_entry(clock: Clock) -> None:
    src, flows, _ = source(clock)
    ev = S.MlEvent(type=S.EV_OVERFLOW)
    ev.key.cgroup_id, ev.key.netns, ev.key.server_port = 7, 99, 8080
    ev.key.family, ev.key.direction, ev.key.comm = S.AF_INET, S.DIR_INBOUND, b"srv"
    ev.key.peer[:4] = [10, 0, 0, 3]
    ev.delta.flags = S.D_CLOSED | S.D_DURATION
    ev.delta.duration_ns, ev.delta.bytes_sent, ev.delta.active = 2_000_000, 613, -1
    src._on_event(bytes(ev))
    src._on_event(b"short")
    key, r = only(flows)
    assert key == RollupKey("inbound", "srv", 7, 99, "10.0.0.3", 8080)
    assert (r.closed, r.bytes_sent, r.duration.count) == (1, 613, 1)
    assert r.duration.counts[DURATION_BUCKETS.index(0.01)] == 1
    assert src.events_read["rollup_overflow"] == 1 and src.decode_errors == 1


# ---- series budget: external peers folded per workload (ported onto rollup deltas) ---------
def peer_key(peer: str, netns: int = 99, direction: str = "inbound", port: int = 8080) -> RollupKey:
    return RollupKey(direction, "srv", 7, netns, peer, port)


def conn(t: FlowTable, peer: str, received: int = 0, sent: int = 0, **kw) -> None:
    """One short connection of `peer` as two sweeps would see it: its open, then its close."""
    t.add(peer_key(peer, **kw), words(opened=1, active=1))
    t.add(peer_key(peer, **kw), words(closed=1, active=-1, bytes_received=received, bytes_sent=sent))


def test_external_peers_beyond_the_workload_cap_fold_exactly(clock: Clock) -> None:
    t = FlowTable(max_peers_per_workload=4, clock=clock, is_external=lambda a: not a.startswith("10.9."))
    n = 1009
    for i in range(n):
        conn(t, f"203.0.{i // 250}.{i % 250}", received=4099, sent=613)
    for i in range(7):  # peers identity names (pods): never folded, whatever the cap
        conn(t, f"10.9.0.{i}", received=1)
    snap = t.snapshot()
    peers = {k.peer_address: r for k, r in snap.rollups.items()}
    external = peers.pop("external")
    assert len([p for p in peers if p.startswith("203.")]) == 4
    assert len([p for p in peers if p.startswith("10.9.")]) == 7
    assert external.closed == n - 4 and external.active == 0 and snap.peers_folded == n - 4
    assert sum(r.closed for r in snap.rollups.values()) == n + 7
    assert sum(r.opened for r in snap.rollups.values()) == n + 7
    assert sum(r.bytes_received for r in snap.rollups.values()) == n * 4099 + 7
    assert sum(r.bytes_sent for r in snap.rollups.values()) == n * 613
    assert t._routes == {}  # every folded connection closed: nothing remembered


def test_a_folded_live_connection_closes_in_the_series_it_opened_in(clock: Clock) -> None:
    """Open folded, the place freed meanwhile, close later: the close follows the open into
    `external`, so no series goes negative and live connections balance."""
    t = FlowTable(max_peers_per_workload=1, ttl=60, clock=clock)
    t.add(peer_key("192.0.2.1"), words(opened=1, active=1))
    t.add(peer_key("192.0.2.2"), words(opened=1, active=1))     # folded
    t.add(peer_key("192.0.2.1"), words(closed=1, active=-1))    # the kept peer's place frees up
    clock.t += 61
    t.expire()
    t.add(peer_key("192.0.2.2"), words(closed=1, active=-1, bytes_sent=5))
    peers = {k.peer_address: r for k, r in t.snapshot().rollups.items()}
    assert set(peers) == {"external"}
    assert (peers["external"].opened, peers["external"].closed, peers["external"].active,
            peers["external"].bytes_sent) == (1, 1, 0, 5)


def test_folding_is_per_workload_and_direction(clock: Clock) -> None:
    t = FlowTable(max_peers_per_workload=2, clock=clock)
    for netns in (1, 2):
        for i in range(3):
            conn(t, f"198.51.100.{i}", netns=netns)
    snap = t.snapshot()
    for netns in (1, 2):
        mine = {k.peer_address for k in snap.rollups if k.netns == netns}
        assert mine == {"198.51.100.0", "198.51.100.1", "external"}
    assert snap.peers_folded == 2


def test_an_expired_kept_peer_frees_its_place(clock: Clock) -> None:
    t = FlowTable(max_peers_per_workload=1, ttl=60, clock=clock)
    conn(t, "192.0.2.1")
    conn(t, "192.0.2.2")  # folded: the place is taken
    assert {k.peer_address for k in t.snapshot().rollups} == {"192.0.2.1", "external"}
    clock.t += 61
    assert t.expire() == 2
    conn(t, "192.0.2.2")
    assert {k.peer_address for k in t.snapshot().rollups} == {"192.0.2.2"}


def test_series_budget_sets_the_rollup_cap() -> None:
    from meshlens.exporter.config import Settings
    from meshlens.exporter.prometheus.tcp import series_per_rollup

    per = series_per_rollup()
    assert Settings().max_rollups() == 20_000 // per          # the budget is below --max-flows
    assert Settings().max_rollups() * per <= 20_000
    assert Settings(max_series=10**9, max_flows=77).max_rollups() == 77
    assert Settings(max_series=1).max_rollups() == 1


def test_a_busier_folded_peer_takes_the_place_of_the_least_busy_kept_one(clock: Clock) -> None:
    t = FlowTable(max_peers_per_workload=2, clock=clock, rerank_s=30)
    conn(t, "192.0.2.1", received=10)       # kept, quiet
    conn(t, "192.0.2.2", received=5000)     # kept, busy
    for _ in range(20):                     # folded, the busiest of all
        conn(t, "192.0.2.3", received=1000)
    conn(t, "192.0.2.4", received=7)        # folded, quiet
    before = t.snapshot()
    assert {k.peer_address for k in before.rollups} == {"192.0.2.1", "192.0.2.2", "external"}
    clock.t += 31
    t.expire()                              # the ranking runs with the sweep's expiry
    snap = t.snapshot()
    assert snap.peers_promoted == 1
    peers = {k.peer_address: r for k, r in snap.rollups.items()}
    assert set(peers) == {"192.0.2.2", "external"}          # 192.0.2.1 merged into external
    assert peers["external"].closed == 1 + 20 + 1
    assert sum(r.bytes_received for r in snap.rollups.values()) == 10 + 5000 + 20 * 1000 + 7
    conn(t, "192.0.2.3", received=1000)     # the promoted peer's next connection: its own series
    conn(t, "192.0.2.5", received=3)        # anyone else still folds
    peers = {k.peer_address: r for k, r in t.snapshot().rollups.items()}
    assert set(peers) == {"192.0.2.2", "192.0.2.3", "external"}
    assert peers["192.0.2.3"].closed == 1 and peers["external"].closed == 23
    assert sum(r.closed for r in t.snapshot().rollups.values()) == 25


def test_a_demoted_peers_live_connection_closes_in_external(clock: Clock) -> None:
    t = FlowTable(max_peers_per_workload=1, clock=clock, rerank_s=30)
    t.add(peer_key("192.0.2.1"), words(opened=1, active=1, bytes_received=1))   # kept, quiet, stays open
    for _ in range(3):
        conn(t, "192.0.2.9", received=1000)                                       # folded, busy
    clock.t += 31
    t.expire()
    assert t.snapshot().peers_promoted == 1
    t.add(peer_key("192.0.2.1"), words(closed=1, active=-1))
    (key, r), = t.snapshot().rollups.items()
    assert key.peer_address == "external" and (r.opened, r.closed, r.active) == (4, 4, 0)


def test_folded_peer_sketch_stays_bounded(clock: Clock) -> None:
    t = FlowTable(max_peers_per_workload=3, clock=clock)
    for i in range(5000):
        conn(t, f"203.0.{i // 250}.{i % 250}", received=1 + i % 7, port=443)
    assert all(len(s) <= 3 for s in t._folded_bytes.values())
    assert len(t.snapshot().rollups) == 4
