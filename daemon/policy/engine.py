"""Request-time policy: evaluate requests on the loaded Cedar policies, cache the decisions, reload
without ever running on a half-valid set. Which files and how they are checked: loading.py.

*Evaluation.* Cedar's decision, and the policies that made it: the permits that matched, or the
forbids that matched, or none (nothing permits it). A policy that fails to evaluate denies the
request (fail closed: Cedar would simply skip it, and a skipped forbid allows what it was for).

*The cache.* Decisions are kept per (principal, action, resource, context), LRU-bounded. The
context's time-varying values are coarsened *before* policies see them — `now` down to the minute,
`quote_age_seconds` up to a multiple of 30 (up: a quote never looks fresher than it is) — and
everything else is kept exactly. So the key holds everything a policy can read, and a decision
from the cache is the decision evaluation would make: a cached answer is never a stale one. Every
value of the principal (attributes, labels, what its parent holds) is part of the key, so a changed
entry cannot hit an old decision either; invalidate() (on any entry change) and any new policy set
drop the cache all the same. An audience's risk is not in the key: it is fixed for a policy set.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from vouchd.clock import SYSTEM_CLOCK, Clock
from vouchd.policy import cedar
from vouchd.policy.loading import UNKNOWN_RISK, LoadedPolicy, PolicyError, PolicySet, load_policy_set
from vouchd.policy.model import (
    IMPLICIT_DENY_REASON,
    Audience,
    PolicyAction,
    PolicyContext,
    PolicyDecision,
    PolicyRequest,
    Resource,
    Workload,
)

__all__ = ["DEFAULT_CACHE_SIZE", "CacheStats", "PolicyEngine", "ReloadResult"]

DEFAULT_CACHE_SIZE = 10_000
_NOW_BUCKET = 60
_QUOTE_AGE_BUCKET = 30
_CEDAR_LONG_MAX = 2**63 - 1


@dataclass(frozen=True, slots=True)
class ReloadResult:
    """What reload() did: `applied` when the files were valid (the set in force is theirs), `changed`
    when that altered the set; else `error` says why, and the previous set stays in force."""

    applied: bool
    changed: bool
    policy_version: str         # the version in force after the reload
    previous_version: str
    error: PolicyError | None = None


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int
    size: int


class _DecisionCache:
    """A bounded LRU; its own lock, so the authority may evaluate on several threads."""

    def __init__(self, capacity: int) -> None:
        self._capacity = capacity
        self._entries: OrderedDict[object, PolicyDecision] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: object) -> PolicyDecision | None:
        with self._lock:
            decision = self._entries.get(key)
            if decision is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return decision

    def put(self, key: object, decision: PolicyDecision) -> None:
        with self._lock:
            self._entries[key] = decision
            self._entries.move_to_end(key)
            while len(self._entries) > self._capacity:
                self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


@dataclass(frozen=True, slots=True)
class _InForce:
    """The policy set in force and its decisions: replaced whole, so that an evaluation sees one set,
    and a decision of an old set never lands in the cache of a new one."""

    policies: PolicySet
    cache: _DecisionCache


class PolicyEngine:
    """Cedar policies for the Workload API (agent) and for signing (authority). Build with load()."""

    def __init__(self, policies: PolicySet, *, paths: tuple[Path, ...], include_defaults: bool,
                 clock: Clock, cache_size: int) -> None:
        self._in_force = _InForce(policies, _DecisionCache(cache_size))
        self._paths = paths
        self._include_defaults = include_defaults
        self._clock = clock
        self._cache_size = cache_size

    @classmethod
    def load(cls, paths: Sequence[Path] | None, *, audiences: Mapping[str, str], clock: Clock = SYSTEM_CLOCK,
             include_defaults: bool = True, cache_size: int = DEFAULT_CACHE_SIZE) -> PolicyEngine:
        """The default policies plus the files at `paths`; PolicyError naming the file and line of the
        first problem. `audiences` maps an audience to its risk, "low" or "high"."""
        if cache_size < 1:
            raise PolicyError(f"the decision cache needs room for at least 1 decision, got {cache_size}")
        files = tuple(paths or ())
        policies = load_policy_set(files, include_defaults, audiences)
        return cls(policies, paths=files, include_defaults=include_defaults, clock=clock, cache_size=cache_size)

    @property
    def policy_version(self) -> str:
        """sha256 of the schema, every loaded file's name and text, and the audience risks: equal
        versions decide every request alike. For the audit log."""
        return self._in_force.policies.version

    @property
    def policies(self) -> tuple[LoadedPolicy, ...]:
        """The loaded policies in load order: for `vouchd explain` and listing."""
        return tuple(self._in_force.policies.policies.values())

    @property
    def cache_stats(self) -> CacheStats:
        cache = self._in_force.cache
        return CacheStats(cache.hits, cache.misses, len(cache))

    def evaluate(self, request: PolicyRequest) -> PolicyDecision:
        in_force = self._in_force              # one set for the whole evaluation, whatever reload does
        context = _coarsened(request.context, self._clock)
        key = (request.principal, request.action, request.resource, context)
        decision = in_force.cache.get(key)
        if decision is None:
            decision = _decide(in_force.policies, request.principal, request.action, request.resource, context)
            in_force.cache.put(key, decision)
        return decision

    def evaluate_all(self, requests: Iterable[PolicyRequest]) -> PolicyDecision:
        """One decision for a request judged in parts (a JWT for several audiences): allowed only if
        every part is."""
        return PolicyDecision.all_of(self.evaluate(r) for r in requests)

    def invalidate(self) -> None:
        """Drop every cached decision (an entry changed). Evaluations under way finish on the old cache."""
        self._in_force = replace(self._in_force, cache=_DecisionCache(self._cache_size))

    def reload(self, *, audiences: Mapping[str, str] | None = None) -> ReloadResult:
        """Read the same files again (and take new audience risks, if given); switch to them only if
        all are valid, else keep the set in force and return the error for the caller to log."""
        previous = self._in_force.policies
        try:
            loaded = load_policy_set(self._paths, self._include_defaults,
                                     previous.audiences if audiences is None else audiences)
        except PolicyError as err:
            return ReloadResult(applied=False, changed=False, policy_version=previous.version,
                                previous_version=previous.version, error=err)
        changed = loaded.version != previous.version
        if changed:
            self._in_force = _InForce(loaded, _DecisionCache(self._cache_size))
        return ReloadResult(applied=True, changed=changed, policy_version=loaded.version,
                            previous_version=previous.version)


# -- evaluation ------------------------------------------------------------------------------------


def _coarsened(context: PolicyContext, clock: Clock) -> PolicyContext:
    """The context as policies see it: `now` down to the minute, the quote age up to 30 s (module doc)."""
    now = int(clock.now()) if context.now is None else context.now
    quote_age = context.quote_age_seconds
    if quote_age is not None:
        quote_age = min(-(-quote_age // _QUOTE_AGE_BUCKET) * _QUOTE_AGE_BUCKET, _CEDAR_LONG_MAX)
    return replace(context, now=now - now % _NOW_BUCKET, quote_age_seconds=quote_age)


def _decide(policy_set: PolicySet, principal: Workload, action: PolicyAction, resource: Resource,
            context: PolicyContext) -> PolicyDecision:
    resource_uid, resource_entity = _resource_entity(resource, policy_set.audiences)
    answer = cedar.authorize(
        policy_set.compiled,
        principal=("Workload", principal.spiffe_id),
        action=action.value,
        resource=resource_uid,
        context=_context_record(context),
        entities=[_workload_entity(principal), resource_entity],
    )
    policies = policy_set.policies
    if answer.errors:
        failed = tuple(dict.fromkeys(policy_id for policy_id, _ in answer.errors if policy_id is not None))
        reasons = tuple(f"policy could not be evaluated: {message}" for _, message in answer.errors)
        return PolicyDecision(False, failed, reasons, policy_set.version)
    positions = policy_set.positions
    deciding = tuple(sorted((r for r in answer.reasons if r in positions), key=positions.__getitem__))
    if not answer.allowed and not deciding:
        return PolicyDecision(False, (), (IMPLICIT_DENY_REASON,), policy_set.version)
    reasons = tuple(dict.fromkeys(policies[policy_id].reason for policy_id in deciding))
    return PolicyDecision(answer.allowed, deciding, reasons, policy_set.version)


def _workload_entity(workload: Workload) -> dict[str, Any]:
    attrs: dict[str, Any] = {
        "spiffe_id": workload.spiffe_id,
        "tier": workload.tier.value,
        "selectors": list(workload.selectors),
        "entry_id": workload.entry_id,
        "lineage_depth": workload.lineage_depth,
    }
    if workload.uid is not None:
        attrs["uid"] = workload.uid
    if workload.parent_spiffe_id is not None:
        attrs["parent"] = workload.parent_spiffe_id
    if workload.parent_audiences is not None:
        attrs["parent_audiences"] = list(workload.parent_audiences)
    if workload.parent_ttl_seconds is not None:
        attrs["parent_ttl_seconds"] = workload.parent_ttl_seconds
    return {"uid": {"type": "Workload", "id": workload.spiffe_id}, "attrs": attrs, "parents": [],
            "tags": dict(workload.labels)}


def _resource_entity(resource: Resource, audiences: Mapping[str, str]) -> tuple[tuple[str, str], dict[str, Any]]:
    if isinstance(resource, Audience):
        uid = ("Audience", resource.name)
        attrs = {"name": resource.name, "risk": audiences.get(resource.name, UNKNOWN_RISK)}
    else:
        uid = ("TrustDomain", resource.name)
        attrs = {"name": resource.name}
    return uid, {"uid": {"type": uid[0], "id": uid[1]}, "attrs": attrs, "parents": []}


def _context_record(context: PolicyContext) -> dict[str, Any]:
    record: dict[str, Any] = {
        "node_state": context.node_state,
        "now": context.now,
        "ttl_seconds": context.ttl_seconds,
        "audiences": list(context.audiences),
        "new_credential": context.new_credential,
    }
    if context.quote_age_seconds is not None:
        record["quote_age_seconds"] = context.quote_age_seconds
    if context.pcr_profile is not None:
        record["pcr_profile"] = context.pcr_profile
    return record
