"""The trust domain's certificate authority: self-signed roots kept on disk, rotated with overlap.

Files under `<state_dir>/ca/` (directory 0700), each root a `.key` (PEM PKCS#8, 0600) and `.crt`:

- `root.*`: the active root, the only one that signs;
- `next.*`: the prepared root, published in the bundle but never signing, so that agents (which
  learn new roots only from replies they verify against the bundle they already hold) have it
  before anything is signed under it;
- `previous.*`: the root the active one replaced, published until it expires so that SVIDs it
  signed shortly before the promotion keep verifying.

Rotation, with T = ca_ttl: once the active root has less than T/2 left a prepared root is created
(valid for T from then); once the active root has less than T/4 left and the prepared root has been
published for at least T/4, the prepared root is promoted (active -> previous, prepared -> active).
Agents that sync at least once per T/4 thus always hold a root before it signs. An active root that
has expired is replaced at once, by the prepared root if there is one, else by a new root: after a
long outage no overlap is possible.

Every file is written to a temporary, fsynced and renamed into place, and each rotation is a
sequence of such renames in an order chosen so that a crash at any point leaves a state the next
load_or_create repairs or completes (see _repair_interrupted_steps).
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import fcntl
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import assert_never

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vouchd.authority.errors import CaError
from vouchd.securefiles import InsecureFileError, fsync_directory, read_private, write_together
from vouchd.spiffe import (
    CLOCK_SKEW,
    SpiffeId,
    TrustDomain,
    TrustTier,
    X509Bundle,
    mint_x509_svid,
    spki_der,
    utc_time,
)

__all__ = ["CertificateAuthority", "stored_root_certificates"]

_CA_DIR_NAME = "ca"
_ACTIVE_NAME = "root"
_PREPARED_NAME = "next"
_PREVIOUS_NAME = "previous"
_LOCK_NAME = "lock"
_DIR_MODE = 0o700
_KEY_MODE = 0o600
_CERT_MODE = 0o644
_ORGANIZATION = "vouchd"
# X.520 caps a commonName at 64 characters; a long trust domain is still named in the URI SAN.
_MAX_COMMON_NAME = 64
_GENERATION = re.compile(r" root (\d+)$")


@dataclass(frozen=True, slots=True)
class _Root:
    key: ec.EllipticCurvePrivateKey = field(repr=False)
    certificate: x509.Certificate


@dataclass(frozen=True, slots=True)
class _RootFiles:
    key: Path
    certificate: Path

    @classmethod
    def named(cls, ca_dir: Path, name: str) -> _RootFiles:
        return cls(ca_dir / f"{name}.key", ca_dir / f"{name}.crt")


@dataclass(frozen=True, slots=True)
class _Layout:
    active: _RootFiles
    prepared: _RootFiles
    previous: _RootFiles

    @classmethod
    def of(cls, ca_dir: Path) -> _Layout:
        return cls(
            _RootFiles.named(ca_dir, _ACTIVE_NAME),
            _RootFiles.named(ca_dir, _PREPARED_NAME),
            _RootFiles.named(ca_dir, _PREVIOUS_NAME),
        )


@dataclass(frozen=True, slots=True)
class _StoredHalves:
    """What one root's files hold, before checking they form a root: a crash may leave one half."""

    key: ec.EllipticCurvePrivateKey | None = field(repr=False)
    certificate: x509.Certificate | None

    @property
    def is_empty(self) -> bool:
        return self.key is None and self.certificate is None

    @property
    def is_partial(self) -> bool:
        return (self.key is None) != (self.certificate is None)


@dataclass(frozen=True, slots=True)
class _Roots:
    active: _Root | None
    prepared: _Root | None
    previous: _Root | None
    # Counts discarded roots too, so that no two roots ever share a generation number.
    highest_generation: int = 0

    @classmethod
    def loaded(cls, active: _Root | None, prepared: _Root | None, previous: _Root | None) -> _Roots:
        present = [root.certificate for root in (active, prepared, previous) if root is not None]
        return cls(active, prepared, previous, max((_generation(c) for c in present), default=0))


