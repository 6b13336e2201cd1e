"""Callers whose executables hang when read cannot stall the others.

Two stalled file systems. Where the machine allows mounting: overlayfs stacked on a FUSE mount of the
test's own (tests/fusefs.py) whose server stops answering the agent. The type check lets it through
(its type is `overlay`), so it shows what the threads, their per-uid share, the bounded waits and the
watchdog do about a read that really hangs in the kernel. Everywhere: a FIFO standing in for the
executable (opening a FIFO for reading blocks until someone opens it for writing), through a /proc of
the test's own whose <pid>/exe points at it.

Every wait is bounded (BOUND), and each guard, removed, fails a test here: see each test's comment.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fusefs import FuseFile, fuse_available, mount_fs, mounted, unmount
from tests.processes import described, unix_values
from tests.unit.conftest import Spawn
from vouchd.attestors import attest_workload
from vouchd.attestors.workload.executable import READ_THREADS, READ_UID_THREADS, READ_WAIT_LIMIT, ExecutableReader
from vouchd.attestors.workload.pool import stalled_attestation
from vouchd.attestors.workload.unix import ExecutableHasher, UnixAttestor

SLEEP = Path(shutil.which("sleep") or "/bin/sleep").resolve()
BOUND = 5.0  # the Workload API's attestation deadline: every caller must be answered within it
STALLED = 6  # what stopped every later caller when these reads ran on asyncio's default pool (2 cores: 6 threads)




async def eventually(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + BOUND
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        await asyncio.sleep(0.01)


def local_sleep(directory: Path) -> Path:
    binary = directory / "local-sleep"
    shutil.copy2(SLEEP, binary)
    return binary


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def attestor_reading_with(reader: ExecutableReader) -> UnixAttestor:
    return UnixAttestor(hasher=ExecutableHasher(reader=reader))


# -- overlayfs on a FUSE mount whose server stops answering -------------------------------------------------------


@pytest.fixture
def stalled_overlay(tmp_path: Path, spawn: Spawn) -> Iterator[tuple[Path, FuseFile]]:
    """`sleep` in an overlay whose lower layer is FUSE; `served.stall()` makes reads of it hang.

    Asks for `spawn` so that it ends first: a process waiting for a FUSE answer cannot be killed.
    """
    if (why := fuse_available()) is not None:
        pytest.skip(f"no FUSE mount on this machine: {why}")
    lower, upper, work, merged = (tmp_path / name for name in ("lower", "upper", "work", "merged"))
    for folder in (lower, upper, work, merged):
        folder.mkdir()
    served = FuseFile("sleep", SLEEP.read_bytes())
    try:
        with mounted(lower, served):
            try:
                mount_fs("overlay", merged, "overlay", f"lowerdir={lower},upperdir={upper},workdir={work}")
            except OSError as err:
                pytest.skip(f"cannot stack overlayfs on FUSE here: {err}")
            try:
                yield merged, served
            finally:
                served.release()
                unmount(merged)
    except PermissionError as err:
        pytest.skip(f"cannot mount FUSE here: {err}")


async def test_six_stalled_callers_of_one_uid_hold_its_share_and_nobody_elses(
    stalled_overlay: tuple[Path, FuseFile], spawn: Spawn, tmp_path: Path
) -> None:
    # Guards: the per-uid share (without it all six reads reach the hung server), the reader's own
    # threads and its bounded wait (without them the stalled callers, or the other one, miss BOUND).
    merged, served = stalled_overlay
    reader = ExecutableReader()
    attestor = attestor_reading_with(reader)
    stalled = [described(spawn(merged / "sleep"), uid=4242) for _ in range(STALLED)]
    other_binary = local_sleep(tmp_path)
    other = described(spawn(other_binary), uid=4343)
    served.stall()

    started = time.monotonic()
    hanging = [asyncio.create_task(attestor.attest(process)) for process in stalled]
    await eventually(lambda: served.held == READ_UID_THREADS, "uid 4242's reads reach the hung server")
    async with asyncio.timeout(BOUND):
        other_selectors = (await attest_workload(other, [attestor])).selectors
    other_took = time.monotonic() - started
    async with asyncio.timeout(BOUND):
        results = await asyncio.gather(*hanging)
    stalled_took = time.monotonic() - started

    assert unix_values(other_selectors, "path") == [str(other_binary)]
    assert unix_values(other_selectors, "sha256") == [sha256_of(other_binary)]
    assert other_took < READ_WAIT_LIMIT, f"the other uid waited {other_took:.2f} s"
    for selectors in results:  # attested within the deadline, without what could not be read
        assert unix_values(selectors, "uid") == ["4242"]
        assert unix_values(selectors, "path") == [] and unix_values(selectors, "sha256") == []
    assert stalled_took < BOUND
    assert served.held == READ_UID_THREADS, "the other four waited in line and never reached the server"
    assert [call.uid for call in reader.pool.busy()] == [4242] * READ_UID_THREADS


async def test_six_stalled_uids_leave_threads_for_a_seventh(
    stalled_overlay: tuple[Path, FuseFile], spawn: Spawn, tmp_path: Path
) -> None:
    # Guard: the reader's own pool. On asyncio's default pool (six threads here) the seventh uid waits
    # behind the six hung reads until BOUND.
    merged, served = stalled_overlay
    attestor = UnixAttestor()
    stalled = [described(spawn(merged / "sleep"), uid=5000 + i) for i in range(STALLED)]
    other_binary = local_sleep(tmp_path)
    other = described(spawn(other_binary), uid=4343)
    served.stall()

    hanging = [asyncio.create_task(attestor.attest(process)) for process in stalled]
    await eventually(lambda: served.held == STALLED, "every stalled uid's read reaches the hung server")
    started = time.monotonic()
    async with asyncio.timeout(BOUND):
        other_selectors = (await attest_workload(other, [attestor])).selectors
    other_took = time.monotonic() - started
    async with asyncio.timeout(BOUND):
        results = await asyncio.gather(*hanging)

    assert unix_values(other_selectors, "sha256") == [sha256_of(other_binary)]
    assert other_took < READ_WAIT_LIMIT, f"the seventh uid waited {other_took:.2f} s"
    assert all(unix_values(selectors, "path") == [] for selectors in results)


async def test_the_watchdog_sees_the_readers_once_every_thread_hangs(
    stalled_overlay: tuple[Path, FuseFile], spawn: Spawn, tmp_path: Path
) -> None:
    # Guard: stalled() (the agent's watchdog stops pinging on what it returns).
    merged, served = stalled_overlay
    reader = ExecutableReader()
    attestor = attestor_reading_with(reader)
    stalled = [described(spawn(merged / "sleep"), uid=6000 + i) for i in range(READ_THREADS)]
    served.stall()

    hanging = [asyncio.create_task(attestor.attest(process)) for process in stalled[:-1]]
    await eventually(lambda: served.held == READ_THREADS - 1, "all but one thread hang")
    await asyncio.sleep(0.3)
    assert attestor.stalled(0.2) is None, "one thread still serves"
    hanging.append(asyncio.create_task(attestor.attest(stalled[-1])))
    await eventually(lambda: served.held == READ_THREADS, "every thread hangs")
    await asyncio.sleep(0.3)

    problem = attestor.stalled(0.2)
    assert problem is not None and problem.startswith(
        f"workloadattestor(unix): all {READ_THREADS} vouchd-exe threads have been busy for more than 0.2 s"
    ), problem
    assert stalled_attestation([attestor], 0.2) == problem
    assert attestor.stalled(60) is None, "not beyond the agent's limit yet"
    other = described(spawn(local_sleep(tmp_path)), uid=4343)
    async with asyncio.timeout(BOUND):  # even now every caller is answered within the deadline...
        selectors = (await attest_workload(other, [attestor])).selectors
    # ...its executable, on a local disk, inspected without a thread; but not hashed: opening it for the
    # hash takes one of the hung threads.
    assert unix_values(selectors, "uid") == ["4343"] and unix_values(selectors, "path") != []
    assert unix_values(selectors, "sha256") == []

    served.release()  # the server answers (EIO): the threads come back
    async with asyncio.timeout(BOUND):
        await asyncio.gather(*hanging)
    await eventually(lambda: not reader.pool.busy(), "every thread is free again")
    assert attestor.stalled(0.2) is None


# -- a FIFO standing in for the executable: opening it blocks --------------------------------------------------------


@pytest.fixture
def fifo_proc(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """A /proc of the test's own where listed pids' exe is a FIFO; other entries lead to the real /proc."""
    root = tmp_path / "proc"
    root.mkdir()
    (root / "self").symlink_to("/proc/self")
    fifo = tmp_path / "stalled-exe"
    os.mkfifo(fifo)
    try:
        yield root, fifo
    finally:
        # Every open blocked on the FIFO returns once a writer comes (and the writer leaves at once).
        for _ in range(2 * READ_THREADS):
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                break  # ENXIO: no reader left


def expose(root: Path, pid: int, exe: Path | None = None) -> None:
    (root / str(pid)).mkdir()
    (root / str(pid) / "exe").symlink_to(exe or f"/proc/{pid}/exe")
    (root / str(pid) / "mountinfo").symlink_to(f"/proc/{pid}/mountinfo")


async def test_callers_whose_executable_blocks_on_open_do_not_hold_up_another_uid(
    fifo_proc: tuple[Path, Path], spawn: Spawn, tmp_path: Path
) -> None:
    # Guards: the per-uid share, the reader's own threads and its bounded wait, as above, for a
    # blocking stand-in that needs no mount: here the open for hashing is what blocks.
    root, fifo = fifo_proc
    reader = ExecutableReader(proc_root=root)
    attestor = attestor_reading_with(reader)
    stalled = [described(spawn(SLEEP), uid=4242) for _ in range(STALLED)]
    for process in stalled:
        expose(root, process.pid, fifo)
    other_binary = local_sleep(tmp_path)
    other = described(spawn(other_binary), uid=4343)
    expose(root, other.pid)

    started = time.monotonic()
    hanging = [asyncio.create_task(attestor.attest(process)) for process in stalled]
    pool = reader.pool
    await eventually(lambda: len(pool.busy()) == READ_UID_THREADS, "uid 4242's opens block")
    async with asyncio.timeout(BOUND):
        other_selectors = (await attest_workload(other, [attestor])).selectors
    other_took = time.monotonic() - started
    async with asyncio.timeout(BOUND):
        results = await asyncio.gather(*hanging)

    assert unix_values(other_selectors, "sha256") == [sha256_of(other_binary)]
    assert other_took < READ_WAIT_LIMIT, f"the other uid waited {other_took:.2f} s"
    assert all(unix_values(selectors, "sha256") == [] for selectors in results)
    # Inspecting a FIFO does not block, opening it does: the callers whose opens hang have their path;
    # those whose inspection waited behind them in their uid's line have none.
    with_path = [unix_values(selectors, "path") for selectors in results if unix_values(selectors, "path")]
    assert len(with_path) >= READ_UID_THREADS and all(path == [str(fifo)] for path in with_path)
    assert [call.uid for call in pool.busy()] == [4242] * READ_UID_THREADS, "only uid 4242's share is held"
