"""Offline verification of an audit log: every line, the hash chain across files, and the anchors.

What it proves: the records up to the last valid anchor are exactly those the daemon wrote when the
TPM quoted the chain head (a change anywhere before it breaks the chain or the quote). The records
after it rest on the chain alone: whoever can write the files could rewrite that tail, so the report
says how many there are. A crash's partial last line is not tampering: the writer drops it at its
next start, and the report says so apart from any problem.

Pure Python: quotes are checked with vouchd.evidence against the AK's TPM2B_PUBLIC, never the TPM.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from vouchd.audit.records import (
    GENESIS_PREV,
    KEY_ANCHOR_PCRS,
    AnchorQuote,
    AuditError,
    line_digest,
    log_file_number,
    log_files,
    parse_record,
)
from vouchd.errors import VouchdError
from vouchd.evidence import Attest, PcrSelection, TpmPublic, VerificationError, verify_quote, verify_signature
from vouchd.protocol.keyproof import ANCHOR_CONTEXT, load_node_key_public, verify_node_key_signature

__all__ = ["Problem", "QuoteChecker", "VerifyReport", "expand_paths", "node_key_checker", "tpm_quote_checker",
           "verify_log"]

QuoteChecker = Callable[[AnchorQuote, bytes], None]
"""Checks that a quote signs `extra_data`; raises VouchdError or ValueError naming what failed."""


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    seq: int | None     # None when the line has no readable seq
    reason: str

    def __str__(self) -> str:
        where = f"{self.file} line {self.line}" + ("" if self.seq is None else f" (seq {self.seq})")
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class VerifyReport:
    files: tuple[str, ...]
    records: int                    # records that verified, in order, before any problem
    first_seq: int | None
    last_seq: int | None            # of the last record that verified
    from_genesis: bool              # the first record starts the chain (its prev is 64 zeros)
    anchors: int                    # anchors that verified
    anchored_through: int | None    # seq of the last record the last valid anchor covers
    covered: int                    # records up to and including that one
    unanchored: int                 # records after it that are not anchors themselves
    anchors_checked: bool           # quotes checked against an AK; otherwise only their shape
    problem: Problem | None         # the first bad record
    partial_tail: Problem | None    # a crash's partial last line: dropped at next start

    @property
    def ok(self) -> bool:
        return self.problem is None

    def to_json(self) -> dict[str, object]:
        result = asdict(self)
        result["ok"] = self.ok
        return result


def tpm_quote_checker(ak_public: bytes) -> QuoteChecker:
    """Checks anchors as TPM2_Quotes by the AK whose marshaled TPM2B_PUBLIC is `ak_public`."""
    try:
        ak = TpmPublic.from_tpm2b(ak_public)
    except VouchdError as err:
        raise AuditError(f"the AK public is not a TPM2B_PUBLIC: {err}") from None

    def check(quote: AnchorQuote, extra_data: bytes) -> None:
        try:
            selection = PcrSelection.parse(quote.pcrs)
        except VouchdError as err:
            raise ValueError(f"quote pcrs {quote.pcrs[:40]!r}: {err}") from None
        try:
            verify_signature(ak, quote.signature, quote.attest)
        except VouchdError as err:
            # The quote names the key that signed it: say when that is another AK (the TPM was
            # cleared, or the agent's key files replaced), which no edit of the log would explain.
            try:
                signer = Attest.parse(quote.attest).qualified_signer
            except VouchdError:
                signer = b""
            if signer and signer != ak.name:
                raise VerificationError(f"quote signature invalid: signed by another AK (name {signer.hex()}, "
                                        f"not {ak.name.hex()}); verify the records it anchors with that AK") from None
            raise VerificationError(f"quote signature invalid: {err}") from None
        if Attest.parse(quote.attest).extra_data != extra_data:
            raise VerificationError("quote extraData is not the chain head it covers")
        verify_quote(ak, quote.attest, quote.signature, extra_data=extra_data, selection=selection, pcr_values=None)

    return check


def node_key_checker(spki_der: bytes) -> QuoteChecker:
    """Checks anchors as signatures by a static-secret node's key (DER SubjectPublicKeyInfo)."""
    try:
        load_node_key_public(spki_der)
    except VouchdError as err:
        raise AuditError(f"the node key: {err}") from None

    def check(quote: AnchorQuote, extra_data: bytes) -> None:
        if quote.pcrs != KEY_ANCHOR_PCRS:
            raise VerificationError(f"anchor is a TPM quote ({quote.pcrs[:40]!r}), not a node key signature; "
                                    "verify with the node's AK")
        if quote.attest != extra_data:
            raise VerificationError("anchor does not sign the chain head it covers")
        try:
            verify_node_key_signature(spki_der, ANCHOR_CONTEXT, extra_data, quote.signature)
        except VouchdError as err:
            raise VerificationError(f"anchor signature invalid: {err}") from None

    return check


