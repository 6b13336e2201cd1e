"""The standalone agent as a user runs it, with real SPIFFE clients in separate processes.

One agent process for the module (see conftest.running_agent), then py-spiffe and raw gRPC clients
against its socket.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from tests.interop.conftest import VOUCHD, RunningAgent, running_agent

pytestmark = pytest.mark.interop

NOBODY = 65534


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("standalone"), x509_svid_ttl="10m",
                       extra_entries=[("spiffe://example.org/only-for/uid-4242", "unix:uid:4242")]) as agent:
        yield agent


def _python(code: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_py_spiffe_fetches_the_entrys_x509_svid(agent: RunningAgent) -> None:
    result = _python("""
        from spiffe import WorkloadApiClient
        print(WorkloadApiClient().fetch_x509_svid().spiffe_id)
    """, agent.client_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "spiffe://example.org/user/root"


def test_x509_svid_is_a_spec_conformant_short_lived_leaf(agent: RunningAgent) -> None:
    result = _python("""
        import json
        from cryptography import x509
        from cryptography.hazmat.primitives.asymmetric import ec
        from spiffe import WorkloadApiClient
        with WorkloadApiClient() as client:
            context = client.fetch_x509_context()
        svid = context.default_svid
        leaf = svid.leaf
        sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ku = leaf.extensions.get_extension_for_class(x509.KeyUsage)
        bc = leaf.extensions.get_extension_for_class(x509.BasicConstraints)
        bundle = context.x509_bundle_set.get_bundle_for_trust_domain(svid.spiffe_id.trust_domain)
        leaf.verify_directly_issued_by(list(bundle.x509_authorities)[0])
        print(json.dumps({
            "uris": [u for u in sans.get_values_for_type(x509.UniformResourceIdentifier)],
            "san_count": len(list(sans)),
            "ca": bc.value.ca, "bc_critical": bc.critical, "ku_critical": ku.critical,
            "digital_signature": ku.value.digital_signature, "key_cert_sign": ku.value.key_cert_sign,
            "crl_sign": ku.value.crl_sign,
            "lifetime": (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds(),
            "key_curve": (svid.private_key.curve.name
                          if isinstance(svid.private_key, ec.EllipticCurvePrivateKey) else None),
        }))
    """, agent.client_env())
    assert result.returncode == 0, result.stderr
    leaf = json.loads(result.stdout)
    assert leaf["uris"] == ["spiffe://example.org/user/root"]
    assert leaf["san_count"] == 1
    assert leaf["ca"] is False and leaf["bc_critical"] is True
    assert leaf["digital_signature"] is True and leaf["ku_critical"] is True
    assert leaf["key_cert_sign"] is False and leaf["crl_sign"] is False
    assert leaf["lifetime"] <= 10 * 60 + 30  # x509_svid_ttl 10m plus the 30 s backdating
    assert leaf["key_curve"] == "secp256r1"


def test_py_spiffe_fetches_x509_bundles(agent: RunningAgent) -> None:
    result = _python("""
        from spiffe import WorkloadApiClient
        bundles = WorkloadApiClient().fetch_x509_bundles()
        print(sorted(str(b.trust_domain) for b in bundles.bundles))
    """, agent.client_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "['example.org']"


def test_caller_whose_uid_has_no_entry_gets_permission_denied(agent: RunningAgent) -> None:
    # The kernel reports the uid at connect(); drop to nobody after the imports are loaded.
    result = _python(f"""
        import os
        from spiffe import WorkloadApiClient
        from spiffe.errors import PySpiffeError
        import grpc
        from spiffe._proto import workload_pb2, workload_pb2_grpc
        # Everything grpc loads lazily is loaded before the drop: nobody may not read the venv.
        channel = grpc.insecure_channel("unix:{agent.socket}")
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel)
        os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        try:
            next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=[("workload.spiffe.io", "true")]))
        except grpc.RpcError as err:
            print(err.code().name)
        else:
            print("SERVED")
    """, agent.client_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "PERMISSION_DENIED"


def test_call_without_security_header_gets_invalid_argument(agent: RunningAgent) -> None:
    result = _python(f"""
        import grpc
        from spiffe._proto import workload_pb2, workload_pb2_grpc
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel("unix:{agent.socket}"))
        for call in (lambda: next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest())),
                     lambda: next(stub.FetchX509Bundles(workload_pb2.X509BundlesRequest()))):
            try:
                call()
            except grpc.RpcError as err:
                print(err.code().name)
            else:
                print("SERVED")
    """, agent.client_env())
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["INVALID_ARGUMENT", "INVALID_ARGUMENT"]


def test_status_reports_hardware_tier_node_and_served_svid(agent: RunningAgent) -> None:
    _python("from spiffe import WorkloadApiClient; WorkloadApiClient().fetch_x509_svid()", agent.client_env())
    result = subprocess.run([*VOUCHD, "status", "--json", "--admin-socket", str(agent.admin_socket)],
                            capture_output=True, text=True, check=True)
    status = json.loads(result.stdout)
    assert status["node"]["tier"] == "hardware"
    assert status["node"]["id"].startswith("spiffe://example.org/vouchd/node/tpm/")
    assert any(s.startswith("tpm:pcr_profile:") for s in status["node"]["selectors"])
    assert [s["spiffe_id"] for s in status["svids"]] == ["spiffe://example.org/user/root"]
    assert oct(agent.admin_socket.stat().st_mode & 0o777) == "0o600"
    assert oct(agent.socket.stat().st_mode & 0o777) == "0o777"


def test_agent_log_holds_no_private_key_material(agent: RunningAgent) -> None:
    text = agent.log.read_text()
    assert "PRIVATE KEY" not in text
    assert "x509_svid_key" not in text


def test_status_shows_recent_denials_with_the_callers_uid(agent: RunningAgent) -> None:
    result = _python(f"""
        import os
        import grpc
        from spiffe._proto import workload_pb2, workload_pb2_grpc
        # Everything grpc loads lazily is loaded before the drop: nobody may not read the venv.
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel("unix:{agent.socket}"))
        os.setgroups([]); os.setgid({NOBODY}); os.setuid({NOBODY})
        try:
            next(stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=[("workload.spiffe.io", "true")]))
        except grpc.RpcError as err:
            print(err.code().name)
    """, agent.client_env())
    assert result.stdout.strip() == "PERMISSION_DENIED", result.stderr
    workloads = agent.status()["workloads"]
    assert isinstance(workloads, dict)
    denial = workloads["recent_denials"][0]
    assert (denial["method"], denial["uid"], denial["outcome"]) == ("FetchX509SVID", NOBODY, "denied")
    assert "no registration entry" in denial["reason"]
    text = subprocess.run([*VOUCHD, "status", "--admin-socket", str(agent.admin_socket)],
                          capture_output=True, text=True, check=True).stdout
    assert f"uid {NOBODY}" in text


def test_a_second_agent_on_the_same_socket_is_refused_before_it_attests(agent: RunningAgent) -> None:
    result = subprocess.run([*VOUCHD, "agent", "--standalone", "--config", str(agent.config), "--log-format", "text"],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert f"another process is serving on {agent.socket}" in result.stderr
    assert "attestation challenge" not in result.stderr  # refused before the TPM or the authority


def test_status_piped_into_a_closed_reader_ends_quietly(agent: RunningAgent) -> None:
    result = subprocess.run(f"{' '.join(VOUCHD)} status --admin-socket {agent.admin_socket} | head -1",
                            shell=True, capture_output=True, text=True, timeout=60, check=False)
    assert result.stdout.startswith("trust domain")
    assert "Traceback" not in result.stderr
