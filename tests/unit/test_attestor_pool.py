"""The attestation pool: a share per uid, lines that take turns, bounded waits, hung calls the watchdog sees.

Calls here block on events the test sets, so that what runs, what waits and what hangs is known;
every wait of the test itself is bounded.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator

import pytest

from vouchd.attestors.workload.pool import AttestationPool, PoolBusyError, stalled_attestation

BOUND = 5.0  # no wait of a test lasts longer; none should come near it


class Gate:
    """Calls that run until the test opens the gate; records who started, in order."""

    def __init__(self) -> None:
        self.open = threading.Event()
        self.started: list[str] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)

    def call(self, name: str, result: object = None, *, until: threading.Event | None = None) -> Callable[[], object]:
        """A call that records its start, then returns `result` (else its name) once `until` (else the gate) opens."""

        def blocked() -> object:
            with self._lock:
                self.started.append(name)
                self._changed.notify_all()
            if not (until or self.open).wait(BOUND):
                raise AssertionError(f"{name}: the test never opened the gate")
            return result if result is not None else name

        return blocked

    async def wait_started(self, count: int) -> list[str]:
        def wait() -> bool:
            with self._lock:
                return self._changed.wait_for(lambda: len(self.started) >= count, BOUND)

        # A thread of its own: the pool under test is what might be full.
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        threading.Thread(target=lambda: loop.call_soon_threadsafe(done.set_result, wait()), daemon=True).start()
        assert await done, f"only {self.started} started, expected {count}"
        return list(self.started)


@pytest.fixture
def gate() -> Iterator[Gate]:
    held = Gate()
    yield held
    held.open.set()  # nothing a test blocked outlives it


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def time(self) -> float:
        return self.now


def pool(
    threads: int = 4, uid_threads: int = 2, uid_waiting: int = 8, clock: FakeClock | None = None
) -> AttestationPool:
    return AttestationPool(name="test-pool", threads=threads, uid_threads=uid_threads, uid_waiting=uid_waiting,
                           **({"clock": clock.time} if clock is not None else {}))


async def test_a_uid_runs_no_more_than_its_share_and_others_still_get_threads(gate: Gate) -> None:
    shared = pool(threads=4, uid_threads=2)
    greedy = [asyncio.create_task(shared.run(1000, gate.call(f"greedy-{i}"))) for i in range(5)]
    assert sorted(await gate.wait_started(2)) == ["greedy-0", "greedy-1"]

    async with asyncio.timeout(BOUND):  # a bound to fail on: the other uid is not queued behind uid 1000
        other = asyncio.create_task(shared.run(2000, gate.call("other")))
        assert "other" in await gate.wait_started(3)

    assert len(gate.started) == 3, "uid 1000's three other calls wait for its share"
    assert shared.waiting() == 3
    gate.open.set()
    assert sorted(await asyncio.gather(*greedy)) == [f"greedy-{i}" for i in range(5)]
    assert await other == "other"


async def test_a_free_thread_goes_to_the_uid_with_the_fewest_running(gate: Gate) -> None:
    shared = pool(threads=2, uid_threads=2)
    release_first = threading.Event()
    running = [asyncio.create_task(shared.run(1, gate.call("a-0", until=release_first))),
               asyncio.create_task(shared.run(1, gate.call("a-1")))]
    await gate.wait_started(2)
    waiting_a = asyncio.create_task(shared.run(1, gate.call("a-2")))  # uid 1 asked first...
    await asyncio.sleep(0)
    waiting_b = asyncio.create_task(shared.run(2, gate.call("b-0")))
    await asyncio.sleep(0)

    release_first.set()  # ...but when a thread comes free, uid 2, with nothing running, gets it
    assert (await gate.wait_started(3))[2] == "b-0"

    gate.open.set()
    await asyncio.gather(*running, waiting_a, waiting_b)


async def test_a_uids_line_is_bounded_and_refused_at_once(gate: Gate) -> None:
    shared = pool(threads=4, uid_threads=1, uid_waiting=2)
    tasks = [asyncio.create_task(shared.run(7, gate.call(f"c-{i}"))) for i in range(3)]  # one runs, two wait
    await gate.wait_started(1)
    await asyncio.sleep(0)

    async with asyncio.timeout(BOUND):
        with pytest.raises(PoolBusyError, match=r"^2 calls of its uid already wait for a test-pool thread$"):
            await shared.run(7, gate.call("refused"))
    assert shared.accepts(8), "another uid is not refused"
    assert not shared.accepts(7)

    gate.open.set()
    await asyncio.gather(*tasks)
    assert "refused" not in gate.started


async def test_a_bounded_wait_gives_up_without_running_the_call(gate: Gate) -> None:
    shared = pool(threads=1, uid_threads=1)
    hung = asyncio.create_task(shared.run(7, gate.call("hung")))
    await gate.wait_started(1)

    async with asyncio.timeout(BOUND):
        with pytest.raises(PoolBusyError, match=r"^no test-pool thread came free for its uid within 0.2 s$"):
            await shared.run(9, gate.call("late"), max_wait=0.2)

    assert shared.waiting() == 0, "the call that gave up left the line"
    gate.open.set()
    await hung
    assert gate.started == ["hung"]


async def test_a_caller_that_gives_up_leaves_the_call_running_and_its_share_taken(gate: Gate) -> None:
    shared = pool(threads=4, uid_threads=1)
    discarded: list[object] = []
    abandoned = asyncio.create_task(shared.run(7, gate.call("abandoned", result="an open file"),
                                               discard=discarded.append))
    await gate.wait_started(1)
    abandoned.cancel()
    with pytest.raises(asyncio.CancelledError):
        await abandoned

    assert [call.uid for call in shared.busy()] == [7], "a thread cannot be interrupted: the call still runs"
    second = asyncio.create_task(shared.run(7, gate.call("second")))
    await asyncio.sleep(0.1)
    assert gate.started == ["abandoned"], "uid 7's share is still taken by the call nobody waits for"

    gate.open.set()
    assert await asyncio.wait_for(second, BOUND) == "second"
    assert discarded == ["an open file"], "what the abandoned call returned was handed to discard"


async def test_a_call_that_raises_reaches_its_caller_and_the_thread_lives_on() -> None:
    shared = pool(threads=1, uid_threads=1)

    def fails() -> object:
        raise PermissionError("no ptrace access")

    with pytest.raises(PermissionError, match="no ptrace access"):
        await asyncio.wait_for(shared.run(1, fails), BOUND)
    assert await asyncio.wait_for(shared.run(1, lambda: "still serving"), BOUND) == "still serving"


async def test_threads_are_daemon_threads_named_after_the_pool() -> None:
    shared = pool()

    thread = await asyncio.wait_for(shared.run(1, threading.current_thread), BOUND)

    assert thread.daemon, "a call that never returns must not keep the agent from exiting"
    assert thread.name.startswith("test-pool-")


async def test_stalled_only_once_every_thread_hangs(gate: Gate) -> None:
    clock = FakeClock()
    shared = pool(threads=2, uid_threads=1, clock=clock)
    first = asyncio.create_task(shared.run(1000, gate.call("one")))
    await gate.wait_started(1)
    clock.now += 30
    second = asyncio.create_task(shared.run(2000, gate.call("two")))
    await gate.wait_started(2)
    clock.now += 40

    assert [(call.uid, call.seconds) for call in shared.busy()] == [(1000, 70.0), (2000, 40.0)]
    assert shared.stalled(60) is None, "one hung thread holds its uid's share; the other serves everyone else"
    clock.now += 25
    assert shared.stalled(60) == (
        "all 2 test-pool threads have been busy for more than 60 s (the longest for 95 s; uids 1000, 2000)"
    )
    assert stalled_attestation([object(), shared], 60) == shared.stalled(60)
    assert stalled_attestation([object()], 60) is None

    gate.open.set()
    await asyncio.gather(first, second)
    assert shared.stalled(60) is None


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"threads": 0}, "threads must be positive, got 0"),
        ({"uid_threads": 0}, r"uid_threads must be between 1 and threads \(4\), got 0"),
        ({"uid_threads": 5}, r"uid_threads must be between 1 and threads \(4\), got 5"),
        ({"uid_waiting": -1}, "uid_waiting must not be negative, got -1"),
    ],
)
def test_bad_pools_are_refused(options: dict[str, int], message: str) -> None:
    settings = {"threads": 4, "uid_threads": 2, "uid_waiting": 8, **options}
    with pytest.raises(ValueError, match=f"^{message}$"):
        AttestationPool(name="test-pool", **settings)
