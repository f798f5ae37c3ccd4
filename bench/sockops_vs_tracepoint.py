"""Is sockops (BPF_PROG_TYPE_SOCK_OPS on the cgroup v2 root) cheaper than the state
tracepoint for L4? Measured, not assumed.

    python -m bench.sockops_vs_tracepoint [--rounds 5] [--conns 3001] [--out bench/sockops_vs_tracepoint.json]

Two equivalent candidates, compiled here with the build's clang, each doing what the L4 state
path needs and nothing more: remember a connection at establishment (a hash map entry), and
at close read bytes_acked / bytes_received / total_retrans / srtt and add them atomically to a
rollup. `sockops` does it from the sock_ops callbacks (it asks for state callbacks at
ACTIVE/PASSIVE_ESTABLISHED; the socket's counters are fields of the context), `tracepoint`
from sock:inet_sock_set_state (counters read with CO-RE). Rounds alternate candidates; per
round a loopback connection storm inside one pod (client and server in the same netns)
makes `--conns` connections of 101 bytes each way. BPF run-time stats (BPF_ENABLE_STATS) give
runs and ns per connection (normalized by the connections each candidate counted closing: both
hooks also see other traffic on the machine); the storm's own wall time gives throughput. Writes a JSON report
and prints a summary. Needs root.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List

from meshlens.agent.kernel import bpf
from tests.integration.pods import Node, cgroup2_mount

from .agentrun import bpf_stats_enabled

OUT = Path(__file__).resolve().parent / "sockops_vs_tracepoint.json"
INCLUDE = Path(__file__).resolve().parents[1] / "bpf" / "include"

SOURCE = r"""
#include "vmlinux.h"
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_core_read.h>
char LICENSE[] SEC("license") = "GPL";
struct conn { __u64 start_ns; __u64 acked0; };
struct roll { __u64 closed, acked, received, retrans, srtt_sum; };
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 65536); __type(key, __u64); __type(value, struct conn); } conns SEC(".maps");
struct { __uint(type, BPF_MAP_TYPE_HASH); __uint(max_entries, 1024); __type(key, __u32); __type(value, struct roll); } rolls SEC(".maps");

/* Every close lands in one rollup (the candidates cost the same map work either way). */
static __always_inline void closed(__u64 acked, __u64 received, __u64 retrans, __u64 srtt)
{
	__u32 k = 0;
	struct roll zero = {}, *r = bpf_map_lookup_elem(&rolls, &k);
	if (!r) {
		bpf_map_update_elem(&rolls, &k, &zero, BPF_NOEXIST);
		r = bpf_map_lookup_elem(&rolls, &k);
		if (!r)
			return;
	}
	__sync_fetch_and_add(&r->closed, 1);
	__sync_fetch_and_add(&r->acked, acked);
	__sync_fetch_and_add(&r->received, received);
	__sync_fetch_and_add(&r->retrans, retrans);
	__sync_fetch_and_add(&r->srtt_sum, srtt);
}

SEC("sockops")
int cand_sockops(struct bpf_sock_ops *ctx)
{
	__u64 key = bpf_get_socket_cookie(ctx);
	struct conn c = {};

	switch (ctx->op) {
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		bpf_sock_ops_cb_flags_set(ctx, BPF_SOCK_OPS_STATE_CB_FLAG);
		c.start_ns = bpf_ktime_get_ns();
		c.acked0 = ctx->bytes_acked;
		bpf_map_update_elem(&conns, &key, &c, BPF_ANY);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (ctx->args[1] == BPF_TCP_CLOSE) {
			closed(ctx->bytes_acked, ctx->bytes_received, ctx->total_retrans, ctx->srtt_us >> 3);
			bpf_map_delete_elem(&conns, &key);
		}
		break;
	}
	return 1;
}

SEC("tp/sock/inet_sock_set_state")
int cand_tracepoint(struct trace_event_raw_inet_sock_set_state *ctx)
{
	struct sock *sk = (struct sock *)ctx->skaddr;
	struct tcp_sock *tp = (struct tcp_sock *)sk;
	__u64 key = (__u64)sk;
	struct conn c = {};

	if (ctx->protocol != 6)
		return 0;
	if (ctx->newstate == TCP_ESTABLISHED) {
		c.start_ns = bpf_ktime_get_ns();
		c.acked0 = BPF_CORE_READ(tp, bytes_acked);
		bpf_map_update_elem(&conns, &key, &c, BPF_ANY);
	} else if (ctx->newstate == TCP_CLOSE && bpf_map_lookup_elem(&conns, &key)) {
		closed(BPF_CORE_READ(tp, bytes_acked), BPF_CORE_READ(tp, bytes_received),
		       BPF_CORE_READ(tp, total_retrans), BPF_CORE_READ(tp, srtt_us) >> 3);
		bpf_map_delete_elem(&conns, &key);
	}
	return 0;
}
"""

BPF_CGROUP_SOCK_OPS = 3


def compile_object(tmp: Path) -> Path:
    src, obj = tmp / "cand.bpf.c", tmp / "cand.bpf.o"
    src.write_text(SOURCE)
    subprocess.run(["clang", "-O2", "-g", "-target", "bpf", "-D__TARGET_ARCH_x86", f"-I{INCLUDE}", "-c", str(src),
                    "-o", str(obj)], check=True)
    return obj


def storm(port: int, n: int) -> float:
    """n loopback connections, 101 bytes each way; returns seconds taken."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", port))
    ls.listen(512)

    def serve() -> None:
        for _ in range(n):
            c, _ = ls.accept()
            c.recv(101)
            c.sendall(b"s" * 101)
            c.close()
    t = threading.Thread(target=serve)
    t0 = time.monotonic()
    t.start()
    for _ in range(n):
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"c" * 101)
            while s.recv(4096):
                pass
    t.join()
    ls.close()
    return time.monotonic() - t0


