"""SMI TrafficMetrics (metrics.smi-spec.io/v1alpha1) for one resource and for its edges,
over a `t` window: p99/p90/p50 response latency (unit ms), success_count, failure_count.

Place in the data flow: exporter/api/window.Window -> this module -> app.py. A resource's
own metrics are the requests it answered (its server-side HTTP series); its edges come from
agent/aggregate/service_map.edge_totals(), direction "from" (callers of the resource) and
"to" (what the resource called).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from meshlens.agent.aggregate.service_map import quantile
from meshlens.agent.identity.model import Workload
from meshlens.agent.sources.l7.structs import DURATION_BOUNDS_S
from meshlens.exporter.api.filters import KINDS, Resource
from meshlens.exporter.api.viz import edge_deltas
from meshlens.exporter.api.window import Window, add_into, rfc3339, sub, sub_counts

API_VERSION = "metrics.smi-spec.io/v1alpha1"
# the SMI path's plural kind -> the kind name in the answer
SMI_KINDS = {"pods": "Pod", "deployments": "Deployment", "statefulsets": "StatefulSet", "daemonsets": "DaemonSet",
             "jobs": "Job", "cronjobs": "CronJob", "processes": "process"}


def resource_of(kind: str, name: str) -> Resource:
    return Resource(KINDS[kind], name)


def _metrics(requests: int, failures: int, bounds: Sequence[float], counts: Sequence[int]) -> List[Dict[str, object]]:
    out: List[Dict[str, object]] = []
    for label, q in (("p99", 0.99), ("p90", 0.90), ("p50", 0.50)):
        v = quantile(q, bounds, counts) if counts else None
        out.append({"name": f"{label}_response_latency", "unit": "ms",
                    "value": "" if v is None else f"{v * 1000.0:.3f}"})
    out.append({"name": "success_count", "value": str(requests - failures)})
    out.append({"name": "failure_count", "value": str(failures)})
    return out


def _ref(kind: str, w: Workload) -> Dict[str, str]:
    if kind == "Pod":
        return {"kind": "Pod", "namespace": w.namespace, "name": w.pod}
    return {"kind": w.owner_kind, "namespace": w.namespace, "name": w.owner_name}


def _window_text(window: Window) -> str:
    return f"{window.seconds:.0f}s"


def traffic_metrics(window: Window, namespace: str, kind: str, name: str) -> Dict[str, object]:
    res = resource_of(kind, name)
    cur = getattr(window.area("http"), "series", None) or {}
    old = getattr(window.base_area("http"), "series", None) or {}
    requests = failures = 0
    counts: List[int] = []
    for key, st in cur.items():
        if key.role != "server":
            continue
        w = window.identity.local(key.cgroup_id, key.netns, key.process)
        if w.namespace != namespace or not res.matches(w):
            continue
        prev = old.get(key)
        n = sub(st.count, prev.count if prev else None)
        if n <= 0:
            continue
        requests += n
        failures += n if key.status >= 500 else 0
        counts = add_into(counts, sub_counts(st.duration.counts, prev.duration.counts if prev else None))
    return {
        "kind": "TrafficMetrics", "apiVersion": API_VERSION,
        "metadata": {"name": name, "namespace": namespace,
                     "selfLink": f"/apis/{API_VERSION}/namespaces/{namespace}/{kind}/{name}",
                     "creationTimestamp": rfc3339(window.end_wall)},
        "timestamp": rfc3339(window.end_wall), "window": _window_text(window),
        "resource": {"kind": SMI_KINDS[kind], "namespace": namespace, "name": name},
        "edge": None,
        "metrics": _metrics(requests, failures, DURATION_BOUNDS_S, counts),
    }


def traffic_metrics_edges(window: Window, namespace: str, kind: str, name: str) -> Dict[str, object]:
    res = resource_of(kind, name)
    smi_kind = SMI_KINDS[kind]
    items = []
    for client, server, d in edge_deltas(window):
        for me, other, direction in ((server, client, "from"), (client, server, "to")):
            if me.namespace != namespace or not res.matches(me):
                continue
            items.append({
                "kind": "TrafficMetrics", "apiVersion": API_VERSION,
                "metadata": {"name": name, "namespace": namespace,
                             "selfLink": f"/apis/{API_VERSION}/namespaces/{namespace}/{kind}/{name}/edges",
                             "creationTimestamp": rfc3339(window.end_wall)},
                "timestamp": rfc3339(window.end_wall), "window": _window_text(window),
                "resource": {"kind": smi_kind, "namespace": namespace, "name": name},
                "edge": {"direction": direction, "resource": _ref(smi_kind if smi_kind == "Pod" else other.owner_kind, other)},
                "metrics": _metrics(d.requests, d.errors, d.latency_bounds, d.latency_counts),
            })
    return {"kind": "TrafficMetricsList", "apiVersion": API_VERSION,
            "metadata": {"selfLink": f"/apis/{API_VERSION}/namespaces/{namespace}/{kind}/{name}/edges"},
            "resource": {"kind": smi_kind, "namespace": namespace, "name": name}, "items": items}


def known_kind(kind: str) -> Optional[str]:
    return SMI_KINDS.get(kind)
