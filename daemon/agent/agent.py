"""The agent's composition root: builds every part from one Config and runs them (DESIGN §1, §11).

Start-up order matters and is the order below: TPM, node keys, the link to the authority (the
connector decides which: vouchd.standalone embeds one), the subscription to what the authority
publishes, node attestation, first entry sync, Workload API socket, admin socket, then READY=1.
Long-running parts are tasks of one TaskGroup; cancelling `run()` stops them all and closes the TPM.
Every decision goes to the one DecisionSink the caller gives (shared with an embedded authority).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import signal
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from vouchd.agent.admin import AdminCommand, AdminServer, check_admin_socket_path, without_args
from vouchd.agent.explain import WorkloadExplainer
from vouchd.agent.holders import IdentityHolders
from vouchd.agent.jwtsvids import JwtSvidCache
from vouchd.agent.metrics import serving_metrics
from vouchd.agent.node import NodeIdentity
from vouchd.agent.notify import notify, watchdog_interval
from vouchd.agent.policing import NodeFacts, WorkloadPolicy
from vouchd.agent.provers import KeyProver, NodeProver, TpmProver, join_token_reader, load_or_create_node_key
from vouchd.agent.savedstate import StateKeeper, saved_state_keeper
from vouchd.agent.svids import SvidManager
from vouchd.agent.tpmadmin import tpm_admin_commands
from vouchd.agent.tpmwatch import TpmWatch
from vouchd.agent.updates import AuthorityUpdates
from vouchd.agent.workload_api.server import WorkloadApiServer, WorkloadApiService, check_socket_path
from vouchd.agent.workloads import AgentWorkloadIdentities, WorkloadActivity
from vouchd.attestors import WorkloadAttestor
from vouchd.attestors.catalog import build_workload_attestors
from vouchd.attestors.workload.pool import stalled_attestation
from vouchd.audit import AnchorSigner, AuditLog, AuditWriteError, KeyAnchorSigner, TpmAnchorSigner
from vouchd.clock import SYSTEM_CLOCK, Clock
from vouchd.config import AgentConfig, Config
from vouchd.decisions import Decision, DecisionBus
from vouchd.errors import ConfigError
from vouchd.policy import PolicyEngine
from vouchd.protocol.transport import AuthorityEvents, AuthorityTransport
from vouchd.spiffe import TrustTier, X509Bundle
from vouchd.tpm import EkInfo, TpmService

__all__ = ["Agent", "AuthorityConnector", "AuthorityLink", "LocalNode", "workload_attestors_from"]

log = logging.getLogger("vouchd.agent")

# Reading an executable takes microseconds: a minute in which every thread a workload attestor reads
# with has been stuck on one file means no caller's executable can be read until the agent restarts.
ATTESTATION_STALL_LIMIT = 60.0


@dataclass(frozen=True)
class AuthorityLink:
    """How this agent reaches its authority, and the trust bundle it starts from."""

    mode: str                                   # "standalone" | "fleet"
    transport: AuthorityTransport
    events: AuthorityEvents                     # what the authority publishes: revocations, node events
    initial_bundle: Callable[[], X509Bundle]
    # Commands the admin socket answers besides the agent's own (a standalone agent: the authority's).
    admin_commands: Mapping[str, AdminCommand] = field(default_factory=dict)


@dataclass(frozen=True)
class LocalNode:
    """What a connector learns of this host: its TPM's EK (hardware tier), or the DER
    SubjectPublicKeyInfo of its software node key (static-secret tier, no TPM)."""

    ek: EkInfo | None = None
    node_key_public: bytes | None = None


# Given this host's node, open the link to the authority (and close it when the agent stops).
AuthorityConnector = Callable[[LocalNode], contextlib.AbstractAsyncContextManager[AuthorityLink]]


def policy_engine_from(config: Config, *, clock: Clock) -> PolicyEngine | None:
    """The agent's policy set, loaded and checked (a PolicyError names the file and line)."""
    if config.agent is None:
        return None
    settings = config.agent.policy
    return PolicyEngine.load(settings.files, audiences=settings.audiences, clock=clock,
                             include_defaults=settings.include_defaults)


