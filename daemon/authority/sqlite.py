"""SqliteStore: the authority's Store in one SQLite file (vouchd.authority.store has the contract).

One file in the authority's state directory (WAL journal, born 0600, never opened through a
symlink). One worker thread owns the connection, so no call blocks the event loop and calls run one
after another in the order they were made. A call whose caller is cancelled still runs to its end;
only its result is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

from vouchd.authority.store import (
    Ban,
    EntryConflictError,
    EntryExistsError,
    EntryNotFoundError,
    NodeRecord,
    NodeState,
    PendingNode,
    ProfileRecord,
    Revocations,
    RevokedEntry,
    RevokedNode,
    SessionRecord,
    StoreError,
)
from vouchd.entries import Entry, InvalidEntryError

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

_T = TypeVar("_T")


SCHEMA_VERSION = 2

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

# One row per node: revocations of one node merge into the one that voids most (the latest
# `before`), and a later non-ban revocation never lifts a ban or replaces its reason.
_REVOKE_NODE = """
    INSERT INTO node_revocations (node_id, reason, revokes_before, banned) VALUES (?, ?, ?, ?)
    ON CONFLICT (node_id) DO UPDATE SET
        reason = CASE WHEN node_revocations.banned AND NOT excluded.banned
                      THEN node_revocations.reason ELSE excluded.reason END,
        revokes_before = max(node_revocations.revokes_before, excluded.revokes_before),
        banned = max(node_revocations.banned, excluded.banned)
