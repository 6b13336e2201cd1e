"""The SPIFFE Workload API edge of the agent: the only package that knows gRPC (grpclib)."""

from __future__ import annotations

from vouchd.agent.workload_api.errors import InvalidSvidMaterialError, NoIdentityError, PeerError, WorkloadApiError
from vouchd.agent.workload_api.identities import WorkloadIdentities, X509SvidMaterial
from vouchd.agent.workload_api.peer import peer_process, process_unchanged
from vouchd.agent.workload_api.server import SECURITY_HEADER, WorkloadApiServer, WorkloadApiService

__all__ = [
    "SECURITY_HEADER",
    "InvalidSvidMaterialError",
    "NoIdentityError",
    "PeerError",
    "WorkloadApiError",
    "WorkloadApiServer",
    "WorkloadApiService",
    "WorkloadIdentities",
    "X509SvidMaterial",
    "peer_process",
    "process_unchanged",
]
