"""Per-edge counters of the service map (meshlens_edge_*), one series per pair of workloads
(namespace, owner kind, owner name on each side; pods of one workload are summed so the
series count grows with workloads, not pods). Rates and percentiles are left to PromQL
(rate(), and the HTTP duration histograms); the REST API serves the windowed view."""
from __future__ import annotations

from typing import Dict, Iterable, List, Tuple

from meshlens.agent.identity.model import Workload
from meshlens.agent.aggregate.service_map import ServiceMap
from meshlens.agent.aggregate.snapshot import AgentSnapshot

from meshlens.exporter.prometheus.metrics import family

_COUNTERS = (
    ("meshlens_edge_requests", "requests"),
    ("meshlens_edge_request_errors", "errors"),
    ("meshlens_edge_sent_bytes", "bytes_sent"),
    ("meshlens_edge_received_bytes", "bytes_received"),
    ("meshlens_edge_connections_opened", "connections"),
)


def _side(w: Workload) -> Tuple[str, str, str]:
    return (w.namespace, w.owner_kind, w.owner_name)


def edge_families(snap: AgentSnapshot) -> Iterable[object]:
    sm = snap.service_map
    if not isinstance(sm, ServiceMap):
        return []
    per_workload: Dict[Tuple[str, ...], List[int]] = {}
    for (client, server), t in sm.totals().items():
        if snap.identity.expired(client) or snap.identity.expired(server):
            continue
        key = _side(client) + _side(server)
        acc = per_workload.setdefault(key, [0] * (len(_COUNTERS) + 1))
        for i, (_, attr) in enumerate(_COUNTERS):
            acc[i] += getattr(t, attr)
        acc[-1] += t.active_connections
    out = []
    for i, (name, _) in enumerate(_COUNTERS):
        fam = family(name)
        for labels, acc in sorted(per_workload.items()):
            fam.add_metric(list(labels), acc[i])
        out.append(fam)
    active = family("meshlens_edge_connections_active")
    for labels, acc in sorted(per_workload.items()):
        active.add_metric(list(labels), acc[-1])
    out.append(active)
    return out

