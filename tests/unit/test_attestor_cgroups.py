"""The `systemd` and `container` attestors and the /proc/<pid>/cgroup parsing under them.

Every layout is a file in tests/fixtures/cgroup (what /proc/<pid>/cgroup shows on such a host),
attested through a fake /proc. The security rules have tests of their own, each of which fails when
its rule is broken (innermost instead of outermost, a user's subtree taken as the host's, `..`).
"""

from __future__ import annotations

import errno
import os
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vouchd.attestors import AttestorError, ProcessExitedError, ProcessInfoError, WorkloadProcess
from vouchd.attestors.base import Evidence
from vouchd.attestors.workload import container as container_module
from vouchd.attestors.workload import systemd as systemd_module
from vouchd.attestors.workload.cgroups import (
    MAX_CGROUP_FILE_BYTES,
    NAMED_SYSTEMD,
    UNIFIED,
    CgroupMount,
    CgroupPath,
    cgroup_directory,
    parse_cgroup_file,
    parse_cgroup_mounts,
    path_components,
    read_process_cgroups,
)
from vouchd.attestors.workload.container import ContainerAttestor, locate_container
from vouchd.attestors.workload.systemd import (
    SystemdAttestor,
    is_slice_name,
    is_unit_name,
    locate_unit,
    parse_invocation_id,
    user_manager_uid,
)
from vouchd.errors import ConfigError
from vouchd.selectors import Selector, SelectorSchema

FIXTURES = Path(__file__).parent.parent / "fixtures" / "cgroup"
PID = 4242

# The ids in the fixture files.
DOCKER = "d548c5b83fa61d8e3bd86ad42a7ffea9b7c86e3f9d8095c1577d3e1270bb9420"
CONTAINERD = "2397d068a8d1552a4c3f9147ba9c94e086bfd66fb2acb5bbaf47197105127d5f"
CRIO = "c64064614423cb790e88b3e5492ff5ccf673b25ae823089f7a60c65cda24d809"
PODMAN = "2f259bab93aaaaa2542ba43ef33eb990d0999ee1b9924b557b7be53c0b7a1bb9"
NERDCTL = "aa470170773aae4a69e6e0a509eb8c1f304140b1fea1a2d55ec93a07a78e497c"
ROOTLESS = "12b961af5feb3e9d39f93b2cefb9a1a944f18d02cca0cac2f04f5a982240605f"
POD = "8f1c5e2a-3b4d-4e6f-9a0b-1c2d3e4f5a6b"
POD_ = POD.replace("-", "_")
STATIC_POD = "3d5e0b7c9a1f4e2b8c6d0a9f7e5b3c1d"
A = "a" * 64
B = "b" * 64

_NGINX = {"systemd:unit:nginx.service", "systemd:slice:system.slice"}
_DOCKER_SCOPE = {f"systemd:unit:docker-{DOCKER}.scope", "systemd:slice:system.slice"}
_DOCKER = {f"container:id:{DOCKER}", "container:runtime:docker"}
_PODMAN = {f"container:id:{PODMAN}", "container:runtime:podman"}
_NERDCTL = {f"container:id:{NERDCTL}", "container:runtime:containerd"}
_CONTAINERD_POD = {f"container:id:{CONTAINERD}", "container:runtime:containerd", f"k8s:pod_uid:{POD}",
                   "k8s:qos:burstable"}
_CONTAINERD_UNIT = {f"systemd:unit:cri-containerd-{CONTAINERD}.scope",
                    f"systemd:slice:kubepods-burstable-pod{POD_}.slice"}
_CRIO_POD = {f"container:id:{CRIO}", "container:runtime:cri-o", f"k8s:pod_uid:{POD}", "k8s:qos:besteffort"}
_CRIO_UNIT = {f"systemd:unit:crio-{CRIO}.scope", f"systemd:slice:kubepods-besteffort-pod{POD_}.slice"}
_USER_1000 = {"systemd:unit:user@1000.service", "systemd:slice:user-1000.slice"}

