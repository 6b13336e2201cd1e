"""Request-time policy against a running standalone agent: agents launching agents, and a policy edit
taking effect on SIGHUP without a restart (an invalid one refused, the old set kept)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import DEADLINE, VOUCHD, RunningAgent, running_agent
from vouchd.agent.admin import admin_request

pytestmark = pytest.mark.interop

ROOT = Path(__file__).resolve().parents[2]
AGENTS = ROOT / "examples" / "agents"
PERMIT_ALL = '@id("ops.permit")\npermit (principal, action, resource);\n'
FORBID_PAYMENTS = ('@id("ops.no-payments")\n@reason("payments is closed")\n'
                   'forbid (principal, action == Action::"FetchJWTSVID", resource)\n'
                   'when { resource.name == "tool:payments" };\n')


def policy_settings(*files: Path) -> str:
    listed = ", ".join(f'"{file}"' for file in files)
    return (f"policy: {{files: [{listed}], "
            '"audiences": {"tool:search": low, "tool:payments": high}}')


@pytest.fixture
def policy_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("policy.d")
    (directory / "ops.cedar").write_text(PERMIT_ALL)
    return directory


@pytest.fixture
def agent(tmp_path_factory: pytest.TempPathFactory, policy_dir: Path) -> Iterator[RunningAgent]:
    settings = policy_settings(AGENTS / "policy.cedar", policy_dir)
    with running_agent(tmp_path_factory.mktemp("policy"), agent_settings=settings) as agent:
        yield agent


def admin(agent: RunningAgent, command: str, args: dict[str, object]) -> object:
    return asyncio.run(admin_request(agent.admin_socket, command, args, timeout=DEADLINE))


def fetch_jwt(agent: RunningAgent, audience: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VOUCHD, "api", "fetch", "jwt", "--audience", audience, "--json"],
                          env=agent.client_env(), capture_output=True, text=True, timeout=DEADLINE, check=False)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for(condition: object, what: str) -> None:
    assert callable(condition)
    deadline = time.monotonic() + DEADLINE
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {DEADLINE}s: {what}")
        time.sleep(0.1)


def test_a_sub_agent_gets_its_own_identity_and_is_refused_the_high_risk_tool_its_parent_uses(
        agent: RunningAgent) -> None:
    script_sha = hashlib.sha256((AGENTS / "agent.py").read_bytes()).hexdigest()
    admin(agent, "entry.create", {"spiffe_id": "spiffe://example.org/agent/orchestrator",
                                  "selectors": ["unix:uid:0", f"script:sha256:{script_sha}"]})
    admin(agent, "entry.create", {"spiffe_id": "spiffe://example.org/agent/sub-agent",
                                  "selectors": ["unix:uid:0",
                                                "lineage:parent_spiffe_id:spiffe://example.org/agent/orchestrator"]})
    port = free_port()
    tools = subprocess.Popen([sys.executable, str(AGENTS / "toolserver.py"), "--port", str(port)],
                             env=agent.client_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert tools.stdout is not None
        assert tools.stdout.readline().startswith("tool server on"), "the tool server started"
        done = subprocess.run([sys.executable, str(AGENTS / "agent.py"), "--tools", f"http://127.0.0.1:{port}"],
                              env=agent.client_env(), capture_output=True, text=True, timeout=DEADLINE, check=False)
    finally:
        tools.kill()
        tools.wait(timeout=DEADLINE)

    assert done.returncode == 0, done.stderr
    results = {(r["agent"], r["tool"]): r["result"] for r in map(json.loads, done.stdout.splitlines())}
    assert results == {
        ("orchestrator", "search"): "HTTP 200: spiffe://example.org/agent/orchestrator",
        ("orchestrator", "payments"): "HTTP 200: spiffe://example.org/agent/orchestrator",
        ("sub-agent", "search"): "HTTP 200: spiffe://example.org/agent/sub-agent",
        ("sub-agent", "payments"): "no token: FetchJwtSvidError",
    }
    log = agent.log.read_text()
    assert "denied by policy agents.sub-agents-no-high-risk-tools" in log


def test_a_policy_edit_takes_effect_on_sighup_and_an_invalid_one_keeps_the_old_set(
        agent: RunningAgent, policy_dir: Path) -> None:
    assert fetch_jwt(agent, "tool:payments").returncode == 0, "permitted at first"

    (policy_dir / "ops.cedar").write_text(PERMIT_ALL + "\n" + FORBID_PAYMENTS)
    agent.process.send_signal(signal.SIGHUP)
    wait_for(lambda: fetch_jwt(agent, "tool:payments").returncode != 0, "the forbid in force after SIGHUP")
    refused = fetch_jwt(agent, "tool:payments")
    assert "PERMISSION_DENIED" in refused.stderr or "no identity" in refused.stderr, refused.stderr
    assert fetch_jwt(agent, "tool:search").returncode == 0, "only what the new policy forbids is refused"

    (policy_dir / "ops.cedar").write_text(PERMIT_ALL + "\n@id(\"ops.typo\")\nforbid (principal, action, resource)\n"
                                          "when { principal.tierr == \"x\" };\n")
    agent.process.send_signal(signal.SIGHUP)
    wait_for(lambda: "policy reload refused" in agent.log.read_text(), "the refusal logged")

    reload_line = next(line for line in agent.log.read_text().splitlines() if "policy reload refused" in line)
    assert f"{policy_dir / 'ops.cedar'}:6:18: does not match the schema" in reload_line, "file, line and column"
    assert agent.process.poll() is None, "the agent runs on"
    assert fetch_jwt(agent, "tool:payments").returncode != 0, "the previous set (with its forbid) stays in force"
    assert fetch_jwt(agent, "tool:search").returncode == 0, "and the typo's forbid-everything never took effect"


FORBID_VALIDATE = ('@id("ops.no-payments-validation")\n@reason("payments tokens are validated by payments")\n'
                   'forbid (principal, action == Action::"ValidateJWTSVID", resource)\n'
                   'when { resource.name == "tool:payments" };\n')


def validate(agent: RunningAgent, token: str, audience: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VOUCHD, "api", "validate", "--audience", audience, "-"], input=token,
                          env=agent.client_env(), capture_output=True, text=True, timeout=DEADLINE, check=False)


def test_validation_is_put_to_the_policy_for_a_caller_an_entry_names(agent: RunningAgent, policy_dir: Path) -> None:
    fetched = fetch_jwt(agent, "tool:payments")
    assert fetched.returncode == 0, fetched.stderr
    token = json.loads(fetched.stdout)[0]["token"]
    assert validate(agent, token, "tool:payments").returncode == 0, "permitted at first"

    (policy_dir / "ops.cedar").write_text(PERMIT_ALL + "\n" + FORBID_VALIDATE)
    agent.process.send_signal(signal.SIGHUP)
    wait_for(lambda: validate(agent, token, "tool:payments").returncode != 0, "the forbid in force after SIGHUP")

    refused = validate(agent, token, "tool:payments")
    assert "PERMISSION_DENIED" in refused.stderr or "no identity" in refused.stderr, refused.stderr
    assert "denied by policy ops.no-payments-validation" in agent.log.read_text()
