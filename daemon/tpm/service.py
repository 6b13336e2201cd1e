"""TpmService: the one owner of the TPM.

Every TPM operation is awaited from asyncio and queued on a single worker thread that owns the ESAPI
context, so commands never interleave and a slow hardware TPM never blocks the event loop. Each
operation's time on that thread is recorded for the agent's status and latency budget.

The endorsement and owner hierarchy authorizations come from files the operator names (see
vouchd.tpm.hierarchies); they are read once, at start, on the worker thread.

A TPM can go away (the device, tpm2-abrmd or a simulator restarts). The first operation that finds
the connection gone closes the ESAPI context and fails with TpmUnavailableError, as does every
operation after it, at once, until `reconnect()` opens a new context: one that has the same EK and
in which the node's keys still load. The service never retries on its own; its owner decides when.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar, TypeVarTuple

from tpm2_pytss import TPM2_ALG

from vouchd.tpm.capabilities import TpmDescription
from vouchd.tpm.device import TpmDevice, connection_lost
from vouchd.tpm.ek import EK_PROFILES, EkType, ek_public_hash, parse_ek_type
from vouchd.tpm.errors import TpmArgumentError, TpmError, TpmKeyError, TpmOperationError, TpmUnavailableError
from vouchd.tpm.hierarchies import HierarchyAuths
from vouchd.tpm.keystore import (
    EkRecord,
    KeyFiles,
    StoredKey,
    ensure_state_dir,
    read_ek_record,
    read_key,
    write_ek_record,
    write_key,
)
from vouchd.tpm.latency import LatencyRecorder
from vouchd.tpm.owner import OwnerThread
from vouchd.tpm.templates import KeyRole
from vouchd.tpm.values import MAX_SEALED_DATA, PCR_BANKS, PCR_COUNT, EkInfo, KeyBlob, NodeKeys, SealedBlob, TpmQuote

__all__ = ["EkInfo", "EkType", "KeyBlob", "NodeKeys", "SealedBlob", "TpmDescription", "TpmQuote", "TpmService"]

log = logging.getLogger("vouchd.tpm")

# How long close() waits for the TPM's queued operations: a hardware TPM answers within seconds; one
# that does not in this long has stopped answering, and shutdown must go on without it.
CLOSE_TIMEOUT = 5.0

_Result = TypeVar("_Result")
_Args = TypeVarTuple("_Args")
_KeyPair = tuple[StoredKey, StoredKey]

_MAX_QUALIFYING_DATA = 64
_SHA256_SIZE = 32
# Reads around a quote that disagree mean a PCR was extended meanwhile; a few tries outlast a burst.
_QUOTE_WITH_VALUES_ATTEMPTS = 3


class TpmService:
    """Async access to one TPM: EK, attestation key, node key, quotes, PCRs.

    Use it as `async with TpmService(tcti) as tpm:`. With a TPM that has no resource manager (a raw
    swtpm), run one TpmService per TPM: at start it flushes whatever other clients left loaded.
    """

    def __init__(self, tcti: str, *, ek_type: EkType = "rsa2048", endorsement_auth_file: Path | None = None,
                 owner_auth_file: Path | None = None, pcrs_only: bool = False) -> None:
        """`endorsement_auth_file`, `owner_auth_file`: files holding the hierarchies' authorizations
        (`agent.tpm.*_auth_file`), read at start; None: the empty authorization of a TPM as shipped.
        `pcrs_only`: a client that only reads and extends PCRs (vouchd dev simulate-boot), which
        must not flush the objects of the agent sharing a TPM that has no resource manager."""
        if not tcti.strip():
            raise TpmArgumentError("tcti must not be empty")
        self._tcti = tcti
        self._pcrs_only = pcrs_only
        self._auth_files = (endorsement_auth_file, owner_auth_file)
        self._authorizations: HierarchyAuths | None = None
        self._profile = EK_PROFILES[parse_ek_type(ek_type)]
        self._latency = LatencyRecorder()
        self._executor: OwnerThread | None = None
        self._device: TpmDevice | None = None
        self._ek: EkInfo | None = None
        self._ak: StoredKey | None = None
        self._node_key: StoredKey | None = None
        self._started = False
        self._closed = False
        # monotonic start time of the operation the worker is running now (None when idle)
        self._busy_since: float | None = None
        # Why the TPM cannot be used, and since when (monotonic); None while it answers.
        self._unavailable: str | None = None
        self._unavailable_since: float | None = None

    def __repr__(self) -> str:
        state = "closed" if self._closed else "started" if self._device else "new"
        return f"TpmService(tcti={self._tcti!r}, ek_type={self._profile.ek_type!r}, state={state})"

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Connect, flush leftovers, check capabilities, create the EK and save its context."""
        if self._closed:
            raise TpmError("tpm service is closed")
        if self._started:
            raise TpmError("tpm service was already started")
        self._started = True
        # libtss2 otherwise prints every TPM error to stderr, including the expected ones.
        os.environ.setdefault("TSS2_LOG", "all+NONE")
        self._executor = OwnerThread("vouchd-tpm")
        try:
            self._ek = await self._on_worker("start", self._open_on_worker)
        except BaseException:
            await self.close()
            raise
        if self._closed:
            raise TpmError("tpm service was closed while starting")

    async def close(self, timeout: float = CLOSE_TIMEOUT) -> None:
        """Wait for queued operations, close the ESAPI context and stop the worker thread, within
        `timeout` seconds: a TPM that stopped answering must not keep the process from exiting
        (its operation is left running on the daemon thread, and the context unclosed). Idempotent."""
        if self._closed:
            return
        self._closed = True
        executor = self._executor
        if executor is None:
            return
        # Queued behind every operation submitted before close(), a start() in progress included.
        closing = asyncio.get_running_loop().run_in_executor(executor, self._close_on_worker)
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(closing)
        except TimeoutError:
            stuck = self.stalled_for()
            log.error("the tpm did not finish its operations in time; leaving without closing it",
                      extra={"tcti": self._tcti, "timeout_seconds": timeout,
                             "operation_running_for_seconds": round(stuck, 1)})
            executor.shutdown(wait=False, cancel_futures=True)
            return
        executor.shutdown(wait=True)  # the worker is idle now: this joins it at once

    def _open_on_worker(self) -> EkInfo | None:
        # The device is created, used and closed on the worker thread only.
        if not self._pcrs_only:
            self._authorizations = HierarchyAuths.from_files(*self._auth_files)
        device = TpmDevice.open(self._tcti, self._profile, authorizations=self._authorizations,
                                pcrs_only=self._pcrs_only)
        self._device = device
        return None if self._pcrs_only else device.ek_info

    def _close_on_worker(self) -> None:
        device, self._device = self._device, None
        if device is not None:
            device.close()

    # ------------------------------------------------------------------ losing and finding the TPM

    @property
    def tcti(self) -> str:
        return self._tcti

    @property
    def unavailable(self) -> str | None:
        """`TPM unreachable at <tcti>: <reason>` while the TPM cannot be used, else None."""
        return self._unavailable

    def unavailable_for(self) -> float:
        """Seconds since the TPM was found unreachable (0 while it answers)."""
        since = self._unavailable_since
        return 0.0 if since is None else time.monotonic() - since

    async def probe(self) -> None:
        """Ask the TPM something cheap; TpmUnavailableError if it no longer answers."""
        await self._on_device("probe", TpmDevice.probe)

    async def reconnect(self) -> None:
        """Open the TPM again after it was lost; a no-op while it answers.

        TpmUnavailableError: still unreachable, try again later. TpmError (not unavailable): the TPM
        answers but is not the one the node attested (another EK) or the node's keys no longer load
        in it: the agent cannot go on as this node.
        """
        if self._unavailable is None:
            return
        await self._on_worker("reconnect", self._reconnect_on_worker)

    def _reconnect_on_worker(self) -> None:
        try:
            device = TpmDevice.open(self._tcti, self._profile, authorizations=self._authorizations)
        except TpmUnavailableError as err:
            self._unavailable = f"TPM unreachable at {self._tcti}: {err}"
            raise TpmUnavailableError(self._unavailable) from err
        try:
            if self._ek is not None and device.ek_info.public != self._ek.public:
                raise TpmError(f"the TPM at {self._tcti} came back with another endorsement key: it was cleared "
                               "or replaced, so this is no longer the node that attested; restart the agent")
            for key, role in ((self._ak, KeyRole.ATTESTATION_KEY), (self._node_key, KeyRole.NODE_KEY)):
                if key is not None:
                    device.check_key_loads(key, role)
        except BaseException:
            device.close()
            raise
        self._device = device
        self._unavailable = self._unavailable_since = None

    def _lose(self, reason: str) -> str:
        """On the worker: forget a context whose connection is gone; returns the status line."""
        device, self._device = self._device, None
        if device is not None:
            device.close()
        if self._unavailable is None:
            self._unavailable_since = time.monotonic()
        self._unavailable = f"TPM unreachable at {self._tcti}: {reason}"
        return self._unavailable

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def ek(self) -> EkInfo:
        if self._ek is None:
            raise TpmError("tpm service is not started")
        return self._ek

    @property
    def ak_public(self) -> bytes | None:
        """The AK's marshaled TPM2B_PUBLIC once ensure_node_keys loaded it, else None."""
        return None if self._ak is None else self._ak.blob.public

    async def describe(self) -> TpmDescription:
        """What the TPM says about itself (maker, firmware, algorithms, PCR banks, EK chain indices)."""
        return await self._on_device("describe", TpmDevice.describe)

    def latency_snapshot(self) -> dict[str, dict[str, float]]:
        """Per operation: count, last_ms, p50_ms and p99_ms (recent window), max_ms, all on the TPM thread."""
        return self._latency.snapshot()

    # ------------------------------------------------------------------ keys

    async def ensure_node_keys(self, state_dir: Path) -> NodeKeys:
        """Load the AK and node key from `state_dir`, creating (and storing) any that does not exist yet.

        A key that exists but does not load raises TpmKeyError naming its file: replacing it silently
        would change what the authority knows of this node.
        """
        ak, node_key = await self._on_device("ensure_node_keys", _ensure_keys, Path(state_dir))
        self._ak, self._node_key = ak, node_key
        return NodeKeys(ak=ak.blob, node_key=node_key.blob)

    # ------------------------------------------------------------------ operations

    async def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """The secret of a MakeCredential(EK, AK name, secret); inputs are size-prefixed TPM2Bs."""
        ak, _ = self._require_keys()
        blob, secret = bytes(credential_blob), bytes(encrypted_secret)
        return await self._on_device("activate_credential", TpmDevice.activate_credential, ak, blob, secret)

    async def quote(self, bank: str, pcrs: Sequence[int], qualifying_data: bytes) -> TpmQuote:
        """A quote by the AK over `pcrs` of `bank`, with `qualifying_data` as extraData."""
        bank_alg = _pcr_bank(bank)
        indices = _pcr_indices(pcrs)
        data = _qualifying_data(qualifying_data)
        ak, _ = self._require_keys()
        return await self._on_device("quote", TpmDevice.quote, ak, bank_alg, indices, data)

    async def quote_with_pcr_values(self, bank: str, pcrs: Sequence[int],
                                    qualifying_data: bytes) -> tuple[TpmQuote, dict[int, bytes]]:
        """A quote as `quote` makes it, and the values of the PCRs it covers, by index in the order asked for.

        For a verifier with no event log to replay the values from (`vouchd tpm quote`, then
        tpm2_checkquote). The PCRs are read before and after the quote in one turn of the TPM thread;
        another client of the TPM can still extend one in between (on a real host the kernel measures
        into PCR 10 at any time), so reads that disagree mean another try, and the caller still checks
        the values against the quote's digest.
        """
        bank_alg = _pcr_bank(bank)
        indices = _pcr_indices(pcrs)
        data = _qualifying_data(qualifying_data)
        ak, _ = self._require_keys()
        return await self._on_device("quote_with_pcr_values", _quote_with_values, ak, bank_alg, indices, data)

    async def certify_node_key(self, qualifying_data: bytes) -> TpmQuote:
        """TPM2_Certify of the node key, signed by the AK with its own scheme."""
        data = _qualifying_data(qualifying_data)
        ak, node_key = self._require_keys()
        return await self._on_device("certify_node_key", TpmDevice.certify, node_key, ak, data)

    async def sign_with_node_key(self, message: bytes) -> bytes:
        """A DER ECDSA signature over sha256(message) by the node key."""
        _, node_key = self._require_keys()
        return await self._on_device("sign_with_node_key", TpmDevice.sign, node_key, bytes(message))

    async def extend_pcr(self, index: int, sha256_digest: bytes) -> None:
        (pcr,) = _pcr_indices([index])
        if len(sha256_digest) != _SHA256_SIZE:
            raise TpmArgumentError(f"a sha256 digest has {_SHA256_SIZE} bytes, got {len(sha256_digest)}")
        await self._on_device("extend_pcr", TpmDevice.extend_pcr, pcr, bytes(sha256_digest))

    async def read_pcrs(self, bank: str, pcrs: Sequence[int]) -> dict[int, bytes]:
        """PCR values by index, in the order asked for."""
        bank_alg = _pcr_bank(bank)
        indices = _pcr_indices(pcrs)
        return await self._on_device("read_pcrs", TpmDevice.read_pcrs, bank_alg, indices)

    # ------------------------------------------------------------------ sealing

    async def seal(self, data: bytes, *, bank: str, pcrs: Sequence[int]) -> SealedBlob:
        """`data` (1 to 128 bytes) sealed to the current values of `pcrs` of `bank`, under the owner
        hierarchy's storage key. Needs the owner authorization (`agent.tpm.owner_auth_file`) the first
        time after start or a TPM reset."""
        bank_alg = _pcr_bank(bank)
        indices = _pcr_indices(pcrs)
        if not indices:
            raise TpmArgumentError("sealing needs at least one pcr")
        if not 0 < len(data) <= MAX_SEALED_DATA:
            raise TpmArgumentError(f"sealed data must be 1 to {MAX_SEALED_DATA} bytes, got {len(data)}")
        return await self._on_device("seal", TpmDevice.seal, bytes(data), bank_alg, indices)

    async def unseal(self, blob: SealedBlob) -> bytes:
        """The data `seal` sealed in `blob`. SealedDataUnavailableError when its PCRs differ from when
        it was sealed, or when the blob was made by another TPM (or before a TPM2_Clear) or is damaged."""
        if not isinstance(blob, SealedBlob):
            raise TpmArgumentError(f"unseal takes a SealedBlob, got {type(blob).__name__}")
        return await self._on_device("unseal", TpmDevice.unseal, blob)

    # ------------------------------------------------------------------ plumbing

    def _require_keys(self) -> _KeyPair:
        if self._ak is None or self._node_key is None:
            raise TpmError("node keys are not loaded: call ensure_node_keys first")
        return self._ak, self._node_key

    async def _on_device(self, operation: str, call: Callable[[TpmDevice, *_Args], _Result],
                         *args: *_Args) -> _Result:
        """Run `call(device, *args)` on the worker with the device as it is when the call gets its turn:
        an operation queued behind the one that lost the TPM must not touch the closed context."""
        if self._closed:
            raise TpmError("tpm service is closed")
        return await self._on_worker(operation, self._with_device, call, *args)

    def _with_device(self, call: Callable[[TpmDevice, *_Args], _Result], *args: *_Args) -> _Result:
        device = self._device
        if device is None:
            if self._unavailable is not None:
                raise TpmUnavailableError(self._unavailable)
            raise TpmError("tpm service is not started")
        try:
            return call(device, *args)
        except TpmUnavailableError as err:
            raise TpmUnavailableError(self._lose(str(err))) from err
        except Exception as err:
            lost = connection_lost(err)
            if lost is None:
                raise
            reason = f"lost the connection to the tpm: rc {int(lost.rc):#x} ({lost})"
            raise TpmUnavailableError(self._lose(reason)) from err

    async def _on_worker(self, operation: str, call: Callable[[*_Args], _Result], *args: *_Args) -> _Result:
        if self._executor is None:
            raise TpmError("tpm service is not started")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._timed, operation, call, *args)

    def _timed(self, operation: str, call: Callable[[*_Args], _Result], *args: *_Args) -> _Result:
        started = time.perf_counter()
        self._busy_since = time.monotonic()
        try:
            return call(*args)
        finally:
            self._busy_since = None
            self._latency.record(operation, (time.perf_counter() - started) * 1000.0)

    def stalled_for(self) -> float:
        """Seconds the current TPM operation has been running (0 when the TPM is idle).

        A TPM that stops answering blocks the worker forever; the agent's watchdog uses this to stop
        telling systemd it is alive, so that systemd restarts it.
        """
        busy_since = self._busy_since
        return 0.0 if busy_since is None else time.monotonic() - busy_since


