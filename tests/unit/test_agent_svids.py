"""The agent's SVID cache: matching, one batched request per round, rotation, and failures."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, load_der_private_key

from tests.fakes import FakeClock
from vouchd.agent.svids import CachedSvid, SvidManager
from vouchd.agent.workload_api.identities import NoIdentityError, X509SvidMaterial
from vouchd.authority.ca import CertificateAuthority
from vouchd.decisions import Decision, DecisionBus, DecisionKind
from vouchd.entries import Entry
from vouchd.protocol.errors import TransportError
from vouchd.protocol.messages import (
    CredentialResponse,
    IssuedX509Svid,
    ItemError,
    JwtSvidRequest,
    RevocationDocument,
    RevokedEntry,
    RevokedNode,
    X509SvidRequest,
)
from vouchd.selectors import selector_set
from vouchd.spiffe import SpiffeId, TrustDomain, TrustTier, X509Bundle, csr_public_key, serial_hex

TD = TrustDomain("example.org")
# Every await on the manager is bounded: a regression fails the test instead of hanging it.
DEADLINE = 5.0


NODE_ID = "spiffe://example.org/vouchd/node/tpm/" + "ab" * 32


def view(entry_id: str, *selectors: str, revision: int = 1, hint: str = "") -> Entry:
    return Entry(id=entry_id, revision=revision, spiffe_id=SpiffeId.parse(f"spiffe://example.org/workload/{entry_id}"),
                 selectors=selector_set(selectors), x509_ttl=timedelta(hours=1), hint=hint)


class FakeCredentialSource:
    """Stands in for the node identity: issues real SVIDs from a CA, as the authority would.

    It records every request (the entry ids it asked for), and can be told to refuse entries, to
    answer with a certificate for another key, to fail outright, or to hold requests at a gate.
    """

    node_id = NODE_ID

    def __init__(self, ca: CertificateAuthority, entries: Sequence[Entry] = (),
                 ttl: timedelta = timedelta(hours=1)) -> None:
        self.ca = ca
        self.entries = tuple(entries)
        self.ttl = ttl
        self.requests: list[tuple[str, ...]] = []
        self.not_after: dict[str, int] = {}  # the bound each entry was last asked with (0: none)
        self.refused: dict[str, str] = {}
        self.wrong_key: set[str] = set()
        self.chain_tail = b""  # DER certificates sent after each leaf
        self.failure: Exception | None = None
        self.gate = asyncio.Event()
        self.gate.set()
        self.revocations: RevocationDocument | None = None
        self._requested = asyncio.Condition()

    async def request(self, *, x509_svids: Sequence[X509SvidRequest] = (), sync_entries: bool = False,
                      jwt_svids: Sequence[JwtSvidRequest] = ()) -> CredentialResponse:
        async with self._requested:
            self.requests.append(tuple(r.entry_id for r in x509_svids))
            self._requested.notify_all()
        await self.gate.wait()
        if self.failure is not None:
            raise self.failure
        spiffe_ids = {e.id: str(e.spiffe_id) for e in self.entries}
        issued, errors = [], []
        for item in x509_svids:
            if item.entry_id in self.refused:
                errors.append(ItemError(entry_id=item.entry_id, code=self.refused[item.entry_id],
                                        message="entry is not assigned to this node"))
                continue
            key = csr_public_key(item.csr)
            if item.entry_id in self.wrong_key:
                key = ec.generate_private_key(ec.SECP256R1()).public_key()
            spiffe_id = spiffe_ids[item.entry_id]
            self.not_after[item.entry_id] = item.not_after
            ttl = self.ttl if not item.not_after else min(self.ttl, timedelta(seconds=item.not_after - time.time()))
            cert = self.ca.sign_x509_svid(key, SpiffeId.parse(spiffe_id), ttl=ttl, tier=TrustTier.HARDWARE)
            issued.append(IssuedX509Svid(entry_id=item.entry_id, spiffe_id=spiffe_id,
                                         cert_chain=cert.public_bytes(Encoding.DER) + self.chain_tail,
                                         expires_at=int(cert.not_valid_after_utc.timestamp())))
        return CredentialResponse(x509_svids=tuple(issued), errors=tuple(errors),
                                  entries=self.entries if sync_entries else None, bundle=self.bundle().der(),
                                  nonce=b"\x00" * 16, nonce_expires_at=int(time.time()) + 30)

    def bundle(self) -> X509Bundle:
        return self.ca.bundle()

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
async def running(manager: SvidManager) -> AsyncIterator[asyncio.Task[None]]:
    """The issuance loop as a background task; leaving fails the test if the loop had stopped by itself."""
    task = asyncio.create_task(manager.run())
    try:
        yield task
    finally:
        died = task.done()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        assert not died, "run() stopped by itself"


async def manager_with(source: FakeCredentialSource) -> SvidManager:
    manager = SvidManager(source)
    await manager.set_entries(source.entries)
    return manager


async def fetch(manager: SvidManager, *selectors: str) -> list[X509SvidMaterial]:
    async with asyncio.timeout(DEADLINE):
        return await manager.x509_svids(selector_set(selectors))


def assert_usable(material: X509SvidMaterial, ca: CertificateAuthority, entry: Entry) -> x509.Certificate:
    """The material is an SVID for the entry's id, with the private key that matches it."""
    cert = x509.load_der_x509_certificate(material.cert_chain_der)
    key = load_der_private_key(material.private_key_der, password=None)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert material.spiffe_id == str(entry.spiffe_id)
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [str(entry.spiffe_id)]
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key() == cert.public_key()
    assert material.bundle_der == ca.bundle().der()
    assert material.hint == entry.hint
    return cert


