"""Reading the few /proc facts workload attestation needs, robustly.

Every reader takes a pid and raises ProcessExitedError when the process is gone, ProcessInfoError
when its entry cannot be read or parsed. Nothing here trusts what the process says about itself:
/proc/<pid>/stat, /proc/<pid>/status and /proc/<pid>/mountinfo are written by the kernel. None of
these reads touches a file system other than /proc, so none can hang on one.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from vouchd.attestors.errors import ProcessExitedError, ProcessInfoError

__all__ = [
    "PROC_ROOT",
    "Mount",
    "ProcessCredentials",
    "ProcessStat",
    "find_mount",
    "parse_fdinfo_mount_id",
    "parse_mountinfo_line",
    "parse_stat",
    "parse_status_credentials",
    "parse_status_groups",
    "read_fd_mount_id",
    "read_mount",
    "read_own_proc_text",
    "read_proc_bytes",
    "read_process_credentials",
    "read_process_stat",
    "read_supplementary_groups",
]

PROC_ROOT = Path("/proc")

# Fields after the closing parenthesis of comm start at field 3 (state) of proc_pid_stat(5).
_STATE_INDEX = 0
_PPID_INDEX = 1
_START_TIME_INDEX = 19  # field 22


@dataclass(frozen=True, slots=True)
class ProcessStat:
    """The fields of /proc/<pid>/stat that identify a process instance."""

    pid: int
    comm: str
    state: str
    ppid: int
    start_time: int  # clock ticks after boot: with the pid, unique for the life of the host

    @property
    def is_dead(self) -> bool:
        """True for a zombie or a dying process: it can no longer act, whatever holds its socket."""
        return self.state in {"Z", "X", "x"}


def parse_stat(text: str) -> ProcessStat:
    """Parse the content of /proc/<pid>/stat.

    comm may hold spaces and parentheses (a process can name itself `a) (b`), so it is everything
    between the first `(` and the LAST `)`; the kernel writes no `)` after it.
    """
    open_paren = text.find("(")
    close_paren = text.rfind(")")
    if open_paren <= 0 or close_paren < open_paren:
        raise ProcessInfoError("malformed /proc stat line: no command name in parentheses")
    fields = text[close_paren + 1 :].split()
    if len(fields) <= _START_TIME_INDEX:
        raise ProcessInfoError(f"malformed /proc stat line: {len(fields) + 2} fields, expected at least 22")
    try:
        return ProcessStat(
            pid=int(text[:open_paren]),
            comm=text[open_paren + 1 : close_paren],
            state=fields[_STATE_INDEX],
            ppid=int(fields[_PPID_INDEX]),
            start_time=int(fields[_START_TIME_INDEX]),
        )
    except ValueError as err:
        raise ProcessInfoError("malformed /proc stat line: a numeric field is not a number") from err


@dataclass(frozen=True, slots=True)
class ProcessCredentials:
    """The user and group ids of a process now, from the `Uid:` and `Gid:` lines of /proc/<pid>/status."""

    real_uid: int
    effective_uid: int
    real_gid: int
    effective_gid: int


def parse_status_credentials(text: str) -> ProcessCredentials:
    """The real and effective uid and gid from /proc/<pid>/status (`Uid:` / `Gid:` list real, effective, ...)."""
    ids: dict[str, tuple[int, int]] = {}
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name in {"Uid", "Gid"}:
            fields = value.split()
            try:
                ids[name] = (int(fields[0]), int(fields[1]))
            except (IndexError, ValueError) as err:
                raise ProcessInfoError(f"malformed {name} line in /proc status") from err
    for name in ("Uid", "Gid"):
        if name not in ids:
            raise ProcessInfoError(f"no {name} line in /proc status")
    (real_uid, effective_uid), (real_gid, effective_gid) = ids["Uid"], ids["Gid"]
    return ProcessCredentials(real_uid, effective_uid, real_gid, effective_gid)


def parse_status_groups(text: str) -> tuple[int, ...]:
    """The supplementary group ids from the `Groups:` line of /proc/<pid>/status."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "Groups":
            try:
                return tuple(int(gid) for gid in value.split())
            except ValueError as err:
                raise ProcessInfoError("malformed Groups line in /proc status") from err
    raise ProcessInfoError("no Groups line in /proc status")


def read_process_stat(pid: int, *, proc_root: Path = PROC_ROOT) -> ProcessStat:
    """Read and parse /proc/<pid>/stat."""
    stat = parse_stat(_read_proc_text(pid, "stat", proc_root))
    if stat.pid != pid:
        raise ProcessInfoError(f"/proc/{pid}/stat names pid {stat.pid}")
    return stat


def read_supplementary_groups(pid: int, *, proc_root: Path = PROC_ROOT) -> tuple[int, ...]:
    """The supplementary group ids of a process, as the kernel lists them in /proc/<pid>/status."""
    return parse_status_groups(_read_proc_text(pid, "status", proc_root))


def read_process_credentials(pid: int, *, proc_root: Path = PROC_ROOT) -> ProcessCredentials:
    """The real and effective uid and gid a process has now, as the kernel lists them in /proc/<pid>/status."""
    return parse_status_credentials(_read_proc_text(pid, "status", proc_root))


