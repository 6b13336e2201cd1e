"""The trust tier every vouchd SVID carries: how the node that asked for it proved itself.

In an X.509-SVID the tier is a non-critical extension whose value is a DER UTF8String holding the
tier name; in a JWT-SVID it is the claim `vouchd_tier`. Relying parties may read it; vouchd's own
security never depends on them doing so, which is why the extension is non-critical.
"""

from __future__ import annotations

import enum
import uuid

from cryptography import x509

from vouchd.spiffe.errors import InvalidSvidError

__all__ = [
    "JWT_TIER_CLAIM",
    "TIER_EXTENSION_OID",
    "TIER_EXTENSION_UUID",
    "TrustTier",
    "read_tier",
    "tier_extension_value",
]


class TrustTier(enum.StrEnum):
    HARDWARE = "hardware"
    STATIC_SECRET = "static-secret"  # noqa: S105 - a tier name, not a secret


# Generated once with uuid4 and fixed forever: certificates already issued carry the OID derived
# from it, so changing it would make every relying party stop recognising the tier.
TIER_EXTENSION_UUID = uuid.UUID("79699034-abb9-4713-a384-12437aaaadf2")

# ITU-T X.667: a UUID is an OID arc under 2.25 without registration, so vouchd needs no PEN.
TIER_EXTENSION_OID = x509.ObjectIdentifier(f"2.25.{TIER_EXTENSION_UUID.int}")

JWT_TIER_CLAIM = "vouchd_tier"

_UTF8_STRING_TAG = 0x0C


def tier_extension_value(tier: TrustTier) -> bytes:
    """The DER encoding (UTF8String) of the tier name, the extension's extnValue content."""
    content = tier.value.encode("utf-8")
    # Tier names are short constants, so the DER short-form length always applies.
    if len(content) > 0x7F:
        raise ValueError("tier name too long for a short-form der length")
    return bytes((_UTF8_STRING_TAG, len(content))) + content


def read_tier(cert: x509.Certificate) -> TrustTier | None:
    """The tier recorded in `cert`, or None when it has no tier extension.

    Raises InvalidSvidError when the extension is present but does not hold a known tier.
    """
    try:
        extension = cert.extensions.get_extension_for_oid(TIER_EXTENSION_OID)
    except x509.ExtensionNotFound:
        return None
    value = extension.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise InvalidSvidError("tier extension has an unexpected type")
    der = value.value
    if len(der) < 2 or der[0] != _UTF8_STRING_TAG or der[1] != len(der) - 2:
        raise InvalidSvidError("tier extension is not a der utf8string")
    try:
        return TrustTier(der[2:].decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise InvalidSvidError("tier extension names an unknown tier") from err
