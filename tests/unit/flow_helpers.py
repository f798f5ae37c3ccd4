"""Build flow tables for tests and benchmarks the way the kernel fills them: one open and one
close delta per connection (struct ml_rollup words, see agent/sources/tcp/structs.py)."""
from __future__ import annotations

from typing import Optional

from meshlens.agent.aggregate.flows import FlowTable, RollupKey
from meshlens.agent.sources.tcp import structs as S
from meshlens.agent.sources.tcp.source import delta_words


def key(direction: str, process: str, cgroup_id: int, netns: int, peer: str, port: int) -> RollupKey:
    return RollupKey(direction, process, cgroup_id, netns, peer, port)


def opened(table: FlowTable, k: RollupKey, connect_s: Optional[float] = None) -> None:
    flags = S.D_OPENED | (S.D_CONNECT if connect_s is not None else 0)
    table.add(k, delta_words(flags, 0, 1, 0, 0, 0, 0, 0, round((connect_s or 0) * 1e9), 0, 0))


def closed(table: FlowTable, k: RollupKey, sent: int = 0, received: int = 0, rtt_us: int = 0,
           duration_s: float = 0.1, retrans: int = 0) -> None:
    flags = S.D_CLOSED | S.D_DURATION | (S.D_RTT if rtt_us else 0)
    table.add(k, delta_words(flags, 0, -1, sent, received, retrans, 0, 0, 0, rtt_us, round(duration_s * 1e9)))


def failed(table: FlowTable, k: RollupKey, reason: str) -> None:
    table.add(k, delta_words(0, S.FAIL_REASONS.index(reason) + 1, 0, 0, 0, 0, 0, 0, 0, 0, 0))
