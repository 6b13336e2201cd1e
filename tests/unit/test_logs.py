"""Structured logs: one JSON object per line, with the call site's fields as top-level keys."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from vouchd.logs import JsonFormatter, TextFormatter, configure_logging


def record(msg: str = "svid issued", *args: object, level: int = logging.INFO, exc_info: bool = False,
           **extra: object) -> logging.LogRecord:
    """A record as logger.log(level, msg, *args, extra=extra) makes it."""
    info = None
    if exc_info:
        try:
            raise RuntimeError("boom\nsecond line")
        except RuntimeError:
            info = sys.exc_info()
    return logging.getLogger("vouchd.test").makeRecord(
        "vouchd.test", level, __file__, 10, msg, args, info, extra=extra or None
    )


def test_a_record_is_one_json_object_with_the_standard_keys() -> None:
    line = JsonFormatter().format(record("entry %s synced", "web", level=logging.WARNING))

    entry = json.loads(line)
    assert set(entry) == {"time", "level", "logger", "msg"}
    assert entry["level"] == "warning"
    assert entry["logger"] == "vouchd.test"
    assert entry["msg"] == "entry web synced"
    assert entry["time"].endswith("+00:00")


def test_extras_become_top_level_keys() -> None:
    line = JsonFormatter().format(record(entry_id="web", svid_serial="1f", entries=["a", "b"], attempt=2))

    entry = json.loads(line)
    assert entry["entry_id"] == "web"
    assert entry["svid_serial"] == "1f"
    assert entry["entries"] == ["a", "b"]
    assert entry["attempt"] == 2


def test_values_json_cannot_hold_are_written_as_text() -> None:
    entry = json.loads(JsonFormatter().format(record(path=Path("/run/vouchd/agent.sock"))))

    assert entry["path"] == "/run/vouchd/agent.sock"


@pytest.mark.parametrize(
    "made",
    [
        record("first line\nsecond line"),
        record("failed", exc_info=True),
        record("with a field", reason="multi\nline\nreason"),
    ],
    ids=["multi-line message", "exception", "multi-line field"],
)
def test_every_record_is_exactly_one_line(made: logging.LogRecord) -> None:
    line = JsonFormatter().format(made)

    assert "\n" not in line
    assert json.loads(line)["logger"] == "vouchd.test"


def test_an_exception_is_kept_in_its_own_key() -> None:
    entry = json.loads(JsonFormatter().format(record("failed", exc_info=True)))

    assert entry["msg"] == "failed"
    assert "RuntimeError: boom" in entry["exception"]


def test_the_text_format_puts_fields_after_the_message() -> None:
    line = TextFormatter().format(record("svid issued", entry_id="web"))

    assert line.endswith("info    svid issued  entry_id=web")


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """configure_logging changes the root logger: put it back as pytest had it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    noisy = {name: logging.getLogger(name).level for name in ("grpclib", "asyncio", "aiomqtt")}
    try:
        yield root
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, noisy_level in noisy.items():
            logging.getLogger(name).setLevel(noisy_level)


def test_configure_logging_writes_json_lines_to_stderr(root_logger: logging.Logger,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("info", "json")

    logging.getLogger("vouchd.agent").info("node attested", extra={"node_id": "spiffe://example.org/n"})
    logging.getLogger("vouchd.agent").debug("not at info")
    logging.getLogger("grpclib.server").info("chatty")

    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == ""
    assert len(lines) == 1
    assert json.loads(lines[0])["node_id"] == "spiffe://example.org/n"


def test_configure_logging_sets_the_level(root_logger: logging.Logger, capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("debug", "text")

    logging.getLogger("vouchd.agent").debug("visible now", extra={"entry_id": "web"})

    assert capsys.readouterr().err.rstrip("\n").endswith("debug   visible now  entry_id=web")
