"""TCG PC Client crypto-agile (TCG2) event logs: strict parsing, replay, and a writer for
simulating a measured boot on a software TPM.

Layout (TCG PC Client Platform Firmware Profile §10.2): a SHA-1 format header event carrying the
"Spec ID Event03" structure that lists the banks and their digest sizes, then TCG_PCR_EVENT2
records. Everything is little-endian. The log is not trusted by itself: replaying it must give
the PCR values a verified quote covers.
"""

from __future__ import annotations

import enum
import struct
import uuid
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

from vouchd.evidence import _wire
from vouchd.evidence.algorithms import TpmAlg, digest_size, hash_digest, is_hash
from vouchd.evidence.errors import EvidenceError, MalformedStructureError

__all__ = [
    "Event",
    "EventLog",
    "EventType",
    "build_event_log",
    "parse_event_log",
    "simulated_boot_events",
]

_PCR_COUNT = 24
_SPEC_ID_SIGNATURE = b"Spec ID Event03\0"
_STARTUP_LOCALITY_SIGNATURE = b"StartupLocality\0"
_SHA1_DIGEST_SIZE = 20
_MAX_BANKS = 16
_PLATFORM_CLASS_CLIENT = 0
_SPEC_VERSION = (0, 2, 0)  # minor, major, errata: TCG PFP 2.0
_UINTN_SIZE_64 = 2  # UEFI UINTN is 64 bits


class EventType(enum.IntEnum):
    """TCG PC Client event types (PFP §10.4.1)."""

    EV_PREBOOT_CERT = 0x0
    EV_POST_CODE = 0x1
    EV_UNUSED = 0x2
    EV_NO_ACTION = 0x3
    EV_SEPARATOR = 0x4
    EV_ACTION = 0x5
    EV_EVENT_TAG = 0x6
    EV_S_CRTM_CONTENTS = 0x7
    EV_S_CRTM_VERSION = 0x8
    EV_CPU_MICROCODE = 0x9
    EV_PLATFORM_CONFIG_FLAGS = 0xA
    EV_TABLE_OF_DEVICES = 0xB
    EV_COMPACT_HASH = 0xC
    EV_IPL = 0xD
    EV_IPL_PARTITION_DATA = 0xE
    EV_NONHOST_CODE = 0xF
    EV_NONHOST_CONFIG = 0x10
    EV_NONHOST_INFO = 0x11
    EV_OMIT_BOOT_DEVICE_EVENTS = 0x12
    EV_EFI_EVENT_BASE = 0x80000000
    EV_EFI_VARIABLE_DRIVER_CONFIG = 0x80000001
    EV_EFI_VARIABLE_BOOT = 0x80000002
    EV_EFI_BOOT_SERVICES_APPLICATION = 0x80000003
    EV_EFI_BOOT_SERVICES_DRIVER = 0x80000004
    EV_EFI_RUNTIME_SERVICES_DRIVER = 0x80000005
    EV_EFI_GPT_EVENT = 0x80000006
    EV_EFI_ACTION = 0x80000007
    EV_EFI_PLATFORM_FIRMWARE_BLOB = 0x80000008
    EV_EFI_HANDOFF_TABLES = 0x80000009
    EV_EFI_PLATFORM_FIRMWARE_BLOB2 = 0x8000000A
    EV_EFI_HANDOFF_TABLES2 = 0x8000000B
    EV_EFI_VARIABLE_BOOT2 = 0x8000000C
    EV_EFI_HCRTM_EVENT = 0x80000010
    EV_EFI_VARIABLE_AUTHORITY = 0x800000E0
    EV_EFI_SPDM_FIRMWARE_BLOB = 0x800000E1
    EV_EFI_SPDM_FIRMWARE_CONFIG = 0x800000E2


@dataclass(frozen=True)
class Event:
    """One TCG_PCR_EVENT2 record. `event_type` stays an int: firmware emits vendor types."""

    pcr: int
    event_type: int
    digests: Mapping[TpmAlg, bytes]
    data: bytes


def _startup_locality(event: Event) -> int | None:
    if (event.event_type == EventType.EV_NO_ACTION and len(event.data) == 17
            and event.data.startswith(_STARTUP_LOCALITY_SIGNATURE)):
        return event.data[16]
    return None


