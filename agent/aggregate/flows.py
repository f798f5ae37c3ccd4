"""The L4 flow table: cumulative counters per rollup (local identity, peer, direction, port).

Fed by agent/sources/tcp/source.py with rollup deltas: what each kernel rollup
(bpf/tcpconn.bpf.c `rollups`) gained since the last sweep, and overflow records the kernel
could not fit in that map. Read by the exporter through `snapshot()`. The kernel already
aggregated per rollup, so the work here is per rollup and per sweep, not per connection.

For the peer, outbound connections keep the remote address and port; inbound ones keep the
remote address and the *local* (server) port: the client's ephemeral port would make every
connection its own series. Inbound connections are named after the listening process.

Bounded: at most `max_rollups` keys; new keys beyond that go to one overflow key and are
counted. Keys without live connections and without updates for `ttl` seconds expire.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Sequence

from meshlens.agent.sources.histogram import DURATION_BUCKETS, LATENCY_BUCKETS, Histogram
from meshlens.agent.sources.tcp.facts import RollupKey
from meshlens.agent.sources.tcp.structs import (
    DUR_SLOTS, FAIL_REASONS, LAT_SLOTS, R_ACTIVE, R_BYTES_RECEIVED, R_BYTES_SENT, R_CLOSED, R_CONNECT_HIST,
    R_CONNECT_SUM, R_DURATION_HIST, R_DURATION_SUM, R_FAILED, R_OPENED, R_RSTS_RECEIVED, R_RSTS_SENT, R_RTT_HIST,
    R_RTT_SUM, R_SEGS_RETRANS,
)

__all__ = ["OVERFLOW", "OVERFLOW_KEY", "FlowSnapshot", "FlowTable", "Rollup", "RollupKey"]

OVERFLOW = "__overflow__"
OVERFLOW_KEY = RollupKey(OVERFLOW, OVERFLOW, 0, 0, OVERFLOW, 0)

_SCALARS = (("opened", R_OPENED), ("closed", R_CLOSED), ("bytes_sent", R_BYTES_SENT),
            ("bytes_received", R_BYTES_RECEIVED), ("segs_retrans", R_SEGS_RETRANS), ("rsts_sent", R_RSTS_SENT),
            ("rsts_received", R_RSTS_RECEIVED))
# (attribute, first bucket word, slots, sum word, sum unit in seconds)
_HISTS = (("connect_latency", R_CONNECT_HIST, LAT_SLOTS, R_CONNECT_SUM, 1e-9),
          ("rtt", R_RTT_HIST, LAT_SLOTS, R_RTT_SUM, 1e-6),
          ("duration", R_DURATION_HIST, DUR_SLOTS, R_DURATION_SUM, 1e-9))


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


@dataclass(frozen=True)
class FlowSnapshot:
    rollups: Dict[RollupKey, Rollup]
    live_connections: int
    rollup_overflows: int
    rollups_expired: int
    max_rollups: int


class FlowTable:
    def __init__(
        self,
        max_rollups: int = 10_000,
        ttl: float = 600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_rollups = max_rollups
        self.ttl = ttl
        self._clock = clock
        self._rollups: Dict[RollupKey, Rollup] = {}
        self._lock = threading.Lock()
        self.rollup_overflows = 0
        self.rollups_expired = 0

    def _admit(self, key: RollupKey) -> RollupKey:
        """The key a delta is credited to: its own, or OVERFLOW_KEY once the cap is reached
        (counted once per refused key and sweep)."""
        if key in self._rollups:
            return key
        if len(self._rollups) - (OVERFLOW_KEY in self._rollups) >= self.max_rollups:
            self.rollup_overflows += 1
            return OVERFLOW_KEY
        return key

    def add(self, key: RollupKey, delta: Sequence[int]) -> None:
        """Credit what a rollup gained (from a sweep of the kernel map or an overflow record)."""
        with self._lock:
            k = self._admit(key)
            r = self._rollups.get(k)
            if r is None:
                r = self._rollups[k] = Rollup()
            r.last_update = self._clock()
            r.add(delta)

    # ---- expiry and snapshots ----------------------------------------------------------
    def expire(self) -> int:
        with self._lock:
            cutoff = self._clock() - self.ttl
            dead = [k for k, r in self._rollups.items() if r.last_update < cutoff and r.active <= 0]
            for k in dead:
                del self._rollups[k]
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
            return FlowSnapshot(rollups, live, self.rollup_overflows, self.rollups_expired, self.max_rollups)

    def __len__(self) -> int:
        with self._lock:
            return sum(max(0, r.active) for r in self._rollups.values())
