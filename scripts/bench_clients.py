"""The bench's Workload API clients: each runs as a process of its own and reports JSON lines on stdout.

    python scripts/bench_clients.py MODE SOCKET [options]     (see --help of each mode)

Why processes. The agent never hands a process an identity one of its ancestors holds (lineage), so
the bench, whose children these are, never calls the Workload API itself: its children are siblings
and may all hold root's identity. And a client's CPU is spent outside the bench's event loop. The
floor server (bench_floor.py) and the agent are driven by the very same code (`load`).

Times that span processes are CLOCK_MONOTONIC (time.monotonic(): one clock for the whole host);
latencies are time.perf_counter() differences inside one process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from vouchd.proto import workload_pb2 as pb
from vouchd.proto.workload_grpc import SpiffeWorkloadAPIStub

HEADER = {"workload.spiffe.io": "true"}
DEADLINE = 30.0  # every wait of a client is bounded by this (seconds)


def say(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


def spread(values_ms: Sequence[float]) -> dict[str, float | None]:
    """p50, p99 (nearest rank: with fewer than 100 values it is the maximum) and max, in ms."""
    if not values_ms:
        return {"p50_ms": None, "p99_ms": None, "max_ms": None}
    ordered = sorted(values_ms)
    return {
        "p50_ms": round(statistics.median(ordered), 3),
        "p99_ms": round(ordered[math.ceil(len(ordered) * 0.99) - 1], 3),
        "max_ms": round(ordered[-1], 3),
    }


# -- one call -------------------------------------------------------------------------------------------


async def fetch_x509(stub: SpiffeWorkloadAPIStub) -> pb.X509SVIDResponse:
    """The first message of a FetchX509SVID stream, then the stream cancelled: what go-spiffe's
    FetchX509SVID and py-spiffe's fetch_x509_svid do."""
    async with stub.FetchX509SVID.open(metadata=HEADER, timeout=DEADLINE) as stream:
        await stream.send_message(pb.X509SVIDRequest(), end=True)
        response = await stream.recv_message()
        await stream.cancel()
    if response is None or not response.svids:
        raise RuntimeError("the stream ended without an X509SVIDResponse")
    return response


def jwt_fetcher(audience: str) -> Callable[[SpiffeWorkloadAPIStub], Awaitable[object]]:
    async def fetch_jwt(stub: SpiffeWorkloadAPIStub) -> object:
        response = await stub.FetchJWTSVID(pb.JWTSVIDRequest(audience=[audience]), metadata=HEADER, timeout=DEADLINE)
        if not response.svids:
            raise RuntimeError("FetchJWTSVID answered no JWT-SVID")
        return response
    return fetch_jwt


def describe(err: BaseException) -> str:
    if isinstance(err, GRPCError):
        return f"{err.status.name}: {err.message}"
    return f"{type(err).__name__}: {err}"


# -- load: calls per second at a concurrency ------------------------------------------------------------


async def load(socket: str, concurrency: int, seconds: float, per_call: bool,
               call: Callable[[SpiffeWorkloadAPIStub], Awaitable[object]]) -> dict[str, Any]:
    """`concurrency` callers call back to back for `seconds`, each on a connection of its own (kept, or
    new for every call with `per_call`). Each caller's first call is a warm-up (its connection's
    attestation, an SVID's issuance) and is not counted; the clock starts once every caller made one."""
    latencies: list[float] = []
    errors: list[str] = []
    warmed = 0
    all_warm = asyncio.Event()
    stop_at = math.inf

    async def one(stub: SpiffeWorkloadAPIStub) -> None:
        started = time.perf_counter()
        try:
            await call(stub)
        except (GRPCError, StreamTerminatedError, OSError, RuntimeError) as err:
            errors.append(describe(err))
            return
        latencies.append((time.perf_counter() - started) * 1000)

    async def caller() -> None:
        nonlocal warmed
        channel = Channel(path=socket)
        try:
            await call(SpiffeWorkloadAPIStub(channel))
            warmed += 1
            if warmed == concurrency:
                all_warm.set()
            await all_warm.wait()
            while time.perf_counter() < stop_at:
                if per_call:
                    channel.close()
                    channel = Channel(path=socket)
                await one(SpiffeWorkloadAPIStub(channel))
        finally:
            channel.close()

    async def clock() -> float:
        nonlocal stop_at
        await all_warm.wait()
        latencies.clear()
        errors.clear()
        started = time.perf_counter()
        stop_at = started + seconds
        await asyncio.sleep(seconds)
        return started

    async with asyncio.timeout(DEADLINE + seconds):
        results = await asyncio.gather(clock(), *(caller() for _ in range(concurrency)))
    elapsed = time.perf_counter() - results[0]
    return {"concurrency": concurrency, "connection": "per call" if per_call else "per caller",
            "calls": len(latencies), "seconds": round(elapsed, 3), "per_s": round(len(latencies) / elapsed, 1),
            **spread(latencies), "errors": len(errors), "first_error": errors[0] if errors else None}


