"""Secret files: written whole with an exact mode, read only when private and not through links."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from vouchd.securefiles import InsecureFileError, read_private, write_atomically, write_together


def test_a_written_file_has_the_exact_mode_whatever_the_umask(tmp_path: Path) -> None:
    path = tmp_path / "key"
    old = os.umask(0o077)
    try:
        write_atomically(path, b"secret", mode=0o644)
    finally:
        os.umask(old)
    assert path.read_bytes() == b"secret"
    assert path.stat().st_mode & 0o777 == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["key"]  # no temporary left behind


def test_rewriting_replaces_the_whole_file(tmp_path: Path) -> None:
    path = tmp_path / "key"
    write_atomically(path, b"a much longer first content")
    write_atomically(path, b"short")
    assert read_private(path) == b"short"


def test_files_written_together_all_land(tmp_path: Path) -> None:
    write_together([(tmp_path / "root.key", b"k", 0o600), (tmp_path / "root.crt", b"c", 0o644)])
    assert (tmp_path / "root.key").read_bytes() == b"k"
    assert (tmp_path / "root.crt").stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["root.crt", "root.key"]


def test_a_failed_write_leaves_no_temporary(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        write_together([(tmp_path / "key", b"k", 0o600), (tmp_path / "missing" / "crt", b"c", 0o644)])
    assert [p.name for p in tmp_path.iterdir()] == []


def test_a_private_file_others_may_read_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "key"
    write_atomically(path, b"secret", mode=0o640)
    with pytest.raises(InsecureFileError, match=r"^accessible to group or others \(mode 0640\), want 0600$"):
        read_private(path)


def test_a_private_file_is_never_read_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    write_atomically(target, b"secret")
    link = tmp_path / "key"
    link.symlink_to(target)
    with pytest.raises(OSError) as raised:
        read_private(link)
    assert raised.value.errno == errno.ELOOP
