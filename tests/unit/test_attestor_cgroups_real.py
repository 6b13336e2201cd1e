"""The `systemd` and `container` attestors against real processes in real cgroups.

The tests make cgroups of their own (`system.slice/vouchd-test-<random>.service`,
`system.slice/docker-<random>.scope`) in every hierarchy systemd's units can be in (its v1
`name=systemd` one, the unified one), move a child of their own there, and remove both afterwards.
They touch no other process or cgroup, and skip, saying why, where the host does not let them
(not root, read-only cgroup file systems, no cgroup namespaces, systemd not running).
"""

from __future__ import annotations

import asyncio
import errno
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import described
from vouchd.attestors.base import Evidence
from vouchd.attestors.workload.cgroups import (
    NAMED_SYSTEMD,
    UNIFIED,
    parse_cgroup_file,
    read_cgroup_mounts,
    read_process_cgroups,
)
from vouchd.attestors.workload.container import ContainerAttestor
from vouchd.attestors.workload.systemd import SystemdAttestor
from vouchd.selectors import Selector

WAIT = 10.0  # seconds: every wait on a child or a cgroup is bounded by this


def selector_strings(items: object) -> set[str]:
    assert isinstance(items, list | tuple)
    return {str(item) for item in items if isinstance(item, Selector)}


def evidence_of(items: object) -> list[Evidence]:
    assert isinstance(items, list | tuple)
    return [item for item in items if isinstance(item, Evidence)]


def systemd_hierarchies() -> dict[str, Path]:
    """The hierarchies systemd's units can be in that this host has, and where the whole tree is mounted."""
    ours = read_process_cgroups(os.getpid())
    present = {cgroup.hierarchy for cgroup in (ours.named_systemd, ours.unified) if cgroup is not None}
    found: dict[str, Path] = {}
    for mount in read_cgroup_mounts():
        if mount.hierarchy in present and mount.root == "/" and mount.hierarchy not in found:
            found[mount.hierarchy] = Path(mount.mount_point)
    return found


class CgroupSandbox:
    """Cgroups made by one test, in each of the given hierarchies; `remove` takes away exactly those."""

    def __init__(self, hierarchies: dict[str, Path]) -> None:
        self.hierarchies = hierarchies
        self.created: list[Path] = []  # in the order made: parents first

    def make(self, relative: str) -> dict[str, Path]:
        """The cgroup `relative` (e.g. `system.slice/x.service`) in every hierarchy, made where missing."""
        leaves = {}
        for hierarchy, mount_point in self.hierarchies.items():
            directory = mount_point
            for name in relative.split("/"):
                directory = directory / name
                try:
                    directory.mkdir()
                except FileExistsError:
                    continue
                except OSError as err:
                    pytest.skip(f"cannot make cgroup {directory}: {err.strerror}")
                self.created.append(directory)
            leaves[hierarchy] = directory
        return leaves

    def move(self, pid: int, relative: str) -> None:
        """Put our own child `pid` into cgroup `relative` of every hierarchy."""
        for mount_point in self.hierarchies.values():
            try:
                (mount_point / relative / "cgroup.procs").write_text(f"{pid}\n")
            except OSError as err:
                pytest.skip(f"cannot move a process into {mount_point / relative}: {err.strerror}")

    def remove(self) -> None:
        """rmdir what was made, children first. A cgroup that holds cgroups of someone else's is left alone."""
        problems = []
        for directory in reversed(self.created):
            deadline = time.monotonic() + WAIT
            while True:
                try:
                    directory.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError as err:
                    if any(entry.is_dir() for entry in directory.iterdir()):
                        break  # another test's or program's cgroup inside: not ours to remove
                    # EBUSY: a killed child not yet gone from the cgroup.
                    if err.errno == errno.EBUSY and time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                    problems.append(f"{directory}: {err.strerror}")
                    break
        self.created.clear()
        if problems:
            raise AssertionError(f"could not remove test cgroups: {'; '.join(problems)}")


@pytest.fixture
def sandbox() -> Iterator[CgroupSandbox]:
    if os.geteuid() != 0:
        pytest.skip("moving processes between cgroups needs root")
    hierarchies = systemd_hierarchies()
    if not hierarchies:
        pytest.skip("this host mounts neither a cgroup v2 nor a name=systemd hierarchy")
    unwritable = [str(path) for path in hierarchies.values() if not os.access(path, os.W_OK)]
    if unwritable:
        pytest.skip(f"cgroup file systems are not writable here: {', '.join(unwritable)}")
    made = CgroupSandbox(hierarchies)
    try:
        yield made
    finally:
        made.remove()


