"""The clock rules of DESIGN §4.5 on their own: what sends a node back to full attestation."""

from __future__ import annotations

import pytest

from vouchd.authority.errors import RefusalError
from vouchd.authority.store import NodeRecord, NodeState
from vouchd.authority.verifier import check_quote_continuity
from vouchd.evidence import Attest, AttestType, ClockInfo, PcrSelection, TpmAlg

DIGEST = b"\x11" * 32
NODE = NodeRecord(
    node_id="spiffe://example.org/vouchd/node/tpm/" + "ab" * 32, ek_hash="ab" * 32, tier="hardware",
    state=NodeState.TRUSTED, ak_public=b"", node_key_public=b"", selectors=(), pcr_bank="sha256",
    pcr_indices=tuple(range(8)), pcr_digest=DIGEST, reset_count=5, restart_count=3, clock=10_000,
    attested_at=0.0, last_quote_at=0.0,
)


def quote(*, reset: int = 5, restart: int = 3, clock: int = 10_500, digest: bytes = DIGEST) -> Attest:
    return Attest(type=AttestType.QUOTE, qualified_signer=b"", extra_data=b"",
                  clock_info=ClockInfo(clock=clock, reset_count=reset, restart_count=restart, safe=True),
                  firmware_version=0, pcr_selection=(PcrSelection(TpmAlg.SHA256, tuple(range(8))),),
                  pcr_digest=digest, certified_name=b"", certified_qualified_name=b"", raw=b"")


@pytest.mark.parametrize("attest", [
    quote(),                                  # the clock moved on within the same boot
    quote(restart=4, clock=100),              # a resume: restartCount up, the clock may start lower
])
def test_quotes_of_the_attested_boot_pass(attest: Attest) -> None:
    check_quote_continuity(NODE, attest)


@pytest.mark.parametrize(("attest", "reason"), [
    (quote(reset=6), "the TPM was reset since the last attestation"),
    (quote(reset=4), "the TPM was reset since the last attestation"),
    (quote(restart=2, clock=20_000), "the TPM clock went backwards"),
    (quote(clock=9_999), "the TPM clock went backwards"),
    (quote(digest=b"\x22" * 32), "PCR values changed since the last attestation"),
])
def test_anything_else_demands_a_full_attestation(attest: Attest, reason: str) -> None:
    with pytest.raises(RefusalError) as refused:
        check_quote_continuity(NODE, attest)
    assert (refused.value.code, str(refused.value)) == ("reattest", reason)
