"""Loading policy files: read them, parse and validate each on its own against the schema, name
every policy, and compile them into one set; or refuse, naming the file, line and column.

*Which policies.* The shipped default.cedar, then the operator's files in the order given (a
directory stands for its `*.cedar` files, by name). With `include_defaults=False` the operator's
files alone. Cedar lets a forbid override any permit but never the other way round, so added files
can only narrow the defaults; widening them means replacing them (copy, edit, switch the defaults
off).

*Checks.* Each file is parsed and validated on its own, so an error names its file and the line
and column of the token at fault (source.py finds it: Cedar gives no offsets). Policy ids are the
`@id` annotations, else `<file>:<n>` (the n-th policy of the file); an id used twice is an error,
and so are templates (nothing links them). A set without a single permit would deny everything
and is refused as a mistake.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from vouchd.errors import ConfigError
from vouchd.policy import cedar
from vouchd.policy.schema import SCHEMA_TEXT
from vouchd.policy.source import PolicySource

__all__ = [
    "AUDIENCE_RISKS",
    "DEFAULT_POLICY_NAME",
    "UNKNOWN_RISK",
    "LoadedPolicy",
    "PolicyError",
    "PolicySet",
    "load_policy_set",
]

DEFAULT_POLICY_NAME = "vouchd/policy/default.cedar"
AUDIENCE_RISKS = ("low", "high")           # what the configuration may say
UNKNOWN_RISK = "unknown"                   # the risk of an audience the configuration does not list
# ids appear in logs, the audit log and Cedar's messages (quoted in backticks): keep them plain
_POLICY_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}\Z")


class PolicyError(ConfigError):
    """A policy file (or the policy configuration) vouchd cannot use; names the file, line and column."""

    def __init__(self, reason: str, *, file: str | None = None, line: int | None = None,
                 column: int | None = None) -> None:
        where = file or ""
        if file is not None and line is not None:
            where += f":{line}" + (f":{column}" if column is not None else "")
        super().__init__(f"{where}: {reason}" if where else reason)
        self.file = file
        self.line = line
        self.column = column
        self.reason = reason


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    """One policy of the loaded set, as `vouchd explain` and the audit log name it."""

    policy_id: str
    effect: str                 # "permit" or "forbid"
    reason: str                 # its @reason, else "policy <id>"
    file: str
    line: int
    column: int


@dataclass(frozen=True, slots=True)
class PolicySet:
    """Everything one load produced; the engine replaces it whole, so no evaluation sees half of two."""

    compiled: cedar.CompiledPolicies
    policies: Mapping[str, LoadedPolicy]    # by id, in load order
    positions: Mapping[str, int]            # id -> place in load order: decisions name policies in it
    audiences: Mapping[str, str]            # audience -> "low" | "high"
    version: str


def load_policy_set(paths: Sequence[Path], include_defaults: bool, audiences: Mapping[str, str]) -> PolicySet:
    """The policies of the defaults (if included) and of `paths`; PolicyError at the first problem."""
    risks = _audience_risks(audiences)
    sources = _read_sources(paths, include_defaults)
    bodies: dict[str, dict[str, Any]] = {}
    policies: dict[str, LoadedPolicy] = {}
    for source in sources:
        for policy, body in _read_policies(source):
            if policy.policy_id in policies:
                first = policies[policy.policy_id]
                raise PolicyError(f"policy id {policy.policy_id!r} is already used at {first.file}:{first.line}",
                                  file=policy.file, line=policy.line, column=policy.column)
            policies[policy.policy_id] = policy
            bodies[policy.policy_id] = body
    if not any(p.effect == "permit" for p in policies.values()):
        raise PolicyError("no policy permits anything: every request would be denied "
                          f"(policy files: {', '.join(s.name for s in sources) or 'none'})")
    digest = hashlib.sha256(SCHEMA_TEXT.encode())
    for source in sources:
        digest.update(b"\0file\0" + source.name.encode() + b"\0" + source.text.encode())
    for name, risk in sorted(risks.items()):
        digest.update(b"\0audience\0" + name.encode() + b"\0" + risk.encode())
    return PolicySet(compiled=cedar.compile_policies(bodies), policies=policies,
                     positions={policy_id: n for n, policy_id in enumerate(policies)}, audiences=risks,
                     version=digest.hexdigest())


def _audience_risks(audiences: Mapping[str, str]) -> dict[str, str]:
    for name, risk in audiences.items():
        if not name:
            raise PolicyError("policy audiences: an audience name is empty")
        if risk not in AUDIENCE_RISKS:
            raise PolicyError(f"policy audiences: {name[:100]!r} has risk {str(risk)[:40]!r}, "
                              f"expected one of {', '.join(AUDIENCE_RISKS)}")
    return dict(audiences)


def _read_sources(paths: Sequence[Path], include_defaults: bool) -> list[PolicySource]:
    sources = []
    if include_defaults:
        text = resources.files("vouchd.policy").joinpath("default.cedar").read_text(encoding="utf-8")
        sources.append(PolicySource(DEFAULT_POLICY_NAME, text))
    for path in paths:
        sources.extend(_read_file(file) for file in _policy_files(path))
    return sources


def _policy_files(path: Path) -> list[Path]:
    """`path`, or when it is a directory its `*.cedar` files by name (a drop-in directory)."""
    if not path.is_dir():
        return [path]
    try:
        return sorted(p for p in path.iterdir() if p.suffix == ".cedar" and p.is_file())
    except OSError as err:
        raise PolicyError(f"cannot list the directory: {err.strerror or err}", file=str(path)) from None


def _read_file(file: Path) -> PolicySource:
    try:
        return PolicySource(str(file), file.read_text(encoding="utf-8"))
    except OSError as err:
        raise PolicyError(f"cannot read the policy file: {err.strerror or err}", file=str(file)) from None
    except UnicodeDecodeError as err:
        raise PolicyError(f"not UTF-8 text: {err.reason} at byte {err.start}", file=str(file)) from None


def _read_policies(source: PolicySource) -> list[tuple[LoadedPolicy, dict[str, Any]]]:
    """The policies of one file with their Cedar JSON; PolicyError at the first problem."""
    located = source.locate_syntax_error(cedar.parse_error)
    if located is not None:
        offset, message = located
        raise _error_at(source, offset, f"syntax error: {message}")
    whole = cedar.parse_error(source.text)
    if whole is not None:                        # every policy parses alone, yet the file does not
        raise PolicyError(f"syntax error: {whole}", file=source.name)
    problems = cedar.validation_problems(source.text)
    if problems:
        problem = problems[0]
        if problem.index is None:
            raise PolicyError(f"does not match the schema: {problem.message}", file=source.name)
        offset = source.locate_in_statement(problem.index, problem.message)
        raise _error_at(source, offset, f"does not match the schema: {problem.message}")
    bodies, templates = cedar.policies_as_json(source.text)
    if len(bodies) != len(source.statements):
        raise PolicyError(f"cedar reads {len(bodies)} policies where vouchd counts {len(source.statements)}: "
                          "check for an unterminated string or a stray ';'", file=source.name)
    loaded = []
    for index in sorted(bodies):
        offset = source.statements[index].start
        if index in templates:
            raise _error_at(source, offset, "templates (?principal, ?resource) are not supported: "
                                            "name the principal or resource, or test it in a when clause")
        body = bodies[index]
        annotations = body.get("annotations") or {}
        declared = annotations.get("id")
        if declared is not None and not _POLICY_ID.match(declared):
            raise _error_at(source, offset, f"@id {declared[:140]!r} is not a policy id: 1 to 128 letters, "
                                            "digits, '.', '_', ':', '/', '@' or '-', starting with a letter or digit")
        policy_id = declared or f"{source.name}:{index + 1}"
        line, column = source.position(offset)
        policy = LoadedPolicy(policy_id=policy_id, effect=str(body.get("effect")),
                              reason=annotations.get("reason") or f"policy {policy_id}",
                              file=source.name, line=line, column=column)
        loaded.append((policy, body))
    return loaded


def _error_at(source: PolicySource, offset: int, reason: str) -> PolicyError:
    line, column = source.position(offset)
    return PolicyError(reason, file=source.name, line=line, column=column)
