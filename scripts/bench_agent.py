"""The processes the bench runs: a standalone agent on a swtpm of its own, the floor server, and clients.

The agent is set up as the interop tests set theirs up (tests/interop/conftest.py: a provisioned swtpm,
a simulated measured boot, the same configuration file with an entry for uid 0), but started by the
bench itself, so that it can time a start from the process's launch to the first SVID a client gets.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from tests import swtpm as swtpm_mod
from tests.interop.conftest import VOUCHD, RunningAgent, _write_config
from vouchd.agent.admin import admin_request

SCRIPTS = Path(__file__).resolve().parent
CLIENTS = SCRIPTS / "bench_clients.py"
FLOOR = SCRIPTS / "bench_floor.py"
GOLOAD = SCRIPTS.parent / "bench" / "goload"
ROOT_ID = "spiffe://example.org/user/root"  # what the agent's configured entry gives uid 0, the bench's uid
DEADLINE = 30.0  # every wait of the bench is bounded by this (seconds); a start by twice that


class BenchError(Exception):
    """A measurement could not be taken: a wait ran out, a stream ended, a caller failed."""


def rss_mb(pid: int) -> float:
    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.user + times.system


class BenchAgent:
    """A standalone agent the bench starts, stops and starts again, timing each start to the first SVID."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.runtime = Path(tempfile.mkdtemp(prefix="vouchd-bench-run-"))
        self.runtime.chmod(0o755)  # like /run/vouchd: the callers that drop to other uids must reach the socket
        self.tpm: swtpm_mod.Swtpm | None = None
        self.agent: RunningAgent | None = None

    @property
    def running(self) -> RunningAgent:
        assert self.agent is not None
        return self.agent

    @property
    def socket(self) -> Path:
        return self.running.socket

    @property
    def pid(self) -> int:
        return self.running.process.pid

    def prepare(self) -> None:
        """Provision and start the swtpm, measure a boot into it, write the configuration."""
        swtpm_mod.provision(self.base / "swtpm")
        self.tpm = swtpm_mod.start(self.base / "swtpm")
        event_log = self.base / "eventlog.bin"
        subprocess.run([*VOUCHD, "dev", "simulate-boot", "--tcti", self.tpm.tcti, "--event-log", str(event_log)],
                       check=True, capture_output=True)
        config = _write_config(self.base, self.runtime, self.tpm, event_log, x509_svid_ttl="1h", node_svid_ttl="1h",
                               attestation_interval="60s", tpm_unreachable_limit="60s", state=self.base,
                               entries=[(ROOT_ID, "unix:uid:0")])
        self.agent = RunningAgent(self.runtime / "agent.sock", self.runtime / "admin.sock", self.base / "agent.log",
                                  config, self.tpm, event_log, {})

    def start(self) -> float:
        """Start the agent; seconds from its launch to the first X.509-SVID a client was served."""
        agent = self.running
        poller = subprocess.Popen([sys.executable, str(CLIENTS), "first-svid", str(agent.socket),
                                   "--deadline", str(DEADLINE * 2)], stdout=subprocess.PIPE, text=True)
        try:
            assert poller.stdout is not None
            if json.loads(poller.stdout.readline() or "{}").get("polling") is not True:
                raise BenchError("the first-svid client did not start")
            with agent.log.open("ab") as sink:
                launched = time.monotonic()
                agent.process = subprocess.Popen([*VOUCHD, "agent", "--standalone", "--config", str(agent.config)],
                                                 stdout=sink, stderr=subprocess.STDOUT)
            said = json.loads(poller.stdout.readline() or "{}")
        finally:
            with contextlib.suppress(subprocess.TimeoutExpired):
                poller.wait(timeout=DEADLINE)
            if poller.poll() is None:
                poller.kill()
                poller.wait()
        if "served_at" not in said:
            raise BenchError(f"the agent served no SVID after its start: {said.get('error', said)}")
        return round(said["served_at"] - launched, 3)

    def stop(self) -> None:
        agent = self.agent
        process = getattr(agent, "process", None)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

    def close(self) -> None:
        self.stop()
        if self.tpm is not None:
            self.tpm.stop()
        shutil.rmtree(self.runtime, ignore_errors=True)

    def log_tail(self, lines: int = 40) -> list[str]:
        return self.running.log.read_text(errors="replace").splitlines()[-lines:]

    async def admin(self, command: str, args: dict[str, Any] | None = None) -> Any:
        return await admin_request(self.running.admin_socket, command, args or {}, timeout=DEADLINE)


