"""Which cgroups a process is in, from /proc/<pid>/cgroup, and where a cgroup's directory is.

/proc/<pid>/cgroup has one line per hierarchy, `ID:CONTROLLERS:PATH` (cgroups(7)):

- `0::/system.slice/nginx.service`: the cgroup v2 (unified) hierarchy;
- `1:name=systemd:/system.slice/nginx.service`: systemd's own v1 hierarchy, on v1 and hybrid hosts;
- `4:memory:/docker/<id>`, `2:cpu,cpuacct:/...`: v1 controller hierarchies.

The kernel writes it, and the paths are relative to the cgroup namespace of the process that READS
the file: read in the host's namespace they are the host's paths, whatever namespace the process is
in. A path with a `..` component means the process is outside the reader's namespace: the agent does
not see where it is, and the file is refused (ProcessInfoError) rather than guessed at.

The kernel refuses cgroup names that contain a newline, so one line is one hierarchy; but names may
contain anything else (`:`, spaces, `\\r`), so the path is everything after the second colon and only
`\\n` ends a line. A v2 line may end in ` (deleted)` (a dying process in a removed cgroup); that is
left as part of the last name, where it matches no unit or container name.

Nothing here decides what a path means: systemd.py and container.py do, and they never trust a name
below a cgroup that may be delegated to someone else.
"""

from __future__ import annotations

import errno
import os
import re
from dataclasses import dataclass
from pathlib import Path

from vouchd.attestors.errors import ProcessExitedError, ProcessInfoError
from vouchd.attestors.workload.procfs import PROC_ROOT, read_own_proc_text

__all__ = [
    "MAX_CGROUP_FILE_BYTES",
    "NAMED_SYSTEMD",
    "UNIFIED",
    "CgroupLine",
    "CgroupMount",
    "CgroupPath",
    "ProcessCgroups",
    "cgroup_directory",
    "parse_cgroup_file",
    "parse_cgroup_mounts",
    "path_components",
    "read_cgroup_mounts",
    "read_process_cgroups",
]

# A cgroup file lists a dozen hierarchies with paths of at most PATH_MAX (a longer one makes the
# kernel fail the read); anything larger is not a cgroup file.
MAX_CGROUP_FILE_BYTES = 64 * 1024

UNIFIED = "unified"  # the `0::` line
NAMED_SYSTEMD = "name=systemd"  # systemd's v1 hierarchy (v1 and hybrid hosts)

_HIERARCHY_ID = re.compile(r"0|[1-9][0-9]{0,9}")
_CONTROLLER = re.compile(r"[^\s,:]+")
_MAX_SHOWN = 120


@dataclass(frozen=True, slots=True)
class CgroupLine:
    """One line of /proc/<pid>/cgroup."""

    hierarchy_id: int
    controllers: tuple[str, ...]  # () for the unified hierarchy; ("name=systemd",) for systemd's v1 one
    path: str  # absolute, normalised: `/` or `/a/b`, never `..`

    @property
    def hierarchy(self) -> str:
        """UNIFIED, NAMED_SYSTEMD, or the controllers joined by commas (`cpu,cpuacct`)."""
        return UNIFIED if self.hierarchy_id == 0 else ",".join(self.controllers)


@dataclass(frozen=True, slots=True)
class CgroupPath:
    """A cgroup path and the hierarchy it is in (so that its directory can be found)."""

    hierarchy: str
    path: str

    @property
    def components(self) -> tuple[str, ...]:
        return path_components(self.path)


@dataclass(frozen=True, slots=True)
class ProcessCgroups:
    """All the lines of one /proc/<pid>/cgroup, in file order."""

    lines: tuple[CgroupLine, ...]

    @property
    def unified(self) -> CgroupPath | None:
        """The `0::` path, if the host has the unified hierarchy (v2 or hybrid)."""
        for line in self.lines:
            if line.hierarchy_id == 0:
                return CgroupPath(UNIFIED, line.path)
        return None

    @property
    def named_systemd(self) -> CgroupPath | None:
        """The `name=systemd` path, if the host has systemd's v1 hierarchy (v1 or hybrid)."""
        for line in self.lines:
            if line.controllers == (NAMED_SYSTEMD,):
                return CgroupPath(NAMED_SYSTEMD, line.path)
        return None

    @property
    def systemd_path(self) -> CgroupPath | None:
        """The path systemd's units are found in.

        `name=systemd` where there is one below the root: on v1 and hybrid hosts that is the
        hierarchy systemd keeps its units in (the unified one of a hybrid host mirrors it). Else the
        `0::` path. A `name=systemd` path at the root says nothing: on a v2 host something other than
        systemd mounted that hierarchy (e.g. for containers with an old systemd inside), and every
        process is at its root there.
        """
        named, unified = self.named_systemd, self.unified
        if named is not None and (named.path != "/" or unified is None):
            return named
        return unified

    @property
    def controller_paths(self) -> tuple[CgroupPath, ...]:
        """The paths of the v1 controller hierarchies (neither `0::` nor `name=systemd`), in file order."""
        return tuple(
            CgroupPath(line.hierarchy, line.path)
            for line in self.lines
            if line.hierarchy_id != 0 and line.controllers != (NAMED_SYSTEMD,)
        )


