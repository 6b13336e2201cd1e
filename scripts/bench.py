"""Measure a running standalone agent: start-up, Workload API latency and throughput, how fast an entry's
deletion reaches open streams and an entry's creation reaches a caller that waits for it, memory.

Uses the same agent launcher as the interop tests (a swtpm of its own, a simulated measured boot).
Times that span processes are CLOCK_MONOTONIC (time.monotonic(): one clock for every process of the host).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from vouchd.agent.admin import admin_request
from vouchd.proto import workload_pb2 as pb
from vouchd.proto.workload_grpc import SpiffeWorkloadAPIStub

if TYPE_CHECKING:  # the waiting caller must not load the agent launcher (pytest and all)
    from tests.interop.conftest import RunningAgent

HEADER = {"workload.spiffe.io": "true"}
ROOT_ID = "spiffe://example.org/user/root"  # what running_agent's entries give uid 0, the bench's uid
ROOT_SELECTOR = "unix:uid:0"
# Every wait of the bench is bounded by this (seconds).
DEADLINE = 30.0
# The goals for the p99 of each measurement; reported beside the figures, not asserted.
REVOCATION_GOAL_MS = 500
FIRST_SVID_GOAL_MS = 100
MATCH_GOAL_MS = 1.0
POLICY_GOAL_MS = 1.0


class BenchError(Exception):
    """A measurement could not be taken: a wait ran out, a stream ended, a caller failed."""


def spread(values_ms: Sequence[float]) -> dict[str, float]:
    """p50, p99 (nearest rank: with fewer than 100 values it is the maximum) and max, in ms."""
    ordered = sorted(values_ms)
    return {
        "p50_ms": round(statistics.median(ordered), 2),
        "p99_ms": round(ordered[math.ceil(len(ordered) * 0.99) - 1], 2),
        "max_ms": round(ordered[-1], 2),
    }


def since_ms(started: float) -> float:
    return (time.monotonic() - started) * 1000


async def admin(agent: RunningAgent, command: str, args: dict[str, Any]) -> Any:
    return await admin_request(agent.admin_socket, command, args, timeout=DEADLINE)


# -- FetchX509SVID latency and throughput ------------------------------------------------------------


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
    return {
        "requests": requests,
        "concurrency": concurrency,
        "throughput_per_s": round(requests / elapsed, 1),
        **spread(latencies),
    }


# -- revocation -> open streams ----------------------------------------------------------------------


class WatchedStream:
    """One FetchX509SVID stream on a connection of its own: each message's SPIFFE IDs and arrival time."""

    def __init__(self, socket: Path, changed: asyncio.Condition) -> None:
        self._channel = Channel(path=str(socket))
        self._stub = SpiffeWorkloadAPIStub(self._channel)
        self._changed = changed
        self.messages: list[tuple[float, frozenset[str]]] = []
        self.ended: str | None = None

    @property
    def latest(self) -> frozenset[str] | None:
        return self.messages[-1][1] if self.messages else None

    def first_since(self, mark: int, condition: Callable[[frozenset[str]], bool]) -> float:
        """Arrival time of the first message after the first `mark` ones whose SPIFFE IDs meet `condition`."""
        return next(at for at, ids in self.messages[mark:] if condition(ids))

    async def run(self) -> None:
        try:
            async with self._stub.FetchX509SVID.open(metadata=HEADER) as stream:
                await stream.send_message(pb.X509SVIDRequest(), end=True)
                while (response := await stream.recv_message()) is not None:
                    arrived = time.monotonic()
                    self.messages.append((arrived, frozenset(svid.spiffe_id for svid in response.svids)))
                    async with self._changed:
                        self._changed.notify_all()
            self.ended = "closed by the agent"
        except GRPCError as err:
            self.ended = err.status.name
        finally:
            self._channel.close()
            async with self._changed:
                self._changed.notify_all()


