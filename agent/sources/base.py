"""The contract between the agent's runner and each kernel feature (TCP, HTTP, DNS, tc...).

A Source owns one BPF object: it chooses attach points (agent/kernel/attach.py), loads and attaches,
exposes its ring buffers for the runner to poll, sweeps its maps on a timer, and hands the
exporter an immutable view of what it aggregated (`snapshot()`), keyed in the agent-wide
Snapshot by `name`. Nothing outside the source touches its maps.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Dict, List, Optional

from meshlens.agent.kernel.attach import AttachChoice  # re-exported: part of what a source reports
from meshlens.agent.kernel.bpf import BpfObject, RingBuffer

__all__ = ["AttachChoice", "ObjectSource", "Source", "SourceHealth"]

FOLDED_PEER = "external"  # peer address of the series that folded external peers are summed into


@dataclass(frozen=True)
class SourceHealth:
    """Self-monitoring numbers every source reports (exported as meshlens_agent_*)."""

    events_read: Dict[str, int]            # ring-buffer records consumed, by event type
    events_lost: Dict[str, int]            # by reason: ringbuf_full, map_full, ...
    map_entries: Dict[str, int]            # current entries per kernel map
    map_capacity: Dict[str, int]           # max_entries per kernel map
    kernel_counters: Dict[str, int]        # everything else the kernel counted
    callback_errors: int = 0


class Source(abc.ABC):
    name: str = "source"

    @abc.abstractmethod
    def start(self) -> None:
        """Open, configure, load and attach. Raises BpfError/RuntimeError if it cannot run."""

    @abc.abstractmethod
    def ring_buffers(self) -> List[RingBuffer]:
        """Ring buffers for the runner to poll (may be empty)."""

    @abc.abstractmethod
    def sweep(self, now_ns: int) -> None:
        """Read kernel maps and fold them into the source's aggregates (runner's timer)."""

    @abc.abstractmethod
    def snapshot(self) -> object:
        """An immutable view of the aggregates for the exporter; cheap, thread-safe."""

    @abc.abstractmethod
    def health(self) -> SourceHealth:
        """Counters about the source itself."""

    @abc.abstractmethod
    def attach_report(self) -> List[AttachChoice]:
        """What got attached where."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Detach everything and free kernel objects. Idempotent."""


class ObjectSource(Source):
    """A Source built on one BPF object with at most one ring buffer: the bookkeeping every
    such source shares (what to poll, what attached where, how to let go)."""

    obj: Optional[BpfObject] = None
    _rb: Optional[RingBuffer] = None
    _choices: List[AttachChoice]

    def ring_buffers(self) -> List[RingBuffer]:
        return [self._rb] if self._rb else []

    def attach_report(self) -> List[AttachChoice]:
        return list(self._choices)

    def stop(self) -> None:
        """Free the ring buffer, then the object (which detaches every link). Idempotent."""
        if self._rb:
            self._rb.free()
            self._rb = None
        if self.obj:
            self.obj.close()
            self.obj = None
