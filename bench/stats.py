"""Order statistics for the bench's samples."""

import math


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile: a value that was actually observed, never an interpolation."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(fraction * len(ordered)) - 1)]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def summarize_ms(seconds: list[float]) -> dict[str, float] | None:
    """p50, p95, p99 and max of durations given in seconds, in milliseconds."""
    if not seconds:
        return None
    return {
        "n": len(seconds),
        "p50": round(1000 * percentile(seconds, 0.50), 3),
        "p95": round(1000 * percentile(seconds, 0.95), 3),
        "p99": round(1000 * percentile(seconds, 0.99), 3),
        "max": round(1000 * max(seconds), 3),
    }
