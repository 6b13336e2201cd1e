"""The authority's admin commands: entries, nodes, boot profiles and the bundle, at run time.

Served on the admin socket (root-only): the standalone agent's, and in fleet mode the server's.
Each command takes the request's `args` object and returns JSON-able data; a bad argument raises
AdminRequestError naming the argument and what was expected. The CLI (`vouchd entry ...`) is a thin
client of these.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import replace
from datetime import timedelta
from typing import Any

from vouchd.authority.errors import AuthorityError
from vouchd.authority.server import Authority
from vouchd.authority.store import EntryConflictError, EntryExistsError, EntryNotFoundError, NodeRecord
from vouchd.config import format_duration, parse_duration
from vouchd.decisions import Decision, DecisionKind, NodeEvidence, Outcome
from vouchd.entries import Entry, InvalidEntryError, default_entry_id
from vouchd.entry_rules import NODE_SELECTOR_SCHEMA, selector_violation
from vouchd.selectors import InvalidSelectorError, Selector, SelectorSchema
from vouchd.spiffe import SpiffeError, SpiffeId, TrustTier, serial_hex

__all__ = ["AdminRequestError", "AuthorityAdmin", "describe_entry"]

log = logging.getLogger("vouchd.authority.admin")

AdminCommand = Callable[[Mapping[str, Any]], Awaitable[Any]]

# What `entry create` and `entry update` accept; `id` only at creation.
_ENTRY_FIELDS = ("spiffe_id", "selectors", "parent", "node_selectors", "min_tier", "x509_ttl", "jwt_ttl",
                 "dns_names", "hint", "labels")


_RESERVED_LABEL_PREFIX = "vouchd/"
# The labels under vouchd/ that are the operator's to set: switches the default policy reads
# (docs/design.md §7). Every other vouchd/ label is vouchd's own bookkeeping.
OPERATOR_SWITCH_LABELS = frozenset({"vouchd/static-secret-x509"})


class AdminRequestError(AuthorityError):
    """An admin command's arguments are wrong, or name something that does not exist."""


def describe_entry(entry: Entry) -> dict[str, Any]:
    """An entry as the admin socket shows it: its wire form, TTLs also written as durations."""
    shown = entry.to_wire()
    for key in ("x509_ttl", "jwt_ttl"):
        value = getattr(entry, key)
        shown[f"{key}_text"] = format_duration(value) if value is not None else None
    return shown


