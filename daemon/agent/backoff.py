"""When an entry whose SVID could not be issued may be tried again: 5 s, then 10, 20, … up to 300 s.

A workload asking again and again must not turn into a TPM quote and an authority request each
time: until its next attempt, a failed entry's callers get the last refusal at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["IssuanceBackoff"]

RETRY_AFTER_FAILURE = 5.0
MAX_BACKOFF = 300.0


@dataclass(frozen=True)
class _Failure:
    next_attempt: float
    delay: float
    reason: str


class IssuanceBackoff:
    """Per entry: when it may next be tried, and why it failed last."""

    def __init__(self) -> None:
        self._failures: dict[str, _Failure] = {}

    def failed(self, entry_id: str, reason: str, now: float) -> None:
        previous = self._failures.get(entry_id)
        delay = min(MAX_BACKOFF, previous.delay * 2) if previous is not None else RETRY_AFTER_FAILURE
        self._failures[entry_id] = _Failure(next_attempt=now + delay, delay=delay, reason=reason)

    def succeeded(self, entry_id: str) -> None:
        self._failures.pop(entry_id, None)

    def next_attempt(self, entry_id: str) -> float:
        """When the entry may be tried (0: at once)."""
        failure = self._failures.get(entry_id)
        return failure.next_attempt if failure is not None else 0.0

    def refusal(self, entry_id: str, now: float) -> str | None:
        """The last failure's reason while the entry may not be tried yet, else None."""
        failure = self._failures.get(entry_id)
        return failure.reason if failure is not None and failure.next_attempt > now else None

    def clear(self) -> None:
        """Everything may be tried at once (what held issuance back is gone)."""
        self._failures.clear()

    def keep_only(self, keep: Callable[[str], bool]) -> None:
        """Forget the entries `keep` rejects (changed or removed: they start afresh)."""
        self._failures = {e: f for e, f in self._failures.items() if keep(e)}
