"""Cost of bpf/l7pkt.bpf.c per packet kind, from BPF_PROG_TEST_RUN on crafted keep-alive
conversations: pure ACK, request segment, response segment, FIN, a body-only segment.

Complements bench/l7_cost.py (the real thing, per program and request, over pod veths) with
the split by packet kind that bpf_stats cannot give. Each frame runs once (repeat=1: the
connection state must advance), so every figure includes the test-run overhead of a single
run, which the `noop` row (a frame on a port no one follows, after the interface lookup)
shows. The request is what wrk sends, the response what nginx 1.22 sends for a 613-byte file.
Root: loads a BPF object.

`--chain` runs every frame through the tc counter programs (bpf/tc.bpf.c) with the parser
in their `l7_progs`, as the agent runs them (one filter per hook, a tail call): each figure
is then counters + parser for that frame. `--baseline-object` / `--baseline-tc-object`
name another build to compare with: rounds alternate between it and this one (A/B in one
invocation, so both see the same load) and each kind reports the median over rounds of
the per-round medians, and their range.

    python -m bench.l7pkt_frames [--conversations 200] [--requests 20] [--object PATH]
        [--chain [--tc-object PATH]] [--rounds N --baseline-object PATH [--baseline-tc-object PATH]]
"""
from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
from typing import Dict, List

from meshlens.agent.kernel import bpf
from meshlens.agent.sources.l7.structs import L7PktRodata, MlHttpVal, MlPktIface
from tests.integration import tc_packets as pk

LO, NETNS = 1, 4242
POD, PEER = "10.9.0.2", "10.9.0.1"
SYN, ACK, FIN, PSH = 0x02, 0x10, 0x01, 0x08
REQUEST = b"GET /bytes/613 HTTP/1.1\r\nHost: 10.77.0.2:80\r\n\r\n"
RESPONSE_HEAD = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Tue, 01 Dec 2026 11:00:00 GMT\r\n"
                 b"Content-Type: application/octet-stream\r\nContent-Length: 613\r\n"
                 b"Last-Modified: Tue, 01 Dec 2026 10:00:00 GMT\r\nConnection: keep-alive\r\n"
                 b'ETag: "674d3ab0-265"\r\nAccept-Ranges: bytes\r\n\r\n')
RESPONSE = RESPONSE_HEAD + b"x" * 613


def frame(src: str, dst: str, sport: int, dport: int, seq: int, flags: int, payload: bytes = b"") -> bytes:
    th = struct.pack("!HHIIBBHHH", sport, dport, seq & 0xFFFFFFFF, 1, 5 << 4, flags, 65535, 0, 0)
    return pk.ethernet(0x0800) + pk.ipv4_header(src, dst, 6, len(th) + len(payload)) + th + payload


def _load_tc(path: str, l7: bpf.BpfObject) -> bpf.BpfObject:
    """The counter programs with l7's two entry points in their `l7_progs` (the agent's chain)."""
    tc = bpf.BpfObject(path or bpf.object_path("tc"))
    tc.program("handle_tc_kfree_skb").autoload = False
    tc.load()
    progs = tc.map("l7_progs")
    for index, name in ((0, "meshlens_l7_in"), (1, "meshlens_l7_eg")):
        progs.update_raw(index.to_bytes(4, "little"), l7.program(name).fd.to_bytes(4, "little"))
    return tc


