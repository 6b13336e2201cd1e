"""Prometheus metrics: decisions -> counters, the agent's status -> gauges, the loopback HTTP endpoint,
and the `agent.metrics` configuration."""

from __future__ import annotations

import asyncio
import logging
import socket
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from vouchd.agent.metrics import LABEL_VALUES_LIMIT, AgentMetrics, denial_code, denying_policies, serving_metrics
from vouchd.config import MetricsConfig, parse_config
from vouchd.decisions import Decision, DecisionKind, NodeEvidence, Outcome
from vouchd.errors import ConfigError, VouchdError

BOUND = 10.0  # every await of these tests ends within this

STATUS: dict[str, Any] = {
    "node": {"state": "trusted"},
    "tpm": {"state": "ok", "tcti": "swtpm:path=/x"},
    "tpm_latency_ms": {"quote": {"count": 4, "last_ms": 9.0, "p50_ms": 12.5, "p99_ms": 30.0, "max_ms": 41.0},
                       "start": {"count": 1, "last_ms": 80.0, "p50_ms": 80.0, "p99_ms": 80.0, "max_ms": 80.0}},
    "audit": {"failure": None, "anchor_failure": None},
}


def decision(kind: DecisionKind, outcome: Outcome = Outcome.OK, *, source: str = "workload_api", method: str = "",
             reason: str = "", details: tuple[tuple[str, str], ...] = ()) -> Decision:
    return Decision(kind=kind, outcome=outcome, at=1.0, source=source, method=method, reason=reason,
                    details=details)


def call(outcome: Outcome = Outcome.OK, *, method: str = "FetchX509SVID", code: str = "", ms: str = "2.500",
         extra: tuple[tuple[str, str], ...] = ()) -> Decision:
    """A Workload API call's decision, as vouchd.agent.workload_api.calls.Call.decision makes it."""
    kind = DecisionKind.ISSUE if outcome in (Outcome.OK, Outcome.ERROR) else DecisionKind.DENY
    details = (("duration_ms", ms), *extra, *((("code", code),) if code else ()))
    return decision(kind, outcome, method=method, reason="detail only the log sees" if code else "",
                    details=details)


class FakeBus:
    """The decision bus as the metrics use it: subscribe, and the unsubscribe it returns."""

    def __init__(self) -> None:
        self.subscribers: list[Callable[[Decision], None]] = []

    def subscribe(self, subscriber: Callable[[Decision], None]) -> Callable[[], None]:
        self.subscribers.append(subscriber)
        return lambda: self.subscribers.remove(subscriber)

    def emit(self, decision: Decision) -> None:
        for subscriber in list(self.subscribers):
            subscriber(decision)


class Fixture:
    def __init__(self, status: Callable[[], Mapping[str, Any]] = lambda: STATUS) -> None:
        self.registry = CollectorRegistry()
        self.metrics = AgentMetrics(self.registry, status)

    def feed(self, *decisions: Decision) -> None:
        for each in decisions:
            self.metrics.record(each)

    def value(self, name: str, **labels: str) -> float | None:
        return self.registry.get_sample_value(name, labels)

    def label_values(self, name: str, label: str) -> set[str]:
        return {sample.labels[label] for family in self.registry.collect() for sample in family.samples
                if sample.name == name}


@pytest.fixture
def metrics() -> Fixture:
    return Fixture()


# -- the Workload API -------------------------------------------------------------------------------

def test_workload_api_calls_are_counted_by_method_and_outcome(metrics: Fixture) -> None:
    metrics.feed(call(), call(), call(method="FetchJWTSVID"), call(Outcome.DENIED, code="no_identity"),
                 call(Outcome.INVALID, method="FetchWITSVID", code="unimplemented"), call(Outcome.ERROR, code="error"))
    requests = "vouchd_workload_api_requests_total"
    assert metrics.value(requests, method="FetchX509SVID", outcome="ok") == 2
    assert metrics.value(requests, method="FetchJWTSVID", outcome="ok") == 1
    assert metrics.value(requests, method="FetchX509SVID", outcome="denied") == 1
    assert metrics.value(requests, method="FetchWITSVID", outcome="invalid") == 1
    assert metrics.value(requests, method="FetchX509SVID", outcome="error") == 1