# fixture -> (systemd selectors, container selectors)
EXPECTED: dict[str, tuple[set[str], set[str]]] = {
    "v2-service": (_NGINX, set()),
    "v1-service": (_NGINX, set()),
    "hybrid-service": (_NGINX, set()),
    "v2-template-instance": ({"systemd:unit:getty@tty1.service", "systemd:slice:system-getty.slice"}, set()),
    "v2-escaped-instance": (
        {"systemd:unit:systemd-fsck@dev-disk-by\\x2duuid-0b1f1e2c\\x2d8c1f\\x2d4a3b\\x2d9d2e\\x2d7f6a5b4c3d2e.service",
         "systemd:slice:system-systemd\\x2dfsck.slice"},
        set(),
    ),
    "v2-transient-scope": ({"systemd:unit:run-r0d3c5b2a1f8e4c7b9a6d5e4f3c2b1a0.scope", "systemd:slice:system.slice"},
                           set()),
    "v2-init-scope": ({"systemd:unit:init.scope", "systemd:slice:-.slice"}, set()),
    "v2-root": (set(), set()),
    "v2-session": ({"systemd:unit:session-3.scope", "systemd:slice:user-1000.slice"}, set()),
    "hybrid-session": ({"systemd:unit:session-3.scope", "systemd:slice:user-1000.slice"}, set()),
    "v2-user-manager": (_USER_1000 | {"systemd:user_unit:init.scope", "systemd:user_slice:-.slice"}, set()),
    "v2-user-app": (
        _USER_1000 | {"systemd:user_unit:vte-spawn-3e5ab5f2-9d5e-4f0a-8c5b-7e1c2d3f4a5b.scope",
                      "systemd:user_slice:app-org.gnome.Terminal.slice"},
        set(),
    ),
    "hybrid-user-app": (_USER_1000 | {"systemd:user_unit:syncthing.service", "systemd:user_slice:app.slice"}, set()),
    "docker-cgroupfs-v1": (set(), _DOCKER),
    "docker-cgroupfs-v1-openrc": (set(), _DOCKER),
    "docker-cgroupfs-v2": (set(), _DOCKER),
    "docker-systemd-v1": (_DOCKER_SCOPE, _DOCKER),
    "docker-systemd-hybrid": (_DOCKER_SCOPE, _DOCKER),
    "docker-systemd-v2": (_DOCKER_SCOPE, _DOCKER),
    "docker-systemd-inside-v1": (_DOCKER_SCOPE, _DOCKER),
    "docker-systemd-inside-v2": (_DOCKER_SCOPE, _DOCKER),
    "k8s-containerd-cgroupfs-v1": (set(), {f"container:id:{CONTAINERD}", f"k8s:pod_uid:{POD}", "k8s:qos:burstable"}),
    "k8s-containerd-cgroupfs-v2": (set(), {f"container:id:{CONTAINERD}", f"k8s:pod_uid:{POD}", "k8s:qos:besteffort"}),
    "k8s-containerd-cgroupfs-guaranteed-v2": (set(), {f"container:id:{CONTAINERD}", f"k8s:pod_uid:{POD}",
                                                      "k8s:qos:guaranteed"}),
    "k8s-containerd-systemd-v1": (_CONTAINERD_UNIT, _CONTAINERD_POD),
    "k8s-containerd-systemd-v2": (_CONTAINERD_UNIT, _CONTAINERD_POD),
    "k8s-containerd-systemd-guaranteed-v2": (
        {f"systemd:unit:cri-containerd-{CONTAINERD}.scope", f"systemd:slice:kubepods-pod{POD_}.slice"},
        {f"container:id:{CONTAINERD}", "container:runtime:containerd", f"k8s:pod_uid:{POD}", "k8s:qos:guaranteed"},
    ),
    "k8s-containerd-systemd-static-pod-v2": (
        {f"systemd:unit:cri-containerd-{CONTAINERD}.scope", f"systemd:slice:kubepods-burstable-pod{STATIC_POD}.slice"},
        {f"container:id:{CONTAINERD}", "container:runtime:containerd", f"k8s:pod_uid:{STATIC_POD}",
         "k8s:qos:burstable"},
    ),
    "k8s-crio-systemd-v1": (_CRIO_UNIT, _CRIO_POD),
    "k8s-crio-systemd-v2": (_CRIO_UNIT, _CRIO_POD),
    "k8s-crio-conmon-v2": (
        {f"systemd:unit:crio-conmon-{CRIO}.scope", f"systemd:slice:kubepods-besteffort-pod{POD_}.slice"},
        set(),
    ),
    "k8s-crio-cgroupfs-v1": (set(), {f"container:id:{CRIO}", "container:runtime:cri-o", f"k8s:pod_uid:{POD}",
                                     "k8s:qos:burstable"}),
    "podman-systemd-v2": ({f"systemd:unit:libpod-{PODMAN}.scope", "systemd:slice:machine.slice"}, _PODMAN),
    "podman-systemd-hybrid": ({f"systemd:unit:libpod-{PODMAN}.scope", "systemd:slice:machine.slice"}, _PODMAN),
    "podman-conmon-v2": ({f"systemd:unit:libpod-conmon-{PODMAN}.scope", "systemd:slice:machine.slice"}, set()),
    "podman-cgroupfs-v1": (set(), _PODMAN),
    "podman-cgroupfs-v2": (set(), _PODMAN),
    "podman-rootless-v2": (
        _USER_1000 | {f"systemd:user_unit:libpod-{ROOTLESS}.scope", "systemd:user_slice:user.slice"},
        {f"container:rootless_id:{ROOTLESS}", "container:runtime:podman"},
    ),
    "podman-rootless-hybrid": (
        _USER_1000 | {f"systemd:user_unit:libpod-{ROOTLESS}.scope", "systemd:user_slice:user.slice"},
        {f"container:rootless_id:{ROOTLESS}", "container:runtime:podman"},
    ),
    "nerdctl-v2": ({f"systemd:unit:nerdctl-{NERDCTL}.scope", "systemd:slice:system.slice"}, _NERDCTL),
    "nerdctl-hybrid": ({f"systemd:unit:nerdctl-{NERDCTL}.scope", "systemd:slice:system.slice"}, _NERDCTL),
}

SCHEMA = SelectorSchema({"systemd": systemd_module.SELECTOR_KINDS, "container": container_module.SELECTOR_KINDS},
                        described_as="a selector these attestors produce")


def process(pid: int = PID) -> WorkloadProcess:
    return WorkloadProcess(pid=pid, uid=0, gid=0, start_time=1)


def fake_proc(root: Path, cgroup: str | bytes, *, pid: int = PID) -> Path:
    """A /proc with one process whose cgroup file holds `cgroup`."""
    (root / str(pid)).mkdir(parents=True, exist_ok=True)
    (root / str(pid) / "cgroup").write_bytes(cgroup.encode() if isinstance(cgroup, str) else cgroup)
    return root


def selector_strings(items: Sequence[Selector | Evidence]) -> set[str]:
    return {str(item) for item in items if isinstance(item, Selector)}


def evidence_of(items: Sequence[Selector | Evidence]) -> list[Evidence]:
    return [item for item in items if isinstance(item, Evidence)]


async def systemd_selectors(tmp_path: Path, cgroup: str) -> set[str]:
    attestor = SystemdAttestor(proc_root=fake_proc(tmp_path / "proc", cgroup), invocation_id=False)
    return selector_strings(await attestor.attest(process()))


async def container_selectors(tmp_path: Path, cgroup: str) -> set[str]:
    attestor = ContainerAttestor(proc_root=fake_proc(tmp_path / "proc", cgroup))
    return selector_strings(await attestor.attest(process()))


# -- every layout --------------------------------------------------------------------------------


