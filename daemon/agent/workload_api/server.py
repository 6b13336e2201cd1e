"""The SPIFFE Workload API on a Unix socket (grpclib): the only part of vouchd that knows gRPC.

Every RPC first checks the security header, then identifies the caller from the kernel (peer.py),
has the agent attest it, and re-checks that the attested process is still the caller. Workloads get
generic status messages; the detail goes to the log, one structured line per request, and to the
agent's WorkloadApiObserver if it has one.

FetchX509Bundles is answered only to a caller entitled to an identity (some registration entry
matches it), as SPIRE's agent does unless `allow_unauthenticated_verifiers` is set: otherwise
PermissionDenied "no identity issued", also when the entitlement goes away while the stream is open.
vouchd has no such switch: a verify-only workload gets an entry like any other.
FetchX509SVID's federated_bundles carries the bundles of every trust domain other than those of
the SVIDs in the message.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
import time
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from grpclib.const import Status
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Server, Stream

from vouchd.agent.workload_api.errors import NoIdentityError, PeerError, WorkloadApiError
from vouchd.agent.workload_api.identities import (
    RequestOutcome,
    WorkloadApiObserver,
    WorkloadIdentities,
    X509SvidMaterial,
)
from vouchd.agent.workload_api.peer import (
    drop_connection,
    kernel_has_peer_pidfd,
    peer_credentials,
    peer_process,
    peer_transport,
    process_unchanged,
)
from vouchd.attestors.base import WorkloadProcess
from vouchd.attestors.errors import AttestorError
from vouchd.proto import workload_pb2 as pb
from vouchd.proto.workload_grpc import SpiffeWorkloadAPIBase
from vouchd.selectors import Selector

__all__ = ["SECURITY_HEADER", "WorkloadApiServer", "WorkloadApiService", "check_socket_path"]

SECURITY_HEADER = "workload.spiffe.io"

_log = logging.getLogger("vouchd.workload_api")

_ATTESTATION_FAILED = "workload attestation failed"
_NO_IDENTITY = "no identity issued"
_UNIDENTIFIED = -1  # pid and uid of a caller the request ended before identifying

# The outcome on the log line (precise, for grepping) -> the outcome an observer is told.
_OBSERVED_OUTCOMES = {
    "ok": "ok",
    "attestation_failed": "denied",
    "no_identity": "denied",
    "invalid_argument": "invalid",
    "unimplemented": "invalid",
    "unavailable": "error",
    "error": "error",
}


class _RefusedError(Exception):
    """Ends a request with a status; `public` goes to the workload, `detail` only to the log."""

    def __init__(self, status: Status, outcome: str, public: str, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.outcome = outcome
        self.public = public
        self.detail = detail

    @classmethod
    def attestation_failed(cls, detail: str) -> _RefusedError:
        return cls(Status.PERMISSION_DENIED, "attestation_failed", _ATTESTATION_FAILED, detail)

    @classmethod
    def no_identity(cls, detail: str) -> _RefusedError:
        return cls(Status.PERMISSION_DENIED, "no_identity", _NO_IDENTITY, detail)


@dataclass
class _Call:
    """What the log line of one request says; filled in as the request proceeds."""

    method: str
    started: float = field(default_factory=time.monotonic)
    pid: int | None = None
    uid: int | None = None
    spiffe_ids: tuple[str, ...] = ()
    answered: bool = False  # a stream sent its first message: later lines describe the stream's end

    def identify(self, stream: Stream[Any, Any]) -> None:
        """Fill in pid and uid from SO_PEERCRED alone, for a request refused before attestation."""
        try:
            credentials = peer_credentials(stream)
        except PeerError:
            return
        self.pid, self.uid = credentials.pid, credentials.uid

    def fields(self, outcome: str, reason: str | None) -> dict[str, object]:
        extra: dict[str, object] = {
            "method": self.method,
            "pid": self.pid,
            "uid": self.uid,
            "outcome": outcome,
            "duration_ms": round((time.monotonic() - self.started) * 1000, 3),
            "spiffe_ids": list(self.spiffe_ids),
        }
        if reason is not None:
            extra["reason"] = reason
        return extra


@dataclass(frozen=True)
class _X509SvidSet:
    """Everything one FetchX509SVID message carries; equal sets are not sent twice."""

    svids: tuple[X509SvidMaterial, ...]
    federated_bundles: tuple[tuple[str, bytes], ...]

    def message(self) -> pb.X509SVIDResponse:
        return pb.X509SVIDResponse(
            svids=[
                pb.X509SVID(
                    spiffe_id=svid.spiffe_id,
                    x509_svid=svid.cert_chain_der,
                    x509_svid_key=svid.private_key_der,
                    bundle=svid.bundle_der,
                    hint=svid.hint,
                )
                for svid in self.svids
            ],
            federated_bundles=dict(self.federated_bundles),
        )


class WorkloadApiService(SpiffeWorkloadAPIBase):
    """The SpiffeWorkloadAPI service, answering from a WorkloadIdentities.

    `attest_deadline` (seconds) is the one bound on attesting a caller: identities.attest() has no
    deadline of its own and is cancelled when this one passes; the caller gets PermissionDenied.
    `observer` is told every request's outcome and every stream's opening and closing.
    """

    def __init__(
        self,
        identities: WorkloadIdentities,
        *,
        attest_deadline: float = 5.0,
        logger: logging.Logger | None = None,
        observer: WorkloadApiObserver | None = None,
    ) -> None:
        if attest_deadline <= 0:
            raise ValueError(f"attest_deadline must be positive, got {attest_deadline}")
        self._identities = identities
        self._attest_deadline = attest_deadline
        self._log = logger or logging.getLogger("vouchd.workload_api")
        self._observer = observer

    # -- X.509-SVID profile -------------------------------------------------------------------------

    async def FetchX509SVID(self, stream: Stream[pb.X509SVIDRequest, pb.X509SVIDResponse]) -> None:  # noqa: N802 (name fixed by the proto)
        async with self._request(stream, "FetchX509SVID") as call:
            await stream.recv_message()
            process, selectors = await self._attest(stream, call)
            version = self._identities.version
            current = await self._x509_svid_set(selectors)
            await stream.send_message(current.message())
            self._answered(call, tuple(svid.spiffe_id for svid in current.svids))
            with self._open_stream(call):
                while True:
                    version = await self._identities.wait_for_change(version)
                    self._recheck(process)
                    latest = await self._x509_svid_set(selectors)
                    if latest != current:
                        await stream.send_message(latest.message())
                        current = latest
                        call.spiffe_ids = tuple(svid.spiffe_id for svid in current.svids)
                        self._log.debug("x509 svid update sent", extra=call.fields("updated", None))

    async def FetchX509Bundles(self, stream: Stream[pb.X509BundlesRequest, pb.X509BundlesResponse]) -> None:  # noqa: N802 (name fixed by the proto)
        async with self._request(stream, "FetchX509Bundles") as call:
            await stream.recv_message()
            process, selectors = await self._attest(stream, call)
            version = self._identities.version
            self._require_entitlement(selectors)
            current = self._x509_bundles()
            await stream.send_message(pb.X509BundlesResponse(bundles=dict(current)))
            self._answered(call)
            with self._open_stream(call):
                while True:
                    version = await self._identities.wait_for_change(version)
                    self._recheck(process)
                    self._require_entitlement(selectors)
                    latest = self._x509_bundles()
                    if latest != current:
                        await stream.send_message(pb.X509BundlesResponse(bundles=dict(latest)))
                        current = latest
                        self._log.debug("x509 bundles update sent", extra=call.fields("updated", None))

    # -- not served yet (a later change adds JWT): answered at once, without header check or
    # attestation, because nothing is handed out; SO_PEERCRED is read only to say who asked -------------

    async def FetchJWTSVID(self, stream: Stream[pb.JWTSVIDRequest, pb.JWTSVIDResponse]) -> None:  # noqa: N802 (name fixed by the proto)
        self._unimplemented(stream, "FetchJWTSVID")

    async def FetchJWTBundles(self, stream: Stream[pb.JWTBundlesRequest, pb.JWTBundlesResponse]) -> None:  # noqa: N802 (name fixed by the proto)
        self._unimplemented(stream, "FetchJWTBundles")

    async def ValidateJWTSVID(  # noqa: N802 (name fixed by the proto)
        self, stream: Stream[pb.ValidateJWTSVIDRequest, pb.ValidateJWTSVIDResponse]
    ) -> None:
        self._unimplemented(stream, "ValidateJWTSVID")

    async def FetchWITSVID(self, stream: Stream[pb.WITSVIDRequest, pb.WITSVIDResponse]) -> None:  # noqa: N802 (name fixed by the proto)
        self._unimplemented(stream, "FetchWITSVID")

    async def FetchWITBundles(self, stream: Stream[pb.WITBundlesRequest, pb.WITBundlesResponse]) -> None:  # noqa: N802 (name fixed by the proto)
        self._unimplemented(stream, "FetchWITBundles")

    def _unimplemented(self, stream: Stream[Any, Any], method: str) -> None:
        call = _Call(method)
        call.identify(stream)
        reason = f"{method} is not implemented"
        self._log.info("workload api request", extra=call.fields("unimplemented", None))
        self._finished(call, "unimplemented", reason)
        raise GRPCError(Status.UNIMPLEMENTED, reason)

    # -- shared steps ---------------------------------------------------------------------------------

    @asynccontextmanager
    async def _request(self, stream: Stream[Any, Any], method: str) -> AsyncIterator[_Call]:
        """Header check, error mapping and the request's log line, around one RPC."""
        call = _Call(method)
        try:
            if stream.metadata is None or stream.metadata.get(SECURITY_HEADER) != "true":
                call.identify(stream)
                raise _RefusedError(
                    Status.INVALID_ARGUMENT,
                    "invalid_argument",
                    "security header missing from request",
                    f"no {SECURITY_HEADER}: true metadata",
                )
            yield call
        except _RefusedError as refusal:
            # A workload without an entry retries with backoff: routine, not a warning.
            level = logging.INFO if refusal.outcome == "no_identity" else logging.WARNING
            self._log.log(
                level,
                "workload api request" if not call.answered else "workload api stream ended",
                extra=call.fields(refusal.outcome, refusal.detail),
            )
            self._finished(call, refusal.outcome, refusal.detail)
            raise GRPCError(refusal.status, refusal.public) from None
        except (asyncio.CancelledError, StreamTerminatedError):
            # The client went away (or the server is closing): routine for long-lived streams, and
            # no decision for an observer.
            level = logging.DEBUG if call.answered else logging.INFO
            self._log.log(level, "workload api request cancelled", extra=call.fields("cancelled", None))
            raise
        except Exception as err:
            self._log.error(
                "workload api request failed",
                exc_info=err,
                extra=call.fields("error", type(err).__name__),
            )
            self._finished(call, "error", type(err).__name__)
            raise GRPCError(Status.UNAVAILABLE, "workload api unavailable") from None

    @contextmanager
    def _open_stream(self, call: _Call) -> Iterator[None]:
        """Tell the observer a stream is open for as long as the body runs (connected workloads)."""
        pid = _UNIDENTIFIED if call.pid is None else call.pid
        uid = _UNIDENTIFIED if call.uid is None else call.uid
        self._observe("stream_opened", lambda observer: observer.stream_opened(call.method, pid, uid))
        try:
            yield
        finally:
            self._observe("stream_closed", lambda observer: observer.stream_closed(call.method, pid, uid))

    def _finished(self, call: _Call, outcome: str, reason: str) -> None:
        outcome_seen = RequestOutcome(
            method=call.method,
            pid=_UNIDENTIFIED if call.pid is None else call.pid,
            uid=_UNIDENTIFIED if call.uid is None else call.uid,
            outcome=_OBSERVED_OUTCOMES.get(outcome, "error"),
            reason=reason,
            spiffe_ids=call.spiffe_ids,
            at=time.time(),
        )
        self._observe("request_finished", lambda observer: observer.request_finished(outcome_seen))

    def _observe(self, event: str, notify: Callable[[WorkloadApiObserver], None]) -> None:
        if self._observer is None:
            return
        try:
            notify(self._observer)
        except Exception as err:
            # Observing must never change what a workload gets, nor end its stream.
            self._log.error("workload api observer failed", exc_info=err, extra={"observer_event": event})

    async def _attest(self, stream: Stream[Any, Any], call: _Call) -> tuple[WorkloadProcess, frozenset[Selector]]:
        try:
            process = peer_process(stream)
        except PeerError as err:
            call.identify(stream)  # the log and `vouchd status` still name who was refused
            raise _RefusedError.attestation_failed(str(err)) from err
        call.pid, call.uid = process.pid, process.uid
        try:
            async with asyncio.timeout(self._attest_deadline):
                selectors = await self._identities.attest(process)
        except AttestorError as err:
            raise _RefusedError.attestation_failed(str(err)) from err
        except TimeoutError as err:
            raise _RefusedError.attestation_failed(f"no attestation within {self._attest_deadline:g}s") from err
        self._recheck(process)
        return process, selectors

    def _require_entitlement(self, selectors: frozenset[Selector]) -> None:
        if not self._identities.entitled(selectors):
            raise _RefusedError.no_identity("no registration entry matches the caller's selectors")

    @staticmethod
    def _recheck(process: WorkloadProcess) -> None:
        # The caller can exit (or be replaced at its pid) while it is being attested or while its
        # stream is open: what was attested must still be what is connected.
        if not process_unchanged(process):
            raise _RefusedError.attestation_failed(f"process {process.pid} exited or changed after attestation")

    async def _x509_svid_set(self, selectors: frozenset[Selector]) -> _X509SvidSet:
        try:
            svids = _with_unique_hints(await self._identities.x509_svids(selectors), self._log)
        except NoIdentityError as err:
            raise _RefusedError.no_identity(str(err)) from err
        if not svids:
            raise _RefusedError.no_identity("no x509 svid for the caller's selectors")
        own_trust_domains = {svid.trust_domain_id for svid in svids}
        federated = tuple(
            sorted((td, der) for td, der in self._identities.x509_bundles().items() if td not in own_trust_domains)
        )
        return _X509SvidSet(svids, federated)

    def _x509_bundles(self) -> tuple[tuple[str, bytes], ...]:
        bundles = tuple(sorted(self._identities.x509_bundles().items()))
        if not bundles:
            raise _RefusedError(Status.UNAVAILABLE, "unavailable", "trust bundle not available", "no x509 bundles")
        return bundles

    def _answered(self, call: _Call, spiffe_ids: tuple[str, ...] = ()) -> None:
        call.answered = True
        call.spiffe_ids = spiffe_ids
        self._log.info("workload api request", extra=call.fields("ok", None))
        self._finished(call, "ok", "")


