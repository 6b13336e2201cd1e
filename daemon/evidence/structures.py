"""TPM 2.0 structures the authority reads: TPMT_PUBLIC, TPML_PCR_SELECTION and TPMS_ATTEST.

Parsers are strict: every length is checked, unknown algorithms and types are refused and
trailing bytes are an error, so that what was signed is exactly what was understood.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from vouchd.evidence import _wire
from vouchd.evidence.algorithms import EccCurve, TpmAlg, hash_digest, is_hash
from vouchd.evidence.errors import EvidenceError, MalformedStructureError

__all__ = [
    "Attest",
    "AttestType",
    "ClockInfo",
    "EccCurve",
    "ObjectAttributes",
    "PcrSelection",
    "TpmAlg",
    "TpmPublic",
]

TPM_GENERATED_VALUE = 0xFF544347
PCR_COUNT = 24
_PCR_SELECT_SIZE = 3  # bytes of bitmap for 24 PCRs, what tpm2-tss and every PC Client TPM use
_MAX_PCR_SELECT_SIZE = 4  # TPM 2.0 Part 2 PCR_SELECT_MAX for up to 32 PCRs
_MAX_PCR_BANKS = 16
_MAX_DIGEST = 64
_MAX_NAME = 2 + _MAX_DIGEST  # TPMU_NAME: a TPMT_HA (alg + digest) or a 4-byte handle
_MAX_DATA = 2 + _MAX_DIGEST  # TPM2B_DATA is sized like a TPMT_HA
_MAX_RSA_BYTES = 512
_MAX_ECC_BYTES = 66

_CURVES: dict[EccCurve, ec.EllipticCurve] = {
    EccCurve.NIST_P256: ec.SECP256R1(),
    EccCurve.NIST_P384: ec.SECP384R1(),
    EccCurve.NIST_P521: ec.SECP521R1(),
}
_DEFAULT_RSA_EXPONENT = 65537  # a TPMT_PUBLIC exponent of 0 means this value

_OBJECT_SYMMETRIC = frozenset({TpmAlg.AES, TpmAlg.SM4, TpmAlg.CAMELLIA})
_RSA_SCHEMES = frozenset({TpmAlg.RSASSA, TpmAlg.RSAPSS, TpmAlg.RSAES, TpmAlg.OAEP})
_ECC_SCHEMES = frozenset(
    {TpmAlg.ECDSA, TpmAlg.ECDAA, TpmAlg.SM2, TpmAlg.ECSCHNORR, TpmAlg.ECDH, TpmAlg.ECMQV})
_KDF_SCHEMES = frozenset({TpmAlg.MGF1, TpmAlg.KDF1_SP800_56A, TpmAlg.KDF2, TpmAlg.KDF1_SP800_108})


class ObjectAttributes(enum.IntFlag):
    """TPMA_OBJECT bits (TPM 2.0 Part 2 §8.3)."""

    FIXED_TPM = 1 << 1
    ST_CLEAR = 1 << 2
    FIXED_PARENT = 1 << 4
    SENSITIVE_DATA_ORIGIN = 1 << 5
    USER_WITH_AUTH = 1 << 6
    ADMIN_WITH_POLICY = 1 << 7
    NO_DA = 1 << 10
    ENCRYPTED_DUPLICATION = 1 << 11
    RESTRICTED = 1 << 16
    DECRYPT = 1 << 17
    SIGN_ENCRYPT = 1 << 18
    X509_SIGN = 1 << 19


def _hash_alg(reader: _wire.Reader, field: str, *, allow_null: bool) -> TpmAlg:
    alg = reader.enum16(TpmAlg, field)
    if not (is_hash(alg) or (allow_null and alg is TpmAlg.NULL)):
        raise MalformedStructureError(f"{reader.structure} {field} {alg.name.lower()} is not a hash")
    return alg


@dataclass(frozen=True)
class TpmPublic:
    """A TPMT_PUBLIC: the public area of a TPM object. `raw` is its exact marshaled form, from
    which the object's name is computed; the other fields are decoded from it."""

    type: TpmAlg
    name_alg: TpmAlg
    attributes: ObjectAttributes
    auth_policy: bytes
    symmetric_alg: TpmAlg
    symmetric_bits: int
    scheme: TpmAlg
    scheme_hash: TpmAlg
    curve: EccCurve | None
    rsa_bits: int
    rsa_exponent: int
    unique: tuple[bytes, ...]
    raw: bytes

    @classmethod
    def from_tpm2b(cls, data: bytes) -> TpmPublic:
        """Parse a TPM2B_PUBLIC (u16 size, then a TPMT_PUBLIC of exactly that size)."""
        reader = _wire.Reader(data, "TPM2B_PUBLIC")
        inner = reader.sized("publicArea")
        reader.finish()
        return cls.from_tpmt(inner)

    @classmethod
    def from_tpmt(cls, data: bytes) -> TpmPublic:
        """Parse a marshaled TPMT_PUBLIC with nothing after it."""
        r = _wire.Reader(data, "TPMT_PUBLIC")
        object_type = r.enum16(TpmAlg, "type")
        name_alg = _hash_alg(r, "nameAlg", allow_null=True)
        attributes = ObjectAttributes(r.u32("objectAttributes"))
        auth_policy = r.sized("authPolicy", max_size=_MAX_DIGEST)
        symmetric_alg, symmetric_bits = TpmAlg.NULL, 0
        scheme, scheme_hash = TpmAlg.NULL, TpmAlg.NULL
        curve: EccCurve | None = None
        rsa_bits = rsa_exponent = 0
        if object_type is TpmAlg.KEYEDHASH:
            scheme = r.enum16(TpmAlg, "parameters.scheme")
            if scheme in (TpmAlg.HMAC, TpmAlg.XOR):
                scheme_hash = _hash_alg(r, "parameters.scheme.hashAlg", allow_null=False)
                if scheme is TpmAlg.XOR:
                    _read_kdf(r, "parameters.scheme.kdf")
            elif scheme is not TpmAlg.NULL:
                raise MalformedStructureError(
                    f"TPMT_PUBLIC parameters.scheme {scheme.name.lower()} is not a keyedhash scheme")
            unique: tuple[bytes, ...] = (r.sized("unique", max_size=_MAX_DIGEST),)
        elif object_type is TpmAlg.SYMCIPHER:
            symmetric_alg, symmetric_bits = _read_symmetric(r)
            unique = (r.sized("unique", max_size=_MAX_DIGEST),)
        elif object_type is TpmAlg.RSA:
            symmetric_alg, symmetric_bits = _read_symmetric(r)
            scheme, scheme_hash = _read_scheme(r, _RSA_SCHEMES)
            rsa_bits = r.u16("parameters.keyBits")
            rsa_exponent = r.u32("parameters.exponent")
            unique = (r.sized("unique.rsa", max_size=_MAX_RSA_BYTES),)
        elif object_type is TpmAlg.ECC:
            symmetric_alg, symmetric_bits = _read_symmetric(r)
            scheme, scheme_hash = _read_scheme(r, _ECC_SCHEMES)
            curve = r.enum16(EccCurve, "parameters.curveID")
            _read_kdf(r, "parameters.kdf")
            unique = (r.sized("unique.ecc.x", max_size=_MAX_ECC_BYTES),
                      r.sized("unique.ecc.y", max_size=_MAX_ECC_BYTES))
        else:
            raise MalformedStructureError(
                f"TPMT_PUBLIC type {object_type.name.lower()} is not an object type")
        r.finish()
        return cls(type=object_type, name_alg=name_alg, attributes=attributes,
                   auth_policy=auth_policy, symmetric_alg=symmetric_alg,
                   symmetric_bits=symmetric_bits, scheme=scheme, scheme_hash=scheme_hash,
                   curve=curve, rsa_bits=rsa_bits, rsa_exponent=rsa_exponent, unique=unique,
                   raw=bytes(data))

    def to_tpm2b(self) -> bytes:
        """The TPM2B_PUBLIC form: u16 size, then `raw`."""
        return _wire.sized(self.raw)

    @property
    def name(self) -> bytes:
        """The object's TPM name (TPM2B_NAME contents): u16 nameAlg || H_nameAlg(raw)."""
        if self.name_alg is TpmAlg.NULL:
            raise EvidenceError("TPMT_PUBLIC with nameAlg null has no digest name")
        return _wire.u16(self.name_alg) + hash_digest(self.name_alg, self.raw)

    def public_key(self) -> ec.EllipticCurvePublicKey | rsa.RSAPublicKey:
        """The public key as a `cryptography` object; MalformedStructureError if `unique` does
        not hold a valid key of the declared type and size."""
        if self.type is TpmAlg.ECC:
            if self.curve is None or len(self.unique) != 2:
                raise MalformedStructureError("TPMT_PUBLIC ecc key has no curve or point")
            curve = _CURVES[self.curve]
            size = (curve.key_size + 7) // 8
            x, y = self.unique
            if not 0 < len(x) <= size or not 0 < len(y) <= size:
                raise MalformedStructureError(
                    f"TPMT_PUBLIC unique.ecc point does not fit curve {self.curve.name.lower()}")
            try:
                return ec.EllipticCurvePublicNumbers(
                    int.from_bytes(x, "big"), int.from_bytes(y, "big"), curve).public_key()
            except ValueError:
                raise MalformedStructureError(
                    f"TPMT_PUBLIC unique.ecc is not a point on {self.curve.name.lower()}") from None
        if self.type is TpmAlg.RSA:
            (modulus,) = self.unique
            if self.rsa_bits not in (1024, 2048, 3072, 4096) or len(modulus) * 8 != self.rsa_bits:
                raise MalformedStructureError(
                    f"TPMT_PUBLIC unique.rsa has {len(modulus) * 8} bits, keyBits says {self.rsa_bits}")
            exponent = self.rsa_exponent or _DEFAULT_RSA_EXPONENT
            try:
                return rsa.RSAPublicNumbers(exponent, int.from_bytes(modulus, "big")).public_key()
            except ValueError:
                raise MalformedStructureError("TPMT_PUBLIC unique.rsa is not a valid rsa key") from None
        raise EvidenceError(f"TPMT_PUBLIC of type {self.type.name.lower()} has no public key")

    def spki_der(self) -> bytes:
        """DER SubjectPublicKeyInfo of public_key() (what an EK hash is computed over)."""
        return self.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _read_symmetric(r: _wire.Reader) -> tuple[TpmAlg, int]:
    alg = r.enum16(TpmAlg, "parameters.symmetric.algorithm")
    if alg is TpmAlg.NULL:
        return alg, 0
    if alg not in _OBJECT_SYMMETRIC:
        raise MalformedStructureError(
            f"TPMT_PUBLIC parameters.symmetric.algorithm {alg.name.lower()} is not a block cipher")
    bits = r.u16("parameters.symmetric.keyBits")
    r.enum16(TpmAlg, "parameters.symmetric.mode")
    return alg, bits


