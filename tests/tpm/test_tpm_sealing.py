"""Sealing to PCRs on a real swtpm: round trip, a PCR extended since, a damaged blob, another TPM's blob.

The tests seal to PCRs 16 and 23, which no boot measures and the tests may extend; they leave nothing
loaded in the session swtpm.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from tpm2_pytss import ESAPI, TPM2_CAP, TPM2_HC, TPM2B_PUBLIC

from tests import swtpm as swtpm_mod
from vouchd.tpm import (
    SealedBlob,
    SealedDataUnavailableError,
    TpmArgumentError,
    TpmCapabilityError,
    TpmError,
    TpmService,
)

pytestmark = pytest.mark.tpm

DEADLINE = 30.0
SEALED_PCRS = (16, 23)
# In a marshaled TPM2B_PUBLIC: size, type, nameAlg, objectAttributes, then the authPolicy's size and bytes.
POLICY_OFFSET = 2 + 2 + 2 + 4 + 2


def loaded_handles(tcti: str) -> tuple[list[int], list[int]]:
    """Transient objects and loaded sessions currently in the TPM."""
    esapi = ESAPI(tcti)
    try:
        _, objects = esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, 64)
        _, sessions = esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HC.LOADED_SESSION_FIRST, 64)
        return list(objects.data.handles), list(sessions.data.handles)
    finally:
        esapi.close()


@pytest.fixture
async def tpm(swtpm: swtpm_mod.Swtpm) -> AsyncIterator[TpmService]:
    async with asyncio.timeout(DEADLINE), TpmService(swtpm.tcti) as service:
        yield service
    assert loaded_handles(swtpm.tcti) == ([], []), "every object and session flushed"


@pytest.fixture(scope="module")
def other_swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[swtpm_mod.Swtpm]:
    """Another TPM: its own seeds, so its storage key is not the session swtpm's."""
    state = tmp_path_factory.mktemp("other-swtpm")
    swtpm_mod.provision(state)
    instance = swtpm_mod.start(state)
    try:
        yield instance
    finally:
        instance.stop()


async def test_sealed_data_unseals_while_the_pcrs_hold_their_values(tpm: TpmService) -> None:
    key = os.urandom(32)
    async with asyncio.timeout(DEADLINE):
        blob = await tpm.seal(key, bank="sha256", pcrs=[23, 16])
        assert (blob.bank, blob.pcrs) == ("sha256", SEALED_PCRS)
        assert key not in blob.to_bytes() and key.hex() not in repr(blob)
        stored = SealedBlob.from_bytes(blob.to_bytes())
        assert stored == blob
        assert await tpm.unseal(stored) == key
        assert await tpm.unseal(stored) == key, "unsealing does not use the blob up"
        # The most a TPM seals in one object, and a single byte.
        largest = os.urandom(128)
        assert await tpm.unseal(await tpm.seal(largest, bank="sha256", pcrs=[16])) == largest
        assert await tpm.unseal(await tpm.seal(b"\x00", bank="sha256", pcrs=[16])) == b"\x00"


async def test_the_sealed_object_is_bound_to_this_tpm_and_to_its_policy_alone(tpm: TpmService) -> None:
    async with asyncio.timeout(DEADLINE):
        blob = await tpm.seal(b"k" * 32, bank="sha256", pcrs=list(SEALED_PCRS))
        values = await tpm.read_pcrs("sha256", SEALED_PCRS)
    public, _ = TPM2B_PUBLIC.unmarshal(blob.public)
    attributes = str(public.publicArea.objectAttributes).split("|")
    assert sorted(attributes) == ["adminwithpolicy", "fixedparent", "fixedtpm", "noda"]  # no userwithauth
    # PolicyPCR (TPM 2.0 Part 3, 23.7) over the values the PCRs held, in a SHA-256 session.
    selection = bytes.fromhex("00000001" "000b" "03" "000081")  # sha256: PCRs 16 and 23
    expected = hashlib.sha256(
        bytes(32) + bytes.fromhex("0000017f") + selection + hashlib.sha256(values[16] + values[23]).digest()
    ).digest()
    assert bytes(public.publicArea.authPolicy) == expected


