"""Bounds-checked readers and writers for TPM wire formats (big-endian) and TCG event logs
(little-endian). Every failure is a MalformedStructureError naming the structure and field."""

from __future__ import annotations

import enum
import struct
from typing import TypeVar

from vouchd.evidence.errors import MalformedStructureError

__all__ = ["Reader", "sized", "u8", "u16", "u32", "u64"]

_E = TypeVar("_E", bound=enum.IntEnum)


class Reader:
    """Consumes a byte string front to back; `structure` prefixes every error message."""

    def __init__(self, data: bytes, structure: str, *, little_endian: bool = False) -> None:
        self._data = bytes(data)
        self._offset = 0
        self._order = "<" if little_endian else ">"
        self.structure = structure

    @property
    def offset(self) -> int:
        return self._offset

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset

    def _unpack(self, code: str, size: int, field: str) -> int:
        if self.remaining < size:
            raise MalformedStructureError(f"{self.structure} {field} is truncated")
        (value,) = struct.unpack_from(self._order + code, self._data, self._offset)
        self._offset += size
        return int(value)

    def u8(self, field: str) -> int:
        return self._unpack("B", 1, field)

    def u16(self, field: str) -> int:
        return self._unpack("H", 2, field)

    def u32(self, field: str) -> int:
        return self._unpack("I", 4, field)

    def u64(self, field: str) -> int:
        return self._unpack("Q", 8, field)

    def take(self, size: int, field: str) -> bytes:
        if size < 0 or self.remaining < size:
            raise MalformedStructureError(f"{self.structure} {field} is truncated")
        value = self._data[self._offset : self._offset + size]
        self._offset += size
        return value

    def sized(self, field: str, *, max_size: int | None = None) -> bytes:
        """A TPM2B: u16 size then that many bytes."""
        size = self.u16(f"{field} size")
        if max_size is not None and size > max_size:
            raise MalformedStructureError(
                f"{self.structure} {field} has {size} bytes, at most {max_size} allowed")
        return self.take(size, field)

    def enum16(self, kind: type[_E], field: str) -> _E:
        value = self.u16(field)
        try:
            return kind(value)
        except ValueError:
            raise MalformedStructureError(
                f"{self.structure} {field} {value:#06x} is not a known {kind.__name__}") from None

    def finish(self) -> None:
        if self.remaining:
            raise MalformedStructureError(f"{self.structure} has {self.remaining} trailing bytes")


def u8(value: int) -> bytes:
    return struct.pack(">B", value)


def u16(value: int) -> bytes:
    return struct.pack(">H", value)


def u32(value: int) -> bytes:
    return struct.pack(">I", value)


def u64(value: int) -> bytes:
    return struct.pack(">Q", value)


def sized(data: bytes) -> bytes:
    """Prefix data with its u16 size (a TPM2B)."""
    if len(data) > 0xFFFF:
        raise MalformedStructureError(f"TPM2B of {len(data)} bytes does not fit a u16 size")
    return u16(len(data)) + data
