"""The authority's admin commands, registry and revocation document, without a TPM.

A real authority on a real SQLite store, with a fake clock and a bus that records what it
publishes; nodes are put in the store as attestation would leave them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import FakeClock
from tests.unit.test_authority_server import RecordingBus, start
from vouchd.attestors.catalog import selector_schema
from vouchd.authority.admin import AdminRequestError, AuthorityAdmin
from vouchd.authority.registry import CONFIG_SOURCE_LABEL
from vouchd.authority.revocations import DOCUMENT_LIFETIME
from vouchd.authority.server import Authority
from vouchd.authority.store import NodeRecord, NodeState
from vouchd.entries import Entry
from vouchd.protocol.codec import decode, decode_as
from vouchd.protocol.messages import NodeEvent, PublicationPayload, RevocationDocument, SignedReply
from vouchd.protocol.transport import REVOCATIONS_TOPIC, node_events_topic
from vouchd.selectors import Selector
from vouchd.spiffe import SpiffeId, TrustTier

pytestmark = pytest.mark.timeout(20)

EK_A, EK_B = "a" * 64, "b" * 64
NODE_A = f"spiffe://example.org/vouchd/node/tpm/{EK_A}"
NODE_B = f"spiffe://example.org/vouchd/node/tpm/{EK_B}"


def node_record(node_id: str, ek: str, *, profile: str = "golden", labels: tuple[str, ...] = ()) -> NodeRecord:
    return NodeRecord(
        node_id=node_id, ek_hash=ek, tier="hardware", state=NodeState.TRUSTED, ak_public=b"ak", node_key_public=b"nk",
        selectors=tuple(sorted([f"tpm:ek_hash:{ek}", f"tpm:pcr_profile:{profile}", "node:tier:hardware", *labels])),
        pcr_bank="sha256", pcr_indices=tuple(range(8)), pcr_digest=b"\x00" * 32, reset_count=1, restart_count=0,
        clock=1, attested_at=1.0, last_quote_at=1.0,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def bus() -> RecordingBus:
    return RecordingBus()


@pytest.fixture
async def authority(tmp_path: Path, clock: FakeClock, bus: RecordingBus) -> AsyncIterator[Authority]:
    instance = await start(tmp_path / "authority", clock=clock, bus=bus)
    await instance.store.save_node(node_record(NODE_A, EK_A, labels=("node:label:role:db",)))
    await instance.store.save_node(node_record(NODE_B, EK_B, profile="other"))
    await instance.store.save_profile("golden", ["0:sha256:" + "1" * 64], "test", now=clock.now())
    await instance.store.save_profile("other", ["0:sha256:" + "2" * 64], "test", now=clock.now())
    yield instance
    await instance.close()


@pytest.fixture
def admin(authority: Authority) -> AuthorityAdmin:
    return AuthorityAdmin(authority, workload_schema=selector_schema(["unix"]))


def published(bus: RecordingBus, authority: Authority) -> list[tuple[str, object]]:
    """What was published, opened (the signature is the node's business, tested in the protocol tests)."""
    opened = []
    for topic, data in bus.published:
        payload = decode_as(PublicationPayload, decode_as(SignedReply, data).payload)
        assert payload.topic == topic
        opened.append((topic, decode(payload.body)))
    return opened


async def run(admin: AuthorityAdmin, command: str, **args: Any) -> Any:
    return await admin.commands()[command](args)


WEB = {"spiffe_id": "spiffe://example.org/web", "selectors": ["unix:uid:1000"],
       "node_selectors": [f"tpm:ek_hash:{EK_A}"]}


# --- entries ------------------------------------------------------------------------------------


async def test_a_created_entry_is_listed_served_and_its_node_told(admin: AuthorityAdmin, authority: Authority,
                                                                  bus: RecordingBus, clock: FakeClock) -> None:
    created = await run(admin, "entry.create", **WEB, x509_ttl="15m", labels={"team": "payments"})

    assert created["revision"] == 1 and created["x509_ttl"] == 900 and created["x509_ttl_text"] == "15m"
    assert created["created_at"] == int(clock.now())
    assert [e["id"] for e in await run(admin, "entry.list")] == [created["id"]]
    assert (await run(admin, "entry.show", id=created["id"]))["labels"] == {"team": "payments"}
    ((topic, event),) = published(bus, authority)
    assert topic == node_events_topic(NODE_A)
    assert isinstance(event, NodeEvent) and event.node_id == NODE_A
    index = authority.registry.index
    assert index.is_authorized(created["id"], SpiffeId.parse(NODE_A), frozenset(
        Selector.parse(s) for s in node_record(NODE_A, EK_A).selectors), TrustTier.HARDWARE) is not None


async def test_an_entry_bound_by_label_tells_every_node_with_the_label(admin: AuthorityAdmin, authority: Authority,
                                                                       bus: RecordingBus) -> None:
    await run(admin, "entry.create", spiffe_id="spiffe://example.org/db", selectors=["unix:uid:70"],
              node_selectors=["node:label:role:db"])

    assert [topic for topic, _ in published(bus, authority)] == [node_events_topic(NODE_A)]


async def test_the_same_entry_twice_is_refused_by_its_id(admin: AuthorityAdmin) -> None:
    await run(admin, "entry.create", **WEB)

    with pytest.raises(AdminRequestError, match="already exists"):
        await run(admin, "entry.create", **WEB)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"selectors": ["unix:pth:/bin/sh", "unix:uid:0"]}, "selectors[0]: unix:pth"),
        ({"selectors": ["unix:uidd:0"]}, "selectors[0]: unix:uidd"),
        ({"selectors": ["unix:uid:abc"]}, "selectors[0]: unix:uid:abc"),
        ({"selectors": ["unix:uid:-1"]}, "selectors[0]: unix:uid:-1"),
        ({"selectors": ["unix:uid: 0"]}, "selectors[0]: unix:uid: 0"),
        ({"selectors": ["unix:uid:0", "unix:sha256:XYZ"]}, "selectors[1]: unix:sha256:XYZ"),
        ({"selectors": ["unix:path:/bin/sh"]}, "selectors: needs at least one kernel-anchored selector"),
        ({"selectors": ["nonsense"]}, "selectors[0]: selector 'nonsense' is not of the form type:key:value"),
        ({"node_selectors": ["tpm:ek_hash:XYZ"]}, "node_selectors[0]: tpm:ek_hash:XYZ"),
        ({"node_selectors": ["node:tier:hardware"]}, "node_selectors: must include tpm:ek_hash or a node:label"),
        ({"spiffe_id": "spiffe://elsewhere.org/web"}, "spiffe_id: must be in the trust domain example.org"),
        ({"spiffe_id": "spiffe://example.org/vouchd/node/x"}, "spiffe_id: paths under /vouchd/ are reserved"),
        ({"x509_ttl": "2d"}, "x509_ttl: 2d is over the authority's cap x509_svid_max_ttl (24h)"),
        ({"x509_ttl": "soon"}, "x509_ttl: 'soon' is not a duration"),
        ({"min_tier": "gold"}, "min_tier: expected one of hardware, static-secret, got 'gold'"),
        ({"dns_names": ["-bad-"]}, "dns_names[0]: dns name '-bad-' is not a valid dns name"),
        ({"colour": "blue"}, "unknown argument 'colour'"),
    ],
)
async def test_a_bad_entry_is_refused_naming_what_is_wrong(admin: AuthorityAdmin, authority: Authority,
                                                           changes: dict[str, object], message: str) -> None:
    with pytest.raises(AdminRequestError) as refused:
        await run(admin, "entry.create", **{**WEB, **changes})

    assert str(refused.value).startswith(message)
    assert authority.registry.index.all() == []