class AuthorityAdmin:
    """`workload_schema`: the selectors the agents' attestors can produce (an entry naming others
    could never match). `default_node_selectors`: what binds an entry that names no node (a
    standalone authority binds it to the local TPM's EK; a fleet authority refuses such an entry)."""

    def __init__(self, authority: Authority, *, workload_schema: SelectorSchema,
                 default_node_selectors: frozenset[Selector] = frozenset()) -> None:
        self._authority = authority
        self._workload_schema = workload_schema
        self._default_node_selectors = default_node_selectors

    def commands(self) -> dict[str, AdminCommand]:
        from vouchd.authority.tokenadmin import TokenAdmin  # it builds on this module's helpers

        return {
            "entry.create": self.entry_create,
            "entry.list": self.entry_list,
            "entry.show": self.entry_show,
            "entry.update": self.entry_update,
            "entry.delete": self.entry_delete,
            "node.list": self.node_list,
            "node.show": self.node_show,
            "node.approve": self.node_approve,
            "node.ban": self.node_ban,
            "node.unban": self.node_unban,
            "profile.list": self.profile_list,
            "profile.remove": self.profile_remove,
            "bundle.show": self.bundle_show,
            **TokenAdmin(self._authority).commands(),
        }

    # -- entries -------------------------------------------------------------------------------
    async def entry_create(self, args: Mapping[str, Any]) -> dict[str, Any]:
        _refuse_unknown(args, ("id", *_ENTRY_FIELDS))
        entry = self._entry_from(args, base=None)
        try:
            stored = await self._authority.registry.create(entry)
        except EntryExistsError:
            raise AdminRequestError(f"entry {entry.id} already exists (the same SPIFFE ID and selectors, or the "
                                    "same --id): `vouchd entry update` changes it") from None
        return describe_entry(stored)

    async def entry_list(self, args: Mapping[str, Any]) -> list[dict[str, Any]]:
        _refuse_unknown(args, ())
        return [describe_entry(e) for e in self._authority.registry.index.all()]

    async def entry_show(self, args: Mapping[str, Any]) -> dict[str, Any]:
        _refuse_unknown(args, ("id",))
        return describe_entry(self._entry(args))

    async def entry_update(self, args: Mapping[str, Any]) -> dict[str, Any]:
        _refuse_unknown(args, ("id", *_ENTRY_FIELDS))
        current = self._entry(args)
        changes = {k: v for k, v in args.items() if k != "id"}
        if not changes:
            raise AdminRequestError("nothing to update: name at least one field to change")
        wanted = self._entry_from(changes, base=current)
        try:
            stored = await self._authority.registry.update(current.id, lambda _current: wanted)
        except EntryConflictError:
            raise AdminRequestError(f"entry {current.id} changed meanwhile; show it and update it again") from None
        except EntryNotFoundError:
            raise AdminRequestError(f"entry {current.id} was deleted meanwhile") from None
        return describe_entry(stored)

    async def entry_delete(self, args: Mapping[str, Any]) -> dict[str, Any]:
        _refuse_unknown(args, ("id",))
        entry_id = self._entry(args).id
        try:
            deleted = await self._authority.registry.delete(entry_id)
        except EntryNotFoundError:
            raise AdminRequestError(f"entry {entry_id} was deleted meanwhile") from None
        return describe_entry(deleted)

    def _entry(self, args: Mapping[str, Any]) -> Entry:
        entry_id = _string(args, "id")
        entry = self._authority.registry.index.get(entry_id)
        if entry is None:
            raise AdminRequestError(f"no entry {entry_id[:128]!r} (`vouchd entry list` shows them)")
        return entry

    def _entry_from(self, args: Mapping[str, Any], *, base: Entry | None) -> Entry:
        """Build and check an entry from arguments, over `base` when updating; checks run in the
        order that names a mistake best: a misspelt selector is named as such, not as a missing one."""
        values: dict[str, Any] = {}
        if "spiffe_id" in args or base is None:
            values["spiffe_id"] = self._spiffe_id(args)
        if "selectors" in args or base is None:
            values["selectors"] = _selectors(args, "selectors", self._workload_schema)
        values.update(self._binding(args, base))
        config = self._authority.config
        values["x509_ttl"] = _ttl(args, "x509_ttl", base.x509_ttl if base is not None else None,
                                  cap=("x509_svid_max_ttl", config.x509_svid_max_ttl))
        values["jwt_ttl"] = _ttl(args, "jwt_ttl", base.jwt_ttl if base is not None else None,
                                 cap=("jwt_svid_max_ttl", config.jwt_svid_max_ttl))
        if "min_tier" in args or base is None:
            values["min_tier"] = _tier(args)
        if "dns_names" in args:
            values["dns_names"] = tuple(_strings(args, "dns_names"))
        if "hint" in args:
            values["hint"] = _string(args, "hint", "", allow_empty=True)
        if "labels" in args:
            values["labels"] = _operator_labels(args, base)
        try:
            if base is not None:
                return replace(base, **values)
            entry_id = _string(args, "id", "") or default_entry_id(values["spiffe_id"], values["selectors"])
            return Entry(id=entry_id, **values)
        except InvalidEntryError as err:
            raise AdminRequestError(str(err)) from None

    def _spiffe_id(self, args: Mapping[str, Any]) -> SpiffeId:
        trust_domain = self._authority.trust_domain
        try:
            spiffe_id = SpiffeId.parse(_string(args, "spiffe_id"))
        except SpiffeError as err:
            raise AdminRequestError(f"spiffe_id: {err}") from None
        if not spiffe_id.is_member_of(trust_domain):
            raise AdminRequestError(f"spiffe_id: must be in the trust domain {trust_domain}")
        return spiffe_id

    def _binding(self, args: Mapping[str, Any], base: Entry | None) -> dict[str, Any]:
        """`parent` and `node_selectors`: which nodes may issue the entry."""
        node_selectors = base.node_selectors if base is not None else frozenset()
        parent = base.parent if base is not None else None
        if "node_selectors" in args:
            node_selectors = _selectors(args, "node_selectors", NODE_SELECTOR_SCHEMA)
        if "parent" in args:
            try:
                parent = SpiffeId.parse(_string(args, "parent")) if args["parent"] is not None else None
            except SpiffeError as err:
                raise AdminRequestError(f"parent: {err}") from None
        if base is None and parent is None and not node_selectors:
            if not self._default_node_selectors:
                raise AdminRequestError("an entry needs --parent or --node-selector: which nodes may issue it")
            node_selectors = self._default_node_selectors
        return {"parent": parent, "node_selectors": node_selectors}

    # -- nodes ---------------------------------------------------------------------------------
    async def node_list(self, args: Mapping[str, Any]) -> dict[str, Any]:
        _refuse_unknown(args, ())
        store = self._authority.store
        banned = {ban.node_id for ban in await store.bans()}
        nodes = [_describe_node(n, banned=n.node_id in banned) for n in await store.nodes()]
        pending = [{"node_id": p.node_id, "ek_hash": p.ek_hash, "first_seen": p.first_seen,
                    "last_seen": p.last_seen} for p in await store.pending()]
        return {"nodes": nodes, "pending": pending}

    async def node_show(self, args: Mapping[str, Any]) -> dict[str, Any]:
        _refuse_unknown(args, ("id",))
        node = await self._node(args)
        shown = _describe_node(node, banned=await self._authority.store.is_banned(node.node_id))
        index = self._authority.registry.index
        shown["entries"] = [e.id for e in index.authorized_for(
            SpiffeId.parse(node.node_id), frozenset(Selector.parse(s) for s in node.selectors), TrustTier(node.tier))]
        return shown

    async def node_approve(self, args: Mapping[str, Any]) -> dict[str, Any]:
        _refuse_unknown(args, ("id",))
        wanted = _string(args, "id")
        approved = await self._authority.store.approve(wanted, now=self._authority.clock.now())
        if approved is None:
            raise AdminRequestError(f"no node {wanted[:128]!r} is waiting for approval (`vouchd node list`)")
        log.info("node approved", extra={"node_id": approved.node_id, "ek_hash": approved.ek_hash})
        return {"node_id": approved.node_id, "ek_hash": approved.ek_hash}

    async def node_ban(self, args: Mapping[str, Any]) -> dict[str, Any]:
        _refuse_unknown(args, ("id", "reason"))
        node_id = _node_id(args)
        reason = _string(args, "reason", "banned by an operator")
        await self._authority.store.ban_node(node_id, reason, now=self._authority.clock.now())
        self._revoked(node_id, f"banned: {reason}")
        document = await self._authority.revocations.changed()
        return {"node_id": node_id, "banned": True, "revocation_version": document.document.version}

    async def node_unban(self, args: Mapping[str, Any]) -> dict[str, Any]:
        _refuse_unknown(args, ("id",))
        node_id = _node_id(args)
        version = await self._authority.store.unban_node(node_id, now=self._authority.clock.now())
        if version is None:
            raise AdminRequestError(f"node {node_id} is not banned")
        document = await self._authority.revocations.changed()
        log.info("node unbanned: it may attest again", extra={"node_id": node_id})
        return {"node_id": node_id, "banned": False, "revocation_version": document.document.version}

    async def _node(self, args: Mapping[str, Any]) -> NodeRecord:
        node_id = _node_id(args)
        node = await self._authority.store.node(node_id)
        if node is None:
            raise AdminRequestError(f"no node {node_id} (`vouchd node list` shows them)")
        return node

    def _revoked(self, node_id: str, reason: str) -> None:
        self._authority.decisions.emit(Decision(
            kind=DecisionKind.REVOKE, outcome=Outcome.OK, at=self._authority.clock.now(), source="authority",
            method="node", reason=reason, node=NodeEvidence(node_id)))

    # -- boot profiles -------------------------------------------------------------------------
    async def profile_list(self, args: Mapping[str, Any]) -> list[dict[str, Any]]:
        _refuse_unknown(args, ())
        nodes = await self._authority.store.nodes()
        return [{"name": p.name, "measurements": p.measurements, "learned_from": p.learned_from,
                 "created_at": p.created_at,
                 "nodes": sorted(n.node_id for n in nodes if f"tpm:pcr_profile:{p.name}" in n.selectors)}
                for p in await self._authority.store.profile_records()]

    async def profile_remove(self, args: Mapping[str, Any]) -> dict[str, Any]:
        _refuse_unknown(args, ("name",))
        name = _string(args, "name")
        removed = await self._authority.store.remove_profile(name, now=self._authority.clock.now())
        if removed is None:
            raise AdminRequestError(f"no boot profile {name[:64]!r} (`vouchd profile list` shows them)")
        _version, node_ids = removed
        for node_id in node_ids:
            self._revoked(node_id, f"boot profile {name} removed: the node must attest again")
        document = await self._authority.revocations.changed()
        return {"name": name, "nodes": node_ids, "revocation_version": document.document.version}

    # -- bundle --------------------------------------------------------------------------------
    async def bundle_show(self, args: Mapping[str, Any]) -> dict[str, Any]:
        _refuse_unknown(args, ())
        bundle = self._authority.bundle()
        return {
            "trust_domain": str(bundle.trust_domain),
            "pem": bundle.pem().decode("ascii"),
            "roots": [{"serial": serial_hex(c), "subject": c.subject.rfc4514_string(),
                       "not_before": c.not_valid_before_utc.isoformat(), "not_after": c.not_valid_after_utc.isoformat()}
                      for c in bundle.authorities],
        }


