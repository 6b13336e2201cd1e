"""TPM2_Quote verification: signature, freshness (extraData), PCR selection and PCR digest."""

from __future__ import annotations

import hmac
from collections.abc import Mapping, Sequence

from vouchd.evidence.algorithms import TpmAlg, digest_size, hash_digest
from vouchd.evidence.errors import VerificationError
from vouchd.evidence.signature import TpmSignature, verify_signature
from vouchd.evidence.structures import Attest, AttestType, PcrSelection, TpmPublic

__all__ = ["pcr_digest", "verify_quote"]


def pcr_digest(values: Sequence[bytes], hash_alg: TpmAlg = TpmAlg.SHA256) -> bytes:
    """The quote's pcrDigest: H_hash_alg of the PCR values concatenated in selection order."""
    return hash_digest(hash_alg, b"".join(values))


def verify_quote(ak: TpmPublic, attest: bytes, signature: bytes, *, extra_data: bytes,
                 selection: PcrSelection, pcr_values: Mapping[int, bytes] | None) -> Attest:
    """Verify a TPM2_Quote made by `ak` and return its parsed TPMS_ATTEST.

    Checks that the signature is ak's, that it is a quote, that its extraData is `extra_data`,
    that it covers exactly `selection` (one bank), and that `pcr_values` (index -> value, e.g.
    from an event-log replay) hash to its pcrDigest. Each failure is a VerificationError naming
    the check. With `pcr_values` None the caller has no values to check the digest against (it
    compares `pcr_digest` with one it recorded, or records it): everything else is still checked.
    """
    verify_signature(ak, signature, attest)
    parsed = Attest.parse(attest)
    if parsed.type is not AttestType.QUOTE:
        raise VerificationError("attestation is not a quote")
    if not hmac.compare_digest(parsed.extra_data, extra_data):
        raise VerificationError("quote extraData does not match")
    if parsed.pcr_selection != (selection,):
        raise VerificationError("quote pcr selection does not match the demanded selection")
    if pcr_values is None:
        return parsed
    missing = [i for i in selection.pcrs if i not in pcr_values]
    if missing:
        raise VerificationError(f"pcr values missing for selected pcrs {missing}")
    size = digest_size(selection.hash_alg)
    wrong = [i for i in selection.pcrs if len(pcr_values[i]) != size]
    if wrong:
        raise VerificationError(
            f"pcr values for pcrs {wrong} are not {selection.hash_alg.name.lower()} sized")
    # The TPM hashes the composite with the signing scheme's hash, not the bank's.
    composite_hash = TpmSignature.parse(signature).hash_alg
    expected = pcr_digest([pcr_values[i] for i in selection.pcrs], composite_hash)
    if not hmac.compare_digest(parsed.pcr_digest, expected):
        raise VerificationError("quote pcr digest does not match the pcr values")
    return parsed
