"""The agent's entries and X.509-SVID cache: matching, batched issuance, rotation (DESIGN §5, §6).

Workload keys are generated here (EC P-256, software) and never leave the node: the authority
sees only a CSR. Issuance goes through `run()`, a single loop that batches every entry asked for
meanwhile into one quote-bound request and rotates SVIDs when half of their lifetime is left
(±10 % jitter, so a fleet started together does not rotate together). Each change bumps `version`
and wakes every open Workload API stream.

Revocation (DESIGN §8): the node identity holds the authority's signed revocation document; the
manager applies each newer one as soon as it arrives, together with the entry set of the same sync
when there is one, so an open stream sees one change: the SVIDs of revoked entry revisions and of
a revoked node leave the cache and the stream gets the new set, or PermissionDenied when nothing is
left. A node whose document is past its `next_update` is stale: cached SVIDs are served until
they expire, nothing new is issued.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from vouchd.agent.backoff import IssuanceBackoff
from vouchd.agent.cached import CachedSvid, IssuanceRound
from vouchd.agent.lineage import ParentIdentities
from vouchd.agent.matching import EntryMatcher
from vouchd.agent.revocation import HeldSvid, Withdrawal, withdrawal
from vouchd.agent.workload_api.identities import NoIdentityError, X509SvidMaterial
from vouchd.clock import SYSTEM_CLOCK, Clock
from vouchd.decisions import Decision, DecisionKind, DecisionSink, Outcome
from vouchd.entries import Entry
from vouchd.protocol.messages import (
    MAX_X509_SVIDS_PER_REQUEST,
    CredentialResponse,
    JwtSvidRequest,
    RevocationDocument,
    X509SvidRequest,
)
from vouchd.selectors import Selector

__all__ = ["CachedSvid", "CredentialSource", "SvidManager"]

log = logging.getLogger("vouchd.agent.svids")

_IDLE_WAKE = 3600.0
# Timers run on the monotonic clock, deadlines (rotation, expiry) on the wall clock: the loop looks
# again at least this often, so that a wall-clock step (NTP, a resumed VM) is noticed soon.
CLOCK_RECHECK = 30.0


class CredentialSource(Protocol):
    """What the SVID manager needs from the node identity."""

    node_id: str

    async def request(self, *, x509_svids: Sequence[X509SvidRequest] = (), sync_entries: bool = False,
                      jwt_svids: Sequence[JwtSvidRequest] = ()) -> CredentialResponse: ...

    def bundle_der(self) -> bytes:
        """The trust domain's bundle as concatenated DER certificates."""
        ...

    def jwt_bundle(self) -> bytes:
        """The trust domain's JWT bundle (JWKS); empty before the authority sent one."""
        ...

    @property
    def revocations(self) -> RevocationDocument | None:
        """The newest verified revocation document, None before the first."""
        ...


