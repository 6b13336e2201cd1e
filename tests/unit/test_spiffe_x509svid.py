"""X.509-SVID minting, leaf validation, chain verification and CSRs (spiffe/spiffe X509-SVID.md)."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, ExtensionOID, NameOID, SignatureAlgorithmOID

from vouchd.spiffe import (
    CLOCK_SKEW,
    TIER_SUBJECT_PREFIX,
    InvalidSvidError,
    SpiffeId,
    TrustDomain,
    TrustTier,
    X509Bundle,
    csr_public_key,
    make_csr,
    mint_x509_svid,
    read_tier,
    validate_x509_svid_leaf,
    verify_x509_svid,
)

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TD = TrustDomain("example.org")
WORKLOAD = TD.spiffe_id("/workload/web")
HOUR = timedelta(hours=1)


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def starts(message: str) -> str:
    return f"^{re.escape(message)}"


@dataclass(frozen=True)
class Ca:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate


def _key_usage(*, digital_signature: bool = False, cert_sign: bool = False, crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=cert_sign,
        crl_sign=crl_sign,
        encipher_only=False,
        decipher_only=False,
    )


def make_ca(
    name: str = "test root",
    *,
    td: TrustDomain = TD,
    issuer: Ca | None = None,
    not_after: datetime = NOW + timedelta(days=30),
) -> Ca:
    """A root (or, with `issuer`, an intermediate) CA shaped like vouchd's."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    signer_key = issuer.key if issuer else key
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer.cert.subject if issuer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - timedelta(days=1))
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(td.id))]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if issuer:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key()), critical=False
        )
    return Ca(key, builder.sign(signer_key, hashes.SHA256()))


@pytest.fixture(scope="module")
def ca() -> Ca:
    return make_ca()


@pytest.fixture(scope="module")
def workload_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def mint(
    ca: Ca,
    public_key: ec.EllipticCurvePublicKey,
    spiffe_id: SpiffeId = WORKLOAD,
    *,
    ttl: timedelta = HOUR,
    tier: TrustTier = TrustTier.HARDWARE,
    dns_names: Sequence[str] = (),
    now: datetime = NOW,
) -> x509.Certificate:
    return mint_x509_svid(
        ca_key=ca.key,
        ca_cert=ca.cert,
        public_key=public_key,
        spiffe_id=spiffe_id,
        ttl=ttl,
        tier=tier,
        dns_names=dns_names,
        now=now,
    )


@pytest.fixture(scope="module")
def svid(ca: Ca, workload_key: ec.EllipticCurvePrivateKey) -> x509.Certificate:
    return mint(ca, workload_key.public_key(), dns_names=["web.example.org"])


# --- the minted leaf, rule by rule -------------------------------------------------------------


def test_minted_svid_passes_leaf_validation_and_chain_verification(ca: Ca, svid: x509.Certificate) -> None:
    assert validate_x509_svid_leaf(svid) == WORKLOAD
    assert verify_x509_svid([svid], X509Bundle(TD, (ca.cert,)), now=NOW) == WORKLOAD


def test_svid_has_exactly_one_uri_san_the_spiffe_id_plus_the_dns_names(svid: x509.Certificate) -> None:
    san = svid.extensions.get_extension_for_class(x509.SubjectAlternativeName)

    assert san.value.get_values_for_type(x509.UniformResourceIdentifier) == [str(WORKLOAD)]
    assert san.value.get_values_for_type(x509.DNSName) == ["web.example.org"]


def test_svid_is_not_a_ca_and_says_so_critically(svid: x509.Certificate) -> None:
    constraints = svid.extensions.get_extension_for_class(x509.BasicConstraints)

    assert constraints.critical
    assert constraints.value.ca is False


def test_svid_key_usage_is_digital_signature_only_and_critical(svid: x509.Certificate) -> None:
    usage = svid.extensions.get_extension_for_class(x509.KeyUsage)

    assert usage.critical
    assert usage.value == _key_usage(digital_signature=True)


def test_svid_extended_key_usage_is_server_and_client_auth(svid: x509.Certificate) -> None:
    eku = svid.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value

    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]