# --- matching -----------------------------------------------------------------------------------


MATCHING_ENTRIES = (
    view("a-uid", "unix:uid:1000"),
    view("b-uid-and-path", "unix:uid:1000", "unix:path:/usr/bin/web"),
    view("c-root", "unix:uid:0"),
    # Its smallest selector sorts before the unix ones: matching must not depend on which is indexed.
    view("d-container", "unix:uid:1000", "container:id:abc"),
)


@pytest.mark.parametrize(
    ("selectors", "expected"),
    [
        ({"unix:uid:1000"}, ["a-uid"]),
        ({"unix:uid:1000", "unix:path:/usr/bin/web", "unix:gid:5"}, ["a-uid", "b-uid-and-path"]),
        ({"unix:path:/usr/bin/web"}, []),
        ({"unix:uid:1000", "container:id:abc"}, ["a-uid", "d-container"]),
        ({"container:id:abc"}, []),
        ({"unix:uid:0", "unix:uid:1000", "unix:path:/usr/bin/web", "container:id:abc"},
         ["a-uid", "b-uid-and-path", "c-root", "d-container"]),
        ({"unix:uid:10"}, []),
        (set(), []),
    ],
)
async def test_an_entry_matches_when_all_its_selectors_are_present(
    ca: CertificateAuthority, selectors: set[str], expected: list[str]
) -> None:
    manager = await manager_with(FakeCredentialSource(ca, MATCHING_ENTRIES))

    assert [e.id for e in manager.match(selector_set(selectors))] == expected


async def test_a_caller_no_entry_matches_gets_no_identity_and_nothing_is_requested(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, MATCHING_ENTRIES)
    manager = await manager_with(source)

    async with running(manager):
        with pytest.raises(NoIdentityError, match=r"^no registration entry matches the caller$"):
            await fetch(manager, "unix:uid:4242")

    assert source.requests == []


# --- issuance and the cache ---------------------------------------------------------------------


async def test_an_svid_is_issued_once_and_then_served_from_the_cache(ca: CertificateAuthority) -> None:
    entry = view("web", "unix:uid:1000", hint="frontend")
    source = FakeCredentialSource(ca, [entry])
    manager = await manager_with(source)

    async with running(manager):
        (first,) = await fetch(manager, "unix:uid:1000", "unix:gid:1000")
        (second,) = await fetch(manager, "unix:uid:1000")

    assert source.requests == [("web",)]
    assert second == first
    assert_usable(first, ca, entry)
    assert [s.entry_id for s in manager.svids] == ["web"]


async def test_a_caller_matching_several_entries_gets_all_in_one_request(ca: CertificateAuthority) -> None:
    entries = [view("a", "unix:uid:1000"), view("b", "unix:uid:1000", "unix:gid:50")]
    source = FakeCredentialSource(ca, entries)
    manager = await manager_with(source)

    async with running(manager):
        materials = await fetch(manager, "unix:uid:1000", "unix:gid:50")

    assert source.requests == [("a", "b")]
    for material, entry in zip(materials, entries, strict=True):
        assert_usable(material, ca, entry)


