"""Real processes for attestor tests: how the Workload API would describe one, and its selectors."""

from __future__ import annotations

import os
import subprocess

from vouchd.attestors.base import WorkloadProcess
from vouchd.attestors.workload.procfs import read_process_stat
from vouchd.selectors import Selector

__all__ = ["described", "unix_values"]


def described(child: subprocess.Popen[bytes], uid: int | None = None) -> WorkloadProcess:
    """The child as the Workload API would describe it (SO_PEERCRED and its start time); `uid` may
    stand in for another user's, so that per-uid rules can be tested as root."""
    return WorkloadProcess(pid=child.pid, uid=os.getuid() if uid is None else uid, gid=os.getgid(),
                           start_time=read_process_stat(child.pid).start_time)


def unix_values(selectors: object, key: str) -> list[str]:
    """The values of the `unix:<key>` selectors among `selectors`."""
    assert isinstance(selectors, list | tuple | frozenset)
    return [s.value for s in selectors if isinstance(s, Selector) and s.type == "unix" and s.key == key]
