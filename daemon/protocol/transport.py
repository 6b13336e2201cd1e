"""How agent requests reach the authority.

One protocol, two transports (DESIGN §1): MQTT through a broker in fleet mode, and LocalTransport
in standalone mode, which hands the same request bytes to the in-process authority. The logic on
both ends never knows which one carries it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Protocol

from vouchd.protocol.errors import TransportError

__all__ = ["ATTEST_TOPIC", "REQUEST_TOPIC", "AuthorityHandler", "AuthorityTransport", "LocalTransport"]

# Topic suffixes under vouchd/v1/<trust domain>/ (DESIGN §10).
ATTEST_TOPIC = "authority/attest"
REQUEST_TOPIC = "authority/request"

AuthorityHandler = Callable[[str, bytes], Awaitable[bytes]]


class AuthorityTransport(Protocol):
    async def call(self, topic: str, request: bytes, *, timeout: float) -> bytes:
        """Send request bytes to the authority and return its (signed) reply bytes."""
        ...


class LocalTransport:
    """Standalone mode: the authority runs in this process."""

    def __init__(self, handler: AuthorityHandler) -> None:
        self._handler = handler

    async def call(self, topic: str, request: bytes, *, timeout: float) -> bytes:
        try:
            return await asyncio.wait_for(self._handler(topic, bytes(request)), timeout)
        except TimeoutError:
            raise TransportError(f"authority did not answer on {topic} within {timeout:g} s") from None
