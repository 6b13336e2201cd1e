"""TpmService: the one owner of the TPM.

Every TPM operation is awaited from asyncio and queued on a single worker thread that owns the ESAPI
context, so commands never interleave and a slow hardware TPM never blocks the event loop. Each
operation's time on that thread is recorded for the agent's status and latency budget.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import TracebackType
from typing import Self, TypeVar, TypeVarTuple

from tpm2_pytss import TPM2_ALG

from vouchd.tpm.device import PCR_COUNT, TpmDevice
from vouchd.tpm.ek import EK_PROFILES, EkType, parse_ek_type
from vouchd.tpm.errors import TpmArgumentError, TpmError
from vouchd.tpm.keystore import KeyFiles, StoredKey, ensure_state_dir, read_key, write_key
from vouchd.tpm.latency import LatencyRecorder
from vouchd.tpm.templates import KeyRole
from vouchd.tpm.values import EkInfo, KeyBlob, NodeKeys, TpmQuote

__all__ = ["EkInfo", "EkType", "KeyBlob", "NodeKeys", "TpmQuote", "TpmService"]

_Result = TypeVar("_Result")
_Args = TypeVarTuple("_Args")

_PCR_BANKS: dict[str, TPM2_ALG] = {
    "sha1": TPM2_ALG.SHA1,
    "sha256": TPM2_ALG.SHA256,
    "sha384": TPM2_ALG.SHA384,
    "sha512": TPM2_ALG.SHA512,
}
_MAX_QUALIFYING_DATA = 64
_SHA256_SIZE = 32


class TpmService:
    """Async access to one TPM: EK, attestation key, node key, quotes, PCRs.

    Use it as `async with TpmService(tcti) as tpm:`. With a TPM that has no resource manager (a raw
    swtpm), run one TpmService per TPM: at start it flushes whatever other clients left loaded.
    """

    def __init__(self, tcti: str, *, ek_type: EkType = "rsa2048") -> None:
        if not tcti.strip():
            raise TpmArgumentError("tcti must not be empty")
        self._tcti = tcti
        self._profile = EK_PROFILES[parse_ek_type(ek_type)]
        self._latency = LatencyRecorder()
        self._executor: ThreadPoolExecutor | None = None
        self._device: TpmDevice | None = None
        self._ek: EkInfo | None = None
        self._ak: StoredKey | None = None
        self._node_key: StoredKey | None = None
        self._started = False
        self._closed = False
        # monotonic start time of the operation the worker is running now (None when idle)
        self._busy_since: float | None = None

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
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vouchd-tpm")
        try:
            self._ek = await self._on_worker("start", self._open_on_worker)
        except BaseException:
            await self.close()
            raise
        if self._closed:
            raise TpmError("tpm service was closed while starting")

    async def close(self) -> None:
        """Wait for queued operations, close the ESAPI context and stop the worker thread. Idempotent."""
        if self._closed:
            return
        self._closed = True
        executor = self._executor
        if executor is None:
            return
        try:
            # Queued behind every operation submitted before close(), a start() in progress included.
            await asyncio.get_running_loop().run_in_executor(executor, self._close_on_worker)
        finally:
            # The worker is idle now, so this joins it at once.
            executor.shutdown(wait=True)

    def _open_on_worker(self) -> EkInfo:
        # The device is created, used and closed on the worker thread only.
        device = TpmDevice.open(self._tcti, self._profile)
        self._device = device
        return device.ek_info

    def _close_on_worker(self) -> None:
        device, self._device = self._device, None
        if device is not None:
            device.close()

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

    def latency_snapshot(self) -> dict[str, dict[str, float]]:
        """Per operation: count, last_ms, p50_ms and p99_ms (recent window), max_ms, all on the TPM thread."""
        return self._latency.snapshot()

    # ------------------------------------------------------------------ keys

    async def ensure_node_keys(self, state_dir: Path) -> NodeKeys:
        """Load the AK and node key from `state_dir`, creating (and storing) any that does not exist yet.

        A key that exists but does not load raises TpmKeyError naming its file: replacing it silently
        would change what the authority knows of this node.
        """
        device = self._require_device()
        ak, node_key = await self._on_worker("ensure_node_keys", _ensure_keys, device, Path(state_dir))
        self._ak, self._node_key = ak, node_key
        return NodeKeys(ak=ak.blob, node_key=node_key.blob)

    # ------------------------------------------------------------------ operations

    async def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        """The secret of a MakeCredential(EK, AK name, secret); inputs are size-prefixed TPM2Bs."""
        device, ak, _ = self._require_keys()
        blob, secret = bytes(credential_blob), bytes(encrypted_secret)
        return await self._on_worker("activate_credential", device.activate_credential, ak, blob, secret)

    async def quote(self, bank: str, pcrs: Sequence[int], qualifying_data: bytes) -> TpmQuote:
        """A quote by the AK over `pcrs` of `bank`, with `qualifying_data` as extraData."""
        bank_alg = _pcr_bank(bank)
        indices = _pcr_indices(pcrs)
        data = _qualifying_data(qualifying_data)
        device, ak, _ = self._require_keys()
        return await self._on_worker("quote", device.quote, ak, bank_alg, indices, data)

    async def certify_node_key(self, qualifying_data: bytes) -> TpmQuote:
        """TPM2_Certify of the node key, signed by the AK with its own scheme."""
        data = _qualifying_data(qualifying_data)
        device, ak, node_key = self._require_keys()
        return await self._on_worker("certify_node_key", device.certify, node_key, ak, data)

    async def sign_with_node_key(self, message: bytes) -> bytes:
        """A DER ECDSA signature over sha256(message) by the node key."""
        device, _, node_key = self._require_keys()
        return await self._on_worker("sign_with_node_key", device.sign, node_key, bytes(message))

    async def extend_pcr(self, index: int, sha256_digest: bytes) -> None:
        (pcr,) = _pcr_indices([index])
        if len(sha256_digest) != _SHA256_SIZE:
            raise TpmArgumentError(f"a sha256 digest has {_SHA256_SIZE} bytes, got {len(sha256_digest)}")
        device = self._require_device()
        await self._on_worker("extend_pcr", device.extend_pcr, pcr, bytes(sha256_digest))

    async def read_pcrs(self, bank: str, pcrs: Sequence[int]) -> dict[int, bytes]:
        """PCR values by index, in the order asked for."""
        bank_alg = _pcr_bank(bank)
        indices = _pcr_indices(pcrs)
        device = self._require_device()
        return await self._on_worker("read_pcrs", device.read_pcrs, bank_alg, indices)

    # ------------------------------------------------------------------ plumbing

    def _require_device(self) -> TpmDevice:
        if self._closed:
            raise TpmError("tpm service is closed")
        if self._device is None:
            raise TpmError("tpm service is not started")
        return self._device

    def _require_keys(self) -> tuple[TpmDevice, StoredKey, StoredKey]:
        device = self._require_device()
        if self._ak is None or self._node_key is None:
            raise TpmError("node keys are not loaded: call ensure_node_keys first")
        return device, self._ak, self._node_key

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
    ak = _ensure_key(device, state_dir, KeyRole.ATTESTATION_KEY)
    node_key = _ensure_key(device, state_dir, KeyRole.NODE_KEY)
    return ak, node_key


def _ensure_key(device: TpmDevice, state_dir: Path, role: KeyRole) -> StoredKey:
    files = KeyFiles.in_directory(state_dir, role.file_stem)
    stored = read_key(files)
    if stored is not None:
        device.check_key_loads(stored, role)
        return stored
    blob, auth_value = device.create_key(role)
    return write_key(files, blob, auth_value)


def _pcr_bank(bank: str) -> TPM2_ALG:
    try:
        return _PCR_BANKS[bank]
    except KeyError:
        expected = ", ".join(_PCR_BANKS)
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
