"""Short-lived identities stay fresh: SVID rotation is pushed to open streams, the node SVID renews.

An agent with 4-second X.509-SVIDs and node SVIDs, and a 1-second attestation interval.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator

import pytest

from tests.interop.conftest import RunningAgent, running_agent

pytestmark = pytest.mark.interop


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("rotation"), x509_svid_ttl="4s", node_svid_ttl="4s",
                       attestation_interval="1s") as agent:
        yield agent


def test_open_stream_receives_the_rotated_svid_before_the_old_one_expires(agent: RunningAgent) -> None:
    code = textwrap.dedent(f"""
        import json, time
        import grpc
        from cryptography import x509
        from spiffe._proto import workload_pb2, workload_pb2_grpc
        stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(grpc.insecure_channel("unix:{agent.socket}"))
        stream = stub.FetchX509SVID(workload_pb2.X509SVIDRequest(), metadata=[("workload.spiffe.io", "true")],
                                    timeout=15)
        seen = []
        for response in stream:
            leaf = x509.load_der_x509_certificate(response.svids[0].x509_svid)
            seen.append({{"serial": leaf.serial_number, "received": time.time(),
                         "not_after": leaf.not_valid_after_utc.timestamp(), "count": len(response.svids)}})
            if len(seen) == 2:
                break
        print(json.dumps(seen))
    """)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=False)
    assert result.returncode == 0, result.stderr
    first, second = json.loads(result.stdout)
    assert first["count"] == second["count"] == 1
    assert second["serial"] != first["serial"]
    assert second["received"] < first["not_after"], "the new SVID must arrive while the old one is valid"


def test_node_svid_is_renewed_by_reattestation(agent: RunningAgent) -> None:
    node = agent.status()["node"]
    assert isinstance(node, dict)
    first_serial = node["svid_serial"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        node = agent.status()["node"]
        assert isinstance(node, dict)
        if node["svid_serial"] != first_serial:
            break
        time.sleep(0.2)
    assert node["svid_serial"] != first_serial
    assert node["state"] == "trusted"
    assert subprocess.run([sys.executable, "-m", "vouchd.cli", "healthcheck", "--admin-socket",
                           str(agent.admin_socket)], capture_output=True, check=False).returncode == 0
