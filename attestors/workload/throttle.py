"""Warnings about callers, at most one per uid and topic a minute.

A caller controls how often it connects: a warning per request would let any local user fill the
journal (and bury everyone else's lines). The first warning of a uid on a topic is logged; the same
topic for that uid is then counted, not logged, until `interval` has passed, and the next line says how
many were left out (`suppressed`).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

__all__ = ["DEFAULT_WARNING_INTERVAL", "UidWarnings"]

DEFAULT_WARNING_INTERVAL = 60.0
_REMEMBERED = 4096  # (uid, topic) pairs; the oldest are forgotten first, which only lets a line through early


class UidWarnings:
    def __init__(
        self,
        logger: logging.Logger,
        *,
        interval: float = DEFAULT_WARNING_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._last: OrderedDict[tuple[int, str], tuple[float, int]] = OrderedDict()  # -> (logged at, left out)

    def warn(self, uid: int, topic: str, message: str, *args: object, extra: Mapping[str, object]) -> bool:
        """Log `message % args` unless this uid had a line on this topic within the interval; True if logged."""
        now = self._clock()
        key = (uid, topic)
        last = self._last.get(key)
        if last is not None and now - last[0] < self._interval:
            self._last[key] = (last[0], last[1] + 1)
            return False
        suppressed = last[1] if last is not None else 0
        self._last[key] = (now, 0)
        self._last.move_to_end(key)
        while len(self._last) > _REMEMBERED:
            self._last.popitem(last=False)
        if suppressed:
            message += f" ({suppressed} more like it for this uid since the last such line)"
        self._logger.warning(message, *args, extra={**extra, "uid": uid, "suppressed": suppressed})
        return True
