"""PostgresStore: the authority's Store in a PostgreSQL database that several replicas share.

The contract is vouchd.authority.store's, the same as SqliteStore's. Every call is one transaction
on a connection of a small pool (psycopg 3, async), at READ COMMITTED, where each kind of change
takes the lock that keeps it equal to running alone:
- a nonce, a session and a join token are each taken by one statement (DELETE or UPDATE ...
  RETURNING) whose row lock lets one caller win, however many replicas race;
- every change that revokes, and every change of a registration entry, first locks the one row of
  `revocation_version`, so that those changes run one at a time and each gets its own version;
- storing a session (the limit on sessions in progress) and enrolment (an enrolled EK is never
  pending) take advisory locks;
- `revocations()` reads in one REPEATABLE READ snapshot, so its version and content agree.
A call whose caller is cancelled still runs to its end; only its result is dropped. Errors name
the database as user@host:port/dbname, never with its password.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg.conninfo import conninfo_to_dict
from psycopg_pool import AsyncConnectionPool

from vouchd.authority.postgres_registry import (
    REVOKE_NODE,
    Cursor,
    PostgresRegistryCalls,
    bump_version,
    lock_revocations,
)
from vouchd.authority.postgres_schema import LOCK_CLASS, LOCK_ENROLMENT, SCHEMA_VERSION, migrate
from vouchd.authority.store import Ban, JoinTokenRecord, NodeRecord, NodeState, PendingNode, StoreError

__all__ = ["SCHEMA_VERSION", "PostgresStore", "describe_dsn"]

_T = TypeVar("_T")

DEFAULT_MAX_CONNECTIONS = 8
DEFAULT_TIMEOUT = 10.0  # seconds to connect, or to wait for a free connection
# Set on every connection: no statement (a lock wait included) nor idle transaction holds on forever.
_SESSION_SETTINGS = ("SET statement_timeout = '30s'", "SET idle_in_transaction_session_timeout = '60s'",
                     "SET application_name = 'vouchd-authority'")

_NODE_COLUMNS = ("node_id, ek_hash, tier, state, ak_public, node_key_public, selectors, pcr_bank, pcr_indices, "
                 "pcr_digest, reset_count, restart_count, clock, attested_at, last_quote_at")
_NODE_UPDATE = ", ".join(f"{column} = excluded.{column}" for column in _NODE_COLUMNS.split(", ")[1:])
_JOIN_COLUMNS = "token_id, secret_sha256, node_labels, created_at, expires_at, used_at, used_by"


def describe_dsn(dsn: str) -> tuple[str, str | None]:
    """(how errors name the database, its password or None); StoreError when the DSN does not parse,
    without its text, which may hold the password."""
    try:
        params = conninfo_to_dict(dsn)
    except psycopg.Error:
        raise StoreError("postgresql: the connection string does not parse (it is not shown: it may hold "
                         "a password)") from None
    user, host, port, dbname = (str(params.get(key) or "") for key in ("user", "host", "port", "dbname"))
    where = "postgresql://" + (f"{user}@" if user else "") + host + (f":{port}" if port else "") + f"/{dbname}"
    password = params.get("password")
    return where, None if password is None else str(password)


class PostgresStore(PostgresRegistryCalls):
    """The Store in a PostgreSQL database. Open it with `await PostgresStore.open(dsn)` (which
    creates or migrates the schema); close it with `await store.close()`."""

    def __init__(self, where: str, password: str | None,
                 pool: AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]]) -> None:
        """Internal: use `PostgresStore.open`."""
        self._where = where
        self._password = password
        self._pool = pool
        self._closed = False
        self._calls: set[asyncio.Task[Any]] = set()

    @classmethod
    async def open(cls, dsn: str, *, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                   timeout: float = DEFAULT_TIMEOUT) -> PostgresStore:
        """Connect to the database of `dsn` (a libpq connection string or URI), create its schema or
        migrate it forward, and open a pool of up to `max_connections`. StoreError when it cannot:
        the server cannot be reached or refuses us, a schema version this vouchd does not know."""
        where, password = describe_dsn(dsn)
        options: dict[str, Any] = {"autocommit": True}
        if "connect_timeout" not in conninfo_to_dict(dsn):
            options["connect_timeout"] = max(1, round(timeout))
        try:
            async with await psycopg.AsyncConnection.connect(dsn, **options) as connection:
                await migrate(where, connection)
        except psycopg.Error as err:
            raise StoreError(f"{where}: cannot open the authority database: {_scrub(err, password)}") from None
        pool: AsyncConnectionPool[psycopg.AsyncConnection[tuple[Any, ...]]] = AsyncConnectionPool(
            dsn, kwargs=options, min_size=1, max_size=max_connections, open=False, configure=_configure,
            check=AsyncConnectionPool.check_connection, timeout=timeout, name="vouchd-store")
        try:
            await pool.open(wait=True, timeout=timeout)
        except BaseException as err:
            await pool.close()
            if isinstance(err, psycopg.Error):
                raise StoreError(f"{where}: cannot open the authority database: {_scrub(err, password)}") from None
            raise
        return cls(where, password, pool)

    @property
    def where(self) -> str:
        """The database as errors name it: postgresql://user@host:port/dbname."""
        return self._where

    async def close(self) -> None:
        """Finish the calls already made, then close the pool's connections."""
        if self._closed:
            return
        self._closed = True
        if self._calls:
            await asyncio.wait(set(self._calls))
        await self._pool.close()

    # -- running calls ---------------------------------------------------------------------------------
    async def _run(self, what: str, work: Callable[[Cursor], Awaitable[_T]], *, snapshot: bool = False) -> _T:
        if self._closed:
            raise StoreError(f"{self._where}: cannot {what}: the store is closed")
        call = asyncio.ensure_future(self._transaction(what, work, snapshot=snapshot))
        self._calls.add(call)
        call.add_done_callback(_forget_result)
        call.add_done_callback(self._calls.discard)
        # Shielded: a cancelled caller leaves the transaction to end as it would have, not halfway.
        return await asyncio.shield(call)

    async def _transaction(self, what: str, work: Callable[[Cursor], Awaitable[_T]], *, snapshot: bool) -> _T:
        try:
            async with (self._pool.connection() as connection, connection.transaction(),
                        connection.cursor() as cursor):
                if snapshot:
                    await cursor.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                return await work(cursor)
        except psycopg.Error as err:
            raise StoreError(f"{self._where}: cannot {what}: {_scrub(err, self._password)}") from None

    # -- enrolment ------------------------------------------------------------------------------------
    async def enrol_ek(self, ek_hash: str, source: str, *, now: float) -> None:
        async def work(cur: Cursor) -> None:
            await _lock(cur, LOCK_ENROLMENT)
            await cur.execute("INSERT INTO enrolled_eks VALUES (%s, %s, %s) ON CONFLICT DO NOTHING",
                              (ek_hash, source, now))
            await cur.execute("DELETE FROM pending_eks WHERE ek_hash = %s", (ek_hash,))

        await self._run("enrol an ek", work)

    async def is_enrolled(self, ek_hash: str) -> bool:
        async def work(cur: Cursor) -> bool:
            await cur.execute("SELECT 1 FROM enrolled_eks WHERE ek_hash = %s", (ek_hash,))
            return await cur.fetchone() is not None

        return await self._run("read enrolment", work)

    async def add_pending(self, ek_hash: str, node_id: str, *, now: float) -> None:
        async def work(cur: Cursor) -> None:
            await _lock(cur, LOCK_ENROLMENT)
            await cur.execute(
                "INSERT INTO pending_eks SELECT %s, %s, %s, %s WHERE NOT EXISTS "
                "(SELECT 1 FROM enrolled_eks WHERE ek_hash = %s) "
                "ON CONFLICT (ek_hash) DO UPDATE SET last_seen = excluded.last_seen",
                (ek_hash, node_id, now, now, ek_hash))

        await self._run("add a pending ek", work)

    async def pending(self) -> list[PendingNode]:
        async def work(cur: Cursor) -> list[PendingNode]:
            await cur.execute("SELECT ek_hash, node_id, first_seen, last_seen FROM pending_eks "
                              "ORDER BY first_seen, ek_hash")
            return [PendingNode(*row) for row in await cur.fetchall()]

        return await self._run("list pending eks", work)

    async def approve(self, node_id_or_ek_hash: str, *, now: float) -> PendingNode | None:
        async def work(cur: Cursor) -> PendingNode | None:
            await _lock(cur, LOCK_ENROLMENT)
            await cur.execute("DELETE FROM pending_eks WHERE ek_hash = %s OR node_id = %s "
                              "RETURNING ek_hash, node_id, first_seen, last_seen",
                              (node_id_or_ek_hash, node_id_or_ek_hash))
            row = await cur.fetchone()
            if row is None:
                return None
            approved = PendingNode(*row)
            await cur.execute("INSERT INTO enrolled_eks VALUES (%s, 'approved', %s) ON CONFLICT DO NOTHING",
                              (approved.ek_hash, now))
            return approved

        return await self._run(f"approve {node_id_or_ek_hash}", work)

    # -- nodes ----------------------------------------------------------------------------------------
    async def save_node(self, node: NodeRecord) -> None:
        async def work(cur: Cursor) -> None:
            await cur.execute("DELETE FROM nodes WHERE ek_hash = %s AND node_id <> %s", (node.ek_hash, node.node_id))
            await cur.execute(
                f"INSERT INTO nodes ({_NODE_COLUMNS}) VALUES ({', '.join(['%s'] * 15)}) "  # noqa: S608
                f"ON CONFLICT (node_id) DO UPDATE SET {_NODE_UPDATE}",
                (node.node_id, node.ek_hash, node.tier, node.state.value, node.ak_public, node.node_key_public,
                 list(node.selectors), node.pcr_bank, list(node.pcr_indices), node.pcr_digest, node.reset_count,
                 node.restart_count, node.clock, node.attested_at, node.last_quote_at))

        await self._run(f"save node {node.node_id}", work)

    async def node(self, node_id: str) -> NodeRecord | None:
        async def work(cur: Cursor) -> NodeRecord | None:
            await cur.execute(f"SELECT {_NODE_COLUMNS} FROM nodes WHERE node_id = %s", (node_id,))  # noqa: S608
            row = await cur.fetchone()
            return None if row is None else _node_from_row(row)

        return await self._run(f"read node {node_id}", work)

    async def nodes(self) -> list[NodeRecord]:
        async def work(cur: Cursor) -> list[NodeRecord]:
            await cur.execute(f"SELECT {_NODE_COLUMNS} FROM nodes ORDER BY node_id")  # noqa: S608
            return [_node_from_row(row) for row in await cur.fetchall()]

        return await self._run("list nodes", work)

    async def record_quote(self, node_id: str, *, reset_count: int, restart_count: int, clock: int,
                           now: float) -> None:
        async def work(cur: Cursor) -> None:
            await cur.execute("UPDATE nodes SET reset_count = %s, restart_count = %s, clock = %s, last_quote_at = %s "
                              "WHERE node_id = %s", (reset_count, restart_count, clock, now, node_id))

        await self._run(f"record a quote of node {node_id}", work)

    async def set_node_state(self, node_id: str, state: NodeState) -> None:
        async def work(cur: Cursor) -> None:
            await cur.execute("UPDATE nodes SET state = %s WHERE node_id = %s", (state.value, node_id))

        await self._run(f"set the state of node {node_id}", work)

    # -- bans -----------------------------------------------------------------------------------------
    async def ban_node(self, node_id: str, reason: str, *, now: float) -> int:
        async def work(cur: Cursor) -> int:
            await lock_revocations(cur)
            await cur.execute("INSERT INTO banned_nodes VALUES (%s, %s, %s) ON CONFLICT (node_id) DO UPDATE SET "
                              "reason = excluded.reason", (node_id, reason, now))
            await cur.execute("UPDATE nodes SET state = %s WHERE node_id = %s", (NodeState.BANNED.value, node_id))
            await cur.execute(REVOKE_NODE, (node_id, reason, now, True))
            return await bump_version(cur)

        return await self._run(f"ban node {node_id}", work)

    async def unban_node(self, node_id: str, *, now: float) -> int | None:
        async def work(cur: Cursor) -> int | None:
            await lock_revocations(cur)
            await cur.execute("DELETE FROM banned_nodes WHERE node_id = %s RETURNING reason, banned_at", (node_id,))
            ban = await cur.fetchone()
            if ban is None:
                return None
            reason, banned_at = ban
            await cur.execute("INSERT INTO node_revocations VALUES (%s, %s, %s, false) ON CONFLICT (node_id) "
                              "DO UPDATE SET banned = false", (node_id, reason, banned_at))
            await cur.execute("UPDATE nodes SET state = %s WHERE node_id = %s", (NodeState.ATTESTING.value, node_id))
            return await bump_version(cur)

        return await self._run(f"unban node {node_id}", work)

    async def is_banned(self, node_id: str) -> bool:
        async def work(cur: Cursor) -> bool:
            await cur.execute("SELECT 1 FROM banned_nodes WHERE node_id = %s", (node_id,))
            return await cur.fetchone() is not None

        return await self._run("read bans", work)

    async def bans(self) -> list[Ban]:
        async def work(cur: Cursor) -> list[Ban]:
            await cur.execute("SELECT node_id, reason, banned_at FROM banned_nodes ORDER BY node_id")
            return [Ban(*row) for row in await cur.fetchall()]

        return await self._run("list bans", work)

    # -- nonces ---------------------------------------------------------------------------------------
    async def add_nonce(self, node_id: str, nonce: bytes, expires_at: float, *, now: float) -> None:
        async def work(cur: Cursor) -> None:
            await cur.execute("DELETE FROM nonces WHERE expires_at < %s", (now,))
            await cur.execute("INSERT INTO nonces VALUES (%s, %s, %s)", (nonce, node_id, expires_at))

        await self._run(f"add a nonce for node {node_id}", work)

    async def consume_nonce(self, node_id: str, nonce: bytes, *, now: float) -> bool:
        async def work(cur: Cursor) -> bool:
            # One statement decides: of racing deletes (on any replica), the row lock lets one through.
            await cur.execute("DELETE FROM nonces WHERE nonce = %s AND node_id = %s AND expires_at >= %s RETURNING 1",
                              (nonce, node_id, now))
            return len(await cur.fetchall()) == 1

        return await self._run(f"consume a nonce of node {node_id}", work)

    # -- answered requests ----------------------------------------------------------------------------
    async def answered_reply(self, node_id: str, digest: str) -> bytes | None:
        async def work(cur: Cursor) -> bytes | None:
            await cur.execute("SELECT reply FROM answered WHERE node_id = %s AND digest = %s", (node_id, digest))
            row = await cur.fetchone()
            return None if row is None else bytes(row[0])

        return await self._run("read an answered reply", work)

    async def remember_reply(self, node_id: str, digest: str, reply: bytes, *, now: float,
                             keep_seconds: float) -> None:
        async def work(cur: Cursor) -> None:
            await cur.execute("DELETE FROM answered WHERE answered_at < %s", (now - keep_seconds,))
            await cur.execute("INSERT INTO answered VALUES (%s, %s, %s, %s) ON CONFLICT (node_id, digest) "
                              "DO UPDATE SET reply = excluded.reply, answered_at = excluded.answered_at",
                              (node_id, digest, reply, now))

        await self._run(f"remember a reply to node {node_id}", work)

    # -- join tokens ----------------------------------------------------------------------------------
    async def add_join_token(self, token: JoinTokenRecord) -> None:
        async def work(cur: Cursor) -> None:
            await cur.execute(f"INSERT INTO join_tokens ({_JOIN_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",  # noqa: S608
                              (token.token_id, token.secret_sha256, list(token.node_labels), token.created_at,
                               token.expires_at, token.used_at, token.used_by))

        await self._run(f"add join token {token.token_id}", work)

    async def use_join_token(self, token_id: str, secret_sha256: str, node_id: str, *,
                             now: float) -> JoinTokenRecord | None:
        async def work(cur: Cursor) -> JoinTokenRecord | None:
            # One statement decides, as for nonces: a racing update re-checks `used_at IS NULL` once it
            # has the row, and finds it used. Comparing hashes in SQL: timing tells nothing of the secret.
            await cur.execute(f"UPDATE join_tokens SET used_at = %s, used_by = %s WHERE token_id = %s "  # noqa: S608
                              f"AND secret_sha256 = %s AND used_at IS NULL AND expires_at >= %s "
                              f"RETURNING {_JOIN_COLUMNS}", (now, node_id, token_id, secret_sha256, now))
            row = await cur.fetchone()
            return None if row is None else _token_from_row(row)

        return await self._run(f"use join token {token_id}", work)

    async def join_tokens(self) -> list[JoinTokenRecord]:
        async def work(cur: Cursor) -> list[JoinTokenRecord]:
            await cur.execute(f"SELECT {_JOIN_COLUMNS} FROM join_tokens ORDER BY token_id")  # noqa: S608
            return [_token_from_row(row) for row in await cur.fetchall()]

        return await self._run("list join tokens", work)

    # -- node keys ------------------------------------------------------------------------------------
    async def enrol_node_key(self, node_id: str, spki_der: bytes, source: str, *, now: float) -> None:
        async def work(cur: Cursor) -> None:
            await cur.execute("INSERT INTO node_keys VALUES (%s, %s, %s, %s) ON CONFLICT (node_id) DO UPDATE SET "
                              "spki_der = excluded.spki_der, source = excluded.source, "
                              "enrolled_at = excluded.enrolled_at", (node_id, spki_der, source, now))

        await self._run(f"enrol the key of node {node_id}", work)

    async def node_key(self, node_id: str) -> bytes | None:
        async def work(cur: Cursor) -> bytes | None:
            await cur.execute("SELECT spki_der FROM node_keys WHERE node_id = %s", (node_id,))
            row = await cur.fetchone()
            return None if row is None else bytes(row[0])

        return await self._run(f"read the key of node {node_id}", work)

    async def remove_node_key(self, node_id: str) -> bool:
        async def work(cur: Cursor) -> bool:
            await cur.execute("DELETE FROM node_keys WHERE node_id = %s RETURNING 1", (node_id,))
            return await cur.fetchone() is not None

        return await self._run(f"remove the key of node {node_id}", work)


