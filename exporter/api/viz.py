"""Linkerd-viz-shaped views over a window: `stat` (per workload), `routes` (per route of a
workload) and `edges` (who calls whom), with Linkerd's column names and JSON keys.

Place in the data flow: exporter/api/window.Window -> this module -> dicts matching
exporter/api/models.{StatRow, RouteRow, EdgeRow}. What counts:
  - stat / routes without `from`/`to`: the workload's own server-side HTTP series (what it
    answered, like Linkerd's inbound proxy), its inbound TCP rollups for connections and bytes;
  - with `from=X`: only requests X sent (X's client-side series) to each workload;
    with `to=Y`: rows for the callers of Y, from their client-side series to Y.
  - success = share of requests without a 5xx status; rps = requests / window seconds;
    latencies are histogram quantiles over the window, in ms.
  - edges: agent/aggregate/service_map.edge_totals() at both ends of the window, subtracted.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from meshlens.agent.aggregate.flows import FlowSnapshot
from meshlens.agent.aggregate.service_map import EdgeTotals, edge_totals
from meshlens.agent.identity.model import Workload
from meshlens.agent.sources.l7.structs import DURATION_BOUNDS_S
from meshlens.exporter.api.filters import Resource
from meshlens.exporter.api.window import Window, add_into, quantiles_ms, sub, sub_counts


@dataclass
class _Req:
    requests: int = 0
    failures: int = 0
    duration: List[int] = field(default_factory=list)

    def add(self, status: int, n: int, counts: List[int]) -> None:
        self.requests += n
        if status >= 500:
            self.failures += n
        self.duration = add_into(self.duration, counts)

    def columns(self, seconds: float) -> Dict[str, object]:
        q = quantiles_ms(DURATION_BOUNDS_S, self.duration)
        return {
            "success": (1.0 - self.failures / self.requests) if self.requests else None,
            "rps": round(self.requests / seconds, 6),
            "latency_ms_p50": q["p50"], "latency_ms_p95": q["p95"], "latency_ms_p99": q["p99"],
            "requests": self.requests, "success_count": self.requests - self.failures,
            "failure_count": self.failures,
        }


def _series_deltas(window: Window):
    """(key, local workload, requests in window, duration bucket counts in window)."""
    cur = getattr(window.area("http"), "series", None) or {}
    old = getattr(window.base_area("http"), "series", None) or {}
    for key, st in cur.items():
        prev = old.get(key)
        n = sub(st.count, prev.count if prev else None)
        if n <= 0:
            continue
        local = window.identity.local(key.cgroup_id, key.netns, key.process)
        yield key, local, n, sub_counts(st.duration.counts, prev.duration.counts if prev else None)


def _row_name(w: Workload) -> Dict[str, object]:
    return {"namespace": w.namespace, "kind": w.owner_kind, "name": w.owner_name}


def _selected(w: Workload, namespace: Optional[str], kind: Optional[str]) -> bool:
    return (namespace is None or w.namespace == namespace) and (kind is None or w.owner_kind == kind)


def stat_rows(window: Window, namespace: Optional[str] = None, kind: Optional[str] = None,
              resource: Optional[Resource] = None, from_: Optional[Resource] = None,
              to: Optional[Resource] = None) -> List[Dict[str, object]]:
    ident = window.identity
    reqs: Dict[Workload, _Req] = {}
    for key, local, n, counts in _series_deltas(window):
        if from_ is None and to is None:
            if key.role != "server":
                continue
            row = local
        else:
            if key.role != "client":
                continue
            server = ident.peer(key.server_address)
            if from_ is not None and not from_.matches(local):
                continue
            if to is not None and not to.matches(server):
                continue
            row = server if from_ is not None else local
        reqs.setdefault(row, _Req()).add(key.status, n, counts)
    tcp: Dict[Workload, List[int]] = {}   # [open connections, bytes read, bytes written]
    flows, base = window.area("tcp"), window.base_area("tcp")
    old = base.rollups if isinstance(base, FlowSnapshot) else {}
    if isinstance(flows, FlowSnapshot) and from_ is None and to is None:
        for k, r in flows.rollups.items():
            if k.direction not in ("inbound", "outbound"):
                continue
            local = ident.local(k.cgroup_id, k.netns, k.process)
            if k.direction == "outbound":       # a caller only: a row, without server columns
                tcp.setdefault(local, [0, 0, 0])
                continue
            o = old.get(k)
            t = tcp.setdefault(local, [0, 0, 0])
            t[0] += r.active
            t[1] += sub(r.bytes_received, o.bytes_received if o else None)
            t[2] += sub(r.bytes_sent, o.bytes_sent if o else None)
    rows = []
    for w in set(reqs) | set(tcp):
        if not _selected(w, namespace, kind) or (resource is not None and not resource.matches(w)):
            continue
        t = tcp.get(w, [0, 0, 0])
        row = _row_name(w)
        row.update(reqs.get(w, _Req()).columns(window.seconds))
        row.update({"tcp_open_connections": t[0], "tcp_read_bytes_rate": round(t[1] / window.seconds, 3),
                    "tcp_write_bytes_rate": round(t[2] / window.seconds, 3)})
        rows.append(row)
    rows.sort(key=lambda r: (r["namespace"], r["kind"], r["name"]))
    return rows


def route_rows(window: Window, resource: Optional[Resource] = None, namespace: Optional[str] = None,
               to: Optional[Resource] = None) -> List[Dict[str, object]]:
    """Per (route, authority) of the selected workloads' server side; with `to`, the selected
    workloads' requests to `to` (their client side)."""
    ident = window.identity
    reqs: Dict[Tuple[str, str], _Req] = {}
    for key, local, n, counts in _series_deltas(window):
        if resource is not None and not resource.matches(local):
            continue
        if namespace is not None and local.namespace != namespace:
            continue
        if to is None:
            if key.role != "server":
                continue
        else:
            if key.role != "client" or not to.matches(ident.peer(key.server_address)):
                continue
        authority = f"[{key.server_address}]:{key.server_port}" if ":" in key.server_address else f"{key.server_address}:{key.server_port}"
        reqs.setdefault((key.route or "[DEFAULT]", authority), _Req()).add(key.status, n, counts)
    rows = []
    for (route, authority), r in sorted(reqs.items()):
        row: Dict[str, object] = {"route": route, "authority": authority}
        row.update(r.columns(window.seconds))
        rows.append(row)
    return rows