def _describe_node(node: NodeRecord, *, banned: bool) -> dict[str, Any]:
    return {"node_id": node.node_id, "ek_hash": node.ek_hash, "tier": node.tier,
            "state": "banned" if banned else node.state.value, "selectors": list(node.selectors),
            "pcr_selection": f"{node.pcr_bank}:{','.join(str(i) for i in node.pcr_indices)}",
            "attested_at": node.attested_at, "last_quote_at": node.last_quote_at}


def _refuse_unknown(args: Mapping[str, Any], known: Sequence[str]) -> None:
    unknown = sorted(str(k) for k in args if k not in known)
    if unknown:
        raise AdminRequestError(f"unknown argument {unknown[0][:40]!r}"
                                + (f"; expected: {', '.join(known)}" if known else "; this command takes none"))


def _string(args: Mapping[str, Any], key: str, default: str | None = None, *, allow_empty: bool = False) -> str:
    value = args.get(key)
    if value is None:
        if default is None:
            raise AdminRequestError(f"{key}: is required")
        return default
    if not isinstance(value, str) or (not value and not allow_empty):
        raise AdminRequestError(f"{key}: expected a non-empty string")
    return value


def _strings(args: Mapping[str, Any], key: str) -> list[str]:
    value = args.get(key) or []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise AdminRequestError(f"{key}: expected a list of strings")
    return value


