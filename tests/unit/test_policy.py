"""Request-time policy: the shipped defaults decide as design §7 says and name what decided; operator
files add to them; invalid files are refused with file, line and column; reload never leaves a broken
set in force; the decision cache never changes an answer."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fakes import FakeClock
from vouchd.errors import ConfigError
from vouchd.policy import (
    IMPLICIT_DENY_REASON,
    Audience,
    InvalidPolicyRequestError,
    PolicyAction,
    PolicyContext,
    PolicyDecision,
    PolicyEngine,
    PolicyError,
    PolicyRequest,
    TrustDomain,
    Workload,
)
from vouchd.spiffe import TrustTier

AUDIENCES = {"low.example": "low", "high.example": "high"}
TD = TrustDomain("example.org")
HARDWARE = Workload(spiffe_id="spiffe://example.org/web", tier=TrustTier.HARDWARE,
                    selectors=("unix:uid:1000",), uid=1000, entry_id="web")
STATIC = replace(HARDWARE, spiffe_id="spiffe://example.org/edge", tier=TrustTier.STATIC_SECRET, entry_id="edge")
X509_LABEL = ("vouchd/static-secret-x509", "allow")
TRUSTED = PolicyContext(node_state="trusted", ttl_seconds=30, quote_age_seconds=12, pcr_profile="baseline")

PERMIT_TRUSTED = "vouchd.permit-trusted-node"
PERMIT_HELD = "vouchd.permit-held-credentials"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def engine(clock: FakeClock) -> PolicyEngine:
    return PolicyEngine.load(None, audiences=AUDIENCES, clock=clock)


def x509(principal: Workload = HARDWARE, context: PolicyContext = TRUSTED) -> PolicyRequest:
    return PolicyRequest(principal, PolicyAction.FETCH_X509_SVID, TD, context)


def jwt(principal: Workload = HARDWARE, audience: str = "low.example", context: PolicyContext = TRUSTED,
        **changes: Any) -> PolicyRequest:
    return PolicyRequest(principal, PolicyAction.FETCH_JWT_SVID, Audience(audience), replace(context, **changes))


def validate(principal: Workload = HARDWARE, context: PolicyContext = TRUSTED) -> PolicyRequest:
    context = replace(context, new_credential=False, ttl_seconds=0)
    return PolicyRequest(principal, PolicyAction.VALIDATE_JWT_SVID, Audience("high.example"), context)


def refused_by(decision: PolicyDecision, *policy_ids: str) -> bool:
    return not decision.allowed and decision.policy_ids == policy_ids


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# -- the shipped defaults ------------------------------------------------------------------------------


def test_a_hardware_workload_of_a_trusted_node_gets_x509_jwt_and_validation(engine: PolicyEngine) -> None:
    for request in (x509(), jwt(audience="high.example", ttl_seconds=3600), jwt(audience="never.listed"),
                    validate()):
        decision = engine.evaluate(request)
        assert decision.allowed, request
        assert decision.policy_ids == (PERMIT_TRUSTED,)
        assert decision.reasons == ("a workload of a trusted node may get and validate SVIDs",)
        assert decision.policy_version == engine.policy_version


def test_a_static_secret_workload_gets_low_risk_audiences_only(engine: PolicyEngine) -> None:
    assert engine.evaluate(jwt(STATIC, "low.example", ttl_seconds=60)).allowed
    for audience in ("high.example", "never.listed"):        # not listed: risk "unknown", not low
        decision = engine.evaluate(jwt(STATIC, audience, ttl_seconds=60))
        assert refused_by(decision, "vouchd.static-secret-jwt-audience")
        assert decision.reasons == ("a static-secret workload gets JWT-SVIDs only for audiences marked low-risk",)


def test_a_static_secret_workload_gets_jwt_ttls_of_60_seconds_at_most(engine: PolicyEngine) -> None:
    assert engine.evaluate(jwt(STATIC, ttl_seconds=60)).allowed
    decision = engine.evaluate(jwt(STATIC, ttl_seconds=61))
    assert refused_by(decision, "vouchd.static-secret-jwt-ttl")
    assert decision.reasons == ("a static-secret workload gets JWT-SVIDs of at most 60 seconds",)
    both = engine.evaluate(jwt(STATIC, "high.example", ttl_seconds=61))
    assert refused_by(both, "vouchd.static-secret-jwt-audience", "vouchd.static-secret-jwt-ttl")


def test_a_static_secret_workload_gets_x509_only_when_its_entry_allows_it(engine: PolicyEngine) -> None:
    assert refused_by(engine.evaluate(x509(STATIC)), "vouchd.static-secret-x509")
    for value in ("deny", "yes", "Allow"):
        labelled = replace(STATIC, labels=(("vouchd/static-secret-x509", value),))
        assert refused_by(engine.evaluate(x509(labelled)), "vouchd.static-secret-x509"), value
    allowed = engine.evaluate(x509(replace(STATIC, labels=(X509_LABEL, ("team", "edge")))))
    assert allowed.allowed and allowed.policy_ids == (PERMIT_TRUSTED,)
    # the label opens X.509 only: the hardware tier never needed it
    assert engine.evaluate(x509(replace(HARDWARE, labels=(X509_LABEL,)))).allowed


def test_a_node_that_is_not_trusted_gets_nothing_new(engine: PolicyEngine) -> None:
    for state in ("stale", "unconfirmed", "attesting"):
        context = replace(TRUSTED, node_state=state)
        for request in (x509(context=context), jwt(context=context)):
            decision = engine.evaluate(request)
            assert refused_by(decision, "vouchd.forbid-untrusted-node"), (state, request.action)
            assert decision.reasons == ("the node is not trusted: it gets no new SVID",)


def test_a_stale_node_still_serves_what_it_holds_and_validates(engine: PolicyEngine) -> None:
    held = replace(TRUSTED, node_state="stale", new_credential=False)
    for request in (x509(context=held), jwt(context=held), validate(context=held)):
        decision = engine.evaluate(request)
        assert decision.allowed and decision.policy_ids == (PERMIT_HELD,), request.action
    # what a node holds was issued to it: an unknown state does not earn it
    assert not engine.evaluate(x509(context=replace(held, node_state="attesting"))).allowed


def test_a_banned_or_failed_node_serves_nothing(engine: PolicyEngine) -> None:
    for state in ("banned", "failed"):
        held = replace(TRUSTED, node_state=state, new_credential=False)
        for request in (x509(context=held), jwt(context=held), validate(context=held)):
            assert refused_by(engine.evaluate(request), "vouchd.forbid-banned-node"), (state, request.action)
        new = engine.evaluate(x509(context=replace(held, new_credential=True)))
        assert refused_by(new, "vouchd.forbid-untrusted-node", "vouchd.forbid-banned-node")


CHILD = replace(HARDWARE, spiffe_id="spiffe://example.org/web/worker", entry_id="worker",
                parent_spiffe_id="spiffe://example.org/web", lineage_depth=1,
                parent_audiences=("low.example", "high.example"), parent_ttl_seconds=300)


def test_a_child_gets_no_ttl_above_its_parents(engine: PolicyEngine) -> None:
    assert engine.evaluate(x509(CHILD, replace(TRUSTED, ttl_seconds=300))).allowed
    for request in (x509(CHILD, replace(TRUSTED, ttl_seconds=301)), jwt(CHILD, ttl_seconds=301)):
        decision = engine.evaluate(request)
        assert refused_by(decision, "vouchd.lineage-ttl"), request.action
        assert decision.reasons == ("a child workload gets no SVID that outlives its parent's credentials",)


def test_a_child_gets_no_audience_its_parent_lacks(engine: PolicyEngine) -> None:
    assert engine.evaluate(jwt(CHILD, "high.example")).allowed
    decision = engine.evaluate(jwt(CHILD, "other.example"))
    assert refused_by(decision, "vouchd.lineage-audience")
    assert decision.reasons == ("a child workload gets no JWT-SVID for an audience its parent does not hold",)
    # without what the parent holds there is nothing to bound it by
    unknown_parent = replace(CHILD, parent_audiences=None, parent_ttl_seconds=None)
    assert engine.evaluate(jwt(unknown_parent, "other.example", ttl_seconds=3600)).allowed
    # what a parent holds bounds only a child
    not_a_child = replace(CHILD, lineage_depth=0)
    assert engine.evaluate(jwt(not_a_child, "other.example", ttl_seconds=3600)).allowed


def test_a_request_for_several_audiences_is_allowed_only_if_each_is(engine: PolicyEngine) -> None:
    decision = engine.evaluate_all(jwt(STATIC, audience) for audience in ("low.example", "high.example"))
    assert refused_by(decision, "vouchd.static-secret-jwt-audience")
    assert engine.evaluate_all(jwt(HARDWARE, audience) for audience in ("low.example", "high.example")).allowed
    with pytest.raises(InvalidPolicyRequestError, match="at least one"):
        engine.evaluate_all([])


# -- operator files ------------------------------------------------------------------------------------

OPERATOR_POLICY = """\
// only the payments service may ask for the payments audience
@id("site.payments-only")
@reason("only uid 2000 gets the payments audience")
forbid (principal, action == Action::"FetchJWTSVID", resource == Audience::"payments")
unless { principal.selectors.contains("unix:uid:2000") };

