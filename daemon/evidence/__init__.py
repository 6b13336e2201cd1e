"""TPM evidence verification in pure Python (stdlib + cryptography, never tpm2_pytss).

The authority uses this package to decide what a node's TPM proved: it parses TPM structures
(TPMT_PUBLIC, TPMS_ATTEST, TPMT_SIGNATURE), verifies quotes and certifications, computes
qualified names, performs TPM2_MakeCredential, and parses and replays TCG event logs. Every
failure is an EvidenceError: MalformedStructureError for bytes that do not decode,
VerificationError for evidence that decodes but fails a check.
"""

from __future__ import annotations

from vouchd.evidence.certify import (
    ENDORSEMENT_HIERARCHY_HANDLE,
    check_ak_attributes,
    check_node_key_attributes,
    primary_qualified_name,
    qualified_name,
    verify_certify,
)
from vouchd.evidence.credential import make_credential
from vouchd.evidence.errors import EvidenceError, MalformedStructureError, VerificationError
from vouchd.evidence.eventlog import (
    Event,
    EventLog,
    EventType,
    build_event_log,
    parse_event_log,
    simulated_boot_events,
)
from vouchd.evidence.quote import pcr_digest, verify_quote
from vouchd.evidence.signature import TpmSignature, verify_signature
from vouchd.evidence.structures import (
    Attest,
    AttestType,
    ClockInfo,
    EccCurve,
    ObjectAttributes,
    PcrSelection,
    TpmAlg,
    TpmPublic,
)

__all__ = [
    "ENDORSEMENT_HIERARCHY_HANDLE",
    "Attest",
    "AttestType",
    "ClockInfo",
    "EccCurve",
    "Event",
    "EventLog",
    "EventType",
    "EvidenceError",
    "MalformedStructureError",
    "ObjectAttributes",
    "PcrSelection",
    "TpmAlg",
    "TpmPublic",
    "TpmSignature",
    "VerificationError",
    "build_event_log",
    "check_ak_attributes",
    "check_node_key_attributes",
    "make_credential",
    "parse_event_log",
    "pcr_digest",
    "primary_qualified_name",
    "qualified_name",
    "simulated_boot_events",
    "verify_certify",
    "verify_quote",
    "verify_signature",
]