async def test_concurrent_callers_for_different_entries_share_one_request(ca: CertificateAuthority) -> None:
    entries = [view("a", "unix:uid:1"), view("b", "unix:uid:2"), view("c", "unix:uid:3")]
    source = FakeCredentialSource(ca, entries)
    manager = await manager_with(source)

    async with running(manager), asyncio.timeout(DEADLINE):
        results = await asyncio.gather(*(manager.x509_svids(selector_set([f"unix:uid:{n}"])) for n in (1, 2, 3)))

    assert source.requests == [("a", "b", "c")]
    assert [[m.spiffe_id for m in r] for r in results] == [[str(e.spiffe_id)] for e in entries]


async def test_callers_arriving_during_a_request_are_batched_into_the_next(ca: CertificateAuthority) -> None:
    entries = [view("a", "unix:uid:1"), view("b", "unix:uid:2"), view("c", "unix:uid:3")]
    source = FakeCredentialSource(ca, entries)
    manager = await manager_with(source)
    source.gate.clear()

    async with running(manager), asyncio.timeout(DEADLINE):
        first = asyncio.create_task(manager.x509_svids(selector_set(["unix:uid:1"])))
        await source.wait_for_requests(1)
        later = [asyncio.create_task(manager.x509_svids(selector_set([f"unix:uid:{n}"]))) for n in (2, 3)]
        # Scheduled after the two tasks' first steps, so both are waiting before the request returns.
        asyncio.get_running_loop().call_soon(source.gate.set)
        await asyncio.gather(first, *later)

    assert source.requests == [("a",), ("b", "c")]


