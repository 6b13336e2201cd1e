"""The authority: verifies TPM evidence, holds the trust domain CA, signs SVIDs (DESIGN §4, §5).

`Authority.handle(topic, request)` is the whole wire surface: request bytes in, signed reply bytes
out. The MQTT transport and the in-process LocalTransport both call it, so standalone mode and
fleet mode run the same checks.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from vouchd.authority.attestation import NodeAttestation
from vouchd.authority.ca import CertificateAuthority
from vouchd.authority.ekchain import EkTrust
from vouchd.authority.errors import RefusalError
from vouchd.authority.issuance import NodeView, SvidSigner, ec_public_key
from vouchd.authority.keys import CaKeeper
from vouchd.authority.policing import AuthorityPolicy, NodeStanding
from vouchd.authority.registry import Registry
from vouchd.authority.revocations import RevocationPublisher
from vouchd.authority.store import NodeRecord, NodeState, Store, StoreError
from vouchd.authority.verifier import (
    check_quote_continuity,
    verify_request_quote,
)
from vouchd.clock import Clock
from vouchd.config import AuthorityConfig
from vouchd.decisions import Decision, DecisionKind, DecisionSink, NodeEvidence, Outcome
from vouchd.entries import Entry
from vouchd.evidence import Attest, EvidenceError
from vouchd.policy import PolicyEngine
from vouchd.protocol.codec import decode, decode_as
from vouchd.protocol.errors import MessageError, SignatureError
from vouchd.protocol.identities import authority_spiffe_id
from vouchd.protocol.keyproof import (
    REQUEST_CONTEXT,
    verify_node_key_signature,
)
from vouchd.protocol.messages import (
    MAX_JWT_SVIDS_PER_REQUEST,
    MAX_X509_SVIDS_PER_REQUEST,
    AttestNonceRequest,
    AttestRequest,
    AttestResult,
    ChallengeResponse,
    CredentialResponse,
    ErrorReply,
    ItemError,
    KeyAttestRequest,
    KeyChallengeResponse,
    NonceGrant,
    NonceRequest,
    QuotedRequest,
    RequestBody,
    SignedRequest,
)
from vouchd.protocol.refusals import Refusal
from vouchd.protocol.signing import ReplySigner, request_digest
from vouchd.protocol.transport import ATTEST_TOPIC, REQUEST_TOPIC, Publisher
from vouchd.selectors import selector_set
from vouchd.spiffe import (
    JwtBundle,
    SpiffeId,
    TrustDomain,
    TrustTier,
    X509Bundle,
)

__all__ = ["Authority"]

_P = TypeVar("_P")

log = logging.getLogger("vouchd.authority")

NONCE_TTL = 30.0
ANSWERED_KEEP_SECONDS = 600.0
_AUTHORITY_KEY_TTL = timedelta(hours=24)
_CLOCK_TOLERANCE = 300


class Authority:
    """The authority, given everything it works with (vouchd.authority.build makes them).

    `standalone` is the single-host mode, where the operator of the host is the operator of the
    authority: the first event log seen becomes the accepted profile, and a node that lost its
    agent state may enrol a new AK under its EK. A fleet authority does neither on its own.
    """

    def __init__(self, config: AuthorityConfig, trust_domain: TrustDomain, *, store: Store, ca: CaKeeper,
                 jwt_keys: CaKeeper, ek_trust: EkTrust, signing_key: ec.EllipticCurvePrivateKey, clock: Clock,
                 publisher: Publisher, decisions: DecisionSink, standalone: bool = False,
                 policy: PolicyEngine | None = None) -> None:
        """`jwt_keys`: the JWT-SVID signing keys, kept and rotated like CA roots (prepared, active,
        previous) in a folder of their own; only their public keys are ever published (the JWKS)."""
        self._config = config
        self._standalone = standalone
        self._trust_domain = trust_domain
        self._store = store
        self._ca = ca
        self._jwt_keys = jwt_keys
        self._trust = ek_trust
        self._signing_key = signing_key
        self._clock = clock
        self._decisions = decisions
        self._policy = AuthorityPolicy(policy, str(trust_domain.id), clock) if policy is not None else None
        self._signer, self._signer_renew_at = self._mint_signer()
        longest_svid = max(config.x509_svid_max_ttl, config.node_svid_ttl).total_seconds()
        self.revocations = RevocationPublisher(store, self._publish_signed, publisher, clock,
                                               keep_seconds=longest_svid + _CLOCK_TOLERANCE)
        self.registry = Registry(store, self.revocations, publisher, sign=self._publish_signed, clock=clock,
                                 decisions=decisions)
        self.attestation = NodeAttestation(config, trust_domain, store=store, ek_trust=ek_trust, clock=clock,
                                           services=self, standalone=standalone)

    async def start(self) -> None:
        """Load what the authority serves from its store."""
        await self.registry.load()

    @property
    def trust_domain(self) -> TrustDomain:
        return self._trust_domain

    @property
    def config(self) -> AuthorityConfig:
        return self._config

    @property
    def store(self) -> Store:
        return self._store

    @property
    def clock(self) -> Clock:
        return self._clock

    @property
    def decisions(self) -> DecisionSink:
        return self._decisions

    async def close(self) -> None:
        await self._store.close()

    def bundle(self) -> X509Bundle:
        return self._current_ca().bundle(self._utc_now())

    def jwt_bundle(self) -> JwtBundle:
        """Every JWT-SVID key that is not past its end: the active one signs, the prepared one is
        published ahead, the previous one still verifies what it signed."""
        keys, _rotated = self._jwt_keys.current()
        published = keys.bundle(self._utc_now()).authorities
        return JwtBundle.of(self._trust_domain, [ec_public_key(c.public_key()) for c in published])

    def _utc_now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.now(), UTC)

    def _current_ca(self) -> CertificateAuthority:
        ca, rotated = self._ca.current()
        if rotated:
            self._signer, self._signer_renew_at = self._mint_signer()
        return ca

    async def enrol(self, ek_hash_hex: str, source: str) -> None:
        """Record an EK as enrolled (standalone mode enrols the local TPM's EK itself)."""
        await self.attestation.enrol(ek_hash_hex, source)

    async def enrol_node_key(self, spki_der: bytes, source: str) -> str:
        """Let a node key in (standalone, without a TPM: the host's own); its node id."""
        return await self.attestation.enrol_node_key(spki_der, source)

    # -- what node attestation needs (AttestationServices) --------------------------------------
    async def new_nonce(self, node_id: str) -> tuple[bytes, float]:
        nonce = secrets.token_bytes(32)
        now = self._clock.now()
        expires = now + NONCE_TTL
        await self._store.add_nonce(node_id, nonce, expires, now=now)
        return nonce, expires

    def sign_node_svid(self, public_key: ec.EllipticCurvePublicKey, node_id: str, tier: TrustTier) -> x509.Certificate:
        return self._current_ca().sign_x509_svid(public_key, SpiffeId.parse(node_id), ttl=self._config.node_svid_ttl,
                                                 tier=tier, now=self._utc_now())

    async def attest_result(self, node_id: str, node_svid: x509.Certificate, selectors: tuple[str, ...],
                            tier: TrustTier) -> AttestResult:
        nonce, expires = await self.new_nonce(node_id)
        revocations = await self.revocations.current()
        return AttestResult(node_svid=node_svid.public_bytes(Encoding.DER), bundle=self.bundle().der(),
                            selectors=selectors, tier=tier.value, nonce=nonce, nonce_expires_at=int(expires),
                            revocations=revocations.signed, jwt_bundle=self.jwt_bundle().to_jwks())

    def _mint_signer(self) -> tuple[ReplySigner, float]:
        cert = self._ca.loaded.sign_x509_svid(self._signing_key.public_key(),
                                              authority_spiffe_id(self._trust_domain),
                                              ttl=_AUTHORITY_KEY_TTL, tier=TrustTier.HARDWARE, now=self._utc_now())
        expires = cert.not_valid_after_utc.timestamp()
        lifetime = expires - cert.not_valid_before_utc.timestamp()
        return ReplySigner(self._signing_key, [cert], self._clock), expires - lifetime / 2

    def _current_signer(self) -> ReplySigner:
        self._current_ca()
        if self._clock.now() >= self._signer_renew_at:
            self._signer, self._signer_renew_at = self._mint_signer()
        return self._signer

    def _sign(self, reply: object, *, node_id: str, request: bytes) -> bytes:
        return self._current_signer().sign(reply, node_id=node_id, request=request)

    def _publish_signed(self, body: object, topic: str) -> bytes:
        return self._current_signer().publish(body, topic=topic)

    def decide(self, kind: DecisionKind, outcome: Outcome, *, method: str, reason: str = "",
                node: NodeEvidence | None = None, entries: tuple[Entry, ...] = (),
                serials: tuple[str, ...] = ()) -> None:
        self._decisions.emit(Decision(
            kind=kind, outcome=outcome, at=self._clock.now(), source="authority", method=method, reason=reason,
            node=node, entry_ids=tuple(e.id for e in entries), spiffe_ids=tuple(str(e.spiffe_id) for e in entries),
            svid_serials=serials,
        ))

    # -- the wire surface --------------------------------------------------------------------
    async def handle(self, topic: str, request: bytes) -> bytes:
        """Answer one request; every outcome, refusals included, is a signed reply."""
        node_id = ""
        method = "unknown"
        try:
            message = decode(request)
            node_id = str(getattr(message, "node_id", ""))
            method = type(message).__name__
            if topic == ATTEST_TOPIC and isinstance(message, AttestNonceRequest):
                grant = await self.attestation.grant_attest_nonce(message.node_id)
                return self._sign(grant, node_id=node_id, request=request)
            if topic == ATTEST_TOPIC and isinstance(message, AttestRequest):
                return self._sign(await self.attestation.begin(message), node_id=node_id, request=request)
            if topic == ATTEST_TOPIC and isinstance(message, ChallengeResponse):
                return self._sign(await self.attestation.complete(message), node_id=node_id, request=request)
            if topic == REQUEST_TOPIC and isinstance(message, NonceRequest):
                return self._sign(await self._grant_nonce(message.node_id), node_id=node_id, request=request)
            if topic == REQUEST_TOPIC and isinstance(message, QuotedRequest):
                return await self._quoted_request(message, request)
            if topic == ATTEST_TOPIC and isinstance(message, KeyAttestRequest):
                return self._sign(await self.attestation.begin_key(message), node_id=node_id, request=request)
            if topic == ATTEST_TOPIC and isinstance(message, KeyChallengeResponse):
                return self._sign(await self.attestation.complete_key(message), node_id=node_id, request=request)
            if topic == REQUEST_TOPIC and isinstance(message, SignedRequest):
                return await self._signed_request(message, request)
            raise RefusalError(Refusal.BAD_REQUEST, f"{type(message).__name__} is not accepted on {topic}")
        except (MessageError, EvidenceError) as err:
            self.decide(DecisionKind.DENY, Outcome.INVALID, method=method, reason=str(err),
                         node=NodeEvidence(node_id) if node_id else None)
            return self._sign(ErrorReply(Refusal.BAD_REQUEST, str(err)), node_id=node_id, request=request)
        except RefusalError as refusal:
            self.decide(DecisionKind.DENY, Outcome.DENIED, method=method, reason=f"{refusal.code}: {refusal}",
                         node=NodeEvidence(node_id) if node_id else None)
            return self._sign(ErrorReply(refusal.code, str(refusal)), node_id=node_id, request=request)
        except StoreError as err:
            # Every request writes (a nonce at least): a full disk or a read-only file system stops
            # issuance. Say so, by the store's words (path and what failed, never a value), so that
            # the node's status names the cause rather than "internal error".
            self.decide(DecisionKind.DENY, Outcome.ERROR, method=method, reason=str(err),
                         node=NodeEvidence(node_id) if node_id else None)
            return self._sign(ErrorReply(Refusal.STORAGE, f"the authority cannot write its state: {err}"),
                              node_id=node_id, request=request)
        except Exception:
            # Input that reached a bug must still get an answer, and must not take the authority down.
            log.exception("request failed", extra={"topic": topic, "node_id": node_id})
            return self._sign(ErrorReply(Refusal.INTERNAL, "internal error"), node_id=node_id, request=request)

    # -- requests ----------------------------------------------------------------------------
    async def _trusted_node(self, node_id: str) -> NodeRecord:
        node = await self._store.node(node_id)
        if node is None:
            raise RefusalError(Refusal.REATTEST, "node is unknown; attest first")
        if node.state in (NodeState.BANNED, NodeState.FAILED):
            raise RefusalError(Refusal(node.state.value), f"node is {node.state.value}")
        # The ban itself, not only the state it set: an attestation that completed while the ban was
        # written may have saved the node as trusted again.
        if await self._store.is_banned(node_id):
            raise RefusalError(Refusal.BANNED, "node is banned")
        if node.state is not NodeState.TRUSTED:
            raise RefusalError(Refusal.REATTEST, f"node is {node.state.value}; attest again")
        return node

    async def _grant_nonce(self, node_id: str) -> NonceGrant:
        node = await self._trusted_node(node_id)
        nonce, expires = await self.new_nonce(node_id)
        return NonceGrant(nonce=nonce, expires_at=int(expires), pcr_bank=node.pcr_bank,
                          pcr_indices=node.pcr_indices)

    async def _quoted_request(self, message: QuotedRequest, raw: bytes) -> bytes:
        node = await self._trusted_node(message.node_id)
        if node.tier != TrustTier.HARDWARE.value:
            raise RefusalError(Refusal.BAD_REQUEST, f"a {node.tier} node signs its requests with its node key")

        def verify() -> Attest:
            return verify_request_quote(node, message.quote, message.body)

        async def settle(attest: Attest) -> NodeEvidence:
            try:
                check_quote_continuity(node, attest)
            except RefusalError:
                await self._store.set_node_state(node.node_id, NodeState.ATTESTING)
                raise
            clock = attest.clock_info
            await self._store.record_quote(node.node_id, reset_count=clock.reset_count,
                                           restart_count=clock.restart_count, clock=clock.clock,
                                           now=self._clock.now())
            return NodeEvidence(node.node_id, quote_digest=hashlib.sha256(message.quote.attest).hexdigest(),
                                pcr_profile=_profile_of(node))

        return await self._credential_request(node, message.body, raw, verify, settle)

    async def _signed_request(self, message: SignedRequest, raw: bytes) -> bytes:
        node = await self._trusted_node(message.node_id)
        if node.tier == TrustTier.HARDWARE.value:
            raise RefusalError(Refusal.BAD_REQUEST, "a hardware node quotes its requests with its TPM")

        def verify() -> None:
            try:
                verify_node_key_signature(node.node_key_public, REQUEST_CONTEXT, message.body, message.signature)
            except SignatureError as err:
                raise RefusalError(Refusal.BAD_EVIDENCE, f"request: {err}") from None

        async def settle(_: None) -> NodeEvidence:
            return NodeEvidence(node.node_id)

        return await self._credential_request(node, message.body, raw, verify, settle)

    async def _credential_request(self, node: NodeRecord, body_bytes: bytes, raw: bytes, verify: Callable[[], _P],
                                  settle: Callable[[_P], Awaitable[NodeEvidence]]) -> bytes:
        """A request of either tier: `verify` checks its proof (the TPM quote, the node key's
        signature) before anything changes; `settle` runs once its nonce is spent and returns the
        node evidence the decisions record."""
        # Keyed like the reply's signature (in_reply_to): the very same request bytes, nothing less.
        digest = request_digest(raw)
        cached = await self._store.answered_reply(node.node_id, digest)
        if cached is not None:
            return cached  # a redelivered request gets the very same reply
        proof = verify()
        body = decode_as(RequestBody, body_bytes)
        if body.node_id != node.node_id:
            raise RefusalError(Refusal.BAD_REQUEST, "request body names another node")
        now = self._clock.now()
        if abs(body.sent_at - now) > _CLOCK_TOLERANCE:
            raise RefusalError(Refusal.BAD_REQUEST, "request time is too far from the authority's clock")
        # The nonce first: a replayed request is refused here and changes nothing about the node.
        if not await self._store.consume_nonce(node.node_id, body.nonce, now=now):
            raise RefusalError(Refusal.NONCE, "request nonce is unknown, already used or expired")
        evidence = await settle(proof)
        response = await self._serve(node, body, evidence)
        signed = self._sign(response, node_id=node.node_id, request=raw)
        await self._store.remember_reply(node.node_id, digest, signed, now=now, keep_seconds=ANSWERED_KEEP_SECONDS)
        return signed

    async def _serve(self, node: NodeRecord, body: RequestBody, evidence: NodeEvidence) -> CredentialResponse:
        if len(body.x509_svids) > MAX_X509_SVIDS_PER_REQUEST or len(body.jwt_svids) > MAX_JWT_SVIDS_PER_REQUEST:
            raise RefusalError(Refusal.BAD_REQUEST,
                               f"more than {MAX_X509_SVIDS_PER_REQUEST} SVID requests in one batch")
        view = NodeView(SpiffeId.parse(node.node_id), selector_set(node.selectors), TrustTier(node.tier))
        index = self.registry.index
        signer = SvidSigner(self._config, index, ca=self._current_ca(), jwt_keys=self._jwt_keys.current()[0],
                            clock=self._clock, decisions=self._decisions, policy=self._policy,
                            standing=_standing(node, self._clock.now()))
        errors: list[ItemError] = []
        issued = [svid for item in body.x509_svids
                  if (svid := signer.x509_svid(item, view, evidence, errors)) is not None]
        jwt_svids = [token for item in body.jwt_svids
                     if (token := signer.jwt_svid(item, node.node_id, view, evidence, errors)) is not None]
        entries = None
        if body.sync_entries:
            entries = tuple(index.authorized_for(view.spiffe_id, view.selectors, view.tier))
        revocations = await self.revocations.current()
        nonce, expires = await self.new_nonce(node.node_id)
        return CredentialResponse(
            x509_svids=tuple(issued), errors=tuple(errors), entries=entries, bundle=self.bundle().der(),
            nonce=nonce, nonce_expires_at=int(expires),
            revocations=revocations.signed if revocations.document.version != body.revocations_version else None,
            jwt_svids=tuple(jwt_svids), jwt_bundle=self.jwt_bundle().to_jwks(),
        )


def _standing(node: NodeRecord, now: float) -> NodeStanding:
    tier = TrustTier(node.tier)
    quote_age = math.ceil(max(0.0, now - node.last_quote_at)) if tier is TrustTier.HARDWARE else None
    return NodeStanding(tier=tier, state=node.state.value, quote_age_seconds=quote_age,
                        pcr_profile=_profile_of(node) or None)


def _profile_of(node: NodeRecord) -> str:
    prefix = "tpm:pcr_profile:"
    return next((s[len(prefix):] for s in node.selectors if s.startswith(prefix)), "")
