"""The node's identity: attestation to the authority and proven requests (DESIGN §4, §5).

`NodeIdentity` is the only part of the agent that talks to the authority. Its prover
(vouchd.agent.provers) attests the node, with the TPM or with the static-secret node key, and
carries every later request in its proof: a TPM quote whose extraData is the sha256 of the
request's exact bytes, or the node key's signature over them. NodeIdentity keeps the single-use
nonce the authority handed out, the bundles and the revocation document. One request is in flight
at a time.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from cryptography import x509

from vouchd.agent.provers import NodeAttestationError, NodeProver, NodeTpm, TpmProver
from vouchd.clock import SYSTEM_CLOCK, Clock
from vouchd.protocol.codec import encode
from vouchd.protocol.errors import RemoteError, SignatureError
from vouchd.protocol.messages import (
    CredentialResponse,
    JwtSvidRequest,
    NodeEvent,
    NonceGrant,
    NonceRequest,
    RequestBody,
    RevocationDocument,
    X509SvidRequest,
)
from vouchd.protocol.refusals import Refusal
from vouchd.protocol.signing import ReplyVerifier
from vouchd.protocol.transport import (
    REQUEST_TOPIC,
    REVOCATIONS_TOPIC,
    AuthorityTransport,
    node_events_topic,
)
from vouchd.spiffe import TrustDomain, X509Bundle, serial_hex
from vouchd.tpm import TpmError

__all__ = ["NodeAttestationError", "NodeIdentity", "NodeTpm", "OlderRevocationsError"]

log = logging.getLogger("vouchd.agent.node")

_TIMEOUT = 30.0


class OlderRevocationsError(SignatureError):
    """A correctly signed revocation document older than the one the node holds: a replay."""


@dataclass(frozen=True)
class NodeStatus:
    """What the agent knows of its node's standing, as the authority last answered it."""

    node_id: str
    tier: str
    selectors: tuple[str, ...]
    svid_serial: str
    svid_issued_at: float
    svid_expires_at: float
    attested_at: float
    last_quote_at: float
    authority_error: str | None = None      # the last exchange's failure, None when it succeeded

    @property
    def renew_at(self) -> float:
        """Re-attest (and so renew the node SVID) when half of its lifetime is left."""
        return self.svid_issued_at + (self.svid_expires_at - self.svid_issued_at) / 2


