"""The `container` workload attestor: the container (and Kubernetes pod) a process runs in, from its cgroup.

Selectors: `container:id:<64 lowercase hex>`, `container:runtime:<docker|containerd|cri-o|podman>`
(when the layout tells), `k8s:pod_uid:<uid>` and `k8s:qos:<guaranteed|burstable|besteffort>`, and
`container:rootless_id:<64 lowercase hex>` for a container in a user's own cgroup subtree. No
container runtime is ever asked anything: the cgroup path the kernel reports is the only source.

Layouts recognised (v1 and v2 alike; the names are the runtimes' defaults):

- systemd driver: the outermost unit is the container's scope: `/system.slice/docker-<id>.scope`,
  `/machine.slice/libpod-<id>.scope[/container]` (podman), `/system.slice/nerdctl-<id>.scope`
  (containerd), `.../crio-<id>.scope` (cri-o; `crio-conmon-<id>.scope` and `libpod-conmon-<id>.scope`
  are the runtime's monitor, not the container), `.../cri-containerd-<id>.scope`; Kubernetes pods in
  `/kubepods.slice/kubepods-<qos>.slice/kubepods-<qos>-pod<uid with _>.slice/` (no qos slice for
  guaranteed pods).
- cgroupfs driver, directly after the leading slices (in practice at the root): `/docker/<id>`,
  `/libpod_parent/libpod-<id>`, `/kubepods[/<qos>]/pod<uid>/<id>` (runtime unknown) or `.../crio-<id>`.

Which hierarchy: the `name=systemd` path, else the `0::` one; only when neither names a container,
the v1 controller hierarchies, which must then agree.

Security:

1. Only the OUTERMOST container counts. A process in a container that can write its cgroup tree
   (delegation, a cgroup namespace with a writable cgroupfs) can make child cgroups named like any
   other container: `/system.slice/docker-A.scope/docker-B.scope` and `/docker/A/docker/B` are A. In
   a systemd layout nothing below the outermost unit is even looked at: `/system.slice/app.service/
   docker-B.scope` is no container, as app.service may be delegated (Delegate=yes) to its user.
   cgroupfs layouts must start right after the leading slices, where only root makes cgroups.
2. A user's service manager (`.../user@UID.service/...`) owns its subtree: any process of that user
   can make `libpod-<anything>.scope` there. Rootless containers live there, so they are recognised
   the same way, but reported as `container:rootless_id` (with `container:runtime`), never
   `container:id`, and never with `k8s:` selectors: an entry for a root-run container's id cannot be
   matched by a user naming a cgroup after it. An entry using `rootless_id` must also name the user
   (`unix:uid`), since the id is only the user's say-so.
3. Names are matched exactly: an id that is not 64 lowercase hex digits, an over-long or otherwise
   odd name gives no container selectors for that name; a `..` (a process outside the agent's cgroup
   namespace) or a malformed line fails the attestation.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from vouchd.attestors.base import Evidence, WorkloadProcess
from vouchd.attestors.errors import AttestorError, ProcessInfoError
from vouchd.attestors.workload.cgroups import CgroupPath, ProcessCgroups, read_process_cgroups
from vouchd.attestors.workload.procfs import PROC_ROOT
from vouchd.attestors.workload.systemd import UnitPlacement, leading_slices, locate_unit, user_manager_uid
from vouchd.errors import ConfigError
from vouchd.selectors import Selector, SelectorKind, matching

__all__ = ["RUNTIMES", "SELECTOR_KINDS", "ContainerAttestor", "ContainerPlacement", "locate_container",
           "placement_of"]

_NAME = "container"
_K8S = "k8s"

RUNTIMES = ("docker", "containerd", "cri-o", "podman")
QOS_CLASSES = ("guaranteed", "burstable", "besteffort")

_ID = r"[0-9a-f]{64}"
_CONTAINER_ID = re.compile(_ID)
# The scope units runtimes create through systemd (their systemd cgroup driver).
_SCOPE_RUNTIMES = {"docker": "docker", "cri-containerd": "containerd", "nerdctl": "containerd", "crio": "cri-o",
                   "libpod": "podman"}
_RUNTIME_SCOPE = re.compile(r"(?P<prefix>docker|cri-containerd|nerdctl|crio|libpod)-(?P<id>" + _ID + r")\.scope")
# Pod uids: a UUID, or 32 hex digits for static pods (a hash of their manifest).
_UUID = r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
_POD_UID = r"(?:" + _UUID + r"|[0-9a-f]{32})"
# systemd slices cannot hold `-` in a name's own part (it separates parents), so kubelet writes `_`.
_SLICE_POD_UID = r"(?P<uid>[0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12}|[0-9a-f]{32})"
_QOS_SLICE = re.compile(r"kubepods-(?P<qos>burstable|besteffort)\.slice")
_POD_SLICE = re.compile(r"kubepods(?:-(?P<qos>burstable|besteffort))?-pod" + _SLICE_POD_UID + r"\.slice")
_POD_DIRECTORY = re.compile(r"pod(?P<uid>" + _POD_UID + r")")
_CRIO_DIRECTORY = re.compile(r"crio-(?P<id>" + _ID + r")")
_LIBPOD_DIRECTORY = re.compile(r"libpod-(?P<id>" + _ID + r")")

SELECTOR_KINDS = (
    SelectorKind(_NAME, "id", matching(_ID, "a container id is 64 lowercase hex digits, as `docker ps --no-trunc` "
                                            "shows it")),
    SelectorKind(_NAME, "rootless_id", matching(_ID, "a rootless_id is 64 lowercase hex digits, as `podman ps "
                                                     "--no-trunc` shows it")),
    SelectorKind(_NAME, "runtime", matching("|".join(RUNTIMES), f"a runtime is one of {', '.join(RUNTIMES)}")),
    SelectorKind(_K8S, "pod_uid", matching(_POD_UID, "a pod_uid is the pod's metadata.uid: a lowercase UUID with "
                                                     "dashes (or 32 hex digits for a static pod)")),
    SelectorKind(_K8S, "qos", matching("|".join(QOS_CLASSES), f"a qos is one of {', '.join(QOS_CLASSES)}")),
)


@dataclass(frozen=True, slots=True)
class ContainerPlacement:
    """The container a cgroup path puts a process in."""

    id: str
    runtime: str | None  # None when the layout does not tell (cgroupfs Kubernetes pods)
    rootless: bool = False  # in a user's own subtree: the id is only that user's say-so
    pod_uid: str | None = None
    qos: str | None = None

    def selectors(self) -> list[Selector]:
        selectors = [Selector(_NAME, "rootless_id" if self.rootless else "id", self.id)]
        if self.runtime is not None:
            selectors.append(Selector(_NAME, "runtime", self.runtime))
        if self.pod_uid is not None and not self.rootless:
            selectors.append(Selector(_K8S, "pod_uid", self.pod_uid))
            if self.qos is not None:
                selectors.append(Selector(_K8S, "qos", self.qos))
        return selectors


def locate_container(components: Sequence[str]) -> ContainerPlacement | None:
    """The outermost container of a cgroup path (its names, from the root), or None."""
    placement = locate_unit(components)
    if placement is not None and user_manager_uid(placement.unit) is not None:
        # The user's own subtree: its layout is read like the host's, its ids are not trusted like them.
        inner = _locate(placement.below, kubernetes=False)
        return None if inner is None else ContainerPlacement(inner.id, inner.runtime, rootless=True)
    return _locate(components, kubernetes=True)


def _locate(components: Sequence[str], *, kubernetes: bool) -> ContainerPlacement | None:
    """The container at the top of `components`: its outermost unit, else a cgroupfs layout right
    after the leading slices. Never looks deeper: deeper names may be anyone's."""
    placement = locate_unit(components)
    if placement is not None:
        return _container_unit(placement, kubernetes=kubernetes)
    rest = components[len(leading_slices(components)) :]
    if len(rest) < 2:
        return None
    if rest[0] == "docker" and _CONTAINER_ID.fullmatch(rest[1]):
        return ContainerPlacement(rest[1], "docker")
    if rest[0] == "libpod_parent" and (match := _LIBPOD_DIRECTORY.fullmatch(rest[1])):
        return ContainerPlacement(match.group("id"), "podman")
    if rest[0] == "kubepods" and kubernetes:
        return _cgroupfs_pod(rest[1:])
    return None


