"""`vouchd explain --pid N | --selectors ...`: why a process gets an identity or none, from the agent.

Asks the agent's admin socket (`workload.explain`), which attests the process with its own attestors
and matches it against the entries it holds; prints the answer for a person, or with --json as is.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from vouchd.admincli import call_admin
from vouchd.errors import VouchdError

__all__ = ["add_explain_command"]


def _cmd_explain(args: argparse.Namespace) -> int:
    arguments: dict[str, Any] = {"near_misses": args.near_misses}
    if args.audience:
        arguments["audiences"] = args.audience
    if args.pid is not None:
        arguments["pid"] = args.pid
    else:
        arguments["selectors"] = args.selectors
    answer = call_admin(args, "workload.explain", arguments)
    if not isinstance(answer, dict) or "outcome" not in answer:
        raise VouchdError("the agent sent a malformed explain reply")
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        _print(answer)
    return 0


def _print(answer: dict[str, Any]) -> None:
    if "pid" in answer:
        print(f"process     pid {answer['pid']}, uid {answer['uid']}, gid {answer['gid']}")
        print("attestors")
        for run in answer["attestors"]:
            lines = [f"FAILED: {run['error']}"] if run["error"] else run["selectors"] or ["(nothing)"]
            lines += [f"evidence {item}" for item in run["evidence"]]
            print(f"  {run['name']:12} {run['ms']:8.2f} ms  {lines[0]}")
            for line in lines[1:]:
                print(f"  {'':12} {'':11}  {line}")
    else:
        print("selectors   (given)")
        for selector in answer["selectors"]:
            print(f"  {selector}")
    shown = answer["entries"]
    print(f"entries     {len(shown)} shown of {answer['entries_total']}")
    for entry in shown:
        if entry["matched"]:
            state = "refused: " + entry["refusal"] if "refusal" in entry else "matches"
            if "policy" in entry and entry["policy"]["allowed"]:
                state += f"; allowed by policy {', '.join(entry['policy']['policy_ids'])}"
        elif entry.get("held_by_ancestor"):
            state = "held by an ancestor: never inherited"
        else:
            state = "lacks " + ", ".join(entry["missing"])
        print(f"  {'+' if entry['matched'] and 'refusal' not in entry else '-'} {entry['id']:24} "
              f"{entry['spiffe_id']}  {state}")
    print(f"outcome     {answer['outcome'].upper()}: {answer['reason']}")


def add_explain_command(commands: argparse._SubParsersAction,  # type: ignore[type-arg]
                        default_admin_socket: str) -> None:
    explain = commands.add_parser("explain", help="why a process gets an identity, or none")
    target = explain.add_mutually_exclusive_group(required=True)
    target.add_argument("--pid", type=int, help="a running process: attest it as the Workload API would")
    target.add_argument("--selectors", nargs="+", metavar="TYPE:KEY:VALUE",
                        help="a process that is not running: match these selectors")
    explain.add_argument("--near-misses", type=int, default=5, metavar="N",
                         help="entries that did not match to show, nearest first (default 5)")
    explain.add_argument("--audience", action="append", metavar="AUDIENCE",
                         help="the policy's verdict on a JWT-SVID for this audience (repeat for several) "
                              "rather than on an X.509-SVID")
    explain.add_argument("--json", action="store_true", help="machine-readable output")
    explain.add_argument("--admin-socket", help=f"default: $VOUCHD_ADMIN_SOCKET or {default_admin_socket}")
    explain.set_defaults(handler=_cmd_explain)
