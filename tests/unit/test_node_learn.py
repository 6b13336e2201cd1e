"""`vouchd node learn`: it adds a boot profile to the database of the authority the agent runs, and
never makes a database of its own (run without the agent's environment, the file names another folder)."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from vouchd.authority.sqlite import SqliteStore
from vouchd.cli import main
from vouchd.evidence import build_event_log, simulated_boot_events

T = TypeVar("T")
DEADLINE = 10.0
VARIABLES = ("VOUCHD_TEST_STATE_DIR", "VOUCHD_TEST_EVENT_LOG")


def run(coroutine: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coroutine, DEADLINE))


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A standalone file written as examples/standalone.yaml is: folders from variables, with defaults
    that are not the agent's (under `default/`, which nothing creates)."""
    for name in VARIABLES:
        monkeypatch.delenv(name, raising=False)
    path = tmp_path / "vouchd.yaml"
    path.write_text(textwrap.dedent(f"""\
        trust_domain: example.org
        agent:
          state_dir: ${{VOUCHD_TEST_STATE_DIR:-{tmp_path}/default}}/agent
          tpm: {{tcti: "swtpm:path=/nonexistent/tpm.sock"}}
          event_log: ${{VOUCHD_TEST_EVENT_LOG:-{tmp_path}/default/eventlog.bin}}
        authority:
          state_dir: ${{VOUCHD_TEST_STATE_DIR:-{tmp_path}/default}}/authority
        """))
    return path


@pytest.fixture
def agent_state(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The agent's environment: its state folder, with the database its authority made, and its event log."""
    state = tmp_path / "agent-state"
    run(_close(SqliteStore.open(state / "authority" / "authority.db")))
    log, _ = build_event_log(simulated_boot_events())
    (state / "eventlog.bin").write_bytes(log)
    monkeypatch.setenv("VOUCHD_TEST_STATE_DIR", str(state))
    monkeypatch.setenv("VOUCHD_TEST_EVENT_LOG", str(state / "eventlog.bin"))
    return state


async def _close(opening: Coroutine[Any, Any, SqliteStore]) -> None:
    store = await opening
    await store.close()


async def _profile_names(database: Path) -> list[str]:
    store = await SqliteStore.open(database)
    try:
        return [profile.name for profile in await store.profile_records()]
    finally:
        await store.close()


def test_without_the_agents_state_folder_it_refuses_and_creates_no_database(
        config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    # As from a second shell that has the event log (a real host's default) but not the agent's state folder.
    log, _ = build_event_log(simulated_boot_events())
    (tmp_path / "eventlog.bin").write_bytes(log)
    monkeypatch.setenv("VOUCHD_TEST_EVENT_LOG", str(tmp_path / "eventlog.bin"))

    code = main(["node", "learn", "--config", str(config), "--name", "after-update"])

    out, err = capsys.readouterr()
    assert (code, out) == (1, "")
    assert err == (
        f"vouchd: {tmp_path}/default/authority/authority.db: no authority database (authority.state_dir of "
        f"{config}); `node learn` adds to the database of the authority the agent runs and never creates one; "
        "the file refers to VOUCHD_TEST_STATE_DIR, unset here: set them as the agent has them\n")
    assert not (tmp_path / "default").exists(), "no folder, no database"


def test_with_the_agents_environment_it_adds_the_profile_to_its_database(
        config: Path, agent_state: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["node", "learn", "--config", str(config), "--name", "after-update"])

    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    assert out.startswith("profile 'after-update': ")
    assert run(_profile_names(agent_state / "authority" / "authority.db")) == ["after-update"]


def test_an_event_log_that_is_not_there_is_named_with_the_variables_unset(
        config: Path, agent_state: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    monkeypatch.delenv("VOUCHD_TEST_EVENT_LOG")  # the database is found, the log is not

    code = main(["node", "learn", "--config", str(config)])

    _, err = capsys.readouterr()
    assert code == 1
    assert err == (
        f"vouchd: {tmp_path}/default/eventlog.bin: cannot read the event log (agent.event_log of {config}): "
        "No such file or directory; the file refers to VOUCHD_TEST_EVENT_LOG, unset here: set them as the agent "
        "has them\n")
    assert run(_profile_names(agent_state / "authority" / "authority.db")) == []