def expand_paths(paths: Sequence[Path | str]) -> list[Path]:
    """Files as given; a folder stands for its audit log files, oldest first."""
    files: list[Path] = []
    for item in map(Path, paths):
        if item.is_dir():
            found = log_files(item)
            if not found:
                raise AuditError(f"no audit log files (audit-NNNNNN.jsonl) in {item}")
            files.extend(found)
        elif item.is_file():
            files.append(item)
        else:
            raise AuditError(f"{item} is neither an audit log file nor a folder of them")
    return files


@dataclass(frozen=True)
class _Entry:
    file: str
    line: int
    raw: bytes
    record: dict[str, object] | None
    error: str | None
    partial: bool = False   # the log's last bytes, with no newline after them: a crash's leftovers


def _entries(files: Sequence[Path]) -> Iterator[_Entry]:
    for index, path in enumerate(files):
        try:
            data = path.read_bytes()
        except OSError as err:
            raise AuditError(f"cannot read audit log file {path}: {err.strerror}") from err
        lines = data.split(b"\n")
        for number, raw in enumerate(lines, start=1):
            if number == len(lines):
                if raw:  # no newline after it
                    last = index == len(files) - 1
                    yield _Entry(path.name, number, raw, None, "line does not end with a newline, inside the log",
                                 partial=last)
                break
            try:
                yield _Entry(path.name, number, raw, parse_record(raw), None)
            except ValueError as err:
                yield _Entry(path.name, number, raw, None, str(err))


