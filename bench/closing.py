"""The report's closing notes: for every missed target, where the cost comes from (from this
run's own numbers) and what would close it. Advice is tied to the figures that support it;
nothing here changes a verdict."""
from __future__ import annotations

from typing import Any, Dict, List

from .context import Context
from .report import SectionResult


def _data(results: List[SectionResult], name: str) -> Dict[str, Any]:
    return next((r.data for r in results if r.name == name and not r.error), {})


def _missed(results: List[SectionResult], key: str) -> bool:
    return any(v.target.key == key and v.met is False for r in results for v in r.verdicts)


def notes(results: List[SectionResult], ctx: Context) -> List[str]:
    out: List[str] = []
    ov = _data(results, "overhead").get("summary", {})
    if ov and (_missed(results, "throughput_ratio_full") or _missed(results, "p99_delta_full")):
        parts = []
        for m in ctx.agent_modes:
            small = ov["http_small"]["throughput"][m]["ratio_pct"]
            storm = ov["conn_storm"]["throughput"][m]["ratio_pct"]
            parts.append(f"{ctx.mode_label(m)}: {small:.1f}% keep-alive, {storm:.1f}% connection storm")
        out.append("Throughput/p99 (overhead): " + "; ".join(parts) + ". On 2 cores nginx and wrk already use both "
                   "cores, so every cycle the agent or its programs take is taken from the workload. No `syscalls:*` "
                   "tracepoint runs in either full mode (L7 is parsed from packets: tc at the pod veths, cgroup_skb "
                   "on the cgroup v2 root for the rest, which pod traffic crosses too and is skipped there); what is "
                   "left is the packet parse itself (kernel ns/request below: each node-local request is parsed at "
                   "both veths, request and response) and, for the connection storm, the per-connection map work "
                   "of the L4 state program, the packet path's connection entries and the handshake tracking.")
    cost = _data(results, "agent_cost")
    if cost and _missed(results, "kernel_ns_per_request"):
        by_obj = cost.get("ns_per_request_by_object_at_20k", {})
        worst = sorted(cost.get("programs_at_20k", {}).items(), key=lambda kv: -kv[1]["ns_per_request"])[:3]
        out.append("Kernel ns/request: by object at 20k req/s " + ", ".join(f"{o} {ns:,.0f} ns" for o, ns in
                   sorted(by_obj.items())) + "; the most expensive programs: " + ", ".join(
                   f"{n} ({p['ns_per_run']:,.0f} ns × {p['runs_per_request']:.2f}/request)" for n, p in worst)
                   + ". Both ends of each request are on this node, so one request pays for two observed sockets; "
                   "per observed side it is half. The tc programs carry the L7 parser (chained by tail call after "
                   "the counters), so their ns/run is mostly parsing: four data-segment parses per request (two veths "
                   "× request and response) plus ACK runs (a bare ACK no longer reaches the parser, and a segment's "
                   "headers are parsed once, handed over in skb->cb). What closes it: a data segment is now ~130 ns "
                   "of interface lookup (pkt_ifaces, a hash the counter slot could replace with an array index), "
                   "~90 ns connection lookup, ~110 ns lock and sequence checks, ~70 ns copy-in, 650-870 ns parser and "
                   "50-180 ns write-back (docs/l7.md): the parser's bpf_loop steps are the largest share; per-CPU "
                   "series were measured and would save only the ~20 ns of atomic adds.")
    cap = _data(results, "capacity")
    for step in cap.get("connections", []):
        if step.get("lost"):
            out.append(f"Capacity: new-connection-per-request at {step['wrk']['rps']:,.0f} conn/s lost "
                       f"{step['lost']:,.0f} events ({', '.join(f'{k} {v:,.0f}' for k, v in step['lost_by'].items())}); "
                       "a larger ring buffer or fewer per-connection records would move the limit.")
            break
    ex = _data(results, "exporter")
    if ex and _missed(results, "scrape_10k"):
        rows = ex.get("sizes", [])
        per_line = [r["http_ms"].median * 1e3 / max(1, r["sample_lines"]) for r in rows]
        shape = ex.get("shape", {})
        out.append(f"/metrics: about {min(per_line):.0f}–{max(per_line):.0f} µs per series through the agent's "
                   f"/metrics server on this machine, and each flow rollup is {shape.get('per_rollup', '?')} series "
                   "(most of them histogram buckets). What closes it: render the exposition once per sweep and "
                   "serve the cached bytes (the data only changes at sweeps), shorter label sets, and fewer buckets "
                   "per TCP histogram; at 10k rollups (the default cap) only a smaller per-rollup footprint or a "
                   "lower default cap brings a scrape under seconds.")
    if ctx.agent_modes == ["l4"]:
        out.append(f"`meshlens run` starts only {ctx.default_sources}, so 'full' = L4: the full-agent targets are "
                   "evaluated on the L4 agent.")
    return out
