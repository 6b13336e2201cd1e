"""The authority's durable state, behind one async interface (`Store`): its records and errors.

What is kept: enrolled and pending EKs, node records, bans, single-use nonces, answered requests,
boot (event log) profiles, attestation sessions in progress, registration entries, the
revocations that void SVIDs issued before a change, join tokens (by the hash of their secret) and
the enrolled keys of nodes without a TPM (the static-secret tier).

Every method is one short transaction: a change and the revocation it implies land together or not
at all, and the revocation version is bumped in that same transaction. Time is never read here:
every method that needs it takes `now` (seconds since the epoch) from its caller's clock.

Two implementations: vouchd.authority.sqlite.SqliteStore (one file, the default) and
vouchd.authority.postgres.PostgresStore (one database shared by several authority replicas). The
contract both meet is tests/unit/test_store_contract.py.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol, TypeVar

from vouchd.authority.errors import AuthorityError
from vouchd.entries import Entry

__all__ = [
    "Ban",
    "EntryConflictError",
    "EntryExistsError",
    "EntryNotFoundError",
    "JoinTokenRecord",
    "NodeRecord",
    "NodeState",
    "PendingNode",
    "ProfileRecord",
    "Revocations",
    "RevokedEntry",
    "RevokedNode",
    "SessionRecord",
    "Store",
    "StoreError",
]

_T = TypeVar("_T")


# -- errors ----------------------------------------------------------------------------------------


class StoreError(AuthorityError):
    """The authority's database cannot be opened or used; the message names the database and the call."""


class EntryExistsError(StoreError):
    """An entry with this id exists already."""

    def __init__(self, entry_id: str) -> None:
        super().__init__(f"entry {entry_id} already exists")
        self.entry_id = entry_id


class EntryNotFoundError(StoreError):
    """No entry has this id."""

    def __init__(self, entry_id: str) -> None:
        super().__init__(f"entry {entry_id} does not exist")
        self.entry_id = entry_id


class EntryConflictError(StoreError):
    """The entry changed since its caller read it: its revision is not the one the caller expected."""

    def __init__(self, entry_id: str, *, stored_revision: int, expected_revision: int) -> None:
        super().__init__(f"entry {entry_id} is at revision {stored_revision}, not {expected_revision}")
        self.entry_id = entry_id
        self.stored_revision = stored_revision
        self.expected_revision = expected_revision


# -- records ---------------------------------------------------------------------------------------


class NodeState(StrEnum):
    ATTESTING = "attesting"
    TRUSTED = "trusted"
    STALE = "stale"
    FAILED = "failed"
    BANNED = "banned"


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    ek_hash: str
    tier: str
    state: NodeState
    ak_public: bytes
    node_key_public: bytes
    selectors: tuple[str, ...]
    pcr_bank: str
    pcr_indices: tuple[int, ...]
    pcr_digest: bytes
    reset_count: int
    restart_count: int
    clock: int
    attested_at: float
    last_quote_at: float


@dataclass(frozen=True)
class PendingNode:
    """A genuine EK nobody enrolled yet, waiting for an operator's approval."""

    ek_hash: str
    node_id: str
    first_seen: float
    last_seen: float


@dataclass(frozen=True)
class Ban:
    node_id: str
    reason: str
    banned_at: float


@dataclass(frozen=True)
class ProfileRecord:
    """A boot profile as operators list it: its name, how many measurements it accepts, where from."""

    name: str
    measurements: int
    learned_from: str
    created_at: float


@dataclass(frozen=True)
class SessionRecord:
    """An attestation between the Challenge and the ChallengeResponse."""

    session: str
    node_id: str
    ek_hash: str
    ek_issuer_cn: str | None
    ak_public: bytes
    node_key_public: bytes
    pcr_bank: str
    pcr_indices: tuple[int, ...]
    event_log: bytes | None
    secret: bytes = field(repr=False)
    server_nonce: bytes = field(repr=False)
    expires_at: float


