"""`vouchd audit verify|tail`: check an audit log offline, or read it as it grows.

Both read the files directly (no agent needed): `verify` proves the chain and the TPM anchors,
`tail` shows records one readable line each (or as they are, with --json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat, load_pem_public_key

from vouchd.audit.records import log_file_number, log_files, parse_record
from vouchd.audit.verify import QuoteChecker, VerifyReport, node_key_checker, tpm_quote_checker, verify_log
from vouchd.errors import VouchdError
from vouchd.protocol.keyproof import NODE_KEY_PUBLIC_FILE

__all__ = ["DEFAULT_AUDIT_DIR", "add_audit_commands", "follow_records", "format_record"]

DEFAULT_AUDIT_DIR = "/var/lib/vouchd/agent/audit"   # <agent state_dir>/audit
EXIT_OK, EXIT_BAD, EXIT_UNCHECKED = 0, 1, 2
_POLL_SECONDS = 0.5
_CHUNK = 64 * 1024

_VERIFY_HELP = """\
Checks that every line is a record, that seq runs on without a gap, that each record's prev is the
sha256 of the one before (across files, in the order given; a folder stands for its files, oldest
first), and that each anchor is a TPM quote by the node's attestation key (AK) over the chain head.

Exit status: 0 when everything verifies, anchors included; 1 when a record is bad (the first one is
named); 2 when the chain verifies but no AK was given, so the anchors could not be checked. A
partial last line left by a crash is reported, not counted as tampering: the agent drops it when it
next starts.
"""


_WITH_AK, _WITH_NODE_KEY = "the AK", "the node key"


def _anchor_checker(args: argparse.Namespace) -> tuple[QuoteChecker | None, str]:
    """How to check anchors, and with what: the AK (hardware tier) or the node key (static-secret
    tier); (None, "") when no key was given."""
    if args.ak_public:
        return tpm_quote_checker(_read_key_file(Path(args.ak_public), "the AK public")), _WITH_AK
    if args.node_key:
        return node_key_checker(_node_key_der(Path(args.node_key))), _WITH_NODE_KEY
    if not args.state_dir:
        return None, ""
    state = Path(args.state_dir)
    ak_path = state / "tpm" / "ak.pub"
    node_key_path = state / "node" / NODE_KEY_PUBLIC_FILE
    if not ak_path.exists() and node_key_path.exists():
        return node_key_checker(_node_key_der(node_key_path)), _WITH_NODE_KEY
    return tpm_quote_checker(_read_key_file(ak_path, "the AK public")), _WITH_AK


def _read_key_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise VouchdError(f"cannot read {what} {path}: {err.strerror}") from err


def _node_key_der(path: Path) -> bytes:
    pem = _read_key_file(path, "the node key")
    try:
        key = load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm):
        raise VouchdError(f"{path}: not a PEM public key (the agent's node/{NODE_KEY_PUBLIC_FILE})") from None
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def _cmd_verify(args: argparse.Namespace) -> int:
    checker, key_name = _anchor_checker(args)
    report = verify_log(args.paths, None, checker=checker)
    if args.json:
        print(json.dumps(report.to_json(), indent=2, sort_keys=True))
    else:
        _print_report(report, key_name)
    if not report.ok:
        return EXIT_BAD
    return EXIT_OK if report.anchors_checked else EXIT_UNCHECKED


def _print_report(report: VerifyReport, key_name: str) -> None:
    print(f"files      {', '.join(Path(f).name for f in report.files)}")
    if report.first_seq is None:
        print("records    none")
    else:
        start = "the first record" if report.from_genesis else "a record whose predecessors were not given"
        print(f"records    {report.records} verified (seq {report.first_seq} to {report.last_seq}; starts at {start})")
    how = (f"verified with {key_name}" if report.anchors_checked
           else "NOT CHECKED: give --state-dir, --ak-public or --node-key")
    print(f"anchors    {report.anchors} ({how})")
    if report.anchored_through is None:
        print(f"anchored   nothing; {report.unanchored} records unanchored")
    else:
        print(f"anchored   {report.covered} records, through seq {report.anchored_through}; "
              f"{report.unanchored} unanchored after it")
    if report.partial_tail is not None:
        print(f"partial    {report.partial_tail}")
    if report.problem is not None:
        print(f"result     FAILED: {report.problem}")
    elif report.anchors_checked:
        print("result     OK")
    else:
        print("result     chain OK; anchors could not be checked without the AK or node key")


def format_record(line: bytes) -> str:
    """One readable line for a record: time, seq, kind, outcome, method, caller, SPIFFE IDs, reason."""
    try:
        record = parse_record(line)
    except ValueError as err:
        return f"(not a record: {err})"
    kind = str(record["kind"])
    parts = [str(record["time"]), f"#{record['seq']}", kind]
    if kind == "anchor":
        quote = record.get("quote")
        pcrs = quote.get("pcrs", "?") if isinstance(quote, dict) else "?"
        parts += [f"covers #{record.get('covers')}", str(pcrs)]
    elif kind == "start":
        parts += [f"pid {record.get('pid')}", f"dropped {record.get('dropped_bytes', 0)} bytes"]
    elif "outcome" in record:
        parts += [str(record["outcome"]), str(record.get("source", "")), str(record.get("method", ""))]
        caller = record.get("caller")
        if isinstance(caller, dict):
            parts.append(f"pid {caller.get('pid')} uid {caller.get('uid')}")
        node = record.get("node")
        if isinstance(node, dict):
            parts.append(f"node {node.get('node_id')}")
        ids = record.get("spiffe_ids")
        if isinstance(ids, list):
            parts.append(" ".join(map(str, ids)))
        if record.get("reason"):
            parts.append(f"reason: {record['reason']}")
    else:
        rest = {k: v for k, v in record.items() if k not in ("seq", "time", "prev", "kind")}
        parts.append(json.dumps(rest, sort_keys=True, separators=(",", ":"), ensure_ascii=False))
    return "  ".join(part for part in parts if part)


def _last_lines(path: Path, count: int, end: int) -> list[bytes]:
    """The last `count` complete lines of a file's first `end` bytes, read from the end."""
    with path.open("rb") as stream:
        data = b""
        while end > 0 and data.count(b"\n") <= count:
            start = max(0, end - _CHUNK)
            stream.seek(start)
            data = stream.read(end - start) + data
            end = start
    complete = data[:data.rfind(b"\n") + 1]
    lines = complete.split(b"\n")[:-1]
    if end > 0:
        lines = lines[1:]  # the first may be cut
    return lines[-count:] if count else []


