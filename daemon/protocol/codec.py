"""Canonical JSON for protocol messages.

Messages are frozen dataclasses registered under a `kind`; the wire form is
``{"kind": ..., "v": ..., <fields>}`` serialised with sorted keys and no whitespace, so the same
message always has the same bytes (requests are bound to TPM quotes by the sha256 of those bytes).
bytes travel as standard base64; a type with `to_wire()` and `from_wire()` (vouchd.entries.Entry)
travels in the form it defines. Decoding is strict: unknown or missing fields, wrong types and
oversized input are refused with a MessageError naming the field.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import types
import typing
from collections.abc import Callable
from typing import Any, TypeVar, cast, get_args, get_origin, get_type_hints

from vouchd.errors import VouchdError
from vouchd.protocol.errors import MessageError

__all__ = ["MAX_MESSAGE_BYTES", "canonical_json", "decode", "decode_as", "encode", "message"]

# An attestation request carries the whole TCG event log (up to 16 MiB, base64 in JSON).
MAX_MESSAGE_BYTES = 24 * 1024 * 1024
PROTOCOL_VERSION = 1

T = TypeVar("T")
_REGISTRY: dict[str, type[Any]] = {}
_KINDS: dict[type[Any], str] = {}


def message(kind: str) -> Callable[[type[T]], type[T]]:
    """Register a frozen dataclass as the protocol message `kind`."""

    def register(cls: type[T]) -> type[T]:
        if kind in _REGISTRY:
            raise RuntimeError(f"message kind {kind!r} registered twice")
        if not dataclasses.is_dataclass(cls):
            raise TypeError(f"{cls.__name__} must be a dataclass")
        _REGISTRY[kind] = cls
        _KINDS[cls] = kind
        return cls

    return register


def canonical_json(value: object) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def encode(msg: object) -> bytes:
    kind = _KINDS.get(type(msg))
    if kind is None:
        raise TypeError(f"{type(msg).__name__} is not a registered message")
    body = _to_json(msg)
    assert isinstance(body, dict)
    body["kind"], body["v"] = kind, PROTOCOL_VERSION
    data = canonical_json(body)
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"{kind} message is {len(data)} bytes, over the {MAX_MESSAGE_BYTES} limit")
    return data


def decode(data: bytes) -> object:
    """Decode any registered message."""
    if len(data) > MAX_MESSAGE_BYTES:
        raise MessageError(f"message is {len(data)} bytes, over the {MAX_MESSAGE_BYTES} limit")
    try:
        body = json.loads(data)
    except ValueError:  # not UTF-8, not JSON, or an integer beyond Python's digit limit
        raise MessageError("message is not JSON") from None
    if not isinstance(body, dict):
        raise MessageError("message is not a JSON object")
    kind, version = body.pop("kind", None), body.pop("v", None)
    if not isinstance(kind, str) or kind not in _REGISTRY:
        raise MessageError(f"unknown message kind {str(kind)[:40]!r}")
    if version != PROTOCOL_VERSION:
        raise MessageError(f"{kind}: unsupported protocol version {str(version)[:10]!r}")
    return _from_json(_REGISTRY[kind], body, kind)


def decode_as(cls: type[T], data: bytes) -> T:
    msg = decode(data)
    if not isinstance(msg, cls):
        raise MessageError(f"expected a {_KINDS[cls]} message, got {_KINDS[type(msg)]}")
    return msg


def _to_json(value: object) -> object:
    to_wire = getattr(value, "to_wire", None)
    if to_wire is not None and not isinstance(value, type):
        return to_wire()
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _to_json(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, list | tuple):
        return [_to_json(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _to_json(v) for k, v in value.items()}
    if value is None or isinstance(value, str | int | bool):
        return value
    raise TypeError(f"cannot encode {type(value).__name__}")


def _from_json(tp: Any, value: object, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = get_args(tp)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _from_json(inner, value, where)
    from_wire = getattr(tp, "from_wire", None)
    if from_wire is not None:
        # A model that owns its wire form (vouchd.entries.Entry) checks it itself.
        try:
            return from_wire(value)
        except VouchdError as err:
            raise MessageError(f"{where}: {err}") from None
    if tp is bytes:
        if not isinstance(value, str):
            raise MessageError(f"{where}: expected base64 text")
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error:
            raise MessageError(f"{where}: invalid base64") from None
    if tp is bool:
        if not isinstance(value, bool):
            raise MessageError(f"{where}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise MessageError(f"{where}: expected an integer")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise MessageError(f"{where}: expected a string")
        return value
    if origin is tuple:
        (item_type, _ellipsis) = get_args(tp)
        if not isinstance(value, list):
            raise MessageError(f"{where}: expected a list")
        return tuple(_from_json(item_type, item, f"{where}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        key_type, value_type = get_args(tp)
        if key_type is not str or not isinstance(value, dict):
            raise MessageError(f"{where}: expected an object")
        return {k: _from_json(value_type, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise MessageError(f"{where}: expected an object")
        hints = get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp)}
        unknown = set(value) - set(fields)
        if unknown:
            raise MessageError(f"{where}: unknown field {sorted(unknown)[0]!r}")
        kwargs = {}
        for name, field in fields.items():
            if name not in value:
                if field.default is not dataclasses.MISSING or field.default_factory is not dataclasses.MISSING:
                    continue
                raise MessageError(f"{where}: missing field {name!r}")
            kwargs[name] = _from_json(hints[name], value[name], f"{where}.{name}")
        return cast(Any, tp)(**kwargs)
    raise TypeError(f"{where}: unsupported field type {tp!r}")
