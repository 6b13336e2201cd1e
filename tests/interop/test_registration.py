"""Registration and revocation at run time, against a running standalone agent and real streams.

Entries are created and deleted over the admin socket while FetchX509SVID streams (grpcio clients
in another process, see stream_watch.py) are open; what the streams receive is the test.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.interop.conftest import DEADLINE, VOUCHD, RunningAgent, StreamWatch, running_agent
from vouchd.agent.admin import admin_request

pytestmark = pytest.mark.interop

ROOT_ID = "spiffe://example.org/user/root"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("registration")) as agent:
        yield agent


def admin(agent: RunningAgent, command: str, args: dict[str, Any] | None = None) -> Any:
    return asyncio.run(admin_request(agent.admin_socket, command, args, timeout=DEADLINE))


def vouchd(agent: RunningAgent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VOUCHD, *args, "--admin-socket", str(agent.admin_socket)], capture_output=True,
                          text=True, timeout=DEADLINE, check=False)


def test_an_entry_created_at_run_time_reaches_an_open_stream_and_its_deletion_leaves_it(
        agent: RunningAgent, watch: Callable[..., StreamWatch]) -> None:
    streams = watch(2)
    streams.wait_until(lambda s: s.all_hold([ROOT_ID]), "the root identity on both streams")

    created = vouchd(agent, "entry", "create", "--spiffe-id", "spiffe://example.org/batch",
                     "--selector", "unix:uid:0", "--selector", "unix:user:root", "--json")
    assert created.returncode == 0, created.stderr
    entry = json.loads(created.stdout)
    streams.wait_until(lambda s: s.all_hold([ROOT_ID, "spiffe://example.org/batch"]), "the new identity")

    listed = json.loads(vouchd(agent, "entry", "list", "--json").stdout)
    assert entry["id"] in [e["id"] for e in listed]
    deleted = vouchd(agent, "entry", "delete", entry["id"])
    assert deleted.returncode == 0, deleted.stderr
    streams.wait_until(lambda s: s.all_hold([ROOT_ID]), "the deleted identity gone")
    assert streams.ended == {}
    assert entry["id"] not in [e["id"] for e in json.loads(vouchd(agent, "entry", "list", "--json").stdout)]


def test_deleting_a_callers_last_entry_ends_its_stream_with_permission_denied(
        agent: RunningAgent, watch: Callable[..., StreamWatch]) -> None:
    entry = admin(agent, "entry.create", {"spiffe_id": "spiffe://example.org/only-4343",
                                          "selectors": ["unix:uid:4343"]})
    streams = watch(1, uid=4343)
    streams.wait_until(lambda s: s.all_hold(["spiffe://example.org/only-4343"]), "the uid's identity")

    admin(agent, "entry.delete", {"id": entry["id"]})
    streams.wait_until(lambda s: 0 in s.ended, "the stream's end")
    assert streams.ended[0] == "PERMISSION_DENIED"


def test_a_caller_without_an_entry_is_served_once_one_is_created(
        agent: RunningAgent, watch: Callable[..., StreamWatch]) -> None:
    refused = watch(1, uid=4444)
    refused.wait_until(lambda s: 0 in s.ended, "the refusal")
    assert refused.ended[0] == "PERMISSION_DENIED"

    admin(agent, "entry.create", {"spiffe_id": "spiffe://example.org/late-4444", "selectors": ["unix:uid:4444"]})
    # The command returns once the local agent has the entry: the very next fetch is served.
    served = watch(1, uid=4444)
    served.wait_until(lambda s: s.all_hold(["spiffe://example.org/late-4444"]), "the new identity", timeout=10)


def test_a_misspelt_selector_is_refused_naming_it(agent: RunningAgent) -> None:
    result = vouchd(agent, "entry", "create", "--spiffe-id", "spiffe://example.org/typo", "--selector", "unix:uidd:0")
    assert result.returncode == 1
    assert "unix:uidd" in result.stderr
    assert "kernel-anchored" not in result.stderr


def test_100_creates_and_100_deletes_with_50_open_streams_lose_no_update(
        agent: RunningAgent, watch: Callable[..., StreamWatch]) -> None:
    streams = watch(50)
    streams.wait_until(lambda s: s.all_hold([ROOT_ID]), "the root identity on 50 streams")
    spiffe_ids = [f"spiffe://example.org/load/{n}" for n in range(100)]

    async def create_then_delete() -> list[str]:
        created = []
        for spiffe_id in spiffe_ids:
            entry = await admin_request(agent.admin_socket, "entry.create",
                                        {"spiffe_id": spiffe_id, "selectors": ["unix:uid:0"]}, timeout=DEADLINE)
            created.append(entry["id"])
        return created

    ids = asyncio.run(create_then_delete())
    streams.wait_until(lambda s: s.all_hold([ROOT_ID, *spiffe_ids]), "all 100 new identities on every stream",
                       timeout=120)

    async def delete_all() -> None:
        for entry_id in ids:
            await admin_request(agent.admin_socket, "entry.delete", {"id": entry_id}, timeout=DEADLINE)

    asyncio.run(delete_all())
    streams.wait_until(lambda s: s.all_hold([ROOT_ID]), "only the root identity on every stream", timeout=120)
    assert streams.ended == {}, "no stream may end or fail"
