"""Terminal tables for the CLI client commands, in the style of `hubble observe` and
`linkerd viz stat|routes|edges|tap|top` (rich tables without borders; deterministic width
so golden tests can compare the text).

Place in the data flow: JSON answers of the agent's REST API (exporter/client/http.py) ->
these functions -> text.
"""
from __future__ import annotations

import io
from typing import Any, Dict, Iterable, List, Optional, Sequence

from rich import box
from rich.console import Console
from rich.table import Table

WIDTH = 200


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], right: Sequence[int] = ()) -> str:
    t = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="", show_lines=False,
              padding=(0, 2, 0, 0))
    for i, h in enumerate(headers):
        t.add_column(h, justify="right" if i in right else "left", no_wrap=True)
    for r in rows:
        t.add_row(*r)
    buf = io.StringIO()
    Console(file=buf, width=WIDTH, color_system=None, force_terminal=False, legacy_windows=False).print(t)
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines()) + "\n"


def pct(v: Optional[float]) -> str:
    return "-" if v is None else f"{v * 100:.2f}%"


def ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    if v < 1:
        return f"{v * 1000:.0f}µs"
    return f"{v:.0f}ms" if v >= 10 else f"{v:.1f}ms"


def rate(v: float, unit: str = "") -> str:
    return f"{v:.1f}{unit}"


def size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}GiB"


def who(e: Dict[str, Any]) -> str:
    if e.get("pod"):
        return f"{e['namespace']}/{e['pod']}"
    if e.get("workload_kind") == "external":
        return e.get("ip") or e["workload"]
    name = e["workload"]
    return f"{e['namespace']}/{name}" if e.get("namespace") else name


def flows_table(flows: List[Dict[str, Any]]) -> str:
    rows = []
    for f in flows:
        local, peer = who(f["local"]), who(f["peer"])
        src, dst = (peer, local) if f["direction"] == "inbound" else (local, peer)
        peer_ip = f["peer"].get("ip", "")
        if f["direction"] == "outbound":
            dst = f"{dst} ({peer_ip}:{f['port']})" if peer_ip and peer_ip != dst else f"{dst}:{f['port']}"
        else:
            src = f"{src} ({peer_ip})" if peer_ip and peer_ip != src else src
            dst = f"{dst}:{f['port']}"
        http, dns = f.get("http"), f.get("dns")
        if http:
            proto, reqs, statuses, p50 = "HTTP", str(http["requests"]), " ".join(
                f"{k}:{v}" for k, v in http["by_status"].items()), ms(http["latency_ms"]["p50"])
        elif dns:
            proto, reqs, statuses, p50 = "DNS", str(dns["lookups"]), " ".join(
                f"{k}:{v}" for k, v in dns["by_rcode"].items()), ms(dns["latency_ms"]["p50"])
        else:
            proto, reqs, statuses, p50 = f["protocol"].upper(), "-", "-", ms(f["rtt_ms"]["p50"])
        l4 = f["protocol"] == "tcp"
        rows.append([src, "->", dst, f["direction"], proto,
                     str(f["connections_opened"]) if l4 else "-", str(f["connections_active"]) if l4 else "-",
                     f"{size(f['bytes_sent'])}/{size(f['bytes_received'])}" if l4 else "-",
                     str(f["retransmits"]) if l4 else "-", reqs, statuses, p50])
    return table(["SOURCE", "", "DESTINATION", "DIRECTION", "PROTO", "OPENED", "ACTIVE", "TX/RX", "RETRANS",
                  "REQUESTS", "STATUS", "P50"], rows, right=(5, 6, 8, 9))


def stat_table(rows: List[Dict[str, Any]], show_namespace: bool = True) -> str:
    out = []
    for r in rows:
        name = r["name"] if not r["kind"] or r["kind"] in ("process", "external") else f"{r['kind'].lower()}/{r['name']}"
        out.append(([r["namespace"] or "-"] if show_namespace else []) + [
            name, pct(r["success"]), rate(r["rps"], "rps"), ms(r["latency_ms_p50"]), ms(r["latency_ms_p95"]),
            ms(r["latency_ms_p99"]), str(r["tcp_open_connections"]),
            f"{size(r['tcp_read_bytes_rate'])}/s", f"{size(r['tcp_write_bytes_rate'])}/s"])
    heads = (["NAMESPACE"] if show_namespace else []) + [
        "NAME", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99", "TCP_CONN", "READ_BYTES/SEC",
        "WRITE_BYTES/SEC"]
    off = 1 if show_namespace else 0
    return table(heads, out, right=tuple(i + off for i in range(1, 9)))


def routes_table(rows: List[Dict[str, Any]]) -> str:
    out = [[r["route"], r["authority"], pct(r["success"]), rate(r["rps"], "rps"), ms(r["latency_ms_p50"]),
            ms(r["latency_ms_p95"]), ms(r["latency_ms_p99"])] for r in rows]
    return table(["ROUTE", "AUTHORITY", "SUCCESS", "RPS", "LATENCY_P50", "LATENCY_P95", "LATENCY_P99"], out,
                 right=(2, 3, 4, 5, 6))


def edges_table(rows: List[Dict[str, Any]]) -> str:
    out = [[r["src"], r["dst"], r["src_namespace"] or "-", r["dst_namespace"] or "-", rate(r["rps"], "rps"),
            pct(r["success"]), ms(r["latency_ms_p99"]), str(r["connections_opened"]),
            f"{size(r['bytes_sent'])}/{size(r['bytes_received'])}"] for r in rows]
    return table(["SRC", "DST", "SRC_NS", "DST_NS", "RPS", "SUCCESS", "LATENCY_P99", "CONNS", "TX/RX"], out,
                 right=(4, 5, 6, 7))


def tap_line(event: str, d: Dict[str, Any], ctx: Dict[int, Dict[str, Any]]) -> str:
    """Linkerd tap's three lines per request (req / rsp / end)."""
    if event == "request_init":
        ctx[d["id"]] = d
        return (f"req id={d['id']} proxy={'in' if d['direction'] == 'inbound' else 'out'} src={who(d['source'])} "
                f"dst={who(d['destination'])} :method={d['method']} :authority={d['authority']} :path={d['route']}")
    req = ctx.get(d["id"], {})
    head = f"id={d['id']} proxy={'in' if req.get('direction') == 'inbound' else 'out'}"
    if event == "response_init":
        return f"rsp {head} :status={d['status']} latency={d['latency_ms'] * 1000:.0f}µs"
    ctx.pop(d["id"], None)
    body = "-" if d.get("response_bytes") is None else f"{d['response_bytes']}B"
    return f"end {head} duration={d['duration_ms'] * 1000:.0f}µs response-length={body}"


def top_table(rows: List[Dict[str, Any]]) -> str:
    out = [[r["source"], r["destination"], r["method"], r["route"], str(r["count"]), ms(r["best_ms"]),
            ms(r["worst_ms"]), str(r["successes"]), str(r["failures"])] for r in rows]
    return table(["SOURCE", "DESTINATION", "METHOD", "PATH", "COUNT", "BEST", "WORST", "SUCCESSES", "FAILURES"], out,
                 right=(4, 5, 6, 7, 8))
