"""Threads for the blocking steps of workload attestation, shared fairly between uids.

Opening a caller's executable, and hashing it, wait for as long as the file system it lives on wants:
a FUSE server the caller runs itself, an NFS server that went away. On asyncio's default pool, six
such calls stopped every later caller of the agent. An AttestationPool bounds that:

- at most `threads` calls run at once, at most `uid_threads` of them for one uid: a uid whose reads
  hang holds its own share, never the threads the other uids need;
- a call that finds its uid's share (or every thread) in use waits in its uid's line, first come first
  served, and the uids with waiting calls take turns as threads come free. At most `uid_waiting` calls
  of one uid wait; more are refused at once (PoolBusyError), and a wait can be bounded (`max_wait`);
- nothing interrupts a thread: a caller that stops waiting (its deadline passed) leaves its call to
  finish, and the call keeps its uid's share until it does. What such a call returns is handed to
  `discard` (an open file gets closed);
- threads are daemon threads, so a call that never returns cannot keep the agent from exiting; and how
  long every running call has run is known (`busy`, `stalled`), so that the watchdog can tell.

Every count is kept on the event loop's thread; worker threads only run calls and hand back results.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
import weakref
from collections import Counter, deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol, TypeVar, runtime_checkable

from vouchd.errors import VouchdError

__all__ = ["AttestationPool", "BusyCall", "PoolBusyError", "ReportsStalls", "stalled_attestation"]

T = TypeVar("T")

# Work handed to a worker thread: the call, and where its outcome goes. None stops the worker.
_Work = tuple[Callable[[], object], "asyncio.Future[object]", asyncio.AbstractEventLoop] | None


class PoolBusyError(VouchdError):
    """A call was not run: its uid has too many calls waiting, or no thread came free in time."""


@dataclass(frozen=True, slots=True)
class BusyCall:
    """A call running on a thread of the pool: for whom, and for how long so far."""

    uid: int
    seconds: float


@runtime_checkable
class ReportsStalls(Protocol):
    """What a workload attestor with threads of its own may also have, so the watchdog can see them."""

    def stalled(self, older_than: float) -> str | None:
        """Why the attestor cannot serve callers because its threads hang, or None."""
        ...


def stalled_attestation(attestors: Iterable[object], older_than: float) -> str | None:
    """The first reason any of `attestors` gives for being stuck (ReportsStalls), or None."""
    for attestor in attestors:
        if isinstance(attestor, ReportsStalls) and (problem := attestor.stalled(older_than)) is not None:
            return problem
    return None


class AttestationPool:
    """A bounded set of daemon threads with a share per uid (see the module's docstring)."""

    def __init__(
        self,
        *,
        name: str,
        threads: int,
        uid_threads: int,
        uid_waiting: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if threads <= 0:
            raise ValueError(f"threads must be positive, got {threads}")
        if not 0 < uid_threads <= threads:
            raise ValueError(f"uid_threads must be between 1 and threads ({threads}), got {uid_threads}")
        if uid_waiting < 0:
            raise ValueError(f"uid_waiting must not be negative, got {uid_waiting}")
        self.name = name
        self.threads = threads
        self.uid_threads = uid_threads
        self.uid_waiting = uid_waiting
        self._clock = clock
        self._running = 0
        self._running_per_uid: Counter[int] = Counter()
        self._started: dict[int, tuple[int, float]] = {}  # by call number: uid and start of every running call
        self._calls = 0
        self._lines: dict[int, deque[asyncio.Future[None]]] = {}  # per uid, the calls waiting for a thread
        self._turns: deque[int] = deque()  # uids with waiting calls, in the order they get a thread
        self._work: queue.SimpleQueue[_Work] = queue.SimpleQueue()
        self._idle = threading.Semaphore(0)  # released by each worker that waits for work
        self._workers: list[threading.Thread] = []
        # Workers hold the queue, not the pool: a pool nobody uses any more stops its threads.
        weakref.finalize(self, _stop_workers, self._work, self._workers)

    async def run(
        self,
        uid: int,
        call: Callable[[], T],
        *,
        max_wait: float | None = None,
        discard: Callable[[T], object] | None = None,
    ) -> T:
        """Run `call` on a thread of the pool, counted against `uid`'s share, and return what it returns.

        Waits while the uid's share or every thread is in use. Raises PoolBusyError, without running
        the call, when `uid_waiting` calls of the uid already wait, or when no thread came free within
        `max_wait` seconds. A caller cancelled while the call runs does not stop it: `discard` then gets
        its result, and the uid's share stays taken until it returns.
        """
        loop = asyncio.get_running_loop()
        if uid in self._lines or not self._has_room(uid):
            await self._wait_for_thread(uid, loop, max_wait)
        else:
            self._take(uid)
        try:
            outcome = self._submit(uid, call, loop)
        except BaseException:
            self._give_back(uid)
            raise
        try:
            result: T = await asyncio.shield(outcome)  # type: ignore[arg-type]
        except asyncio.CancelledError:
            if discard is not None:
                outcome.add_done_callback(lambda done: _discard(done, discard))
            raise
        return result

    def accepts(self, uid: int) -> bool:
        """Whether a call of `uid` would now run or wait rather than be refused for its uid's line."""
        return self._has_room(uid) or len(self._lines.get(uid, ())) < self.uid_waiting

    def busy(self) -> Sequence[BusyCall]:
        """Every running call, the longest-running first."""
        now = self._clock()
        calls = [BusyCall(uid, now - started) for uid, started in self._started.values()]
        return sorted(calls, key=lambda call: call.seconds, reverse=True)

    def waiting(self) -> int:
        """How many calls wait for a thread."""
        return sum(len(line) for line in self._lines.values())

    def stalled(self, older_than: float) -> str | None:
        """Why the pool serves nobody: every thread has run one call for more than `older_than` s; or None.

        A few hung threads are not a reason: they hold the shares of the uids whose files hang, and
        the other threads serve everyone else. Once all of them hang, no caller's executable can be
        read until they return, and restarting the agent is what ends them.
        """
        hung = [call for call in self.busy() if call.seconds > older_than]
        if len(hung) < self.threads:
            return None
        uids = ", ".join(str(uid) for uid in sorted({call.uid for call in hung}))
        return (
            f"all {self.threads} {self.name} threads have been busy for more than {older_than:g} s "
            f"(the longest for {hung[0].seconds:.0f} s; uids {uids})"
        )

    def _has_room(self, uid: int) -> bool:
        return self._running < self.threads and self._running_per_uid[uid] < self.uid_threads

    def _take(self, uid: int) -> None:
        self._running += 1
        self._running_per_uid[uid] += 1

    def _give_back(self, uid: int) -> None:
        self._running -= 1
        self._running_per_uid[uid] -= 1
        if self._running_per_uid[uid] <= 0:
            del self._running_per_uid[uid]
        self._hand_out()

    async def _wait_for_thread(self, uid: int, loop: asyncio.AbstractEventLoop, max_wait: float | None) -> None:
        line = self._lines.get(uid)
        if line is not None and len(line) >= self.uid_waiting:
            raise PoolBusyError(f"{len(line)} calls of its uid already wait for a {self.name} thread")
        if self.uid_waiting == 0:
            raise PoolBusyError(f"its uid's share of {self.name} threads is in use")
        if line is None:
            line = self._lines[uid] = deque()
            self._turns.append(uid)
        turn: asyncio.Future[None] = loop.create_future()
        line.append(turn)
        try:
            async with asyncio.timeout(max_wait):
                await turn
        except BaseException as err:
            if turn.done() and not turn.cancelled():
                self._give_back(uid)  # the thread came free as the wait ended: pass it on
            else:
                self._leave_line(uid, turn)
            if isinstance(err, TimeoutError):
                raise PoolBusyError(f"no {self.name} thread came free for its uid within {max_wait:g} s") from None
            raise

    def _leave_line(self, uid: int, turn: asyncio.Future[None]) -> None:
        line = self._lines.get(uid)
        if line is None or turn not in line:
            return
        line.remove(turn)
        if not line:
            del self._lines[uid]
            self._turns.remove(uid)

    def _hand_out(self) -> None:
        """Give free threads to waiting calls: first to the uid with the fewest running (the longest
        waiting among equals), each uid's calls in order."""
        while self._running < self.threads and self._turns:
            candidates = [uid for uid in self._turns if self._running_per_uid[uid] < self.uid_threads]
            if not candidates:
                return  # every uid that waits already has its share running
            uid = min(candidates, key=lambda candidate: self._running_per_uid[candidate])  # first of equals
            self._turns.remove(uid)
            self._turns.append(uid)
            line = self._lines[uid]
            turn = line.popleft()
            if not line:
                del self._lines[uid]
                self._turns.remove(uid)
            if turn.done():  # its caller was cancelled and has not left the line yet
                continue
            self._take(uid)
            turn.set_result(None)

    def _submit(self, uid: int, call: Callable[[], object], loop: asyncio.AbstractEventLoop) -> asyncio.Future[object]:
        outcome: asyncio.Future[object] = loop.create_future()
        self._calls += 1
        number = self._calls
        self._started[number] = (uid, self._clock())
        outcome.add_done_callback(lambda _: self._finished(number, uid))
        self._work.put((call, outcome, loop))
        # As concurrent.futures does: a new thread only when none is idle, never more than `threads`
        # (the counts above never let more calls run than there are threads).
        if not self._idle.acquire(blocking=False) and len(self._workers) < self.threads:
            worker = threading.Thread(
                target=_work, args=(self._work, self._idle), name=f"{self.name}-{len(self._workers)}", daemon=True
            )
            worker.start()
            self._workers.append(worker)
        return outcome

    def _finished(self, number: int, uid: int) -> None:
        del self._started[number]
        self._give_back(uid)


def _work(work: queue.SimpleQueue[_Work], idle: threading.Semaphore) -> None:
    while (item := work.get()) is not None:
        call, outcome, loop = item
        del item
        try:
            result, error = call(), None
        except BaseException as err:  # handed to the caller, whatever it is: a worker never dies of a call
            result, error = None, err
        del call
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is left to tell
            loop.call_soon_threadsafe(_settle, outcome, result, error)
        del result, error, outcome
        idle.release()


def _settle(outcome: asyncio.Future[object], result: object, error: BaseException | None) -> None:
    if outcome.done():
        return
    if error is not None:
        outcome.set_exception(error)
    else:
        outcome.set_result(result)


def _discard(done: asyncio.Future[object], discard: Callable[[T], object]) -> None:
    if not done.cancelled() and done.exception() is None:
        discard(done.result())  # type: ignore[arg-type]


def _stop_workers(work: queue.SimpleQueue[_Work], workers: list[threading.Thread]) -> None:
    for _ in workers:
        work.put(None)
