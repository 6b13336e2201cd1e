"""TPMT_SIGNATURE verification with `cryptography`."""

from __future__ import annotations

from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from vouchd.evidence import _wire
from vouchd.evidence.algorithms import TpmAlg, crypto_hash
from vouchd.evidence.errors import MalformedStructureError, VerificationError
from vouchd.evidence.structures import TpmPublic

__all__ = ["TpmSignature", "verify_signature"]

# SHA-1 signatures are forgeable in practice (chosen-prefix collisions): never accept them.
_SIGNATURE_HASHES = frozenset({TpmAlg.SHA256, TpmAlg.SHA384, TpmAlg.SHA512})
_MAX_SIGNATURE_PART = 512


@dataclass(frozen=True)
class TpmSignature:
    """A decoded TPMT_SIGNATURE: ECDSA carries (r, s), RSASSA and RSAPSS one value."""

    scheme: TpmAlg
    hash_alg: TpmAlg
    parts: tuple[bytes, ...]

    @classmethod
    def parse(cls, data: bytes) -> TpmSignature:
        r = _wire.Reader(data, "TPMT_SIGNATURE")
        scheme = r.enum16(TpmAlg, "sigAlg")
        hash_alg = r.enum16(TpmAlg, "signature.hash")
        if scheme is TpmAlg.ECDSA:
            parts: tuple[bytes, ...] = (r.sized("signature.signatureR", max_size=_MAX_SIGNATURE_PART),
                                        r.sized("signature.signatureS", max_size=_MAX_SIGNATURE_PART))
        elif scheme in (TpmAlg.RSASSA, TpmAlg.RSAPSS):
            parts = (r.sized("signature.sig", max_size=_MAX_SIGNATURE_PART),)
        else:
            raise MalformedStructureError(
                f"TPMT_SIGNATURE sigAlg {scheme.name.lower()} is not supported")
        r.finish()
        return cls(scheme, hash_alg, parts)


def verify_signature(key: TpmPublic, signature: bytes, message: bytes) -> None:
    """Check that `signature` (a marshaled TPMT_SIGNATURE: ECDSA, RSASSA or RSAPSS) is `key`'s
    signature over `message`. When the key has a fixed scheme (as every restricted key does) the
    signature must use exactly that scheme and hash."""
    parsed = TpmSignature.parse(signature)
    if parsed.hash_alg not in _SIGNATURE_HASHES:
        raise VerificationError(f"signature hash {parsed.hash_alg.name.lower()} is not accepted")
    if key.scheme is not TpmAlg.NULL and (parsed.scheme, parsed.hash_alg) != (key.scheme, key.scheme_hash):
        raise VerificationError("signature scheme does not match the signing key's scheme")
    public_key = key.public_key()
    hash_algorithm = crypto_hash(parsed.hash_alg)
    try:
        if parsed.scheme is TpmAlg.ECDSA:
            if not isinstance(public_key, ec.EllipticCurvePublicKey):
                raise VerificationError("ecdsa signature from a key that is not ecc")
            r, s = (int.from_bytes(part, "big") for part in parsed.parts)
            public_key.verify(encode_dss_signature(r, s), message, ec.ECDSA(hash_algorithm))
            return
        if not isinstance(public_key, rsa.RSAPublicKey):
            raise VerificationError(f"{parsed.scheme.name.lower()} signature from a key that is not rsa")
        if parsed.scheme is TpmAlg.RSASSA:
            scheme: padding.AsymmetricPadding = padding.PKCS1v15()
        else:
            # TPMs use the largest salt that fits for PSS; AUTO accepts that and a digest-sized one.
            scheme = padding.PSS(mgf=padding.MGF1(hash_algorithm), salt_length=padding.PSS.AUTO)
        public_key.verify(parsed.parts[0], message, scheme, hash_algorithm)
    except InvalidSignature:
        raise VerificationError("signature does not verify with the signing key") from None