def _with_unique_hints(svids: Sequence[X509SvidMaterial], log: logging.Logger) -> tuple[X509SvidMaterial, ...]:
    # The spec makes the server responsible for unique hints; like SPIRE, keep the first SVID that
    # carries a hint and drop later ones, so clients picking "the one with hint X" stay unambiguous.
    seen: set[str] = set()
    kept: list[X509SvidMaterial] = []
    for svid in svids:
        if svid.hint and svid.hint in seen:
            log.warning("dropping x509 svid %s: hint %r is already used", svid.spiffe_id, svid.hint)
            continue
        seen.add(svid.hint)
        kept.append(svid)
    return tuple(kept)


class WorkloadApiServer:
    """Serves a WorkloadApiService on a Unix socket that any local process may connect to.

    The socket's folder, and every folder above it, must be safe from other users: owned by root or
    the agent's user, and not writable by group or others unless sticky. Otherwise another user
    could put their own socket at the path and hand workloads a fake bundle.
    """

    def __init__(self, service: WorkloadApiService, socket_path: Path) -> None:
        self._service = service
        self._socket_path = Path(socket_path)
        self._server: Server | None = None
        self._socket_file: tuple[int, int] | None = None  # (st_dev, st_ino) of the socket we bound
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
        sock = self._bind()
        try:
            server = Server([self._service])
            listen(server, RecvRequest, self._track_connection)
            await server.start(sock=sock)
        except BaseException:
            sock.close()
            self._remove_socket_file()
            raise
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
        self._remove_socket_file()

    async def run(self) -> None:
        """Start, serve until cancelled, close: a task for the agent's TaskGroup."""
        await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def _track_connection(self, event: RecvRequest) -> None:
        self._connections.add(peer_transport(event.peer))

    def _bind(self) -> socket.socket:
        path = self._socket_path
        _make_folder(path.parent)
        _check_socket_folder(path.parent)
        _remove_stale_socket(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(os.fspath(path))
            os.chmod(path, 0o777)  # noqa: S103 (any local process may ask; attestation decides)
            bound = os.stat(path)
        except OSError as err:
            sock.close()
            raise WorkloadApiError(f"cannot bind workload api socket {path}: {err.strerror or err}") from err
        self._socket_file = (bound.st_dev, bound.st_ino)
        return sock

    def _remove_socket_file(self) -> None:
        if self._socket_file is None:
            return
        identity, self._socket_file = self._socket_file, None
        try:
            current = os.lstat(self._socket_path)
        except FileNotFoundError:
            return
        # Only our own socket: another agent may have replaced it since.
        if (current.st_dev, current.st_ino) == identity:
            self._socket_path.unlink(missing_ok=True)


def check_socket_path(path: Path) -> None:
    """What would stop WorkloadApiServer.start(), checked without binding: the socket's folder, and
    another process serving at the path.

    The agent calls this before it touches the TPM or the authority, so a second agent, or a folder
    others may write to, is refused at once rather than after a full node attestation.
    """
    _make_folder(path.parent)
    _check_socket_folder(path.parent)
    _refuse_live_socket(path)


def _make_folder(folder: Path) -> None:
    """Create the socket's folder and any missing parent as 0755 (mkdir's mode is filtered by the umask)."""
    missing = [directory for directory in (folder, *folder.parents) if not directory.is_dir()]
    for directory in reversed(missing):
        try:
            directory.mkdir(mode=0o755)
            os.chmod(directory, 0o755)  # noqa: S103 (world-readable: any local process may connect)
        except FileExistsError:
            continue  # made meanwhile, or not a folder: _check_socket_folder and bind() will say
        except OSError as err:
            reason = err.strerror or err
            raise WorkloadApiError(f"cannot create workload api socket folder {directory}: {reason}") from err


def _check_socket_folder(folder: Path) -> None:
    """Refuse a socket folder in which another user could replace the socket.

    Checks the folder and every folder above it, both as written and with symlinks resolved: whoever
    may rename an ancestor may swap the whole subtree. A sticky folder (like /tmp) is safe above the
    socket: others can add entries but not rename or remove ours. The socket's own folder must be
    writable by no one else, sticky or not (someone could bind the name while the agent is down),
    and must belong to root or the agent; an ancestor owned by another user (a checkout in someone's
    home, run with sudo) only earns a warning, since that user chose to put the agent there.
    """
    euid = os.geteuid()
    written = Path(os.path.abspath(folder))
    resolved = folder.resolve()
    for directory in dict.fromkeys((written, *written.parents, resolved, *resolved.parents)):
        try:
            status = os.stat(directory)
        except OSError as err:
            reason = err.strerror or err
            raise WorkloadApiError(f"cannot inspect workload api socket folder {directory}: {reason}") from err
        own_folder = directory in (written, resolved)
        named = f"{folder}" if own_folder else f"{directory} (above {folder})"
        if not stat.S_ISDIR(status.st_mode):
            raise WorkloadApiError(f"workload api socket folder {named} is not a folder")
        if status.st_uid not in (0, euid):
            message = (f"workload api socket folder {named} is owned by uid {status.st_uid}, not by root or the "
                       f"agent (uid {euid}): its owner could replace the socket")
            if own_folder:
                raise WorkloadApiError(message)
            _log.warning(message)
        # Sticky protects our entries in a shared folder like /tmp, but not the socket's name while
        # the agent is down: the socket's own folder must be writable by no one else at all.
        if status.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and (own_folder or not status.st_mode & stat.S_ISVTX):
            qualifier = "" if own_folder else " without the sticky bit"
            raise WorkloadApiError(
                f"workload api socket folder {named} is writable by group or others{qualifier}: "
                "another user could replace the socket"
            )


def _remove_stale_socket(path: Path) -> None:
    """Remove a socket file left by a previous run; refuse to touch anything else."""
    if _refuse_live_socket(path):
        path.unlink(missing_ok=True)


def _refuse_live_socket(path: Path) -> bool:
    """WorkloadApiError if something serves at `path` or it is not a socket; True if a dead socket is there."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return False
    if not stat.S_ISSOCK(mode):
        raise WorkloadApiError(f"{path} exists and is not a socket")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.setblocking(False)
    try:
        in_use = probe.connect_ex(os.fspath(path)) in {0, errno.EAGAIN}  # EAGAIN: listening, backlog full
    finally:
        probe.close()
    if in_use:
        raise WorkloadApiError(f"another process is serving on {path}")
    return True
