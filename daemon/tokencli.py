"""`vouchd token create|list`: join tokens, through the admin socket of the daemon that runs the
authority (a standalone agent, or `vouchd server`)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from vouchd.admincli import call_admin

__all__ = ["add_token_commands"]

_CREATE_HELP = """\
Prints a single-use token for a host without a TPM. Put it in a root-only file on that host and
name the file as agent.join_token_file: the agent joins with it once, at the static-secret tier,
and proves itself with its own node key from then on. The token is shown only here.
"""


def _cmd_token_create(args: argparse.Namespace) -> int:
    arguments: dict[str, Any] = {"node_labels": list(args.node_label or [])}
    if args.ttl:
        arguments["ttl"] = args.ttl
    created = call_admin(args, "token.create", arguments)
    if args.json:
        print(json.dumps(created, indent=2, sort_keys=True))
        return 0
    print(created["token"])
    expires = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(created["expires_at"]))
    labels = ", ".join(created["node_labels"]) or "none"
    print(f"token {created['id']}: single use, until {expires}; node labels: {labels}")
    return 0


def _cmd_token_list(args: argparse.Namespace) -> int:
    tokens = call_admin(args, "token.list")
    if args.json:
        print(json.dumps(tokens, indent=2, sort_keys=True))
        return 0
    if not tokens:
        print("no join tokens")
    now = time.time()
    for token in tokens:
        if token["used_by"]:
            state = f"used by {token['used_by']}"
        elif token["expires_at"] <= now:
            state = "expired"
        else:
            state = f"unused, expires in {round(token['expires_at'] - now)} s"
        print(f"{token['id']}  {state}  labels: {', '.join(token['node_labels']) or '-'}")
    return 0


def add_token_commands(commands: argparse._SubParsersAction, default_admin_socket: str) -> None:  # type: ignore[type-arg]
    token = commands.add_parser("token", help="join tokens for hosts without a TPM (static-secret tier)")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="SUBCOMMAND")
    create = token_commands.add_parser("create", help="make a single-use join token",
                                       description=_CREATE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    create.add_argument("--ttl", metavar="DURATION", help="how long it may be used, e.g. 15m (default 1h, at most 7d)")
    create.add_argument("--node-label", action="append", metavar="KEY:VALUE",
                        help="a label the joining node gets (its node:label:KEY:VALUE selector); repeat it")
    listing = token_commands.add_parser("list", help="list join tokens (never their secrets)")
    for parser, handler in ((create, _cmd_token_create), (listing, _cmd_token_list)):
        parser.add_argument("--admin-socket", help=f"default: $VOUCHD_ADMIN_SOCKET or {default_admin_socket}")
        parser.add_argument("--json", action="store_true", help="machine-readable output")
        parser.set_defaults(handler=handler)
