"""vouchd over an MQTT 5 broker (fleet mode): what the agent and the authority wire up.

    agent:      MqttAuthorityLink(host, port, trust_domain=..., node_id=..., tls=BrokerTls(...))
                an AuthorityTransport and AuthorityEvents, as an async context manager
    authority:  MqttAuthorityService(host, port, trust_domain=..., share_group=<secret>, limits=ServiceLimits())
                a Publisher as an async context manager; await serve(authority.handle) takes requests

Topics, QoS, properties, limits and the broker's ACLs: docs/protocol.md, "The bus".
"""

from __future__ import annotations

from vouchd.protocol.mqtt_connection import BrokerTls
from vouchd.protocol.mqtt_link import NODE_PROPERTY, LinkStatus, MqttAuthorityLink
from vouchd.protocol.mqtt_service import MqttAuthorityService, ServiceLimits, ServiceStats
from vouchd.protocol.mqtt_topics import TOPIC_ROOT, BusTopics, node_key

__all__ = [
    "NODE_PROPERTY",
    "TOPIC_ROOT",
    "BrokerTls",
    "BusTopics",
    "LinkStatus",
    "MqttAuthorityLink",
    "MqttAuthorityService",
    "ServiceLimits",
    "ServiceStats",
    "node_key",
]
