"""Signing what a node asked for in one quote-bound request: X.509-SVIDs and JWT-SVIDs (DESIGN §5).

The request's quote, nonce and node were checked by the Authority before; here each item is checked
against the entry index (the entry must be assigned to this node and allow its tier), then put to the
policy with what the authority knows (vouchd.authority.policing), and signed, or refused with an
ItemError; every outcome is a decision, and a policy's carries the ids of the policies that decided.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from vouchd.authority.ca import CertificateAuthority
from vouchd.authority.entries import EntryIndex
from vouchd.authority.errors import CaError
from vouchd.authority.policing import AuthorityPolicy, NodeStanding
from vouchd.clock import Clock
from vouchd.config import AuthorityConfig
from vouchd.decisions import Decision, DecisionKind, DecisionSink, NodeEvidence, Outcome
from vouchd.entries import Entry
from vouchd.policy import PolicyDecision
from vouchd.protocol.messages import IssuedJwtSvid, IssuedX509Svid, ItemError, JwtSvidRequest, X509SvidRequest
from vouchd.protocol.refusals import Refusal
from vouchd.selectors import Selector
from vouchd.spiffe import (
    JWT_TIER_CLAIM,
    MAX_AUDIENCE_LENGTH,
    MAX_AUDIENCES,
    InvalidSvidError,
    SpiffeId,
    TrustTier,
    csr_public_key,
    jwt_key_id,
    mint_jwt_svid,
    serial_hex,
)

__all__ = ["NodeView", "SvidSigner", "audience_problem", "ec_public_key"]


def _policy_details(verdict: PolicyDecision | None) -> tuple[tuple[str, str], ...]:
    """What a decision records of the policy's verdict: the deciding ids and the set's version."""
    if verdict is None:
        return ()
    return (("policy_ids", ",".join(verdict.policy_ids)), ("policy_version", verdict.policy_version))


@dataclass(frozen=True)
class NodeView:
    """The requesting node as entry authorization sees it."""

    spiffe_id: SpiffeId
    selectors: frozenset[Selector]
    tier: TrustTier


def audience_problem(audiences: tuple[str, ...]) -> str | None:
    """What is wrong with a JWT-SVID's audience list, or None (the Workload API checks the same)."""
    if not audiences:
        return "a jwt-svid needs at least one audience"
    if len(audiences) > MAX_AUDIENCES:
        return f"at most {MAX_AUDIENCES} audiences"
    if any(not a or len(a) > MAX_AUDIENCE_LENGTH for a in audiences):
        return f"an audience is empty or longer than {MAX_AUDIENCE_LENGTH} characters"
    return None


def ec_public_key(key: object) -> ec.EllipticCurvePublicKey:
    if not isinstance(key, ec.EllipticCurvePublicKey):  # the CA makes P-256 keys only
        raise CaError("a signing key is not an EC key")
    return key


