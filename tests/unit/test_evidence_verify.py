"""Signature, quote, certify, attribute and MakeCredential checks against a software fake of
the TPM side: keys marshaled as TPMT_PUBLIC, attestations as TPMS_ATTEST, signatures as
TPMT_SIGNATURE, so every refusal path can be reached without a TPM."""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from hypothesis import given, settings
from hypothesis import strategies as st

from vouchd.evidence import (
    AttestType,
    EvidenceError,
    MalformedStructureError,
    ObjectAttributes,
    PcrSelection,
    TpmAlg,
    TpmPublic,
    VerificationError,
    check_ak_attributes,
    check_node_key_attributes,
    make_credential,
    pcr_digest,
    primary_qualified_name,
    qualified_name,
    verify_certify,
    verify_quote,
    verify_signature,
)

A = ObjectAttributes
TPM_RESIDENT = A.FIXED_TPM | A.FIXED_PARENT | A.SENSITIVE_DATA_ORIGIN | A.USER_WITH_AUTH
AK_ATTRIBUTES = TPM_RESIDENT | A.RESTRICTED | A.SIGN_ENCRYPT
NODE_KEY_ATTRIBUTES = TPM_RESIDENT | A.SIGN_ENCRYPT
EK_ATTRIBUTES = (A.FIXED_TPM | A.FIXED_PARENT | A.SENSITIVE_DATA_ORIGIN | A.ADMIN_WITH_POLICY
                 | A.RESTRICTED | A.DECRYPT)
_HASHES: dict[TpmAlg, hashes.HashAlgorithm] = {
    TpmAlg.SHA1: hashes.SHA1(), TpmAlg.SHA256: hashes.SHA256(), TpmAlg.SHA384: hashes.SHA384()}
_CURVE_IDS = {"secp256r1": 0x0003, "secp384r1": 0x0004}


def _sized(data: bytes) -> bytes:
    return struct.pack(">H", len(data)) + data


def _symmetric(bits: int | None) -> bytes:
    return struct.pack(">HHH", TpmAlg.AES, bits, TpmAlg.CFB) if bits else struct.pack(">H", TpmAlg.NULL)


def _scheme(scheme: TpmAlg, scheme_hash: TpmAlg) -> bytes:
    if scheme is TpmAlg.NULL:
        return struct.pack(">H", scheme)
    return struct.pack(">HH", scheme, scheme_hash)


def ecc_public(key: ec.EllipticCurvePublicKey, attributes: ObjectAttributes, *,
               scheme: TpmAlg = TpmAlg.ECDSA, scheme_hash: TpmAlg = TpmAlg.SHA256,
               name_alg: TpmAlg = TpmAlg.SHA256, symmetric_bits: int | None = None) -> TpmPublic:
    size = (key.curve.key_size + 7) // 8
    numbers = key.public_numbers()
    raw = (struct.pack(">HHI", TpmAlg.ECC, name_alg, attributes) + _sized(b"") + _symmetric(symmetric_bits)
           + _scheme(scheme, scheme_hash) + struct.pack(">HH", _CURVE_IDS[key.curve.name], TpmAlg.NULL)
           + _sized(numbers.x.to_bytes(size, "big")) + _sized(numbers.y.to_bytes(size, "big")))
    return TpmPublic.from_tpmt(raw)


