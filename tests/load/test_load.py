"""Load: 1000 open Workload API streams and 200 fetches a second for 60 s against a real agent on
swtpm. Nothing fails, every stream stays served, and the agent's memory grows by less than 10 %.
(Latency and throughput figures are scripts/bench's; this asserts behaviour under load.)"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import RunningAgent, StreamWatch, running_agent

pytestmark = [pytest.mark.load, pytest.mark.timeout(300)]

STREAMS = 1000
RATE = 200.0
SECONDS = 60.0
WARM_UP = 5.0
LOAD = Path(__file__).with_name("fetch_load.py")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.fixture
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("load")) as agent:
        yield agent


def test_a_thousand_streams_and_two_hundred_fetches_a_second_for_a_minute(agent: RunningAgent) -> None:
    watch = StreamWatch(agent.socket, STREAMS)
    try:
        watch.wait_until(lambda w: w.all_hold(["spiffe://example.org/user/root"]), f"{STREAMS} streams served",
                         timeout=120)
        load = subprocess.Popen([sys.executable, str(LOAD), str(agent.socket), str(RATE), str(SECONDS)],
                                stdout=subprocess.PIPE, text=True)
        time.sleep(WARM_UP)  # the caches and the allocator settle under the load before the baseline
        baseline = rss_kib(agent.process.pid)
        peak = baseline
        while load.poll() is None:
            peak = max(peak, rss_kib(agent.process.pid))
            time.sleep(1.0)
        report = json.loads(load.communicate(timeout=30)[0])
        final = rss_kib(agent.process.pid)

        assert report["errors"] == {}, report
        assert report["ok"] >= RATE * SECONDS * 0.95, f"{report['ok']} fetches in {report['seconds']:.0f} s"
        assert watch.ended == {}, f"streams ended under load: {watch.ended}"
        assert len(watch.latest) == STREAMS
        assert max(peak, final) < baseline * 1.10, f"RSS {baseline} KiB -> peak {peak}, final {final} KiB"
        assert agent.process.poll() is None
    finally:
        watch.close()