@pytest.mark.parametrize("tier", list(TrustTier))
def test_svid_tier_is_in_the_subject_and_readable(
    ca: Ca, workload_key: ec.EllipticCurvePrivateKey, tier: TrustTier
) -> None:
    leaf = mint(ca, workload_key.public_key(), tier=tier)

    assert read_tier(leaf) is tier
    assert leaf.subject == x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vouchd"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, f"{TIER_SUBJECT_PREFIX}{tier.value}"),
        ]
    )
    assert leaf.subject.rfc4514_string() == f"OU=vouchd-tier:{tier.value},O=vouchd"


def test_svid_extensions_are_exactly_the_spiffe_and_path_validation_ones(svid: x509.Certificate) -> None:
    # No private extension: Go's crypto/x509 refuses a certificate with an OID arc above 2^31-1,
    # and any unknown extension is one more thing a relying party's parser could reject.
    assert {extension.oid for extension in svid.extensions} == {
        ExtensionOID.BASIC_CONSTRAINTS,
        ExtensionOID.KEY_USAGE,
        ExtensionOID.EXTENDED_KEY_USAGE,
        ExtensionOID.SUBJECT_ALTERNATIVE_NAME,
        ExtensionOID.SUBJECT_KEY_IDENTIFIER,
        ExtensionOID.AUTHORITY_KEY_IDENTIFIER,
    }
    assert len(svid.extensions) == 6


def test_svid_serials_are_positive_128_bit_and_random(ca: Ca, workload_key: ec.EllipticCurvePrivateKey) -> None:
    serials = {mint(ca, workload_key.public_key()).serial_number for _ in range(8)}

    assert len(serials) == 8
    assert all(0 < serial < 2**128 for serial in serials)


def test_svid_validity_is_backdated_for_clock_skew_and_lasts_the_ttl(svid: x509.Certificate) -> None:
    assert svid.not_valid_before_utc == NOW - CLOCK_SKEW
    assert svid.not_valid_after_utc == NOW + HOUR


def test_svid_never_outlives_its_ca(ca: Ca, workload_key: ec.EllipticCurvePrivateKey) -> None:
    leaf = mint(ca, workload_key.public_key(), ttl=timedelta(days=365))

    assert leaf.not_valid_after_utc == ca.cert.not_valid_after_utc


def test_svid_not_before_never_precedes_its_ca(workload_key: ec.EllipticCurvePrivateKey) -> None:
    young = make_ca()
    leaf = mint(young, workload_key.public_key(), now=young.cert.not_valid_before_utc)

    assert leaf.not_valid_before_utc == young.cert.not_valid_before_utc


def test_svid_key_identifiers_link_leaf_key_and_issuer(
    ca: Ca, svid: x509.Certificate, workload_key: ec.EllipticCurvePrivateKey
) -> None:
    ski = svid.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = svid.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value

    assert ski == x509.SubjectKeyIdentifier.from_public_key(workload_key.public_key())
    assert aki.key_identifier == ca_ski.digest


def test_svid_subject_issuer_and_signature_algorithm(ca: Ca, svid: x509.Certificate) -> None:
    assert svid.subject.rfc4514_string() == "OU=vouchd-tier:hardware,O=vouchd"
    assert svid.issuer == ca.cert.subject
    assert svid.signature_algorithm_oid == SignatureAlgorithmOID.ECDSA_WITH_SHA256
    svid.verify_directly_issued_by(ca.cert)


def test_wildcard_dns_name_is_allowed(ca: Ca, workload_key: ec.EllipticCurvePrivateKey) -> None:
    leaf = mint(ca, workload_key.public_key(), dns_names=["*.web.example.org", "localhost"])

    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["*.web.example.org", "localhost"]


# --- what minting refuses -----------------------------------------------------------------------


def test_minting_refuses_a_key_that_is_not_p256(ca: Ca) -> None:
    p384 = ec.generate_private_key(ec.SECP384R1()).public_key()

    with pytest.raises(InvalidSvidError, match=exactly("svid public key must be an ec p-256 key")):
        mint(ca, p384)


