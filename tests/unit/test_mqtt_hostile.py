"""Hostile messages on the bus: each is dropped (or answered to the node it names, never to the
sender's choice), counted, and the authority's service keeps serving."""

from __future__ import annotations

import asyncio
import json
import secrets

import pytest
from paho.mqtt.properties import Properties

from tests.mosquitto import (
    FakeAuthority,
    Mosquitto,
    answer_to,
    link_for,
    mosquitto_broker,
    new_trust_domain,
    next_message,
    no_message,
    node_id,
    nonce_request,
    raw_client,
    serving,
)
from vouchd.protocol.codec import encode
from vouchd.protocol.messages import NonceRequest
from vouchd.protocol.mqtt import MqttAuthorityService, ServiceLimits, node_key
from vouchd.protocol.mqtt_connection import publish_properties
from vouchd.protocol.transport import REQUEST_TOPIC

__all__ = ["mosquitto_broker"]


def with_correlation(correlation: bytes | None = None) -> Properties:
    return publish_properties(correlation=correlation or secrets.token_bytes(16), expiry_seconds=10)


async def settled(service: MqttAuthorityService, received: int) -> None:
    """Wait (at most 5 s) until the service has taken `received` messages off the bus."""
    async with asyncio.timeout(5):
        while service.stats().received < received:
            await asyncio.sleep(0.005)


async def dropped(service: MqttAuthorityService, reason: str, count: int) -> None:
    """Wait (at most 5 s) until the service has dropped `count` messages for `reason`."""
    async with asyncio.timeout(5):
        while service.stats().dropped.get(reason, 0) < count:
            await asyncio.sleep(0.005)


async def still_serves(broker: Mosquitto, trust_domain: str, authority: FakeAuthority) -> None:
    """An honest node's request is answered, at once."""
    node = node_id(trust_domain, "honest")
    async with link_for(broker, trust_domain, node) as link:
        request = nonce_request(node)
        assert await link.call(REQUEST_TOPIC, request, timeout=2) == answer_to(request)


def json_bytes(value: object) -> bytes:
    return json.dumps(value).encode()


@pytest.mark.parametrize(("payload", "reason"), [
    (b"\x00\xffnot json at all", "undecodable"),
    (b"[1, 2, 3]", "undecodable"),
    (json_bytes({"kind": "nonce_request", "v": 1, "node_id": "x", "request_id": "AAAA", "extra": 1}), "undecodable"),
    (json_bytes({"kind": "nonce_request", "v": 2, "node_id": "x", "request_id": "AAAA"}), "undecodable"),
    (json_bytes({"kind": "no_such_kind", "v": 1}), "undecodable"),
    (json_bytes({"kind": "nonce_request", "v": 1, "node_id": 7, "request_id": "AAAA"}), "undecodable"),
    (encode(NonceRequest(node_id="spiffe://example.org/web/server", request_id=b"x" * 16)), "no_node"),
    (encode(NonceRequest(node_id="not a spiffe id", request_id=b"x" * 16)), "no_node"),
])
async def test_a_request_that_does_not_decode_or_names_no_node_is_dropped(
        mosquitto_broker: Mosquitto, payload: bytes, reason: str) -> None:
    td = new_trust_domain()
    authority = FakeAuthority()
    async with serving(mosquitto_broker, td, authority) as service, \
            raw_client(mosquitto_broker, "hostile") as hostile, raw_client(mosquitto_broker, "watcher") as watcher:
        await watcher.subscribe(f"vouchd/v1/{td}/nodes/#", qos=1)
        await hostile.publish(f"vouchd/v1/{td}/authority/request", payload, qos=1, properties=with_correlation())
        await settled(service, 1)
        assert service.stats().dropped == {reason: 1}
        assert authority.seen == []
        await no_message(watcher)
        await still_serves(mosquitto_broker, td, authority)


