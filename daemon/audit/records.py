"""What an audit record is, byte for byte: shared by the writer, the verifier and `vouchd audit tail`.

A record is one line of canonical JSON (sorted keys, no spaces, UTF-8) ending in a newline. Every
record carries `seq` (1, 2, 3, ... across all files), `time` (RFC 3339, UTC) and `prev`: the sha256,
in hex, of the previous record's line without its newline (64 zeros before the first record). The
hash covers the bytes on disk, never a re-serialisation, so the verifier needs no JSON canonicaliser
of its own. Records live in `audit-000001.jsonl`, `audit-000002.jsonl`, ... (the number orders them;
it grows past six digits when it must): files 0600 in a folder 0700, neither of them a symbolic link
nor writable by anyone else.
"""

from __future__ import annotations

import base64
import binascii
import errno
import hashlib
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from vouchd.decisions import Decision, DecisionKind
from vouchd.errors import VouchdError
from vouchd.securefiles import fsync_directory

__all__ = [
    "GENESIS_PREV",
    "RESERVED_FIELDS",
    "RESERVED_KINDS",
    "AnchorQuote",
    "AnchorSigner",
    "AuditError",
    "AuditLogError",
    "AuditWriteError",
    "canonical_line",
    "check_note_kind",
    "decision_record",
    "format_time",
    "line_digest",
    "log_file_name",
    "log_file_number",
    "log_files",
    "open_log_file",
    "parse_record",
    "prepare_log_directory",
]

GENESIS_PREV = "0" * 64
RESERVED_FIELDS = frozenset({"seq", "time", "prev", "kind"})
# Kinds only the log itself writes: a note() may not pass for a decision or forge an anchor.
RESERVED_KINDS = frozenset({"start", "anchor"} | {kind.value for kind in DecisionKind})

_FILE_NAME = re.compile(r"audit-(\d{6,})\.jsonl")
_KIND = re.compile(r"[a-z][a-z0-9_]{0,63}")


class AuditError(VouchdError):
    """Root of the audit log's errors."""


class AuditWriteError(AuditError):
    """A record could not be written (disk full, I/O error): whatever it records must not happen."""


class AuditLogError(AuditError):
    """The audit log cannot be opened: an unsafe folder or file, or damage beyond a crash's partial line."""


def canonical_line(record: Mapping[str, object]) -> bytes:
    """The record as one line of canonical JSON, newline included.

    A lone surrogate (from a file name that is not UTF-8) is kept as its JSON escape, so that writing
    a record never fails on its content.
    """
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return text.encode("utf-8", "backslashreplace") + b"\n"


def line_digest(line: bytes) -> bytes:
    """sha256 of a record's line, without its newline: the next record's `prev`, an anchor's extraData."""
    return hashlib.sha256(line.removesuffix(b"\n")).digest()


