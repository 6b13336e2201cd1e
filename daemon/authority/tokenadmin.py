"""The admin commands for join tokens: `token.create` and `token.list` (authority/jointokens.py)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Any

from vouchd.authority.admin import AdminCommand, AdminRequestError
from vouchd.authority.jointokens import DEFAULT_TTL, new_join_token
from vouchd.authority.server import Authority
from vouchd.configfile import parse_duration

__all__ = ["TokenAdmin"]


class TokenAdmin:
    def __init__(self, authority: Authority) -> None:
        self._authority = authority

    def commands(self) -> dict[str, AdminCommand]:
        return {"token.create": self.token_create, "token.list": self.token_list}

    async def token_create(self, args: Mapping[str, Any]) -> dict[str, Any]:
        """A new single-use token; its text is in this answer and nowhere else, ever."""
        unknown = sorted(str(k) for k in args if k not in ("ttl", "node_labels"))
        if unknown:
            raise AdminRequestError(f"unknown argument {unknown[0][:40]!r}; expected: ttl, node_labels")
        ttl = _ttl(args.get("ttl"))
        labels = args.get("node_labels") or []
        if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
            raise AdminRequestError("node_labels: expected a list of KEY:VALUE strings")
        now = self._authority.clock.now()
        try:
            text, record = new_join_token(ttl=ttl, node_labels=labels, now=now)
        except ValueError as err:
            raise AdminRequestError(str(err)) from None
        await self._authority.store.add_join_token(record)
        return {"token": text, "id": record.token_id, "expires_at": record.expires_at,
                "node_labels": list(record.node_labels)}

    async def token_list(self, args: Mapping[str, Any]) -> list[dict[str, Any]]:
        if args:
            raise AdminRequestError("token.list takes no argument")
        return [{"id": t.token_id, "created_at": t.created_at, "expires_at": t.expires_at, "used_at": t.used_at,
                 "used_by": t.used_by, "node_labels": list(t.node_labels)}
                for t in await self._authority.store.join_tokens()]


def _ttl(value: object) -> timedelta:
    if value is None:
        return DEFAULT_TTL
    if not isinstance(value, str):
        raise AdminRequestError("ttl: expected a duration such as 15m or 24h")
    try:
        return parse_duration(value)
    except ValueError as err:
        raise AdminRequestError(f"ttl: {err}") from None
