"""Hierarchy authorizations on a real swtpm: a changed endorsement or owner authorization is named with
its fix, the configured one works; and the EK record that names a changed `tpm.ek`.

These tests change the session swtpm's hierarchy authorizations, which survive TPM resets: each one
sets them back to empty in a `finally`, whatever happened in between.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from tpm2_pytss import ESAPI, ESYS_TR

from tests import swtpm as swtpm_mod
from vouchd.evidence import TpmPublic
from vouchd.protocol.identities import ek_hash
from vouchd.tpm import TpmAuthorizationError, TpmKeyError, TpmOperationError, TpmService

pytestmark = pytest.mark.tpm

DEADLINE = 30.0
ENDORSEMENT_SECRET = b"endorsement-s3cret-4711"
OWNER_SECRET = b"owner-s3cret-0815"


@contextlib.contextmanager
def hierarchy_auth(tcti: str, hierarchy: ESYS_TR, secret: bytes) -> Iterator[None]:
    """The hierarchy's authorization set to `secret` (as `tpm2_changeauth` would), empty again afterwards."""
    esapi = ESAPI(tcti)
    try:
        esapi.hierarchy_change_auth(hierarchy, secret)
    finally:
        esapi.close()
    try:
        yield
    finally:
        esapi = ESAPI(tcti)
        try:
            esapi.tr_set_auth(hierarchy, secret)
            esapi.hierarchy_change_auth(hierarchy, b"")
        finally:
            esapi.close()


def secret_file(path: Path, content: bytes, mode: int = 0o600) -> Path:
    path.write_bytes(content)
    path.chmod(mode)
    return path


def assert_no_secret(err: BaseException, *secrets: bytes) -> None:
    seen: BaseException | None = err
    while seen is not None:
        for secret in secrets:
            assert secret.decode() not in str(seen), "an authorization in an error message"
            assert secret.decode() not in repr(seen), "an authorization in an error's repr"
        seen = seen.__cause__ or seen.__context__


# --------------------------------------------------------------------------------------------- endorsement


async def test_a_changed_endorsement_authorization_stops_the_start_naming_the_fix(swtpm: swtpm_mod.Swtpm) -> None:
    with hierarchy_auth(swtpm.tcti, ESYS_TR.ENDORSEMENT, ENDORSEMENT_SECRET), \
            pytest.raises(TpmAuthorizationError) as caught:
        async with asyncio.timeout(DEADLINE), TpmService(swtpm.tcti):
            pass
    message = str(caught.value)
    assert message == (
        "the tpm refused the empty endorsement hierarchy authorization (tpm rc 0x9a2): someone set one "
        "(tpm2_changeauth -c e). Put it in a file only root may read (mode 0600) and name that file in "
        "agent.tpm.endorsement_auth_file, or set it back to empty with `tpm2_changeauth -c e -p CURRENT`"
    )
    assert not isinstance(caught.value, TpmOperationError)


async def test_the_configured_endorsement_authorization_creates_the_ek_and_uses_it_as_a_parent(
    swtpm: swtpm_mod.Swtpm, tmp_path: Path
) -> None:
    async with asyncio.timeout(DEADLINE), TpmService(swtpm.tcti) as reference:
        expected_ek = reference.ek
    # As `echo SECRET > FILE` writes it: the trailing newline is not part of the authorization.
    auth_file = secret_file(tmp_path / "endorsement.auth", ENDORSEMENT_SECRET + b"\n")
    state = tmp_path / "state"
    with hierarchy_auth(swtpm.tcti, ESYS_TR.ENDORSEMENT, ENDORSEMENT_SECRET):
        async with asyncio.timeout(DEADLINE), TpmService(swtpm.tcti, endorsement_auth_file=auth_file) as tpm:
            assert tpm.ek == expected_ek
            assert ENDORSEMENT_SECRET.decode() not in repr(tpm)
            await tpm.ensure_node_keys(state)  # Create under the EK: PolicySecret(endorsement)
            await tpm.quote("sha256", [0], b"nonce")
        # A second service loads the keys from their blobs: PolicySecret again.
        async with asyncio.timeout(DEADLINE), TpmService(swtpm.tcti, endorsement_auth_file=auth_file) as tpm:
            await tpm.ensure_node_keys(state)
            await tpm.certify_node_key(b"nonce")