"""

_NODE_COLUMNS = ("node_id, ek_hash, tier, state, ak_public, node_key_public, selectors, pcr_bank, pcr_indices, "
                 "pcr_digest, reset_count, restart_count, clock, attested_at, last_quote_at")
_SESSION_COLUMNS = ("session, node_id, ek_hash, ek_issuer_cn, ak_public, node_key_public, pcr_bank, pcr_indices, "
                    "event_log, secret, server_nonce, expires_at")


class SqliteStore:
    """The Store in one SQLite file. Open it with `await SqliteStore.open(path)`; close it with
    `await store.close()`.

    One worker thread owns the connection and runs each call as one transaction (BEGIN IMMEDIATE
    for changes, so that another process sharing the file waits instead of failing halfway).
    """

    def __init__(self, path: Path, executor: ThreadPoolExecutor, connection: sqlite3.Connection) -> None:
        """Internal: use `SqliteStore.open`."""
        self._path = path
        self._executor = executor
        self._db = connection
        self._closed = False

    @classmethod
    async def open(cls, path: Path) -> SqliteStore:
        """Open the database at `path`, creating it (and a missing state directory, 0700) or
        migrating a version 1 database. StoreError when it cannot: a symlink at `path`, a file that
        is not a database, a schema version this vouchd does not know."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vouchd-store")
        try:
            connection = await asyncio.get_running_loop().run_in_executor(executor, _connect, path)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(path, executor, connection)

    @property
    def path(self) -> Path:
        return self._path

    async def close(self) -> None:
        """Finish the calls already made, then close the connection and stop the worker thread."""
        if self._closed:
            return
        self._closed = True
        try:
            await asyncio.get_running_loop().run_in_executor(self._executor, self._db.close)
        finally:
            self._executor.shutdown(wait=False)

    # -- running calls on the worker thread ---------------------------------------------------------
    async def _read(self, what: str, work: Callable[[sqlite3.Connection], _T]) -> _T:
        return await self._run(what, work, begin="BEGIN")

    async def _write(self, what: str, work: Callable[[sqlite3.Connection], _T]) -> _T:
        return await self._run(what, work, begin="BEGIN IMMEDIATE")

    async def _run(self, what: str, work: Callable[[sqlite3.Connection], _T], *, begin: str) -> _T:
        if self._closed:
            raise StoreError(f"{self._path}: cannot {what}: the store is closed")

        def transaction() -> _T:
            db = self._db
            try:
                db.execute(begin)
                try:
                    result = work(db)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        with contextlib.suppress(sqlite3.Error):
                            db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as err:
                raise StoreError(f"{self._path}: cannot {what}: {err}") from None
            return result

        return await asyncio.get_running_loop().run_in_executor(self._executor, transaction)

    # -- enrolment ------------------------------------------------------------------------------------
    async def enrol_ek(self, ek_hash: str, source: str, *, now: float) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR IGNORE INTO enrolled_eks VALUES (?, ?, ?)", (ek_hash, source, now))
            db.execute("DELETE FROM pending_eks WHERE ek_hash=?", (ek_hash,))

        await self._write("enrol an ek", work)

    async def is_enrolled(self, ek_hash: str) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            return db.execute("SELECT 1 FROM enrolled_eks WHERE ek_hash=?", (ek_hash,)).fetchone() is not None

        return await self._read("read enrolment", work)

    async def add_pending(self, ek_hash: str, node_id: str, *, now: float) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "INSERT INTO pending_eks SELECT ?, ?, ?, ? WHERE NOT EXISTS "
                "(SELECT 1 FROM enrolled_eks WHERE ek_hash=?) "
                "ON CONFLICT (ek_hash) DO UPDATE SET last_seen=excluded.last_seen",
                (ek_hash, node_id, now, now, ek_hash),
            )

        await self._write("add a pending ek", work)

    async def pending(self) -> list[PendingNode]:
        def work(db: sqlite3.Connection) -> list[PendingNode]:
            rows = db.execute("SELECT ek_hash, node_id, first_seen, last_seen FROM pending_eks "
                              "ORDER BY first_seen, ek_hash").fetchall()
            return [PendingNode(*row) for row in rows]

        return await self._read("list pending eks", work)

    async def approve(self, node_id_or_ek_hash: str, *, now: float) -> PendingNode | None:
        def work(db: sqlite3.Connection) -> PendingNode | None:
            row = db.execute(
                "DELETE FROM pending_eks WHERE ek_hash=?1 OR node_id=?1 RETURNING ek_hash, node_id, first_seen, "
                "last_seen", (node_id_or_ek_hash,),
            ).fetchone()
            if row is None:
                return None
            approved = PendingNode(*row)
            db.execute("INSERT OR IGNORE INTO enrolled_eks VALUES (?, 'approved', ?)", (approved.ek_hash, now))
            return approved

        return await self._write(f"approve {node_id_or_ek_hash}", work)

    # -- nodes ----------------------------------------------------------------------------------------
    async def save_node(self, node: NodeRecord) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute(
                f"INSERT OR REPLACE INTO nodes ({_NODE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
                (node.node_id, node.ek_hash, node.tier, node.state.value, node.ak_public, node.node_key_public,
                 json.dumps(list(node.selectors)), node.pcr_bank, json.dumps(list(node.pcr_indices)),
                 node.pcr_digest, node.reset_count, node.restart_count, node.clock, node.attested_at,
                 node.last_quote_at),
            )

        await self._write(f"save node {node.node_id}", work)

    async def node(self, node_id: str) -> NodeRecord | None:
        def work(db: sqlite3.Connection) -> NodeRecord | None:
            row = db.execute(f"SELECT {_NODE_COLUMNS} FROM nodes WHERE node_id=?", (node_id,)).fetchone()  # noqa: S608
            return None if row is None else _node_from_row(row)

        return await self._read(f"read node {node_id}", work)

    async def nodes(self) -> list[NodeRecord]:
        def work(db: sqlite3.Connection) -> list[NodeRecord]:
            rows = db.execute(f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY node_id").fetchall()  # noqa: S608
            return [_node_from_row(row) for row in rows]

        return await self._read("list nodes", work)

    async def record_quote(self, node_id: str, *, reset_count: int, restart_count: int, clock: int,
                           now: float) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("UPDATE nodes SET reset_count=?, restart_count=?, clock=?, last_quote_at=? WHERE node_id=?",
                       (reset_count, restart_count, clock, now, node_id))

        await self._write(f"record a quote of node {node_id}", work)

    async def set_node_state(self, node_id: str, state: NodeState) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("UPDATE nodes SET state=? WHERE node_id=?", (state.value, node_id))

        await self._write(f"set the state of node {node_id}", work)

    # -- bans -----------------------------------------------------------------------------------------
    async def ban_node(self, node_id: str, reason: str, *, now: float) -> int:
        def work(db: sqlite3.Connection) -> int:
            db.execute("INSERT INTO banned_nodes VALUES (?, ?, ?) ON CONFLICT (node_id) DO UPDATE SET "
                       "reason=excluded.reason", (node_id, reason, now))
            db.execute("UPDATE nodes SET state=? WHERE node_id=?", (NodeState.BANNED.value, node_id))
            db.execute(_REVOKE_NODE, (node_id, reason, now, 1))
            return _bump_version(db)

        return await self._write(f"ban node {node_id}", work)

    async def unban_node(self, node_id: str, *, now: float) -> int | None:
        def work(db: sqlite3.Connection) -> int | None:
            ban = db.execute("DELETE FROM banned_nodes WHERE node_id=? RETURNING reason, banned_at",
                             (node_id,)).fetchone()
            if ban is None:
                return None
            reason, banned_at = ban
            db.execute("INSERT INTO node_revocations VALUES (?, ?, ?, 0) ON CONFLICT (node_id) DO UPDATE SET banned=0",
                       (node_id, reason, banned_at))
            db.execute("UPDATE nodes SET state=? WHERE node_id=?", (NodeState.ATTESTING.value, node_id))
            return _bump_version(db)

        return await self._write(f"unban node {node_id}", work)

    async def is_banned(self, node_id: str) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            return db.execute("SELECT 1 FROM banned_nodes WHERE node_id=?", (node_id,)).fetchone() is not None

        return await self._read("read bans", work)

    async def bans(self) -> list[Ban]:
        def work(db: sqlite3.Connection) -> list[Ban]:
            rows = db.execute("SELECT node_id, reason, banned_at FROM banned_nodes ORDER BY node_id").fetchall()
            return [Ban(*row) for row in rows]

        return await self._read("list bans", work)

    # -- nonces ---------------------------------------------------------------------------------------
    async def add_nonce(self, node_id: str, nonce: bytes, expires_at: float, *, now: float) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM nonces WHERE expires_at < ?", (now,))
            db.execute("INSERT INTO nonces VALUES (?, ?, ?)", (nonce, node_id, expires_at))

        await self._write(f"add a nonce for node {node_id}", work)

    async def consume_nonce(self, node_id: str, nonce: bytes, *, now: float) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            # One statement decides: of racing requests (on any connection), one deletes the row.
            deleted = db.execute("DELETE FROM nonces WHERE nonce=? AND node_id=? AND expires_at >= ? RETURNING 1",
                                 (nonce, node_id, now)).fetchall()
            return len(deleted) == 1

        return await self._write(f"consume a nonce of node {node_id}", work)

    # -- answered requests ----------------------------------------------------------------------------
    async def answered_reply(self, node_id: str, digest: str) -> bytes | None:
        def work(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT reply FROM answered WHERE node_id=? AND digest=?", (node_id, digest)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._read("read an answered reply", work)

    async def remember_reply(self, node_id: str, digest: str, reply: bytes, *, now: float,
                             keep_seconds: float) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM answered WHERE answered_at < ?", (now - keep_seconds,))
            db.execute("INSERT OR REPLACE INTO answered VALUES (?, ?, ?, ?)", (node_id, digest, reply, now))

        await self._write(f"remember a reply to node {node_id}", work)

    # -- boot profiles --------------------------------------------------------------------------------
    async def save_profile(self, name: str, digests: Iterable[str], learned_from: str, *, now: float) -> None:
        encoded = json.dumps(sorted(set(digests)))

        def work(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO event_log_profiles VALUES (?, ?, ?, ?)",
                       (name, encoded, learned_from, now))

        await self._write(f"save profile {name}", work)

    async def profiles(self) -> dict[str, frozenset[str]]:
        def work(db: sqlite3.Connection) -> dict[str, frozenset[str]]:
            rows = db.execute("SELECT name, digests FROM event_log_profiles ORDER BY name").fetchall()
            return {name: frozenset(json.loads(digests)) for name, digests in rows}

        return await self._read("read profiles", work)

    async def profile_records(self) -> list[ProfileRecord]:
        def work(db: sqlite3.Connection) -> list[ProfileRecord]:
            rows = db.execute("SELECT name, digests, learned_from, created_at FROM event_log_profiles "
                              "ORDER BY name").fetchall()
            return [ProfileRecord(name, len(json.loads(digests)), learned_from, created_at)
                    for name, digests, learned_from, created_at in rows]

        return await self._read("list profiles", work)

    async def remove_profile(self, name: str, *, now: float) -> tuple[int, list[str]] | None:
        selector = f"tpm:pcr_profile:{name}"

        def work(db: sqlite3.Connection) -> tuple[int, list[str]] | None:
            if db.execute("DELETE FROM event_log_profiles WHERE name=? RETURNING 1", (name,)).fetchone() is None:
                return None
            affected = [node_id for node_id, selectors in
                        db.execute("SELECT node_id, selectors FROM nodes ORDER BY node_id").fetchall()
                        if selector in json.loads(selectors)]
            if not affected:
                return _version(db), []
            for node_id in affected:
                db.execute("UPDATE nodes SET state=? WHERE node_id=? AND state NOT IN (?, ?)",
                           (NodeState.ATTESTING.value, node_id, NodeState.BANNED.value, NodeState.FAILED.value))
                db.execute(_REVOKE_NODE, (node_id, f"boot profile {name} removed", now, 0))
            return _bump_version(db), affected

        return await self._write(f"remove profile {name}", work)

    # -- attestation sessions -------------------------------------------------------------------------
    async def put_session(self, record: SessionRecord, *, max_sessions: int, now: float) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM sessions WHERE expires_at < ?", (now,))
            replaced = db.execute("DELETE FROM sessions WHERE ek_hash=? RETURNING 1", (record.ek_hash,)).fetchone()
            if replaced is None:
                (in_progress,) = db.execute("SELECT count(*) FROM sessions").fetchone()
                if in_progress >= max_sessions:
                    return False
            db.execute(
                f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
                (record.session, record.node_id, record.ek_hash, record.ek_issuer_cn, record.ak_public,
                 record.node_key_public, record.pcr_bank, json.dumps(list(record.pcr_indices)), record.event_log,
                 record.secret, record.server_nonce, record.expires_at),
            )
            return True

        return await self._write(f"store an attestation session of node {record.node_id}", work)

    async def take_session(self, session_id: str, *, now: float) -> SessionRecord | None:
        def work(db: sqlite3.Connection) -> SessionRecord | None:
            row = db.execute(f"DELETE FROM sessions WHERE session=? RETURNING {_SESSION_COLUMNS}",  # noqa: S608
                             (session_id,)).fetchone()
            if row is None:
                return None
            record = _session_from_row(row)
            return record if now <= record.expires_at else None

        return await self._write("take an attestation session", work)

    # -- registration entries -------------------------------------------------------------------------
    async def create_entry(self, entry: Entry, *, now: float) -> Entry:
        def work(db: sqlite3.Connection) -> Entry:
            if db.execute("SELECT 1 FROM entries WHERE id=?", (entry.id,)).fetchone() is not None:
                raise EntryExistsError(entry.id)
            deleted = db.execute("SELECT last_revision FROM deleted_entries WHERE id=?", (entry.id,)).fetchone()
            stored = replace(entry, revision=1 if deleted is None else deleted[0] + 1,
                             created_at=int(now), updated_at=int(now))
            db.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)", _entry_row(stored))
            return stored

        return await self._write(f"create entry {entry.id}", work)

    async def update_entry(self, entry: Entry, *, expected_revision: int, now: float) -> tuple[Entry, int]:
        def work(db: sqlite3.Connection) -> tuple[Entry, int]:
            row = db.execute("SELECT revision, created_at FROM entries WHERE id=?", (entry.id,)).fetchone()
            if row is None:
                raise EntryNotFoundError(entry.id)
            revision, created_at = row
            if revision != expected_revision:
                raise EntryConflictError(entry.id, stored_revision=revision, expected_revision=expected_revision)
            stored = replace(entry, revision=revision + 1, created_at=created_at, updated_at=int(now))
            db.execute("INSERT OR REPLACE INTO entries VALUES (?, ?, ?, ?, ?, ?, ?)", _entry_row(stored))
            _revoke_entry(db, entry.id, below_revision=stored.revision, now=now)
            return stored, _bump_version(db)

        return await self._write(f"update entry {entry.id}", work)

    async def delete_entry(self, entry_id: str, *, now: float) -> tuple[Entry, int]:
        def work(db: sqlite3.Connection) -> tuple[Entry, int]:
            row = db.execute("DELETE FROM entries WHERE id=? RETURNING wire", (entry_id,)).fetchone()
            if row is None:
                raise EntryNotFoundError(entry_id)
            deleted = self._entry_from_wire(entry_id, row[0])
            db.execute("INSERT OR REPLACE INTO deleted_entries VALUES (?, ?, ?)", (entry_id, deleted.revision, now))
            _revoke_entry(db, entry_id, below_revision=deleted.revision + 1, now=now)
            return deleted, _bump_version(db)

        return await self._write(f"delete entry {entry_id}", work)

    async def entry(self, entry_id: str) -> Entry | None:
        def work(db: sqlite3.Connection) -> Entry | None:
            row = db.execute("SELECT wire FROM entries WHERE id=?", (entry_id,)).fetchone()
            return None if row is None else self._entry_from_wire(entry_id, row[0])

        return await self._read(f"read entry {entry_id}", work)

    async def entries(self) -> list[Entry]:
        def work(db: sqlite3.Connection) -> list[Entry]:
            rows = db.execute("SELECT id, wire FROM entries").fetchall()
            return sorted((self._entry_from_wire(entry_id, wire) for entry_id, wire in rows), key=lambda e: e.id)

        return await self._read("list entries", work)

    def _entry_from_wire(self, entry_id: str, wire: str) -> Entry:
        try:
            return Entry.from_wire(json.loads(wire))
        except (ValueError, InvalidEntryError) as err:
            raise StoreError(f"{self._path}: entry {entry_id} is stored damaged: {err}") from None

    # -- revocations ----------------------------------------------------------------------------------
    async def revocations(self) -> Revocations:
        def work(db: sqlite3.Connection) -> Revocations:
            entries = db.execute("SELECT entry_id, below_revision, revoked_at FROM entry_revocations "
                                 "ORDER BY entry_id").fetchall()
            nodes = db.execute("SELECT node_id, reason, revokes_before, banned FROM node_revocations "
                               "ORDER BY node_id").fetchall()
            return Revocations(
                version=_version(db),
                entries=tuple(RevokedEntry(*row) for row in entries),
                nodes=tuple(RevokedNode(node_id, reason, before, bool(banned))
                            for node_id, reason, before, banned in nodes),
            )

        return await self._read("read revocations", work)

    async def bump_revocation_version(self) -> int:
        return await self._write("bump the revocation version", _bump_version)

    async def prune_revocations(self, *, older_than: float) -> int:
        def work(db: sqlite3.Connection) -> int:
            entries = db.execute("DELETE FROM entry_revocations WHERE revoked_at < ?", (older_than,)).rowcount
            nodes = db.execute("DELETE FROM node_revocations WHERE banned=0 AND revokes_before < ?",
                               (older_than,)).rowcount
            return int(entries) + int(nodes)

        return await self._write("prune revocations", work)


# -- helpers run on the worker thread ---------------------------------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
    """Open (creating or migrating) the database; runs on the store's worker thread, which keeps it."""
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
            _prepare_schema(path, connection)
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


def _prepare_schema(path: Path, db: sqlite3.Connection) -> None:
    """Create a new database, or bring a version 1 database to version 2: its tables stay, bans get
    the node revocation a ban records today (version 1, so agents fetch it)."""
    has_meta = db.execute("SELECT 1 FROM sqlite_master WHERE type='table' AND name='meta'").fetchone() is not None
    row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() if has_meta else None
    if row is not None:
        found = str(row[0])
        if found == str(SCHEMA_VERSION):
            return
        if found != "1":
            raise StoreError(f"{path}: schema version {found[:20]} is not one this vouchd reads "
                             f"(1 or {SCHEMA_VERSION})")
    for statement in (*_SCHEMA_V1, *_SCHEMA_V2):
        db.execute(statement)
    db.execute("INSERT OR IGNORE INTO node_revocations "
               "SELECT node_id, reason, banned_at, 1 FROM banned_nodes")
    (bans,) = db.execute("SELECT count(*) FROM banned_nodes").fetchone()
    db.execute("INSERT OR IGNORE INTO revocation_version VALUES (1, ?)", (1 if bans else 0,))
    db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))


