"""The agent <-> authority protocol: canonical JSON, strict decoding, and signed authority replies."""

from __future__ import annotations

import base64
import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import given, settings
from hypothesis import strategies as st

from vouchd.authority.ca import CertificateAuthority
from vouchd.entries import Entry
from vouchd.errors import VouchdError
from vouchd.protocol import messages
from vouchd.protocol.codec import MAX_MESSAGE_BYTES, canonical_json, decode, decode_as, encode
from vouchd.protocol.errors import MessageError, ProtocolError, RemoteError, SignatureError
from vouchd.protocol.identities import authority_spiffe_id
from vouchd.protocol.messages import (
    AttestNonceRequest,
    AttestRequest,
    AttestResult,
    Challenge,
    ChallengeResponse,
    CredentialResponse,
    ErrorReply,
    IssuedJwtSvid,
    IssuedX509Svid,
    ItemError,
    JwtSvidRequest,
    KeyAttestRequest,
    KeyChallenge,
    KeyChallengeResponse,
    NodeEvent,
    NonceGrant,
    NonceRequest,
    PublicationPayload,
    QuotedRequest,
    ReplyPayload,
    RequestBody,
    RevocationDocument,
    RevokedEntry,
    RevokedNode,
    SignedReply,
    SignedRequest,
    TpmEvidence,
    X509SvidRequest,
)
from vouchd.protocol.signing import REPLY_MAX_AGE, ReplySigner, ReplyVerifier, request_digest
from vouchd.selectors import Selector
from vouchd.spiffe import SpiffeId, TrustDomain, TrustTier, X509Bundle

TD = TrustDomain("example.org")
NODE = "spiffe://example.org/vouchd/node/tpm/" + "ab" * 32
OTHER_NODE = "spiffe://example.org/vouchd/node/tpm/" + "cd" * 32
EVIDENCE = TpmEvidence(attest=b"\xff\x54\x43\x47attest", signature=b"\x00\x18sig")


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


