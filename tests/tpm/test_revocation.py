"""Revocation and run-time registration between the real authority and a node on a swtpm (DESIGN §8).

What the authority enforces itself (a lying agent that ignores revocation documents still gets
nothing), and what a node accepts of what the authority publishes.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.tpm.conftest import TRUST_DOMAIN, BootedTpm, RecordingBus
from vouchd.agent.node import NodeIdentity, OlderRevocationsError
from vouchd.authority.server import Authority
from vouchd.entries import Entry
from vouchd.protocol.errors import RemoteError, SignatureError
from vouchd.protocol.messages import RevocationDocument, X509SvidRequest
from vouchd.protocol.transport import REVOCATIONS_TOPIC, LocalTransport, node_events_topic
from vouchd.selectors import Selector
from vouchd.spiffe import SpiffeId, make_csr
from vouchd.tpm import NodeKeys, TpmService


@pytest.fixture
async def node(authority: Authority, tpm: TpmService, node_keys: NodeKeys, booted_tpm: BootedTpm) -> NodeIdentity:
    identity = NodeIdentity.with_tpm(tpm=tpm, ak_public=node_keys.ak.public, node_key_public=node_keys.node_key.public,
                            transport=LocalTransport(authority.handle), trust_domain=TRUST_DOMAIN,
                            initial_bundle=authority.bundle, event_log_path=booted_tpm.event_log)
    await authority.enrol(identity.node_id.rsplit("/", 1)[1], "test")
    await identity.attest()
    return identity


@pytest.fixture
def published(authority: Authority) -> RecordingBus:
    bus = authority.revocations._publisher  # the RecordingBus new_authority gave it
    assert isinstance(bus, RecordingBus)
    return bus


def entry_for(node: NodeIdentity, name: str) -> Entry:
    ek = node.node_id.rsplit("/", 1)[1]
    return Entry(id=name, spiffe_id=SpiffeId.parse(f"spiffe://example.org/{name}"),
                 selectors=frozenset({Selector("unix", "uid", "1000")}),
                 node_selectors=frozenset({Selector("tpm", "ek_hash", ek)}))


async def ask(node: NodeIdentity, entry_id: str) -> tuple[list[str], list[str]]:
    csr = make_csr(ec.generate_private_key(ec.SECP256R1()))
    response = await node.request(x509_svids=[X509SvidRequest(entry_id, csr)])
    return [s.entry_id for s in response.x509_svids], [f"{e.entry_id}:{e.code}" for e in response.errors]


async def test_an_entry_created_at_run_time_is_served_and_its_node_is_told(
        authority: Authority, node: NodeIdentity, published: RecordingBus) -> None:
    await authority.registry.create(entry_for(node, "web"))

    assert published.published[-1][0] == node_events_topic(node.node_id)
    event = node.open_node_event(published.published[-1][1])
    assert event.event == "entries_changed"
    response = await node.request(sync_entries=True)
    assert [e.id for e in response.entries or ()] == ["web"]
    assert await ask(node, "web") == (["web"], [])


async def test_a_deleted_entry_is_refused_to_an_agent_that_ignores_revocations(
        authority: Authority, node: NodeIdentity, published: RecordingBus) -> None:
    await authority.registry.create(entry_for(node, "web"))
    await authority.registry.delete("web")

    assert await ask(node, "web") == ([], ["web:not_authorized"])
    # The reply brought the document along; it is the one the authority published.
    topic, document = published.published[-1]
    assert topic == REVOCATIONS_TOPIC
    assert node.accept_revocations(document) is None
    assert node.revocations is not None
    assert [(e.entry_id, e.below_revision) for e in node.revocations.entries] == [("web", 2)]


async def test_an_updated_entry_revokes_its_older_revision(authority: Authority, node: NodeIdentity,
                                                           published: RecordingBus) -> None:
    created = await authority.registry.create(entry_for(node, "web"))
    updated = await authority.registry.update("web", lambda e: replace(e, hint="frontend"))

    assert (created.revision, updated.revision) == (1, 2)
    document = node.accept_revocations(published.published[-1][1])
    assert document is not None
    assert [(e.entry_id, e.below_revision) for e in document.entries] == [("web", 2)]
    assert await ask(node, "web") == (["web"], [])


async def test_an_older_revocation_document_is_refused(authority: Authority, node: NodeIdentity,
                                                       published: RecordingBus) -> None:
    await authority.registry.create(entry_for(node, "a"))
    await authority.registry.create(entry_for(node, "b"))
    await authority.registry.delete("a")
    older = published.published[-1][1]
    await authority.registry.delete("b")
    newer = published.published[-1][1]

    assert node.accept_revocations(newer) is not None
    with pytest.raises(OlderRevocationsError, match="is older than the version"):
        node.accept_revocations(older)
    assert node.accept_revocations(newer) is None, "the document held is not applied twice"
    held = node.revocations
    assert isinstance(held, RevocationDocument) and {e.entry_id for e in held.entries} == {"a", "b"}


async def test_a_revocation_document_on_a_node_event_topic_is_refused(
        authority: Authority, node: NodeIdentity, published: RecordingBus) -> None:
    await authority.registry.create(entry_for(node, "web"))
    event = published.published[-1][1]

    with pytest.raises(SignatureError, match="arrived on 'revocations'"):
        node.accept_revocations(event)


async def test_a_banned_node_gets_nothing_and_cannot_attest_until_unbanned(
        authority: Authority, node: NodeIdentity, published: RecordingBus) -> None:
    await authority.registry.create(entry_for(node, "web"))
    await authority.store.ban_node(node.node_id, "stolen", now=authority.clock.now())
    await authority.revocations.changed()

    with pytest.raises(RemoteError) as refused:
        await ask(node, "web")
    assert refused.value.code == "banned"
    with pytest.raises(RemoteError) as refused_attestation:
        await node.attest()
    assert refused_attestation.value.code == "banned"
    document = node.accept_revocations(published.published[-1][1])
    assert document is not None and [(n.node_id, n.banned) for n in document.nodes] == [(node.node_id, True)]

    await authority.store.unban_node(node.node_id, now=authority.clock.now())
    assert await ask(node, "web") == (["web"], []), "the node attests again by itself and is served"


async def test_a_removed_boot_profile_makes_the_next_attestation_of_its_nodes_fail(
        authority: Authority, node: NodeIdentity) -> None:
    (profile,) = await authority.store.profile_records()
    removed = await authority.store.remove_profile(profile.name, now=authority.clock.now())
    assert removed is not None and removed[1] == [node.node_id]

    with pytest.raises(RemoteError) as refused:
        await node.request(sync_entries=True)  # the authority demands attestation, which now fails
    assert refused.value.code == "policy"
    assert "outside every accepted profile" in str(refused.value)


async def test_an_older_document_in_a_reply_leaves_the_newer_one_and_the_request_stands(
        authority: Authority, node: NodeIdentity, published: RecordingBus) -> None:
    await authority.registry.create(entry_for(node, "a"))
    await authority.registry.delete("a")
    older = await authority.revocations.current()
    await authority.registry.create(entry_for(node, "b"))
    await authority.registry.delete("b")
    assert node.accept_revocations(published.published[-1][1]) is not None
    held = node.revocations
    assert held is not None and held.version > older.document.version
    authority.revocations._current = older  # an authority restored from an older state

    response = await node.request(sync_entries=True)

    assert response.entries == ()
    assert node.revocations == held


async def test_a_node_banned_while_its_attestation_completes_is_still_refused(
        authority: Authority, node: NodeIdentity) -> None:
    record = await authority.store.node(node.node_id)
    assert record is not None
    await authority.store.ban_node(node.node_id, "stolen", now=authority.clock.now())
    await authority.store.save_node(record)  # what an attestation completing at that moment writes

    with pytest.raises(RemoteError) as refused:
        await node.request(sync_entries=True)
    assert refused.value.code == "banned"
