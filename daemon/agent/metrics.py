"""Prometheus metrics, opt-in, on a loopback address only (`agent.metrics`, docs/operations.md#metrics).

Counters are fed by the decision events (docs/design.md §9): every decision of the agent, and in
standalone mode of the embedded authority, goes through the one DecisionBus this module subscribes
to. What is a state rather than an event (the node's state, the TPM, the audit log) is read from
`Agent.status()` when a scrape asks, so it is never stale. The registry is this module's own, not
prometheus-client's global one: two agents in one process (tests) never share a count.

Nothing here may change what the agent does: a decision that cannot be counted or a scrape that
cannot be answered is logged once, counted in `vouchd_metrics_errors_total`, and otherwise ignored.
Label values are codes and names set by vouchd's code or by the operator's policy ids, never free
text, and at most LABEL_VALUES_LIMIT per label: a further one is counted under `other`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector

from vouchd.agent.workload_api import WORKLOAD_API_SOURCE
from vouchd.config import MetricsConfig
from vouchd.decisions import Decision, DecisionKind, Outcome
from vouchd.errors import VouchdError
from vouchd.protocol.messages import (
    AttestNonceRequest,
    AttestRequest,
    ChallengeResponse,
    KeyAttestRequest,
    KeyChallengeResponse,
)

__all__ = [
    "LABEL_VALUES_LIMIT",
    "NODE_STATES",
    "AgentMetrics",
    "DecisionSource",
    "MetricsServer",
    "StatusSource",
    "denial_code",
    "denying_policies",
    "serving_metrics",
    "status_metrics",
]

log = logging.getLogger("vouchd.agent.metrics")

LABEL_VALUES_LIMIT = 64
OTHER = "other"                 # the label value of everything past LABEL_VALUES_LIMIT
IMPLICIT_DENY = "(none)"        # policy_id of a refusal no policy decided: nothing permitted it
# What `vouchd status` calls the node's state; "starting" until the node has attested.
NODE_STATES = ("starting", "trusted", "unconfirmed", "stale", "banned")

# A Workload API call takes microseconds from the cache, up to the attestation deadline (5 s) at most.
_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# The authority's decisions about the messages of node attestation (its `method` is the message type).
_ATTESTATION_MESSAGES = frozenset(message.__name__ for message in (
    AttestNonceRequest, AttestRequest, ChallengeResponse, KeyAttestRequest, KeyChallengeResponse))
# The `method` of an issuance decision (the SVID cache's and the authority's) -> the SVID type.
_SVID_TYPES = {"x509-svid": "x509", "jwt-svid": "jwt"}
_CODE = re.compile(r"[a-z][a-z0-9_]{0,39}")
# The authority's refusals of a request read "<refusal code>: <message>".
_REFUSAL_PREFIX = re.compile(r"([a-z][a-z0-9_]{0,39}): ")
# One entry's verdict in the Workload API's `policy` detail (vouchd.agent.policing.decision_details):
# "<entry id> deny by <id>,<id>: <reasons>", or "… deny by no policy: …" when nothing permitted it.
_AGENT_DENIAL = re.compile(r"\S+ deny by (?:no policy|(\S+?))(?:: |$)")

# The HTTP side: a scrape is one small GET from this host.
REQUEST_LIMIT = 5.0             # seconds to send the request and take the answer
CLOSE_LIMIT = 2.0               # seconds stopping the server may take
_MAX_CONNECTIONS = 16
_MAX_REQUEST_BYTES = 8192


class DecisionSource(Protocol):
    """What the metrics need of the decision bus."""

    def subscribe(self, subscriber: Callable[[Decision], None]) -> Callable[[], None]: ...


StatusSource = Callable[[], Mapping[str, Any]]


class _BoundedLabel:
    """The values one label has taken; past `limit` distinct ones, any new one is OTHER."""

    def __init__(self, limit: int = LABEL_VALUES_LIMIT) -> None:
        self._seen: set[str] = set()
        self._limit = limit

    def __call__(self, value: str) -> str:
        value = value or "unknown"
        if value in self._seen:
            return value
        if len(self._seen) >= self._limit:
            return OTHER
        self._seen.add(value)
        return value


class _Once:
    """Logs a failure with its traceback the first time, at debug level after that."""

    def __init__(self, what: str) -> None:
        self._what = what
        self._logged = False

    def failed(self, err: Exception) -> None:
        if self._logged:
            log.debug(self._what, exc_info=err)
            return
        self._logged = True
        log.error(f"{self._what} (logged once; vouchd_metrics_errors_total counts them)", exc_info=err)


class AgentMetrics:
    """The agent's metrics in `registry`: `record` is the decision bus subscriber; a collector reads
    `status` at each scrape."""

    def __init__(self, registry: CollectorRegistry, status: StatusSource) -> None:
        self._errors = Counter("vouchd_metrics_errors_total",
                               "Decisions that could not be counted and scrapes that could not read the "
                               "agent's status, by stage", ["stage"], registry=registry)
        self._requests = Counter("vouchd_workload_api_requests_total",
                                 "Workload API decisions by RPC and outcome (a stream counts again when it "
                                 "ends with a refusal or an error)", ["method", "outcome"], registry=registry)
        self._durations = Histogram("vouchd_workload_api_request_duration_seconds",
                                    "Time from a Workload API request to its answer (a stream's first answer)",
                                    ["method"], buckets=_DURATION_BUCKETS, registry=registry)
        self._denials = Counter("vouchd_denials_total", "Refusals by who refused and the refusal code",
                                ["source", "code"], registry=registry)
        self._policy_denials = Counter("vouchd_policy_denials_total",
                                       "Refusals decided by request-time policy, by policy id",
                                       ["source", "policy_id"], registry=registry)
        self._attestations = Counter("vouchd_node_attestations_total",
                                     "Node attestations decided by the (embedded) authority, by outcome",
                                     ["outcome"], registry=registry)
        self._issuances = Counter("vouchd_svid_issuances_total",
                                  "SVIDs signed by the authority or taken into the agent's cache (first or "
                                  "rotated), by type and source", ["type", "source"], registry=registry)
        self._revocations = Counter("vouchd_revocations_total", "Revocation decisions by source and what was revoked",
                                    ["source", "method"], registry=registry)
        # Series that exist from the start, so that a rate over them never begins with a gap.
        for stage in ("decision", "status"):
            self._errors.labels(stage)
        for outcome in Outcome:
            self._attestations.labels(outcome.value)
        self._labels: dict[tuple[str, str], _BoundedLabel] = {}
        self._record_failures = _Once("a decision could not be counted in the metrics")
        registry.register(_StatusCollector(status, self._errors.labels("status")))
        ProcessCollector(registry=registry)

    def _label(self, metric: str, label: str, value: str) -> str:
        bounded = self._labels.get((metric, label))
        if bounded is None:
            bounded = self._labels[(metric, label)] = _BoundedLabel()
        return bounded(value)

    def record(self, decision: Decision) -> None:
        """Count one decision. Never raises: counting must not change a decision."""
        try:
            self._record(decision)
        except Exception as err:
            self._errors.labels("decision").inc()
            self._record_failures.failed(err)

    def _record(self, decision: Decision) -> None:
        details = dict(decision.details)
        source = self._label("source", "source", decision.source)
        if decision.source == WORKLOAD_API_SOURCE:
            method = self._label("workload_api", "method", decision.method)
            self._requests.labels(method, decision.outcome.value).inc()
            duration = _seconds(details.get("duration_ms", ""))
            if duration is not None and "stream" not in details:  # a stream's end: its duration is its whole life
                self._durations.labels(method).observe(duration)
        if decision.kind is DecisionKind.DENY:
            self._denials.labels(source, self._label("denials", "code", denial_code(decision))).inc()
            for policy_id in denying_policies(decision):
                self._policy_denials.labels(source, self._label("policy_denials", "policy_id", policy_id)).inc()
        if decision.source == "authority" and (decision.kind is DecisionKind.ATTEST or (
                decision.kind is DecisionKind.DENY and decision.method in _ATTESTATION_MESSAGES)):
            self._attestations.labels(decision.outcome.value).inc()
        svid_type = _SVID_TYPES.get(decision.method)
        if decision.kind in (DecisionKind.ISSUE, DecisionKind.ROTATE) and decision.outcome is Outcome.OK \
                and svid_type is not None:
            self._issuances.labels(svid_type, source).inc()
        if decision.kind is DecisionKind.REVOKE:
            self._revocations.labels(source, self._label("revocations", "method", decision.method)).inc()


def denial_code(decision: Decision) -> str:
    """Why a decision refused, as a code: the Workload API's refusal code, `policy`, the authority's
    refusal code, or else the outcome (`denied`, `invalid`, `error`). Never free text."""
    details = dict(decision.details)
    code = details.get("code", "")
    if _CODE.fullmatch(code):
        return code
    if "policy_ids" in details:
        return "policy"
    if decision.outcome is Outcome.DENIED:
        match = _REFUSAL_PREFIX.match(decision.reason)
        if match is not None:
            return match.group(1)
    return decision.outcome.value


def denying_policies(decision: Decision) -> tuple[str, ...]:
    """The ids of the policies that decided a refusal (IMPLICIT_DENY when none permitted it); empty
    when the refusal was not the policy's."""
    if decision.kind is not DecisionKind.DENY:
        return ()
    details = dict(decision.details)
    ids = details.get("policy_ids")
    if ids is not None:  # the authority's: the deciding policies, comma-separated
        return tuple(ids.split(",")) if ids else (IMPLICIT_DENY,)
    verdicts = details.get("policy")
    if verdicts is None or details.get("code") != "no_identity":
        return ()
    found: list[str] = []
    for verdict in verdicts.split(" | "):
        match = _AGENT_DENIAL.match(verdict)
        if match is None:  # an entry the policy allowed: something else refused the call
            return ()
        found.extend(match.group(1).split(",") if match.group(1) else [IMPLICIT_DENY])
    return tuple(dict.fromkeys(found))


