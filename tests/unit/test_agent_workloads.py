"""WorkloadActivity: what `vouchd status` shows about callers, built from decisions and stream events."""

from __future__ import annotations

from vouchd.agent.workloads import WorkloadActivity
from vouchd.decisions import CallerEvidence, Decision, DecisionBus, DecisionKind, Outcome


def decision(outcome: Outcome, *, source: str = "workload_api", method: str = "FetchX509SVID", reason: str = "",
             at: float = 1_800_000_000.0, caller: CallerEvidence | None = None) -> Decision:
    kind = DecisionKind.ISSUE if outcome in (Outcome.OK, Outcome.ERROR) else DecisionKind.DENY
    return Decision(kind=kind, outcome=outcome, at=at, source=source, method=method, reason=reason,
                    caller=caller if caller is not None else CallerEvidence(pid=42, uid=1000))


def test_requests_are_counted_by_outcome_from_the_bus() -> None:
    activity = WorkloadActivity()
    bus = DecisionBus()
    bus.subscribe(activity.record)

    for outcome in (Outcome.OK, Outcome.OK, Outcome.DENIED, Outcome.INVALID, Outcome.ERROR):
        bus.emit(decision(outcome))

    assert activity.snapshot()["requests"] == {"ok": 2, "denied": 1, "invalid": 1, "error": 1}


def test_refusals_are_listed_newest_first_with_their_reason() -> None:
    activity = WorkloadActivity()

    activity.record(decision(Outcome.OK, at=1.0))
    activity.record(decision(Outcome.DENIED, at=2.0, reason="no registration entry matches the caller",
                             caller=CallerEvidence(pid=7666, uid=65534, start_time=99, selectors=("unix:uid:65534",))))
    activity.record(decision(Outcome.INVALID, at=3.0, method="FetchJWTSVID", reason="FetchJWTSVID is not implemented"))

    assert activity.snapshot()["recent_denials"] == [
        {"at": 3.0, "method": "FetchJWTSVID", "pid": 42, "uid": 1000, "outcome": "invalid",
         "reason": "FetchJWTSVID is not implemented"},
        {"at": 2.0, "method": "FetchX509SVID", "pid": 7666, "uid": 65534, "outcome": "denied",
         "reason": "no registration entry matches the caller"},
    ]


def test_only_the_latest_twenty_refusals_are_kept() -> None:
    activity = WorkloadActivity()

    for n in range(25):
        activity.record(decision(Outcome.DENIED, at=float(n)))

    kept = activity.snapshot()["recent_denials"]
    assert [refusal["at"] for refusal in kept] == [float(n) for n in range(24, 4, -1)]
    assert activity.snapshot()["requests"] == {"denied": 25}


def test_decisions_of_other_sources_are_not_workload_requests() -> None:
    activity = WorkloadActivity()

    activity.record(decision(Outcome.DENIED, source="authority"))
    activity.record(decision(Outcome.OK, source="svid_cache"))

    assert activity.snapshot() == {"open_streams": {}, "requests": {}, "recent_denials": []}


def test_a_refusal_without_a_caller_shows_minus_one() -> None:
    activity = WorkloadActivity()
    unidentified = Decision(kind=DecisionKind.DENY, outcome=Outcome.DENIED, at=5.0, source="workload_api",
                            method="FetchX509Bundles", reason="caller is not connected over a unix socket")

    activity.record(unidentified)

    (shown,) = activity.snapshot()["recent_denials"]
    assert (shown["pid"], shown["uid"]) == (-1, -1)


def test_open_streams_are_counted_per_method() -> None:
    activity = WorkloadActivity()

    activity.stream_opened("FetchX509SVID", 1, 0)
    activity.stream_opened("FetchX509SVID", 2, 0)
    activity.stream_opened("FetchX509Bundles", 3, 0)
    activity.stream_closed("FetchX509SVID", 1, 0)
    activity.stream_closed("FetchX509Bundles", 3, 0)

    assert activity.snapshot()["open_streams"] == {"FetchX509SVID": 1}
