"""The authority's store: single-use nonces, answered replies, node records, and private files."""

from __future__ import annotations

import dataclasses
import os
import sqlite3
import stat
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import pytest

from vouchd.authority.errors import AuthorityError
from vouchd.authority.store import AuthorityStore, NodeRecord, NodeState, StoreError

NODE = "spiffe://example.org/vouchd/node/tpm/" + "ab" * 32
OTHER_NODE = "spiffe://example.org/vouchd/node/tpm/" + "cd" * 32
NONCE = bytes(range(32))


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "authority" / "authority.db"


@pytest.fixture
def store(db_path: Path) -> Iterator[AuthorityStore]:
    opened = AuthorityStore(db_path)
    try:
        yield opened
    finally:
        opened.close()


def node_record(node_id: str = NODE, ek_hash: str = "ab" * 32, **changes: object) -> NodeRecord:
    record = NodeRecord(
        node_id=node_id, ek_hash=ek_hash, tier="hardware", state=NodeState.TRUSTED,
        ak_public=b"\x00\x58ak-public", node_key_public=b"\x00\x58node-key", selectors=(
            f"tpm:ek_hash:{ek_hash}", "node:tier:hardware", "node:label:role:web"),
        pcr_bank="sha256", pcr_indices=(0, 1, 2, 3, 4, 5, 6, 7), pcr_digest=b"\x11" * 32,
        reset_count=3, restart_count=0, clock=123_456, attested_at=1_780_000_000.5, last_quote_at=1_780_000_000.5,
    )
    return dataclasses.replace(record, **changes)  # type: ignore[arg-type]


# --- files --------------------------------------------------------------------------------------


def test_the_database_file_is_private(store: AuthorityStore, db_path: Path) -> None:
    assert mode(db_path) == 0o600


def test_a_missing_state_directory_is_created_private(store: AuthorityStore, db_path: Path) -> None:
    assert mode(db_path.parent) == 0o700


def test_the_write_ahead_log_files_are_private_too(db_path: Path) -> None:
    # A common umask, stated so that the result does not depend on who runs the tests.
    previous_umask = os.umask(0o022)
    try:
        store = AuthorityStore(db_path)
    finally:
        os.umask(previous_umask)
    try:
        store.add_nonce(NODE, NONCE, time.time() + 30)
        sidecars = [db_path.with_name(db_path.name + suffix) for suffix in ("-wal", "-shm")]

        assert [(p.name, mode(p)) for p in sidecars if p.exists()] == [(p.name, 0o600) for p in sidecars]
    finally:
        store.close()


def test_reopening_keeps_the_state(db_path: Path) -> None:
    first = AuthorityStore(db_path)
    first.save_node(node_record())
    first.enrol_ek("ab" * 32, "config")
    first.remember_reply(NODE, "d" * 64, b"reply", keep_seconds=600)
    first.close()

    second = AuthorityStore(db_path)
    try:
        assert second.node(NODE) == node_record()
        assert second.is_enrolled("ab" * 32)
        assert second.answered_reply(NODE, "d" * 64) == b"reply"
    finally:
        second.close()


def test_a_database_of_another_schema_version_is_refused(db_path: Path) -> None:
    AuthorityStore(db_path).close()
    raw = sqlite3.connect(db_path)
    with raw:
        raw.execute("UPDATE meta SET value='2' WHERE key='schema_version'")
    raw.close()

    with pytest.raises(StoreError, match=f"^{db_path}: schema version 2 is not 1$"):
        AuthorityStore(db_path)


def test_a_file_that_is_not_a_database_is_refused(db_path: Path) -> None:
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"this is not sqlite, just text that is long enough to have a header" * 10)

    with pytest.raises(StoreError, match=f"^{db_path}: cannot open the authority database: "):
        AuthorityStore(db_path)


def test_store_errors_are_authority_errors() -> None:
    assert issubclass(StoreError, AuthorityError)


# --- nonces -------------------------------------------------------------------------------------


def test_a_nonce_is_consumed_exactly_once(store: AuthorityStore) -> None:
    store.add_nonce(NODE, NONCE, time.time() + 30)

    assert store.consume_nonce(NODE, NONCE) is True
    assert store.consume_nonce(NODE, NONCE) is False


def test_an_expired_nonce_is_refused(store: AuthorityStore) -> None:
    store.add_nonce(NODE, NONCE, time.time() - 1)

    assert store.consume_nonce(NODE, NONCE) is False


def test_a_nonce_of_another_node_is_refused_and_stays_usable_by_its_node(store: AuthorityStore) -> None:
    store.add_nonce(NODE, NONCE, time.time() + 30)

    assert store.consume_nonce(OTHER_NODE, NONCE) is False
    assert store.consume_nonce(NODE, NONCE) is True


def test_a_nonce_never_handed_out_is_refused(store: AuthorityStore) -> None:
    store.add_nonce(NODE, NONCE, time.time() + 30)

    assert store.consume_nonce(NODE, NONCE[::-1]) is False


def test_each_nonce_of_a_node_is_its_own(store: AuthorityStore) -> None:
    second = b"\x01" * 32
    store.add_nonce(NODE, NONCE, time.time() + 30)
    store.add_nonce(NODE, second, time.time() + 30)

    assert store.consume_nonce(NODE, second) is True
    assert store.consume_nonce(NODE, NONCE) is True


def test_handing_out_the_same_nonce_twice_fails_loudly(store: AuthorityStore) -> None:
    store.add_nonce(NODE, NONCE, time.time() + 30)

    with pytest.raises(sqlite3.IntegrityError):
        store.add_nonce(OTHER_NODE, NONCE, time.time() + 30)
    assert store.consume_nonce(NODE, NONCE) is True


