"""Summary statistics of a list of latencies: pure functions, no timing here."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

__all__ = ["TimingStats", "summarize"]


@dataclass(frozen=True)
class TimingStats:
    """Latency summary in microseconds, the unit benchmark_model prints."""

    count: int
    mean_us: float
    median_us: float
    p5_us: float      # 5th percentile, linear interpolation between order statistics
    p95_us: float
    std_us: float     # population standard deviation (ddof=0), as benchmark_model's std=
    min_us: float
    max_us: float

    def as_dict(self) -> dict:
        return asdict(self)


def summarize(times_us) -> TimingStats:
    """Summarize latencies (us). Raises ValueError on an empty list."""
    t = np.asarray(times_us, dtype=np.float64)
    if t.size == 0:
        raise ValueError("cannot summarize zero timed runs")
    p5, p50, p95 = np.percentile(t, [5, 50, 95])
    return TimingStats(
        count=int(t.size), mean_us=float(t.mean()), median_us=float(p50),
        p5_us=float(p5), p95_us=float(p95), std_us=float(t.std()),
        min_us=float(t.min()), max_us=float(t.max()))
