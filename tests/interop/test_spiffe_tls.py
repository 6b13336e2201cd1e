"""Two real processes talk mutual TLS with X.509-SVIDs from a standalone agent, through py-spiffe's spiffe-tls.

Both ends run as uid 0, so both hold spiffe://example.org/user/root. Each end runs in its own
subprocess (py-spiffe's protobuf stubs clash with vouchd's in one process); the server prints its
port once it listens, which is how the test knows it may dial.
"""

from __future__ import annotations

import contextlib
import select
import subprocess
import sys
import textwrap
from collections.abc import Iterator

import pytest

from tests.interop.conftest import RunningAgent, running_agent

pytestmark = pytest.mark.interop

ROOT_SPIFFE_ID = "spiffe://example.org/user/root"
STARTUP_TIMEOUT_SECONDS = 30
EXCHANGE_TIMEOUT_SECONDS = 30

# argv: the client SPIFFE ID to authorize. Prints the port, serves one connection, then prints
# what it served so the test can tell a served request from a refused one.
SERVER = textwrap.dedent("""
    import sys
    from cryptography import x509
    from spiffe import SpiffeId, X509Source
    from spiffetls import ListenOptions, listen
    from spiffetls.tlsconfig.authorize import authorize_id

    with X509Source(timeout_in_seconds=30) as source:
        options = ListenOptions(authorize_fn=authorize_id(SpiffeId(sys.argv[1])))
        listener = listen("127.0.0.1:0", source, options)
        print(listener.getsockname()[1], flush=True)
        connection, _ = listener.accept()
        connection.do_handshake()
        request = b""
        while not request.endswith(b"\\n"):
            chunk = connection.recv(1024)
            if not chunk:
                sys.exit("client closed the connection before sending a line")
            request += chunk
        peer = connection.get_peer_certificate(as_cryptography=True)
        san = peer.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        peer_id = ",".join(san.get_values_for_type(x509.UniformResourceIdentifier))
        connection.sendall(f"{peer_id} {request.decode().strip()}\\n".encode())
        connection.shutdown()
        connection.close()
        listener.close()
        print(f"served {peer_id}", flush=True)
""")

# argv: port, the server SPIFFE ID to authorize. The decision is the library's authorize_id; the
# wrapper only reports what it rejected, so a failure can be told apart from a broken trust bundle.
CLIENT = textwrap.dedent("""
    import sys
    from cryptography import x509
    from spiffe import SpiffeId, X509Source
    from spiffetls import dial
    from spiffetls.errors import TLSConnectionError
    from spiffetls.tlsconfig.authorize import authorize_id

    port, server_id = sys.argv[1], sys.argv[2]
    library_authorizer = authorize_id(SpiffeId(server_id))

    def authorize(certificate):
        if library_authorizer(certificate):
            return True
        san = certificate.to_cryptography().extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        presented = ",".join(san.get_values_for_type(x509.UniformResourceIdentifier))
        print(f"server not authorized: presented {presented}, expected {server_id}", file=sys.stderr)
        return False

    with X509Source(timeout_in_seconds=30) as source:
        try:
            connection = dial(f"127.0.0.1:{port}", source, authorize_fn=authorize)
        except TLSConnectionError as error:
            sys.exit(f"tls handshake failed: {error.context.get('reason')}")
        connection.sendall(b"ping\\n")
        reply = b""
        while not reply.endswith(b"\\n"):
            chunk = connection.recv(1024)
            if not chunk:
                break
            reply += chunk
        print(reply.decode().strip())
        connection.close()
""")


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    with running_agent(tmp_path_factory.mktemp("spiffe-tls"), x509_svid_ttl="1h") as agent:
        yield agent


@contextlib.contextmanager
def _spawned(code: str, args: list[str], agent: RunningAgent) -> Iterator[subprocess.Popen[str]]:
    process = subprocess.Popen([sys.executable, "-c", code, *args], env=agent.client_env(), text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate(timeout=10)


def _read_port(server: subprocess.Popen[str]) -> int:
    assert server.stdout is not None
    readable, _, _ = select.select([server.stdout], [], [], STARTUP_TIMEOUT_SECONDS)
    if not readable:
        pytest.fail(f"server printed no port within {STARTUP_TIMEOUT_SECONDS} s")
    line = server.stdout.readline()
    if not line.strip().isdigit():
        _, stderr = server.communicate(timeout=EXCHANGE_TIMEOUT_SECONDS)
        pytest.fail(f"server did not start listening (exit {server.returncode}):\n{line}{stderr}")
    return int(line)


def _exchange(agent: RunningAgent, *, client_authorizes: str) -> tuple[subprocess.CompletedProcess[str],
                                                                        subprocess.CompletedProcess[str]]:
    """Run one server (authorizing the root id) and one client; return both processes' outcomes."""
    with _spawned(SERVER, [ROOT_SPIFFE_ID], agent) as server:
        port = _read_port(server)
        with _spawned(CLIENT, [str(port), client_authorizes], agent) as client:
            client_out, client_err = client.communicate(timeout=EXCHANGE_TIMEOUT_SECONDS)
            server_out, server_err = server.communicate(timeout=EXCHANGE_TIMEOUT_SECONDS)
    return (subprocess.CompletedProcess(client.args, client.returncode, client_out, client_err),
            subprocess.CompletedProcess(server.args, server.returncode, server_out, server_err))


def test_mutual_tls_between_two_workloads_authorizing_each_others_id(agent: RunningAgent) -> None:
    client, server = _exchange(agent, client_authorizes=ROOT_SPIFFE_ID)
    assert client.returncode == 0, client.stderr
    assert server.returncode == 0, server.stderr
    assert client.stdout.strip() == f"{ROOT_SPIFFE_ID} ping"
    assert server.stdout.splitlines()[-1] == f"served {ROOT_SPIFFE_ID}"


def test_client_refuses_a_server_whose_id_it_does_not_authorize(agent: RunningAgent) -> None:
    client, server = _exchange(agent, client_authorizes="spiffe://example.org/someone-else")
    assert client.returncode != 0, client.stdout
    assert (f"server not authorized: presented {ROOT_SPIFFE_ID}, expected spiffe://example.org/someone-else"
            in client.stderr)
    assert "tls handshake failed" in client.stderr
    assert client.stdout == ""
    assert server.returncode != 0, server.stdout
    assert "served" not in server.stdout
