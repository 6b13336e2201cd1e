"""Errors raised by the TPM service.

Messages name the TCTI, the command, the TPM response code or the file that was at fault. They never
carry an authValue, a key, a secret or a credential.
"""

from __future__ import annotations

from vouchd.errors import VouchdError

__all__ = [
    "SealedDataUnavailableError",
    "TpmArgumentError",
    "TpmAuthorizationError",
    "TpmCapabilityError",
    "TpmError",
    "TpmKeyError",
    "TpmOperationError",
    "TpmUnavailableError",
]


class TpmError(VouchdError):
    """Root of the TPM service's errors."""


class TpmUnavailableError(TpmError):
    """The TPM cannot be reached or does not respond; the message names the TCTI."""


class TpmCapabilityError(TpmError):
    """The TPM lacks an algorithm, curve or PCR bank vouchd needs; the message names what is missing."""


class TpmKeyError(TpmError):
    """A stored key blob or authValue is missing, corrupt or does not belong to this TPM; names the file."""


class TpmAuthorizationError(TpmError):
    """The TPM refused a hierarchy authorization (or is in dictionary-attack lockout), or the file that
    holds one cannot be used; the message names the hierarchy, the config key and the fix, never the value."""


class SealedDataUnavailableError(TpmError):
    """Sealed data cannot be unsealed: the PCRs differ from when it was sealed, or the blob was made by
    another TPM (or under another owner seed) or is damaged. The data is gone for this boot: seal anew."""


class TpmOperationError(TpmError):
    """A TPM command failed; the message names the command and the response code (hex and text)."""


class TpmArgumentError(TpmError, ValueError):
    """A caller passed a value the TPM service cannot use (unknown bank, PCR out of range, oversized data).

    It is also a ValueError because it is a caller's mistake, yet callers that relay values from the
    network (a PCR selection demanded by the authority) can catch it as a VouchdError.
    """