@dataclass(frozen=True)
class EventLog:
    """A parsed crypto-agile event log."""

    algorithms: Mapping[TpmAlg, int]
    events: tuple[Event, ...]

    def replay(self, hash_alg: TpmAlg) -> dict[int, bytes]:
        """The value of every PCR 0..23 in bank `hash_alg` after extending each measured event
        (EV_NO_ACTION events are not extended). A StartupLocality event makes PCR 0 start at
        00..00<locality>, as an H-CRTM or locality-3 startup does on a real TPM."""
        if hash_alg not in self.algorithms:
            raise EvidenceError(f"event log has no {hash_alg.name.lower()} bank")
        size = digest_size(hash_alg)
        pcrs = {i: b"\0" * size for i in range(_PCR_COUNT)}
        locality_seen = pcr0_extended = False
        for index, event in enumerate(self.events):
            locality = _startup_locality(event)
            if locality is not None:
                if locality_seen or pcr0_extended:
                    raise EvidenceError(f"event log event {index} StartupLocality is out of place")
                locality_seen = True
                pcrs[0] = b"\0" * (size - 1) + bytes([locality])
                continue
            if event.event_type == EventType.EV_NO_ACTION:
                continue
            digest = event.digests.get(hash_alg)
            if digest is None:
                raise EvidenceError(f"event log event {index} has no {hash_alg.name.lower()} digest")
            pcrs[event.pcr] = hash_digest(hash_alg, pcrs[event.pcr] + digest)
            pcr0_extended = pcr0_extended or event.pcr == 0
        return pcrs

    def digests(self, hash_alg: TpmAlg = TpmAlg.SHA256,
                pcrs: Collection[int] | None = None) -> list[tuple[int, int, bytes]]:
        """(pcr, event type, digest in bank `hash_alg`) of every measured event on `pcrs` (all
        PCRs when None), in log order: what event-log policy profiles are made of.

        Policy must use the bank and the PCRs a quote covered, because only those digests are
        vouched for by replaying them to the quoted PCR values. EV_NO_ACTION events are left out
        because they are not extended and so nothing vouches for them."""
        if hash_alg not in self.algorithms:
            raise EvidenceError(f"event log has no {hash_alg.name.lower()} bank")
        out = []
        for index, event in enumerate(self.events):
            if event.event_type == EventType.EV_NO_ACTION or (pcrs is not None and event.pcr not in pcrs):
                continue
            digest = event.digests.get(hash_alg)
            if digest is None:
                raise EvidenceError(f"event log event {index} has no {hash_alg.name.lower()} digest")
            out.append((event.pcr, event.event_type, digest))
        return out


def _parse_header(r: _wire.Reader) -> dict[TpmAlg, int]:
    pcr = r.u32("pcrIndex")
    event_type = r.u32("eventType")
    if pcr != 0 or event_type != EventType.EV_NO_ACTION:
        raise MalformedStructureError("event log header is not an EV_NO_ACTION event on pcr 0")
    r.take(_SHA1_DIGEST_SIZE, "digest")
    spec = _wire.Reader(r.take(r.u32("eventDataSize"), "event"), "event log header Spec ID event",
                        little_endian=True)
    if spec.take(len(_SPEC_ID_SIGNATURE), "signature") != _SPEC_ID_SIGNATURE:
        raise MalformedStructureError(
            "event log is not crypto-agile: header signature is not Spec ID Event03")
    spec.u32("platformClass")
    spec.take(3, "specVersion")
    spec.u8("uintnSize")
    count = spec.u32("numberOfAlgorithms")
    if not 0 < count <= _MAX_BANKS:
        raise MalformedStructureError(f"event log header numberOfAlgorithms {count} is out of range")
    algorithms: dict[TpmAlg, int] = {}
    for i in range(count):
        alg_id = spec.u16(f"digestSizes[{i}].algorithmId")
        size = spec.u16(f"digestSizes[{i}].digestSize")
        try:
            alg = TpmAlg(alg_id)
        except ValueError:
            raise MalformedStructureError(
                f"event log header digestSizes[{i}].algorithmId {alg_id:#06x} is not a known hash") from None
        if not is_hash(alg) or digest_size(alg) != size:
            raise MalformedStructureError(
                f"event log header digestSizes[{i}] {alg.name.lower()} size {size} is not a hash size")
        if alg in algorithms:
            raise MalformedStructureError(f"event log header lists {alg.name.lower()} twice")
        algorithms[alg] = size
    spec.take(spec.u8("vendorInfoSize"), "vendorInfo")
    spec.finish()
    return algorithms


def _parse_event(r: _wire.Reader, algorithms: Mapping[TpmAlg, int]) -> Event:
    pcr = r.u32("pcrIndex")
    if pcr >= _PCR_COUNT:
        raise MalformedStructureError(f"{r.structure} pcrIndex {pcr} is out of range")
    event_type = r.u32("eventType")
    count = r.u32("digests.count")
    if not 0 < count <= len(algorithms):
        raise MalformedStructureError(f"{r.structure} digests.count {count} is out of range")
    digests: dict[TpmAlg, bytes] = {}
    for i in range(count):
        alg_id = r.u16(f"digests[{i}].hashAlg")
        if alg_id not in algorithms:
            raise MalformedStructureError(
                f"{r.structure} digests[{i}].hashAlg {alg_id:#06x} is not in the header")
        alg = TpmAlg(alg_id)
        if alg in digests:
            raise MalformedStructureError(f"{r.structure} digests list {alg.name.lower()} twice")
        digests[alg] = r.take(algorithms[alg], f"digests[{i}].digest")
    data = r.take(r.u32("eventSize"), "event")
    return Event(pcr=pcr, event_type=event_type, digests=MappingProxyType(digests), data=data)