def _version(db: sqlite3.Connection) -> int:
    (version,) = db.execute("SELECT version FROM revocation_version").fetchone()
    return int(version)


def _bump_version(db: sqlite3.Connection) -> int:
    (version,) = db.execute("UPDATE revocation_version SET version = version + 1 RETURNING version").fetchone()
    return int(version)


def _revoke_entry(db: sqlite3.Connection, entry_id: str, *, below_revision: int, now: float) -> None:
    db.execute("INSERT INTO entry_revocations VALUES (?, ?, ?) ON CONFLICT (entry_id) DO UPDATE SET "
               "below_revision=max(below_revision, excluded.below_revision), revoked_at=excluded.revoked_at",
               (entry_id, below_revision, now))


def _entry_row(entry: Entry) -> tuple[object, ...]:
    return (entry.id, entry.revision, str(entry.spiffe_id), None if entry.parent is None else str(entry.parent),
            json.dumps(entry.to_wire(), sort_keys=True), entry.created_at, entry.updated_at)


def _node_from_row(row: Any) -> NodeRecord:
    (node_id, ek_hash, tier, state, ak_public, node_key_public, selectors, pcr_bank, pcr_indices,
     pcr_digest, reset_count, restart_count, clock, attested_at, last_quote_at) = row
    return NodeRecord(
        node_id=node_id, ek_hash=ek_hash, tier=tier, state=NodeState(state),
        ak_public=bytes(ak_public), node_key_public=bytes(node_key_public),
        selectors=tuple(json.loads(selectors)), pcr_bank=pcr_bank, pcr_indices=tuple(json.loads(pcr_indices)),
        pcr_digest=bytes(pcr_digest), reset_count=reset_count, restart_count=restart_count, clock=clock,
        attested_at=attested_at, last_quote_at=last_quote_at,
    )


def _session_from_row(row: Any) -> SessionRecord:
    (session, node_id, ek_hash, ek_issuer_cn, ak_public, node_key_public, pcr_bank, pcr_indices, event_log,
     secret, server_nonce, expires_at) = row
    return SessionRecord(
        session=session, node_id=node_id, ek_hash=ek_hash, ek_issuer_cn=ek_issuer_cn, ak_public=bytes(ak_public),
        node_key_public=bytes(node_key_public), pcr_bank=pcr_bank, pcr_indices=tuple(json.loads(pcr_indices)),
        event_log=None if event_log is None else bytes(event_log), secret=bytes(secret),
        server_nonce=bytes(server_nonce), expires_at=expires_at,
    )
