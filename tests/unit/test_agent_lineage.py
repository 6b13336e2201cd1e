"""Lineage: who holds which identity, the ancestors of real processes, and a child's SVID that never
outlives its parent's."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from tests.fakes import FakeClock
from tests.unit.test_agent_svids import (
    DEADLINE,
    FakeCredentialSource,
    fetch,
    manager_with,
    revocations,
    running,
)
from vouchd.agent.agent import workload_attestors_from
from vouchd.agent.holders import HoldersFullError, IdentityHolders
from vouchd.agent.lineage import held_by_ancestors
from vouchd.agent.svids import SvidManager
from vouchd.agent.workload_api.identities import NoIdentityError
from vouchd.attestors import AttestorError
from vouchd.attestors.base import Evidence, WorkloadProcess
from vouchd.attestors.workload.lineage import LineageAttestor, ancestry
from vouchd.attestors.workload.procfs import read_process_stat
from vouchd.authority.ca import CertificateAuthority
from vouchd.config import parse_config
from vouchd.decisions import Decision, DecisionBus, DecisionKind
from vouchd.entries import Entry
from vouchd.errors import ConfigError
from vouchd.selectors import Selector, selector_set
from vouchd.spiffe import SpiffeId, TrustDomain

PARENT_ID = "spiffe://example.org/workload/parent"
CHILD_ID = "spiffe://example.org/workload/child"


# --- who holds what ------------------------------------------------------------------------------


def test_a_process_holds_what_it_was_handed_and_a_reused_pid_holds_nothing() -> None:
    holders = IdentityHolders(alive=lambda pid, start: True)
    holders.record(100, 5000, [PARENT_ID])
    holders.record(100, 5000, [CHILD_ID])

    assert holders.held_by(100, 5000) == (CHILD_ID, PARENT_ID)
    assert holders.held_by(100, 5001) == (), "same pid, later start: another process"
    assert holders.held_by(101, 5000) == ()


def test_a_full_record_forgets_exited_processes_and_refuses_rather_than_forget_a_live_one() -> None:
    living = {(1, 1), (2, 2)}
    clock = FakeClock()
    holders = IdentityHolders(capacity=2, alive=lambda pid, start: (pid, start) in living, clock=clock)
    holders.record(1, 1, [PARENT_ID])
    holders.record(2, 2, [PARENT_ID])

    with pytest.raises(HoldersFullError, match="2 live processes hold identities"):
        holders.record(3, 3, [CHILD_ID])
    assert holders.held_by(1, 1) == (PARENT_ID,), "a live holder is never forgotten"

    living.discard((2, 2))
    with pytest.raises(HoldersFullError):
        holders.record(3, 3, [CHILD_ID])  # within the second: refusals cost no new sweep of /proc
    clock.advance(1.0)
    holders.record(3, 3, [CHILD_ID])

    assert holders.held_by(2, 2) == ()
    assert holders.held_by(3, 3) == (CHILD_ID,)
    holders.record(1, 1, [CHILD_ID])  # a process already recorded is never refused
    assert holders.held_by(1, 1) == (CHILD_ID, PARENT_ID)


def test_the_record_asks_proc_whether_a_holder_lives() -> None:
    holders = IdentityHolders(capacity=1)
    me = read_process_stat(os.getpid())
    holders.record(me.pid, me.start_time + 1, [PARENT_ID])  # no such process: this pid started earlier

    holders.record(me.pid, me.start_time, [CHILD_ID])

    assert holders.held_by(me.pid, me.start_time + 1) == ()
    assert holders.held_by(me.pid, me.start_time) == (CHILD_ID,)


# --- the lineage attestor, on real processes ----------------------------------------------------


class Held:
    """A HolderLookup over a plain mapping."""

    def __init__(self) -> None:
        self.held: dict[tuple[int, int], tuple[str, ...]] = {}

    def give(self, pid: int, *spiffe_ids: str) -> None:
        self.held[(pid, read_process_stat(pid).start_time)] = tuple(sorted(spiffe_ids))

    def held_by(self, pid: int, start_time: int) -> tuple[str, ...]:
        return self.held.get((pid, start_time), ())


def children_of(pid: int) -> list[int]:
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def wait_for_child(pid: int) -> int:
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        if children := children_of(pid):
            return children[0]
        time.sleep(0.01)
    raise AssertionError(f"process {pid} started no child within {DEADLINE}s")


@pytest.fixture
def family() -> Iterator[tuple[int, int, int]]:
    """A parent, its child and its grandchild: three real processes (`; :` keeps each shell from
    exec'ing its last command, which would make the chain shorter). Killed by pid afterwards."""
    parent = subprocess.Popen(["sh", "-c", "sh -c 'sleep 60; :'; :"])
    started: list[int] = []
    try:
        started.append(wait_for_child(parent.pid))
        started.append(wait_for_child(started[0]))
        yield parent.pid, started[0], started[1]
    finally:
        for pid in reversed(started):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        parent.kill()
        parent.wait(timeout=DEADLINE)


def process(pid: int) -> WorkloadProcess:
    return WorkloadProcess(pid=pid, uid=os.getuid(), gid=os.getgid(), start_time=read_process_stat(pid).start_time)


async def lineage_of(attestor: LineageAttestor, pid: int) -> list[Selector | Evidence]:
    async with asyncio.timeout(DEADLINE):
        return sorted(await attestor.attest(process(pid)), key=str)


async def test_a_child_of_an_identified_parent_names_it_and_has_depth_one(family: tuple[int, int, int]) -> None:
    parent, child, grandchild = family
    held = Held()
    held.give(parent, PARENT_ID)
    attestor = LineageAttestor(holders=held)

    assert await lineage_of(attestor, child) == sorted([
        Selector("lineage", "parent_spiffe_id", PARENT_ID), Selector("lineage", "depth", "1"),
        Evidence("lineage", "parent_pid", str(parent)), Evidence("lineage", "ancestor_spiffe_id", PARENT_ID),
    ], key=str)
    # The grandchild's nearest identified ancestor is still the parent: one identified generation.
    assert Selector("lineage", "depth", "1") in await lineage_of(attestor, grandchild)


async def test_a_child_of_a_child_has_depth_two_and_names_its_nearest_identified_ancestor(
    family: tuple[int, int, int],
) -> None:
    parent, child, grandchild = family
    held = Held()
    held.give(parent, PARENT_ID)
    held.give(child, CHILD_ID)

    found = await lineage_of(LineageAttestor(holders=held), grandchild)

    assert [s for s in found if isinstance(s, Selector)] == [
        Selector("lineage", "depth", "2"), Selector("lineage", "parent_spiffe_id", CHILD_ID)]
    assert held_by_ancestors(e for e in found if isinstance(e, Evidence)) == {PARENT_ID, CHILD_ID}
    assert Evidence("lineage", "parent_pid", str(child)) in found


async def test_no_identified_ancestor_means_no_lineage_selectors(family: tuple[int, int, int]) -> None:
    _, child, _ = family

    assert await lineage_of(LineageAttestor(holders=Held()), child) == []


async def test_an_ancestor_is_known_by_pid_and_start_time(family: tuple[int, int, int]) -> None:
    parent, child, _ = family
    held = Held()
    held.held[(parent, read_process_stat(parent).start_time - 1)] = (PARENT_ID,)  # an earlier process at that pid

    assert await lineage_of(LineageAttestor(holders=held), child) == []


async def test_the_walk_stops_after_max_ancestors(family: tuple[int, int, int]) -> None:
    parent, _, grandchild = family
    held = Held()
    held.give(parent, PARENT_ID)

    assert await lineage_of(LineageAttestor(holders=held, max_ancestors=1), grandchild) == []
    assert await lineage_of(LineageAttestor(holders=held, max_ancestors=2), grandchild) != []


async def test_a_caller_that_is_no_longer_the_attested_process_fails_attestation(family: tuple[int, int, int]) -> None:
    _, child, _ = family
    stale = WorkloadProcess(pid=child, uid=0, gid=0, start_time=read_process_stat(child).start_time + 1)

    with pytest.raises(AttestorError, match=r"workloadattestor\(lineage\): process \d+ is no longer the caller"):
        await LineageAttestor(holders=Held()).attest(stale)


def test_the_agent_hands_its_own_record_to_the_lineage_attestor_even_while_it_is_empty(tmp_path: Path) -> None:
    config = parse_config("trust_domain: example.org\nagent: {}\n", tmp_path / "vouchd.yaml", {})
    holders = IdentityHolders()  # empty: falsy, and still the one the agent records into

    attestors = {a.name: a for a in workload_attestors_from(config, holders)}

    lineage = attestors["lineage"]
    assert isinstance(lineage, LineageAttestor)
    assert lineage.holders is holders
    unix, interpreter = attestors["unix"], attestors["interpreter"]
    assert vars(interpreter)["_hasher"] is vars(unix)["_hasher"], "one hashing budget and cache"


def test_lineage_needs_the_agent_and_checks_its_option() -> None:
    with pytest.raises(ConfigError, match=r"runs only inside an agent"):
        LineageAttestor()
    with pytest.raises(ConfigError, match=r"max_ancestors must be a whole number from 1 to 4096"):
        LineageAttestor(holders=Held(), max_ancestors=0)


# --- a child's SVID never outlives its parent's ----------------------------------------------------


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca"), TrustDomain("example.org"))


def workload(entry_id: str, *selectors: str, ttl: int = 3600) -> Entry:
    return Entry(id=entry_id, revision=1, spiffe_id=SpiffeId.parse(f"spiffe://example.org/workload/{entry_id}"),
                 selectors=selector_set(selectors), x509_ttl=timedelta(seconds=ttl))


PARENT = workload("parent", "unix:uid:1000", "unix:path:/usr/bin/agent")
CHILD = workload("child", "unix:uid:1000", f"lineage:parent_spiffe_id:{PARENT_ID}")
GRANDCHILD = workload("grandchild", "unix:uid:1000", f"lineage:parent_spiffe_id:{CHILD_ID}")
AS_PARENT = ("unix:uid:1000", "unix:path:/usr/bin/agent")
AS_CHILD = ("unix:uid:1000", f"lineage:parent_spiffe_id:{PARENT_ID}")
AS_GRANDCHILD = ("unix:uid:1000", f"lineage:parent_spiffe_id:{CHILD_ID}")


def not_after(chain: bytes) -> float:
    return x509.load_der_x509_certificate(chain).not_valid_after_utc.timestamp()


async def test_a_child_svid_expires_no_later_than_its_parents(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [PARENT, CHILD], ttl=timedelta(hours=1))
    manager = await manager_with(source)

    async with running(manager):
        (parent,) = await fetch(manager, *AS_PARENT)
        source.ttl = timedelta(hours=2)  # the authority would give the child more: the parent's bound wins
        (child,) = await fetch(manager, *AS_CHILD)

    assert source.not_after["child"] == int(manager.parents.expiry(PARENT_ID) or 0)
    assert not_after(child.cert_chain_der) <= not_after(parent.cert_chain_der)
    assert source.not_after["parent"] == 0, "an entry without a parent is not bounded"


async def test_no_child_svid_while_its_parent_identity_holds_none(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [PARENT, CHILD])
    manager = await manager_with(source)

    async with running(manager):
        with pytest.raises(NoIdentityError, match=f"its parent identity {PARENT_ID} holds no valid SVID on this node"):
            await fetch(manager, *AS_CHILD)

    assert source.requests == [], "nothing was asked of the authority"


async def test_revoking_the_parent_withdraws_the_child_and_grandchild_at_once(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [PARENT, CHILD, GRANDCHILD])
    bus = DecisionBus()
    decisions: list[Decision] = []
    bus.subscribe(decisions.append)
    manager = SvidManager(source, decisions=bus)
    await manager.set_entries(source.entries)
    async with running(manager):
        await fetch(manager, *AS_PARENT)
        await fetch(manager, *AS_CHILD)
        await fetch(manager, *AS_GRANDCHILD)
        version = manager.version
        source.revocations = revocations(1, entries=[("parent", 2)])

        assert await manager.apply_revocations()

    assert manager.version > version, "open streams are woken"
    assert manager.svids == []
    revoked = [d for d in decisions if d.kind is DecisionKind.REVOKE]
    assert [(d.reason, d.entry_ids) for d in revoked] == [
        ("entry revision revoked", ("parent",)),
        ("its parent identity was withdrawn", ("child",)),
        ("its parent identity was withdrawn", ("grandchild",)),
    ]


async def test_a_parent_entry_deleted_at_the_authority_takes_its_children_svids(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [PARENT, CHILD])
    manager = await manager_with(source)
    async with running(manager):
        await fetch(manager, *AS_PARENT)
        await fetch(manager, *AS_CHILD)

        await manager.set_entries([CHILD])

        assert manager.svids == []
        with pytest.raises(NoIdentityError, match="holds no valid SVID"):
            await fetch(manager, *AS_CHILD)


async def test_when_the_parent_svid_expires_the_child_svid_goes_with_it(ca: CertificateAuthority) -> None:
    clock = FakeClock(time.time())
    source = FakeCredentialSource(ca, [PARENT, CHILD], ttl=timedelta(hours=1))
    manager = SvidManager(source, clock=clock, clock_recheck=0.02)
    await manager.set_entries(source.entries)
    async with running(manager):
        await fetch(manager, *AS_PARENT)
        await fetch(manager, *AS_CHILD)
        source.failure = RuntimeError("authority unreachable")  # nothing can be rotated
        clock.jump(3 * 3600)
        async with asyncio.timeout(DEADLINE):
            while manager.svids:
                await manager.wait_for_change(manager.version)

    assert manager.parents.expiry(PARENT_ID) is None


def fake_proc(root: Path, *processes: tuple[int, int, int]) -> Path:
    """A /proc of (pid, ppid, start time) stat files, for what real processes cannot be made to do."""
    for pid, ppid, start_time in processes:
        (root / str(pid)).mkdir(parents=True)
        fields = ["S", str(ppid), *["0"] * 17, str(start_time), "0"]
        (root / str(pid) / "stat").write_text(f"{pid} (python3) {' '.join(fields)}\n")
    return root


def test_a_parent_pid_reused_by_a_later_process_is_not_an_ancestor(tmp_path: Path) -> None:
    # The caller's parent exited and its pid went to a process started after the caller: that one
    # holds an identity, and is not the caller's parent.
    proc = fake_proc(tmp_path, (300, 200, 500), (200, 1, 900), (1, 0, 1))
    held = Held()
    held.held[(200, 900)] = (PARENT_ID,)
    caller = WorkloadProcess(pid=300, uid=0, gid=0, start_time=500)

    assert ancestry(caller, held, proc_root=proc).parent_pid is None
    held.held[(200, 400)] = (PARENT_ID,)
    proc_with_real_parent = fake_proc(tmp_path / "real", (300, 200, 500), (200, 1, 400), (1, 0, 1))
    assert ancestry(caller, held, proc_root=proc_with_real_parent).parent_spiffe_ids == (PARENT_ID,)
