"""JWT-SVIDs end to end: py-spiffe (JwtSource, fetch and validate), vouchd's own CLI, and the refusals.

Each client runs in its own process against one agent; the go-spiffe JWT client is in
test_go_spiffe.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from tests.interop.conftest import DEADLINE, VOUCHD, RunningAgent, running_agent

pytestmark = pytest.mark.interop

ROOT_ID = "spiffe://example.org/user/root"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("jwt")) as agent:
        yield agent


def python(agent: RunningAgent, code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=agent.client_env(), capture_output=True,
                          text=True, timeout=DEADLINE, check=False)


def test_py_spiffe_jwt_source_fetches_and_the_agent_validates(agent: RunningAgent) -> None:
    result = python(agent, """
        import json
        from spiffe import JwtSource, WorkloadApiClient
        with JwtSource() as source:
            svid = source.fetch_svid(audience={"db", "cache"})
            bundle = source.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        with WorkloadApiClient() as client:
            validated = client.validate_jwt_svid(svid.token, "db")
            try:
                client.validate_jwt_svid(svid.token, "elsewhere")
                wrong_audience = "accepted"
            except Exception as err:
                wrong_audience = type(err).__name__
        print(json.dumps({"spiffe_id": str(svid.spiffe_id), "audience": sorted(svid.audience),
                          "validated": str(validated.spiffe_id), "keys": len(bundle.jwt_authorities),
                          "wrong_audience": wrong_audience}))
    """)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert seen["spiffe_id"] == ROOT_ID and seen["validated"] == ROOT_ID
    assert seen["audience"] == ["cache", "db"]
    assert seen["keys"] >= 1
    assert seen["wrong_audience"] != "accepted"


def test_the_cli_fetches_and_validates_a_jwt_svid(agent: RunningAgent) -> None:
    fetched = subprocess.run([*VOUCHD, "api", "fetch", "jwt", "--audience", "db", "--json"], env=agent.client_env(),
                             capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert fetched.returncode == 0, fetched.stderr
    (svid,) = json.loads(fetched.stdout)
    assert svid["spiffe_id"] == ROOT_ID

    validated = subprocess.run([*VOUCHD, "api", "validate", svid["token"], "--audience", "db"],
                               env=agent.client_env(), capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert validated.returncode == 0, validated.stderr
    claims = json.loads(validated.stdout)
    assert claims["spiffe_id"] == ROOT_ID
    assert claims["claims"]["aud"] == ["db"] and claims["claims"]["vouchd_tier"] == "hardware"

    tampered = svid["token"][:-4] + ("AAAA" if not svid["token"].endswith("AAAA") else "BBBB")
    refused = subprocess.run([*VOUCHD, "api", "validate", tampered, "--audience", "db"], env=agent.client_env(),
                             capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert refused.returncode == 1
    assert "INVALID_ARGUMENT" in refused.stderr and "signature does not verify" in refused.stderr


@pytest.mark.parametrize(
    ("audiences", "message"),
    [([""], "audience must not be empty"), ([f"a{n}" for n in range(5000)], "audiences may be requested")],
    ids=["empty-audience", "5000-audiences"],
)
def test_absurd_jwt_requests_are_invalid_argument(agent: RunningAgent, audiences: list[str], message: str) -> None:
    arguments = [part for audience in audiences for part in ("--audience", audience)]
    result = subprocess.run([*VOUCHD, "api", "fetch", "jwt", *arguments], env=agent.client_env(),
                            capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert result.returncode == 1
    assert "INVALID_ARGUMENT" in result.stderr and message in result.stderr


def test_a_deleted_entrys_token_no_longer_validates(agent: RunningAgent) -> None:
    created = subprocess.run([*VOUCHD, "entry", "create", "--spiffe-id", "spiffe://example.org/short-lived",
                              "--selector", "unix:uid:0", "--selector", "unix:gid:0", "--json",
                              "--admin-socket", str(agent.admin_socket)],
                             capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert created.returncode == 0, created.stderr
    entry = json.loads(created.stdout)
    fetched = subprocess.run([*VOUCHD, "api", "fetch", "jwt", "--audience", "db", "--spiffe-id",
                              "spiffe://example.org/short-lived", "--json"], env=agent.client_env(),
                             capture_output=True, text=True, timeout=DEADLINE, check=True)
    (svid,) = json.loads(fetched.stdout)

    subprocess.run([*VOUCHD, "entry", "delete", entry["id"], "--admin-socket", str(agent.admin_socket)],
                   capture_output=True, timeout=DEADLINE, check=True)

    refused = subprocess.run([*VOUCHD, "api", "validate", svid["token"], "--audience", "db"], env=agent.client_env(),
                             capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert refused.returncode == 1 and "revoked" in refused.stderr
