"""Ground truth vs what the agent exported, for one measured load step.

A step reads the agent's /metrics before and after a workload, waits until the agent has
seen every connection close, and compares the deltas with what the load tool, nginx's
access log and the kernel's per-namespace counters say. Used by capacity and accuracy.
Series are selected by the bench pods' netns (and peer/port), so other traffic on the
machine never counts.
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, List, Optional, Tuple

from tests.integration.agent_proc import AgentProcess, Sample

from .stats import Error, bucket_interval, histogram_quantile
from .workloads import HTTP_PORT, Testbed

TCP_FIELDS = {"opened": "meshlens_tcp_connections_opened_total", "closed": "meshlens_tcp_connections_closed_total",
              "sent": "meshlens_tcp_sent_bytes_total", "received": "meshlens_tcp_received_bytes_total"}
LOST = "meshlens_agent_events_lost_total"
READ = "meshlens_agent_events_read_total"
HTTP_SERVER = "http_server_request_duration_seconds"
HTTP_CLIENT = "http_client_request_duration_seconds"


def _match(s: Sample, labels: Dict[str, str]) -> bool:
    return all(s.labels.get(k) == v for k, v in labels.items())


def sides(tb: Testbed, port: int = HTTP_PORT) -> Dict[str, Dict[str, str]]:
    """Label filters of the client's outbound and the server's inbound series to `port`."""
    return {"cli": dict(netns=str(tb.cli.netns_inode), direction="outbound", network_peer_address=tb.srv.ipv4,
                        server_port=str(port)),
            "srv": dict(netns=str(tb.srv.netns_inode), direction="inbound", server_port=str(port))}


def read_counters(agent: AgentProcess, tb: Testbed, port: int = HTTP_PORT) -> Dict[str, Any]:
    """One scrape -> tcp counters of both sides, events lost, HTTP counts and buckets."""
    samples = agent.samples()
    out: Dict[str, Any] = {"lost": sum(s.value for s in samples if s.name == LOST)}
    lost_by: Dict[str, float] = {}
    for s in samples:
        if s.name == LOST:
            key = f"{s.labels.get('source')}/{s.labels.get('reason')}"
            lost_by[key] = lost_by.get(key, 0.0) + s.value
    out["lost_by"] = lost_by
    # ring-buffer records the agent read (the dns source is a view of the http source's records)
    out["read"] = sum(s.value for s in samples if s.name == READ and s.labels.get("source") != "dns")
    for side, labels in sides(tb, port).items():
        for field, name in TCP_FIELDS.items():
            out[f"{side}_{field}"] = sum(s.value for s in samples if s.name == name and _match(s, labels))
    for role, name, pod in (("srv", HTTP_SERVER, tb.srv), ("cli", HTTP_CLIENT, tb.cli)):
        sel = [s for s in samples if s.labels.get("netns") == str(pod.netns_inode) and s.labels.get("server_port") == str(port)]
        out[f"{role}_http_count"] = sum(s.value for s in sel if s.name == name + "_count")
        buckets: Dict[float, float] = {}
        for s in sel:
            if s.name == name + "_bucket":
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
        out[f"{role}_http_buckets"] = buckets
    out["http_families"] = any(s.name.startswith("http_server_") for s in samples)
    return out


def delta(before: Dict[str, Any], after: Dict[str, Any]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in after.items():
        if isinstance(v, dict):
            out[k] = {le: c - before.get(k, {}).get(le, 0.0) for le, c in v.items()}
        elif isinstance(v, bool):
            out[k] = v
        else:
            out[k] = v - before.get(k, 0)
    return out


def _numbers(d: Dict[str, Any]) -> Dict[str, Any]:
    return {k: v for k, v in d.items() if not isinstance(v, (dict, bool))}


def quiesce(agent: AgentProcess, tb: Testbed, port: int = HTTP_PORT, gap: float = 1.2,
            timeout: float = 8.0) -> Dict[str, Any]:
    """Counters once two scrapes `gap` apart (longer than a sweep) agree: earlier traffic
    (e.g. a calibration run) is fully credited before a step takes its `before`."""
    deadline = time.monotonic() + timeout
    last = read_counters(agent, tb, port)
    while time.monotonic() < deadline:
        time.sleep(gap)
        now = read_counters(agent, tb, port)
        if _numbers(now) == _numbers(last):
            return now
        last = now
    return last


def settle(agent: AgentProcess, tb: Testbed, before: Dict[str, Any], opens: int, port: int = HTTP_PORT,
           timeout: float = 8.0) -> Dict[str, Any]:
    """Deltas once the client side shows `opens` closed connections and then two scrapes
    more than a sweep apart agree (every source has folded its maps at least once)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if delta(before, read_counters(agent, tb, port))["cli_closed"] >= opens:
            break
        time.sleep(0.3)
    return delta(before, quiesce(agent, tb, port))


