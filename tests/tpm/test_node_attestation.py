"""Node attestation end to end against a real swtpm and the in-process authority (DESIGN §4, §5).

Every refusal test changes exactly one thing about an otherwise valid exchange, and checks both
the authority's refusal code and that no node SVID was issued.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import os
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.tpm.conftest import TRUST_DOMAIN, BootedTpm, authority_config, new_authority
from vouchd.agent.node import NodeIdentity
from vouchd.authority.server import Authority
from vouchd.evidence import ObjectAttributes, TpmPublic, make_credential
from vouchd.protocol.codec import encode
from vouchd.protocol.errors import RemoteError
from vouchd.protocol.messages import (
    AttestNonceRequest,
    AttestRequest,
    AttestResult,
    Challenge,
    ChallengeResponse,
    CredentialResponse,
    NonceGrant,
    QuotedRequest,
    RequestBody,
    TpmEvidence,
    X509SvidRequest,
)
from vouchd.protocol.signing import ReplyVerifier
from vouchd.protocol.transport import ATTEST_TOPIC, REQUEST_TOPIC, LocalTransport
from vouchd.spiffe import SpiffeId, TrustTier, make_csr, read_tier, validate_x509_svid_leaf, verify_x509_svid
from vouchd.tpm import NodeKeys, TpmOperationError, TpmService


def ek_hash_of(tpm: TpmService) -> str:
    return hashlib.sha256(TpmPublic.from_tpm2b(tpm.ek.public).spki_der()).hexdigest()


def node_id_of(tpm: TpmService) -> str:
    return f"spiffe://{TRUST_DOMAIN}/vouchd/node/tpm/{ek_hash_of(tpm)}"


class Exchange:
    """Speaks the attestation protocol by hand so a test can alter one step."""

    def __init__(self, authority: Authority, tpm: TpmService, keys: NodeKeys, event_log: Path) -> None:
        self.authority, self.tpm, self.keys, self.event_log = authority, tpm, keys, event_log
        self.node_id = node_id_of(tpm)
        self.verifier = ReplyVerifier(TRUST_DOMAIN, authority.bundle)

    async def call(self, topic: str, message: object) -> object:
        request = encode(message)
        reply = await self.authority.handle(topic, request)
        return self.verifier.open(reply, node_id=self.node_id, request=request)

    async def attest_nonce(self) -> bytes:
        grant = await self.call(ATTEST_TOPIC, AttestNonceRequest(node_id=self.node_id, request_id=os.urandom(16)))
        assert isinstance(grant, NonceGrant)
        return grant.nonce

    async def attest_request(self, **changes: object) -> AttestRequest:
        nonce = await self.attest_nonce()
        certify = await self.tpm.certify_node_key(nonce)
        fields: dict[str, object] = {
            "node_id": self.node_id, "ek_type": "rsa2048", "ek_public": self.tpm.ek.public,
            "ek_certificate": self.tpm.ek.certificate, "ak_public": self.keys.ak.public,
            "node_key_public": self.keys.node_key.public,
            "node_key_certify": TpmEvidence(certify.attest, certify.signature), "certify_nonce": nonce,
            "event_log": self.event_log.read_bytes(),
        }
        fields.update(changes)
        return AttestRequest(**fields)  # type: ignore[arg-type]

    async def challenge(self, request: AttestRequest | None = None) -> Challenge:
        reply = await self.call(ATTEST_TOPIC, request or await self.attest_request())
        assert isinstance(reply, Challenge)
        return reply

    async def answer(self, challenge: Challenge, extra_data: bytes) -> object:
        quote = await self.tpm.quote(challenge.pcr_bank, challenge.pcr_indices, extra_data)
        return await self.call(ATTEST_TOPIC, ChallengeResponse(
            node_id=self.node_id, session=challenge.session, quote=TpmEvidence(quote.attest, quote.signature)))

    async def attest_and_expect_refusal(self) -> object:
        challenge = await self.challenge()
        secret = await self.tpm.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
        return await self.answer(challenge, hashlib.sha256(challenge.server_nonce + secret).digest())

    async def attest(self) -> AttestResult:
        challenge = await self.challenge()
        secret = await self.tpm.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
        result = await self.answer(challenge, hashlib.sha256(challenge.server_nonce + secret).digest())
        assert isinstance(result, AttestResult)
        return result


@pytest.fixture
async def exchange(authority: Authority, tpm: TpmService, node_keys: NodeKeys, booted_tpm: BootedTpm) -> Exchange:
    await authority.enrol(ek_hash_of(tpm), "test")
    return Exchange(authority, tpm, node_keys, booted_tpm.event_log)


async def no_node_record(authority: Authority, exchange: Exchange) -> bool:
    return await authority.store.node(exchange.node_id) is None


async def test_valid_attestation_issues_node_svid_for_the_tpm_resident_node_key(exchange: Exchange) -> None:
    result = await exchange.attest()

    svid = x509.load_der_x509_certificate(result.node_svid)
    bundle = exchange.authority.bundle()
    assert verify_x509_svid([svid], bundle) == SpiffeId.parse(exchange.node_id)
    assert svid.public_key() == TpmPublic.from_tpm2b(exchange.keys.node_key.public).public_key()
    assert read_tier(svid) is TrustTier.HARDWARE
    ek_hex = ek_hash_of(exchange.tpm)
    assert f"tpm:ek_hash:{ek_hex}" in result.selectors
    assert "node:tier:hardware" in result.selectors
    assert any(s.startswith("tpm:ek_issuer_cn:") for s in result.selectors)
    assert any(s.startswith("tpm:pcr_profile:learned-") for s in result.selectors)


async def test_credential_made_for_another_ak_cannot_be_activated_and_no_svid_follows(exchange: Exchange) -> None:
    challenge = await exchange.challenge()
    ek = TpmPublic.from_tpm2b(exchange.tpm.ek.public)
    other_name = TpmPublic.from_tpm2b(exchange.keys.node_key.public).name
    blob, secret = make_credential(ek, os.urandom(32), other_name)

    with pytest.raises(TpmOperationError):
        await exchange.tpm.activate_credential(blob, secret)
    # Without the activated secret the agent can only guess the extraData: refused.
    with pytest.raises(RemoteError) as refused:
        await exchange.answer(challenge, hashlib.sha256(challenge.server_nonce + os.urandom(32)).digest())
    assert refused.value.code == "bad_quote"
    assert await no_node_record(exchange.authority, exchange)


async def test_quote_with_wrong_nonce_is_refused(exchange: Exchange) -> None:
    challenge = await exchange.challenge()
    secret = await exchange.tpm.activate_credential(challenge.credential_blob, challenge.encrypted_secret)

    with pytest.raises(RemoteError) as refused:
        await exchange.answer(challenge, hashlib.sha256(os.urandom(32) + secret).digest())
    assert refused.value.code == "bad_quote"
    assert "extraData" in refused.value.reason
    assert await no_node_record(exchange.authority, exchange)


async def test_challenge_session_is_single_use(exchange: Exchange) -> None:
    challenge = await exchange.challenge()
    secret = await exchange.tpm.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
    extra = hashlib.sha256(challenge.server_nonce + secret).digest()
    assert isinstance(await exchange.answer(challenge, extra), AttestResult)

    with pytest.raises(RemoteError) as refused:
        await exchange.answer(challenge, extra)
    assert refused.value.code == "session_expired"


async def test_ek_certificate_not_chaining_to_configured_roots_is_refused(
    tmp_path: Path, booted_tpm: BootedTpm, tpm: TpmService, node_keys: NodeKeys
) -> None:
    stranger_root = tmp_path / "other-root.pem"
    stranger_root.write_bytes(_self_signed_ca_pem("Some Other TPM Vendor Root"))
    authority = await new_authority(authority_config(tmp_path / "auth", booted_tpm.swtpm, ek_roots=(stranger_root,),
                                           ek_intermediates=()), standalone=True)
    try:
        await authority.enrol(ek_hash_of(tpm), "test")
        exchange = Exchange(authority, tpm, node_keys, booted_tpm.event_log)
        with pytest.raises(RemoteError) as refused:
            await exchange.challenge()
        assert refused.value.code == "ek_untrusted"
        assert await no_node_record(authority, exchange)
    finally:
        await authority.close()


async def test_ek_that_is_not_enrolled_is_refused_in_allowlist_mode(
    authority: Authority, tpm: TpmService, node_keys: NodeKeys, booted_tpm: BootedTpm
) -> None:
    exchange = Exchange(authority, tpm, node_keys, booted_tpm.event_log)
    with pytest.raises(RemoteError) as refused:
        await exchange.challenge()
    assert refused.value.code == "not_enrolled"


async def test_ak_without_restricted_attribute_is_refused(exchange: Exchange) -> None:
    # The node key is a non-restricted signing key: presenting it as the AK must fail.
    request = await exchange.attest_request(ak_public=exchange.keys.node_key.public)
    with pytest.raises(RemoteError) as refused:
        await exchange.challenge(request)
    assert refused.value.code == "bad_evidence"
    assert "restricted" in refused.value.reason.lower()


async def test_ak_without_fixed_tpm_attribute_is_refused(exchange: Exchange) -> None:
    ak = TpmPublic.from_tpm2b(exchange.keys.ak.public)
    altered = _with_attributes(exchange.keys.ak.public, ak.attributes & ~ObjectAttributes.FIXED_TPM)
    request = await exchange.attest_request(ak_public=altered)
    with pytest.raises(RemoteError) as refused:
        await exchange.challenge(request)
    assert refused.value.code == "bad_evidence"
    assert "fixed" in refused.value.reason.lower()


async def test_certify_by_the_ak_must_name_the_presented_node_key(exchange: Exchange) -> None:
    certify = await exchange.tpm.certify_node_key(os.urandom(32))  # not over the authority's nonce
    request = await exchange.attest_request(certify_nonce=await exchange.attest_nonce(),
                                            node_key_certify=TpmEvidence(certify.attest, certify.signature))
    with pytest.raises(RemoteError) as refused:
        await exchange.challenge(request)
    assert refused.value.code == "bad_evidence"


async def test_an_attestation_request_without_the_authoritys_nonce_is_refused(exchange: Exchange) -> None:
    nonce = os.urandom(32)  # the agent's own choice, as before the authority chose it
    certify = await exchange.tpm.certify_node_key(nonce)
    request = await exchange.attest_request(certify_nonce=nonce,
                                            node_key_certify=TpmEvidence(certify.attest, certify.signature))
    with pytest.raises(RemoteError) as refused:
        await exchange.challenge(request)
    assert refused.value.code == "nonce"


async def test_a_replayed_attestation_request_does_not_replace_the_attestation_in_progress(
        exchange: Exchange) -> None:
    request = await exchange.attest_request()
    challenge = await exchange.challenge(request)

    with pytest.raises(RemoteError) as replayed:
        await exchange.challenge(request)
    assert replayed.value.code == "nonce"

    secret = await exchange.tpm.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
    result = await exchange.answer(challenge, hashlib.sha256(challenge.server_nonce + secret).digest())
    assert isinstance(result, AttestResult), "the genuine session survived the replay"


async def test_event_log_that_does_not_replay_to_the_quote_is_refused(exchange: Exchange) -> None:
    from vouchd.evidence import EventType, build_event_log

    forged, _ = build_event_log([(0, int(EventType.EV_POST_CODE), b"a different firmware"),
                                 *[(i, int(EventType.EV_SEPARATOR), b"\0\0\0\0") for i in range(8)]])
    challenge = await exchange.challenge(await exchange.attest_request(event_log=forged))
    secret = await exchange.tpm.activate_credential(challenge.credential_blob, challenge.encrypted_secret)
    with pytest.raises(RemoteError) as refused:
        await exchange.answer(challenge, hashlib.sha256(challenge.server_nonce + secret).digest())
    assert refused.value.code == "bad_quote"
    assert await no_node_record(exchange.authority, exchange)


async def test_credential_request_bound_to_quote_issues_only_authorized_entries(
    tmp_path: Path, booted_tpm: BootedTpm, tpm: TpmService, node_keys: NodeKeys
) -> None:
    from vouchd.config import parse_config
    from vouchd.selectors import Selector
    from vouchd.standalone import standalone_entries

    config = parse_config(
        "trust_domain: example.org\n"
        "entries:\n"
        "  - {id: mine, spiffe_id: spiffe://example.org/app, selectors: ['unix:uid:1000']}\n"
        "  - {id: other-node, spiffe_id: spiffe://example.org/elsewhere, selectors: ['unix:uid:1000'],\n"
        "     parent: 'spiffe://example.org/vouchd/node/tpm/" + "ab" * 32 + "'}\n",
        tmp_path / "c.yaml",
    )
    authority = await new_authority(authority_config(tmp_path / "auth", booted_tpm.swtpm), standalone=True)
    try:
        await authority.enrol(ek_hash_of(tpm), "test")
        local = Selector("tpm", "ek_hash", ek_hash_of(tpm))
        await authority.registry.import_entries(standalone_entries(config.entries, local))
        await _issue_and_replay(Exchange(authority, tpm, node_keys, booted_tpm.event_log))
    finally:
        await authority.close()


async def _issue_and_replay(exchange: Exchange) -> None:
    result = await exchange.attest()
    key = ec.generate_private_key(ec.SECP256R1())
    body = encode(RequestBody(node_id=exchange.node_id, nonce=result.nonce, sent_at=int(dt.datetime.now().timestamp()),
                              x509_svids=(X509SvidRequest("mine", make_csr(key)),
                                          X509SvidRequest("other-node", make_csr(key))),
                              sync_entries=True))
    quote = await exchange.tpm.quote("sha256", range(8), hashlib.sha256(body).digest())
    request = QuotedRequest(node_id=exchange.node_id, body=body, quote=TpmEvidence(quote.attest, quote.signature))
    response = await exchange.call(REQUEST_TOPIC, request)

    assert isinstance(response, CredentialResponse)
    assert [s.entry_id for s in response.x509_svids] == ["mine"]
    assert [(e.entry_id, e.code) for e in response.errors] == [("other-node", "not_authorized")]
    assert [e.id for e in response.entries or ()] == ["mine"]
    leaf = x509.load_der_x509_certificate(response.x509_svids[0].cert_chain)
    assert validate_x509_svid_leaf(leaf) == SpiffeId.parse("spiffe://example.org/app")
    assert leaf.public_key() == key.public_key()

    # The same bytes again (QoS 1 redelivery) get the very same reply; new bytes with the used nonce do not.
    assert await exchange.authority.handle(REQUEST_TOPIC, encode(request)) == \
        await exchange.authority.handle(REQUEST_TOPIC, encode(request))
    replay_body = encode(RequestBody(node_id=exchange.node_id, nonce=result.nonce,
                                     sent_at=int(dt.datetime.now().timestamp()) + 1))
    replay_quote = await exchange.tpm.quote("sha256", range(8), hashlib.sha256(replay_body).digest())
    replayed = QuotedRequest(node_id=exchange.node_id, body=replay_body,
                             quote=TpmEvidence(replay_quote.attest, replay_quote.signature))
    with pytest.raises(RemoteError) as refused:
        await exchange.call(REQUEST_TOPIC, replayed)
    assert refused.value.code == "nonce"


async def test_credential_request_with_wrong_extra_data_is_refused(exchange: Exchange) -> None:
    result = await exchange.attest()
    body = encode(RequestBody(node_id=exchange.node_id, nonce=result.nonce,
                              sent_at=int(dt.datetime.now().timestamp())))
    quote = await exchange.tpm.quote("sha256", range(8), hashlib.sha256(body + b"x").digest())
    with pytest.raises(RemoteError) as refused:
        await exchange.call(REQUEST_TOPIC, QuotedRequest(node_id=exchange.node_id, body=body,
                                                         quote=TpmEvidence(quote.attest, quote.signature)))
    assert refused.value.code == "bad_quote"


async def test_tpm_reset_demands_reattestation_and_node_identity_does_it(
    authority: Authority, tpm: TpmService, node_keys: NodeKeys, booted_tpm: BootedTpm, tmp_path: Path
) -> None:
    await authority.enrol(ek_hash_of(tpm), "test")
    node = NodeIdentity.with_tpm(tpm=tpm, ak_public=node_keys.ak.public, node_key_public=node_keys.node_key.public,
                        transport=LocalTransport(authority.handle), trust_domain=TRUST_DOMAIN,
                        initial_bundle=authority.bundle, event_log_path=booted_tpm.event_log)
    await node.attest()
    first = await authority.store.node(node.node_id)
    assert first is not None

    # Reboot: resetCount goes up and PCRs start over; the same boot is measured again.
    from vouchd.devtools import simulate_measured_boot

    await tpm.close()
    booted_tpm.swtpm.power_cycle()
    await simulate_measured_boot(booted_tpm.tcti, booted_tpm.event_log)
    async with TpmService(booted_tpm.tcti) as rebooted:
        # The agent restarts after the reboot: same key blobs, no nonce, a stale attestation record.
        await rebooted.ensure_node_keys(tmp_path / "agent-tpm")
        restarted = NodeIdentity.with_tpm(tpm=rebooted, ak_public=node_keys.ak.public,
                                 node_key_public=node_keys.node_key.public,
                                 transport=LocalTransport(authority.handle), trust_domain=TRUST_DOMAIN,
                                 initial_bundle=authority.bundle, event_log_path=booted_tpm.event_log)
        response = await restarted.request(sync_entries=True)
    assert response.entries == ()
    second = await authority.store.node(node.node_id)
    assert second is not None and second.reset_count > first.reset_count
    assert second.attested_at > first.attested_at  # attested again, not merely served


def _with_attributes(tpm2b_public: bytes, attributes: int) -> bytes:
    # TPM2B_PUBLIC: size(2) type(2) nameAlg(2) objectAttributes(4) ...
    return tpm2b_public[:6] + struct.pack(">I", attributes) + tpm2b_public[10:]


def _self_signed_ca_pem(common_name: str, subject: x509.Name | None = None) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    key = ec.generate_private_key(ec.SECP256R1())
    name = subject or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(Encoding.PEM)


@pytest.fixture
async def fleet_authority(tmp_path: Path, booted_tpm: BootedTpm) -> AsyncIterator[Authority]:
    instance = await new_authority(authority_config(tmp_path / "fleet", booted_tpm.swtpm))
    yield instance
    await instance.close()


async def test_fleet_authority_learns_no_event_log_profile_on_its_own(
    fleet_authority: Authority, tpm: TpmService, node_keys: NodeKeys, booted_tpm: BootedTpm
) -> None:
    await fleet_authority.enrol(ek_hash_of(tpm), "test")
    exchange = Exchange(fleet_authority, tpm, node_keys, booted_tpm.event_log)
    with pytest.raises(RemoteError) as refused:
        await exchange.attest_and_expect_refusal()
    assert refused.value.code == "policy"
    assert await fleet_authority.store.profiles() == {}


async def test_fleet_authority_refuses_a_second_ak_for_an_enrolled_node(
    fleet_authority: Authority, tpm: TpmService, node_keys: NodeKeys, booted_tpm: BootedTpm, tmp_path: Path
) -> None:
    await fleet_authority.enrol(ek_hash_of(tpm), "test")
    await fleet_authority.store.save_profile("golden", _quoted_measurements(booted_tpm.event_log), learned_from="test",
                                            now=time.time())
    first = Exchange(fleet_authority, tpm, node_keys, booted_tpm.event_log)
    await first.attest()
    # Anyone who can reach the TPM can make another AK under the same EK.
    await tpm.close()
    async with TpmService(booted_tpm.tcti) as again:
        other_keys = await again.ensure_node_keys(tmp_path / "intruder-tpm")
        assert other_keys.ak.public != node_keys.ak.public
        intruder = Exchange(fleet_authority, again, other_keys, booted_tpm.event_log)
        with pytest.raises(RemoteError) as refused:
            await intruder.challenge()
    assert refused.value.code == "ak_changed"
    record = await fleet_authority.store.node(first.node_id)
    assert record is not None and record.ak_public == node_keys.ak.public


async def test_replayed_request_is_refused_without_demoting_the_node(exchange: Exchange) -> None:
    result = await exchange.attest()

    async def quoted(nonce: bytes, sent_at: int) -> QuotedRequest:
        body = encode(RequestBody(node_id=exchange.node_id, nonce=nonce, sent_at=sent_at))
        quote = await exchange.tpm.quote("sha256", range(8), hashlib.sha256(body).digest())
        return QuotedRequest(node_id=exchange.node_id, body=body, quote=TpmEvidence(quote.attest, quote.signature))

    now = int(dt.datetime.now().timestamp())
    captured = await quoted(result.nonce, now)
    first = await exchange.call(REQUEST_TOPIC, captured)
    assert isinstance(first, CredentialResponse)
    later = await exchange.call(REQUEST_TOPIC, await quoted(first.nonce, now + 1))  # the TPM clock moves on
    assert isinstance(later, CredentialResponse)
    # The reply cache has forgotten the captured request (a zero keep window purges older replies).
    await exchange.authority.store.remember_reply("spiffe://example.org/other", "x", b"", now=time.time(),
                                                  keep_seconds=0)

    with pytest.raises(RemoteError) as refused:
        await exchange.call(REQUEST_TOPIC, captured)
    assert refused.value.code == "nonce"
    record = await exchange.authority.store.node(exchange.node_id)
    assert record is not None and record.state.value == "trusted"


def _quoted_measurements(event_log: Path) -> list[str]:
    from vouchd.authority.verifier import quoted_measurements, selection_for
    from vouchd.evidence import parse_event_log

    return list(quoted_measurements(parse_event_log(event_log.read_bytes()), selection_for("sha256", range(8))))


def _unordered_measurements(event_log: Path) -> list[str]:
    """A profile as an older vouchd stored it: "<pcr>:<bank>:<hex>", no event order."""
    from vouchd.evidence import TpmAlg, parse_event_log

    parsed = parse_event_log(event_log.read_bytes())
    return [f"{pcr}:sha256:{digest.hex()}" for pcr, _t, digest in parsed.digests(TpmAlg.SHA256, range(8))]


async def test_a_profile_stored_without_event_order_is_stored_again_in_order_when_the_boot_satisfies_it(
    fleet_authority: Authority, tpm: TpmService, node_keys: NodeKeys, booted_tpm: BootedTpm,
) -> None:
    await fleet_authority.enrol(ek_hash_of(tpm), "test")
    await fleet_authority.store.save_profile("golden", _unordered_measurements(booted_tpm.event_log),
                                             learned_from="older vouchd", now=time.time())

    await Exchange(fleet_authority, tpm, node_keys, booted_tpm.event_log).attest()

    profiles = await fleet_authority.store.profiles()
    assert profiles == {"golden": frozenset(_quoted_measurements(booted_tpm.event_log))}


async def test_a_profile_stored_without_event_order_that_misses_a_measurement_is_refused_with_the_fix(
    fleet_authority: Authority, tpm: TpmService, node_keys: NodeKeys, booted_tpm: BootedTpm,
) -> None:
    await fleet_authority.enrol(ek_hash_of(tpm), "test")
    await fleet_authority.store.save_profile("golden", _unordered_measurements(booted_tpm.event_log)[1:],
                                             learned_from="older vouchd", now=time.time())

    with pytest.raises(RemoteError, match="vouchd node learn --name golden"):
        await Exchange(fleet_authority, tpm, node_keys, booted_tpm.event_log).attest()


async def test_node_learn_accepts_the_current_event_log_as_a_profile(
    fleet_authority: Authority, tpm: TpmService, node_keys: NodeKeys, booted_tpm: BootedTpm, tmp_path: Path,
) -> None:
    await fleet_authority.enrol(ek_hash_of(tpm), "test")
    exchange = Exchange(fleet_authority, tpm, node_keys, booted_tpm.event_log)
    with pytest.raises(RemoteError):
        await exchange.attest_and_expect_refusal()
    config = tmp_path / "vouchd.yaml"
    config.write_text(
        "trust_domain: example.org\n"
        f"agent: {{event_log: {booted_tpm.event_log}, tpm: {{tcti: '{booted_tpm.tcti}'}}}}\n"
        f"authority: {{state_dir: {tmp_path / 'fleet'}}}\n"
    )

    learned = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "vouchd.cli", "node", "learn", "--config", str(config), "--name",
                         "after-kernel-update"], capture_output=True, text=True, timeout=60, check=False)

    assert learned.returncode == 0, learned.stderr
    assert "after-kernel-update" in learned.stdout
    result = await exchange.attest()
    assert "tpm:pcr_profile:after-kernel-update" in result.selectors


async def test_a_failed_node_svid_renewal_shows_in_the_node_status(
    tmp_path: Path, booted_tpm: BootedTpm, tpm: TpmService, node_keys: NodeKeys
) -> None:
    import asyncio
    import shutil
    from datetime import timedelta

    event_log = tmp_path / "renewal-eventlog.bin"
    shutil.copy(booted_tpm.event_log, event_log)
    authority = await new_authority(authority_config(tmp_path / "short", booted_tpm.swtpm,
                                                     node_svid_ttl=timedelta(seconds=2)), standalone=True)
    try:
        await authority.enrol(ek_hash_of(tpm), "test")
        node = NodeIdentity.with_tpm(tpm=tpm, ak_public=node_keys.ak.public, node_key_public=node_keys.node_key.public,
                            transport=LocalTransport(authority.handle), trust_domain=TRUST_DOMAIN,
                            initial_bundle=authority.bundle, event_log_path=event_log)
        await node.attest()
        assert await node.renew_if_due() is False  # fresh: nothing to do
        await asyncio.sleep(1.2)  # past half of the node SVID's 2 s lifetime
        event_log.unlink()  # the authority demands a log: this re-attestation is refused

        with pytest.raises(RemoteError) as refused:
            await node.renew_if_due()

        assert refused.value.code == "policy"
        assert node.status is not None
        assert node.status.authority_error is not None
        assert node.status.authority_error.startswith("re-attestation:")
    finally:
        await authority.close()


async def test_an_ek_public_area_without_the_ek_attributes_is_refused(exchange: Exchange) -> None:
    ek = TpmPublic.from_tpm2b(exchange.tpm.ek.public)
    altered = _with_attributes(exchange.tpm.ek.public, ek.attributes & ~ObjectAttributes.RESTRICTED)
    with pytest.raises(RemoteError) as refused:
        await exchange.challenge(await exchange.attest_request(ek_public=altered))
    assert refused.value.code == "bad_evidence"
    assert "restricted" in refused.value.reason


async def test_a_node_id_not_derived_from_the_ek_is_refused(exchange: Exchange) -> None:
    claimed = f"spiffe://{TRUST_DOMAIN}/vouchd/node/tpm/" + "00" * 32
    request = encode(await exchange.attest_request(node_id=claimed))
    reply = await exchange.authority.handle(ATTEST_TOPIC, request)  # answered to the id it claimed
    with pytest.raises(RemoteError) as refused:
        exchange.verifier.open(reply, node_id=claimed, request=request)
    assert refused.value.code == "bad_request"
    assert "not derived from the presented EK" in refused.value.reason


async def test_a_demanded_pcr_the_event_log_does_not_cover_is_refused(
    tmp_path: Path, booted_tpm: BootedTpm, tpm: TpmService, node_keys: NodeKeys
) -> None:
    # PCR 9 stays all-zero: the log says nothing of it, so its quoted value proves nothing.
    authority = await new_authority(authority_config(tmp_path / "pcr9", booted_tpm.swtpm,
                                                     pcr_indices=(*range(8), 9)), standalone=True)
    try:
        await authority.enrol(ek_hash_of(tpm), "test")
        exchange = Exchange(authority, tpm, node_keys, booted_tpm.event_log)
        with pytest.raises(RemoteError) as refused:
            await exchange.attest_and_expect_refusal()
        assert refused.value.code == "policy"
        assert "all-zero" in refused.value.reason
    finally:
        await authority.close()


async def test_an_ek_certificate_for_another_key_is_refused(exchange: Exchange) -> None:
    other = x509.load_pem_x509_certificate(_self_signed_ca_pem("Not This TPM"))
    from cryptography.hazmat.primitives.serialization import Encoding

    request = await exchange.attest_request(ek_certificate=other.public_bytes(Encoding.DER))
    with pytest.raises(RemoteError) as refused:
        await exchange.challenge(request)
    assert refused.value.code == "bad_evidence"
    assert "does not certify the presented EK" in refused.value.reason


@pytest.mark.parametrize(("body_changes", "reason"), [
    ({"node_id": f"spiffe://{TRUST_DOMAIN}/vouchd/node/tpm/" + "00" * 32}, "request body names another node"),
    ({"sent_at_offset": -3600}, "request time is too far from the authority's clock"),
])
async def test_a_request_body_for_another_node_or_time_is_refused(
    exchange: Exchange, body_changes: dict[str, object], reason: str
) -> None:
    result = await exchange.attest()
    offset = int(body_changes.pop("sent_at_offset", 0))  # type: ignore[call-overload]
    fields: dict[str, object] = {"node_id": exchange.node_id, "nonce": result.nonce,
                                 "sent_at": int(dt.datetime.now().timestamp()) + offset, **body_changes}
    body = encode(RequestBody(**fields))  # type: ignore[arg-type]
    quote = await exchange.tpm.quote("sha256", range(8), hashlib.sha256(body).digest())
    with pytest.raises(RemoteError) as refused:
        await exchange.call(REQUEST_TOPIC, QuotedRequest(node_id=exchange.node_id, body=body,
                                                         quote=TpmEvidence(quote.attest, quote.signature)))
    assert (refused.value.code, refused.value.reason) == ("bad_request", reason)


async def test_an_impostor_root_with_the_manufacturers_name_is_refused(
    tmp_path: Path, booted_tpm: BootedTpm, tpm: TpmService, node_keys: NodeKeys
) -> None:
    # Same subject as the real EK issuer, another key: only the signature check can tell them apart.
    issuer = x509.load_pem_x509_certificate(booted_tpm.swtpm.manufacturer_issuer.read_bytes())
    impostor = tmp_path / "impostor.pem"
    impostor.write_bytes(_self_signed_ca_pem("unused", subject=issuer.subject))
    authority = await new_authority(authority_config(tmp_path / "impostor", booted_tpm.swtpm, ek_roots=(impostor,),
                                           ek_intermediates=()), standalone=True)
    try:
        await authority.enrol(ek_hash_of(tpm), "test")
        with pytest.raises(RemoteError) as refused:
            await Exchange(authority, tpm, node_keys, booted_tpm.event_log).challenge()
        assert refused.value.code == "ek_untrusted"
    finally:
        await authority.close()
