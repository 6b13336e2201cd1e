"""Callers that cannot hurt the agent: the Workload API's limits (limits.py) and its guard (guard.py).

Request shapes are checked on the protobuf messages alone; everything else over a real Unix socket,
with the fake agent of test_workload_api_server behind it, grpclib stubs for well-behaved callers and
tests.rawgrpc for the others. A caller of another uid is a child process that drops to `nobody`
before it connects (the tests run as root).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from h2.errors import ErrorCodes

from tests.rawgrpc import RawGrpcConnection, grpc_frame
from tests.unit.test_workload_api_server import (
    HEADER,
    TRUST_DOMAIN,
    FakeIdentities,
    RecordingDecisions,
    TestCa,
)
from vouchd.agent.workload_api.calls import RefusedError
from vouchd.agent.workload_api.limits import (
    MAX_AUDIENCE_LENGTH,
    MAX_AUDIENCES,
    MAX_REQUEST_BYTES,
    MAX_SPIFFE_ID_LENGTH,
    MAX_TOKEN_LENGTH,
    AttestationSlots,
    ConnectionLimits,
    UidCounts,
    check_jwt_svid_request,
    check_validate_request,
)
from vouchd.agent.workload_api.server import WorkloadApiServer, WorkloadApiService
from vouchd.proto import workload_pb2 as pb
from vouchd.proto.workload_grpc import SpiffeWorkloadAPIStub

NOBODY = 65534
DEADLINE = 5.0  # bound on every wait for the server
GUARD_LOGGER = "vouchd.workload_api"
REFUSED = "workload api caller refused"


# -- request shapes (the JWT RPCs call these) ---------------------------------------------------------------


@pytest.mark.parametrize(
    "request_message",
    [
        pb.JWTSVIDRequest(audience=["spiffe://example.org/db"]),
        pb.JWTSVIDRequest(audience=["a" * MAX_AUDIENCE_LENGTH] * MAX_AUDIENCES),
        pb.JWTSVIDRequest(audience=["db"], spiffe_id="spiffe://example.org/" + "x" * (MAX_SPIFFE_ID_LENGTH - 21)),
    ],
)
def test_a_sane_jwt_svid_request_passes(request_message: pb.JWTSVIDRequest) -> None:
    check_jwt_svid_request(request_message)


@pytest.mark.parametrize(
    ("request_message", "public"),
    [
        (None, "audience must be specified"),
        (pb.JWTSVIDRequest(), "audience must be specified"),
        (pb.JWTSVIDRequest(audience=[""]), "audience must not be empty"),
        (pb.JWTSVIDRequest(audience=["db", ""]), "audience must not be empty"),
        (pb.JWTSVIDRequest(audience=["a"] * (MAX_AUDIENCES + 1)), "at most 16 audiences may be requested"),
        (pb.JWTSVIDRequest(audience=[str(i) for i in range(5000)]), "at most 16 audiences may be requested"),
        (pb.JWTSVIDRequest(audience=["a" * (MAX_AUDIENCE_LENGTH + 1)]), "audience longer than 512 characters"),
        (pb.JWTSVIDRequest(audience=["a" * 1_000_000]), "audience longer than 512 characters"),
        (pb.JWTSVIDRequest(audience=["db"], spiffe_id="spiffe://example.org/" + "é" * 1024),
         "spiffe id longer than 2048 bytes"),
    ],
)
def test_an_absurd_jwt_svid_request_is_an_invalid_argument(request_message: pb.JWTSVIDRequest | None,
                                                            public: str) -> None:
    with pytest.raises(RefusedError) as refused:
        check_jwt_svid_request(request_message)

    assert (refused.value.status, refused.value.code, refused.value.public) == (
        Status.INVALID_ARGUMENT, "invalid_argument", public)


def test_a_sane_validate_request_passes() -> None:
    check_validate_request(pb.ValidateJWTSVIDRequest(audience="a" * MAX_AUDIENCE_LENGTH, svid="t" * MAX_TOKEN_LENGTH))


@pytest.mark.parametrize(
    ("request_message", "public"),
    [
        (None, "audience must be specified"),
        (pb.ValidateJWTSVIDRequest(svid="token"), "audience must be specified"),
        (pb.ValidateJWTSVIDRequest(audience="a" * (MAX_AUDIENCE_LENGTH + 1), svid="token"),
         "audience longer than 512 characters"),
        (pb.ValidateJWTSVIDRequest(audience="db"), "svid must be specified"),
        (pb.ValidateJWTSVIDRequest(audience="db", svid="t" * (MAX_TOKEN_LENGTH + 1)),
         "svid longer than 16384 characters"),
        (pb.ValidateJWTSVIDRequest(audience="db", svid="t" * 2_000_000), "svid longer than 16384 characters"),
    ],
)
def test_an_absurd_validate_request_is_an_invalid_argument(request_message: pb.ValidateJWTSVIDRequest | None,
                                                           public: str) -> None:
    with pytest.raises(RefusedError) as refused:
        check_validate_request(request_message)

    assert (refused.value.status, refused.value.code, refused.value.public) == (
        Status.INVALID_ARGUMENT, "invalid_argument", public)


def test_the_largest_jwt_a_request_may_ask_for_fits_the_validate_limit() -> None:
    # Audiences at their limits, base64url (4/3), plus header, the other claims and an ES256 signature.
    claims = len('"aud":[]') + MAX_AUDIENCES * (MAX_AUDIENCE_LENGTH + 3) + MAX_SPIFFE_ID_LENGTH + 300
    assert (claims + 100) * 4 // 3 + 100 < MAX_TOKEN_LENGTH
    assert MAX_TOKEN_LENGTH + MAX_AUDIENCE_LENGTH + 16 < MAX_REQUEST_BYTES


# -- per-uid counts --------------------------------------------------------------------------------------


def test_each_uid_has_a_cap_of_its_own() -> None:
    counts = UidCounts(2)

    assert [counts.take(1000), counts.take(1000), counts.take(1000)] == [True, True, False]
    assert counts.take(1001), "another uid is not counted against the first"
    counts.give_back(1000)
    assert counts.take(1000)
    assert (counts.held(1000), counts.held(1001), counts.held(1002)) == (2, 1, 0)


async def test_attestations_of_one_uid_wait_for_a_slot_while_other_uids_do_not() -> None:
    slots = AttestationSlots(per_uid=2)
    release = asyncio.Event()
    entered: list[str] = []

    async def attest(name: str, uid: int) -> None:
        async with slots.slot(uid, wait=DEADLINE):
            entered.append(name)
            await release.wait()

    async with asyncio.timeout(DEADLINE), asyncio.TaskGroup() as tasks:
        for name in ("a1", "a2", "a3"):
            tasks.create_task(attest(name, 1000))
        await asyncio.sleep(0.05)
        assert entered == ["a1", "a2"], "the third attestation of uid 1000 waits"
        async with slots.slot(1001, wait=0.01):
            assert slots.in_use(1001) == 1, "uid 1001 gets a slot at once"
        release.set()
    assert entered == ["a1", "a2", "a3"]
    assert (slots.in_use(1000), slots.in_use(1001)) == (0, 0)


async def test_an_attestation_that_gets_no_slot_in_time_is_resource_exhausted() -> None:
    slots = AttestationSlots(per_uid=1)
    async with slots.slot(1000, wait=DEADLINE):
        started = time.monotonic()
        with pytest.raises(RefusedError) as refused:
            async with slots.slot(1000, wait=0.1):
                pass
        waited = time.monotonic() - started

    assert (refused.value.status, refused.value.code, refused.value.public) == (
        Status.RESOURCE_EXHAUSTED, "resource_exhausted", "too many requests in progress")
    assert "uid 1000" in refused.value.detail
    assert 0.09 <= waited < 1.0
    assert slots.in_use(1000) == 0


# -- the server ------------------------------------------------------------------------------------------


@dataclass
class Served:
    server: WorkloadApiServer
    identities: FakeIdentities
    decisions: RecordingDecisions
    socket_path: Path


@pytest.fixture
def socket_dir() -> Iterator[Path]:
    # /tmp, not tmp_path (AF_UNIX paths are short); reachable by the `nobody` callers.
    with tempfile.TemporaryDirectory(prefix="wlapi-", dir="/tmp") as directory:
        os.chmod(directory, 0o755)
        yield Path(directory)


@asynccontextmanager
async def serving(socket_dir: Path, limits: ConnectionLimits | None = None, *, attest_deadline: float = 2.0,
                  attestations_per_uid: int = 8) -> AsyncIterator[Served]:
    ca = TestCa()
    identities = FakeIdentities({TRUST_DOMAIN: ca.bundle_der})
    identities.svids = [ca.issue(f"{TRUST_DOMAIN}/web")]
    decisions = RecordingDecisions()
    service = WorkloadApiService(identities, decisions=decisions, attest_deadline=attest_deadline,
                                 attestations_per_uid=attestations_per_uid)
    socket_path = socket_dir / "agent.sock"
    server = WorkloadApiServer(service, socket_path, limits=limits)
    await server.start()
    try:
        yield Served(server, identities, decisions, socket_path)
    finally:
        await server.close()


async def fetch(channel: Channel) -> str:
    """A well-behaved FetchX509SVID: the first message's SPIFFE ID."""
    async with asyncio.timeout(DEADLINE), SpiffeWorkloadAPIStub(channel).FetchX509SVID.open(metadata=HEADER) as stream:
        await stream.send_message(pb.X509SVIDRequest(), end=True)
        response = await stream.recv_message()
        assert response is not None
        await stream.cancel()
        return str(response.svids[0].spiffe_id)


