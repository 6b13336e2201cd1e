"""process_unchanged against real processes: alive, exited, zombie, and a recycled identity."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import replace

import pytest

from vouchd.agent.workload_api import process_unchanged
from vouchd.attestors import WorkloadProcess, read_start_time


@pytest.fixture
def child() -> Iterator[subprocess.Popen[bytes]]:
    process = subprocess.Popen(["sleep", "60"])
    try:
        yield process
    finally:
        process.kill()
        process.wait()


def describe(process: subprocess.Popen[bytes], *, pidfd: int | None) -> WorkloadProcess:
    return WorkloadProcess(
        pid=process.pid, uid=os.getuid(), gid=os.getgid(), start_time=read_start_time(process.pid), pidfd=pidfd
    )


@pytest.fixture
def pidfd_of(child: subprocess.Popen[bytes]) -> Iterator[int]:
    fd = os.pidfd_open(child.pid)
    try:
        yield fd
    finally:
        os.close(fd)


@pytest.mark.parametrize("pinned", [True, False], ids=["pidfd", "start-time-only"])
def test_a_live_process_is_unchanged(child: subprocess.Popen[bytes], pidfd_of: int, pinned: bool) -> None:
    assert process_unchanged(describe(child, pidfd=pidfd_of if pinned else None))


@pytest.mark.parametrize("pinned", [True, False], ids=["pidfd", "start-time-only"])
def test_a_zombie_is_gone(child: subprocess.Popen[bytes], pidfd_of: int, pinned: bool) -> None:
    process = describe(child, pidfd=pidfd_of if pinned else None)
    os.kill(child.pid, signal.SIGKILL)
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: /proc still has it

    assert not process_unchanged(process)


def test_a_reaped_process_is_gone(child: subprocess.Popen[bytes], pidfd_of: int) -> None:
    process = describe(child, pidfd=None)
    child.kill()
    child.wait()

    assert not process_unchanged(process)
    assert not process_unchanged(replace(process, pidfd=pidfd_of))


def test_another_process_at_the_same_pid_is_not_the_attested_one(child: subprocess.Popen[bytes]) -> None:
    # A recycled pid shows up as a different start time.
    process = describe(child, pidfd=None)
    recycled = replace(process, start_time=process.start_time - 1)

    assert process_unchanged(process)
    assert not process_unchanged(recycled)


def test_a_dead_pidfd_wins_over_a_matching_start_time(child: subprocess.Popen[bytes]) -> None:
    dead_pidfd = None
    try:
        dead_pidfd = os.pidfd_open(child.pid)
        child.kill()
        child.wait()
        # Claim the live test process's identity, pinned by a pidfd of a dead process.
        me = WorkloadProcess(pid=os.getpid(), uid=0, gid=0, start_time=read_start_time(os.getpid()), pidfd=dead_pidfd)
        assert not process_unchanged(me)
    finally:
        if dead_pidfd is not None:
            os.close(dead_pidfd)
