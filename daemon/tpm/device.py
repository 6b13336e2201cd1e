"""Synchronous TPM operations on one ESAPI context.

An ESAPI context is not thread-safe: a TpmDevice is created, used and closed on the TPM service's
single worker thread and nowhere else. Every operation loads what it needs, uses it and flushes it,
sessions included, because a TPM without a resource manager holds only three transient objects.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import TypeVar

from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from tpm2_pytss import (
    ESAPI,
    ESYS_TR,
    TPM2_ALG,
    TPM2_CAP,
    TPM2_HC,
    TPM2_RC,
    TPM2_SE,
    TPM2_SU,
    TPM2B_AUTH,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPML_DIGEST,
    TPML_DIGEST_VALUES,
    TPML_PCR_SELECTION,
    TPMS_PCR_SELECTION,
    TPMS_SENSITIVE_CREATE,
    TPMT_HA,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMU_HA,
    TSS2_Exception,
)
from tpm2_pytss.utils import NVReadEK, create_ek_template

from vouchd.tpm.capabilities import TpmCapabilities, missing_capabilities
from vouchd.tpm.ek import EkProfile
from vouchd.tpm.errors import (
    TpmArgumentError,
    TpmCapabilityError,
    TpmError,
    TpmKeyError,
    TpmOperationError,
    TpmUnavailableError,
)
from vouchd.tpm.keystore import AUTH_VALUE_SIZE, StoredKey
from vouchd.tpm.templates import KeyRole, describe_mismatch, public_template
from vouchd.tpm.values import EkInfo, KeyBlob, TpmQuote

__all__ = ["PCR_COUNT", "TpmDevice", "connection_lost"]

_log = logging.getLogger(__name__)

PCR_COUNT = 24
_PCR_SELECT_BYTES = PCR_COUNT // 8
_NULL_SCHEME = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
_AUTH_FAILURES = frozenset({int(TPM2_RC.AUTH_FAIL), int(TPM2_RC.BAD_AUTH)})
_TPM_CC_FLUSH_CONTEXT = 0x165
_TPM_ST_NO_SESSIONS = 0x8001

_Marshaled = TypeVar("_Marshaled")

# Response codes of the TCTI layer (TSS2_TCTI_RC_LAYER, 10 << 16) say the transport to the TPM failed:
# the device, tpm2-abrmd or the simulator went away. Once that happened in the middle of a command,
# ESAPI answers every later call with BAD_SEQUENCE (0x70007), even after the TPM is back: the
# context must be opened again.
_RC_LAYER_MASK = 0xFF << 16
_TCTI_LAYER = 10 << 16
_ESYS_RC_BAD_SEQUENCE = (7 << 16) | 7


def connection_lost(err: BaseException) -> TSS2_Exception | None:
    """The TSS2 error in `err`'s chain that says the connection to the TPM is gone, or None."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, TSS2_Exception):
            rc = int(seen.rc)
            if rc & _RC_LAYER_MASK == _TCTI_LAYER or rc == _ESYS_RC_BAD_SEQUENCE:
                return seen
        seen = seen.__cause__ or seen.__context__
    return None


def _raise_if_lost(err: TSS2_Exception) -> None:
    if connection_lost(err) is not None:
        raise TpmUnavailableError(f"lost the connection to the tpm: {_describe(err)}") from err


def _describe(err: TSS2_Exception) -> str:
    # The decoded text of a response code names the failing handle, parameter or session, never its value.
    return f"rc {int(err.rc):#x} ({err})"


@contextmanager
def _command(name: str) -> Iterator[None]:
    try:
        yield
    except TSS2_Exception as err:
        raise TpmOperationError(f"tpm command {name} failed: {_describe(err)}") from err


