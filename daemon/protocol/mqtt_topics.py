"""Where vouchd's topics live on an MQTT broker (DESIGN §10, docs/protocol.md "The bus").

The protocol's topics (vouchd.protocol.transport) name a node by its SPIFFE ID
(`nodes/spiffe://example.org/vouchd/node/tpm/<EK hash>/events`), which holds slashes. On the bus
every topic sits under `vouchd/v1/<trust domain>/` and a node is one topic level, its node key:

    spiffe://<td>/vouchd/node/<kind>/<id>   ->   <kind>-<id>, cut to 64 characters

`tpm-<the first 60 hex digits of the EK hash>`, `key-<…of the node key hash>`, `join-<token id>`.
64 characters is the longest X.509 commonName, so a broker can read the node key from the node's
client certificate (mosquitto's `use_identity_as_username`) and its ACL can give each node its own
topics. 240 bits of a SHA-256 still take 2^120 work to collide, and a node cannot choose its EK.
The mapping is fixed by the node ID alone: the agent, the authority and the CA compute the same key.
"""

from __future__ import annotations

import re

from vouchd.protocol.transport import REQUEST_TOPICS, RETAINED_TOPICS
from vouchd.spiffe import InvalidSpiffeIdError, SpiffeId, TrustDomain

__all__ = ["NODE_KEY_MAX_LENGTH", "TOPIC_ROOT", "BusTopics", "node_key"]

TOPIC_ROOT = "vouchd/v1"
NODE_KEY_MAX_LENGTH = 64
_NODES = "nodes/"
_EVENTS = "/events"
_REPLIES = "resp"
_KIND = re.compile(r"[a-z]{1,16}")


def node_key(node_id: str) -> str:
    """The node's single topic level, `<kind>-<id>` (see the module's text); ValueError for anything
    that is not a vouchd node ID (`spiffe://<td>/vouchd/node/<kind>/<id>`)."""
    try:
        spiffe_id = SpiffeId.parse(node_id)
    except InvalidSpiffeIdError as err:
        raise ValueError(f"not a node id: {err}") from None
    segments = spiffe_id.path.split("/")
    # "", "vouchd", "node", kind, id: SPIFFE path segments hold only letters, digits, ".", "_", "-",
    # so the key never holds "/", "+", "#" or a leading "$".
    if len(segments) != 5 or segments[1:3] != ["vouchd", "node"] or not _KIND.fullmatch(segments[3]):
        raise ValueError(f"not a node id: {node_id[:80]!r} is not spiffe://<td>/vouchd/node/<kind>/<id>")
    return f"{segments[3]}-{segments[4]}"[:NODE_KEY_MAX_LENGTH]


class BusTopics:
    """One trust domain's topics on the bus, and the mapping from the protocol's topic names."""

    def __init__(self, trust_domain: str) -> None:
        try:
            self.trust_domain = TrustDomain.parse(trust_domain)
        except InvalidSpiffeIdError as err:
            raise ValueError(str(err)) from None
        self.prefix = f"{TOPIC_ROOT}/{self.trust_domain.name}/"

    def node_key(self, node_id: str) -> str:
        """node_key(), for a node of this trust domain only (ValueError otherwise)."""
        key = node_key(node_id)
        if SpiffeId.parse(node_id).trust_domain != self.trust_domain:
            raise ValueError(f"node id {node_id[:80]!r} is not in the trust domain {self.trust_domain}")
        return key

    def request(self, topic: str) -> str:
        """The bus topic of an agent -> authority request topic (`authority/attest`, `authority/request`)."""
        if topic not in REQUEST_TOPICS:
            raise ValueError(f"{topic[:80]!r} is not a request topic ({', '.join(sorted(REQUEST_TOPICS))})")
        return self.prefix + topic

    def shared_request(self, topic: str, group: str) -> str:
        """The shared subscription every authority replica of `group` takes on a request topic:
        the broker hands each request to one of them."""
        if not group or any(c in group for c in "/+#"):
            raise ValueError(f"share group {group!r} must be one topic level")
        return f"$share/{group}/{self.request(topic)}"

    def replies(self, node_id: str) -> str:
        """Where the authority answers the node `node_id`: `nodes/<node key>/resp`."""
        return f"{self.prefix}{_NODES}{self.node_key(node_id)}/{_REPLIES}"

    def publication(self, topic: str) -> str:
        """The bus topic of a publication: `revocations`, `bundle` or `nodes/<node id>/events`."""
        if topic in RETAINED_TOPICS:
            return self.prefix + topic
        if topic.startswith(_NODES) and topic.endswith(_EVENTS):
            node_id = topic[len(_NODES):-len(_EVENTS)]
            return f"{self.prefix}{_NODES}{self.node_key(node_id)}{_EVENTS}"
        raise ValueError(f"{topic[:120]!r} is not a publication topic")

    @staticmethod
    def retained(topic: str) -> bool:
        """Whether the broker keeps the last publication of this protocol topic for later subscribers."""
        return topic in RETAINED_TOPICS
