"""Callers whose executables live on a file system that stops answering, against a real agent.

Each caller is a Python interpreter whose binary is served by a FUSE mount of the test's own
(tests/fusefs.py), run as uid 4747 or 4848 (dropped after start, before it connects). Reached directly, the
mount is refused by type: the agent asks it nothing. Reached through overlayfs stacked on it, it
passes the type check, and the agent's reads of those callers' executables hang in the kernel once
the server stops answering the agent: six such callers hang, and another caller is still served at
once. Skipped where the machine cannot mount FUSE.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.fusefs import FuseFile, fuse_available, mount_fs, mounted, unmount
from tests.interop.conftest import DEADLINE, RunningAgent, running_agent

pytestmark = pytest.mark.interop

ROOT_ID = "spiffe://example.org/user/root"
STALLED_UID = 4747
STALLED_ID = "spiffe://example.org/stalled"
ON_FUSE_UID = 4848
ON_FUSE_ID = "spiffe://example.org/on-fuse"
PYTHON = Path(os.path.realpath(sys.executable))  # the interpreter binary itself; its library stays where it is
SITE_PACKAGES = next(path for path in sys.path if path.endswith("site-packages"))

FETCH = textwrap.dedent("""
    import os, sys, time
    import grpc
    from spiffe._proto import workload_pb2, workload_pb2_grpc
    socket, uid = sys.argv[1], int(sys.argv[2])
    if uid:
        os.setgroups([]); os.setgid(uid); os.setuid(uid)
    stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel(f"unix:{socket}"))
    started = time.monotonic()
    try:
        response = next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(),
                                           metadata=[("workload.spiffe.io", "true")], timeout=10))
        answer = ",".join(sorted(s.spiffe_id for s in response.svids))
    except grpc.RpcError as err:
        answer = err.code().name
    print(answer, time.monotonic() - started)
""")


@dataclass
class Fetch:
    answer: str
    seconds: float  # from the request to the answer, as the caller measured it


def start_fetch(agent: RunningAgent, python: Path, uid: int) -> subprocess.Popen[str]:
    environment = {**os.environ, "PYTHONHOME": sys.base_prefix, "PYTHONPATH": SITE_PACKAGES}
    return subprocess.Popen([str(python), "-c", FETCH, str(agent.socket), str(uid)], env=environment,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def result(caller: subprocess.Popen[str]) -> Fetch:
    stdout, stderr = caller.communicate(timeout=DEADLINE)
    assert caller.returncode == 0, stderr
    answer, seconds = stdout.split()
    return Fetch(answer, float(seconds))


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    if (why := fuse_available()) is not None:
        pytest.skip(f"no FUSE mount on this machine: {why}")
    entries = [(STALLED_ID, f"unix:uid:{STALLED_UID}"), (ON_FUSE_ID, f"unix:uid:{ON_FUSE_UID}")]
    with running_agent(tmp_path_factory.mktemp("stalled"), extra_entries=entries) as agent:
        yield agent


@pytest.fixture
def served(agent: RunningAgent, tmp_path: Path) -> Iterator[tuple[Path, Path, FuseFile]]:
    """The interpreter at <fuse>/python and <overlay on fuse>/python.

    Asks for the agent so that it ends first: an agent whose threads wait for the file system could
    not exit until the server answers.
    """
    lower, upper, work, merged = (tmp_path / name for name in ("lower", "upper", "work", "merged"))
    for folder in (lower, upper, work, merged):
        folder.mkdir()
    file = FuseFile("python", PYTHON.read_bytes())
    with mounted(lower, file):
        try:
            mount_fs("overlay", merged, "overlay", f"lowerdir={lower},upperdir={upper},workdir={work}")
        except OSError as err:
            pytest.skip(f"cannot stack overlayfs on FUSE here: {err}")
        try:
            yield lower / "python", merged / "python", file
        finally:
            file.release()
            unmount(merged)


def test_stalled_executables_hold_up_only_their_own_callers(
    agent: RunningAgent, served: tuple[Path, Path, FuseFile]
) -> None:
    on_fuse, on_overlay, file = served
    file.stall(process=agent.process.pid)  # from now on the server answers the agent nothing about the file
    log_start = agent.log.stat().st_size

    stalled = [start_fetch(agent, on_overlay, STALLED_UID) for _ in range(6)]
    deadline = time.monotonic() + DEADLINE
    while file.held < 2:  # uid 4747's share of the agent's threads now waits for the server
        assert time.monotonic() < deadline, f"the agent's reads never reached the server ({file.held} held)"
        time.sleep(0.05)
    other = result(start_fetch(agent, PYTHON, 0))
    refused_by_type = result(start_fetch(agent, on_fuse, ON_FUSE_UID))
    answers = [result(caller) for caller in stalled]

    assert other.answer == ROOT_ID
    assert other.seconds < 0.5, f"a caller of another uid waited {other.seconds:.2f} s"
    # Every stalled caller is answered within the deadline: its uid entry needs no path or sha256.
    assert [fetch.answer for fetch in answers] == [STALLED_ID] * 6
    assert max(fetch.seconds for fetch in answers) < 5
    assert file.held == 2, "only uid 4747's share of threads ever waited for the server"
    assert refused_by_type.answer == ON_FUSE_ID, "refused by type: the agent asked the stalled server nothing"
    assert refused_by_type.seconds < 0.5
    log = agent.log.read_bytes()[log_start:].decode()
    assert f"uid {ON_FUSE_UID}: it lives on a FUSE file system (fuse at {on_fuse.parent})" in log
    assert f"uid {STALLED_UID}: no answer within 1 s" in log
    file.release()
    assert result(start_fetch(agent, PYTHON, 0)).answer == ROOT_ID
    assert agent.process.poll() is None
