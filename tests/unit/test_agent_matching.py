"""Matching entries at scale, the near misses `vouchd explain` shows, and a child never matching what its
ancestors hold."""

from __future__ import annotations

from datetime import timedelta

from vouchd.agent.matching import EntryMatcher, lineage_parents
from vouchd.entries import Entry
from vouchd.selectors import selector_set
from vouchd.spiffe import SpiffeId


def entry(entry_id: str, *selectors: str, spiffe_id: str = "") -> Entry:
    return Entry(id=entry_id, revision=1,
                 spiffe_id=SpiffeId.parse(spiffe_id or f"spiffe://example.org/workload/{entry_id}"),
                 selectors=selector_set(selectors), x509_ttl=timedelta(hours=1))


def script_entries(count: int) -> list[Entry]:
    """`count` entries for `count` scripts of one uid: what an AI-agent host looks like."""
    return [entry(f"agent-{n:05}", "unix:uid:1000", "interpreter:name:python", f"script:sha256:{n:064x}")
            for n in range(count)]


def test_ten_thousand_entries_sharing_a_uid_cost_one_comparison() -> None:
    matcher = EntryMatcher(script_entries(10_000))
    caller = selector_set(["unix:uid:1000", "unix:gid:1000", "interpreter:name:python", f"script:sha256:{4242:064x}"])

    assert [e.id for e in matcher.candidates(caller)] == ["agent-04242"], "filed under its rarest selector"
    assert [e.id for e in matcher.match(caller)] == ["agent-04242"]


def test_a_script_edited_by_one_byte_matches_nothing_among_ten_thousand() -> None:
    matcher = EntryMatcher(script_entries(10_000))
    caller = selector_set(["unix:uid:1000", "interpreter:name:python", f"script:sha256:{10_001:064x}"])

    assert matcher.candidates(caller) == []
    assert matcher.match(caller) == []


def test_every_entry_whose_selectors_are_all_present_matches_whichever_selector_it_is_filed_under() -> None:
    entries = [
        entry("a-uid", "unix:uid:1000"),
        entry("b-uid-and-path", "unix:uid:1000", "unix:path:/usr/bin/web"),
        entry("c-path-common", "unix:uid:1001", "unix:path:/usr/bin/web"),
        entry("d-unit", "systemd:unit:web.service", "unix:uid:1000"),
        entry("e-unit-again", "systemd:unit:web.service", "unix:uid:0"),
    ]
    matcher = EntryMatcher(entries)
    caller = selector_set(["unix:uid:1000", "unix:path:/usr/bin/web", "systemd:unit:web.service"])

    assert [e.id for e in matcher.match(caller)] == ["a-uid", "b-uid-and-path", "d-unit"]
    # Brute force agrees, for every subset of a richer caller.
    everything = sorted({s for e in entries for s in e.selectors})
    for mask in range(1 << len(everything)):
        subset = frozenset(s for i, s in enumerate(everything) if mask & (1 << i))
        assert matcher.match(subset) == [e for e in sorted(entries, key=lambda e: e.id) if e.selectors <= subset]


def test_an_identity_an_ancestor_holds_is_never_matched() -> None:
    parent = entry("parent", "unix:uid:1000", "interpreter:name:python")
    child = entry("child", "unix:uid:1000", "lineage:parent_spiffe_id:spiffe://example.org/workload/parent")
    matcher = EntryMatcher([parent, child])
    caller = selector_set(["unix:uid:1000", "interpreter:name:python",
                           "lineage:parent_spiffe_id:spiffe://example.org/workload/parent"])

    assert [e.id for e in matcher.match(caller)] == ["child", "parent"]
    assert [e.id for e in matcher.match(caller, ancestors_hold=frozenset({str(parent.spiffe_id)}))] == ["child"]
    # Also when another entry grants the same SPIFFE ID: the identity is what is never inherited.
    twin = entry("twin", "unix:uid:1000", spiffe_id=str(parent.spiffe_id))
    matcher = EntryMatcher([parent, child, twin])
    assert [e.id for e in matcher.match(caller, ancestors_hold=frozenset({str(parent.spiffe_id)}))] == ["child"]


def test_verdicts_put_matches_first_then_the_nearest_misses_with_what_each_lacks() -> None:
    matcher = EntryMatcher([
        entry("far", "unix:uid:1000", "unix:path:/x", "systemd:unit:a.service"),
        entry("near", "unix:uid:1000", "script:sha256:" + "ab" * 32),
        entry("hit", "unix:uid:1000"),
        entry("inherited", "unix:uid:1000", spiffe_id="spiffe://example.org/parent"),
    ])

    verdicts = matcher.verdicts(selector_set(["unix:uid:1000"]), ancestors_hold=frozenset({"spiffe://example.org/parent"}))

    assert [(v.entry.id, v.matched, [str(s) for s in v.missing], v.held_by_ancestor) for v in verdicts] == [
        ("hit", True, [], False),
        ("inherited", False, [], True),
        ("near", False, ["script:sha256:" + "ab" * 32], False),
        ("far", False, ["systemd:unit:a.service", "unix:path:/x"], False),
    ]


def test_lineage_parents_are_the_values_of_the_parent_selectors() -> None:
    child = entry("child", "unix:uid:0", "lineage:parent_spiffe_id:spiffe://example.org/b",
                  "lineage:parent_spiffe_id:spiffe://example.org/a", "lineage:depth:1")

    assert lineage_parents(child) == ("spiffe://example.org/a", "spiffe://example.org/b")
    assert lineage_parents(entry("plain", "unix:uid:0")) == ()
