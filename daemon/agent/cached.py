"""An X.509-SVID in the agent's cache, and how one the authority issued becomes one.

The workload's key is made here, on the node; the authority saw only a CSR. What comes back must
be a certificate for that very key, or it is refused.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from vouchd.protocol.messages import IssuedX509Svid
from vouchd.spiffe import CLOCK_SKEW, load_der_certificates, serial_hex

__all__ = ["CachedSvid", "cache_issued"]


@dataclass(frozen=True)
class CachedSvid:
    entry_id: str
    entry_revision: int
    spiffe_id: str
    certificate: x509.Certificate
    chain_der: bytes
    private_key_der: bytes = field(repr=False)
    issued_at: float
    expires_at: float
    rotate_at: float

    @property
    def serial(self) -> str:
        return serial_hex(self.certificate)

    @property
    def signed_at(self) -> float:
        """When the authority signed it, by the authority's clock (it backdates not_before by CLOCK_SKEW)."""
        return self.certificate.not_valid_before_utc.timestamp() + CLOCK_SKEW.total_seconds()


def cache_issued(issued: IssuedX509Svid, key: ec.EllipticCurvePrivateKey, *, entry_revision: int,
                 now: float) -> CachedSvid:
    """The cache's form of an SVID the authority issued for `key`; SpiffeError if its chain does not
    parse, ValueError if it certifies another key. Rotation is due at half of its lifetime, ±10 %
    (a fleet started together must not rotate together)."""
    certificate = load_der_certificates(issued.cert_chain, "issued x509-svid")[0]
    if certificate.public_key() != key.public_key():
        raise ValueError("authority returned a certificate for another key")
    expires = certificate.not_valid_after_utc.timestamp()
    return CachedSvid(
        entry_id=issued.entry_id, entry_revision=entry_revision, spiffe_id=issued.spiffe_id,
        certificate=certificate, chain_der=issued.cert_chain,
        private_key_der=key.private_bytes(Encoding.DER, PrivateFormat.PKCS8, NoEncryption()),
        issued_at=now, expires_at=expires,
        rotate_at=now + (expires - now) / 2 * random.uniform(0.9, 1.1),  # noqa: S311 - jitter, not secrecy
    )
