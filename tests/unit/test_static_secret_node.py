"""The static-secret tier end to end in software: a node key on disk, a real authority on a real
store, and hostile messages. Nothing here needs a TPM, which is the point of the tier.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID

from tests.fakes import FakeClock
from tests.unit.test_authority_server import RecordingBus, reply_of, start
from tests.unit.test_authority_server import config as authority_config
from vouchd.agent.node import NodeIdentity
from vouchd.agent.provers import KeyProver, NodeAttestationError, load_or_create_node_key
from vouchd.audit import AnchorQuote, KeyAnchorSigner, node_key_checker
from vouchd.authority.build import open_authority
from vouchd.authority.server import Authority
from vouchd.config import AuthorityConfig
from vouchd.decisions import Decision, DecisionBus, DecisionKind
from vouchd.entries import Entry
from vouchd.evidence import VerificationError
from vouchd.policy import PolicyEngine
from vouchd.protocol.codec import encode
from vouchd.protocol.errors import RemoteError
from vouchd.protocol.keyproof import (
    CHALLENGE_CONTEXT,
    REQUEST_CONTEXT,
    node_key_hash,
    node_key_spki,
    sign_with_node_key,
)
from vouchd.protocol.messages import (
    AttestResult,
    CredentialResponse,
    ErrorReply,
    JwtSvidRequest,
    KeyAttestRequest,
    KeyChallenge,
    KeyChallengeResponse,
    QuotedRequest,
    RequestBody,
    SignedRequest,
    TpmEvidence,
    X509SvidRequest,
)
from vouchd.protocol.transport import ATTEST_TOPIC, REQUEST_TOPIC, LocalTransport
from vouchd.selectors import Selector, selector_set
from vouchd.spiffe import SpiffeId, TrustDomain, TrustTier, read_tier

pytestmark = pytest.mark.timeout(20)

TRUST_DOMAIN = TrustDomain("example.org")


def entry(name: str, tier: TrustTier, key_hash: str, labels: tuple[tuple[str, str], ...] = ()) -> Entry:
    return Entry(id=name, spiffe_id=SpiffeId.parse(f"spiffe://example.org/{name}"),
                 selectors=selector_set(["unix:uid:1000"]), min_tier=tier, labels=labels,
                 node_selectors=frozenset({Selector("node", "key_hash", key_hash)}), jwt_ttl=timedelta(seconds=60))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())  # certificate checks of the reply signer read the system clock


@pytest.fixture
def key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


@pytest.fixture
async def authority(tmp_path: Path, clock: FakeClock, key: ec.EllipticCurvePrivateKey) -> AsyncIterator[Authority]:
    instance = await start(tmp_path / "authority", clock=clock, standalone=True)
    key_hash = node_key_hash(node_key_spki(key.public_key()))
    await instance.registry.import_entries([entry("static", TrustTier.STATIC_SECRET, key_hash),
                                            entry("hardware-only", TrustTier.HARDWARE, key_hash)])
    yield instance
    await instance.close()


def node_for(authority: Authority, key: ec.EllipticCurvePrivateKey, clock: FakeClock) -> NodeIdentity:
    return NodeIdentity(prover=KeyProver(key, trust_domain=TRUST_DOMAIN), transport=LocalTransport(authority.handle),
                        trust_domain=TRUST_DOMAIN, initial_bundle=authority.bundle, clock=clock)


def _csr(workload_key: ec.EllipticCurvePrivateKey) -> bytes:
    from cryptography.hazmat.primitives import hashes

    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "w")]))
            .sign(workload_key, hashes.SHA256()).public_bytes(Encoding.DER))


async def call(authority: Authority, topic: str, message: object) -> object:
    return reply_of(await authority.handle(topic, encode(message)))


# -- the happy path ---------------------------------------------------------------------------------


async def test_an_enrolled_node_key_attests_at_the_static_secret_tier_and_gets_only_its_tiers_entries(
        authority: Authority, key: ec.EllipticCurvePrivateKey, clock: FakeClock) -> None:
    node_id = await authority.enrol_node_key(node_key_spki(key.public_key()), "test")
    node = node_for(authority, key, clock)
    assert node.node_id == node_id

    await node.attest()
    response = await node.request(sync_entries=True, x509_svids=[X509SvidRequest("static", _csr(
        ec.generate_private_key(ec.SECP256R1())))], jwt_svids=[JwtSvidRequest("static", ("aud",))])

    status = node.status
    assert status is not None and status.tier == "static-secret"
    assert set(status.selectors) == {f"node:key_hash:{node_id.rsplit('/', 1)[1]}", "node:tier:static-secret"}
    assert [e.id for e in response.entries or ()] == ["static"], "min_tier hardware never reaches the node"
    leaf = x509.load_der_x509_certificate(response.x509_svids[0].cert_chain)
    assert read_tier(leaf) is TrustTier.STATIC_SECRET
    claims = jwt.decode(response.jwt_svids[0].token, options={"verify_signature": False})
    assert claims["vouchd_tier"] == "static-secret"
    record = await authority.store.node(node_id)
    assert record is not None and record.tier == "static-secret" and record.ek_hash.startswith("key:")
    assert not await authority.store.is_enrolled(node_key_hash(node_key_spki(key.public_key()))), \
        "a software key is never taken for an enrolled EK"


async def test_a_static_secret_node_is_refused_an_entry_that_requires_hardware(
        authority: Authority, key: ec.EllipticCurvePrivateKey, clock: FakeClock) -> None:
    await authority.enrol_node_key(node_key_spki(key.public_key()), "test")
    node = node_for(authority, key, clock)
    await node.attest()

    response = await node.request(jwt_svids=[JwtSvidRequest("hardware-only", ("aud",))])

    assert response.jwt_svids == ()
    assert [error.entry_id for error in response.errors] == ["hardware-only"]


# -- hostile attestation ----------------------------------------------------------------------------


async def test_a_key_nobody_enrolled_is_refused(authority: Authority, key: ec.EllipticCurvePrivateKey,
                                                clock: FakeClock) -> None:
    with pytest.raises(RemoteError) as refused:
        await node_for(authority, key, clock).attest()
    assert refused.value.code == "not_enrolled"


async def test_a_node_id_that_another_key_derives_is_refused(authority: Authority,
                                                             key: ec.EllipticCurvePrivateKey) -> None:
    node_id = await authority.enrol_node_key(node_key_spki(key.public_key()), "test")
    intruder = ec.generate_private_key(ec.SECP256R1())

    reply = await call(authority, ATTEST_TOPIC, KeyAttestRequest(node_id, node_key_spki(intruder.public_key())))

    assert isinstance(reply, ErrorReply) and reply.code == "bad_request"


@pytest.mark.parametrize("forgery", ["other key", "request context", "other node's nonce binding"])
async def test_a_challenge_answered_without_the_enrolled_key_is_refused(
        authority: Authority, key: ec.EllipticCurvePrivateKey, forgery: str) -> None:
    spki = node_key_spki(key.public_key())
    node_id = await authority.enrol_node_key(spki, "test")
    challenge = await call(authority, ATTEST_TOPIC, KeyAttestRequest(node_id, spki))
    assert isinstance(challenge, KeyChallenge)
    signed = challenge.nonce + node_id.encode()
    signature = {
        "other key": sign_with_node_key(ec.generate_private_key(ec.SECP256R1()), CHALLENGE_CONTEXT, signed),
        "request context": sign_with_node_key(key, REQUEST_CONTEXT, signed),
        "other node's nonce binding": sign_with_node_key(key, CHALLENGE_CONTEXT, challenge.nonce + b"x"),
    }[forgery]

    reply = await call(authority, ATTEST_TOPIC, KeyChallengeResponse(node_id, challenge.nonce, signature))

    assert isinstance(reply, ErrorReply) and reply.code == "bad_evidence"
    assert await authority.store.node(node_id) is None


async def test_a_challenge_answer_is_single_use(authority: Authority, key: ec.EllipticCurvePrivateKey) -> None:
    spki = node_key_spki(key.public_key())
    node_id = await authority.enrol_node_key(spki, "test")
    challenge = await call(authority, ATTEST_TOPIC, KeyAttestRequest(node_id, spki))
    assert isinstance(challenge, KeyChallenge)
    answer = KeyChallengeResponse(node_id, challenge.nonce,
                                  sign_with_node_key(key, CHALLENGE_CONTEXT, challenge.nonce + node_id.encode()))

    assert isinstance(await call(authority, ATTEST_TOPIC, answer), AttestResult)
    replayed = await call(authority, ATTEST_TOPIC, answer)
    assert isinstance(replayed, ErrorReply) and replayed.code == "session_expired"


async def test_a_banned_static_secret_node_cannot_attest(authority: Authority, key: ec.EllipticCurvePrivateKey,
                                                         clock: FakeClock) -> None:
    node_id = await authority.enrol_node_key(node_key_spki(key.public_key()), "test")
    await authority.store.ban_node(node_id, "test", now=clock.now())

    with pytest.raises(RemoteError) as refused:
        await node_for(authority, key, clock).attest()
    assert refused.value.code == "banned"


# -- hostile requests --------------------------------------------------------------------------------


async def attested_nonce(authority: Authority, key: ec.EllipticCurvePrivateKey) -> tuple[str, bytes]:
    spki = node_key_spki(key.public_key())
    node_id = await authority.enrol_node_key(spki, "test")
    challenge = await call(authority, ATTEST_TOPIC, KeyAttestRequest(node_id, spki))
    assert isinstance(challenge, KeyChallenge)
    result = await call(authority, ATTEST_TOPIC, KeyChallengeResponse(
        node_id, challenge.nonce, sign_with_node_key(key, CHALLENGE_CONTEXT, challenge.nonce + node_id.encode())))
    assert isinstance(result, AttestResult)
    return node_id, result.nonce


@pytest.mark.parametrize("forgery", ["other key", "challenge context", "other body"])
async def test_a_request_not_signed_by_the_node_key_is_refused_and_keeps_the_nonce(
        authority: Authority, key: ec.EllipticCurvePrivateKey, clock: FakeClock, forgery: str) -> None:
    node_id, nonce = await attested_nonce(authority, key)
    body = encode(RequestBody(node_id=node_id, nonce=nonce, sent_at=int(clock.now()), sync_entries=True))
    signature = {
        "other key": sign_with_node_key(ec.generate_private_key(ec.SECP256R1()), REQUEST_CONTEXT, body),
        "challenge context": sign_with_node_key(key, CHALLENGE_CONTEXT, body),
        "other body": sign_with_node_key(key, REQUEST_CONTEXT, body + b" "),
    }[forgery]

    reply = await call(authority, REQUEST_TOPIC, SignedRequest(node_id, body, signature))

    assert isinstance(reply, ErrorReply) and reply.code == "bad_evidence"
    genuine = await call(authority, REQUEST_TOPIC,
                         SignedRequest(node_id, body, sign_with_node_key(key, REQUEST_CONTEXT, body)))
    assert not isinstance(genuine, ErrorReply), "the forged request did not spend the node's nonce"


async def test_a_static_secret_node_cannot_send_a_quoted_request(authority: Authority,
                                                                  key: ec.EllipticCurvePrivateKey,
                                                                  clock: FakeClock) -> None:
    node_id, nonce = await attested_nonce(authority, key)
    body = encode(RequestBody(node_id=node_id, nonce=nonce, sent_at=int(clock.now())))

    reply = await call(authority, REQUEST_TOPIC, QuotedRequest(node_id, body, TpmEvidence(b"", b"")))

    assert isinstance(reply, ErrorReply) and reply.code == "bad_request"


async def test_a_replayed_signed_request_issues_nothing_new(authority: Authority, key: ec.EllipticCurvePrivateKey,
                                                            clock: FakeClock) -> None:
    node_id, nonce = await attested_nonce(authority, key)
    body = encode(RequestBody(node_id=node_id, nonce=nonce, sent_at=int(clock.now()),
                              jwt_svids=(JwtSvidRequest("static", ("aud",)),)))
    request = encode(SignedRequest(node_id, body, sign_with_node_key(key, REQUEST_CONTEXT, body)))

    first = await authority.handle(REQUEST_TOPIC, request)
    assert await authority.handle(REQUEST_TOPIC, request) == first, "a redelivery gets the very same reply"


# -- the key file -----------------------------------------------------------------------------------


def test_the_node_key_is_made_once_root_only_and_then_reused(tmp_path: Path) -> None:
    first = load_or_create_node_key(tmp_path / "node")
    again = load_or_create_node_key(tmp_path / "node")

    assert node_key_spki(first.public_key()) == node_key_spki(again.public_key())
    assert stat.S_IMODE((tmp_path / "node" / "node-key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "node").stat().st_mode) == 0o700


@pytest.mark.parametrize(("content", "mode", "message"), [
    (b"not a key", 0o600, "not a PEM private key"),
    (None, 0o644, "accessible to group or others"),
])
def test_a_node_key_file_that_cannot_be_used_is_named_and_never_replaced(
        tmp_path: Path, content: bytes | None, mode: int, message: str) -> None:
    load_or_create_node_key(tmp_path / "node")
    path = tmp_path / "node" / "node-key.pem"
    if content is not None:
        path.write_bytes(content)
    os.chmod(path, mode)
    before = path.read_bytes()

    with pytest.raises(NodeAttestationError, match=message) as refused:
        load_or_create_node_key(tmp_path / "node")

    assert str(path) in str(refused.value)
    assert path.read_bytes() == before, "the file is left for the operator"
    assert b"PRIVATE KEY-----\n" not in str(refused.value).encode(), "no key material in the message"


# -- audit anchors ----------------------------------------------------------------------------------


async def test_an_audit_anchor_of_the_node_key_verifies_and_a_forged_one_does_not(
        key: ec.EllipticCurvePrivateKey) -> None:
    head = os.urandom(32)
    anchor = await KeyAnchorSigner(key).quote(head)
    check = node_key_checker(node_key_spki(key.public_key()))

    check(anchor, head)
    with pytest.raises(VerificationError, match="does not sign the chain head"):
        check(anchor, os.urandom(32))
    other = await KeyAnchorSigner(ec.generate_private_key(ec.SECP256R1())).quote(head)
    with pytest.raises(VerificationError, match="signature invalid"):
        check(other, head)
    with pytest.raises(VerificationError, match="signature invalid"):  # a request signature is no anchor
        check(AnchorQuote(head, sign_with_node_key(key, REQUEST_CONTEXT, head), anchor.pcrs), head)
    with pytest.raises(VerificationError, match="TPM quote"):
        check(AnchorQuote(head, anchor.signature, "sha256:0,1,2"), head)


# -- the authority's own policy evaluation ----------------------------------------------------------


@pytest.fixture
async def judging_authority(tmp_path: Path, clock: FakeClock,
                            key: ec.EllipticCurvePrivateKey) -> AsyncIterator[tuple[Authority, DecisionBus]]:
    """An authority with the default policy set: what a lying agent asks for directly is judged here."""
    decisions = DecisionBus()
    engine = PolicyEngine.load([], audiences={"low-aud": "low", "high-aud": "high"}, clock=clock)
    values = {**vars(authority_config(tmp_path / "authority"))}
    instance = await open_authority(AuthorityConfig(**values), TRUST_DOMAIN,  # type: ignore[arg-type]
                                    publisher=RecordingBus(), decisions=decisions, clock=clock, standalone=True,
                                    policy=engine)
    key_hash = node_key_hash(node_key_spki(key.public_key()))
    await instance.registry.import_entries([
        entry("static", TrustTier.STATIC_SECRET, key_hash),
        replace(entry("long-jwt", TrustTier.STATIC_SECRET, key_hash), jwt_ttl=timedelta(minutes=5)),
        entry("x509-allowed", TrustTier.STATIC_SECRET, key_hash, labels=(("vouchd/static-secret-x509", "allow"),)),
    ])
    yield instance, decisions
    await instance.close()


async def signed_request(authority: Authority, key: ec.EllipticCurvePrivateKey, clock: FakeClock,
                         **items: object) -> CredentialResponse:
    node_id, nonce = await attested_nonce(authority, key)
    body = encode(RequestBody(node_id=node_id, nonce=nonce, sent_at=int(clock.now()), **items))  # type: ignore[arg-type]
    reply = await call(authority, REQUEST_TOPIC, SignedRequest(node_id, body, sign_with_node_key(key, REQUEST_CONTEXT,
                                                                                                   body)))
    assert isinstance(reply, CredentialResponse), reply
    return reply


@pytest.mark.parametrize(("items", "policy_id"), [
    ({"jwt_svids": (JwtSvidRequest("static", ("high-aud",)),)}, "vouchd.static-secret-jwt-audience"),
    ({"jwt_svids": (JwtSvidRequest("static", ("low-aud", "unlisted-aud")),)}, "vouchd.static-secret-jwt-audience"),
    ({"jwt_svids": (JwtSvidRequest("long-jwt", ("low-aud",)),)}, "vouchd.static-secret-jwt-ttl"),
    ({"x509_svids": (X509SvidRequest("static", _csr(ec.generate_private_key(ec.SECP256R1()))),)},
     "vouchd.static-secret-x509"),
], ids=["high-risk audience", "one audience not low-risk", "jwt ttl over 60 s", "x509 without the label"])
async def test_the_authority_refuses_by_policy_what_an_agent_asks_for_directly(
        judging_authority: tuple[Authority, DecisionBus], key: ec.EllipticCurvePrivateKey, clock: FakeClock,
        items: dict[str, object], policy_id: str) -> None:
    authority, decisions = judging_authority
    seen: list[Decision] = []
    decisions.subscribe(seen.append)

    response = await signed_request(authority, key, clock, **items)

    assert response.jwt_svids == () and response.x509_svids == ()
    (error,) = response.errors
    assert error.code == "policy" and f"denied by policy {policy_id}" in error.message
    denial = next(d for d in seen if d.kind is DecisionKind.DENY)
    assert denial.source == "authority" and ("policy_ids", policy_id) in denial.details


async def test_the_authority_signs_what_the_policy_permits_and_records_the_deciding_policies(
        judging_authority: tuple[Authority, DecisionBus], key: ec.EllipticCurvePrivateKey, clock: FakeClock) -> None:
    authority, decisions = judging_authority
    seen: list[Decision] = []
    decisions.subscribe(seen.append)

    response = await signed_request(
        authority, key, clock, jwt_svids=(JwtSvidRequest("static", ("low-aud",)),),
        x509_svids=(X509SvidRequest("x509-allowed", _csr(ec.generate_private_key(ec.SECP256R1()))),))

    assert response.errors == ()
    assert [s.entry_id for s in response.jwt_svids] == ["static"]
    assert [s.entry_id for s in response.x509_svids] == ["x509-allowed"]
    issued = [d for d in seen if d.kind is DecisionKind.ISSUE]
    assert len(issued) == 2
    assert all(("policy_ids", "vouchd.permit-trusted-node") in d.details for d in issued)
