"""The Workload API over a real Unix socket, with a fake agent behind it and grpclib stubs in front.

Decisions go through a real DecisionBus with LogDecisions subscribed, as in the agent, so the log
lines operators read are checked here too.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import stat
import tempfile
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.server import Stream as ServerStream

from tests.fakes import FakeClock
from vouchd.agent.workload_api import NoIdentityError, X509SvidMaterial
from vouchd.agent.workload_api import server as server_module
from vouchd.agent.workload_api.errors import InvalidJwtSvidError
from vouchd.agent.workload_api.identities import CallerContext, JwtSvidMaterial
from vouchd.agent.workload_api.server import WorkloadApiServer, WorkloadApiService
from vouchd.attestors import AttestorError, WorkloadProcess
from vouchd.attestors.base import Evidence, WorkloadAttestation
from vouchd.attestors.workload.procfs import read_process_stat
from vouchd.decisions import CallerEvidence, Decision, DecisionBus, DecisionKind, LogDecisions, Outcome
from vouchd.proto import workload_pb2 as pb
from vouchd.proto.workload_grpc import SpiffeWorkloadAPIStub
from vouchd.selectors import Selector
from vouchd.unixsockets import SocketPathError

TRUST_DOMAIN = "spiffe://example.org"
HEADER = {"workload.spiffe.io": "true"}
SELECTORS = frozenset({Selector("unix", "uid", str(os.getuid()))})
INVOCATION_ID = "0123456789abcdef0123456789abcdef"
DEADLINE = 5.0  # bound on waiting for something the server does after the client returned
DECISION_LOGGER = "vouchd.decisions.workload_api"


class TestCa:
    """A throw-away trust domain CA issuing SPIFFE-shaped leaves."""

    __test__ = False

    def __init__(self, trust_domain: str = TRUST_DOMAIN) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
        now = dt.datetime.now(dt.UTC)
        self.cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(self.key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(trust_domain)]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        self.bundle_der = self.cert.public_bytes(serialization.Encoding.DER)

    def issue(self, spiffe_id: str, hint: str = "") -> X509SvidMaterial:
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(True, False, False, False, False, False, False, False, False), critical=True)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return X509SvidMaterial(
            spiffe_id=spiffe_id,
            cert_chain_der=leaf.public_bytes(serialization.Encoding.DER),
            private_key_der=key.private_bytes(
                serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            ),
            bundle_der=self.bundle_der,
            hint=hint,
        )


class FakeIdentities:
    """The agent side of the Workload API, driven by the test."""

    def __init__(self, bundles: Mapping[str, bytes]) -> None:
        self.svids: list[X509SvidMaterial] = []
        self.bundles = dict(bundles)
        self.attest_error: Exception | None = None
        self.attest_hangs = False
        self.no_identity_error = False
        self.svid_error: Exception | None = None
        self.has_entry = True  # what entitled() answers: some registration entry matches the caller
        self.attested: list[WorkloadProcess] = []
        self.entitlement_checks = 0
        self.svid_requests = 0
        self.jwt_requests: list[tuple[tuple[str, ...], str]] = []
        self.jwks: dict[str, bytes] = {TRUST_DOMAIN: b'{"keys":[]}'}
        self._version = 1
        self._changed = asyncio.Condition()

    async def attest(self, process: WorkloadProcess) -> WorkloadAttestation:
        self.attested.append(process)
        if self.attest_hangs:
            await asyncio.Event().wait()
        if self.attest_error is not None:
            raise self.attest_error
        return WorkloadAttestation(SELECTORS, evidence=(Evidence("systemd", "invocation_id", INVOCATION_ID),))

    def entitled(self, caller: CallerContext) -> bool:
        assert caller.selectors == SELECTORS
        self.entitlement_checks += 1
        return self.has_entry

    async def x509_svids(self, caller: CallerContext) -> Sequence[X509SvidMaterial]:
        assert caller.selectors == SELECTORS and caller.method == "FetchX509SVID"
        async with self._changed:
            self.svid_requests += 1
            self._changed.notify_all()
        if self.no_identity_error:
            raise NoIdentityError("no entry matches")
        if self.svid_error is not None:
            raise self.svid_error
        return list(self.svids)

    def x509_bundles(self) -> Mapping[str, bytes]:
        return dict(self.bundles)

    async def jwt_svids(self, caller: CallerContext) -> Sequence[JwtSvidMaterial]:
        assert caller.selectors == SELECTORS and caller.method == "FetchJWTSVID"
        self.jwt_requests.append((caller.audiences, caller.spiffe_id))
        if self.no_identity_error:
            raise NoIdentityError("no entry matches")
        return [JwtSvidMaterial(spiffe_id=TRUST_DOMAIN + "/web", token="header.payload.signature", hint="web")]

    def jwt_bundles(self) -> Mapping[str, bytes]:
        return dict(self.jwks)

    def validate_jwt_svid(self, caller: CallerContext, token: str, audience: str) -> tuple[str, Mapping[str, Any]]:
        if token != "header.payload.signature":
            raise InvalidJwtSvidError("jwt-svid signature does not verify")
        return TRUST_DOMAIN + "/web", {"sub": TRUST_DOMAIN + "/web", "aud": [audience], "exp": 2_000_000_000}

    @property
    def version(self) -> int:
        return self._version

    async def wait_for_change(self, seen_version: int) -> int:
        async with self._changed:
            await self._changed.wait_for(lambda: self._version != seen_version)
            return self._version

    async def change(
        self,
        *,
        svids: list[X509SvidMaterial] | None = None,
        bundles: dict[str, bytes] | None = None,
        has_entry: bool | None = None,
    ) -> None:
        """Replace what the agent would serve (or nothing, for a version bump alone) and bump the version."""
        async with self._changed:
            if svids is not None:
                self.svids = svids
            if bundles is not None:
                self.bundles = bundles
            if has_entry is not None:
                self.has_entry = has_entry
            self._version += 1
            self._changed.notify_all()

    async def wait_for_svid_requests(self, count: int) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.svid_requests >= count)


class RecordingObserver:
    """A WorkloadApiObserver that remembers which streams opened and closed, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, tuple[str, int, int]]] = []
        self.closed = asyncio.Event()

    def stream_opened(self, method: str, pid: int, uid: int) -> None:
        self.events.append(("opened", (method, pid, uid)))

    def stream_closed(self, method: str, pid: int, uid: int) -> None:
        self.events.append(("closed", (method, pid, uid)))
        self.closed.set()

    async def wait_closed(self) -> None:
        async with asyncio.timeout(DEADLINE):
            await self.closed.wait()