def rsa_public(key: rsa.RSAPublicKey, attributes: ObjectAttributes, *, scheme: TpmAlg = TpmAlg.RSASSA,
               scheme_hash: TpmAlg = TpmAlg.SHA256, symmetric_bits: int | None = None) -> TpmPublic:
    modulus = key.public_numbers().n.to_bytes(key.key_size // 8, "big")
    raw = (struct.pack(">HHI", TpmAlg.RSA, TpmAlg.SHA256, attributes) + _sized(b"")
           + _symmetric(symmetric_bits) + _scheme(scheme, scheme_hash)
           + struct.pack(">HI", key.key_size, 0) + _sized(modulus))
    return TpmPublic.from_tpmt(raw)


@dataclass
class FakeTpmKey:
    """A software key that signs the way a TPM does."""

    private: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
    public: TpmPublic

    def sign(self, message: bytes, scheme: TpmAlg | None = None, hash_alg: TpmAlg | None = None) -> bytes:
        # A key without a fixed scheme signs with what the caller asks for, as TPM2_Sign does.
        if self.public.scheme is not TpmAlg.NULL:
            scheme, hash_alg = scheme or self.public.scheme, hash_alg or self.public.scheme_hash
        hash_alg = hash_alg or TpmAlg.SHA256
        algorithm = _HASHES[hash_alg]
        if isinstance(self.private, ec.EllipticCurvePrivateKey):
            r, s = decode_dss_signature(self.private.sign(message, ec.ECDSA(algorithm)))
            size = (self.private.curve.key_size + 7) // 8
            return (struct.pack(">HH", TpmAlg.ECDSA, hash_alg) + _sized(r.to_bytes(size, "big"))
                    + _sized(s.to_bytes(size, "big")))
        if scheme is TpmAlg.RSAPSS:
            pad: padding.AsymmetricPadding = padding.PSS(padding.MGF1(algorithm), padding.PSS.MAX_LENGTH)
        else:
            pad = padding.PKCS1v15()
        return struct.pack(">HH", scheme, hash_alg) + _sized(self.private.sign(message, pad, algorithm))


def fake_ak() -> FakeTpmKey:
    private = ec.generate_private_key(ec.SECP256R1())
    return FakeTpmKey(private, ecc_public(private.public_key(), AK_ATTRIBUTES))


def fake_node_key() -> FakeTpmKey:
    private = ec.generate_private_key(ec.SECP256R1())
    return FakeTpmKey(private, ecc_public(private.public_key(), NODE_KEY_ATTRIBUTES, scheme=TpmAlg.NULL))


def attest_bytes(attest_type: AttestType, signer: bytes, extra_data: bytes, attested: bytes) -> bytes:
    return (struct.pack(">IH", 0xFF544347, attest_type) + _sized(signer) + _sized(extra_data)
            + struct.pack(">QIIBQ", 123456, 7, 1, 1, 0x2019102300163636) + attested)


def quote_bytes(ak: FakeTpmKey, nonce: bytes, selection: PcrSelection, values: dict[int, bytes]) -> bytes:
    digest = pcr_digest([values[i] for i in selection.pcrs])
    return attest_bytes(AttestType.QUOTE, ak.public.name, nonce, selection.to_tpml() + _sized(digest))


def certify_bytes(signer: bytes, nonce: bytes, certified: TpmPublic) -> bytes:
    return attest_bytes(AttestType.CERTIFY, signer, nonce, _sized(certified.name) + _sized(b"\0" * 34))


SELECTION = PcrSelection(TpmAlg.SHA256, tuple(range(8)))
PCRS = {i: hashlib.sha256(bytes([i])).digest() for i in range(24)}
NONCE = os.urandom(32)


# ---------------------------------------------------------------- signatures


@pytest.mark.parametrize("scheme", [TpmAlg.RSASSA, TpmAlg.RSAPSS])
def test_rsa_signatures_verify(scheme: TpmAlg) -> None:
    private = rsa.generate_private_key(65537, 2048)
    key = FakeTpmKey(private, rsa_public(private.public_key(), AK_ATTRIBUTES, scheme=scheme))
    verify_signature(key.public, key.sign(b"message"), b"message")
    with pytest.raises(VerificationError, match="does not verify"):
        verify_signature(key.public, key.sign(b"message"), b"other message")


def test_ecdsa_signature_by_another_key_is_refused() -> None:
    with pytest.raises(VerificationError, match="does not verify"):
        verify_signature(fake_ak().public, fake_ak().sign(b"message"), b"message")


def test_signature_scheme_must_match_a_fixed_key_scheme() -> None:
    private = rsa.generate_private_key(65537, 2048)
    key = FakeTpmKey(private, rsa_public(private.public_key(), AK_ATTRIBUTES, scheme=TpmAlg.RSAPSS))
    with pytest.raises(VerificationError, match="scheme does not match"):
        verify_signature(key.public, key.sign(b"m", scheme=TpmAlg.RSASSA), b"m")


def test_sha1_signatures_are_refused() -> None:
    node = fake_node_key()
    with pytest.raises(VerificationError, match="sha1 is not accepted"):
        verify_signature(node.public, node.sign(b"m", TpmAlg.ECDSA, TpmAlg.SHA1), b"m")


def test_ecdsa_signature_from_an_rsa_key_is_refused() -> None:
    private = rsa.generate_private_key(65537, 2048)
    public = rsa_public(private.public_key(), NODE_KEY_ATTRIBUTES, scheme=TpmAlg.NULL)
    with pytest.raises(VerificationError, match="not ecc"):
        verify_signature(public, fake_node_key().sign(b"m"), b"m")


def test_unsupported_signature_algorithm_is_malformed() -> None:
    with pytest.raises(MalformedStructureError, match="sigAlg ecschnorr"):
        verify_signature(fake_ak().public, struct.pack(">HH", TpmAlg.ECSCHNORR, TpmAlg.SHA256), b"m")


_RSA_SIGNER = rsa.generate_private_key(65537, 2048)
_SIGNING_KEYS = (
    fake_ak().public,
    rsa_public(_RSA_SIGNER.public_key(), NODE_KEY_ATTRIBUTES, scheme=TpmAlg.NULL),
)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(_SIGNING_KEYS), st.one_of(
    st.binary(max_size=160),
    st.tuples(st.sampled_from([TpmAlg.ECDSA, TpmAlg.RSASSA, TpmAlg.RSAPSS]),
              st.sampled_from([TpmAlg.SHA256, TpmAlg.SHA1, TpmAlg.NULL]),
              st.lists(st.binary(max_size=300), min_size=1, max_size=2)).map(
        lambda t: struct.pack(">HH", t[0], t[1]) + b"".join(_sized(p) for p in t[2]))))
