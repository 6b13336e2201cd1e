"""`vouchd explain`'s answer: the attestors' findings, matches and near misses, and the outcome."""

from __future__ import annotations

import asyncio
import os
from datetime import timedelta
from typing import Any

import pytest

from tests.unit.test_agent_svids import DEADLINE, FakeCredentialSource, fetch, running
from tests.unit.test_attestor_base import FailingAttestor, FixedAttestor, StuckAttestor
from vouchd.agent.admin import AdminCommandError
from vouchd.agent.explain import WorkloadExplainer
from vouchd.agent.svids import SvidManager
from vouchd.attestors import AttestorError
from vouchd.attestors.base import Evidence, WorkloadAttestor, WorkloadProcess
from vouchd.attestors.workload.unix import UnixAttestor
from vouchd.authority.ca import CertificateAuthority
from vouchd.entries import Entry
from vouchd.selectors import Selector, selector_set
from vouchd.spiffe import SpiffeId, TrustDomain

SCRIPT_A = "script:sha256:" + "aa" * 32
SCRIPT_B = "script:sha256:" + "bb" * 32


def entry(entry_id: str, *selectors: str) -> Entry:
    return Entry(id=entry_id, revision=1, spiffe_id=SpiffeId.parse(f"spiffe://example.org/{entry_id}"),
                 selectors=selector_set(selectors), x509_ttl=timedelta(hours=1))


ENTRIES = [
    entry("agent-a", "unix:uid:1000", SCRIPT_A),
    entry("agent-b", "unix:uid:1000", SCRIPT_B),
    entry("web", "unix:uid:33", "unix:path:/usr/sbin/nginx", "systemd:unit:nginx.service"),
    entry("sub-agent", "unix:uid:1000", "lineage:parent_spiffe_id:spiffe://example.org/agent-a"),
]


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca"), TrustDomain("example.org"))


async def explainer(ca: CertificateAuthority, attestors: list[WorkloadAttestor],
                    entries: list[Entry] = ENTRIES) -> tuple[WorkloadExplainer, SvidManager]:
    manager = SvidManager(FakeCredentialSource(ca, entries))
    await manager.set_entries(entries)
    return WorkloadExplainer(attestors, manager, attest_deadline=DEADLINE), manager


async def ask(explain: WorkloadExplainer, **args: Any) -> dict[str, Any]:
    async with asyncio.timeout(DEADLINE):
        return await explain(args)


async def test_a_running_process_is_attested_and_shown_attestor_by_attestor(ca: CertificateAuthority) -> None:
    explain, _ = await explainer(ca, [FixedAttestor("unix", "unix:uid:1000"), FixedAttestor("interpreter", SCRIPT_A)])

    answer = await ask(explain, pid=os.getpid())

    assert answer["pid"] == os.getpid() and answer["uid"] == os.geteuid()
    assert [(run["name"], run["selectors"], run["error"]) for run in answer["attestors"]] == [
        ("unix", ["unix:uid:1000"], None), ("interpreter", [SCRIPT_A], None)]
    assert all(run["ms"] >= 0 for run in answer["attestors"])
    assert answer["selectors"] == sorted([SCRIPT_A, "unix:uid:1000"])
    assert answer["outcome"] == "allowed"
    assert answer["spiffe_ids"] == ["spiffe://example.org/agent-a"]
    assert answer["entries"][0] == {"id": "agent-a", "spiffe_id": "spiffe://example.org/agent-a", "matched": True,
                                    "missing": []}
    near = {e["id"]: e["missing"] for e in answer["entries"][1:]}
    assert near["agent-b"] == [SCRIPT_B], "the near miss names the selector it lacked"
    assert answer["entries_total"] == len(ENTRIES)


async def test_a_process_no_entry_matches_is_refused_with_its_nearest_misses(ca: CertificateAuthority) -> None:
    explain, _ = await explainer(ca, [FixedAttestor("unix", "unix:uid:1000", "unix:path:/usr/bin/python3.11")])

    answer = await ask(explain, pid=os.getpid(), near_misses=2)

    assert answer["outcome"] == "refused"
    assert answer["reason"] == "no registration entry matches the caller's selectors"
    assert [(e["id"], e["matched"]) for e in answer["entries"]] == [("agent-a", False), ("agent-b", False)]
    assert answer["spiffe_ids"] == []


async def test_a_failing_attestor_is_named_and_the_others_still_shown(ca: CertificateAuthority) -> None:
    explain, _ = await explainer(ca, [FixedAttestor("unix", "unix:uid:1000", SCRIPT_A),
                                      FailingAttestor("systemd", AttestorError("systemd", "malformed cgroup line"))])

    answer = await ask(explain, pid=os.getpid())

    assert answer["outcome"] == "refused"
    assert answer["reason"] == "workload attestation failed: workloadattestor(systemd): malformed cgroup line"
    assert answer["attestors"][1]["error"] == "malformed cgroup line"
    assert answer["entries"][0]["matched"], "what matched is still shown"


