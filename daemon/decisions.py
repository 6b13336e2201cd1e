"""Decision events: every decision vouchd makes, typed, with the evidence it was made on.

One seam: the Workload API, the SVID cache and the authority emit a `Decision` into a `DecisionSink`;
subscribers turn them into log lines, `vouchd status`, and later the audit log, metrics and
`vouchd explain`. A decision never carries key material: certificates are named by serial, keys
not at all.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

__all__ = [
    "CallerEvidence",
    "Decision",
    "DecisionBus",
    "DecisionKind",
    "DecisionSink",
    "LogDecisions",
    "NodeEvidence",
    "Outcome",
]


class DecisionKind(enum.StrEnum):
    ATTEST = "attest"       # a node attested (authority) or a workload was attested (agent)
    ISSUE = "issue"         # an SVID was signed (authority) or handed to a workload (agent)
    DENY = "deny"           # a request was refused: the reason says why
    ROTATE = "rotate"       # an SVID was replaced before it expired
    REVOKE = "revoke"       # an identity was withdrawn: entry deleted or changed, node banned, profile removed


class Outcome(enum.StrEnum):
    OK = "ok"
    DENIED = "denied"       # attestation failed, no identity, not authorized, revoked
    INVALID = "invalid"     # a request this daemon does not accept (no security header, unknown RPC)
    ERROR = "error"         # ours: something failed that should not have


@dataclass(frozen=True, slots=True)
class CallerEvidence:
    """What the kernel said about a local caller, and the selectors attestation derived from it."""

    pid: int                                    # -1 when the kernel could not say
    uid: int
    start_time: int | None = None               # /proc/<pid>/stat field 22: tells a reused pid apart
    selectors: tuple[str, ...] = ()
    evidence: tuple[str, ...] = ()              # what attestors recorded but nothing matches on, "attestor.name=value"


@dataclass(frozen=True, slots=True)
class NodeEvidence:
    """What the authority verified about the node a decision concerns."""

    node_id: str
    quote_digest: str = ""                      # sha256 of the TPMS_ATTEST the decision rests on
    pcr_profile: str = ""


@dataclass(frozen=True, slots=True)
class Decision:
    kind: DecisionKind
    outcome: Outcome
    at: float                                   # wall-clock time of the decision
    source: str                                 # "workload_api", "svid_cache", "authority", "admin"
    method: str = ""                            # FetchX509SVID, entry.delete, attest, ...
    reason: str = ""                            # empty for a plain success
    caller: CallerEvidence | None = None
    node: NodeEvidence | None = None
    entry_ids: tuple[str, ...] = ()
    spiffe_ids: tuple[str, ...] = ()
    svid_serials: tuple[str, ...] = ()
    details: tuple[tuple[str, str], ...] = field(default=())   # anything else worth keeping, as text

    def fields(self) -> dict[str, object]:
        """Flat structured-log fields; empty parts left out."""
        result: dict[str, object] = {"decision": self.kind.value, "outcome": self.outcome.value,
                                     "source": self.source}
        if self.method:
            result["method"] = self.method
        if self.caller is not None:
            result["pid"], result["uid"] = self.caller.pid, self.caller.uid
            if self.caller.start_time is not None:
                result["start_time"] = self.caller.start_time
            if self.caller.selectors:
                result["selectors"] = list(self.caller.selectors)
            if self.caller.evidence:
                result["evidence"] = list(self.caller.evidence)
        if self.node is not None:
            result["node_id"] = self.node.node_id
            if self.node.quote_digest:
                result["quote_digest"] = self.node.quote_digest
            if self.node.pcr_profile:
                result["pcr_profile"] = self.node.pcr_profile
        for name, values in (("entry_ids", self.entry_ids), ("spiffe_ids", self.spiffe_ids),
                             ("svid_serials", self.svid_serials)):
            if values:
                result[name] = list(values)
        if self.reason:
            result["reason"] = self.reason
        result.update(self.details)
        return result


class DecisionSink(Protocol):
    def emit(self, decision: Decision) -> None:
        """Record a decision. Must return quickly and must not raise."""
        ...


DecisionSubscriber = Callable[[Decision], None]


class DecisionBus:
    """The one DecisionSink of a daemon: hands every decision to each subscriber, in order.

    A subscriber that raises is logged and skipped: recording a decision never changes it.
    """

    def __init__(self) -> None:
        self._subscribers: list[DecisionSubscriber] = []

    def subscribe(self, subscriber: DecisionSubscriber) -> Callable[[], None]:
        """Add a subscriber; returns the function that removes it."""
        self._subscribers.append(subscriber)
        return lambda: self._subscribers.remove(subscriber)

    def emit(self, decision: Decision) -> None:
        for subscriber in tuple(self._subscribers):
            try:
                subscriber(decision)
            except Exception:
                logging.getLogger("vouchd.decisions").exception(
                    "decision subscriber failed", extra={"decision": decision.kind.value})


# Routine outcomes are info; refusals a workload will retry (no entry yet) too. Anything else that
# was refused is a warning; our own failures are errors.
# The `source` of the Workload API's decisions (vouchd.agent.workload_api.identities says the same).
WORKLOAD_API_DECISIONS = "workload_api"
REPEAT_INTERVAL = 60.0      # seconds between log lines of the same repeated Workload API answer
_MAX_REPEAT_KEYS = 16_384   # (method, uid, SPIFFE IDs) remembered for that, the least recent forgotten

_LEVELS = {Outcome.OK: logging.INFO, Outcome.DENIED: logging.INFO, Outcome.INVALID: logging.WARNING,
           Outcome.ERROR: logging.ERROR}


class LogDecisions:
    """Subscriber: one structured log line per decision, on the logger of its source.

    But for the Workload API's plain successes: a workload asking for the same identities again and
    again (a kept stream's updates, a script calling every second, a load) would make one line per
    call, which costs the agent a tenth of its time and buries everything else. The first answer of a
    (method, uid, SPIFFE IDs) is logged, and the same again at most once per `repeat_interval`, then
    with `repeated`: how many identical answers were not logged since. Denials, errors, and every
    other decision are always logged; the audit log and the metrics count every one.
    """

    def __init__(self, prefix: str = "vouchd.decisions", *, repeat_interval: float = REPEAT_INTERVAL,
                 monotonic: Callable[[], float] = time.monotonic) -> None:
        self._prefix = prefix
        self._repeat_interval = repeat_interval
        self._monotonic = monotonic
        # key -> [when last logged, answers not logged since]; the least recently seen forgotten first
        self._repeats: OrderedDict[tuple[object, ...], list[float]] = OrderedDict()

    def __call__(self, decision: Decision) -> None:
        repeated = 0
        if (decision.kind is DecisionKind.ISSUE and decision.outcome is Outcome.OK and decision.caller is not None
                and decision.source == WORKLOAD_API_DECISIONS):
            key = (decision.method, decision.caller.uid, decision.spiffe_ids)
            now = self._monotonic()
            seen = self._repeats.get(key)
            if seen is not None and now - seen[0] < self._repeat_interval:
                seen[1] += 1
                self._repeats.move_to_end(key)
                return
            repeated = int(seen[1]) if seen is not None else 0
            self._repeats[key] = [now, 0]
            self._repeats.move_to_end(key)
            if len(self._repeats) > _MAX_REPEAT_KEYS:
                self._repeats.popitem(last=False)
        logger = logging.getLogger(f"{self._prefix}.{decision.source}")
        level = _LEVELS[decision.outcome]
        if decision.kind is DecisionKind.REVOKE:
            level = logging.WARNING
        fields = decision.fields()
        if repeated:
            fields["repeated"] = repeated
        logger.log(level, f"{decision.kind.value} {decision.outcome.value}", extra=fields)
