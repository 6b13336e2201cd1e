"""The audit log of a real `vouchd agent --standalone` on a swtpm, checked by `vouchd audit verify`.

One run with every kind of decision (issuance, a denial, a rotation, a revocation) is stopped
cleanly and its log verified, then tampered with in copies; an agent killed with SIGKILL in the
middle of a burst of issuances leaves a log that verifies and continues the chain when it starts
again; `vouchd status` names the file being written.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.interop.conftest import DEADLINE, VOUCHD, RunningAgent, StreamWatch, running_agent
from tests.interop.test_faults import fetch
from vouchd.agent.admin import AdminClientError, admin_request

pytestmark = pytest.mark.interop

ROOT_ID = "spiffe://example.org/user/root"
EXTRA_ID = "spiffe://example.org/audit/extra"
STRANGER_UID = 4242  # no entry matches it
FILE = "audit-000001.jsonl"


# -- reading the log, and `vouchd audit verify` ---------------------------------------------------------


def log_lines(directory: Path) -> list[bytes]:
    """Every complete line of the log's files, oldest first (a partial last line left out)."""
    lines: list[bytes] = []
    for path in sorted(directory.glob("audit-*.jsonl")):
        data = path.read_bytes()
        lines += data[:data.rfind(b"\n") + 1].split(b"\n")[:-1]
    return lines


def log_records(directory: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log_lines(directory)]


def sha256_hex(line: bytes) -> str:
    return hashlib.sha256(line).hexdigest()