async def test_an_attestation_past_the_deadline_is_an_error(ca: CertificateAuthority) -> None:
    manager = SvidManager(FakeCredentialSource(ca, ENTRIES))
    explain = WorkloadExplainer([StuckAttestor("unix")], manager, attest_deadline=0.05)

    with pytest.raises(AdminCommandError, match=r"took more than 0.05s \(the Workload API would refuse it\)"):
        await ask(explain, pid=os.getpid())


async def test_selectors_of_a_process_that_is_not_running_are_matched_alone(ca: CertificateAuthority) -> None:
    explain, _ = await explainer(ca, [StuckAttestor("unix")])  # never asked

    answer = await ask(explain, selectors=["unix:uid:33", "unix:path:/usr/sbin/nginx"])

    assert answer["attestors"] == [] and "pid" not in answer
    assert answer["outcome"] == "refused"
    assert answer["entries"][0] == {"id": "web", "spiffe_id": "spiffe://example.org/web", "matched": False,
                                    "missing": ["systemd:unit:nginx.service"]}


async def test_an_identity_an_ancestor_holds_is_shown_as_never_inherited(ca: CertificateAuthority) -> None:
    class ChildOfAgentA:
        name = "lineage"

        async def attest(self, process: WorkloadProcess) -> list[Selector | Evidence]:
            return [Evidence("lineage", "ancestor_spiffe_id", "spiffe://example.org/agent-a")]

    explain, _ = await explainer(ca, [FixedAttestor("unix", "unix:uid:1000", SCRIPT_A), ChildOfAgentA()])

    answer = await ask(explain, pid=os.getpid())

    assert answer["outcome"] == "refused"
    assert "held by an ancestor: a child never gets its parent's identity" in answer["reason"]
    assert answer["entries"][0] == {"id": "agent-a", "spiffe_id": "spiffe://example.org/agent-a", "matched": False,
                                    "missing": [], "held_by_ancestor": True}
    assert answer["evidence"] == ["lineage.ancestor_spiffe_id=spiffe://example.org/agent-a"]


async def test_a_child_entry_whose_parent_holds_no_svid_is_matched_but_refused(ca: CertificateAuthority) -> None:
    explain, manager = await explainer(ca, [FixedAttestor(
        "unix", "unix:uid:1000", "lineage:parent_spiffe_id:spiffe://example.org/agent-a")])

    answer = await ask(explain, pid=os.getpid())
    assert answer["outcome"] == "refused"
    assert answer["reason"] == "its parent identity spiffe://example.org/agent-a holds no valid SVID on this node"
    assert answer["entries"][0]["refusal"] == answer["reason"]

    async with running(manager):
        await fetch(manager, "unix:uid:1000", SCRIPT_A)  # the parent identity is issued
        assert (await ask(explain, pid=os.getpid()))["outcome"] == "allowed"


async def test_the_real_unix_attestor_explains_this_process(ca: CertificateAuthority) -> None:
    me = entry("me", f"unix:uid:{os.geteuid()}", f"unix:path:{os.path.realpath('/proc/self/exe')}")
    explain, _ = await explainer(ca, [UnixAttestor()], [me])

    answer = await ask(explain, pid=os.getpid())

    assert answer["outcome"] == "allowed", answer
    assert f"unix:uid:{os.geteuid()}" in answer["selectors"]


@pytest.mark.parametrize(("args", "message"), [
    ({}, "give either a pid or selectors"),
    ({"pid": 1, "selectors": ["unix:uid:0"]}, "give either a pid or selectors"),
    ({"pid": -3}, "pid must be a positive whole number"),
    ({"pid": True}, "pid must be a positive whole number"),
    ({"pid": 2**22 + 12345}, "no process 4206649 to explain"),
    ({"selectors": []}, "selectors must be a list of 1 to 1000"),
    ({"selectors": ["unix"]}, "is not of the form type:key:value"),
    ({"selectors": [3]}, "a selector must be a string, got int"),
    ({"selectors": ["unix:uid:0"], "near_misses": 1000}, "near_misses must be a whole number from 0 to 100"),
    ({"pid": 1, "verbose": True}, "unknown argument 'verbose'"),
])
async def test_bad_arguments_are_refused_by_name(ca: CertificateAuthority, args: dict[str, Any], message: str) -> None:
    explain, _ = await explainer(ca, [FixedAttestor("unix", "unix:uid:0")])

    with pytest.raises(AdminCommandError, match=message):
        await ask(explain, **args)
