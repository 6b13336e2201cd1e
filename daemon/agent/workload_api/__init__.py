"""The SPIFFE Workload API edge of the agent: the only package that knows gRPC (grpclib).

Importing the package loads no gRPC: it exports the errors and the interface types the agent core
uses (identities.py). The server lives in `vouchd.agent.workload_api.server` (the service in
`.service`, a request's decision in `.calls`) and the peer checks in `vouchd.agent.workload_api.peer`;
import them from there.
"""

from __future__ import annotations

from vouchd.agent.workload_api.errors import InvalidSvidMaterialError, NoIdentityError, PeerError, WorkloadApiError
from vouchd.agent.workload_api.identities import (
    WORKLOAD_API_SOURCE,
    WorkloadApiObserver,
    WorkloadIdentities,
    X509SvidMaterial,
)

__all__ = [
    "WORKLOAD_API_SOURCE",
    "InvalidSvidMaterialError",
    "NoIdentityError",
    "PeerError",
    "WorkloadApiError",
    "WorkloadApiObserver",
    "WorkloadIdentities",
    "X509SvidMaterial",
]
