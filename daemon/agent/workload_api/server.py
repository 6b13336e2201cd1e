"""The SPIFFE Workload API on a Unix socket (grpclib): the socket and the connections on it.

What each RPC answers is service.py; what a request's decision records is calls.py; who the
caller is, peer.py; what a caller may cost the agent, limits.py, enforced on each connection by
guard.py before grpclib buffers a request; the socket's folder and path checks are shared with the
admin socket (vouchd.unixsockets). WorkloadApiService and SECURITY_HEADER are importable from here too.
"""

from __future__ import annotations

import asyncio
import logging
import weakref
from pathlib import Path

from grpclib.events import RecvRequest, listen

from vouchd import unixsockets
from vouchd.agent.workload_api.errors import WorkloadApiError
from vouchd.agent.workload_api.guard import GuardedServer
from vouchd.agent.workload_api.limits import ConnectionLimits
from vouchd.agent.workload_api.peer import drop_connection, kernel_has_peer_pidfd, peer_transport
from vouchd.agent.workload_api.service import SECURITY_HEADER, WorkloadApiService

__all__ = ["SECURITY_HEADER", "SOCKET_NAME", "WorkloadApiServer", "WorkloadApiService", "check_socket_path"]

SOCKET_NAME = "workload api socket"  # how errors about the socket and its folder name it

_log = logging.getLogger("vouchd.workload_api")


# After an agent restart every workload reconnects at once; asyncio's default backlog of 100 would
# refuse the rest with EAGAIN. The kernel caps this at net.core.somaxconn.
LISTEN_BACKLOG = 4096

class WorkloadApiServer:
    """Serves a WorkloadApiService on a Unix socket that any local process may connect to.

    The socket's folder, and every folder above it, must be safe from other users: owned by root or
    the agent's user, and not writable by group or others unless sticky. Otherwise another user
    could put their own socket at the path and hand workloads a fake bundle. A folder that is not,
    or another process serving at the path, is a SocketPathError at start.

    `limits` bound what each connection and each uid may hold (limits.py; the defaults there).
    """

    def __init__(
        self, service: WorkloadApiService, socket_path: Path, *, limits: ConnectionLimits | None = None
    ) -> None:
        self._service = service
        self._socket_path = Path(socket_path)
        self._limits = limits or ConnectionLimits()
        self._server: GuardedServer | None = None
        self._socket: unixsockets.BoundSocket | None = None
        self._connections: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()
        self._closed = False

    @property
    def socket_path(self) -> Path:
        return self._socket_path

    async def start(self) -> None:
        """Bind the socket (mode 0777: attestation decides, not file modes) and start serving."""
        if self._server is not None or self._closed:
            raise WorkloadApiError("workload api server was already started")
        if not kernel_has_peer_pidfd():
            _log.warning(
                "kernel has no SO_PEERPIDFD (linux 6.5+): workload api callers are pinned by pid, start time "
                "and credentials only, so a process that exits and whose pid is reused by one with the same "
                "uid and gid within the attestation window is not noticed"
            )
        # Any local process may ask; attestation decides.
        bound = unixsockets.bind_unix_socket(self._socket_path, name=SOCKET_NAME, mode=0o777)
        try:
            server = GuardedServer([self._service], self._limits)
            listen(server, RecvRequest, self._track_connection)
            await server.start(sock=bound.socket, backlog=LISTEN_BACKLOG)
        except BaseException:
            bound.socket.close()
            bound.remove_file()
            raise
        self._socket = bound
        self._server = server

    async def close(self) -> None:
        """Stop accepting, end open streams and connections, remove the socket file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        # grpclib cancels the handlers but leaves connections open; dropping them also closes their pidfds.
        await asyncio.gather(*(drop_connection(transport) for transport in list(self._connections)))
        await server.wait_closed()
        if self._socket is not None:
            self._socket.remove_file()

    async def run(self) -> None:
        """Start, serve until cancelled, close: a task for the agent's TaskGroup."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def _track_connection(self, event: RecvRequest) -> None:
        self._connections.add(peer_transport(event.peer))


def check_socket_path(path: Path) -> None:
    """What would stop WorkloadApiServer.start(), checked without binding: the socket's folder, and
    another process serving at the path (SocketPathError).

    The agent calls this before it touches the TPM or the authority, so a second agent, or a folder
    others may write to, is refused at once rather than after a full node attestation.
    """
    unixsockets.check_socket_path(path, name=SOCKET_NAME)