def _labels(args: Mapping[str, Any], key: str) -> dict[str, str]:
    value = args.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise AdminRequestError(f"{key}: expected an object of strings")
    return value


def _selectors(args: Mapping[str, Any], key: str, schema: SelectorSchema) -> frozenset[Selector]:
    parsed = []
    for index, text in enumerate(_strings(args, key)):
        try:
            parsed.append(Selector.parse(text))
        except InvalidSelectorError as err:
            raise AdminRequestError(f"{key}[{index}]: {err}") from None
    violation = selector_violation(parsed, schema, field=key)
    if violation is not None:
        raise AdminRequestError(f"{violation.field}: {violation.message}")
    return frozenset(parsed)


def _tier(args: Mapping[str, Any]) -> TrustTier:
    text = _string(args, "min_tier", TrustTier.HARDWARE.value)
    try:
        return TrustTier(text)
    except ValueError:
        known = ", ".join(t.value for t in TrustTier)
        raise AdminRequestError(f"min_tier: expected one of {known}, got {text[:40]!r}") from None


def _operator_labels(args: Mapping[str, Any], base: Entry | None) -> tuple[tuple[str, str], ...]:
    labels = _labels(args, "labels")
    def reserved(key: str) -> bool:
        return key.startswith(_RESERVED_LABEL_PREFIX) and key not in OPERATOR_SWITCH_LABELS

    refused = sorted(filter(reserved, labels))
    if refused:
        raise AdminRequestError(f"labels: {refused[0][:64]!r}: keys under {_RESERVED_LABEL_PREFIX} are vouchd's own "
                                f"(an operator may set {', '.join(sorted(OPERATOR_SWITCH_LABELS))})")
    # vouchd's own labels (where a file entry came from) stay whatever the operator sets.
    kept = {k: v for k, v in (base.labels if base is not None else ()) if reserved(k)}
    return Entry.label_pairs({**labels, **kept})


def _ttl(args: Mapping[str, Any], key: str, default: timedelta | None, *,
         cap: tuple[str, timedelta]) -> timedelta | None:
    if key not in args:
        return default
    if args[key] is None:
        return None
    text = _string(args, key)
    try:
        ttl = parse_duration(text)
    except ValueError as err:
        raise AdminRequestError(f"{key}: {err}") from None
    cap_name, cap_value = cap
    if ttl > cap_value:
        raise AdminRequestError(f"{key}: {text} is over the authority's cap {cap_name} ({format_duration(cap_value)})")
    return ttl


def _node_id(args: Mapping[str, Any]) -> str:
    text = _string(args, "id")
    try:
        SpiffeId.parse(text)
    except SpiffeError as err:
        raise AdminRequestError(f"id: {err} (a node id is spiffe://<trust domain>/vouchd/node/...)") from None
    return text
