"""The `systemd` workload attestor: the systemd unit a process runs in, from its cgroup.

Selectors:

- `systemd:unit:<unit>`: the system unit (`nginx.service`, `session-3.scope`, `user@1000.service`,
  `init.scope`), and `systemd:slice:<slice>`: the slice directly containing it (`system.slice`,
  `system-getty.slice`, `-.slice` for a unit at the root).
- `systemd:user_unit:<unit>` and `systemd:user_slice:<slice>`: for a process under a user's service
  manager (`.../user@1000.service/app.slice/app-firefox.scope`), the unit and slice of that manager.

The unit is found as systemd finds it (cg_path_get_unit in systemd's cgroup-util.c): skip the
leading run of `*.slice` names; the next name, if it is a valid unit name (after dropping one leading
`_`, systemd's escape for names the kernel might claim), is the unit; otherwise the process is in no
unit and gets no systemd selectors (also a process at the root, or on a host without systemd).

Security: only the OUTERMOST unit is ever reported as `unit`. Everything below a unit's own cgroup
may be delegated (Delegate=yes, a container, a user's service manager) to whoever runs there, who can
create cgroups of any name: `/system.slice/docker-<id>.scope/evil.service` is in unit
`docker-<id>.scope`, never in `evil.service`. Names below `user@UID.service` are parsed the same
way, but are the user's own and so only ever reported as `user_unit` / `user_slice`: an entry for
`systemd:unit:x.service` cannot be matched by a user naming a cgroup `x.service`. The slices above the
unit can only be made by root (systemd).

Evidence: systemd marks each unit's cgroup with its InvocationID, a new random id at every start,
as the extended attribute `trusted.invocation_id` (readable by root only) and, on newer systemd,
`user.invocation_id`. It is recorded as `Evidence("systemd", "invocation_id", <32 lowercase hex>)`,
never as a selector: it tells one run of a unit from the next in the decision record, and would match
nothing across restarts. `trusted.` is read first: only root can write it, while a unit with
Delegate=yes owns its cgroup directory and could rewrite `user.invocation_id`. A missing attribute
(old systemd, a v1 hierarchy mounted without `xattr`, no permission) gives no evidence, never an error.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vouchd.attestors.base import Evidence, WorkloadProcess
from vouchd.attestors.errors import AttestorError, ProcessInfoError
from vouchd.attestors.workload.cgroups import (
    CgroupMount,
    CgroupPath,
    cgroup_directory,
    read_cgroup_mounts,
    read_process_cgroups,
)
from vouchd.attestors.workload.procfs import PROC_ROOT
from vouchd.errors import ConfigError
from vouchd.selectors import Selector, SelectorKind, ValueCheck

__all__ = [
    "INVOCATION_ID_ATTRIBUTES",
    "ROOT_SLICE",
    "SELECTOR_KINDS",
    "SystemdAttestor",
    "UnitPlacement",
    "is_slice_name",
    "is_unit_name",
    "leading_slices",
    "locate_unit",
    "parse_invocation_id",
    "user_manager_uid",
]

_NAME = "systemd"
_log = logging.getLogger("vouchd.attestors.systemd")

ROOT_SLICE = "-.slice"  # the slice of a unit directly at the root, e.g. init.scope

# unit_name_is_valid() of systemd's unit-name.c: [prefix][@instance].type, fewer than 256 characters;
# the prefix is made of these characters (`\` starts escapes like `\x2d`), the instance may add `@`.
_UNIT_NAME_MAX = 255
_UNIT_TYPES = ("service", "socket", "target", "device", "mount", "automount", "swap", "timer", "path", "slice",
               "scope")
_PLAIN_OR_INSTANCE = re.compile(
    r"(?P<prefix>[0-9A-Za-z:_.\\-]+)(?:@(?P<instance>[0-9A-Za-z:_.\\@-]+))?\.(?P<type>" + "|".join(_UNIT_TYPES) + r")"
)
_USER_MANAGER = re.compile(r"user@(0|[1-9][0-9]{0,9})\.service")

INVOCATION_ID_ATTRIBUTES = ("trusted.invocation_id", "user.invocation_id")
_HEX_ID = re.compile(rb"[0-9a-fA-F]{32}")


def is_unit_name(name: str, *, slice_ok: bool = False) -> bool:
    """A unit name systemd would find in a cgroup path: plain (`nginx.service`) or an instance
    (`getty@tty1.service`), never a template (`getty@.service`). Slices only when `slice_ok`."""
    if len(name) > _UNIT_NAME_MAX:
        return False
    match = _PLAIN_OR_INSTANCE.fullmatch(name)
    return match is not None and (slice_ok or match.group("type") != "slice")


def is_slice_name(name: str) -> bool:
    """A slice name systemd skips in a cgroup path: plain (no `@`), ending in `.slice`."""
    match = _PLAIN_OR_INSTANCE.fullmatch(name) if len(name) <= _UNIT_NAME_MAX else None
    return match is not None and match.group("type") == "slice" and match.group("instance") is None


def _unescape(name: str) -> str:
    # cg_unescape(): systemd prefixes with `_` the names the kernel might claim (`_cpu.service`).
    return name[1:] if name.startswith("_") else name


def leading_slices(components: Sequence[str]) -> tuple[str, ...]:
    """The names of the leading run of slices of a cgroup path (as systemd skips them), unescaped."""
    slices: list[str] = []
    for component in components:
        name = _unescape(component)
        if not is_slice_name(name):
            break
        slices.append(name)
    return tuple(slices)


@dataclass(frozen=True, slots=True)
class UnitPlacement:
    """Where a cgroup path puts a process: the outermost unit, the slices above it, what is below."""

    slices: tuple[str, ...]  # unescaped, outermost first
    unit: str  # unescaped
    unit_components: tuple[str, ...]  # the raw names of the unit's own cgroup, from the root
    below: tuple[str, ...]  # the raw names below the unit's cgroup: possibly delegated, never trusted

    @property
    def slice(self) -> str:
        """The slice directly containing the unit (cg_path_get_slice)."""
        return self.slices[-1] if self.slices else ROOT_SLICE

    @property
    def unit_path(self) -> str:
        return "/" + "/".join(self.unit_components)


def locate_unit(components: Sequence[str]) -> UnitPlacement | None:
    """The outermost unit of a cgroup path (cg_path_get_unit), or None when the process is in no unit.

    Never looks past the first name after the slices: if that is not a unit, the process is in a
    cgroup systemd did not make (`/docker/<id>`), whose subtree is whoever made it's.
    """
    slices = leading_slices(components)
    position = len(slices)
    if position == len(components):
        return None
    unit = _unescape(components[position])
    if not is_unit_name(unit):
        return None
    return UnitPlacement(
        slices=slices,
        unit=unit,
        unit_components=tuple(components[: position + 1]),
        below=tuple(components[position + 1 :]),
    )


def user_manager_uid(unit: str) -> int | None:
    """The uid of a user's service manager unit `user@UID.service`, or None for any other unit."""
    match = _USER_MANAGER.fullmatch(unit)
    if match is None:
        return None
    uid = int(match.group(1))
    # parse_uid(): (uid_t)-1 and the 16-bit (uid_t)-1 are not uids.
    return uid if uid < 2**32 - 1 and uid != 65535 else None