def test_signature_parser_only_raises_evidence_errors(key: TpmPublic, data: bytes) -> None:
    with pytest.raises(EvidenceError):
        verify_signature(key, data, b"m")


# ---------------------------------------------------------------- quote


def test_quote_verifies_and_returns_the_attest() -> None:
    ak = fake_ak()
    attest = quote_bytes(ak, NONCE, SELECTION, PCRS)
    parsed = verify_quote(ak.public, attest, ak.sign(attest), extra_data=NONCE, selection=SELECTION,
                          pcr_values=PCRS)
    assert parsed.clock_info.reset_count == 7
    assert parsed.extra_data == NONCE


def _verify(ak: FakeTpmKey, attest: bytes, **overrides: object) -> None:
    arguments: dict[str, object] = {"extra_data": NONCE, "selection": SELECTION, "pcr_values": PCRS}
    arguments.update(overrides)
    verify_quote(ak.public, attest, ak.sign(attest), **arguments)  # type: ignore[arg-type]


@pytest.mark.parametrize(("overrides", "message"), [
    ({"extra_data": os.urandom(32)}, "quote extraData does not match"),
    ({"extra_data": NONCE[:-1]}, "quote extraData does not match"),
    ({"selection": PcrSelection(TpmAlg.SHA256, tuple(range(7)))}, "selection does not match"),
    ({"selection": PcrSelection(TpmAlg.SHA384, tuple(range(8)))}, "selection does not match"),
    ({"pcr_values": {i: PCRS[i] for i in range(7)}}, r"missing for selected pcrs \[7\]"),
    ({"pcr_values": PCRS | {3: b"\0" * 20}}, r"pcrs \[3\] are not sha256 sized"),
    ({"pcr_values": PCRS | {5: bytes(32)}}, "pcr digest does not match"),
])
def test_quote_refusals_name_the_check(overrides: dict[str, object], message: str) -> None:
    ak = fake_ak()
    with pytest.raises(VerificationError, match=message):
        _verify(ak, quote_bytes(ak, NONCE, SELECTION, PCRS), **overrides)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"extra_data": os.urandom(32)}, "quote extraData does not match"),
    ({"selection": PcrSelection(TpmAlg.SHA256, tuple(range(7)))}, "selection does not match"),
])
def test_without_pcr_values_everything_but_the_digest_is_still_checked(
    overrides: dict[str, object], message: str
) -> None:
    ak = fake_ak()
    attest = quote_bytes(ak, NONCE, SELECTION, PCRS)
    parsed = verify_quote(ak.public, attest, ak.sign(attest), extra_data=NONCE, selection=SELECTION, pcr_values=None)
    assert parsed.pcr_digest == pcr_digest([PCRS[i] for i in SELECTION.pcrs])  # left for the caller to compare
    with pytest.raises(VerificationError, match=message):
        _verify(ak, attest, pcr_values=None, **overrides)