class SvidManager:
    def __init__(self, source: CredentialSource, *, clock: Clock = SYSTEM_CLOCK,
                 decisions: DecisionSink | None = None, clock_recheck: float = CLOCK_RECHECK,
                 issuance_gate: Callable[[], str | None] | None = None) -> None:
        """`issuance_gate` says why nothing may be issued now (the audit log cannot be written), or None."""
        self._source = source
        self._issuance_gate = issuance_gate
        self._clock = clock
        self._clock_recheck = clock_recheck
        self._decisions = decisions
        self._entries: dict[str, Entry] = {}
        self._matcher = EntryMatcher()
        self._parents = ParentIdentities(clock)
        self._parents.add_source(self._x509_expiry)
        self._svids: dict[str, CachedSvid] = {}
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._backoff = IssuanceBackoff()
        self._wake = asyncio.Event()
        self._changed = asyncio.Condition()
        self._version = 0
        self._bundle_der = b""
        self._jwt_bundle = b""
        self._revocations_applied = 0           # version of the last document applied
        self._node_revoked_before = 0           # the latest own-node revocation applied
        self._banned: str | None = None         # the reason, while the authority bans this node

    # -- change notification (the Workload API streams wait here) ----------------------------
    @property
    def version(self) -> int:
        return self._version

    async def _bump(self) -> None:
        async with self._changed:
            self._version += 1
            self._changed.notify_all()

    async def wait_for_change(self, seen_version: int) -> int:
        async with self._changed:
            await self._changed.wait_for(lambda: self._version != seen_version)
            return self._version

    # -- entries -----------------------------------------------------------------------------
    @property
    def entries(self) -> list[Entry]:
        return [self._entries[k] for k in sorted(self._entries)]

    @property
    def svids(self) -> list[CachedSvid]:
        return [self._svids[k] for k in sorted(self._svids)]

    async def set_entries(self, entries: Iterable[Entry]) -> None:
        """Replace the node's entry set; SVIDs of removed or changed entries are dropped at once."""
        if self._replace_entries(entries):
            await self._bump()

    def _replace_entries(self, entries: Iterable[Entry]) -> bool:
        new = {e.id: e for e in entries}
        if new == self._entries:
            return False
        withdrawn = [entry_id for entry_id, svid in self._svids.items()
                     if (entry := new.get(entry_id)) is None or entry != self._entries.get(entry_id)
                     or str(entry.spiffe_id) != svid.spiffe_id]
        if withdrawn:
            self._decide("entry deleted or changed at the authority", withdrawn)
        for entry_id in withdrawn:
            del self._svids[entry_id]
        # A changed entry starts afresh: whatever made it fail may be what changed.
        self._backoff.keep_only(lambda e: e in new and new[e] == self._entries.get(e))
        self._entries = new
        self._reindex()
        self._drop_orphans()
        return True

    def _reindex(self) -> None:
        self._matcher = EntryMatcher(self._entries.values())

    @property
    def matcher(self) -> EntryMatcher:
        """The current entries, indexed for matching (`vouchd explain` reads it too)."""
        return self._matcher

    # -- lineage: a child's SVID never outlives its parent's ------------------------------------
    @property
    def parents(self) -> ParentIdentities:
        """Until when each identity is valid here; the JWT-SVID cache adds its own credentials."""
        return self._parents

    def _x509_expiry(self, spiffe_id: str) -> float | None:
        return max((svid.expires_at for svid in self._svids.values() if svid.spiffe_id == spiffe_id), default=None)

    def _drop_orphans(self) -> bool:
        """Drop the SVIDs of entries whose parent identity has no valid credential left; True if any.
        Repeats, so a grandchild goes with its parent."""
        dropped = False
        while True:
            orphans = [e for e, svid in self._svids.items()
                       if (entry := self._entries.get(e)) is not None and self._parents.cap(entry)[1] is not None]
            if not orphans:
                return dropped
            self._decide("its parent identity was withdrawn", orphans)
            for entry_id in orphans:
                del self._svids[entry_id]
            dropped = True

    # -- revocation ----------------------------------------------------------------------------
    @property
    def banned(self) -> str | None:
        return self._banned

    def stale_since(self) -> float | None:
        """When the revocation document ran out (its next_update), or None while it is current."""
        document = self._source.revocations
        if document is None or self._clock.now() <= document.next_update:
            return None
        return float(document.next_update)

    def affected_by(self, document: RevocationDocument) -> bool:
        """Whether applying `document` changes what this node holds, or whether it is banned."""
        found = self._withdrawal(document)
        return found.changes_anything or found.ban != self._banned

    async def apply_revocations(self) -> bool:
        """Apply the node identity's newest revocation document, if not yet applied; True if it changed
        what is served (open streams have been told)."""
        if self._apply_revocations():
            await self._bump()
            return True
        return False

    def _withdrawal(self, document: RevocationDocument) -> Withdrawal:
        return withdrawal(document, node_id=self._source.node_id,
                          entries={e: entry.revision for e, entry in self._entries.items()},
                          svids={e: HeldSvid(svid.entry_revision, svid.signed_at) for e, svid in self._svids.items()},
                          applied_before=self._node_revoked_before)

    def _apply_revocations(self) -> bool:
        document = self._source.revocations
        if document is None or document.version <= self._revocations_applied:
            return False
        self._revocations_applied = document.version
        found = self._withdrawal(document)
        changed = found.ban != self._banned
        self._banned = found.ban
        if found.ban is None:
            # Whatever held issuance back (a ban, a stale document) may be what this document ends.
            self._backoff.clear()
        self._node_revoked_before = found.node_revoked_before
        self._decide(found.node_reason or "entry revision revoked", sorted(found.svids))
        for entry_id in found.svids:
            self._svids.pop(entry_id, None)
        if found.entries:
            self._entries = {e: v for e, v in self._entries.items() if e not in found.entries}
            self._reindex()
        orphaned = self._drop_orphans()
        return changed or orphaned or bool(found.svids or found.entries)

    def _decide(self, reason: str, entry_ids: list[str]) -> None:
        """A revoke decision for the SVIDs of these entries this cache holds (none: nothing to say)."""
        svids = [self._svids[e] for e in entry_ids if e in self._svids]
        if not svids:
            return
        self._emit(Decision(kind=DecisionKind.REVOKE, outcome=Outcome.OK, at=self._clock.now(),
                            source="svid_cache", method="revocation", reason=reason,
                            entry_ids=tuple(s.entry_id for s in svids), spiffe_ids=tuple(s.spiffe_id for s in svids),
                            svid_serials=tuple(s.serial for s in svids)))

    def _emit(self, decision: Decision) -> None:
        if self._decisions is not None:
            self._decisions.emit(decision)

    def match(self, selectors: frozenset[Selector], *, ancestors_hold: frozenset[str] = frozenset()) -> list[Entry]:
        """The entries the selectors match, never one whose SPIFFE ID an ancestor of the caller holds."""
        return self._matcher.match(selectors, ancestors_hold=ancestors_hold)

    def bundle_der(self) -> bytes:
        return self._source.bundle_der()

    # -- SVIDs for workloads -----------------------------------------------------------------
    def _valid(self, entry_id: str, now: float) -> bool:
        svid = self._svids.get(entry_id)
        return svid is not None and svid.expires_at > now

    def holds(self, entry_id: str) -> bool:
        """Whether a valid SVID of this entry is in the cache (handing it out issues nothing new)."""
        return self._valid(entry_id, self._clock.now())

    async def x509_svids(self, selectors: frozenset[Selector], *, ancestors_hold: frozenset[str] = frozenset(),
                         only: frozenset[str] | None = None) -> list[X509SvidMaterial]:
        """Every valid SVID of the entries the caller matches; issues the missing ones first.

        An entry that cannot be issued right now does not take the caller's other identities away:
        NoIdentityError only when not a single SVID is valid.
        """
        if self._banned is not None:
            raise NoIdentityError(f"node is banned: {self._banned}")
        entries = [e for e in self.match(selectors, ancestors_hold=ancestors_hold) if only is None or e.id in only]
        if not entries:
            raise NoIdentityError("no registration entry matches the caller")
        now = self._clock.now()
        missing = [e.id for e in entries if not self._valid(e.id, now)]
        failures = []
        if missing:
            refusal = self._issuance_refusal()
            failures = [refusal] if refusal is not None else await self._ensure(missing)
        bundle = self.bundle_der()
        now = self._clock.now()
        materials = [
            X509SvidMaterial(spiffe_id=svid.spiffe_id, cert_chain_der=svid.chain_der,
                             private_key_der=svid.private_key_der, bundle_der=bundle, hint=entry.hint)
            for entry in entries
            if (svid := self._svids.get(entry.id)) is not None and svid.expires_at > now
        ]
        if not materials:
            raise NoIdentityError(failures[0] if failures else "no SVID could be issued for the caller")
        return materials

    def retry_now(self) -> None:
        """Forget the backoff of failed entries and let the loop try again (what failed is back)."""
        self._backoff.clear()
        self._wake.set()

    def issuance_refusal(self) -> str | None:
        """Why nothing new may be issued now (banned, stale), or None."""
        return self._issuance_refusal()

    def _issuance_refusal(self) -> str | None:
        """Why nothing new may be issued now, or None."""
        if self._issuance_gate is not None and (gated := self._issuance_gate()) is not None:
            return gated
        if self._banned is not None:
            return f"node is banned: {self._banned}"
        stale = self.stale_since()
        if stale is not None:
            return "node is stale: no revocation document from the authority since its next update was due"
        return None

    async def _ensure(self, entry_ids: Sequence[str]) -> list[str]:
        """Have the issuance loop try these entries; returns the reasons of those that failed.

        An entry that failed recently is not retried before its backoff ends: a workload asking again
        and again must not turn into a TPM quote and an authority request each time.
        """
        loop = asyncio.get_running_loop()
        now = self._clock.now()
        failures = []
        futures = []
        for entry_id in entry_ids:
            refusal = self._backoff.refusal(entry_id, now)
            if refusal is not None:
                failures.append(refusal)
                continue
            future = self._pending.get(entry_id)
            if future is None:
                future = self._pending[entry_id] = loop.create_future()
            futures.append(future)
        if futures:
            self._wake.set()
            # shield: a caller that goes away must not cancel issuance the others wait for.
            results = await asyncio.gather(*(asyncio.shield(f) for f in futures), return_exceptions=True)
            failures.extend(str(r) for r in results if isinstance(r, BaseException))
        return failures

    # -- the issuance loop -------------------------------------------------------------------
    def _next_wake(self, now: float) -> float:
        """When the loop has something to do on its own: a rotation (not in backoff) or an expiry."""
        times = [max(s.rotate_at, self._backoff.next_attempt(e)) for e, s in self._svids.items()]
        times += [s.expires_at for s in self._svids.values()]
        return min(times, default=now + _IDLE_WAKE)

    async def _drop_expired(self, now: float) -> None:
        """Expired SVIDs leave the cache, and open streams hear of it (e.g. while the authority is down)."""
        expired = [e for e, s in self._svids.items() if s.expires_at <= now]
        for entry_id in expired:
            del self._svids[entry_id]
            log.warning("x509-svid expired before it could be rotated", extra={"entry_id": entry_id})
        if self._drop_orphans() or expired:
            await self._bump()

    async def run(self) -> None:
        while True:
            wait = min(max(0.0, self._next_wake(self._clock.now()) - self._clock.now()), self._clock_recheck)
            if not self._pending:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=wait)
            self._wake.clear()
            now = self._clock.now()
            await self._drop_expired(now)
            due = {e for e, s in self._svids.items()
                   if s.rotate_at <= now and self._backoff.next_attempt(e) <= now and e in self._entries}
            waiting = dict(self._pending)
            self._pending.clear()
            # Callers who asked while the previous batch was in flight may already be served by it.
            for entry_id in [e for e in waiting if self._valid(e, now)]:
                future = waiting.pop(entry_id)
                if not future.done():
                    future.set_result(None)
            batch = sorted(set(waiting) | due)
            if not batch:
                continue
            refusal = self._issuance_refusal()
            if refusal is not None:
                # Stale or banned: rotation waits too; callers hear why at once.
                for entry_id in batch:
                    self._backoff.failed(entry_id, refusal, now)
                for future in waiting.values():
                    if not future.done():
                        future.set_exception(NoIdentityError(refusal))
                continue
            failed: dict[str, str] = {}
            # The authority takes a bounded number of CSRs per request: larger batches go in parts.
            for start in range(0, len(batch), MAX_X509_SVIDS_PER_REQUEST):
                part = batch[start:start + MAX_X509_SVIDS_PER_REQUEST]
                try:
                    failed.update(await self._issue(part))
                except Exception as err:  # whatever failed, every waiter hears of it and the loop goes on
                    log.warning("svid issuance failed", extra={"entries": part, "reason": str(err)})
                    failed.update({entry_id: f"the authority did not issue an SVID: {err}" for entry_id in part})
            now = self._clock.now()
            for entry_id in batch:
                if entry_id in failed:
                    self._backoff.failed(entry_id, failed[entry_id], now)
                else:
                    self._backoff.succeeded(entry_id)
            for entry_id, future in waiting.items():
                if future.done():
                    continue
                if entry_id in failed:
                    future.set_exception(NoIdentityError(failed[entry_id]))
                else:
                    future.set_result(None)

    async def _issue(self, entry_ids: Sequence[str]) -> dict[str, str]:
        batch = IssuanceRound.prepare(entry_ids, self._entries, self._parents.cap)
        if not batch.requests:
            return batch.failed
        replaced = {e: self._svids[e].serial for e in batch.keys if e in self._svids}
        response = await self._source.request(x509_svids=batch.requests)
        now = self._clock.now()
        for entry_id, cached in batch.take(response, self._entries, now).items():
            self._svids[entry_id] = cached
            previous = replaced.get(entry_id)
            self._emit(Decision(
                kind=DecisionKind.ISSUE if previous is None else DecisionKind.ROTATE, outcome=Outcome.OK, at=now,
                source="svid_cache", method="x509-svid", entry_ids=(entry_id,), spiffe_ids=(cached.spiffe_id,),
                svid_serials=(cached.serial,), details=() if previous is None else (("previous_serial", previous),),
            ))
        self._apply_revocations()  # a newer document may have come with the reply
        await self._bump()
        return batch.failed

    async def restore(self, entries: Iterable[Entry], svids: Iterable[CachedSvid]) -> None:
        """Hold what a saved state held (agent/savedstate.py) until the authority's answers replace
        it: the SVIDs of entries still in it at their revision, less what the node's revocation
        document (restored with the node identity) revokes."""
        self._replace_entries(entries)
        self._svids = {s.entry_id: s for s in svids
                       if (entry := self._entries.get(s.entry_id)) is not None and entry.revision == s.entry_revision
                       and str(entry.spiffe_id) == s.spiffe_id}
        self._apply_revocations()
        self._drop_orphans()
        self._bundle_der, self._jwt_bundle = self._source.bundle_der(), self._source.jwt_bundle()
        await self._bump()

    async def sync_entries(self) -> None:
        """Fetch the node's entry set (and any newer revocation document) and apply both as one change."""
        response = await self._source.request(sync_entries=True)
        changed = self._replace_entries(response.entries) if response.entries is not None else False
        changed = self._apply_revocations() or changed
        bundle = self._source.bundle_der()
        if bundle != self._bundle_der:
            self._bundle_der = bundle
            changed = True
        jwt_bundle = self._source.jwt_bundle()
        if jwt_bundle != self._jwt_bundle:  # a JWT key rotation: open FetchJWTBundles streams hear of it
            self._jwt_bundle = jwt_bundle
            changed = True
        if changed:
            await self._bump()
