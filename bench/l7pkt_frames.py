"""Cost of bpf/l7pkt.bpf.c per packet kind, from BPF_PROG_TEST_RUN on crafted keep-alive
conversations: pure ACK, request segment, response segment, FIN, a body-only segment.

Complements bench/l7_cost.py (the real thing, per program and request, over pod veths) with
the split by packet kind that bpf_stats cannot give. Each frame runs once (repeat=1: the
connection state must advance), so every figure includes the test-run overhead of a single
run, which the `noop` row (a frame on a port no one follows, after the interface lookup)
shows. The request is what wrk sends, the response what nginx 1.22 sends for a 613-byte file.
Root: loads a BPF object.

    python -m bench.l7pkt_frames [--conversations 200] [--requests 20] [--object PATH]
"""
from __future__ import annotations

import argparse
import json
import statistics
import struct
import sys
from typing import Dict, List

from meshlens.agent.kernel import bpf
from meshlens.agent.sources.l7.structs import MlHttpVal, MlPktIface
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


def measure(conversations: int, requests: int, path: str = "") -> Dict[str, Dict[str, float]]:
    """Per kind: median and mean test-run duration (ns) over every frame of that kind."""
    obj = bpf.BpfObject(path or bpf.object_path("l7pkt"))
    obj.load()
    times: Dict[str, List[int]] = {}
    try:
        obj.map("pkt_ifaces").update_raw(LO.to_bytes(4, "little"), bytes(MlPktIface(NETNS, 0)))
        out, into = obj.program("meshlens_l7_in"), obj.program("meshlens_l7_eg")

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
        obj.close()
    if counted != conversations * requests and not path:  # an experimental build may not count
        raise RuntimeError(f"the program counted {counted} requests of {conversations * requests} sent")
    return {k: {"frames": len(v), "median_ns": statistics.median(v), "mean_ns": statistics.fmean(v)}
            for k, v in sorted(times.items())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--object", default="", help="another build of l7pkt.bpf.o (default: the shipped one)")
    a = ap.parse_args()
    res = measure(a.conversations, a.requests, a.object)
    print(f"{'kind':<20} {'frames':>7} {'median ns':>10} {'mean ns':>9}")
    for k, v in res.items():
        print(f"{k:<20} {v['frames']:>7} {v['median_ns']:>10.0f} {v['mean_ns']:>9.0f}")
    print(json.dumps(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