def http_checks(d: Dict[str, Any], wrk: Dict[str, Any], log: Dict[str, int]) -> Dict[str, Error]:
    """Agent deltas vs ground truth for an HTTP step (keys name the comparison)."""
    checks = {
        "connections opened, client (vs kernel ActiveOpens)": Error(d["cli_opened"], wrk["active_opens"]),
        "connections opened, server (vs kernel PassiveOpens)": Error(d["srv_opened"], wrk["passive_opens"]),
        "connections closed, client (vs kernel ActiveOpens)": Error(d["cli_closed"], wrk["active_opens"]),
        "bytes received, client (vs wrk bytes read)": Error(d["cli_received"], wrk["bytes"]),
        "bytes sent, server (vs access log bytes_sent)": Error(d["srv_sent"], log["bytes_sent"]),
        "bytes received, server (vs access log request_length)": Error(d["srv_received"], log["request_length"]),
    }
    if d.get("http_families"):
        checks["HTTP requests, server (vs access log)"] = Error(d["srv_http_count"], log["requests"])
        checks["HTTP requests, client (vs wrk requests)"] = Error(d["cli_http_count"], wrk["requests"])
    return checks


def worst_pct(checks: Dict[str, Error]) -> float:
    """Largest |error| in % over the checks (0 when all exact)."""
    vals = [abs(e.percent) if e.percent is not None else math.inf for e in checks.values()]
    return max(vals) if vals else float("nan")


def quantiles(buckets: Dict[float, float], qs: Tuple[float, ...] = (0.5, 0.99)) -> List[float]:
    pairs = sorted(buckets.items())
    return [histogram_quantile(q, pairs) for q in qs]


def intervals(buckets: Dict[float, float], qs: Tuple[float, ...] = (0.5, 0.99)) -> List[Tuple[float, float]]:
    pairs = sorted(buckets.items())
    return [bucket_interval(q, pairs) for q in qs]


def http_step(agent: AgentProcess, tb: Testbed, size: int, seconds: int, *, connections: int = 32,
              delay_ms: Optional[int] = None, close: bool = False) -> Dict[str, Any]:
    """Run one wrk step with the agent watching; return wrk's report, deltas and checks."""
    before = quiesce(agent, tb)
    tb.reset_access_log()
    wrk = tb.http(size, seconds, connections, delay_ms=delay_ms, close=close)
    d = settle(agent, tb, before, wrk["active_opens"])
    log = tb.access_log_totals(expect=wrk["requests"], body_size=size)
    checks = http_checks(d, wrk, log)
    tb.reset_access_log()
    return {"wrk": {k: v for k, v in wrk.items() if k != "text"}, "delta": d, "log": log, "checks": checks,
            "lost": d["lost"], "lost_by": {k: v for k, v in d["lost_by"].items() if v}, "worst_pct": worst_pct(checks),
            "exact": all(e.exact for e in checks.values()) and d["lost"] == 0}
