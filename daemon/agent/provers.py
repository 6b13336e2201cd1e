"""How a node proves itself to the authority: with its TPM (hardware tier) or its key on disk
(static-secret tier). `NodeIdentity` runs the exchanges; a prover supplies the evidence.

The hardware prover (DESIGN §4): Certify of the TPM-resident node key by the AK, credential
activation, a quote over the PCRs the authority demands, and a quote whose extraData is the sha256
of each later request. The key prover: an ECDSA P-256 key in a root-only file answers the
authority's challenge and signs each request. Whoever can read that file is the node, which is why
its workloads get only what the static-secret tier allows (docs/design.md §4.5, §7).
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import (
    Encoding,
    NoEncryption,
    PrivateFormat,
    PublicFormat,
    load_pem_private_key,
)

from vouchd.evidence import TpmPublic
from vouchd.protocol.errors import RemoteError, SignatureError
from vouchd.protocol.identities import ek_hash, key_node_spiffe_id, node_spiffe_id
from vouchd.protocol.keyproof import (
    CHALLENGE_CONTEXT,
    NODE_KEY_FILE,
    NODE_KEY_PUBLIC_FILE,
    REQUEST_CONTEXT,
    node_key_hash,
    node_key_spki,
    sign_with_node_key,
)
from vouchd.protocol.messages import (
    AttestNonceRequest,
    AttestRequest,
    AttestResult,
    Challenge,
    ChallengeResponse,
    KeyAttestRequest,
    KeyChallenge,
    KeyChallengeResponse,
    NonceGrant,
    QuotedRequest,
    SignedRequest,
    TpmEvidence,
)
from vouchd.protocol.refusals import Refusal
from vouchd.protocol.transport import ATTEST_TOPIC
from vouchd.securefiles import InsecureFileError, read_private, write_atomically
from vouchd.spiffe import TrustDomain
from vouchd.tpm import EkInfo, TpmQuote

__all__ = [
    "KeyProver",
    "NodeAttestationError",
    "NodeProver",
    "NodeTpm",
    "TpmProver",
    "join_token_reader",
    "load_or_create_node_key",
]

log = logging.getLogger("vouchd.agent.node")

_MAX_EVENT_LOG_BYTES = 16 * 1024 * 1024

# Sends one message on a topic and returns the authority's verified reply.
Exchange = Callable[[str, object], Awaitable[object]]


class NodeAttestationError(RemoteError):
    """The authority refused to attest this node, or the node could not gather its evidence."""


class NodeTpm(Protocol):
    """What node attestation needs from the TPM (vouchd.tpm.TpmService provides it)."""

    @property
    def ek(self) -> EkInfo: ...
    async def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes: ...
    async def quote(self, bank: str, pcrs: Sequence[int], qualifying_data: bytes) -> TpmQuote: ...
    async def certify_node_key(self, qualifying_data: bytes) -> TpmQuote: ...


class NodeProver(Protocol):
    @property
    def node_id(self) -> str: ...

    async def attest(self, exchange: Exchange) -> AttestResult:
        """Run node attestation through `exchange`; the authority's result."""
        ...

    async def prove(self, body: bytes) -> object:
        """The request message carrying `body` (an encoded RequestBody) with this node's proof."""
        ...

    def note_grant(self, grant: NonceGrant) -> None:
        """The authority's nonce grant may change what the proof must cover (the PCR selection)."""
        ...


class TpmProver:
    """The hardware tier: every proof comes from the TPM."""

    def __init__(self, tpm: NodeTpm, *, ak_public: bytes, node_key_public: bytes, trust_domain: TrustDomain,
                 event_log_path: Path | None) -> None:
        self._tpm = tpm
        self._ak_public = ak_public
        self._node_key_public = node_key_public
        self._event_log_path = event_log_path
        self._node_id = str(node_spiffe_id(trust_domain, ek_hash(TpmPublic.from_tpm2b(tpm.ek.public))))
        self._pcr_bank = "sha256"
        self._pcr_indices: tuple[int, ...] = ()

    @property
    def node_id(self) -> str:
        return self._node_id

    def _read_event_log(self) -> bytes | None:
        if self._event_log_path is None:
            return None
        try:
            with self._event_log_path.open("rb") as handle:
                data = handle.read(_MAX_EVENT_LOG_BYTES + 1)
        except FileNotFoundError:
            return None  # a host without measured boot; the authority's policy decides
        except OSError as err:
            raise NodeAttestationError(Refusal.LOCAL, f"{self._event_log_path}: cannot read the event log: "
                                                f"{err.strerror}") from None
        if len(data) > _MAX_EVENT_LOG_BYTES:
            raise NodeAttestationError(Refusal.LOCAL, f"{self._event_log_path}: event log is over 16 MiB")
        return data

    async def attest(self, exchange: Exchange) -> AttestResult:
        grant = await exchange(ATTEST_TOPIC, AttestNonceRequest(node_id=self._node_id, request_id=os.urandom(16)))
        if not isinstance(grant, NonceGrant):
            raise SignatureError(f"authority answered an attestation nonce request with {type(grant).__name__}")
        certify_nonce = grant.nonce  # the Certify is fresh for the authority, and the request single use
        certify = await self._tpm.certify_node_key(certify_nonce)
        request = AttestRequest(
            node_id=self._node_id, ek_type=self._tpm.ek.ek_type, ek_public=self._tpm.ek.public,
            ek_certificate=self._tpm.ek.certificate, ak_public=self._ak_public,
            node_key_public=self._node_key_public,
            node_key_certify=TpmEvidence(certify.attest, certify.signature),
            certify_nonce=certify_nonce, event_log=self._read_event_log(),
        )
        challenge = await exchange(ATTEST_TOPIC, request)
        if not isinstance(challenge, Challenge):
            raise SignatureError(f"authority answered an attestation request with {type(challenge).__name__}")
        secret = await self._tpm.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
        quote = await self._tpm.quote(challenge.pcr_bank, challenge.pcr_indices,
                                      hashlib.sha256(challenge.server_nonce + secret).digest())
        result = await exchange(ATTEST_TOPIC, ChallengeResponse(
            node_id=self._node_id, session=challenge.session, quote=TpmEvidence(quote.attest, quote.signature)))
        if not isinstance(result, AttestResult):
            raise SignatureError(f"authority answered a challenge response with {type(result).__name__}")
        self._pcr_bank, self._pcr_indices = challenge.pcr_bank, tuple(challenge.pcr_indices)
        return result

    def note_grant(self, grant: NonceGrant) -> None:
        self._pcr_bank, self._pcr_indices = grant.pcr_bank, tuple(grant.pcr_indices)

    @property
    def pcr_selection(self) -> tuple[str, tuple[int, ...]]:
        """The bank and PCRs the authority has this node quote (empty before it first said)."""
        return self._pcr_bank, self._pcr_indices

    async def prove(self, body: bytes) -> object:
        quote = await self._tpm.quote(self._pcr_bank, self._pcr_indices, hashlib.sha256(body).digest())
        return QuotedRequest(node_id=self._node_id, body=body, quote=TpmEvidence(quote.attest, quote.signature))


