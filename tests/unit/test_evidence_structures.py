"""TPM structure parsing against bytes captured from swtpm 0.7.1 (tpm2-tss 3.2.1): an RSA-2048
EK (TCG template L-1), an ECC P-256 AK created as a child of that EK, and a quote by that AK of
sha256:0-7,16 after PCR 16 was extended with sha256(b"vouchd test")."""

from __future__ import annotations

import hashlib
import struct

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from vouchd.evidence import (
    Attest,
    AttestType,
    EccCurve,
    EvidenceError,
    MalformedStructureError,
    ObjectAttributes,
    PcrSelection,
    TpmAlg,
    TpmPublic,
    VerificationError,
    primary_qualified_name,
    qualified_name,
    verify_quote,
)

EK_PUB = bytes.fromhex(
    "013a0001000b000300b20020837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa00060080"
    "004300100800000000000100ba4e6b8f277f84400ad98543eb5d6b78ef6b1710f2bead5aa5ae04e7b448ba2286e705fd"
    "b3c01b44e3c8b1f0b8939426fb399b263850b405bfdf743a4dc8e5a273fb510d033d95c7732b85279e0d42e845dca905"
    "83b9e24befc289092e459ed34a2d4406b512583c39b60aa840ca5470c0592f08b61af7edad88128ffbf42353baf33c77"
    "a1a45719f22b3b4d7324c77136153ba66177a6ef313cdfdc48ebcf86d4fa8b748b2c63e04250cf8ebc4bd5b00ecc9db0"
    "d2a3d8bc079b13dd2f1a0f64c9b3658e41b8dc4e249d043653bdb0a0e9005760745dd52cdbfe40ba025c210fcb5eca8b"
    "672790d634eb09115787e294dbc7cb68228078d006f80a81061f09f7"
)
EK_NAME = bytes.fromhex("000b3e1c8fad7923b4b8d310c798dd4f568d751a33184c992a62f57fcb1c16e39569")
EK_QUALIFIED_NAME = bytes.fromhex("000b1d7029c4cf9f7a5f88f9c2ac3a989535daeb66dac79bc11e95d1ab6a1ec51389")
AK_PUB = bytes.fromhex(
    "00580023000b00050072000000100018000b0003001000206df37aa59431d7973847d02631d76ccf01d99ff5b4f77520"
    "2be74ee6846a9b3d0020c82349728b768a9e6c58e0faa3e9bff35cbc904f4bba472267d30b5a8d5113d4"
)
AK_NAME = bytes.fromhex("000b442b20447dad5aa8512bcc2e68be4f5a12a646159cdf9160ef4803827d3fc674")
AK_QUALIFIED_NAME = bytes.fromhex("000b6b6c894f72e2a5e04463e331c5e550e03a62b6fcc3eb34e1c3b917a7bf0b4cca")
QUOTE = bytes.fromhex(
    "ff54434780180022000b6b6c894f72e2a5e04463e331c5e550e03a62b6fcc3eb34e1c3b917a7bf0b4cca002000010203"
    "0405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f000000000002e415000000030000000001201910"
    "230016363600000001000b03ff00010020b2de58d1e9b9cfed27bc530e9f3a450ff413bddc77b91f2577854614e7e70e"
    "b2"
)
QUOTE_SIGNATURE = bytes.fromhex(
    "0018000b0020b6c77ec4b24d3526f73886e6de5faea12ca8a314c2418850ce9f6ef9edafa2ce0020cb32cf1cd20bb8e3"
    "af38889bcd501cdeb584d9bd20312bc4a3cb5d1458917b77"
)
QUOTE_NONCE = bytes(range(32))
QUOTE_SELECTION = PcrSelection(TpmAlg.SHA256, (0, 1, 2, 3, 4, 5, 6, 7, 16))
QUOTE_PCRS = {i: bytes(32) for i in range(8)} | {
    16: hashlib.sha256(bytes(32) + hashlib.sha256(b"vouchd test").digest()).digest()}


# ---------------------------------------------------------------- TpmPublic


