"""Builds the HTTP families (OpenTelemetry HTTP semantic conventions as Prometheus names)
from the "http" area of an AgentSnapshot (agent/sources/l7/http.HttpSnapshot).

Histograms come straight from the kernel's exact buckets (bounds in agent/sources/l7/structs.py).
Every series carries the local process, cgroup path and netns, like the TCP families.
Cardinality: routes are capped per workload (agent/sources/l7/routes.py), kernel series by the
http_stats map size (overflow records are re-aggregated here, never dropped silently).
"""
from __future__ import annotations

from typing import Dict, Iterable, List, Optional, Tuple

from meshlens.agent.sources.l7.http import HttpSeriesKey, HttpSnapshot
from meshlens.agent.aggregate.snapshot import AgentSnapshot

from meshlens.agent.identity.model import LOCAL_LABELS, PEER_LABELS

from meshlens.exporter.prometheus.identity_labels import local_values, peer_values
from meshlens.exporter.prometheus.metrics import METRICS, MetricDef, family

LOCAL = ("process", "cgroup", "netns") + LOCAL_LABELS
SERVER_LABELS: Tuple[str, ...] = ("http_request_method", "http_response_status_code", "http_route", "server_port") + LOCAL
CLIENT_LABELS: Tuple[str, ...] = ("http_request_method", "http_response_status_code", "http_route",
                                  "server_address", "server_port") + LOCAL + PEER_LABELS

HTTP_METRICS: Dict[str, MetricDef] = {
    d.name: d
    for d in (
        MetricDef("http_server_request_duration_seconds", "histogram",
                  "Duration of HTTP server requests: first request byte read to first response byte written.",
                  SERVER_LABELS),
        MetricDef("http_client_request_duration_seconds", "histogram",
                  "Duration of HTTP client requests: request written to first response byte read.", CLIENT_LABELS),
        MetricDef("http_server_request_body_size_bytes", "histogram",
                  "Size of HTTP server request bodies (Content-Length or decoded chunked size).", SERVER_LABELS),
        MetricDef("http_server_response_body_size_bytes", "histogram",
                  "Size of HTTP server response bodies (Content-Length; none for HEAD/204/304; chunked not counted).",
                  SERVER_LABELS),
        MetricDef("http_client_request_body_size_bytes", "histogram", "Size of HTTP client request bodies.",
                  CLIENT_LABELS),
        MetricDef("http_client_response_body_size_bytes", "histogram",
                  "Size of HTTP client response bodies (Content-Length; none for HEAD/204/304).", CLIENT_LABELS),
        MetricDef("meshlens_http_parse_errors", "counter",
                  "HTTP parser give-ups in the kernel, by reason (not_http, truncated, header_too_large, ...).",
                  ("reason",)),
        MetricDef("meshlens_http_route_overflows", "counter",
                  "Routes folded into http_route=__overflow__ because a workload reached its route cap.", ()),
        MetricDef("meshlens_http_overflow_records", "counter",
                  "Requests that came as ring-buffer records because the kernel stats map was full.", ()),
    )
}
METRICS.update(HTTP_METRICS)


def http_labels(k: HttpSeriesKey, snap: AgentSnapshot) -> Optional[List[str]]:
    """Label values in SERVER_LABELS / CLIENT_LABELS order; None for expired pods."""
    common = [k.method, str(k.status), k.route]
    ident = local_values(snap, k.cgroup_id, k.netns, k.process)
    if ident is None:
        return None
    local = [k.process, snap.cgroup_path(k.cgroup_id), str(k.netns)] + ident
    if k.role == "client":
        peer = peer_values(snap, k.server_address)
        if peer is None:
            return None
        return common + [k.server_address, str(k.server_port)] + local + peer
    return common + [str(k.server_port)] + local


def http_families(snap: AgentSnapshot) -> Iterable[object]:
    area = snap.areas.get("http")
    if not isinstance(area, HttpSnapshot):
        return []
    fams = {name: family(name) for name in HTTP_METRICS}
    for k, st in area.series.items():
        if k.role not in ("server", "client"):
            continue
        labels = http_labels(k, snap)
        if labels is None:
            continue
        for what, h in (("request_duration_seconds", st.duration), ("request_body_size_bytes", st.request_body),
                        ("response_body_size_bytes", st.response_body)):
            if h.count:
                fams[f"http_{k.role}_{what}"].add_metric(labels, h.cumulative(), h.total)
    for reason, n in sorted(area.parse_errors.items()):
        fams["meshlens_http_parse_errors"].add_metric([reason], n)
    fams["meshlens_http_route_overflows"].add_metric([], area.route_overflows)
    fams["meshlens_http_overflow_records"].add_metric([], area.overflow_records)
    return list(fams.values())
