"""The root of every error vouchd raises on purpose.

Messages are lower-case without a trailing period, name what was wrong, and never carry a key,
token or secret. Every other error derives from these, declared in the errors.py of its package
where the package has one (spiffe, evidence, tpm, protocol, authority, agent.workload_api,
attestors), and otherwise beside the code that raises it.
"""

from __future__ import annotations

__all__ = ["ConfigError", "VouchdError"]


class VouchdError(Exception):
    """Root of vouchd's errors."""


class ConfigError(VouchdError):
    """A configuration file is missing, malformed, or holds a value vouchd cannot use."""
