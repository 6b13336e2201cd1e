"""The `unix` workload attestor: who the kernel says the caller is, and which binary it runs.

Selectors: `unix:uid`, `unix:user`, `unix:gid`, `unix:group` (from SO_PEERCRED), `unix:supplementary_gid`,
`unix:supplementary_group` (from /proc/<pid>/status), `unix:path` and `unix:sha256` of the executable.

The executable is always reached through /proc/<pid>/exe, never through its path: a path can be
re-pointed at another file between the readlink and the open, the magic link cannot. A process whose
executable was deleted gets neither `path` nor `sha256`: what it runs is no longer on disk to compare.

Hashing is the one expensive step, and any local user can trigger it (a chmod or a copy makes a file
the cache has never seen). It is therefore bounded in bytes, per uid, and in concurrency, and it never
makes a caller wait: a hash that does not fit the budget now is not done, and the caller gets no
`unix:sha256` selector, so entries that require one do not match it (see ExecutableHasher).
"""

from __future__ import annotations

import asyncio
import enum
import grp
import hashlib
import logging
import os
import pwd
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vouchd.attestors.base import WorkloadProcess
from vouchd.attestors.errors import AttestorError, ProcessExitedError, ProcessInfoError
from vouchd.attestors.workload.procfs import PROC_ROOT, read_supplementary_groups
from vouchd.errors import ConfigError
from vouchd.selectors import Selector, SelectorKind, absolute_path, decimal_id, matching

__all__ = [
    "DEFAULT_HASH_BURST_BYTES",
    "DEFAULT_HASH_BYTES_PER_SECOND",
    "DEFAULT_HASH_CACHE_ENTRIES",
    "DEFAULT_HASH_QUEUE_LIMIT",
    "DEFAULT_HASH_UID_SHARE",
    "DEFAULT_MAX_HASH_BYTES",
    "HASH_THREADS",
    "MIN_HASH_COST",
    "SELECTOR_KINDS",
    "ExecutableFile",
    "ExecutableHasher",
    "FileIdentity",
    "HashBudget",
    "HashRefusal",
    "UnixAttestor",
    "inspect_executable",
]

_log = logging.getLogger("vouchd.attestors.unix")

_NAME = "unix"
_DELETED_SUFFIX = " (deleted)"
_MIB = 1024 * 1024
DEFAULT_MAX_HASH_BYTES = 512 * _MIB
DEFAULT_HASH_BYTES_PER_SECOND = 256 * _MIB
DEFAULT_HASH_BURST_BYTES = 1024 * _MIB
DEFAULT_HASH_UID_SHARE = 0.5
DEFAULT_HASH_CACHE_ENTRIES = 4096
DEFAULT_HASH_QUEUE_LIMIT = 8
HASH_THREADS = 2
MIN_HASH_COST = _MIB  # what a hash of a tiny file costs: floods of small files are bounded too

# Exactly the values attest() emits, so that an entry written with any other can be refused as one
# that never matches: ids as str(int) of what the kernel reports, names as NSS returns them (never
# empty, never padded with spaces), the path as /proc/<pid>/exe reads, the digest as hexdigest().
_DECIMAL_ID = "a decimal number (no sign, spaces or leading zeros) below 4294967295"
_NAME_VALUE = r"\S(?:.*\S)?"
SELECTOR_KINDS = (
    SelectorKind(_NAME, "uid", decimal_id(f"a uid is {_DECIMAL_ID}, e.g. unix:uid:1000")),
    SelectorKind(_NAME, "user", matching(_NAME_VALUE, "a user is a name without spaces at either end, "
                                                      "e.g. unix:user:www-data")),
    SelectorKind(_NAME, "gid", decimal_id(f"a gid is {_DECIMAL_ID}, e.g. unix:gid:1000")),
    SelectorKind(_NAME, "group", matching(_NAME_VALUE, "a group is a name without spaces at either end, "
                                                       "e.g. unix:group:www-data")),
    SelectorKind(_NAME, "supplementary_gid", decimal_id(f"a supplementary_gid is {_DECIMAL_ID}, "
                                                        "e.g. unix:supplementary_gid:1000")),
    SelectorKind(_NAME, "supplementary_group", matching(_NAME_VALUE, "a supplementary_group is a name without spaces "
                                                                     "at either end, e.g. "
                                                                     "unix:supplementary_group:docker")),
    SelectorKind(_NAME, "path", absolute_path("a path is absolute and normalised, as the kernel reports it, "
                                              "e.g. unix:path:/usr/bin/python3.12")),
    SelectorKind(_NAME, "sha256", matching(r"[0-9a-f]{64}", "a sha256 is 64 lowercase hex digits, "
                                                            "as sha256sum prints it")),
)


