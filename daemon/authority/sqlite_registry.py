"""The SQLite store's calls on boot profiles, attestation sessions, registration entries and
revocations (mixed into vouchd.authority.sqlite.SqliteStore, which runs them)."""

from __future__ import annotations

import json
import sqlite3
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

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

__all__ = ["REVOKE_NODE", "SqliteRegistryCalls", "bump_version"]

_T = TypeVar("_T")

# One row per node: revocations of one node merge into the one that voids most (the latest
# `before`), and a later non-ban revocation never lifts a ban or replaces its reason.
REVOKE_NODE = """
    INSERT INTO node_revocations (node_id, reason, revokes_before, banned) VALUES (?, ?, ?, ?)
    ON CONFLICT (node_id) DO UPDATE SET
        reason = CASE WHEN node_revocations.banned AND NOT excluded.banned
                      THEN node_revocations.reason ELSE excluded.reason END,
        revokes_before = max(node_revocations.revokes_before, excluded.revokes_before),
        banned = max(node_revocations.banned, excluded.banned)
"""

SESSION_COLUMNS = ("session, node_id, ek_hash, ek_issuer_cn, ak_public, node_key_public, pcr_bank, pcr_indices, "
                   "event_log, secret, server_nonce, expires_at")


class SqliteRegistryCalls(ABC):
    """Profiles, sessions, entries and revocations; `_read` and `_write` (SqliteStore's) run each
    call as one transaction on the store's worker thread."""

    _path: Path

    @abstractmethod
    async def _read(self, what: str, work: Callable[[sqlite3.Connection], _T]) -> _T: ...

    @abstractmethod
    async def _write(self, what: str, work: Callable[[sqlite3.Connection], _T]) -> _T: ...

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
                db.execute(REVOKE_NODE, (node_id, f"boot profile {name} removed", now, 0))
            return bump_version(db), affected

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
                f"INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",  # noqa: S608
                (record.session, record.node_id, record.ek_hash, record.ek_issuer_cn, record.ak_public,
                 record.node_key_public, record.pcr_bank, json.dumps(list(record.pcr_indices)), record.event_log,
                 record.secret, record.server_nonce, record.expires_at),
            )
            return True

        return await self._write(f"store an attestation session of node {record.node_id}", work)

    async def take_session(self, session_id: str, *, now: float) -> SessionRecord | None:
        def work(db: sqlite3.Connection) -> SessionRecord | None:
            row = db.execute(f"DELETE FROM sessions WHERE session=? RETURNING {SESSION_COLUMNS}",  # noqa: S608
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
            return stored, bump_version(db)

        return await self._write(f"update entry {entry.id}", work)

    async def delete_entry(self, entry_id: str, *, now: float) -> tuple[Entry, int]:
        def work(db: sqlite3.Connection) -> tuple[Entry, int]:
            row = db.execute("DELETE FROM entries WHERE id=? RETURNING wire", (entry_id,)).fetchone()
            if row is None:
                raise EntryNotFoundError(entry_id)
            deleted = entry_from_wire(str(self._path), entry_id, row[0])
            db.execute("INSERT OR REPLACE INTO deleted_entries VALUES (?, ?, ?)", (entry_id, deleted.revision, now))
            _revoke_entry(db, entry_id, below_revision=deleted.revision + 1, now=now)
            return deleted, bump_version(db)

        return await self._write(f"delete entry {entry_id}", work)

    async def entry(self, entry_id: str) -> Entry | None:
        def work(db: sqlite3.Connection) -> Entry | None:
            row = db.execute("SELECT wire FROM entries WHERE id=?", (entry_id,)).fetchone()
            return None if row is None else entry_from_wire(str(self._path), entry_id, row[0])

        return await self._read(f"read entry {entry_id}", work)

    async def entries(self) -> list[Entry]:
        def work(db: sqlite3.Connection) -> list[Entry]:
            rows = db.execute("SELECT id, wire FROM entries").fetchall()
            entries = (entry_from_wire(str(self._path), entry_id, wire) for entry_id, wire in rows)
            return sorted(entries, key=lambda e: e.id)

        return await self._read("list entries", work)

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
        return await self._write("bump the revocation version", bump_version)

    async def prune_revocations(self, *, older_than: float) -> int:
        def work(db: sqlite3.Connection) -> int:
            entries = db.execute("DELETE FROM entry_revocations WHERE revoked_at < ?", (older_than,)).rowcount
            nodes = db.execute("DELETE FROM node_revocations WHERE banned=0 AND revokes_before < ?",
                               (older_than,)).rowcount
            return int(entries) + int(nodes)

        return await self._write("prune revocations", work)


# -- helpers run on the worker thread ---------------------------------------------------------------


def _version(db: sqlite3.Connection) -> int:
    (version,) = db.execute("SELECT version FROM revocation_version").fetchone()
    return int(version)


def bump_version(db: sqlite3.Connection) -> int:
    (version,) = db.execute("UPDATE revocation_version SET version = version + 1 RETURNING version").fetchone()
    return int(version)


def _revoke_entry(db: sqlite3.Connection, entry_id: str, *, below_revision: int, now: float) -> None:
    db.execute("INSERT INTO entry_revocations VALUES (?, ?, ?) ON CONFLICT (entry_id) DO UPDATE SET "
               "below_revision=max(below_revision, excluded.below_revision), revoked_at=excluded.revoked_at",
               (entry_id, below_revision, now))


def _entry_row(entry: Entry) -> tuple[object, ...]:
    return (entry.id, entry.revision, str(entry.spiffe_id), None if entry.parent is None else str(entry.parent),
            entry_to_wire(entry), entry.created_at, entry.updated_at)


def _session_from_row(row: Any) -> SessionRecord:
    (session, node_id, ek_hash, ek_issuer_cn, ak_public, node_key_public, pcr_bank, pcr_indices, event_log,
     secret, server_nonce, expires_at) = row
    return SessionRecord(
        session=session, node_id=node_id, ek_hash=ek_hash, ek_issuer_cn=ek_issuer_cn, ak_public=bytes(ak_public),
        node_key_public=bytes(node_key_public), pcr_bank=pcr_bank, pcr_indices=tuple(json.loads(pcr_indices)),
        event_log=None if event_log is None else bytes(event_log), secret=bytes(secret),
        server_nonce=bytes(server_nonce), expires_at=expires_at,
    )