def _ensure_keys(device: TpmDevice, state_dir: Path) -> tuple[StoredKey, StoredKey]:
    # Runs on the TPM worker: file I/O with fsync stays off the event loop, and the key files and the
    # TPM are touched by one thread only.
    ensure_state_dir(state_dir)
    ek = device.ek_info
    current = EkRecord(ek_type=ek.ek_type, ek_hash=ek_public_hash(ek.public))
    recorded = read_ek_record(state_dir)
    has_keys = any(KeyFiles.in_directory(state_dir, role.file_stem).any_present() for role in KeyRole)
    if recorded is not None and recorded != current and has_keys:
        raise TpmKeyError(_ek_change(state_dir, recorded, current))
    ak = _ensure_key(device, state_dir, KeyRole.ATTESTATION_KEY)
    node_key = _ensure_key(device, state_dir, KeyRole.NODE_KEY)
    if recorded != current:
        # New keys, or keys of an earlier vouchd that load under this EK: record which EK they belong to.
        write_ek_record(state_dir, current)
    return ak, node_key


def _ek_change(state_dir: Path, recorded: EkRecord, current: EkRecord) -> str:
    if recorded.ek_type != current.ek_type:
        return (f"the keys in {state_dir} were made under the {recorded.ek_type} endorsement key, but tpm.ek is now "
                f"{current.ek_type}: set agent.tpm.ek back to {recorded.ek_type}, or, to become a new node with the "
                f"{current.ek_type} endorsement key (a new node ID: it is the EK's hash), stop the agent and move "
                f"{state_dir} aside")
    return (f"the keys in {state_dir} were made under another {recorded.ek_type} endorsement key (ek hash "
            f"{recorded.ek_hash[:16]}…, this tpm's is {current.ek_hash[:16]}…): the tpm was replaced or its "
            f"endorsement seed changed, or the folder comes from another host; to go on as a new node (a new "
            f"identity), stop the agent and move {state_dir} aside")


