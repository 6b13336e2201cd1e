"""Time as the daemons see it, injected so that tests can move it.

Every decision that depends on time (SVID validity, rotation, nonce and session expiry, revocation
freshness) reads one `Clock`; nothing below the composition roots calls `time.time()` itself.
"""

from __future__ import annotations

import time
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock"]


class Clock(Protocol):
    def now(self) -> float:
        """Wall-clock time, seconds since the epoch: what certificates and peers compare against."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back: for intervals measured within one process."""
        ...


class SystemClock:
    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


SYSTEM_CLOCK: Clock = SystemClock()
