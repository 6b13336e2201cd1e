"""The agent's saved state: encrypted, its key sealed to PCR values, discarded (never trusted) when
it cannot be used. The sealer here is a fake with the TPM's contract; tests/tpm runs the real one."""

from __future__ import annotations

import os
import stat
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from vouchd.agent.cached import CachedSvid
from vouchd.agent.savedstate import KEY_FILE, STATE_FILE, SavedState, StateVault
from vouchd.authority.ca import CertificateAuthority
from vouchd.entries import Entry
from vouchd.selectors import selector_set
from vouchd.spiffe import SpiffeId, TrustDomain, TrustTier

pytestmark = pytest.mark.timeout(20)

TD = TrustDomain("example.org")
NODE = "spiffe://example.org/vouchd/node/tpm/" + "a" * 64
NOW = 1_800_000_000.0


class PcrsChangedError(Exception):
    pass


class FakeSealer:
    """Seals to the current 'PCR value'; unsealing after it changed fails, as the TPM's policy would."""

    def __init__(self) -> None:
        self.pcr_value = b"boot-1"
        self.sealed_count = 0

    async def seal_secret(self, data: bytes, *, bank: str, pcrs: Sequence[int]) -> bytes:
        self.sealed_count += 1
        return self.pcr_value + b"|" + data

    async def unseal_secret(self, sealed: bytes) -> bytes:
        value, _, data = sealed.partition(b"|")
        if value != self.pcr_value:
            raise PcrsChangedError("PCR values differ from when it was sealed")
        return data


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca"), TD)


def held_svid(ca: CertificateAuthority, *, expires_at: float) -> CachedSvid:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.sign_x509_svid(key.public_key(), TD.spiffe_id("/web"), ttl=timedelta(hours=1), tier=TrustTier.HARDWARE)
    return CachedSvid(entry_id="web", entry_revision=3, spiffe_id="spiffe://example.org/web", certificate=cert,
                      chain_der=cert.public_bytes(serialization.Encoding.DER),
                      private_key_der=key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                                        serialization.NoEncryption()),
                      issued_at=NOW - 10, expires_at=expires_at, rotate_at=NOW + 1000)


def state_of(ca: CertificateAuthority, *svids: CachedSvid) -> SavedState:
    entry = Entry(id="web", spiffe_id=SpiffeId.parse("spiffe://example.org/web"),
                  selectors=selector_set(["unix:uid:1000"]), revision=3)
    return SavedState.of(NODE, saved_at=NOW, entries=[entry], svids=svids, bundle=b"bundle", jwt_bundle=b"{}",
                         revocations=None)


async def test_a_saved_state_loads_back_whole_in_the_same_boot(tmp_path: Path, ca: CertificateAuthority) -> None:
    sealer = FakeSealer()
    svid = held_svid(ca, expires_at=NOW + 3600)
    await StateVault(tmp_path, sealer, unavailable=(PcrsChangedError,)).save(state_of(ca, svid), bank="sha256",
                                                                             pcrs=range(8))

    loaded = await StateVault(tmp_path, sealer, unavailable=(PcrsChangedError,)).load(NODE)

    assert loaded is not None
    assert [e.id for e in loaded.entries] == ["web"]
    (restored,) = loaded.cached_svids(NOW)
    assert restored.private_key_der == svid.private_key_der and restored.serial == svid.serial
    for name in (KEY_FILE, STATE_FILE):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o600
    assert svid.private_key_der not in (tmp_path / STATE_FILE).read_bytes(), "the key is never on disk in clear"


async def test_the_key_is_sealed_once_per_boot(tmp_path: Path, ca: CertificateAuthority) -> None:
    sealer = FakeSealer()
    vault = StateVault(tmp_path, sealer, unavailable=(PcrsChangedError,))
    for _ in range(3):
        await vault.save(state_of(ca), bank="sha256", pcrs=range(8))

    assert sealer.sealed_count == 1


async def test_after_the_pcrs_changed_the_state_is_discarded_not_used(tmp_path: Path, ca: CertificateAuthority,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    sealer = FakeSealer()
    await StateVault(tmp_path, sealer, unavailable=(PcrsChangedError,)).save(
        state_of(ca, held_svid(ca, expires_at=NOW + 3600)), bank="sha256", pcrs=range(8))
    sealer.pcr_value = b"boot-2"

    loaded = await StateVault(tmp_path, sealer, unavailable=(PcrsChangedError,)).load(NODE)

    assert loaded is None
    assert not (tmp_path / STATE_FILE).exists() and not (tmp_path / KEY_FILE).exists()
    (record,) = [r for r in caplog.records if r.name == "vouchd.agent.savedstate"]
    assert "the boot or the machine changed" in record.reason  # type: ignore[attr-defined]


@pytest.mark.parametrize("damage", ["flipped byte", "truncated", "other node", "bad magic"])
async def test_a_damaged_or_foreign_state_is_discarded(tmp_path: Path, ca: CertificateAuthority,
                                                       damage: str) -> None:
    sealer = FakeSealer()
    await StateVault(tmp_path, sealer, unavailable=(PcrsChangedError,)).save(state_of(ca), bank="sha256",
                                                                             pcrs=range(8))
    path = tmp_path / STATE_FILE
    data = bytearray(path.read_bytes())
    node = NODE
    if damage == "flipped byte":
        data[-5] ^= 1
    elif damage == "truncated":
        del data[20:]
    elif damage == "bad magic":
        data[0] ^= 1
    else:
        node = "spiffe://example.org/vouchd/node/tpm/" + "b" * 64
    path.write_bytes(bytes(data))
    os.chmod(path, 0o600)

    assert await StateVault(tmp_path, sealer, unavailable=(PcrsChangedError,)).load(node) is None
    assert not path.exists()


async def test_expired_svids_are_not_restored(tmp_path: Path, ca: CertificateAuthority) -> None:
    sealer = FakeSealer()
    await StateVault(tmp_path, sealer, unavailable=(PcrsChangedError,)).save(
        state_of(ca, held_svid(ca, expires_at=NOW - 1)), bank="sha256", pcrs=range(8))

    loaded = await StateVault(tmp_path, sealer, unavailable=(PcrsChangedError,)).load(NODE)

    assert loaded is not None and loaded.cached_svids(NOW) == []


async def test_a_state_file_others_may_read_is_not_used(tmp_path: Path, ca: CertificateAuthority) -> None:
    sealer = FakeSealer()
    await StateVault(tmp_path, sealer, unavailable=(PcrsChangedError,)).save(state_of(ca), bank="sha256",
                                                                             pcrs=range(8))
    os.chmod(tmp_path / STATE_FILE, 0o644)

    assert await StateVault(tmp_path, sealer, unavailable=(PcrsChangedError,)).load(NODE) is None
