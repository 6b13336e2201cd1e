"""Standalone mode: the agent with the authority embedded in its process (DESIGN §1).

The one place that wires the two together, above both (cli -> agent | authority): the agent gets
an AuthorityLink whose transport hands request bytes to the in-process authority and whose bus
hands it the authority's publications, so the same messages, signatures and checks run as in fleet
mode. The authority's admin commands join the agent's admin socket.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace

from vouchd.agent.agent import AuthorityConnector, AuthorityLink, LocalNode
from vouchd.authority.admin import AuthorityAdmin
from vouchd.authority.build import open_authority
from vouchd.clock import SYSTEM_CLOCK, Clock
from vouchd.config import Config
from vouchd.decisions import DecisionSink
from vouchd.entries import Entry
from vouchd.errors import ConfigError
from vouchd.evidence import TpmPublic
from vouchd.policy import PolicyEngine
from vouchd.protocol.identities import ek_hash
from vouchd.protocol.keyproof import node_key_hash
from vouchd.protocol.transport import LocalBus, LocalTransport
from vouchd.selectors import Selector, SelectorSchema

__all__ = ["standalone_connector", "standalone_entries"]


def standalone_entries(entries: Sequence[Entry], local: Selector) -> list[Entry]:
    """Entries of a standalone host; those that name no node are bound to the local node
    (`tpm:ek_hash:<its EK hash>`, or `node:key_hash:<its key hash>` on a host without a TPM)."""
    binding = frozenset({local})
    return [replace(entry, node_selectors=binding) if entry.parent is None and not entry.node_selectors else entry
            for entry in entries]


def standalone_connector(config: Config, *, workload_schema: SelectorSchema, decisions: DecisionSink,
                         clock: Clock = SYSTEM_CLOCK, policy: PolicyEngine | None = None) -> AuthorityConnector:
    """A connector that embeds the authority configured in `config`.

    `workload_schema`: the selectors the agent's attestors produce; entries created at run time are
    checked against it, as the file's entries were. `policy`: the agent's policy set, which the
    authority evaluates again before it signs.
    """
    authority_config = config.authority
    if authority_config is None:
        raise ConfigError(f"{config.source}: authority: section is required with --standalone")

    @contextlib.asynccontextmanager
    async def connect(node: LocalNode) -> AsyncIterator[AuthorityLink]:
        bus = LocalBus()
        authority = await open_authority(authority_config, config.trust_domain, publisher=bus,
                                         decisions=decisions, clock=clock, standalone=True, policy=policy)
        try:
            # The operator of the host is the operator of the authority, so the local node is enrolled
            # here: its EK (whose certificate chain is still checked whenever the TPM has one), or,
            # on a host without a TPM, its node key, at the static-secret tier.
            if node.ek is not None:
                local_ek_hash = ek_hash(TpmPublic.from_tpm2b(node.ek.public))
                await authority.enrol(local_ek_hash, "standalone: local TPM")
                local = Selector("tpm", "ek_hash", local_ek_hash)
            elif node.node_key_public is not None:
                await authority.enrol_node_key(node.node_key_public, "standalone: local node key")
                local = Selector("node", "key_hash", node_key_hash(node.node_key_public))
            else:
                raise ConfigError("standalone: the local node has neither a TPM nor a node key")
            await authority.registry.import_entries(standalone_entries(config.entries, local))
            admin = AuthorityAdmin(authority, workload_schema=workload_schema,
                                   default_node_selectors=frozenset({local}))
            yield AuthorityLink(mode="standalone", transport=LocalTransport(authority.handle), events=bus,
                                initial_bundle=authority.bundle, admin_commands=admin.commands())
        finally:
            await authority.close()

    return connect
