"""Flow table: delta crediting, identity arriving late, socket reuse, caps, TTL expiry and the
sweep/close race, all with an injected clock and synthetic kernel facts."""
from __future__ import annotations

from dataclasses import replace

import pytest

from meshlens.agent.aggregate.flows import OVERFLOW_KEY, ConnFacts, FlowTable, RollupKey


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def facts(sk: int = 0xA1, start: int = 10, **kw) -> ConnFacts:
    base = dict(sk=sk, start_ns=start, direction="outbound", process="curl", pid=42, cgroup_id=7, netns=99,
                local_address="10.0.0.2", local_port=40001, peer_address="10.0.0.3", peer_port=8080,
                established_ns=start + 1)
    base.update(kw)
    return ConnFacts(**base)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def only(table: FlowTable):
    (key, roll), = table.snapshot().rollups.items()
    return key, roll


def test_sweeps_credit_only_deltas_and_close_credits_the_rest(clock: Clock) -> None:
    t = FlowTable(clock=clock)
    t.opened(facts(), connect_latency_s=0.0011)
    t.seen(facts(bytes_sent=1000, bytes_received=10))
    t.seen(facts(bytes_sent=1000, bytes_received=10))  # unchanged: nothing added
    t.seen(facts(bytes_sent=4099, bytes_received=613, segs_retrans=3))
    t.closed(facts(bytes_sent=5003, bytes_received=613, segs_retrans=3, rsts_received=1, srtt_us=250), 1.5)
    key, r = only(t)
    assert key == RollupKey("outbound", "curl", 7, 99, "10.0.0.3", 8080)
    assert (r.opened, r.closed, r.bytes_sent, r.bytes_received, r.segs_retrans, r.rsts_received) == (1, 1, 5003, 613, 3, 1)
    assert r.connect_latency.count == 1 and r.connect_latency.total == pytest.approx(0.0011)
    assert r.rtt.count == 1 and r.rtt.total == pytest.approx(0.00025)
    assert r.duration.count == 1
    assert len(t) == 0 and r.active == 0


def test_inbound_waits_for_its_process_then_credits_everything(clock: Clock) -> None:
    t = FlowTable(clock=clock)
    inbound = facts(direction="inbound", pid=0, process="", local_port=8080, peer_port=51515)
    t.opened(inbound, None)
    t.seen(replace(inbound, bytes_received=4099))           # still no owner: nothing exported
    assert t.snapshot().rollups == {}
    t.seen(replace(inbound, pid=7, process="nginx", bytes_received=4099, bytes_sent=613))
    key, r = only(t)
    assert key.process == "nginx" and key.server_port == 8080 and key.direction == "inbound"
    assert (r.opened, r.bytes_received, r.bytes_sent, r.active) == (1, 4099, 613, 1)


def test_inbound_closed_before_any_owner_is_still_counted(clock: Clock) -> None:
    t = FlowTable(clock=clock)
    inbound = facts(direction="inbound", pid=0, process="", local_port=8080, peer_port=51515)
    t.opened(inbound, None)
    t.closed(inbound, 0.01)
    key, r = only(t)
    assert (key.process, key.server_port, r.opened, r.closed) == ("", 8080, 1, 1)


def test_a_reused_socket_pointer_is_a_new_connection(clock: Clock) -> None:
    t = FlowTable(clock=clock)
    t.opened(facts(start=10), None)
    t.closed(facts(start=10, bytes_sent=100), 0.1)
    t.opened(facts(start=20), None)
    t.closed(facts(start=20, bytes_sent=7), 0.1)
    _, r = only(t)
    assert (r.opened, r.closed, r.bytes_sent) == (2, 2, 107)


def test_rollup_cap_folds_new_keys_into_overflow(clock: Clock) -> None:
    t = FlowTable(max_rollups=3, clock=clock)
    for i in range(5):
        f = facts(sk=i, peer_address=f"10.0.1.{i}")
        t.opened(f, None)
        t.closed(replace(f, bytes_sent=10), 0.1)
    snap = t.snapshot()
    assert len(snap.rollups) == 3 + 1  # three real keys and the overflow key
    assert snap.rollups[OVERFLOW_KEY].closed == 2 and snap.rollups[OVERFLOW_KEY].bytes_sent == 20
    assert snap.rollup_overflows == 2
    assert sum(r.closed for r in snap.rollups.values()) == 5  # nothing lost, only folded


