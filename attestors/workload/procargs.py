"""A process's command line and environment, as /proc/<pid>/cmdline and /proc/<pid>/environ hold them.

The interpreter attestor reads what a process runs from its command line, and where `python -m`
looks from its environment. Both live in the process's own memory: reading them waits for its
memory map's lock, so it blocks, and runs only on the threads of an ExecutableReader's pool, within
its wait limit. Both are read up to a limit (a JVM's class path can be long), and the environment is
filtered at once: only the variables python's module search depends on (PYTHON_VARIABLES) are kept,
and nothing of it is ever logged.

What is read is what the process says now: it may have rewritten its command line (as setproctitle
does). And a process still inside exec(2) has none yet: /proc/<pid>/exe already names the new
executable, but its arguments are placed only after that executable and its loader are mapped, and
until then its cmdline reads empty, as it also does once the process exits.
"""

from __future__ import annotations

import os
from pathlib import Path

from vouchd.attestors.errors import ProcessExitedError, ProcessInfoError
from vouchd.attestors.workload.commandline import split_command_line
from vouchd.attestors.workload.procfs import PROC_ROOT

__all__ = [
    "COMMAND_LINE_LIMIT",
    "ENVIRONMENT_LIMIT",
    "PYTHON_VARIABLES",
    "read_command_line",
    "read_environment",
    "read_up_to",
]

# Command lines and environments can be long (a JVM's class path); what is beyond these is not read.
COMMAND_LINE_LIMIT = 128 * 1024
ENVIRONMENT_LIMIT = 256 * 1024

# The variables that change where `python -m` looks; only these are kept of an environment read.
PYTHON_VARIABLES = frozenset({
    "PYTHONPATH", "PYTHONSAFEPATH", "PYTHONHOME", "PYTHONNOUSERSITE", "PYTHONUSERBASE", "HOME", "PATH",
})


def read_up_to(fd: int, limit: int) -> tuple[bytes, bool]:
    """At most `limit` bytes from `fd`, and whether there was more."""
    chunks: list[bytes] = []
    size = 0
    while size <= limit and (chunk := os.read(fd, min(65536, limit + 1 - size))):
        chunks.append(chunk)
        size += len(chunk)
    data = b"".join(chunks)
    return data[:limit], len(data) > limit


def _read_proc(pid: int, name: str, limit: int, proc_root: Path) -> tuple[bytes, bool]:
    """Reading another process's cmdline or environ reads its memory, and waits for its memory map's
    lock: only ever on a pool thread. Raises ProcessExitedError, PermissionError."""
    path = f"{proc_root}/{pid}/{name}"
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except (FileNotFoundError, ProcessLookupError) as err:
        raise ProcessExitedError(f"process {pid} has exited") from err
    try:
        return read_up_to(fd, limit)
    except ProcessLookupError as err:
        raise ProcessExitedError(f"process {pid} has exited") from err
    except PermissionError:
        raise
    except OSError as err:
        raise ProcessInfoError(f"cannot read {path}: {err.strerror or err}") from err
    finally:
        os.close(fd)


def read_command_line(pid: int, *, proc_root: Path = PROC_ROOT,
                      limit: int = COMMAND_LINE_LIMIT) -> tuple[tuple[str, ...], bool]:
    """The arguments of a process as /proc/<pid>/cmdline holds them now, and whether that is all of them."""
    raw, truncated = _read_proc(pid, "cmdline", limit, proc_root)
    return split_command_line(raw, truncated=truncated), not truncated


def read_environment(pid: int, *, proc_root: Path = PROC_ROOT,
                     limit: int = ENVIRONMENT_LIMIT) -> dict[str, str] | None:
    """The PYTHON_VARIABLES of a process's initial environment (/proc/<pid>/environ); None when it is
    longer than `limit`, so a variable could be beyond what was read.

    Everything else in it (tokens, passwords) is dropped at once, and nothing of it is ever logged.
    """
    raw, truncated = _read_proc(pid, "environ", limit, proc_root)
    if truncated:
        return None
    found: dict[str, str] = {}
    for item in raw.split(b"\0"):
        name, equals, value = item.partition(b"=")
        key = os.fsdecode(name)
        # getenv(3), which python reads these with, takes the first of duplicates.
        if equals and key in PYTHON_VARIABLES and key not in found:
            found[key] = os.fsdecode(value)
    return found

