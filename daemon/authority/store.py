"""The authority's durable state: nodes, single-use nonces, answered requests, EK enrolment.

SQLite by default (one file in the authority's state directory, WAL journal). Each method is one
short transaction; the single-use nonce is consumed by one DELETE whose row count decides, so two
requests racing with the same nonce cannot both pass.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from vouchd.authority.errors import AuthorityError

__all__ = ["AuthorityStore", "NodeRecord", "NodeState", "StoreError"]

_SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS nodes (
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
);
CREATE TABLE IF NOT EXISTS enrolled_eks (ek_hash TEXT PRIMARY KEY, source TEXT NOT NULL, added_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS banned_nodes (node_id TEXT PRIMARY KEY, reason TEXT NOT NULL, banned_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS nonces (
    nonce BLOB PRIMARY KEY,
    node_id TEXT NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS nonces_by_expiry ON nonces (expires_at);
CREATE TABLE IF NOT EXISTS answered (
    node_id TEXT NOT NULL,
    digest TEXT NOT NULL,
    reply BLOB NOT NULL,
    answered_at REAL NOT NULL,
    PRIMARY KEY (node_id, digest)
);
CREATE INDEX IF NOT EXISTS answered_by_time ON answered (answered_at);
CREATE TABLE IF NOT EXISTS event_log_profiles (
    name TEXT PRIMARY KEY,
    digests TEXT NOT NULL,
    learned_from TEXT NOT NULL,
    created_at REAL NOT NULL
);
"""


class StoreError(AuthorityError):
    """The authority's database cannot be opened or used."""


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


class AuthorityStore:
    """One connection, used under a lock: the authority may call it from more than one thread, and a
    single-use nonce must stay single-use however the calls interleave."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.RLock()
        try:
            # Born 0600: SQLite gives its -wal and -shm files the database file's mode.
            os.close(os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
            path.chmod(0o600)
            self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            self._db.executescript(_SCHEMA)
            row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
            if row is None:
                self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(_SCHEMA_VERSION),))
            elif int(row[0]) != _SCHEMA_VERSION:
                raise StoreError(f"{path}: schema version {row[0]} is not {_SCHEMA_VERSION}")
        except (sqlite3.Error, OSError) as err:
            raise StoreError(f"{path}: cannot open the authority database: {err}") from None

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _execute(self, sql: str, parameters: tuple[object, ...] = ()) -> list[Any]:
        with self._lock:
            return self._db.execute(sql, parameters).fetchall()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    # -- enrolment ---------------------------------------------------------------------------
    def enrol_ek(self, ek_hash: str, source: str) -> None:
        self._execute("INSERT OR IGNORE INTO enrolled_eks VALUES (?, ?, ?)", (ek_hash, source, time.time()))

    def is_enrolled(self, ek_hash: str) -> bool:
        return self._execute("SELECT 1 FROM enrolled_eks WHERE ek_hash=?", (ek_hash,)) != []

    def is_banned(self, node_id: str) -> bool:
        return self._execute("SELECT 1 FROM banned_nodes WHERE node_id=?", (node_id,)) != []

    # -- nodes -------------------------------------------------------------------------------
    def save_node(self, node: NodeRecord) -> None:
        self._execute(
            "INSERT OR REPLACE INTO nodes VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (node.node_id, node.ek_hash, node.tier, node.state.value, node.ak_public, node.node_key_public,
             json.dumps(list(node.selectors)), node.pcr_bank, json.dumps(list(node.pcr_indices)),
             node.pcr_digest, node.reset_count, node.restart_count, node.clock, node.attested_at,
             node.last_quote_at),
        )

    def node(self, node_id: str) -> NodeRecord | None:
        rows = self._execute("SELECT * FROM nodes WHERE node_id=?", (node_id,))
        return _node_from_row(rows[0]) if rows else None

    def nodes(self) -> list[NodeRecord]:
        return [_node_from_row(r) for r in self._execute("SELECT * FROM nodes ORDER BY node_id")]

    def record_quote(self, node_id: str, *, reset_count: int, restart_count: int, clock: int) -> None:
        self._execute(
            "UPDATE nodes SET reset_count=?, restart_count=?, clock=?, last_quote_at=? WHERE node_id=?",
            (reset_count, restart_count, clock, time.time(), node_id),
        )

    def set_node_state(self, node_id: str, state: NodeState) -> None:
        self._execute("UPDATE nodes SET state=? WHERE node_id=?", (state.value, node_id))

    # -- nonces ------------------------------------------------------------------------------
    def add_nonce(self, node_id: str, nonce: bytes, expires_at: float) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM nonces WHERE expires_at < ?", (time.time(),))
            db.execute("INSERT INTO nonces VALUES (?, ?, ?)", (nonce, node_id, expires_at))

    def consume_nonce(self, node_id: str, nonce: bytes) -> bool:
        """True exactly once for a nonce handed to this node that has not expired."""
        deleted = self._execute(
            "DELETE FROM nonces WHERE nonce=? AND node_id=? AND expires_at >= ? RETURNING nonce",
            (nonce, node_id, time.time()),
        )
        return len(deleted) == 1

    # -- answered requests (QoS 1 redelivery gets the same reply) ----------------------------------
    def answered_reply(self, node_id: str, digest: str) -> bytes | None:
        rows = self._execute("SELECT reply FROM answered WHERE node_id=? AND digest=?", (node_id, digest))
        return bytes(rows[0][0]) if rows else None

    def remember_reply(self, node_id: str, digest: str, reply: bytes, *, keep_seconds: float) -> None:
        now = time.time()
        with self._transaction() as db:
            db.execute("DELETE FROM answered WHERE answered_at < ?", (now - keep_seconds,))
            db.execute("INSERT OR REPLACE INTO answered VALUES (?, ?, ?, ?)", (node_id, digest, reply, now))

    # -- event log profiles ------------------------------------------------------------------
    def save_profile(self, name: str, digests: list[str], learned_from: str) -> None:
        self._execute(
            "INSERT OR REPLACE INTO event_log_profiles VALUES (?, ?, ?, ?)",
            (name, json.dumps(sorted(set(digests))), learned_from, time.time()),
        )

    def profiles(self) -> dict[str, frozenset[str]]:
        return {
            name: frozenset(json.loads(digests))
            for name, digests in self._execute("SELECT name, digests FROM event_log_profiles ORDER BY name")
        }


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
