"""Join tokens: how a host without a TPM gets into a fleet (the static-secret tier, design §4).

An operator makes a token (`vouchd token create`); the host's agent presents it once, with its node
key, and from then on proves itself with that key alone. The token is single use and short-lived; it
lets one key in and is not the node's identity (that is the key's hash, as an EK's is a hardware
node's). Only the sha256 of its secret is stored. Its node labels become the node's `node:label:`
selectors, so entries can be bound to the hosts that joined with a kind of token.

The text handed to the operator is `<token id>.<secret>`: the id (16 hex digits) names the token in
logs and listings; the secret (43 base64url characters, 256 bits) never appears anywhere but there.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Sequence
from datetime import timedelta

from vouchd.authority.errors import RefusalError
from vouchd.authority.store import JoinTokenRecord
from vouchd.entry_rules import NODE_SELECTOR_SCHEMA
from vouchd.protocol.refusals import Refusal
from vouchd.selectors import Selector

__all__ = ["DEFAULT_TTL", "MAX_TTL", "new_join_token", "parse_join_token", "secret_digest"]

DEFAULT_TTL = timedelta(hours=1)
MAX_TTL = timedelta(days=7)
_TOKEN = re.compile(r"([0-9a-f]{16})\.([A-Za-z0-9_-]{43})")


def secret_digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def new_join_token(*, ttl: timedelta, node_labels: Sequence[str], now: float) -> tuple[str, JoinTokenRecord]:
    """The token text to hand out (shown once) and the record to store; ValueError naming what is
    wrong with the TTL or a label."""
    if not timedelta(seconds=1) <= ttl <= MAX_TTL:
        raise ValueError(f"ttl must be between 1 s and {MAX_TTL.days} days")
    for label in node_labels:
        problem = NODE_SELECTOR_SCHEMA.problem(Selector("node", "label", label))
        if problem is not None:
            raise ValueError(f"node label {label[:64]!r}: {problem}")
    token_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    record = JoinTokenRecord(token_id=token_id, secret_sha256=secret_digest(secret),
                             node_labels=tuple(sorted(set(node_labels))), created_at=now,
                             expires_at=now + ttl.total_seconds())
    return f"{token_id}.{secret}", record


def parse_join_token(text: str) -> tuple[str, str]:
    """(token id, secret) of a presented token; RefusalError (never echoing it) when it is not one."""
    match = _TOKEN.fullmatch(text)
    if match is None:
        raise RefusalError(Refusal.BAD_REQUEST, "join token is not <16 hex digits>.<43 base64url characters>")
    return match.group(1), match.group(2)
