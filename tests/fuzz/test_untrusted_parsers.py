"""Every parser of input vouchd does not control, fed what an attacker could send.

Each test asserts the parser's contract under arbitrary input: it returns, or raises its own module's
error type (a VouchdError subclass naming what is wrong), and nothing else escapes; and it stays
bounded (hypothesis fails an example slower than its deadline). The TPM structures, event logs,
protocol messages, SPIFFE IDs, cgroups and /proc parsers have their own property tests beside
their unit tests; these cover the rest: CSRs, JWT-SVIDs and JWKS, node keys, audit log lines,
the YAML configuration, and the command lines an interpreter is started with.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from vouchd.audit.records import AnchorQuote, parse_record
from vouchd.errors import ConfigError, VouchdError
from vouchd.protocol.errors import MessageError
from vouchd.protocol.keyproof import load_node_key_public
from vouchd.spiffe import InvalidBundleError, InvalidSvidError, JwtBundle, TrustDomain, csr_public_key, make_csr
from vouchd.spiffe.jwtsvid import validate_jwt_svid

# Generous for a loaded CI machine, tight enough that anything quadratic on 64 KiB shows.
# VOUCHD_FUZZ_EXAMPLES raises the count for a long run by hand; the suite's is 300 per parser.
FUZZ = settings(max_examples=int(os.environ.get("VOUCHD_FUZZ_EXAMPLES", "300")), deadline=2000,
                suppress_health_check=[HealthCheck.too_slow])
TRUST_DOMAIN = TrustDomain("example.org")
_KEY = ec.generate_private_key(ec.SECP256R1())
_CSR = make_csr(_KEY)


def _flip(data: bytes, positions: list[int]) -> bytes:
    mutable = bytearray(data)
    for position in positions:
        mutable[position % len(mutable)] ^= 0x5A
    return bytes(mutable)


@FUZZ
@given(st.binary(max_size=4096))
@example(b"")
@example(b"\x30\x82\xff\xff")
def test_a_csr_is_a_p256_key_or_an_invalid_svid_error(data: bytes) -> None:
    with contextlib.suppress(InvalidSvidError):
        csr_public_key(data)


@FUZZ
@given(st.lists(st.integers(min_value=0), min_size=1, max_size=8))
def test_a_csr_with_flipped_bytes_is_refused_or_still_proves_its_key(positions: list[int]) -> None:
    try:
        key = csr_public_key(_flip(_CSR, positions))
    except InvalidSvidError:
        return
    assert key.public_numbers() == _KEY.public_key().public_numbers(), "a changed CSR never yields another key"


def _jwt_parts() -> st.SearchStrategy[str]:
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                               lambda children: st.lists(children, max_size=4)
                               | st.dictionaries(st.text(max_size=10), children, max_size=4), max_leaves=10)
    encoded_json = json_values.map(lambda value: base64.urlsafe_b64encode(json.dumps(value).encode()).decode()
                                   .rstrip("="))
    return st.one_of(encoded_json, st.text(max_size=200))


@FUZZ
@given(st.one_of(st.text(max_size=2048), st.tuples(_jwt_parts(), _jwt_parts(), _jwt_parts()).map(".".join)))
@example("a.b.c")
@example("." * 3)
@example("x" * 70_000)
def test_a_jwt_svid_validates_or_is_an_invalid_svid_error(token: str) -> None:
    bundle = JwtBundle.of(TRUST_DOMAIN, [_KEY.public_key()])
    with contextlib.suppress(InvalidSvidError):
        validate_jwt_svid(token, bundle, audience="aud", now=1_800_000_000)


@FUZZ
@given(st.one_of(st.binary(max_size=4096), st.dictionaries(st.text(max_size=8), st.text(max_size=64), max_size=6)
                 .map(lambda keys: json.dumps({"keys": [keys]}).encode())))
@example(b'{"keys": [{"kty": "EC", "crv": "P-256", "x": "", "y": ""}]}')
def test_a_jwks_loads_or_is_an_invalid_bundle_error(data: bytes) -> None:
    with contextlib.suppress(InvalidBundleError):
        JwtBundle.from_jwks(TRUST_DOMAIN, data)


@FUZZ
@given(st.binary(max_size=512))
def test_a_node_key_is_p256_or_a_message_error(data: bytes) -> None:
    with contextlib.suppress(MessageError):
        load_node_key_public(data)


@FUZZ
@given(st.one_of(st.binary(max_size=2048),
                 st.dictionaries(st.sampled_from(["seq", "prev", "kind", "time", "quote", "covers"]),
                                 st.one_of(st.integers(), st.text(max_size=70), st.none(), st.booleans()),
                                 max_size=6).map(lambda record: json.dumps(record).encode())))
@example(b'{"seq": 1, "prev": "' + b"0" * 64 + b'", "kind": "x", "time": "t"}')
def test_an_audit_line_parses_or_names_what_is_wrong(line: bytes) -> None:
    try:
        record = parse_record(line)
    except ValueError as err:
        assert str(err)
        return
    try:
        AnchorQuote.from_record(record.get("quote"))
    except ValueError as err:
        assert str(err)


_YAML_ATOMS = st.sampled_from(["trust_domain: example.org", "agent:", "authority:", "entries:", "  - spiffe_id: x",
                               "    selectors: [unix:uid:0]", "  tier: static-secret", "  state_dir: /x",
                               "  pcr_selection: sha256:0-7", "log_level: debug", "  tpm: {tcti: x}", "- [", "{",
                               "&a [*a, *a]", "!!python/object:os.system", "${NOPE}", "\t", "a: b: c", "? x"])


@FUZZ
@given(st.one_of(st.lists(_YAML_ATOMS, max_size=12).map("\n".join), st.text(max_size=512)))
@example("a: &a [*a]")
@example("x: !!binary AAAA")
def test_a_configuration_loads_or_is_a_config_error(text: str) -> None:
    from vouchd.config import parse_config

    try:
        parse_config(text, Path("/etc/vouchd/fuzz.yaml"), environ={})
    except ConfigError as err:
        assert "/etc/vouchd/fuzz.yaml" in str(err), "the error names the file"
    except VouchdError:
        pass


@FUZZ
@given(st.binary(max_size=4096), st.booleans())
def test_a_command_line_is_split_and_read_without_surprises(raw: bytes, truncated: bool) -> None:
    from vouchd.attestors.workload.commandline import entry_point, identify, split_command_line

    argv = split_command_line(raw, truncated=truncated)
    assert all(isinstance(argument, str) for argument in argv)
    if not argv:
        return
    for executable in ("/usr/bin/python3", "/bin/sh", "/usr/bin/node", "/usr/bin/java", argv[0]):
        invocation = identify(executable, argv)
        if invocation is not None:
            entry_point(invocation, complete=not truncated)
