"""The admin socket: a command registry behind a root-only socket, one JSON request and reply per line."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from vouchd.agent.admin import (
    AdminClientError,
    AdminCommand,
    AdminCommandError,
    AdminServer,
    AdminSocketError,
    admin_request,
    check_admin_socket_path,
    without_args,
)
from vouchd.agent.workloads import WorkloadActivity
from vouchd.decisions import CallerEvidence, Decision, DecisionKind, Outcome
from vouchd.unixsockets import SocketPathError

DEADLINE = 5.0
STATUS: dict[str, Any] = {"trust_domain": "example.org", "mode": "standalone", "ready": True, "svids": []}
NOBODY = 65534


class StatusProvider:
    """Counts how often the server asked, so a test can tell a reply from a cached or invented one."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> dict[str, Any]:
        self.calls += 1
        return {**STATUS, "calls": self.calls}


class Commands:
    """A registry of fake commands that remember what they were asked."""

    def __init__(self) -> None:
        self.status = StatusProvider()
        self.seen_args: list[dict[str, Any]] = []
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    def registry(self) -> dict[str, AdminCommand]:
        return {"status": without_args(self.status), "echo": self.echo, "refuse": self.refuse,
                "crash": self.crash, "hang": self.hang, "entry.list": self.entry_list}

    async def echo(self, args: dict[str, Any]) -> object:
        self.seen_args.append(args)
        return {"args": args}

    async def refuse(self, args: dict[str, Any]) -> object:
        raise AdminCommandError(f"entry {args.get('id')} does not exist")

    async def crash(self, args: dict[str, Any]) -> object:
        raise RuntimeError("secret internals")

    async def hang(self, args: dict[str, Any]) -> object:
        self.started.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.cancelled.set()
        return None  # pragma: no cover

    async def entry_list(self, args: dict[str, Any]) -> object:
        return [{"id": f"{n:036d}", "spiffe_id": f"spiffe://example.org/workload/{n}",
                 "selectors": ["unix:uid:1000", f"unix:path:/usr/bin/service-{n}"]} for n in range(args["count"])]


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="admin-", dir="/tmp") as directory:
        yield Path(directory)


@pytest.fixture
def socket_path(socket_dir: Path) -> Path:
    return socket_dir / "run" / "vouchd" / "admin.sock"


@pytest.fixture
def commands() -> Commands:
    return Commands()


@contextlib.asynccontextmanager
async def serving(socket_path: Path, commands: Mapping[str, AdminCommand]) -> AsyncIterator[AdminServer]:
    server = AdminServer(socket_path, commands)
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


# -- commands -------------------------------------------------------------------------------------------------


async def test_status_is_served_over_the_socket(socket_path: Path, commands: Commands) -> None:
    async with serving(socket_path, commands.registry()):
        first = await admin_request(socket_path, "status", timeout=DEADLINE)
        second = await admin_request(socket_path, "status", timeout=DEADLINE)

    assert first == {**STATUS, "calls": 1}
    assert second == {**STATUS, "calls": 2}


async def test_the_wire_format_is_command_and_args_in_result_out(socket_path: Path, commands: Commands) -> None:
    async with serving(socket_path, commands.registry()):
        answer = await raw_exchange(socket_path, b'{"command": "echo", "args": {"id": "e1", "n": [1, 2]}}\n')
        without_args_answer = await raw_exchange(socket_path, b'{"command": "echo"}\n')

    assert json.loads(answer) == {"result": {"args": {"id": "e1", "n": [1, 2]}}}
    assert json.loads(without_args_answer) == {"result": {"args": {}}}, "no args is an empty object"


async def test_args_reach_the_command(socket_path: Path, commands: Commands) -> None:
    async with serving(socket_path, commands.registry()):
        result = await admin_request(socket_path, "echo", {"spiffe_id": "spiffe://example.org/x"}, timeout=DEADLINE)

    assert result == {"args": {"spiffe_id": "spiffe://example.org/x"}}
    assert commands.seen_args == [{"spiffe_id": "spiffe://example.org/x"}]


async def test_a_refusing_command_answers_with_its_message(socket_path: Path, commands: Commands) -> None:
    async with serving(socket_path, commands.registry()):
        answer = await raw_exchange(socket_path, b'{"command": "refuse", "args": {"id": "e9"}}\n')
        with pytest.raises(AdminClientError, match=r"^entry e9 does not exist$") as refused:
            await admin_request(socket_path, "refuse", {"id": "e9"}, timeout=DEADLINE)

    assert json.loads(answer) == {"error": "entry e9 does not exist"}
    assert not isinstance(refused.value, AdminSocketError), "a refusal is an answer, not a broken socket"


