"""Faults under a running agent: the TPM going away and coming back, or staying away.

The agent's swtpm is killed with SIGKILL (a crashed simulator, a pulled device, tpm2-abrmd dying);
restarting it is a reboot of the TPM, so the same boot is measured into it again, as firmware would.
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.interop.conftest import DEADLINE, RunningAgent, running_agent
from vouchd.agent.admin import admin_request

pytestmark = pytest.mark.interop

ROOT_ID = "spiffe://example.org/user/root"


def fetch(agent: RunningAgent, uid: int | None = None) -> str:
    """What a fresh FetchX509SVID gets, as `uid`: the SPIFFE IDs, or the gRPC status name."""
    drop = f"os.setgroups([]); os.setgid({uid}); os.setuid({uid})" if uid is not None else ""
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import os
        import grpc
        from spiffe._proto import workload_pb2, workload_pb2_grpc
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel("unix:{agent.socket}"))
        {drop}
        try:
            response = next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(),
                                               metadata=[("workload.spiffe.io", "true")], timeout=10))
            print(",".join(sorted(s.spiffe_id for s in response.svids)))
        except grpc.RpcError as err:
            print(err.code().name)
    """)], capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def wait_for(condition: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"never happened: {what}")
        time.sleep(0.2)


def tpm_state(agent: RunningAgent) -> dict[str, Any]:
    status = agent.status()
    tpm = status["tpm"]
    assert isinstance(tpm, dict)
    return tpm


class NotifySocket:
    """A stand-in for systemd's notify socket: records every sd_notify datagram with its time."""

    def __init__(self) -> None:
        self._folder = tempfile.TemporaryDirectory(prefix="vouchd-notify-")
        self.path = Path(self._folder.name) / "notify.sock"
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(self.path))
        self._socket.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._receive, daemon=True)
        self._thread.start()

    def _receive(self) -> None:
        while not self._stop.is_set():
            try:
                data = self._socket.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def since(self, moment: float, prefix: str) -> list[str]:
        return [text for at, text in list(self.messages) if at >= moment and text.startswith(prefix)]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self._socket.close()
        self._folder.cleanup()


@pytest.fixture
def notify_socket() -> Iterator[NotifySocket]:
    receiver = NotifySocket()
    yield receiver
    receiver.close()


@pytest.fixture
def agent(tmp_path_factory: pytest.TempPathFactory, notify_socket: NotifySocket) -> Iterator[RunningAgent]:
    # A 2 s watchdog (pings every second) and a 2 s heartbeat, so that recovery shows quickly.
    with running_agent(tmp_path_factory.mktemp("faults"), attestation_interval="2s", tpm_unreachable_limit="120s",
                       environment={"NOTIFY_SOCKET": str(notify_socket.path), "WATCHDOG_USEC": "2000000"}) as agent:
        yield agent


def test_a_tpm_that_goes_away_and_comes_back(agent: RunningAgent, notify_socket: NotifySocket) -> None:
    assert fetch(agent) == ROOT_ID
    assert agent.healthcheck().returncode == 0

    agent.tpm.kill()
    wait_for(lambda: tpm_state(agent)["state"] == "unreachable", "status says the TPM is unreachable")
    lost_at = time.monotonic()
    reason = tpm_state(agent)["reason"]
    assert reason.startswith(f"TPM unreachable at {agent.tpm.tcti}: "), reason
    health = agent.healthcheck()
    assert health.returncode == 1 and "TPM unreachable at" in health.stderr
    assert fetch(agent) == ROOT_ID, "the cached SVID is still served"
    asyncio.run(admin_request(agent.admin_socket, "entry.create",
                              {"spiffe_id": "spiffe://example.org/late", "selectors": ["unix:uid:4545"]},
                              timeout=DEADLINE))
    assert fetch(agent, uid=4545) == "PERMISSION_DENIED", "nothing is issued without the TPM"
    time.sleep(3)  # three watchdog intervals
    assert notify_socket.since(lost_at + 1.5, "WATCHDOG=1") == [], "the watchdog stops while the TPM is away"
    assert any(f"STATUS=TPM unreachable at {agent.tpm.tcti}" in text
               for _, text in notify_socket.messages), "systemd's STATUS= names the TPM, not the authority"
    assert agent.status()["node"]["authority_link"] == "ok"  # type: ignore[index]

    agent.tpm.restart()
    agent.simulate_boot()
    back_at = time.monotonic()
    wait_for(lambda: fetch(agent, uid=4545) == "spiffe://example.org/late", "issuance after the TPM is back")
    assert tpm_state(agent)["state"] == "ok"
    wait_for(lambda: agent.healthcheck().returncode == 0, "healthy again")
    wait_for(lambda: bool(notify_socket.since(back_at, "WATCHDOG=1")), "the watchdog pings again")
    assert agent.process.poll() is None


@pytest.fixture
def impatient_agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("tpm-gone"), tpm_unreachable_limit="3s") as agent:
        yield agent


def test_a_tpm_that_stays_away_past_the_limit_makes_the_agent_exit_non_zero(impatient_agent: RunningAgent) -> None:
    impatient_agent.tpm.kill()

    code = impatient_agent.process.wait(timeout=DEADLINE)

    assert code != 0
    log = impatient_agent.log.read_text()
    assert "unreachable for more than 3 s (agent.tpm.unreachable_limit), exiting" in log
    assert not impatient_agent.socket.exists() and not impatient_agent.admin_socket.exists()
