"""The L4 flow table: per-connection state rolled up per (local identity, peer, direction).

Fed by agent/sources/tcp/source.py with kernel facts (ConnFacts) (open/close events, periodic sweeps of the
`conns` map, overflow records); read by the exporter through `snapshot()`.

Per connection (keyed by socket pointer + start time, so a reused pointer is a new
connection) it remembers the counters already credited, so every sweep adds only the delta.
Connections roll up into a RollupKey. For the peer, outbound connections keep the remote
address and port; inbound ones keep the remote address and the *local* (server) port: the
client's ephemeral port would make every connection its own series. Accepted sockets learn
their process only when the owning process first reads or writes; until then their counts
wait in the connection record, and they are credited at that point (or at close).

Bounded, never silently: at most `max_rollups` keys (the node's series budget divided by
the series one rollup exports); new keys beyond that go to one overflow key and are
counted. External peers (addresses identity cannot name as a pod or service) are kept per
address only up to `max_peers_per_workload` per local workload (cgroup, netns, direction):
the connections of further addresses are credited to one peer named `external` for that
workload, and counted, so totals stay exact. The kept peers are the busiest: every
`rerank_s` the bytes each kept peer moved since the last ranking are compared with the
busiest folded peers (a Space-Saving sketch of `max_peers_per_workload` entries per
workload, so memory stays bounded whatever the number of addresses); a folded peer that
moved more takes the place of the least busy kept one, whose rollups are merged into
`external` (sums are preserved: the `external` counters jump by what the demoted series
held, and that series ends). The promoted peer's new connections get their own series. A
kept peer idle for `ttl` expires and frees its place. Keys without live connections and
without updates for `ttl` seconds expire.
"""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

from meshlens.agent.sources.histogram import DURATION_BUCKETS, LATENCY_BUCKETS, Histogram
from meshlens.agent.sources.base import FOLDED_PEER
from meshlens.agent.sources.tcp.facts import ConnFacts

__all__ = ["FOLDED_PEER", "OVERFLOW", "OVERFLOW_KEY", "ConnFacts", "FlowSnapshot", "FlowTable", "Rollup", "RollupKey"]

OVERFLOW = "__overflow__"


@dataclass(frozen=True)
class RollupKey:
    direction: str       # outbound | inbound | unknown
    process: str         # process name (comm); "" when unknown
    cgroup_id: int
    netns: int
    peer_address: str
    server_port: int     # remote port for outbound, local port for inbound/unknown


OVERFLOW_KEY = RollupKey(OVERFLOW, OVERFLOW, 0, 0, OVERFLOW, 0)


_COUNTERS = ("bytes_sent", "bytes_received", "segs_retrans", "rsts_sent", "rsts_received")


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

    def absorb(self, other: "Rollup") -> None:
        """Add other's counts to this rollup (a demoted peer merged into `external`)."""
        for name in ("opened", "closed") + _COUNTERS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for reason, n in other.connect_failures.items():
            self.connect_failures[reason] = self.connect_failures.get(reason, 0) + n
        for name in ("connect_latency", "rtt", "duration"):
            mine, theirs = getattr(self, name), getattr(other, name)
            mine.counts = [a + b for a, b in zip(mine.counts, theirs.counts)]
            mine.total += theirs.total
            mine.count += theirs.count
        self.last_update = max(self.last_update, other.last_update)

    def copy(self) -> "Rollup":
        return Rollup(
            self.opened, self.closed, dict(self.connect_failures), self.bytes_sent, self.bytes_received,
            self.segs_retrans, self.rsts_sent, self.rsts_received, self.connect_latency.copy(),
            self.rtt.copy(), self.duration.copy(), self.active, self.last_update,
        )


