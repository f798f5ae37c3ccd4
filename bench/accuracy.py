"""Section 4, accuracy: every number the agent exports for the bench workloads, next to its
ground truth, with the absolute and relative error.

Truths: the kernel's per-netns ActiveOpens/PassiveOpens (connections), wrk's report (bytes
read, requests, latency percentiles), nginx's access log (requests, bytes_sent,
request_length) and iperf3's JSON (bytes sent/received). Latency percentiles of the agent
come from its histogram buckets (Prometheus' histogram_quantile interpolation), so their
resolution is the bucket width; wrk measures at the client, the server histogram at the
server (first request byte read to first response byte written), so some gap is expected.
"""
from __future__ import annotations

from typing import Any, Dict, List

from .agentrun import BenchAgent
from .context import Context
from .report import SectionResult, Table, fmt
from .stats import Error
from .truth import http_step, intervals, quantiles, quiesce, settle
from .workloads import IPERF_PORT, MEDIUM, SMALL

IPERF_BYTES = 64 * 2**20


def _iperf_step(ctx: Context, agent: BenchAgent) -> Dict[str, Any]:
    tb = ctx.testbed
    before = quiesce(agent, tb, IPERF_PORT)
    o0 = tb.opens()
    r = tb.iperf3_bytes(IPERF_BYTES)
    opens = tb.opens()["active"] - o0["active"]
    d = settle(agent, tb, before, opens, IPERF_PORT)
    checks = {
        "bytes sent, client (vs iperf3 sent)": Error(d["cli_sent"], r["sent_bytes"]),
        "bytes received, server (vs iperf3 received)": Error(d["srv_received"], r["received_bytes"]),
        "connections opened, client (vs kernel ActiveOpens)": Error(d["cli_opened"], opens),
    }
    return {"iperf3": r, "delta": d, "checks": checks, "lost": d["lost"]}


def _latency_rows(step: Dict[str, Any]) -> List[List[str]]:
    """Agent quantile (interpolated) vs wrk's, plus the bucket that holds the agent's rank:
    with histogram buckets that is all the agent can know about a percentile."""
    d, wrk = step["delta"], step["wrk"]
    rows = []
    for role, key in (("server", "srv_http_buckets"), ("client", "cli_http_buckets")):
        if not d.get(key) or not sum(d[key].values()):
            continue
        qs = quantiles(d[key])
        ivs = intervals(d[key])
        for (q, theirs), ours, (lo, hi) in zip((("p50", wrk["latency_us"]["p50"]), ("p99", wrk["latency_us"]["p99"])),
                                                 qs, ivs):
            e = Error(ours * 1e6, float(theirs))
            inside = lo * 1e6 <= e.truth <= hi * 1e6
            rows.append([f"HTTP {role} latency {q}, µs (vs wrk {q}); bucket ({lo * 1e3:g}, {hi * 1e3:g}] ms "
                         f"{'holds' if inside else 'does not hold'} wrk's value", fmt(e.measured), fmt(e.truth),
                         f"{e.absolute:+,.0f}", f"{e.percent:+.1f}%" if e.percent is not None else "n/a"])
    return rows


def run(ctx: Context) -> SectionResult:
    res = SectionResult("accuracy", "4. Accuracy against ground truth")
    agent = BenchAgent(ctx.full_mode).start()
    ctx.remember_attach(ctx.full_mode, agent.attached)
    steps: Dict[str, Dict[str, Any]] = {}
    try:
        p5k, p2k, c1k = ctx.plan(5000), ctx.plan(2000), ctx.plan(1000, close=True)
        steps[f"HTTP {SMALL} B keep-alive, ~5k req/s"] = http_step(
            agent, ctx.testbed, SMALL, ctx.seconds, connections=p5k["connections"], delay_ms=p5k["delay_ms"])
        steps[f"HTTP {MEDIUM} B keep-alive, ~2k req/s"] = http_step(
            agent, ctx.testbed, MEDIUM, ctx.seconds, connections=p2k["connections"], delay_ms=p2k["delay_ms"])
        steps[f"HTTP {SMALL} B, new connection per request, ~1k conn/s"] = http_step(
            agent, ctx.testbed, SMALL, ctx.seconds, connections=c1k["connections"], delay_ms=c1k["delay_ms"], close=True)
        steps[f"iperf3 -n {IPERF_BYTES // 2**20} MiB"] = _iperf_step(ctx, agent)
    finally:
        agent.stop()
    res.intro = f"Agent: {ctx.mode_label(ctx.full_mode)}, one instance for all workloads below ({ctx.seconds} s each)."
    t = Table("Errors", ["workload", "quantity (vs truth)", "meshlens", "truth", "abs error", "% error"])
    for wl, step in steps.items():
        for name, e in step["checks"].items():
            t.add(wl, name, fmt(e.measured), fmt(e.truth), f"{e.absolute:+,.0f}",
                  f"{e.percent:+.3f}%" if e.percent is not None else "n/a")
        if "wrk" in step:
            for row in _latency_rows(step):
                t.add(wl, *row)
        t.add(wl, "events lost during the step", fmt(step["lost"]), "0", f"{step['lost']:+,.0f}", "")
    res.tables.append(t)
    if not any(s["delta"].get("http_families") for s in steps.values()):
        res.notes.append("the agent exported no http_server_* families: request counts and latency are not compared.")
    res.notes.append("iperf3: the agent's series for the client → server:5201 edge also holds iperf3's control "
                     "connection (same peer and port), so its bytes are data + a few hundred control bytes.")
    res.notes.append("HTTP latency histograms use the OpenTelemetry default bounds (first bucket ≤ 5 ms): requests "
                     "faster than 5 ms all land in the first bucket, so percentiles below 5 ms read as an interpolated "
                     "2.5 ms whatever the real value; the bucket column says whether wrk's value is at least in the "
                     "agent's bucket.")
    res.data["steps"] = steps
    return res
