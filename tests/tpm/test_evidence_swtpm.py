"""vouchd.evidence against a real (software) TPM: the TPM produces keys, quotes, certifications
and activates credentials; the pure-Python side must agree with it byte for byte."""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_SE,
    TPM2_SU,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PUBLIC,
    TPMA_OBJECT,
    TPML_DIGEST,
    TPML_DIGEST_VALUES,
    TPMT_HA,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMU_HA,
    TSS2_Exception,
)
from tpm2_pytss.utils import NVReadEK, create_ek_template

from tests.swtpm import Swtpm
from vouchd.evidence import (
    EccCurve,
    PcrSelection,
    TpmAlg,
    TpmPublic,
    VerificationError,
    build_event_log,
    check_ak_attributes,
    check_node_key_attributes,
    make_credential,
    parse_event_log,
    primary_qualified_name,
    qualified_name,
    simulated_boot_events,
    verify_certify,
    verify_quote,
)

pytestmark = pytest.mark.tpm

_SIGNING = (TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT | TPMA_OBJECT.SENSITIVEDATAORIGIN
            | TPMA_OBJECT.USERWITHAUTH | TPMA_OBJECT.SIGN_ENCRYPT)
AK_TEMPLATE = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=_SIGNING | TPMA_OBJECT.RESTRICTED)
NODE_KEY_TEMPLATE = TPM2B_PUBLIC.parse("ecc256:ecdsa-sha256:null", objectAttributes=_SIGNING)
NULL_SCHEME = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
SELECTION = PcrSelection(TpmAlg.SHA256, tuple(range(8)))
OWNER_HIERARCHY_HANDLE = 0x40000001
HIGH_RANGE_P384_EK_HANDLE = 0x81010016
# TCG EK Credential Profile 2.5 §B.6: the high-range EK policy is PolicyOR(PolicyA, PolicyC), SHA-384.
POLICY_A_SHA384 = bytes.fromhex(
    "8bbf2266537c171cb56e403c4dc1d4b64f432611dc386e6f532050c3278c930e143e8bb1133824ccb431053871c6db53")
POLICY_C_SHA384 = bytes.fromhex(
    "d6032ce61f2fb3c240eb3cf6a33237ef2b6a16f4293c22b455e261cffd217ad5b4947c2d73e63005eed2dc2b3593d165")


@dataclass
class AttestationKeys:
    """An EK (transient primary) and an AK created as its child, both loaded."""

    ek: Any
    ek_public: TpmPublic
    ak: Any
    ak_public: TpmPublic


@contextmanager
def policy_session(ctx: ESAPI, *, high_range_p384: bool = False) -> Iterator[Any]:
    """The EK's authorisation: PolicySecret(endorsement), plus PolicyOR for high-range EKs."""
    hash_alg = TPM2_ALG.SHA384 if high_range_p384 else TPM2_ALG.SHA256
    session = ctx.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY,
                                     TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), hash_alg)
    try:
        ctx.policy_secret(ESYS_TR.ENDORSEMENT, session)
        if high_range_p384:
            ctx.policy_or(session, TPML_DIGEST([POLICY_A_SHA384, POLICY_C_SHA384]))
        yield session
    finally:
        ctx.flush_context(session)


@contextmanager
def child_of(ctx: ESAPI, parent: Any, template: Any) -> Iterator[tuple[Any, TpmPublic]]:
    """Create and load a key under an EK-policy parent; flushed on exit."""
    with policy_session(ctx) as session:
        private, public, *_ = ctx.create(parent, None, template, session1=session)
    with policy_session(ctx) as session:
        handle = ctx.load(parent, private, public, session1=session)
    try:
        yield handle, TpmPublic.from_tpm2b(public.marshal())
    finally:
        ctx.flush_context(handle)