def race(contenders: Sequence[Callable[[], object]]) -> list[object]:
    """Run every contender at the same instant on its own thread; their results in order."""
    start = threading.Barrier(len(contenders))

    def run(contend: Callable[[], object]) -> object:
        start.wait()
        return contend()

    with ThreadPoolExecutor(max_workers=len(contenders)) as pool:
        return list(pool.map(run, contenders))


def test_racing_consumers_on_one_store_let_exactly_one_win(store: AuthorityStore) -> None:
    outcomes = []
    for round_number in range(40):
        nonce = round_number.to_bytes(32, "big")
        store.add_nonce(NODE, nonce, time.time() + 30)
        consumers = [partial(store.consume_nonce, NODE, nonce) for _ in range(8)]
        # Unrelated writes on the same store, as other requests would make meanwhile.
        writers = [partial(store.enrol_ek, f"{round_number}-{i}", "test") for i in range(4)]

        results = race([*consumers, *writers])[: len(consumers)]

        outcomes.append(results.count(True))
        if outcomes[-1] != 1:
            break
    assert outcomes == [1] * len(outcomes)


def test_racing_replicas_sharing_the_database_let_exactly_one_win(db_path: Path) -> None:
    replicas = [AuthorityStore(db_path) for _ in range(4)]
    try:
        for round_number in range(10):
            nonce = round_number.to_bytes(32, "big")
            replicas[0].add_nonce(NODE, nonce, time.time() + 30)

            results = race([partial(replica.consume_nonce, NODE, nonce) for replica in replicas])

            assert results.count(True) == 1, f"round {round_number}: {results}"
    finally:
        for replica in replicas:
            replica.close()


# --- answered requests --------------------------------------------------------------------------


def test_an_answered_request_gets_the_same_reply_again(store: AuthorityStore) -> None:
    digest = "0f" * 32

    assert store.answered_reply(NODE, digest) is None
    store.remember_reply(NODE, digest, b"signed reply bytes", keep_seconds=600)

    assert store.answered_reply(NODE, digest) == b"signed reply bytes"
    assert store.answered_reply(NODE, digest) == b"signed reply bytes"


def test_answered_replies_are_kept_per_node(store: AuthorityStore) -> None:
    digest = "0f" * 32
    store.remember_reply(NODE, digest, b"for node", keep_seconds=600)

    assert store.answered_reply(OTHER_NODE, digest) is None
    store.remember_reply(OTHER_NODE, digest, b"for other", keep_seconds=600)
    assert store.answered_reply(NODE, digest) == b"for node"
    assert store.answered_reply(OTHER_NODE, digest) == b"for other"


def test_remembering_a_reply_again_replaces_it(store: AuthorityStore) -> None:
    store.remember_reply(NODE, "aa", b"first", keep_seconds=600)
    store.remember_reply(NODE, "aa", b"second", keep_seconds=600)

    assert store.answered_reply(NODE, "aa") == b"second"


# --- nodes --------------------------------------------------------------------------------------


def test_a_node_record_round_trips(store: AuthorityStore) -> None:
    record = node_record()

    store.save_node(record)

    assert store.node(NODE) == record
    assert store.node(OTHER_NODE) is None


def test_saving_a_node_again_replaces_it(store: AuthorityStore) -> None:
    store.save_node(node_record())

    store.save_node(node_record(state=NodeState.FAILED, selectors=("node:tier:hardware",), pcr_indices=(7,)))

    assert store.node(NODE) == node_record(state=NodeState.FAILED, selectors=("node:tier:hardware",),
                                           pcr_indices=(7,))
    assert len(store.nodes()) == 1


def test_nodes_are_listed_by_id(store: AuthorityStore) -> None:
    store.save_node(node_record(OTHER_NODE, ek_hash="cd" * 32))
    store.save_node(node_record(NODE, ek_hash="ab" * 32))

    assert [n.node_id for n in store.nodes()] == [NODE, OTHER_NODE]


def test_node_state_changes_are_stored(store: AuthorityStore) -> None:
    store.save_node(node_record())

    store.set_node_state(NODE, NodeState.STALE)

    saved = store.node(NODE)
    assert saved is not None
    assert saved.state is NodeState.STALE
    assert saved == node_record(state=NodeState.STALE)


def test_a_quote_updates_the_counters_and_its_time(store: AuthorityStore) -> None:
    store.save_node(node_record(last_quote_at=1.0))
    before = time.time()

    store.record_quote(NODE, reset_count=4, restart_count=2, clock=999_999)

    saved = store.node(NODE)
    assert saved is not None
    assert (saved.reset_count, saved.restart_count, saved.clock) == (4, 2, 999_999)
    assert before <= saved.last_quote_at <= time.time()
    assert saved.attested_at == node_record().attested_at


# --- enrolment and profiles ---------------------------------------------------------------------


def test_enrolled_eks_are_remembered(store: AuthorityStore) -> None:
    assert not store.is_enrolled("ab" * 32)

    store.enrol_ek("ab" * 32, "config")
    store.enrol_ek("ab" * 32, "standalone")  # enrolling again is harmless

    assert store.is_enrolled("ab" * 32)
    assert not store.is_enrolled("cd" * 32)


def test_no_node_is_banned_by_default(store: AuthorityStore) -> None:
    assert store.is_banned(NODE) is False


def test_event_log_profiles_hold_sorted_unique_digests(store: AuthorityStore) -> None:
    store.save_profile("default", ["bb", "aa", "bb"], learned_from=NODE)
    store.save_profile("lab", ["cc"], learned_from=OTHER_NODE)

    assert store.profiles() == {"default": frozenset({"aa", "bb"}), "lab": frozenset({"cc"})}

    store.save_profile("default", ["dd"], learned_from=NODE)
    assert store.profiles()["default"] == frozenset({"dd"})
