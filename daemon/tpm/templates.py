"""The public areas of the objects vouchd creates, and the checks that a stored one is ours.

The AK and the node key live under the EK. Both are ECC P-256 ECDSA-SHA256 signing keys that
cannot leave the TPM (fixedTPM, fixedParent) and whose private part the TPM generated
(sensitiveDataOrigin). They are used with a random authValue (userWithAuth), so a process that
can talk to the TPM still cannot sign with them.
The authValue is random and 32 bytes long, so the keys opt out of dictionary-attack lockout.

Sealed data lives under the owner hierarchy's storage key (SRK): a keyed-hash object whose only
authorization is its policy (no userWithAuth, adminWithPolicy), a PolicyPCR digest.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from tpm2_pytss import TPM2_ALG, TPM2_ECC, TPM2B_PUBLIC, TPMA_OBJECT, TPMT_PUBLIC

__all__ = [
    "SEALED_OBJECT_ATTRIBUTES",
    "KeyRole",
    "describe_mismatch",
    "describe_sealed_mismatch",
    "public_template",
    "sealed_object_template",
    "storage_key_template",
]

_SHA256_SIZE = 32

# fixedTPM and fixedParent: the sealed data never leaves this TPM and this parent. No userWithAuth and
# adminWithPolicy: the policy is the only way in, for every role. noDA: nothing in it is a password.
SEALED_OBJECT_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.ADMINWITHPOLICY | TPMA_OBJECT.NODA
)

_SIGNING_ATTRIBUTES = (
    TPMA_OBJECT.FIXEDTPM
    | TPMA_OBJECT.FIXEDPARENT
    | TPMA_OBJECT.SENSITIVEDATAORIGIN
    | TPMA_OBJECT.USERWITHAUTH
    | TPMA_OBJECT.SIGN_ENCRYPT
    # noDA: the authValue is 32 random bytes, so dictionary-attack protection adds nothing, while
    # every unclean shutdown of the host would count against it and could lock the keys out.
    | TPMA_OBJECT.NODA
)


@dataclass(frozen=True)
class _RoleSpec:
    file_stem: str
    attributes: TPMA_OBJECT


class KeyRole(Enum):
    """A key vouchd keeps in the TPM, by what it is for."""

    # Restricted: signs only TPM-generated structures (quotes, certifications), never outside digests.
    ATTESTATION_KEY = _RoleSpec("ak", _SIGNING_ATTRIBUTES | TPMA_OBJECT.RESTRICTED)
    # The node's X.509 identity key: signs arbitrary digests (CSRs, bus messages).
    NODE_KEY = _RoleSpec("node_key", _SIGNING_ATTRIBUTES)

    @property
    def file_stem(self) -> str:
        return self.value.file_stem

    @property
    def attributes(self) -> TPMA_OBJECT:
        return self.value.attributes


def public_template(role: KeyRole) -> TPM2B_PUBLIC:
    # parse() defaults to sign|decrypt attributes: always pass them explicitly.
    return TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=role.attributes)


def describe_mismatch(role: KeyRole, public: TPM2B_PUBLIC) -> str | None:
    """What makes `public` differ from the public area vouchd creates for `role`, or None if nothing."""
    area = public.publicArea
    if area.type != TPM2_ALG.ECC:
        return "key type is not ecc"
    if area.nameAlg != TPM2_ALG.SHA256:
        return "name algorithm is not sha256"
    if area.objectAttributes != role.attributes:
        return f"object attributes are {area.objectAttributes!s}, expected {role.attributes!s}"
    detail = area.parameters.eccDetail
    if detail.curveID != TPM2_ECC.NIST_P256:
        return "curve is not nist p-256"
    if detail.scheme.scheme != TPM2_ALG.ECDSA or detail.scheme.details.anySig.hashAlg != TPM2_ALG.SHA256:
        return "signing scheme is not ecdsa-sha256"
    if len(area.authPolicy) != 0:
        return "key carries an authorization policy"
    return None


def storage_key_template() -> TPM2B_PUBLIC:
    """The TCG provisioning guidance's ECC P-256 SRK (the one `tpm2_createprimary -C o -G ecc` and the
    FAPI derive), with noDA: the owner hierarchy's primary that sealed objects are children of."""
    template = TPM2B_PUBLIC.parse(
        "ecc256:null:aes128cfb",
        objectAttributes=TPMA_OBJECT.DEFAULT_TPM2_TOOLS_CREATEPRIMARY_ATTRS | TPMA_OBJECT.NODA,
    )
    template.publicArea.unique.ecc.x = bytes(_SHA256_SIZE)
    template.publicArea.unique.ecc.y = bytes(_SHA256_SIZE)
    return template


def sealed_object_template(policy_digest: bytes) -> TPM2B_PUBLIC:
    public = TPM2B_PUBLIC(
        TPMT_PUBLIC(
            type=TPM2_ALG.KEYEDHASH,
            nameAlg=TPM2_ALG.SHA256,
            objectAttributes=SEALED_OBJECT_ATTRIBUTES,
            authPolicy=policy_digest,
        )
    )
    public.publicArea.parameters.keyedHashDetail.scheme.scheme = TPM2_ALG.NULL
    return public


def describe_sealed_mismatch(public: TPM2B_PUBLIC) -> str | None:
    """What makes `public` differ from a sealed object vouchd creates, or None if nothing."""
    area = public.publicArea
    if area.type != TPM2_ALG.KEYEDHASH:
        return "object type is not keyedhash"
    if area.nameAlg != TPM2_ALG.SHA256:
        return "name algorithm is not sha256"
    if area.objectAttributes != SEALED_OBJECT_ATTRIBUTES:
        return f"object attributes are {area.objectAttributes!s}, expected {SEALED_OBJECT_ATTRIBUTES!s}"
    if area.parameters.keyedHashDetail.scheme.scheme != TPM2_ALG.NULL:
        return "it has a keyed-hash scheme: it is a key, not sealed data"
    if len(area.authPolicy) != _SHA256_SIZE:
        return "it has no sha256 authorization policy"
    return None
