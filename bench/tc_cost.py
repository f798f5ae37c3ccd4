"""Kernel time of the tc hook per HTTP request: the interface counters (bpf/tc.bpf.c) and the
L7 packet parser (bpf/l7pkt.bpf.c) on the two pod veths of the bench testbed, and nowhere else.

A sibling of bench/l7_cost.py for the tc work of issue 10: instead of a whole agent (which
attaches to every pod veth of the machine, so another session's test traffic lands in its
run counts) it starts the real sources in this process with the link watch off and hands them
only the testbed's two host-side veths. nginx (1 worker, 613-byte responses) in one pod, wrk in
the other, keep-alive, throttled to a fixed rate; BPF run-time stats on (BPF_ENABLE_STATS fd);
requests are nginx's access log (ground truth). With the L7 parser chained behind the counters
(one filter per hook, a tail call) its time is part of the counter program's run: bpf_stats
charges a tail-called program's time to the program the filter runs.

Modes: `tc` (counters alone), `l7` (packet parser alone), `both` (counters + parser chained
as the agent runs them: one filter per hook, a tail call), `both-unchained` (counters +
parser as two filters per hook, as before the chain).

`--baseline-objdir DIR` compares another build (a directory of *.bpf.o, e.g. main's): each
round runs every mode once with DIR's objects and once with this tree's (which goes first
alternates from round to round), and the
summary gives per build and mode the median of the rounds' ns per request and their range.

    python -m bench.tc_cost [--modes tc,both,both-unchained] [--rate 5000] [--seconds 5] [--rounds 3]
        [--baseline-objdir DIR]
"""
from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import Any, Dict, List, Optional

from pyroute2 import IPRoute

from .agentrun import bpf_stats_enabled, prog_delta, prog_stats
from .env import BusyMeter
from .workloads import SMALL, Testbed

MODES = ("tc", "l7", "both", "both-unchained")


class HookSources:
    """The tc and/or packet-L7 sources of this process, attached to the testbed veths only."""

    def __init__(self, mode: str, ifnames: List[str]) -> None:
        from meshlens.agent.kernel.features import KernelFeatures
        from meshlens.agent.sources.tc.link_watch import classify

        self.mode = mode
        self.sources: List[Any] = []
        self._stop = threading.Event()
        self._poller: Optional[threading.Thread] = None
        features = KernelFeatures.probe()
        with IPRoute() as ipr:
            links = [classify(ipr.get_links(ifname=n)[0]) for n in ifnames]
        if any(link is None for link in links):
            raise RuntimeError(f"not pod veths: {ifnames}")
        self.links = links
        self.tc = self.l7 = None
        chain = None
        if mode == "both":
            from meshlens.agent.sources.tc.chain import TcChain

            chain = TcChain()
        if mode in ("l7", "both", "both-unchained"):
            from meshlens.agent.sources.l7.packets import PacketHttpSource

            self.l7 = PacketHttpSource(features=features, watch=False)
            if chain is not None:
                self.l7.use_tc_chain(chain)
            self.sources.append(self.l7)
        if mode in ("tc", "both", "both-unchained"):
            from meshlens.agent.sources.tc.source import TcSource

            self.tc = TcSource(features=features, watch=False, chain=chain)
            self.sources.append(self.tc)

    def start(self) -> "HookSources":
        try:
            for s in self.sources:
                s.start()
                for link in self.links:
                    s.link_up(link)
            self._poller = threading.Thread(target=self._poll, daemon=True)
            self._poller.start()
        except BaseException:
            self.stop()
            raise
        return self

    def _poll(self) -> None:
        rbs = [rb for s in self.sources for rb in s.ring_buffers()]
        while not self._stop.is_set():
            for rb in rbs:
                rb.poll(50)

    def stop(self) -> None:
        self._stop.set()
        if self._poller:
            self._poller.join(5)
        for s in reversed(self.sources):
            s.stop()

    def chained(self) -> bool:
        return bool(self.l7 is not None and getattr(self.l7, "chained", False))


