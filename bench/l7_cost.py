"""Kernel time of the L7 packet path per HTTP request, per BPF program: one focused run.

A smaller sibling of agent_cost.py for iterating on bpf/l7pkt.bpf.c without `make bench`:
the bench testbed (nginx, 1 worker, 613-byte responses, in one pod; wrk in another, both
pods on this node, so every request crosses two pod veths and is observed on both sides),
one agent in a bench mode, BPF run-time stats on (BPF_ENABLE_STATS fd), wrk throttled to a
fixed rate with keep-alive connections. Requests are nginx's access log (ground truth), not
wrk's count. Prints one table (program, object, runs/request, ns/run, ns/request) and a JSON
line with the same figures.

    python -m bench.l7_cost [--mode packets|full] [--rate 5000] [--seconds 5] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Dict, List

from .agentrun import BenchAgent, bpf_stats_enabled, prog_delta, prog_stats, program_objects
from .env import BusyMeter, round_context
from .workloads import SMALL, Testbed


def measure(tb: Testbed, agent: BenchAgent, rate: int, seconds: int) -> Dict[str, Any]:
    """One throttled wrk window: per program run count and run time per logged request."""
    tb.reset_access_log()
    busy = BusyMeter()
    p0 = prog_stats(agent.pid)
    r = tb.http(SMALL, seconds, rate=rate)
    progs = prog_delta(p0, prog_stats(agent.pid))
    requests = tb.access_log_totals()["requests"]
    objs = program_objects()
    rows = []
    for name, d in sorted(progs.items()):
        if not d["run_cnt"]:
            continue
        rows.append({"program": name, "object": objs.get(name, "?"), "run_cnt": d["run_cnt"],
                     "runs_per_request": d["run_cnt"] / requests if requests else 0.0,
                     "ns_per_run": d["run_time_ns"] / d["run_cnt"],
                     "ns_per_request": d["run_time_ns"] / requests if requests else 0.0})
    return {"requests": requests, "wrk_requests": r["requests"], "rps": r["rps"], "rows": rows,
            "machine_busy_cores": busy.cores(), "context": round_context([agent.pid])}


def render(rounds: List[Dict[str, Any]]) -> str:
    lines = []
    for i, res in enumerate(rounds):
        lines.append(f"round {i + 1}: {res['requests']} requests (access log), {res['rps']:.0f} req/s, "
                     f"machine busy {res['machine_busy_cores']:.2f} cores")
        lines.append(f"  {'program':<18} {'object':<10} {'runs/req':>9} {'ns/run':>8} {'ns/req':>8}")
        by_obj: Dict[str, float] = {}
        for row in res["rows"]:
            lines.append(f"  {row['program']:<18} {row['object']:<10} {row['runs_per_request']:>9.2f} "
                         f"{row['ns_per_run']:>8.0f} {row['ns_per_request']:>8.0f}")
            by_obj[row["object"]] = by_obj.get(row["object"], 0.0) + row["ns_per_request"]
        lines.append("  ns/request by object: " + ", ".join(f"{o} {v:.0f}" for o, v in sorted(by_obj.items())))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", default="packets", choices=("packets", "full"))
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    rounds = []
    with Testbed() as tb:
        agent = BenchAgent(a.mode).start()
        try:
            tb.http(SMALL, 1, rate=a.rate)  # warm: connections known, paths learnt
            with bpf_stats_enabled():
                for _ in range(a.rounds):
                    rounds.append(measure(tb, agent, a.rate, a.seconds))
        finally:
            agent.stop()
    print(render(rounds))
    print(json.dumps({"mode": a.mode, "rate": a.rate, "seconds": a.seconds, "rounds": rounds}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