class OpenStreams:
    """`count` streams of the bench's own uid, open for the duration of an `async with`."""

    def __init__(self, socket: Path, count: int) -> None:
        self._changed = asyncio.Condition()
        self.streams = [WatchedStream(socket, self._changed) for _ in range(count)]
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> OpenStreams:
        self._tasks = [asyncio.create_task(stream.run(), name=f"stream-{i}") for i, stream in enumerate(self.streams)]
        return self

    async def __aexit__(self, *exc: object) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def marks(self) -> list[int]:
        return [len(stream.messages) for stream in self.streams]

    async def wait_until_all_hold(self, spiffe_ids: frozenset[str], what: str) -> None:
        def reached() -> bool:
            return any(s.ended for s in self.streams) or all(s.latest == spiffe_ids for s in self.streams)

        try:
            async with asyncio.timeout(DEADLINE), self._changed:
                await self._changed.wait_for(reached)
        except TimeoutError:
            latest = sorted({tuple(sorted(s.latest or ())) for s in self.streams})
            raise BenchError(f"the streams did not reach {what} within {DEADLINE:g} s; they hold {latest}") from None
        ended = [s.ended for s in self.streams if s.ended]
        if ended:
            raise BenchError(f"a stream ended ({ended[0]}) while waiting for {what}")


async def _one_revocation(agent: RunningAgent, watched: OpenStreams, spiffe_id: str) -> dict[str, Any]:
    """Create an entry for the streams' caller, wait until every stream holds it, delete it, time both."""
    only_root = frozenset({ROOT_ID})
    marks = watched.marks()
    started = time.monotonic()
    entry = await admin(agent, "entry.create", {"spiffe_id": spiffe_id, "selectors": [ROOT_SELECTOR]})
    await watched.wait_until_all_hold(only_root | {spiffe_id}, f"{spiffe_id} on every stream")
    held = [s.first_since(m, lambda ids: spiffe_id in ids) for s, m in zip(watched.streams, marks, strict=True)]
    created_ms = (max(held) - started) * 1000

    marks = watched.marks()
    started = time.monotonic()
    await admin(agent, "entry.delete", {"id": entry["id"]})
    deleted_ms = since_ms(started)
    await watched.wait_until_all_hold(only_root, f"{spiffe_id} gone from every stream")
    heard = [(s.first_since(m, lambda ids: spiffe_id not in ids) - started) * 1000
             for s, m in zip(watched.streams, marks, strict=True)]
    return {"heard_ms": heard, "delete_ms": deleted_ms, "create_ms": created_ms}


async def measure_revocation(agent: RunningAgent, streams: int, revocations: int) -> dict[str, Any]:
    rounds = []
    async with OpenStreams(agent.socket, streams) as watched:
        await watched.wait_until_all_hold(frozenset({ROOT_ID}), "the root identity on every stream")
        for n in range(revocations):
            rounds.append(await _one_revocation(agent, watched, f"spiffe://example.org/bench/rev-{n}"))
    return {
        "streams": streams,
        "revocations": revocations,
        "goal_ms": REVOCATION_GOAL_MS,
        # t0: just before entry.delete is sent; t1: the stream's first message without the entry.
        "per_stream_update": spread([ms for r in rounds for ms in r["heard_ms"]]),
        "last_stream_heard": spread([max(r["heard_ms"]) for r in rounds]),
        "entry_delete_returned": spread([r["delete_ms"] for r in rounds]),
        "entry_create_to_every_stream": spread([r["create_ms"] for r in rounds]),
    }


# -- entry create -> first SVID of a caller that waits --------------------------------------------------


def _say(line: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(line) + "\n")
    sys.stdout.flush()


async def _ask_until_served(socket: Path, pause: float) -> int:
    """Fetch again and again while refused; say when the first refusal came and when the SVID did."""
    channel = Channel(path=str(socket))
    stub = SpiffeWorkloadAPIStub(channel)
    refusals = 0
    refused_at = 0.0
    try:
        async with asyncio.timeout(DEADLINE):
            while True:
                try:
                    async with stub.FetchX509SVID.open(metadata=HEADER) as stream:
                        await stream.send_message(pb.X509SVIDRequest(), end=True)
                        response = await stream.recv_message()
                        served_at = time.monotonic()
                        await stream.cancel()
                except GRPCError as err:
                    if err.status is not Status.PERMISSION_DENIED:
                        _say({"error": f"{err.status.name}: {err.message}"})
                        return 1
                    refused_at = time.monotonic()
                    refusals += 1
                    if refusals == 1:
                        _say({"refused_at": refused_at})
                    if pause:
                        await asyncio.sleep(pause)
                    continue
                if response is None or not response.svids:
                    _say({"error": "the stream closed without an X509SVIDResponse"})
                    return 1
                _say({"served_at": served_at, "refusals": refusals, "last_refused_at": refused_at,
                      "spiffe_ids": sorted(svid.spiffe_id for svid in response.svids)})
                return 0
    except TimeoutError:
        _say({"error": f"no SVID within {DEADLINE:g} s, after {refusals} refusals"})
        return 1
    finally:
        channel.close()


