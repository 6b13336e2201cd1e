"""The executable a caller runs: which file it is, on which file system, and reading it without hanging.

It is always reached through /proc/<pid>/exe, never through its path: a path can be re-pointed at
another file between a readlink and an open, the magic link cannot. And it is opened in two steps.
First with O_PATH, which asks nothing of the file's own file system; /proc/self/fdinfo then names the
mount the file is on, and /proc/<pid>/mountinfo that mount's file system type. Only a file on a file
system that answers by itself is then opened for reading, through that O_PATH descriptor
(/proc/self/fd/N): what is read is the very file whose file system was checked, even if the process
exec'd something else meanwhile.

A file on FUSE or on a network file system is neither opened nor hashed: its server decides when
open() and read() return, and a caller can run such a server itself (any user may mount FUSE in a
user namespace). Such a caller gets no `unix:path` and no `unix:sha256`.

The blocking steps run on the ExecutableReader's AttestationPool, with a share per uid and a bounded
wait, never on asyncio's default pool: what hangs despite the check (overlayfs stacked on a FUSE
mount passes it as `overlay`) holds its own uid's threads, not the other callers'. An executable on
a local disk file system (LOCAL_FILE_SYSTEMS, by the kept host mount table) is inspected without a
thread (inspect_executable_inline): its stat answers from memory, and a thread's hand-off would cost
more than the whole inspection.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from vouchd.attestors.base import WorkloadProcess
from vouchd.attestors.errors import AttestorError, ProcessExitedError
from vouchd.attestors.workload.mounts import MountTables
from vouchd.attestors.workload.pool import AttestationPool, PoolBusyError
from vouchd.attestors.workload.procfs import PROC_ROOT, Mount, read_fd_mount_id
from vouchd.attestors.workload.throttle import UidWarnings
from vouchd.errors import VouchdError

__all__ = [
    "CANNOT_TELL",
    "FUSE_FILE_SYSTEMS",
    "LOCAL_FILE_SYSTEMS",
    "NETWORK_FILE_SYSTEMS",
    "READ_THREADS",
    "READ_UID_THREADS",
    "READ_UID_WAITING",
    "READ_WAIT_LIMIT",
    "CannotTell",
    "ExecutableFile",
    "ExecutableReader",
    "FileIdentity",
    "NoAnswerError",
    "RefusedFileSystemError",
    "check_file_system",
    "file_system_kind",
    "inspect_executable",
    "inspect_executable_inline",
    "open_executable",
]

_log = logging.getLogger("vouchd.attestors.unix")

T = TypeVar("T")

_ATTESTOR = "unix"
_DELETED_SUFFIX = " (deleted)"

# Reading an executable takes microseconds on a local disk. Eight threads, two per uid: a uid whose
# files hang holds two, and it takes four such uids before the pool is stuck (which the watchdog sees).
READ_THREADS = 8
READ_UID_THREADS = 2
# A burst of callers of one uid (workers of a service starting together) waits in line, up to this many.
READ_UID_WAITING = 32
# How long a caller waits for its executable to be inspected or opened, thread included: far above
# what a local read takes, and well within the Workload API's attestation deadline (5 s by default),
# so that a caller whose file hangs is still attested, without `path` and `sha256`.
READ_WAIT_LIMIT = 1.0

# `fuse.<name>` (sshfs, s3fs, rclone, fuse-overlayfs...) too. virtiofs speaks FUSE to the hypervisor.
FUSE_FILE_SYSTEMS = frozenset({"fuse", "fuseblk", "virtiofs"})
# Network and cluster file systems: a server, or a lock manager, elsewhere decides when a read returns.
NETWORK_FILE_SYSTEMS = frozenset({
    "nfs", "nfs4", "cifs", "smb3", "smbfs", "9p", "ceph", "glusterfs", "afs", "coda", "ncpfs", "lustre",
    "gpfs", "beegfs", "orangefs", "ocfs2", "gfs2",
})


# File systems whose getattr of an inode in memory (a running executable's is) answers from memory or
# the local disk: nothing a caller runs can make it wait, so an executable on one of them is inspected on
# the event loop (inspect_executable_inline). Overlay is not among them: its getattr asks the layers
# below, and an unprivileged user may stack one on FUSE.
LOCAL_FILE_SYSTEMS = frozenset({
    "ext2", "ext3", "ext4", "xfs", "btrfs", "f2fs", "jfs", "bcachefs", "tmpfs", "ramfs", "devtmpfs",
    "squashfs", "erofs", "iso9660", "udf", "vfat", "msdos", "exfat",
})


class CannotTell:
    """inspect_executable_inline's answer when the executable cannot be inspected without risking a wait."""

    def __repr__(self) -> str:
        return "CANNOT_TELL"


CANNOT_TELL = CannotTell()


def file_system_kind(fs_type: str) -> str | None:
    """`FUSE` or `network` for a file system type the agent does not read executables from, else None."""
    if fs_type in FUSE_FILE_SYSTEMS or fs_type.startswith("fuse."):
        return "FUSE"
    if fs_type in NETWORK_FILE_SYSTEMS:
        return "network"
    return None


