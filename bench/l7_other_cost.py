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

from .agentrun import bpf_stats_enabled, prog_delta, prog_stats
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
    return {"rps": r["rps"], "requests": r["requests"], "p99_us": r.get("latency_us", {}).get("99", 0),
            "bpf_ns_per_request": sum(v["run_time_ns"] for v in d.values()) / n, "programs": progs,
            "machine_busy_cores": busy.cores()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--seconds", type=int, default=3)
    a = ap.parse_args()
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
