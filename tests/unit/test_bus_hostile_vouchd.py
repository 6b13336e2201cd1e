"""Hostile messages on the bus against vouchd's own checks, not the broker's: a real authority
behind a real mosquitto, nodes (static-secret keys, so no TPM is needed) speaking through real MQTT
links, and an attacker with a plain MQTT client on the same, anonymous broker. The broker lets the
attacker read and write every topic here; signatures, nonces and node IDs must still hold.

(Wrong schemas, oversized messages and floods are tests/unit/test_mqtt_hostile.py; another node's
AK is tests/tpm/test_node_attestation.py's `ak_changed` test.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.fakes import FakeClock
from tests.mosquitto import Mosquitto, next_message, raw_client, start_broker
from tests.unit.test_authority_server import config
from vouchd.agent.node import NodeIdentity
from vouchd.agent.provers import KeyProver
from vouchd.authority.build import open_authority
from vouchd.authority.server import Authority
from vouchd.config import AuthorityConfig
from vouchd.decisions import Decision, DecisionBus, DecisionKind
from vouchd.entries import Entry
from vouchd.protocol.errors import SignatureError
from vouchd.protocol.keyproof import node_key_hash, node_key_spki
from vouchd.protocol.messages import ErrorReply, JwtSvidRequest
from vouchd.protocol.mqtt import BusTopics, MqttAuthorityLink, MqttAuthorityService, ServiceLimits
from vouchd.protocol.signing import ReplySigner
from vouchd.protocol.transport import REVOCATIONS_TOPIC
from vouchd.selectors import Selector, selector_set
from vouchd.spiffe import SpiffeId, TrustDomain, TrustTier

pytestmark = pytest.mark.timeout(60)

TD = TrustDomain("example.org")
TOPICS = BusTopics("example.org")
LIMITS = ServiceLimits(per_node_rate=1000, per_node_burst=1000, total_rate=1000, total_burst=1000)


@pytest.fixture
def broker(tmp_path: Path) -> AsyncIterator[Mosquitto]:
    (tmp_path / "mosquitto").mkdir()
    instance = start_broker(folder=tmp_path / "mosquitto")
    try:
        yield instance
    finally:
        instance.stop()


@dataclass
class Fleet:
    authority: Authority
    service: MqttAuthorityService
    delay: list[float]             # seconds the authority waits before answering (lets an attacker win a race)
    decisions: list[Decision]


@contextlib.asynccontextmanager
async def fleet(broker: Mosquitto, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Fleet]:
    delay = [0.0]
    async with MqttAuthorityService(broker.host, broker.port, trust_domain="example.org", limits=LIMITS) as service:
        decisions = DecisionBus()
        seen: list[Decision] = []
        decisions.subscribe(seen.append)
        authority = await open_authority(AuthorityConfig(**vars(config(tmp_path / "authority"))), TD,
                                         publisher=service, decisions=decisions, clock=clock)

        async def handle(topic: str, request: bytes) -> bytes:
            await asyncio.sleep(delay[0])
            return await authority.handle(topic, request)

        await service.serve(handle)
        try:
            yield Fleet(authority, service, delay, seen)
        finally:
            await authority.close()


@contextlib.asynccontextmanager
async def node(broker: Mosquitto, the_fleet: Fleet, clock: FakeClock) -> AsyncIterator[NodeIdentity]:
    key = ec.generate_private_key(ec.SECP256R1())
    node_id = await the_fleet.authority.enrol_node_key(node_key_spki(key.public_key()), "test")
    await the_fleet.authority.registry.create(Entry(
        id=f"e-{node_id[-8:]}", spiffe_id=SpiffeId.parse(f"spiffe://example.org/w/{node_id[-8:]}"),
        selectors=selector_set(["unix:uid:0"]), min_tier=TrustTier.STATIC_SECRET, jwt_ttl=timedelta(seconds=60),
        node_selectors=frozenset({Selector("node", "key_hash", node_key_hash(node_key_spki(key.public_key())))})))
    link = MqttAuthorityLink(broker.host, broker.port, trust_domain="example.org", node_id=node_id)
    async with link:
        identity = NodeIdentity(prover=KeyProver(key, trust_domain=TD), transport=link, trust_domain=TD,
                                initial_bundle=the_fleet.authority.bundle, clock=clock)
        await identity.attest()
        yield identity


def forged_signer() -> ReplySigner:
    """An attacker's own CA and reply key: a well-formed signed reply that chains to nothing trusted."""
    ca_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "attacker")])
    now = datetime.now(UTC)
    key = ec.generate_private_key(ec.SECP256R1())
    authority_id = x509.UniformResourceIdentifier("spiffe://example.org/vouchd/authority")
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1)).not_valid_after(now + timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([authority_id]), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return ReplySigner(key, [cert])


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


async def first_request(attacker: aiomqtt.Client) -> aiomqtt.Message:
    await attacker.subscribe(TOPICS.request("authority/request"), qos=1)
    return await next_message(attacker, timeout=10)


async def test_a_forged_reply_on_the_nodes_own_topic_with_its_correlation_data_is_refused(
        broker: Mosquitto, tmp_path: Path, clock: FakeClock) -> None:
    async with fleet(broker, tmp_path, clock) as the_fleet, node(broker, the_fleet, clock) as identity, \
            raw_client(broker, "attacker") as attacker:
        the_fleet.delay[0] = 1.0  # the genuine reply comes late: the forged one is read first
        asking = asyncio.create_task(identity.request(jwt_svids=[JwtSvidRequest(f"e-{identity.node_id[-8:]}",
                                                                                ("aud",))]))
        seen = await first_request(attacker)
        forged = forged_signer().sign(ErrorReply("banned", "you are banned"), node_id=identity.node_id,
                                      request=bytes(seen.payload))
        await attacker.publish(TOPICS.replies(identity.node_id), forged, qos=1, properties=seen.properties)

        with pytest.raises(SignatureError, match="does not chain to the trust bundle"):
            async with asyncio.timeout(10):
                await asking
    assert identity.status is not None and identity.status.authority_error is not None


async def test_a_replayed_request_issues_nothing_new(broker: Mosquitto, tmp_path: Path, clock: FakeClock) -> None:
    async with fleet(broker, tmp_path, clock) as the_fleet, node(broker, the_fleet, clock) as identity, \
            raw_client(broker, "attacker") as attacker:
        await attacker.subscribe(TOPICS.request("authority/request"), qos=1)
        async with asyncio.timeout(10):
            await identity.request(jwt_svids=[JwtSvidRequest(f"e-{identity.node_id[-8:]}", ("aud",))])
        captured = [m async for m in _drain(attacker)]
        signed = next(m for m in captured if b'"signed_request"' in bytes(m.payload))
        issued = sum(d.kind is DecisionKind.ISSUE for d in the_fleet.decisions)

        await attacker.publish(signed.topic.value, signed.payload, qos=1, properties=signed.properties)
        await asyncio.sleep(0.5)

        assert sum(d.kind is DecisionKind.ISSUE for d in the_fleet.decisions) == issued, "nothing issued again"


async def test_a_genuine_reply_redirected_to_another_nodes_topic_is_refused(
        broker: Mosquitto, tmp_path: Path, clock: FakeClock) -> None:
    async with fleet(broker, tmp_path, clock) as the_fleet, node(broker, the_fleet, clock) as node_a, \
            node(broker, the_fleet, clock) as node_b, raw_client(broker, "attacker") as attacker:
        await attacker.subscribe(TOPICS.replies(node_a.node_id), qos=1)
        async with asyncio.timeout(10):
            await node_a.request(sync_entries=True)
        genuine_for_a = await next_message(attacker, timeout=5)

        the_fleet.delay[0] = 1.0
        asking = asyncio.create_task(node_b.request(sync_entries=True))
        seen = await first_request(attacker)
        await attacker.publish(TOPICS.replies(node_b.node_id), genuine_for_a.payload, qos=1,
                               properties=seen.properties)

        with pytest.raises(SignatureError, match=r"another node|another request"):
            async with asyncio.timeout(10):
                await asking


async def test_an_older_revocation_document_replayed_on_the_bus_is_refused(
        broker: Mosquitto, tmp_path: Path, clock: FakeClock) -> None:
    async with fleet(broker, tmp_path, clock) as the_fleet, node(broker, the_fleet, clock) as identity, \
            raw_client(broker, "attacker") as attacker:
        refusals: list[str] = []

        async def on_revocations(topic: str, payload: bytes) -> None:
            try:
                identity.accept_revocations(payload)
            except SignatureError as err:
                refusals.append(str(err))

        identity_link = identity._transport
        identity_link.subscribe(REVOCATIONS_TOPIC, on_revocations)  # type: ignore[attr-defined]
        await attacker.subscribe(TOPICS.publication(REVOCATIONS_TOPIC), qos=1)
        first = await the_fleet.authority.revocations.changed()
        captured = await next_message(attacker, timeout=5)
        await the_fleet.authority.store.ban_node("spiffe://example.org/vouchd/node/key/" + "f" * 64, "test",
                                                 now=clock.now())
        newer = await the_fleet.authority.revocations.changed()
        assert newer.document.version > first.document.version
        async with asyncio.timeout(10):
            while identity.revocations is None or identity.revocations.version < newer.document.version:
                await asyncio.sleep(0.05)

        await attacker.publish(TOPICS.publication(REVOCATIONS_TOPIC), captured.payload, qos=1, retain=True)
        async with asyncio.timeout(10):
            while not refusals:
                await asyncio.sleep(0.05)

        assert "older than" in refusals[-1]
        assert identity.revocations.version == newer.document.version, "the newer document stays in force"


async def _drain(client: aiomqtt.Client, quiet: float = 0.3) -> AsyncIterator[aiomqtt.Message]:
    while True:
        try:
            yield await next_message(client, timeout=quiet)
        except TimeoutError:
            return
