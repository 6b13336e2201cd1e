"""TCG2 crypto-agile event logs: write, parse, replay, and refuse anything malformed."""

from __future__ import annotations

import contextlib
import hashlib
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vouchd.evidence import (
    EventType,
    EvidenceError,
    MalformedStructureError,
    TpmAlg,
    build_event_log,
    parse_event_log,
    simulated_boot_events,
)

HEADER_SIZE = 32 + 33  # SHA-1 format header event + Spec ID Event03 with one bank


def _extend(events: list[tuple[int, bytes]], hash_name: str = "sha256", size: int = 32) -> dict[int, bytes]:
    pcrs = {i: bytes(size) for i in range(24)}
    for pcr, digest in events:
        pcrs[pcr] = hashlib.new(hash_name, pcrs[pcr] + digest).digest()
    return pcrs


def _raw_event(pcr: int, event_type: int, digests: list[tuple[int, bytes]], data: bytes) -> bytes:
    body = struct.pack("<III", pcr, event_type, len(digests))
    body += b"".join(struct.pack("<H", alg) + digest for alg, digest in digests)
    return body + struct.pack("<I", len(data)) + data


def test_build_parse_replay_round_trip() -> None:
    events = simulated_boot_events()
    log, to_extend = build_event_log(events)
    parsed = parse_event_log(log)
    assert dict(parsed.algorithms) == {TpmAlg.SHA256: 32}
    assert [(e.pcr, e.event_type, e.data) for e in parsed.events] == events
    assert all(e.digests[TpmAlg.SHA256] == hashlib.sha256(e.data).digest() for e in parsed.events)
    assert to_extend == [(pcr, hashlib.sha256(data).digest()) for pcr, _type, data in events]
    replay = parsed.replay(TpmAlg.SHA256)
    assert replay == _extend(to_extend)
    assert all(replay[i] != bytes(32) for i in range(8))
    assert all(replay[i] == bytes(32) for i in range(8, 24))


def test_simulated_boot_closes_pcrs_0_to_7_with_separators() -> None:
    separators = [pcr for pcr, event_type, _ in simulated_boot_events() if event_type == EventType.EV_SEPARATOR]
    assert separators == list(range(8))
    assert simulated_boot_events() == simulated_boot_events()


def test_several_banks_replay_independently() -> None:
    events = simulated_boot_events()
    log, _ = build_event_log(events, (TpmAlg.SHA1, TpmAlg.SHA256, TpmAlg.SHA384))
    parsed = parse_event_log(log)
    assert dict(parsed.algorithms) == {TpmAlg.SHA1: 20, TpmAlg.SHA256: 32, TpmAlg.SHA384: 48}
    for alg, name, size in ((TpmAlg.SHA1, "sha1", 20), (TpmAlg.SHA384, "sha384", 48)):
        expected = _extend([(pcr, hashlib.new(name, data).digest()) for pcr, _t, data in events], name, size)
        assert parsed.replay(alg) == expected
    with pytest.raises(EvidenceError, match="no sha512 bank"):
        parsed.replay(TpmAlg.SHA512)


def test_no_action_events_are_not_extended_and_not_in_digests() -> None:
    events = [(0, EventType.EV_NO_ACTION, b"SP800-155 Event3\0"), (0, EventType.EV_POST_CODE, b"code")]
    log, to_extend = build_event_log(events)
    parsed = parse_event_log(log)
    assert to_extend == [(0, hashlib.sha256(b"code").digest())]
    assert parsed.events[0].digests[TpmAlg.SHA256] == bytes(32)
    assert parsed.replay(TpmAlg.SHA256) == _extend(to_extend)
    assert parsed.digests() == [(0, EventType.EV_POST_CODE, hashlib.sha256(b"code").digest())]


def test_startup_locality_sets_the_initial_pcr0() -> None:
    locality = (0, EventType.EV_NO_ACTION, b"StartupLocality\0\x03")
    log, to_extend = build_event_log([locality, (0, EventType.EV_POST_CODE, b"code")])
    replay = parse_event_log(log).replay(TpmAlg.SHA256)
    assert replay[0] == hashlib.sha256(bytes(31) + b"\x03" + to_extend[0][1]).digest()


def test_startup_locality_after_a_pcr0_measurement_is_refused() -> None:
    events = [(0, EventType.EV_POST_CODE, b"code"), (0, EventType.EV_NO_ACTION, b"StartupLocality\0\x03")]
    log, _ = build_event_log(events)
    with pytest.raises(EvidenceError, match="event 1 StartupLocality"):
        parse_event_log(log).replay(TpmAlg.SHA256)


def test_event_missing_the_replayed_bank_is_refused_at_replay() -> None:
    log, _ = build_event_log([(0, 1, b"a")], (TpmAlg.SHA1, TpmAlg.SHA256))
    log += _raw_event(3, 1, [(TpmAlg.SHA1, hashlib.sha1(b"b").digest())], b"b")
    parsed = parse_event_log(log)
    assert len(parsed.replay(TpmAlg.SHA1)) == 24
    with pytest.raises(EvidenceError, match="event 1 has no sha256 digest"):
        parsed.replay(TpmAlg.SHA256)
    with pytest.raises(EvidenceError, match="event 1 has no sha256 digest"):
        parsed.digests()


