"""What the authority publishes, applied by the agent at once (DESIGN §8, §10).

Two publications reach a node: the signed revocation document (for every node) and a NodeEvent
(for this node: its entries changed). Either makes the agent sync its entries now rather than at
the next heartbeat; the sync's reply carries the entry set and the newest document, applied as one
change so that an open stream never sees a half-applied state. When the sync fails (the authority
refuses a banned node, or cannot be reached), a revocation document is applied on its own: a
revocation must never wait for the authority to be reachable.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from vouchd.agent.node import NodeIdentity
from vouchd.agent.svids import SvidManager
from vouchd.errors import VouchdError
from vouchd.protocol.transport import REVOCATIONS_TOPIC, AuthorityEvents, node_events_topic

__all__ = ["AuthorityUpdates", "CoalescedCall"]

log = logging.getLogger("vouchd.agent.updates")


class CoalescedCall:
    """Runs an async function for many callers at once: a caller waits for a run that started after
    it asked, and every caller that asked during one run shares the next."""

    def __init__(self, function: Callable[[], Awaitable[None]]) -> None:
        self._function = function
        self._next: asyncio.Future[None] | None = None
        self._runner: asyncio.Task[None] | None = None

    async def __call__(self) -> None:
        if self._next is None:
            self._next = asyncio.get_running_loop().create_future()
        waiting = self._next
        if self._runner is None or self._runner.done():
            self._runner = asyncio.create_task(self._run(), name="coalesced-call")
        # shield: one caller going away must not cancel the run the others wait for.
        await asyncio.shield(waiting)

    async def _run(self) -> None:
        while self._next is not None:
            current, self._next = self._next, None
            try:
                await self._function()
            except Exception as err:
                current.set_exception(err)
                current.exception()  # retrieved: a run nobody waits for any more must not warn
            else:
                current.set_result(None)


class AuthorityUpdates:
    def __init__(self, node: NodeIdentity, svids: SvidManager) -> None:
        self._node = node
        self._svids = svids
        self._sync = CoalescedCall(svids.sync_entries)

    def subscribe(self, events: AuthorityEvents) -> None:
        events.subscribe(REVOCATIONS_TOPIC, self.on_revocations)
        events.subscribe(node_events_topic(self._node.node_id), self.on_node_event)

    async def on_revocations(self, topic: str, payload: bytes) -> None:
        try:
            document = self._node.accept_revocations(payload)
        except VouchdError as err:
            log.warning("revocation document refused", extra={"reason": str(err)})
            return
        if document is None:
            return
        if self._svids.affected_by(document):
            try:
                await self._sync()
            except Exception as err:  # the revocation still applies, below
                log.warning("entry sync after a revocation failed; applying the revocation alone",
                            extra={"reason": str(err)})
        await self._svids.apply_revocations()  # nothing left to do when the sync applied it

    async def on_node_event(self, topic: str, payload: bytes) -> None:
        try:
            event = self._node.open_node_event(payload)
        except VouchdError as err:
            log.warning("node event refused", extra={"reason": str(err)})
            return
        log.info("authority says this node's entries changed", extra={"event": event.event})
        try:
            await self._sync()
        except Exception as err:  # the heartbeat syncs again
            log.warning("entry sync after a node event failed", extra={"reason": str(err)})