def _seconds(milliseconds: str) -> float | None:
    try:
        value = float(milliseconds) / 1000
    except ValueError:
        return None
    return value if value >= 0 else None


class _StatusCollector:
    """Gauges read from the agent's status at each scrape: node state, TPM, audit log."""

    def __init__(self, status: StatusSource, errors: Counter) -> None:
        self._status = status
        self._errors = errors
        self._failures = _Once("the metrics could not read the agent's status")

    def collect(self) -> Iterable[Metric]:
        try:
            return list(status_metrics(self._status()))
        except Exception as err:
            self._errors.inc()
            self._failures.failed(err)
            return []


def status_metrics(status: Mapping[str, Any]) -> Iterator[Metric]:
    """The families read from one `Agent.status()`; each is there even when it has no sample yet."""
    node = status.get("node")
    current = "starting" if node is None else str(node["state"])
    state = GaugeMetricFamily("vouchd_node_state", "The node's state: 1 for the current one",
                              labels=["state"])
    for name in (*NODE_STATES, *(() if current in NODE_STATES else (current,))):
        state.add_metric([name], 1.0 if name == current else 0.0)
    yield state

    tpm = status.get("tpm") or {}
    up = GaugeMetricFamily("vouchd_tpm_up", "1 while the TPM answers (no sample at the static-secret tier)")
    if tpm.get("state", "none") != "none":
        up.add_metric([], 1.0 if tpm.get("state") == "ok" else 0.0)
    yield up
    operations = CounterMetricFamily("vouchd_tpm_operations", "TPM operations by operation",
                                     labels=["operation"])
    latency = GaugeMetricFamily("vouchd_tpm_operation_latency_seconds",
                                "TPM operation time on the TPM's thread: median and 99th percentile of the "
                                "recent operations", labels=["operation", "quantile"])
    latency_max = GaugeMetricFamily("vouchd_tpm_operation_latency_max_seconds",
                                    "The longest TPM operation since the agent started", labels=["operation"])
    for operation, figures in sorted((status.get("tpm_latency_ms") or {}).items()):
        operations.add_metric([operation], float(figures["count"]))
        latency.add_metric([operation, "0.5"], float(figures["p50_ms"]) / 1000)
        latency.add_metric([operation, "0.99"], float(figures["p99_ms"]) / 1000)
        latency_max.add_metric([operation], float(figures["max_ms"]) / 1000)
    yield from (operations, latency, latency_max)

    audit = status.get("audit")
    failing = GaugeMetricFamily("vouchd_audit_log_failing",
                                "1 while audit records cannot be written (nothing is handed out meanwhile)")
    anchor_failing = GaugeMetricFamily("vouchd_audit_anchor_failing", "1 while the last audit anchor failed")
    if audit is not None:
        failing.add_metric([], 0.0 if audit.get("failure") is None else 1.0)
        anchor_failing.add_metric([], 0.0 if audit.get("anchor_failure") is None else 1.0)
    yield from (failing, anchor_failing)