def measure(conversations: int, requests: int, path: str = "", chain: bool = False,
            tc_path: str = "") -> Dict[str, Dict[str, float]]:
    """Per kind: median and mean test-run duration (ns) over every frame of that kind."""
    obj = bpf.BpfObject(path or bpf.object_path("l7pkt"))
    if chain:
        try:
            obj.set_rodata({"tc_chained": 1}, L7PktRodata)   # it reads the counters' handoff
        except ValueError:
            pass   # an older build without the knob (it parses the headers itself)
    obj.load()
    tc = None
    times: Dict[str, List[int]] = {}
    try:
        obj.map("pkt_ifaces").update_raw(LO.to_bytes(4, "little"), bytes(MlPktIface(NETNS, 0)))
        out, into = obj.program("meshlens_l7_in"), obj.program("meshlens_l7_eg")
        if chain:
            tc = _load_tc(tc_path, obj)
            out, into = tc.program("meshlens_tc_in"), tc.program("meshlens_tc_eg")

        def run(kind: str, prog: bpf.Program, data: bytes) -> None:
            times.setdefault(kind, []).append(prog.test_run(data)[2])

        for i in range(conversations):
            # the pod is the client on even conversations, the server on odd ones
            client_is_pod = i % 2 == 0
            cport, cseq, sseq = 20000 + i, 1000, 900000
            cprog, sprog = (out, into) if client_is_pod else (into, out)
            side = "client" if client_is_pod else "server"
            c = lambda f, s, p=b"": frame(POD if client_is_pod else PEER, PEER if client_is_pod else POD,  # noqa: E731
                                          cport, 80, s, f, p)
            s = lambda f, q, p=b"": frame(PEER if client_is_pod else POD, POD if client_is_pod else PEER,  # noqa: E731
                                          80, cport, q, f, p)
            run("syn", cprog, c(SYN, cseq))
            cseq += 1
            run("syn", sprog, s(SYN | ACK, sseq))
            sseq += 1
            for _ in range(requests):
                run(f"request ({side})", cprog, c(ACK | PSH, cseq, REQUEST))
                cseq += len(REQUEST)
                run("pure ack", sprog, s(ACK, sseq))
                run(f"response ({side})", sprog, s(ACK | PSH, sseq, RESPONSE))
                sseq += len(RESPONSE)
                run("pure ack", cprog, c(ACK, cseq))
            run("fin", cprog, c(FIN | ACK, cseq))
            run("fin", sprog, s(FIN | ACK, sseq))
            run("noop", out, frame(POD, PEER, 1, 9, 1, ACK | PSH, b"\x00" * 40))
        counted = sum(MlHttpVal.from_buffer_copy(v).count for _, v in obj.map("http_stats").items_raw())
    finally:
        if tc is not None:
            tc.close()
        obj.close()
    if counted != conversations * requests and not path:  # an experimental build may not count
        raise RuntimeError(f"the program counted {counted} requests of {conversations * requests} sent")
    return {k: {"frames": len(v), "median_ns": statistics.median(v), "mean_ns": statistics.fmean(v)}
            for k, v in sorted(times.items())}


def compare(a: argparse.Namespace) -> Dict[str, Dict[str, Dict[str, float]]]:
    """Alternating rounds of the baseline build and this one: per build and kind, the median
    of the rounds' medians and their range."""
    builds = {"baseline": (a.baseline_object, a.baseline_tc_object), "this": (a.object, a.tc_object)}
    rounds: Dict[str, Dict[str, List[float]]] = {b: {} for b in builds}
    for _ in range(a.rounds):
        for name, (l7, tc) in builds.items():
            for kind, v in measure(a.conversations, a.requests, l7, a.chain, tc).items():
                rounds[name].setdefault(kind, []).append(v["median_ns"])
    return {b: {k: {"median_ns": statistics.median(v), "min_ns": min(v), "max_ns": max(v), "rounds": len(v)}
                for k, v in sorted(kinds.items())} for b, kinds in rounds.items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--object", default="", help="another build of l7pkt.bpf.o (default: the shipped one)")
    ap.add_argument("--chain", action="store_true", help="through the tc counter programs, chained")
    ap.add_argument("--tc-object", default="", help="another build of tc.bpf.o (with --chain)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--baseline-object", default="", help="l7pkt.bpf.o to compare with, rounds alternating")
    ap.add_argument("--baseline-tc-object", default="", help="tc.bpf.o to compare with (with --chain)")
    a = ap.parse_args()
    if a.baseline_object or a.baseline_tc_object:
        cmp = compare(a)
        print(f"{'kind':<20} {'baseline ns (range)':>24} {'this ns (range)':>24}   medians of {a.rounds} rounds")
        for k in cmp["this"]:
            cells = [f"{v['median_ns']:.0f} ({v['min_ns']:.0f}-{v['max_ns']:.0f})" if v else "-"
                     for v in (cmp["baseline"].get(k), cmp["this"][k])]
            print(f"{k:<20} {cells[0]:>24} {cells[1]:>24}")
        print(json.dumps(cmp))
        return 0
    res = measure(a.conversations, a.requests, a.object, a.chain, a.tc_object)
    print(f"{'kind':<20} {'frames':>7} {'median ns':>10} {'mean ns':>9}")
    for k, v in res.items():
        print(f"{k:<20} {v['frames']:>7} {v['median_ns']:>10.0f} {v['mean_ns']:>9.0f}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
