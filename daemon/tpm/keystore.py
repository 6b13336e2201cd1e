"""Key blobs and authValues on disk: one 0600 file each, written atomically, in a 0700 directory.

A key is three files named after its role: `<stem>.pub` (marshaled TPM2B_PUBLIC), `<stem>.priv`
(marshaled TPM2B_PRIVATE, encrypted by the TPM) and `<stem>.auth` (the raw authValue). The first two
use the same format as tpm2-tools' `-u`/`-r` files.

Beside them, `ek.json` records which endorsement key they were made under (its type and hash), so
that a changed `tpm.ek`, or a state folder from another TPM, is named as such instead of as a key
that does not load.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import get_args

from vouchd.securefiles import InsecureFileError, read_private, write_atomically, write_together
from vouchd.tpm.ek import EkType
from vouchd.tpm.errors import TpmKeyError
from vouchd.tpm.values import KeyBlob

__all__ = [
    "AUTH_VALUE_SIZE",
    "EK_RECORD_NAME",
    "EkRecord",
    "KeyFiles",
    "StoredKey",
    "ensure_state_dir",
    "read_ek_record",
    "read_key",
    "write_ek_record",
    "write_key",
]

AUTH_VALUE_SIZE = 32
EK_RECORD_NAME = "ek.json"
_MAX_EK_RECORD = 4096


@dataclass(frozen=True)
class KeyFiles:
    public: Path
    private: Path
    auth: Path

    @classmethod
    def in_directory(cls, directory: Path, stem: str) -> KeyFiles:
        return cls(directory / f"{stem}.pub", directory / f"{stem}.priv", directory / f"{stem}.auth")

    def all(self) -> tuple[Path, Path, Path]:
        return (self.public, self.private, self.auth)

    def any_present(self) -> bool:
        return any(path.exists() for path in self.all())


@dataclass(frozen=True)
class EkRecord:
    """The endorsement key a state folder's keys were made under."""

    ek_type: EkType
    ek_hash: str  # sha256 hex of its SubjectPublicKeyInfo, as in the node's SPIFFE ID


@dataclass(frozen=True)
class StoredKey:
    files: KeyFiles
    blob: KeyBlob
    auth_value: bytes = field(repr=False)


def ensure_state_dir(directory: Path) -> None:
    """Create `directory` as 0700 when it does not exist; an existing one is left as the operator made it."""
    if directory.is_dir():
        return
    try:
        directory.mkdir(mode=0o700, parents=True)
        # mkdir's mode is filtered by the umask; make the intent exact.
        directory.chmod(0o700)
    except OSError as err:
        raise TpmKeyError(f"cannot create key directory {directory}: {err.strerror}") from err


def read_key(files: KeyFiles) -> StoredKey | None:
    """The stored key, or None when none of its files exists.

    A partial set of files is an error, not a reason to create a new key: the caller must not
    silently replace a key the authority may already know.
    """
    present = [path.exists() for path in files.all()]
    if not any(present):
        return None
    for path, exists in zip(files.all(), present, strict=True):
        if not exists:
            raise TpmKeyError(f"key file {path} is missing while the rest of its key is present")
    auth_value = _read(files.auth)
    if len(auth_value) != AUTH_VALUE_SIZE:
        raise TpmKeyError(f"key file {files.auth} is corrupt: expected {AUTH_VALUE_SIZE} bytes")
    return StoredKey(files, KeyBlob(_read(files.public), _read(files.private)), auth_value)


def write_key(files: KeyFiles, blob: KeyBlob, auth_value: bytes) -> StoredKey:
    """Store a key: the three files are renamed into place together, after all are durable."""
    try:
        write_together([(files.public, blob.public, 0o600), (files.private, blob.private, 0o600),
                        (files.auth, auth_value, 0o600)])
    except OSError as err:
        names = ", ".join(str(path) for path in files.all())
        raise TpmKeyError(f"cannot write key files {names}: {err.strerror}") from err
    return StoredKey(files, blob, auth_value)


def _read(path: Path) -> bytes:
    """Every key file is private and read without following links (see vouchd.securefiles)."""
    try:
        return read_private(path)
    except InsecureFileError as err:
        raise TpmKeyError(f"key file {path} is {err}") from None
    except OSError as err:
        raise TpmKeyError(f"cannot read key file {path}: {err.strerror}") from err


def read_ek_record(directory: Path) -> EkRecord | None:
    """The record in `directory`, or None when it has none (a folder of an earlier vouchd, or a new one)."""
    path = directory / EK_RECORD_NAME
    if not path.exists():
        return None
    data = _read(path)
    try:
        if len(data) > _MAX_EK_RECORD:
            raise ValueError("too large")
        fields = json.loads(data)
        ek_type, ek_hash = fields["ek_type"], fields["ek_hash"]
        if ek_type not in get_args(EkType) or not isinstance(ek_hash, str):
            raise ValueError("wrong field values")
        if not re.fullmatch(r"[0-9a-f]{64}", ek_hash):
            raise ValueError("not a sha256 hex digest")
    except (ValueError, KeyError, TypeError) as err:
        raise TpmKeyError(f"key file {path} is corrupt: expected {{\"ek_type\": …, \"ek_hash\": …}}") from err
    return EkRecord(ek_type=ek_type, ek_hash=ek_hash)


def write_ek_record(directory: Path, record: EkRecord) -> None:
    path = directory / EK_RECORD_NAME
    content = json.dumps({"ek_type": record.ek_type, "ek_hash": record.ek_hash}, indent=2) + "\n"
    try:
        write_atomically(path, content.encode(), 0o600)
    except OSError as err:
        raise TpmKeyError(f"cannot write key file {path}: {err.strerror}") from err