@contextmanager
def primary_ek(ctx: ESAPI, template_name: str) -> Iterator[tuple[Any, TpmPublic]]:
    _, template = create_ek_template(template_name, NVReadEK(ctx))
    handle, public, *_ = ctx.create_primary(None, template, ESYS_TR.ENDORSEMENT)
    try:
        yield handle, TpmPublic.from_tpm2b(public.marshal())
    finally:
        ctx.flush_context(handle)


@contextmanager
def attestation_keys(ctx: ESAPI) -> Iterator[AttestationKeys]:
    with primary_ek(ctx, "EK-RSA2048") as (ek, ek_public), child_of(ctx, ek, AK_TEMPLATE) as (ak, ak_public):
        yield AttestationKeys(ek, ek_public, ak, ak_public)


@pytest.fixture
def ctx(swtpm: Swtpm) -> Iterator[ESAPI]:
    context = ESAPI(swtpm.tcti)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def keys(ctx: ESAPI) -> Iterator[AttestationKeys]:
    with attestation_keys(ctx) as created:
        yield created


def read_pcrs(ctx: ESAPI, selection: PcrSelection) -> dict[int, bytes]:
    assert len(selection.pcrs) <= 8  # pcr_read answers at most 8 digests per call
    _, _, digests = ctx.pcr_read(selection.tool_string())
    return dict(zip(selection.pcrs, (bytes(d) for d in digests), strict=True))


def quote(ctx: ESAPI, keys: AttestationKeys, nonce: bytes, selection: PcrSelection = SELECTION) -> tuple[bytes, bytes]:
    attest, signature = ctx.quote(keys.ak, selection.tool_string(), nonce)
    return bytes(attest), signature.marshal()


def activate(ctx: ESAPI, activated: Any, ek: Any, credential: tuple[bytes, bytes], *,
             high_range_p384: bool = False) -> bytes:
    id_object, _ = TPM2B_ID_OBJECT.unmarshal(credential[0])
    encrypted_secret, _ = TPM2B_ENCRYPTED_SECRET.unmarshal(credential[1])
    with policy_session(ctx, high_range_p384=high_range_p384) as session:
        return bytes(ctx.activate_credential(activated, ek, id_object, encrypted_secret,
                                             session1=ESYS_TR.PASSWORD, session2=session))


# ---------------------------------------------------------------- names


def test_names_and_qualified_names_match_the_tpm(ctx: ESAPI, keys: AttestationKeys) -> None:
    _, ek_name, ek_qualified_name = ctx.read_public(keys.ek)
    _, ak_name, ak_qualified_name = ctx.read_public(keys.ak)
    assert keys.ek_public.name == bytes(ek_name)
    assert keys.ak_public.name == bytes(ak_name)
    assert primary_qualified_name(keys.ek_public.name) == bytes(ek_qualified_name)
    assert qualified_name(primary_qualified_name(keys.ek_public.name), keys.ak_public.name) == bytes(
        ak_qualified_name)
    check_ak_attributes(keys.ak_public)


def test_high_range_p384_ek_qualified_name_uses_sha384(ctx: ESAPI) -> None:
    handle = ctx.tr_from_tpmpublic(HIGH_RANGE_P384_EK_HANDLE)
    public, name, qualified = ctx.read_public(handle)
    ek = TpmPublic.from_tpm2b(public.marshal())
    assert (ek.curve, ek.name_alg) == (EccCurve.NIST_P384, TpmAlg.SHA384)
    assert ek.name == bytes(name)
    assert primary_qualified_name(ek.name) == bytes(qualified)


# ---------------------------------------------------------------- quote


def test_real_quote_verifies(ctx: ESAPI, keys: AttestationKeys) -> None:
    nonce = os.urandom(32)
    attest, signature = quote(ctx, keys, nonce)
    parsed = verify_quote(keys.ak_public, attest, signature, extra_data=nonce, selection=SELECTION,
                          pcr_values=read_pcrs(ctx, SELECTION))
    assert parsed.qualified_signer == qualified_name(primary_qualified_name(keys.ek_public.name),
                                                     keys.ak_public.name)


