"""A caller's attestation used again, for as long as nothing it rests on has changed.

Attesting a caller in full costs milliseconds (threads read its executable and command line, a
script's path is resolved, names are looked up); most workloads call the same way again and again,
over a kept connection or a new one each time. So the Workload API keeps each process's latest
attestation, keyed by pid and start time (a later process at the same pid has another start time),
and uses it again for a request of the same process when all of this holds:

- every attestor that made it is a built-in one (REUSABLE_ATTESTORS), whose inputs the fingerprint
  covers; with any other attestor configured, every request is attested in full;
- the process's fingerprint (attestors/workload/fingerprint.py) read now is the one read before and
  after that attestation: same start time, not a zombie, the same uid, gid and groups lines, the same
  executable (path, device, inode, ctime, size: a changed binary is seen at once), the same cgroups,
  the same chain of ancestors. The fingerprint is read on the event loop, so an executable it cannot
  stat without risking a wait (one that is not on a local disk file system: an overlay) has none, and
  its process is attested in full at every request, on the unix attestor's threads, as before;
- none of those ancestors was handed an identity since that attestation began (what the `lineage`
  attestor reports about them): every answer that hands identities out tells `handed`;
- it began less than `window` seconds ago. This bounds what the fingerprint does not cover: the
  names the name service gives the ids, and the script an interpreter runs (its command line, working
  directory, environment and the script file itself). A process that exec's another script of the
  same interpreter over a kept connection could keep its old script's selectors that long; it could
  keep them as long as it liked by forking instead (docs/design.md §6, "known limit"), which is why
  script selectors never stand alone.

Requests of one process that arrive while it is being attested wait for that attestation rather than
start their own, and use it if their own fingerprint matches. A failed attestation is never kept.
The service re-checks the caller (pidfd, start time) after a reused attestation as after any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from vouchd.attestors.base import WorkloadAttestation, WorkloadProcess
from vouchd.attestors.errors import ProcessInfoError
from vouchd.attestors.workload.executable import CannotTell, inspect_executable_inline
from vouchd.attestors.workload.fingerprint import (
    AncestorWatch,
    ProcessFingerprint,
    ProcessTraits,
    read_process_traits,
)
from vouchd.attestors.workload.mounts import MountTables
from vouchd.attestors.workload.procfs import PROC_ROOT

__all__ = ["REUSABLE_ATTESTORS", "REUSE_CAPACITY", "REUSE_WINDOW", "AttestationReuse"]

# The attestors whose every input a ProcessFingerprint covers (but for what REUSE_WINDOW bounds).
REUSABLE_ATTESTORS = frozenset({"unix", "interpreter", "systemd", "container", "lineage"})
# How long an attestation may be used again: a process calling ten times a second is attested in full
# five times a minute instead of six hundred.
REUSE_WINDOW = 2.0
# Processes whose attestation is kept, and processes whose latest gain of an identity is remembered.
REUSE_CAPACITY = 4096
HOLDER_CAPACITY = 16384

_Key = tuple[int, int]  # pid, start time


@dataclass(frozen=True, slots=True)
class _Kept:
    fingerprint: ProcessFingerprint
    attestation: WorkloadAttestation
    started: float  # clock() when the attestation began
    generation: int  # the holder generation when it began


class AttestationReuse:
    """Each process's latest attestation, and when it may be used again (see the module's docstring)."""

    def __init__(self, *, window: float = REUSE_WINDOW, capacity: int = REUSE_CAPACITY,
                 holder_capacity: int = HOLDER_CAPACITY, clock: Callable[[], float] = time.monotonic,
                 proc_root: Path = PROC_ROOT) -> None:
        if window < 0:
            raise ValueError(f"window must not be negative, got {window}")
        self._window = window
        self._capacity = capacity
        self._holder_capacity = holder_capacity
        self._clock = clock
        self._proc_root = proc_root
        self._mounts = MountTables(proc_root=proc_root)
        self._ancestors = AncestorWatch(proc_root=proc_root)
        self._kept: OrderedDict[_Key, _Kept] = OrderedDict()
        self._in_flight: dict[_Key, asyncio.Task[WorkloadAttestation]] = {}
        # Per process: what it was handed, and the generation at which it last gained an identity.
        self._held: OrderedDict[_Key, tuple[frozenset[str], int]] = OrderedDict()
        self._generation = 0
        self._forgotten = 0  # the latest generation among forgotten holders: older attestations are not used
        self._enabled: bool | None = None  # learned from the first attestation's attestors
        self.reused = 0
        self.attested = 0

    @property
    def reads_traits(self) -> Callable[[int], ProcessTraits] | None:
        """How the service reads a caller's traits when it identifies the caller (peer.peer_process), so
        that they are read once per request; None while nothing is reused (then nothing need be read)."""
        return None if self._enabled is False or self._window == 0 else self._read_traits

    async def attest(self, process: WorkloadProcess, attest: Callable[[], Awaitable[WorkloadAttestation]], *,
                     traits: ProcessTraits | None = None) -> tuple[WorkloadAttestation, bool]:
        """The process's attestation, and whether it was reused rather than made by `attest` now.

        `traits`: the process's, just read (reads_traits). A reused attestation comes back without a
        wait since the process's fingerprint was last read, so the caller's start time and state are
        those of that read. Raises what `attest` raises.
        """
        if self._enabled is False or self._window == 0:
            self.attested += 1
            return await attest(), False
        key = (process.pid, process.start_time)
        before = self.fingerprint(process, traits)
        if before is not None:
            running = self._in_flight.get(key)
            if running is not None:
                with contextlib.suppress(Exception):
                    await asyncio.shield(running)
                before = self.fingerprint(process)  # as it is now, not as it was before the wait
            kept = self._kept.get(key)
            if before is not None and kept is not None and self._valid(kept, before):
                # Nothing was awaited since `before` was read: the caller is as it was then.
                self._kept.move_to_end(key)
                self.reused += 1
                return kept.attestation, True
        self.attested += 1
        if before is None or key in self._in_flight:
            return await attest(), False
        task = asyncio.ensure_future(self._attest_and_keep(process, key, before, attest))
        self._in_flight[key] = task
        task.add_done_callback(functools.partial(self._landed, key))
        return await asyncio.shield(task), False

    def handed(self, process: WorkloadProcess, spiffe_ids: Iterable[str]) -> None:
        """The process was handed these identities: attestations of its descendants made before are
        no longer used (their `lineage` selectors may differ now)."""
        key = (process.pid, process.start_time)
        held, _ = self._held.get(key, (frozenset(), 0))
        gained = held.union(spiffe_ids)
        if gained == held:
            return
        self._generation += 1
        self._held[key] = (gained, self._generation)
        self._held.move_to_end(key)
        while len(self._held) > self._holder_capacity:
            _, (_, generation) = self._held.popitem(last=False)
            self._forgotten = max(self._forgotten, generation)

    def fingerprint(self, process: WorkloadProcess, traits: ProcessTraits | None = None) -> ProcessFingerprint | None:
        """The process's fingerprint now (with `traits`, if just read), or None when it cannot be read
        (then nothing is reused or kept)."""
        try:
            if traits is None:
                traits = self._read_traits(process.pid)
            if traits.start_time != process.start_time or any(start < 0 for _, start in traits.ancestors):
                return None  # another process at the pid, or a chain of ancestors not known whole
            executable = inspect_executable_inline(process.pid, self._mounts, proc_root=self._proc_root)
        except (ProcessInfoError, OSError):
            return None
        if isinstance(executable, CannotTell):
            # Not on a local disk (an overlay, say): stat'ing it may wait, and a thread of our own that
            # waited would escape the watchdog's view of the attestors' threads. Attested in full instead.
            return None
        return ProcessFingerprint(traits, executable)

    def _read_traits(self, pid: int) -> ProcessTraits:
        return read_process_traits(pid, proc_root=self._proc_root, watch=self._ancestors)

    async def _attest_and_keep(self, process: WorkloadProcess, key: _Key, before: ProcessFingerprint,
                               attest: Callable[[], Awaitable[WorkloadAttestation]]) -> WorkloadAttestation:
        started, generation = self._clock(), self._generation
        attestation = await attest()
        if self._enabled is None:
            self._enabled = bool(attestation.runs) and all(run.name in REUSABLE_ATTESTORS for run in attestation.runs)
        if self._enabled and self.fingerprint(process) == before:
            self._kept[key] = _Kept(before, attestation, started, generation)
            self._kept.move_to_end(key)
            # The least recently used first: drop what is past its window, and what is over capacity.
            expired = self._clock() - self._window
            while self._kept and (len(self._kept) > self._capacity
                                  or next(iter(self._kept.values())).started < expired):
                self._kept.popitem(last=False)
        return attestation

    def _landed(self, key: _Key, task: asyncio.Task[WorkloadAttestation]) -> None:
        if self._in_flight.get(key) is task:
            del self._in_flight[key]
        if not task.cancelled():
            task.exception()  # retrieved here: the requests that waited for it have their own answer

    def _valid(self, kept: _Kept, now: ProcessFingerprint) -> bool:
        if self._clock() - kept.started >= self._window or kept.fingerprint != now:
            return False
        if kept.generation < self._forgotten:
            return False  # an ancestor's latest gain may have been forgotten
        return all(self._held.get(ancestor, (frozenset(), 0))[1] <= kept.generation
                   for ancestor in now.traits.ancestors)
