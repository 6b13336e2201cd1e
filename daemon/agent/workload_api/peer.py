"""Who is on the other end of a Workload API connection, according to the kernel.

SO_PEERCRED gives the pid, uid and gid the caller had when it connected. SO_PEERPIDFD (Linux 6.5+)
gives a pidfd for that same process: unlike a pid it cannot be recycled, so after attestation we can
tell whether the process that was attested is still the one alive (DESIGN §6).

The pidfd belongs to the connection: it is taken once, on the connection's first request, and closed
when the connection is lost. To get a hook on "connection lost" without patching grpclib, the
connection's asyncio protocol is wrapped (public asyncio API: transport.set_protocol) by a
_PinnedConnection that holds the pidfd, closes it in connection_lost and otherwise forwards every
call to grpclib's protocol. The wrapper is the cache: later requests on the same connection find it
with transport.get_protocol().

Whether the kernel has SO_PEERPIDFD is decided once per process (kernel_has_peer_pidfd). Where it
has it, a connection whose pidfd cannot be taken is refused: Linux 6.5-6.14 answer EINVAL when the
caller has already exited, so treating EINVAL as "no support" would let an exited caller fall back
to the weaker pinning below.

Without SO_PEERPIDFD (kernels before 6.5) the pid is all there is, and a pid can be recycled between
connect() and the moment /proc/<pid> is read. Two checks narrow that window to a process that also
runs with the caller's credentials: the effective uid and gid in /proc/<pid>/status must equal the
ones SO_PEERCRED recorded at connect(), and the start time read right after SO_PEERCRED must be read
again, unchanged, after attestation (process_unchanged). WorkloadApiServer warns once at start when
the kernel cannot pin callers.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import os
import select
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from grpclib.protocol import Peer
from grpclib.server import Stream

from vouchd.agent.workload_api.errors import PeerError
from vouchd.attestors.base import WorkloadProcess
from vouchd.attestors.errors import ProcessInfoError
from vouchd.attestors.workload.fingerprint import ProcessTraits, effective_ids
from vouchd.attestors.workload.procfs import PROC_ROOT, read_process_credentials, read_process_stat

__all__ = [
    "SO_PEERPIDFD",
    "PeerCredentials",
    "SocketOptions",
    "describe_peer",
    "drop_connection",
    "kernel_has_peer_pidfd",
    "peer_credentials",
    "peer_pidfd",
    "peer_process",
    "peer_transport",
    "probe_peer_pidfd",
    "process_unchanged",
    "socket_credentials",
]

SO_PEERPIDFD = 77  # include/uapi/asm-generic/socket.h; Python's socket module has no constant for it
_UCRED = struct.Struct("3i")  # struct ucred { pid_t pid; uid_t uid; gid_t gid; }
# How a kernel with SO_PEERPIDFD says the peer is gone: EINVAL (6.5-6.14, from pidfd_prepare), ESRCH
# (later kernels), ENODATA (the socket holds no peer process).
_CALLER_GONE = frozenset({errno.EINVAL, errno.ESRCH, errno.ENODATA})


class SocketOptions(Protocol):
    """The part of a socket that pinning reads: a kernel socket, or a fake one in tests."""

    def getsockopt(self, level: int, option: int, /) -> int: ...


def peer_transport(peer: Peer) -> asyncio.BaseTransport:
    """The asyncio transport of a grpclib connection.

    grpclib.protocol.Peer has no public accessor for its transport, and SO_PEERCRED needs the socket:
    this is the one place that reads the private attribute.
    """
    transport: asyncio.BaseTransport = peer._transport
    return transport


@dataclass(frozen=True, slots=True)
class PeerCredentials:
    """What SO_PEERCRED recorded when the caller connected: its pid and its effective uid and gid."""

    pid: int
    uid: int
    gid: int


def peer_credentials(stream: Stream[Any, Any]) -> PeerCredentials:
    """What SO_PEERCRED says about the process that opened the stream's connection; pins nothing.

    Raises PeerError when the connection is gone or is not a Unix socket.
    """
    transport = peer_transport(stream.peer)
    if transport.is_closing():
        raise PeerError("connection closed before the caller was identified")
    return socket_credentials(transport.get_extra_info("socket"))


def peer_process(
    stream: Stream[Any, Any], *, traits: Callable[[int], ProcessTraits] | None = None
) -> tuple[WorkloadProcess, ProcessTraits | None]:
    """The process that opened the stream's connection, pinned by pidfd where the kernel allows; with
    `traits` (read_process_traits), also its traits, read once for both the checks and the caller.

    Raises PeerError when the kernel cannot say who the caller is or the caller is already gone.
    """
    transport = peer_transport(stream.peer)
    if transport.is_closing():
        raise PeerError("connection closed before the caller was identified")
    sock = transport.get_extra_info("socket")
    credentials = socket_credentials(sock)
    if credentials.pid <= 0:
        # 0: the caller lives in a pid namespace this agent cannot see into.
        raise PeerError("kernel reported no pid for the caller")
    pidfd = _pin(transport, sock).pidfd
    if traits is None:
        return describe_peer(credentials, pidfd=pidfd), None
    try:
        read = traits(credentials.pid)
    except ProcessInfoError:
        return describe_peer(credentials, pidfd=pidfd), None  # which says why, if the caller is the matter
    return describe_peer(credentials, pidfd=pidfd, traits=read), read


def describe_peer(
    credentials: PeerCredentials, *, pidfd: int | None = None, proc_root: Path = PROC_ROOT,
    traits: ProcessTraits | None = None,
) -> WorkloadProcess:
    """The process SO_PEERCRED named, checked against what /proc says about the process at that pid now
    (`traits`, when the caller has just read them; else read here).

    Raises PeerError when the process is gone or runs with other credentials than it connected with:
    either the pid was recycled (it matters most without a pidfd), or the process changed its ids
    after connecting and the SO_PEERCRED uid, which selectors are made of, no longer describes it.
    SO_PEERCRED records effective ids, so the effective ids of /proc/<pid>/status are compared.
    """
    pid = credentials.pid
    if pid <= 0:
        raise PeerError("kernel reported no pid for the caller")
    try:
        if traits is None:
            start_time = read_process_stat(pid, proc_root=proc_root).start_time
            current = read_process_credentials(pid, proc_root=proc_root)
            ids = current.effective_uid, current.effective_gid
        else:
            start_time, ids = traits.start_time, effective_ids(traits)
    except ProcessInfoError as err:
        raise PeerError(f"cannot read the caller's process: {err}") from err
    if ids != (credentials.uid, credentials.gid):
        raise PeerError(
            f"process {pid} runs as uid {ids[0]} gid {ids[1]}, "
            f"not the uid {credentials.uid} gid {credentials.gid} it connected with"
        )
    return WorkloadProcess(pid=pid, uid=credentials.uid, gid=credentials.gid, start_time=start_time, pidfd=pidfd)


def process_unchanged(process: WorkloadProcess, *, proc_root: Path = PROC_ROOT, read_stat: bool = True) -> bool:
    """True if the attested process is still alive and is still the one at its pid.

    With a pidfd the check cannot be fooled by pid reuse; without one the start time must match.
    A zombie counts as gone: it can no longer act, so whoever uses its socket is someone else.
    `read_stat=False`: the caller has just read the start time and state (without a pidfd: ignored).
    """
    if process.pidfd is not None and _has_exited(process.pidfd):
        return False
    if not read_stat and process.pidfd is not None:
        return True
    try:
        stat = read_process_stat(process.pid, proc_root=proc_root)
    except ProcessInfoError:
        return False
    return stat.start_time == process.start_time and not stat.is_dead


@functools.cache
def kernel_has_peer_pidfd() -> bool:
    """True if this kernel pins Unix socket peers with SO_PEERPIDFD (Linux 6.5+); asked once per process.

    Raises PeerError when the kernel gives an answer that is neither yes nor "no such option".
    """
    left, right = socket.socketpair(socket.AF_UNIX)
    try:
        return probe_peer_pidfd(left)
    finally:
        left.close()
        right.close()


def probe_peer_pidfd(sock: SocketOptions) -> bool:
    """Whether SO_PEERPIDFD works, asked on a socket whose peer is alive (one end of our own socketpair).

    Only ENOPROTOOPT, the kernel's answer to an option it does not know, means no. Anything else
    is an error: guessing "no" would quietly weaken how every caller is pinned.
    """
    try:
        os.close(sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD))
    except OSError as err:
        if err.errno == errno.ENOPROTOOPT:
            return False
        raise PeerError(f"cannot tell whether the kernel has SO_PEERPIDFD: {err.strerror or err}") from err
    return True


def peer_pidfd(sock: SocketOptions, *, kernel_has_pidfd: bool) -> int | None:
    """A pidfd of the process that connected `sock`, or None when the kernel has no SO_PEERPIDFD.

    `kernel_has_pidfd` is kernel_has_peer_pidfd(). Where the kernel has the option, failing to take
    the pidfd refuses the caller (PeerError): its answers for a caller that already exited (EINVAL,
    ESRCH, ENODATA) must not be mistaken for a kernel that cannot pin.
    """
    if not kernel_has_pidfd:
        return None  # kernel older than 6.5: start time and credentials alone have to do
    try:
        pidfd = sock.getsockopt(socket.SOL_SOCKET, SO_PEERPIDFD)
    except OSError as err:
        if err.errno in _CALLER_GONE:
            raise PeerError("caller exited before it was identified") from err
        raise PeerError(f"cannot pin the caller's process: {err.strerror or err}") from err
    os.set_inheritable(pidfd, False)
    return pidfd


async def drop_connection(transport: asyncio.BaseTransport) -> None:
    """Abort a connection now and return once its pidfd, if any, is closed."""
    protocol = transport.get_protocol()
    if isinstance(transport, asyncio.Transport):
        transport.abort()
    else:
        transport.close()
    if isinstance(protocol, _PinnedConnection):
        await protocol.wait_lost()


def socket_credentials(sock: socket.socket | None) -> PeerCredentials:
    """What SO_PEERCRED says about the process that connected `sock`; PeerError if it cannot say."""
    if sock is None or sock.family != socket.AF_UNIX:
        raise PeerError("caller is not connected over a unix socket")
    try:
        pid, uid, gid = _UCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))
    except OSError as err:
        raise PeerError(f"cannot read the caller's credentials: {err.strerror or err}") from err
    return PeerCredentials(pid=pid, uid=uid, gid=gid)


def _has_exited(pidfd: int) -> bool:
    # A pidfd polls readable once its process has exited; POLLNVAL (a closed fd) also counts as gone.
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def _pin(transport: asyncio.BaseTransport, sock: socket.socket) -> _PinnedConnection:
    protocol = transport.get_protocol()
    if isinstance(protocol, _PinnedConnection):
        return protocol
    if not isinstance(protocol, asyncio.Protocol):
        raise PeerError(f"unexpected connection protocol {type(protocol).__name__}")
    pinned = _PinnedConnection(protocol, peer_pidfd(sock, kernel_has_pidfd=kernel_has_peer_pidfd()))
    transport.set_protocol(pinned)
    return pinned


class _PinnedConnection(asyncio.Protocol):
    """grpclib's protocol for one connection, plus the pidfd of the process that opened it."""

    def __init__(self, inner: asyncio.Protocol, pidfd: int | None) -> None:
        self._inner = inner
        self.pidfd = pidfd
        self._lost = asyncio.Event()

    async def wait_lost(self) -> None:
        await self._lost.wait()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pidfd is not None:
            pidfd, self.pidfd = self.pidfd, None
            os.close(pidfd)
        self._lost.set()
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()