class BrokenObserver(RecordingObserver):
    """Records, then fails: the Workload API must not care."""

    def stream_opened(self, method: str, pid: int, uid: int) -> None:
        super().stream_opened(method, pid, uid)
        raise RuntimeError("observer is broken")

    def stream_closed(self, method: str, pid: int, uid: int) -> None:
        super().stream_closed(method, pid, uid)
        raise RuntimeError("observer is broken")


class RecordingDecisions:
    """A DecisionSink: a real DecisionBus that logs (LogDecisions) and remembers every decision."""

    def __init__(self) -> None:
        self.all: list[Decision] = []
        self.bus = DecisionBus()
        self.bus.subscribe(LogDecisions())
        self.bus.subscribe(self.all.append)

    def emit(self, decision: Decision) -> None:
        self.bus.emit(decision)


class BrokenSink:
    """A DecisionSink that breaks its promise not to raise."""

    def __init__(self) -> None:
        self.calls = 0

    def emit(self, decision: Decision) -> None:
        self.calls += 1
        raise RuntimeError("sink is broken")


def service(identities: FakeIdentities, *, attest_deadline: float = 5.0) -> WorkloadApiService:
    """A service whose decisions nobody looks at, for tests about something else."""
    return WorkloadApiService(identities, decisions=RecordingDecisions(), attest_deadline=attest_deadline)


@dataclass
class Api:
    server: WorkloadApiServer
    identities: FakeIdentities
    ca: TestCa
    channel: Channel
    stub: SpiffeWorkloadAPIStub
    socket_path: Path
    observer: RecordingObserver
    decisions: RecordingDecisions
    clock: FakeClock


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # AF_UNIX paths are limited to 108 bytes: pytest's tmp_path can be longer.
    with tempfile.TemporaryDirectory(prefix="wlapi-", dir="/tmp") as directory:
        yield Path(directory)


@pytest.fixture
def observer() -> RecordingObserver:
    return RecordingObserver()


@pytest.fixture
async def api(socket_dir: Path, observer: RecordingObserver) -> AsyncIterator[Api]:
    ca = TestCa()
    identities = FakeIdentities({TRUST_DOMAIN: ca.bundle_der})
    socket_path = socket_dir / "run" / "agent.sock"
    decisions, clock = RecordingDecisions(), FakeClock()
    server = WorkloadApiServer(
        WorkloadApiService(identities, decisions=decisions, attest_deadline=2.0, observer=observer, clock=clock),
        socket_path,
    )
    await server.start()
    channel = Channel(path=str(socket_path))
    try:
        yield Api(server, identities, ca, channel, SpiffeWorkloadAPIStub(channel), socket_path, observer, decisions,
                  clock)
    finally:
        channel.close()
        await server.close()


async def first_x509_response(api: Api) -> pb.X509SVIDResponse:
    async with api.stub.FetchX509SVID.open(metadata=HEADER) as stream:
        await stream.send_message(pb.X509SVIDRequest(), end=True)
        response = await stream.recv_message()
        assert response is not None
        await stream.cancel()
        return response


# -- the security header, and RPCs that are not served ------------------------------------------------


async def test_a_request_without_the_security_header_is_an_invalid_argument(api: Api) -> None:
    api.identities.svids = [api.ca.issue(f"{TRUST_DOMAIN}/web")]

    for call in (api.stub.FetchX509SVID(pb.X509SVIDRequest()), api.stub.FetchX509Bundles(pb.X509BundlesRequest())):
        with pytest.raises(GRPCError) as caught:
            await call
        assert caught.value.status is Status.INVALID_ARGUMENT
        assert caught.value.message == "security header missing from request"
    assert api.identities.attested == [], "nobody is attested before the header is checked"


async def test_a_wrong_security_header_value_is_an_invalid_argument(api: Api) -> None:
    with pytest.raises(GRPCError) as caught:
        await api.stub.FetchX509SVID(pb.X509SVIDRequest(), metadata={"workload.spiffe.io": "yes"})

    assert caught.value.status is Status.INVALID_ARGUMENT


@pytest.mark.parametrize(
    ("method", "request_message"),
    [
        ("FetchWITSVID", pb.WITSVIDRequest()),
        ("FetchWITBundles", pb.WITBundlesRequest()),
    ],
)
async def test_rpcs_not_served_yet_are_unimplemented(api: Api, method: str, request_message: object) -> None:
    for metadata in (HEADER, None):
        with pytest.raises(GRPCError) as caught:
            await getattr(api.stub, method)(request_message, metadata=metadata)
        assert caught.value.status is Status.UNIMPLEMENTED
        assert caught.value.message == f"{method} is not implemented"
    assert api.identities.attested == []


# -- who is calling -------------------------------------------------------------------------------------


async def test_the_caller_is_identified_by_the_kernel(api: Api) -> None:
    api.identities.svids = [api.ca.issue(f"{TRUST_DOMAIN}/web")]

    await first_x509_response(api)

    (process,) = api.identities.attested
    assert (process.pid, process.uid, process.gid) == (os.getpid(), os.getuid(), os.getgid())
    assert process.start_time == read_process_stat(os.getpid()).start_time
    if kernel_has_peer_pidfd():
        assert process.pidfd is not None
        assert os.readlink(f"/proc/self/fd/{process.pidfd}") == "anon_inode:[pidfd]"


async def test_one_pidfd_per_connection_closed_with_the_connection(api: Api) -> None:
    if not kernel_has_peer_pidfd():
        pytest.skip("kernel has no SO_PEERPIDFD")
    api.identities.svids = [api.ca.issue(f"{TRUST_DOMAIN}/web")]

    await first_x509_response(api)
    await first_x509_response(api)

    first, second = api.identities.attested
    assert first.pidfd is not None
    assert first.pidfd == second.pidfd, "the same connection reuses its pidfd"
    assert pidfd_pid(first.pidfd) == os.getpid()
    await api.server.close()
    assert pidfd_pid(first.pidfd) is None


async def test_failed_attestation_is_permission_denied_with_a_generic_message(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    api.identities.attest_error = AttestorError("unix", "process 12 has exited")

    with caplog.at_level(logging.INFO, logger=DECISION_LOGGER), pytest.raises(GRPCError) as caught:
        await api.stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER)

    assert caught.value.status is Status.PERMISSION_DENIED
    assert caught.value.message == "workload attestation failed"
    (record,) = [r for r in caplog.records if r.name == DECISION_LOGGER]
    assert (record.getMessage(), record.levelno) == ("deny denied", logging.INFO)
    assert record.__dict__["outcome"] == "denied"
    assert record.__dict__["code"] == "attestation_failed"
    assert record.__dict__["reason"] == "workloadattestor(unix): process 12 has exited"
    assert record.__dict__["pid"] == os.getpid()