class SvidSigner:
    """Signs the items of one request with the CA and JWT keys as they are at that moment."""

    def __init__(self, config: AuthorityConfig, index: EntryIndex, *, ca: CertificateAuthority,
                 jwt_keys: CertificateAuthority, clock: Clock, decisions: DecisionSink,
                 policy: AuthorityPolicy | None = None, standing: NodeStanding | None = None) -> None:
        """`policy` and `standing`: the policy to judge each item by, and the node as the authority's
        records have it; without them only the entry index and the TTL caps decide."""
        self._policy = policy if standing is not None else None
        self._standing = standing
        self._config = config
        self._index = index
        self._ca = ca
        self._jwt_keys = jwt_keys
        self._clock = clock
        self._decisions = decisions

    def x509_svid(self, item: X509SvidRequest, node: NodeView, evidence: NodeEvidence,
                  errors: list[ItemError]) -> IssuedX509Svid | None:
        entry = self._authorized(item.entry_id, node, evidence, errors, method="x509-svid")
        if entry is None:
            return None
        try:
            public_key = csr_public_key(item.csr)
        except InvalidSvidError as err:
            self._refuse(errors, entry.id, Refusal.BAD_CSR, str(err), outcome=Outcome.INVALID, evidence=evidence,
                         method="x509-svid")
            return None
        ttl = self._bounded(self._x509_ttl(entry), item.not_after)
        if ttl is None:
            self._refuse(errors, entry.id, Refusal.BAD_REQUEST, "not_after is not in the future",
                         outcome=Outcome.INVALID, evidence=evidence, method="x509-svid")
            return None
        verdict = None
        if self._policy is not None and self._standing is not None:
            verdict = self._policy.x509_svid(entry, self._standing, ttl_seconds=int(ttl.total_seconds()),
                                             not_after=item.not_after)
            if not verdict.allowed:
                self._denied_by_policy(errors, entry, verdict, evidence, method="x509-svid")
                return None
        try:
            cert = self._ca.sign_x509_svid(public_key, entry.spiffe_id, ttl=ttl, tier=node.tier,
                                           dns_names=entry.dns_names,
                                           now=datetime.fromtimestamp(self._clock.now(), UTC))
        except (InvalidSvidError, CaError) as err:
            self._refuse(errors, entry.id, Refusal.CANNOT_SIGN, str(err), outcome=Outcome.ERROR, evidence=evidence,
                         method="x509-svid")
            return None
        self._issued(entry, evidence, "x509-svid", serials=(serial_hex(cert),), details=_policy_details(verdict))
        return IssuedX509Svid(entry_id=entry.id, spiffe_id=str(entry.spiffe_id),
                              cert_chain=cert.public_bytes(Encoding.DER),
                              expires_at=int(cert.not_valid_after_utc.timestamp()))

    def jwt_svid(self, item: JwtSvidRequest, node_id: str, node: NodeView, evidence: NodeEvidence,
                 errors: list[ItemError]) -> IssuedJwtSvid | None:
        entry = self._authorized(item.entry_id, node, evidence, errors, method="jwt-svid")
        if entry is None:
            return None
        problem = audience_problem(item.audiences)
        if problem is not None:
            self._refuse(errors, entry.id, Refusal.BAD_AUDIENCE, problem, outcome=Outcome.INVALID, evidence=evidence,
                         method="jwt-svid")
            return None
        now = int(self._clock.now())
        ttl = self._bounded(min(entry.jwt_ttl or self._config.jwt_svid_ttl, self._config.jwt_svid_max_ttl),
                            item.not_after)
        if ttl is None:
            self._refuse(errors, entry.id, Refusal.BAD_REQUEST, "not_after is not in the future",
                         outcome=Outcome.INVALID, evidence=evidence, method="jwt-svid")
            return None
        verdict = None
        if self._policy is not None and self._standing is not None:
            verdict = self._policy.jwt_svid(entry, self._standing, audiences=item.audiences,
                                            ttl_seconds=int(ttl.total_seconds()), not_after=item.not_after)
            if not verdict.allowed:
                self._denied_by_policy(errors, entry, verdict, evidence, method="jwt-svid")
                return None
        expires = now + int(ttl.total_seconds())
        token = mint_jwt_svid(self._jwt_keys.sign, key_id=jwt_key_id(ec_public_key(self._jwt_keys.certificate
                                                                                  .public_key())),
                              spiffe_id=entry.spiffe_id, audiences=item.audiences, issued_at=now, expires_at=expires,
                              claims={JWT_TIER_CLAIM: node.tier.value, "vouchd_entry": entry.id,
                                      "vouchd_rev": entry.revision, "vouchd_node": node_id})
        self._issued(entry, evidence, "jwt-svid",
                     details=(("audiences", ",".join(item.audiences)), *_policy_details(verdict)))
        return IssuedJwtSvid(entry_id=entry.id, spiffe_id=str(entry.spiffe_id), audiences=item.audiences,
                             token=token, expires_at=expires)

    def _bounded(self, ttl: timedelta, not_after: int) -> timedelta | None:
        """`ttl`, shortened to end by `not_after` when the agent asks for that (0: it does not); None
        when that is not at least a second away."""
        if not not_after:
            return ttl
        left = int(not_after - self._clock.now())  # whole seconds, rounded down: never past not_after
        if left < 1:
            return None
        return min(ttl, timedelta(seconds=left))

    def _x509_ttl(self, entry: Entry) -> timedelta:
        """The entry's TTL, capped by the authority whatever the entry asks for."""
        return min(entry.x509_ttl or self._config.x509_svid_ttl, self._config.x509_svid_max_ttl)

    def _authorized(self, entry_id: str, node: NodeView, evidence: NodeEvidence, errors: list[ItemError], *,
                    method: str) -> Entry | None:
        entry = self._index.is_authorized(entry_id, node.spiffe_id, node.selectors, node.tier)
        if entry is None:
            self._refuse(errors, entry_id, Refusal.NOT_AUTHORIZED, "entry is not assigned to this node",
                         outcome=Outcome.DENIED, evidence=evidence, method=method)
        return entry

    def _refuse(self, errors: list[ItemError], entry_id: str, code: str, reason: str, *, outcome: Outcome,
                evidence: NodeEvidence, method: str, details: tuple[tuple[str, str], ...] = ()) -> None:
        errors.append(ItemError(entry_id, code, reason))
        self._decisions.emit(Decision(kind=DecisionKind.DENY, outcome=outcome, at=self._clock.now(),
                                      source="authority", method=method, reason=reason, node=evidence,
                                      entry_ids=(entry_id,), details=(("code", code), *details)))

    def _denied_by_policy(self, errors: list[ItemError], entry: Entry, verdict: PolicyDecision,
                          evidence: NodeEvidence, *, method: str) -> None:
        ids = ", ".join(verdict.policy_ids) or "none (no policy permits it)"
        reason = f"denied by policy {ids}: {'; '.join(verdict.reasons)}"
        self._refuse(errors, entry.id, Refusal.POLICY, reason, outcome=Outcome.DENIED, evidence=evidence, method=method,
                     details=_policy_details(verdict))

    def _issued(self, entry: Entry, evidence: NodeEvidence, method: str, *, serials: tuple[str, ...] = (),
                details: tuple[tuple[str, str], ...] = ()) -> None:
        self._decisions.emit(Decision(kind=DecisionKind.ISSUE, outcome=Outcome.OK, at=self._clock.now(),
                                      source="authority", method=method, node=evidence, entry_ids=(entry.id,),
                                      spiffe_ids=(str(entry.spiffe_id),), svid_serials=serials, details=details))
