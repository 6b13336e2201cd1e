"""The admin socket: a registry of commands, one JSON request and one JSON reply per connection.

    -> {"command": "status", "args": {}}
    <- {"result": {...}}        or        <- {"error": "unknown command 'x'"}

Only root and the daemon's own user may ask: the socket is born 0600 in a folder no other user
controls (vouchd.unixsockets), and a connection whose SO_PEERCRED uid is anyone else's is closed
unanswered, should the file mode ever be widened. A command is an async callable taking the
request's `args` object and returning a JSON value; it refuses with a VouchdError
(AdminCommandError, or any other, such as the authority's), whose message is the reply. Nothing
in this module knows what the commands do, so the fleet server's admin socket can serve its own.
No command returns key material.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from vouchd import unixsockets
from vouchd.errors import VouchdError

__all__ = [
    "SOCKET_NAME",
    "AdminClientError",
    "AdminCommand",
    "AdminCommandError",
    "AdminServer",
    "AdminSocketError",
    "admin_request",
    "check_admin_socket_path",
    "without_args",
]

SOCKET_NAME = "admin socket"  # how errors about the socket and its folder name it

_log = logging.getLogger("vouchd.admin")

_MAX_REQUEST_BYTES = 64 * 1024
# A reply may be big: an entry list of 10,000 entries is a few MiB. The bound only stops a runaway.
_MAX_REPLY_BYTES = 64 * 1024 * 1024
_REQUEST_DEADLINE = 10.0  # seconds a connection may take to send its request line
_INTERNAL_ERROR = "internal error (see the agent's log)"
_MAX_NAME_IN_ERROR = 40

AdminCommand = Callable[[dict[str, Any]], Awaitable[object]]


class AdminCommandError(VouchdError):
    """Raised by a command to refuse: its message is the reply's error, word for word."""


class AdminClientError(VouchdError):
    """admin_request got no result: the daemon answered with an error, whose message this carries."""


class AdminSocketError(AdminClientError):
    """The admin socket did not answer with a reply: nothing, too much, or not a reply object."""


def without_args(read: Callable[[], object]) -> AdminCommand:
    """A command that takes no arguments and answers with what `read()` returns (like `status`)."""

    async def command(args: dict[str, Any]) -> object:
        if args:
            raise AdminCommandError(f"takes no arguments, got {', '.join(sorted(args))[:200]}")
        return read()

    return command


def check_admin_socket_path(path: Path) -> None:
    """What would stop AdminServer.start(), checked without binding: the folder, and another daemon
    serving at the path (SocketPathError). The agent calls it before it touches the TPM."""
    unixsockets.check_socket_path(path, name=SOCKET_NAME)


