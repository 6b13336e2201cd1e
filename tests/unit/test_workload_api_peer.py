"""Who the caller is: describe_peer against a fake /proc, pidfd pinning against fake and real sockets,
process_unchanged against real processes."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from vouchd.agent.workload_api import PeerError
from vouchd.agent.workload_api.peer import (
    SO_PEERPIDFD,
    PeerCredentials,
    describe_peer,
    kernel_has_peer_pidfd,
    peer_pidfd,
    probe_peer_pidfd,
    process_unchanged,
)
from vouchd.attestors import WorkloadProcess
from vouchd.attestors.workload.procfs import read_process_stat

PID = 4321
START_TIME = 987654


class FakeProc:
    """A /proc with one process in it, written the way the kernel writes stat and status."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def process(self, pid: int = PID, *, uid: tuple[int, int] = (1000, 1000), gid: tuple[int, int] = (100, 100),
                start_time: int = START_TIME) -> None:
        directory = self.root / str(pid)
        directory.mkdir(exist_ok=True)
        (directory / "stat").write_text(
            f"{pid} (web) S 1 {pid} {pid} 0 -1 4194560 103 0 0 0 0 0 0 0 20 0 1 0 {start_time} 5746688 224\n"
        )
        (directory / "status").write_text(
            "Name:\tweb\nUmask:\t0022\nState:\tS (sleeping)\n"
            f"Uid:\t{uid[0]}\t{uid[1]}\t{uid[1]}\t{uid[1]}\n"
            f"Gid:\t{gid[0]}\t{gid[1]}\t{gid[1]}\t{gid[1]}\n"
            "Groups:\t100 27\n"
        )


@pytest.fixture
def proc(tmp_path: Path) -> FakeProc:
    return FakeProc(tmp_path)


def start_time_of(pid: int) -> int:
    return read_process_stat(pid).start_time


def test_the_caller_is_described_by_its_credentials_and_start_time(proc: FakeProc) -> None:
    proc.process()

    process = describe_peer(PeerCredentials(pid=PID, uid=1000, gid=100), pidfd=7, proc_root=proc.root)

    assert process == WorkloadProcess(pid=PID, uid=1000, gid=100, start_time=START_TIME, pidfd=7)


@pytest.mark.parametrize(
    ("uid", "gid", "now"),
    [((2000, 2000), (100, 100), "uid 2000 gid 100"), ((1000, 1000), (200, 200), "uid 1000 gid 200")],
    ids=["uid", "gid"],
)
def test_a_process_at_the_pid_with_other_credentials_is_refused(
    proc: FakeProc, uid: tuple[int, int], gid: tuple[int, int], now: str
) -> None:
    # Without a pidfd this is what a recycled pid looks like: someone else's process at the caller's pid.
    proc.process(uid=uid, gid=gid)

    with pytest.raises(PeerError, match=f"^process {PID} runs as {now}, not the uid 1000 gid 100 it connected with$"):
        describe_peer(PeerCredentials(pid=PID, uid=1000, gid=100), proc_root=proc.root)


def test_effective_ids_are_compared_because_so_peercred_reports_effective_ids(proc: FakeProc) -> None:
    # A set-uid program: real uid 1000, effective uid 0. SO_PEERCRED says 0.
    proc.process(uid=(1000, 0), gid=(100, 0))

    process = describe_peer(PeerCredentials(pid=PID, uid=0, gid=0), proc_root=proc.root)

    assert (process.uid, process.gid) == (0, 0)
    with pytest.raises(PeerError, match="runs as uid 0 gid 0"):
        describe_peer(PeerCredentials(pid=PID, uid=1000, gid=100), proc_root=proc.root)


def test_a_caller_that_is_gone_is_refused(proc: FakeProc) -> None:
    with pytest.raises(PeerError, match=f"^cannot read the caller's process: process {PID} has exited$"):
        describe_peer(PeerCredentials(pid=PID, uid=1000, gid=100), proc_root=proc.root)


def test_a_caller_without_a_visible_pid_is_refused(proc: FakeProc) -> None:
    with pytest.raises(PeerError, match=r"^kernel reported no pid for the caller$"):
        describe_peer(PeerCredentials(pid=0, uid=1000, gid=100), proc_root=proc.root)


def test_the_real_caller_matches_its_own_proc_entry() -> None:
    process = describe_peer(PeerCredentials(pid=os.getpid(), uid=os.geteuid(), gid=os.getegid()))

    assert process.start_time == start_time_of(os.getpid())
    assert process_unchanged(process)


