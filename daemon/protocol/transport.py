"""How agent requests reach the authority, and how the authority's publications reach agents.

One protocol, two transports (DESIGN §1): MQTT through a broker in fleet mode (vouchd.protocol.mqtt:
MqttAuthorityLink on the agent, MqttAuthorityService on the authority), and the in-process
LocalTransport and LocalBus in standalone mode, which hand the same bytes to the authority and to
the agent. The logic on both ends never knows which one carries it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Protocol

from vouchd.protocol.errors import TransportError

__all__ = [
    "ATTEST_TOPIC",
    "BUNDLE_TOPIC",
    "REQUEST_TOPIC",
    "REQUEST_TOPICS",
    "RETAINED_TOPICS",
    "REVOCATIONS_TOPIC",
    "AuthorityEvents",
    "AuthorityHandler",
    "AuthorityTransport",
    "LocalBus",
    "LocalTransport",
    "PublicationHandler",
    "Publisher",
    "node_events_topic",
]

log = logging.getLogger("vouchd.protocol.transport")

# Topic suffixes under vouchd/v1/<trust domain>/ (DESIGN §10).
ATTEST_TOPIC = "authority/attest"
REQUEST_TOPIC = "authority/request"
REVOCATIONS_TOPIC = "revocations"
BUNDLE_TOPIC = "bundle"
# What an agent may send to the authority (each answered by one signed reply).
REQUEST_TOPICS = frozenset({ATTEST_TOPIC, REQUEST_TOPIC})
# Publications a broker keeps for whoever subscribes later: the latest document is all that matters.
RETAINED_TOPICS = frozenset({REVOCATIONS_TOPIC, BUNDLE_TOPIC})


def node_events_topic(node_id: str) -> str:
    """Where the authority tells one node that something of its own changed (its entries)."""
    return f"nodes/{node_id}/events"


AuthorityHandler = Callable[[str, bytes], Awaitable[bytes]]
PublicationHandler = Callable[[str, bytes], Awaitable[None]]


class AuthorityTransport(Protocol):
    async def call(self, topic: str, request: bytes, *, timeout: float) -> bytes:
        """Send request bytes to the authority and return its (signed) reply bytes."""
        ...


class Publisher(Protocol):
    """The authority's side of publications: signed bytes out to every subscriber of a topic."""

    async def publish(self, topic: str, payload: bytes) -> None: ...


class AuthorityEvents(Protocol):
    """The agent's side of publications."""

    def subscribe(self, topic: str, handler: PublicationHandler) -> None: ...


class LocalTransport:
    """Standalone mode: the authority runs in this process."""

    def __init__(self, handler: AuthorityHandler) -> None:
        self._handler = handler

    async def call(self, topic: str, request: bytes, *, timeout: float) -> bytes:
        try:
            return await asyncio.wait_for(self._handler(topic, bytes(request)), timeout)
        except TimeoutError:
            raise TransportError(f"authority did not answer on {topic} within {timeout:g} s") from None


class LocalBus:
    """Standalone mode's broker: a publication is handed to every subscriber of its topic.

    `publish` returns once every subscriber has handled it (or `timeout` passed), so an operator's
    command that changes something returns after the local agent has applied it. A subscriber that
    fails is logged; the publication still counts as delivered, as with a broker. Nothing is retained:
    an agent learns the current revocation document from every attestation and entry sync anyway.
    """

    def __init__(self, *, timeout: float = 10.0) -> None:
        self._subscribers: dict[str, list[PublicationHandler]] = {}
        self._timeout = timeout

    def subscribe(self, topic: str, handler: PublicationHandler) -> None:
        self._subscribers.setdefault(topic, []).append(handler)

    async def publish(self, topic: str, payload: bytes) -> None:
        handlers = tuple(self._subscribers.get(topic, ()))
        if not handlers:
            return
        results = await asyncio.gather(*(self._deliver(handler, topic, payload) for handler in handlers),
                                       return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException) and not isinstance(result, asyncio.CancelledError):
                log.error("publication handler failed", exc_info=result, extra={"topic": topic})

    async def _deliver(self, handler: PublicationHandler, topic: str, payload: bytes) -> None:
        try:
            await asyncio.wait_for(handler(topic, payload), self._timeout)
        except TimeoutError:
            log.warning("publication handler did not finish in time", extra={"topic": topic,
                                                                             "timeout_seconds": self._timeout})
