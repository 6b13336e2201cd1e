"""Fixtures for tests that drive node attestation against a real swtpm."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import pytest

from tests.swtpm import Swtpm
from vouchd.authority.build import open_authority
from vouchd.authority.server import Authority
from vouchd.config import AuthorityConfig
from vouchd.decisions import Decision, DecisionBus
from vouchd.devtools import simulate_measured_boot
from vouchd.spiffe import TrustDomain
from vouchd.tpm import NodeKeys, TpmService

TRUST_DOMAIN = TrustDomain("example.org")


@dataclass
class BootedTpm:
    tcti: str
    event_log: Path
    swtpm: Swtpm


@pytest.fixture
async def booted_tpm(swtpm: Swtpm, tmp_path: Path) -> BootedTpm:
    """The session swtpm, freshly reset, with a simulated measured boot in PCRs 0-7."""
    swtpm.power_cycle()
    log = tmp_path / "eventlog.bin"
    await simulate_measured_boot(swtpm.tcti, log)
    return BootedTpm(tcti=swtpm.tcti, event_log=log, swtpm=swtpm)


@pytest.fixture
async def tpm(booted_tpm: BootedTpm) -> AsyncIterator[TpmService]:
    async with TpmService(booted_tpm.tcti) as service:
        yield service


@pytest.fixture
async def node_keys(tpm: TpmService, tmp_path: Path) -> NodeKeys:
    return await tpm.ensure_node_keys(tmp_path / "agent-tpm")


def authority_config(state_dir: Path, swtpm: Swtpm, **overrides: object) -> AuthorityConfig:
    values: dict[str, object] = {
        "state_dir": state_dir,
        "ek_roots": (swtpm.manufacturer_root,),
        "ek_intermediates": (swtpm.manufacturer_issuer,),
        "enrolment": "allowlist",
        "enrolled_ek_hashes": frozenset(),
        "pcr_bank": "sha256",
        "pcr_indices": tuple(range(8)),
        "accept_missing_event_log": False,
        "ca_ttl": timedelta(days=30),
        "node_svid_ttl": timedelta(hours=1),
        "x509_svid_ttl": timedelta(hours=1),
        "x509_svid_max_ttl": timedelta(hours=24),
    }
    values.update(overrides)
    return AuthorityConfig(**values)  # type: ignore[arg-type]


class RecordingBus:
    """A Publisher that keeps what the authority published, in order."""

    def __init__(self) -> None:
        self.published: list[tuple[str, bytes]] = []

    async def publish(self, topic: str, payload: bytes) -> None:
        self.published.append((topic, payload))


class RecordedDecisions(DecisionBus):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[Decision] = []
        self.subscribe(self.seen.append)


async def new_authority(config: AuthorityConfig, *, standalone: bool = False) -> Authority:
    return await open_authority(config, TRUST_DOMAIN, publisher=RecordingBus(), decisions=RecordedDecisions(),
                                standalone=standalone)


@pytest.fixture
async def authority(tmp_path: Path, swtpm: Swtpm) -> AsyncIterator[Authority]:
    instance = await new_authority(authority_config(tmp_path / "authority", swtpm), standalone=True)
    yield instance
    await instance.close()
