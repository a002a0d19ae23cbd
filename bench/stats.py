"""Small, dependency-free statistics for latency samples."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any


def percentile(sorted_samples: Sequence[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default ``linear`` method)."""
    if not sorted_samples:
        return math.nan
    pos = q * (len(sorted_samples) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_samples) - 1)
    frac = pos - lo
    return sorted_samples[lo] + (sorted_samples[hi] - sorted_samples[lo]) * frac


def summarize(samples_s: Sequence[float]) -> dict[str, Any]:
    """Latency summary in milliseconds. ``n`` says how far p95/p99 can be trusted."""
    s = sorted(samples_s)
    if not s:
        return {"n": 0}
    ms = 1000.0
    return {
        "n": len(s),
        "p50_ms": round(percentile(s, 0.50) * ms, 3),
        "p95_ms": round(percentile(s, 0.95) * ms, 3),
        "p99_ms": round(percentile(s, 0.99) * ms, 3),
        "mean_ms": round(sum(s) / len(s) * ms, 3),
        "min_ms": round(s[0] * ms, 3),
        "max_ms": round(s[-1] * ms, 3),
    }


def median(values: Sequence[float]) -> float:
    return percentile(sorted(values), 0.5)