class _Verifier:
    def __init__(self, checker: QuoteChecker | None) -> None:
        self.checker = checker
        self.records = self.anchors = self.covered = 0
        self.first_seq: int | None = None
        self.last: _Entry | None = None
        self.last_seq: int | None = None
        self.from_genesis = False
        self.anchored_through: int | None = None
        # records since the last valid anchor's covers: seq -> (line digest, is an anchor)
        self.pending: dict[int, tuple[bytes, bool]] = {}
        # to take back the last anchor when its own line turns out to be changed
        self.accepted_anchor: int | None = None
        self.before_anchor: tuple[int | None, int, dict[int, tuple[bytes, bool]]] = (None, 0, {})

    def check(self, entry: _Entry, following: _Entry | None) -> Problem | None:
        record = entry.record
        if record is None:
            return Problem(entry.file, entry.line, None, entry.error or "line is not a record")
        seq, prev = record["seq"], record["prev"]
        assert isinstance(seq, int)  # parse_record checked both
        assert isinstance(prev, str)
        if self.last is None:
            self.from_genesis, self.first_seq = prev == GENESIS_PREV, seq
            if (seq == 1) != self.from_genesis:
                return Problem(entry.file, entry.line, seq, "the first record's seq and prev disagree: "
                               "seq 1 and a prev of 64 zeros go together")
            if log_file_number(Path(entry.file)) == 1 and not self.from_genesis:
                return Problem(entry.file, entry.line, seq, f"the log's first file does not start the chain: "
                               f"its first record is seq {seq}, not 1")
        else:
            assert self.last_seq is not None
            if seq != self.last_seq + 1:
                return Problem(entry.file, entry.line, seq, f"seq {seq} follows {self.last_seq}")
            if prev != line_digest(self.last.raw).hex():
                return self.broken_link(entry, seq, following)
        is_anchor = record["kind"] == "anchor"
        if is_anchor:
            reason = self.check_anchor(record, seq)
            if reason is not None:
                return Problem(entry.file, entry.line, seq, reason)
        self.pending[seq] = (line_digest(entry.raw), is_anchor)
        self.records += 1
        self.last, self.last_seq = entry, seq
        return None

    def broken_link(self, entry: _Entry, seq: int, following: _Entry | None) -> Problem:
        """The record before `entry` does not hash to its prev: name the one that most likely changed."""
        before = self.last
        assert before is not None
        if following is None or following.record is None \
                or following.record["prev"] != line_digest(entry.raw).hex():
            return Problem(entry.file, entry.line, seq, f"prev does not match the previous record "
                           f"(seq {seq - 1}, {before.file} line {before.line})")
        # The chain goes on from `entry`: the record before it is the one that changed. Take it back.
        self.records -= 1
        self.last_seq = seq - 2 if self.records else None
        self.pending.pop(seq - 1, None)
        if self.anchored_through is not None and self.accepted_anchor == seq - 1:
            self.anchors -= 1
            self.anchored_through, self.covered, self.pending = self.before_anchor
        return Problem(before.file, before.line, seq - 1,
                       "record was changed: the next record's prev does not match it")

    def check_anchor(self, record: dict[str, object], seq: int) -> str | None:
        covers = record.get("covers")
        if not isinstance(covers, int) or isinstance(covers, bool):
            return "anchor has no covers (the seq it signs)"
        if covers not in self.pending or covers >= seq:
            return f"anchor covers seq {covers}, which is not a record since the last anchor"
        try:
            quote = AnchorQuote.from_record(record.get("quote"))
            if self.checker is not None:
                self.checker(quote, self.pending[covers][0])
        except (VouchdError, ValueError) as err:
            return f"anchor {err}"
        self.before_anchor = (self.anchored_through, self.covered, dict(self.pending))
        self.accepted_anchor = seq
        self.anchors += 1
        self.anchored_through = covers
        assert self.first_seq is not None
        self.covered = covers - self.first_seq + 1
        self.pending = {s: item for s, item in self.pending.items() if s > covers}
        return None


def verify_log(paths: Sequence[Path | str], ak_public: bytes | None, *,
               checker: QuoteChecker | None = None) -> VerifyReport:
    """Verify the audit log in `paths` (files in order; a folder expands to its files).

    Anchors are checked by `checker` when given, else against `ak_public` when given, else only
    for their shape (`anchors_checked` False). AuditError when a file cannot be read or the AK is
    not a TPM2B_PUBLIC; everything wrong inside the log is the report's `problem`.
    """
    files = expand_paths(paths)
    if checker is None and ak_public is not None:
        checker = tpm_quote_checker(ak_public)
    verifier = _Verifier(checker)
    problem = partial = None
    entries = _entries(files)
    entry = next(entries, None)
    while entry is not None:
        following = next(entries, None)
        if entry.partial:
            partial = Problem(entry.file, entry.line, None,
                              f"partial last line ({len(entry.raw)} bytes): dropped at next start")
            break
        problem = verifier.check(entry, following)
        if problem is not None:
            break
        entry = following
    if problem is not None:
        partial = None  # only a log that is otherwise sound ends in a crash's leftovers
    unanchored = sum(1 for _, is_anchor in verifier.pending.values() if not is_anchor)
    return VerifyReport(
        files=tuple(str(path) for path in files), records=verifier.records, first_seq=verifier.first_seq,
        last_seq=verifier.last_seq, from_genesis=verifier.from_genesis, anchors=verifier.anchors,
        anchored_through=verifier.anchored_through, covered=verifier.covered, unanchored=unanchored,
        anchors_checked=checker is not None, problem=problem, partial_tail=partial)
