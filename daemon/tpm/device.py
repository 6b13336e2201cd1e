"""Synchronous TPM operations on one ESAPI context.

An ESAPI context is not thread-safe: a TpmDevice is created, used and closed on the TPM service's
single worker thread and nowhere else. Every operation loads what it needs, uses it and flushes it,
sessions included, because a TPM without a resource manager holds only three transient objects.

Two primaries serve as parents: the EK (endorsement hierarchy) for the AK and the node key, and the
SRK (owner hierarchy, derived at the first seal or unseal) for sealed data. Each is derived once and
kept as a saved context; deriving one needs its hierarchy's authorization (vouchd.tpm.hierarchies).
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import struct
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

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
    TPM2B_DIGEST,
    TPM2B_ENCRYPTED_SECRET,
    TPM2B_ID_OBJECT,
    TPM2B_PRIVATE,
    TPM2B_PUBLIC,
    TPM2B_SENSITIVE_CREATE,
    TPM2B_SENSITIVE_DATA,
    TPML_DIGEST,
    TPML_DIGEST_VALUES,
    TPMS_SENSITIVE_CREATE,
    TPMT_HA,
    TPMT_SIG_SCHEME,
    TPMT_SYM_DEF,
    TPMU_HA,
    TSS2_Exception,
)
from tpm2_pytss.utils import NVReadEK, create_ek_template

from vouchd.tpm.capabilities import TpmCapabilities, TpmDescription, describe_tpm, missing_capabilities
from vouchd.tpm.ek import EkProfile
from vouchd.tpm.errors import (
    SealedDataUnavailableError,
    TpmCapabilityError,
    TpmError,
    TpmKeyError,
    TpmOperationError,
    TpmUnavailableError,
)
from vouchd.tpm.hierarchies import Hierarchy, HierarchyAuths, hierarchy_refusal
from vouchd.tpm.keystore import AUTH_VALUE_SIZE, StoredKey
from vouchd.tpm.marshaling import trim_der, unmarshal_exact, unmarshal_private, unmarshal_public, unmarshal_sealed
from vouchd.tpm.pcrpolicy import pcr_list, pcr_selection, policy_pcr_digest, selected_indices
from vouchd.tpm.templates import (
    KeyRole,
    public_template,
    sealed_object_template,
    storage_key_template,
)
from vouchd.tpm.values import PCR_BANKS, PCR_COUNT, EkInfo, KeyBlob, SealedBlob, TpmQuote, bank_name

__all__ = ["PCR_COUNT", "TpmDevice", "connection_lost"]

_log = logging.getLogger(__name__)

_NULL_SCHEME = TPMT_SIG_SCHEME(scheme=TPM2_ALG.NULL)
_AUTH_FAILURES = frozenset({int(TPM2_RC.AUTH_FAIL), int(TPM2_RC.BAD_AUTH)})
_TPM_CC_FLUSH_CONTEXT = 0x165
_TPM_ST_NO_SESSIONS = 0x8001
_RC_POLICY_FAIL = int(TPM2_RC.POLICY_FAIL)
_RC_PCR_CHANGED = int(TPM2_RC.PCR_CHANGED)
# Any PCR extended between PolicyPCR and Unseal (on a real host the kernel measures into PCR 10 at any
# time) makes the TPM refuse the session with PCR_CHANGED; a few tries outlast a burst.
_UNSEAL_ATTEMPTS = 3


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


def _is_tpm_response(err: TSS2_Exception) -> bool:
    """A response code from the TPM itself, as opposed to the TSS layers around it."""
    return int(err.rc) & _RC_LAYER_MASK == 0


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








class TpmDevice:
    """One connection to a TPM with vouchd's EK profile. Single-threaded; see the module docstring."""

    def __init__(self, esapi: ESAPI, tcti: str, profile: EkProfile, authorizations: HierarchyAuths) -> None:
        self._esapi = esapi
        self._tcti = tcti
        self._profile = profile
        self._authorizations = authorizations
        self._ek_template: TPM2B_PUBLIC | None = None
        self._ek_public: bytes = b""
        self._ek_context: object = None
        self._ek_info: EkInfo | None = None
        self._srk_context: object = None
        # Saved contexts of the AK and the node key, by public area. Reloading one is a single command;
        # loading the key from its blob takes the EK, a policy session and five more commands.
        self._key_contexts: dict[bytes, object] = {}

    @classmethod
    def open(cls, tcti: str, profile: EkProfile, *, authorizations: HierarchyAuths | None = None,
             pcrs_only: bool = False) -> TpmDevice:
        """Connect, clean up after earlier clients, check capabilities and create the EK.

        `authorizations`: of the endorsement and owner hierarchies; empty ones when None.
        `pcrs_only`: connect for PCR reads and extends alone, touching nothing else, as firmware
        measuring a boot would: no flush of what other clients have loaded, no EK.
        """
        try:
            esapi = ESAPI(tcti)
        except TSS2_Exception as err:
            raise TpmUnavailableError(f"cannot connect to the tpm at tcti {tcti!r}: {err}") from err
        device = cls(esapi, tcti, profile, authorizations or HierarchyAuths())
        try:
            for hierarchy in Hierarchy:
                auth = device._authorizations.of(hierarchy)
                if auth.value:
                    # Held by ESAPI and sent in the password session of each command the hierarchy authorizes.
                    esapi.tr_set_auth(hierarchy.handle, auth.value)
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
            certificate=trim_der(certificate) if certificate else None,
        )

    def _create_ek_primary(self) -> tuple[ESYS_TR, TPM2B_PUBLIC]:
        with self._hierarchy_command("CreatePrimary", Hierarchy.ENDORSEMENT):
            handle, public, *_ = self._esapi.create_primary(None, self._ek_template, ESYS_TR.ENDORSEMENT)
        return handle, public

    @contextmanager
    def _hierarchy_command(self, name: str, hierarchy: Hierarchy) -> Iterator[None]:
        """Run `name`, authorized by `hierarchy`; a refusal of that authorization is named with its fix."""
        try:
            yield
        except TSS2_Exception as err:
            refusal = hierarchy_refusal(self._authorizations.of(hierarchy), err)
            if refusal is not None:
                raise refusal from err
            raise TpmOperationError(f"tpm command {name} failed: {_describe(err)}") from err

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
    def _storage_key(self) -> Iterator[ESYS_TR]:
        """The owner hierarchy's SRK, loaded for one operation. Derived (which needs the owner
        authorization) at its first use and whenever its saved context no longer loads."""
        handle: ESYS_TR | None = None
        if self._srk_context is not None:
            try:
                handle = self._esapi.context_load(self._srk_context)
            except TSS2_Exception as err:
                _raise_if_lost(err)
                # A TPM Reset or Restart invalidates saved contexts: derive it again from the owner seed.
                self._srk_context = None
        if handle is None:
            with self._hierarchy_command("CreatePrimary", Hierarchy.OWNER):
                handle, *_ = self._esapi.create_primary(None, storage_key_template(), ESYS_TR.OWNER)
            with _command("ContextSave"):
                try:
                    self._srk_context = self._esapi.context_save(handle)
                except BaseException:
                    self._flush_quietly(handle)
                    raise
        with self._flushing(handle):
            yield handle

    @contextmanager
    def _session(self, kind: TPM2_SE, hash_alg: TPM2_ALG) -> Iterator[ESYS_TR]:
        """An unbound, unsalted session of `kind`, flushed when done."""
        with _command("StartAuthSession"):
            session = self._esapi.start_auth_session(
                ESYS_TR.NONE, ESYS_TR.NONE, kind, TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), hash_alg
            )
        with self._flushing(session):
            yield session

    @contextmanager
    def _endorsement_policy_session(self) -> Iterator[ESYS_TR]:
        """A session satisfying the EK's authPolicy, good for one authorization.

        Low-range EKs have no userWithAuth: using one as a parent or in ActivateCredential goes through
        PolicySecret(TPM_RH_ENDORSEMENT), followed by PolicyOR for the high-range templates.
        """
        with self._session(TPM2_SE.POLICY, self._profile.policy_hash) as session:
            with self._hierarchy_command("PolicySecret", Hierarchy.ENDORSEMENT):
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
        public = unmarshal_public(key, role)
        private = unmarshal_private(key)
        with self._endorsement_key() as ek, self._endorsement_policy_session() as session:
            try:
                handle = self._esapi.load(ek, private, public, session1=session)
            except TSS2_Exception as err:
                if int(err.parameter) in (1, 2):
                    path = key.files.private if int(err.parameter) == 1 else key.files.public
                    raise TpmKeyError(
                        f"key file {path} does not load in this tpm (made by another tpm, under another ek "
                        f"type than tpm.ek {self._profile.ek_type}, or corrupt): {_describe(err)}"
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
        selection = pcr_selection(bank, pcrs)
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
        blob = unmarshal_exact(TPM2B_ID_OBJECT, credential_blob, "credential blob")
        secret = unmarshal_exact(TPM2B_ENCRYPTED_SECRET, encrypted_secret, "encrypted secret")
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

    # ------------------------------------------------------------------ sealing

    def seal(self, data: bytes, bank: TPM2_ALG, pcrs: Sequence[int]) -> SealedBlob:
        """`data` (TpmService checked its size) in a keyed-hash object under the SRK that unseals only
        while `pcrs` of `bank` hold the values they hold now."""
        indices = sorted(pcrs)
        selection = pcr_selection(bank, indices)
        # Reading first also refuses a bank the TPM has not allocated: a PolicyPCR over it would
        # cover no value at all.
        values = self.read_pcrs(bank, indices)
        digest = policy_pcr_digest(selection, [values[index] for index in indices])
        sensitive = TPM2B_SENSITIVE_CREATE(sensitive=TPMS_SENSITIVE_CREATE(data=TPM2B_SENSITIVE_DATA(data)))
        with self._storage_key() as srk, _command("Create"):
            private, public, *_ = self._esapi.create(srk, sensitive, sealed_object_template(digest))
        return SealedBlob(public=public.marshal(), private=private.marshal(), bank=bank_name(bank),
                          pcrs=tuple(indices))

    def unseal(self, blob: SealedBlob) -> bytes:
        public, private = unmarshal_sealed(blob)
        selection = pcr_selection(PCR_BANKS[blob.bank], blob.pcrs)
        with self._storage_key() as srk, self._flushing(self._load_sealed(srk, public, private)) as handle:
            for _ in range(_UNSEAL_ATTEMPTS):
                with self._session(TPM2_SE.POLICY, TPM2_ALG.SHA256) as session:
                    with _command("PolicyPCR"):
                        # No expected digest: the TPM takes the PCRs' current values into the session.
                        self._esapi.policy_pcr(session, TPM2B_DIGEST(), selection)
                    try:
                        return bytes(self._esapi.unseal(handle, session1=session))
                    except TSS2_Exception as err:
                        _raise_if_lost(err)
                        if not _is_tpm_response(err):
                            raise TpmOperationError(f"tpm command Unseal failed: {_describe(err)}") from err
                        if int(err.error) == _RC_POLICY_FAIL:
                            raise SealedDataUnavailableError(
                                f"pcrs {pcr_list(blob.pcrs)} of the {blob.bank} bank differ from when the data "
                                "was sealed (a pcr was extended since, or the host booted into another state)"
                            ) from err
                        if int(err.error) != _RC_PCR_CHANGED:
                            raise TpmOperationError(f"tpm command Unseal failed: {_describe(err)}") from err
        raise TpmOperationError(f"pcrs {pcr_list(blob.pcrs)} of the {blob.bank} bank kept changing while the "
                                f"data was unsealed ({_UNSEAL_ATTEMPTS} tries)")

    def _load_sealed(self, srk: ESYS_TR, public: TPM2B_PUBLIC, private: TPM2B_PRIVATE) -> ESYS_TR:
        try:
            handle: ESYS_TR = self._esapi.load(srk, private, public)
        except TSS2_Exception as err:
            _raise_if_lost(err)
            if _is_tpm_response(err) and int(err.parameter) in (1, 2):
                raise SealedDataUnavailableError(
                    "the sealed data does not load in this tpm: it was sealed by another tpm or before the "
                    f"tpm was cleared (a new owner seed), or the blob is damaged: {_describe(err)}"
                ) from err
            raise TpmOperationError(f"tpm command Load failed: {_describe(err)}") from err
        return handle

    # ------------------------------------------------------------------ queries

    def describe(self) -> TpmDescription:
        """What the TPM says about itself (vouchd.tpm.capabilities.describe_tpm)."""
        try:
            return describe_tpm(self._esapi)
        except TSS2_Exception as err:
            # Chained, so that the service still sees a lost connection in __cause__.
            raise TpmOperationError(f"tpm command GetCapability or NV_Read failed: {_describe(err)}") from err

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
                _, selection_out, digests = self._esapi.pcr_read(pcr_selection(bank, pending))
            answered = selected_indices(selection_out, bank)
            if not answered:
                raise TpmCapabilityError(
                    f"pcrs {pcr_list(pending)} are not allocated in the {bank_name(bank)} bank"
                )
            for index, digest in zip(answered, digests, strict=False):
                values[index] = bytes(digest)
            pending = [index for index in pending if index not in values]
        return {index: values[index] for index in pcrs}









