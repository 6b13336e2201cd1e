"""The trust tier in an X.509-SVID subject (`OU=vouchd-tier:<tier>`) and the JWT claim name."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vouchd.spiffe import JWT_TIER_CLAIM, TIER_SUBJECT_PREFIX, InvalidSvidError, TrustTier, read_tier

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def certificate_with(subject: Sequence[x509.NameAttribute[str]]) -> x509.Certificate:
    return certificate_named(x509.Name(subject))


def certificate_named(name: x509.Name) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "tier test")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(hours=1))
    )
    return builder.sign(key, hashes.SHA256())


def organization(value: str) -> x509.NameAttribute[str]:
    return x509.NameAttribute(NameOID.ORGANIZATION_NAME, value)


def unit(value: str) -> x509.NameAttribute[str]:
    return x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, value)


def test_tier_names_are_the_documented_strings() -> None:
    assert [t.value for t in TrustTier] == ["hardware", "static-secret"]
    assert TrustTier("hardware") is TrustTier.HARDWARE
    assert JWT_TIER_CLAIM == "vouchd_tier"


def test_subject_prefix_is_pinned() -> None:
    # Relying parties match on it and issued certificates carry it, so it must never change.
    assert TIER_SUBJECT_PREFIX == "vouchd-tier:"


@pytest.mark.parametrize(
    ("tier", "ou"),
    [
        (TrustTier.HARDWARE, "vouchd-tier:hardware"),
        (TrustTier.STATIC_SECRET, "vouchd-tier:static-secret"),
    ],
)
def test_the_tier_is_read_from_the_prefixed_organizational_unit(tier: TrustTier, ou: str) -> None:
    assert read_tier(certificate_with([organization("vouchd"), unit(ou)])) is tier


def test_other_organizational_units_are_ignored() -> None:
    subject = [organization("vouchd"), unit("platform team"), unit("vouchd-tier:hardware"), unit("hardware")]

    assert read_tier(certificate_with(subject)) is TrustTier.HARDWARE


def test_the_tier_is_found_in_a_multi_valued_rdn() -> None:
    rdn = x509.RelativeDistinguishedName([organization("vouchd"), unit("vouchd-tier:static-secret")])

    assert read_tier(certificate_named(x509.Name([rdn]))) is TrustTier.STATIC_SECRET


@pytest.mark.parametrize(
    "subject",
    [
        pytest.param([], id="empty subject"),
        pytest.param([organization("vouchd")], id="organization only"),
        pytest.param([organization("vouchd"), unit("platform team")], id="unrelated unit"),
        # Only an OU counts: a lookalike in another attribute is not the tier.
        pytest.param([x509.NameAttribute(NameOID.COMMON_NAME, "vouchd-tier:hardware")], id="prefix in cn"),
        pytest.param([organization("vouchd-tier:hardware")], id="prefix in o"),
        # The prefix is matched exactly, case included.
        pytest.param([unit("VOUCHD-TIER:hardware")], id="prefix in another case"),
        pytest.param([unit(" vouchd-tier:hardware")], id="prefix not at the start"),
    ],
)
def test_a_subject_without_the_prefixed_unit_has_no_tier(subject: list[x509.NameAttribute[str]]) -> None:
    assert read_tier(certificate_with(subject)) is None


@pytest.mark.parametrize(
    ("ou", "message"),
    [
        ("vouchd-tier:gold", "subject tier 'gold' is not a known tier"),
        ("vouchd-tier:", "subject tier '' is not a known tier"),
        ("vouchd-tier:Hardware", "subject tier 'Hardware' is not a known tier"),
        ("vouchd-tier:hardware ", "subject tier 'hardware ' is not a known tier"),
        ("vouchd-tier:" + "x" * 100, f"subject tier {'x' * 40!r} is not a known tier"),
    ],
)
def test_a_prefixed_unit_naming_an_unknown_tier_is_an_error_not_a_missing_tier(ou: str, message: str) -> None:
    with pytest.raises(InvalidSvidError, match=exactly(message)):
        read_tier(certificate_with([organization("vouchd"), unit(ou)]))


@pytest.mark.parametrize(
    "units",
    [
        pytest.param(["vouchd-tier:hardware", "vouchd-tier:static-secret"], id="conflicting"),
        # Even agreeing duplicates: a certificate vouchd did not shape is not read generously.
        pytest.param(["vouchd-tier:hardware", "vouchd-tier:hardware"], id="repeated"),
    ],
)
def test_two_tier_units_are_an_error(units: list[str]) -> None:
    subject = [organization("vouchd"), *(unit(value) for value in units)]

    with pytest.raises(InvalidSvidError, match=exactly("subject has 2 tier attributes, an svid has at most one")):
        read_tier(certificate_with(subject))


def test_a_duplicate_in_a_multi_valued_rdn_is_an_error_too() -> None:
    rdn = x509.RelativeDistinguishedName([unit("vouchd-tier:hardware"), unit("vouchd-tier:static-secret")])

    with pytest.raises(InvalidSvidError, match=exactly("subject has 2 tier attributes, an svid has at most one")):
        read_tier(certificate_named(x509.Name([rdn])))
