"""JWT-SVIDs (spiffe/spiffe standards/JWT-SVID.md): minting, JWT bundles (JWKS), validation.

A JWT-SVID is a JWS in compact form: header `alg` (ES256 here), `kid`, `typ: JWT`; claims `sub`
(the SPIFFE ID), `aud` (one or more audiences), `exp`, `iat`, plus vouchd's `vouchd_tier` and the
claims the agent needs to refuse a revoked token at validation (`vouchd_entry`, `vouchd_rev`,
`vouchd_node`). The JWT bundle of a trust domain is a JWKS whose keys carry `use: jwt-svid` and a
`kid`. Nothing here reads the clock: callers pass `now`.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from vouchd.spiffe.certificates import spki_der
from vouchd.spiffe.errors import InvalidBundleError, InvalidSvidError, SpiffeError
from vouchd.spiffe.ids import SpiffeId, TrustDomain

__all__ = [
    "MAX_AUDIENCES",
    "MAX_AUDIENCE_LENGTH",
    "MAX_TOKEN_LENGTH",
    "JwtBundle",
    "ValidatedJwtSvid",
    "jwt_key_id",
    "mint_jwt_svid",
    "validate_jwt_svid",
]

# Bounds on what a caller may ask for or hand in, the same at the Workload API and the authority: a
# workload names the one or two services it calls (16 leave room), 512 characters fit any URL used as
# an audience, and a token with all of them is under 12 KiB.
MAX_TOKEN_LENGTH = 16 * 1024
MAX_AUDIENCES = 16
MAX_AUDIENCE_LENGTH = 512

_ALGORITHM = "ES256"
_P256_COORDINATE = 32
_SIGNATURE = ec.ECDSA(hashes.SHA256())
_TYPES = ("JWT", "JOSE")  # the spec allows typ to be absent, JWT or JOSE


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str, what: str) -> bytes:
    if not text or len(text) % 4 == 1 or not all(c.isalnum() or c in "-_" for c in text):
        raise InvalidSvidError(f"jwt-svid {what} is not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _json(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), sort_keys=True).encode()


def jwt_key_id(public_key: ec.EllipticCurvePublicKey) -> str:
    """A key's `kid`: base64url of the first 24 bytes of sha256(SubjectPublicKeyInfo DER)."""
    return _b64(hashlib.sha256(spki_der(public_key)).digest()[:24])


def mint_jwt_svid(sign: Callable[[bytes], bytes], *, key_id: str, spiffe_id: SpiffeId, audiences: Sequence[str],
                  issued_at: int, expires_at: int, claims: Mapping[str, Any] | None = None) -> str:
    """A compact JWS. `sign` returns a DER ECDSA P-256/SHA-256 signature over its input (the CA keeps
    the key); `claims` adds vouchd's own claims, never overriding the registered ones."""
    if not audiences:
        raise InvalidSvidError("a jwt-svid needs at least one audience")
    header = {"alg": _ALGORITHM, "kid": key_id, "typ": "JWT"}
    payload = {**dict(claims or {}), "sub": str(spiffe_id), "aud": list(audiences), "iat": issued_at, "exp": expires_at}
    signing_input = f"{_b64(_json(header))}.{_b64(_json(payload))}".encode("ascii")
    r, s = decode_dss_signature(sign(signing_input))
    raw = r.to_bytes(_P256_COORDINATE, "big") + s.to_bytes(_P256_COORDINATE, "big")
    return f"{signing_input.decode('ascii')}.{_b64(raw)}"


