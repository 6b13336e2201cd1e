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

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

from vouchd.configfile import ConfigSection, format_duration, load_yaml, parse_duration
from vouchd.entries import Entry, InvalidEntryError, default_entry_id
from vouchd.entry_rules import NODE_SELECTOR_SCHEMA
from vouchd.errors import ConfigError
from vouchd.fleetconfig import BROKER_KEYS, FLEET_KEYS, BrokerConfig, FleetLinkConfig, parse_broker, parse_fleet_link
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

EkType = Literal["rsa2048", "ecc-p256", "ecc-p384"]
EnrolmentMode = Literal["allowlist", "approve", "any-genuine"]



@dataclass(frozen=True)
class TpmConfig:
    tcti: str
    ek: EkType = "rsa2048"
    # How long the TPM may stay unreachable before the agent exits non-zero (so that systemd's
    # Restart=on-failure takes over); meanwhile it serves what it holds and issues nothing.
    unreachable_limit: timedelta = timedelta(seconds=60)
    # Files holding the endorsement and owner hierarchy authorizations (vouchd.tpm.hierarchies), read
    # by the agent at start; None: the empty authorization a TPM ships with.
    endorsement_auth_file: Path | None = None
    owner_auth_file: Path | None = None


@dataclass(frozen=True)
class AuditConfig:
    """The agent's audit log (docs/design.md §9)."""

    directory: Path
    anchor_every: int = 1000                                # records between TPM-quoted anchors, at most
    anchor_interval: timedelta = timedelta(seconds=60)      # time between anchors, at most
    max_file_bytes: int = 64 * 1024 * 1024                  # a file this large is closed and the next begun


@dataclass(frozen=True)
class PolicyConfig:
    """Request-time policy (docs/design.md §7): Cedar files, and which audiences are low-risk."""

    files: tuple[Path, ...] = ()                            # files or folders of *.cedar, after the defaults
    include_defaults: bool = True                           # the shipped default policy set first
    audiences: Mapping[str, str] = field(default_factory=dict)  # audience -> "low" | "high"


@dataclass(frozen=True)
class MetricsConfig:
    """Prometheus metrics (docs/operations.md#metrics): off unless `listen` is given; loopback only."""

    listen: tuple[str, int] | None = None                   # (loopback IP address, port)


@dataclass(frozen=True)
class SavedStateConfig:
    """What the agent keeps across a restart (agent/savedstate.py), sealed to the boot's PCRs."""

    enabled: bool = True
    # PCRs of the attested bank to seal to besides those the node attests with (e.g. 8 and 9, where
    # a boot loader measures the kernel and its command line).
    extra_pcrs: tuple[int, ...] = ()


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
    audit: AuditConfig
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    # hardware: the TPM proves the node. static-secret: a host without a TPM, proven by a key file in
    # <state_dir>/node; its workloads get only what that tier allows (docs/design.md §4.5). Never
    # chosen on the agent's own: a TPM that fails must not quietly lower the node's tier.
    tier: TrustTier = TrustTier.HARDWARE
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    # static-secret tier, fleet mode: a root-only file holding the join token the node key joins with
    join_token_file: Path | None = None
    # fleet mode (`vouchd agent` without --standalone): the broker and the trust domain's roots
    fleet: FleetLinkConfig | None = None
    saved_state: SavedStateConfig = field(default_factory=SavedStateConfig)


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
_AGENT_KEYS = ("state_dir", "socket_path", "admin_socket_path", "tier", "tpm", "event_log", "workload_attestors",
               "attestation_deadline", "attestation_interval", "audit", "policy", "metrics", "saved_state",
               "join_token_file", "fleet")
_SAVED_STATE_KEYS = ("enabled", "extra_pcrs")
_TPM_KEYS = ("tcti", "ek", "unreachable_limit", "endorsement_auth_file", "owner_auth_file")
_AUDIT_KEYS = ("dir", "anchor_every", "anchor_interval", "max_file_bytes")
_POLICY_KEYS = ("files", "include_defaults", "audiences")
_METRICS_KEYS = ("listen",)
_AUTHORITY_KEYS = ("state_dir", "ek_trust", "pcr_selection", "accept_missing_event_log", "ca_ttl", "node_svid_ttl",
                   "x509_svid_ttl", "x509_svid_max_ttl", "jwt_svid_ttl", "jwt_svid_max_ttl", "store", "broker",
                   "admin_socket_path", "policy")
_EK_TRUST_KEYS = ("roots", "intermediates", "enrolment", "enrolled")
_STORE_KEYS = ("kind", "dsn_file")
_ENTRY_KEYS = ("id", "spiffe_id", "selectors", "parent", "node_selectors", "min_tier", "x509_ttl", "jwt_ttl",
               "dns_names", "hint", "labels")