@dataclass(frozen=True, slots=True)
class FileIdentity:
    """Which file, in which state: the sha256 cache key.

    ctime, unlike mtime, cannot be set by the file's owner, and every content change moves it.
    """

    device: int
    inode: int
    ctime_ns: int
    size: int

    @classmethod
    def of(cls, status: os.stat_result) -> FileIdentity:
        return cls(status.st_dev, status.st_ino, status.st_ctime_ns, status.st_size)


@dataclass(frozen=True, slots=True)
class ExecutableFile:
    """The executable a process runs: its path as the kernel names it, and the file behind it."""

    path: str
    identity: FileIdentity


def inspect_executable(pid: int, *, proc_root: Path = PROC_ROOT) -> ExecutableFile | None:
    """The executable of a process, or None when it was deleted (or replaced) after exec.

    Raises ProcessExitedError if the process is gone, PermissionError without ptrace access to it,
    AttestorError if the process exec'd something else while it was being inspected.
    """
    exe = proc_root / str(pid) / "exe"
    try:
        fd = os.open(exe, os.O_RDONLY | os.O_CLOEXEC)
        try:
            opened = os.fstat(fd)
            link = os.readlink(exe)
            # Following the magic link again after the readlink proves the name belongs to the file we
            # opened: an exec in between would show up as a different inode.
            current = os.stat(exe)
        finally:
            os.close(fd)
    except (FileNotFoundError, ProcessLookupError) as err:
        raise ProcessExitedError(f"process {pid} has exited") from err
    if (opened.st_dev, opened.st_ino) != (current.st_dev, current.st_ino):
        raise AttestorError(_NAME, f"process {pid} replaced its executable during attestation")
    if opened.st_nlink == 0 or link.endswith(_DELETED_SUFFIX):
        return None
    return ExecutableFile(path=link, identity=FileIdentity.of(opened))


class HashRefusal(enum.Enum):
    """Why a file was not hashed now; the value is the reason as logged."""

    UID_SHARE_USED = "its uid has used up its share of the hashing budget"
    BUDGET_USED = "the hashing budget is used up"
    QUEUE_FULL = "the hash queue is full"


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


