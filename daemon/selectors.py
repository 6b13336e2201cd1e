"""Selectors: `type:key:value` facts about a node or a workload, and which of them can exist.

The value is everything after the second colon (values may contain colons). Nothing is
normalised beyond that split: entries store selectors verbatim and match them exactly.

Matching is exact, so a selector no producer emits (`unix:pth:/x`) or a value it never takes
(`unix:uid:abc`) is not an error at match time: the entry simply never matches. A SelectorSchema
says which selectors can occur, so that such entries are refused when they are written instead.
"""

from __future__ import annotations

import os.path
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from vouchd.errors import VouchdError

__all__ = [
    "InvalidSelectorError",
    "Selector",
    "SelectorKind",
    "SelectorSchema",
    "SelectorSet",
    "ValueCheck",
    "absolute_path",
    "any_value",
    "decimal_id",
    "matching",
    "non_empty",
    "selector_set",
]

_MAX_SELECTOR_LENGTH = 4096
_MAX_SHOWN = 100  # of a selector quoted in a message


class InvalidSelectorError(VouchdError):
    """A selector string is not of the form type:key:value."""


def _check_part(part: str, text: str) -> None:
    if not text or ":" in text:
        raise InvalidSelectorError(f"selector {part} must be non-empty and contain no colon")


@dataclass(frozen=True, order=True, slots=True)
class Selector:
    type: str
    key: str
    value: str

    def __post_init__(self) -> None:
        _check_part("type", self.type)
        _check_part("key", self.key)
        if len(self.type) + len(self.key) + len(self.value) + 2 > _MAX_SELECTOR_LENGTH:
            raise InvalidSelectorError(f"selector longer than {_MAX_SELECTOR_LENGTH} characters")

    @classmethod
    def parse(cls, text: str) -> Selector:
        parts = text.split(":", 2)
        if len(parts) != 3:
            raise InvalidSelectorError(f"selector {text[:80]!r} is not of the form type:key:value")
        return cls(parts[0], parts[1], parts[2])

    def __str__(self) -> str:
        return f"{self.type}:{self.key}:{self.value}"


SelectorSet = frozenset[Selector]


def selector_set(items: Iterable[Selector | str]) -> SelectorSet:
    """A frozen set of selectors from Selector objects or their string forms."""
    return frozenset(s if isinstance(s, Selector) else Selector.parse(s) for s in items)


# -- which selectors can exist -------------------------------------------------------------------

ValueCheck = Callable[[str], str | None]
"""What is wrong with a selector value (e.g. "a uid is a decimal number, e.g. unix:uid:1000"), or None."""


def any_value(value: str) -> None:
    """The check of a key whose values are not known in advance."""
    return None


def matching(pattern: str, problem: str) -> ValueCheck:
    """Values that match `pattern` as a whole (no trailing newline slips through)."""
    compiled = re.compile(pattern)

    def check(value: str) -> str | None:
        return None if compiled.fullmatch(value) else problem

    return check


def decimal_id(problem: str) -> ValueCheck:
    """A uid or gid as the kernel reports it: decimal, no sign, leading zero or space, below 2**32-1
    (which is (uid_t)-1, "no id")."""
    digits = re.compile(r"0|[1-9][0-9]{0,9}")

    def check(value: str) -> str | None:
        return None if digits.fullmatch(value) and int(value) < 2**32 - 1 else problem

    return check


def non_empty(problem: str) -> ValueCheck:
    """Any value but the empty one."""

    def check(value: str) -> str | None:
        return None if value else problem

    return check


def absolute_path(problem: str) -> ValueCheck:
    """A path as the kernel reports one: absolute and normalised (no `//`, `.` or `..` components,
    no trailing slash)."""

    def check(value: str) -> str | None:
        normal = value.startswith("/") and not value.startswith("//") and os.path.normpath(value) == value
        return None if normal and value != "/" else problem

    return check


@dataclass(frozen=True, slots=True)
class SelectorKind:
    """One (type, key) pair a producer can emit, and what its values look like."""

    type: str
    key: str
    check: ValueCheck = any_value

    def __post_init__(self) -> None:
        _check_part("type", self.type)
        _check_part("key", self.key)


class SelectorSchema:
    """Which selectors a set of producers (workload attestors, node attestation) can emit.

    Each producer either declares its SelectorKinds or declares nothing (None). A producer that
    declares nothing, such as a third-party plugin written before declarations existed, is taken to
    emit selectors of its own name's type, as SPIRE's plugins do, with any key and any value. Every
    other type accepts only the declared keys, and each key only the values its check accepts.

    `described_as` completes "x:y is not ..." in messages, e.g. "a selector any enabled attestor
    produces".
    """

    def __init__(self, producers: Mapping[str, Iterable[SelectorKind] | None], *, described_as: str) -> None:
        self._described_as = described_as
        self._open_types = frozenset(name for name, kinds in producers.items() if kinds is None)
        self._kinds: dict[tuple[str, str], list[ValueCheck]] = {}
        # type -> producer -> keys, for "unix produces: gid, group, ..."
        self._keys_by_type: dict[str, dict[str, set[str]]] = {}
        for name, kinds in sorted(producers.items()):
            for kind in kinds or ():
                self._kinds.setdefault((kind.type, kind.key), []).append(kind.check)
                self._keys_by_type.setdefault(kind.type, {}).setdefault(name, set()).add(kind.key)

    @property
    def types(self) -> frozenset[str]:
        """Every selector type some producer emits."""
        return self._open_types | frozenset(self._keys_by_type)

    def problem(self, selector: Selector) -> str | None:
        """Why no producer can emit `selector`, in words that name it; None when one can."""
        if selector.type in self._open_types:
            return None
        checks = self._kinds.get((selector.type, selector.key))
        if checks is not None:
            problems = [check(selector.value) for check in checks]
            if all(problem is not None for problem in problems):
                return f"{_shown(str(selector))}: {problems[0]}"
            return None
        name = _shown(f"{selector.type}:{selector.key}")
        producers = self._keys_by_type.get(selector.type)
        if producers is not None:
            listed = "; ".join(f"{producer} produces: {', '.join(sorted(keys))}"
                               for producer, keys in sorted(producers.items()))
        else:
            listed = f"known types: {', '.join(sorted(self.types)) or 'none'}"
        return f"{name} is not {self._described_as} ({listed})"


def _shown(text: str) -> str:
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."
