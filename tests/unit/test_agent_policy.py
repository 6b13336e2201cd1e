"""The agent asks the policy before it hands anything out: a static-secret node's workloads, the
deciding policies named in the decision, and `vouchd explain` showing the verdict."""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta
from pathlib import Path

import pytest

from tests.fakes import FakeClock
from tests.unit.test_attestor_base import FixedAttestor
from tests.unit.test_jwt_svids import DEADLINE, FakeNode
from vouchd.agent.explain import WorkloadExplainer
from vouchd.agent.jwtsvids import JwtSvidCache
from vouchd.agent.policing import NodeFacts, WorkloadPolicy
from vouchd.agent.svids import SvidManager
from vouchd.agent.workload_api.identities import CallerContext, NoIdentityError
from vouchd.agent.workloads import AgentWorkloadIdentities
from vouchd.attestors.base import WorkloadProcess
from vouchd.authority.ca import CertificateAuthority
from vouchd.entries import Entry
from vouchd.policy import PolicyEngine
from vouchd.selectors import selector_set
from vouchd.spiffe import SpiffeId, TrustDomain, TrustTier

TD = TrustDomain("example.org")
CALLER = selector_set(["unix:uid:1000"])
PROCESS = WorkloadProcess(pid=os.getpid(), uid=1000, gid=1000, start_time=1)


def entry(name: str, *, labels: tuple[tuple[str, str], ...] = ()) -> Entry:
    return Entry(id=name, spiffe_id=SpiffeId.parse(f"spiffe://example.org/{name}"), selectors=CALLER,
                 revision=1, labels=labels, jwt_ttl=timedelta(seconds=60), x509_ttl=timedelta(hours=1))


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca"), TD)


async def identities_on(ca: CertificateAuthority, tier: TrustTier, *entries: Entry, state: str = "trusted",
                        policy_files: tuple[Path, ...] = ()) -> tuple[AgentWorkloadIdentities, WorkloadPolicy]:
    identities, policy, _ = await agent_parts(ca, tier, *entries, state=state, policy_files=policy_files)
    return identities, policy


async def agent_parts(ca: CertificateAuthority, tier: TrustTier, *entries: Entry, state: str = "trusted",
                      policy_files: tuple[Path, ...] = ()) -> tuple[AgentWorkloadIdentities, WorkloadPolicy,
                                                                    SvidManager]:
    clock = FakeClock()
    node = FakeNode(ca, entries, clock)
    svids = SvidManager(node, clock=clock)  # type: ignore[arg-type]
    await svids.set_entries(entries)
    jwt = JwtSvidCache(node, svids, TD, clock=clock)  # type: ignore[arg-type]
    engine = PolicyEngine.load(policy_files, audiences={"weather": "low", "payments": "high"}, clock=clock)
    policy = WorkloadPolicy(engine, "example.org", lambda: NodeFacts(tier, state, 5, None), clock=clock,
                            parent_expiry=svids.parents.expiry, parent_audiences=jwt.audiences_of)
    return AgentWorkloadIdentities(TD, [], svids, jwt, policy=policy), policy, svids


def jwt_caller(*audiences: str) -> CallerContext:
    return CallerContext("FetchJWTSVID", PROCESS, CALLER, audiences=audiences)


async def test_a_static_secret_workload_gets_a_low_risk_audience_and_not_a_high_risk_one(
        ca: CertificateAuthority) -> None:
    identities, _ = await identities_on(ca, TrustTier.STATIC_SECRET, entry("agent"))

    async with asyncio.timeout(DEADLINE):
        (token,) = await identities.jwt_svids(jwt_caller("weather"))
        assert token.spiffe_id == "spiffe://example.org/agent"

        refused = jwt_caller("payments")
        with pytest.raises(NoIdentityError, match=r"denied by policy vouchd.static-secret-jwt-audience"):
            await identities.jwt_svids(refused)
        both = jwt_caller("weather", "payments")
        with pytest.raises(NoIdentityError, match="static-secret-jwt-audience"):
            await identities.jwt_svids(both)  # several audiences: every one must be allowed
    assert ("policy_version", refused.details[-1][1]) in refused.details
    assert any(name == "policy" and "agent deny by vouchd.static-secret-jwt-audience" in value
               for name, value in refused.details), refused.details


async def test_the_same_workload_on_a_hardware_node_gets_the_high_risk_audience(ca: CertificateAuthority) -> None:
    identities, _ = await identities_on(ca, TrustTier.HARDWARE, entry("agent"))
    caller = jwt_caller("payments")

    async with asyncio.timeout(DEADLINE):
        (token,) = await identities.jwt_svids(caller)

    assert token.spiffe_id == "spiffe://example.org/agent"
    assert any(value.startswith("agent allow by vouchd.permit-trusted-node") for _, value in caller.details)


