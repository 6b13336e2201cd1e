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
from vouchd.attestors.catalog import all_known_selector_schema, selector_schema
from vouchd.attestors.workload.unix import UnixAttestor
from vouchd.errors import ConfigError
from vouchd.selectors import Selector, SelectorKind, SelectorSchema, non_empty


class AcmeAttestor:
    name = "acme"

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


BUILTINS = ["container", "interpreter", "lineage", "systemd", "unix"]


def test_the_builtins_are_always_there() -> None:
    assert sorted(BUILTIN_WORKLOAD_ATTESTORS) == BUILTINS
    assert BUILTIN_WORKLOAD_ATTESTORS["unix"] is UnixAttestor
    assert workload_attestor_factories(entry_points=[]) == dict(BUILTIN_WORKLOAD_ATTESTORS)
    assert WORKLOAD_ATTESTOR_ENTRY_POINT_GROUP == "vouchd.workload_attestors"


def test_entry_points_are_added_sorted_by_name() -> None:
    factories = workload_attestor_factories(
        entry_points=[
            FakeEntryPoint("zeta", "acme.zeta:Zeta", AcmeAttestor),
            FakeEntryPoint("alpha", "acme.alpha:Alpha", AcmeAttestor),
        ]
    )

    assert list(factories) == sorted(["alpha", *BUILTINS, "zeta"])


def test_the_installed_entry_points_are_read_by_default() -> None:
    installed = importlib.metadata.entry_points(group=WORKLOAD_ATTESTOR_ENTRY_POINT_GROUP)

    assert set(workload_attestor_factories()) == set(BUILTINS) | {ep.name for ep in installed}


def test_a_plugin_shadowing_a_builtin_is_fatal_and_both_sources_are_named() -> None:
    impostor = FakeEntryPoint("unix", "evil.unix:Unix", AcmeAttestor)

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
    acme = FakeEntryPoint("acme", "acme.acme:Systemd", AcmeAttestor)
    factories = workload_attestor_factories(entry_points=[broken, acme])

    attestors = build_workload_attestors({"acme": {"slice_selectors": False}}, factories=factories)

    assert [a.name for a in attestors] == ["acme"]
    assert isinstance(attestors[0], AcmeAttestor)
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
    factories = workload_attestor_factories(entry_points=[FakeEntryPoint("acme", "a:B", AcmeAttestor)])

    known = ", ".join(sorted(["acme", *BUILTINS]))
    with pytest.raises(CatalogError, match=rf"^unknown workload attestor 'dockr'; known: {known}$"):
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
    misnamed = FakeEntryPoint("acme", "acme:Unix", UnixAttestor)
    not_an_attestor = FakeEntryPoint("thing", "acme:dict", dict)
    factories = workload_attestor_factories(entry_points=[misnamed, not_an_attestor])

    with pytest.raises(CatalogError, match=r"^workload attestor 'acme': factory built an attestor named 'unix'$"):
        build_workload_attestors({"acme": {}}, factories=factories)
    with pytest.raises(CatalogError, match=r"^workload attestor 'thing': factory returned dict, not an attestor$"):
        build_workload_attestors({"thing": {}}, factories=factories)


# -- which selectors the attestors produce -------------------------------------------------------


ENABLED = "a selector any enabled attestor produces"
INSTALLED = "a selector any installed attestor produces"
UNIX_KEYS = "gid, group, path, sha256, supplementary_gid, supplementary_group, uid, user"


class DeclaringAcmeAttestor(AcmeAttestor):
    produces = (SelectorKind("acme", "unit", non_empty("a unit is a name")),
                SelectorKind("acme", "slice", non_empty("a slice is a name")))


def declaring_factory(**options: object) -> AcmeAttestor:
    return DeclaringAcmeAttestor()


declaring_factory.produces = (SelectorKind("k8s", "pod_uid", non_empty("a pod uid is not empty")),)  # type: ignore[attr-defined]


def problem(schema: SelectorSchema, text: str) -> str | None:
    return schema.problem(Selector.parse(text))


def test_the_unix_attestor_declares_its_selectors() -> None:
    schema = selector_schema(["unix"])

    assert problem(schema, "unix:uid:1000") is None
    assert problem(schema, "unix:pth:/x") == f"unix:pth is not {ENABLED} (unix produces: {UNIX_KEYS})"
    assert problem(schema, "acme:unit:web.service") == f"acme:unit is not {ENABLED} (known types: unix)"


