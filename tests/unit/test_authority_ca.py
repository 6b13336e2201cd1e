"""The trust domain CA: files on disk, reload, rotation at half-life, and signing SVIDs."""

from __future__ import annotations

import re
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vouchd.authority.ca import CertificateAuthority
from vouchd.authority.errors import AuthorityError, CaError
from vouchd.spiffe import TrustDomain, TrustTier, read_tier, verify_x509_svid

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
TTL = timedelta(days=30)
TD = TrustDomain("example.org")
WORKLOAD = TD.spiffe_id("/workload/web")


def exactly(message: str) -> str:
    return f"^{re.escape(message)}$"


def load(state_dir: Path, now: datetime = NOW, td: TrustDomain = TD) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(state_dir, td, ca_ttl=TTL, now=now)


def sign(ca: CertificateAuthority, now: datetime = NOW) -> x509.Certificate:
    key = ec.generate_private_key(ec.SECP256R1())
    return ca.sign_x509_svid(key.public_key(), WORKLOAD, ttl=timedelta(hours=1), tier=TrustTier.HARDWARE, now=now)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# --- creation and files -------------------------------------------------------------------------


def test_first_start_creates_a_private_key_file_and_a_certificate(tmp_path: Path) -> None:
    load(tmp_path)
    ca_dir = tmp_path / "ca"

    assert mode(ca_dir) == 0o700
    assert mode(ca_dir / "root.key") == 0o600
    assert (ca_dir / "root.key").read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----\n")
    assert (ca_dir / "root.crt").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----\n")
    assert not any(p.name.endswith(".tmp") for p in ca_dir.iterdir())
    assert not (ca_dir / "previous.key").exists()


def test_the_root_is_a_self_signed_p256_ca_of_the_trust_domain(tmp_path: Path) -> None:
    root = load(tmp_path).certificate

    constraints = root.extensions.get_extension_for_class(x509.BasicConstraints)
    usage = root.extensions.get_extension_for_class(x509.KeyUsage)
    san = root.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert constraints.critical and constraints.value.ca and constraints.value.path_length is None
    assert usage.critical and usage.value.key_cert_sign and usage.value.crl_sign
    assert not usage.value.digital_signature
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://example.org"]
    assert root.subject == x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "vouchd"),
            x509.NameAttribute(NameOID.COMMON_NAME, "vouchd example.org root 1"),
        ]
    )
    root.verify_directly_issued_by(root)
    public_key = root.public_key()
    assert isinstance(public_key, ec.EllipticCurvePublicKey)
    assert isinstance(public_key.curve, ec.SECP256R1)
    assert root.not_valid_after_utc == NOW + TTL
    assert root.not_valid_before_utc <= NOW


def test_a_long_trust_domain_still_gets_a_valid_common_name(tmp_path: Path) -> None:
    long_td = TrustDomain("a" * 70 + ".example.org")

    root = load(tmp_path, td=long_td).certificate

    assert root.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "vouchd root 1"


def test_second_start_loads_the_same_root_and_key(tmp_path: Path) -> None:
    first = load(tmp_path)
    second = load(tmp_path, NOW + timedelta(days=1))

    assert second.certificate == first.certificate
    # Same key: an SVID from the reloaded CA verifies against the first instance's bundle.
    svid = sign(second, NOW + timedelta(days=1))
    assert verify_x509_svid([svid], first.bundle(NOW), now=NOW + timedelta(days=1)) == WORKLOAD


def test_an_existing_directory_is_narrowed_to_0700(tmp_path: Path) -> None:
    (tmp_path / "ca").mkdir(mode=0o755)
    (tmp_path / "ca").chmod(0o755)

    load(tmp_path)

    assert mode(tmp_path / "ca") == 0o700


def test_concurrent_first_starts_agree_on_one_root(tmp_path: Path) -> None:
    barrier = threading.Barrier(8)

    def start() -> x509.Certificate:
        barrier.wait()
        return load(tmp_path).certificate

    with ThreadPoolExecutor(max_workers=8) as pool:
        roots = list(pool.map(lambda _: start(), range(8)))

    assert all(root == roots[0] for root in roots)
    assert load(tmp_path).certificate == roots[0]


