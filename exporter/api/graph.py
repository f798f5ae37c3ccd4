"""The service map over a window in three forms: Kiali's graph JSON (`elements.nodes[].data`,
`elements.edges[].data` with `traffic.rates`, `responseTime`, `throughput`), Graphviz DOT,
and a self-contained HTML page that draws the map (inline SVG script, no asset from the
internet: exporter/api/static/servicemap.html with the graph JSON embedded).

Place in the data flow: exporter/api/viz.edge_deltas(window) -> this module -> app.py.
"""
from __future__ import annotations

import hashlib
import html
import json
from importlib import resources
from typing import Dict, List, Optional

from meshlens.agent.identity.model import Workload
from meshlens.exporter.api.viz import edge_deltas
from meshlens.exporter.api.window import Window, quantiles_ms


def node_id(w: Workload) -> str:
    return hashlib.sha1(f"{w.namespace}\0{w.owner_kind}\0{w.owner_name}".encode()).hexdigest()[:16]


def _node(w: Workload) -> Dict[str, object]:
    node_type = {"external": "unknown", "unknown": "unknown", "Service": "service"}.get(w.owner_kind, "workload")
    return {"data": {"id": node_id(w), "nodeType": node_type, "namespace": w.namespace,
                     "workload": w.owner_name, "workloadKind": w.owner_kind,
                     "label": f"{w.namespace}/{w.owner_name}" if w.namespace else w.owner_name}}


def kiali_graph(window: Window, namespace: Optional[str] = None) -> Dict[str, object]:
    nodes: Dict[str, Dict[str, object]] = {}
    edges: List[Dict[str, object]] = []
    s = window.seconds
    for client, server, d in edge_deltas(window):
        if namespace is not None and namespace not in (client.namespace, server.namespace):
            continue
        for w in (client, server):
            nodes.setdefault(node_id(w), _node(w))
        throughput = (d.bytes_sent + d.bytes_received) / s
        if d.requests:
            q = quantiles_ms(d.latency_bounds, d.latency_counts)
            traffic = {"protocol": "http", "rates": {
                "http": f"{d.requests / s:.3f}",
                "httpPercentErr": f"{100.0 * d.errors / d.requests:.1f}",
                "http5xx": f"{d.errors / s:.3f}"}}
            response_time = "" if q["p95"] is None else f"{q['p95']:.1f}"
        else:
            traffic = {"protocol": "tcp", "rates": {"tcp": f"{throughput:.1f}"}}
            response_time = ""
        edges.append({"data": {
            "id": f"{node_id(client)}-{node_id(server)}", "source": node_id(client), "target": node_id(server),
            "traffic": traffic, "responseTime": response_time, "throughput": f"{throughput:.1f}",
            "requests": d.requests, "errors": d.errors, "connections": d.connections,
        }})
    return {"timestamp": int(window.end_wall), "duration": int(round(s)), "graphType": "workload",
            "window": window.describe(),
            "elements": {"nodes": sorted(nodes.values(), key=lambda n: n["data"]["id"]),  # type: ignore[index]
                         "edges": edges}}


def _dot_quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_dot(graph: Dict[str, object]) -> str:
    lines = ["digraph meshlens {", "  rankdir=LR;", "  node [shape=box, style=rounded];"]
    els = graph["elements"]  # type: ignore[index]
    for n in els["nodes"]:
        d = n["data"]
        lines.append(f"  {_dot_quote(d['id'])} [label={_dot_quote(d['label'])}];")
    for e in els["edges"]:
        d = e["data"]
        rates = d["traffic"]["rates"]
        if d["traffic"]["protocol"] == "http":
            label = f"{rates['http']} rps, {rates['httpPercentErr']}% err"
            if d["responseTime"]:
                label += f", p95 {d['responseTime']} ms"
        else:
            label = f"{d['throughput']} B/s"
        lines.append(f"  {_dot_quote(d['source'])} -> {_dot_quote(d['target'])} [label={_dot_quote(label)}];")
    lines.append("}")
    return "\n".join(lines) + "\n"


def to_html(graph: Dict[str, object]) -> str:
    template = resources.files("meshlens.exporter.api").joinpath("static/servicemap.html").read_text()
    # </script> inside the data must not end the script element
    data = json.dumps(graph).replace("</", "<\\/")
    return template.replace("/*GRAPH_JSON*/null", data).replace("{{TITLE}}", html.escape("meshlens service map"))