def workload_attestors_from(config: Config, holders: IdentityHolders | None = None) -> list[WorkloadAttestor]:
    """The configured workload attestors; a bad plugin name or option names the file and the key.

    `holders` is the agent's record of who holds which identity (for `lineage`); `vouchd config
    check` builds the attestors with an empty one."""
    if config.agent is None:
        return []
    try:
        return build_workload_attestors(config.agent.workload_attestors,
                                        services={"holders": holders if holders is not None else IdentityHolders()})
    except ConfigError as err:
        raise ConfigError(f"{config.source}: agent.workload_attestors: {err}") from None


class Agent:
    def __init__(self, config: Config, connect: AuthorityConnector, *, decisions: DecisionBus,
                 clock: Clock = SYSTEM_CLOCK, policy_engine: PolicyEngine | None = None) -> None:
        """`policy_engine`: the policy set, when the caller shares it (with an embedded authority);
        otherwise the agent loads its own from the configuration."""
        if config.agent is None:
            raise ConfigError(f"{config.source}: agent: section is required to run the agent")
        self._config = config
        self._connect = connect
        self._mode = "starting"
        self._agent_config: AgentConfig = config.agent
        self._clock = clock
        self._started_at = clock.now()
        self._node: NodeIdentity | None = None
        self._svids: SvidManager | None = None
        self._tpm: TpmService | None = None
        self._tpm_watch = TpmWatch(config.agent.tpm, config.agent.tier, config.agent.socket_path)
        self._activity = WorkloadActivity()
        self._decisions = decisions
        self._decisions.subscribe(self._activity.record)
        self._ready = asyncio.Event()
        self._holders = IdentityHolders(clock=self._clock)
        self._audit: AuditLog | None = None
        self._policy_engine: PolicyEngine | None = policy_engine

    @property
    def ready(self) -> asyncio.Event:
        """Set once the Workload API serves (after attestation and the first entry sync)."""
        return self._ready

    async def run(self) -> None:
        # What can be checked cheaply is checked before the TPM and the authority are touched: a typo in
        # the plugin options, a second agent on the same socket, a socket folder others may write to.
        attestors = workload_attestors_from(self._config, self._holders)
        if self._policy_engine is None:
            self._policy_engine = policy_engine_from(self._config, clock=self._clock)
        check_socket_path(self._agent_config.socket_path)
        check_admin_socket_path(self._agent_config.admin_socket_path)
        async with contextlib.AsyncExitStack() as stack:
            # First: a taken port fails before the TPM is touched, and no decision goes uncounted.
            await stack.enter_async_context(serving_metrics(self._agent_config.metrics, self._decisions, self.status))
            prover: NodeProver
            if self._agent_config.tier is TrustTier.HARDWARE:
                tpm = await stack.enter_async_context(self._tpm_service())
                keys = await tpm.ensure_node_keys(self._agent_config.state_dir / "tpm")
                prover = TpmProver(tpm, ak_public=keys.ak.public, node_key_public=keys.node_key.public,
                                   trust_domain=self._config.trust_domain,
                                   event_log_path=self._agent_config.event_log_path)
                anchors: AnchorSigner = TpmAnchorSigner(tpm)
                local = LocalNode(ek=tpm.ek)
            else:
                # No TPM: the node key on disk is the node (static-secret tier, docs/design.md §4.5).
                key = load_or_create_node_key(self._agent_config.state_dir / "node")
                prover = KeyProver(key, trust_domain=self._config.trust_domain,
                                   join_token=join_token_reader(self._agent_config.join_token_file))
                anchors = KeyAnchorSigner(key)
                local = LocalNode(node_key_public=prover.public_key_der)
            await stack.enter_async_context(self._audit_log(anchors))
            link = await stack.enter_async_context(self._connect(local))
            self._mode = link.mode
            node = NodeIdentity(prover=prover, transport=link.transport, trust_domain=self._config.trust_domain,
                                initial_bundle=link.initial_bundle, clock=self._clock)
            self._node = node
            svids = SvidManager(node, clock=self._clock, decisions=self._decisions,
                                issuance_gate=self._audit_refusal)
            self._svids = svids
            # Subscribed before attesting: nothing published from here on is missed.
            AuthorityUpdates(node, svids).subscribe(link.events)
            keeper = saved_state_keeper(self._agent_config, prover, node, svids, self._tpm, clock=self._clock)
            # A restart within the same boot serves what it still holds at once and attests meanwhile.
            restored = keeper is not None and await keeper.restore()
            if not restored:
                notify("STATUS=attesting node")
                await node.attest()
                await svids.sync_entries()
            await self._serve(node, svids, attestors, link.admin_commands, keeper=keeper, attest_now=restored)

    @contextlib.asynccontextmanager
    async def _audit_log(self, anchors: AnchorSigner) -> AsyncIterator[AuditLog]:
        """The audit log, recording every decision of this daemon from here on, anchored by `anchors`
        (TPM quotes; the node key's signatures at the static-secret tier)."""
        settings = self._agent_config.audit
        audit = AuditLog.open(settings.directory, anchors, clock=self._clock,
                              anchor_every=settings.anchor_every,
                              anchor_interval=settings.anchor_interval.total_seconds(),
                              max_file_bytes=settings.max_file_bytes)

        def record(decision: Decision) -> None:
            # A failed write sets audit.failure: `vouchd status` shows it, and nothing is handed out meanwhile.
            failing = audit.failure is not None
            with contextlib.suppress(AuditWriteError):
                audit.record(decision)
            if failing and audit.failure is None and self._svids is not None:
                log.info("the audit log can be written again: issuance resumes")
                self._svids.retry_now()  # what the failure held back is not left to its backoff

        unsubscribe = self._decisions.subscribe(record)
        self._audit = audit
        anchoring = asyncio.create_task(audit.run(), name="audit-anchors")
        try:
            yield audit
        finally:
            unsubscribe()
            anchoring.cancel()
            await asyncio.gather(anchoring, return_exceptions=True)
            await audit.close()  # a last anchor, while the TPM is still there (closed after this)

    def _reload_on_sighup(self) -> None:
        """SIGHUP reloads the policy. Signal handlers belong to the main thread: an agent run on
        another one (embedded in a test or a larger program) reloads through reload_policy() only."""
        if threading.current_thread() is not threading.main_thread():
            log.info("not in the main thread: SIGHUP does not reload the policy; call reload_policy()")
            return
        asyncio.get_running_loop().add_signal_handler(signal.SIGHUP, self.reload_policy)

    def reload_policy(self) -> None:
        """SIGHUP: read the policy files again; a set that does not load leaves the old one in force."""
        if self._policy_engine is None:
            return
        result = self._policy_engine.reload(audiences=self._agent_config.policy.audiences)
        if result.error is not None:
            log.error("policy reload refused, the previous policy set stays in force: %s", result.error,
                      extra={"policy_version": result.previous_version})
            self._note_audit("policy_reload", {"outcome": "refused", "reason": str(result.error),
                                               "policy_version": result.previous_version})
            return
        log.info("policy reloaded", extra={"policy_version": result.policy_version, "changed": result.changed})
        self._note_audit("policy_reload", {"outcome": "ok", "policy_version": result.policy_version,
                                           "previous_version": result.previous_version})

    def _note_audit(self, kind: str, fields: dict[str, object]) -> None:
        if self._audit is not None:
            with contextlib.suppress(AuditWriteError):
                self._audit.note(kind, fields)

    def _node_facts(self) -> NodeFacts:
        """The node as the policy context sees it, now."""
        node = self._node.status if self._node is not None else None
        if node is None:
            return NodeFacts(tier=TrustTier.HARDWARE, state="unconfirmed", quote_age_seconds=None, pcr_profile=None)
        profile = next((s.split(":", 2)[2] for s in node.selectors if s.startswith("tpm:pcr_profile:")), None)
        # The authority's verdict as this agent knows it: banned, stale, or trusted. An exchange that
        # failed (`unconfirmed` in status) is not one: the next request asks the authority afresh,
        # and refusing everything new until the next heartbeat would turn a blip into an outage.
        tier = TrustTier(node.tier)
        quote_age = (math.ceil(max(0.0, self._clock.now() - node.last_quote_at))
                     if tier is TrustTier.HARDWARE else None)  # a static-secret node never quotes
        return NodeFacts(tier=tier, state=self._node_state(None), quote_age_seconds=quote_age, pcr_profile=profile)

    def _audit_refusal(self) -> str | None:
        """Why nothing may be handed out now (the audit log cannot be written), or None."""
        failure = self._audit.failure if self._audit is not None else None
        return None if failure is None else f"the audit log cannot be written: {failure}"

    @contextlib.asynccontextmanager
    async def _tpm_service(self) -> AsyncIterator[TpmService]:
        tpm_config = self._agent_config.tpm
        tpm = TpmService(tpm_config.tcti, ek_type=tpm_config.ek, endorsement_auth_file=tpm_config.endorsement_auth_file,
                         owner_auth_file=tpm_config.owner_auth_file)
        await tpm.start()
        self._tpm = self._tpm_watch.tpm = tpm
        try:
            yield tpm
        finally:
            await tpm.close()

    async def _serve(self, node: NodeIdentity, svids: SvidManager, attestors: list[WorkloadAttestor],
                     admin_commands: Mapping[str, AdminCommand], *, keeper: StateKeeper | None = None,
                     attest_now: bool = False) -> None:
        """Serve until cancelled. `attest_now`: the node serves a saved state and has not attested
        yet: the heartbeat's first beat (which attests) runs at once, not after an interval."""
        jwt_svids = JwtSvidCache(node, svids, self._config.trust_domain, clock=self._clock)
        policy = None
        if self._policy_engine is not None:
            policy = WorkloadPolicy(self._policy_engine, str(self._config.trust_domain.id), self._node_facts,
                                    clock=self._clock, parent_expiry=svids.parents.expiry,
                                    parent_audiences=jwt_svids.audiences_of)
        identities = AgentWorkloadIdentities(self._config.trust_domain, attestors, svids, jwt_svids,
                                             holders=self._holders, policy=policy)
        deadline = self._agent_config.attestation_deadline.total_seconds()
        explain = WorkloadExplainer(attestors, svids, attest_deadline=deadline, policy=policy)
        self._reload_on_sighup()
        service = WorkloadApiService(identities, decisions=self._decisions, issuance_gate=self._audit_refusal,
                                     attest_deadline=deadline,
                                     observer=self._activity)
        workload_api = WorkloadApiServer(service, self._agent_config.socket_path)
        admin = AdminServer(self._agent_config.admin_socket_path,
                            {"status": without_args(self.status), "workload.explain": explain,
                             **tpm_admin_commands(self._tpm), **admin_commands})
        async with contextlib.AsyncExitStack() as stack:
            # Closed in reverse, each within its own bound: the admin socket, then the Workload API
            # (its streams and connections ended), after STOPPING=1.
            await workload_api.start()
            stack.push_async_callback(workload_api.close)
            stack.callback(notify, "STOPPING=1")
            await admin.start()
            stack.push_async_callback(admin.close)
            # Everything loaded at start lives as long as the agent: leave it out of the cyclic
            # collector's full passes, whose pause grows with every object they scan.
            gc.collect()
            gc.freeze()
            self._ready.set()
            notify("READY=1", f"STATUS=serving on {self._agent_config.socket_path}")
            log.info("workload api ready", extra={"socket": str(self._agent_config.socket_path),
                                                  "admin_socket": str(self._agent_config.admin_socket_path),
                                                  "node_id": node.node_id})
            async with asyncio.TaskGroup() as tasks:
                tasks.create_task(svids.run(), name="svid-issuance")
                tasks.create_task(self._heartbeat(node, svids, beat_now=attest_now), name="heartbeat")
                if keeper is not None:
                    tasks.create_task(keeper.run(), name="saved-state")
                if self._tpm is not None:
                    tasks.create_task(self._tpm_watch.monitor(svids), name="tpm-monitor")
                interval = watchdog_interval()
                if interval is not None:
                    tasks.create_task(self._watchdog(interval, attestors), name="watchdog")

    async def _watchdog(self, interval: float, attestors: list[WorkloadAttestor]) -> None:
        """WATCHDOG=1 only while the agent can do its job: the event loop turns, the TPM answers, no
        TPM operation hangs, and no workload attestor has all its threads stuck (ReportsStalls). Every
        credential needs a quote, so an agent without its TPM serves only what it holds until that runs
        out; going silent lets systemd restart it, which also ends threads stuck in a file system."""
        while True:
            problem = self._tpm_watch.problem() or stalled_attestation(attestors, ATTESTATION_STALL_LIMIT)
            if problem is None:
                notify("WATCHDOG=1")
            else:
                log.error("no longer telling systemd the agent is alive", extra={"reason": problem})
            await asyncio.sleep(interval)

    async def _heartbeat(self, node: NodeIdentity, svids: SvidManager, *, beat_now: bool = False) -> None:
        """Continuous attestation (DESIGN §4.5): a quote-bound entry sync every interval, and a full
        attestation, which renews the node SVID, once half of that SVID's lifetime has passed (or at
        once, for a node that has not attested since it started)."""
        interval = self._agent_config.attestation_interval.total_seconds()
        while True:
            if not beat_now:
                await asyncio.sleep(interval)
            beat_now = False
            tpm_problem = self._tpm_watch.problem()
            if tpm_problem is not None:  # nothing can be quoted; the TPM monitor reports and recovers
                notify(f"STATUS={tpm_problem}")
                continue
            failures = []
            try:
                if await node.renew_if_due():
                    log.info("node svid renewed by re-attestation", extra={"node_id": node.node_id})
            except Exception as err:  # the old node SVID is still valid for a while; retry next interval
                log.warning("node svid renewal failed", extra={"reason": str(err)})
                failures.append(f"renewal: {err}")
            try:
                await svids.sync_entries()
            except Exception as err:  # keep serving cached SVIDs; report and retry next interval
                log.warning("heartbeat failed", extra={"reason": str(err)})
                failures.append(f"sync: {err}")
            if svids.banned is not None:
                notify(f"STATUS=node banned by the authority: {svids.banned}")
            elif failures:
                notify(f"STATUS=authority unreachable: {'; '.join(failures)}")
            elif svids.stale_since() is not None:
                notify("STATUS=node stale: no current revocation document; serving cached SVIDs only")
            else:
                notify(f"STATUS=serving on {self._agent_config.socket_path}")

    def status(self) -> dict[str, Any]:
        """What `vouchd status` shows; never key material."""
        now = self._clock.now()
        node = self._node.status if self._node is not None else None
        result: dict[str, Any] = {
            "mode": self._mode,
            "trust_domain": str(self._config.trust_domain),
            "uptime_seconds": round(now - self._started_at, 1),
            "ready": self._ready.is_set(),
            "workload_api_socket": str(self._agent_config.socket_path),
            "node": None,
            "entries": [],
            "svids": [],
            "tpm": self._tpm_watch.status(),
            "tpm_latency_ms": self._tpm_watch.latency(),
            "workloads": self._activity.snapshot(),
            "audit_log": None,
            "audit": None,
        }
        if self._audit is not None:
            audit = self._audit.status()
            result["audit_log"], result["audit"] = audit["path"], audit
        if node is not None:
            result["node"] = {
                "id": node.node_id, "tier": node.tier, "selectors": list(node.selectors),
                "state": self._node_state(node.authority_error),
                "authority_link": "ok" if node.authority_error is None else node.authority_error,
                "svid_serial": node.svid_serial, "svid_expires_in_seconds": round(node.svid_expires_at - now),
                "last_quote_age_seconds": (round(now - node.last_quote_at, 1)
                                           if node.tier == TrustTier.HARDWARE.value else None),
                # the last exchange the authority accepted (each carries a quote or a node key signature)
                "last_exchange_age_seconds": round(now - node.last_quote_at, 1),
                "revocations": self._revocations_status(now),
            }
        if self._svids is not None:
            result["entries"] = [
                {"id": e.id, "revision": e.revision, "spiffe_id": str(e.spiffe_id),
                 "selectors": sorted(str(s) for s in e.selectors)} for e in self._svids.entries
            ]
            result["svids"] = [
                {"entry_id": s.entry_id, "spiffe_id": s.spiffe_id, "serial": s.serial,
                 "expires_in_seconds": round(s.expires_at - now)} for s in self._svids.svids
            ]
        return result

    def _node_state(self, authority_error: str | None) -> str:
        """The authority owns node states; the agent shows what it last heard: banned (by the revocation
        document), stale (no current document), unconfirmed (the last exchange failed), or trusted."""
        if self._svids is not None and self._svids.banned is not None:
            return "banned"
        if self._svids is not None and self._svids.stale_since() is not None:
            return "stale"
        return "trusted" if authority_error is None else "unconfirmed"

    def _revocations_status(self, now: float) -> dict[str, Any] | None:
        document = self._node.revocations if self._node is not None else None
        if document is None:
            return None
        return {"version": document.version, "next_update_in_seconds": round(document.next_update - now),
                "revoked_entries": len(document.entries), "revoked_nodes": len(document.nodes)}
