"""Builds the meshlens_tcp_* families from the tcp area of an AgentSnapshot (a FlowSnapshot)."""
from __future__ import annotations

from typing import Iterable, List, Optional

from meshlens.agent.aggregate.flows import OVERFLOW, FlowSnapshot, RollupKey
from meshlens.agent.aggregate.snapshot import AgentSnapshot

from meshlens.exporter.prometheus.identity_labels import local_values, peer_values
from meshlens.exporter.prometheus.metrics import TCP_LABELS, family

_COUNTERS = (
    ("meshlens_tcp_connections_opened", "opened"),
    ("meshlens_tcp_connections_closed", "closed"),
    ("meshlens_tcp_sent_bytes", "bytes_sent"),
    ("meshlens_tcp_received_bytes", "bytes_received"),
    ("meshlens_tcp_retransmitted_segments", "segs_retrans"),
    ("meshlens_tcp_resets_sent", "rsts_sent"),
    ("meshlens_tcp_resets_received", "rsts_received"),
)
_HISTOGRAMS = (
    ("meshlens_tcp_connect_duration_seconds", "connect_latency"),
    ("meshlens_tcp_rtt_seconds", "rtt"),
    ("meshlens_tcp_connection_duration_seconds", "duration"),
)


CONNECT_FAILURE_REASONS = 5  # refused, timeout, unreachable, aborted, other


def series_per_rollup() -> int:
    """Series one rollup can export at most: each counter, the active gauge, one
    connect-failure series per reason, and per histogram its buckets, +Inf, _sum and _count.
    The node's series budget divided by this is the flow table's rollup cap."""
    from meshlens.agent.aggregate.flows import Rollup

    r = Rollup()
    histograms = sum(len(getattr(r, attr).cumulative()) + 2 for _, attr in _HISTOGRAMS)
    return len(_COUNTERS) + 1 + CONNECT_FAILURE_REASONS + histograms


def tcp_labels(key: RollupKey, snap: AgentSnapshot) -> Optional[List[str]]:
    """Label values in TCP_LABELS order, or None when the series belongs to a pod deleted
    more than the identity TTL ago (it stops being exported)."""
    if key.direction == OVERFLOW:
        return [OVERFLOW] * len(TCP_LABELS)
    local = local_values(snap, key.cgroup_id, key.netns, key.process)
    peer = peer_values(snap, key.peer_address)
    if local is None or peer is None:
        return None
    base = [key.direction, key.process, snap.cgroup_path(key.cgroup_id), str(key.netns), key.peer_address,
            str(key.server_port)]
    return base + local + peer


def tcp_families(snap: AgentSnapshot) -> Iterable[object]:
    flows = snap.areas.get("tcp")
    if not isinstance(flows, FlowSnapshot):
        return []
    labelled = [(labels, r) for labels, r in ((tcp_labels(k, snap), r) for k, r in flows.rollups.items())
                if labels is not None]
    out = []
    for name, attr in _COUNTERS:
        fam = family(name)
        for labels, r in labelled:
            fam.add_metric(labels, getattr(r, attr))
        out.append(fam)
    active = family("meshlens_tcp_connections_active")
    failures = family("meshlens_tcp_connect_failures")
    for labels, r in labelled:
        active.add_metric(labels, r.active)
        for reason, n in sorted(r.connect_failures.items()):
            failures.add_metric(labels + [reason], n)
    out += [active, failures]
    for name, attr in _HISTOGRAMS:
        fam = family(name)
        for labels, r in labelled:
            h = getattr(r, attr)
            if h.count:
                fam.add_metric(labels, h.cumulative(), h.total)
        out.append(fam)
    return out
