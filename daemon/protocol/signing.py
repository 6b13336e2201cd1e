"""Signed authority replies (DESIGN §4: there is no insecure bootstrap).

Every authority -> agent message is a SignedReply: an ECDSA signature by the authority's key, whose
certificate (SPIFFE ID ``spiffe://<td>/vouchd/authority``) chains to the trust bundle the agent was
configured with, over a payload that names the node and the sha256 of the request it answers. An
agent drops anything else, so neither the broker nor another node can answer in the authority's name.

What the authority publishes to every agent (the revocation document, node events) is signed the
same way over a PublicationPayload that names the topic; its freshness is the document's own
business (a version and a next_update), not the reply age limit.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Callable, Sequence

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from vouchd.clock import SYSTEM_CLOCK, Clock
from vouchd.protocol.codec import decode, decode_as, encode
from vouchd.protocol.errors import RemoteError, SignatureError
from vouchd.protocol.identities import authority_spiffe_id
from vouchd.protocol.messages import ErrorReply, PublicationPayload, ReplyPayload, SignedReply
from vouchd.spiffe import SpiffeError, TrustDomain, X509Bundle, load_der_certificates, verify_x509_svid

__all__ = ["ReplySigner", "ReplyVerifier", "request_digest"]

_SIGNATURE = ec.ECDSA(hashes.SHA256())
# Replies answer a request sent moments before; this bounds how long a captured one stays usable
# (and tolerates that much clock difference between agent and authority).
REPLY_MAX_AGE = 300


def request_digest(request: bytes) -> str:
    return hashlib.sha256(request).hexdigest()


class ReplySigner:
    """The authority side: wraps replies for one node and one request."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, chain: Sequence[x509.Certificate],
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self._key = key
        self._chain = b"".join(c.public_bytes(Encoding.DER) for c in chain)
        self._clock = clock

    def sign(self, reply: object, *, node_id: str, request: bytes) -> bytes:
        payload = encode(ReplyPayload(node_id=node_id, in_reply_to=request_digest(request),
                                      issued_at=int(self._clock.now()), reply=encode(reply)))
        return self._signed(payload)

    def publish(self, body: object, *, topic: str) -> bytes:
        """A signed publication of `body` on `topic`, for every agent."""
        return self._signed(encode(PublicationPayload(topic=topic, issued_at=int(self._clock.now()),
                                                      body=encode(body))))

    def _signed(self, payload: bytes) -> bytes:
        signature = self._key.sign(payload, _SIGNATURE)
        return encode(SignedReply(payload=payload, signature=signature, signer_chain=self._chain))


class ReplyVerifier:
    """The agent side: accepts a reply only from the authority, for this node, to this request."""

    def __init__(self, trust_domain: TrustDomain, bundle: Callable[[], X509Bundle],
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self._authority_id = authority_spiffe_id(trust_domain)
        self._bundle = bundle
        self._clock = clock

    def open(self, data: bytes, *, node_id: str, request: bytes) -> object:
        """Verify and decode; an ErrorReply is raised as RemoteError."""
        payload = decode_as(ReplyPayload, self._verified_payload(data))
        if abs(payload.issued_at - self._clock.now()) > REPLY_MAX_AGE:
            raise SignatureError("reply is not fresh: its issue time is too far from this host's clock")
        if payload.node_id != node_id:
            raise SignatureError("reply is addressed to another node")
        if not hmac.compare_digest(payload.in_reply_to, request_digest(request)):
            raise SignatureError("reply answers another request")
        reply = decode(payload.reply)
        if isinstance(reply, ErrorReply):
            raise RemoteError(reply.code, reply.message)
        return reply

    def open_publication(self, data: bytes, *, topic: str) -> object:
        """Verify and decode what the authority published on `topic`."""
        payload = decode_as(PublicationPayload, self._verified_payload(data))
        if payload.topic != topic:
            raise SignatureError(f"publication for {payload.topic[:80]!r} arrived on {topic!r}")
        return decode(payload.body)

    def _verified_payload(self, data: bytes) -> bytes:
        """The payload bytes, once the signature and the signer's chain to the bundle are checked."""
        signed = decode_as(SignedReply, data)
        try:
            chain = load_der_certificates(signed.signer_chain, "reply signer chain")
        except SpiffeError as err:
            raise SignatureError(str(err)) from None
        try:
            signer = verify_x509_svid(chain, self._bundle())
        except SpiffeError as err:
            raise SignatureError(f"reply signer does not chain to the trust bundle: {err}") from None
        if signer != self._authority_id:
            raise SignatureError(f"reply signed by {signer}, not by {self._authority_id}")
        public_key = chain[0].public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise SignatureError("reply signer key is not an EC key")
        try:
            public_key.verify(signed.signature, signed.payload, _SIGNATURE)
        except InvalidSignature:
            raise SignatureError("reply signature does not verify") from None
        return signed.payload
