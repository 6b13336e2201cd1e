"""The TPM service: the one owner of the TPM and the only importer of tpm2_pytss in vouchd."""

from __future__ import annotations

from vouchd.tpm.errors import (
    TpmArgumentError,
    TpmCapabilityError,
    TpmError,
    TpmKeyError,
    TpmOperationError,
    TpmUnavailableError,
)
from vouchd.tpm.service import EkInfo, EkType, KeyBlob, NodeKeys, TpmQuote, TpmService

__all__ = [
    "EkInfo",
    "EkType",
    "KeyBlob",
    "NodeKeys",
    "TpmArgumentError",
    "TpmCapabilityError",
    "TpmError",
    "TpmKeyError",
    "TpmOperationError",
    "TpmQuote",
    "TpmService",
    "TpmUnavailableError",
]