@dataclass(frozen=True)
class JoinTokenRecord:
    """A single-use join token: a host without a TPM joins with it (the static-secret tier).

    Only the sha256 (hex) of its secret is kept, never the secret. `used_at` and `used_by` (the
    node that joined with it) are None until it is used."""

    token_id: str
    secret_sha256: str = field(repr=False)
    node_labels: tuple[str, ...]
    created_at: float
    expires_at: float
    used_at: float | None = None
    used_by: str | None = None

    def __post_init__(self) -> None:
        # A secret passed where its hash belongs would be stored in the clear: refuse it here.
        if not re.fullmatch(r"[0-9a-f]{64}", self.secret_sha256):
            raise ValueError(f"join token {self.token_id}: secret_sha256 must be 64 lower-case hex digits")


@dataclass(frozen=True)
class RevokedEntry:
    """SVIDs of entry `entry_id` with a revision below `below_revision` are void."""

    entry_id: str
    below_revision: int
    revoked_at: float


@dataclass(frozen=True)
class RevokedNode:
    """SVIDs issued to the node (and for workloads on it) before `before` are void; `banned`: all are."""

    node_id: str
    reason: str
    before: float
    banned: bool


@dataclass(frozen=True)
class Revocations:
    """The revocation document's content; `version` grows with every change (sorted by id)."""

    version: int
    entries: tuple[RevokedEntry, ...]
    nodes: tuple[RevokedNode, ...]


# -- the interface -----------------------------------------------------------------------------------


