"""A restarted agent serves what it held at once, from its state sealed to the boot's PCRs; after
the PCRs changed it cannot unseal that state, discards it, attests again and serves again."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.interop.conftest import DEADLINE, VOUCHD, RunningAgent, running_agent

pytestmark = pytest.mark.interop

# PCR 16 (the debug PCR) is sealed to besides the attested 0-7, so a test can change it without
# changing the boot the node attests.
SETTINGS = "saved_state: {extra_pcrs: [16]}"


@pytest.fixture
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("saved"), agent_settings=SETTINGS) as agent:
        yield agent


def fetch_serial(agent: RunningAgent) -> str:
    fetched = subprocess.run([*VOUCHD, "api", "fetch", "x509"], env=agent.client_env(), capture_output=True,
                             text=True, timeout=DEADLINE, check=True)
    return next(line.split()[-1] for line in fetched.stdout.splitlines() if line.strip().startswith("serial:"))


def saved_state(agent: RunningAgent) -> Path:
    return agent.config.parent / "agent" / "saved" / "state.bin"


def wait_until_saved_after(agent: RunningAgent, moment: float) -> None:
    deadline = time.monotonic() + DEADLINE
    while not (saved_state(agent).exists() and saved_state(agent).stat().st_mtime > moment):
        assert time.monotonic() < deadline, "the state was saved"
        time.sleep(0.1)


def stop(agent: RunningAgent) -> None:
    agent.process.send_signal(signal.SIGTERM)
    agent.process.wait(timeout=DEADLINE)


def log_records(agent: RunningAgent, message: str) -> list[dict[str, object]]:
    return [record for line in agent.log.read_text().splitlines()
            if (record := json.loads(line)).get("msg") == message]


def test_a_restarted_agent_serves_the_svid_it_held_from_its_sealed_state(agent: RunningAgent) -> None:
    before = time.time()
    serial = fetch_serial(agent)
    wait_until_saved_after(agent, before)
    stop(agent)

    agent.start()

    assert fetch_serial(agent) == serial, "the same SVID, not a new one: it came from the saved state"
    (restored,) = log_records(agent, "serving the saved state while the node attests")
    assert restored["svids"] == 1


def test_after_a_sealed_pcr_changed_the_saved_state_is_discarded_and_the_node_attests_again(
        agent: RunningAgent) -> None:
    before = time.time()
    serial = fetch_serial(agent)
    wait_until_saved_after(agent, before)
    stop(agent)
    subprocess.run(["tpm2_pcrextend", "-T", agent.tpm.tcti, "16:sha256=" + "ab" * 32], check=True,
                   capture_output=True, timeout=DEADLINE)

    agent.start()

    (discarded,) = log_records(agent, "saved state discarded; the node attests afresh")
    assert "does not unseal" in str(discarded["reason"])
    assert not log_records(agent, "serving the saved state while the node attests")
    assert fetch_serial(agent) != serial, "a new SVID, issued after attesting again"
    assert agent.process.poll() is None
