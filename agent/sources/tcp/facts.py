"""What the TCP source emits: rollup deltas (RollupKey + what changed since the last sweep,
read from the kernel's `rollups` map or from overflow records) into a RollupSink, and, while
a client follows the stream, one ConnEvent per connection event. agent/aggregate/flows.FlowTable
is the sink the runner wires in; the source never imports it, so aggregation stays
downstream of the kernel reader."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence


@dataclass(frozen=True)
class RollupKey:
    direction: str       # outbound | inbound | unknown
    process: str         # process name (comm): connecting process, or the listener for inbound
    cgroup_id: int
    netns: int
    peer_address: str
    server_port: int     # remote port for outbound, local port for inbound, the smaller for unknown


@dataclass(frozen=True)
class ConnEvent:
    """One connection event for followers of the flow stream (follow mode only)."""

    type: str            # open | close | connect_fail
    ts_ns: int           # CLOCK_MONOTONIC
    key: RollupKey
    local_address: str
    local_port: int
    peer_address: str
    peer_port: int
    pid: int             # the connecting process (outbound); 0 when not known
    bytes_sent: int = 0  # close: the connection's payload bytes, both ways
    bytes_received: int = 0
    duration_s: float = 0.0
    connect_latency_s: float = 0.0
    reason: str = ""     # connect_fail: refused, timeout, unreachable, aborted, other
    rtt_s: float = 0.0   # the socket's smoothed RTT (tcp_sock.srtt_us): open = the handshake's
                         # sample (either end), close = srtt at close; 0 where the kernel had none


class RollupSink(Protocol):
    """Where the TCP source folds what it reads (implemented by aggregate.flows.FlowTable).
    `delta` is laid out like struct ml_rollup read as u64 words (see structs.R_*)."""

    def add(self, key: RollupKey, delta: Sequence[int]) -> None: ...

    def expire(self) -> int: ...

    def snapshot(self) -> Any: ...
