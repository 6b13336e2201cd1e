"""`vouchd status` run by a user the running agent's admin socket does not answer (`nobody`)."""

from __future__ import annotations

import pwd
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.interop.conftest import DEADLINE, VOUCHD, RunningAgent, running_agent

pytestmark = pytest.mark.interop

NOBODY = 65534


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("admin-other-user")) as agent:
        yield agent


def as_nobody(agent: RunningAgent, *args: str) -> subprocess.CompletedProcess[str]:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is not on PATH: it runs the command as another uid")
    return subprocess.run([setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *VOUCHD, *args,
                           "--admin-socket", str(agent.admin_socket)],
                          capture_output=True, text=True, timeout=DEADLINE, check=False)


def test_status_as_nobody_says_only_root_or_the_agents_user_may_ask(agent: RunningAgent) -> None:
    expected = (f"vouchd: only root or the agent's user (root) may ask the agent through its admin socket "
                f"{agent.admin_socket}; this command runs as uid {NOBODY} ({pwd.getpwuid(NOBODY).pw_name}): "
                "run it with sudo\n")

    status = as_nobody(agent, "status")
    entries = as_nobody(agent, "entry", "list")
    agent.admin_socket.chmod(0o666)  # the mode no longer keeps nobody out: the agent closes unanswered
    try:
        widened = as_nobody(agent, "status")
    finally:
        agent.admin_socket.chmod(0o600)

    assert (status.returncode, status.stdout, status.stderr) == (1, "", expected)
    assert (entries.returncode, entries.stderr) == (1, expected)
    assert (widened.returncode, widened.stdout, widened.stderr) == (1, "", expected)
    assert "admin connection refused: not root or the daemon's user" in agent.log.read_text()
    assert agent.status()["trust_domain"] == "example.org"  # root is still answered
