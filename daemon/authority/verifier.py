"""Node attestation and quote-bound requests, verified at the authority (DESIGN §4, §5).

Everything here is pure: TPM structures are checked with `vouchd.evidence`, never with a TPM.
Each refusal is a `RefusalError` carrying a machine code for the agent and a message for the log; no
refusal message contains a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from vouchd.authority.errors import RefusalError
from vouchd.authority.store import NodeRecord, SessionRecord
from vouchd.evidence import (
    Attest,
    EccCurve,
    EventLog,
    EvidenceError,
    ObjectAttributes,
    PcrSelection,
    TpmAlg,
    TpmPublic,
    check_ak_attributes,
    check_node_key_attributes,
    make_credential,
    parse_event_log,
    primary_qualified_name,
    qualified_name,
    verify_certify,
    verify_quote,
)
from vouchd.protocol.identities import ek_hash
from vouchd.protocol.messages import AttestRequest, TpmEvidence
from vouchd.spiffe import is_ca_certificate, serial_hex, spki_der

__all__ = [
    "AttestationSession",
    "EkTrust",
    "VerifiedNode",
    "begin_attestation",
    "check_quote_continuity",
    "complete_attestation",
    "quoted_measurements",
    "selection_for",
    "verify_request_quote",
]

_BANKS = {"sha1": TpmAlg.SHA1, "sha256": TpmAlg.SHA256, "sha384": TpmAlg.SHA384, "sha512": TpmAlg.SHA512}
_EK_SHAPES: dict[str, tuple[TpmAlg, EccCurve | None, int]] = {
    "rsa2048": (TpmAlg.RSA, None, 2048),
    "ecc-p256": (TpmAlg.ECC, EccCurve.NIST_P256, 0),
    "ecc-p384": (TpmAlg.ECC, EccCurve.NIST_P384, 0),
}
_EK_REQUIRED = (ObjectAttributes.FIXED_TPM | ObjectAttributes.FIXED_PARENT | ObjectAttributes.RESTRICTED
                | ObjectAttributes.DECRYPT | ObjectAttributes.SENSITIVE_DATA_ORIGIN)
_MAX_CHAIN_DEPTH = 6


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
        """Walk issuer links from the EK certificate to a configured root; RefusalError otherwise.

        EK certificates break WebPKI rules (critical SAN with a directory name, no subject), so the
        chain is walked by hand: each link's signature, validity and CA flag are checked.
        """
        now = now or datetime.now(UTC)
        pool = self._intermediates + list(extra)
        current = certificate
        for _ in range(_MAX_CHAIN_DEPTH):
            if not current.not_valid_before_utc <= now <= current.not_valid_after_utc:
                raise RefusalError("ek_untrusted", f"certificate {_describe(current)} is not valid now")
            for root in self._roots:
                if _issued_by(current, root):
                    return
            issuer = next(
                (c for c in pool if c is not current and _issued_by(current, c) and is_ca_certificate(c)), None
            )
            if issuer is None:
                raise RefusalError("ek_untrusted", "EK certificate does not chain to a configured manufacturer root")
            current = issuer
        raise RefusalError("ek_untrusted", "EK certificate chain is too long")


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    if cert.issuer != issuer.subject:
        return False
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or f"serial {serial_hex(cert)}"


def _issuer_common_name(cert: x509.Certificate) -> str | None:
    names = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


@dataclass
class AttestationSession:
    """What the authority remembers between Challenge and ChallengeResponse (never sent)."""

    session: str
    node_id: str
    ek_hash: str
    ek_issuer_cn: str | None
    ak: TpmPublic
    node_key: TpmPublic
    selection: PcrSelection
    event_log: EventLog | None
    expires_at: float                   # wall-clock seconds: sessions may live in a store shared by replicas
    secret: bytes = field(repr=False)
    server_nonce: bytes = field(repr=False)
    raw_event_log: bytes | None = field(default=None, repr=False)

    @property
    def expected_extra_data(self) -> bytes:
        return hashlib.sha256(self.server_nonce + self.secret).digest()

    def to_record(self) -> SessionRecord:
        return SessionRecord(
            session=self.session, node_id=self.node_id, ek_hash=self.ek_hash, ek_issuer_cn=self.ek_issuer_cn,
            ak_public=self.ak.to_tpm2b(), node_key_public=self.node_key.to_tpm2b(),
            pcr_bank=self.selection.hash_alg.name.lower(), pcr_indices=tuple(self.selection.pcrs),
            event_log=self.raw_event_log, secret=self.secret, server_nonce=self.server_nonce,
            expires_at=self.expires_at,
        )

    @classmethod
    def from_record(cls, record: SessionRecord) -> AttestationSession:
        """The session as begin_attestation made it; what it holds was verified then."""
        try:
            event_log = parse_event_log(record.event_log) if record.event_log is not None else None
            return cls(
                session=record.session, node_id=record.node_id, ek_hash=record.ek_hash,
                ek_issuer_cn=record.ek_issuer_cn, ak=TpmPublic.from_tpm2b(record.ak_public),
                node_key=TpmPublic.from_tpm2b(record.node_key_public),
                selection=selection_for(record.pcr_bank, record.pcr_indices), event_log=event_log,
                expires_at=record.expires_at, secret=record.secret, server_nonce=record.server_nonce,
                raw_event_log=record.event_log,
            )
        except (EvidenceError, KeyError) as err:
            raise RefusalError("session_expired", f"stored attestation session is unreadable: {err}") from None


def _parse_public(data: bytes, what: str) -> TpmPublic:
    try:
        return TpmPublic.from_tpm2b(data)
    except EvidenceError as err:
        raise RefusalError("bad_evidence", f"{what}: {err}") from None


def _check_ek_shape(ek: TpmPublic, ek_type: str) -> None:
    shape = _EK_SHAPES.get(ek_type)
    if shape is None:
        raise RefusalError("bad_evidence", f"unknown EK type {ek_type[:20]!r}")
    key_type, curve, bits = shape
    if ek.type != key_type or (curve is not None and ek.curve != curve) or (bits and ek.rsa_bits != bits):
        raise RefusalError("bad_evidence", f"EK public area is not a {ek_type} key")
    if ek.attributes & _EK_REQUIRED != _EK_REQUIRED:
        raise RefusalError("bad_evidence", "EK public area lacks fixedTPM/fixedParent/restricted/decrypt")


def _ek_certificate_spki(certificate: x509.Certificate) -> bytes:
    key = certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise RefusalError("bad_evidence", "EK certificate key is neither RSA nor EC")
    return spki_der(key)


def begin_attestation(
    request: AttestRequest,
    *,
    trust: EkTrust,
    require_certificate: bool,
    bank: str,
    pcr_indices: Sequence[int],
    accept_missing_event_log: bool,
    now: float,
    session_ttl: float = 60.0,
) -> tuple[AttestationSession, bytes, bytes]:
    """Check the AttestRequest (DESIGN §4.2). Returns the session and the credential to send.

    An EK that is not enrolled can only be accepted on the strength of its certificate chain
    (`require_certificate`); the caller decides that because it depends on the enrolment mode.
    """
    ek = _parse_public(request.ek_public, "EK public area")
    _check_ek_shape(ek, request.ek_type)
    issuer_cn = None
    if request.ek_certificate is not None:
        try:
            certificate = x509.load_der_x509_certificate(request.ek_certificate)
        except ValueError:
            raise RefusalError("bad_evidence", "EK certificate is not DER X.509") from None
        if _ek_certificate_spki(certificate) != ek.spki_der():
            raise RefusalError("bad_evidence", "EK certificate does not certify the presented EK")
        if trust.configured:
            trust.verify_chain(certificate, now=datetime.fromtimestamp(now, UTC))
        elif require_certificate:
            raise RefusalError("ek_untrusted", "no manufacturer roots are configured to check the EK certificate")
        # else: the operator enrolled this exact EK by its hash, which pins more than any chain could.
        issuer_cn = _issuer_common_name(certificate)
    elif require_certificate:
        raise RefusalError("ek_untrusted", "an EK without a certificate must be enrolled beforehand")

    ak = _parse_public(request.ak_public, "AK public area")
    node_key = _parse_public(request.node_key_public, "node key public area")
    try:
        check_ak_attributes(ak)
        check_node_key_attributes(node_key)
        # qualifiedSigner = QN(AK) = H(QN(EK) || name(AK)) proves the AK is a child of this EK.
        ak_qn = qualified_name(primary_qualified_name(ek.name), ak.name, ak.name_alg)
        verify_certify(ak, request.node_key_certify.attest, request.node_key_certify.signature,
                       extra_data=request.certify_nonce, certified=node_key,
                       expected_signer_qualified_name=ak_qn)
    except EvidenceError as err:
        raise RefusalError("bad_evidence", str(err)) from None

    event_log = None
    if request.event_log is not None:
        try:
            event_log = parse_event_log(request.event_log)
        except EvidenceError as err:
            raise RefusalError("bad_evidence", f"event log: {err}") from None
        if _BANKS[bank] not in event_log.algorithms:
            raise RefusalError("bad_evidence", f"event log has no {bank} bank")
    elif not accept_missing_event_log:
        raise RefusalError("policy", "no event log, and the authority does not accept hosts without measured boot")

    secret = secrets.token_bytes(32)
    credential_blob, encrypted_secret = make_credential(ek, secret, ak.name)
    session = AttestationSession(
        session=secrets.token_hex(16),
        node_id="",
        ek_hash=ek_hash(ek),
        ek_issuer_cn=issuer_cn,
        ak=ak,
        node_key=node_key,
        selection=selection_for(bank, pcr_indices),
        event_log=event_log,
        expires_at=now + session_ttl,
        secret=secret,
        server_nonce=os.urandom(32),
        raw_event_log=request.event_log,
    )
    return session, credential_blob, encrypted_secret


@dataclass(frozen=True)
class VerifiedNode:
    """The outcome of a completed attestation: what the quote proved."""

    attest: Attest                     # its pcr_digest is the node's attested PCR state
    event_digests: tuple[str, ...]     # "<pcr>:<bank>:<hex>" of every quoted measurement, for profile policy


def complete_attestation(session: AttestationSession, quote: TpmEvidence, *, now: float) -> VerifiedNode:
    """Verify the quote answering the Challenge (DESIGN §4.4)."""
    if now > session.expires_at:
        raise RefusalError("session_expired", "attestation session expired; start again")
    try:
        if session.event_log is not None:
            values = session.event_log.replay(session.selection.hash_alg)
            zero = bytes(len(next(iter(values.values()))))
            if any(values[i] == zero for i in session.selection.pcrs):
                raise RefusalError("policy", "a selected PCR is all-zero: the event log does not cover it")
            # PCR values come from replaying the log, never from the agent: the quote must match them.
            attest = verify_quote(session.ak, quote.attest, quote.signature,
                                  extra_data=session.expected_extra_data, selection=session.selection,
                                  pcr_values=values)
            digests = quoted_measurements(session.event_log, session.selection)
        else:
            # A host the operator accepted without measured boot: no values to check the digest against.
            attest = verify_quote(session.ak, quote.attest, quote.signature,
                                  extra_data=session.expected_extra_data, selection=session.selection,
                                  pcr_values=None)
            digests = ()
    except EvidenceError as err:
        raise RefusalError("bad_quote", str(err)) from None
    return VerifiedNode(attest=attest, event_digests=digests)


def quoted_measurements(event_log: EventLog, selection: PcrSelection) -> tuple[str, ...]:
    """The measurements a profile is made of: "<pcr>:<bank>:<digest hex>" for every event on the
    selected PCRs in the selected bank. Only these are vouched for by replaying them to the quoted
    PCR values, so policy reads nothing else."""
    bank = selection.hash_alg.name.lower()
    return tuple(sorted({
        f"{pcr}:{bank}:{digest.hex()}"
        for pcr, _type, digest in event_log.digests(selection.hash_alg, selection.pcrs)
    }))


def selection_for(bank: str, pcr_indices: Sequence[int]) -> PcrSelection:
    return PcrSelection(_BANKS[bank], tuple(sorted(pcr_indices)))


def verify_request_quote(node: NodeRecord, quote: TpmEvidence, body: bytes) -> Attest:
    """A request carried by a quote (DESIGN §5): this node's AK, extraData = sha256(body), same PCRs.

    Changes nothing: a replayed request passes these checks too, and is refused by its nonce.
    """
    try:
        # The PCR digest is compared with the attested one by check_quote_continuity, after the nonce.
        return verify_quote(TpmPublic.from_tpm2b(node.ak_public), quote.attest, quote.signature,
                            extra_data=hashlib.sha256(body).digest(),
                            selection=selection_for(node.pcr_bank, node.pcr_indices), pcr_values=None)
    except EvidenceError as err:
        raise RefusalError("bad_quote", str(err)) from None


def check_quote_continuity(node: NodeRecord, attest: Attest) -> None:
    """The quoted TPM is still in the boot and state the node attested (DESIGN §4.5).

    resetCount up means a reboot, and a reboot means a new event log, so the node must attest again;
    restartCount up (resume) is fine; any counter going down, the clock going backwards within one
    boot, or other PCR values also demand a full attestation.
    """
    clock = attest.clock_info
    if clock.reset_count != node.reset_count:
        raise RefusalError("reattest", "the TPM was reset since the last attestation")
    if clock.restart_count < node.restart_count or (
        clock.restart_count == node.restart_count and clock.clock < node.clock
    ):
        raise RefusalError("reattest", "the TPM clock went backwards")
    if not hmac.compare_digest(attest.pcr_digest, node.pcr_digest):
        raise RefusalError("reattest", "PCR values changed since the last attestation")
