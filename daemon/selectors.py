"""Selectors: `type:key:value` facts about a node or a workload.

The value is everything after the second colon (values may contain colons). Nothing is
normalised beyond that split: entries store selectors verbatim and match them exactly.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from vouchd.errors import VouchdError

__all__ = ["InvalidSelectorError", "Selector", "SelectorSet", "selector_set"]

_MAX_SELECTOR_LENGTH = 4096


class InvalidSelectorError(VouchdError):
    """A selector string is not of the form type:key:value."""


@dataclass(frozen=True, order=True, slots=True)
class Selector:
    type: str
    key: str
    value: str

    def __post_init__(self) -> None:
        for part, text in (("type", self.type), ("key", self.key)):
            if not text or ":" in text:
                raise InvalidSelectorError(f"selector {part} must be non-empty and contain no colon")
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