@dataclass(frozen=True)
class JwtBundle:
    """The JWT authorities of a trust domain, by key id."""

    trust_domain: TrustDomain
    keys: Mapping[str, ec.EllipticCurvePublicKey] = field(default_factory=dict)

    @classmethod
    def of(cls, trust_domain: TrustDomain, keys: Sequence[ec.EllipticCurvePublicKey]) -> JwtBundle:
        return cls(trust_domain, {jwt_key_id(key): key for key in keys})

    def to_jwks(self) -> bytes:
        """The JWKS document the Workload API hands out (FetchJWTBundles), keys in kid order."""
        entries = []
        for kid in sorted(self.keys):
            numbers = self.keys[kid].public_numbers()
            entries.append({
                "kty": "EC", "crv": "P-256", "use": "jwt-svid", "kid": kid,
                "x": _b64(numbers.x.to_bytes(_P256_COORDINATE, "big")),
                "y": _b64(numbers.y.to_bytes(_P256_COORDINATE, "big")),
            })
        return _json({"keys": entries})

    @classmethod
    def from_jwks(cls, trust_domain: TrustDomain, data: bytes) -> JwtBundle:
        try:
            document = json.loads(data)
            keys = {}
            for jwk in document["keys"]:
                if jwk.get("kty") != "EC" or jwk.get("crv") != "P-256" or jwk.get("use") != "jwt-svid":
                    continue  # not a key this trust domain signs JWT-SVIDs with
                x = int.from_bytes(_unb64(jwk["x"], "jwk x"), "big")
                y = int.from_bytes(_unb64(jwk["y"], "jwk y"), "big")
                keys[str(jwk["kid"])] = ec.EllipticCurvePublicNumbers(x, y, ec.SECP256R1()).public_key()
        except (ValueError, KeyError, TypeError, AttributeError, InvalidSvidError) as err:
            # What kind of thing was wrong, never the document's text (it came from the network).
            if isinstance(err, (json.JSONDecodeError, UnicodeDecodeError)):
                what = "not JSON"
            elif isinstance(err, InvalidSvidError):
                what = "a key coordinate is not base64url"
            elif isinstance(err, KeyError):
                what = f"a key has no {err.args[0]!s:.10}" if err.args and isinstance(err.args[0], str) else "no keys"
            else:
                what = f"unexpected structure ({type(err).__name__})"
            raise InvalidBundleError(f"jwt bundle of {trust_domain} is not a JWKS of P-256 keys: {what}") from None
        return cls(trust_domain, keys)


@dataclass(frozen=True)
class ValidatedJwtSvid:
    spiffe_id: SpiffeId
    claims: Mapping[str, Any]


def validate_jwt_svid(token: str, bundle: JwtBundle, *, audience: str, now: float) -> ValidatedJwtSvid:
    """The token's SPIFFE ID and claims, once everything the spec demands holds; InvalidSvidError
    naming the first thing that does not (never echoing the token)."""
    if len(token) > MAX_TOKEN_LENGTH:
        raise InvalidSvidError(f"jwt-svid is longer than {MAX_TOKEN_LENGTH} characters")
    parts = token.split(".")
    if len(parts) != 3:
        raise InvalidSvidError("jwt-svid is not a compact JWS (three dot-separated parts)")
    try:
        header = json.loads(_unb64(parts[0], "header"))
        claims = json.loads(_unb64(parts[1], "payload"))
    except ValueError:
        raise InvalidSvidError("jwt-svid header or payload is not JSON") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise InvalidSvidError("jwt-svid header or payload is not a JSON object")
    if header.get("alg") != _ALGORITHM:
        raise InvalidSvidError(f"jwt-svid algorithm {str(header.get('alg'))[:20]!r} is not {_ALGORITHM}")
    if "typ" in header and header["typ"] not in _TYPES:
        raise InvalidSvidError("jwt-svid typ is neither JWT nor JOSE")
    key = bundle.keys.get(str(header.get("kid")))
    if key is None:
        raise InvalidSvidError(f"jwt-svid key id is not in the jwt bundle of {bundle.trust_domain}")
    signature = _unb64(parts[2], "signature")
    if len(signature) != 2 * _P256_COORDINATE:
        raise InvalidSvidError("jwt-svid signature has the wrong length")
    der = encode_dss_signature(int.from_bytes(signature[:_P256_COORDINATE], "big"),
                               int.from_bytes(signature[_P256_COORDINATE:], "big"))
    try:
        key.verify(der, f"{parts[0]}.{parts[1]}".encode("ascii"), _SIGNATURE)
    except InvalidSignature:
        raise InvalidSvidError("jwt-svid signature does not verify") from None
    expires = claims.get("exp")
    if isinstance(expires, bool) or not isinstance(expires, int | float):
        raise InvalidSvidError("jwt-svid has no exp claim")
    if expires <= now:
        raise InvalidSvidError("jwt-svid has expired")
    audiences = claims.get("aud")
    listed = [audiences] if isinstance(audiences, str) else audiences if isinstance(audiences, list) else []
    if audience not in listed:
        raise InvalidSvidError("jwt-svid is not for this audience")
    try:
        spiffe_id = SpiffeId.parse(str(claims.get("sub")))
    except SpiffeError:
        raise InvalidSvidError("jwt-svid sub is not a SPIFFE ID") from None
    if not spiffe_id.is_member_of(bundle.trust_domain):
        raise InvalidSvidError(f"jwt-svid sub is not in the trust domain {bundle.trust_domain}")
    return ValidatedJwtSvid(spiffe_id, claims)
