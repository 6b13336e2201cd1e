"""The EK certificate chain: is this TPM's EK certificate issued, through valid CAs, by a root the
operator trusts (DESIGN §4, step 2)? Each defect is refused with an error of its own that names it
and the certificate (`ek_untrusted` on the wire).

The chain is searched as a tree (a bad copy of an issuer must not hide a good one). A configured root
is held to the constraints it states; every intermediate must be a CA with keyCertSign; the EK
certificate must not be a CA and, where it states an extended key usage, must state the TCG's; every
link must be within its validity; path lengths are honoured.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TypeVar

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.x509.oid import NameOID

from vouchd.authority.errors import RefusalError
from vouchd.protocol.refusals import Refusal
from vouchd.spiffe import serial_hex

__all__ = [
    "TCG_KP_EK_CERTIFICATE",
    "EkChainError",
    "EkExtendedKeyUsageError",
    "EkIssuerKeyUsageError",
    "EkIssuerNotCaError",
    "EkLeafIsCaError",
    "EkMalformedCertificateError",
    "EkPathLengthError",
    "EkTrust",
    "EkUnchainedError",
    "EkValidityError",
    "issuer_common_name",
]

_MAX_CHAIN_DEPTH = 6                # certificates below the root, the EK certificate included
_Extension = TypeVar("_Extension", bound=x509.ExtensionType)


# TCG EK Credential Profile: an EK certificate that states an extended key usage must state this one.
TCG_KP_EK_CERTIFICATE = x509.ObjectIdentifier("2.23.133.8.1")


class EkChainError(RefusalError):
    """An EK certificate, or a certificate of its chain, fails a check (code ``ek_untrusted``).

    `certificate` names the certificate (its subject, or its serial and issuer when the subject is
    empty, as TCG EK certificates' often is); each subclass is one defect, named in the message.
    """

    def __init__(self, certificate: x509.Certificate, defect: str) -> None:
        self.certificate = _describe(certificate)
        super().__init__(Refusal.EK_UNTRUSTED, f"EK certificate chain: {self.certificate} {defect}")


class EkLeafIsCaError(EkChainError):
    """The EK certificate itself says it is a CA (basicConstraints cA=true)."""


class EkExtendedKeyUsageError(EkChainError):
    """The EK certificate states an extended key usage without tcg-kp-EKCertificate."""


class EkIssuerNotCaError(EkChainError):
    """A certificate that signed a link of the chain is not a CA (basicConstraints)."""


class EkIssuerKeyUsageError(EkChainError):
    """A certificate that signed a link of the chain may not sign certificates (keyCertSign)."""


class EkPathLengthError(EkChainError):
    """More CA certificates below a CA than its basicConstraints pathLenConstraint allows."""


class EkValidityError(EkChainError):
    """A certificate of the chain is expired or not valid yet."""


class EkMalformedCertificateError(EkChainError):
    """A certificate of the chain whose extensions do not parse."""


class EkUnchainedError(EkChainError):
    """No configured root or intermediate issued a certificate of the chain, or the chain is too long."""


class EkTrust:
    """Manufacturer roots (and intermediates) that EK certificates must chain to."""

    def __init__(self, roots: Sequence[x509.Certificate], intermediates: Sequence[x509.Certificate] = ()) -> None:
        self._roots = list(roots)
        self._intermediates = list(intermediates)

    @property
    def configured(self) -> bool:
        return bool(self._roots)

    def verify_chain(self, certificate: x509.Certificate, extra: Sequence[x509.Certificate] = (),
                     *, now: datetime | None = None) -> None:
        """Find a path from the EK certificate to a configured root whose every link passes; the
        defect of the first failing link (an EkChainError subclass) otherwise.

        EK certificates break WebPKI rules (critical SAN with a directory name, often no subject),
        so the chain is walked by hand, as RFC 5280 §6.1 would: every link's signature and validity;
        the EK certificate is no CA and, when it states an extended key usage, states
        tcg-kp-EKCertificate; every intermediate is a CA allowed to sign certificates (keyCertSign)
        whose pathLenConstraint allows the CAs below it. A configured root is trusted by
        configuration: its validity is checked, and its CA flag, key usage and path length only
        where it states them.
        """
        now = now or datetime.now(UTC)
        _check_validity(certificate, now)
        _check_ek_leaf(certificate)
        defects: list[EkChainError] = []
        if not self._extend([certificate], self._intermediates + list(extra), now, defects):
            raise defects[0]

    def _extend(self, path: list[x509.Certificate], pool: Sequence[x509.Certificate], now: datetime,
                defects: list[EkChainError]) -> bool:
        """Whether `path` (EK certificate first) reaches a root through links that pass; the defect
        of every link refused on the way goes to `defects`."""
        current = path[-1]
        for root in self._roots:
            if _issued_by(current, root):
                defect = _ca_defect(root, path, now, anchor=True)
                if defect is None:
                    return True
                defects.append(defect)
        issuers = [c for c in pool if c not in path and c not in self._roots and _issued_by(current, c)]
        if issuers and len(path) >= _MAX_CHAIN_DEPTH:
            defects.append(EkUnchainedError(current, f"is the last of {_MAX_CHAIN_DEPTH} certificates and not "
                                                     "signed by a configured root: chain too long"))
            return False
        for issuer in issuers:
            defect = _ca_defect(issuer, path, now, anchor=False)
            if defect is not None:
                defects.append(defect)
            elif self._extend([*path, issuer], pool, now, defects):
                return True
        if not defects:
            defects.append(EkUnchainedError(
                current, f"was issued by {current.issuer.rfc4514_string() or 'an empty name'!r}, which is no "
                         "configured root or intermediate: EK certificate does not chain to a configured "
                         "manufacturer root"))
        return False


def _extensions(cert: x509.Certificate) -> x509.Extensions:
    try:
        return cert.extensions
    except ValueError as err:  # a duplicate or undecodable extension
        raise EkMalformedCertificateError(cert, f"has extensions that do not parse: {err}") from None


def _extension(cert: x509.Certificate, kind: type[_Extension]) -> _Extension | None:
    try:
        return _extensions(cert).get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _check_validity(cert: x509.Certificate, now: datetime) -> None:
    if now > cert.not_valid_after_utc:
        raise EkValidityError(cert, f"expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M:%S} UTC")
    if now < cert.not_valid_before_utc:
        raise EkValidityError(cert, f"is not valid before {cert.not_valid_before_utc:%Y-%m-%d %H:%M:%S} UTC")


def _check_ek_leaf(cert: x509.Certificate) -> None:
    constraints = _extension(cert, x509.BasicConstraints)
    if constraints is not None and constraints.ca:
        raise EkLeafIsCaError(cert, "is a CA certificate (basicConstraints cA=true), not an EK certificate")
    usage = _extension(cert, x509.ExtendedKeyUsage)
    if usage is not None and TCG_KP_EK_CERTIFICATE not in usage:
        stated = ", ".join(oid.dotted_string for oid in usage) or "none"
        raise EkExtendedKeyUsageError(cert, f"states an extended key usage ({stated}) without "
                                            f"tcg-kp-EKCertificate ({TCG_KP_EK_CERTIFICATE.dotted_string})")


def _ca_defect(ca: x509.Certificate, below: Sequence[x509.Certificate], now: datetime,
               *, anchor: bool) -> EkChainError | None:
    """Why `ca` may not sign the last certificate of `below` (the path from the EK certificate up to
    it), or None. A configured root (`anchor`) is only held to the constraints it states."""
    try:
        _check_validity(ca, now)
        constraints = _extension(ca, x509.BasicConstraints)
        usage = _extension(ca, x509.KeyUsage)
    except EkChainError as defect:
        return defect
    role = "root" if anchor else "intermediate"
    if constraints is None and not anchor:
        return EkIssuerNotCaError(ca, f"signed {_describe(below[-1])} but has no basicConstraints: it is no CA")
    if constraints is not None and not constraints.ca:
        return EkIssuerNotCaError(ca, f"signed {_describe(below[-1])} but is no CA (basicConstraints cA=false)")
    if usage is None and not anchor:
        return EkIssuerKeyUsageError(ca, f"signed {_describe(below[-1])} but has no key usage extension, "
                                         "so it does not allow certificate signing (keyCertSign)")
    if usage is not None and not usage.key_cert_sign:
        return EkIssuerKeyUsageError(ca, f"signed {_describe(below[-1])} but its key usage lacks "
                                         "certificate signing (keyCertSign)")
    # RFC 5280 §4.2.1.9: pathLen counts the CAs below this one, self-issued ones excepted.
    cas_below = sum(1 for c in below[1:] if c.issuer != c.subject)
    if constraints is not None and constraints.path_length is not None and cas_below > constraints.path_length:
        return EkPathLengthError(ca, f"({role}) allows {constraints.path_length} CA certificate(s) below it "
                                     f"(pathLenConstraint) but has {cas_below}")
    return None


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _describe(cert: x509.Certificate) -> str:
    subject = cert.subject.rfc4514_string()
    if subject:
        return repr(subject)
    return f"serial {serial_hex(cert)} issued by {cert.issuer.rfc4514_string()!r}"


def issuer_common_name(cert: x509.Certificate) -> str | None:
    names = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None
