"""Section 1, overhead on workloads: how much slower nginx, iperf3 and a connection storm
run while the agent watches them.

Rounds alternate modes in blocks (bench/rounds.py): `base` (no agent), `l4` (the real CLI
restricted to the tcp source) and `full` (`meshlens run` as shipped) when the shipped
default has more than the tcp source. Within a block the agent is started before and
stopped after the mode's workloads, so every figure has a baseline from the same run.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Dict, Iterator, List, Optional, Tuple

from .agentrun import BenchAgent
from .context import Context
from .env import BusyMeter, busy_warnings, round_context
from .report import SectionResult, Table, fmt, fmt_pct, fmt_summary
from .rounds import compare, schedule
from .targets import verdict
from .workloads import MEDIUM, SMALL

WORKLOADS = ("http_small", "http_medium", "conn_storm", "iperf3")
LABELS = {
    "http_small": f"nginx {SMALL} B, keep-alive (req/s)",
    "http_medium": f"nginx {MEDIUM} B, keep-alive (req/s)",
    "conn_storm": f"nginx {SMALL} B, new connection per request (req/s)",
    "iperf3": "iperf3 bulk, 1 stream (Gbit/s)",
}


@contextlib.contextmanager
def _mode(mode: str, ctx: Context) -> Iterator[Optional[BenchAgent]]:
    if mode == "base":
        yield None
        return
    agent = BenchAgent(mode).start()
    ctx.remember_attach(mode, agent.attached)
    try:
        yield agent
    finally:
        agent.stop()


def _run_workloads(ctx: Context, agent: Optional[BenchAgent]) -> Dict[str, Dict[str, Any]]:
    tb, secs = ctx.testbed, ctx.seconds
    out: Dict[str, Dict[str, Any]] = {}
    for name in WORKLOADS:
        cpu0 = agent.usage()[0] if agent else 0.0
        busy = BusyMeter()
        if name == "iperf3":
            r = tb.iperf3(secs)
            value, p50, p99 = r["gbit_s"], None, None
        else:
            r = tb.http(SMALL if name != "http_medium" else MEDIUM, secs, close=(name == "conn_storm"))
            value, p50, p99 = r["rps"], r["latency_us"]["p50"], r["latency_us"]["p99"]
            errors = sum(r["errors"].values())
            if errors:
                ctx.note(f"overhead {name}: wrk reported {errors} errors in one round: {r['errors']}")
        tb.reset_access_log()
        wall = r.get("wall_s") or r.get("seconds") or secs
        out[name] = {"value": value, "p50_us": p50, "p99_us": p99, "machine_busy_cores": busy.cores(),
                     "agent_cores": ((agent.usage()[0] - cpu0) / wall) if agent else None}
    return out


def run(ctx: Context) -> SectionResult:
    res = SectionResult("overhead", "1. Overhead on workloads")
    modes = ["base"] + ctx.agent_modes
    blocks = 1 if ctx.quick else 4
    rounds: List[Dict[str, Any]] = []
    for block, mode in schedule(modes, blocks):
        with _mode(mode, ctx) as agent:
            own = [agent.pid] if agent else []
            context = round_context(own)
            results = _run_workloads(ctx, agent)
        rounds.append({"block": block, "mode": mode, "context": context, "results": results})
    res.data["rounds"] = rounds
    res.data["modes"] = modes
    ctx.warnings += busy_warnings([r["context"] for r in rounds])

    res.intro = (f"{blocks} blocks × modes {', '.join(modes)} (order alternates per block), {ctx.seconds} s per "
                 f"workload per round; wrk 1 thread, 32 connections; nginx 1 worker. Cells: median [min–max] over "
                 f"rounds; ratio = median(mode) / median(base); paired = per-block ratio to the baseline run in the "
                 f"same block, median [min–max].")
    mode_names = {m: ctx.mode_label(m) for m in modes}
    summary: Dict[str, Any] = {}
    for name in WORKLOADS:
        tput = compare([(r["block"], r["mode"], r["results"][name]["value"]) for r in rounds])
        t = Table(LABELS[name], ["mode", "throughput", "ratio", "paired ratio", "p50 µs", "Δp50", "p99 µs", "Δp99",
                                 "agent CPU (cores)"])
        lat: Dict[str, Any] = {}
        if name != "iperf3":
            lat["p50"] = compare([(r["block"], r["mode"], r["results"][name]["p50_us"]) for r in rounds])
            lat["p99"] = compare([(r["block"], r["mode"], r["results"][name]["p99_us"]) for r in rounds])
        for m in modes:
            cpu = [r["results"][name]["agent_cores"] for r in rounds if r["mode"] == m and r["results"][name]["agent_cores"] is not None]
            paired = tput[m]["paired_pct"]
            t.add(mode_names[m], fmt_summary(tput[m]["summary"]), fmt_pct(tput[m]["ratio_pct"], signed=False),
                  fmt_summary(paired) + "%" if paired and m != "base" else "—",
                  fmt_summary(lat["p50"][m]["summary"]) if lat else "—",
                  fmt_pct(lat["p50"][m]["delta_pct"]) if lat and m != "base" else "—",
                  fmt_summary(lat["p99"][m]["summary"]) if lat else "—",
                  fmt_pct(lat["p99"][m]["delta_pct"]) if lat and m != "base" else "—",
                  fmt(sorted(cpu)[len(cpu) // 2]) if cpu else "—")
        res.tables.append(t)
        summary[name] = {"throughput": tput, **lat}
    res.data["summary"] = summary

    full = ctx.full_mode
    tp = summary["http_small"]["throughput"][full]["ratio_pct"]
    p99 = summary["http_small"]["p99"][full]["delta_pct"]
    tp_m = summary["http_medium"]["throughput"][full]["ratio_pct"]
    p99_m = summary["http_medium"]["p99"][full]["delta_pct"]
    note = f"mode {ctx.mode_label(full)}; nginx {SMALL} B (worst of small/medium reported below)"
    res.verdicts.append(verdict("throughput_ratio_full", min(tp, tp_m),
                                f"{ctx.mode_label(full)}; small {tp:.1f}%, medium {tp_m:.1f}%"))
    res.verdicts.append(verdict("p99_delta_full", max(p99, p99_m),
                                f"{ctx.mode_label(full)}; small {p99:+.1f}%, medium {p99_m:+.1f}%"))
    del note
    storm = summary["conn_storm"]["throughput"]
    others = "; ".join(f"{ctx.mode_label(m)}: small {summary['http_small']['throughput'][m]['ratio_pct']:.1f}%, "
                       f"medium {summary['http_medium']['throughput'][m]['ratio_pct']:.1f}%"
                       for m in ctx.agent_modes if m not in (full, "l4"))
    res.verdicts.append(verdict("l7_keepalive_ratio_full", min(tp, tp_m),
                                f"{ctx.mode_label(full)}; small {tp:.1f}%, medium {tp_m:.1f}%; p99: see above"
                                + (f" ({others})" if others else "")))
    res.verdicts.append(verdict("l7_storm_ratio_full", storm[full]["ratio_pct"],
                                f"{ctx.mode_label(full)}; paired {fmt_summary(storm[full]['paired_pct'])}%"
                                + "".join(f"; {ctx.mode_label(m)}: {storm[m]['ratio_pct']:.1f}%"
                                          for m in ctx.agent_modes if m not in (full, "l4"))))
    return res
