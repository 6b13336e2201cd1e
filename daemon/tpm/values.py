"""The values the TPM service hands out: all bytes in TPM wire form, all frozen."""

from __future__ import annotations

from dataclasses import dataclass

from vouchd.tpm.ek import EkType

__all__ = ["EkInfo", "KeyBlob", "NodeKeys", "TpmQuote"]


@dataclass(frozen=True)
class EkInfo:
    ek_type: EkType
    public: bytes  # marshaled TPM2B_PUBLIC of the EK
    certificate: bytes | None  # DER EK certificate from NV; None when absent (firmware TPMs often have none)


@dataclass(frozen=True)
class KeyBlob:
    """A key as the TPM exported it; only the TPM that created it can load it."""

    public: bytes  # marshaled TPM2B_PUBLIC
    private: bytes  # marshaled TPM2B_PRIVATE (encrypted by the TPM; useless elsewhere)


@dataclass(frozen=True)
class TpmQuote:
    """A TPM-signed attestation structure (a quote or a certification)."""

    attest: bytes  # marshaled TPMS_ATTEST: the bytes that were signed
    signature: bytes  # marshaled TPMT_SIGNATURE


@dataclass(frozen=True)
class NodeKeys:
    ak: KeyBlob
    node_key: KeyBlob
