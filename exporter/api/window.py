"""Window: what one API answer covers, an end (the live snapshot or a past record) minus a base
(a record from agent/aggregate/history.py, or zero = since the agent started), plus the
counter/histogram subtraction every windowed view uses.

Place in the data flow: exporter/api/app.py builds a Window per request from the agent's
snapshot and history; exporter/api/{flows,viz,graph,smi}.py read only the Window.
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Dict, List, Optional, Sequence

from meshlens.agent.aggregate.history import SnapshotHistory
from meshlens.agent.aggregate.service_map import quantile
from meshlens.agent.identity.model import IdentityView


@dataclass(frozen=True)
class Window:
    end: Dict[str, object]             # areas at the end of the window
    base: Optional[Dict[str, object]]  # areas at its start; None = zero (since the agent started)
    start_wall: float
    end_wall: float
    truncated: bool                    # the history no longer reached the asked start
    identity: IdentityView

    @property
    def seconds(self) -> float:
        return max(self.end_wall - self.start_wall, 1e-9)

    def area(self, name: str) -> object:
        return self.end.get(name)

    def base_area(self, name: str) -> object:
        return self.base.get(name) if self.base else None

    def describe(self) -> Dict[str, object]:
        return {"start": rfc3339(self.start_wall), "end": rfc3339(self.end_wall),
                "seconds": round(self.seconds, 3), "truncated": self.truncated}


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def build_window(history: SnapshotHistory, live: Dict[str, object], identity: IdentityView, now: float,
                 since: Optional[float], until: Optional[float]) -> Window:
    """`since`/`until` are Unix times (None: since the agent started / now)."""
    if until is not None and until < now - history.interval_s / 2:
        b = history.base(until)
        end: Dict[str, object] = b.record.areas if b.record else {}
        end_wall = b.start_wall if b.record else max(until, history.started_wall)
    else:
        end, end_wall = live, now
    if since is None or since <= history.started_wall:
        # the snapshot's counters are cumulative since the agent started: no base needed
        base, start_wall, truncated = None, history.started_wall, False
    else:
        b = history.base(min(since, end_wall))
        base, start_wall, truncated = (b.record.areas if b.record else None), b.start_wall, b.truncated
    return Window(end, base, min(start_wall, end_wall), end_wall, truncated, identity)


def sub_counts(cur: Sequence[int], old: Optional[Sequence[int]]) -> List[int]:
    """Histogram bucket counts in the window; a counter that went backwards (a series that
    restarted) counts from zero."""
    if not old or len(old) != len(cur):
        return list(cur)
    out = [a - b for a, b in zip(cur, old)]
    return list(cur) if any(x < 0 for x in out) else out


def sub(cur: int, old: Optional[int]) -> int:
    if old is None or old > cur:
        return cur
    return cur - old


def quantiles_ms(bounds: Sequence[float], counts: Sequence[int]) -> Dict[str, Optional[float]]:
    """p50/p95/p99 in milliseconds (histogram_quantile semantics), None with no observations."""
    out: Dict[str, Optional[float]] = {}
    for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
        v = quantile(q, bounds, counts)
        out[name] = None if v is None else round(v * 1000.0, 3)
    return out


def add_into(acc: List[int], counts: Sequence[int]) -> List[int]:
    if not acc:
        return list(counts)
    return [a + b for a, b in zip(acc, counts)]
