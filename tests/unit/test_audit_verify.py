"""Offline verification: a sound log verifies; an edited byte, a deleted line, swapped lines, a forged
anchor or a rewritten chain are each named; a crash's partial line is not tampering. Plus the CLI."""

from __future__ import annotations

import argparse
import base64
import hashlib
import io
import json
import threading
import time
from pathlib import Path

import pytest

from tests.fakes import FakeClock
from tests.unit.test_audit_log import FakeSigner, decision
from vouchd.audit import AuditError, AuditLog, log_files, verify_log
from vouchd.audit.records import canonical_line
from vouchd.auditcli import add_audit_commands, follow_records, format_record

FILE = "audit-000001.jsonl"


@pytest.fixture
def signer() -> FakeSigner:
    return FakeSigner()


@pytest.fixture
async def log_dir(tmp_path: Path, signer: FakeSigner) -> Path:
    """seq 1 start, 2-5 issue, 6 anchor (covers 5), 7-10 issue, 11 anchor (covers 10), 12-13 issue;
    one file, so line n holds seq n."""
    directory = tmp_path / "audit"
    audit = AuditLog.open(directory, signer, clock=FakeClock())
    for n in range(1, 11):
        audit.record(decision(n))
        if n in (4, 8):
            await audit.anchor()
    return directory


def lines(directory: Path) -> list[bytes]:
    return (directory / FILE).read_bytes().split(b"\n")[:-1]


def write(directory: Path, new_lines: list[bytes]) -> None:
    (directory / FILE).write_bytes(b"".join(line + b"\n" for line in new_lines))


def rechain(records: list[bytes], start: int) -> list[bytes]:
    """What someone who can write the file does after an edit: recompute every prev from `start` on."""
    result = list(records)
    for index in range(start, len(result)):
        record = json.loads(result[index])
        record["prev"] = hashlib.sha256(result[index - 1]).hexdigest()
        result[index] = canonical_line(record).rstrip(b"\n")
    return result


def test_a_sound_log_verifies_with_its_anchors(log_dir: Path, signer: FakeSigner) -> None:
    report = verify_log([log_dir], None, checker=signer.check)
    assert report.ok and report.problem is None and report.partial_tail is None
    assert (report.records, report.first_seq, report.last_seq, report.from_genesis) == (13, 1, 13, True)
    assert (report.anchors, report.anchored_through, report.covered, report.unanchored) == (2, 10, 10, 2)
    assert report.anchors_checked
    unchecked = verify_log([log_dir / FILE], None)
    assert unchecked.ok and not unchecked.anchors_checked and unchecked.anchors == 2


def test_a_one_byte_edit_names_the_edited_record(log_dir: Path, signer: FakeSigner) -> None:
    edited = lines(log_dir)
    edited[3] = edited[3].replace(b"w/3", b"w/X")   # seq 4, inside a string: still JSON
    write(log_dir, edited)
    report = verify_log([log_dir], None, checker=signer.check)
    assert report.problem is not None
    assert (report.problem.file, report.problem.line, report.problem.seq) == (FILE, 4, 4)
    assert report.problem.reason == "record was changed: the next record's prev does not match it"
    assert str(report.problem) == f"{FILE} line 4 (seq 4): record was changed: the next record's prev does not match it"
    assert report.records == 3 and report.anchored_through is None


def test_a_one_byte_edit_of_a_prev_names_that_record(log_dir: Path, signer: FakeSigner) -> None:
    edited = lines(log_dir)
    record = json.loads(edited[7])
    flipped = ("1" if record["prev"][0] != "1" else "2") + record["prev"][1:]
    edited[7] = edited[7].replace(record["prev"].encode(), flipped.encode())
    write(log_dir, edited)
    problem = verify_log([log_dir], None, checker=signer.check).problem
    assert problem is not None and (problem.line, problem.seq) == (8, 8)
    assert problem.reason == f"prev does not match the previous record (seq 7, {FILE} line 7)"


def test_a_one_byte_edit_that_breaks_the_json_is_named(log_dir: Path, signer: FakeSigner) -> None:
    edited = lines(log_dir)
    edited[6] = edited[6][:-1] + b"]"
    write(log_dir, edited)
    report = verify_log([log_dir], None, checker=signer.check)
    assert report.problem is not None and (report.problem.line, report.problem.seq) == (7, None)
    assert report.problem.reason == "line is not JSON"
    assert report.anchored_through == 5   # the log still verifies up to the anchor before it


def test_a_deleted_line_is_named(log_dir: Path, signer: FakeSigner) -> None:
    edited = lines(log_dir)
    del edited[5]                           # the first anchor
    write(log_dir, edited)
    problem = verify_log([log_dir], None, checker=signer.check).problem
    assert problem is not None and (problem.line, problem.seq, problem.reason) == (6, 7, "seq 7 follows 5")