async def fetch_as_nobody(socket_path: Path) -> str:
    """FetchX509SVID from a process of another uid: the SPIFFE ID, or the status' name."""
    code = textwrap.dedent(f"""
        import asyncio, os
        from grpclib.client import Channel
        from grpclib.exceptions import GRPCError
        from vouchd.proto import workload_pb2 as pb
        from vouchd.proto.workload_grpc import SpiffeWorkloadAPIStub
        os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        async def main():
            channel = Channel(path={str(socket_path)!r})
            try:
                async with SpiffeWorkloadAPIStub(channel).FetchX509SVID.open(metadata={HEADER!r}) as stream:
                    await stream.send_message(pb.X509SVIDRequest(), end=True)
                    print((await stream.recv_message()).svids[0].spiffe_id)
                    await stream.cancel()
            except GRPCError as err:
                print(err.status.name)
            finally:
                channel.close()
        asyncio.run(asyncio.wait_for(main(), 5))
    """)
    child = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=asyncio.subprocess.PIPE,
                                                 stderr=asyncio.subprocess.PIPE)
    async with asyncio.timeout(3 * DEADLINE):
        out, err = await child.communicate()
    assert child.returncode == 0, err.decode()
    return out.decode().strip()


def x509_request(size: int | None = None) -> bytes:
    """An X509SVIDRequest, padded to exactly `size` bytes with an unknown field (which protobuf skips)."""
    if size is None:
        return pb.X509SVIDRequest().SerializeToString()
    for length_bytes in (1, 2, 3, 4):
        payload = size - 1 - length_bytes
        if payload >= 0 and len(_varint(payload)) == length_bytes:
            return b"\x7a" + _varint(payload) + bytes(payload)  # field 15, length-delimited
    raise AssertionError(size)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        out.append((value & 0x7F) | (0x80 if value > 0x7F else 0))
        value >>= 7
        if not value:
            return bytes(out)