async def test_a_pcr_extended_after_sealing_makes_unseal_fail_with_a_typed_error(tpm: TpmService) -> None:
    async with asyncio.timeout(DEADLINE):
        key = os.urandom(32)
        blob = await tpm.seal(key, bank="sha256", pcrs=list(SEALED_PCRS))
        await tpm.extend_pcr(23, hashlib.sha256(b"something measured after sealing").digest())
        with pytest.raises(SealedDataUnavailableError) as caught:
            await tpm.unseal(blob)
        assert str(caught.value) == (
            "pcrs 16, 23 of the sha256 bank differ from when the data was sealed (a pcr was extended since, or "
            "the host booted into another state)"
        )
        assert key.hex() not in str(caught.value)
        # The TPM still works, and data sealed to the new values unseals.
        assert await tpm.unseal(await tpm.seal(key, bank="sha256", pcrs=list(SEALED_PCRS))) == key
        # A PCR outside the selection changes nothing.
        again = await tpm.seal(key, bank="sha256", pcrs=[23])
        await tpm.extend_pcr(16, hashlib.sha256(b"another pcr").digest())
        assert await tpm.unseal(again) == key


def flipped(data: bytes, offset: int) -> bytes:
    damaged = bytearray(data)
    damaged[offset] ^= 0x01
    return bytes(damaged)