async def test_a_fleet_authority_refuses_an_entry_that_names_no_node(admin: AuthorityAdmin) -> None:
    with pytest.raises(AdminRequestError, match="needs --parent or --node-selector"):
        await run(admin, "entry.create", spiffe_id="spiffe://example.org/web", selectors=["unix:uid:1"])


async def test_a_standalone_authority_binds_an_unbound_entry_to_its_own_tpm(authority: Authority) -> None:
    local = AuthorityAdmin(authority, workload_schema=selector_schema(["unix"]),
                           default_node_selectors=frozenset({Selector("tpm", "ek_hash", EK_A)}))

    created = await run(local, "entry.create", spiffe_id="spiffe://example.org/web", selectors=["unix:uid:1"])

    assert created["node_selectors"] == [f"tpm:ek_hash:{EK_A}"]


async def test_an_update_bumps_the_revision_and_revokes_the_older_one(admin: AuthorityAdmin, authority: Authority,
                                                                      bus: RecordingBus) -> None:
    created = await run(admin, "entry.create", **WEB)
    updated = await run(admin, "entry.update", id=created["id"], selectors=["unix:uid:1000", "unix:gid:50"],
                        hint="frontend")

    assert updated["revision"] == 2 and updated["hint"] == "frontend"
    assert updated["selectors"] == ["unix:gid:50", "unix:uid:1000"]
    assert updated["spiffe_id"] == WEB["spiffe_id"], "what the update does not name stays"
    topic, document = published(bus, authority)[-1]
    assert topic == REVOCATIONS_TOPIC
    assert isinstance(document, RevocationDocument)
    assert [(e.entry_id, e.below_revision) for e in document.entries] == [(created["id"], 2)]
    with pytest.raises(AdminRequestError, match="nothing to update"):
        await run(admin, "entry.update", id=created["id"])