async def _configure(connection: psycopg.AsyncConnection[Any]) -> None:
    for setting in _SESSION_SETTINGS:
        await connection.execute(setting)


async def _lock(cur: Cursor, key: int) -> None:
    await cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, key))


def _forget_result(call: asyncio.Task[Any]) -> None:
    """Retrieve the outcome of a call whose caller was cancelled, so that asyncio does not log it."""
    if not call.cancelled():
        call.exception()


def _scrub(err: psycopg.Error, password: str | None) -> str:
    """The error's first message on one line, the password masked should libpq ever echo it."""
    message = " ".join((err.diag.message_primary or str(err) or type(err).__name__).split())
    return message.replace(password, "***") if password else message


def _node_from_row(row: tuple[Any, ...]) -> NodeRecord:
    (node_id, ek_hash, tier, state, ak_public, node_key_public, selectors, pcr_bank, pcr_indices,
     pcr_digest, reset_count, restart_count, clock, attested_at, last_quote_at) = row
    return NodeRecord(
        node_id=node_id, ek_hash=ek_hash, tier=tier, state=NodeState(state), ak_public=bytes(ak_public),
        node_key_public=bytes(node_key_public), selectors=tuple(selectors), pcr_bank=pcr_bank,
        pcr_indices=tuple(pcr_indices), pcr_digest=bytes(pcr_digest), reset_count=reset_count,
        restart_count=restart_count, clock=clock, attested_at=attested_at, last_quote_at=last_quote_at,
    )


def _token_from_row(row: tuple[Any, ...]) -> JoinTokenRecord:
    token_id, secret_sha256, node_labels, created_at, expires_at, used_at, used_by = row
    return JoinTokenRecord(token_id=token_id, secret_sha256=secret_sha256, node_labels=tuple(node_labels),
                           created_at=created_at, expires_at=expires_at, used_at=used_at, used_by=used_by)