def test_every_fixture_has_an_expectation() -> None:
    assert sorted(p.stem for p in FIXTURES.glob("*.cgroup")) == sorted(EXPECTED)


@pytest.mark.parametrize("layout", sorted(EXPECTED))
async def test_layout(layout: str, tmp_path: Path) -> None:
    text = (FIXTURES / f"{layout}.cgroup").read_text()
    expected_systemd, expected_container = EXPECTED[layout]

    got_systemd = await systemd_selectors(tmp_path, text)
    got_container = await container_selectors(tmp_path, text)

    assert got_systemd == expected_systemd
    assert got_container == expected_container
    for selector in got_systemd | got_container:
        assert SCHEMA.problem(Selector.parse(selector)) is None, selector


# -- parsing /proc/<pid>/cgroup -----------------------------------------------------------------


def test_parse_hybrid_file_keeps_every_hierarchy() -> None:
    cgroups = parse_cgroup_file((FIXTURES / "hybrid-user-app.cgroup").read_text())

    assert cgroups.named_systemd == CgroupPath(NAMED_SYSTEMD, "/user.slice/user-1000.slice/user@1000.service/"
                                                              "app.slice/syncthing.service")
    assert cgroups.unified is not None
    assert cgroups.unified.hierarchy == UNIFIED
    assert cgroups.systemd_path == cgroups.named_systemd
    assert CgroupPath("cpu,cpuacct", "/user.slice/user-1000.slice/user@1000.service") in cgroups.controller_paths
    assert CgroupPath("net_cls,net_prio", "/") in cgroups.controller_paths
    assert all(path.hierarchy not in (UNIFIED, NAMED_SYSTEMD) for path in cgroups.controller_paths)
    assert len(cgroups.lines) == 14


def test_systemd_path_prefers_name_systemd_over_unified() -> None:
    cgroups = parse_cgroup_file("1:name=systemd:/system.slice/a.service\n0::/system.slice/b.service\n")

    assert cgroups.systemd_path == CgroupPath(NAMED_SYSTEMD, "/system.slice/a.service")


def test_systemd_path_ignores_a_name_systemd_hierarchy_at_the_root() -> None:
    # A v2 host where something mounted a name=systemd hierarchy for old containers: every process is at its root.
    cgroups = parse_cgroup_file("1:name=systemd:/\n0::/system.slice/b.service\n")

    assert cgroups.systemd_path == CgroupPath(UNIFIED, "/system.slice/b.service")
    assert parse_cgroup_file("1:name=systemd:/\n").systemd_path == CgroupPath(NAMED_SYSTEMD, "/")
    assert parse_cgroup_file("4:memory:/x\n").systemd_path is None


def test_path_may_hold_colons_and_carriage_returns() -> None:
    # Only "\n" ends a line: the kernel refuses it in cgroup names, but not ":" or "\r".
    cgroups = parse_cgroup_file("0::/a:b/c\rd\x85e\n")

    assert cgroups.unified == CgroupPath(UNIFIED, "/a:b/c\rd\x85e")
    assert path_components("/a:b/c\rd\x85e") == ("a:b", "c\rd\x85e")
    assert path_components("/") == ()


def test_file_without_final_newline_is_read() -> None:
    assert parse_cgroup_file("0::/x").unified == CgroupPath(UNIFIED, "/x")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("", "empty"),
        ("0::/\n\n", "line 2 ''"),
        ("0:/\n", "ID:CONTROLLERS:PATH"),
        ("x::/\n", "not a decimal"),
        ("-1:cpu:/\n", "not a decimal"),
        ("00::/\n", "not a decimal"),
        ("0:cpu:/\n", "lists controllers"),
        ("3::/\n", "without a valid controller"),
        ("3:cpu,:/\n", "without a valid controller"),
        ("3:c pu:/\n", "without a valid controller"),
        ("0::system.slice\n", "not absolute"),
        ("0::\n", "not absolute"),
        ("0::/a//b\n", "not normalised"),
        ("0::/a/\n", "not normalised"),
        ("0::/a/./b\n", "not normalised"),
        ("0::/../../system.slice/nginx.service\n", "outside the agent's cgroup namespace"),
        ("0::/\n0::/x\n", "listed twice"),
        ("1:name=systemd:/\n2:name=systemd:/\n", "listed twice"),
        ("1:cpu:/\n1:memory:/\n", "listed twice"),
    ],
)
def test_malformed_files_are_refused_naming_the_line(text: str, problem: str) -> None:
    with pytest.raises(ProcessInfoError, match=problem) as caught:
        parse_cgroup_file(text)
    if text:
        assert "line" in str(caught.value)


def test_long_malformed_line_is_shortened_in_the_message() -> None:
    with pytest.raises(ProcessInfoError) as caught:
        parse_cgroup_file("0::relative/" + "x" * 5000 + "\n")

    assert len(str(caught.value)) < 300


def test_read_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(ProcessInfoError, match=rf"{tmp_path}/{PID}/cgroup: malformed /proc cgroup line 1"):
        read_process_cgroups(PID, proc_root=fake_proc(tmp_path, "0:x:/\n"))


def test_read_is_bounded(tmp_path: Path) -> None:
    fits = "0::/" + "a" * (MAX_CGROUP_FILE_BYTES - 5) + "\n"
    assert len(fits) == MAX_CGROUP_FILE_BYTES
    assert read_process_cgroups(PID, proc_root=fake_proc(tmp_path, fits)).unified is not None

    with pytest.raises(ProcessInfoError, match="larger than 65536 bytes"):
        read_process_cgroups(PID, proc_root=fake_proc(tmp_path, fits + "1:cpu:/\n"))


def test_names_that_are_not_utf8_are_read(tmp_path: Path) -> None:
    cgroups = read_process_cgroups(PID, proc_root=fake_proc(tmp_path, b"0::/system.slice/\xff.service\n"))

    assert cgroups.unified == CgroupPath(UNIFIED, "/system.slice/\ufffd.service")


