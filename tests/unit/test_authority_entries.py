"""Which registration entries a node may obtain: by parent, by node selectors, and never above its tier."""

from __future__ import annotations

import dataclasses
import re
from datetime import timedelta

import pytest

from vouchd.authority.entries import EntryIndex, tier_allows
from vouchd.entries import Entry, InvalidEntryError
from vouchd.selectors import Selector, selector_set
from vouchd.spiffe import SpiffeId, TrustDomain, TrustTier

TD = TrustDomain("example.org")
NODE = TD.spiffe_id("/vouchd/node/tpm/" + "ab" * 32)
OTHER_NODE = TD.spiffe_id("/vouchd/node/tpm/" + "cd" * 32)
JOINED_NODE = TD.spiffe_id("/vouchd/node/join/token-1")
EK = "tpm:ek_hash:" + "ab" * 32
WEB_LABEL = "node:label:role:web"
NODE_SELECTORS = selector_set([EK, WEB_LABEL, "node:tier:hardware", "tpm:pcr_profile:default"])

HARDWARE, STATIC = TrustTier.HARDWARE, TrustTier.STATIC_SECRET


def entry(entry_id: str, *, parent: SpiffeId | None = None, node_selectors: tuple[str, ...] = (),
          min_tier: TrustTier = HARDWARE, revision: int = 1) -> Entry:
    return Entry(
        id=entry_id,
        revision=revision,
        spiffe_id=TD.spiffe_id(f"/workload/{entry_id}"),
        selectors=selector_set(["unix:uid:1000"]),
        parent=parent,
        node_selectors=selector_set(node_selectors),
        min_tier=min_tier,
        x509_ttl=timedelta(minutes=5),
    )


def ids(entries: list[Entry]) -> list[str]:
    return [e.id for e in entries]


# --- tier ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("min_tier", "node_tier", "allowed"),
    [(HARDWARE, HARDWARE, True), (STATIC, HARDWARE, True), (STATIC, STATIC, True), (HARDWARE, STATIC, False)],
)
def test_tier_allows_only_nodes_at_or_above_the_minimum(min_tier: TrustTier, node_tier: TrustTier,
                                                       allowed: bool) -> None:
    assert tier_allows(min_tier, node_tier) is allowed


# --- authorized_for -----------------------------------------------------------------------------


@pytest.fixture
def index() -> EntryIndex:
    return EntryIndex([
        entry("by-parent", parent=NODE),
        entry("by-other-parent", parent=OTHER_NODE),
        entry("by-ek", node_selectors=(EK,)),
        entry("by-label", node_selectors=(WEB_LABEL,)),
        entry("by-ek-and-label", node_selectors=(EK, WEB_LABEL)),
        entry("by-label-and-missing", node_selectors=(WEB_LABEL, "node:label:zone:b")),
        entry("by-other-label", node_selectors=("node:label:role:db",)),
        entry("unbound"),
    ])


def test_a_node_gets_entries_naming_it_as_parent_or_whose_node_selectors_it_has(index: EntryIndex) -> None:
    assert ids(index.authorized_for(NODE, NODE_SELECTORS, HARDWARE)) == [
        "by-ek", "by-ek-and-label", "by-label", "by-parent",
    ]


def test_every_node_selector_of_an_entry_must_be_present(index: EntryIndex) -> None:
    only_label = selector_set([WEB_LABEL])

    assert ids(index.authorized_for(OTHER_NODE, only_label, HARDWARE)) == ["by-label", "by-other-parent"]


def test_a_node_without_selectors_gets_only_its_parented_entries(index: EntryIndex) -> None:
    assert ids(index.authorized_for(NODE, frozenset(), HARDWARE)) == ["by-parent"]


def test_an_entry_bound_neither_by_parent_nor_selectors_is_never_authorized(index: EntryIndex) -> None:
    everything = NODE_SELECTORS | selector_set(["node:label:zone:b", "node:label:role:db"])

    assert "unbound" not in ids(index.authorized_for(NODE, everything, HARDWARE))
    assert index.is_authorized("unbound", NODE, everything, HARDWARE) is None


def test_an_entry_reached_through_several_node_selectors_is_listed_once() -> None:
    index = EntryIndex([entry("web", node_selectors=(EK, WEB_LABEL))])

    assert ids(index.authorized_for(NODE, NODE_SELECTORS, HARDWARE)) == ["web"]


def test_a_static_secret_node_gets_only_entries_that_allow_its_tier() -> None:
    index = EntryIndex([
        entry("hardware-only", parent=JOINED_NODE),
        entry("static-ok", parent=JOINED_NODE, min_tier=STATIC),
        entry("label-hardware-only", node_selectors=(WEB_LABEL,)),
        entry("label-static-ok", node_selectors=(WEB_LABEL,), min_tier=STATIC),
    ])
    selectors = selector_set([WEB_LABEL, "node:tier:static-secret"])

    assert ids(index.authorized_for(JOINED_NODE, selectors, STATIC)) == ["label-static-ok", "static-ok"]
    assert ids(index.authorized_for(JOINED_NODE, selectors, HARDWARE)) == [
        "hardware-only", "label-hardware-only", "label-static-ok", "static-ok",
    ]


