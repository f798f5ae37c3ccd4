"""Section: what L4 alone costs (issue 9), against a baseline run in the same invocation.

Rounds alternate `base` (no agent) and `l4` (`meshlens run --features l4`) in blocks. Per
l4 round, with BPF run-time stats on: a short idle window (the background: our programs
also fire for other traffic on the machine, and the sweep runs every second), then nginx
613 B keep-alive at saturation, then nginx with a new connection per request at saturation.
Reported: throughput ratios (paired per block), BPF program runs per keep-alive request
(of programs on per-call hooks, and of all programs net of the idle window), agent CPU µs and BPF
ns per connection in the storm (net of the background measured just before). Both ends of
every connection are on this node, so one connection is two observed sockets.
"""
from __future__ import annotations

import contextlib
import time
from typing import Any, Dict, Iterator, List, Optional

from .agentrun import BenchAgent, bpf_stats_enabled, prog_delta, prog_stats
from .context import Context
from .env import BusyMeter, busy_warnings, round_context
from .report import SectionResult, Table, fmt, fmt_pct, fmt_summary
from .rounds import compare, schedule
from .stats import summarize
from .targets import verdict
from .workloads import SMALL

IDLE_S = 2.0
# l4_tp: the same agent with the state program on the classic tracepoint (A/B of tp_btf, the default)
MODES = ["base", "l4", "l4_tp"]
# Programs on hooks that fire per send/receive call (the per-call fallback); with the iterator
# variant they are not attached, and the verdict counts their runs.
PER_CALL_PROGRAMS = {"handle_send_length", "handle_recv_length"}
WORKLOADS = {"keepalive": f"nginx {SMALL} B, keep-alive, saturation (req/s)",
             "storm": f"nginx {SMALL} B, new connection per request, saturation (conn/s)"}


@contextlib.contextmanager
def _mode(mode: str, ctx: Context) -> Iterator[Optional[BenchAgent]]:
    if mode == "base":
        yield None
        return
    agent = BenchAgent(mode).start()
    ctx.remember_attach(mode, agent.attached)
    try:
        with bpf_stats_enabled():
            yield agent
    finally:
        agent.stop()


def _window(ctx: Context, agent: Optional[BenchAgent], workload: Optional[str]) -> Dict[str, Any]:
    p0 = prog_stats(agent.pid) if agent else {}
    c0 = agent.usage()[0] if agent else 0.0
    busy, t0 = BusyMeter(), time.monotonic()
    requests, rps, errors = 0, 0.0, 0
    if workload is None:
        time.sleep(IDLE_S)
    else:
        r = ctx.testbed.http(SMALL, ctx.seconds, close=(workload == "storm"))
        requests, rps, errors = r["requests"], r["rps"], sum(r["errors"].values())
        ctx.testbed.reset_access_log()
    wall = time.monotonic() - t0
    progs = prog_delta(p0, prog_stats(agent.pid)) if agent else {}
    return {"wall_s": wall, "requests": requests, "rps": rps, "errors": errors, "busy_cores": busy.cores(),
            "agent_cpu_s": (agent.usage()[0] - c0) if agent else 0.0, "progs": progs}


def _net(w: Dict[str, Any], bg: Dict[str, Any], what: str, names: Optional[set] = None,
         exclude: frozenset = frozenset()) -> float:
    """A window's total of `what` (run_cnt or run_time_ns) minus the idle rate times its length."""
    def tot(x: Dict[str, Any]) -> float:
        return sum(p[what] for n, p in x["progs"].items() if n not in exclude and (names is None or n in names))
    return tot(w) - tot(bg) / bg["wall_s"] * w["wall_s"]


def _per_request(windows: List[Dict[str, Any]], what: str, names: Optional[set] = None):
    """Summary over rounds of `what` (run_cnt or run_time_ns) per request, net of the idle window."""
    return summarize([_net(x["window"], x["background"], what, names=names) / max(1, x["window"]["requests"])
                      for x in windows])


