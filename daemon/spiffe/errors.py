"""Errors raised by vouchd.spiffe: identifiers, SVIDs and bundles that break the SPIFFE rules."""

from __future__ import annotations

from vouchd.errors import VouchdError

__all__ = ["InvalidBundleError", "InvalidSpiffeIdError", "InvalidSvidError", "SpiffeError"]


class SpiffeError(VouchdError):
    """Root of the errors of vouchd.spiffe."""


class InvalidSpiffeIdError(SpiffeError):
    """A SPIFFE ID or trust domain name does not follow the SPIFFE ID standard."""


class InvalidSvidError(SpiffeError):
    """An SVID, a CSR or the material to mint one breaks the X509-SVID rules or does not verify."""


class InvalidBundleError(SpiffeError):
    """A trust bundle cannot be parsed or holds something other than CA certificates."""
