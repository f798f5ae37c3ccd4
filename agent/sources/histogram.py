"""Fixed-bucket histograms for user-space aggregation (Prometheus semantics: cumulative
`le` buckets, a +Inf bucket, sum and count). Bucket bounds are shared module constants so the
exporter and tests agree on them."""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import List, Sequence, Tuple

# Seconds. Connect latency and RTT on a node span ~20 µs (veth) to seconds (SYN retries).
LATENCY_BUCKETS: Tuple[float, ...] = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)
DURATION_BUCKETS: Tuple[float, ...] = (0.001, 0.01, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0, 3600.0)


@dataclass
class Histogram:
    bounds: Sequence[float]
    counts: List[int] = field(default_factory=list)  # per bucket, non-cumulative; last = +Inf
    total: float = 0.0
    count: int = 0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)

    def observe(self, value: float, n: int = 1) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += n
        self.total += value * n
        self.count += n

    def add_counts(self, counts: Sequence[int], total: float) -> None:
        """Add per-bucket counts aggregated elsewhere (the kernel) with the same bounds."""
        if len(counts) != len(self.counts):
            raise ValueError(f"{len(counts)} bucket counts for {len(self.counts)} buckets")
        for i, c in enumerate(counts):
            self.counts[i] += c
        self.count += sum(counts)
        self.total += total

    def cumulative(self) -> List[Tuple[str, int]]:
        """[(le, cumulative count)] ending with +Inf, as prometheus_client expects."""
        out, acc = [], 0
        for bound, c in zip(list(self.bounds) + [float("inf")], self.counts):
            acc += c
            out.append(("+Inf" if bound == float("inf") else repr(float(bound)), acc))
        return out

    def copy(self) -> "Histogram":
        return Histogram(self.bounds, list(self.counts), self.total, self.count)
