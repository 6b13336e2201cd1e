"""attest_workload: concurrent attestors, failing closed, naming the culprit, cancelled as one."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence

import pytest

from vouchd.attestors import AttestorError, WorkloadProcess, attest_workload
from vouchd.attestors.workload.procfs import read_process_stat
from vouchd.selectors import Selector

PROCESS = WorkloadProcess(
    pid=os.getpid(), uid=os.getuid(), gid=os.getgid(), start_time=read_process_stat(os.getpid()).start_time
)


class FixedAttestor:
    def __init__(self, name: str, *selectors: str) -> None:
        self.name = name
        self._selectors = [Selector.parse(s) for s in selectors]
        self.seen: list[WorkloadProcess] = []

    async def attest(self, process: WorkloadProcess) -> Sequence[Selector]:
        self.seen.append(process)
        return self._selectors


class FailingAttestor:
    def __init__(self, name: str, error: Exception) -> None:
        self.name = name
        self._error = error

    async def attest(self, process: WorkloadProcess) -> Sequence[Selector]:
        raise self._error


class StuckAttestor:
    """Never answers; records that it was cancelled rather than left running."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = asyncio.Event()
        self.cancelled = False

    async def attest(self, process: WorkloadProcess) -> Sequence[Selector]:
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled = True
            raise
        raise AssertionError("unreachable")


class NotSelectorsAttestor:
    name = "sloppy"

    async def attest(self, process: WorkloadProcess) -> Sequence[Selector]:
        return ["unix:uid:0"]  # type: ignore[list-item]


async def test_selectors_of_all_attestors_are_merged() -> None:
    unix = FixedAttestor("unix", "unix:uid:0", "unix:gid:0")
    systemd = FixedAttestor("systemd", "systemd:unit:web.service", "unix:uid:0")

    selectors = (await attest_workload(PROCESS, [unix, systemd])).selectors

    assert selectors == frozenset(Selector.parse(s) for s in ("unix:uid:0", "unix:gid:0", "systemd:unit:web.service"))
    assert unix.seen == [PROCESS]
    assert systemd.seen == [PROCESS]


async def test_a_failing_attestor_fails_the_whole_attestation_and_is_named() -> None:
    stuck = StuckAttestor("lineage")
    failing = FailingAttestor("container", OSError("cgroup file vanished"))

    with pytest.raises(AttestorError) as caught:
        await attest_workload(PROCESS, [FixedAttestor("unix", "unix:uid:0"), stuck, failing])

    assert caught.value.attestor == "container"
    assert str(caught.value) == "workloadattestor(container): OSError: cgroup file vanished"
    assert stuck.cancelled, "the other attestors must not outlive the failed attestation"


async def test_an_attestor_error_keeps_its_reason() -> None:
    failing = FailingAttestor("unix", AttestorError("unix", "process 12 has exited"))

    with pytest.raises(AttestorError, match=r"^workloadattestor\(unix\): process 12 has exited$"):
        await attest_workload(PROCESS, [failing])


async def test_the_callers_timeout_cancels_the_attestors_still_running() -> None:
    stuck = StuckAttestor("systemd")

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):  # a bound to fail on, not a wait: the attestor never answers
            await attest_workload(PROCESS, [FixedAttestor("unix", "unix:uid:0"), stuck])

    assert stuck.cancelled


async def test_cancelling_the_attestation_cancels_every_attestor() -> None:
    stuck = StuckAttestor("systemd")
    attestation = asyncio.create_task(attest_workload(PROCESS, [stuck]))
    await stuck.started.wait()

    attestation.cancel()
    with pytest.raises(asyncio.CancelledError):
        await attestation

    assert stuck.cancelled


class GatedAttestor:
    """Answers only once the test opens its gate."""

    def __init__(self, name: str, selector: str) -> None:
        self.name = name
        self.gate = asyncio.Event()
        self.started = asyncio.Event()
        self._selector = Selector.parse(selector)

    async def attest(self, process: WorkloadProcess) -> Sequence[Selector]:
        self.started.set()
        await self.gate.wait()
        return [self._selector]


async def test_the_attestation_waits_for_every_attestor() -> None:
    # The Workload API bounds attestation itself (attest_deadline); attest_workload adds no bound of its own.
    slow = GatedAttestor("systemd", "systemd:unit:web.service")
    attestation = asyncio.create_task(attest_workload(PROCESS, [FixedAttestor("unix", "unix:uid:0"), slow]))
    await slow.started.wait()
    assert not attestation.done()

    slow.gate.set()

    expected = frozenset(Selector.parse(s) for s in ("unix:uid:0", "systemd:unit:web.service"))
    assert (await attestation).selectors == expected


async def test_a_cancelled_attestation_names_the_attestors_it_was_waiting_for(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stuck = StuckAttestor("systemd")
    attestation = asyncio.create_task(attest_workload(PROCESS, [FixedAttestor("unix", "unix:uid:0"), stuck]))
    await stuck.started.wait()

    with caplog.at_level(logging.WARNING, logger="vouchd.attestors"):
        attestation.cancel()
        with pytest.raises(asyncio.CancelledError):
            await attestation

    (record,) = [r for r in caplog.records if r.name == "vouchd.attestors"]
    assert record.getMessage() == f"workload attestation of pid {PROCESS.pid} was cancelled while waiting for: systemd"
    assert record.__dict__["attestors"] == ["systemd"]
    assert stuck.cancelled


async def test_results_that_are_not_selectors_are_an_attestor_error() -> None:
    with pytest.raises(AttestorError, match=r"workloadattestor\(sloppy\): returned str, not a Selector or Evidence"):
        await attest_workload(PROCESS, [NotSelectorsAttestor()])


async def test_at_least_one_attestor_is_required() -> None:
    with pytest.raises(ValueError, match="at least one workload attestor"):
        await attest_workload(PROCESS, [])


def test_workload_process_refuses_impossible_values() -> None:
    with pytest.raises(ValueError, match="pid must be positive"):
        WorkloadProcess(pid=0, uid=0, gid=0, start_time=1)
    with pytest.raises(ValueError, match="start time must not be negative"):
        WorkloadProcess(pid=1, uid=0, gid=0, start_time=-1)