@contextlib.contextmanager
def bench_agent(keep: bool) -> Iterator[BenchAgent]:
    base = Path(tempfile.mkdtemp(prefix="vouchd-bench-"))
    agent = BenchAgent(base)
    try:
        agent.prepare()
        yield agent
    finally:
        agent.close()
        if keep:
            print(f"bench: kept {base} (the agent's log is {base / 'agent.log'})", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


# -- the floor ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def floor_server(response: Path) -> Iterator[tuple[Path, int]]:
    """bench_floor.py serving `response` on a socket of its own: (socket, pid) while the block runs."""
    folder = Path(tempfile.mkdtemp(prefix="vouchd-bench-floor-"))
    folder.chmod(0o755)
    socket = folder / "floor.sock"
    process = subprocess.Popen([sys.executable, str(FLOOR), str(socket), str(response)], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert process.stdout is not None
        if json.loads(process.stdout.readline() or "{}").get("ready") is not True:
            raise BenchError("the floor server did not start")
        yield socket, process.pid
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        shutil.rmtree(folder, ignore_errors=True)


# -- clients ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadClient:
    """What makes the load calls (calls per second, open streams, new workloads): go-spiffe v2.9 through
    bench/goload, as SPIRE's agent was measured and spending little CPU, or grpclib (bench_clients.py)
    where Go cannot build it. The floor and the agent get the same one."""

    go_binary: Path | None

    @property
    def name(self) -> str:
        return "go-spiffe v2.9 (bench/goload)" if self.go_binary else "grpclib (scripts/bench_clients.py)"

    def argv(self, mode: str, socket: Path, **options: object) -> list[str]:
        """`load` (concurrency, seconds, per_call, jwt_audience), `streams` (count) or `once`."""
        if self.go_binary is not None:
            argv = [str(self.go_binary), mode, "-socket", str(socket)]
        else:
            argv = [sys.executable, str(CLIENTS), mode, str(socket)]
            if mode == "streams":
                argv.append(str(options.pop("count")))
        for option, value in options.items():
            flag = "--" + option.replace("_", "-")
            if value is True:
                argv.append(flag)
            elif value not in (None, False):
                argv += [flag, str(value)]
        return argv


def build_go_client(folder: Path) -> tuple[Path | None, str]:
    """bench/goload built into `folder` (readable by every user: new workloads run it as theirs), or None
    and why not (no Go >= 1.24 on PATH, or the build failed)."""
    go = shutil.which("go")
    if go is None:
        return None, "no go toolchain on PATH"
    version = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True, check=False).stdout.strip()
    match = re.fullmatch(r"go(\d+)\.(\d+)(?:\.\d+)?.*", version)
    if match is None or (int(match.group(1)), int(match.group(2))) < (1, 24):
        return None, f"{go} is {version or 'of unknown version'}, not >= 1.24"
    binary = folder / "goload"
    # GOTOOLCHAIN=local: never download another toolchain because go.mod asks for one.
    build = subprocess.run([go, "build", "-buildvcs=false", "-o", str(binary), "."], cwd=GOLOAD,
                           env={**os.environ, "GOTOOLCHAIN": "local"}, capture_output=True, text=True,
                           timeout=540, check=False)
    if build.returncode != 0:
        return None, f"go build of {GOLOAD} failed: {build.stderr.strip()[-500:]}"
    binary.chmod(0o755)
    return binary, version


def run_json(argv: list[str], *, timeout: float = DEADLINE * 4, **popen: Any) -> list[dict[str, Any]]:
    """Run a client to its end; its JSON lines. BenchError if it failed."""
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False, **popen)
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0:
        said = lines[-1] if lines else result.stderr.strip().splitlines()[-1:] or "nothing"
        raise BenchError(f"{Path(argv[0]).name} {argv[1]} failed ({result.returncode}): {said}")
    return lines


def client(mode: str, *args: str, timeout: float = DEADLINE * 4) -> list[dict[str, Any]]:
    """Run bench_clients.py MODE ARGS to its end; its JSON lines. BenchError if it failed."""
    return run_json([sys.executable, str(CLIENTS), mode, *args], timeout=timeout)


class ClientProcess:
    """A client running beside the bench (bench_clients.py MODE ARGS, or an argv): its JSON lines as
    they come; stopped by closing its stdin (the `streams` mode's signal to end), else by its PID."""

    def __init__(self, mode: str, *args: str, argv: list[str] | None = None) -> None:
        self._command = argv or [sys.executable, str(CLIENTS), mode, *args]
        self._mode = mode
        self._process: asyncio.subprocess.Process | None = None

    async def __aenter__(self) -> ClientProcess:
        self._process = await asyncio.create_subprocess_exec(
            *self._command, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, limit=2**20)
        return self

    async def __aexit__(self, *exc: object) -> None:
        process = self._process
        if process is None:
            return
        if process.stdin is not None:
            process.stdin.close()
        try:
            async with asyncio.timeout(DEADLINE):
                await process.wait()
        except TimeoutError:
            self.kill()
            await process.wait()

    @property
    def pid(self) -> int:
        assert self._process is not None
        return self._process.pid

    async def lines(self) -> AsyncIterator[dict[str, Any]]:
        assert self._process is not None and self._process.stdout is not None
        while line := await self._process.stdout.readline():
            yield json.loads(line)

    async def next_line(self, what: str, timeout: float = DEADLINE) -> dict[str, Any]:
        assert self._process is not None and self._process.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                line = await self._process.stdout.readline()
        except TimeoutError:
            raise BenchError(f"{self._mode} client: no {what} within {timeout:g} s") from None
        if not line:
            raise BenchError(f"{self._mode} client exited before {what}")
        said: dict[str, Any] = json.loads(line)
        return said

    async def stop(self) -> None:
        """Close stdin (the client ends its streams and exits) and wait for it."""
        await self.__aexit__()

    def kill(self) -> None:
        if self._process is not None and self._process.returncode is None:
            self._process.kill()


def machine() -> dict[str, Any]:
    return {"cpus": os.cpu_count(), "load_average_1m": round(os.getloadavg()[0], 2),
            "python": sys.version.split()[0], "kernel": os.uname().release}
