"""A mosquitto broker for tests: its own configuration, a free loopback port, stopped by PID.

Never the host's broker: each instance writes its configuration to a fresh folder, listens on
127.0.0.1 only, and is stopped by the PID this module started. `set_tcp_nodelay true` as in
production (without it every QoS 1 exchange waits ~40 ms on delayed ACKs).

Use the `mosquitto_broker` fixture (one broker for the session) or `start_broker()` for a broker of
a test's own (one to kill and restart, or one with TLS and an ACL file). `raw_client()` is a plain
aiomqtt client, to play a hostile node or to watch topics; `serving()` and `link_for()` put a fake
authority and an agent's link on a broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiomqtt
import pytest

from vouchd.protocol.codec import encode
from vouchd.protocol.messages import NonceRequest
from vouchd.protocol.mqtt import MqttAuthorityLink, MqttAuthorityService, ServiceLimits

__all__ = [
    "OPEN_LIMITS",
    "FakeAuthority",
    "Mosquitto",
    "answer_to",
    "free_port",
    "link_for",
    "mosquitto_broker",
    "new_trust_domain",
    "next_message",
    "no_message",
    "node_id",
    "nonce_request",
    "raw_client",
    "serving",
    "start_broker",
]

_START_TIMEOUT = 10.0


def free_port() -> int:
    """A TCP port nothing listens on right now (the kernel's choice, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Mosquitto:
    """A running broker: where it listens, and the process this module started."""

    port: int
    folder: Path
    extra_config: tuple[str, ...] = ()     # the listener's settings; none: anonymous clients allowed
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)
    host: str = "127.0.0.1"

    @property
    def config_path(self) -> Path:
        return self.folder / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self.folder / "mosquitto.log"

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            raise RuntimeError("mosquitto is already running")
        self.config_path.write_text("\n".join([
            "persistence false",
            "set_tcp_nodelay true",
            "log_dest stderr",
            "log_type error",
            "log_type warning",
            # As root, mosquitto would become the `mosquitto` user after start, and then fail to read
            # an ACL file in the test's folder (/tmp/pytest-of-root is root's alone).
            *(("user root",) if os.geteuid() == 0 else ()),
            f"listener {self.port} {self.host}",
            *(self.extra_config or ("allow_anonymous true",)),
        ]) + "\n")
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(["mosquitto", "-c", str(self.config_path)],
                                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        deadline = time.monotonic() + _START_TIMEOUT
        while not self._accepts():
            if self.process.poll() is not None:
                raise RuntimeError(f"mosquitto exited with {self.process.returncode}: {self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"mosquitto did not listen on port {self.port} within {_START_TIMEOUT:g} s")
            time.sleep(0.01)

    def kill(self) -> None:
        """kill -9: the broker vanishes mid-whatever, as a crashed or rebooted host's would."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
        if self.process is not None:
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)

    def restart(self) -> None:
        """After kill() or stop(): the same configuration on the same port (nothing retained)."""
        self.start()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def _accepts(self) -> bool:
        try:
            with socket.create_connection((self.host, self.port), timeout=0.2):
                return True
        except OSError:
            return False


def start_broker(*, extra_config: Sequence[str] = (), folder: Path | None = None) -> Mosquitto:
    """A broker of its own on a free loopback port, started and answering. `extra_config`: the
    listener's settings (TLS, ACL file) in place of `allow_anonymous true`."""
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed: run ./scripts/setup")
    broker = Mosquitto(port=free_port(), folder=folder or Path(tempfile.mkdtemp(prefix="vouchd-mosquitto-")),
                       extra_config=tuple(extra_config))
    broker.start()
    return broker


@pytest.fixture(scope="session")
def mosquitto_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mosquitto]:
    """One broker for the test session (tests that kill a broker start their own)."""
    broker = start_broker(folder=tmp_path_factory.mktemp("mosquitto"))
    try:
        yield broker
    finally:
        broker.stop()


def raw_client(broker: Mosquitto, client_id: str, *, tls_context: ssl.SSLContext | None = None,
               timeout: float = 5.0) -> aiomqtt.Client:
    """A plain MQTT 5 client (TCP_NODELAY, as every client of the bus must have); `timeout` bounds
    the wait for CONNACK, SUBACK and PUBACK."""
    return aiomqtt.Client(broker.host, broker.port, identifier=client_id, protocol=aiomqtt.ProtocolVersion.V5,
                          socket_options=((socket.IPPROTO_TCP, socket.TCP_NODELAY, 1),), tls_context=tls_context,
                          timeout=timeout)


async def next_message(client: aiomqtt.Client, timeout: float = 5.0) -> aiomqtt.Message:
    """The next message the client receives, within `timeout` seconds."""
    async with asyncio.timeout(timeout):
        return await anext(aiter(client.messages))


async def no_message(client: aiomqtt.Client, within: float = 0.3) -> None:
    """Fails if the client receives anything within `within` seconds."""
    try:
        message = await next_message(client, within)
    except TimeoutError:
        return
    raise AssertionError(f"unexpected message on {message.topic.value}: {message.payload!r:.200}")


# -- vouchd on the bus -------------------------------------------------------------------------

OPEN_LIMITS = ServiceLimits(per_node_rate=10_000, per_node_burst=10_000, total_rate=10_000, total_burst=10_000)


def new_trust_domain() -> str:
    """A trust domain of the test's own: the session's broker keeps other tests' retained messages."""
    return f"t{secrets.token_hex(4)}.example"


def node_id(trust_domain: str, name: str) -> str:
    return f"spiffe://{trust_domain}/vouchd/node/tpm/{hashlib.sha256(name.encode()).hexdigest()}"


def nonce_request(node: str) -> bytes:
    return encode(NonceRequest(node_id=node, request_id=secrets.token_bytes(16)))


def answer_to(request: bytes) -> bytes:
    return b"signed reply to " + hashlib.sha256(request).hexdigest().encode()


class FakeAuthority:
    """Answers every request with a reply naming its digest; remembers what it was handed."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, bytes]] = []

    async def handle(self, topic: str, request: bytes) -> bytes:
        self.seen.append((topic, request))
        return answer_to(request)


@contextlib.asynccontextmanager
async def serving(broker: Mosquitto, trust_domain: str, authority: FakeAuthority, *,
                  limits: ServiceLimits = OPEN_LIMITS) -> AsyncIterator[MqttAuthorityService]:
    async with MqttAuthorityService(broker.host, broker.port, trust_domain=trust_domain, limits=limits) as service:
        assert service.connected
        await service.serve(authority.handle)
        yield service


def link_for(broker: Mosquitto, trust_domain: str, node: str) -> MqttAuthorityLink:
    return MqttAuthorityLink(broker.host, broker.port, trust_domain=trust_domain, node_id=node)
