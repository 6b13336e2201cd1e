"""The admin commands run by a user the admin socket does not answer: they say who may ask.

A real AdminServer in this process; the `vouchd` command in a child process that setpriv drops to
`nobody`. The socket turns it away by its mode (0600: connect() fails with EACCES) or, with the mode
widened, by closing the connection unanswered; either way the command names who may ask instead of
asking whether the agent runs, and SIGPIPE does not end it silently.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from vouchd.agent.admin import AdminServer, without_args

DEADLINE = 30.0
NOBODY = 65534
STATUS: dict[str, Any] = {"trust_domain": "example.org", "mode": "standalone", "ready": True, "svids": []}

pytestmark = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="needs root and setpriv (util-linux) to run the command as another user")


@pytest.fixture
def socket_path() -> Iterator[Path]:
    # A folder every user may pass, as /run/vouchd is (pytest's own temporary folders are root-only).
    folder = Path(tempfile.mkdtemp(prefix="admin-", dir="/tmp"))
    folder.chmod(0o755)
    try:
        yield folder / "vouchd" / "admin.sock"
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@contextlib.asynccontextmanager
async def serving(path: Path) -> AsyncIterator[list[str]]:
    """The admin socket, answering `status` and `entry.list`; the commands it ran."""
    ran: list[str] = []

    async def entry_list(args: dict[str, Any]) -> object:
        ran.append("entry.list")
        return []

    def status() -> dict[str, Any]:
        ran.append("status")
        return STATUS

    server = AdminServer(path, {"status": without_args(status), "entry.list": entry_list})
    await server.start()
    try:
        yield ran
    finally:
        await server.close()


async def vouchd_as(uid: int, *args: str) -> tuple[int, str, str]:
    """`vouchd ARGS` run as `uid` (and its group, no supplementary groups): exit code, stdout, stderr."""
    drop = [] if uid == 0 else ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups"]
    child = await asyncio.create_subprocess_exec(*drop, sys.executable, "-m", "vouchd.cli", *args,
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(DEADLINE):
            out, err = await child.communicate()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()


def refusal(path: Path) -> str:
    return (f"vouchd: only root or the agent's user (root) may ask the agent through its admin socket {path}; "
            f"this command runs as uid {NOBODY} ({pwd.getpwuid(NOBODY).pw_name}): run it with sudo\n")


async def test_status_as_another_user_says_only_root_or_the_agents_user_may_ask(socket_path: Path) -> None:
    async with serving(socket_path) as ran:
        code, out, err = await vouchd_as(NOBODY, "status", "--admin-socket", str(socket_path))
        entry_code, _, entry_err = await vouchd_as(NOBODY, "entry", "list", "--admin-socket", str(socket_path))

    assert (code, out, err) == (1, "", refusal(socket_path))
    assert (entry_code, entry_err) == (1, refusal(socket_path))
    assert "is the agent running" not in err
    assert ran == []


async def test_with_the_socket_mode_widened_the_unanswered_connection_gets_the_same_words(socket_path: Path) -> None:
    async with serving(socket_path) as ran:
        socket_path.chmod(0o666)  # now the agent, not the mode, turns the caller away
        results = [await vouchd_as(NOBODY, "status", "--admin-socket", str(socket_path)) for _ in range(5)]
        entry = await vouchd_as(NOBODY, "entry", "list", "--json", "--admin-socket", str(socket_path))

    # Five times: the request is written before or after the agent closes; neither may end it by SIGPIPE.
    assert results == [(1, "", refusal(socket_path))] * 5
    assert entry == (1, "", refusal(socket_path))
    assert ran == []


async def test_root_is_answered_and_a_missing_socket_still_asks_whether_the_agent_runs(socket_path: Path) -> None:
    async with serving(socket_path) as ran:
        code, out, _ = await vouchd_as(0, "status", "--json", "--admin-socket", str(socket_path))
    missing_code, _, missing_err = await vouchd_as(NOBODY, "status", "--admin-socket", str(socket_path))

    assert (code, ran) == (0, ["status"])
    assert '"trust_domain": "example.org"' in out
    assert missing_code == 1
    assert missing_err.startswith(f"vouchd: cannot reach the agent's admin socket {socket_path}: ")
    assert "(is the agent running?" in missing_err