def parse_event_log(data: bytes, *, max_size: int = 16 * 1024 * 1024,
                    max_events: int = 100_000) -> EventLog:
    """Parse a crypto-agile event log; MalformedStructureError naming the event and field on
    anything that does not decode exactly."""
    if len(data) > max_size:
        raise MalformedStructureError(f"event log is {len(data)} bytes, more than the {max_size} allowed")
    r = _wire.Reader(data, "event log header", little_endian=True)
    algorithms = _parse_header(r)
    events: list[Event] = []
    while r.remaining:
        if len(events) >= max_events:
            raise MalformedStructureError(f"event log has more than the {max_events} events allowed")
        r.structure = f"event log event {len(events)}"
        events.append(_parse_event(r, algorithms))
    return EventLog(algorithms=MappingProxyType(algorithms), events=tuple(events))


def _le(fmt: str, *values: int) -> bytes:
    return struct.pack("<" + fmt, *values)


def build_event_log(events: Sequence[tuple[int, int, bytes]],
                    hash_algs: Sequence[TpmAlg] = (TpmAlg.SHA256,)) -> tuple[bytes, list[tuple[int, bytes]]]:
    """Write a crypto-agile log for (pcr, event type, event data) triples, each event's digest
    being H(event data) in every bank of `hash_algs` (zeros for EV_NO_ACTION, which is not
    extended). Returns the log and the (pcr, sha256 digest) pairs to extend into a TPM, in order.
    """
    if TpmAlg.SHA256 not in hash_algs or len(set(hash_algs)) != len(hash_algs):
        raise EvidenceError("event log banks must be unique and include sha256")
    sizes = [(alg, digest_size(alg)) for alg in hash_algs]
    spec_id = (_SPEC_ID_SIGNATURE + _le("IBBBB", _PLATFORM_CLASS_CLIENT, *_SPEC_VERSION, _UINTN_SIZE_64)
               + _le("I", len(sizes)) + b"".join(_le("HH", alg, size) for alg, size in sizes)
               + _le("B", 0))
    out = [_le("II", 0, EventType.EV_NO_ACTION), b"\0" * _SHA1_DIGEST_SIZE, _le("I", len(spec_id)), spec_id]
    to_extend: list[tuple[int, bytes]] = []
    for pcr, event_type, data in events:
        if not 0 <= pcr < _PCR_COUNT:
            raise EvidenceError(f"event pcr {pcr} is out of range")
        if not 0 <= event_type <= 0xFFFFFFFF:
            raise EvidenceError(f"event type {event_type} does not fit 32 bits")
        measured = event_type != EventType.EV_NO_ACTION
        digests = {alg: hash_digest(alg, data) if measured else b"\0" * size for alg, size in sizes}
        out.append(_le("III", pcr, event_type, len(sizes)))
        out.extend(_le("H", alg) + digests[alg] for alg, _ in sizes)
        out.append(_le("I", len(data)) + data)
        if measured:
            to_extend.append((pcr, digests[TpmAlg.SHA256]))
    return b"".join(out), to_extend


_EFI_GLOBAL_VARIABLE = uuid.UUID("8be4df61-93ca-11d2-aa0d-00e098032b8c")


def _efi_variable(name: str, value: bytes) -> bytes:
    """UEFI_VARIABLE_DATA as measured for EV_EFI_VARIABLE_DRIVER_CONFIG."""
    unicode_name = name.encode("utf-16-le")
    return (_EFI_GLOBAL_VARIABLE.bytes_le + _le("QQ", len(name), len(value)) + unicode_name + value)


def simulated_boot_events() -> list[tuple[int, int, bytes]]:
    """A plausible, deterministic UEFI boot for a TPM without firmware (swtpm): S-CRTM version,
    firmware blob and POST code on PCR 0, Secure Boot state on PCR 7, boot actions on PCRs 4
    and 5, and the separators that close PCRs 0..7."""
    events: list[tuple[int, int, bytes]] = [
        (0, EventType.EV_S_CRTM_VERSION, "vouchd simulated firmware 1.0".encode("utf-16-le") + b"\0\0"),
        (0, EventType.EV_EFI_PLATFORM_FIRMWARE_BLOB, _le("QQ", 0xFFC00000, 0x00400000)),
        (0, EventType.EV_POST_CODE, b"ACPI DATA"),
        (7, EventType.EV_EFI_VARIABLE_DRIVER_CONFIG, _efi_variable("SecureBoot", b"\x00")),
        (4, EventType.EV_EFI_ACTION, b"Calling EFI Application from Boot Option"),
    ]
    events += [(pcr, EventType.EV_SEPARATOR, b"\0\0\0\0") for pcr in range(8)]
    events += [
        (5, EventType.EV_EFI_ACTION, b"Exit Boot Services Invocation"),
        (5, EventType.EV_EFI_ACTION, b"Exit Boot Services Returned with Success"),
    ]
    return events
