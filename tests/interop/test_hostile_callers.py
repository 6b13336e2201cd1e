"""Callers that cannot hurt the agent: hostile clients against a real `vouchd agent --standalone`.

The hostile ones are tests.rawgrpc connections from the test process (what no gRPC library would
send) or grpcio clients in processes of their own; the agent's memory is read with psutil. One agent
for the module; the latency test runs first, on an agent that has absorbed no attack yet (after the
memory test its heap is larger and the garbage collector's full passes take longer).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import psutil
import pytest

from tests.interop.conftest import DEADLINE, RunningAgent, StreamWatch, running_agent
from tests.interop.test_faults import fetch
from tests.rawgrpc import RawGrpcConnection, grpc_frame

pytestmark = pytest.mark.interop

ROOT_ID = "spiffe://example.org/user/root"
OTHER_UID = 4343
OTHER_ID = "spiffe://example.org/user/4343"
INVALID_ARGUMENT = 3
MB = 1_000_000


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    entries = [(OTHER_ID, f"unix:uid:{OTHER_UID}")]
    with running_agent(tmp_path_factory.mktemp("hostile"), extra_entries=entries) as agent:
        yield agent


def timed_fetches(agent: RunningAgent, seconds: float) -> list[float]:
    """FetchX509SVID as root, one after another for `seconds`, each on a connection of its own:
    milliseconds from the call to the first message."""
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import json, time
        import grpc
        from spiffe._proto import workload_pb2, workload_pb2_grpc
        def once():
            channel = grpc.insecure_channel("unix:{agent.socket}", options=[("grpc.use_local_subchannel_pool", 1)])
            stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
            started = time.perf_counter()
            response = next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(),
                                               metadata=[("workload.spiffe.io", "true")], timeout=10))
            elapsed = time.perf_counter() - started
            channel.close()
            assert response.svids[0].spiffe_id == "{ROOT_ID}"
            return elapsed * 1000
        once()  # grpc's own first-call costs are not the agent's
        timings, end = [], time.monotonic() + {seconds}
        while time.monotonic() < end:
            timings.append(once())
        print(json.dumps(timings))
    """)], capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert child.returncode == 0, child.stderr
    timings: list[float] = json.loads(child.stdout)
    return timings


def test_500_open_streams_of_one_uid_do_not_starve_another_caller(
    agent: RunningAgent, watch: Callable[..., StreamWatch]
) -> None:
    # The per-uid caps allow 500 streams on 500 connections: all of them are held, and the other
    # caller competes with them for the agent, not with a cap. Measured once the burst of opening
    # them has settled (on 2 cores the 500-thread client competes for the CPU meanwhile), and for
    # seconds rather than a few fetches, so that full passes of CPython's garbage collector fall
    # inside the measurement: they stop the event loop for as long as it takes to scan every object
    # the open connections keep alive (about 100 each; the agent freezes what it loaded at start),
    # 20 to 120 ms at 500 connections on this machine kind. The fetch such a pass lands in is the
    # slowest, and how slow depends on the machine: the slowest is not asserted here (scripts/bench
    # is where latency is measured). 99 in 100 are not near it: the other caller is not starved.
    streams = watch(500, uid=OTHER_UID)
    streams.wait_until(lambda s: s.all_hold([OTHER_ID]), "500 streams hold uid 4343's svid", timeout=120)
    time.sleep(2)

    timings = sorted(timed_fetches(agent, 5.0))

    assert len(streams.latest) == 500 and not streams.ended
    assert len(timings) >= 100
    assert timings[len(timings) * 99 // 100] < 50, timings[-10:]


class PeakRss:
    """The highest resident set size of a process while the block runs, sampled every 10 ms."""

    def __init__(self, pid: int) -> None:
        self._process = psutil.Process(pid)
        self.before = self.peak = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=DEADLINE)
        self.peak = max(self.peak, self._process.memory_info().rss)

    def _sample(self) -> None:
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._process.memory_info().rss)

    @property
    def growth(self) -> int:
        return self.peak - self.before


