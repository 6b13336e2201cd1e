"""The authority's admin commands and revocation document: the checks the first tests left without a
test of their own.

An update is checked like a creation (trust domain, selectors, the TTL cap, unknown arguments), the
cap itself is allowed and a second more is not, arguments of the wrong type and node ids that are
not SPIFFE IDs are refused by name, and a revocation stays listed as long as any SVID it voids can
still be valid: the longest of the x509-SVID cap and the node SVID lifetime, plus the clock skew.
A real authority on a real SQLite store, with a fake clock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.fakes import FakeClock
from vouchd.attestors.catalog import selector_schema
from vouchd.authority.admin import AdminRequestError, AuthorityAdmin
from vouchd.authority.build import open_authority
from vouchd.authority.server import Authority
from vouchd.authority.store import NodeRecord, NodeState
from vouchd.config import AuthorityConfig
from vouchd.decisions import DecisionBus
from vouchd.spiffe import TrustDomain

pytestmark = pytest.mark.timeout(20)

TRUST_DOMAIN = TrustDomain("example.org")
EK_A, EK_B = "a" * 64, "b" * 64
NODE_A = f"spiffe://example.org/vouchd/node/tpm/{EK_A}"
NODE_B = f"spiffe://example.org/vouchd/node/tpm/{EK_B}"
SKEW = 300  # the clock tolerance the authority adds to the longest SVID lifetime


class RecordingBus:
    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes) -> None:
        self.published.append((topic, payload))


def config(state_dir: Path, **changes: object) -> AuthorityConfig:
    values: dict[str, object] = {
        "state_dir": state_dir, "ek_roots": (), "ek_intermediates": (), "enrolment": "allowlist",
        "enrolled_ek_hashes": frozenset(), "pcr_bank": "sha256", "pcr_indices": tuple(range(8)),
        "accept_missing_event_log": False, "ca_ttl": timedelta(days=30), "node_svid_ttl": timedelta(hours=1),
        "x509_svid_ttl": timedelta(hours=1), "x509_svid_max_ttl": timedelta(hours=24),
    }
    values.update(changes)
    return AuthorityConfig(**values)  # type: ignore[arg-type]


def node_record(node_id: str, ek: str) -> NodeRecord:
    return NodeRecord(
        node_id=node_id, ek_hash=ek, tier="hardware", state=NodeState.TRUSTED, ak_public=b"ak", node_key_public=b"nk",
        selectors=(f"tpm:ek_hash:{ek}", "node:tier:hardware", "tpm:pcr_profile:golden"), pcr_bank="sha256",
        pcr_indices=tuple(range(8)), pcr_digest=b"\x00" * 32, reset_count=1, restart_count=0, clock=1,
        attested_at=1.0, last_quote_at=1.0,
    )


async def started(state_dir: Path, clock: FakeClock, **changes: object) -> Authority:
    authority = await open_authority(config(state_dir, **changes), TRUST_DOMAIN, publisher=RecordingBus(),
                                     decisions=DecisionBus(), clock=clock)
    await authority.store.save_node(node_record(NODE_A, EK_A))
    await authority.store.save_node(node_record(NODE_B, EK_B))
    return authority


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def authority(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Authority]:
    instance = await started(tmp_path / "authority", clock)
    yield instance
    await instance.close()


@pytest.fixture
def admin(authority: Authority) -> AuthorityAdmin:
    return AuthorityAdmin(authority, workload_schema=selector_schema(["unix"]))


async def run(admin: AuthorityAdmin, command: str, **args: Any) -> Any:
    return await admin.commands()[command](args)


WEB = {"spiffe_id": "spiffe://example.org/web", "selectors": ["unix:uid:1000"],
       "node_selectors": [f"tpm:ek_hash:{EK_A}"]}


# --- entries ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"spiffe_id": "spiffe://elsewhere.org/web"}, "spiffe_id: must be in the trust domain example.org"),
        ({"selectors": ["unix:uid:abc"]}, "selectors[0]: unix:uid:abc"),
        ({"selectors": ["unix:uidd:0"]}, "selectors[0]: unix:uidd"),
        ({"node_selectors": ["tpm:ek_hash:XYZ"]}, "node_selectors[0]: tpm:ek_hash:XYZ"),
        ({"x509_ttl": "2d"}, "x509_ttl: 2d is over the authority's cap x509_svid_max_ttl (24h)"),
        ({"revision": 9}, "unknown argument 'revision'"),
        ({"created_at": 0}, "unknown argument 'created_at'"),
    ],
)
async def test_an_update_is_checked_like_a_creation(admin: AuthorityAdmin, authority: Authority,
                                                    changes: dict[str, object], message: str) -> None:
    created = await run(admin, "entry.create", **WEB)

    with pytest.raises(AdminRequestError) as refused:
        await run(admin, "entry.update", id=created["id"], **changes)

    assert str(refused.value).startswith(message)
    assert authority.registry.index.get(created["id"]) == await authority.store.entry(created["id"])
    assert (await run(admin, "entry.show", id=created["id"]))["revision"] == 1, "nothing was changed"


async def test_the_ttl_cap_itself_is_allowed_and_a_second_more_is_not(admin: AuthorityAdmin) -> None:
    created = await run(admin, "entry.create", **WEB, x509_ttl="24h")
    assert created["x509_ttl"] == 86400

    with pytest.raises(AdminRequestError, match="x509_ttl: 86401s is over the authority's cap"):
        await run(admin, "entry.update", id=created["id"], x509_ttl="86401s")


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("entry.create", {**WEB, "spiffe_id": 5}, "spiffe_id: expected a non-empty string"),
        ("entry.create", {**WEB, "hint": ["a"]}, "hint: expected a non-empty string"),
        ("entry.create", {**WEB, "min_tier": 1}, "min_tier: expected a non-empty string"),
        ("entry.show", {"id": {"a": 1}}, "id: expected a non-empty string"),
        ("node.ban", {"id": NODE_B, "reason": ["stolen"]}, "reason: expected a non-empty string"),
        ("node.ban", {"id": "node-b"}, "id: "),
        ("node.ban", {"id": "https://example.org/vouchd/node/tpm/" + EK_B}, "id: "),
    ],
)
async def test_arguments_of_the_wrong_kind_are_refused_by_name(admin: AuthorityAdmin, authority: Authority,
                                                               command: str, args: dict[str, Any],
                                                               message: str) -> None:
    with pytest.raises(AdminRequestError) as refused:
        await run(admin, command, **args)

    assert str(refused.value).startswith(message)
    assert authority.registry.index.all() == []
    assert await authority.store.bans() == []


# --- how long a revocation stays listed ----------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "longest"),
    [
        ({}, timedelta(hours=24)),  # x509_svid_max_ttl, above x509_svid_ttl (1h) and node_svid_ttl (1h)
        ({"node_svid_ttl": timedelta(hours=48)}, timedelta(hours=48)),
    ],
    ids=["x509-svid-cap", "node-svid-ttl"],
)
async def test_a_revocation_is_listed_while_an_svid_it_voids_can_be_valid(
        tmp_path: Path, clock: FakeClock, changes: dict[str, object], longest: timedelta) -> None:
    authority = await started(tmp_path / "authority", clock, **changes)
    try:
        admin = AuthorityAdmin(authority, workload_schema=selector_schema(["unix"]))
        created = await run(admin, "entry.create", **WEB)
        await run(admin, "entry.delete", id=created["id"])

        clock.advance(longest.total_seconds() + SKEW - 1)
        await run(admin, "node.ban", id=NODE_B)  # any revocation prunes what has run out
        listed = (await authority.revocations.current()).document.entries
        assert [e.entry_id for e in listed] == [created["id"]], "an SVID of the deleted entry may still be valid"

        clock.advance(2)
        await run(admin, "node.unban", id=NODE_B)
        assert (await authority.revocations.current()).document.entries == ()
    finally:
        await authority.close()
