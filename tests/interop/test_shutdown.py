"""SIGTERM stops the agent within a bound, even with 100 open streams and a TPM that stopped
answering in the middle of an operation, and leaves no socket behind."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import DEADLINE, VOUCHD, RunningAgent, StreamWatch, running_agent

pytestmark = pytest.mark.interop

# The agent's own bounds: the audit log's last anchor (5 s) and the TPM's close (5 s), well inside
# systemd's TimeoutStopSec=30s.
STOP_BOUND = 15.0


@pytest.fixture
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("shutdown")) as agent:
        yield agent


def test_sigterm_with_open_streams_and_a_stuck_tpm_exits_within_the_bound(agent: RunningAgent) -> None:
    watch = StreamWatch(agent.socket, 100)
    stuck: subprocess.Popen[bytes] | None = None
    try:
        watch.wait_until(lambda w: w.all_hold(["spiffe://example.org/user/root"]), "100 streams open and served")
        os.kill(agent.tpm.process.pid, signal.SIGSTOP)  # the TPM stops answering, mid-whatever comes next
        stuck = subprocess.Popen([*VOUCHD, "tpm", "info", "--admin-socket", str(agent.admin_socket)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # the admin command's TPM operation is under way on the owner thread (it cannot finish)
        assert stuck.poll() is None, "the TPM operation is stuck"

        started = time.monotonic()
        agent.process.send_signal(signal.SIGTERM)
        agent.process.wait(timeout=DEADLINE)
        took = time.monotonic() - started

        assert took < STOP_BOUND, f"stopped in {took:.1f} s"
        assert agent.process.returncode == 0
        assert not Path(agent.socket).exists() and not Path(agent.admin_socket).exists(), "no socket left behind"
        assert "the tpm did not finish its operations in time" in agent.log.read_text()
    finally:
        os.kill(agent.tpm.process.pid, signal.SIGCONT)
        watch.close()
        if stuck is not None:
            stuck.kill()
            stuck.wait(timeout=DEADLINE)
