"""Rate limits on attestation: per node and in total, checked before anything expensive."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fakes import FakeClock
from tests.unit.test_authority_server import reply_of, start
from vouchd.authority.server import Authority
from vouchd.protocol.codec import encode
from vouchd.protocol.messages import AttestNonceRequest, ErrorReply, NonceGrant
from vouchd.protocol.ratelimit import KeyedTokenBuckets, TokenBucket
from vouchd.protocol.transport import ATTEST_TOPIC

pytestmark = pytest.mark.timeout(20)

NODE_A = "spiffe://example.org/vouchd/node/tpm/" + "a" * 64
NODE_B = "spiffe://example.org/vouchd/node/tpm/" + "b" * 64


def test_a_bucket_spends_its_burst_then_refills_at_its_rate() -> None:
    bucket = TokenBucket(rate=2.0, burst=3, now=0.0)

    assert [bucket.take(0.0) for _ in range(4)] == [True, True, True, False]
    assert bucket.take(0.4) is False, "0.8 of a token is not one"
    assert bucket.take(0.5) is True
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False], "never more than the burst"


def test_keyed_buckets_are_apart_and_bounded_in_number() -> None:
    buckets = KeyedTokenBuckets(rate=1.0, burst=1, max_keys=2)

    assert buckets.take("a", 0.0) and not buckets.take("a", 0.0)
    assert buckets.take("b", 0.0), "another key has its own bucket"
    assert buckets.take("c", 0.0)  # "a" is forgotten: three keys never held at once
    assert buckets.take("a", 0.0), "a forgotten key starts full again"


@pytest.fixture
async def authority(tmp_path: Path) -> AsyncIterator[Authority]:
    instance = await start(tmp_path / "authority", clock=FakeClock())
    yield instance
    await instance.close()


async def ask(authority: Authority, node_id: str) -> object:
    return reply_of(await authority.handle(ATTEST_TOPIC, encode(AttestNonceRequest(node_id, b"r"))))


async def test_a_flood_of_attestation_nonce_requests_for_one_node_is_refused_and_others_go_on(
        authority: Authority) -> None:
    answers = [await ask(authority, NODE_A) for _ in range(12)]

    granted = [a for a in answers if isinstance(a, NonceGrant)]
    refused = [a for a in answers if isinstance(a, ErrorReply)]
    assert len(granted) == 10 and len(refused) == 2
    assert all(r.code == "busy" for r in refused)
    assert isinstance(await ask(authority, NODE_B), NonceGrant), "another node is not held up"


async def test_an_attestation_nonce_is_refused_for_what_is_not_a_node_id(authority: Authority) -> None:
    answer = await ask(authority, "not a spiffe id")

    assert isinstance(answer, ErrorReply) and answer.code == "bad_request"