async def test_a_node_of_another_trust_domain_is_dropped(mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    authority = FakeAuthority()
    async with serving(mosquitto_broker, td, authority) as service, raw_client(mosquitto_broker, "hostile") as hostile:
        foreign = node_id("other.example", "a")
        await hostile.publish(f"vouchd/v1/{td}/authority/attest", nonce_request(foreign), qos=1,
                              properties=with_correlation())
        await settled(service, 1)
        assert service.stats().dropped == {"no_node": 1}
        assert authority.seen == []


async def test_a_request_without_correlation_data_is_dropped(mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    authority = FakeAuthority()
    async with serving(mosquitto_broker, td, authority) as service, raw_client(mosquitto_broker, "hostile") as hostile:
        request = nonce_request(node_id(td, "a"))
        await hostile.publish(f"vouchd/v1/{td}/authority/request", request, qos=1)
        await hostile.publish(f"vouchd/v1/{td}/authority/request", request, qos=1,
                              properties=with_correlation(b"c" * 65))
        await settled(service, 2)
        assert service.stats().dropped == {"no_correlation": 2}
        assert authority.seen == []


async def test_an_oversized_request_is_dropped_before_it_is_read(mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    authority = FakeAuthority()
    limits = ServiceLimits(max_request_bytes=4096, per_node_rate=100, per_node_burst=100)
    async with serving(mosquitto_broker, td, authority, limits=limits) as service, \
            raw_client(mosquitto_broker, "hostile") as hostile:
        topic = f"vouchd/v1/{td}/authority/request"
        node = node_id(td, "big")
        # Over the service's limit, within the packet size it told the broker: dropped on its length,
        # though it would decode (the padding is inside a valid message).
        big = encode(NonceRequest(node_id=node, request_id=b"x" * 4000))
        assert len(big) > 4096
        await hostile.publish(topic, big, qos=1, properties=with_correlation())
        await settled(service, 1)
        assert service.stats().dropped == {"oversized": 1}
        # Far over (beyond the MQTT 5 maximum packet size): the broker never delivers it.
        await hostile.publish(topic, b"x" * (256 * 1024), qos=1, properties=with_correlation())
        await still_serves(mosquitto_broker, td, authority)
        assert service.stats().received == 2
        assert [request for _, request in authority.seen if node.encode() in request] == []


async def test_a_request_naming_another_node_is_answered_to_that_node_only(mosquitto_broker: Mosquitto) -> None:
    """Node A sends a request naming node B, asks for the reply on its own topic and claims to be B:
    the reply goes to B's topic, the one the request names, and nowhere else."""
    td = new_trust_domain()
    node_a, node_b = node_id(td, "a"), node_id(td, "b")
    topic_a = f"vouchd/v1/{td}/nodes/{node_key(node_a)}/resp"
    topic_b = f"vouchd/v1/{td}/nodes/{node_key(node_b)}/resp"
    authority = FakeAuthority()
    async with serving(mosquitto_broker, td, authority), raw_client(mosquitto_broker, "a") as sender, \
            raw_client(mosquitto_broker, "b") as node_b_client:
        await sender.subscribe(f"vouchd/v1/{td}/#", qos=1)
        await node_b_client.subscribe(topic_b, qos=1)
        request = nonce_request(node_b)
        correlation = secrets.token_bytes(16)
        properties = publish_properties(correlation=correlation, expiry_seconds=10)
        properties.ResponseTopic = topic_a
        properties.UserProperty = [("vouchd-node", node_a)]
        await sender.publish(f"vouchd/v1/{td}/authority/request", request, qos=1, properties=properties)
        reply = await next_message(node_b_client)
        assert reply.topic.value == topic_b
        assert reply.payload == answer_to(request)
        assert getattr(reply.properties, "CorrelationData", None) == correlation
        # The sender sees its own request go by, and no reply on any topic of its choosing.
        own = await next_message(sender)
        assert own.topic.value == f"vouchd/v1/{td}/authority/request"
        seen_by_sender = []
        try:
            while True:
                seen_by_sender.append((await next_message(sender, 0.3)).topic.value)
        except TimeoutError:
            pass
        assert topic_a not in seen_by_sender


async def test_a_flood_from_one_node_is_dropped_and_others_are_still_served(mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    authority = FakeAuthority()
    limits = ServiceLimits(per_node_rate=1.0, per_node_burst=5, total_rate=10_000, total_burst=10_000)
    async with serving(mosquitto_broker, td, authority, limits=limits) as service, \
            raw_client(mosquitto_broker, "flooder") as flooder:
        flooding = node_id(td, "flooder")
        for _ in range(300):
            await flooder.publish(f"vouchd/v1/{td}/authority/request", nonce_request(flooding), qos=0,
                                  properties=with_correlation())
        await settled(service, 300)
        handed_over = sum(1 for _, request in authority.seen if flooding.encode() in request)
        assert handed_over <= 6  # the burst, and what one second's rate refilled meanwhile
        assert service.stats().dropped["node_rate"] == 300 - handed_over
        await still_serves(mosquitto_broker, td, authority)


async def test_a_flood_over_the_total_rate_is_dropped(mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    authority = FakeAuthority()
    limits = ServiceLimits(per_node_rate=100, per_node_burst=100, total_rate=1.0, total_burst=20)
    async with serving(mosquitto_broker, td, authority, limits=limits) as service, \
            raw_client(mosquitto_broker, "flooder") as flooder:
        for i in range(100):
            await flooder.publish(f"vouchd/v1/{td}/authority/request", nonce_request(node_id(td, str(i))), qos=0,
                                  properties=with_correlation())
        await settled(service, 100)
        assert len(authority.seen) <= 21
        assert service.stats().dropped["total_rate"] == 100 - len(authority.seen)


async def test_an_authority_that_fails_or_hangs_gets_no_reply_sent_and_serving_goes_on(
        mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    hang, crash = node_id(td, "hang"), node_id(td, "crash")

    class Troubled(FakeAuthority):
        async def handle(self, topic: str, request: bytes) -> bytes:
            if hang.encode() in request:
                await asyncio.sleep(3600)
            if crash.encode() in request:
                raise RuntimeError("bug in the authority")
            return await super().handle(topic, request)

    authority = Troubled()
    limits = ServiceLimits(per_node_rate=100, per_node_burst=100, handler_timeout=0.3)
    async with serving(mosquitto_broker, td, authority, limits=limits) as service, \
            raw_client(mosquitto_broker, "watcher") as watcher:
        await watcher.subscribe(f"vouchd/v1/{td}/nodes/#", qos=1)
        for node in (hang, crash):
            async with link_for(mosquitto_broker, td, node) as link:
                with pytest.raises(Exception, match="did not answer"):
                    await link.call(REQUEST_TOPIC, nonce_request(node), timeout=0.5)
        await no_message(watcher, 0.1)
        assert service.stats().handler_failures == 2
        assert service.stats().in_flight == 0
        await still_serves(mosquitto_broker, td, authority)


async def test_requests_beyond_the_concurrency_bound_wait_their_turn(mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    running = 0
    most = 0
    release = asyncio.Event()

    class Counting(FakeAuthority):
        async def handle(self, topic: str, request: bytes) -> bytes:
            nonlocal running, most
            running += 1
            most = max(most, running)
            await release.wait()
            running -= 1
            return await super().handle(topic, request)

    limits = ServiceLimits(per_node_rate=100, per_node_burst=100, max_concurrent=3)
    async with serving(mosquitto_broker, td, Counting(), limits=limits) as service:
        links = [link_for(mosquitto_broker, td, node_id(td, str(i))) for i in range(6)]
        for link in links:
            await link.__aenter__()
        try:
            calls = [asyncio.create_task(link.call(REQUEST_TOPIC, nonce_request(link.node_id), timeout=5))
                     for link in links]
            await settled(service, 3)
            await asyncio.sleep(0.1)
            assert running == 3
            release.set()
            async with asyncio.timeout(5):
                await asyncio.gather(*calls)
        finally:
            for link in links:
                await link.__aexit__(None, None, None)
    assert most == 3


async def test_a_retained_message_a_node_writes_is_refused_by_signatures_not_by_the_bus(
        mosquitto_broker: Mosquitto) -> None:
    """Without an ACL, anyone can publish on `revocations`: the link hands it over like any other
    publication, and the agent's verifier refuses it (it is not signed by the authority). The
    broker's ACL (examples/mosquitto) keeps nodes from writing there at all."""
    td = new_trust_domain()
    node = node_id(td, "a")
    got: asyncio.Queue[bytes] = asyncio.Queue()

    async def record(topic: str, payload: bytes) -> None:
        await got.put(payload)

    async with raw_client(mosquitto_broker, "forger") as forger:
        await forger.publish(f"vouchd/v1/{td}/revocations", b"forged document", qos=1, retain=True)
        link = link_for(mosquitto_broker, td, node)
        link.subscribe("revocations", record)
        async with link, asyncio.timeout(5):
            assert await got.get() == b"forged document"


async def test_a_burst_beyond_the_waiting_queue_is_dropped_and_serving_goes_on(mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    release = asyncio.Event()

    class Stuck(FakeAuthority):
        async def handle(self, topic: str, request: bytes) -> bytes:
            await release.wait()
            return await super().handle(topic, request)

    authority = Stuck()
    limits = ServiceLimits(per_node_rate=1000, per_node_burst=1000, max_concurrent=1, max_queued=5,
                           max_queued_bytes=64 * 1024 * 1024)
    async with serving(mosquitto_broker, td, authority, limits=limits) as service, \
            raw_client(mosquitto_broker, "burst") as burst:
        for i in range(50):
            await burst.publish(f"vouchd/v1/{td}/authority/request", nonce_request(node_id(td, str(i))), qos=1,
                                properties=with_correlation())
        # One in the authority's hands, one taken off the queue waiting for a slot, five queued.
        await dropped(service, "queue_full", 50 - 7)
        release.set()
        await still_serves(mosquitto_broker, td, authority)
        assert len(authority.seen) == 7 + 1
        assert service.stats().dropped == {"queue_full": 43}


async def test_the_waiting_queue_is_bounded_in_bytes_too(mosquitto_broker: Mosquitto) -> None:
    td = new_trust_domain()
    release = asyncio.Event()

    class Stuck(FakeAuthority):
        async def handle(self, topic: str, request: bytes) -> bytes:
            await release.wait()
            return await super().handle(topic, request)

    authority = Stuck()
    limits = ServiceLimits(per_node_rate=1000, per_node_burst=1000, max_concurrent=1, max_request_bytes=64 * 1024,
                           max_queued_bytes=128 * 1024)
    async with serving(mosquitto_broker, td, authority, limits=limits) as service, \
            raw_client(mosquitto_broker, "burst") as burst:
        for i in range(20):
            big = encode(NonceRequest(node_id=node_id(td, str(i)), request_id=b"x" * 30_000))  # ~40 KB
            await burst.publish(f"vouchd/v1/{td}/authority/request", big, qos=1, properties=with_correlation())
        # 128 KiB hold three of them, besides the one handled and the one waiting for a slot.
        await dropped(service, "queue_full", 20 - 5)
        release.set()
        async with asyncio.timeout(5):
            while service.stats().answered < 5:
                await asyncio.sleep(0.01)
        assert service.stats().dropped == {"queue_full": 15}
