"""Facts of the PostgreSQL store alone: its schema migrations, how it names its database in errors
(never with the password), and that a call runs to its end. The contract it shares with SQLite is
test_store_contract.py. Each test gets a new database on the session's throw-away cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest

from tests import postgres
from tests.postgres import SUPERUSER, PostgresServer
from tests.unit.test_store_contract import NODE, NONCE, NOW, entry
from vouchd.authority.postgres import PostgresStore, describe_dsn
from vouchd.authority.postgres_schema import MIGRATIONS, SCHEMA_VERSION, migrate
from vouchd.authority.store import StoreError

DEADLINE = 10.0
pytestmark = pytest.mark.timeout(DEADLINE)


@pytest.fixture
def dsn(postgres_server: PostgresServer) -> str:
    return postgres_server.database()


@pytest.fixture
def where(dsn: str) -> str:
    return describe_dsn(dsn)[0]


@pytest.fixture
async def store(dsn: str) -> AsyncIterator[PostgresStore]:
    opened = await PostgresStore.open(dsn)
    try:
        yield opened
    finally:
        await opened.close()


async def connect(dsn: str) -> psycopg.AsyncConnection[tuple[object, ...]]:
    return await psycopg.AsyncConnection.connect(dsn, autocommit=True, connect_timeout=5)


async def query(dsn: str, statement: str) -> list[tuple[object, ...]]:
    async with await connect(dsn) as connection, connection.cursor() as cursor:
        await cursor.execute(statement.encode())
        return await cursor.fetchall() if cursor.description else []


# --- naming the database ----------------------------------------------------------------------------


@pytest.mark.parametrize(("dsn_text", "where", "password"), [
    ("host=db.example.org port=5433 dbname=vouchd user=authority password=s3cret",
     "postgresql://authority@db.example.org:5433/vouchd", "s3cret"),
    ("postgresql://authority:s3cret@db.example.org/vouchd?sslmode=require",
     "postgresql://authority@db.example.org/vouchd", "s3cret"),
    ("dbname=vouchd host=/run/postgresql", "postgresql:///run/postgresql/vouchd", None),
])
def test_the_database_is_named_without_its_password(dsn_text: str, where: str, password: str | None) -> None:
    assert describe_dsn(dsn_text) == (where, password)


async def test_a_connection_string_that_does_not_parse_is_not_shown() -> None:
    with pytest.raises(StoreError, match=r"^postgresql: the connection string does not parse") as caught:
        await PostgresStore.open("host=127.0.0.1 password=hunter2 this-is-no-keyword")

    assert "hunter2" not in str(caught.value)


async def test_a_wrong_password_is_refused_without_showing_it(postgres_server: PostgresServer, dsn: str,
                                                              where: str) -> None:
    wrong = dsn.replace(f"password={postgres_server.password}", "password=not-the-password-42")

    with pytest.raises(StoreError, match=f"^{where}: cannot open the authority database: .*password authentication "
                                         f"failed for user \"{SUPERUSER}\"") as caught:
        await PostgresStore.open(wrong)

    assert "not-the-password-42" not in str(caught.value)
    assert postgres_server.password not in str(caught.value)


async def test_a_server_that_is_not_there_is_named(postgres_server: PostgresServer) -> None:
    with closed_port() as port:
        absent = postgres_server.dsn().replace(f"port={postgres_server.port}", f"port={port}")

        with pytest.raises(StoreError, match=f"^postgresql://{SUPERUSER}@127.0.0.1:{port}/postgres: cannot open the "
                                             "authority database: .*(refused|failed)") as caught:
            await PostgresStore.open(absent, timeout=2)

    assert postgres_server.password not in str(caught.value)


async def test_a_failing_call_names_the_database_and_the_call(store: PostgresStore, dsn: str, where: str) -> None:
    await query(dsn, "DROP TABLE nonces")

    with pytest.raises(StoreError, match=f'^{where}: cannot consume a nonce of node {NODE}: relation "nonces" '
                                         f'does not exist'):
        await store.consume_nonce(NODE, NONCE, now=NOW)


# --- schema migrations ------------------------------------------------------------------------------


async def test_a_new_database_gets_the_latest_schema(store: PostgresStore, dsn: str) -> None:
    assert await query(dsn, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]
    assert len(MIGRATIONS) == SCHEMA_VERSION


async def test_a_database_of_a_newer_schema_version_is_refused_untouched(dsn: str, where: str) -> None:
    await (await PostgresStore.open(dsn)).close()
    newer = SCHEMA_VERSION + 1
    await query(dsn, f"UPDATE meta SET value = '{newer}' WHERE key = 'schema_version'")

    with pytest.raises(StoreError, match=f"^{where}: schema version {newer} is newer than this vouchd knows "
                                         f"\\({SCHEMA_VERSION}\\): it was written by a newer vouchd; "):
        await PostgresStore.open(dsn)
    assert await query(dsn, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(newer),)]


async def test_a_database_whose_schema_version_is_no_version_is_refused(dsn: str, where: str) -> None:
    await (await PostgresStore.open(dsn)).close()
    await query(dsn, "UPDATE meta SET value = 'banana' WHERE key = 'schema_version'")

    with pytest.raises(StoreError, match=f"^{where}: schema version 'banana' is not one this vouchd reads"):
        await PostgresStore.open(dsn)


async def test_a_database_is_migrated_forward_keeping_its_state(dsn: str, where: str) -> None:
    store = await PostgresStore.open(dsn)
    try:
        created = await store.create_entry(entry(), now=NOW)
    finally:
        await store.close()
    later = (*MIGRATIONS, ("CREATE TABLE later_table (id integer PRIMARY KEY)",
                           "INSERT INTO later_table VALUES (7)"))

    async with await connect(dsn) as connection:
        assert await migrate(where, connection, later) == SCHEMA_VERSION
        assert await migrate(where, connection, later) == SCHEMA_VERSION + 1  # nothing left to do

    assert await query(dsn, "SELECT id FROM later_table") == [(7,)]
    assert await query(dsn, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION + 1),)]
    async with await connect(dsn) as connection:
        with pytest.raises(StoreError, match="newer than this vouchd knows"):
            await migrate(where, connection)
    await query(dsn, f"UPDATE meta SET value = '{SCHEMA_VERSION}' WHERE key = 'schema_version'")
    store = await PostgresStore.open(dsn)
    try:
        assert await store.entry("web") == created
    finally:
        await store.close()


async def test_a_step_that_fails_leaves_the_database_at_its_version(store: PostgresStore, dsn: str,
                                                                    where: str) -> None:
    broken = (*MIGRATIONS, ("CREATE TABLE half_done (id integer)", "this is not sql"))

    async with await connect(dsn) as connection:
        with pytest.raises(psycopg.errors.SyntaxError):
            await migrate(where, connection, broken)

    assert await query(dsn, "SELECT to_regclass('half_done') IS NULL") == [(True,)]
    assert await query(dsn, "SELECT value FROM meta WHERE key = 'schema_version'") == [(str(SCHEMA_VERSION),)]


async def test_replicas_opening_a_new_database_together_migrate_it_once(dsn: str) -> None:
    stores = await asyncio.gather(*(PostgresStore.open(dsn) for _ in range(4)))
    try:
        await stores[0].create_entry(entry(), now=NOW)
        assert [await s.entry("web") for s in stores] == [await stores[0].entry("web")] * 4
    finally:
        for opened in stores:
            await opened.close()


# --- calls ------------------------------------------------------------------------------------------


async def test_a_call_whose_caller_is_cancelled_runs_to_its_end(store: PostgresStore, dsn: str) -> None:
    async with await connect(dsn) as locker, locker.transaction():
        await locker.execute("LOCK TABLE nonces IN ACCESS EXCLUSIVE MODE")
        adding = asyncio.create_task(store.add_nonce(NODE, NONCE, NOW + 30, now=NOW))
        await asyncio.sleep(0.2)
        assert not adding.done()
        adding.cancel()
        with pytest.raises(asyncio.CancelledError):
            await adding

    async with asyncio.timeout(DEADLINE / 2):
        assert await store.consume_nonce(NODE, NONCE, now=NOW)


async def test_closing_finishes_the_calls_already_made(dsn: str) -> None:
    store = await PostgresStore.open(dsn)
    async with await connect(dsn) as locker, locker.transaction():
        await locker.execute("LOCK TABLE nonces IN ACCESS EXCLUSIVE MODE")
        adding = asyncio.create_task(store.add_nonce(NODE, NONCE, NOW + 30, now=NOW))
        await asyncio.sleep(0.2)
        closing = asyncio.create_task(store.close())
        await asyncio.sleep(0.2)
        assert not closing.done()
    async with asyncio.timeout(DEADLINE / 2):
        await adding
        await closing

    with pytest.raises(StoreError, match="the store is closed"):
        await store.consume_nonce(NODE, NONCE, now=NOW)
    assert await query(dsn, "SELECT count(*) FROM nonces") == [(1,)]


@pytest.mark.timeout(60)
async def test_a_server_that_goes_away_fails_calls_until_it_is_back() -> None:
    # A cluster of its own: this one is shut down halfway.
    server = await asyncio.to_thread(postgres.start)
    try:
        dsn = server.database()
        where = describe_dsn(dsn)[0]
        store = await PostgresStore.open(dsn, timeout=2)
        try:
            await store.add_nonce(NODE, NONCE, NOW + 30, now=NOW)
            await asyncio.to_thread(server.shut_down)

            with pytest.raises(StoreError, match=f"^{where}: cannot consume a nonce of node {NODE}: "):
                await store.consume_nonce(NODE, NONCE, now=NOW)

            await asyncio.to_thread(server.start_again)
            async with asyncio.timeout(20):
                while True:  # the pool reconnects in the background, with a backoff
                    try:
                        assert await store.consume_nonce(NODE, NONCE, now=NOW) is True
                        break
                    except StoreError:
                        await asyncio.sleep(0.2)
        finally:
            await store.close()
    finally:
        await asyncio.to_thread(server.stop)


async def test_lists_come_in_byte_order_whatever_the_database_collation(postgres_server: PostgresServer) -> None:
    name = f"icu_{secrets.token_hex(4)}"
    try:
        await query(postgres_server.dsn(), f"CREATE DATABASE {name} TEMPLATE template0 LOCALE_PROVIDER icu "
                                           f"ICU_LOCALE 'en-US' LOCALE 'C'")
    except psycopg.Error as err:
        pytest.skip(f"this PostgreSQL cannot make an ICU database: {err}")
    store = await PostgresStore.open(postgres_server.dsn(name))
    try:
        for entry_id in ("alpha", "Bravo", "charlie"):
            await store.create_entry(entry(entry_id), now=NOW)

        # en-US would sort alpha, Bravo, charlie; SQLite and Python sort by code point.
        assert [e.id for e in await store.entries()] == ["Bravo", "alpha", "charlie"]
    finally:
        await store.close()


@contextlib.contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port nothing listens on, held bound (not listening) so that nothing else takes it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as held:
        held.bind(("127.0.0.1", 0))
        yield held.getsockname()[1]
