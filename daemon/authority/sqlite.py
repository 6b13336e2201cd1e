"""SqliteStore: the authority's Store in one SQLite file (vouchd.authority.store has the contract).

One file in the authority's state directory (WAL journal, born 0600, never opened through a
symlink; vouchd.authority.sqlite_schema creates and migrates it). One worker thread owns the
connection, so no call blocks the event loop and calls run one after another in the order they
were made. A call whose caller is cancelled still runs to its end; only its result is dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

from vouchd.authority.sqlite_registry import REVOKE_NODE, SqliteRegistryCalls, bump_version
from vouchd.authority.sqlite_schema import SCHEMA_VERSION, connect
from vouchd.authority.store import (
    Ban,
    JoinTokenRecord,
    NodeRecord,
    NodeState,
    PendingNode,
    StoreError,
)

__all__ = ["SCHEMA_VERSION", "SqliteStore"]

_T = TypeVar("_T")

_NODE_COLUMNS = ("node_id, ek_hash, tier, state, ak_public, node_key_public, selectors, pcr_bank, pcr_indices, "
                 "pcr_digest, reset_count, restart_count, clock, attested_at, last_quote_at")
_JOIN_COLUMNS = "token_id, secret_sha256, node_labels, created_at, expires_at, used_at, used_by"


class SqliteStore(SqliteRegistryCalls):
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
        migrating an older version. StoreError when it cannot: a symlink at `path`, a file that
        is not a database, a schema version this vouchd does not know."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vouchd-store")
        try:
            connection = await asyncio.get_running_loop().run_in_executor(executor, connect, path)
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
            db.execute(REVOKE_NODE, (node_id, reason, now, 1))
            return bump_version(db)

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
            return bump_version(db)

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

    # -- join tokens ----------------------------------------------------------------------------------
    async def add_join_token(self, token: JoinTokenRecord) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute(f"INSERT INTO join_tokens ({_JOIN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
                       (token.token_id, token.secret_sha256, json.dumps(list(token.node_labels)), token.created_at,
                        token.expires_at, token.used_at, token.used_by))

        await self._write(f"add join token {token.token_id}", work)

    async def use_join_token(self, token_id: str, secret_sha256: str, node_id: str, *,
                             now: float) -> JoinTokenRecord | None:
        def work(db: sqlite3.Connection) -> JoinTokenRecord | None:
            # One statement decides, as for nonces. Comparing hashes in SQL: timing tells nothing of the secret.
            row = db.execute(f"UPDATE join_tokens SET used_at=?, used_by=? WHERE token_id=? AND secret_sha256=? "  # noqa: S608
                             f"AND used_at IS NULL AND expires_at >= ? RETURNING {_JOIN_COLUMNS}",
                             (now, node_id, token_id, secret_sha256, now)).fetchone()
            return None if row is None else _token_from_row(row)

        return await self._write(f"use join token {token_id}", work)

    async def join_tokens(self) -> list[JoinTokenRecord]:
        def work(db: sqlite3.Connection) -> list[JoinTokenRecord]:
            rows = db.execute(f"SELECT {_JOIN_COLUMNS} FROM join_tokens ORDER BY token_id").fetchall()  # noqa: S608
            return [_token_from_row(row) for row in rows]

        return await self._read("list join tokens", work)

    # -- node keys ------------------------------------------------------------------------------------
    async def enrol_node_key(self, node_id: str, spki_der: bytes, source: str, *, now: float) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO node_keys VALUES (?, ?, ?, ?)", (node_id, spki_der, source, now))

        await self._write(f"enrol the key of node {node_id}", work)

    async def node_key(self, node_id: str) -> bytes | None:
        def work(db: sqlite3.Connection) -> bytes | None:
            row = db.execute("SELECT spki_der FROM node_keys WHERE node_id=?", (node_id,)).fetchone()
            return None if row is None else bytes(row[0])

        return await self._read(f"read the key of node {node_id}", work)

    async def remove_node_key(self, node_id: str) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            return db.execute("DELETE FROM node_keys WHERE node_id=? RETURNING 1", (node_id,)).fetchone() is not None

        return await self._write(f"remove the key of node {node_id}", work)


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


def _token_from_row(row: Any) -> JoinTokenRecord:
    token_id, secret_sha256, node_labels, created_at, expires_at, used_at, used_by = row
    return JoinTokenRecord(token_id=token_id, secret_sha256=secret_sha256, node_labels=tuple(json.loads(node_labels)),
                           created_at=created_at, expires_at=expires_at, used_at=used_at, used_by=used_by)
