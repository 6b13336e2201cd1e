"""The agent's answer to "who is this caller and what may it get": attestors + SVID manager.

This is the real implementation of the narrow `WorkloadIdentities` interface the Workload API
server depends on.
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from vouchd.agent.holders import HoldersFullError, IdentityHolders
from vouchd.agent.jwtsvids import JwtSvidCache
from vouchd.agent.lineage import held_by_ancestors
from vouchd.agent.policing import WorkloadPolicy, decision_details
from vouchd.agent.svids import SvidManager
from vouchd.agent.workload_api.identities import (
    WORKLOAD_API_SOURCE,
    CallerContext,
    InvalidJwtSvidError,
    JwtSvidMaterial,
    NoIdentityError,
    X509SvidMaterial,
)
from vouchd.attestors.base import WorkloadAttestation, WorkloadAttestor, WorkloadProcess, attest_workload
from vouchd.decisions import Decision, Outcome
from vouchd.entries import Entry
from vouchd.policy import PolicyDecision
from vouchd.spiffe import InvalidSvidError, TrustDomain

__all__ = ["AgentWorkloadIdentities", "WorkloadActivity"]

_RECENT_REFUSALS = 20
_UNKNOWN = -1  # pid or uid of a caller the Workload API could not identify


class AgentWorkloadIdentities:
    def __init__(self, trust_domain: TrustDomain, attestors: Sequence[WorkloadAttestor], svids: SvidManager,
                 jwt_svids: JwtSvidCache, *, holders: IdentityHolders | None = None,
                 policy: WorkloadPolicy | None = None) -> None:
        self._trust_domain_id = str(trust_domain.id)
        self._attestors = list(attestors)
        self._svids = svids
        self._jwt_svids = jwt_svids
        self._holders = holders
        self._policy = policy

    def _permitted(self, caller: CallerContext, judge: Callable[[Entry], PolicyDecision]) -> frozenset[str] | None:
        """The ids of the caller's matched entries the policy permits (None: no policy), its verdicts
        recorded for the call's decision; NoIdentityError naming the policies when it permits none."""
        if self._policy is None:
            return None
        matched = [e for e in self._svids.match(caller.selectors, ancestors_hold=held_by_ancestors(caller.evidence))
                   if not caller.spiffe_id or str(e.spiffe_id) == caller.spiffe_id]  # FetchJWTSVID may name one
        verdicts = [(entry, judge(entry)) for entry in matched]
        caller.details[:] = decision_details(verdicts)
        permitted = frozenset(entry.id for entry, verdict in verdicts if verdict.allowed)
        if matched and not permitted:
            _, verdict = verdicts[0]
            raise NoIdentityError(f"denied by policy {', '.join(verdict.policy_ids) or '(none permits it)'}: "
                                  f"{'; '.join(verdict.reasons)}")
        return permitted

    def _handing(self, caller: CallerContext, spiffe_ids: Iterable[str]) -> None:
        """Remember that the caller holds these identities, for the lineage of its children."""
        if self._holders is None:
            return
        try:
            self._holders.record(caller.process.pid, caller.process.start_time, spiffe_ids)
        except HoldersFullError as err:
            raise NoIdentityError(str(err)) from None

    async def attest(self, process: WorkloadProcess) -> WorkloadAttestation:
        # The Workload API service bounds this with the configured attestation deadline.
        return await attest_workload(process, self._attestors)

    def entitled(self, caller: CallerContext) -> bool:
        return bool(self._svids.match(caller.selectors, ancestors_hold=held_by_ancestors(caller.evidence)))

    async def x509_svids(self, caller: CallerContext) -> Sequence[X509SvidMaterial]:
        permitted = self._permitted(caller, lambda entry: self._x509_verdict(caller, entry))
        svids = await self._svids.x509_svids(caller.selectors, ancestors_hold=held_by_ancestors(caller.evidence),
                                             only=permitted)
        self._handing(caller, (svid.spiffe_id for svid in svids))
        return svids

    def _x509_verdict(self, caller: CallerContext, entry: Entry) -> PolicyDecision:
        assert self._policy is not None
        return self._policy.x509(caller, entry, held=self._svids.holds(entry.id))

    def _jwt_verdict(self, caller: CallerContext, entry: Entry) -> PolicyDecision:
        assert self._policy is not None
        return self._policy.jwt(caller, entry, caller.audiences,
                                held=self._jwt_svids.holds(entry, caller.audiences))

    def _validate_verdict(self, caller: CallerContext, entry: Entry, audience: str) -> PolicyDecision:
        assert self._policy is not None
        return self._policy.validate(caller, entry, audience)

    def x509_bundles(self) -> Mapping[str, bytes]:
        return {self._trust_domain_id: self._svids.bundle_der()}

    async def jwt_svids(self, caller: CallerContext) -> Sequence[JwtSvidMaterial]:
        permitted = self._permitted(caller, lambda entry: self._jwt_verdict(caller, entry))
        svids = await self._jwt_svids.jwt_svids(caller.selectors, caller.audiences, caller.spiffe_id,
                                                ancestors_hold=held_by_ancestors(caller.evidence), only=permitted)
        self._handing(caller, (svid.spiffe_id for svid in svids))
        return [JwtSvidMaterial(spiffe_id=svid.spiffe_id, token=svid.token, hint=svid.hint) for svid in svids]

    def jwt_bundles(self) -> Mapping[str, bytes]:
        return self._jwt_svids.jwt_bundles()

    def validate_jwt_svid(self, caller: CallerContext, token: str, audience: str) -> tuple[str, Mapping[str, Any]]:
        # Any local process may validate (it could with the bundle); the policy speaks for the
        # callers an entry names: validation is theirs unless it forbids it for every one of them.
        if self._policy is not None:
            self._permitted(caller, lambda entry: self._validate_verdict(caller, entry, audience))
        try:
            return self._jwt_svids.validate(token, audience)
        except InvalidSvidError as err:
            raise InvalidJwtSvidError(str(err)) from None

    @property
    def version(self) -> int:
        return self._svids.version

    async def wait_for_change(self, seen_version: int) -> int:
        return await self._svids.wait_for_change(seen_version)


