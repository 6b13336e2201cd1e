"""Unix sockets a daemon serves on: a folder no other user controls, one server per path.

Shared by the Workload API socket (any local process may connect: attestation decides) and the
admin sockets (root and the daemon's own user only). Knows nothing of what is served: no gRPC here.

- The socket's folder, and every folder above it, must be safe from other users; otherwise
  another user could put their own socket at the path (check_socket_folder says exactly what).
- A socket someone is serving on is refused (another daemon with the same path); a dead one,
  left by a crash, is removed; anything else at the path is left alone.
- A socket is born 0600 (the umask while binding) and only then given its final mode, so it is
  never open wider than meant, not even for an instant.
- socket_peer() reads SO_PEERCRED: who is on the other end, according to the kernel.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
import struct
from dataclasses import dataclass
from pathlib import Path

from vouchd.errors import VouchdError

__all__ = [
    "BoundSocket",
    "SocketPathError",
    "SocketPeer",
    "bind_unix_socket",
    "check_socket_folder",
    "check_socket_path",
    "socket_peer",
]

_log = logging.getLogger("vouchd.unixsockets")

_PRIVATE_UMASK = 0o177  # a socket file bound under it is 0600
_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }


class SocketPathError(VouchdError):
    """A Unix socket cannot be served at its path: an unsafe folder, another server there, not a socket."""


@dataclass(frozen=True, slots=True)
class SocketPeer:
    """What SO_PEERCRED recorded when the peer connected: its pid and its effective uid and gid."""

    pid: int
    uid: int
    gid: int


def socket_peer(sock: socket.socket) -> SocketPeer:
    """The credentials of the process on the other end of a connected Unix socket; OSError if unknown."""
    if sock.family != socket.AF_UNIX:
        raise OSError(errno.EAFNOSUPPORT, "not a unix socket")
    pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    return SocketPeer(pid=pid, uid=uid, gid=gid)


class BoundSocket:
    """A socket this process bound, and the file it made, which only remove_file() removes."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.socket = sock
        self.path = path
        status = os.stat(path)
        self._file: tuple[int, int] | None = (status.st_dev, status.st_ino)

    def remove_file(self) -> None:
        """Remove the socket file if it is still the one we bound (another daemon may have replaced it)."""
        if self._file is None:
            return
        ours, self._file = self._file, None
        try:
            current = os.lstat(self.path)
        except FileNotFoundError:
            return
        if (current.st_dev, current.st_ino) == ours:
            self.path.unlink(missing_ok=True)


def check_socket_path(path: Path, *, name: str) -> None:
    """What would stop bind_unix_socket(), checked without binding: the folder, and a live socket at the path.

    A daemon calls this before slow or stateful work (the TPM, the authority), so a second daemon, or
    a folder others may write to, is refused at once. `name` opens the messages ("admin socket").
    A dead socket at the path is left for bind_unix_socket() to remove.
    """
    _make_folder(path.parent, name=name)
    check_socket_folder(path.parent, name=name)
    _refuse_live_socket(path)


def bind_unix_socket(path: Path, *, name: str, mode: int = 0o600) -> BoundSocket:
    """Check the folder, take the path over from a dead socket, and bind; the socket is not yet listening.

    The socket file is born 0600 and then given `mode`. Raises SocketPathError.
    """
    check_socket_path(path, name=name)
    path.unlink(missing_ok=True)  # what check_socket_path left there is a dead socket
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        # The umask is the process's: the window is one bind(), and it only narrows what others create.
        previous = os.umask(_PRIVATE_UMASK)
        try:
            sock.bind(os.fspath(path))
        finally:
            os.umask(previous)
        if mode != 0o600:
            os.chmod(path, mode)
        return BoundSocket(sock, path)
    except OSError as err:
        sock.close()
        raise SocketPathError(f"cannot bind {name} {path}: {err.strerror or err}") from err


def check_socket_folder(folder: Path, *, name: str) -> None:
    """Refuse a socket folder in which another user could replace the socket.

    Checks the folder and every folder above it, both as written and with symlinks resolved: whoever
    may rename an ancestor may swap the whole subtree. A sticky folder (like /tmp) is safe above the
    socket: others can add entries but not rename or remove ours. The socket's own folder must be
    writable by no one else, sticky or not (someone could bind the name while the daemon is down),
    and must belong to root or the daemon's user; an ancestor owned by another user (a checkout in
    someone's home, run with sudo) only earns a warning, since that user chose to put the daemon there.
    """
    euid = os.geteuid()
    written = Path(os.path.abspath(folder))
    resolved = folder.resolve()
    for directory in dict.fromkeys((written, *written.parents, resolved, *resolved.parents)):
        try:
            status = os.stat(directory)
        except OSError as err:
            raise SocketPathError(f"cannot inspect {name} folder {directory}: {err.strerror or err}") from err
        own_folder = directory in (written, resolved)
        named = f"{folder}" if own_folder else f"{directory} (above {folder})"
        if not stat.S_ISDIR(status.st_mode):
            raise SocketPathError(f"{name} folder {named} is not a folder")
        if status.st_uid not in (0, euid):
            message = (f"{name} folder {named} is owned by uid {status.st_uid}, not by root or the "
                       f"daemon's user (uid {euid}): its owner could replace the socket")
            if own_folder:
                raise SocketPathError(message)
            _log.warning(message)
        # Sticky protects our entries in a shared folder like /tmp, but not the socket's name while
        # the daemon is down: the socket's own folder must be writable by no one else at all.
        if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and (own_folder or not status.st_mode & stat.S_ISVTX):
            qualifier = "" if own_folder else " without the sticky bit"
            raise SocketPathError(
                f"{name} folder {named} is writable by group or others{qualifier}: "
                "another user could replace the socket"
            )


def _make_folder(folder: Path, *, name: str) -> None:
    """Create the socket's folder and any missing parent as 0755 (mkdir's mode is filtered by the umask)."""
    missing = [directory for directory in (folder, *folder.parents) if not directory.is_dir()]
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o755)
            os.chmod(directory, 0o755)  # noqa: S103 (searchable by all: the socket's own mode decides who connects)
        except FileExistsError:
            continue  # made meanwhile, or not a folder: check_socket_folder and bind() will say
        except OSError as err:
            raise SocketPathError(f"cannot create {name} folder {directory}: {err.strerror or err}") from err


def _refuse_live_socket(path: Path) -> None:
    """SocketPathError if something serves at `path` or it is not a socket; a dead socket passes."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise SocketPathError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        in_use = probe.connect_ex(os.fspath(path)) in {0, errno.EAGAIN}  # EAGAIN: listening, backlog full
    finally:
        probe.close()
    if in_use:
        raise SocketPathError(f"another process is serving on {path}")
