"""The authority's keys: the CA keeper (rotation on a clock), the reply-signing key, EK trust roots.

Built by vouchd.authority.build and injected into the Authority, which builds nothing itself.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding

from vouchd.authority.ca import CertificateAuthority, stored_root_certificates
from vouchd.authority.errors import AuthorityError, CaError
from vouchd.clock import Clock
from vouchd.securefiles import InsecureFileError, read_private, write_atomically
from vouchd.spiffe import TrustDomain, serial_hex

__all__ = ["CaKeeper", "load_certificates", "load_or_create_signing_key"]

log = logging.getLogger("vouchd.authority")

_CA_CHECK_INTERVAL = 60.0
_CERTIFICATE_SUFFIXES = (".pem", ".crt", ".cer", ".der")


class CaKeeper:
    """The trust domain's CA as of now: re-read (and rotated when due) at most once a minute.

    CertificateAuthority is immutable and its rotation a pure function of the files and `now`; this
    is the one place that decides when to look again.
    """

    def __init__(self, state_dir: Path, trust_domain: TrustDomain, *, ca_ttl: timedelta, clock: Clock) -> None:
        self._state_dir = state_dir
        self._trust_domain = trust_domain
        self._ca_ttl = ca_ttl
        self._clock = clock
        active_before, prepared_before = stored_root_certificates(state_dir)
        self._ca = CertificateAuthority.load_or_create(state_dir, trust_domain, ca_ttl=ca_ttl, now=self._utc_now())
        self._checked_at = clock.monotonic()
        self._log_start(active_before, prepared_before)

    def _log_start(self, active_before: x509.Certificate | None, prepared_before: x509.Certificate | None) -> None:
        """What load_or_create did at start, as current() logs what it does later: a root replaced while
        the authority was down is a change of the trust domain's roots that the log must show."""
        active = self._ca.certificate
        if active_before is None:
            log.info("ca root created", extra={"state_dir": str(self._state_dir), **_root_fields("root", active)})
        elif active_before != active:
            expired = active_before.not_valid_after_utc <= self._utc_now()
            log.info("ca root replaced at start: " + ("the active root had expired" if expired
                                                      else "its rotation was due"),
                     extra={"state_dir": str(self._state_dir), **_root_fields("previous_root", active_before),
                            **_root_fields("root", active)})
        if self._ca.prepared is not None and self._ca.prepared != prepared_before:
            log.info("ca root prepared: published in the bundle, signs once agents have it",
                     extra={"state_dir": str(self._state_dir), "root_serial": serial_hex(self._ca.prepared)})

    def _utc_now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.now(), UTC)

    @property
    def loaded(self) -> CertificateAuthority:
        """The CA as last loaded, without a rotation check."""
        return self._ca

    def current(self) -> tuple[CertificateAuthority, bool]:
        """The CA, rotated when its root passes half of its lifetime; True when the active root changed."""
        if self._clock.monotonic() - self._checked_at < _CA_CHECK_INTERVAL:
            return self._ca, False
        previous, previously_prepared = self._ca.certificate, self._ca.prepared
        self._checked_at = self._clock.monotonic()
        try:
            self._ca = CertificateAuthority.load_or_create(self._state_dir, self._trust_domain,
                                                           ca_ttl=self._ca_ttl, now=self._utc_now())
        except CaError as err:
            # A rotation step that cannot be written now (disk full, permissions) must not stop
            # issuance while the active root is still valid: keep it, say so, try next minute.
            log.error("ca check failed; the active root keeps signing",
                      extra={"reason": str(err), "root_expires": self._ca.certificate.not_valid_after_utc})
            return self._ca, False
        if self._ca.prepared is not None and self._ca.prepared != previously_prepared:
            log.info("ca root prepared: published in the bundle, signs once agents have it",
                     extra={"state_dir": str(self._state_dir), "root_serial": serial_hex(self._ca.prepared)})
        rotated = self._ca.certificate != previous
        if rotated:
            log.info("ca rotated", extra={"state_dir": str(self._state_dir), **_root_fields("previous_root", previous),
                                          **_root_fields("root", self._ca.certificate)})
        return self._ca, rotated


def _root_fields(prefix: str, certificate: x509.Certificate) -> dict[str, str]:
    """A root as the log names it: serial and subject, nothing of its key."""
    return {f"{prefix}_serial": serial_hex(certificate), f"{prefix}_subject": certificate.subject.rfc4514_string()}


def load_certificates(paths: Iterable[Path], what: str) -> list[x509.Certificate]:
    """Certificates from files, or from every *.pem/*.crt/*.cer/*.der file of a directory."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in _CERTIFICATE_SUFFIXES))
        else:
            files.append(path)
    certificates: list[x509.Certificate] = []
    for path in files:
        try:
            data = path.read_bytes()
        except OSError as err:
            raise AuthorityError(f"{path}: cannot read {what}: {err.strerror}") from None
        try:
            certificates.extend(x509.load_pem_x509_certificates(data) if b"-----BEGIN" in data
                                else [x509.load_der_x509_certificate(data)])
        except ValueError:
            raise AuthorityError(f"{path}: {what} is not a PEM or DER certificate") from None
    return certificates


def load_or_create_signing_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The reply-signing key: read (never through a symlink, never if others may read it) or made."""
    try:
        data = read_private(path)
    except FileNotFoundError:
        key = ec.generate_private_key(ec.SECP256R1())
        pem = key.private_bytes(Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
        try:
            path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            write_atomically(path, pem)
        except OSError as err:
            raise AuthorityError(f"{path}: authority signing key cannot be written: {err.strerror}") from None
        return key
    except InsecureFileError as err:
        raise AuthorityError(f"{path}: authority signing key is {err}") from None
    except OSError as err:
        raise AuthorityError(f"{path}: authority signing key cannot be read: {err.strerror}") from None
    try:
        loaded = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError):
        raise AuthorityError(f"{path}: authority signing key is not an unencrypted PEM private key") from None
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise AuthorityError(f"{path}: authority signing key is not an EC key")
    return loaded
