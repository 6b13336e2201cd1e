"""The checks every served Unix socket gets: its folder, the path, its mode, and who is on the other end."""

from __future__ import annotations

import logging
import os
import socket
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from vouchd.unixsockets import SocketPathError, bind_unix_socket, check_socket_path, socket_peer

NAME = "test socket"


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="unixsock-", dir="/tmp") as directory:
        yield Path(directory)


# -- the folder ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o770, 0o1777, 0o1770])
def test_a_socket_folder_others_may_write_to_is_refused(socket_dir: Path, mode: int) -> None:
    # Even sticky: another user could bind the socket's name while the daemon is down.
    folder = socket_dir / "run"
    folder.mkdir()
    folder.chmod(mode)

    with pytest.raises(
        SocketPathError,
        match=f"^test socket folder {folder} is writable by group or others: another user could replace the socket$",
    ):
        bind_unix_socket(folder / "s.sock", name=NAME)

    assert list(folder.iterdir()) == []


def test_a_sticky_world_writable_folder_above_the_socket_is_accepted(socket_dir: Path) -> None:
    shared = socket_dir / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: others may add entries, but not rename or remove ours
    folder = shared / "run"
    folder.mkdir(mode=0o755)

    bound = bind_unix_socket(folder / "s.sock", name=NAME)
    try:
        assert stat.S_ISSOCK(os.lstat(folder / "s.sock").st_mode)
    finally:
        bound.socket.close()
        bound.remove_file()


def test_a_folder_above_the_socket_that_others_may_write_to_is_refused(socket_dir: Path) -> None:
    # Whoever may rename `shared/run` can put a folder of their own in its place.
    shared = socket_dir / "shared"
    (shared / "run").mkdir(parents=True)
    shared.chmod(0o777)

    with pytest.raises(SocketPathError, match=f"^test socket folder {shared} \\(above {shared / 'run'}\\) is writable "
                                              "by group or others without the sticky bit"):
        check_socket_path(shared / "run" / "s.sock", name=NAME)


def test_a_symlinked_folder_is_checked_where_it_leads(socket_dir: Path) -> None:
    shared = socket_dir / "shared"
    (shared / "run").mkdir(parents=True)
    shared.chmod(0o777)
    (socket_dir / "link").symlink_to(shared / "run")

    with pytest.raises(SocketPathError, match=f"\\(above {socket_dir / 'link'}\\) is writable"):
        check_socket_path(socket_dir / "link" / "s.sock", name=NAME)


