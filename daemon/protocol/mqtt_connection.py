"""One MQTT 5 client connection, kept up: reconnects with exponential backoff and jitter.

Both ends of the bus (the agent's MqttAuthorityLink, the authority's MqttAuthorityService) hold one
of these. Every connection is new and clean (no broker-side session survives a disconnect): on each
(re)connect the owner subscribes again, and the broker hands it the retained publications again.

TCP_NODELAY on the client's socket is not optional: without it (and `set_tcp_nodelay true` in
mosquitto) every QoS 1 exchange waits for a delayed ACK, and a request takes ~88 ms instead of ~1 ms.
"""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiomqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from vouchd.protocol.errors import TransportError
from vouchd.protocol.ratelimit import RateLimitedLog

__all__ = [
    "NODELAY",
    "QOS",
    "Backoff",
    "BrokerConnection",
    "BrokerTls",
    "bounded_queue",
    "publish_properties",
    "subscribe",
]

log = logging.getLogger("vouchd.protocol.mqtt")

QOS = 1
NODELAY = ((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),)
# How long the broker may take to accept a connection (CONNACK), a subscription (SUBACK) or to
# take a graceful disconnect.
BROKER_TIMEOUT = 10.0

OnConnected = Callable[[aiomqtt.Client], Awaitable[None]]
OnMessage = Callable[[aiomqtt.Message], Awaitable[None]]
OnDisconnected = Callable[[str], None]


@dataclass(frozen=True)
class BrokerTls:
    """TLS to the broker. The files are read at every (re)connect, so a renewed client certificate
    written over the same files is presented from the next connection on.

    `ca_file`: PEM certificates that may sign the broker's certificate (its name is checked against
    the host connected to). `cert_file`, `key_file`: the client certificate chain (PEM) and its key,
    for brokers that authenticate clients by certificate; a key held by a TPM is a "TSS2 PRIVATE KEY"
    PEM that OpenSSL's tpm2 provider loads.
    """

    ca_file: Path
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("a client key needs its certificate (cert_file)")

    def context(self) -> ssl.SSLContext:
        context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(self.ca_file))
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.cert_file is not None:
            context.load_cert_chain(str(self.cert_file), None if self.key_file is None else str(self.key_file))
        return context


class Backoff:
    """Delays between connection attempts: `initial`, doubling up to `maximum`, each drawn from its
    upper half so that a fleet cut off at once does not come back in lockstep."""

    def __init__(self, initial: float = 0.5, maximum: float = 30.0,
                 uniform: Callable[[], float] = random.random) -> None:
        if not 0 < initial <= maximum:
            raise ValueError("reconnect delays need 0 < initial <= maximum")
        self._initial = initial
        self._maximum = maximum
        self._uniform = uniform
        self._failures = 0

    def next_delay(self) -> float:
        ceiling = min(self._maximum, self._initial * 2.0 ** min(self._failures, 30))
        self._failures += 1
        return ceiling / 2 + self._uniform() * ceiling / 2

    def reset(self) -> None:
        self._failures = 0


def _properties(packet_type: int) -> Properties:
    return Properties(packet_type)  # type: ignore[no-untyped-call]  # paho-mqtt has no annotations here


def publish_properties(*, correlation: bytes, expiry_seconds: int,
                       user: list[tuple[str, str]] | None = None) -> Properties:
    """MQTT 5 PUBLISH properties: correlation data, message expiry and user properties."""
    properties = _properties(PacketTypes.PUBLISH)
    properties.CorrelationData = correlation
    properties.MessageExpiryInterval = expiry_seconds
    if user:
        properties.UserProperty = user
    return properties


async def subscribe(client: aiomqtt.Client, topic: str) -> None:
    """Subscribe at QoS 1; MqttError when the broker refuses (its ACL does not grant the topic)."""
    granted = await client.subscribe(topic, qos=QOS)
    for code in granted:
        if isinstance(code, ReasonCode) and code.is_failure:
            raise aiomqtt.MqttError(f"the broker refused the subscription to {topic} ({code})")