async def test_an_update_that_moves_the_entry_to_another_node_tells_that_node(
        admin: AuthorityAdmin, authority: Authority, bus: RecordingBus) -> None:
    created = await run(admin, "entry.create", **WEB)
    await run(admin, "entry.update", id=created["id"], node_selectors=[f"tpm:ek_hash:{EK_B}"])

    topics = [topic for topic, _ in published(bus, authority)]
    assert topics == [node_events_topic(NODE_A), REVOCATIONS_TOPIC, node_events_topic(NODE_B)]


async def test_a_delete_revokes_every_revision_and_names_unknown_ids(admin: AuthorityAdmin, authority: Authority,
                                                                     bus: RecordingBus) -> None:
    created = await run(admin, "entry.create", **WEB)
    deleted = await run(admin, "entry.delete", id=created["id"])

    assert deleted["id"] == created["id"]
    assert authority.registry.index.all() == []
    _topic, document = published(bus, authority)[-1]
    assert isinstance(document, RevocationDocument)
    assert [(e.entry_id, e.below_revision) for e in document.entries] == [(created["id"], 2)]
    with pytest.raises(AdminRequestError, match=r"no entry 'e-nope' \(`vouchd entry list` shows them\)"):
        await run(admin, "entry.delete", id="e-nope")


async def test_a_recreated_id_continues_its_revisions(admin: AuthorityAdmin) -> None:
    created = await run(admin, "entry.create", **WEB)
    await run(admin, "entry.delete", id=created["id"])

    again = await run(admin, "entry.create", **WEB)
    assert again["id"] == created["id"] and again["revision"] == 2, "so the old revocation cannot void it"


# --- nodes and profiles -------------------------------------------------------------------------


async def test_a_ban_is_published_and_listed_and_an_unban_lifts_it(admin: AuthorityAdmin, authority: Authority,
                                                                   bus: RecordingBus) -> None:
    banned = await run(admin, "node.ban", id=NODE_A, reason="stolen disk")

    _topic, document = published(bus, authority)[-1]
    assert isinstance(document, RevocationDocument) and document.version == banned["revocation_version"]
    assert [(n.node_id, n.banned, n.reason) for n in document.nodes] == [(NODE_A, True, "stolen disk")]
    states = {n["node_id"]: n["state"] for n in (await run(admin, "node.list"))["nodes"]}
    assert states == {NODE_A: "banned", NODE_B: "trusted"}

    await run(admin, "node.unban", id=NODE_A)
    _topic, document = published(bus, authority)[-1]
    assert isinstance(document, RevocationDocument)
    assert [(n.node_id, n.banned) for n in document.nodes] == [(NODE_A, False)]
    with pytest.raises(AdminRequestError, match="is not banned"):
        await run(admin, "node.unban", id=NODE_A)


async def test_node_show_lists_the_entries_it_may_issue(admin: AuthorityAdmin) -> None:
    created = await run(admin, "entry.create", **WEB)

    shown = await run(admin, "node.show", id=NODE_A)
    assert shown["entries"] == [created["id"]]
    assert (await run(admin, "node.show", id=NODE_B))["entries"] == []
    with pytest.raises(AdminRequestError, match="no node"):
        await run(admin, "node.show", id="spiffe://example.org/vouchd/node/tpm/" + "c" * 64)


async def test_removing_a_profile_sends_its_nodes_to_attest_again(admin: AuthorityAdmin, authority: Authority,
                                                                  bus: RecordingBus) -> None:
    profiles = {p["name"]: p["nodes"] for p in await run(admin, "profile.list")}
    assert profiles == {"golden": [NODE_A], "other": [NODE_B]}

    removed = await run(admin, "profile.remove", name="golden")

    assert removed["nodes"] == [NODE_A]
    assert [p["name"] for p in await run(admin, "profile.list")] == ["other"]
    node = await authority.store.node(NODE_A)
    assert node is not None and node.state is NodeState.ATTESTING
    _topic, document = published(bus, authority)[-1]
    assert isinstance(document, RevocationDocument)
    assert [(n.node_id, n.banned) for n in document.nodes] == [(NODE_A, False)]
    with pytest.raises(AdminRequestError, match="no boot profile 'golden'"):
        await run(admin, "profile.remove", name="golden")


