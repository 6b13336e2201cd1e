"""`vouchd tpm info|quote`: what the agent's TPM is, and a quote anyone can check with tpm2-tools.

The agent owns the TPM (a raw TPM without a resource manager has room for one client's objects),
so both commands ask its admin socket (`tpm.info`, `tpm.quote`) rather than the TPM. `quote` writes
what `tpm2_quote` would have written, in the formats `tpm2_checkquote` (tpm2-tools 5.x) reads:

    tpm2_checkquote -u ak.pub.pem -m quote.msg -s quote.sig -f quote.pcrs -g sha256 -q NONCE
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization

from vouchd.admincli import call_admin
from vouchd.agent.tpmadmin import (
    DEFAULT_QUOTE_PCRS,
    MAX_NONCE_BYTES,
    TpmArgumentsError,
    parse_nonce,
    parse_pcr_selection,
)
from vouchd.errors import VouchdError
from vouchd.evidence import EvidenceError, PcrSelection, TpmPublic, verify_quote
from vouchd.securefiles import write_together

__all__ = ["QUOTE_FILES", "add_tpm_commands", "tpm2_tools_pcrs"]

AK_FILE, MESSAGE_FILE, SIGNATURE_FILE, PCRS_FILE = QUOTE_FILES = ("ak.pub.pem", "quote.msg", "quote.sig", "quote.pcrs")
_PUBLIC_MODE = 0o644  # a quote and a public key: nothing in them is secret

# The C structures tpm2-tools writes as they lie in memory (tpm2-tss headers, x86-64, little endian).
_NUM_PCR_BANKS = 16  # TPM2_NUM_PCR_BANKS: entries in a TPML_PCR_SELECTION
_PCR_SELECT_MAX = 4  # TPM2_PCR_SELECT_MAX: bytes of a TPMS_PCR_SELECTION's bitmap (3 used, for 24 PCRs)
_PCR_SELECT_USED = 3
_DIGESTS_PER_LIST = 8  # digests in a TPML_DIGEST (and what one PCR_Read returns at most)
_DIGEST_BUFFER = 64  # sizeof(TPMU_HA): a TPM2B_DIGEST's buffer, whatever the bank
_PCR_SELECTION_ENTRY = struct.Struct("<HB4sx")  # hash, sizeofSelect, pcrSelect, 1 byte of padding
_DIGEST_ENTRY_SIZE = 2 + _DIGEST_BUFFER


def tpm2_tools_pcrs(selection: PcrSelection, values: Mapping[int, bytes]) -> bytes:
    """The PCR values of a quote as `tpm2_quote -o` writes them and `tpm2_checkquote -f` reads them.

    tpm2-tools 5.x's default ("serialized") format: a TPML_PCR_SELECTION, a UINT32 count, then that
    many TPML_DIGEST of up to eight digests each, in selection order. Not TSS2 marshaling: the
    structures whole, fixed size and padded, with their integers little endian.
    """
    bitmap = bytearray(_PCR_SELECT_MAX)
    for index in selection.pcrs:
        bitmap[index // 8] |= 1 << (index % 8)
    selections = (struct.pack("<I", 1)
                  + _PCR_SELECTION_ENTRY.pack(selection.hash_alg, _PCR_SELECT_USED, bytes(bitmap))
                  + bytes(_PCR_SELECTION_ENTRY.size * (_NUM_PCR_BANKS - 1)))
    digests = [values[index] for index in selection.pcrs]
    lists = [digests[start:start + _DIGESTS_PER_LIST] for start in range(0, len(digests), _DIGESTS_PER_LIST)]
    out = bytearray(selections + struct.pack("<I", len(lists)))
    for chunk in lists:
        out += struct.pack("<I", len(chunk))
        for digest in chunk:
            out += struct.pack("<H", len(digest)) + digest.ljust(_DIGEST_BUFFER, b"\0")
        out += bytes(_DIGEST_ENTRY_SIZE * (_DIGESTS_PER_LIST - len(chunk)))
    return bytes(out)


# ---------------------------------------------------------------------- tpm info

def _cmd_info(args: argparse.Namespace) -> int:
    answer = call_admin(args, "tpm.info")
    if not isinstance(answer, dict) or not isinstance(answer.get("ek"), dict):
        raise VouchdError("the agent sent a malformed tpm info reply")
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    else:
        _print_info(answer)
    return 0


def _print_info(info: dict[str, Any]) -> None:
    ek = info["ek"]
    spec = info.get("specification") or {}
    print(f"tcti           {info.get('tcti', '-')}")
    print(f"manufacturer   {info.get('manufacturer') or '-'}  (vendor {info.get('vendor') or '-'})")
    print(f"firmware       {info.get('firmware_version', '-')}  ({' '.join(info.get('firmware_raw', []))})")
    print(f"specification  TPM {spec.get('family', '-')} level {spec.get('level', '-')} revision "
          f"{spec.get('revision', '-')} ({spec.get('year', '-')}, day {spec.get('day_of_year', '-')})")
    print(f"ek             {ek.get('type', '-')}, ek_hash {ek.get('hash', '-')}")
    certificate = ek.get("certificate")
    if certificate is None:
        print("  certificate  none in the TPM's NV (firmware TPMs often have none)")
    else:
        _print_certificate("certificate", certificate)
    for link in ek.get("chain", []):
        _print_certificate(f"chain {link['nv_index']}", link)
    for bank in info.get("pcr_banks", []):
        print(f"pcr bank       {bank['bank']}: {_pcr_list(bank['pcrs'])}")
    algorithms = info.get("algorithms", [])
    print(f"algorithms     {len(algorithms)}: {', '.join(alg['name'] for alg in algorithms)}")
    print(f"curves         {', '.join(info.get('curves', [])) or '-'}")


def _pcr_list(pcrs: list[int]) -> str:
    if not pcrs:
        return "no pcrs allocated"
    if pcrs == list(range(pcrs[0], pcrs[-1] + 1)):
        return f"pcrs {pcrs[0]}-{pcrs[-1]}"
    return f"pcrs {', '.join(map(str, pcrs))}"


def _print_certificate(label: str, certificate: dict[str, Any]) -> None:
    if "error" in certificate:
        print(f"  {label:12} sha256 {certificate['sha256']}: {certificate['error']}")
        return
    print(f"  {label:12} subject {certificate['subject'] or '(empty)'}")
    print(f"  {'':12} issuer  {certificate['issuer'] or '(empty)'}")
    print(f"  {'':12} valid   {certificate['not_before']} to {certificate['not_after']}, "
          f"serial {certificate['serial']}")


# ---------------------------------------------------------------------- tpm quote

def _nonce(text: str) -> bytes:
    try:
        return parse_nonce(text)
    except TpmArgumentsError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _pcr_selection(text: str) -> PcrSelection:
    try:
        return parse_pcr_selection(text)
    except TpmArgumentsError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def _check_out_dir(out: Path) -> None:
    """Make `out` if need be and prove it writable, before the agent spends a quote on it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise VouchdError(f"--out {out}: not a directory") from None
    except OSError as err:
        raise VouchdError(f"--out {out}: cannot create it: {err.strerror}") from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".vouchd-probe-", dir=out)
    except OSError as err:
        raise VouchdError(f"--out {out}: cannot write there: {err.strerror}") from None
    os.close(fd)
    os.unlink(probe)
    for name in QUOTE_FILES:
        target = out / name
        # A folder in a file's place would fail its rename after the others replaced theirs.
        if target.is_symlink() or (target.exists() and not target.is_file()):
            raise VouchdError(f"--out {out}: {name} exists and is not a regular file")