def test_quote_signed_by_another_ak_is_refused() -> None:
    ak, other = fake_ak(), fake_ak()
    attest = quote_bytes(ak, NONCE, SELECTION, PCRS)
    with pytest.raises(VerificationError, match="signature"):
        verify_quote(other.public, attest, ak.sign(attest), extra_data=NONCE, selection=SELECTION,
                     pcr_values=PCRS)


def test_quote_with_two_banks_is_refused() -> None:
    ak = fake_ak()
    two_banks = b"\0\0\0\x02" + SELECTION.to_tpml()[4:] + PcrSelection(TpmAlg.SHA1, (0,)).to_tpml()[4:]
    attest = attest_bytes(AttestType.QUOTE, ak.public.name, NONCE, two_banks + _sized(bytes(32)))
    with pytest.raises(VerificationError, match="selection does not match"):
        _verify(ak, attest)


def test_certify_is_not_a_quote() -> None:
    ak = fake_ak()
    with pytest.raises(VerificationError, match="not a quote"):
        _verify(ak, certify_bytes(ak.public.name, NONCE, fake_node_key().public))


def test_pcr_digest_uses_the_signing_hash() -> None:
    private = rsa.generate_private_key(65537, 2048)
    ak = FakeTpmKey(private, rsa_public(private.public_key(), AK_ATTRIBUTES, scheme=TpmAlg.RSASSA,
                                        scheme_hash=TpmAlg.SHA384))
    digest = pcr_digest([PCRS[i] for i in SELECTION.pcrs], TpmAlg.SHA384)
    assert len(digest) == 48
    attest = attest_bytes(AttestType.QUOTE, ak.public.name, NONCE, SELECTION.to_tpml() + _sized(digest))
    _verify(ak, attest)


# ---------------------------------------------------------------- certify


def test_certify_verifies_with_the_expected_signer() -> None:
    ak, node = fake_ak(), fake_node_key()
    ek_name = b"\x00\x0b" + os.urandom(32)
    ak_qualified_name = qualified_name(primary_qualified_name(ek_name), ak.public.name)
    attest = certify_bytes(ak_qualified_name, NONCE, node.public)
    parsed = verify_certify(ak.public, attest, ak.sign(attest), extra_data=NONCE, certified=node.public,
                            expected_signer_qualified_name=ak_qualified_name)
    assert parsed.certified_name == node.public.name


@pytest.mark.parametrize("case", ["nonce", "certified", "signer", "type", "signature"])
def test_certify_refusals_name_the_check(case: str) -> None:
    ak, node = fake_ak(), fake_node_key()
    ak_qualified_name = qualified_name(primary_qualified_name(b"\x00\x0b" + bytes(32)), ak.public.name)
    attest = certify_bytes(ak_qualified_name, NONCE, node.public)
    signature = ak.sign(attest)
    certified, expected, nonce = node.public, ak_qualified_name, NONCE
    message = {"nonce": "certify extraData does not match", "certified": "certified name does not match",
               "signer": "signer qualified name does not match", "type": "not a certify",
               "signature": "signature does not verify"}[case]
    if case == "nonce":
        nonce = os.urandom(32)
    elif case == "certified":
        certified = fake_node_key().public
    elif case == "signer":
        expected = qualified_name(primary_qualified_name(b"\x00\x0b" + b"\1" * 32), ak.public.name)
    elif case == "type":
        attest = quote_bytes(ak, NONCE, SELECTION, PCRS)
        signature = ak.sign(attest)
    else:
        signature = fake_ak().sign(attest)
    with pytest.raises(VerificationError, match=message):
        verify_certify(ak.public, attest, signature, extra_data=nonce, certified=certified,
                       expected_signer_qualified_name=expected)