def format_time(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def check_note_kind(kind: str) -> None:
    if not _KIND.fullmatch(kind):
        raise AuditError(f"audit record kind {kind[:80]!r} is not lower-case letters, digits and _")
    if kind in RESERVED_KINDS:
        raise AuditError(f"audit record kind {kind!r} is reserved for the log's own records")


def decision_record(decision: Decision) -> dict[str, object]:
    """Everything a decision says, nested as the dataclasses are; empty parts left out."""
    body: dict[str, object] = {"kind": decision.kind.value, "outcome": decision.outcome.value,
                               "source": decision.source, "at": format_time(decision.at)}
    if decision.method:
        body["method"] = decision.method
    if decision.reason:
        body["reason"] = decision.reason
    if decision.caller is not None:
        caller: dict[str, object] = {"pid": decision.caller.pid, "uid": decision.caller.uid}
        if decision.caller.start_time is not None:
            caller["start_time"] = decision.caller.start_time
        if decision.caller.selectors:
            caller["selectors"] = list(decision.caller.selectors)
        if decision.caller.evidence:
            caller["evidence"] = list(decision.caller.evidence)
        body["caller"] = caller
    if decision.node is not None:
        node: dict[str, object] = {"node_id": decision.node.node_id}
        if decision.node.quote_digest:
            node["quote_digest"] = decision.node.quote_digest
        if decision.node.pcr_profile:
            node["pcr_profile"] = decision.node.pcr_profile
        body["node"] = node
    for name, values in (("entry_ids", decision.entry_ids), ("spiffe_ids", decision.spiffe_ids),
                         ("svid_serials", decision.svid_serials)):
        if values:
            body[name] = list(values)
    if decision.details:
        # pairs, not an object: a key given twice is kept twice, in order
        body["details"] = [[key, value] for key, value in decision.details]
    return body


# The `pcrs` of an anchor signed by a static-secret node's key rather than quoted by a TPM.
KEY_ANCHOR_PCRS = "none (node key)"


@dataclass(frozen=True)
class AnchorQuote:
    """A signature over the chain head: for the TPM, a TPM2_Quote whose extraData is that head.

    `pcrs` is the bank and selection quoted, in the tpm2-tools form ("sha256:0,1,2,3,4,5,6,7").
    """

    attest: bytes       # marshaled TPMS_ATTEST: what was signed
    signature: bytes    # marshaled TPMT_SIGNATURE
    pcrs: str

    def to_record(self) -> dict[str, str]:
        return {"attest": base64.b64encode(self.attest).decode("ascii"),
                "signature": base64.b64encode(self.signature).decode("ascii"), "pcrs": self.pcrs}

    @classmethod
    def from_record(cls, value: object) -> AnchorQuote:
        """The quote of an anchor record; ValueError naming what is wrong."""
        if not isinstance(value, dict):
            raise ValueError("anchor has no quote object")
        fields = {}
        for name in ("attest", "signature", "pcrs"):
            item = value.get(name)
            if not isinstance(item, str):
                raise ValueError(f"anchor quote has no {name} string")
            fields[name] = item
        try:
            attest = base64.b64decode(fields["attest"], validate=True)
            signature = base64.b64decode(fields["signature"], validate=True)
        except binascii.Error:
            raise ValueError("anchor quote is not base64") from None
        return cls(attest, signature, fields["pcrs"])


class AnchorSigner(Protocol):
    async def quote(self, extra_data: bytes) -> AnchorQuote:
        """Sign `extra_data` (the 32-byte chain head) as a quote; raise when it cannot be done now."""
        ...


def parse_record(line: bytes) -> dict[str, object]:
    """A record line (newline optional) as a dict with the fields every record has; ValueError naming
    the first thing wrong with it."""
    try:
        record = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("line is not JSON") from None
    if not isinstance(record, dict):
        raise ValueError("line is not a JSON object")
    seq = record.get("seq")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise ValueError("record has no seq (a positive integer)")
    prev = record.get("prev")
    if not isinstance(prev, str) or not re.fullmatch(r"[0-9a-f]{64}", prev):
        raise ValueError("record has no prev (64 hex digits)")
    for name in ("kind", "time"):
        if not isinstance(record.get(name), str):
            raise ValueError(f"record has no {name} string")
    return record


def log_file_name(number: int) -> str:
    return f"audit-{number:06d}.jsonl"


def log_file_number(path: Path) -> int | None:
    """The file's place in the log, or None for a file that is not an audit log file."""
    match = _FILE_NAME.fullmatch(path.name)
    return int(match.group(1)) if match else None


def log_files(directory: Path) -> list[Path]:
    """The audit log files in `directory`, oldest first."""
    numbered = [(number, path) for path in directory.iterdir()
                if (number := log_file_number(path)) is not None]
    return [path for _, path in sorted(numbered)]


def prepare_log_directory(directory: Path) -> None:
    """Create the log's folder 0700, or check that an existing one is safe from other users."""
    try:
        status = os.lstat(directory)
    except FileNotFoundError:
        try:
            directory.mkdir(mode=0o700, parents=True)
            directory.chmod(0o700)  # mkdir's mode went through the umask
            fsync_directory(directory.parent)
        except OSError as err:
            raise AuditLogError(f"cannot create audit log folder {directory}: {err.strerror}") from err
        return
    except OSError as err:
        raise AuditLogError(f"cannot inspect audit log folder {directory}: {err.strerror}") from err
    if stat.S_ISLNK(status.st_mode):
        raise AuditLogError(f"audit log folder {directory} is a symbolic link")
    if not stat.S_ISDIR(status.st_mode):
        raise AuditLogError(f"audit log folder {directory} is not a folder")
    mode = stat.S_IMODE(status.st_mode)
    if mode & 0o022:
        raise AuditLogError(f"audit log folder {directory} is writable by group or others (mode {mode:04o}), "
                            "want 0700")
    if status.st_uid not in (os.geteuid(), 0):
        raise AuditLogError(f"audit log folder {directory} belongs to uid {status.st_uid}, not to this daemon")


def open_log_file(path: Path, *, create: bool) -> int:
    """An O_APPEND descriptor on a log file that is ours alone; never through a symbolic link.

    OSError when it cannot be opened (the caller names the failure); AuditLogError when it is unsafe.
    """
    flags = os.O_RDWR | os.O_APPEND | os.O_NOFOLLOW | os.O_CLOEXEC
    if create:
        flags |= os.O_CREAT | os.O_EXCL
    try:
        fd = os.open(path, flags, 0o600)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise AuditLogError(f"audit log file {path} is a symbolic link") from None
        if create:
            raise
        raise AuditLogError(f"cannot open audit log file {path}: {err.strerror}") from err
    try:
        status = os.fstat(fd)
        mode = stat.S_IMODE(status.st_mode)
        if not stat.S_ISREG(status.st_mode):
            raise AuditLogError(f"audit log file {path} is not a regular file")
        if create:
            os.fchmod(fd, 0o600)  # the umask may have narrowed it; make it exact
        elif mode & 0o022:
            raise AuditLogError(f"audit log file {path} is writable by group or others (mode {mode:04o}), "
                                "want 0600")
    except BaseException:
        os.close(fd)
        raise
    return fd
