"""Who may sign what the authority publishes: only the authority's own SVID, not any SVID of its CA.

A revocation document or a node event signed by a node (whose node SVID key a compromised host
holds) or by a workload would let it lift revocations or replay documents; the topic and chain checks
have their own tests in test_protocol.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from vouchd.authority.ca import CertificateAuthority
from vouchd.protocol.errors import SignatureError
from vouchd.protocol.identities import authority_spiffe_id
from vouchd.protocol.messages import NodeEvent, RevocationDocument
from vouchd.protocol.signing import ReplySigner, ReplyVerifier
from vouchd.protocol.transport import REVOCATIONS_TOPIC, node_events_topic
from vouchd.spiffe import SpiffeId, TrustDomain, TrustTier

TD = TrustDomain("example.org")
NODE = "spiffe://example.org/vouchd/node/tpm/" + "ef" * 32
DOCUMENT = RevocationDocument(version=7, issued_at=1_800_000_000, next_update=1_800_000_600)


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> CertificateAuthority:
    return CertificateAuthority.load_or_create(tmp_path_factory.mktemp("ca"), TD)


def signer_for(ca: CertificateAuthority, spiffe_id: SpiffeId) -> ReplySigner:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = ca.sign_x509_svid(key.public_key(), spiffe_id, ttl=timedelta(hours=1), tier=TrustTier.HARDWARE)
    return ReplySigner(key, [cert])


def test_the_authoritys_own_publication_opens(ca: CertificateAuthority) -> None:
    data = signer_for(ca, authority_spiffe_id(TD)).publish(DOCUMENT, topic=REVOCATIONS_TOPIC)

    assert ReplyVerifier(TD, ca.bundle).open_publication(data, topic=REVOCATIONS_TOPIC) == DOCUMENT


@pytest.mark.parametrize(
    ("signer_id", "topic", "body"),
    [
        (NODE, REVOCATIONS_TOPIC, DOCUMENT),
        (NODE, node_events_topic(NODE), NodeEvent(node_id=NODE, event="entries_changed", issued_at=1_800_000_000)),
        ("spiffe://example.org/web", REVOCATIONS_TOPIC, DOCUMENT),
    ],
    ids=["node-signs-revocations", "node-signs-its-own-event", "workload-signs-revocations"],
)
def test_a_publication_signed_by_another_svid_of_the_same_ca_is_refused(
        ca: CertificateAuthority, signer_id: str, topic: str, body: object) -> None:
    data = signer_for(ca, SpiffeId.parse(signer_id)).publish(body, topic=topic)

    with pytest.raises(SignatureError, match=f"signed by {signer_id}, not by spiffe://example.org/vouchd/authority"):
        ReplyVerifier(TD, ca.bundle).open_publication(data, topic=topic)
