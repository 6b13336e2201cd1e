"""Which executables the unix attestor opens: none on FUSE or network file systems, by the type of their mount.

Fake mount tables for the types this machine cannot mount; a real FUSE mount (served by tests/fusefs.py,
whose server can stop answering) and a real tmpfs where the machine allows mounting.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fusefs import FuseFile, fuse_available, mount_fs, mounted, unmount
from tests.processes import described, unix_values
from tests.unit.conftest import Spawn
from vouchd.attestors.workload.executable import (
    ExecutableReader,
    RefusedFileSystemError,
    check_file_system,
    file_system_kind,
    inspect_executable,
)
from vouchd.attestors.workload.mounts import MountTables
from vouchd.attestors.workload.throttle import UidWarnings
from vouchd.attestors.workload.unix import UnixAttestor

SLEEP = Path(shutil.which("sleep") or "/bin/sleep").resolve()
BOUND = 5.0  # every wait of these tests is bounded by this; none should come near it




def in_thread(call: Callable[[], object]) -> object:
    """Run a blocking call with a bound: a call that hangs fails the test instead of hanging it."""
    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as err:
            outcome.append(err)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(BOUND)
    assert not thread.is_alive(), "the call hung"
    return outcome[0]


# -- the types -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fs_type", "kind"),
    [("fuse", "FUSE"), ("fuseblk", "FUSE"), ("fuse.sshfs", "FUSE"), ("fuse.rclone", "FUSE"), ("virtiofs", "FUSE"),
     ("nfs", "network"), ("nfs4", "network"), ("cifs", "network"), ("smb3", "network"), ("9p", "network"),
     ("ceph", "network"), ("glusterfs", "network"), ("ext4", None), ("xfs", None), ("btrfs", None),
     ("tmpfs", None), ("overlay", None), ("squashfs", None), ("fusectl", None)],
)
def test_which_file_system_types_are_refused(fs_type: str, kind: str | None) -> None:
    assert file_system_kind(fs_type) == kind


# -- the check, against fake mount tables ------------------------------------------------------------------------------

CALLER_PID = 4242
FD = 7
MOUNTINFO = (
    "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "45 27 0:40 / /home/eve/my\\040files rw,nosuid,nodev,relatime shared:7 - fuse.sshfs eve@host:/srv rw\n"
    "46 27 0:41 / /mnt/nfs rw,relatime - nfs4 server:/export rw,vers=4.2\n"
    "47 27 0:42 / /opt/tools rw,relatime - fuseblk /dev/sdb1 rw\n"
)


def fake_proc(root: Path, *, mount_id: int, caller: str = MOUNTINFO, agent: str = "") -> MountTables:
    """A /proc where the agent's descriptor FD is on mount `mount_id` and the caller has the table `caller`."""
    (root / "self" / "fdinfo").mkdir(parents=True)
    (root / "self" / "fdinfo" / str(FD)).write_text(f"pos:\t0\nflags:\t012000000\nmnt_id:\t{mount_id}\nino:\t2\n")
    (root / "self" / "mountinfo").write_text(agent)
    (root / str(CALLER_PID)).mkdir()
    (root / str(CALLER_PID) / "mountinfo").write_text(caller)
    return MountTables(proc_root=root, keep_host_table=False)


@pytest.mark.parametrize(
    ("mount_id", "reason"),
    [
        (45, "it lives on a FUSE file system (fuse.sshfs at /home/eve/my files), whose server decides when a read "
             "returns"),
        (46, "it lives on a network file system (nfs4 at /mnt/nfs), whose server decides when a read returns"),
        (47, "it lives on a FUSE file system (fuseblk at /opt/tools), whose server decides when a read returns"),
        (99, "its file system (mount 99) is in neither its mount table nor the agent's"),
    ],
)
def test_files_on_refused_or_unknown_mounts_are_refused(tmp_path: Path, mount_id: int, reason: str) -> None:
    with pytest.raises(RefusedFileSystemError) as refused:
        check_file_system(FD, CALLER_PID, fake_proc(tmp_path, mount_id=mount_id))

    assert str(refused.value) == reason


