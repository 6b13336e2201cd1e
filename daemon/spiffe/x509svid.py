"""X.509-SVIDs: minting leaves, checking them as a SPIFFE relying party does, and CSRs.

Follows spiffe/spiffe standards/X509-SVID.md and DESIGN §3: exactly one URI SAN, CA false, key
usage digitalSignature only (critical), EKU serverAuth + clientAuth, EC P-256 keys, plus vouchd's
trust tier in the subject (see vouchd.spiffe.tier for why not in an extension).
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from vouchd.spiffe.bundle import X509Bundle
from vouchd.spiffe.certificates import spki_der, utc_time
from vouchd.spiffe.errors import InvalidSpiffeIdError, InvalidSvidError
from vouchd.spiffe.ids import SpiffeId
from vouchd.spiffe.tier import TIER_SUBJECT_PREFIX, TrustTier

__all__ = [
    "CLOCK_SKEW",
    "check_dns_name",
    "csr_public_key",
    "make_csr",
    "mint_x509_svid",
    "validate_x509_svid_leaf",
    "verify_x509_svid",
]

# Backdating notBefore lets a relying party whose clock runs a little behind accept a fresh SVID.
CLOCK_SKEW = timedelta(seconds=30)

_SVID_ORGANIZATION = "vouchd"
# A CSR is a few hundred bytes; the bound keeps parsing cost of hostile input small.
_MAX_CSR_BYTES = 16 * 1024
_CSR_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
# A wildcard is allowed only as the whole leftmost label, as RFC 6125 relying parties expect.
_DNS_NAME = re.compile(rf"(?:\*\.)?(?:{_DNS_LABEL}\.)*{_DNS_LABEL}")
_MAX_DNS_NAME = 253


def _is_p256(key: object) -> bool:
    return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1)


def _svid_subject(tier: TrustTier) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _SVID_ORGANIZATION),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"{TIER_SUBJECT_PREFIX}{tier.value}"),
        ]
    )


def _random_serial() -> int:
    # Uniform over [1, 2**128 - 1]: positive and unpredictable, as RFC 5280 and CA/B practice want.
    return 1 + secrets.randbelow((1 << 128) - 1)


def check_dns_name(name: str) -> None:
    """InvalidSvidError unless `name` can be a DNS SAN (a wildcard only as the leftmost label)."""
    if not name or len(name) > _MAX_DNS_NAME or not _DNS_NAME.fullmatch(name):
        raise InvalidSvidError(f"dns name {name[:80]!r} is not a valid dns name")


def _authority_key_identifier(ca_cert: x509.Certificate) -> x509.AuthorityKeyIdentifier:
    # The AKI must equal the issuer's SKI byte for byte, whatever method the issuer used to make it.
    try:
        ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        public_key = ca_cert.public_key()
        if not isinstance(public_key, ec.EllipticCurvePublicKey):
            raise InvalidSvidError("ca certificate key is not an ec key") from None
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(public_key)
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def mint_x509_svid(
    *,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    public_key: ec.EllipticCurvePublicKey,
    spiffe_id: SpiffeId,
    ttl: timedelta,
    tier: TrustTier,
    dns_names: Sequence[str] = (),
    now: datetime | None = None,
) -> x509.Certificate:
    """Signs an X.509-SVID leaf for `public_key` naming `spiffe_id`, directly under `ca_cert`.

    The leaf never outlives the CA: notAfter is min(now + ttl, the CA's notAfter).
    """
    now = utc_time(now)
    if not _is_p256(public_key):
        raise InvalidSvidError("svid public key must be an ec p-256 key")
    if not spiffe_id.path:
        raise InvalidSvidError(f"svid spiffe id {spiffe_id} has no path: a leaf must name a workload")
    if ttl <= timedelta(0):
        raise InvalidSvidError("svid ttl must be positive")
    if isinstance(dns_names, str):
        raise InvalidSvidError("dns names must be a sequence of names, not one string")
    for name in dns_names:
        check_dns_name(name)
    if spki_der(ca_key.public_key()) != spki_der(ca_cert.public_key()):
        raise InvalidSvidError("ca key does not match the ca certificate")
    ca_not_after = ca_cert.not_valid_after_utc
    if ca_not_after <= now:
        raise InvalidSvidError("ca certificate has expired")

    not_before = max(now - CLOCK_SKEW, ca_cert.not_valid_before_utc)
    not_after = min(now + ttl, ca_not_after)
    subject_alt_names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(str(spiffe_id))]
    subject_alt_names.extend(x509.DNSName(name) for name in dns_names)

    builder = (
        x509.CertificateBuilder()
        .subject_name(_svid_subject(tier))
        .issuer_name(ca_cert.subject)
        .public_key(public_key)
        .serial_number(_random_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        # Non-critical: the subject is not empty (RFC 5280 4.2.1.6).
        .add_extension(x509.SubjectAlternativeName(subject_alt_names), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_authority_key_identifier(ca_cert), critical=False)
    )
    return builder.sign(ca_key, hashes.SHA256())


def validate_x509_svid_leaf(cert: x509.Certificate) -> SpiffeId:
    """The checks a SPIFFE relying party makes on a leaf; returns the leaf's SPIFFE ID.

    Signature, issuer and validity period are verify_x509_svid's job, not this function's.
    """
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise InvalidSvidError("leaf has no subject alternative name extension") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise InvalidSvidError(f"leaf has {len(uris)} uri sans, an x509-svid has exactly one")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except InvalidSpiffeIdError as err:
        raise InvalidSvidError(f"leaf uri san is not a spiffe id: {err}") from err
    if not spiffe_id.path:
        raise InvalidSvidError(f"leaf spiffe id {spiffe_id} has no path")

    try:
        constraints = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise InvalidSvidError("leaf has no basic constraints extension") from None
    if constraints.ca:
        raise InvalidSvidError("leaf is a ca certificate")

    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        raise InvalidSvidError("leaf has no key usage extension") from None
    if not usage.digital_signature:
        raise InvalidSvidError("leaf key usage lacks digitalSignature")
    if usage.key_cert_sign:
        raise InvalidSvidError("leaf key usage has keyCertSign")
    if usage.crl_sign:
        raise InvalidSvidError("leaf key usage has cRLSign")
    return spiffe_id


def verify_x509_svid(chain: Sequence[x509.Certificate], bundle: X509Bundle, *, now: datetime | None = None) -> SpiffeId:
    """Validates the leaf `chain[0]` and its RFC 5280 path (through `chain[1:]`) to a root of `bundle`.

    Returns the leaf's SPIFFE ID, which is always a member of the bundle's trust domain. Path
    validation is cryptography's client verifier (Web PKI profile), so beyond the SPIFFE rules a
    leaf also needs an AuthorityKeyIdentifier and, when it has an EKU, clientAuth in it.
    """
    now = utc_time(now)
    if not chain:
        raise InvalidSvidError("x509-svid chain is empty")
    leaf = chain[0]
    spiffe_id = validate_x509_svid_leaf(leaf)
    if not spiffe_id.is_member_of(bundle.trust_domain):
        raise InvalidSvidError(f"leaf spiffe id {spiffe_id} is not in trust domain {bundle.trust_domain}")
    if not bundle.authorities:
        raise InvalidSvidError(f"x509 bundle for {bundle.trust_domain} holds no authorities")
    verifier = (
        PolicyBuilder().store(Store(list(bundle.authorities))).time(now.replace(tzinfo=None)).build_client_verifier()
    )
    try:
        verifier.verify(leaf, list(chain[1:]))
    except VerificationError as err:
        raise InvalidSvidError(
            f"x509-svid {spiffe_id} does not chain to the bundle of {bundle.trust_domain}: {err}"
        ) from err
    return spiffe_id


def csr_public_key(csr_der: bytes) -> ec.EllipticCurvePublicKey:
    """The EC P-256 key of a PKCS#10 CSR whose self-signature proves possession of its private key.

    The CSR's subject and extensions are ignored by design: the authority chooses the identity.
    """
    if len(csr_der) > _MAX_CSR_BYTES:
        raise InvalidSvidError(f"csr larger than {_MAX_CSR_BYTES} bytes")
    try:
        csr = x509.load_der_x509_csr(csr_der)
    except x509.InvalidVersion:
        raise InvalidSvidError("csr has a version other than v1 (0)") from None
    except ValueError as err:
        raise InvalidSvidError("csr is not a der pkcs#10 request") from err
    try:
        public_key = csr.public_key()
        hash_algorithm = csr.signature_hash_algorithm
        signature_valid = csr.is_signature_valid
    except (ValueError, UnsupportedAlgorithm, InvalidSignature) as err:
        raise InvalidSvidError("csr uses an unsupported key or signature algorithm") from err
    if not isinstance(public_key, ec.EllipticCurvePublicKey) or not _is_p256(public_key):
        raise InvalidSvidError("csr key must be an ec p-256 key")
    if not isinstance(hash_algorithm, _CSR_HASHES):
        raise InvalidSvidError("csr signature must use sha-256, sha-384 or sha-512")
    if not signature_valid:
        raise InvalidSvidError("csr signature does not verify: no proof of possession of the key")
    return public_key


def make_csr(private_key: ec.EllipticCurvePrivateKey) -> bytes:
    """A minimal DER CSR (empty subject, no extensions) proving possession of `private_key`."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    csr = builder.sign(private_key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.DER)
