"""A host without a TPM: `agent.tier: static-secret`, a real standalone agent and real clients.

Both tiers can be tried on one machine: this agent never touches a TPM. Its node is proven by a key
file, its SVIDs say `static-secret`, and the default policy holds its workloads to low-risk
audiences, JWT-SVIDs of at most 60 s and no X.509-SVID unless the entry allows it; the authority
refuses it every entry that does not allow that tier.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import stat
import subprocess
import tempfile
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from tests.interop.conftest import DEADLINE, VOUCHD
from vouchd.agent.admin import admin_request
from vouchd.spiffe import TrustTier, read_tier

pytestmark = pytest.mark.interop

LOW_RISK, HIGH_RISK = "tool:search", "tool:payments"


@dataclass
class StaticAgent:
    socket: Path
    admin_socket: Path
    state: Path
    log: Path
    process: subprocess.Popen[bytes]

    def client_env(self) -> dict[str, str]:
        return {**os.environ, "SPIFFE_ENDPOINT_SOCKET": f"unix:{self.socket}"}

    def status(self) -> dict[str, object]:
        result = subprocess.run([*VOUCHD, "status", "--json", "--admin-socket", str(self.admin_socket)],
                                capture_output=True, text=True, check=True, timeout=DEADLINE)
        status: dict[str, object] = json.loads(result.stdout)
        return status

    def fetch(self, kind: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*VOUCHD, "api", "fetch", kind, *args], env=self.client_env(),
                              capture_output=True, text=True, timeout=DEADLINE, check=False)


def write_config(base: Path, runtime: Path) -> Path:
    config = base / "static.yaml"
    config.write_text(textwrap.dedent(f"""\
        trust_domain: example.org
        agent:
          tier: static-secret
          state_dir: {base}/agent
          socket_path: {runtime}/agent.sock
          admin_socket_path: {runtime}/admin.sock
          policy: {{audiences: {{"{LOW_RISK}": low, "{HIGH_RISK}": high}}}}
          audit: {{anchor_every: 5}}
        authority:
          state_dir: {base}/authority
        entries:
          - spiffe_id: spiffe://example.org/static/jwt-only
            selectors: ["unix:uid:0"]
            min_tier: static-secret
            jwt_ttl: 60s
          - spiffe_id: spiffe://example.org/static/hardware-only
            selectors: ["unix:uid:0"]
        """))
    return config


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StaticAgent]:
    base = tmp_path_factory.mktemp("static")
    runtime = Path(tempfile.mkdtemp(prefix="vouchd-run-"))
    runtime.chmod(0o755)
    config = write_config(base, runtime)
    log = base / "agent.log"
    with log.open("wb") as sink:
        process = subprocess.Popen([*VOUCHD, "agent", "--standalone", "--config", str(config)],
                                   stdout=sink, stderr=subprocess.STDOUT)
    running = StaticAgent(runtime / "agent.sock", runtime / "admin.sock", base / "agent", log, process)
    try:
        deadline = time.monotonic() + 60
        while subprocess.run([*VOUCHD, "healthcheck", "--admin-socket", str(running.admin_socket)],
                             capture_output=True, timeout=DEADLINE, check=False).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"agent did not become healthy:\n{log.read_text()}")
            time.sleep(0.1)
        yield running
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=DEADLINE)
        for leftover in runtime.iterdir():
            leftover.unlink()
        runtime.rmdir()


def jwt_claims(token: str) -> dict[str, object]:
    payload = token.split(".")[1]
    claims: dict[str, object] = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    return claims


def test_the_node_is_proven_by_its_key_file_at_the_static_secret_tier(agent: StaticAgent) -> None:
    status = agent.status()
    node = status["node"]
    assert isinstance(node, dict)
    assert node["tier"] == "static-secret"
    key_hash = next(s.split(":", 2)[2] for s in node["selectors"] if s.startswith("node:key_hash:"))
    assert node["id"] == f"spiffe://example.org/vouchd/node/key/{key_hash}"
    assert "node:tier:static-secret" in node["selectors"]
    assert status["tpm"] == {"state": "none", "reason": "agent.tier is static-secret: no TPM is used"}
    key_file = agent.state / "node" / "node-key.pem"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600


def test_an_entry_that_requires_hardware_never_reaches_a_static_secret_node(agent: StaticAgent) -> None:
    entries = agent.status()["entries"]
    assert isinstance(entries, list)
    assert [e["spiffe_id"] for e in entries] == ["spiffe://example.org/static/jwt-only"]


def test_a_static_secret_workload_gets_a_low_risk_audience_with_its_tier_in_the_token(agent: StaticAgent) -> None:
    fetched = agent.fetch("jwt", "--audience", LOW_RISK, "--json")

    assert fetched.returncode == 0, fetched.stderr
    token = json.loads(fetched.stdout)[0]["token"]
    claims = jwt_claims(token)
    assert claims["sub"] == "spiffe://example.org/static/jwt-only"
    assert claims["vouchd_tier"] == "static-secret"
    assert claims["aud"] in ([LOW_RISK], LOW_RISK)
    assert int(claims["exp"]) - int(claims["iat"]) <= 60  # type: ignore[call-overload]


def test_a_static_secret_workload_is_refused_a_high_risk_audience(agent: StaticAgent) -> None:
    refused = agent.fetch("jwt", "--audience", HIGH_RISK)

    assert refused.returncode != 0
    assert "PERMISSION_DENIED" in refused.stderr or "no identity" in refused.stderr, refused.stderr
    assert "denied by policy vouchd.static-secret-jwt-audience" in agent.log.read_text()


def test_a_static_secret_workload_gets_no_x509_svid_unless_its_entry_allows_it(
        agent: StaticAgent, tmp_path: Path) -> None:
    refused = agent.fetch("x509")
    assert refused.returncode != 0, refused.stdout
    assert "denied by policy vouchd.static-secret-x509" in agent.log.read_text()

    asyncio.run(admin_request(agent.admin_socket, "entry.create", {
        "spiffe_id": "spiffe://example.org/static/x509-allowed", "selectors": ["unix:uid:0"],
        "min_tier": "static-secret", "labels": {"vouchd/static-secret-x509": "allow"}}, timeout=DEADLINE))
    deadline = time.monotonic() + DEADLINE
    while (fetched := agent.fetch("x509", "--write", str(tmp_path))).returncode != 0:
        assert time.monotonic() < deadline, fetched.stderr
        time.sleep(0.1)
    leaf = x509.load_pem_x509_certificates((tmp_path / "svid.0.pem").read_bytes())[0]
    assert leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.UniformResourceIdentifier) == ["spiffe://example.org/static/x509-allowed"]
    assert read_tier(leaf) is TrustTier.STATIC_SECRET


def test_the_audit_log_of_a_node_without_a_tpm_is_anchored_by_its_node_key(agent: StaticAgent) -> None:
    for _ in range(6):  # past anchor_every: at least one anchor signed by the node key
        agent.fetch("jwt", "--audience", LOW_RISK, "--json")
    audit_dir = agent.state / "audit"

    verified = subprocess.run([*VOUCHD, "audit", "verify", "--state-dir", str(agent.state), "--json",
                               str(audit_dir)], capture_output=True, text=True, timeout=DEADLINE, check=False)

    assert verified.returncode == 0, verified.stdout + verified.stderr
    report = json.loads(verified.stdout)
    assert report["anchors_checked"] and report["anchors"] >= 1