async def test_attestation_that_takes_too_long_is_permission_denied(socket_dir: Path) -> None:
    identities = FakeIdentities({})
    identities.attest_hangs = True
    server = WorkloadApiServer(service(identities, attest_deadline=0.05), socket_dir / "agent.sock")
    await server.start()
    channel = Channel(path=str(socket_dir / "agent.sock"))
    try:
        with pytest.raises(GRPCError) as caught:
            await SpiffeWorkloadAPIStub(channel).FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER)
    finally:
        channel.close()
        await server.close()

    assert caught.value.status is Status.PERMISSION_DENIED
    assert caught.value.message == "workload attestation failed"


# -- FetchX509SVID ------------------------------------------------------------------------------------------


async def test_no_identity_is_permission_denied(api: Api) -> None:
    with pytest.raises(GRPCError) as caught:
        await api.stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER)

    assert caught.value.status is Status.PERMISSION_DENIED
    assert caught.value.message == "no identity issued"


async def test_no_identity_error_is_permission_denied(api: Api) -> None:
    api.identities.svids = [api.ca.issue(f"{TRUST_DOMAIN}/web")]
    api.identities.no_identity_error = True

    with pytest.raises(GRPCError) as caught:
        await api.stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER)

    assert caught.value.status is Status.PERMISSION_DENIED
    assert caught.value.message == "no identity issued"


async def test_the_first_message_carries_every_svid(api: Api) -> None:
    web = api.ca.issue(f"{TRUST_DOMAIN}/web", hint="internal")
    admin = api.ca.issue(f"{TRUST_DOMAIN}/admin", hint="external")
    api.identities.svids = [web, admin]

    response = await first_x509_response(api)

    assert [svid.spiffe_id for svid in response.svids] == [web.spiffe_id, admin.spiffe_id]
    first = response.svids[0]
    assert first.x509_svid == web.cert_chain_der
    assert first.x509_svid_key == web.private_key_der
    assert first.bundle == api.ca.bundle_der
    assert first.hint == "internal"
    assert dict(response.federated_bundles) == {}


async def test_svids_with_a_hint_already_used_are_dropped(api: Api) -> None:
    first = api.ca.issue(f"{TRUST_DOMAIN}/a", hint="internal")
    clash = api.ca.issue(f"{TRUST_DOMAIN}/b", hint="internal")
    unhinted = api.ca.issue(f"{TRUST_DOMAIN}/c")
    api.identities.svids = [first, clash, unhinted]

    response = await first_x509_response(api)

    assert [svid.spiffe_id for svid in response.svids] == [first.spiffe_id, unhinted.spiffe_id]


async def test_bundles_of_other_trust_domains_are_federated_bundles(api: Api) -> None:
    partner = TestCa("spiffe://partner.test")
    api.identities.bundles["spiffe://partner.test"] = partner.bundle_der
    api.identities.svids = [api.ca.issue(f"{TRUST_DOMAIN}/web")]

    response = await first_x509_response(api)

    assert dict(response.federated_bundles) == {"spiffe://partner.test": partner.bundle_der}


async def test_the_stream_sends_again_only_when_the_set_changed(api: Api) -> None:
    before = api.ca.issue(f"{TRUST_DOMAIN}/web")
    after = api.ca.issue(f"{TRUST_DOMAIN}/web")  # rotated: new key and certificate
    api.identities.svids = [before]

    async with api.stub.FetchX509SVID.open(metadata=HEADER) as stream:
        await stream.send_message(pb.X509SVIDRequest(), end=True)
        first = await stream.recv_message()
        assert first is not None

        await api.identities.change()  # version bump, same set
        await api.identities.wait_for_svid_requests(2)  # the server has looked at it
        await api.identities.change(svids=[after])
        second = await stream.recv_message()
        await stream.cancel()

    assert first.svids[0].x509_svid == before.cert_chain_der
    assert second is not None
    assert second.svids[0].x509_svid == after.cert_chain_der, "an unchanged set must not be sent again"
    assert second.svids[0].x509_svid_key == after.private_key_der


async def test_the_stream_ends_permission_denied_when_the_identity_is_withdrawn(api: Api) -> None:
    api.identities.svids = [api.ca.issue(f"{TRUST_DOMAIN}/web")]

    async with api.stub.FetchX509SVID.open(metadata=HEADER) as stream:
        await stream.send_message(pb.X509SVIDRequest(), end=True)
        assert await stream.recv_message() is not None

        await api.identities.change(svids=[])
        with pytest.raises(GRPCError) as caught:
            assert await stream.recv_message() is None
            await stream.recv_trailing_metadata()

    assert caught.value.status is Status.PERMISSION_DENIED
    assert caught.value.message == "no identity issued"