def run(ctx: Context) -> SectionResult:
    res = SectionResult("l4", "L4 alone (issue 9): per-call cost and per-connection cost")
    blocks = 1 if ctx.quick else 4
    rounds: List[Dict[str, Any]] = []
    for block, mode in schedule(MODES, blocks):
        with _mode(mode, ctx) as agent:
            context = round_context([agent.pid] if agent else [])
            out: Dict[str, Any] = {}
            for name in WORKLOADS:
                bg = _window(ctx, agent, None) if agent else None
                w = _window(ctx, agent, name)
                if w["errors"]:
                    ctx.note(f"l4 {name}: wrk reported {w['errors']} errors in one round")
                out[name] = {"window": w, "background": bg}
        rounds.append({"block": block, "mode": mode, "context": context, "results": out})
    res.data["rounds"] = rounds
    ctx.warnings += busy_warnings([r["context"] for r in rounds])

    summary: Dict[str, Any] = {}
    for name, label in WORKLOADS.items():
        tput = compare([(r["block"], r["mode"], r["results"][name]["window"]["rps"]) for r in rounds])
        by_mode = {m: [r["results"][name] for r in rounds if r["mode"] == m] for m in MODES[1:]}
        l4 = by_mode["l4"]
        ns_of = {m: _per_request(xs, "run_time_ns") for m, xs in by_mode.items()}
        cpu_of = {m: summarize([1e6 * (x["window"]["agent_cpu_s"] - x["background"]["agent_cpu_s"]
                                       / x["background"]["wall_s"] * x["window"]["wall_s"])
                                / max(1, x["window"]["requests"]) for x in xs]) for m, xs in by_mode.items()}
        runs_of = {m: _per_request(xs, "run_cnt") for m, xs in by_mode.items()}
        per_call_of = {m: _per_request(xs, "run_cnt", PER_CALL_PROGRAMS) for m, xs in by_mode.items()}
        per_call, all_runs = per_call_of["l4"], runs_of["l4"]
        ns, cpu_us = ns_of["l4"], cpu_of["l4"]
        progs: Dict[str, Dict[str, float]] = {}
        for x in l4:
            for n, p in x["window"]["progs"].items():
                d = progs.setdefault(n, {"run_cnt": 0, "run_time_ns": 0, "requests": 0})
                d["run_cnt"] += p["run_cnt"]
                d["run_time_ns"] += p["run_time_ns"]
                d["requests"] += x["window"]["requests"]
        summary[name] = {"throughput": tput, "per_call_runs_per_request": per_call, "runs_per_request": all_runs,
                         "bpf_ns_per_request": ns, "agent_cpu_us_per_request": cpu_us, "programs": progs,
                         "bpf_ns_per_request_by_mode": ns_of}
        t = Table(label, ["mode", "throughput", "ratio", "paired ratio", "BPF runs / request (per-call hooks)",
                          "BPF runs / request (all, net)", "BPF ns / request (net)", "agent CPU µs / request (net)"])
        for m in MODES:
            paired = tput[m]["paired_pct"]
            label_m = ctx.mode_label(m) + (" — state on the classic tracepoint" if m == "l4_tp" else "")
            t.add(label_m, fmt_summary(tput[m]["summary"]), fmt_pct(tput[m]["ratio_pct"], signed=False),
                  fmt_summary(paired) + "%" if paired and m != "base" else "—",
                  *(("—",) * 4 if m == "base" else
                    (fmt_summary(per_call_of[m]), fmt_summary(runs_of[m]), fmt_summary(ns_of[m]),
                     fmt_summary(cpu_of[m]))))
        res.tables.append(t)
        pt = Table(f"{label}: per program (l4 rounds, raw)", ["program", "runs / request", "ns / run", "ns / request"])
        for n, d in sorted(progs.items(), key=lambda kv: -kv[1]["run_time_ns"]):
            if d["run_cnt"]:
                pt.add(n, fmt(d["run_cnt"] / max(1, d["requests"])), fmt(d["run_time_ns"] / d["run_cnt"]),
                       fmt(d["run_time_ns"] / max(1, d["requests"])))
        res.tables.append(pt)
    res.data["summary"] = summary
    res.intro = (f"{blocks} blocks × modes base, l4 (state on tp_btf, as shipped), l4_tp (state on the classic "
                 f"tracepoint, MESHLENS_ATTACH_SKIP=tcp_state/tp_btf) (order reversed every other block), {ctx.seconds} s per workload; "
                 f"wrk 1 thread, 32 connections; nginx 1 worker; {IDLE_S:g} s idle window before each l4 window "
                 "('net' subtracts its rate). Each request of the storm is one connection, both ends on this node "
                 "(two observed sockets).")
    ka, st = summary["keepalive"], summary["storm"]
    res.verdicts.append(verdict("l4_keepalive_ratio", ka["throughput"]["l4"]["ratio_pct"],
                                f"paired {fmt_summary(ka['throughput']['l4']['paired_pct'])}%"))
    attached = sorted({n for x in rounds if x["mode"] == "l4" for n in x["results"]["keepalive"]["window"]["progs"]})
    res.verdicts.append(verdict("l4_keepalive_runs_per_request", ka["per_call_runs_per_request"].median,
                                f"programs on per-call hooks attached: {sorted(PER_CALL_PROGRAMS & set(attached)) or 'none'}; "
                                f"all programs, net of the idle window (state changes of the window's own 32 "
                                f"connections and of other traffic on the machine, the sweep): "
                                f"{fmt_summary(ka['runs_per_request'])} runs/request"))
    res.verdicts.append(verdict("l4_storm_ratio", st["throughput"]["l4"]["ratio_pct"],
                                f"paired {fmt_summary(st['throughput']['l4']['paired_pct'])}%"))
    res.verdicts.append(verdict("l4_agent_us_per_connection", st["agent_cpu_us_per_request"].median,
                                f"BPF time per connection {fmt_summary(st['bpf_ns_per_request'])} ns (both ends)"))
    return res