# One of every message kind, with every optional field both filled and empty somewhere.
SAMPLES: dict[str, object] = {
    "attest_request": AttestRequest(
        node_id=NODE, ek_type="rsa2048", ek_public=b"\x01\x16ek", ek_certificate=b"\x30\x82cert",
        ak_public=b"\x00\x58ak", node_key_public=b"\x00\x58nk", node_key_certify=EVIDENCE,
        certify_nonce=bytes(range(32)), event_log=None,
    ),
    "challenge": Challenge(session="s-1", credential_blob=b"blob", encrypted_secret=b"\x00" * 256,
                           server_nonce=b"n" * 32, pcr_bank="sha256", pcr_indices=(0, 1, 2, 7)),
    "challenge_response": ChallengeResponse(node_id=NODE, session="s-1", quote=EVIDENCE),
    "attest_result": AttestResult(node_svid=b"\x30leaf", bundle=b"\x30root", selectors=("node:tier:hardware",),
                                  tier="hardware", nonce=b"\x01" * 16, nonce_expires_at=1_780_000_000),
    "nonce_request": NonceRequest(node_id=NODE, request_id=b"\x07" * 16),
    "nonce_grant": NonceGrant(nonce=b"\x02" * 16, expires_at=1_780_000_030, pcr_bank="sha256", pcr_indices=()),
    "request_body": RequestBody(node_id=NODE, nonce=b"\x03" * 16, sent_at=1_780_000_001,
                                x509_svids=(X509SvidRequest(entry_id="web", csr=b"\x30csr"),), sync_entries=True,
                                jwt_svids=(JwtSvidRequest(entry_id="web", audiences=("db",)),)),
    "quoted_request": QuotedRequest(node_id=NODE, body=b'{"kind":"request_body"}', quote=EVIDENCE),
    "credential_response": CredentialResponse(
        x509_svids=(IssuedX509Svid(entry_id="web", spiffe_id="spiffe://example.org/web", cert_chain=b"\x30c",
                                   expires_at=1_780_003_600),),
        errors=(ItemError(entry_id="db", code="not_authorized", message="entry is not assigned to this node"),),
        entries=(Entry(id="web", revision=3, spiffe_id=SpiffeId.parse("spiffe://example.org/web"),
                       selectors=frozenset({Selector("unix", "uid", "0")}), x509_ttl=timedelta(hours=1),
                       dns_names=("web.example.org",), hint="frontend", labels=(("team", "payments"),),
                       created_at=1_780_000_000, updated_at=1_780_000_100),),
        bundle=b"\x30root", nonce=b"\x04" * 16, nonce_expires_at=1_780_000_060, revocations=b"{}",
        jwt_svids=(IssuedJwtSvid(entry_id="web", spiffe_id="spiffe://example.org/web", audiences=("db", "cache"),
                                 token="eyJ.eyJ.sig", expires_at=1_780_000_300),),
        jwt_bundle=b'{"keys":[]}',
    ),
    "error": ErrorReply(code="reattest", message="node must attest again"),
    "reply_payload": ReplyPayload(node_id=NODE, in_reply_to="0" * 64, issued_at=1_780_000_000, reply=b"{}"),
    "signed_reply": SignedReply(payload=b"{}", signature=b"\x30\x45sig", signer_chain=b"\x30chain"),
    "publication_payload": PublicationPayload(topic="revocations", issued_at=1_780_000_000, body=b"{}"),
    "revocation_document": RevocationDocument(
        version=7, issued_at=1_780_000_000, next_update=1_780_000_600,
        entries=(RevokedEntry(entry_id="web", below_revision=4),),
        nodes=(RevokedNode(node_id=NODE, reason="stolen", before=1_780_000_000, banned=True),),
    ),
    "node_event": NodeEvent(node_id=NODE, event="entries_changed", issued_at=1_780_000_000),
    "attest_nonce_request": AttestNonceRequest(node_id=NODE, request_id=b"\x05" * 16),
    "key_attest_request": KeyAttestRequest(node_id=NODE, node_key_public=b"\x30\x59spki"),
    "key_challenge": KeyChallenge(nonce=b"\x07" * 32, expires_at=1_780_000_030),
    "key_challenge_response": KeyChallengeResponse(node_id=NODE, nonce=b"\x07" * 32, signature=b"\x30\x45sig"),
    "signed_request": SignedRequest(node_id=NODE, body=b"{}", signature=b"\x30\x45sig"),
}
# Types that only ever travel inside a message.
PARTS = {"TpmEvidence", "X509SvidRequest", "IssuedX509Svid", "ItemError", "RevokedEntry", "RevokedNode",
         "JwtSvidRequest", "IssuedJwtSvid"}


def wire(msg: object) -> dict[str, object]:
    body = json.loads(encode(msg))
    assert isinstance(body, dict)
    return body


def tampered(msg: object, **changes: object) -> bytes:
    """The canonical encoding of `msg` with top-level JSON fields replaced (None deletes)."""
    body = wire(msg)
    for key, value in changes.items():
        if value is None:
            del body[key]
        else:
            body[key] = value
    return canonical_json(body)


# --- canonical encoding -------------------------------------------------------------------------


def test_encoding_is_sorted_compact_json_with_kind_and_version() -> None:
    assert encode(NonceRequest(node_id="spiffe://example.org/n", request_id=b"\x00\x01")) == (
        b'{"kind":"nonce_request","node_id":"spiffe://example.org/n","request_id":"AAE=","v":1}'
    )


def test_nested_values_are_sorted_too_and_bytes_are_standard_base64() -> None:
    msg = ChallengeResponse(node_id="n", session="s", quote=TpmEvidence(attest=b"\xfb\xff", signature=b"\x00"))

    assert encode(msg) == (
        b'{"kind":"challenge_response","node_id":"n","quote":{"attest":"+/8=","signature":"AA=="},'
        b'"session":"s","v":1}'
    )


