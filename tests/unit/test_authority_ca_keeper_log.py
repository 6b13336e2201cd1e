"""What the CA keeper logs about the trust domain's roots: at start as well as while it runs."""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography import x509

from tests.fakes import FakeClock
from vouchd.authority.ca import stored_root_certificates
from vouchd.authority.keys import CaKeeper
from vouchd.spiffe import TrustDomain, serial_hex

TTL = timedelta(days=30)
TD = TrustDomain("example.org")
DAY = 86_400.0


def keeper(state_dir: Path, clock: FakeClock) -> CaKeeper:
    return CaKeeper(state_dir, TD, ca_ttl=TTL, clock=clock)


def ca_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "vouchd.authority" and r.getMessage().startswith("ca ")]


def named(certificate: x509.Certificate) -> tuple[str, str]:
    return serial_hex(certificate), certificate.subject.rfc4514_string()


def test_the_first_start_logs_the_root_it_creates(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="vouchd.authority"):
        ca = keeper(tmp_path, FakeClock()).loaded

    (record,) = ca_records(caplog)
    assert record.getMessage() == "ca root created"
    assert record.levelno == logging.INFO
    assert (record.root_serial, record.root_subject) == named(ca.certificate)
    assert record.state_dir == str(tmp_path)


def test_a_root_that_expired_while_the_authority_was_down_is_logged_as_replaced_at_start(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    old = keeper(tmp_path, clock).loaded.certificate
    clock.advance(31 * DAY)  # past the root's end: no prepared root was made meanwhile

    with caplog.at_level(logging.INFO, logger="vouchd.authority"):
        new = keeper(tmp_path, clock).loaded.certificate

    (record,) = ca_records(caplog)
    assert record.getMessage() == "ca root replaced at start: the active root had expired"
    assert record.levelno == logging.INFO
    assert new != old
    assert (record.previous_root_serial, record.previous_root_subject) == named(old)
    assert (record.root_serial, record.root_subject) == named(new)
    assert record.previous_root_subject == "CN=vouchd example.org root 1,O=vouchd"
    assert record.root_subject == "CN=vouchd example.org root 2,O=vouchd"


def test_a_rotation_due_at_start_is_logged_with_both_roots(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    first = keeper(tmp_path, clock).loaded.certificate
    clock.advance(16 * DAY)  # under half left: the start prepares the next root
    with caplog.at_level(logging.INFO, logger="vouchd.authority"):
        prepared = keeper(tmp_path, clock).loaded.prepared
    assert prepared is not None
    (preparing,) = ca_records(caplog)
    assert preparing.getMessage() == "ca root prepared: published in the bundle, signs once agents have it"
    assert preparing.root_serial == serial_hex(prepared)
    caplog.clear()
    clock.advance(9 * DAY)  # under a quarter left, the prepared root published for more than a quarter

    with caplog.at_level(logging.INFO, logger="vouchd.authority"):
        active = keeper(tmp_path, clock).loaded.certificate

    (record,) = ca_records(caplog)
    assert record.getMessage() == "ca root replaced at start: its rotation was due"
    assert active == prepared
    assert (record.previous_root_serial, record.previous_root_subject) == named(first)
    assert (record.root_serial, record.root_subject) == named(prepared)


def test_a_start_that_changes_nothing_logs_nothing(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    keeper(tmp_path, clock)
    clock.advance(DAY)

    with caplog.at_level(logging.DEBUG, logger="vouchd.authority"):
        keeper(tmp_path, clock)

    assert ca_records(caplog) == []


def test_a_rotation_while_running_names_both_roots(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    running = keeper(tmp_path, clock)
    first = running.loaded.certificate
    clock.advance(16 * DAY)
    running.current()  # prepares
    clock.advance(9 * DAY)

    with caplog.at_level(logging.INFO, logger="vouchd.authority"):
        ca, rotated = running.current()

    assert rotated
    (record,) = ca_records(caplog)
    assert record.getMessage() == "ca rotated"
    assert (record.previous_root_serial, record.root_serial) == (serial_hex(first), serial_hex(ca.certificate))


def test_the_log_lines_carry_no_key_material(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = FakeClock()
    keeper(tmp_path, clock)
    clock.advance(31 * DAY)
    with caplog.at_level(logging.INFO, logger="vouchd.authority"):
        keeper(tmp_path, clock)
    key_pem = (tmp_path / "ca" / "root.key").read_text()
    key_body = "".join(key_pem.splitlines()[1:-1])

    (record,) = ca_records(caplog)
    fields = " ".join(str(value) for value in vars(record).values())
    assert "PRIVATE KEY" not in fields
    assert key_body[50:90] not in fields  # past the PKCS#8 header every P-256 key shares: the private scalar


def test_the_stored_roots_are_read_without_a_rotation(tmp_path: Path) -> None:
    assert stored_root_certificates(tmp_path) == (None, None)
    clock = FakeClock()
    ca = keeper(tmp_path, clock).loaded
    clock.advance(40 * DAY)  # long expired on disk: reading must not replace it

    assert stored_root_certificates(tmp_path) == (ca.certificate, None)
    assert sorted(p.name for p in (tmp_path / "ca").iterdir()) == ["lock", "root.crt", "root.key"]