def test_vanished_process_is_process_exited(tmp_path: Path) -> None:
    tmp_path.joinpath("proc").mkdir()
    with pytest.raises(ProcessExitedError, match="process 4242 has exited"):
        read_process_cgroups(PID, proc_root=tmp_path / "proc")


def test_process_without_cgroup_file_is_not_taken_for_gone(tmp_path: Path) -> None:
    (tmp_path / str(PID)).mkdir()

    with pytest.raises(ProcessInfoError, match="no cgroups") as caught:
        read_process_cgroups(PID, proc_root=tmp_path)
    assert not isinstance(caught.value, ProcessExitedError)


def test_invalid_pid_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ProcessInfoError, match="invalid pid 0"):
        read_process_cgroups(0, proc_root=tmp_path)


def test_real_process_of_this_host_is_parsed() -> None:
    cgroups = read_process_cgroups(os.getpid())

    assert cgroups.lines
    assert all(line.path.startswith("/") for line in cgroups.lines)


# -- mounts and directories ----------------------------------------------------------------------

MOUNTINFO = """\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
31 23 0:28 / /sys/fs/cgroup ro,nosuid,nodev,noexec shared:9 - tmpfs tmpfs ro,mode=755
32 31 0:29 / /sys/fs/cgroup/unified rw,nosuid,nodev,noexec,relatime shared:10 - cgroup2 cgroup2 rw,nsdelegate
33 31 0:30 / /sys/fs/cgroup/systemd rw,nosuid,nodev,noexec,relatime shared:11 - cgroup cgroup rw,xattr,name=systemd
34 31 0:31 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:15 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,nosuid - cgroup cgroup rw,memory,release_agent=/x
36 40 0:30 /system.slice/docker-abc.scope /var/lib/my\\040mount rw - cgroup cgroup rw,xattr,name=systemd
"""


def test_parse_cgroup_mounts_finds_each_hierarchy() -> None:
    mounts = parse_cgroup_mounts(MOUNTINFO)

    assert mounts == (
        CgroupMount(UNIFIED, "/", "/sys/fs/cgroup/unified"),
        CgroupMount(NAMED_SYSTEMD, "/", "/sys/fs/cgroup/systemd"),
        CgroupMount("cpu,cpuacct", "/", "/sys/fs/cgroup/cpu,cpuacct"),
        CgroupMount("memory", "/", "/sys/fs/cgroup/memory"),
        CgroupMount(NAMED_SYSTEMD, "/system.slice/docker-abc.scope", "/var/lib/my mount"),
    )


def test_cgroup_directory_maps_paths_through_the_mount_of_their_hierarchy() -> None:
    mounts = parse_cgroup_mounts(MOUNTINFO)

    assert cgroup_directory(mounts, CgroupPath(NAMED_SYSTEMD, "/system.slice/a.service")) == \
        "/sys/fs/cgroup/systemd/system.slice/a.service"
    assert cgroup_directory(mounts, CgroupPath(UNIFIED, "/system.slice/a.service")) == \
        "/sys/fs/cgroup/unified/system.slice/a.service"
    assert cgroup_directory(mounts, CgroupPath(UNIFIED, "/")) == "/sys/fs/cgroup/unified"
    assert cgroup_directory(mounts, CgroupPath("pids", "/x")) is None


def test_cgroup_directory_uses_a_subtree_mount_only_for_paths_below_its_root() -> None:
    subtree_only = (CgroupMount(NAMED_SYSTEMD, "/system.slice/docker-abc.scope", "/mnt/c"),)

    assert cgroup_directory(subtree_only, CgroupPath(NAMED_SYSTEMD, "/system.slice/docker-abc.scope/init.scope")) == \
        "/mnt/c/init.scope"
    assert cgroup_directory(subtree_only, CgroupPath(NAMED_SYSTEMD, "/system.slice/docker-abc.scope")) == "/mnt/c"
    assert cgroup_directory(subtree_only, CgroupPath(NAMED_SYSTEMD, "/system.slice/docker-abcd.scope")) is None
    assert cgroup_directory(subtree_only, CgroupPath(NAMED_SYSTEMD, "/system.slice/x.service")) is None


# -- systemd's names ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    ["nginx.service", "session-3.scope", "user@1000.service", "getty@tty1.service", "init.scope", "dev-sda1.device",
     "-.mount", "home.automount", "sshd.socket", "a.b.c.service", "foo@a@b.service", "systemd-fsck@dev\\x2dx.service",
     "x:y.timer", "x" * 247 + ".service"],
)
def test_valid_unit_names(name: str) -> None:
    assert is_unit_name(name)


@pytest.mark.parametrize(
    "name",
    ["getty@.service", "@x.service", "nginx", "nginx.exe", ".service", "system.slice", "a b.service", "a/b.service",
     "x" * 248 + ".service", "nginx.service ", "nginx.service (deleted)", "ünicode.service", "a.Service", ""],
)
def test_invalid_unit_names(name: str) -> None:
    assert not is_unit_name(name)


def test_slice_names() -> None:
    assert is_slice_name("system.slice")
    assert is_slice_name("-.slice")
    assert is_slice_name("user-1000.slice")
    assert is_unit_name("system.slice", slice_ok=True)
    assert not is_slice_name("a@b.slice")  # slices have no instances
    assert not is_slice_name("nginx.service")


def test_locate_unit_follows_systemd() -> None:
    placement = locate_unit(path_components("/system.slice/system-getty.slice/getty@tty1.service/x/y"))
    assert placement is not None
    assert (placement.unit, placement.slice, placement.unit_path, placement.below) == (
        "getty@tty1.service", "system-getty.slice", "/system.slice/system-getty.slice/getty@tty1.service", ("x", "y"))
    # `_` escapes names the kernel might claim (cg_escape): cpu.service lives in _cpu.service.
    escaped = locate_unit(path_components("/system.slice/_cpu.service"))
    assert escaped is not None
    assert (escaped.unit, escaped.unit_path) == ("cpu.service", "/system.slice/_cpu.service")
    assert locate_unit(path_components("/system.slice")) is None  # in a slice, in no unit
    assert locate_unit(path_components("/")) is None
    assert locate_unit(path_components("/system.slice/a@b.slice/x.service")) is None  # an instance slice is no unit
    assert locate_unit(path_components("/docker/x.service")) is None  # never past a name that is no unit


