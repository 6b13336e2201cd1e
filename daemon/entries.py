"""The registration entry: one model for the configuration file, the store, the protocol and the agent.

An entry says which workloads (selectors, all of which must match) on which nodes (`parent`, or
`node_selectors` the node has) get which SPIFFE ID, and how. Every instance obeys the rules of
vouchd.entry_rules, so an invalid entry cannot exist, wherever it was read from. `revision` starts
at 1 and grows with every update: an agent holding an SVID of revision n knows it is void once a
revocation document names revision n+1.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import Any

from vouchd.entry_rules import entry_violation
from vouchd.errors import VouchdError
from vouchd.selectors import InvalidSelectorError, Selector
from vouchd.spiffe import SpiffeError, SpiffeId, TrustTier, check_dns_name

__all__ = ["ENTRY_ID_PATTERN", "Entry", "InvalidEntryError", "default_entry_id"]

# \Z, not $: "$" also matches before a final newline, and "web\n" is not an id.
ENTRY_ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
_LABEL_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,62}\Z")
_MAX_LABEL_VALUE = 256
_MAX_HINT = 256
_MAX_SELECTORS = 64


class InvalidEntryError(VouchdError):
    """A registration entry breaks a rule; the message names the field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name
        self.reason = message


def default_entry_id(spiffe_id: SpiffeId, selectors: Iterable[Selector]) -> str:
    """The id of an entry created without one: the same SPIFFE ID and selectors give the same id, so
    importing a configuration file twice, or creating the same entry twice, finds the first."""
    material = "\n".join([str(spiffe_id), *sorted(str(s) for s in selectors)])
    return "e-" + hashlib.sha256(material.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Entry:
    id: str
    spiffe_id: SpiffeId
    selectors: frozenset[Selector]
    parent: SpiffeId | None = None
    node_selectors: frozenset[Selector] = frozenset()
    min_tier: TrustTier = TrustTier.HARDWARE
    x509_ttl: timedelta | None = None
    jwt_ttl: timedelta | None = None
    dns_names: tuple[str, ...] = ()
    hint: str = ""
    labels: tuple[tuple[str, str], ...] = ()    # sorted (key, value) pairs: set by operators, matched by policy
    revision: int = 1
    created_at: int = 0                         # seconds since the epoch, set by the store's owner
    updated_at: int = 0

    def __post_init__(self) -> None:
        if not ENTRY_ID_PATTERN.match(self.id):
            raise InvalidEntryError("id", "expected 1 to 128 letters, digits, '.', '_' or '-', "
                                          "starting with a letter or digit")
        for name, selectors in (("selectors", self.selectors), ("node_selectors", self.node_selectors)):
            if len(selectors) > _MAX_SELECTORS:
                raise InvalidEntryError(name, f"at most {_MAX_SELECTORS} selectors")
        violation = entry_violation(self.spiffe_id, self.selectors, self.parent, self.node_selectors)
        if violation is not None:
            raise InvalidEntryError(violation.field, violation.message)
        for name, ttl in (("x509_ttl", self.x509_ttl), ("jwt_ttl", self.jwt_ttl)):
            # whole seconds: the wire form carries seconds, and a round trip must not change the entry
            if ttl is not None and (ttl < timedelta(seconds=1) or ttl % timedelta(seconds=1)):
                raise InvalidEntryError(name, "must be whole seconds, at least 1s")
        for index, dns_name in enumerate(self.dns_names):
            try:
                check_dns_name(dns_name)
            except SpiffeError as err:
                raise InvalidEntryError(f"dns_names[{index}]", str(err)) from None
        if len(self.hint) > _MAX_HINT:
            raise InvalidEntryError("hint", f"at most {_MAX_HINT} characters")
        if list(self.labels) != sorted(dict(self.labels).items()):
            raise InvalidEntryError("labels", "expected sorted pairs with unique keys (use Entry.label_pairs)")
        for key, value in self.labels:
            if not _LABEL_KEY.match(key):
                raise InvalidEntryError(f"labels.{key[:40]}", "label keys are 1 to 63 letters, digits, "
                                                              "'.', '_', '/' or '-', starting with a letter "
                                                              "or digit")
            if len(value) > _MAX_LABEL_VALUE:
                raise InvalidEntryError(f"labels.{key}", f"at most {_MAX_LABEL_VALUE} characters")
        if self.revision < 1:
            raise InvalidEntryError("revision", "must be 1 or more")

    @staticmethod
    def label_pairs(labels: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
        return tuple(sorted(labels.items()))

    @property
    def label_map(self) -> dict[str, str]:
        return dict(self.labels)

    def same_content(self, other: Entry) -> bool:
        """Equal in everything an operator sets: revision and timestamps aside."""
        return replace(other, revision=self.revision, created_at=self.created_at,
                       updated_at=self.updated_at) == self

    # -- wire form (protocol messages, the store, the admin socket) -----------------------------
    def to_wire(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "spiffe_id": str(self.spiffe_id),
            "selectors": sorted(str(s) for s in self.selectors),
            "parent": str(self.parent) if self.parent is not None else None,
            "node_selectors": sorted(str(s) for s in self.node_selectors),
            "min_tier": self.min_tier.value,
            "x509_ttl": _seconds(self.x509_ttl),
            "jwt_ttl": _seconds(self.jwt_ttl),
            "dns_names": list(self.dns_names),
            "hint": self.hint,
            "labels": dict(self.labels),
            "revision": self.revision,
            "created_at": self.created_at,
            "updated_at": self.updated_at,
        }

    @classmethod
    def from_wire(cls, data: object) -> Entry:
        """Strict: every field of to_wire() must be there with its type; InvalidEntryError names the field."""
        if not isinstance(data, dict):
            raise InvalidEntryError("entry", "expected an object")
        reader = _WireReader(data)
        entry = cls(
            id=reader.string("id"),
            spiffe_id=reader.spiffe_id("spiffe_id"),
            selectors=reader.selectors("selectors"),
            parent=reader.optional_spiffe_id("parent"),
            node_selectors=reader.selectors("node_selectors"),
            min_tier=reader.tier("min_tier"),
            x509_ttl=reader.optional_ttl("x509_ttl"),
            jwt_ttl=reader.optional_ttl("jwt_ttl"),
            dns_names=tuple(reader.strings("dns_names")),
            hint=reader.string("hint", allow_empty=True),
            labels=cls.label_pairs(reader.labels("labels")),
            revision=reader.integer("revision"),
            created_at=reader.integer("created_at"),
            updated_at=reader.integer("updated_at"),
        )
        reader.refuse_unknown()
        return entry


def _seconds(ttl: timedelta | None) -> int | None:
    return None if ttl is None else int(ttl.total_seconds())


class _WireReader:
    def __init__(self, data: dict[Any, Any]) -> None:
        self._data = data
        self._read: set[str] = set()

    def _get(self, key: str) -> object:
        if key not in self._data:
            raise InvalidEntryError(key, "is missing")
        self._read.add(key)
        return self._data[key]

    def refuse_unknown(self) -> None:
        unknown = sorted(str(k) for k in self._data if k not in self._read)
        if unknown:
            raise InvalidEntryError(unknown[0][:40], "unknown field")

    def string(self, key: str, *, allow_empty: bool = False) -> str:
        value = self._get(key)
        if not isinstance(value, str) or (not value and not allow_empty):
            raise InvalidEntryError(key, "expected a non-empty string" if not allow_empty else "expected a string")
        return value

    def integer(self, key: str) -> int:
        value = self._get(key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidEntryError(key, "expected an integer")
        return value

    def strings(self, key: str) -> list[str]:
        value = self._get(key)
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise InvalidEntryError(key, "expected a list of strings")
        return value

    def spiffe_id(self, key: str) -> SpiffeId:
        try:
            return SpiffeId.parse(self.string(key))
        except SpiffeError as err:
            raise InvalidEntryError(key, str(err)) from None

    def optional_spiffe_id(self, key: str) -> SpiffeId | None:
        return None if self._get(key) is None else self.spiffe_id(key)

    def selectors(self, key: str) -> frozenset[Selector]:
        selectors = set()
        for index, text in enumerate(self.strings(key)):
            try:
                selectors.add(Selector.parse(text))
            except InvalidSelectorError as err:
                raise InvalidEntryError(f"{key}[{index}]", str(err)) from None
        return frozenset(selectors)

    def tier(self, key: str) -> TrustTier:
        text = self.string(key)
        try:
            return TrustTier(text)
        except ValueError:
            known = ", ".join(t.value for t in TrustTier)
            raise InvalidEntryError(key, f"expected one of {known}, got {text[:40]!r}") from None

    def optional_ttl(self, key: str) -> timedelta | None:
        if self._get(key) is None:
            return None
        seconds = self.integer(key)
        try:
            return timedelta(seconds=seconds)
        except OverflowError:
            raise InvalidEntryError(key, "out of range") from None

    def labels(self, key: str) -> dict[str, str]:
        value = self._get(key)
        if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                  for k, v in value.items()):
            raise InvalidEntryError(key, "expected an object of strings")
        return value
