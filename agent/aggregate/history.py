"""SnapshotHistory: a small bounded ring of past snapshot areas, so user surfaces can answer
over a window (rates, quantiles over `since`/`t=30s`) by subtracting an old record from now.

Place in the data flow: agent/runner.py records the sources' snapshot areas (the `tcp`
FlowSnapshot, the `http` HttpSnapshot, ...) every `interval_s`; the REST API
(exporter/api/) asks `base(at)` for the newest record at or before a moment and subtracts it
from the live snapshot. Records are the sources' own immutable snapshots, shared, not copied.

How big: `length` records (default 25 at 5 s: two minutes). Each record holds one
FlowSnapshot (one Rollup copy per rollup: at the 10k-rollup cap about 25 MB per record, see
bench/api_flows.py) and references to the other areas, which their sources rebuild every
sweep anyway. A window reaching further back than the ring is answered from the oldest
record, and the answer says which window it really covers.
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Deque, Dict, List, Optional

DEFAULT_INTERVAL_S = 5.0
DEFAULT_LENGTH = 25


@dataclass(frozen=True)
class Record:
    mono: float                   # time.monotonic() when recorded
    wall: float                   # time.time() when recorded
    areas: Dict[str, object]      # Source.name -> that source's snapshot() at that moment


@dataclass(frozen=True)
class Base:
    """What a window starts from: a record, or nothing (the window reaches back past the
    agent's start, so the base is zero and counts are since the agent started)."""

    record: Optional[Record]
    start_wall: float             # wall time the window really starts at
    truncated: bool               # True when the ring no longer reaches the asked moment


class SnapshotHistory:
    def __init__(self, interval_s: float = DEFAULT_INTERVAL_S, length: int = DEFAULT_LENGTH,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        if interval_s <= 0 or length < 1:
            raise ValueError("history interval must be positive and length at least 1")
        self.interval_s = interval_s
        self.length = length
        self._clock = clock
        self._wall = wall
        self._ring: Deque[Record] = deque(maxlen=length)
        self._dropped = False         # a record fell off the ring: the past is no longer complete
        self._lock = threading.Lock()
        self.started_wall = wall()
        self._last = float("-inf")

    def due(self, now_mono: float) -> bool:
        return now_mono - self._last >= self.interval_s

    def record(self, areas: Dict[str, object]) -> None:
        rec = Record(self._clock(), self._wall(), dict(areas))
        with self._lock:
            if len(self._ring) == self._ring.maxlen:
                self._dropped = True
            self._ring.append(rec)
            self._last = rec.mono

    def base(self, at_wall: float) -> Base:
        """The newest record at or before `at_wall` (a wall-clock time)."""
        with self._lock:
            ring: List[Record] = list(self._ring)
            dropped = self._dropped
        if at_wall <= self.started_wall and not dropped:
            return Base(None, self.started_wall, False)
        walls = [r.wall for r in ring]
        i = bisect.bisect_right(walls, at_wall) - 1
        if i >= 0:
            return Base(ring[i], ring[i].wall, False)
        if not dropped:                       # before the first record: nothing had happened
            return Base(None, self.started_wall, False)
        return Base(ring[0], ring[0].wall, True) if ring else Base(None, self.started_wall, True)

    def oldest_wall(self) -> float:
        with self._lock:
            if self._dropped and self._ring:
                return self._ring[0].wall
        return self.started_wall

    def __len__(self) -> int:
        return len(self._ring)
