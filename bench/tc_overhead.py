"""Cost of the tc programs (bpf/tc.bpf.c): iperf3 throughput between two pods with and
without them, in the same run.

    python -m bench.tc_overhead [--rounds 5] [--seconds 3] [--out bench/tc_overhead.json]

Two netns pods on a bridge (tests/integration/pods.py), an iperf3 server in one. The tc
programs are loaded once; each round either attaches them (ingress + egress on both pods'
host-side veths, plus the skb:kfree_skb drop program, exactly what the agent attaches) or
runs bare. Rounds alternate (bare, tc, bare, tc, ...) so drift hits both equally; the result
is the median of each side and the median of the per-pair ratios. Two workloads: bulk TCP
(GSO: few, large skbs) and TCP with 1 KiB writes and TCP_NODELAY (many small skbs, the
per-packet worst case). Other tc filters found on the bench veths (another agent running on
this machine) are recorded, since they would add cost to both sides.

Writes bench/tc_overhead.json and prints a summary. Needs root.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

from meshlens.agent.kernel import bpf
from meshlens.agent.sources.tc.attach import TcAttacher
from tests.integration.pods import Node, Pod
from tests.integration.servers import Iperf3Server, run_iperf3

OUT = Path(__file__).resolve().parent / "tc_overhead.json"
WORKLOADS = {
    "tcp_bulk": [],
    "tcp_1k_nodelay": ["-l", "1024", "-N"],
}


def foreign_filters(ifname: str) -> List[str]:
    """tc filters on ifname that are not this benchmark's (e.g. another agent's)."""
    out = []
    for hook in ("ingress", "egress"):
        text = subprocess.run(["tc", "filter", "show", "dev", ifname, hook], capture_output=True, text=True).stdout
        out += [f"{hook}: {ln.strip()}" for ln in text.splitlines()
                if "handle" in ln and f" handle {os.getpid():#x} " not in ln]
    return out


class TcPrograms:
    """The tc object loaded once; attach()/detach() per round."""

    def __init__(self, pods: List[Pod]) -> None:
        self.obj = bpf.BpfObject(bpf.object_path("tc"))
        self.obj.load()
        self.attacher = TcAttacher({"ingress": self.obj.program("meshlens_tc_in").fd,
                                    "egress": self.obj.program("meshlens_tc_eg").fd})
        self.pods = pods
        self._index = {}
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            for p in pods:
                self._index[p.host_veth] = ipr.link_lookup(ifname=p.host_veth)[0]

    def attach(self) -> None:
        for p in self.pods:
            self.attacher.attach(self._index[p.host_veth], p.host_veth)
        self.obj.attach("handle_tc_kfree_skb")

    def detach(self) -> None:
        self.attacher.detach_all()
        self.obj.detach_all()

    def packets(self) -> int:
        return self.obj.map("counters").percpu_u64_sums()[0]

    def close(self) -> None:
        self.detach()
        self.obj.close()


def per_run_ns(repeat: int = 200_000) -> Dict[str, float]:
    """Mean run time of one program invocation (BPF_PROG_TEST_RUN, `repeat` runs in the
    kernel, no scheduling noise) on typical frames: the per-skb cost the throughput rounds
    cannot resolve on a busy 2-core machine. A test run cannot set the skb's classid, so
    these runs count through the no-slot fallback (the `ifstats` hash): an upper bound of the
    slotted path real veths take (bench/tc_cost.py measures that one)."""
    from tests.integration import tc_packets as pk

    frames = {
        "ipv4_tcp_ack_1448": pk.tcp4(flags=pk.ACK, payload=b"x" * 1448).data,
        "ipv6_tcp_ack_1428": pk.tcp6(flags=pk.ACK, payload=b"x" * 1428).data,
        "ipv6_3_ext_headers_tcp": pk.tcp6(flags=pk.ACK, exts=[(pk.HOP, {}), (pk.DSTOPTS, {}), (pk.FRAGMENT, {})]).data,
        "qinq_ipv4_tcp": pk.tcp4(flags=pk.ACK, vlans=[(pk.ETH_P_8021AD, 1), (pk.ETH_P_8021Q, 2)]).data,
        "ipv4_udp_1000": pk.udp4(1000).data,
        "ipv4_tcp_syn": pk.tcp4(flags=pk.SYN).data,
    }
    obj = bpf.BpfObject(bpf.object_path("tc"))
    obj.program("handle_tc_kfree_skb").autoload = False
    obj.load()
    try:
        prog = obj.program("meshlens_tc_in")
        out = {}
        for name, data in frames.items():
            runs = [prog.test_run(data, repeat=repeat)[2] for _ in range(5)]
            out[name] = float(statistics.median(runs))
        return out
    finally:
        obj.close()


def run(rounds: int, seconds: float) -> Dict[str, Any]:
    node = Node()
    try:
        srv, cli = node.add_pod("tcb-srv"), node.add_pod("tcb-cli")
        progs = TcPrograms([srv, cli])
        try:
            with Iperf3Server(srv, port=5299):
                run_iperf3(cli, srv.ipv4, 5299, seconds=1)  # warm-up, not measured
                results: Dict[str, Any] = {}
                for name, extra in WORKLOADS.items():
                    bare: List[float] = []
                    with_tc: List[float] = []
                    packets_seen = 0
                    foreign = set()
                    for i in range(2 * rounds):
                        tc_on = i % 2 == 1
                        if tc_on:
                            progs.attach()
                            p0 = progs.packets()
                        for pod in (srv, cli):
                            foreign.update(foreign_filters(pod.host_veth))
                        r = run_iperf3(cli, srv.ipv4, 5299, seconds=seconds, extra_args=extra)
                        bps = r["received_bytes"] * 8 / r["seconds"]
                        if tc_on:
                            packets_seen += progs.packets() - p0
                            progs.detach()
                            with_tc.append(bps)
                        else:
                            bare.append(bps)
                        print(f"  {name} round {i + 1}/{2 * rounds} {'tc  ' if tc_on else 'bare'} {bps / 1e9:7.3f} Gbit/s",
                              flush=True)
                    ratios = [w / b for b, w in zip(bare, with_tc)]
                    med_bare, med_tc = statistics.median(bare), statistics.median(with_tc)
                    results[name] = {
                        "iperf3_args": extra,
                        "bare_bits_per_second": bare,
                        "tc_bits_per_second": with_tc,
                        "median_bare_bits_per_second": med_bare,
                        "median_tc_bits_per_second": med_tc,
                        "overhead_percent_of_medians": 100.0 * (med_bare - med_tc) / med_bare,
                        "median_paired_ratio": statistics.median(ratios),
                        "overhead_percent_paired": 100.0 * (1 - statistics.median(ratios)),
                        "skbs_seen_by_tc_per_round": packets_seen / rounds,
                        "foreign_tc_filters_on_bench_veths": sorted(foreign),
                    }
        finally:
            progs.close()
    finally:
        node.close()
    per_run = per_run_ns()
    for r in results.values():
        # CPU the programs used per round, from the skbs they saw and the per-run cost of a
        # TCP data segment: a bound the throughput noise on this machine cannot give.
        r["estimated_tc_cpu_seconds_per_round"] = r["skbs_seen_by_tc_per_round"] * per_run["ipv4_tcp_ack_1448"] / 1e9
        r["estimated_tc_cpu_percent_of_one_core"] = 100.0 * r["estimated_tc_cpu_seconds_per_round"] / seconds
    return {
        "per_program_run_ns": per_run,
        "load_average_at_end": os.getloadavg()[0],
        "what": "iperf3 throughput between two pods, tc programs (ingress+egress on both host veths, "
                "plus skb:kfree_skb) attached vs not, alternating rounds",
        "rounds_per_side": rounds,
        "seconds_per_round": seconds,
        "kernel": platform.release(),
        "cpus": os.cpu_count(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "workloads": results,
    }


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.tc_overhead", description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5, help="rounds per side (default %(default)s)")
    p.add_argument("--seconds", type=float, default=3.0, help="iperf3 seconds per round (default %(default)s)")
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if os.geteuid() != 0:
        print("bench.tc_overhead needs root (netns, veths, BPF)", file=sys.stderr)
        return 2
    report = run(args.rounds, args.seconds)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, r in report["workloads"].items():
        print(f"{name}: bare {r['median_bare_bits_per_second'] / 1e9:.3f} Gbit/s, "
              f"tc {r['median_tc_bits_per_second'] / 1e9:.3f} Gbit/s, "
              f"overhead {r['overhead_percent_of_medians']:.2f}% (medians), "
              f"{r['overhead_percent_paired']:.2f}% (paired); "
              f"{r['skbs_seen_by_tc_per_round']:.0f} skbs/round seen; "
              f"foreign filters: {len(r['foreign_tc_filters_on_bench_veths'])}; "
              f"est. tc CPU {r['estimated_tc_cpu_percent_of_one_core']:.2f}% of a core")
    for name, ns in report["per_program_run_ns"].items():
        print(f"  one program run, {name}: {ns:.0f} ns")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
