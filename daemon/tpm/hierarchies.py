"""Hierarchy authorizations: the endorsement and owner secrets vouchd may need, and the TPM's refusals.

A TPM comes with empty hierarchy authorizations, and whoever may send it commands (the `tss` group)
can set one (`tpm2_changeauth -c e SECRET`). The TPM keeps it across reboots, so an agent that
assumed it empty could never derive its EK again. An operator who set them gives vouchd each one in
a file that only its owner may read: `agent.tpm.endorsement_auth_file` (the EK, and the policy
that every use of the EK as a parent needs) and `agent.tpm.owner_auth_file` (the storage key that
sealed data lives under).

A file holds the authorization as `tpm2_changeauth` takes it: the secret itself, `str:SECRET` or
`hex:HEX`; one trailing newline is not part of it. The value never appears in a message or a log.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

from tpm2_pytss import ESYS_TR, TPM2_RC, TSS2_Exception

from vouchd.securefiles import InsecureFileError, read_private
from vouchd.tpm.errors import TpmAuthorizationError

__all__ = ["Hierarchy", "HierarchyAuth", "HierarchyAuths", "hierarchy_refusal", "read_hierarchy_auth"]

# TPM2B_AUTH holds at most a TPMU_HA: the largest digest, 64 bytes.
MAX_AUTH_SIZE = 64

_RC_LAYER_MASK = 0xFF << 16
_TPM_LAYER = 0
_AUTH_REFUSED = frozenset({int(TPM2_RC.BAD_AUTH), int(TPM2_RC.AUTH_FAIL)})
_RC_LOCKOUT = 0x921  # TPM_RC_LOCKOUT, a warning: err.error is the whole code
_RC_HIERARCHY = int(TPM2_RC.HIERARCHY)


class Hierarchy(Enum):
    ENDORSEMENT = "endorsement"
    OWNER = "owner"

    @property
    def config_key(self) -> str:
        return f"agent.tpm.{self.value}_auth_file"

    @property
    def changeauth_flag(self) -> str:
        """The `-c` argument of tpm2_changeauth that names this hierarchy."""
        return "e" if self is Hierarchy.ENDORSEMENT else "o"

    @property
    def handle(self) -> ESYS_TR:
        return ESYS_TR.ENDORSEMENT if self is Hierarchy.ENDORSEMENT else ESYS_TR.OWNER


@dataclass(frozen=True)
class HierarchyAuth:
    hierarchy: Hierarchy
    value: bytes = field(default=b"", repr=False)
    source: Path | None = None  # the file the value came from; None: not configured, the empty authorization


@dataclass(frozen=True)
class HierarchyAuths:
    endorsement: HierarchyAuth = HierarchyAuth(Hierarchy.ENDORSEMENT)
    owner: HierarchyAuth = HierarchyAuth(Hierarchy.OWNER)

    @classmethod
    def from_files(cls, endorsement: Path | None, owner: Path | None) -> HierarchyAuths:
        """Read the configured files (file I/O: call it off the event loop)."""
        return cls(read_hierarchy_auth(Hierarchy.ENDORSEMENT, endorsement), read_hierarchy_auth(Hierarchy.OWNER, owner))

    def of(self, hierarchy: Hierarchy) -> HierarchyAuth:
        return self.endorsement if hierarchy is Hierarchy.ENDORSEMENT else self.owner


def read_hierarchy_auth(hierarchy: Hierarchy, path: Path | None) -> HierarchyAuth:
    """The authorization in `path`, or the empty one when no file is configured."""
    if path is None:
        return HierarchyAuth(hierarchy)
    where = f"{hierarchy.config_key} {path}"
    try:
        content = read_private(path)
    except InsecureFileError as err:
        raise TpmAuthorizationError(f"{where} is {err}: it holds a tpm authorization") from None
    except OSError as err:
        raise TpmAuthorizationError(f"cannot read {where}: {err.strerror}") from None
    value = _decode(content, where)
    if len(value) > MAX_AUTH_SIZE:
        raise TpmAuthorizationError(f"{where} holds {len(value)} bytes, more than a tpm authorization can have "
                                    f"({MAX_AUTH_SIZE})")
    return HierarchyAuth(hierarchy, value, path)


def _decode(content: bytes, where: str) -> bytes:
    if content.endswith(b"\r\n"):
        content = content[:-2]
    elif content.endswith(b"\n"):
        content = content[:-1]
    if content.startswith(b"hex:"):
        try:
            return binascii.unhexlify(content[4:].strip())
        except (binascii.Error, ValueError):
            # The message says what is wrong with the file, never what is in it.
            raise TpmAuthorizationError(f"{where} starts with hex: but the rest is not hex digits") from None
    if content.startswith(b"str:"):
        return content[4:]
    return content


def hierarchy_refusal(auth: HierarchyAuth, err: TSS2_Exception) -> TpmAuthorizationError | None:
    """What to tell the operator when the TPM refused a command authorized by `auth`'s hierarchy, or
    None when `err` is not about that authorization."""
    rc = int(err.rc)
    if rc & _RC_LAYER_MASK != _TPM_LAYER:
        return None
    error = int(err.error)
    name = auth.hierarchy.value
    flag = auth.hierarchy.changeauth_flag
    key = auth.hierarchy.config_key
    if error in _AUTH_REFUSED:
        if auth.source is None:
            return TpmAuthorizationError(
                f"the tpm refused the empty {name} hierarchy authorization (tpm rc {rc:#x}): someone set one "
                f"(tpm2_changeauth -c {flag}). Put it in a file only root may read (mode 0600) and name that file "
                f"in {key}, or set it back to empty with `tpm2_changeauth -c {flag} -p CURRENT`"
            )
        return TpmAuthorizationError(
            f"the tpm refused the {name} hierarchy authorization read from {auth.source} ({key}) (tpm rc "
            f"{rc:#x}): the file does not hold the current one. Write the current one into it, or set the "
            f"hierarchy's to the file's with `tpm2_changeauth -c {flag} -p CURRENT NEW`"
        )
    if error == _RC_LOCKOUT:
        return TpmAuthorizationError(
            f"the tpm is in dictionary-attack lockout and refuses the {name} hierarchy authorization (tpm rc "
            f"{rc:#x}): wait until it recovers (`tpm2_getcap properties-variable` shows "
            "TPM2_PT_LOCKOUT_COUNTER and TPM2_PT_LOCKOUT_RECOVERY), or clear it with "
            "`tpm2_dictionarylockout --clear-lockout -p LOCKOUT_AUTH`"
        )
    if error == _RC_HIERARCHY:
        return TpmAuthorizationError(
            f"the tpm's {name} hierarchy is disabled (TPM2_HierarchyControl; tpm rc {rc:#x}): "
            "it is enabled again at the next reboot"
        )
    return None
