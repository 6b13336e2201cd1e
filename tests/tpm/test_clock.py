"""Clock steps between a node and its authority: SVID validity comes from the authority's clock only.

The authority runs on a fake clock, the node on the host's; a real swtpm quotes every request.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from tests.fakes import FakeClock
from tests.tpm.conftest import TRUST_DOMAIN, BootedTpm, RecordedDecisions, RecordingBus, authority_config
from vouchd.agent.node import NodeIdentity
from vouchd.authority.build import open_authority
from vouchd.authority.server import Authority
from vouchd.decisions import DecisionKind
from vouchd.entries import Entry
from vouchd.protocol.errors import RemoteError, SignatureError
from vouchd.protocol.messages import JwtSvidRequest, X509SvidRequest
from vouchd.protocol.transport import LocalTransport
from vouchd.selectors import Selector
from vouchd.spiffe import SpiffeId, make_csr
from vouchd.tpm import NodeKeys, TpmService


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


@pytest.fixture
async def authority(tmp_path: Path, booted_tpm: BootedTpm, clock: FakeClock) -> AsyncIterator[Authority]:
    instance = await open_authority(authority_config(tmp_path / "authority", booted_tpm.swtpm), TRUST_DOMAIN,
                                    publisher=RecordingBus(), decisions=RecordedDecisions(), clock=clock,
                                    standalone=True)
    yield instance
    await instance.close()


@pytest.fixture
async def node(authority: Authority, tpm: TpmService, node_keys: NodeKeys, booted_tpm: BootedTpm) -> NodeIdentity:
    identity = NodeIdentity.with_tpm(tpm=tpm, ak_public=node_keys.ak.public, node_key_public=node_keys.node_key.public,
                            transport=LocalTransport(authority.handle), trust_domain=TRUST_DOMAIN,
                            initial_bundle=authority.bundle, event_log_path=booted_tpm.event_log)
    ek = identity.node_id.rsplit("/", 1)[1]
    await authority.enrol(ek, "test")
    await identity.attest()
    await authority.registry.create(Entry(id="web", spiffe_id=SpiffeId.parse("spiffe://example.org/web"),
                                          selectors=frozenset({Selector("unix", "uid", "1000")}),
                                          node_selectors=frozenset({Selector("tpm", "ek_hash", ek)})))
    return identity


async def issue(node: NodeIdentity) -> x509.Certificate:
    csr = make_csr(ec.generate_private_key(ec.SECP256R1()))
    response = await node.request(x509_svids=[X509SvidRequest("web", csr)])
    (issued,) = response.x509_svids
    return x509.load_der_x509_certificate(issued.cert_chain)


async def test_validity_comes_from_the_authoritys_clock(node: NodeIdentity, clock: FakeClock) -> None:
    clock.jump(200)  # within the 300 s the two sides tolerate, but visibly not the host's time

    certificate = await issue(node)

    assert certificate.not_valid_before_utc.timestamp() == pytest.approx(clock.now() - 30, abs=2)
    assert certificate.not_valid_after_utc.timestamp() == pytest.approx(clock.now() + 3600, abs=2)


@pytest.mark.parametrize("step", [+3600, -3600])
async def test_nothing_is_issued_across_a_clock_step_the_authority_cannot_justify(
        authority: Authority, node: NodeIdentity, clock: FakeClock, step: int) -> None:
    decisions = authority.decisions
    assert isinstance(decisions, RecordedDecisions)
    seen = len(decisions.seen)
    clock.jump(step)

    # The node refuses the authority's answer as not fresh, whichever side refused first.
    with pytest.raises((RemoteError, SignatureError), match=r"not fresh|too far from"):
        await issue(node)
    assert not [d for d in decisions.seen[seen:] if d.kind is DecisionKind.ISSUE], "no SVID was signed"

    clock.jump(-step)
    assert (await issue(node)).not_valid_after_utc.timestamp() == pytest.approx(clock.now() + 3600, abs=2)


async def test_a_bound_asked_for_shortens_the_svid_and_one_in_the_past_is_refused(
        node: NodeIdentity, clock: FakeClock) -> None:
    # A child's SVID never outlives its parent's: the agent asks for the parent's expiry as not_after.
    bound = int(clock.now()) + 120  # below both TTLs (X.509 1 h, JWT 5 min)
    csr = make_csr(ec.generate_private_key(ec.SECP256R1()))
    response = await node.request(x509_svids=[X509SvidRequest("web", csr, not_after=bound)],
                                  jwt_svids=[JwtSvidRequest("web", ("api",), not_after=bound)])
    (issued,) = response.x509_svids
    certificate = x509.load_der_x509_certificate(issued.cert_chain)
    assert bound - 2 <= certificate.not_valid_after_utc.timestamp() <= bound
    (token,) = response.jwt_svids
    assert bound - 2 <= token.expires_at <= bound

    late = await node.request(x509_svids=[X509SvidRequest("web", csr, not_after=int(clock.now()) - 1)],
                              jwt_svids=[JwtSvidRequest("web", ("api",), not_after=int(clock.now()))])
    assert (late.x509_svids, late.jwt_svids) == ((), ())
    assert [(e.code, e.message) for e in late.errors] == [("bad_request", "not_after is not in the future")] * 2

    unbounded = await node.request(x509_svids=[X509SvidRequest("web", csr, not_after=bound + 7200)])
    assert unbounded.x509_svids[0].expires_at == pytest.approx(clock.now() + 3600, abs=2), "the entry's TTL is less"
