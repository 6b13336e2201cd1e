"""A FUSE file system in pure Python for tests: one read-only file, whose server can stop answering.

It speaks the kernel's FUSE protocol on /dev/fuse itself (no libfuse, no fusermount): the test
process mounts it with mount(2) as root, and a thread answers the kernel. What a caller-controlled
FUSE mount can do to a reader is what this one does on request: after `stall()` every request about
the file (open, stat, read) made by a thread of the agent under test (the test process itself, or
the agent process named) is held unanswered, so that thread waits in the kernel until `release()`
(or the unmount) ends the wait. A hostile server can tell who asks just as well (the kernel sends
the pid): the processes running the file are still served, so they can always be killed (a process
waiting for a FUSE answer cannot).

`fuse_available()` says whether this machine allows it (root, /dev/fuse, the fuse file system);
tests skip otherwise.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import select
import stat
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

__all__ = ["FuseFile", "fuse_available", "mount", "mount_fs", "mounted", "unmount", "wait_until_asleep"]

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
_libc.umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
_MNT_DETACH = 2

# include/uapi/linux/fuse.h
_LOOKUP, _FORGET, _GETATTR, _OPEN, _READ, _STATFS, _RELEASE = 1, 2, 3, 14, 15, 17, 18
_INIT, _OPENDIR, _RELEASEDIR, _INTERRUPT, _DESTROY, _BATCH_FORGET = 26, 27, 29, 36, 38, 42
_NO_REPLY = {_FORGET, _BATCH_FORGET, _INTERRUPT}
_IN_HEADER = struct.Struct("<IIQQIIIHH")
_OUT_HEADER = struct.Struct("<IiQ")
_INIT_IN = struct.Struct("<IIII")
_INIT_OUT = struct.Struct("<IIIIHHIIHHII24x")
_ATTR = struct.Struct("<QQQQQQIIIIIIIIII")
_ENTRY_OUT_HEAD = struct.Struct("<QQQQII")
_ATTR_OUT_HEAD = struct.Struct("<QII")
_OPEN_OUT = struct.Struct("<QII")
_READ_IN = struct.Struct("<QQI")
_STATFS_OUT = struct.Struct("<QQQQQIIII24x")
_ROOT, _FILE = 1, 2
_BUFFER = 1024 * 1024 + 4096  # the kernel refuses reads into less than max_write plus a header


def fuse_available() -> str | None:
    """Why a FUSE mount cannot be made here, or None."""
    if os.geteuid() != 0:
        return "mounting needs root"
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    try:
        with open("/proc/filesystems") as filesystems:
            if not any(line.split()[-1:] == ["fuse"] for line in filesystems):
                return "the kernel has no fuse file system"
    except OSError as err:
        return f"cannot read /proc/filesystems: {err}"
    return None


def wait_until_asleep(pid: int, timeout: float = 5.0) -> None:
    """Wait until `pid` sleeps in nanosleep: it has read all it needs of its executable, so any request
    the file system gets from then on comes from someone else."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if "nanosleep" in Path(f"/proc/{pid}/wchan").read_text():
                return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} never went to sleep")


