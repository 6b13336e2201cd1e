"""The `agent` section of the configuration (vouchd.config parses the whole file and uses this).

Also the `policy` subsection, which a `vouchd server`'s `authority` section shares.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Literal, cast, get_args

from vouchd.configfile import ConfigSection
from vouchd.fleetconfig import FLEET_KEYS, FleetLinkConfig, parse_fleet_link
from vouchd.spiffe import TrustTier

__all__ = [
    "AGENT_KEYS",
    "DEFAULT_WORKLOAD_ATTESTORS",
    "POLICY_KEYS",
    "AgentConfig",
    "AuditConfig",
    "EkType",
    "MetricsConfig",
    "PolicyConfig",
    "SavedStateConfig",
    "TpmConfig",
    "parse_agent",
    "parse_policy",
]

EkType = Literal["rsa2048", "ecc-p256", "ecc-p384"]


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





AGENT_KEYS = ("state_dir", "socket_path", "admin_socket_path", "tier", "tpm", "event_log", "workload_attestors",
               "attestation_deadline", "attestation_interval", "audit", "policy", "metrics", "saved_state",
               "join_token_file", "fleet")
_SAVED_STATE_KEYS = ("enabled", "extra_pcrs")
_TPM_KEYS = ("tcti", "ek", "unreachable_limit", "endorsement_auth_file", "owner_auth_file")
_AUDIT_KEYS = ("dir", "anchor_every", "anchor_interval", "max_file_bytes")
POLICY_KEYS = ("files", "include_defaults", "audiences")
_METRICS_KEYS = ("listen",)

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



def _parse_tpm(section: ConfigSection) -> TpmConfig:
    tcti = section.string("tcti", "device:/dev/tpmrm0")
    ek = cast(EkType, section.choice("ek", get_args(EkType), "rsa2048"))
    return TpmConfig(tcti=tcti, ek=ek, unreachable_limit=section.duration("unreachable_limit", "60s"),
                     endorsement_auth_file=section.optional_path("endorsement_auth_file"),
                     owner_auth_file=section.optional_path("owner_auth_file"))


def parse_agent(section: ConfigSection) -> AgentConfig:
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
        policy=parse_policy(section.section("policy", POLICY_KEYS)),
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


def parse_policy(section: ConfigSection) -> PolicyConfig:
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