def test_minting_refuses_an_id_without_a_path(ca: Ca, workload_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(InvalidSvidError, match=re.escape("has no path")):
        mint(ca, workload_key.public_key(), TD.id)


@pytest.mark.parametrize("ttl", [timedelta(0), timedelta(seconds=-1)])
def test_minting_refuses_a_ttl_that_is_not_positive(
    ca: Ca, workload_key: ec.EllipticCurvePrivateKey, ttl: timedelta
) -> None:
    with pytest.raises(InvalidSvidError, match=exactly("svid ttl must be positive")):
        mint(ca, workload_key.public_key(), ttl=ttl)


def test_minting_refuses_a_ca_key_that_does_not_match_the_ca_cert(
    ca: Ca, workload_key: ec.EllipticCurvePrivateKey
) -> None:
    impostor = Ca(ec.generate_private_key(ec.SECP256R1()), ca.cert)

    with pytest.raises(InvalidSvidError, match=exactly("ca key does not match the ca certificate")):
        mint(impostor, workload_key.public_key())


def test_minting_refuses_under_an_expired_ca(ca: Ca, workload_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(InvalidSvidError, match=exactly("ca certificate has expired")):
        mint(ca, workload_key.public_key(), now=ca.cert.not_valid_after_utc)


@pytest.mark.parametrize("name", ["", "bad name", "a..b", "-lead.example.org", "x.*.example.org", "\u00e9.org"])
def test_minting_refuses_invalid_dns_names(ca: Ca, workload_key: ec.EllipticCurvePrivateKey, name: str) -> None:
    with pytest.raises(InvalidSvidError, match=exactly(f"dns name {name!r} is not a valid dns name")):
        mint(ca, workload_key.public_key(), dns_names=[name])


def test_minting_refuses_a_naive_time(ca: Ca, workload_key: ec.EllipticCurvePrivateKey) -> None:
    with pytest.raises(ValueError, match=re.escape("timezone-aware")):
        mint(ca, workload_key.public_key(), now=NOW.replace(tzinfo=None))


# --- leaf validation: each relying-party rule ---------------------------------------------------


def build_leaf(
    ca: Ca,
    *,
    uris: Sequence[str] = (str(WORKLOAD),),
    san: bool = True,
    basic_constraints: x509.BasicConstraints | None = None,
    key_usage: x509.KeyUsage | None = None,
) -> x509.Certificate:
    """A leaf with exactly the extensions given: material for breaking one rule at a time."""
    key = ec.generate_private_key(ec.SECP256R1())
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "test")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW - HOUR)
        .not_valid_after(NOW + HOUR)
    )
    if san:
        names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
        names.append(x509.DNSName("web.example.org"))
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if basic_constraints is not None:
        builder = builder.add_extension(basic_constraints, critical=True)
    if key_usage is not None:
        builder = builder.add_extension(key_usage, critical=True)
    return builder.sign(ca.key, hashes.SHA256())


LEAF_BC = x509.BasicConstraints(ca=False, path_length=None)
LEAF_KU = _key_usage(digital_signature=True)


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        (dict(san=False), "leaf has no subject alternative name extension"),
        (dict(uris=()), "leaf has 0 uri sans, an x509-svid has exactly one"),
        (
            dict(uris=(str(WORKLOAD), "spiffe://example.org/other")),
            "leaf has 2 uri sans, an x509-svid has exactly one",
        ),
        (
            dict(uris=("https://example.org/web",)),
            "leaf uri san is not a spiffe id: spiffe id 'https://example.org/web': scheme must be spiffe://",
        ),
        (dict(uris=("spiffe://example.org",)), "leaf spiffe id spiffe://example.org has no path"),
        (dict(basic_constraints=None), "leaf has no basic constraints extension"),
        (
            dict(basic_constraints=x509.BasicConstraints(ca=True, path_length=None)),
            "leaf is a ca certificate",
        ),
        (dict(key_usage=None), "leaf has no key usage extension"),
        (dict(key_usage=_key_usage()), "leaf key usage lacks digitalSignature"),
        (
            dict(key_usage=_key_usage(digital_signature=True, cert_sign=True)),
            "leaf key usage has keyCertSign",
        ),
        (dict(key_usage=_key_usage(digital_signature=True, crl_sign=True)), "leaf key usage has cRLSign"),
    ],
)
def test_leaf_validation_refuses_each_broken_rule(ca: Ca, shape: dict[str, object], message: str) -> None:
    arguments: dict[str, object] = {"basic_constraints": LEAF_BC, "key_usage": LEAF_KU, **shape}
    leaf = build_leaf(ca, **arguments)  # type: ignore[arg-type]

    with pytest.raises(InvalidSvidError) as caught:
        validate_x509_svid_leaf(leaf)

    assert str(caught.value) == message


