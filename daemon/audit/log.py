"""The audit log's writer: a hash chain of records on disk, anchored in the TPM now and then.

`record()` is synchronous and returns only once the record is in the OS's hands (one O_APPEND write
of a whole line): a caller about to hand out an identity calls it first and, when it raises
AuditWriteError, hands out nothing. Durability is bought in batches: the file (and its folder, when a
file was created) is fsynced at each anchor, so a crash loses at most the unanchored tail, and what
an anchor covers is on disk before the anchor is. A crash can leave a partial last line; `open()`
cuts it off and says so in the `start` record that continues the chain.

An anchor is a TPM quote whose extraData is the chain head (the sha256 of the last record's line).
Records may arrive while the TPM is quoting; they are not held back, so an anchor names in `covers`
the seq of the record whose hash it signed, which is the record just before it unless records
arrived meanwhile. Records must be written from the event loop's thread (the loop is woken through
an asyncio.Event).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography.hazmat.primitives.asymmetric import ec

from vouchd.audit.records import (
    KEY_ANCHOR_PCRS,
    AnchorQuote,
    AnchorSigner,
    AuditError,
    AuditLogError,
    AuditWriteError,
    canonical_line,
    check_note_kind,
    decision_record,
    format_time,
    line_digest,
    log_file_name,
    log_file_number,
    log_files,
    open_log_file,
    parse_record,
    prepare_log_directory,
)
from vouchd.clock import SYSTEM_CLOCK, Clock
from vouchd.decisions import Decision
from vouchd.protocol.keyproof import ANCHOR_CONTEXT, sign_with_node_key
from vouchd.securefiles import fsync_directory

if TYPE_CHECKING:
    from vouchd.tpm import TpmService

__all__ = ["DEFAULT_ANCHOR_EVERY", "DEFAULT_ANCHOR_INTERVAL", "DEFAULT_MAX_FILE_BYTES", "AuditLog",
           "KeyAnchorSigner", "TpmAnchorSigner"]

log = logging.getLogger("vouchd.audit")

DEFAULT_MAX_FILE_BYTES = 64 * 1024 * 1024
DEFAULT_ANCHOR_EVERY = 1000
DEFAULT_ANCHOR_INTERVAL = 60.0
_ANCHOR_RETRY = 10.0        # seconds before trying again after an anchor failed (at most the interval)
_CLOSE_ANCHOR_TIMEOUT = 5.0
_READ_CHUNK = 64 * 1024
_GENESIS_HEAD = bytes(32)   # hex: GENESIS_PREV


class TpmAnchorSigner:
    """Anchors signed by the node's AK: a quote over `pcrs` of `bank` with the chain head as extraData."""

    def __init__(self, tpm: TpmService, bank: str = "sha256", pcrs: Iterable[int] = range(8)) -> None:
        self._tpm = tpm
        self._bank = bank
        self._pcrs = tuple(sorted(pcrs))   # the TPM reports its selection as a bitmap: ascending

    async def quote(self, extra_data: bytes) -> AnchorQuote:
        quote = await self._tpm.quote(self._bank, self._pcrs, extra_data)
        return AnchorQuote(quote.attest, quote.signature, f"{self._bank}:{','.join(map(str, self._pcrs))}")


class KeyAnchorSigner:
    """Anchors of a node without a TPM (static-secret tier): the node key's signature over the chain
    head. `attest` is the head itself and `pcrs` is KEY_ANCHOR_PCRS: nothing about the boot is quoted."""

    def __init__(self, key: ec.EllipticCurvePrivateKey) -> None:
        self._key = key

    async def quote(self, extra_data: bytes) -> AnchorQuote:
        return AnchorQuote(extra_data, sign_with_node_key(self._key, ANCHOR_CONTEXT, extra_data), KEY_ANCHOR_PCRS)


@dataclass(frozen=True)
class _Head:
    seq: int
    digest: bytes