def test_a_socket_folder_owned_by_another_user_is_refused(socket_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give a folder to another user")
    folder = socket_dir / "run"
    folder.mkdir(mode=0o755)
    os.chown(folder, 4242, 4242)

    with pytest.raises(
        SocketPathError,
        match=f"^test socket folder {folder} is owned by uid 4242, not by root or the daemon's user \\(uid 0\\): "
        "its owner could replace the socket$",
    ):
        check_socket_path(folder / "s.sock", name=NAME)


def test_an_ancestor_owned_by_another_user_is_only_warned_about(
    socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A checkout in a user's home, started with sudo: the user chose to put the daemon there.
    if os.geteuid() != 0:
        pytest.skip("only root can give a folder to another user")
    home = socket_dir / "home"
    (home / "run").mkdir(parents=True, mode=0o755)
    home.chmod(0o755)
    os.chown(home, 4242, 4242)

    with caplog.at_level(logging.WARNING, logger="vouchd.unixsockets"):
        check_socket_path(home / "run" / "s.sock", name=NAME)

    assert f"test socket folder {home} (above {home / 'run'}) is owned by uid 4242" in caplog.text


def test_a_folder_that_is_a_file_is_refused(socket_dir: Path) -> None:
    (socket_dir / "run").write_text("not a folder")

    with pytest.raises(SocketPathError):
        check_socket_path(socket_dir / "run" / "s.sock", name=NAME)


def test_missing_folders_are_made_0755_whatever_the_umask(socket_dir: Path) -> None:
    previous = os.umask(0o002)  # would leave mkdir's folders group-writable, which the check then refuses
    try:
        check_socket_path(socket_dir / "a" / "b" / "s.sock", name=NAME)
    finally:
        os.umask(previous)

    assert stat.S_IMODE(os.stat(socket_dir / "a").st_mode) == 0o755
    assert stat.S_IMODE(os.stat(socket_dir / "a" / "b").st_mode) == 0o755


# -- the path -----------------------------------------------------------------------------------------------


def test_a_live_socket_is_refused_and_a_dead_one_is_replaced(socket_dir: Path) -> None:
    path = socket_dir / "s.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen()
        with pytest.raises(SocketPathError, match=f"^another process is serving on {path}$"):
            bind_unix_socket(path, name=NAME)
        dead_inode = os.lstat(path).st_ino
    # closed, not unlinked: the file of a crashed daemon

    check_socket_path(path, name=NAME)  # a dead socket does not stop the pre-flight check
    assert os.lstat(path).st_ino == dead_inode, "and the check leaves it for bind to remove"
    bound = bind_unix_socket(path, name=NAME)
    try:
        bound.socket.listen()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(path))  # the dead socket would refuse: this is the new one
    finally:
        bound.socket.close()
        bound.remove_file()


def test_a_file_that_is_not_a_socket_is_left_alone(socket_dir: Path) -> None:
    path = socket_dir / "s.sock"
    path.write_text("precious")

    with pytest.raises(SocketPathError, match=f"^{path} exists and is not a socket$"):
        bind_unix_socket(path, name=NAME)

    assert path.read_text() == "precious"


# -- the socket file ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("mode", "expected"), [(0o600, 0o600), (0o777, 0o777), (0o660, 0o660)])
def test_the_socket_gets_its_mode_whatever_the_umask(socket_dir: Path, mode: int, expected: int) -> None:
    previous = os.umask(0o000)
    try:
        bound = bind_unix_socket(socket_dir / "s.sock", name=NAME, mode=mode)
        umask_after = os.umask(0o000)
    finally:
        os.umask(previous)
    try:
        assert stat.S_IMODE(os.stat(socket_dir / "s.sock").st_mode) == expected
        assert umask_after == 0o000, "the umask is restored"
    finally:
        bound.socket.close()
        bound.remove_file()


def test_remove_file_removes_only_the_socket_we_bound(socket_dir: Path) -> None:
    path = socket_dir / "s.sock"
    bound = bind_unix_socket(path, name=NAME)
    bound.socket.close()
    path.rename(socket_dir / "ours.sock")  # kept, so the successor cannot get its inode number
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as successor:
        successor.bind(str(path))  # another daemon took the path over meanwhile

        bound.remove_file()

        assert path.exists(), "the successor's socket stays"


def test_remove_file_is_idempotent(socket_dir: Path) -> None:
    bound = bind_unix_socket(socket_dir / "s.sock", name=NAME)
    bound.socket.close()

    bound.remove_file()
    bound.remove_file()

    assert not (socket_dir / "s.sock").exists()


# -- the peer -----------------------------------------------------------------------------------------------


def test_socket_peer_is_what_the_kernel_says() -> None:
    left, right = socket.socketpair(socket.AF_UNIX)
    with left, right:
        peer = socket_peer(left)

    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())


def test_socket_peer_of_a_tcp_socket_is_an_oserror() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp, pytest.raises(OSError, match="not a unix socket"):
        socket_peer(tcp)


@pytest.mark.parametrize("module", ["vouchd.unixsockets", "vouchd.agent.admin"])
def test_the_admin_socket_side_loads_no_grpc(module: str) -> None:
    # Admin sockets use these, and the fleet server's will: gRPC belongs to the Workload API alone.
    probe = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpclib', 'h2')))"

    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout

    assert loaded.strip() == "[]"
