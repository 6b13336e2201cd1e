"""The `lineage` workload attestor: which of the caller's ancestors hold an identity from this agent.

An AI agent that launches a sub-agent must not hand it its own identity, and an operator may want
to give the sub-agent one of its own only when it was started by a given parent. The agent keeps
which process (pid and start time, so a reused pid is another process) was handed which SPIFFE
IDs (a HolderLookup); this attestor walks the caller's ancestors in /proc and reports:

- `lineage:parent_spiffe_id:<id>`: each SPIFFE ID the nearest identified ancestor holds;
- `lineage:depth:<n>`: how many of its ancestors hold an identity (a child of an identified
  process has depth 1, a child of that child, identified in turn, depth 2);
- evidence `lineage.parent_pid`, and `lineage.ancestor_spiffe_id` for every SPIFFE ID any ancestor
  holds: the agent never hands a process an identity one of its ancestors holds.

Only the kernel's parent links are read (/proc/<pid>/stat, readable by anyone): a process cannot
choose its parent. An ancestor that exited is no longer a link (its children were re-parented), and
a pid whose process started after its child is a reused pid, where the walk stops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from vouchd.attestors.base import Evidence, WorkloadProcess
from vouchd.attestors.errors import AttestorError, ProcessExitedError, ProcessInfoError
from vouchd.attestors.workload.procfs import PROC_ROOT, read_process_stat
from vouchd.errors import ConfigError
from vouchd.selectors import Selector, SelectorKind, matching

__all__ = ["DEFAULT_MAX_ANCESTORS", "SELECTOR_KINDS", "Ancestry", "HolderLookup", "LineageAttestor", "ancestry"]

_NAME = "lineage"
DEFAULT_MAX_ANCESTORS = 64  # process trees are shallow; a deeper one is walked this far and no further

SELECTOR_KINDS = (
    SelectorKind(_NAME, "parent_spiffe_id", matching(r"spiffe://[^\s/]+/\S*", "a parent_spiffe_id is a SPIFFE ID, "
                                                                                "e.g. lineage:parent_spiffe_id:spiffe://example.org/agent")),
    SelectorKind(_NAME, "depth", matching(r"[1-9][0-9]{0,2}", "a depth is a whole number from 1, "
                                                               "e.g. lineage:depth:1")),
)


class HolderLookup(Protocol):
    """Which SPIFFE IDs this agent handed to one process (the agent implements it)."""

    def held_by(self, pid: int, start_time: int) -> tuple[str, ...]:
        """The SPIFFE IDs the process with this pid and start time was handed, sorted; () for none."""
        ...


@dataclass(frozen=True, slots=True)
class Ancestry:
    """What a walk up a process's ancestors found."""

    parent_pid: int | None = None            # the nearest ancestor that holds an identity
    parent_spiffe_ids: tuple[str, ...] = ()  # what it holds
    depth: int = 0                           # how many ancestors hold one
    ancestor_spiffe_ids: tuple[str, ...] = ()  # everything any ancestor holds, sorted


def ancestry(process: WorkloadProcess, holders: HolderLookup, *, max_ancestors: int = DEFAULT_MAX_ANCESTORS,
             proc_root: Path = PROC_ROOT) -> Ancestry:
    """Walk from the process's parent up to PID 1 (or `max_ancestors` steps), asking `holders` at each step."""
    stat = read_process_stat(process.pid, proc_root=proc_root)
    if stat.start_time != process.start_time:
        raise ProcessInfoError(f"process {process.pid} is no longer the caller (its start time changed)")
    nearest: tuple[int, tuple[str, ...]] | None = None
    depth = 0
    held_anywhere: set[str] = set()
    child_start = stat.start_time
    pid = stat.ppid
    for _ in range(max_ancestors):
        if pid <= 0:  # above PID 1, or a parent outside our PID namespace
            break
        try:
            parent = read_process_stat(pid, proc_root=proc_root)
        except ProcessExitedError:
            break  # the parent exited just now: the caller is being re-parented
        if parent.start_time > child_start:
            break  # not the parent: a later process reusing its pid
        held = holders.held_by(parent.pid, parent.start_time)
        if held:
            depth += 1
            held_anywhere.update(held)
            if nearest is None:
                nearest = (parent.pid, held)
        child_start = parent.start_time
        pid = parent.ppid
    if nearest is None:
        return Ancestry()
    return Ancestry(parent_pid=nearest[0], parent_spiffe_ids=nearest[1], depth=depth,
                    ancestor_spiffe_ids=tuple(sorted(held_anywhere)))


class LineageAttestor:
    """Selectors from the identities the caller's ancestors hold.

    Options (the `lineage:` mapping of `workload_attestors`): `max_ancestors` (int, 64): how many
    generations up the walk looks. `holders` is the agent's own record and cannot be configured.
    """

    name = _NAME
    produces = SELECTOR_KINDS

    def __init__(self, *, holders: HolderLookup | None = None, max_ancestors: int = DEFAULT_MAX_ANCESTORS,
                 proc_root: Path = PROC_ROOT) -> None:
        if isinstance(max_ancestors, bool) or not isinstance(max_ancestors, int) or not 1 <= max_ancestors <= 4096:
            raise ConfigError("workloadattestor(lineage): max_ancestors must be a whole number from 1 to 4096")
        if holders is None:
            raise ConfigError("workloadattestor(lineage): runs only inside an agent, which knows who holds what")
        self._holders = holders
        self._max_ancestors = max_ancestors
        self._proc_root = proc_root

    @property
    def holders(self) -> HolderLookup:
        """The record this attestor asks (the agent's own)."""
        return self._holders

    async def attest(self, process: WorkloadProcess) -> Sequence[Selector | Evidence]:
        try:
            # On the event loop: /proc/<pid>/stat of each ancestor (12 µs each) is generated by the
            # kernel and waits for no file system; a thread's hand-off would cost more than the walk.
            found = ancestry(process, self._holders, max_ancestors=self._max_ancestors, proc_root=self._proc_root)
        except ProcessInfoError as err:
            raise AttestorError(_NAME, str(err)) from err
        except OSError as err:
            raise AttestorError(_NAME, f"cannot read the ancestors of process {process.pid}: "
                                       f"{err.strerror or err}") from err
        if found.parent_pid is None:
            return ()
        result: list[Selector | Evidence] = [Selector(_NAME, "parent_spiffe_id", spiffe_id)
                                             for spiffe_id in found.parent_spiffe_ids]
        result.append(Selector(_NAME, "depth", str(found.depth)))
        result.append(Evidence(_NAME, "parent_pid", str(found.parent_pid)))
        result.extend(Evidence(_NAME, "ancestor_spiffe_id", spiffe_id) for spiffe_id in found.ancestor_spiffe_ids)
        return result
