"""The authority evaluates the request-time policy again before it signs (docs/design.md §7).

The agent decides for every caller with everything it sees of the process. The authority cannot see
the process, but it owns the facts a compromised agent could lie about: the node's tier and state,
the age of its last verified quote, its PCR profile, the entry (its SPIFFE ID, labels, selectors),
the TTL it is about to sign and the audiences. It judges the same policy set with those, so a node
whose agent skips or falsifies its own evaluation still gets nothing the policy forbids given what
the authority knows: a static-secret node's high-risk audience, a JWT longer than its tier allows,
an X.509-SVID its entry does not allow.

What only the agent can see comes from the entry, the one statement the authority has about every
process it matches: `uid` where the entry pins exactly one `unix:uid`, the lineage depth and parent
where it pins `lineage:depth` and `lineage:parent_spiffe_id`. A request bounded by a parent's expiry
(`not_after`) has a parent: its depth is at least 1 and the time left is the parent's TTL.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

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

__all__ = ["AuthorityPolicy", "NodeStanding"]


@dataclass(frozen=True)
class NodeStanding:
    """The node as the authority's own records have it, for the policy context."""

    tier: TrustTier
    state: str                          # the node record's state: "trusted" for any node that gets this far
    quote_age_seconds: int | None       # None: the static-secret tier never quotes
    pcr_profile: str | None


class AuthorityPolicy:
    def __init__(self, engine: PolicyEngine, trust_domain: str, clock: Clock) -> None:
        self._engine = engine
        self._trust_domain = trust_domain
        self._clock = clock

    def x509_svid(self, entry: Entry, node: NodeStanding, *, ttl_seconds: int, not_after: int) -> PolicyDecision:
        return self._engine.evaluate(PolicyRequest(
            self._principal(entry, node, not_after), PolicyAction.FETCH_X509_SVID, TrustDomain(self._trust_domain),
            self._context(node, ttl_seconds, ())))

    def jwt_svid(self, entry: Entry, node: NodeStanding, *, audiences: Iterable[str], ttl_seconds: int,
                 not_after: int) -> PolicyDecision:
        principal = self._principal(entry, node, not_after)
        wanted = tuple(audiences)
        context = self._context(node, ttl_seconds, wanted)
        return self._engine.evaluate_all(PolicyRequest(principal, PolicyAction.FETCH_JWT_SVID, Audience(audience),
                                                       context) for audience in wanted)

    def _principal(self, entry: Entry, node: NodeStanding, not_after: int) -> Workload:
        pinned = _pinned(entry)
        uids = pinned.get(("unix", "uid"), [])
        depths = pinned.get(("lineage", "depth"), [])
        parents = pinned.get(("lineage", "parent_spiffe_id"), [])
        parent_ttl = max(0, math.floor(not_after - self._clock.now())) if not_after else None
        depth = int(depths[0]) if len(depths) == 1 and depths[0].isdigit() else (1 if not_after else 0)
        return Workload(
            spiffe_id=str(entry.spiffe_id), tier=node.tier, selectors=tuple(str(s) for s in entry.selectors),
            uid=int(uids[0]) if len(uids) == 1 and uids[0].isdigit() else None, entry_id=entry.id,
            labels=entry.labels, parent_spiffe_id=parents[0] if len(parents) == 1 else None,
            lineage_depth=depth, parent_ttl_seconds=parent_ttl)

    def _context(self, node: NodeStanding, ttl_seconds: int, audiences: tuple[str, ...]) -> PolicyContext:
        return PolicyContext(node_state=node.state, new_credential=True, ttl_seconds=ttl_seconds,
                             audiences=audiences, quote_age_seconds=node.quote_age_seconds,
                             pcr_profile=node.pcr_profile)


def _pinned(entry: Entry) -> dict[tuple[str, str], list[str]]:
    values: dict[tuple[str, str], list[str]] = {}
    for selector in entry.selectors:
        values.setdefault((selector.type, selector.key), []).append(selector.value)
    return values