async def test_key_material_is_never_logged(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    svid = api.ca.issue(f"{TRUST_DOMAIN}/web")
    api.identities.svids = [svid]

    with caplog.at_level(logging.DEBUG):
        await first_x509_response(api)
        await api.observer.wait_closed()

    (line,) = [r for r in caplog.records if r.name == DECISION_LOGGER]
    assert (line.getMessage(), line.levelno) == ("issue ok", logging.INFO)
    assert line.__dict__["method"] == "FetchX509SVID"
    assert line.__dict__["outcome"] == "ok"
    assert (line.__dict__["pid"], line.__dict__["uid"]) == (os.getpid(), os.getuid())
    assert line.__dict__["spiffe_ids"] == [svid.spiffe_id]
    assert line.__dict__["selectors"] == [str(selector) for selector in SELECTORS]
    assert line.__dict__["evidence"] == [f"systemd.invocation_id={INVOCATION_ID}"], "evidence is recorded"
    assert line.__dict__["duration_ms"] == "0.000", "timed on the service's clock"
    assert "reason" not in line.__dict__ and "code" not in line.__dict__
    key_hex = svid.private_key_der.hex()
    for record in caplog.records:
        dumped = repr(record.__dict__) + record.getMessage()
        assert key_hex not in dumped and repr(svid.private_key_der) not in dumped
    assert "private_key_der" not in repr(svid)


# -- FetchX509Bundles -----------------------------------------------------------------------------------------


async def test_bundles_are_served_to_an_entitled_caller_and_resent_on_change(api: Api) -> None:
    partner = TestCa("spiffe://partner.test")

    async with api.stub.FetchX509Bundles.open(metadata=HEADER) as stream:
        await stream.send_message(pb.X509BundlesRequest(), end=True)
        first = await stream.recv_message()
        await api.identities.change()  # nothing changed: nothing is sent
        await api.identities.change(
            bundles={TRUST_DOMAIN: api.ca.bundle_der, "spiffe://partner.test": partner.bundle_der}
        )
        second = await stream.recv_message()
        await stream.cancel()

    assert first is not None and second is not None
    assert dict(first.bundles) == {TRUST_DOMAIN: api.ca.bundle_der}
    assert dict(second.bundles) == {TRUST_DOMAIN: api.ca.bundle_der, "spiffe://partner.test": partner.bundle_der}
    assert len(api.identities.attested) == 1
    assert api.identities.entitlement_checks >= 2, "entitlement is checked first and again on a change"
    assert api.identities.svid_requests == 0, "bundles never issue an svid"


async def test_bundles_are_denied_to_a_caller_entitled_to_no_identity(api: Api) -> None:
    # SPIRE's default (allow_unauthenticated_verifiers off): bundles only for registered workloads.
    api.identities.has_entry = False

    with pytest.raises(GRPCError) as caught:
        await api.stub.FetchX509Bundles(pb.X509BundlesRequest(), metadata=HEADER)

    assert caught.value.status is Status.PERMISSION_DENIED
    assert caught.value.message == "no identity issued"
    assert len(api.identities.attested) == 1
    (decision,) = api.decisions.all
    assert (decision.kind, decision.outcome) == (DecisionKind.DENY, Outcome.DENIED)
    assert decision.reason == "no registration entry matches the caller's selectors"
    assert dict(decision.details)["code"] == "no_identity"


async def test_the_bundle_stream_ends_permission_denied_when_the_entitlement_goes_away(api: Api) -> None:
    async with api.stub.FetchX509Bundles.open(metadata=HEADER) as stream:
        await stream.send_message(pb.X509BundlesRequest(), end=True)
        assert await stream.recv_message() is not None

        await api.identities.change(has_entry=False)
        with pytest.raises(GRPCError) as caught:
            assert await stream.recv_message() is None
            await stream.recv_trailing_metadata()

    assert caught.value.status is Status.PERMISSION_DENIED
    assert caught.value.message == "no identity issued"


async def test_bundles_need_a_successful_attestation(api: Api) -> None:
    api.identities.attest_error = AttestorError("unix", "boom")

    with pytest.raises(GRPCError) as caught:
        await api.stub.FetchX509Bundles(pb.X509BundlesRequest(), metadata=HEADER)

    assert caught.value.status is Status.PERMISSION_DENIED


async def test_no_bundle_at_all_is_unavailable_not_an_empty_success(api: Api) -> None:
    api.identities.bundles = {}

    with pytest.raises(GRPCError) as caught:
        await api.stub.FetchX509Bundles(pb.X509BundlesRequest(), metadata=HEADER)

    assert caught.value.status is Status.UNAVAILABLE


# -- the socket ----------------------------------------------------------------------------------------------


async def test_the_socket_is_world_connectable_and_removed_on_close(api: Api) -> None:
    mode = os.stat(api.socket_path).st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o777
    assert stat.S_IMODE(os.stat(api.socket_path.parent).st_mode) == 0o755

    await api.server.close()
    await api.server.close()  # idempotent

    assert not api.socket_path.exists()


async def test_close_ends_open_streams(api: Api) -> None:
    api.identities.svids = [api.ca.issue(f"{TRUST_DOMAIN}/web")]

    async with api.stub.FetchX509SVID.open(metadata=HEADER) as stream:
        await stream.send_message(pb.X509SVIDRequest(), end=True)
        assert await stream.recv_message() is not None
        await api.server.close()
        with pytest.raises((StreamTerminatedError, GRPCError)):
            await stream.recv_message()


async def test_a_stale_socket_is_replaced(socket_dir: Path) -> None:
    path = socket_dir / "agent.sock"
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(str(path))
    leftover.close()  # the file stays, nobody listens
    server = WorkloadApiServer(service(FakeIdentities({})), path)

    await server.start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o777
    finally:
        await server.close()


async def test_a_socket_in_use_is_not_taken_over(socket_dir: Path) -> None:
    path = socket_dir / "agent.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    other.bind(str(path))
    other.listen()
    try:
        with pytest.raises(SocketPathError, match=f"^another process is serving on {path}$"):
            await WorkloadApiServer(service(FakeIdentities({})), path).start()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        other.close()


async def test_a_file_that_is_not_a_socket_is_left_alone(socket_dir: Path) -> None:
    path = socket_dir / "agent.sock"
    path.write_text("precious")

    with pytest.raises(SocketPathError, match=f"^{path} exists and is not a socket$"):
        await WorkloadApiServer(service(FakeIdentities({})), path).start()

    assert path.read_text() == "precious"


async def test_run_serves_until_cancelled(socket_dir: Path) -> None:
    path = socket_dir / "agent.sock"
    server = WorkloadApiServer(service(FakeIdentities({})), path)
    running = asyncio.create_task(server.run())
    channel = Channel(path=str(path))
    try:
        # Yield to the run task until it has bound its socket; no timed sleeps.
        while not path.exists():
            await asyncio.sleep(0)
        with pytest.raises(GRPCError) as caught:
            await SpiffeWorkloadAPIStub(channel).FetchWITSVID(pb.WITSVIDRequest())
        assert caught.value.status is Status.UNIMPLEMENTED
    finally:
        channel.close()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running

    assert not path.exists()


# -- decisions (the log line, vouchd status) and the stream observer --------------------------------------------


def me(start_time: int | None = None, selectors: tuple[str, ...] = ()) -> CallerEvidence:
    """This process as a decision names it; attested (with selectors), also with the fake's evidence."""
    evidence = (f"systemd.invocation_id={INVOCATION_ID}",) if selectors else ()
    return CallerEvidence(pid=os.getpid(), uid=os.getuid(), start_time=start_time, selectors=selectors,
                          evidence=evidence)


MY_START_TIME = read_process_stat(os.getpid()).start_time
MY_SELECTORS = tuple(sorted(str(selector) for selector in SELECTORS))


async def test_an_answered_stream_is_one_issue_decision_with_the_callers_evidence(api: Api) -> None:
    svid = api.ca.issue(f"{TRUST_DOMAIN}/web")
    api.identities.svids = [svid]

    await first_x509_response(api)
    await api.observer.wait_closed()

    assert api.decisions.all == [
        Decision(
            kind=DecisionKind.ISSUE,
            outcome=Outcome.OK,
            at=api.clock.now(),
            source="workload_api",
            method="FetchX509SVID",
            caller=me(MY_START_TIME, MY_SELECTORS),
            spiffe_ids=(svid.spiffe_id,),
            details=(("duration_ms", "0.000"),),
        )
    ], "one decision: a cancelled stream is not another"
    stream = ("FetchX509SVID", os.getpid(), os.getuid())
    assert api.observer.events == [("opened", stream), ("closed", stream)]


async def test_bundles_handed_out_are_an_issue_decision_without_spiffe_ids(api: Api) -> None:
    async with api.stub.FetchX509Bundles.open(metadata=HEADER) as stream:
        await stream.send_message(pb.X509BundlesRequest(), end=True)
        assert await stream.recv_message() is not None
        await stream.cancel()

    (decision,) = api.decisions.all
    assert (decision.kind, decision.outcome, decision.method) == (DecisionKind.ISSUE, Outcome.OK, "FetchX509Bundles")
    assert decision.spiffe_ids == ()
    assert decision.caller == me(MY_START_TIME, MY_SELECTORS)


async def test_a_failed_attestation_is_a_denial_with_its_detailed_reason(api: Api) -> None:
    api.identities.attest_error = AttestorError("unix", "process 12 has exited")

    with pytest.raises(GRPCError):
        await api.stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER)

    (decision,) = api.decisions.all
    assert (decision.kind, decision.outcome) == (DecisionKind.DENY, Outcome.DENIED)
    assert decision.reason == "workloadattestor(unix): process 12 has exited"
    assert decision.caller == me(MY_START_TIME), "identified by the kernel, but no selectors: attestation failed"
    assert dict(decision.details) == {"duration_ms": "0.000", "code": "attestation_failed"}
    assert api.observer.events == [], "a refused request opens no stream"