def test_two_swapped_lines_are_named(log_dir: Path, signer: FakeSigner) -> None:
    edited = lines(log_dir)
    edited[7], edited[8] = edited[8], edited[7]
    write(log_dir, edited)
    problem = verify_log([log_dir], None, checker=signer.check).problem
    assert problem is not None and (problem.line, problem.seq, problem.reason) == (8, 9, "seq 9 follows 7")


def test_a_forged_anchor_signature_is_named(log_dir: Path, signer: FakeSigner) -> None:
    edited = lines(log_dir)
    anchor = json.loads(edited[10])
    anchor["quote"]["signature"] = base64.b64encode(b"\x01" * 32).decode()
    edited[10] = canonical_line(anchor).rstrip(b"\n")
    write(log_dir, rechain(edited, 11))
    report = verify_log([log_dir], None, checker=signer.check)
    assert report.problem is not None and (report.problem.line, report.problem.seq) == (11, 11)
    assert report.problem.reason == "anchor quote signature invalid: not the fake key's"
    assert (report.anchored_through, report.covered) == (5, 5)


def test_an_anchor_replayed_from_elsewhere_in_the_log_is_named(log_dir: Path, signer: FakeSigner) -> None:
    edited = lines(log_dir)
    anchor = json.loads(edited[10])
    anchor["quote"] = json.loads(edited[5])["quote"]   # genuinely signed, but over another head
    edited[10] = canonical_line(anchor).rstrip(b"\n")
    write(log_dir, rechain(edited, 11))
    problem = verify_log([log_dir], None, checker=signer.check).problem
    assert problem is not None and problem.seq == 11
    assert problem.reason == "anchor quote extraData is not the chain head it covers"


def test_a_rewritten_chain_is_caught_by_the_anchor_after_it(log_dir: Path, signer: FakeSigner) -> None:
    edited = lines(log_dir)
    edited[2] = edited[2].replace(b"w/2", b"w/X")
    write(log_dir, rechain(edited, 3))
    problem = verify_log([log_dir], None, checker=signer.check).problem
    assert problem is not None and (problem.line, problem.seq) == (6, 6)
    assert problem.reason == "anchor quote extraData is not the chain head it covers"


def test_the_unanchored_tail_rests_on_the_chain_alone(log_dir: Path, signer: FakeSigner) -> None:
    edited = lines(log_dir)
    edited[11] = edited[11].replace(b"w/9", b"w/X")
    write(log_dir, rechain(edited, 12))
    report = verify_log([log_dir], None, checker=signer.check)
    assert report.ok and report.unanchored == 2 and report.anchored_through == 10   # and the report says so


def test_a_crash_partial_line_is_not_tampering(log_dir: Path, signer: FakeSigner) -> None:
    with (log_dir / FILE).open("ab") as stream:
        stream.write(b'{"caller":{"pi')
    report = verify_log([log_dir], None, checker=signer.check)
    assert report.ok and report.records == 13 and report.anchored_through == 10
    assert report.partial_tail is not None and report.partial_tail.line == 14
    assert report.partial_tail.reason == "partial last line (14 bytes): dropped at next start"


def test_the_first_file_must_start_the_chain(log_dir: Path, signer: FakeSigner) -> None:
    write(log_dir, lines(log_dir)[1:])
    problem = verify_log([log_dir], None, checker=signer.check).problem
    assert problem is not None and problem.reason == ("the log's first file does not start the chain: "
                                                      "its first record is seq 2, not 1")


async def test_the_chain_runs_across_files_in_order(tmp_path: Path, signer: FakeSigner) -> None:
    directory = tmp_path / "audit"
    audit = AuditLog.open(directory, signer, max_file_bytes=1500)
    for n in range(20):
        audit.record(decision(n))
        if n % 7 == 6:
            await audit.anchor()
    files = log_files(directory)
    assert len(files) >= 4
    report = verify_log(files, None, checker=signer.check)
    assert report.ok and report.records == 23 and report.anchors == 2
    later = verify_log(files[2:], None, checker=signer.check)
    assert later.ok and not later.from_genesis and later.first_seq is not None and later.first_seq > 1
    problem = verify_log([files[0], *files[2:]], None, checker=signer.check).problem
    assert problem is not None and problem.file == files[2].name and problem.line == 1
    assert problem.reason.startswith(f"seq {later.first_seq} follows ")
    problem = verify_log(list(reversed(files)), None, checker=signer.check).problem
    assert problem is not None and problem.file == files[-2].name and "follows" in problem.reason
    files[0].write_bytes(files[0].read_bytes()[:-1])    # no newline at its end, with files after it
    problem = verify_log(files, None, checker=signer.check).problem
    assert problem is not None and problem.reason == "line does not end with a newline, inside the log"