def test_quote_with_another_nonce_is_refused(ctx: ESAPI, keys: AttestationKeys) -> None:
    attest, signature = quote(ctx, keys, os.urandom(32))
    with pytest.raises(VerificationError, match="extraData"):
        verify_quote(keys.ak_public, attest, signature, extra_data=os.urandom(32), selection=SELECTION,
                     pcr_values=read_pcrs(ctx, SELECTION))


def test_quote_with_a_tampered_pcr_value_is_refused(ctx: ESAPI, keys: AttestationKeys) -> None:
    nonce = os.urandom(32)
    attest, signature = quote(ctx, keys, nonce)
    values = read_pcrs(ctx, SELECTION)
    values[4] = hashlib.sha256(values[4] + b"tampered").digest()
    with pytest.raises(VerificationError, match="pcr digest"):
        verify_quote(keys.ak_public, attest, signature, extra_data=nonce, selection=SELECTION,
                     pcr_values=values)


def test_quote_of_another_selection_is_refused(ctx: ESAPI, keys: AttestationKeys) -> None:
    nonce = os.urandom(32)
    narrower = PcrSelection(TpmAlg.SHA256, (0, 1, 2, 3, 4, 5, 6))
    attest, signature = quote(ctx, keys, nonce, narrower)
    with pytest.raises(VerificationError, match="selection"):
        verify_quote(keys.ak_public, attest, signature, extra_data=nonce, selection=SELECTION,
                     pcr_values=read_pcrs(ctx, SELECTION))


# ---------------------------------------------------------------- certify


def test_certify_proves_the_ak_is_a_child_of_the_ek(ctx: ESAPI, keys: AttestationKeys) -> None:
    nonce = os.urandom(16)
    ek_qualified_name = primary_qualified_name(keys.ek_public.name)
    ak_qualified_name = qualified_name(ek_qualified_name, keys.ak_public.name)
    with child_of(ctx, keys.ek, NODE_KEY_TEMPLATE) as (node_key, node_public):
        attest, signature = ctx.certify(node_key, keys.ak, nonce, NULL_SCHEME)
        _, _, node_qualified_name = ctx.read_public(node_key)
    check_node_key_attributes(node_public)
    parsed = verify_certify(keys.ak_public, bytes(attest), signature.marshal(), extra_data=nonce,
                            certified=node_public, expected_signer_qualified_name=ak_qualified_name)
    assert parsed.qualified_signer == ak_qualified_name
    assert parsed.certified_qualified_name == bytes(node_qualified_name)
    assert parsed.certified_qualified_name == qualified_name(ek_qualified_name, node_public.name)

    # The same AK claimed to sit under an owner-hierarchy primary of the same name: refused.
    elsewhere = qualified_name(primary_qualified_name(keys.ek_public.name, OWNER_HIERARCHY_HANDLE),
                               keys.ak_public.name)
    with pytest.raises(VerificationError, match="signer qualified name"):
        verify_certify(keys.ak_public, bytes(attest), signature.marshal(), extra_data=nonce,
                       certified=node_public, expected_signer_qualified_name=elsewhere)
    with pytest.raises(VerificationError, match="certified name"):
        verify_certify(keys.ak_public, bytes(attest), signature.marshal(), extra_data=nonce,
                       certified=keys.ak_public)


# ---------------------------------------------------------------- MakeCredential


def test_credential_for_the_rsa_ek_activates(ctx: ESAPI, keys: AttestationKeys) -> None:
    secret = os.urandom(32)
    credential = make_credential(keys.ek_public, secret, keys.ak_public.name)
    assert activate(ctx, keys.ak, keys.ek, credential) == secret


