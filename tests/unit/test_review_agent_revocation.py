"""Revocation on the agent's SVID cache: the checks the first tests left without a test of their own.

Each test here fails when one check of vouchd.agent.svids is removed or weakened: every revision an
entry revocation names counts, staleness starts right after `next_update`, a stale or banned node
refuses at once and holds back rotation, and a document that came with any reply (an issuance, a
heartbeat's sync) is applied at once rather than at the next publication.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.serialization import Encoding

from tests.fakes import FakeClock
from vouchd.agent.svids import SvidManager
from vouchd.agent.workload_api.identities import NoIdentityError, X509SvidMaterial
from vouchd.authority.ca import CertificateAuthority
from vouchd.entries import Entry
from vouchd.protocol.messages import (
    CredentialResponse,
    IssuedX509Svid,
    RevocationDocument,
    RevokedEntry,
    RevokedNode,
    X509SvidRequest,
)
from vouchd.selectors import selector_set
from vouchd.spiffe import SpiffeId, TrustDomain, TrustTier, csr_public_key

pytestmark = pytest.mark.timeout(30)

TD = TrustDomain("example.org")
NODE_ID = "spiffe://example.org/vouchd/node/tpm/" + "cd" * 32
DEADLINE = 10.0  # every await on the manager is bounded


def entry(entry_id: str, uid: int, *, revision: int = 1) -> Entry:
    return Entry(id=entry_id, revision=revision, spiffe_id=SpiffeId.parse(f"spiffe://example.org/{entry_id}"),
                 selectors=selector_set([f"unix:uid:{uid}"]))


def document(version: int, *, entries: Sequence[tuple[str, int]] = (), nodes: Sequence[tuple[int, bool]] = (),
             next_update: float | None = None) -> RevocationDocument:
    """A revocation document; `nodes` revoke this agent's own node: (before, banned)."""
    now = int(time.time())
    return RevocationDocument(
        version=version, issued_at=now, next_update=int(next_update if next_update is not None else now + 600),
        entries=tuple(RevokedEntry(entry_id=e, below_revision=below) for e, below in entries),
        nodes=tuple(RevokedNode(node_id=NODE_ID, reason="stolen", before=before, banned=banned)
                    for before, banned in nodes),
    )


class IssuingSource:
    """The node identity as the SVID manager sees it: real SVIDs from a CA for every CSR, the entry
    set for a sync, and the revocation document it holds. `on_request` runs inside each request, as
    a newer document arriving with the authority's reply would."""

    node_id = NODE_ID

    def __init__(self, ca: CertificateAuthority, entries: Sequence[Entry], *, ttl: timedelta) -> None:
        self.ca = ca
        self.entries = tuple(entries)
        self.ttl = ttl
        self.revocations: RevocationDocument | None = None
        self.on_request: Callable[[], None] | None = None
        self.requests: list[tuple[str, ...]] = []
        self._requested = asyncio.Condition()

    async def request(self, *, x509_svids: Sequence[X509SvidRequest] = (), sync_entries: bool = False,
                      jwt_svids: Sequence[object] = ()) -> CredentialResponse:
        async with self._requested:
            self.requests.append(tuple(r.entry_id for r in x509_svids))
            self._requested.notify_all()
        if self.on_request is not None:
            self.on_request()
        by_id = {e.id: e for e in self.entries}
        issued = []
        for item in x509_svids:
            spiffe_id = by_id[item.entry_id].spiffe_id
            cert = self.ca.sign_x509_svid(csr_public_key(item.csr), spiffe_id, ttl=self.ttl, tier=TrustTier.HARDWARE)
            issued.append(IssuedX509Svid(entry_id=item.entry_id, spiffe_id=str(spiffe_id),
                                         cert_chain=cert.public_bytes(Encoding.DER),
                                         expires_at=int(cert.not_valid_after_utc.timestamp())))
        return CredentialResponse(x509_svids=tuple(issued), errors=(), entries=self.entries if sync_entries else None,
                                  bundle=self.bundle_der(), nonce=b"\x00" * 16, nonce_expires_at=int(time.time()) + 30)

    def bundle_der(self) -> bytes:
        return self.ca.bundle().der()

    def jwt_bundle(self) -> bytes:
        return b""

    async def wait_for_requests(self, count: int) -> None:
        async with self._requested:
            await self._requested.wait_for(lambda: len(self.requests) >= count)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca"), TD)


@contextlib.asynccontextmanager
async def running(manager: SvidManager) -> AsyncIterator[None]:
    task = asyncio.create_task(manager.run())
    try:
        yield
    finally:
        died = task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert not died, "run() stopped by itself"


async def fetch(manager: SvidManager, uid: int) -> list[X509SvidMaterial]:
    async with asyncio.timeout(DEADLINE):
        return await manager.x509_svids(selector_set([f"unix:uid:{uid}"]))


