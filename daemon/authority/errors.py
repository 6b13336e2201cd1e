"""Errors raised by the authority: its CA, verification, entries and the store."""

from __future__ import annotations

from vouchd.errors import VouchdError
from vouchd.protocol.refusals import Refusal

__all__ = ["AuthorityError", "CaError", "RefusalError"]


class AuthorityError(VouchdError):
    """Root of the errors of vouchd.authority."""


class CaError(AuthorityError):
    """The trust domain's CA cannot be loaded, created or used for what was asked."""


class RefusalError(AuthorityError):
    """The authority refuses a node's request.

    `code` is what the agent acts on (for example ``reattest`` or ``nonce``); the message is for
    logs and operators and never holds a secret.
    """

    def __init__(self, code: Refusal, message: str) -> None:
        super().__init__(message)
        self.code = code