async def test_a_damaged_blob_raises_the_same_error_type_with_its_own_message(
    tpm: TpmService, tmp_path: Path
) -> None:
    async with asyncio.timeout(DEADLINE):
        keys = await tpm.ensure_node_keys(tmp_path / "state")
        blob = await tpm.seal(os.urandom(32), bank="sha256", pcrs=list(SEALED_PCRS))
        stored = blob.to_bytes()
        # Damage on disk is caught by the blob's checksum, before the TPM is asked.
        for offset in (0, 5, 12, len(stored) // 2, len(stored) - 1):
            with pytest.raises(SealedDataUnavailableError, match="the sealed blob is damaged"):
                SealedBlob.from_bytes(flipped(stored, offset))
        with pytest.raises(SealedDataUnavailableError, match="the sealed blob is damaged"):
            SealedBlob.from_bytes(stored[:-1])
        with pytest.raises(SealedDataUnavailableError, match="not a vouchd sealed blob"):
            SealedBlob.from_bytes(b"")
        # Damage the checksum cannot see: the TPM's integrity check refuses the private area.
        with pytest.raises(SealedDataUnavailableError, match="does not load in this tpm") as caught:
            await tpm.unseal(dataclasses.replace(blob, private=flipped(blob.private, len(blob.private) // 2)))
        assert "integrity check failed" in str(caught.value)
        # A public area whose policy was altered (to get past the PCRs) no longer matches the private area.
        with pytest.raises(SealedDataUnavailableError, match="does not load in this tpm"):
            await tpm.unseal(dataclasses.replace(blob, public=flipped(blob.public, POLICY_OFFSET + 5)))
        with pytest.raises(SealedDataUnavailableError, match="does not parse"):
            await tpm.unseal(dataclasses.replace(blob, public=blob.public[:-4]))
        # A public area of something else: a signing key's, say.
        with pytest.raises(SealedDataUnavailableError, match=r"not vouchd sealed data \(object type is not keyedhash"):
            await tpm.unseal(dataclasses.replace(blob, public=keys.ak.public))


async def test_a_blob_sealed_by_another_tpm_raises_the_same_error_type(
    tpm: TpmService, other_swtpm: swtpm_mod.Swtpm
) -> None:
    async with asyncio.timeout(DEADLINE):
        async with TpmService(other_swtpm.tcti) as other:
            foreign = await other.seal(os.urandom(32), bank="sha256", pcrs=list(SEALED_PCRS))
            assert len(await other.unseal(foreign)) == 32
        with pytest.raises(SealedDataUnavailableError, match="sealed by another tpm"):
            await tpm.unseal(foreign)


async def test_sealed_data_outlives_a_tpm_reset_with_the_same_pcr_values(
    swtpm: swtpm_mod.Swtpm, tpm: TpmService
) -> None:
    async with asyncio.timeout(DEADLINE):
        swtpm.power_cycle()  # PCRs 16 and 23 back to their reset values
        key = os.urandom(32)
        blob = await tpm.seal(key, bank="sha256", pcrs=list(SEALED_PCRS))
        swtpm.power_cycle()  # a reboot: the saved storage key context is gone, the PCRs start over
        assert await tpm.unseal(blob) == key, "the storage key is derived again, the same one"


async def test_sealing_arguments_are_checked_before_the_tpm_is_asked(tpm: TpmService) -> None:
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(TpmArgumentError, match="1 to 128 bytes, got 129"):
            await tpm.seal(b"x" * 129, bank="sha256", pcrs=[16])
        with pytest.raises(TpmArgumentError, match="1 to 128 bytes, got 0"):
            await tpm.seal(b"", bank="sha256", pcrs=[16])
        with pytest.raises(TpmArgumentError, match="at least one pcr"):
            await tpm.seal(b"x", bank="sha256", pcrs=[])
        with pytest.raises(TpmArgumentError, match="unknown pcr bank 'md5'"):
            await tpm.seal(b"x", bank="md5", pcrs=[16])
        with pytest.raises(TpmArgumentError, match="pcr indices repeat"):
            await tpm.seal(b"x", bank="sha256", pcrs=[16, 16])
        with pytest.raises(TpmArgumentError, match="takes a SealedBlob"):
            await tpm.unseal(b"raw bytes")  # type: ignore[arg-type]


async def test_a_bank_the_tpm_has_not_allocated_is_named_sha1_and_never_sealed_to(tpm: TpmService) -> None:
    # swtpm here allocates sha256 only. A PolicyPCR over an empty bank would cover no value at all.
    async with asyncio.timeout(DEADLINE):
        with pytest.raises(TpmCapabilityError, match=r"^pcrs 16 are not allocated in the sha1 bank$"):
            await tpm.seal(b"x", bank="sha1", pcrs=[16])
        with pytest.raises(TpmCapabilityError, match=r"^pcrs 0, 1 are not allocated in the sha1 bank$"):
            await tpm.read_pcrs("sha1", [0, 1])


async def test_seal_and_unseal_share_the_tpm_with_quotes_and_leave_nothing_loaded(
    tpm: TpmService, tmp_path: Path
) -> None:
    async with asyncio.timeout(DEADLINE):
        await tpm.ensure_node_keys(tmp_path / "state")
        keys = [os.urandom(32) for _ in range(8)]
        blobs = await asyncio.gather(*(tpm.seal(key, bank="sha256", pcrs=[16]) for key in keys))
        results = await asyncio.gather(*(tpm.unseal(blob) for blob in blobs),
                                       *(tpm.quote("sha256", [0], b"n") for _ in keys))
        assert results[: len(keys)] == keys
        assert "seal" in tpm.latency_snapshot() and "unseal" in tpm.latency_snapshot()


def test_sealed_blob_validates_what_it_holds() -> None:
    with pytest.raises(TpmArgumentError, match="unknown pcr bank"):
        SealedBlob(public=b"abc", private=b"abc", bank="md5", pcrs=(16,))
    with pytest.raises(TpmArgumentError, match="pcr indices from 0 to 23"):
        SealedBlob(public=b"abc", private=b"abc", bank="sha256", pcrs=(24,))
    with pytest.raises(TpmArgumentError, match="ascend"):
        SealedBlob(public=b"abc", private=b"abc", bank="sha256", pcrs=(23, 16))
    assert issubclass(SealedDataUnavailableError, TpmError)
