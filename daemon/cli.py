"""The `vouchd` command. Thin: parses arguments, loads configuration, calls into the packages."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any

from vouchd import __version__
from vouchd.admincli import add_admin_commands
from vouchd.apicli import add_api_commands
from vouchd.auditcli import add_audit_commands
from vouchd.errors import VouchdError
from vouchd.explaincli import add_explain_command
from vouchd.tokencli import add_token_commands
from vouchd.tpmcli import add_tpm_commands

__all__ = ["main"]

DEFAULT_ADMIN_SOCKET = "/run/vouchd/admin.sock"


def _run_until_signalled(coroutine: Coroutine[Any, Any, None]) -> None:
    """Run the daemon; SIGINT/SIGTERM cancel it so every part shuts down in order."""

    async def runner() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        try:
            await coroutine
        except asyncio.CancelledError:
            pass
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    asyncio.run(runner())


def _cmd_agent(args: argparse.Namespace) -> int:
    from vouchd.agent.agent import Agent, AuthorityConnector, policy_engine_from
    from vouchd.attestors.catalog import selector_schema
    from vouchd.clock import SYSTEM_CLOCK
    from vouchd.config import load_config
    from vouchd.decisions import DecisionBus, LogDecisions
    from vouchd.logs import configure_logging

    config = load_config(Path(args.config))
    if config.agent is None:
        raise VouchdError(f"{config.source}: agent: section is required to run the agent")
    configure_logging(config.log_level, args.log_format)
    decisions = DecisionBus()  # one per daemon: the agent's and the embedded authority's decisions
    decisions.subscribe(LogDecisions())
    policy = policy_engine_from(config, clock=SYSTEM_CLOCK)
    connector: AuthorityConnector
    if args.standalone:
        from vouchd.standalone import standalone_connector

        # One policy set for both: the embedded authority judges again what the agent judged, and
        # one SIGHUP reloads it for both.
        connector = standalone_connector(config, workload_schema=selector_schema(config.agent.workload_attestors),
                                         decisions=decisions, policy=policy)
    else:
        from vouchd.fleet import fleet_connector

        connector = fleet_connector(config)
    agent = Agent(config, connector, decisions=decisions, policy_engine=policy)
    _run_until_signalled(agent.run())
    return 0


def _cmd_server(args: argparse.Namespace) -> int:
    from vouchd.config import load_config
    from vouchd.decisions import DecisionBus, LogDecisions
    from vouchd.logs import configure_logging
    from vouchd.server import AuthorityServer

    config = load_config(Path(args.config))
    configure_logging(config.log_level, args.log_format)
    decisions = DecisionBus()
    decisions.subscribe(LogDecisions())
    _run_until_signalled(AuthorityServer(config, decisions=decisions).run())
    return 0


def _cmd_config_check(args: argparse.Namespace) -> int:
    from vouchd.config import load_config

    config = load_config(Path(args.file))
    from vouchd.agent.agent import policy_engine_from, workload_attestors_from
    from vouchd.clock import SYSTEM_CLOCK

    workload_attestors_from(config)  # plugin names and options, checked as the agent will
    policy_engine_from(config, clock=SYSTEM_CLOCK)  # policy files: syntax and schema, naming file and line
    parts = [name for name in ("agent", "authority") if getattr(config, name) is not None]
    count = len(config.entries)
    print(f"{config.source}: ok (trust domain {config.trust_domain}; sections: {', '.join(parts) or 'none'}; "
          f"{count} {'entry' if count == 1 else 'entries'})")
    return 0


def _admin_socket(args: argparse.Namespace) -> Path:
    return Path(args.admin_socket or os.environ.get("VOUCHD_ADMIN_SOCKET") or DEFAULT_ADMIN_SOCKET)


def _fetch_status(args: argparse.Namespace) -> dict[str, Any]:
    from vouchd.admincli import caller_not_allowed, request_admin
    from vouchd.agent.admin import AdminClientError, AdminSocketError

    path = _admin_socket(args)
    try:
        status = request_admin(path, "status", timeout=10.0)
    except (OSError, AdminSocketError) as err:
        not_allowed = caller_not_allowed(path, err)
        if not_allowed is not None:
            raise not_allowed from None
        raise VouchdError(f"cannot reach the agent's admin socket {path}: {err} "
                          "(is the agent running? set VOUCHD_ADMIN_SOCKET or pass --admin-socket)") from None
    except AdminClientError as err:
        raise VouchdError(f"agent refused the status request: {err}") from None
    if not isinstance(status, dict):
        raise VouchdError("agent sent a malformed status reply")
    return status


def _print_status(status: dict[str, Any]) -> None:
    node = status.get("node") or {}
    print(f"trust domain   {status['trust_domain']}  ({status['mode']})")
    print(f"node           {node.get('id', '-')}")
    print(f"  tier/state   {node.get('tier', '-')} / {node.get('state', '-')}")
    print(f"  node svid    serial {node.get('svid_serial', '-')}, "
          f"expires in {node.get('svid_expires_in_seconds', '-')} s")
    if node.get("last_quote_age_seconds") is None and node.get("tier") not in (None, "hardware"):
        print(f"  last proof   {node.get('last_exchange_age_seconds', '-')} s ago (node key; no TPM quote)")
    else:
        print(f"  last quote   {node.get('last_quote_age_seconds', '-')} s ago")
    print(f"  authority    {node.get('authority_link', '-')}")
    tpm = status.get("tpm") or {}
    if tpm.get("state") == "unreachable":
        print(f"  tpm          {tpm['reason']} (for {tpm['unreachable_for_seconds']} s; the agent exits after "
              f"{tpm['exit_after_seconds']:g} s)")
    else:
        print(f"  tpm          {tpm.get('state', '-')} ({tpm.get('tcti') or tpm.get('reason') or '-'})")
    for selector in node.get("selectors", []):
        print(f"  selector     {selector}")
    print(f"workload api   {status['workload_api_socket']}  ({'ready' if status['ready'] else 'starting'})")
    audit = status.get("audit")
    if audit:
        state = f"FAILING: {audit['failure']}" if audit.get("failure") else f"{audit.get('records', 0)} records"
        print(f"audit log      {audit.get('path')}  ({state})")
    print(f"entries        {len(status['entries'])}")
    for entry in status["entries"]:
        print(f"  {entry['id']:24} {entry['spiffe_id']}  [{', '.join(entry['selectors'])}]")
    print(f"svids          {len(status['svids'])}")
    for svid in status["svids"]:
        print(f"  {svid['spiffe_id']}  serial {svid['serial']}  expires in {svid['expires_in_seconds']} s")
    workloads = status.get("workloads", {})
    streams = ", ".join(f"{method} {count}" for method, count in sorted(workloads.get("open_streams", {}).items()))
    requests = ", ".join(f"{outcome} {count}" for outcome, count in sorted(workloads.get("requests", {}).items()))
    print(f"workloads      open streams: {streams or 'none'}; requests: {requests or 'none'}")
    for denial in workloads.get("recent_denials", [])[:5]:
        when = time.strftime("%H:%M:%S", time.localtime(denial["at"]))
        print(f"  {when} {denial['outcome']:7} {denial['method']} pid {denial['pid']} uid {denial['uid']}: "
              f"{denial['reason']}")


def _cmd_status(args: argparse.Namespace) -> int:
    status = _fetch_status(args)
    if args.json:
        print(json.dumps(status, indent=2, sort_keys=True))
    else:
        _print_status(status)
    return 0


def _cmd_healthcheck(args: argparse.Namespace) -> int:
    """Healthy only when the node SVID is valid and the last quote is fresh, not merely 'it answers'."""
    status = _fetch_status(args)
    node = status.get("node")
    problems = []
    if not status.get("ready"):
        problems.append("workload api is not serving yet")
    tpm = status.get("tpm") or {}
    if tpm.get("state") not in (None, "ok", "none"):
        problems.append(str(tpm.get("reason") or f"tpm is {tpm.get('state')}"))
    audit = status.get("audit") or {}
    if audit.get("failure"):
        problems.append(f"the audit log cannot be written ({audit['failure']}): nothing is handed out")
    if not node:
        problems.append("node is not attested")
    else:
        if node.get("svid_expires_in_seconds", 0) <= 0:
            problems.append("node svid has expired")
        # A static-secret node never quotes: the freshness of its last signed exchange stands in.
        age = node.get("last_quote_age_seconds")
        if age is None and node.get("tier") not in (None, "hardware"):
            age = node.get("last_exchange_age_seconds")
        if (float("inf") if age is None else age) > args.max_quote_age:
            problems.append(f"last quote (or node key proof) is older than {args.max_quote_age} s")
    if problems:
        print("unhealthy: " + "; ".join(problems), file=sys.stderr)
        return 1
    print("healthy")
    return 0


def _profile_name(text: str) -> str:
    # The name becomes a node selector (tpm:pcr_profile:<name>) and appears in logs: keep it plain.
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", text):
        raise argparse.ArgumentTypeError(
            "use 1 to 64 letters, digits, '.', '_' or '-', starting with a letter or digit")
    return text


def _unset_variables_hint(config_path: Path) -> str:
    """`; the file refers to X, Y, unset here: ...` when the file names unset variables, else ''."""
    try:
        text = config_path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""
    unset = sorted({name for name in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text) if not os.environ.get(name)})
    if not unset:
        return ""
    return f"; the file refers to {', '.join(unset)}, unset here: set them as the agent has them"


def _cmd_node_learn(args: argparse.Namespace) -> int:
    """Accept this host's current event log as a boot profile (after a firmware or kernel update).

    As Keylime's reference-state tool does: golden PCR values break on every update, so the
    operator records the measurements of a boot they trust, from the log the agent would send.
    """
    from vouchd.authority.build import AUTHORITY_DATABASE, open_store
    from vouchd.authority.verifier import quoted_measurements, selection_for
    from vouchd.config import load_config
    from vouchd.evidence import EvidenceError, parse_event_log

    config = load_config(Path(args.config))
    if config.agent is None or config.authority is None:
        raise VouchdError(f"{config.source}: `node learn` works on a standalone configuration "
                          "(agent and authority sections)")
    # Only the database of an authority that has run: a path resolved without the agent's environment
    # (its ${VOUCHD_*} variables) names another folder, and an empty database there would be silent.
    authority = config.authority
    database = authority.state_dir / AUTHORITY_DATABASE
    if authority.store.kind == "sqlite" and not database.is_file():
        raise VouchdError(f"{database}: no authority database (authority.state_dir of {config.source}); "
                          "`node learn` adds to the database of the authority the agent runs and never creates "
                          f"one{_unset_variables_hint(config.source)}")
    log_path = config.agent.event_log_path
    if log_path is None:
        raise VouchdError(f"{config.source}: agent.event_log is not set: there is no event log to learn")
    try:
        event_log = parse_event_log(log_path.read_bytes())
    except OSError as err:
        raise VouchdError(f"{log_path}: cannot read the event log (agent.event_log of {config.source}): "
                          f"{err.strerror}{_unset_variables_hint(config.source)}") from None
    except EvidenceError as err:
        raise VouchdError(f"{log_path}: {err}") from None
    selection = selection_for(config.authority.pcr_bank, config.authority.pcr_indices)
    try:
        measurements = quoted_measurements(event_log, selection)
    except EvidenceError as err:
        raise VouchdError(f"{log_path}: {err}") from None
    async def save() -> None:
        store = await open_store(authority)  # the authority's own: SQLite, or its PostgreSQL
        try:
            await store.save_profile(args.name, list(measurements), learned_from=f"vouchd node learn ({log_path})",
                                     now=time.time())
        finally:
            await store.close()

    asyncio.run(save())
    print(f"profile {args.name!r}: {len(measurements)} measurements of {selection.tool_string()} "
          f"from {log_path}; nodes whose logs stay within it attest again")
    return 0


def _cmd_simulate_boot(args: argparse.Namespace) -> int:
    from vouchd.devtools import simulate_measured_boot

    count = asyncio.run(simulate_measured_boot(args.tcti, Path(args.event_log)))
    print(f"extended {count} simulated boot events into PCRs 0-7; event log at {args.event_log}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vouchd", description="hardware-rooted workload identity agent")
    parser.add_argument("--version", action="version", version=f"vouchd {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = commands.add_parser("agent", help="run the node agent")
    agent.add_argument("--config", required=True, help="configuration file (YAML)")
    agent.add_argument("--standalone", action="store_true",
                       help="embed the authority (single host, no broker); without it, reach the authority "
                            "through the broker of agent.fleet")
    agent.add_argument("--log-format", choices=("json", "text"), default="json",
                       help="json lines for journald (default) or text for a terminal")
    agent.set_defaults(handler=_cmd_agent)

    server = commands.add_parser("server", help="run the authority of a fleet (agents reach it through MQTT)")
    server.add_argument("--config", required=True, help="configuration file (YAML) with an authority section")
    server.add_argument("--log-format", choices=("json", "text"), default="json",
                        help="json lines for journald (default) or text for a terminal")
    server.set_defaults(handler=_cmd_server)

    config = commands.add_parser("config", help="configuration tools")
    config_commands = config.add_subparsers(dest="config_command", required=True, metavar="SUBCOMMAND")
    check = config_commands.add_parser("check", help="validate a configuration file")
    check.add_argument("file", help="the configuration file to validate, as the agent would read it")
    check.set_defaults(handler=_cmd_config_check)

    for name, handler, text in (("status", _cmd_status, "show what the agent knows and serves"),
                                ("healthcheck", _cmd_healthcheck, "exit 0 only if the node identity is fresh")):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("--admin-socket", help=f"default: $VOUCHD_ADMIN_SOCKET or {DEFAULT_ADMIN_SOCKET}")
        sub.set_defaults(handler=handler)
        if name == "status":
            sub.add_argument("--json", action="store_true", help="machine-readable output")
        else:
            sub.add_argument("--max-quote-age", type=float, default=180.0, help="seconds (default 180)")

    node = commands.add_parser("node", help="node administration")
    node_commands = node.add_subparsers(dest="node_command", required=True, metavar="SUBCOMMAND")
    learn = node_commands.add_parser("learn", help="accept this host's current event log as a boot profile")
    learn.add_argument("--config", required=True, help="the standalone configuration file")
    learn.add_argument("--name", type=_profile_name, default=time.strftime("learned-%Y%m%d-%H%M%S"),
                       help="profile name: letters, digits, '.', '_', '-' (default: learned-<date>-<time>)")
    learn.set_defaults(handler=_cmd_node_learn)
    add_admin_commands(commands, node_commands)
    add_api_commands(commands)
    add_explain_command(commands, DEFAULT_ADMIN_SOCKET)
    add_audit_commands(commands)
    add_tpm_commands(commands, DEFAULT_ADMIN_SOCKET)
    add_token_commands(commands, DEFAULT_ADMIN_SOCKET)

    dev = commands.add_parser("dev", help="development aids for software TPMs")
    dev_commands = dev.add_subparsers(dest="dev_command", required=True, metavar="SUBCOMMAND")
    boot = dev_commands.add_parser("simulate-boot", help="extend a simulated measured boot into a swtpm")
    boot.add_argument("--tcti", required=True, help="swtpm:path=... (software TPMs only)")
    boot.add_argument("--event-log", required=True, help="where to write the TCG2 event log")
    boot.set_defaults(handler=_cmd_simulate_boot)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command != "agent":
        # A short-lived command piped into `head` should end quietly, as other tools do; the daemon
        # keeps Python's default, where a closed socket is an error to handle, not a signal.
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    try:
        result: int = args.handler(args)
    except VouchdError as err:
        print(f"vouchd: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return result


if __name__ == "__main__":
    sys.exit(main())
