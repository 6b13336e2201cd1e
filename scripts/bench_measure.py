"""The bench's measurements of a running agent (and of the floor server beside it).

Every Workload API call is made by a client process (bench_clients.py), never by the bench: see that
module for why. Admin commands (entry create and delete) are the bench's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench_agent import (
    DEADLINE,
    ROOT_ID,
    BenchAgent,
    BenchError,
    ClientProcess,
    LoadClient,
    client,
    cpu_seconds,
    rss_mb,
    run_json,
)
from bench_clients import spread

# -- calls per second, the agent beside the floor ---------------------------------------------------------


def load(clients: LoadClient, socket: Path, concurrency: int, seconds: float, *, per_call: bool, server_pid: int,
         jwt_audience: str | None = None) -> dict[str, Any]:
    """One `load` client run against a server; with the server's CPU time per call (less noisy than calls
    per second on a shared machine)."""
    argv = clients.argv("load", socket, concurrency=concurrency, seconds=seconds, per_call=per_call,
                        jwt_audience=jwt_audience)
    cpu_before = cpu_seconds(server_pid)
    [result] = run_json(argv, timeout=DEADLINE * 2 + seconds)
    cpu = cpu_seconds(server_pid) - cpu_before
    if result["errors"]:
        raise BenchError(f"{result['errors']} calls failed at concurrency {concurrency}: {result['first_error']}")
    # Counted over the whole client run: its warm-up calls (one per caller) too.
    result["server_cpu_ms_per_call"] = round(cpu * 1000 / max(1, result["calls"] + concurrency), 3)
    return result


def throughput(clients: LoadClient, agent: BenchAgent, floor: tuple[Path, int], concurrencies: Sequence[int], *,
               seconds: float) -> list[dict[str, Any]]:
    """For each concurrency and each way of connecting: the floor, then the agent, right after each other
    (so that whatever else the machine does weighs on both alike), and the ratio."""
    rows = []
    for per_call in (False, True):
        for concurrency in concurrencies:
            floor_run = load(clients, floor[0], concurrency, seconds, per_call=per_call, server_pid=floor[1])
            agent_run = load(clients, agent.socket, concurrency, seconds, per_call=per_call, server_pid=agent.pid)
            rows.append({"concurrency": concurrency, "connection": agent_run["connection"], "agent": agent_run,
                         "floor": floor_run, "ratio_to_floor": round(agent_run["per_s"] / floor_run["per_s"], 3)})
    return rows


def jwt_fetch(clients: LoadClient, agent: BenchAgent, seconds: float) -> dict[str, Any]:
    """FetchJWTSVID for one audience, back to back on one connection: the cached path after the first."""
    return load(clients, agent.socket, 1, seconds, per_call=False, server_pid=agent.pid, jwt_audience="bench")


# -- a new workload's first SVID ---------------------------------------------------------------------------


def fresh_processes(clients: LoadClient, socket: Path, uids: Sequence[int]) -> list[dict[str, Any]]:
    """A new process per uid, in turn, each fetching once: {uid, ms (connect to SVID), spiffe_ids} each.

    go-spiffe: `goload once`, started as the uid. grpclib: forked from one `fresh` process that has done
    its imports (a Python start-up is not what a workload's first call costs)."""
    if clients.go_binary is None:
        return client("fresh", str(socket), *map(str, uids))
    said = []
    for uid in uids:
        [line] = run_json(clients.argv("once", socket), user=uid, group=uid, extra_groups=[])
        said.append({"uid": uid, **line})
    return said


async def new_workloads(clients: LoadClient, agent: BenchAgent, count: int, uid_base: int,
                        floor: Path) -> dict[str, Any]:
    """`count` distinct identities (an entry per uid), then a fresh process per uid: its first SVID is
    issued for it. Then a fresh process per uid again: its SVID is the one already cached. And the same
    fresh processes against the floor: what a new process's first call costs wherever it goes."""
    uids = [uid_base + n for n in range(count)]
    on_floor = fresh_processes(clients, floor, uids)
    entries = [await agent.admin("entry.create", {"spiffe_id": f"spiffe://example.org/bench/new-{n}",
                                                  "selectors": [f"unix:uid:{uid}"]}) for n, uid in enumerate(uids)]
    try:
        first = fresh_processes(clients, agent.socket, uids)
        cached = fresh_processes(clients, agent.socket, uids)
    finally:
        for entry in entries:
            await agent.admin("entry.delete", {"id": entry["id"]})
    for line in (*first, *cached, *on_floor):
        if "error" in line:
            raise BenchError(f"fresh workload of uid {line['uid']}: {line['error']}")
    for line in (*first, *cached):
        if line["spiffe_ids"] != [f"spiffe://example.org/bench/new-{line['uid'] - uid_base}"]:
            raise BenchError(f"fresh workload of uid {line['uid']} got {line['spiffe_ids']}")
    return {"workloads": count, "uids": f"{uids[0]}-{uids[-1]}",
            # t0: the fresh process connects; t1: its first FetchX509SVID answer
            "first_svid_issued": spread([line["ms"] for line in first]),
            "first_svid_cached": spread([line["ms"] for line in cached]),
            "first_fetch_from_the_floor": spread([line["ms"] for line in on_floor])}


# -- entry create -> the first SVID of a caller that waits for it --------------------------------------------


async def entry_to_svid(agent: BenchAgent, rounds: int, uid_base: int) -> dict[str, Any]:
    results = []
    for n in range(rounds):
        uid, spiffe_id = uid_base + n, f"spiffe://example.org/bench/waiting-{n}"
        async with ClientProcess("waiting", str(agent.socket), str(uid)) as caller:
            said = await caller.next_line("a first refusal")
            if "refused_at" not in said:
                raise BenchError(f"the waiting caller (uid {uid}) was not refused: {said}")
            started = time.monotonic()
            entry = await agent.admin("entry.create", {"spiffe_id": spiffe_id, "selectors": [f"unix:uid:{uid}"]})
            created_ms = (time.monotonic() - started) * 1000
            served = await caller.next_line(spiffe_id, timeout=DEADLINE + 10)
            await agent.admin("entry.delete", {"id": entry["id"]})  # the agent's entries stay as they were
        if served.get("spiffe_ids") != [spiffe_id]:
            raise BenchError(f"the waiting caller (uid {uid}) got {served.get('spiffe_ids', served)}, not {spiffe_id}")
        results.append({"svid_ms": (served["served_at"] - started) * 1000, "create_ms": created_ms,
                        "last_refusal_ms": (served["last_refused_at"] - started) * 1000})
    return {"rounds": rounds, "caller_uids": f"{uid_base}-{uid_base + rounds - 1}",
            # t0: just before entry.create is sent; t1: the caller's first served FetchX509SVID answer
            "create_to_first_svid": spread([r["svid_ms"] for r in results]),
            "entry_create_returned": spread([r["create_ms"] for r in results]),
            "create_to_last_refusal": spread([r["last_refusal_ms"] for r in results])}


# -- streams: revocation, memory ----------------------------------------------------------------------------


@dataclass
class _Streams:
    """What a `streams --report-messages` client said: each stream's messages (arrival, SPIFFE IDs)."""

    count: int
    messages: dict[int, list[tuple[float, frozenset[str]]]] = field(default_factory=dict)
    ended: dict[int, str] = field(default_factory=dict)
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)

    def latest(self, stream: int) -> frozenset[str] | None:
        said = self.messages.get(stream)
        return said[-1][1] if said else None

    def marks(self) -> list[int]:
        return [len(self.messages.get(i, ())) for i in range(self.count)]

    def first_since(self, stream: int, mark: int, condition: Callable[[frozenset[str]], bool]) -> float:
        return next(at for at, ids in self.messages[stream][mark:] if condition(ids))

    async def follow(self, process: ClientProcess) -> None:
        async for line in process.lines():
            if "stream" in line:
                if "end" in line:
                    self.ended[line["stream"]] = line["end"]
                else:
                    self.messages.setdefault(line["stream"], []).append((line["at"], frozenset(line["spiffe_ids"])))
            async with self.changed:
                self.changed.notify_all()

    async def wait_until_all_hold(self, spiffe_ids: frozenset[str], what: str) -> None:
        def reached() -> bool:
            return bool(self.ended) or all(self.latest(i) == spiffe_ids for i in range(self.count))

        try:
            async with asyncio.timeout(DEADLINE), self.changed:
                await self.changed.wait_for(reached)
        except TimeoutError:
            held = sorted({tuple(sorted(self.latest(i) or ())) for i in range(self.count)})
            raise BenchError(f"the streams did not reach {what} within {DEADLINE:g} s; they hold {held}") from None
        if self.ended:
            raise BenchError(f"a stream ended ({next(iter(self.ended.values()))}) while waiting for {what}")


