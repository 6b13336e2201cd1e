"""A fleet across network namespaces: the only connections between hosts are MQTT over veth pairs.

One namespace holds mosquitto and two `vouchd server` replicas on one PostgreSQL; three agent
namespaces each have their own swtpm, and a fourth host has no TPM and joins with a token. What
only reaches across filesystems (the swtpm, PostgreSQL and Workload API Unix sockets) stays on this
machine's filesystem, as it would on each real host. Skips, with the reason, only where network
namespaces cannot be made.
"""

from __future__ import annotations

import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.fleet import (
    DEADLINE,
    Daemon,
    Host,
    fetch_x509,
    hardware_host,
    learn_profile,
    server,
    server_config,
    static_host,
    wait_for,
    write_bundle,
)
from tests.interop.conftest import StreamWatch
from tests.postgres import PostgresServer

pytestmark = pytest.mark.e2e

BROKER_PORT = 1883
HARDWARE_HOSTS = ("a1", "a2", "a3")


def run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=DEADLINE)


@dataclass
class Namespaces:
    tag: str = field(default_factory=lambda: secrets.token_hex(3))
    made: list[str] = field(default_factory=list)
    links: dict[str, str] = field(default_factory=dict)   # agent namespace -> the broker's address seen from it

    def name(self, role: str) -> str:
        return f"vouchd-{self.tag}-{role}"

    def exec_prefix(self, role: str) -> list[str]:
        return ["ip", "netns", "exec", self.name(role)]

    def add(self, role: str) -> None:
        run("ip", "netns", "add", self.name(role))
        self.made.append(self.name(role))
        run(*self.exec_prefix(role), "ip", "link", "set", "lo", "up")

    def connect(self, number: int, role: str) -> None:
        """A veth pair between the server namespace and `role`'s: 10.231.N.1 and 10.231.N.2."""
        server_end, agent_end = f"vd{self.tag}s{number}", f"vd{self.tag}a{number}"
        run("ip", "link", "add", server_end, "type", "veth", "peer", "name", agent_end)
        run("ip", "link", "set", server_end, "netns", self.name("srv"))
        run("ip", "link", "set", agent_end, "netns", self.name(role))
        run(*self.exec_prefix("srv"), "ip", "addr", "add", f"10.231.{number}.1/30", "dev", server_end)
        run(*self.exec_prefix("srv"), "ip", "link", "set", server_end, "up")
        run(*self.exec_prefix(role), "ip", "addr", "add", f"10.231.{number}.2/30", "dev", agent_end)
        run(*self.exec_prefix(role), "ip", "link", "set", agent_end, "up")
        self.links[role] = f"10.231.{number}.1"

    def remove(self) -> None:
        for name in reversed(self.made):  # only what this test made; their veths go with them
            subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=DEADLINE, check=False)


@pytest.fixture
def namespaces() -> Iterator[Namespaces]:
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed: network namespaces cannot be made")
    made = Namespaces()
    try:
        made.add("srv")
    except subprocess.CalledProcessError as err:
        pytest.skip(f"network namespaces cannot be made here: {err.stderr.decode(errors='replace').strip()}")
    try:
        for number, role in enumerate((*HARDWARE_HOSTS, "t1"), start=1):
            made.add(role)
            made.connect(number, role)
        yield made
    finally:
        made.remove()


def start_broker(namespaces: Namespaces, folder: Path) -> subprocess.Popen[bytes]:
    config = folder / "mosquitto.conf"
    config.write_text("persistence false\nset_tcp_nodelay true\nlog_dest stderr\nlog_type error\n"
                      f"user root\nlistener {BROKER_PORT} 0.0.0.0\nallow_anonymous true\n")
    with (folder / "mosquitto.log").open("ab") as log:
        broker = subprocess.Popen([*namespaces.exec_prefix("srv"), "mosquitto", "-c", str(config)],
                                  stdout=log, stderr=log)
    probe = f"import socket; socket.create_connection(('127.0.0.1', {BROKER_PORT}), timeout=0.5).close()"

    def listening() -> bool:
        return subprocess.run([*namespaces.exec_prefix("srv"), sys.executable, "-c", probe],
                              capture_output=True, timeout=DEADLINE, check=False).returncode == 0

    wait_for(listening, "mosquitto listening in the server namespace")
    return broker


def socket_dsn(postgres: PostgresServer, dsn_file: Path) -> str:
    """A new database, reached through the cluster's Unix socket (the servers' namespace has no
    route to this machine's loopback; the filesystem is shared)."""
    dsn = postgres.database().replace("host=127.0.0.1", f"host={postgres.folder}")
    dsn_file.write_text(dsn + "\n")
    dsn_file.chmod(0o600)
    return f"{{kind: postgres, dsn_file: {dsn_file}}}"