async def test_no_identity_is_a_denial_that_names_the_selectors_it_was_refused_for(api: Api) -> None:
    with pytest.raises(GRPCError):
        await api.stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER)

    (decision,) = api.decisions.all
    assert (decision.kind, decision.outcome, decision.reason) == (
        DecisionKind.DENY, Outcome.DENIED, "no x509 svid for the caller's selectors")
    assert decision.caller == me(MY_START_TIME, MY_SELECTORS)
    assert dict(decision.details)["code"] == "no_identity"


async def test_a_withdrawn_identity_ends_the_stream_with_a_denial_after_the_issue(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    svid = api.ca.issue(f"{TRUST_DOMAIN}/web")
    api.identities.svids = [svid]

    with caplog.at_level(logging.INFO, logger=DECISION_LOGGER):
        async with api.stub.FetchX509SVID.open(metadata=HEADER) as stream:
            await stream.send_message(pb.X509SVIDRequest(), end=True)
            assert await stream.recv_message() is not None
            await api.identities.change(svids=[])
            with pytest.raises(GRPCError):
                await stream.recv_message()
                await stream.recv_trailing_metadata()

    ok, denied = api.decisions.all
    assert (ok.kind, ok.outcome) == (DecisionKind.ISSUE, Outcome.OK)
    assert (denied.kind, denied.outcome) == (DecisionKind.DENY, Outcome.DENIED)
    assert denied.reason == "no x509 svid for the caller's selectors"
    assert denied.spiffe_ids == (svid.spiffe_id,), "the denial names what the stream had"
    assert dict(denied.details) == {"duration_ms": "0.000", "code": "no_identity", "stream": "ended"}
    assert [r.getMessage() for r in caplog.records if r.name == DECISION_LOGGER] == ["issue ok", "deny denied"]
    assert [kind for kind, _ in api.observer.events] == ["opened", "closed"]


async def test_invalid_requests_are_decisions_with_the_callers_pid_from_the_kernel(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger=DECISION_LOGGER):
        with pytest.raises(GRPCError):
            await api.stub.FetchX509SVID(pb.X509SVIDRequest())
        with pytest.raises(GRPCError):
            await api.stub.FetchWITSVID(pb.WITSVIDRequest(), metadata=HEADER)

    missing_header, unimplemented = api.decisions.all
    assert (missing_header.kind, missing_header.outcome) == (DecisionKind.DENY, Outcome.INVALID)
    assert missing_header.caller == me(), "SO_PEERCRED only: no start time, no selectors"
    assert missing_header.reason == "no workload.spiffe.io: true metadata"
    assert dict(missing_header.details)["code"] == "invalid_argument"
    assert (unimplemented.method, unimplemented.outcome) == ("FetchWITSVID", Outcome.INVALID)
    assert unimplemented.reason == "FetchWITSVID is not implemented"
    assert dict(unimplemented.details)["code"] == "unimplemented"
    assert api.identities.attested == [], "identifying a caller for the record is not attesting it"
    lines = [r for r in caplog.records if r.name == DECISION_LOGGER]
    assert [(r.getMessage(), r.levelno) for r in lines] == [("deny invalid", logging.WARNING)] * 2


async def test_an_internal_error_is_an_error_decision_and_a_traceback(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    api.identities.svid_error = RuntimeError("database is on fire")

    with caplog.at_level(logging.INFO), pytest.raises(GRPCError) as caught:
        await api.stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER)

    assert (caught.value.status, caught.value.message) == (Status.UNAVAILABLE, "workload api unavailable")
    (decision,) = api.decisions.all
    assert (decision.kind, decision.outcome, decision.reason) == (DecisionKind.ISSUE, Outcome.ERROR, "RuntimeError")
    assert dict(decision.details)["code"] == "error"
    (failed,) = [r for r in caplog.records if r.getMessage() == "workload api request failed"]
    assert failed.exc_info is not None and "database is on fire" in str(failed.exc_info[1])
    (line,) = [r for r in caplog.records if r.name == DECISION_LOGGER]
    assert (line.getMessage(), line.levelno) == ("issue error", logging.ERROR)


async def test_a_missing_bundle_is_an_error_decision(api: Api) -> None:
    api.identities.bundles = {}

    with pytest.raises(GRPCError):
        await api.stub.FetchX509Bundles(pb.X509BundlesRequest(), metadata=HEADER)

    (decision,) = api.decisions.all
    assert (decision.outcome, decision.reason, dict(decision.details)["code"]) == (
        Outcome.ERROR, "no x509 bundles", "unavailable")


async def test_the_attestation_deadline_is_the_services_and_named_in_the_reason(socket_dir: Path) -> None:
    identities = FakeIdentities({})
    identities.attest_hangs = True
    decisions = RecordingDecisions()
    server = WorkloadApiServer(WorkloadApiService(identities, decisions=decisions, attest_deadline=0.05),
                               socket_dir / "agent.sock")
    await server.start()
    channel = Channel(path=str(socket_dir / "agent.sock"))
    try:
        with pytest.raises(GRPCError):
            await SpiffeWorkloadAPIStub(channel).FetchX509Bundles(pb.X509BundlesRequest(), metadata=HEADER)
    finally:
        channel.close()
        await server.close()

    (decision,) = decisions.all
    assert (decision.outcome, decision.reason) == (Outcome.DENIED, "no attestation within 0.05s")


@asynccontextmanager
async def serving(service: WorkloadApiService, path: Path) -> AsyncIterator[SpiffeWorkloadAPIStub]:
    server = WorkloadApiServer(service, path)
    await server.start()
    channel = Channel(path=str(path))
    try:
        yield SpiffeWorkloadAPIStub(channel)
    finally:
        channel.close()
        await server.close()


async def test_a_failing_observer_changes_nothing_for_the_workload(
    socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = TestCa()
    identities = FakeIdentities({TRUST_DOMAIN: ca.bundle_der})
    identities.svids = [ca.issue(f"{TRUST_DOMAIN}/web")]
    observer = BrokenObserver()
    observed = WorkloadApiService(identities, decisions=RecordingDecisions(), observer=observer)

    with caplog.at_level(logging.ERROR, logger="vouchd.workload_api"):
        async with serving(observed, socket_dir / "agent.sock") as stub:
            async with stub.FetchX509SVID.open(metadata=HEADER) as stream:
                await stream.send_message(pb.X509SVIDRequest(), end=True)
                first = await stream.recv_message()
                await identities.change(svids=[ca.issue(f"{TRUST_DOMAIN}/web")])
                second = await stream.recv_message()
                await stream.cancel()
            await observer.wait_closed()

    assert first is not None and second is not None, "the stream kept serving despite the observer"
    assert [kind for kind, _ in observer.events] == ["opened", "closed"]
    failures = [r for r in caplog.records if r.getMessage() == "workload api observer failed"]
    assert [r.__dict__["observer_event"] for r in failures] == ["stream_opened", "stream_closed"]


async def test_a_failing_decision_sink_changes_nothing_for_the_workload(
    socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = TestCa()
    identities = FakeIdentities({TRUST_DOMAIN: ca.bundle_der})
    identities.svids = [ca.issue(f"{TRUST_DOMAIN}/web")]
    sink = BrokenSink()

    with caplog.at_level(logging.ERROR, logger="vouchd.workload_api"):
        async with serving(WorkloadApiService(identities, decisions=sink), socket_dir / "agent.sock") as stub:
            async with stub.FetchX509SVID.open(metadata=HEADER) as stream:
                await stream.send_message(pb.X509SVIDRequest(), end=True)
                served = await stream.recv_message()
                await stream.cancel()
            with pytest.raises(GRPCError) as refused:
                await stub.FetchX509SVID(pb.X509SVIDRequest())

    assert served is not None and served.svids[0].spiffe_id == f"{TRUST_DOMAIN}/web"
    assert (refused.value.status, refused.value.message) == (
        Status.INVALID_ARGUMENT, "security header missing from request")
    assert sink.calls == 2
    assert [r.getMessage() for r in caplog.records].count("decision sink failed") == 2


# -- the socket's folder (the checks themselves: test_unixsockets.py) ----------------------------------------------


async def test_a_socket_folder_others_may_write_to_is_refused(socket_dir: Path) -> None:
    folder = socket_dir / "run"
    folder.mkdir()
    folder.chmod(0o1777)  # even sticky: another user could bind the socket's name while the agent is down

    with pytest.raises(
        SocketPathError,
        match=f"^workload api socket folder {folder} is writable by group or others: "
        "another user could replace the socket$",
    ):
        await WorkloadApiServer(service(FakeIdentities({})), folder / "agent.sock").start()

    assert list(folder.iterdir()) == []


async def test_check_socket_path_refuses_a_live_socket_without_binding(socket_dir: Path) -> None:
    path = socket_dir / "agent.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as other:
        other.bind(str(path))
        other.listen()
        inode = os.lstat(path).st_ino

        with pytest.raises(SocketPathError, match=f"^another process is serving on {path}$"):
            server_module.check_socket_path(path)

        assert os.lstat(path).st_ino == inode


async def test_missing_socket_folders_are_made_0755_whatever_the_umask(socket_dir: Path) -> None:
    path = socket_dir / "a" / "b" / "agent.sock"
    previous = os.umask(0o002)  # would leave mkdir's folders group-writable, which bind then refuses
    try:
        server = WorkloadApiServer(service(FakeIdentities({})), path)
        await server.start()
    finally:
        os.umask(previous)
    try:
        assert stat.S_IMODE(os.stat(socket_dir / "a").st_mode) == 0o755
        assert stat.S_IMODE(os.stat(socket_dir / "a" / "b").st_mode) == 0o755
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o777
    finally:
        await server.close()


async def test_a_kernel_without_peer_pidfd_is_warned_about_at_start(
    socket_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "kernel_has_peer_pidfd", lambda: False)
    server = WorkloadApiServer(service(FakeIdentities({})), socket_dir / "agent.sock")

    with caplog.at_level(logging.WARNING, logger="vouchd.workload_api"):
        await server.start()
    await server.close()

    (warning,) = [r for r in caplog.records if r.name == "vouchd.workload_api"]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage().startswith("kernel has no SO_PEERPIDFD (linux 6.5+)")


async def test_a_kernel_with_peer_pidfd_is_not_warned_about(socket_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    if not kernel_has_peer_pidfd():
        pytest.skip("kernel has no SO_PEERPIDFD")
    server = WorkloadApiServer(service(FakeIdentities({})), socket_dir / "agent.sock")

    with caplog.at_level(logging.WARNING, logger="vouchd.workload_api"):
        await server.start()
    await server.close()

    assert [r for r in caplog.records if r.name == "vouchd.workload_api"] == []


# -- helpers -----------------------------------------------------------------------------------------------------


def kernel_has_peer_pidfd() -> bool:
    left, right = socket.socketpair(socket.AF_UNIX)
    try:
        os.close(left.getsockopt(socket.SOL_SOCKET, 77))
        return True
    except OSError:
        return False
    finally:
        left.close()
        right.close()


def pidfd_pid(fd: int) -> int | None:
    """The pid a pidfd refers to, or None if `fd` is not (or no longer) a pidfd."""
    try:
        if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:[pidfd]":
            return None
        fdinfo = Path(f"/proc/self/fdinfo/{fd}").read_text()
    except FileNotFoundError:
        return None
    for line in fdinfo.splitlines():
        if line.startswith("Pid:"):
            return int(line.split()[1])
    return None


# -- JWT-SVIDs -------------------------------------------------------------------------------------


async def test_fetch_jwt_svid_hands_out_the_callers_tokens(api: Api) -> None:
    response = await api.stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=["db", "cache"]), metadata=HEADER)

    assert [(s.spiffe_id, s.svid, s.hint) for s in response.svids] == [
        (TRUST_DOMAIN + "/web", "header.payload.signature", "web")]
    assert api.identities.jwt_requests == [(("db", "cache"), "")]
    (decision,) = api.decisions.all
    assert (decision.kind, decision.method, decision.spiffe_ids) == (
        DecisionKind.ISSUE, "FetchJWTSVID", (TRUST_DOMAIN + "/web",))


@pytest.mark.parametrize(
    ("request_message", "message"),
    [(pb.JWTSVIDRequest(), "audience must be specified"),
     (pb.JWTSVIDRequest(audience=[""]), "audience must not be empty"),
     (pb.JWTSVIDRequest(audience=[f"a{n}" for n in range(100)]), "audiences may be requested")],
    ids=["no-audience", "empty-audience", "100-audiences"],
)
async def test_an_absurd_jwt_request_is_invalid_without_attestation(api: Api, request_message: object,
                                                                   message: str) -> None:
    with pytest.raises(GRPCError) as caught:
        await api.stub.FetchJWTSVID(request_message, metadata=HEADER)

    assert caught.value.status is Status.INVALID_ARGUMENT and message in (caught.value.message or "")
    assert api.identities.attested == [] and api.identities.jwt_requests == []


async def test_a_caller_without_a_jwt_identity_is_denied(api: Api) -> None:
    api.identities.no_identity_error = True

    with pytest.raises(GRPCError) as caught:
        await api.stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=["db"]), metadata=HEADER)

    assert caught.value.status is Status.PERMISSION_DENIED