def measure(tb: Testbed, rate: int, seconds: int) -> Dict[str, Any]:
    """One throttled wrk window: per program run count and run time per logged request."""
    import os

    tb.reset_access_log()
    busy = BusyMeter()
    p0 = prog_stats(os.getpid())
    r = tb.http(SMALL, seconds, rate=rate)
    progs = prog_delta(p0, prog_stats(os.getpid()))
    requests = tb.access_log_totals()["requests"]
    rows = []
    for name, d in sorted(progs.items()):
        if not d["run_cnt"] or not name.startswith("meshlens_"):
            continue
        rows.append({"program": name, "run_cnt": d["run_cnt"],
                     "runs_per_request": d["run_cnt"] / requests if requests else 0.0,
                     "ns_per_run": d["run_time_ns"] / d["run_cnt"],
                     "ns_per_request": d["run_time_ns"] / requests if requests else 0.0})
    return {"requests": requests, "wrk_requests": r["requests"], "rps": r["rps"], "rows": rows,
            "ns_per_request": sum(row["ns_per_request"] for row in rows), "machine_busy_cores": busy.cores()}


def run_mode(tb: Testbed, mode: str, rate: int, seconds: int, rounds: int) -> Dict[str, Any]:
    hooks = HookSources(mode, [tb.srv.host_veth, tb.cli.host_veth]).start()
    try:
        tb.http(SMALL, 1, rate=rate)  # warm: connections known, paths learnt
        with bpf_stats_enabled():
            res = [measure(tb, rate, seconds) for _ in range(rounds)]
        return {"mode": mode, "chained": hooks.chained(), "rounds": res}
    finally:
        hooks.stop()


def render(results: List[Dict[str, Any]]) -> str:
    lines = []
    for m in results:
        build = f" [{m['build']}]" if m.get("build") else ""
        lines.append(f"mode {m['mode']}{build}{' (chained: one filter per hook)' if m['chained'] else ''}")
        for i, res in enumerate(m["rounds"]):
            lines.append(f"  round {i + 1}: {res['requests']} requests (access log), {res['rps']:.0f} req/s, "
                         f"machine busy {res['machine_busy_cores']:.2f} cores, "
                         f"{res['ns_per_request']:.0f} ns/request (both veths)")
            for row in res["rows"]:
                lines.append(f"    {row['program']:<16} {row['runs_per_request']:>6.2f} runs/req "
                             f"{row['ns_per_run']:>7.0f} ns/run {row['ns_per_request']:>7.0f} ns/req")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default="tc,both,both-unchained", help=f"comma-separated, of {', '.join(MODES)}")
    ap.add_argument("--rate", type=int, default=5000)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--baseline-objdir", default="", help="another build's *.bpf.o to alternate with")
    a = ap.parse_args()
    modes = [m for m in a.modes.split(",") if m]
    bad = [m for m in modes if m not in MODES]
    if bad:
        ap.error(f"unknown mode(s) {bad}; choose from {MODES}")
    if a.baseline_objdir:
        results = compare(modes, a)
    else:
        with Testbed() as tb:
            results = [run_mode(tb, m, a.rate, a.seconds, a.rounds) for m in modes]
    print(render(results))
    if a.baseline_objdir:
        print(summary(results))
    print(json.dumps({"rate": a.rate, "seconds": a.seconds, "results": results}))
    return 0


def compare(modes: List[str], a: argparse.Namespace) -> List[Dict[str, Any]]:
    """Rounds alternating between the baseline objects and this tree's, one window each."""
    from pathlib import Path

    from meshlens.agent.kernel import bpf

    ours = bpf.OBJ_DIR
    builds = (("baseline", Path(a.baseline_objdir)), ("this", ours))
    results: List[Dict[str, Any]] = []
    try:
        with Testbed() as tb:
            for i in range(a.rounds):
                for label, objdir in (builds if i % 2 == 0 else builds[::-1]):   # ABBA: no order bias
                    bpf.OBJ_DIR = objdir
                    for m in modes:
                        res = run_mode(tb, m, a.rate, a.seconds, 1)
                        res["build"] = label
                        results.append(res)
    finally:
        bpf.OBJ_DIR = ours
    return results


def summary(results: List[Dict[str, Any]]) -> str:
    import statistics

    per: Dict[tuple, List[float]] = {}
    for m in results:
        for res in m["rounds"]:
            per.setdefault((m["mode"], m.get("build", "")), []).append(res["ns_per_request"])
    lines = ["summary: ns per request (both veths), median of rounds (range)"]
    for (mode, build), v in sorted(per.items()):
        lines.append(f"  {mode:<16} {build:<9} {statistics.median(v):>7.0f} ({min(v):.0f}-{max(v):.0f}), {len(v)} rounds")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
