"""TpmService against swtpm: EK, AK and node key, quotes, certification, credentials, PCRs, concurrency.

Most tests share the session's swtpm and leave nothing loaded in it. Tests that reset the TPM or spend
its dictionary-attack budget use a private swtpm of their own.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import stat
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_ECC,
    TPM2_HC,
    TPM2_SE,
    TPM2_ST,
    TPM2B_PUBLIC,
    TPMA_OBJECT,
    TPMS_ATTEST,
    TPMT_SIGNATURE,
    TPMT_SYM_DEF,
)
from tpm2_pytss.utils import make_credential

from tests import swtpm as swtpm_mod
from vouchd.errors import VouchdError
from vouchd.tpm import (
    NodeKeys,
    TpmArgumentError,
    TpmError,
    TpmKeyError,
    TpmOperationError,
    TpmService,
    TpmUnavailableError,
)
from vouchd.tpm.capabilities import TpmCapabilities, missing_capabilities
from vouchd.tpm.latency import LatencyRecorder

pytestmark = pytest.mark.tpm

TPM_RH_ENDORSEMENT = 0x4000000B
TPM_ALG_SHA256 = 0x000B
KEY_FILES = ("ak.pub", "ak.priv", "ak.auth", "node_key.pub", "node_key.priv", "node_key.auth", "ek.json")


# ---------------------------------------------------------------------------------------------- helpers


def parse_public(marshaled: bytes) -> TPM2B_PUBLIC:
    public, consumed = TPM2B_PUBLIC.unmarshal(marshaled)
    assert consumed == len(marshaled)
    return public


def public_key(marshaled: bytes) -> ec.EllipticCurvePublicKey:
    key = serialization.load_pem_public_key(parse_public(marshaled).to_pem())
    assert isinstance(key, ec.EllipticCurvePublicKey)
    return key


def name_of(marshaled: bytes) -> bytes:
    return bytes(parse_public(marshaled).get_name())


def parse_attest(attest: bytes) -> TPMS_ATTEST:
    parsed, consumed = TPMS_ATTEST.unmarshal(attest)
    assert consumed == len(attest)
    return parsed


def verify_tpm_signature(signer_public: bytes, signed: bytes, signature: bytes) -> None:
    """Check a marshaled TPMT_SIGNATURE (ECDSA-SHA256) with `cryptography` only."""
    parsed, consumed = TPMT_SIGNATURE.unmarshal(signature)
    assert consumed == len(signature)
    assert parsed.sigAlg == TPM2_ALG.ECDSA
    assert parsed.signature.ecdsa.hash == TPM2_ALG.SHA256
    der = encode_dss_signature(
        int.from_bytes(bytes(parsed.signature.ecdsa.signatureR), "big"),
        int.from_bytes(bytes(parsed.signature.ecdsa.signatureS), "big"),
    )
    public_key(signer_public).verify(der, signed, ec.ECDSA(hashes.SHA256()))


def qualified_signer_of_ek_child(ek_public: bytes, child_public: bytes) -> bytes:
    """The qualified name of a key whose parent is the EK, a primary in the endorsement hierarchy.

    QN(EK) = nameAlg || H(TPM_RH_ENDORSEMENT || name(EK)); QN(child) = nameAlg || H(QN(EK) || name(child)).
    """
    alg = TPM_ALG_SHA256.to_bytes(2, "big")
    qualified_ek = alg + hashlib.sha256(TPM_RH_ENDORSEMENT.to_bytes(4, "big") + name_of(ek_public)).digest()
    return alg + hashlib.sha256(qualified_ek + name_of(child_public)).digest()


def loaded_handles(tcti: str) -> tuple[list[int], list[int]]:
    """Transient objects and loaded sessions currently in the TPM."""
    esapi = ESAPI(tcti)
    try:
        _, objects = esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HC.TRANSIENT_FIRST, 64)
        _, sessions = esapi.get_capability(TPM2_CAP.HANDLES, TPM2_HC.LOADED_SESSION_FIRST, 64)
        return list(objects.data.handles), list(sessions.data.handles)
    finally:
        esapi.close()


def tpm_worker_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if thread.name.startswith("vouchd-tpm")]


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture
async def tpm(swtpm: swtpm_mod.Swtpm) -> AsyncIterator[TpmService]:
    async with TpmService(swtpm.tcti) as service:
        yield service


@pytest.fixture
async def keyed(tpm: TpmService, tmp_path: Path) -> tuple[TpmService, NodeKeys]:
    return tpm, await tpm.ensure_node_keys(tmp_path / "state")


@pytest.fixture(scope="module")
def private_swtpm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[swtpm_mod.Swtpm]:
    """A swtpm of this module's own, for tests that reset the TPM or provoke authorization failures."""
    state = tmp_path_factory.mktemp("private-swtpm")
    swtpm_mod.provision(state)
    instance = swtpm_mod.start(state)
    try:
        yield instance
    finally:
        instance.stop()


