"""Hierarchy authorizations without a TPM: the files that hold them, the `agent.tpm.*_auth_file` keys,
and what each TPM refusal tells the operator (dictionary-attack lockout included, which a swtpm's
hierarchies never enter: their authorizations are not DA-protected)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tpm2_pytss import TSS2_Exception

from vouchd.config import parse_config
from vouchd.errors import ConfigError
from vouchd.tpm import TpmAuthorizationError
from vouchd.tpm.hierarchies import Hierarchy, HierarchyAuth, HierarchyAuths, hierarchy_refusal, read_hierarchy_auth

TPM_RC_BAD_AUTH_SESSION_1 = 0x9A2
TPM_RC_AUTH_FAIL_SESSION_1 = 0x98E
TPM_RC_LOCKOUT = 0x921
TPM_RC_HIERARCHY_HANDLE_1 = 0x185
TPM_RC_INTEGRITY_PARAMETER_1 = 0x1DF
TCTI_RC_IO_ERROR = 0xA000A
ESYS_RC_LOOKING_LIKE_BAD_AUTH = (7 << 16) | 0x9A2  # not from the TPM, whatever its low bits say


def private_file(path: Path, content: bytes) -> Path:
    path.write_bytes(content)
    path.chmod(0o600)
    return path


@pytest.mark.parametrize(
    ("content", "value"),
    [
        (b"s3cret", b"s3cret"),
        (b"s3cret\n", b"s3cret"),  # echo SECRET > FILE
        (b"s3cret\r\n", b"s3cret"),
        (b"s3cret\n\n", b"s3cret\n"),  # one newline only: the rest is the operator's
        (b" spaced \n", b" spaced "),
        (b"str:hex:abc\n", b"hex:abc"),  # as tpm2_changeauth reads str:
        (b"hex:00ff0A41\n", bytes([0, 255, 10, 65])),
        (b"", b""),  # a file may say "empty" explicitly
        (b"\n", b""),
        (b"x" * 64, b"x" * 64),
    ],
)
def test_an_authorization_file_holds_what_tpm2_changeauth_takes(tmp_path: Path, content: bytes, value: bytes) -> None:
    path = private_file(tmp_path / "auth", content)
    auth = read_hierarchy_auth(Hierarchy.ENDORSEMENT, path)
    assert auth == HierarchyAuth(Hierarchy.ENDORSEMENT, value, path)
    if value:
        assert repr(value) not in repr(auth) and repr(value) not in repr(HierarchyAuths(endorsement=auth))


def test_no_file_means_the_empty_authorization_of_a_new_tpm() -> None:
    auths = HierarchyAuths.from_files(None, None)
    assert auths == HierarchyAuths()
    assert auths.of(Hierarchy.OWNER) == HierarchyAuth(Hierarchy.OWNER, b"", None)


def test_a_file_group_may_read_is_refused_naming_the_key(tmp_path: Path) -> None:
    path = private_file(tmp_path / "owner.auth", b"s3cret")
    path.chmod(0o604)
    with pytest.raises(TpmAuthorizationError) as caught:
        HierarchyAuths.from_files(None, path)
    assert str(caught.value) == (f"agent.tpm.owner_auth_file {path} is accessible to group or others (mode 0604), "
                                 "want 0600: it holds a tpm authorization")


def test_a_symlinked_file_is_refused(tmp_path: Path) -> None:
    target = private_file(tmp_path / "real.auth", b"s3cret")
    link = tmp_path / "link.auth"
    link.symlink_to(target)
    with pytest.raises(TpmAuthorizationError, match=r"cannot read agent\.tpm\.endorsement_auth_file .*link\.auth"):
        read_hierarchy_auth(Hierarchy.ENDORSEMENT, link)


def refusal(hierarchy: Hierarchy, rc: int, source: Path | None = None) -> str | None:
    found = hierarchy_refusal(HierarchyAuth(hierarchy, b"v" if source else b"", source), TSS2_Exception(rc))
    return None if found is None else str(found)


@pytest.mark.parametrize("rc", [TPM_RC_BAD_AUTH_SESSION_1, TPM_RC_AUTH_FAIL_SESSION_1])
def test_a_refused_authorization_names_the_hierarchy_the_key_and_tpm2_changeauth(rc: int) -> None:
    message = refusal(Hierarchy.OWNER, rc)
    assert message is not None
    assert message.startswith(f"the tpm refused the empty owner hierarchy authorization (tpm rc {rc:#x}): ")
    assert "agent.tpm.owner_auth_file" in message and "`tpm2_changeauth -c o -p CURRENT`" in message
    configured = refusal(Hierarchy.ENDORSEMENT, rc, Path("/etc/vouchd/endorsement.auth"))
    assert configured is not None
    assert configured.startswith("the tpm refused the endorsement hierarchy authorization read from "
                                 "/etc/vouchd/endorsement.auth (agent.tpm.endorsement_auth_file)")


def test_dictionary_attack_lockout_is_named_with_the_way_out() -> None:
    assert refusal(Hierarchy.ENDORSEMENT, TPM_RC_LOCKOUT) == (
        "the tpm is in dictionary-attack lockout and refuses the endorsement hierarchy authorization (tpm rc "
        "0x921): wait until it recovers (`tpm2_getcap properties-variable` shows TPM2_PT_LOCKOUT_COUNTER and "
        "TPM2_PT_LOCKOUT_RECOVERY), or clear it with `tpm2_dictionarylockout --clear-lockout -p LOCKOUT_AUTH`"
    )


def test_a_disabled_hierarchy_is_named() -> None:
    assert refusal(Hierarchy.ENDORSEMENT, TPM_RC_HIERARCHY_HANDLE_1) == (
        "the tpm's endorsement hierarchy is disabled (TPM2_HierarchyControl; tpm rc 0x185): it is enabled again "
        "at the next reboot"
    )


@pytest.mark.parametrize("rc", [TPM_RC_INTEGRITY_PARAMETER_1, TCTI_RC_IO_ERROR, ESYS_RC_LOOKING_LIKE_BAD_AUTH])
def test_other_failures_are_not_taken_for_an_authorization(rc: int) -> None:
    assert refusal(Hierarchy.OWNER, rc) is None


# ------------------------------------------------------------------------------------------------ config


def agent_config(tpm: str) -> str:
    return f"trust_domain: example.org\nagent:\n  tpm: {tpm}\n"


def test_config_takes_both_authorization_files_relative_to_the_file(tmp_path: Path) -> None:
    source = tmp_path / "etc" / "vouchd.yaml"
    config = parse_config(agent_config("{tcti: 'swtpm:path=/s', endorsement_auth_file: tpm/e.auth, "
                                       "owner_auth_file: /etc/vouchd/o.auth}"), source)
    assert config.agent is not None
    assert config.agent.tpm.endorsement_auth_file == tmp_path / "etc" / "tpm" / "e.auth"
    assert config.agent.tpm.owner_auth_file == Path("/etc/vouchd/o.auth")


def test_config_leaves_the_authorizations_empty_by_default(tmp_path: Path) -> None:
    config = parse_config(agent_config("{tcti: 'swtpm:path=/s'}"), tmp_path / "vouchd.yaml")
    assert config.agent is not None
    assert (config.agent.tpm.endorsement_auth_file, config.agent.tpm.owner_auth_file) == (None, None)


def test_config_refuses_a_misspelt_authorization_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"agent\.tpm\.endorsment_auth_file"):
        parse_config(agent_config("{endorsment_auth_file: /x}"), tmp_path / "vouchd.yaml")
