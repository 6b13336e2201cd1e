"""The decision log: every decision a line, but a workload's repeated identical answer once a minute."""

from __future__ import annotations

import logging

import pytest

from vouchd.decisions import REPEAT_INTERVAL, CallerEvidence, Decision, DecisionKind, LogDecisions, Outcome


class Ticks:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def answer(uid: int = 1000, spiffe_id: str = "spiffe://example.org/web", *, outcome: Outcome = Outcome.OK,
           kind: DecisionKind = DecisionKind.ISSUE, source: str = "workload_api") -> Decision:
    return Decision(kind=kind, outcome=outcome, at=0.0, source=source, method="FetchX509SVID",
                    caller=CallerEvidence(pid=4242, uid=uid, start_time=1, selectors=(), evidence=()),
                    spiffe_ids=(spiffe_id,))


def lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("vouchd.decisions")]


def test_a_repeated_answer_is_logged_once_per_interval_with_the_count_of_the_others(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    ticks = Ticks()
    log = LogDecisions(monotonic=ticks)

    for _ in range(5):
        log(answer())
    ticks.now += REPEAT_INTERVAL
    log(answer())

    logged = lines(caplog)
    assert len(logged) == 2
    assert not hasattr(logged[0], "repeated")
    assert logged[1].repeated == 4  # type: ignore[attr-defined]


def test_another_uid_or_identity_is_another_answer(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    log = LogDecisions(monotonic=Ticks())

    log(answer())
    log(answer(uid=1001))
    log(answer(spiffe_id="spiffe://example.org/db"))

    assert len(lines(caplog)) == 3


@pytest.mark.parametrize("decision", [
    answer(outcome=Outcome.DENIED, kind=DecisionKind.DENY),
    answer(outcome=Outcome.ERROR),
    answer(kind=DecisionKind.REVOKE),
    answer(source="authority"),
], ids=["denial", "error", "revocation", "authority"])
def test_everything_but_a_repeated_success_is_always_logged(caplog: pytest.LogCaptureFixture,
                                                            decision: Decision) -> None:
    caplog.set_level(logging.INFO)
    log = LogDecisions(monotonic=Ticks())

    for _ in range(3):
        log(decision)

    assert len(lines(caplog)) == 3
