"""The PostgreSQL store's schema and its migrations.

A database's schema version is in `meta` (key `schema_version`). Opening a store migrates the
database forward, step by step, in one transaction (PostgreSQL's DDL is transactional: a database
is at one version or the next, never between), under an advisory lock, so that replicas starting
together migrate it once. A database of a newer version than this vouchd knows is refused.

Text that is sorted or compared is `COLLATE "C"` (byte order), so that lists come out in the
same order as from SQLite whatever the database's locale.
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg

from vouchd.authority.storesql import schema_version_found

__all__ = ["LOCK_CLASS", "LOCK_ENROLMENT", "LOCK_MIGRATION", "LOCK_SESSIONS", "MIGRATIONS", "SCHEMA_VERSION",
           "migrate"]

# Advisory locks (pg_advisory_xact_lock(LOCK_CLASS, key)): "vouc" and one key per purpose.
LOCK_CLASS = 0x766F7563
LOCK_MIGRATION = 1
LOCK_SESSIONS = 2
LOCK_ENROLMENT = 3

_KEY = 'text COLLATE "C"'
_TIME = "double precision"

# MIGRATIONS[n] brings a database from version n to n + 1.
MIGRATIONS: tuple[Sequence[str], ...] = (
    (
        f"CREATE TABLE meta (key {_KEY} PRIMARY KEY, value text NOT NULL)",
        f"""CREATE TABLE nodes (
            node_id {_KEY} PRIMARY KEY,
            ek_hash {_KEY} NOT NULL UNIQUE,
            tier text NOT NULL,
            state text NOT NULL,
            ak_public bytea NOT NULL,
            node_key_public bytea NOT NULL,
            selectors text[] NOT NULL,
            pcr_bank text NOT NULL,
            pcr_indices integer[] NOT NULL,
            pcr_digest bytea NOT NULL,
            reset_count bigint NOT NULL,
            restart_count bigint NOT NULL,
            clock bigint NOT NULL,
            attested_at {_TIME} NOT NULL,
            last_quote_at {_TIME} NOT NULL
        )""",
        f"CREATE TABLE enrolled_eks (ek_hash {_KEY} PRIMARY KEY, source text NOT NULL, added_at {_TIME} NOT NULL)",
        f"""CREATE TABLE pending_eks (
            ek_hash {_KEY} PRIMARY KEY,
            node_id {_KEY} NOT NULL,
            first_seen {_TIME} NOT NULL,
            last_seen {_TIME} NOT NULL
        )""",
        "CREATE INDEX pending_eks_by_node ON pending_eks (node_id)",
        f"CREATE TABLE banned_nodes (node_id {_KEY} PRIMARY KEY, reason text NOT NULL, banned_at {_TIME} NOT NULL)",
        f"CREATE TABLE nonces (nonce bytea PRIMARY KEY, node_id {_KEY} NOT NULL, expires_at {_TIME} NOT NULL)",
        "CREATE INDEX nonces_by_expiry ON nonces (expires_at)",
        f"""CREATE TABLE answered (
            node_id {_KEY} NOT NULL,
            digest {_KEY} NOT NULL,
            reply bytea NOT NULL,
            answered_at {_TIME} NOT NULL,
            PRIMARY KEY (node_id, digest)
        )""",
        "CREATE INDEX answered_by_time ON answered (answered_at)",
        f"""CREATE TABLE event_log_profiles (
            name {_KEY} PRIMARY KEY,
            digests text[] NOT NULL,
            learned_from text NOT NULL,
            created_at {_TIME} NOT NULL
        )""",
        f"""CREATE TABLE sessions (
            session {_KEY} PRIMARY KEY,
            node_id {_KEY} NOT NULL,
            ek_hash {_KEY} NOT NULL UNIQUE,
            ek_issuer_cn text,
            ak_public bytea NOT NULL,
            node_key_public bytea NOT NULL,
            pcr_bank text NOT NULL,
            pcr_indices integer[] NOT NULL,
            event_log bytea,
            secret bytea NOT NULL,
            server_nonce bytea NOT NULL,
            expires_at {_TIME} NOT NULL
        )""",
        "CREATE INDEX sessions_by_expiry ON sessions (expires_at)",
        # `wire` is Entry.to_wire() as JSON text, the whole truth; the other columns are there to look entries up.
        f"""CREATE TABLE entries (
            id {_KEY} PRIMARY KEY,
            revision bigint NOT NULL,
            spiffe_id text NOT NULL,
            parent text,
            wire text NOT NULL,
            created_at bigint NOT NULL,
            updated_at bigint NOT NULL
        )""",
        "CREATE INDEX entries_by_spiffe_id ON entries (spiffe_id)",
        "CREATE INDEX entries_by_parent ON entries (parent)",
        # Never pruned: an id used again continues the revisions of the entry it had, whenever that was.
        f"""CREATE TABLE deleted_entries (
            id {_KEY} PRIMARY KEY,
            last_revision bigint NOT NULL,
            deleted_at {_TIME} NOT NULL
        )""",
        f"""CREATE TABLE entry_revocations (
            entry_id {_KEY} PRIMARY KEY,
            below_revision bigint NOT NULL,
            revoked_at {_TIME} NOT NULL
        )""",
        "CREATE INDEX entry_revocations_by_time ON entry_revocations (revoked_at)",
        f"""CREATE TABLE node_revocations (
            node_id {_KEY} PRIMARY KEY,
            reason text NOT NULL,
            revokes_before {_TIME} NOT NULL,
            banned boolean NOT NULL
        )""",
        # One row: every change that revokes locks it first, so such changes run one at a time.
        """CREATE TABLE revocation_version (
            only_row integer PRIMARY KEY CHECK (only_row = 1),
            version bigint NOT NULL
        )""",
        "INSERT INTO revocation_version VALUES (1, 0)",
        f"""CREATE TABLE join_tokens (
            token_id {_KEY} PRIMARY KEY,
            secret_sha256 text NOT NULL,
            node_labels text[] NOT NULL,
            created_at {_TIME} NOT NULL,
            expires_at {_TIME} NOT NULL,
            used_at {_TIME},
            used_by text
        )""",
        f"""CREATE TABLE node_keys (
            node_id {_KEY} PRIMARY KEY,
            spki_der bytea NOT NULL,
            source text NOT NULL,
            enrolled_at {_TIME} NOT NULL
        )""",
    ),
)

SCHEMA_VERSION = len(MIGRATIONS)


async def migrate(where: str, connection: psycopg.AsyncConnection[tuple[object, ...]],
                  migrations: Sequence[Sequence[str]] = MIGRATIONS) -> int:
    """Bring the database to the latest version of `migrations`; returns the version it had (0: none).
    StoreError when its version is newer or not a version at all; psycopg.Error when the database fails."""
    async with connection.transaction(), connection.cursor() as cursor:
        await cursor.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, LOCK_MIGRATION))
        await cursor.execute("SELECT to_regclass('meta') IS NOT NULL")
        row = await cursor.fetchone()
        found: str | None = None
        if row is not None and row[0]:
            await cursor.execute("SELECT value FROM meta WHERE key = 'schema_version'")
            version_row = await cursor.fetchone()
            found = None if version_row is None else str(version_row[0])
        version = schema_version_found(where, found, latest=len(migrations))
        for statements in migrations[version:]:
            for statement in statements:
                await cursor.execute(statement.encode())
        if version < len(migrations):
            await cursor.execute("INSERT INTO meta VALUES ('schema_version', %s) ON CONFLICT (key) DO UPDATE "
                                 "SET value = excluded.value", (str(len(migrations)),))
        return version
