"""Small statistics for benchmark rounds: medians, spread, ratios, deltas, errors.

Pure functions on lists of floats (no numpy), so they are cheap to unit-test.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Dict, List, Optional, Sequence


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence (mean of the two middle values for even lengths)."""
    if not values:
        raise ValueError("median of an empty sequence")
    ordered = sorted(values)
    mid = len(ordered) // 2
    if len(ordered) % 2:
        return float(ordered[mid])
    return (ordered[mid - 1] + ordered[mid]) / 2.0


def quantile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0 <= q <= 1) with linear interpolation between order statistics."""
    if not values:
        raise ValueError("quantile of an empty sequence")
    if not 0.0 <= q <= 1.0:
        raise ValueError("q must be within [0, 1]")
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = int(math.floor(pos))
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    """Median and spread of one figure over rounds."""

    median: float
    min: float
    max: float
    q1: float
    q3: float
    n: int

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def as_dict(self) -> Dict[str, float]:
        return asdict(self)


def summarize(values: Sequence[float]) -> Summary:
    """Median, min, max and quartiles of the rounds' values (all NaN, n=0, when empty)."""
    vals = [float(v) for v in values]
    if not vals:
        nan = float("nan")
        return Summary(nan, nan, nan, nan, nan, 0)
    return Summary(median(vals), min(vals), max(vals), quantile(vals, 0.25), quantile(vals, 0.75), len(vals))


def ratio(value: float, baseline: float) -> float:
    """value / baseline; NaN when the baseline is zero."""
    return value / baseline if baseline else float("nan")


def pct_delta(value: float, baseline: float) -> float:
    """Relative change in percent: +5.0 means 5% above the baseline."""
    return (value / baseline - 1.0) * 100.0 if baseline else float("nan")


def paired_ratios(values: Sequence[float], baselines: Sequence[float]) -> List[float]:
    """Ratio of each round to the baseline round run next to it (same index)."""
    if len(values) != len(baselines):
        raise ValueError("paired_ratios needs as many baselines as values")
    return [ratio(v, b) for v, b in zip(values, baselines)]


@dataclass(frozen=True)
class Error:
    """How far a measurement is from its ground truth."""

    measured: float
    truth: float

    @property
    def absolute(self) -> float:
        return self.measured - self.truth

    @property
    def percent(self) -> Optional[float]:
        if self.truth == 0:
            return 0.0 if self.measured == 0 else None
        return (self.measured - self.truth) / self.truth * 100.0

    @property
    def exact(self) -> bool:
        return self.measured == self.truth

    def as_dict(self) -> Dict[str, object]:
        return {"measured": self.measured, "truth": self.truth, "abs_error": self.absolute,
                "pct_error": self.percent, "exact": self.exact}


def histogram_quantile(q: float, buckets: Sequence[tuple]) -> float:
    """Prometheus' histogram_quantile over cumulative (upper_bound, count) buckets.

    Linear interpolation inside the bucket that holds the rank; the +Inf bucket returns the
    highest finite bound. NaN when the histogram is empty.
    """
    ordered = sorted((float(le), float(c)) for le, c in buckets)
    if not ordered or ordered[-1][1] == 0:
        return float("nan")
    total = ordered[-1][1]
    rank = q * total
    prev_le, prev_count = 0.0, 0.0
    for le, count in ordered:
        if count >= rank:
            if math.isinf(le):
                return prev_le
            if count == prev_count:
                return le
            return prev_le + (le - prev_le) * (rank - prev_count) / (count - prev_count)
        prev_le, prev_count = le, count
    return prev_le


def bucket_interval(q: float, buckets: Sequence[tuple]) -> tuple:
    """(lower, upper) bounds of the histogram bucket holding the q-quantile's rank.

    This is all a histogram really knows about a quantile; upper is inf for the +Inf
    bucket. (nan, nan) when the histogram is empty.
    """
    ordered = sorted((float(le), float(c)) for le, c in buckets)
    if not ordered or ordered[-1][1] == 0:
        return (float("nan"), float("nan"))
    rank = q * ordered[-1][1]
    prev = 0.0
    for le, count in ordered:
        if count >= rank and count > 0:
            return (prev, le)
        prev = le
    return (prev, float("inf"))
