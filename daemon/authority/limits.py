"""Rate limits on what anyone on the bus can ask the authority before it knows who they are.

Nonces for attestation and attestation requests are free to ask for and cost the authority a store
write (a nonce) or an EK chain check and a credential (an attestation): a token bucket per node id
and one for the whole authority bound both, and they are checked before anything expensive runs.
The buckets live in memory, per replica: a limit is a bound on work, not a security decision.
"""

from __future__ import annotations

from dataclasses import dataclass

from vouchd.clock import Clock
from vouchd.protocol.ratelimit import KeyedTokenBuckets, TokenBucket

__all__ = ["AttestationLimits"]


@dataclass(frozen=True)
class _Rates:
    per_node_rate: float = 1.0      # a node attests at start, at renewal and when asked: seconds apart
    per_node_burst: float = 10.0
    total_rate: float = 200.0       # a fleet restarting at once spreads over a few seconds
    total_burst: float = 1000.0


class AttestationLimits:
    """The per-node and total limits on attestation nonces and requests."""

    def __init__(self, clock: Clock, rates: _Rates = _Rates()) -> None:
        self._clock = clock
        self._per_node = KeyedTokenBuckets(rates.per_node_rate, rates.per_node_burst)
        self._total = TokenBucket(rates.total_rate, rates.total_burst, now=clock.monotonic())

    def refusal(self, node_id: str) -> str | None:
        """Why this request must wait (and so is refused now), or None when it may go on."""
        now = self._clock.monotonic()
        if not self._per_node.take(node_id, now):
            return "too many attestation requests for this node; try again in a few seconds"
        if not self._total.take(now):
            return "too many attestation requests; try again in a few seconds"
        return None
