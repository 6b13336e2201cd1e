"""What vouchd needs from a TPM, what a given TPM lacks of it, and what it says about itself.

Checked once at start so that a TPM without, say, P-384 fails with a sentence naming P-384 instead of
a response code from the first CreatePrimary. `describe_tpm` answers `vouchd tpm info`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tpm2_pytss import ESAPI, TPM2_ALG, TPM2_CAP, TPM2_ECC, TSS2_Exception
from tpm2_pytss.utils import NoSuchIndex, NVReadEK

from vouchd.tpm.ek import EkType

__all__ = [
    "AlgorithmInfo",
    "PcrBank",
    "TpmCapabilities",
    "TpmDescription",
    "describe_tpm",
    "missing_capabilities",
]

_log = logging.getLogger(__name__)

# Every EK type: SHA-256 names and PCRs, ECC P-256 ECDSA for the AK and node key, AES-CFB and
# KDFa (SP800-108) for the credential protection of ActivateCredential.
_COMMON_ALGORITHMS = (
    TPM2_ALG.SHA256,
    TPM2_ALG.ECC,
    TPM2_ALG.ECDSA,
    TPM2_ALG.AES,
    TPM2_ALG.CFB,
    TPM2_ALG.KDF1_SP800_108,
)
_EK_ALGORITHMS: dict[EkType, tuple[TPM2_ALG, ...]] = {
    "rsa2048": (TPM2_ALG.RSA, TPM2_ALG.OAEP),
    "ecc-p256": (TPM2_ALG.ECDH, TPM2_ALG.KDF1_SP800_56A),
    "ecc-p384": (TPM2_ALG.ECDH, TPM2_ALG.KDF1_SP800_56A, TPM2_ALG.SHA384),
}
_EK_CURVES: dict[EkType, tuple[TPM2_ECC, ...]] = {
    "rsa2048": (TPM2_ECC.NIST_P256,),
    "ecc-p256": (TPM2_ECC.NIST_P256,),
    "ecc-p384": (TPM2_ECC.NIST_P256, TPM2_ECC.NIST_P384),
}
_CURVE_NAMES = {TPM2_ECC.NIST_P256: "nist p-256", TPM2_ECC.NIST_P384: "nist p-384"}


@dataclass(frozen=True)
class TpmCapabilities:
    """What a TPM reported through GetCapability."""

    algorithms: frozenset[int]
    curves: frozenset[int]
    pcr_banks: frozenset[int]  # hash algorithms with at least one PCR allocated


def missing_capabilities(ek_type: EkType, capabilities: TpmCapabilities) -> list[str]:
    """Human-readable names of what vouchd needs for `ek_type` and the TPM lacks, in a stable order."""
    missing = [
        f"algorithm {_algorithm_name(alg)}"
        for alg in (*_COMMON_ALGORITHMS, *_EK_ALGORITHMS[ek_type])
        if alg not in capabilities.algorithms
    ]
    missing += [f"curve {_CURVE_NAMES[curve]}" for curve in _EK_CURVES[ek_type] if curve not in capabilities.curves]
    if TPM2_ALG.SHA256 not in capabilities.pcr_banks:
        missing.append("an allocated sha256 pcr bank")
    return missing


def _algorithm_name(alg: TPM2_ALG) -> str:
    return str(alg).lower().replace("_", "-")


# ---------------------------------------------------------------------- what a TPM says about itself

# TPM_PT values of the fixed properties (TPM 2.0 Part 2, 6.13); tpm2-pytss names only some of them.
_PT_FIXED = 0x100
_PT_FAMILY_INDICATOR = 0x100
_PT_LEVEL = 0x101
_PT_REVISION = 0x102
_PT_DAY_OF_YEAR = 0x103
_PT_YEAR = 0x104
_PT_MANUFACTURER = 0x105
_PT_VENDOR_STRINGS = (0x106, 0x107, 0x108, 0x109)
_PT_FIRMWARE_VERSION_1 = 0x10B
_PT_FIRMWARE_VERSION_2 = 0x10C
_PT_FIXED_COUNT = 0x30  # up to past TPM_PT_NV_BUFFER_MAX (0x12C): one GetCapability answers them all

# TCG EK Credential Profile 2.x, 2.2.1.5: NV indices a manufacturer may fill with the certificates
# between the EK certificate and its root. Most TPMs leave them empty.
_EK_CHAIN_FIRST = 0x01C00100
_EK_CHAIN_LAST = 0x01C001FF
_RC_LAYER_MASK = 0xFF << 16
_TPM_LAYER = 0  # response codes from the TPM itself, as opposed to the TSS layers around it

# TPMA_ALGORITHM bits (TPM 2.0 Part 2, 8.2), in the order they are listed.
_ALGORITHM_PROPERTIES = (
    (0x0001, "asymmetric"),
    (0x0002, "symmetric"),
    (0x0004, "hash"),
    (0x0008, "object"),
    (0x0100, "signing"),
    (0x0200, "encrypting"),
    (0x0400, "method"),
)


@dataclass(frozen=True)
class AlgorithmInfo:
    alg: int  # TPM_ALG_ID
    name: str  # e.g. "sha256", "kdf1-sp800-108"; the hex id for one tpm2-pytss does not know
    properties: tuple[str, ...]  # e.g. ("hash",), ("asymmetric", "signing")


@dataclass(frozen=True)
class PcrBank:
    name: str  # the hash algorithm, e.g. "sha256"
    pcrs: tuple[int, ...]  # the PCRs allocated in this bank


@dataclass(frozen=True)
class TpmDescription:
    """What a TPM reports about itself: maker, firmware, specification, algorithms, PCR banks."""

    manufacturer: str  # TPM_PT_MANUFACTURER as text, e.g. "IBM", "INTC", "IFX"
    vendor: str  # TPM_PT_VENDOR_STRING_1..4 as text, e.g. "SW TPM"
    firmware: tuple[int, int]  # TPM_PT_FIRMWARE_VERSION_1 and _2, as the TPM has them (vendor-specific)
    family: str  # TPM_PT_FAMILY_INDICATOR, "2.0"
    level: int
    revision: str  # the specification revision, e.g. "1.59"
    year: int  # of the specification
    day_of_year: int
    algorithms: tuple[AlgorithmInfo, ...]
    curves: tuple[str, ...]
    pcr_banks: tuple[PcrBank, ...]
    # The contents of the EK certificate chain indices that exist, by index (DER certificates,
    # possibly several in one index); the EK certificate itself is EkInfo.certificate.
    ek_chain: tuple[tuple[int, bytes], ...]


def describe_tpm(esapi: ESAPI) -> TpmDescription:
    """Ask the TPM what it is. Runs on the TPM service's worker; a few GetCapability calls, plus one
    NV read per EK certificate chain index the TPM has (none on most)."""
    properties = _fixed_properties(esapi)
    revision = properties.get(_PT_REVISION, 0)  # the revision times 100: 159 is 1.59
    return TpmDescription(
        manufacturer=_text(properties.get(_PT_MANUFACTURER, 0)),
        vendor=" ".join(filter(None, (_text(properties.get(pt, 0)) for pt in _PT_VENDOR_STRINGS))),
        firmware=(properties.get(_PT_FIRMWARE_VERSION_1, 0), properties.get(_PT_FIRMWARE_VERSION_2, 0)),
        family=_text(properties.get(_PT_FAMILY_INDICATOR, 0)),
        level=properties.get(_PT_LEVEL, 0),
        revision=f"{revision // 100}.{revision % 100:02d}",
        year=properties.get(_PT_YEAR, 0),
        day_of_year=properties.get(_PT_DAY_OF_YEAR, 0),
        algorithms=_algorithms(esapi),
        curves=_curves(esapi),
        pcr_banks=_pcr_banks(esapi),
        ek_chain=_ek_chain(esapi),
    )


def _fixed_properties(esapi: ESAPI) -> dict[int, int]:
    _, data = esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, _PT_FIXED, _PT_FIXED_COUNT)
    return {int(prop.property): int(prop.value) for prop in data.data.tpmProperties}


def _algorithms(esapi: ESAPI) -> tuple[AlgorithmInfo, ...]:
    found: dict[int, AlgorithmInfo] = {}
    more, start = True, 0
    while more:
        more, data = esapi.get_capability(TPM2_CAP.ALGS, start, 128)
        batch = list(data.data.algorithms)
        for prop in batch:
            bits = int(prop.algProperties)
            found[int(prop.alg)] = AlgorithmInfo(
                alg=int(prop.alg),
                name=_alg_name(int(prop.alg)),
                properties=tuple(name for bit, name in _ALGORITHM_PROPERTIES if bits & bit),
            )
        # A TPM that says "more" but sends nothing would loop forever.
        more = bool(more) and bool(batch)
        start = max((int(prop.alg) for prop in batch), default=0) + 1
    return tuple(found[alg] for alg in sorted(found))


def _curves(esapi: ESAPI) -> tuple[str, ...]:
    _, data = esapi.get_capability(TPM2_CAP.ECC_CURVES, 0, 64)
    return tuple(_curve_name(int(curve)) for curve in sorted(int(c) for c in data.data.eccCurves))


def _pcr_banks(esapi: ESAPI) -> tuple[PcrBank, ...]:
    _, data = esapi.get_capability(TPM2_CAP.PCRS, 0, 16)
    banks = []
    for selection in data.data.assignedPCR:
        bitmap = bytes(selection.pcrSelect)[: selection.sizeofSelect]
        pcrs = tuple(i for i in range(8 * len(bitmap)) if bitmap[i // 8] >> (i % 8) & 1)
        banks.append(PcrBank(name=_alg_name(int(selection.hash)), pcrs=pcrs))
    return tuple(banks)


def _ek_chain(esapi: ESAPI) -> tuple[tuple[int, bytes], ...]:
    _, data = esapi.get_capability(TPM2_CAP.HANDLES, _EK_CHAIN_FIRST, _EK_CHAIN_LAST - _EK_CHAIN_FIRST + 1)
    indices = [int(handle) for handle in data.data.handles if int(handle) <= _EK_CHAIN_LAST]
    if not indices:
        return ()
    read = NVReadEK(esapi)
    chain = []
    for index in indices:
        try:
            chain.append((index, read(index)))
        except NoSuchIndex:
            continue  # undefined since it was listed; str() of NoSuchIndex raises NameError in 3.0.0
        except TSS2_Exception as err:
            if int(err.rc) & _RC_LAYER_MASK != _TPM_LAYER:
                raise  # not the TPM refusing this index: the connection, which the service handles
            # One index the TPM will not let us read (a read policy we cannot satisfy) must not hide the rest.
            _log.warning("cannot read an ek certificate chain index",
                         extra={"nv_index": f"{index:#010x}", "rc": f"{int(err.rc):#x}"})
    return tuple(chain)


def _alg_name(alg: int) -> str:
    if alg == TPM2_ALG.SHA1:
        return "sha1"  # tpm2-pytss calls it by its older alias, "sha"
    name = str(TPM2_ALG(alg))
    return f"{alg:#06x}" if name.isdigit() else _algorithm_name(TPM2_ALG(alg))


def _curve_name(curve: int) -> str:
    name = str(TPM2_ECC(curve))
    return f"{curve:#06x}" if name.isdigit() else name.replace("_", "-")


def _text(value: int) -> str:
    """A property that packs up to four ASCII characters into a UINT32, NULs and padding dropped."""
    raw = value.to_bytes(4, "big").replace(b"\x00", b" ")
    return "".join(chr(byte) if 0x20 <= byte < 0x7F else "?" for byte in raw).strip()
