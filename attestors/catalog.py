"""Which workload attestors exist, and building the configured ones.

Built-ins are listed here; third-party attestors register an entry point in the group
`vouchd.workload_attestors` (name = the attestor's name, value = its factory). Nothing extends the
import path from configuration or the environment. A name defined twice is fatal: silently picking
one of two plugins would let an installed package replace a security check.

The catalog also says which selectors attestors can produce (their optional `produces`, see
DeclaresSelectors), so that entries naming a selector none of them produces are refused.
"""

from __future__ import annotations

import importlib.metadata
import inspect
import logging
from collections.abc import Callable, Iterable, Mapping
from types import MappingProxyType
from typing import Protocol

from vouchd.attestors.base import WorkloadAttestor
from vouchd.attestors.errors import CatalogError
from vouchd.attestors.workload.container import ContainerAttestor
from vouchd.attestors.workload.hashing import ExecutableHasher
from vouchd.attestors.workload.interpreter import InterpreterAttestor
from vouchd.attestors.workload.lineage import LineageAttestor
from vouchd.attestors.workload.systemd import SystemdAttestor
from vouchd.attestors.workload.unix import UnixAttestor
from vouchd.selectors import SelectorKind, SelectorSchema

__all__ = [
    "BUILTIN_WORKLOAD_ATTESTORS",
    "WORKLOAD_ATTESTOR_ENTRY_POINT_GROUP",
    "PluginEntryPoint",
    "WorkloadAttestorFactory",
    "all_known_selector_schema",
    "build_workload_attestors",
    "selector_schema",
    "workload_attestor_factories",
]

_log = logging.getLogger("vouchd.attestors")

WorkloadAttestorFactory = Callable[..., WorkloadAttestor]

BUILTIN_WORKLOAD_ATTESTORS: Mapping[str, WorkloadAttestorFactory] = MappingProxyType({
    "container": ContainerAttestor,
    "interpreter": InterpreterAttestor,
    "lineage": LineageAttestor,
    "systemd": SystemdAttestor,
    "unix": UnixAttestor,
})
_SHARED_HASHER = "hasher"
WORKLOAD_ATTESTOR_ENTRY_POINT_GROUP = "vouchd.workload_attestors"


class PluginEntryPoint(Protocol):
    """The part of importlib.metadata.EntryPoint the catalog uses."""

    @property
    def name(self) -> str: ...

    @property
    def value(self) -> str: ...

    def load(self) -> object: ...


def workload_attestor_factories(
    *, entry_points: Iterable[PluginEntryPoint] | None = None
) -> dict[str, WorkloadAttestorFactory]:
    """Built-in and installed workload attestor factories, sorted by name.

    `entry_points` replaces the installed entry points of the group (tests). Plugins are imported
    only when built, so a broken plugin that is not configured cannot stop the agent.
    """
    if entry_points is None:
        entry_points = importlib.metadata.entry_points(group=WORKLOAD_ATTESTOR_ENTRY_POINT_GROUP)
    factories: dict[str, WorkloadAttestorFactory] = dict(BUILTIN_WORKLOAD_ATTESTORS)
    sources = {name: f"built-in {_qualified_name(factory)}" for name, factory in factories.items()}
    for entry_point in entry_points:
        source = _describe_entry_point(entry_point)
        if entry_point.name in sources:
            raise CatalogError(
                f"workload attestor {entry_point.name!r} is defined twice: by {sources[entry_point.name]} "
                f"and by {source}"
            )
        sources[entry_point.name] = source
        factories[entry_point.name] = _LazyFactory(entry_point, source)
    return dict(sorted(factories.items()))


def build_workload_attestors(
    config: Mapping[str, Mapping[str, object]],
    *,
    factories: Mapping[str, WorkloadAttestorFactory] | None = None,
    services: Mapping[str, object] | None = None,
) -> list[WorkloadAttestor]:
    """One attestor per configured plugin name, built with that plugin's keyword options.

    `factories` defaults to workload_attestor_factories(). `services` are what the agent itself
    provides (`holders`: who holds which identity, for `lineage`): each is passed to the factories
    that take a keyword of its name, and no configuration may set it. The first attestor built with
    an ExecutableHasher (`unix`) lends it, as `hasher`, to those built after it (`interpreter`), so
    that executables and scripts are hashed under one cache and one budget.
    """
    if not config:
        raise CatalogError("at least one workload attestor must be configured")
    if factories is None:
        factories = workload_attestor_factories()
    provided = dict(services or {})
    reserved = set(provided) | {_SHARED_HASHER}
    attestors: dict[str, WorkloadAttestor] = {}
    # unix first: it owns the hasher the others share.
    for name in sorted(config, key=lambda n: n != "unix"):
        options = config[name]
        factory = factories.get(name)
        if factory is None:
            raise CatalogError(f"unknown workload attestor {name!r}; known: {', '.join(sorted(factories))}")
        if isinstance(options, Mapping) and (taken := sorted(reserved & set(options))):
            raise CatalogError(f"workload attestor {name!r}: option {', '.join(map(repr, taken))} is the agent's "
                               "own and cannot be configured")
        attestor = _build(name, factory, options, _services_for(factory, provided))
        attestors[name] = attestor
        if _SHARED_HASHER not in provided and isinstance(getattr(attestor, _SHARED_HASHER, None), ExecutableHasher):
            provided[_SHARED_HASHER] = getattr(attestor, _SHARED_HASHER)
    return [attestors[name] for name in config]


