"""A running latency record per TPM operation, for the agent's status and latency budget."""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass, field

__all__ = ["LatencyRecorder"]

# Enough recent samples for a stable median and 99th percentile, small enough to sort on every snapshot.
_WINDOW = 512


@dataclass
class _Series:
    count: int = 0
    last_ms: float = 0.0
    max_ms: float = 0.0
    recent: deque[float] = field(default_factory=lambda: deque(maxlen=_WINDOW))


def _percentile(sorted_values: list[float], percent: int) -> float:
    # Nearest rank: a reported p99 is always a latency that was actually observed.
    rank = max(1, -(-percent * len(sorted_values) // 100))
    return sorted_values[rank - 1]


class LatencyRecorder:
    """Latencies by operation name: count, last, p50 and p99 over the recent window, and max.

    Written by the TPM worker thread and read by the event loop, hence the lock.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[str, _Series] = {}

    def record(self, operation: str, milliseconds: float) -> None:
        with self._lock:
            series = self._series.setdefault(operation, _Series())
            series.count += 1
            series.last_ms = milliseconds
            series.max_ms = max(series.max_ms, milliseconds)
            series.recent.append(milliseconds)

    def snapshot(self) -> dict[str, dict[str, float]]:
        with self._lock:
            copies = {
                name: (series.count, series.last_ms, series.max_ms, sorted(series.recent))
                for name, series in self._series.items()
            }
        return {
            name: {
                "count": float(count),
                "last_ms": last_ms,
                "p50_ms": _percentile(recent, 50),
                "p99_ms": _percentile(recent, 99),
                "max_ms": max_ms,
            }
            for name, (count, last_ms, max_ms, recent) in sorted(copies.items())
        }
