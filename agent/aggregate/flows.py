"""The L4 flow table: cumulative counters per rollup (local identity, peer, direction, port).

Fed by agent/sources/tcp/source.py with rollup deltas: what each kernel rollup
(bpf/tcpconn.bpf.c `rollups`) gained since the last sweep, and overflow records the kernel
could not fit in that map. Read by the exporter through `snapshot()`. The kernel already
aggregated per rollup, so the work here is per rollup and per sweep, not per connection.

For the peer, outbound connections keep the remote address and port; inbound ones keep the
remote address and the *local* (server) port: the client's ephemeral port would make every
connection its own series. Inbound connections are named after the listening process.

Bounded, never silently: at most `max_rollups` keys (the node's series budget divided by
the series one rollup exports); new keys beyond that go to one overflow key and are
counted. External peers (addresses identity cannot name as a pod or service) are kept per
address only up to `max_peers_per_workload` per local workload (direction, cgroup, netns):
the deltas of further addresses are credited to one peer named `external` for that
workload, and counted, so totals stay exact. The kept peers are the busiest: every
`rerank_s` the bytes each kept peer moved since the last ranking are compared with the
busiest folded peers (a Space-Saving sketch of `max_peers_per_workload` entries per
workload, so memory stays bounded whatever the number of addresses); a folded peer that
moved more takes the place of the least busy kept one, whose rollups are merged into
`external` (sums are preserved: the `external` counters jump by what the demoted series
held, and that series ends). The promoted peer's next deltas get their own series.

A kernel rollup credited elsewhere than its own key (folded into `external`, or to the
overflow key) keeps that destination while it has live connections (`_routes`), so the
opens and closes of one connection land in the same series and `active` balances. Routes
are bounded by the live connections the kernel tracks. Keys without live connections and
without updates for `ttl` seconds expire.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence, Set, Tuple

from meshlens.agent.sources.base import FOLDED_PEER
from meshlens.agent.sources.histogram import DURATION_BUCKETS, LATENCY_BUCKETS, Histogram
from meshlens.agent.sources.tcp.facts import RollupKey
from meshlens.agent.sources.tcp.structs import (
    DUR_SLOTS, FAIL_REASONS, LAT_SLOTS, R_ACTIVE, R_BYTES_RECEIVED, R_BYTES_SENT, R_CLOSED, R_CONNECT_HIST,
    R_CONNECT_SUM, R_DURATION_HIST, R_DURATION_SUM, R_FAILED, R_OPENED, R_RSTS_RECEIVED, R_RSTS_SENT, R_RTT_HIST,
    R_RTT_SUM, R_SEGS_RETRANS,
)

__all__ = ["FOLDED_PEER", "OVERFLOW", "OVERFLOW_KEY", "FlowSnapshot", "FlowTable", "Rollup", "RollupKey"]

OVERFLOW = "__overflow__"
OVERFLOW_KEY = RollupKey(OVERFLOW, OVERFLOW, 0, 0, OVERFLOW, 0)

_SCALARS = (("opened", R_OPENED), ("closed", R_CLOSED), ("bytes_sent", R_BYTES_SENT),
            ("bytes_received", R_BYTES_RECEIVED), ("segs_retrans", R_SEGS_RETRANS), ("rsts_sent", R_RSTS_SENT),
            ("rsts_received", R_RSTS_RECEIVED))
# (attribute, first bucket word, slots, sum word, sum unit in seconds)
_HISTS = (("connect_latency", R_CONNECT_HIST, LAT_SLOTS, R_CONNECT_SUM, 1e-9),
          ("rtt", R_RTT_HIST, LAT_SLOTS, R_RTT_SUM, 1e-6),
          ("duration", R_DURATION_HIST, DUR_SLOTS, R_DURATION_SUM, 1e-9))

Workload = Tuple[str, int, int]  # (direction, cgroup_id, netns)


@dataclass
class Rollup:
    opened: int = 0
    closed: int = 0
    connect_failures: Dict[str, int] = field(default_factory=dict)
    bytes_sent: int = 0
    bytes_received: int = 0
    segs_retrans: int = 0
    rsts_sent: int = 0
    rsts_received: int = 0
    connect_latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    rtt: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS))
    duration: Histogram = field(default_factory=lambda: Histogram(DURATION_BUCKETS))
    active: int = 0
    last_update: float = 0.0

    def copy(self) -> "Rollup":
        return Rollup(
            self.opened, self.closed, dict(self.connect_failures), self.bytes_sent, self.bytes_received,
            self.segs_retrans, self.rsts_sent, self.rsts_received, self.connect_latency.copy(),
            self.rtt.copy(), self.duration.copy(), self.active, self.last_update,
        )

    def add(self, d: Sequence[int]) -> None:
        """Fold one delta (struct ml_rollup words) into these totals."""
        for name, i in _SCALARS:
            if d[i]:
                setattr(self, name, getattr(self, name) + d[i])
        self.active += d[R_ACTIVE]
        for j, reason in enumerate(FAIL_REASONS):
            if d[R_FAILED + j]:
                self.connect_failures[reason] = self.connect_failures.get(reason, 0) + d[R_FAILED + j]
        for name, first, slots, total, unit in _HISTS:
            counts = d[first:first + slots]
            if any(counts):
                getattr(self, name).add_counts(counts, d[total] * unit)

    def absorb(self, other: "Rollup") -> None:
        """Add other's counts to this rollup (a demoted peer merged into `external`)."""
        for name, _ in _SCALARS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.active += other.active
        for reason, n in other.connect_failures.items():
            self.connect_failures[reason] = self.connect_failures.get(reason, 0) + n
        for name in ("connect_latency", "rtt", "duration"):
            mine, theirs = getattr(self, name), getattr(other, name)
            mine.counts = [a + b for a, b in zip(mine.counts, theirs.counts)]
            mine.total += theirs.total
            mine.count += theirs.count
        self.last_update = max(self.last_update, other.last_update)