# --- is_authorized ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entry_id", "node_id", "selectors", "tier", "authorized"),
    [
        ("by-parent", NODE, frozenset(), HARDWARE, True),
        ("by-parent", OTHER_NODE, NODE_SELECTORS, HARDWARE, False),
        ("by-ek", OTHER_NODE, NODE_SELECTORS, HARDWARE, True),
        ("by-ek", NODE, selector_set([WEB_LABEL]), HARDWARE, False),
        ("by-ek-and-label", NODE, selector_set([EK]), HARDWARE, False),
        ("by-ek-and-label", NODE, NODE_SELECTORS, HARDWARE, True),
        ("by-ek-and-label", NODE, NODE_SELECTORS, STATIC, False),
        ("by-label-and-missing", NODE, NODE_SELECTORS, HARDWARE, False),
        ("no-such-entry", NODE, NODE_SELECTORS, HARDWARE, False),
    ],
)
def test_is_authorized_applies_the_same_rules_to_one_entry(
    index: EntryIndex, entry_id: str, node_id: SpiffeId, selectors: frozenset[Selector], tier: TrustTier,
    authorized: bool,
) -> None:
    found = index.is_authorized(entry_id, node_id, selectors, tier)

    if authorized:
        assert found is not None
        assert found == index.get(entry_id)
    else:
        assert found is None


# --- entries that break the rules ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"parent": NODE},
         "node_selectors: an entry has either a parent or node_selectors, not both"),
        ({"node_selectors": selector_set(["tpm:ek_issuer_cn:Acme"])},
         "node_selectors: must include tpm:ek_hash or a node:label selector"),
        ({"selectors": selector_set(["unix:path:/usr/bin/web"])},
         "selectors: needs at least one kernel-anchored selector "
         "(container:id, k8s:pod_uid, systemd:unit, unix:gid, unix:uid)"),
        ({"selectors": frozenset()}, "selectors: an entry needs at least one selector"),
        ({"spiffe_id": TD.spiffe_id("/vouchd/authority")},
         "spiffe_id: paths under /vouchd/ are reserved for vouchd itself"),
        ({"spiffe_id": TD.id}, "spiffe_id: a workload's SPIFFE ID needs a path, e.g. spiffe://example.org/web"),
    ],
    ids=["parent-and-node-selectors", "unbinding-node-selectors", "no-kernel-anchor", "no-selectors",
         "reserved-path", "no-path"],
)
def test_an_entry_that_breaks_a_rule_cannot_be_made(changes: dict[str, object], message: str) -> None:
    valid = entry("web", node_selectors=(EK,))

    with pytest.raises(InvalidEntryError, match=f"^{re.escape(message)}$"):
        dataclasses.replace(valid, **changes)  # type: ignore[arg-type]


# --- put / remove -------------------------------------------------------------------------------


def test_put_replaces_an_entry_and_its_index_positions() -> None:
    index = EntryIndex([entry("web", parent=NODE)])

    index.put(entry("web", node_selectors=(WEB_LABEL,), revision=2))

    assert len(index) == 1
    assert ids(index.authorized_for(NODE, frozenset(), HARDWARE)) == []
    assert ids(index.authorized_for(OTHER_NODE, selector_set([WEB_LABEL]), HARDWARE)) == ["web"]
    assert index.is_authorized("web", NODE, frozenset(), HARDWARE) is None
    replaced = index.get("web")
    assert replaced is not None and replaced.revision == 2


def test_put_that_narrows_node_selectors_unindexes_the_dropped_one() -> None:
    index = EntryIndex([entry("web", node_selectors=(EK, WEB_LABEL))])

    index.put(entry("web", node_selectors=(EK,), revision=2))

    assert ids(index.authorized_for(OTHER_NODE, selector_set([EK]), HARDWARE)) == ["web"]
    index.put(entry("web", node_selectors=(WEB_LABEL,), revision=3))
    assert ids(index.authorized_for(OTHER_NODE, selector_set([EK]), HARDWARE)) == []


def test_remove_takes_an_entry_out_of_every_index(index: EntryIndex) -> None:
    before = len(index)

    index.remove("by-parent")
    index.remove("by-ek")

    assert len(index) == before - 2
    assert index.get("by-parent") is None
    assert ids(index.authorized_for(NODE, NODE_SELECTORS, HARDWARE)) == ["by-ek-and-label", "by-label"]
    assert index.is_authorized("by-ek", NODE, NODE_SELECTORS, HARDWARE) is None


def test_removing_an_unknown_entry_is_a_no_op(index: EntryIndex) -> None:
    before = len(index)

    index.remove("never-there")

    assert len(index) == before


def test_an_empty_index_authorizes_nothing() -> None:
    index = EntryIndex()

    assert len(index) == 0
    assert index.authorized_for(NODE, NODE_SELECTORS, HARDWARE) == []
