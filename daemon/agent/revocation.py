"""What a revocation document withdraws from one node (DESIGN §8): a pure function of the document
and of what the node holds, so that the SVID cache only applies the answer.

- An entry revocation voids the revisions below `below_revision` (the highest the document lists
  for that entry): the entry leaves the node's set until a sync brings a newer revision, and its
  cached SVID goes.
- A ban of this node voids everything: every SVID and every entry, until it is lifted.
- Another revocation of this node (a boot profile removed) voids the SVIDs signed up to its
  `before`; it is acted on once: the node remembers the latest `before` it applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from vouchd.protocol.messages import RevocationDocument

__all__ = ["HeldSvid", "Withdrawal", "withdrawal"]


@dataclass(frozen=True)
class HeldSvid:
    entry_revision: int
    signed_at: float                    # by the authority's clock


@dataclass(frozen=True)
class Withdrawal:
    entries: frozenset[str]             # entry ids whose held revision is void
    svids: frozenset[str]               # entry ids whose cached SVID is void
    ban: str | None                     # the ban's reason while this node is banned
    node_revoked_before: int            # the latest node revocation applied, this one included
    node_reason: str | None             # why this node's SVIDs are void, when a node revocation voids them

    @property
    def changes_anything(self) -> bool:
        return bool(self.entries or self.svids or self.node_reason is not None)


def withdrawal(document: RevocationDocument, *, node_id: str, entries: Mapping[str, int],
               svids: Mapping[str, HeldSvid], applied_before: int) -> Withdrawal:
    """What `document` withdraws from a node holding `entries` (id -> revision) and `svids` (entry id
    -> SVID), which has applied node revocations up to `applied_before`."""
    below: dict[str, int] = {}
    for revoked in document.entries:
        below[revoked.entry_id] = max(below.get(revoked.entry_id, 0), revoked.below_revision)
    void_entries = {e for e, revision in entries.items() if revision < below.get(e, 0)}
    void_svids = {e for e, svid in svids.items() if svid.entry_revision < below.get(e, 0)}
    ban = next((n.reason for n in document.nodes if n.node_id == node_id and n.banned), None)
    own = next((n for n in document.nodes
                if n.node_id == node_id and (n.banned or n.before > applied_before)), None)
    node_reason = None
    if own is not None:
        # A ban voids everything; another node revocation only what was signed up to it (an SVID the
        # re-attestation it forced has already brought stays). Both times are whole seconds: what was
        # signed in the revocation's own second counts as before it, on the safe side.
        void_svids = {e for e, svid in svids.items() if own.banned or svid.signed_at <= own.before}
        if own.banned:
            void_entries = set(entries)
        node_reason = f"node revoked: {own.reason}"
    return Withdrawal(entries=frozenset(void_entries), svids=frozenset(void_svids), ban=ban,
                      node_revoked_before=max(applied_before, own.before if own is not None else 0),
                      node_reason=node_reason)
