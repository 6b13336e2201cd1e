"""The trust domain CA: files on disk, reload, three-phase rotation, crash repair and signing SVIDs."""

from __future__ import annotations

import re
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vouchd.authority.ca import CertificateAuthority
from vouchd.authority.errors import AuthorityError, CaError
from vouchd.spiffe import InvalidSvidError, TrustDomain, TrustTier, X509Bundle, read_tier, verify_x509_svid

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
    assert sorted(p.name for p in ca_dir.iterdir()) == ["lock", "root.crt", "root.key"]


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


# --- rotation: prepared -> active -> previous -----------------------------------------------------

HALF_LIFE = NOW + TTL / 2
THREE_QUARTERS = NOW + TTL * 3 / 4
SECOND = timedelta(seconds=1)


def on_disk(state_dir: Path, name: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate((state_dir / "ca" / f"{name}.crt").read_bytes())


def files_of(state_dir: Path, name: str) -> list[Path]:
    return [p for p in (state_dir / "ca" / f"{name}.key", state_dir / "ca" / f"{name}.crt") if p.exists()]


def generation(certificate: x509.Certificate) -> str:
    return str(certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value)


def test_nothing_changes_while_half_the_lifetime_remains(tmp_path: Path) -> None:
    first = load(tmp_path)

    at_half = load(tmp_path, HALF_LIFE)

    assert at_half.certificate == first.certificate
    assert at_half.prepared is None
    assert at_half.bundle(HALF_LIFE).authorities == (first.certificate,)
    assert files_of(tmp_path, "next") == []
    assert files_of(tmp_path, "previous") == []


def test_past_half_life_a_prepared_root_is_published_but_does_not_sign(tmp_path: Path) -> None:
    first = load(tmp_path)
    later = HALF_LIFE + SECOND

    ca = load(tmp_path, later)

    prepared = ca.prepared
    assert prepared is not None
    assert ca.certificate == first.certificate
    assert generation(prepared) == "vouchd example.org root 2"
    assert prepared.not_valid_after_utc == later + TTL
    assert prepared.not_valid_before_utc <= later
    assert ca.bundle(later).authorities == (first.certificate, prepared)
    assert on_disk(tmp_path, "next") == prepared
    assert mode(tmp_path / "ca" / "next.key") == 0o600
    assert files_of(tmp_path, "previous") == []
    # Signing stays with the active root: an agent holding only the old bundle accepts the SVID.
    svid = sign(ca, later)
    assert svid.issuer == first.certificate.subject
    assert verify_x509_svid([svid], first.bundle(later), now=later) == WORKLOAD


def test_a_reload_keeps_the_prepared_root_instead_of_preparing_another(tmp_path: Path) -> None:
    load(tmp_path)
    prepared = load(tmp_path, HALF_LIFE + SECOND).prepared

    reloaded = load(tmp_path, HALF_LIFE + timedelta(days=1))

    assert prepared is not None
    assert reloaded.prepared == prepared
    assert reloaded.bundle(HALF_LIFE + timedelta(days=1)).authorities == (reloaded.certificate, prepared)


def test_concurrent_loads_past_half_life_agree_on_one_prepared_root(tmp_path: Path) -> None:
    load(tmp_path)
    barrier = threading.Barrier(8)

    def start() -> x509.Certificate | None:
        barrier.wait()
        return load(tmp_path, HALF_LIFE + SECOND).prepared

    with ThreadPoolExecutor(max_workers=8) as pool:
        prepared = list(pool.map(lambda _: start(), range(8)))

    assert prepared[0] is not None
    assert all(root == prepared[0] for root in prepared)
    assert on_disk(tmp_path, "next") == prepared[0]


def plant_prepared_root(state_dir: Path, created: datetime) -> x509.Certificate:
    """Puts a root created at `created` in next.*, as if it had been prepared then."""
    scratch = state_dir / f"scratch-{created.timestamp():.0f}"
    certificate = load(scratch, created).certificate
    for suffix in ("key", "crt"):
        (state_dir / "ca" / f"next.{suffix}").write_bytes((scratch / "ca" / f"root.{suffix}").read_bytes())
    (state_dir / "ca" / "next.key").chmod(0o600)
    return certificate


@pytest.mark.parametrize(
    ("at", "promoted"), [(THREE_QUARTERS, False), (THREE_QUARTERS + SECOND, True)], ids=["at", "just-past"]
)
def test_promotion_starts_once_less_than_a_quarter_of_the_lifetime_remains(
    tmp_path: Path, at: datetime, promoted: bool
) -> None:
    first = load(tmp_path)
    # Published for more than a quarter (so only the active root's remaining lifetime decides) and
    # young enough not to need a successor of its own right after promotion.
    prepared = plant_prepared_root(tmp_path, NOW + TTL / 3)

    ca = load(tmp_path, at)

    assert ca.certificate == (prepared if promoted else first.certificate)
    assert ca.prepared == (None if promoted else prepared)
    assert files_of(tmp_path, "previous") == (
        [tmp_path / "ca" / "previous.key", tmp_path / "ca" / "previous.crt"] if promoted else []
    )


def test_in_the_normal_course_no_promotion_at_three_quarters(tmp_path: Path) -> None:
    first = load(tmp_path)
    prepared = load(tmp_path, HALF_LIFE + SECOND).prepared

    at_three_quarters = load(tmp_path, THREE_QUARTERS)

    assert at_three_quarters.certificate == first.certificate
    assert at_three_quarters.prepared == prepared
    assert files_of(tmp_path, "previous") == []


def test_past_three_quarters_the_prepared_root_becomes_active_and_the_old_one_previous(tmp_path: Path) -> None:
    first = load(tmp_path)
    old_svid = sign(first, THREE_QUARTERS)
    prepared = load(tmp_path, HALF_LIFE + SECOND).prepared
    later = THREE_QUARTERS + SECOND

    promoted = load(tmp_path, later)

    assert prepared is not None
    assert promoted.certificate == prepared
    assert promoted.prepared is None
    assert promoted.bundle(later).authorities == (prepared, first.certificate)
    assert on_disk(tmp_path, "root") == prepared
    assert on_disk(tmp_path, "previous") == first.certificate
    assert mode(tmp_path / "ca" / "previous.key") == 0o600
    assert files_of(tmp_path, "next") == []
    # SVIDs signed before the promotion keep verifying; new ones come from the new active root.
    assert verify_x509_svid([old_svid], promoted.bundle(later), now=later) == WORKLOAD
    new_svid = sign(promoted, later)
    assert new_svid.issuer == prepared.subject
    assert verify_x509_svid([new_svid], promoted.bundle(later), now=later) == WORKLOAD
    with pytest.raises(InvalidSvidError):
        verify_x509_svid([new_svid], X509Bundle(TD, (first.certificate,)), now=later)


def test_the_previous_root_leaves_the_bundle_and_the_disk_when_it_expires(tmp_path: Path) -> None:
    first = load(tmp_path)
    load(tmp_path, HALF_LIFE + SECOND)
    promoted = load(tmp_path, THREE_QUARTERS + SECOND)
    expiry = first.certificate.not_valid_after_utc

    assert promoted.bundle(expiry - SECOND).authorities == (promoted.certificate, first.certificate)
    assert promoted.bundle(expiry).authorities == (promoted.certificate,)
    reloaded = load(tmp_path, expiry)
    assert reloaded.bundle(expiry).authorities == (promoted.certificate,)
    assert files_of(tmp_path, "previous") == []


def test_an_expired_root_without_a_prepared_root_is_replaced_directly(tmp_path: Path) -> None:
    first = load(tmp_path)
    much_later = NOW + TTL + timedelta(days=1)

    replaced = load(tmp_path, much_later)

    assert replaced.certificate != first.certificate
    assert generation(replaced.certificate) == "vouchd example.org root 2"
    assert replaced.certificate.not_valid_after_utc == much_later + TTL
    assert replaced.prepared is None
    assert replaced.bundle(much_later).authorities == (replaced.certificate,)
    assert files_of(tmp_path, "previous") == []
    assert files_of(tmp_path, "next") == []
    assert verify_x509_svid([sign(replaced, much_later)], replaced.bundle(much_later), now=much_later) == WORKLOAD


def test_an_expired_root_with_a_prepared_root_is_replaced_by_the_prepared_one(tmp_path: Path) -> None:
    first = load(tmp_path)
    prepared = load(tmp_path, HALF_LIFE + SECOND).prepared
    expiry = first.certificate.not_valid_after_utc

    replaced = load(tmp_path, expiry)

    assert replaced.certificate == prepared
    assert replaced.prepared is None
    assert replaced.bundle(expiry).authorities == (prepared,)
    assert files_of(tmp_path, "previous") == []


def test_an_expired_prepared_root_is_discarded_not_promoted(tmp_path: Path) -> None:
    load(tmp_path)
    prepared = load(tmp_path, HALF_LIFE + SECOND).prepared
    assert prepared is not None
    after_both_expired = prepared.not_valid_after_utc

    replaced = load(tmp_path, after_both_expired)

    assert replaced.certificate != prepared
    assert generation(replaced.certificate) == "vouchd example.org root 3"
    assert replaced.prepared is None
    assert replaced.bundle(after_both_expired).authorities == (replaced.certificate,)


def test_a_root_prepared_late_is_published_for_a_quarter_of_the_lifetime_before_it_signs(tmp_path: Path) -> None:
    # The authority was down across the half-life: at restart the active root has already less than
    # a quarter left, so promoting at once would sign under a root that no agent holds yet.
    first = load(tmp_path)
    restart = NOW + TTL * 5 / 8
    prepared = load(tmp_path, restart).prepared
    assert prepared is not None

    just_before = load(tmp_path, restart + TTL / 4 - SECOND)
    promoted = load(tmp_path, restart + TTL / 4)

    assert just_before.certificate == first.certificate
    assert just_before.prepared == prepared
    assert promoted.certificate == prepared
    assert promoted.bundle(restart + TTL / 4).authorities == (prepared, first.certificate)


def test_a_root_prepared_late_is_promoted_when_the_active_root_expires(tmp_path: Path) -> None:
    first = load(tmp_path)
    restart = NOW + TTL * 15 / 16
    prepared = load(tmp_path, restart).prepared
    expiry = first.certificate.not_valid_after_utc

    before_expiry = load(tmp_path, expiry - SECOND)
    at_expiry = load(tmp_path, expiry)

    assert before_expiry.certificate == first.certificate
    assert at_expiry.certificate == prepared
    assert at_expiry.bundle(expiry).authorities == (prepared,)
    assert files_of(tmp_path, "previous") == []


def test_agents_that_sync_every_quarter_lifetime_always_hold_the_signing_root(tmp_path: Path) -> None:
    # The authority reloads every 12 hours, an agent syncs a little less often than every TTL/4,
    # through several rotations: whatever signs must already be in the bundle the agent holds.
    authority_check, agent_sync = timedelta(hours=12), timedelta(days=7)
    held = load(tmp_path).bundle(NOW).authorities
    last_sync = NOW
    signers: set[x509.Certificate] = set()
    now = NOW
    while now < NOW + TTL * 4:
        now += authority_check
        ca = load(tmp_path, now)
        assert ca.certificate in held, f"signing root unknown to the agent at {now}"
        assert len(ca.bundle(now).authorities) <= 2
        signers.add(ca.certificate)
        if now - last_sync >= agent_sync:
            held, last_sync = ca.bundle(now).authorities, now

    assert len(signers) >= 6


def test_bundle_orders_active_then_prepared_then_previous_and_drops_expired_roots(tmp_path: Path) -> None:
    active_root = load(tmp_path / "active")
    prepared = load(tmp_path / "prepared", NOW + timedelta(days=1)).certificate
    previous = load(tmp_path / "previous", NOW - timedelta(days=1)).certificate
    active_key = serialization.load_pem_private_key((tmp_path / "active" / "ca" / "root.key").read_bytes(), None)
    assert isinstance(active_key, ec.EllipticCurvePrivateKey)

    ca = CertificateAuthority(TD, active_key, active_root.certificate, previous=[previous], prepared=prepared)

    assert ca.prepared == prepared
    assert ca.bundle(NOW).authorities == (active_root.certificate, prepared, previous)
    assert ca.bundle(previous.not_valid_after_utc).authorities == (active_root.certificate, prepared)
    assert ca.bundle(active_root.certificate.not_valid_after_utc).authorities == (prepared,)


def test_a_corrupt_prepared_key_file_is_named(tmp_path: Path) -> None:
    load(tmp_path)
    load(tmp_path, HALF_LIFE + SECOND)
    key_file = tmp_path / "ca" / "next.key"
    key_file.write_bytes(b"garbage")

    with pytest.raises(CaError, match=exactly(f"ca key file {key_file} does not hold an unencrypted pem private key")):
        load(tmp_path, HALF_LIFE + timedelta(days=1))


# --- repairing what a crash left half done ---------------------------------------------------------


def copy_root(state_dir: Path, source: str, target: str, *, halves: tuple[str, ...] = ("key", "crt")) -> None:
    for suffix in halves:
        target_file = state_dir / "ca" / f"{target}.{suffix}"
        target_file.write_bytes((state_dir / "ca" / f"{source}.{suffix}").read_bytes())
        target_file.chmod(0o600 if suffix == "key" else 0o644)


def prepared_state(state_dir: Path) -> tuple[x509.Certificate, x509.Certificate]:
    """Active root 1 and prepared root 2 on disk, as they are between half-life and promotion."""
    first = load(state_dir).certificate
    prepared = load(state_dir, HALF_LIFE + SECOND).prepared
    assert prepared is not None
    return first, prepared


def assert_promoted(
    state_dir: Path, ca: CertificateAuthority, first: x509.Certificate, prepared: x509.Certificate
) -> None:
    assert ca.certificate == prepared
    assert ca.prepared is None
    assert on_disk(state_dir, "root") == prepared
    assert on_disk(state_dir, "previous") == first
    assert files_of(state_dir, "next") == []
    assert not any(p.name.endswith(".tmp") for p in (state_dir / "ca").iterdir())


def test_a_crash_after_writing_root_from_next_is_completed_by_dropping_next(tmp_path: Path) -> None:
    first, prepared = prepared_state(tmp_path)
    copy_root(tmp_path, "root", "previous")
    copy_root(tmp_path, "next", "root")

    # Still before three quarters: the promotion is completed, not undone.
    ca = load(tmp_path, HALF_LIFE + timedelta(days=2))

    assert_promoted(tmp_path, ca, first, prepared)
    assert ca.bundle(HALF_LIFE + timedelta(days=2)).authorities == (prepared, first)


def test_a_crash_between_the_key_and_the_certificate_of_root_is_completed(tmp_path: Path) -> None:
    first, prepared = prepared_state(tmp_path)
    copy_root(tmp_path, "root", "previous")
    copy_root(tmp_path, "next", "root", halves=("key",))

    ca = load(tmp_path, HALF_LIFE + timedelta(days=2))

    assert_promoted(tmp_path, ca, first, prepared)
    later = HALF_LIFE + timedelta(days=2)
    assert verify_x509_svid([sign(ca, later)], ca.bundle(later), now=later) == WORKLOAD


def test_a_crash_while_removing_next_is_completed(tmp_path: Path) -> None:
    first, prepared = prepared_state(tmp_path)
    copy_root(tmp_path, "root", "previous")
    copy_root(tmp_path, "next", "root")
    (tmp_path / "ca" / "next.key").unlink()

    ca = load(tmp_path, HALF_LIFE + timedelta(days=2))

    assert_promoted(tmp_path, ca, first, prepared)


@pytest.mark.parametrize("previous_halves", [("key",), ("key", "crt")], ids=["key-only", "both"])
def test_a_crash_while_writing_previous_redoes_the_promotion(tmp_path: Path, previous_halves: tuple[str, ...]) -> None:
    first, prepared = prepared_state(tmp_path)
    copy_root(tmp_path, "root", "previous", halves=previous_halves)

    ca = load(tmp_path, THREE_QUARTERS + SECOND)

    assert_promoted(tmp_path, ca, first, prepared)


def test_a_crash_while_writing_previous_before_promotion_is_due_leaves_no_duplicate(tmp_path: Path) -> None:
    first, prepared = prepared_state(tmp_path)
    copy_root(tmp_path, "root", "previous")

    ca = load(tmp_path, HALF_LIFE + timedelta(days=2))

    assert ca.certificate == first
    assert ca.bundle(HALF_LIFE + timedelta(days=2)).authorities == (first, prepared)
    assert files_of(tmp_path, "previous") == []


def test_a_crash_while_writing_next_discards_the_half_written_root(tmp_path: Path) -> None:
    first, prepared = prepared_state(tmp_path)
    (tmp_path / "ca" / "next.crt").unlink()

    ca = load(tmp_path, HALF_LIFE + timedelta(days=1))

    assert ca.certificate == first
    assert ca.prepared is not None
    assert ca.prepared != prepared
    assert on_disk(tmp_path, "next") == ca.prepared


def test_a_crash_while_removing_previous_drops_its_certificate(tmp_path: Path) -> None:
    first = load(tmp_path)
    load(tmp_path, HALF_LIFE + SECOND)
    promoted = load(tmp_path, THREE_QUARTERS + SECOND)
    (tmp_path / "ca" / "previous.key").unlink()

    ca = load(tmp_path, THREE_QUARTERS + timedelta(days=1))

    assert ca.bundle(THREE_QUARTERS + timedelta(days=1)).authorities == (promoted.certificate,)
    assert first.certificate not in ca.bundle(NOW).authorities
    assert files_of(tmp_path, "previous") == []


def test_a_lone_previous_key_that_is_not_the_active_key_is_refused_not_deleted(tmp_path: Path) -> None:
    load(tmp_path / "other")
    load(tmp_path)
    key_file = tmp_path / "ca" / "previous.key"
    key_file.write_bytes((tmp_path / "other" / "ca" / "root.key").read_bytes())
    key_file.chmod(0o600)

    with pytest.raises(
        CaError,
        match=exactly(f"ca certificate file {key_file.with_suffix('.crt')} is missing but key file {key_file} exists"),
    ):
        load(tmp_path)
    assert key_file.exists()


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
