"""Fakes for the gRPC Observer unit tests: an agent whose TCP source hands out connection
events on demand and whose HTTP area holds given tap records, and an identity naming pods
by network namespace. Only our own logic runs on them; grpcio, protobuf and the servers are real."""
from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Callable, Dict, List, Optional

from meshlens.agent.identity.model import Workload, external
from meshlens.agent.sources.base import SourceHealth
from meshlens.agent.sources.l7.http import HttpSeriesKey, TapRecord
from meshlens.agent.sources.tcp.facts import ConnEvent, RollupKey


class PodIdentity:
    """netns inode -> pod; addresses -> pod; anything else standalone/external."""

    def __init__(self, by_netns: Dict[int, Workload], by_ip: Dict[str, Workload]) -> None:
        self.by_netns, self.by_ip = by_netns, by_ip

    def local(self, cgroup_id: int, netns: int, process: str) -> Workload:
        return self.by_netns.get(netns) or Workload("", "", "process", process)

    def peer(self, address: str) -> Workload:
        return self.by_ip.get(address) or external(address)

    def expired(self, workload: Workload) -> bool:
        return False


class FakeTcp:
    name = "tcp"

    def __init__(self) -> None:
        self.subscribers: List[Callable] = []
        self.lost = 0

    def subscribe(self, cb: Callable) -> Callable[[], None]:
        self.subscribers.append(cb)
        return lambda: self.subscribers.remove(cb)

    @property
    def following(self) -> bool:
        return bool(self.subscribers)

    def emit(self, ev) -> None:
        for cb in list(self.subscribers):
            cb(ev)

    def health(self) -> SourceHealth:
        return SourceHealth({}, {"ringbuf_full": self.lost}, {}, {}, {})


class FakeAgent:
    def __init__(self, identity) -> None:
        self.identity = identity
        self.tcp = FakeTcp()
        self.sources = [self.tcp]
        self.tap: List[TapRecord] = []
        self.tap_dropped = 0
        self.taps = 0

    def tap_open(self, every: int = 1) -> bool:
        self.taps += 1
        return True

    def tap_close(self) -> None:
        self.taps -= 1

    def area(self, name: str) -> Optional[object]:
        if name == "http":
            return SimpleNamespace(tap=tuple(self.tap), tap_dropped=self.tap_dropped)
        return None


def conn(kind: str, netns: int, direction: str, local: str, lport: int, peer: str, pport: int,
         ts_ns: Optional[int] = None, **kw) -> ConnEvent:
    server_port = pport if direction == "outbound" else lport
    key = RollupKey(direction, "client" if direction == "outbound" else "server", 7, netns, peer, server_port)
    return ConnEvent(kind, time.monotonic_ns() if ts_ns is None else ts_ns, key, local, lport, peer, pport, 4099, **kw)


def tap(netns: int, role: str, method: str, status: int, route: str, server: str, port: int, peer: str,
        duration_s: float = 0.0137, ts_ns: Optional[int] = None) -> TapRecord:
    key = HttpSeriesKey(role, "nginx" if role == "server" else "curl", 7, netns, method, status, route, server, port)
    return TapRecord(time.monotonic_ns() if ts_ns is None else ts_ns, key, duration_s, None, 4099, peer)
