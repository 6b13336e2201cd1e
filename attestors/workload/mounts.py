"""Which mount an open file lives on, from the mount tables in /proc, without reading them every time.

A mount table is read from /proc/<pid>/mountinfo, and a long one (a Kubernetes node has hundreds of
mounts) costs a millisecond or more per read. Most callers run files of the host's mount namespace,
that of pid 1: its table is read once, and kept with a descriptor of /proc/1/mountinfo open, which the
kernel marks (poll: POLLPRI) at every mount, unmount or move in that namespace; only then is it read
again. A mount that table does not list (a container's) is looked up in the caller's own table, read
at each lookup: keeping a descriptor of a container's table would keep its mounts alive after it ends.

Why a kept table is right: mount ids are unique among the mounts that exist, whatever their
namespace, and an id is only reused once its mount is freed, which cannot happen while the caller of
`mount_of` holds a descriptor of a file on it. So if a table that is current (no change marked since
it was read) lists the id, that line is the very mount, whichever namespace the caller is in.
"""

from __future__ import annotations

import os
import select
import threading
import weakref
from pathlib import Path

from vouchd.attestors.errors import ProcessInfoError
from vouchd.attestors.workload.procfs import (
    PROC_ROOT,
    Mount,
    parse_mountinfo_line,
    read_fd_mount_id,
    read_mount,
)

__all__ = ["MountTables"]


class MountTables:
    """Thread-safe: pool threads look mounts up concurrently."""

    def __init__(self, *, proc_root: Path = PROC_ROOT, keep_host_table: bool = True) -> None:
        """`keep_host_table=False`: read the caller's table at every lookup (one-off lookups).

        Without access to pid 1's table (an agent without CAP_SYS_PTRACE, a sandbox) the agent's own is kept.
        """
        self._proc_root = proc_root
        self._lock = threading.Lock()
        self._host: _KeptTable | None = None
        self._host_unavailable = not keep_host_table

    def mount_of(self, fd: int, pid: int) -> tuple[int, Mount | None]:
        """The id of the mount the file open at `fd` lives on, and that mount as the mount namespace of
        `pid` lists it, else as the agent's own namespace does; None when neither lists it."""
        mount_id = read_fd_mount_id(fd, proc_root=self._proc_root)
        mount = self._in_host_table(mount_id)
        if mount is None:
            mount = read_mount(pid, mount_id, proc_root=self._proc_root)
        if mount is None:
            mount = read_mount(None, mount_id, proc_root=self._proc_root)
        return mount_id, mount

    def kept_mount(self, mount_id: int) -> Mount | None:
        """The mount with this id in the kept host table; None when it is not there or no table is kept.

        Reads no mount table but the kept one, and that one only after the kernel marked it changed:
        what a caller on the event loop may ask (fingerprint.py).
        """
        return self._in_host_table(mount_id)

    def close(self) -> None:
        with self._lock:
            if self._host is not None:
                self._host.close()
                self._host = None

    def _in_host_table(self, mount_id: int) -> Mount | None:
        with self._lock:
            host = self._host_table()
            return host.find(mount_id) if host is not None else None

    def _host_table(self) -> _KeptTable | None:
        if self._host is None and not self._host_unavailable:
            for source in ("1", "self"):
                try:
                    self._host = _KeptTable(self._proc_root / source / "mountinfo")
                    break
                except (OSError, ProcessInfoError):
                    continue
            else:
                self._host_unavailable = True  # every lookup reads the caller's table
        return self._host


class _KeptTable:
    """The mount table of one namespace, read again only after the kernel says it changed."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._closed = weakref.finalize(self, os.close, self._fd)
        try:
            self._changes = select.poll()
            self._changes.register(self._fd, select.POLLPRI)
            self._mounts = self._read()
        except BaseException:
            self._closed()
            raise

    def find(self, mount_id: int) -> Mount | None:
        # poll() also clears the mark: a change after it shows at the next lookup.
        if any(events & (select.POLLPRI | select.POLLERR) for _, events in self._changes.poll(0)):
            self._mounts = self._read()
        return self._mounts.get(mount_id)

    def close(self) -> None:
        self._closed()

    def _read(self) -> dict[int, Mount]:
        os.lseek(self._fd, 0, os.SEEK_SET)
        chunks = []
        while chunk := os.read(self._fd, 65536):
            chunks.append(chunk)
        text = b"".join(chunks).decode("utf-8", errors="replace")
        mounts = (parse_mountinfo_line(line) for line in text.splitlines() if line)
        return {mount.mount_id: mount for mount in mounts}
