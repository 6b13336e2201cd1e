"""Telling Python agents apart on one host, against a running standalone agent and py-spiffe clients.

Every process here is root and runs the same interpreter: only the script (interpreter attestor) and
who started whom (lineage attestor) tell them apart. The agent has no entry for uid 0 alone.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.interop.conftest import DEADLINE, VOUCHD, RunningAgent, running_agent
from vouchd.agent.admin import admin_request

pytestmark = pytest.mark.interop

# A Python agent: fetches its X.509-SVIDs with py-spiffe, says which it got, and (as "parent" or
# "child") starts itself again as the next generation and waits for it, holding its own SVID.
FAMILY = textwrap.dedent("""\
    import json, os, subprocess, sys
    from spiffe import WorkloadApiClient

    role = sys.argv[1] if len(sys.argv) > 1 else "parent"
    try:
        with WorkloadApiClient() as client:
            ids, error = sorted(str(s.spiffe_id) for s in client.fetch_x509_svids()), ""
    except Exception as err:
        ids, error = [], type(err).__name__
    print(json.dumps({"role": role, "ids": ids, "error": error}), flush=True)
    following = {"parent": "child", "child": "grandchild"}.get(role)
    if following:
        subprocess.run([sys.executable, __file__, following], check=True, timeout=60)
    """)
SLEEPER = "import time\ntime.sleep(60)\n"

AGENT = "spiffe://example.org/agent"


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("apart"), root_entry=False) as agent:
        yield agent


def admin(agent: RunningAgent, command: str, args: dict[str, Any]) -> Any:
    return asyncio.run(admin_request(agent.admin_socket, command, args, timeout=DEADLINE))


def create(agent: RunningAgent, spiffe_id: str, *selectors: str) -> str:
    entry: dict[str, Any] = admin(agent, "entry.create", {"spiffe_id": spiffe_id, "selectors": list(selectors)})
    return str(entry["id"])


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def run_python(agent: RunningAgent, *args: str) -> list[dict[str, Any]]:
    """Run the venv's interpreter with `args`; each line it prints is one process's report."""
    done = subprocess.run([sys.executable, *args], env=agent.client_env(), capture_output=True, text=True,
                          timeout=DEADLINE, check=False)
    assert done.returncode == 0, done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


@pytest.fixture
def entries(agent: RunningAgent) -> Iterator[list[str]]:
    """Entries the test creates; deleted afterwards so tests do not see each other's."""
    created: list[str] = []
    yield created
    for entry_id in created:
        admin(agent, "entry.delete", {"id": entry_id})


def test_two_scripts_of_one_interpreter_and_uid_get_different_identities(
        agent: RunningAgent, entries: list[str], tmp_path: Path) -> None:
    first, second = tmp_path / "planner.py", tmp_path / "researcher.py"
    first.write_text(FAMILY.replace('"parent": "child"', '"none": "child"'))
    second.write_text(FAMILY.replace('"parent": "child"', '"none": "child"') + "# the researcher\n")
    entries.append(create(agent, f"{AGENT}/planner", "unix:uid:0", f"script:sha256:{sha256(first)}"))
    entries.append(create(agent, f"{AGENT}/researcher", "unix:uid:0", f"script:sha256:{sha256(second)}"))

    assert run_python(agent, str(first))[0]["ids"] == [f"{AGENT}/planner"]
    assert run_python(agent, str(second))[0]["ids"] == [f"{AGENT}/researcher"]

    first.write_text(first.read_text() + " ")  # one byte more
    assert run_python(agent, str(first))[0] == {"role": "parent", "ids": [], "error": "FetchX509SvidError"}


def test_code_given_on_the_command_line_gets_no_script_identity(
        agent: RunningAgent, entries: list[str], tmp_path: Path) -> None:
    script = tmp_path / "planner.py"
    script.write_text(FAMILY.replace('"parent": "child"', '"none": "child"'))
    entries.append(create(agent, f"{AGENT}/planner", "unix:uid:0", f"script:sha256:{sha256(script)}"))
    entries.append(create(agent, f"{AGENT}/any-python", "unix:uid:0", "interpreter:name:python"))

    (report,) = run_python(agent, "-c", script.read_text())

    assert report["ids"] == [f"{AGENT}/any-python"], "the interpreter is known; no script is"