async def test_jwt_bundles_stream_sends_the_jwks_and_every_change(api: Api) -> None:
    async with asyncio.timeout(DEADLINE), api.stub.FetchJWTBundles.open(metadata=HEADER) as stream:
        await stream.send_message(pb.JWTBundlesRequest(), end=True)
        first = await stream.recv_message()
        assert first is not None and dict(first.bundles) == {TRUST_DOMAIN: b'{"keys":[]}'}
        api.identities.jwks = {TRUST_DOMAIN: b'{"keys":[{"kid":"new"}]}'}
        await api.identities.change()
        second = await stream.recv_message()
        assert second is not None and dict(second.bundles) == {TRUST_DOMAIN: b'{"keys":[{"kid":"new"}]}'}
        await stream.cancel()


async def test_validate_answers_the_spiffe_id_and_claims_or_invalid_argument(api: Api) -> None:
    response = await api.stub.ValidateJWTSVID(
        pb.ValidateJWTSVIDRequest(audience="db", svid="header.payload.signature"), metadata=HEADER)
    assert response.spiffe_id == TRUST_DOMAIN + "/web"
    assert dict(response.claims)["aud"] == ["db"]

    with pytest.raises(GRPCError) as caught:
        await api.stub.ValidateJWTSVID(pb.ValidateJWTSVIDRequest(audience="db", svid="forged.token.x"),
                                       metadata=HEADER)
    assert caught.value.status is Status.INVALID_ARGUMENT
    assert caught.value.message == "jwt-svid signature does not verify"
    with pytest.raises(GRPCError) as missing:
        await api.stub.ValidateJWTSVID(pb.ValidateJWTSVIDRequest(audience="db"), metadata=HEADER)
    assert missing.value.status is Status.INVALID_ARGUMENT and missing.value.message == "svid must be specified"


