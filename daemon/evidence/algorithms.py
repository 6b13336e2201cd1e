"""TPM algorithm identifiers and the hash functions behind them."""

from __future__ import annotations

import enum
import hashlib

from cryptography.hazmat.primitives import hashes

from vouchd.evidence.errors import EvidenceError

__all__ = ["EccCurve", "TpmAlg", "crypto_hash", "digest_size", "hash_digest", "is_hash"]


class TpmAlg(enum.IntEnum):
    """TPM_ALG_ID values (TPM 2.0 Part 2 §6.3, TCG Algorithm Registry)."""

    RSA = 0x0001
    SHA1 = 0x0004
    HMAC = 0x0005
    AES = 0x0006
    MGF1 = 0x0007
    KEYEDHASH = 0x0008
    XOR = 0x000A
    SHA256 = 0x000B
    SHA384 = 0x000C
    SHA512 = 0x000D
    NULL = 0x0010
    SM3_256 = 0x0012
    SM4 = 0x0013
    RSASSA = 0x0014
    RSAES = 0x0015
    RSAPSS = 0x0016
    OAEP = 0x0017
    ECDSA = 0x0018
    ECDH = 0x0019
    ECDAA = 0x001A
    SM2 = 0x001B
    ECSCHNORR = 0x001C
    ECMQV = 0x001D
    KDF1_SP800_56A = 0x0020
    KDF2 = 0x0021
    KDF1_SP800_108 = 0x0022
    ECC = 0x0023
    SYMCIPHER = 0x0025
    CAMELLIA = 0x0026
    SHA3_256 = 0x0027
    SHA3_384 = 0x0028
    SHA3_512 = 0x0029
    CTR = 0x0040
    OFB = 0x0041
    CBC = 0x0042
    CFB = 0x0043
    ECB = 0x0044


class EccCurve(enum.IntEnum):
    """TPM_ECC_CURVE values this package can turn into keys."""

    NIST_P256 = 0x0003
    NIST_P384 = 0x0004
    NIST_P521 = 0x0005


_HASHLIB_NAMES: dict[TpmAlg, str] = {
    TpmAlg.SHA1: "sha1",
    TpmAlg.SHA256: "sha256",
    TpmAlg.SHA384: "sha384",
    TpmAlg.SHA512: "sha512",
    TpmAlg.SHA3_256: "sha3_256",
    TpmAlg.SHA3_384: "sha3_384",
    TpmAlg.SHA3_512: "sha3_512",
}

# SM3 has a fixed size even though neither hashlib nor cryptography computes it: event logs
# may carry an SM3 bank that we must step over without replaying it.
_DIGEST_SIZES: dict[TpmAlg, int] = {
    TpmAlg.SHA1: 20,
    TpmAlg.SHA256: 32,
    TpmAlg.SHA384: 48,
    TpmAlg.SHA512: 64,
    TpmAlg.SM3_256: 32,
    TpmAlg.SHA3_256: 32,
    TpmAlg.SHA3_384: 48,
    TpmAlg.SHA3_512: 64,
}

_CRYPTO_HASHES: dict[TpmAlg, type[hashes.HashAlgorithm]] = {
    TpmAlg.SHA1: hashes.SHA1,
    TpmAlg.SHA256: hashes.SHA256,
    TpmAlg.SHA384: hashes.SHA384,
    TpmAlg.SHA512: hashes.SHA512,
    TpmAlg.SHA3_256: hashes.SHA3_256,
    TpmAlg.SHA3_384: hashes.SHA3_384,
    TpmAlg.SHA3_512: hashes.SHA3_512,
}


def _alg_text(alg: int) -> str:
    return alg.name.lower() if isinstance(alg, TpmAlg) else f"{alg:#06x}"


def is_hash(alg: int) -> bool:
    """Whether alg is a hash algorithm whose digest size is known."""
    return alg in _DIGEST_SIZES


def digest_size(alg: int) -> int:
    """Digest size in bytes of hash algorithm alg."""
    try:
        return _DIGEST_SIZES[TpmAlg(alg)]
    except (KeyError, ValueError):
        raise EvidenceError(f"{_alg_text(alg)} is not a hash algorithm") from None


def hash_digest(alg: int, data: bytes) -> bytes:
    """H_alg(data)."""
    try:
        name = _HASHLIB_NAMES[TpmAlg(alg)]
    except (KeyError, ValueError):
        raise EvidenceError(f"hash algorithm {_alg_text(alg)} is not supported") from None
    return hashlib.new(name, data).digest()


def crypto_hash(alg: int) -> hashes.HashAlgorithm:
    """The cryptography hash object for alg."""
    try:
        return _CRYPTO_HASHES[TpmAlg(alg)]()
    except (KeyError, ValueError):
        raise EvidenceError(f"hash algorithm {_alg_text(alg)} is not supported") from None
