"""The `interpreter` workload attestor: which script an interpreter runs, and its sha256.

AI agents are mostly scripts that one /usr/bin/python3 runs under one uid: `unix:path` and
`unix:sha256` name the interpreter, and tell such agents apart no better than `unix:uid` does. This
attestor names the interpreter by the executable the kernel reports, finds the script (or, for
`python -m`, the module) its command line names, inside the caller's own root, and hashes it with
the unix attestor's hasher: one cache, one byte budget with its share per uid, one queue.

Selectors:

- `interpreter:name:<python|node|ruby|perl|bash|sh|java>`, from /proc/<pid>/exe (commandline.py);
- `script:path:<path>`, the script as the process names it inside its root, symlinks resolved;
- `script:sha256:<hex>`, of that file;
- `script:module:<dotted.name>` for `python -m`, with script:path and script:sha256 when the
  module's file can be told for sure (pymodules.find_module).

What the command line names is what the process says (it can rewrite its command line, and change
directory), so script selectors never stand alone: every entry needs a kernel-anchored selector
(docs/design.md §6). Within that, the attestor fails closed: when it cannot be sure (an option its
parser does not know, a script on FUSE or a network file system, no access, a read that does not
answer within the reader's wait limit, a spent hashing budget) it gives fewer selectors, never other
ones and never a wait. A process that is no interpreter, or whose executable the agent may not read
(no ptrace access), gets none from this attestor.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from vouchd.attestors.base import WorkloadProcess
from vouchd.attestors.errors import AttestorError, ProcessInfoError
from vouchd.attestors.workload.commandline import (
    INTERPRETERS,
    MODULE_NAME,
    Module,
    NoScript,
    entry_point,
    executable_interpreter,
    identify,
    is_busybox,
)
from vouchd.attestors.workload.executable import NoAnswerError, RefusedFileSystemError
from vouchd.attestors.workload.hashing import ChangedWhileHashedError, ExecutableHasher
from vouchd.attestors.workload.mounts import MountTables
from vouchd.attestors.workload.procargs import read_command_line, read_environment
from vouchd.attestors.workload.procfs import PROC_ROOT
from vouchd.attestors.workload.pymodules import find_module
from vouchd.attestors.workload.scriptfile import (
    ProcessFiles,
    ScriptChangedError,
    ScriptFile,
    ScriptNotFoundError,
    find_script,
    open_for_reading,
)
from vouchd.attestors.workload.throttle import UidWarnings
from vouchd.errors import ConfigError
from vouchd.selectors import InvalidSelectorError, Selector, SelectorKind, absolute_path, matching

__all__ = ["SELECTOR_KINDS", "InterpreterAttestor"]

_log = logging.getLogger("vouchd.attestors.interpreter")

_NAME = "interpreter"
_SCRIPT = "script"
_NO_COMMAND_LINE = "its command line is empty: it is still inside exec, or exiting"
_KNOWN = ", ".join(INTERPRETERS)

SELECTOR_KINDS = (
    SelectorKind(_NAME, "name", matching("|".join(INTERPRETERS), f"an interpreter name is one of: {_KNOWN}")),
    SelectorKind(_SCRIPT, "path", absolute_path("a script path is absolute and normalised, as the process names "
                                                "it inside its root, e.g. script:path:/srv/agent/main.py")),
    SelectorKind(_SCRIPT, "sha256", matching(r"[0-9a-f]{64}", "a sha256 is 64 lowercase hex digits, "
                                                              "as sha256sum prints it")),
    SelectorKind(_SCRIPT, "module", matching(MODULE_NAME.pattern, "a module is a dotted python name, "
                                                                  "e.g. script:module:agent.main")),
)


@dataclass(slots=True)
class _Finding:
    """What the reader's thread found about one process."""

    interpreter: str | None = None
    module: str | None = None
    script: ScriptFile | None = None
    reason: str | None = None  # why there is no script, when that is no problem of the agent's (-c, stdin)
    # Why the script was not read, when the operator should know: (topic, message, extra for the log).
    problem: tuple[str, str, dict[str, object]] | None = field(default=None)

    def close(self) -> None:
        if self.script is not None:
            self.script.close()


