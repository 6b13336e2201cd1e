"""A real `vouchd agent --standalone` process on its own swtpm, for tests that use real clients."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests import swtpm as swtpm_mod

VOUCHD = [sys.executable, "-m", "vouchd.cli"]


@dataclass
class RunningAgent:
    process: subprocess.Popen[bytes]
    socket: Path
    admin_socket: Path
    log: Path
    config: Path

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
                  entries: Sequence[tuple[str, str]]) -> Path:
    config = directory / "standalone.yaml"
    entry_lines = "".join(f"""
          - spiffe_id: {spiffe_id}
            selectors: ["{selector}"]""" for spiffe_id, selector in entries)
    config.write_text(textwrap.dedent(f"""\
        trust_domain: example.org
        agent:
          state_dir: {directory}/agent
          socket_path: {runtime}/agent.sock
          admin_socket_path: {runtime}/admin.sock
          tpm: {{tcti: "{tpm.tcti}", ek: rsa2048}}
          event_log: {event_log}
          attestation_interval: {attestation_interval}
        authority:
          state_dir: {directory}/authority
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
                  attestation_interval: str = "60s",
                  extra_entries: Sequence[tuple[str, str]] = ()) -> Iterator[RunningAgent]:
    """Provision a swtpm, simulate a measured boot, start the agent and wait until it is healthy.

    The agent's entries always include spiffe://example.org/user/root for uid 0 (the tests' uid).
    """
    swtpm_mod.provision(base / "swtpm")
    tpm = swtpm_mod.start(base / "swtpm")
    process = None
    try:
        event_log = base / "eventlog.bin"
        subprocess.run([*VOUCHD, "dev", "simulate-boot", "--tcti", tpm.tcti, "--event-log", str(event_log)],
                       check=True, capture_output=True)
        # Like /run/vouchd: reachable by every user (pytest's own temp folders are root-only).
        runtime = Path(tempfile.mkdtemp(prefix="vouchd-run-"))
        runtime.chmod(0o755)
        config = _write_config(base, runtime, tpm, event_log, x509_svid_ttl=x509_svid_ttl,
                               node_svid_ttl=node_svid_ttl, attestation_interval=attestation_interval,
                               entries=[("spiffe://example.org/user/root", "unix:uid:0"), *extra_entries])
        log = base / "agent.log"
        with log.open("wb") as sink:
            process = subprocess.Popen([*VOUCHD, "agent", "--standalone", "--config", str(config)],
                                       stdout=sink, stderr=subprocess.STDOUT)
        running = RunningAgent(process, runtime / "agent.sock", runtime / "admin.sock", log, config)
        deadline = time.monotonic() + 60
        while subprocess.run([*VOUCHD, "healthcheck", "--admin-socket", str(running.admin_socket)],
                             capture_output=True, check=False).returncode != 0:
            if process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"agent did not become healthy:\n{log.read_text()}")
            time.sleep(0.1)
        yield running
    finally:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=30)
        tpm.stop()