# -- one fetch, to learn the answer's size ---------------------------------------------------------------


async def fetch_once(socket: str, out: Path) -> dict[str, Any]:
    channel = Channel(path=socket)
    try:
        response = await fetch_x509(SpiffeWorkloadAPIStub(channel))
    finally:
        channel.close()
    data = response.SerializeToString()
    out.write_bytes(data)
    return {"bytes": len(data), "spiffe_ids": sorted(svid.spiffe_id for svid in response.svids)}


# -- boot to ready: fetch until served --------------------------------------------------------------------


async def first_svid(socket: str, pause: float, deadline: float) -> dict[str, Any]:
    """Try to fetch every `pause` seconds (while the socket is missing, refused or not served) until served."""
    say({"polling": True})
    attempts = 0
    last = "no attempt"
    async with asyncio.timeout(deadline):
        while True:
            attempts += 1
            channel = Channel(path=socket)
            try:
                response = await fetch_x509(SpiffeWorkloadAPIStub(channel))
                served_at = time.monotonic()
                return {"served_at": served_at, "attempts": attempts,
                        "spiffe_ids": sorted(svid.spiffe_id for svid in response.svids)}
            except (GRPCError, StreamTerminatedError, OSError, RuntimeError) as err:
                last = describe(err)
            finally:
                channel.close()
            await asyncio.sleep(pause)
    raise AssertionError(f"unreachable ({last})")


# -- a new workload's first SVID: fresh processes, one uid (one identity) each ---------------------------


def drop_to(uid: int) -> None:
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)


async def _timed_fetch(socket: str) -> dict[str, Any]:
    started = time.perf_counter()
    channel = Channel(path=socket)
    try:
        response = await fetch_x509(SpiffeWorkloadAPIStub(channel))
        ms = (time.perf_counter() - started) * 1000
        return {"ms": ms, "spiffe_ids": sorted(svid.spiffe_id for svid in response.svids)}
    finally:
        channel.close()


def fresh_workloads(socket: str, uids: Sequence[int]) -> int:
    """For each uid in turn: fork a process that becomes that uid and fetches once, timing connect to SVID.

    Forked from this process (whose imports are done, and which never called the agent), so each is a
    new process, with nothing of a Python start-up in what it times."""
    for uid in uids:
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child
            os.close(read_end)
            code = 0
            try:
                drop_to(uid)
                result: dict[str, Any] = asyncio.run(_timed_fetch(socket))
            except BaseException as err:  # reported, whatever it is: the child exits right after
                result, code = {"error": describe(err)}, 1
            with os.fdopen(write_end, "w") as pipe:
                pipe.write(json.dumps(result))
            os._exit(code)
        os.close(write_end)
        with os.fdopen(read_end) as pipe:
            reported = pipe.read()
        os.waitpid(pid, 0)
        say({"uid": uid, "pid": pid, **(json.loads(reported) if reported else {"error": "no report"})})
    return 0


# -- open streams: time to open them all, then every message ----------------------------------------------


async def streams(socket: str, count: int, report_messages: bool) -> int:
    """Open `count` FetchX509SVID streams, a connection each, all at once; say when every one has its
    first message (`opened_s`), then (with `report_messages`) every later message; end when stdin closes."""
    loop = asyncio.get_running_loop()
    channels = [Channel(path=socket) for _ in range(count)]
    first = [asyncio.Event() for _ in range(count)]
    ended: list[str] = []

    async def watch(index: int) -> None:
        try:
            async with SpiffeWorkloadAPIStub(channels[index]).FetchX509SVID.open(metadata=HEADER) as stream:
                await stream.send_message(pb.X509SVIDRequest(), end=True)
                while (response := await stream.recv_message()) is not None:
                    at = time.monotonic()
                    if report_messages:
                        say({"stream": index, "at": at, "spiffe_ids": sorted(s.spiffe_id for s in response.svids)})
                    first[index].set()
            ended.append("closed by the agent")
            say({"stream": index, "end": "closed by the agent", "at": time.monotonic()})
        except (GRPCError, StreamTerminatedError, OSError) as err:
            ended.append(describe(err))
            say({"stream": index, "end": describe(err), "at": time.monotonic()})
        finally:
            first[index].set()

    started = time.perf_counter()
    tasks = [asyncio.create_task(watch(i)) for i in range(count)]
    try:
        async with asyncio.timeout(DEADLINE * 2):
            await asyncio.gather(*(event.wait() for event in first))
        say({"opened_s": round(time.perf_counter() - started, 3), "streams": count, "ended": len(ended),
             "first_end": ended[0] if ended else None})
        await loop.run_in_executor(None, sys.stdin.read)  # until the bench closes stdin
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for channel in channels:
            channel.close()
    return 0


