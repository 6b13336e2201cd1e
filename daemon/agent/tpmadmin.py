"""The admin socket's `tpm.info` and `tpm.quote`: the agent owns the TPM, so it answers for it.

`tpm.info` says what the TPM is: its EK (type, the hash that names the node, the certificate the TPM
holds and any chain certificates in NV), maker, firmware, algorithms and PCR banks. `tpm.quote` quotes
PCRs with the node's AK over a nonce of the operator's choosing and returns what tpm2_checkquote needs
to check it independently of vouchd (`vouchd tpm quote` writes the files). Neither returns anything
secret: the AK signs nothing but TPM-generated quotes, which carry the caller's nonce, so a quote
handed out here cannot stand in for one the authority asked for with its own nonce.

The argument parsers are shared with the CLI, which checks what it can before asking the agent.
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING, Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from vouchd.agent.admin import AdminCommand, AdminCommandError
from vouchd.errors import VouchdError
from vouchd.evidence import EvidenceError, PcrSelection, TpmAlg, TpmPublic, TpmSignature, verify_quote
from vouchd.protocol.identities import ek_hash

if TYPE_CHECKING:
    from vouchd.tpm import TpmService
    from vouchd.tpm.capabilities import TpmDescription

__all__ = [
    "DEFAULT_QUOTE_PCRS",
    "MAX_NONCE_BYTES",
    "PCR_BANKS",
    "TpmArgumentsError",
    "parse_nonce",
    "parse_pcr_selection",
    "tpm_admin_commands",
]

_log = logging.getLogger("vouchd.admin.tpm")

DEFAULT_QUOTE_PCRS = "sha256:0,1,2,3,4,5,6,7"  # the measured-boot PCRs node attestation quotes
MAX_NONCE_BYTES = 64  # what TPM2_Quote's qualifyingData holds (the size of a TPMT_HA)
PCR_BANKS: dict[str, TpmAlg] = {
    "sha1": TpmAlg.SHA1,
    "sha256": TpmAlg.SHA256,
    "sha384": TpmAlg.SHA384,
    "sha512": TpmAlg.SHA512,
}
_PCR_COUNT = 24
_MAX_TEXT_IN_ERROR = 80
_HEX = re.compile(r"[0-9a-fA-F]*")


class TpmArgumentsError(VouchdError, ValueError):
    """A nonce or PCR selection that cannot be used; the message names what was wrong."""


def parse_nonce(text: str) -> bytes:
    """The nonce given as hex digits (as tpm2_checkquote -q takes it): 1 to 64 bytes."""
    shown = text[:_MAX_TEXT_IN_ERROR]
    if not text:
        raise TpmArgumentsError("nonce is empty: a quote without one could be replayed")
    if not _HEX.fullmatch(text):
        raise TpmArgumentsError(f"nonce {shown!r} is not hex (digits 0-9 and a-f only, no 0x prefix)")
    if len(text) % 2:
        raise TpmArgumentsError(f"nonce {shown!r} has an odd number of hex digits")
    if len(text) // 2 > MAX_NONCE_BYTES:
        raise TpmArgumentsError(f"nonce has {len(text) // 2} bytes, at most {MAX_NONCE_BYTES} fit in a quote")
    return bytes.fromhex(text)


def parse_pcr_selection(text: str) -> PcrSelection:
    """One bank and its PCRs in the tpm2-tools form `sha256:0,1,2` (indices in any order)."""
    shown = text[:_MAX_TEXT_IN_ERROR]
    bank, colon, listed = text.partition(":")
    if not colon:
        raise TpmArgumentsError(f"pcr selection {shown!r} is not of the form bank:i,j,k (e.g. {DEFAULT_QUOTE_PCRS})")
    hash_alg = PCR_BANKS.get(bank.strip().lower())
    if hash_alg is None:
        raise TpmArgumentsError(f"unknown pcr bank {bank[:_MAX_TEXT_IN_ERROR]!r}: expected one of "
                                f"{', '.join(PCR_BANKS)}")
    if not listed.strip():
        raise TpmArgumentsError(f"pcr selection {shown!r} names no pcrs")
    indices: list[int] = []
    for item in (part.strip() for part in listed.split(",")):
        if not item.isdigit() or not item.isascii():
            raise TpmArgumentsError(f"pcr selection {shown!r}: {item[:_MAX_TEXT_IN_ERROR]!r} is not a pcr index")
        index = int(item)
        if index >= _PCR_COUNT:
            raise TpmArgumentsError(f"pcr index {index} is out of range: a TPM has pcrs 0 to {_PCR_COUNT - 1}")
        if index in indices:
            raise TpmArgumentsError(f"pcr selection {shown!r} lists pcr {index} twice")
        indices.append(index)
    return PcrSelection(hash_alg, tuple(sorted(indices)))


def tpm_admin_commands(tpm: TpmService | None) -> dict[str, AdminCommand]:
    """`tpm.info` and `tpm.quote` for the agent's admin socket; none for an agent without a TPM."""
    if tpm is None:
        return {}

    async def info(args: dict[str, Any]) -> object:
        _no_arguments(args)
        return _info(tpm, await tpm.describe())

    async def quote(args: dict[str, Any]) -> object:
        return await _quote(tpm, args)

    return {"tpm.info": info, "tpm.quote": quote}


