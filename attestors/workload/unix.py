"""The `unix` workload attestor: who the kernel says the caller is, and which binary it runs.

Selectors: `unix:uid`, `unix:user`, `unix:gid`, `unix:group` (from SO_PEERCRED), `unix:supplementary_gid`,
`unix:supplementary_group` (from /proc/<pid>/status), `unix:path` and `unix:sha256` of the executable.

The executable is read by executable.py (through /proc/<pid>/exe; never on a FUSE or network file
system; at once where it lives on a local disk, else on threads of its own with a share per uid,
never longer than a bounded wait) and hashed by
hashing.py (bounded in bytes, per uid, and in concurrency). Whenever either cannot answer now, the
caller gets no `path` / `sha256` rather than a wait, so entries that require them do not match: a
deleted executable, no ptrace access, a refused file system, a busy or hung thread, a spent budget.
"""

from __future__ import annotations

import asyncio
import grp
import pwd
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vouchd.attestors.base import WorkloadProcess
from vouchd.attestors.errors import AttestorError, ProcessInfoError
from vouchd.attestors.workload.executable import ExecutableFile, FileIdentity, inspect_executable
from vouchd.attestors.workload.hashing import (
    DEFAULT_HASH_BURST_BYTES,
    DEFAULT_HASH_BYTES_PER_SECOND,
    DEFAULT_HASH_CACHE_ENTRIES,
    DEFAULT_HASH_QUEUE_LIMIT,
    DEFAULT_HASH_UID_SHARE,
    DEFAULT_MAX_HASH_BYTES,
    HASH_THREADS,
    MIN_HASH_COST,
    ExecutableHasher,
    HashBudget,
    HashRefusal,
)
from vouchd.attestors.workload.procfs import read_supplementary_groups
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

_NAME = "unix"

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


# How long the name NSS gave an id is used again without asking (seconds), and how many are kept.
NAME_TTL = 2.0
_NAME_CAPACITY = 4096


@dataclass(frozen=True, slots=True)
class _ProcessFacts:
    user: str | None
    group: str | None
    supplementary_groups: tuple[tuple[int, str | None], ...]


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
    uid and the file. Cached hashes cost nothing. An executable on a FUSE or network file system is
    never opened, and one whose read does not answer within a second is not waited for: no
    `unix:path` or `unix:sha256` then (see executable.py). `stalled` tells the agent's watchdog when
    the threads that read executables all hang. The names of ids are asked of NSS on a thread, and
    used again for NAME_TTL seconds.
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
        """`hasher` replaces the one built from the hash options (tests, shared caches); the attestor
        inspects executables with its reader, on its reader's pool."""
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
        self._names = _Names()
        self._hasher = hasher or ExecutableHasher(
            max_bytes=max_hash_bytes,
            budget=HashBudget(
                bytes_per_second=hash_bytes_per_second,
                burst_bytes=hash_burst_bytes,
                uid_share=float(share),
            ),
        )

    @property
    def hasher(self) -> ExecutableHasher:
        """The hasher (and its reader): for other attestors that read callers' files, so all share one budget."""
        return self._hasher

    async def attest(self, process: WorkloadProcess) -> Sequence[Selector]:
        try:
            # /proc/<pid>/status never waits for a file system: read here. Name lookups go through NSS
            # (possibly LDAP): looked up on a thread, unless looked up within the last NAME_TTL seconds.
            # The caller's executable may wait: read on the reader's own threads unless it lives on a local
            # disk (ExecutableReader.inspect).
            groups = read_supplementary_groups(process.pid)
            facts = self._names.facts(process.uid, process.gid, groups)
            if facts is None:
                facts = await asyncio.to_thread(_look_up, process.uid, process.gid, groups)
                self._names.remember(process.uid, process.gid, facts)
            executable = await self._hasher.reader.inspect(process)
            digest = None
            if self._hash_executables and executable is not None:
                digest = await self._hasher.sha256(process, executable)
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
        if executable is not None:
            selectors.append(Selector(_NAME, "path", executable.path))
        if digest is not None:
            selectors.append(Selector(_NAME, "sha256", digest))
        return selectors

    def stalled(self, older_than: float) -> str | None:
        """Why this attestor serves nobody any more, or None: every thread of its reader's pool, or of
        its hasher's, has been busy with one call for more than `older_than` seconds (ReportsStalls)."""
        for pool in (self._hasher.reader.pool, self._hasher.pool):
            if (problem := pool.stalled(older_than)) is not None:
                return f"workloadattestor(unix): {problem}"
        return None



class _Names:
    """User and group names of ids, as NSS gave them at most `ttl` seconds ago (names of ids change
    seldom; nscd, where it runs, keeps them ten minutes). Bounded: the oldest are forgotten first."""

    def __init__(self, ttl: float = NAME_TTL, *, capacity: int = _NAME_CAPACITY,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._ttl = ttl
        self._capacity = capacity
        self._clock = clock
        self._known: OrderedDict[tuple[str, int], tuple[str | None, float]] = OrderedDict()

    def facts(self, uid: int, gid: int, groups: tuple[int, ...]) -> _ProcessFacts | None:
        """The facts, if every name is known and fresh; None if one must be looked up."""
        now = self._clock()
        names: dict[tuple[str, int], str | None] = {}
        for key in (("user", uid), ("group", gid), *(("group", g) for g in groups)):
            known = self._known.get(key)
            if known is None or known[1] <= now:
                return None
            names[key] = known[0]
        return _ProcessFacts(user=names["user", uid], group=names["group", gid],
                             supplementary_groups=tuple((g, names["group", g]) for g in groups))

    def remember(self, uid: int, gid: int, facts: _ProcessFacts) -> None:
        """What _look_up found for these ids (on the event loop's thread, as `facts`)."""
        expires = self._clock() + self._ttl
        found = [(("user", uid), facts.user), (("group", gid), facts.group),
                 *((("group", g), name) for g, name in facts.supplementary_groups)]
        for key, name in found:
            self._known[key] = (name, expires)
            self._known.move_to_end(key)
        while len(self._known) > self._capacity:
            self._known.popitem(last=False)


def _look_up(uid: int, gid: int, groups: tuple[int, ...]) -> _ProcessFacts:
    """Ask NSS for the names (blocks: runs on a thread)."""
    return _ProcessFacts(user=_user_name(uid), group=_group_name(gid),
                         supplementary_groups=tuple((g, _group_name(g)) for g in groups))


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