def test_user_manager_uid() -> None:
    assert user_manager_uid("user@1000.service") == 1000
    assert user_manager_uid("user@0.service") == 0
    for not_a_manager in ("user@.service", "user@01.service", "user@x.service", "user@65535.service",
                          "user@4294967295.service", "user-runtime-dir@1000.service", "user@1000.scope"):
        assert user_manager_uid(not_a_manager) is None, not_a_manager


def test_parse_invocation_id() -> None:
    assert parse_invocation_id(b"0123456789abcdef0123456789ABCDEF") == "0123456789abcdef0123456789abcdef"
    assert parse_invocation_id(bytes(range(1, 17))) == "0102030405060708090a0b0c0d0e0f10"
    assert parse_invocation_id(b"0" * 32) is None
    assert parse_invocation_id(bytes(16)) is None
    assert parse_invocation_id(b"0123456789abcdef0123456789abcdeg") is None
    assert parse_invocation_id(b"0123456789abcdef0123456789abcdef\n") is None
    assert parse_invocation_id(b"") is None


# -- systemd attestor: security -------------------------------------------------------------------


async def test_unit_is_the_outermost_never_one_in_a_delegated_subtree(tmp_path: Path) -> None:
    got = await systemd_selectors(tmp_path, f"0::/system.slice/docker-{A}.scope/system.slice/evil.service\n")

    assert got == {f"systemd:unit:docker-{A}.scope", "systemd:slice:system.slice"}


async def test_names_below_a_delegated_service_are_never_units(tmp_path: Path) -> None:
    got = await systemd_selectors(tmp_path, "0::/system.slice/app.service/payload/nginx.service\n")

    assert got == {"systemd:unit:app.service", "systemd:slice:system.slice"}


async def test_user_units_are_never_reported_as_units(tmp_path: Path) -> None:
    cgroup = "0::/user.slice/user-1000.slice/user@1000.service/system.slice/nginx.service/x.service\n"

    got = await systemd_selectors(tmp_path, cgroup)

    assert got == _USER_1000 | {"systemd:user_unit:nginx.service", "systemd:user_slice:system.slice"}


async def test_user_units_come_only_from_directly_below_the_user_manager(tmp_path: Path) -> None:
    # session scopes are not delegated, and a user manager below a unit is that unit's payload.
    below_session = await systemd_selectors(tmp_path, "0::/user.slice/user-1000.slice/session-3.scope/a.service\n")
    below_docker = await systemd_selectors(
        tmp_path, f"0::/system.slice/docker-{A}.scope/user.slice/user@0.service/a.service\n")
    no_unit = await systemd_selectors(tmp_path, "0::/user.slice/user-1000.slice/user@1000.service/app.slice/x\n")

    assert below_session == {"systemd:unit:session-3.scope", "systemd:slice:user-1000.slice"}
    assert below_docker == {f"systemd:unit:docker-{A}.scope", "systemd:slice:system.slice"}
    assert no_unit == _USER_1000


@pytest.mark.parametrize(
    "path", ["/", "/system.slice", "/docker/" + A, "/kubepods/burstable", "/lxc.payload.c1/system.slice/a.service",
             "/system.slice/getty@.service", "/system.slice/nginx.service (deleted)"],
)
async def test_no_unit_no_selectors(path: str, tmp_path: Path) -> None:
    assert await systemd_selectors(tmp_path, f"0::{path}\n") == set()


async def test_systemd_outside_the_agents_namespace_fails(tmp_path: Path) -> None:
    with pytest.raises(AttestorError, match=r"workloadattestor\(systemd\): .*outside the agent's cgroup namespace"):
        await systemd_selectors(tmp_path, "0::/../system.slice/nginx.service\n")


async def test_systemd_vanished_process_fails(tmp_path: Path) -> None:
    tmp_path.joinpath("proc").mkdir()
    attestor = SystemdAttestor(proc_root=tmp_path / "proc")

    with pytest.raises(AttestorError, match=r"workloadattestor\(systemd\): process 4242 has exited"):
        await attestor.attest(process())


@given(below=st.lists(st.sampled_from(["evil.service", "system.slice", f"docker-{B}.scope", "user@0.service",
                                       "init.scope", "x", "_y.service", "kubepods.slice"]), max_size=6))
def test_nothing_below_a_unit_changes_it(below: list[str]) -> None:
    placement = locate_unit(("system.slice", f"docker-{A}.scope", *below))

    assert placement is not None
    assert (placement.unit, placement.slice) == (f"docker-{A}.scope", "system.slice")
    assert locate_container(("system.slice", f"docker-{A}.scope", *below)) == \
        container_module.ContainerPlacement(A, "docker")


# -- systemd attestor: InvocationID ---------------------------------------------------------------

INVOCATION = "6c2f5f1e0a9b4c3d8e7f6a5b4c3d2e1f"
OTHER_INVOCATION = "0f1e2d3c4b5a69788796a5b4c3d2e1f0"


def can_set_xattr(directory: Path, name: str) -> bool:
    try:
        os.setxattr(directory, name, b"x")
        os.removexattr(directory, name)
    except OSError:
        return False
    return True


@pytest.fixture
def cgroupfs(tmp_path: Path) -> Path:
    """A directory standing in for a cgroup file system; skips when it holds no user xattrs."""
    root = tmp_path / "cgroupfs"
    root.mkdir()
    if not can_set_xattr(root, "user.vouchd_test"):
        pytest.skip(f"{root} does not support user extended attributes")
    return root