# ------------------------------------------------------------------------------------------ start and EK


async def test_rsa_ek_certificate_matches_ek_public_and_chains_to_manufacturer(
    tpm: TpmService, swtpm: swtpm_mod.Swtpm
) -> None:
    assert tpm.ek.ek_type == "rsa2048"
    assert tpm.ek.certificate is not None
    certificate = x509.load_der_x509_certificate(tpm.ek.certificate)
    ek_key = serialization.load_pem_public_key(parse_public(tpm.ek.public).to_pem())
    assert certificate.public_key() == ek_key
    issuer = x509.load_pem_x509_certificate(swtpm.manufacturer_issuer.read_bytes())
    certificate.verify_directly_issued_by(issuer)
    area = parse_public(tpm.ek.public).publicArea
    assert area.type == TPM2_ALG.RSA
    assert area.parameters.rsaDetail.keyBits == 2048


async def test_ecc_p384_ek_has_certificate_and_keys_work_under_it(swtpm: swtpm_mod.Swtpm, tmp_path: Path) -> None:
    async with TpmService(swtpm.tcti, ek_type="ecc-p384") as tpm:
        assert tpm.ek.ek_type == "ecc-p384"
        assert tpm.ek.certificate is not None
        certificate = x509.load_der_x509_certificate(tpm.ek.certificate)
        ek_key = serialization.load_pem_public_key(parse_public(tpm.ek.public).to_pem())
        assert certificate.public_key() == ek_key
        assert isinstance(ek_key, ec.EllipticCurvePublicKey)
        assert ek_key.curve.name == "secp384r1"

        # The high-range EK's policy (SHA-384 PolicySecret + PolicyOR) must open it for Create, Load
        # and ActivateCredential.
        keys = await tpm.ensure_node_keys(tmp_path / "state")
        secret = os.urandom(32)
        blob, encrypted = make_credential(parse_public(tpm.ek.public), secret, name_of(keys.ak.public))
        assert await tpm.activate_credential(blob.marshal(), encrypted.marshal()) == secret
        certify = await tpm.certify_node_key(b"n" * 32)
        assert bytes(parse_attest(certify.attest).qualifiedSigner) != b""


async def test_ecc_p256_ek_starts_without_certificate_on_swtpm(swtpm: swtpm_mod.Swtpm) -> None:
    async with TpmService(swtpm.tcti, ek_type="ecc-p256") as tpm:
        area = parse_public(tpm.ek.public).publicArea
        assert area.type == TPM2_ALG.ECC
        assert area.parameters.eccDetail.curveID == TPM2_ECC.NIST_P256
        # swtpm 0.7.1 provisions no P-256 EK certificate (FACTS.md).
        assert tpm.ek.certificate is None


async def test_ek_public_is_stable_across_services(swtpm: swtpm_mod.Swtpm, tpm: TpmService) -> None:
    async with TpmService(swtpm.tcti) as other:
        assert other.ek == tpm.ek


async def test_bad_tcti_raises_unavailable_naming_it_quickly(tmp_path: Path) -> None:
    tcti = f"swtpm:path={tmp_path / 'no-such-socket'}"
    threads_before = len(tpm_worker_threads())
    service = TpmService(tcti)
    started = time.monotonic()
    with pytest.raises(TpmUnavailableError, match="no-such-socket") as caught:
        await service.start()
    assert time.monotonic() - started < 2.0
    assert tcti in str(caught.value)
    assert len(tpm_worker_threads()) == threads_before
    await service.close()


def test_empty_tcti_and_unknown_ek_type_are_refused_without_io() -> None:
    with pytest.raises(TpmArgumentError, match="tcti"):
        TpmService("  ")
    with pytest.raises(TpmArgumentError, match="ecc-p521"):
        TpmService("swtpm:path=/nonexistent", ek_type="ecc-p521")  # type: ignore[arg-type]


