"""Section 6, REST API: response time of /api/v1/flows (and /metrics beside it, on the same
server) at 1k and 10k flow rollups, served by the agent's own app (exporter/api/app.py under
uvicorn, exporter/api/server.py), and the memory one history record costs at that size.

The rollups are bench/exporter.fill()'s synthetic closed connections in a real FlowTable;
identity is the standalone view (process names), as `make run` has. Timed as HTTP GETs from
this process (urllib), so the numbers include JSON encoding and the loopback round trip.
`python -m bench.api` prints the table without writing the report.
"""
from __future__ import annotations

import gc
import time
import tracemalloc
import urllib.request
from typing import Any, Dict, List

from meshlens.agent.aggregate.flows import FlowTable
from meshlens.agent.aggregate.history import DEFAULT_LENGTH, SnapshotHistory
from meshlens.agent.aggregate.snapshot import AgentSnapshot, ProcessStats
from meshlens.exporter.api.app import create_app
from meshlens.exporter.api.server import ApiServer
from meshlens.exporter.prometheus.collector import MeshlensCollector

from .exporter import fill
from .report import SectionResult, Table, fmt, fmt_summary
from .stats import summarize
from tests.integration.servers import free_port

ROLLUPS = (1_000, 10_000)
QUERIES = (
    ("all flows, limit=10000", "/api/v1/flows?limit=10000"),
    ("first page, limit=100", "/api/v1/flows?limit=100"),
    ("filtered: peer_ip=10.0.1.0/24", "/api/v1/flows?limit=10000&peer_ip=10.0.1.0/24"),
    ("since=1m (window subtraction)", "/api/v1/flows?limit=10000&since=1m"),
    ("/api/v1/stat", "/api/v1/stat"),
    ("/metrics", "/metrics"),
)


class BenchAgent:
    """The part of agent/runner.Agent the app reads: a snapshot over a filled FlowTable and a
    history holding one record of it."""

    def __init__(self, table: FlowTable) -> None:
        self.table = table
        self.started_wall = time.time() - 120
        self.history = SnapshotHistory()
        self.history.started_wall = self.started_wall
        self.history.record({"tcp": table.snapshot()})
        self.tap_clients = 0

    def snapshot(self) -> AgentSnapshot:
        return AgentSnapshot(areas={"tcp": self.table.snapshot()}, health={}, attach={},
                             process=ProcessStats(0.0, 0.0, 0), cgroup_path=lambda cid: f"/kubepods.slice/pod{cid}")

    def area(self, name: str) -> object:
        return None

    def tap_open(self, every: int = 1) -> bool:
        return False

    def tap_close(self) -> None:
        pass


def _get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=600) as r:
        return r.read()


def measure(n: int, repeats: int) -> Dict[str, Any]:
    table = FlowTable(max_rollups=n + 1, ttl=1e9)
    fill(table, n)
    agent = BenchAgent(table)
    # what one more history record costs: every rollup changed (worst case) / none changed
    changed = SnapshotHistory()
    unchanged = SnapshotHistory()
    unchanged.record({"tcp": table.snapshot()})
    costs = []
    for h in (changed, unchanged):
        gc.collect()
        tracemalloc.start()
        snap = table.snapshot()
        h.record({"tcp": snap})
        del snap
        gc.collect()
        costs.append(tracemalloc.get_traced_memory()[0] / 1e6)
        tracemalloc.stop()
    port = free_port()
    server = ApiServer(create_app(agent, MeshlensCollector(agent.snapshot)), "127.0.0.1", port).start()
    rows: List[Dict[str, Any]] = []
    try:
        for label, path in QUERIES:
            times: List[float] = []
            body = b""
            for _ in range(repeats):
                gc.collect()
                t = time.perf_counter()
                body = _get(f"http://127.0.0.1:{port}{path}")
                times.append((time.perf_counter() - t) * 1e3)
            rows.append({"query": label, "ms": summarize(times), "bytes": len(body)})
    finally:
        server.shutdown()
    return {"rollups": n, "repeats": repeats, "queries": rows, "record_changed_mb": costs[0],
            "record_unchanged_mb": costs[1]}


def run(ctx: Any) -> SectionResult:
    res = SectionResult("api", "6. REST API: /api/v1/flows response time")
    quick = getattr(ctx, "quick", False)
    sizes = [measure(n, (3 if quick else 7) if n < 10_000 else (2 if quick else 5)) for n in ROLLUPS]
    t = Table("Response time by flow-table size (HTTP GET through the agent's uvicorn server)",
              ["rollups", "query", "response ms", "body"])
    for s in sizes:
        for q in s["queries"]:
            t.add(f"{s['rollups']:,}", q["query"], fmt_summary(q["ms"]), f"{q['bytes'] / 1e6:.2f} MB")
    res.tables.append(t)
    m = Table(f"Memory of one history record (agent/aggregate/history.py keeps {DEFAULT_LENGTH} by default)",
              ["rollups", "record, every rollup changed MB", "record, none changed MB",
               f"{DEFAULT_LENGTH} records, worst case MB"])
    for s in sizes:
        m.add(f"{s['rollups']:,}", fmt(s["record_changed_mb"]), fmt(s["record_unchanged_mb"]),
              fmt(DEFAULT_LENGTH * s["record_changed_mb"]))
    res.tables.append(m)
    res.intro = ("Every answer is computed from the agent's snapshot on request: identity names, window subtraction, "
                 "filters, sorting for the cursor, JSON. Cells: median [min–max] over repeats.")
    res.data.update(sizes=sizes)
    return res


if __name__ == "__main__":
    r = run(None)
    for tbl in r.tables:
        print(tbl.markdown())
        print()