def wait_for_record(directory: Path, wanted: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    deadline = time.monotonic() + DEADLINE
    while True:
        found = [record for record in log_records(directory) if wanted(record)]
        if found:
            return found[0]
        if time.monotonic() > deadline:
            pytest.fail(f"no audit record for {what} in {DEADLINE:g} s")
        time.sleep(0.2)


@dataclass
class Verified:
    returncode: int
    text: str                   # the report an operator reads
    report: dict[str, Any]      # the same, --json

    @property
    def result(self) -> str:
        (line,) = [line for line in self.text.splitlines() if line.startswith("result")]
        return line.removeprefix("result").strip()


def audit_verify(directory: Path, state_dir: Path) -> Verified:
    """`vouchd audit verify DIR --state-dir STATE` (the AK is STATE/tpm/ak.pub), as text and as JSON."""
    runs = [subprocess.run([*VOUCHD, "audit", "verify", str(directory), "--state-dir", str(state_dir), *json_flag],
                           capture_output=True, text=True, timeout=DEADLINE, check=False)
            for json_flag in ([], ["--json"])]
    text, as_json = runs
    assert text.returncode == as_json.returncode, (text.stdout, as_json.stdout)
    assert text.stderr == "", text.stderr
    return Verified(text.returncode, text.stdout, json.loads(as_json.stdout))


def vouchd(agent: RunningAgent, *args: str) -> str:
    result = subprocess.run([*VOUCHD, *args, "--admin-socket", str(agent.admin_socket)], capture_output=True,
                            text=True, timeout=DEADLINE, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def stop(agent: RunningAgent) -> None:
    """A clean stop (SIGTERM): the agent anchors what is unanchored before it exits."""
    agent.process.send_signal(signal.SIGTERM)
    assert agent.process.wait(timeout=DEADLINE) == 0, agent.log.read_text()[-3000:]


# -- one run with every kind of decision, stopped cleanly -------------------------------------------------


@dataclass
class AuditedRun:
    directory: Path             # <state_dir>/audit
    state_dir: Path             # the agent's state folder: its tpm/ak.pub checks the anchors
    unanchored_at_stop: int     # records the clean stop had to anchor


@pytest.fixture(scope="module")
def audited_run(tmp_path_factory: pytest.TempPathFactory) -> AuditedRun:
    base = tmp_path_factory.mktemp("audit")
    # 6 s X.509-SVIDs rotate every few seconds; an anchor at least every 5 records.
    with running_agent(base, x509_svid_ttl="6s", audit_anchor_every=5) as agent:
        directory = base / "agent" / "audit"
        assert fetch(agent) == ROOT_ID
        assert fetch(agent, uid=STRANGER_UID) == "PERMISSION_DENIED"

        streams = StreamWatch(agent.socket, 1)
        try:
            streams.wait_until(lambda s: s.all_hold([ROOT_ID]), "the root identity")
            entry = json.loads(vouchd(agent, "entry", "create", "--spiffe-id", EXTRA_ID, "--selector", "unix:uid:0",
                                      "--json"))
            streams.wait_until(lambda s: s.all_hold([ROOT_ID, EXTRA_ID]), "the new entry's identity on the stream")
            vouchd(agent, "entry", "delete", entry["id"])
            streams.wait_until(lambda s: s.all_hold([ROOT_ID]), "the deleted entry's identity withdrawn")
        finally:
            streams.close()
        wait_for_record(directory, lambda r: r["kind"] == "rotate", "a rotation")

        # Leave something for the clean stop to anchor.
        for _ in range(10):
            audit = agent.status()["audit"]
            assert isinstance(audit, dict)
            unanchored = int(audit["unanchored"])
            if unanchored:
                break
            assert fetch(agent) == ROOT_ID
        stop(agent)
    return AuditedRun(directory, base / "agent", unanchored)


def test_a_log_with_every_kind_of_decision_verifies_with_the_ak(audited_run: AuditedRun) -> None:
    verified = audit_verify(audited_run.directory, audited_run.state_dir)

    assert verified.returncode == 0, verified.text
    assert verified.result == "OK"
    lines = log_lines(audited_run.directory)
    records = log_records(audited_run.directory)
    anchors = [record for record in records if record["kind"] == "anchor"]
    report = verified.report
    assert report["ok"] and report["problem"] is None and report["partial_tail"] is None
    assert report["anchors_checked"], "the anchors were checked with the AK, not only for their shape"
    assert report["anchors"] == len(anchors) >= 3, "every anchor verified"
    assert f"anchors    {len(anchors)} (verified with the AK)" in verified.text
    assert (report["records"], report["first_seq"], report["last_seq"]) == (len(lines), 1, len(lines))
    assert report["from_genesis"]
    assert report["files"] == [str(audited_run.directory / FILE)]

    # The clean stop anchored everything: the last record is an anchor over the one before it.
    assert audited_run.unanchored_at_stop > 0
    assert records[-1]["kind"] == "anchor" and records[-1]["covers"] == records[-1]["seq"] - 1
    assert report["anchored_through"] == len(lines) - 1 and report["unanchored"] == 0

    # The chain, recomputed here rather than taken from the verifier.
    assert [record["seq"] for record in records] == list(range(1, len(records) + 1))
    assert records[0]["prev"] == "0" * 64 and records[0]["kind"] == "start"
    for index in range(1, len(lines)):
        assert records[index]["prev"] == sha256_hex(lines[index - 1]), f"seq {index + 1}"

    # Every kind of decision is there, with what it was decided on.
    def one(what: str, wanted: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
        found = [record for record in records if wanted(record)]
        assert found, f"no record of {what}"
        return found[0]

    def kind(record: dict[str, Any]) -> tuple[object, ...]:
        return record["kind"], record.get("source"), record.get("outcome")

    issued = one("the Workload API handing out the root SVID", lambda r: kind(r) == ("issue", "workload_api", "ok"))
    assert (issued["method"], issued["spiffe_ids"], issued["caller"]["uid"]) == ("FetchX509SVID", [ROOT_ID], 0)
    assert "unix:uid:0" in issued["caller"]["selectors"]
    denied = one("the stranger's denial", lambda r: kind(r) == ("deny", "workload_api", "denied")
                 and r["caller"]["uid"] == STRANGER_UID)
    assert ["code", "no_identity"] in denied["details"] and denied["reason"]
    rotated = one("a rotation", lambda r: kind(r) == ("rotate", "svid_cache", "ok"))
    assert rotated["spiffe_ids"] == [ROOT_ID]
    assert rotated["details"][0][0] == "previous_serial" and rotated["svid_serials"]
    one("the SVID cache issuing the new entry's SVID",
        lambda r: kind(r) == ("issue", "svid_cache", "ok") and r["spiffe_ids"] == [EXTRA_ID])
    deleted = one("the entry's deletion", lambda r: kind(r) == ("revoke", "authority", "ok"))
    assert deleted["spiffe_ids"] == [EXTRA_ID]
    withdrawn = one("the SVID withdrawn from the cache", lambda r: kind(r) == ("revoke", "svid_cache", "ok"))
    assert withdrawn["spiffe_ids"] == [EXTRA_ID] and withdrawn["svid_serials"]
    one("the node's attestation", lambda r: kind(r) == ("attest", "authority", "ok"))


# -- tampering ---------------------------------------------------------------------------------------------


def rechained(lines: list[bytes], start: int) -> list[bytes]:
    """`lines` with every prev from `start` on recomputed: a forger who rewrites the chain after an edit."""
    fixed = list(lines)
    for index in range(start, len(fixed)):
        record = json.loads(fixed[index])
        record["prev"] = sha256_hex(fixed[index - 1])
        fixed[index] = json.dumps(record, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    return fixed


def one_byte_edit(line: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and sum(a != b for a, b in zip(old, new, strict=True)) == 1
    assert old in line
    return line.replace(old, new, 1)


def edit_signature(line: bytes) -> bytes:
    """One base64 character of an anchor's quote signature changed to another."""
    at = line.index(b'"signature":"') + len(b'"signature":"') + 40
    return line[:at] + (b"B" if line[at:at + 1] != b"B" else b"C") + line[at + 1:]


@pytest.mark.parametrize("tampering", ["one-byte-edit", "deleted-line", "swapped-lines", "edit-and-rechain",
                                       "edited-last-anchor"])
def test_a_tampered_copy_fails_naming_the_record(audited_run: AuditedRun, tmp_path: Path, tampering: str) -> None:
    copy = tmp_path / "audit"
    shutil.copytree(audited_run.directory, copy)
    lines = log_lines(copy)
    records = [json.loads(line) for line in lines]
    # The stranger's denial: a record in the middle of the log, anchored after it.
    target = next(i for i, r in enumerate(records) if r["kind"] == "deny" and r["caller"]["uid"] == STRANGER_UID)
    seq = records[target]["seq"]
    line = target + 1   # as the verifier counts lines: from 1
    if tampering == "one-byte-edit":
        lines[target] = one_byte_edit(lines[target], f'"uid":{STRANGER_UID}'.encode(), b'"uid":4243')
        expected = f"{FILE} line {line} (seq {seq}): record was changed: the next record's prev does not match it"
        bad = (line, seq)
    elif tampering == "deleted-line":
        del lines[target]
        expected = f"{FILE} line {line} (seq {seq + 1}): seq {seq + 1} follows {seq - 1}"
        bad = (line, seq + 1)
    elif tampering == "swapped-lines":
        lines[target], lines[target + 1] = lines[target + 1], lines[target]
        expected = f"{FILE} line {line} (seq {seq + 1}): seq {seq + 1} follows {seq - 1}"
        bad = (line, seq + 1)
    elif tampering == "edit-and-rechain":
        # The chain alone would not show it: the next anchor's quote signed the old chain head.
        lines[target] = one_byte_edit(lines[target], f'"uid":{STRANGER_UID}'.encode(), b'"uid":4243')
        lines = rechained(lines, target + 1)
        anchor = next(i for i, r in enumerate(records) if r["kind"] == "anchor" and r["covers"] >= seq)
        expected = (f"{FILE} line {anchor + 1} (seq {records[anchor]['seq']}): anchor quote extraData is not the "
                    "chain head it covers")
        bad = (anchor + 1, records[anchor]["seq"])
    else:
        # The last record has no successor whose prev would show the change: its quote does.
        assert records[-1]["kind"] == "anchor"
        lines[-1] = edit_signature(lines[-1])
        expected = f"{FILE} line {len(lines)} (seq {records[-1]['seq']}): anchor quote signature invalid"
        bad = (len(lines), records[-1]["seq"])
    (copy / FILE).write_bytes(b"".join(line + b"\n" for line in lines))

    verified = audit_verify(copy, audited_run.state_dir)

    assert verified.returncode == 1, verified.text
    assert verified.result.startswith(f"FAILED: {expected}"), verified.text
    problem = verified.report["problem"]
    assert (problem["file"], problem["line"], problem["seq"]) == (FILE, *bad)
    assert not verified.report["ok"]


# -- kill -9 in a burst, and the restart ---------------------------------------------------------------------


BURST_CLIENT = """
import threading
import grpc
from spiffe._proto import workload_pb2, workload_pb2_grpc

def fetch_until_the_agent_is_gone():
    while True:
        channel = grpc.insecure_channel("unix:{socket}", options=[("grpc.use_local_subchannel_pool", 1)])
        try:
            next(workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
                workload_pb2.X509SVIDRequest(), metadata=[("workload.spiffe.io", "true")], timeout=5))
        except grpc.RpcError as err:
            if err.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return
        finally:
            channel.close()

threads = [threading.Thread(target=fetch_until_the_agent_is_gone) for _ in range(16)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
"""


@pytest.fixture
def burst_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("audit-crash"), audit_anchor_every=20) as agent:
        yield agent


def test_kill_9_in_a_burst_leaves_a_log_that_verifies_and_the_restart_continues_its_chain(
    burst_agent: RunningAgent,
) -> None:
    agent = burst_agent
    state_dir = agent.config.parent / "agent"
    directory = state_dir / "audit"
    created: list[str] = []

    async def create_entries() -> None:
        # Each entry matches the fetching clients (uid 0): every fetch asks for every SVID so far.
        for n in range(300):
            try:
                await admin_request(agent.admin_socket, "entry.create",
                                    {"spiffe_id": f"spiffe://example.org/burst/{n}", "selectors": ["unix:uid:0"]},
                                    timeout=DEADLINE)
            except (AdminClientError, OSError):
                return  # the agent is gone
            created.append(str(n))

    fetchers = subprocess.Popen([sys.executable, "-c", textwrap.dedent(BURST_CLIENT.format(socket=agent.socket))],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    creator = threading.Thread(target=lambda: asyncio.run(create_entries()))
    creator.start()
    try:
        # Killed once both are under way: fetches answered, entries created and issued.
        deadline = time.monotonic() + DEADLINE
        while (len(log_lines(directory)) < 80 or len(created) < 10
               or not any(json.loads(line)["kind"] == "anchor" for line in log_lines(directory))):
            assert time.monotonic() < deadline, f"the burst never got going: {len(created)} entries created"
            time.sleep(0.01)
        agent.kill()
    finally:
        creator.join(timeout=DEADLINE)
        try:
            fetchers.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            fetchers.kill()
            fetchers.wait(timeout=DEADLINE)
    assert 0 < len(created) < 300, "the kill landed in the middle of the burst"
    before_kill = log_lines(directory)
    kinds = {(r["kind"], r["source"]) for r in map(json.loads, before_kill) if "source" in r}
    assert {("issue", "workload_api"), ("issue", "svid_cache"), ("issue", "authority")} <= kinds

    # What kill -9 leaves verifies: anchored up to the last anchor, the tail after it on the chain alone.
    after_kill = audit_verify(directory, state_dir)
    assert after_kill.returncode == 0, after_kill.text
    report = after_kill.report
    assert report["ok"] and report["anchors_checked"] and report["partial_tail"] is None
    assert report["records"] == report["last_seq"] == len(before_kill)
    last_anchor = max(i for i, line in enumerate(before_kill) if json.loads(line)["kind"] == "anchor")
    assert report["anchored_through"] == json.loads(before_kill[last_anchor])["covers"]
    assert report["unanchored"] == sum(1 for line in before_kill[report["anchored_through"]:]
                                       if json.loads(line)["kind"] != "anchor")

    # kill -9 cannot tear a write(); a power cut can: the first bytes of a record, no newline.
    torn = before_kill[-1][:150]
    with (directory / FILE).open("ab") as log:
        log.write(torn)
    with_torn_tail = audit_verify(directory, state_dir)
    assert with_torn_tail.returncode == 0, with_torn_tail.text
    assert with_torn_tail.report["partial_tail"] == {
        "file": FILE, "line": len(before_kill) + 1, "seq": None,
        "reason": f"partial last line ({len(torn)} bytes): dropped at next start"}
    assert with_torn_tail.report["records"] == len(before_kill), "the complete records still verify"

    agent.start()

    start = wait_for_record(directory, lambda r: r["kind"] == "start" and r["seq"] > 1, "the restart")
    assert start["seq"] == len(before_kill) + 1
    assert start["prev"] == sha256_hex(before_kill[-1]), "the chain goes on from the last complete record"
    assert (start["pid"], start["dropped_bytes"], start["dropped_from"]) == (agent.process.pid, len(torn), FILE)
    assert log_lines(directory)[:len(before_kill)] == before_kill, "nothing before the torn bytes changed"
    assert ROOT_ID in fetch(agent).split(","), "served again (with every burst entry)"
    stop(agent)

    whole = audit_verify(directory, state_dir)
    assert whole.returncode == 0, whole.text
    lines = log_lines(directory)
    assert (directory / FILE).read_bytes().endswith(b"\n")
    assert whole.report["records"] == whole.report["last_seq"] == len(lines) > len(before_kill) + 1
    assert whole.report["partial_tail"] is None and whole.report["unanchored"] == 0
    assert whole.report["anchored_through"] == len(lines) - 1, "the anchors since cover the tail the kill left"


# -- vouchd status -------------------------------------------------------------------------------------------


@pytest.fixture
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("audit-status")) as agent:
        yield agent


def audit_status(agent: RunningAgent) -> tuple[Path, dict[str, Any]]:
    status = agent.status()
    audit = status["audit"]
    assert isinstance(audit, dict) and isinstance(status["audit_log"], str)
    assert status["audit_log"] == audit["path"]
    return Path(status["audit_log"]), audit


def test_status_names_the_current_file_which_grows_with_each_request(agent: RunningAgent) -> None:
    path, audit = audit_status(agent)
    assert path == agent.config.parent / "agent" / "audit" / FILE
    assert path.is_file() and path.stat().st_mode & 0o777 == 0o600
    assert audit["failure"] is None and audit["records"] == len(log_lines(path.parent))

    for n in range(3):
        size, records = path.stat().st_size, audit["records"]
        client = subprocess.Popen([*VOUCHD, "api", "fetch", "x509", "--socket", f"unix:{agent.socket}"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stdout, stderr = client.communicate(timeout=DEADLINE)
        assert client.returncode == 0, stderr
        assert f"SPIFFE ID:     {ROOT_ID}" in stdout

        now_at, audit = audit_status(agent)
        assert now_at == path
        assert path.stat().st_size > size, f"request {n}: the file grew"
        assert audit["records"] > records
        (issued,) = [r for r in log_records(path.parent) if r.get("caller", {}).get("pid") == client.pid]
        assert (issued["kind"], issued["outcome"], issued["spiffe_ids"]) == ("issue", "ok", [ROOT_ID])
        assert path.read_bytes().endswith(b"\n")

    size = path.stat().st_size
    assert fetch(agent, uid=STRANGER_UID) == "PERMISSION_DENIED"
    assert path.stat().st_size > size, "a denial is a record too"
    tail = subprocess.run([*VOUCHD, "audit", "tail", "--dir", str(path.parent), "-n", "3"], capture_output=True,
                          text=True, timeout=DEADLINE, check=True)
    assert any("  deny  denied  workload_api  FetchX509SVID  pid " in line and f" uid {STRANGER_UID}  reason: " in line
               for line in tail.stdout.splitlines()), tail.stdout