def test_the_latency_histogram_takes_the_duration_the_decision_carries(metrics: Fixture) -> None:
    metrics.feed(call(ms="2.000"), call(ms="40.000"), call(method="FetchJWTSVID", ms="7000.000"))
    histogram = "vouchd_workload_api_request_duration_seconds"
    assert metrics.value(f"{histogram}_count", method="FetchX509SVID") == 2
    assert metrics.value(f"{histogram}_sum", method="FetchX509SVID") == pytest.approx(0.042)
    assert metrics.value(f"{histogram}_bucket", method="FetchX509SVID", le="0.0025") == 1
    assert metrics.value(f"{histogram}_bucket", method="FetchX509SVID", le="0.05") == 2
    assert metrics.value(f"{histogram}_bucket", method="FetchJWTSVID", le="5.0") == 0
    assert metrics.value(f"{histogram}_bucket", method="FetchJWTSVID", le="10.0") == 1


def test_a_streams_end_is_counted_but_its_lifetime_is_not_a_latency(metrics: Fixture) -> None:
    ended = call(Outcome.DENIED, code="no_identity", ms="3600000.000", extra=(("stream", "ended"),))
    metrics.feed(call(), ended)
    assert metrics.value("vouchd_workload_api_requests_total", method="FetchX509SVID", outcome="denied") == 1
    assert metrics.value("vouchd_workload_api_request_duration_seconds_count", method="FetchX509SVID") == 1
    assert metrics.value("vouchd_denials_total", source="workload_api", code="no_identity") == 1


def test_a_decision_without_a_readable_duration_is_counted_and_not_timed(metrics: Fixture) -> None:
    metrics.feed(decision(DecisionKind.ISSUE, method="FetchX509SVID"), call(ms="soon"), call(ms="-1"))
    assert metrics.value("vouchd_workload_api_requests_total", method="FetchX509SVID", outcome="ok") == 3
    assert metrics.value("vouchd_workload_api_request_duration_seconds_count", method="FetchX509SVID") is None


def test_decisions_of_other_sources_are_not_workload_api_requests(metrics: Fixture) -> None:
    metrics.feed(decision(DecisionKind.ISSUE, source="svid_cache", method="x509-svid"),
                 decision(DecisionKind.ATTEST, source="authority", method="attest"))
    assert metrics.label_values("vouchd_workload_api_requests_total", "method") == set()


# -- denials -----------------------------------------------------------------------------------------

@pytest.mark.parametrize(
    ("refusal", "code"),
    [
        (call(Outcome.DENIED, code="attestation_failed"), "attestation_failed"),
        (call(Outcome.DENIED, code="resource_exhausted"), "resource_exhausted"),
        (call(Outcome.INVALID, code="invalid_argument"), "invalid_argument"),
        (decision(DecisionKind.DENY, Outcome.DENIED, source="authority", method="AttestRequest",
                  reason="banned: node spiffe://example.org/vouchd/node/tpm/ab is banned"), "banned"),
        (decision(DecisionKind.DENY, Outcome.DENIED, source="authority", method="x509-svid",
                  reason="denied by policy ops.no: closed", details=(("policy_ids", "ops.no"),)), "policy"),
        (decision(DecisionKind.DENY, Outcome.DENIED, source="authority", method="x509-svid",
                  reason="entry is not assigned to this node"), "denied"),
        (decision(DecisionKind.DENY, Outcome.INVALID, source="authority", method="QuotedRequest",
                  reason="field: not_after must be an integer"), "invalid"),
        (decision(DecisionKind.DENY, Outcome.ERROR, source="authority", method="QuotedRequest",
                  reason="cannot write /var/lib/vouchd/authority/store.db: No space left on device"), "error"),
        (call(Outcome.DENIED, code="Not A Code: really"), "denied"),
    ],
)
def test_denials_are_counted_by_a_code_never_by_free_text(metrics: Fixture, refusal: Decision, code: str) -> None:
    assert denial_code(refusal) == code
    metrics.feed(refusal)
    assert metrics.value("vouchd_denials_total", source=refusal.source, code=code) == 1
    assert metrics.label_values("vouchd_denials_total", "code") == {code}


