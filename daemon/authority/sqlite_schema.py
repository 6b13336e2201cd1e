"""The SQLite store's file and schema: opening it safely, creating it, and migrating it forward.

Versions: 1 (the first release: nodes, enrolled EKs, bans, nonces, answered requests, boot
profiles); 2 (pending EKs, attestation sessions, registration entries, revocations); 3 (join
tokens and node keys). Each step runs in the transaction that opens the file, so a database is
at one version or the next, never between.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Callable
from pathlib import Path

from vouchd.authority.store import StoreError
from vouchd.authority.storesql import schema_version_found

__all__ = ["SCHEMA_VERSION", "connect"]

SCHEMA_VERSION = 3

# Version 1, as operators have it: these tables stay as they are.
_SCHEMA_V1 = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)",
    """CREATE TABLE IF NOT EXISTS nodes (
        node_id TEXT PRIMARY KEY,
        ek_hash TEXT NOT NULL UNIQUE,
        tier TEXT NOT NULL,
        state TEXT NOT NULL,
        ak_public BLOB NOT NULL,
        node_key_public BLOB NOT NULL,
        selectors TEXT NOT NULL,
        pcr_bank TEXT NOT NULL,
        pcr_indices TEXT NOT NULL,
        pcr_digest BLOB NOT NULL,
        reset_count INTEGER NOT NULL,
        restart_count INTEGER NOT NULL,
        clock INTEGER NOT NULL,
        attested_at REAL NOT NULL,
        last_quote_at REAL NOT NULL
    )""",
    "CREATE TABLE IF NOT EXISTS enrolled_eks (ek_hash TEXT PRIMARY KEY, source TEXT NOT NULL, added_at REAL NOT NULL)",
    "CREATE TABLE IF NOT EXISTS banned_nodes (node_id TEXT PRIMARY KEY, reason TEXT NOT NULL, banned_at REAL NOT NULL)",
    """CREATE TABLE IF NOT EXISTS nonces (
        nonce BLOB PRIMARY KEY,
        node_id TEXT NOT NULL,
        expires_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS nonces_by_expiry ON nonces (expires_at)",
    """CREATE TABLE IF NOT EXISTS answered (
        node_id TEXT NOT NULL,
        digest TEXT NOT NULL,
        reply BLOB NOT NULL,
        answered_at REAL NOT NULL,
        PRIMARY KEY (node_id, digest)
    )""",
    "CREATE INDEX IF NOT EXISTS answered_by_time ON answered (answered_at)",
    """CREATE TABLE IF NOT EXISTS event_log_profiles (
        name TEXT PRIMARY KEY,
        digests TEXT NOT NULL,
        learned_from TEXT NOT NULL,
        created_at REAL NOT NULL
    )""",
)

