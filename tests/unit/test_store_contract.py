"""The authority's store: the contract every Store implementation keeps, then facts of SQLite alone.

The contract tests talk to the store only through vouchd.authority.store.Store and run against
every backend of BACKENDS: SQLite, and PostgreSQL on the session's throw-away cluster (a new
database per test; skipped, saying why, where PostgreSQL is not installed, except under
scripts/test). Facts of PostgreSQL alone are in test_store_postgres.py. Time is whatever each
test says it is (`now=`); nothing here depends on the machine's clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import pytest

from vouchd.authority.errors import AuthorityError
from vouchd.authority.postgres import PostgresStore
from vouchd.authority.sqlite import SqliteStore
from vouchd.authority.store import (
    Ban,
    EntryConflictError,
    EntryExistsError,
    EntryNotFoundError,
    JoinTokenRecord,
    NodeRecord,
    NodeState,
    PendingNode,
    ProfileRecord,
    Revocations,
    RevokedEntry,
    RevokedNode,
    SessionRecord,
    Store,
    StoreError,
)
from vouchd.entries import Entry
from vouchd.selectors import selector_set
from vouchd.spiffe import SpiffeId

# Every await is bounded: a store call that hangs fails its test (setup and teardown included)
# instead of hanging the run.
DEADLINE = 10.0
pytestmark = pytest.mark.timeout(DEADLINE)

NOW = 1_800_000_000.0
EK = "ab" * 32
OTHER_EK = "cd" * 32
THIRD_EK = "ef" * 32
NODE = "spiffe://example.org/vouchd/node/tpm/" + EK
OTHER_NODE = "spiffe://example.org/vouchd/node/tpm/" + OTHER_EK
THIRD_NODE = "spiffe://example.org/vouchd/node/tpm/" + THIRD_EK
NONCE = bytes(range(32))


# --- backends -------------------------------------------------------------------------------------


class Backend(Protocol):
    """Opens stores on one database: each open() is another store (another replica) sharing it."""

    async def open(self) -> Store: ...


class SqliteBackend:
    def __init__(self, path: Path) -> None:
        self.path = path

    async def open(self) -> Store:
        return await SqliteStore.open(self.path)


class PostgresBackend:
    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    async def open(self) -> Store:
        return await PostgresStore.open(self.dsn)


def _postgres_backend(request: pytest.FixtureRequest, _tmp_path: Path) -> Backend:
    return PostgresBackend(request.getfixturevalue("postgres_server").database())


BACKENDS: dict[str, Callable[[pytest.FixtureRequest, Path], Backend]] = {
    "sqlite": lambda _request, tmp_path: SqliteBackend(tmp_path / "authority" / "authority.db"),
    "postgres": _postgres_backend,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    return BACKENDS[request.param](request, tmp_path)


@pytest.fixture
async def store(backend: Backend) -> AsyncIterator[Store]:
    opened = await backend.open()
    try:
        yield opened
    finally:
        await opened.close()


# --- records --------------------------------------------------------------------------------------


def node_record(node_id: str = NODE, ek_hash: str = EK, *, profile: str = "golden", **changes: object) -> NodeRecord:
    record = NodeRecord(
        node_id=node_id, ek_hash=ek_hash, tier="hardware", state=NodeState.TRUSTED,
        ak_public=b"\x00\x58ak-public", node_key_public=b"\x00\x58node-key", selectors=(
            "node:tier:hardware", f"tpm:ek_hash:{ek_hash}", f"tpm:pcr_profile:{profile}"),
        pcr_bank="sha256", pcr_indices=(0, 1, 2, 3, 4, 5, 6, 7), pcr_digest=b"\x11" * 32,
        reset_count=3, restart_count=0, clock=123_456, attested_at=NOW - 100.5, last_quote_at=NOW - 100.5,
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def entry(entry_id: str = "web", *, uid: int = 1000, **changes: object) -> Entry:
    made = Entry(
        id=entry_id,
        spiffe_id=SpiffeId.parse(f"spiffe://example.org/workload/{entry_id}"),
        selectors=selector_set([f"unix:uid:{uid}"]),
        parent=SpiffeId.parse(NODE),
        x509_ttl=timedelta(minutes=5),
        dns_names=("web.example.org",),
        hint="frontend",
        labels=Entry.label_pairs({"team": "web"}),
    )
    return dataclasses.replace(made, **changes)  # type: ignore[arg-type]


def session(session_id: str = "s-1", ek_hash: str = EK, *, expires_at: float = NOW + 60,
            event_log: bytes | None = b"\x00event log", **changes: object) -> SessionRecord:
    record = SessionRecord(
        session=session_id, node_id="spiffe://example.org/vouchd/node/tpm/" + ek_hash, ek_hash=ek_hash,
        ek_issuer_cn="Example TPM CA", ak_public=b"\x00\x58ak", node_key_public=b"\x00\x58nk",
        pcr_bank="sha256", pcr_indices=(0, 7), event_log=event_log, secret=b"\x01" * 32,
        server_nonce=b"\x02" * 32, expires_at=expires_at,
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


def nonce(number: int) -> bytes:
    return number.to_bytes(32, "big")


# --- lifetime -------------------------------------------------------------------------------------


async def test_reopening_keeps_the_state(backend: Backend) -> None:
    first = await backend.open()
    try:
        await first.save_node(node_record())
        await first.enrol_ek(EK, "config", now=NOW)
        await first.add_pending(OTHER_EK, OTHER_NODE, now=NOW)
        await first.remember_reply(NODE, "d" * 64, b"reply", now=NOW, keep_seconds=600)
        await first.save_profile("golden", ["aa"], "test", now=NOW)
        created = await first.create_entry(entry(), now=NOW)
        version = await first.ban_node(THIRD_NODE, "stolen", now=NOW)
        await first.add_nonce(NODE, NONCE, NOW + 30, now=NOW)
        assert await first.put_session(session(), max_sessions=10, now=NOW)
        await first.add_join_token(join_token())
        await first.enrol_node_key(KEY_NODE, SPKI, "join token t-1", now=NOW)
    finally:
        await first.close()

    second = await backend.open()
    try:
        assert await second.node(NODE) == node_record()
        assert await second.is_enrolled(EK)
        assert [p.ek_hash for p in await second.pending()] == [OTHER_EK]
        assert await second.answered_reply(NODE, "d" * 64) == b"reply"
        assert await second.profiles() == {"golden": frozenset({"aa"})}
        assert await second.entry("web") == created
        assert await second.is_banned(THIRD_NODE)
        assert (await second.revocations()).version == version
        assert await second.consume_nonce(NODE, NONCE, now=NOW)
        assert await second.take_session("s-1", now=NOW) == session()
        assert await second.join_tokens() == [join_token()]
        assert await second.node_key(KEY_NODE) == SPKI
    finally:
        await second.close()


async def test_a_closed_store_refuses_calls(backend: Backend) -> None:
    closed = await backend.open()
    await closed.close()
    await closed.close()  # closing again is harmless

    with pytest.raises(StoreError, match="closed"):
        await closed.is_enrolled(EK)


def test_store_errors_are_authority_errors() -> None:
    assert issubclass(StoreError, AuthorityError)
    for error in (EntryExistsError, EntryNotFoundError, EntryConflictError):
        assert issubclass(error, StoreError)


# --- enrolment ------------------------------------------------------------------------------------


async def test_enrolled_eks_are_remembered(store: Store) -> None:
    assert not await store.is_enrolled(EK)

    await store.enrol_ek(EK, "config", now=NOW)
    await store.enrol_ek(EK, "standalone", now=NOW + 1)  # enrolling again is harmless

    assert await store.is_enrolled(EK)
    assert not await store.is_enrolled(OTHER_EK)


async def test_a_pending_ek_is_listed_and_seen_again(store: Store) -> None:
    await store.add_pending(OTHER_EK, OTHER_NODE, now=NOW + 5)
    await store.add_pending(EK, NODE, now=NOW)
    await store.add_pending(EK, NODE, now=NOW + 30)

    assert await store.pending() == [
        PendingNode(ek_hash=EK, node_id=NODE, first_seen=NOW, last_seen=NOW + 30),
        PendingNode(ek_hash=OTHER_EK, node_id=OTHER_NODE, first_seen=NOW + 5, last_seen=NOW + 5),
    ]
    assert not await store.is_enrolled(EK)


async def test_an_enrolled_ek_is_never_pending(store: Store) -> None:
    await store.enrol_ek(EK, "config", now=NOW)

    await store.add_pending(EK, NODE, now=NOW + 1)

    assert await store.pending() == []


async def test_enrolling_a_pending_ek_ends_its_wait(store: Store) -> None:
    await store.add_pending(EK, NODE, now=NOW)

    await store.enrol_ek(EK, "operator", now=NOW + 1)

    assert await store.pending() == []
    assert await store.is_enrolled(EK)


@pytest.mark.parametrize("name", [NODE, EK], ids=["by node id", "by ek hash"])
async def test_approving_enrols_the_ek_and_ends_its_wait(store: Store, name: str) -> None:
    await store.add_pending(EK, NODE, now=NOW)
    await store.add_pending(OTHER_EK, OTHER_NODE, now=NOW + 1)

    approved = await store.approve(name, now=NOW + 60)

    assert approved == PendingNode(ek_hash=EK, node_id=NODE, first_seen=NOW, last_seen=NOW)
    assert await store.is_enrolled(EK)
    assert not await store.is_enrolled(OTHER_EK)
    assert [p.ek_hash for p in await store.pending()] == [OTHER_EK]
    assert await store.approve(name, now=NOW + 61) is None


async def test_approving_what_is_not_pending_changes_nothing(store: Store) -> None:
    await store.add_pending(EK, NODE, now=NOW)

    assert await store.approve(OTHER_NODE, now=NOW) is None
    assert await store.approve(OTHER_EK, now=NOW) is None

    assert not await store.is_enrolled(OTHER_EK)
    assert [p.ek_hash for p in await store.pending()] == [EK]


# --- nodes ----------------------------------------------------------------------------------------


async def test_a_node_record_round_trips(store: Store) -> None:
    await store.save_node(node_record())

    assert await store.node(NODE) == node_record()
    assert await store.node(OTHER_NODE) is None


async def test_saving_a_node_again_replaces_it(store: Store) -> None:
    await store.save_node(node_record())
    changed = node_record(state=NodeState.FAILED, selectors=("node:tier:hardware",), pcr_indices=(7,))

    await store.save_node(changed)

    assert await store.node(NODE) == changed
    assert await store.nodes() == [changed]


async def test_nodes_are_listed_by_id(store: Store) -> None:
    await store.save_node(node_record(OTHER_NODE, OTHER_EK))
    await store.save_node(node_record(NODE, EK))

    assert [n.node_id for n in await store.nodes()] == [NODE, OTHER_NODE]


async def test_node_state_changes_are_stored(store: Store) -> None:
    await store.save_node(node_record())

    await store.set_node_state(NODE, NodeState.STALE)

    assert await store.node(NODE) == node_record(state=NodeState.STALE)


async def test_a_quote_updates_the_counters_and_its_time(store: Store) -> None:
    await store.save_node(node_record())

    await store.record_quote(NODE, reset_count=4, restart_count=2, clock=999_999, now=NOW + 7)

    assert await store.node(NODE) == node_record(reset_count=4, restart_count=2, clock=999_999,
                                                 last_quote_at=NOW + 7)


# --- bans -----------------------------------------------------------------------------------------


async def test_no_node_is_banned_by_default(store: Store) -> None:
    assert await store.is_banned(NODE) is False
    assert await store.bans() == []


async def test_a_ban_is_recorded_and_revokes_the_node(store: Store) -> None:
    await store.save_node(node_record())
    await store.save_node(node_record(OTHER_NODE, OTHER_EK))
    before = (await store.revocations()).version

    version = await store.ban_node(NODE, "key stolen", now=NOW)

    revocations = await store.revocations()
    assert version > before
    assert revocations.version == version
    assert revocations.nodes == (RevokedNode(NODE, "key stolen", NOW, banned=True),)
    assert await store.is_banned(NODE)
    assert not await store.is_banned(OTHER_NODE)
    assert await store.bans() == [Ban(NODE, "key stolen", NOW)]
    assert await store.node(NODE) == node_record(state=NodeState.BANNED)
    assert await store.node(OTHER_NODE) == node_record(OTHER_NODE, OTHER_EK)


async def test_a_node_never_seen_can_be_banned(store: Store) -> None:
    version = await store.ban_node(NODE, "decommissioned", now=NOW)

    assert await store.is_banned(NODE)
    assert await store.node(NODE) is None
    assert (await store.revocations()).nodes == (RevokedNode(NODE, "decommissioned", NOW, banned=True),)
    assert (await store.revocations()).version == version


async def test_banning_a_banned_node_keeps_its_ban_time(store: Store) -> None:
    first = await store.ban_node(NODE, "suspicious", now=NOW)

    second = await store.ban_node(NODE, "key stolen", now=NOW + 10)

    assert second > first
    assert await store.bans() == [Ban(NODE, "key stolen", NOW)]


async def test_a_node_revocation_never_moves_back_in_time(store: Store) -> None:
    # Replicas' clocks differ a little: a later call may carry an earlier time.
    await store.save_profile("golden", ["aa"], learned_from=NODE, now=NOW)
    await store.save_node(node_record())
    await store.remove_profile("golden", now=NOW + 50)

    await store.ban_node(NODE, "key stolen", now=NOW + 10)

    assert (await store.revocations()).nodes == (RevokedNode(NODE, "key stolen", NOW + 50, banned=True),)


async def test_bans_are_listed_by_node_id(store: Store) -> None:
    await store.ban_node(OTHER_NODE, "b", now=NOW)
    await store.ban_node(NODE, "a", now=NOW + 1)

    assert await store.bans() == [Ban(NODE, "a", NOW + 1), Ban(OTHER_NODE, "b", NOW)]


async def test_unbanning_lets_the_node_attest_while_its_old_svids_stay_void(store: Store) -> None:
    await store.save_node(node_record())
    banned = await store.ban_node(NODE, "key stolen", now=NOW)

    version = await store.unban_node(NODE, now=NOW + 3600)

    assert version is not None
    assert version > banned
    revocations = await store.revocations()
    assert revocations.version == version
    # Before the ban's time, not the unban's: what was issued before the ban stays void.
    assert revocations.nodes == (RevokedNode(NODE, "key stolen", NOW, banned=False),)
    assert not await store.is_banned(NODE)
    assert await store.bans() == []
    assert await store.node(NODE) == node_record(state=NodeState.ATTESTING)


async def test_unbanning_a_node_that_is_not_banned_changes_nothing(store: Store) -> None:
    await store.save_node(node_record())
    before = await store.revocations()

    assert await store.unban_node(NODE, now=NOW) is None

    assert await store.revocations() == before
    assert await store.node(NODE) == node_record()


# --- nonces ---------------------------------------------------------------------------------------


async def test_a_nonce_is_consumed_exactly_once(store: Store) -> None:
    await store.add_nonce(NODE, NONCE, NOW + 30, now=NOW)

    assert await store.consume_nonce(NODE, NONCE, now=NOW + 1) is True
    assert await store.consume_nonce(NODE, NONCE, now=NOW + 1) is False


async def test_a_nonce_is_good_until_it_expires(store: Store) -> None:
    await store.add_nonce(NODE, nonce(1), NOW + 30, now=NOW)
    await store.add_nonce(NODE, nonce(2), NOW + 30, now=NOW)

    assert await store.consume_nonce(NODE, nonce(1), now=NOW + 30.5) is False
    assert await store.consume_nonce(NODE, nonce(2), now=NOW + 30) is True


async def test_a_nonce_of_another_node_is_refused_and_stays_usable_by_its_node(store: Store) -> None:
    await store.add_nonce(NODE, NONCE, NOW + 30, now=NOW)

    assert await store.consume_nonce(OTHER_NODE, NONCE, now=NOW) is False
    assert await store.consume_nonce(NODE, NONCE, now=NOW) is True


async def test_a_nonce_never_handed_out_is_refused(store: Store) -> None:
    await store.add_nonce(NODE, NONCE, NOW + 30, now=NOW)

    assert await store.consume_nonce(NODE, NONCE[::-1], now=NOW) is False


async def test_each_nonce_of_a_node_is_its_own(store: Store) -> None:
    await store.add_nonce(NODE, nonce(1), NOW + 30, now=NOW)
    await store.add_nonce(NODE, nonce(2), NOW + 30, now=NOW)

    assert await store.consume_nonce(NODE, nonce(2), now=NOW) is True
    assert await store.consume_nonce(NODE, nonce(1), now=NOW) is True


async def test_adding_a_nonce_drops_the_expired_ones(store: Store) -> None:
    await store.add_nonce(NODE, nonce(1), NOW + 30, now=NOW)
    await store.add_nonce(NODE, nonce(2), NOW + 120, now=NOW)

    await store.add_nonce(NODE, nonce(3), NOW + 130, now=NOW + 100)

    # Asked with a time at which it would still be good: it is gone, not merely expired.
    assert await store.consume_nonce(NODE, nonce(1), now=NOW) is False
    assert await store.consume_nonce(NODE, nonce(2), now=NOW) is True


async def test_handing_out_the_same_nonce_twice_fails_loudly(store: Store) -> None:
    await store.add_nonce(NODE, NONCE, NOW + 30, now=NOW)

    with pytest.raises(StoreError, match="nonce"):
        await store.add_nonce(OTHER_NODE, NONCE, NOW + 30, now=NOW)
    assert await store.consume_nonce(OTHER_NODE, NONCE, now=NOW) is False
    assert await store.consume_nonce(NODE, NONCE, now=NOW) is True


async def test_racing_consumers_let_exactly_one_win(store: Store) -> None:
    for round_number in range(20):
        await store.add_nonce(NODE, nonce(round_number), NOW + 30, now=NOW)

        results = await asyncio.gather(*(store.consume_nonce(NODE, nonce(round_number), now=NOW)
                                         for _ in range(8)))

        assert results.count(True) == 1, f"round {round_number}: {results}"


async def test_racing_replicas_sharing_the_database_let_exactly_one_win(backend: Backend) -> None:
    replicas = [await backend.open() for _ in range(3)]
    try:
        for round_number in range(10):
            await replicas[0].add_nonce(NODE, nonce(round_number), NOW + 30, now=NOW)

            results = await asyncio.gather(*(replica.consume_nonce(NODE, nonce(round_number), now=NOW)
                                             for replica in replicas for _ in range(2)))

            assert results.count(True) == 1, f"round {round_number}: {results}"
    finally:
        for replica in replicas:
            await replica.close()


# --- answered requests ----------------------------------------------------------------------------


async def test_an_answered_request_gets_the_same_reply_again(store: Store) -> None:
    digest = "0f" * 32

    assert await store.answered_reply(NODE, digest) is None
    await store.remember_reply(NODE, digest, b"signed reply bytes", now=NOW, keep_seconds=600)

    assert await store.answered_reply(NODE, digest) == b"signed reply bytes"
    assert await store.answered_reply(NODE, digest) == b"signed reply bytes"


async def test_answered_replies_are_kept_per_node(store: Store) -> None:
    digest = "0f" * 32
    await store.remember_reply(NODE, digest, b"for node", now=NOW, keep_seconds=600)

    assert await store.answered_reply(OTHER_NODE, digest) is None
    await store.remember_reply(OTHER_NODE, digest, b"for other", now=NOW, keep_seconds=600)
    assert await store.answered_reply(NODE, digest) == b"for node"
    assert await store.answered_reply(OTHER_NODE, digest) == b"for other"


async def test_remembering_a_reply_again_replaces_it(store: Store) -> None:
    await store.remember_reply(NODE, "aa", b"first", now=NOW, keep_seconds=600)
    await store.remember_reply(NODE, "aa", b"second", now=NOW + 1, keep_seconds=600)

    assert await store.answered_reply(NODE, "aa") == b"second"


async def test_replies_older_than_the_keep_time_are_dropped(store: Store) -> None:
    await store.remember_reply(NODE, "old", b"old", now=NOW, keep_seconds=600)
    await store.remember_reply(NODE, "recent", b"recent", now=NOW + 500, keep_seconds=600)

    await store.remember_reply(NODE, "new", b"new", now=NOW + 601, keep_seconds=600)

    assert await store.answered_reply(NODE, "old") is None
    assert await store.answered_reply(NODE, "recent") == b"recent"
    assert await store.answered_reply(NODE, "new") == b"new"


# --- boot profiles --------------------------------------------------------------------------------


async def test_profiles_hold_sorted_unique_measurements(store: Store) -> None:
    await store.save_profile("default", ["bb", "aa", "bb"], learned_from=NODE, now=NOW)
    await store.save_profile("lab", iter(["cc"]), learned_from=OTHER_NODE, now=NOW + 1)

    assert await store.profiles() == {"default": frozenset({"aa", "bb"}), "lab": frozenset({"cc"})}
    assert await store.profile_records() == [ProfileRecord("default", 2, NODE, NOW),
                                             ProfileRecord("lab", 1, OTHER_NODE, NOW + 1)]


async def test_saving_a_profile_again_replaces_it(store: Store) -> None:
    await store.save_profile("default", ["aa", "bb"], learned_from=NODE, now=NOW)

    await store.save_profile("default", ["dd"], learned_from="vouchd node learn", now=NOW + 9)

    assert await store.profiles() == {"default": frozenset({"dd"})}
    assert await store.profile_records() == [ProfileRecord("default", 1, "vouchd node learn", NOW + 9)]


async def test_removing_a_profile_sends_its_nodes_back_to_attest(store: Store) -> None:
    await store.save_profile("golden", ["aa"], learned_from=NODE, now=NOW)
    await store.save_profile("golden-2", ["bb"], learned_from=NODE, now=NOW)
    await store.save_node(node_record(NODE, EK, profile="golden"))
    await store.save_node(node_record(OTHER_NODE, OTHER_EK, profile="golden", state=NodeState.STALE))
    await store.save_node(node_record(THIRD_NODE, THIRD_EK, profile="golden-2"))
    before = (await store.revocations()).version

    removed = await store.remove_profile("golden", now=NOW + 50)

    assert removed is not None
    version, node_ids = removed
    assert version > before
    assert node_ids == [NODE, OTHER_NODE]
    assert await store.profiles() == {"golden-2": frozenset({"bb"})}
    assert await store.node(NODE) == node_record(NODE, EK, state=NodeState.ATTESTING)
    assert await store.node(OTHER_NODE) == node_record(OTHER_NODE, OTHER_EK, state=NodeState.ATTESTING)
    assert await store.node(THIRD_NODE) == node_record(THIRD_NODE, THIRD_EK, profile="golden-2")
    revocations = await store.revocations()
    assert revocations.version == version
    assert [(n.node_id, n.before, n.banned) for n in revocations.nodes] == [(NODE, NOW + 50, False),
                                                                             (OTHER_NODE, NOW + 50, False)]
    assert await store.bans() == []


async def test_removing_a_profile_leaves_banned_and_failed_nodes_as_they_are(store: Store) -> None:
    await store.save_profile("golden", ["aa"], learned_from=NODE, now=NOW)
    await store.save_node(node_record(NODE, EK))
    await store.save_node(node_record(OTHER_NODE, OTHER_EK, state=NodeState.FAILED))
    await store.ban_node(NODE, "key stolen", now=NOW)

    removed = await store.remove_profile("golden", now=NOW + 50)

    assert removed is not None
    assert removed[1] == [NODE, OTHER_NODE]
    assert await store.node(NODE) == node_record(NODE, EK, state=NodeState.BANNED)
    assert await store.node(OTHER_NODE) == node_record(OTHER_NODE, OTHER_EK, state=NodeState.FAILED)
    assert await store.is_banned(NODE)
    banned, failed = (await store.revocations()).nodes
    assert (banned.node_id, banned.reason, banned.banned) == (NODE, "key stolen", True)
    assert banned.before >= NOW
    assert (failed.node_id, failed.before, failed.banned) == (OTHER_NODE, NOW + 50, False)


async def test_removing_a_profile_no_node_has_revokes_nothing(store: Store) -> None:
    await store.save_profile("golden", ["aa"], learned_from=NODE, now=NOW)
    await store.save_node(node_record(profile="other"))
    before = await store.revocations()

    assert await store.remove_profile("golden", now=NOW) == (before.version, [])

    assert await store.revocations() == before
    assert await store.profiles() == {}
    assert await store.node(NODE) == node_record(profile="other")


async def test_removing_a_profile_that_does_not_exist_changes_nothing(store: Store) -> None:
    await store.save_node(node_record(profile="ghost"))
    before = await store.revocations()

    assert await store.remove_profile("ghost", now=NOW) is None

    assert await store.revocations() == before
    assert await store.node(NODE) == node_record(profile="ghost")


# --- attestation sessions -------------------------------------------------------------------------


async def test_a_session_is_taken_once(store: Store) -> None:
    assert await store.put_session(session(), max_sessions=10, now=NOW)

    assert await store.take_session("s-1", now=NOW + 1) == session()
    assert await store.take_session("s-1", now=NOW + 1) is None


async def test_a_session_round_trips_a_large_event_log_and_empty_fields(store: Store) -> None:
    large = session("s-large", event_log=bytes(range(256)) * (16 * 1024 * 1024 // 256))
    bare = session("s-bare", OTHER_EK, event_log=None, ek_issuer_cn=None, pcr_indices=())
    assert await store.put_session(large, max_sessions=10, now=NOW)
    assert await store.put_session(bare, max_sessions=10, now=NOW)

    assert await store.take_session("s-large", now=NOW) == large
    assert await store.take_session("s-bare", now=NOW) == bare


async def test_a_session_unknown_to_the_store_is_none(store: Store) -> None:
    assert await store.put_session(session(), max_sessions=10, now=NOW)

    assert await store.take_session("s-2", now=NOW) is None
    assert await store.take_session("s-1", now=NOW) == session()


async def test_a_new_session_of_an_ek_replaces_its_old_one(store: Store) -> None:
    assert await store.put_session(session("s-1", EK), max_sessions=10, now=NOW)
    assert await store.put_session(session("s-other", OTHER_EK), max_sessions=10, now=NOW)

    assert await store.put_session(session("s-2", EK, secret=b"\x03" * 32), max_sessions=10, now=NOW + 1)

    assert await store.take_session("s-1", now=NOW + 2) is None
    assert await store.take_session("s-2", now=NOW + 2) == session("s-2", EK, secret=b"\x03" * 32)
    assert await store.take_session("s-other", now=NOW + 2) == session("s-other", OTHER_EK)


async def test_a_full_table_refuses_new_eks_and_keeps_its_sessions(store: Store) -> None:
    assert await store.put_session(session("s-1", EK), max_sessions=2, now=NOW)
    assert await store.put_session(session("s-2", OTHER_EK), max_sessions=2, now=NOW)

    assert await store.put_session(session("s-3", THIRD_EK), max_sessions=2, now=NOW) is False

    assert await store.take_session("s-3", now=NOW) is None
    assert await store.take_session("s-1", now=NOW) == session("s-1", EK)
    assert await store.take_session("s-2", now=NOW) == session("s-2", OTHER_EK)


async def test_a_full_table_still_lets_an_ek_replace_its_session(store: Store) -> None:
    assert await store.put_session(session("s-1", EK), max_sessions=2, now=NOW)
    assert await store.put_session(session("s-2", OTHER_EK), max_sessions=2, now=NOW)

    assert await store.put_session(session("s-1b", EK), max_sessions=2, now=NOW) is True

    assert await store.take_session("s-1", now=NOW) is None
    assert await store.take_session("s-1b", now=NOW) == session("s-1b", EK)


async def test_an_ek_may_replace_its_session_even_over_a_lowered_limit(store: Store) -> None:
    for number, ek_hash in enumerate((EK, OTHER_EK, THIRD_EK)):
        assert await store.put_session(session(f"s-{number}", ek_hash), max_sessions=10, now=NOW)

    assert await store.put_session(session("s-0b", EK), max_sessions=2, now=NOW) is True
    assert await store.put_session(session("s-new", "12" * 32), max_sessions=2, now=NOW) is False

    assert await store.take_session("s-0b", now=NOW) == session("s-0b", EK)


async def test_expired_sessions_leave_room(store: Store) -> None:
    assert await store.put_session(session("s-1", EK, expires_at=NOW + 10), max_sessions=2, now=NOW)
    assert await store.put_session(session("s-2", OTHER_EK, expires_at=NOW + 60), max_sessions=2, now=NOW)

    assert await store.put_session(session("s-3", THIRD_EK, expires_at=NOW + 80), max_sessions=2, now=NOW + 20)

    # Asked with a time at which it would still be good: it is gone, not merely expired.
    assert await store.take_session("s-1", now=NOW) is None
    assert await store.take_session("s-3", now=NOW + 20) == session("s-3", THIRD_EK, expires_at=NOW + 80)


async def test_a_session_is_good_until_it_expires(store: Store) -> None:
    assert await store.put_session(session("s-1", EK, expires_at=NOW + 60), max_sessions=10, now=NOW)
    assert await store.put_session(session("s-2", OTHER_EK, expires_at=NOW + 60), max_sessions=10, now=NOW)

    assert await store.take_session("s-1", now=NOW + 60) == session("s-1", EK, expires_at=NOW + 60)
    assert await store.take_session("s-2", now=NOW + 60.5) is None
    # Taking an expired session removes it all the same.
    assert await store.take_session("s-2", now=NOW) is None


async def test_racing_takes_of_one_session_give_it_once(backend: Backend) -> None:
    replicas = [await backend.open() for _ in range(2)]
    try:
        for round_number in range(10):
            session_id = f"s-{round_number}"
            assert await replicas[0].put_session(session(session_id), max_sessions=10, now=NOW)

            results = await asyncio.gather(*(replica.take_session(session_id, now=NOW)
                                             for replica in replicas for _ in range(3)))

            assert [r for r in results if r is not None] == [session(session_id)], f"round {round_number}"
    finally:
        for replica in replicas:
            await replica.close()


async def test_racing_replicas_never_store_more_sessions_than_the_limit(backend: Backend) -> None:
    replicas = [await backend.open() for _ in range(2)]
    try:
        eks = [f"{number:064x}" for number in range(10)]

        results = await asyncio.gather(*(replicas[number % 2].put_session(session(f"s-{number}", ek_hash),
                                                                          max_sessions=3, now=NOW)
                                         for number, ek_hash in enumerate(eks)))

        assert results.count(True) == 3, results
        taken = [await replicas[0].take_session(f"s-{number}", now=NOW) for number in range(len(eks))]
        assert [t is not None for t in taken] == results
    finally:
        for replica in replicas:
            await replica.close()


def test_a_session_record_does_not_show_its_secrets() -> None:
    shown = repr(session(secret=b"top-secret-value", server_nonce=b"server-nonce-value"))

    assert "top-secret-value" not in shown
    assert "server-nonce-value" not in shown
    assert "s-1" in shown


# --- join tokens ----------------------------------------------------------------------------------

SECRET_HASH = "5e" * 32
OTHER_SECRET_HASH = "a7" * 32
KEY_NODE = "spiffe://example.org/vouchd/node/key/" + "12" * 32
OTHER_KEY_NODE = "spiffe://example.org/vouchd/node/key/" + "34" * 32


def join_token(token_id: str = "t-1", secret_sha256: str = SECRET_HASH, *, expires_at: float = NOW + 600,
               **changes: object) -> JoinTokenRecord:
    record = JoinTokenRecord(token_id=token_id, secret_sha256=secret_sha256, node_labels=("rack:a", "role:db"),
                             created_at=NOW, expires_at=expires_at)
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


async def test_a_join_token_is_listed_unused_until_used(store: Store) -> None:
    await store.add_join_token(join_token("t-2", node_labels=()))
    await store.add_join_token(join_token("t-1"))

    assert await store.join_tokens() == [join_token("t-1"), join_token("t-2", node_labels=())]


async def test_a_join_token_is_used_once(store: Store) -> None:
    await store.add_join_token(join_token())

    used = await store.use_join_token("t-1", SECRET_HASH, KEY_NODE, now=NOW + 10)

    assert used == join_token(used_at=NOW + 10, used_by=KEY_NODE)
    assert await store.use_join_token("t-1", SECRET_HASH, OTHER_KEY_NODE, now=NOW + 11) is None
    assert await store.join_tokens() == [used]


async def test_a_join_token_with_another_secret_is_refused_and_stays_usable(store: Store) -> None:
    await store.add_join_token(join_token())

    assert await store.use_join_token("t-1", OTHER_SECRET_HASH, KEY_NODE, now=NOW) is None
    assert await store.use_join_token("t-2", SECRET_HASH, KEY_NODE, now=NOW) is None
    assert await store.join_tokens() == [join_token()]

    assert await store.use_join_token("t-1", SECRET_HASH, KEY_NODE, now=NOW) is not None


async def test_a_join_token_is_good_until_it_expires(store: Store) -> None:
    await store.add_join_token(join_token("t-1", expires_at=NOW + 60))
    await store.add_join_token(join_token("t-2", expires_at=NOW + 60))

    assert await store.use_join_token("t-1", SECRET_HASH, KEY_NODE, now=NOW + 60) is not None
    assert await store.use_join_token("t-2", SECRET_HASH, OTHER_KEY_NODE, now=NOW + 60.5) is None
    assert [t.used_by for t in await store.join_tokens()] == [KEY_NODE, None]


async def test_adding_a_join_token_whose_id_exists_fails_and_keeps_the_first(store: Store) -> None:
    await store.add_join_token(join_token())

    with pytest.raises(StoreError, match="join token t-1"):
        await store.add_join_token(join_token(secret_sha256=OTHER_SECRET_HASH))

    assert await store.join_tokens() == [join_token()]


def test_a_join_token_record_holds_a_hash_never_a_secret() -> None:
    with pytest.raises(ValueError, match="t-1: secret_sha256 must be 64 lower-case hex digits"):
        join_token(secret_sha256="the-secret-itself")
    with pytest.raises(ValueError, match="64 lower-case hex"):
        join_token(secret_sha256=SECRET_HASH.upper())

    assert SECRET_HASH not in repr(join_token())


async def test_racing_replicas_use_a_join_token_once(backend: Backend) -> None:
    replicas = [await backend.open() for _ in range(2)]
    try:
        for round_number in range(10):
            token_id = f"t-{round_number}"
            await replicas[0].add_join_token(join_token(token_id))

            results = await asyncio.gather(*(replica.use_join_token(token_id, SECRET_HASH, f"{KEY_NODE}-{caller}",
                                                                    now=NOW)
                                             for replica in replicas for caller in range(3)))

            winners = [r for r in results if r is not None]
            assert len(winners) == 1, f"round {round_number}: {results}"
            (stored,) = [t for t in await replicas[1].join_tokens() if t.token_id == token_id]
            assert stored == winners[0]
    finally:
        for replica in replicas:
            await replica.close()


# --- node keys ------------------------------------------------------------------------------------

SPKI = b"\x30\x59" + bytes(range(89))
OTHER_SPKI = b"\x30\x59" + bytes(range(89, 0, -1))


async def test_a_node_key_is_enrolled_read_and_removed(store: Store) -> None:
    assert await store.node_key(KEY_NODE) is None

    await store.enrol_node_key(KEY_NODE, SPKI, "join token t-1", now=NOW)
    await store.enrol_node_key(OTHER_KEY_NODE, OTHER_SPKI, "operator", now=NOW)

    assert await store.node_key(KEY_NODE) == SPKI
    assert await store.remove_node_key(KEY_NODE) is True
    assert await store.node_key(KEY_NODE) is None
    assert await store.remove_node_key(KEY_NODE) is False
    assert await store.node_key(OTHER_KEY_NODE) == OTHER_SPKI


async def test_enrolling_a_node_key_again_replaces_it(store: Store) -> None:
    await store.enrol_node_key(KEY_NODE, SPKI, "join token t-1", now=NOW)

    await store.enrol_node_key(KEY_NODE, OTHER_SPKI, "join token t-2", now=NOW + 5)

    assert await store.node_key(KEY_NODE) == OTHER_SPKI


# --- registration entries -------------------------------------------------------------------------


async def test_a_new_entry_gets_revision_1_and_its_times(store: Store) -> None:
    created = await store.create_entry(entry(revision=7, created_at=5, updated_at=6), now=NOW + 0.9)

    assert created == entry(revision=1, created_at=int(NOW), updated_at=int(NOW))
    assert await store.entry("web") == created
    assert await store.entry("api") is None


async def test_entries_are_listed_by_id(store: Store) -> None:
    for entry_id in ("web", "api", "db-2", "db-10"):
        await store.create_entry(entry(entry_id), now=NOW)

    assert [e.id for e in await store.entries()] == ["api", "db-10", "db-2", "web"]
    assert await store.entries() == [await store.entry(e) for e in ("api", "db-10", "db-2", "web")]


async def test_creating_an_entry_whose_id_exists_fails_and_keeps_the_first(store: Store) -> None:
    first = await store.create_entry(entry(uid=1000), now=NOW)

    with pytest.raises(EntryExistsError, match="web"):
        await store.create_entry(entry(uid=2000), now=NOW + 5)

    assert await store.entries() == [first]


async def test_an_update_raises_the_revision_and_revokes_the_old_ones(store: Store) -> None:
    await store.create_entry(entry(uid=1000), now=NOW)
    before = (await store.revocations()).version

    updated, version = await store.update_entry(entry(uid=2000, revision=99, created_at=1), expected_revision=1,
                                                now=NOW + 60)

    assert updated == entry(uid=2000, revision=2, created_at=int(NOW), updated_at=int(NOW + 60))
    assert await store.entry("web") == updated
    assert version > before
    revocations = await store.revocations()
    assert revocations.version == version
    assert revocations.entries == (RevokedEntry("web", below_revision=2, revoked_at=NOW + 60),)


async def test_an_update_from_a_stale_revision_conflicts_and_changes_nothing(store: Store) -> None:
    await store.create_entry(entry(uid=1000), now=NOW)
    current, _ = await store.update_entry(entry(uid=2000), expected_revision=1, now=NOW + 1)
    before = await store.revocations()

    with pytest.raises(EntryConflictError, match="web"):
        await store.update_entry(entry(uid=3000), expected_revision=1, now=NOW + 2)

    assert await store.entry("web") == current
    assert await store.revocations() == before


async def test_racing_updates_from_one_revision_let_one_win(backend: Backend) -> None:
    replicas = [await backend.open() for _ in range(3)]
    try:
        for round_number in range(10):
            entry_id = f"web-{round_number}"
            await replicas[0].create_entry(entry(entry_id, uid=1000), now=NOW)

            results = await asyncio.gather(*(replica.update_entry(entry(entry_id, uid=uid), expected_revision=1,
                                                                  now=NOW + 1)
                                             for replica in replicas for uid in (2000, 3000)),
                                           return_exceptions=True)

            winners = [r for r in results if isinstance(r, tuple)]
            losers = [r for r in results if not isinstance(r, tuple)]
            assert len(winners) == 1, f"round {round_number}: {results}"
            assert all(isinstance(r, EntryConflictError) for r in losers), f"round {round_number}: {results}"
            assert await replicas[1].entry(entry_id) == winners[0][0]
    finally:
        for replica in replicas:
            await replica.close()


async def test_racing_creates_of_one_entry_id_let_one_win(backend: Backend) -> None:
    replicas = [await backend.open() for _ in range(2)]
    try:
        results = await asyncio.gather(*(replica.create_entry(entry(uid=uid), now=NOW)
                                         for replica in replicas for uid in (2000, 3000)), return_exceptions=True)

        winners = [r for r in results if isinstance(r, Entry)]
        assert len(winners) == 1, results
        assert all(isinstance(r, EntryExistsError) for r in results if r not in winners), results
        assert await replicas[1].entries() == winners
    finally:
        for replica in replicas:
            await replica.close()


async def test_updating_a_missing_entry_fails(store: Store) -> None:
    before = await store.revocations()

    with pytest.raises(EntryNotFoundError, match="web"):
        await store.update_entry(entry(), expected_revision=1, now=NOW)

    assert await store.entry("web") is None
    assert await store.revocations() == before


async def test_a_delete_returns_the_entry_and_revokes_every_revision(store: Store) -> None:
    await store.create_entry(entry(uid=1000), now=NOW)
    updated, updated_version = await store.update_entry(entry(uid=2000), expected_revision=1, now=NOW + 1)
    await store.create_entry(entry("api"), now=NOW)

    deleted, version = await store.delete_entry("web", now=NOW + 2)

    assert deleted == updated
    assert version > updated_version
    assert await store.entry("web") is None
    assert [e.id for e in await store.entries()] == ["api"]
    revocations = await store.revocations()
    assert revocations.version == version
    assert revocations.entries == (RevokedEntry("web", below_revision=3, revoked_at=NOW + 2),)


async def test_deleting_a_missing_entry_fails(store: Store) -> None:
    before = await store.revocations()

    with pytest.raises(EntryNotFoundError, match="web"):
        await store.delete_entry("web", now=NOW)

    assert await store.revocations() == before


async def test_an_id_used_again_continues_the_revisions_of_the_deleted_entry(store: Store) -> None:
    await store.create_entry(entry(uid=1000), now=NOW)
    await store.update_entry(entry(uid=2000), expected_revision=1, now=NOW + 1)
    await store.delete_entry("web", now=NOW + 2)

    again = await store.create_entry(entry(uid=3000), now=NOW + 3)

    assert again.revision == 3
    assert again.created_at == int(NOW + 3)
    # The old entry's revocation stays, and does not reach the new entry.
    (revoked,) = (await store.revocations()).entries
    assert revoked.entry_id == "web"
    assert again.revision >= revoked.below_revision

    deleted, _ = await store.delete_entry("web", now=NOW + 4)
    assert deleted == again
    assert (await store.create_entry(entry(), now=NOW + 5)).revision == 4


async def test_an_id_used_again_after_its_revocation_was_pruned_still_continues(store: Store) -> None:
    await store.create_entry(entry(), now=NOW)
    await store.delete_entry("web", now=NOW + 1)
    await store.prune_revocations(older_than=NOW + 100)
    assert (await store.revocations()).entries == ()

    assert (await store.create_entry(entry(), now=NOW + 200)).revision == 2


# --- revocations ----------------------------------------------------------------------------------


async def test_a_new_store_has_nothing_revoked(store: Store) -> None:
    revocations = await store.revocations()

    assert (revocations.entries, revocations.nodes) == ((), ())
    assert revocations.version >= 0


async def test_every_revoking_change_and_bump_raises_the_version(store: Store) -> None:
    await store.save_profile("golden", ["aa"], learned_from=NODE, now=NOW)
    await store.save_node(node_record())
    await store.create_entry(entry(), now=NOW)
    versions = [(await store.revocations()).version]

    versions.append((await store.update_entry(entry(uid=2), expected_revision=1, now=NOW))[1])
    versions.append(await store.bump_revocation_version())
    versions.append((await store.delete_entry("web", now=NOW))[1])
    versions.append(await store.ban_node(OTHER_NODE, "lost", now=NOW))
    unbanned = await store.unban_node(OTHER_NODE, now=NOW)
    assert unbanned is not None
    versions.append(unbanned)
    removed = await store.remove_profile("golden", now=NOW)
    assert removed is not None
    versions.append(removed[0])
    versions.append(await store.bump_revocation_version())

    assert versions == sorted(set(versions)), versions
    assert (await store.revocations()).version == versions[-1]


async def test_bumping_the_version_keeps_the_content(store: Store) -> None:
    await store.ban_node(NODE, "lost", now=NOW)
    before = await store.revocations()

    version = await store.bump_revocation_version()

    after = await store.revocations()
    assert version > before.version
    assert after == dataclasses.replace(before, version=version)


async def test_creating_entries_and_saving_nodes_revokes_nothing(store: Store) -> None:
    before = await store.revocations()

    await store.create_entry(entry(), now=NOW)
    await store.save_node(node_record())
    await store.set_node_state(NODE, NodeState.STALE)

    assert await store.revocations() == before


async def test_pruning_drops_old_revocations_but_never_a_ban(store: Store) -> None:
    for entry_id in ("old", "recent"):
        await store.create_entry(entry(entry_id), now=NOW)
    await store.save_profile("golden", ["aa"], learned_from=NODE, now=NOW)
    await store.save_node(node_record(NODE, EK))
    await store.delete_entry("old", now=NOW + 10)
    await store.remove_profile("golden", now=NOW + 10)
    await store.ban_node(OTHER_NODE, "lost", now=NOW)
    await store.ban_node(THIRD_NODE, "lost", now=NOW)
    await store.unban_node(THIRD_NODE, now=NOW + 500)  # before stays NOW: prunable like any other
    await store.delete_entry("recent", now=NOW + 1000)
    before = await store.revocations()

    assert await store.prune_revocations(older_than=NOW + 999) == 3

    after = await store.revocations()
    assert after.version == before.version
    assert after.entries == (RevokedEntry("recent", below_revision=2, revoked_at=NOW + 1000),)
    assert after.nodes == (RevokedNode(OTHER_NODE, "lost", NOW, banned=True),)
    assert await store.prune_revocations(older_than=NOW + 999) == 0


async def test_a_revocation_made_at_the_cut_off_is_kept(store: Store) -> None:
    await store.create_entry(entry(), now=NOW)
    await store.delete_entry("web", now=NOW + 10)

    assert await store.prune_revocations(older_than=NOW + 10) == 0

    assert [e.entry_id for e in (await store.revocations()).entries] == ["web"]


async def test_revocation_snapshots_stay_consistent_with_their_version(store: Store) -> None:
    ids = [f"e{number:02d}" for number in range(20)]
    for entry_id in ids:
        await store.create_entry(entry(entry_id), now=NOW)
    base = (await store.revocations()).version

    results = await asyncio.gather(*(call for entry_id in ids for call in (
        store.delete_entry(entry_id, now=NOW + 1), store.revocations())))

    snapshots = [r for r in results if isinstance(r, Revocations)]
    assert len(snapshots) == len(ids)
    for snapshot in snapshots:
        # Each delete records exactly one revocation and one version: a snapshot never sees one without the other.
        assert len(snapshot.entries) == snapshot.version - base, snapshot


# --- SQLite alone ---------------------------------------------------------------------------------

# Version 1 as operators have it on disk.
_V1_SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE nodes (
    node_id TEXT PRIMARY KEY, ek_hash TEXT NOT NULL UNIQUE, tier TEXT NOT NULL, state TEXT NOT NULL,
    ak_public BLOB NOT NULL, node_key_public BLOB NOT NULL, selectors TEXT NOT NULL, pcr_bank TEXT NOT NULL,
    pcr_indices TEXT NOT NULL, pcr_digest BLOB NOT NULL, reset_count INTEGER NOT NULL,
    restart_count INTEGER NOT NULL, clock INTEGER NOT NULL, attested_at REAL NOT NULL, last_quote_at REAL NOT NULL
);
CREATE TABLE enrolled_eks (ek_hash TEXT PRIMARY KEY, source TEXT NOT NULL, added_at REAL NOT NULL);
CREATE TABLE banned_nodes (node_id TEXT PRIMARY KEY, reason TEXT NOT NULL, banned_at REAL NOT NULL);
CREATE TABLE nonces (nonce BLOB PRIMARY KEY, node_id TEXT NOT NULL, expires_at REAL NOT NULL);
CREATE INDEX nonces_by_expiry ON nonces (expires_at);
CREATE TABLE answered (
    node_id TEXT NOT NULL, digest TEXT NOT NULL, reply BLOB NOT NULL, answered_at REAL NOT NULL,
    PRIMARY KEY (node_id, digest)
);
CREATE INDEX answered_by_time ON answered (answered_at);
CREATE TABLE event_log_profiles (
    name TEXT PRIMARY KEY, digests TEXT NOT NULL, learned_from TEXT NOT NULL, created_at REAL NOT NULL
);
INSERT INTO meta VALUES ('schema_version', '1');
"""


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "authority" / "authority.db"


