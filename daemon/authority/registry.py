"""Registration entries at run time: created, updated and deleted while agents serve (DESIGN §6, §8).

The store is the truth; the EntryIndex answers the authority's lookups and changes only after the
store accepted a change. Each change reaches the agents at once:

- a new entry, or an entry a node newly qualifies for: a NodeEvent tells that node to sync now;
- an update or delete: the store records the revocation in the same transaction, and the signed
  revocation document goes out, so that every agent drops the old SVIDs and syncs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace

from vouchd.authority.entries import EntryIndex, grants
from vouchd.authority.revocations import PublicationSigner, RevocationPublisher
from vouchd.authority.store import EntryNotFoundError, NodeRecord, Store
from vouchd.clock import Clock
from vouchd.decisions import Decision, DecisionKind, DecisionSink, Outcome
from vouchd.entries import Entry
from vouchd.protocol.messages import NodeEvent
from vouchd.protocol.transport import Publisher, node_events_topic
from vouchd.selectors import selector_set
from vouchd.spiffe import SpiffeId, TrustTier

__all__ = ["CONFIG_SOURCE_LABEL", "ImportSummary", "Registry"]

log = logging.getLogger("vouchd.authority.registry")

# Entries read from the configuration file carry this label, so that a restart can tell them from
# entries created at run time: the file is the truth for the former only.
CONFIG_SOURCE_LABEL = ("vouchd/source", "config")


@dataclass(frozen=True)
class ImportSummary:
    created: int
    updated: int
    deleted: int
    unchanged: int


class Registry:
    def __init__(self, store: Store, revocations: RevocationPublisher, publisher: Publisher, *,
                 sign: PublicationSigner, clock: Clock, decisions: DecisionSink) -> None:
        self._store = store
        self._revocations = revocations
        self._publisher = publisher
        self._sign = sign
        self._clock = clock
        self._decisions = decisions
        self._index = EntryIndex()

    @property
    def index(self) -> EntryIndex:
        return self._index

    async def load(self) -> None:
        self._index = EntryIndex(await self._store.entries())

    async def create(self, entry: Entry) -> Entry:
        stored = await self._store.create_entry(entry, now=self._clock.now())
        self._index.put(stored)
        log.info("entry created", extra={"entry_id": stored.id, "spiffe_id": str(stored.spiffe_id),
                                         "revision": stored.revision})
        await self._tell_nodes(stored, previous=None)
        return stored

    async def update(self, entry_id: str, change: Callable[[Entry], Entry]) -> Entry:
        """Apply `change` to the stored entry; the SVIDs of its older revisions are revoked."""
        current = await self._store.entry(entry_id)
        if current is None:
            raise EntryNotFoundError(f"no entry {entry_id!r}")
        wanted = change(current)
        stored, _version = await self._store.update_entry(wanted, expected_revision=current.revision,
                                                          now=self._clock.now())
        self._index.put(stored)
        self._revoked(stored, f"entry updated to revision {stored.revision}")
        await self._revocations.changed()
        await self._tell_nodes(stored, previous=current)
        return stored

    async def delete(self, entry_id: str) -> Entry:
        deleted, _version = await self._store.delete_entry(entry_id, now=self._clock.now())
        self._index.remove(entry_id)
        self._revoked(deleted, "entry deleted")
        await self._revocations.changed()
        return deleted

    async def import_entries(self, entries: Sequence[Entry]) -> ImportSummary:
        """Make the store hold the configuration file's entries (DESIGN §6).

        Entries of the file are created or updated to match it; entries an earlier start imported
        from the file that it no longer lists are deleted (and revoked). Entries created at run time
        are left alone, unless the file names the same id: then the file's version wins.
        """
        created = updated = unchanged = deleted = 0
        wanted = {e.id: replace(e, labels=Entry.label_pairs({**e.label_map, CONFIG_SOURCE_LABEL[0]:
                                                               CONFIG_SOURCE_LABEL[1]}))
                  for e in entries}
        for entry in wanted.values():
            existing = self._index.get(entry.id)
            if existing is None:
                await self.create(entry)
                created += 1
            elif existing.same_content(entry):
                unchanged += 1
            else:
                await self.update(entry.id, _replacement(entry))
                updated += 1
        for entry in list(self._index.all()):
            if CONFIG_SOURCE_LABEL in entry.labels and entry.id not in wanted:
                await self.delete(entry.id)
                deleted += 1
        summary = ImportSummary(created=created, updated=updated, deleted=deleted, unchanged=unchanged)
        log.info("configuration entries imported",
                 extra={f"entries_{name}": count for name, count in vars(summary).items()})
        return summary

    def _revoked(self, entry: Entry, reason: str) -> None:
        self._decisions.emit(Decision(kind=DecisionKind.REVOKE, outcome=Outcome.OK, at=self._clock.now(),
                                      source="authority", method="entry", reason=reason, entry_ids=(entry.id,),
                                      spiffe_ids=(str(entry.spiffe_id),)))

    async def _tell_nodes(self, entry: Entry, *, previous: Entry | None) -> None:
        """A NodeEvent to every node the entry now applies to and did not before (those that had it
        learn of the change from the revocation document)."""
        nodes = await self._store.nodes()
        for node in _newly_granted(nodes, entry, previous):
            event = NodeEvent(node_id=node.node_id, event="entries_changed", issued_at=int(self._clock.now()))
            topic = node_events_topic(node.node_id)
            await self._publisher.publish(topic, self._sign(event, topic))


def _replacement(entry: Entry) -> Callable[[Entry], Entry]:
    return lambda _current: entry


def _newly_granted(nodes: Iterable[NodeRecord], entry: Entry, previous: Entry | None) -> list[NodeRecord]:
    result = []
    for node in nodes:
        node_id, selectors, tier = SpiffeId.parse(node.node_id), selector_set(node.selectors), TrustTier(node.tier)
        if grants(entry, node_id, selectors, tier) and (
                previous is None or not grants(previous, node_id, selectors, tier)):
            result.append(node)
    return result
