"""Standalone mode: the agent with the authority embedded in its process (DESIGN §1).

The one place that wires the two together, above both (cli -> agent | authority): the agent gets
an AuthorityLink whose transport hands request bytes to the in-process authority, so the same
messages, signatures and checks run as in fleet mode.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

from vouchd.agent.agent import AuthorityConnector, AuthorityLink
from vouchd.authority.entries import Entry
from vouchd.authority.server import Authority
from vouchd.config import Config, EntryConfig
from vouchd.errors import ConfigError
from vouchd.evidence import TpmPublic
from vouchd.protocol.identities import ek_hash
from vouchd.protocol.transport import LocalTransport
from vouchd.selectors import Selector
from vouchd.tpm import EkInfo

__all__ = ["standalone_connector", "standalone_entries"]


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


def standalone_connector(config: Config) -> AuthorityConnector:
    """A connector that embeds the authority configured in `config`."""
    authority_config = config.authority
    if authority_config is None:
        raise ConfigError(f"{config.source}: authority: section is required with --standalone")

    @contextlib.contextmanager
    def connect(ek: EkInfo) -> Iterator[AuthorityLink]:
        local_ek_hash = ek_hash(TpmPublic.from_tpm2b(ek.public))
        authority = Authority(authority_config, config.trust_domain,
                              standalone_entries(config.entries, local_ek_hash), standalone=True)
        try:
            # The operator of the host is the operator of the authority, so the local EK is enrolled
            # here. Its certificate chain is still checked whenever the TPM has one.
            authority.enrol(local_ek_hash, "standalone: local TPM")
            yield AuthorityLink(mode="standalone", transport=LocalTransport(authority.handle),
                                initial_bundle=authority.bundle)
        finally:
            authority.close()

    return connect