async def test_concurrent_callers_for_the_same_entry_share_one_svid(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000")])
    manager = await manager_with(source)

    async with running(manager), asyncio.timeout(DEADLINE):
        results = await asyncio.gather(*(manager.x509_svids(selector_set(["unix:uid:1000"])) for _ in range(5)))

    assert source.requests == [("web",)]
    assert len({r[0].cert_chain_der for r in results}) == 1


async def test_a_caller_that_goes_away_does_not_cancel_issuance_for_the_others(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000")])
    manager = await manager_with(source)
    source.gate.clear()

    async with running(manager), asyncio.timeout(DEADLINE):
        leaving = asyncio.create_task(manager.x509_svids(selector_set(["unix:uid:1000"])))
        staying = asyncio.create_task(manager.x509_svids(selector_set(["unix:uid:1000"])))
        await source.wait_for_requests(1)
        leaving.cancel()
        source.gate.set()
        (material,) = await staying

    assert leaving.cancelled()
    assert material.spiffe_id == "spiffe://example.org/workload/web"
    assert source.requests == [("web",)]


async def test_a_caller_arriving_while_its_entry_is_in_flight_is_served_by_that_request(
    ca: CertificateAuthority,
) -> None:
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000")])
    manager = await manager_with(source)
    source.gate.clear()

    async with running(manager), asyncio.timeout(DEADLINE):
        first = asyncio.create_task(manager.x509_svids(selector_set(["unix:uid:1000"])))
        await source.wait_for_requests(1)
        # Asks for the entry the loop is issuing right now: it queues, and the result serves it.
        second = asyncio.create_task(manager.x509_svids(selector_set(["unix:uid:1000"])))
        asyncio.get_running_loop().call_soon(source.gate.set)
        (one,), (two,) = await asyncio.gather(first, second)

    assert source.requests == [("web",)]
    assert one.cert_chain_der == two.cert_chain_der


async def test_a_batch_larger_than_the_authority_takes_goes_in_parts(ca: CertificateAuthority) -> None:
    from vouchd.protocol.messages import MAX_X509_SVIDS_PER_REQUEST

    count = MAX_X509_SVIDS_PER_REQUEST + 3
    entries = [view(f"e{n:04}", "unix:uid:1000", f"unix:gid:{n}") for n in range(count)]
    source = FakeCredentialSource(ca, entries, ttl=timedelta(minutes=5))
    manager = await manager_with(source)
    caller = selector_set(["unix:uid:1000", *(f"unix:gid:{n}" for n in range(count))])

    async with running(manager), asyncio.timeout(DEADLINE * 4):
        materials = await manager.x509_svids(caller)

    assert len(materials) == count
    assert [len(r) for r in source.requests] == [MAX_X509_SVIDS_PER_REQUEST, 3]


# --- refusals and failures ----------------------------------------------------------------------


async def test_an_entry_the_authority_refuses_gives_that_caller_no_identity(ca: CertificateAuthority) -> None:
    entries = [view("allowed", "unix:uid:1000"), view("refused", "unix:uid:2000")]
    source = FakeCredentialSource(ca, entries)
    source.refused["refused"] = "not_authorized"
    manager = await manager_with(source)

    async with running(manager), asyncio.timeout(DEADLINE):
        allowed, refused = await asyncio.gather(
            manager.x509_svids(selector_set(["unix:uid:1000"])),
            manager.x509_svids(selector_set(["unix:uid:2000"])),
            return_exceptions=True,
        )

    assert isinstance(allowed, list)
    assert [m.spiffe_id for m in allowed] == ["spiffe://example.org/workload/allowed"]
    assert isinstance(refused, NoIdentityError)
    assert str(refused) == "not_authorized: entry is not assigned to this node"
    assert source.requests == [("allowed", "refused")]


async def test_a_refused_entry_is_not_asked_for_again_at_once(ca: CertificateAuthority) -> None:
    """A workload retrying in a loop must not turn into a quote and an authority request each time."""
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000")])
    source.refused["web"] = "not_authorized"
    manager = await manager_with(source)

    async with running(manager):
        for _ in range(3):
            with pytest.raises(NoIdentityError, match=r"^not_authorized: entry is not assigned to this node$"):
                await fetch(manager, "unix:uid:1000")

    assert source.requests == [("web",)]


async def test_a_caller_matching_a_refused_and_an_issued_entry_gets_the_issued_one(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [view("a", "unix:uid:1000"), view("b", "unix:uid:1000", "unix:gid:50")])
    source.refused["b"] = "not_authorized"
    manager = await manager_with(source)

    async with running(manager):
        materials = await fetch(manager, "unix:uid:1000", "unix:gid:50")

    assert [m.spiffe_id for m in materials] == ["spiffe://example.org/workload/a"]


async def test_a_certificate_for_another_key_is_refused(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000")])
    source.wrong_key.add("web")
    manager = await manager_with(source)

    async with running(manager):
        with pytest.raises(NoIdentityError, match=r"^authority returned a certificate for another key$"):
            await fetch(manager, "unix:uid:1000")

    assert manager.svids == []


async def test_a_chain_with_more_than_the_leaf_is_served_whole(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000")])
    source.chain_tail = ca.certificate.public_bytes(Encoding.DER)
    manager = await manager_with(source)

    async with running(manager):
        (material,) = await fetch(manager, "unix:uid:1000")

    split = len(material.cert_chain_der) - len(source.chain_tail)
    leaf_der, tail = material.cert_chain_der[:split], material.cert_chain_der[split:]
    key = load_der_private_key(material.private_key_der, password=None)
    assert tail == source.chain_tail
    assert x509.load_der_x509_certificate(leaf_der).public_key() == key.public_key()


async def test_a_failing_source_fails_the_waiters_and_the_loop_goes_on(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [view("a", "unix:uid:1"), view("b", "unix:uid:2")])
    source.failure = TransportError("authority did not answer")
    manager = await manager_with(source)

    async with running(manager) as loop_task:
        async with asyncio.timeout(DEADLINE):
            failed = await asyncio.gather(manager.x509_svids(selector_set(["unix:uid:1"])),
                                          manager.x509_svids(selector_set(["unix:uid:1"])), return_exceptions=True)
        assert not loop_task.done()

        source.failure = None
        (material,) = await fetch(manager, "unix:uid:2")

    for error in failed:
        assert isinstance(error, NoIdentityError)
        assert str(error).startswith("the authority did not issue an SVID")
    assert material.spiffe_id == "spiffe://example.org/workload/b"
    assert source.requests == [("a",), ("b",)]


async def test_a_failing_rotation_is_retried_after_a_pause_not_at_once(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000")], ttl=timedelta(seconds=2))
    manager = await manager_with(source)

    async with running(manager):
        await fetch(manager, "unix:uid:1000")
        source.failure = TransportError("authority did not answer")
        async with asyncio.timeout(DEADLINE):
            await source.wait_for_requests(2)  # the rotation, which fails

        with pytest.raises(TimeoutError):
            await asyncio.wait_for(source.wait_for_requests(3), timeout=0.5)


# --- entries changing ---------------------------------------------------------------------------


async def test_new_entries_drop_svids_of_removed_and_changed_entries(ca: CertificateAuthority) -> None:
    a, b, c = view("a", "unix:uid:1000"), view("b", "unix:uid:1000"), view("c", "unix:uid:1000")
    source = FakeCredentialSource(ca, [a, b, c])
    manager = await manager_with(source)

    async with running(manager):
        await fetch(manager, "unix:uid:1000")
        kept_serial = manager.svids[0].serial
        version = manager.version

        await manager.set_entries([a, view("b", "unix:uid:1000", revision=2)])

        assert manager.version > version
        assert [(s.entry_id, s.serial) for s in manager.svids] == [("a", kept_serial)]
        assert [e.id for e in manager.entries] == ["a", "b"]
        assert [e.id for e in manager.match(selector_set(["unix:uid:1000"]))] == ["a", "b"]

        await fetch(manager, "unix:uid:1000")

    assert source.requests == [("a", "b", "c"), ("b",)]


async def test_an_entry_whose_selectors_change_matches_by_the_new_ones(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000")])
    manager = await manager_with(source)

    await manager.set_entries([view("web", "unix:uid:2000", revision=2)])

    assert manager.match(selector_set(["unix:uid:1000"])) == []
    assert [e.id for e in manager.match(selector_set(["unix:uid:2000"]))] == ["web"]


async def test_the_same_entry_set_again_changes_nothing(ca: CertificateAuthority) -> None:
    entries = [view("a", "unix:uid:1000")]
    manager = await manager_with(FakeCredentialSource(ca, entries))
    version = manager.version

    await manager.set_entries(list(entries))

    assert manager.version == version


async def test_sync_entries_takes_the_authoritys_set_and_bumps_once(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [view("b", "unix:uid:2"), view("a", "unix:uid:1")])
    manager = SvidManager(source)
    version = manager.version

    async with asyncio.timeout(DEADLINE):
        await manager.sync_entries()
        after_first = manager.version
        await manager.sync_entries()

    assert [e.id for e in manager.entries] == ["a", "b"]
    assert after_first > version
    assert manager.version == after_first
    assert source.requests == [(), ()]


async def test_a_change_wakes_a_waiting_stream(ca: CertificateAuthority) -> None:
    manager = await manager_with(FakeCredentialSource(ca, [view("a", "unix:uid:1")]))
    seen = manager.version
    waiter = asyncio.create_task(manager.wait_for_change(seen))

    await manager.set_entries([view("a", "unix:uid:1", revision=2)])

    async with asyncio.timeout(DEADLINE):
        assert await waiter == manager.version != seen


# --- rotation -----------------------------------------------------------------------------------


async def test_an_svid_is_reissued_before_it_expires(ca: CertificateAuthority) -> None:
    entry = view("web", "unix:uid:1000")
    source = FakeCredentialSource(ca, [entry], ttl=timedelta(seconds=2))
    manager = await manager_with(source)

    async with running(manager):
        (first,) = await fetch(manager, "unix:uid:1000")
        (old,) = manager.svids
        version = manager.version

        async with asyncio.timeout(DEADLINE):
            new_version = await manager.wait_for_change(version)
        rotated_at = time.time()
        (new,) = manager.svids
        (current,) = await fetch(manager, "unix:uid:1000")

    assert new_version > version
    assert rotated_at < old.expires_at
    assert old.issued_at < old.rotate_at < old.expires_at
    assert new.serial != old.serial
    assert source.requests == [("web",), ("web",)]
    assert current != first
    assert_usable(current, ca, entry)


def test_cached_svids_keep_their_private_key_out_of_repr(ca: CertificateAuthority) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.sign_x509_svid(key.public_key(), TD.spiffe_id("/web"), ttl=timedelta(hours=1), tier=TrustTier.HARDWARE)
    cached = CachedSvid(entry_id="web", entry_revision=1, spiffe_id="spiffe://example.org/web", certificate=cert,
                        chain_der=b"c", private_key_der=b"SECRET-KEY-BYTES", issued_at=0.0, expires_at=1.0,
                        rotate_at=0.5)

    assert "SECRET-KEY-BYTES" not in repr(cached)
    assert cached.serial == serial_hex(cert)  # whole bytes, as openssl prints serials


# --- revocation ---------------------------------------------------------------------------------


def revocations(version: int, *, entries: Sequence[tuple[str, int]] = (),
                nodes: Sequence[tuple[str, int, bool]] = (), next_update: float | None = None) -> RevocationDocument:
    now = int(time.time())
    return RevocationDocument(
        version=version, issued_at=now, next_update=int(next_update if next_update is not None else now + 600),
        entries=tuple(RevokedEntry(entry_id=e, below_revision=below) for e, below in entries),
        nodes=tuple(RevokedNode(node_id=n, reason="test", before=before, banned=banned) for n, before, banned in nodes),
    )


async def test_a_revoked_entry_revision_leaves_the_cache_and_wakes_streams(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [view("a", "unix:uid:1000"), view("b", "unix:uid:1000")])
    manager = await manager_with(source)
    async with running(manager):
        await fetch(manager, "unix:uid:1000")
        version = manager.version
        source.revocations = revocations(1, entries=[("b", 2), ("unknown", 9)])

        assert manager.affected_by(source.revocations)
        assert await manager.apply_revocations()

        assert manager.version > version
        assert [s.entry_id for s in manager.svids] == ["a"]
        assert [e.id for e in manager.entries] == ["a"]
        assert [m.spiffe_id for m in await fetch(manager, "unix:uid:1000")] == ["spiffe://example.org/workload/a"]
        assert not await manager.apply_revocations(), "a document is applied once"


async def test_revoking_the_last_entry_leaves_the_caller_with_no_identity(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000")])
    manager = await manager_with(source)
    async with running(manager):
        await fetch(manager, "unix:uid:1000")
        source.revocations = revocations(1, entries=[("web", 2)])
        await manager.apply_revocations()

        with pytest.raises(NoIdentityError, match="no registration entry matches"):
            await fetch(manager, "unix:uid:1000")


async def test_a_newer_revision_of_the_entry_is_not_revoked(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000", revision=3)])
    manager = await manager_with(source)
    async with running(manager):
        await fetch(manager, "unix:uid:1000")
        source.revocations = revocations(1, entries=[("web", 3)])

        assert not manager.affected_by(source.revocations)
        assert not await manager.apply_revocations()
        assert [s.entry_id for s in manager.svids] == ["web"]


async def test_a_banned_node_drops_everything_and_issues_nothing(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000")])
    manager = await manager_with(source)
    async with running(manager):
        await fetch(manager, "unix:uid:1000")
        requests = len(source.requests)
        source.revocations = revocations(1, nodes=[(NODE_ID, int(time.time()), True)])
        await manager.apply_revocations()

        assert manager.svids == [] and manager.entries == []
        assert manager.banned == "test"
        await manager.set_entries([view("web", "unix:uid:1000")])  # even if a sync brought entries back
        with pytest.raises(NoIdentityError, match="node is banned"):
            await fetch(manager, "unix:uid:1000")
        assert len(source.requests) == requests, "a banned node must not ask the authority for SVIDs"

        source.revocations = revocations(2, nodes=[(NODE_ID, int(time.time()), False)])  # unbanned
        await manager.apply_revocations()
        assert manager.banned is None
        assert [m.spiffe_id for m in await fetch(manager, "unix:uid:1000")] == ["spiffe://example.org/workload/web"]


async def test_a_node_revocation_drops_the_svids_once_and_the_node_issues_again(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000")])
    manager = await manager_with(source)
    async with running(manager):
        first = (await fetch(manager, "unix:uid:1000"))[0]
        source.revocations = revocations(1, nodes=[(NODE_ID, int(time.time()) + 1, False), ("spiffe://other", 1, True)])
        assert manager.affected_by(source.revocations)
        await manager.apply_revocations()
        assert manager.svids == []

        second = (await fetch(manager, "unix:uid:1000"))[0]
        assert second.cert_chain_der != first.cert_chain_der
        # The same revocation, reissued in a later document, does not drop the new SVID.
        source.revocations = revocations(2, nodes=[(NODE_ID, source.revocations.nodes[0].before, False)])
        assert not manager.affected_by(source.revocations)
        await manager.apply_revocations()
        assert [s.entry_id for s in manager.svids] == ["web"]


async def test_a_stale_node_serves_what_it_holds_and_issues_nothing_new(ca: CertificateAuthority) -> None:
    clock = FakeClock(time.time())
    source = FakeCredentialSource(ca, [view("a", "unix:uid:1000"), view("b", "unix:uid:2000")])
    manager = SvidManager(source, clock=clock)
    await manager.set_entries(source.entries)
    source.revocations = revocations(1, next_update=clock.now() + 600)
    async with running(manager):
        await fetch(manager, "unix:uid:1000")
        clock.advance(601)

        assert manager.stale_since() == float(source.revocations.next_update)
        assert [m.spiffe_id for m in await fetch(manager, "unix:uid:1000")] == ["spiffe://example.org/workload/a"]
        with pytest.raises(NoIdentityError, match="node is stale"):
            await fetch(manager, "unix:uid:2000")

        source.revocations = revocations(2, next_update=clock.now() + 600)  # a fresh document arrives
        assert manager.stale_since() is None
        await manager.apply_revocations()
        assert [m.spiffe_id for m in await fetch(manager, "unix:uid:2000")] == ["spiffe://example.org/workload/b"]


async def test_a_sync_applies_entries_and_revocations_as_one_change(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [view("a", "unix:uid:1000"), view("b", "unix:uid:1000")])
    manager = await manager_with(source)
    async with running(manager):
        await fetch(manager, "unix:uid:1000")
        version = manager.version
        source.entries = (view("a", "unix:uid:1000"), view("c", "unix:uid:1000"))
        source.revocations = revocations(1, entries=[("b", 2)])

        await asyncio.wait_for(manager.sync_entries(), DEADLINE)

        assert manager.version == version + 1
        assert [e.id for e in manager.entries] == ["a", "c"]


async def test_the_end_of_a_ban_is_news_that_calls_for_a_sync(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000")])
    manager = await manager_with(source)
    source.revocations = revocations(1, nodes=[(NODE_ID, int(time.time()), True)])
    await manager.apply_revocations()

    lifted = revocations(2, nodes=[(NODE_ID, int(time.time()), False)])
    assert manager.affected_by(lifted), "the agent must fetch the entries the ban took away"
    await asyncio.wait_for(manager.sync_entries(), DEADLINE)
    assert [e.id for e in manager.entries] == ["web"]


async def test_issuance_rotation_and_revocation_are_decisions(ca: CertificateAuthority) -> None:
    bus = DecisionBus()
    seen: list[Decision] = []
    bus.subscribe(seen.append)
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000")], ttl=timedelta(seconds=2))
    manager = SvidManager(source, decisions=bus)
    await manager.set_entries(source.entries)
    async with running(manager):
        first = (await fetch(manager, "unix:uid:1000"))[0]
        async with asyncio.timeout(DEADLINE):
            while not any(d.kind is DecisionKind.ROTATE for d in seen):
                await manager.wait_for_change(manager.version)
        source.revocations = revocations(1, entries=[("web", 2)])
        await manager.apply_revocations()

    assert [d.kind for d in seen] == [DecisionKind.ISSUE, DecisionKind.ROTATE, DecisionKind.REVOKE]
    issued, rotated, revoked = seen
    assert issued.spiffe_ids == ("spiffe://example.org/workload/web",) and issued.entry_ids == ("web",)
    assert issued.svid_serials[0] == serial_hex(x509.load_der_x509_certificate(first.cert_chain_der))
    assert dict(rotated.details)["previous_serial"] == issued.svid_serials[0]
    assert revoked.svid_serials == rotated.svid_serials and revoked.reason == "entry revision revoked"


async def test_a_banned_node_says_so_to_callers(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000")])
    manager = await manager_with(source)
    source.revocations = revocations(1, nodes=[(NODE_ID, int(time.time()), True)])
    await manager.apply_revocations()

    with pytest.raises(NoIdentityError, match=r"^node is banned: test$"):
        await fetch(manager, "unix:uid:1000")


async def test_an_entry_withdrawn_by_a_sync_is_a_revoke_decision_and_nothing_held_is_none(
        ca: CertificateAuthority) -> None:
    bus = DecisionBus()
    seen: list[Decision] = []
    bus.subscribe(seen.append)
    source = FakeCredentialSource(ca, [view("a", "unix:uid:1000"), view("b", "unix:uid:2000")])
    manager = SvidManager(source, decisions=bus)
    await manager.set_entries(source.entries)
    async with running(manager):
        await fetch(manager, "unix:uid:1000")
        await manager.set_entries([view("b", "unix:uid:2000")])  # a deleted; b never issued
        source.revocations = revocations(1, nodes=[(NODE_ID, int(time.time()), False)])
        await manager.apply_revocations()  # a node revocation when nothing is held: no decision

    assert [(d.kind, d.entry_ids) for d in seen] == [(DecisionKind.ISSUE, ("a",)), (DecisionKind.REVOKE, ("a",))]
    assert seen[1].reason == "entry deleted or changed at the authority"


# --- the wall clock stepping --------------------------------------------------------------------


async def wait_until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(DEADLINE):
        while not condition():
            await asyncio.sleep(0.01)


async def test_a_clock_step_forward_past_the_rotation_time_rotates(ca: CertificateAuthority) -> None:
    clock = FakeClock(time.time())
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000")], ttl=timedelta(hours=1))
    manager = SvidManager(source, clock=clock, clock_recheck=0.02)
    await manager.set_entries(source.entries)
    async with running(manager):
        await fetch(manager, "unix:uid:1000")
        first = manager.svids[0]

        clock.jump(first.rotate_at - clock.now() + 1)  # NTP steps the wall clock past the rotation time

        await wait_until(lambda: manager.svids[0].serial != first.serial)
    assert len(source.requests) == 2


async def test_a_clock_step_past_expiry_never_serves_what_has_expired(ca: CertificateAuthority) -> None:
    clock = FakeClock(time.time())
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000")], ttl=timedelta(hours=1))
    manager = SvidManager(source, clock=clock, clock_recheck=3600)  # the loop sleeps through the step
    await manager.set_entries(source.entries)
    async with running(manager):
        await fetch(manager, "unix:uid:1000")
        expired = manager.svids[0]
        source.failure = TransportError("authority did not answer")

        clock.jump(2 * 3600)

        with pytest.raises(NoIdentityError, match="authority did not answer"):
            await fetch(manager, "unix:uid:1000")
        assert expired.expires_at < clock.now()


async def test_a_clock_step_backwards_keeps_serving_and_does_not_rotate_early(ca: CertificateAuthority) -> None:
    clock = FakeClock(time.time())
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000")], ttl=timedelta(hours=1))
    manager = SvidManager(source, clock=clock, clock_recheck=0.02)
    await manager.set_entries(source.entries)
    async with running(manager):
        served = (await fetch(manager, "unix:uid:1000"))[0]

        clock.jump(-2 * 3600)
        await asyncio.sleep(0.1)  # several loop rounds

        assert (await fetch(manager, "unix:uid:1000"))[0] == served
    assert len(source.requests) == 1


async def test_a_node_revocation_keeps_what_was_signed_after_it(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000")])
    manager = await manager_with(source)
    async with running(manager):
        before = int(time.time()) - 60  # the revocation happened before this SVID was signed
        await fetch(manager, "unix:uid:1000")
        source.revocations = revocations(1, nodes=[(NODE_ID, before, False)])
        await manager.apply_revocations()

        assert [s.entry_id for s in manager.svids] == ["web"]


async def test_a_node_revocation_in_the_second_an_svid_was_signed_voids_it(ca: CertificateAuthority) -> None:
    source = FakeCredentialSource(ca, [view("web", "unix:uid:1000")])
    manager = await manager_with(source)
    async with running(manager):
        await fetch(manager, "unix:uid:1000")
        signed_at = manager.svids[0].signed_at
        source.revocations = revocations(1, nodes=[(NODE_ID, int(signed_at), False)])
        await manager.apply_revocations()

        assert manager.svids == [], "a revocation in the same second as the signing is not after it"
