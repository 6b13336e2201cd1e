"""EK certificate chains: each defect of a link is refused by name, and the issuer CN selector
comes only from a chain that was checked (DESIGN §4.2)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.unit.test_evidence_verify import EK_ATTRIBUTES, certify_bytes, ecc_public, fake_ak, fake_node_key
from vouchd.authority.ekchain import (
    TCG_KP_EK_CERTIFICATE,
    EkChainError,
    EkExtendedKeyUsageError,
    EkIssuerKeyUsageError,
    EkIssuerNotCaError,
    EkLeafIsCaError,
    EkPathLengthError,
    EkTrust,
    EkUnchainedError,
    EkValidityError,
)
from vouchd.authority.errors import RefusalError
from vouchd.authority.verifier import begin_attestation
from vouchd.evidence import TpmAlg, primary_qualified_name, qualified_name
from vouchd.protocol.messages import AttestRequest, TpmEvidence

NOW = datetime(2025, 6, 1, tzinfo=UTC)
LONG_AGO = NOW - timedelta(days=3650)
LATER = NOW + timedelta(days=3650)
CA_USAGE = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                         encipher_only=False, decipher_only=False)
SIGNING_ONLY = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                             data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                             encipher_only=False, decipher_only=False)
EK_USAGE = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                         data_encipherment=False, key_agreement=True, key_cert_sign=False, crl_sign=False,
                         encipher_only=False, decipher_only=False)


@dataclass(frozen=True)
class Issued:
    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]) if common_name else x509.Name([])


def make_ca(common_name: str, issuer: Issued | None = None, *, ca: bool | None = True,
            path_length: int | None = None, usage: x509.KeyUsage | None = CA_USAGE,
            not_after: datetime = LATER, key: ec.EllipticCurvePrivateKey | None = None) -> Issued:
    """A CA certificate (self-signed without `issuer`); ca=None leaves basicConstraints out."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = (x509.CertificateBuilder().subject_name(_name(common_name))
               .issuer_name(issuer.certificate.subject if issuer else _name(common_name))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(LONG_AGO).not_valid_after(not_after))
    if ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=ca, path_length=path_length if ca else None),
                                        critical=True)
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    return Issued(builder.sign(issuer.key if issuer else key, hashes.SHA256()), key)