def test_the_schema_of_enabled_attestors_reads_each_declaration_from_its_factory() -> None:
    factories = workload_attestor_factories(entry_points=[
        FakeEntryPoint("acme", "acme.acme:Systemd", DeclaringAcmeAttestor),
        FakeEntryPoint("kube", "acme.kube:build", declaring_factory),
    ])

    schema = selector_schema(["unix", "acme", "kube"], factories=factories)

    assert problem(schema, "acme:unit:web.service") is None
    assert problem(schema, "k8s:pod_uid:8f1c") is None
    assert problem(schema, "acme:unit:") == "acme:unit:: a unit is a name"
    assert problem(schema, "acme:units:x") == f"acme:units is not {ENABLED} (acme produces: slice, unit)"
    assert problem(schema, "k8s:pod_id:x") == f"k8s:pod_id is not {ENABLED} (kube produces: pod_uid)"
    assert problem(schema, "container:id:x") == f"container:id is not {ENABLED} (known types: acme, k8s, unix)"


def test_only_the_enabled_attestors_count_and_only_they_are_imported() -> None:
    acme = FakeEntryPoint("acme", "acme.acme:Systemd", DeclaringAcmeAttestor)
    broken = FakeEntryPoint("broken", "gone.module:Thing", error=ImportError("no module named 'gone'"))
    factories = workload_attestor_factories(entry_points=[acme, broken])

    schema = selector_schema({"unix": {}}, factories=factories)  # a configuration's mapping of name -> options

    assert problem(schema, "acme:unit:web.service") == f"acme:unit is not {ENABLED} (known types: unix)"
    assert (acme.loads, broken.loads) == ([], [])


def test_a_plugin_that_declares_nothing_may_produce_anything_of_its_own_type() -> None:
    factories = workload_attestor_factories(entry_points=[FakeEntryPoint("acme", "a:B", AcmeAttestor)])

    schema = selector_schema(["unix", "acme"], factories=factories)

    assert problem(schema, "acme:anything:at all") is None
    assert problem(schema, "unix:uid:abc") == (
        "unix:uid:abc: a uid is a decimal number (no sign, spaces or leading zeros) below 4294967295, "
        "e.g. unix:uid:1000"
    )
    assert problem(schema, "docker:id:x") == f"docker:id is not {ENABLED} (known types: acme, unix)"


def test_an_unknown_enabled_attestor_is_named() -> None:
    with pytest.raises(CatalogError, match=rf"^unknown workload attestor 'dockr'; known: {', '.join(BUILTINS)}$"):
        selector_schema(["unix", "dockr"], factories=workload_attestor_factories(entry_points=[]))


@pytest.mark.parametrize(
    ("produces", "message"),
    [
        ("acme:unit", "got str"),
        (SelectorKind("acme", "unit"), "got SelectorKind"),
        ((SelectorKind("acme", "unit"), ("acme", "slice")), "got a tuple among them"),
        (property(lambda self: ()), "got property"),
    ],
)
def test_a_malformed_declaration_is_refused(produces: object, message: str) -> None:
    malformed = type("Malformed", (AcmeAttestor,), {"produces": produces})
    factories = workload_attestor_factories(entry_points=[FakeEntryPoint("acme", "a:B", malformed)])

    with pytest.raises(CatalogError, match=rf"^workload attestor 'acme': produces must be a class attribute "
                                           rf"listing SelectorKinds, {message}$"):
        selector_schema(["acme"], factories=factories)


def test_a_plugin_that_cannot_be_loaded_cannot_be_described() -> None:
    broken = FakeEntryPoint("broken", "gone.module:Thing", error=ImportError("no module named 'gone'"))
    factories = workload_attestor_factories(entry_points=[broken])

    with pytest.raises(CatalogError, match=r"^cannot load workload attestor 'broken' from entry point "
                                           r"'gone.module:Thing': no module named 'gone'$"):
        all_known_selector_schema(factories=factories)


def test_all_known_attestors_are_the_builtins_and_every_installed_plugin() -> None:
    acme = FakeEntryPoint("acme", "acme.acme:Systemd", DeclaringAcmeAttestor)
    mesh = FakeEntryPoint("mesh", "acme.mesh:Mesh", AcmeAttestor)
    factories = workload_attestor_factories(entry_points=[acme, mesh])

    schema = all_known_selector_schema(factories=factories)

    assert (acme.loads, mesh.loads) == (["acme"], ["mesh"])
    assert problem(schema, "acme:unit:web.service") is None
    assert problem(schema, "unix:uid:0") is None
    assert problem(schema, "mesh:whatever:x") is None
    assert problem(schema, "unix:uidd:0") == f"unix:uidd is not {INSTALLED} (unix produces: {UNIX_KEYS})"
    known = "acme, container, interpreter, k8s, lineage, mesh, script, systemd, unix"
    assert problem(schema, "docker:id:x") == f"docker:id is not {INSTALLED} (known types: {known})"


def test_all_known_attestors_default_to_what_is_installed() -> None:
    schema = all_known_selector_schema()

    assert "unix" in schema.types
    assert problem(schema, "unix:pth:/x") == f"unix:pth is not {INSTALLED} (unix produces: {UNIX_KEYS})"
