"""kill -9 of the agent at bad moments: what it held must still be there when it starts again.

The swtpm keeps running (the host did not reboot); only the agent process dies, with no chance to
clean up: sockets stay on disk, a database transaction may be in flight, SVIDs may be mid-issuance.
"""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import pytest

from tests.interop.conftest import DEADLINE, RunningAgent, StreamWatch, running_agent
from vouchd.agent.admin import AdminClientError, admin_request

pytestmark = pytest.mark.interop

ROOT_ID = "spiffe://example.org/user/root"


@pytest.fixture
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("crashes")) as agent:
        yield agent


def fetch_ids(agent: RunningAgent) -> list[str]:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import grpc
        from spiffe._proto import workload_pb2, workload_pb2_grpc
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel("unix:{agent.socket}"))
        response = next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(),
                                           metadata=[("workload.spiffe.io", "true")], timeout=20))
        print("\\n".join(sorted(s.spiffe_id for s in response.svids)))
    """)], capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def database_is_intact(agent: RunningAgent) -> None:
    with sqlite3.connect(agent.config.parent / "authority" / "authority.db") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)


def test_kill_9_during_a_burst_of_issuances_loses_no_entry_and_keeps_the_node(agent: RunningAgent) -> None:
    node_before = agent.status()["node"]["id"]  # type: ignore[index]
    acknowledged: list[str] = []

    async def create_many() -> None:
        for n in range(200):
            try:
                entry = await admin_request(agent.admin_socket, "entry.create",
                                            {"spiffe_id": f"spiffe://example.org/burst/{n}",
                                             "selectors": ["unix:uid:0"]}, timeout=DEADLINE)
            except (AdminClientError, OSError):
                return  # the agent is gone
            acknowledged.append(entry["spiffe_id"])

    creator = threading.Thread(target=lambda: asyncio.run(create_many()))
    creator.start()
    while len(acknowledged) < 20:  # issuance under way: the root caller's fetch below asks for them all
        creator.join(timeout=0.05)
    fetcher = threading.Thread(target=lambda: subprocess.run(
        [sys.executable, "-c", f"import grpc\nfrom spiffe import WorkloadApiClient\n"
                               f"WorkloadApiClient(socket_path='unix:{agent.socket}').fetch_x509_svid()"],
        capture_output=True, timeout=DEADLINE, check=False))
    fetcher.start()
    agent.kill()
    creator.join(timeout=DEADLINE)
    fetcher.join(timeout=DEADLINE)
    assert 20 <= len(acknowledged) < 200, "the kill must land in the middle of the burst"

    database_is_intact(agent)
    agent.start()

    assert agent.status()["node"]["id"] == node_before  # type: ignore[index]
    listed = {e["spiffe_id"] for e in asyncio.run(admin_request(agent.admin_socket, "entry.list", timeout=DEADLINE))}
    assert set(acknowledged) <= listed, "every entry whose creation was acknowledged survives"
    served = fetch_ids(agent)
    assert ROOT_ID in served and set(acknowledged) <= set(served)


def test_kill_9_with_500_open_streams_leaves_nothing_that_blocks_the_restart(agent: RunningAgent) -> None:
    streams = StreamWatch(agent.socket, 500)
    try:
        streams.wait_until(lambda s: s.all_hold([ROOT_ID]), "the root identity on 500 streams", timeout=120)

        agent.kill()
        streams.wait_until(lambda s: len(s.ended) == 500, "every stream's end")
        assert set(streams.ended.values()) == {"UNAVAILABLE"}
        assert agent.socket.exists() and agent.admin_socket.exists(), "a killed agent cannot remove its sockets"

        agent.start()  # finds the sockets dead, removes them and binds anew

        assert fetch_ids(agent) == [ROOT_ID]
        assert agent.healthcheck().returncode == 0
    finally:
        streams.close()
