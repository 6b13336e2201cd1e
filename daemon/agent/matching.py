"""Which entries a caller's selectors match, at a cost that does not grow with the number of entries.

An entry matches when every one of its selectors is among the caller's. Each entry is filed under
one of its selectors, the one fewest other entries have (a script's sha256 rather than the uid that
ten thousand entries share); a caller's candidates are the entries filed under its own selectors,
and only those are compared in full. With 10,000 entries that each name one script under one
shared uid, a caller is compared with one entry, not 10,000.

Also the answer to `vouchd explain`: for each entry, which of its selectors a caller lacks.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from vouchd.entries import Entry
from vouchd.selectors import Selector

__all__ = ["LINEAGE_PARENT", "EntryMatcher", "EntryVerdict", "lineage_parents"]

LINEAGE_PARENT = ("lineage", "parent_spiffe_id")  # selector type and key naming a required parent identity


@dataclass(frozen=True, slots=True)
class EntryVerdict:
    """One entry as seen from one caller: matched, or the selectors it lacks, or held by an ancestor."""

    entry: Entry
    missing: tuple[Selector, ...]
    held_by_ancestor: bool = False  # matches, but an ancestor of the caller holds its SPIFFE ID

    @property
    def matched(self) -> bool:
        return not self.missing and not self.held_by_ancestor


class EntryMatcher:
    """An immutable index of a node's workload entries."""

    def __init__(self, entries: Iterable[Entry] = ()) -> None:
        self._entries: dict[str, Entry] = {entry.id: entry for entry in entries}
        frequency = Counter(selector for entry in self._entries.values() for selector in entry.selectors)
        self._filed: dict[Selector, list[Entry]] = defaultdict(list)
        for entry in self._entries.values():
            # The rarest selector; ties broken by the selector itself, so the index is the same every time.
            rarest = min(entry.selectors, key=lambda selector: (frequency[selector], selector))
            self._filed[rarest].append(entry)

    @property
    def entries(self) -> Mapping[str, Entry]:
        return self._entries

    def match(self, selectors: frozenset[Selector], *,
              ancestors_hold: frozenset[str] = frozenset()) -> list[Entry]:
        """The entries all of whose selectors are in `selectors`, by entry id; never an entry whose
        SPIFFE ID is in `ancestors_hold` (a child is never handed an identity its ancestor holds)."""
        found = [entry for entry in self.candidates(selectors)
                 if entry.selectors <= selectors and str(entry.spiffe_id) not in ancestors_hold]
        found.sort(key=lambda entry: entry.id)
        return found

    def candidates(self, selectors: frozenset[Selector]) -> list[Entry]:
        """The entries a caller with these selectors is compared with: those filed under one of them."""
        return [entry for selector in selectors for entry in self._filed.get(selector, ())]

    def verdicts(self, selectors: frozenset[Selector], *,
                 ancestors_hold: frozenset[str] = frozenset()) -> list[EntryVerdict]:
        """Every entry with what the caller lacks for it, closest first (matched, then fewest missing).

        A full scan: for operators (`vouchd explain`), never on a workload's request path.
        """
        verdicts = [EntryVerdict(entry, tuple(sorted(entry.selectors - selectors)),
                                 held_by_ancestor=str(entry.spiffe_id) in ancestors_hold)
                    for entry in self._entries.values()]
        verdicts.sort(key=lambda v: (not v.matched, len(v.missing), v.entry.id))
        return verdicts


def lineage_parents(entry: Entry) -> tuple[str, ...]:
    """The SPIFFE IDs an entry requires the caller's nearest identified ancestor to hold."""
    return tuple(sorted(s.value for s in entry.selectors if (s.type, s.key) == LINEAGE_PARENT))
