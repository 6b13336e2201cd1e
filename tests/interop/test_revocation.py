"""Node-wide revocation on a running standalone agent: a ban, and a boot profile withdrawn.

Each test has an agent of its own: what it revokes is the agent's own node.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable, Iterator

import pytest

from tests.interop.conftest import DEADLINE, VOUCHD, RunningAgent, StreamWatch, running_agent
from tests.interop.test_registration import ROOT_ID

pytestmark = pytest.mark.interop


@pytest.fixture
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("revocation")) as agent:
        yield agent


def vouchd(agent: RunningAgent, *args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([*VOUCHD, *args, "--admin-socket", str(agent.admin_socket)], capture_output=True,
                            text=True, timeout=DEADLINE, check=False)
    assert result.returncode == 0, result.stderr
    return result


def fetch(agent: RunningAgent) -> str:
    """What a fresh py-spiffe fetch gets: the SPIFFE ID, or the gRPC status name."""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import grpc
        from spiffe import WorkloadApiClient
        try:
            print(WorkloadApiClient().fetch_x509_svid().spiffe_id)
        except Exception as err:
            cause = err.__cause__ or err.__context__
            print(cause.code().name if isinstance(cause, grpc.RpcError) else type(err).__name__)
    """)], env=agent.client_env(), capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def node_id(agent: RunningAgent) -> str:
    listing = json.loads(vouchd(agent, "node", "list", "--json").stdout)
    (node,) = listing["nodes"]
    return str(node["node_id"])


def test_a_banned_node_issues_nothing_more_until_unbanned(agent: RunningAgent,
                                                          watch: Callable[..., StreamWatch]) -> None:
    streams = watch(1)
    streams.wait_until(lambda s: s.all_hold([ROOT_ID]), "the root identity")
    node = node_id(agent)

    vouchd(agent, "node", "ban", node, "--reason", "stolen disk")
    streams.wait_until(lambda s: 0 in s.ended, "the stream's end")
    assert streams.ended[0] == "PERMISSION_DENIED"
    assert fetch(agent) == "PERMISSION_DENIED"
    status = agent.status()
    assert status["svids"] == []
    assert isinstance(status["node"], dict) and status["node"]["state"] == "banned"
    shown = json.loads(vouchd(agent, "node", "show", node, "--json").stdout)
    assert shown["state"] == "banned"

    vouchd(agent, "node", "unban", node)
    assert fetch(agent) == ROOT_ID


def test_a_removed_boot_profile_makes_the_nodes_next_attestation_fail(
        agent: RunningAgent, watch: Callable[..., StreamWatch]) -> None:
    streams = watch(1)
    streams.wait_until(lambda s: s.all_hold([ROOT_ID]), "the root identity")
    (profile,) = json.loads(vouchd(agent, "profile", "list", "--json").stdout)
    assert profile["nodes"] == [node_id(agent)]

    vouchd(agent, "profile", "remove", profile["name"])
    streams.wait_until(lambda s: 0 in s.ended, "the stream's end")
    assert streams.ended[0] == "PERMISSION_DENIED"
    assert fetch(agent) == "PERMISSION_DENIED"
    assert json.loads(vouchd(agent, "profile", "list", "--json").stdout) == []
    node = agent.status()["node"]
    assert isinstance(node, dict)
    assert "outside every accepted profile" in str(node["authority_link"])
