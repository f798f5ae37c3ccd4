"""The workloads: nginx and iperf3 in a server pod, wrk and iperf3 clients in a client pod.

`Testbed` builds a simulated node (tests/integration/pods.py) with two pods and the
servers, and runs one measured workload at a time, returning the load tool's report plus
the kernel's own per-namespace counters (ActiveOpens/PassiveOpens from /proc/net/snmp).
Rate-limited HTTP uses wrk's Lua `delay()` hook: each connection waits `delay_ms` before
each request, so the offered rate is about connections * 1000 / delay_ms; the achieved
rate is always measured and reported, never assumed.
"""
from __future__ import annotations

import math
import time
from typing import Any, Dict, Optional

from tests.integration.pods import Node, Pod
from tests.integration.servers import Iperf3Server, Nginx, run_iperf3, run_wrk

SMALL = 613
MEDIUM = 16384
HTTP_PORT = 80
IPERF_PORT = 5201
SATURATION_CONNS = 32
RATE_DELAY_MS = 10


def throttle_script(delay_ms: int) -> str:
    """wrk Lua: wait delay_ms before every request on each connection."""
    return f"function delay()\n  return {int(delay_ms)}\nend\n"


def rate_plan(rate: float, delay_ms: int = RATE_DELAY_MS) -> Dict[str, int]:
    """Connections and per-request delay that offer about `rate` requests per second."""
    conns = max(1, int(math.ceil(rate * delay_ms / 1000.0)))
    return {"connections": conns, "delay_ms": delay_ms}


class Testbed:
    """Node + server pod (nginx 1 worker, iperf3 -s) + client pod. Context manager."""

    def __init__(self) -> None:
        self.node = Node()
        self.servers: list = []
        try:
            self.srv: Pod = self.node.add_pod("bench-srv")
            self.cli: Pod = self.node.add_pod("bench-cli")
            self.nginx = Nginx(self.srv, HTTP_PORT, byte_sizes=(SMALL, MEDIUM))
            self.servers.append(self.nginx)
            self.iperf = Iperf3Server(self.srv, IPERF_PORT)
            self.servers.append(self.iperf)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for s in reversed(self.servers):
            s.stop()
        self.node.close()

    def __enter__(self) -> "Testbed":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, size: int) -> str:
        return f"{self.nginx.url}/bytes/{size}"

    def reset_access_log(self) -> None:
        """Empty nginx's access log (nginx appends with O_APPEND, so it keeps writing)."""
        with open(self.nginx.access_log, "w"):
            pass

    def access_log_totals(self, expect: Optional[int] = None, body_size: Optional[int] = None) -> Dict[str, int]:
        """Requests, bytes_sent and request_length summed over the access log; with
        body_size, also the responses logged with a shorter body (cut short, e.g. when the
        load tool stopped mid-request) and their bytes_sent."""
        entries = self.nginx.access_log_entries(expect=expect)
        short = [e for e in entries if body_size is not None and isinstance(e["body_bytes_sent"], int)
                 and e["body_bytes_sent"] < body_size]
        return {"requests": len(entries), "short_responses": len(short),
                "short_bytes_sent": sum(int(e["bytes_sent"]) for e in short if isinstance(e["bytes_sent"], int)),
                "bytes_sent": sum(int(e["bytes_sent"]) for e in entries if isinstance(e["bytes_sent"], int)),
                "request_length": sum(int(e["request_length"]) for e in entries if isinstance(e["request_length"], int))}

    def calibrate(self, rate: float, size: int = SMALL, close: bool = False, seconds: int = 2,
                  tries: int = 2) -> Dict[str, int]:
        """A plan (connections, delay_ms) whose achieved rate is close to `rate`.

        wrk's timer fires late by up to a millisecond and each request adds its own
        latency, so the first plan under-delivers; scale the connections by the shortfall.
        """
        plan = rate_plan(rate)
        for _ in range(tries):
            r = self.http(size, seconds, plan["connections"], delay_ms=plan["delay_ms"], close=close)
            if r["rps"] <= 0:
                break
            plan = {"connections": max(1, int(round(plan["connections"] * rate / r["rps"]))),
                    "delay_ms": plan["delay_ms"]}
            if abs(r["rps"] / rate - 1.0) < 0.03:
                break
        self.reset_access_log()
        return plan

    def opens(self) -> Dict[str, int]:
        return {"active": self.cli.snmp()["Tcp"]["ActiveOpens"], "passive": self.srv.snmp()["Tcp"]["PassiveOpens"]}

    def http(self, size: int, seconds: int, connections: int = SATURATION_CONNS, *,
             rate: Optional[float] = None, delay_ms: Optional[int] = None,
             close: bool = False) -> Dict[str, Any]:
        """wrk against /bytes/<size>; close=True opens a connection per request.

        Without rate or delay_ms wrk saturates; rate picks connections and delay from
        rate_plan(); delay_ms throttles each of `connections` explicitly (calibrated plans).
        """
        script = None
        conns = connections
        if rate is not None and delay_ms is None:
            plan = rate_plan(rate)
            conns, delay_ms = plan["connections"], plan["delay_ms"]
        if delay_ms is not None:
            script = throttle_script(delay_ms)
        extra = ["-H", "Connection: close"] if close else []
        o0, t0 = self.opens(), time.monotonic()
        res = run_wrk(self.cli, self.url(size), conns, seconds, threads=1, script=script, extra_args=extra)
        o1 = self.opens()
        res.pop("text", None)
        res.update(connections=conns, delay_ms=delay_ms, offered_rate=rate, wall_s=time.monotonic() - t0,
                   active_opens=o1["active"] - o0["active"], passive_opens=o1["passive"] - o0["passive"])
        return res

    def iperf3(self, seconds: float) -> Dict[str, Any]:
        res = run_iperf3(self.cli, self.srv.ipv4, IPERF_PORT, seconds=seconds)
        res.pop("report", None)
        res["gbit_s"] = res["received_bytes"] * 8 / res["seconds"] / 1e9 if res["seconds"] else 0.0
        return res

    def iperf3_bytes(self, nbytes: int) -> Dict[str, Any]:
        res = run_iperf3(self.cli, self.srv.ipv4, IPERF_PORT, bytes=nbytes)
        res.pop("report", None)
        return res
