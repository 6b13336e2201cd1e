"""The authority: verifies TPM evidence, holds the trust domain CA, signs SVIDs (DESIGN §4, §5).

`Authority.handle(topic, request)` is the whole wire surface: request bytes in, signed reply bytes
out. The MQTT transport and the in-process LocalTransport both call it, so standalone mode and
fleet mode run the same checks.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from vouchd.authority.ca import CertificateAuthority
from vouchd.authority.entries import Entry, EntryIndex
from vouchd.authority.errors import AuthorityError, CaError, RefusalError
from vouchd.authority.store import AuthorityStore, NodeRecord, NodeState
from vouchd.authority.verifier import (
    AttestationSession,
    EkTrust,
    begin_attestation,
    check_quote_continuity,
    complete_attestation,
    verify_request_quote,
)
from vouchd.config import AuthorityConfig
from vouchd.evidence import EvidenceError, TpmPublic
from vouchd.protocol.codec import decode, decode_as
from vouchd.protocol.errors import MessageError
from vouchd.protocol.identities import authority_spiffe_id, ek_hash, node_spiffe_id
from vouchd.protocol.messages import (
    MAX_X509_SVIDS_PER_REQUEST,
    AttestRequest,
    AttestResult,
    Challenge,
    ChallengeResponse,
    CredentialResponse,
    EntryView,
    ErrorReply,
    IssuedX509Svid,
    ItemError,
    NonceGrant,
    NonceRequest,
    QuotedRequest,
    RequestBody,
)
from vouchd.protocol.signing import ReplySigner, request_digest
from vouchd.protocol.transport import ATTEST_TOPIC, REQUEST_TOPIC
from vouchd.securefiles import InsecureFileError, read_private, write_atomically
from vouchd.selectors import Selector, selector_set
from vouchd.spiffe import InvalidSvidError, SpiffeId, TrustDomain, TrustTier, X509Bundle, csr_public_key, serial_hex

__all__ = ["Authority"]

log = logging.getLogger("vouchd.authority")

NONCE_TTL = 30.0
ANSWERED_KEEP_SECONDS = 600.0
MAX_PENDING_SESSIONS = 10_000
_AUTHORITY_KEY_TTL = timedelta(hours=24)
_CLOCK_TOLERANCE = 300
_CA_CHECK_INTERVAL = 60.0


_CERTIFICATE_SUFFIXES = (".pem", ".crt", ".cer", ".der")


def _load_certificates(paths: Iterable[Path], what: str) -> list[x509.Certificate]:
    """Certificates from files, or from every *.pem/*.crt/*.cer/*.der file of a directory."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in _CERTIFICATE_SUFFIXES))
        else:
            files.append(path)
    certificates: list[x509.Certificate] = []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise AuthorityError(f"{path}: cannot read {what}: {err.strerror}") from None
        try:
            certificates.extend(x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data
                                else [x509.load_der_x509_certificate(data)])
        except ValueError:
            raise AuthorityError(f"{path}: {what} is not a PEM or DER certificate") from None
    return certificates


def _load_or_create_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The reply-signing key: read (never through a symlink, never if others may read it) or made."""
    try:
        data = read_private(path)
    except FileNotFoundError:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomically(path, pem)
        except OSError as err:
            raise AuthorityError(f"{path}: authority signing key cannot be written: {err.strerror}") from None
        return key
    except InsecureFileError as err:
        raise AuthorityError(f"{path}: authority signing key is {err}") from None
    except OSError as err:
        raise AuthorityError(f"{path}: authority signing key cannot be read: {err.strerror}") from None
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise AuthorityError(f"{path}: authority signing key is not an unencrypted PEM private key") from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise AuthorityError(f"{path}: authority signing key is not an EC key")
    return loaded


@dataclass(frozen=True)
class _NodeView:
    spiffe_id: SpiffeId
    selectors: frozenset[Selector]
    tier: TrustTier


class Authority:
    """The authority.

    `standalone` is the single-host mode, where the operator of the host is the operator of the
    authority: the first event log seen becomes the accepted profile, and a node that lost its
    agent state may enrol a new AK under its EK. A fleet authority does neither on its own.
    """

    def __init__(self, config: AuthorityConfig, trust_domain: TrustDomain, entries: Iterable[Entry] = (),
                 *, standalone: bool = False) -> None:
        self._config = config
        self._standalone = standalone
        self._trust_domain = trust_domain
        self._store = AuthorityStore(config.state_dir / "authority.db")
        self._ca = CertificateAuthority.load_or_create(config.state_dir, trust_domain, ca_ttl=config.ca_ttl)
        self._ca_checked_at = time.monotonic()
        self._trust = EkTrust(_load_certificates(config.ek_roots, "EK root certificate"),
                              _load_certificates(config.ek_intermediates, "EK intermediate certificate"))
        self._entries = EntryIndex(entries)
        self._sessions: dict[str, AttestationSession] = {}
        self._session_by_ek: dict[str, str] = {}
        self._signing_key = _load_or_create_key(config.state_dir / "reply-signing.key")
        self._signer, self._signer_expires = self._mint_signer()

    @property
    def trust_domain(self) -> TrustDomain:
        return self._trust_domain

    @property
    def store(self) -> AuthorityStore:
        return self._store

    def close(self) -> None:
        self._store.close()

    def bundle(self) -> X509Bundle:
        return self._current_ca().bundle()

    def _current_ca(self) -> CertificateAuthority:
        """The CA, rotated when its root passes half of its lifetime (checked once a minute)."""
        if time.monotonic() - self._ca_checked_at >= _CA_CHECK_INTERVAL:
            previous, previously_prepared = self._ca.certificate, self._ca.prepared
            self._ca_checked_at = time.monotonic()
            try:
                self._ca = CertificateAuthority.load_or_create(self._config.state_dir, self._trust_domain,
                                                               ca_ttl=self._config.ca_ttl)
            except CaError as err:
                # A rotation step that cannot be written now (disk full, permissions) must not stop
                # issuance while the active root is still valid: keep it, say so, try next minute.
                log.error("ca check failed; the active root keeps signing",
                          extra={"reason": str(err), "root_expires": self._ca.certificate.not_valid_after_utc})
                return self._ca
            if self._ca.prepared is not None and self._ca.prepared != previously_prepared:
                log.info("ca root prepared: published in the bundle, signs once agents have it",
                         extra={"root_serial": serial_hex(self._ca.prepared)})
            if self._ca.certificate != previous:
                log.info("ca rotated", extra={"root_serial": serial_hex(self._ca.certificate)})
                self._signer, self._signer_expires = self._mint_signer()
        return self._ca

    def enrol(self, ek_hash_hex: str, source: str) -> None:
        """Record an EK as enrolled (standalone mode enrols the local TPM's EK itself)."""
        self._store.enrol_ek(ek_hash_hex, source)

    def _mint_signer(self) -> tuple[ReplySigner, float]:
        cert = self._ca.sign_x509_svid(self._signing_key.public_key(), authority_spiffe_id(self._trust_domain),
                                       ttl=_AUTHORITY_KEY_TTL, tier=TrustTier.HARDWARE)
        expires = cert.not_valid_after_utc.timestamp()
        lifetime = expires - cert.not_valid_before_utc.timestamp()
        return ReplySigner(self._signing_key, [cert]), expires - lifetime / 2

    def _sign(self, reply: object, *, node_id: str, request: bytes) -> bytes:
        if time.time() >= self._signer_expires:
            self._signer, self._signer_expires = self._mint_signer()
        return self._signer.sign(reply, node_id=node_id, request=request)

    # -- the wire surface --------------------------------------------------------------------
    async def handle(self, topic: str, request: bytes) -> bytes:
        """Answer one request; every outcome, refusals included, is a signed reply."""
        node_id = ""
        try:
            message = decode(request)
            node_id = str(getattr(message, "node_id", ""))
            if topic == ATTEST_TOPIC and isinstance(message, AttestRequest):
                return self._sign(self._begin(message), node_id=node_id, request=request)
            if topic == ATTEST_TOPIC and isinstance(message, ChallengeResponse):
                return self._sign(self._complete(message), node_id=node_id, request=request)
            if topic == REQUEST_TOPIC and isinstance(message, NonceRequest):
                return self._sign(self._grant_nonce(message.node_id), node_id=node_id, request=request)
            if topic == REQUEST_TOPIC and isinstance(message, QuotedRequest):
                return self._quoted_request(message, request)
            raise RefusalError("bad_request", f"{type(message).__name__} is not accepted on {topic}")
        except (MessageError, EvidenceError) as err:
            log.warning("malformed request", extra={"topic": topic, "node_id": node_id, "reason": str(err)})
            return self._sign(ErrorReply("bad_request", str(err)), node_id=node_id, request=request)
        except RefusalError as refusal:
            log.warning("request refused", extra={"topic": topic, "node_id": node_id, "code": refusal.code,
                                                  "reason": str(refusal)})
            return self._sign(ErrorReply(refusal.code, str(refusal)), node_id=node_id, request=request)
        except Exception:
            # Input that reached a bug must still get an answer, and must not take the authority down.
            log.exception("request failed", extra={"topic": topic, "node_id": node_id})
            return self._sign(ErrorReply("internal", "internal error"), node_id=node_id, request=request)

    # -- node attestation --------------------------------------------------------------------
    def _begin(self, request: AttestRequest) -> Challenge:
        try:
            ek = TpmPublic.from_tpm2b(request.ek_public)
        except EvidenceError as err:
            raise RefusalError("bad_evidence", f"EK public area: {err}") from None
        ek_hex = ek_hash(ek)
        node_id = str(node_spiffe_id(self._trust_domain, ek_hex))
        if request.node_id != node_id:
            raise RefusalError("bad_request", "node id is not derived from the presented EK")
        if self._store.is_banned(node_id):
            raise RefusalError("banned", "node is banned")
        known = self._store.node(node_id)
        if known is not None and known.ak_public != request.ak_public and not self._standalone:
            # Anyone who can talk to the TPM can make an AK under the EK; only the first one counts.
            raise RefusalError("ak_changed", "node presents another AK than the one it enrolled; "
                                             "an operator must remove the node before it can enrol anew")
        mode = self._config.enrolment
        enrolled = ek_hex in self._config.enrolled_ek_hashes or self._store.is_enrolled(ek_hex)
        if mode in ("allowlist", "approve") and not enrolled:
            raise RefusalError("not_enrolled", f"EK {ek_hex[:16]}... is not enrolled")
        session, blob, secret = begin_attestation(
            request,
            trust=self._trust,
            require_certificate=not enrolled,
            bank=self._config.pcr_bank,
            pcr_indices=self._config.pcr_indices,
            accept_missing_event_log=self._config.accept_missing_event_log,
        )
        session.node_id = node_id
        self._expire_sessions()
        # One attestation in progress per EK: a new one replaces the old, so a flood of requests
        # for public EKs cannot fill the table.
        if len(self._sessions) >= MAX_PENDING_SESSIONS and ek_hex not in self._session_by_ek:
            raise RefusalError("busy", "too many attestations in progress")
        replaced = self._session_by_ek.pop(ek_hex, None)
        if replaced is not None:
            self._sessions.pop(replaced, None)
        self._sessions[session.session] = session
        self._session_by_ek[ek_hex] = session.session
        log.info("attestation challenge", extra={"node_id": node_id, "ek_hash": ek_hex})
        return Challenge(session=session.session, credential_blob=blob, encrypted_secret=secret,
                         server_nonce=session.server_nonce, pcr_bank=self._config.pcr_bank,
                         pcr_indices=tuple(self._config.pcr_indices))

    def _expire_sessions(self) -> None:
        now = time.monotonic()
        for key in [k for k, s in self._sessions.items() if s.expires_at < now]:
            self._forget_session(key)

    def _forget_session(self, session_id: str) -> AttestationSession | None:
        session = self._sessions.pop(session_id, None)
        if session is not None and self._session_by_ek.get(session.ek_hash) == session_id:
            del self._session_by_ek[session.ek_hash]
        return session

    def _complete(self, response: ChallengeResponse) -> AttestResult:
        session = self._sessions.get(response.session)
        if session is None or session.node_id != response.node_id:
            raise RefusalError("session_expired", "unknown or expired attestation session")
        self._forget_session(response.session)
        verified = complete_attestation(session, response.quote)
        # The node may have been banned while it answered the challenge.
        if self._store.is_banned(session.node_id):
            raise RefusalError("banned", "node is banned")
        profile = self._event_log_profile(session, verified.event_digests)
        selectors = [f"tpm:ek_hash:{session.ek_hash}", f"tpm:pcr_profile:{profile}", "node:tier:hardware"]
        if session.ek_issuer_cn:
            selectors.append(f"tpm:ek_issuer_cn:{session.ek_issuer_cn}")
        public_key = session.node_key.public_key()
        assert isinstance(public_key, ec.EllipticCurvePublicKey)  # check_node_key_attributes: ECC P-256
        node_svid = self._current_ca().sign_x509_svid(public_key, SpiffeId.parse(session.node_id),
                                                      ttl=self._config.node_svid_ttl, tier=TrustTier.HARDWARE)
        # Everything is verified and the SVID exists: only now does the node become trusted.
        clock = verified.attest.clock_info
        now = time.time()
        self._store.save_node(NodeRecord(
            node_id=session.node_id, ek_hash=session.ek_hash, tier=TrustTier.HARDWARE.value,
            state=NodeState.TRUSTED, ak_public=session.ak.to_tpm2b(), node_key_public=session.node_key.to_tpm2b(),
            selectors=tuple(sorted(selectors)), pcr_bank=self._config.pcr_bank,
            pcr_indices=tuple(session.selection.pcrs), pcr_digest=verified.attest.pcr_digest,
            reset_count=clock.reset_count, restart_count=clock.restart_count, clock=clock.clock,
            attested_at=now, last_quote_at=now,
        ))
        nonce, expires = self._new_nonce(session.node_id)
        log.info("node attested", extra={"node_id": session.node_id, "pcr_profile": profile,
                                         "svid_serial": serial_hex(node_svid)})
        return AttestResult(node_svid=node_svid.public_bytes(Encoding.DER), bundle=self.bundle().der(),
                            selectors=tuple(sorted(selectors)), tier=TrustTier.HARDWARE.value,
                            nonce=nonce, nonce_expires_at=int(expires))

    def _event_log_profile(self, session: AttestationSession, digests: tuple[str, ...]) -> str:
        """Which reference profile the node's event log satisfies (DESIGN §4.4).

        A profile is a set of accepted measurements (PCR, bank, digest of the quoted PCRs), learned
        from a known-good log. A standalone authority learns the first log it sees, its own host's;
        a fleet authority never learns on its own. Later logs must use only measurements of one
        profile. A host without a log is accepted only when configured, and says so.
        """
        if session.event_log is None:
            return "none"
        profiles = self._store.profiles()
        for name, accepted in profiles.items():
            if set(digests) <= accepted:
                return name
        if not profiles and self._standalone:
            name = f"learned-{session.ek_hash[:12]}"
            self._store.save_profile(name, list(digests), learned_from=session.node_id)
            log.info("event log profile learned", extra={"profile": name, "node_id": session.node_id})
            return name
        raise RefusalError("policy", "event log contains measurements outside every accepted profile")

    # -- requests ----------------------------------------------------------------------------
    def _new_nonce(self, node_id: str) -> tuple[bytes, float]:
        nonce = secrets.token_bytes(32)
        expires = time.time() + NONCE_TTL
        self._store.add_nonce(node_id, nonce, expires)
        return nonce, expires

    def _trusted_node(self, node_id: str) -> NodeRecord:
        node = self._store.node(node_id)
        if node is None:
            raise RefusalError("reattest", "node is unknown; attest first")
        if node.state in (NodeState.BANNED, NodeState.FAILED):
            raise RefusalError(node.state.value, f"node is {node.state.value}")
        if node.state is not NodeState.TRUSTED:
            raise RefusalError("reattest", f"node is {node.state.value}; attest again")
        return node

    def _grant_nonce(self, node_id: str) -> NonceGrant:
        node = self._trusted_node(node_id)
        nonce, expires = self._new_nonce(node_id)
        return NonceGrant(nonce=nonce, expires_at=int(expires), pcr_bank=node.pcr_bank,
                          pcr_indices=node.pcr_indices)

    def _quoted_request(self, message: QuotedRequest, raw: bytes) -> bytes:
        node = self._trusted_node(message.node_id)
        # Keyed like the reply's signature (in_reply_to): the very same request bytes, nothing less.
        digest = request_digest(raw)
        cached = self._store.answered_reply(node.node_id, digest)
        if cached is not None:
            return cached  # a redelivered request gets the very same reply
        attest = verify_request_quote(node, message.quote, message.body)
        body = decode_as(RequestBody, message.body)
        if body.node_id != node.node_id:
            raise RefusalError("bad_request", "request body names another node")
        if abs(body.sent_at - time.time()) > _CLOCK_TOLERANCE:
            raise RefusalError("bad_request", "request time is too far from the authority's clock")
        # The nonce first: a replayed request is refused here and changes nothing about the node.
        if not self._store.consume_nonce(node.node_id, body.nonce):
            raise RefusalError("nonce", "request nonce is unknown, already used or expired")
        try:
            check_quote_continuity(node, attest)
        except RefusalError:
            self._store.set_node_state(node.node_id, NodeState.ATTESTING)
            raise
        clock = attest.clock_info
        self._store.record_quote(node.node_id, reset_count=clock.reset_count,
                                 restart_count=clock.restart_count, clock=clock.clock)
        response = self._serve(node, body, quote_digest=hashlib.sha256(message.quote.attest).hexdigest())
        signed = self._sign(response, node_id=node.node_id, request=raw)
        self._store.remember_reply(node.node_id, digest, signed, keep_seconds=ANSWERED_KEEP_SECONDS)
        return signed

    def _serve(self, node: NodeRecord, body: RequestBody, *, quote_digest: str) -> CredentialResponse:
        if len(body.x509_svids) > MAX_X509_SVIDS_PER_REQUEST:
            raise RefusalError("bad_request", f"more than {MAX_X509_SVIDS_PER_REQUEST} SVID requests in one batch")
        view = _NodeView(SpiffeId.parse(node.node_id), selector_set(node.selectors),
                         TrustTier(node.tier))
        issued: list[IssuedX509Svid] = []
        errors: list[ItemError] = []
        for item in body.x509_svids:
            entry = self._entries.is_authorized(item.entry_id, view.spiffe_id, view.selectors, view.tier)
            if entry is None:
                errors.append(ItemError(item.entry_id, "not_authorized", "entry is not assigned to this node"))
                continue
            try:
                public_key = csr_public_key(item.csr)
            except InvalidSvidError as err:
                errors.append(ItemError(item.entry_id, "bad_csr", str(err)))
                continue
            ttl = self._x509_ttl(entry)
            try:
                cert = self._current_ca().sign_x509_svid(public_key, entry.spiffe_id, ttl=ttl, tier=view.tier,
                                                         dns_names=entry.dns_names)
            except (InvalidSvidError, CaError) as err:
                log.error("x509-svid not signed", extra={"entry_id": entry.id, "reason": str(err)})
                errors.append(ItemError(item.entry_id, "cannot_sign", str(err)))
                continue
            issued.append(IssuedX509Svid(entry_id=entry.id, spiffe_id=str(entry.spiffe_id),
                                         cert_chain=cert.public_bytes(Encoding.DER),
                                         expires_at=int(cert.not_valid_after_utc.timestamp())))
            log.info("x509-svid issued", extra={
                "node_id": node.node_id, "entry_id": entry.id, "spiffe_id": str(entry.spiffe_id),
                "svid_serial": serial_hex(cert), "not_after": cert.not_valid_after_utc.isoformat(),
                "quote_digest": quote_digest,
            })
        entries = None
        if body.sync_entries:
            entries = tuple(self._entry_view(e) for e in
                            self._entries.authorized_for(view.spiffe_id, view.selectors, view.tier))
        nonce, expires = self._new_nonce(node.node_id)
        return CredentialResponse(x509_svids=tuple(issued), errors=tuple(errors), entries=entries,
                                  bundle=self.bundle().der(), nonce=nonce, nonce_expires_at=int(expires))

    def _x509_ttl(self, entry: Entry) -> timedelta:
        """The entry's TTL, capped by the authority whatever the entry asks for."""
        return min(entry.x509_ttl or self._config.x509_svid_ttl, self._config.x509_svid_max_ttl)

    def _entry_view(self, entry: Entry) -> EntryView:
        ttl = self._x509_ttl(entry)
        return EntryView(id=entry.id, revision=entry.revision, spiffe_id=str(entry.spiffe_id),
                         selectors=tuple(sorted(str(s) for s in entry.selectors)),
                         x509_ttl=int(ttl.total_seconds()), dns_names=entry.dns_names, hint=entry.hint)