async def test_the_authorization_survives_a_reset_and_a_hex_file_matches_tpm2_tools(
    swtpm: swtpm_mod.Swtpm, tmp_path: Path
) -> None:
    secret = bytes([0, 255, 10, 65])  # not text: written as tpm2_changeauth -c e hex:00ff0a41 would set it
    with hierarchy_auth(swtpm.tcti, ESYS_TR.ENDORSEMENT, secret):
        swtpm.power_cycle()  # a reboot does not clear a hierarchy authorization
        with pytest.raises(TpmAuthorizationError, match="refused the empty endorsement hierarchy"):
            async with asyncio.timeout(DEADLINE), TpmService(swtpm.tcti):
                pass
        auth_file = secret_file(tmp_path / "endorsement.auth", b"hex:00ff0a41\n")
        async with asyncio.timeout(DEADLINE), TpmService(swtpm.tcti, endorsement_auth_file=auth_file) as tpm:
            await tpm.ensure_node_keys(tmp_path / "state")


async def test_a_file_with_another_authorization_is_named_and_the_value_is_not(
    swtpm: swtpm_mod.Swtpm, tmp_path: Path
) -> None:
    wrong = b"not-the-current-one"
    auth_file = secret_file(tmp_path / "endorsement.auth", wrong)
    with hierarchy_auth(swtpm.tcti, ESYS_TR.ENDORSEMENT, ENDORSEMENT_SECRET), \
            pytest.raises(TpmAuthorizationError) as caught:
        async with asyncio.timeout(DEADLINE), TpmService(swtpm.tcti, endorsement_auth_file=auth_file):
            pass
    assert str(caught.value) == (
        f"the tpm refused the endorsement hierarchy authorization read from {auth_file} "
        "(agent.tpm.endorsement_auth_file) (tpm rc 0x9a2): the file does not hold the current one. Write the "
        "current one into it, or set the hierarchy's to the file's with `tpm2_changeauth -c e -p CURRENT NEW`"
    )
    assert_no_secret(caught.value, wrong, ENDORSEMENT_SECRET)


async def test_an_authorization_set_while_the_agent_runs_leaves_loaded_keys_working_until_a_reset(
    swtpm: swtpm_mod.Swtpm, tmp_path: Path
) -> None:
    async with asyncio.timeout(DEADLINE), TpmService(swtpm.tcti) as tpm:
        await tpm.ensure_node_keys(tmp_path / "state")
        await tpm.quote("sha256", [0], b"before")
        with hierarchy_auth(swtpm.tcti, ESYS_TR.ENDORSEMENT, ENDORSEMENT_SECRET):
            # Saved contexts need no authorization: the running agent keeps quoting.
            await tpm.quote("sha256", [0], b"after")
            # Creating a key under the EK (its saved context still loads) needs PolicySecret(endorsement).
            with pytest.raises(TpmAuthorizationError, match="refused the empty endorsement hierarchy"):
                await tpm.ensure_node_keys(tmp_path / "another state")
            swtpm.power_cycle()
            # The reset dropped the saved contexts; loading the AK again needs PolicySecret(endorsement).
            with pytest.raises(TpmAuthorizationError, match="refused the empty endorsement hierarchy"):
                await tpm.quote("sha256", [0], b"after the reset")


@pytest.mark.parametrize(
    ("content", "mode", "expected"),
    [
        (ENDORSEMENT_SECRET, 0o640, r"agent\.tpm\.endorsement_auth_file .* is accessible to group or others "
                                    r"\(mode 0640\), want 0600: it holds a tpm authorization"),
        (None, 0o600, r"cannot read agent\.tpm\.endorsement_auth_file .*: No such file or directory"),
        (b"hex:zz", 0o600, r"starts with hex: but the rest is not hex digits"),
        (b"x" * 65, 0o600, r"holds 65 bytes, more than a tpm authorization can have \(64\)"),
    ],
)
async def test_an_unusable_authorization_file_is_refused_before_the_tpm_is_asked(
    swtpm: swtpm_mod.Swtpm, tmp_path: Path, content: bytes | None, mode: int, expected: str
) -> None:
    path = tmp_path / "endorsement.auth"
    if content is not None:
        secret_file(path, content, mode)
    with pytest.raises(TpmAuthorizationError, match=expected) as caught:
        async with asyncio.timeout(DEADLINE), TpmService(swtpm.tcti, endorsement_auth_file=path):
            pass
    assert caught.value.__cause__ is None, "the file's content stays out of the chain"
    if content is not None:
        assert_no_secret(caught.value, content)


# ---------------------------------------------------------------------------------------------------- owner


