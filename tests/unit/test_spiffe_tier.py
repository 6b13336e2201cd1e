"""The trust tier extension and claim: a fixed OID under the X.667 UUID arc, a DER UTF8String value."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vouchd.spiffe import (
    JWT_TIER_CLAIM,
    TIER_EXTENSION_OID,
    TIER_EXTENSION_UUID,
    InvalidSvidError,
    TrustTier,
    read_tier,
    tier_extension_value,
)

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def certificate_with(extension_value: bytes | None) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tier test")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(hours=1))
    )
    if extension_value is not None:
        builder = builder.add_extension(x509.UnrecognizedExtension(TIER_EXTENSION_OID, extension_value), critical=False)
    return builder.sign(key, hashes.SHA256())


def test_tier_names_are_the_documented_strings() -> None:
    assert [t.value for t in TrustTier] == ["hardware", "static-secret"]
    assert TrustTier("hardware") is TrustTier.HARDWARE
    assert JWT_TIER_CLAIM == "vouchd_tier"


def test_extension_oid_is_the_uuid_under_the_x667_arc() -> None:
    # Pinned: certificates already issued carry this OID, so it must never change.
    assert str(TIER_EXTENSION_UUID) == "79699034-abb9-4713-a384-12437aaaadf2"
    assert TIER_EXTENSION_OID.dotted_string == f"2.25.{TIER_EXTENSION_UUID.int}"


@pytest.mark.parametrize(
    ("tier", "der"),
    [
        (TrustTier.HARDWARE, b"\x0c\x08hardware"),
        (TrustTier.STATIC_SECRET, b"\x0c\x0dstatic-secret"),
    ],
)
def test_extension_value_is_a_der_utf8string_of_the_tier_name(tier: TrustTier, der: bytes) -> None:
    assert tier_extension_value(tier) == der
    assert read_tier(certificate_with(der)) is tier


def test_a_certificate_without_the_extension_has_no_tier() -> None:
    assert read_tier(certificate_with(None)) is None


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (b"\x04\x08hardware", "tier extension is not a der utf8string"),
        (b"\x0c\x09hardware", "tier extension is not a der utf8string"),
        (b"\x0c", "tier extension is not a der utf8string"),
        (b"\x0c\x04gold", "tier extension names an unknown tier"),
        (b"\x0c\x02\xff\xfe", "tier extension names an unknown tier"),
    ],
)
def test_a_malformed_tier_extension_is_an_error_not_a_missing_tier(value: bytes, message: str) -> None:
    with pytest.raises(InvalidSvidError, match=f"^{re.escape(message)}$"):
        read_tier(certificate_with(value))
