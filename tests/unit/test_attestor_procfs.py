"""/proc parsing: stat lines whose command name is hostile, status Groups, mount tables, and real processes."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator

import psutil
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vouchd.attestors import ProcessExitedError, ProcessInfoError
from vouchd.attestors.workload.procfs import (
    Mount,
    ProcessCredentials,
    find_mount,
    parse_fdinfo_mount_id,
    parse_mountinfo_line,
    parse_stat,
    parse_status_credentials,
    parse_status_groups,
    read_fd_mount_id,
    read_mount,
    read_process_credentials,
    read_process_stat,
    read_supplementary_groups,
)

# A real stat line of `sleep`, with comm replaced below.
_STAT_TAIL = (
    "S 1 4242 4242 0 -1 4194560 103 0 0 0 0 0 0 0 20 0 1 0 987654 5746688 224 "
    "18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 3 0 0 0 0 0"
)

HOSTILE_COMM = "a) (b c"


def _stat_line(pid: int, comm: str) -> str:
    return f"{pid} ({comm}) {_STAT_TAIL}\n"


def test_parse_stat_takes_comm_up_to_the_last_parenthesis() -> None:
    stat = parse_stat(_stat_line(77, "x) S 1 2 3 (y"))

    assert stat.pid == 77
    assert stat.comm == "x) S 1 2 3 (y"
    assert stat.state == "S"
    assert stat.ppid == 1
    assert stat.start_time == 987654


@given(comm=st.text(alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\x00\n"), max_size=15))
def test_parse_stat_round_trips_any_comm(comm: str) -> None:
    stat = parse_stat(_stat_line(12345, comm))

    assert (stat.pid, stat.comm, stat.start_time) == (12345, comm, 987654)


@pytest.mark.parametrize(
    "line",
    ["", "1234", "1234 (sleep", "1234 (sleep) S 1 2", "x (sleep) " + _STAT_TAIL, "1 (a) S 1 " + "z " * 30],
)
def test_parse_stat_rejects_malformed_lines(line: str) -> None:
    with pytest.raises(ProcessInfoError, match="malformed /proc stat line"):
        parse_stat(line)


def test_parse_status_groups() -> None:
    status = "Name:\tbash\nUid:\t1000\t1000\t1000\t1000\nGroups:\t4 24 27 1000 \nNgid:\t0\n"

    assert parse_status_groups(status) == (4, 24, 27, 1000)
    assert parse_status_groups("Name:\tx\nGroups:\t\n") == ()
    with pytest.raises(ProcessInfoError, match="no Groups line"):
        parse_status_groups("Name:\tx\n")


@pytest.fixture
def hostile_named_process() -> Iterator[subprocess.Popen[str]]:
    """A live process that renamed itself to a comm full of parentheses and spaces."""
    script = (
        f"open('/proc/self/comm', 'w').write({HOSTILE_COMM!r});print('ready', flush=True); import sys; sys.stdin.read()"
    )
    with subprocess.Popen(
        [sys.executable, "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as process:
        try:
            assert process.stdout is not None
            assert process.stdout.readline() == "ready\n"
            yield process
        finally:
            process.kill()


def test_the_start_time_of_a_process_named_with_parentheses(hostile_named_process: subprocess.Popen[str]) -> None:
    pid = hostile_named_process.pid
    stat = read_process_stat(pid)
    start_time = stat.start_time

    assert stat.comm == HOSTILE_COMM
    # psutil derives create_time from the same field: boot time + ticks / CLK_TCK.
    ticks_per_second = os.sysconf("SC_CLK_TCK")
    assert psutil.boot_time() + start_time / ticks_per_second == pytest.approx(
        psutil.Process(pid).create_time(), abs=0.05
    )
    assert start_time >= read_process_stat(os.getpid()).start_time


def test_read_supplementary_groups_matches_the_kernel() -> None:
    assert sorted(read_supplementary_groups(os.getpid())) == sorted(os.getgroups())


def test_reading_an_exited_process_says_so() -> None:
    process = subprocess.Popen(["true"])
    process.wait()

    with pytest.raises(ProcessExitedError, match=f"process {process.pid} has exited"):
        read_process_stat(process.pid)
    with pytest.raises(ProcessExitedError):
        read_supplementary_groups(process.pid)


def test_invalid_pid_is_refused() -> None:
    with pytest.raises(ProcessInfoError, match="invalid pid 0"):
        read_process_stat(0)


def test_parse_status_credentials_takes_real_and_effective_ids() -> None:
    text = "Name:\tping\nUid:\t1000\t0\t0\t0\nGid:\t100\t27\t27\t27\nGroups:\t100\n"

    assert parse_status_credentials(text) == ProcessCredentials(
        real_uid=1000, effective_uid=0, real_gid=100, effective_gid=27
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("Gid:\t1\t1\t1\t1\n", "no Uid line in /proc status"),
        ("Uid:\t1\t1\t1\t1\n", "no Gid line in /proc status"),
        ("Uid:\t1\nGid:\t1\t1\t1\t1\n", "malformed Uid line in /proc status"),
        ("Uid:\t1\t1\t1\t1\nGid:\tx\t1\t1\t1\n", "malformed Gid line in /proc status"),
    ],
)
def test_parse_status_credentials_rejects_malformed_status(text: str, message: str) -> None:
    with pytest.raises(ProcessInfoError, match=f"^{message}$"):
        parse_status_credentials(text)


def test_read_process_credentials_of_this_process() -> None:
    assert read_process_credentials(os.getpid()) == ProcessCredentials(
        real_uid=os.getuid(), effective_uid=os.geteuid(), real_gid=os.getgid(), effective_gid=os.getegid()
    )


# -- mount tables ------------------------------------------------------------------------------------------------

# Lines as the kernel writes them: optional fields vary in number, paths escape spaces as \040.
MOUNTINFO = (
    "27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
    "45 27 0:40 / /home/eve/my\\040files rw,nosuid,nodev,relatime shared:7 master:3 - fuse.sshfs eve@host:/srv "
    "rw,user_id=1000,group_id=1000\n"
    "46 27 0:41 / /mnt/nfs rw,relatime - nfs4 server:/export rw,vers=4.2\n"
)


def test_parse_mountinfo_line_with_and_without_optional_fields() -> None:
    assert parse_mountinfo_line("27 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw") == Mount(
        mount_id=27, device=(254, 0), mount_point="/", fs_type="ext4", source="/dev/vda"
    )
    assert parse_mountinfo_line("46 27 0:41 / /mnt/nfs rw,relatime - nfs4 server:/export rw") == Mount(
        mount_id=46, device=(0, 41), mount_point="/mnt/nfs", fs_type="nfs4", source="server:/export"
    )


def test_find_mount_by_id_unescapes_the_mount_point() -> None:
    mount = find_mount(MOUNTINFO, 45)

    assert mount is not None
    assert (mount.fs_type, mount.mount_point, mount.source) == ("fuse.sshfs", "/home/eve/my files", "eve@host:/srv")
    assert find_mount(MOUNTINFO, 4) is None, "an id is matched whole, not as the start of 45 or 46"
    assert find_mount(MOUNTINFO, 99) is None


@pytest.mark.parametrize("line", ["", "27 1 254:0 / / rw shared:1 ext4 /dev/vda rw", "x 1 254:0 / / rw - ext4 a b",
                                  "27 1 2540 / / rw - ext4 a b"])
def test_parse_mountinfo_line_rejects_malformed_lines(line: str) -> None:
    with pytest.raises(ProcessInfoError, match=r"^malformed /proc mountinfo line$"):
        parse_mountinfo_line(line)


def test_parse_fdinfo_mount_id() -> None:
    assert parse_fdinfo_mount_id("pos:\t0\nflags:\t012000000\nmnt_id:\t45\nino:\t2\n") == 45
    with pytest.raises(ProcessInfoError, match=r"^no mnt_id line in /proc fdinfo$"):
        parse_fdinfo_mount_id("pos:\t0\n")
    with pytest.raises(ProcessInfoError, match=r"^malformed mnt_id line in /proc fdinfo$"):
        parse_fdinfo_mount_id("mnt_id:\tx\n")


def test_the_mount_of_an_open_file_is_the_one_its_path_is_on() -> None:
    fd = os.open("/proc/self/exe", os.O_PATH)
    try:
        mount_id = read_fd_mount_id(fd)
    finally:
        os.close(fd)

    mount = read_mount(os.getpid(), mount_id)
    assert mount is not None
    assert read_mount(None, mount_id) == mount, "the same namespace read as the agent's own"
    device = os.stat("/proc/self/exe").st_dev
    if mount.fs_type != "btrfs":  # whose files have per-subvolume st_dev
        assert mount.device == (os.major(device), os.minor(device))
