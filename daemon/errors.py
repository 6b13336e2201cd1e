"""The root of every error vouchd raises on purpose.

Messages are lower-case without a trailing period, name what was wrong, and never carry a key,
token or secret. Each subpackage derives its own errors from these in its own errors.py.
"""

from __future__ import annotations

__all__ = ["ConfigError", "VouchdError"]


class VouchdError(Exception):
    """Root of vouchd's errors."""


class ConfigError(VouchdError):
    """A configuration file is missing, malformed, or holds a value vouchd cannot use."""
