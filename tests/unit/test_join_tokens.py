"""Join tokens: a host without a TPM joins a fleet authority once with a single-use token, then
proves itself with its node key alone. A real authority on a real store; no TPM anywhere."""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from tests.fakes import FakeClock
from tests.unit.test_authority_server import start
from vouchd.agent.node import NodeIdentity
from vouchd.agent.provers import KeyProver, NodeAttestationError, join_token_reader
from vouchd.authority.admin import AdminRequestError
from vouchd.authority.server import Authority
from vouchd.authority.tokenadmin import TokenAdmin
from vouchd.protocol.errors import RemoteError
from vouchd.protocol.transport import LocalTransport
from vouchd.spiffe import TrustDomain

pytestmark = pytest.mark.timeout(20)

TRUST_DOMAIN = TrustDomain("example.org")


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())  # certificate checks of the reply signer read the system clock


@pytest.fixture
async def authority(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Authority]:
    instance = await start(tmp_path / "authority", clock=clock)  # a fleet authority: nothing enrolled
    yield instance
    await instance.close()


class CountingToken:
    def __init__(self, text: str | None) -> None:
        self.text, self.reads = text, 0

    def __call__(self) -> str | None:
        self.reads += 1
        return self.text


def node_with(authority: Authority, clock: FakeClock, token: CountingToken,
              key: ec.EllipticCurvePrivateKey | None = None) -> NodeIdentity:
    prover = KeyProver(key or ec.generate_private_key(ec.SECP256R1()), trust_domain=TRUST_DOMAIN, join_token=token)
    return NodeIdentity(prover=prover, transport=LocalTransport(authority.handle), trust_domain=TRUST_DOMAIN,
                        initial_bundle=authority.bundle, clock=clock)


async def create(authority: Authority, **args: object) -> dict[str, object]:
    created = await TokenAdmin(authority).token_create(args)
    assert isinstance(created, dict)
    return created


