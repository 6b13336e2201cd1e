"""The agent's end of the bus: requests to the authority, its replies and its publications.

MqttAuthorityLink is the fleet agent's AuthorityTransport and AuthorityEvents (the two roles
standalone mode fills with LocalTransport and LocalBus):

- call(topic, request) publishes the request on `authority/attest` or `authority/request` at QoS 1
  with 16 random bytes of MQTT 5 correlation data and the user property `vouchd-node: <node id>`,
  and returns the payload of the message on `nodes/<node key>/resp` that carries the same
  correlation data. The agent names no response topic: the authority answers the node the request
  names, on that node's topic. Whether the reply is genuine is the agent's to check (signature,
  node, request digest, time): the bus is trusted for nothing but delivery.
- subscribe(topic, handler) hands every publication on `revocations`, `bundle` or
  `nodes/<node id>/events` to the handler, retained ones included, one at a time per topic.

While the broker is away, calls fail at once with a TransportError naming it; calls in flight when
it goes fail the same way; the link reconnects with backoff and subscribes again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from dataclasses import dataclass
from types import TracebackType
from typing import Self

import aiomqtt

from vouchd.protocol.codec import MAX_MESSAGE_BYTES
from vouchd.protocol.errors import TransportError
from vouchd.protocol.mqtt_connection import Backoff, BrokerConnection, BrokerTls, publish_properties, subscribe
from vouchd.protocol.mqtt_topics import BusTopics
from vouchd.protocol.transport import PublicationHandler

__all__ = ["NODE_PROPERTY", "PACKET_OVERHEAD", "LinkStatus", "MqttAuthorityLink"]

log = logging.getLogger("vouchd.protocol.mqtt")

NODE_PROPERTY = "vouchd-node"           # MQTT 5 user property on requests: who the sender says it is
CORRELATION_BYTES = 16
# Room for the topic, properties and headers of a packet around a payload of the message limit.
PACKET_OVERHEAD = 64 * 1024
# Publications waiting for a busy handler, per topic; beyond it the oldest goes (for a revocation
# document or a bundle only the newest matters, and a node event only says "sync").
PUBLICATION_BACKLOG = 16


@dataclass(frozen=True)
class LinkStatus:
    """For `vouchd status`: the broker, whether the link is up, and what went wrong last."""

    broker: str
    connected: bool
    last_error: str | None
    connects: int
    calls_in_flight: int


class _Subscription:
    """One publication topic: its handlers, and a queue worked by one task so that handlers see the
    topic's publications one at a time, in order, without holding up replies."""

    def __init__(self, topic: str) -> None:
        self.topic = topic
        self.handlers: list[PublicationHandler] = []
        self.backlog: asyncio.Queue[bytes] = asyncio.Queue(maxsize=PUBLICATION_BACKLOG)
        self.worker: asyncio.Task[None] | None = None


