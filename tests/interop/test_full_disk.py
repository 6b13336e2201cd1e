"""A full disk under the state folder: what needs a write is refused by name, what is held is served.

The agent's and the authority's state live on a small tmpfs of the test's own, filled with a file
until the kernel says ENOSPC; the swtpm's state stays elsewhere (a TPM has its own NVRAM).
"""

from __future__ import annotations

import asyncio
import errno
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import DEADLINE, RunningAgent, running_agent
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
    with running_agent(tmp_path_factory.mktemp("full-disk"), state=small_disk,
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


def test_a_full_disk_refuses_writes_by_name_serves_what_is_held_and_recovers(agent: RunningAgent,
                                                                              small_disk: Path) -> None:
    assert fetch(agent) == ROOT_ID
    filler = fill(small_disk)

    # Small writes may still fit in pages SQLite already has; the first that needs room is refused.
    with pytest.raises(AdminClientError) as refused:
        for n in range(500):
            create(agent, f"while-full/{n}")
    assert "authority.db: cannot create entry" in str(refused.value)
    assert "database or disk is full" in str(refused.value)
    assert fetch(agent) == ROOT_ID, "what the agent holds is still served"
    assert fetch(agent, uid=4646) == "PERMISSION_DENIED", "issuance needs the authority to write"
    node = agent.status()["node"]
    assert isinstance(node, dict)
    assert "(storage): the authority cannot write its state" in str(node["authority_link"])
    assert "database or disk is full" in str(node["authority_link"])

    filler.unlink()

    wait_for(lambda: fetch(agent, uid=4646) == "spiffe://example.org/waiting", "issuance once there is room")
    create(agent, "after")
    with sqlite3.connect(small_disk / "authority" / "authority.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    for key_file in (small_disk / "agent" / "tpm").iterdir():
        assert key_file.stat().st_size > 0, f"{key_file} is whole"
    assert not list(small_disk.rglob("*.tmp")), "no temporary file is left half-written"
    assert agent.process.poll() is None
