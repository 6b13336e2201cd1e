"""Secret files on disk: written whole or not at all, read without following links.

Keys (the CA's, the authority's reply key, the TPM key blobs and authValues) all go through here,
so they share one set of rules: a file is written to a fresh temporary (O_EXCL, O_NOFOLLOW, the
exact mode), fsynced, renamed into place and made durable by fsyncing its folder; a private file is
read through O_NOFOLLOW and refused when group or others may access it. Callers turn the OSErrors
into their own errors, naming the file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path

__all__ = ["InsecureFileError", "fsync_directory", "read_private", "write_atomically", "write_together"]

PRIVATE_MODE = 0o600


class InsecureFileError(OSError):
    """A private file is accessible to group or others."""


def read_private(path: Path) -> bytes:
    """The content of a file only its owner may access; never through a symlink."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    with os.fdopen(fd, "rb") as stream:
        mode = stat.S_IMODE(os.fstat(stream.fileno()).st_mode)
        if mode & 0o077:
            raise InsecureFileError(f"accessible to group or others (mode {mode:04o}), want 0600")
        return stream.read()


def write_atomically(path: Path, data: bytes, mode: int = PRIVATE_MODE) -> None:
    write_together([(path, data, mode)])


def write_together(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Write every file to a fsynced temporary, then rename them all in a row.

    Renaming only after every content is durable keeps the window in which related files (a key
    and its certificate) disagree on disk down to consecutive renames. All files share a folder.
    """
    temporaries: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
            temporaries.append((temporary, path))
            with os.fdopen(fd, "wb") as stream:
                os.fchmod(stream.fileno(), mode)  # the umask may have narrowed it; make it exact
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
        for temporary, path in temporaries:
            os.replace(temporary, path)
        temporaries.clear()
        if files:
            fsync_directory(files[0][0].parent)
    finally:
        for temporary, _ in temporaries:
            with contextlib.suppress(OSError):
                temporary.unlink()


def fsync_directory(directory: Path) -> None:
    """Make renames and removals in `directory` durable."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