forbid (principal, action, resource)
when { principal.hasTag("frozen") };
"""


def test_an_operators_file_adds_to_the_defaults(tmp_path: Path, clock: FakeClock) -> None:
    path = write(tmp_path / "site.cedar", OPERATOR_POLICY)
    engine = PolicyEngine.load([path], audiences=AUDIENCES, clock=clock)
    decision = engine.evaluate(jwt(audience="payments"))
    assert refused_by(decision, "site.payments-only")
    assert decision.reasons == ("only uid 2000 gets the payments audience",)
    payments = replace(HARDWARE, selectors=("unix:uid:2000",), uid=2000)
    assert engine.evaluate(jwt(payments, "payments")).allowed
    # a policy without @id is named by its file and place; without @reason, by its id
    frozen = engine.evaluate(x509(replace(HARDWARE, labels=(("frozen", "yes"),))))
    assert refused_by(frozen, f"{path}:2")
    assert frozen.reasons == (f"policy {path}:2",)
    # the defaults still hold
    assert refused_by(engine.evaluate(x509(STATIC)), "vouchd.static-secret-x509")
    assert PolicyEngine.load(None, audiences=AUDIENCES).policy_version != engine.policy_version


def test_without_the_defaults_only_the_operators_policies_apply(tmp_path: Path) -> None:
    path = write(tmp_path / "x509.cedar", '@id("x509-only") @reason("x509 for all")\n'
                                          'permit (principal, action == Action::"FetchX509SVID", resource);\n')
    engine = PolicyEngine.load([path], audiences=AUDIENCES, include_defaults=False)
    assert [p.policy_id for p in engine.policies] == ["x509-only"]
    stale = replace(TRUSTED, node_state="stale")
    assert engine.evaluate(x509(STATIC, stale)).policy_ids == ("x509-only",)
    implicit = engine.evaluate(jwt())
    assert not implicit.allowed and implicit.policy_ids == () and implicit.reasons == (IMPLICIT_DENY_REASON,)
    with pytest.raises(PolicyError, match="no policy permits anything"):
        PolicyEngine.load([], audiences=AUDIENCES, include_defaults=False)


def test_a_directory_stands_for_its_cedar_files_in_name_order(tmp_path: Path) -> None:
    rule = "forbid (principal, action, resource) when { principal has uid && principal.uid == 7 };\n"
    write(tmp_path / "b.cedar", '@id("b") ' + rule)
    write(tmp_path / "a.cedar", '@id("a") ' + rule)
    write(tmp_path / "notes.txt", "not a policy")
    engine = PolicyEngine.load([tmp_path], audiences=AUDIENCES)
    assert [p.policy_id for p in engine.policies][-2:] == ["a", "b"]
    assert refused_by(engine.evaluate(x509(replace(HARDWARE, uid=7))), "a", "b")


def test_a_policy_that_fails_to_evaluate_denies(tmp_path: Path) -> None:
    # valid for the schema, but overflows a 64-bit integer for any TTL above 1
    path = write(tmp_path / "overflow.cedar", '@id("overflow")\nforbid (principal, action, resource)\n'
                                              'when { context.ttl_seconds * 9223372036854775807 > 0 };\n')
    engine = PolicyEngine.load([path], audiences=AUDIENCES)
    decision = engine.evaluate(x509(context=replace(TRUSTED, ttl_seconds=2)))
    assert refused_by(decision, "overflow")
    assert "could not be evaluated" in decision.reasons[0]
    assert engine.evaluate(x509(context=replace(TRUSTED, ttl_seconds=0))).allowed


# -- invalid files ---------------------------------------------------------------------------------------

SIX_GOOD_LINES = """\
// site policies
@id("site.ok")
@reason("fine")
forbid (principal, action == Action::"FetchJWTSVID", resource)
when {
  resource.name == "admin" &&
"""


@pytest.mark.parametrize(("line7", "column", "complaint"), [
    ("  context.ttl_seconds > }", 25, "syntax error: unexpected token `}`"),
    ('  principal.tierr == "x"', 13, "attribute `tierr` on entity type `Workload` not found"),
    ("  context.quote_age > 30", 11, "attribute `quote_age` in context"),
    ("  context.quote_age_seconds > 30", 11, "unable to guarantee safety of access to optional attribute"),
    ('  principal.getTag("team") == "x"', 20, 'unable to guarantee safety of access to tag `"team"`'),
    ("  nosuch(1)", 3, "`nosuch` is not a valid function"),
    ('  "abc', 3, "syntax error: invalid token"),
])
def test_an_invalid_file_is_refused_naming_file_line_and_column(tmp_path: Path, line7: str, column: int,
                                                                  complaint: str) -> None:
    path = write(tmp_path / "site.cedar", SIX_GOOD_LINES + line7 + "\n};\n")
    with pytest.raises(PolicyError) as caught:
        PolicyEngine.load([path], audiences=AUDIENCES)
    error = caught.value
    assert isinstance(error, ConfigError)
    assert (error.file, error.line, error.column) == (str(path), 7, column)
    assert str(error).startswith(f"{path}:7:{column}: ")
    assert complaint in str(error)


@pytest.mark.parametrize(("text", "line", "column", "complaint"), [
    ('permit (principal, action, resource);\n\npermit (principal, acton, resource);\n', 3, 20,
     "invalid variable in the policy scope: acton"),
    ('permit (principal, action == Action::"Nope", resource);\n', 1, 30, 'unrecognized action `Action::"Nope"`'),
    ("permit (principal, action, resource)\nwhen { true }\n", 2, 14, "unexpected end of input"),
    ("// a ; in a comment\npermit (principal, action, resource)\n// and \"another\n;\n"
     "permit (principal, action, resource) when { 1 > } };\n", 5, 49, "unexpected token `}`"),
    ('permit (principal == ?principal, action, resource);\n', 1, 1, "templates"),
    ('@id("two words") permit (principal, action, resource);\n', 1, 1, "is not a policy id"),
    ('permit (principal, action, resource);\n  @id("") permit (principal, action, resource);\n', 2, 3,
     "@id '' is not a policy id"),
    ('permit (principal, action, resource);\n@id("vouchd.lineage-ttl")\nforbid (principal, action, resource);\n',
     2, 1, "policy id 'vouchd.lineage-ttl' is already used at vouchd/policy/default.cedar:"),
])
def test_each_problem_is_pinned_to_its_place(tmp_path: Path, text: str, line: int, column: int,
                                             complaint: str) -> None:
    path = write(tmp_path / "p.cedar", text)
    with pytest.raises(PolicyError) as caught:
        PolicyEngine.load([path], audiences=AUDIENCES)
    assert (caught.value.line, caught.value.column) == (line, column), str(caught.value)
    assert complaint in str(caught.value)


def test_unreadable_files_and_bad_audience_risks_are_refused(tmp_path: Path) -> None:
    missing = tmp_path / "missing.cedar"
    with pytest.raises(PolicyError, match=f"^{missing}: cannot read the policy file: No such file"):
        PolicyEngine.load([missing], audiences=AUDIENCES)
    binary = tmp_path / "binary.cedar"
    binary.write_bytes(b"permit \xff")
    with pytest.raises(PolicyError, match=f"^{binary}: not UTF-8 text"):
        PolicyEngine.load([binary], audiences=AUDIENCES)
    with pytest.raises(PolicyError, match="'api' has risk 'medium', expected one of low, high"):
        PolicyEngine.load(None, audiences={"api": "medium"})


def test_requests_that_cannot_be_asked_are_refused() -> None:
    with pytest.raises(InvalidPolicyRequestError, match="FetchX509SVID takes a TrustDomain resource"):
        PolicyRequest(HARDWARE, PolicyAction.FETCH_X509_SVID, Audience("a"), TRUSTED)
    with pytest.raises(InvalidPolicyRequestError, match="ValidateJWTSVID takes a Audience resource"):
        PolicyRequest(HARDWARE, PolicyAction.VALIDATE_JWT_SVID, TD, TRUSTED)
    with pytest.raises(InvalidPolicyRequestError, match="ttl_seconds -1 is out of range"):
        PolicyContext(node_state="trusted", ttl_seconds=-1)


# -- reload ----------------------------------------------------------------------------------------------


def test_reload_with_a_broken_file_keeps_the_old_set(tmp_path: Path) -> None:
    path = write(tmp_path / "site.cedar", OPERATOR_POLICY)
    engine = PolicyEngine.load([path], audiences=AUDIENCES)
    version = engine.policy_version
    assert engine.reload().changed is False

    write(path, OPERATOR_POLICY + "\nforbid (principal, action, resource) when { principal.nope };\n")
    result = engine.reload()
    assert not result.applied and not result.changed
    assert result.error is not None and (result.error.file, result.error.line) == (str(path), 10)
    assert result.policy_version == result.previous_version == engine.policy_version == version
    assert refused_by(engine.evaluate(jwt(audience="payments")), "site.payments-only")   # the old set

    write(path, '@id("site.no-x509") forbid (principal, action == Action::"FetchX509SVID", resource);\n')
    result = engine.reload()
    assert result.applied and result.changed and result.error is None
    assert result.previous_version == version and result.policy_version == engine.policy_version != version
    assert refused_by(engine.evaluate(x509()), "site.no-x509")
    assert engine.evaluate(jwt(audience="payments")).allowed

    result = engine.reload(audiences={"payments": "low"})
    assert result.changed
    assert engine.evaluate(jwt(STATIC, "payments")).allowed


# -- the cache -------------------------------------------------------------------------------------------


def varied_requests() -> Iterator[PolicyRequest]:
    workloads = (HARDWARE, STATIC, replace(STATIC, labels=(X509_LABEL,)), CHILD)
    contexts = (TRUSTED, replace(TRUSTED, node_state="stale"), replace(TRUSTED, new_credential=False,
                                                                       node_state="stale"),
                replace(TRUSTED, ttl_seconds=61), replace(TRUSTED, ttl_seconds=301))
    for workload, context in itertools.product(workloads, contexts):
        yield x509(workload, context)
        yield validate(workload, context)
        for audience in ("low.example", "high.example", "other.example"):
            yield jwt(workload, audience, context)


def test_cached_decisions_are_the_decisions(clock: FakeClock) -> None:
    cached = PolicyEngine.load(None, audiences=AUDIENCES, clock=clock)
    requests = list(dict.fromkeys(varied_requests()))
    first = [cached.evaluate(r) for r in requests]
    assert cached.cache_stats.misses == len(requests) and cached.cache_stats.hits == 0
    again = [cached.evaluate(r) for r in reversed(requests)][::-1]
    assert cached.cache_stats.hits == len(requests)
    assert again == first
    for request, decision in zip(requests, first, strict=True):
        fresh = PolicyEngine.load(None, audiences=AUDIENCES, clock=clock)
        assert fresh.evaluate(request) == decision
    assert any(d.allowed for d in first) and any(not d.allowed for d in first)


def test_invalidate_drops_the_cache(engine: PolicyEngine) -> None:
    decision = engine.evaluate(x509(STATIC))
    engine.evaluate(x509(STATIC))
    assert engine.cache_stats.hits == 1 and engine.cache_stats.size == 1
    engine.invalidate()
    assert engine.cache_stats.size == 0
    assert engine.evaluate(x509(STATIC)) == decision
    assert engine.cache_stats.misses == 1 and engine.cache_stats.size == 1


def test_the_cache_is_bounded(clock: FakeClock) -> None:
    engine = PolicyEngine.load(None, audiences=AUDIENCES, clock=clock, cache_size=3)
    for ttl in range(10):
        engine.evaluate(x509(context=replace(TRUSTED, ttl_seconds=ttl)))
    assert engine.cache_stats.size == 3


def test_time_reaches_policies_by_the_minute_and_no_cached_decision_outlives_it(
        tmp_path: Path, clock: FakeClock) -> None:
    minute = int(clock.now())
    assert minute % 60 == 0
    deadline = minute + 90                                    # half-way through the next minute
    path = write(tmp_path / "deadline.cedar", f'@id("deadline") forbid (principal, action, resource)\n'
                                              f"when {{ context.now >= {deadline} }};\n")
    engine = PolicyEngine.load([path], audiences=AUDIENCES, clock=clock)
    assert engine.evaluate(x509()).allowed
    clock.advance(90)
    assert engine.evaluate(x509()).allowed                    # at the deadline, policies still see minute + 60
    clock.advance(29)
    assert engine.evaluate(x509()).allowed
    clock.advance(1)
    assert refused_by(engine.evaluate(x509()), "deadline")    # a new minute: the cached allow is not reused
    # a `now` given by the caller is rounded the same way
    assert engine.evaluate(x509(context=replace(TRUSTED, now=deadline + 29))).allowed
    assert refused_by(engine.evaluate(x509(context=replace(TRUSTED, now=minute + 120))), "deadline")


def test_quote_age_reaches_policies_rounded_up_to_30_seconds(tmp_path: Path) -> None:
    path = write(tmp_path / "fresh.cedar", '@id("fresh-quote") forbid (principal, action, resource)\n'
                                           "when { context has quote_age_seconds &&\n"
                                           "       context.quote_age_seconds > 60 };\n")
    engine = PolicyEngine.load([path], audiences=AUDIENCES)

    def aged(seconds: int | None) -> PolicyDecision:
        return engine.evaluate(x509(context=replace(TRUSTED, quote_age_seconds=seconds)))

    assert aged(0).allowed and aged(60).allowed and aged(None).allowed
    assert refused_by(aged(61), "fresh-quote")                # seen as 90: never fresher than it is
    assert refused_by(aged(89), "fresh-quote")
    assert aged(31).allowed and engine.evaluate(x509(context=replace(TRUSTED, quote_age_seconds=59))).allowed


def test_equal_requests_share_a_cached_decision(engine: PolicyEngine) -> None:
    engine.evaluate(x509(replace(HARDWARE, selectors=("unix:uid:1000", "unix:gid:1000"))))
    engine.evaluate(x509(replace(HARDWARE, selectors=("unix:gid:1000", "unix:uid:1000", "unix:uid:1000"))))
    assert engine.cache_stats.hits == 1


def test_evaluation_time(engine: PolicyEngine, capsys: pytest.CaptureFixture[str]) -> None:
    """Not an assertion: the time of a decision Cedar makes (every request distinct: no cache hit)."""
    durations = []
    for ttl in range(2000):
        request = jwt(STATIC, "high.example", ttl_seconds=ttl)
        start = time.perf_counter()
        engine.evaluate(request)
        durations.append(time.perf_counter() - start)
    hit_start = time.perf_counter()
    for _ in range(2000):
        engine.evaluate(request)
    hit = (time.perf_counter() - hit_start) / 2000
    assert engine.cache_stats.misses == 2000
    quantiles = statistics.quantiles(durations, n=100)
    with capsys.disabled():
        print(f"\npolicy decision: median {statistics.median(durations) * 1e6:.0f} us, "
              f"p99 {quantiles[98] * 1e6:.0f} us uncached; {hit * 1e6:.1f} us from the cache")


# -- any text at all ---------------------------------------------------------------------------------------

CEDARISH = ["permit", "forbid", "(", ")", "{", "}", "[", "]", ";", ",", ".", "::", "==", "&&", "!", ">", "1",
            "principal", "action", "resource", "context", "when", "unless", "has", "nope", '"s"', '"', "@id",
            "//", "\n", " ", "?principal", "Action", "ttl_seconds", "tier"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(parts=st.lists(st.sampled_from(CEDARISH), max_size=40))
def test_any_text_loads_or_is_refused_with_a_place_in_the_file(tmp_path: Path, parts: list[str]) -> None:
    text = "permit (principal, action, resource);\n" + " ".join(parts)
    path = write(tmp_path / "fuzz.cedar", text)
    try:
        PolicyEngine.load([path], audiences=AUDIENCES, include_defaults=False)
    except PolicyError as err:
        assert err.file == str(path)
        if err.line is not None:
            assert 1 <= err.line <= text.count("\n") + 1
