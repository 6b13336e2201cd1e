"""Node attestation and quote-bound requests, verified at the authority (DESIGN §4, §5).

Everything here is pure: TPM structures are checked with `vouchd.evidence`, never with a TPM.
Each refusal is a `RefusalError` carrying a machine code for the agent and a message for the log; no
refusal message contains a secret.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import secrets
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from vouchd.authority.ekchain import EkTrust, issuer_common_name
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
from vouchd.protocol.refusals import Refusal
from vouchd.spiffe import spki_der

__all__ = [
    "AttestationSession",
    "VerifiedNode",
    "begin_attestation",
    "check_quote_continuity",
    "complete_attestation",
    "match_profile",
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
# One measurement of a profile: "<pcr>:<bank>:<n>/<count>:<digest hex>" (see quoted_measurements).
_MEASUREMENT = re.compile(r"(\d{1,2}):(sha\d{1,3}):(\d{1,6})/(\d{1,6}):([0-9a-f]{40,128})")



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
            raise RefusalError(Refusal.SESSION_EXPIRED, f"stored attestation session is unreadable: {err}") from None


def _parse_public(data: bytes, what: str) -> TpmPublic:
    try:
        return TpmPublic.from_tpm2b(data)
    except EvidenceError as err:
        raise RefusalError(Refusal.BAD_EVIDENCE, f"{what}: {err}") from None


def _check_ek_shape(ek: TpmPublic, ek_type: str) -> None:
    shape = _EK_SHAPES.get(ek_type)
    if shape is None:
        raise RefusalError(Refusal.BAD_EVIDENCE, f"unknown EK type {ek_type[:20]!r}")
    key_type, curve, bits = shape
    if ek.type != key_type or (curve is not None and ek.curve != curve) or (bits and ek.rsa_bits != bits):
        raise RefusalError(Refusal.BAD_EVIDENCE, f"EK public area is not a {ek_type} key")
    if ek.attributes & _EK_REQUIRED != _EK_REQUIRED:
        raise RefusalError(Refusal.BAD_EVIDENCE, "EK public area lacks fixedTPM/fixedParent/restricted/decrypt")


def _ek_certificate_spki(certificate: x509.Certificate) -> bytes:
    key = certificate.public_key()
    if not isinstance(key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey):
        raise RefusalError(Refusal.BAD_EVIDENCE, "EK certificate key is neither RSA nor EC")
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
            raise RefusalError(Refusal.BAD_EVIDENCE, "EK certificate is not DER X.509") from None
        if _ek_certificate_spki(certificate) != ek.spki_der():
            raise RefusalError(Refusal.BAD_EVIDENCE, "EK certificate does not certify the presented EK")
        if trust.configured:
            trust.verify_chain(certificate, now=datetime.fromtimestamp(now, UTC))
            # Only a checked chain vouches for the issuer's name: anyone can write one into a certificate.
            issuer_cn = issuer_common_name(certificate)
        elif require_certificate:
            raise RefusalError(Refusal.EK_UNTRUSTED, "no manufacturer roots are configured to check the EK certificate")
        # else: the operator enrolled this exact EK by its hash, which pins more than any chain could;
        # without roots nothing vouches for its issuer, so the node gets no tpm:ek_issuer_cn selector.
    elif require_certificate:
        raise RefusalError(Refusal.EK_UNTRUSTED, "an EK without a certificate must be enrolled beforehand")

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
        raise RefusalError(Refusal.BAD_EVIDENCE, str(err)) from None

    event_log = None
    if request.event_log is not None:
        try:
            event_log = parse_event_log(request.event_log)
        except EvidenceError as err:
            raise RefusalError(Refusal.BAD_EVIDENCE, f"event log: {err}") from None
        if _BANKS[bank] not in event_log.algorithms:
            raise RefusalError(Refusal.BAD_EVIDENCE, f"event log has no {bank} bank")
    elif not accept_missing_event_log:
        raise RefusalError(Refusal.POLICY,
                           "no event log, and the authority does not accept hosts without measured boot")

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
    event_digests: tuple[str, ...]     # every quoted measurement, as quoted_measurements gives them


def complete_attestation(session: AttestationSession, quote: TpmEvidence, *, now: float) -> VerifiedNode:
    """Verify the quote answering the Challenge (DESIGN §4.4)."""
    if now > session.expires_at:
        raise RefusalError(Refusal.SESSION_EXPIRED, "attestation session expired; start again")
    try:
        if session.event_log is not None:
            values = session.event_log.replay(session.selection.hash_alg)
            zero = bytes(len(next(iter(values.values()))))
            if any(values[i] == zero for i in session.selection.pcrs):
                raise RefusalError(Refusal.POLICY, "a selected PCR is all-zero: the event log does not cover it")
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
        raise RefusalError(Refusal.BAD_QUOTE, str(err)) from None
    return VerifiedNode(attest=attest, event_digests=digests)


def quoted_measurements(event_log: EventLog, selection: PcrSelection) -> tuple[str, ...]:
    """The measurements a profile is made of: "<pcr>:<bank>:<n>/<count>:<digest hex>" for every event
    on the selected PCRs in the selected bank, the n-th of the `count` events of that PCR in log order.

    Only these are vouched for by replaying them to the quoted PCR values, so policy reads nothing
    else. Position and count are part of each measurement because a PCR's value depends on the order
    of its extends: a profile is a sequence per PCR, not a bag of digests. A profile stored as a set
    of these strings therefore keeps the order, and a log whose measurements are all in a profile
    has, on each of its PCRs, exactly the profile's events in the profile's order.
    """
    bank = selection.hash_alg.name.lower()
    per_pcr: dict[int, list[bytes]] = {}
    for pcr, _type, digest in event_log.digests(selection.hash_alg, selection.pcrs):
        per_pcr.setdefault(pcr, []).append(digest)
    return tuple(
        f"{pcr}:{bank}:{position}/{len(digests)}:{digest.hex()}"
        for pcr, digests in sorted(per_pcr.items())
        for position, digest in enumerate(digests, start=1)
    )


def _sequences(measurements: Iterable[str]) -> dict[tuple[int, str], tuple[str, ...]] | None:
    """Per (PCR, bank), the digests in log order; None unless every measurement has the form
    quoted_measurements gives (a profile stored by an older vouchd has "<pcr>:<bank>:<hex>")."""
    slots: dict[tuple[int, str], list[str | None]] = {}
    for measurement in measurements:
        match = _MEASUREMENT.fullmatch(measurement)
        if match is None:
            return None
        pcr, bank, position, count, digest = match.groups()
        events = slots.setdefault((int(pcr), bank), [None] * int(count))
        if len(events) != int(count) or not 1 <= int(position) <= len(events) or events[int(position) - 1]:
            return None
        events[int(position) - 1] = digest
    sequences = {key: tuple(e for e in events if e is not None) for key, events in slots.items()}
    if any(len(sequences[key]) != len(events) for key, events in slots.items()):
        return None
    return sequences


def match_profile(profiles: Mapping[str, Iterable[str]], measurements: Iterable[str]) -> str | None:
    """The first profile, in `profiles`' order, that has on every PCR the log measures the same
    events in the same order (DESIGN §4.4); None when none has.

    A profile stored by an older vouchd is a bag of "<pcr>:<bank>:<hex>" without order and cannot
    be checked: when nothing else matches, the refusal names it and how to record it again.
    """
    wanted = _sequences(measurements)
    if wanted is None:
        raise ValueError("measurements are not in the form quoted_measurements gives")
    unreadable = []
    for name, recorded in profiles.items():
        sequences = _sequences(recorded)
        if sequences is None:
            unreadable.append(name)
        elif all(sequences.get(key) == events for key, events in wanted.items()):
            return name
    if unreadable:
        names = ", ".join(unreadable)
        raise RefusalError(
            Refusal.POLICY, f"boot profile(s) {names} hold unordered measurements (recorded by an older vouchd) and "
                      f"cannot be checked in event-log order: on a boot you trust, record it again with "
                      f"`vouchd node learn --name {unreadable[0]}`, or drop it with `vouchd profile remove`")
    return None


def legacy_profile_accepts(recorded: Iterable[str], measurements: Iterable[str]) -> bool:
    """Whether `recorded` is a profile stored by an older vouchd (unordered "<pcr>:<bank>:<hex>")
    that accepts `measurements` by the older rule: every digest of the log is among the profile's.

    Such a profile can be stored again as `measurements`, in log order: that narrows what it
    accepts to one boot it already accepted, and never widens it.
    """
    recorded = frozenset(recorded)
    if not recorded or _sequences(recorded) is not None:
        return False
    unordered = set()
    for measurement in measurements:
        match = _MEASUREMENT.fullmatch(measurement)
        if match is None:
            return False
        pcr, bank, _position, _count, digest = match.groups()
        unordered.add(f"{pcr}:{bank}:{digest}")
    return unordered <= recorded


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
        raise RefusalError(Refusal.BAD_QUOTE, str(err)) from None


def check_quote_continuity(node: NodeRecord, attest: Attest) -> None:
    """The quoted TPM is still in the boot and state the node attested (DESIGN §4.5).

    resetCount up means a reboot, and a reboot means a new event log, so the node must attest again;
    restartCount up (resume) is fine; any counter going down, the clock going backwards within one
    boot, or other PCR values also demand a full attestation.
    """
    clock = attest.clock_info
    if clock.reset_count != node.reset_count:
        raise RefusalError(Refusal.REATTEST, "the TPM was reset since the last attestation")
    if clock.restart_count < node.restart_count or (
        clock.restart_count == node.restart_count and clock.clock < node.clock
    ):
        raise RefusalError(Refusal.REATTEST, "the TPM clock went backwards")
    if not hmac.compare_digest(attest.pcr_digest, node.pcr_digest):
        raise RefusalError(Refusal.REATTEST, "PCR values changed since the last attestation")