def refusals(caplog: pytest.LogCaptureFixture, code: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == GUARD_LOGGER and r.getMessage() == REFUSED
            and r.__dict__["code"] == code]


async def raw(socket_path: Path, *, preface: bool = True) -> RawGrpcConnection:
    return await asyncio.to_thread(RawGrpcConnection, socket_path, preface=preface)


# -- the size of a request -------------------------------------------------------------------------------


async def test_a_request_declaring_a_gigabyte_is_refused_before_anything_is_buffered(
    socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(socket_dir) as api:
        conn = await raw(api.socket_path)
        stream_id = conn.request()
        conn.send(stream_id, grpc_frame(b"", declared=1 << 30))
        pushed = await asyncio.to_thread(conn.push, stream_id, 10_000_000, within=2.0)
        outcome = await asyncio.to_thread(conn.wait_for, stream_id, within=DEADLINE)
        conn.close()

    assert (outcome.status, outcome.message) == (Status.INVALID_ARGUMENT.value, "request message too large")
    assert outcome.reset == ErrorCodes.NO_ERROR, "reset, so the caller stops sending"
    assert pushed <= 65_535, "no more than one window (HTTP/2's default) went in before the refusal"
    assert api.identities.attested == [], "nobody was attested"
    (record,) = refusals(caplog, "request_too_large")
    assert (record.levelno, record.__dict__["uid"], record.__dict__["pid"]) == (logging.WARNING, os.getuid(),
                                                                                 os.getpid())
    assert record.__dict__["reason"] == "a request message of 1073741824 bytes, more than 65536"


async def test_a_request_of_the_limit_is_served_and_one_byte_more_is_refused(socket_dir: Path) -> None:
    async with serving(socket_dir) as api:
        conn = await raw(api.socket_path)
        at_limit, over = conn.request(), conn.request()
        message = grpc_frame(x509_request(MAX_REQUEST_BYTES))
        sent = await asyncio.to_thread(conn.send_flowing, at_limit, message, end_stream=True, within=DEADLINE)
        served = await asyncio.to_thread(conn.wait_for_data, at_limit, within=DEADLINE)
        await asyncio.to_thread(conn.send_flowing, over, grpc_frame(x509_request(MAX_REQUEST_BYTES + 1)),
                                within=DEADLINE)
        refused = await asyncio.to_thread(conn.wait_for, over, within=DEADLINE)
        conn.close()

    assert sent == len(message)
    assert served.data and not served.ended, "the stream got its SVIDs and stays open"
    assert (refused.status, refused.message) == (Status.INVALID_ARGUMENT.value, "request message too large")
    assert len(api.identities.attested) == 1


async def test_a_length_prefix_split_across_frames_is_read_whole(socket_dir: Path) -> None:
    async with serving(socket_dir) as api:
        conn = await raw(api.socket_path)
        stream_id = conn.request()
        conn.send(stream_id, grpc_frame(b"", declared=MAX_REQUEST_BYTES + 1), frame_size=1)
        outcome = await asyncio.to_thread(conn.wait_for, stream_id, within=DEADLINE)
        conn.close()

    assert (outcome.status, outcome.message) == (Status.INVALID_ARGUMENT.value, "request message too large")


async def test_a_compressed_request_is_unimplemented(socket_dir: Path) -> None:
    async with serving(socket_dir) as api:
        conn = await raw(api.socket_path)
        stream_id = conn.request()
        conn.send(stream_id, grpc_frame(b"\x1f\x8b", flag=1), end_stream=True)
        outcome = await asyncio.to_thread(conn.wait_for, stream_id, within=DEADLINE)
        conn.close()

    assert (outcome.status, outcome.message) == (Status.UNIMPLEMENTED.value, "compressed requests are not supported")
    assert api.identities.attested == []


async def test_a_request_that_ends_inside_its_message_is_an_invalid_argument(
    socket_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serving(socket_dir) as api:
        conn = await raw(api.socket_path)
        stream_id = conn.request()
        conn.send(stream_id, grpc_frame(b"abc", declared=10), end_stream=True)
        outcome = await asyncio.to_thread(conn.wait_for, stream_id, within=DEADLINE)
        conn.close()

    assert (outcome.status, outcome.message) == (Status.INVALID_ARGUMENT.value, "request message incomplete")
    assert api.identities.attested == []
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], "a caller's mistake is not our error"


async def test_a_connection_can_park_one_flow_control_window_at_most(socket_dir: Path) -> None:
    async with serving(socket_dir) as api:
        conn = await raw(api.socket_path)
        streams = [conn.request() for _ in range(3)]
        for stream_id in streams:
            conn.send(stream_id, grpc_frame(x509_request()))
        served = [await asyncio.to_thread(conn.wait_for_data, stream_id, within=DEADLINE) for stream_id in streams]
        # Each handler has its request and reads no more: whatever else is sent stays unread.
        parked = 0
        for stream_id in streams:
            parked += await asyncio.to_thread(conn.push, stream_id, 10_000_000, within=0.3)
        conn.close()

    assert all(outcome.data for outcome in served)
    assert conn.h2.remote_settings.initial_window_size == 65_535, "each stream's window: HTTP/2's default"
    assert parked <= 65_535, "and the connection's, shared by its streams"


async def test_a_caller_that_does_not_read_is_not_read_from(socket_dir: Path) -> None:
    # Each PING makes the agent queue a PING ACK of the same size: a caller that never reads would
    # otherwise have the agent hold whatever it sends.
    ping = b"\x00\x00\x08\x06\x00\x00\x00\x00\x00" + bytes(8)
    async with serving(socket_dir) as api:
        conn = await raw(api.socket_path)
        flood = ping * (50_000_000 // len(ping))
        first = await asyncio.to_thread(conn.send_raw, flood, within=1.5)
        more = await asyncio.to_thread(conn.send_raw, flood[first:], within=0.5)
        conn.close()

    assert first < 4_000_000
    assert more == 0, "the agent stopped reading"


# -- per-uid caps ------------------------------------------------------------------------------------------


async def test_open_streams_are_capped_per_uid(socket_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with serving(socket_dir, ConnectionLimits(streams_per_uid=3)) as api:
        channel = Channel(path=str(api.socket_path))
        stub = SpiffeWorkloadAPIStub(channel)
        try:
            async with asyncio.timeout(DEADLINE):
                held = []
                for _ in range(3):
                    stream = await stub.FetchX509SVID.open(metadata=HEADER).__aenter__()
                    await stream.send_message(pb.X509SVIDRequest(), end=True)
                    assert await stream.recv_message() is not None
                    held.append(stream)
                with pytest.raises(GRPCError) as refused:
                    await fetch(channel)
                other_uid = await fetch_as_nobody(api.socket_path)
                await held[0].cancel()
                await asyncio.sleep(0.05)
                after_one_closed = await fetch(channel)
                for stream in held[1:]:
                    await stream.cancel()
        finally:
            channel.close()

    assert (refused.value.status, refused.value.message) == (Status.RESOURCE_EXHAUSTED, "too many open streams")
    assert other_uid == f"{TRUST_DOMAIN}/web", "another uid is not counted against this one"
    assert after_one_closed == f"{TRUST_DOMAIN}/web"
    (record,) = refusals(caplog, "too_many_streams")
    assert record.__dict__["uid"] == os.getuid()
    assert record.__dict__["reason"] == f"uid {os.getuid()} holds 3 open streams"


async def test_connections_are_capped_per_uid(socket_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with serving(socket_dir, ConnectionLimits(connections_per_uid=2)) as api:
        first, second = await raw(api.socket_path), await raw(api.socket_path)
        third = await raw(api.socket_path)
        third_closed = await asyncio.to_thread(third.wait_closed, within=DEADLINE)
        other_uid = await fetch_as_nobody(api.socket_path)
        first.close()
        # The agent notices the closed connection soon, not at once: try until it did.
        deadline = time.monotonic() + DEADLINE
        while True:
            fourth = await raw(api.socket_path)
            stream_id = fourth.request()
            fourth.send(stream_id, grpc_frame(x509_request()), end_stream=True)
            outcome = await asyncio.to_thread(fourth.wait_for_data, stream_id, within=DEADLINE)
            if outcome.data or time.monotonic() > deadline:
                break
            fourth.close()
        for conn in (second, third, fourth):
            conn.close()

    assert third_closed and third.goaway == (ErrorCodes.ENHANCE_YOUR_CALM, b"too many connections")
    assert other_uid == f"{TRUST_DOMAIN}/web", "another uid is not counted against this one"
    assert outcome.data, "a closed connection gives its place back"
    assert refusals(caplog, "too_many_connections")[0].__dict__["uid"] == os.getuid()


async def test_streams_the_caller_resets_at_once_give_their_place_back(socket_dir: Path) -> None:
    # The handler of a stream reset in the same read as its HEADERS is cancelled before it starts,
    # and grpclib then never releases the stream: the guard does.
    async with serving(socket_dir, ConnectionLimits(streams_per_uid=3)) as api:
        conn = await raw(api.socket_path)
        for _ in range(10):
            conn.reset(conn.request(flush=False))
        for _ in range(5):
            refused = conn.request()
            conn.send(refused, grpc_frame(b"", declared=1 << 30))
            await asyncio.to_thread(conn.wait_for, refused, within=DEADLINE)
        stream_id = conn.request()
        conn.send(stream_id, grpc_frame(x509_request()), end_stream=True)
        outcome = await asyncio.to_thread(conn.wait_for_data, stream_id, within=DEADLINE)
        conn.close()

    assert outcome.data and outcome.status is None, "served, not refused for too many streams"


async def test_attestations_are_capped_per_uid(socket_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with serving(socket_dir, attest_deadline=0.3, attestations_per_uid=1) as api:
        api.identities.attest_hangs = True
        channels = [Channel(path=str(api.socket_path)) for _ in range(3)]
        try:
            results: list[str] = []

            async def refused(channel: Channel) -> None:
                with pytest.raises(GRPCError) as caught:
                    await fetch(channel)
                results.append(caught.value.status.name)

            async with asyncio.timeout(DEADLINE), asyncio.TaskGroup() as tasks:
                tasks.create_task(refused(channels[0]))
                while not api.identities.attested:
                    await asyncio.sleep(0.01)
                tasks.create_task(refused(channels[1]))  # waits for the slot, gets it when the first times out
                await asyncio.sleep(0.05)
                tasks.create_task(refused(channels[2]))  # waits while the second holds it
        finally:
            for channel in channels:
                channel.close()

    assert sorted(results) == ["PERMISSION_DENIED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"]
    assert len(api.identities.attested) == 2, "the one without a slot was never attested"
    (exhausted,) = [d for d in api.decisions.all if dict(d.details).get("code") == "resource_exhausted"]
    assert exhausted.caller.uid == os.getuid()
    assert exhausted.reason == f"uid {os.getuid()} has 1 attestations in progress and none ended within 0.3s"


# -- the first-request deadline --------------------------------------------------------------------------


@pytest.mark.parametrize("sends", ["nothing", "the http/2 preface", "half a request"])
async def test_a_connection_without_a_complete_request_is_closed_after_the_deadline(
    socket_dir: Path, caplog: pytest.LogCaptureFixture, sends: str
) -> None:
    async with serving(socket_dir, ConnectionLimits(first_request_timeout=0.3)) as api:
        conn = await raw(api.socket_path, preface=sends != "nothing")
        if sends == "half a request":
            conn.send(conn.request(), grpc_frame(b"", declared=5)[:3])
        started = time.monotonic()
        closed = await asyncio.to_thread(conn.wait_closed, within=DEADLINE)
        elapsed = time.monotonic() - started
        conn.close()

    assert closed and 0.2 <= elapsed < 2.0
    if sends != "nothing":
        assert conn.goaway == (ErrorCodes.NO_ERROR, b"no request within 0.3s")
    (record,) = refusals(caplog, "no_request_in_time")
    assert record.__dict__["uid"] == os.getuid()
    assert api.identities.attested == []


async def test_a_connection_whose_request_came_in_time_stays_open(socket_dir: Path) -> None:
    async with serving(socket_dir, ConnectionLimits(first_request_timeout=0.3)) as api:
        conn = await raw(api.socket_path)
        stream_id = conn.request()
        conn.send(stream_id, grpc_frame(x509_request()), end_stream=True)
        served = await asyncio.to_thread(conn.wait_for_data, stream_id, within=DEADLINE)
        closed = await asyncio.to_thread(conn.wait_closed, within=0.6)
        conn.close()

    assert served.data
    assert not closed and not served.ended


# -- logging -----------------------------------------------------------------------------------------------


async def test_a_caller_refused_in_a_loop_is_logged_once(socket_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    async with serving(socket_dir) as api:
        conn = await raw(api.socket_path)
        for _ in range(5):
            stream_id = conn.request()
            conn.send(stream_id, grpc_frame(b"", declared=1 << 30))
            outcome = await asyncio.to_thread(conn.wait_for, stream_id, within=DEADLINE)
            assert outcome.status == Status.INVALID_ARGUMENT.value
        conn.close()

    assert len(refusals(caplog, "request_too_large")) == 1
