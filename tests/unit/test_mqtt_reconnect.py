"""The broker goes away and comes back: calls fail fast and say why, both ends reconnect and
subscribe again, and what the authority published meanwhile is not lost."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.mosquitto import (
    FakeAuthority,
    Mosquitto,
    answer_to,
    free_port,
    link_for,
    new_trust_domain,
    node_id,
    nonce_request,
    serving,
    start_broker,
)
from vouchd.protocol.errors import TransportError
from vouchd.protocol.mqtt import MqttAuthorityLink, MqttAuthorityService
from vouchd.protocol.transport import REQUEST_TOPIC, node_events_topic

RECONNECT_BOUND = 10.0   # the first delays are 0.25-0.5 s, 0.5-1 s, 1-2 s, ...


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    """A broker of this test's own, to kill."""
    instance = start_broker(folder=tmp_path)
    try:
        yield instance
    finally:
        instance.stop()


async def test_the_broker_going_away_fails_calls_at_once_and_both_ends_come_back(broker: Mosquitto) -> None:
    td = new_trust_domain()
    node = node_id(td, "a")
    release = asyncio.Event()

    class SlowOnce(FakeAuthority):
        async def handle(self, topic: str, request: bytes) -> bytes:
            if not release.is_set():
                await release.wait()
            return await super().handle(topic, request)

    events: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_event(topic: str, payload: bytes) -> None:
        await events.put(payload)

    async with serving(broker, td, SlowOnce()) as service:
        link = link_for(broker, td, node)
        link.subscribe(node_events_topic(node), on_event)
        async with link:
            in_flight = asyncio.create_task(link.call(REQUEST_TOPIC, nonce_request(node), timeout=30))
            await asyncio.sleep(0.1)
            broker.kill()
            started = time.monotonic()
            # A call in flight fails as soon as the connection is lost, not at its 30 s timeout.
            with pytest.raises(TransportError, match="lost the connection to the MQTT broker"):
                async with asyncio.timeout(5):
                    await in_flight
            assert time.monotonic() - started < 2
            # While the broker is away, calls fail at once and name it.
            started = time.monotonic()
            with pytest.raises(TransportError, match=re.escape(f"not connected to the MQTT broker mqtt://127.0.0.1:{broker.port}")):
                await link.call(REQUEST_TOPIC, nonce_request(node), timeout=5)
            assert time.monotonic() - started < 0.1
            assert not link.status().connected
            assert link.status().last_error

            release.set()
            broker.restart()
            assert await link.wait_connected(RECONNECT_BOUND)
            assert await service.wait_connected(RECONNECT_BOUND)
            request = nonce_request(node)
            assert await link.call(REQUEST_TOPIC, request, timeout=5) == answer_to(request)
            # Subscriptions are made again on the new connection.
            await service.publish(node_events_topic(node), b"entries changed")
            async with asyncio.timeout(5):
                assert await events.get() == b"entries changed"
            assert link.status().connects == 2


async def test_a_call_in_flight_fails_within_its_timeout_when_the_broker_hangs(broker: Mosquitto) -> None:
    """A broker that stops answering (SIGSTOP) drops no connection: the call's own timeout ends it."""
    td = new_trust_domain()
    node = node_id(td, "a")
    async with serving(broker, td, FakeAuthority()), link_for(broker, td, node) as link:
        assert broker.process is not None
        broker.process.send_signal(19)  # SIGSTOP
        try:
            started = time.monotonic()
            with pytest.raises(TransportError, match=r"did not answer on authority/request within 0\.5 s"):
                await link.call(REQUEST_TOPIC, nonce_request(node), timeout=0.5)
            assert time.monotonic() - started < 1.5
        finally:
            broker.process.send_signal(18)  # SIGCONT
        request = nonce_request(node)
        assert await link.call(REQUEST_TOPIC, request, timeout=5) == answer_to(request)


async def test_a_retained_publication_made_while_the_broker_is_away_goes_out_when_it_is_back(
        broker: Mosquitto) -> None:
    td = new_trust_domain()
    node = node_id(td, "late")
    async with serving(broker, td, FakeAuthority()) as service:
        broker.kill()
        async with asyncio.timeout(5):
            while service.connected:
                await asyncio.sleep(0.01)
        await service.publish("revocations", b"document v9")        # does not raise
        await service.publish(node_events_topic(node), b"lost")     # nor does this: it is a hint
        assert service.stats().publications_undelivered == 2
        broker.restart()
        assert await service.wait_connected(RECONNECT_BOUND)
        got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

        async def record(topic: str, payload: bytes) -> None:
            await got.put((topic, payload))

        link = link_for(broker, td, node)
        link.subscribe("revocations", record)
        link.subscribe(node_events_topic(node), record)
        async with link, asyncio.timeout(5):
            assert await got.get() == ("revocations", b"document v9")
            await asyncio.sleep(0.2)
            assert got.empty()


async def test_a_link_started_without_a_broker_connects_when_it_comes(tmp_path: Path) -> None:
    broker = Mosquitto(port=free_port(), folder=tmp_path)   # not started: nothing listens there yet
    td = new_trust_domain()
    node = node_id(td, "a")
    link = MqttAuthorityLink(broker.host, broker.port, trust_domain=td, node_id=node, connect_wait=0.3)
    started = time.monotonic()
    try:
        async with link:
            assert time.monotonic() - started < 2
            with pytest.raises(TransportError, match="Connection refused"):
                await link.call(REQUEST_TOPIC, nonce_request(node), timeout=5)
            broker.start()
            async with MqttAuthorityService(broker.host, broker.port, trust_domain=td) as service:
                authority = FakeAuthority()
                await service.serve(authority.handle)
                assert await link.wait_connected(RECONNECT_BOUND)
                request = nonce_request(node)
                assert await link.call(REQUEST_TOPIC, request, timeout=5) == answer_to(request)
    finally:
        broker.stop()


async def test_reconnect_on_request_makes_a_new_connection(broker: Mosquitto) -> None:
    td = new_trust_domain()
    node = node_id(td, "a")
    async with serving(broker, td, FakeAuthority()), link_for(broker, td, node) as link:
        link.reconnect()
        async with asyncio.timeout(5):
            while link.status().connects < 2 or not link.connected:
                await asyncio.sleep(0.01)
        request = nonce_request(node)
        assert await link.call(REQUEST_TOPIC, request, timeout=5) == answer_to(request)
