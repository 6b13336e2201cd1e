"""Errors of the agent <-> authority protocol."""

from __future__ import annotations

from vouchd.errors import VouchdError

__all__ = ["MessageError", "ProtocolError", "RemoteError", "SignatureError", "TransportError"]


class ProtocolError(VouchdError):
    """Root of protocol errors."""


class MessageError(ProtocolError):
    """A message does not match its schema (unknown field, wrong type, over a size limit)."""


class SignatureError(ProtocolError):
    """An authority message is not signed by a key that chains to the trust bundle, or is not for us."""


class TransportError(ProtocolError):
    """The authority could not be reached or did not answer in time."""


class RemoteError(ProtocolError):
    """The authority refused a request; `code` is machine-readable, the message is for humans."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"authority refused the request ({code}): {message}")
        self.code = code
        self.reason = message
