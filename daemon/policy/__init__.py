"""Request-time policy as code (design §7): Cedar policies decide what a matched workload may get now.

Entries say *who* a process is; these policies say *what it may get*, evaluated by the agent for
every Workload API call and again by the authority before it signs. Import from here: the Cedar
details (cedar.py, source.py, loading.py's helpers) are private to the package.
"""

from __future__ import annotations

from vouchd.policy.engine import DEFAULT_CACHE_SIZE, CacheStats, PolicyEngine, ReloadResult
from vouchd.policy.loading import AUDIENCE_RISKS, DEFAULT_POLICY_NAME, UNKNOWN_RISK, LoadedPolicy, PolicyError
from vouchd.policy.model import (
    IMPLICIT_DENY_REASON,
    Audience,
    InvalidPolicyRequestError,
    PolicyAction,
    PolicyContext,
    PolicyDecision,
    PolicyRequest,
    Resource,
    TrustDomain,
    Workload,
)
from vouchd.policy.schema import SCHEMA_TEXT

__all__ = [
    "AUDIENCE_RISKS",
    "DEFAULT_CACHE_SIZE",
    "DEFAULT_POLICY_NAME",
    "IMPLICIT_DENY_REASON",
    "SCHEMA_TEXT",
    "UNKNOWN_RISK",
    "Audience",
    "CacheStats",
    "InvalidPolicyRequestError",
    "LoadedPolicy",
    "PolicyAction",
    "PolicyContext",
    "PolicyDecision",
    "PolicyEngine",
    "PolicyError",
    "PolicyRequest",
    "ReloadResult",
    "Resource",
    "TrustDomain",
    "Workload",
]
