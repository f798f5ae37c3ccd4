"""Section 2, agent cost: CPU and memory of the agent process, and the kernel-side run
time of its BPF programs, at fixed request rates (1k, 5k, 20k req/s) and at saturation.

The rates come from wrk throttled with Lua `delay()` and calibrated first (bench/workloads.py);
the achieved rate is what is reported. CPU is (user+system CPU-seconds of the agent) /
wall seconds, i.e. cores. Kernel cost is run_time_ns/run_cnt of the agent's own programs
(read from its fdinfo) with `kernel.bpf_stats_enabled=1` for the section only.
Both ends of every request run on this node, so one request is seen by the client's and
the server's socket hooks: ns per request is the cost of observing both ends.
"""
from __future__ import annotations

import time
from typing import Any, Dict, List, Optional

from .agentrun import BenchAgent, bpf_stats_enabled, prog_delta, prog_stats, program_objects
from .context import Context
from .env import BusyMeter, round_context
from .report import SectionResult, Table, fmt, fmt_summary
from .stats import median, summarize
from .targets import verdict
from .workloads import SMALL

RATES: List[Optional[int]] = [1000, 5000, 20000, None]  # None: saturation


def _label(rate: Optional[int]) -> str:
    return "saturation" if rate is None else f"{rate // 1000}k req/s"


BACKGROUND_S = 2.0


def _window(ctx: Context, agent: BenchAgent, load: bool, plan: Optional[Dict[str, int]]) -> Dict[str, Any]:
    """One measured window: idle (load=False), saturation (plan=None) or a calibrated rate."""
    tb = ctx.testbed
    p0, (c0, _), busy = prog_stats(agent.pid), agent.usage(), BusyMeter()
    t0 = time.monotonic()
    if not load:
        time.sleep(BACKGROUND_S)
        requests, rps = 0, 0.0
    elif plan is None:
        r = tb.http(SMALL, ctx.seconds)
        requests, rps = r["requests"], r["rps"]
    else:
        r = tb.http(SMALL, ctx.seconds, plan["connections"], delay_ms=plan["delay_ms"])
        requests, rps = r["requests"], r["rps"]
    wall = time.monotonic() - t0
    c1, rss = agent.usage()
    progs = prog_delta(p0, prog_stats(agent.pid))
    if load:
        tb.reset_access_log()
    return {"requests": requests, "rps": rps, "wall_s": wall, "agent_cores": (c1 - c0) / wall, "rss_bytes": rss,
            "machine_busy_cores": busy.cores(), "progs": progs,
            "bpf_ns": sum(p["run_time_ns"] for p in progs.values()),
            "bpf_events": sum(p["run_cnt"] for p in progs.values())}


def _loaded(ctx: Context, agent: BenchAgent, plan: Optional[Dict[str, int]]) -> Dict[str, Any]:
    """A short idle window (background: our programs firing for other traffic on the
    machine) right before the loaded window; the net figures subtract that background rate."""
    bg = _window(ctx, agent, False, None)
    w = _window(ctx, agent, True, plan)
    bg_ns, bg_ev = bg["bpf_ns"] / bg["wall_s"], bg["bpf_events"] / bg["wall_s"]
    w.update(background=bg, bpf_ns_net=w["bpf_ns"] - bg_ns * w["wall_s"],
             bpf_events_net=w["bpf_events"] - bg_ev * w["wall_s"])
    return w


def run(ctx: Context) -> SectionResult:
    res = SectionResult("agent_cost", "2. Agent cost (CPU, memory, kernel time)")
    for mode in ctx.cost_modes:
        _run_mode(ctx, res, mode, verdicts=mode == ctx.full_mode)
    return res


