"""The SpiffeWorkloadAPI service: what each RPC hands out, and to whom.

Every RPC first checks the security header, then identifies the caller from the kernel (peer.py),
has the agent attest it (or reuses the process's attestation while nothing it rests on has changed:
reuse.py), and re-checks that the attested process is still the caller. Workloads get
generic status messages; the detail goes into the request's `Decision`, one per request (a stream
that had answered gets a second one if a refusal or an error ends it), emitted into the agent's
DecisionSink: that is where the log line and `vouchd status` come from.

FetchX509Bundles is answered only to a caller entitled to an identity (some registration entry
matches it), as SPIRE's agent does unless `allow_unauthenticated_verifiers` is set: otherwise
PermissionDenied "no identity issued", also when the entitlement goes away while the stream is open.
vouchd has no such switch: a verify-only workload gets an entry like any other.
FetchX509SVID's federated_bundles carries the bundles of every trust domain other than those of
the SVIDs in the message.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Stream

from vouchd.agent.workload_api.calls import UNIDENTIFIED, Call, RefusedError
from vouchd.agent.workload_api.errors import InvalidJwtSvidError, NoIdentityError, PeerError
from vouchd.agent.workload_api.identities import (
    CallerContext,
    WorkloadApiObserver,
    WorkloadIdentities,
    X509SvidMaterial,
)
from vouchd.agent.workload_api.limits import (
    ATTESTATIONS_PER_UID,
    AttestationSlots,
    check_jwt_svid_request,
    check_validate_request,
)
from vouchd.agent.workload_api.peer import peer_process, process_unchanged
from vouchd.agent.workload_api.reuse import AttestationReuse
from vouchd.attestors.base import WorkloadAttestation, WorkloadProcess
from vouchd.attestors.errors import AttestorError
from vouchd.clock import SYSTEM_CLOCK, Clock
from vouchd.decisions import Decision, DecisionSink
from vouchd.proto import workload_pb2 as pb
from vouchd.proto.workload_grpc import SpiffeWorkloadAPIBase

__all__ = ["SECURITY_HEADER", "WorkloadApiService"]

SECURITY_HEADER = "workload.spiffe.io"

_T = TypeVar("_T")


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

    `decisions` receives one Decision per request outcome. `attest_deadline` (seconds) is the one
    bound on attesting a caller: identities.attest() has no deadline of its own and is cancelled
    when this one passes; the caller gets PermissionDenied. `observer`, if any, is told when a
    stream opens and closes (connected workloads). `clock` dates decisions and times requests.
    """

    def __init__(
        self,
        identities: WorkloadIdentities,
        *,
        decisions: DecisionSink,
        attest_deadline: float = 5.0,
        logger: logging.Logger | None = None,
        observer: WorkloadApiObserver | None = None,
        clock: Clock = SYSTEM_CLOCK,
        attestations_per_uid: int = ATTESTATIONS_PER_UID,
        issuance_gate: Callable[[], str | None] | None = None,
        reuse: AttestationReuse | None = None,
    ) -> None:
        if attest_deadline <= 0:
            raise ValueError(f"attest_deadline must be positive, got {attest_deadline}")
        self._identities = identities
        self._decisions = decisions
        self._attest_deadline = attest_deadline
        self._log = logger or logging.getLogger("vouchd.workload_api")
        self._observer = observer
        self._clock = clock
        self._attestations = AttestationSlots(attestations_per_uid)
        self._issuance_gate = issuance_gate
        self._reuse = reuse if reuse is not None else AttestationReuse()

    # -- X.509-SVID profile -------------------------------------------------------------------------

    async def FetchX509SVID(self, stream: Stream[pb.X509SVIDRequest, pb.X509SVIDResponse]) -> None:  # noqa: N802 (name fixed by the proto)
        async with self._request(stream, "FetchX509SVID") as call:
            await stream.recv_message()
            caller = await self._attest(stream, call)

            async def svid_set() -> _X509SvidSet:
                return await self._x509_svid_set(caller, call)

            await self._stream(stream, call, caller.process, compute=svid_set, message=_X509SvidSet.message,
                               spiffe_ids=lambda current: tuple(svid.spiffe_id for svid in current.svids))

    async def FetchX509Bundles(self, stream: Stream[pb.X509BundlesRequest, pb.X509BundlesResponse]) -> None:  # noqa: N802 (name fixed by the proto)
        async with self._request(stream, "FetchX509Bundles") as call:
            await stream.recv_message()
            caller = await self._attest(stream, call)

            async def bundles() -> tuple[tuple[str, bytes], ...]:
                self._require_entitlement(caller)
                return self._x509_bundles()

            await self._stream(stream, call, caller.process, compute=bundles,
                               message=lambda current: pb.X509BundlesResponse(bundles=dict(current)))

    # -- JWT-SVID profile ----------------------------------------------------------------------------

    async def FetchJWTSVID(self, stream: Stream[pb.JWTSVIDRequest, pb.JWTSVIDResponse]) -> None:  # noqa: N802 (name fixed by the proto)
        async with self._request(stream, "FetchJWTSVID") as call:
            request = await stream.recv_message()
            call.identify(stream)
            check_jwt_svid_request(request)  # before attestation: an absurd request costs nothing
            assert request is not None
            caller = await self._attest(stream, call, audiences=tuple(request.audience),
                                        spiffe_id=request.spiffe_id)
            try:
                svids = await self._identities.jwt_svids(caller)
                self._reuse.handed(caller.process, (s.spiffe_id for s in svids))
            except NoIdentityError as err:
                raise RefusedError.no_identity(str(err)) from err
            finally:
                call.details = list(caller.details)
            if not svids:
                raise RefusedError.no_identity("no jwt-svid for the caller's selectors")
            self._answered(call, tuple(s.spiffe_id for s in svids))  # recorded before anything is handed out
            await stream.send_message(pb.JWTSVIDResponse(
                svids=[pb.JWTSVID(spiffe_id=s.spiffe_id, svid=s.token, hint=s.hint) for s in svids]))

    async def FetchJWTBundles(self, stream: Stream[pb.JWTBundlesRequest, pb.JWTBundlesResponse]) -> None:  # noqa: N802 (name fixed by the proto)
        async with self._request(stream, "FetchJWTBundles") as call:
            await stream.recv_message()
            caller = await self._attest(stream, call)

            async def bundles() -> tuple[tuple[str, bytes], ...]:
                self._require_entitlement(caller)
                return self._jwt_bundles()

            # Every JWT key rotation reaches relying parties at once.
            await self._stream(stream, call, caller.process, compute=bundles,
                               message=lambda current: pb.JWTBundlesResponse(bundles=dict(current)))

    async def ValidateJWTSVID(  # noqa: N802 (name fixed by the proto)
        self, stream: Stream[pb.ValidateJWTSVIDRequest, pb.ValidateJWTSVIDResponse]
    ) -> None:
        # Any local process may ask whether a token is valid: it learns nothing it could not verify
        # itself with the bundle, so there is no entitlement check; the caller is still attested so
        # that the decision names who asked.
        async with self._request(stream, "ValidateJWTSVID") as call:
            request = await stream.recv_message()
            call.identify(stream)
            check_validate_request(request)
            assert request is not None
            caller = await self._attest(stream, call, audiences=(request.audience,))
            try:
                spiffe_id, claims = self._identities.validate_jwt_svid(caller, request.svid, request.audience)
            except NoIdentityError as err:  # the policy forbids this caller to validate for the audience
                raise RefusedError.no_identity(str(err)) from err
            except InvalidJwtSvidError as err:
                raise RefusedError(Status.INVALID_ARGUMENT, "invalid_argument", str(err),
                                   f"jwt-svid refused: {err}") from err
            finally:
                call.details = list(caller.details)
            response = pb.ValidateJWTSVIDResponse(spiffe_id=spiffe_id)
            response.claims.update(dict(claims))
            self._answered(call, (spiffe_id,))
            await stream.send_message(response)

    async def FetchWITSVID(self, stream: Stream[pb.WITSVIDRequest, pb.WITSVIDResponse]) -> None:  # noqa: N802 (name fixed by the proto)
        self._unimplemented(stream, "FetchWITSVID")

    async def FetchWITBundles(self, stream: Stream[pb.WITBundlesRequest, pb.WITBundlesResponse]) -> None:  # noqa: N802 (name fixed by the proto)
        self._unimplemented(stream, "FetchWITBundles")

    def _unimplemented(self, stream: Stream[Any, Any], method: str) -> None:
        call = Call(method, self._clock)
        call.identify(stream)
        reason = f"{method} is not implemented"
        self._decide(call.decision("unimplemented", reason))
        raise GRPCError(Status.UNIMPLEMENTED, reason)

    # -- shared steps ---------------------------------------------------------------------------------

    async def _stream(self, stream: Stream[Any, Any], call: Call, process: WorkloadProcess, *,
                      compute: Callable[[], Awaitable[_T]], message: Callable[[_T], Any],
                      spiffe_ids: Callable[[_T], tuple[str, ...]] = lambda _: ()) -> None:
        """One streaming RPC after attestation: the first answer, then the complete current set on
        every change that alters it (and never twice the same), for as long as the caller is the
        process that was attested. `compute` raises RefusedError when the caller is owed nothing."""
        version = self._identities.version  # read before computing: no change in between is missed
        current = await compute()
        self._answered(call, spiffe_ids(current))  # recorded before anything is handed out
        await stream.send_message(message(current))
        with self._open_stream(call):
            while True:
                version = await self._identities.wait_for_change(version)
                self._recheck(process)
                latest = await compute()
                if latest != current:
                    self._require_record(call)
                    await stream.send_message(message(latest))
                    current = latest
                    call.spiffe_ids = spiffe_ids(current)
                    self._log.debug(f"{call.method} update sent",
                                    extra={**call.log_fields(), "spiffe_ids": list(call.spiffe_ids)})

    @asynccontextmanager
    async def _request(self, stream: Stream[Any, Any], method: str) -> AsyncIterator[Call]:
        """Header check, error mapping and the request's decision, around one RPC."""
        call = Call(method, self._clock)
        try:
            if stream.metadata is None or stream.metadata.get(SECURITY_HEADER) != "true":
                call.identify(stream)
                raise RefusedError(
                    Status.INVALID_ARGUMENT,
                    "invalid_argument",
                    "security header missing from request",
                    f"no {SECURITY_HEADER}: true metadata",
                )
            yield call
        except RefusedError as refusal:
            self._decide(call.decision(refusal.code, refusal.detail))
            raise GRPCError(refusal.status, refusal.public) from None
        except (asyncio.CancelledError, StreamTerminatedError):
            # The client went away (or the server is closing): routine for long-lived streams, and
            # no decision: nothing was refused.
            level = logging.DEBUG if call.answered else logging.INFO
            if self._log.isEnabledFor(level):  # the end of every answered stream: no fields built for nothing
                self._log.log(level, "workload api request cancelled", extra=call.log_fields())
            raise
        except Exception as err:
            # The decision says that it failed; this line carries the traceback.
            self._log.error("workload api request failed", exc_info=err, extra=call.log_fields())
            self._decide(call.decision("error", type(err).__name__))
            raise GRPCError(Status.UNAVAILABLE, "workload api unavailable") from None

    def _decide(self, decision: Decision) -> None:
        try:
            self._decisions.emit(decision)
        except Exception as err:
            # A sink must not raise; if one does, what the workload gets must not change.
            self._log.error("decision sink failed", exc_info=err, extra={"method": decision.method})

    @contextmanager
    def _open_stream(self, call: Call) -> Iterator[None]:
        """Tell the observer a stream is open for as long as the body runs (connected workloads)."""
        pid = UNIDENTIFIED if call.pid is None else call.pid
        uid = UNIDENTIFIED if call.uid is None else call.uid
        self._observe("stream_opened", lambda observer: observer.stream_opened(call.method, pid, uid))
        try:
            yield
        finally:
            self._observe("stream_closed", lambda observer: observer.stream_closed(call.method, pid, uid))

    def _observe(self, event: str, notify: Callable[[WorkloadApiObserver], None]) -> None:
        if self._observer is None:
            return
        try:
            notify(self._observer)
        except Exception as err:
            # Observing must never change what a workload gets, nor end its stream.
            self._log.error("workload api observer failed", exc_info=err, extra={"observer_event": event})

    async def _attest(self, stream: Stream[Any, Any], call: Call, *, audiences: tuple[str, ...] = (),
                      spiffe_id: str = "") -> CallerContext:
        try:
            process, traits = peer_process(stream, traits=self._reuse.reads_traits)
        except PeerError as err:
            call.identify(stream)  # the decision still names who was refused
            raise RefusedError.attestation_failed(str(err)) from err
        call.attested(process)
        try:
            attestation, call.reused = await self._reuse.attest(
                process, functools.partial(self._attest_fully, process), traits=traits)
        except AttestorError as err:
            raise RefusedError.attestation_failed(str(err)) from err
        except TimeoutError as err:
            raise RefusedError.attestation_failed(f"no attestation within {self._attest_deadline:g}s") from err
        call.attested(process, attestation)
        # A reused attestation comes back with the caller's stat just read (reuse.py): the pidfd is all
        # there is left to ask.
        self._recheck(process, read_stat=not call.reused)
        return CallerContext(call.method, process, attestation.selectors, audiences=audiences, spiffe_id=spiffe_id,
                             evidence=attestation.evidence)

    async def _attest_fully(self, process: WorkloadProcess) -> WorkloadAttestation:
        async with self._attestations.slot(process.uid, wait=self._attest_deadline):
            async with asyncio.timeout(self._attest_deadline):
                return await self._identities.attest(process)

    def _require_entitlement(self, caller: CallerContext) -> None:
        if not self._identities.entitled(caller):
            raise RefusedError.no_identity("no registration entry matches the caller's selectors")

    @staticmethod
    def _recheck(process: WorkloadProcess, *, read_stat: bool = True) -> None:
        # The caller can exit (or be replaced at its pid) while it is being attested or while its
        # stream is open: what was attested must still be what is connected.
        if not process_unchanged(process, read_stat=read_stat):
            raise RefusedError.attestation_failed(f"process {process.pid} exited or changed after attestation")

    async def _x509_svid_set(self, caller: CallerContext, call: Call) -> _X509SvidSet:
        try:
            handed = await self._identities.x509_svids(caller)
            self._reuse.handed(caller.process, (svid.spiffe_id for svid in handed))
            svids = _with_unique_hints(handed, self._log)
        except NoIdentityError as err:
            raise RefusedError.no_identity(str(err)) from err
        finally:
            call.details = list(caller.details)
        if not svids:
            raise RefusedError.no_identity("no x509 svid for the caller's selectors")
        own_trust_domains = {svid.trust_domain_id for svid in svids}
        federated = tuple(
            sorted((td, der) for td, der in self._identities.x509_bundles().items() if td not in own_trust_domains)
        )
        return _X509SvidSet(svids, federated)

    def _x509_bundles(self) -> tuple[tuple[str, bytes], ...]:
        bundles = tuple(sorted(self._identities.x509_bundles().items()))
        if not bundles:
            raise RefusedError(Status.UNAVAILABLE, "unavailable", "trust bundle not available", "no x509 bundles")
        return bundles

    def _jwt_bundles(self) -> tuple[tuple[str, bytes], ...]:
        bundles = tuple(sorted(self._identities.jwt_bundles().items()))
        if not bundles:
            raise RefusedError(Status.UNAVAILABLE, "unavailable", "jwt bundle not available", "no jwt bundles")
        return bundles

    def _answered(self, call: Call, spiffe_ids: tuple[str, ...] = ()) -> None:
        """Decide the call handed out `spiffe_ids`, before anything is sent: an answer whose decision
        cannot be recorded (the audit log cannot be written) is not sent. The record is attempted even
        while the log is failing: the first one that can be written again reopens the gate."""
        call.spiffe_ids = spiffe_ids
        self._decide(call.decision())
        self._require_record(call)
        call.answered = True

    def _require_record(self, call: Call) -> None:
        refusal = self._issuance_gate() if self._issuance_gate is not None else None
        if refusal is not None:
            raise RefusedError(Status.UNAVAILABLE, "unavailable", "identity service unavailable", refusal)


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
