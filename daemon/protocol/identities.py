"""The SPIFFE IDs vouchd gives itself, derived the same way on both ends of the protocol."""

from __future__ import annotations

import hashlib

from vouchd.evidence import TpmPublic
from vouchd.spiffe import SpiffeId, TrustDomain

__all__ = ["authority_spiffe_id", "ek_hash", "key_node_spiffe_id", "node_spiffe_id"]


def ek_hash(ek: TpmPublic) -> str:
    """A node's stable identifier (DESIGN §3): sha256 hex of the EK's DER SubjectPublicKeyInfo."""
    return hashlib.sha256(ek.spki_der()).hexdigest()


def node_spiffe_id(trust_domain: TrustDomain, ek_hash_hex: str) -> SpiffeId:
    """spiffe://<td>/vouchd/node/tpm/<EK hash>: the hardware-tier node identity."""
    return trust_domain.spiffe_id(f"/vouchd/node/tpm/{ek_hash_hex}")


def key_node_spiffe_id(trust_domain: TrustDomain, key_hash_hex: str) -> SpiffeId:
    """spiffe://<td>/vouchd/node/key/<node key hash>: the static-secret node identity (no TPM)."""
    return trust_domain.spiffe_id(f"/vouchd/node/key/{key_hash_hex}")


def authority_spiffe_id(trust_domain: TrustDomain) -> SpiffeId:
    """The identity of the key that signs every authority reply."""
    return trust_domain.spiffe_id("/vouchd/authority")