def _emit(line: bytes, as_json: bool, out: TextIO) -> None:
    out.write(line.decode("utf-8", "replace") + "\n" if as_json else format_record(line) + "\n")
    out.flush()


def follow_records(directory: Path, as_json: bool, out: TextIO, *, start: tuple[Path, int] | None = None,
                   poll: float = _POLL_SECONDS, stop: Callable[[], bool] = lambda: False) -> None:
    """Print records as they are appended, from `start` (a file and an offset; default: the end of the
    newest file), moving on to the next file when the log rotates; every wait is one `poll`."""
    if start is None:
        start = _end_of_log(directory)
    current, offset = start if start is not None else (None, 0)
    while not stop():
        files = log_files(directory)
        if current is None and files:
            current, offset = files[0], 0
        if current is not None:
            number = log_file_number(current) or 0
            newer = [f for f in files if (log_file_number(f) or 0) > number]
            offset = _print_new(current, offset, as_json, out)
            if newer:  # read to the end above, after listing: nothing written before rotation is missed
                current, offset = newer[0], 0
                continue
        time.sleep(poll)


def _end_of_log(directory: Path) -> tuple[Path, int] | None:
    files = log_files(directory)
    return (files[-1], files[-1].stat().st_size) if files else None


def _print_new(path: Path, offset: int, as_json: bool, out: TextIO) -> int:
    try:
        with path.open("rb") as stream:
            size = stream.seek(0, os.SEEK_END)
            if size < offset:  # a partial line was cut off when the agent restarted
                return size
            stream.seek(offset)
            data = stream.read(size - offset)
    except FileNotFoundError:
        return offset
    complete = data[:data.rfind(b"\n") + 1]
    for line in complete.split(b"\n")[:-1]:
        _emit(line, as_json, out)
    return offset + len(complete)


def _cmd_tail(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    if not directory.is_dir():
        raise VouchdError(f"audit log folder {directory} does not exist")
    try:
        end = _end_of_log(directory)   # what is shown now ends here; --follow goes on from here
        lines: list[bytes] = []
        for path in reversed(log_files(directory)):
            if end is not None and (log_file_number(path) or 0) > (log_file_number(end[0]) or 0):
                continue    # written after the end was taken: --follow shows it
            size = end[1] if end is not None and path == end[0] else path.stat().st_size
            lines = _last_lines(path, args.count - len(lines), size) + lines
            if len(lines) >= args.count:
                break
    except OSError as err:
        raise VouchdError(f"cannot read audit log folder {directory}: {err.strerror}") from err
    for line in lines:
        _emit(line, args.json, sys.stdout)
    if args.follow:
        follow_records(directory, args.json, sys.stdout, start=end)
    return 0


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return value


def add_audit_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    audit = commands.add_parser("audit", help="the tamper-evident audit log: verify it, read it")
    audit_commands = audit.add_subparsers(dest="audit_command", required=True, metavar="SUBCOMMAND")

    verify = audit_commands.add_parser("verify", help="check an audit log's hash chain and TPM anchors",
                                       description=_VERIFY_HELP,
                                       formatter_class=argparse.RawDescriptionHelpFormatter)
    verify.add_argument("paths", nargs="+", metavar="PATH", help="audit log files in order, or folders of them")
    key = verify.add_mutually_exclusive_group()
    key.add_argument("--ak-public", metavar="FILE", help="the AK's marshaled TPM2B_PUBLIC (the agent's tpm/ak.pub)")
    key.add_argument("--node-key", metavar="FILE",
                     help=f"a static-secret node's public key, PEM (the agent's node/{NODE_KEY_PUBLIC_FILE})")
    key.add_argument("--state-dir", metavar="DIR",
                     help=f"the agent's state folder: its tpm/ak.pub, or node/{NODE_KEY_PUBLIC_FILE} without a TPM")
    verify.add_argument("--json", action="store_true", help="machine-readable report")
    verify.set_defaults(handler=_cmd_verify)

    tail = audit_commands.add_parser("tail", help="show the latest audit records, one line each")
    tail.add_argument("--dir", default=DEFAULT_AUDIT_DIR, help=f"the audit log folder (default {DEFAULT_AUDIT_DIR})")
    tail.add_argument("-n", dest="count", type=_count, default=20, metavar="N", help="records to show (default 20)")
    tail.add_argument("-f", "--follow", action="store_true",
                      help="keep printing records as they are written, across rotation, until Ctrl-C")
    tail.add_argument("--json", action="store_true", help="print the records as they are stored")
    tail.set_defaults(handler=_cmd_tail)