def parse_invocation_id(value: bytes) -> str | None:
    """An InvocationID xattr as 32 lowercase hex digits: systemd writes the hex form, older versions
    the 16 raw bytes. None for anything else, and for the null id."""
    if _HEX_ID.fullmatch(value):
        text = value.decode("ascii").lower()
    elif len(value) == 16:
        text = value.hex()
    else:
        return None
    return None if text == "0" * 32 else text


def _unit_check(problem: str, *, slices: bool) -> ValueCheck:
    def check(value: str) -> str | None:
        valid = is_slice_name(value) if slices else is_unit_name(value)
        return None if valid else problem

    return check


_UNIT_RULE = "a systemd unit name (name.service, name.scope, ...; an instance like getty@tty1.service, not a template)"
_SLICE_RULE = "a systemd slice name (name.slice, or -.slice for the root)"
SELECTOR_KINDS = (
    SelectorKind(_NAME, "unit", _unit_check(f"a unit is {_UNIT_RULE}, e.g. systemd:unit:nginx.service",
                                            slices=False)),
    SelectorKind(_NAME, "slice", _unit_check(f"a slice is {_SLICE_RULE}, e.g. systemd:slice:system.slice",
                                             slices=True)),
    SelectorKind(_NAME, "user_unit", _unit_check(f"a user_unit is {_UNIT_RULE}, e.g. systemd:user_unit:app.service",
                                                 slices=False)),
    SelectorKind(_NAME, "user_slice", _unit_check(f"a user_slice is {_SLICE_RULE}, e.g. systemd:user_slice:app.slice",
                                                  slices=True)),
)


@dataclass(frozen=True, slots=True)
class _Findings:
    placement: UnitPlacement | None
    user_placement: UnitPlacement | None
    invocation_id: str | None