async def test_a_static_secret_workload_gets_no_x509_svid_unless_its_entry_allows_it(
        ca: CertificateAuthority) -> None:
    allowed = entry("allowed", labels=(("vouchd/static-secret-x509", "allow"),))
    _, policy = await identities_on(ca, TrustTier.STATIC_SECRET, entry("plain"), allowed)
    caller = CallerContext("FetchX509SVID", PROCESS, CALLER)

    assert not policy.x509(caller, entry("plain"), held=False).allowed
    verdict = policy.x509(caller, allowed, held=False)
    assert verdict.allowed, verdict.reasons


async def test_a_stale_node_hands_out_nothing_new(ca: CertificateAuthority) -> None:
    identities, _ = await identities_on(ca, TrustTier.HARDWARE, entry("agent"), state="stale")

    with pytest.raises(NoIdentityError, match=r"denied by policy vouchd\.forbid-untrusted-node"):
        async with asyncio.timeout(DEADLINE):
            await identities.jwt_svids(jwt_caller("weather"))


async def test_an_operator_forbid_is_obeyed_and_named(ca: CertificateAuthority, tmp_path: Path) -> None:
    rules = tmp_path / "ops.cedar"
    rules.write_text('@id("ops.no-payments")\n@reason("payments is closed today")\n'
                     'forbid (principal, action == Action::"FetchJWTSVID", resource)\n'
                     'when { resource.name == "payments" };\n')
    identities, _ = await identities_on(ca, TrustTier.HARDWARE, entry("agent"), policy_files=(rules,))

    with pytest.raises(NoIdentityError, match=r"denied by policy ops.no-payments: payments is closed today"):
        async with asyncio.timeout(DEADLINE):
            await identities.jwt_svids(jwt_caller("payments"))


async def test_explain_shows_the_policy_verdict_and_its_ids(ca: CertificateAuthority) -> None:
    _, policy, svids = await agent_parts(ca, TrustTier.STATIC_SECRET, entry("plain"))
    explain = WorkloadExplainer([FixedAttestor("unix", "unix:uid:1000")], svids, attest_deadline=DEADLINE,
                                policy=policy)

    async with asyncio.timeout(DEADLINE):
        answer = await explain({"selectors": ["unix:uid:1000"]})

    assert answer["outcome"] == "refused"
    assert answer["reason"].startswith("denied by policy vouchd.static-secret-x509")
    (shown,) = answer["entries"]
    assert shown["policy"]["allowed"] is False
    assert shown["policy"]["policy_ids"] == ["vouchd.static-secret-x509"]


async def test_explain_judges_a_jwt_svid_for_the_audiences_given(ca: CertificateAuthority) -> None:
    _, policy, svids = await agent_parts(ca, TrustTier.STATIC_SECRET, entry("agent"))
    explain = WorkloadExplainer([], svids, attest_deadline=DEADLINE, policy=policy)

    async with asyncio.timeout(DEADLINE):
        high = await explain({"selectors": ["unix:uid:1000"], "audiences": ["payments"]})
        low = await explain({"selectors": ["unix:uid:1000"], "audiences": ["weather"]})

    assert high["outcome"] == "refused"
    assert high["entries"][0]["policy"]["policy_ids"] == ["vouchd.static-secret-jwt-audience"]
    assert low["outcome"] == "allowed"
    assert low["entries"][0]["policy"]["allowed"] is True


async def test_a_child_is_refused_an_audience_its_parent_identity_holds_no_token_for(
        ca: CertificateAuthority) -> None:
    parent = Entry(id="parent", spiffe_id=SpiffeId.parse("spiffe://example.org/parent"),
                   selectors=selector_set(["unix:uid:1000", "unix:path:/opt/parent"]), revision=1)
    child = Entry(id="child", spiffe_id=SpiffeId.parse("spiffe://example.org/child"), revision=1,
                  selectors=selector_set(["unix:uid:1000", "lineage:parent_spiffe_id:spiffe://example.org/parent"]))
    identities, _ = await identities_on(ca, TrustTier.HARDWARE, parent, child)
    as_child = selector_set(["unix:uid:1000", "lineage:parent_spiffe_id:spiffe://example.org/parent",
                             "lineage:depth:1"])

    async with asyncio.timeout(DEADLINE):
        await identities.jwt_svids(CallerContext("FetchJWTSVID", PROCESS, parent.selectors, audiences=("weather",)))
        (token,) = await identities.jwt_svids(CallerContext("FetchJWTSVID", PROCESS, as_child, audiences=("weather",)))
        assert token.spiffe_id == "spiffe://example.org/child"
        with pytest.raises(NoIdentityError, match=r"denied by policy vouchd\.lineage-audience"):
            await identities.jwt_svids(CallerContext("FetchJWTSVID", PROCESS, as_child, audiences=("payments",)))
