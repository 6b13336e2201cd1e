"""What a static-secret node's software key signs, and how the authority checks it.

A node without a TPM proves itself with an ECDSA P-256 key kept on disk (the static-secret tier,
docs/design.md §4.5). The same key signs three kinds of things, so every signature covers a context
string first: a signature made for one purpose can never be presented for another (an audit anchor
as a request, a challenge answer as an anchor).
"""

from __future__ import annotations

import hashlib

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_der_public_key

from vouchd.protocol.errors import MessageError, SignatureError

__all__ = [
    "ANCHOR_CONTEXT",
    "CHALLENGE_CONTEXT",
    "NODE_KEY_FILE",
    "NODE_KEY_PUBLIC_FILE",
    "REQUEST_CONTEXT",
    "load_node_key_public",
    "node_key_hash",
    "node_key_spki",
    "sign_with_node_key",
    "verify_node_key_signature",
]

NODE_KEY_FILE = "node-key.pem"              # in the agent's <state_dir>/node, 0600
NODE_KEY_PUBLIC_FILE = "node-key.pub.pem"   # its public half, for `vouchd audit verify`

CHALLENGE_CONTEXT = b"vouchd node key attestation v1\x00"
REQUEST_CONTEXT = b"vouchd node key request v1\x00"
ANCHOR_CONTEXT = b"vouchd audit anchor v1\x00"

_SIGNATURE = ec.ECDSA(hashes.SHA256())
_MAX_SPKI_BYTES = 256   # a P-256 SubjectPublicKeyInfo is 91 bytes


def node_key_spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def node_key_hash(spki_der: bytes) -> str:
    """A static-secret node's stable identifier: sha256 hex of its node key's DER SubjectPublicKeyInfo."""
    return hashlib.sha256(spki_der).hexdigest()


def load_node_key_public(spki_der: bytes) -> ec.EllipticCurvePublicKey:
    """The node key in `spki_der`; MessageError unless it is an ECDSA P-256 public key."""
    if len(spki_der) > _MAX_SPKI_BYTES:
        raise MessageError(f"node key is {len(spki_der)} bytes, a P-256 public key is 91")
    try:
        key = load_der_public_key(spki_der)
    except (ValueError, UnsupportedAlgorithm):
        raise MessageError("node key is not a DER SubjectPublicKeyInfo") from None
    if not isinstance(key, ec.EllipticCurvePublicKey) or not isinstance(key.curve, ec.SECP256R1):
        raise MessageError("node key is not an ECDSA P-256 key")
    return key


def sign_with_node_key(key: ec.EllipticCurvePrivateKey, context: bytes, data: bytes) -> bytes:
    return key.sign(context + data, _SIGNATURE)


def verify_node_key_signature(spki_der: bytes, context: bytes, data: bytes, signature: bytes) -> None:
    """SignatureError unless `signature` is the node key's over `context` + `data`."""
    key = load_node_key_public(spki_der)
    try:
        key.verify(signature, context + data, _SIGNATURE)
    except InvalidSignature:
        raise SignatureError("signature is not the node key's") from None
