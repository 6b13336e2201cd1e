"""X509SvidMaterial: the mandatory fields of the spec, and a private key that never shows."""

from __future__ import annotations

import pytest

from vouchd.agent.workload_api import InvalidSvidMaterialError, X509SvidMaterial

KEY = b"\x30\x81\x87secret-key-bytes"


def material(**changes: object) -> X509SvidMaterial:
    fields: dict[str, object] = {
        "spiffe_id": "spiffe://example.org/web",
        "cert_chain_der": b"\x30\x82leaf",
        "private_key_der": KEY,
        "bundle_der": b"\x30\x82root",
    }
    fields.update(changes)
    return X509SvidMaterial(**fields)  # type: ignore[arg-type]


def test_the_private_key_is_not_in_the_repr() -> None:
    svid = material()

    assert "secret-key-bytes" not in repr(svid)
    assert "spiffe://example.org/web" in repr(svid)


def test_the_trust_domain_is_derived_from_the_spiffe_id() -> None:
    assert material(spiffe_id="spiffe://example.org/ns/prod/web").trust_domain_id == "spiffe://example.org"
    assert material(spiffe_id="spiffe://example.org").trust_domain_id == "spiffe://example.org"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"spiffe_id": "https://example.org/web"}, "is not a spiffe:// id"),
        ({"spiffe_id": "spiffe://"}, "is not a spiffe:// id"),
        ({"cert_chain_der": b""}, "has an empty certificate chain"),
        ({"private_key_der": b""}, "has an empty private key"),
        ({"bundle_der": b""}, "has an empty bundle"),
    ],
)
def test_mandatory_fields_are_checked(changes: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidSvidMaterialError, match=message):
        material(**changes)
