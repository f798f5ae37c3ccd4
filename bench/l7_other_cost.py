"""L7 for traffic no pod veth carries: cost of the syscall path against cgroup_skb, measured.

The bench testbed (nginx, 1 worker, 613-byte responses, in a server pod; a client pod), wrk at
saturation (1 thread, 32 keep-alive connections), two workloads:

- loopback: wrk inside the server pod against 127.0.0.1 — never crosses a veth, so only the
  "other traffic" path can see it (the same code path as loopback in the host netns);
- pod: wrk in the client pod against the server pod over both veths — pod traffic, which the
  tc packet path parses and the cgroup_skb path must skip (both pods registered as covered).

Per round, in alternating order, each mode attaches only its own L7 object: `base` (nothing),
`syscalls` (bpf/l7.bpf.c on the syscalls:* tracepoints), `cgroup_skb` (bpf/l7cg.bpf.c on the
cgroup v2 root). Throughput is wrk's; BPF run time per request is kernel.bpf_stats (run_time_ns
/ run_cnt of this process's programs) over wrk's requests. Prints a table and a JSON line.

    python -m bench.l7_other_cost [--rounds 5] [--seconds 3]

With --agents, the whole agent instead (`meshlens run` as shipped, whose `auto` is now tc +
cgroup_skb, against `--l7-source packets` and no agent), pod workload only: the bench's
"full agent vs packets" line, which `auto` paid the syscalls:* floor in before.

    python -m bench.l7_other_cost --agents [--rounds 5] [--seconds 5]

The run docs/l7.md quotes is in bench/l7_other_cost.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

from meshlens.agent.kernel.features import KernelFeatures
from meshlens.agent.sources.l7.cgroup import CgroupHttpSource
from meshlens.agent.sources.l7.http import HttpSource
from tests.integration.servers import run_wrk

from .agentrun import BenchAgent, bpf_stats_enabled, prog_delta, prog_stats
from .env import BusyMeter
from .stats import ratio, summarize
from .workloads import HTTP_PORT, SATURATION_CONNS, SMALL, Testbed

MODES = ("base", "syscalls", "cgroup_skb")


def start_mode(mode: str, tb: Testbed, features: KernelFeatures) -> Optional[HttpSource]:
    if mode == "base":
        return None
    src: HttpSource = HttpSource(features=features) if mode == "syscalls" else CgroupHttpSource(features=features)
    for pod in (tb.srv, tb.cli):
        src.cover_netns(pod.netns_inode, True)   # pod traffic is the tc path's: skipped
    src.start()
    return src


def window(tb: Testbed, workload: str, seconds: int) -> Dict[str, Any]:
    if workload == "loopback":
        pod, url = tb.srv, f"http://127.0.0.1:{HTTP_PORT}/bytes/{SMALL}"
    else:
        pod, url = tb.cli, tb.url(SMALL)
    busy = BusyMeter()
    p0 = prog_stats(os.getpid())
    r = run_wrk(pod, url, SATURATION_CONNS, seconds, threads=1)
    d = prog_delta(p0, prog_stats(os.getpid()))
    n = r["requests"] or 1
    progs = {name: {"runs_per_request": v["run_cnt"] / n,
                    "ns_per_run": v["run_time_ns"] / v["run_cnt"] if v["run_cnt"] else 0.0}
             for name, v in d.items() if v["run_cnt"]}
    return {"rps": r["rps"], "requests": r["requests"], "p99_us": r["latency_us"]["p99"],
            "bpf_ns_per_request": sum(v["run_time_ns"] for v in d.values()) / n, "programs": progs,
            "machine_busy_cores": busy.cores()}


AGENT_MODES = ("base", "packets", "full")


def agents_main(rounds: int, seconds: int) -> int:
    """Whole agents on pod traffic: throughput and p99 per mode, rounds alternating."""
    res: Dict[str, List[Dict[str, Any]]] = {m: [] for m in AGENT_MODES}
    with Testbed() as tb:
        tb.http(SMALL, 1)   # warm
        for i in range(rounds):
            for mode in (AGENT_MODES if i % 2 == 0 else tuple(reversed(AGENT_MODES))):
                agent = BenchAgent(mode).start() if mode != "base" else None
                try:
                    r = tb.http(SMALL, seconds)
                    res[mode].append({"rps": r["rps"], "p99_us": r["latency_us"]["p99"],
                                      "attached": agent.attached if agent else []})
                finally:
                    if agent:
                        agent.stop()
    base = [r["rps"] for r in res["base"]]
    summary = {}
    for m, rs in res.items():
        rps = summarize([r["rps"] for r in rs])
        pct = summarize([ratio(r["rps"], b) * 100 for r, b in zip(rs, base)])
        summary[m] = {"rps": rps.as_dict(), "pct_of_base": pct.as_dict()}
        print(f"pod keep-alive  {m:<8} {rps.median:>8.0f} req/s [{rps.min:.0f}-{rps.max:.0f}]  "
              f"paired {pct.median:.1f}% [{pct.min:.1f}-{pct.max:.1f}]")
    print(json.dumps({"rounds": rounds, "seconds": seconds, "results": res, "summary": summary}))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--agents", action="store_true", help="whole agents: shipped (auto) vs --l7-source packets")
    a = ap.parse_args()
    if a.agents:
        return agents_main(a.rounds, a.seconds)
    features = KernelFeatures.probe()
    res: Dict[str, Dict[str, List[Dict[str, Any]]]] = {w: {m: [] for m in MODES} for w in ("loopback", "pod")}
    with Testbed() as tb, bpf_stats_enabled():
        run_wrk(tb.cli, tb.url(SMALL), SATURATION_CONNS, 1)   # warm
        for i in range(a.rounds):
            order = MODES if i % 2 == 0 else tuple(reversed(MODES))
            for mode in order:
                src = start_mode(mode, tb, features)
                try:
                    for w in res:
                        res[w][mode].append(window(tb, w, a.seconds))
                finally:
                    if src:
                        src.stop()
    out: Dict[str, Any] = {"rounds": a.rounds, "seconds": a.seconds, "results": res, "summary": {}}
    print(f"{'workload':<9} {'mode':<11} {'req/s median [min-max]':>28} {'% of base':>10} {'BPF ns/req':>11}")
    for w, modes in res.items():
        base = [r["rps"] for r in modes["base"]]
        for m, rounds in modes.items():
            rps = summarize([r["rps"] for r in rounds])
            pct = [ratio(r["rps"], b) * 100 for r, b in zip(rounds, base)]
            ns = summarize([r["bpf_ns_per_request"] for r in rounds])
            p = summarize(pct)
            out["summary"][f"{w}/{m}"] = {"rps": rps.as_dict(), "pct_of_base": p.as_dict(), "bpf_ns_per_request": ns.as_dict()}
            print(f"{w:<9} {m:<11} {rps.median:>10.0f} [{rps.min:.0f}-{rps.max:.0f}] "
                  f"{p.median:>8.1f}% [{p.min:.1f}-{p.max:.1f}] {ns.median:>8.0f}")
        for m in MODES[1:]:
            for prog, v in (modes[m][-1]["programs"] or {}).items():
                print(f"    {m:<11} {prog:<16} {v['runs_per_request']:.2f} runs/req {v['ns_per_run']:.0f} ns/run")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
