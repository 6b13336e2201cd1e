"""The fleet's configuration: how an agent and a `vouchd server` reach the MQTT broker.

    agent:
      fleet:
        broker: {host: mqtt.example.org, port: 8883, tls: {ca_file: ..., cert_file: ..., key_file: ...}}
        trust_bundle: /etc/vouchd/bundle.pem     # the trust domain's roots (`vouchd bundle show`)
    authority:
      broker: {host: ..., port: ..., tls: {...}, share_group: <secret>, client_id: authority-1}
      admin_socket_path: /run/vouchd-server/admin.sock
      policy: {files: [...], audiences: {...}}

Parsed into frozen dataclasses like the rest of the configuration (vouchd.config uses these).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vouchd.configfile import ConfigSection

__all__ = [
    "BROKER_KEYS",
    "FLEET_KEYS",
    "BrokerConfig",
    "BrokerTlsConfig",
    "FleetLinkConfig",
    "parse_broker",
    "parse_fleet_link",
]

BROKER_KEYS = ("host", "port", "tls", "username", "password_file", "client_id", "share_group")
_TLS_KEYS = ("ca_file", "cert_file", "key_file")
FLEET_KEYS = ("broker", "trust_bundle")
# A topic level chosen by the operator: no '/', '+', '#', and short.
_SHARE_GROUP = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class BrokerTlsConfig:
    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None


@dataclass(frozen=True)
class BrokerConfig:
    host: str
    port: int
    tls: BrokerTlsConfig | None = None
    username: str | None = None
    password_file: Path | None = None   # read from a root-only file: never in the configuration itself
    client_id: str | None = None
    share_group: str = "authority"      # replicas only; keep it secret where nodes share the broker


@dataclass(frozen=True)
class FleetLinkConfig:
    """An agent in fleet mode: the broker, and the roots its authority's replies must chain to."""

    broker: BrokerConfig
    trust_bundle: Path


def parse_broker(section: ConfigSection, *, replica: bool) -> BrokerConfig:
    """`replica`: the authority's side, which may name a share group; an agent's may not."""
    if not replica and section.has("share_group"):
        raise section.error("share_group", "only a vouchd server (authority.broker) takes part in a share group")
    tls = None
    if section.has("tls"):
        tls_section = section.section("tls", _TLS_KEYS)
        cert, key = tls_section.optional_path("cert_file"), tls_section.optional_path("key_file")
        if (cert is None) != (key is None):
            raise tls_section.error("cert_file" if cert is None else "key_file",
                                    "cert_file and key_file go together (a client certificate and its key)")
        tls = BrokerTlsConfig(ca_file=tls_section.path_value("ca_file"), cert_file=cert, key_file=key)
    share_group = section.string("share_group", "authority")
    if not _SHARE_GROUP.fullmatch(share_group):
        raise section.error("share_group", "1 to 64 letters, digits, '.', '_' or '-'")
    username = section.string("username", "") or None
    password_file = section.optional_path("password_file")
    if password_file is not None and username is None:
        raise section.error("password_file", "a password goes with a username")
    return BrokerConfig(host=section.string("host"), port=section.integer("port", 1883, minimum=1, maximum=65535),
                        tls=tls, username=username, password_file=password_file,
                        client_id=section.string("client_id", "") or None, share_group=share_group)


def parse_fleet_link(section: ConfigSection) -> FleetLinkConfig:
    return FleetLinkConfig(broker=parse_broker(section.section("broker", BROKER_KEYS), replica=False),
                           trust_bundle=section.path_value("trust_bundle"))