def test_a_workload_api_refusal_by_policy_names_the_deciding_policies(metrics: Fixture) -> None:
    verdicts = "e-1 deny by ops.no-payments,file.cedar:2: payments is closed | e-2 deny by no policy: nothing permits"
    refusal = call(Outcome.DENIED, method="FetchJWTSVID", code="no_identity",
                   extra=(("policy", verdicts), ("policy_version", "abc")))
    assert denying_policies(refusal) == ("ops.no-payments", "file.cedar:2", "(none)")
    metrics.feed(refusal)
    for policy_id in ("ops.no-payments", "file.cedar:2", "(none)"):
        assert metrics.value("vouchd_policy_denials_total", source="workload_api", policy_id=policy_id) == 1


def test_a_refusal_after_the_policy_allowed_an_entry_is_not_the_policys(metrics: Fixture) -> None:
    verdicts = "e-1 allow by vouchd.permit-trusted-node | e-2 deny by ops.no: closed"
    metrics.feed(call(Outcome.DENIED, code="no_identity", extra=(("policy", verdicts),)),
                 call(Outcome.OK, extra=(("policy", "e-1 allow by vouchd.permit-trusted-node"),)))
    assert metrics.label_values("vouchd_policy_denials_total", "policy_id") == set()


def test_an_authority_refusal_by_policy_counts_each_deciding_policy(metrics: Fixture) -> None:
    metrics.feed(decision(DecisionKind.DENY, Outcome.DENIED, source="authority", method="jwt-svid",
                          details=(("policy_ids", "a,b"), ("policy_version", "v"))),
                 decision(DecisionKind.DENY, Outcome.DENIED, source="authority", method="jwt-svid",
                          details=(("policy_ids", ""),)),
                 # an issuance names the policies that permitted it: not a refusal
                 decision(DecisionKind.ISSUE, source="authority", method="jwt-svid", details=(("policy_ids", "a"),)))
    assert metrics.value("vouchd_policy_denials_total", source="authority", policy_id="a") == 1
    assert metrics.value("vouchd_policy_denials_total", source="authority", policy_id="b") == 1
    assert metrics.value("vouchd_policy_denials_total", source="authority", policy_id="(none)") == 1


def test_label_values_are_bounded(metrics: Fixture) -> None:
    many = [decision(DecisionKind.DENY, Outcome.DENIED, source="authority", method="jwt-svid",
                     details=(("policy_ids", f"ops.p{n}"),)) for n in range(LABEL_VALUES_LIMIT + 20)]
    metrics.feed(*many)
    seen = metrics.label_values("vouchd_policy_denials_total", "policy_id")
    assert len(seen) == LABEL_VALUES_LIMIT + 1
    assert metrics.value("vouchd_policy_denials_total", source="authority", policy_id="other") == 20
    assert metrics.value("vouchd_policy_denials_total", source="authority", policy_id="ops.p0") == 1


# -- node attestations, issuances, revocations --------------------------------------------------------