class ExecutableHasher:
    """sha256 of executables read through /proc/<pid>/exe: size-bounded, cached, budgeted, never waited for.

    Any local user can start binaries and connect, so hashing is a DoS vector. A cache miss costs
    bytes of a HashBudget (shared, and per uid) and a place in a bounded queue in front of a small
    executor of its own (HASH_THREADS threads), so hashes never occupy the event loop's default
    thread pool that other attestation steps use. When either is used up the file is not hashed:
    the caller gets no sha256, which fails closed, and a warning names the uid and the file. Files
    above `max_bytes` are not hashed at all. Cache hits, and joining a hash of the same file already
    under way, are free.
    """

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_HASH_BYTES,
        budget: HashBudget | None = None,
        queue_limit: int = DEFAULT_HASH_QUEUE_LIMIT,
        cache_entries: int = DEFAULT_HASH_CACHE_ENTRIES,
        proc_root: Path = PROC_ROOT,
    ) -> None:
        """`queue_limit` bounds the hashes started and not finished, the running ones included."""
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
        self._cache_entries = cache_entries
        self._proc_root = proc_root
        # Threads start on first use and end when the hasher is collected.
        self._executor = ThreadPoolExecutor(max_workers=HASH_THREADS, thread_name_prefix="vouchd-hash")
        self._cache: OrderedDict[FileIdentity, str] = OrderedDict()
        self._in_flight: dict[FileIdentity, asyncio.Future[str]] = {}

    async def sha256(self, process: WorkloadProcess, executable: ExecutableFile) -> str | None:
        """Hex sha256 of the executable of `process`, which must still be the file `executable` names.

        None when the file is not hashed: above max_bytes, or refused by the budget or the queue.
        Every caller opens its own process's executable before joining a hash, and concurrent callers
        of one file share one read of it. The shared read works on an open file, not on a pid: a
        caller whose process exits meanwhile cannot make the others fail (a file once opened stays
        readable after its process is gone).
        """
        identity = executable.identity
        if identity.size > self._max_bytes:
            self._warn_not_hashed(process, executable, f"{identity.size} bytes is above the {self._max_bytes} limit")
            return None
        if (cached := self._cached(identity)) is not None:
            return cached
        fd = await self._open_executable(process.pid, identity)
        try:
            hashing = self._in_flight.get(identity)
            if hashing is None:
                # Another caller may have hashed the same file while this one opened it.
                if (cached := self._cached(identity)) is not None:
                    return cached
                refusal = self._admit(process.uid, identity.size)
                if refusal is not None:
                    self._warn_not_hashed(process, executable, refusal.value)
                    return None
                hashing = self._start_hash(fd, identity)
            # The worker thread cannot be interrupted: a caller hitting its deadline leaves the hash to
            # finish and fill the cache; its cost is already paid and its queue place stays taken.
            return await asyncio.shield(hashing)
        finally:
            os.close(fd)

    def digest_file(self, fd: int) -> str:
        """Hex sha256 of the whole file behind `fd`, read from its start. Runs in a hashing thread."""
        with os.fdopen(os.dup(fd), "rb") as file:
            file.seek(0)
            return hashlib.file_digest(file, "sha256").hexdigest()

    def _admit(self, uid: int, size: int) -> HashRefusal | None:
        # The queue first: a hash refused for want of a thread must not spend the uid's budget.
        if len(self._in_flight) >= self._queue_limit:
            return HashRefusal.QUEUE_FULL
        return self._budget.spend(uid, size)

    def _start_hash(self, fd: int, identity: FileIdentity) -> asyncio.Future[str]:
        # The read gets its own descriptor: it may outlive the caller that started it.
        executable = os.fdopen(os.dup(fd), "rb")
        try:
            hashing = asyncio.get_running_loop().run_in_executor(self._executor, self._hash_file, executable, identity)
        except BaseException:
            executable.close()
            raise
        self._in_flight[identity] = hashing
        hashing.add_done_callback(lambda done: self._finish(identity, done))
        return hashing

    def _cached(self, identity: FileIdentity) -> str | None:
        digest = self._cache.get(identity)
        if digest is not None:
            self._cache.move_to_end(identity)
        return digest

    def _finish(self, identity: FileIdentity, done: asyncio.Future[str]) -> None:
        self._in_flight.pop(identity, None)
        # Retrieving the exception also keeps asyncio from logging it when every waiter gave up.
        if done.cancelled() or done.exception() is not None:
            return
        self._cache[identity] = done.result()
        self._cache.move_to_end(identity)
        while len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)

    async def _open_executable(self, pid: int, identity: FileIdentity) -> int:
        opening = asyncio.ensure_future(asyncio.to_thread(self._open_verified, pid, identity))
        try:
            return await asyncio.shield(opening)
        except asyncio.CancelledError:
            # The open runs on in its thread: whatever it opens must still be closed.
            opening.add_done_callback(_close_opened)
            raise

    def _open_verified(self, pid: int, identity: FileIdentity) -> int:
        try:
            fd = os.open(self._proc_root / str(pid) / "exe", os.O_RDONLY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError) as err:
            raise ProcessExitedError(f"process {pid} has exited") from err
        try:
            if FileIdentity.of(os.fstat(fd)) != identity:
                raise AttestorError(_NAME, f"process {pid} replaced its executable during attestation")
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _hash_file(self, executable: BinaryIO, identity: FileIdentity) -> str:
        with executable:
            digest = self.digest_file(executable.fileno())
            if FileIdentity.of(os.fstat(executable.fileno())) != identity:
                # Every caller of this file shares the read: name the file, not one caller's process.
                raise AttestorError(_NAME, f"executable (inode {identity.inode}) changed while it was hashed")
            return digest

    @staticmethod
    def _warn_not_hashed(process: WorkloadProcess, executable: ExecutableFile, reason: str) -> None:
        _log.warning(
            "not hashing %s, the executable of pid %d uid %d: %s; omitting sha256",
            executable.path,
            process.pid,
            process.uid,
            reason,
            extra={"pid": process.pid, "uid": process.uid, "executable": executable.path},
        )


def _close_opened(done: asyncio.Future[int]) -> None:
    if not done.cancelled() and done.exception() is None:
        os.close(done.result())


@dataclass(frozen=True, slots=True)
class _ProcessFacts:
    user: str | None
    group: str | None
    supplementary_groups: tuple[tuple[int, str | None], ...]
    executable: ExecutableFile | None