def _read_scheme(r: _wire.Reader, allowed: frozenset[TpmAlg]) -> tuple[TpmAlg, TpmAlg]:
    scheme = r.enum16(TpmAlg, "parameters.scheme")
    if scheme is TpmAlg.NULL or scheme is TpmAlg.RSAES:
        return scheme, TpmAlg.NULL
    if scheme not in allowed:
        raise MalformedStructureError(
            f"TPMT_PUBLIC parameters.scheme {scheme.name.lower()} does not fit the key type")
    scheme_hash = _hash_alg(r, "parameters.scheme.hashAlg", allow_null=False)
    if scheme is TpmAlg.ECDAA:
        r.u16("parameters.scheme.count")
    return scheme, scheme_hash


def _read_kdf(r: _wire.Reader, field: str) -> None:
    kdf = r.enum16(TpmAlg, field)
    if kdf is TpmAlg.NULL:
        return
    if kdf not in _KDF_SCHEMES:
        raise MalformedStructureError(f"TPMT_PUBLIC {field} {kdf.name.lower()} is not a kdf")
    _hash_alg(r, f"{field}.hashAlg", allow_null=False)


@dataclass(frozen=True)
class PcrSelection:
    """The PCRs selected in one bank (one TPMS_PCR_SELECTION)."""

    hash_alg: TpmAlg
    pcrs: tuple[int, ...]

    def __post_init__(self) -> None:
        if not is_hash(self.hash_alg):
            raise EvidenceError(f"pcr selection bank {int(self.hash_alg):#06x} is not a hash algorithm")
        if list(self.pcrs) != sorted(set(self.pcrs)):
            raise EvidenceError("pcr selection indices must be sorted and unique")
        if any(not 0 <= i < PCR_COUNT for i in self.pcrs):
            raise EvidenceError(f"pcr selection indices must be within 0..{PCR_COUNT - 1}")

    @classmethod
    def parse(cls, text: str) -> PcrSelection:
        """Read the tpm2-tools form "sha256:0,1,2" (indices in any order)."""
        bank, sep, indices = text.partition(":")
        try:
            hash_alg = TpmAlg[bank.strip().upper()]
            pcrs = sorted({int(i) for i in indices.split(",")}) if indices.strip() else []
        except (KeyError, ValueError):
            raise EvidenceError(f"pcr selection {text[:80]!r} is not of the form bank:i,j,k") from None
        if not sep:
            raise EvidenceError(f"pcr selection {text[:80]!r} is not of the form bank:i,j,k")
        return cls(hash_alg, tuple(pcrs))

    def to_tpml(self) -> bytes:
        """This bank as a one-element TPML_PCR_SELECTION with a 3-byte bitmap."""
        bitmap = bytearray(_PCR_SELECT_SIZE)
        for i in self.pcrs:
            bitmap[i // 8] |= 1 << (i % 8)
        return _wire.u32(1) + _wire.u16(self.hash_alg) + _wire.u8(_PCR_SELECT_SIZE) + bytes(bitmap)

    def tool_string(self) -> str:
        """The tpm2-tools / tpm2-pytss form, e.g. "sha256:0,1,2"."""
        return f"{self.hash_alg.name.lower()}:{','.join(str(i) for i in self.pcrs)}"


def _read_pcr_selections(r: _wire.Reader, field: str) -> tuple[PcrSelection, ...]:
    count = r.u32(f"{field}.count")
    if count > _MAX_PCR_BANKS:
        raise MalformedStructureError(f"{r.structure} {field}.count {count} is too large")
    banks = []
    for bank in range(count):
        hash_alg = _hash_alg(r, f"{field}[{bank}].hash", allow_null=False)
        size = r.u8(f"{field}[{bank}].sizeofSelect")
        if size > _MAX_PCR_SELECT_SIZE:
            raise MalformedStructureError(
                f"{r.structure} {field}[{bank}].sizeofSelect {size} is too large")
        bitmap = r.take(size, f"{field}[{bank}].pcrSelect")
        pcrs = tuple(i for i in range(8 * size) if bitmap[i // 8] >> (i % 8) & 1)
        if pcrs and pcrs[-1] >= PCR_COUNT:
            raise MalformedStructureError(
                f"{r.structure} {field}[{bank}].pcrSelect selects pcr {pcrs[-1]}")
        banks.append(PcrSelection(hash_alg, pcrs))
    return tuple(banks)


@dataclass(frozen=True)
class ClockInfo:
    """TPMS_CLOCK_INFO: what tells a reboot (reset_count) from a resume (restart_count)."""

    clock: int
    reset_count: int
    restart_count: int
    safe: bool


class AttestType(enum.IntEnum):
    """The TPM_ST tags of the TPMS_ATTEST kinds vouchd verifies."""

    CERTIFY = 0x8017
    QUOTE = 0x8018


@dataclass(frozen=True)
class Attest:
    """A TPMS_ATTEST of a quote or a certify; `raw` is the signed byte string."""

    type: AttestType
    qualified_signer: bytes
    extra_data: bytes
    clock_info: ClockInfo
    firmware_version: int
    pcr_selection: tuple[PcrSelection, ...]
    pcr_digest: bytes
    certified_name: bytes
    certified_qualified_name: bytes
    raw: bytes

    @classmethod
    def parse(cls, data: bytes) -> Attest:
        """Parse a TPMS_ATTEST that starts with TPM_GENERATED_VALUE and has nothing after it."""
        r = _wire.Reader(data, "TPMS_ATTEST")
        magic = r.u32("magic")
        if magic != TPM_GENERATED_VALUE:
            raise MalformedStructureError("TPMS_ATTEST magic is not TPM_GENERATED_VALUE")
        tag = r.u16("type")
        try:
            attest_type = AttestType(tag)
        except ValueError:
            raise MalformedStructureError(f"TPMS_ATTEST type {tag:#06x} is not supported") from None
        qualified_signer = r.sized("qualifiedSigner", max_size=_MAX_NAME)
        extra_data = r.sized("extraData", max_size=_MAX_DATA)
        clock = r.u64("clockInfo.clock")
        reset_count = r.u32("clockInfo.resetCount")
        restart_count = r.u32("clockInfo.restartCount")
        safe = r.u8("clockInfo.safe")
        if safe > 1:
            raise MalformedStructureError(f"TPMS_ATTEST clockInfo.safe {safe} is not yes or no")
        firmware_version = r.u64("firmwareVersion")
        pcr_selection: tuple[PcrSelection, ...] = ()
        pcr_digest = certified_name = certified_qualified_name = b""
        if attest_type is AttestType.QUOTE:
            pcr_selection = _read_pcr_selections(r, "attested.quote.pcrSelect")
            pcr_digest = r.sized("attested.quote.pcrDigest", max_size=_MAX_DIGEST)
        else:
            certified_name = r.sized("attested.certify.name", max_size=_MAX_NAME)
            certified_qualified_name = r.sized("attested.certify.qualifiedName", max_size=_MAX_NAME)
        r.finish()
        return cls(type=attest_type, qualified_signer=qualified_signer, extra_data=extra_data,
                   clock_info=ClockInfo(clock, reset_count, restart_count, bool(safe)),
                   firmware_version=firmware_version, pcr_selection=pcr_selection,
                   pcr_digest=pcr_digest, certified_name=certified_name,
                   certified_qualified_name=certified_qualified_name, raw=bytes(data))

