"""The admin socket: root-only, one JSON request and one JSON reply per line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import stat
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from vouchd.agent.admin import AdminServer, admin_request

DEADLINE = 5.0
STATUS: dict[str, Any] = {"trust_domain": "example.org", "mode": "standalone", "ready": True, "svids": []}


class StatusProvider:
    """Counts how often the server asked, so a test can tell a reply from a cached or invented one."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        return {**STATUS, "calls": self.calls}


@pytest.fixture
def socket_path(tmp_path: Path) -> Path:
    return tmp_path / "run" / "vouchd" / "admin.sock"


@contextlib.asynccontextmanager
async def serving(socket_path: Path, status: StatusProvider | None = None) -> AsyncIterator[AdminServer]:
    server = AdminServer(socket_path, status or StatusProvider())
    await server.start()
    try:
        yield server
    finally:
        await server.close()


async def raw_exchange(socket_path: Path, request: bytes) -> bytes:
    """Send bytes as they are and return the reply line (b"" if the server hung up without one)."""
    async with asyncio.timeout(DEADLINE):
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        try:
            writer.write(request)
            with contextlib.suppress(ConnectionError):
                await writer.drain()
            try:
                return await reader.readline()
            except ConnectionError:
                return b""
        finally:
            writer.close()


async def test_status_is_served_over_the_socket(socket_path: Path) -> None:
    provider = StatusProvider()

    async with serving(socket_path, provider):
        first = await admin_request(socket_path, "status", timeout=DEADLINE)
        second = await admin_request(socket_path, "status", timeout=DEADLINE)

    assert first == {"status": {**STATUS, "calls": 1}}
    assert second == {"status": {**STATUS, "calls": 2}}


async def test_the_socket_is_private_to_its_owner(socket_path: Path) -> None:
    async with serving(socket_path):
        assert stat.S_ISSOCK(socket_path.stat().st_mode)
        assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600


async def test_an_unknown_command_is_answered_with_an_error(socket_path: Path) -> None:
    provider = StatusProvider()

    async with serving(socket_path, provider):
        reply = await admin_request(socket_path, "shutdown", timeout=DEADLINE)

    assert reply == {"error": "unknown command 'shutdown'"}
    assert provider.calls == 0


@pytest.mark.parametrize(
    ("request_line", "reply"),
    [
        (b"status\n", {"error": "request is not JSON"}),
        (b"\xff\xfe\n", {"error": "request is not JSON"}),
        (b"\n", {"error": "request is not JSON"}),
        (b'["status"]\n', {"error": "unknown command 'None'"}),
        (b'{"cmd": "status"}\n', {"error": "unknown command 'None'"}),
        (b'{"command": ["status"]}\n', {"error": "unknown command \"['status']\""}),
        (b'{"command": "' + b"x" * 100 + b'"}\n', {"error": f"unknown command {'x' * 40!r}"}),
    ],
)
async def test_malformed_requests_get_an_error_reply(socket_path: Path, request_line: bytes,
                                                     reply: dict[str, str]) -> None:
    async with serving(socket_path):
        answer = await raw_exchange(socket_path, request_line)

    assert answer.endswith(b"\n")
    assert json.loads(answer) == reply


async def test_an_oversize_request_is_answered_with_an_error(socket_path: Path) -> None:
    async with serving(socket_path):
        answer = await raw_exchange(socket_path, b'{"command": "' + b"x" * (70 * 1024) + b'"}\n')

    assert json.loads(answer or b"null") == {"error": "request too large"}


async def test_the_server_keeps_serving_after_a_bad_request(socket_path: Path) -> None:
    async with serving(socket_path):
        await raw_exchange(socket_path, b"garbage\n")
        reply = await admin_request(socket_path, "status", timeout=DEADLINE)

    assert "status" in reply


async def test_close_removes_the_socket(socket_path: Path) -> None:
    async with serving(socket_path):
        assert socket_path.exists()

    assert not socket_path.exists()


async def test_start_replaces_a_socket_left_behind_by_a_crash(socket_path: Path) -> None:
    socket_path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left_behind:
        left_behind.bind(str(socket_path))  # closing does not unlink: the file stays, as after a crash

    async with serving(socket_path):
        reply = await admin_request(socket_path, "status", timeout=DEADLINE)

    assert "status" in reply


async def test_a_request_to_a_missing_socket_raises_oserror(socket_path: Path) -> None:
    with pytest.raises(OSError):
        await admin_request(socket_path, "status", timeout=DEADLINE)


async def test_a_reply_that_is_not_an_object_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "fake.sock"

    async def answer_with_a_list(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(b"[1, 2]\n")
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(answer_with_a_list, path=str(path))
    try:
        with pytest.raises(ValueError, match=r"^admin socket answered with something other than an object$"):
            await admin_request(path, "status", timeout=DEADLINE)
    finally:
        server.close()
        await server.wait_closed()