class MetricsServer:
    """`GET /metrics` over HTTP on a loopback address, answered on the event loop (the status it reads
    belongs to the loop), one request per connection."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self._registry = registry
        self._host, self._port = host, port
        self._server: asyncio.Server | None = None
        self._connections: set[asyncio.Task[Any]] = set()
        self._failures = _Once("a metrics scrape could not be answered")

    @property
    def address(self) -> str:
        return f"[{self._host}]:{self._port}" if ":" in self._host else f"{self._host}:{self._port}"

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._connected, self._host, self._port,
                                                      limit=_MAX_REQUEST_BYTES, reuse_address=True)
        except OSError as err:
            why = os.strerror(err.errno) if err.errno else str(err)  # asyncio's message repeats the address
            raise VouchdError(f"cannot serve metrics on {self.address} (agent.metrics.listen): {why.lower()}") from None
        log.info("metrics served", extra={"url": f"http://{self.address}/metrics"})

    async def close(self) -> None:
        """Stop listening and end every open connection, within CLOSE_LIMIT."""
        if self._server is None:
            return
        server, self._server = self._server, None
        server.close()
        for task in self._connections:
            task.cancel()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CLOSE_LIMIT):
                if self._connections:
                    await asyncio.wait(self._connections)
                await server.wait_closed()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or len(self._connections) >= _MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._connections.add(task)
        answered = False
        try:
            async with asyncio.timeout(REQUEST_LIMIT):
                head = await reader.readuntil(b"\r\n\r\n")
                writer.write(self._answer(head))
                await writer.drain()
            answered = True
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # a client that went away, dawdled or sent too much: nothing to answer
        except Exception as err:
            self._failures.failed(err)
        finally:
            self._connections.discard(task)
            if answered:
                writer.close()
            else:
                writer.transport.abort()

    def _answer(self, head: bytes) -> bytes:
        lines = head.decode("latin-1").split("\r\n")
        request = lines[0].split(" ")
        if len(request) != 3 or not request[2].startswith("HTTP/"):
            return _response(400, "Bad Request", b"not an http request\n")
        method, target = request[0], request[1]
        if target.split("?", 1)[0] != "/metrics":
            return _response(404, "Not Found", b"metrics are at /metrics\n")
        if method not in ("GET", "HEAD"):
            return _response(405, "Method Not Allowed", b"only GET and HEAD\n", allow="GET, HEAD")
        headers = {name.strip().lower(): value.strip()
                   for name, _, value in (line.partition(":") for line in lines[1:] if line)}
        encode, content_type = choose_encoder(headers.get("accept", ""))
        try:
            body = encode(self._registry)
        except Exception as err:
            self._failures.failed(err)
            return _response(500, "Internal Server Error", b"metrics could not be collected\n")
        return _response(200, "OK", body, content_type=content_type, head_only=method == "HEAD")


def _response(code: int, reason: str, body: bytes, *, content_type: str = "text/plain; charset=utf-8",
              allow: str | None = None, head_only: bool = False) -> bytes:
    headers = [f"HTTP/1.1 {code} {reason}", f"Content-Type: {content_type}", f"Content-Length: {len(body)}",
               "Connection: close", *([f"Allow: {allow}"] if allow else [])]
    return ("\r\n".join(headers) + "\r\n\r\n").encode("latin-1") + (b"" if head_only else body)


@contextlib.asynccontextmanager
async def serving_metrics(settings: MetricsConfig, decisions: DecisionSource,
                          status: StatusSource) -> AsyncIterator[MetricsServer | None]:
    """Count `decisions` and serve the metrics at `settings.listen` while the block runs; nothing
    when metrics are off. A port that cannot be bound fails here, before anything else starts."""
    if settings.listen is None:
        yield None
        return
    registry = CollectorRegistry()
    metrics = AgentMetrics(registry, status)
    server = MetricsServer(registry, *settings.listen)
    await server.start()
    unsubscribe = decisions.subscribe(metrics.record)
    try:
        yield server
    finally:
        unsubscribe()
        await server.close()