def _quote_files(answer: object, nonce: bytes, selection: PcrSelection) -> dict[str, bytes]:
    """The files' contents, once the reply is checked as tpm2_checkquote will check the files."""
    if not isinstance(answer, dict):
        raise VouchdError("the agent sent a malformed tpm quote reply")
    try:
        ak = TpmPublic.from_tpm2b(bytes.fromhex(answer["ak_public"]))
        attest = bytes.fromhex(answer["attest"])
        signature = bytes.fromhex(answer["signature"])
        values = {int(index): bytes.fromhex(value) for index, value in answer["pcr_values"].items()}
        verify_quote(ak, attest, signature, extra_data=nonce, selection=selection, pcr_values=values)
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise VouchdError(f"the agent sent a malformed tpm quote reply ({type(err).__name__})") from None
    except EvidenceError as err:
        raise VouchdError(f"the agent's quote does not verify: {err}") from None
    pem = ak.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    return {AK_FILE: pem, MESSAGE_FILE: attest, SIGNATURE_FILE: signature,
            PCRS_FILE: tpm2_tools_pcrs(selection, values)}


def _cmd_quote(args: argparse.Namespace) -> int:
    nonce: bytes = args.nonce
    selection: PcrSelection = args.pcrs
    out = Path(args.out)
    made_here = not out.exists()
    _check_out_dir(out)
    try:
        answer = call_admin(args, "tpm.quote", {"nonce": nonce.hex(), "pcrs": selection.tool_string()})
        files = _quote_files(answer, nonce, selection)
        try:
            # All four or none: each goes to a fsynced temporary first, and the renames come last.
            write_together([(out / name, data, _PUBLIC_MODE) for name, data in files.items()])
        except OSError as err:
            raise VouchdError(f"--out {out}: cannot write the quote files: {err.strerror or err}") from None
    except BaseException:
        if made_here:
            with contextlib.suppress(OSError):
                out.rmdir()  # a failed quote leaves no folder behind either (rmdir: only if still empty)
        raise
    hash_name = str(answer.get("hash") or "sha256")
    if args.json:
        print(json.dumps({**answer, "files": {name: str(out / name) for name in QUOTE_FILES}}, indent=2,
                         sort_keys=True))
        return 0
    print(f"quoted {selection.tool_string()} with the agent's AK over nonce {nonce.hex()}")
    print(f"wrote {', '.join(QUOTE_FILES)} to {out}")
    print("check it with: tpm2_checkquote " + " ".join(
        f"-{flag} {value}" for flag, value in (
            ("u", out / AK_FILE), ("m", out / MESSAGE_FILE), ("s", out / SIGNATURE_FILE),
            ("f", out / PCRS_FILE), ("g", hash_name), ("q", nonce.hex()))))
    return 0


