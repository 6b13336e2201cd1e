"""Registration entries and which nodes they are authorized for (DESIGN §5, §6).

An entry is authorized for a node when its `parent` is the node's SPIFFE ID, or its
`node_selectors` are a subset of the node's selectors. Lookups go through indexes (by parent and
by node selector), never a scan of every entry, and a static-secret node gets only entries whose
`min_tier` explicitly allows that tier — enforced here, in code, not only in policy.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

from vouchd.entries import Entry
from vouchd.selectors import Selector
from vouchd.spiffe import SpiffeId, TrustTier

__all__ = ["EntryIndex", "grants", "tier_allows"]

_TIER_STRENGTH = {TrustTier.STATIC_SECRET: 0, TrustTier.HARDWARE: 1}


def tier_allows(min_tier: TrustTier, node_tier: TrustTier) -> bool:
    return _TIER_STRENGTH[node_tier] >= _TIER_STRENGTH[min_tier]


class EntryIndex:
    """Entries indexed by how they bind to nodes."""

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self._by_id: dict[str, Entry] = {}
        self._by_parent: dict[SpiffeId, set[str]] = defaultdict(set)
        self._by_node_selector: dict[Selector, set[str]] = defaultdict(set)
        for entry in entries:
            self.put(entry)

    def put(self, entry: Entry) -> None:
        if entry.id in self._by_id:
            self.remove(entry.id)
        self._by_id[entry.id] = entry
        if entry.parent is not None:
            self._by_parent[entry.parent].add(entry.id)
        for selector in entry.node_selectors:
            self._by_node_selector[selector].add(entry.id)

    def remove(self, entry_id: str) -> None:
        entry = self._by_id.pop(entry_id, None)
        if entry is None:
            return
        if entry.parent is not None:
            self._by_parent[entry.parent].discard(entry_id)
        for selector in entry.node_selectors:
            self._by_node_selector[selector].discard(entry_id)

    def get(self, entry_id: str) -> Entry | None:
        return self._by_id.get(entry_id)

    def __len__(self) -> int:
        return len(self._by_id)

    def all(self) -> list[Entry]:
        return [self._by_id[k] for k in sorted(self._by_id)]

    def authorized_for(self, node_id: SpiffeId, node_selectors: frozenset[Selector],
                       tier: TrustTier) -> list[Entry]:
        candidates = set(self._by_parent.get(node_id, ()))
        for selector in node_selectors:
            candidates.update(self._by_node_selector.get(selector, ()))
        entries = (self._by_id[entry_id] for entry_id in sorted(candidates))
        return [entry for entry in entries if grants(entry, node_id, node_selectors, tier)]

    def is_authorized(self, entry_id: str, node_id: SpiffeId, node_selectors: frozenset[Selector],
                      tier: TrustTier) -> Entry | None:
        entry = self._by_id.get(entry_id)
        return entry if entry is not None and grants(entry, node_id, node_selectors, tier) else None


def grants(entry: Entry, node_id: SpiffeId, node_selectors: frozenset[Selector], tier: TrustTier) -> bool:
    """The one rule entry sync and issuance share: the entry names this node (its parent, or node
    selectors the node has) and allows the node's tier."""
    bound = entry.parent == node_id or (bool(entry.node_selectors) and entry.node_selectors <= node_selectors)
    return bound and tier_allows(entry.min_tier, tier)
