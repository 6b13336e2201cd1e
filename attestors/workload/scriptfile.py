"""Finding the script a process runs, inside its own root, without asking an unsafe file system anything.

Every function here blocks and runs on the threads of an ExecutableReader's pool (see interpreter.py).

A script is named by the process's command line, so its name is resolved the way the process would
resolve it: a relative name against its working directory, an absolute one (and every absolute
symlink on the way) against its root, `..` never above that root. The root is /proc/<pid>/root,
which differs from the agent's in a chroot or a container; a symlink `/app/run.py -> /etc/passwd`
inside a container names the container's /etc/passwd, never the host's.

The name is walked one component at a time, from a descriptor of /proc/<pid>/root, rather than in
one openat2(RESOLVE_IN_ROOT) call: a path walk asks the file system of every directory it passes
through (FUSE revalidates its entries with a LOOKUP, which a hostile server need never answer), and
one call would pass through mounts nobody checked. So each step opens one name with O_PATH and
O_NOFOLLOW (which asks nothing of the file system it lands on), and where a step enters another
mount, that mount is checked with the rules executables have (executable.check_file_system: never
FUSE, never a network file system) before anything is asked of it. openat2(RESOLVE_NO_XDEV) tells,
for free, that a step stayed on its parent's mount; a kernel without openat2 (before 5.6) costs a
/proc/self/fdinfo read per step instead. Symlinks are read (readlinkat on the link's own O_PATH
descriptor, after its mount was checked) and followed by the walk itself: absolute ones from the
process's root, at most 40 of them, as the kernel does. A walk into /proc is refused: /proc/self and
the /proc/<pid>/fd links mean the agent there, not the caller.

The file found is a regular file, open with O_PATH; it is opened for reading only through that
descriptor (/proc/self/fd/N), so what is read is the very file whose file system was checked.

What this cannot know: the name is the one the process was started with, and the working directory
the one it has now. A process that changed directory since, or whose script was replaced under the
same name, is described by what the name finds now. That is one more reason script selectors never
stand alone (docs/design.md §6).

How `python -m` finds its module with these (pymodules.py), and how the command line that names the
script is read (procargs.py), are in modules of their own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import stat
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from vouchd.attestors.errors import ProcessExitedError
from vouchd.attestors.workload.commandline import Script
from vouchd.attestors.workload.executable import FileIdentity, check_file_system
from vouchd.attestors.workload.mounts import MountTables
from vouchd.attestors.workload.procargs import read_up_to
from vouchd.attestors.workload.procfs import PROC_ROOT, read_fd_mount_id
from vouchd.errors import VouchdError

__all__ = [
    "ProcessFiles",
    "ScriptChangedError",
    "ScriptFile",
    "ScriptNotFoundError",
    "find_script",
    "open_for_reading",
    "openat2_available",
]

_SMALL_FILE_LIMIT = 64 * 1024  # what ProcessFiles.read_file reads by default: a pyvenv.cfg
_MAX_SYMLINKS = 40  # the kernel's MAXSYMLINKS
_DELETED_SUFFIX = " (deleted)"

# Not refused as ones that may hang, but not walked through either: an automount point mounts (and
# waits for) a file system on first lookup; /proc's links resolve to the agent's own files.
_NOT_WALKED = {"autofs": "an automount point", "proc": "/proc, whose links mean the agent there, not the process"}


class ScriptNotFoundError(VouchdError):
    """The name does not lead to a regular file inside the process's root (no error of the agent's)."""


class ScriptChangedError(VouchdError):
    """The script changed between being found and being opened for reading."""


# -- openat2(2) -----------------------------------------------------------------------------------------------------

_RESOLVE_NO_XDEV = 0x01
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_BENEATH = 0x08
# One number on every architecture with the common system call table (x86_64, aarch64, arm, riscv64,
# s390x, ppc64le, i386); alpha and mips number it differently and get the fallback.
_SYS_OPENAT2 = 437 if platform.machine() in {
    "x86_64", "aarch64", "arm64", "armv7l", "armv8l", "riscv64", "s390x", "ppc64le", "ppc64", "i686", "i386",
} else None


class _OpenHow(ctypes.Structure):
    _fields_ = (("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64))


_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
_syscall.argtypes = (ctypes.c_long, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_size_t)
_openat2_missing = _SYS_OPENAT2 is None


def openat2_available() -> bool:
    """Whether this kernel has openat2 (Linux 5.6+); known after the first walk, True until then."""
    return not _openat2_missing


def _openat2_same_mount(parent: int, name: str) -> int | None:
    """An O_PATH descriptor of `name` in `parent` if it is on the parent's mount; None if it is on another
    (EXDEV), or openat2 cannot tell (EAGAIN) or does not exist here (ENOSYS). Raises OSError for anything else."""
    global _openat2_missing  # noqa: PLW0603 - learnt once per process: the kernel does not change
    if _openat2_missing or _SYS_OPENAT2 is None:
        return None
    how = _OpenHow(os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, 0,
                   _RESOLVE_NO_XDEV | _RESOLVE_NO_MAGICLINKS | _RESOLVE_BENEATH)
    fd = _syscall(_SYS_OPENAT2, parent, os.fsencode(name), ctypes.byref(how), ctypes.sizeof(how))
    if fd >= 0:
        return int(fd)
    err = ctypes.get_errno()
    if err in (errno.EXDEV, errno.EAGAIN):  # EAGAIN: a rename or mount raced the lookup; the slow way decides
        return None
    if err == errno.ENOSYS:
        _openat2_missing = True
        return None
    raise OSError(err, os.strerror(err), name)


# -- the process's files --------------------------------------------------------------------------------------------


@dataclass(slots=True)
class ScriptFile:
    """A script found: its path as the process sees it, which file it is, and an O_PATH descriptor of it."""

    path: str
    identity: FileIdentity
    fd: int = field(repr=False)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ProcessFiles:
    """The files one process sees: names resolved in its root and working directory, mounts checked first.

    Raises ProcessExitedError if the process is gone, PermissionError without ptrace access to it, and
    RefusedFileSystemError if its root itself is on a file system that may not answer. Close it (or
    use it as a context manager): it holds a descriptor of the process's root.
    """

    def __init__(self, pid: int, *, mounts: MountTables, proc_root: Path = PROC_ROOT,
                 use_openat2: bool = True) -> None:
        self._pid = pid
        self._mounts = mounts
        self._proc_root = proc_root
        self._use_openat2 = use_openat2
        base = f"{proc_root}/{pid}"
        try:
            self._root = os.open(f"{base}/root", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except (FileNotFoundError, ProcessLookupError) as err:
            raise ProcessExitedError(f"process {pid} has exited") from err
        try:
            # The agent's names of the process's root and working directory; the difference is the
            # working directory as the process names it.
            self._root_link = os.readlink(f"{base}/root")
            self.cwd = _inside(self._root_link, os.readlink(f"{base}/cwd"))
            self._root_mount = read_fd_mount_id(self._root, proc_root=proc_root)
            self._check_mount(self._root)
        except (FileNotFoundError, ProcessLookupError) as err:
            self.close()
            raise ProcessExitedError(f"process {pid} has exited") from err
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> ProcessFiles:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self._root >= 0:
            os.close(self._root)
            self._root = -1

    def inside(self, agent_path: str) -> str | None:
        """A path as the agent names it (readlink of a /proc link) as the process names it; None if outside its root."""
        return _inside(self._root_link, agent_path)

    def absolute(self, name: str) -> str | None:
        """`name` from the process's command line as an absolute path in its root; None when it is relative
        and the working directory is not known (deleted, or outside its root)."""
        if name.startswith("/"):
            return name
        if self.cwd is None:
            return None
        return f"{self.cwd.rstrip('/')}/{name}"

    def open_file(self, path: str) -> ScriptFile:
        """The regular file `path` (absolute, as the process sees it) names. Raises ScriptNotFoundError,
        RefusedFileSystemError, PermissionError, OSError."""
        fd, names = self._walk(path)
        try:
            status = os.fstat(fd)
            if not stat.S_ISREG(status.st_mode):
                raise ScriptNotFoundError("it is not a regular file")
            return ScriptFile("/" + "/".join(names), FileIdentity.of(status), fd)
        except BaseException:
            os.close(fd)
            raise

    def kind(self, path: str) -> str | None:
        """`file`, `directory` (or `other`) for what `path` names, None if it names nothing."""
        try:
            fd, _ = self._walk(path)
        except ScriptNotFoundError:
            return None
        try:
            mode = os.fstat(fd).st_mode
        finally:
            os.close(fd)
        if stat.S_ISREG(mode):
            return "file"
        return "directory" if stat.S_ISDIR(mode) else "other"

    def read_file(self, path: str, limit: int = _SMALL_FILE_LIMIT) -> bytes | None:
        """The first `limit` bytes of the regular file `path` names, None if it names none."""
        try:
            found = self.open_file(path)
        except ScriptNotFoundError:
            return None
        try:
            readable = os.open(_own_fd(found.fd, self._proc_root), os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
        finally:
            found.close()
        try:
            return read_up_to(readable, limit)[0]
        finally:
            os.close(readable)

    def list_directory(self, path: str) -> list[str] | None:
        """The names in the directory `path` names, None if it names none."""
        try:
            fd, _ = self._walk(path)
        except ScriptNotFoundError:
            return None
        try:
            if not stat.S_ISDIR(os.fstat(fd).st_mode):
                return None
            directory = os.open(_own_fd(fd, self._proc_root), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        finally:
            os.close(fd)
        try:
            return os.listdir(directory)
        finally:
            os.close(directory)

    def _walk(self, path: str) -> tuple[int, list[str]]:
        """An O_PATH descriptor of what the absolute `path` names inside the process's root, and the names
        of the components it resolved to (its path as the process sees it, symlinks resolved)."""
        held: list[tuple[int, str, int]] = []  # descriptor, name, mount id: the directories below the root
        checked = {self._root_mount}
        pending = deque(path.split("/"))
        links = 0
        try:
            while pending:
                name = pending.popleft()
                if name in ("", "."):
                    continue
                if name == "..":
                    if held:  # at the root, `..` is the root: the process cannot climb out of it either
                        os.close(held.pop()[0])
                    continue
                parent, parent_mount = (held[-1][0], held[-1][2]) if held else (self._root, self._root_mount)
                fd, mount = self._step(parent, parent_mount, name, checked)
                target = None
                try:
                    status = os.fstat(fd)  # its file system was checked: this asks nothing unsafe
                    if stat.S_ISLNK(status.st_mode):
                        links += 1
                        if links > _MAX_SYMLINKS:
                            raise ScriptNotFoundError("too many levels of symbolic links")
                        target = os.readlink("", dir_fd=fd)
                    elif pending and not stat.S_ISDIR(status.st_mode):
                        raise ScriptNotFoundError("a component of its name is not a directory")
                except BaseException:
                    os.close(fd)
                    raise
                if target is not None:
                    os.close(fd)
                    if not target:
                        raise ScriptNotFoundError("it names an empty symbolic link")
                    if target.startswith("/"):
                        while held:
                            os.close(held.pop()[0])
                    pending.extendleft(reversed(target.split("/")))
                    continue
                held.append((fd, name, mount))
            if not held:
                raise ScriptNotFoundError("it names the root directory")
            fd, name, _ = held.pop()
            return fd, [*(held_name for _, held_name, _ in held), name]
        finally:
            for fd, _, _ in held:
                os.close(fd)

    def _step(self, parent: int, parent_mount: int, name: str, checked: set[int]) -> tuple[int, int]:
        """Open one name with O_PATH, without following it, and check its mount if it is a new one."""
        try:
            fd = _openat2_same_mount(parent, name) if self._use_openat2 else None
            if fd is not None:
                return fd, parent_mount
            fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=parent)
        except (FileNotFoundError, NotADirectoryError) as err:
            raise ScriptNotFoundError("no such file") from err
        try:
            mount = read_fd_mount_id(fd, proc_root=self._proc_root)
            if mount not in checked:
                self._check_mount(fd)
                checked.add(mount)
        except BaseException:
            os.close(fd)
            raise
        return fd, mount

    def _check_mount(self, fd: int) -> None:
        found = check_file_system(fd, self._pid, self._mounts)
        if found.fs_type in _NOT_WALKED:
            raise ScriptNotFoundError(f"its name leads through {_NOT_WALKED[found.fs_type]}")


def _inside(root: str, path: str) -> str | None:
    if path.endswith(_DELETED_SUFFIX) or not path.startswith("/"):
        return None
    if root == "/":
        return path
    if path == root:
        return "/"
    return path[len(root):] if path.startswith(root + "/") else None


def _own_fd(fd: int, proc_root: Path) -> str:
    return f"{proc_root}/self/fd/{fd}"


def open_for_reading(script: ScriptFile, *, proc_root: Path = PROC_ROOT) -> int:
    """A descriptor open for reading on the file `script` found (the caller closes it).

    Opened through the O_PATH descriptor, so it is the file whose file system was checked. Raises
    ScriptChangedError if it is no longer what was found (written to since).
    """
    readable = os.open(_own_fd(script.fd, proc_root), os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    try:
        if FileIdentity.of(os.fstat(readable)) != script.identity:
            raise ScriptChangedError("it changed after it was found")
    except BaseException:
        os.close(readable)
        raise
    return readable



# -- scripts --------------------------------------------------------------------------------------------------------


def find_script(files: ProcessFiles, script: Script) -> ScriptFile:
    """The file `script` names for the process. Raises ScriptNotFoundError, RefusedFileSystemError,
    PermissionError, OSError."""
    path = files.absolute(script.path)
    if path is None:
        raise ScriptNotFoundError("its name is relative, and its working directory is gone or outside its root")
    try:
        return files.open_file(path)
    except ScriptNotFoundError:
        if not script.suffixes or path.endswith("/"):
            raise
    for suffix in script.suffixes:
        try:
            return files.open_file(path + suffix)
        except ScriptNotFoundError:
            continue
    raise ScriptNotFoundError("no such file, with or without the suffixes its interpreter tries")