def test_rsa_ek_decodes_every_field() -> None:
    ek = TpmPublic.from_tpm2b(EK_PUB)
    assert ek.type is TpmAlg.RSA
    assert ek.name_alg is TpmAlg.SHA256
    assert ek.attributes == (ObjectAttributes.FIXED_TPM | ObjectAttributes.FIXED_PARENT
                             | ObjectAttributes.SENSITIVE_DATA_ORIGIN | ObjectAttributes.ADMIN_WITH_POLICY
                             | ObjectAttributes.RESTRICTED | ObjectAttributes.DECRYPT)
    # TCG EK template L-1 policy: PolicySecret(TPM_RH_ENDORSEMENT)
    assert ek.auth_policy.hex() == "837197674484b3f81a90cc8d46a5d724fd52d76e06520b64f2a1da1b331469aa"
    assert (ek.symmetric_alg, ek.symmetric_bits) == (TpmAlg.AES, 128)
    assert (ek.scheme, ek.scheme_hash) == (TpmAlg.NULL, TpmAlg.NULL)
    assert (ek.curve, ek.rsa_bits, ek.rsa_exponent) == (None, 2048, 0)
    assert len(ek.unique) == 1 and len(ek.unique[0]) == 256
    assert ek.raw == EK_PUB[2:]


def test_ecc_ak_decodes_every_field() -> None:
    ak = TpmPublic.from_tpm2b(AK_PUB)
    assert ak.type is TpmAlg.ECC
    assert ak.curve is EccCurve.NIST_P256
    assert (ak.scheme, ak.scheme_hash) == (TpmAlg.ECDSA, TpmAlg.SHA256)
    assert ak.symmetric_alg is TpmAlg.NULL
    assert ak.attributes & ObjectAttributes.RESTRICTED
    assert not ak.attributes & ObjectAttributes.DECRYPT
    assert [len(c) for c in ak.unique] == [32, 32]


@pytest.mark.parametrize("blob", [EK_PUB, AK_PUB])
def test_public_round_trips(blob: bytes) -> None:
    parsed = TpmPublic.from_tpm2b(blob)
    assert parsed.to_tpm2b() == blob
    assert TpmPublic.from_tpmt(parsed.raw) == parsed


def test_names_match_the_tpm() -> None:
    assert TpmPublic.from_tpm2b(EK_PUB).name == EK_NAME
    assert TpmPublic.from_tpm2b(AK_PUB).name == AK_NAME


def test_qualified_names_match_the_tpm() -> None:
    assert primary_qualified_name(EK_NAME) == EK_QUALIFIED_NAME
    assert qualified_name(EK_QUALIFIED_NAME, AK_NAME) == AK_QUALIFIED_NAME
    assert qualified_name(primary_qualified_name(EK_NAME), AK_NAME) != qualified_name(
        primary_qualified_name(EK_NAME, 0x40000001), AK_NAME)


def test_qualified_name_refuses_a_name_of_another_algorithm() -> None:
    with pytest.raises(EvidenceError, match="name algorithm"):
        qualified_name(EK_QUALIFIED_NAME, AK_NAME, TpmAlg.SHA384)


def test_public_keys_are_usable() -> None:
    ek_key = TpmPublic.from_tpm2b(EK_PUB).public_key()
    assert isinstance(ek_key, rsa.RSAPublicKey)
    assert ek_key.key_size == 2048 and ek_key.public_numbers().e == 65537
    ak = TpmPublic.from_tpm2b(AK_PUB)
    ak_key = ak.public_key()
    assert isinstance(ak_key, ec.EllipticCurvePublicKey)
    assert ak_key.public_numbers().x == int.from_bytes(ak.unique[0], "big")
    loaded = serialization.load_der_public_key(ak.spki_der())
    assert loaded == ak_key


def test_point_off_the_curve_is_refused_as_malformed() -> None:
    raw = bytearray(TpmPublic.from_tpm2b(AK_PUB).raw)
    raw[-1] ^= 1  # last byte of y
    with pytest.raises(MalformedStructureError, match="not a point"):
        TpmPublic.from_tpmt(bytes(raw)).public_key()