def test_build_refuses_what_it_cannot_write() -> None:
    with pytest.raises(EvidenceError, match="sha256"):
        build_event_log([], (TpmAlg.SHA1,))
    with pytest.raises(EvidenceError, match="pcr 24"):
        build_event_log([(24, 1, b"")])


# ---------------------------------------------------------------- malformed logs


def _one_event_log() -> bytes:
    log, _ = build_event_log([(4, EventType.EV_EFI_ACTION, b"Calling EFI Application")])
    return log


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda log: log[:32] + b"Spec ID Event02\0" + log[48:], "not crypto-agile"),
    (lambda log: struct.pack("<I", 1) + log[4:], "header is not an EV_NO_ACTION event on pcr 0"),
    (lambda log: log[:56] + struct.pack("<I", 0) + log[60:], "numberOfAlgorithms 0"),
    (lambda log: log[:60] + struct.pack("<HH", TpmAlg.SHA256, 20) + log[64:], "size 20 is not a hash size"),
    (lambda log: log[:60] + struct.pack("<HH", 0x7777, 32) + log[64:], "algorithmId 0x7777"),
    (lambda log: log[:HEADER_SIZE] + struct.pack("<I", 24) + log[HEADER_SIZE + 4 :],
     "event 0 pcrIndex 24 is out of range"),
    (lambda log: log[: HEADER_SIZE + 8] + struct.pack("<I", 2) + log[HEADER_SIZE + 12 :],
     "event 0 digests.count 2 is out of range"),
    (lambda log: log[: HEADER_SIZE + 12] + struct.pack("<H", TpmAlg.SHA1) + log[HEADER_SIZE + 14 :],
     r"event 0 digests\[0\].hashAlg 0x0004 is not in the header"),
    (lambda log: log + b"\0\0", "event 1 pcrIndex is truncated"),
    (lambda log: log[:-1], "event 0 event is truncated"),
    (lambda log: log[: HEADER_SIZE + 46] + struct.pack("<I", 1 << 30) + log[HEADER_SIZE + 50 :],
     "event 0 event is truncated"),
])
def test_malformed_logs_name_the_event_and_field(mutate: object, message: str) -> None:
    with pytest.raises(MalformedStructureError, match=message):
        parse_event_log(mutate(_one_event_log()))  # type: ignore[operator]


def test_every_truncation_is_malformed() -> None:
    log = _one_event_log()
    for end in range(len(log)):
        if end == HEADER_SIZE:  # a header alone is a valid, empty log
            assert parse_event_log(log[:end]).events == ()
            continue
        with pytest.raises(MalformedStructureError):
            parse_event_log(log[:end])


def test_size_and_event_count_are_bounded() -> None:
    log, _ = build_event_log([(0, 1, b"x")] * 5)
    with pytest.raises(MalformedStructureError, match="320 bytes, more than the 100 allowed"):
        parse_event_log(log, max_size=100)
    with pytest.raises(MalformedStructureError, match="more than the 4 events allowed"):
        parse_event_log(log, max_events=4)
    assert len(parse_event_log(log, max_events=5).events) == 5


def test_duplicate_bank_in_an_event_is_malformed() -> None:
    log, _ = build_event_log([], (TpmAlg.SHA1, TpmAlg.SHA256))
    digest = hashlib.sha256(b"x").digest()
    log += _raw_event(0, 1, [(TpmAlg.SHA256, digest), (TpmAlg.SHA256, digest)], b"x")
    with pytest.raises(MalformedStructureError, match="event 0 digests list sha256 twice"):
        parse_event_log(log)


def _mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    positions = st.integers(min_value=0, max_value=len(seed) - 1)
    flip = st.tuples(positions, st.integers(1, 255)).map(
        lambda pv: seed[: pv[0]] + bytes([seed[pv[0]] ^ pv[1]]) + seed[pv[0] + 1 :])
    cut = positions.map(lambda p: seed[:p])
    insert = st.tuples(positions, st.binary(min_size=1, max_size=8)).map(
        lambda pb: seed[: pb[0]] + pb[1] + seed[pb[0] :])
    return st.one_of(flip, cut, insert)


_SEED_LOG = build_event_log(simulated_boot_events()[:4], (TpmAlg.SHA1, TpmAlg.SHA256))[0]


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=300), _mutations(_SEED_LOG)))
def test_parser_only_raises_evidence_errors(data: bytes) -> None:
    try:
        parsed = parse_event_log(data)
    except EvidenceError:
        return
    for alg in parsed.algorithms:
        with contextlib.suppress(EvidenceError):
            parsed.replay(alg)


event_strategy = st.tuples(st.integers(0, 23), st.integers(0, 0xFFFFFFFF), st.binary(max_size=64))


@settings(max_examples=100, deadline=None)
@given(st.lists(event_strategy, max_size=20))
def test_any_built_log_parses_back(events: list[tuple[int, int, bytes]]) -> None:
    log, to_extend = build_event_log(events, (TpmAlg.SHA256, TpmAlg.SHA512))
    parsed = parse_event_log(log)
    assert [(e.pcr, e.event_type, e.data) for e in parsed.events] == events
    assert [(pcr, digest) for pcr, _t, digest in parsed.digests()] == to_extend