def path_components(path: str) -> tuple[str, ...]:
    """The names of a normalised absolute cgroup path: `/` has none, `/a/b` has `a` and `b`."""
    return () if path == "/" else tuple(path[1:].split("/"))


def parse_cgroup_file(text: str) -> ProcessCgroups:
    """Parse the content of /proc/<pid>/cgroup. ProcessInfoError names the first line that is wrong."""
    if not text:
        raise ProcessInfoError("empty /proc cgroup file")
    # Only "\n" ends a line: str.splitlines would also split at "\r" or "\x85", which names may hold.
    raw_lines = text.split("\n")
    if raw_lines[-1] == "":
        raw_lines.pop()
    lines: list[CgroupLine] = []
    seen_ids: set[int] = set()
    seen_controllers: set[str] = set()
    for number, raw in enumerate(raw_lines, start=1):
        line = _parse_line(number, raw)
        if line.hierarchy_id in seen_ids:
            raise _malformed(number, raw, f"hierarchy {line.hierarchy_id} is listed twice")
        for controller in line.controllers:
            if controller in seen_controllers:
                raise _malformed(number, raw, f"controller {controller} is listed twice")
            seen_controllers.add(controller)
        seen_ids.add(line.hierarchy_id)
        lines.append(line)
    return ProcessCgroups(tuple(lines))


def _parse_line(number: int, raw: str) -> CgroupLine:
    fields = raw.split(":", 2)  # the path may contain colons
    if len(fields) != 3:
        raise _malformed(number, raw, "not of the form ID:CONTROLLERS:PATH")
    hierarchy, controllers_field, path = fields
    if not _HIERARCHY_ID.fullmatch(hierarchy):
        raise _malformed(number, raw, "the hierarchy id is not a decimal number")
    hierarchy_id = int(hierarchy)
    controllers: tuple[str, ...] = ()
    if hierarchy_id == 0:
        if controllers_field:
            raise _malformed(number, raw, "hierarchy 0 (cgroup v2) lists controllers")
    else:
        controllers = tuple(controllers_field.split(","))
        if not all(_CONTROLLER.fullmatch(controller) for controller in controllers):
            raise _malformed(number, raw, "a v1 hierarchy without a valid controller list")
    problem = _path_problem(path)
    if problem is not None:
        raise _malformed(number, raw, problem)
    return CgroupLine(hierarchy_id, controllers, path)


def _path_problem(path: str) -> str | None:
    if not path.startswith("/"):
        return "the path is not absolute"
    if path == "/":
        return None
    names = path[1:].split("/")
    if ".." in names:
        # The kernel writes `..` for a cgroup outside the reader's cgroup namespace.
        return "the process is outside the agent's cgroup namespace (run the agent in the host's)"
    if "" in names or "." in names:
        return "the path is not normalised"
    return None


def _malformed(number: int, raw: str, why: str) -> ProcessInfoError:
    shown = raw if len(raw) <= _MAX_SHOWN else raw[: _MAX_SHOWN - 3] + "..."
    return ProcessInfoError(f"malformed /proc cgroup line {number} {shown!r}: {why}")


