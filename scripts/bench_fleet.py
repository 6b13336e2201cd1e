"""One `vouchd server` replica over MQTT: how many node attestations and SVID issuances a second.

    .venv/bin/python scripts/bench_fleet.py [--nodes 200] [--seconds 5] [--json FILE]

A real mosquitto (set_tcp_nodelay) and a real `vouchd server` (SQLite store) as processes; the nodes
are in this process: static-secret nodes (a software node key each, joined with a join token, so no
TPM is needed and the authority's cost is measured rather than a TPM's), each on its own MQTT
connection through MqttAuthorityLink, as fleet agents are.

- attestations: every node joins and attests at once (a fleet starting together), then all attest
  again at once; attestations per second of the second round, and of the first (joins);
- issuance: every node asks for one JWT-SVID per request, four a second (the bus lets a node send
  five), for `--seconds`; JWT-SVIDs issued per second, and the p50/p99 of a request. With 200 nodes
  that offers 800 requests a second: what the replica answers of them is its capacity.

Both sides share this machine's cores: the nodes' signing and JSON cost CPU the replica would have
alone on a real fleet. The figures are per replica; replicas on PostgreSQL share the requests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec

from vouchd.agent.admin import admin_request
from vouchd.agent.node import NodeIdentity
from vouchd.agent.provers import KeyProver
from vouchd.protocol.keyproof import node_key_hash, node_key_spki
from vouchd.protocol.messages import JwtSvidRequest
from vouchd.protocol.mqtt import MqttAuthorityLink
from vouchd.spiffe import TrustDomain, X509Bundle

TD = TrustDomain("example.org")
# Seconds between one node's requests: under the bus's per-node limit (5 a second, ServiceLimits),
# above which a replica drops a node's requests unanswered. Offered load: nodes / PACE a second.
PACE = 0.25
VOUCHD = [sys.executable, "-m", "vouchd.cli"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_until(condition: Any, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.05)


@contextlib.contextmanager
def processes(folder: Path) -> Iterator[tuple[int, Path]]:
    """mosquitto and one `vouchd server`; yields the broker's port and the server's admin socket."""
    port = free_port()
    (folder / "mosquitto.conf").write_text(f"persistence false\nset_tcp_nodelay true\nlog_dest stderr\n"
                                           f"log_type error\n{'user root' if os.geteuid() == 0 else ''}\n"
                                           f"max_connections -1\nlistener {port} 127.0.0.1\nallow_anonymous true\n")
    admin = folder / "server.sock"
    (folder / "server.yaml").write_text(textwrap.dedent(f"""\
        trust_domain: example.org
        authority:
          state_dir: {folder}/authority
          admin_socket_path: {admin}
          broker: {{host: "127.0.0.1", port: {port}, client_id: replica-1, share_group: bench}}
          policy: {{audiences: {{bench: low}}}}
          node_svid_ttl: 1h
        entries:
          - spiffe_id: spiffe://example.org/bench/workload
            selectors: ["unix:uid:0"]
            node_selectors: ["node:label:bench:yes"]
            min_tier: static-secret
            jwt_ttl: 60s
        """))
    started: list[subprocess.Popen[bytes]] = []
    try:
        with (folder / "mosquitto.log").open("ab") as log:
            started.append(subprocess.Popen(["mosquitto", "-c", str(folder / "mosquitto.conf")], stdout=log,
                                            stderr=log))
        wait_until(lambda: _accepts(port), "mosquitto listening")
        with (folder / "server.log").open("ab") as log:
            started.append(subprocess.Popen([*VOUCHD, "server", "--config", str(folder / "server.yaml")],
                                            stdout=log, stderr=log))
        wait_until(lambda: _ready(admin), "vouchd server ready")
        yield port, admin
    finally:
        for process in reversed(started):
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


def _ready(admin: Path) -> bool:
    try:
        return bool(asyncio.run(admin_request(admin, "status", {}, timeout=5)).get("ready"))
    except (OSError, TimeoutError, Exception):
        return False


@contextlib.asynccontextmanager
async def nodes(count: int, port: int, admin: Path) -> AsyncIterator[list[NodeIdentity]]:
    bundle_pem = (await admin_request(admin, "bundle.show", {}, timeout=30))["pem"].encode()
    bundle = X509Bundle.from_pem(TD, bundle_pem)
    async with contextlib.AsyncExitStack() as stack:
        identities = []
        for _ in range(count):
            token = (await admin_request(admin, "token.create", {"node_labels": ["bench:yes"]}, timeout=30))["token"]
            key = ec.generate_private_key(ec.SECP256R1())
            node_id = f"spiffe://example.org/vouchd/node/key/{node_key_hash(node_key_spki(key.public_key()))}"
            link = await stack.enter_async_context(MqttAuthorityLink("127.0.0.1", port, trust_domain="example.org",
                                                                     node_id=node_id))
            identities.append(NodeIdentity(prover=KeyProver(key, trust_domain=TD, join_token=lambda t=token: t),
                                           transport=link, trust_domain=TD, initial_bundle=lambda: bundle))
        yield identities


async def measure(count: int, seconds: float, port: int, admin: Path) -> dict[str, Any]:
    async with nodes(count, port, admin) as identities:
        started = time.perf_counter()
        await asyncio.gather(*(node.attest() for node in identities))
        joins = time.perf_counter() - started
        started = time.perf_counter()
        await asyncio.gather(*(node.attest() for node in identities))
        again = time.perf_counter() - started
        await asyncio.gather(*(node.request(sync_entries=True) for node in identities))

        latencies: list[float] = []
        issued = 0
        deadline = time.perf_counter() + seconds

        async def issue(node: NodeIdentity) -> None:
            nonlocal issued
            entries = (await node.request(sync_entries=True)).entries or ()
            if not entries:
                raise RuntimeError("the bench entry did not reach a node")
            wanted = [JwtSvidRequest(entries[0].id, ("bench",))]
            due = time.perf_counter()
            while due < deadline:
                await asyncio.sleep(max(0.0, due - time.perf_counter()))
                due += PACE
                asked = time.perf_counter()
                response = await node.request(jwt_svids=wanted)
                latencies.append((time.perf_counter() - asked) * 1000)
                issued += len(response.jwt_svids)

        issue_started = time.perf_counter()
        await asyncio.gather(*(issue(node) for node in identities))
        issuing = time.perf_counter() - issue_started
    ordered = sorted(latencies)
    return {
        "nodes": count,
        "joins_per_s": round(count / joins, 1),
        "attestations_per_s": round(count / again, 1),
        "jwt_issued_per_s": round(issued / issuing, 1),
        "request_p50_ms": round(statistics.median(ordered), 2),
        "request_p99_ms": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 2),
    }


def measure_fleet(count: int, seconds: float) -> dict[str, Any]:
    """The whole measurement: processes up, nodes in, figures out, everything stopped and removed."""
    with tempfile.TemporaryDirectory(prefix="vouchd-bench-fleet-") as folder, processes(Path(folder)) as (port, admin):
        return asyncio.run(measure(count, seconds, port, admin))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = measure_fleet(args.nodes, args.seconds)
    text = json.dumps(results, indent=2)
    if args.json is not None:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
