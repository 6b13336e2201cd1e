"""How much one Workload API caller may ask of the agent: sizes, counts per uid, request shapes.

Any local user can connect to the Workload API socket, so nothing a caller sends may cost the agent
more than a small, fixed amount before it is refused, and no uid may take what others need. The
numbers live here, with why each is what it is; guard.py enforces the connection-level ones on the
HTTP/2 connection, before grpclib buffers anything, and the service enforces the others.

They are constants rather than configuration: each is far above what a well-behaved workload needs
(one connection, one to three streams, requests of a few hundred bytes), and the agent's unit caps
its memory (`MemoryMax=`) in case many uids misbehave at once.

The request-shape checks (`check_jwt_svid_request`, `check_validate_request`) are for the JWT
handlers: they raise RefusedError with InvalidArgument, and are called after the request message is
received and before the caller is attested, so an absurd request costs neither attestation nor a
TPM quote.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from grpclib.const import Status

from vouchd.agent.workload_api.calls import RefusedError
from vouchd.proto import workload_pb2 as pb
from vouchd.spiffe import MAX_AUDIENCE_LENGTH, MAX_AUDIENCES, MAX_TOKEN_LENGTH

__all__ = [
    "ATTESTATIONS_PER_UID",
    "CONNECTIONS_PER_UID",
    "FIRST_REQUEST_TIMEOUT",
    "MAX_AUDIENCES",
    "MAX_AUDIENCE_LENGTH",
    "MAX_REQUEST_BYTES",
    "MAX_SPIFFE_ID_LENGTH",
    "MAX_TOKEN_LENGTH",
    "STREAMS_PER_UID",
    "AttestationSlots",
    "ConnectionLimits",
    "UidCounts",
    "check_jwt_svid_request",
    "check_validate_request",
]

# -- requests -------------------------------------------------------------------------------------------

# A JWT-SVID to validate is the largest request a workload has reason to send; every other one is a
# few bytes. A token carrying the most audiences allowed (vouchd.spiffe: MAX_AUDIENCES of at most
# MAX_AUDIENCE_LENGTH characters, the same bounds the authority applies) is under 12 KiB once
# base64-encoded and signed; MAX_TOKEN_LENGTH allows 16 KiB, and a request message four times that
# is still nothing to hold. A caller declaring more is refused on the 5-byte gRPC prefix.
MAX_REQUEST_BYTES = 64 * 1024
MAX_SPIFFE_ID_LENGTH = 2048  # the SPIFFE ID standard's maximum, in bytes

# -- callers --------------------------------------------------------------------------------------------

# Per uid, because the uid is what the kernel vouches for: a caller cannot pose as another uid to
# spend its share, and all the workloads of a uid are one operator's to fix. They must allow a host
# where one uid (often root) runs hundreds of workloads: an open stream on a connection of its own
# costs the agent about 47 KB (measured: 62 MB idle, 85 MB with 500, 109 MB with 1000), and a uid
# holding all its connections, each with a full flow-control window parked (guard.py), about 90 MB
# more, which MemoryMax= in the unit leaves room for.
CONNECTIONS_PER_UID = 1024
STREAMS_PER_UID = 2048
# Attesting reads /proc and may open and hash the caller's executable on a thread pool every caller
# shares: eight at a time per uid keep a uid that opens hundreds of streams at once from filling it.
# A caller over the cap waits for a slot (up to the attestation deadline), so such a burst is
# served in turn rather than refused.
ATTESTATIONS_PER_UID = 8
# A workload sends its request as soon as it connects; a connection that has sent no complete
# request by then is not a workload waiting for an answer.
FIRST_REQUEST_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """What guard.py enforces on each connection; the defaults are the constants above."""

    max_request_bytes: int = MAX_REQUEST_BYTES
    connections_per_uid: int = CONNECTIONS_PER_UID
    streams_per_uid: int = STREAMS_PER_UID
    first_request_timeout: float = FIRST_REQUEST_TIMEOUT  # seconds

    def __post_init__(self) -> None:
        for name in ("max_request_bytes", "connections_per_uid", "streams_per_uid", "first_request_timeout"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class UidCounts:
    """How many of something (connections, streams) each uid holds, against one cap."""

    def __init__(self, cap: int) -> None:
        if cap <= 0:
            raise ValueError(f"cap must be positive, got {cap}")
        self.cap = cap
        self._held: dict[int, int] = {}

    def take(self, uid: int) -> bool:
        """Count one more for `uid`; False, counting nothing, when the uid already holds the cap."""
        held = self._held.get(uid, 0)
        if held >= self.cap:
            return False
        self._held[uid] = held + 1
        return True

    def give_back(self, uid: int) -> None:
        held = self._held.get(uid, 0) - 1
        if held > 0:
            self._held[uid] = held
        else:
            self._held.pop(uid, None)

    def held(self, uid: int) -> int:
        return self._held.get(uid, 0)


@dataclass
class _UidSlots:
    semaphore: asyncio.Semaphore
    users: int = 0  # holding a slot or waiting for one: the entry goes when none is left


class AttestationSlots:
    """At most `per_uid` attestations of one uid at a time; others of that uid wait their turn."""

    def __init__(self, per_uid: int = ATTESTATIONS_PER_UID) -> None:
        if per_uid <= 0:
            raise ValueError(f"per_uid must be positive, got {per_uid}")
        self.per_uid = per_uid
        self._uids: dict[int, _UidSlots] = {}

    def in_use(self, uid: int) -> int:
        slots = self._uids.get(uid)
        return 0 if slots is None else min(slots.users, self.per_uid)

    @asynccontextmanager
    async def slot(self, uid: int, *, wait: float) -> AsyncIterator[None]:
        """Hold one of the uid's slots for the body; wait up to `wait` seconds for one.

        No slot in time is RefusedError RESOURCE_EXHAUSTED: the uid's own attestations are what it
        waited for, so it is told to slow down rather than that it could not be attested.
        """
        slots = self._uids.get(uid)
        if slots is None:
            slots = self._uids[uid] = _UidSlots(asyncio.Semaphore(self.per_uid))
        slots.users += 1
        try:
            try:
                async with asyncio.timeout(wait):
                    await slots.semaphore.acquire()
            except TimeoutError:
                raise RefusedError(
                    Status.RESOURCE_EXHAUSTED,
                    "resource_exhausted",
                    "too many requests in progress",
                    f"uid {uid} has {self.per_uid} attestations in progress and none ended within {wait:g}s",
                ) from None
            try:
                yield
            finally:
                slots.semaphore.release()
        finally:
            slots.users -= 1
            if slots.users == 0:
                del self._uids[uid]


# -- request shapes (for the JWT RPCs) ------------------------------------------------------------------


def check_jwt_svid_request(request: pb.JWTSVIDRequest | None) -> None:
    """Refuse (RefusedError, InvalidArgument) a FetchJWTSVID request no entry could ever be granted.

    `request` is what stream.recv_message() returned (None: the client sent no message). Call it
    before attesting the caller.
    """
    audiences = () if request is None else tuple(request.audience)
    if not audiences:
        raise _invalid("audience must be specified", "no audience in the request")
    if len(audiences) > MAX_AUDIENCES:
        raise _invalid(f"at most {MAX_AUDIENCES} audiences may be requested", f"{len(audiences)} audiences")
    _check_audiences(audiences)
    spiffe_id_length = 0 if request is None else len(request.spiffe_id.encode())
    if spiffe_id_length > MAX_SPIFFE_ID_LENGTH:
        raise _invalid(f"spiffe id longer than {MAX_SPIFFE_ID_LENGTH} bytes", f"spiffe id of {spiffe_id_length} bytes")


def check_validate_request(request: pb.ValidateJWTSVIDRequest | None) -> None:
    """Refuse (RefusedError, InvalidArgument) a ValidateJWTSVID request that cannot name a valid token.

    `request` is what stream.recv_message() returned (None: the client sent no message). Call it
    before attesting the caller and before parsing the token.
    """
    audience = "" if request is None else request.audience
    svid = "" if request is None else request.svid
    if not audience:
        raise _invalid("audience must be specified", "no audience in the request")
    _check_audiences((audience,))
    if not svid:
        raise _invalid("svid must be specified", "no svid in the request")
    if len(svid) > MAX_TOKEN_LENGTH:
        raise _invalid(f"svid longer than {MAX_TOKEN_LENGTH} characters", f"svid of {len(svid)} characters")


def _check_audiences(audiences: tuple[str, ...]) -> None:
    for audience in audiences:
        if not audience:
            raise _invalid("audience must not be empty", "an empty audience in the request")
        if len(audience) > MAX_AUDIENCE_LENGTH:
            raise _invalid(
                f"audience longer than {MAX_AUDIENCE_LENGTH} characters", f"audience of {len(audience)} characters"
            )


def _invalid(public: str, detail: str) -> RefusedError:
    return RefusedError(Status.INVALID_ARGUMENT, "invalid_argument", public, detail)
