"""The PostgreSQL store's calls on boot profiles, attestation sessions, registration entries and
revocations (mixed into vouchd.authority.postgres.PostgresStore, which runs them; its docstring
says which locks keep each call equal to running alone)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import replace
from typing import Any, TypeAlias, TypeVar

import psycopg

from vouchd.authority.postgres_schema import LOCK_CLASS, LOCK_SESSIONS
from vouchd.authority.store import (
    EntryConflictError,
    EntryExistsError,
    EntryNotFoundError,
    NodeState,
    ProfileRecord,
    Revocations,
    RevokedEntry,
    RevokedNode,
    SessionRecord,
)
from vouchd.authority.storesql import entry_from_wire, entry_to_wire
from vouchd.entries import Entry

__all__ = ["REVOKE_NODE", "Cursor", "PostgresRegistryCalls", "bump_version", "lock_revocations"]

_T = TypeVar("_T")
Cursor: TypeAlias = psycopg.AsyncCursor[tuple[Any, ...]]

# One row per node: revocations of one node merge into the one that voids most (the latest
# `before`), and a later non-ban revocation never lifts a ban or replaces its reason.
REVOKE_NODE = """
    INSERT INTO node_revocations (node_id, reason, revokes_before, banned) VALUES (%s, %s, %s, %s)
    ON CONFLICT (node_id) DO UPDATE SET
        reason = CASE WHEN node_revocations.banned AND NOT excluded.banned
                      THEN node_revocations.reason ELSE excluded.reason END,
        revokes_before = greatest(node_revocations.revokes_before, excluded.revokes_before),
        banned = node_revocations.banned OR excluded.banned