def test_a_hand_built_leaf_that_keeps_every_rule_is_accepted(ca: Ca) -> None:
    leaf = build_leaf(ca, basic_constraints=LEAF_BC, key_usage=LEAF_KU)

    assert validate_x509_svid_leaf(leaf) == WORKLOAD


# --- chain verification -------------------------------------------------------------------------


def test_svid_signed_by_another_ca_does_not_verify(svid: x509.Certificate) -> None:
    # Same subject name as the real root: only the signature tells them apart.
    stranger = make_ca()

    with pytest.raises(InvalidSvidError, match=re.escape("does not chain to the bundle of example.org")):
        verify_x509_svid([svid], X509Bundle(TD, (stranger.cert,)), now=NOW)


def test_svid_verifies_against_a_bundle_holding_several_roots(ca: Ca, svid: x509.Certificate) -> None:
    bundle = X509Bundle(TD, (make_ca().cert, ca.cert))

    assert verify_x509_svid([svid], bundle, now=NOW) == WORKLOAD


@pytest.mark.parametrize("when", [NOW - timedelta(minutes=5), NOW + HOUR + timedelta(seconds=1)])
def test_svid_outside_its_validity_does_not_verify(ca: Ca, svid: x509.Certificate, when: datetime) -> None:
    with pytest.raises(InvalidSvidError, match=re.escape("not valid at validation time")):
        verify_x509_svid([svid], X509Bundle(TD, (ca.cert,)), now=when)


def test_svid_of_another_trust_domain_does_not_verify(ca: Ca, workload_key: ec.EllipticCurvePrivateKey) -> None:
    foreign = mint(ca, workload_key.public_key(), TrustDomain("other.org").spiffe_id("/web"))

    with pytest.raises(InvalidSvidError, match=starts("leaf spiffe id spiffe://other.org/web is not in trust domain")):
        verify_x509_svid([foreign], X509Bundle(TD, (ca.cert,)), now=NOW)


def test_an_invalid_leaf_is_refused_even_when_correctly_signed(ca: Ca) -> None:
    leaf = build_leaf(ca, basic_constraints=x509.BasicConstraints(ca=True, path_length=None), key_usage=LEAF_KU)

    with pytest.raises(InvalidSvidError, match=exactly("leaf is a ca certificate")):
        verify_x509_svid([leaf], X509Bundle(TD, (ca.cert,)), now=NOW)


def test_empty_chain_and_empty_bundle_are_refused(svid: x509.Certificate) -> None:
    with pytest.raises(InvalidSvidError, match=exactly("x509-svid chain is empty")):
        verify_x509_svid([], X509Bundle(TD, ()), now=NOW)
    with pytest.raises(InvalidSvidError, match=exactly("x509 bundle for example.org holds no authorities")):
        verify_x509_svid([svid], X509Bundle(TD, ()), now=NOW)


def test_intermediates_in_the_chain_are_used_and_required(ca: Ca, workload_key: ec.EllipticCurvePrivateKey) -> None:
    intermediate = make_ca("test intermediate", issuer=ca)
    leaf = mint(intermediate, workload_key.public_key())
    bundle = X509Bundle(TD, (ca.cert,))

    assert verify_x509_svid([leaf, intermediate.cert], bundle, now=NOW) == WORKLOAD
    with pytest.raises(InvalidSvidError, match=re.escape("does not chain")):
        verify_x509_svid([leaf], bundle, now=NOW)


# --- CSRs ---------------------------------------------------------------------------------------


def test_csr_round_trip_yields_the_signing_key(workload_key: ec.EllipticCurvePrivateKey) -> None:
    csr_der = make_csr(workload_key)

    assert csr_public_key(csr_der).public_numbers() == workload_key.public_key().public_numbers()
    assert x509.load_der_x509_csr(csr_der).subject == x509.Name([])


