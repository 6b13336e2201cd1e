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

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from vouchd.authority.ca import CertificateAuthority
from vouchd.authority.errors import RefusalError
from vouchd.authority.issuance import NodeView, SvidSigner, ec_public_key
from vouchd.authority.jointokens import parse_join_token, secret_digest
from vouchd.authority.keys import CaKeeper
from vouchd.authority.limits import AttestationLimits
from vouchd.authority.policing import AuthorityPolicy, NodeStanding
from vouchd.authority.registry import Registry
from vouchd.authority.revocations import RevocationPublisher
from vouchd.authority.store import NodeRecord, NodeState, Store, StoreError
from vouchd.authority.verifier import (
    AttestationSession,
    EkTrust,
    begin_attestation,
    check_quote_continuity,
    complete_attestation,
    legacy_profile_accepts,
    match_profile,
    verify_request_quote,
)
from vouchd.clock import Clock
from vouchd.config import AuthorityConfig
from vouchd.decisions import Decision, DecisionKind, DecisionSink, NodeEvidence, Outcome
from vouchd.entries import Entry
from vouchd.evidence import Attest, EvidenceError, TpmPublic
from vouchd.policy import PolicyEngine
from vouchd.protocol.codec import decode, decode_as
from vouchd.protocol.errors import MessageError, SignatureError
from vouchd.protocol.identities import authority_spiffe_id, ek_hash, key_node_spiffe_id, node_spiffe_id
from vouchd.protocol.keyproof import (
    CHALLENGE_CONTEXT,
    REQUEST_CONTEXT,
    load_node_key_public,
    node_key_hash,
    verify_node_key_signature,
)
from vouchd.protocol.messages import (
    MAX_JWT_SVIDS_PER_REQUEST,
    MAX_X509_SVIDS_PER_REQUEST,
    AttestNonceRequest,
    AttestRequest,
    AttestResult,
    Challenge,
    ChallengeResponse,
    CredentialResponse,
    ErrorReply,
    ItemError,
    KeyAttestRequest,
    KeyChallenge,
    KeyChallengeResponse,
    NonceGrant,
    NonceRequest,
    QuotedRequest,
    RequestBody,
    SignedRequest,
)
from vouchd.protocol.signing import ReplySigner, request_digest
from vouchd.protocol.transport import ATTEST_TOPIC, REQUEST_TOPIC, Publisher
from vouchd.selectors import selector_set
from vouchd.spiffe import (
    JwtBundle,
    SpiffeError,
    SpiffeId,
    TrustDomain,
    TrustTier,
    X509Bundle,
    serial_hex,
)

__all__ = ["Authority"]

_P = TypeVar("_P")

log = logging.getLogger("vouchd.authority")

