"""The values request-time policy reads and answers: a request (who, what, on what, in which
situation) and a decision (yes or no, which policies said so, and why).

They are frozen and normalised (sets sorted, duplicates dropped) so that two requests that mean the
same compare and hash equal: the engine caches decisions by them. Nothing here knows Cedar; the
schema (schema.py) mirrors these fields one to one.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass

from vouchd.errors import VouchdError
from vouchd.spiffe import TrustTier

__all__ = [
    "IMPLICIT_DENY_REASON",
    "Audience",
    "InvalidPolicyRequestError",
    "PolicyAction",
    "PolicyContext",
    "PolicyDecision",
    "PolicyRequest",
    "Resource",
    "TrustDomain",
    "Workload",
]

IMPLICIT_DENY_REASON = "no policy permits it"

# Cedar's Long is a signed 64-bit integer: a larger value cannot be handed to it.
_CEDAR_LONG_MAX = 2**63 - 1


class InvalidPolicyRequestError(VouchdError):
    """A policy request that cannot be asked: an action with the wrong kind of resource, a negative TTL."""


class PolicyAction(enum.StrEnum):
    FETCH_X509_SVID = "FetchX509SVID"
    FETCH_JWT_SVID = "FetchJWTSVID"
    VALIDATE_JWT_SVID = "ValidateJWTSVID"


def _normalised(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(set(values)))


def _check_long(name: str, value: int | None, *, minimum: int = 0) -> None:
    if value is not None and not minimum <= value <= _CEDAR_LONG_MAX:
        raise InvalidPolicyRequestError(f"{name} {value} is out of range ({minimum} to 2^63-1)")


@dataclass(frozen=True, slots=True)
class Workload:
    """The principal: a process as the registration entry it matched names it."""

    spiffe_id: str
    tier: TrustTier
    selectors: tuple[str, ...]
    uid: int | None                                   # None where the evaluator cannot know it (the authority)
    entry_id: str
    labels: tuple[tuple[str, str], ...] = ()          # the entry's labels: Cedar tags
    parent_spiffe_id: str | None = None
    lineage_depth: int = 0
    # what the parent holds, for attenuation; None when it is not known (no parent, or not tracked)
    parent_audiences: tuple[str, ...] | None = None
    parent_ttl_seconds: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "selectors", _normalised(self.selectors))
        labels = dict(self.labels)
        if len(labels) != len(self.labels):
            raise InvalidPolicyRequestError(f"workload {self.spiffe_id} has a label key twice")
        object.__setattr__(self, "labels", tuple(sorted(labels.items())))
        if self.parent_audiences is not None:
            object.__setattr__(self, "parent_audiences", _normalised(self.parent_audiences))
        _check_long("uid", self.uid)
        _check_long("lineage_depth", self.lineage_depth)
        _check_long("parent_ttl_seconds", self.parent_ttl_seconds)


@dataclass(frozen=True, slots=True)
class Audience:
    """The resource of FetchJWTSVID and ValidateJWTSVID. Its risk comes from the engine's configuration."""

    name: str


@dataclass(frozen=True, slots=True)
class TrustDomain:
    """The resource of FetchX509SVID: the trust domain name, e.g. `example.org`."""

    name: str


Resource = Audience | TrustDomain


@dataclass(frozen=True, slots=True)
class PolicyContext:
    """The situation of one request. The engine rounds `quote_age_seconds` up to 30 s and `now` down
    to the minute before policies see them (engine.py says why)."""

    node_state: str                       # "trusted", "stale", "unconfirmed", "banned", ...
    new_credential: bool = True           # the answer needs a credential not held yet; False: cached, or validating
    ttl_seconds: int = 0                  # the lifetime asked for or about to be given; 0 when validating
    audiences: tuple[str, ...] = ()       # every audience of the request
    quote_age_seconds: int | None = None  # None: no quote (the static-secret tier)
    pcr_profile: str | None = None
    now: int | None = None                # seconds since the epoch; None: the engine's clock

    def __post_init__(self) -> None:
        object.__setattr__(self, "audiences", _normalised(self.audiences))
        _check_long("ttl_seconds", self.ttl_seconds)
        _check_long("quote_age_seconds", self.quote_age_seconds)
        _check_long("now", self.now)


_RESOURCE_OF: dict[PolicyAction, type[Audience] | type[TrustDomain]] = {
    PolicyAction.FETCH_X509_SVID: TrustDomain,
    PolicyAction.FETCH_JWT_SVID: Audience,
    PolicyAction.VALIDATE_JWT_SVID: Audience,
}


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    """May `principal` do `action` on `resource`, now? One audience per request: a JWT request for
    several is several requests, allowed only if each is (PolicyDecision.all_of)."""

    principal: Workload
    action: PolicyAction
    resource: Resource
    context: PolicyContext

    def __post_init__(self) -> None:
        expected = _RESOURCE_OF[self.action]
        if not isinstance(self.resource, expected):
            raise InvalidPolicyRequestError(
                f"{self.action} takes a {expected.__name__} resource, not a {type(self.resource).__name__}")


@dataclass(frozen=True, slots=True)
class PolicyDecision:
    """The answer, and what decided it: for an allow, the permits that matched; for a deny, the
    forbids that matched (or the policies that failed to evaluate); for the implicit deny (nothing
    permits it), no policy at all. `reasons` are the deciding policies' `@reason` annotations."""

    allowed: bool
    policy_ids: tuple[str, ...]
    reasons: tuple[str, ...]
    policy_version: str = ""              # the loaded policy set that decided (PolicyEngine.policy_version)

    @classmethod
    def all_of(cls, decisions: Iterable[PolicyDecision]) -> PolicyDecision:
        """One decision for a request judged in parts (a JWT for several audiences): allowed only if
        every part is; a denial names what denied each refused part."""
        parts = list(decisions)
        if not parts:
            raise InvalidPolicyRequestError("no decisions to combine: a request needs at least one part")
        allowed = all(d.allowed for d in parts)
        deciding = parts if allowed else [d for d in parts if not d.allowed]
        return cls(
            allowed=allowed,
            policy_ids=tuple(dict.fromkeys(i for d in deciding for i in d.policy_ids)),
            reasons=tuple(dict.fromkeys(r for d in deciding for r in d.reasons)),
            policy_version=parts[0].policy_version,
        )