class SystemdAttestor:
    """Selectors from the systemd unit (and user unit) whose cgroup a process is in.

    Options (the `systemd:` mapping of `workload_attestors` in the agent's configuration):

    - `invocation_id` (bool, true): record the unit's InvocationID as evidence.
    - `cgroup_root` (path, found in /proc/self/mountinfo): where the hierarchy systemd keeps its units
      in is mounted: `/sys/fs/cgroup` on a cgroup v2 host, `/sys/fs/cgroup/systemd` on a v1 or hybrid
      one. Only used to read InvocationIDs.
    - `proc_root` (path, /proc): where the agent finds /proc (tests).

    /proc/<pid>/cgroup and cgroup directories are kernel file systems held in memory: their reads
    never wait for a foreign file system, so they run on the event loop.
    """

    name = _NAME
    produces = SELECTOR_KINDS

    def __init__(
        self,
        *,
        invocation_id: bool = True,
        cgroup_root: str | Path | None = None,
        proc_root: str | Path = PROC_ROOT,
    ) -> None:
        if not isinstance(invocation_id, bool):
            raise ConfigError("workloadattestor(systemd): invocation_id must be true or false")
        self._invocation_id = invocation_id
        self._cgroup_root = None if cgroup_root is None else _absolute_path("cgroup_root", cgroup_root)
        self._proc_root = _absolute_path("proc_root", proc_root)
        # The cgroup mounts of the agent's namespace, read once when first needed: cgroup file systems
        # are mounted at boot, and a stale table could only cost evidence, never a selector.
        self._mounts: tuple[CgroupMount, ...] | None = None
        self._mounts_lock = threading.Lock()

    async def attest(self, process: WorkloadProcess) -> Sequence[Selector | Evidence]:
        try:
            # On the event loop: /proc/<pid>/cgroup and the unit's cgroup directory are kernel file
            # systems held in memory (30 µs), which no caller can make wait on a file system it
            # controls; a thread's hand-off would cost ten times that.
            findings = self._inspect(process.pid)
        except ProcessInfoError as err:
            raise AttestorError(_NAME, str(err)) from err
        placement, user_placement = findings.placement, findings.user_placement
        if placement is None:
            return []
        result: list[Selector | Evidence] = [
            Selector(_NAME, "unit", placement.unit),
            Selector(_NAME, "slice", placement.slice),
        ]
        if user_placement is not None:
            result.append(Selector(_NAME, "user_unit", user_placement.unit))
            result.append(Selector(_NAME, "user_slice", user_placement.slice))
        if findings.invocation_id is not None:
            result.append(Evidence(_NAME, "invocation_id", findings.invocation_id))
        return result

    def _inspect(self, pid: int) -> _Findings:
        cgroup = read_process_cgroups(pid, proc_root=self._proc_root).systemd_path
        if cgroup is None:
            return _Findings(None, None, None)
        placement = locate_unit(cgroup.components)
        if placement is None:
            return _Findings(None, None, None)
        user_placement = None
        if user_manager_uid(placement.unit) is not None:
            user_placement = locate_unit(placement.below)
        invocation_id = None
        if self._invocation_id:
            invocation_id = self._read_invocation_id(pid, CgroupPath(cgroup.hierarchy, placement.unit_path))
        return _Findings(placement, user_placement, invocation_id)

    def _read_invocation_id(self, pid: int, unit_cgroup: CgroupPath) -> str | None:
        directory = self._directory(unit_cgroup)
        if directory is None:
            _log.debug("no mount shows cgroup %s (%s): no invocation id for pid %d",
                       unit_cgroup.path, unit_cgroup.hierarchy, pid)
            return None
        for attribute in INVOCATION_ID_ATTRIBUTES:
            try:
                value = os.getxattr(directory, attribute, follow_symlinks=False)
            except OSError as err:
                # ENODATA (not set), EPERM (trusted.* needs CAP_SYS_ADMIN), EOPNOTSUPP (v1 without xattr), ENOENT
                _log.debug("cannot read %s of %s: %s", attribute, directory, err.strerror or err)
                continue
            invocation_id = parse_invocation_id(value)
            if invocation_id is not None:
                return invocation_id
            _log.debug("%s of %s is not an invocation id (%d bytes)", attribute, directory, len(value))
        _log.debug("no invocation id on %s (pid %d)", directory, pid)
        return None

    def _directory(self, cgroup: CgroupPath) -> str | None:
        if self._cgroup_root is not None:
            return str(self._cgroup_root) + ("" if cgroup.path == "/" else cgroup.path)
        with self._mounts_lock:
            if self._mounts is None:
                try:
                    self._mounts = read_cgroup_mounts(proc_root=self._proc_root)
                except ProcessInfoError as err:
                    _log.debug("no cgroup mounts: %s", err)
                    return None
            mounts = self._mounts
        return cgroup_directory(mounts, cgroup)


def _absolute_path(option: str, value: object) -> Path:
    if isinstance(value, str | Path) and os.path.isabs(value) and "\0" not in str(value):
        return Path(value)
    raise ConfigError(f"workloadattestor(systemd): {option} must be an absolute path")
