"""The TPM service: the one owner of the TPM and the only importer of tpm2_pytss in vouchd."""

from __future__ import annotations

from vouchd.tpm.errors import (
    SealedDataUnavailableError,
    TpmArgumentError,
    TpmAuthorizationError,
    TpmCapabilityError,
    TpmError,
    TpmKeyError,
    TpmOperationError,
    TpmUnavailableError,
)
from vouchd.tpm.service import EkInfo, EkType, KeyBlob, NodeKeys, SealedBlob, TpmQuote, TpmService

__all__ = [
    "EkInfo",
    "EkType",
    "KeyBlob",
    "NodeKeys",
    "SealedBlob",
    "SealedDataUnavailableError",
    "TpmArgumentError",
    "TpmAuthorizationError",
    "TpmCapabilityError",
    "TpmError",
    "TpmKeyError",
    "TpmOperationError",
    "TpmQuote",
    "TpmService",
    "TpmUnavailableError",
]
