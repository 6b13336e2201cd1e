"""The shipped systemd units stay hardened: `systemd-analyze security --offline` rates each one."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[2] / "systemd"
# The agent needs a TPM, other processes' /proc and two capabilities; the server needs nothing.
MAX_EXPOSURE = {"vouchd-agent.service": 4.5, "vouchd-server.service": 4.5}


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
@pytest.mark.parametrize("unit", sorted(MAX_EXPOSURE))
def test_a_unit_is_rated_no_more_exposed_than_its_limit(unit: str) -> None:
    analysed = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager", str(UNITS / unit)],
                              capture_output=True, text=True, timeout=60, check=False)

    found = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", analysed.stdout)
    assert found is not None, analysed.stdout + analysed.stderr
    assert float(found.group(1)) <= MAX_EXPOSURE[unit]


def test_the_server_unit_runs_the_server_and_holds_no_capability() -> None:
    text = (UNITS / "vouchd-server.service").read_text()

    assert re.search(r"^ExecStart=\S+ server --config ", text, re.M)
    assert re.search(r"^CapabilityBoundingSet=$", text, re.M)
    assert re.search(r"^Type=notify$", text, re.M) and re.search(r"^WatchdogSec=", text, re.M)
