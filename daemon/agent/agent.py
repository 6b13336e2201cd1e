"""The agent's composition root: builds every part from one Config and runs them (DESIGN §1, §11).

Start-up order matters and is the order below: TPM, node keys, (embedded authority), node
attestation, first entry sync, Workload API socket, admin socket, then READY=1. Long-running
parts are tasks of one TaskGroup; cancelling `run()` stops them all and closes the TPM.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from vouchd.agent.admin import AdminServer
from vouchd.agent.node import NodeIdentity
from vouchd.agent.notify import notify
from vouchd.agent.svids import SvidManager
from vouchd.agent.workload_api.server import WorkloadApiServer, WorkloadApiService
from vouchd.agent.workloads import AgentWorkloadIdentities
from vouchd.attestors.catalog import build_workload_attestors
from vouchd.authority.entries import Entry
from vouchd.authority.server import Authority
from vouchd.config import AgentConfig, Config, EntryConfig
from vouchd.errors import ConfigError
from vouchd.evidence import TpmPublic
from vouchd.protocol.transport import LocalTransport
from vouchd.selectors import Selector
from vouchd.spiffe import X509Bundle
from vouchd.tpm import TpmService

__all__ = ["Agent", "standalone_entries"]

log = logging.getLogger("vouchd.agent")


def standalone_entries(entries: Sequence[EntryConfig], local_ek_hash: str) -> list[Entry]:
    """Entries of a standalone host; those that name no node are bound to the local TPM's EK."""
    bound = []
    for entry in entries:
        node_selectors = entry.node_selectors
        if entry.parent is None and not node_selectors:
            node_selectors = frozenset({Selector("tpm", "ek_hash", local_ek_hash)})
        bound.append(Entry(
            id=entry.id, revision=1, spiffe_id=entry.spiffe_id, selectors=entry.selectors, parent=entry.parent,
            node_selectors=node_selectors, min_tier=entry.min_tier, x509_ttl=entry.x509_ttl,
            dns_names=entry.dns_names, hint=entry.hint,
        ))
    return bound