def test_idle_rollups_expire_after_ttl_but_live_ones_stay(clock: Clock) -> None:
    t = FlowTable(ttl=60, clock=clock)
    t.opened(facts(sk=1, peer_address="10.0.0.5"), None)             # stays open
    t.opened(facts(sk=2, peer_address="10.0.0.6"), None)
    t.closed(facts(sk=2, peer_address="10.0.0.6"), 0.1)
    clock.t += 59
    assert t.expire() == 0
    clock.t += 2
    assert t.expire() == 1
    keys = [k.peer_address for k in t.snapshot().rollups]
    assert keys == ["10.0.0.5"] and t.rollups_expired == 1


def test_forget_missing_keeps_connections_newer_than_the_map_read(clock: Clock) -> None:
    t = FlowTable(clock=clock)
    t.opened(facts(sk=1, start=100), None)
    t.opened(facts(sk=2, start=300), None)   # started after the read at 200
    assert t.forget_missing(alive=set(), read_ns=200) == 1
    assert len(t) == 1


def test_rst_after_close_is_credited_to_the_closed_connection(clock: Clock) -> None:
    t = FlowTable(clock=clock)
    f = facts(sk=77, direction="inbound", process="srv", local_port=8081, peer_port=40000)
    t.opened(f, None)
    t.closed(f, 0.1)
    anonymous = facts(sk=77, direction="inbound", process="", pid=0, local_port=8081, peer_port=40000)
    t.add_unowned(anonymous, rsts_sent=1)
    key, r = only(t)
    assert key.process == "srv" and r.rsts_sent == 1


def test_unknown_direction_uses_the_lower_port_as_server_port(clock: Clock) -> None:
    t = FlowTable(clock=clock)
    t.seen(facts(direction="unknown", local_port=45000, peer_port=5432, bytes_sent=5))
    key, r = only(t)
    assert key.server_port == 5432 and r.bytes_sent == 5


def test_open_counted_once_at_first_sight_without_open_events(clock: Clock) -> None:
    """Open events are off: a sweep's first sight counts the open, later sweeps and the
    close do not count it again; a connection opened and closed between sweeps is counted
    by its close record."""
    t = FlowTable(clock=clock)
    syn_sent = facts(sk=1, start=10, established_ns=0)
    t.seen(syn_sent)                               # still connecting: no open yet
    assert t.snapshot().rollups == {} or only(t)[1].opened == 0
    t.seen(replace(syn_sent, established_ns=15), connect_latency_s=0.002)
    t.seen(replace(syn_sent, established_ns=15, bytes_sent=10))
    t.closed(replace(syn_sent, established_ns=15, bytes_sent=10), 1.0, connect_latency_s=0.002)
    t.closed(facts(sk=2, start=20), 0.5, connect_latency_s=0.001)   # never swept
    _, r = only(t)
    assert (r.opened, r.closed, r.bytes_sent) == (2, 2, 10)
    assert r.connect_latency.count == 2


def test_connections_older_than_the_agent_are_not_counted_as_opened(clock: Clock) -> None:
    t = FlowTable(clock=clock)
    old = facts(sk=3, direction="unknown", established_ns=0, bytes_sent=7)
    t.seen(old)
    t.closed(replace(old, bytes_sent=9), 100.0)
    _, r = only(t)
    assert (r.opened, r.closed, r.bytes_sent) == (0, 1, 9)


