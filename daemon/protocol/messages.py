"""Agent <-> authority messages, version 1 (docs/protocol.md describes them for operators).

Agent -> authority:
  AttestNonceRequest   asks for the single-use nonce an AttestRequest must carry
  AttestRequest        first step of node attestation (DESIGN §4.1)
  ChallengeResponse    the quote answering a Challenge (§4.3)
  NonceRequest         asks for a fresh single-use request nonce
  QuotedRequest        any credential request: the exact bytes of a RequestBody plus a TPM quote
                       whose extraData is sha256 of those bytes (§5)
  KeyAttestRequest     first step of a static-secret node's attestation: its software node key
  KeyChallengeResponse the node key's signature over the authority's challenge
  SignedRequest        a static-secret node's credential request: a RequestBody signed by its node key
Authority -> agent, always inside a SignedReply:
  Challenge, KeyChallenge, AttestResult, NonceGrant, CredentialResponse, ErrorReply
Authority -> every agent, published (signed, not addressed to one request):
  RevocationDocument   what is revoked, with an increasing version and a next_update (DESIGN §8)
  NodeEvent            "your entries changed": the node syncs at once instead of at its next heartbeat
"""

from __future__ import annotations

from dataclasses import dataclass

from vouchd.entries import Entry
from vouchd.protocol.codec import message

__all__ = [
    "MAX_JWT_SVIDS_PER_REQUEST",
    "MAX_X509_SVIDS_PER_REQUEST",
    "AttestNonceRequest",
    "AttestRequest",
    "AttestResult",
    "Challenge",
    "ChallengeResponse",
    "CredentialResponse",
    "ErrorReply",
    "IssuedJwtSvid",
    "IssuedX509Svid",
    "ItemError",
    "JwtSvidRequest",
    "KeyAttestRequest",
    "KeyChallenge",
    "KeyChallengeResponse",
    "NodeEvent",
    "NonceGrant",
    "NonceRequest",
    "PublicationPayload",
    "QuotedRequest",
    "ReplyPayload",
    "RequestBody",
    "RevocationDocument",
    "RevokedEntry",
    "RevokedNode",
    "SignedReply",
    "SignedRequest",
    "TpmEvidence",
    "X509SvidRequest",
]


@dataclass(frozen=True)
class TpmEvidence:
    """A TPMS_ATTEST and the AK's TPMT_SIGNATURE over it, both in TPM wire form."""

    attest: bytes
    signature: bytes


@message("attest_nonce_request")
@dataclass(frozen=True)
class AttestNonceRequest:
    """Answered with a NonceGrant: the nonce the next AttestRequest of this node must carry."""

    node_id: str
    request_id: bytes                   # random: makes each request, and so its signed reply, unique


@message("attest_request")
@dataclass(frozen=True)
class AttestRequest:
    node_id: str                        # derived from the EK; the authority checks it
    ek_type: str
    ek_public: bytes                    # TPM2B_PUBLIC
    ek_certificate: bytes | None        # DER, None when the TPM has none
    ak_public: bytes                    # TPM2B_PUBLIC
    node_key_public: bytes              # TPM2B_PUBLIC
    node_key_certify: TpmEvidence       # TPM2_Certify(node key) by the AK
    certify_nonce: bytes                # the authority's single-use attestation nonce: the Certify's qualifying
                                        # data, so a captured request cannot be replayed (it is spent)
    event_log: bytes | None             # TCG2 event log, None when the host has none


@message("challenge")
@dataclass(frozen=True)
class Challenge:
    session: str
    credential_blob: bytes              # TPM2B_ID_OBJECT
    encrypted_secret: bytes             # TPM2B_ENCRYPTED_SECRET
    server_nonce: bytes
    pcr_bank: str
    pcr_indices: tuple[int, ...]


@message("challenge_response")
@dataclass(frozen=True)
class ChallengeResponse:
    node_id: str
    session: str
    quote: TpmEvidence                  # extraData = sha256(server_nonce || activated secret)


@message("key_attest_request")
@dataclass(frozen=True)
class KeyAttestRequest:
    """A node without a TPM (the static-secret tier): its node key is a software key on disk."""

    node_id: str                        # derived from node_key_public; the authority checks it
    node_key_public: bytes              # DER SubjectPublicKeyInfo, ECDSA P-256
    join_token: str = ""                # "<id>.<secret>", only until the key is enrolled (it is single use)


@message("key_challenge")
@dataclass(frozen=True)
class KeyChallenge:
    nonce: bytes                        # single use; the node key signs it (vouchd.protocol.keyproof)
    expires_at: int


@message("key_challenge_response")
@dataclass(frozen=True)
class KeyChallengeResponse:
    node_id: str
    nonce: bytes
    signature: bytes                    # ECDSA P-256 SHA-256 (DER) over the challenge, see keyproof


@message("attest_result")
@dataclass(frozen=True)
class AttestResult:
    node_svid: bytes                    # DER certificate for the TPM-resident node key
    bundle: bytes                       # DER certificates of the trust domain
    selectors: tuple[str, ...]
    tier: str
    nonce: bytes                        # single-use nonce for the next request
    nonce_expires_at: int
    revocations: bytes | None = None    # the current signed RevocationDocument (a SignedReply)
    jwt_bundle: bytes = b""             # the trust domain's JWKS (JWT-SVID signing keys)


