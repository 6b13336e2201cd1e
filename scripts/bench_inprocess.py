"""What the bench measures inside its own process, without an agent: matching a caller against many
entries, and deciding a request with the policy engine."""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

# The goals for the p99 of each (issue 12), reported beside the figures, not asserted.
MATCH_GOAL_MS = 1.0
POLICY_GOAL_MS = 1.0


def since_ms(started: float) -> float:
    return (time.monotonic() - started) * 1000


def measure_matching(entry_count: int, rounds: int) -> dict[str, Any]:
    """The cost of matching one caller against `entry_count` entries, in this process (no agent needed).

    The entries are what an AI-agent host has: one uid, one interpreter, a script hash each, a tenth
    of them also bound to a systemd unit, a few by uid alone; the caller carries the selectors every
    attestor gives (about twenty), one of the scripts among them.
    """
    from datetime import timedelta

    from vouchd.agent.matching import EntryMatcher
    from vouchd.entries import Entry
    from vouchd.selectors import selector_set
    from vouchd.spiffe import SpiffeId

    def entry(n: int, *selectors: str) -> Entry:
        return Entry(id=f"agent-{n:06}", revision=1, spiffe_id=SpiffeId.parse(f"spiffe://example.org/agent/{n}"),
                     selectors=selector_set(selectors), x509_ttl=timedelta(hours=1))

    entries = [entry(n, "unix:uid:1000", "interpreter:name:python", f"script:sha256:{n:064x}",
                     *((f"systemd:unit:agent-{n}.service",) if n % 10 == 0 else ()))
               for n in range(entry_count - 3)]
    entries += [entry(entry_count - 3 + n, f"unix:uid:{1000 + n}") for n in range(3)]
    built = time.monotonic()
    matcher = EntryMatcher(entries)
    index_ms = since_ms(built)
    common = ["unix:uid:1000", "unix:user:agent", "unix:gid:1000", "unix:group:agent", "unix:path:/usr/bin/python3.11",
              "unix:sha256:" + "ee" * 32, "interpreter:name:python", "script:path:/opt/agents/agent.py",
              "systemd:unit:agent-40.service", "systemd:slice:system.slice", "lineage:depth:1",
              *(f"unix:supplementary_gid:{gid}" for gid in range(100, 108))]
    callers = [selector_set([*common, f"script:sha256:{(n * 7919) % entry_count:064x}"]) for n in range(rounds)]
    times_us = []
    matched = 0
    for caller in callers:
        started = time.perf_counter_ns()
        matched += len(matcher.match(caller))
        times_us.append((time.perf_counter_ns() - started) / 1000)
    ordered = sorted(times_us)
    return {"entries": entry_count, "caller_selectors": len(callers[0]), "calls": rounds,
            "index_build_ms": round(index_ms, 1),
            "match_us": {"p50": round(statistics.median(ordered), 1),
                         "p99": round(ordered[math.ceil(len(ordered) * 0.99) - 1], 1), "max": round(ordered[-1], 1)},
            "p99_goal_us": MATCH_GOAL_MS * 1000, "entries_matched_per_call": round(matched / rounds, 2)}


def measure_policy(requests: int) -> dict[str, Any]:
    """The cost of one policy decision (the shipped defaults plus examples/agents/policy.cedar), in this
    process: `requests` different requests (each a cache miss), then the same ones again (hits)."""
    from vouchd.clock import SYSTEM_CLOCK
    from vouchd.policy import Audience, PolicyAction, PolicyContext, PolicyEngine, PolicyRequest, Workload
    from vouchd.spiffe import TrustTier

    root = Path(__file__).resolve().parent.parent
    engine = PolicyEngine.load([root / "examples" / "agents" / "policy.cedar"], clock=SYSTEM_CLOCK,
                               audiences={"tool:search": "low", "tool:payments": "high"})
    selectors = ("unix:uid:1000", "interpreter:name:python", "lineage:depth:1")
    batch = [PolicyRequest(
        Workload(spiffe_id=f"spiffe://example.org/agent/{n}", tier=TrustTier.HARDWARE, selectors=selectors, uid=1000,
                 entry_id=f"e-{n}", parent_spiffe_id="spiffe://example.org/agent/parent", lineage_depth=n % 2),
        PolicyAction.FETCH_JWT_SVID, Audience("tool:payments" if n % 3 else "tool:search"),
        PolicyContext(node_state="trusted", ttl_seconds=300, audiences=("tool:search",), quote_age_seconds=20))
        for n in range(requests)]

    def timed() -> list[float]:
        times = []
        for request in batch:
            started = time.perf_counter_ns()
            engine.evaluate(request)
            times.append((time.perf_counter_ns() - started) / 1000)
        return sorted(times)

    def summary(ordered: list[float]) -> dict[str, float]:
        return {"p50": round(statistics.median(ordered), 1),
                "p99": round(ordered[math.ceil(len(ordered) * 0.99) - 1], 1), "max": round(ordered[-1], 1)}

    misses, hits = timed(), timed()
    return {"policies": len(engine.policies), "requests": requests, "uncached_us": summary(misses),
            "cached_us": summary(hits), "p99_goal_us": POLICY_GOAL_MS * 1000}