class Store(Protocol):
    """The authority's durable state. Every method is one transaction; failures raise StoreError.

    Expiry: a nonce or a session expiring at `expires_at` can be used while `now <= expires_at`.
    """

    async def close(self) -> None:
        """Finish the calls already made, then release the database; later calls raise StoreError."""
        ...

    # enrolment
    async def enrol_ek(self, ek_hash: str, source: str, *, now: float) -> None:
        """Enrol an EK (enrolling again changes nothing); an enrolled EK is no longer pending."""
        ...

    async def is_enrolled(self, ek_hash: str) -> bool:
        ...

    async def add_pending(self, ek_hash: str, node_id: str, *, now: float) -> None:
        """Record an unknown genuine EK for an operator to approve; when pending already, update
        its last_seen. An EK that is enrolled is never pending: nothing is recorded for it."""
        ...

    async def pending(self) -> list[PendingNode]:
        """The pending EKs, the longest waiting first."""
        ...

    async def approve(self, node_id_or_ek_hash: str, *, now: float) -> PendingNode | None:
        """Enrol the pending EK with this EK hash or node id and remove it from pending; None when
        nothing pending matches."""
        ...

    # nodes
    async def save_node(self, node: NodeRecord) -> None:
        """Store a node, replacing the record with its id (and any other record of its EK)."""
        ...

    async def node(self, node_id: str) -> NodeRecord | None:
        ...

    async def nodes(self) -> list[NodeRecord]:
        """Every node, by id."""
        ...

    async def record_quote(self, node_id: str, *, reset_count: int, restart_count: int, clock: int,
                           now: float) -> None:
        """Remember the TPM clock of the node's latest accepted quote, and when it came."""
        ...

    async def set_node_state(self, node_id: str, state: NodeState) -> None:
        ...

    # bans
    async def ban_node(self, node_id: str, reason: str, *, now: float) -> int:
        """Ban a node (known or not): record the ban, set a known node's state to banned and revoke
        everything issued to it. Banning a banned node updates the reason and keeps banned_at.
        Returns the new revocation version."""
        ...

    async def unban_node(self, node_id: str, *, now: float) -> int | None:
        """Lift a ban: the node's state becomes attesting, and its revocation stays as a non-ban
        record with before=the ban's time, so SVIDs issued before the ban stay void. Returns the
        new revocation version, or None when the node is not banned."""
        ...

    async def is_banned(self, node_id: str) -> bool:
        ...

    async def bans(self) -> list[Ban]:
        """Every ban, by node id."""
        ...

    # nonces
    async def add_nonce(self, node_id: str, nonce: bytes, expires_at: float, *, now: float) -> None:
        """Hand a nonce to a node (dropping every expired one); a nonce already handed out is an error."""
        ...

    async def consume_nonce(self, node_id: str, nonce: bytes, *, now: float) -> bool:
        """True exactly once for an unexpired nonce handed to this node, however calls race."""
        ...

    # answered requests (a redelivered request gets the very same reply)
    async def answered_reply(self, node_id: str, digest: str) -> bytes | None:
        ...

    async def remember_reply(self, node_id: str, digest: str, reply: bytes, *, now: float,
                             keep_seconds: float) -> None:
        """Remember a reply (replacing one for the same request), dropping those older than keep_seconds."""
        ...

    # boot profiles
    async def save_profile(self, name: str, digests: Iterable[str], learned_from: str, *, now: float) -> None:
        """Store a profile (its accepted measurements), replacing one of that name."""
        ...

    async def profiles(self) -> dict[str, frozenset[str]]:
        ...

    async def profile_records(self) -> list[ProfileRecord]:
        """Every profile, by name."""
        ...

    async def remove_profile(self, name: str, *, now: float) -> tuple[int, list[str]] | None:
        """Delete a profile; every node whose selectors hold `tpm:pcr_profile:<name>` gets a node
        revocation (not a ban) with before=now and must attest again (state attesting; a banned or
        failed node keeps its state). Returns (revocation version, those node ids sorted), the
        version unchanged when no node had the profile; None when there is no such profile."""
        ...

    # join tokens (the static-secret tier in fleet mode)
    async def add_join_token(self, token: JoinTokenRecord) -> None:
        """Store a new, unused token; a token id in use already is an error."""
        ...

    async def use_join_token(self, token_id: str, secret_sha256: str, node_id: str, *,
                             now: float) -> JoinTokenRecord | None:
        """Use a token: when `token_id` names an unused token whose secret has this sha256 and
        which has not expired (`now <= expires_at`), record used_at=now and used_by=node_id and
        return the used token; else None, and nothing changes. Of calls racing for one token, one
        at most gets it."""
        ...

    async def join_tokens(self) -> list[JoinTokenRecord]:
        """Every token, used and expired ones included, by id."""
        ...

    # node keys (nodes without a TPM are their software key)
    async def enrol_node_key(self, node_id: str, spki_der: bytes, source: str, *, now: float) -> None:
        """Enrol the node's key (DER SubjectPublicKeyInfo); enrolling again replaces its key,
        source and time."""
        ...

    async def node_key(self, node_id: str) -> bytes | None:
        ...

    async def remove_node_key(self, node_id: str) -> bool:
        """Forget the node's key; False when it had none."""
        ...

    # attestation sessions
    async def put_session(self, record: SessionRecord, *, max_sessions: int, now: float) -> bool:
        """Store a session, replacing any session of its EK (one attestation in progress per EK),
        after dropping expired ones. False, and nothing stored, when max_sessions are in progress
        and none of them is this EK's."""
        ...

    async def take_session(self, session_id: str, *, now: float) -> SessionRecord | None:
        """Remove a session and return it if it has not expired; an expired one is removed and None
        returned. Of calls racing for one session, one at most gets it."""
        ...

    # registration entries
    async def create_entry(self, entry: Entry, *, now: float) -> Entry:
        """Store a new entry with created_at=updated_at=int(now) and a revision set here: 1, or the
        last revision of a deleted entry of that id + 1 (so the old entry's revocation never voids
        the new one). EntryExistsError when the id is in use."""
        ...

    async def update_entry(self, entry: Entry, *, expected_revision: int, now: float) -> tuple[Entry, int]:
        """Replace an entry with revision expected_revision + 1 (created_at kept, updated_at=int(now))
        and revoke the older revisions. Returns (stored entry, new revocation version).
        EntryNotFoundError, or EntryConflictError when the stored revision is another."""
        ...

    async def delete_entry(self, entry_id: str, *, now: float) -> tuple[Entry, int]:
        """Delete an entry and revoke every revision of it. Returns (deleted entry, new revocation
        version); EntryNotFoundError when there is none."""
        ...

    async def entry(self, entry_id: str) -> Entry | None:
        ...

    async def entries(self) -> list[Entry]:
        """Every entry, by id."""
        ...

    # revocations
    async def revocations(self) -> Revocations:
        """A consistent snapshot of the revocations and their version."""
        ...

    async def bump_revocation_version(self) -> int:
        """A new version for the same content (the authority refreshes its document); returns it."""
        ...

    async def prune_revocations(self, *, older_than: float) -> int:
        """Drop entry revocations made before `older_than` and non-ban node revocations whose
        `before` is earlier (every SVID they void has expired); bans stay while the node is
        banned. The version is not bumped. Returns how many revocations were dropped."""
        ...
