"""Fleet mode, the agent's side: its link to the authority through the MQTT broker (DESIGN §1, §10).

The one place that wires the agent to vouchd.protocol.mqtt, above both (cli -> agent | fleet): the
connector the agent opens once it knows its node (the EK, or the static-secret node key) hands it a
transport whose replies come on this node's topic only, the publications of the authority, and the
trust domain's roots from `agent.fleet.trust_bundle`, which every reply must chain to (there is no
insecure bootstrap: the operator copies the bundle from `vouchd bundle show` on the server).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from vouchd.agent.agent import AuthorityConnector, AuthorityLink, LocalNode
from vouchd.config import Config
from vouchd.errors import ConfigError
from vouchd.evidence import TpmPublic
from vouchd.fleetconfig import BrokerConfig
from vouchd.protocol.identities import ek_hash, key_node_spiffe_id, node_spiffe_id
from vouchd.protocol.keyproof import node_key_hash
from vouchd.protocol.mqtt import BrokerTls, MqttAuthorityLink
from vouchd.securefiles import read_private
from vouchd.spiffe import SpiffeError, TrustDomain, X509Bundle

__all__ = ["broker_password", "broker_tls", "fleet_connector", "local_node_id"]


def local_node_id(trust_domain: TrustDomain, node: LocalNode) -> str:
    if node.ek is not None:
        return str(node_spiffe_id(trust_domain, ek_hash(TpmPublic.from_tpm2b(node.ek.public))))
    if node.node_key_public is not None:
        return str(key_node_spiffe_id(trust_domain, node_key_hash(node.node_key_public)))
    raise ConfigError("the local node has neither a TPM nor a node key")


def broker_tls(broker: BrokerConfig) -> BrokerTls | None:
    if broker.tls is None:
        return None
    return BrokerTls(ca_file=broker.tls.ca_file, cert_file=broker.tls.cert_file, key_file=broker.tls.key_file)


def broker_password(broker: BrokerConfig, where: str) -> str | None:
    """The broker password from its root-only file; never logged, never in an error."""
    if broker.password_file is None:
        return None
    try:
        return read_private(broker.password_file).decode().rstrip("\n")
    except (OSError, UnicodeDecodeError) as err:
        reason = "not UTF-8 text" if isinstance(err, UnicodeDecodeError) else err.strerror or str(err)
        raise ConfigError(f"{broker.password_file}: cannot read the broker password ({where}.password_file): "
                          f"{reason}") from None


def _trust_bundle(trust_domain: TrustDomain, path: Path) -> X509Bundle:
    try:
        return X509Bundle.from_pem(trust_domain, path.read_bytes())
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the trust bundle (agent.fleet.trust_bundle): {err.strerror}") from None
    except SpiffeError as err:
        raise ConfigError(f"{path}: not a PEM bundle of {trust_domain} (agent.fleet.trust_bundle): {err}") from None


def fleet_connector(config: Config) -> AuthorityConnector:
    """A connector to the authority through the broker of `agent.fleet`."""
    agent = config.agent
    if agent is None or agent.fleet is None:
        raise ConfigError(f"{config.source}: agent.fleet is required without --standalone (the broker, and the "
                          "trust domain's bundle from `vouchd bundle show` on the server)")
    fleet = agent.fleet
    bundle = _trust_bundle(config.trust_domain, fleet.trust_bundle)
    password = broker_password(fleet.broker, "agent.fleet.broker")

    @contextlib.asynccontextmanager
    async def connect(node: LocalNode) -> AsyncIterator[AuthorityLink]:
        link = MqttAuthorityLink(fleet.broker.host, fleet.broker.port, trust_domain=str(config.trust_domain),
                                 node_id=local_node_id(config.trust_domain, node), client_id=fleet.broker.client_id,
                                 tls=broker_tls(fleet.broker), username=fleet.broker.username, password=password)
        async with link:
            yield AuthorityLink(mode="fleet", transport=link, events=link, initial_bundle=lambda: bundle)

    return connect