async def test_every_revision_a_document_revokes_counts_not_only_the_last_listed(ca: CertificateAuthority) -> None:
    source = IssuingSource(ca, [entry("web", 1000, revision=2)], ttl=timedelta(hours=1))
    manager = SvidManager(source)
    await manager.set_entries(source.entries)
    async with running(manager):
        await fetch(manager, 1000)
        source.revocations = document(1, entries=[("web", 3), ("web", 2)])

        assert manager.affected_by(source.revocations)
        assert await manager.apply_revocations()

        assert manager.svids == [] and manager.entries == [], "revision 2 is below 3"


async def test_a_document_is_current_up_to_its_next_update_and_stale_right_after(ca: CertificateAuthority) -> None:
    clock = FakeClock(1_800_000_000.0)
    source = IssuingSource(ca, [], ttl=timedelta(hours=1))
    source.revocations = document(1, next_update=clock.now() + 600)
    manager = SvidManager(source, clock=clock)

    clock.advance(600)
    assert manager.stale_since() is None, "next_update itself is still current"
    clock.advance(0.5)
    assert manager.stale_since() == clock.now() - 0.5


@pytest.mark.parametrize(
    ("held", "refusal"),
    [
        (document(1, nodes=[(int(time.time()), True)]), "node is banned: stolen"),
        (document(1, next_update=time.time() - 1), "node is stale"),
    ],
    ids=["banned", "stale"],
)
async def test_a_refusing_node_answers_at_once_without_queueing_issuance(
        ca: CertificateAuthority, held: RevocationDocument, refusal: str) -> None:
    """No issuance loop runs here: a refusal that waited for the loop would never come."""
    source = IssuingSource(ca, [entry("web", 1000)], ttl=timedelta(hours=1))
    manager = SvidManager(source)
    source.revocations = held
    await manager.apply_revocations()
    await manager.set_entries(source.entries)  # as a sync could bring them back

    with pytest.raises(NoIdentityError, match=refusal):
        await fetch(manager, 1000)
    assert source.requests == []


async def test_a_stale_node_holds_back_rotation_and_resumes_once_a_fresh_document_arrives(
        ca: CertificateAuthority) -> None:
    # 4 s SVIDs: rotation is due after 1.35-2.2 s (half the lifetime, ±10 %), expiry after 3-4 s.
    source = IssuingSource(ca, [entry("web", 1000)], ttl=timedelta(seconds=4))
    manager = SvidManager(source)
    await manager.set_entries(source.entries)
    async with running(manager):
        (issued,) = await fetch(manager, 1000)
        source.revocations = document(1, next_update=time.time() - 1)

        assert await fetch(manager, 1000) == [issued], "what it holds is still served"
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(source.wait_for_requests(2), timeout=2.5)  # past the rotation time

        source.revocations = document(2)  # the authority is heard from again
        await manager.apply_revocations()
        async with asyncio.timeout(DEADLINE):
            await manager.wait_for_change(manager.version)  # the old SVID expires and leaves the cache
        (renewed,) = await fetch(manager, 1000)

    assert renewed != issued, "issuance resumes at once: the refusals while stale hold nothing back"
    assert source.requests == [("web",), ("web",)]


async def test_a_document_that_came_with_an_issuance_reply_is_applied_at_once(ca: CertificateAuthority) -> None:
    a, b, c = entry("a", 1000), entry("b", 2000), entry("c", 3000)
    source = IssuingSource(ca, [a, b, c], ttl=timedelta(hours=1))
    manager = SvidManager(source)
    await manager.set_entries([a, b, c])
    async with running(manager):
        await fetch(manager, 1000)
        await fetch(manager, 2000)
        source.on_request = lambda: setattr(source, "revocations", document(1, entries=[("b", 2)]))

        await fetch(manager, 3000)

        assert [s.entry_id for s in manager.svids] == ["a", "c"]
        with pytest.raises(NoIdentityError, match="no registration entry matches"):
            await fetch(manager, 2000)


async def test_a_heartbeat_sync_applies_the_document_its_reply_brought(ca: CertificateAuthority) -> None:
    source = IssuingSource(ca, [entry("web", 1000)], ttl=timedelta(hours=1))
    manager = SvidManager(source)
    await manager.set_entries(source.entries)
    async with running(manager):
        await fetch(manager, 1000)
        version = manager.version
        source.on_request = lambda: setattr(source, "revocations", document(1, nodes=[(int(time.time()) + 1, False)]))

        async with asyncio.timeout(DEADLINE):
            await manager.sync_entries()

        assert manager.svids == [], "the node's revocation voids what it held"
        assert manager.version == version + 1, "one change for the stream"
