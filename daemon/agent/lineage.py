"""A child's SVID never outlives its parent's: until when each identity on this agent is valid.

An entry may require, with `lineage:parent_spiffe_id:<id>` selectors, that the caller's nearest
identified ancestor holds a given identity. Every SVID issued for such an entry must then expire no
later than the credentials of that identity this agent holds (its X.509-SVIDs and JWT-SVIDs), and
none is issued, and those held are dropped, once that identity holds no valid credential here: it
was revoked, its entry deleted, or it expired.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from vouchd.agent.matching import lineage_parents
from vouchd.attestors.base import Evidence
from vouchd.clock import Clock
from vouchd.entries import Entry

__all__ = ["ExpirySource", "ParentIdentities", "held_by_ancestors"]

ExpirySource = Callable[[str], float | None]  # SPIFFE ID -> the latest expiry of its valid credentials in a cache


def held_by_ancestors(evidence: Iterable[Evidence]) -> frozenset[str]:
    """The SPIFFE IDs a caller's ancestors hold, from the lineage attestor's evidence: never the caller's."""
    return frozenset(e.value for e in evidence if (e.attestor, e.name) == ("lineage", "ancestor_spiffe_id"))


class ParentIdentities:
    """The caches of credentials (X.509-SVIDs, JWT-SVIDs) asked as one."""

    def __init__(self, clock: Clock) -> None:
        self._clock = clock
        self._sources: list[ExpirySource] = []

    def add_source(self, source: ExpirySource) -> None:
        self._sources.append(source)

    def expiry(self, spiffe_id: str) -> float | None:
        """Until when this agent holds a valid credential of `spiffe_id`; None if it holds none."""
        now = self._clock.now()
        return max((t for source in self._sources if (t := source(spiffe_id)) is not None and t > now), default=None)

    def cap(self, entry: Entry) -> tuple[float | None, str | None]:
        """For an entry naming parent identities: the latest expiry its SVIDs may have, or why none may
        be issued (a parent identity without a valid credential here). (None, None) for other entries."""
        caps = []
        for parent in lineage_parents(entry):
            expiry = self.expiry(parent)
            if expiry is None:
                return None, f"its parent identity {parent} holds no valid SVID on this node"
            caps.append(expiry)
        return (min(caps), None) if caps else (None, None)