def test_paths_that_are_not_logs_are_errors(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="no audit log files"):
        verify_log([tmp_path], None)
    with pytest.raises(AuditError, match="neither an audit log file nor a folder"):
        verify_log([tmp_path / "missing"], None)
    with pytest.raises(AuditError, match="AK public is not a TPM2B_PUBLIC"):
        (tmp_path / "x.jsonl").write_bytes(b"")
        verify_log([tmp_path / "x.jsonl"], b"\x00\x01")


# ---------------------------------------------------------------------- the CLI

def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="vouchd")
    add_audit_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    result: int = args.handler(args)
    return result


def test_verify_without_an_ak_exits_2_and_says_so(log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["audit", "verify", str(log_dir)]) == 2
    out = capsys.readouterr().out
    assert "anchors    2 (NOT CHECKED: give --state-dir, --ak-public or --node-key)" in out
    assert "anchored   10 records, through seq 10; 2 unanchored after it" in out
    assert "result     chain OK; anchors could not be checked without the AK" in out


def test_verify_names_the_first_bad_record_and_exits_1(log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    edited = lines(log_dir)
    del edited[5]
    write(log_dir, edited)
    assert run_cli(["audit", "verify", str(log_dir / FILE)]) == 1
    assert f"result     FAILED: {FILE} line 6 (seq 7): seq 7 follows 5" in capsys.readouterr().out
    assert run_cli(["audit", "verify", "--json", str(log_dir)]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["problem"] == {"file": FILE, "line": 6, "seq": 7,
                                                           "reason": "seq 7 follows 5"}


def test_verify_with_an_unreadable_ak_is_an_error(log_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"cannot read the AK public .*/tpm/ak.pub"):
        run_cli(["audit", "verify", "--state-dir", str(tmp_path), str(log_dir)])


def test_tail_shows_the_last_records_one_line_each(log_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["audit", "tail", "--dir", str(log_dir), "-n", "3"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out == [
        "2027-01-15T08:00:00.000000Z  #11  anchor  covers #10  sha256:0,1,2",
        "2027-01-15T08:00:00.000000Z  #12  issue  ok  workload_api  FetchX509SVID  pid 1009 uid 1000  "
        "spiffe://example.org/w/9",
        "2027-01-15T08:00:00.000000Z  #13  issue  ok  workload_api  FetchX509SVID  pid 1010 uid 1000  "
        "spiffe://example.org/w/10",
    ]
    assert run_cli(["audit", "tail", "--dir", str(log_dir), "-n", "2", "--json"]) == 0
    assert capsys.readouterr().out.encode().splitlines() == lines(log_dir)[-2:]


def test_format_record_for_each_kind() -> None:
    deny = canonical_line({"kind": "deny", "seq": 3, "prev": "0" * 64, "time": "T", "outcome": "denied",
                           "source": "workload_api", "method": "FetchJWTSVID", "caller": {"pid": 5, "uid": 6},
                           "reason": "no entry matches"})
    assert format_record(deny) == ("T  #3  deny  denied  workload_api  FetchJWTSVID  pid 5 uid 6  "
                                   "reason: no entry matches")
    start = canonical_line({"kind": "start", "seq": 1, "prev": "0" * 64, "time": "T", "pid": 9, "dropped_bytes": 4})
    assert format_record(start) == "T  #1  start  pid 9  dropped 4 bytes"
    note = canonical_line({"kind": "policy_reload", "seq": 2, "prev": "0" * 64, "time": "T", "policy": "v2"})
    assert format_record(note) == 'T  #2  policy_reload  {"policy":"v2"}'
    assert format_record(b"{oops") == "(not a record: line is not JSON)"


def test_follow_prints_new_records_across_rotation(tmp_path: Path, signer: FakeSigner) -> None:
    directory = tmp_path / "audit"
    audit = AuditLog.open(directory, signer, max_file_bytes=1500)
    out = io.StringIO()
    stop = threading.Event()
    start = (log_files(directory)[-1], log_files(directory)[-1].stat().st_size)   # after the start record
    follower = threading.Thread(target=follow_records, args=(directory, False, out),
                                kwargs={"start": start, "poll": 0.01, "stop": stop.is_set})
    follower.start()
    try:
        for n in range(12):
            audit.record(decision(n))
        deadline = time.monotonic() + 5
        while out.getvalue().count("\n") < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        stop.set()
        follower.join(timeout=5)
    assert not follower.is_alive()
    assert len(log_files(directory)) >= 3
    seqs = [line.split("  ")[1] for line in out.getvalue().splitlines()]
    assert seqs == [f"#{n}" for n in range(2, 14)]
