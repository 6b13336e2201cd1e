"""A real `vouchd agent --standalone` process on its own swtpm, for tests that use real clients."""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import swtpm as swtpm_mod

VOUCHD = [sys.executable, "-m", "vouchd.cli"]
WATCHER = Path(__file__).with_name("stream_watch.py")
# Every wait in these tests is bounded by this.
DEADLINE = 30.0


@dataclass
class RunningAgent:
    socket: Path
    admin_socket: Path
    log: Path
    config: Path
    tpm: swtpm_mod.Swtpm
    event_log: Path
    environment: dict[str, str]
    process: subprocess.Popen[bytes] = field(init=False)  # set by start()

    def start(self) -> None:
        """Start the agent process (again, after it stopped) and wait until it is healthy."""
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen([*VOUCHD, "agent", "--standalone", "--config", str(self.config)],
                                            stdout=sink, stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.environment})
        deadline = time.monotonic() + 60
        while self.healthcheck().returncode != 0:
            if self.process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"agent did not become healthy:\n{self.log.read_text()}")
            time.sleep(0.1)

    def kill(self) -> None:
        """kill -9: no shutdown, no cleanup; sockets and files stay as they were."""
        self.process.kill()
        self.process.wait(timeout=DEADLINE)

    def healthcheck(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*VOUCHD, "healthcheck", "--admin-socket", str(self.admin_socket)],
                              capture_output=True, text=True, timeout=DEADLINE, check=False)

    def simulate_boot(self) -> None:
        """After the swtpm restarted (a reboot): measure the same boot again into its fresh PCRs."""
        subprocess.run([*VOUCHD, "dev", "simulate-boot", "--tcti", self.tpm.tcti, "--event-log",
                        str(self.event_log)], check=True, capture_output=True, timeout=DEADLINE)

    def client_env(self) -> dict[str, str]:
        return {**os.environ, "SPIFFE_ENDPOINT_SOCKET": f"unix:{self.socket}"}

    def status(self) -> dict[str, object]:
        import json

        result = subprocess.run([*VOUCHD, "status", "--json", "--admin-socket", str(self.admin_socket)],
                                capture_output=True, text=True, check=True)
        status: dict[str, object] = json.loads(result.stdout)
        return status


def _write_config(directory: Path, runtime: Path, tpm: swtpm_mod.Swtpm, event_log: Path, *,
                  x509_svid_ttl: str, node_svid_ttl: str, attestation_interval: str,
                  tpm_unreachable_limit: str, entries: Sequence[tuple[str, str]], state: Path,
                  audit_anchor_every: int | None = None, audit_anchor_interval: str | None = None,
                  agent_settings: str = "") -> Path:
    config = directory / "standalone.yaml"
    entry_lines = "".join(f"""
          - spiffe_id: {spiffe_id}
            selectors: ["{selector}"]""" for spiffe_id, selector in entries)
    audit = {key: value for key, value in (("anchor_every", audit_anchor_every),
                                           ("anchor_interval", audit_anchor_interval)) if value is not None}
    # agent.audit only when a test asks for it (indented as the lines below are, before dedent)
    settings = ", ".join(f"{key}: {value}" for key, value in audit.items())
    audit_line = f"\n          audit: {{{settings}}}" if audit else ""
    if agent_settings:  # one more line of the agent section, as YAML flow style
        audit_line += f"\n          {agent_settings}"
    config.write_text(textwrap.dedent(f"""\
        trust_domain: example.org
        agent:
          state_dir: {state}/agent
          socket_path: {runtime}/agent.sock
          admin_socket_path: {runtime}/admin.sock
          tpm: {{tcti: "{tpm.tcti}", ek: rsa2048, unreachable_limit: {tpm_unreachable_limit}}}
          event_log: {event_log}
          attestation_interval: {attestation_interval}{audit_line}
        authority:
          state_dir: {state}/authority
          ek_trust:
            roots: [{tpm.manufacturer_root}]
            intermediates: [{tpm.manufacturer_issuer}]
          x509_svid_ttl: {x509_svid_ttl}
          node_svid_ttl: {node_svid_ttl}
        entries:{entry_lines}
        """))
    return config


