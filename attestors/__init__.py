"""Attestor plugins: small Protocols, built-ins, and one catalog that builds the configured ones.

Imports nothing of vouchd.agent, vouchd.authority or vouchd.tpm: attestors only describe what they see.
"""

from __future__ import annotations

from vouchd.attestors.base import WorkloadAttestor, WorkloadProcess, attest_workload
from vouchd.attestors.catalog import (
    BUILTIN_WORKLOAD_ATTESTORS,
    WORKLOAD_ATTESTOR_ENTRY_POINT_GROUP,
    build_workload_attestors,
    workload_attestor_factories,
)
from vouchd.attestors.errors import AttestorError, CatalogError, ProcessExitedError, ProcessInfoError

__all__ = [
    "BUILTIN_WORKLOAD_ATTESTORS",
    "WORKLOAD_ATTESTOR_ENTRY_POINT_GROUP",
    "AttestorError",
    "CatalogError",
    "ProcessExitedError",
    "ProcessInfoError",
    "WorkloadAttestor",
    "WorkloadProcess",
    "attest_workload",
    "build_workload_attestors",
    "workload_attestor_factories",
]