async def test_a_changed_owner_authorization_stops_sealing_naming_the_fix_and_the_configured_one_works(
    swtpm: swtpm_mod.Swtpm, tmp_path: Path
) -> None:
    with hierarchy_auth(swtpm.tcti, ESYS_TR.OWNER, OWNER_SECRET):
        # The EK and the node's keys need only the endorsement hierarchy.
        async with asyncio.timeout(DEADLINE), TpmService(swtpm.tcti) as tpm:
            await tpm.ensure_node_keys(tmp_path / "state")
            with pytest.raises(TpmAuthorizationError) as caught:
                await tpm.seal(b"k" * 32, bank="sha256", pcrs=[23])
        assert str(caught.value) == (
            "the tpm refused the empty owner hierarchy authorization (tpm rc 0x9a2): someone set one "
            "(tpm2_changeauth -c o). Put it in a file only root may read (mode 0600) and name that file in "
            "agent.tpm.owner_auth_file, or set it back to empty with `tpm2_changeauth -c o -p CURRENT`"
        )
        auth_file = secret_file(tmp_path / "owner.auth", b"str:" + OWNER_SECRET)
        async with asyncio.timeout(DEADLINE), TpmService(swtpm.tcti, owner_auth_file=auth_file) as tpm:
            blob = await tpm.seal(b"k" * 32, bank="sha256", pcrs=[23])
            assert await tpm.unseal(blob) == b"k" * 32
        # Unsealing derives the storage key again in a new service: the owner authorization again.
        async with asyncio.timeout(DEADLINE), TpmService(swtpm.tcti) as tpm:
            with pytest.raises(TpmAuthorizationError, match="refused the empty owner hierarchy"):
                await tpm.unseal(blob)
    async with asyncio.timeout(DEADLINE), TpmService(swtpm.tcti) as tpm:
        assert await tpm.unseal(blob) == b"k" * 32, "the same storage key under the empty authorization"


# ------------------------------------------------------------------------------------------------ EK record


async def test_keys_record_the_ek_they_were_made_under_as_the_node_id_hashes_it(
    swtpm: swtpm_mod.Swtpm, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    async with asyncio.timeout(DEADLINE), TpmService(swtpm.tcti) as tpm:
        await tpm.ensure_node_keys(state)
        expected_hash = ek_hash(TpmPublic.from_tpm2b(tpm.ek.public))
    record = json.loads((state / "ek.json").read_text())
    assert record == {"ek_type": "rsa2048", "ek_hash": expected_hash}
    assert (state / "ek.json").stat().st_mode & 0o777 == 0o600


async def test_keys_made_under_another_ek_of_the_same_type_say_the_tpm_changed(
    swtpm: swtpm_mod.Swtpm, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    async with asyncio.timeout(DEADLINE), TpmService(swtpm.tcti) as tpm:
        await tpm.ensure_node_keys(state)
        this_hash = ek_hash(TpmPublic.from_tpm2b(tpm.ek.public))
    other_hash = "ab" * 32
    (state / "ek.json").write_text(json.dumps({"ek_type": "rsa2048", "ek_hash": other_hash}))
    async with asyncio.timeout(DEADLINE), TpmService(swtpm.tcti) as tpm:
        with pytest.raises(TpmKeyError) as caught:
            await tpm.ensure_node_keys(state)
    assert str(caught.value) == (
        f"the keys in {state} were made under another rsa2048 endorsement key (ek hash {other_hash[:16]}…, this "
        f"tpm's is {this_hash[:16]}…): the tpm was replaced or its endorsement seed changed, or the folder comes "
        f"from another host; to go on as a new node (a new identity), stop the agent and move {state} aside"
    )


async def test_an_ek_record_without_keys_is_replaced_by_the_new_keys_one(
    swtpm: swtpm_mod.Swtpm, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    state.mkdir(mode=0o700)
    (state / "ek.json").write_text(json.dumps({"ek_type": "ecc-p384", "ek_hash": "cd" * 32}))
    os.chmod(state / "ek.json", 0o600)
    async with asyncio.timeout(DEADLINE), TpmService(swtpm.tcti) as tpm:
        await tpm.ensure_node_keys(state)
    assert json.loads((state / "ek.json").read_text())["ek_type"] == "rsa2048"


@pytest.mark.parametrize("content", [b"{", b'{"ek_type": "rsa4096", "ek_hash": "' + b"ab" * 32 + b'"}',
                                     b'{"ek_type": "rsa2048", "ek_hash": "xyz"}', b"[]"])
async def test_a_corrupt_ek_record_is_named(swtpm: swtpm_mod.Swtpm, tmp_path: Path, content: bytes) -> None:
    state = tmp_path / "state"
    async with asyncio.timeout(DEADLINE), TpmService(swtpm.tcti) as tpm:
        await tpm.ensure_node_keys(state)
        (state / "ek.json").write_bytes(content)
        with pytest.raises(TpmKeyError, match=r"key file .*ek\.json is corrupt"):
            await tpm.ensure_node_keys(state)
