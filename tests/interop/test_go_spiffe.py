"""go-spiffe v2, the Go SDK, against a standalone agent: Go workloads need no vouchd-specific code.

The client in tests/interop/goclient is built once per module (go.sum is committed, so the build is
reproducible; a cold build compiles gRPC and takes a minute or two, later ones hit Go's build cache).
The agent serves 4-second X.509-SVIDs so that the watch sees a rotation within the test.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from tests.interop.conftest import RunningAgent, running_agent

# A cold `go build` of go-spiffe + gRPC exceeds the suite's 120 s default on 2 cores; it runs in
# the module fixture, which pytest-timeout charges to the first test.
pytestmark = [pytest.mark.interop, pytest.mark.timeout(600)]

GOCLIENT_SOURCE = Path(__file__).parent / "goclient"
NOBODY = 65534
ROOT_SPIFFE_ID = "spiffe://example.org/user/root"
X509_SVID_TTL_SECONDS = 4


@pytest.fixture(scope="module")
def goclient() -> Iterator[Path]:
    # Go is not one of the things scripts/setup installs (vouchd is Python); where it is missing or
    # too old the Go client cannot be built, and the test says so in pytest's skip summary.
    go = shutil.which("go")
    if go is None:
        pytest.skip("no go toolchain on PATH: the go-spiffe interop test needs Go >= 1.24")
    version = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, check=False).stdout.strip()
    match = re.fullmatch(r"go(\d+)\.(\d+)(?:\.\d+)?.*", version)
    if match is None or (int(match.group(1)), int(match.group(2))) < (1, 24):
        pytest.skip(f"{go} is {version or 'of unknown version'}: the go-spiffe interop test needs Go >= 1.24")
    # Readable by every user: one test runs the binary as nobody (pytest's temp folders are root-only).
    directory = Path(tempfile.mkdtemp(prefix="vouchd-goclient-"))
    try:
        directory.chmod(0o755)
        binary = directory / "goclient"
        # GOTOOLCHAIN=local: never download another toolchain because go.mod asks for one.
        env = {**os.environ, "GOTOOLCHAIN": "local"}
        build = subprocess.run([go, "build", "-buildvcs=false", "-o", str(binary), "."], cwd=GOCLIENT_SOURCE,
                               env=env, capture_output=True, text=True, timeout=540, check=False)
        if build.returncode != 0:
            pytest.fail(f"go build of {GOCLIENT_SOURCE} failed:\n{build.stderr}")
        binary.chmod(0o755)
        yield binary
    finally:
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("go-spiffe"), x509_svid_ttl=f"{X509_SVID_TTL_SECONDS}s",
                       attestation_interval="1s") as agent:
        yield agent


def _goclient(binary: Path, mode: str, agent: RunningAgent, *,
              as_user: Sequence[str] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*as_user, str(binary), mode], env=agent.client_env(), capture_output=True, text=True,
                          timeout=60, check=False)


def _status_code(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, f"expected the call to fail, got {result.returncode}: {result.stdout}"
    first_line = result.stderr.splitlines()[0] if result.stderr else ""
    assert first_line.startswith("code="), result.stderr
    return first_line.removeprefix("code=")


def test_go_spiffe_fetches_the_entrys_x509_context(goclient: Path, agent: RunningAgent) -> None:
    started = time.time()
    result = _goclient(goclient, "x509", agent)
    finished = time.time()
    assert result.returncode == 0, result.stderr
    context = json.loads(result.stdout)
    assert context["spiffe_id"] == ROOT_SPIFFE_ID
    assert context["chain_length"] == 1, "SVIDs are signed directly by the root, so the chain is the leaf"
    assert context["bundle_trust_domains"] == ["example.org"]
    assert started < context["not_after"] <= finished + X509_SVID_TTL_SECONDS + 1


def test_go_spiffe_watch_receives_the_rotated_svid_before_the_first_expires(goclient: Path,
                                                                             agent: RunningAgent) -> None:
    result = _goclient(goclient, "watch", agent)
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)
    assert first["spiffe_id"] == second["spiffe_id"] == ROOT_SPIFFE_ID
    assert second["serial"] != first["serial"]
    assert second["received"] < first["not_after"], "the new SVID must arrive while the old one is valid"
    assert second["not_after"] > first["not_after"]


def test_go_spiffe_fetches_x509_bundles(goclient: Path, agent: RunningAgent) -> None:
    result = _goclient(goclient, "bundles", agent)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == ["example.org"]


def test_go_spiffe_fetches_validates_and_verifies_a_jwt_svid(goclient: Path, agent: RunningAgent) -> None:
    result = _goclient(goclient, "jwt", agent)

    assert result.returncode == 0, result.stderr
    svid = json.loads(result.stdout)
    assert svid == {"spiffe_id": ROOT_SPIFFE_ID, "audience": ["db"], "validated": ROOT_SPIFFE_ID,
                    "parsed": ROOT_SPIFFE_ID}


def test_go_spiffe_caller_whose_uid_has_no_entry_gets_permission_denied(goclient: Path,
                                                                       agent: RunningAgent) -> None:
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.fail("setpriv (util-linux) is not on PATH: it runs the Go client as another uid")
    as_nobody = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    # FetchX509Context is one call without retries, so the code is the agent's answer itself.
    assert _status_code(_goclient(goclient, "x509", agent, as_user=as_nobody)) == "PermissionDenied"
