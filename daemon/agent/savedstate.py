"""What the agent keeps across a restart, encrypted with a key sealed to the boot's PCR values.

A restarted agent serves the X.509-SVIDs it still holds at once, while it attests again, instead of
leaving its workloads without an answer for a whole attestation (design §4). What it keeps: the
node's entries, its unexpired X.509-SVIDs with their private keys, the bundles and the signed
revocation document. Those private keys must never be readable from the disk on their own, and must
never outlive the boot they were issued in: the file is AES-256-GCM, its key sealed by the TPM to
the PCR values the node attested with. After a reboot into another boot chain, or with the disk
moved to another machine, the TPM refuses to unseal: the agent discards the state, says why, and
attests from scratch. Nothing in the file is trusted beyond that: the revocation document is
verified again, and the entries and SVIDs are only served until the fresh attestation replaces them.

Files, in `<state_dir>/saved/` (0700): `state.key` (the sealed data key) and `state.bin`
(`VOUCHD-STATE-1\\n`, a 12-byte nonce, the ciphertext; the node ID is the associated data, so a
file from another node does not decrypt).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from vouchd.agent.cached import CachedSvid
from vouchd.agent.node import NodeIdentity
from vouchd.agent.provers import NodeProver, TpmProver
from vouchd.agent.svids import SvidManager
from vouchd.clock import Clock
from vouchd.config import AgentConfig
from vouchd.entries import Entry
from vouchd.errors import VouchdError
from vouchd.protocol.codec import decode_as, encode, message
from vouchd.protocol.errors import MessageError
from vouchd.securefiles import InsecureFileError, read_private, write_atomically
from vouchd.spiffe import SpiffeError, load_der_certificates
from vouchd.tpm import SealedBlob, SealedDataUnavailableError, TpmError, TpmService

__all__ = ["SavedState", "Sealer", "StateKeeper", "StateVault", "StateVaultError", "TpmSealer", "saved_state_keeper"]

log = logging.getLogger("vouchd.agent.savedstate")

KEY_FILE = "state.key"
STATE_FILE = "state.bin"
_MAGIC = b"VOUCHD-STATE-1\n"
_NONCE_BYTES = 12
SAVE_DEBOUNCE = 2.0     # seconds: a burst of issuances is one save
SAVE_INTERVAL = 300.0   # seconds: saved at least this often while anything changed unseen (a failed save)


class StateVaultError(VouchdError):
    """The saved state cannot be written (the agent runs on; the next restart attests in full)."""


class Sealer(Protocol):
    """The TPM's part: seal a few bytes to PCR values, unseal them while the PCRs still hold them
    (StateVault is told which exception types mean the TPM refused)."""

    async def seal_secret(self, data: bytes, *, bank: str, pcrs: Sequence[int]) -> bytes: ...
    async def unseal_secret(self, sealed: bytes) -> bytes: ...


@dataclass(frozen=True)
class SavedSvid:
    entry_id: str
    entry_revision: int
    spiffe_id: str
    chain_der: bytes
    private_key_der: bytes
    issued_at_ms: int                   # times in milliseconds: the codec carries integers only
    expires_at_ms: int
    rotate_at_ms: int


@message("agent_saved_state")
@dataclass(frozen=True)
class SavedState:
    node_id: str
    saved_at_ms: int
    entries: tuple[Entry, ...]
    svids: tuple[SavedSvid, ...]
    bundle: bytes                       # DER certificates, as the authority sent them
    jwt_bundle: bytes                   # the JWKS, as the authority sent it
    revocations: bytes | None           # the signed document, verified again when loaded

    @classmethod
    def of(cls, node_id: str, *, saved_at: float, entries: Sequence[Entry], svids: Sequence[CachedSvid],
           bundle: bytes, jwt_bundle: bytes, revocations: bytes | None) -> SavedState:
        return cls(node_id=node_id, saved_at_ms=_ms(saved_at), entries=tuple(entries), bundle=bundle,
                   jwt_bundle=jwt_bundle, revocations=revocations,
                   svids=tuple(SavedSvid(s.entry_id, s.entry_revision, s.spiffe_id, s.chain_der, s.private_key_der,
                                         _ms(s.issued_at), _ms(s.expires_at), _ms(s.rotate_at)) for s in svids))

    def cached_svids(self, now: float) -> list[CachedSvid]:
        """The SVIDs still valid at `now`, in the cache's form (one whose chain does not parse is left out)."""
        held = []
        for saved in self.svids:
            if saved.expires_at_ms / 1000 <= now:
                continue
            try:
                certificate = load_der_certificates(saved.chain_der, "saved x509-svid")[0]
            except SpiffeError:
                continue
            held.append(CachedSvid(entry_id=saved.entry_id, entry_revision=saved.entry_revision,
                                   spiffe_id=saved.spiffe_id, certificate=certificate, chain_der=saved.chain_der,
                                   private_key_der=saved.private_key_der, issued_at=saved.issued_at_ms / 1000,
                                   expires_at=saved.expires_at_ms / 1000, rotate_at=saved.rotate_at_ms / 1000))
        return held


