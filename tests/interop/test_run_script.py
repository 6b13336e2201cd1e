"""./scripts/run as a user meets it after something went wrong: leftovers of a killed run, a dying swtpm.

Each test runs the script on a state folder of its own (VOUCHD_RUN_STATE) and stops, by PID, every
process it started, including those the script left behind on purpose.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import DEADLINE

pytestmark = pytest.mark.interop

REPO = Path(__file__).resolve().parents[2]


class RunScript:
    """One ./scripts/run process; its output collected line by line."""

    def __init__(self, state: Path) -> None:
        self.process = subprocess.Popen([str(REPO / "scripts" / "run")], cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True,
                                        env={**os.environ, "VOUCHD_RUN_STATE": str(state)})
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + 90
        while text not in self.output:
            if self.process.poll() is not None:
                self._reader.join(timeout=DEADLINE)  # everything it wrote, read to the end
                if text in self.output:
                    return
                pytest.fail(f"scripts/run ended ({self.process.returncode}) before {text!r}:\n{self.output}")
            if time.monotonic() > deadline:
                pytest.fail(f"scripts/run never printed {text!r}:\n{self.output}")
            time.sleep(0.1)


def started_pids(state: Path) -> dict[str, int]:
    return {role: int(pid) for role, pid in
            (line.split() for line in (state / "run.pids").read_text().splitlines() if line.strip())}


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose; it goes once its parent (gone) is reaped by init.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except FileNotFoundError:  # it ended between the two looks
        return False


@pytest.fixture
def state(tmp_path: Path) -> Iterator[Path]:
    folder = tmp_path / "state"
    yield folder
    # Whatever the script started and a test left running on purpose, by the PIDs it recorded.
    pids_file = folder / "run.pids"
    if pids_file.exists():
        for pid in started_pids(folder).values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_killed_run_leaves_processes_the_next_run_names(state: Path) -> None:
    first = RunScript(state)
    first.wait_for("vouchd is serving the SPIFFE Workload API")
    orphans = started_pids(state)
    first.process.send_signal(signal.SIGKILL)  # the script dies; what it started does not
    first.process.wait(timeout=DEADLINE)
    assert all(alive(pid) for pid in orphans.values())

    second = RunScript(state)
    assert second.process.wait(timeout=DEADLINE) == 1
    message = second.output
    assert f"swtpm (PID {orphans['swtpm']})" in message and f"agent (PID {orphans['agent']})" in message
    assert re.search(rf"kill ({orphans['swtpm']} {orphans['agent']}|{orphans['agent']} {orphans['swtpm']})",
                     message), message
    assert all(alive(pid) for pid in orphans.values()), "the next run must not touch them itself"

    for pid in orphans.values():
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + DEADLINE
    while any(alive(pid) for pid in orphans.values()) and time.monotonic() < deadline:
        time.sleep(0.1)
    third = RunScript(state)
    try:
        third.wait_for("vouchd is serving the SPIFFE Workload API")
    finally:
        third.process.send_signal(signal.SIGTERM)
        third.process.wait(timeout=DEADLINE)
    assert not any(alive(pid) for pid in started_pids(state).values()) or not (state / "run.pids").read_text()


def test_a_second_run_names_the_first(state: Path) -> None:
    first = RunScript(state)
    try:
        first.wait_for("vouchd is serving the SPIFFE Workload API")
        second = RunScript(state)
        assert second.process.wait(timeout=DEADLINE) == 1
        assert f"another ./scripts/run (PID {first.process.pid}) is running" in second.output
        assert f"kill {first.process.pid}" in second.output
    finally:
        first.process.send_signal(signal.SIGTERM)
        first.process.wait(timeout=DEADLINE)


def test_the_run_notices_when_its_swtpm_dies(state: Path) -> None:
    run = RunScript(state)
    run.wait_for("vouchd is serving the SPIFFE Workload API")
    pids = started_pids(state)

    os.kill(pids["swtpm"], signal.SIGKILL)

    assert run.process.wait(timeout=DEADLINE) == 1
    run.wait_for(f"run: the swtpm (PID {pids['swtpm']}) exited")
    assert not alive(pids["agent"]), "the agent is stopped with it"
