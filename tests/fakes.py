"""Fakes shared by the unit tests (never mocks of something that can run here)."""

from __future__ import annotations

__all__ = ["FakeClock"]


class FakeClock:
    """A vouchd.clock.Clock that moves only when told; wall and monotonic time move together,
    except `jump`, which moves the wall clock alone (an NTP step, a VM resumed)."""

    def __init__(self, start: float = 1_800_000_000.0) -> None:
        self._wall = start
        self._monotonic = 1000.0

    def now(self) -> float:
        return self._wall

    def monotonic(self) -> float:
        return self._monotonic

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("time only moves forward; use jump() for a wall-clock step")
        self._wall += seconds
        self._monotonic += seconds

    def jump(self, seconds: float) -> None:
        self._wall += seconds