def _no_arguments(args: dict[str, Any]) -> None:
    if args:
        raise AdminCommandError(f"takes no arguments, got {', '.join(sorted(args))[:200]}")


def _info(tpm: TpmService, description: TpmDescription) -> dict[str, object]:
    ek = tpm.ek
    chain = [{"nv_index": f"{index:#010x}", **_certificate(der)}
             for index, data in description.ek_chain for der in _der_certificates(data)]
    return {
        "tcti": tpm.tcti,
        "ek": {
            "type": ek.ek_type,
            "hash": ek_hash(TpmPublic.from_tpm2b(ek.public)),
            "certificate": None if ek.certificate is None else _certificate(ek.certificate),
            "chain": chain,
        },
        "manufacturer": description.manufacturer,
        "vendor": description.vendor,
        # Makers encode it their own way; most put major.minor in the halves of the first word.
        "firmware_version": ".".join(str(half) for word in description.firmware
                                     for half in (word >> 16, word & 0xFFFF)),
        "firmware_raw": [f"{word:#010x}" for word in description.firmware],
        "specification": {"family": description.family, "level": description.level,
                          "revision": description.revision, "year": description.year,
                          "day_of_year": description.day_of_year},
        "algorithms": [{"name": alg.name, "id": f"{alg.alg:#06x}", "properties": list(alg.properties)}
                       for alg in description.algorithms],
        "curves": list(description.curves),
        "pcr_banks": [{"bank": bank.name, "pcrs": list(bank.pcrs)} for bank in description.pcr_banks],
    }


def _certificate(der: bytes) -> dict[str, object]:
    """What an operator checks in a certificate; one that does not parse is reported, not fatal."""
    fingerprint = hashes.Hash(hashes.SHA256())
    fingerprint.update(der)
    fields: dict[str, object] = {"sha256": fingerprint.finalize().hex()}
    try:
        cert = x509.load_der_x509_certificate(der)
        fields.update({
            # EK certificates often have an empty subject: the TPM's identity is in the SAN instead.
            "subject": cert.subject.rfc4514_string(),
            "issuer": cert.issuer.rfc4514_string(),
            "serial": format(cert.serial_number, "x"),
            "not_before": cert.not_valid_before_utc.isoformat(),
            "not_after": cert.not_valid_after_utc.isoformat(),
        })
    except ValueError as err:
        fields["error"] = f"not a certificate cryptography can read: {str(err)[:200]}"
    return fields


def _der_certificates(data: bytes) -> list[bytes]:
    """The DER certificates one after another at the start of an NV index, padding after them dropped."""
    found: list[bytes] = []
    offset = 0
    while offset + 2 <= len(data) and data[offset] == 0x30:  # SEQUENCE: another certificate follows
        length, header = data[offset + 1], 2
        if length & 0x80:
            size = length & 0x7F
            if not 1 <= size <= 4 or offset + 2 + size > len(data):
                break
            length, header = int.from_bytes(data[offset + 2 : offset + 2 + size], "big"), 2 + size
        end = offset + header + length
        if end > len(data):
            break
        found.append(data[offset:end])
        offset = end
    return found


async def _quote(tpm: TpmService, args: dict[str, Any]) -> dict[str, object]:
    unknown = sorted(set(args) - {"nonce", "pcrs"})
    if unknown:
        raise AdminCommandError(f"unknown arguments: {', '.join(unknown)[:200]}")
    nonce_text, pcrs_text = args.get("nonce"), args.get("pcrs", DEFAULT_QUOTE_PCRS)
    if not isinstance(nonce_text, str) or not isinstance(pcrs_text, str):
        raise AdminCommandError("nonce (hex) and pcrs (bank:i,j,k) must be strings")
    nonce = parse_nonce(nonce_text)
    selection = parse_pcr_selection(pcrs_text)
    ak_public = tpm.ak_public
    if ak_public is None:
        raise AdminCommandError("the attestation key is not loaded yet: try again once the agent is ready")
    ak = TpmPublic.from_tpm2b(ak_public)
    bank = selection.hash_alg.name.lower()
    made, values = await tpm.quote_with_pcr_values(bank, selection.pcrs, nonce)
    try:
        # What tpm2_checkquote will check, checked first: nothing is handed out that fails it.
        verify_quote(ak, made.attest, made.signature, extra_data=nonce, selection=selection, pcr_values=values)
    except EvidenceError as err:
        raise AdminCommandError(f"the quote does not verify against the pcr values read with it ({err}): "
                                "a pcr was probably extended meanwhile, try again") from None
    _log.info("quote made for the admin socket", extra={"pcr_selection": selection.tool_string(),
                                                         "nonce_bytes": len(nonce)})
    return {
        "nonce": nonce.hex(),
        "pcr_selection": selection.tool_string(),
        "pcr_values": {str(index): values[index].hex() for index in selection.pcrs},
        "hash": TpmSignature.parse(made.signature).hash_alg.name.lower(),
        "ak_public": ak_public.hex(),
        "ak_public_pem": ak.public_key().public_bytes(serialization.Encoding.PEM,
                                                      serialization.PublicFormat.SubjectPublicKeyInfo).decode(),
        "attest": made.attest.hex(),
        "signature": made.signature.hex(),
    }