async def test_start_flushes_objects_and_sessions_left_by_a_crashed_client(swtpm: swtpm_mod.Swtpm) -> None:
    crashed = ESAPI(swtpm.tcti)
    crashed.create_primary(None, TPM2B_PUBLIC.parse("ecc256"), ESYS_TR.OWNER)
    crashed.start_auth_session(
        ESYS_TR.NONE, ESYS_TR.NONE, TPM2_SE.POLICY, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256
    )
    crashed.close()  # the TPM keeps both: there is no resource manager to clean up after a client
    objects, sessions = loaded_handles(swtpm.tcti)
    assert objects and sessions

    async with TpmService(swtpm.tcti):
        assert loaded_handles(swtpm.tcti) == ([], [])


async def test_close_is_idempotent_stops_the_worker_and_refuses_later_operations(
    swtpm: swtpm_mod.Swtpm, tmp_path: Path
) -> None:
    threads_before = len(tpm_worker_threads())
    service = TpmService(swtpm.tcti)
    await service.start()
    await service.ensure_node_keys(tmp_path / "state")
    assert len(tpm_worker_threads()) == threads_before + 1
    await service.close()
    await service.close()
    assert len(tpm_worker_threads()) == threads_before
    with pytest.raises(TpmError, match="closed"):
        await service.quote("sha256", [0], b"")
    with pytest.raises(TpmError, match="closed"):
        await service.start()


async def test_close_during_start_closes_the_connection_and_fails_the_start(swtpm: swtpm_mod.Swtpm) -> None:
    threads_before = len(tpm_worker_threads())
    service = TpmService(swtpm.tcti)
    starting = asyncio.create_task(service.start())
    await asyncio.sleep(0)  # let start() queue its work on the TPM thread
    await service.close()
    with pytest.raises(TpmError, match="closed while starting"):
        await starting
    assert len(tpm_worker_threads()) == threads_before
    assert loaded_handles(swtpm.tcti) == ([], [])

    never_started = TpmService(swtpm.tcti)
    await never_started.close()
    with pytest.raises(TpmError, match="closed"):
        await never_started.start()


async def test_operations_need_start_and_node_keys(swtpm: swtpm_mod.Swtpm, tpm: TpmService) -> None:
    with pytest.raises(TpmError, match="already started"):
        await tpm.start()
    fresh = TpmService(swtpm.tcti)
    with pytest.raises(TpmError, match="not started"):
        _ = fresh.ek
    with pytest.raises(TpmError, match="not started"):
        await fresh.read_pcrs("sha256", [0])
    with pytest.raises(TpmError, match="ensure_node_keys"):
        await tpm.quote("sha256", [0], b"")
    with pytest.raises(TpmError, match="ensure_node_keys"):
        await tpm.sign_with_node_key(b"message")


# ------------------------------------------------------------------------------------------ key storage


