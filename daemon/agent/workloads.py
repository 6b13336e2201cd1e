"""The agent's answer to "who is this caller and what may it get": attestors + SVID manager.

This is the real implementation of the narrow `WorkloadIdentities` interface the Workload API
server depends on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from vouchd.agent.svids import SvidManager
from vouchd.agent.workload_api.identities import X509SvidMaterial
from vouchd.attestors.base import WorkloadAttestor, WorkloadProcess, attest_workload
from vouchd.selectors import Selector
from vouchd.spiffe import TrustDomain

__all__ = ["AgentWorkloadIdentities"]


class AgentWorkloadIdentities:
    def __init__(self, trust_domain: TrustDomain, attestors: Sequence[WorkloadAttestor], svids: SvidManager,
                 *, attestation_deadline: float = 5.0) -> None:
        self._trust_domain_id = str(trust_domain.id)
        self._attestors = list(attestors)
        self._svids = svids
        self._deadline = attestation_deadline

    async def attest(self, process: WorkloadProcess) -> frozenset[Selector]:
        return await attest_workload(process, self._attestors, deadline=self._deadline)

    def entitled(self, selectors: frozenset[Selector]) -> bool:
        return bool(self._svids.match(selectors))

    async def x509_svids(self, selectors: frozenset[Selector]) -> Sequence[X509SvidMaterial]:
        return await self._svids.x509_svids(selectors)

    def x509_bundles(self) -> Mapping[str, bytes]:
        return {self._trust_domain_id: self._svids.bundle_der()}

    @property
    def version(self) -> int:
        return self._svids.version

    async def wait_for_change(self, seen_version: int) -> int:
        return await self._svids.wait_for_change(seen_version)