class FuseFile:
    """Serves `name` (mode 0755, content `data`) at the root of a FUSE mount."""

    def __init__(self, name: str, data: bytes) -> None:
        self.name = name
        self.data = data
        self.requests = 0  # requests about the file received (open, stat, read), answered or held
        self._stall = False
        self._stalled_process = os.getpid()
        self._release_timer: threading.Timer | None = None
        self._held: list[int] = []
        self._lock = threading.Lock()
        self._fd = -1
        self._stop_read, self._stop_write = os.pipe()
        self._thread: threading.Thread | None = None

    def stall(self, *, process: int | None = None, at_most: float = 30.0) -> None:
        """From now on, hold every request of `process` (default: this one) about the file unanswered:
        whichever of its threads asks hangs in the kernel.

        After `at_most` seconds everything is released anyway: a test that fails (or code under test that
        waits for its threads) must not hang the test run, let alone processes it cannot kill.
        """
        with self._lock:
            self._stall = True
            self._stalled_process = process if process is not None else os.getpid()
            self._release_timer = threading.Timer(at_most, self.release)
            self._release_timer.daemon = True
            self._release_timer.start()

    def release(self) -> None:
        """Answer every held request (EIO) and stop holding new ones."""
        with self._lock:
            self._stall = False
            held, self._held = self._held, []
            if self._release_timer is not None:
                self._release_timer.cancel()
        for unique in held:
            self._reply(unique, -errno.EIO)

    @property
    def held(self) -> int:
        with self._lock:
            return len(self._held)

    def start(self, fd: int) -> None:
        self._fd = fd
        self._thread = threading.Thread(target=self._serve, name="test-fuse", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        os.write(self._stop_write, b"x")
        if self._thread is not None:
            self._thread.join(timeout=10)
        os.close(self._stop_read)
        os.close(self._stop_write)

    def _serve(self) -> None:
        while True:
            ready, _, _ = select.select([self._fd, self._stop_read], [], [])
            if self._stop_read in ready:
                return
            try:
                request = os.read(self._fd, _BUFFER)
            except OSError as err:
                if err.errno in (errno.ENOENT, errno.EINTR, errno.EAGAIN):  # a request interrupted meanwhile
                    continue
                return  # ENODEV: unmounted
            self._answer(request)

    def _answer(self, request: bytes) -> None:
        _, opcode, unique, node, _, _, thread, *_ = _IN_HEADER.unpack_from(request)
        body = request[_IN_HEADER.size:]
        if opcode in _NO_REPLY:
            return
        if node == _FILE and opcode in (_GETATTR, _OPEN, _READ):
            with self._lock:
                self.requests += 1
                if self._stall and os.path.exists(f"/proc/{self._stalled_process}/task/{thread}"):
                    self._held.append(unique)
                    return
        if opcode == _INIT:
            _, minor, readahead, _ = _INIT_IN.unpack_from(body)
            self._reply(unique, 0, _INIT_OUT.pack(7, min(minor, 31), readahead, 0, 16, 12, 128 * 1024, 1,
                                                  0, 0, 0, 0))
        elif opcode == _LOOKUP:
            if node == _ROOT and body.rstrip(b"\0") == self.name.encode():
                self._reply(unique, 0, _ENTRY_OUT_HEAD.pack(_FILE, 0, 0, 0, 0, 0) + self._attr(_FILE))
            else:
                self._reply(unique, -errno.ENOENT)
        elif opcode == _GETATTR:
            self._reply(unique, 0, _ATTR_OUT_HEAD.pack(0, 0, 0) + self._attr(node))
        elif opcode in (_OPEN, _OPENDIR):
            self._reply(unique, 0, _OPEN_OUT.pack(0, 0, 0))
        elif opcode == _READ:
            _, offset, size = _READ_IN.unpack_from(body)
            self._reply(unique, 0, self.data[offset:offset + size])
        elif opcode == _STATFS:  # overlayfs asks before it stacks on a lower layer
            self._reply(unique, 0, _STATFS_OUT.pack(1024, 0, 0, 2, 0, 4096, 255, 4096, 0))
        elif opcode in (_RELEASE, _RELEASEDIR, _DESTROY):
            self._reply(unique, 0)
        else:
            self._reply(unique, -errno.ENOSYS)

    def _attr(self, node: int) -> bytes:
        if node == _ROOT:
            mode, size, links = stat.S_IFDIR | 0o755, 0, 2
        else:
            mode, size, links = stat.S_IFREG | 0o755, len(self.data), 1
        return _ATTR.pack(node, size, (size + 511) // 512, 0, 0, 0, 0, 0, 0, mode, links, 0, 0, 0, 4096, 0)

    def _reply(self, unique: int, error: int, payload: bytes = b"") -> None:
        with contextlib.suppress(OSError):  # the request was interrupted, or the file system is gone
            os.write(self._fd, _OUT_HEADER.pack(_OUT_HEADER.size + len(payload), error, unique) + payload)


def mount(target: Path, served: FuseFile, *, fs_type: str = "fuse") -> None:
    """Mount `served` at `target` (an empty folder) as `fs_type` (`fuse` or `fuse.<subtype>`)."""
    fd = os.open("/dev/fuse", os.O_RDWR | os.O_CLOEXEC)
    options = f"fd={fd},rootmode=40000,user_id=0,group_id=0,allow_other"
    if _libc.mount(b"vouchd-test", str(target).encode(), fs_type.encode(), 0, options.encode()) != 0:
        err = ctypes.get_errno()
        os.close(fd)
        raise OSError(err, f"mount {fs_type} at {target}: {os.strerror(err)}")
    served.start(fd)


def mount_fs(source: str, target: Path, fs_type: str, options: str = "") -> None:
    """mount(2) of any other file system (tmpfs, overlay) at `target`; undo with unmount(target)."""
    if _libc.mount(source.encode(), str(target).encode(), fs_type.encode(), 0, options.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fs_type} at {target}: {os.strerror(err)}")


def unmount(target: Path, served: FuseFile | None = None) -> None:
    """Detach the mount; closing the device then fails every request still held (ENOTCONN)."""
    if _libc.umount2(str(target).encode(), _MNT_DETACH) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"umount {target}: {os.strerror(err)}")
    if served is not None:
        served.stop()
        os.close(served._fd)


@contextlib.contextmanager
def mounted(target: Path, served: FuseFile, *, fs_type: str = "fuse") -> Iterator[FuseFile]:
    mount(target, served, fs_type=fs_type)
    try:
        yield served
    finally:
        served.release()
        unmount(target, served)