def _container_unit(placement: UnitPlacement, *, kubernetes: bool) -> ContainerPlacement | None:
    match = _RUNTIME_SCOPE.fullmatch(placement.unit)
    if match is None:
        return None
    container = ContainerPlacement(match.group("id"), _SCOPE_RUNTIMES[match.group("prefix")])
    if not kubernetes:
        return container
    pod = _systemd_pod(placement.slices)
    return container if pod is None else ContainerPlacement(container.id, container.runtime, pod_uid=pod[0],
                                                            qos=pod[1])


def _systemd_pod(slices: tuple[str, ...]) -> tuple[str, str] | None:
    """(uid, qos) from `kubepods.slice[/kubepods-<qos>.slice]/kubepods[-<qos>]-pod<uid>.slice`, or None."""
    if not slices or slices[0] != "kubepods.slice":
        return None
    if len(slices) == 2:
        qos_slice = None
    elif len(slices) == 3:
        qos_slice = _QOS_SLICE.fullmatch(slices[1])
        if qos_slice is None:
            return None
    else:
        return None
    pod = _POD_SLICE.fullmatch(slices[-1])
    if pod is None:
        return None
    qos = pod.group("qos")
    if (qos_slice.group("qos") if qos_slice is not None else None) != qos:
        return None
    return pod.group("uid").replace("_", "-"), qos or "guaranteed"


