"""Reading a YAML configuration file: strict YAML, and a typed reader for each mapping in it.

Shared by every configuration section (agent, authority, entries, audit, policy): unknown and
duplicate keys are errors naming the file and the key path, `${NAME}` / `${NAME:-default}` refer to
environment variables, relative paths are relative to the file, durations are written `250ms`,
`90s`, `5m`, `1h`, `30d`. Errors never quote a value: a configuration may hold secrets.
"""

from __future__ import annotations

import re
from collections.abc import Hashable, Iterator, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import yaml

from vouchd.errors import ConfigError

__all__ = ["ConfigSection", "format_duration", "load_yaml", "parse_duration"]

_DURATION = re.compile(r"^(\d+)(ms|s|m|h|d)$")
_DURATION_UNITS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}
_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def format_duration(value: timedelta) -> str:
    """A form parse_duration reads back, as people write them: 30d, 24h, 5m, 90s, 250ms."""
    milliseconds = round(value.total_seconds() * 1000)
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        # whole days from two days on (24h reads better than 1d); the largest whole unit otherwise
        if milliseconds % size == 0 and (unit != "d" or milliseconds >= 2 * size):
            return f"{milliseconds // size}{unit}"
    return f"{milliseconds}ms"


def parse_duration(text: str) -> timedelta:
    """``90s``, ``5m``, ``1h``, ``30d``, ``250ms`` -> timedelta; ValueError otherwise."""
    match = _DURATION.match(text.strip())
    if match is None:
        raise ValueError(f"{text!r} is not a duration like 250ms, 90s, 5m, 1h or 30d")
    return timedelta(seconds=int(match.group(1)) * _DURATION_UNITS[match.group(2)])