class AuditLog:
    """The append-only, hash-chained, TPM-anchored audit log in one folder. Build it with `open()`."""

    def __init__(self, directory: Path, signer: AnchorSigner, *, clock: Clock, anchor_every: int,
                 anchor_interval: float, max_file_bytes: int, recheck_interval: float) -> None:
        if anchor_every < 1 or anchor_interval <= 0 or max_file_bytes < 1 or recheck_interval <= 0:
            raise AuditError("anchor_every, anchor_interval, max_file_bytes and recheck_interval must be positive")
        self._directory = directory
        self._signer = signer
        self._clock = clock
        self._every = anchor_every
        self._interval = anchor_interval
        self._max_bytes = max_file_bytes
        self._recheck = recheck_interval
        self._fd = -1
        self._path = directory
        self._number = 0
        self._size = 0
        self._seq = 0
        self._head = _GENESIS_HEAD
        self._tail_suspect = False      # a failed write may have left bytes past self._size
        self._directory_dirty = False   # a file was created since the folder was last fsynced
        self._unanchored = 0
        self._last_anchor_at: float | None = None
        self._last_anchor_mono = clock.monotonic()
        self._next_attempt_mono = 0.0
        self._failure: str | None = None
        self._anchor_failure: str | None = None
        self._wake = asyncio.Event()
        self._anchor_lock = asyncio.Lock()
        self._closed = False

    @classmethod
    def open(cls, directory: Path, signer: AnchorSigner, *, clock: Clock = SYSTEM_CLOCK,
             anchor_every: int = DEFAULT_ANCHOR_EVERY, anchor_interval: float = DEFAULT_ANCHOR_INTERVAL,
             max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, recheck_interval: float = 1.0) -> AuditLog:
        """Open (or create) the log in `directory`, recover from a crash, and write a `start` record.

        AuditLogError: the folder or a file is unsafe (a symlink, writable by others) or the newest
        file is damaged beyond a crash's partial line. AuditWriteError: the start record failed.
        """
        audit = cls(Path(directory), signer, clock=clock, anchor_every=anchor_every,
                    anchor_interval=anchor_interval, max_file_bytes=max_file_bytes,
                    recheck_interval=recheck_interval)
        try:
            dropped = audit._recover()
            start: dict[str, object] = {"pid": os.getpid(), "dropped_bytes": dropped}
            if dropped:
                start["dropped_from"] = audit._path.name
            audit._append("start", start)
        except BaseException:
            audit._close_file()
            raise
        return audit

    # ------------------------------------------------------------------ writing

    def record(self, decision: Decision) -> int:
        """Append a decision; its seq. AuditWriteError when it could not be written."""
        return self._append(decision.kind.value, decision_record(decision))

    def note(self, kind: str, fields: Mapping[str, object]) -> int:
        """Append one of the daemon's own events (`policy_reload`, ...); its seq.

        `fields` must be JSON values; `seq`, `time`, `prev` and `kind` are the log's own.
        """
        check_note_kind(kind)
        clash = sorted({"seq", "time", "prev", "kind"} & set(fields))
        if clash:
            raise AuditError(f"audit note {kind} sets the log's own fields {', '.join(clash)}")
        return self._append(kind, dict(fields))

    def _append(self, kind: str, body: dict[str, object]) -> int:
        if self._closed:
            raise AuditWriteError("the audit log is closed")
        seq = self._seq + 1
        record = {**body, "kind": kind, "seq": seq, "time": format_time(self._clock.now()),
                  "prev": self._head.hex()}
        try:
            line = canonical_line(record)
        except (TypeError, ValueError) as err:
            raise AuditError(f"audit record {kind} is not JSON: {err}") from err
        try:
            if self._size and self._size + len(line) > self._max_bytes:
                self._rotate()
            self._write(line)
        except (OSError, AuditLogError) as err:
            why = err.strerror or str(err) if isinstance(err, OSError) else str(err)
            failure = f"cannot write audit record to {self._path}: {why}"
            # Once per failure, not once per refused request: the journal may be on the same full disk.
            level = logging.ERROR if failure != self._failure else logging.DEBUG
            self._failure = failure
            log.log(level, "audit record not written", extra={"kind": kind, "reason": failure})
            raise AuditWriteError(failure) from err
        if self._failure is not None:
            log.warning("audit log written again after a failure", extra={"previous_failure": self._failure})
            self._failure = None
        self._seq, self._head = seq, line_digest(line)
        self._size += len(line)
        if kind != "anchor":
            self._unanchored += 1
            if self._unanchored >= self._every:
                self._wake.set()
        return seq

    def _write(self, line: bytes) -> None:
        if self._tail_suspect:
            if os.fstat(self._fd).st_size != self._size:
                os.ftruncate(self._fd, self._size)
            self._tail_suspect = False
        try:
            written = os.write(self._fd, line)
        except OSError:
            self._cut_back()
            raise
        if written != len(line):
            self._cut_back()
            # the kernel stops short when the disk fills up mid-record
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} (wrote {written} of {len(line)} bytes)")

    def _cut_back(self) -> None:
        """Take back what a failed write may have left, so the next record does not continue a torn line."""
        self._tail_suspect = True
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, self._size)
            self._tail_suspect = False

    def _rotate(self) -> None:
        # The old file's unanchored tail must be on disk before the chain moves to another file.
        os.fsync(self._fd)
        number = self._number + 1
        path = self._directory / log_file_name(number)
        fd = open_log_file(path, create=True)
        os.close(self._fd)
        self._fd, self._path, self._number, self._size = fd, path, number, 0
        self._directory_dirty = True
        log.info("audit log rotated", extra={"path": str(path)})

    # ------------------------------------------------------------------ anchoring

    async def run(self) -> None:
        """Anchor every `anchor_every` records or `anchor_interval` seconds, whichever comes first,
        while records were added; until cancelled. A failed anchor is logged and tried again later."""
        while True:
            wait = self._seconds_until_due()
            if wait > 0:
                with contextlib.suppress(TimeoutError):
                    # bounded by recheck_interval: an injected clock moves without waking anyone
                    await asyncio.wait_for(self._wake.wait(), timeout=min(wait, self._recheck))
            self._wake.clear()
            if self._seconds_until_due() > 0:
                continue
            try:
                await self.anchor()
            except AuditError as err:
                log.warning("audit anchor failed", extra={"reason": str(err)})

    def _seconds_until_due(self) -> float:
        if self._unanchored == 0 or self._closed:
            return self._recheck
        now = self._clock.monotonic()
        if now < self._next_attempt_mono:
            return self._next_attempt_mono - now
        if self._unanchored >= self._every:
            return 0.0
        return self._last_anchor_mono + self._interval - now

    async def anchor(self) -> bool:
        """Quote the chain head and append it as an anchor, then fsync; False when nothing was new.

        AuditError when the signer failed, AuditWriteError when the anchor could not be written.
        """
        async with self._anchor_lock:
            if self._unanchored == 0 or self._closed:
                return False
            covers, head, pending = self._seq, self._head, self._unanchored
            try:
                quote = await self._signer.quote(head)
            except Exception as err:
                raise self._anchor_failed(AuditError(f"cannot quote the audit chain head: {err}")) from err
            try:
                self._append("anchor", {"covers": covers, "quote": quote.to_record()})
                os.fsync(self._fd)
                if self._directory_dirty:
                    fsync_directory(self._directory)
                    self._directory_dirty = False
            except AuditWriteError as err:
                raise self._anchor_failed(err) from None
            except OSError as err:
                self._failure = f"cannot fsync audit log {self._path}: {err.strerror or err}"
                raise self._anchor_failed(AuditWriteError(self._failure)) from err
            self._unanchored -= pending
            self._last_anchor_at = self._clock.now()
            self._last_anchor_mono = self._clock.monotonic()
            self._anchor_failure = None
            log.debug("audit log anchored", extra={"seq": covers})
            return True

    def _anchor_failed(self, err: AuditError) -> AuditError:
        self._anchor_failure = str(err)
        self._next_attempt_mono = self._clock.monotonic() + min(self._interval, _ANCHOR_RETRY)
        return err

    # ------------------------------------------------------------------ state

    def status(self) -> dict[str, object]:
        """For `vouchd status`: the current file, records so far, anchoring, and why writes fail."""
        return {
            "path": str(self._path),
            "records": self._seq,
            "last_anchor_at": None if self._last_anchor_at is None else format_time(self._last_anchor_at),
            "unanchored": self._unanchored,
            "failure": self._failure,
            "anchor_failure": self._anchor_failure,
        }

    @property
    def failure(self) -> str | None:
        """Why the last write failed; None once a write succeeds again."""
        return self._failure

    async def close(self, *, anchor: bool = True) -> None:
        """Anchor what is unanchored (unless told not to, or it takes too long), fsync and close. Idempotent."""
        if self._closed:
            return
        if anchor:
            try:
                await asyncio.wait_for(self.anchor(), timeout=_CLOSE_ANCHOR_TIMEOUT)
            except (AuditError, TimeoutError) as err:
                log.warning("audit log closed without a last anchor", extra={"reason": str(err) or "timed out"})
        self._closed = True
        with contextlib.suppress(OSError):
            os.fsync(self._fd)
        self._close_file()

    def _close_file(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    # ------------------------------------------------------------------ opening and recovery

    def _recover(self) -> int:
        """Open the newest file, cut off a crash's partial line, find the chain head; bytes dropped."""
        prepare_log_directory(self._directory)
        files = log_files(self._directory)
        if not files:
            path = self._directory / log_file_name(1)
            self._fd, self._path, self._number = open_log_file(path, create=True), path, 1
            self._directory_dirty = True
            return 0
        newest = files[-1]
        self._fd, self._path, self._number = open_log_file(newest, create=False), newest, _number(newest)
        try:
            size = os.fstat(self._fd).st_size
            keep, head = _last_record(self._fd, size, newest, may_cut=True)
            if keep < size:
                os.ftruncate(self._fd, keep)
                os.fsync(self._fd)
                log.warning("audit log: dropped a partial record left by a crash",
                            extra={"path": str(newest), "dropped_bytes": size - keep})
        except OSError as err:
            raise AuditLogError(f"cannot recover audit log file {newest}: {err.strerror or err}") from err
        self._size = keep
        if head is None and len(files) > 1:
            # A crash right after rotation: the chain continues from the file before.
            previous = files[-2]
            try:
                fd = os.open(previous, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
            except OSError as err:
                raise AuditLogError(f"cannot read audit log file {previous}: {err.strerror}") from err
            try:
                _, head = _last_record(fd, os.fstat(fd).st_size, previous, may_cut=False)
            finally:
                os.close(fd)
            if head is None:
                raise AuditLogError(f"audit log file {previous} holds no record to continue the chain from")
        if head is not None:
            self._seq, self._head = head.seq, head.digest
        return size - keep


def _number(path: Path) -> int:
    number = log_file_number(path)
    assert number is not None  # listed by log_files()
    return number


def _last_record(fd: int, size: int, path: Path, *, may_cut: bool) -> tuple[int, _Head | None]:
    """Where the last complete record of a file ends, and its head (None: no record in the file).

    With `may_cut`, two trailing pieces may be dropped: the bytes after the last newline (a torn
    write) and then one complete line that is not a record (a torn write whose newline made it to
    disk). Beyond that the file is damaged, and continuing the chain on top of it would hide how.
    """
    end, torn_cut, line_cut = size, not may_cut, not may_cut
    while end > 0:
        newline = _last_newline(fd, end)
        if newline + 1 < end:
            if torn_cut:
                break
            torn_cut, end = True, newline + 1
            continue
        start = _last_newline(fd, newline) + 1
        line = os.pread(fd, newline - start, start)
        try:
            record = parse_record(line)
        except ValueError:
            if line_cut:
                break
            torn_cut = line_cut = True
            end = start
            continue
        seq = record["seq"]
        assert isinstance(seq, int)  # parse_record checked it
        return end, _Head(seq, line_digest(line))
    else:
        return 0, None
    raise AuditLogError(f"audit log file {path} ends in damaged records, more than a crash leaves: "
                        "check it with `vouchd audit verify`")


def _last_newline(fd: int, end: int) -> int:
    """Offset of the last newline before `end`, or -1."""
    while end > 0:
        start = max(0, end - _READ_CHUNK)
        chunk = os.pread(fd, end - start, start)
        found = chunk.rfind(b"\n")
        if found >= 0:
            return start + found
        end = start
    return -1