async def revocation(agent: BenchAgent, streams: int, rounds: int) -> dict[str, Any]:
    """Create an entry for the streams' caller (uid 0), wait until every stream holds it, delete it, and time
    until every stream's next message lacks it."""
    watched = _Streams(streams)
    only_root = frozenset({ROOT_ID})
    heard: list[float] = []
    last_heard: list[float] = []
    created: list[float] = []
    async with ClientProcess("streams", str(agent.socket), str(streams), "--report-messages") as process:
        follower = asyncio.create_task(watched.follow(process))
        try:
            await watched.wait_until_all_hold(only_root, "the root identity on every stream")
            for n in range(rounds):
                spiffe_id = f"spiffe://example.org/bench/rev-{n}"
                marks, started = watched.marks(), time.monotonic()
                entry = await agent.admin("entry.create", {"spiffe_id": spiffe_id, "selectors": ["unix:uid:0"]})
                await watched.wait_until_all_hold(only_root | {spiffe_id}, f"{spiffe_id} on every stream")
                created.append(max((watched.first_since(i, m, lambda ids, s=spiffe_id: s in ids) - started) * 1000
                                   for i, m in enumerate(marks)))
                marks, started = watched.marks(), time.monotonic()
                await agent.admin("entry.delete", {"id": entry["id"]})
                await watched.wait_until_all_hold(only_root, f"{spiffe_id} gone from every stream")
                times = [(watched.first_since(i, m, lambda ids, s=spiffe_id: s not in ids) - started) * 1000
                         for i, m in enumerate(marks)]
                heard += times
                last_heard.append(max(times))
        finally:
            follower.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await follower
    return {"streams": streams, "revocations": rounds,
            # t0: just before entry.delete is sent; t1: a stream's first message without the entry
            "per_stream_update": spread(heard), "last_stream_heard": spread(last_heard),
            "entry_create_to_every_stream": spread(created)}