# What an agent runs when its file names no workload attestors: every built-in one.
DEFAULT_WORKLOAD_ATTESTORS = ("unix", "interpreter", "systemd", "container", "lineage")


def _workload_attestors(section: ConfigSection) -> dict[str, dict[str, Any]]:
    configured = section.free_mapping("workload_attestors")
    if configured is None:
        return {name: {} for name in DEFAULT_WORKLOAD_ATTESTORS}
    if not configured:
        raise section.error("workload_attestors", "switches every workload attestor off: no workload could be "
                                                  "attested (leave the key out for the defaults)")
    return configured


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


def _parse_tpm(section: ConfigSection) -> TpmConfig:
    tcti = section.string("tcti", "device:/dev/tpmrm0")
    ek = cast(EkType, section.choice("ek", get_args(EkType), "rsa2048"))
    return TpmConfig(tcti=tcti, ek=ek, unreachable_limit=section.duration("unreachable_limit", "60s"),
                     endorsement_auth_file=section.optional_path("endorsement_auth_file"),
                     owner_auth_file=section.optional_path("owner_auth_file"))


def _parse_agent(section: ConfigSection) -> AgentConfig:
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
        audit=_parse_audit(section.section("audit", _AUDIT_KEYS), state_dir),
        policy=_parse_policy(section.section("policy", _POLICY_KEYS)),
        tier=TrustTier(section.choice("tier", tuple(tier.value for tier in TrustTier), TrustTier.HARDWARE.value)),
        metrics=(_parse_metrics(section.section("metrics", _METRICS_KEYS)) if section.has("metrics")
                 else MetricsConfig()),
        saved_state=_parse_saved_state(section.section("saved_state", _SAVED_STATE_KEYS)),
        join_token_file=section.optional_path("join_token_file"),
        fleet=parse_fleet_link(section.section("fleet", FLEET_KEYS)) if section.has("fleet") else None,
    )
    return agent


def _parse_saved_state(section: ConfigSection) -> SavedStateConfig:
    raw = section.string_list("extra_pcrs") if section.has("extra_pcrs") else []
    pcrs = []
    for text in raw:
        if not text.isdigit() or not 0 <= int(text) <= 23:
            raise section.error("extra_pcrs", f"expected PCR indices 0 to 23, got {text[:10]!r}")
        pcrs.append(int(text))
    return SavedStateConfig(enabled=section.boolean("enabled", True), extra_pcrs=tuple(sorted(set(pcrs))))


def _parse_metrics(section: ConfigSection) -> MetricsConfig:
    """`listen: "127.0.0.1:9464"` (or `"[::1]:9464"`): an IP literal, as a name could resolve elsewhere."""
    text = section.string("listen")
    host, _, port_text = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        host = ""  # an IPv6 address must be bracketed, or its last group reads as the port
    try:
        address = ipaddress.ip_address(host)
        port = int(port_text)
        if not 1 <= port <= 65535:
            raise ValueError(port_text)
    except ValueError:
        raise section.error("listen", f"expected a loopback IP address and a port such as 127.0.0.1:9464 "
                                      f"or [::1]:9464, got {text[:80]!r}") from None
    if not address.is_loopback:
        raise section.error("listen", f"{address} is not a loopback address: metrics are served on this host "
                                      "only (127.0.0.1 or ::1); let a local Prometheus or a proxy scrape them")
    return MetricsConfig(listen=(str(address), port))


def _parse_policy(section: ConfigSection) -> PolicyConfig:
    audiences = section.string_mapping("audiences")
    for audience, risk in audiences.items():
        if risk not in ("low", "high"):
            raise section.error(f"audiences.{audience[:80]}", f"expected low or high, got {risk[:40]!r}")
    return PolicyConfig(files=section.path_list("files"), include_defaults=section.boolean("include_defaults", True),
                        audiences=audiences)


def _parse_audit(section: ConfigSection, state_dir: Path) -> AuditConfig:
    interval = section.duration("anchor_interval", "60s")
    if interval < timedelta(seconds=1):
        raise section.error("anchor_interval", "must be at least 1s: every anchor is a TPM quote")
    return AuditConfig(
        directory=section.optional_path("dir") or state_dir / "audit",
        anchor_every=section.integer("anchor_every", 1000, minimum=1),
        anchor_interval=interval,
        max_file_bytes=section.integer("max_file_bytes", 64 * 1024 * 1024, minimum=64 * 1024),
    )


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
        policy=_parse_policy(section.section("policy", _POLICY_KEYS)),
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
