"""The TPM's owner thread: one daemon thread that runs every TPM operation, in order.

Why not a ThreadPoolExecutor: Python joins an executor's threads when the interpreter exits, so a
TPM that stopped answering mid-command (a hung device, a stopped simulator) would keep the agent
from ever exiting, and systemd would have to kill it. This thread is a daemon: TpmService.close()
waits for it a bounded time, and then the process may exit with the operation still stuck.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any, ParamSpec, TypeVar

__all__ = ["OwnerThread"]

_P = ParamSpec("_P")
_T = TypeVar("_T")

_STOP = object()


class OwnerThread(Executor):
    """A single daemon worker thread as a concurrent.futures.Executor (asyncio's run_in_executor takes it)."""

    def __init__(self, name: str) -> None:
        self._work: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._shut = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, fn: Callable[_P, _T], /, *args: _P.args, **kwargs: _P.kwargs) -> Future[_T]:
        with self._lock:
            if self._shut:
                raise RuntimeError("the TPM owner thread is shut down")
            future: Future[_T] = Future()
            self._work.put((future, fn, args, kwargs))
            return future

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if not self._shut:
                self._shut = True
                self._work.put(_STOP)
        if cancel_futures:
            self._cancel_queued()
        if wait:
            self._thread.join()

    def join(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the thread to end (after shutdown); True if it did."""
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _cancel_queued(self) -> None:
        while True:
            try:
                item = self._work.get_nowait()
            except queue.Empty:
                return
            if item is _STOP:
                self._work.put(_STOP)
                return
            item[0].cancel()

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is _STOP:
                return
            future, fn, args, kwargs = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args, **kwargs)
            except BaseException as err:  # handed to whoever awaits it, like any executor
                future.set_exception(err)
            else:
                future.set_result(result)