def refused_at_once(agent: RunningAgent, declared: int = 1 << 30) -> int | None:
    """One raw request declaring `declared` bytes; its grpc-status."""
    conn = RawGrpcConnection(agent.socket)
    try:
        stream_id = conn.request()
        conn.send(stream_id, grpc_frame(b"", declared=declared))
        return conn.wait_for(stream_id, within=DEADLINE).status
    finally:
        conn.close()


def test_a_declared_gigabyte_is_refused_before_the_agent_holds_any_of_it(agent: RunningAgent) -> None:
    assert fetch(agent) == ROOT_ID
    assert refused_at_once(agent) == INVALID_ARGUMENT  # the refusal's own code is loaded before measuring
    conn = RawGrpcConnection(agent.socket, timeout=DEADLINE)
    sent, statuses = 0, set()
    deadline = time.monotonic() + 60
    with PeakRss(agent.process.pid) as rss:
        # Each stream declares 1 GiB and pushes zeros for as long as the agent lets it; then the next.
        while sent < 100 * MB and time.monotonic() < deadline:
            stream_id = conn.request()
            conn.send_flowing(stream_id, grpc_frame(b"", declared=1 << 30), within=DEADLINE)
            sent += conn.push(stream_id, 100 * MB - sent, within=DEADLINE)
            statuses.add(conn.wait_for(stream_id, within=DEADLINE).status)
    conn.close()

    assert sent >= 100 * MB
    assert statuses == {INVALID_ARGUMENT}, "every stream was refused, none left waiting for its gigabyte"
    assert rss.growth < 20 * MB, f"the agent grew by {rss.growth / MB:.1f} MB"
    assert fetch(agent) == ROOT_ID, "a normal caller is still served"


def test_a_megabyte_audience_and_a_two_megabyte_token_are_invalid_arguments_at_once(agent: RunningAgent) -> None:
    child = subprocess.run([sys.executable, "-c", textwrap.dedent(f"""
        import json, os, time
        import grpc
        from spiffe._proto import workload_pb2, workload_pb2_grpc
        os.setgroups([]); os.setgid({OTHER_UID}); os.setuid({OTHER_UID})
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel("unix:{agent.socket}"))
        header = [("workload.spiffe.io", "true")]
        calls = {{
            "audience": lambda: stub.FetchJWTSVID(workload_pb2.JWTSVIDRequest(audience=["a" * 1_000_000]),
                                                  metadata=header, timeout=10),
            "token": lambda: stub.ValidateJWTSVID(workload_pb2.ValidateJWTSVIDRequest(audience="db",
                                                                                      svid="t" * 2_000_000),
                                                  metadata=header, timeout=10),
        }}
        answers = {{}}
        for name, call in calls.items():
            started = time.monotonic()
            try:
                call()
                answers[name] = ["OK", "", 0]
            except grpc.RpcError as err:
                answers[name] = [err.code().name, err.details(), time.monotonic() - started]
        print(json.dumps({{"pid": os.getpid(), "answers": answers}}))
    """)], capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert child.returncode == 0, child.stderr
    result = json.loads(child.stdout)

    for name, (code, message, seconds) in result["answers"].items():
        assert (code, message) == ("INVALID_ARGUMENT", "request message too large"), name
        assert seconds < 1.0, name
    pid = result["pid"]
    lines = [json.loads(line) for line in agent.log.read_text().splitlines() if line.startswith("{")]
    assert any(line["msg"] == "workload api caller refused" and line.get("pid") == pid
               and line.get("uid") == OTHER_UID and line.get("code") == "request_too_large" for line in lines)
    assert not [line for line in lines if line.get("pid") == pid and line["logger"].startswith("vouchd.decisions")], (
        "refused before any decision: nobody was attested")


def test_a_connection_that_sends_no_request_is_closed_after_five_seconds(agent: RunningAgent) -> None:
    silent = RawGrpcConnection(agent.socket)
    started = time.monotonic()
    assert fetch(agent) == ROOT_ID, "meanwhile others are served"
    closed = silent.wait_closed(within=10)
    elapsed = time.monotonic() - started
    silent.close()

    assert closed and 4.5 <= elapsed < 8, elapsed
    assert silent.goaway == (0, b"no request within 5s")
