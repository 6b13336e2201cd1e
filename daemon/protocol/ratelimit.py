"""Token buckets and a log that cannot be flooded: bounds on what strangers on the bus can cost.

The buckets live in memory, per process: a limit bounds work, it is not a security decision.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

__all__ = ["KeyedTokenBuckets", "RateLimitedLog", "TokenBucket"]


class TokenBucket:
    """`rate` tokens a second, at most `burst` saved up; take() spends one or says no."""

    def __init__(self, rate: float, burst: float, *, now: float) -> None:
        if rate <= 0 or burst < 1:
            raise ValueError("a token bucket needs a positive rate and a burst of at least 1")
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._at = now

    def take(self, now: float) -> bool:
        self._tokens = min(self._burst, self._tokens + max(0.0, now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1:
            return False
        self._tokens -= 1
        return True


class KeyedTokenBuckets:
    """One bucket per key, the least recently used forgotten beyond `max_keys` (a forgotten key
    starts full again: at worst one burst more, never unbounded memory)."""

    def __init__(self, rate: float, burst: float, *, max_keys: int = 100_000) -> None:
        TokenBucket(rate, burst, now=0.0)  # the same checks, once, here
        self._rate = rate
        self._burst = burst
        self._max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    def take(self, key: str, now: float) -> bool:
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self._rate, self._burst, now=now)
            if len(self._buckets) > self._max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        return bucket.take(now)


class RateLimitedLog:
    """At most one line per reason every `interval` seconds; the lines held back are counted and
    the count reported with the next line of that reason. Whoever floods the bus with bad messages
    must not also flood the journal."""

    def __init__(self, logger: logging.Logger, *, interval: float = 10.0,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._interval = interval
        self._monotonic = monotonic
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warning(self, reason: str, message: str, fields: Mapping[str, object] | None = None) -> bool:
        """Log `message` unless a line of this `reason` went out less than `interval` ago; True if logged."""
        now = self._monotonic()
        last = self._last.get(reason)
        if last is not None and now - last < self._interval:
            self._held[reason] = self._held.get(reason, 0) + 1
            return False
        self._last[reason] = now
        extra = {**(fields or {}), "reason": reason, "suppressed": self._held.pop(reason, 0)}
        self._logger.warning(message, extra=extra)
        return True
