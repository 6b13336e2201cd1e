"""CoalescedCall: the entry sync that publications trigger, shared by callers that ask at once."""

from __future__ import annotations

import asyncio

import pytest

from vouchd.agent.updates import CoalescedCall

DEADLINE = 5.0


class Gate:
    """An async function that counts its runs and waits at a gate each time."""

    def __init__(self) -> None:
        self.runs = 0
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.failure: Exception | None = None

    async def __call__(self) -> None:
        self.runs += 1
        self.started.set()
        await self.release.wait()
        if self.failure is not None:
            raise self.failure


async def test_callers_during_a_run_share_the_next_run_not_the_current_one() -> None:
    gate = Gate()
    call = CoalescedCall(gate)
    async with asyncio.timeout(DEADLINE):
        first = asyncio.create_task(call())
        await gate.started.wait()
        gate.started.clear()
        # These asked after the first run started: it may have read the old state, so they wait for the next.
        later = [asyncio.create_task(call()) for _ in range(5)]
        await asyncio.sleep(0)
        gate.release.set()
        await asyncio.gather(first, *later)

    assert gate.runs == 2


async def test_a_failure_reaches_every_caller_of_that_run_and_the_next_run_happens() -> None:
    gate = Gate()
    gate.failure = RuntimeError("authority unreachable")
    gate.release.set()
    call = CoalescedCall(gate)
    async with asyncio.timeout(DEADLINE):
        results = await asyncio.gather(call(), call(), return_exceptions=True)
        assert [str(r) for r in results] == ["authority unreachable"] * 2
        gate.failure = None
        await call()

    assert gate.runs == 2


async def test_a_caller_that_goes_away_does_not_cancel_the_run() -> None:
    gate = Gate()
    call = CoalescedCall(gate)
    async with asyncio.timeout(DEADLINE):
        impatient = asyncio.create_task(call())
        await gate.started.wait()
        patient = asyncio.create_task(call())
        await asyncio.sleep(0)
        impatient.cancel()
        gate.release.set()
        await patient
        with pytest.raises(asyncio.CancelledError):
            await impatient

    assert gate.runs == 2
