"""Configuration: one YAML file parsed once into frozen dataclasses.

Every problem is reported as a ConfigError naming the file, the key path and what was expected;
unknown keys are errors (a typo must never silently fall back to a default), and so is a key given
twice in one mapping (YAML loaders otherwise keep the last one without a word). String values may
reference environment variables as ``${NAME}`` or ``${NAME:-default}`` so that one example file
serves every host; a reference to an unset variable without a default is an error. Relative paths
are resolved against the directory of the configuration file.

Entries are vouchd.entries.Entry, and their selectors must be ones something produces: workload
selectors what the file's own agent enables (`agent.workload_attestors`), or, in a file without an
agent section, any workload attestor installed here; node selectors what node attestation produces.
An entry that could never match is refused here rather than ignored at run time.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import yaml

from vouchd.entries import Entry, InvalidEntryError, default_entry_id
from vouchd.entry_rules import NODE_SELECTOR_SCHEMA
from vouchd.errors import ConfigError
from vouchd.selectors import InvalidSelectorError, Selector, SelectorSchema
from vouchd.spiffe import SpiffeError, SpiffeId, TrustDomain, TrustTier

if TYPE_CHECKING:
    from vouchd.attestors.catalog import WorkloadAttestorFactory

__all__ = [
    "AgentConfig",
    "AuthorityConfig",
    "Config",
    "EkType",
    "EnrolmentMode",
    "TpmConfig",
    "format_duration",
    "load_config",
    "parse_config",
    "parse_duration",
]

EkType = Literal["rsa2048", "ecc-p256", "ecc-p384"]
EnrolmentMode = Literal["allowlist", "approve", "any-genuine"]

_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@dataclass(frozen=True)
class TpmConfig:
    tcti: str
    ek: EkType = "rsa2048"
    # How long the TPM may stay unreachable before the agent exits non-zero (so that systemd's
    # Restart=on-failure takes over); meanwhile it serves what it holds and issues nothing.
    unreachable_limit: timedelta = timedelta(seconds=60)


@dataclass(frozen=True)
class AgentConfig:
    state_dir: Path
    socket_path: Path
    admin_socket_path: Path
    tpm: TpmConfig
    event_log_path: Path | None
    workload_attestors: Mapping[str, Mapping[str, Any]]
    attestation_deadline: timedelta
    attestation_interval: timedelta


@dataclass(frozen=True)
class AuthorityConfig:
    state_dir: Path
    ek_roots: tuple[Path, ...]
    ek_intermediates: tuple[Path, ...]
    enrolment: EnrolmentMode
    enrolled_ek_hashes: frozenset[str]
    pcr_bank: str
    pcr_indices: tuple[int, ...]
    accept_missing_event_log: bool
    ca_ttl: timedelta
    node_svid_ttl: timedelta
    x509_svid_ttl: timedelta
    x509_svid_max_ttl: timedelta
    jwt_svid_ttl: timedelta = timedelta(minutes=5)
    jwt_svid_max_ttl: timedelta = timedelta(hours=1)


@dataclass(frozen=True)
class Config:
    source: Path
    trust_domain: TrustDomain
    agent: AgentConfig | None
    authority: AuthorityConfig | None
    entries: tuple[Entry, ...] = field(default=())
    log_level: str = "info"


def format_duration(value: timedelta) -> str:
    """A form parse_duration reads back, as people write them: 30d, 24h, 5m, 90s, 250ms."""
    milliseconds = round(value.total_seconds() * 1000)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        # whole days from two days on (24h reads better than 1d); the largest whole unit otherwise
        if milliseconds % size == 0 and (unit != "d" or milliseconds >= 2 * size):
            return f"{milliseconds // size}{unit}"
    return f"{milliseconds}ms"


def parse_duration(text: str) -> timedelta:
    """``90s``, ``5m``, ``1h``, ``30d``, ``250ms`` -> timedelta; ValueError otherwise."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 250ms, 90s, 5m, 1h or 30d")
    return timedelta(seconds=int(match.group(1)) * _DURATION_UNITS[match.group(2)])


# The keys each section may hold. Checked when a section is opened, before any value is read, so a
# misspelt key ("selector:") is reported as such, not as the required key it was meant to be.
_TOP_KEYS = ("trust_domain", "agent", "authority", "entries", "log_level")
_AGENT_KEYS = ("state_dir", "socket_path", "admin_socket_path", "tpm", "event_log", "workload_attestors",
               "attestation_deadline", "attestation_interval")