async def test_a_failing_command_is_logged_and_answered_without_its_details(
    socket_path: Path, commands: Commands, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.ERROR, logger="vouchd.admin"):
        async with serving(socket_path, commands.registry()):
            with pytest.raises(AdminClientError) as caught:
                await admin_request(socket_path, "crash", timeout=DEADLINE)
            still_serving = await admin_request(socket_path, "status", timeout=DEADLINE)

    assert str(caught.value) == "internal error (see the agent's log)"
    assert "secret internals" not in str(caught.value)
    (record,) = [r for r in caplog.records if r.name == "vouchd.admin"]
    assert (record.getMessage(), record.__dict__["command"]) == ("admin command failed", "crash")
    assert record.exc_info is not None and str(record.exc_info[1]) == "secret internals"
    assert still_serving["ready"] is True


async def test_a_command_without_args_refuses_some(socket_path: Path, commands: Commands) -> None:
    async with serving(socket_path, commands.registry()):
        with pytest.raises(AdminClientError, match=r"^takes no arguments, got verbose$"):
            await admin_request(socket_path, "status", {"verbose": True}, timeout=DEADLINE)

    assert commands.status.calls == 0


async def test_an_unknown_command_is_answered_with_an_error_naming_it(socket_path: Path, commands: Commands) -> None:
    async with serving(socket_path, commands.registry()):
        with pytest.raises(AdminClientError, match=r"^unknown command 'shutdown'$"):
            await admin_request(socket_path, "shutdown", timeout=DEADLINE)
        with pytest.raises(AdminClientError) as long_name:
            await admin_request(socket_path, "x" * 100, timeout=DEADLINE)

    assert str(long_name.value) == f"unknown command {'x' * 40!r}"
    assert commands.status.calls == 0


@pytest.mark.parametrize(
    ("request_line", "reply"),
    [
        (b"status\n", {"error": "request is not JSON"}),
        (b"\xff\xfe\n", {"error": "request is not JSON"}),
        (b"\n", {"error": "request is not JSON"}),
        (b'["status"]\n', {"error": "request is not a JSON object"}),
        (b'{"cmd": "status"}\n', {"error": "request names no command"}),
        (b'{"command": ["status"]}\n', {"error": "request names no command"}),
        (b'{"command": "echo", "args": ["x"]}\n', {"error": "args must be a JSON object"}),
        (b'{"command": "echo", "args": null}\n', {"error": "args must be a JSON object"}),
    ],
)
async def test_malformed_requests_get_an_error_reply(socket_path: Path, commands: Commands, request_line: bytes,
                                                     reply: dict[str, str]) -> None:
    async with serving(socket_path, commands.registry()):
        answer = await raw_exchange(socket_path, request_line)

    assert answer.endswith(b"\n")
    assert json.loads(answer) == reply
    assert commands.seen_args == []


async def test_an_oversize_request_is_answered_with_an_error(socket_path: Path, commands: Commands) -> None:
    async with serving(socket_path, commands.registry()):
        answer = await raw_exchange(socket_path, b'{"command": "' + b"x" * (70 * 1024) + b'"}\n')

    assert json.loads(answer or b"null") == {"error": "request too large"}


async def test_the_client_does_not_send_an_oversize_request(socket_path: Path) -> None:
    with pytest.raises(AdminSocketError, match=r"^request is larger than 64 KiB$"):
        await admin_request(socket_path, "echo", {"blob": "x" * (64 * 1024)}, timeout=DEADLINE)


async def test_a_large_reply_arrives_whole(socket_path: Path, commands: Commands) -> None:
    async with serving(socket_path, commands.registry()):
        entries = await admin_request(socket_path, "entry.list", {"count": 10_000}, timeout=DEADLINE)

    assert len(entries) == 10_000
    assert entries[-1]["spiffe_id"] == "spiffe://example.org/workload/9999"
    assert len(json.dumps(entries)) > 1024 * 1024, "well over any default stream limit"


async def test_the_server_keeps_serving_after_a_bad_request(socket_path: Path, commands: Commands) -> None:
    async with serving(socket_path, commands.registry()):
        await raw_exchange(socket_path, b"garbage\n")
        reply = await admin_request(socket_path, "status", timeout=DEADLINE)

    assert reply["mode"] == "standalone"


async def test_close_ends_a_command_still_running(socket_path: Path, commands: Commands) -> None:
    server = AdminServer(socket_path, commands.registry())
    await server.start()
    asking = asyncio.create_task(admin_request(socket_path, "hang", timeout=DEADLINE))
    try:
        async with asyncio.timeout(DEADLINE):
            await commands.started.wait()
            await server.close()
            await commands.cancelled.wait()
            with pytest.raises(AdminSocketError, match="closed the connection without answering"):
                await asking
    finally:
        asking.cancel()

    assert not socket_path.exists()