class KeyProver:
    """The static-secret tier: the node key on disk answers the challenge and signs each request."""

    def __init__(self, key: ec.EllipticCurvePrivateKey, *, trust_domain: TrustDomain,
                 join_token: Callable[[], str | None] = lambda: None) -> None:
        """`join_token`: reads the token to join with, once the authority says the key is not enrolled
        (it is single use: sent only then, never again after the key is in)."""
        self._join_token = join_token
        self._key = key
        self._spki = node_key_spki(key.public_key())
        self._node_id = str(key_node_spiffe_id(trust_domain, node_key_hash(self._spki)))

    @property
    def node_id(self) -> str:
        return self._node_id

    @property
    def public_key_der(self) -> bytes:
        """The node key's DER SubjectPublicKeyInfo."""
        return self._spki

    async def attest(self, exchange: Exchange) -> AttestResult:
        request = KeyAttestRequest(node_id=self._node_id, node_key_public=self._spki)
        try:
            challenge = await exchange(ATTEST_TOPIC, request)
        except RemoteError as err:
            token = self._join_token() if err.code == Refusal.NOT_ENROLLED else None
            if token is None:
                raise
            log.info("node key not enrolled: joining with the join token", extra={"node_id": self._node_id})
            challenge = await exchange(ATTEST_TOPIC, replace(request, join_token=token))
        if not isinstance(challenge, KeyChallenge):
            raise SignatureError(f"authority answered a key attestation request with {type(challenge).__name__}")
        signature = sign_with_node_key(self._key, CHALLENGE_CONTEXT, challenge.nonce + self._node_id.encode())
        result = await exchange(ATTEST_TOPIC, KeyChallengeResponse(node_id=self._node_id, nonce=challenge.nonce,
                                                                   signature=signature))
        if not isinstance(result, AttestResult):
            raise SignatureError(f"authority answered a key challenge response with {type(result).__name__}")
        return result

    def note_grant(self, grant: NonceGrant) -> None:
        pass  # a signature covers the request bytes and nothing else

    async def prove(self, body: bytes) -> object:
        return SignedRequest(node_id=self._node_id, body=body,
                             signature=sign_with_node_key(self._key, REQUEST_CONTEXT, body))


def load_or_create_node_key(directory: Path) -> ec.EllipticCurvePrivateKey:
    """The static-secret node key in `directory` (0700), made on first use.

    A key file that exists but does not load is an error naming it, never replaced: replacing it
    would make this host another node, and its entries would no longer reach it.
    """
    path = directory / NODE_KEY_FILE
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        pem = read_private(path)
    except FileNotFoundError:
        key = ec.generate_private_key(ec.SECP256R1())
        try:
            write_atomically(path, key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
            write_atomically(directory / NODE_KEY_PUBLIC_FILE,
                             key.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo), 0o644)
        except OSError as err:
            raise NodeAttestationError(Refusal.LOCAL, f"{path}: cannot write the node key: {err.strerror}") from None
        log.info("node key created (static-secret tier)", extra={"path": str(path)})
        return key
    except InsecureFileError as err:
        raise NodeAttestationError(Refusal.LOCAL, f"{path}: {err}") from None
    except OSError as err:
        raise NodeAttestationError(Refusal.LOCAL, f"{path}: cannot read the node key: {err.strerror}") from None
    try:
        loaded = load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise NodeAttestationError(Refusal.LOCAL, f"{path}: not a PEM private key; move it away to make this host "
                                            "a new node (its node id changes)") from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or not isinstance(loaded.curve, ec.SECP256R1):
        raise NodeAttestationError(Refusal.LOCAL, f"{path}: not an ECDSA P-256 key")
    return loaded


def join_token_reader(path: Path | None) -> Callable[[], str | None]:
    """Reads the join token from `path` (root-only, one line) when asked; None when no file is set.
    A file that cannot be read is an error naming it, never its content."""

    def read() -> str | None:
        if path is None:
            return None
        try:
            text = read_private(path).decode("ascii").strip()
        except (OSError, UnicodeDecodeError) as err:
            # InsecureFileError says which mode it found; other OSErrors have their strerror
            reason = "not ASCII text" if isinstance(err, UnicodeDecodeError) else err.strerror or str(err)
            raise NodeAttestationError(Refusal.LOCAL, f"{path}: cannot read the join token "
                                                f"(agent.join_token_file): {reason}") from None
        return text or None

    return read