def test_credential_for_another_name_does_not_activate(ctx: ESAPI, keys: AttestationKeys) -> None:
    credential = make_credential(keys.ek_public, os.urandom(32), keys.ek_public.name)
    with pytest.raises(TSS2_Exception, match="integrity"):
        activate(ctx, keys.ak, keys.ek, credential)


def test_credential_for_an_ecc_p256_ek_activates(ctx: ESAPI, keys: AttestationKeys) -> None:
    secret = os.urandom(20)
    with primary_ek(ctx, "EK-ECC256") as (ek, ek_public):
        assert ek_public.curve is EccCurve.NIST_P256
        credential = make_credential(ek_public, secret, keys.ak_public.name)
        assert activate(ctx, keys.ak, ek, credential) == secret


def test_credential_for_the_high_range_p384_ek_activates(ctx: ESAPI, keys: AttestationKeys) -> None:
    handle = ctx.tr_from_tpmpublic(HIGH_RANGE_P384_EK_HANDLE)
    public, _, _ = ctx.read_public(handle)
    ek_public = TpmPublic.from_tpm2b(public.marshal())
    secret = os.urandom(48)
    credential = make_credential(ek_public, secret, keys.ak_public.name)
    assert activate(ctx, keys.ak, handle, credential, high_range_p384=True) == secret
    wrong = make_credential(ek_public, secret, keys.ek_public.name)
    with pytest.raises(TSS2_Exception, match="integrity"):
        activate(ctx, keys.ak, handle, wrong, high_range_p384=True)


# ---------------------------------------------------------------- event log


def _tpm2_eventlog_pcrs(path: Path) -> dict[int, bytes]:
    """The sha256 PCR values tpm2_eventlog computes from a log file."""
    tool = shutil.which("tpm2_eventlog")
    if tool is None:
        pytest.fail("tpm2_eventlog is not installed: run ./scripts/setup")
    result = subprocess.run([tool, str(path)], capture_output=True, text=True, check=True, timeout=30)
    section = result.stdout.split("pcrs:", 1)[1].split("sha256:", 1)[1]
    return {int(i): bytes.fromhex(v) for i, v in re.findall(r"^\s+(\d+)\s*:\s*0x([0-9a-fA-F]+)$", section,
                                                             re.MULTILINE)}


@contextmanager
def fresh_tpm(swtpm: Swtpm) -> Iterator[ESAPI]:
    """A TPM just after power-on (all PCRs zero); power-cycled again afterwards so the PCRs
    extended here do not leak into other tests."""
    swtpm.power_cycle()
    context = ESAPI(swtpm.tcti)
    try:
        context.startup(TPM2_SU.CLEAR)
        yield context
    finally:
        swtpm.power_cycle()
        context.startup(TPM2_SU.CLEAR)
        context.close()


def test_simulated_boot_replays_to_the_tpm_pcrs(swtpm: Swtpm, tmp_path: Path) -> None:
    log, to_extend = build_event_log(simulated_boot_events())
    path = tmp_path / "binary_bios_measurements"
    path.write_bytes(log)
    with fresh_tpm(swtpm) as ctx:
        for pcr, digest in to_extend:
            ctx.pcr_extend(getattr(ESYS_TR, f"PCR{pcr}"), TPML_DIGEST_VALUES(
                [TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=digest))]))
        replay = parse_event_log(path.read_bytes()).replay(TpmAlg.SHA256)
        assert read_pcrs(ctx, SELECTION) == {i: replay[i] for i in SELECTION.pcrs}
        assert all(replay[i] != bytes(32) for i in SELECTION.pcrs)
        nonce = os.urandom(32)
        with attestation_keys(ctx) as keys:
            attest, signature = quote(ctx, keys, nonce)
        parsed = verify_quote(keys.ak_public, attest, signature, extra_data=nonce, selection=SELECTION,
                              pcr_values=replay)
        assert parsed.clock_info.restart_count == 0
    assert _tpm2_eventlog_pcrs(path) == {i: replay[i] for i in SELECTION.pcrs}