def test_rsa_modulus_shorter_than_key_bits_is_refused() -> None:
    ek = TpmPublic.from_tpm2b(EK_PUB)
    short = ek.raw[: -258] + struct.pack(">H", 128) + ek.unique[0][:128]
    with pytest.raises(MalformedStructureError, match="keyBits"):
        TpmPublic.from_tpmt(short).public_key()


def test_every_truncation_is_malformed() -> None:
    for end in range(len(AK_PUB)):
        with pytest.raises(MalformedStructureError):
            TpmPublic.from_tpm2b(AK_PUB[:end])
    for end in range(len(AK_PUB) - 2):
        with pytest.raises(MalformedStructureError, match="TPMT_PUBLIC"):
            TpmPublic.from_tpmt(AK_PUB[2 : 2 + end])


def test_trailing_bytes_are_malformed() -> None:
    with pytest.raises(MalformedStructureError, match="trailing"):
        TpmPublic.from_tpm2b(AK_PUB + b"\0")
    with pytest.raises(MalformedStructureError, match="TPMT_PUBLIC has 1 trailing"):
        TpmPublic.from_tpmt(AK_PUB[2:] + b"\0")


@pytest.mark.parametrize(("offset", "value", "field"), [
    (0, 0x0006, "type"),                              # AES is not an object type
    (0, 0x7777, "type 0x7777"),                       # not an algorithm at all
    (2, 0x0001, "nameAlg"),                           # RSA as a hash
    (10, 0x0099, "parameters.symmetric.algorithm"),
    (12, 0x0014, "parameters.scheme"),                # RSASSA on an ECC key
    (14, 0x0023, "parameters.scheme.hashAlg"),
    (16, 0x0020, "parameters.curveID"),               # BN-256 is not a curve we can use
])
def test_unknown_or_misplaced_algorithms_are_named(offset: int, value: int, field: str) -> None:
    raw = bytearray(AK_PUB[2:])
    raw[offset : offset + 2] = struct.pack(">H", value)
    with pytest.raises(MalformedStructureError, match=field.replace(".", r"\.")):
        TpmPublic.from_tpmt(bytes(raw))


def test_name_needs_a_hash_name_algorithm() -> None:
    raw = bytearray(AK_PUB[2:])
    raw[2:4] = struct.pack(">H", TpmAlg.NULL)
    with pytest.raises(EvidenceError, match="nameAlg null"):
        _ = TpmPublic.from_tpmt(bytes(raw)).name


# ---------------------------------------------------------------- PcrSelection


def test_pcr_selection_marshals_like_the_tpm() -> None:
    assert QUOTE_SELECTION.to_tpml() == bytes.fromhex("00000001000b03ff0001")
    assert QUOTE_SELECTION.to_tpml() in QUOTE
    assert QUOTE_SELECTION.tool_string() == "sha256:0,1,2,3,4,5,6,7,16"
    assert PcrSelection.parse("sha256:16,0,1,2,3,4,5,6,7") == QUOTE_SELECTION


@pytest.mark.parametrize(("bank", "pcrs"), [
    (TpmAlg.SHA256, (1, 0)), (TpmAlg.SHA256, (3, 3)), (TpmAlg.SHA256, (24,)),
    (TpmAlg.SHA256, (-1,)), (TpmAlg.RSA, (0,)),
])
def test_invalid_pcr_selections_are_refused(bank: TpmAlg, pcrs: tuple[int, ...]) -> None:
    with pytest.raises(EvidenceError):
        PcrSelection(bank, pcrs)


@pytest.mark.parametrize("text", ["sha256", "md5:1", "sha256:a", "sha256:99"])
def test_invalid_pcr_selection_strings_are_refused(text: str) -> None:
    with pytest.raises(EvidenceError):
        PcrSelection.parse(text)


# ---------------------------------------------------------------- Attest


def test_quote_attest_decodes_every_field() -> None:
    attest = Attest.parse(QUOTE)
    assert attest.type is AttestType.QUOTE
    assert attest.qualified_signer == AK_QUALIFIED_NAME
    assert attest.extra_data == QUOTE_NONCE
    assert attest.clock_info.reset_count == 3  # not obfuscated: the AK is in the endorsement hierarchy
    assert attest.clock_info.restart_count == 0 and attest.clock_info.safe
    assert attest.pcr_selection == (QUOTE_SELECTION,)
    assert attest.pcr_digest == hashlib.sha256(b"".join(QUOTE_PCRS[i] for i in QUOTE_SELECTION.pcrs)).digest()
    assert (attest.certified_name, attest.certified_qualified_name) == (b"", b"")
    assert attest.raw == QUOTE