def test_text_is_utf8_not_escaped() -> None:
    expected = '{"code":"x","kind":"error","message":"caf\u00e9","v":1}'.encode()

    assert encode(ErrorReply(code="x", message="caf\u00e9")) == expected


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_the_same_message_always_has_the_same_bytes(kind: str) -> None:
    msg = SAMPLES[kind]
    data = encode(msg)

    assert encode(decode(data)) == data
    # Sorted keys, no whitespace between tokens, UTF-8: what any canonical JSON writer would produce.
    assert data == json.dumps(json.loads(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@pytest.mark.parametrize("kind", sorted(SAMPLES))
def test_every_kind_round_trips(kind: str) -> None:
    msg = SAMPLES[kind]

    assert wire(msg)["kind"] == kind
    assert decode(encode(msg)) == msg
    assert decode_as(type(msg), encode(msg)) == msg


def test_the_samples_cover_every_message_in_the_module() -> None:
    sampled = {type(m).__name__ for m in SAMPLES.values()}

    constants = {name for name in messages.__all__ if name.isupper()}
    assert set(messages.__all__) - constants == sampled | PARTS


def test_optional_fields_round_trip_empty() -> None:
    request = AttestRequest(node_id=NODE, ek_type="ecc-p256", ek_public=b"e", ek_certificate=None, ak_public=b"a",
                            node_key_public=b"k", node_key_certify=EVIDENCE, certify_nonce=b"", event_log=None)
    response = CredentialResponse(x509_svids=(), errors=(), entries=None, bundle=b"", nonce=b"n", nonce_expires_at=0)

    assert decode(encode(request)) == request
    assert decode(encode(response)) == response
    assert wire(response)["entries"] is None


def test_fields_with_defaults_may_be_left_out() -> None:
    body = {"kind": "request_body", "v": 1, "node_id": NODE, "nonce": "AAAA", "sent_at": 5}

    assert decode(canonical_json(body)) == RequestBody(node_id=NODE, nonce=b"\x00\x00\x00", sent_at=5)


@settings(max_examples=50, deadline=None)
@given(
    node_id=st.text(max_size=40),
    nonce=st.binary(max_size=64),
    sent_at=st.integers(min_value=0, max_value=2**63 - 1),
    csrs=st.lists(st.tuples(st.text(max_size=20), st.binary(max_size=64)), max_size=4),
    sync=st.booleans(),
)
def test_request_bodies_round_trip_byte_for_byte(
    node_id: str, nonce: bytes, sent_at: int, csrs: list[tuple[str, bytes]], sync: bool
) -> None:
    body = RequestBody(node_id=node_id, nonce=nonce, sent_at=sent_at,
                       x509_svids=tuple(X509SvidRequest(entry_id=e, csr=c) for e, c in csrs), sync_entries=sync)
    data = encode(body)

    assert decode(data) == body
    assert encode(decode(data)) == data


def test_encoding_an_oversize_message_is_refused() -> None:
    huge = RequestBody(node_id=NODE, nonce=b"n", sent_at=0,
                       x509_svids=(X509SvidRequest(entry_id="big", csr=b"\x00" * (MAX_MESSAGE_BYTES * 3 // 4)),))

    with pytest.raises(MessageError, match=rf"^request_body message is \d+ bytes, over the {MAX_MESSAGE_BYTES} limit$"):
        encode(huge)


def test_encoding_something_that_is_not_a_message_is_a_programming_error() -> None:
    @dataclass(frozen=True)
    class NotRegistered:
        x: int

    with pytest.raises(TypeError, match="NotRegistered is not a registered message"):
        encode(NotRegistered(1))
    with pytest.raises(TypeError):
        encode(EVIDENCE)  # a part, not a message


# --- strict decoding ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"not json", "message is not JSON"),
        (b"\xff\xfe{}", "message is not JSON"),
        (b"", "message is not JSON"),
        (b"[1, 2]", "message is not a JSON object"),
        (b'"nonce_request"', "message is not a JSON object"),
        (b'{"v":1,"node_id":"n"}', "unknown message kind 'None'"),
        (b'{"kind":"launch_missiles","v":1}', "unknown message kind 'launch_missiles'"),
        (b'{"kind":["nonce_request"],"v":1}', "unknown message kind \"['nonce_request']\""),
        (b'{"kind":"nonce_request","node_id":"n"}', "nonce_request: unsupported protocol version 'None'"),
        (b'{"kind":"nonce_request","v":2,"node_id":"n"}', "nonce_request: unsupported protocol version '2'"),
        (b'{"kind":"nonce_request","v":"1","node_id":"n"}', "nonce_request: unsupported protocol version '1'"),
    ],
)
def test_envelope_problems_are_refused(data: bytes, message: str) -> None:
    with pytest.raises(MessageError, match=exactly(message)):
        decode(data)


@pytest.mark.parametrize(
    ("kind", "changes", "message"),
    [
        ("nonce_request", {"admin": True}, "nonce_request: unknown field 'admin'"),
        ("nonce_request", {"node_id": None}, "nonce_request: missing field 'node_id'"),
        ("nonce_request", {"node_id": 7}, "nonce_request.node_id: expected a string"),
        ("request_body", {"sent_at": "now"}, "request_body.sent_at: expected an integer"),
        ("request_body", {"sent_at": True}, "request_body.sent_at: expected an integer"),
        ("request_body", {"sent_at": 1.5}, "request_body.sent_at: expected an integer"),
        ("request_body", {"sync_entries": 1}, "request_body.sync_entries: expected true or false"),
        ("request_body", {"nonce": 12}, "request_body.nonce: expected base64 text"),
        ("request_body", {"nonce": "not*base64"}, "request_body.nonce: invalid base64"),
        ("request_body", {"nonce": "AAA"}, "request_body.nonce: invalid base64"),
        ("request_body", {"nonce": "AA\nAA=="}, "request_body.nonce: invalid base64"),
        ("request_body", {"nonce": "-_-_"}, "request_body.nonce: invalid base64"),
        ("request_body", {"x509_svids": {"entry_id": "web"}}, "request_body.x509_svids: expected a list"),
        ("request_body", {"x509_svids": ["web"]}, "request_body.x509_svids[0]: expected an object"),
        ("request_body", {"x509_svids": [{"entry_id": "web"}]}, "request_body.x509_svids[0]: missing field 'csr'"),
        ("request_body", {"x509_svids": [{"entry_id": "web", "csr": "", "dns": []}]},
         "request_body.x509_svids[0]: unknown field 'dns'"),
        ("request_body", {"x509_svids": [{"entry_id": "web", "csr": "!"}]},
         "request_body.x509_svids[0].csr: invalid base64"),
        ("challenge", {"pcr_indices": [0, "1"]}, "challenge.pcr_indices[1]: expected an integer"),
        ("challenge_response", {"quote": "AAAA"}, "challenge_response.quote: expected an object"),
        ("challenge_response", {"quote": {"attest": "AAAA"}}, "challenge_response.quote: missing field 'signature'"),
        ("attest_request", {"ek_certificate": None}, "attest_request: missing field 'ek_certificate'"),
        ("attest_request", {"event_log": 5}, "attest_request.event_log: expected base64 text"),
        ("credential_response", {"entries": [{"id": "web"}]},
         "credential_response.entries[0]: spiffe_id: is missing"),
    ],
)
def test_field_problems_are_refused_naming_the_field(kind: str, changes: dict[str, object], message: str) -> None:
    with pytest.raises(MessageError, match=exactly(message)):
        decode(tampered(SAMPLES[kind], **changes))


def test_an_optional_field_may_be_null_but_not_missing() -> None:
    body = wire(SAMPLES["attest_request"])
    body["ek_certificate"] = None

    decoded = decode(canonical_json(body))

    assert isinstance(decoded, AttestRequest)
    assert decoded.ek_certificate is None


def test_oversize_input_is_refused_before_parsing() -> None:
    data = b" " * (MAX_MESSAGE_BYTES + 1)

    with pytest.raises(MessageError, match=exactly(f"message is {MAX_MESSAGE_BYTES + 1} bytes, over the "
                                                   f"{MAX_MESSAGE_BYTES} limit")):
        decode(data)


def test_decode_as_refuses_another_kind() -> None:
    with pytest.raises(MessageError, match=exactly("expected a nonce_request message, got challenge")):
        decode_as(NonceRequest, encode(SAMPLES["challenge"]))


def test_message_errors_are_protocol_and_vouchd_errors() -> None:
    assert issubclass(MessageError, ProtocolError)
    assert issubclass(ProtocolError, VouchdError)


# --- signed replies -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Authority:
    ca: CertificateAuthority
    key: ec.EllipticCurvePrivateKey
    certificate: x509.Certificate

    def signer(self) -> ReplySigner:
        return ReplySigner(self.key, [self.certificate])


def svid_for(ca: CertificateAuthority, spiffe_id: SpiffeId, *, ttl: timedelta = timedelta(hours=1),
             now: datetime | None = None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.sign_x509_svid(key.public_key(), spiffe_id, ttl=ttl, tier=TrustTier.HARDWARE, now=now)
    return key, cert


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    ca = CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca"), TD)
    key, cert = svid_for(ca, authority_spiffe_id(TD))
    return Authority(ca, key, cert)


@pytest.fixture(scope="module")
def stranger(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    """Another CA of the same trust domain name: not in the agent's bundle."""
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("other-ca"), TD)


def verifier_for(authority: Authority) -> ReplyVerifier:
    return ReplyVerifier(TD, authority.ca.bundle)


REQUEST = encode(NonceRequest(node_id=NODE, request_id=b"\x08" * 16))
GRANT = NonceGrant(nonce=b"\x05" * 32, expires_at=1_780_000_030, pcr_bank="sha256", pcr_indices=(0, 1, 2, 3))


def test_the_authority_id_is_fixed_per_trust_domain() -> None:
    assert str(authority_spiffe_id(TD)) == "spiffe://example.org/vouchd/authority"
    assert request_digest(b"abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"


def test_a_reply_from_the_authority_for_this_node_and_request_opens(authority: Authority) -> None:
    data = authority.signer().sign(GRANT, node_id=NODE, request=REQUEST)

    assert verifier_for(authority).open(data, node_id=NODE, request=REQUEST) == GRANT


def test_the_signed_payload_names_node_request_and_reply(authority: Authority) -> None:
    signed = decode_as(SignedReply, authority.signer().sign(GRANT, node_id=NODE, request=REQUEST))
    payload = decode_as(ReplyPayload, signed.payload)

    assert payload.node_id == NODE
    assert payload.in_reply_to == request_digest(REQUEST)
    assert decode(payload.reply) == GRANT
    assert x509.load_der_x509_certificate(signed.signer_chain) == authority.certificate


def test_an_error_reply_is_raised_with_its_code(authority: Authority) -> None:
    data = authority.signer().sign(ErrorReply(code="nonce", message="nonce expired"), node_id=NODE, request=REQUEST)

    with pytest.raises(RemoteError, match=exactly("authority refused the request (nonce): nonce expired")) as caught:
        verifier_for(authority).open(data, node_id=NODE, request=REQUEST)
    assert caught.value.code == "nonce"
    assert caught.value.reason == "nonce expired"


def test_a_signer_from_another_ca_is_refused(authority: Authority, stranger: CertificateAuthority) -> None:
    key, cert = svid_for(stranger, authority_spiffe_id(TD))
    data = ReplySigner(key, [cert]).sign(GRANT, node_id=NODE, request=REQUEST)

    with pytest.raises(SignatureError, match=r"^reply signer does not chain to the trust bundle: "):
        verifier_for(authority).open(data, node_id=NODE, request=REQUEST)


def test_a_signer_from_another_trust_domain_is_refused(authority: Authority, tmp_path: Path) -> None:
    other_td = TrustDomain("other.org")
    other = CertificateAuthority.load_or_create(tmp_path, other_td)
    key, cert = svid_for(other, authority_spiffe_id(other_td))
    data = ReplySigner(key, [cert]).sign(GRANT, node_id=NODE, request=REQUEST)

    with pytest.raises(SignatureError, match=r"^reply signer does not chain to the trust bundle: "):
        verifier_for(authority).open(data, node_id=NODE, request=REQUEST)


def test_a_workload_svid_of_the_same_ca_cannot_sign_replies(authority: Authority) -> None:
    key, cert = svid_for(authority.ca, TD.spiffe_id("/workload/web"))
    data = ReplySigner(key, [cert]).sign(GRANT, node_id=NODE, request=REQUEST)

    with pytest.raises(SignatureError, match=exactly("reply signed by spiffe://example.org/workload/web, "
                                                     "not by spiffe://example.org/vouchd/authority")):
        verifier_for(authority).open(data, node_id=NODE, request=REQUEST)


def test_a_node_svid_of_the_same_ca_cannot_sign_replies(authority: Authority) -> None:
    key, cert = svid_for(authority.ca, SpiffeId.parse(OTHER_NODE))
    data = ReplySigner(key, [cert]).sign(GRANT, node_id=NODE, request=REQUEST)

    with pytest.raises(SignatureError, match=r"^reply signed by spiffe://example.org/vouchd/node/tpm/cdcd"):
        verifier_for(authority).open(data, node_id=NODE, request=REQUEST)


def test_an_expired_authority_certificate_is_refused(tmp_path: Path) -> None:
    long_ago = datetime.now(UTC) - timedelta(hours=3)
    ca = CertificateAuthority.load_or_create(tmp_path, TD, now=long_ago)
    key, cert = svid_for(ca, authority_spiffe_id(TD), now=long_ago)
    data = ReplySigner(key, [cert]).sign(GRANT, node_id=NODE, request=REQUEST)

    with pytest.raises(SignatureError, match=r"^reply signer does not chain to the trust bundle: "):
        ReplyVerifier(TD, ca.bundle).open(data, node_id=NODE, request=REQUEST)


def test_a_signature_by_another_key_is_refused(authority: Authority) -> None:
    impostor = ec.generate_private_key(ec.SECP256R1())
    data = ReplySigner(impostor, [authority.certificate]).sign(GRANT, node_id=NODE, request=REQUEST)

    with pytest.raises(SignatureError, match=exactly("reply signature does not verify")):
        verifier_for(authority).open(data, node_id=NODE, request=REQUEST)


def resigned(data: bytes, **fields: object) -> bytes:
    """`data` (a SignedReply) with fields swapped, keeping its signature."""
    signed = decode_as(SignedReply, data)
    body = wire(signed)
    for key, value in fields.items():
        body[key] = base64.b64encode(value).decode() if isinstance(value, bytes) else value
    return canonical_json(body)


def test_a_signature_over_other_bytes_is_refused(authority: Authority) -> None:
    signer = authority.signer()
    genuine = signer.sign(GRANT, node_id=NODE, request=REQUEST)
    forged_payload = encode(ReplyPayload(node_id=NODE, in_reply_to=request_digest(REQUEST), issued_at=0,
                                         reply=encode(ErrorReply(code="banned", message="node is banned"))))

    with pytest.raises(SignatureError, match=exactly("reply signature does not verify")):
        verifier_for(authority).open(resigned(genuine, payload=forged_payload), node_id=NODE, request=REQUEST)


def test_a_signature_lifted_from_another_reply_is_refused(authority: Authority) -> None:
    signer = authority.signer()
    first = decode_as(SignedReply, signer.sign(GRANT, node_id=NODE, request=REQUEST))
    second = signer.sign(ErrorReply(code="x", message="y"), node_id=NODE, request=REQUEST)

    with pytest.raises(SignatureError, match=exactly("reply signature does not verify")):
        verifier_for(authority).open(resigned(second, signature=first.signature), node_id=NODE, request=REQUEST)


def test_a_reply_for_another_node_is_refused(authority: Authority) -> None:
    data = authority.signer().sign(GRANT, node_id=OTHER_NODE, request=REQUEST)

    with pytest.raises(SignatureError, match=exactly("reply is addressed to another node")):
        verifier_for(authority).open(data, node_id=NODE, request=REQUEST)


def test_a_reply_to_another_request_is_refused(authority: Authority) -> None:
    another = encode(RequestBody(node_id=NODE, nonce=b"\x06" * 16, sent_at=1_780_000_000))
    data = authority.signer().sign(GRANT, node_id=NODE, request=another)

    with pytest.raises(SignatureError, match=exactly("reply answers another request")):
        verifier_for(authority).open(data, node_id=NODE, request=REQUEST)


def signed_at(authority: Authority, issued_at: int, reply: object = GRANT) -> bytes:
    """A genuine authority signature over a payload issued at `issued_at` (ReplySigner uses the clock)."""
    payload = encode(ReplyPayload(node_id=NODE, in_reply_to=request_digest(REQUEST), issued_at=issued_at,
                                  reply=encode(reply)))
    return encode(SignedReply(payload=payload, signature=authority.key.sign(payload, ec.ECDSA(hashes.SHA256())),
                              signer_chain=authority.certificate.public_bytes(Encoding.DER)))


@pytest.mark.parametrize("age", [-(REPLY_MAX_AGE - 10), REPLY_MAX_AGE - 10])
def test_a_reply_within_the_clock_tolerance_opens(authority: Authority, age: int) -> None:
    data = signed_at(authority, int(time.time()) - age)

    assert verifier_for(authority).open(data, node_id=NODE, request=REQUEST) == GRANT


@pytest.mark.parametrize("age", [REPLY_MAX_AGE + 10, -(REPLY_MAX_AGE + 10), 10**9])
def test_a_reply_issued_too_far_from_now_is_refused(authority: Authority, age: int) -> None:
    data = signed_at(authority, int(time.time()) - age)

    with pytest.raises(SignatureError, match=exactly("reply is not fresh: its issue time is too far from "
                                                     "this host's clock")):
        verifier_for(authority).open(data, node_id=NODE, request=REQUEST)


def test_a_stale_error_reply_is_refused_not_raised_as_remote(authority: Authority) -> None:
    data = signed_at(authority, int(time.time()) - 10 * REPLY_MAX_AGE, ErrorReply(code="banned", message="no"))

    with pytest.raises(SignatureError):
        verifier_for(authority).open(data, node_id=NODE, request=REQUEST)


def test_an_error_reply_for_another_node_is_dropped_not_raised_as_remote(authority: Authority) -> None:
    data = authority.signer().sign(ErrorReply(code="banned", message="no"), node_id=OTHER_NODE, request=REQUEST)

    with pytest.raises(SignatureError):
        verifier_for(authority).open(data, node_id=NODE, request=REQUEST)


@pytest.mark.parametrize(
    ("chain", "message"),
    [
        (b"", "reply signer chain: no certificates"),
        (b"\x04\x03abc", "reply signer chain: truncated or malformed der at byte 0"),
        (b"\x30\x80", "reply signer chain: truncated or malformed der at byte 0"),
        (b"\x30\x82\x05\x00" + b"\x00" * 10, "reply signer chain: truncated or malformed der at byte 0"),
        (b"\x30\x03abc", "reply signer chain: certificate 0 is not valid der"),
    ],
)
def test_a_malformed_signer_chain_is_refused(authority: Authority, chain: bytes, message: str) -> None:
    data = resigned(authority.signer().sign(GRANT, node_id=NODE, request=REQUEST), signer_chain=chain)

    with pytest.raises(SignatureError, match=exactly(message)):
        verifier_for(authority).open(data, node_id=NODE, request=REQUEST)


def test_something_that_is_not_a_signed_reply_is_refused(authority: Authority) -> None:
    with pytest.raises(MessageError, match=exactly("expected a signed_reply message, got nonce_grant")):
        verifier_for(authority).open(encode(GRANT), node_id=NODE, request=REQUEST)


def test_the_bundle_is_read_at_every_open(authority: Authority, stranger: CertificateAuthority) -> None:
    """A rotated bundle applies to the next reply, without a new verifier."""
    current: list[Callable[[], X509Bundle]] = [authority.ca.bundle]

    def bundle() -> X509Bundle:
        return current[0]()

    verifier = ReplyVerifier(TD, bundle)
    data = authority.signer().sign(GRANT, node_id=NODE, request=REQUEST)
    assert verifier.open(data, node_id=NODE, request=REQUEST) == GRANT

    current[0] = stranger.bundle

    with pytest.raises(SignatureError):
        verifier.open(data, node_id=NODE, request=REQUEST)


# --- publications -------------------------------------------------------------------------------

DOCUMENT = SAMPLES["revocation_document"]


def test_a_publication_opens_on_its_own_topic(authority: Authority) -> None:
    data = authority.signer().publish(DOCUMENT, topic="revocations")

    assert verifier_for(authority).open_publication(data, topic="revocations") == DOCUMENT


def test_a_publication_replayed_on_another_topic_is_refused(authority: Authority) -> None:
    data = authority.signer().publish(DOCUMENT, topic=f"nodes/{OTHER_NODE}/events")

    with pytest.raises(SignatureError, match="arrived on 'revocations'"):
        verifier_for(authority).open_publication(data, topic="revocations")


def test_a_publication_signed_by_another_ca_is_refused(authority: Authority, stranger: CertificateAuthority) -> None:
    key, cert = svid_for(stranger, authority_spiffe_id(TD))
    data = ReplySigner(key, [cert]).publish(DOCUMENT, topic="revocations")

    with pytest.raises(SignatureError, match="does not chain to the trust bundle"):
        verifier_for(authority).open_publication(data, topic="revocations")


def test_a_reply_is_not_a_publication_nor_a_publication_a_reply(authority: Authority) -> None:
    reply = authority.signer().sign(GRANT, node_id=NODE, request=REQUEST)
    publication = authority.signer().publish(DOCUMENT, topic="revocations")

    with pytest.raises(MessageError):
        verifier_for(authority).open_publication(reply, topic="revocations")
    with pytest.raises(MessageError):
        verifier_for(authority).open(publication, node_id=NODE, request=REQUEST)


def test_an_entry_in_a_message_is_checked_like_any_entry() -> None:
    body = wire(SAMPLES["credential_response"])
    entries = body["entries"]
    assert isinstance(entries, list)
    entries[0]["selectors"] = ["unix:path:/bin/sh"]  # no kernel-anchored selector

    with pytest.raises(MessageError, match=r"^credential_response\.entries\[0\]: selectors: needs at least one"):
        decode(canonical_json(body))


def test_every_refusal_code_is_documented() -> None:
    from pathlib import Path

    from vouchd.protocol.refusals import Refusal

    text = (Path(__file__).resolve().parents[2] / "docs" / "protocol.md").read_text()
    assert [code.value for code in Refusal if f"| `{code.value}` |" not in text] == []