# --- refusing bad state -------------------------------------------------------------------------


def test_a_corrupt_key_file_is_named_and_its_content_never_shown(tmp_path: Path) -> None:
    load(tmp_path)
    key_file = tmp_path / "ca" / "root.key"
    key_file.write_bytes(b"-----BEGIN PRIVATE KEY-----\nc2VjcmV0LXNlY3JldA==\n-----END PRIVATE KEY-----\n")

    with pytest.raises(CaError) as caught:
        load(tmp_path)

    assert str(caught.value) == f"ca key file {key_file} does not hold an unencrypted pem private key"
    assert caught.value.__cause__ is None
    assert caught.value.__suppress_context__


def test_a_key_file_open_to_others_is_refused(tmp_path: Path) -> None:
    load(tmp_path)
    key_file = tmp_path / "ca" / "root.key"
    key_file.chmod(0o640)

    with pytest.raises(
        CaError, match=exactly(f"ca key file {key_file} is accessible to group or others (mode 0640), want 0600")
    ):
        load(tmp_path)


def test_a_symlinked_key_file_is_refused(tmp_path: Path) -> None:
    load(tmp_path)
    key_file = tmp_path / "ca" / "root.key"
    elsewhere = tmp_path / "elsewhere.key"
    key_file.rename(elsewhere)
    key_file.symlink_to(elsewhere)

    with pytest.raises(CaError, match=f"^{re.escape(f'ca key file {key_file} cannot be read: ')}"):
        load(tmp_path)


def test_a_key_that_does_not_match_the_certificate_is_refused(tmp_path: Path) -> None:
    load(tmp_path / "one")
    load(tmp_path / "two")
    key_file = tmp_path / "one" / "ca" / "root.key"
    key_file.write_bytes((tmp_path / "two" / "ca" / "root.key").read_bytes())

    with pytest.raises(
        CaError, match=exactly(f"ca key file {key_file} does not match certificate file {key_file.with_suffix('.crt')}")
    ):
        load(tmp_path / "one")


def test_a_root_of_another_trust_domain_is_refused(tmp_path: Path) -> None:
    load(tmp_path)
    cert_file = tmp_path / "ca" / "root.crt"

    with pytest.raises(CaError) as caught:
        load(tmp_path, td=TrustDomain("other.org"))

    assert str(caught.value) == (
        f"ca certificate file {cert_file} is not a root of trust domain other.org: its uri san is not spiffe://other.org"
    )


def test_a_corrupt_certificate_file_is_named(tmp_path: Path) -> None:
    load(tmp_path)
    cert_file = tmp_path / "ca" / "root.crt"
    cert_file.write_bytes(b"not a certificate")

    with pytest.raises(CaError, match=exactly(f"ca certificate file {cert_file} is not a pem certificate")):
        load(tmp_path)


def test_a_key_without_its_certificate_is_refused_not_replaced(tmp_path: Path) -> None:
    load(tmp_path)
    key_file, cert_file = tmp_path / "ca" / "root.key", tmp_path / "ca" / "root.crt"
    key_before = key_file.read_bytes()
    cert_file.unlink()

    with pytest.raises(
        CaError, match=exactly(f"ca certificate file {cert_file} is missing but key file {key_file} exists")
    ):
        load(tmp_path)
    assert key_file.read_bytes() == key_before


def test_a_ttl_that_is_not_positive_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CaError, match=exactly("ca ttl must be positive")):
        CertificateAuthority.load_or_create(tmp_path, TD, ca_ttl=timedelta(0), now=NOW)


def test_ca_errors_are_authority_errors() -> None:
    assert issubclass(CaError, AuthorityError)


# --- rotation -----------------------------------------------------------------------------------


def test_no_rotation_while_half_the_lifetime_remains(tmp_path: Path) -> None:
    first = load(tmp_path)

    at_half = load(tmp_path, NOW + TTL / 2)

    assert at_half.certificate == first.certificate
    assert not (tmp_path / "ca" / "previous.crt").exists()