def _ms(seconds: float) -> int:
    return round(seconds * 1000)


class StateVault:
    """Saves and loads the agent's state in `directory`, its key sealed by `sealer`."""

    def __init__(self, directory: Path, sealer: Sealer, *, unavailable: tuple[type[BaseException], ...]) -> None:
        """`unavailable`: what `sealer.unseal_secret` raises when the TPM refuses (PCRs changed, other TPM)."""
        self._directory = directory
        self._sealer = sealer
        self._unavailable = unavailable
        self._key: bytes | None = None      # the data key of this boot, once sealed or unsealed

    async def load(self, node_id: str) -> SavedState | None:
        """The state saved by this node in this boot; None when there is none or it cannot be used
        (then the files are removed and the log says why)."""
        key_path, state_path = self._directory / KEY_FILE, self._directory / STATE_FILE
        try:
            sealed = read_private(key_path)
            data = read_private(state_path)
        except FileNotFoundError:
            return None
        except (InsecureFileError, OSError) as err:
            self._discard(f"cannot read it: {err}")
            return None
        try:
            key = await self._sealer.unseal_secret(sealed)
        except self._unavailable as err:
            self._discard(f"the TPM does not unseal its key ({err}): the boot or the machine changed")
            return None
        if len(key) != 32 or not data.startswith(_MAGIC) or len(data) < len(_MAGIC) + _NONCE_BYTES + 16:
            self._discard("it is damaged")
            return None
        nonce = data[len(_MAGIC):len(_MAGIC) + _NONCE_BYTES]
        try:
            plain = AESGCM(key).decrypt(nonce, data[len(_MAGIC) + _NONCE_BYTES:], node_id.encode())
            state = decode_as(SavedState, plain)
        except InvalidTag:
            self._discard("it does not decrypt for this node (damaged, or another node's)")
            return None
        except MessageError as err:
            self._discard(f"it is damaged: {err}")
            return None
        if state.node_id != node_id:
            self._discard("it is another node's")
            return None
        self._key = key
        return state

    async def save(self, state: SavedState, *, bank: str, pcrs: Sequence[int]) -> None:
        """Write `state`, whole or not at all; the key is sealed once per boot (PCRs `bank:pcrs`)."""
        try:
            self._directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            if self._key is None:
                key = AESGCM.generate_key(bit_length=256)
                sealed = await self._sealer.seal_secret(key, bank=bank, pcrs=pcrs)
                write_atomically(self._directory / KEY_FILE, sealed)
                self._key = key
            nonce = os.urandom(_NONCE_BYTES)
            ciphertext = AESGCM(self._key).encrypt(nonce, encode(state), state.node_id.encode())
            write_atomically(self._directory / STATE_FILE, _MAGIC + nonce + ciphertext)
        except OSError as err:
            raise StateVaultError(f"{self._directory}: cannot save the agent's state: {err.strerror}") from None

    def _discard(self, why: str) -> None:
        """Remove the files: the caller then attests afresh."""
        log.warning("saved state discarded; the node attests afresh", extra={"reason": why,
                                                                            "directory": str(self._directory)})
        for name in (STATE_FILE, KEY_FILE):
            try:
                (self._directory / name).unlink()
            except FileNotFoundError:
                pass
            except OSError as err:
                log.warning("cannot remove a saved state file", extra={"file": name, "reason": err.strerror})
        self._key = None