@pytest.fixture
async def sqlite_store(db_path: Path) -> AsyncIterator[SqliteStore]:
    opened = await SqliteStore.open(db_path)
    try:
        yield opened
    finally:
        await opened.close()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def raw_connection(path: Path) -> sqlite3.Connection:
    return sqlite3.connect(path, isolation_level=None)


async def test_the_database_and_its_directory_are_private(sqlite_store: SqliteStore, db_path: Path) -> None:
    assert mode(db_path) == 0o600
    assert mode(db_path.parent) == 0o700


async def test_the_write_ahead_log_files_are_private_too(db_path: Path) -> None:
    # A common umask, stated so that the result does not depend on who runs the tests.
    previous_umask = os.umask(0o022)
    try:
        store = await SqliteStore.open(db_path)
    finally:
        os.umask(previous_umask)
    try:
        await store.add_nonce(NODE, NONCE, NOW + 30, now=NOW)
        sidecars = [db_path.with_name(db_path.name + suffix) for suffix in ("-wal", "-shm")]

        assert [(p.name, mode(p)) for p in sidecars] == [(p.name, 0o600) for p in sidecars]
    finally:
        await store.close()


async def test_a_symlink_at_the_path_is_refused(db_path: Path, tmp_path: Path) -> None:
    target = tmp_path / "elsewhere.db"
    target.write_bytes(b"")
    db_path.parent.mkdir(parents=True)
    db_path.symlink_to(target)

    with pytest.raises(StoreError, match=f"^{db_path}: cannot open the authority database: "):
        await SqliteStore.open(db_path)
    assert target.read_bytes() == b""


