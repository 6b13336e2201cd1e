"""The narrow interfaces between the Workload API and the agent, and the values they carry.

The agent implements WorkloadIdentities; the server knows nothing else about the agent. What the
server decides goes to a vouchd.decisions.DecisionSink; the agent may also give it a
WorkloadApiObserver to learn which streams are open. Nothing here imports gRPC: the agent core
imports this module.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from vouchd.agent.workload_api.errors import InvalidJwtSvidError, InvalidSvidMaterialError, NoIdentityError
from vouchd.attestors.base import Evidence, WorkloadAttestation, WorkloadProcess
from vouchd.decisions import WORKLOAD_API_DECISIONS
from vouchd.selectors import Selector

__all__ = [
    "WORKLOAD_API_SOURCE",
    "CallerContext",
    "InvalidJwtSvidError",
    "JwtSvidMaterial",
    "NoIdentityError",
    "WorkloadApiObserver",
    "WorkloadIdentities",
    "X509SvidMaterial",
]

WORKLOAD_API_SOURCE = WORKLOAD_API_DECISIONS  # the `source` of every Decision the Workload API emits

_SPIFFE_SCHEME = "spiffe://"


@dataclass(frozen=True, slots=True)
class X509SvidMaterial:
    """One X.509-SVID as the Workload API hands it to a workload."""

    spiffe_id: str
    cert_chain_der: bytes  # leaf first, concatenated DER
    private_key_der: bytes = field(repr=False)  # PKCS#8 DER, unencrypted: never logged, never in a repr
    bundle_der: bytes  # the SVID's trust domain bundle, concatenated DER
    hint: str = ""

    def __post_init__(self) -> None:
        if not self.spiffe_id.startswith(_SPIFFE_SCHEME) or len(self.spiffe_id) == len(_SPIFFE_SCHEME):
            raise InvalidSvidMaterialError(f"x509 svid spiffe id {self.spiffe_id[:200]!r} is not a spiffe:// id")
        for name, value in (
            ("certificate chain", self.cert_chain_der),
            ("private key", self.private_key_der),
            ("bundle", self.bundle_der),
        ):
            if not value:
                raise InvalidSvidMaterialError(f"x509 svid for {self.spiffe_id} has an empty {name}")

    @property
    def trust_domain_id(self) -> str:
        """The SPIFFE ID of the SVID's trust domain, e.g. `spiffe://example.org`."""
        authority = self.spiffe_id[len(_SPIFFE_SCHEME) :].split("/", 1)[0]
        return _SPIFFE_SCHEME + authority


@dataclass(frozen=True, slots=True)
class CallerContext:
    """One attested request, whole: what the agent decides on, and what request-time policy reads."""

    method: str                          # FetchX509SVID, FetchJWTSVID, ...
    process: WorkloadProcess             # who asks, as the kernel described it
    selectors: frozenset[Selector]       # what attestation derived from it
    audiences: tuple[str, ...] = ()      # FetchJWTSVID: the audiences asked for
    spiffe_id: str = ""                  # FetchJWTSVID: the one identity asked for, if any
    evidence: tuple[Evidence, ...] = ()  # what attestation recorded but nothing matches on
    # What the agent adds to the call's decision while answering it (the policy's verdicts): the one
    # mutable part, written by the lookups, read by the Workload API when it records the decision.
    details: list[tuple[str, str]] = field(default_factory=list, compare=False)


@dataclass(frozen=True, slots=True)
class JwtSvidMaterial:
    """One JWT-SVID as the Workload API hands it to a workload."""

    spiffe_id: str
    token: str = field(repr=False)  # a bearer credential: never logged, never in a repr
    hint: str = ""


class WorkloadApiObserver(Protocol):
    """Told when a Workload API stream opens and closes (`vouchd status`: connected workloads).

    Not a decision: how each request ended goes to the service's DecisionSink. Called on the event
    loop; must return quickly. An exception is logged and otherwise ignored: observing never
    changes what a workload gets.
    """

    def stream_opened(self, method: str, pid: int, uid: int) -> None: ...

    def stream_closed(self, method: str, pid: int, uid: int) -> None: ...


class WorkloadIdentities(Protocol):
    """What the Workload API asks of the agent."""

    async def attest(self, process: WorkloadProcess) -> WorkloadAttestation:
        """Selectors (and evidence) of the calling process; raises AttestorError when attestation fails.

        Has no deadline of its own: the service bounds it with its `attest_deadline` and cancels it
        when that passes, so one setting decides how long a caller may be attested.
        """
        ...

    def entitled(self, caller: CallerContext) -> bool:
        """True if some registration entry matches these selectors; issues nothing."""
        ...

    async def x509_svids(self, caller: CallerContext) -> Sequence[X509SvidMaterial]:
        """The caller's current X.509-SVIDs, the default one first; may wait for issuance.

        An empty result or NoIdentityError means the caller is entitled to none.
        """
        ...

    def x509_bundles(self) -> Mapping[str, bytes]:
        """Trust domain SPIFFE ID (`spiffe://example.org`) -> concatenated DER of its CA certificates."""
        ...

    async def jwt_svids(self, caller: CallerContext) -> Sequence[JwtSvidMaterial]:
        """The caller's JWT-SVIDs for its audiences (only its `spiffe_id`'s when that is not empty);
        may wait for issuance. NoIdentityError when the caller is entitled to none."""
        ...

    def jwt_bundles(self) -> Mapping[str, bytes]:
        """Trust domain SPIFFE ID -> its JWKS document."""
        ...

    def validate_jwt_svid(self, caller: CallerContext, token: str, audience: str) -> tuple[str, Mapping[str, Any]]:
        """The SPIFFE ID and claims of a valid JWT-SVID; InvalidJwtSvidError saying why not;
        NoIdentityError when the policy forbids this caller to validate for this audience."""
        ...

    @property
    def version(self) -> int:
        """Bumped on any change that can alter a response: rotation, entries, bundle, revocation."""
        ...

    async def wait_for_change(self, seen_version: int) -> int:
        """Return the current version as soon as it differs from `seen_version`."""
        ...