def test_rotation_past_half_life_creates_a_new_root_and_keeps_the_old_in_the_bundle(tmp_path: Path) -> None:
    first = load(tmp_path)
    old_svid = sign(first)
    later = NOW + TTL / 2 + timedelta(seconds=1)

    rotated = load(tmp_path, later)

    assert rotated.certificate != first.certificate
    assert rotated.certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == (
        "vouchd example.org root 2"
    )
    assert rotated.bundle(later).authorities == (rotated.certificate, first.certificate)
    assert mode(tmp_path / "ca" / "previous.key") == 0o600
    assert x509.load_pem_x509_certificate((tmp_path / "ca" / "previous.crt").read_bytes()) == first.certificate
    # SVIDs from the old root keep verifying, new ones come from the new root.
    assert verify_x509_svid([old_svid], rotated.bundle(later), now=NOW + timedelta(minutes=30)) == WORKLOAD
    new_svid = sign(rotated, later)
    assert new_svid.issuer == rotated.certificate.subject
    assert verify_x509_svid([new_svid], rotated.bundle(later), now=later) == WORKLOAD


def test_rotation_happens_once_and_survives_a_reload(tmp_path: Path) -> None:
    load(tmp_path)
    later = NOW + TTL / 2 + timedelta(hours=1)
    rotated = load(tmp_path, later)

    reloaded = load(tmp_path, later + timedelta(minutes=1))

    assert reloaded.certificate == rotated.certificate
    assert reloaded.bundle(later) == rotated.bundle(later)


def test_the_previous_root_leaves_the_bundle_when_it_expires(tmp_path: Path) -> None:
    first = load(tmp_path)
    rotated = load(tmp_path, NOW + TTL / 2 + timedelta(days=1))

    after_old_expiry = first.certificate.not_valid_after_utc + timedelta(seconds=1)

    assert rotated.bundle(after_old_expiry).authorities == (rotated.certificate,)
    assert load(tmp_path, after_old_expiry).bundle(after_old_expiry).authorities == (rotated.certificate,)


def test_an_expired_root_is_replaced_and_not_kept(tmp_path: Path) -> None:
    first = load(tmp_path)
    much_later = NOW + TTL + timedelta(days=1)

    replaced = load(tmp_path, much_later)

    assert replaced.certificate != first.certificate
    assert replaced.bundle(much_later).authorities == (replaced.certificate,)
    assert not (tmp_path / "ca" / "previous.key").exists()
    assert not (tmp_path / "ca" / "previous.crt").exists()


# --- signing ------------------------------------------------------------------------------------


def test_signed_svid_verifies_against_the_bundle_and_carries_the_tier(tmp_path: Path) -> None:
    ca = load(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())

    svid = ca.sign_x509_svid(
        key.public_key(), WORKLOAD, ttl=timedelta(hours=1), tier=TrustTier.STATIC_SECRET, dns_names=["web"], now=NOW
    )

    assert verify_x509_svid([svid], ca.bundle(NOW), now=NOW) == WORKLOAD
    assert read_tier(svid) is TrustTier.STATIC_SECRET
    assert svid.not_valid_after_utc == NOW + timedelta(hours=1)


def test_signing_refuses_an_id_outside_the_trust_domain(tmp_path: Path) -> None:
    ca = load(tmp_path)
    key = ec.generate_private_key(ec.SECP256R1())
    foreign = TrustDomain("other.org").spiffe_id("/web")

    with pytest.raises(CaError, match=exactly("spiffe id spiffe://other.org/web is outside trust domain example.org")):
        ca.sign_x509_svid(key.public_key(), foreign, ttl=timedelta(hours=1), tier=TrustTier.HARDWARE, now=NOW)


def test_repr_names_the_trust_domain_and_never_the_key(tmp_path: Path) -> None:
    ca = load(tmp_path)

    text = repr(ca)

    assert text == f"CertificateAuthority(trust_domain='example.org', root_serial={ca.certificate.serial_number:#x})"
    assert "PRIVATE" not in text