class _Step(enum.Enum):
    DISCARD_EXPIRED_PREPARED = enum.auto()
    DISCARD_EXPIRED_PREVIOUS = enum.auto()
    PREPARE = enum.auto()
    PROMOTE = enum.auto()


class CertificateAuthority:
    """The trust domain's self-signed roots: the active one signs, the bundle publishes them all.

    Instances are immutable: to pick up a rotation in a long-running process, call load_or_create
    again (it is cheap when nothing is due).
    """

    __slots__ = ("_certificate", "_key", "_prepared", "_previous", "_trust_domain")

    def __init__(
        self,
        trust_domain: TrustDomain,
        key: ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        previous: Sequence[x509.Certificate] = (),
        prepared: x509.Certificate | None = None,
    ) -> None:
        """Prefer load_or_create; this wires already-loaded roots: the active one, prepared and older ones."""
        if spki_der(key.public_key()) != spki_der(certificate.public_key()):
            raise CaError("ca key does not match the ca certificate")
        self._trust_domain = trust_domain
        self._key = key
        self._certificate = certificate
        self._prepared = prepared
        self._previous = tuple(previous)

    @classmethod
    def load_or_create(
        cls,
        state_dir: Path,
        trust_domain: TrustDomain,
        *,
        ca_ttl: timedelta = timedelta(days=30),
        now: datetime | None = None,
    ) -> CertificateAuthority:
        """Loads the roots from `state_dir/ca` and performs the rotation steps due at `now`.

        Creates the first root on first start and completes or undoes a rotation that a crash
        interrupted; the module docstring gives the schedule.
        """
        now = utc_time(now)
        if ca_ttl <= timedelta(0):
            raise CaError("ca ttl must be positive")
        ca_dir = _prepare_directory(state_dir / _CA_DIR_NAME)
        layout = _Layout.of(ca_dir)
        # Two processes starting at once must not each create a root and keep only one on disk.
        with _exclusive_lock(ca_dir / _LOCK_NAME):
            _repair_interrupted_steps(layout)
            roots = _Roots.loaded(
                active=_load_root(layout.active, trust_domain),
                prepared=_load_root(layout.prepared, trust_domain),
                previous=_load_root(layout.previous, trust_domain),
            )
            # Terminates: a step removes a root, or fills an empty prepared slot, or empties it by
            # promoting; a fresh prepared root is never promoted while the active root is valid.
            while (step := _due_step(roots, ca_ttl, now)) is not None:
                roots = _perform(step, roots, layout, trust_domain=trust_domain, ca_ttl=ca_ttl, now=now)
        if roots.active is None:  # unreachable: _due_step promotes whenever there is no active root
            raise CaError(f"ca directory {ca_dir} has no active root after rotation")
        return cls(
            trust_domain,
            roots.active.key,
            roots.active.certificate,
            previous=(roots.previous.certificate,) if roots.previous is not None else (),
            prepared=roots.prepared.certificate if roots.prepared is not None else None,
        )

    @property
    def trust_domain(self) -> TrustDomain:
        return self._trust_domain

    @property
    def certificate(self) -> x509.Certificate:
        """The active root: the one that signs."""
        return self._certificate

    @property
    def prepared(self) -> x509.Certificate | None:
        """The prepared root: published in the bundle, signing nothing until it is promoted."""
        return self._prepared

    def bundle(self, now: datetime | None = None) -> X509Bundle:
        """Every root that has not expired at `now`: the active one, the prepared one, then older ones."""
        now = utc_time(now)
        prepared = (self._prepared,) if self._prepared is not None else ()
        roots = (self._certificate, *prepared, *self._previous)
        return X509Bundle(self._trust_domain, tuple(c for c in roots if c.not_valid_after_utc > now))

    def sign_x509_svid(
        self,
        public_key: ec.EllipticCurvePublicKey,
        spiffe_id: SpiffeId,
        *,
        ttl: timedelta,
        tier: TrustTier,
        dns_names: Sequence[str] = (),
        now: datetime | None = None,
    ) -> x509.Certificate:
        """An X.509-SVID for `spiffe_id` signed by the active root.

        Raises CaError for an ID outside this trust domain, InvalidSvidError (vouchd.spiffe) for
        anything mint_x509_svid refuses (a key that is not P-256, an ID without a path, ...).
        """
        if not spiffe_id.is_member_of(self._trust_domain):
            raise CaError(f"spiffe id {spiffe_id} is outside trust domain {self._trust_domain}")
        return mint_x509_svid(
            ca_key=self._key,
            ca_cert=self._certificate,
            public_key=public_key,
            spiffe_id=spiffe_id,
            ttl=ttl,
            tier=tier,
            dns_names=dns_names,
            now=now,
        )

    def sign(self, data: bytes) -> bytes:
        """A DER ECDSA P-256/SHA-256 signature by the active root's key (the JWT-SVID keys are kept as
        roots of their own; their certificates are never published, only their public keys)."""
        return self._key.sign(data, ec.ECDSA(hashes.SHA256()))

    def __repr__(self) -> str:
        return (
            f"CertificateAuthority(trust_domain={self._trust_domain.name!r}, "
            f"root_serial={self._certificate.serial_number:#x})"
        )


