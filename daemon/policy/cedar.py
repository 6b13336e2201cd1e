"""The only module that calls cedarpy: its calls, typed, and its answers turned into plain values.

cedarpy's own annotations are partial (bare `dict`, `Any` results), and its error messages are the
only structure it gives for problems, so the parsing of those lives here too. Everything Cedar is
handed is JSON; everything it answers is read back into the types below.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from typing import Any

import cedarpy

from vouchd.policy.schema import SCHEMA_TEXT

__all__ = [
    "Answer",
    "CompiledPolicies",
    "ValidationProblem",
    "authorize",
    "compile_policies",
    "parse_error",
    "policies_as_json",
    "validation_problems",
]

_POSITIONAL_ID = re.compile(r"^policy([0-9]+)$")
_EVALUATION_ERROR = re.compile(r"policy `([^`]*)`")


@dataclass(frozen=True, slots=True)
class ValidationProblem:
    """One schema-validation error: the index of the policy in its text (None if Cedar names none)."""

    index: int | None
    message: str


@dataclass(frozen=True, slots=True)
class Answer:
    """What Cedar decided: `reasons` are the ids of the satisfied policies that decided it, `errors`
    (policy id or None, message) the policies that failed to evaluate, or a request Cedar refused."""

    allowed: bool
    reasons: tuple[str, ...]
    errors: tuple[tuple[str | None, str], ...]


class CompiledPolicies:
    """A parsed policy set, ready for authorize(); opaque outside this module."""

    def __init__(self, handle: cedarpy.PolicySet, size: int) -> None:
        self.handle = handle
        self.size = size


@cache
def _schema() -> cedarpy.Schema:
    # parsed once, on first use rather than at import (the schema is a constant)
    return cedarpy.Schema.from_str(SCHEMA_TEXT)


def parse_error(text: str) -> str | None:
    """None when `text` parses as Cedar policies, else Cedar's message."""
    try:
        cedarpy.PolicySet.from_str(text)
    except ValueError as err:
        return str(err) or "cannot parse the policies"
    return None


def validation_problems(text: str) -> list[ValidationProblem]:
    """Every way in which `text` (which parses) breaks vouchd's schema, in Cedar's order."""
    result = cedarpy.validate_policies(text, _schema())
    problems = []
    for error in result.errors:
        match = _POSITIONAL_ID.match(str(error.policy_id))
        problems.append(ValidationProblem(int(match.group(1)) if match else None, str(error.error)))
    return problems


def policies_as_json(text: str) -> tuple[dict[int, dict[str, Any]], set[int]]:
    """The policies of `text` (which parses) in Cedar's JSON form by their index in the text, and the
    indexes of those that are templates."""
    document = json.loads(cedarpy.policies_to_json_str(text))
    policies: dict[int, dict[str, Any]] = {}
    templates: set[int] = set()
    for section in ("staticPolicies", "templates"):
        for name, body in document.get(section, {}).items():
            match = _POSITIONAL_ID.match(name)
            if match is None:
                raise ValueError(f"cedar named a policy {name!r}, expected policy<n>")
            index = int(match.group(1))
            policies[index] = body
            if section == "templates":
                templates.add(index)
    return policies, templates


def compile_policies(policies: Mapping[str, dict[str, Any]]) -> CompiledPolicies:
    """One policy set of policies in Cedar's JSON form, each under the id decisions will name."""
    document = {"staticPolicies": dict(policies), "templates": {}, "templateLinks": []}
    return CompiledPolicies(cedarpy.PolicySet.from_json_str(json.dumps(document)), len(policies))


def authorize(
    policies: CompiledPolicies,
    *,
    principal: tuple[str, str],
    action: str,
    resource: tuple[str, str],
    context: Mapping[str, Any],
    entities: Sequence[Mapping[str, Any]],
) -> Answer:
    """Cedar's decision on one request, checked against the schema (a request that does not conform
    is an error, never a decision)."""
    request = {
        "principal": {"type": principal[0], "id": principal[1]},
        "action": {"type": "Action", "id": action},
        "resource": {"type": resource[0], "id": resource[1]},
        "context": dict(context),
    }
    result = cedarpy.is_authorized(request, policies.handle, json.dumps(list(entities)), schema=_schema())
    errors = []
    for message in result.diagnostics.errors:
        match = _EVALUATION_ERROR.search(str(message))
        errors.append((match.group(1) if match else None, str(message)))
    return Answer(
        allowed=bool(result.allowed),
        reasons=tuple(str(r) for r in result.diagnostics.reasons),
        errors=tuple(errors),
    )
