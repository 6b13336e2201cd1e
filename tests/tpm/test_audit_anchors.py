"""Audit anchors quoted by a real AK (swtpm): they verify with the AK's public alone, a record edited
after anchoring fails, and a writer killed with SIGKILL mid-burst leaves a log that verifies up to its
last anchor and that a reopened writer continues."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.tpm.conftest import BootedTpm
from tests.unit.test_audit_log import decision
from vouchd.audit import AuditLog, TpmAnchorSigner, log_files, verify_log
from vouchd.audit.records import canonical_line
from vouchd.auditcli import add_audit_commands
from vouchd.tpm import TpmService

pytestmark = pytest.mark.tpm

REPO = Path(__file__).resolve().parents[2]

# The writer killed in the burst test: a real TPM signs its anchors, every 50 records.
_BURST_WRITER = """
import asyncio, sys
from pathlib import Path
from tests.unit.test_audit_log import decision
from vouchd.audit import AuditLog, TpmAnchorSigner
from vouchd.tpm import TpmService

async def main(tcti: str, state: Path) -> None:
    async with TpmService(tcti) as tpm:
        await tpm.ensure_node_keys(state / "tpm")
        audit = AuditLog.open(state / "audit", TpmAnchorSigner(tpm), anchor_every=50, max_file_bytes=64 * 1024)
        anchoring = asyncio.create_task(audit.run())
        n = 0
        while not anchoring.done():
            audit.record(decision(n))
            n += 1
            await asyncio.sleep(0)

asyncio.run(main(sys.argv[1], Path(sys.argv[2])))
"""


def ak_public(state: Path) -> bytes:
    return (state / "tpm" / "ak.pub").read_bytes()


async def test_anchors_quoted_by_the_ak_verify_and_edits_fail(tpm: TpmService, tmp_path: Path) -> None:
    state = tmp_path / "state"
    await tpm.ensure_node_keys(state / "tpm")
    audit = AuditLog.open(state / "audit", TpmAnchorSigner(tpm))
    for n in range(1, 8):
        audit.record(decision(n))
        if n in (3, 6):
            assert await audit.anchor()
    await audit.close()
    report = verify_log([state / "audit"], ak_public(state))
    assert report.ok and report.anchors_checked and report.anchors == 3
    assert report.last_seq is not None and report.anchored_through == report.last_seq - 1
    assert report.unanchored == 0
    anchor = json.loads((state / "audit" / "audit-000001.jsonl").read_bytes().split(b"\n")[4])
    assert anchor["kind"] == "anchor" and anchor["quote"]["pcrs"] == "sha256:0,1,2,3,4,5,6,7"

    parser = argparse.ArgumentParser()
    add_audit_commands(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["audit", "verify", "--state-dir", str(state), str(state / "audit")])
    assert args.handler(args) == 0

    # Another TPM key is not the AK: its public does not verify the anchors.
    other = verify_log([state / "audit"], (state / "tpm" / "node_key.pub").read_bytes())
    assert other.problem is not None and other.problem.seq == 5
    assert "signed by another AK (name " in other.problem.reason, "the quote names its signer: said so"
    assert other.problem.reason.startswith("anchor quote signature invalid: ")

    # A record edited after anchoring, by someone who rewrites every prev after it: the quote tells.
    path = state / "audit" / "audit-000001.jsonl"
    lines = path.read_bytes().split(b"\n")[:-1]
    lines[1] = lines[1].replace(b"w/1", b"w/X")
    for index in range(2, len(lines)):
        record = json.loads(lines[index])
        record["prev"] = hashlib.sha256(lines[index - 1]).hexdigest()
        lines[index] = canonical_line(record).rstrip(b"\n")
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    report = verify_log([state / "audit"], ak_public(state))
    assert report.problem is not None and (report.problem.line, report.problem.seq) == (5, 5)
    assert report.problem.reason == "anchor quote extraData is not the chain head it covers"
    assert report.anchored_through is None


async def test_a_writer_killed_mid_burst_leaves_a_log_that_verifies_and_goes_on(
        booted_tpm: BootedTpm, tmp_path: Path) -> None:
    state = tmp_path / "state"
    writer = subprocess.Popen([sys.executable, "-c", _BURST_WRITER, booted_tpm.tcti, str(state)], cwd=REPO,
                              stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while _anchors_written(state / "audit") < 3:
            assert writer.poll() is None, writer.stderr.read().decode() if writer.stderr else ""
            assert time.monotonic() < deadline, "the writer wrote no three anchors within 60 s"
            time.sleep(0.02)
        time.sleep(0.05)    # mid-burst, between anchors
        os.kill(writer.pid, signal.SIGKILL)
    finally:
        writer.kill()
        writer.wait(timeout=10)
        if writer.stderr:
            writer.stderr.close()
    assert len(log_files(state / "audit")) > 1   # rotation happened during the burst

    report = verify_log([state / "audit"], ak_public(state))
    assert report.ok and report.anchors >= 3 and report.anchored_through is not None
    assert report.covered == report.anchored_through
    killed_at = report.last_seq
    assert killed_at is not None

    async with TpmService(booted_tpm.tcti) as tpm:
        await tpm.ensure_node_keys(state / "tpm")
        audit = AuditLog.open(state / "audit", TpmAnchorSigner(tpm))
        assert audit.status()["records"] == killed_at + 1    # the start record continues the chain
        audit.record(decision(1))
        await audit.close()
    report = verify_log([state / "audit"], ak_public(state))
    assert report.ok and report.partial_tail is None and report.from_genesis
    assert report.records == killed_at + 3 and report.unanchored == 0


def _anchors_written(directory: Path) -> int:
    if not directory.is_dir():
        return 0
    return sum(path.read_bytes().count(b'"kind":"anchor"') for path in log_files(directory))