async def _warm_up(socket: Path) -> None:
    channel = Channel(path=str(socket))
    try:
        await one_fetch(SpiffeWorkloadAPIStub(channel))
    except GRPCError as err:
        # Refused is as good as served here: the code is loaded. (The bench, this caller's parent,
        # holds root's identity, and a child is never handed an identity its parent holds.)
        if err.status is not Status.PERMISSION_DENIED:
            raise
    finally:
        channel.close()


def waiting_caller(socket: Path, uid: int, pause: float) -> int:
    """The subprocess: become `uid` (the agent attests the uid the kernel reports at connect()) and wait."""
    # One fetch as root first loads everything a connection needs (served or refused): after the
    # drop, `uid` may not be allowed to read the venv.
    asyncio.run(_warm_up(socket))
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    return asyncio.run(_ask_until_served(socket, pause))


class WaitingCaller:
    """This script run as `--waiting-caller` in a subprocess; stopped by its PID when done."""

    def __init__(self, socket: Path, uid: int, pause_ms: float) -> None:
        self._command = [sys.executable, str(Path(__file__).resolve()), "--waiting-caller", str(socket), str(uid),
                         "--waiting-caller-pause-ms", str(pause_ms)]
        self.uid = uid
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> WaitingCaller:
        self._process = await asyncio.create_subprocess_exec(*self._command, stdin=asyncio.subprocess.DEVNULL,
                                                             stdout=asyncio.subprocess.PIPE)
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        process = self._process
        if process is None:
            return
        if exc_type is not None:
            self.kill()
        try:
            async with asyncio.timeout(DEADLINE):
                await process.wait()
        except TimeoutError:
            self.kill()
            await process.wait()

    async def expect(self, key: str, what: str) -> dict[str, Any]:
        """The caller's next line; BenchError unless it has `key`."""
        assert self._process is not None and self._process.stdout is not None
        try:
            async with asyncio.timeout(DEADLINE + 10):  # the caller's own deadline, then its answer
                line = await self._process.stdout.readline()
        except TimeoutError:
            raise BenchError(f"the waiting caller (uid {self.uid}) did not report {what}") from None
        if not line:
            raise BenchError(f"the waiting caller (uid {self.uid}) exited before {what}")
        said: dict[str, Any] = json.loads(line)
        if key not in said:
            raise BenchError(f"the waiting caller (uid {self.uid}) did not get {what}: {said.get('error', said)}")
        return said

    def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()


async def _one_registration(agent: RunningAgent, caller: WaitingCaller, spiffe_id: str) -> dict[str, float]:
    """Once the caller is being refused, create its entry; time until it is served."""
    await caller.expect("refused_at", "its first refusal")
    started = time.monotonic()
    entry = await admin(agent, "entry.create", {"spiffe_id": spiffe_id, "selectors": [f"unix:uid:{caller.uid}"]})
    created_ms = since_ms(started)
    served = await caller.expect("served_at", spiffe_id)
    if served["spiffe_ids"] != [spiffe_id]:
        raise BenchError(f"the waiting caller (uid {caller.uid}) got {served['spiffe_ids']}, not {spiffe_id}")
    await admin(agent, "entry.delete", {"id": entry["id"]})  # the agent's entries stay as they were
    return {
        "first_svid_ms": (served["served_at"] - started) * 1000,
        "create_ms": created_ms,
        # the answer to the last refused fetch: how long after t0 the agent still said no
        "last_refusal_ms": (served["last_refused_at"] - started) * 1000,
        "refusals": served["refusals"],
    }


async def measure_first_svid(agent: RunningAgent, rounds: int, uid_base: int, pause_ms: float) -> dict[str, Any]:
    results = []
    for n in range(rounds):
        async with WaitingCaller(agent.socket, uid_base + n, pause_ms) as caller:
            results.append(await _one_registration(agent, caller, f"spiffe://example.org/bench/waiting-{n}"))
    return {
        "rounds": rounds,
        "caller_uids": f"{uid_base}-{uid_base + rounds - 1}",
        "caller_pause_ms": pause_ms,
        "goal_ms": FIRST_SVID_GOAL_MS,
        # t0: just before entry.create is sent; t1: the caller's first served FetchX509SVID answer.
        "create_to_first_svid": spread([r["first_svid_ms"] for r in results]),
        "entry_create_returned": spread([r["create_ms"] for r in results]),
        "create_to_last_refusal": spread([r["last_refusal_ms"] for r in results]),
        "refusals_per_caller": {"min": min(r["refusals"] for r in results),
                                "max": max(r["refusals"] for r in results)},
    }