@dataclass
class _Conn:
    facts: ConnFacts
    credited: Dict[str, int] = field(default_factory=lambda: {c: 0 for c in _COUNTERS})
    key: Optional[RollupKey] = None       # None until the local process is known
    open_pending: bool = False            # an open to credit once the key is known
    open_noted: bool = False              # the open was noted (pending or credited): once only
    connect_latency_s: Optional[float] = None

    def note_open(self, f: ConnFacts, connect_latency_s: Optional[float]) -> None:
        """Count this connection's open once, as soon as it is known to have been
        established while the agent watched (not for connections that predate it)."""
        if not self.open_noted and f.established_ns and f.direction != "unknown":
            self.open_noted = True
            self.open_pending = True
            self.connect_latency_s = connect_latency_s


@dataclass(frozen=True)
class FlowSnapshot:
    rollups: Dict[RollupKey, Rollup]
    live_connections: int
    rollup_overflows: int
    rollups_expired: int
    max_rollups: int
    peers_folded: int = 0           # connections credited to a workload's `external` peer
    max_peers_per_workload: int = 0
    peers_promoted: int = 0         # folded peers that took a less busy kept peer's place


def server_port_of(direction: str, local_port: int, peer_port: int) -> int:
    if direction == "outbound":
        return peer_port
    if direction == "inbound":
        return local_port
    return min(local_port, peer_port)  # unknown: the well-known side is usually the smaller


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
        self.peers_folded = 0
        # (direction, cgroup, netns) -> external peer address -> rollups keyed with it
        self._kept_peers: Dict[Tuple[str, int, int], Dict[str, int]] = {}
        self.rerank_s = rerank_s
        self.peers_promoted = 0
        self._last_rerank = clock()
        self._kept_bytes: Dict[Tuple[str, int, int], Dict[str, int]] = {}    # since the last ranking
        # Space-Saving sketch per workload: address -> [count, overestimate carried over]
        self._folded_bytes: Dict[Tuple[str, int, int], Dict[str, List[int]]] = {}
        self._reserved: Dict[Tuple[str, int, int], set] = {}                 # promoted, not yet seen
        self._clock = clock
        self._conns: Dict[Tuple[int, int], _Conn] = {}
        self._rollups: Dict[RollupKey, Rollup] = {}
        self._lock = threading.Lock()
        self.rollup_overflows = 0
        self.rollups_expired = 0
        # sk -> rollup of connections closed moments ago: a zero-linger close sends its RST
        # after the kernel has already reported the close.
        self._recently_closed: "OrderedDict[int, RollupKey]" = OrderedDict()
        self.recently_closed_cap = 4096

    # ---- key handling -----------------------------------------------------------------
    @staticmethod
    def _key_of(f: ConnFacts) -> RollupKey:
        return RollupKey(f.direction, f.process, f.cgroup_id, f.netns, f.peer_address,
                         server_port_of(f.direction, f.local_port, f.peer_port))

    def _owned_key(self, f: ConnFacts) -> Optional[RollupKey]:
        """The key once the local process is known; None for an accepted socket whose owner
        has not touched it yet (its counts wait in the connection record)."""
        if f.direction == "inbound" and not f.pid:
            return None
        return self._key_of(f)

    def _admit(self, key: Optional[RollupKey]) -> Optional[RollupKey]:
        """The key a connection is credited to: its own; its workload's `external` peer once
        that workload keeps max_peers_per_workload external addresses; OVERFLOW_KEY once
        the rollup cap is reached (decided once per connection, each counted once)."""
        if key is None or key in self._rollups:
            return key
        key = self._fold_peer(key)
        if key in self._rollups:
            return key
        if len(self._rollups) - (OVERFLOW_KEY in self._rollups) >= self.max_rollups:
            self.rollup_overflows += 1
            return OVERFLOW_KEY
        return key

    @staticmethod
    def _workload_of(key: RollupKey) -> Tuple[str, int, int]:
        return key.direction, key.cgroup_id, key.netns

    def _fold_peer(self, key: RollupKey) -> RollupKey:
        cap = self.max_peers_per_workload
        if not cap or key.peer_address in ("", FOLDED_PEER, OVERFLOW):
            return key
        wl = self._workload_of(key)
        kept = self._kept_peers.get(wl, {})
        reserved = self._reserved.get(wl, set())
        if key.peer_address in kept:
            return key
        if key.peer_address in reserved:
            reserved.discard(key.peer_address)
            return key
        if len(kept) + len(reserved) < cap or not self.is_external(key.peer_address):
            return key
        self.peers_folded += 1
        return RollupKey(key.direction, key.process, key.cgroup_id, key.netns, FOLDED_PEER, key.server_port)

    def _track_peer(self, key: RollupKey, by: int) -> None:
        """Count the rollups that keep an external peer's address, per workload."""
        if not self.max_peers_per_workload or key.peer_address in ("", FOLDED_PEER, OVERFLOW):
            return
        if by > 0 and not self.is_external(key.peer_address):
            return
        wl = self._workload_of(key)
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

    # ---- connection lifecycle ----------------------------------------------------------
    def _conn(self, f: ConnFacts) -> _Conn:
        ck = (f.sk, f.start_ns)
        c = self._conns.get(ck)
        if c is None:
            c = self._conns[ck] = _Conn(f)
        return c

    def _merge_identity(self, c: _Conn, f: ConnFacts) -> None:
        old = c.facts
        if f.pid and not old.pid:
            old.pid, old.process = f.pid, f.process
        if f.local_port and not old.local_port:
            old.local_address, old.local_port = f.local_address, f.local_port
            old.peer_address, old.peer_port = f.peer_address, f.peer_port

    def _credit(self, c: _Conn, f: ConnFacts) -> None:
        """Add counter deltas since the last credit to the connection's rollup."""
        self._merge_identity(c, f)
        if c.key is None:
            c.key = self._admit(self._owned_key(c.facts))
            if c.key is None:
                return
        r = self._rollup(c.key)
        if c.open_pending:
            c.open_pending = False
            r.opened += 1
            if c.connect_latency_s is not None:
                r.connect_latency.observe(c.connect_latency_s)
        moved = 0
        for name in _COUNTERS:
            now_v = getattr(f, name)
            delta = now_v - c.credited[name]
            if delta > 0:
                setattr(r, name, getattr(r, name) + delta)
                c.credited[name] = now_v
                if name in ("bytes_sent", "bytes_received"):
                    moved += delta
        if moved and self.max_peers_per_workload:
            self._note_activity(c.key, c.facts.peer_address, moved)

    def _note_activity(self, key: RollupKey, address: str, moved: int) -> None:
        """Bytes a peer moved: kept peers exactly, folded ones in a bounded sketch."""
        wl = self._workload_of(key)
        if key.peer_address == FOLDED_PEER:
            sketch = self._folded_bytes.setdefault(wl, {})
            if address in sketch:
                sketch[address][0] += moved
            elif len(sketch) < self.max_peers_per_workload:
                sketch[address] = [moved, 0]
            else:  # Space-Saving: the least counted entry gives its place, its count carried over
                low = min(sketch, key=lambda a: sketch[a][0])
                carried = sketch.pop(low)[0]
                sketch[address] = [carried + moved, carried]
        elif key.peer_address in self._kept_peers.get(wl, {}):
            kept = self._kept_bytes.setdefault(wl, {})
            kept[key.peer_address] = kept.get(key.peer_address, 0) + moved

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

    def _demote(self, wl: Tuple[str, int, int], address: str) -> None:
        """Merge every rollup of `address` in workload `wl` into that workload's `external`."""
        for k in [k for k in self._rollups if k.peer_address == address and self._workload_of(k) == wl]:
            fold = RollupKey(k.direction, k.process, k.cgroup_id, k.netns, FOLDED_PEER, k.server_port)
            self._rollup(fold).absorb(self._rollups.pop(k))
            self._track_peer(k, -1)
            for c in self._conns.values():
                if c.key == k:
                    c.key = fold

    def opened(self, f: ConnFacts, connect_latency_s: Optional[float]) -> None:
        """An open event (sent only when the kernel could not track the connection, or
        when open events are switched on)."""
        with self._lock:
            c = self._conn(f)
            c.note_open(f, connect_latency_s)
            self._credit(c, f)

    def seen(self, f: ConnFacts, connect_latency_s: Optional[float] = None) -> None:
        """A sweep saw this connection alive with these cumulative counters; the first
        sight of an established connection counts its open."""
        with self._lock:
            c = self._conn(f)
            c.note_open(f, connect_latency_s)
            self._credit(c, f)

    def closed(self, f: ConnFacts, duration_s: float, connect_latency_s: Optional[float] = None) -> None:
        """The close record: final counters. A connection opened and closed between two
        sweeps is first seen here, and its open is counted here."""
        with self._lock:
            c = self._conns.pop((f.sk, f.start_ns), None) or _Conn(f)
            c.note_open(f, connect_latency_s)
            self._merge_identity(c, f)
            if c.key is None:
                c.key = self._admit(self._key_of(c.facts))  # closing: name it as it is
            self._credit(c, f)
            self._remember_closed(f.sk, c.key)
            r = self._rollup(c.key)
            r.closed += 1
            r.duration.observe(duration_s)
            if f.srtt_us:
                r.rtt.observe(f.srtt_us / 1e6)

    def connect_failed(self, f: ConnFacts, reason: str) -> None:
        with self._lock:
            c = self._conns.pop((f.sk, f.start_ns), None) or _Conn(f)
            self._merge_identity(c, f)
            key = c.key or self._admit(self._key_of(c.facts))
            c.key = key
            self._credit(c, f)
            r = self._rollup(key)
            r.connect_failures[reason] = r.connect_failures.get(reason, 0) + 1

    def _remember_closed(self, sk: int, key: RollupKey) -> None:
        self._recently_closed[sk] = key
        self._recently_closed.move_to_end(sk)
        while len(self._recently_closed) > self.recently_closed_cap:
            self._recently_closed.popitem(last=False)

    def add_unowned(self, f: ConnFacts, **deltas: int) -> None:
        """Counters that arrived without a tracked connection (overflow records, RSTs to
        closed ports, SYN-ACK retransmits): credited to the connection just closed on the
        same socket if there is one, else to a rollup built from the record itself."""
        with self._lock:
            key = self._recently_closed.get(f.sk) if f.sk else None
            r = self._rollup(key or self._admit(self._key_of(f)))
            for name, delta in deltas.items():
                setattr(r, name, getattr(r, name) + delta)

    def forget_missing(self, alive: set, read_ns: int) -> int:
        """Drop connection records whose kernel entry is gone without a close event (the
        event was lost); returns how many. `alive` holds the (sk, start_ns) pairs a map read
        at `read_ns` (CLOCK_MONOTONIC, like bpf_ktime_get_ns) found; connections that
        started after the read are kept."""
        with self._lock:
            gone = [k for k in self._conns if k not in alive and k[1] < read_ns]
            for k in gone:
                del self._conns[k]
            return len(gone)

    # ---- expiry and snapshots ----------------------------------------------------------
    def expire(self) -> int:
        with self._lock:
            if self.max_peers_per_workload and self._clock() - self._last_rerank >= self.rerank_s:
                self._last_rerank = self._clock()
                self.rerank()
            live_keys = {c.key for c in self._conns.values() if c.key is not None}
            cutoff = self._clock() - self.ttl
            dead = [k for k, r in self._rollups.items() if r.last_update < cutoff and k not in live_keys]
            for k in dead:
                del self._rollups[k]
                self._track_peer(k, -1)
            self.rollups_expired += len(dead)
            return len(dead)

    def snapshot(self) -> FlowSnapshot:
        with self._lock:
            active: Dict[RollupKey, int] = {}
            for c in self._conns.values():
                if c.key is not None:
                    active[c.key] = active.get(c.key, 0) + 1
            rollups = {}
            for k, r in self._rollups.items():
                copy = r.copy()
                copy.active = active.get(k, 0)
                rollups[k] = copy
            return FlowSnapshot(rollups, len(self._conns), self.rollup_overflows, self.rollups_expired, self.max_rollups,
                                self.peers_folded, self.max_peers_per_workload, self.peers_promoted)

    def __len__(self) -> int:
        return len(self._conns)
