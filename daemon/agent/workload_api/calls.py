"""One Workload API call as a decision: who asked, what they were answered, and why.

A `Call` collects the evidence while the request proceeds (the caller's credentials, start time and
selectors, the SPIFFE IDs handed out); `RefusedError` ends a request with the status the workload sees
and the detail only the decision records. `Call.decision` turns either into a `Decision`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from grpclib.const import Status
from grpclib.server import Stream

from vouchd.agent.workload_api.errors import PeerError
from vouchd.agent.workload_api.identities import WORKLOAD_API_SOURCE
from vouchd.agent.workload_api.peer import peer_credentials
from vouchd.attestors.base import WorkloadAttestation, WorkloadProcess
from vouchd.clock import Clock
from vouchd.decisions import CallerEvidence, Decision, DecisionKind, Outcome

__all__ = ["UNIDENTIFIED", "Call", "RefusedError"]

UNIDENTIFIED = -1  # pid and uid of a caller the request ended before identifying

_ATTESTATION_FAILED = "workload attestation failed"
_NO_IDENTITY = "no identity issued"

# The decision's `code` detail, what the workload was answered -> the decision it is.
_DECISIONS = {
    "attestation_failed": (DecisionKind.DENY, Outcome.DENIED),
    "no_identity": (DecisionKind.DENY, Outcome.DENIED),
    "invalid_argument": (DecisionKind.DENY, Outcome.INVALID),
    "resource_exhausted": (DecisionKind.DENY, Outcome.DENIED),  # a per-uid cap (limits.py)
    "unimplemented": (DecisionKind.DENY, Outcome.INVALID),
    "unavailable": (DecisionKind.ISSUE, Outcome.ERROR),
    "error": (DecisionKind.ISSUE, Outcome.ERROR),
}


class RefusedError(Exception):
    """Ends a request with a status; `public` goes to the workload, `detail` only to the decision."""

    def __init__(self, status: Status, code: str, public: str, detail: str) -> None:
        super().__init__(detail)
        if code not in _DECISIONS:
            raise ValueError(f"unknown refusal code {code!r}")
        self.status = status
        self.code = code
        self.public = public
        self.detail = detail

    @classmethod
    def attestation_failed(cls, detail: str) -> RefusedError:
        return cls(Status.PERMISSION_DENIED, "attestation_failed", _ATTESTATION_FAILED, detail)

    @classmethod
    def no_identity(cls, detail: str) -> RefusedError:
        return cls(Status.PERMISSION_DENIED, "no_identity", _NO_IDENTITY, detail)


@dataclass
class Call:
    """What is known about one request; filled in as it proceeds."""

    method: str
    clock: Clock
    started: float = field(init=False)  # clock.monotonic() when the request arrived
    pid: int | None = None
    uid: int | None = None
    start_time: int | None = None
    selectors: tuple[str, ...] = ()
    evidence: tuple[str, ...] = ()
    spiffe_ids: tuple[str, ...] = ()
    details: list[tuple[str, str]] = field(default_factory=list)  # the agent's own (policy verdicts)
    answered: bool = False  # a stream sent its first message: a later decision is the stream's end
    reused: bool = False  # the caller's attestation was an earlier one, still valid (reuse.py)

    def __post_init__(self) -> None:
        self.started = self.clock.monotonic()

    def identify(self, stream: Stream[Any, Any]) -> None:
        """Fill in pid and uid from SO_PEERCRED alone, for a request refused before attestation."""
        try:
            credentials = peer_credentials(stream)
        except PeerError:
            return
        self.pid, self.uid = credentials.pid, credentials.uid

    def attested(self, process: WorkloadProcess, attestation: WorkloadAttestation | None = None) -> None:
        """Fill in what identifying the caller (then attesting it) established."""
        self.pid, self.uid, self.start_time = process.pid, process.uid, process.start_time
        if attestation is not None:
            self.selectors = tuple(sorted(str(selector) for selector in attestation.selectors))
            self.evidence = tuple(str(item) for item in attestation.evidence)

    def duration_ms(self) -> float:
        return round((self.clock.monotonic() - self.started) * 1000, 3)

    def log_fields(self) -> dict[str, object]:
        """For log lines about the call that are not decisions (cancelled, failed, stream updates)."""
        return {"method": self.method, "pid": self.pid, "uid": self.uid, "duration_ms": self.duration_ms()}

    def decision(self, code: str = "", reason: str = "") -> Decision:
        """The call's decision: handed out when `code` is empty, else refused or failed with `reason`."""
        kind, outcome = _DECISIONS[code] if code else (DecisionKind.ISSUE, Outcome.OK)
        details = [("duration_ms", f"{self.duration_ms():.3f}"), *self.details]
        if self.reused:
            details.append(("attestation", "reused"))
        if code:
            details.append(("code", code))
        if self.answered and code:
            details.append(("stream", "ended"))
        return Decision(
            kind=kind,
            outcome=outcome,
            at=self.clock.now(),
            source=WORKLOAD_API_SOURCE,
            method=self.method,
            reason=reason,
            caller=CallerEvidence(
                pid=UNIDENTIFIED if self.pid is None else self.pid,
                uid=UNIDENTIFIED if self.uid is None else self.uid,
                start_time=self.start_time,
                selectors=self.selectors,
                evidence=self.evidence,
            ),
            spiffe_ids=self.spiffe_ids,
            details=tuple(details),
        )
