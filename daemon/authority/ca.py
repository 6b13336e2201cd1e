"""The trust domain's certificate authority: a self-signed root kept on disk, rotated at half-life.

Files under `<state_dir>/ca/` (directory 0700):

- `root.key` / `root.crt`: the active root, which signs every SVID;
- `previous.key` / `previous.crt`: the root it replaced, published in the bundle until it expires
  so that SVIDs it signed shortly before the rotation keep verifying.

Keys are PEM PKCS#8, mode 0600, written to a temporary file, fsynced and renamed into place, so a
crash leaves either the old file or the new one, never half a key.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import re
import secrets
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from cryptography.x509.oid import NameOID

from vouchd.authority.errors import CaError
from vouchd.spiffe import CLOCK_SKEW, SpiffeId, TrustDomain, TrustTier, X509Bundle, mint_x509_svid

__all__ = ["CertificateAuthority"]

_CA_DIR_NAME = "ca"
_ACTIVE_NAME = "root"
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


class CertificateAuthority:
    """The trust domain's self-signed root, created on first start and kept on disk.

    Instances are immutable: to pick up a rotation in a long-running process, call load_or_create
    again (it is cheap when nothing is due).
    """

    __slots__ = ("_certificate", "_key", "_previous", "_trust_domain")

    def __init__(
        self,
        trust_domain: TrustDomain,
        key: ec.EllipticCurvePrivateKey,
        certificate: x509.Certificate,
        previous: Sequence[x509.Certificate] = (),
    ) -> None:
        """Prefer load_or_create; this wires an already-loaded root (and older roots to publish)."""
        if _spki(key.public_key()) != _spki(certificate.public_key()):
            raise CaError("ca key does not match the ca certificate")
        self._trust_domain = trust_domain
        self._key = key
        self._certificate = certificate
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
        """Loads the root from `state_dir/ca`, creating it on first start and rotating it when due.

        A new root replaces the active one once less than half of `ca_ttl` remains on it (or it
        has expired); the replaced root, if still valid, is kept as `previous` and stays in the
        bundle until it expires.
        """
        now = _utc(now)
        if ca_ttl <= timedelta(0):
            raise CaError("ca ttl must be positive")
        ca_dir = _prepare_directory(state_dir / _CA_DIR_NAME)
        active_files = _RootFiles.named(ca_dir, _ACTIVE_NAME)
        previous_files = _RootFiles.named(ca_dir, _PREVIOUS_NAME)
        # Two processes starting at once must not each create a root and keep only one on disk.
        with _exclusive_lock(ca_dir / _LOCK_NAME):
            active = _load_root(active_files, trust_domain)
            previous = _load_root(previous_files, trust_domain)
            if active is None:
                generation = _generation(previous.certificate) + 1 if previous is not None else 1
                active = _create_root(trust_domain, ca_ttl, now, generation)
                _store_root(active_files, active)
            elif active.certificate.not_valid_after_utc - now < ca_ttl / 2:
                replacement = _create_root(trust_domain, ca_ttl, now, _generation(active.certificate) + 1)
                if active.certificate.not_valid_after_utc > now:
                    # previous first: a crash before the active files change leaves a state that
                    # simply rotates again on the next start.
                    _store_root(previous_files, active)
                    previous = active
                else:
                    _remove_root(previous_files)
                    previous = None
                _store_root(active_files, replacement)
                active = replacement
        older = (previous.certificate,) if previous is not None else ()
        return cls(trust_domain, active.key, active.certificate, older)

    @property
    def trust_domain(self) -> TrustDomain:
        return self._trust_domain

    @property
    def certificate(self) -> x509.Certificate:
        """The active root: the one that signs."""
        return self._certificate

    def bundle(self, now: datetime | None = None) -> X509Bundle:
        """Every root that has not expired at `now`, the active one first."""
        now = _utc(now)
        roots = (self._certificate, *self._previous)
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

    def __repr__(self) -> str:
        return (
            f"CertificateAuthority(trust_domain={self._trust_domain.name!r}, "
            f"root_serial={self._certificate.serial_number:#x})"
        )


def _utc(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(UTC)
    if now.tzinfo is None:
        raise ValueError("now must be a timezone-aware datetime")
    return now.astimezone(UTC)


def _spki(key: CertificatePublicKeyTypes) -> bytes:
    return key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


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
        # O_NOFOLLOW: a key is never read through a symlink someone else may have planted.
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as err:
        raise CaError(f"{what} {path} cannot be read: {err.strerror}") from err
    with os.fdopen(fd, "rb") as stream:
        if private:
            mode = os.fstat(stream.fileno()).st_mode & 0o777
            if mode & 0o077:
                raise CaError(f"{what} {path} is accessible to group or others (mode {mode:04o}), want 0600")
        try:
            return stream.read()
        except OSError as err:
            raise CaError(f"{what} {path} cannot be read: {err.strerror}") from err


def _load_root(files: _RootFiles, trust_domain: TrustDomain) -> _Root | None:
    key_exists, cert_exists = files.key.exists(), files.certificate.exists()
    if not key_exists and not cert_exists:
        return None
    if not cert_exists:
        raise CaError(f"ca certificate file {files.certificate} is missing but key file {files.key} exists")
    if not key_exists:
        raise CaError(f"ca key file {files.key} is missing but certificate file {files.certificate} exists")

    key_pem = _read_file(files.key, private=True)
    try:
        key = serialization.load_pem_private_key(key_pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The parser's own message is dropped on purpose: nothing derived from the key goes out.
        raise CaError(f"ca key file {files.key} does not hold an unencrypted pem private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise CaError(f"ca key file {files.key} does not hold an ec p-256 key")

    try:
        certificate = x509.load_pem_x509_certificate(_read_file(files.certificate, private=False))
    except ValueError as err:
        raise CaError(f"ca certificate file {files.certificate} is not a pem certificate") from err
    if _spki(key.public_key()) != _spki(certificate.public_key()):
        raise CaError(f"ca key file {files.key} does not match certificate file {files.certificate}")
    problem = _root_problem(certificate, trust_domain)
    if problem is not None:
        raise CaError(
            f"ca certificate file {files.certificate} is not a root of trust domain {trust_domain}: {problem}"
        )
    return _Root(key, certificate)


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
    _write_atomically([(files.key, key_pem, _KEY_MODE), (files.certificate, cert_pem, _CERT_MODE)])


def _remove_root(files: _RootFiles) -> None:
    for path in (files.key, files.certificate):
        try:
            path.unlink(missing_ok=True)
        except OSError as err:
            raise CaError(f"ca file {path} cannot be removed: {err.strerror}") from err


def _write_atomically(files: Sequence[tuple[Path, bytes, int]]) -> None:
    """Writes every file to a fsynced temporary, then renames them all in a row.

    Renaming only after all contents are durable keeps the window in which a key and its
    certificate disagree on disk down to two consecutive renames.
    """
    temporaries: list[tuple[Path, Path]] = []
    try:
        for path, data, mode in files:
            temporary = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
            temporaries.append((temporary, path))
            with os.fdopen(fd, "wb") as stream:
                # The umask may have narrowed the mode; state it exactly.
                os.fchmod(stream.fileno(), mode)
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
        for temporary, path in temporaries:
            os.replace(temporary, path)
        temporaries.clear()
        _fsync_directory(files[0][0].parent)
    except OSError as err:
        names = ", ".join(str(path) for path, _, _ in files)
        raise CaError(f"ca files {names} cannot be written: {err.strerror}") from err
    finally:
        for temporary, _ in temporaries:
            with contextlib.suppress(OSError):
                temporary.unlink()


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