# ---------------------------------------------------------------- attributes


def test_good_ak_and_node_key_pass() -> None:
    check_ak_attributes(fake_ak().public)
    private = rsa.generate_private_key(65537, 2048)
    check_ak_attributes(rsa_public(private.public_key(), AK_ATTRIBUTES, scheme=TpmAlg.RSAPSS))
    check_node_key_attributes(fake_node_key().public)


_P256 = ec.generate_private_key(ec.SECP256R1()).public_key()
_P384 = ec.generate_private_key(ec.SECP384R1()).public_key()
_RSA2048 = rsa.generate_private_key(65537, 2048).public_key()
_RSA3072 = rsa.generate_private_key(65537, 3072).public_key()


@pytest.mark.parametrize(("public", "message"), [
    (ecc_public(_P256, AK_ATTRIBUTES & ~A.RESTRICTED), "ak lacks attribute restricted"),
    (ecc_public(_P256, AK_ATTRIBUTES & ~A.FIXED_TPM), "ak lacks attribute fixed_tpm"),
    (ecc_public(_P256, AK_ATTRIBUTES & ~A.FIXED_PARENT), "ak lacks attribute fixed_parent"),
    (ecc_public(_P256, AK_ATTRIBUTES & ~A.SENSITIVE_DATA_ORIGIN), "ak lacks attribute sensitive_data_origin"),
    (ecc_public(_P256, AK_ATTRIBUTES & ~A.SIGN_ENCRYPT), "ak lacks attribute sign_encrypt"),
    (ecc_public(_P256, AK_ATTRIBUTES | A.DECRYPT), "ak has forbidden attribute decrypt"),
    (ecc_public(_P256, AK_ATTRIBUTES, scheme=TpmAlg.NULL), "ak scheme is not ecdsa-sha256"),
    (ecc_public(_P256, AK_ATTRIBUTES, scheme_hash=TpmAlg.SHA384), "ak scheme is not ecdsa-sha256"),
    (ecc_public(_P256, AK_ATTRIBUTES, name_alg=TpmAlg.SHA1), "ak name algorithm sha1 is not accepted"),
    (ecc_public(_P384, AK_ATTRIBUTES, scheme_hash=TpmAlg.SHA384), "ak curve is not nist p-256"),
    (rsa_public(_RSA3072, AK_ATTRIBUTES), "ak rsa key is not 2048 bits"),
    (rsa_public(_RSA2048, AK_ATTRIBUTES, scheme=TpmAlg.NULL), "ak scheme is not rsassa"),
    (rsa_public(_RSA2048, EK_ATTRIBUTES, scheme=TpmAlg.NULL, symmetric_bits=128), "ak scheme"),
])
def test_ak_refusals_name_the_attribute(public: TpmPublic, message: str) -> None:
    with pytest.raises(VerificationError, match=message):
        check_ak_attributes(public)


@pytest.mark.parametrize(("public", "message"), [
    (ecc_public(_P256, NODE_KEY_ATTRIBUTES | A.RESTRICTED), "node key has forbidden attribute restricted"),
    (ecc_public(_P256, NODE_KEY_ATTRIBUTES | A.DECRYPT), "node key has forbidden attribute decrypt"),
    (ecc_public(_P256, NODE_KEY_ATTRIBUTES & ~A.FIXED_TPM), "node key lacks attribute fixed_tpm"),
    (ecc_public(_P256, NODE_KEY_ATTRIBUTES & ~A.SENSITIVE_DATA_ORIGIN & ~A.FIXED_PARENT),
     "node key lacks attribute fixed_parent, sensitive_data_origin"),
    (ecc_public(_P256, NODE_KEY_ATTRIBUTES, scheme=TpmAlg.ECSCHNORR), "node key scheme ecschnorr is not ecdsa"),
    (ecc_public(_P384, NODE_KEY_ATTRIBUTES), "not an ecc nist p-256 key"),
    (rsa_public(_RSA2048, NODE_KEY_ATTRIBUTES), "not an ecc nist p-256 key"),
])
def test_node_key_refusals_name_the_attribute(public: TpmPublic, message: str) -> None:
    with pytest.raises(VerificationError, match=message):
        check_node_key_attributes(public)