async def test_the_bundle_is_shown_as_pem(admin: AuthorityAdmin, authority: Authority) -> None:
    shown = await run(admin, "bundle.show")

    assert shown["trust_domain"] == "example.org"
    assert shown["pem"].encode() == authority.bundle().pem()
    assert len(shown["roots"]) == len(authority.bundle().authorities)


# --- the revocation document --------------------------------------------------------------------


async def test_the_document_is_reissued_with_a_newer_version_after_half_its_lifetime(
        authority: Authority, clock: FakeClock) -> None:
    first = await authority.revocations.current()
    assert first.document.next_update == int(clock.now() + DOCUMENT_LIFETIME)

    clock.advance(DOCUMENT_LIFETIME / 2 - 1)
    assert (await authority.revocations.current()) is first
    clock.advance(2)
    second = await authority.revocations.current()
    assert second.document.version > first.document.version
    assert second.document.next_update == int(clock.now() + DOCUMENT_LIFETIME)


async def test_revocations_leave_the_document_once_no_svid_they_revoke_can_be_valid(
        admin: AuthorityAdmin, authority: Authority, clock: FakeClock) -> None:
    created = await run(admin, "entry.create", **WEB)
    await run(admin, "entry.delete", id=created["id"])
    assert [e.entry_id for e in (await authority.revocations.current()).document.entries] == [created["id"]]

    clock.advance(timedelta(hours=24).total_seconds() + 301)  # the longest SVID lifetime, and the skew
    await run(admin, "node.ban", id=NODE_B)  # any later change prunes

    document = (await authority.revocations.current()).document
    assert document.entries == ()
    assert [n.node_id for n in document.nodes] == [NODE_B], "a ban stays while it lasts"


# --- the configuration file's entries ------------------------------------------------------------


def file_entry(name: str, **changes: object) -> Entry:
    entry = Entry(id=name, spiffe_id=SpiffeId.parse(f"spiffe://example.org/{name}"),
                  selectors=frozenset({Selector("unix", "uid", "1")}),
                  node_selectors=frozenset({Selector("tpm", "ek_hash", EK_A)}))
    return replace(entry, **changes)


async def test_importing_the_file_creates_updates_and_removes_only_its_own_entries(
        admin: AuthorityAdmin, authority: Authority) -> None:
    registry = authority.registry
    summary = await registry.import_entries([file_entry("a"), file_entry("b")])
    assert (summary.created, summary.updated, summary.deleted) == (2, 0, 0)
    runtime = await run(admin, "entry.create", **WEB)
    assert CONFIG_SOURCE_LABEL in registry.index.get("a").labels  # type: ignore[union-attr]

    summary = await registry.import_entries([file_entry("a"), file_entry("b", hint="changed")])
    assert (summary.created, summary.updated, summary.deleted, summary.unchanged) == (0, 1, 0, 1)

    summary = await registry.import_entries([file_entry("b", hint="changed")])
    assert (summary.created, summary.updated, summary.deleted, summary.unchanged) == (0, 0, 1, 1)
    assert [e.id for e in registry.index.all()] == sorted(["b", runtime["id"]]), "run-time entries stay"


async def test_vouchds_own_labels_cannot_be_set_and_survive_a_label_update(admin: AuthorityAdmin,
                                                                          authority: Authority) -> None:
    with pytest.raises(AdminRequestError, match="keys under vouchd/ are vouchd's own"):
        await run(admin, "entry.create", **WEB, labels={"vouchd/source": "config"})
    await authority.registry.import_entries([file_entry("a")])

    updated = await run(admin, "entry.update", id="a", labels={"team": "payments"})

    assert updated["labels"] == {"team": "payments", CONFIG_SOURCE_LABEL[0]: CONFIG_SOURCE_LABEL[1]}


async def test_the_policy_switch_labels_under_vouchd_are_the_operators_to_set(admin: AuthorityAdmin) -> None:
    created = await run(admin, "entry.create", **WEB, labels={"vouchd/static-secret-x509": "allow"})

    assert created["labels"] == {"vouchd/static-secret-x509": "allow"}
