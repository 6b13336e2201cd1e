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
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Literal, cast, get_args

from vouchd.agentconfig import (
    AGENT_KEYS,
    POLICY_KEYS,
    AgentConfig,
    AuditConfig,
    EkType,
    MetricsConfig,
    PolicyConfig,
    SavedStateConfig,
    TpmConfig,
    parse_agent,
    parse_policy,
)
from vouchd.configfile import ConfigSection, format_duration, load_yaml, parse_duration
from vouchd.entries import Entry, InvalidEntryError, default_entry_id
from vouchd.entry_rules import NODE_SELECTOR_SCHEMA
from vouchd.errors import ConfigError
from vouchd.fleetconfig import BROKER_KEYS, BrokerConfig, parse_broker
from vouchd.selectors import InvalidSelectorError, Selector, SelectorSchema
from vouchd.spiffe import SpiffeError, SpiffeId, TrustDomain, TrustTier

if TYPE_CHECKING:
    from vouchd.attestors.catalog import WorkloadAttestorFactory

__all__ = [
    "AgentConfig",
    "AuditConfig",
    "AuthorityConfig",
    "Config",
    "EkType",
    "EnrolmentMode",
    "MetricsConfig",
    "PolicyConfig",
    "SavedStateConfig",
    "StoreConfig",
    "StoreKind",
    "TpmConfig",
    "format_duration",
    "load_config",
    "parse_config",
    "parse_duration",
]

EnrolmentMode = Literal["allowlist", "approve", "any-genuine"]
StoreKind = Literal["sqlite", "postgres"]



@dataclass(frozen=True)
class StoreConfig:
    """Where the authority keeps its state (`authority.store`): SQLite, authority.db in its state_dir;
    or PostgreSQL, one database that several authority replicas share, whose connection string is
    read at start from `dsn_file` (it holds a password: a file only its owner may read)."""

    kind: StoreKind = "sqlite"
    dsn_file: Path | None = None


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
    store: StoreConfig = field(default_factory=StoreConfig)
    # `vouchd server` only: its broker (replicas share requests), admin socket and policy
    broker: BrokerConfig | None = None
    admin_socket_path: Path = Path("/run/vouchd-server/admin.sock")
    policy: PolicyConfig = field(default_factory=PolicyConfig)


@dataclass(frozen=True)
class Config:
    source: Path
    trust_domain: TrustDomain
    agent: AgentConfig | None
    authority: AuthorityConfig | None
    entries: tuple[Entry, ...] = field(default=())
    log_level: str = "info"


# The keys each section may hold. Checked when a section is opened, before any value is read, so a
# misspelt key ("selector:") is reported as such, not as the required key it was meant to be.
_TOP_KEYS = ("trust_domain", "agent", "authority", "entries", "log_level")
_AUTHORITY_KEYS = ("state_dir", "ek_trust", "pcr_selection", "accept_missing_event_log", "ca_ttl", "node_svid_ttl",
                   "x509_svid_ttl", "x509_svid_max_ttl", "jwt_svid_ttl", "jwt_svid_max_ttl", "store", "broker",
                   "admin_socket_path", "policy")
_EK_TRUST_KEYS = ("roots", "intermediates", "enrolment", "enrolled")
_STORE_KEYS = ("kind", "dsn_file")
_ENTRY_KEYS = ("id", "spiffe_id", "selectors", "parent", "node_selectors", "min_tier", "x509_ttl", "jwt_ttl",
               "dns_names", "hint", "labels")


def _parse_pcrs(section: ConfigSection, key: str, default: str) -> tuple[str, tuple[int, ...]]:
    """``sha256:0-7`` or ``sha256:0,1,2,7`` -> ("sha256", (0, 1, 2, 7))."""
    text = section.string(key, default)
    bank, _, indices_text = text.partition(":")
    if bank == "sha1":
        # Event-log profiles trust digests: in a collision-broken bank two different events can share one.
        raise section.error(key, f"the sha1 PCR bank is refused: sha1 is collision-broken; use sha256 "
                                 f"(e.g. sha256:{indices_text or '0-7'}), got {text!r}")
    if bank not in ("sha256", "sha384", "sha512") or not indices_text:
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


def _parse_authority(section: ConfigSection) -> AuthorityConfig:
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
        store=_parse_store(section.section("store", _STORE_KEYS)),
        broker=(parse_broker(section.section("broker", BROKER_KEYS), replica=True) if section.has("broker")
                else None),
        admin_socket_path=section.path_value("admin_socket_path", "/run/vouchd-server/admin.sock"),
        policy=parse_policy(section.section("policy", POLICY_KEYS)),
    )
    for kind in ("x509", "jwt"):
        ttl, cap = getattr(authority, f"{kind}_svid_ttl"), getattr(authority, f"{kind}_svid_max_ttl")
        if ttl > cap:
            raise section.error(f"{kind}_svid_ttl", f"must not exceed {kind}_svid_max_ttl "
                                                    f"({format_duration(ttl)} > {format_duration(cap)})")
    return authority


def _parse_store(section: ConfigSection) -> StoreConfig:
    kind = cast(StoreKind, section.choice("kind", get_args(StoreKind), "sqlite"))
    dsn_file = section.optional_path("dsn_file")
    if kind == "postgres" and dsn_file is None:
        raise section.error("dsn_file", "is required with kind postgres: a file, readable by its owner only, "
                                        "holding the PostgreSQL connection string")
    if kind == "sqlite" and dsn_file is not None:
        raise section.error("dsn_file", "is only for kind postgres (SQLite keeps authority.db in state_dir)")
    return StoreConfig(kind=kind, dsn_file=dsn_file)


def _parse_selectors(section: ConfigSection, key: str, schema: SelectorSchema) -> frozenset[Selector]:
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


def _parse_spiffe_id(section: ConfigSection, key: str, text: str) -> SpiffeId:
    try:
        return SpiffeId.parse(text)
    except SpiffeError as err:
        raise section.error(key, str(err)) from None


def _parse_entry(section: ConfigSection, trust_domain: TrustDomain, workload_schema: SelectorSchema,
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


def _parse_entries(top: ConfigSection, trust_domain: TrustDomain, agent: AgentConfig | None,
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


def parse_config(text: str, source: Path, environ: Mapping[str, str] | None = None, *,
                 attestor_factories: Mapping[str, WorkloadAttestorFactory] | None = None) -> Config:
    """Parse configuration text; ``source`` names the file in errors and anchors relative paths.

    `attestor_factories` are the workload attestors whose selectors entries may use (default: the
    built-ins and the installed plugins, vouchd.attestors.catalog.workload_attestor_factories()).
    """
    source = source.resolve()
    data = load_yaml(text, source)
    top = ConfigSection(source, "", data, os.environ if environ is None else environ, _TOP_KEYS)
    try:
        trust_domain = TrustDomain.parse(top.string("trust_domain"))
    except SpiffeError as err:
        raise top.error("trust_domain", str(err)) from None
    agent = parse_agent(top.section("agent", AGENT_KEYS)) if top.has("agent") else None
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
