"""`vouchd agent` on a TPM whose endorsement authorization someone changed: it refuses to start with
the fix named, and with `agent.tpm.endorsement_auth_file` it starts and serves."""

from __future__ import annotations

import shutil
import signal
import subprocess
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from tpm2_pytss import ESAPI, ESYS_TR

from tests import swtpm as swtpm_mod
from tests.interop.conftest import DEADLINE, VOUCHD, RunningAgent

SECRET = b"set-by-someone-in-tss"


@pytest.fixture
def changed_tpm(tmp_path: Path) -> Iterator[tuple[swtpm_mod.Swtpm, Path]]:
    """A swtpm of this test's own, booted, whose endorsement authorization is SECRET."""
    swtpm_mod.provision(tmp_path / "swtpm")
    tpm = swtpm_mod.start(tmp_path / "swtpm")
    try:
        event_log = tmp_path / "eventlog.bin"
        subprocess.run([*VOUCHD, "dev", "simulate-boot", "--tcti", tpm.tcti, "--event-log", str(event_log)],
                       check=True, capture_output=True, timeout=DEADLINE)
        esapi = ESAPI(tpm.tcti)
        try:
            esapi.hierarchy_change_auth(ESYS_TR.ENDORSEMENT, SECRET)  # tpm2_changeauth -c e SECRET
        finally:
            esapi.close()
        yield tpm, event_log
    finally:
        tpm.stop()


def write_config(base: Path, runtime: Path, tpm: swtpm_mod.Swtpm, event_log: Path, tpm_extra: str) -> Path:
    config = base / "vouchd.yaml"
    config.write_text(textwrap.dedent(f"""\
        trust_domain: example.org
        agent:
          state_dir: {base}/agent
          socket_path: {runtime}/agent.sock
          admin_socket_path: {runtime}/admin.sock
          tpm: {{tcti: "{tpm.tcti}", ek: rsa2048{tpm_extra}}}
          event_log: {event_log}
        authority:
          state_dir: {base}/authority
          ek_trust:
            roots: [{tpm.manufacturer_root}]
            intermediates: [{tpm.manufacturer_issuer}]
        entries:
          - spiffe_id: spiffe://example.org/user/root
            selectors: ["unix:uid:0"]
        """))
    return config


def test_the_agent_names_a_changed_endorsement_authorization_and_starts_with_the_configured_one(
    changed_tpm: tuple[swtpm_mod.Swtpm, Path], tmp_path: Path
) -> None:
    tpm, event_log = changed_tpm
    runtime = Path(tempfile.mkdtemp(prefix="vouchd-run-"))
    agent: RunningAgent | None = None
    try:
        config = write_config(tmp_path, runtime, tpm, event_log, "")
        refused = subprocess.run([*VOUCHD, "agent", "--standalone", "--config", str(config)], capture_output=True,
                                 text=True, timeout=DEADLINE, check=False)
        assert refused.returncode != 0
        assert "the tpm refused the empty endorsement hierarchy authorization" in refused.stderr, refused.stderr
        assert "agent.tpm.endorsement_auth_file" in refused.stderr
        assert "Traceback" not in refused.stderr

        auth_file = tmp_path / "endorsement.auth"
        auth_file.write_bytes(SECRET + b"\n")
        auth_file.chmod(0o600)
        config = write_config(tmp_path, runtime, tpm, event_log, f", endorsement_auth_file: {auth_file}")
        agent = RunningAgent(runtime / "agent.sock", runtime / "admin.sock", tmp_path / "agent.log", config, tpm,
                             event_log, {})
        agent.start()  # healthy: attested, serving
        assert SECRET.decode() not in agent.log.read_text()
    finally:
        process = getattr(agent, "process", None)
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            process.wait(timeout=DEADLINE)
        shutil.rmtree(runtime, ignore_errors=True)