class MqttAuthorityLink:
    """An agent's connection to its authority over an MQTT 5 broker (docs/protocol.md, "The bus").

    `node_id` is this node's SPIFFE ID (`spiffe://<td>/vouchd/node/tpm/<EK hash>`, or `…/key/…`),
    known once the agent has its EK or node key; its node key names the node's topics.
    `client_id` defaults to `vouchd-agent-<node key>-<8 random hex digits>`: a broker drops the older
    of two connections with one client id, and mosquitto lets any client claim any id, so an id
    nobody can guess keeps another client from cutting this one off. `tls` None connects in the
    clear (tests, a broker on the same host). `connect_wait`: how long entering the context waits
    for the first connection before returning anyway (the link keeps trying in the background;
    calls meanwhile fail with TransportError). `publication_timeout`: how long one publication
    handler may take.
    """

    def __init__(self, host: str, port: int, *, trust_domain: str, node_id: str, client_id: str | None = None,
                 tls: BrokerTls | None = None, username: str | None = None, password: str | None = None,
                 keepalive: int = 30, reconnect_min: float = 0.5, reconnect_max: float = 30.0,
                 connect_wait: float = 5.0, publication_timeout: float = 10.0) -> None:
        self._topics = BusTopics(trust_domain)
        self.node_id = node_id
        self.node_key = self._topics.node_key(node_id)
        self._replies = self._topics.replies(node_id)
        self._connect_wait = connect_wait
        self._publication_timeout = publication_timeout
        self._pending: dict[bytes, asyncio.Future[bytes]] = {}
        self._subscriptions: dict[str, _Subscription] = {}  # by bus topic
        self._subscribing: set[asyncio.Task[None]] = set()
        self._connection = BrokerConnection(
            host, port, client_id=client_id or f"vouchd-agent-{self.node_key}-{secrets.token_hex(4)}",
            tls=tls, username=username, password=password, keepalive=keepalive,
            max_packet_size=MAX_MESSAGE_BYTES + PACKET_OVERHEAD, backoff=Backoff(reconnect_min, reconnect_max),
            on_connected=self._connected, on_message=self._message, on_disconnected=self._disconnected)

    @property
    def broker(self) -> str:
        return self._connection.broker

    @property
    def connected(self) -> bool:
        return self._connection.client is not None

    def status(self) -> LinkStatus:
        return LinkStatus(broker=self.broker, connected=self.connected, last_error=self._connection.last_error,
                          connects=self._connection.connects, calls_in_flight=len(self._pending))

    async def __aenter__(self) -> Self:
        self._connection.start()
        if not await self._connection.wait_up(self._connect_wait):
            log.warning("the MQTT broker is not reachable yet; the link keeps trying",
                        extra={"broker": self.broker, "error": self._connection.last_error})
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._connection.close()
        self._fail_pending("the link to the authority was closed")
        tasks = [*self._subscribing, *(s.worker for s in self._subscriptions.values() if s.worker is not None)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def wait_connected(self, timeout: float) -> bool:
        """Wait until the link is up (True) or `timeout` seconds passed (False)."""
        return await self._connection.wait_up(timeout)

    def reconnect(self) -> None:
        """Connect again now, reading the TLS files again (after the client certificate changed).
        Calls in flight fail with TransportError."""
        self._connection.reconnect()

    # -- AuthorityTransport ----------------------------------------------------------------------
    async def call(self, topic: str, request: bytes, *, timeout: float) -> bytes:
        """Send `request` on `topic` (`authority/attest` or `authority/request`) and return the reply's bytes."""
        bus_topic = self._topics.request(topic)
        correlation = secrets.token_bytes(CORRELATION_BYTES)
        reply: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        # A request nobody took up while its caller waited is worth nothing later: it expires.
        properties = publish_properties(correlation=correlation, expiry_seconds=max(1, round(timeout)),
                                        user=[(NODE_PROPERTY, self.node_id)])
        self._pending[correlation] = reply
        try:
            async with asyncio.timeout(timeout):
                await self._connection.publish(bus_topic, bytes(request), properties=properties, timeout=timeout)
                return await reply
        except TimeoutError:
            raise TransportError(f"the authority did not answer on {topic} within {timeout:g} s "
                                 f"(MQTT broker {self.broker})") from None
        finally:
            self._pending.pop(correlation, None)
            if reply.done() and not reply.cancelled():
                reply.exception()  # failed by a lost connection while the publish itself failed: seen

    # -- AuthorityEvents ---------------------------------------------------------------------------
    def subscribe(self, topic: str, handler: PublicationHandler) -> None:
        """Hand every publication on `topic` (`revocations`, `bundle`, `nodes/<node id>/events`) to
        `handler`, from the broker's retained one on. May be called before or after connecting."""
        bus_topic = self._topics.publication(topic)
        subscription = self._subscriptions.get(bus_topic)
        if subscription is None:
            subscription = self._subscriptions[bus_topic] = _Subscription(topic)
            client = self._connection.client
            if client is not None:
                task = asyncio.get_running_loop().create_task(self._subscribe_now(client, bus_topic))
                self._subscribing.add(task)
                task.add_done_callback(self._subscribing.discard)
        subscription.handlers.append(handler)

    # -- the connection's callbacks ------------------------------------------------------------------
    async def _connected(self, client: aiomqtt.Client) -> None:
        # A refused subscription fails the connection: the broker's ACL is wrong, and the link's
        # status says so (last_error) rather than leaving the agent deaf to part of the bus.
        await subscribe(client, self._replies)
        done: set[str] = set()
        # subscribe() may add topics while these subscriptions wait for the broker: loop until none is new.
        while pending := [t for t in self._subscriptions if t not in done]:
            for bus_topic in pending:
                await subscribe(client, bus_topic)
                done.add(bus_topic)

    async def _subscribe_now(self, client: aiomqtt.Client, bus_topic: str) -> None:
        try:
            await subscribe(client, bus_topic)
        except aiomqtt.MqttError as err:
            # Refused, or the connection is going: the next connection subscribes to every topic again.
            log.error("could not subscribe", extra={"topic": bus_topic, "error": str(err)})

    async def _message(self, message: aiomqtt.Message) -> None:
        topic = message.topic.value
        payload = message.payload if isinstance(message.payload, bytes) else b""  # always bytes from paho
        if topic == self._replies:
            correlation = getattr(message.properties, "CorrelationData", None)
            reply = self._pending.get(correlation) if isinstance(correlation, bytes) else None
            if reply is None or reply.done():
                # Late (its caller gave up), or a second delivery of one already taken.
                log.debug("a reply no call waits for", extra={"topic": topic})
                return
            reply.set_result(payload)
            return
        subscription = self._subscriptions.get(topic)
        if subscription is None:
            return
        if subscription.backlog.full():
            subscription.backlog.get_nowait()
            log.warning("publications arrive faster than they are handled; the oldest waiting one is dropped",
                        extra={"topic": subscription.topic})
        subscription.backlog.put_nowait(payload)
        if subscription.worker is None or subscription.worker.done():
            subscription.worker = asyncio.get_running_loop().create_task(self._work(subscription))

    def _disconnected(self, reason: str) -> None:
        self._fail_pending(f"lost the connection to the MQTT broker {self.broker}: {reason}")

    # -- helpers ---------------------------------------------------------------------------------------
    async def _work(self, subscription: _Subscription) -> None:
        while True:
            payload = await subscription.backlog.get()
            for handler in tuple(subscription.handlers):
                try:
                    async with asyncio.timeout(self._publication_timeout):
                        await handler(subscription.topic, payload)
                except TimeoutError:
                    log.warning("publication handler did not finish in time",
                                extra={"topic": subscription.topic, "timeout_seconds": self._publication_timeout})
                except Exception:
                    log.exception("publication handler failed", extra={"topic": subscription.topic})

    def _fail_pending(self, reason: str) -> None:
        for reply in self._pending.values():
            if not reply.done():
                reply.set_exception(TransportError(reason))
