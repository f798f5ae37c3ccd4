"""The service map: who talks to whom on this node, with what rate, errors and latency.

Built from the agent's snapshots (L4 flow rollups and L7 HTTP series) and the identity view:
nodes are workloads (pods' owners, or processes in standalone mode), services and external
endpoints; an edge is client -> server with request and error rates, latency percentiles,
bytes and connections over a sliding window.

Each request or connection counts once per edge. When the caller runs on this node its own
observations (outbound TCP rollups, client-side HTTP series) define the edge; the callee's
view (inbound rollups) adds edges only for callers that were not seen calling, e.g. clients
on other nodes. Server-side HTTP series carry no client address, so requests from callers
not observed on their own side appear as an edge from an "unknown" caller: the server's
count minus what observed callers sent it, never negative.

ServiceMap.observe() records cumulative totals per edge with a timestamp; window() returns
per-edge rates and percentiles from the difference between now and `window_s` ago (the
oldest record inside the window when the map is younger than that).
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Deque, Dict, List, Optional, Sequence, Tuple

from meshlens.agent.aggregate.flows import OVERFLOW, FlowSnapshot
from meshlens.agent.identity.model import IdentityView, StandaloneIdentity, Workload

Edge = Tuple[Workload, Workload]

UNKNOWN_CALLER = Workload("", "", "unknown", "unknown")


@dataclass
class EdgeTotals:
    """Cumulative counters of one edge at one moment."""

    requests: int = 0
    errors: int = 0                      # HTTP 5xx
    latency_bounds: Tuple[float, ...] = ()
    latency_counts: List[int] = field(default_factory=list)  # per bucket, last is +Inf
    bytes_sent: int = 0                  # client -> server payload
    bytes_received: int = 0              # server -> client payload
    connections: int = 0                 # opened
    active_connections: int = 0          # gauge at that moment

    def add_latency(self, bounds: Sequence[float], counts: Sequence[int]) -> None:
        if not self.latency_bounds:
            self.latency_bounds = tuple(bounds)
            self.latency_counts = [0] * len(counts)
        if tuple(bounds) == self.latency_bounds:
            self.latency_counts = [a + b for a, b in zip(self.latency_counts, counts)]


@dataclass(frozen=True)
class EdgeStats:
    client: Workload
    server: Workload
    request_rate: float            # requests per second over the window
    error_rate: float              # share of requests that failed (0..1), 0 when no requests
    latency_p50_s: Optional[float]
    latency_p95_s: Optional[float]
    latency_p99_s: Optional[float]
    requests: int                  # in the window
    errors: int
    bytes_sent: int
    bytes_received: int
    connections_opened: int
    active_connections: int
    window_s: float


def quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> Optional[float]:
    """histogram_quantile semantics: linear interpolation inside the bucket; the +Inf bucket
    answers with the highest finite bound."""
    total = sum(counts)
    if total <= 0 or not bounds:
        return None
    rank = q * total
    acc = 0
    for i, c in enumerate(counts):
        if acc + c >= rank and c > 0:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i > 0 else 0.0
            return lower + (bounds[i] - lower) * ((rank - acc) / c)
        acc += c
    return bounds[-1]


def edge_totals(snapshot_areas: Dict[str, object], identity: IdentityView) -> Dict[Edge, EdgeTotals]:
    """Cumulative per-edge totals from one AgentSnapshot's areas."""
    edges: Dict[Edge, EdgeTotals] = {}

    def get(e: Edge) -> EdgeTotals:
        t = edges.get(e)
        if t is None:
            t = edges[e] = EdgeTotals()
        return t

    flows = snapshot_areas.get("tcp")
    inbound: List[Tuple[Edge, object]] = []
    if isinstance(flows, FlowSnapshot):
        for key, r in flows.rollups.items():
            if key.direction == OVERFLOW:
                continue
            local = identity.local(key.cgroup_id, key.netns, key.process)
            peer = identity.peer(key.peer_address)
            if key.direction == "outbound":
                t = get((local, peer))
                t.bytes_sent += r.bytes_sent
                t.bytes_received += r.bytes_received
                t.connections += r.opened
                t.active_connections += r.active
            elif key.direction == "inbound":
                inbound.append(((peer, local), r))
        for edge, r in inbound:  # the callee's view, only for callers not seen calling
            if edge in edges:
                continue
            t = get(edge)
            t.bytes_sent += r.bytes_received  # type: ignore[attr-defined]
            t.bytes_received += r.bytes_sent  # type: ignore[attr-defined]
            t.connections += r.opened  # type: ignore[attr-defined]
            t.active_connections += r.active  # type: ignore[attr-defined]
    _add_http(snapshot_areas.get("http"), identity, get, edges)
    return edges