"""

_SESSION_COLUMNS = ("session, node_id, ek_hash, ek_issuer_cn, ak_public, node_key_public, pcr_bank, pcr_indices, "
                    "event_log, secret, server_nonce, expires_at")
_ENTRY_COLUMNS = "id, revision, spiffe_id, parent, wire, created_at, updated_at"


class PostgresRegistryCalls(ABC):
    """Profiles, sessions, entries and revocations; `_run` (PostgresStore's) runs each call as one
    transaction."""

    _where: str

    @abstractmethod
    async def _run(self, what: str, work: Callable[[Cursor], Awaitable[_T]], *, snapshot: bool = False) -> _T: ...

    # -- boot profiles --------------------------------------------------------------------------------
    async def save_profile(self, name: str, digests: Iterable[str], learned_from: str, *, now: float) -> None:
        measurements = sorted(set(digests))

        async def work(cur: Cursor) -> None:
            await cur.execute("INSERT INTO event_log_profiles VALUES (%s, %s, %s, %s) ON CONFLICT (name) DO UPDATE "
                              "SET digests = excluded.digests, learned_from = excluded.learned_from, "
                              "created_at = excluded.created_at", (name, measurements, learned_from, now))

        await self._run(f"save profile {name}", work)

    async def profiles(self) -> dict[str, frozenset[str]]:
        async def work(cur: Cursor) -> dict[str, frozenset[str]]:
            await cur.execute("SELECT name, digests FROM event_log_profiles ORDER BY name")
            return {name: frozenset(digests) for name, digests in await cur.fetchall()}

        return await self._run("read profiles", work)

    async def profile_records(self) -> list[ProfileRecord]:
        async def work(cur: Cursor) -> list[ProfileRecord]:
            await cur.execute("SELECT name, cardinality(digests), learned_from, created_at FROM event_log_profiles "
                              "ORDER BY name")
            return [ProfileRecord(*row) for row in await cur.fetchall()]

        return await self._run("list profiles", work)

    async def remove_profile(self, name: str, *, now: float) -> tuple[int, list[str]] | None:
        selector = f"tpm:pcr_profile:{name}"

        async def work(cur: Cursor) -> tuple[int, list[str]] | None:
            version = await lock_revocations(cur)
            await cur.execute("DELETE FROM event_log_profiles WHERE name = %s RETURNING 1", (name,))
            if await cur.fetchone() is None:
                return None
            await cur.execute("SELECT node_id FROM nodes WHERE %s = ANY(selectors) ORDER BY node_id", (selector,))
            affected = [node_id for (node_id,) in await cur.fetchall()]
            if not affected:
                return version, []
            await cur.execute("UPDATE nodes SET state = %s WHERE node_id = ANY(%s) AND state NOT IN (%s, %s)",
                              (NodeState.ATTESTING.value, affected, NodeState.BANNED.value, NodeState.FAILED.value))
            await cur.executemany(REVOKE_NODE, [(node_id, f"boot profile {name} removed", now, False)
                                                for node_id in affected])
            return await bump_version(cur), affected

        return await self._run(f"remove profile {name}", work)

    # -- attestation sessions -------------------------------------------------------------------------
    async def put_session(self, record: SessionRecord, *, max_sessions: int, now: float) -> bool:
        async def work(cur: Cursor) -> bool:
            # One at a time (across replicas): the count and the insert below must see each other's.
            await cur.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_CLASS, LOCK_SESSIONS))
            await cur.execute("DELETE FROM sessions WHERE expires_at < %s", (now,))
            await cur.execute("DELETE FROM sessions WHERE ek_hash = %s RETURNING 1", (record.ek_hash,))
            if await cur.fetchone() is None:
                await cur.execute("SELECT count(*) FROM sessions")
                counted = await cur.fetchone()
                if counted is not None and counted[0] >= max_sessions:
                    return False
            await cur.execute(
                f"INSERT INTO sessions ({_SESSION_COLUMNS}) VALUES ({', '.join(['%s'] * 12)})",  # noqa: S608
                (record.session, record.node_id, record.ek_hash, record.ek_issuer_cn, record.ak_public,
                 record.node_key_public, record.pcr_bank, list(record.pcr_indices), record.event_log,
                 record.secret, record.server_nonce, record.expires_at))
            return True

        return await self._run(f"store an attestation session of node {record.node_id}", work)

    async def take_session(self, session_id: str, *, now: float) -> SessionRecord | None:
        async def work(cur: Cursor) -> SessionRecord | None:
            await cur.execute(f"DELETE FROM sessions WHERE session = %s RETURNING {_SESSION_COLUMNS}",  # noqa: S608
                              (session_id,))
            row = await cur.fetchone()
            if row is None:
                return None
            record = _session_from_row(row)
            return record if now <= record.expires_at else None

        return await self._run("take an attestation session", work)

    # -- registration entries -------------------------------------------------------------------------
    async def create_entry(self, entry: Entry, *, now: float) -> Entry:
        async def work(cur: Cursor) -> Entry:
            # Locked, so that the revision read from deleted_entries is the last one (a delete of this
            # id that commits meanwhile would otherwise go unseen).
            await lock_revocations(cur)
            await cur.execute("SELECT 1 FROM entries WHERE id = %s", (entry.id,))
            if await cur.fetchone() is not None:
                raise EntryExistsError(entry.id)
            await cur.execute("SELECT last_revision FROM deleted_entries WHERE id = %s", (entry.id,))
            deleted = await cur.fetchone()
            stored = replace(entry, revision=1 if deleted is None else deleted[0] + 1,
                             created_at=int(now), updated_at=int(now))
            await cur.execute(f"INSERT INTO entries ({_ENTRY_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s)",  # noqa: S608
                              _entry_row(stored))
            return stored

        return await self._run(f"create entry {entry.id}", work)

    async def update_entry(self, entry: Entry, *, expected_revision: int, now: float) -> tuple[Entry, int]:
        async def work(cur: Cursor) -> tuple[Entry, int]:
            await lock_revocations(cur)
            await cur.execute("SELECT revision, created_at FROM entries WHERE id = %s", (entry.id,))
            row = await cur.fetchone()
            if row is None:
                raise EntryNotFoundError(entry.id)
            revision, created_at = row
            if revision != expected_revision:
                raise EntryConflictError(entry.id, stored_revision=revision, expected_revision=expected_revision)
            stored = replace(entry, revision=revision + 1, created_at=created_at, updated_at=int(now))
            await cur.execute("UPDATE entries SET revision = %s, spiffe_id = %s, parent = %s, wire = %s, "
                              "created_at = %s, updated_at = %s WHERE id = %s", (*_entry_row(stored)[1:], entry.id))
            await _revoke_entry(cur, entry.id, below_revision=stored.revision, now=now)
            return stored, await bump_version(cur)

        return await self._run(f"update entry {entry.id}", work)

    async def delete_entry(self, entry_id: str, *, now: float) -> tuple[Entry, int]:
        async def work(cur: Cursor) -> tuple[Entry, int]:
            await lock_revocations(cur)
            await cur.execute("DELETE FROM entries WHERE id = %s RETURNING wire", (entry_id,))
            row = await cur.fetchone()
            if row is None:
                raise EntryNotFoundError(entry_id)
            deleted = entry_from_wire(self._where, entry_id, row[0])
            await cur.execute("INSERT INTO deleted_entries VALUES (%s, %s, %s) ON CONFLICT (id) DO UPDATE SET "
                              "last_revision = excluded.last_revision, deleted_at = excluded.deleted_at",
                              (entry_id, deleted.revision, now))
            await _revoke_entry(cur, entry_id, below_revision=deleted.revision + 1, now=now)
            return deleted, await bump_version(cur)

        return await self._run(f"delete entry {entry_id}", work)

    async def entry(self, entry_id: str) -> Entry | None:
        async def work(cur: Cursor) -> Entry | None:
            await cur.execute("SELECT wire FROM entries WHERE id = %s", (entry_id,))
            row = await cur.fetchone()
            return None if row is None else entry_from_wire(self._where, entry_id, row[0])

        return await self._run(f"read entry {entry_id}", work)

    async def entries(self) -> list[Entry]:
        async def work(cur: Cursor) -> list[Entry]:
            await cur.execute("SELECT id, wire FROM entries ORDER BY id")
            return [entry_from_wire(self._where, entry_id, wire) for entry_id, wire in await cur.fetchall()]

        return await self._run("list entries", work)

    # -- revocations ----------------------------------------------------------------------------------
    async def revocations(self) -> Revocations:
        async def work(cur: Cursor) -> Revocations:
            await cur.execute("SELECT version FROM revocation_version")
            version = await cur.fetchone()
            await cur.execute("SELECT entry_id, below_revision, revoked_at FROM entry_revocations ORDER BY entry_id")
            entries = await cur.fetchall()
            await cur.execute("SELECT node_id, reason, revokes_before, banned FROM node_revocations ORDER BY node_id")
            nodes = await cur.fetchall()
            return Revocations(version=0 if version is None else int(version[0]),
                               entries=tuple(RevokedEntry(*row) for row in entries),
                               nodes=tuple(RevokedNode(*row) for row in nodes))

        return await self._run("read revocations", work, snapshot=True)

    async def bump_revocation_version(self) -> int:
        return await self._run("bump the revocation version", bump_version)

    async def prune_revocations(self, *, older_than: float) -> int:
        async def work(cur: Cursor) -> int:
            await lock_revocations(cur)
            await cur.execute("DELETE FROM entry_revocations WHERE revoked_at < %s", (older_than,))
            entries = cur.rowcount
            await cur.execute("DELETE FROM node_revocations WHERE NOT banned AND revokes_before < %s", (older_than,))
            return entries + cur.rowcount

        return await self._run("prune revocations", work)


async def lock_revocations(cur: Cursor) -> int:
    """Wait for, and hold until the transaction ends, the revocation version's row; returns the version."""
    await cur.execute("SELECT version FROM revocation_version FOR UPDATE")
    row = await cur.fetchone()
    return 0 if row is None else int(row[0])


async def bump_version(cur: Cursor) -> int:
    await cur.execute("UPDATE revocation_version SET version = version + 1 RETURNING version")
    row = await cur.fetchone()
    if row is None:
        raise psycopg.DataError("the revocation version row is missing")
    return int(row[0])


async def _revoke_entry(cur: Cursor, entry_id: str, *, below_revision: int, now: float) -> None:
    await cur.execute("INSERT INTO entry_revocations VALUES (%s, %s, %s) ON CONFLICT (entry_id) DO UPDATE SET "
                      "below_revision = greatest(entry_revocations.below_revision, excluded.below_revision), "
                      "revoked_at = excluded.revoked_at", (entry_id, below_revision, now))


def _entry_row(entry: Entry) -> tuple[object, ...]:
    return (entry.id, entry.revision, str(entry.spiffe_id), None if entry.parent is None else str(entry.parent),
            entry_to_wire(entry), entry.created_at, entry.updated_at)


def _session_from_row(row: tuple[Any, ...]) -> SessionRecord:
    (session, node_id, ek_hash, ek_issuer_cn, ak_public, node_key_public, pcr_bank, pcr_indices, event_log,
     secret, server_nonce, expires_at) = row
    return SessionRecord(
        session=session, node_id=node_id, ek_hash=ek_hash, ek_issuer_cn=ek_issuer_cn, ak_public=bytes(ak_public),
        node_key_public=bytes(node_key_public), pcr_bank=pcr_bank, pcr_indices=tuple(pcr_indices),
        event_log=None if event_log is None else bytes(event_log), secret=bytes(secret),
        server_nonce=bytes(server_nonce), expires_at=expires_at,
    )