def stored_root_certificates(state_dir: Path) -> tuple[x509.Certificate | None, x509.Certificate | None]:
    """The active and the prepared root's certificates as `state_dir/ca` holds them now, before any step
    load_or_create would take: None for one that is missing or does not read. No key is read."""
    layout = _Layout.of(state_dir / _CA_DIR_NAME)
    found: list[x509.Certificate | None] = []
    for files in (layout.active, layout.prepared):
        try:
            found.append(_parse_certificate(files.certificate, _read_file(files.certificate, private=False)))
        except CaError:
            found.append(None)  # load_or_create names what is wrong with it
    return found[0], found[1]


def _due_step(roots: _Roots, ca_ttl: timedelta, now: datetime) -> _Step | None:
    """The next rotation step due at `now`, or None when the roots are as they should be."""
    if roots.prepared is not None and not _is_valid(roots.prepared, now):
        return _Step.DISCARD_EXPIRED_PREPARED
    if roots.previous is not None and not _is_valid(roots.previous, now):
        return _Step.DISCARD_EXPIRED_PREVIOUS
    if roots.active is None or not _is_valid(roots.active, now):
        return _Step.PROMOTE if roots.prepared is not None else _Step.PREPARE
    remaining = roots.active.certificate.not_valid_after_utc - now
    if roots.prepared is None:
        return _Step.PREPARE if remaining < ca_ttl / 2 else None
    # Waiting until the prepared root has been published for T/4 matters only when the authority was
    # down across the half-life: promoting it at once would sign under a root no agent has yet.
    if remaining < ca_ttl / 4 and now - _created_at(roots.prepared) >= ca_ttl / 4:
        return _Step.PROMOTE
    return None


def _perform(
    step: _Step, roots: _Roots, layout: _Layout, *, trust_domain: TrustDomain, ca_ttl: timedelta, now: datetime
) -> _Roots:
    match step:
        case _Step.DISCARD_EXPIRED_PREPARED:
            _remove_root(layout.prepared)
            return dataclasses.replace(roots, prepared=None)
        case _Step.DISCARD_EXPIRED_PREVIOUS:
            _remove_root(layout.previous)
            return dataclasses.replace(roots, previous=None)
        case _Step.PREPARE:
            # A new root always passes through next.*, even on first start, so that an interrupted
            # write of root.* is never a crash state but always a repairable copy of next.*.
            generation = roots.highest_generation + 1
            prepared = _create_root(trust_domain, ca_ttl, now, generation)
            _store_root(layout.prepared, prepared)
            return dataclasses.replace(roots, prepared=prepared, highest_generation=generation)
        case _Step.PROMOTE:
            return _promote(roots, layout, now)
        case _:
            assert_never(step)


