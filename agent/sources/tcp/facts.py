"""What the TCP source emits: ConnFacts (one connection at one moment, cumulative counters)
and the ConnSink it emits them into. agent/aggregate/flows.FlowTable is the sink the runner
wires in; the source never imports it, so aggregation stays downstream of the kernel reader."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Protocol


@dataclass
class ConnFacts:
    """What the kernel says about one connection at one moment (cumulative counters)."""

    sk: int
    start_ns: int
    direction: str
    process: str
    pid: int
    cgroup_id: int
    netns: int
    local_address: str
    local_port: int
    peer_address: str
    peer_port: int
    bytes_sent: int = 0
    bytes_received: int = 0
    segs_retrans: int = 0
    rsts_sent: int = 0
    rsts_received: int = 0
    established_ns: int = 0
    srtt_us: int = 0


class ConnSink(Protocol):
    """Where the TCP source folds what it reads (implemented by aggregate.flows.FlowTable)."""

    def opened(self, f: ConnFacts, connect_latency_s: Optional[float]) -> None: ...

    def seen(self, f: ConnFacts, connect_latency_s: Optional[float] = None) -> None: ...

    def closed(self, f: ConnFacts, duration_s: float, connect_latency_s: Optional[float] = None) -> None: ...

    def connect_failed(self, f: ConnFacts, reason: str) -> None: ...

    def add_unowned(self, f: ConnFacts, **deltas: int) -> None: ...

    def forget_missing(self, alive: set, read_ns: int) -> int: ...

    def expire(self) -> int: ...

    def snapshot(self) -> Any: ...
