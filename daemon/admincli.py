"""`vouchd entry|node|profile|bundle ...`: thin clients of the admin socket's authority commands.

Each command sends one request to the admin socket of the running daemon (the standalone agent's,
or in fleet mode the server's) and prints the answer, as text or, with --json, as JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import pwd
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vouchd.errors import VouchdError

__all__ = ["DEFAULT_ADMIN_SOCKET", "add_admin_commands", "admin_socket", "call_admin", "caller_not_allowed",
           "request_admin"]

DEFAULT_ADMIN_SOCKET = "/run/vouchd/admin.sock"


def admin_socket(args: argparse.Namespace) -> Path:
    return Path(getattr(args, "admin_socket", None) or os.environ.get("VOUCHD_ADMIN_SOCKET")
                or DEFAULT_ADMIN_SOCKET)


def call_admin(args: argparse.Namespace, command: str, arguments: dict[str, Any] | None = None) -> Any:
    """Send one command to the daemon's admin socket; VouchdError with the daemon's words if it refuses."""
    from vouchd.agent.admin import AdminClientError, AdminSocketError

    path = admin_socket(args)
    try:
        # Longer than the standalone bus waits for the local agent (10 s): a slow agent must not make a
        # stored change look like a failed one.
        return request_admin(path, command, arguments, timeout=30.0)
    except (OSError, ValueError, AdminSocketError) as err:
        not_allowed = caller_not_allowed(path, err)
        if not_allowed is not None:
            raise not_allowed from None
        if isinstance(err, AdminSocketError):
            raise VouchdError(str(err)) from None
        raise VouchdError(f"cannot reach the admin socket {path}: {err} "
                          "(is the daemon running? set VOUCHD_ADMIN_SOCKET or pass --admin-socket)") from None
    except AdminClientError as err:
        raise VouchdError(str(err)) from None


def request_admin(path: Path, command: str, arguments: dict[str, Any] | None = None, *, timeout: float) -> Any:
    """admin_request, run to its end, with SIGPIPE ignored meanwhile: a request written to a connection the
    daemon closed unanswered must fail as EPIPE, not end the command (main() lets SIGPIPE end it)."""
    from vouchd.agent.admin import admin_request

    with _sigpipe_ignored():
        return asyncio.run(admin_request(path, command, arguments, timeout=timeout))


@contextlib.contextmanager
def _sigpipe_ignored() -> Iterator[None]:
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set a handler; a command run elsewhere (tests) keeps Python's: ignored
        return
    previous = signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    try:
        yield
    finally:
        if previous is not None:
            signal.signal(signal.SIGPIPE, previous)


def caller_not_allowed(path: Path, err: BaseException) -> VouchdError | None:
    """The error to show when the admin socket turned this command away for its uid, else None.

    Only root and the daemon's user may ask: the socket is 0600 and owned by the daemon's user, so
    anyone else's connect() fails with EACCES, and should the mode be widened the daemon closes the
    connection unanswered (an empty reply, or EPIPE / ECONNRESET while the request is sent).
    """
    from vouchd.agent.admin import AdminSocketError

    uid = os.geteuid()
    if uid == 0 or isinstance(err, ConnectionRefusedError):  # refused: nobody serves there
        return None
    if not isinstance(err, PermissionError | ConnectionError | AdminSocketError):
        return None
    try:
        owner: int | None = path.stat().st_uid
    except PermissionError:
        owner = None  # a folder on the way is closed to this uid: turned away as well
    except OSError:
        return None
    if owner == uid:
        return None  # the daemon's own user: something else went wrong
    agent_user = _user_name(owner) if owner is not None else None
    named = f" ({agent_user})" if agent_user else ""
    also = f" or as {agent_user}" if agent_user and owner != 0 else ""
    me = _user_name(uid)
    return VouchdError(f"only root or the agent's user{named} may ask the agent through its admin socket {path}; "
                       f"this command runs as uid {uid}{f' ({me})' if me else ''}: run it with sudo{also}")


def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


def _print_json(value: object) -> None:
    print(json.dumps(value, indent=2, sort_keys=True))


def _entry_line(entry: dict[str, Any]) -> str:
    binding = f"parent {entry['parent']}" if entry.get("parent") else ", ".join(entry.get("node_selectors", []))
    return f"{entry['id']:24} {entry['spiffe_id']}  [{', '.join(entry['selectors'])}]  on {binding}"


def _print_entry(entry: dict[str, Any]) -> None:
    rows = [
        ("id", entry["id"]), ("spiffe id", entry["spiffe_id"]), ("revision", entry["revision"]),
        ("selectors", ", ".join(entry["selectors"])),
        ("parent", entry.get("parent") or "-"), ("node selectors", ", ".join(entry.get("node_selectors", [])) or "-"),
        ("min tier", entry["min_tier"]), ("x509 ttl", entry.get("x509_ttl_text") or "authority default"),
        ("jwt ttl", entry.get("jwt_ttl_text") or "authority default"),
        ("dns names", ", ".join(entry.get("dns_names", [])) or "-"), ("hint", entry.get("hint") or "-"),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(entry.get("labels", {}).items())) or "-"),
        ("created", _when(entry.get("created_at"))), ("updated", _when(entry.get("updated_at"))),
    ]
    for name, value in rows:
        print(f"{name:15} {value}")


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def _labels(items: list[str] | None) -> dict[str, str] | None:
    if items is None:
        return None
    labels = {}
    for item in items:
        key, equals, value = item.partition("=")
        if not equals or not key:
            raise VouchdError(f"--label {item[:80]!r}: expected KEY=VALUE")
        labels[key] = value
    return labels


def _entry_arguments(args: argparse.Namespace) -> dict[str, Any]:
    """Only what was given: for `update`, a field left out keeps its value."""
    given: dict[str, Any] = {
        "spiffe_id": args.spiffe_id, "selectors": args.selector, "node_selectors": args.node_selector,
        "parent": args.parent, "x509_ttl": args.x509_ttl, "jwt_ttl": args.jwt_ttl, "min_tier": args.min_tier,
        "dns_names": args.dns_name, "hint": args.hint, "labels": _labels(args.label),
    }
    return {key: value for key, value in given.items() if value is not None}


def _cmd_entry_create(args: argparse.Namespace) -> int:
    arguments = _entry_arguments(args)
    if args.id:
        arguments["id"] = args.id
    entry = call_admin(args, "entry.create", arguments)
    if args.json:
        _print_json(entry)
    else:
        print(f"created entry {entry['id']} (revision {entry['revision']}): {entry['spiffe_id']}")
    return 0


def _cmd_entry_update(args: argparse.Namespace) -> int:
    entry = call_admin(args, "entry.update", {"id": args.id, **_entry_arguments(args)})
    if args.json:
        _print_json(entry)
    else:
        print(f"updated entry {entry['id']} to revision {entry['revision']}; SVIDs of earlier revisions are revoked")
    return 0


def _cmd_entry_list(args: argparse.Namespace) -> int:
    entries = call_admin(args, "entry.list")
    if args.json:
        _print_json(entries)
        return 0
    print(f"{len(entries)} {'entry' if len(entries) == 1 else 'entries'}")
    for entry in entries:
        print(f"  {_entry_line(entry)}")
    return 0


def _cmd_entry_show(args: argparse.Namespace) -> int:
    entry = call_admin(args, "entry.show", {"id": args.id})
    if args.json:
        _print_json(entry)
    else:
        _print_entry(entry)
    return 0


def _cmd_entry_delete(args: argparse.Namespace) -> int:
    entry = call_admin(args, "entry.delete", {"id": args.id})
    if args.json:
        _print_json(entry)
    else:
        print(f"deleted entry {entry['id']} ({entry['spiffe_id']}); its SVIDs are revoked")
    return 0


def _cmd_node_list(args: argparse.Namespace) -> int:
    listing = call_admin(args, "node.list")
    if args.json:
        _print_json(listing)
        return 0
    print(f"nodes          {len(listing['nodes'])}")
    for node in listing["nodes"]:
        print(f"  {node['node_id']}  {node['tier']} / {node['state']}  last quote {_when(node['last_quote_at'])}")
    if listing["pending"]:
        print(f"pending        {len(listing['pending'])} (vouchd node approve NODE_ID)")
        for pending in listing["pending"]:
            print(f"  {pending['node_id']}  first seen {_when(pending['first_seen'])}")
    return 0


def _cmd_node_show(args: argparse.Namespace) -> int:
    node = call_admin(args, "node.show", {"id": args.id})
    if args.json:
        _print_json(node)
        return 0
    for key in ("node_id", "ek_hash", "tier", "state", "pcr_selection"):
        print(f"{key.replace('_', ' '):15} {node[key]}")
    print(f"{'attested':15} {_when(node['attested_at'])}")
    print(f"{'last quote':15} {_when(node['last_quote_at'])}")
    for selector in node["selectors"]:
        print(f"{'selector':15} {selector}")
    print(f"{'entries':15} {', '.join(node['entries']) or '-'}")
    return 0


def _cmd_node_change(args: argparse.Namespace) -> int:
    arguments = {"id": args.id}
    if getattr(args, "reason", None):
        arguments["reason"] = args.reason
    result = call_admin(args, f"node.{args.node_command}", arguments)
    if args.json:
        _print_json(result)
    elif args.node_command == "ban":
        print(f"banned {result['node_id']}: its SVIDs are revoked and it can no longer attest")
    elif args.node_command == "unban":
        print(f"unbanned {result['node_id']}: it may attest again")
    else:
        print(f"approved {result['node_id']}: it may attest now")
    return 0


def _cmd_profile_list(args: argparse.Namespace) -> int:
    profiles = call_admin(args, "profile.list")
    if args.json:
        _print_json(profiles)
        return 0
    print(f"{len(profiles)} boot {'profile' if len(profiles) == 1 else 'profiles'}")
    for profile in profiles:
        print(f"  {profile['name']:32} {profile['measurements']} measurements, learned from "
              f"{profile['learned_from']} on {_when(profile['created_at'])}; nodes: {len(profile['nodes'])}")
    return 0


def _cmd_profile_remove(args: argparse.Namespace) -> int:
    result = call_admin(args, "profile.remove", {"name": args.name})
    if args.json:
        _print_json(result)
    else:
        print(f"removed boot profile {result['name']}; nodes booted that way must attest again: "
              f"{', '.join(result['nodes']) or 'none'}")
    return 0


def _cmd_bundle_show(args: argparse.Namespace) -> int:
    bundle = call_admin(args, "bundle.show")
    if args.json:
        _print_json(bundle)
    else:
        print(bundle["pem"], end="")
    return 0


def _common(parser: argparse.ArgumentParser, *, json_flag: bool = True) -> None:
    parser.add_argument("--admin-socket", help=f"default: $VOUCHD_ADMIN_SOCKET or {DEFAULT_ADMIN_SOCKET}")
    if json_flag:
        parser.add_argument("--json", action="store_true", help="machine-readable output")


def _entry_fields(parser: argparse.ArgumentParser, *, creating: bool) -> None:
    parser.add_argument("--spiffe-id", required=creating, help="the identity, e.g. spiffe://example.org/web")
    parser.add_argument("--selector", action="append", required=creating, metavar="TYPE:KEY:VALUE",
                        help="a workload selector; repeat it: a caller must match them all"
                             + ("" if creating else " (replaces the entry's selectors)"))
    parser.add_argument("--node-selector", action="append", metavar="TYPE:KEY:VALUE",
                        help="which nodes may issue it (tpm:ek_hash:... or node:label:...); standalone default: "
                             "this host")
    parser.add_argument("--parent", help="or: the one node (its SPIFFE ID) that may issue it")
    parser.add_argument("--x509-ttl", metavar="DURATION", help="e.g. 15m, 1h (capped by the authority)")
    parser.add_argument("--jwt-ttl", metavar="DURATION", help="e.g. 5m")
    parser.add_argument("--min-tier", choices=("hardware", "static-secret"), help="default: hardware")
    parser.add_argument("--dns-name", action="append", help="a DNS SAN for the X.509-SVID; repeat it")
    parser.add_argument("--hint", help="the Workload API hint")
    parser.add_argument("--label", action="append", metavar="KEY=VALUE", help="an operator label; repeat it")


def add_admin_commands(commands: argparse._SubParsersAction,  # type: ignore[type-arg]
                       node_commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `entry`, `profile` and `bundle`, and the run-time `node` subcommands."""
    entry = commands.add_parser("entry", help="registration entries, at run time")
    entry_commands = entry.add_subparsers(dest="entry_command", required=True, metavar="SUBCOMMAND")
    create = entry_commands.add_parser("create", help="create an entry; matching callers get it at once")
    create.add_argument("--id", help="default: derived from the SPIFFE ID and the selectors")
    _entry_fields(create, creating=True)
    _common(create)
    create.set_defaults(handler=_cmd_entry_create)
    listing = entry_commands.add_parser("list", help="list every entry")
    _common(listing)
    listing.set_defaults(handler=_cmd_entry_list)
    for name, handler, text in (("show", _cmd_entry_show, "show one entry"),
                                ("delete", _cmd_entry_delete, "delete an entry and revoke its SVIDs")):
        sub = entry_commands.add_parser(name, help=text)
        sub.add_argument("id", help="the entry id (`vouchd entry list`)")
        _common(sub)
        sub.set_defaults(handler=handler)
    update = entry_commands.add_parser("update", help="change an entry; SVIDs of its older revision are revoked")
    update.add_argument("id", help="the entry id")
    _entry_fields(update, creating=False)
    _common(update)
    update.set_defaults(handler=_cmd_entry_update)

    listing = node_commands.add_parser("list", help="attested nodes, and nodes waiting for approval")
    _common(listing)
    listing.set_defaults(handler=_cmd_node_list)
    show = node_commands.add_parser("show", help="one node")
    show.add_argument("id", help="the node's SPIFFE ID")
    _common(show)
    show.set_defaults(handler=_cmd_node_show)
    for name, text in (("approve", "let a waiting node (approve enrolment) attest"),
                       ("ban", "revoke a node's SVIDs and refuse it until unbanned"),
                       ("unban", "let a banned node attest again")):
        sub = node_commands.add_parser(name, help=text)
        sub.add_argument("id", help="the node's SPIFFE ID")
        if name == "ban":
            sub.add_argument("--reason", help="recorded with the ban")
        _common(sub)
        sub.set_defaults(handler=_cmd_node_change)

    profile = commands.add_parser("profile", help="accepted boot profiles (event-log measurements)")
    profile_commands = profile.add_subparsers(dest="profile_command", required=True, metavar="SUBCOMMAND")
    listing = profile_commands.add_parser("list", help="list boot profiles and the nodes booted that way")
    _common(listing)
    listing.set_defaults(handler=_cmd_profile_list)
    remove = profile_commands.add_parser("remove", help="stop accepting a boot profile; its nodes attest again")
    remove.add_argument("name")
    _common(remove)
    remove.set_defaults(handler=_cmd_profile_remove)

    bundle = commands.add_parser("bundle", help="the trust domain's bundle")
    bundle_commands = bundle.add_subparsers(dest="bundle_command", required=True, metavar="SUBCOMMAND")
    show = bundle_commands.add_parser("show", help="print the X.509 bundle (PEM)")
    _common(show)
    show.set_defaults(handler=_cmd_bundle_show)
