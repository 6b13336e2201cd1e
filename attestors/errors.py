"""Errors of the attestor plugins and their catalog."""

from __future__ import annotations

from vouchd.errors import ConfigError, VouchdError

__all__ = ["AttestorError", "CatalogError", "ProcessExitedError", "ProcessInfoError"]


class AttestorError(VouchdError):
    """A workload attestor could not describe the calling process.

    The message names the attestor the way operators grep for it: `workloadattestor(<name>): <reason>`.
    """

    def __init__(self, attestor: str, reason: str) -> None:
        super().__init__(f"workloadattestor({attestor}): {reason}")
        self.attestor = attestor
        self.reason = reason


class ProcessInfoError(VouchdError):
    """A /proc entry of a process could not be read or parsed."""


class ProcessExitedError(ProcessInfoError):
    """The process is gone: its /proc entry no longer exists."""


class CatalogError(ConfigError):
    """The set of attestor plugins or their configuration cannot be used."""