# -- the run -----------------------------------------------------------------------------------------


def measure_matching(entry_count: int, rounds: int) -> dict[str, Any]:
    """The cost of matching one caller against `entry_count` entries, in this process (no agent needed).

    The entries are what an AI-agent host has: one uid, one interpreter, a script hash each, a tenth
    of them also bound to a systemd unit, a few by uid alone; the caller carries the selectors every
    attestor gives (about twenty), one of the scripts among them.
    """
    from datetime import timedelta

    from vouchd.agent.matching import EntryMatcher
    from vouchd.entries import Entry
    from vouchd.selectors import selector_set
    from vouchd.spiffe import SpiffeId

    def entry(n: int, *selectors: str) -> Entry:
        return Entry(id=f"agent-{n:06}", revision=1, spiffe_id=SpiffeId.parse(f"spiffe://example.org/agent/{n}"),
                     selectors=selector_set(selectors), x509_ttl=timedelta(hours=1))

    entries = [entry(n, "unix:uid:1000", "interpreter:name:python", f"script:sha256:{n:064x}",
                     *((f"systemd:unit:agent-{n}.service",) if n % 10 == 0 else ()))
               for n in range(entry_count - 3)]
    entries += [entry(entry_count - 3 + n, f"unix:uid:{1000 + n}") for n in range(3)]
    built = time.monotonic()
    matcher = EntryMatcher(entries)
    index_ms = since_ms(built)
    common = ["unix:uid:1000", "unix:user:agent", "unix:gid:1000", "unix:group:agent", "unix:path:/usr/bin/python3.11",
              "unix:sha256:" + "ee" * 32, "interpreter:name:python", "script:path:/opt/agents/agent.py",
              "systemd:unit:agent-40.service", "systemd:slice:system.slice", "lineage:depth:1",
              *(f"unix:supplementary_gid:{gid}" for gid in range(100, 108))]
    callers = [selector_set([*common, f"script:sha256:{(n * 7919) % entry_count:064x}"]) for n in range(rounds)]
    times_us = []
    matched = 0
    for caller in callers:
        started = time.perf_counter_ns()
        matched += len(matcher.match(caller))
        times_us.append((time.perf_counter_ns() - started) / 1000)
    ordered = sorted(times_us)
    return {"entries": entry_count, "caller_selectors": len(callers[0]), "calls": rounds,
            "index_build_ms": round(index_ms, 1),
            "match_us": {"p50": round(statistics.median(ordered), 1),
                         "p99": round(ordered[math.ceil(len(ordered) * 0.99) - 1], 1), "max": round(ordered[-1], 1)},
            "p99_goal_us": MATCH_GOAL_MS * 1000, "entries_matched_per_call": round(matched / rounds, 2)}


