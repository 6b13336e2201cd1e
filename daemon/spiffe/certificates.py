"""Small X.509 facts every part of vouchd asks about certificates and keys, answered once."""

from __future__ import annotations

from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes

__all__ = ["is_ca_certificate", "serial_hex", "spki_der", "utc_time"]


def spki_der(key: CertificatePublicKeyTypes) -> bytes:
    """The DER SubjectPublicKeyInfo: how two keys are compared, whatever object holds them."""
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def is_ca_certificate(certificate: x509.Certificate) -> bool:
    """BasicConstraints says CA (a certificate without the extension is not one)."""
    try:
        return bool(certificate.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        return False


def serial_hex(certificate: x509.Certificate) -> str:
    """The serial number as openssl and most tools print it: hex, whole bytes (leading zero kept)."""
    digits = f"{certificate.serial_number:x}"
    return digits.zfill(len(digits) + len(digits) % 2)


def utc_time(now: datetime | None) -> datetime:
    """`now` in UTC, or the current time; a naive time is refused (against the wrong zone, validity
    checks fail open or shut)."""
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(UTC)
