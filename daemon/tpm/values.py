"""The values the TPM service hands out: all bytes in TPM wire form, all frozen."""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

from tpm2_pytss import TPM2_ALG

from vouchd.tpm.ek import EkType
from vouchd.tpm.errors import SealedDataUnavailableError, TpmArgumentError

__all__ = ["MAX_SEALED_DATA", "PCR_BANKS", "PCR_COUNT", "EkInfo", "KeyBlob", "NodeKeys", "SealedBlob", "TpmQuote",
           "bank_name"]

PCR_COUNT = 24

# The PCR banks by the names vouchd uses in configuration, messages and sealed blobs. tpm2-pytss
# calls SHA-1 by its older alias, "sha": never print a TPM2_ALG directly.
PCR_BANKS: Mapping[str, TPM2_ALG] = {
    "sha1": TPM2_ALG.SHA1,
    "sha256": TPM2_ALG.SHA256,
    "sha384": TPM2_ALG.SHA384,
    "sha512": TPM2_ALG.SHA512,
}

# MAX_SYM_DATA of TPM 2.0 Part 2: what every TPM seals in one keyed-hash object (an AES-256 key fits 4 times).
MAX_SEALED_DATA = 128


def bank_name(bank: TPM2_ALG) -> str:
    for name, alg in PCR_BANKS.items():
        if alg == bank:
            return name
    return f"{int(bank):#06x}"


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


# SealedBlob.to_bytes: magic, version, bank (TPM_ALG_ID), PCR bitmap (3 bytes, bit i = PCR i), the
# size-prefixed public and private areas, then a SHA-256 of everything before it, so that a damaged
# file is told apart from PCRs that moved.
_SEALED_MAGIC = b"VDSL"
_SEALED_VERSION = 1
_SEALED_HEADER = struct.Struct(">4sBH3s")
_CHECKSUM_SIZE = 32


@dataclass(frozen=True)
class SealedBlob:
    """Data sealed by TpmService.seal: a keyed-hash object under the owner hierarchy's storage key whose
    only authorization is PolicyPCR over `pcrs` of `bank` as they were at sealing. Only the TPM that
    sealed it, under the same owner seed (no TPM2_Clear since), can unseal it, and only while those PCRs
    hold those values. Not secret by itself: the TPM encrypted the data in `private`."""

    public: bytes  # marshaled TPM2B_PUBLIC of the sealed object
    private: bytes = field(repr=False)  # marshaled TPM2B_PRIVATE
    bank: str
    pcrs: tuple[int, ...]  # ascending

    def __post_init__(self) -> None:
        if self.bank not in PCR_BANKS:
            raise TpmArgumentError(f"unknown pcr bank {self.bank!r}: expected one of {', '.join(PCR_BANKS)}")
        pcrs = tuple(self.pcrs)
        if not pcrs or any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < PCR_COUNT for i in pcrs):
            raise TpmArgumentError(f"a sealed blob needs pcr indices from 0 to {PCR_COUNT - 1}, got {pcrs!r}")
        if list(pcrs) != sorted(set(pcrs)):
            raise TpmArgumentError("a sealed blob's pcr indices must ascend without repeats")
        for what, value in (("public", self.public), ("private", self.private)):
            if not isinstance(value, bytes) or not 2 < len(value) <= 0xFFFF:
                raise TpmArgumentError(f"a sealed blob's {what} area must be 3 to 65535 bytes")

    def to_bytes(self) -> bytes:
        bitmap = bytearray(PCR_COUNT // 8)
        for index in self.pcrs:
            bitmap[index // 8] |= 1 << (index % 8)
        body = (_SEALED_HEADER.pack(_SEALED_MAGIC, _SEALED_VERSION, int(PCR_BANKS[self.bank]), bytes(bitmap))
                + struct.pack(">H", len(self.public)) + self.public
                + struct.pack(">H", len(self.private)) + self.private)
        return body + hashlib.sha256(body).digest()

    @classmethod
    def from_bytes(cls, data: bytes) -> SealedBlob:
        """The blob `to_bytes` wrote; SealedDataUnavailableError when `data` is not that, whole and unchanged."""
        data = bytes(data)
        if len(data) < _SEALED_HEADER.size + 4 + _CHECKSUM_SIZE or data[:4] != _SEALED_MAGIC:
            raise SealedDataUnavailableError("the sealed blob is damaged: not a vouchd sealed blob")
        body, checksum = data[:-_CHECKSUM_SIZE], data[-_CHECKSUM_SIZE:]
        if hashlib.sha256(body).digest() != checksum:
            raise SealedDataUnavailableError("the sealed blob is damaged: its checksum does not match")
        _, version, alg, bitmap = _SEALED_HEADER.unpack_from(body)
        if version != _SEALED_VERSION:
            raise SealedDataUnavailableError(f"the sealed blob has format version {version}, this vouchd reads "
                                             f"{_SEALED_VERSION}")
        banks = [name for name, bank in PCR_BANKS.items() if int(bank) == alg]
        pcrs = tuple(i for i in range(PCR_COUNT) if bitmap[i // 8] >> (i % 8) & 1)
        offset = _SEALED_HEADER.size
        areas: list[bytes] = []
        for _ in range(2):
            if offset + 2 > len(body):
                raise SealedDataUnavailableError("the sealed blob is damaged: it ends early")
            (size,) = struct.unpack_from(">H", body, offset)
            areas.append(body[offset + 2 : offset + 2 + size])
            offset += 2 + size
        if offset != len(body):
            raise SealedDataUnavailableError("the sealed blob is damaged: wrong length")
        try:
            return cls(public=areas[0], private=areas[1], bank=banks[0] if banks else f"{alg:#06x}", pcrs=pcrs)
        except TpmArgumentError as err:
            raise SealedDataUnavailableError(f"the sealed blob is damaged: {err}") from None