def _services_for(factory: WorkloadAttestorFactory, provided: Mapping[str, object]) -> dict[str, object]:
    """The services a factory takes by keyword (a plugin without them is built without them)."""
    target = factory.load() if isinstance(factory, _LazyFactory) else factory
    try:
        parameters = inspect.signature(target).parameters
    except ValueError:
        return {}
    return {name: value for name, value in provided.items() if name in parameters}


def selector_schema(
    attestors: Iterable[str], *, factories: Mapping[str, WorkloadAttestorFactory] | None = None
) -> SelectorSchema:
    """What the named workload attestors (those an agent enables) can produce.

    `attestors` are names, e.g. the `workload_attestors` mapping of an agent's configuration.
    `factories` defaults to workload_attestor_factories(); a plugin among the named ones is imported
    to read its declaration, as building it would. CatalogError for an unknown name, a plugin that
    cannot be loaded, or a malformed declaration.
    """
    if factories is None:
        factories = workload_attestor_factories()
    producers: dict[str, tuple[SelectorKind, ...] | None] = {}
    for name in attestors:
        factory = factories.get(name)
        if factory is None:
            raise CatalogError(f"unknown workload attestor {name!r}; known: {', '.join(sorted(factories))}")
        producers[name] = _declared_kinds(name, factory)
    return SelectorSchema(producers, described_as="a selector any enabled attestor produces")


def all_known_selector_schema(*, factories: Mapping[str, WorkloadAttestorFactory] | None = None) -> SelectorSchema:
    """What any workload attestor this host knows can produce: the built-ins and every installed plugin.

    For an authority, which does not know which attestors its agents run: a plugin an agent runs
    must then be installed on the authority's host too for entries using its selectors. Every plugin
    is imported (`factories` defaults to workload_attestor_factories()); CatalogError as for
    selector_schema.
    """
    if factories is None:
        factories = workload_attestor_factories()
    producers = {name: _declared_kinds(name, factory) for name, factory in factories.items()}
    return SelectorSchema(producers, described_as="a selector any installed attestor produces")


def _declared_kinds(name: str, factory: WorkloadAttestorFactory) -> tuple[SelectorKind, ...] | None:
    """The `produces` of a factory (a class attribute, or an attribute of a factory function), or None."""
    target = factory.load() if isinstance(factory, _LazyFactory) else factory
    declared = getattr(target, "produces", None)
    if declared is None:
        return None
    expected = f"workload attestor {name!r}: produces must be a class attribute listing SelectorKinds"
    if not isinstance(declared, list | tuple | frozenset | set):
        raise CatalogError(f"{expected}, got {type(declared).__name__}")
    for item in declared:
        if not isinstance(item, SelectorKind):
            raise CatalogError(f"{expected}, got a {type(item).__name__} among them")
    return tuple(declared)


def _build(name: str, factory: WorkloadAttestorFactory, options: Mapping[str, object],
           services: Mapping[str, object]) -> WorkloadAttestor:
    if not isinstance(options, Mapping) or not all(isinstance(key, str) for key in options):
        raise CatalogError(f"workload attestor {name!r}: options must be a mapping of names to values")
    options = {**options, **services}
    target = factory.load() if isinstance(factory, _LazyFactory) else factory
    try:
        inspect.signature(target).bind(**options)
    except TypeError as err:
        raise CatalogError(f"workload attestor {name!r}: {_describe_bad_options(target, options, err)}") from err
    except ValueError:
        pass  # no introspectable signature (a C callable): let the call itself complain
    try:
        attestor = target(**options)
    except (TypeError, ValueError) as err:
        raise CatalogError(f"workload attestor {name!r}: {err}") from err
    if not isinstance(attestor, WorkloadAttestor):
        raise CatalogError(f"workload attestor {name!r}: factory returned {type(attestor).__name__}, not an attestor")
    if attestor.name != name:
        raise CatalogError(f"workload attestor {name!r}: factory built an attestor named {attestor.name!r}")
    return attestor


def _describe_bad_options(target: Callable[..., object], options: Mapping[str, object], err: TypeError) -> str:
    parameters = inspect.signature(target).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())
    unknown = sorted(key for key in options if key not in parameters)
    if unknown and not takes_any:
        known = sorted(
            p.name
            for p in parameters.values()
            if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        )
        return f"unknown option {', '.join(map(repr, unknown))}; known: {', '.join(known) or 'none'}"
    return str(err)


class _LazyFactory:
    """An entry point that is imported the first time it is needed."""

    def __init__(self, entry_point: PluginEntryPoint, source: str) -> None:
        self._entry_point = entry_point
        self._source = source
        self._loaded: WorkloadAttestorFactory | None = None

    def load(self) -> WorkloadAttestorFactory:
        if self._loaded is None:
            name = self._entry_point.name
            try:
                loaded = self._entry_point.load()
            except Exception as err:
                raise CatalogError(f"cannot load workload attestor {name!r} from {self._source}: {err}") from err
            if not callable(loaded):
                raise CatalogError(f"workload attestor {name!r} from {self._source} is not callable")
            self._loaded = loaded
            _log.info("loaded workload attestor %r from %s", self._entry_point.name, self._source)
        return self._loaded

    def __call__(self, **options: object) -> WorkloadAttestor:
        return self.load()(**options)

    def __repr__(self) -> str:
        return f"<workload attestor from {self._source}>"


def _describe_entry_point(entry_point: PluginEntryPoint) -> str:
    dist = getattr(entry_point, "dist", None)
    dist_name = getattr(dist, "name", None)
    where = f" in distribution {dist_name}" if dist_name else ""
    return f"entry point {entry_point.value!r}{where}"


def _qualified_name(factory: object) -> str:
    module = getattr(factory, "__module__", "?")
    name = getattr(factory, "__qualname__", type(factory).__name__)
    return f"{module}:{name}"