@contextlib.contextmanager
def running_agent(base: Path, *, x509_svid_ttl: str = "1h", node_svid_ttl: str = "1h",
                  attestation_interval: str = "60s", tpm_unreachable_limit: str = "60s",
                  extra_entries: Sequence[tuple[str, str]] = (), root_entry: bool = True,
                  environment: dict[str, str] | None = None, state: Path | None = None,
                  audit_anchor_every: int | None = None,
                  audit_anchor_interval: str | None = None, agent_settings: str = "") -> Iterator[RunningAgent]:
    """Provision a swtpm, simulate a measured boot, start the agent and wait until it is healthy.

    The agent's entries include spiffe://example.org/user/root for uid 0 (the tests' uid) unless
    `root_entry` is false.
    `state`: where the agent's and the authority's state folders go (default: `base`).
    `audit_anchor_every`, `audit_anchor_interval`: agent.audit's keys (default: left out of the file).
    `agent_settings`: one more `key: value` line for the agent section (e.g. `policy: {...}`).
    """
    swtpm_mod.provision(base / "swtpm")
    tpm = swtpm_mod.start(base / "swtpm")
    running: RunningAgent | None = None
    runtime: Path | None = None
    try:
        event_log = base / "eventlog.bin"
        subprocess.run([*VOUCHD, "dev", "simulate-boot", "--tcti", tpm.tcti, "--event-log", str(event_log)],
                       check=True, capture_output=True)
        # Like /run/vouchd: reachable by every user (pytest's own temp folders are root-only).
        runtime = Path(tempfile.mkdtemp(prefix="vouchd-run-"))
        runtime.chmod(0o755)
        config = _write_config(base, runtime, tpm, event_log, x509_svid_ttl=x509_svid_ttl,
                               node_svid_ttl=node_svid_ttl, attestation_interval=attestation_interval,
                               tpm_unreachable_limit=tpm_unreachable_limit, state=state or base,
                               audit_anchor_every=audit_anchor_every, audit_anchor_interval=audit_anchor_interval,
                               agent_settings=agent_settings,
                               entries=[*([("spiffe://example.org/user/root", "unix:uid:0")] if root_entry else []),
                                        *extra_entries])
        running = RunningAgent(runtime / "agent.sock", runtime / "admin.sock", base / "agent.log", config, tpm,
                               event_log, dict(environment or {}))
        running.start()
        yield running
    finally:
        process = getattr(running, "process", None)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
        tpm.stop()
        if runtime is not None:
            shutil.rmtree(runtime, ignore_errors=True)  # nothing a test makes may outlive it


class StreamWatch:
    """The stream_watch.py process and what it reported, per stream."""

    def __init__(self, socket: Path, streams: int, uid: int | None = None) -> None:
        command = [sys.executable, str(WATCHER), str(socket), str(streams)]
        if uid is not None:
            command.append(str(uid))
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        self.streams = streams
        self.latest: dict[int, list[str]] = {}
        self.ended: dict[int, str] = {}
        self.messages = 0
        self._lines: queue.Queue[dict[str, Any]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self._lines.put(json.loads(line))

    def wait_until(self, condition: Callable[[StreamWatch], bool], what: str, timeout: float = DEADLINE) -> None:
        deadline = time.monotonic() + timeout
        while not condition(self):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                stderr = self.process.stderr.read() if self.process.poll() is not None and self.process.stderr else ""
                pytest.fail(f"streams never reached: {what}; latest {self.latest}, ended {self.ended} {stderr}")
            try:
                line = self._lines.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                continue
            if "stream" in line:
                if "end" in line:
                    self.ended[line["stream"]] = line["end"]
                else:
                    self.latest[line["stream"]] = line["spiffe_ids"]
                    self.messages += 1

    def all_hold(self, spiffe_ids: list[str]) -> bool:
        return len(self.latest) == self.streams and all(ids == sorted(spiffe_ids) for ids in self.latest.values())

    def close(self) -> None:
        if self.process.poll() is None:
            assert self.process.stdin is not None
            self.process.stdin.close()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


@pytest.fixture
def watch(agent: RunningAgent) -> Iterator[Callable[..., StreamWatch]]:
    opened: list[StreamWatch] = []

    def open_watch(streams: int = 1, uid: int | None = None) -> StreamWatch:
        watcher = StreamWatch(agent.socket, streams, uid)
        opened.append(watcher)
        return watcher

    yield open_watch
    for watcher in opened:
        watcher.close()