def _promote(roots: _Roots, layout: _Layout, now: datetime) -> _Roots:
    """Prepared -> active -> previous, in the order _repair_interrupted_steps can pick up after a crash."""
    if roots.prepared is None:  # unreachable: _due_step promotes only a prepared root
        raise CaError(f"ca directory {layout.prepared.key.parent} has no prepared root to promote")
    previous = roots.previous
    if roots.active is not None:
        if _is_valid(roots.active, now):
            _store_root(layout.previous, roots.active)
            previous = roots.active
        else:
            _remove_root(layout.previous)
            previous = None
    _store_root(layout.active, roots.prepared)
    _remove_root(layout.prepared)
    return dataclasses.replace(roots, active=roots.prepared, prepared=None, previous=previous)


def _repair_interrupted_steps(layout: _Layout) -> None:
    """Completes or undoes what a crash left half done; every other inconsistency stays an error.

    Key files are renamed (and removed) before their certificates, so the crash states are:
    - next.* with one half: an interrupted prepare or removal of next.*; it never signed -> drop it;
    - root.key holding the prepared key but root.crt not its certificate: promotion interrupted
      while writing root.* -> finish writing root.* from next.*;
    - next.* equal to root.*: promotion interrupted before removing next.* -> drop next.*;
    - previous.key holding the active key: promotion interrupted while writing previous.*, or
      after it -> drop previous.* (the promotion is still due and writes it again);
    - previous.crt without its key: interrupted removal of previous.* -> drop it.
    """
    prepared = _read_halves(layout.prepared)
    if prepared.is_partial:
        _remove_root(layout.prepared)
        prepared = _StoredHalves(None, None)
    active = _read_halves(layout.active)
    if prepared.key is not None and prepared.certificate is not None:
        if _same_key(active.key, prepared.certificate) and active.certificate != prepared.certificate:
            _store_root(layout.active, _Root(prepared.key, prepared.certificate))
            active = prepared
        if active.certificate == prepared.certificate and _same_key(active.key, prepared.certificate):
            _remove_root(layout.prepared)
    previous = _read_halves(layout.previous)
    holds_active_key = active.certificate is not None and _same_key(previous.key, active.certificate)
    removal_interrupted = previous.key is None and previous.certificate is not None
    if holds_active_key or removal_interrupted:
        _remove_root(layout.previous)


def _is_valid(root: _Root, now: datetime) -> bool:
    return root.certificate.not_valid_after_utc > now


def _created_at(root: _Root) -> datetime:
    # _create_root backdates notBefore by CLOCK_SKEW.
    return root.certificate.not_valid_before_utc + CLOCK_SKEW


def _same_key(key: ec.EllipticCurvePrivateKey | None, certificate: x509.Certificate) -> bool:
    return key is not None and spki_der(key.public_key()) == spki_der(certificate.public_key())


def _prepare_directory(ca_dir: Path) -> Path:
    try:
        ca_dir.mkdir(mode=_DIR_MODE, parents=True, exist_ok=True)
        # mkdir's mode is filtered by the umask and ignored for an existing directory.
        os.chmod(ca_dir, _DIR_MODE)
    except OSError as err:
        raise CaError(f"ca directory {ca_dir} cannot be prepared: {err.strerror}") from err
    return ca_dir


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, _KEY_MODE)
    except OSError as err:
        raise CaError(f"ca lock file {path} cannot be opened: {err.strerror}") from err
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _read_file(path: Path, *, private: bool) -> bytes:
    what = "ca key file" if private else "ca certificate file"
    try:
        if private:
            return read_private(path)
        # O_NOFOLLOW for certificates too: nothing of the CA is read through a planted symlink.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as stream:
            return stream.read()
    except InsecureFileError as err:
        raise CaError(f"{what} {path} is {err}") from None
    except OSError as err:
        raise CaError(f"{what} {path} cannot be read: {err.strerror}") from err


def _read_halves(files: _RootFiles) -> _StoredHalves:
    key: ec.EllipticCurvePrivateKey | None = None
    certificate: x509.Certificate | None = None
    # lexists: a symlink, even a dangling one, is there and must be refused by _read_file, not skipped.
    if os.path.lexists(files.key):
        key = _parse_key(files.key, _read_file(files.key, private=True))
    if os.path.lexists(files.certificate):
        certificate = _parse_certificate(files.certificate, _read_file(files.certificate, private=False))
    return _StoredHalves(key, certificate)