async def test_a_file_that_is_not_a_database_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not sqlite, just text that is long enough to have a header" * 10)

    with pytest.raises(StoreError, match=f"^{db_path}: cannot open the authority database: "):
        await SqliteStore.open(db_path)


def set_schema_version(path: Path, value: str) -> None:
    raw = raw_connection(path)
    raw.execute("UPDATE meta SET value=? WHERE key='schema_version'", (value,))
    raw.close()


async def test_a_database_of_a_newer_schema_version_is_refused_untouched(db_path: Path) -> None:
    await (await SqliteStore.open(db_path)).close()
    set_schema_version(db_path, "4")
    before = db_path.read_bytes()

    with pytest.raises(StoreError, match=f"^{db_path}: schema version 4 is newer than this vouchd knows \\(3\\): "
                                         "it was written by a newer vouchd; "):
        await SqliteStore.open(db_path)
    assert db_path.read_bytes() == before


@pytest.mark.parametrize("value", ["0", "two", ""])
async def test_a_database_whose_schema_version_is_no_version_is_refused(db_path: Path, value: str) -> None:
    await (await SqliteStore.open(db_path)).close()
    set_schema_version(db_path, value)

    with pytest.raises(StoreError, match=f"^{db_path}: schema version {value!r} is not one this vouchd reads "
                                         "\\(1 to 3\\)$"):
        await SqliteStore.open(db_path)


