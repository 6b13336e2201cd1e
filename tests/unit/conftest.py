"""Fixtures the unit tests share."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.fusefs import wait_until_asleep

Spawn = Callable[[Path], subprocess.Popen[bytes]]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start `binary 60` (a sleep) and wait until it sleeps: it reads nothing more of its executable.
    Every child is killed at the end. (test_attestor_unix.py has a spawn of its own.)"""
    children: list[subprocess.Popen[bytes]] = []

    def start(binary: Path) -> subprocess.Popen[bytes]:
        child = subprocess.Popen([str(binary), "60"])
        children.append(child)
        wait_until_asleep(child.pid)
        return child

    yield start
    for child in children:
        child.kill()
        child.wait()
