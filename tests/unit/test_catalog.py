"""The workload attestor catalog: built-ins, entry points, duplicates, and building from config."""

from __future__ import annotations

import importlib.metadata
from collections.abc import Sequence
from dataclasses import dataclass, field

import pytest

from vouchd.attestors import (
    BUILTIN_WORKLOAD_ATTESTORS,
    WORKLOAD_ATTESTOR_ENTRY_POINT_GROUP,
    CatalogError,
    WorkloadProcess,
    build_workload_attestors,
    workload_attestor_factories,
)
from vouchd.attestors.workload.unix import UnixAttestor
from vouchd.errors import ConfigError
from vouchd.selectors import Selector


class SystemdAttestor:
    name = "systemd"

    def __init__(self, *, slice_selectors: bool = True) -> None:
        self.slice_selectors = slice_selectors

    async def attest(self, process: WorkloadProcess) -> Sequence[Selector]:
        return []


@dataclass
class FakeEntryPoint:
    """Stands in for importlib.metadata.EntryPoint; counts imports."""

    name: str
    value: str
    target: object = None
    error: Exception | None = None
    loads: list[str] = field(default_factory=list)

    def load(self) -> object:
        self.loads.append(self.name)
        if self.error is not None:
            raise self.error
        return self.target


def test_the_builtins_are_always_there() -> None:
    assert dict(BUILTIN_WORKLOAD_ATTESTORS) == {"unix": UnixAttestor}
    assert workload_attestor_factories(entry_points=[]) == {"unix": UnixAttestor}
    assert WORKLOAD_ATTESTOR_ENTRY_POINT_GROUP == "vouchd.workload_attestors"


def test_entry_points_are_added_sorted_by_name() -> None:
    factories = workload_attestor_factories(
        entry_points=[
            FakeEntryPoint("zeta", "acme.zeta:Zeta", SystemdAttestor),
            FakeEntryPoint("alpha", "acme.alpha:Alpha", SystemdAttestor),
        ]
    )

    assert list(factories) == ["alpha", "unix", "zeta"]


def test_the_installed_entry_points_are_read_by_default() -> None:
    installed = importlib.metadata.entry_points(group=WORKLOAD_ATTESTOR_ENTRY_POINT_GROUP)

    assert set(workload_attestor_factories()) == {"unix"} | {ep.name for ep in installed}


def test_a_plugin_shadowing_a_builtin_is_fatal_and_both_sources_are_named() -> None:
    impostor = FakeEntryPoint("unix", "evil.unix:Unix", SystemdAttestor)

    with pytest.raises(CatalogError) as caught:
        workload_attestor_factories(entry_points=[impostor])

    assert str(caught.value) == (
        "workload attestor 'unix' is defined twice: by built-in vouchd.attestors.workload.unix:UnixAttestor "
        "and by entry point 'evil.unix:Unix'"
    )
    assert impostor.loads == [], "nothing is imported from a conflicting plugin"


def test_two_plugins_with_one_name_are_fatal() -> None:
    with pytest.raises(
        CatalogError, match=r"'k8s' is defined twice: by entry point 'a.k8s:A' and by entry point 'b.k8s:B'"
    ):
        workload_attestor_factories(entry_points=[FakeEntryPoint("k8s", "a.k8s:A"), FakeEntryPoint("k8s", "b.k8s:B")])


def test_a_real_entry_point_names_its_source() -> None:
    real = importlib.metadata.EntryPoint(
        name="unix", value="vouchd.attestors.workload.unix:UnixAttestor", group=WORKLOAD_ATTESTOR_ENTRY_POINT_GROUP
    )

    with pytest.raises(CatalogError, match=r"and by entry point 'vouchd.attestors.workload.unix:UnixAttestor'$"):
        workload_attestor_factories(entry_points=[real])


def test_only_configured_plugins_are_imported() -> None:
    broken = FakeEntryPoint("broken", "gone.module:Thing", error=ImportError("no module named 'gone'"))
    systemd = FakeEntryPoint("systemd", "acme.systemd:Systemd", SystemdAttestor)
    factories = workload_attestor_factories(entry_points=[broken, systemd])

    attestors = build_workload_attestors({"systemd": {"slice_selectors": False}}, factories=factories)

    assert [a.name for a in attestors] == ["systemd"]
    assert isinstance(attestors[0], SystemdAttestor)
    assert attestors[0].slice_selectors is False
    assert broken.loads == []
    with pytest.raises(
        CatalogError,
        match=r"cannot load workload attestor 'broken' from entry point 'gone.module:Thing': no module named 'gone'",
    ):
        build_workload_attestors({"broken": {}}, factories=factories)


def test_build_passes_options_to_the_builtin() -> None:
    (attestor,) = build_workload_attestors({"unix": {"hash_executables": False, "hash_uid_share": 1}})

    assert isinstance(attestor, UnixAttestor)
    assert attestor.name == "unix"
    with pytest.raises(ConfigError, match=r"hash_uid_share must be a number above 0 and at most 1$"):
        build_workload_attestors({"unix": {"hash_uid_share": 2}})


def test_an_unknown_plugin_lists_the_known_ones() -> None:
    factories = workload_attestor_factories(entry_points=[FakeEntryPoint("systemd", "a:B", SystemdAttestor)])

    with pytest.raises(CatalogError, match=r"^unknown workload attestor 'dockr'; known: systemd, unix$"):
        build_workload_attestors({"unix": {}, "dockr": {}}, factories=factories)


def test_an_unknown_option_is_named() -> None:
    with pytest.raises(
        CatalogError,
        match=r"^workload attestor 'unix': unknown option 'hash_executable'; known: hash_burst_bytes, "
        r"hash_bytes_per_second, hash_executables, hash_uid_share, hasher, max_hash_bytes$",
    ):
        build_workload_attestors({"unix": {"hash_executable": True}})


def test_at_least_one_attestor_is_required() -> None:
    with pytest.raises(CatalogError, match=r"^at least one workload attestor must be configured$"):
        build_workload_attestors({})


def test_a_factory_must_build_an_attestor_of_its_own_name() -> None:
    misnamed = FakeEntryPoint("systemd", "acme:Unix", UnixAttestor)
    not_an_attestor = FakeEntryPoint("thing", "acme:dict", dict)
    factories = workload_attestor_factories(entry_points=[misnamed, not_an_attestor])

    with pytest.raises(CatalogError, match=r"^workload attestor 'systemd': factory built an attestor named 'unix'$"):
        build_workload_attestors({"systemd": {}}, factories=factories)
    with pytest.raises(CatalogError, match=r"^workload attestor 'thing': factory returned dict, not an attestor$"):
        build_workload_attestors({"thing": {}}, factories=factories)