def _payload_size(message: aiomqtt.Message) -> int:
    return len(message.payload) if isinstance(message.payload, bytes | bytearray) else 0


def bounded_queue(max_messages: int, max_bytes: int,
                  dropped: Callable[[aiomqtt.Message], None]) -> type[asyncio.Queue[aiomqtt.Message]]:
    """A queue type for the client's incoming messages that holds at most `max_messages` and
    `max_bytes` of payload, and hands what does not fit to `dropped`. The client acknowledges a
    QoS 1 message as it arrives, before anyone reads it: what bounds memory in a flood is this."""

    class BoundedQueue(asyncio.Queue[aiomqtt.Message]):
        held_bytes = 0

        def put_nowait(self, item: aiomqtt.Message) -> None:
            size = _payload_size(item)
            if self.qsize() >= max_messages or self.held_bytes + size > max_bytes:
                dropped(item)
                return
            self.held_bytes += size
            super().put_nowait(item)

        def _get(self) -> aiomqtt.Message:
            item = super()._get()
            self.held_bytes -= _payload_size(item)
            return item

    return BoundedQueue


def _describe(err: BaseException) -> str:
    """What went wrong, with the cause aiomqtt chains to its "Disconnected during message iteration"."""
    text = str(err) or type(err).__name__
    cause = err.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return text


