"""What a workload attestor is, and how the agent runs all of them for one caller.

An attestor turns a calling process into selectors (`unix:uid:1000`, `systemd:unit:web.service`).
The process is identified by what the kernel reported for the socket (SO_PEERCRED, SO_PEERPIDFD),
never by anything the process sent.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from vouchd.attestors.errors import AttestorError
from vouchd.selectors import Selector, SelectorKind

__all__ = ["AttestorError", "DeclaresSelectors", "WorkloadAttestor", "WorkloadProcess", "attest_workload"]

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


@runtime_checkable
class WorkloadAttestor(Protocol):
    """A plugin that describes a process with selectors.

    `attest` raises AttestorError (or anything else: attest_workload wraps it) when it cannot
    describe the process; it must not return a partial answer.
    """

    name: str

    async def attest(self, process: WorkloadProcess) -> Sequence[Selector]: ...


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


async def attest_workload(process: WorkloadProcess, attestors: Sequence[WorkloadAttestor]) -> frozenset[Selector]:
    """Run every attestor concurrently and merge their selectors.

    Fails closed: if any attestor fails, the whole attestation fails with an AttestorError naming
    that attestor, even though a smaller selector set could only match fewer entries; a
    half-described process is not one the operator registered.

    The caller bounds the time (the Workload API's attest_deadline) by cancelling the attestation:
    every attestor is then cancelled too, and those still running are logged by name so a slow one
    can be found.
    """
    if not attestors:
        raise ValueError("at least one workload attestor is required")
    tasks = [asyncio.create_task(_attest_one(attestor, process)) for attestor in attestors]
    try:
        # Returns once every attestor is done, or at the first one that raised.
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        # Report in configuration order so the same failure always names the same attestor.
        for attestor, task in zip(attestors, tasks, strict=True):
            if task not in done:
                continue
            if task.cancelled():
                raise AttestorError(attestor.name, "cancelled itself")
            if (err := task.exception()) is not None:
                raise _as_attestor_error(attestor.name, err) from err
        selectors: set[Selector] = set()
        for task in tasks:
            selectors.update(task.result())
        return frozenset(selectors)
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


async def _attest_one(attestor: WorkloadAttestor, process: WorkloadProcess) -> tuple[Selector, ...]:
    result = tuple(await attestor.attest(process))
    for item in result:
        if not isinstance(item, Selector):
            raise AttestorError(attestor.name, f"returned {type(item).__name__}, not a Selector")
    return result


def _as_attestor_error(name: str, err: BaseException) -> AttestorError:
    if isinstance(err, AttestorError) and err.attestor == name:
        return err
    if isinstance(err, AttestorError):
        return AttestorError(name, err.reason)
    return AttestorError(name, f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)