class RefusedFileSystemError(VouchdError):
    """The executable lives on a file system that may never answer; it is not opened."""

    def __init__(self, reason: str, mount: Mount | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.mount = mount


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


def check_file_system(fd: int, pid: int, mounts: MountTables) -> Mount:
    """The mount of the file open (O_PATH is enough) at `fd`; RefusedFileSystemError if it may hang.

    The mount is looked up by id in the mount namespace of `pid` (where its executable was found),
    then in the agent's own. A mount in neither (unmounted since, or the process moved to another
    namespace) is refused too: what cannot be checked is not opened.
    """
    mount_id, mount = mounts.mount_of(fd, pid)
    if mount is None:
        raise RefusedFileSystemError(f"its file system (mount {mount_id}) is in neither its mount table "
                                     "nor the agent's")
    kind = file_system_kind(mount.fs_type)
    if kind is not None:
        raise RefusedFileSystemError(
            f"it lives on a {kind} file system ({mount.fs_type} at {mount.mount_point}), whose server decides "
            "when a read returns",
            mount,
        )
    return mount


def inspect_executable(
    pid: int, *, proc_root: Path = PROC_ROOT, mounts: MountTables | None = None
) -> ExecutableFile | None:
    """The executable of a process, or None when it was deleted (or replaced) after exec. Blocks.

    Raises ProcessExitedError if the process is gone, PermissionError without ptrace access to it,
    RefusedFileSystemError when it lives on a file system the agent does not read from; the file's
    own file system is asked for nothing before that check. `mounts` keeps mount tables between calls.
    """
    with _ExePath(pid, proc_root) as fd:
        check_file_system(fd, pid, mounts or MountTables(proc_root=proc_root, keep_host_table=False))
        # The name of the descriptor's file, not a second readlink of the process's exe: no exec in
        # between can make them differ.
        link = os.readlink(_own_fd(fd, proc_root))
        status = os.fstat(fd)
    if status.st_nlink == 0 or link.endswith(_DELETED_SUFFIX):
        return None
    return ExecutableFile(path=link, identity=FileIdentity.of(status))


def inspect_executable_inline(
    pid: int, mounts: MountTables, *, proc_root: Path = PROC_ROOT
) -> ExecutableFile | CannotTell | None:
    """What inspect_executable says, read without a thread when that cannot wait; else CANNOT_TELL.

    The same steps: /proc/<pid>/exe opened O_PATH (which asks the file's file system nothing), its mount
    found, the link read and the file stat'ed; but the mount is looked up in the kept host table only,
    and only a file on a LOCAL_FILE_SYSTEMS mount is stat'ed. Raises ProcessExitedError when the process
    is gone, PermissionError without ptrace access to it.
    """
    with _ExePath(pid, proc_root) as fd:
        mount = mounts.kept_mount(read_fd_mount_id(fd, proc_root=proc_root))
        if mount is None or mount.fs_type not in LOCAL_FILE_SYSTEMS:
            return CANNOT_TELL
        link = os.readlink(_own_fd(fd, proc_root))
        status = os.fstat(fd)
    if status.st_nlink == 0 or link.endswith(_DELETED_SUFFIX):
        return None
    return ExecutableFile(path=link, identity=FileIdentity.of(status))


def open_executable(
    pid: int, identity: FileIdentity, *, proc_root: Path = PROC_ROOT, mounts: MountTables | None = None
) -> int:
    """A descriptor open for reading on the executable of `pid`, which must still be `identity`. Blocks.

    Raises ProcessExitedError, PermissionError, and AttestorError if the process runs another file now.
    """
    with _ExePath(pid, proc_root) as fd:
        try:
            check_file_system(fd, pid, mounts or MountTables(proc_root=proc_root, keep_host_table=False))
        except RefusedFileSystemError as err:
            # Its file was on a file system that answers when it was inspected: a file never moves.
            raise AttestorError(_ATTESTOR, f"process {pid} replaced its executable during attestation") from err
        readable = os.open(_own_fd(fd, proc_root), os.O_RDONLY | os.O_CLOEXEC)
    try:
        if FileIdentity.of(os.fstat(readable)) != identity:
            raise AttestorError(_ATTESTOR, f"process {pid} replaced its executable during attestation")
    except BaseException:
        os.close(readable)
        raise
    return readable


class _ExePath:
    """An O_PATH descriptor of /proc/<pid>/exe, closed on leaving the block."""

    def __init__(self, pid: int, proc_root: Path) -> None:
        self._pid = pid
        self._exe = f"{proc_root}/{pid}/exe"  # a str: pathlib's joins cost more than the open itself
        self._fd = -1

    def __enter__(self) -> int:
        try:
            self._fd = os.open(self._exe, os.O_PATH | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError) as err:
            raise ProcessExitedError(f"process {self._pid} has exited") from err
        return self._fd

    def __exit__(self, *exc_info: object) -> None:
        os.close(self._fd)


def _own_fd(fd: int, proc_root: Path) -> str:
    return f"{proc_root}/self/fd/{fd}"


class ExecutableReader:
    """Inspects and opens callers' executables on an AttestationPool, never waiting longer than `wait_limit`
    (an executable on a local disk is inspected at once, without a thread).

    A caller whose executable cannot be read (no ptrace access, a refused file system, no answer in
    time) gets None, so no `path` or `sha256`, and a warning, at most one per uid and reason a minute.
    """

    def __init__(
        self,
        *,
        pool: AttestationPool | None = None,
        wait_limit: float = READ_WAIT_LIMIT,
        proc_root: Path = PROC_ROOT,
    ) -> None:
        if wait_limit <= 0:
            raise ValueError(f"wait_limit must be positive, got {wait_limit}")
        self.pool = pool or AttestationPool(
            name="vouchd-exe", threads=READ_THREADS, uid_threads=READ_UID_THREADS, uid_waiting=READ_UID_WAITING
        )
        self.wait_limit = wait_limit
        self._proc_root = proc_root
        self._mounts = MountTables(proc_root=proc_root)
        self._warnings = UidWarnings(_log)

    async def inspect(self, process: WorkloadProcess) -> ExecutableFile | None:
        """The executable of `process`, or None (deleted, or not readable: see the class).

        Raises ProcessExitedError, or another OSError of reading /proc.
        """
        try:
            # Most executables live on a local disk: read at once, no thread needed (nor its hand-off).
            found = inspect_executable_inline(process.pid, self._mounts, proc_root=self._proc_root)
            if not isinstance(found, CannotTell):
                return found
            return await self._run(process, functools.partial(inspect_executable, process.pid,
                                                              proc_root=self._proc_root, mounts=self._mounts))
        except PermissionError:
            # Without root or CAP_SYS_PTRACE other users' executables are out of reach: entries that
            # need path or sha256 then cannot match, which is the safe direction.
            self._warnings.warn(
                process.uid, "ptrace",
                "cannot read the executable of pid %d: no ptrace access; omitting path and sha256",
                process.pid, extra={"pid": process.pid},
            )
        except (RefusedFileSystemError, NoAnswerError) as err:
            extra: dict[str, object] = {"pid": process.pid, "reason": str(err)}
            if isinstance(err, RefusedFileSystemError) and err.mount is not None:
                extra.update(file_system=err.mount.fs_type, mount_point=err.mount.mount_point)
            self._warnings.warn(
                process.uid, "file_system" if isinstance(err, RefusedFileSystemError) else "no_answer",
                "not reading the executable of pid %d uid %d: %s; omitting path and sha256",
                process.pid, process.uid, err, extra=extra,
            )
        return None

    async def open(self, process: WorkloadProcess, identity: FileIdentity) -> int | None:
        """A descriptor to read the executable `identity` of `process` from (the caller closes it), or
        None when no thread could open it in time (warned about, as in inspect).

        Raises ProcessExitedError, AttestorError if the process runs another file now.
        """
        try:
            return await self._run(process, functools.partial(open_executable, process.pid, identity,
                                                              proc_root=self._proc_root, mounts=self._mounts),
                                   discard=os.close)
        except NoAnswerError as err:
            self._warnings.warn(
                process.uid, "no_answer",
                "not reading the executable of pid %d uid %d: %s; omitting sha256",
                process.pid, process.uid, err, extra={"pid": process.pid, "reason": str(err)},
            )
            return None

    async def run(self, process: WorkloadProcess, call: Callable[[], T], *,
                  discard: Callable[[T], object] | None = None) -> T:
        """Run another blocking read of `process`'s files on this reader's pool, within its uid's share and
        the wait limit: the interpreter attestor reads callers' scripts this way, so one uid's hanging
        files hold only that uid's threads, whichever attestor reads them.

        Raises NoAnswerError when no thread ran `call` in time (its result then goes to `discard`), and
        whatever `call` raises.
        """
        return await self._run(process, call, discard=discard)

    async def _run(self, process: WorkloadProcess, call: Callable[[], T], *,
                   discard: Callable[[T], object] | None = None) -> T:
        try:
            async with asyncio.timeout(self.wait_limit) as scope:
                return await self.pool.run(process.uid, call, discard=discard)
        except PoolBusyError as err:
            raise NoAnswerError(str(err)) from err
        except TimeoutError as err:
            if not scope.expired():
                raise  # the read itself failed with ETIMEDOUT
            held = [call.seconds for call in self.pool.busy() if call.uid == process.uid]
            detail = f"; {len(held)} reads of its uid running for up to {max(held):.0f} s" if held else ""
            raise NoAnswerError(f"no answer within {self.wait_limit:g} s{detail}") from err


class NoAnswerError(VouchdError):
    """No thread read the file in time: the pool refused, or the read did not return."""