class TpmSealer:
    """The node's TPM as a Sealer."""

    def __init__(self, tpm: TpmService) -> None:
        self._tpm = tpm

    async def seal_secret(self, data: bytes, *, bank: str, pcrs: Sequence[int]) -> bytes:
        return (await self._tpm.seal(data, bank=bank, pcrs=pcrs)).to_bytes()

    async def unseal_secret(self, sealed: bytes) -> bytes:
        return await self._tpm.unseal(SealedBlob.from_bytes(sealed))


class StateKeeper:
    """Restores the saved state at start and saves it again whenever what the node holds changes."""

    def __init__(self, vault: StateVault, prover: TpmProver, node: NodeIdentity, svids: SvidManager, *,
                 extra_pcrs: Sequence[int], clock: Clock, debounce: float = SAVE_DEBOUNCE) -> None:
        self._vault = vault
        self._prover = prover
        self._node = node
        self._svids = svids
        self._extra_pcrs = tuple(extra_pcrs)
        self._clock = clock
        self._debounce = debounce
        self._failing = False

    async def restore(self) -> bool:
        """Hold the saved state of this boot, if there is one; True when the node serves from it."""
        try:
            state = await self._vault.load(self._node.node_id)
        except TpmError as err:  # the TPM itself failed: keep the files, the next start may use them
            log.warning("saved state not restored: the TPM did not answer", extra={"reason": str(err)})
            return False
        if state is None:
            return False
        self._node.restore(bundle=state.bundle, jwt_bundle=state.jwt_bundle, revocations=state.revocations)
        held = state.cached_svids(self._clock.now())
        await self._svids.restore(state.entries, held)
        log.info("serving the saved state while the node attests", extra={
            "entries": len(state.entries), "svids": len(self._svids.svids), "saved_at": state.saved_at_ms / 1000})
        return True

    async def run(self) -> None:
        """Save after every change of what the node holds (at most once per `debounce` seconds), and
        at least every SAVE_INTERVAL, once the node has attested (the seal needs its PCR selection)."""
        saved_version = -1
        while True:
            version = self._svids.version
            if version != saved_version and await self._save():
                saved_version = version
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(SAVE_INTERVAL):
                    await self._svids.wait_for_change(version)
            await asyncio.sleep(self._debounce)

    async def _save(self) -> bool:
        bank, pcrs = self._prover.pcr_selection
        if not pcrs or self._node.status is None:
            return False  # not attested yet: nothing to seal to
        state = SavedState.of(self._node.node_id, saved_at=self._clock.now(), entries=self._svids.entries,
                              svids=self._svids.svids, bundle=self._node.bundle_der(),
                              jwt_bundle=self._node.jwt_bundle(), revocations=self._node.revocations_signed())
        try:
            await self._vault.save(state, bank=bank, pcrs=sorted({*pcrs, *self._extra_pcrs}))
        except (StateVaultError, TpmError) as err:
            if not self._failing:
                log.warning("cannot save the agent's state; a restart will attest in full",
                            extra={"reason": str(err)})
            self._failing = True
            return False
        if self._failing:
            log.info("the agent's state is saved again")
        self._failing = False
        return True


def saved_state_keeper(config: AgentConfig, prover: NodeProver, node: NodeIdentity, svids: SvidManager,
                       tpm: TpmService | None, *, clock: Clock) -> StateKeeper | None:
    """The keeper of this agent's saved state; None when it keeps none: switched off, or a node
    without a TPM to seal it with (the static-secret tier restarts with a full attestation)."""
    if not config.saved_state.enabled or not isinstance(prover, TpmProver) or tpm is None:
        return None
    vault = StateVault(config.state_dir / "saved", TpmSealer(tpm), unavailable=(SealedDataUnavailableError,))
    return StateKeeper(vault, prover, node, svids, extra_pcrs=config.saved_state.extra_pcrs, clock=clock)
