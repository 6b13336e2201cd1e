"""The bench's summary: the flat keys of its JSON, the goals of issue 12 beside them, and the table it prints."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# SPIRE 1.13.3's agent on this kind of machine (2 cores, go-spiffe v2.9 client, second runs): FetchX509SVID
# calls per second at 1, 16 and 64 concurrent callers (issue 12).
SPIRE_PER_S = {1: 833, 16: 1749, 64: 1971}
FLOOR_RATIO_GOAL = 0.7


@dataclass(frozen=True)
class Goal:
    key: str
    label: str
    unit: str
    ok: Callable[[float], bool]
    goal: str


def _at_most(limit: float) -> Callable[[float], bool]:
    return lambda value: value <= limit


def _at_least(limit: float) -> Callable[[float], bool]:
    return lambda value: value >= limit


GOALS = [
    *(Goal(f"fetch_x509_per_s_c{c}", f"FetchX509SVID calls/s, c={c}", "/s", _at_least(n), f">= {n} (SPIRE)")
      for c, n in SPIRE_PER_S.items()),
    *(Goal(f"fetch_ratio_to_floor_c{c}", f"  ratio to the floor, c={c}", "x", _at_least(FLOOR_RATIO_GOAL),
           f">= {FLOOR_RATIO_GOAL}") for c in SPIRE_PER_S),
    Goal("fetch_x509_p50_ms", "FetchX509SVID p50, c=1", "ms", lambda _: True, ""),
    Goal("fetch_x509_p99_ms", "FetchX509SVID p99, c=1", "ms", _at_most(5), "<= 5"),
    *(Goal(f"fetch_x509_new_connection_per_s_c{c}", f"  new connection per call, c={c}", "/s", lambda _: True, "")
      for c in SPIRE_PER_S),
    *(Goal(f"fetch_new_connection_ratio_to_floor_c{c}", f"  its ratio to the floor, c={c}", "x", lambda _: True, "")
      for c in SPIRE_PER_S),
    Goal("agent_cpu_ms_per_fetch_c16", "agent CPU per FetchX509SVID, c=16", "ms", lambda _: True, ""),
    Goal("new_workload_first_svid_p50_ms", "new workload first SVID p50", "ms", lambda _: True, ""),
    Goal("new_workload_first_svid_p99_ms", "new workload first SVID p99", "ms", _at_most(50), "<= 50"),
    Goal("new_workload_cached_svid_p99_ms", "  same, its SVID already cached", "ms", _at_most(5), "<= 5"),
    Goal("new_workload_floor_p99_ms", "  a new process's first fetch, floor", "ms", lambda _: True, ""),
    Goal("boot_to_ready_s", "boot to ready (fresh state)", "s", lambda _: True, ""),
    Goal("restart_to_first_svid_s", "restart to first SVID", "s", _at_most(0.3), "<= 0.3"),
    Goal("entry_to_svid_p50_ms", "entry create -> first SVID p50", "ms", lambda _: True, ""),
    Goal("entry_to_svid_p99_ms", "entry create -> first SVID p99", "ms", _at_most(100), "<= 100"),
    Goal("revocation_p50_ms", "revocation -> open stream p50", "ms", lambda _: True, ""),
    Goal("revocation_p99_ms", "revocation -> open stream p99", "ms", _at_most(500), "<= 500"),
    Goal("jwt_fetch_p99_ms", "FetchJWTSVID p99 (cached)", "ms", lambda _: True, ""),
    Goal("policy_decision_p99_ms", "policy decision p99 (uncached)", "ms", _at_most(1), "<= 1"),
    Goal("match_p99_ms", "match, 10,000 entries, p99", "ms", _at_most(1), "<= 1"),
    Goal("open_1000_streams_s", "open 1000 streams", "s", _at_most(1), "<= 1"),
    Goal("open_1000_streams_floor_s", "  the same against the floor", "s", lambda _: True, ""),
    Goal("rss_idle_mb", "RSS idle", "MB", _at_most(80), "<= 80"),
    Goal("rss_1000_streams_mb", "RSS with 1000 streams", "MB", _at_most(200), "<= 200"),
    Goal("rss_after_streams_closed_mb", "RSS after they closed", "MB", lambda _: True, ""),
]


def _get(section: dict[str, Any] | None, *path: str) -> Any:
    value: Any = section
    for key in path:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def summary(results: dict[str, Any]) -> dict[str, Any]:
    """The flat keys (null where a figure could not be measured), from the detailed sections."""
    flat: dict[str, Any] = {}
    by_key = {(row["concurrency"], row["connection"]): row for row in results.get("fetch_x509") or []}
    for c in SPIRE_PER_S:
        kept, fresh = by_key.get((c, "per caller")), by_key.get((c, "per call"))
        flat[f"fetch_x509_per_s_c{c}"] = _get(kept, "agent", "per_s")
        flat[f"floor_per_s_c{c}"] = _get(kept, "floor", "per_s")
        flat[f"fetch_ratio_to_floor_c{c}"] = _get(kept, "ratio_to_floor")
        flat[f"fetch_x509_new_connection_per_s_c{c}"] = _get(fresh, "agent", "per_s")
        flat[f"floor_new_connection_per_s_c{c}"] = _get(fresh, "floor", "per_s")
        flat[f"fetch_new_connection_ratio_to_floor_c{c}"] = _get(fresh, "ratio_to_floor")
        flat[f"agent_cpu_ms_per_fetch_c{c}"] = _get(kept, "agent", "server_cpu_ms_per_call")
    one = by_key.get((1, "per caller"))
    flat["fetch_x509_p50_ms"] = _get(one, "agent", "p50_ms")
    flat["fetch_x509_p99_ms"] = _get(one, "agent", "p99_ms")
    # The headline calls/s: where the agent comes closest to falling below the floor's goal.
    ratios = [(row["ratio_to_floor"], row) for row in by_key.values() if row["connection"] == "per caller"]
    worst = min(ratios, key=lambda pair: pair[0])[1] if ratios else None
    flat["fetch_x509_concurrency"] = _get(worst, "concurrency")
    flat["fetch_x509_per_s"] = _get(worst, "agent", "per_s")
    flat["floor_per_s"] = _get(worst, "floor", "per_s")
    flat["fetch_ratio_to_floor"] = _get(worst, "ratio_to_floor")
    new = results.get("new_workload")
    flat["new_workload_first_svid_p50_ms"] = _get(new, "first_svid_issued", "p50_ms")
    flat["new_workload_first_svid_p99_ms"] = _get(new, "first_svid_issued", "p99_ms")
    flat["new_workload_cached_svid_p50_ms"] = _get(new, "first_svid_cached", "p50_ms")
    flat["new_workload_cached_svid_p99_ms"] = _get(new, "first_svid_cached", "p99_ms")
    flat["new_workload_floor_p50_ms"] = _get(new, "first_fetch_from_the_floor", "p50_ms")
    flat["new_workload_floor_p99_ms"] = _get(new, "first_fetch_from_the_floor", "p99_ms")
    flat["boot_to_ready_s"] = results.get("boot_to_ready_s")
    flat["restart_to_first_svid_s"] = results.get("restart_to_first_svid_s")
    entry = results.get("entry_create_to_waiting_caller")
    flat["entry_to_svid_p50_ms"] = _get(entry, "create_to_first_svid", "p50_ms")
    flat["entry_to_svid_p99_ms"] = _get(entry, "create_to_first_svid", "p99_ms")
    revocation = results.get("revocation_to_open_stream")
    flat["revocation_p50_ms"] = _get(revocation, "per_stream_update", "p50_ms")
    flat["revocation_p99_ms"] = _get(revocation, "per_stream_update", "p99_ms")
    jwt = results.get("fetch_jwt_svid")
    flat["jwt_fetch_p50_ms"] = _get(jwt, "p50_ms")
    flat["jwt_fetch_p99_ms"] = _get(jwt, "p99_ms")
    policy_us = _get(results.get("policy_decision"), "uncached_us", "p99")
    flat["policy_decision_p99_ms"] = None if policy_us is None else round(policy_us / 1000, 4)
    match_us = _get(results.get("matching"), "match_us", "p99")
    flat["match_p99_ms"] = None if match_us is None else round(match_us / 1000, 4)
    streams = results.get("streams")
    flat["open_1000_streams_s"] = _get(streams, "opened_s")
    flat["open_1000_streams_floor_s"] = _get(streams, "floor_opened_s")
    flat["rss_idle_mb"] = results.get("rss_idle_mb")
    flat["rss_1000_streams_mb"] = _get(streams, "rss_with_streams_mb")
    flat["rss_after_streams_closed_mb"] = _get(streams, "rss_after_close_mb")
    return flat


def verdicts(flat: dict[str, Any]) -> dict[str, str]:
    """key -> "met" / "missed" for every figure that has a goal and was measured."""
    return {goal.key: ("met" if goal.ok(flat[goal.key]) else "missed") for goal in GOALS
            if goal.goal and flat.get(goal.key) is not None}


def table(flat: dict[str, Any]) -> str:
    judged = verdicts(flat)
    lines = [f"{'figure':44} {'value':>10}  {'goal':18} verdict", "-" * 84]
    for goal in GOALS:
        value = flat.get(goal.key)
        shown = "n/a" if value is None else f"{value:g} {goal.unit}"
        lines.append(f"{goal.label:44} {shown:>10}  {goal.goal:18} {judged.get(goal.key, '')}".rstrip())
    floors = ", ".join(f"c={c} {flat.get(f'floor_per_s_c{c}')}/s" for c in SPIRE_PER_S)
    lines.append(f"floor (minimal grpclib server, same client): {floors}")
    fleet = flat.get("fleet")
    if isinstance(fleet, dict):
        lines.append(f"one vouchd server over MQTT, {fleet['nodes']} key nodes: {fleet['joins_per_s']} joins/s, "
                     f"{fleet['attestations_per_s']} attestations/s, {fleet['jwt_issued_per_s']} JWT-SVIDs/s "
                     f"(request p50 {fleet['request_p50_ms']} ms, p99 {fleet['request_p99_ms']} ms)")
    return "\n".join(lines)
