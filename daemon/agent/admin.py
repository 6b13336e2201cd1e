"""The admin socket: root-only (mode 0600), one JSON request per line, one JSON reply per line.

It serves `vouchd status` and `vouchd healthcheck`; it never returns key material.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["AdminServer", "admin_request"]

log = logging.getLogger("vouchd.agent.admin")

_MAX_REQUEST_BYTES = 64 * 1024
StatusProvider = Callable[[], dict[str, Any]]


class AdminServer:
    def __init__(self, socket_path: Path, status: StatusProvider) -> None:
        self._path = socket_path
        self._status = status
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        if self._path.is_socket():
            self._path.unlink()
        old_umask = os.umask(0o177)  # the socket is born 0600: no window where others can connect
        try:
            self._server = await asyncio.start_unix_server(self._serve, path=str(self._path),
                                                           limit=_MAX_REQUEST_BYTES)
        finally:
            os.umask(old_umask)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._path.is_socket():
            self._path.unlink()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                line = await reader.readline()
            except ValueError:  # the stream's limit (_MAX_REQUEST_BYTES) was overrun
                reply: dict[str, Any] = {"error": "request too large"}
            else:
                reply = self._dispatch(line)
            writer.write(json.dumps(reply, default=str).encode() + b"\n")
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    def _dispatch(self, line: bytes) -> dict[str, Any]:
        try:
            request = json.loads(line)
        except (UnicodeDecodeError, json.JSONDecodeError):
            return {"error": "request is not JSON"}
        command = request.get("command") if isinstance(request, dict) else None
        if command == "status":
            return {"status": self._status()}
        return {"error": f"unknown command {str(command)[:40]!r}"}


async def admin_request(socket_path: Path, command: str, *, timeout: float = 10.0) -> dict[str, Any]:
    async def exchange() -> dict[str, Any]:
        reader, writer = await asyncio.open_unix_connection(str(socket_path))
        try:
            writer.write(json.dumps({"command": command}).encode() + b"\n")
            await writer.drain()
            reply = json.loads(await reader.readline())
        finally:
            writer.close()
        if not isinstance(reply, dict):
            raise ValueError("admin socket answered with something other than an object")
        return reply

    return await asyncio.wait_for(exchange(), timeout)
