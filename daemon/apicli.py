"""`vouchd api fetch|validate|watch`: a Workload API client for any SPIFFE agent's socket.

`fetch x509 --write DIR` writes what spire-agent's `api fetch x509 -write` writes: per SVID n,
`svid.n.pem` (the certificate chain), `svid.n.key` (its PKCS#8 private key, mode 0600) and
`bundle.n.pem` (its trust domain's CA certificates).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat, load_der_private_key

from vouchd.errors import VouchdError
from vouchd.securefiles import write_atomically

__all__ = ["add_api_commands"]

_FROM_STDIN = "-"  # `vouchd api validate - --audience A` reads the token from standard input


def _certificates(der: bytes) -> list[x509.Certificate]:
    from vouchd.spiffe import load_der_certificates

    return load_der_certificates(der, "certificates")


def _pem(certificates: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(Encoding.PEM) for c in certificates)


def _cmd_fetch_x509(args: argparse.Namespace) -> int:
    from vouchd.agent.workload_api.client import endpoint_socket, fetch_x509

    svids = asyncio.run(fetch_x509(endpoint_socket(args.socket)))
    if not svids:
        raise VouchdError("the Workload API answered with no X.509-SVID")
    for n, svid in enumerate(svids):
        chain = _certificates(svid.cert_chain_der)
        leaf = chain[0]
        print(f"SPIFFE ID:     {svid.spiffe_id}")
        print(f"  hint:        {svid.hint or '-'}")
        print(f"  serial:      {leaf.serial_number:x}")
        print(f"  valid until: {leaf.not_valid_after_utc.isoformat()}")
        print(f"  bundle:      {len(_certificates(svid.bundle_der))} CA certificate(s)")
        if args.write:
            folder = Path(args.write)
            folder.mkdir(parents=True, exist_ok=True)
            key = load_der_private_key(svid.private_key_der, password=None)
            write_atomically(folder / f"svid.{n}.pem", _pem(chain), mode=0o644)
            write_atomically(folder / f"svid.{n}.key",
                             key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()), mode=0o600)
            write_atomically(folder / f"bundle.{n}.pem", _pem(_certificates(svid.bundle_der)), mode=0o644)
            print(f"  written:     {folder}/svid.{n}.pem, svid.{n}.key, bundle.{n}.pem")
    return 0


def _cmd_fetch_jwt(args: argparse.Namespace) -> int:
    from vouchd.agent.workload_api.client import endpoint_socket, fetch_jwt_svids

    svids = asyncio.run(fetch_jwt_svids(endpoint_socket(args.socket), args.audience, args.spiffe_id or ""))
    if args.json:
        print(json.dumps([{"spiffe_id": s.spiffe_id, "token": s.token, "hint": s.hint} for s in svids], indent=2))
        return 0
    for svid in svids:
        print(f"SPIFFE ID: {svid.spiffe_id}")
        print(f"token:     {svid.token}")
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    from vouchd.agent.workload_api.client import endpoint_socket, validate_jwt_svid

    token = sys.stdin.read().strip() if args.token == _FROM_STDIN else args.token
    spiffe_id, claims = asyncio.run(validate_jwt_svid(endpoint_socket(args.socket), token, args.audience))
    print(json.dumps({"spiffe_id": spiffe_id, "claims": claims}, indent=2, sort_keys=True))
    return 0


def _cmd_watch(args: argparse.Namespace) -> int:
    from vouchd.agent.workload_api.client import endpoint_socket, watch_x509

    async def watch() -> None:
        async for svids in watch_x509(endpoint_socket(args.socket)):
            summary = ", ".join(f"{s.spiffe_id} (serial {_certificates(s.cert_chain_der)[0].serial_number:x}, "
                                f"until {_certificates(s.cert_chain_der)[0].not_valid_after_utc.isoformat()})"
                                for s in svids)
            print(f"received {len(svids)} x509-svid(s): {summary}", flush=True)

    try:
        asyncio.run(watch())
    except KeyboardInterrupt:
        return 130
    return 0


def add_api_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    api = commands.add_parser("api", help="a Workload API client for any SPIFFE agent")
    api_commands = api.add_subparsers(dest="api_command", required=True, metavar="SUBCOMMAND")

    def common(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--socket", help="the Workload API socket (default: $SPIFFE_ENDPOINT_SOCKET)")

    fetch = api_commands.add_parser("fetch", help="fetch SVIDs")
    fetch_kinds = fetch.add_subparsers(dest="fetch_kind", required=True, metavar="KIND")
    x509_parser = fetch_kinds.add_parser("x509", help="this process's X.509-SVIDs")
    x509_parser.add_argument("--write", metavar="DIR", help="write svid.N.pem, svid.N.key and bundle.N.pem there")
    common(x509_parser)
    x509_parser.set_defaults(handler=_cmd_fetch_x509)
    jwt_parser = fetch_kinds.add_parser("jwt", help="this process's JWT-SVIDs for an audience")
    jwt_parser.add_argument("--audience", action="append", required=True, help="repeat it for several")
    jwt_parser.add_argument("--spiffe-id", help="only this identity's")
    jwt_parser.add_argument("--json", action="store_true", help="machine-readable output")
    common(jwt_parser)
    jwt_parser.set_defaults(handler=_cmd_fetch_jwt)

    validate = api_commands.add_parser("validate", help="validate a JWT-SVID (prints its SPIFFE ID and claims)")
    validate.add_argument("token", help="the JWT-SVID, or - to read it from standard input")
    validate.add_argument("--audience", required=True)
    common(validate)
    validate.set_defaults(handler=_cmd_validate)

    watch = api_commands.add_parser("watch", help="print every X.509-SVID update the agent pushes")
    common(watch)
    watch.set_defaults(handler=_cmd_watch)
