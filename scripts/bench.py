"""Measure a running standalone agent: start-up, Workload API latency and throughput, memory.

Uses the same agent launcher as the interop tests (a swtpm of its own, a simulated measured boot).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
from grpclib.client import Channel

from tests.interop.conftest import running_agent
from vouchd.proto import workload_pb2 as pb
from vouchd.proto.workload_grpc import SpiffeWorkloadAPIStub

HEADER = {"workload.spiffe.io": "true"}


async def one_fetch(stub: SpiffeWorkloadAPIStub) -> float:
    started = time.perf_counter()
    async with stub.FetchX509SVID.open(metadata=HEADER) as stream:
        await stream.send_message(pb.X509SVIDRequest(), end=True)
        response = await stream.recv_message()
        assert response is not None and response.svids
        await stream.cancel()
    return (time.perf_counter() - started) * 1000


async def measure(socket: Path, requests: int, concurrency: int) -> dict[str, float]:
    channel = Channel(path=str(socket))
    stub = SpiffeWorkloadAPIStub(channel)
    try:
        await one_fetch(stub)  # first call: issuance; not part of the steady state
        latencies: list[float] = []
        semaphore = asyncio.Semaphore(concurrency)

        async def bounded() -> None:
            async with semaphore:
                latencies.append(await one_fetch(stub))

        started = time.perf_counter()
        await asyncio.gather(*(bounded() for _ in range(requests)))
        elapsed = time.perf_counter() - started
    finally:
        channel.close()
    latencies.sort()
    return {
        "requests": requests,
        "concurrency": concurrency,
        "throughput_per_s": round(requests / elapsed, 1),
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2),
        "max_ms": round(latencies[-1], 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16])
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="vouchd-bench-"))
    started = time.perf_counter()
    with running_agent(base) as agent:
        ready_s = time.perf_counter() - started
        process = psutil.Process(agent.process.pid)
        rss_idle = process.memory_info().rss
        results = [asyncio.run(measure(agent.socket, args.requests, c)) for c in args.concurrency]
        rss_after = process.memory_info().rss
        status = agent.status()
    print(json.dumps({
        "agent_ready_s (provision + boot + attestation + first sync)": round(ready_s, 2),
        "fetch_x509_svid": results,
        "agent_rss_mib": {"idle": round(rss_idle / 2**20, 1), "after_load": round(rss_after / 2**20, 1)},
        "tpm_latency_ms": status.get("tpm_latency_ms"),
    }, indent=2))


if __name__ == "__main__":
    main()
