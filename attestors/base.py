"""What a workload attestor is, and how the agent runs all of them for one caller.

An attestor turns a calling process into selectors (`unix:uid:1000`, `systemd:unit:web.service`).
The process is identified by what the kernel reported for the socket (SO_PEERCRED, SO_PEERPIDFD),
never by anything the process sent.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vouchd.attestors.errors import AttestorError
from vouchd.selectors import Selector, SelectorKind

__all__ = [
    "AttestorError",
    "AttestorRun",
    "DeclaresSelectors",
    "Evidence",
    "WorkloadAttestation",
    "WorkloadAttestor",
    "WorkloadProcess",
    "attest_workload",
]

_log = logging.getLogger("vouchd.attestors")


@dataclass(frozen=True, slots=True)
class WorkloadProcess:
    """The process on the other end of a Workload API connection."""

    pid: int  # from SO_PEERCRED (kernel), never from the process
    uid: int
    gid: int
    start_time: int  # /proc/<pid>/stat field 22: tells this process from a later one reusing the pid
    pidfd: int | None = None  # SO_PEERPIDFD when the kernel has it; owned by the connection, never closed here

    def __post_init__(self) -> None:
        if self.pid <= 0:
            raise ValueError(f"pid must be positive, got {self.pid}")
        if self.start_time < 0:
            raise ValueError(f"start time must not be negative, got {self.start_time}")


@dataclass(frozen=True, order=True, slots=True)
class Evidence:
    """A fact an attestor found that the decision records but no entry matches on.

    E.g. a systemd unit's InvocationID, or the pid of the ancestor a lineage selector names: worth
    having in the audit record of who was given what, meaningless (or changing every run) as a
    selector.
    """

    attestor: str
    name: str
    value: str

    def __str__(self) -> str:
        return f"{self.attestor}.{self.name}={self.value}"


@runtime_checkable
class WorkloadAttestor(Protocol):
    """A plugin that describes a process with selectors.

    `attest` returns Selectors, and may add Evidence for the decision record. It raises
    AttestorError (or anything else: attest_workload wraps it) when it cannot describe the process;
    it must not return a partial answer.
    """

    name: str

    async def attest(self, process: WorkloadProcess) -> Sequence[Selector | Evidence]: ...


@runtime_checkable
class DeclaresSelectors(Protocol):
    """What a workload attestor may also have: the selectors it can produce. Optional.

    Entries are matched by exact comparison, so an entry naming a selector no attestor produces
    (`unix:pth:/x`, `unix:uid:abc`) would silently never match. With `produces` declared, such
    entries are refused when they are written. The catalog reads `produces` from the factory (for a
    class, a class attribute), so an attestor need not be built to be described.

    An attestor that declares nothing is taken to produce selectors of its own name's type, with any
    key and value.
    """

    @property
    def produces(self) -> Sequence[SelectorKind]: ...


@dataclass(frozen=True, slots=True)
class AttestorRun:
    """What one attestor said about one process, and how long it took (`vouchd explain`)."""

    name: str
    seconds: float
    selectors: tuple[Selector, ...] = ()
    evidence: tuple[Evidence, ...] = ()
    error: str | None = None  # why it could not describe the process; None when it did
    finished: bool = True     # False: still running when the attestation was decided or cancelled


@dataclass(frozen=True, slots=True)
class WorkloadAttestation:
    """Everything the attestors said about one process: what entries match on, and what is recorded."""

    selectors: frozenset[Selector]
    evidence: tuple[Evidence, ...] = ()
    runs: tuple[AttestorRun, ...] = ()  # one per attestor, in configuration order

    @property
    def failure(self) -> AttestorRun | None:
        """The first attestor (in configuration order) that failed, or None."""
        return next((run for run in self.runs if run.error is not None), None)


async def attest_workload(
    process: WorkloadProcess,
    attestors: Sequence[WorkloadAttestor],
    *,
    fail_closed: bool = True,
    monotonic: Callable[[], float] = time.monotonic,
) -> WorkloadAttestation:
    """Run every attestor concurrently and merge what they found.

    Fails closed: if any attestor fails, the whole attestation fails with an AttestorError naming
    that attestor, even though a smaller selector set could only match fewer entries; a
    half-described process is not one the operator registered. With `fail_closed=False`
    (`vouchd explain`) every attestor runs to its end and failures are reported in `runs` instead;
    the selectors are then those of the attestors that succeeded, and must not be used to issue
    anything.

    The caller bounds the time (the Workload API's attest_deadline) by cancelling the attestation:
    every attestor is then cancelled too, and those still running are logged by name so a slow one
    can be found.
    """
    if not attestors:
        raise ValueError("at least one workload attestor is required")
    started = monotonic()
    finished_at: dict[str, float] = {}

    async def timed(attestor: WorkloadAttestor) -> tuple[Selector | Evidence, ...]:
        try:
            return await _attest_one(attestor, process)
        finally:
            finished_at[attestor.name] = monotonic()

    tasks = [asyncio.create_task(timed(attestor)) for attestor in attestors]
    try:
        # Returns once every attestor is done, or (failing closed) at the first one that raised.
        when = asyncio.FIRST_EXCEPTION if fail_closed else asyncio.ALL_COMPLETED
        done, _ = await asyncio.wait(tasks, return_when=when)
        runs = tuple(_run_of(a, t, done, started, finished_at) for a, t in zip(attestors, tasks, strict=True))
        if fail_closed:
            # Report in configuration order so the same failure always names the same attestor.
            for attestor, task in zip(attestors, tasks, strict=True):
                if task not in done:
                    continue
                if task.cancelled():
                    raise AttestorError(attestor.name, "cancelled itself")
                if (err := task.exception()) is not None:
                    raise _as_attestor_error(attestor.name, err) from err
        return WorkloadAttestation(
            selectors=frozenset(s for run in runs for s in run.selectors),
            evidence=tuple(e for run in runs for e in run.evidence),
            runs=runs,
        )
    except AttestorError as err:
        _log.warning(
            "workload attestation of pid %d failed: %s",
            process.pid,
            err,
            extra={"pid": process.pid, "attestor": err.attestor},
        )
        raise
    except asyncio.CancelledError:
        unfinished = [a.name for a, t in zip(attestors, tasks, strict=True) if not t.done()]
        if unfinished:
            _log.warning(
                "workload attestation of pid %d was cancelled while waiting for: %s",
                process.pid,
                ", ".join(unfinished),
                extra={"pid": process.pid, "attestors": unfinished},
            )
        raise
    finally:
        for task in tasks:
            task.cancel()
        # Wait for cancelled attestors so none outlives the request that started it.
        await asyncio.gather(*tasks, return_exceptions=True)


def _run_of(attestor: WorkloadAttestor, task: asyncio.Task[tuple[Selector | Evidence, ...]],
            done: set[asyncio.Task[tuple[Selector | Evidence, ...]]], started: float,
            finished_at: dict[str, float]) -> AttestorRun:
    seconds = finished_at.get(attestor.name, started) - started
    if task not in done:
        return AttestorRun(attestor.name, seconds, error="did not finish", finished=False)
    if task.cancelled():
        return AttestorRun(attestor.name, seconds, error="cancelled itself")
    if (err := task.exception()) is not None:
        return AttestorRun(attestor.name, seconds, error=_as_attestor_error(attestor.name, err).reason)
    found = task.result()
    return AttestorRun(
        attestor.name,
        seconds,
        selectors=tuple(sorted(item for item in found if isinstance(item, Selector))),
        evidence=tuple(sorted(item for item in found if isinstance(item, Evidence))),
    )


async def _attest_one(attestor: WorkloadAttestor, process: WorkloadProcess) -> tuple[Selector | Evidence, ...]:
    result = tuple(await attestor.attest(process))
    for item in result:
        if not isinstance(item, Selector | Evidence):
            raise AttestorError(attestor.name, f"returned {type(item).__name__}, not a Selector or Evidence")
        if isinstance(item, Evidence) and item.attestor != attestor.name:
            raise AttestorError(attestor.name, f"returned evidence in the name of {item.attestor!r}")
    return result


def _as_attestor_error(name: str, err: BaseException) -> AttestorError:
    if isinstance(err, AttestorError) and err.attestor == name:
        return err
    if isinstance(err, AttestorError):
        return AttestorError(name, err.reason)
    return AttestorError(name, f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
