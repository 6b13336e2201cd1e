"""The tamper-evident audit log (design §9): one hash-chained JSON line per decision, anchored in the TPM.

`AuditLog` writes it (records.py says what a record is, byte for byte); `verify_log` checks it
offline, chain and anchors, and names the first bad record; `vouchd audit` (auditcli.py) is the
operator's way to both.
"""

from __future__ import annotations

from vouchd.audit.log import (
    DEFAULT_ANCHOR_EVERY,
    DEFAULT_ANCHOR_INTERVAL,
    DEFAULT_MAX_FILE_BYTES,
    AuditLog,
    KeyAnchorSigner,
    TpmAnchorSigner,
)
from vouchd.audit.records import (
    GENESIS_PREV,
    AnchorQuote,
    AnchorSigner,
    AuditError,
    AuditLogError,
    AuditWriteError,
    canonical_line,
    line_digest,
    log_files,
    parse_record,
)
from vouchd.audit.verify import Problem, QuoteChecker, VerifyReport, node_key_checker, tpm_quote_checker, verify_log

__all__ = [
    "DEFAULT_ANCHOR_EVERY",
    "DEFAULT_ANCHOR_INTERVAL",
    "DEFAULT_MAX_FILE_BYTES",
    "GENESIS_PREV",
    "AnchorQuote",
    "AnchorSigner",
    "AuditError",
    "AuditLog",
    "AuditLogError",
    "AuditWriteError",
    "KeyAnchorSigner",
    "Problem",
    "QuoteChecker",
    "TpmAnchorSigner",
    "VerifyReport",
    "canonical_line",
    "line_digest",
    "log_files",
    "node_key_checker",
    "parse_record",
    "tpm_quote_checker",
    "verify_log",
]
