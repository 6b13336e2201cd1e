"""A full disk under the state folder: what needs a write is refused by name, and recovers.

The agent's and the authority's state live on a small tmpfs of the test's own, filled with a file
until the kernel says ENOSPC; the swtpm's state stays elsewhere (a TPM has its own NVRAM). The audit
log lives there too (<state_dir>/audit): no identity is handed out without its record, so once a
record cannot be written, not even what the agent holds is served; `vouchd status` says why.
"""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import DEADLINE, VOUCHD, RunningAgent, running_agent
from tests.interop.test_faults import fetch, wait_for
from vouchd.agent.admin import AdminClientError, admin_request

pytestmark = pytest.mark.interop

ROOT_ID = "spiffe://example.org/user/root"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "state"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "vouchd-test-full", str(mount)],
                   check=True, capture_output=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "--lazy", str(mount)], check=False, capture_output=True)


@pytest.fixture
def agent(tmp_path_factory: pytest.TempPathFactory, small_disk: Path) -> Iterator[RunningAgent]:
    # A node whose exchange with the authority failed is unconfirmed and gets no new SVID until its
    # next exchange succeeds: a 5 s attestation interval makes that soon after the disk has room.
    with running_agent(tmp_path_factory.mktemp("full-disk"), state=small_disk, attestation_interval="5s",
                       extra_entries=[("spiffe://example.org/waiting", "unix:uid:4646")]) as agent:
        yield agent


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    with filler.open("wb") as sink:
        try:
            while True:
                sink.write(b"\0" * 65536)
                sink.flush()
        except OSError as err:
            assert err.errno == errno.ENOSPC
    return filler


def create(agent: RunningAgent, name: str) -> object:
    return asyncio.run(admin_request(agent.admin_socket, "entry.create",
                                     {"spiffe_id": f"spiffe://example.org/{name}", "selectors": ["unix:uid:4747"]},
                                     timeout=DEADLINE))


def audit_status(agent: RunningAgent) -> dict[str, object]:
    audit = agent.status()["audit"]
    assert isinstance(audit, dict)
    return audit


def test_a_full_disk_refuses_writes_by_name_hands_out_nothing_unrecorded_and_recovers(agent: RunningAgent,
                                                                                      small_disk: Path) -> None:
    assert fetch(agent) == ROOT_ID
    audit_file = small_disk / "agent" / "audit" / "audit-000001.jsonl"
    assert agent.status()["audit_log"] == str(audit_file)
    filler = fill(small_disk)

    # Small writes may still fit in pages SQLite already has; the first that needs room is refused.
    with pytest.raises(AdminClientError) as refused:
        for n in range(500):
            create(agent, f"while-full/{n}")
    assert "authority.db: cannot create entry" in str(refused.value)
    assert "database or disk is full" in str(refused.value)
    # No audit record has failed yet (creating an entry is not one): the SVID cache asks the authority,
    # which cannot write its state.
    assert fetch(agent, uid=4646) == "PERMISSION_DENIED", "issuance needs the authority to write"
    node = agent.status()["node"]
    assert isinstance(node, dict)
    assert "(storage): the authority cannot write its state" in str(node["authority_link"])
    assert "database or disk is full" in str(node["authority_link"])

    # A record may still fit in the audit file's last page; the first that does not is refused, and
    # with it the answer it records: the workload gets nothing, not even the SVID the agent holds.
    answers = []
    for _ in range(20):
        answers.append(fetch(agent))
        if answers[-1] == "UNAVAILABLE" and audit_status(agent)["failure"] is not None:
            break
    assert answers[-1] == "UNAVAILABLE", f"no issuance without its record: {answers}"
    assert set(answers) <= {ROOT_ID, "UNAVAILABLE"}
    failure = str(audit_status(agent)["failure"])
    assert failure.startswith(f"cannot write audit record to {audit_file}: No space left on device"), failure
    assert fetch(agent) == "UNAVAILABLE", "still nothing while the log cannot be written"
    assert fetch(agent, uid=4646) == "PERMISSION_DENIED", "nor anything new"
    assert str(audit_status(agent)["failure"]).startswith(f"cannot write audit record to {audit_file}: ")

    filler.unlink()

    # The next record written clears the failure (the request it records may still be refused).
    wait_for(lambda: fetch(agent) == ROOT_ID, "the held SVID served once its record can be written")
    assert audit_status(agent)["failure"] is None
    wait_for(lambda: fetch(agent, uid=4646) == "spiffe://example.org/waiting", "issuance once there is room")
    create(agent, "after")
    with sqlite3.connect(small_disk / "authority" / "authority.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    for key_file in (small_disk / "agent" / "tpm").iterdir():
        assert key_file.stat().st_size > 0, f"{key_file} is whole"
    assert not list(small_disk.rglob("*.tmp")), "no temporary file is left half-written"
    # No record was torn by the full disk: the log verifies, end to end.
    verified = subprocess.run([*VOUCHD, "audit", "verify", str(audit_file.parent), "--state-dir",
                               str(small_disk / "agent")], capture_output=True, text=True, timeout=DEADLINE,
                              check=False)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "result     OK" in verified.stdout and "partial" not in verified.stdout
    assert agent.process.poll() is None