# Added by version 2.
_SCHEMA_V2 = (
    """CREATE TABLE IF NOT EXISTS pending_eks (
        ek_hash TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS pending_eks_by_node ON pending_eks (node_id)",
    """CREATE TABLE IF NOT EXISTS sessions (
        session TEXT PRIMARY KEY,
        node_id TEXT NOT NULL,
        ek_hash TEXT NOT NULL UNIQUE,
        ek_issuer_cn TEXT,
        ak_public BLOB NOT NULL,
        node_key_public BLOB NOT NULL,
        pcr_bank TEXT NOT NULL,
        pcr_indices TEXT NOT NULL,
        event_log BLOB,
        secret BLOB NOT NULL,
        server_nonce BLOB NOT NULL,
        expires_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS sessions_by_expiry ON sessions (expires_at)",
    # `wire` is Entry.to_wire() as JSON, the whole truth; the other columns are there to look entries up.
    """CREATE TABLE IF NOT EXISTS entries (
        id TEXT PRIMARY KEY,
        revision INTEGER NOT NULL,
        spiffe_id TEXT NOT NULL,
        parent TEXT,
        wire TEXT NOT NULL,
        created_at INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS entries_by_spiffe_id ON entries (spiffe_id)",
    "CREATE INDEX IF NOT EXISTS entries_by_parent ON entries (parent)",
    # Never pruned: an id used again continues the revisions of the entry it had, whenever that was.
    """CREATE TABLE IF NOT EXISTS deleted_entries (
        id TEXT PRIMARY KEY,
        last_revision INTEGER NOT NULL,
        deleted_at REAL NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS entry_revocations (
        entry_id TEXT PRIMARY KEY,
        below_revision INTEGER NOT NULL,
        revoked_at REAL NOT NULL
    )""",
    "CREATE INDEX IF NOT EXISTS entry_revocations_by_time ON entry_revocations (revoked_at)",
    """CREATE TABLE IF NOT EXISTS node_revocations (
        node_id TEXT PRIMARY KEY,
        reason TEXT NOT NULL,
        revokes_before REAL NOT NULL,
        banned INTEGER NOT NULL
    )""",
    """CREATE TABLE IF NOT EXISTS revocation_version (
        only_row INTEGER PRIMARY KEY CHECK (only_row = 1),
        version INTEGER NOT NULL
    )""",
)

# Added by version 3.
_SCHEMA_V3 = (
    # node_labels: a JSON array of strings.
    """CREATE TABLE IF NOT EXISTS join_tokens (
        token_id TEXT PRIMARY KEY,
        secret_sha256 TEXT NOT NULL,
        node_labels TEXT NOT NULL,
        created_at REAL NOT NULL,
        expires_at REAL NOT NULL,
        used_at REAL,
        used_by TEXT
    )""",
    """CREATE TABLE IF NOT EXISTS node_keys (
        node_id TEXT PRIMARY KEY,
        spki_der BLOB NOT NULL,
        source TEXT NOT NULL,
        enrolled_at REAL NOT NULL
    )""",
)


def connect(path: Path) -> sqlite3.Connection:
    """Open (creating or migrating) the database; the thread that calls this keeps the connection."""
    connection: sqlite3.Connection | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Born 0600, never through a symlink: SQLite gives its -wal and -shm files the database file's mode.
        os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
        path.chmod(0o600)
        connection = sqlite3.connect(path, isolation_level=None)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        connection.execute("BEGIN IMMEDIATE")
        try:
            _migrate(path, connection)
            connection.execute("COMMIT")
        except BaseException:
            connection.execute("ROLLBACK")
            raise
    except StoreError:
        if connection is not None:
            connection.close()
        raise
    except (sqlite3.Error, OSError) as err:
        if connection is not None:
            connection.close()
        raise StoreError(f"{path}: cannot open the authority database: {err}") from None
    return connection


def _migrate(path: Path, db: sqlite3.Connection) -> None:
    """Bring the database from the version it has (0: a new file) to SCHEMA_VERSION, step by step."""
    has_meta = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone() is not None
    row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() if has_meta else None
    found = schema_version_found(str(path), None if row is None else str(row[0]), latest=SCHEMA_VERSION)
    if found == SCHEMA_VERSION:
        return
    for step in _STEPS[found:]:
        step(db)
    db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))


def _create_v1(db: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V1:
        db.execute(statement)


def _v1_to_v2(db: sqlite3.Connection) -> None:
    """Version 1's tables stay; its bans get the node revocation a ban records today (revocation
    version 1, so that agents fetch it)."""
    for statement in _SCHEMA_V2:
        db.execute(statement)
    db.execute("INSERT OR IGNORE INTO node_revocations SELECT node_id, reason, banned_at, 1 FROM banned_nodes")
    (bans,) = db.execute("SELECT count(*) FROM banned_nodes").fetchone()
    db.execute("INSERT OR IGNORE INTO revocation_version VALUES (1, ?)", (1 if bans else 0,))


def _v2_to_v3(db: sqlite3.Connection) -> None:
    for statement in _SCHEMA_V3:
        db.execute(statement)


# _STEPS[n] brings a database from version n to n + 1.
_STEPS: tuple[Callable[[sqlite3.Connection], None], ...] = (_create_v1, _v1_to_v2, _v2_to_v3)
assert len(_STEPS) == SCHEMA_VERSION
