"""JWT-SVIDs: the token format and its validation (spiffe/spiffe JWT-SVID.md), and the agent's cache.

Tokens are signed by a real CA key, as the authority signs them; PyJWT checks the format from the
outside, as a relying party would.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Sequence
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.fakes import FakeClock
from vouchd.agent.jwtsvids import JwtSvidCache, RevokedTokenError
from vouchd.agent.svids import SvidManager
from vouchd.agent.workload_api.identities import NoIdentityError
from vouchd.authority.ca import CertificateAuthority
from vouchd.entries import Entry
from vouchd.protocol.messages import (
    CredentialResponse,
    IssuedJwtSvid,
    ItemError,
    JwtSvidRequest,
    RevocationDocument,
    RevokedEntry,
    RevokedNode,
    X509SvidRequest,
)
from vouchd.selectors import selector_set
from vouchd.spiffe import (
    MAX_TOKEN_LENGTH,
    InvalidSvidError,
    JwtBundle,
    SpiffeId,
    TrustDomain,
    jwt_key_id,
    mint_jwt_svid,
    validate_jwt_svid,
)

TD = TrustDomain("example.org")
NODE_ID = "spiffe://example.org/vouchd/node/tpm/" + "ab" * 32
DEADLINE = 5.0


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("jwt"), TD)


def key_of(ca: CertificateAuthority) -> ec.EllipticCurvePublicKey:
    key = ca.certificate.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def token(ca: CertificateAuthority, *, audiences: Sequence[str] = ("db",), expires_in: int = 300,
          sub: str = "spiffe://example.org/web", **claims: object) -> str:
    now = int(time.time())
    return mint_jwt_svid(ca.sign, key_id=jwt_key_id(key_of(ca)), spiffe_id=SpiffeId.parse(sub),
                         audiences=audiences, issued_at=now, expires_at=now + expires_in, claims=claims)


def bundle(ca: CertificateAuthority) -> JwtBundle:
    return JwtBundle.from_jwks(TD, JwtBundle.of(TD, [key_of(ca)]).to_jwks())


# --- the format ---------------------------------------------------------------------------------


def test_a_jwt_svid_is_what_the_spec_and_a_relying_party_expect(ca: CertificateAuthority) -> None:
    minted = token(ca, audiences=("db", "cache"), vouchd_tier="hardware")
    header = jwt.get_unverified_header(minted)
    assert header == {"alg": "ES256", "kid": jwt_key_id(key_of(ca)), "typ": "JWT"}

    claims = jwt.decode(minted, key_of(ca), algorithms=["ES256"], audience="cache")

    assert claims["sub"] == "spiffe://example.org/web" and claims["aud"] == ["db", "cache"]
    assert claims["exp"] - claims["iat"] == 300 and claims["vouchd_tier"] == "hardware"


def test_the_jwks_carries_use_and_kid_and_round_trips(ca: CertificateAuthority) -> None:
    document = json.loads(JwtBundle.of(TD, [key_of(ca)]).to_jwks())

    (jwk,) = document["keys"]
    assert jwk["use"] == "jwt-svid" and jwk["kid"] == jwt_key_id(key_of(ca))
    assert jwk["kty"] == "EC" and jwk["crv"] == "P-256"
    assert jwt.PyJWK(jwk, "ES256").key.public_numbers() == key_of(ca).public_numbers()
    assert bundle(ca).keys == {jwk["kid"]: key_of(ca)}


def test_a_valid_token_validates(ca: CertificateAuthority) -> None:
    validated = validate_jwt_svid(token(ca), bundle(ca), audience="db", now=time.time())

    assert str(validated.spiffe_id) == "spiffe://example.org/web"


def _tampered(minted: str, **changes: object) -> str:
    header, payload, signature = minted.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=="))
    claims.update(changes)
    forged = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda ca, other: token(ca, expires_in=-1), "jwt-svid has expired"),
        (lambda ca, other: token(ca, audiences=("cache",)), "jwt-svid is not for this audience"),
        (lambda ca, other: token(other), "jwt-svid key id is not in the jwt bundle of example.org"),
        (lambda ca, other: _tampered(token(ca), sub="spiffe://example.org/admin"), "signature does not verify"),
        (lambda ca, other: token(ca, sub="spiffe://elsewhere.org/web"), "not in the trust domain example.org"),
        (lambda ca, other: "a.b", "not a compact JWS"),
        (lambda ca, other: "x" * (MAX_TOKEN_LENGTH + 1), "longer than"),
        (lambda ca, other: jwt.encode({"sub": "spiffe://example.org/web", "aud": "db", "exp": 2**40}, "s" * 32,
                                      algorithm="HS256", headers={"kid": jwt_key_id(key_of(ca))}),
         "algorithm 'HS256' is not ES256"),
    ],
    ids=["expired", "audience", "unknown-key", "tampered", "other-trust-domain", "not-jws", "too-long", "hs256"],
)
def test_a_bad_token_is_refused_naming_why(ca: CertificateAuthority, tmp_path: Path, make: object,
                                           message: str) -> None:
    other = CertificateAuthority.load_or_create(tmp_path, TD)
    bad = make(ca, other)  # type: ignore[operator]

    with pytest.raises(InvalidSvidError, match=message):
        validate_jwt_svid(bad, bundle(ca), audience="db", now=time.time())


# --- the agent's cache --------------------------------------------------------------------------


def entry(name: str, uid: int, revision: int = 1) -> Entry:
    return Entry(id=name, spiffe_id=SpiffeId.parse(f"spiffe://example.org/{name}"),
                 selectors=selector_set([f"unix:uid:{uid}"]), revision=revision, hint=name)


class FakeNode:
    """Issues real JWT-SVIDs like the authority (same signing, same claims); counts requests."""

    node_id = NODE_ID

    def __init__(self, ca: CertificateAuthority, entries: Sequence[Entry], clock: FakeClock) -> None:
        self.ca = ca
        self.entries = {e.id: e for e in entries}
        self.clock = clock
        self.requests: list[tuple[tuple[str, ...], ...]] = []
        self.revocations: RevocationDocument | None = None
        self.refuse: set[str] = set()

    async def request(self, *, x509_svids: Sequence[X509SvidRequest] = (), sync_entries: bool = False,
                      jwt_svids: Sequence[JwtSvidRequest] = ()) -> CredentialResponse:
        self.requests.append(tuple(r.audiences for r in jwt_svids))
        await asyncio.sleep(0)
        issued, errors = [], []
        now = int(self.clock.now())
        for item in jwt_svids:
            if item.entry_id in self.refuse:
                errors.append(ItemError(item.entry_id, "not_authorized", "entry is not assigned to this node"))
                continue
            e = self.entries[item.entry_id]
            minted = mint_jwt_svid(self.ca.sign, key_id=jwt_key_id(key_of(self.ca)), spiffe_id=e.spiffe_id,
                                   audiences=item.audiences, issued_at=now, expires_at=now + 300,
                                   claims={"vouchd_entry": e.id, "vouchd_rev": e.revision, "vouchd_node": NODE_ID})
            issued.append(IssuedJwtSvid(e.id, str(e.spiffe_id), item.audiences, minted, now + 300))
        return CredentialResponse(x509_svids=(), errors=tuple(errors), entries=tuple(self.entries.values()),
                                  bundle=self.ca.bundle().der(), nonce=b"n", nonce_expires_at=now + 30,
                                  jwt_svids=tuple(issued), jwt_bundle=self.jwt_bundle())

    def bundle_der(self) -> bytes:
        return self.ca.bundle().der()

    def jwt_bundle(self) -> bytes:
        return JwtBundle.of(TD, [key_of(self.ca)]).to_jwks()


async def cache_with(ca: CertificateAuthority, *entries: Entry) -> tuple[JwtSvidCache, FakeNode, FakeClock]:
    clock = FakeClock(time.time())
    node = FakeNode(ca, entries, clock)
    manager = SvidManager(node, clock=clock)  # type: ignore[arg-type]
    await manager.set_entries(entries)
    return JwtSvidCache(node, manager, TD, clock=clock), node, clock  # type: ignore[arg-type]


async def test_tokens_are_cached_per_audience_set_until_half_their_lifetime(ca: CertificateAuthority) -> None:
    cache, node, clock = await cache_with(ca, entry("web", 1000))
    caller = selector_set(["unix:uid:1000"])
    async with asyncio.timeout(DEADLINE):
        first = await cache.jwt_svids(caller, ["db"])
        assert await cache.jwt_svids(caller, ["db"]) == first
        other = await cache.jwt_svids(caller, ["db", "cache"])
        clock.advance(151)
        renewed = await cache.jwt_svids(caller, ["db"])

    assert node.requests == [(("db",),), (("db", "cache"),), (("db",),)]
    assert other[0].token != first[0].token and renewed[0].token != first[0].token
    assert jwt.decode(first[0].token, key_of(ca), algorithms=["ES256"], audience="db")["sub"] == \
        "spiffe://example.org/web"


async def test_callers_asking_at_once_share_one_request(ca: CertificateAuthority) -> None:
    cache, node, _ = await cache_with(ca, entry("web", 1000))
    caller = selector_set(["unix:uid:1000"])
    async with asyncio.timeout(DEADLINE):
        results = await asyncio.gather(*(cache.jwt_svids(caller, ["db"]) for _ in range(10)))

    assert len(node.requests) == 1
    assert len({r[0].token for r in results}) == 1


async def test_only_the_callers_entries_and_only_the_named_id(ca: CertificateAuthority) -> None:
    cache, _, _ = await cache_with(ca, entry("web", 1000), entry("batch", 1000), entry("other", 2000))
    caller = selector_set(["unix:uid:1000"])
    async with asyncio.timeout(DEADLINE):
        assert [s.spiffe_id for s in await cache.jwt_svids(caller, ["db"])] == \
            ["spiffe://example.org/batch", "spiffe://example.org/web"]
        assert [s.spiffe_id for s in await cache.jwt_svids(caller, ["db"], "spiffe://example.org/web")] == \
            ["spiffe://example.org/web"]
        with pytest.raises(NoIdentityError, match=r"with the SPIFFE ID spiffe://example\.org/other"):
            await cache.jwt_svids(caller, ["db"], "spiffe://example.org/other")
        with pytest.raises(NoIdentityError, match="no registration entry matches"):
            await cache.jwt_svids(selector_set(["unix:uid:3000"]), ["db"])


async def test_a_refused_entry_is_named(ca: CertificateAuthority) -> None:
    cache, node, _ = await cache_with(ca, entry("web", 1000))
    node.refuse.add("web")

    with pytest.raises(NoIdentityError, match="not_authorized: entry is not assigned to this node"):
        await asyncio.wait_for(cache.jwt_svids(selector_set(["unix:uid:1000"]), ["db"]), DEADLINE)


async def test_validation_refuses_a_good_token_of_a_revoked_entry_or_node(ca: CertificateAuthority) -> None:
    cache, node, _ = await cache_with(ca, entry("web", 1000, revision=2))
    (issued,) = await asyncio.wait_for(cache.jwt_svids(selector_set(["unix:uid:1000"]), ["db"]), DEADLINE)
    assert cache.validate(issued.token, "db")[0] == "spiffe://example.org/web"

    node.revocations = RevocationDocument(version=1, issued_at=0, next_update=2**40,
                                          entries=(RevokedEntry("web", below_revision=3),))
    with pytest.raises(RevokedTokenError, match="registration entry was deleted or changed"):
        cache.validate(issued.token, "db")

    node.revocations = RevocationDocument(version=2, issued_at=0, next_update=2**40,
                                          nodes=(RevokedNode(NODE_ID, "stolen", before=0, banned=True),))
    with pytest.raises(RevokedTokenError, match="node that obtained it is banned"):
        cache.validate(issued.token, "db")

    node.revocations = RevocationDocument(version=3, issued_at=0, next_update=2**40,
                                          entries=(RevokedEntry("web", below_revision=2),))
    assert cache.validate(issued.token, "db")[0] == "spiffe://example.org/web", "an older revision's revocation"
