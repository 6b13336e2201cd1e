"""SPIFFE building blocks: IDs, trust domains, X.509-SVIDs, bundles and vouchd's trust tier.

Imports nothing of vouchd beyond vouchd.errors, so the agent, the authority and tools can all use it.
"""

from __future__ import annotations

from vouchd.spiffe.bundle import X509Bundle, load_der_certificates
from vouchd.spiffe.certificates import is_ca_certificate, serial_hex, spki_der, utc_time
from vouchd.spiffe.errors import InvalidBundleError, InvalidSpiffeIdError, InvalidSvidError, SpiffeError
from vouchd.spiffe.ids import SCHEME_PREFIX, SpiffeId, TrustDomain
from vouchd.spiffe.jwtsvid import (
    MAX_AUDIENCE_LENGTH,
    MAX_AUDIENCES,
    MAX_TOKEN_LENGTH,
    JwtBundle,
    ValidatedJwtSvid,
    jwt_key_id,
    mint_jwt_svid,
    validate_jwt_svid,
)
from vouchd.spiffe.tier import JWT_TIER_CLAIM, TIER_SUBJECT_PREFIX, TrustTier, read_tier
from vouchd.spiffe.x509svid import (
    CLOCK_SKEW,
    check_dns_name,
    csr_public_key,
    make_csr,
    mint_x509_svid,
    validate_x509_svid_leaf,
    verify_x509_svid,
)

__all__ = [
    "CLOCK_SKEW",
    "JWT_TIER_CLAIM",
    "MAX_AUDIENCES",
    "MAX_AUDIENCE_LENGTH",
    "MAX_TOKEN_LENGTH",
    "SCHEME_PREFIX",
    "TIER_SUBJECT_PREFIX",
    "InvalidBundleError",
    "InvalidSpiffeIdError",
    "InvalidSvidError",
    "JwtBundle",
    "SpiffeError",
    "SpiffeId",
    "TrustDomain",
    "TrustTier",
    "ValidatedJwtSvid",
    "X509Bundle",
    "check_dns_name",
    "csr_public_key",
    "is_ca_certificate",
    "jwt_key_id",
    "load_der_certificates",
    "make_csr",
    "mint_jwt_svid",
    "mint_x509_svid",
    "read_tier",
    "serial_hex",
    "spki_der",
    "utc_time",
    "validate_jwt_svid",
    "validate_x509_svid_leaf",
    "verify_x509_svid",
]