def _run_mode(ctx: Context, res: SectionResult, mode: str, verdicts: bool) -> None:
    """Windows at each rate for one agent mode; tables (and, for the full mode, verdicts)."""
    blocks = 1 if ctx.quick else 3
    windows: List[Dict[str, Any]] = []
    agent = BenchAgent(mode).start()
    ctx.remember_attach(mode, agent.attached)
    try:
        with bpf_stats_enabled():
            plans = {r: ctx.plan(r) for r in RATES if r is not None}
            res.data["plans"] = plans
            for block in range(blocks):
                for rate in RATES:
                    w = _loaded(ctx, agent, plans.get(rate) if rate else None)
                    w.update(block=block, rate=rate, context=round_context([agent.pid]))
                    windows.append(w)
    finally:
        agent.stop()
    idle = [w["background"] for w in windows]
    sfx = "" if verdicts else f"_{mode}"
    res.data.update({f"windows{sfx}": windows, f"mode{sfx}": mode})

    # Background: our programs also fire for other traffic on the machine (other sessions).
    bg_ns_per_s = summarize([w["bpf_ns"] / w["wall_s"] for w in idle])
    bg_ev_per_s = summarize([w["bpf_events"] / w["wall_s"] for w in idle])
    idle_cores = median([w["agent_cores"] for w in idle])
    res.intro += (f"Agent: {ctx.mode_label(mode)}, sweep interval 1 s. {blocks} round(s) per rate, {ctx.seconds} s each; "
                 f"nginx {SMALL} B keep-alive. Before each loaded window a {BACKGROUND_S:g} s idle window measures the "
                 f"background: idle, the agent used {idle_cores * 100:.2f}% of a core (median) and its programs ran "
                 f"{fmt_summary(bg_ev_per_s)} times/s for {fmt_summary(bg_ns_per_s)} ns/s on other traffic of the "
                 f"machine (other sessions' pods: the tc programs attach to every pod veth). 'net' columns subtract "
                 f"the background rate measured just before each window; 'raw' does not.")
    t = Table(f"Agent process and kernel cost by request rate — {ctx.mode_label(mode)}",
              ["offered", "achieved req/s", "agent CPU % of a core", "RSS MB", "BPF events / request",
               "BPF ns / request (raw)", "BPF ns / request (net)", "background share of raw", "BPF ns / event",
               "machine busy (cores)"])
    per_rate: Dict[str, Any] = {}
    for rate in RATES:
        ws = [w for w in windows if w["rate"] == rate]
        net = [w["bpf_ns_net"] / w["requests"] for w in ws if w["requests"]]
        raw = [w["bpf_ns"] / w["requests"] for w in ws if w["requests"]]
        evr = [w["bpf_events_net"] / w["requests"] for w in ws if w["requests"]]
        nse = [w["bpf_ns"] / w["bpf_events"] for w in ws if w["bpf_events"]]
        share = [100.0 * (1.0 - w["bpf_ns_net"] / w["bpf_ns"]) for w in ws if w["bpf_ns"]]
        cpu = summarize([100 * w["agent_cores"] for w in ws])
        entry = {"achieved_rps": summarize([w["rps"] for w in ws]), "cpu_pct": cpu,
                 "rss_mb": max(w["rss_bytes"] for w in ws) / 1e6, "ns_per_request_raw": summarize(raw),
                 "ns_per_request_net": summarize(net), "events_per_request": summarize(evr),
                 "ns_per_event": summarize(nse), "background_pct": summarize(share), "busy": summarize([w["machine_busy_cores"] for w in ws])}
        per_rate[_label(rate)] = entry
        t.add(_label(rate), fmt_summary(entry["achieved_rps"]), fmt_summary(cpu), fmt(entry["rss_mb"]),
              fmt_summary(entry["events_per_request"]), fmt_summary(entry["ns_per_request_raw"]),
              fmt_summary(entry["ns_per_request_net"]), fmt_summary(entry["background_pct"]) + "%", fmt_summary(entry["ns_per_event"]),
              fmt_summary(entry["busy"]))
    res.tables.append(t)
    res.data[f"per_rate{sfx}"] = per_rate

    # Per program at 20k req/s: where the kernel time goes.
    ws20 = [w for w in windows if w["rate"] == 20000 and w["requests"]]
    pt = Table(f"Per BPF program at 20k req/s — {ctx.mode_label(mode)} (all rounds; net of the background measured "
               "before each window)",
               ["object", "program", "runs / request", "ns / run", "ns / request"])
    total_req = sum(w["requests"] for w in ws20) or 1
    objects = program_objects()
    names = sorted({n for w in ws20 for n in w["progs"]}, key=lambda n: (objects.get(n, "?"), n))
    prog_rows: Dict[str, Any] = {}
    by_object: Dict[str, float] = {}
    for n in names:
        ns = cnt = 0.0
        for w in ws20:
            bg, k = w["background"], w["wall_s"] / w["background"]["wall_s"]
            ns += w["progs"].get(n, {}).get("run_time_ns", 0) - k * bg["progs"].get(n, {}).get("run_time_ns", 0)
            cnt += w["progs"].get(n, {}).get("run_cnt", 0) - k * bg["progs"].get(n, {}).get("run_cnt", 0)
        if cnt <= 0.001 * total_req:
            continue
        obj = objects.get(n, "?")
        by_object[obj] = by_object.get(obj, 0.0) + ns / total_req
        prog_rows[n] = {"object": obj, "runs_per_request": cnt / total_req, "ns_per_run": ns / cnt,
                        "ns_per_request": ns / total_req}
        pt.add(obj, n, fmt(cnt / total_req), fmt(ns / cnt), fmt(ns / total_req))
    for obj, ns in sorted(by_object.items()):
        pt.add(obj, "**all**", "", "", f"**{fmt(ns)}**")
    res.tables.append(pt)
    res.data[f"programs_at_20k{sfx}"] = prog_rows
    res.data[f"ns_per_request_by_object_at_20k{sfx}"] = by_object

    rss = max([w["rss_bytes"] for w in windows + idle]) / 1e6
    if not verdicts:
        res.intro += " "
        return
    res.verdicts += [
        verdict("kernel_ns_per_request", per_rate["20k req/s"]["ns_per_request_net"].median,
                f"{ctx.mode_label(mode)}, at 20k req/s, background-subtracted (raw upper bound "
                f"{per_rate['20k req/s']['ns_per_request_raw'].median:,.0f} ns; background "
                f"{per_rate['20k req/s']['background_pct'].median:.0f}% of raw); both ends of each request on this node"),
        verdict("l7_ns_per_request", per_rate["20k req/s"]["ns_per_request_net"].median,
                f"{ctx.mode_label(mode)}, at 20k req/s, background-subtracted; by object: "
                + ", ".join(f"{o} {ns:,.0f} ns" for o, ns in sorted(by_object.items()))),
        verdict("cpu_at_5k", per_rate["5k req/s"]["cpu_pct"].median,
                f"achieved {per_rate['5k req/s']['achieved_rps'].median:,.0f} req/s"),
        verdict("cpu_at_20k", per_rate["20k req/s"]["cpu_pct"].median,
                f"achieved {per_rate['20k req/s']['achieved_rps'].median:,.0f} req/s"),
        verdict("rss", rss, "max over the section (idle and loaded windows)"),
    ]
    res.notes.append("BPF run-time statistics were on during this section only, through BPF_ENABLE_STATS (an fd held "
                     "by the bench; kernel.bpf_stats_enabled is left alone because other sessions toggle it): it adds "
                     "two clock reads per program run, so ns/event is a slight over-estimate.")
    res.notes.append("When the background share is large (other sessions' traffic on the machine), the net figures "
                     "are differences of two noisy numbers: read raw as an upper bound and net as an estimate; "
                     "ns/run per program does not depend on the background and is the robust figure.")
    res.notes.append("Per-program rows with fewer than 0.001 runs per request after subtracting the background are "
                     "left out; the 'all' rows give each BPF object's share of the time per request.")
    res.intro += " "