def test_node_attestations_are_the_authoritys_attest_decisions_and_refused_attestation_messages(
        metrics: Fixture) -> None:
    node = NodeEvidence("spiffe://example.org/vouchd/node/tpm/ab")
    metrics.feed(
        decision(DecisionKind.ATTEST, source="authority", method="attest"),
        Decision(DecisionKind.ATTEST, Outcome.OK, 1.0, "authority", "attest", node=node),
        decision(DecisionKind.DENY, Outcome.DENIED, source="authority", method="ChallengeResponse",
                 reason="bad_quote: signature does not verify"),
        decision(DecisionKind.DENY, Outcome.INVALID, source="authority", method="AttestRequest", reason="x"),
        decision(DecisionKind.DENY, Outcome.DENIED, source="authority", method="QuotedRequest", reason="nonce: x"),
        decision(DecisionKind.DENY, Outcome.DENIED, source="authority", method="x509-svid"),
    )
    assert metrics.value("vouchd_node_attestations_total", outcome="ok") == 2
    assert metrics.value("vouchd_node_attestations_total", outcome="denied") == 1
    assert metrics.value("vouchd_node_attestations_total", outcome="invalid") == 1
    assert metrics.value("vouchd_node_attestations_total", outcome="error") == 0


def test_issuances_are_counted_by_svid_type_and_source(metrics: Fixture) -> None:
    metrics.feed(
        decision(DecisionKind.ISSUE, source="authority", method="x509-svid"),
        decision(DecisionKind.ISSUE, source="authority", method="jwt-svid"),
        decision(DecisionKind.ISSUE, source="svid_cache", method="x509-svid"),
        decision(DecisionKind.ROTATE, source="svid_cache", method="x509-svid"),
        call(),  # handed to a workload: a request, not an issuance
        decision(DecisionKind.DENY, Outcome.DENIED, source="authority", method="x509-svid"),
    )
    assert metrics.value("vouchd_svid_issuances_total", type="x509", source="authority") == 1
    assert metrics.value("vouchd_svid_issuances_total", type="jwt", source="authority") == 1
    assert metrics.value("vouchd_svid_issuances_total", type="x509", source="svid_cache") == 2
    assert metrics.label_values("vouchd_svid_issuances_total", "source") == {"authority", "svid_cache"}


def test_revocations_are_counted_by_source_and_what_was_revoked(metrics: Fixture) -> None:
    metrics.feed(decision(DecisionKind.REVOKE, source="authority", method="entry", reason="entry deleted"),
                 decision(DecisionKind.REVOKE, source="authority", method="node", reason="banned"),
                 decision(DecisionKind.REVOKE, source="svid_cache", method="revocation", reason="entry revoked"),
                 decision(DecisionKind.REVOKE, source="svid_cache", method="revocation", reason="node banned"))
    assert metrics.value("vouchd_revocations_total", source="authority", method="entry") == 1
    assert metrics.value("vouchd_revocations_total", source="authority", method="node") == 1
    assert metrics.value("vouchd_revocations_total", source="svid_cache", method="revocation") == 2


def test_a_decision_that_cannot_be_counted_never_raises_and_is_logged_once(
        metrics: Fixture, caplog: pytest.LogCaptureFixture) -> None:
    broken = decision(DecisionKind.ISSUE, details=(("duration_ms",),))  # type: ignore[arg-type]
    with caplog.at_level(logging.DEBUG, logger="vouchd.agent.metrics"):
        metrics.feed(broken, broken, call())
    assert metrics.value("vouchd_metrics_errors_total", stage="decision") == 2
    assert [r.levelno for r in caplog.records if r.name == "vouchd.agent.metrics"] == [logging.ERROR, logging.DEBUG]
    assert metrics.value("vouchd_workload_api_requests_total", method="FetchX509SVID", outcome="ok") == 1


# -- what is read from the agent's status at each scrape ---------------------------------------------

def test_node_state_is_one_gauge_per_state_with_1_for_the_current_one() -> None:
    node = {"state": "trusted"}
    metrics = Fixture(lambda: {**STATUS, "node": node})
    for current in ("trusted", "banned"):
        node["state"] = current
        assert metrics.value("vouchd_node_state", state=current) == 1
        others = {"starting", "trusted", "unconfirmed", "stale", "banned"} - {current}
        assert all(metrics.value("vouchd_node_state", state=state) == 0 for state in others)


def test_a_node_not_yet_attested_is_starting() -> None:
    metrics = Fixture(lambda: {**STATUS, "node": None})
    assert metrics.value("vouchd_node_state", state="starting") == 1
    assert metrics.value("vouchd_node_state", state="trusted") == 0