def test_a_file_on_a_local_mount_passes(tmp_path: Path) -> None:
    mount = check_file_system(FD, CALLER_PID, fake_proc(tmp_path, mount_id=27))

    assert (mount.mount_id, mount.fs_type, mount.mount_point) == (27, "ext4", "/")


def test_a_mount_missing_from_the_callers_table_is_looked_up_in_the_agents(tmp_path: Path) -> None:
    agent_table = "80 1 0:50 / /var/lib/agent-only rw - nfs server:/x rw\n"
    tables = fake_proc(tmp_path, mount_id=80, agent=agent_table)

    with pytest.raises(RefusedFileSystemError, match=r"network file system \(nfs at /var/lib/agent-only\)"):
        check_file_system(FD, CALLER_PID, tables)


# -- a real FUSE mount ----------------------------------------------------------------------------------------------


@pytest.fixture(params=["fuse", "fuse.vouchdtest"])
def fuse_mount(request: pytest.FixtureRequest, tmp_path: Path, spawn: Spawn) -> Iterator[tuple[Path, FuseFile]]:
    """`sleep`, served from a FUSE mount of this test's own; unmounted at the end.

    It asks for `spawn` so that it ends first: a process waiting for an answer of the file system
    cannot even be killed until the server answers or the mount goes.
    """
    if (why := fuse_available()) is not None:
        pytest.skip(f"no FUSE mount on this machine: {why}")
    target = tmp_path / "fuse"
    target.mkdir()
    served = FuseFile("sleep", SLEEP.read_bytes())
    try:
        with mounted(target, served, fs_type=request.param):
            yield target, served
    except PermissionError as err:
        pytest.skip(f"cannot mount FUSE here: {err}")


async def test_an_executable_on_fuse_is_neither_opened_nor_hashed(
    fuse_mount: tuple[Path, FuseFile], spawn: Spawn, caplog: pytest.LogCaptureFixture
) -> None:
    target, served = fuse_mount
    process = described(spawn(target / "sleep"))
    served.stall()  # from now on the server answers nothing about the file: any read of it would hang
    asked = served.requests

    with caplog.at_level(logging.WARNING, logger="vouchd.attestors.unix"):
        async with asyncio.timeout(BOUND):  # a bound to fail on, not a wait
            selectors = await UnixAttestor().attest(process)

    assert unix_values(selectors, "path") == [] and unix_values(selectors, "sha256") == []
    assert unix_values(selectors, "uid") == [str(os.getuid())], "the kernel-anchored selectors are all there"
    assert served.requests == asked, "the agent asked the FUSE server for nothing"
    assert served.held == 0
    (warning,) = [r for r in caplog.records if r.getMessage().startswith("not reading the executable")]
    fs_type = warning.__dict__["file_system"]
    assert fs_type.startswith("fuse")
    assert warning.getMessage() == (
        f"not reading the executable of pid {process.pid} uid {process.uid}: it lives on a FUSE file system "
        f"({fs_type} at {target}), whose server decides when a read returns; omitting path and sha256"
    )
    assert (warning.__dict__["uid"], warning.__dict__["mount_point"]) == (process.uid, str(target))


def test_inspect_refuses_a_fuse_executable_without_asking_its_server(
    fuse_mount: tuple[Path, FuseFile], spawn: Spawn
) -> None:
    target, served = fuse_mount
    child = spawn(target / "sleep")
    served.stall()
    asked = served.requests

    refused = in_thread(lambda: inspect_executable(child.pid))

    assert isinstance(refused, RefusedFileSystemError), refused
    assert refused.mount is not None and refused.mount.mount_point == str(target)
    assert served.requests == asked


async def test_many_callers_on_fuse_make_one_line_per_uid(
    fuse_mount: tuple[Path, FuseFile], spawn: Spawn, caplog: pytest.LogCaptureFixture
) -> None:
    target, _ = fuse_mount
    attestor = UnixAttestor()
    children = [spawn(target / "sleep") for _ in range(6)]

    with caplog.at_level(logging.WARNING, logger="vouchd.attestors.unix"):
        async with asyncio.timeout(BOUND):
            for child in children:
                await attestor.attest(described(child, uid=4242))
            await attestor.attest(described(children[0], uid=4343))

    lines = [r for r in caplog.records if r.getMessage().startswith("not reading the executable")]
    assert [r.__dict__["uid"] for r in lines] == [4242, 4343], "six requests of uid 4242, one line"


