"""The rules every registration entry obeys, wherever it comes from (DESIGN §5, §6).

Kept in one place so that the configuration file, the authority's entry index and any later
entry source (API, CLI) refuse exactly the same entries with the same words.
"""

from __future__ import annotations

from collections.abc import Collection

from vouchd.selectors import Selector
from vouchd.spiffe import SpiffeId

__all__ = ["KERNEL_ANCHORED_SELECTORS", "RESERVED_PATH_PREFIX", "EntryRuleViolation", "entry_violation"]

# path, sha256 and script selectors never stand alone: a process can connect, fork and exec
# something else while the child keeps the socket. One of these must anchor every entry.
KERNEL_ANCHORED_SELECTORS = frozenset(
    {("unix", "uid"), ("unix", "gid"), ("systemd", "unit"), ("container", "id"), ("k8s", "pod_uid")}
)

# vouchd's own identities (the authority, nodes) live under this path; no workload may get one.
RESERVED_PATH_PREFIX = "/vouchd/"

# Selectors that name one machine or an operator-assigned group; a genuine-TPM selector alone
# would match any machine.
_NODE_BINDING_SELECTORS = frozenset({("tpm", "ek_hash"), ("node", "label")})


class EntryRuleViolation(tuple[str, str]):
    """(field, message): which field of the entry breaks which rule."""

    __slots__ = ()

    @property
    def field(self) -> str:
        return self[0]

    @property
    def message(self) -> str:
        return self[1]


def entry_violation(
    spiffe_id: SpiffeId,
    selectors: Collection[Selector],
    parent: SpiffeId | None,
    node_selectors: Collection[Selector],
) -> EntryRuleViolation | None:
    """The first rule the entry breaks, or None."""
    if not spiffe_id.path:
        return EntryRuleViolation(("spiffe_id", "a workload's SPIFFE ID needs a path, e.g. spiffe://example.org/web"))
    if spiffe_id.path.startswith(RESERVED_PATH_PREFIX) or spiffe_id.path == RESERVED_PATH_PREFIX.rstrip("/"):
        return EntryRuleViolation(("spiffe_id", f"paths under {RESERVED_PATH_PREFIX} are reserved for vouchd itself"))
    if not selectors:
        return EntryRuleViolation(("selectors", "an entry needs at least one selector"))
    if not any((s.type, s.key) in KERNEL_ANCHORED_SELECTORS for s in selectors):
        anchored = ", ".join(f"{t}:{k}" for t, k in sorted(KERNEL_ANCHORED_SELECTORS))
        return EntryRuleViolation(("selectors", f"needs at least one kernel-anchored selector ({anchored})"))
    if parent is not None and node_selectors:
        return EntryRuleViolation(("node_selectors", "an entry has either a parent or node_selectors, not both"))
    if node_selectors and not any((s.type, s.key) in _NODE_BINDING_SELECTORS for s in node_selectors):
        return EntryRuleViolation(("node_selectors", "must include tpm:ek_hash or a node:label selector"))
    return None