def add_tpm_commands(commands: argparse._SubParsersAction,  # type: ignore[type-arg]
                     default_admin_socket: str) -> None:
    tpm = commands.add_parser("tpm", help="the agent's TPM: what it is, and quotes to check with tpm2-tools")
    tpm_commands = tpm.add_subparsers(dest="tpm_command", required=True, metavar="SUBCOMMAND")
    socket_help = f"default: $VOUCHD_ADMIN_SOCKET or {default_admin_socket}"

    info = tpm_commands.add_parser("info", help="EK, certificates, maker, firmware, algorithms and PCR banks")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument("--admin-socket", help=socket_help)
    info.set_defaults(handler=_cmd_info)

    quote = tpm_commands.add_parser(
        "quote", help="a quote by the agent's AK, written as tpm2_quote writes it for tpm2_checkquote")
    quote.add_argument("--nonce", required=True, type=_nonce, metavar="HEX",
                       help=f"qualifying data, 1 to {MAX_NONCE_BYTES} bytes as hex (tpm2_checkquote -q)")
    quote.add_argument("--pcrs", type=_pcr_selection, default=parse_pcr_selection(DEFAULT_QUOTE_PCRS),
                       metavar="BANK:I,J,...", help=f"the PCRs to quote (default {DEFAULT_QUOTE_PCRS})")
    quote.add_argument("--out", required=True, metavar="DIR",
                       help=f"where to write {', '.join(QUOTE_FILES)} (made if missing; files replaced whole)")
    quote.add_argument("--json", action="store_true", help="print the agent's reply and the file paths as JSON")
    quote.add_argument("--admin-socket", help=socket_help)
    quote.set_defaults(handler=_cmd_quote)