class BrokerConnection:
    """Keeps one client connected to `host:port` until close().

    `on_connected(client)` runs after every CONNACK, before the connection counts as up (the owner
    subscribes there); `on_message` gets every message, in order; `on_disconnected(reason)` runs
    once per lost (or failed) connection. While down, `client` is None and publish() fails at once.
    A connection that stayed up `stable_after` seconds resets the backoff; one that drops sooner
    (a broker that accepts and then kicks the client) keeps backing off.
    """

    def __init__(self, host: str, port: int, *, client_id: str, tls: BrokerTls | None,
                 username: str | None, password: str | None, keepalive: int, max_packet_size: int,
                 backoff: Backoff, on_connected: OnConnected, on_message: OnMessage, on_disconnected: OnDisconnected,
                 incoming_queue: type[asyncio.Queue[aiomqtt.Message]] | None = None,
                 stable_after: float = 10.0) -> None:
        if not client_id or len(client_id.encode()) > 65535:
            raise ValueError("the MQTT client id must be 1 to 65535 bytes")
        self._host = host
        self._port = port
        self._client_id = client_id
        self._tls = tls
        self._username = username
        self._password = password
        self._keepalive = keepalive
        self._max_packet_size = max_packet_size
        self._incoming_queue = incoming_queue
        self._backoff = backoff
        self._stable_after = stable_after
        self._on_connected = on_connected
        self._on_message = on_message
        self._on_disconnected = on_disconnected
        scheme = "mqtts" if tls is not None else "mqtt"
        self.broker = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
        self._client: aiomqtt.Client | None = None
        self._up = asyncio.Event()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._session: asyncio.Task[str] | None = None
        self._reconnect_asked = False
        self.last_error: str | None = None
        self._next_attempt: float | None = None
        self.connects = 0
        self._failures_log = RateLimitedLog(log, interval=60.0)

    @property
    def client(self) -> aiomqtt.Client | None:
        """The connected client, subscriptions made; None while down."""
        return self._client

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"mqtt {self._client_id}")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        try:
            async with asyncio.timeout(BROKER_TIMEOUT + 5):
                await asyncio.gather(task, return_exceptions=True)
        except TimeoutError:
            log.warning("the MQTT connection did not close in time", extra={"broker": self.broker})

    async def wait_up(self, timeout: float) -> bool:
        """Wait until connected (True), or `timeout` seconds (False)."""
        try:
            async with asyncio.timeout(timeout):
                await self._up.wait()
        except TimeoutError:
            return False
        return True

    def reconnect(self) -> None:
        """Drop the connection (if any) and connect again at once: new TLS files are read."""
        self._reconnect_asked = True
        if self._session is not None:
            self._session.cancel()
        self._wake.set()

    def unavailable(self) -> str:
        """Why nothing can be sent now, naming the broker."""
        text = f"not connected to the MQTT broker {self.broker}"
        if self.last_error:
            text += f" ({self.last_error})"
        if self._next_attempt is not None:
            text += f"; next attempt in {max(0.0, self._next_attempt - time.monotonic()):.1f} s"
        return text

    async def publish(self, topic: str, payload: bytes, *, timeout: float, retain: bool = False,
                      properties: Properties | None = None) -> None:
        """Publish at QoS 1 and wait for the broker's PUBACK; TransportError when that cannot happen."""
        client = self._client
        if client is None:
            raise TransportError(self.unavailable())
        try:
            await client.publish(topic, payload, qos=QOS, retain=retain, properties=properties,
                                 timeout=max(timeout, 0.001))
        except aiomqtt.MqttError as err:
            raise TransportError(f"could not publish to the MQTT broker {self.broker}: {_describe(err)}") from None

    async def _run(self) -> None:
        while True:
            self._session = asyncio.create_task(self._connect_once())
            try:
                reason = await self._session
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                reason = "reconnecting"  # reconnect() cancelled the session alone
            except Exception as err:
                # A bug (ours or the client library's) must cost one connection, not the link for good.
                log.exception("the MQTT connection failed unexpectedly", extra={"broker": self.broker})
                reason = _describe(err)
            finally:
                self._session = None
            self.last_error = reason
            self._on_disconnected(reason)
            if self._reconnect_asked:
                self._reconnect_asked = False
                self._wake.clear()
                continue
            delay = self._backoff.next_delay()
            self._next_attempt = time.monotonic() + delay
            self._failures_log.warning("mqtt-down", "no connection to the MQTT broker",
                                       {"broker": self.broker, "error": reason, "retry_in_seconds": round(delay, 2)})
            try:
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            self._reconnect_asked = False

    async def _connect_once(self) -> str:
        """One connection, from connect to its end; returns why it ended (or failed)."""
        up_since: float | None = None
        try:
            tls_context = await asyncio.to_thread(self._tls.context) if self._tls is not None else None
            properties = _properties(PacketTypes.CONNECT)
            properties.MaximumPacketSize = self._max_packet_size
            client = aiomqtt.Client(
                self._host, self._port, identifier=self._client_id, protocol=aiomqtt.ProtocolVersion.V5,
                username=self._username, password=self._password, keepalive=self._keepalive,
                timeout=BROKER_TIMEOUT, tls_context=tls_context, properties=properties, socket_options=NODELAY,
                queue_type=self._incoming_queue,
            )
            # aiomqtt warns at every publish beyond 10 awaiting their PUBACK: a busy replica has more.
            client.pending_calls_threshold = 1_000_000
            async with client:
                await self._on_connected(client)
                # No await between the subscriptions above and being up: nothing can slip in between.
                self._client = client
                self._up.set()
                up_since = time.monotonic()
                self._next_attempt = None
                self.last_error = None
                self.connects += 1
                log.info("connected to the MQTT broker", extra={"broker": self.broker, "client_id": self._client_id})
                async for message in client.messages:
                    try:
                        await self._on_message(message)
                    except Exception:
                        # A bug met by one message must not end the connection, nor the daemon.
                        log.exception("handling an MQTT message failed", extra={"broker": self.broker})
            return "the broker closed the connection"
        except aiomqtt.MqttError as err:
            return _describe(err)
        except (OSError, ValueError) as err:  # TLS files missing or unusable, name resolution
            return _describe(err)
        finally:
            self._client = None
            self._up.clear()
            if up_since is not None and time.monotonic() - up_since >= self._stable_after:
                self._backoff.reset()
