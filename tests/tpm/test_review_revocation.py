"""Revocation, bans and enrolment between the real authority and a node on a swtpm: the checks the
first tests left without a test of their own (DESIGN §4, §8).

Each test fails when one check is removed or weakened: the authority refuses a banned node at each
step of attestation, keeps an approve-mode EK waiting, learns no profile beside an existing one and
caps TTLs itself; the node takes the current revocation document from every attestation and reply
(and only then), and refuses publications that are not what their topic says; the agent applies
what is published even when the authority refuses the sync it triggers.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tests.swtpm import Swtpm
from tests.tpm.conftest import (
    TRUST_DOMAIN,
    BootedTpm,
    RecordedDecisions,
    RecordingBus,
    authority_config,
    new_authority,
)
from vouchd.agent.node import NodeIdentity
from vouchd.agent.svids import SvidManager
from vouchd.agent.updates import AuthorityUpdates
from vouchd.agent.workload_api.identities import NoIdentityError, X509SvidMaterial
from vouchd.attestors.catalog import selector_schema
from vouchd.authority.admin import AuthorityAdmin
from vouchd.authority.build import open_authority
from vouchd.authority.ca import CertificateAuthority
from vouchd.authority.server import Authority
from vouchd.entries import Entry
from vouchd.protocol.codec import decode, encode
from vouchd.protocol.errors import RemoteError, SignatureError
from vouchd.protocol.identities import authority_spiffe_id
from vouchd.protocol.messages import (
    AttestNonceRequest,
    AttestRequest,
    Challenge,
    ChallengeResponse,
    NodeEvent,
    NonceGrant,
    TpmEvidence,
    X509SvidRequest,
)
from vouchd.protocol.signing import ReplySigner, ReplyVerifier
from vouchd.protocol.transport import ATTEST_TOPIC, REVOCATIONS_TOPIC, node_events_topic
from vouchd.selectors import Selector, selector_set
from vouchd.spiffe import SpiffeId, TrustTier, make_csr
from vouchd.tpm import NodeKeys, TpmService

DEADLINE = 30.0  # every await on the agent's parts is bounded
OTHER_NODE = "spiffe://example.org/vouchd/node/tpm/" + "0" * 64


class WatchedTransport:
    """The in-process transport to the authority, recording the kind of every request, and running
    `before[kind]` before a request of that kind reaches the authority."""

    def __init__(self, authority: Authority) -> None:
        self.authority = authority
        self.sent: list[str] = []
        self.before: dict[str, Callable[[], Awaitable[None]]] = {}

    async def call(self, topic: str, request: bytes, *, timeout: float) -> bytes:
        kind = type(decode(request)).__name__
        self.sent.append(kind)
        hook = self.before.get(kind)
        if hook is not None:
            await hook()
        return await asyncio.wait_for(self.authority.handle(topic, bytes(request)), timeout)


def identity(authority: Authority, tpm: TpmService, keys: NodeKeys, transport: WatchedTransport,
             event_log: Path | None) -> NodeIdentity:
    return NodeIdentity.with_tpm(tpm=tpm, ak_public=keys.ak.public, node_key_public=keys.node_key.public,
                        transport=transport, trust_domain=TRUST_DOMAIN, initial_bundle=authority.bundle,
                        event_log_path=event_log)


def ek_of(node: NodeIdentity) -> str:
    return node.node_id.rsplit("/", 1)[1]


@pytest.fixture
def bus() -> RecordingBus:
    return RecordingBus()


@pytest.fixture
async def authority(tmp_path: Path, swtpm: Swtpm, bus: RecordingBus) -> AsyncIterator[Authority]:
    """The standalone authority of tests.tpm.conftest, publishing on a bus this module reads."""
    instance = await open_authority(authority_config(tmp_path / "authority", swtpm), TRUST_DOMAIN, publisher=bus,
                                    decisions=RecordedDecisions(), standalone=True)
    yield instance
    await instance.close()


@pytest.fixture
def transport(authority: Authority) -> WatchedTransport:
    return WatchedTransport(authority)


@pytest.fixture
async def fresh_node(authority: Authority, tpm: TpmService, node_keys: NodeKeys, booted_tpm: BootedTpm,
                     transport: WatchedTransport) -> NodeIdentity:
    """Enrolled, not yet attested."""
    node = identity(authority, tpm, node_keys, transport, booted_tpm.event_log)
    await authority.enrol(ek_of(node), "test")
    return node


@pytest.fixture
async def node(fresh_node: NodeIdentity) -> NodeIdentity:
    async with asyncio.timeout(DEADLINE):
        await fresh_node.attest()
    return fresh_node


def web_entry(node: NodeIdentity, *, x509_ttl: timedelta | None = None) -> Entry:
    return Entry(id="web", spiffe_id=SpiffeId.parse("spiffe://example.org/web"),
                 selectors=frozenset({Selector("unix", "uid", "1000")}),
                 node_selectors=frozenset({Selector("tpm", "ek_hash", ek_of(node))}), x509_ttl=x509_ttl)


async def ban(authority: Authority, node_id: str) -> bytes:
    """Ban a node as `vouchd node ban` does; the signed document the authority published."""
    await authority.store.ban_node(node_id, "stolen", now=authority.clock.now())
    return (await authority.revocations.changed()).signed


# --- the authority: bans at every step, enrolment, profiles, TTLs ------------------------------


async def test_a_banned_node_is_refused_at_its_first_step_and_gets_no_challenge(
        authority: Authority, fresh_node: NodeIdentity, transport: WatchedTransport) -> None:
    await ban(authority, fresh_node.node_id)

    with pytest.raises(RemoteError) as refused:
        await fresh_node.attest()

    assert refused.value.code == "banned"
    assert transport.sent == ["AttestNonceRequest"], "not even a nonce, let alone a challenge, was handed out"
    assert await authority.store.node(fresh_node.node_id) is None


async def test_a_node_banned_while_it_answers_its_challenge_is_not_trusted(
        authority: Authority, fresh_node: NodeIdentity, transport: WatchedTransport) -> None:
    async def banned_meanwhile() -> None:
        await ban(authority, fresh_node.node_id)

    transport.before["ChallengeResponse"] = banned_meanwhile

    with pytest.raises(RemoteError) as refused:
        await fresh_node.attest()

    assert refused.value.code == "banned"
    assert transport.sent == ["AttestNonceRequest", "AttestRequest", "ChallengeResponse"]
    assert await authority.store.node(fresh_node.node_id) is None, "no trusted record, no node SVID"


async def test_a_challenge_response_naming_another_node_than_its_session_is_refused(
        authority: Authority, fresh_node: NodeIdentity, tpm: TpmService, node_keys: NodeKeys,
        booted_tpm: BootedTpm) -> None:
    # The exchange by hand: the agent would never send this.
    grant = ReplyVerifier(TRUST_DOMAIN, authority.bundle).open(
        await authority.handle(ATTEST_TOPIC, nonce_request := encode(AttestNonceRequest(fresh_node.node_id, b"r"))),
        node_id=fresh_node.node_id, request=nonce_request)
    assert isinstance(grant, NonceGrant)
    certify_nonce = grant.nonce
    certify = await tpm.certify_node_key(certify_nonce)
    request = encode(AttestRequest(
        node_id=fresh_node.node_id, ek_type=tpm.ek.ek_type, ek_public=tpm.ek.public, ek_certificate=tpm.ek.certificate,
        ak_public=node_keys.ak.public, node_key_public=node_keys.node_key.public,
        node_key_certify=TpmEvidence(certify.attest, certify.signature), certify_nonce=certify_nonce,
        event_log=booted_tpm.event_log.read_bytes()))
    challenge = ReplyVerifier(TRUST_DOMAIN, authority.bundle).open(
        await authority.handle(ATTEST_TOPIC, request), node_id=fresh_node.node_id, request=request)
    assert isinstance(challenge, Challenge)
    secret = await tpm.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
    quote = await tpm.quote(challenge.pcr_bank, challenge.pcr_indices,
                            hashlib.sha256(challenge.server_nonce + secret).digest())

    response = encode(ChallengeResponse(node_id=OTHER_NODE, session=challenge.session,
                                        quote=TpmEvidence(quote.attest, quote.signature)))
    answer = await authority.handle(ATTEST_TOPIC, response)
    with pytest.raises(RemoteError) as refused:  # the reply names the node the response named
        ReplyVerifier(TRUST_DOMAIN, authority.bundle).open(answer, node_id=OTHER_NODE, request=response)

    assert refused.value.code == "session_expired"
    assert await authority.store.node(fresh_node.node_id) is None
    assert await authority.store.node(OTHER_NODE) is None


@pytest.fixture
async def approving_authority(tmp_path: Path, swtpm: Swtpm) -> AsyncIterator[Authority]:
    """A fleet authority in approve mode; nodes without an event log are accepted (profile `none`)."""
    instance = await new_authority(authority_config(tmp_path / "approving", swtpm, enrolment="approve",
                                                    accept_missing_event_log=True))
    yield instance
    await instance.close()


async def test_in_approve_mode_an_unapproved_ek_waits_named_until_an_operator_approves_it(
        approving_authority: Authority, tpm: TpmService, node_keys: NodeKeys) -> None:
    node = identity(approving_authority, tpm, node_keys, WatchedTransport(approving_authority), None)
    admin = AuthorityAdmin(approving_authority, workload_schema=selector_schema(["unix"]))

    with pytest.raises(RemoteError) as refused:
        await node.attest()

    assert refused.value.code == "pending"
    assert await approving_authority.store.node(node.node_id) is None
    listed = await admin.commands()["node.list"]({})
    assert [p["node_id"] for p in listed["pending"]] == [node.node_id] and listed["nodes"] == []

    await admin.commands()["node.approve"]({"id": node.node_id})
    async with asyncio.timeout(DEADLINE):
        await node.attest()
    stored = await approving_authority.store.node(node.node_id)
    assert stored is not None and stored.state.value == "trusted"


async def test_in_approve_mode_a_banned_ek_is_refused_and_not_queued(
        approving_authority: Authority, tpm: TpmService, node_keys: NodeKeys) -> None:
    node = identity(approving_authority, tpm, node_keys, WatchedTransport(approving_authority), None)
    await ban(approving_authority, node.node_id)

    with pytest.raises(RemoteError) as refused:
        await node.attest()

    assert refused.value.code == "banned"
    assert await approving_authority.store.pending() == [], "an operator must not be offered a banned node"


async def test_a_standalone_authority_that_has_a_profile_learns_no_other_one(
        authority: Authority, fresh_node: NodeIdentity) -> None:
    await authority.store.save_profile("baseline", ["0:sha256:" + "1" * 64], "operator", now=authority.clock.now())

    with pytest.raises(RemoteError) as refused:
        await fresh_node.attest()

    assert refused.value.code == "policy"
    assert list(await authority.store.profiles()) == ["baseline"]
    assert await authority.store.node(fresh_node.node_id) is None


async def test_the_authority_caps_an_entry_ttl_whatever_the_entry_asks(authority: Authority,
                                                                        node: NodeIdentity) -> None:
    # Past the admin command's check: an entry from an older store or a file read before the cap.
    await authority.registry.create(web_entry(node, x509_ttl=timedelta(hours=48)))
    csr = make_csr(ec.generate_private_key(ec.SECP256R1()))

    response = await node.request(x509_svids=[X509SvidRequest("web", csr)])

    (issued,) = response.x509_svids
    cert = x509.load_der_x509_certificate(issued.cert_chain)
    assert cert.not_valid_after_utc.timestamp() <= time.time() + timedelta(hours=24).total_seconds()


# --- the node: the current document with every attestation and reply, publications ------------


async def test_attestation_hands_the_node_the_current_revocation_document(authority: Authority,
                                                                         node: NodeIdentity) -> None:
    current = await authority.revocations.current()

    assert node.revocations == current.document


async def test_a_reply_carries_the_document_only_when_the_node_holds_another_version(
        authority: Authority, node: NodeIdentity) -> None:
    held = node.revocations
    assert held is not None

    assert (await node.request(sync_entries=True)).revocations is None, "the node holds the current one"

    await authority.registry.create(web_entry(node))
    await authority.registry.delete("web")  # a new version, published; the node missed it
    brought = (await node.request(sync_entries=True)).revocations
    assert brought is not None
    assert node.revocations is not None and node.revocations.version > held.version
    assert [e.entry_id for e in node.revocations.entries] == ["web"]

    assert (await node.request(sync_entries=True)).revocations is None


@pytest.fixture
def signer(authority: Authority) -> ReplySigner:
    """Signs as the authority: an authority SVID from its own CA (read from its state folder)."""
    ca = CertificateAuthority.load_or_create(authority.config.state_dir, TRUST_DOMAIN,
                                             ca_ttl=authority.config.ca_ttl)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.sign_x509_svid(key.public_key(), authority_spiffe_id(TRUST_DOMAIN), ttl=timedelta(hours=1),
                             tier=TrustTier.HARDWARE)
    return ReplySigner(key, [cert])


async def test_a_node_event_about_another_node_is_refused(node: NodeIdentity, signer: ReplySigner) -> None:
    topic = node_events_topic(node.node_id)
    data = signer.publish(NodeEvent(node_id=OTHER_NODE, event="entries_changed", issued_at=int(time.time())),
                          topic=topic)

    with pytest.raises(SignatureError, match="other than an event for this node"):
        node.open_node_event(data)


async def test_a_node_events_topic_carrying_a_revocation_document_is_refused(node: NodeIdentity,
                                                                             signer: ReplySigner) -> None:
    held = node.revocations
    assert held is not None
    topic = node_events_topic(node.node_id)
    data = signer.publish(replace(held, version=held.version + 1), topic=topic)

    with pytest.raises(SignatureError, match="other than an event for this node"):
        node.open_node_event(data)


async def test_a_revocations_topic_carrying_something_else_is_refused(node: NodeIdentity,
                                                                      signer: ReplySigner) -> None:
    held = node.revocations
    data = signer.publish(NodeEvent(node_id=node.node_id, event="entries_changed", issued_at=int(time.time())),
                          topic=REVOCATIONS_TOPIC)

    with pytest.raises(SignatureError, match="revocations carried a NodeEvent"):
        node.accept_revocations(data)
    assert node.revocations == held


# --- the agent: what is published is applied, even when the sync it triggers is refused --------


@contextlib.asynccontextmanager
async def serving(node: NodeIdentity) -> AsyncIterator[SvidManager]:
    """An SVID manager over the node identity, synced once, with its issuance loop running."""
    manager = SvidManager(node)
    async with asyncio.timeout(DEADLINE):
        await manager.sync_entries()
    task = asyncio.create_task(manager.run())
    try:
        yield manager
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def fetch(manager: SvidManager) -> list[X509SvidMaterial]:
    async with asyncio.timeout(DEADLINE):
        return await manager.x509_svids(selector_set(["unix:uid:1000"]))


async def test_a_published_ban_applies_even_though_the_sync_it_triggers_is_refused(
        authority: Authority, node: NodeIdentity, transport: WatchedTransport) -> None:
    await authority.registry.create(web_entry(node))
    async with serving(node) as manager:
        await fetch(manager)
        document = await ban(authority, node.node_id)
        sent = len(transport.sent)

        async with asyncio.timeout(DEADLINE):
            await AuthorityUpdates(node, manager).on_revocations(REVOCATIONS_TOPIC, document)

        assert len(transport.sent) > sent, "the agent tried to sync, and the authority refused a banned node"
        assert manager.banned == "stolen"
        assert manager.svids == []
        with pytest.raises(NoIdentityError):
            await fetch(manager)


async def test_a_published_entry_update_brings_the_new_revision_at_once(authority: Authority, node: NodeIdentity,
                                                                        bus: RecordingBus) -> None:
    await authority.registry.create(web_entry(node))
    async with serving(node) as manager:
        (first,) = await fetch(manager)
        await authority.registry.update("web", lambda e: replace(e, hint="frontend"))
        document = bus.published[-1]
        assert document[0] == REVOCATIONS_TOPIC

        async with asyncio.timeout(DEADLINE):
            await AuthorityUpdates(node, manager).on_revocations(*document)

        assert [(e.id, e.revision) for e in manager.entries] == [("web", 2)], "synced, not only revoked"
        (second,) = await fetch(manager)
        assert second.hint == "frontend" and second.cert_chain_der != first.cert_chain_der


async def test_a_node_event_syncs_the_entries_only_when_it_verifies(authority: Authority, node: NodeIdentity,
                                                                    transport: WatchedTransport,
                                                                    bus: RecordingBus) -> None:
    async with serving(node) as manager:
        updates = AuthorityUpdates(node, manager)
        revocations = (await authority.revocations.changed()).signed  # genuine, but not a node event
        await authority.registry.create(web_entry(node))
        event = bus.published[-1]
        assert event[0] == node_events_topic(node.node_id)
        sent = len(transport.sent)

        async with asyncio.timeout(DEADLINE):
            await updates.on_node_event(event[0], revocations)
        assert manager.entries == [] and len(transport.sent) == sent, "a refused event makes no request"

        async with asyncio.timeout(DEADLINE):
            await updates.on_node_event(*event)
        assert [e.id for e in manager.entries] == ["web"]