# ---------------------------------------------------------------- MakeCredential


def _unsized(data: bytes) -> bytes:
    (size,) = struct.unpack(">H", data[:2])
    assert len(data) == 2 + size
    return data[2:]


def test_rsa_credential_has_the_activate_credential_layout() -> None:
    private = rsa.generate_private_key(65537, 2048)
    ek = rsa_public(private.public_key(), EK_ATTRIBUTES, scheme=TpmAlg.NULL, symmetric_bits=128)
    secret = os.urandom(32)
    id_object, encrypted_secret = make_credential(ek, secret, fake_ak().public.name)
    inner = _unsized(id_object)
    integrity, encrypted_identity = _unsized(inner[: 2 + 32]), inner[2 + 32 :]
    assert len(integrity) == 32
    assert len(encrypted_identity) == 2 + len(secret)  # TPM2B_DIGEST of the secret, CFB keeps length
    oaep = padding.OAEP(padding.MGF1(hashes.SHA256()), hashes.SHA256(), b"IDENTITY\0")
    seed = private.decrypt(_unsized(encrypted_secret), oaep)
    assert len(seed) == 32


def test_ecc_credential_carries_a_point_on_the_ek_curve() -> None:
    private = ec.generate_private_key(ec.SECP384R1())
    ek = ecc_public(private.public_key(), EK_ATTRIBUTES, scheme=TpmAlg.NULL, name_alg=TpmAlg.SHA384,
                    symmetric_bits=256)
    id_object, encrypted_secret = make_credential(ek, os.urandom(48), fake_ak().public.name)
    assert len(_unsized(_unsized(id_object)[:50])) == 48  # SHA-384 integrity HMAC
    point = _unsized(encrypted_secret)
    x, rest = _unsized(point[: 2 + 48]), point[2 + 48 :]
    y = _unsized(rest)
    ec.EllipticCurvePublicNumbers(int.from_bytes(x, "big"), int.from_bytes(y, "big"),
                                  ec.SECP384R1()).public_key()


def test_credentials_are_fresh_each_time() -> None:
    private = rsa.generate_private_key(65537, 2048)
    ek = rsa_public(private.public_key(), EK_ATTRIBUTES, scheme=TpmAlg.NULL, symmetric_bits=128)
    name = fake_ak().public.name
    assert make_credential(ek, b"s" * 32, name) != make_credential(ek, b"s" * 32, name)


@pytest.mark.parametrize(("secret", "name", "message"), [
    (b"", None, "1 to 32 bytes"),
    (b"x" * 33, None, "1 to 32 bytes"),
    (b"x" * 32, b"\x00\x0b" + bytes(31), "digest does not match"),
    (b"x" * 32, b"\x00\x01" + bytes(32), "does not start with a hash"),
])
def test_make_credential_refuses_bad_arguments(secret: bytes, name: bytes | None, message: str) -> None:
    private = rsa.generate_private_key(65537, 2048)
    ek = rsa_public(private.public_key(), EK_ATTRIBUTES, scheme=TpmAlg.NULL, symmetric_bits=128)
    with pytest.raises(EvidenceError, match=message):
        make_credential(ek, secret, name if name is not None else fake_ak().public.name)


def test_make_credential_needs_a_restricted_decryption_ek() -> None:
    with pytest.raises(EvidenceError, match="not a restricted decryption key"):
        make_credential(fake_ak().public, b"x" * 32, fake_ak().public.name)