@pytest.fixture
def children() -> Iterator[list[subprocess.Popen[bytes]]]:
    """Children a test starts; each is killed (by its own pid) and reaped at the end."""
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for child in started:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=WAIT)
        if child.stdin is not None:
            child.stdin.close()


def start_sleep(children: list[subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
    child = subprocess.Popen(["sleep", "60"])
    children.append(child)
    return child


def set_invocation_ids(leaves: dict[str, Path], values: dict[str, str]) -> bool:
    """Mark each cgroup with an InvocationID as systemd does; False when a file system does not take it."""
    try:
        for hierarchy, directory in leaves.items():
            os.setxattr(directory, "trusted.invocation_id", values[hierarchy].encode())
    except OSError:
        return False
    return True


async def test_real_process_in_a_service_cgroup(
    sandbox: CgroupSandbox, children: list[subprocess.Popen[bytes]]
) -> None:
    unit = f"vouchd-test-{secrets.token_hex(4)}.service"
    leaves = sandbox.make(f"system.slice/{unit}")
    invocation_ids = {hierarchy: secrets.token_hex(16) for hierarchy in leaves}
    marked = set_invocation_ids(leaves, invocation_ids)
    child = start_sleep(children)
    sandbox.move(child.pid, f"system.slice/{unit}")

    result = await attest(SystemdAttestor(), child)

    assert selector_strings(result) == {f"systemd:unit:{unit}", "systemd:slice:system.slice"}
    if marked:
        # From the hierarchy the unit was found in: systemd's own v1 one where there is one.
        source = NAMED_SYSTEMD if NAMED_SYSTEMD in leaves else UNIFIED
        assert evidence_of(result) == [Evidence("systemd", "invocation_id", invocation_ids[source])]
    assert selector_strings(await attest(ContainerAttestor(), child)) == set()


async def test_real_process_in_a_docker_scope(
    sandbox: CgroupSandbox, children: list[subprocess.Popen[bytes]]
) -> None:
    container_id = secrets.token_hex(32)
    scope = f"system.slice/docker-{container_id}.scope"
    sandbox.make(scope)
    child = start_sleep(children)
    sandbox.move(child.pid, scope)

    containers = await attest(ContainerAttestor(), child)
    units = await attest(SystemdAttestor(invocation_id=False), child)

    assert selector_strings(containers) == {f"container:id:{container_id}", "container:runtime:docker"}
    assert selector_strings(units) == {f"systemd:unit:docker-{container_id}.scope", "systemd:slice:system.slice"}


async def test_real_process_naming_a_cgroup_after_another_container(
    sandbox: CgroupSandbox, children: list[subprocess.Popen[bytes]]
) -> None:
    # What a process with a writable cgroup tree in container A can do: it stays container A.
    outer, inner = secrets.token_hex(32), secrets.token_hex(32)
    nested = f"system.slice/docker-{outer}.scope/docker-{inner}.scope"
    sandbox.make(nested)
    child = start_sleep(children)
    sandbox.move(child.pid, nested)

    containers = await attest(ContainerAttestor(), child)
    units = await attest(SystemdAttestor(invocation_id=False), child)

    assert selector_strings(containers) == {f"container:id:{outer}", "container:runtime:docker"}
    assert f"systemd:unit:docker-{outer}.scope" in selector_strings(units)


async def test_real_process_in_its_own_cgroup_namespace(
    sandbox: CgroupSandbox, children: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    if shutil.which("unshare") is None:
        pytest.skip("unshare (util-linux) is not installed")
    if not os.path.exists("/proc/self/ns/cgroup"):
        pytest.skip("this kernel has no cgroup namespaces")
    container_id = secrets.token_hex(32)
    scope = f"system.slice/docker-{container_id}.scope"
    sandbox.make(scope)
    own_view = tmp_path / "own-view"
    # Waits for a line on stdin (the test moves it meanwhile), then enters a new cgroup namespace rooted
    # at its cgroup, writes what it sees of itself, and sleeps: the same pid throughout (exec, no fork).
    script = ('read line && exec unshare --cgroup sh -c '
              '\'cat /proc/self/cgroup > "$0.tmp" && mv "$0.tmp" "$0" && exec sleep 60\' "$0"')
    child = subprocess.Popen(["sh", "-c", script, str(own_view)], stdin=subprocess.PIPE)
    children.append(child)
    sandbox.move(child.pid, scope)
    assert child.stdin is not None
    child.stdin.write(b"go\n")
    child.stdin.flush()
    deadline = time.monotonic() + WAIT
    while not own_view.exists():
        if child.poll() is not None:
            pytest.skip(f"unshare --cgroup failed here (status {child.returncode})")
        assert time.monotonic() < deadline, "the child never wrote its view of its cgroups"
        await asyncio.sleep(0.02)

    seen_inside = parse_cgroup_file(own_view.read_text())
    containers = await attest(ContainerAttestor(), child)
    units = await attest(SystemdAttestor(invocation_id=False), child)

    # Inside its namespace the process is at the root of every hierarchy it was moved in...
    for cgroup in (seen_inside.named_systemd, seen_inside.unified):
        if cgroup is not None and cgroup.hierarchy in sandbox.hierarchies:
            assert cgroup.path == "/"
    # ...but read from the host's namespace, it is where the host put it.
    assert selector_strings(containers) == {f"container:id:{container_id}", "container:runtime:docker"}
    assert selector_strings(units) == {f"systemd:unit:docker-{container_id}.scope", "systemd:slice:system.slice"}


async def test_real_rootless_container_is_never_a_container_id(
    sandbox: CgroupSandbox, children: list[subprocess.Popen[bytes]]
) -> None:
    if any((mount_point / "user.slice").exists() for mount_point in sandbox.hierarchies.values()):
        pytest.skip("user.slice belongs to a running systemd here: not making user managers inside it")
    container_id = secrets.token_hex(32)
    uid = 4242420  # no such user: nothing of a real user's is touched
    nested = f"user.slice/user-{uid}.slice/user@{uid}.service/user.slice/libpod-{container_id}.scope"
    sandbox.make(nested)
    child = start_sleep(children)
    sandbox.move(child.pid, nested)

    containers = await attest(ContainerAttestor(), child)
    units = await attest(SystemdAttestor(invocation_id=False), child)

    assert selector_strings(containers) == {f"container:rootless_id:{container_id}", "container:runtime:podman"}
    assert selector_strings(units) == {
        f"systemd:unit:user@{uid}.service", f"systemd:slice:user-{uid}.slice",
        f"systemd:user_unit:libpod-{container_id}.scope", "systemd:user_slice:user.slice",
    }


async def test_real_systemd_scope(children: list[subprocess.Popen[bytes]]) -> None:
    try:
        init = Path("/proc/1/comm").read_text().strip()
    except OSError:
        init = "?"
    if init != "systemd":
        pytest.skip(f"systemd is not PID 1 here (PID 1 is {init!r})")
    if shutil.which("systemd-run") is None or os.geteuid() != 0:
        pytest.skip("needs systemd-run, as root")
    unit = f"vouchd-test-{secrets.token_hex(4)}"
    child = subprocess.Popen(["systemd-run", "--quiet", "--scope", f"--unit={unit}", "--", "sleep", "30"])
    children.append(child)
    try:
        # systemd-run puts itself into the new scope, then becomes `sleep` (same pid).
        deadline = time.monotonic() + WAIT
        while True:
            if child.poll() is not None:
                pytest.skip(f"systemd-run --scope failed here (status {child.returncode})")
            if Path(f"/proc/{child.pid}/comm").read_text().strip() == "sleep":
                break
            assert time.monotonic() < deadline, "systemd-run never started sleep"
            await asyncio.sleep(0.02)

        result = await attest(SystemdAttestor(), child)

        units = {s for s in selector_strings(result) if s.startswith("systemd:unit:")}
        assert units == {f"systemd:unit:{unit}.scope"}
        shown = subprocess.run(["systemctl", "show", "--property=InvocationID", "--value", f"{unit}.scope"],
                               capture_output=True, text=True, timeout=WAIT, check=False).stdout.strip()
        if shown and evidence_of(result):
            assert evidence_of(result) == [Evidence("systemd", "invocation_id", shown)]
    finally:
        if child.poll() is None:
            child.kill()
        child.wait(timeout=WAIT)
        subprocess.run(["systemctl", "reset-failed", f"{unit}.scope"], capture_output=True, timeout=WAIT, check=False)


async def attest(attestor: SystemdAttestor | ContainerAttestor, child: subprocess.Popen[bytes]) -> object:
    return await attestor.attest(described(child))