def test_tpm_operations_and_latency_come_from_the_status_in_seconds(metrics: Fixture) -> None:
    assert metrics.value("vouchd_tpm_up") == 1
    assert metrics.value("vouchd_tpm_operations_total", operation="quote") == 4
    assert metrics.value("vouchd_tpm_operations_total", operation="start") == 1
    assert metrics.value("vouchd_tpm_operation_latency_seconds", operation="quote", quantile="0.5") == 0.0125
    assert metrics.value("vouchd_tpm_operation_latency_seconds", operation="quote", quantile="0.99") == 0.03
    assert metrics.value("vouchd_tpm_operation_latency_max_seconds", operation="quote") == 0.041


def test_an_unreachable_tpm_is_down_and_a_static_secret_node_has_no_tpm_sample() -> None:
    unreachable = Fixture(lambda: {**STATUS, "tpm": {"state": "unreachable", "reason": "gone"}})
    assert unreachable.value("vouchd_tpm_up") == 0
    static = Fixture(lambda: {**STATUS, "tpm": {"state": "none"}, "tpm_latency_ms": {}})
    assert static.value("vouchd_tpm_up") is None
    assert static.label_values("vouchd_tpm_operations_total", "operation") == set()


def test_audit_log_failures_are_read_from_the_status() -> None:
    failing = Fixture(lambda: {**STATUS, "audit": {"failure": "cannot write audit record: disk full",
                                                   "anchor_failure": None}})
    assert failing.value("vouchd_audit_log_failing") == 1
    assert failing.value("vouchd_audit_anchor_failing") == 0
    healthy = Fixture()
    assert healthy.value("vouchd_audit_log_failing") == 0


def test_a_status_that_fails_leaves_the_other_metrics_and_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    def broken() -> Mapping[str, Any]:
        raise RuntimeError("status is broken")

    metrics = Fixture(broken)
    metrics.feed(call())
    with caplog.at_level(logging.DEBUG, logger="vouchd.agent.metrics"):
        for _ in range(3):
            scrape = generate_latest(metrics.registry).decode()
            assert 'vouchd_workload_api_requests_total{method="FetchX509SVID",outcome="ok"} 1.0' in scrape
            assert "vouchd_node_state" not in scrape
    # the three scrapes above (this one reads the counter before its own status fails)
    assert metrics.value("vouchd_metrics_errors_total", stage="status") == 3
    errors = [r for r in caplog.records if r.name == "vouchd.agent.metrics" and r.levelno == logging.ERROR]
    assert len(errors) == 1


# -- the endpoint ---------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def get(url: str, method: str = "GET") -> tuple[int, str, str]:
    request = urllib.request.Request(url, method=method)
    try:
        with urllib.request.urlopen(request, timeout=BOUND) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.headers["Content-Type"], err.read().decode()


@pytest.fixture
def port() -> Iterator[int]:
    yield free_port()


async def test_the_endpoint_serves_what_the_bus_fed_and_unsubscribes_when_it_stops(port: int) -> None:
    bus = FakeBus()
    async with asyncio.timeout(BOUND):
        async with serving_metrics(MetricsConfig(listen=("127.0.0.1", port)), bus, lambda: STATUS) as server:
            assert server is not None
            assert len(bus.subscribers) == 1
            bus.emit(call())
            code, content_type, body = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics")
            assert code == 200
            assert content_type.startswith("text/plain; version=0.0.4")
            assert 'vouchd_workload_api_requests_total{method="FetchX509SVID",outcome="ok"} 1.0' in body
            assert 'vouchd_node_state{state="trusted"} 1.0' in body
            assert "process_resident_memory_bytes" in body
            assert (await asyncio.to_thread(get, f"http://127.0.0.1:{port}/"))[0] == 404
            assert (await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics", "POST"))[0] == 405
            head = await asyncio.to_thread(get, f"http://127.0.0.1:{port}/metrics", "HEAD")
            assert head[:2] == (200, content_type) and head[2] == ""
    assert bus.subscribers == []
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=BOUND):
        pass