def _parse_key(path: Path, key_pem: bytes) -> ec.EllipticCurvePrivateKey:
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The parser's own message is dropped on purpose: nothing derived from the key goes out.
        raise CaError(f"ca key file {path} does not hold an unencrypted pem private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CaError(f"ca key file {path} does not hold an ec p-256 key")
    return key


def _parse_certificate(path: Path, certificate_pem: bytes) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(certificate_pem)
    except ValueError as err:
        raise CaError(f"ca certificate file {path} is not a pem certificate") from err


def _load_root(files: _RootFiles, trust_domain: TrustDomain) -> _Root | None:
    halves = _read_halves(files)
    if halves.is_empty:
        return None
    if halves.certificate is None:
        raise CaError(f"ca certificate file {files.certificate} is missing but key file {files.key} exists")
    if halves.key is None:
        raise CaError(f"ca key file {files.key} is missing but certificate file {files.certificate} exists")
    if not _same_key(halves.key, halves.certificate):
        raise CaError(f"ca key file {files.key} does not match certificate file {files.certificate}")
    problem = _root_problem(halves.certificate, trust_domain)
    if problem is not None:
        raise CaError(
            f"ca certificate file {files.certificate} is not a root of trust domain {trust_domain}: {problem}"
        )
    return _Root(halves.key, halves.certificate)


def _root_problem(certificate: x509.Certificate, trust_domain: TrustDomain) -> str | None:
    try:
        constraints = certificate.extensions.get_extension_for_class(x509.BasicConstraints).value
        usage = certificate.extensions.get_extension_for_class(x509.KeyUsage).value
        san = certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as err:
        return f"missing extension {err.oid.dotted_string}"
    if not constraints.ca or not usage.key_cert_sign:
        return "not a ca certificate"
    if san.get_values_for_type(x509.UniformResourceIdentifier) != [str(trust_domain.id)]:
        return f"its uri san is not {trust_domain.id}"
    try:
        certificate.verify_directly_issued_by(certificate)
    except (ValueError, TypeError, InvalidSignature):
        return "not self-signed"
    return None


def _generation(certificate: x509.Certificate) -> int:
    """The root's sequence number from its commonName, so rotated roots are told apart at a glance."""
    names = certificate.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if names:
        match = _GENERATION.search(str(names[0].value))
        if match:
            return int(match.group(1))
    return 1


def _common_name(trust_domain: TrustDomain, generation: int) -> str:
    name = f"vouchd {trust_domain} root {generation}"
    return name if len(name) <= _MAX_COMMON_NAME else f"vouchd root {generation}"


def _create_root(trust_domain: TrustDomain, ca_ttl: timedelta, now: datetime, generation: int) -> _Root:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORGANIZATION),
            x509.NameAttribute(NameOID.COMMON_NAME, _common_name(trust_domain, generation)),
        ]
    )
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1 + secrets.randbelow((1 << 128) - 1))
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + ca_ttl)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(trust_domain.id))]),
            critical=False,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return _Root(key, certificate)


def _store_root(files: _RootFiles, root: _Root) -> None:
    key_pem = root.key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    cert_pem = root.certificate.public_bytes(serialization.Encoding.PEM)
    # Key before certificate: _repair_interrupted_steps knows the crash states this order leaves.
    _write_atomically([(files.key, key_pem, _KEY_MODE), (files.certificate, cert_pem, _CERT_MODE)])


def _remove_root(files: _RootFiles) -> None:
    # Key before certificate, as in _store_root: a crash leaves at most a certificate, never a lone key.
    for path in (files.key, files.certificate):
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            raise CaError(f"ca file {path} cannot be removed: {err.strerror}") from err
    try:
        fsync_directory(files.key.parent)
    except OSError as err:
        raise CaError(f"ca directory {files.key.parent} cannot be synced: {err.strerror}") from err


def _write_atomically(files: Sequence[tuple[Path, bytes, int]]) -> None:
    try:
        write_together(files)
    except OSError as err:
        names = ", ".join(str(path) for path, _, _ in files)
        raise CaError(f"ca files {names} cannot be written: {err.strerror}") from err