class Agent:
    def __init__(self, config: Config, *, standalone: bool) -> None:
        if config.agent is None:
            raise ConfigError(f"{config.source}: agent: section is required to run the agent")
        if standalone and config.authority is None:
            raise ConfigError(f"{config.source}: authority: section is required with --standalone")
        if not standalone:
            raise ConfigError("fleet mode (agent -> authority over MQTT) is not available in this version; "
                              "run `vouchd agent --standalone`")
        self._config = config
        self._agent_config: AgentConfig = config.agent
        self._started_at = time.time()
        self._node: NodeIdentity | None = None
        self._svids: SvidManager | None = None
        self._tpm: TpmService | None = None
        self._authority: Authority | None = None
        self._ready = asyncio.Event()

    @property
    def ready(self) -> asyncio.Event:
        """Set once the Workload API serves (after attestation and the first entry sync)."""
        return self._ready

    async def run(self) -> None:
        async with self._tpm_service() as tpm:
            keys = await tpm.ensure_node_keys(self._agent_config.state_dir / "tpm")
            local_ek_hash = hashlib.sha256(TpmPublic.from_tpm2b(tpm.ek.public).spki_der()).hexdigest()
            with self._embedded_authority(local_ek_hash) as authority:
                node = NodeIdentity(
                    tpm=tpm, ak_public=keys.ak.public, node_key_public=keys.node_key.public,
                    transport=LocalTransport(authority.handle), trust_domain=self._config.trust_domain,
                    initial_bundle=authority.bundle, event_log_path=self._agent_config.event_log_path,
                )
                self._node = node
                notify("STATUS=attesting node")
                await node.attest()
                svids = SvidManager(node)
                self._svids = svids
                await svids.sync_entries()
                await self._serve(node, svids)

    @contextlib.asynccontextmanager
    async def _tpm_service(self) -> AsyncIterator[TpmService]:
        tpm = TpmService(self._agent_config.tpm.tcti, ek_type=self._agent_config.tpm.ek)
        await tpm.start()
        self._tpm = tpm
        try:
            yield tpm
        finally:
            await tpm.close()

    @contextlib.contextmanager
    def _embedded_authority(self, local_ek_hash: str) -> Any:
        assert self._config.authority is not None
        # Standalone: the operator of the host is the operator of the authority, so the local EK is
        # enrolled here. Its certificate chain is still checked when the TPM has one.
        authority = Authority(self._config.authority, self._config.trust_domain,
                              standalone_entries(self._config.entries, local_ek_hash))
        authority.enrol(local_ek_hash, "standalone: local TPM")
        self._authority = authority
        try:
            yield authority
        finally:
            authority.close()

    async def _serve(self, node: NodeIdentity, svids: SvidManager) -> None:
        attestors = build_workload_attestors(self._agent_config.workload_attestors)
        identities = AgentWorkloadIdentities(
            self._config.trust_domain, attestors, svids,
            attestation_deadline=self._agent_config.attestation_deadline.total_seconds())
        service = WorkloadApiService(identities,
                                     attest_deadline=self._agent_config.attestation_deadline.total_seconds())
        workload_api = WorkloadApiServer(service, self._agent_config.socket_path)
        admin = AdminServer(self._agent_config.admin_socket_path, self.status)
        await workload_api.start()
        try:
            await admin.start()
            try:
                self._ready.set()
                notify("READY=1", f"STATUS=serving on {self._agent_config.socket_path}")
                log.info("workload api ready", extra={"socket": str(self._agent_config.socket_path),
                                                      "admin_socket": str(self._agent_config.admin_socket_path),
                                                      "node_id": node.node_id})
                async with asyncio.TaskGroup() as tasks:
                    tasks.create_task(svids.run(), name="svid-issuance")
                    tasks.create_task(self._heartbeat(node, svids), name="heartbeat")
            finally:
                await admin.close()
        finally:
            notify("STOPPING=1")
            await workload_api.close()

    async def _heartbeat(self, node: NodeIdentity, svids: SvidManager) -> None:
        """Continuous attestation (DESIGN §4.5): a quote-bound entry sync every interval, and a full
        attestation, which renews the node SVID, once half of that SVID's lifetime has passed."""
        interval = self._agent_config.attestation_interval.total_seconds()
        while True:
            await asyncio.sleep(interval)
            try:
                if await node.renew_if_due():
                    log.info("node svid renewed by re-attestation", extra={"node_id": node.node_id})
                await svids.sync_entries()
            except Exception as err:  # keep serving cached SVIDs; report and retry next interval
                log.warning("heartbeat failed", extra={"reason": str(err)})
                notify(f"STATUS=authority unreachable: {err}")
            else:
                notify(f"STATUS=serving on {self._agent_config.socket_path}")

    def status(self) -> dict[str, Any]:
        """What `vouchd status` shows; never key material."""
        now = time.time()
        node = self._node.status if self._node is not None else None
        result: dict[str, Any] = {
            "mode": "standalone",
            "trust_domain": str(self._config.trust_domain),
            "uptime_seconds": round(now - self._started_at, 1),
            "ready": self._ready.is_set(),
            "workload_api_socket": str(self._agent_config.socket_path),
            "node": None,
            "entries": [],
            "svids": [],
            "tpm_latency": self._tpm.latency_snapshot() if self._tpm is not None else {},
        }
        if node is not None:
            result["node"] = {
                "id": node.node_id, "tier": node.tier, "selectors": list(node.selectors),
                # The authority owns node states; the agent shows what its last exchange implied.
                "state": "trusted" if node.authority_error is None else "unconfirmed",
                "authority_link": "ok" if node.authority_error is None else node.authority_error,
                "svid_serial": node.svid_serial, "svid_expires_in_seconds": round(node.svid_expires_at - now),
                "last_quote_age_seconds": round(now - node.last_quote_at, 1),
            }
        if self._svids is not None:
            result["entries"] = [
                {"id": e.id, "spiffe_id": e.spiffe_id, "selectors": list(e.selectors)} for e in self._svids.entries
            ]
            result["svids"] = [
                {"entry_id": s.entry_id, "spiffe_id": s.spiffe_id, "serial": s.serial,
                 "expires_in_seconds": round(s.expires_at - now)} for s in self._svids.svids
            ]
        return result

    def bundle(self) -> X509Bundle | None:
        return self._node.bundle() if self._node is not None else None
