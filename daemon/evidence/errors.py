"""Errors raised while parsing or verifying TPM evidence.

Anything an agent sends can be hostile: every parser and verifier in this package raises only
EvidenceError subclasses, never IndexError, struct.error or ValueError.
"""

from __future__ import annotations

from vouchd.errors import VouchdError

__all__ = ["EvidenceError", "MalformedStructureError", "VerificationError"]


class EvidenceError(VouchdError):
    """Root of the errors of vouchd.evidence."""


class MalformedStructureError(EvidenceError):
    """Bytes that do not decode as the structure they claim to be (truncated, trailing bytes,
    unknown algorithm or type); the message names the structure and the field."""


class VerificationError(EvidenceError):
    """Well-formed evidence that failed a check; the message names the check."""