def _ensure_key(device: TpmDevice, state_dir: Path, role: KeyRole) -> StoredKey:
    files = KeyFiles.in_directory(state_dir, role.file_stem)
    stored = read_key(files)
    if stored is not None:
        device.check_key_loads(stored, role)
        return stored
    blob, auth_value = device.create_key(role)
    return write_key(files, blob, auth_value)


def _quote_with_values(device: TpmDevice, ak: StoredKey, bank: TPM2_ALG, pcrs: tuple[int, ...],
                       qualifying_data: bytes) -> tuple[TpmQuote, dict[int, bytes]]:
    for _ in range(_QUOTE_WITH_VALUES_ATTEMPTS):
        before = device.read_pcrs(bank, pcrs)
        quote = device.quote(ak, bank, pcrs, qualifying_data)
        after = device.read_pcrs(bank, pcrs)
        if before == after:
            return quote, after
    raise TpmOperationError(f"the pcrs kept changing while they were quoted ({_QUOTE_WITH_VALUES_ATTEMPTS} tries)")


def _pcr_bank(bank: str) -> TPM2_ALG:
    try:
        return PCR_BANKS[bank]
    except KeyError:
        expected = ", ".join(PCR_BANKS)
        raise TpmArgumentError(f"unknown pcr bank {bank!r}: expected one of {expected}") from None


def _pcr_indices(pcrs: Sequence[int]) -> tuple[int, ...]:
    indices = tuple(pcrs)
    for index in indices:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < PCR_COUNT:
            raise TpmArgumentError(f"pcr index {index!r} is not an integer from 0 to {PCR_COUNT - 1}")
    if len(set(indices)) != len(indices):
        raise TpmArgumentError("pcr indices repeat")
    return indices


def _qualifying_data(data: bytes) -> bytes:
    if len(data) > _MAX_QUALIFYING_DATA:
        raise TpmArgumentError(f"qualifying data has {len(data)} bytes, at most {_MAX_QUALIFYING_DATA} fit")
    return bytes(data)
