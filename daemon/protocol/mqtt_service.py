"""The authority's end of the bus: requests in, signed replies and publications out.

MqttAuthorityService takes the agents' requests from shared subscriptions
(`$share/<group>/vouchd/v1/<td>/authority/attest` and `…/authority/request`: the broker hands each
request to one replica), and answers each with what the authority's handler returns, on
`nodes/<node key>/resp` of the node the request itself names, with the request's correlation data.
It is also the authority's Publisher: `revocations` and `bundle` retained, node events not.

Before anything reaches the authority, each message passes the cheap checks, in this order: its
topic, its size (before decoding), its correlation data, that it decodes as a protocol message
naming a node of this trust domain, the per-node and the total rate. A message failing one is
dropped, counted by reason and logged (at most one line per reason every 10 s): it cannot be
refused in the authority's name, because only the authority signs, and a refusal to an unknown or
flooding sender is worth nothing anyway. Requests that pass are handled concurrently, up to a
bound, so that one slow request (a large event log, a slow store) does not hold up the others.

A request delivered twice (QoS 1) is handed over twice; the authority answers the second from its
reply cache.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import aiomqtt
from paho.mqtt.properties import Properties

from vouchd.protocol.codec import MAX_MESSAGE_BYTES, decode
from vouchd.protocol.errors import TransportError
from vouchd.protocol.mqtt_connection import (
    QOS,
    Backoff,
    BrokerConnection,
    BrokerTls,
    bounded_queue,
    publish_properties,
    subscribe,
)
from vouchd.protocol.mqtt_link import NODE_PROPERTY, PACKET_OVERHEAD
from vouchd.protocol.mqtt_topics import BusTopics
from vouchd.protocol.ratelimit import KeyedTokenBuckets, RateLimitedLog, TokenBucket
from vouchd.protocol.transport import REQUEST_TOPICS, AuthorityHandler

__all__ = ["MqttAuthorityService", "ServiceLimits", "ServiceStats"]

log = logging.getLogger("vouchd.protocol.mqtt")

MAX_CORRELATION_BYTES = 64


@dataclass(frozen=True)
class ServiceLimits:
    """What one replica takes from the bus. The rates are per replica (each counts what it receives).

    `max_request_bytes`: larger requests are dropped unread (the broker is also told, as the MQTT 5
    maximum packet size, not to send them). `per_node_rate`/`per_node_burst`: requests a second, and
    saved up, per node ID named in requests; `total_rate`/`total_burst`: for all nodes together.
    `max_concurrent`: requests handled at once; further ones wait in the client's queue, which
    drops beyond `max_queued` messages or `max_queued_bytes` of payload. `handler_timeout`: a
    request not answered by then gets no reply. `publish_timeout`: how long a reply or publication
    waits for the broker's PUBACK.
    `reply_expiry`: seconds the broker may hold a reply (MQTT 5 message expiry).
    """

    max_request_bytes: int = MAX_MESSAGE_BYTES
    per_node_rate: float = 5.0
    per_node_burst: float = 30.0
    total_rate: float = 500.0
    total_burst: float = 2000.0
    max_concurrent: int = 64
    max_queued: int = 10_000
    max_queued_bytes: int = 64 * 1024 * 1024
    handler_timeout: float = 120.0
    publish_timeout: float = 10.0
    reply_expiry: int = 60

    def __post_init__(self) -> None:
        if min(self.max_request_bytes, self.max_concurrent, self.max_queued) < 1 \
                or self.max_queued_bytes < self.max_request_bytes:
            raise ValueError("max_request_bytes, max_concurrent and max_queued must be at least 1, "
                             "max_queued_bytes at least max_request_bytes")
        if self.handler_timeout <= 0 or self.publish_timeout <= 0 or self.reply_expiry < 1:
            raise ValueError("handler_timeout and publish_timeout must be positive, reply_expiry at least 1")
        TokenBucket(self.per_node_rate, self.per_node_burst, now=0.0)
        TokenBucket(self.total_rate, self.total_burst, now=0.0)


@dataclass(frozen=True)
class ServiceStats:
    """Counters since start, for status and tests. `dropped` by reason: `unexpected_topic`,
    `queue_full`, `oversized`, `no_correlation`, `undecodable`, `no_node`, `node_rate`, `total_rate`,
    `not_serving`."""

    received: int
    answered: int
    handler_failures: int
    replies_undelivered: int
    publications_undelivered: int
    in_flight: int
    dropped: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Request:
    topic: str              # the protocol's topic: authority/attest or authority/request
    payload: bytes
    reply_topic: str        # nodes/<node key>/resp of the node the request names
    correlation: bytes
    node_id: str


class MqttAuthorityService:
    """An authority replica's connection to the bus (docs/protocol.md, "The bus").

    `client_id` must differ between replicas (the broker drops the older of two connections with one
    id, and mosquitto lets any client claim any id); the default, `vouchd-authority-<host name>-<8
    random hex digits>`, is unique and cannot be guessed. `share_group` names the shared
    subscription the replicas split requests by. Enter the context to connect (publications can go
    out from then on), then await serve(handler) once the authority can answer. Leaving the context
    drains: the replica unsubscribes (the broker sends new requests to the others) and answers what
    it holds, for at most `drain_timeout` seconds.
    """

    def __init__(self, host: str, port: int, *, trust_domain: str, client_id: str | None = None,
                 tls: BrokerTls | None = None, username: str | None = None, password: str | None = None,
                 limits: ServiceLimits | None = None, share_group: str = "authority", keepalive: int = 30,
                 reconnect_min: float = 0.5, reconnect_max: float = 30.0, connect_wait: float = 5.0,
                 drain_timeout: float = 5.0, monotonic: Callable[[], float] = time.monotonic) -> None:
        self._topics = BusTopics(trust_domain)
        self._limits = limits or ServiceLimits()
        self._subscriptions = [self._topics.shared_request(t, share_group) for t in sorted(REQUEST_TOPICS)]
        self._request_topics = {self._topics.request(t): t for t in REQUEST_TOPICS}
        self._connect_wait = connect_wait
        self._monotonic = monotonic
        self._handler: AuthorityHandler | None = None
        self._slots = asyncio.Semaphore(self._limits.max_concurrent)
        self._per_node = KeyedTokenBuckets(self._limits.per_node_rate, self._limits.per_node_burst)
        self._total = TokenBucket(self._limits.total_rate, self._limits.total_burst, now=monotonic())
        self._drops_log = RateLimitedLog(log, monotonic=monotonic)
        self._tasks: set[asyncio.Task[None]] = set()
        self._undelivered: dict[str, bytes] = {}   # retained publications the broker has not taken yet
        self._received = self._answered = self._handler_failures = self._in_flight = 0
        self._replies_undelivered = self._publications_undelivered = 0
        self._dropped: dict[str, int] = {}
        self._drain_timeout = drain_timeout
        self._connection = BrokerConnection(
            host, port, client_id=client_id or f"vouchd-authority-{socket.gethostname()}-{secrets.token_hex(4)}",
            tls=tls, username=username, password=password, keepalive=keepalive,
            max_packet_size=self._limits.max_request_bytes + PACKET_OVERHEAD,
            backoff=Backoff(reconnect_min, reconnect_max),
            on_connected=self._connected, on_message=self._message, on_disconnected=lambda _reason: None,
            incoming_queue=bounded_queue(self._limits.max_queued, self._limits.max_queued_bytes, self._queue_full))

    @property
    def broker(self) -> str:
        return self._connection.broker

    @property
    def connected(self) -> bool:
        return self._connection.client is not None

    def stats(self) -> ServiceStats:
        return ServiceStats(received=self._received, answered=self._answered, handler_failures=self._handler_failures,
                            replies_undelivered=self._replies_undelivered,
                            publications_undelivered=self._publications_undelivered,
                            in_flight=self._in_flight, dropped=dict(self._dropped))

    async def __aenter__(self) -> Self:
        self._connection.start()
        if not await self._connection.wait_up(self._connect_wait):
            log.warning("the MQTT broker is not reachable yet; the authority keeps trying",
                        extra={"broker": self.broker, "error": self._connection.last_error})
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self._drain()
        await self._connection.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _drain(self) -> None:
        """Take no more requests (the broker hands them to the other replicas), and answer those in
        hand, for at most `drain_timeout` seconds."""
        client = self._connection.client
        if client is None or self._handler is None:
            return
        try:
            async with asyncio.timeout(self._drain_timeout):
                for subscription in self._subscriptions:
                    await client.unsubscribe(subscription)
                while self._tasks:
                    await asyncio.wait(set(self._tasks))
        except (TimeoutError, aiomqtt.MqttError) as err:
            log.warning("requests still in hand when the service stopped", extra={"in_flight": len(self._tasks),
                                                                                  "error": str(err)})

    async def wait_connected(self, timeout: float) -> bool:
        return await self._connection.wait_up(timeout)

    async def serve(self, handler: AuthorityHandler) -> None:
        """Start taking requests, handing each to `handler` (the authority's `handle`); once only.
        Returns once the request subscriptions are made (or, while the broker is away, at once: the
        next connection makes them)."""
        if self._handler is not None:
            raise RuntimeError("the service already serves a handler")
        self._handler = handler
        client = self._connection.client
        if client is not None:
            try:
                await self._subscribe_requests(client)
            except aiomqtt.MqttError as err:
                # Refused, or the connection is going: every new connection subscribes again.
                log.error("could not subscribe to the request topics", extra={"error": str(err)})

    # -- Publisher ---------------------------------------------------------------------------------
    async def publish(self, topic: str, payload: bytes) -> None:
        """Publish a signed publication. `revocations` and `bundle` are retained: the broker hands the
        latest to every later subscriber; one the broker could not take now goes out at the next
        connection. A node event that cannot go out is logged and lost (the node learns of the change
        at its next sync). Never raises for the broker's absence: a publication is a hint, and the
        operator's command that caused it has done its work."""
        bus_topic = self._topics.publication(topic)
        retain = BusTopics.retained(topic)
        if retain:
            self._undelivered[bus_topic] = payload
        try:
            await self._connection.publish(bus_topic, payload, retain=retain, timeout=self._limits.publish_timeout)
        except TransportError as err:
            self._publications_undelivered += 1
            log.warning("publication not delivered" + ("; it goes out when the broker is back" if retain else ""),
                        extra={"topic": bus_topic, "error": str(err)})
            return
        if self._undelivered.get(bus_topic) is payload:
            del self._undelivered[bus_topic]

    # -- the connection's callbacks ----------------------------------------------------------------
    async def _connected(self, client: aiomqtt.Client) -> None:
        for bus_topic, payload in list(self._undelivered.items()):
            await client.publish(bus_topic, payload, qos=QOS, retain=True, timeout=self._limits.publish_timeout)
            if self._undelivered.get(bus_topic) is payload:
                del self._undelivered[bus_topic]
        if self._handler is not None:
            await self._subscribe_requests(client)

    async def _subscribe_requests(self, client: aiomqtt.Client) -> None:
        for subscription in self._subscriptions:
            await subscribe(client, subscription)

    async def _message(self, message: aiomqtt.Message) -> None:
        self._received += 1
        topic = self._request_topics.get(message.topic.value)
        payload = message.payload if isinstance(message.payload, bytes) else b""
        properties = message.properties
        sender = _sender(properties)
        fields: dict[str, object] = {"topic": message.topic.value, "bytes": len(payload), "sender": sender}
        if topic is None:
            return self._drop("unexpected_topic", "a message on a topic the authority does not serve", fields)
        if self._handler is None:
            return self._drop("not_serving", "a request before the authority serves", fields)
        if len(payload) > self._limits.max_request_bytes:
            return self._drop("oversized", f"a request over {self._limits.max_request_bytes} bytes", fields)
        correlation = getattr(properties, "CorrelationData", None)
        if not isinstance(correlation, bytes) or not 0 < len(correlation) <= MAX_CORRELATION_BYTES:
            return self._drop("no_correlation", "a request without usable correlation data", fields)
        try:
            request = decode(payload)
        except Exception as err:  # MessageError; anything else a hostile input reaches is no different
            return self._drop("undecodable", "a request that does not decode", {**fields, "error": str(err)[:200]})
        node_id = getattr(request, "node_id", None)
        if not isinstance(node_id, str):
            return self._drop("no_node", "a request that names no node", fields)
        fields["node_id"] = node_id[:200]
        try:
            reply_topic = self._topics.replies(node_id)
        except ValueError as err:
            return self._drop("no_node", "a request that names no node of this trust domain",
                              {**fields, "error": str(err)[:200]})
        now = self._monotonic()
        if not self._per_node.take(node_id, now):
            return self._drop("node_rate", "requests for one node over its rate", fields)
        if not self._total.take(now):
            return self._drop("total_rate", "requests over the authority's total rate", fields)
        await self._slots.acquire()  # a full house holds the queue back rather than growing tasks
        self._in_flight += 1
        self._spawn(self._answer(self._handler, _Request(topic, payload, reply_topic, correlation, node_id)))

    async def _answer(self, handler: AuthorityHandler, request: _Request) -> None:
        where = {"topic": request.topic, "node_id": request.node_id}
        try:
            try:
                async with asyncio.timeout(self._limits.handler_timeout):
                    reply = await handler(request.topic, request.payload)
            except TimeoutError:
                self._handler_failures += 1
                log.warning("the authority did not answer a request in time; no reply",
                            extra={**where, "timeout_seconds": self._limits.handler_timeout})
                return
            except Exception:
                self._handler_failures += 1
                log.exception("the authority failed on a request; no reply", extra=where)
                return
        finally:
            self._in_flight -= 1
            self._slots.release()
        properties = publish_properties(correlation=request.correlation, expiry_seconds=self._limits.reply_expiry)
        try:
            await self._connection.publish(request.reply_topic, reply, properties=properties,
                                           timeout=self._limits.publish_timeout)
        except TransportError as err:
            self._replies_undelivered += 1
            self._drops_log.warning("reply_undelivered", "a reply could not be published",
                                    {"topic": request.reply_topic, "error": str(err)})
            return
        self._answered += 1

    def _queue_full(self, message: aiomqtt.Message) -> None:
        self._received += 1
        self._drop("queue_full", "a message: the queue of requests waiting to be handled is full",
                   {"topic": message.topic.value, "sender": _sender(message.properties)})

    def _drop(self, reason: str, message: str, fields: dict[str, object]) -> None:
        self._dropped[reason] = self._dropped.get(reason, 0) + 1
        self._drops_log.warning(reason, f"dropped {message}", {**fields, "dropped": self._dropped[reason]})

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _sender(properties: Properties | None) -> str | None:
    """The node the sender says it is (the `vouchd-node` user property): for logs only, never trusted."""
    for name, value in getattr(properties, "UserProperty", None) or ():
        if name == NODE_PROPERTY:
            return str(value)[:200]
    return None