def test_a_child_gets_its_own_identity_never_its_parents_and_a_grandchild_has_depth_two(
        agent: RunningAgent, entries: list[str], tmp_path: Path) -> None:
    script = tmp_path / "orchestrator.py"
    script.write_text(FAMILY)
    entries.append(create(agent, f"{AGENT}/orchestrator", "unix:uid:0", f"script:sha256:{sha256(script)}"))
    entries.append(create(agent, f"{AGENT}/sub-agent", "unix:uid:0",
                          f"lineage:parent_spiffe_id:{AGENT}/orchestrator", "lineage:depth:1"))
    entries.append(create(agent, f"{AGENT}/sub-sub-agent", "unix:uid:0",
                          f"lineage:parent_spiffe_id:{AGENT}/sub-agent", "lineage:depth:2"))

    ran = run_python(agent, str(script))
    reports = {report["role"]: report["ids"] for report in ran}

    # The child and the grandchild run the very same script as the orchestrator: its entry matches
    # them too, and they are never handed its identity.
    assert reports == {
        "parent": [f"{AGENT}/orchestrator"],
        "child": [f"{AGENT}/sub-agent"],
        "grandchild": [f"{AGENT}/sub-sub-agent"],
    }, f"{ran}\n{agent.log.read_text()[-4000:]}"


def test_explain_shows_an_allowed_and_a_refused_process(agent: RunningAgent, entries: list[str],
                                                         tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(SLEEPER)
    entries.append(create(agent, f"{AGENT}/worker", "unix:uid:0", "interpreter:name:python",
                          f"script:sha256:{sha256(script)}"))
    allowed = subprocess.Popen([sys.executable, str(script)])
    refused = subprocess.Popen([sys.executable, "-c", SLEEPER])
    try:
        answers = {}
        for name, process in (("allowed", allowed), ("refused", refused)):
            done = subprocess.run([*VOUCHD, "explain", "--pid", str(process.pid), "--json", "--admin-socket",
                                   str(agent.admin_socket)], capture_output=True, text=True, timeout=DEADLINE,
                                  check=False)
            assert done.returncode == 0, done.stderr
            answers[name] = json.loads(done.stdout)
        text = subprocess.run([*VOUCHD, "explain", "--pid", str(refused.pid), "--admin-socket",
                               str(agent.admin_socket)], capture_output=True, text=True, timeout=DEADLINE, check=True)
    finally:
        for process in (allowed, refused):
            process.kill()
            process.wait(timeout=DEADLINE)

    good, bad = answers["allowed"], answers["refused"]
    assert good["outcome"] == "allowed" and good["spiffe_ids"] == [f"{AGENT}/worker"]
    assert f"script:path:{script.resolve()}" in good["selectors"]
    assert {run["name"] for run in good["attestors"]} == {"unix", "interpreter", "systemd", "container", "lineage"}
    first = good["entries"][0]
    assert (first["id"], first["spiffe_id"], first["matched"], first["missing"]) == (entries[-1], f"{AGENT}/worker",
                                                                                     True, [])
    assert first["policy"]["allowed"] and first["policy"]["policy_ids"] == ["vouchd.permit-trusted-node"]
    assert bad["outcome"] == "refused"
    assert bad["reason"] == "no registration entry matches the caller's selectors"
    assert bad["entries"][0]["missing"] == [f"script:sha256:{sha256(script)}"]
    assert not any(s.startswith("script:") for s in bad["selectors"])
    assert "REFUSED: no registration entry matches" in text.stdout
    assert f"lacks script:sha256:{sha256(script)}" in text.stdout
    assert os.getpid() not in (good["pid"], bad["pid"])
