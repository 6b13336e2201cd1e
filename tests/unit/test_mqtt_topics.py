"""The bus's topic names, node keys, reconnect delays and drop limits (no broker needed)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.fakes import FakeClock
from vouchd.protocol.mqtt import BusTopics, node_key
from vouchd.protocol.mqtt_connection import Backoff, BrokerTls
from vouchd.protocol.ratelimit import KeyedTokenBuckets, RateLimitedLog, TokenBucket
from vouchd.protocol.transport import node_events_topic

EK_HASH = "6a36dd4775ff" + "0123456789abcdef" * 3 + "0123"
NODE = f"spiffe://example.org/vouchd/node/tpm/{EK_HASH}"


def test_a_tpm_node_key_is_tpm_and_the_ek_hash_cut_to_a_common_name() -> None:
    key = node_key(NODE)
    assert key == f"tpm-{EK_HASH[:60]}"
    assert len(key) == 64  # the longest X.509 commonName: a broker can take it from the certificate


@pytest.mark.parametrize(("node_id", "key"), [
    ("spiffe://example.org/vouchd/node/key/" + "ab" * 32, "key-" + "ab" * 30),
    ("spiffe://example.org/vouchd/node/join/tok_3.x-Y", "join-tok_3.x-Y"),
])
def test_every_node_kind_has_a_key_of_its_own(node_id: str, key: str) -> None:
    assert node_key(node_id) == key


@pytest.mark.parametrize("not_a_node", [
    "",
    "example.org/vouchd/node/tpm/ab",
    "spiffe://example.org/vouchd/node/tpm",
    "spiffe://example.org/vouchd/node/tpm/ab/cd",
    "spiffe://example.org/vouchd/authority",
    "spiffe://example.org/web/server",
    "spiffe://example.org/vouchd/node/TPM/ab",
    "spiffe://example.org/vouchd/node/tpm/a+b",
    "spiffe://example.org/vouchd/node/tpm/#",
    "spiffe://example.org/vouchd/node/tpm/a%2Fb",
])
def test_anything_but_a_node_id_has_no_key(not_a_node: str) -> None:
    with pytest.raises(ValueError, match="not a node id"):
        node_key(not_a_node)


def test_the_bus_topics_sit_under_the_trust_domain_and_name_nodes_by_key() -> None:
    topics = BusTopics("example.org")
    assert topics.request("authority/attest") == "vouchd/v1/example.org/authority/attest"
    assert topics.shared_request("authority/request", "authority") == \
        "$share/authority/vouchd/v1/example.org/authority/request"
    assert topics.replies(NODE) == f"vouchd/v1/example.org/nodes/tpm-{EK_HASH[:60]}/resp"
    assert topics.publication("revocations") == "vouchd/v1/example.org/revocations"
    assert topics.publication("bundle") == "vouchd/v1/example.org/bundle"
    assert topics.publication(node_events_topic(NODE)) == f"vouchd/v1/example.org/nodes/tpm-{EK_HASH[:60]}/events"
    assert topics.retained("revocations") and topics.retained("bundle")
    assert not topics.retained(node_events_topic(NODE))


def test_a_node_of_another_trust_domain_gets_no_topic() -> None:
    with pytest.raises(ValueError, match=r"not in the trust domain example\.org"):
        BusTopics("example.org").replies(f"spiffe://other.org/vouchd/node/tpm/{EK_HASH}")


@pytest.mark.parametrize("topic", ["authority/other", "revocations", "nodes/x/resp", "#", "authority/+"])
def test_only_the_two_request_topics_can_carry_requests(topic: str) -> None:
    with pytest.raises(ValueError, match="not a request topic"):
        BusTopics("example.org").request(topic)


@pytest.mark.parametrize("topic", ["authority/attest", "nodes/x/events", f"nodes/{NODE}/resp", "#", ""])
def test_only_publications_can_be_published(topic: str) -> None:
    with pytest.raises(ValueError, match="not"):
        BusTopics("example.org").publication(topic)


@pytest.mark.parametrize("trust_domain", ["", "Example.org", "a/b", "a+b", "a#b"])
def test_a_trust_domain_that_cannot_be_a_topic_level_is_refused(trust_domain: str) -> None:
    with pytest.raises(ValueError, match="trust domain"):
        BusTopics(trust_domain)


def test_a_share_group_is_one_topic_level() -> None:
    with pytest.raises(ValueError, match="one topic level"):
        BusTopics("example.org").shared_request("authority/attest", "a/b")


def test_reconnect_delays_double_up_to_the_maximum_with_jitter() -> None:
    low = Backoff(0.5, 30.0, uniform=lambda: 0.0)
    assert [low.next_delay() for _ in range(9)] == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 15.0, 15.0]
    high = Backoff(0.5, 30.0, uniform=lambda: 1.0)
    assert [high.next_delay() for _ in range(9)] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0, 30.0]
    high.reset()
    assert high.next_delay() == 0.5


def test_many_failures_do_not_overflow_the_delay() -> None:
    backoff = Backoff(0.5, 30.0, uniform=lambda: 1.0)
    for _ in range(10_000):
        delay = backoff.next_delay()
    assert delay == 30.0


def test_reconnect_delays_must_make_sense() -> None:
    with pytest.raises(ValueError, match="initial <= maximum"):
        Backoff(5.0, 1.0)


def test_a_token_bucket_allows_its_burst_then_its_rate() -> None:
    bucket = TokenBucket(2.0, 3, now=0.0)
    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.5)
    assert not bucket.take(0.5)


def test_keyed_buckets_are_per_key_and_bounded() -> None:
    buckets = KeyedTokenBuckets(1.0, 1, max_keys=2)
    assert buckets.take("a", 0.0)
    assert not buckets.take("a", 0.0)
    assert buckets.take("b", 0.0)
    assert buckets.take("c", 0.0)      # "a" is forgotten: memory stays bounded
    assert buckets.take("a", 0.0)


def test_the_drop_log_says_how_many_lines_it_held_back(caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    drops = RateLimitedLog(logging.getLogger("test.drops"), interval=10.0, monotonic=clock.monotonic)
    with caplog.at_level(logging.WARNING, "test.drops"):
        assert drops.warning("oversized", "dropped one", {"bytes": 1})
        assert not drops.warning("oversized", "dropped one")
        assert not drops.warning("oversized", "dropped one")
        assert drops.warning("undecodable", "dropped another")
        clock.advance(10.0)
        assert drops.warning("oversized", "dropped one")
    records = [(r.__dict__["reason"], r.__dict__["suppressed"]) for r in caplog.records]
    assert records == [("oversized", 0), ("undecodable", 0), ("oversized", 2)]


def test_broker_tls_needs_a_certificate_for_a_key(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs its certificate"):
        BrokerTls(ca_file=tmp_path / "ca.pem", key_file=tmp_path / "key.pem")


def test_broker_tls_reads_its_files_when_asked(tmp_path: Path) -> None:
    tls = BrokerTls(ca_file=tmp_path / "missing.pem")
    with pytest.raises(OSError):  # FileNotFoundError or ssl.SSLError, both OSError
        tls.context()
