"""`vouchd api ...`, the Workload API client, against a running agent, as a user types it."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import DEADLINE, VOUCHD, RunningAgent, running_agent

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("api-cli")) as agent:
        yield agent


def api(agent: RunningAgent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VOUCHD, "api", *args], env=agent.client_env(), capture_output=True, text=True,
                          timeout=DEADLINE, check=False)


def test_fetch_x509_writes_files_openssl_verifies(agent: RunningAgent, tmp_path: Path) -> None:
    result = api(agent, "fetch", "x509", "--write", str(tmp_path))

    assert result.returncode == 0, result.stderr
    assert "SPIFFE ID:     spiffe://example.org/user/root" in result.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bundle.0.pem", "svid.0.key", "svid.0.pem"]
    assert (tmp_path / "svid.0.key").stat().st_mode & 0o777 == 0o600
    verified = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "bundle.0.pem"),
                               str(tmp_path / "svid.0.pem")], capture_output=True, text=True, check=False)
    assert verified.returncode == 0 and verified.stdout.strip().endswith(": OK"), verified.stdout + verified.stderr
    key_matches = subprocess.run(["openssl", "x509", "-noout", "-pubkey", "-in", str(tmp_path / "svid.0.pem")],
                                 capture_output=True, text=True, check=True).stdout == subprocess.run(
        ["openssl", "pkey", "-pubout", "-in", str(tmp_path / "svid.0.key")], capture_output=True, text=True,
        check=True).stdout
    assert key_matches


def test_the_socket_comes_from_the_flag_or_the_environment(agent: RunningAgent) -> None:
    env = {k: v for k, v in os.environ.items() if k != "SPIFFE_ENDPOINT_SOCKET"}
    missing = subprocess.run([*VOUCHD, "api", "fetch", "x509"], env=env, capture_output=True, text=True,
                             timeout=DEADLINE, check=False)
    assert missing.returncode == 1
    assert "pass --socket or set SPIFFE_ENDPOINT_SOCKET" in missing.stderr

    flagged = subprocess.run([*VOUCHD, "api", "fetch", "x509", "--socket", f"unix://{agent.socket}"], env=env,
                             capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert flagged.returncode == 0, flagged.stderr
