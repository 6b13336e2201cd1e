"""The marshaled TPM structures vouchd keeps in files (key blobs, sealed blobs, NV certificates),
read back with every length checked: a damaged file is named as such, never handed to the TPM."""

from __future__ import annotations

from typing import TypeVar

from tpm2_pytss import TPM2B_PRIVATE, TPM2B_PUBLIC, TSS2_Exception

from vouchd.tpm.errors import SealedDataUnavailableError, TpmArgumentError, TpmKeyError
from vouchd.tpm.keystore import StoredKey
from vouchd.tpm.templates import KeyRole, describe_mismatch, describe_sealed_mismatch
from vouchd.tpm.values import SealedBlob

__all__ = ["trim_der", "unmarshal_exact", "unmarshal_private", "unmarshal_public", "unmarshal_sealed"]

_Marshaled = TypeVar("_Marshaled")


def unmarshal_public(key: StoredKey, role: KeyRole) -> TPM2B_PUBLIC:
    path = key.files.public
    try:
        public, consumed = TPM2B_PUBLIC.unmarshal(key.blob.public)
    except (TSS2_Exception, ValueError, TypeError) as err:
        raise TpmKeyError(f"key file {path} is corrupt: not a marshaled TPM2B_PUBLIC") from err
    if consumed != len(key.blob.public):
        raise TpmKeyError(f"key file {path} is corrupt: {len(key.blob.public) - consumed} trailing bytes")
    mismatch = describe_mismatch(role, public)
    if mismatch is not None:
        raise TpmKeyError(f"key file {path} does not hold a vouchd {role.file_stem}: {mismatch}")
    return public


def unmarshal_private(key: StoredKey) -> TPM2B_PRIVATE:
    path = key.files.private
    try:
        private, consumed = TPM2B_PRIVATE.unmarshal(key.blob.private)
    except (TSS2_Exception, ValueError, TypeError) as err:
        raise TpmKeyError(f"key file {path} is corrupt: not a marshaled TPM2B_PRIVATE") from err
    if consumed != len(key.blob.private) or consumed <= 2:
        raise TpmKeyError(f"key file {path} is corrupt: wrong length")
    return private


def trim_der(data: bytes) -> bytes:
    """The DER certificate at the start of an NV index; some TPMs pad the index after it."""
    if len(data) < 4 or data[0] != 0x30:
        return data
    if data[1] < 0x80:
        total = 2 + data[1]
    else:
        length_bytes = data[1] & 0x7F
        if length_bytes == 0 or length_bytes > 4 or len(data) < 2 + length_bytes:
            return data
        total = 2 + length_bytes + int.from_bytes(data[2 : 2 + length_bytes], "big")
    return data[:total] if total <= len(data) else data


def unmarshal_sealed(blob: SealedBlob) -> tuple[TPM2B_PUBLIC, TPM2B_PRIVATE]:
    try:
        public, public_size = TPM2B_PUBLIC.unmarshal(blob.public)
        private, private_size = TPM2B_PRIVATE.unmarshal(blob.private)
    except (TSS2_Exception, ValueError, TypeError) as err:
        raise SealedDataUnavailableError("the sealed blob is damaged: its public or private area does not "
                                         "parse") from err
    if public_size != len(blob.public) or private_size != len(blob.private):
        raise SealedDataUnavailableError("the sealed blob is damaged: trailing bytes after its public or private "
                                         "area")
    mismatch = describe_sealed_mismatch(public)
    if mismatch is not None:
        raise SealedDataUnavailableError(f"the sealed blob is damaged: not vouchd sealed data ({mismatch})")
    return public, private


def unmarshal_exact(kind: type[_Marshaled], data: bytes, what: str) -> _Marshaled:
    try:
        value, consumed = kind.unmarshal(data)  # type: ignore[attr-defined]
    except (TSS2_Exception, ValueError, TypeError) as err:
        raise TpmArgumentError(f"{what} is not a size-prefixed {kind.__name__}") from err
    if consumed != len(data):
        raise TpmArgumentError(f"{what} has {len(data) - consumed} trailing bytes")
    return value  # type: ignore[no-any-return]