def _unmarshal_public(key: StoredKey, role: KeyRole) -> TPM2B_PUBLIC:
    path = key.files.public
    try:
        public, consumed = TPM2B_PUBLIC.unmarshal(key.blob.public)
    except (TSS2_Exception, ValueError, TypeError) as err:
        raise TpmKeyError(f"key file {path} is corrupt: not a marshaled TPM2B_PUBLIC") from err
    if consumed != len(key.blob.public):
        raise TpmKeyError(f"key file {path} is corrupt: {len(key.blob.public) - consumed} trailing bytes")
    mismatch = describe_mismatch(role, public)
    if mismatch is not None:
        raise TpmKeyError(f"key file {path} does not hold a vouchd {role.file_stem}: {mismatch}")
    return public


def _unmarshal_private(key: StoredKey) -> TPM2B_PRIVATE:
    path = key.files.private
    try:
        private, consumed = TPM2B_PRIVATE.unmarshal(key.blob.private)
    except (TSS2_Exception, ValueError, TypeError) as err:
        raise TpmKeyError(f"key file {path} is corrupt: not a marshaled TPM2B_PRIVATE") from err
    if consumed != len(key.blob.private) or consumed <= 2:
        raise TpmKeyError(f"key file {path} is corrupt: wrong length")
    return private


def _trim_der(data: bytes) -> bytes:
    """The DER certificate at the start of an NV index; some TPMs pad the index after it."""
    if len(data) < 4 or data[0] != 0x30:
        return data
    if data[1] < 0x80:
        total = 2 + data[1]
    else:
        length_bytes = data[1] & 0x7F
        if length_bytes == 0 or length_bytes > 4 or len(data) < 2 + length_bytes:
            return data
        total = 2 + length_bytes + int.from_bytes(data[2 : 2 + length_bytes], "big")
    return data[:total] if total <= len(data) else data


