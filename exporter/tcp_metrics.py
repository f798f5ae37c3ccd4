"""Builds the meshlens_tcp_* families from the tcp area of an AgentSnapshot (a FlowSnapshot)."""
from __future__ import annotations

from typing import Iterable, List

from meshlens.agent.flows import FlowSnapshot, RollupKey
from meshlens.agent.snapshot import AgentSnapshot

from .metrics import family

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


def tcp_labels(key: RollupKey, snap: AgentSnapshot) -> List[str]:
    cgroup = key.process if key.cgroup_id == 0 and key.direction == "__overflow__" else snap.cgroup_path(key.cgroup_id)
    return [key.direction, key.process, cgroup, str(key.netns), key.peer_address, str(key.server_port)]


def tcp_families(snap: AgentSnapshot) -> Iterable[object]:
    flows = snap.areas.get("tcp")
    if not isinstance(flows, FlowSnapshot):
        return []
    labelled = [(tcp_labels(k, snap), r) for k, r in flows.rollups.items()]
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
