"""Endorsement key profiles: which TCG template, where its certificate lives, how to satisfy its policy.

The EK type is pinned in config so that a node's identity never depends on which EK happens to be
found first (DESIGN §3).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Literal, cast, get_args

from tpm2_pytss import TPM2_ALG, TPM2B_PUBLIC

from vouchd.tpm.errors import TpmArgumentError

__all__ = ["EK_PROFILES", "EkProfile", "EkType", "ek_public_hash", "parse_ek_type"]

EkType = Literal["rsa2048", "ecc-p256", "ecc-p384"]

_EK_TYPES: tuple[str, ...] = get_args(EkType)

# TCG EK Credential Profile 2.0, high-range templates: authPolicy = PolicyOR(PolicyA, PolicyC), where
# PolicyA = PolicySecret(TPM_RH_ENDORSEMENT) and PolicyC = PolicyAuthorizeNV, both over SHA-384.
_POLICY_A_SHA384 = bytes.fromhex(
    "8bbf2266537c171cb56e403c4dc1d4b64f432611dc386e6f532050c3278c930e143e8bb1133824ccb431053871c6db53"
)
_POLICY_C_SHA384 = bytes.fromhex(
    "d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5b4947c2d73e63005eed2dc2b3593d165"
)


@dataclass(frozen=True)
class EkProfile:
    ek_type: EkType
    template_name: str  # as understood by tpm2_pytss.utils.create_ek_template
    certificate_index: int  # NV index of the DER EK certificate
    policy_hash: TPM2_ALG  # hash of the EK's authPolicy, and so of a session satisfying it
    policy_or_branches: tuple[bytes, ...] = ()  # high-range templates end their policy in PolicyOR


EK_PROFILES: dict[EkType, EkProfile] = {
    "rsa2048": EkProfile("rsa2048", "EK-RSA2048", 0x01C00002, TPM2_ALG.SHA256),
    "ecc-p256": EkProfile("ecc-p256", "EK-ECC256", 0x01C0000A, TPM2_ALG.SHA256),
    "ecc-p384": EkProfile(
        "ecc-p384", "EK-HIGH-ECC384", 0x01C00016, TPM2_ALG.SHA384, (_POLICY_A_SHA384, _POLICY_C_SHA384)
    ),
}


def parse_ek_type(value: str) -> EkType:
    """The EK type named by `value`; TpmArgumentError lists the accepted names otherwise."""
    if value not in _EK_TYPES:
        raise TpmArgumentError(f"unknown ek type {value!r}: expected one of {', '.join(_EK_TYPES)}")
    return cast(EkType, value)


def ek_public_hash(public: bytes) -> str:
    """sha256 hex of the EK's DER SubjectPublicKeyInfo, from its marshaled TPM2B_PUBLIC: the hash in the
    node's SPIFFE ID and in `vouchd tpm info` (vouchd.protocol.identities.ek_hash computes the same)."""
    area, _ = TPM2B_PUBLIC.unmarshal(public)
    return hashlib.sha256(area.to_der()).hexdigest()