class TpmDevice:
    """One connection to a TPM with vouchd's EK profile. Single-threaded; see the module docstring."""

    def __init__(self, esapi: ESAPI, tcti: str, profile: EkProfile) -> None:
        self._esapi = esapi
        self._tcti = tcti
        self._profile = profile
        self._ek_template: TPM2B_PUBLIC | None = None
        self._ek_public: bytes = b""
        self._ek_context: object = None
        self._ek_info: EkInfo | None = None
        # Saved contexts of the AK and the node key, by public area. Reloading one is a single command;
        # loading the key from its blob takes the EK, a policy session and five more commands.
        self._key_contexts: dict[bytes, object] = {}

    @classmethod
    def open(cls, tcti: str, profile: EkProfile, *, pcrs_only: bool = False) -> TpmDevice:
        """Connect, clean up after earlier clients, check capabilities and create the EK.

        `pcrs_only`: connect for PCR reads and extends alone, touching nothing else, as firmware
        measuring a boot would: no flush of what other clients have loaded, no EK.
        """
        try:
            esapi = ESAPI(tcti)
        except TSS2_Exception as err:
            raise TpmUnavailableError(f"cannot connect to the tpm at tcti {tcti!r}: {err}") from err
        device = cls(esapi, tcti, profile)
        try:
            if pcrs_only:
                device._start_up_if_needed()
            else:
                device._prepare()
        except BaseException:
            device.close()
            raise
        return device

    @property
    def ek_info(self) -> EkInfo:
        if self._ek_info is None:
            raise TpmError("the tpm device has no endorsement key yet")
        return self._ek_info

    def close(self) -> None:
        try:
            self._esapi.close()
        except TSS2_Exception as err:  # a connection already gone has nothing left to close
            _log.debug("closing the tpm context failed", extra={"rc": _describe(err)})

    # ------------------------------------------------------------------ start-up

    def _prepare(self) -> None:
        self._start_up_if_needed()
        self._flush_leftovers()
        self._check_capabilities()
        self._create_ek()

    def _start_up_if_needed(self) -> None:
        try:
            self._esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, 0, 1)
        except TSS2_Exception as err:
            if err.error != TPM2_RC.INITIALIZE:
                raise TpmUnavailableError(f"the tpm at tcti {self._tcti!r} does not answer: {_describe(err)}") from err
            # Firmware or the kernel normally start the TPM; a simulator that was just reset needs it
            # from its first client, as tpm2-abrmd does.
            _log.info("tpm was not started up, sending TPM2_Startup(CLEAR)", extra={"tcti": self._tcti})
            with _command("Startup"):
                self._esapi.startup(TPM2_SU.CLEAR)

    def _handles(self, handle_type: int) -> list[int]:
        # One call is enough: a TPM holds far fewer objects or sessions than one answer can list.
        with _command("GetCapability"):
            _, data = self._esapi.get_capability(TPM2_CAP.HANDLES, handle_type, 128)
        return [int(handle) for handle in data.data.handles]

    def _flush_leftovers(self) -> None:
        """Flush objects and sessions a crashed client left in a TPM that has no resource manager.

        With a resource manager (/dev/tpmrm0, tpm2-abrmd) these lists are this connection's own and empty.
        """
        flushed = 0
        for handle in self._handles(TPM2_HC.TRANSIENT_FIRST):
            try:
                self._esapi.flush_context(self._esapi.tr_from_tpmpublic(handle))
                flushed += 1
            except TSS2_Exception as err:
                _log.debug(
                    "could not flush a leftover object",
                    extra={"handle": f"{handle:#x}", "rc": _describe(err)},
                )
        # Loaded HMAC and policy sessions are both listed under the loaded-session handle type.
        for handle in self._handles(TPM2_HC.LOADED_SESSION_FIRST):
            # ESAPI cannot name a session it did not start: send TPM2_FlushContext directly.
            command = struct.pack(">HIII", _TPM_ST_NO_SESSIONS, 14, _TPM_CC_FLUSH_CONTEXT, handle)
            try:
                tcti = self._esapi.get_tcti()
                tcti.transmit(command)
                response = bytes(tcti.receive())
            except TSS2_Exception as err:
                _log.debug(
                    "could not flush a leftover session",
                    extra={"handle": f"{handle:#x}", "rc": _describe(err)},
                )
                continue
            if response[6:10] == b"\x00\x00\x00\x00":
                flushed += 1
        if flushed:
            _log.info("flushed objects and sessions left in the tpm by earlier clients", extra={"count": flushed})

    def _check_capabilities(self) -> None:
        algorithms: set[int] = set()
        curves: set[int] = set()
        banks: set[int] = set()
        with _command("GetCapability"):
            more, start = True, 0
            while more:
                more, data = self._esapi.get_capability(TPM2_CAP.ALGS, start, 128)
                found = [int(prop.alg) for prop in data.data.algorithms]
                algorithms.update(found)
                more = bool(more) and bool(found)
                start = max(found, default=0) + 1
            _, data = self._esapi.get_capability(TPM2_CAP.ECC_CURVES, 0, 64)
            curves.update(int(curve) for curve in data.data.eccCurves)
            _, data = self._esapi.get_capability(TPM2_CAP.PCRS, 0, 16)
            banks.update(
                int(selection.hash)
                for selection in data.data.assignedPCR
                if any(bytes(selection.pcrSelect)[: selection.sizeofSelect])
            )
        missing = missing_capabilities(
            self._profile.ek_type, TpmCapabilities(frozenset(algorithms), frozenset(curves), frozenset(banks))
        )
        if missing:
            raise TpmCapabilityError(
                f"the tpm at tcti {self._tcti!r} lacks what ek type {self._profile.ek_type} needs: "
                + ", ".join(missing)
            )

    def _create_ek(self) -> None:
        with _command("NV_Read"):
            try:
                certificate, template = create_ek_template(self._profile.template_name, NVReadEK(self._esapi))
            except ValueError as err:
                # tpm2-pytss builds high-range EK templates only when their certificate is present.
                raise TpmCapabilityError(
                    f"the tpm has no ek certificate at nv index {self._profile.certificate_index:#010x}, "
                    f"which ek type {self._profile.ek_type} requires"
                ) from err
        self._ek_template = template
        handle, public = self._create_ek_primary()
        self._ek_public = public.marshal()
        self._save_ek(handle)
        self._ek_info = EkInfo(
            ek_type=self._profile.ek_type,
            public=self._ek_public,
            certificate=_trim_der(certificate) if certificate else None,
        )

    def _create_ek_primary(self) -> tuple[ESYS_TR, TPM2B_PUBLIC]:
        with _command("CreatePrimary"):
            handle, public, *_ = self._esapi.create_primary(None, self._ek_template, ESYS_TR.ENDORSEMENT)
        return handle, public

    def _save_ek(self, handle: ESYS_TR) -> None:
        # Deriving an RSA EK takes up to half a second; a saved context loads in microseconds.
        with self._flushing(handle), _command("ContextSave"):
            self._ek_context = self._esapi.context_save(handle)

    # ------------------------------------------------------------------ handles and sessions

    def _flush_quietly(self, handle: ESYS_TR) -> None:
        try:
            self._esapi.flush_context(handle)
        except TSS2_Exception as err:
            _log.debug("flush after a failed operation also failed", extra={"rc": _describe(err)})

    @contextmanager
    def _flushing(self, handle: ESYS_TR) -> Iterator[ESYS_TR]:
        try:
            yield handle
        except BaseException:
            self._flush_quietly(handle)
            raise
        with _command("FlushContext"):
            self._esapi.flush_context(handle)

    @contextmanager
    def _endorsement_key(self) -> Iterator[ESYS_TR]:
        try:
            handle = self._esapi.context_load(self._ek_context)
        except TSS2_Exception as err:
            _raise_if_lost(err)
            # A TPM Reset or Restart invalidates saved object contexts; the EK itself is derived from
            # the endorsement seed and comes back identical unless the TPM was cleared.
            _log.warning("saved ek context no longer loads, deriving the ek again", extra={"rc": _describe(err)})
            handle, public = self._create_ek_primary()
            if public.marshal() != self._ek_public:
                self._flush_quietly(handle)
                raise TpmError("the endorsement key changed since start: the tpm was cleared or replaced") from err
            with _command("ContextSave"):
                try:
                    self._ek_context = self._esapi.context_save(handle)
                except BaseException:
                    self._flush_quietly(handle)
                    raise
        with self._flushing(handle):
            yield handle

    @contextmanager
    def _endorsement_policy_session(self) -> Iterator[ESYS_TR]:
        """A session satisfying the EK's authPolicy, good for one authorization.

        Low-range EKs have no userWithAuth: using one as a parent or in ActivateCredential goes through
        PolicySecret(TPM_RH_ENDORSEMENT), followed by PolicyOR for the high-range templates.
        """
        with _command("StartAuthSession"):
            session = self._esapi.start_auth_session(
                ESYS_TR.NONE,
                ESYS_TR.NONE,
                TPM2_SE.POLICY,
                TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL),
                self._profile.policy_hash,
            )
        with self._flushing(session):
            with _command("PolicySecret"):
                self._esapi.policy_secret(ESYS_TR.ENDORSEMENT, session)
            if self._profile.policy_or_branches:
                with _command("PolicyOR"):
                    self._esapi.policy_or(session, TPML_DIGEST(list(self._profile.policy_or_branches)))
            yield session

    @contextmanager
    def _loaded(self, key: StoredKey, role: KeyRole) -> Iterator[ESYS_TR]:
        handle = self._reload_saved(key)
        if handle is None:
            handle = self._load_from_blob(key, role)
            with _command("ContextSave"):
                try:
                    self._key_contexts[key.blob.public] = self._esapi.context_save(handle)
                except BaseException:
                    self._flush_quietly(handle)
                    raise
        with self._flushing(handle):
            self._esapi.tr_set_auth(handle, key.auth_value)
            yield handle

    def _reload_saved(self, key: StoredKey) -> ESYS_TR | None:
        context = self._key_contexts.get(key.blob.public)
        if context is None:
            return None
        try:
            handle: ESYS_TR = self._esapi.context_load(context)
        except TSS2_Exception as err:
            _raise_if_lost(err)
            # A TPM Reset or Restart invalidates saved contexts: load the key from its blob again.
            del self._key_contexts[key.blob.public]
            return None
        return handle

    def _load_from_blob(self, key: StoredKey, role: KeyRole) -> ESYS_TR:
        public = _unmarshal_public(key, role)
        private = _unmarshal_private(key)
        with self._endorsement_key() as ek, self._endorsement_policy_session() as session:
            try:
                handle = self._esapi.load(ek, private, public, session1=session)
            except TSS2_Exception as err:
                if int(err.parameter) in (1, 2):
                    path = key.files.private if int(err.parameter) == 1 else key.files.public
                    raise TpmKeyError(
                        f"key file {path} does not load in this tpm (made by another tpm, tpm cleared, "
                        f"or corrupt): {_describe(err)}"
                    ) from err
                raise TpmOperationError(f"tpm command Load failed: {_describe(err)}") from err
        return handle

    @contextmanager
    def _authorizing(self, command: str, keys_by_session: Mapping[int, StoredKey]) -> Iterator[None]:
        """Run `command`; a refused authValue is a key file problem, named as such."""
        try:
            yield
        except TSS2_Exception as err:
            key = keys_by_session.get(int(err.session))
            if key is not None and int(err.error) in _AUTH_FAILURES:
                raise TpmKeyError(
                    f"key file {key.files.auth} does not hold the key's authValue: {_describe(err)}"
                ) from err
            raise TpmOperationError(f"tpm command {command} failed: {_describe(err)}") from err

    # ------------------------------------------------------------------ keys

    def create_key(self, role: KeyRole) -> tuple[KeyBlob, bytes]:
        """A new key for `role` under the EK and its random authValue."""
        auth_value = secrets.token_bytes(AUTH_VALUE_SIZE)
        sensitive = TPM2B_SENSITIVE_CREATE(sensitive=TPMS_SENSITIVE_CREATE(userAuth=TPM2B_AUTH(auth_value)))
        with self._endorsement_key() as ek, self._endorsement_policy_session() as session, _command("Create"):
            private, public, *_ = self._esapi.create(ek, sensitive, public_template(role), session1=session)
        return KeyBlob(public=public.marshal(), private=private.marshal()), auth_value

    def check_key_loads(self, key: StoredKey, role: KeyRole) -> None:
        with self._loaded(key, role):
            pass

    # ------------------------------------------------------------------ operations

    def quote(self, ak: StoredKey, bank: TPM2_ALG, pcrs: Sequence[int], qualifying_data: bytes) -> TpmQuote:
        selection = _pcr_selection(bank, pcrs)
        with self._loaded(ak, KeyRole.ATTESTATION_KEY) as handle, self._authorizing("Quote", {1: ak}):
            attest, signature = self._esapi.quote(handle, selection, qualifying_data, _NULL_SCHEME)
        return TpmQuote(attest=bytes(attest), signature=signature.marshal())

    def certify(self, node_key: StoredKey, ak: StoredKey, qualifying_data: bytes) -> TpmQuote:
        with (
            self._loaded(node_key, KeyRole.NODE_KEY) as node_handle,
            self._loaded(ak, KeyRole.ATTESTATION_KEY) as ak_handle,
            self._authorizing("Certify", {1: node_key, 2: ak}),
        ):
            attest, signature = self._esapi.certify(node_handle, ak_handle, qualifying_data, _NULL_SCHEME)
        return TpmQuote(attest=bytes(attest), signature=signature.marshal())

    def sign(self, node_key: StoredKey, message: bytes) -> bytes:
        digest = hashlib.sha256(message).digest()
        with self._loaded(node_key, KeyRole.NODE_KEY) as handle, self._authorizing("Sign", {1: node_key}):
            signature = self._esapi.sign(handle, digest, _NULL_SCHEME)
        ecdsa = signature.signature.ecdsa
        return encode_dss_signature(
            int.from_bytes(bytes(ecdsa.signatureR), "big"), int.from_bytes(bytes(ecdsa.signatureS), "big")
        )

    def activate_credential(self, ak: StoredKey, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        blob = _unmarshal_exact(TPM2B_ID_OBJECT, credential_blob, "credential blob")
        secret = _unmarshal_exact(TPM2B_ENCRYPTED_SECRET, encrypted_secret, "encrypted secret")
        with (
            self._loaded(ak, KeyRole.ATTESTATION_KEY) as ak_handle,
            self._endorsement_key() as ek,
            self._endorsement_policy_session() as session,
            self._authorizing("ActivateCredential", {1: ak}),
        ):
            recovered = self._esapi.activate_credential(
                ak_handle, ek, blob, secret, session1=ESYS_TR.PASSWORD, session2=session
            )
        return bytes(recovered)

    def extend_pcr(self, index: int, sha256_digest: bytes) -> None:
        digests = TPML_DIGEST_VALUES([TPMT_HA(hashAlg=TPM2_ALG.SHA256, digest=TPMU_HA(sha256=sha256_digest))])
        with _command("PCR_Extend"):
            self._esapi.pcr_extend(ESYS_TR.PCR0 + index, digests)

    def probe(self) -> None:
        """One cheap command, to learn whether the TPM still answers."""
        with _command("GetCapability"):
            self._esapi.get_capability(TPM2_CAP.TPM_PROPERTIES, 0, 1)

    def read_pcrs(self, bank: TPM2_ALG, pcrs: Sequence[int]) -> dict[int, bytes]:
        values: dict[int, bytes] = {}
        pending = sorted(pcrs)
        while pending:
            # PCR_Read returns at most eight digests per call; ask again for the rest.
            with _command("PCR_Read"):
                _, selection_out, digests = self._esapi.pcr_read(_pcr_selection(bank, pending))
            answered = _selected_indices(selection_out, bank)
            if not answered:
                raise TpmCapabilityError(
                    f"pcrs {', '.join(map(str, pending))} are not allocated in the {_bank_name(bank)} bank"
                )
            for index, digest in zip(answered, digests, strict=False):
                values[index] = bytes(digest)
            pending = [index for index in pending if index not in values]
        return {index: values[index] for index in pcrs}


def _bank_name(bank: TPM2_ALG) -> str:
    return str(bank).lower()


def _pcr_selection(bank: TPM2_ALG, pcrs: Sequence[int]) -> TPML_PCR_SELECTION:
    bitmap = bytearray(_PCR_SELECT_BYTES)
    for index in pcrs:
        bitmap[index // 8] |= 1 << (index % 8)
    return TPML_PCR_SELECTION([TPMS_PCR_SELECTION(hash=bank, sizeofSelect=_PCR_SELECT_BYTES, pcrSelect=bytes(bitmap))])


def _selected_indices(selection: TPML_PCR_SELECTION, bank: TPM2_ALG) -> list[int]:
    indices: list[int] = []
    for entry in selection.pcrSelections:
        if entry.hash != bank:
            continue
        bitmap = bytes(entry.pcrSelect)[: entry.sizeofSelect]
        indices.extend(i for i in range(len(bitmap) * 8) if bitmap[i // 8] >> (i % 8) & 1)
    return indices


def _unmarshal_exact(kind: type[_Marshaled], data: bytes, what: str) -> _Marshaled:
    try:
        value, consumed = kind.unmarshal(data)  # type: ignore[attr-defined]
    except (TSS2_Exception, ValueError, TypeError) as err:
        raise TpmArgumentError(f"{what} is not a size-prefixed {kind.__name__}") from err
    if consumed != len(data):
        raise TpmArgumentError(f"{what} has {len(data) - consumed} trailing bytes")
    return value  # type: ignore[no-any-return]
