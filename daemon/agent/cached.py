"""An X.509-SVID in the agent's cache, and how one the authority issued becomes one.

The workload's key is made here, on the node; the authority saw only a CSR. What comes back must
be a certificate for that very key, or it is refused.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

from vouchd.entries import Entry
from vouchd.protocol.messages import CredentialResponse, IssuedX509Svid, X509SvidRequest
from vouchd.spiffe import CLOCK_SKEW, SpiffeError, load_der_certificates, make_csr, serial_hex

__all__ = ["CachedSvid", "IssuanceRound", "cache_issued"]

# An entry -> the latest expiry its SVIDs may have (None: no bound), or why none may be asked for.
ExpiryCap = Callable[[Entry], tuple[float | None, str | None]]


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


@dataclass
class IssuanceRound:
    """One batch of CSRs: the keys made for them (they never leave the node), and what was not asked."""

    keys: dict[str, ec.EllipticCurvePrivateKey] = field(default_factory=dict)
    requests: list[X509SvidRequest] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)    # entry id -> why it has no SVID now

    @classmethod
    def prepare(cls, entry_ids: Sequence[str], entries: Mapping[str, Entry], cap: ExpiryCap) -> IssuanceRound:
        """A key and a CSR for each entry still assigned to the node and not held back by `cap`."""
        batch = cls()
        for entry_id in entry_ids:
            entry = entries.get(entry_id)
            if entry is None:
                batch.failed[entry_id] = "entry is no longer assigned to this node"
                continue
            not_after, refusal = cap(entry)
            if refusal is not None:
                batch.failed[entry_id] = refusal
                continue
            key = ec.generate_private_key(ec.SECP256R1())
            batch.keys[entry_id] = key
            batch.requests.append(X509SvidRequest(entry_id=entry_id, csr=make_csr(key), not_after=int(not_after or 0)))
        return batch

    def take(self, response: CredentialResponse, entries: Mapping[str, Entry], now: float) -> dict[str, CachedSvid]:
        """The SVIDs of the reply that certify this round's keys, for entries still assigned; every
        request without one gets its reason in `failed`."""
        for item in response.errors:
            self.failed[item.entry_id] = f"{item.code}: {item.message}"
        taken: dict[str, CachedSvid] = {}
        for issued in response.x509_svids:
            key = self.keys.get(issued.entry_id)
            entry = entries.get(issued.entry_id)
            if key is None or entry is None:
                continue
            try:
                taken[issued.entry_id] = cache_issued(issued, key, entry_revision=entry.revision, now=now)
            except (SpiffeError, ValueError) as err:
                self.failed[issued.entry_id] = str(err)
        for request in self.requests:
            if request.entry_id not in taken:
                self.failed.setdefault(request.entry_id, "authority did not issue an SVID")
        return taken