async def open_streams(clients: LoadClient, agent: BenchAgent, count: int, floor: Path) -> dict[str, Any]:
    """Open `count` streams (a connection each) at once: how long until all have their first message, the
    agent's RSS meanwhile, and after they closed. And how long the same takes against the floor."""
    async with ClientProcess("streams", argv=clients.argv("streams", floor, count=count)) as process:
        on_floor = await process.next_line("all streams open", timeout=DEADLINE * 2)
    async with ClientProcess("streams", argv=clients.argv("streams", agent.socket, count=count)) as process:
        said = await process.next_line("all streams open", timeout=DEADLINE * 2)
        if said.get("ended"):
            raise BenchError(f"{said['ended']} of {count} streams ended: {said.get('first_end')}")
        await asyncio.sleep(0.5)  # what is freed once every first answer went out
        with_streams = rss_mb(agent.pid)
        await process.stop()
    await asyncio.sleep(1.0)
    return {"streams": count, "opened_s": said["opened_s"], "floor_opened_s": on_floor.get("opened_s"),
            "rss_with_streams_mb": with_streams, "rss_after_close_mb": rss_mb(agent.pid)}


def fetch_response(agent: BenchAgent, out: Path) -> dict[str, Any]:
    """One of the agent's FetchX509SVID answers, written to `out` for the floor server."""
    [said] = client("fetch-once", str(agent.socket), str(out))
    if said.get("spiffe_ids") != [ROOT_ID]:
        raise BenchError(f"the agent answered {said} to uid 0")
    return said


