"""`authority.store`: which store the configuration names, and how vouchd.authority.build opens it
(the PostgreSQL connection string read from a file only its owner may read)."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.postgres import PostgresServer
from vouchd.authority.build import AUTHORITY_DATABASE, open_store
from vouchd.authority.postgres import PostgresStore
from vouchd.authority.sqlite import SqliteStore
from vouchd.authority.store import Store, StoreError
from vouchd.config import AuthorityConfig, StoreConfig, parse_config
from vouchd.errors import ConfigError

pytestmark = pytest.mark.timeout(10)


def authority(tmp_path: Path, store_yaml: str = "") -> AuthorityConfig:
    text = f"""\
        trust_domain: example.org
        authority:
          state_dir: {tmp_path / "authority"}
        {textwrap.indent(textwrap.dedent(store_yaml), "  ")}
        """
    config = parse_config(textwrap.dedent(text), tmp_path / "vouchd.yaml", {})
    assert config.authority is not None
    return config.authority


# --- configuration ----------------------------------------------------------------------------------


def test_the_store_is_sqlite_unless_configured(tmp_path: Path) -> None:
    assert authority(tmp_path).store == StoreConfig(kind="sqlite", dsn_file=None)
    assert authority(tmp_path, "store: {kind: sqlite}").store == StoreConfig()


def test_a_postgres_store_names_its_dsn_file_relative_to_the_configuration(tmp_path: Path) -> None:
    config = authority(tmp_path, "store: {kind: postgres, dsn_file: secrets/authority.dsn}")

    assert config.store == StoreConfig(kind="postgres", dsn_file=tmp_path / "secrets" / "authority.dsn")


@pytest.mark.parametrize(("store_yaml", "message"), [
    ("store: {kind: mysql}", "authority.store.kind: expected one of sqlite, postgres, got 'mysql'"),
    ("store: {kind: postgres}", "authority.store.dsn_file: is required with kind postgres: a file, readable by "
                                "its owner only, holding the PostgreSQL connection string"),
    ("store: {kind: sqlite, dsn_file: a.dsn}", "authority.store.dsn_file: is only for kind postgres"),
    ("store: {kind: postgres, dsn: 'host=db password=x'}", "authority.store.dsn: unknown key"),
    ("store: postgres", "authority.store: expected a mapping, got a string"),
])
def test_a_store_configuration_that_is_wrong_is_refused_naming_its_key(tmp_path: Path, store_yaml: str,
                                                                        message: str) -> None:
    with pytest.raises(ConfigError, match=f"^{tmp_path / 'vouchd.yaml'}: {message}"):
        authority(tmp_path, store_yaml)


# --- opening the configured store -------------------------------------------------------------------


@pytest.fixture
async def closing() -> AsyncIterator[list[Store]]:
    opened: list[Store] = []
    yield opened
    for store in opened:
        await store.close()


async def test_sqlite_is_opened_in_the_state_dir(tmp_path: Path, closing: list[Store]) -> None:
    store = await open_store(authority(tmp_path))
    closing.append(store)

    assert isinstance(store, SqliteStore)
    assert store.path == tmp_path / "authority" / AUTHORITY_DATABASE


def dsn_file(tmp_path: Path, text: str, mode: int = 0o600) -> Path:
    path = tmp_path / "authority.dsn"
    path.write_text(text)
    path.chmod(mode)
    return path


async def test_postgres_is_opened_with_the_connection_string_of_its_file(
        tmp_path: Path, postgres_server: PostgresServer, closing: list[Store]) -> None:
    dsn_file(tmp_path, postgres_server.database() + "\n")

    store = await open_store(authority(tmp_path, "store: {kind: postgres, dsn_file: authority.dsn}"))
    closing.append(store)

    assert isinstance(store, PostgresStore)
    await store.enrol_ek("ab" * 32, "config", now=1.0)
    assert await store.is_enrolled("ab" * 32)


@pytest.mark.parametrize(("make", "message"), [
    (lambda tmp_path: dsn_file(tmp_path, "host=127.0.0.1 port=1 password=hunter2", mode=0o640),
     "cannot read the PostgreSQL connection string: accessible to group or others \\(mode 0640\\), want 0600"),
    (lambda tmp_path: tmp_path / "authority.dsn",
     "cannot read the PostgreSQL connection string: No such file or directory"),
    (lambda tmp_path: dsn_file(tmp_path, " \n"), "the PostgreSQL connection string is empty"),
], ids=["readable by others", "missing", "empty"])
async def test_a_dsn_file_that_cannot_be_used_is_refused_naming_it(tmp_path: Path, make: object,
                                                                   message: str) -> None:
    assert callable(make)
    path = make(tmp_path)

    with pytest.raises(StoreError, match=f"^{path}: {message}$") as caught:
        await open_store(authority(tmp_path, "store: {kind: postgres, dsn_file: authority.dsn}"))

    assert "hunter2" not in str(caught.value)


async def test_a_dsn_file_behind_a_symlink_is_refused(tmp_path: Path) -> None:
    target = dsn_file(tmp_path, "host=127.0.0.1 port=1 password=hunter2")
    link = tmp_path / "link.dsn"
    link.symlink_to(target)

    # An absolute path, as the configuration keeps it (a relative one is resolved against its folder).
    with pytest.raises(StoreError, match=f"^{link}: cannot read the PostgreSQL connection string"):
        await open_store(authority(tmp_path, f"store: {{kind: postgres, dsn_file: {link}}}"))
