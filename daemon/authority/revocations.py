"""The signed revocation document (DESIGN §8): what the authority has withdrawn, for every agent.

The facts (revoked entry revisions, revoked and banned nodes) live in the store, each written in
the same transaction as the change that caused it. This module turns them into a signed
RevocationDocument with an increasing version and a `next_update`, publishes it when something
changes, and reissues it (a new version, the same facts) once half of its lifetime has passed, so
that an agent that hears nothing past `next_update` knows it is cut off.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass

from vouchd.authority.store import Revocations, Store
from vouchd.clock import Clock
from vouchd.protocol.messages import RevocationDocument, RevokedEntry, RevokedNode
from vouchd.protocol.transport import REVOCATIONS_TOPIC, Publisher

__all__ = ["DOCUMENT_LIFETIME", "RevocationPublisher", "SignedDocument"]

log = logging.getLogger("vouchd.authority.revocations")

# An agent that has seen no document for this long (its next_update) counts itself stale. Agents
# pull the current document with every heartbeat (60 s), so ten minutes leaves room for outages.
DOCUMENT_LIFETIME = 600.0

PublicationSigner = Callable[[object, str], bytes]     # (body, topic) -> signed publication bytes


@dataclass(frozen=True)
class SignedDocument:
    document: RevocationDocument
    signed: bytes


class RevocationPublisher:
    def __init__(self, store: Store, sign: PublicationSigner, publisher: Publisher, clock: Clock, *,
                 keep_seconds: float, lifetime: float = DOCUMENT_LIFETIME) -> None:
        """`keep_seconds`: how long a revocation must stay listed: the longest SVID lifetime there is,
        after which nothing it revoked can still be valid."""
        self._store = store
        self._sign = sign
        self._publisher = publisher
        self._clock = clock
        self._keep_seconds = keep_seconds
        self._lifetime = lifetime
        self._current: SignedDocument | None = None
        self._lock = asyncio.Lock()

    async def current(self) -> SignedDocument:
        """The document to hand out now; reissued when half of its lifetime has passed."""
        async with self._lock:
            now = self._clock.now()
            document = self._current
            if document is None or now >= document.document.issued_at + self._lifetime / 2:
                await self._store.prune_revocations(older_than=now - self._keep_seconds)
                await self._store.bump_revocation_version()
                document = self._current = await self._build(now)
            return document

    async def changed(self) -> SignedDocument:
        """Something was revoked (the store recorded it): publish at once."""
        async with self._lock:
            now = self._clock.now()
            await self._store.prune_revocations(older_than=now - self._keep_seconds)
            latest = await self._build(now)
            if self._current is None or latest.document.version > self._current.document.version:
                self._current = latest
            current = self._current
        await self._publisher.publish(REVOCATIONS_TOPIC, current.signed)
        log.info("revocation document published", extra={"version": current.document.version,
                                                          "revoked_entries": len(current.document.entries),
                                                          "revoked_nodes": len(current.document.nodes)})
        return current

    async def _build(self, now: float) -> SignedDocument:
        facts: Revocations = await self._store.revocations()
        document = RevocationDocument(
            version=facts.version,
            issued_at=int(now),
            next_update=int(now + self._lifetime),
            entries=tuple(RevokedEntry(entry_id=e.entry_id, below_revision=e.below_revision)
                          for e in facts.entries),
            nodes=tuple(RevokedNode(node_id=n.node_id, reason=n.reason, before=int(n.before), banned=n.banned)
                        for n in facts.nodes),
        )
        return SignedDocument(document, self._sign(document, REVOCATIONS_TOPIC))
