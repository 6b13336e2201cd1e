"""The Workload API over a real Unix socket, with a fake agent behind it and grpclib stubs in front."""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import socket
import stat
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from vouchd.agent.workload_api import NoIdentityError, RequestOutcome, WorkloadApiError, X509SvidMaterial
from vouchd.agent.workload_api import server as server_module
from vouchd.agent.workload_api.server import WorkloadApiServer, WorkloadApiService
from vouchd.attestors import AttestorError, WorkloadProcess
from vouchd.attestors.workload.procfs import read_process_stat
from vouchd.proto import workload_pb2 as pb
from vouchd.proto.workload_grpc import SpiffeWorkloadAPIStub
from vouchd.selectors import Selector

TRUST_DOMAIN = "spiffe://example.org"
HEADER = {"workload.spiffe.io": "true"}
SELECTORS = frozenset({Selector("unix", "uid", str(os.getuid()))})


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
        self._version = 1
        self._changed = asyncio.Condition()

    async def attest(self, process: WorkloadProcess) -> frozenset[Selector]:
        self.attested.append(process)
        if self.attest_hangs:
            await asyncio.Event().wait()
        if self.attest_error is not None:
            raise self.attest_error
        return SELECTORS

    def entitled(self, selectors: frozenset[Selector]) -> bool:
        assert selectors == SELECTORS
        self.entitlement_checks += 1
        return self.has_entry

    async def x509_svids(self, selectors: frozenset[Selector]) -> Sequence[X509SvidMaterial]:
        assert selectors == SELECTORS
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
    """A WorkloadApiObserver that remembers what it was told, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, object]] = []
        self.closed = asyncio.Event()

    @property
    def outcomes(self) -> list[RequestOutcome]:
        return [event for kind, event in self.events if kind == "finished" and isinstance(event, RequestOutcome)]

    def request_finished(self, outcome: RequestOutcome) -> None:
        self.events.append(("finished", outcome))

    def stream_opened(self, method: str, pid: int, uid: int) -> None:
        self.events.append(("opened", (method, pid, uid)))

    def stream_closed(self, method: str, pid: int, uid: int) -> None:
        self.events.append(("closed", (method, pid, uid)))
        self.closed.set()


class BrokenObserver(RecordingObserver):
    """Records, then fails: the Workload API must not care."""

    def request_finished(self, outcome: RequestOutcome) -> None:
        super().request_finished(outcome)
        raise RuntimeError("observer is broken")

    def stream_opened(self, method: str, pid: int, uid: int) -> None:
        super().stream_opened(method, pid, uid)
        raise RuntimeError("observer is broken")

    def stream_closed(self, method: str, pid: int, uid: int) -> None:
        super().stream_closed(method, pid, uid)
        raise RuntimeError("observer is broken")


@dataclass
class Api:
    server: WorkloadApiServer
    identities: FakeIdentities
    ca: TestCa
    channel: Channel
    stub: SpiffeWorkloadAPIStub
    socket_path: Path
    observer: RecordingObserver


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
    server = WorkloadApiServer(WorkloadApiService(identities, attest_deadline=2.0, observer=observer), socket_path)
    await server.start()
    channel = Channel(path=str(socket_path))
    try:
        yield Api(server, identities, ca, channel, SpiffeWorkloadAPIStub(channel), socket_path, observer)
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
        ("FetchJWTSVID", pb.JWTSVIDRequest(audience=["x"])),
        ("FetchJWTBundles", pb.JWTBundlesRequest()),
        ("ValidateJWTSVID", pb.ValidateJWTSVIDRequest(audience="x", svid="y")),
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

    with caplog.at_level(logging.INFO, logger="vouchd.workload_api"), pytest.raises(GRPCError) as caught:
        await api.stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER)

    assert caught.value.status is Status.PERMISSION_DENIED
    assert caught.value.message == "workload attestation failed"
    (record,) = [r for r in caplog.records if r.name == "vouchd.workload_api"]
    assert record.__dict__["outcome"] == "attestation_failed"
    assert record.__dict__["reason"] == "workloadattestor(unix): process 12 has exited"
    assert record.__dict__["pid"] == os.getpid()


async def test_attestation_that_takes_too_long_is_permission_denied(socket_dir: Path) -> None:
    identities = FakeIdentities({})
    identities.attest_hangs = True
    server = WorkloadApiServer(WorkloadApiService(identities, attest_deadline=0.05), socket_dir / "agent.sock")
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

    (line,) = [
        r for r in caplog.records if r.name == "vouchd.workload_api" and r.getMessage() == "workload api request"
    ]
    assert line.__dict__["method"] == "FetchX509SVID"
    assert line.__dict__["outcome"] == "ok"
    assert line.__dict__["uid"] == os.getuid()
    assert line.__dict__["spiffe_ids"] == [svid.spiffe_id]
    assert isinstance(line.__dict__["duration_ms"], float)
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
    (outcome,) = api.observer.outcomes
    assert (outcome.outcome, outcome.reason) == ("denied", "no registration entry matches the caller's selectors")


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
    server = WorkloadApiServer(WorkloadApiService(FakeIdentities({})), path)

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
        with pytest.raises(WorkloadApiError, match=f"^another process is serving on {path}$"):
            await WorkloadApiServer(WorkloadApiService(FakeIdentities({})), path).start()
        assert stat.S_ISSOCK(os.lstat(path).st_mode)
    finally:
        other.close()


async def test_a_file_that_is_not_a_socket_is_left_alone(socket_dir: Path) -> None:
    path = socket_dir / "agent.sock"
    path.write_text("precious")

    with pytest.raises(WorkloadApiError, match=f"^{path} exists and is not a socket$"):
        await WorkloadApiServer(WorkloadApiService(FakeIdentities({})), path).start()

    assert path.read_text() == "precious"


async def test_run_serves_until_cancelled(socket_dir: Path) -> None:
    path = socket_dir / "agent.sock"
    server = WorkloadApiServer(WorkloadApiService(FakeIdentities({})), path)
    running = asyncio.create_task(server.run())
    channel = Channel(path=str(path))
    try:
        # Yield to the run task until it has bound its socket; no timed sleeps.
        while not path.exists():
            await asyncio.sleep(0)
        with pytest.raises(GRPCError) as caught:
            await SpiffeWorkloadAPIStub(channel).FetchJWTSVID(pb.JWTSVIDRequest())
        assert caught.value.status is Status.UNIMPLEMENTED
    finally:
        channel.close()
        running.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running

    assert not path.exists()


# -- the decision observer (vouchd status) ---------------------------------------------------------------------


async def test_the_observer_sees_an_answered_stream_open_and_close(api: Api) -> None:
    svid = api.ca.issue(f"{TRUST_DOMAIN}/web")
    api.identities.svids = [svid]
    before = time.time()

    await first_x509_response(api)
    await api.observer.closed.wait()

    me = ("FetchX509SVID", os.getpid(), os.getuid())
    assert [kind for kind, _ in api.observer.events] == ["finished", "opened", "closed"]
    assert api.observer.events[1:] == [("opened", me), ("closed", me)]
    (outcome,) = api.observer.outcomes
    assert (outcome.method, outcome.pid, outcome.uid) == me
    assert (outcome.outcome, outcome.reason, outcome.spiffe_ids) == ("ok", "", (svid.spiffe_id,))
    assert before <= outcome.at <= time.time()


async def test_the_observer_sees_a_denial_with_its_detailed_reason(api: Api) -> None:
    api.identities.attest_error = AttestorError("unix", "process 12 has exited")

    with pytest.raises(GRPCError):
        await api.stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER)

    (outcome,) = api.observer.outcomes
    assert (outcome.method, outcome.pid, outcome.uid) == ("FetchX509SVID", os.getpid(), os.getuid())
    assert (outcome.outcome, outcome.reason) == ("denied", "workloadattestor(unix): process 12 has exited")
    assert [kind for kind, _ in api.observer.events] == ["finished"], "a refused request opens no stream"


async def test_the_observer_sees_a_withdrawn_identity_as_a_denial_after_ok(api: Api) -> None:
    svid = api.ca.issue(f"{TRUST_DOMAIN}/web")
    api.identities.svids = [svid]

    async with api.stub.FetchX509SVID.open(metadata=HEADER) as stream:
        await stream.send_message(pb.X509SVIDRequest(), end=True)
        assert await stream.recv_message() is not None
        await api.identities.change(svids=[])
        with pytest.raises(GRPCError):
            await stream.recv_message()
            await stream.recv_trailing_metadata()

    assert [kind for kind, _ in api.observer.events] == ["finished", "opened", "closed", "finished"]
    ok, denied = api.observer.outcomes
    assert ok.outcome == "ok"
    assert (denied.outcome, denied.reason) == ("denied", "no x509 svid for the caller's selectors")
    assert denied.spiffe_ids == (svid.spiffe_id,), "the denial names what the stream had"


async def test_the_observer_sees_invalid_requests_with_the_callers_pid(api: Api) -> None:
    with pytest.raises(GRPCError):
        await api.stub.FetchX509SVID(pb.X509SVIDRequest())
    with pytest.raises(GRPCError):
        await api.stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=["x"]), metadata=HEADER)

    missing_header, unimplemented = api.observer.outcomes
    assert (missing_header.outcome, missing_header.pid, missing_header.uid) == ("invalid", os.getpid(), os.getuid())
    assert missing_header.reason == "no workload.spiffe.io: true metadata"
    assert (unimplemented.method, unimplemented.outcome) == ("FetchJWTSVID", "invalid")
    assert unimplemented.reason == "FetchJWTSVID is not implemented"
    assert api.identities.attested == [], "identifying a caller for the record is not attesting it"


async def test_the_observer_sees_internal_errors(api: Api) -> None:
    api.identities.svid_error = RuntimeError("database is on fire")

    with pytest.raises(GRPCError) as caught:
        await api.stub.FetchX509SVID(pb.X509SVIDRequest(), metadata=HEADER)

    assert caught.value.status is Status.UNAVAILABLE
    (outcome,) = api.observer.outcomes
    assert (outcome.outcome, outcome.reason) == ("error", "RuntimeError")


async def test_a_failing_observer_changes_nothing_for_the_workload(
    socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = TestCa()
    identities = FakeIdentities({TRUST_DOMAIN: ca.bundle_der})
    identities.svids = [ca.issue(f"{TRUST_DOMAIN}/web")]
    observer = BrokenObserver()
    server = WorkloadApiServer(WorkloadApiService(identities, observer=observer), socket_dir / "agent.sock")
    await server.start()
    channel = Channel(path=str(socket_dir / "agent.sock"))
    try:
        with caplog.at_level(logging.ERROR, logger="vouchd.workload_api"):
            async with SpiffeWorkloadAPIStub(channel).FetchX509SVID.open(metadata=HEADER) as stream:
                await stream.send_message(pb.X509SVIDRequest(), end=True)
                first = await stream.recv_message()
                await identities.change(svids=[ca.issue(f"{TRUST_DOMAIN}/web")])
                second = await stream.recv_message()
                await stream.cancel()
            await observer.closed.wait()
    finally:
        channel.close()
        await server.close()

    assert first is not None and second is not None, "the stream kept serving despite the observer"
    assert [kind for kind, _ in observer.events] == ["finished", "opened", "closed"]
    failures = [r for r in caplog.records if r.getMessage() == "workload api observer failed"]
    assert [r.__dict__["observer_event"] for r in failures] == ["request_finished", "stream_opened", "stream_closed"]


async def test_the_attestation_deadline_is_the_services_and_named_in_the_reason(socket_dir: Path) -> None:
    identities = FakeIdentities({})
    identities.attest_hangs = True
    observer = RecordingObserver()
    service = WorkloadApiService(identities, attest_deadline=0.05, observer=observer)
    server = WorkloadApiServer(service, socket_dir / "agent.sock")
    await server.start()
    channel = Channel(path=str(socket_dir / "agent.sock"))
    try:
        with pytest.raises(GRPCError):
            await SpiffeWorkloadAPIStub(channel).FetchX509Bundles(pb.X509BundlesRequest(), metadata=HEADER)
    finally:
        channel.close()
        await server.close()

    (outcome,) = observer.outcomes
    assert (outcome.outcome, outcome.reason) == ("denied", "no attestation within 0.05s")


def test_request_outcomes_are_checked() -> None:
    with pytest.raises(ValueError, match="request outcome must be one of denied, error, invalid, ok, not 'maybe'"):
        RequestOutcome("FetchX509SVID", 1, 0, "maybe", "", (), 0.0)


# -- the socket's folder ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", [0o777, 0o775, 0o757, 0o770, 0o1777, 0o1770])
async def test_a_socket_folder_others_may_write_to_is_refused(socket_dir: Path, mode: int) -> None:
    # Even sticky: another user could bind the socket's name while the agent is down.
    folder = socket_dir / "run"
    folder.mkdir()
    folder.chmod(mode)

    with pytest.raises(
        WorkloadApiError,
        match=f"^workload api socket folder {folder} is writable by group or others: "
        "another user could replace the socket$",
    ):
        await WorkloadApiServer(WorkloadApiService(FakeIdentities({})), folder / "agent.sock").start()

    assert list(folder.iterdir()) == []


async def test_a_sticky_world_writable_folder_above_the_socket_is_accepted(socket_dir: Path) -> None:
    shared = socket_dir / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp: others may add entries, but not rename or remove ours
    folder = shared / "run"
    folder.mkdir(mode=0o755)
    server = WorkloadApiServer(WorkloadApiService(FakeIdentities({})), folder / "agent.sock")

    await server.start()
    try:
        assert stat.S_ISSOCK(os.lstat(folder / "agent.sock").st_mode)
    finally:
        await server.close()


async def test_a_folder_above_the_socket_that_others_may_write_to_is_refused(socket_dir: Path) -> None:
    # Whoever may rename `shared/run` can put a folder of their own in its place.
    shared = socket_dir / "shared"
    (shared / "run").mkdir(parents=True)
    shared.chmod(0o777)

    with pytest.raises(WorkloadApiError, match=f"^workload api socket folder {shared} \\(above {shared / 'run'}\\) is"):
        await WorkloadApiServer(WorkloadApiService(FakeIdentities({})), shared / "run" / "agent.sock").start()


async def test_a_socket_folder_owned_by_another_user_is_refused(socket_dir: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("only root can give a folder to another user")
    folder = socket_dir / "run"
    folder.mkdir(mode=0o755)
    os.chown(folder, 4242, 4242)

    with pytest.raises(
        WorkloadApiError,
        match=f"^workload api socket folder {folder} is owned by uid 4242, not by root or the agent \\(uid 0\\): "
        "its owner could replace the socket$",
    ):
        await WorkloadApiServer(WorkloadApiService(FakeIdentities({})), folder / "agent.sock").start()


async def test_an_ancestor_owned_by_another_user_is_only_warned_about(
    socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A checkout in a user's home, started with sudo: the user chose to put the agent there.
    if os.geteuid() != 0:
        pytest.skip("only root can give a folder to another user")
    home = socket_dir / "home"
    (home / "run").mkdir(parents=True, mode=0o755)
    home.chmod(0o755)
    os.chown(home, 4242, 4242)
    server = WorkloadApiServer(WorkloadApiService(FakeIdentities({})), home / "run" / "agent.sock")

    await server.start()
    await server.close()

    assert f"workload api socket folder {home} (above {home / 'run'}) is owned by uid 4242" in caplog.text


async def test_missing_socket_folders_are_made_0755_whatever_the_umask(socket_dir: Path) -> None:
    path = socket_dir / "a" / "b" / "agent.sock"
    previous = os.umask(0o002)  # would leave mkdir's folders group-writable, which bind then refuses
    try:
        server = WorkloadApiServer(WorkloadApiService(FakeIdentities({})), path)
        await server.start()
    finally:
        os.umask(previous)
    try:
        assert stat.S_IMODE(os.stat(socket_dir / "a").st_mode) == 0o755
        assert stat.S_IMODE(os.stat(socket_dir / "a" / "b").st_mode) == 0o755
    finally:
        await server.close()


async def test_a_kernel_without_peer_pidfd_is_warned_about_at_start(
    socket_dir: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(server_module, "kernel_has_peer_pidfd", lambda: False)
    server = WorkloadApiServer(WorkloadApiService(FakeIdentities({})), socket_dir / "agent.sock")

    with caplog.at_level(logging.WARNING, logger="vouchd.workload_api"):
        await server.start()
    await server.close()

    (warning,) = [r for r in caplog.records if r.name == "vouchd.workload_api"]
    assert warning.levelno == logging.WARNING
    assert warning.getMessage().startswith("kernel has no SO_PEERPIDFD (linux 6.5+)")


async def test_a_kernel_with_peer_pidfd_is_not_warned_about(socket_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    if not kernel_has_peer_pidfd():
        pytest.skip("kernel has no SO_PEERPIDFD")
    server = WorkloadApiServer(WorkloadApiService(FakeIdentities({})), socket_dir / "agent.sock")

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