async def test_a_version_2_database_is_migrated_keeping_its_state(db_path: Path) -> None:
    # Version 2 is version 3 without the join token and node key tables.
    store = await SqliteStore.open(db_path)
    try:
        await store.save_node(node_record())
        created = await store.create_entry(entry(), now=NOW)
        version = await store.ban_node(OTHER_NODE, "lost", now=NOW)
        assert await store.put_session(session(), max_sessions=10, now=NOW)
    finally:
        await store.close()
    raw = raw_connection(db_path)
    raw.execute("DROP TABLE join_tokens")
    raw.execute("DROP TABLE node_keys")
    raw.close()
    set_schema_version(db_path, "2")

    store = await SqliteStore.open(db_path)
    try:
        assert await store.node(NODE) == node_record()
        assert await store.entry("web") == created
        assert (await store.revocations()).version == version
        assert await store.take_session("s-1", now=NOW) == session()
        assert await store.join_tokens() == []
        await store.add_join_token(join_token())
        await store.enrol_node_key(KEY_NODE, SPKI, "join token t-1", now=NOW)
        assert await store.node_key(KEY_NODE) == SPKI
    finally:
        await store.close()
    raw = raw_connection(db_path)
    assert raw.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("3",)
    raw.close()


async def test_a_version_1_database_is_migrated_keeping_its_state(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    raw = raw_connection(db_path)
    raw.executescript(_V1_SCHEMA)
    record = node_record(OTHER_NODE, OTHER_EK)
    raw.execute("INSERT INTO nodes VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", (
        record.node_id, record.ek_hash, record.tier, record.state.value, record.ak_public, record.node_key_public,
        '["node:tier:hardware", "tpm:ek_hash:' + OTHER_EK + '", "tpm:pcr_profile:golden"]', record.pcr_bank,
        "[0, 1, 2, 3, 4, 5, 6, 7]", record.pcr_digest, record.reset_count, record.restart_count, record.clock,
        record.attested_at, record.last_quote_at))
    raw.execute("INSERT INTO enrolled_eks VALUES (?, 'config', ?)", (OTHER_EK, NOW))
    raw.execute("INSERT INTO banned_nodes VALUES (?, 'key stolen', ?)", (NODE, NOW - 10))
    raw.execute("INSERT INTO nonces VALUES (?, ?, ?)", (NONCE, OTHER_NODE, NOW + 30))
    raw.execute("INSERT INTO answered VALUES (?, 'd', x'0102', ?)", (OTHER_NODE, NOW))
    raw.execute("INSERT INTO event_log_profiles VALUES ('golden', '[\"aa\", \"bb\"]', 'learn', ?)", (NOW,))
    raw.close()

    for _ in range(2):  # the second open finds version 3 and changes nothing
        store = await SqliteStore.open(db_path)
        try:
            assert await store.node(OTHER_NODE) == record
            assert await store.is_enrolled(OTHER_EK)
            assert await store.bans() == [Ban(NODE, "key stolen", NOW - 10)]
            assert await store.answered_reply(OTHER_NODE, "d") == b"\x01\x02"
            assert await store.profile_records() == [ProfileRecord("golden", 2, "learn", NOW)]
            # The ban of version 1 is revoked as a ban made today would be.
            revocations = await store.revocations()
            assert revocations.nodes == (RevokedNode(NODE, "key stolen", NOW - 10, banned=True),)
            assert revocations.version == 1
        finally:
            await store.close()

    store = await SqliteStore.open(db_path)
    try:
        assert await store.consume_nonce(OTHER_NODE, NONCE, now=NOW)
        assert (await store.create_entry(entry(), now=NOW)).revision == 1
        assert await store.put_session(session(), max_sessions=1, now=NOW)
        await store.add_pending(EK, NODE, now=NOW)
        assert await store.unban_node(NODE, now=NOW) == 2
        assert await store.use_join_token("t-1", SECRET_HASH, KEY_NODE, now=NOW) is None
    finally:
        await store.close()
    raw = raw_connection(db_path)
    assert raw.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == ("3",)
    raw.close()


async def test_calls_run_off_the_event_loop(sqlite_store: SqliteStore, db_path: Path) -> None:
    # Another process holds the write lock: the store's call waits for it on its own thread while
    # the event loop goes on serving everything else.
    other_process = raw_connection(db_path)
    other_process.execute("BEGIN IMMEDIATE")
    try:
        enrolling = asyncio.create_task(sqlite_store.enrol_ek(EK, "config", now=NOW))
        await asyncio.sleep(0.2)
        assert not enrolling.done()
    finally:
        other_process.execute("COMMIT")
        other_process.close()
    await enrolling

    assert await sqlite_store.is_enrolled(EK)


def fail_writes_to(path: Path, table: str, message: str = "database or disk is full") -> None:
    """Make every insert into `table` fail, as a full disk would fail it halfway through a change."""
    raw = raw_connection(path)
    for event in ("INSERT", "UPDATE"):
        raw.execute(f"CREATE TRIGGER fail_{event.lower()}_{table} BEFORE {event} ON {table} "
                    f"BEGIN SELECT RAISE(ABORT, '{message}'); END")
    raw.close()


async def test_a_delete_whose_revocation_cannot_be_written_leaves_the_entry(sqlite_store: SqliteStore,
                                                                               db_path: Path) -> None:
    created = await sqlite_store.create_entry(entry(), now=NOW)
    before = await sqlite_store.revocations()
    fail_writes_to(db_path, "entry_revocations")

    with pytest.raises(StoreError, match=f"^{db_path}: cannot delete entry web: database or disk is full$"):
        await sqlite_store.delete_entry("web", now=NOW)

    assert await sqlite_store.entry("web") == created
    assert await sqlite_store.revocations() == before


async def test_an_update_whose_version_cannot_be_bumped_leaves_the_entry(sqlite_store: SqliteStore,
                                                                          db_path: Path) -> None:
    created = await sqlite_store.create_entry(entry(), now=NOW)
    before = await sqlite_store.revocations()
    fail_writes_to(db_path, "revocation_version")

    with pytest.raises(StoreError, match=f"^{db_path}: cannot update entry web: "):
        await sqlite_store.update_entry(entry(uid=2), expected_revision=1, now=NOW)

    assert await sqlite_store.entry("web") == created
    assert await sqlite_store.revocations() == before


async def test_a_ban_that_cannot_be_revoked_is_not_recorded(sqlite_store: SqliteStore, db_path: Path) -> None:
    await sqlite_store.save_node(node_record())
    fail_writes_to(db_path, "revocation_version")

    with pytest.raises(StoreError, match=f"^{db_path}: cannot ban node {NODE}: "):
        await sqlite_store.ban_node(NODE, "lost", now=NOW)

    assert not await sqlite_store.is_banned(NODE)
    assert await sqlite_store.node(NODE) == node_record()
    assert (await sqlite_store.revocations()).nodes == ()


async def test_a_profile_removal_that_cannot_be_revoked_keeps_the_profile(sqlite_store: SqliteStore,
                                                                           db_path: Path) -> None:
    await sqlite_store.save_profile("golden", ["aa"], learned_from=NODE, now=NOW)
    await sqlite_store.save_node(node_record())
    fail_writes_to(db_path, "node_revocations")

    with pytest.raises(StoreError, match=f"^{db_path}: cannot remove profile golden: "):
        await sqlite_store.remove_profile("golden", now=NOW)

    assert await sqlite_store.profiles() == {"golden": frozenset({"aa"})}
    assert await sqlite_store.node(NODE) == node_record()


async def test_a_session_that_cannot_be_written_keeps_the_one_it_would_replace(sqlite_store: SqliteStore,
                                                                                db_path: Path) -> None:
    assert await sqlite_store.put_session(session("s-1"), max_sessions=10, now=NOW)
    fail_writes_to(db_path, "sessions")

    with pytest.raises(StoreError, match=f"^{db_path}: cannot store an attestation session of node {NODE}: "):
        await sqlite_store.put_session(session("s-2"), max_sessions=10, now=NOW)

    assert await sqlite_store.take_session("s-1", now=NOW) == session("s-1")
