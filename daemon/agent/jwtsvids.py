"""JWT-SVIDs on the agent: issued per (entry, audience set) against a fresh quote, cached until half
of their lifetime, and validated for workloads (DESIGN §6, spiffe/spiffe standards/JWT-SVID.md).

Which entries a caller gets is the SVID manager's answer (the same match, ban and staleness rules as
for X.509-SVIDs); this module asks the authority for tokens, one quote-bound request for whatever a
caller lacks, and shares a request in flight among callers asking for the same token. Validation
checks the token against the trust domain's JWKS, then against the revocation document: a token of
a revoked entry revision or node is refused although its signature is good.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from vouchd.agent.svids import SvidManager
from vouchd.agent.workload_api.identities import NoIdentityError
from vouchd.clock import SYSTEM_CLOCK, Clock
from vouchd.entries import Entry
from vouchd.protocol.messages import CredentialResponse, JwtSvidRequest, RevocationDocument
from vouchd.selectors import Selector
from vouchd.spiffe import InvalidSvidError, JwtBundle, SpiffeError, TrustDomain, validate_jwt_svid

__all__ = ["JwtSvid", "JwtSvidCache", "JwtSvidSource", "RevokedTokenError"]

log = logging.getLogger("vouchd.agent.jwtsvids")

# Distinct (entry, audiences) tokens kept; beyond, the ones closest to expiry go first. A caller
# asking for ever new audiences costs quotes (bounded by the issuance path), not memory.
MAX_CACHED_TOKENS = 4096


class JwtSvidSource(Protocol):
    """What the cache needs from the node identity."""

    async def request(self, *, jwt_svids: Sequence[JwtSvidRequest] = ()) -> CredentialResponse: ...

    def jwt_bundle(self) -> bytes: ...

    @property
    def revocations(self) -> RevocationDocument | None: ...


class RevokedTokenError(InvalidSvidError):
    """A correctly signed JWT-SVID whose entry revision or node was revoked since."""


@dataclass(frozen=True)
class JwtSvid:
    spiffe_id: str
    token: str
    hint: str
    expires_at: float
    refresh_at: float


_Key = tuple[str, int, tuple[str, ...]]  # entry id, entry revision, audiences in the caller's order


class JwtSvidCache:
    def __init__(self, source: JwtSvidSource, svids: SvidManager, trust_domain: TrustDomain, *,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        self._source = source
        self._svids = svids
        self._trust_domain = trust_domain
        self._clock = clock
        self._tokens: OrderedDict[_Key, JwtSvid] = OrderedDict()
        self._pending: dict[_Key, asyncio.Future[None]] = {}
        svids.parents.add_source(self._expiry)

    def _expiry(self, spiffe_id: str) -> float | None:
        """The latest expiry of this identity's JWT-SVIDs held here (a child's never outlives them)."""
        return max((t.expires_at for t in self._tokens.values() if t.spiffe_id == spiffe_id), default=None)

    async def jwt_svids(self, selectors: frozenset[Selector], audiences: Sequence[str],
                        spiffe_id: str = "", *, ancestors_hold: frozenset[str] = frozenset(),
                        only: frozenset[str] | None = None) -> list[JwtSvid]:
        """The caller's JWT-SVIDs for these audiences (only `spiffe_id`'s when given), issuing the
        missing ones; NoIdentityError when the caller is entitled to none, or none could be issued.
        Never an identity in `ancestors_hold`; never one whose parent identity holds no valid SVID."""
        if self._svids.banned is not None:
            raise NoIdentityError(f"node is banned: {self._svids.banned}")
        entries = [e for e in self._svids.match(selectors, ancestors_hold=ancestors_hold)
                   if (not spiffe_id or str(e.spiffe_id) == spiffe_id) and (only is None or e.id in only)]
        if not entries:
            raise NoIdentityError("no registration entry matches the caller"
                                  + (f" with the SPIFFE ID {spiffe_id[:200]}" if spiffe_id else ""))
        wanted = tuple(audiences)
        now = self._clock.now()
        missing = [e for e in entries if not self._fresh((e.id, e.revision, wanted), now)]
        failure = await self._issue(missing, wanted) if missing else None
        now = self._clock.now()
        tokens = []
        for entry in entries:
            token = self._tokens.get((entry.id, entry.revision, wanted))
            if token is None or token.expires_at <= now:
                continue
            orphaned = self._svids.parents.cap(entry)[1]
            if orphaned is not None:
                failure = failure or orphaned
                continue
            tokens.append(token)
        if not tokens:
            raise NoIdentityError(failure or "no jwt-svid could be issued for the caller")
        return tokens

    def audiences_of(self, spiffe_id: str) -> tuple[str, ...] | None:
        """The audiences this identity holds valid JWT-SVIDs for (a child asks for no others), or None
        when it holds none (then nothing bounds its children's audiences but the policy's other rules)."""
        now = self._clock.now()
        held = {audience for (_, _, audiences), token in self._tokens.items()
                if token.spiffe_id == spiffe_id and token.expires_at > now for audience in audiences}
        return tuple(sorted(held)) if held else None

    def holds(self, entry: Entry, audiences: Sequence[str]) -> bool:
        """Whether a token of `entry` for exactly these audiences is cached and fresh (nothing new issued)."""
        return self._fresh((entry.id, entry.revision, tuple(audiences)), self._clock.now())

    def _fresh(self, key: _Key, now: float) -> bool:
        token = self._tokens.get(key)
        return token is not None and now < token.refresh_at

    async def _issue(self, entries: Sequence[Entry], audiences: tuple[str, ...]) -> str | None:
        """Ask for the tokens of `entries` (once, however many callers ask); the first failure, if any."""
        refusal = self._svids.issuance_refusal()
        if refusal is not None:
            return refusal
        keys = [(e.id, e.revision, audiences) for e in entries]
        waiting = [self._pending[k] for k in keys if k in self._pending]
        mine = [e for e, k in zip(entries, keys, strict=True) if k not in self._pending]
        failure = None
        if mine:
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            for entry in mine:
                self._pending[(entry.id, entry.revision, audiences)] = future
            try:
                failure = await self._request(mine, audiences)
            except Exception as err:  # every caller hears of it; the next ask tries again
                failure = f"the authority did not issue a jwt-svid: {err}"
            finally:
                future.set_result(None)
                for entry in mine:
                    self._pending.pop((entry.id, entry.revision, audiences), None)
        if waiting:
            await asyncio.gather(*(asyncio.shield(f) for f in waiting))
        return failure

    async def _request(self, entries: Sequence[Entry], audiences: tuple[str, ...]) -> str | None:
        by_id = {e.id: e for e in entries}
        requests = []
        refusal = None
        for asked in entries:
            cap, refusal = self._svids.parents.cap(asked)
            if refusal is None:
                requests.append(JwtSvidRequest(entry_id=asked.id, audiences=audiences, not_after=int(cap or 0)))
        if not requests:
            return refusal
        response = await self._source.request(jwt_svids=requests)
        now = self._clock.now()
        for issued in response.jwt_svids:
            entry = by_id.get(issued.entry_id)
            if entry is None or tuple(issued.audiences) != audiences:
                continue
            lifetime = issued.expires_at - now
            self._tokens[(entry.id, entry.revision, audiences)] = JwtSvid(
                spiffe_id=issued.spiffe_id, token=issued.token, hint=entry.hint, expires_at=issued.expires_at,
                refresh_at=now + lifetime / 2)
        self._evict(now)
        errors = [f"{e.code}: {e.message}" for e in response.errors if e.entry_id in by_id]
        return errors[0] if errors else None

    def _evict(self, now: float) -> None:
        for key in [k for k, t in self._tokens.items() if t.expires_at <= now]:
            del self._tokens[key]
        while len(self._tokens) > MAX_CACHED_TOKENS:
            oldest = min(self._tokens, key=lambda k: self._tokens[k].expires_at)
            del self._tokens[oldest]

    # -- bundles and validation -----------------------------------------------------------------
    def jwt_bundles(self) -> Mapping[str, bytes]:
        """Trust domain SPIFFE ID -> its JWKS document."""
        jwks = self._source.jwt_bundle()
        return {str(self._trust_domain.id): jwks} if jwks else {}

    def validate(self, token: str, audience: str) -> tuple[str, Mapping[str, Any]]:
        """The SPIFFE ID and claims of a valid, unrevoked JWT-SVID of this trust domain; InvalidSvidError
        (RevokedTokenError for a revoked one) naming what is wrong."""
        try:
            bundle = JwtBundle.from_jwks(self._trust_domain, self._source.jwt_bundle())
        except SpiffeError as err:
            raise InvalidSvidError(f"no usable jwt bundle: {err}") from None
        validated = validate_jwt_svid(token, bundle, audience=audience, now=self._clock.now())
        _refuse_revoked(validated.claims, self._source.revocations)
        return str(validated.spiffe_id), validated.claims


def _refuse_revoked(claims: Mapping[str, Any], document: RevocationDocument | None) -> None:
    if document is None:
        return
    entry_id, revision = claims.get("vouchd_entry"), claims.get("vouchd_rev")
    for revoked in document.entries:
        if revoked.entry_id == entry_id and isinstance(revision, int) and revision < revoked.below_revision:
            raise RevokedTokenError("jwt-svid was revoked: its registration entry was deleted or changed")
    node_id, issued_at = claims.get("vouchd_node"), claims.get("iat")
    for node in document.nodes:
        if node.node_id == node_id and (node.banned or (isinstance(issued_at, int) and issued_at < node.before)):
            raise RevokedTokenError("jwt-svid was revoked: the node that obtained it is banned or must attest again")
