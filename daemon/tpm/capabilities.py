"""What vouchd needs from a TPM, and what a given TPM lacks of it.

Checked once at start so that a TPM without, say, P-384 fails with a sentence naming P-384 instead of
a response code from the first CreatePrimary.
"""

from __future__ import annotations

from dataclasses import dataclass

from tpm2_pytss import TPM2_ALG, TPM2_ECC

from vouchd.tpm.ek import EkType

__all__ = ["TpmCapabilities", "missing_capabilities"]

# Every EK type: SHA-256 names and PCRs, ECC P-256 ECDSA for the AK and node key, AES-CFB and
# KDFa (SP800-108) for the credential protection of ActivateCredential.
_COMMON_ALGORITHMS = (
    TPM2_ALG.SHA256,
    TPM2_ALG.ECC,
    TPM2_ALG.ECDSA,
    TPM2_ALG.AES,
    TPM2_ALG.CFB,
    TPM2_ALG.KDF1_SP800_108,
)
_EK_ALGORITHMS: dict[EkType, tuple[TPM2_ALG, ...]] = {
    "rsa2048": (TPM2_ALG.RSA, TPM2_ALG.OAEP),
    "ecc-p256": (TPM2_ALG.ECDH, TPM2_ALG.KDF1_SP800_56A),
    "ecc-p384": (TPM2_ALG.ECDH, TPM2_ALG.KDF1_SP800_56A, TPM2_ALG.SHA384),
}
_EK_CURVES: dict[EkType, tuple[TPM2_ECC, ...]] = {
    "rsa2048": (TPM2_ECC.NIST_P256,),
    "ecc-p256": (TPM2_ECC.NIST_P256,),
    "ecc-p384": (TPM2_ECC.NIST_P256, TPM2_ECC.NIST_P384),
}
_CURVE_NAMES = {TPM2_ECC.NIST_P256: "nist p-256", TPM2_ECC.NIST_P384: "nist p-384"}


@dataclass(frozen=True)
class TpmCapabilities:
    """What a TPM reported through GetCapability."""

    algorithms: frozenset[int]
    curves: frozenset[int]
    pcr_banks: frozenset[int]  # hash algorithms with at least one PCR allocated


def missing_capabilities(ek_type: EkType, capabilities: TpmCapabilities) -> list[str]:
    """Human-readable names of what vouchd needs for `ek_type` and the TPM lacks, in a stable order."""
    missing = [
        f"algorithm {_algorithm_name(alg)}"
        for alg in (*_COMMON_ALGORITHMS, *_EK_ALGORITHMS[ek_type])
        if alg not in capabilities.algorithms
    ]
    missing += [f"curve {_CURVE_NAMES[curve]}" for curve in _EK_CURVES[ek_type] if curve not in capabilities.curves]
    if TPM2_ALG.SHA256 not in capabilities.pcr_banks:
        missing.append("an allocated sha256 pcr bank")
    return missing


def _algorithm_name(alg: TPM2_ALG) -> str:
    return str(alg).lower().replace("_", "-")