def make_ek(issuer: Issued, ek_key: ec.EllipticCurvePrivateKey | None = None, *, subject: str = "",
            ca: bool = False, eku: list[x509.ObjectIdentifier] | None = None) -> x509.Certificate:
    """An EK certificate shaped as TCG's profile (and swtpm) make them: usually no subject, a
    critical SAN with the TPM's directory name, keyAgreement for an ECC EK."""
    ek_key = ek_key or ec.generate_private_key(ec.SECP256R1())
    tpm_name = x509.Name([x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.1"), "id:00001014"),
                          x509.NameAttribute(x509.ObjectIdentifier("2.23.133.2.2"), "swtpm")])
    builder = (x509.CertificateBuilder().subject_name(_name(subject)).issuer_name(issuer.certificate.subject)
               .public_key(ek_key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(LONG_AGO).not_valid_after(LATER)
               .add_extension(x509.SubjectAlternativeName([x509.DirectoryName(tpm_name)]), critical=True)
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
               .add_extension(EK_USAGE, critical=True))
    if eku is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    return builder.sign(issuer.key, hashes.SHA256())


@pytest.fixture(scope="module")
def root() -> Issued:
    return make_ca("Acme TPM Root")


@pytest.fixture(scope="module")
def intermediate(root: Issued) -> Issued:
    return make_ca("Acme EK CA", root)


def refusal(trust: EkTrust, certificate: x509.Certificate) -> EkChainError:
    with pytest.raises(EkChainError) as refused:
        trust.verify_chain(certificate, now=NOW)
    assert refused.value.code == "ek_untrusted"
    assert isinstance(refused.value, RefusalError)
    return refused.value


# ---------------------------------------------------------------- chains that pass


@pytest.mark.parametrize("eku", [None, [TCG_KP_EK_CERTIFICATE], [ExtendedKeyUsageOID.CLIENT_AUTH,
                                                                 TCG_KP_EK_CERTIFICATE]])
def test_a_well_formed_chain_passes(root: Issued, intermediate: Issued,
                                    eku: list[x509.ObjectIdentifier] | None) -> None:
    EkTrust([root.certificate], [intermediate.certificate]).verify_chain(make_ek(intermediate, eku=eku), now=NOW)


def test_an_ek_certificate_signed_by_the_root_itself_passes(root: Issued) -> None:
    EkTrust([root.certificate]).verify_chain(make_ek(root), now=NOW)


def test_a_root_that_states_no_constraints_is_trusted_by_configuration() -> None:
    # An old root without extensions: the operator chose to trust it, RFC 5280 trust-anchor style.
    bare_root = make_ca("Old Vendor Root", ca=None, usage=None)
    intermediate = make_ca("Old Vendor EK CA", bare_root)

    EkTrust([bare_root.certificate], [intermediate.certificate]).verify_chain(make_ek(intermediate), now=NOW)


def test_a_defective_copy_of_an_issuer_does_not_hide_a_good_one(root: Issued, intermediate: Issued) -> None:
    # The same CA key certified twice (a renewal): the expired certificate comes first in the pool.
    expired = make_ca("Acme EK CA", root, key=intermediate.key, not_after=NOW - timedelta(days=1))
    trust = EkTrust([root.certificate], [expired.certificate, intermediate.certificate])

    trust.verify_chain(make_ek(intermediate), now=NOW)


# ---------------------------------------------------------------- one defect each


def test_an_ek_certificate_that_is_a_ca_is_refused(root: Issued, intermediate: Issued) -> None:
    leaf = make_ek(intermediate, subject="Sneaky EK", ca=True)

    error = refusal(EkTrust([root.certificate], [intermediate.certificate]), leaf)

    assert isinstance(error, EkLeafIsCaError)
    assert str(error) == ("EK certificate chain: 'CN=Sneaky EK' is a CA certificate (basicConstraints cA=true), "
                          "not an EK certificate")


def test_a_ca_link_without_key_cert_sign_is_refused(root: Issued) -> None:
    signer = make_ca("Acme Signing CA", root, usage=SIGNING_ONLY)

    error = refusal(EkTrust([root.certificate], [signer.certificate]), make_ek(signer))

    assert isinstance(error, EkIssuerKeyUsageError)
    assert error.certificate == "'CN=Acme Signing CA'"
    assert "its key usage lacks certificate signing (keyCertSign)" in str(error)


def test_an_intermediate_without_any_key_usage_is_refused(root: Issued) -> None:
    signer = make_ca("Acme Unlabelled CA", root, usage=None)

    error = refusal(EkTrust([root.certificate], [signer.certificate]), make_ek(signer))

    assert isinstance(error, EkIssuerKeyUsageError)
    assert "'CN=Acme Unlabelled CA'" in str(error) and "has no key usage extension" in str(error)


def test_a_root_whose_key_usage_excludes_certificate_signing_is_refused() -> None:
    odd_root = make_ca("Acme Odd Root", usage=SIGNING_ONLY)

    error = refusal(EkTrust([odd_root.certificate]), make_ek(odd_root))

    assert isinstance(error, EkIssuerKeyUsageError)
    assert error.certificate == "'CN=Acme Odd Root'"


def test_an_ek_certificate_whose_eku_lacks_the_tcg_ek_oid_is_refused(root: Issued, intermediate: Issued) -> None:
    leaf = make_ek(intermediate, eku=[ExtendedKeyUsageOID.SERVER_AUTH])

    error = refusal(EkTrust([root.certificate], [intermediate.certificate]), leaf)

    assert isinstance(error, EkExtendedKeyUsageError)
    # No subject, as TCG EK certificates have: named by serial and issuer.
    assert error.certificate.startswith("serial ") and error.certificate.endswith("issued by 'CN=Acme EK CA'")
    assert str(error).endswith("states an extended key usage (1.3.6.1.5.5.7.3.1) without "
                               "tcg-kp-EKCertificate (2.23.133.8.1)")


def test_an_expired_intermediate_is_refused(root: Issued) -> None:
    expired = make_ca("Acme EK CA 2019", root, not_after=NOW - timedelta(days=1))

    error = refusal(EkTrust([root.certificate], [expired.certificate]), make_ek(expired))

    assert isinstance(error, EkValidityError)
    expiry = expired.certificate.not_valid_after_utc
    assert str(error) == f"EK certificate chain: 'CN=Acme EK CA 2019' expired on {expiry:%Y-%m-%d %H:%M:%S} UTC"


def test_an_expired_ek_certificate_is_refused(root: Issued) -> None:
    with pytest.raises(EkValidityError, match="expired on"):
        EkTrust([root.certificate]).verify_chain(make_ek(root), now=LATER + timedelta(days=1))


def test_a_chain_longer_than_the_roots_path_length_is_refused() -> None:
    # The root allows no CA below it, yet the EK certificate comes through an intermediate.
    strict_root = make_ca("Acme Strict Root", path_length=0)
    intermediate = make_ca("Acme EK CA", strict_root)

    error = refusal(EkTrust([strict_root.certificate], [intermediate.certificate]), make_ek(intermediate))

    assert isinstance(error, EkPathLengthError)
    assert str(error) == ("EK certificate chain: 'CN=Acme Strict Root' (root) allows 0 CA certificate(s) below it "
                          "(pathLenConstraint) but has 1")


def test_a_chain_longer_than_an_intermediates_path_length_is_refused(root: Issued) -> None:
    upper = make_ca("Acme Policy CA", root, path_length=0)
    lower = make_ca("Acme EK CA", upper)

    error = refusal(EkTrust([root.certificate], [upper.certificate, lower.certificate]), make_ek(lower))

    assert isinstance(error, EkPathLengthError)
    assert error.certificate == "'CN=Acme Policy CA'"
    # The same intermediate may sign EK certificates itself: pathLen 0 counts CAs, not the EK certificate.
    EkTrust([root.certificate], [upper.certificate]).verify_chain(make_ek(upper), now=NOW)


def test_an_issuer_that_is_no_ca_is_refused(root: Issued) -> None:
    not_ca = make_ca("Acme Web Server", root, ca=False)

    error = refusal(EkTrust([root.certificate], [not_ca.certificate]), make_ek(not_ca))

    assert isinstance(error, EkIssuerNotCaError)
    assert "'CN=Acme Web Server'" in str(error) and "cA=false" in str(error)


def test_a_certificate_from_an_unknown_issuer_names_that_issuer(root: Issued) -> None:
    stranger = make_ca("Other Vendor EK CA")

    error = refusal(EkTrust([root.certificate]), make_ek(stranger, subject="EK 42"))

    assert isinstance(error, EkUnchainedError)
    assert str(error) == ("EK certificate chain: 'CN=EK 42' was issued by 'CN=Other Vendor EK CA', which is no "
                          "configured root or intermediate: EK certificate does not chain to a configured "
                          "manufacturer root")


def test_an_impostor_with_the_issuers_name_but_another_key_is_refused(root: Issued, intermediate: Issued) -> None:
    impostor = make_ca("Acme EK CA", root)

    error = refusal(EkTrust([root.certificate], [impostor.certificate]), make_ek(intermediate))

    assert isinstance(error, EkUnchainedError)


# ---------------------------------------------------------------- tpm:ek_issuer_cn only from a checked chain


def attest_request(certificate_for: Issued | None) -> AttestRequest:
    """A well-formed AttestRequest of a software "TPM" with an ECC P-256 EK, its EK certificate
    issued by `certificate_for`."""
    ek_key = ec.generate_private_key(ec.SECP256R1())
    ek = ecc_public(ek_key.public_key(), EK_ATTRIBUTES, scheme=TpmAlg.NULL, symmetric_bits=128)
    ak, node_key = fake_ak(), fake_node_key()
    nonce = os.urandom(32)
    attest = certify_bytes(qualified_name(primary_qualified_name(ek.name), ak.public.name), nonce, node_key.public)
    certificate = make_ek(certificate_for, ek_key) if certificate_for else None
    return AttestRequest(
        node_id="", ek_type="ecc-p256", ek_public=ek.to_tpm2b(),
        ek_certificate=certificate.public_bytes(Encoding.DER) if certificate else None,
        ak_public=ak.public.to_tpm2b(), node_key_public=node_key.public.to_tpm2b(),
        node_key_certify=TpmEvidence(attest, ak.sign(attest)), certify_nonce=nonce, event_log=None,
    )


def begin(request: AttestRequest, trust: EkTrust) -> str | None:
    session, _blob, _secret = begin_attestation(
        request, trust=trust, require_certificate=False, bank="sha256", pcr_indices=range(8),
        accept_missing_event_log=True, now=NOW.timestamp())
    return session.ek_issuer_cn


def test_issuer_cn_comes_from_a_checked_chain(root: Issued, intermediate: Issued) -> None:
    request = attest_request(intermediate)

    assert begin(request, EkTrust([root.certificate], [intermediate.certificate])) == "Acme EK CA"


def test_without_roots_an_enrolled_ek_gets_no_issuer_cn() -> None:
    # Anyone can write any issuer name into a certificate nobody checks.
    forged_issuer = make_ca("Genuine Vendor EK CA")
    request = attest_request(forged_issuer)

    assert begin(request, EkTrust([])) is None


def test_an_ek_chain_defect_stops_attestation_before_any_session(root: Issued) -> None:
    signer = make_ca("Acme Signing CA", root, usage=SIGNING_ONLY)

    with pytest.raises(EkIssuerKeyUsageError) as refused:
        begin(attest_request(signer), EkTrust([root.certificate], [signer.certificate]))

    assert refused.value.code == "ek_untrusted"

