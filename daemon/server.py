"""`vouchd server`: the authority as a daemon of its own, for a fleet (DESIGN §1).

The same Authority a standalone agent embeds, on its store (SQLite, or PostgreSQL shared by
replicas), taking requests from the MQTT broker (vouchd.protocol.mqtt: replicas share them) and
answering operators on its own root-only admin socket with the same `entry`, `node`, `profile`,
`bundle` and `token` commands. Start-up order: policy, store and CA, the broker, the file's
entries, the admin socket, then requests and READY=1.

Replicas on one PostgreSQL: each keeps an index of the entries in memory and reads them again every
ENTRY_REFRESH seconds, so an entry created through one replica's admin socket is served by the
others within that time (and the agent that asked is told at once by the replica that made it).
They must share the CA and JWT keys and the reply-signing key (the same `ca/`, `jwt/` and
`reply-signing.key` in each `state_dir`): an agent trusts the roots in its bundle, whichever
replica answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import threading
from typing import Any

from vouchd.agent.admin import AdminServer, check_admin_socket_path, without_args
from vouchd.agent.notify import notify, watchdog_interval
from vouchd.attestors.catalog import selector_schema, workload_attestor_factories
from vouchd.authority.admin import AuthorityAdmin
from vouchd.authority.build import open_authority
from vouchd.authority.server import Authority
from vouchd.clock import SYSTEM_CLOCK, Clock
from vouchd.config import AuthorityConfig, Config
from vouchd.decisions import DecisionSink
from vouchd.errors import ConfigError
from vouchd.fleet import broker_password, broker_tls
from vouchd.policy import PolicyEngine
from vouchd.protocol.mqtt import MqttAuthorityService

__all__ = ["ENTRY_REFRESH", "AuthorityServer"]

log = logging.getLogger("vouchd.server")

ENTRY_REFRESH = 2.0     # seconds between reads of the entries other replicas may have changed


class AuthorityServer:
    def __init__(self, config: Config, *, decisions: DecisionSink, clock: Clock = SYSTEM_CLOCK) -> None:
        if config.authority is None or config.authority.broker is None:
            raise ConfigError(f"{config.source}: `vouchd server` needs authority.broker (the MQTT broker the "
                              "agents reach it through)")
        self._config = config
        self._authority_config: AuthorityConfig = config.authority
        self._decisions = decisions
        self._clock = clock
        self._authority: Authority | None = None
        self._bus: MqttAuthorityService | None = None
        self._ready = asyncio.Event()
        settings = config.authority.policy
        self._policy = PolicyEngine.load(settings.files, audiences=settings.audiences, clock=clock,
                                         include_defaults=settings.include_defaults)

    @property
    def ready(self) -> asyncio.Event:
        return self._ready

    async def run(self) -> None:
        settings = self._authority_config
        broker = settings.broker
        assert broker is not None
        check_admin_socket_path(settings.admin_socket_path)
        password = broker_password(broker, "authority.broker")
        bus = MqttAuthorityService(broker.host, broker.port, trust_domain=str(self._config.trust_domain),
                                   client_id=broker.client_id, tls=broker_tls(broker), username=broker.username,
                                   password=password, share_group=broker.share_group)
        async with contextlib.AsyncExitStack() as stack:
            await stack.enter_async_context(bus)
            self._bus = bus
            authority = await open_authority(settings, self._config.trust_domain, publisher=bus,
                                             decisions=self._decisions, clock=self._clock, policy=self._policy)
            stack.push_async_callback(authority.close)
            self._authority = authority
            await authority.registry.import_entries(self._config.entries)
            # Agents that connect later find the current document retained on the broker.
            await authority.revocations.changed()
            # Entries may name any selector a built-in or installed attestor produces: which ones an
            # agent enables is that agent's business.
            schema = selector_schema(workload_attestor_factories())
            admin = AuthorityAdmin(authority, workload_schema=schema, default_node_selectors=frozenset())
            admin_server = AdminServer(settings.admin_socket_path, {"status": without_args(self.status),
                                                                   **admin.commands()})
            await admin_server.start()
            stack.push_async_callback(admin_server.close)
            await bus.serve(authority.handle)
            self._reload_on_sighup()
            self._ready.set()
            notify("READY=1", f"STATUS=serving {self._config.trust_domain} on the broker {broker.host}:{broker.port}")
            log.info("authority serving", extra={"broker": f"{broker.host}:{broker.port}",
                                                 "admin_socket": str(settings.admin_socket_path)})
            try:
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(self._refresh_entries(authority), name="entry-refresh")
                    interval = watchdog_interval()
                    if interval is not None:
                        tasks.create_task(self._watchdog(interval), name="watchdog")
            finally:
                notify("STOPPING=1")

    async def _refresh_entries(self, authority: Authority) -> None:
        while True:
            await asyncio.sleep(ENTRY_REFRESH)
            try:
                await authority.registry.load()
            except Exception as err:  # the store is away: serve the index held, try again
                log.warning("cannot read the entries again", extra={"reason": str(err)})

    async def _watchdog(self, interval: float) -> None:
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _reload_on_sighup(self) -> None:
        if threading.current_thread() is threading.main_thread():
            asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_policy)

    def reload_policy(self) -> None:
        result = self._policy.reload(audiences=self._authority_config.policy.audiences)
        if result.error is not None:
            log.error("policy reload refused, the previous policy set stays in force: %s", result.error,
                      extra={"policy_version": result.previous_version})
        else:
            log.info("policy reloaded", extra={"policy_version": result.policy_version})

    def status(self) -> dict[str, Any]:
        """What `vouchd status` shows of a server; never key material."""
        bus = self._bus.stats() if self._bus is not None else None
        return {
            "mode": "server",
            "trust_domain": str(self._config.trust_domain),
            "ready": self._ready.is_set(),
            "entries": len(self._authority.registry.index.all()) if self._authority is not None else 0,
            "bus": None if bus is None else dataclasses.asdict(bus),
            "policy_version": self._policy.policy_version,
        }