def proc_with_mounts(tmp_path: Path, cgroup: str, mounts: dict[str, Path]) -> Path:
    """A fake /proc whose own mountinfo mounts each hierarchy (`unified`, `name=systemd`) at a directory."""
    proc = fake_proc(tmp_path / "proc", cgroup)
    lines = []
    for number, (hierarchy, directory) in enumerate(mounts.items(), start=30):
        kind = "cgroup2 cgroup2 rw" if hierarchy == UNIFIED else f"cgroup cgroup rw,xattr,{hierarchy}"
        lines.append(f"{number} 1 0:{number} / {directory} rw,relatime shared:{number} - {kind}\n")
    (proc / "self").mkdir()
    (proc / "self" / "mountinfo").write_text("".join(lines))
    return proc


async def test_invocation_id_is_evidence_not_a_selector(tmp_path: Path, cgroupfs: Path) -> None:
    unit = cgroupfs / "system.slice" / "nginx.service"
    unit.mkdir(parents=True)
    os.setxattr(unit, "user.invocation_id", INVOCATION.encode())
    proc = proc_with_mounts(tmp_path, "0::/system.slice/nginx.service/sub\n", {UNIFIED: cgroupfs})

    result = await SystemdAttestor(proc_root=proc).attest(process())

    assert selector_strings(result) == _NGINX
    assert evidence_of(result) == [Evidence("systemd", "invocation_id", INVOCATION)]


async def test_invocation_id_is_read_from_the_hierarchy_the_unit_came_from(tmp_path: Path, cgroupfs: Path) -> None:
    (cgroupfs / "v1" / "system.slice" / "a.service").mkdir(parents=True)
    (cgroupfs / "v2" / "system.slice" / "a.service").mkdir(parents=True)
    os.setxattr(cgroupfs / "v1" / "system.slice" / "a.service", "user.invocation_id", INVOCATION.encode())
    os.setxattr(cgroupfs / "v2" / "system.slice" / "a.service", "user.invocation_id", OTHER_INVOCATION.encode())
    cgroup = "1:name=systemd:/system.slice/a.service\n0::/system.slice/a.service\n"
    proc = proc_with_mounts(tmp_path, cgroup, {UNIFIED: cgroupfs / "v2", NAMED_SYSTEMD: cgroupfs / "v1"})

    result = await SystemdAttestor(proc_root=proc).attest(process())

    assert evidence_of(result) == [Evidence("systemd", "invocation_id", INVOCATION)]


async def test_trusted_invocation_id_comes_first(tmp_path: Path, cgroupfs: Path) -> None:
    if not can_set_xattr(cgroupfs, "trusted.vouchd_test"):
        pytest.skip("trusted extended attributes need CAP_SYS_ADMIN")
    unit = cgroupfs / "init.scope"
    unit.mkdir()
    os.setxattr(unit, "user.invocation_id", OTHER_INVOCATION.encode())  # a delegated unit's owner could write this
    os.setxattr(unit, "trusted.invocation_id", bytes.fromhex(INVOCATION))  # old systemd: 16 raw bytes
    proc = fake_proc(tmp_path / "proc", "0::/init.scope\n")

    result = await SystemdAttestor(proc_root=proc, cgroup_root=cgroupfs).attest(process())

    assert evidence_of(result) == [Evidence("systemd", "invocation_id", INVOCATION)]


@pytest.mark.parametrize("value", [None, b"not an id", b"0" * 32])
async def test_no_usable_invocation_id_no_evidence(value: bytes | None, tmp_path: Path, cgroupfs: Path) -> None:
    unit = cgroupfs / "system.slice" / "nginx.service"
    unit.mkdir(parents=True)
    if value is not None:
        os.setxattr(unit, "user.invocation_id", value)
    proc = fake_proc(tmp_path / "proc", "0::/system.slice/nginx.service\n")

    result = await SystemdAttestor(proc_root=proc, cgroup_root=str(cgroupfs)).attest(process())

    assert selector_strings(result) == _NGINX
    assert evidence_of(result) == []


async def test_invocation_id_can_be_switched_off(tmp_path: Path, cgroupfs: Path) -> None:
    (cgroupfs / "init.scope").mkdir()
    os.setxattr(cgroupfs / "init.scope", "user.invocation_id", INVOCATION.encode())
    proc = fake_proc(tmp_path / "proc", "0::/init.scope\n")

    result = await SystemdAttestor(proc_root=proc, cgroup_root=cgroupfs, invocation_id=False).attest(process())

    assert evidence_of(result) == []


async def test_missing_cgroup_directory_or_mount_table_no_evidence(tmp_path: Path) -> None:
    proc = fake_proc(tmp_path / "proc", "0::/system.slice/nginx.service\n")  # no self/mountinfo

    without_table = await SystemdAttestor(proc_root=proc).attest(process())
    without_directory = await SystemdAttestor(proc_root=proc, cgroup_root=tmp_path / "nowhere").attest(process())

    assert selector_strings(without_table) == selector_strings(without_directory) == _NGINX
    assert evidence_of(without_table) == evidence_of(without_directory) == []


async def test_unreadable_invocation_id_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[str] = []

    def refuse(path: str, attribute: str, *, follow_symlinks: bool = True) -> bytes:
        read.append(attribute)
        raise OSError(errno.EPERM if attribute.startswith("trusted.") else errno.ENODATA, "refused")

    monkeypatch.setattr(os, "getxattr", refuse)
    proc = fake_proc(tmp_path / "proc", "0::/init.scope\n")

    result = await SystemdAttestor(proc_root=proc, cgroup_root=tmp_path).attest(process())

    assert read == ["trusted.invocation_id", "user.invocation_id"]
    assert evidence_of(result) == []