async def test_stopping_ends_idle_and_half_sent_requests_within_the_bound(port: int) -> None:
    bus = FakeBus()
    async with asyncio.timeout(BOUND):
        async with serving_metrics(MetricsConfig(listen=("127.0.0.1", port)), bus, lambda: STATUS):
            idle = await asyncio.open_connection("127.0.0.1", port)
            half = await asyncio.open_connection("127.0.0.1", port)
            half[1].write(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
            await half[1].drain()
            await asyncio.sleep(0.1)
            started = asyncio.get_running_loop().time()
        assert asyncio.get_running_loop().time() - started < 2.5
        for reader, writer in (idle, half):
            assert await reader.read() == b""  # closed by the server, unanswered
            writer.close()


async def test_metrics_off_serve_nothing_and_subscribe_to_nothing() -> None:
    bus = FakeBus()
    async with asyncio.timeout(BOUND), serving_metrics(MetricsConfig(), bus, lambda: STATUS) as server:
        assert server is None
        assert bus.subscribers == []


async def test_a_port_in_use_fails_naming_the_key(port: int) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        expected = rf"^cannot serve metrics on 127\.0\.0\.1:{port} \(agent\.metrics\.listen\): address already in use$"
        with pytest.raises(VouchdError, match=expected):
            async with asyncio.timeout(BOUND), serving_metrics(MetricsConfig(listen=("127.0.0.1", port)),
                                                               FakeBus(), lambda: STATUS):
                pass


# -- agent.metrics ------------------------------------------------------------------------------------

def parse_metrics(settings: str) -> MetricsConfig:
    config = parse_config(f"trust_domain: example.org\nagent:\n  {settings}\n", Path("/etc/vouchd/vouchd.yaml"))
    assert config.agent is not None
    return config.agent.metrics


@pytest.mark.parametrize(
    ("settings", "listen"),
    [
        ("state_dir: /x", None),
        ('metrics: {listen: "127.0.0.1:9464"}', ("127.0.0.1", 9464)),
        ('metrics: {listen: "127.0.0.53:1"}', ("127.0.0.53", 1)),
        ('metrics: {listen: "[::1]:65535"}', ("::1", 65535)),
    ],
)
def test_metrics_are_off_unless_a_loopback_address_is_given(settings: str, listen: tuple[str, int] | None) -> None:
    assert parse_metrics(settings) == MetricsConfig(listen=listen)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ('metrics: {listen: "0.0.0.0:9464"}', "0.0.0.0 is not a loopback address"),
        ('metrics: {listen: "10.1.2.3:9464"}', "10.1.2.3 is not a loopback address"),
        ('metrics: {listen: "[::]:9464"}', ":: is not a loopback address"),
        ('metrics: {listen: "localhost:9464"}', "expected a loopback IP address and a port"),
        ('metrics: {listen: "127.0.0.1"}', "expected a loopback IP address and a port"),
        ('metrics: {listen: "127.0.0.1:0"}', "expected a loopback IP address and a port"),
        ('metrics: {listen: "127.0.0.1:70000"}', "expected a loopback IP address and a port"),
        ('metrics: {listen: "::1:9464"}', "expected a loopback IP address and a port"),
        ("metrics: {listen: 9464}", "expected a loopback IP address and a port"),
        ("metrics: {}", "is required"),
    ],
)
def test_a_listen_address_that_is_not_loopback_is_refused_naming_the_key(settings: str, message: str) -> None:
    with pytest.raises(ConfigError, match=r"^/etc/vouchd/vouchd\.yaml: agent\.metrics\.listen: ") as refused:
        parse_metrics(settings)
    assert message in str(refused.value)


def test_an_unknown_metrics_key_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"^/etc/vouchd/vouchd\.yaml: agent\.metrics\.port: unknown key$"):
        parse_metrics('metrics: {listen: "127.0.0.1:9464", port: 9464}')