def edge_deltas(window: Window) -> List[Tuple[Workload, Workload, EdgeTotals]]:
    cur = edge_totals(window.end, window.identity) if window.end else {}
    old = edge_totals(window.base, window.identity) if window.base else {}
    out = []
    for (client, server), t in cur.items():
        o = old.get((client, server))
        d = EdgeTotals(
            requests=sub(t.requests, o.requests if o else None),
            errors=sub(t.errors, o.errors if o else None),
            latency_bounds=t.latency_bounds,
            latency_counts=sub_counts(t.latency_counts, o.latency_counts if o else None),
            bytes_sent=sub(t.bytes_sent, o.bytes_sent if o else None),
            bytes_received=sub(t.bytes_received, o.bytes_received if o else None),
            connections=sub(t.connections, o.connections if o else None),
            active_connections=t.active_connections,
        )
        if d.requests or d.bytes_sent or d.bytes_received or d.connections or d.active_connections:
            out.append((client, server, d))
    out.sort(key=lambda e: (e[0].namespace, e[0].owner_name, e[1].namespace, e[1].owner_name))
    return out


def edge_rows(window: Window, namespace: Optional[str] = None, resource: Optional[Resource] = None) -> List[Dict[str, object]]:
    rows = []
    s = window.seconds
    for client, server, d in edge_deltas(window):
        if namespace is not None and namespace not in (client.namespace, server.namespace):
            continue
        if resource is not None and not (resource.matches(client) or resource.matches(server)):
            continue
        q = quantiles_ms(d.latency_bounds, d.latency_counts) if d.latency_bounds else {"p50": None, "p95": None, "p99": None}
        rows.append({
            "src": client.owner_name, "src_namespace": client.namespace, "src_kind": client.owner_kind,
            "dst": server.owner_name, "dst_namespace": server.namespace, "dst_kind": server.owner_kind,
            "requests": d.requests, "failures": d.errors, "rps": round(d.requests / s, 6),
            "success": (1.0 - d.errors / d.requests) if d.requests else None,
            "latency_ms_p50": q["p50"], "latency_ms_p95": q["p95"], "latency_ms_p99": q["p99"],
            "bytes_sent": d.bytes_sent, "bytes_received": d.bytes_received,
            "tcp_write_bytes_rate": round(d.bytes_sent / s, 3), "tcp_read_bytes_rate": round(d.bytes_received / s, 3),
            "connections_opened": d.connections, "tcp_open_connections": d.active_connections,
        })
    return rows