class AdminServer:
    """Answers admin requests on a Unix socket by looking the command up in `commands`."""

    def __init__(self, socket_path: Path, commands: Mapping[str, AdminCommand]) -> None:
        self._path = Path(socket_path)
        self._commands = dict(commands)
        self._euid = os.geteuid()
        self._server: asyncio.AbstractServer | None = None
        self._socket: unixsockets.BoundSocket | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def socket_path(self) -> Path:
        return self._path

    async def start(self) -> None:
        """Bind (refusing an unsafe folder or a live socket, replacing a dead one) and serve."""
        if self._socket is not None:
            raise RuntimeError("admin server was already started")
        bound = unixsockets.bind_unix_socket(self._path, name=SOCKET_NAME, mode=0o600)
        try:
            self._server = await asyncio.start_unix_server(self._connected, sock=bound.socket,
                                                           limit=_MAX_REQUEST_BYTES)
        except BaseException:
            bound.socket.close()
            bound.remove_file()
            raise
        self._socket = bound

    async def close(self) -> None:
        """Stop accepting, end requests still being answered, remove the socket file. Idempotent."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            for handler in list(self._handlers):
                handler.cancel()
            await asyncio.gather(*self._handlers, return_exceptions=True)
            await server.wait_closed()
        if self._socket is not None:
            self._socket.remove_file()

    async def run(self) -> None:
        """Start, serve until cancelled, close: a task for a TaskGroup."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def _connected(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        handler = asyncio.current_task()
        if handler is not None:
            self._handlers.add(handler)
        try:
            if not self._peer_allowed(writer):
                return
            try:
                async with asyncio.timeout(_REQUEST_DEADLINE):
                    line = await reader.readline()
            except ValueError:  # over the stream's limit (_MAX_REQUEST_BYTES)
                reply = _error("request too large")
            else:
                reply = await self._answer(line)
            writer.write(reply.encode() + b"\n")
            await writer.drain()
        except (ConnectionError, TimeoutError):
            pass  # the client went away, or sent no request line in time: nobody to answer
        finally:
            writer.close()
            if handler is not None:
                self._handlers.discard(handler)

    def _peer_allowed(self, writer: asyncio.StreamWriter) -> bool:
        """Root and the daemon's user only, whatever the socket's mode; anyone else gets no answer."""
        sock = writer.get_extra_info("socket")
        try:
            if sock is None:
                raise OSError("connection has no socket")
            peer = unixsockets.socket_peer(sock)
        except OSError as err:
            _log.warning("admin connection closed: its peer is unknown", extra={"reason": str(err)})
            return False
        if peer.uid in (0, self._euid):
            return True
        _log.warning("admin connection refused: not root or the daemon's user",
                     extra={"pid": peer.pid, "uid": peer.uid, "socket": str(self._path)})
        return False

    async def _answer(self, line: bytes) -> str:
        """The reply line (without its newline) to one request line."""
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return _error("request is not JSON")
        if not isinstance(request, dict):
            return _error("request is not a JSON object")
        name = request.get("command")
        if not isinstance(name, str):
            return _error("request names no command")
        command = self._commands.get(name)
        if command is None:
            return _error(f"unknown command {name[:_MAX_NAME_IN_ERROR]!r}")
        args = request.get("args", {})
        if not isinstance(args, dict):
            return _error("args must be a JSON object")
        try:
            # default=str: a value JSON has no type for (a Selector, a Path) is sent as its text.
            return json.dumps({"result": await command(args)}, default=str)
        except VouchdError as err:
            # vouchd's errors are written for operators and never carry a secret (vouchd.errors):
            # the authority's commands refuse with theirs, which this module cannot know.
            return _error(str(err))
        except Exception:
            _log.exception("admin command failed", extra={"command": name})
            return _error(_INTERNAL_ERROR)


def _error(message: str) -> str:
    return json.dumps({"error": message})


async def admin_request(socket_path: Path, command: str, args: Mapping[str, object] | None = None, *,
                        timeout: float = 10.0) -> Any:
    """Ask the daemon behind `socket_path` to run `command`; its result, as JSON decodes it.

    Raises AdminClientError with the daemon's message when it answers with an error, its subclass
    AdminSocketError when it answers with no reply at all, OSError when it cannot be reached,
    TimeoutError after `timeout` seconds.
    """
    request = json.dumps({"command": command, "args": dict(args or {})}).encode() + b"\n"
    if len(request) > _MAX_REQUEST_BYTES:
        raise AdminSocketError(f"request is larger than {_MAX_REQUEST_BYTES // 1024} KiB")
    try:
        async with asyncio.timeout(timeout):
            line = await _exchange(socket_path, request)
    except TimeoutError:
        raise TimeoutError(f"no answer within {timeout:g} s") from None
    if not line:
        raise AdminSocketError("the admin socket closed the connection without answering "
                               "(only root and the daemon's user may ask)")
    try:
        reply = json.loads(line)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AdminSocketError("the admin socket answered with something other than JSON") from None
    if isinstance(reply, dict) and "result" in reply:
        return reply["result"]
    if isinstance(reply, dict) and isinstance(reply.get("error"), str):
        raise AdminClientError(reply["error"])
    raise AdminSocketError("the admin socket answered with something other than a reply")


async def _exchange(socket_path: Path, request: bytes) -> bytes:
    reader, writer = await asyncio.open_unix_connection(os.fspath(socket_path), limit=_MAX_REPLY_BYTES)
    try:
        writer.write(request)
        await writer.drain()
        return await reader.readline()
    except ValueError:  # over the reader's limit
        raise AdminSocketError(f"reply is larger than {_MAX_REPLY_BYTES // (1024 * 1024)} MiB") from None
    finally:
        writer.close()
