"""Section 3, capacity: the highest request rate and connection rate at which the agent
loses no event (meshlens_agent_events_lost_total stays put) and its counts stay exact.

Steps climb a ladder of offered rates up to saturation, with one agent (the full mode)
watching; each step is checked against ground truth (bench/truth.py). The capacity is the
highest achieved rate of a clean step with every lower step clean as well.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional

from .agentrun import BenchAgent
from .context import Context
from .report import SectionResult, Table, fmt
from .targets import verdict
from .truth import http_step
from .workloads import SMALL

REQUEST_RATES: List[Optional[int]] = [5000, 10000, 20000, None]
CONNECTION_RATES: List[Optional[int]] = [1000, 2000, 5000, None]


def _ladder(ctx: Context, agent: BenchAgent, rates: List[Optional[int]], close: bool) -> List[Dict[str, Any]]:
    steps = []
    for rate in rates:
        if rate is None:
            step = http_step(agent, ctx.testbed, SMALL, ctx.seconds, close=close)
        else:
            plan = ctx.plan(rate, close)
            step = http_step(agent, ctx.testbed, SMALL, ctx.seconds, connections=plan["connections"],
                             delay_ms=plan["delay_ms"], close=close)
        step["offered"] = rate
        steps.append(step)
    return steps


def _capacity(steps: List[Dict[str, Any]]) -> Optional[float]:
    best = None
    for s in steps:
        if not s["exact"]:
            break
        best = max(best or 0.0, s["wrk"]["rps"])
    return best


def _table(title: str, unit: str, steps: List[Dict[str, Any]]) -> Table:
    t = Table(title, ["offered", f"achieved {unit}", "events lost (source/reason)", "exact", "worst error", "mismatches"])
    for s in steps:
        bad = [f"{k}: {e.absolute:+,.0f} ({e.percent:+.3f}%)" if e.percent is not None else f"{k}: {e.absolute:+,.0f}"
               for k, e in s["checks"].items() if not e.exact]
        t.add("saturation" if s["offered"] is None else f"{s['offered']:,}", fmt(s["wrk"]["rps"]),
              fmt(s["lost"]) + (" (" + ", ".join(f"{k} {v:,.0f}" for k, v in s["lost_by"].items()) + ")" if s["lost_by"] else ""),
              "yes" if s["exact"] else "**no**", f"{s['worst_pct']:.3f}%", "; ".join(bad) or "—")
    return t


def run(ctx: Context) -> SectionResult:
    res = SectionResult("capacity", "3. Capacity (no loss, exact counts)")
    req_rates = [20000, None] if ctx.quick else REQUEST_RATES
    conn_rates = [2000, None] if ctx.quick else CONNECTION_RATES
    agent = BenchAgent(ctx.full_mode).start()
    ctx.remember_attach(ctx.full_mode, agent.attached)
    try:
        req = _ladder(ctx, agent, req_rates, close=False)
        conn = _ladder(ctx, agent, conn_rates, close=True)
    finally:
        agent.stop()
    res.intro = (f"Agent: {ctx.mode_label(ctx.full_mode)}. {ctx.seconds} s per step, nginx {SMALL} B. Checked per step: "
                 "connections opened/closed vs the kernel's ActiveOpens/PassiveOpens of each pod, client bytes "
                 "received vs wrk, server bytes sent/received vs nginx's access log (bytes_sent, request_length), "
                 "HTTP request counts vs the access log and wrk (when the HTTP source is loaded).")
    res.tables += [_table("Keep-alive requests", "req/s", req), _table("New connection per request", "conn/s", conn)]
    cap_req, cap_conn = _capacity(req), _capacity(conn)
    res.data.update(requests=req, connections=conn, capacity_rps=cap_req, capacity_conn_per_s=cap_conn)
    sat_note = lambda c, steps: ("(every step clean, including saturation: the limit is the machine, not the agent)"  # noqa: E731
                                 if c is not None and all(s["exact"] for s in steps) else "")
    res.notes.append(f"request capacity: {fmt(cap_req) if cap_req else 'below the first step'} req/s {sat_note(cap_req, req)}")
    res.notes.append(f"connection capacity: {fmt(cap_conn) if cap_conn else 'below the first step'} conn/s "
                     f"{sat_note(cap_conn, conn)}")
    at20 = next((s for s in req if s["offered"] == 20000), None)
    if at20:
        ach = f"achieved {at20['wrk']['rps']:,.0f} req/s"
        res.verdicts.append(verdict("lost_at_20k", at20["lost"], ach))
        res.verdicts.append(verdict("count_error_at_20k", at20["worst_pct"], ach + "; largest error over all checks"))
    return res