def read_process_cgroups(pid: int, *, proc_root: Path = PROC_ROOT) -> ProcessCgroups:
    """Read and parse /proc/<pid>/cgroup (at most MAX_CGROUP_FILE_BYTES).

    ProcessExitedError when the process is gone, ProcessInfoError when the file cannot be read or parsed.
    """
    if pid <= 0:
        raise ProcessInfoError(f"invalid pid {pid}")
    path = f"{proc_root}/{pid}/cgroup"
    try:
        data = _read_bounded(path, MAX_CGROUP_FILE_BYTES)
    except FileNotFoundError as err:
        if os.path.isdir(f"{proc_root}/{pid}"):
            raise ProcessInfoError(f"{path} does not exist: this kernel has no cgroups") from err
        raise ProcessExitedError(f"process {pid} has exited") from err
    except OSError as err:
        if err.errno == errno.ESRCH:  # the process died between open and read
            raise ProcessExitedError(f"process {pid} has exited") from err
        raise ProcessInfoError(f"cannot read {path}: {err.strerror or err}") from err
    if data is None:
        raise ProcessInfoError(f"{path} is larger than {MAX_CGROUP_FILE_BYTES} bytes")
    try:
        # Names are arbitrary bytes; one that is not UTF-8 can be no unit or container name anyway.
        return parse_cgroup_file(data.decode("utf-8", errors="replace"))
    except ProcessInfoError as err:
        raise ProcessInfoError(f"{path}: {err}") from err


def _read_bounded(path: str, limit: int) -> bytes | None:
    """The whole file, or None when it holds more than `limit` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks: list[bytes] = []
        size = 0
        while chunk := os.read(fd, limit + 1 - size):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:
                return None
    finally:
        os.close(fd)
    return b"".join(chunks)


# -- where a cgroup's directory is -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CgroupMount:
    """A cgroup file system mount, from a mountinfo line."""

    hierarchy: str  # UNIFIED, or a v1 hierarchy's controllers and name: `cpu,cpuacct`, `name=systemd`
    root: str  # the cgroup shown at the mount point: `/` unless only a subtree is mounted
    mount_point: str


# Super options of a v1 cgroup mount that do not name a controller or the hierarchy.
_V1_FLAGS = frozenset({"rw", "ro", "xattr", "noprefix", "clone_children", "cpuset_v2_mode", "favordynmods"})
_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _unescape(field: str) -> str:
    # mountinfo writes space, tab, newline and backslash in paths as \040, \011, \012, \134.
    return _OCTAL_ESCAPE.sub(lambda match: chr(int(match.group(1), 8)), field)


def parse_cgroup_mounts(text: str) -> tuple[CgroupMount, ...]:
    """The cgroup and cgroup2 mounts of a mountinfo file, in its order. Lines that are not cgroup
    mounts are skipped without being looked at closely; a cgroup line that cannot be parsed is skipped too
    (this only ever costs evidence, never a selector)."""
    mounts: list[CgroupMount] = []
    for line in text.split("\n"):
        if " - cgroup" not in line:
            continue
        fields = line.split()
        try:
            separator = fields.index("-", 6)
            fs_type = fields[separator + 1]
            super_options = fields[separator + 3].split(",") if len(fields) > separator + 3 else []
        except (ValueError, IndexError):
            continue
        if fs_type == "cgroup2":
            hierarchy = UNIFIED
        elif fs_type == "cgroup":
            hierarchy = ",".join(option for option in super_options if _names_hierarchy(option))
        else:
            continue
        mounts.append(CgroupMount(hierarchy, _unescape(fields[3]), _unescape(fields[4])))
    return tuple(mounts)


def _names_hierarchy(option: str) -> bool:
    """A controller (`cpu`) or the hierarchy's name (`name=systemd`), not a flag or `release_agent=...`."""
    return option.startswith("name=") or (option not in _V1_FLAGS and "=" not in option)


def read_cgroup_mounts(*, proc_root: Path = PROC_ROOT) -> tuple[CgroupMount, ...]:
    """The cgroup mounts of the agent's own mount namespace (where it opens cgroup directories)."""
    return parse_cgroup_mounts(read_own_proc_text("mountinfo", proc_root=proc_root))


def cgroup_directory(mounts: tuple[CgroupMount, ...], cgroup: CgroupPath) -> str | None:
    """Where the directory of `cgroup` is in the agent's file system, or None when no mount shows it.

    A v1 hierarchy is matched by its controllers in the order /proc/<pid>/cgroup lists them (the
    kernel lists both in the same order). Of the mounts showing the cgroup, the one showing most of
    the tree (the shortest root) is taken, the first in the table among equals.
    """
    best: tuple[int, str] | None = None
    for mount in mounts:
        if mount.hierarchy != cgroup.hierarchy:
            continue
        if mount.root == "/":
            relative = cgroup.path
        elif cgroup.path == mount.root or cgroup.path.startswith(mount.root + "/"):
            relative = cgroup.path[len(mount.root):] or "/"
        else:
            continue
        directory = mount.mount_point if relative == "/" else mount.mount_point.rstrip("/") + relative
        if best is None or len(mount.root) < best[0]:
            best = (len(mount.root), directory)
    return best[1] if best is not None else None
