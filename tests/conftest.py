"""Fixtures shared by every test tier."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import postgres as postgres_mod
from tests import swtpm as swtpm_mod

os.environ.setdefault("TSS2_LOG", "all+NONE")


@pytest.fixture(scope="session")
def swtpm_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One provisioned TPM state (EK certificates from a local manufacturer CA) per session."""
    if shutil.which("swtpm") is None:
        pytest.fail("swtpm is not installed: run ./scripts/setup")
    state = tmp_path_factory.mktemp("swtpm-state")
    swtpm_mod.provision(state)
    return state


@pytest.fixture(scope="session")
def swtpm(swtpm_state: Path) -> Iterator[swtpm_mod.Swtpm]:
    """A swtpm for the whole session, on a random socket path, stopped by PID at the end."""
    instance = swtpm_mod.start(swtpm_state)
    try:
        yield instance
    finally:
        instance.stop()


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres_mod.PostgresServer]:
    """A throw-away PostgreSQL cluster for the whole session (tests/postgres.py), stopped by PID at the
    end. Where PostgreSQL is not installed its tests skip, saying why; under scripts/test, which sets
    VOUCHD_REQUIRE_POSTGRES=1, they fail instead."""
    reason = postgres_mod.missing_reason()
    if reason is not None:
        if os.environ.get(postgres_mod.REQUIRE_ENV) == "1":
            pytest.fail(f"{reason} ({postgres_mod.REQUIRE_ENV}=1: scripts/test installs it when run as root)")
        pytest.skip(reason)
    server = postgres_mod.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(autouse=True)
def _sigpipe_as_python_sets_it() -> Iterator[None]:
    """`vouchd.cli.main` lets SIGPIPE end a short-lived command quietly, as other CLI tools do; a test
    that calls it in-process must not leave that behind, or a later test writing to a closed socket
    kills the whole run instead of getting BrokenPipeError."""
    before = signal.getsignal(signal.SIGPIPE)
    yield
    signal.signal(signal.SIGPIPE, before)
