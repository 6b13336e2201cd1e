"""The machine's floor: the least a Workload API server on this host can cost per FetchX509SVID.

    python scripts/bench_floor.py SOCKET RESPONSE_FILE

A grpclib server on a Unix socket that answers FetchX509SVID with a fixed X509SVIDResponse (the bytes
in RESPONSE_FILE: one of vouchd's own answers, so the same size), with no security header check, no
peer credentials, no attestation, no decision and no log line; like vouchd, it then keeps the stream
open until the client cancels it. Every other RPC answers Unimplemented. It says {"ready": true} on
stdout once it listens, and serves until SIGTERM or SIGINT.

The bench drives it with the same client code as the agent (bench_clients.py load), in the same run:
the agent's calls per second divided by the floor's is a figure that a shared, noisy machine leaves
roughly where it is, unlike either on its own.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server, Stream

from vouchd.proto import workload_pb2 as pb
from vouchd.proto.workload_grpc import SpiffeWorkloadAPIBase


class FloorService(SpiffeWorkloadAPIBase):
    def __init__(self, response: pb.X509SVIDResponse) -> None:
        self._response = response

    async def FetchX509SVID(self, stream: Stream[pb.X509SVIDRequest, pb.X509SVIDResponse]) -> None:  # noqa: N802
        await stream.recv_message()
        await stream.send_message(self._response)
        await asyncio.Event().wait()  # a stream stays open until the client cancels it, as vouchd's do

    async def FetchX509Bundles(self, stream: Stream[Any, Any]) -> None:  # noqa: N802
        raise GRPCError(Status.UNIMPLEMENTED)

    async def FetchJWTSVID(self, stream: Stream[Any, Any]) -> None:  # noqa: N802
        raise GRPCError(Status.UNIMPLEMENTED)

    async def FetchJWTBundles(self, stream: Stream[Any, Any]) -> None:  # noqa: N802
        raise GRPCError(Status.UNIMPLEMENTED)

    async def ValidateJWTSVID(self, stream: Stream[Any, Any]) -> None:  # noqa: N802
        raise GRPCError(Status.UNIMPLEMENTED)

    async def FetchWITSVID(self, stream: Stream[Any, Any]) -> None:  # noqa: N802
        raise GRPCError(Status.UNIMPLEMENTED)

    async def FetchWITBundles(self, stream: Stream[Any, Any]) -> None:  # noqa: N802
        raise GRPCError(Status.UNIMPLEMENTED)


async def serve(socket: Path, response: pb.X509SVIDResponse) -> None:
    server = Server([FloorService(response)])
    await server.start(path=str(socket), backlog=4096)
    socket.chmod(0o777)  # as vouchd's: the bench's new workloads run as other uids
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sys.stdout.write(json.dumps({"ready": True}) + "\n")
    sys.stdout.flush()
    try:
        await stop.wait()
    finally:
        server.close()
        await server.wait_closed()
        socket.unlink(missing_ok=True)


def main() -> None:
    socket, response_file = Path(sys.argv[1]), Path(sys.argv[2])
    asyncio.run(serve(socket, pb.X509SVIDResponse.FromString(response_file.read_bytes())))


if __name__ == "__main__":
    main()
