"""Section 5, exporter: /metrics scrape time and size at 1k, 10k and 100k series, and the
behaviour at the cardinality cap.

"Series" here means flow rollups, the label sets of each meshlens_tcp_* family (what
`--max-flows` caps; 10k is the default). Each synthetic rollup is a closed outbound
connection, so every counter and all three histograms carry data: the exposition holds
many more sample lines than rollups, and both numbers are reported. The collector is
driven exactly as in the agent (exporter.collector.make_registry on an AgentSnapshot
built from a real agent.flows.FlowTable), timed two ways: an HTTP GET through the agent's
own server (exporter/api/app.py under uvicorn, exporter/api/server.py: what Prometheus
sees; it renders with the exporter's own text writer), and client_python's
generate_latest() as a reference.
"""
from __future__ import annotations

import gc
import time
import tracemalloc
import urllib.request
from typing import Any, Callable, Dict, List

from prometheus_client import generate_latest

from meshlens.agent.aggregate.flows import OVERFLOW, FlowTable, RollupKey
from meshlens.agent.aggregate.snapshot import AgentSnapshot, ProcessStats
from meshlens.exporter.prometheus.collector import make_registry
from meshlens.exporter.api.app import create_app
from meshlens.exporter.api.server import ApiServer

from .context import Context
from .report import SectionResult, Table, fmt, fmt_summary
from .stats import summarize
from .targets import verdict
from tests.integration.servers import free_port
from tests.unit.flow_helpers import closed, opened

SERIES = (1_000, 10_000, 100_000)    # Prometheus series (sample lines in the exposition)
ROLLUPS = (1_000, 10_000)            # flow rollups (what --max-flows caps; default 10k)


def fill(table: FlowTable, n: int) -> None:
    """n distinct rollups, each one closed outbound connection with bytes, RTT and durations."""
    for i in range(n):
        k = RollupKey("outbound", f"proc{i % 50}", 1 + i % 200, 4026531840 + i % 20,
                      f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 80 + i % 7)
        opened(table, k, 0.0001 + (i % 100) * 1e-5)
        closed(table, k, sent=100 + i, received=613, rtt_us=50 + i % 900, duration_s=0.002 + (i % 100) * 1e-4)


def snapshot_fn(table: FlowTable) -> Callable[[], AgentSnapshot]:
    def snap() -> AgentSnapshot:
        return AgentSnapshot(areas={"tcp": table.snapshot()}, health={}, attach={},
                             process=ProcessStats(0.0, 0.0, 0), cgroup_path=lambda cid: f"/kubepods.slice/pod{cid}")
    return snap


class _MetricsOnly:
    """The agent port of the API app, for a server asked only for /metrics."""

    history = None
    started_wall = 0.0
    tap_clients = 0


def _scrape_http(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=600) as r:
        return r.read()


def lines_per_rollup() -> Dict[str, int]:
    """Sample lines of the exposition with 0 and with 1 rollup: fixed part and per-rollup part."""
    def lines(n: int) -> int:
        table = FlowTable(max_rollups=n + 1, ttl=1e9)
        fill(table, n)
        body = generate_latest(make_registry(snapshot_fn(table)))
        return sum(1 for line in body.split(b"\n") if line and not line.startswith(b"#"))
    l0, l1 = lines(0), lines(1)
    return {"fixed": l0, "per_rollup": l1 - l0}


def measure(n: int, repeats: int) -> Dict[str, Any]:
    tracemalloc.start()
    table = FlowTable(max_rollups=n + 1, ttl=1e9)
    t0 = time.monotonic()
    fill(table, n)
    fill_s = time.monotonic() - t0
    table_bytes, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    registry = make_registry(snapshot_fn(table))
    gen: List[float] = []
    body = b""
    for _ in range(repeats):
        gc.collect()
        t = time.perf_counter()
        body = generate_latest(registry)
        gen.append((time.perf_counter() - t) * 1e3)
    port = free_port()
    addr = f"127.0.0.1:{port}"
    server = ApiServer(create_app(_MetricsOnly(), registry), "127.0.0.1", port).start()
    http: List[float] = []
    try:
        for _ in range(repeats):
            gc.collect()
            t = time.perf_counter()
            _scrape_http(f"http://{addr}/metrics")
            http.append((time.perf_counter() - t) * 1e3)
    finally:
        server.shutdown()
    lines = sum(1 for line in body.split(b"\n") if line and not line.startswith(b"#"))
    return {"rollups": n, "repeats": repeats, "generate_ms": summarize(gen), "http_ms": summarize(http),
            "bytes": len(body), "sample_lines": lines, "fill_s": fill_s, "table_mb": table_bytes / 1e6}


