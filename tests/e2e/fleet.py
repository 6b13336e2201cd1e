"""A fleet in processes: `vouchd server` replicas, agents on their own swtpms, one mosquitto.

Each daemon is a real process started as an operator would (`vouchd server --config`,
`vouchd agent --config`), configured by files written here, and stopped by PID. `prefix` runs a
process elsewhere (e.g. `ip netns exec NAME`), so tests/e2e/test_fleet_netns.py can put each host in a
network namespace of its own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests import swtpm as swtpm_mod
from vouchd.agent.admin import admin_request

VOUCHD = [sys.executable, "-m", "vouchd.cli"]
DEADLINE = 30.0
SHARE_GROUP = "replicas-7f3a"   # nodes do not know it (docs/protocol.md: a known group lets nodes steal requests)


def wait_for(condition: Any, what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {timeout:g} s: {what}")
        time.sleep(0.05)


@dataclass
class Daemon:
    """A vouchd daemon process: its command, log, admin socket, and how to start it again."""

    command: list[str]
    log: Path
    admin_socket: Path
    prefix: Sequence[str] = ()
    environment: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    def start(self, *, healthy: bool = True) -> None:
        with self.log.open("ab") as sink:
            self.process = subprocess.Popen([*self.prefix, *self.command], stdout=sink, stderr=subprocess.STDOUT,
                                            env={**os.environ, **self.environment})
        if healthy:
            wait_for(self.ready, f"{self.command[3]} ready:\n{self.log.read_text()[-3000:]}", timeout=60)

    def ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            pytest.fail(f"{self.command[3]} exited with {self.process.returncode}:\n{self.log.read_text()[-3000:]}")
        try:
            return bool(self.admin("status").get("ready"))
        except (OSError, TimeoutError, Exception):
            return False

    def admin(self, command: str, args: dict[str, Any] | None = None) -> Any:
        return asyncio.run(admin_request(self.admin_socket, command, args or {}, timeout=DEADLINE))

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=DEADLINE)

    def log_records(self, message: str) -> list[dict[str, Any]]:
        records = []
        for line in self.log.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("msg") == message:
                records.append(record)
        return records


def server_config(base: Path, *, broker: tuple[str, int], client_id: str, ek_roots: Sequence[Path],
                  ek_intermediates: Sequence[Path], state_dir: Path, store: str = "{kind: sqlite}",
                  entries: str = "") -> Path:
    path = base / f"{client_id}.yaml"
    path.write_text(textwrap.dedent(f"""\
        trust_domain: example.org
        authority:
          state_dir: {state_dir}
          admin_socket_path: {base}/{client_id}.sock
          store: {store}
          ek_trust:
            roots: [{", ".join(str(p) for p in ek_roots)}]
            intermediates: [{", ".join(str(p) for p in ek_intermediates)}]
            enrolment: any-genuine
          broker: {{host: "{broker[0]}", port: {broker[1]}, client_id: {client_id}, share_group: {SHARE_GROUP}}}
          policy: {{audiences: {{"tool:search": low}}}}
          node_svid_ttl: 1h
        """) + entries)
    return path


def server(base: Path, config: Path, name: str, prefix: Sequence[str] = ()) -> Daemon:
    return Daemon(command=[*VOUCHD, "server", "--config", str(config)], log=base / f"{name}.log",
                  admin_socket=base / f"{name}.sock", prefix=prefix)


@dataclass
class Host:
    """An agent host: its swtpm (or none, at the static-secret tier), event log and agent."""

    name: str
    folder: Path
    agent: Daemon
    config: Path
    tpm: swtpm_mod.Swtpm | None
    event_log: Path | None

    @property
    def socket(self) -> Path:
        return self.folder / "run" / "agent.sock"

    def client_env(self) -> dict[str, str]:
        return {**os.environ, "SPIFFE_ENDPOINT_SOCKET": f"unix:{self.socket}"}

    def node_id(self) -> str:
        status = self.agent.admin("status")
        return str(status["node"]["id"])

    def stop(self) -> None:
        self.agent.stop()
        if self.tpm is not None:
            self.tpm.stop()


def hardware_host(base: Path, name: str, *, broker: tuple[str, int], bundle: Path,
                  prefix: Sequence[str] = ()) -> Host:
    """Provision and boot a swtpm for a host (its agent is not started)."""
    folder = base / name
    (folder / "run").mkdir(parents=True)
    (folder / "run").chmod(0o755)
    swtpm_mod.provision(folder / "swtpm")
    tpm = swtpm_mod.start(folder / "swtpm")
    event_log = folder / "eventlog.bin"
    subprocess.run([*VOUCHD, "dev", "simulate-boot", "--tcti", tpm.tcti, "--event-log", str(event_log)],
                   check=True, capture_output=True, timeout=DEADLINE)
    config = _agent_config(folder, broker=broker, bundle=bundle, node=textwrap.dedent(f"""\
          tpm: {{tcti: "{tpm.tcti}", ek: rsa2048}}
          event_log: {event_log}
        """))
    agent = Daemon(command=[*VOUCHD, "agent", "--config", str(config)], log=folder / "agent.log",
                   admin_socket=folder / "run" / "admin.sock", prefix=prefix)
    return Host(name, folder, agent, config, tpm, event_log)


def static_host(base: Path, name: str, *, broker: tuple[str, int], bundle: Path, token: str,
                prefix: Sequence[str] = ()) -> Host:
    """A host without a TPM that joins with `token`."""
    folder = base / name
    (folder / "run").mkdir(parents=True)
    (folder / "run").chmod(0o755)
    token_file = folder / "join-token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    config = _agent_config(folder, broker=broker, bundle=bundle, node=textwrap.dedent(f"""\
          tier: static-secret
          join_token_file: {token_file}
        """))
    agent = Daemon(command=[*VOUCHD, "agent", "--config", str(config)], log=folder / "agent.log",
                   admin_socket=folder / "run" / "admin.sock", prefix=prefix)
    return Host(name, folder, agent, config, None, None)


def _agent_config(folder: Path, *, broker: tuple[str, int], bundle: Path, node: str) -> Path:
    path = folder / "agent.yaml"
    path.write_text("trust_domain: example.org\nagent:\n"
                    f"  state_dir: {folder}/state\n"
                    f"  socket_path: {folder}/run/agent.sock\n"
                    f"  admin_socket_path: {folder}/run/admin.sock\n"
                    "  attestation_interval: 5s\n"
                    f"  fleet: {{broker: {{host: \"{broker[0]}\", port: {broker[1]}}}, trust_bundle: {bundle}}}\n"
                    + textwrap.indent(node, "  "))
    return path


def learn_profile(base: Path, host: Host, server_state: Path, store: str = "{kind: sqlite}") -> None:
    """`vouchd node learn` of the host's boot into the authority's store (the operator's step)."""
    config = base / f"learn-{host.name}.yaml"
    config.write_text(textwrap.dedent(f"""\
        trust_domain: example.org
        agent: {{event_log: {host.event_log}, state_dir: {host.folder}/learn}}
        authority: {{state_dir: {server_state}, store: {store}}}
        """))
    subprocess.run([*VOUCHD, "node", "learn", "--config", str(config), "--name", f"boot-{host.name}"],
                   check=True, capture_output=True, timeout=DEADLINE)


def write_bundle(server_daemon: Daemon, path: Path) -> Path:
    path.write_text(server_daemon.admin("bundle.show")["pem"])
    return path


def fetch_x509(host: Host) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*VOUCHD, "api", "fetch", "x509"], env=host.client_env(), capture_output=True, text=True,
                          timeout=DEADLINE, check=False)
