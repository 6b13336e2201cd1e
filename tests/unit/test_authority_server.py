"""The authority's wire surface without a TPM: malformed input, its own key file."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path

import pytest

from tests.fakes import FakeClock
from vouchd.authority.build import open_authority
from vouchd.authority.errors import AuthorityError
from vouchd.authority.server import Authority
from vouchd.config import AuthorityConfig
from vouchd.decisions import DecisionBus
from vouchd.protocol.codec import decode_as, encode
from vouchd.protocol.messages import ErrorReply, NonceRequest, ReplyPayload, SignedReply
from vouchd.protocol.transport import ATTEST_TOPIC, REQUEST_TOPIC
from vouchd.spiffe import TrustDomain

TRUST_DOMAIN = TrustDomain("example.org")


def config(state_dir: Path) -> AuthorityConfig:
    return AuthorityConfig(
        state_dir=state_dir, ek_roots=(), ek_intermediates=(), enrolment="allowlist",
        enrolled_ek_hashes=frozenset(), pcr_bank="sha256", pcr_indices=tuple(range(8)),
        accept_missing_event_log=False, ca_ttl=timedelta(days=30), node_svid_ttl=timedelta(hours=1),
        x509_svid_ttl=timedelta(hours=1), x509_svid_max_ttl=timedelta(hours=24),
    )


class RecordingBus:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes) -> None:
        self.published.append((topic, payload))


async def start(state_dir: Path, *, clock: FakeClock | None = None, bus: RecordingBus | None = None,
                standalone: bool = False, **changes: object) -> Authority:
    values = {**vars(config(state_dir)), **changes}
    return await open_authority(AuthorityConfig(**values), TRUST_DOMAIN,  # type: ignore[arg-type]
                                publisher=bus or RecordingBus(), decisions=DecisionBus(),
                                clock=clock or FakeClock(), standalone=standalone)


async def opened_and_closed(state_dir: Path) -> None:
    await (await start(state_dir)).close()


@pytest.fixture
async def authority(tmp_path: Path) -> AsyncIterator[Authority]:
    instance = await start(tmp_path / "authority")
    yield instance
    await instance.close()


def reply_of(data: bytes) -> object:
    from vouchd.protocol.codec import decode

    payload = decode_as(ReplyPayload, decode_as(SignedReply, data).payload)
    return decode(payload.reply)


@pytest.mark.parametrize(
    ("topic", "data", "code"),
    [
        (REQUEST_TOPIC, b"not json", "bad_request"),
        (REQUEST_TOPIC, b'{"kind": "nonce_request", "v": 1, "node_id": "x", "request_id": 5}', "bad_request"),
        (REQUEST_TOPIC, b'{"kind":"nonce_request","v":1,"node_id":"x","request_id":' + b"9" * 5000 + b"}",
         "bad_request"),
        (ATTEST_TOPIC, encode(NonceRequest(node_id="spiffe://example.org/x", request_id=b"r")), "bad_request"),
        (REQUEST_TOPIC, encode(NonceRequest(node_id="spiffe://example.org/x", request_id=b"r")), "reattest"),
    ],
)
async def test_every_request_gets_a_signed_reply(authority: Authority, topic: str, data: bytes, code: str) -> None:
    reply = reply_of(await authority.handle(topic, data))
    assert isinstance(reply, ErrorReply)
    assert reply.code == code


async def test_reply_signing_key_is_private_and_stable(tmp_path: Path) -> None:
    state = tmp_path / "authority"
    await opened_and_closed(state)
    key = state / "reply-signing.key"
    first = key.read_bytes()
    assert key.stat().st_mode & 0o777 == 0o600

    await opened_and_closed(state)
    assert key.read_bytes() == first


async def test_a_reply_signing_key_others_can_read_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "authority"
    await opened_and_closed(state)
    (state / "reply-signing.key").chmod(0o644)

    with pytest.raises(AuthorityError, match=r"reply-signing\.key: authority signing key is accessible to group"):
        await start(state)


async def test_a_symlinked_reply_signing_key_is_refused(tmp_path: Path) -> None:
    state = tmp_path / "authority"
    await opened_and_closed(state)
    key = state / "reply-signing.key"
    os.replace(key, state / "elsewhere.key")
    key.symlink_to(state / "elsewhere.key")

    with pytest.raises(AuthorityError, match=r"reply-signing\.key: authority signing key cannot be read"):
        await start(state)