# -- the issuance gate: nothing is handed out without its record (the audit log) --------------------------


AUDIT_DOWN = ("the audit log cannot be written: cannot write audit record to "
              "/var/lib/vouchd/agent/audit/audit-000001.jsonl: No space left on device")


class IssuanceGate:
    """What the agent's `_audit_refusal` answers: why nothing may be handed out (the audit log's
    failure), or None. The test (or a sink) closes and opens it."""

    def __init__(self, refusal: str | None = None) -> None:
        self.refusal = refusal

    def __call__(self) -> str | None:
        return self.refusal


class AuditingSink(RecordingDecisions):
    """A DecisionSink standing in for the audit log: notes when each decision arrives in `events`,
    and, with `fail_issues`, fails to write every issue it is handed: the gate closes, as the
    agent's does when AuditLog.record raises."""

    def __init__(self, gate: IssuanceGate, events: list[tuple[str, str]], *, fail_issues: bool = False) -> None:
        super().__init__()
        self.gate = gate
        self.events = events
        self.fail_issues = fail_issues

    def emit(self, decision: Decision) -> None:
        super().emit(decision)
        self.events.append(("decision", f"{decision.kind} {decision.outcome}"))
        if self.fail_issues and (decision.kind, decision.outcome) == (DecisionKind.ISSUE, Outcome.OK):
            self.gate.refusal = AUDIT_DOWN


@dataclass
class Gated:
    stub: SpiffeWorkloadAPIStub
    identities: FakeIdentities
    ca: TestCa
    gate: IssuanceGate
    decisions: AuditingSink
    events: list[tuple[str, str]]   # decisions as the sink got them, messages as the server sent them