def _add_http(http: object, identity: IdentityView, get: Callable[[Edge], EdgeTotals],
              edges: Dict[Edge, EdgeTotals]) -> None:
    series = getattr(http, "series", None)
    if not series:
        return
    served: Dict[Workload, Tuple[int, int]] = {}
    server_hist: Dict[Workload, Tuple[Sequence[float], List[int]]] = {}
    sent_to: Dict[Workload, Tuple[int, int]] = {}
    for key, st in series.items():
        local = identity.local(key.cgroup_id, key.netns, key.process)
        failed = st.count if key.status >= 500 else 0
        if key.role == "client":
            server = identity.peer(key.server_address)
            t = get((local, server))
            t.requests += st.count
            t.errors += failed
            t.add_latency(st.duration.bounds, st.duration.counts)
            n, e = sent_to.get(server, (0, 0))
            sent_to[server] = (n + st.count, e + failed)
        elif key.role == "server":
            n, e = served.get(local, (0, 0))
            served[local] = (n + st.count, e + failed)
            bounds, counts = server_hist.get(local, (st.duration.bounds, [0] * len(st.duration.counts)))
            server_hist[local] = (bounds, [a + b for a, b in zip(counts, st.duration.counts)])
    for server, (n, e) in served.items():
        seen_n, seen_e = sent_to.get(server, (0, 0))
        if n - seen_n > 0:  # requests whose caller was not observed on its own side
            t = get((UNKNOWN_CALLER, server))
            t.requests += n - seen_n
            t.errors += max(0, e - seen_e)
            if not seen_n:
                t.add_latency(*server_hist[server])


class ServiceMap:
    """Sliding-window view over cumulative edge totals recorded by observe()."""

    def __init__(self, window_s: float = 60.0, clock: Callable[[], float] = time.monotonic,
                 identity: Optional[IdentityView] = None) -> None:
        if window_s <= 0:
            raise ValueError("window must be positive")
        self.window_s = window_s
        self._clock = clock
        self.identity: IdentityView = identity or StandaloneIdentity()
        self._history: Deque[Tuple[float, Dict[Edge, EdgeTotals]]] = deque()
        self._lock = threading.Lock()

    def observe(self, areas: Dict[str, object]) -> None:
        totals = edge_totals(areas, self.identity)
        now = self._clock()
        with self._lock:
            self._history.append((now, totals))
            # keep one record at or before the window start, drop older ones
            while len(self._history) > 2 and self._history[1][0] <= now - self.window_s:
                self._history.popleft()

    def window(self) -> List[EdgeStats]:
        with self._lock:
            if not self._history:
                return []
            now, latest = self._history[-1]
            times = [t for t, _ in self._history]
            i = max(0, bisect.bisect_right(times, now - self.window_s) - 1)
            then, base = self._history[i] if i < len(self._history) - 1 else (now, {})
        span = max(now - then, 1e-9) if base else self.window_s
        out = []
        for edge, cur in latest.items():
            old = base.get(edge, EdgeTotals())
            req, err = cur.requests - old.requests, cur.errors - old.errors
            counts = cur.latency_counts
            if old.latency_counts and len(old.latency_counts) == len(counts):
                counts = [a - b for a, b in zip(counts, old.latency_counts)]
            q = lambda p: quantile(p, cur.latency_bounds, counts)  # noqa: E731
            out.append(EdgeStats(
                client=edge[0], server=edge[1],
                request_rate=req / span, error_rate=(err / req) if req else 0.0,
                latency_p50_s=q(0.50), latency_p95_s=q(0.95), latency_p99_s=q(0.99),
                requests=req, errors=err,
                bytes_sent=cur.bytes_sent - old.bytes_sent, bytes_received=cur.bytes_received - old.bytes_received,
                connections_opened=cur.connections - old.connections, active_connections=cur.active_connections,
                window_s=span,
            ))
        return sorted(out, key=lambda e: (e.client.owner_name, e.server.owner_name))

    def totals(self) -> Dict[Edge, EdgeTotals]:
        """The latest cumulative totals (for Prometheus counters per edge)."""
        with self._lock:
            return dict(self._history[-1][1]) if self._history else {}