def test_a_recycled_pid_seen_through_proc_is_not_the_attested_process(proc: FakeProc) -> None:
    proc.process()
    process = describe_peer(PeerCredentials(pid=PID, uid=1000, gid=100), proc_root=proc.root)
    assert process_unchanged(process, proc_root=proc.root)

    proc.process(start_time=START_TIME + 1)  # same pid, same ids, a later process

    assert not process_unchanged(process, proc_root=proc.root)


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
        pid=process.pid, uid=os.getuid(), gid=os.getgid(), start_time=start_time_of(process.pid), pidfd=pidfd
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
        me = WorkloadProcess(pid=os.getpid(), uid=0, gid=0, start_time=start_time_of(os.getpid()), pidfd=dead_pidfd)
        assert not process_unchanged(me)
    finally:
        if dead_pidfd is not None:
            os.close(dead_pidfd)


# -- pinning the caller with SO_PEERPIDFD ------------------------------------------------------------------------


class FakeSocket:
    """A socket whose SO_PEERPIDFD answer the test chooses: a descriptor, or the kernel's errno."""

    def __init__(self, *, pidfd: int | None = None, error: int | None = None) -> None:
        self._pidfd = pidfd
        self._error = error
        self.asked: list[tuple[int, int]] = []

    def getsockopt(self, level: int, option: int, /) -> int:
        self.asked.append((level, option))
        if self._error is not None:
            raise OSError(self._error, os.strerror(self._error))
        assert self._pidfd is not None
        return self._pidfd


@pytest.fixture
def descriptor() -> Iterator[int]:
    """A real descriptor standing in for a pidfd, made inheritable as a kernel fd would not be."""
    read_end, write_end = os.pipe()
    os.close(write_end)
    os.set_inheritable(read_end, True)
    try:
        yield read_end
    finally:
        with contextlib.suppress(OSError):  # the code under test may have closed it
            os.close(read_end)


@pytest.mark.parametrize("gone", [errno.EINVAL, errno.ESRCH, errno.ENODATA], ids=["EINVAL", "ESRCH", "ENODATA"])
def test_a_caller_gone_before_pinning_is_refused_on_a_kernel_that_pins(gone: int) -> None:
    # Linux 6.5-6.14 answer EINVAL for an exited peer: that is not "this kernel cannot pin".
    sock = FakeSocket(error=gone)

    with pytest.raises(PeerError, match=r"^caller exited before it was identified$"):
        peer_pidfd(sock, kernel_has_pidfd=True)

    assert sock.asked == [(socket.SOL_SOCKET, SO_PEERPIDFD)]


def test_any_other_pinning_failure_is_refused_and_named() -> None:
    with pytest.raises(PeerError, match=r"^cannot pin the caller's process: Too many open files$"):
        peer_pidfd(FakeSocket(error=errno.EMFILE), kernel_has_pidfd=True)


def test_a_kernel_that_pins_gives_a_pidfd_no_child_inherits(descriptor: int) -> None:
    assert peer_pidfd(FakeSocket(pidfd=descriptor), kernel_has_pidfd=True) == descriptor
    assert not os.get_inheritable(descriptor)


def test_a_kernel_without_peer_pidfd_is_not_asked_and_falls_back_to_start_time() -> None:
    sock = FakeSocket(error=errno.ENOPROTOOPT)

    assert peer_pidfd(sock, kernel_has_pidfd=False) is None
    assert sock.asked == []


def test_only_no_such_option_means_the_kernel_cannot_pin(descriptor: int) -> None:
    assert probe_peer_pidfd(FakeSocket(error=errno.ENOPROTOOPT)) is False
    assert probe_peer_pidfd(FakeSocket(pidfd=descriptor)) is True
    with pytest.raises(OSError, match="Bad file descriptor"):
        os.fstat(descriptor)  # the probe's pidfd is closed
    with pytest.raises(PeerError, match=r"^cannot tell whether the kernel has SO_PEERPIDFD: Invalid argument$"):
        probe_peer_pidfd(FakeSocket(error=errno.EINVAL))


def test_the_kernel_is_asked_once_per_process() -> None:
    kernel_has_peer_pidfd.cache_clear()

    first = kernel_has_peer_pidfd()
    assert kernel_has_peer_pidfd() is first

    assert kernel_has_peer_pidfd.cache_info().misses == 1


def test_a_real_connection_is_pinned_to_the_process_that_made_it() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    try:
        pidfd = peer_pidfd(left, kernel_has_pidfd=kernel_has_peer_pidfd())
    finally:
        left.close()
        right.close()
    if pidfd is None:
        pytest.skip("kernel has no SO_PEERPIDFD")
    try:
        assert not os.get_inheritable(pidfd)
        fdinfo = Path(f"/proc/self/fdinfo/{pidfd}").read_text()
        assert f"Pid:\t{os.getpid()}" in fdinfo.splitlines()
    finally:
        os.close(pidfd)
