"""Prometheus metrics of a real standalone agent: after a run, a scrape shows every metric that
docs/operations.md lists (read from the doc's table, so the two cannot drift), with the counts the
run made."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.interop.conftest import DEADLINE, VOUCHD, RunningAgent, running_agent
from vouchd.agent.admin import admin_request

pytestmark = pytest.mark.interop

OPERATIONS = Path(__file__).resolve().parents[2] / "docs" / "operations.md"


def documented_metrics() -> list[str]:
    """The first column of the table in the operations guide's `## Metrics` section."""
    text = OPERATIONS.read_text(encoding="utf-8")
    assert "\n## Metrics\n" in text, "docs/operations.md has no Metrics section"
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"^\| `(vouchd_[a-z0-9_]+)` \|", section, flags=re.MULTILINE)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Scrape:
    def __init__(self, text: str) -> None:
        self.text = text
        self.declared = set(re.findall(r"^# TYPE (\S+) ", text, flags=re.MULTILINE))
        self.samples = [sample for family in text_string_to_metric_families(text) for sample in family.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum over the samples of `name` whose labels include `labels` (0 when there is none)."""
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(key) == want for key, want in labels.items()))

    def labels(self, name: str, label: str) -> set[str]:
        return {s.labels[label] for s in self.samples if s.name == name}


def scrape(port: int) -> Scrape:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=DEADLINE) as response:
        assert response.status == 200
        return Scrape(response.read().decode())


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningAgent, int]]:
    port = free_port()
    with running_agent(tmp_path_factory.mktemp("metrics"),
                       agent_settings=f'metrics: {{listen: "127.0.0.1:{port}"}}') as agent:
        yield agent, port


def api(agent: RunningAgent, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VOUCHD, "api", *args], env=agent.client_env(), capture_output=True, text=True,
                          timeout=DEADLINE, check=False)


def admin(agent: RunningAgent, command: str, args: dict[str, Any]) -> Any:
    return asyncio.run(admin_request(agent.admin_socket, command, args, timeout=DEADLINE))


def test_the_doc_lists_the_metrics() -> None:
    names = documented_metrics()
    assert len(names) >= 10 and len(names) == len(set(names)), names


def test_after_a_run_every_documented_metric_is_served_with_what_the_run_did(served: tuple[RunningAgent, int]) -> None:
    agent, port = served
    fetched = api(agent, "fetch", "x509")
    assert fetched.returncode == 0, fetched.stderr
    refused = api(agent, "fetch", "jwt", "--audience", "tool:x", "--spiffe-id", "spiffe://example.org/nobody")
    assert refused.returncode != 0
    entry = admin(agent, "entry.create", {"spiffe_id": "spiffe://example.org/metrics", "selectors": ["unix:uid:0"]})
    admin(agent, "entry.delete", {"id": entry["id"]})

    metrics = scrape(port)

    missing = [name for name in documented_metrics() if name not in metrics.declared]
    assert not missing, f"documented in docs/operations.md but not served: {missing}\n{metrics.text}"
    undocumented = {name for name in metrics.declared if name.startswith("vouchd_")} - set(documented_metrics())
    assert not {name for name in undocumented if not name.endswith("_created")}, undocumented

    assert metrics.value("vouchd_workload_api_requests_total", method="FetchX509SVID", outcome="ok") >= 1
    assert metrics.value("vouchd_workload_api_request_duration_seconds_count", method="FetchX509SVID") >= 1
    assert metrics.value("vouchd_workload_api_requests_total", method="FetchJWTSVID", outcome="denied") >= 1
    assert metrics.value("vouchd_denials_total", source="workload_api", code="no_identity") >= 1
    assert metrics.value("vouchd_node_attestations_total", outcome="ok") >= 1
    assert metrics.value("vouchd_svid_issuances_total", type="x509", source="authority") >= 1
    assert metrics.value("vouchd_svid_issuances_total", type="x509", source="svid_cache") >= 1
    assert metrics.value("vouchd_revocations_total", source="authority", method="entry") >= 1
    assert metrics.value("vouchd_node_state", state="trusted") == 1
    assert metrics.value("vouchd_node_state") == 1  # exactly one state is current
    assert metrics.value("vouchd_tpm_up") == 1
    assert metrics.value("vouchd_tpm_operations_total", operation="quote") >= 1
    assert metrics.value("vouchd_tpm_operation_latency_seconds", operation="quote", quantile="0.99") > 0
    assert metrics.value("vouchd_audit_log_failing") == 0
    assert metrics.value("vouchd_metrics_errors_total") == 0
    # no free text in a label: reasons and SPIFFE IDs never become label values
    for name, label in (("vouchd_denials_total", "code"), ("vouchd_workload_api_requests_total", "method"),
                        ("vouchd_revocations_total", "method")):
        assert all(re.fullmatch(r"[A-Za-z0-9_]+", value) for value in metrics.labels(name, label))
    assert "spiffe://" not in metrics.text


def test_only_get_metrics_is_served(served: tuple[RunningAgent, int]) -> None:
    _, port = served
    with pytest.raises(urllib.error.HTTPError) as other:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=DEADLINE)
    assert other.value.code == 404
