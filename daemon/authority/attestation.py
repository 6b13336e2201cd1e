"""Node attestation: how a node proves itself and gets its node SVID (design §4).

The hardware tier: the EK (and its certificate chain), the AK and node key created under it,
credential activation, a quote over the PCRs the authority demands and the event log that replays
to them, matched against the boot profiles. The static-secret tier: a node key enrolled by a join
token (or, standalone, by the host's own operator) answering a challenge. Both begin with a nonce
the authority chose, within rate limits per node and in total.

`NodeAttestation` decides; what it needs of the rest of the authority (nonces, the CA, the
decision sink, the parts of an AttestResult every answer shares) comes through AttestationServices.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from vouchd.authority.ekchain import EkTrust
from vouchd.authority.errors import RefusalError
from vouchd.authority.jointokens import parse_join_token, secret_digest
from vouchd.authority.limits import AttestationLimits
from vouchd.authority.store import NodeRecord, NodeState, Store
from vouchd.authority.verifier import (
    AttestationSession,
    begin_attestation,
    complete_attestation,
    legacy_profile_accepts,
    match_profile,
)
from vouchd.clock import Clock
from vouchd.config import AuthorityConfig
from vouchd.decisions import DecisionKind, NodeEvidence, Outcome
from vouchd.entries import Entry
from vouchd.evidence import EvidenceError, TpmPublic
from vouchd.protocol.errors import SignatureError
from vouchd.protocol.identities import ek_hash, key_node_spiffe_id, node_spiffe_id
from vouchd.protocol.keyproof import (
    CHALLENGE_CONTEXT,
    load_node_key_public,
    node_key_hash,
    verify_node_key_signature,
)
from vouchd.protocol.messages import (
    AttestRequest,
    AttestResult,
    Challenge,
    ChallengeResponse,
    KeyAttestRequest,
    KeyChallenge,
    KeyChallengeResponse,
    NonceGrant,
)
from vouchd.protocol.refusals import Refusal
from vouchd.spiffe import SpiffeError, SpiffeId, TrustDomain, TrustTier, serial_hex

__all__ = ["MAX_PENDING_SESSIONS", "AttestationServices", "NodeAttestation"]

log = logging.getLogger("vouchd.authority")

MAX_PENDING_SESSIONS = 10_000
_LABEL = "node:label:"


class AttestationServices(Protocol):
    """What node attestation needs of the authority around it (vouchd.authority.server.Authority)."""

    async def new_nonce(self, node_id: str) -> tuple[bytes, float]: ...

    def sign_node_svid(self, public_key: ec.EllipticCurvePublicKey, node_id: str, tier: TrustTier) -> x509.Certificate:
        ...

    async def attest_result(self, node_id: str, node_svid: x509.Certificate, selectors: tuple[str, ...],
                            tier: TrustTier) -> AttestResult: ...

    def decide(self, kind: DecisionKind, outcome: Outcome, *, method: str, reason: str = "",
               node: NodeEvidence | None = None, entries: tuple[Entry, ...] = (),
               serials: tuple[str, ...] = ()) -> None: ...


class NodeAttestation:
    def __init__(self, config: AuthorityConfig, trust_domain: TrustDomain, *, store: Store, ek_trust: EkTrust,
                 clock: Clock, services: AttestationServices, standalone: bool) -> None:
        self._config = config
        self._trust_domain = trust_domain
        self._store = store
        self._trust = ek_trust
        self._clock = clock
        self._services = services
        self._standalone = standalone
        self._attestation_limits = AttestationLimits(clock)

    async def enrol(self, ek_hash_hex: str, source: str) -> None:
        """Record an EK as enrolled (standalone mode enrols the local TPM's EK itself)."""
        await self._store.enrol_ek(ek_hash_hex, source, now=self._clock.now())

    async def enrol_node_key(self, spki_der: bytes, source: str) -> str:
        """Let a node without a TPM in by its software node key (standalone mode enrols its own host's,
        a join token a fleet host's); its node id. Kept with the store's node keys, never with the
        enrolled EKs: a key held in software must never pass for a TPM's EK. The node is at the
        static-secret tier: entries reach it only where they allow it."""
        load_node_key_public(spki_der)
        node_id = str(key_node_spiffe_id(self._trust_domain, node_key_hash(spki_der)))
        await self._store.enrol_node_key(node_id, spki_der, source, now=self._clock.now())
        return node_id

    async def begin(self, request: AttestRequest) -> Challenge:
        try:
            ek = TpmPublic.from_tpm2b(request.ek_public)
        except EvidenceError as err:
            raise RefusalError(Refusal.BAD_EVIDENCE, f"EK public area: {err}") from None
        ek_hex = ek_hash(ek)
        node_id = str(node_spiffe_id(self._trust_domain, ek_hex))
        if request.node_id != node_id:
            raise RefusalError(Refusal.BAD_REQUEST, "node id is not derived from the presented EK")
        self._check_attestation_rate(node_id)
        # The authority's nonce, spent before anything else changes: a captured request replayed
        # cannot replace this node's attestation in progress, nor make the authority verify it again.
        if not await self._store.consume_nonce(node_id, request.certify_nonce, now=self._clock.now()):
            raise RefusalError(Refusal.NONCE,
                               "attestation nonce is unknown, already used or expired; ask for a new one")
        if await self._store.is_banned(node_id):
            raise RefusalError(Refusal.BANNED, "node is banned")
        known = await self._store.node(node_id)
        if known is not None and known.ak_public != request.ak_public and not self._standalone:
            # Anyone who can talk to the TPM can make an AK under the EK; only the first one counts.
            raise RefusalError(Refusal.AK_CHANGED, "node presents another AK than the one it enrolled; "
                                             "an operator must remove the node before it can enrol anew")
        mode = self._config.enrolment
        enrolled = ek_hex in self._config.enrolled_ek_hashes or await self._store.is_enrolled(ek_hex)
        if mode == "allowlist" and not enrolled:
            raise RefusalError(Refusal.NOT_ENROLLED, f"EK {ek_hex[:16]}... is not enrolled")
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
            raise RefusalError(Refusal.PENDING, f"EK {ek_hex[:16]}... waits for `vouchd node approve {node_id}`")
        session.node_id = node_id
        # One attestation in progress per EK: a new one replaces the old, so a flood of requests
        # for public EKs cannot fill the table.
        if not await self._store.put_session(session.to_record(), max_sessions=MAX_PENDING_SESSIONS, now=now):
            raise RefusalError(Refusal.BUSY, "too many attestations in progress")
        log.info("attestation challenge", extra={"node_id": node_id, "ek_hash": ek_hex})
        return Challenge(session=session.session, credential_blob=blob, encrypted_secret=secret,
                         server_nonce=session.server_nonce, pcr_bank=self._config.pcr_bank,
                         pcr_indices=tuple(self._config.pcr_indices))

    async def complete(self, response: ChallengeResponse) -> AttestResult:
        now = self._clock.now()
        record = await self._store.take_session(response.session, now=now)
        if record is None or record.node_id != response.node_id:
            raise RefusalError(Refusal.SESSION_EXPIRED, "unknown or expired attestation session")
        session = AttestationSession.from_record(record)
        verified = complete_attestation(session, response.quote, now=now)
        # The node may have been banned while it answered the challenge.
        if await self._store.is_banned(session.node_id):
            raise RefusalError(Refusal.BANNED, "node is banned")
        profile = await self._event_log_profile(session, verified.event_digests)
        selectors = [f"tpm:ek_hash:{session.ek_hash}", f"tpm:pcr_profile:{profile}", "node:tier:hardware"]
        if session.ek_issuer_cn:
            selectors.append(f"tpm:ek_issuer_cn:{session.ek_issuer_cn}")
        public_key = session.node_key.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # check_node_key_attributes: ECC P-256
        node_svid = self._services.sign_node_svid(public_key, session.node_id, TrustTier.HARDWARE)
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
        self._services.decide(DecisionKind.ATTEST, Outcome.OK, method="attest", node=NodeEvidence(
            session.node_id, quote_digest=hashlib.sha256(response.quote.attest).hexdigest(), pcr_profile=profile),
            serials=(serial_hex(node_svid),))
        return await self._services.attest_result(session.node_id, node_svid, tuple(sorted(selectors)),
                                                  TrustTier.HARDWARE)

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
        raise RefusalError(Refusal.POLICY, "event log contains measurements outside every accepted profile")

    # -- the static-secret tier -----------------------------------------------------------------
    async def begin_key(self, request: KeyAttestRequest) -> KeyChallenge:
        node_id = request.node_id
        load_node_key_public(request.node_key_public)
        if node_id != str(key_node_spiffe_id(self._trust_domain, node_key_hash(request.node_key_public))):
            raise RefusalError(Refusal.BAD_REQUEST, "node id is not derived from the presented node key")
        self._check_attestation_rate(node_id)
        if await self._store.is_banned(node_id):
            raise RefusalError(Refusal.BANNED, "node is banned")
        enrolled = await self._store.node_key(node_id)
        if enrolled is None:
            await self._join(node_id, request)
        elif request.node_key_public != enrolled:
            raise RefusalError(Refusal.BAD_REQUEST, "another node key is enrolled under this node id")
        nonce, expires = await self._services.new_nonce(node_id)
        return KeyChallenge(nonce=nonce, expires_at=int(expires))

    async def _join(self, node_id: str, request: KeyAttestRequest) -> None:
        """Enrol the presented node key with a join token, spending it (design §4)."""
        if not request.join_token:
            raise RefusalError(Refusal.NOT_ENROLLED, "no node key is enrolled under this node id; a host without a TPM "
                                               "joins with a token (`vouchd token create`)")
        token_id, secret = parse_join_token(request.join_token)
        now = self._clock.now()
        token = await self._store.use_join_token(token_id, secret_digest(secret), node_id, now=now)
        if token is None:
            raise RefusalError(Refusal.NOT_ENROLLED, f"join token {token_id} is unknown, used or expired")
        await self._store.enrol_node_key(node_id, request.node_key_public, f"join token {token_id}", now=now)
        log.info("node joined with a token", extra={"node_id": node_id, "token_id": token_id,
                                                    "node_labels": list(token.node_labels)})

    async def _node_key_labels(self, node_id: str) -> tuple[str, ...]:
        """The node labels of the token a node joined with (none for a key enrolled otherwise): kept in
        its node record from its first attestation on, looked up among the tokens only before that."""
        known = await self._store.node(node_id)
        if known is not None:
            return tuple(s.removeprefix(_LABEL) for s in known.selectors if s.startswith(_LABEL))
        return next((t.node_labels for t in await self._store.join_tokens() if t.used_by == node_id), ())

    async def complete_key(self, response: KeyChallengeResponse) -> AttestResult:
        node_id = response.node_id
        spki = await self._store.node_key(node_id)
        if spki is None:
            raise RefusalError(Refusal.NOT_ENROLLED, "no node key is enrolled under this node id")
        now = self._clock.now()
        if not await self._store.consume_nonce(node_id, response.nonce, now=now):
            raise RefusalError(Refusal.SESSION_EXPIRED, "challenge nonce is unknown, already used or expired")
        try:
            verify_node_key_signature(spki, CHALLENGE_CONTEXT, response.nonce + node_id.encode(), response.signature)
        except SignatureError as err:
            raise RefusalError(Refusal.BAD_EVIDENCE, f"challenge answer: {err}") from None
        if await self._store.is_banned(node_id):
            raise RefusalError(Refusal.BANNED, "node is banned")
        key_hash = node_key_hash(spki)
        labels = tuple(f"node:label:{label}" for label in await self._node_key_labels(node_id))
        selectors = tuple(sorted((f"node:key_hash:{key_hash}", f"node:tier:{TrustTier.STATIC_SECRET.value}",
                                  *labels)))
        node_svid = self._services.sign_node_svid(load_node_key_public(spki), node_id, TrustTier.STATIC_SECRET)
        # No EK and no quote: the record's TPM fields stay empty, and its ek_hash column (unique, shown
        # by `vouchd node list`) names the node key instead, never in the 64-hex form of an EK hash.
        await self._store.save_node(NodeRecord(
            node_id=node_id, ek_hash=f"key:{key_hash}", tier=TrustTier.STATIC_SECRET.value,
            state=NodeState.TRUSTED, ak_public=b"", node_key_public=spki, selectors=selectors,
            pcr_bank="", pcr_indices=(), pcr_digest=b"", reset_count=0, restart_count=0, clock=0,
            attested_at=now, last_quote_at=now,
        ))
        self._services.decide(DecisionKind.ATTEST, Outcome.OK, method="attest", node=NodeEvidence(node_id),
                              serials=(serial_hex(node_svid),))
        return await self._services.attest_result(node_id, node_svid, selectors, TrustTier.STATIC_SECRET)

    def _check_attestation_rate(self, node_id: str) -> None:
        refusal = self._attestation_limits.refusal(node_id)
        if refusal is not None:
            raise RefusalError(Refusal.BUSY, refusal)

    async def grant_attest_nonce(self, node_id: str) -> NonceGrant:
        """A nonce for the next AttestRequest: anyone may ask, so only within the rate limits."""
        try:
            SpiffeId.parse(node_id)
        except SpiffeError:
            raise RefusalError(Refusal.BAD_REQUEST, "node id is not a SPIFFE ID") from None
        self._check_attestation_rate(node_id)
        if await self._store.is_banned(node_id):
            raise RefusalError(Refusal.BANNED, "node is banned")
        nonce, expires = await self._services.new_nonce(node_id)
        return NonceGrant(nonce=nonce, expires_at=int(expires), pcr_bank=self._config.pcr_bank,
                          pcr_indices=tuple(self._config.pcr_indices))