async def test_ensure_node_keys_stores_private_files_and_a_second_service_reloads_them(
    swtpm: swtpm_mod.Swtpm, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    async with TpmService(swtpm.tcti) as first:
        created = await first.ensure_node_keys(state)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    for name in KEY_FILES:
        assert stat.S_IMODE((state / name).stat().st_mode) == 0o600, name
    assert (state / "ak.pub").read_bytes() == created.ak.public
    assert (state / "node_key.priv").read_bytes() == created.node_key.private
    assert len((state / "ak.auth").read_bytes()) == 32
    assert (state / "ak.auth").read_bytes() != (state / "node_key.auth").read_bytes()
    assert sorted(path.name for path in state.iterdir()) == sorted(KEY_FILES)  # no temporary files left

    async with TpmService(swtpm.tcti) as second:
        reloaded = await second.ensure_node_keys(state)
        assert reloaded == created
        # The reloaded keys work: the second service signs with the key the first one created.
        signature = await second.sign_with_node_key(b"hello")
    public_key(created.node_key.public).verify(signature, b"hello", ec.ECDSA(hashes.SHA256()))


@pytest.mark.parametrize(
    ("damage", "named_file"),
    [
        (lambda state: _flip_last_byte(state / "ak.priv"), "ak.priv"),
        (lambda state: _flip_last_byte(state / "node_key.priv"), "node_key.priv"),
        (lambda state: (state / "ak.pub").write_bytes((state / "ak.pub").read_bytes()[:-5]), "ak.pub"),
        (lambda state: (state / "node_key.pub").write_bytes(b"\x00\x04junk"), "node_key.pub"),
        (lambda state: (state / "ak.auth").write_bytes(b"short"), "ak.auth"),
        (lambda state: (state / "node_key.auth").unlink(), "node_key.auth"),
        (lambda state: (state / "ak.auth").chmod(0o640), "ak.auth"),
        # A node key where the AK belongs: right format, wrong attributes (not restricted).
        (lambda state: (state / "ak.pub").write_bytes((state / "node_key.pub").read_bytes()), "ak.pub"),
    ],
    ids=[
        "ak-priv-flipped",
        "node-key-priv-flipped",
        "ak-pub-truncated",
        "node-key-pub-garbage",
        "ak-auth-short",
        "node-key-auth-missing",
        "ak-auth-group-readable",
        "ak-pub-is-not-an-ak",
    ],
)
async def test_damaged_key_files_raise_key_error_naming_the_file_and_are_not_replaced(
    swtpm: swtpm_mod.Swtpm, tmp_path: Path, damage: object, named_file: str
) -> None:
    state = tmp_path / "state"
    async with TpmService(swtpm.tcti) as tpm:
        await tpm.ensure_node_keys(state)
    assert callable(damage)
    damage(state)
    before = {path.name: path.read_bytes() for path in state.iterdir()}

    async with TpmService(swtpm.tcti) as tpm:
        with pytest.raises(TpmKeyError) as caught:
            await tpm.ensure_node_keys(state)
    assert str(state / named_file) in str(caught.value)
    assert {path.name: path.read_bytes() for path in state.iterdir()} == before


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


async def test_state_dir_that_cannot_be_created_raises_key_error(tpm: TpmService, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    with pytest.raises(TpmKeyError, match="a-file"):
        await tpm.ensure_node_keys(blocker / "state")


async def test_keys_made_under_another_ek_type_name_the_change_and_the_way_out(
    swtpm: swtpm_mod.Swtpm, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    async with TpmService(swtpm.tcti, ek_type="ecc-p256") as other_tpm:
        await other_tpm.ensure_node_keys(state)
    before = {path.name: path.read_bytes() for path in state.iterdir()}
    async with TpmService(swtpm.tcti, ek_type="rsa2048") as tpm:
        with pytest.raises(TpmKeyError) as caught:
            await tpm.ensure_node_keys(state)
    assert str(caught.value) == (
        f"the keys in {state} were made under the ecc-p256 endorsement key, but tpm.ek is now rsa2048: set "
        "agent.tpm.ek back to ecc-p256, or, to become a new node with the rsa2048 endorsement key (a new node ID: "
        f"it is the EK's hash), stop the agent and move {state} aside"
    )
    assert {path.name: path.read_bytes() for path in state.iterdir()} == before, "nothing replaced"


async def test_keys_of_an_earlier_vouchd_under_another_ek_type_still_say_so(
    swtpm: swtpm_mod.Swtpm, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    async with TpmService(swtpm.tcti, ek_type="ecc-p256") as other_tpm:
        await other_tpm.ensure_node_keys(state)
    (state / "ek.json").unlink()  # as an earlier vouchd left the folder
    async with TpmService(swtpm.tcti, ek_type="rsa2048") as tpm:
        with pytest.raises(TpmKeyError, match=r"ak\.priv does not load in this tpm \(made by another tpm, under "
                                              r"another ek type than tpm\.ek rsa2048, or corrupt\)"):
            await tpm.ensure_node_keys(state)
    assert not (state / "ek.json").exists()


async def test_auth_values_stay_out_of_reprs_and_errors(keyed: tuple[TpmService, NodeKeys], tmp_path: Path) -> None:
    tpm, keys = keyed
    secrets_on_disk = [(tmp_path / "state" / name).read_bytes() for name in ("ak.auth", "node_key.auth")]
    texts = [repr(tpm), repr(keys), str(tpm.latency_snapshot())]
    for secret in secrets_on_disk:
        for text in texts:
            assert secret.hex() not in text
            assert repr(secret)[2:-1] not in text


# ----------------------------------------------------------------------------------- AK, certify, quote


async def test_ak_is_a_restricted_signing_child_of_the_ek(keyed: tuple[TpmService, NodeKeys]) -> None:
    tpm, keys = keyed
    ak = parse_public(keys.ak.public).publicArea
    required = (
        TPMA_OBJECT.RESTRICTED
        | TPMA_OBJECT.SIGN_ENCRYPT
        | TPMA_OBJECT.FIXEDTPM
        | TPMA_OBJECT.FIXEDPARENT
        | TPMA_OBJECT.SENSITIVEDATAORIGIN
        | TPMA_OBJECT.USERWITHAUTH
    )
    assert ak.objectAttributes & required == required
    assert not ak.objectAttributes & TPMA_OBJECT.DECRYPT
    assert ak.parameters.eccDetail.curveID == TPM2_ECC.NIST_P256
    assert ak.parameters.eccDetail.scheme.scheme == TPM2_ALG.ECDSA

    node_key = parse_public(keys.node_key.public).publicArea
    assert not node_key.objectAttributes & TPMA_OBJECT.RESTRICTED
    assert node_key.objectAttributes & TPMA_OBJECT.FIXEDTPM

    nonce = os.urandom(32)
    certify = await tpm.certify_node_key(nonce)
    attest = parse_attest(certify.attest)
    assert attest.type == TPM2_ST.ATTEST_CERTIFY
    assert bytes(attest.extraData) == nonce
    assert bytes(attest.attested.certify.name) == name_of(keys.node_key.public)
    # The AK's parent is the EK: its qualified name goes through the EK's.
    assert bytes(attest.qualifiedSigner) == qualified_signer_of_ek_child(tpm.ek.public, keys.ak.public)
    verify_tpm_signature(keys.ak.public, certify.attest, certify.signature)


async def test_quote_verifies_and_carries_qualifying_data_and_pcr_digest(
    keyed: tuple[TpmService, NodeKeys],
) -> None:
    tpm, keys = keyed
    pcrs = [0, 1, 2, 3, 4, 5, 6, 7, 16]
    nonce = os.urandom(32)
    quote = await tpm.quote("sha256", pcrs, nonce)
    values = await tpm.read_pcrs("sha256", pcrs)

    verify_tpm_signature(keys.ak.public, quote.attest, quote.signature)
    attest = parse_attest(quote.attest)
    assert attest.type == TPM2_ST.ATTEST_QUOTE
    assert bytes(attest.extraData) == nonce
    (selection,) = attest.attested.quote.pcrSelect.pcrSelections
    assert selection.hash == TPM2_ALG.SHA256
    bitmap = bytes(selection.pcrSelect)[: selection.sizeofSelect]
    assert [i for i in range(24) if bitmap[i // 8] >> (i % 8) & 1] == pcrs
    expected_digest = hashlib.sha256(b"".join(values[i] for i in sorted(pcrs))).digest()
    assert bytes(attest.attested.quote.pcrDigest) == expected_digest

    with pytest.raises(InvalidSignature):
        verify_tpm_signature(keys.ak.public, quote.attest[:-1] + bytes([quote.attest[-1] ^ 1]), quote.signature)


# ------------------------------------------------------------------------------- credential activation


async def test_activate_credential_recovers_the_secret_for_the_ak_only(keyed: tuple[TpmService, NodeKeys]) -> None:
    tpm, keys = keyed
    ek = parse_public(tpm.ek.public)
    secret = os.urandom(32)
    blob, encrypted = make_credential(ek, secret, name_of(keys.ak.public))
    assert await tpm.activate_credential(blob.marshal(), encrypted.marshal()) == secret

    # Made for another key's name (the node key's): the TPM refuses, and says which command failed.
    blob, encrypted = make_credential(ek, secret, name_of(keys.node_key.public))
    with pytest.raises(TpmOperationError, match=r"ActivateCredential.*rc 0x[0-9a-f]+") as caught:
        await tpm.activate_credential(blob.marshal(), encrypted.marshal())
    assert secret.hex() not in str(caught.value)


async def test_activate_credential_refuses_inputs_without_size_prefix(keyed: tuple[TpmService, NodeKeys]) -> None:
    tpm, keys = keyed
    blob, encrypted = make_credential(parse_public(tpm.ek.public), os.urandom(32), name_of(keys.ak.public))
    with pytest.raises(TpmArgumentError, match="credential blob"):
        await tpm.activate_credential(bytes(blob), encrypted.marshal())
    with pytest.raises(TpmArgumentError, match="encrypted secret"):
        await tpm.activate_credential(blob.marshal(), encrypted.marshal() + b"\x00")


# -------------------------------------------------------------------------------------------- node key


async def test_sign_with_node_key_gives_der_ecdsa_over_the_message(keyed: tuple[TpmService, NodeKeys]) -> None:
    tpm, keys = keyed
    message = b"certificate signing request tbs bytes"
    signature = await tpm.sign_with_node_key(message)
    key = public_key(keys.node_key.public)
    key.verify(signature, message, ec.ECDSA(hashes.SHA256()))
    with pytest.raises(InvalidSignature):
        key.verify(signature, message + b"!", ec.ECDSA(hashes.SHA256()))


# ------------------------------------------------------------------------------------------------ PCRs


async def test_extend_pcr_changes_the_value_as_the_tpm_specifies(tpm: TpmService) -> None:
    before = (await tpm.read_pcrs("sha256", [16]))[16]
    digest = hashlib.sha256(b"vouchd test event").digest()
    await tpm.extend_pcr(16, digest)
    after = (await tpm.read_pcrs("sha256", [16]))[16]
    assert after == hashlib.sha256(before + digest).digest()


async def test_read_pcrs_returns_all_24_in_the_order_asked(tpm: TpmService) -> None:
    order = [23, *range(23)]
    values = await tpm.read_pcrs("sha256", order)
    assert list(values) == order
    assert all(len(value) == 32 for value in values.values())
    assert values == await tpm.read_pcrs("sha256", range(24))
    assert await tpm.read_pcrs("sha256", []) == {}


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda tpm: tpm.quote("md5", [0], b""), "pcr bank"),
        (lambda tpm: tpm.quote("sha256", [24], b""), "pcr index 24"),
        (lambda tpm: tpm.quote("sha256", [-1], b""), "pcr index -1"),
        (lambda tpm: tpm.quote("sha256", [1, 1], b""), "repeat"),
        (lambda tpm: tpm.quote("sha256", [0], b"x" * 65), "qualifying data"),
        (lambda tpm: tpm.certify_node_key(b"x" * 65), "qualifying data"),
        (lambda tpm: tpm.extend_pcr(16, b"x" * 20), "32 bytes"),
        (lambda tpm: tpm.read_pcrs("sha3", [0]), "pcr bank"),
    ],
)
async def test_invalid_arguments_are_refused_before_reaching_the_tpm(
    keyed: tuple[TpmService, NodeKeys], call: object, message: str
) -> None:
    tpm, _ = keyed
    assert callable(call)
    with pytest.raises(TpmArgumentError, match=message) as caught:
        await call(tpm)
    assert isinstance(caught.value, ValueError)
    assert isinstance(caught.value, VouchdError)
    assert "quote" not in tpm.latency_snapshot()


# ----------------------------------------------------------------------------------------- concurrency


async def test_many_concurrent_operations_all_succeed_and_leave_nothing_loaded(
    keyed: tuple[TpmService, NodeKeys], swtpm: swtpm_mod.Swtpm
) -> None:
    tpm, keys = keyed
    nonces = [os.urandom(32) for _ in range(50)]
    quotes, signatures, certifies, pcr_reads = await asyncio.gather(
        asyncio.gather(*(tpm.quote("sha256", [0, 1, 2, 3, 4, 5, 6, 7], nonce) for nonce in nonces)),
        asyncio.gather(*(tpm.sign_with_node_key(nonce) for nonce in nonces[:10])),
        asyncio.gather(*(tpm.certify_node_key(nonce) for nonce in nonces[:10])),
        asyncio.gather(*(tpm.read_pcrs("sha256", range(24)) for _ in range(10))),
    )
    for nonce, quote in zip(nonces, quotes, strict=True):
        verify_tpm_signature(keys.ak.public, quote.attest, quote.signature)
        assert bytes(parse_attest(quote.attest).extraData) == nonce
    for nonce, signature in zip(nonces, signatures, strict=False):
        public_key(keys.node_key.public).verify(signature, nonce, ec.ECDSA(hashes.SHA256()))
    for nonce, certify in zip(nonces, certifies, strict=False):
        assert bytes(parse_attest(certify.attest).extraData) == nonce
    assert all(len(values) == 24 for values in pcr_reads)
    assert loaded_handles(swtpm.tcti) == ([], [])

    snapshot = tpm.latency_snapshot()
    assert snapshot["quote"]["count"] == 50
    assert snapshot["sign_with_node_key"]["count"] == 10
    quote_stats = snapshot["quote"]
    assert 0 < quote_stats["p50_ms"] <= quote_stats["p99_ms"] <= quote_stats["max_ms"]
    assert set(quote_stats) == {"count", "last_ms", "p50_ms", "p99_ms", "max_ms"}
    assert snapshot["start"]["count"] == 1


# ------------------------------------------------------------------ private swtpm: resets and bad auth


async def test_ek_is_derived_again_after_a_tpm_reset(
    private_swtpm: swtpm_mod.Swtpm, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with TpmService(private_swtpm.tcti) as tpm:
        keys = await tpm.ensure_node_keys(tmp_path / "state")
        ek_before = tpm.ek
        private_swtpm.power_cycle()
        # The reset TPM needs TPM2_Startup, which a starting service sends (as firmware would).
        async with TpmService(private_swtpm.tcti) as restarter:
            assert restarter.ek == ek_before
        # The saved EK context died with the reset; the service derives the same EK again.
        nonce = os.urandom(32)
        quote = await tpm.quote("sha256", [0], nonce)
        verify_tpm_signature(keys.ak.public, quote.attest, quote.signature)
        secret = os.urandom(32)
        blob, encrypted = make_credential(parse_public(tpm.ek.public), secret, name_of(keys.ak.public))
        assert await tpm.activate_credential(blob.marshal(), encrypted.marshal()) == secret
        assert tpm.ek == ek_before
    assert [r.message for r in caplog.records if "ek context" in r.message] == [
        "saved ek context no longer loads, deriving the ek again"
    ]


async def test_wrong_auth_value_raises_key_error_naming_the_auth_file(
    private_swtpm: swtpm_mod.Swtpm, tmp_path: Path
) -> None:
    state = tmp_path / "state"
    async with TpmService(private_swtpm.tcti) as tpm:
        await tpm.ensure_node_keys(state)
    wrong = os.urandom(32)
    (state / "node_key.auth").write_bytes(wrong)
    try:
        async with TpmService(private_swtpm.tcti) as tpm:
            await tpm.ensure_node_keys(state)  # loading needs no authValue; using the key does
            with pytest.raises(TpmKeyError, match=r"node_key\.auth") as caught:
                await tpm.sign_with_node_key(b"message")
        assert wrong.hex() not in str(caught.value)
    finally:
        # Each refused authValue counts toward the TPM's dictionary-attack lockout: reset the counter.
        esapi = ESAPI(private_swtpm.tcti)
        try:
            esapi.dictionary_attack_lock_reset(ESYS_TR.LOCKOUT)
        finally:
            esapi.close()


# ------------------------------------------------------------------------------------ no TPM needed


def test_missing_capabilities_name_what_the_ek_type_needs() -> None:
    everything = TpmCapabilities(
        algorithms=frozenset(int(alg) for alg in TPM2_ALG),
        curves=frozenset({int(TPM2_ECC.NIST_P256), int(TPM2_ECC.NIST_P384)}),
        pcr_banks=frozenset({int(TPM2_ALG.SHA256)}),
    )
    assert missing_capabilities("ecc-p384", everything) == []

    no_p384 = TpmCapabilities(everything.algorithms, frozenset({int(TPM2_ECC.NIST_P256)}), everything.pcr_banks)
    assert missing_capabilities("rsa2048", no_p384) == []
    assert missing_capabilities("ecc-p384", no_p384) == ["curve nist p-384"]

    no_rsa = TpmCapabilities(everything.algorithms - {int(TPM2_ALG.RSA)}, everything.curves, frozenset())
    assert missing_capabilities("rsa2048", no_rsa) == ["algorithm rsa", "an allocated sha256 pcr bank"]
    assert missing_capabilities("ecc-p256", no_rsa) == ["an allocated sha256 pcr bank"]


def test_latency_recorder_reports_observed_percentiles() -> None:
    recorder = LatencyRecorder()
    for milliseconds in range(1, 101):
        recorder.record("quote", float(milliseconds))
    recorder.record("sign", 3.0)
    snapshot = recorder.snapshot()
    assert snapshot["quote"] == {"count": 100.0, "last_ms": 100.0, "p50_ms": 50.0, "p99_ms": 99.0, "max_ms": 100.0}
    assert snapshot["sign"] == {"count": 1.0, "last_ms": 3.0, "p50_ms": 3.0, "p99_ms": 3.0, "max_ms": 3.0}
