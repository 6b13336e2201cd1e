"""The admin socket's `tpm.info` and `tpm.quote` against a swtpm, checked by tpm2-tools.

The swtpm serves one client at a time: what tpm2-tools reads from the TPM itself (tpm2_getcap,
tpm2_pcrread) is read while no TpmService holds it. tpm2_checkquote needs no TPM.
"""

from __future__ import annotations

import asyncio
import datetime
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tpm2_pytss import ESAPI, TPM2_ALG, TPM2B_AUTH, TPM2B_NV_PUBLIC, TPMA_NV, TPMS_NV_PUBLIC, TSS2_Exception

from tests.tpm.conftest import BootedTpm
from vouchd.agent.admin import AdminCommand
from vouchd.agent.tpmadmin import tpm_admin_commands
from vouchd.errors import VouchdError
from vouchd.evidence import PcrSelection, TpmAlg, parse_event_log
from vouchd.tpm import NodeKeys, TpmCapabilityError, TpmService
from vouchd.tpmcli import tpm2_tools_pcrs

pytestmark = pytest.mark.tpm

DEADLINE = 30.0
CHAIN_INDICES = (0x01C00100, 0x01C00101)


async def call(commands: dict[str, AdminCommand], name: str, args: dict[str, Any]) -> Any:
    async with asyncio.timeout(DEADLINE):
        return await commands[name](args)