class WorkloadActivity:
    """What `vouchd status` shows about callers: open streams, request outcomes, the latest refusals.

    A subscriber of the agent's decision bus (`record`) for the outcomes, and the Workload API's
    WorkloadApiObserver for open streams, which are not decisions.
    """

    def __init__(self) -> None:
        self._open_streams: Counter[str] = Counter()
        self._outcomes: Counter[str] = Counter()
        self._refusals: deque[Decision] = deque(maxlen=_RECENT_REFUSALS)

    def record(self, decision: Decision) -> None:
        """Count a Workload API decision; keep it if it was not ok. Other sources' decisions are not ours."""
        if decision.source != WORKLOAD_API_SOURCE:
            return
        self._outcomes[decision.outcome.value] += 1
        if decision.outcome is not Outcome.OK:
            self._refusals.append(decision)

    def stream_opened(self, method: str, pid: int, uid: int) -> None:
        self._open_streams[method] += 1

    def stream_closed(self, method: str, pid: int, uid: int) -> None:
        self._open_streams[method] -= 1
        if self._open_streams[method] <= 0:
            del self._open_streams[method]

    def snapshot(self) -> dict[str, Any]:
        return {
            "open_streams": dict(self._open_streams),
            "requests": dict(self._outcomes),
            "recent_denials": [_refusal_fields(refusal) for refusal in reversed(self._refusals)],
        }


def _refusal_fields(decision: Decision) -> dict[str, Any]:
    caller = decision.caller
    return {
        "at": decision.at,
        "method": decision.method,
        "pid": caller.pid if caller is not None else _UNKNOWN,
        "uid": caller.uid if caller is not None else _UNKNOWN,
        "outcome": decision.outcome.value,
        "reason": decision.reason,
    }
