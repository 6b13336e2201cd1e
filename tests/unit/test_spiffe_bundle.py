"""X.509 bundles: the DER and PEM forms, and what parsing refuses."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vouchd.spiffe import InvalidBundleError, SpiffeError, TrustDomain, X509Bundle

NOW = datetime(2026, 3, 1, tzinfo=UTC)
TD = TrustDomain("example.org")


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def certificate(name: str, *, ca: bool = True, padding: int = 0) -> x509.Certificate:
    """A self-signed certificate; `padding` grows it past 127 and 65535 bytes to exercise DER lengths."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(NOW)
        .not_valid_after(NOW + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if padding:
        builder = builder.add_extension(
            x509.UnrecognizedExtension(x509.ObjectIdentifier("1.3.6.1.4.1.99999.1"), b"\x04\x00" * padding),
            critical=False,
        )
    return builder.sign(key, hashes.SHA256())


@pytest.fixture(scope="module")
def roots() -> tuple[x509.Certificate, ...]:
    return (certificate("root a"), certificate("root b"), certificate("big root", padding=40_000))


def test_der_is_the_concatenation_of_the_certificates(roots: tuple[x509.Certificate, ...]) -> None:
    bundle = X509Bundle(TD, roots)

    assert bundle.der() == b"".join(c.public_bytes(serialization.Encoding.DER) for c in roots)


def test_der_and_pem_round_trip_in_order(roots: tuple[x509.Certificate, ...]) -> None:
    bundle = X509Bundle(TD, roots)

    assert X509Bundle.from_der(TD, bundle.der()) == bundle
    assert X509Bundle.from_pem(TD, bundle.pem()) == bundle
    assert X509Bundle.from_der(TD, bundle.der()).authorities == roots


def test_bundle_keeps_its_trust_domain() -> None:
    other = TrustDomain("other.org")
    root = certificate("root")

    assert X509Bundle.from_pem(other, X509Bundle(TD, (root,)).pem()).trust_domain == other
    assert X509Bundle(TD, (root,)) != X509Bundle(other, (root,))


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "x509 bundle for example.org: no certificates"),
        (b"\x04\x03abc", "x509 bundle for example.org: truncated or malformed der at byte 0"),
        (b"\x30\x05abc", "x509 bundle for example.org: truncated or malformed der at byte 0"),
        (b"\x30\x80\x00\x00", "x509 bundle for example.org: truncated or malformed der at byte 0"),
        (b"\x30\x03abc", "x509 bundle for example.org: certificate 0 is not valid der"),
    ],
)
def test_from_der_refuses_malformed_input(data: bytes, message: str) -> None:
    with pytest.raises(InvalidBundleError, match=exactly(message)):
        X509Bundle.from_der(TD, data)


def test_from_der_names_where_a_truncated_tail_starts() -> None:
    der = certificate("root").public_bytes(serialization.Encoding.DER)

    with pytest.raises(
        InvalidBundleError,
        match=exactly(f"x509 bundle for example.org: truncated or malformed der at byte {len(der)}"),
    ):
        X509Bundle.from_der(TD, der + der[:10])


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "x509 bundle for example.org: no certificates"),
        (b"not pem at all", "x509 bundle for example.org: not a sequence of pem certificates"),
        (b"\x00" * ((1 << 20) + 1), "x509 bundle for example.org: larger than 1048576 bytes"),
    ],
)
def test_from_pem_refuses_malformed_input(data: bytes, message: str) -> None:
    with pytest.raises(InvalidBundleError, match=exactly(message)):
        X509Bundle.from_pem(TD, data)


def test_a_bundle_holds_only_ca_certificates() -> None:
    leaf = certificate("leaf", ca=False)

    with pytest.raises(
        InvalidBundleError, match=exactly("x509 bundle for example.org: authority 1 is not a ca certificate")
    ):
        X509Bundle(TD, (certificate("root"), leaf))
    with pytest.raises(SpiffeError):
        X509Bundle.from_pem(TD, leaf.public_bytes(serialization.Encoding.PEM))
