"""PCR selections as the TPM marshals them, and the PolicyPCR digest computed in Python (sealing)."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

from tpm2_pytss import TPM2_ALG, TPML_PCR_SELECTION, TPMS_PCR_SELECTION

from vouchd.tpm.values import PCR_COUNT

__all__ = ["PCR_SELECT_BYTES", "SHA256_POLICY_START", "TPM_CC_POLICY_PCR", "pcr_list", "pcr_selection",
           "policy_pcr_digest", "selected_indices"]

PCR_SELECT_BYTES = PCR_COUNT // 8
TPM_CC_POLICY_PCR = 0x17F
SHA256_POLICY_START = bytes(32)   # a fresh SHA-256 policy session's digest


def pcr_list(pcrs: Sequence[int]) -> str:
    return ", ".join(map(str, pcrs))


def policy_pcr_digest(selection: TPML_PCR_SELECTION, values: Sequence[bytes]) -> bytes:
    """The policyDigest of a fresh SHA-256 session after PolicyPCR(selection) with the PCRs at `values`
    (TPM 2.0 Part 3, 23.7): H(0…0 ‖ TPM_CC_PolicyPCR ‖ selection ‖ H(values in selection order)), H being
    the session's hash whatever the bank. Computed here, not by a trial session: the values were just
    read (which also proves the bank is allocated), and it costs no session slot."""
    pcr_digest = hashlib.sha256(b"".join(values)).digest()
    return hashlib.sha256(
        SHA256_POLICY_START + struct.pack(">I", TPM_CC_POLICY_PCR) + selection.marshal() + pcr_digest
    ).digest()


def pcr_selection(bank: TPM2_ALG, pcrs: Sequence[int]) -> TPML_PCR_SELECTION:
    bitmap = bytearray(PCR_SELECT_BYTES)
    for index in pcrs:
        bitmap[index // 8] |= 1 << (index % 8)
    return TPML_PCR_SELECTION([TPMS_PCR_SELECTION(hash=bank, sizeofSelect=PCR_SELECT_BYTES, pcrSelect=bytes(bitmap))])


def selected_indices(selection: TPML_PCR_SELECTION, bank: TPM2_ALG) -> list[int]:
    indices: list[int] = []
    for entry in selection.pcrSelections:
        if entry.hash != bank:
            continue
        bitmap = bytes(entry.pcrSelect)[: entry.sizeofSelect]
        indices.extend(i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1)
    return indices


