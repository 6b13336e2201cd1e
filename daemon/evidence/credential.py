"""TPM2_MakeCredential in software (TPM 2.0 Part 1 §24, Part 3 §12.6).

The credential can only be recovered by TPM2_ActivateCredential on the TPM holding the EK's
private key, and only for an object whose name is `object_name` loaded in that same TPM: this
is how the authority learns that the AK lives next to the EK.
"""

from __future__ import annotations

import hmac
import os

from cryptography.hazmat.decrepit.ciphers.modes import CFB
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

from vouchd.evidence import _wire
from vouchd.evidence.algorithms import TpmAlg, crypto_hash, digest_size, hash_digest, is_hash
from vouchd.evidence.errors import EvidenceError
from vouchd.evidence.structures import ObjectAttributes, TpmPublic

__all__ = ["make_credential"]

_IDENTITY_LABEL = b"IDENTITY"
_STORAGE_LABEL = b"STORAGE"
_INTEGRITY_LABEL = b"INTEGRITY"
_AES_BLOCK = 16


def _kdfa(hash_alg: TpmAlg, key: bytes, label: bytes, context: bytes, bits: int) -> bytes:
    """SP800-108 counter-mode KDF with HMAC (TPM 2.0 Part 1 §11.4.10.2); `context` is
    contextU || contextV."""
    out = b""
    counter = 1
    while len(out) * 8 < bits:
        block = _wire.u32(counter) + label + b"\0" + context + _wire.u32(bits)
        out += hmac.new(key, block, hash_alg.name.lower()).digest()
        counter += 1
    return out[: bits // 8]


def _kdfe(hash_alg: TpmAlg, z: bytes, label: bytes, party_info: bytes, bits: int) -> bytes:
    """SP800-56A concatenation KDF (TPM 2.0 Part 1 §11.4.10.3); `party_info` is
    partyUInfo || partyVInfo."""
    out = b""
    counter = 1
    while len(out) * 8 < bits:
        out += hash_digest(hash_alg, _wire.u32(counter) + z + label + b"\0" + party_info)
        counter += 1
    return out[: bits // 8]


def _check_name(name: bytes) -> None:
    if len(name) < 2 or not is_hash(int.from_bytes(name[:2], "big")):
        raise EvidenceError("object name does not start with a hash algorithm")
    if len(name) != 2 + digest_size(int.from_bytes(name[:2], "big")):
        raise EvidenceError("object name digest does not match its algorithm's size")


def _check_ek(ek: TpmPublic) -> None:
    required = ObjectAttributes.RESTRICTED | ObjectAttributes.DECRYPT
    if ek.attributes & required != required:
        raise EvidenceError("ek is not a restricted decryption key")
    if ek.symmetric_alg is not TpmAlg.AES or ek.symmetric_bits not in (128, 256):
        raise EvidenceError("ek symmetric algorithm is not aes-128 or aes-256")
    if ek.name_alg not in (TpmAlg.SHA256, TpmAlg.SHA384, TpmAlg.SHA512):
        raise EvidenceError("ek name algorithm is not sha256, sha384 or sha512")


def _seed(ek: TpmPublic, seed_size: int) -> tuple[bytes, bytes]:
    """A fresh seed and its encryption to the EK (the TPM2B_ENCRYPTED_SECRET contents)."""
    key = ek.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        seed = os.urandom(seed_size)
        hash_algorithm = crypto_hash(ek.name_alg)
        oaep = padding.OAEP(mgf=padding.MGF1(hash_algorithm), algorithm=hash_algorithm,
                            label=_IDENTITY_LABEL + b"\0")
        return seed, key.encrypt(seed, oaep)
    ephemeral = ec.generate_private_key(key.curve)
    z = ephemeral.exchange(ec.ECDH(), key)
    coordinate_size = (key.curve.key_size + 7) // 8
    numbers = ephemeral.public_key().public_numbers()
    x = numbers.x.to_bytes(coordinate_size, "big")
    y = numbers.y.to_bytes(coordinate_size, "big")
    # The TPM feeds its own stored x coordinate into KDFe, so use unique.x exactly as stored.
    seed = _kdfe(ek.name_alg, z, _IDENTITY_LABEL, x + ek.unique[0], seed_size * 8)
    return seed, _wire.sized(x) + _wire.sized(y)


def make_credential(ek: TpmPublic, secret: bytes, object_name: bytes) -> tuple[bytes, bytes]:
    """Wrap `secret` for the TPM holding `ek`, bound to the object named `object_name`.

    Returns (TPM2B_ID_OBJECT, TPM2B_ENCRYPTED_SECRET), both with their u16 size prefix, ready
    for TPM2_ActivateCredential. `secret` may be 1 to digest-size(ek.name_alg) bytes.
    """
    _check_ek(ek)
    _check_name(object_name)
    seed_size = digest_size(ek.name_alg)
    if not 0 < len(secret) <= seed_size:
        raise EvidenceError(f"credential secret must be 1 to {seed_size} bytes")
    seed, encrypted_seed = _seed(ek, seed_size)
    symmetric_key = _kdfa(ek.name_alg, seed, _STORAGE_LABEL, object_name, ek.symmetric_bits)
    # A zero IV is what the TPM uses: the key is fresh for every credential (derived from a new seed).
    encryptor = Cipher(algorithms.AES(symmetric_key), CFB(b"\0" * _AES_BLOCK)).encryptor()
    encrypted_identity = encryptor.update(_wire.sized(secret)) + encryptor.finalize()
    hmac_key = _kdfa(ek.name_alg, seed, _INTEGRITY_LABEL, b"", seed_size * 8)
    outer_hmac = hmac.new(hmac_key, encrypted_identity + object_name, ek.name_alg.name.lower()).digest()
    id_object = _wire.sized(_wire.sized(outer_hmac) + encrypted_identity)
    return id_object, _wire.sized(encrypted_seed)
