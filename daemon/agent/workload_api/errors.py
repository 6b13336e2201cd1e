"""Errors of the Workload API edge. Only server.py turns them into gRPC status codes."""

from __future__ import annotations

from vouchd.errors import VouchdError

__all__ = ["InvalidJwtSvidError", "InvalidSvidMaterialError", "NoIdentityError", "PeerError", "WorkloadApiError"]


class WorkloadApiError(VouchdError):
    """Root of the Workload API's errors."""


class NoIdentityError(WorkloadApiError):
    """The caller was attested but is entitled to no identity: answered with PermissionDenied."""


class PeerError(WorkloadApiError):
    """The calling process cannot be identified from its connection: answered with PermissionDenied."""


class InvalidSvidMaterialError(WorkloadApiError):
    """An X.509-SVID handed to the Workload API lacks a field the SPIFFE spec makes mandatory."""


class InvalidJwtSvidError(WorkloadApiError):
    """A JWT-SVID handed in to ValidateJWTSVID is not valid (the message says why, never the token):
    answered with InvalidArgument."""
