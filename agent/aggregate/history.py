"""SnapshotHistory: a small bounded ring of past snapshot areas, so user surfaces can answer
over a window (rates, quantiles over `since`/`t=30s`) by subtracting an old record from now.

Place in the data flow: agent/runner.py records the sources' snapshot areas (the `tcp`
FlowSnapshot, the `http` HttpSnapshot, ...) every `interval_s`; the REST API
(exporter/api/) asks `base(at)` for the newest record at or before a moment and subtracts it
from the live snapshot. Records are the sources' own immutable snapshots, shared, not copied.

How big: `length` records (default 13 at 5 s: one minute, Linkerd's default window). A
record shares every flow rollup and HTTP series that did not change since the record before
it, so an idle rollup costs one dict slot per record; a rollup that changed costs one Rollup
copy (about 1.2 KB). Worst case, every one of the 10k rollups (the --max-flows cap) changing
in every interval: about 12 MB per record, 150 MB for the ring (bench/api.py measures both
cases). Windows reaching further back than the ring are answered from the oldest record, and
the answer says which window it really covers (`truncated`); answers without `since` are
exact since the agent started whatever the ring holds (the snapshot's counters are cumulative).
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from dataclasses import dataclass, replace
from typing import Callable, Deque, Dict, List, Optional

from meshlens.agent.aggregate.flows import FlowSnapshot

DEFAULT_INTERVAL_S = 5.0
DEFAULT_LENGTH = 13


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
        with self._lock:
            prev = self._ring[-1].areas if self._ring else {}
        rec = Record(self._clock(), self._wall(), {k: _share(v, prev.get(k)) for k, v in areas.items()})
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


def _share(area: object, prev: object) -> object:
    """The area with every entry that is unchanged since `prev` replaced by prev's object, so
    records share what did not move. Flow rollups: unchanged when last_update and the open
    connection count are; HTTP/DNS series: when their request count is."""
    if isinstance(area, FlowSnapshot) and isinstance(prev, FlowSnapshot):
        old = prev.rollups
        shared = {}
        for k, r in area.rollups.items():
            o = old.get(k)
            shared[k] = o if o is not None and o.last_update == r.last_update and o.active == r.active else r
        return replace(area, rollups=shared)
    series, old_series = getattr(area, "series", None), getattr(prev, "series", None)
    if isinstance(series, dict) and isinstance(old_series, dict) and hasattr(area, "__dataclass_fields__"):
        shared_series = {}
        for k, st in series.items():
            o = old_series.get(k)
            shared_series[k] = o if o is not None and getattr(o, "count", None) == getattr(st, "count", -1) else st
        return replace(area, series=shared_series)  # type: ignore[type-var]
    return area
