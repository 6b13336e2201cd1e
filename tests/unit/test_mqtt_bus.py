"""Agent and authority over a real mosquitto: requests, replies, replicas, publications."""

from __future__ import annotations

import asyncio
import secrets
import statistics
import time

import pytest

from tests.mosquitto import (
    FakeAuthority,
    Mosquitto,
    answer_to,
    link_for,
    mosquitto_broker,
    new_trust_domain,
    next_message,
    node_id,
    nonce_request,
    raw_client,
    serving,
)
from vouchd.protocol.codec import encode
from vouchd.protocol.errors import TransportError
from vouchd.protocol.messages import AttestNonceRequest
from vouchd.protocol.mqtt import NODE_PROPERTY, node_key
from vouchd.protocol.mqtt_connection import publish_properties
from vouchd.protocol.transport import ATTEST_TOPIC, REQUEST_TOPIC, node_events_topic

__all__ = ["mosquitto_broker"]


async def test_a_request_reaches_the_authority_and_its_reply_comes_back(mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    node = node_id(td, "a")
    authority = FakeAuthority()
    async with serving(mosquitto_broker, td, authority), link_for(mosquitto_broker, td, node) as link:
        assert link.connected
        request = nonce_request(node)
        attest = encode(AttestNonceRequest(node_id=node, request_id=secrets.token_bytes(16)))
        assert await link.call(REQUEST_TOPIC, request, timeout=5) == answer_to(request)
        assert await link.call(ATTEST_TOPIC, attest, timeout=5) == answer_to(attest)
    # The authority gets the protocol's topic names and the exact bytes the agent sent.
    assert authority.seen == [(REQUEST_TOPIC, request), (ATTEST_TOPIC, attest)]


async def test_a_request_names_its_node_and_no_response_topic(mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    node = node_id(td, "a")
    async with raw_client(mosquitto_broker, "watcher") as watcher, link_for(mosquitto_broker, td, node) as link:
        await watcher.subscribe(f"vouchd/v1/{td}/authority/request", qos=1)
        request = nonce_request(node)
        with pytest.raises(TransportError, match="did not answer"):
            await link.call(REQUEST_TOPIC, request, timeout=0.5)  # no authority: nobody answers
        seen = await next_message(watcher)
    assert seen.payload == request
    assert seen.qos == 1
    properties = seen.properties
    assert len(getattr(properties, "CorrelationData", b"")) == 16
    assert getattr(properties, "UserProperty", None) == [(NODE_PROPERTY, node)]
    assert not hasattr(properties, "ResponseTopic")
    assert getattr(properties, "MessageExpiryInterval", None) == 1


async def test_round_trip_through_the_broker_takes_about_a_millisecond(mosquitto_broker: Mosquitto) -> None:
    """TCP_NODELAY on both clients (and in mosquitto): without it a round trip takes ~88 ms."""
    td = new_trust_domain()
    node = node_id(td, "a")
    async with serving(mosquitto_broker, td, FakeAuthority()), link_for(mosquitto_broker, td, node) as link:
        request = nonce_request(node)
        await link.call(REQUEST_TOPIC, request, timeout=5)
        latencies = []
        for _ in range(200):
            started = time.perf_counter()
            await link.call(REQUEST_TOPIC, request, timeout=5)
            latencies.append((time.perf_counter() - started) * 1000)
    latencies.sort()
    p50, p99 = statistics.median(latencies), latencies[197]
    print(f"request/reply through mosquitto: p50 {p50:.2f} ms, p99 {p99:.2f} ms")
    assert p50 < 20, f"p50 {p50:.1f} ms: is TCP_NODELAY missing on a client?"


async def test_two_replicas_on_the_shared_subscription_both_serve(mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    node = node_id(td, "a")
    first, second = FakeAuthority(), FakeAuthority()
    async with serving(mosquitto_broker, td, first), serving(mosquitto_broker, td, second), \
            link_for(mosquitto_broker, td, node) as link:
        requests = [nonce_request(node) for _ in range(40)]
        replies = [await link.call(REQUEST_TOPIC, request, timeout=5) for request in requests]
    assert replies == [answer_to(request) for request in requests]
    # Each request went to exactly one replica, and both took some.
    assert len(first.seen) + len(second.seen) == 40
    assert first.seen and second.seen


async def test_a_slow_request_does_not_hold_up_another(mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    slow_node, quick_node = node_id(td, "slow"), node_id(td, "quick")
    release = asyncio.Event()

    class SlowForOneNode(FakeAuthority):
        async def handle(self, topic: str, request: bytes) -> bytes:
            if slow_node.encode() in request:
                await release.wait()
            return await super().handle(topic, request)

    async with serving(mosquitto_broker, td, SlowForOneNode()), \
            link_for(mosquitto_broker, td, slow_node) as slow, link_for(mosquitto_broker, td, quick_node) as quick:
        slow_call = asyncio.create_task(slow.call(REQUEST_TOPIC, nonce_request(slow_node), timeout=5))
        await asyncio.sleep(0.05)
        request = nonce_request(quick_node)
        assert await quick.call(REQUEST_TOPIC, request, timeout=2) == answer_to(request)
        assert not slow_call.done()
        release.set()
        async with asyncio.timeout(5):
            assert (await slow_call).startswith(b"signed reply to ")


async def test_retained_publications_reach_a_late_subscriber(mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    node = node_id(td, "late")
    async with serving(mosquitto_broker, td, FakeAuthority()) as service:
        await service.publish("revocations", b"revocation document v1")
        await service.publish("revocations", b"revocation document v2")
        await service.publish("bundle", b"bundle v7")
        await service.publish(node_events_topic(node), b"an event before the node listened")
        got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

        async def record(topic: str, payload: bytes) -> None:
            await got.put((topic, payload))

        link = link_for(mosquitto_broker, td, node)
        link.subscribe("revocations", record)
        link.subscribe("bundle", record)
        link.subscribe(node_events_topic(node), record)
        async with link, asyncio.timeout(5):
            received = {await got.get(), await got.get()}
            # Only the latest retained document; a node event is not retained.
            assert received == {("revocations", b"revocation document v2"), ("bundle", b"bundle v7")}
            await asyncio.sleep(0.2)
            assert got.empty()
            await service.publish(node_events_topic(node), b"entries changed")
            assert await got.get() == (node_events_topic(node), b"entries changed")


async def test_a_subscription_made_while_connected_gets_the_retained_publication(mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    node = node_id(td, "a")
    async with serving(mosquitto_broker, td, FakeAuthority()) as service, link_for(mosquitto_broker, td, node) as link:
        await service.publish("revocations", b"document")
        got: asyncio.Queue[tuple[str, bytes]] = asyncio.Queue()

        async def record(topic: str, payload: bytes) -> None:
            await got.put((topic, payload))

        link.subscribe("revocations", record)
        async with asyncio.timeout(5):
            assert await got.get() == ("revocations", b"document")


async def test_a_node_event_reaches_its_node_only(mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    node_a, node_b = node_id(td, "a"), node_id(td, "b")
    got: dict[str, list[tuple[str, bytes]]] = {node_a: [], node_b: []}
    async with serving(mosquitto_broker, td, FakeAuthority()) as service:
        links = [link_for(mosquitto_broker, td, node) for node in (node_a, node_b)]
        for link in links:
            async def record(topic: str, payload: bytes, node: str = link.node_id) -> None:
                got[node].append((topic, payload))

            link.subscribe(node_events_topic(link.node_id), record)
        async with links[0], links[1]:
            await service.publish(node_events_topic(node_a), b"for a")
            async with asyncio.timeout(5):
                while not got[node_a]:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
    assert got == {node_a: [(node_events_topic(node_a), b"for a")], node_b: []}


async def test_a_failing_publication_handler_stops_nothing(mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    node = node_id(td, "a")
    got: list[bytes] = []

    async def failing(topic: str, payload: bytes) -> None:
        got.append(payload)
        raise RuntimeError("handler bug")

    async with serving(mosquitto_broker, td, FakeAuthority()) as service:
        link = link_for(mosquitto_broker, td, node)
        link.subscribe(node_events_topic(node), failing)
        async with link:
            await service.publish(node_events_topic(node), b"first")
            await service.publish(node_events_topic(node), b"second")
            request = nonce_request(node)
            assert await link.call(REQUEST_TOPIC, request, timeout=5) == answer_to(request)
            async with asyncio.timeout(5):
                while len(got) < 2:
                    await asyncio.sleep(0.01)
    assert got == [b"first", b"second"]


async def test_the_link_refuses_what_is_not_a_request_topic(mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    async with link_for(mosquitto_broker, td, node_id(td, "a")) as link:
        with pytest.raises(ValueError, match="not a request topic"):
            await link.call("revocations", b"{}", timeout=1)
        with pytest.raises(ValueError, match="not a publication topic"):
            link.subscribe("authority/attest", FakeAuthority().handle)  # type: ignore[arg-type]


async def test_a_reply_nobody_waits_for_is_ignored(mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    node = node_id(td, "a")
    async with serving(mosquitto_broker, td, FakeAuthority()), link_for(mosquitto_broker, td, node) as link, \
            raw_client(mosquitto_broker, "stray") as stray:
        reply_topic = f"vouchd/v1/{td}/nodes/{node_key(node)}/resp"
        await stray.publish(reply_topic, b"no correlation data", qos=1)
        stray_reply = publish_properties(correlation=secrets.token_bytes(16), expiry_seconds=5)
        await stray.publish(reply_topic, b"a call nobody made", qos=1, properties=stray_reply)
        request = nonce_request(node)
        assert await link.call(REQUEST_TOPIC, request, timeout=5) == answer_to(request)
        assert link.status().calls_in_flight == 0


async def test_a_replica_that_stops_answers_what_it_holds_and_the_others_take_the_rest(
        mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    node = node_id(td, "a")
    started = asyncio.Event()

    class Slow(FakeAuthority):
        async def handle(self, topic: str, request: bytes) -> bytes:
            started.set()
            await asyncio.sleep(0.3)
            return await super().handle(topic, request)

    leaving, staying = Slow(), FakeAuthority()
    async with serving(mosquitto_broker, td, staying), link_for(mosquitto_broker, td, node) as link:
        async with serving(mosquitto_broker, td, leaving):
            calls = []
            while not started.is_set():   # until the leaving replica holds a request
                calls.append(asyncio.create_task(link.call(REQUEST_TOPIC, nonce_request(node), timeout=5)))
                await asyncio.sleep(0.02)
        # Left: what it held was answered before it went.
        async with asyncio.timeout(5):
            assert all(reply.startswith(b"signed reply to ") for reply in await asyncio.gather(*calls))
        assert leaving.seen
        before = len(staying.seen)
        for _ in range(5):
            request = nonce_request(node)
            assert await link.call(REQUEST_TOPIC, request, timeout=2) == answer_to(request)
        assert len(staying.seen) == before + 5