class ConfigSection:
    """A YAML mapping being read; keys other than `keys` are refused as soon as it is opened."""

    def __init__(self, source: Path, path: str, data: object, environ: Mapping[str, str],
                 keys: tuple[str, ...]) -> None:
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: {path or 'top level'}: expected a mapping, got {_kind(data)}")
        self.source, self.path, self.environ = source, path, environ
        self._data: dict[object, object] = data
        unknown = sorted(str(key) for key in data if key not in keys)
        if unknown:
            raise self.error(unknown[0], "unknown key" + (f" (also unknown: {', '.join(unknown[1:])})"
                                                          if len(unknown) > 1 else ""))

    def _key_path(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self._key_path(key)}: {message}")

    def has(self, key: str) -> bool:
        return key in self._data

    def _raw(self, key: str) -> object:
        return self._data.get(key)

    def _expand(self, key: str, text: str) -> str:
        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            value = self.environ.get(name)
            if value is None or value == "":
                if default is None:
                    state = "is empty" if value == "" else "is not set"
                    raise self.error(key, f"environment variable {name} {state} and has no default")
                return default
            return value

        return _ENV_REFERENCE.sub(substitute, text)

    def string(self, key: str, default: str | None = None) -> str:
        value = self._raw(key)
        if value is None:
            if default is None:
                raise self.error(key, "is required (a string)")
            return default
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise self.error(key, f"expected a string, got {_kind(value)}")
        text = self._expand(key, str(value))
        if not text:
            raise self.error(key, "must not be empty")
        return text

    def optional_string(self, key: str) -> str | None:
        return None if self._data.get(key) is None else self.string(key)

    def choice(self, key: str, allowed: tuple[str, ...], default: str) -> str:
        value = self.string(key, default)
        if value not in allowed:
            raise self.error(key, f"expected one of {', '.join(allowed)}, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self._raw(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self.error(key, f"expected true or false, got {_kind(value)}")
        return value

    def integer(self, key: str, default: int, *, minimum: int = 0, maximum: int | None = None) -> int:
        """A whole number from `minimum` to `maximum` (YAML's, not a string of digits)."""
        value = self._raw(key)
        if value is None:
            return default
        top = f" to {maximum}" if maximum is not None else " or more"
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum or \
                (maximum is not None and value > maximum):
            raise self.error(key, f"expected a whole number from {minimum}{top}, got {_kind(value)}"
                             + (f" {value}" if isinstance(value, int) and not isinstance(value, bool) else ""))
        return value

    def duration(self, key: str, default: str | None) -> timedelta:
        text = self.string(key, default)
        try:
            value = parse_duration(text)
        except ValueError as err:
            raise self.error(key, str(err)) from None
        if value <= timedelta(0):
            raise self.error(key, "must be longer than zero")
        return value

    def optional_duration(self, key: str) -> timedelta | None:
        return None if self._data.get(key) is None else self.duration(key, None)

    def path_value(self, key: str, default: str | None = None) -> Path:
        return self._resolve(self.string(key, default))

    def optional_path(self, key: str) -> Path | None:
        return None if self._data.get(key) is None else self.path_value(key)

    def _resolve(self, text: str) -> Path:
        path = Path(text).expanduser()
        return path if path.is_absolute() else (self.source.parent / path).resolve()

    def string_list(self, key: str) -> list[str]:
        value = self._raw(key)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(key, f"expected a list of strings, got {_kind(value)}")
        items = []
        for index, item in enumerate(value):
            if isinstance(item, bool) or not isinstance(item, str | int):
                raise self.error(f"{key}[{index}]", f"expected a string, got {_kind(item)}")
            items.append(self._expand(f"{key}[{index}]", str(item)))
        return items

    def string_mapping(self, key: str) -> dict[str, str]:
        """A mapping of names to strings (numbers are read as their text), such as an entry's labels."""
        value = self._raw(key)
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping of names to strings, got {_kind(value)}")
        result: dict[str, str] = {}
        for name, item in value.items():
            if not isinstance(name, str):
                raise self.error(key, f"expected names (strings) as keys, got {_kind(name)}")
            if isinstance(item, bool) or not isinstance(item, str | int):
                raise self.error(f"{key}.{name}", f"expected a string, got {_kind(item)}")
            result[name] = self._expand(f"{key}.{name}", str(item))
        return result

    def path_list(self, key: str) -> tuple[Path, ...]:
        return tuple(self._resolve(item) for item in self.string_list(key))

    def section(self, key: str, keys: tuple[str, ...]) -> ConfigSection:
        return ConfigSection(self.source, self._key_path(key), self._raw(key), self.environ, keys)

    def sections(self, key: str, keys: tuple[str, ...]) -> Iterator[ConfigSection]:
        value = self._raw(key)
        if value is None:
            return
        if not isinstance(value, list):
            raise self.error(key, f"expected a list, got {_kind(value)}")
        for index, item in enumerate(value):
            yield ConfigSection(self.source, f"{self._key_path(key)}[{index}]", item, self.environ, keys)

    def free_mapping(self, key: str) -> dict[str, dict[str, Any]] | None:
        """A mapping of name -> options mapping, whose contents a plugin validates itself; None when absent.

        `name: false` leaves the plugin out (switched off), `name: true` or `name:` takes its defaults.
        """
        value = self._raw(key)
        if value is None:
            return None
        if not isinstance(value, dict):
            raise self.error(key, f"expected a mapping of name to options, got {_kind(value)}")
        result: dict[str, dict[str, Any]] = {}
        for name, options in value.items():
            if options is False:
                continue
            if not isinstance(name, str) or not isinstance(options, dict | None | bool):
                raise self.error(f"{key}.{name}", "expected a mapping of options, or true or false")
            result[name] = dict(options) if isinstance(options, dict) else {}
        return result


def _kind(value: object) -> str:
    if value is None:
        return "nothing"
    return {dict: "a mapping", list: "a list", bool: "a boolean", str: "a string"}.get(
        type(value), type(value).__name__
    )


_MERGE_TAG = "tag:yaml.org,2002:merge"
_MAX_KEY_IN_ERROR = 80


class _DuplicateKeyError(Exception):
    def __init__(self, path: str, first_line: int, line: int) -> None:
        super().__init__(path, first_line, line)
        self.path = path
        self.first_line = first_line
        self.line = line


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader refusing a key given twice in one mapping, which YAML forbids and PyYAML lets the last win.

    The document's nodes are walked before anything is constructed, so the error names the key path
    (`agent.tpm.tcti`, `entries[2].hint`) and both lines. Keys merged in with `<<: *anchor` may be
    overridden: that is what merging is for.
    """

    def construct_document(self, node: yaml.Node) -> Any:
        self._refuse_duplicate_keys(node, "", set())
        return super().construct_document(node)

    def _refuse_duplicate_keys(self, node: yaml.Node, path: str, walked: set[int]) -> None:
        if id(node) in walked:  # an alias: walked where its anchor is (and never in a loop)
            return
        walked.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self._refuse_duplicate_keys(item, f"{path}[{index}]", walked)
            return
        if not isinstance(node, yaml.MappingNode):
            return
        first_lines: dict[Hashable, int] = {}
        for key_node, value_node in node.value:
            value_path = path  # what `<<` merges in belongs to this mapping
            if key_node.tag != _MERGE_TAG and isinstance(key_node, yaml.ScalarNode):
                key = self.construct_object(key_node)
                name = str(key)[:_MAX_KEY_IN_ERROR]
                value_path = f"{path}.{name}" if path else name
                line = key_node.start_mark.line + 1
                if key in first_lines:
                    raise _DuplicateKeyError(value_path, first_lines[key], line)
                first_lines[key] = line
            self._refuse_duplicate_keys(value_node, value_path, walked)


def load_yaml(text: str, source: Path) -> object:
    try:
        loader = _UniqueKeyLoader(text)
    except yaml.reader.ReaderError as err:  # a control character: refused before any parsing
        raise ConfigError(f"{source}: not valid YAML at character {err.position + 1}: {err.reason}") from None
    try:
        return loader.get_single_data()
    except _DuplicateKeyError as err:
        # The key, never its values: a configuration may hold secrets.
        lines = (f"twice at line {err.line}" if err.line == err.first_line
                 else f"at lines {err.first_line} and {err.line}")
        raise ConfigError(f"{source}: {err.path}: duplicate key, {lines}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None)  # the parser's words, never the offending text itself
        raise ConfigError(f"{source}: not valid YAML{where}" + (f": {problem}" if problem else "")) from None
    finally:
        loader.dispose()