def test_a_fleet_in_namespaces_issues_bans_in_a_second_and_outlives_its_authority(
        tmp_path: Path, namespaces: Namespaces, postgres_server: PostgresServer) -> None:
    broker = start_broker(namespaces, tmp_path)
    store = socket_dsn(postgres_server, tmp_path / "dsn")
    bundle = tmp_path / "bundle.pem"
    hosts: list[Host] = [hardware_host(tmp_path, role, broker=(namespaces.links[role], BROKER_PORT), bundle=bundle,
                                       prefix=namespaces.exec_prefix(role)) for role in HARDWARE_HOSTS]
    roots = [h.tpm.manufacturer_root for h in hosts if h.tpm is not None]
    issuers = [h.tpm.manufacturer_issuer for h in hosts if h.tpm is not None]
    replicas: list[Daemon] = []
    for number in (1, 2):
        config = server_config(tmp_path, broker=("127.0.0.1", BROKER_PORT), client_id=f"replica-{number}",
                               state_dir=tmp_path / f"replica-{number}", store=store, ek_roots=roots,
                               ek_intermediates=issuers)
        replicas.append(server(tmp_path, config, f"replica-{number}", prefix=namespaces.exec_prefix("srv")))
    watches: list[StreamWatch] = []
    token_host: Host | None = None
    try:
        replicas[0].start()
        # Replicas share the trust domain's keys: copied from the first, as an operator provisions them.
        for name in ("ca", "jwt", "reply-signing.key"):
            source, target = tmp_path / "replica-1" / name, tmp_path / "replica-2" / name
            target.parent.mkdir(mode=0o700, exist_ok=True)
            (shutil.copytree if source.is_dir() else shutil.copy2)(source, target)
        replicas[1].start()
        write_bundle(replicas[0], bundle)
        for host in hosts:
            learn_profile(tmp_path, host, tmp_path / "replica-1", store=store)
            host.agent.start()
        for host in hosts:
            ek = host.node_id().rsplit("/", 1)[1]
            replicas[0].admin("entry.create", {"spiffe_id": f"spiffe://example.org/{host.name}/web",
                                               "selectors": ["unix:uid:0"], "node_selectors": [f"tpm:ek_hash:{ek}"]})

        # Every agent's workloads get their SVIDs, whichever replica answers.
        for host in hosts:
            wait_for(lambda host=host: fetch_x509(host).returncode == 0, f"{host.name}'s workload SVID")
            watch = StreamWatch(host.socket, 1)
            watches.append(watch)
            watch.wait_until(lambda w, host=host: w.all_hold([f"spiffe://example.org/{host.name}/web"]),
                             f"{host.name}'s stream holds its SVID")

        # A ban reaches the banned host's open stream in under a second; the others keep theirs.
        banned, kept = hosts[0], hosts[1:]
        started = time.monotonic()
        replicas[1].admin("node.ban", {"id": banned.node_id(), "reason": "e2e"})
        # Withdrawn: the stream ends refused (a banned node serves nothing), or goes empty.
        watches[0].wait_until(lambda w: 0 in w.ended or w.all_hold([]), "the banned host's stream withdrawn")
        assert time.monotonic() - started < 1.0, "withdrawn within a second of the ban"
        for host, watch in zip(kept, watches[1:], strict=True):
            assert watch.all_hold([f"spiffe://example.org/{host.name}/web"])
            assert fetch_x509(host).returncode == 0

        # Both replicas down: the hosts serve what they hold.
        for replica in replicas:
            replica.stop()
        for host in kept:
            assert fetch_x509(host).returncode == 0, f"{host.name} serves its held SVID without an authority"

        # One replica back: issuance resumes (a new entry reaches its host).
        replicas[1].start()
        ek = kept[0].node_id().rsplit("/", 1)[1]
        replicas[1].admin("entry.create", {"spiffe_id": f"spiffe://example.org/{kept[0].name}/api",
                                           "selectors": ["unix:uid:0"], "node_selectors": [f"tpm:ek_hash:{ek}"]})
        wait_for(lambda: f"spiffe://example.org/{kept[0].name}/api" in fetch_x509(kept[0]).stdout,
                 "a new SVID issued once a replica is back")

        # A host without a TPM joins with a token and gets only its static-secret entries.
        replicas[1].admin("entry.create", {"spiffe_id": "spiffe://example.org/edge/static",
                                           "selectors": ["unix:uid:0"], "node_selectors": ["node:label:role:edge"],
                                           "min_tier": "static-secret",
                                           "labels": {"vouchd/static-secret-x509": "allow"}})
        replicas[1].admin("entry.create", {"spiffe_id": "spiffe://example.org/edge/hardware-only",
                                           "selectors": ["unix:uid:0"], "node_selectors": ["node:label:role:edge"]})
        token = replicas[1].admin("token.create", {"node_labels": ["role:edge"]})["token"]
        token_host = static_host(tmp_path, "t1", broker=(namespaces.links["t1"], BROKER_PORT), bundle=bundle,
                                 token=token, prefix=namespaces.exec_prefix("t1"))
        token_host.agent.start()
        wait_for(lambda: "spiffe://example.org/edge/static" in fetch_x509(token_host).stdout,
                 "the token host's static-secret SVID")
        status = token_host.agent.admin("status")
        assert status["node"]["tier"] == "static-secret"
        assert [e["spiffe_id"] for e in status["entries"]] == ["spiffe://example.org/edge/static"]
    finally:
        for watch in watches:
            watch.close()
        for host in hosts:
            host.stop()
        if token_host is not None:
            token_host.stop()
        for replica in replicas:
            replica.stop()
        broker.terminate()
        broker.wait(timeout=DEADLINE)