# -- options --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"invocation_id": "yes"}, "invocation_id must be true or false"),
        ({"invocation_id": 1}, "invocation_id must be true or false"),
        ({"cgroup_root": "sys/fs/cgroup"}, "cgroup_root must be an absolute path"),
        ({"cgroup_root": 5}, "cgroup_root must be an absolute path"),
        ({"proc_root": "proc"}, "proc_root must be an absolute path"),
    ],
)
def test_systemd_options_are_checked(options: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError, match=rf"workloadattestor\(systemd\): {problem}"):
        SystemdAttestor(**options)  # type: ignore[arg-type]


@pytest.mark.parametrize("proc_root", ["proc", 7, None])
def test_container_options_are_checked(proc_root: object) -> None:
    with pytest.raises(ConfigError, match=r"workloadattestor\(container\): proc_root must be an absolute path"):
        ContainerAttestor(proc_root=proc_root)  # type: ignore[arg-type]


def test_attestors_declare_what_they_produce() -> None:
    assert SystemdAttestor.name == "systemd"
    assert ContainerAttestor.name == "container"
    assert {(k.type, k.key) for k in SystemdAttestor.produces} == {
        ("systemd", "unit"), ("systemd", "slice"), ("systemd", "user_unit"), ("systemd", "user_slice")}
    assert {(k.type, k.key) for k in ContainerAttestor.produces} == {
        ("container", "id"), ("container", "rootless_id"), ("container", "runtime"), ("k8s", "pod_uid"),
        ("k8s", "qos")}


@pytest.mark.parametrize(
    "selector",
    ["systemd:unit:getty@.service", "systemd:unit:system.slice", "systemd:unit:nginx", "systemd:slice:nginx.service",
     "systemd:user_unit:a b.service", "systemd:user_slice:x", f"container:id:{A.upper()}", f"container:id:{A[:63]}",
     f"container:rootless_id:{A}0", "container:runtime:lxc", f"k8s:pod_uid:{POD.upper()}", f"k8s:pod_uid:{POD_}",
     "k8s:qos:Burstable"],
)
def test_schema_refuses_values_never_produced(selector: str) -> None:
    assert SCHEMA.problem(Selector.parse(selector)) is not None


# -- container attestor: security -----------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        f"/system.slice/docker-{A}.scope/docker-{B}.scope",
        f"/system.slice/docker-{A}.scope/system.slice/docker-{B}.scope",
        f"/system.slice/docker-{A}.scope/machine.slice/libpod-{B}.scope",
        f"/system.slice/docker-{A}.scope/docker/{B}",
        f"/system.slice/docker-{A}.scope/init.scope",
    ],
)
async def test_outermost_container_wins_in_systemd_layouts(path: str, tmp_path: Path) -> None:
    assert await container_selectors(tmp_path, f"0::{path}\n") == {f"container:id:{A}", "container:runtime:docker"}


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (f"/docker/{A}/docker/{B}", {f"container:id:{A}", "container:runtime:docker"}),
        (f"/docker/{A}/system.slice/docker-{B}.scope", {f"container:id:{A}", "container:runtime:docker"}),
        (f"/docker/{A}/kubepods/burstable/pod{POD}/{B}", {f"container:id:{A}", "container:runtime:docker"}),
        (f"/libpod_parent/libpod-{A}/docker/{B}", {f"container:id:{A}", "container:runtime:podman"}),
        (f"/kubepods/besteffort/pod{POD}/{A}/kubepods/burstable/pod11111111-2222-3333-4444-555555555555/{B}",
         {f"container:id:{A}", f"k8s:pod_uid:{POD}", "k8s:qos:besteffort"}),
    ],
)
async def test_outermost_container_wins_in_cgroupfs_layouts(path: str, expected: set[str], tmp_path: Path) -> None:
    assert await container_selectors(tmp_path, f"0::{path}\n") == expected


@pytest.mark.parametrize(
    "path",
    [
        f"/system.slice/app.service/docker-{B}.scope",  # app.service may have Delegate=yes
        f"/system.slice/app.service/docker/{B}",
        f"/system.slice/containerd.service/kubepods/pod{POD}/{B}",
        f"/user.slice/user-1000.slice/session-3.scope/docker-{B}.scope",
        f"/lxc.payload.c1/docker/{B}",  # cgroupfs layouts only right after the leading slices
        f"/custom/docker/{B}",
        f"/system.slice/docker-{A}.scope.d/docker/{B}",
    ],
)
async def test_nothing_below_another_unit_or_cgroup_is_a_container(path: str, tmp_path: Path) -> None:
    assert await container_selectors(tmp_path, f"0::{path}\n") == set()


@pytest.mark.parametrize(
    ("path", "runtime"),
    [
        (f"/user.slice/user-1000.slice/user@1000.service/user.slice/libpod-{A}.scope", "podman"),
        (f"/user.slice/user-1000.slice/user@1000.service/docker-{A}.scope", "docker"),
        (f"/user.slice/user-1000.slice/user@1000.service/app.slice/docker-{A}.scope/docker-{B}.scope", "docker"),
        (f"/user.slice/user-1000.slice/user@1000.service/docker/{A}", "docker"),
        (f"/user@0.service/libpod_parent/libpod-{A}", "podman"),
    ],
)
async def test_containers_in_a_users_subtree_are_rootless(path: str, runtime: str, tmp_path: Path) -> None:
    # Any process of user 1000 can make these cgroups: never a container:id an entry could trust.
    got = await container_selectors(tmp_path, f"0::{path}\n")

    assert got == {f"container:rootless_id:{A}", f"container:runtime:{runtime}"}


@pytest.mark.parametrize(
    "path",
    [
        f"/user.slice/user-1000.slice/user@1000.service/kubepods.slice/kubepods-burstable.slice/"
        f"kubepods-burstable-pod{POD_}.slice/cri-containerd-{A}.scope",
        f"/user.slice/user-1000.slice/user@1000.service/kubepods/burstable/pod{POD}/{A}",
    ],
)
async def test_no_kubernetes_selectors_from_a_users_subtree(path: str, tmp_path: Path) -> None:
    got = await container_selectors(tmp_path, f"0::{path}\n")

    assert not any(selector.startswith(("k8s:", "container:id:")) for selector in got)


