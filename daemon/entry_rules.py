"""The rules every registration entry obeys, wherever it comes from (DESIGN §5, §6).

Kept in one place so that the configuration file, the authority's entry index and any later
entry source (API, CLI) refuse exactly the same entries with the same words.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable

from vouchd.selectors import Selector, SelectorKind, SelectorSchema, matching, non_empty
from vouchd.spiffe import SpiffeId, TrustTier

__all__ = [
    "KERNEL_ANCHORED_SELECTORS",
    "NODE_SELECTOR_SCHEMA",
    "RESERVED_PATH_PREFIX",
    "EntryRuleViolation",
    "entry_selectors_violation",
    "entry_violation",
    "selector_violation",
]

# path, sha256 and script selectors never stand alone: a process can connect, fork and exec
# something else while the child keeps the socket. One of these must anchor every entry.
KERNEL_ANCHORED_SELECTORS = frozenset(
    {("unix", "uid"), ("unix", "gid"), ("systemd", "unit"), ("container", "id"), ("k8s", "pod_uid")}
)

# vouchd's own identities (the authority, nodes) live under this path; no workload may get one.
RESERVED_PATH_PREFIX = "/vouchd/"

# Selectors that name one machine or an operator-assigned group; a genuine-TPM selector alone
# would match any machine.
_NODE_BINDING_SELECTORS = frozenset({("tpm", "ek_hash"), ("node", "key_hash"), ("node", "label")})

# What the authority says about a node (DESIGN §4): node attestation's tpm:* selectors and the
# authority's own node:* ones. The pcr_profile names are those `vouchd node learn --name` accepts.
NODE_SELECTOR_SCHEMA = SelectorSchema(
    {
        "tpm": (
            SelectorKind("tpm", "ek_hash", matching(
                r"[0-9a-f]{64}", "an ek_hash is 64 lowercase hex digits, as at the end of the node's SPIFFE ID")),
            SelectorKind("tpm", "ek_issuer_cn", non_empty(
                "an ek_issuer_cn is the common name of the EK certificate's issuer, "
                "e.g. tpm:ek_issuer_cn:Acme TPM CA")),
            SelectorKind("tpm", "pcr_profile", matching(
                r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}",
                "a pcr_profile is 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit, "
                "e.g. tpm:pcr_profile:baseline")),
        ),
        "node": (
            SelectorKind("node", "tier", matching(
                "|".join(tier.value for tier in TrustTier),
                f"a tier is one of {', '.join(tier.value for tier in TrustTier)}, e.g. node:tier:hardware")),
            SelectorKind("node", "key_hash", matching(
                r"[0-9a-f]{64}", "a key_hash is 64 lowercase hex digits, as at the end of a static-secret node's "
                "SPIFFE ID")),
            SelectorKind("node", "label", matching(
                r"[^:]+:.+", "a node label is KEY:VALUE, e.g. node:label:role:web")),
        ),
    },
    described_as="a node selector",
)


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


def selector_violation(
    selectors: Iterable[Selector], schema: SelectorSchema, *, field: str = "selectors"
) -> EntryRuleViolation | None:
    """The first selector no producer in `schema` can emit, named `field[index]`, or None.

    Pass the selectors in the order the operator wrote them (the list of a file or a command
    line), so that the index names the one they wrote; a set has no order to name.
    """
    for index, selector in enumerate(selectors):
        problem = schema.problem(selector)
        if problem is not None:
            return EntryRuleViolation((f"{field}[{index}]", problem))
    return None


def entry_selectors_violation(
    selectors: Iterable[Selector], node_selectors: Iterable[Selector], workload_schema: SelectorSchema
) -> EntryRuleViolation | None:
    """The first selector of an entry that can never match: its workload selectors against
    `workload_schema` (what the agents' attestors produce, see vouchd.attestors.catalog), then its
    node selectors against NODE_SELECTOR_SCHEMA.

    Check this before entry_violation (which Entry runs on construction): a misspelt selector is
    then named as such, not reported as a missing kernel-anchored one.
    """
    violation = selector_violation(selectors, workload_schema)
    if violation is None:
        violation = selector_violation(node_selectors, NODE_SELECTOR_SCHEMA, field="node_selectors")
    return violation