def test_external_peers_beyond_the_workload_cap_fold_exactly(clock: Clock) -> None:
    t = FlowTable(max_peers_per_workload=4, clock=clock, is_external=lambda a: not a.startswith("10.9."))
    n = 1009
    for i in range(n):
        f = facts(sk=i, direction="inbound", local_port=8080, peer_port=50000 + i,
                  peer_address=f"203.0.{i // 250}.{i % 250}")
        t.seen(f)
        t.closed(replace(f, bytes_received=4099, bytes_sent=613), 0.01)
    for i in range(7):  # peers identity names (pods): never folded, whatever the cap
        f = facts(sk=5000 + i, direction="inbound", local_port=8080, peer_address=f"10.9.0.{i}")
        t.closed(replace(f, bytes_received=1), 0.01)
    snap = t.snapshot()
    peers = {k.peer_address: r for k, r in snap.rollups.items()}
    external = peers.pop("external")
    assert len([p for p in peers if p.startswith("203.")]) == 4
    assert len([p for p in peers if p.startswith("10.9.")]) == 7
    assert external.closed == n - 4 and snap.peers_folded == n - 4
    assert sum(r.closed for r in snap.rollups.values()) == n + 7
    assert sum(r.bytes_received for r in snap.rollups.values()) == n * 4099 + 7
    assert sum(r.bytes_sent for r in snap.rollups.values()) == n * 613
    assert sum(r.opened for r in snap.rollups.values()) == n + 7


def test_folding_is_per_workload_and_direction(clock: Clock) -> None:
    t = FlowTable(max_peers_per_workload=2, clock=clock)
    for netns in (1, 2):
        for i in range(3):
            t.closed(facts(sk=netns * 10 + i, netns=netns, peer_address=f"198.51.100.{i}"), 0.1)
    snap = t.snapshot()
    for netns in (1, 2):
        mine = {k.peer_address for k in snap.rollups if k.netns == netns}
        assert mine == {"198.51.100.0", "198.51.100.1", "external"}
    assert snap.peers_folded == 2


def test_an_expired_kept_peer_frees_its_place(clock: Clock) -> None:
    t = FlowTable(max_peers_per_workload=1, ttl=60, clock=clock)
    t.closed(facts(sk=1, peer_address="192.0.2.1"), 0.1)
    t.closed(facts(sk=2, peer_address="192.0.2.2"), 0.1)  # folded: the place is taken
    assert {k.peer_address for k in t.snapshot().rollups} == {"192.0.2.1", "external"}
    clock.t += 61
    assert t.expire() == 2
    t.closed(facts(sk=3, peer_address="192.0.2.2"), 0.1)
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

    def conn(sk: int, peer: str, nbytes: int) -> None:
        f = facts(sk=sk, direction="inbound", local_port=443, peer_address=peer)
        t.seen(f)
        t.closed(replace(f, bytes_received=nbytes), 0.01)

    conn(1, "192.0.2.1", 10)       # kept, quiet
    conn(2, "192.0.2.2", 5000)     # kept, busy
    for i in range(20):            # folded, the busiest of all
        conn(100 + i, "192.0.2.3", 1000)
    conn(200, "192.0.2.4", 7)      # folded, quiet
    before = t.snapshot()
    assert {k.peer_address for k in before.rollups} == {"192.0.2.1", "192.0.2.2", "external"}
    clock.t += 31
    t.expire()                     # the ranking runs with the sweep's expiry
    snap = t.snapshot()
    assert snap.peers_promoted == 1
    peers = {k.peer_address: r for k, r in snap.rollups.items()}
    assert set(peers) == {"192.0.2.2", "external"}          # 192.0.2.1 merged into external
    assert peers["external"].closed == 1 + 20 + 1
    assert sum(r.bytes_received for r in snap.rollups.values()) == 10 + 5000 + 20 * 1000 + 7
    conn(300, "192.0.2.3", 1000)   # the promoted peer's next connection: its own series
    conn(301, "192.0.2.5", 3)      # anyone else still folds
    peers = {k.peer_address: r for k, r in t.snapshot().rollups.items()}
    assert set(peers) == {"192.0.2.2", "192.0.2.3", "external"}
    assert peers["192.0.2.3"].closed == 1 and peers["external"].closed == 23
    assert sum(r.closed for r in t.snapshot().rollups.values()) == 25


def test_folded_peer_sketch_stays_bounded(clock: Clock) -> None:
    t = FlowTable(max_peers_per_workload=3, clock=clock)
    for i in range(5000):
        f = facts(sk=i, direction="inbound", local_port=443, peer_address=f"203.0.{i // 250}.{i % 250}")
        t.closed(replace(f, bytes_received=1 + i % 7), 0.01)
    assert all(len(s) <= 3 for s in t._folded_bytes.values())
    assert len(t.snapshot().rollups) == 4
