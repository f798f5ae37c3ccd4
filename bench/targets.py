"""The issue's targets and their evaluation: met or missed, and by how much.

A target compares one measured figure with a limit, either "at most" or "at least". The
margin is signed so that a positive margin always means room to spare and a negative one
means a miss, in the figure's unit and as a percentage of the limit.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional


@dataclass(frozen=True)
class Target:
    key: str
    description: str
    limit: float
    unit: str
    kind: str  # "max" (measured <= limit) | "min" (measured >= limit)

    def __post_init__(self) -> None:
        if self.kind not in ("max", "min"):
            raise ValueError("kind must be 'max' or 'min'")


@dataclass(frozen=True)
class Verdict:
    target: Target
    measured: Optional[float]
    note: str = ""

    @property
    def evaluated(self) -> bool:
        return self.measured is not None and not math.isnan(self.measured)

    @property
    def margin(self) -> Optional[float]:
        """Room to spare in the figure's unit (negative: missed by that much)."""
        if not self.evaluated:
            return None
        assert self.measured is not None
        if self.target.kind == "max":
            return self.target.limit - self.measured
        return self.measured - self.target.limit

    @property
    def margin_pct(self) -> Optional[float]:
        m = self.margin
        if m is None or self.target.limit == 0:
            return None
        return m / abs(self.target.limit) * 100.0

    @property
    def met(self) -> Optional[bool]:
        m = self.margin
        return None if m is None else m >= 0

    def as_dict(self) -> Dict[str, object]:
        return {
            "key": self.target.key, "description": self.target.description, "limit": self.target.limit,
            "unit": self.target.unit, "kind": self.target.kind, "measured": self.measured,
            "met": self.met, "margin": self.margin, "margin_pct": self.margin_pct, "note": self.note,
        }

    def sentence(self) -> str:
        """One line for the report: 'met (12.0 ns to spare)' or 'missed by 3.1 % (...)'."""
        t = self.target
        if not self.evaluated:
            return f"not evaluated{': ' + self.note if self.note else ''}"
        m = self.margin
        assert m is not None
        pct = self.margin_pct
        pct_s = f", {abs(pct):.1f}% of the limit" if pct is not None else ""
        word = "met" if m >= 0 else "MISSED"
        how = "to spare" if m >= 0 else "over" if t.kind == "max" else "short"
        return f"{word}: {_fmt(self.measured)} {t.unit} vs {'<=' if t.kind == 'max' else '>='} {_fmt(t.limit)} ({_fmt(abs(m))} {t.unit} {how}{pct_s})"


def _fmt(v: Optional[float]) -> str:
    if v is None:
        return "n/a"
    if v == 0 or abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


TARGETS: Dict[str, Target] = {t.key: t for t in (
    Target("throughput_ratio_full", "HTTP throughput with the full agent, % of the no-agent baseline", 98.0, "%", "min"),
    Target("p99_delta_full", "HTTP p99 latency with the full agent, % change vs baseline", 5.0, "%", "max"),
    Target("kernel_ns_per_request", "Kernel (BPF) time per HTTP request handled", 300.0, "ns", "max"),
    Target("l7_ns_per_request", "Issue 10: BPF time per HTTP request, both ends on the node", 1500.0, "ns", "max"),
    Target("l7_keepalive_ratio_full", "Issue 10: full agent, nginx keep-alive at saturation, % of baseline", 95.0,
           "%", "min"),
    Target("l7_storm_ratio_full", "Issue 10: full agent, new connection per request at saturation, % of baseline",
           90.0, "%", "min"),
    Target("cpu_at_5k", "Agent CPU at 5k req/s, % of one core", 5.0, "%", "max"),
    Target("cpu_at_20k", "Agent CPU at 20k req/s, % of one core", 20.0, "%", "max"),
    Target("rss", "Agent resident memory (max over the run)", 150.0, "MB", "max"),
    Target("lost_at_20k", "Events lost at 20k req/s", 0.0, "events", "max"),
    Target("count_error_at_20k", "Largest count error (connections, bytes, requests) at 20k req/s", 0.0, "%", "max"),
    Target("lost_at_50k", "Events lost at 50k req/s (issue 10)", 0.0, "events", "max"),
    Target("scrape_10k", "/metrics at 10k series (median)", 100.0, "ms", "max"),
    Target("l4_keepalive_ratio", "L4 only, keep-alive HTTP at saturation, % of the same-run baseline", 99.0, "%", "min"),
    Target("l4_keepalive_runs_per_request", "L4 only, BPF program runs per keep-alive request on per-call hooks",
           0.0, "runs", "max"),
    Target("l4_storm_ratio", "L4 only, new connection per request at saturation, % of the same-run baseline", 95.0,
           "%", "min"),
    Target("l4_agent_us_per_connection", "L4 only, agent CPU per connection (net of idle)", 5.0, "µs", "max"),
)}


def verdict(key: str, measured: Optional[float], note: str = "") -> Verdict:
    return Verdict(TARGETS[key], measured, note)