@asynccontextmanager
async def gated_api(socket_dir: Path, monkeypatch: pytest.MonkeyPatch, *, refusal: str | None = None,
                    fail_issues: bool = False) -> AsyncIterator[Gated]:
    """A service with an issuance gate and a sink that records; every message the server sends is
    noted in `events` as it goes out."""
    ca = TestCa()
    identities = FakeIdentities({TRUST_DOMAIN: ca.bundle_der})
    identities.svids = [ca.issue(f"{TRUST_DOMAIN}/web")]
    events: list[tuple[str, str]] = []
    gate = IssuanceGate(refusal)
    decisions = AuditingSink(gate, events, fail_issues=fail_issues)
    send_message = ServerStream.send_message

    async def noted_send(self: Any, message: Any, **kwargs: Any) -> None:
        events.append(("sent", type(message).__name__))
        await send_message(self, message, **kwargs)

    monkeypatch.setattr(ServerStream, "send_message", noted_send)
    service = WorkloadApiService(identities, decisions=decisions, issuance_gate=gate, clock=FakeClock())
    async with serving(service, socket_dir / "agent.sock") as stub:
        yield Gated(stub, identities, ca, gate, decisions, events)


async def everything_received(method: Any, request: object) -> tuple[list[Any], GRPCError | None]:
    """Open the RPC, send `request`, and read until it ends: the messages, and the error it ended with."""
    received: list[Any] = []
    async with asyncio.timeout(DEADLINE), method.open(metadata=HEADER) as stream:
        await stream.send_message(request, end=True)
        try:
            while (message := await stream.recv_message()) is not None:
                received.append(message)
            await stream.recv_trailing_metadata()
        except GRPCError as err:
            return received, err
    return received, None


GATED_METHODS = [
    ("FetchX509SVID", pb.X509SVIDRequest()),
    ("FetchX509Bundles", pb.X509BundlesRequest()),
    ("FetchJWTSVID", pb.JWTSVIDRequest(audience=["db"])),
    ("FetchJWTBundles", pb.JWTBundlesRequest()),
    ("ValidateJWTSVID", pb.ValidateJWTSVIDRequest(audience="db", svid="header.payload.signature")),
]
UNARY_METHODS = {"FetchJWTSVID", "ValidateJWTSVID"}


@pytest.mark.parametrize(("method", "request_message"), GATED_METHODS, ids=[m for m, _ in GATED_METHODS])
async def test_a_closed_gate_is_unavailable_and_nothing_is_sent(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch, method: str, request_message: object
) -> None:
    async with gated_api(socket_dir, monkeypatch, refusal=AUDIT_DOWN) as api:
        received, error = await everything_received(getattr(api.stub, method), request_message)

    assert received == []
    assert not [event for event in api.events if event[0] == "sent"], "not one message left the server"
    assert error is not None
    assert (error.status, error.message) == (Status.UNAVAILABLE, "identity service unavailable"), \
        "the workload hears a generic reason; the decision has the detail"
    # The issue's record is attempted all the same (the first one the log takes again reopens the
    # gate), then the call ends unavailable.
    attempted, decision = api.decisions.all
    assert (attempted.kind, attempted.outcome) == (DecisionKind.ISSUE, Outcome.OK)
    assert (decision.kind, decision.outcome, decision.method) == (DecisionKind.ISSUE, Outcome.ERROR, method)
    assert decision.reason == AUDIT_DOWN
    assert dict(decision.details)["code"] == "unavailable"


@pytest.mark.parametrize(("method", "request_message"), GATED_METHODS[:1] + GATED_METHODS[2:3],
                         ids=["FetchX509SVID", "FetchJWTSVID"])
async def test_an_identity_whose_record_fails_is_not_sent(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch, method: str, request_message: object
) -> None:
    # The gate is open when the request arrives; writing the issue's record is what fails.
    async with gated_api(socket_dir, monkeypatch, fail_issues=True) as api:
        received, error = await everything_received(getattr(api.stub, method), request_message)

    assert received == [], "the SVID whose record could not be written never reached the workload"
    assert error is not None and error.status is Status.UNAVAILABLE
    assert api.events == [("decision", "issue ok"), ("decision", "issue error")], "and nothing was sent"
    issued, refused = api.decisions.all
    assert refused.reason == AUDIT_DOWN and dict(refused.details)["code"] == "unavailable"
    assert "stream" not in dict(refused.details), "the stream never answered"
    assert issued.spiffe_ids == refused.spiffe_ids == (f"{TRUST_DOMAIN}/web",)


@pytest.mark.parametrize(("method", "request_message"), GATED_METHODS, ids=[m for m, _ in GATED_METHODS])
async def test_the_decision_is_emitted_before_the_answer_is_sent(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch, method: str, request_message: object
) -> None:
    async with gated_api(socket_dir, monkeypatch) as api, asyncio.timeout(DEADLINE), \
            getattr(api.stub, method).open(metadata=HEADER) as stream:
        await stream.send_message(request_message, end=True)
        assert await stream.recv_message() is not None
        if method in UNARY_METHODS:
            await stream.recv_trailing_metadata()
        else:
            await stream.cancel()  # a stream: it would go on

    (sent,) = [event for event in api.events if event[0] == "sent"]
    assert api.events == [("decision", "issue ok"), sent], "recorded first, then handed out"


async def test_a_stream_whose_gate_closes_gets_no_update_and_ends_unavailable(
    socket_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with gated_api(socket_dir, monkeypatch) as api, asyncio.timeout(DEADLINE):
        async with api.stub.FetchX509SVID.open(metadata=HEADER) as stream:
            await stream.send_message(pb.X509SVIDRequest(), end=True)
            assert await stream.recv_message() is not None
            api.gate.refusal = AUDIT_DOWN
            await api.identities.change(svids=[api.ca.issue(f"{TRUST_DOMAIN}/web")])  # a rotation
            with pytest.raises(GRPCError) as ended:
                assert await stream.recv_message() is None, "the rotated SVID must not be sent"
                await stream.recv_trailing_metadata()
        assert ended.value.status is Status.UNAVAILABLE
        assert [event for event in api.events if event[0] == "sent"] == [("sent", "X509SVIDResponse")]
        first, refused = api.decisions.all
        assert (first.kind, first.outcome) == (DecisionKind.ISSUE, Outcome.OK)
        assert (refused.kind, refused.outcome, refused.reason) == (DecisionKind.ISSUE, Outcome.ERROR, AUDIT_DOWN)
        assert dict(refused.details)["stream"] == "ended"

        api.gate.refusal = None  # the log can be written again: so is the next answer
        async with api.stub.FetchX509SVID.open(metadata=HEADER) as again:
            await again.send_message(pb.X509SVIDRequest(), end=True)
            served = await again.recv_message()
            await again.cancel()
        assert served is not None and [svid.spiffe_id for svid in served.svids] == [f"{TRUST_DOMAIN}/web"]