def _cgroupfs_pod(rest: Sequence[str]) -> ContainerPlacement | None:
    """`[<qos>/]pod<uid>/<id>` (or `crio-<id>`) below `/kubepods`."""
    qos = "guaranteed"
    if rest and rest[0] in ("burstable", "besteffort"):
        qos, rest = rest[0], rest[1:]
    if len(rest) < 2 or (pod := _POD_DIRECTORY.fullmatch(rest[0])) is None:
        return None
    if _CONTAINER_ID.fullmatch(rest[1]):
        return ContainerPlacement(rest[1], None, pod_uid=pod.group("uid"), qos=qos)
    if crio := _CRIO_DIRECTORY.fullmatch(rest[1]):
        return ContainerPlacement(crio.group("id"), "cri-o", pod_uid=pod.group("uid"), qos=qos)
    return None


def placement_of(cgroups: ProcessCgroups) -> ContainerPlacement | None:
    """The container of a process: from its `name=systemd` path, else its `0::` path, else its v1
    controller paths. AttestorError when controller paths name different containers."""
    for cgroup in (cgroups.named_systemd, cgroups.unified):
        if cgroup is not None and (found := locate_container(cgroup.components)) is not None:
            return found
    found_in: dict[ContainerPlacement, CgroupPath] = {}
    for cgroup in cgroups.controller_paths:
        if (found := locate_container(cgroup.components)) is not None:
            found_in.setdefault(found, cgroup)
    if len(found_in) > 1:
        described = "; ".join(f"{cgroup.hierarchy}:{cgroup.path}" for cgroup in found_in.values())
        raise AttestorError(_NAME, f"cgroup controllers put the process in different containers: {described}")
    return next(iter(found_in), None)


class ContainerAttestor:
    """Selectors from the container whose cgroup a process is in.

    Options (the `container:` mapping of `workload_attestors` in the agent's configuration):

    - `proc_root` (path, /proc): where the agent finds /proc (tests).

    The agent must run in the host's cgroup namespace (else every process outside its own is refused)
    and, for a Kubernetes node, read the cgroups of the node: not those of a kind or k3d container.
    """

    name = _NAME
    produces = SELECTOR_KINDS

    def __init__(self, *, proc_root: str | Path = PROC_ROOT) -> None:
        if not (isinstance(proc_root, str | Path) and Path(proc_root).is_absolute()):
            raise ConfigError("workloadattestor(container): proc_root must be an absolute path")
        self._proc_root = Path(proc_root)

    async def attest(self, process: WorkloadProcess) -> Sequence[Selector | Evidence]:
        try:
            # Read on the event loop: a kernel file of a few hundred bytes (30 µs), which no caller can
            # make wait on a file system it controls; a thread's hand-off would cost ten times that.
            cgroups = read_process_cgroups(process.pid, proc_root=self._proc_root)
        except ProcessInfoError as err:
            raise AttestorError(_NAME, str(err)) from err
        found = placement_of(cgroups)
        return [] if found is None else found.selectors()
