"""sha256 of callers' executables (and of the scripts the interpreter attestor finds): size-bounded, cached,
budgeted per uid, on threads of its own.

Hashing is the one expensive step of the `unix` attestor, and any local user can trigger it (a chmod
or a copy makes a file the cache has never seen). So it is bounded in bytes (a HashBudget, shared and
per uid), in concurrency (a queue of at most `queue_limit` hashes, on an AttestationPool of
HASH_THREADS threads, one per uid), and it never makes a caller wait long: a hash that does not fit
the budget or the queue now, or gets no thread within HASH_WAIT_LIMIT, is not done, and the caller
gets no `unix:sha256`, so entries that require one do not match it.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import hashlib
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path

from vouchd.attestors.base import WorkloadProcess
from vouchd.attestors.errors import AttestorError
from vouchd.attestors.workload.executable import ExecutableFile, ExecutableReader, FileIdentity
from vouchd.attestors.workload.pool import AttestationPool, PoolBusyError
from vouchd.attestors.workload.procfs import PROC_ROOT
from vouchd.attestors.workload.throttle import UidWarnings
from vouchd.errors import VouchdError

__all__ = [
    "DEFAULT_HASH_BURST_BYTES",
    "DEFAULT_HASH_BYTES_PER_SECOND",
    "DEFAULT_HASH_CACHE_ENTRIES",
    "DEFAULT_HASH_QUEUE_LIMIT",
    "DEFAULT_HASH_UID_SHARE",
    "DEFAULT_MAX_HASH_BYTES",
    "HASH_THREADS",
    "HASH_WAIT_LIMIT",
    "MIN_HASH_COST",
    "ChangedWhileHashedError",
    "ExecutableHasher",
    "HashBudget",
    "HashRefusal",
]

_log = logging.getLogger("vouchd.attestors.unix")

_ATTESTOR = "unix"
_MIB = 1024 * 1024
DEFAULT_MAX_HASH_BYTES = 512 * _MIB
DEFAULT_HASH_BYTES_PER_SECOND = 256 * _MIB
DEFAULT_HASH_BURST_BYTES = 1024 * _MIB
DEFAULT_HASH_UID_SHARE = 0.5
DEFAULT_HASH_CACHE_ENTRIES = 4096
DEFAULT_HASH_QUEUE_LIMIT = 8
HASH_THREADS = 2
HASH_UID_THREADS = 1  # so that one uid whose file hangs while it is read leaves the other thread to the rest
HASH_WAIT_LIMIT = 2.0  # for a hashing thread; then the hash is dropped, and its callers get no sha256
MIN_HASH_COST = _MIB  # what a hash of a tiny file costs: floods of small files are bounded too


class HashRefusal(enum.Enum):
    """Why a file was not hashed now; the value is the reason as logged."""

    UID_SHARE_USED = "its uid has used up its share of the hashing budget"
    BUDGET_USED = "the hashing budget is used up"
    QUEUE_FULL = "the hash queue is full"
    UID_QUEUE_FULL = "its uid has its share of the hash queue"


class _ByteBucket:
    """Bytes that may be hashed now: refilled at `rate` per second up to `capacity`."""

    __slots__ = ("capacity", "rate", "tokens", "updated")

    def __init__(self, rate: float, capacity: float, now: float) -> None:
        self.rate = rate
        self.capacity = capacity
        self.tokens = capacity
        self.updated = now

    def refill(self, now: float) -> float:
        self.tokens = min(self.capacity, self.tokens + max(0.0, now - self.updated) * self.rate)
        self.updated = now
        return self.tokens


class HashBudget:
    """How many bytes of executables may be hashed: by all callers together, and by each uid.

    Token buckets of bytes: a shared one, refilled at `bytes_per_second` up to `burst_bytes`, and one
    per uid, refilled at `uid_share` of that rate up to `uid_share` of that burst. With a share below
    1 no uid can take the whole budget, however much it asks for. Nobody waits for a refill: a hash
    that does not fit now is refused. A hash costs its file's size as stat reports it (a sparse file
    costs what it would take to read), at least MIN_HASH_COST.
    """

    def __init__(
        self,
        *,
        bytes_per_second: int = DEFAULT_HASH_BYTES_PER_SECOND,
        burst_bytes: int = DEFAULT_HASH_BURST_BYTES,
        uid_share: float = DEFAULT_HASH_UID_SHARE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if bytes_per_second <= 0:
            raise ValueError(f"bytes_per_second must be positive, got {bytes_per_second}")
        if burst_bytes <= 0:
            raise ValueError(f"burst_bytes must be positive, got {burst_bytes}")
        if not 0 < uid_share <= 1:
            raise ValueError(f"uid_share must be above 0 and at most 1, got {uid_share}")
        self._uid_rate = bytes_per_second * uid_share
        self._uid_capacity = burst_bytes * uid_share
        self._clock = clock
        self._shared = _ByteBucket(float(bytes_per_second), float(burst_bytes), clock())
        self._per_uid: dict[int, _ByteBucket] = {}

    @property
    def largest_hash(self) -> int:
        """The largest file one uid can ever have hashed: its share of the burst."""
        return int(self._uid_capacity)

    def spend(self, uid: int, size: int) -> HashRefusal | None:
        """Take the cost of hashing `size` bytes for `uid`, or say why not (and take nothing)."""
        now = self._clock()
        cost = min(float(max(size, MIN_HASH_COST)), self._uid_capacity)
        self._forget_refilled(now)
        own = self._per_uid.get(uid)
        if own is None:
            own = _ByteBucket(self._uid_rate, self._uid_capacity, now)
        if self._shared.refill(now) < cost:
            return HashRefusal.BUDGET_USED
        if own.refill(now) < cost:
            return HashRefusal.UID_SHARE_USED
        own.tokens -= cost
        self._shared.tokens -= cost
        self._per_uid[uid] = own
        return None

    def _forget_refilled(self, now: float) -> None:
        # A full bucket is the same as a new one: keeping only partly spent ones bounds the map by
        # the uids that hashed within the last few seconds (uid capacity / uid rate).
        for uid in [uid for uid, bucket in self._per_uid.items() if bucket.refill(now) >= bucket.capacity]:
            del self._per_uid[uid]


class ChangedWhileHashedError(AttestorError):
    """The file changed while it was read: its digest is of neither version."""


class _NotHashedError(VouchdError):
    """A hash under way was given up before a thread read the file: every caller waiting for it gets no sha256."""


class _HashJob:
    """The descriptor a hash reads, owned by whichever takes it first: the hashing thread, or the task
    that gave up on the hash before any thread started it (which closes it)."""

    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd
        self._lock = threading.Lock()

    def take(self) -> int | None:
        with self._lock:
            fd, self._fd = self._fd, None
            return fd

    def drop(self) -> None:
        if (fd := self.take()) is not None:
            os.close(fd)


class ExecutableHasher:
    """sha256 of executables read through /proc/<pid>/exe: size-bounded, cached, budgeted, never waited for long.

    A cache miss costs bytes of a HashBudget (shared, and per uid) and a place in a bounded queue
    (`queue_limit` hashes started and not finished, at most half of them for one uid) in front of an
    AttestationPool of its own (HASH_THREADS threads, HASH_UID_THREADS per uid). A hash that gets no
    thread within HASH_WAIT_LIMIT seconds is dropped. In each of these cases the file is not hashed:
    the caller gets no sha256, which fails closed, and a warning names the uid and the file (at most
    one per uid a minute). Files above `max_bytes` are not hashed at all. Cache hits, and joining a
    hash of the same file already under way, are free.

    Executables are opened by `reader` (an ExecutableReader, whose pool is also what the `unix`
    attestor inspects executables with): never one on a FUSE or network file system.
    """

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_HASH_BYTES,
        budget: HashBudget | None = None,
        queue_limit: int = DEFAULT_HASH_QUEUE_LIMIT,
        cache_entries: int = DEFAULT_HASH_CACHE_ENTRIES,
        proc_root: Path = PROC_ROOT,
        reader: ExecutableReader | None = None,
        pool: AttestationPool | None = None,
        wait_limit: float = HASH_WAIT_LIMIT,
    ) -> None:
        """`queue_limit` bounds the hashes started and not finished, the running ones included.

        `reader` defaults to an ExecutableReader on `proc_root`; `pool`, to HASH_THREADS threads.
        """
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if queue_limit <= 0:
            raise ValueError(f"queue_limit must be positive, got {queue_limit}")
        if cache_entries <= 0:
            raise ValueError(f"cache_entries must be positive, got {cache_entries}")
        budget = budget if budget is not None else HashBudget()
        if budget.largest_hash < max_bytes:
            # A file no uid's bucket can hold would be refused forever, however idle the host.
            raise ValueError(f"the budget's largest hash ({budget.largest_hash}) is below max_bytes ({max_bytes})")
        self._max_bytes = max_bytes
        self._budget = budget
        self._queue_limit = queue_limit
        self._uid_queue_limit = max(1, queue_limit // 2)
        self._cache_entries = cache_entries
        self._wait_limit = wait_limit
        self.reader = reader or ExecutableReader(proc_root=proc_root)
        # A uid's hashes beyond its running one wait in its line of the pool, within its share of the queue.
        self.pool = pool or AttestationPool(
            name="vouchd-hash", threads=HASH_THREADS, uid_threads=HASH_UID_THREADS, uid_waiting=queue_limit
        )
        self._cache: OrderedDict[FileIdentity, str] = OrderedDict()
        self._in_flight: dict[FileIdentity, asyncio.Task[str]] = {}
        self._in_flight_per_uid: dict[int, int] = {}
        self._warnings = UidWarnings(_log)

    async def sha256(self, process: WorkloadProcess, executable: ExecutableFile) -> str | None:
        """Hex sha256 of the executable of `process`, which must still be the file `executable` names.

        None when the file is not hashed: above max_bytes, refused by the budget or the queue, or not
        read in time. Every caller opens its own process's executable before joining a hash, and
        concurrent callers of one file share one read of it. The shared read works on an open file,
        not on a pid: a caller whose process exits meanwhile cannot make the others fail (a file once
        opened stays readable after its process is gone).
        """
        return await self.sha256_of_file(
            process, executable.path, executable.identity,
            functools.partial(self.reader.open, process, executable.identity), what="executable",
        )

    async def sha256_of_file(
        self,
        process: WorkloadProcess,
        path: str,
        identity: FileIdentity,
        open_file: Callable[[], Awaitable[int | None]],
        *,
        what: str,
    ) -> str | None:
        """Hex sha256 of another file of `process` (the interpreter attestor's scripts), under the same
        size limit, cache, budget, queue and threads as executables, or None when it is not hashed now.

        `identity` is the file's as its finder saw it; `open_file` is called only on a cache miss that
        fits the limit, and returns a descriptor open for reading on that very file (the hasher closes
        it), or None when it cannot be opened now (it has said why). It must have checked the file's
        file system as the ExecutableReader does. `path` and `what` ("script") name the file in warnings.
        Raises what `open_file` raises, and ChangedWhileHashedError if the file changed while read.
        """
        if identity.size > self._max_bytes:
            self._warn_not_hashed(process, path, what, f"{identity.size} bytes is above the {self._max_bytes} limit")
            return None
        if (cached := self._cached(identity)) is not None:
            return cached
        fd = await open_file()
        if fd is None:
            return None  # the opener said why
        try:
            hashing = self._in_flight.get(identity)
            if hashing is None:
                # Another caller may have hashed the same file while this one opened it.
                if (cached := self._cached(identity)) is not None:
                    return cached
                refusal = self._admit(process.uid, identity.size)
                if refusal is not None:
                    self._warn_not_hashed(process, path, what, refusal.value)
                    return None
                hashing = self._start_hash(process.uid, fd, identity, what)
            # The worker thread cannot be interrupted: a caller hitting its deadline leaves the hash to
            # finish and fill the cache; its cost is already paid and its queue place stays taken.
            return await asyncio.shield(hashing)
        except _NotHashedError as err:
            self._warn_not_hashed(process, path, what, str(err))
            return None
        finally:
            os.close(fd)

    def digest_file(self, fd: int) -> str:
        """Hex sha256 of the whole file behind `fd`, read from its start. Runs in a hashing thread."""
        with os.fdopen(os.dup(fd), "rb") as file:
            file.seek(0)
            return hashlib.file_digest(file, "sha256").hexdigest()

    def _admit(self, uid: int, size: int) -> HashRefusal | None:
        # The queue first: a hash refused for want of a place must not spend the uid's budget.
        if len(self._in_flight) >= self._queue_limit:
            return HashRefusal.QUEUE_FULL
        if self._in_flight_per_uid.get(uid, 0) >= self._uid_queue_limit or not self.pool.accepts(uid):
            return HashRefusal.UID_QUEUE_FULL
        return self._budget.spend(uid, size)

    def _start_hash(self, uid: int, fd: int, identity: FileIdentity, what: str) -> asyncio.Task[str]:
        # The read gets its own descriptor: it may outlive the caller that started it.
        job = _HashJob(os.dup(fd))
        hashing = asyncio.ensure_future(self._hash(uid, job, identity, what))
        self._in_flight[identity] = hashing
        self._in_flight_per_uid[uid] = self._in_flight_per_uid.get(uid, 0) + 1
        hashing.add_done_callback(lambda done: self._finish(uid, identity, done))
        return hashing

    async def _hash(self, uid: int, job: _HashJob, identity: FileIdentity, what: str) -> str:
        try:
            return await self.pool.run(uid, functools.partial(self._hash_file, job, identity, what),
                                       max_wait=self._wait_limit)
        except PoolBusyError as err:
            raise _NotHashedError(str(err)) from err
        finally:
            job.drop()  # unless a thread took it

    def _cached(self, identity: FileIdentity) -> str | None:
        digest = self._cache.get(identity)
        if digest is not None:
            self._cache.move_to_end(identity)
        return digest

    def _finish(self, uid: int, identity: FileIdentity, done: asyncio.Task[str]) -> None:
        self._in_flight.pop(identity, None)
        left = self._in_flight_per_uid.get(uid, 0) - 1
        if left > 0:
            self._in_flight_per_uid[uid] = left
        else:
            self._in_flight_per_uid.pop(uid, None)
        # Retrieving the exception also keeps asyncio from logging it when every waiter gave up.
        if done.cancelled() or done.exception() is not None:
            return
        self._cache[identity] = done.result()
        self._cache.move_to_end(identity)
        while len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)

    def _hash_file(self, job: _HashJob, identity: FileIdentity, what: str) -> str:
        fd = job.take()
        if fd is None:
            raise _NotHashedError("the hash was given up before it started")
        with os.fdopen(fd, "rb") as executable:
            digest = self.digest_file(executable.fileno())
            if FileIdentity.of(os.fstat(executable.fileno())) != identity:
                # Every caller of this file shares the read: name the file, not one caller's process.
                raise ChangedWhileHashedError(_ATTESTOR, f"{what} (inode {identity.inode}) changed while it was hashed")
            return digest

    def _warn_not_hashed(self, process: WorkloadProcess, path: str, what: str, reason: str) -> None:
        self._warnings.warn(
            process.uid, "hash",
            "not hashing %s, the %s of pid %d uid %d: %s; omitting sha256",
            path, what, process.pid, process.uid, reason,
            extra={"pid": process.pid, what: path},
        )
