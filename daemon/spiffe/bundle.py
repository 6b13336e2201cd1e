"""X.509 trust bundles: the CA certificates that are authoritative for one trust domain."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from vouchd.spiffe.certificates import is_ca_certificate
from vouchd.spiffe.errors import InvalidBundleError
from vouchd.spiffe.ids import TrustDomain

__all__ = ["X509Bundle", "load_der_certificates"]

# A bundle holds a handful of roots; this bound keeps a hostile input from costing much to parse.
_MAX_BUNDLE_BYTES = 1 << 20
_DER_SEQUENCE_TAG = 0x30


@dataclass(frozen=True, slots=True)
class X509Bundle:
    """The X.509 authorities of `trust_domain`, in the order they are published (active first)."""

    trust_domain: TrustDomain
    authorities: tuple[x509.Certificate, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.authorities, tuple):
            raise InvalidBundleError("x509 bundle authorities must be a tuple")
        for index, cert in enumerate(self.authorities):
            if not isinstance(cert, x509.Certificate):
                raise InvalidBundleError(f"x509 bundle authority {index} is not a certificate")
            if not is_ca_certificate(cert):
                raise InvalidBundleError(
                    f"x509 bundle for {self.trust_domain}: authority {index} is not a ca certificate"
                )

    def der(self) -> bytes:
        """Concatenated DER certificates: the form of the Workload API's `bundle` fields."""
        return b"".join(cert.public_bytes(serialization.Encoding.DER) for cert in self.authorities)

    def pem(self) -> bytes:
        return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in self.authorities)

    @classmethod
    def from_pem(cls, td: TrustDomain, data: bytes) -> X509Bundle:
        _check_size(f"x509 bundle for {td}", data)
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError as err:
            raise InvalidBundleError(f"x509 bundle for {td}: not a sequence of pem certificates") from err
        return cls(td, tuple(certs))

    @classmethod
    def from_der(cls, td: TrustDomain, data: bytes) -> X509Bundle:
        return cls(td, tuple(load_der_certificates(data, f"x509 bundle for {td}")))


def load_der_certificates(data: bytes, what: str = "certificate chain") -> list[x509.Certificate]:
    """Concatenated DER certificates (the Workload API's and the protocol's chain form), in order.

    InvalidBundleError, naming `what`, when the data is empty, oversized or not DER certificates.
    """
    _check_size(what, data)
    certs: list[x509.Certificate] = []
    for index, blob in enumerate(_split_der(what, data)):
        try:
            certs.append(x509.load_der_x509_certificate(blob))
        except ValueError as err:
            raise InvalidBundleError(f"{what}: certificate {index} is not valid der") from err
    return certs


def _check_size(what: str, data: bytes) -> None:
    if not data:
        raise InvalidBundleError(f"{what}: no certificates")
    if len(data) > _MAX_BUNDLE_BYTES:
        raise InvalidBundleError(f"{what}: larger than {_MAX_BUNDLE_BYTES} bytes")


def _split_der(what: str, data: bytes) -> Iterator[bytes]:
    """Cuts concatenated DER certificates apart by reading each outer SEQUENCE header."""
    offset = 0
    while offset < len(data):
        length = _der_element_length(data, offset)
        if length is None or offset + length > len(data):
            raise InvalidBundleError(f"{what}: truncated or malformed der at byte {offset}")
        yield data[offset : offset + length]
        offset += length


def _der_element_length(data: bytes, offset: int) -> int | None:
    """Total length (header included) of the DER SEQUENCE at `offset`, or None if malformed."""
    if offset + 2 > len(data) or data[offset] != _DER_SEQUENCE_TAG:
        return None
    first = data[offset + 1]
    if first < 0x80:
        return 2 + first
    count = first & 0x7F
    # DER forbids the indefinite form (0x80); four length bytes already exceed any sane certificate.
    if count == 0 or count > 4 or offset + 2 + count > len(data):
        return None
    content = int.from_bytes(data[offset + 2 : offset + 2 + count], "big")
    return 2 + count + content
