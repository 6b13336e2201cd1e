"""Which process holds which identity: what the `lineage` attestor asks about a caller's ancestors.

A process is named by its pid and start time, so a pid reused by a later process holds nothing. A
process holds every SPIFFE ID the Workload API handed it, for as long as it lives: it may keep the
certificate or token in memory whether or not its stream stays open. Whether that identity is
still valid is the SVID cache's business (a child's SVID never outlives its parent's, svids.py).

The record is bounded: past `capacity` processes, those that exited are forgotten. If every one of
them is alive, the record refuses the new process (HoldersFullError) and the Workload API hands it
nothing: forgetting a live holder instead would let its children be handed its identity.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from vouchd.attestors.errors import ProcessInfoError
from vouchd.attestors.workload.procfs import PROC_ROOT, read_process_stat
from vouchd.clock import SYSTEM_CLOCK, Clock
from vouchd.errors import VouchdError

__all__ = ["DEFAULT_HOLDER_CAPACITY", "HoldersFullError", "IdentityHolders"]

_log = logging.getLogger("vouchd.agent.holders")

DEFAULT_HOLDER_CAPACITY = 65536
_MAX_IDS_PER_PROCESS = 256
_SWEEP_INTERVAL = 1.0  # far above what one process is ever handed

_Process = tuple[int, int]  # pid, start time


class HoldersFullError(VouchdError):
    """The record holds `capacity` live processes already: one more cannot be handed an identity."""


def _alive_in_proc(proc_root: Path) -> Callable[[int, int], bool]:
    def alive(pid: int, start_time: int) -> bool:
        try:
            stat = read_process_stat(pid, proc_root=proc_root)
        except (ProcessInfoError, OSError):
            return False
        return stat.start_time == start_time and not stat.is_dead

    return alive


class IdentityHolders:
    """The agent's record of which process was handed which SPIFFE IDs (a lineage HolderLookup)."""

    def __init__(self, *, capacity: int = DEFAULT_HOLDER_CAPACITY, proc_root: Path = PROC_ROOT,
                 alive: Callable[[int, int], bool] | None = None, clock: Clock = SYSTEM_CLOCK) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self._capacity = capacity
        self._alive = alive or _alive_in_proc(proc_root)
        self._clock = clock
        self._swept_at: float | None = None
        self._held: dict[_Process, frozenset[str]] = {}

    def record(self, pid: int, start_time: int, spiffe_ids: Iterable[str]) -> None:
        """The process is handed these SPIFFE IDs (added to what it already holds); HoldersFullError
        when it is new and `capacity` live processes are recorded already."""
        key = (pid, start_time)
        held = self._held.get(key)
        if held is None and len(self._held) >= self._capacity:
            self._forget_exited()
            if len(self._held) >= self._capacity:
                _log.warning("%d live processes hold identities: no further process is handed one until some "
                             "exit", len(self._held))
                raise HoldersFullError(f"{len(self._held)} live processes hold identities from this agent already")
        added = (held or frozenset()).union(spiffe_ids)
        if len(added) > _MAX_IDS_PER_PROCESS:
            added = frozenset(sorted(added)[:_MAX_IDS_PER_PROCESS])
        self._held[key] = added

    def held_by(self, pid: int, start_time: int) -> tuple[str, ...]:
        return tuple(sorted(self._held.get((pid, start_time), ())))

    def _forget_exited(self) -> None:
        # A /proc read per record: at most once a second, so that callers arriving while the record is
        # full of live processes cost nothing more than their refusal.
        now = self._clock.monotonic()
        if self._swept_at is not None and now - self._swept_at < _SWEEP_INTERVAL:
            return
        self._swept_at = now
        for key in [k for k in self._held if not self._alive(*k)]:
            del self._held[key]