def prog_stats(fd: int) -> Dict[str, int]:
    info = {}
    with open(f"/proc/self/fdinfo/{fd}") as f:
        for line in f:
            k, _, v = line.partition(":")
            info[k.strip()] = v.strip()
    return {"run_cnt": int(info.get("run_cnt", 0)), "run_time_ns": int(info.get("run_time_ns", 0))}


def run_round(obj_path: Path, cand: str, pod, n: int, port: int) -> Dict[str, Any]:
    obj = bpf.BpfObject(obj_path)
    try:
        for name in ("cand_sockops", "cand_tracepoint"):
            obj.program(name).autoload = name == cand
        obj.load()
        prog = obj.program(cand)
        cg_fd = -1
        if cand == "cand_sockops":
            cg_fd = os.open(cgroup2_mount(), os.O_RDONLY)
            from meshlens.agent.kernel.libbpf import lib
            lib.bpf_prog_attach.argtypes = [bpf.ctypes.c_int, bpf.ctypes.c_int, bpf.ctypes.c_int, bpf.ctypes.c_uint]
            if lib.bpf_prog_attach(prog.fd, cg_fd, BPF_CGROUP_SOCK_OPS, 0) != 0:
                raise OSError("bpf_prog_attach(sockops) failed")
        else:
            obj.attach(cand)
        try:
            s0 = prog_stats(prog.fd)
            secs = pod.in_netns(storm, port, n)
            s1 = prog_stats(prog.fd)
        finally:
            if cg_fd >= 0:
                from meshlens.agent.kernel.libbpf import lib
                lib.bpf_prog_detach2.argtypes = [bpf.ctypes.c_int, bpf.ctypes.c_int, bpf.ctypes.c_int]
                lib.bpf_prog_detach2(prog.fd, cg_fd, BPF_CGROUP_SOCK_OPS)
                os.close(cg_fd)
        rolls = obj.map("rolls").items_raw()
    finally:
        obj.close()
    runs, ns = s1["run_cnt"] - s0["run_cnt"], s1["run_time_ns"] - s0["run_time_ns"]
    closed = sum(int.from_bytes(v[:8], "little") for _, v in rolls)
    # Both hooks see every TCP socket of the machine, other sessions' too: normalize by the
    # connections the candidate itself counted closing (two closes per connection).
    seen = max(1.0, closed / 2)
    return {"candidate": cand, "connections": n, "seconds": secs, "conn_per_s": n / secs, "runs": runs, "ns": ns,
            "closes_counted": closed, "connections_seen": seen, "runs_per_conn": runs / seen, "ns_per_conn": ns / seen}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--conns", type=int, default=3001)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    rounds: List[Dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp, Node() as node, bpf_stats_enabled():
        obj = compile_object(Path(tmp))
        pod = node.add_pod("sockops")
        for i in range(a.rounds):
            order = ("cand_sockops", "cand_tracepoint") if i % 2 == 0 else ("cand_tracepoint", "cand_sockops")
            for cand in order:
                rounds.append(run_round(obj, cand, pod, a.conns, 9100 + len(rounds)))
    summary = {}
    for cand in ("cand_sockops", "cand_tracepoint"):
        rs = [r for r in rounds if r["candidate"] == cand]
        summary[cand] = {k: statistics.median(r[k] for r in rs) for k in ("runs_per_conn", "ns_per_conn", "conn_per_s")}
        summary[cand]["closes_counted_per_conn"] = statistics.median(r["closes_counted"] / r["connections"] for r in rs)
        summary[cand]["ns_per_run"] = statistics.median(r["ns"] / max(1, r["runs"]) for r in rs)
    report = {"kernel": os.uname().release, "rounds": rounds, "summary": summary,
              "note": "both ends of each connection in one netns: per connection = two sockets observed"}
    a.out.write_text(json.dumps(report, indent=1))
    for cand, s in summary.items():
        print(f"{cand}: {s['runs_per_conn']:.2f} runs/conn, {s['ns_per_run']:.0f} ns/run, {s['ns_per_conn']:.0f} ns/conn, "
              f"{s['conn_per_s']:.0f} conn/s, {s['closes_counted_per_conn']:.2f} closes counted/conn")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
