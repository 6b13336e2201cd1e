"""A SPIFFE Workload API client (grpclib), for `vouchd api ...` against any SPIFFE agent's socket.

It speaks the standard API only (spiffe/spiffe workloadapi.proto, the `workload.spiffe.io: true`
header), so it works against vouchd, spire-agent or any other implementation. Errors come back as
WorkloadApiClientError carrying the gRPC status name and the server's message.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from google.protobuf.json_format import MessageToDict
from grpclib.client import Channel
from grpclib.exceptions import GRPCError, StreamTerminatedError

from vouchd.errors import VouchdError
from vouchd.proto import workload_pb2 as pb
from vouchd.proto.workload_grpc import SpiffeWorkloadAPIStub

__all__ = [
    "ENDPOINT_VARIABLE",
    "FetchedJwtSvid",
    "FetchedX509Svid",
    "WorkloadApiClientError",
    "endpoint_socket",
    "fetch_jwt_svids",
    "fetch_x509",
    "validate_jwt_svid",
    "watch_x509",
]

ENDPOINT_VARIABLE = "SPIFFE_ENDPOINT_SOCKET"
_HEADER = {"workload.spiffe.io": "true"}
_TIMEOUT = 30.0


class WorkloadApiClientError(VouchdError):
    """The Workload API refused a request or could not be reached."""


@dataclass(frozen=True)
class FetchedX509Svid:
    spiffe_id: str
    cert_chain_der: bytes
    private_key_der: bytes = field(repr=False)
    bundle_der: bytes
    hint: str


@dataclass(frozen=True)
class FetchedJwtSvid:
    spiffe_id: str
    token: str = field(repr=False)
    hint: str


def endpoint_socket(explicit: str | None) -> Path:
    """The socket from --socket, else from SPIFFE_ENDPOINT_SOCKET (`unix:/path` or `unix:///path`)."""
    text = explicit or os.environ.get(ENDPOINT_VARIABLE)
    if not text:
        raise WorkloadApiClientError(f"no Workload API socket: pass --socket or set {ENDPOINT_VARIABLE}")
    for prefix in ("unix://", "unix:"):
        if text.startswith(prefix):
            text = text[len(prefix):]
            break
    else:
        if not text.startswith("/"):
            raise WorkloadApiClientError(f"{text[:200]!r} is not a unix socket address (unix:/path)")
    return Path(text)


@asynccontextmanager
async def _stub(socket: Path) -> AsyncIterator[SpiffeWorkloadAPIStub]:
    channel = Channel(path=str(socket))
    try:
        yield SpiffeWorkloadAPIStub(channel)
    except GRPCError as err:
        raise WorkloadApiClientError(f"{err.status.name}: {err.message or 'no message'}") from None
    except (OSError, StreamTerminatedError) as err:
        raise WorkloadApiClientError(f"cannot talk to the Workload API at {socket}: {err}") from None
    finally:
        channel.close()


def _x509_svids(response: pb.X509SVIDResponse) -> list[FetchedX509Svid]:
    return [FetchedX509Svid(spiffe_id=s.spiffe_id, cert_chain_der=s.x509_svid, private_key_der=s.x509_svid_key,
                            bundle_der=s.bundle, hint=s.hint) for s in response.svids]


async def fetch_x509(socket: Path) -> list[FetchedX509Svid]:
    """The caller's X.509-SVIDs: the first message of the FetchX509SVID stream."""
    async with _stub(socket) as stub, stub.FetchX509SVID.open(metadata=_HEADER, timeout=_TIMEOUT) as stream:
        await stream.send_message(pb.X509SVIDRequest(), end=True)
        response = await stream.recv_message()
        await stream.cancel()
    if response is None:
        raise WorkloadApiClientError("the Workload API ended the stream without an answer")
    return _x509_svids(response)


async def watch_x509(socket: Path) -> AsyncIterator[list[FetchedX509Svid]]:
    """Every message of the FetchX509SVID stream, as the agent sends them (rotation, changes)."""
    async with _stub(socket) as stub, stub.FetchX509SVID.open(metadata=_HEADER) as stream:
        await stream.send_message(pb.X509SVIDRequest(), end=True)
        async for response in stream:
            yield _x509_svids(response)


async def fetch_jwt_svids(socket: Path, audiences: Sequence[str], spiffe_id: str = "") -> list[FetchedJwtSvid]:
    async with _stub(socket) as stub:
        response = await stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=list(audiences), spiffe_id=spiffe_id),
                                           metadata=_HEADER, timeout=_TIMEOUT)
    return [FetchedJwtSvid(spiffe_id=s.spiffe_id, token=s.svid, hint=s.hint) for s in response.svids]


async def validate_jwt_svid(socket: Path, token: str, audience: str) -> tuple[str, dict[str, Any]]:
    """The token's SPIFFE ID and claims, as the Workload API validated them."""
    async with _stub(socket) as stub:
        response = await stub.ValidateJWTSVID(pb.ValidateJWTSVIDRequest(audience=audience, svid=token),
                                              metadata=_HEADER, timeout=_TIMEOUT)
    return response.spiffe_id, MessageToDict(response.claims)