def test_real_quote_verifies() -> None:
    ak = TpmPublic.from_tpm2b(AK_PUB)
    attest = verify_quote(ak, QUOTE, QUOTE_SIGNATURE, extra_data=QUOTE_NONCE, selection=QUOTE_SELECTION,
                          pcr_values=QUOTE_PCRS)
    assert attest.pcr_selection == (QUOTE_SELECTION,)


def test_real_quote_with_another_pcr_value_is_refused() -> None:
    ak = TpmPublic.from_tpm2b(AK_PUB)
    with pytest.raises(VerificationError, match="pcr digest"):
        verify_quote(ak, QUOTE, QUOTE_SIGNATURE, extra_data=QUOTE_NONCE, selection=QUOTE_SELECTION,
                     pcr_values=QUOTE_PCRS | {16: bytes(32)})


def test_attest_magic_is_checked() -> None:
    with pytest.raises(MalformedStructureError, match="TPM_GENERATED_VALUE"):
        Attest.parse(b"\xffTCH" + QUOTE[4:])


def test_unsupported_attest_type_is_named() -> None:
    with pytest.raises(MalformedStructureError, match="type 0x8014"):
        Attest.parse(QUOTE[:4] + b"\x80\x14" + QUOTE[6:])


def test_clock_safe_must_be_yes_or_no() -> None:
    offset = 4 + 2 + 2 + len(AK_QUALIFIED_NAME) + 2 + 32 + 8 + 4 + 4
    assert QUOTE[offset] == 1
    with pytest.raises(MalformedStructureError, match=r"clockInfo\.safe"):
        Attest.parse(QUOTE[:offset] + b"\x02" + QUOTE[offset + 1 :])


def test_pcr_beyond_23_is_malformed() -> None:
    tpml = bytes.fromhex("00000001000b03ff0001")
    bad = QUOTE.replace(tpml, bytes.fromhex("00000001000b04ff000101"))
    with pytest.raises(MalformedStructureError, match="selects pcr 24"):
        Attest.parse(bad)


def test_attest_truncations_and_trailing_bytes_are_malformed() -> None:
    for end in range(len(QUOTE)):
        with pytest.raises(MalformedStructureError, match="TPMS_ATTEST"):
            Attest.parse(QUOTE[:end])
    with pytest.raises(MalformedStructureError, match="trailing"):
        Attest.parse(QUOTE + b"\0")


# ---------------------------------------------------------------- hostile input


def _mutations(seed: bytes) -> st.SearchStrategy[bytes]:
    """Valid bytes with one edit: what a fuzzer finds first and random bytes rarely reach."""
    positions = st.integers(min_value=0, max_value=len(seed) - 1)
    flip = st.tuples(positions, st.integers(1, 255)).map(
        lambda pv: seed[: pv[0]] + bytes([seed[pv[0]] ^ pv[1]]) + seed[pv[0] + 1 :])
    cut = positions.map(lambda p: seed[:p])
    insert = st.tuples(positions, st.binary(min_size=1, max_size=8)).map(
        lambda pb: seed[: pb[0]] + pb[1] + seed[pb[0] :])
    return st.one_of(flip, cut, insert)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=400), _mutations(EK_PUB), _mutations(AK_PUB)))
def test_public_parser_only_raises_evidence_errors(data: bytes) -> None:
    try:
        parsed = TpmPublic.from_tpm2b(data)
    except EvidenceError:
        return
    assert parsed.to_tpm2b() == data
    try:
        parsed.public_key()
        _ = parsed.name
    except EvidenceError:
        pass


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(max_size=300), _mutations(QUOTE)))
def test_attest_parser_only_raises_evidence_errors(data: bytes) -> None:
    try:
        parsed = Attest.parse(data)
    except EvidenceError:
        return
    assert parsed.raw == data
