"""The light half of the Workload API: X509SvidMaterial's mandatory fields, and no gRPC on import."""

from __future__ import annotations

import subprocess
import sys

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


@pytest.mark.parametrize("module", ["vouchd.agent.workload_api.identities", "vouchd.agent.workload_api"])
def test_the_interface_types_load_no_grpc(module: str) -> None:
    # The agent core imports these for its data types; gRPC belongs to the server alone. A fresh
    # interpreter, because this one has loaded the server for other tests.
    probe = f"import sys, {module}; print(sorted(m for m in sys.modules if m.split('.')[0] in ('grpclib', 'h2')))"

    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout

    assert loaded.strip() == "[]"


def test_the_server_does_load_grpc() -> None:
    # The probe above can fail: this is what it sees when gRPC is loaded.
    probe = "import sys, vouchd.agent.workload_api.server; print('grpclib' in sys.modules)"

    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout

    assert loaded.strip() == "True"
