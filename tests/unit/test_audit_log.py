"""The audit log writer: the chain, rotation, anchors by count and by time, fsync at anchors, crash
recovery, write failures and file modes; with a FakeClock and a fake signer (no TPM here)."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import hmac
import itertools
import json
import logging
import os
import stat
import subprocess
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from tests.fakes import FakeClock
from vouchd.audit import AnchorQuote, AuditError, AuditLog, AuditLogError, AuditWriteError, log_files, verify_log
from vouchd.decisions import CallerEvidence, Decision, DecisionKind, NodeEvidence, Outcome
from vouchd.evidence import VerificationError
from vouchd.tpm import TpmUnavailableError

ZEROS = "0" * 64


class FakeSigner:
    """Quotes that are an HMAC over the extraData: opaque bytes, and `check` to verify them."""

    def __init__(self, key: bytes = b"fake anchor key") -> None:
        self._key = key
        self.quoted: list[bytes] = []
        self.fail: Exception | None = None
        self.gate: asyncio.Event | None = None

    async def quote(self, extra_data: bytes) -> AnchorQuote:
        self.quoted.append(extra_data)
        if self.gate is not None:
            await asyncio.wait_for(self.gate.wait(), timeout=5)
        if self.fail is not None:
            raise self.fail
        attest = b"fake-attest:" + extra_data
        return AnchorQuote(attest, hmac.digest(self._key, attest, "sha256"), "sha256:0,1,2")

    def check(self, quote: AnchorQuote, extra_data: bytes) -> None:
        if not hmac.compare_digest(quote.signature, hmac.digest(self._key, quote.attest, "sha256")):
            raise VerificationError("quote signature invalid: not the fake key's")
        if quote.attest != b"fake-attest:" + extra_data:
            raise VerificationError("quote extraData is not the chain head it covers")


def decision(n: int = 0, **changes: object) -> Decision:
    values: dict[str, object] = {
        "kind": DecisionKind.ISSUE, "outcome": Outcome.OK, "at": 1_800_000_000.0 + n, "source": "workload_api",
        "method": "FetchX509SVID",
        "caller": CallerEvidence(pid=1000 + n, uid=1000, start_time=4242, selectors=("unix:uid:1000",),
                                 evidence=("unix.sha256=ab",)),
        "spiffe_ids": (f"spiffe://example.org/w/{n}",), "svid_serials": ("1f2e",), "entry_ids": ("e1",),
        "details": (("attempt", str(n)), ("attempt", "again")),
    }
    values.update(changes)
    return Decision(**values)  # type: ignore[arg-type]


def lines_of(directory: Path) -> list[bytes]:
    """Every complete line of the log, in order, without newlines."""
    return [line for path in log_files(directory) for line in path.read_bytes().split(b"\n")[:-1]]


def records_of(directory: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in lines_of(directory)]


def digest(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


async def eventually(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out waiting"
        await asyncio.sleep(0.005)


@pytest.fixture
def signer() -> FakeSigner:
    return FakeSigner()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def audit_dir(tmp_path: Path) -> Path:
    return tmp_path / "state" / "audit"


@contextlib.asynccontextmanager
async def running(audit: AuditLog) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(audit.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=5)


def test_each_record_is_one_canonical_line_chained_to_the_one_before(
        audit_dir: Path, signer: FakeSigner, clock: FakeClock) -> None:
    audit = AuditLog.open(audit_dir, signer, clock=clock)
    assert audit.record(decision(1)) == 2
    clock.advance(1.5)
    audit.record(decision(2, node=NodeEvidence("node-1", quote_digest="ab" * 32, pcr_profile="p1")))
    audit.note("policy_reload", {"policy": "v2", "entries": 3})
    lines = lines_of(audit_dir)
    records = [json.loads(line) for line in lines]
    assert [r["seq"] for r in records] == [1, 2, 3, 4]
    assert [r["kind"] for r in records] == ["start", "issue", "issue", "policy_reload"]
    assert records[0]["prev"] == ZEROS
    for before, line in zip(lines, records[1:], strict=False):
        assert line["prev"] == digest(before)
    for line, record in zip(lines, records, strict=True):
        assert line == json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    assert records[1]["time"] == "2027-01-15T08:00:00.000000Z"
    assert records[2]["time"] == "2027-01-15T08:00:01.500000Z"
    assert records[1]["caller"] == {"pid": 1001, "uid": 1000, "start_time": 4242, "selectors": ["unix:uid:1000"],
                                    "evidence": ["unix.sha256=ab"]}
    assert records[1]["details"] == [["attempt", "1"], ["attempt", "again"]]
    assert records[1]["spiffe_ids"] == ["spiffe://example.org/w/1"] and records[1]["outcome"] == "ok"
    assert records[2]["node"] == {"node_id": "node-1", "quote_digest": "ab" * 32, "pcr_profile": "p1"}
    assert records[3]["policy"] == "v2"


def test_notes_may_not_pass_for_the_logs_own_records(audit_dir: Path, signer: FakeSigner) -> None:
    audit = AuditLog.open(audit_dir, signer)
    for kind in ("anchor", "start", "issue", "Bad-Kind", ""):
        with pytest.raises(AuditError, match="kind"):
            audit.note(kind, {})
    with pytest.raises(AuditError, match="own fields prev, seq"):
        audit.note("policy_reload", {"seq": 9, "prev": ZEROS})
    with pytest.raises(AuditError, match="not JSON"):
        audit.note("policy_reload", {"value": object()})
    assert [r["kind"] for r in records_of(audit_dir)] == ["start"]


def test_folder_is_0700_and_files_0600_whatever_the_umask(audit_dir: Path, signer: FakeSigner) -> None:
    old = os.umask(0)
    try:
        AuditLog.open(audit_dir, signer).record(decision())
    finally:
        os.umask(old)
    assert stat.S_IMODE(audit_dir.stat().st_mode) == 0o700
    assert [stat.S_IMODE(p.stat().st_mode) for p in log_files(audit_dir)] == [0o600]


def test_unsafe_folders_and_files_are_refused(tmp_path: Path, signer: FakeSigner) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(real)
    with pytest.raises(AuditLogError, match="is a symbolic link"):
        AuditLog.open(tmp_path / "link", signer)
    real.chmod(0o777)
    with pytest.raises(AuditLogError, match=r"writable by group or others \(mode 0777\)"):
        AuditLog.open(real, signer)
    real.chmod(0o700)
    elsewhere = tmp_path / "elsewhere.jsonl"
    elsewhere.write_bytes(b"")
    (real / "audit-000001.jsonl").symlink_to(elsewhere)
    with pytest.raises(AuditLogError, match=r"audit-000001\.jsonl is a symbolic link"):
        AuditLog.open(real, signer)
    (real / "audit-000001.jsonl").unlink()
    (real / "audit-000001.jsonl").write_bytes(b"")
    (real / "audit-000001.jsonl").chmod(0o666)
    with pytest.raises(AuditLogError, match=r"writable by group or others \(mode 0666\)"):
        AuditLog.open(real, signer)


def test_rotation_starts_a_new_file_that_continues_the_chain(audit_dir: Path, signer: FakeSigner) -> None:
    audit = AuditLog.open(audit_dir, signer, max_file_bytes=2048)
    for n in range(30):
        audit.record(decision(n))
    files = log_files(audit_dir)
    assert [p.name for p in files[:3]] == ["audit-000001.jsonl", "audit-000002.jsonl", "audit-000003.jsonl"]
    assert all(p.stat().st_size <= 2048 for p in files)
    for older, newer in itertools.pairwise(files):
        last = older.read_bytes().split(b"\n")[-2]
        first = json.loads(newer.read_bytes().split(b"\n")[0])
        assert first["prev"] == digest(last)
        assert first["seq"] == json.loads(last)["seq"] + 1
    assert audit.status()["path"] == str(files[-1])
    report = verify_log([audit_dir], None, checker=signer.check)
    assert report.ok and report.records == 31


async def test_an_anchor_every_n_records_quotes_the_chain_head(
        audit_dir: Path, signer: FakeSigner, clock: FakeClock) -> None:
    audit = AuditLog.open(audit_dir, signer, clock=clock, anchor_every=5, recheck_interval=0.01)
    async with running(audit):
        for n in range(4):   # with the start record: five records
            audit.record(decision(n))
        await eventually(lambda: "anchor" in [r["kind"] for r in records_of(audit_dir)])
        for n in range(3):
            audit.record(decision(n))
        await asyncio.sleep(0.05)
    lines = lines_of(audit_dir)
    kinds = [json.loads(line)["kind"] for line in lines]
    assert kinds == ["start"] + ["issue"] * 4 + ["anchor"] + ["issue"] * 3
    anchor = json.loads(lines[5])
    assert anchor["covers"] == 5 and anchor["prev"] == digest(lines[4])
    assert signer.quoted == [hashlib.sha256(lines[4]).digest()]
    assert anchor["quote"]["pcrs"] == "sha256:0,1,2"
    assert audit.status()["unanchored"] == 3
    assert audit.status()["last_anchor_at"] == "2027-01-15T08:00:00.000000Z"


async def test_an_anchor_every_t_seconds_only_while_records_come(
        audit_dir: Path, signer: FakeSigner, clock: FakeClock) -> None:
    audit = AuditLog.open(audit_dir, signer, clock=clock, anchor_interval=60, recheck_interval=0.01)
    async with running(audit):
        audit.record(decision())
        clock.advance(59)
        await asyncio.sleep(0.1)
        assert signer.quoted == []
        clock.advance(1)
        await eventually(lambda: len(signer.quoted) == 1)
        await eventually(lambda: audit.status()["unanchored"] == 0)
        clock.advance(600)   # nothing new: no anchor
        await asyncio.sleep(0.1)
        assert len(signer.quoted) == 1
        audit.record(decision())
        await eventually(lambda: len(signer.quoted) == 2)
    assert [r["kind"] for r in records_of(audit_dir)] == ["start", "issue", "anchor", "issue", "anchor"]


async def test_anchor_writes_only_when_records_were_added(audit_dir: Path, signer: FakeSigner) -> None:
    audit = AuditLog.open(audit_dir, signer)
    assert await audit.anchor() is True
    assert await audit.anchor() is False
    audit.note("policy_reload", {})
    assert await audit.anchor() is True
    assert len(signer.quoted) == 2


async def test_fsync_happens_at_anchors_not_per_record(
        audit_dir: Path, signer: FakeSigner, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def counting_fsync(fd: int) -> None:
        synced.append("folder" if stat.S_ISDIR(os.fstat(fd).st_mode) else "file")
        real_fsync(fd)

    audit = AuditLog.open(audit_dir, signer)
    monkeypatch.setattr(os, "fsync", counting_fsync)
    for n in range(10):
        audit.record(decision(n))
    assert synced == []
    await audit.anchor()
    assert sorted(synced) == ["file", "folder"]    # the file was created since the folder was synced
    synced.clear()
    audit.record(decision())
    await audit.anchor()
    assert synced == ["file"]


async def test_records_that_arrive_while_the_tpm_quotes_are_not_held_back(
        audit_dir: Path, signer: FakeSigner) -> None:
    audit = AuditLog.open(audit_dir, signer)
    audit.record(decision(1))
    signer.gate = asyncio.Event()
    anchoring = asyncio.create_task(audit.anchor())
    await eventually(lambda: len(signer.quoted) == 1)
    audit.record(decision(2))
    audit.record(decision(3))
    signer.gate.set()
    assert await asyncio.wait_for(anchoring, timeout=5) is True
    records = records_of(audit_dir)
    assert [r["kind"] for r in records] == ["start", "issue", "issue", "issue", "anchor"]
    assert records[4]["covers"] == 2
    assert audit.status()["unanchored"] == 2
    report = verify_log([audit_dir], None, checker=signer.check)
    assert report.ok and report.anchored_through == 2 and report.unanchored == 2


async def test_a_failed_anchor_is_reported_and_tried_again_later(
        audit_dir: Path, signer: FakeSigner, clock: FakeClock) -> None:
    audit = AuditLog.open(audit_dir, signer, clock=clock, anchor_every=1, anchor_interval=60,
                          recheck_interval=0.01)
    signer.fail = TpmUnavailableError("TPM unreachable at swtpm:path=x: gone")
    async with running(audit):
        await eventually(lambda: audit.status()["anchor_failure"] is not None)
        await asyncio.sleep(0.1)
        assert len(signer.quoted) == 1          # not tried again at once, in a loop
        assert "TPM unreachable" in str(audit.status()["anchor_failure"])
        signer.fail = None
        clock.advance(10)
        await eventually(lambda: audit.status()["anchor_failure"] is None)
    assert audit.status()["unanchored"] == 0


async def test_close_anchors_the_tail(audit_dir: Path, signer: FakeSigner) -> None:
    audit = AuditLog.open(audit_dir, signer)
    audit.record(decision())
    await audit.close()
    await audit.close()
    assert [r["kind"] for r in records_of(audit_dir)] == ["start", "issue", "anchor"]
    with pytest.raises(AuditWriteError, match="closed"):
        audit.record(decision())


@pytest.mark.parametrize("torn", [b'{"caller":{"pid":7', b'{"kind":"issue","seq":\n', b"\x00" * 300])
async def test_a_crash_leftover_is_cut_off_and_the_chain_goes_on(
        audit_dir: Path, signer: FakeSigner, torn: bytes) -> None:
    audit = AuditLog.open(audit_dir, signer)
    audit.record(decision(1))
    await audit.anchor()
    audit.record(decision(2))
    before = lines_of(audit_dir)
    with (audit_dir / "audit-000001.jsonl").open("ab") as stream:
        stream.write(torn)
    report = verify_log([audit_dir], None, checker=signer.check)
    if torn.endswith(b"\n"):
        assert report.problem is not None and report.problem.reason == "line is not JSON"
    else:
        assert report.ok and report.partial_tail is not None
        assert report.partial_tail.reason == f"partial last line ({len(torn)} bytes): dropped at next start"
        assert report.anchored_through == 2 and report.unanchored == 1

    reopened = AuditLog.open(audit_dir, signer)
    after = lines_of(audit_dir)
    assert after[:-1] == before
    start = json.loads(after[-1])
    assert start["kind"] == "start" and start["dropped_bytes"] == len(torn)
    assert start["dropped_from"] == "audit-000001.jsonl"
    assert start["seq"] == 5 and start["prev"] == digest(before[-1])
    reopened.record(decision(3))
    await reopened.anchor()
    report = verify_log([audit_dir], None, checker=signer.check)
    assert report.ok and report.partial_tail is None and report.unanchored == 0 and report.records == 7


def test_damage_beyond_a_crash_is_refused(audit_dir: Path, signer: FakeSigner) -> None:
    AuditLog.open(audit_dir, signer).record(decision())
    with (audit_dir / "audit-000001.jsonl").open("ab") as stream:
        stream.write(b"not a record\nnor this\n")
    with pytest.raises(AuditLogError, match="ends in damaged records"):
        AuditLog.open(audit_dir, signer)


def test_an_empty_newest_file_continues_from_the_one_before(audit_dir: Path, signer: FakeSigner) -> None:
    AuditLog.open(audit_dir, signer).record(decision())
    last = lines_of(audit_dir)[-1]
    empty = audit_dir / "audit-000002.jsonl"
    empty.touch(mode=0o600)   # a crash right after rotation
    AuditLog.open(audit_dir, signer)
    start = json.loads(empty.read_bytes())
    assert start["seq"] == 3 and start["prev"] == digest(last) and start["dropped_bytes"] == 0
    assert verify_log([audit_dir], None, checker=signer.check).ok


def test_a_failed_write_raises_sets_failure_and_a_later_write_clears_it(
        audit_dir: Path, signer: FakeSigner, monkeypatch: pytest.MonkeyPatch) -> None:
    audit = AuditLog.open(audit_dir, signer)
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full_disk)
    with pytest.raises(AuditWriteError, match=r"cannot write audit record to .*audit-000001\.jsonl: No space left"):
        audit.record(decision())
    assert "No space left" in str(audit.status()["failure"])
    assert audit.status()["records"] == 1

    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))
    with pytest.raises(AuditWriteError, match=r"No space left on device \(wrote \d+ of \d+ bytes\)"):
        audit.record(decision())
    monkeypatch.setattr(os, "write", real_write)
    assert audit.record(decision()) == 2
    assert audit.failure is None and audit.status()["failure"] is None
    report = verify_log([audit_dir], None, checker=signer.check)
    assert report.ok and report.partial_tail is None and report.records == 2


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k,mode=0700", "vouchd-audit-test", str(mount)],
                          check=False, capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False, capture_output=True)


def test_a_really_full_disk_fails_the_record_until_there_is_room(small_disk: Path, signer: FakeSigner) -> None:
    audit = AuditLog.open(small_disk / "audit", signer)
    filler = small_disk / "filler"
    with contextlib.suppress(OSError), filler.open("wb", buffering=0) as stream:
        while True:
            stream.write(b"x" * 4096)
    failed = 0
    for n in range(50):     # whatever room was left in the last block goes first
        try:
            audit.record(decision(n))
        except AuditWriteError as err:
            assert "No space left on device" in str(err)
            failed += 1
    assert failed > 0 and audit.failure is not None and "No space left" in audit.failure
    filler.unlink()
    audit.record(decision())
    assert audit.failure is None
    report = verify_log([small_disk / "audit"], None, checker=signer.check)
    assert report.ok and report.partial_tail is None


def test_a_lasting_failure_is_logged_once_and_the_recovery_once(
        audit_dir: Path, signer: FakeSigner, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    audit = AuditLog.open(audit_dir, signer)
    real_write = os.write

    def full_disk(fd: int, data: bytes) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", full_disk)
    with caplog.at_level(logging.DEBUG, logger="vouchd.audit"):
        for _ in range(5):  # every refused request tries to write its record
            with pytest.raises(AuditWriteError):
                audit.record(decision())
        monkeypatch.setattr(os, "write", real_write)
        audit.record(decision())
        audit.record(decision())

    levels = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "vouchd.audit"]
    assert levels.count((logging.ERROR, "audit record not written")) == 1, "not once per refused request"
    assert levels.count((logging.DEBUG, "audit record not written")) == 4
    assert levels.count((logging.WARNING, "audit log written again after a failure")) == 1
