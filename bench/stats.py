"""Latency summaries. Percentiles are nearest-rank over every sample (no histogram buckets, no interpolation)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

PERCENTILES = (50.0, 90.0, 99.0, 99.9)


def _key(p: float) -> str:
    return "p" + (f"{p:g}".replace(".", "_"))  # p50, p90, p99, p99_9


def percentile(sorted_ns: Sequence[int], p: float) -> float:
    """Nearest-rank percentile of sorted samples (the smallest sample with at least p% of samples <= it)."""
    if not sorted_ns:
        return math.nan
    rank = max(1, math.ceil(p / 100.0 * len(sorted_ns)))
    return float(sorted_ns[rank - 1])


def summarize_ns(samples_ns: Sequence[int], window_s: float) -> dict[str, Any]:
    """count, throughput (samples / window), mean, percentiles and max, in microseconds."""
    data = sorted(samples_ns)
    n = len(data)
    out: dict[str, Any] = {
        "count": n,
        "ops_per_s": n / window_s if window_s > 0 else math.nan,
        "mean_us": (sum(data) / n / 1e3) if n else math.nan,
        "max_us": (data[-1] / 1e3) if n else math.nan,
    }
    for p in PERCENTILES:
        out[_key(p) + "_us"] = percentile(data, p) / 1e3
    return out


def pkey(p: float) -> str:
    """The summary key of a percentile: 99.9 -> "p99_9_us"."""
    return _key(p) + "_us"


def sample_for_cdf(samples_ns: Sequence[int], points: int = 2000) -> list[float]:
    """At most `points` latencies in µs, evenly spaced in rank over the sorted samples (for CDF plots), always
    including the minimum and the maximum."""
    data = sorted(samples_ns)
    n = len(data)
    if n <= points:
        return [round(x / 1e3, 1) for x in data]
    return [round(data[min(n - 1, round(i * (n - 1) / (points - 1)))] / 1e3, 1) for i in range(points)]