def _spki(key: ec.EllipticCurvePublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_csr_for_a_key_the_sender_does_not_hold_is_refused(workload_key: ec.EllipticCurvePrivateKey) -> None:
    # Splice someone else's public key into a CSR signed by our key: proof of possession fails.
    victim = ec.generate_private_key(ec.SECP256R1()).public_key()
    csr_der = make_csr(workload_key)
    forged = csr_der.replace(_spki(workload_key.public_key()), _spki(victim))
    assert forged != csr_der

    with pytest.raises(InvalidSvidError, match=starts("csr signature does not verify")):
        csr_public_key(forged)


def test_csr_with_a_corrupted_signature_is_refused(workload_key: ec.EllipticCurvePrivateKey) -> None:
    csr_der = bytearray(make_csr(workload_key))
    csr_der[-1] ^= 0x01

    with pytest.raises(InvalidSvidError, match=starts("csr signature does not verify")):
        csr_public_key(bytes(csr_der))


def test_csr_that_is_not_der_is_refused() -> None:
    with pytest.raises(InvalidSvidError, match=exactly("csr is not a der pkcs#10 request")):
        csr_public_key(b"\x30\x03garbage")


def test_oversized_csr_is_refused_before_parsing() -> None:
    with pytest.raises(InvalidSvidError, match=exactly("csr larger than 16384 bytes")):
        csr_public_key(b"\x30" * (16 * 1024 + 1))


def test_csr_for_a_key_other_than_p256_is_refused() -> None:
    for key in (ec.generate_private_key(ec.SECP384R1()), rsa.generate_private_key(65537, 2048)):
        csr = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([])).sign(key, hashes.SHA256())

        with pytest.raises(InvalidSvidError, match=exactly("csr key must be an ec p-256 key")):
            csr_public_key(csr.public_bytes(serialization.Encoding.DER))


# --- interoperability: py-spiffe's own parser ---------------------------------------------------

_PY_SPIFFE_PARSE = """
import sys
from pathlib import Path
from spiffe.svid.x509_svid import X509Svid
from spiffe.bundle.x509_bundle.x509_bundle import X509Bundle
from spiffe.spiffe_id.spiffe_id import TrustDomain
svid = X509Svid.parse_raw(Path(sys.argv[1]).read_bytes(), Path(sys.argv[2]).read_bytes())
bundle = X509Bundle.parse_raw(TrustDomain("example.org"), Path(sys.argv[3]).read_bytes())
print(svid.spiffe_id, len(bundle.x509_authorities))
"""


def _py_spiffe_parse(tmp_path: Path, chain: bytes, key: ec.EllipticCurvePrivateKey, bundle: X509Bundle) -> str:
    chain_path, key_path, bundle_path = tmp_path / "chain.der", tmp_path / "key.der", tmp_path / "bundle.der"
    chain_path.write_bytes(chain)
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    bundle_path.write_bytes(bundle.der())
    # A subprocess: py-spiffe's protobuf stubs must never share a process with vouchd's (FACTS.md).
    result = subprocess.run(
        [sys.executable, "-c", _PY_SPIFFE_PARSE, str(chain_path), str(key_path), str(bundle_path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        raise AssertionError(result.stderr.strip().splitlines()[-1])
    return result.stdout.strip()


@pytest.mark.interop
def test_py_spiffe_accepts_the_minted_svid_and_bundle(
    tmp_path: Path, ca: Ca, svid: x509.Certificate, workload_key: ec.EllipticCurvePrivateKey
) -> None:
    bundle = X509Bundle(TD, (ca.cert, make_ca().cert))

    output = _py_spiffe_parse(tmp_path, svid.public_bytes(serialization.Encoding.DER), workload_key, bundle)

    assert output == f"{WORKLOAD} 2"


@pytest.mark.interop
def test_py_spiffe_check_can_fail(tmp_path: Path, ca: Ca, workload_key: ec.EllipticCurvePrivateKey) -> None:
    # Guards the test above: the subprocess really does judge the leaf.
    bad = build_leaf(ca, basic_constraints=x509.BasicConstraints(ca=True, path_length=None), key_usage=LEAF_KU)

    with pytest.raises(AssertionError, match=re.escape("CA flag")):
        _py_spiffe_parse(
            tmp_path, bad.public_bytes(serialization.Encoding.DER), workload_key, X509Bundle(TD, (ca.cert,))
        )


@pytest.mark.parametrize(
    ("serial", "printed"), [(0x0A, "0a"), (0xABC, "0abc"), (0xABCD, "abcd"), (1 << 120, "01" + "00" * 15)]
)
def test_serial_hex_prints_whole_bytes_as_openssl_does(serial: int, printed: str) -> None:
    from vouchd.spiffe import serial_hex

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "serial")])
    now = datetime.now(UTC)
    certificate = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                   .serial_number(serial).not_valid_before(now).not_valid_after(now + timedelta(minutes=1))
                   .sign(key, hashes.SHA256()))
    assert serial_hex(certificate) == printed