_TPM_KEYS = ("tcti", "ek", "unreachable_limit")
_AUTHORITY_KEYS = ("state_dir", "ek_trust", "pcr_selection", "accept_missing_event_log", "ca_ttl", "node_svid_ttl",
                   "x509_svid_ttl", "x509_svid_max_ttl", "jwt_svid_ttl", "jwt_svid_max_ttl")
_EK_TRUST_KEYS = ("roots", "intermediates", "enrolment", "enrolled")
_ENTRY_KEYS = ("id", "spiffe_id", "selectors", "parent", "node_selectors", "min_tier", "x509_ttl", "jwt_ttl",
               "dns_names", "hint", "labels")


class _Section:
    """A YAML mapping being read; keys other than `keys` are refused as soon as it is opened."""

    def __init__(self, source: Path, path: str, data: object, environ: Mapping[str, str],
                 keys: tuple[str, ...]) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: {path or 'top level'}: expected a mapping, got {_kind(data)}")
        self.source, self.path, self.environ = source, path, environ
        self._data: dict[object, object] = data
        unknown = sorted(str(key) for key in data if key not in keys)
        if unknown:
            raise self.error(unknown[0], "unknown key" + (f" (also unknown: {', '.join(unknown[1:])})"
                                                          if len(unknown) > 1 else ""))

    def _key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self._key_path(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self._data

    def _raw(self, key: str) -> object:
        return self._data.get(key)

    def _expand(self, key: str, text: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = self.environ.get(name)
            if value is None or value == "":
                if default is None:
                    state = "is empty" if value == "" else "is not set"
                    raise self.error(key, f"environment variable {name} {state} and has no default")
                return default
            return value

        return _ENV_REFERENCE.sub(substitute, text)

    def string(self, key: str, default: str | None = None) -> str:
        value = self._raw(key)
        if value is None:
            if default is None:
                raise self.error(key, "is required (a string)")
            return default
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise self.error(key, f"expected a string, got {_kind(value)}")
        text = self._expand(key, str(value))
        if not text:
            raise self.error(key, "must not be empty")
        return text

    def optional_string(self, key: str) -> str | None:
        return None if self._data.get(key) is None else self.string(key)

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.string(key, default)
        if value not in allowed:
            raise self.error(key, f"expected one of {', '.join(allowed)}, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_kind(value)}")
        return value

    def duration(self, key: str, default: str | None) -> timedelta:
        text = self.string(key, default)
        try:
            value = parse_duration(text)
        except ValueError as err:
            raise self.error(key, str(err)) from None
        if value <= timedelta(0):
            raise self.error(key, "must be longer than zero")
        return value

    def optional_duration(self, key: str) -> timedelta | None:
        return None if self._data.get(key) is None else self.duration(key, None)

    def path_value(self, key: str, default: str | None = None) -> Path:
        return self._resolve(self.string(key, default))

    def optional_path(self, key: str) -> Path | None:
        return None if self._data.get(key) is None else self.path_value(key)

    def _resolve(self, text: str) -> Path:
        path = Path(text).expanduser()
        return path if path.is_absolute() else (self.source.parent / path).resolve()

    def string_list(self, key: str) -> list[str]:
        value = self._raw(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of strings, got {_kind(value)}")
        items = []
        for index, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, str | int):
                raise self.error(f"{key}[{index}]", f"expected a string, got {_kind(item)}")
            items.append(self._expand(f"{key}[{index}]", str(item)))
        return items

    def string_mapping(self, key: str) -> dict[str, str]:
        """A mapping of names to strings (numbers are read as their text), such as an entry's labels."""
        value = self._raw(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping of names to strings, got {_kind(value)}")
        result: dict[str, str] = {}
        for name, item in value.items():
            if not isinstance(name, str):
                raise self.error(key, f"expected names (strings) as keys, got {_kind(name)}")
            if isinstance(item, bool) or not isinstance(item, str | int):
                raise self.error(f"{key}.{name}", f"expected a string, got {_kind(item)}")
            result[name] = self._expand(f"{key}.{name}", str(item))
        return result

    def path_list(self, key: str) -> tuple[Path, ...]:
        return tuple(self._resolve(item) for item in self.string_list(key))

    def section(self, key: str, keys: tuple[str, ...]) -> _Section:
        return _Section(self.source, self._key_path(key), self._raw(key), self.environ, keys)

    def sections(self, key: str, keys: tuple[str, ...]) -> Iterator[_Section]:
        value = self._raw(key)
        if value is None:
            return
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {_kind(value)}")
        for index, item in enumerate(value):
            yield _Section(self.source, f"{self._key_path(key)}[{index}]", item, self.environ, keys)

    def free_mapping(self, key: str) -> dict[str, dict[str, Any]] | None:
        """A mapping of name -> options mapping, whose contents a plugin validates itself; None when absent.

        `name: false` leaves the plugin out (switched off), `name: true` or `name:` takes its defaults.
        """
        value = self._raw(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping of name to options, got {_kind(value)}")
        result: dict[str, dict[str, Any]] = {}
        for name, options in value.items():
            if options is False:
                continue
            if not isinstance(name, str) or not isinstance(options, dict | None | bool):
                raise self.error(f"{key}.{name}", "expected a mapping of options, or true or false")
            result[name] = dict(options) if isinstance(options, dict) else {}
        return result


# What an agent runs when its file names no workload attestors: every built-in one.
DEFAULT_WORKLOAD_ATTESTORS = ("unix", "interpreter", "systemd", "container", "lineage")


def _workload_attestors(section: _Section) -> dict[str, dict[str, Any]]:
    configured = section.free_mapping("workload_attestors")
    if configured is None:
        return {name: {} for name in DEFAULT_WORKLOAD_ATTESTORS}
    if not configured:
        raise section.error("workload_attestors", "switches every workload attestor off: no workload could be "
                                                  "attested (leave the key out for the defaults)")
    return configured


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", bool: "a boolean", str: "a string"}.get(
        type(value), type(value).__name__
    )


def _parse_pcrs(section: _Section, key: str, default: str) -> tuple[str, tuple[int, ...]]:
    """``sha256:0-7`` or ``sha256:0,1,2,7`` -> ("sha256", (0, 1, 2, 7))."""
    text = section.string(key, default)
    bank, _, indices_text = text.partition(":")
    if bank not in ("sha1", "sha256", "sha384", "sha512") or not indices_text:
        raise section.error(key, f"expected BANK:INDICES such as sha256:0-7, got {text!r}")
    indices: set[int] = set()
    try:
        for part in indices_text.split(","):
            low, dash, high = part.partition("-")
            first, last = int(low), int(high) if dash else int(low)
            if last < first:
                raise ValueError(part)
            indices.update(range(first, last + 1))
    except ValueError:
        raise section.error(key, f"expected BANK:INDICES such as sha256:0-7, got {text!r}") from None
    if not indices or min(indices) < 0 or max(indices) > 23:
        raise section.error(key, "PCR indices must be between 0 and 23")
    return bank, tuple(sorted(indices))


def _parse_tpm(section: _Section) -> TpmConfig:
    tcti = section.string("tcti", "device:/dev/tpmrm0")
    ek = cast(EkType, section.choice("ek", get_args(EkType), "rsa2048"))
    return TpmConfig(tcti=tcti, ek=ek, unreachable_limit=section.duration("unreachable_limit", "60s"))


def _parse_agent(section: _Section) -> AgentConfig:
    state_dir = section.path_value("state_dir", "/var/lib/vouchd/agent")
    agent = AgentConfig(
        state_dir=state_dir,
        socket_path=section.path_value("socket_path", "/run/vouchd/agent.sock"),
        admin_socket_path=section.path_value("admin_socket_path", "/run/vouchd/admin.sock"),
        tpm=_parse_tpm(section.section("tpm", _TPM_KEYS)),
        event_log_path=section.optional_path("event_log"),
        workload_attestors=_workload_attestors(section),
        attestation_deadline=section.duration("attestation_deadline", "5s"),
        attestation_interval=section.duration("attestation_interval", "60s"),
    )
    return agent


def _parse_authority(section: _Section) -> AuthorityConfig:
    state_dir = section.path_value("state_dir", "/var/lib/vouchd/authority")
    ek = section.section("ek_trust", _EK_TRUST_KEYS)
    roots = ek.path_list("roots")
    intermediates = ek.path_list("intermediates")
    enrolment = cast(EnrolmentMode, ek.choice("enrolment", get_args(EnrolmentMode), "allowlist"))
    enrolled = frozenset(h.lower() for h in ek.string_list("enrolled"))
    for digest in enrolled:
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ek.error("enrolled", f"expected sha256 hex EK hashes, got {digest[:80]!r}")
    bank, indices = _parse_pcrs(section, "pcr_selection", "sha256:0-7")
    authority = AuthorityConfig(
        state_dir=state_dir,
        ek_roots=roots,
        ek_intermediates=intermediates,
        enrolment=enrolment,
        enrolled_ek_hashes=enrolled,
        pcr_bank=bank,
        pcr_indices=indices,
        accept_missing_event_log=section.boolean("accept_missing_event_log", False),
        ca_ttl=section.duration("ca_ttl", "30d"),
        node_svid_ttl=section.duration("node_svid_ttl", "1h"),
        x509_svid_ttl=section.duration("x509_svid_ttl", "1h"),
        x509_svid_max_ttl=section.duration("x509_svid_max_ttl", "24h"),
        jwt_svid_ttl=section.duration("jwt_svid_ttl", "5m"),
        jwt_svid_max_ttl=section.duration("jwt_svid_max_ttl", "1h"),
    )
    for kind in ("x509", "jwt"):
        ttl, cap = getattr(authority, f"{kind}_svid_ttl"), getattr(authority, f"{kind}_svid_max_ttl")
        if ttl > cap:
            raise section.error(f"{kind}_svid_ttl", f"must not exceed {kind}_svid_max_ttl "
                                                    f"({format_duration(ttl)} > {format_duration(cap)})")
    return authority


def _parse_selectors(section: _Section, key: str, schema: SelectorSchema) -> frozenset[Selector]:
    selectors = set()
    for index, text in enumerate(section.string_list(key)):
        try:
            selector = Selector.parse(text)
        except InvalidSelectorError as err:
            raise section.error(f"{key}[{index}]", str(err)) from None
        # Here, before the entry's rules: a misspelt anchor is named as a typo, not as a missing anchor.
        problem = schema.problem(selector)
        if problem is not None:
            raise section.error(f"{key}[{index}]", problem)
        selectors.add(selector)
    return frozenset(selectors)


def _parse_spiffe_id(section: _Section, key: str, text: str) -> SpiffeId:
    try:
        return SpiffeId.parse(text)
    except SpiffeError as err:
        raise section.error(key, str(err)) from None


def _parse_entry(section: _Section, trust_domain: TrustDomain, workload_schema: SelectorSchema,
                 authority: AuthorityConfig | None) -> Entry:
    spiffe_id = _parse_spiffe_id(section, "spiffe_id", section.string("spiffe_id"))
    if not spiffe_id.is_member_of(trust_domain):
        raise section.error("spiffe_id", f"must be in the trust domain {trust_domain}")
    selectors = _parse_selectors(section, "selectors", workload_schema)
    parent_text = section.optional_string("parent")
    parent = None if parent_text is None else _parse_spiffe_id(section, "parent", parent_text)
    node_selectors = _parse_selectors(section, "node_selectors", NODE_SELECTOR_SCHEMA)
    tier_text = section.choice("min_tier", tuple(t.value for t in TrustTier), TrustTier.HARDWARE.value)
    try:
        entry = Entry(
            id=section.string("id", default_entry_id(spiffe_id, selectors)),
            spiffe_id=spiffe_id,
            selectors=selectors,
            parent=parent,
            node_selectors=node_selectors,
            min_tier=TrustTier(tier_text),
            x509_ttl=section.optional_duration("x509_ttl"),
            jwt_ttl=section.optional_duration("jwt_ttl"),
            dns_names=tuple(section.string_list("dns_names")),
            hint=section.optional_string("hint") or "",
            labels=Entry.label_pairs(section.string_mapping("labels")),
        )
    except InvalidEntryError as err:
        raise section.error(err.field, err.reason) from None
    for kind in ("x509", "jwt"):
        ttl = getattr(entry, f"{kind}_ttl")
        cap = getattr(authority, f"{kind}_svid_max_ttl") if authority is not None else None
        if ttl is not None and cap is not None and ttl > cap:
            raise section.error(f"{kind}_ttl", f"must not exceed authority.{kind}_svid_max_ttl "
                                               f"({format_duration(ttl)} > {format_duration(cap)})")
    return entry


def _workload_selector_schema(source: Path, agent: AgentConfig | None,
                              factories: Mapping[str, WorkloadAttestorFactory] | None) -> SelectorSchema:
    """What the file's agent enables, or, without an agent section, anything installed here produces."""
    # Imported here, not at the top: the catalog imports every attestor (and may import plugins),
    # which a file without entries never needs.
    from vouchd.attestors.catalog import all_known_selector_schema, selector_schema
    from vouchd.attestors.errors import CatalogError

    try:
        if agent is None:
            return all_known_selector_schema(factories=factories)
        return selector_schema(agent.workload_attestors, factories=factories)
    except CatalogError as err:
        key = "agent.workload_attestors" if agent is not None else "entries"
        raise ConfigError(f"{source}: {key}: {err}") from None


def _parse_entries(top: _Section, trust_domain: TrustDomain, agent: AgentConfig | None,
                   authority: AuthorityConfig | None,
                   factories: Mapping[str, WorkloadAttestorFactory] | None) -> tuple[Entry, ...]:
    entries: dict[str, Entry] = {}
    workload_schema: SelectorSchema | None = None
    for section in top.sections("entries", _ENTRY_KEYS):
        if workload_schema is None:  # built once, and only for a file that has entries
            workload_schema = _workload_selector_schema(top.source, agent, factories)
        entry = _parse_entry(section, trust_domain, workload_schema, authority)
        existing = entries.get(entry.id)
        # An entry listed twice (e.g. the example's "current user" entry when root runs it) is one entry.
        if existing is not None and existing != entry:
            raise section.error("id", f"entry id {entry.id!r} is already used by a different entry")
        entries[entry.id] = entry
    return tuple(entries.values())


class _DuplicateKeyError(Exception):
    def __init__(self, key: object, line: int) -> None:
        super().__init__(key, line)
        self.key = key
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader refusing a key given twice in one mapping, which YAML forbids and PyYAML lets the last win.

    Keys merged in with `<<: *anchor` may be overridden: that is what merging is for.
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                if key in seen:
                    raise _DuplicateKeyError(key, key_node.start_mark.line + 1)
                seen.add(key)
            except TypeError:
                continue  # an unhashable key: SafeLoader itself refuses it below
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, source: Path) -> object:
    loader = _UniqueKeyLoader(text)
    try:
        return loader.get_single_data()
    except _DuplicateKeyError as err:
        # The key, never its values: a configuration may hold secrets.
        raise ConfigError(f"{source}: duplicate key {str(err.key)[:80]!r} at line {err.line}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None)  # the parser's words, never the offending text itself
        raise ConfigError(f"{source}: not valid YAML{where}" + (f": {problem}" if problem else "")) from None
    finally:
        loader.dispose()


def parse_config(text: str, source: Path, environ: Mapping[str, str] | None = None, *,
                 attestor_factories: Mapping[str, WorkloadAttestorFactory] | None = None) -> Config:
    """Parse configuration text; ``source`` names the file in errors and anchors relative paths.

    `attestor_factories` are the workload attestors whose selectors entries may use (default: the
    built-ins and the installed plugins, vouchd.attestors.catalog.workload_attestor_factories()).
    """
    source = source.resolve()
    data = _load_yaml(text, source)
    top = _Section(source, "", data, os.environ if environ is None else environ, _TOP_KEYS)
    try:
        trust_domain = TrustDomain.parse(top.string("trust_domain"))
    except SpiffeError as err:
        raise top.error("trust_domain", str(err)) from None
    agent = _parse_agent(top.section("agent", _AGENT_KEYS)) if top.has("agent") else None
    authority = _parse_authority(top.section("authority", _AUTHORITY_KEYS)) if top.has("authority") else None
    entries = _parse_entries(top, trust_domain, agent, authority, attestor_factories)
    log_level = top.choice("log_level", ("debug", "info", "warning", "error"), "info")
    return Config(source=source, trust_domain=trust_domain, agent=agent, authority=authority,
                  entries=entries, log_level=log_level)


def load_config(path: Path, environ: Mapping[str, str] | None = None, *,
                attestor_factories: Mapping[str, WorkloadAttestorFactory] | None = None) -> Config:
    """Read and parse a configuration file (see parse_config)."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read configuration: {err.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: configuration is not UTF-8 text") from None
    return parse_config(text, path, environ, attestor_factories=attestor_factories)