class UnixAttestor:
    """Selectors from the caller's kernel credentials and executable.

    Options (the `unix:` mapping of `workload_attestors` in the agent's configuration):

    - `hash_executables` (bool, true): compute `unix:sha256` of the caller's executable.
    - `max_hash_bytes` (int, 512 MiB): larger executables are never hashed.
    - `hash_bytes_per_second` (int, 256 MiB): how many bytes of executables not yet in the cache all
      callers together may have hashed per second, on average.
    - `hash_burst_bytes` (int, 1 GiB): how many bytes may be hashed at once after a quiet spell.
    - `hash_uid_share` (number, 0.5): the part of both that the callers of one uid may use, so that
      one user cannot take the whole budget; 1 lets one uid use all of it. hash_burst_bytes times
      hash_uid_share must be at least max_hash_bytes.

    A hash that does not fit the budget, or finds the hash queue full, is not waited for: that call
    gets no `unix:sha256` (entries that require it do not match: fails closed) and a warning names the
    uid and the file. Cached hashes cost nothing.
    """

    name = _NAME
    produces = SELECTOR_KINDS

    def __init__(
        self,
        *,
        hash_executables: bool = True,
        max_hash_bytes: int = DEFAULT_MAX_HASH_BYTES,
        hash_bytes_per_second: int = DEFAULT_HASH_BYTES_PER_SECOND,
        hash_burst_bytes: int = DEFAULT_HASH_BURST_BYTES,
        hash_uid_share: float = DEFAULT_HASH_UID_SHARE,
        hasher: ExecutableHasher | None = None,
    ) -> None:
        """`hasher` replaces the one built from the hash options (tests, shared caches)."""
        if not isinstance(hash_executables, bool):
            raise ConfigError("workloadattestor(unix): hash_executables must be true or false")
        for option, value in (
            ("max_hash_bytes", max_hash_bytes),
            ("hash_bytes_per_second", hash_bytes_per_second),
            ("hash_burst_bytes", hash_burst_bytes),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"workloadattestor(unix): {option} must be a positive integer")
        share = hash_uid_share
        if isinstance(share, bool) or not isinstance(share, int | float) or not 0 < share <= 1:
            raise ConfigError("workloadattestor(unix): hash_uid_share must be a number above 0 and at most 1")
        if hash_burst_bytes * share < max_hash_bytes:
            raise ConfigError(
                f"workloadattestor(unix): hash_burst_bytes times hash_uid_share ({int(hash_burst_bytes * share)}) must "
                f"be at least max_hash_bytes ({max_hash_bytes}), or the largest executables could never be hashed"
            )
        if hasher is not None and not isinstance(hasher, ExecutableHasher):
            raise ConfigError("workloadattestor(unix): hasher must be an ExecutableHasher")
        self._hash_executables = hash_executables
        self._hasher = hasher or ExecutableHasher(
            max_bytes=max_hash_bytes,
            budget=HashBudget(
                bytes_per_second=hash_bytes_per_second,
                burst_bytes=hash_burst_bytes,
                uid_share=float(share),
            ),
        )

    async def attest(self, process: WorkloadProcess) -> Sequence[Selector]:
        try:
            # Name lookups go through NSS (possibly LDAP): keep them off the event loop.
            facts = await asyncio.to_thread(self._describe, process)
            digest = None
            if self._hash_executables and facts.executable is not None:
                digest = await self._hasher.sha256(process, facts.executable)
        except ProcessInfoError as err:
            raise AttestorError(_NAME, str(err)) from err
        except OSError as err:
            raise AttestorError(_NAME, f"cannot inspect process {process.pid}: {err.strerror or err}") from err

        selectors = [Selector(_NAME, "uid", str(process.uid))]
        if facts.user is not None:
            selectors.append(Selector(_NAME, "user", facts.user))
        selectors.append(Selector(_NAME, "gid", str(process.gid)))
        if facts.group is not None:
            selectors.append(Selector(_NAME, "group", facts.group))
        for gid, group in facts.supplementary_groups:
            selectors.append(Selector(_NAME, "supplementary_gid", str(gid)))
            if group is not None:
                selectors.append(Selector(_NAME, "supplementary_group", group))
        if facts.executable is not None:
            selectors.append(Selector(_NAME, "path", facts.executable.path))
        if digest is not None:
            selectors.append(Selector(_NAME, "sha256", digest))
        return selectors

    def _describe(self, process: WorkloadProcess) -> _ProcessFacts:
        groups = read_supplementary_groups(process.pid)
        try:
            executable = inspect_executable(process.pid)
        except PermissionError:
            # Without root or CAP_SYS_PTRACE other users' executables are out of reach: entries that
            # need path or sha256 then cannot match, which is the safe direction.
            _log.warning(
                "cannot read the executable of pid %d: no ptrace access; omitting path and sha256",
                process.pid,
                extra={"pid": process.pid},
            )
            executable = None
        if executable is None:
            _log.debug("pid %d has no executable on disk to describe", process.pid, extra={"pid": process.pid})
        return _ProcessFacts(
            user=_user_name(process.uid),
            group=_group_name(process.gid),
            supplementary_groups=tuple((gid, _group_name(gid)) for gid in groups),
            executable=executable,
        )


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None