@message("nonce_request")
@dataclass(frozen=True)
class NonceRequest:
    node_id: str
    request_id: bytes                   # random: makes each request, and so its signed reply, unique


@message("nonce_grant")
@dataclass(frozen=True)
class NonceGrant:
    nonce: bytes
    expires_at: int
    pcr_bank: str                       # the selection this node's quotes must cover
    pcr_indices: tuple[int, ...]


@dataclass(frozen=True)
class X509SvidRequest:
    entry_id: str
    csr: bytes                          # DER PKCS#10; only its key is used
    not_after: int = 0                  # expire by then (a child's SVID never outlives its parent's); 0: no bound


# How many CSRs one RequestBody may carry; the authority refuses larger batches, agents split them.
MAX_X509_SVIDS_PER_REQUEST = 256
MAX_JWT_SVIDS_PER_REQUEST = 256


@dataclass(frozen=True)
class JwtSvidRequest:
    entry_id: str
    audiences: tuple[str, ...]
    not_after: int = 0                  # as for X509SvidRequest


@message("request_body")
@dataclass(frozen=True)
class RequestBody:
    node_id: str
    nonce: bytes
    sent_at: int
    x509_svids: tuple[X509SvidRequest, ...] = ()
    sync_entries: bool = False
    revocations_version: int = 0
    jwt_svids: tuple[JwtSvidRequest, ...] = ()        # the agent's document: a newer one comes with the reply


@message("quoted_request")
@dataclass(frozen=True)
class QuotedRequest:
    node_id: str
    body: bytes                         # the exact bytes of an encoded RequestBody
    quote: TpmEvidence                  # extraData = sha256(body)


@message("signed_request")
@dataclass(frozen=True)
class SignedRequest:
    node_id: str
    body: bytes                         # the exact bytes of an encoded RequestBody
    signature: bytes                    # ECDSA P-256 SHA-256 (DER) by the node key over body, see keyproof


@dataclass(frozen=True)
class IssuedX509Svid:
    entry_id: str
    spiffe_id: str
    cert_chain: bytes                   # DER, leaf first
    expires_at: int


@dataclass(frozen=True)
class IssuedJwtSvid:
    entry_id: str
    spiffe_id: str
    audiences: tuple[str, ...]
    token: str                          # compact JWS
    expires_at: int


@dataclass(frozen=True)
class ItemError:
    entry_id: str
    code: str
    message: str


@message("credential_response")
@dataclass(frozen=True)
class CredentialResponse:
    x509_svids: tuple[IssuedX509Svid, ...]
    errors: tuple[ItemError, ...]
    entries: tuple[Entry, ...] | None   # the node's complete entry set when sync was asked
    bundle: bytes
    nonce: bytes
    nonce_expires_at: int
    revocations: bytes | None = None    # a signed RevocationDocument newer than the request's
    jwt_svids: tuple[IssuedJwtSvid, ...] = ()
    jwt_bundle: bytes = b""             # the trust domain's JWKS (JWT-SVID signing keys)


@message("error")
@dataclass(frozen=True)
class ErrorReply:
    code: str
    message: str


@message("reply_payload")
@dataclass(frozen=True)
class ReplyPayload:
    """What the authority signs: the reply, the node it is for and the request it answers."""

    node_id: str
    in_reply_to: str                    # sha256 hex of the request bytes
    issued_at: int
    reply: bytes                        # an encoded Challenge / AttestResult / ... / ErrorReply


@message("signed_reply")
@dataclass(frozen=True)
class SignedReply:
    payload: bytes                      # an encoded ReplyPayload
    signature: bytes                    # ECDSA P-256 SHA-256 (DER) by the authority key
    signer_chain: bytes                 # DER certificates, leaf first, chaining to the trust bundle


@message("publication_payload")
@dataclass(frozen=True)
class PublicationPayload:
    """What the authority signs when it publishes to every agent rather than answering one."""

    topic: str                          # the topic suffix it was published on: no replay on another
    issued_at: int
    body: bytes                         # an encoded RevocationDocument / NodeEvent


@dataclass(frozen=True)
class RevokedEntry:
    entry_id: str
    below_revision: int                 # SVIDs of revisions below this one are void


@dataclass(frozen=True)
class RevokedNode:
    node_id: str
    reason: str
    before: int                         # the node's SVIDs and attestation from before this time are void
    banned: bool                        # true: the node gets nothing until an operator unbans it


@message("revocation_document")
@dataclass(frozen=True)
class RevocationDocument:
    version: int                        # grows with every document; an agent refuses an older one
    issued_at: int
    next_update: int                    # a node with no newer document after this is stale
    entries: tuple[RevokedEntry, ...] = ()
    nodes: tuple[RevokedNode, ...] = ()


@message("node_event")
@dataclass(frozen=True)
class NodeEvent:
    node_id: str
    event: str                          # "entries_changed"
    issued_at: int
