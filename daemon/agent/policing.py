"""Request-time policy on the agent: what a matched entry's caller may be handed now (design §7).

An entry says who a process is; the policy (vouchd.policy, Cedar) says whether it may have that
identity's X.509-SVID, or a JWT-SVID for these audiences, at this moment: the node's state and
tier, how old its last quote is, the caller's lineage, the TTL asked. Every Workload API call that
would hand something out asks, per matched entry; an entry the policy denies is left out of the
answer, and the deciding policy ids go into the call's decision.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from vouchd.agent.workload_api.identities import CallerContext
from vouchd.clock import Clock
from vouchd.entries import Entry
from vouchd.policy import (
    Audience,
    PolicyAction,
    PolicyContext,
    PolicyDecision,
    PolicyEngine,
    PolicyRequest,
    TrustDomain,
    Workload,
)
from vouchd.spiffe import TrustTier

__all__ = ["NodeFacts", "WorkloadPolicy", "decision_details"]


@dataclass(frozen=True, slots=True)
class NodeFacts:
    """What the policy context says about this node, now."""

    tier: TrustTier
    state: str                       # trusted, stale, unconfirmed, banned
    quote_age_seconds: int | None    # whole seconds, rounded up: a quote never looks fresher than it is
    pcr_profile: str | None


class WorkloadPolicy:
    """The agent's questions to the policy engine, one per (caller, entry, action)."""

    def __init__(self, engine: PolicyEngine, trust_domain: str, node: Callable[[], NodeFacts], *,
                 clock: Clock, parent_expiry: Callable[[str], float | None],
                 parent_audiences: Callable[[str], tuple[str, ...] | None] = lambda _: None) -> None:
        self._engine = engine
        self._trust_domain = trust_domain
        self._node = node
        self._clock = clock
        self._parent_expiry = parent_expiry
        self._parent_audiences = parent_audiences

    @property
    def engine(self) -> PolicyEngine:
        return self._engine

    def x509(self, caller: CallerContext, entry: Entry, *, held: bool) -> PolicyDecision:
        """May the caller be handed `entry`'s X.509-SVID (`held`: one this agent holds already)?"""
        ttl = int(entry.x509_ttl.total_seconds()) if entry.x509_ttl else 0
        return self._engine.evaluate(PolicyRequest(
            self._principal(caller, entry), PolicyAction.FETCH_X509_SVID, TrustDomain(self._trust_domain),
            self._context(new_credential=not held, ttl=ttl)))

    def jwt(self, caller: CallerContext, entry: Entry, audiences: Sequence[str], *, held: bool) -> PolicyDecision:
        """May the caller be handed a JWT-SVID of `entry` for every one of `audiences`?"""
        ttl = int(entry.jwt_ttl.total_seconds()) if entry.jwt_ttl else 0
        principal = self._principal(caller, entry)
        context = self._context(new_credential=not held, ttl=ttl, audiences=tuple(audiences))
        return self._engine.evaluate_all(PolicyRequest(principal, PolicyAction.FETCH_JWT_SVID, Audience(audience),
                                                       context) for audience in audiences)

    def validate(self, caller: CallerContext, entry: Entry, audience: str) -> PolicyDecision:
        """May the caller, as `entry` names it, validate JWT-SVIDs for `audience`? Nothing is issued."""
        return self._engine.evaluate(PolicyRequest(
            self._principal(caller, entry), PolicyAction.VALIDATE_JWT_SVID, Audience(audience),
            self._context(new_credential=False, ttl=0, audiences=(audience,))))

    def _principal(self, caller: CallerContext, entry: Entry) -> Workload:
        parents = sorted(s.value for s in caller.selectors if (s.type, s.key) == ("lineage", "parent_spiffe_id"))
        depth = next((int(s.value) for s in caller.selectors if (s.type, s.key) == ("lineage", "depth")), 0)
        parent = parents[0] if parents else None
        parent_ttl = None
        if parent is not None and (expiry := self._parent_expiry(parent)) is not None:
            parent_ttl = max(0, int(expiry - self._clock.now()))
        return Workload(
            spiffe_id=str(entry.spiffe_id), tier=self._node().tier,
            selectors=tuple(sorted(str(s) for s in caller.selectors)), uid=caller.process.uid, entry_id=entry.id,
            labels=entry.labels, parent_spiffe_id=parent, lineage_depth=depth,
            parent_audiences=self._parent_audiences(parent) if parent is not None else None,
            parent_ttl_seconds=parent_ttl)

    def _context(self, *, new_credential: bool, ttl: int, audiences: tuple[str, ...] = ()) -> PolicyContext:
        node = self._node()
        return PolicyContext(node_state=node.state, new_credential=new_credential, ttl_seconds=ttl,
                             audiences=audiences, quote_age_seconds=node.quote_age_seconds,
                             pcr_profile=node.pcr_profile)


def decision_details(decisions: Sequence[tuple[Entry, PolicyDecision]]) -> list[tuple[str, str]]:
    """What a call's decision records of the policy: each entry's verdict and the policies that decided it."""
    if not decisions:
        return []
    verdicts = []
    for entry, decision in decisions:
        verdict = "allow" if decision.allowed else "deny"
        verdicts.append(f"{entry.id} {verdict} by {','.join(decision.policy_ids) or 'no policy'}"
                        + ("" if decision.allowed else f": {'; '.join(decision.reasons)}"))
    # One `policy` detail: a log line keeps one value per name.
    return [("policy", " | ".join(verdicts)), ("policy_version", decisions[0][1].policy_version)]
