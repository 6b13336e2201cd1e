"""The trust tier every vouchd SVID carries: how the node that asked for it proved itself.

In an X.509-SVID the tier is a subject attribute, `OU=vouchd-tier:<tier>`; in a JWT-SVID it is
the claim `vouchd_tier`.

Why the subject and not an extension: an extension needs an OID, and without a registered
private enterprise number the only OID vouchd could use is a UUID under the X.667 arc 2.25, whose
128-bit arc Go's crypto/x509 refuses (it parses no arc above 2^31-1, even in a non-critical
extension), so no Go workload could load the SVID. Every X.509 library reads a subject.

Relying parties may read the tier; vouchd's own security never depends on them doing so, so a
library that ignores the subject loses nothing.
"""

from __future__ import annotations

import enum

from cryptography import x509
from cryptography.x509.oid import NameOID

from vouchd.spiffe.errors import InvalidSvidError

__all__ = [
    "JWT_TIER_CLAIM",
    "TIER_SUBJECT_PREFIX",
    "TrustTier",
    "read_tier",
]


class TrustTier(enum.StrEnum):
    HARDWARE = "hardware"
    STATIC_SECRET = "static-secret"  # noqa: S105 - a tier name, not a secret


# Fixed forever: relying parties match on it, and certificates already issued carry it.
TIER_SUBJECT_PREFIX = "vouchd-tier:"

JWT_TIER_CLAIM = "vouchd_tier"

# Long enough to show what was there, short enough that hostile input cannot flood a log line.
_SHOWN_VALUE_CHARS = 40


def read_tier(cert: x509.Certificate) -> TrustTier | None:
    """The tier recorded in `cert`'s subject, or None when no OU starts with TIER_SUBJECT_PREFIX.

    Raises InvalidSvidError when such an OU names an unknown tier or when there is more than one:
    an ambiguous tier must never be read as either of its values.
    """
    tier_values = [
        attribute.value
        for attribute in cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
        if isinstance(attribute.value, str) and attribute.value.startswith(TIER_SUBJECT_PREFIX)
    ]
    if not tier_values:
        return None
    if len(tier_values) > 1:
        raise InvalidSvidError(f"subject has {len(tier_values)} tier attributes, an svid has at most one")
    name = tier_values[0].removeprefix(TIER_SUBJECT_PREFIX)
    try:
        return TrustTier(name)
    except ValueError:
        raise InvalidSvidError(f"subject tier {name[:_SHOWN_VALUE_CHARS]!r} is not a known tier") from None