def tool(*command: str) -> str:
    result = subprocess.run(list(command), capture_output=True, text=True, timeout=DEADLINE, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout


def checkquote(directory: Path, nonce: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["tpm2_checkquote", "-u", str(directory / "ak.pub.pem"), "-m", str(directory / "quote.msg"),
                           "-s", str(directory / "quote.sig"), "-f", str(directory / "quote.pcrs"), "-g", "sha256",
                           "-q", nonce], capture_output=True, text=True, timeout=DEADLINE, check=False)


def write_quote_files(directory: Path, reply: dict[str, Any]) -> None:
    selection = PcrSelection.parse(reply["pcr_selection"])
    values = {int(index): bytes.fromhex(value) for index, value in reply["pcr_values"].items()}
    (directory / "ak.pub.pem").write_text(reply["ak_public_pem"])
    (directory / "quote.msg").write_bytes(bytes.fromhex(reply["attest"]))
    (directory / "quote.sig").write_bytes(bytes.fromhex(reply["signature"]))
    (directory / "quote.pcrs").write_bytes(tpm2_tools_pcrs(selection, values))


def test_an_agent_without_a_tpm_has_no_tpm_commands() -> None:
    assert tpm_admin_commands(None) == {}


# ---------------------------------------------------------------------- tpm.quote

async def test_quote_is_what_tpm2_checkquote_accepts_for_its_nonce_only(
        tpm: TpmService, node_keys: NodeKeys, booted_tpm: BootedTpm, tmp_path: Path) -> None:
    reply = await call(tpm_admin_commands(tpm), "tpm.quote", {"nonce": "c0ffee" * 8})

    assert reply["ak_public"] == node_keys.ak.public.hex()  # the node's own AK, not a new one
    assert reply["pcr_selection"] == "sha256:0,1,2,3,4,5,6,7"  # the default: the measured-boot PCRs
    replayed = parse_event_log(booted_tpm.event_log.read_bytes()).replay(TpmAlg.SHA256)
    assert {int(i): bytes.fromhex(v) for i, v in reply["pcr_values"].items()} == {i: replayed[i] for i in range(8)}
    write_quote_files(tmp_path, reply)
    accepted = checkquote(tmp_path, "c0ffee" * 8)
    assert accepted.returncode == 0, accepted.stderr
    refused = checkquote(tmp_path, "c0ffee" * 7 + "c0ffef")
    assert refused.returncode != 0
    assert "Error validating nonce from quote" in refused.stderr


async def test_pcrs_file_is_byte_for_byte_what_tpm2_pcrread_writes(booted_tpm: BootedTpm, tmp_path: Path) -> None:
    every_pcr = "sha256:" + ",".join(str(i) for i in range(24))  # three digest lists of eight
    async with asyncio.timeout(DEADLINE), TpmService(booted_tpm.tcti) as tpm:
        await tpm.ensure_node_keys(tmp_path / "keys")
        reply = await tpm_admin_commands(tpm)["tpm.quote"]({"nonce": "01", "pcrs": every_pcr})
    values = {int(index): bytes.fromhex(value) for index, value in reply["pcr_values"].items()}
    ours = tpm2_tools_pcrs(PcrSelection.parse(every_pcr), values)

    tool("tpm2_pcrread", "-T", booted_tpm.tcti, "-o", str(tmp_path / "pcrread.bin"), "-F", "serialized", every_pcr)
    assert ours == (tmp_path / "pcrread.bin").read_bytes()


@pytest.mark.parametrize(("args", "message"), [
    ({}, "nonce (hex) and pcrs (bank:i,j,k) must be strings"),
    ({"nonce": 7}, "nonce (hex) and pcrs (bank:i,j,k) must be strings"),
    ({"nonce": ""}, "nonce is empty: a quote without one could be replayed"),
    ({"nonce": "0x01"}, "nonce '0x01' is not hex (digits 0-9 and a-f only, no 0x prefix)"),
    ({"nonce": "012"}, "nonce '012' has an odd number of hex digits"),
    ({"nonce": "ab" * 65}, "nonce has 65 bytes, at most 64 fit in a quote"),
    ({"nonce": "01", "pcrs": "sha3:0"}, "unknown pcr bank 'sha3': expected one of sha1, sha256, sha384, sha512"),
    ({"nonce": "01", "pcrs": "sha256:0,24"}, "pcr index 24 is out of range: a TPM has pcrs 0 to 23"),
    ({"nonce": "01", "pcrs": "sha256:-1"}, "pcr selection 'sha256:-1': '-1' is not a pcr index"),
    ({"nonce": "01", "pcrs": "sha256:3,3"}, "pcr selection 'sha256:3,3' lists pcr 3 twice"),
    ({"nonce": "01", "pcrs": "sha256:"}, "pcr selection 'sha256:' names no pcrs"),
    ({"nonce": "01", "pcrs": "0,1"}, "pcr selection '0,1' is not of the form bank:i,j,k (e.g. sha256:0,1,2,3,4,5,6,7)"),
    ({"nonce": "01", "out": "/tmp"}, "unknown arguments: out"),
])
async def test_quote_refuses_what_it_cannot_use_and_says_what(tpm: TpmService, node_keys: NodeKeys,
                                                               args: dict[str, Any], message: str) -> None:
    with pytest.raises(VouchdError) as refused:
        await call(tpm_admin_commands(tpm), "tpm.quote", args)
    assert str(refused.value) == message


async def test_quote_of_a_bank_the_tpm_has_not_allocated_names_the_pcrs(tpm: TpmService,
                                                                        node_keys: NodeKeys) -> None:
    # The swtpm is provisioned with a sha256 bank only.
    with pytest.raises(TpmCapabilityError, match=r"^pcrs 0, 1 are not allocated in the sha1? bank$"):
        await call(tpm_admin_commands(tpm), "tpm.quote", {"nonce": "01", "pcrs": "sha1:1,0"})


async def test_quote_before_the_node_keys_exist_says_so(tpm: TpmService) -> None:
    with pytest.raises(VouchdError) as refused:
        await call(tpm_admin_commands(tpm), "tpm.quote", {"nonce": "01"})
    assert str(refused.value) == "the attestation key is not loaded yet: try again once the agent is ready"


# ---------------------------------------------------------------------- tpm.info

def _small_certificate(name: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(7).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER))


@pytest.fixture
def ek_chain_in_nv(booted_tpm: BootedTpm) -> Iterator[list[bytes]]:
    """EK chain indices as a manufacturer fills them: the issuer in one, two certificates and padding in
    the next. Removed again afterwards: the swtpm's NV outlives the test."""
    issuer = x509.load_pem_x509_certificate(booted_tpm.swtpm.manufacturer_issuer.read_bytes())
    issuer_der = issuer.public_bytes(serialization.Encoding.DER)
    pair = [_small_certificate("chain one"), _small_certificate("chain two")]
    contents = {CHAIN_INDICES[0]: issuer_der, CHAIN_INDICES[1]: b"".join(pair) + b"\xff" * 16}
    attributes = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHREAD | TPMA_NV.AUTHWRITE | TPMA_NV.NO_DA
    try:
        # Closed before the test opens its own: the swtpm serves one connection at a time.
        esapi = ESAPI(booted_tpm.tcti)
        try:
            for index, data in contents.items():
                public = TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(nvIndex=index, nameAlg=TPM2_ALG.SHA256,
                                                                  attributes=attributes, dataSize=len(data)))
                handle = esapi.nv_define_space(TPM2B_AUTH(b""), public)
                for offset in range(0, len(data), 512):
                    esapi.nv_write(handle, data[offset:offset + 512], offset)
        finally:
            esapi.close()
        yield [issuer_der, *pair]
    finally:
        esapi = ESAPI(booted_tpm.tcti)
        try:
            for index in CHAIN_INDICES:
                try:
                    esapi.nv_undefine_space(esapi.tr_from_tpmpublic(index))
                except TSS2_Exception:
                    continue  # never defined: the set-up failed before it
        finally:
            esapi.close()


