"""Boot profiles are sequences per PCR, in event-log order, not bags of digests (DESIGN §4.4)."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.unit.test_authority_server import start
from tests.unit.test_evidence_verify import fake_ak, fake_node_key
from vouchd.authority.errors import RefusalError
from vouchd.authority.server import Authority
from vouchd.authority.verifier import AttestationSession, match_profile, quoted_measurements
from vouchd.config import load_config
from vouchd.errors import ConfigError
from vouchd.evidence import EventLog, EventType, PcrSelection, TpmAlg, build_event_log, parse_event_log

SELECTION = PcrSelection(TpmAlg.SHA256, tuple(range(8)))
A, B = b"option rom A", b"option rom B"
SEPARATORS = [(pcr, int(EventType.EV_SEPARATOR), b"\0\0\0\0") for pcr in range(8)]


def boot(pcr0: list[bytes], *, pcr7_first: bool = False) -> EventLog:
    """A boot measuring `pcr0` into PCR 0 in that order, a Secure Boot event into PCR 7 (before or
    after them), then the separators."""
    pcr7 = [(7, int(EventType.EV_EFI_VARIABLE_DRIVER_CONFIG), b"SecureBoot=1")]
    measured = [(0, int(EventType.EV_POST_CODE), data) for data in pcr0]
    events = (pcr7 + measured if pcr7_first else measured + pcr7) + SEPARATORS
    return parse_event_log(build_event_log(events)[0])


def measurements(log: EventLog) -> tuple[str, ...]:
    return quoted_measurements(log, SELECTION)


def digest_bag(log: EventLog) -> list[str]:
    """What a profile was before: "<pcr>:<bank>:<hex>" of each event, order and repeats lost."""
    return sorted({f"{pcr}:sha256:{d.hex()}" for pcr, _t, d in log.digests(TpmAlg.SHA256, SELECTION.pcrs)})


def test_measurements_carry_position_and_count_per_pcr() -> None:
    got = [m for m in measurements(boot([A, B])) if m.startswith("0:")]

    assert got == [f"0:sha256:1/3:{hashlib.sha256(A).hexdigest()}",
                   f"0:sha256:2/3:{hashlib.sha256(B).hexdigest()}",
                   f"0:sha256:3/3:{hashlib.sha256(bytes(4)).hexdigest()}"]


def test_a_profile_recorded_as_a_b_does_not_match_b_a() -> None:
    recorded, reordered = boot([A, B]), boot([B, A])
    assert digest_bag(recorded) == digest_bag(reordered), "the same bag of digests: only the order differs"

    profiles = {"golden": frozenset(measurements(recorded))}

    assert match_profile(profiles, measurements(recorded)) == "golden"
    assert match_profile(profiles, measurements(reordered)) is None


@pytest.mark.parametrize("pcr0", [[A], [A, A, B], [A, B, B], [B], [A, B, A]])
def test_missing_or_repeated_events_do_not_match(pcr0: list[bytes]) -> None:
    profiles = {"golden": frozenset(measurements(boot([A, B])))}

    assert match_profile(profiles, measurements(boot(pcr0))) is None


def test_order_counts_within_a_pcr_not_across_pcrs() -> None:
    # Firmware may interleave PCRs differently from boot to boot; each PCR's value depends only on its own order.
    profiles = {"golden": frozenset(measurements(boot([A, B])))}

    assert match_profile(profiles, measurements(boot([A, B], pcr7_first=True))) == "golden"


def test_the_first_matching_profile_by_order_of_the_mapping_wins() -> None:
    log = measurements(boot([A, B]))
    profiles = {"a-other": frozenset(measurements(boot([B, A]))), "b-golden": frozenset(log),
                "c-golden": frozenset(log)}

    assert match_profile(profiles, log) == "b-golden"


def session_for(log: EventLog) -> AttestationSession:
    return AttestationSession(
        session="s", node_id="spiffe://example.org/vouchd/node/tpm/" + "ab" * 32, ek_hash="ab" * 32,
        ek_issuer_cn=None, ak=fake_ak().public, node_key=fake_node_key().public, selection=SELECTION,
        event_log=log, expires_at=0.0, secret=b"", server_nonce=b"",
    )


@pytest.fixture
async def authority(tmp_path: Path) -> AsyncIterator[Authority]:
    instance = await start(tmp_path / "authority")
    yield instance
    await instance.close()


async def test_the_authority_refuses_a_reordered_boot_through_its_stored_profile(authority: Authority) -> None:
    recorded, reordered = boot([A, B]), boot([B, A])
    # Stored as `vouchd node learn` stores it: a sorted set of strings in SQLite.
    await authority.store.save_profile("golden", measurements(recorded), "test", now=authority.clock.now())

    assert await authority.attestation._event_log_profile(session_for(recorded), measurements(recorded)) == "golden"
    with pytest.raises(RefusalError) as refused:
        await authority.attestation._event_log_profile(session_for(reordered), measurements(reordered))
    assert refused.value.code == "policy"


async def test_a_profile_stored_by_an_older_vouchd_loads_and_names_the_fix(authority: Authority) -> None:
    recorded = boot([A, B])
    await authority.store.save_profile("baseline", digest_bag(recorded), "older vouchd", now=authority.clock.now())

    profiles = await authority.store.profiles()

    assert profiles == {"baseline": frozenset(digest_bag(recorded))}
    with pytest.raises(RefusalError) as refused:
        match_profile(profiles, measurements(recorded))
    assert refused.value.code == "policy"
    assert str(refused.value) == (
        "boot profile(s) baseline hold unordered measurements (recorded by an older vouchd) and cannot be "
        "checked in event-log order: on a boot you trust, record it again with "
        "`vouchd node learn --name baseline`, or drop it with `vouchd profile remove`")


def test_an_older_profile_does_not_stand_in_the_way_of_one_that_matches() -> None:
    recorded = boot([A, B])
    profiles = {"baseline": frozenset(digest_bag(recorded)), "relearned": frozenset(measurements(recorded))}

    assert match_profile(profiles, measurements(recorded)) == "relearned"


# ---------------------------------------------------------------- the bank profiles are taken from


@pytest.mark.parametrize(("text", "suggestion"), [("sha1:0-7", "sha256:0-7"), ("sha1:0,2,4", "sha256:0,2,4")])
def test_a_sha1_pcr_bank_is_refused_at_config_load(tmp_path: Path, text: str, suggestion: str) -> None:
    source = tmp_path / "vouchd.yaml"
    source.write_text(f"trust_domain: example.org\nauthority: {{pcr_selection: '{text}'}}\n")

    with pytest.raises(ConfigError) as refused:
        load_config(source, {})

    assert str(refused.value) == (f"{source}: authority.pcr_selection: the sha1 PCR bank is refused: sha1 is "
                                  f"collision-broken; use sha256 (e.g. {suggestion}), got {text!r}")