def measure_policy(requests: int) -> dict[str, Any]:
    """The cost of one policy decision (the shipped defaults plus examples/agents/policy.cedar), in this
    process: `requests` different requests (each a cache miss), then the same ones again (hits)."""
    from vouchd.clock import SYSTEM_CLOCK
    from vouchd.policy import Audience, PolicyAction, PolicyContext, PolicyEngine, PolicyRequest, Workload
    from vouchd.spiffe import TrustTier

    root = Path(__file__).resolve().parent.parent
    engine = PolicyEngine.load([root / "examples" / "agents" / "policy.cedar"], clock=SYSTEM_CLOCK,
                               audiences={"tool:search": "low", "tool:payments": "high"})
    selectors = ("unix:uid:1000", "interpreter:name:python", "lineage:depth:1")
    batch = [PolicyRequest(
        Workload(spiffe_id=f"spiffe://example.org/agent/{n}", tier=TrustTier.HARDWARE, selectors=selectors, uid=1000,
                 entry_id=f"e-{n}", parent_spiffe_id="spiffe://example.org/agent/parent", lineage_depth=n % 2),
        PolicyAction.FETCH_JWT_SVID, Audience("tool:payments" if n % 3 else "tool:search"),
        PolicyContext(node_state="trusted", ttl_seconds=300, audiences=("tool:search",), quote_age_seconds=20))
        for n in range(requests)]

    def timed() -> list[float]:
        times = []
        for request in batch:
            started = time.perf_counter_ns()
            engine.evaluate(request)
            times.append((time.perf_counter_ns() - started) / 1000)
        return sorted(times)

    def summary(ordered: list[float]) -> dict[str, float]:
        return {"p50": round(statistics.median(ordered), 1),
                "p99": round(ordered[math.ceil(len(ordered) * 0.99) - 1], 1), "max": round(ordered[-1], 1)}

    misses, hits = timed(), timed()
    return {"policies": len(engine.policies), "requests": requests, "uncached_us": summary(misses),
            "cached_us": summary(hits), "p99_goal_us": POLICY_GOAL_MS * 1000}


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tests.interop.conftest import running_agent

    matching = measure_matching(args.match_entries, args.match_calls)
    policy = measure_policy(args.policy_requests)
    base = Path(tempfile.mkdtemp(prefix="vouchd-bench-"))
    try:
        started = time.perf_counter()
        with running_agent(base) as agent:
            ready_s = time.perf_counter() - started
            process = psutil.Process(agent.process.pid)
            rss_idle = process.memory_info().rss
            fetches = [asyncio.run(measure(agent.socket, args.requests, c)) for c in args.concurrency]
            rss_after = process.memory_info().rss
            try:
                revocation = asyncio.run(measure_revocation(agent, args.streams, args.revocations))
                first_svid = asyncio.run(measure_first_svid(agent, args.registrations, args.waiting_uid_base,
                                                            args.waiting_caller_pause_ms))
            except BenchError:
                lines = agent.log.read_text(errors="replace").splitlines()[-40:]
                print("bench: the agent log's last lines:", *lines, sep="\n  ", file=sys.stderr)
                raise
            status = agent.status()
    finally:
        if args.keep:
            print(f"bench: kept {base} (the agent's log is {base / 'agent.log'})", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)
    return {
        "agent_ready_s (provision + boot + attestation + first sync)": round(ready_s, 2),
        "fetch_x509_svid": fetches,
        "revocation_to_open_stream": revocation,
        "entry_create_to_waiting_caller": first_svid,
        "matching": matching,
        "policy_decision": policy,
        "agent_rss_mib": {"idle": round(rss_idle / 2**20, 1), "after_load": round(rss_after / 2**20, 1)},
        "tpm_latency_ms": status.get("tpm_latency_ms"),
    }


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--requests", type=positive, default=2000, help="FetchX509SVID calls per concurrency")
    parser.add_argument("--concurrency", type=positive, nargs="+", default=[1, 16],
                        help="FetchX509SVID calls in flight at once, one measurement each")
    parser.add_argument("--streams", type=positive, default=10,
                        help="FetchX509SVID streams open while entries are created and deleted")
    parser.add_argument("--revocations", type=positive, default=50,
                        help="entries created, seen on every stream, then deleted")
    parser.add_argument("--registrations", type=positive, default=50,
                        help="entries created for a caller that waits for one (a subprocess of its own uid each)")
    parser.add_argument("--waiting-uid-base", type=positive, default=20000,
                        help="the first waiting caller's uid; round N uses this + N (uids with no entry)")
    parser.add_argument("--waiting-caller-pause-ms", type=float, default=0.0,
                        help="pause between a waiting caller's refused fetches (0: a tight loop)")
    parser.add_argument("--match-entries", type=positive, default=10_000,
                        help="entries a caller is matched against (measured in-process)")
    parser.add_argument("--match-calls", type=positive, default=5000, help="callers matched")
    parser.add_argument("--policy-requests", type=positive, default=5000,
                        help="different policy requests decided (measured in-process)")
    parser.add_argument("--keep", action="store_true",
                        help="keep the temporary folder (agent log, swtpm state) and say where it is")
    parser.add_argument("--waiting-caller", nargs=2, metavar=("SOCKET", "UID"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.waiting_caller:
        socket, uid = args.waiting_caller
        sys.exit(waiting_caller(Path(socket), int(uid), args.waiting_caller_pause_ms / 1000))
    if os.geteuid() != 0:
        parser.error("run as root: the agent's entry is for uid 0, and each waiting caller becomes another uid")
    # SIGTERM unwinds like Ctrl-C: the waiting caller, the agent and its swtpm are stopped, the folder removed.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
