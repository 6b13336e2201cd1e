"""The `unix` workload attestor: who the kernel says the caller is, and which binary it runs.

Selectors: `unix:uid`, `unix:user`, `unix:gid`, `unix:group` (from SO_PEERCRED), `unix:supplementary_gid`,
`unix:supplementary_group` (from /proc/<pid>/status), `unix:path` and `unix:sha256` of the executable.

The executable is always reached through /proc/<pid>/exe, never through its path: a path can be
re-pointed at another file between the readlink and the open, the magic link cannot. A process whose
executable was deleted gets neither `path` nor `sha256`: what it runs is no longer on disk to compare.
"""

from __future__ import annotations

import asyncio
import grp
import hashlib
import logging
import os
import pwd
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from vouchd.attestors.base import WorkloadProcess
from vouchd.attestors.errors import AttestorError, ProcessExitedError, ProcessInfoError
from vouchd.attestors.workload.procfs import PROC_ROOT, read_supplementary_groups
from vouchd.errors import ConfigError
from vouchd.selectors import Selector

__all__ = [
    "DEFAULT_HASHES_PER_SECOND",
    "DEFAULT_HASH_CACHE_ENTRIES",
    "DEFAULT_MAX_HASH_BYTES",
    "ExecutableFile",
    "ExecutableHasher",
    "FileIdentity",
    "TokenBucket",
    "UnixAttestor",
    "inspect_executable",
]

_log = logging.getLogger("vouchd.attestors.unix")

_NAME = "unix"
_DELETED_SUFFIX = " (deleted)"
DEFAULT_MAX_HASH_BYTES = 512 * 1024 * 1024
DEFAULT_HASHES_PER_SECOND = 20.0
DEFAULT_HASH_CACHE_ENTRIES = 4096


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


class TokenBucket:
    """Allows `rate` acquisitions per second on average, `capacity` at once; callers wait in turn."""

    def __init__(
        self,
        rate: float,
        *,
        capacity: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"token rate must be positive, got {rate}")
        self._rate = rate
        self._capacity = max(1.0, rate) if capacity is None else capacity
        if self._capacity < 1:
            raise ValueError(f"token bucket capacity must be at least 1, got {self._capacity}")
        self._clock = clock
        self._sleep = sleep
        self._tokens = self._capacity
        self._updated = clock()
        self._turn = asyncio.Lock()

    async def acquire(self) -> None:
        """Take one token, waiting for it if the bucket is empty; cancelling the wait takes none."""
        async with self._turn:
            while True:
                now = self._clock()
                self._tokens = min(self._capacity, self._tokens + (now - self._updated) * self._rate)
                self._updated = now
                if self._tokens >= 1:
                    self._tokens -= 1
                    return
                await self._sleep((1 - self._tokens) / self._rate)


class ExecutableHasher:
    """sha256 of executables read through /proc/<pid>/exe: size-bounded, cached, rate-limited.

    Any local user can start binaries and connect, so hashing is a DoS vector: every cache miss
    waits for a token, and files above `max_bytes` are not hashed at all. Cache hits are free.
    """

    def __init__(
        self,
        *,
        max_bytes: int = DEFAULT_MAX_HASH_BYTES,
        hashes_per_second: float = DEFAULT_HASHES_PER_SECOND,
        cache_entries: int = DEFAULT_HASH_CACHE_ENTRIES,
        proc_root: Path = PROC_ROOT,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        if max_bytes <= 0:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        if cache_entries <= 0:
            raise ValueError(f"cache_entries must be positive, got {cache_entries}")
        self._max_bytes = max_bytes
        self._cache_entries = cache_entries
        self._proc_root = proc_root
        self._bucket = TokenBucket(hashes_per_second, clock=clock, sleep=sleep)
        self._cache: OrderedDict[FileIdentity, str] = OrderedDict()
        self._in_flight: dict[FileIdentity, asyncio.Future[str]] = {}

    async def sha256(self, pid: int, identity: FileIdentity) -> str | None:
        """Hex sha256 of the executable of `pid`, which must still be the file `identity` names.

        None when the file is larger than max_bytes. Every caller opens its own process's executable
        before waiting for anything, and concurrent callers of one file share one read of it. The
        shared read works on an open file, not on a pid: a caller whose process exits meanwhile
        cannot make the others fail (a file once opened stays readable after its process is gone).
        """
        if identity.size > self._max_bytes:
            _log.warning(
                "not hashing the executable of pid %d: %d bytes is above the %d byte limit",
                pid,
                identity.size,
                self._max_bytes,
                extra={"pid": pid},
            )
            return None
        if (cached := self._cached(identity)) is not None:
            return cached
        fd = await self._open_executable(pid, identity)
        try:
            if identity not in self._in_flight:
                await self._bucket.acquire()
                # Another caller may have hashed the same file while this one waited for its token.
                if (cached := self._cached(identity)) is not None:
                    return cached
            hashing = self._in_flight.get(identity)
            if hashing is None:
                # The read gets its own descriptor: it may outlive this caller (see below).
                executable = os.fdopen(os.dup(fd), "rb")
                hashing = asyncio.ensure_future(asyncio.to_thread(self._hash_file, executable, identity))
                self._in_flight[identity] = hashing
                hashing.add_done_callback(lambda done: self._finish(identity, done))
            # The worker thread cannot be interrupted: a caller hitting its deadline leaves the hash to
            # finish and fill the cache instead of wasting the token.
            return await asyncio.shield(hashing)
        finally:
            os.close(fd)

    def digest_file(self, fd: int) -> str:
        """Hex sha256 of the whole file behind `fd`, read from its start. Runs in a worker thread."""
        with os.fdopen(os.dup(fd), "rb") as file:
            file.seek(0)
            return hashlib.file_digest(file, "sha256").hexdigest()

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
    """Selectors from the caller's kernel credentials and executable."""

    name = _NAME

    def __init__(
        self,
        *,
        hash_executables: bool = True,
        max_hash_bytes: int = DEFAULT_MAX_HASH_BYTES,
        hashes_per_second: float = DEFAULT_HASHES_PER_SECOND,
        hasher: ExecutableHasher | None = None,
    ) -> None:
        """`hasher` replaces the one built from max_hash_bytes and hashes_per_second (tests, shared caches)."""
        if not isinstance(hash_executables, bool):
            raise ConfigError("workloadattestor(unix): hash_executables must be true or false")
        if isinstance(max_hash_bytes, bool) or not isinstance(max_hash_bytes, int) or max_hash_bytes <= 0:
            raise ConfigError("workloadattestor(unix): max_hash_bytes must be a positive integer")
        if (
            isinstance(hashes_per_second, bool)
            or not isinstance(hashes_per_second, int | float)
            or not hashes_per_second > 0
        ):
            raise ConfigError("workloadattestor(unix): hashes_per_second must be a positive number")
        if hasher is not None and not isinstance(hasher, ExecutableHasher):
            raise ConfigError("workloadattestor(unix): hasher must be an ExecutableHasher")
        self._hash_executables = hash_executables
        self._hasher = hasher or ExecutableHasher(max_bytes=max_hash_bytes, hashes_per_second=float(hashes_per_second))

    async def attest(self, process: WorkloadProcess) -> Sequence[Selector]:
        try:
            # Name lookups go through NSS (possibly LDAP): keep them off the event loop.
            facts = await asyncio.to_thread(self._describe, process)
            digest = None
            if self._hash_executables and facts.executable is not None:
                digest = await self._hasher.sha256(process.pid, facts.executable.identity)
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