class InterpreterAttestor:
    """Selectors naming the script an interpreter runs (see the module's docstring).

    Options (the `interpreter:` mapping of `workload_attestors`):

    - `interpreters` (list, all of bash, java, node, perl, python, ruby, sh): which to describe;
      other processes get no selectors from this attestor.
    - `hash_scripts` (bool, true): compute `script:sha256`.
    - `read_environment` (bool, false): read the caller's environment (/proc/<pid>/environ) where
      python's module search depends on it (PYTHONPATH, PYTHONSAFEPATH, PYTHONHOME, HOME, PATH).
      An environment holds secrets: only those variables are kept, and none is ever logged. Without
      it they are taken to be unset, and a search that needs one stops (script:module only).

    `hasher` is the unix attestor's (UnixAttestor.hasher), so that executables and scripts share one
    cache, budget, queue and threads; without it the attestor has one of its own. Scripts are found
    on its reader's pool, within the reader's wait limit, never on the event loop or asyncio's
    default threads: reading another process's command line waits for its memory map's lock, and a
    script's directories can be anywhere. `stalled` tells the watchdog when those threads all hang.
    """

    name = _NAME
    produces = SELECTOR_KINDS

    def __init__(
        self,
        *,
        interpreters: Sequence[str] | None = None,
        hash_scripts: bool = True,
        read_environment: bool = False,
        hasher: ExecutableHasher | None = None,
    ) -> None:
        if interpreters is None:
            interpreters = INTERPRETERS
        if isinstance(interpreters, str) or not isinstance(interpreters, list | tuple) or not interpreters:
            raise ConfigError(f"workloadattestor(interpreter): interpreters must be a non-empty list of: {_KNOWN}")
        for interpreter in interpreters:
            if interpreter not in INTERPRETERS:
                raise ConfigError(f"workloadattestor(interpreter): interpreters names {str(interpreter)[:40]!r}, "
                                  f"which is none of: {_KNOWN}")
        if not isinstance(hash_scripts, bool):
            raise ConfigError("workloadattestor(interpreter): hash_scripts must be true or false")
        if not isinstance(read_environment, bool):
            raise ConfigError("workloadattestor(interpreter): read_environment must be true or false")
        if hasher is not None and not isinstance(hasher, ExecutableHasher):
            raise ConfigError("workloadattestor(interpreter): hasher must be an ExecutableHasher")
        self._interpreters = frozenset(interpreters)
        self._hash_scripts = hash_scripts
        self._read_environment = read_environment
        self._hasher = hasher or ExecutableHasher()
        self._proc_root = PROC_ROOT
        self._mounts = MountTables(proc_root=self._proc_root)
        self._warnings = UidWarnings(_log)

    async def attest(self, process: WorkloadProcess) -> Sequence[Selector]:
        try:
            # readlink of the magic link asks no file system: it only names the file exec'd.
            executable = os.readlink(f"{self._proc_root}/{process.pid}/exe")
        except PermissionError:
            return []  # no ptrace access to the caller; the unix attestor says so
        except (FileNotFoundError, ProcessLookupError) as err:
            raise AttestorError(_NAME, f"process {process.pid} has exited") from err
        except OSError as err:
            raise AttestorError(_NAME, f"cannot read the executable of process {process.pid}: "
                                       f"{err.strerror or err}") from err
        busybox = is_busybox(executable)
        candidate = "sh" if busybox else executable_interpreter(executable)
        if candidate is None or candidate not in self._interpreters:
            return []

        reader = self._hasher.reader
        try:
            finding = await reader.run(process, functools.partial(self._find, process.pid, executable),
                                       discard=_Finding.close)
        except ProcessInfoError as err:  # ProcessExitedError among them: as in the unix attestor
            raise AttestorError(_NAME, str(err)) from err
        except (NoAnswerError, PermissionError) as err:
            reason = str(err) if isinstance(err, NoAnswerError) else "the agent may not read its command line"
            self._warn(process, "script_no_answer" if isinstance(err, NoAnswerError) else "script_access", reason,
                       {"reason": reason})
            # busybox is a shell only by its command line, which was not read.
            return [] if busybox else [Selector(_NAME, "name", candidate)]

        try:
            return await self._selectors(process, finding)
        finally:
            finding.close()

    def stalled(self, older_than: float) -> str | None:
        """Why this attestor serves nobody any more, or None: every thread of its reader's pool, or of its
        hasher's, has been busy with one call for more than `older_than` seconds (ReportsStalls)."""
        for pool in (self._hasher.reader.pool, self._hasher.pool):
            if (problem := pool.stalled(older_than)) is not None:
                return f"workloadattestor(interpreter): {problem}"
        return None

    async def _selectors(self, process: WorkloadProcess, finding: _Finding) -> list[Selector]:
        if finding.interpreter is None:
            return []
        selectors = [Selector(_NAME, "name", finding.interpreter)]
        if finding.module is not None:
            selectors.append(Selector(_SCRIPT, "module", finding.module))
        if finding.problem is not None:
            topic, message, extra = finding.problem
            self._warn(process, topic, message, extra)
        elif finding.reason is not None:
            _log.debug("no script for pid %d: %s", process.pid, finding.reason,
                       extra={"pid": process.pid, "uid": process.uid, "reason": finding.reason})
        script = finding.script
        if script is None:
            return selectors
        if (path := _path_selector(script.path)) is not None:
            selectors.append(path)
        if self._hash_scripts:
            try:
                digest = await self._hasher.sha256_of_file(
                    process, script.path, script.identity,
                    functools.partial(self._open, process, script), what="script",
                )
            except ChangedWhileHashedError as err:
                self._warn(process, "script_changed", err.reason, {"reason": err.reason})
                digest = None
            if digest is not None:
                selectors.append(Selector(_SCRIPT, "sha256", digest))
        return selectors

    def _find(self, pid: int, executable: str) -> _Finding:
        """Runs on a reader thread: everything here may block."""
        arguments, complete = read_command_line(pid, proc_root=self._proc_root)
        invocation = identify(executable, arguments)
        if invocation is None or invocation.interpreter not in self._interpreters:
            return _Finding()
        if not arguments and complete:
            # What a process inside exec(2) shows: its exe already names the new program, whose arguments
            # the kernel has not placed yet (procargs.py); an exiting one too. Which interpreter it is, is
            # known; what it runs is not: the same selectors as "no script", with the reason it has.
            return _Finding(invocation.interpreter, reason=_NO_COMMAND_LINE)
        entry = entry_point(invocation, complete=complete)
        finding = _Finding(invocation.interpreter, module=entry.name if isinstance(entry, Module) else None)
        if isinstance(entry, NoScript):
            finding.reason = entry.reason
            return finding
        try:
            with ProcessFiles(pid, mounts=self._mounts, proc_root=self._proc_root) as files:
                if isinstance(entry, Module):
                    # Read even with -E: python still finds its venv along PATH, and the user's site under HOME.
                    environment = read_environment(pid, proc_root=self._proc_root) if self._read_environment else None
                    finding.script = find_module(files, entry, executable=executable, program=invocation.program,
                                                 environment=environment)
                    if finding.script is None:
                        finding.reason = "which file its module is cannot be told for sure"
                else:
                    finding.script = find_script(files, entry)
        except ScriptNotFoundError as err:
            finding.reason = f"its script was not found: {err}"
        except RefusedFileSystemError as err:
            extra: dict[str, object] = {"reason": err.reason}
            if err.mount is not None:
                extra.update(file_system=err.mount.fs_type, mount_point=err.mount.mount_point)
            finding.problem = ("script_file_system", err.reason, extra)
        except PermissionError:
            reason = "the agent has no access to its files"
            finding.problem = ("script_access", reason, {"reason": reason})
        except ProcessInfoError:
            finding.close()
            raise
        except OSError as err:
            reason = f"reading its script failed: {err.strerror or err}"
            finding.problem = ("script_error", reason, {"reason": reason})
        return finding

    async def _open(self, process: WorkloadProcess, script: ScriptFile) -> int | None:
        """A descriptor to hash `script` from, opened on a reader thread; None (warned about) when not now."""
        try:
            return await self._hasher.reader.run(
                process, functools.partial(open_for_reading, script, proc_root=self._proc_root), discard=os.close,
            )
        except (NoAnswerError, ScriptChangedError) as err:
            reason = str(err)
        except OSError as err:
            reason = f"opening it failed: {err.strerror or err}"
        self._warn(process, "script_open", reason, {"reason": reason}, omitting="script:sha256")
        return None

    def _warn(self, process: WorkloadProcess, topic: str, reason: str, extra: dict[str, object],
              omitting: str = "script:path and script:sha256") -> None:
        # Names neither the script nor any argument: the command line is the process's, and may hold secrets.
        self._warnings.warn(
            process.uid, topic,
            "not reading the script of pid %d uid %d: %s; omitting %s",
            process.pid, process.uid, reason, omitting, extra={"pid": process.pid, **extra},
        )


def _path_selector(path: str) -> Selector | None:
    """`script:path`, unless the path cannot be one: not UTF-8 (a selector is text), or too long."""
    try:
        path.encode("utf-8")
        return Selector(_SCRIPT, "path", path)
    except (UnicodeEncodeError, InvalidSelectorError):
        return None

