"""The shipped broker configuration (examples/mosquitto) with TLS client certificates: each node
reaches only its own topics, only the authority takes requests and writes what is retained."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import shutil
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.mosquitto import (
    FakeAuthority,
    Mosquitto,
    answer_to,
    next_message,
    no_message,
    node_id,
    nonce_request,
    raw_client,
    start_broker,
)
from vouchd.protocol.errors import TransportError
from vouchd.protocol.mqtt import BrokerTls, MqttAuthorityLink, MqttAuthorityService, node_key
from vouchd.protocol.mqtt_connection import publish_properties
from vouchd.protocol.transport import REQUEST_TOPIC, node_events_topic

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "mosquitto"
TD = "example.org"                       # the trust domain the example ACL is written for
PREFIX = f"vouchd/v1/{TD}"
NODE_A = node_id(TD, "a")
NODE_B = node_id(TD, "b")


@dataclass(frozen=True)
class Pki:
    folder: Path

    @property
    def ca(self) -> Path:
        return self.folder / "clients-ca.pem"

    def tls(self, name: str) -> BrokerTls:
        return BrokerTls(ca_file=self.ca, cert_file=self.folder / f"{name}.pem", key_file=self.folder / f"{name}.key")

    def context(self, name: str | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=str(self.ca))
        if name is not None:
            context.load_cert_chain(self.folder / f"{name}.pem", self.folder / f"{name}.key")
        return context


def _write_pki(folder: Path) -> Pki:
    """One CA for the broker's certificate and the clients' (the trust domain's roots would sign
    the node SVIDs; an operator's CA the broker's and the authority's certificates)."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test root")])
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
          .not_valid_after(now + datetime.timedelta(hours=1))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    (folder / "clients-ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))

    def issue(name: str, common_name: str | None, *, server: bool = False, uri: str | None = None) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)] if common_name else
                            [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vouchd")])
        sans: list[x509.GeneralName] = [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))] if server else []
        if uri is not None:
            sans.append(x509.UniformResourceIdentifier(uri))
        builder = (x509.CertificateBuilder().subject_name(subject).issuer_name(ca_name).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(hours=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(ca_key, hashes.SHA256())
        (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        (folder / f"{name}.key").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                               serialization.PrivateFormat.PKCS8,
                                                               serialization.NoEncryption()))

    issue("broker", "broker", server=True)
    issue("authority", "vouchd-authority")
    issue("node-a", node_key(NODE_A), uri=NODE_A)
    issue("node-b", node_key(NODE_B), uri=NODE_B)
    issue("no-common-name", None, uri=f"spiffe://{TD}/web")   # what an X.509-SVID's subject looks like
    return Pki(folder)


def _example_config(folder: Path) -> list[str]:
    """examples/mosquitto/vouchd.conf with its files in `folder` and its listener on the test's port."""
    lines = []
    for line in (EXAMPLES / "vouchd.conf").read_text().splitlines():
        option = line.split("#", 1)[0].split()
        if not option or option[0] in ("listener", "persistence", "persistence_location"):
            continue
        lines.append(" ".join(option).replace("/etc/mosquitto/vouchd/", f"{folder}/"))
    return lines


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    folder = tmp_path / "vouchd"
    folder.mkdir()
    shutil.copy(EXAMPLES / "vouchd.acl", folder / "vouchd.acl")
    return _write_pki(folder)


@pytest.fixture
def broker(pki: Pki, tmp_path: Path) -> Iterator[Mosquitto]:
    config = _example_config(pki.folder)
    assert "set_tcp_nodelay true" in config
    instance = start_broker(extra_config=config, folder=tmp_path)
    try:
        yield instance
    finally:
        instance.stop()


def _service(broker: Mosquitto, pki: Pki) -> MqttAuthorityService:
    return MqttAuthorityService(broker.host, broker.port, trust_domain=TD, tls=pki.tls("authority"))


def _link(broker: Mosquitto, pki: Pki, node: str, name: str) -> MqttAuthorityLink:
    return MqttAuthorityLink(broker.host, broker.port, trust_domain=TD, node_id=node, tls=pki.tls(name))


async def test_nodes_and_the_authority_do_their_part_over_mutual_tls(broker: Mosquitto, pki: Pki) -> None:
    authority = FakeAuthority()
    got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    async def record(topic: str, payload: bytes) -> None:
        await got.put((topic, payload))

    async with _service(broker, pki) as service:
        assert service.connected, service.broker
        await service.serve(authority.handle)
        await service.publish("revocations", b"document")
        link = _link(broker, pki, NODE_A, "node-a")
        link.subscribe("revocations", record)
        link.subscribe(node_events_topic(NODE_A), record)
        async with link:
            assert link.connected
            assert link.broker == f"mqtts://127.0.0.1:{broker.port}"
            request = nonce_request(NODE_A)
            assert await link.call(REQUEST_TOPIC, request, timeout=5) == answer_to(request)
            await service.publish(node_events_topic(NODE_A), b"entries changed")
            async with asyncio.timeout(5):
                assert {await got.get(), await got.get()} == {
                    ("revocations", b"document"), (node_events_topic(NODE_A), b"entries changed")}


async def test_a_node_cannot_read_another_nodes_replies(broker: Mosquitto, pki: Pki) -> None:
    async with _service(broker, pki) as service, \
            raw_client(broker, "b-spying", tls_context=pki.context("node-b")) as spy:
        await service.serve(FakeAuthority().handle)
        # mosquitto 2.0 grants any subscription; its ACL decides what it delivers.
        await spy.subscribe(f"{PREFIX}/nodes/{node_key(NODE_A)}/resp", qos=1)
        await spy.subscribe(f"{PREFIX}/#", qos=1)
        async with _link(broker, pki, NODE_A, "node-a") as link:
            await link.call(REQUEST_TOPIC, nonce_request(NODE_A), timeout=5)
        await no_message(spy)


async def test_a_node_in_the_authority_s_share_group_takes_nothing_when_the_group_is_secret(
        broker: Mosquitto, pki: Pki) -> None:
    """mosquitto 2.0 lets a node join any shared subscription, hands it its share of the requests,
    and then drops them for want of read access: requests are lost. A share group name nodes do not
    know (the server's configuration) keeps every request with the replicas."""
    secret = "authority-5f0c9e1d"
    async with MqttAuthorityService(broker.host, broker.port, trust_domain=TD, tls=pki.tls("authority"),
                                    share_group=secret) as service, \
            raw_client(broker, "b-posing", tls_context=pki.context("node-b")) as impostor:
        await service.serve(FakeAuthority().handle)
        for group in ("authority", "vouchd", "authority-replicas"):
            await impostor.subscribe(f"$share/{group}/{PREFIX}/authority/request", qos=1)
        async with _link(broker, pki, NODE_A, "node-a") as link:
            for _ in range(10):
                request = nonce_request(NODE_A)
                assert await link.call(REQUEST_TOPIC, request, timeout=2) == answer_to(request)
        assert service.stats().answered == 10
        await no_message(impostor)


async def test_a_node_writes_neither_retained_documents_nor_another_nodes_topics(broker: Mosquitto, pki: Pki) -> None:
    got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

    async def record(topic: str, payload: bytes) -> None:
        await got.put((topic, payload))

    async with raw_client(broker, "b-forging", tls_context=pki.context("node-b")) as forger:
        await forger.publish(f"{PREFIX}/revocations", b"forged document", qos=1, retain=True)
        await forger.publish(f"{PREFIX}/bundle", b"forged bundle", qos=1, retain=True)
        link = _link(broker, pki, NODE_A, "node-a")
        link.subscribe("revocations", record)
        link.subscribe("bundle", record)
        link.subscribe(node_events_topic(NODE_A), record)
        async with link:
            forged_reply = publish_properties(correlation=b"c" * 16, expiry_seconds=5)
            await forger.publish(f"{PREFIX}/nodes/{node_key(NODE_A)}/resp", b"forged reply", qos=1,
                                 properties=forged_reply)
            await forger.publish(f"{PREFIX}/nodes/{node_key(NODE_A)}/events", b"forged event", qos=1)
            await asyncio.sleep(0.3)
            assert got.empty()
            assert link.status().connected


async def test_a_node_reads_and_writes_its_own_topics(broker: Mosquitto, pki: Pki) -> None:
    async with raw_client(broker, "b-self", tls_context=pki.context("node-b")) as node_b:
        own = f"{PREFIX}/nodes/{node_key(NODE_B)}/status"
        granted = await node_b.subscribe(own, qos=1)
        assert [getattr(code, "value", code) for code in granted] == [1]
        await node_b.publish(own, b"online", qos=1)
        assert (await next_message(node_b)).payload == b"online"


async def test_a_certificate_without_a_common_name_gets_nowhere(broker: Mosquitto, pki: Pki) -> None:
    """An X.509-SVID has no commonName: mosquitto takes no username from it and refuses it. Node SVIDs
    must carry their node key as CN for this configuration to admit them."""
    with pytest.raises(aiomqtt.MqttError):
        async with raw_client(broker, "nameless", tls_context=pki.context("no-common-name"), timeout=1):
            pass


async def test_a_client_without_a_certificate_is_refused(broker: Mosquitto, pki: Pki) -> None:
    with pytest.raises(aiomqtt.MqttError):
        # Refused in the TLS handshake; aiomqtt reports it when no CONNACK comes.
        async with raw_client(broker, "anonymous", tls_context=pki.context(None), timeout=1):
            pass


async def test_a_link_without_its_certificate_stays_down_and_says_so(broker: Mosquitto, pki: Pki) -> None:
    link = MqttAuthorityLink(broker.host, broker.port, trust_domain=TD, node_id=NODE_A,
                             tls=BrokerTls(ca_file=pki.ca), connect_wait=0.5)
    async with link:
        assert not link.connected
        with pytest.raises(TransportError, match=f"not connected to the MQTT broker mqtts://127.0.0.1:{broker.port}"):
            await link.call(REQUEST_TOPIC, nonce_request(NODE_A), timeout=2)