# -- a caller that waits for its entry (entry create -> first SVID) ---------------------------------------


async def _warm_up(socket: str) -> None:
    channel = Channel(path=socket)
    try:
        await fetch_x509(SpiffeWorkloadAPIStub(channel))
    except GRPCError as err:
        if err.status is not Status.PERMISSION_DENIED:
            raise
    finally:
        channel.close()


async def _ask_until_served(socket: str, pause: float) -> int:
    """Fetch again and again while refused; say when the first refusal came and when the SVID did."""
    refusals = 0
    refused_at = 0.0
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                channel = Channel(path=socket)
                try:
                    response = await fetch_x509(SpiffeWorkloadAPIStub(channel))
                    served_at = time.monotonic()
                except GRPCError as err:
                    if err.status is not Status.PERMISSION_DENIED:
                        say({"error": describe(err)})
                        return 1
                    refused_at = time.monotonic()
                    refusals += 1
                    if refusals == 1:
                        say({"refused_at": refused_at})
                    if pause:
                        await asyncio.sleep(pause)
                    continue
                finally:
                    channel.close()
                say({"served_at": served_at, "refusals": refusals, "last_refused_at": refused_at,
                     "spiffe_ids": sorted(svid.spiffe_id for svid in response.svids)})
                return 0
    except TimeoutError:
        say({"error": f"no SVID within {DEADLINE:g} s, after {refusals} refusals"})
        return 1


def waiting_caller(socket: str, uid: int, pause: float) -> int:
    """Become `uid` (the agent attests the uid the kernel reports at connect()) and fetch until served."""
    # One fetch as root first loads everything a connection needs: after the drop, `uid` may not be
    # allowed to read the venv. (Refused or served: this process's parent, the bench, holds nothing.)
    asyncio.run(_warm_up(socket))
    drop_to(uid)
    return asyncio.run(_ask_until_served(socket, pause))


# -- the command line --------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    modes = parser.add_subparsers(dest="mode", required=True)
    p = modes.add_parser("load", help="calls per second and latency at one concurrency")
    p.add_argument("socket")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--per-call", action="store_true", help="a new connection for every call")
    p.add_argument("--jwt-audience", help="FetchJWTSVID for this audience instead of FetchX509SVID")
    p = modes.add_parser("fetch-once", help="fetch one X509SVIDResponse and write it to a file")
    p.add_argument("socket")
    p.add_argument("out", type=Path)
    p = modes.add_parser("first-svid", help="fetch until served (boot to ready)")
    p.add_argument("socket")
    p.add_argument("--pause-ms", type=float, default=2.0)
    p.add_argument("--deadline", type=float, default=120.0)
    p = modes.add_parser("fresh", help="one forked process per uid, each fetching once")
    p.add_argument("socket")
    p.add_argument("uids", type=int, nargs="+")
    p = modes.add_parser("streams", help="open streams, say when all are open, hold them until stdin closes")
    p.add_argument("socket")
    p.add_argument("count", type=int)
    p.add_argument("--report-messages", action="store_true")
    p = modes.add_parser("waiting", help="become a uid and fetch until served")
    p.add_argument("socket")
    p.add_argument("uid", type=int)
    p.add_argument("--pause-ms", type=float, default=0.0)
    args = parser.parse_args()
    if args.mode == "load":
        call = jwt_fetcher(args.jwt_audience) if args.jwt_audience else fetch_x509
        say(asyncio.run(load(args.socket, args.concurrency, args.seconds, args.per_call, call)))
    elif args.mode == "fetch-once":
        say(asyncio.run(fetch_once(args.socket, args.out)))
    elif args.mode == "first-svid":
        try:
            say(asyncio.run(first_svid(args.socket, args.pause_ms / 1000, args.deadline)))
        except TimeoutError:
            say({"error": f"not served within {args.deadline:g} s"})
            sys.exit(1)
    elif args.mode == "fresh":
        sys.exit(fresh_workloads(args.socket, args.uids))
    elif args.mode == "streams":
        with contextlib.suppress(KeyboardInterrupt):
            sys.exit(asyncio.run(streams(args.socket, args.count, args.report_messages)))
    else:
        sys.exit(waiting_caller(args.socket, args.uid, args.pause_ms / 1000))


if __name__ == "__main__":
    main()