async def test_user_subtree_in_name_systemd_is_rootless_too(tmp_path: Path) -> None:
    cgroup = (f"4:memory:/user.slice/user-1000.slice/user@1000.service\n"
              f"1:name=systemd:/user.slice/user-1000.slice/user@1000.service/docker-{A}.scope\n")

    assert await container_selectors(tmp_path, cgroup) == {f"container:rootless_id:{A}", "container:runtime:docker"}


@pytest.mark.parametrize(
    "path",
    [
        f"/system.slice/docker-{A.upper()}.scope",
        f"/system.slice/docker-{A[:63]}.scope",
        f"/system.slice/docker-{A}0.scope",
        f"/system.slice/docker-{A}.service",
        f"/system.slice/docker-{'g' * 64}.scope",
        f"/docker/{A.upper()}",
        f"/docker/{A[:63]}",
        f"/docker/{A} ",
        f"/docker/{A * 40}",
        f"/docker/{A}.scope",
        f"/libpod_parent/libpod-conmon-{A}",
        f"/kubepods/burstable/pod{POD.upper()}/{A}",
        f"/kubepods/burstable/pod{POD_}/{A}",
        f"/kubepods/guaranteed/pod{POD}/{A}",
        f"/kubepods/burstable/pod{POD}/crio-conmon-{A}",
        f"/kubepods/burstable/pod{POD}",
        "/docker",
        f"/system.slice/docker-{A}.scope (deleted)",
    ],
)
async def test_names_that_are_not_exactly_a_container_give_nothing(path: str, tmp_path: Path) -> None:
    assert await container_selectors(tmp_path, f"0::{path}\n") == set()


async def test_absurdly_long_path_below_a_container_still_names_it(tmp_path: Path) -> None:
    path = f"/system.slice/docker-{A}.scope" + "/x" * 1500 + f"/docker-{B}.scope"

    assert await container_selectors(tmp_path, f"0::{path}\n") == {f"container:id:{A}", "container:runtime:docker"}


@pytest.mark.parametrize(
    ("slices", "qos"),
    [
        (f"kubepods.slice/kubepods-burstable.slice/kubepods-besteffort-pod{POD_}.slice", None),  # qos disagree
        (f"kubepods.slice/kubepods-burstable.slice/kubepods-pod{POD_}.slice", None),
        (f"kubepods.slice/kubepods-besteffort-pod{POD_}.slice", None),  # no qos slice for its qos
        (f"system.slice/kubepods-pod{POD_}.slice", None),
        (f"kubepods.slice/kubepods-pod{POD}.slice", None),  # dashes would be a slice hierarchy
        (f"kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{POD_}.slice", "burstable"),
    ],
)
async def test_pod_slices_must_be_kubelets(slices: str, qos: str | None, tmp_path: Path) -> None:
    got = await container_selectors(tmp_path, f"0::/{slices}/cri-containerd-{A}.scope\n")

    if qos is None:
        assert got == {f"container:id:{A}", "container:runtime:containerd"}
    else:
        assert got == {f"container:id:{A}", "container:runtime:containerd", f"k8s:pod_uid:{POD}", f"k8s:qos:{qos}"}


async def test_container_outside_the_agents_namespace_fails(tmp_path: Path) -> None:
    with pytest.raises(AttestorError, match=r"workloadattestor\(container\): .*outside the agent's cgroup namespace"):
        await container_selectors(tmp_path, f"0::/../../system.slice/docker-{A}.scope\n")


async def test_container_malformed_line_fails(tmp_path: Path) -> None:
    with pytest.raises(AttestorError, match=r"workloadattestor\(container\): .*malformed /proc cgroup line 2"):
        await container_selectors(tmp_path, f"0::/docker/{A}\nrubbish\n")


async def test_container_vanished_process_fails(tmp_path: Path) -> None:
    tmp_path.joinpath("proc").mkdir()
    with pytest.raises(AttestorError, match=r"workloadattestor\(container\): process 4242 has exited"):
        await ContainerAttestor(proc_root=tmp_path / "proc").attest(process())


# -- container attestor: which hierarchy ----------------------------------------------------------


async def test_name_systemd_comes_before_unified_and_controllers(tmp_path: Path) -> None:
    cgroup = f"4:memory:/docker/{B}\n1:name=systemd:/system.slice/docker-{A}.scope\n0::/docker/{B}\n"

    assert await container_selectors(tmp_path, cgroup) == {f"container:id:{A}", "container:runtime:docker"}


async def test_unified_comes_before_controllers(tmp_path: Path) -> None:
    cgroup = f"4:memory:/docker/{B}\n1:name=systemd:/system.slice/nginx.service\n0::/machine.slice/libpod-{A}.scope\n"

    assert await container_selectors(tmp_path, cgroup) == {f"container:id:{A}", "container:runtime:podman"}


async def test_controllers_are_read_when_neither_says_anything(tmp_path: Path) -> None:
    cgroup = f"5:cpu,cpuacct:/\n4:memory:/kubepods/burstable/pod{POD}/{A}\n1:name=systemd:/\n0::/\n"

    assert await container_selectors(tmp_path, cgroup) == {f"container:id:{A}", f"k8s:pod_uid:{POD}",
                                                           "k8s:qos:burstable"}


async def test_controllers_that_disagree_fail(tmp_path: Path) -> None:
    cgroup = f"5:cpu,cpuacct:/docker/{B}\n4:memory:/docker/{A}\n3:pids:/docker/{A}\n"

    with pytest.raises(AttestorError, match=r"different containers: cpu,cpuacct:/docker/b+; memory:/docker/a+"):
        await container_selectors(tmp_path, cgroup)
