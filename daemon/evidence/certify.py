"""Key attribute checks, qualified names and TPM2_Certify verification.

A TPM object's qualified name binds it to its whole ancestry (TPM 2.0 Part 1 §16): the
authority proves the AK is a child of the EK by recomputing the AK's qualified name from the
EK's name and comparing it with the qualifiedSigner the TPM put into a Certify.
"""

from __future__ import annotations

import hmac

from vouchd.evidence import _wire
from vouchd.evidence.algorithms import TpmAlg, hash_digest
from vouchd.evidence.errors import EvidenceError, VerificationError
from vouchd.evidence.signature import verify_signature
from vouchd.evidence.structures import Attest, AttestType, EccCurve, ObjectAttributes, TpmPublic

__all__ = [
    "ENDORSEMENT_HIERARCHY_HANDLE",
    "check_ak_attributes",
    "check_node_key_attributes",
    "primary_qualified_name",
    "qualified_name",
    "verify_certify",
]

ENDORSEMENT_HIERARCHY_HANDLE = 0x4000000B

_A = ObjectAttributes
_TPM_RESIDENT = _A.FIXED_TPM | _A.FIXED_PARENT | _A.SENSITIVE_DATA_ORIGIN
_AK_REQUIRED = _TPM_RESIDENT | _A.RESTRICTED | _A.SIGN_ENCRYPT
_NODE_KEY_REQUIRED = _TPM_RESIDENT | _A.SIGN_ENCRYPT
# SHA-1 names would let two public areas share a name; accept only SHA-2 names.
_NAME_ALGS = frozenset({TpmAlg.SHA256, TpmAlg.SHA384, TpmAlg.SHA512})


def qualified_name(parent_qualified_name: bytes, name: bytes, name_alg: TpmAlg = TpmAlg.SHA256) -> bytes:
    """QN = u16 nameAlg || H_nameAlg(parent QN || name), where nameAlg is the object's own name
    algorithm (the prefix of `name`; EvidenceError if the two disagree)."""
    if name[:2] != _wire.u16(name_alg):
        raise EvidenceError(f"name does not start with its name algorithm {name_alg.name.lower()}")
    return _wire.u16(name_alg) + hash_digest(name_alg, parent_qualified_name + name)


def primary_qualified_name(name: bytes, hierarchy: int = ENDORSEMENT_HIERARCHY_HANDLE) -> bytes:
    """QN of a primary key: the hierarchy's qualified name is its handle (4 bytes, big-endian);
    the hash is the key's name algorithm, read from the prefix of `name`."""
    try:
        name_alg = TpmAlg(int.from_bytes(name[:2], "big"))
    except ValueError:
        raise EvidenceError("name does not start with a known name algorithm") from None
    return qualified_name(_wire.u32(hierarchy), name, name_alg)


def _attribute_names(flags: ObjectAttributes) -> str:
    return ", ".join(f.name.lower() for f in ObjectAttributes if f & flags and f.name is not None)


def _require_attributes(what: str, key: TpmPublic, required: ObjectAttributes,
                        forbidden: ObjectAttributes) -> None:
    missing = required & ~key.attributes
    if missing:
        raise VerificationError(f"{what} lacks attribute {_attribute_names(missing)}")
    present = forbidden & key.attributes
    if present:
        raise VerificationError(f"{what} has forbidden attribute {_attribute_names(present)}")
    if key.name_alg not in _NAME_ALGS:
        raise VerificationError(f"{what} name algorithm {key.name_alg.name.lower()} is not accepted")


def check_ak_attributes(ak: TpmPublic) -> None:
    """Refuse an AK that is not a TPM-resident restricted signing key of a known shape:
    ECC P-256 with ECDSA-SHA256, or RSA-2048 with RSASSA/RSAPSS-SHA256."""
    if ak.type is TpmAlg.ECC:
        if ak.curve is not EccCurve.NIST_P256:
            raise VerificationError("ak curve is not nist p-256")
        if (ak.scheme, ak.scheme_hash) != (TpmAlg.ECDSA, TpmAlg.SHA256):
            raise VerificationError("ak scheme is not ecdsa-sha256")
    elif ak.type is TpmAlg.RSA:
        if ak.rsa_bits != 2048:
            raise VerificationError("ak rsa key is not 2048 bits")
        if ak.scheme not in (TpmAlg.RSASSA, TpmAlg.RSAPSS) or ak.scheme_hash is not TpmAlg.SHA256:
            raise VerificationError("ak scheme is not rsassa-sha256 or rsapss-sha256")
    else:
        raise VerificationError(f"ak type {ak.type.name.lower()} is not ecc or rsa")
    _require_attributes("ak", ak, _AK_REQUIRED, _A.DECRYPT)


def check_node_key_attributes(key: TpmPublic) -> None:
    """Refuse a node key that is not a TPM-resident, unrestricted ECC P-256 signing key."""
    if key.type is not TpmAlg.ECC or key.curve is not EccCurve.NIST_P256:
        raise VerificationError("node key is not an ecc nist p-256 key")
    if key.scheme not in (TpmAlg.NULL, TpmAlg.ECDSA):
        raise VerificationError(f"node key scheme {key.scheme.name.lower()} is not ecdsa")
    _require_attributes("node key", key, _NODE_KEY_REQUIRED, _A.RESTRICTED | _A.DECRYPT)


def verify_certify(ak: TpmPublic, attest: bytes, signature: bytes, *, extra_data: bytes,
                   certified: TpmPublic, expected_signer_qualified_name: bytes | None = None) -> Attest:
    """Verify a TPM2_Certify of `certified` signed by `ak` and return its parsed TPMS_ATTEST.

    With `expected_signer_qualified_name`, also require the AK's qualified name (the TPM's
    statement of where the AK sits in its hierarchy) to be exactly that value.
    """
    verify_signature(ak, signature, attest)
    parsed = Attest.parse(attest)
    if parsed.type is not AttestType.CERTIFY:
        raise VerificationError("attestation is not a certify")
    if not hmac.compare_digest(parsed.extra_data, extra_data):
        raise VerificationError("certify extraData does not match")
    if not hmac.compare_digest(parsed.certified_name, certified.name):
        raise VerificationError("certified name does not match the presented public area")
    if expected_signer_qualified_name is not None and not hmac.compare_digest(
            parsed.qualified_signer, expected_signer_qualified_name):
        raise VerificationError("certify signer qualified name does not match the expected parent")
    return parsed