# -- the client's errors --------------------------------------------------------------------------------------


async def test_a_request_to_a_missing_socket_raises_oserror(socket_path: Path) -> None:
    with pytest.raises(OSError):
        await admin_request(socket_path, "status", timeout=DEADLINE)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        (b"[1, 2]\n", "^the admin socket answered with something other than a reply$"),
        (b'{"status": {}}\n', "^the admin socket answered with something other than a reply$"),
        (b'{"error": 3}\n', "^the admin socket answered with something other than a reply$"),
        (b"not json\n", "^the admin socket answered with something other than JSON$"),
        (b"", "^the admin socket closed the connection without answering"),
    ],
)
async def test_an_answer_that_is_not_a_reply_is_refused(socket_dir: Path, answer: bytes, message: str) -> None:
    path = socket_dir / "fake.sock"

    async def answer_with(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readline()
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_unix_server(answer_with, path=str(path))
    try:
        with pytest.raises(AdminSocketError, match=message):
            await admin_request(path, "status", timeout=DEADLINE)
    finally:
        server.close()
        await server.wait_closed()


async def test_a_silent_server_times_out_with_a_message(socket_dir: Path) -> None:
    path = socket_dir / "silent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as silent:
        silent.bind(str(path))
        silent.listen()

        with pytest.raises(TimeoutError, match=r"^no answer within 0.05 s$"):
            await admin_request(path, "status", timeout=0.05)


# -- the socket -----------------------------------------------------------------------------------------------


async def test_the_socket_is_born_private_whatever_the_umask(socket_path: Path, commands: Commands) -> None:
    previous = os.umask(0o000)
    try:
        async with serving(socket_path, commands.registry()):
            assert os.umask(0o000) == 0o000, "the umask is restored after binding"
            assert stat.S_ISSOCK(socket_path.stat().st_mode)
            assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
            assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o755
    finally:
        os.umask(previous)


async def test_close_removes_the_socket(socket_path: Path, commands: Commands) -> None:
    server = AdminServer(socket_path, commands.registry())
    await server.start()
    assert socket_path.exists()

    await server.close()
    await server.close()  # idempotent

    assert not socket_path.exists()


async def test_start_replaces_a_socket_left_behind_by_a_crash(socket_path: Path, commands: Commands) -> None:
    socket_path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as left_behind:
        left_behind.bind(str(socket_path))  # closing does not unlink: the file stays, as after a crash

    async with serving(socket_path, commands.registry()):
        reply = await admin_request(socket_path, "status", timeout=DEADLINE)

    assert reply["calls"] == 1


async def test_a_live_admin_socket_is_refused_and_left_serving(socket_path: Path, commands: Commands) -> None:
    socket_path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other_daemon:
        other_daemon.bind(str(socket_path))
        other_daemon.listen()
        inode = os.lstat(socket_path).st_ino

        with pytest.raises(SocketPathError, match=f"^another process is serving on {socket_path}$"):
            check_admin_socket_path(socket_path)
        with pytest.raises(SocketPathError, match=f"^another process is serving on {socket_path}$"):
            await AdminServer(socket_path, commands.registry()).start()

        assert os.lstat(socket_path).st_ino == inode, "the other daemon's socket is still there"
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.connect(str(socket_path))  # and still reaches it


async def test_a_file_that_is_not_a_socket_is_left_alone(socket_path: Path, commands: Commands) -> None:
    socket_path.parent.mkdir(parents=True)
    socket_path.write_text("precious")

    with pytest.raises(SocketPathError, match=f"^{socket_path} exists and is not a socket$"):
        await AdminServer(socket_path, commands.registry()).start()

    assert socket_path.read_text() == "precious"


@pytest.mark.parametrize("mode", [0o777, 0o1777, 0o770])
async def test_a_folder_others_may_write_to_is_refused(socket_path: Path, commands: Commands, mode: int) -> None:
    socket_path.parent.mkdir(parents=True)
    socket_path.parent.chmod(mode)

    with pytest.raises(SocketPathError, match=f"^admin socket folder {socket_path.parent} is writable by group or"):
        check_admin_socket_path(socket_path)
    with pytest.raises(SocketPathError, match=f"^admin socket folder {socket_path.parent} is writable by group or"):
        await AdminServer(socket_path, commands.registry()).start()

    assert list(socket_path.parent.iterdir()) == []


# -- who may ask --------------------------------------------------------------------------------------------


async def test_a_caller_of_another_user_gets_no_answer_even_if_the_mode_lets_it_in(
    socket_dir: Path, socket_path: Path, commands: Commands, caplog: pytest.LogCaptureFixture
) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can connect as another user")
    socket_dir.chmod(0o755)  # so that the other user can reach the socket at all
    with caplog.at_level(logging.WARNING, logger="vouchd.admin"):
        async with serving(socket_path, commands.registry()):
            socket_path.chmod(0o666)  # the file mode is no longer what keeps others out
            as_nobody = await connect_as(NOBODY, socket_path, b'{"command": "echo", "args": {"n": 1}}\n')
            as_root = await connect_as(0, socket_path, b'{"command": "echo", "args": {"n": 2}}\n')

    assert as_nobody == "answer: b''", "closed without an answer"
    assert as_root == "answer: " + repr(b'{"result": {"args": {"n": 2}}}\n')
    assert commands.seen_args == [{"n": 2}], "the other user's command never ran"
    (refusal,) = [r for r in caplog.records if r.name == "vouchd.admin"]
    assert refusal.getMessage() == "admin connection refused: not root or the daemon's user"
    assert refusal.__dict__["uid"] == NOBODY
    assert refusal.levelno == logging.WARNING


async def connect_as(uid: int, path: Path, request: bytes) -> str:
    """Connect to `path` from a child process running as `uid`; what it received, or why it failed."""
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover (the child)
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(DEADLINE)
                sock.connect(str(path))
                sock.sendall(request)
                received = b""
                with contextlib.suppress(ConnectionResetError):  # closed with our request unread: no answer
                    while chunk := sock.recv(65536):
                        received += chunk
            os.write(write_end, f"answer: {received!r}".encode())
        except BaseException as err:
            os.write(write_end, f"failed: {err!r}".encode())
        finally:
            os._exit(0)
    os.close(write_end)
    try:
        async with asyncio.timeout(DEADLINE + 1):
            return (await asyncio.to_thread(_read_all, read_end)).decode()
    finally:
        os.close(read_end)
        os.waitpid(child, 0)


def _read_all(fd: int) -> bytes:
    data = b""
    while chunk := os.read(fd, 65536):
        data += chunk
    return data


# -- `vouchd status`, end to end ------------------------------------------------------------------------------


FULL_STATUS: dict[str, Any] = {
    "mode": "standalone", "trust_domain": "example.org", "uptime_seconds": 12.5, "ready": True,
    "workload_api_socket": "/run/vouchd/agent.sock", "node": None, "entries": [], "svids": [],
    "tpm_latency_ms": {},
}


async def vouchd(*args: str) -> tuple[int, str, str]:
    """Run the `vouchd` command in a child process; its exit code, stdout and stderr."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "vouchd.cli", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(30):
            out, err = await child.communicate()
    finally:
        if child.returncode is None:
            child.kill()
            await child.wait()
    assert child.returncode is not None
    return child.returncode, out.decode(), err.decode()


async def test_vouchd_status_prints_what_the_status_command_answers(socket_path: Path) -> None:
    activity = WorkloadActivity()
    activity.record(Decision(kind=DecisionKind.DENY, outcome=Outcome.DENIED, at=1_800_000_000.0,
                             source="workload_api", method="FetchX509SVID",
                             reason="no registration entry matches the caller",
                             caller=CallerEvidence(pid=7666, uid=65534)))
    status = {**FULL_STATUS, "workloads": activity.snapshot()}

    async with serving(socket_path, {"status": without_args(lambda: status)}):
        code, json_out, _ = await vouchd("status", "--json", "--admin-socket", str(socket_path))
        text_code, text_out, _ = await vouchd("status", "--admin-socket", str(socket_path))

    assert code == 0 and json.loads(json_out) == status
    assert text_code == 0
    assert "requests: denied 1" in text_out
    assert "FetchX509SVID pid 7666 uid 65534: no registration entry matches the caller" in text_out


async def test_vouchd_status_says_when_the_agent_refuses(socket_path: Path) -> None:
    async def refuse(args: dict[str, Any]) -> object:
        raise AdminCommandError("not ready")

    async with serving(socket_path, {"status": refuse}):
        code, _, err = await vouchd("status", "--admin-socket", str(socket_path))

    assert (code, err) == (1, "vouchd: agent refused the status request: not ready\n")


async def test_vouchd_status_says_when_the_agent_cannot_be_reached(socket_path: Path) -> None:
    code, _, err = await vouchd("status", "--admin-socket", str(socket_path))

    assert code == 1
    assert err.startswith(f"vouchd: cannot reach the agent's admin socket {socket_path}: ")