async def test_info_agrees_with_tpm2_getcap_and_the_ek_certificate(booted_tpm: BootedTpm) -> None:
    fixed = yaml.safe_load(tool("tpm2_getcap", "-T", booted_tpm.tcti, "properties-fixed"))
    banks = yaml.safe_load(tool("tpm2_getcap", "-T", booted_tpm.tcti, "pcrs"))["selected-pcrs"]
    algorithms = yaml.safe_load(tool("tpm2_getcap", "-T", booted_tpm.tcti, "algorithms"))
    async with asyncio.timeout(DEADLINE), TpmService(booted_tpm.tcti) as tpm:
        info = await tpm_admin_commands(tpm)["tpm.info"]({})
        ek_certificate = x509.load_der_x509_certificate(tpm.ek.certificate or b"")

    assert info["tcti"] == booted_tpm.tcti
    assert info["manufacturer"] == fixed["TPM2_PT_MANUFACTURER"]["value"] == "IBM"
    assert info["vendor"] == " ".join(fixed[f"TPM2_PT_VENDOR_STRING_{n}"]["value"] for n in (1, 2))
    assert info["firmware_raw"] == [f"{fixed[f'TPM2_PT_FIRMWARE_VERSION_{n}']['raw']:#010x}" for n in (1, 2)]
    assert info["specification"]["revision"] == f"{fixed['TPM2_PT_REVISION']['value']:.2f}"
    assert info["pcr_banks"] == [{"bank": name, "pcrs": pcrs} for bank in banks for name, pcrs in bank.items()]
    properties = ("asymmetric", "symmetric", "hash", "object", "signing", "encrypting", "method")
    assert {alg["id"]: alg["properties"] for alg in info["algorithms"]} == {
        f"{flags['value']:#06x}": [p for p in properties if flags[p]] for flags in algorithms.values()}

    ek = info["ek"]
    # The EK hash names the node (tpm:ek_hash): the sha256 of the public key the certificate certifies.
    spki = ek_certificate.public_key().public_bytes(serialization.Encoding.DER,
                                                    serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    assert ek["hash"] == digest.finalize().hex()
    assert ek["type"] == "rsa2048"
    assert ek["certificate"]["issuer"] == ek_certificate.issuer.rfc4514_string() == "CN=swtpm-localca"
    assert ek["certificate"]["not_after"] == ek_certificate.not_valid_after_utc.isoformat()
    assert ek["certificate"]["serial"] == format(ek_certificate.serial_number, "x")
    assert ek["chain"] == []  # swtpm fills no chain indices


async def test_info_lists_every_certificate_of_the_ek_chain_indices(booted_tpm: BootedTpm,
                                                                   ek_chain_in_nv: list[bytes]) -> None:
    async with asyncio.timeout(DEADLINE), TpmService(booted_tpm.tcti) as tpm:
        info = await tpm_admin_commands(tpm)["tpm.info"]({})

    chain = info["ek"]["chain"]
    assert [(link["nv_index"], link["subject"]) for link in chain] == [
        ("0x01c00100", "CN=swtpm-localca"), ("0x01c00101", "CN=chain one"), ("0x01c00101", "CN=chain two")]
    for link, der in zip(chain, ek_chain_in_nv, strict=True):
        digest = hashes.Hash(hashes.SHA256())
        digest.update(der)
        assert link["sha256"] == digest.finalize().hex()  # the padding after the pair was left out


async def test_info_takes_no_arguments(tpm: TpmService) -> None:
    with pytest.raises(VouchdError, match=r"^takes no arguments, got verbose$"):
        await call(tpm_admin_commands(tpm), "tpm.info", {"verbose": True})