# -- a real tmpfs: refused by type, not by being a mount ---------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    target = tmp_path / "tmpfs"
    target.mkdir()
    try:
        mount_fs("vouchd-test", target, "tmpfs", "size=16m")
    except PermissionError as err:
        pytest.skip(f"cannot mount tmpfs here: {err}")
    try:
        yield target
    finally:
        unmount(target)


async def test_an_executable_on_tmpfs_is_read(tmpfs: Path, spawn: Spawn) -> None:
    binary = tmpfs / "sleep"
    shutil.copy2(SLEEP, binary)

    async with asyncio.timeout(BOUND):
        selectors = await UnixAttestor().attest(described(spawn(binary)))

    assert unix_values(selectors, "path") == [str(binary)]
    assert unix_values(selectors, "sha256") == [hashlib.sha256(binary.read_bytes()).hexdigest()]


def test_a_kept_mount_table_sees_a_mount_id_used_again(tmp_path: Path, spawn: Spawn) -> None:
    # Mount ids are reused after an unmount: a table kept from before would call the FUSE mount tmpfs.
    if (why := fuse_available()) is not None:
        pytest.skip(f"no FUSE mount on this machine: {why}")
    tables = MountTables()  # keeps its table between lookups
    target = tmp_path / "reused"
    target.mkdir()
    mount_fs("vouchd-test", target, "tmpfs", "size=16m")
    try:
        shutil.copy2(SLEEP, target / "sleep")
        child = spawn(target / "sleep")
        fd = os.open(f"/proc/{child.pid}/exe", os.O_PATH)
        try:
            first_id, first = tables.mount_of(fd, child.pid)
        finally:
            os.close(fd)
        child.kill()
        child.wait()
    finally:
        unmount(target)
    assert first is not None and first.fs_type == "tmpfs"

    with mounted(target, FuseFile("sleep", SLEEP.read_bytes())):
        child = spawn(target / "sleep")
        fd = os.open(f"/proc/{child.pid}/exe", os.O_PATH)
        try:
            second_id, second = tables.mount_of(fd, child.pid)
        finally:
            os.close(fd)
        child.kill()
        child.wait()

    if second_id != first_id:
        pytest.skip("the kernel gave the FUSE mount a new id: nothing to tell apart")
    assert second is not None and second.fs_type == "fuse"


# -- the reader's bounds ----------------------------------------------------------------------------------------------


def test_a_wait_limit_must_be_positive() -> None:
    with pytest.raises(ValueError, match=r"^wait_limit must be positive, got 0$"):
        ExecutableReader(wait_limit=0)


# -- warnings a caller can cause: one per uid and topic a minute --------------------------------------------------


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now


def test_warnings_are_one_per_uid_and_topic_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    warnings = UidWarnings(logging.getLogger("vouchd.test.throttle"), interval=60, clock=clock.time)

    with caplog.at_level(logging.WARNING, logger="vouchd.test.throttle"):
        assert warnings.warn(1000, "fs", "caller %d", 1, extra={"pid": 1})
        assert not warnings.warn(1000, "fs", "caller %d", 2, extra={"pid": 2})
        assert not warnings.warn(1000, "fs", "caller %d", 3, extra={"pid": 3})
        assert warnings.warn(1000, "hash", "other topic %d", 4, extra={})
        assert warnings.warn(2000, "fs", "other uid %d", 5, extra={})
        clock.now += 59
        assert not warnings.warn(1000, "fs", "caller %d", 6, extra={"pid": 6})
        clock.now += 1
        assert warnings.warn(1000, "fs", "caller %d", 7, extra={"pid": 7})

    assert [r.getMessage() for r in caplog.records] == [
        "caller 1", "other topic 4", "other uid 5",
        "caller 7 (3 more like it for this uid since the last such line)",
    ]
    assert [(r.__dict__["uid"], r.__dict__["suppressed"]) for r in caplog.records] == [
        (1000, 0), (1000, 0), (2000, 0), (1000, 3)
    ]