class NodeIdentity:
    def __init__(
        self,
        *,
        prover: NodeProver,
        transport: AuthorityTransport,
        trust_domain: TrustDomain,
        initial_bundle: Callable[[], X509Bundle],
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._prover = prover
        self._clock = clock
        self._transport = transport
        self._trust_domain = trust_domain
        self._bundle_source = initial_bundle
        self._bundle: X509Bundle | None = None
        self._bundle_der = b""  # as the authority sent it: what workloads get, not re-encoded per request
        self._jwt_bundle = b""  # the JWKS as the authority sent it
        self._verifier = ReplyVerifier(trust_domain, self.bundle, clock)
        self.node_id = prover.node_id
        self._nonce: bytes | None = None
        self._nonce_expires = 0.0
        self._status: NodeStatus | None = None
        self._revocations: RevocationDocument | None = None
        self._revocations_signed: bytes | None = None
        # DESIGN §5: one request in flight per node; callers queue here and the SVID manager batches.
        self._in_flight = asyncio.Lock()

    @classmethod
    def with_tpm(cls, *, tpm: NodeTpm, ak_public: bytes, node_key_public: bytes, event_log_path: Path | None,
                 transport: AuthorityTransport, trust_domain: TrustDomain, initial_bundle: Callable[[], X509Bundle],
                 clock: Clock = SYSTEM_CLOCK) -> NodeIdentity:
        """A hardware-tier node: its TPM proves it."""
        prover = TpmProver(tpm, ak_public=ak_public, node_key_public=node_key_public, trust_domain=trust_domain,
                           event_log_path=event_log_path)
        return cls(prover=prover, transport=transport, trust_domain=trust_domain, initial_bundle=initial_bundle,
                   clock=clock)

    def bundle(self) -> X509Bundle:
        return self._bundle if self._bundle is not None else self._bundle_source()

    def bundle_der(self) -> bytes:
        return self._bundle_der if self._bundle is not None else self._bundle_source().der()

    def jwt_bundle(self) -> bytes:
        """The trust domain's JWT bundle (JWKS) as the authority last sent it; empty before."""
        return self._jwt_bundle

    def _accept_bundle(self, der: bytes) -> None:
        self._bundle = X509Bundle.from_der(self._trust_domain, der)
        self._bundle_der = der

    def restore(self, *, bundle: bytes, jwt_bundle: bytes, revocations: bytes | None) -> None:
        """Take the bundles and revocation document of a saved state, before attesting. The document
        is verified again against the restored bundle; one that does not verify is left out (the
        first exchange with the authority brings the current one)."""
        self._accept_bundle(bundle)
        self._jwt_bundle = jwt_bundle
        if revocations is not None:
            try:
                self.accept_revocations(revocations)
            except SignatureError as err:
                log.warning("saved revocation document does not verify; waiting for the authority's",
                            extra={"reason": str(err)})

    def revocations_signed(self) -> bytes | None:
        """The revocation document this node holds, as the authority signed it (for the saved state)."""
        return self._revocations_signed

    @property
    def status(self) -> NodeStatus | None:
        return self._status

    # -- publications of the authority ---------------------------------------------------------
    @property
    def revocations(self) -> RevocationDocument | None:
        return self._revocations

    def accept_revocations(self, signed: bytes) -> RevocationDocument | None:
        """Verify a published revocation document; the new one, or None when it is the one held.

        An older version than the one held is refused (OlderRevocationsError): a captured document
        replayed to undo a revocation.
        """
        document = self._verifier.open_publication(signed, topic=REVOCATIONS_TOPIC)
        if not isinstance(document, RevocationDocument):
            raise SignatureError(f"{REVOCATIONS_TOPIC} carried a {type(document).__name__}")
        held = self._revocations
        if held is not None and document.version < held.version:
            raise OlderRevocationsError(f"revocation document version {document.version} is older than "
                                        f"the version {held.version} this node holds")
        if held is not None and document.version == held.version:
            return None
        self._revocations = document
        self._revocations_signed = signed
        log.info("revocation document accepted", extra={"version": document.version,
                                                        "next_update": document.next_update})
        return document

    def open_node_event(self, signed: bytes) -> NodeEvent:
        """Verify an event the authority published for this node."""
        topic = node_events_topic(self.node_id)
        event = self._verifier.open_publication(signed, topic=topic)
        if not isinstance(event, NodeEvent) or event.node_id != self.node_id:
            raise SignatureError(f"{topic} carried something other than an event for this node")
        return event

    async def _call(self, topic: str, request: object) -> object:
        data = encode(request)
        reply = await self._transport.call(topic, data, timeout=_TIMEOUT)
        return self._verifier.open(reply, node_id=self.node_id, request=data)

    async def attest(self) -> None:
        """Full node attestation (DESIGN §4 steps 1-4, or §4.5 for the static-secret tier)."""
        result = await self._prover.attest(self._call)
        self._accept_bundle(result.bundle)
        self._jwt_bundle = result.jwt_bundle or self._jwt_bundle
        self._nonce, self._nonce_expires = result.nonce, float(result.nonce_expires_at)
        if result.revocations is not None:
            self.accept_revocations(result.revocations)
        svid = x509.load_der_x509_certificate(result.node_svid)
        now = self._clock.now()
        self._status = NodeStatus(
            node_id=self.node_id, tier=result.tier, selectors=result.selectors,
            svid_serial=serial_hex(svid), svid_issued_at=now,
            svid_expires_at=svid.not_valid_after_utc.timestamp(), attested_at=now, last_quote_at=now,
        )
        log.info("node identity obtained", extra={"node_id": self.node_id, "svid_serial": self._status.svid_serial})

    async def _fresh_nonce(self) -> bytes:
        # Keep a margin: the nonce must still be valid when the authority receives the request.
        if self._nonce is not None and self._clock.now() < self._nonce_expires - 2:
            nonce, self._nonce = self._nonce, None
            return nonce
        grant = await self._call(REQUEST_TOPIC, NonceRequest(node_id=self.node_id, request_id=os.urandom(16)))
        if not isinstance(grant, NonceGrant):
            raise SignatureError(f"authority answered a nonce request with {type(grant).__name__}")
        self._prover.note_grant(grant)
        return grant.nonce

    async def request(self, *, x509_svids: Sequence[X509SvidRequest] = (), sync_entries: bool = False,
                      jwt_svids: Sequence[JwtSvidRequest] = ()) -> CredentialResponse:
        """One proven request; re-attests once when the authority asks for it."""
        async with self._in_flight:
            try:
                response = await self._request_locked(tuple(x509_svids), sync_entries, tuple(jwt_svids))
            except TpmError:
                raise  # the local TPM's failure says nothing about the authority
            except Exception as err:
                self._note_outcome(str(err))
                raise
            self._note_outcome(None)
            return response

    async def renew_if_due(self) -> bool:
        """Attest again when the node SVID has passed half of its lifetime; True if it did."""
        async with self._in_flight:
            if self._status is not None and self._clock.now() < self._status.renew_at:
                return False
            try:
                await self.attest()
            except TpmError:
                raise
            except Exception as err:
                self._note_outcome(f"re-attestation: {err}")
                raise
            return True

    def _note_outcome(self, error: str | None) -> None:
        if self._status is not None:
            changes: dict[str, object] = {"authority_error": error}
            if error is None:
                changes["last_quote_at"] = self._clock.now()
            self._status = replace(self._status, **changes)  # type: ignore[arg-type]

    async def _request_locked(self, x509_svids: tuple[X509SvidRequest, ...], sync_entries: bool,
                              jwt_svids: tuple[JwtSvidRequest, ...]) -> CredentialResponse:
        for attempt in range(3):
            try:
                return await self._proven_request(x509_svids, sync_entries, jwt_svids)
            except RemoteError as err:
                if attempt == 2:
                    raise
                if err.code == Refusal.REATTEST:
                    log.info("authority asks for re-attestation", extra={"reason": err.reason})
                    await self.attest()
                elif err.code != Refusal.NONCE:
                    raise
        raise AssertionError("unreachable")

    async def _proven_request(self, x509_svids: tuple[X509SvidRequest, ...], sync_entries: bool,
                              jwt_svids: tuple[JwtSvidRequest, ...]) -> CredentialResponse:
        nonce = await self._fresh_nonce()
        body = encode(RequestBody(node_id=self.node_id, nonce=nonce, sent_at=int(self._clock.now()),
                                  x509_svids=x509_svids, sync_entries=sync_entries, jwt_svids=jwt_svids,
                                  revocations_version=self._revocations.version if self._revocations else 0))
        response = await self._call(REQUEST_TOPIC, await self._prover.prove(body))
        if not isinstance(response, CredentialResponse):
            raise SignatureError(f"authority answered a credential request with {type(response).__name__}")
        self._nonce, self._nonce_expires = response.nonce, float(response.nonce_expires_at)
        self._accept_bundle(response.bundle)
        self._jwt_bundle = response.jwt_bundle or self._jwt_bundle
        if response.revocations is not None:
            try:
                self.accept_revocations(response.revocations)
            except OlderRevocationsError as err:
                # An authority restored from an older state, or a replica behind the others: keep the
                # newer document this node holds; the request itself was answered and stands.
                log.warning("authority sent an older revocation document; keeping ours", extra={"reason": str(err)})
        return response