@dataclass(frozen=True)
class FlowSnapshot:
    rollups: Dict[RollupKey, Rollup]
    live_connections: int
    rollup_overflows: int
    rollups_expired: int
    max_rollups: int
    peers_folded: int = 0           # connections (opens and failed connects) credited to a workload's `external` peer
    max_peers_per_workload: int = 0
    peers_promoted: int = 0         # folded peers that took a less busy kept peer's place


@dataclass
class _Route:
    """Where a kernel rollup's deltas go while it has live connections there."""
    to: RollupKey
    active: int = 0


def _folded(key: RollupKey) -> RollupKey:
    return RollupKey(key.direction, key.process, key.cgroup_id, key.netns, FOLDED_PEER, key.server_port)


def _workload_of(key: RollupKey) -> Workload:
    return key.direction, key.cgroup_id, key.netns


class FlowTable:
    def __init__(
        self,
        max_rollups: int = 10_000,
        ttl: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
        max_peers_per_workload: int = 0,
        is_external: Callable[[str], bool] = lambda address: True,
        rerank_s: float = 30.0,
    ) -> None:
        self.max_rollups = max_rollups
        self.ttl = ttl
        self.max_peers_per_workload = max_peers_per_workload  # 0: no per-workload cap
        self.is_external = is_external
        self.rerank_s = rerank_s
        self._clock = clock
        self._rollups: Dict[RollupKey, Rollup] = {}
        self._routes: Dict[RollupKey, _Route] = {}
        self._lock = threading.Lock()
        self.rollup_overflows = 0
        self.rollups_expired = 0
        self.peers_folded = 0
        self.peers_promoted = 0
        self._last_rerank = clock()
        # workload -> external peer address -> rollups keyed with it
        self._kept_peers: Dict[Workload, Dict[str, int]] = {}
        self._kept_bytes: Dict[Workload, Dict[str, int]] = {}            # since the last ranking
        # Space-Saving sketch per workload: address -> [count, overestimate carried over]
        self._folded_bytes: Dict[Workload, Dict[str, List[int]]] = {}
        self._reserved: Dict[Workload, Set[str]] = {}                    # promoted, not yet seen

    # ---- where a delta goes ------------------------------------------------------------
    def _destination(self, key: RollupKey) -> RollupKey:
        """The key a new delta of `key` is credited to: its own; its workload's `external`
        peer once that workload keeps max_peers_per_workload external addresses; OVERFLOW_KEY
        once the rollup cap is reached (each refusal counted once per route)."""
        if key in self._rollups:
            return key
        dest = self._fold_peer(key)
        if dest in self._rollups:
            return dest
        if len(self._rollups) - (OVERFLOW_KEY in self._rollups) >= self.max_rollups:
            self.rollup_overflows += 1
            return OVERFLOW_KEY
        return dest

    def _fold_peer(self, key: RollupKey) -> RollupKey:
        cap = self.max_peers_per_workload
        if not cap or key.peer_address in ("", FOLDED_PEER, OVERFLOW):
            return key
        wl = _workload_of(key)
        kept = self._kept_peers.get(wl, {})
        reserved = self._reserved.get(wl, set())
        if key.peer_address in kept:
            return key
        if key.peer_address in reserved:
            reserved.discard(key.peer_address)
            return key
        if len(kept) + len(reserved) < cap or not self.is_external(key.peer_address):
            return key
        return _folded(key)

    def _track_peer(self, key: RollupKey, by: int) -> None:
        """Count the rollups that keep an external peer's address, per workload."""
        if not self.max_peers_per_workload or key.peer_address in ("", FOLDED_PEER, OVERFLOW):
            return
        if by > 0 and not self.is_external(key.peer_address):
            return
        wl = _workload_of(key)
        kept = self._kept_peers.setdefault(wl, {})
        n = kept.get(key.peer_address, 0) + by
        if n > 0:
            kept[key.peer_address] = n
        else:
            kept.pop(key.peer_address, None)
            if not kept:
                del self._kept_peers[wl]

    def _rollup(self, key: RollupKey) -> Rollup:
        r = self._rollups.get(key)
        if r is None:
            r = self._rollups[key] = Rollup()
            self._track_peer(key, +1)
        r.last_update = self._clock()
        return r

    def add(self, key: RollupKey, delta: Sequence[int]) -> None:
        """Credit what a kernel rollup gained (from a sweep of the kernel map or an overflow
        record)."""
        with self._lock:
            route = self._routes.get(key)
            dest = route.to if route is not None else self._destination(key)
            self._rollup(dest).add(delta)
            if dest.peer_address == FOLDED_PEER and key.peer_address != FOLDED_PEER:
                self.peers_folded += delta[R_OPENED] + sum(delta[R_FAILED:R_FAILED + len(FAIL_REASONS)])
            if dest != key:
                if route is None:
                    route = self._routes[key] = _Route(dest)
                route.active += delta[R_ACTIVE]
                if route.active <= 0:
                    del self._routes[key]  # no live connection left there: decide afresh next time
            moved = delta[R_BYTES_SENT] + delta[R_BYTES_RECEIVED]
            if moved and self.max_peers_per_workload:
                self._note_activity(dest, key.peer_address, moved)

    # ---- keeping the busiest peers ---------------------------------------------------------
    def _note_activity(self, dest: RollupKey, address: str, moved: int) -> None:
        """Bytes a peer moved: kept peers exactly, folded ones in a bounded sketch."""
        wl = _workload_of(dest)
        if dest.peer_address == FOLDED_PEER:
            sketch = self._folded_bytes.setdefault(wl, {})
            if address in sketch:
                sketch[address][0] += moved
            elif len(sketch) < self.max_peers_per_workload:
                sketch[address] = [moved, 0]
            else:  # Space-Saving: the least counted entry gives its place, its count carried over
                low = min(sketch, key=lambda a: sketch[a][0])
                carried = sketch.pop(low)[0]
                sketch[address] = [carried + moved, carried]
        elif dest.peer_address in self._kept_peers.get(wl, {}):
            kept = self._kept_bytes.setdefault(wl, {})
            kept[dest.peer_address] = kept.get(dest.peer_address, 0) + moved

    def rerank(self) -> int:
        """Swap each workload's least busy kept peer for a busier folded one (see the module
        docstring). Returns how many peers were promoted."""
        promoted = 0
        self._reserved.clear()  # a place promoted last time and not taken since is free again
        for wl, sketch in list(self._folded_bytes.items()):
            kept = self._kept_peers.get(wl, {})
            busy = self._kept_bytes.get(wl, {})
            # rank by what each folded peer is known to have moved (count minus carried error)
            for address, moved in sorted(((a, c - e) for a, (c, e) in sketch.items()), key=lambda kv: -kv[1]):
                if not kept:
                    break
                low = min(kept, key=lambda a: busy.get(a, 0))
                if moved <= busy.get(low, 0):
                    break
                self._demote(wl, low)
                busy.pop(low, None)
                self._reserved.setdefault(wl, set()).add(address)
                promoted += 1
        self._folded_bytes.clear()
        self._kept_bytes.clear()
        self.peers_promoted += promoted
        return promoted

    def _demote(self, wl: Workload, address: str) -> None:
        """Merge every rollup of `address` in workload `wl` into that workload's `external`;
        its live connections' later deltas follow (a route per demoted key)."""
        for k in [k for k in self._rollups if k.peer_address == address and _workload_of(k) == wl]:
            fold = _folded(k)
            r = self._rollups.pop(k)
            self._rollup(fold).absorb(r)
            self._track_peer(k, -1)
            if r.active > 0:
                self._routes[k] = _Route(fold, r.active)

    # ---- expiry and snapshots ----------------------------------------------------------
    def expire(self) -> int:
        with self._lock:
            if self.max_peers_per_workload and self._clock() - self._last_rerank >= self.rerank_s:
                self._last_rerank = self._clock()
                self.rerank()
            cutoff = self._clock() - self.ttl
            dead = [k for k, r in self._rollups.items() if r.last_update < cutoff and r.active <= 0]
            for k in dead:
                del self._rollups[k]
                self._track_peer(k, -1)
            self.rollups_expired += len(dead)
            return len(dead)

    def snapshot(self) -> FlowSnapshot:
        with self._lock:
            rollups = {}
            live = 0
            for k, r in self._rollups.items():
                copy = r.copy()
                copy.active = max(0, r.active)  # a close of a connection seen before the agent
                live += copy.active
                rollups[k] = copy
            return FlowSnapshot(rollups, live, self.rollup_overflows, self.rollups_expired, self.max_rollups,
                                self.peers_folded, self.max_peers_per_workload, self.peers_promoted)

    def __len__(self) -> int:
        with self._lock:
            return sum(max(0, r.active) for r in self._rollups.values())