NONCE_TTL = 30.0
ANSWERED_KEEP_SECONDS = 600.0
MAX_PENDING_SESSIONS = 10_000
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
        self._attestation_limits = AttestationLimits(clock)
        self._signer, self._signer_renew_at = self._mint_signer()
        longest_svid = max(config.x509_svid_max_ttl, config.node_svid_ttl).total_seconds()
        self.revocations = RevocationPublisher(store, self._publish_signed, publisher, clock,
                                               keep_seconds=longest_svid + _CLOCK_TOLERANCE)
        self.registry = Registry(store, self.revocations, publisher, sign=self._publish_signed, clock=clock,
                                 decisions=decisions)
        # node id -> DER SubjectPublicKeyInfo of the software node keys allowed in (static-secret tier).
        # Never kept with the enrolled EKs: a key held in software must never pass for a TPM's EK.
        self._enrolled_node_keys: dict[str, bytes] = {}

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
        await self._store.enrol_ek(ek_hash_hex, source, now=self._clock.now())

    def enrol_node_key(self, spki_der: bytes) -> str:
        """Let a node without a TPM in by its software node key (standalone mode enrols its own host's);
        its node id. The node is at the static-secret tier: entries reach it only where they allow it."""
        load_node_key_public(spki_der)
        node_id = str(key_node_spiffe_id(self._trust_domain, node_key_hash(spki_der)))
        self._enrolled_node_keys[node_id] = spki_der
        return node_id

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

    def _decide(self, kind: DecisionKind, outcome: Outcome, *, method: str, reason: str = "",
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
                return self._sign(await self._grant_attest_nonce(message.node_id), node_id=node_id, request=request)
            if topic == ATTEST_TOPIC and isinstance(message, AttestRequest):
                return self._sign(await self._begin(message), node_id=node_id, request=request)
            if topic == ATTEST_TOPIC and isinstance(message, ChallengeResponse):
                return self._sign(await self._complete(message), node_id=node_id, request=request)
            if topic == REQUEST_TOPIC and isinstance(message, NonceRequest):
                return self._sign(await self._grant_nonce(message.node_id), node_id=node_id, request=request)
            if topic == REQUEST_TOPIC and isinstance(message, QuotedRequest):
                return await self._quoted_request(message, request)
            if topic == ATTEST_TOPIC and isinstance(message, KeyAttestRequest):
                return self._sign(await self._begin_key(message), node_id=node_id, request=request)
            if topic == ATTEST_TOPIC and isinstance(message, KeyChallengeResponse):
                return self._sign(await self._complete_key(message), node_id=node_id, request=request)
            if topic == REQUEST_TOPIC and isinstance(message, SignedRequest):
                return await self._signed_request(message, request)
            raise RefusalError("bad_request", f"{type(message).__name__} is not accepted on {topic}")
        except (MessageError, EvidenceError) as err:
            self._decide(DecisionKind.DENY, Outcome.INVALID, method=method, reason=str(err),
                         node=NodeEvidence(node_id) if node_id else None)
            return self._sign(ErrorReply("bad_request", str(err)), node_id=node_id, request=request)
        except RefusalError as refusal:
            self._decide(DecisionKind.DENY, Outcome.DENIED, method=method, reason=f"{refusal.code}: {refusal}",
                         node=NodeEvidence(node_id) if node_id else None)
            return self._sign(ErrorReply(refusal.code, str(refusal)), node_id=node_id, request=request)
        except StoreError as err:
            # Every request writes (a nonce at least): a full disk or a read-only file system stops
            # issuance. Say so, by the store's words (path and what failed, never a value), so that
            # the node's status names the cause rather than "internal error".
            self._decide(DecisionKind.DENY, Outcome.ERROR, method=method, reason=str(err),
                         node=NodeEvidence(node_id) if node_id else None)
            return self._sign(ErrorReply("storage", f"the authority cannot write its state: {err}"),
                              node_id=node_id, request=request)
        except Exception:
            # Input that reached a bug must still get an answer, and must not take the authority down.
            log.exception("request failed", extra={"topic": topic, "node_id": node_id})
            return self._sign(ErrorReply("internal", "internal error"), node_id=node_id, request=request)

    # -- node attestation --------------------------------------------------------------------
    async def _begin(self, request: AttestRequest) -> Challenge:
        try:
            ek = TpmPublic.from_tpm2b(request.ek_public)
        except EvidenceError as err:
            raise RefusalError("bad_evidence", f"EK public area: {err}") from None
        ek_hex = ek_hash(ek)
        node_id = str(node_spiffe_id(self._trust_domain, ek_hex))
        if request.node_id != node_id:
            raise RefusalError("bad_request", "node id is not derived from the presented EK")
        self._check_attestation_rate(node_id)
        # The authority's nonce, spent before anything else changes: a captured request replayed
        # cannot replace this node's attestation in progress, nor make the authority verify it again.
        if not await self._store.consume_nonce(node_id, request.certify_nonce, now=self._clock.now()):
            raise RefusalError("nonce", "attestation nonce is unknown, already used or expired; ask for a new one")
        if await self._store.is_banned(node_id):
            raise RefusalError("banned", "node is banned")
        known = await self._store.node(node_id)
        if known is not None and known.ak_public != request.ak_public and not self._standalone:
            # Anyone who can talk to the TPM can make an AK under the EK; only the first one counts.
            raise RefusalError("ak_changed", "node presents another AK than the one it enrolled; "
                                             "an operator must remove the node before it can enrol anew")
        mode = self._config.enrolment
        enrolled = ek_hex in self._config.enrolled_ek_hashes or await self._store.is_enrolled(ek_hex)
        if mode == "allowlist" and not enrolled:
            raise RefusalError("not_enrolled", f"EK {ek_hex[:16]}... is not enrolled")
        now = self._clock.now()
        session, blob, secret = begin_attestation(
            request,
            trust=self._trust,
            require_certificate=not enrolled,
            bank=self._config.pcr_bank,
            pcr_indices=self._config.pcr_indices,
            accept_missing_event_log=self._config.accept_missing_event_log,
            now=now,
        )
        if mode == "approve" and not enrolled:
            # A genuine TPM (its chain was just checked) that no operator has let in yet waits, named.
            await self._store.add_pending(ek_hex, node_id, now=now)
            raise RefusalError("pending", f"EK {ek_hex[:16]}... waits for `vouchd node approve {node_id}`")
        session.node_id = node_id
        # One attestation in progress per EK: a new one replaces the old, so a flood of requests
        # for public EKs cannot fill the table.
        if not await self._store.put_session(session.to_record(), max_sessions=MAX_PENDING_SESSIONS, now=now):
            raise RefusalError("busy", "too many attestations in progress")
        log.info("attestation challenge", extra={"node_id": node_id, "ek_hash": ek_hex})
        return Challenge(session=session.session, credential_blob=blob, encrypted_secret=secret,
                         server_nonce=session.server_nonce, pcr_bank=self._config.pcr_bank,
                         pcr_indices=tuple(self._config.pcr_indices))

    async def _complete(self, response: ChallengeResponse) -> AttestResult:
        now = self._clock.now()
        record = await self._store.take_session(response.session, now=now)
        if record is None or record.node_id != response.node_id:
            raise RefusalError("session_expired", "unknown or expired attestation session")
        session = AttestationSession.from_record(record)
        verified = complete_attestation(session, response.quote, now=now)
        # The node may have been banned while it answered the challenge.
        if await self._store.is_banned(session.node_id):
            raise RefusalError("banned", "node is banned")
        profile = await self._event_log_profile(session, verified.event_digests)
        selectors = [f"tpm:ek_hash:{session.ek_hash}", f"tpm:pcr_profile:{profile}", "node:tier:hardware"]
        if session.ek_issuer_cn:
            selectors.append(f"tpm:ek_issuer_cn:{session.ek_issuer_cn}")
        public_key = session.node_key.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # check_node_key_attributes: ECC P-256
        node_svid = self._current_ca().sign_x509_svid(public_key, SpiffeId.parse(session.node_id),
                                                      ttl=self._config.node_svid_ttl, tier=TrustTier.HARDWARE,
                                                      now=self._utc_now())
        # Everything is verified and the SVID exists: only now does the node become trusted.
        clock = verified.attest.clock_info
        await self._store.save_node(NodeRecord(
            node_id=session.node_id, ek_hash=session.ek_hash, tier=TrustTier.HARDWARE.value,
            state=NodeState.TRUSTED, ak_public=session.ak.to_tpm2b(), node_key_public=session.node_key.to_tpm2b(),
            selectors=tuple(sorted(selectors)), pcr_bank=self._config.pcr_bank,
            pcr_indices=tuple(session.selection.pcrs), pcr_digest=verified.attest.pcr_digest,
            reset_count=clock.reset_count, restart_count=clock.restart_count, clock=clock.clock,
            attested_at=now, last_quote_at=now,
        ))
        nonce, expires = await self._new_nonce(session.node_id)
        self._decide(DecisionKind.ATTEST, Outcome.OK, method="attest", node=NodeEvidence(
            session.node_id, quote_digest=hashlib.sha256(response.quote.attest).hexdigest(), pcr_profile=profile),
            serials=(serial_hex(node_svid),))
        revocations = await self.revocations.current()
        return AttestResult(node_svid=node_svid.public_bytes(Encoding.DER), bundle=self.bundle().der(),
                            selectors=tuple(sorted(selectors)), tier=TrustTier.HARDWARE.value,
                            nonce=nonce, nonce_expires_at=int(expires), revocations=revocations.signed,
                            jwt_bundle=self.jwt_bundle().to_jwks())

    async def _event_log_profile(self, session: AttestationSession, digests: tuple[str, ...]) -> str:
        """Which reference profile the node's event log satisfies (DESIGN §4.4).

        A profile is a set of accepted measurements (PCR, bank, digest of the quoted PCRs), learned
        from a known-good log. A standalone authority learns the first log it sees, its own host's;
        a fleet authority never learns on its own. Later logs must use only measurements of one
        profile. A host without a log is accepted only when configured, and says so.
        """
        if session.event_log is None:
            return "none"
        profiles = await self._store.profiles()
        for name, recorded in profiles.items():
            # A profile an older vouchd stored without event order, that this log satisfies by the
            # older rule: stored again in log order (narrower, never wider), so an upgrade locks no
            # host out of a boot it was accepted with.
            if legacy_profile_accepts(recorded, digests):
                await self._store.save_profile(name, list(digests), learned_from=session.node_id, now=self._clock.now())
                log.info("boot profile stored again in event-log order", extra={"profile": name,
                                                                                "node_id": session.node_id})
                return name
        matched = match_profile(profiles, digests)
        if matched is not None:
            return matched
        # Only at the node's very first attestation: once an operator removed the profile it was
        # learned as, the same boot must not be learned again behind their back.
        if not profiles and self._standalone and await self._store.node(session.node_id) is None:
            name = f"learned-{session.ek_hash[:12]}"
            await self._store.save_profile(name, list(digests), learned_from=session.node_id, now=self._clock.now())
            log.info("event log profile learned", extra={"profile": name, "node_id": session.node_id})
            return name
        raise RefusalError("policy", "event log contains measurements outside every accepted profile")

    # -- node attestation, static-secret tier ---------------------------------------------------
    async def _begin_key(self, request: KeyAttestRequest) -> KeyChallenge:
        node_id = request.node_id
        load_node_key_public(request.node_key_public)
        if node_id != str(key_node_spiffe_id(self._trust_domain, node_key_hash(request.node_key_public))):
            raise RefusalError("bad_request", "node id is not derived from the presented node key")
        self._check_attestation_rate(node_id)
        if await self._store.is_banned(node_id):
            raise RefusalError("banned", "node is banned")
        enrolled = self._enrolled_node_keys.get(node_id) or await self._store.node_key(node_id)
        if enrolled is None:
            await self._join(node_id, request)
        elif request.node_key_public != enrolled:
            raise RefusalError("bad_request", "another node key is enrolled under this node id")
        nonce, expires = await self._new_nonce(node_id)
        return KeyChallenge(nonce=nonce, expires_at=int(expires))

    async def _join(self, node_id: str, request: KeyAttestRequest) -> None:
        """Enrol the presented node key with a join token, spending it (design §4)."""
        if not request.join_token:
            raise RefusalError("not_enrolled", "no node key is enrolled under this node id; a host without a TPM "
                                               "joins with a token (`vouchd token create`)")
        token_id, secret = parse_join_token(request.join_token)
        now = self._clock.now()
        token = await self._store.use_join_token(token_id, secret_digest(secret), node_id, now=now)
        if token is None:
            raise RefusalError("not_enrolled", f"join token {token_id} is unknown, used or expired")
        await self._store.enrol_node_key(node_id, request.node_key_public, f"join token {token_id}", now=now)
        log.info("node joined with a token", extra={"node_id": node_id, "token_id": token_id,
                                                    "node_labels": list(token.node_labels)})

    async def _node_key_labels(self, node_id: str) -> tuple[str, ...]:
        """The node labels of the token a node joined with (none for a key enrolled otherwise)."""
        if node_id in self._enrolled_node_keys:
            return ()
        return next((t.node_labels for t in await self._store.join_tokens() if t.used_by == node_id), ())

    async def _complete_key(self, response: KeyChallengeResponse) -> AttestResult:
        node_id = response.node_id
        spki = self._enrolled_node_keys.get(node_id) or await self._store.node_key(node_id)
        if spki is None:
            raise RefusalError("not_enrolled", "no node key is enrolled under this node id")
        now = self._clock.now()
        if not await self._store.consume_nonce(node_id, response.nonce, now=now):
            raise RefusalError("session_expired", "challenge nonce is unknown, already used or expired")
        try:
            verify_node_key_signature(spki, CHALLENGE_CONTEXT, response.nonce + node_id.encode(), response.signature)
        except SignatureError as err:
            raise RefusalError("bad_evidence", f"challenge answer: {err}") from None
        if await self._store.is_banned(node_id):
            raise RefusalError("banned", "node is banned")
        key_hash = node_key_hash(spki)
        labels = tuple(f"node:label:{label}" for label in await self._node_key_labels(node_id))
        selectors = tuple(sorted((f"node:key_hash:{key_hash}", f"node:tier:{TrustTier.STATIC_SECRET.value}",
                                  *labels)))
        node_svid = self._current_ca().sign_x509_svid(load_node_key_public(spki), SpiffeId.parse(node_id),
                                                      ttl=self._config.node_svid_ttl, tier=TrustTier.STATIC_SECRET,
                                                      now=self._utc_now())
        # No EK and no quote: the record's TPM fields stay empty, and its ek_hash column (unique, shown
        # by `vouchd node list`) names the node key instead, never in the 64-hex form of an EK hash.
        await self._store.save_node(NodeRecord(
            node_id=node_id, ek_hash=f"key:{key_hash}", tier=TrustTier.STATIC_SECRET.value,
            state=NodeState.TRUSTED, ak_public=b"", node_key_public=spki, selectors=selectors,
            pcr_bank="", pcr_indices=(), pcr_digest=b"", reset_count=0, restart_count=0, clock=0,
            attested_at=now, last_quote_at=now,
        ))
        nonce, expires = await self._new_nonce(node_id)
        self._decide(DecisionKind.ATTEST, Outcome.OK, method="attest", node=NodeEvidence(node_id),
                     serials=(serial_hex(node_svid),))
        revocations = await self.revocations.current()
        return AttestResult(node_svid=node_svid.public_bytes(Encoding.DER), bundle=self.bundle().der(),
                            selectors=selectors, tier=TrustTier.STATIC_SECRET.value, nonce=nonce,
                            nonce_expires_at=int(expires), revocations=revocations.signed,
                            jwt_bundle=self.jwt_bundle().to_jwks())

    def _check_attestation_rate(self, node_id: str) -> None:
        refusal = self._attestation_limits.refusal(node_id)
        if refusal is not None:
            raise RefusalError("busy", refusal)

    async def _grant_attest_nonce(self, node_id: str) -> NonceGrant:
        """A nonce for the next AttestRequest: anyone may ask, so only within the rate limits."""
        try:
            SpiffeId.parse(node_id)
        except SpiffeError:
            raise RefusalError("bad_request", "node id is not a SPIFFE ID") from None
        self._check_attestation_rate(node_id)
        if await self._store.is_banned(node_id):
            raise RefusalError("banned", "node is banned")
        nonce, expires = await self._new_nonce(node_id)
        return NonceGrant(nonce=nonce, expires_at=int(expires), pcr_bank=self._config.pcr_bank,
                          pcr_indices=tuple(self._config.pcr_indices))

    # -- requests ----------------------------------------------------------------------------
    async def _new_nonce(self, node_id: str) -> tuple[bytes, float]:
        nonce = secrets.token_bytes(32)
        now = self._clock.now()
        expires = now + NONCE_TTL
        await self._store.add_nonce(node_id, nonce, expires, now=now)
        return nonce, expires

    async def _trusted_node(self, node_id: str) -> NodeRecord:
        node = await self._store.node(node_id)
        if node is None:
            raise RefusalError("reattest", "node is unknown; attest first")
        if node.state in (NodeState.BANNED, NodeState.FAILED):
            raise RefusalError(node.state.value, f"node is {node.state.value}")
        # The ban itself, not only the state it set: an attestation that completed while the ban was
        # written may have saved the node as trusted again.
        if await self._store.is_banned(node_id):
            raise RefusalError("banned", "node is banned")
        if node.state is not NodeState.TRUSTED:
            raise RefusalError("reattest", f"node is {node.state.value}; attest again")
        return node

    async def _grant_nonce(self, node_id: str) -> NonceGrant:
        node = await self._trusted_node(node_id)
        nonce, expires = await self._new_nonce(node_id)
        return NonceGrant(nonce=nonce, expires_at=int(expires), pcr_bank=node.pcr_bank,
                          pcr_indices=node.pcr_indices)

    async def _quoted_request(self, message: QuotedRequest, raw: bytes) -> bytes:
        node = await self._trusted_node(message.node_id)
        if node.tier != TrustTier.HARDWARE.value:
            raise RefusalError("bad_request", f"a {node.tier} node signs its requests with its node key")

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
            raise RefusalError("bad_request", "a hardware node quotes its requests with its TPM")

        def verify() -> None:
            try:
                verify_node_key_signature(node.node_key_public, REQUEST_CONTEXT, message.body, message.signature)
            except SignatureError as err:
                raise RefusalError("bad_evidence", f"request: {err}") from None

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
            raise RefusalError("bad_request", "request body names another node")
        now = self._clock.now()
        if abs(body.sent_at - now) > _CLOCK_TOLERANCE:
            raise RefusalError("bad_request", "request time is too far from the authority's clock")
        # The nonce first: a replayed request is refused here and changes nothing about the node.
        if not await self._store.consume_nonce(node.node_id, body.nonce, now=now):
            raise RefusalError("nonce", "request nonce is unknown, already used or expired")
        evidence = await settle(proof)
        response = await self._serve(node, body, evidence)
        signed = self._sign(response, node_id=node.node_id, request=raw)
        await self._store.remember_reply(node.node_id, digest, signed, now=now, keep_seconds=ANSWERED_KEEP_SECONDS)
        return signed

    async def _serve(self, node: NodeRecord, body: RequestBody, evidence: NodeEvidence) -> CredentialResponse:
        if len(body.x509_svids) > MAX_X509_SVIDS_PER_REQUEST or len(body.jwt_svids) > MAX_JWT_SVIDS_PER_REQUEST:
            raise RefusalError("bad_request", f"more than {MAX_X509_SVIDS_PER_REQUEST} SVID requests in one batch")
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
        nonce, expires = await self._new_nonce(node.node_id)
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