def at_cap(cap: int, offered: int) -> Dict[str, Any]:
    """Feed `offered` distinct keys into a table capped at `cap`; what does /metrics say?"""
    table = FlowTable(max_rollups=cap, ttl=1e9)
    fill(table, offered)
    registry = make_registry(snapshot_fn(table))
    t = time.perf_counter()
    text = generate_latest(registry).decode()
    ms = (time.perf_counter() - t) * 1e3
    opened = [line for line in text.splitlines() if line.startswith("meshlens_tcp_connections_opened_total{")]
    overflow = [line for line in opened if f'direction="{OVERFLOW}"' in line]
    over_total = next((float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith('meshlens_agent_flow_overflows_total{source="tcp"}')), float("nan"))
    return {"cap": cap, "offered_keys": offered, "series": len(opened), "overflow_series": len(overflow),
            "overflow_opened": float(overflow[0].rsplit(" ", 1)[1]) if overflow else 0.0,
            "opened_sum": sum(float(line.rsplit(" ", 1)[1]) for line in opened),
            "flow_overflows_total": over_total, "scrape_ms": ms}


def run(ctx: Context) -> SectionResult:
    res = SectionResult("exporter", "5. Exporter: /metrics scrape time and size")
    shape = lines_per_rollup()
    plan = [(f"≈{n:,} series", max(1, round((n - shape["fixed"]) / shape["per_rollup"]))) for n in SERIES]
    plan += [(f"{n:,} rollups" + (" (default --max-flows)" if n == 10_000 else ""), n)
             for n in ROLLUPS if not (ctx.quick and n > 1_000)]
    rows = []
    for label, n in plan:
        if ctx.quick:
            reps = 1 if n >= 10_000 else 3 if n >= 1_000 else 5
        else:
            reps = 2 if n >= 10_000 else 5 if n >= 1_000 else 9
        r = measure(n, reps)
        r["label"] = label
        rows.append(r)
    t = Table("Scrape cost by size", ["size", "rollups", "sample lines (series)", "body", "generate_latest ms",
                                      "HTTP GET ms", "repeats", "flow table MB"])
    for r in rows:
        t.add(r["label"], f"{r['rollups']:,}", f"{r['sample_lines']:,}", f"{r['bytes'] / 1e6:.2f} MB",
              fmt_summary(r["generate_ms"]), fmt_summary(r["http_ms"]), r["repeats"], fmt(r["table_mb"]))
    res.tables.append(t)
    res.intro = (f"Each rollup (one label set of the tcp families) is {shape['per_rollup']} sample lines: 7 counters, "
                 f"1 gauge and 3 histograms with their buckets, _sum and _count; the agent's own families add "
                 f"{shape['fixed']} lines. 'Series' below means Prometheus series (sample lines); the rollup rows use "
                 f"the flow-table meaning (`--max-flows`). 'HTTP GET' is the agent's own /metrics server (what "
                 f"Prometheus sees, and what the target is checked on); generate_latest is client_python's encoder, "
                 f"for reference. Cells: median [min–max] over repeats.")
    res.notes.append("100k rollups are not measured by `make bench` (one run would take minutes): a one-off run on this "
                     "machine (2026-11-27, busy) took 172 s for generate_latest and 131 s for the HTTP GET, "
                     "6.3 M lines, 1.2 GB, 134 MB of flow table.")
    cap = at_cap(1000, 1500)
    c = Table("At the cardinality cap (FlowTable max_rollups=1000, 1500 distinct keys offered)",
              ["series exported", "of which __overflow__", "opened in __overflow__", "opened, sum of all series",
               "meshlens_agent_flow_overflows_total", "scrape ms"])
    c.add(cap["series"], cap["overflow_series"], fmt(cap["overflow_opened"]), fmt(cap["opened_sum"]),
          fmt(cap["flow_overflows_total"]), fmt(cap["scrape_ms"]))
    res.tables.append(c)
    kept = cap["opened_sum"] == cap["offered_keys"]
    res.notes.append(f"At the cap: {cap['series'] - cap['overflow_series']:,} regular series plus "
                     f"{cap['overflow_series']} __overflow__ series holding {cap['overflow_opened']:,.0f} connections; "
                     f"the sum over series is {cap['opened_sum']:,.0f} of {cap['offered_keys']:,} offered "
                     f"({'nothing lost' if kept else 'counts LOST'}); meshlens_agent_flow_overflows_total = "
                     f"{cap['flow_overflows_total']:,.0f} for {cap['offered_keys'] - cap['cap']:,} keys beyond the cap.")
    res.notes.append("'flow table MB' is Python heap allocated while filling the table (tracemalloc).")
    res.data.update(sizes=rows, cap=cap, shape=shape)
    ten = rows[1]
    roll = rows[-1]
    res.verdicts.append(verdict("scrape_10k", ten["http_ms"].median,
                                f"HTTP GET, {ten['sample_lines']:,} series = {ten['rollups']} rollups; at {roll['rollups']:,} "
                                f"rollups ({roll['sample_lines']:,} series) {roll['http_ms'].median:,.0f} ms"))
    return res