async def test_a_host_joins_once_with_a_token_then_with_its_key_alone(authority: Authority, clock: FakeClock,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    created = await create(authority, node_labels=["role:edge"])
    token = CountingToken(str(created["token"]))
    key = ec.generate_private_key(ec.SECP256R1())
    node = node_with(authority, clock, token, key)

    await node.attest()
    restarted = node_with(authority, clock, token, key)
    await restarted.attest()  # restarted: the key is enrolled now
    assert restarted.status is not None and "node:label:role:edge" in restarted.status.selectors, \
        "the token's labels stay the node's"

    assert token.reads == 1, "the token is sent once, while the key is not yet enrolled"
    status = node.status
    assert status is not None and status.tier == "static-secret"
    assert "node:label:role:edge" in status.selectors
    (listed,) = await TokenAdmin(authority).token_list({})
    assert listed["used_by"] == node.node_id
    secret = str(created["token"]).split(".")[1]
    assert secret not in caplog.text, "the token's secret is never logged"
    assert all(secret not in str(v) for v in listed.values())


async def test_a_token_is_single_use(authority: Authority, clock: FakeClock) -> None:
    created = await create(authority)
    await node_with(authority, clock, CountingToken(str(created["token"]))).attest()

    with pytest.raises(RemoteError) as refused:
        await node_with(authority, clock, CountingToken(str(created["token"]))).attest()
    assert refused.value.code == "not_enrolled" and "used" in refused.value.reason


async def test_an_expired_token_is_refused(authority: Authority, clock: FakeClock) -> None:
    created = await create(authority, ttl="1m")
    clock.advance(61)

    with pytest.raises(RemoteError) as refused:
        await node_with(authority, clock, CountingToken(str(created["token"]))).attest()
    assert refused.value.code == "not_enrolled"


@pytest.mark.parametrize("text", ["nonsense", "0123456789abcdef." + "x" * 10, "ZZZZ" * 4 + "." + "a" * 43])
async def test_a_malformed_token_is_refused_without_echoing_it(authority: Authority, clock: FakeClock,
                                                               text: str) -> None:
    with pytest.raises(RemoteError) as refused:
        await node_with(authority, clock, CountingToken(text)).attest()
    assert refused.value.code == "bad_request" and text not in str(refused.value)


async def test_a_wrong_secret_for_a_real_token_id_is_refused(authority: Authority, clock: FakeClock) -> None:
    created = await create(authority)
    token_id = str(created["id"])

    with pytest.raises(RemoteError) as refused:
        await node_with(authority, clock, CountingToken(f"{token_id}.{'A' * 43}")).attest()
    assert refused.value.code == "not_enrolled"
    (listed,) = await TokenAdmin(authority).token_list({})
    assert listed["used_by"] is None, "the real token is still unused"


async def test_without_a_token_a_key_is_not_let_in(authority: Authority, clock: FakeClock) -> None:
    with pytest.raises(RemoteError) as refused:
        await node_with(authority, clock, CountingToken(None)).attest()
    assert refused.value.code == "not_enrolled" and "vouchd token create" in refused.value.reason


@pytest.mark.parametrize(("args", "message"), [
    ({"ttl": "8d"}, "ttl must be between"),
    ({"ttl": "soon"}, "ttl:"),
    ({"node_labels": ["nocolon"]}, "node label 'nocolon'"),
    ({"node_labels": "role:web"}, "node_labels: expected a list"),
    ({"expires": "1h"}, "unknown argument 'expires'"),
])
async def test_bad_token_requests_are_refused_naming_what_is_wrong(authority: Authority, args: dict[str, object],
                                                                   message: str) -> None:
    with pytest.raises(AdminRequestError, match=message):
        await TokenAdmin(authority).token_create(args)
    assert await TokenAdmin(authority).token_list({}) == []


def test_the_token_file_must_be_root_only(tmp_path: Path) -> None:
    path = tmp_path / "join-token"
    path.write_text("0123456789abcdef." + "a" * 43 + "\n")
    path.chmod(0o644)

    with pytest.raises(NodeAttestationError, match=r"agent\.join_token_file") as refused:
        join_token_reader(path)()
    assert "a" * 43 not in str(refused.value)

    path.chmod(0o600)
    assert join_token_reader(path)() == "0123456789abcdef." + "a" * 43


async def test_a_token_never_enrols_a_key_under_a_node_id_not_derived_from_it(authority: Authority) -> None:
    from dataclasses import replace as with_changes

    from tests.unit.test_authority_server import reply_of
    from vouchd.protocol.codec import encode
    from vouchd.protocol.keyproof import node_key_spki
    from vouchd.protocol.messages import ErrorReply, KeyAttestRequest
    from vouchd.protocol.transport import ATTEST_TOPIC

    created = await create(authority)
    spki = node_key_spki(ec.generate_private_key(ec.SECP256R1()).public_key())
    hardware_node = "spiffe://example.org/vouchd/node/tpm/" + "c" * 64  # a TPM node's identity
    request = with_changes(KeyAttestRequest(hardware_node, spki), join_token=str(created["token"]))

    reply = reply_of(await authority.handle(ATTEST_TOPIC, encode(request)))

    assert isinstance(reply, ErrorReply) and reply.code == "bad_request"
    (listed,) = await TokenAdmin(authority).token_list({})
    assert listed["used_by"] is None and await authority.store.node_key(hardware_node) is None


async def test_a_banned_node_is_refused_and_its_token_not_even_read(authority: Authority, clock: FakeClock) -> None:
    created = await create(authority)
    token = CountingToken(str(created["token"]))
    node = node_with(authority, clock, token)
    await authority.store.ban_node(node.node_id, "test", now=clock.now())

    with pytest.raises(RemoteError) as refused:
        await node.attest()
    assert refused.value.code == "banned" and token.reads == 0