def _read_proc_text(pid: int, name: str, proc_root: Path) -> str:
    if pid <= 0:
        raise ProcessInfoError(f"invalid pid {pid}")
    path = f"{proc_root}/{pid}/{name}"  # a str: pathlib's joins cost more than the read itself
    try:
        return _read_all(path)
    except FileNotFoundError as err:
        raise ProcessExitedError(f"process {pid} has exited") from err
    except OSError as err:
        # ESRCH: the process died between open and read.
        if err.errno == errno.ESRCH:
            raise ProcessExitedError(f"process {pid} has exited") from err
        raise ProcessInfoError(f"cannot read {path}: {err.strerror or err}") from err


@dataclass(frozen=True, slots=True)
class Mount:
    """One line of /proc/<pid>/mountinfo (proc_pid_mountinfo(5)): which file system is mounted where."""

    mount_id: int  # unique among the mounts that exist now; reused after an unmount
    device: tuple[int, int]  # major, minor: st_dev of every file on the mount
    mount_point: str  # relative to the root of the process whose mountinfo was read
    fs_type: str  # `ext4`, `fuse.sshfs`, `nfs4`, ...
    source: str


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \040, \011, \012, \134.
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def parse_mountinfo_line(line: str) -> Mount:
    """Parse one line: `ID PARENT MAJOR:MINOR ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS`.

    The optional fields (`shared:1`, `master:2`, ...) vary in number; a single `-` ends them.
    """
    fields = line.split()
    try:
        separator = fields.index("-", 6)
        major, minor = fields[2].split(":")
        return Mount(
            mount_id=int(fields[0]),
            device=(int(major), int(minor)),
            mount_point=_unescape(fields[4]),
            fs_type=fields[separator + 1],
            source=_unescape(fields[separator + 2]) if len(fields) > separator + 2 else "",
        )
    except (ValueError, IndexError) as err:
        raise ProcessInfoError("malformed /proc mountinfo line") from err


def find_mount(text: str, mount_id: int) -> Mount | None:
    """The mount with this id in the content of a mountinfo file, or None."""
    prefix = f"{mount_id} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return parse_mountinfo_line(line)
    return None


def read_mount(pid: int | None, mount_id: int, *, proc_root: Path = PROC_ROOT) -> Mount | None:
    """The mount with this id as the mount namespace of `pid` (None: of this process) shows it, or None."""
    if pid is None:
        return find_mount(_read_own_proc_text("mountinfo", proc_root), mount_id)
    return find_mount(_read_proc_text(pid, "mountinfo", proc_root), mount_id)


def parse_fdinfo_mount_id(text: str) -> int:
    """The `mnt_id:` of a /proc/<pid>/fdinfo/<fd> file: the mount the open file lives on."""
    for line in text.splitlines():
        name, _, value = line.partition(":")
        if name == "mnt_id":
            try:
                return int(value)
            except ValueError as err:
                raise ProcessInfoError("malformed mnt_id line in /proc fdinfo") from err
    raise ProcessInfoError("no mnt_id line in /proc fdinfo")


def read_fd_mount_id(fd: int, *, proc_root: Path = PROC_ROOT) -> int:
    """The id of the mount a file descriptor of this process lives on.

    Reading fdinfo asks nothing of the file's own file system: an O_PATH descriptor of a file on a
    FUSE mount whose server never answers still shows its mount here.
    """
    return parse_fdinfo_mount_id(_read_own_proc_text(f"fdinfo/{fd}", proc_root))


def read_own_proc_text(name: str, *, proc_root: Path = PROC_ROOT) -> str:
    """/proc/self/<name> of the agent itself (its mountinfo, an fd's fdinfo); ProcessInfoError if unreadable."""
    return _read_own_proc_text(name, proc_root)


def _read_own_proc_text(name: str, proc_root: Path) -> str:
    path = f"{proc_root}/self/{name}"
    try:
        return _read_all(path)
    except OSError as err:
        raise ProcessInfoError(f"cannot read {path}: {err.strerror or err}") from err


def _read_all(path: str) -> str:
    # comm and paths are arbitrary bytes chosen by processes: never let their encoding break parsing.
    return read_proc_bytes(path).decode("utf-8", errors="replace")


# The /proc files the kernel writes as one record (single_open: stat, status, cgroup, fdinfo, ...): one
# read(2) with room enough returns all of it, so a short read is the end and needs no second read.
_SINGLE_RECORD = frozenset({"stat", "status", "cgroup"})
_CHUNK = 65536


def read_proc_bytes(path: str, *, limit: int | None = None) -> bytes:
    """The whole of a /proc file (raises OSError as os.open and os.read do); ProcessInfoError when it
    holds more than `limit` bytes.

    os.read rather than pathlib: half the cost, and these reads happen for every caller. A file the
    kernel writes as one record (_SINGLE_RECORD, fdinfo) takes one read when it fits the buffer.
    """
    single_record = path.rpartition("/")[2] in _SINGLE_RECORD or "/fdinfo/" in path
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, _CHUNK):
            chunks.append(chunk)
            size += len(chunk)
            if limit is not None and size > limit:
                raise ProcessInfoError(f"{path} is larger than {limit} bytes")
            if single_record and len(chunk) < _CHUNK:
                break
    finally:
        os.close(fd)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)  # one chunk (the usual case): no copy
