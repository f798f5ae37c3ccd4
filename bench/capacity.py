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
from .stats import Error
from .truth import http_step, worst_pct
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


def _excused(name: str, err: Error, log: Dict[str, int]) -> bool:
    """A server-side mismatch that equals exactly the responses nginx logged as cut short
    (wrk stopped mid-response): nginx's log and the agent disagree about those only."""
    if name.startswith("bytes sent, server"):
        return err.absolute == -log.get("short_bytes_sent", 0)
    if name.startswith("HTTP requests, server"):
        return err.absolute == -log.get("short_responses", 0)
    return False


def _clean(step: Dict[str, Any], l4_only: bool, excuse_short: bool = False) -> bool:
    """No event lost and every check exact (only the TCP checks when l4_only; with
    excuse_short, mismatches equal to the log's cut-short responses are accepted)."""
    checks = {k: e for k, e in step["checks"].items() if not (l4_only and k.startswith("HTTP"))}
    lost = sum(v for k, v in step["lost_by"].items() if not (l4_only and not k.startswith("tcp/")))
    return lost == 0 and all(e.exact or (excuse_short and _excused(k, e, step["log"])) for k, e in checks.items())


def _capacity(steps: List[Dict[str, Any]], l4_only: bool = False, excuse_short: bool = False) -> Optional[float]:
    """Highest achieved rate with this and every lower step clean."""
    best = None
    for s in steps:
        if not _clean(s, l4_only, excuse_short):
            break
        best = max(best or 0.0, s["wrk"]["rps"])
    return best


def _records_per_1k(step: Dict[str, Any]) -> float:
    """Ring-buffer records the agent read per 1,000 requests wrk completed in the step."""
    reqs = step["wrk"].get("requests") or 0
    return 1000.0 * step["delta"].get("read", 0.0) / reqs if reqs else float("nan")


def _lost_at_50k(req: List[Dict[str, Any]]) -> Any:
    """The issue's 0-lost-at-50k target: evaluated on a step that reached 50k req/s; on a
    testbed that saturates below, not evaluated, with what the highest step showed."""
    reached = [s for s in req if s["wrk"]["rps"] >= 50000]
    if reached:
        s = reached[0]
        return verdict("lost_at_50k", s["lost"], f"achieved {s['wrk']['rps']:,.0f} req/s")
    top = max(req, key=lambda s: s["wrk"]["rps"])
    return verdict("lost_at_50k", None,
                   f"this testbed saturates at {top['wrk']['rps']:,.0f} req/s with the agent (nginx 1 worker, wrk 1 "
                   f"thread, 2 CPUs); there: {top['lost']:,.0f} events lost, "
                   f"{_records_per_1k(top):.2f} ring-buffer records per 1k requests")


def _table(title: str, unit: str, steps: List[Dict[str, Any]]) -> Table:
    t = Table(title, ["offered", f"achieved {unit}", "events lost (source/reason)", "ring-buffer records / 1k requests",
                      "exact", "worst error", "mismatches"])
    for s in steps:
        bad = [f"{k}: {e.absolute:+,.0f} ({e.percent:+.3f}%)" if e.percent is not None else f"{k}: {e.absolute:+,.0f}"
               for k, e in s["checks"].items() if not e.exact]
        t.add("saturation" if s["offered"] is None else f"{s['offered']:,}", fmt(s["wrk"]["rps"]),
              fmt(s["lost"]) + (" (" + ", ".join(f"{k} {v:,.0f}" for k, v in s["lost_by"].items()) + ")" if s["lost_by"] else ""),
              fmt(_records_per_1k(s)), "yes" if s["exact"] else "**no**", f"{s['worst_pct']:.3f}%", "; ".join(bad) or "—")
        if s["log"].get("short_responses"):
            t.rows[-1][-1] += (f" (the access log holds {s['log']['short_responses']} responses cut short, "
                               f"{s['log']['short_bytes_sent']:,} bytes_sent)")
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
    caps = {}
    ct = Table("Capacity", ["load", "all sources (TCP + HTTP counts, any loss)", "TCP only (tcp counts, tcp losses)",
                            "all sources, cut-short responses excused", "TCP only, cut-short responses excused"])
    for label, unit, steps in (("keep-alive requests", "req/s", req), ("new connection per request", "conn/s", conn)):
        row = []
        for excuse, l4 in ((False, False), (False, True), (True, False), (True, True)):
            c = _capacity(steps, l4, excuse)
            caps[f"{label}{' tcp' if l4 else ''}{' excused' if excuse else ''}"] = c
            allclean = all(_clean(s, l4, excuse) for s in steps)
            row.append("below the first step" if c is None else
                       f"≥ {fmt(c)} {unit} (saturation clean: the machine is the limit)" if allclean else f"{fmt(c)} {unit}")
        ct.add(label, *row)
    res.tables.append(ct)
    res.notes.append("'Cut-short responses': when wrk stops, nginx logs the responses it was writing with their header "
                     "bytes in bytes_sent (body 0); the agent counts neither those bytes nor those requests on the "
                     "server side, while its client side matches wrk exactly. Which side is right is not settled "
                     "here; the 'excused' columns accept a mismatch only when it equals those log entries exactly.")
    res.data.update(requests=req, connections=conn, capacity=caps)
    at20 = next((s for s in req if s["offered"] == 20000), None)
    if at20:
        ach = f"achieved {at20['wrk']['rps']:,.0f} req/s"
        res.verdicts.append(verdict("lost_at_20k", at20["lost"], ach))
        tcp_worst = worst_pct({k: e for k, e in at20["checks"].items() if not k.startswith("HTTP")})
        res.verdicts.append(verdict("count_error_at_20k", at20["worst_pct"],
                                    f"{ach}; largest error over all checks (TCP checks alone: {tcp_worst:.3f}%)"))
    if req:
        res.verdicts.append(_lost_at_50k(req))
    return res
