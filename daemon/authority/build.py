"""Building an Authority from its configuration: the one place that opens its store and keys."""

from __future__ import annotations

from vouchd.authority.keys import CaKeeper, load_certificates, load_or_create_signing_key
from vouchd.authority.server import Authority
from vouchd.authority.sqlite import SqliteStore
from vouchd.authority.verifier import EkTrust
from vouchd.clock import SYSTEM_CLOCK, Clock
from vouchd.config import AuthorityConfig
from vouchd.decisions import DecisionSink
from vouchd.policy import PolicyEngine
from vouchd.protocol.transport import Publisher
from vouchd.spiffe import TrustDomain

__all__ = ["AUTHORITY_DATABASE", "open_authority"]

AUTHORITY_DATABASE = "authority.db"
# The JWT-SVID signing keys live in <state_dir>/jwt/ca/, rotated like the CA roots in <state_dir>/ca/.
JWT_KEYS_FOLDER = "jwt"


async def open_authority(config: AuthorityConfig, trust_domain: TrustDomain, *, publisher: Publisher,
                         decisions: DecisionSink, clock: Clock = SYSTEM_CLOCK,
                         standalone: bool = False, policy: PolicyEngine | None = None) -> Authority:
    """An Authority on the store, CA and keys under `config.state_dir`, loaded and ready to answer.

    `policy`: the request-time policy it judges each item by before signing (standalone mode shares
    the agent's, so that one SIGHUP reloads both)."""
    trust = EkTrust(load_certificates(config.ek_roots, "EK root certificate"),
                    load_certificates(config.ek_intermediates, "EK intermediate certificate"))
    store = await SqliteStore.open(config.state_dir / AUTHORITY_DATABASE)
    try:
        authority = Authority(
            config, trust_domain, store=store,
            ca=CaKeeper(config.state_dir, trust_domain, ca_ttl=config.ca_ttl, clock=clock),
            jwt_keys=CaKeeper(config.state_dir / JWT_KEYS_FOLDER, trust_domain, ca_ttl=config.ca_ttl, clock=clock),
            ek_trust=trust, signing_key=load_or_create_signing_key(config.state_dir / "reply-signing.key"),
            clock=clock, publisher=publisher, decisions=decisions, standalone=standalone, policy=policy,
        )
        await authority.start()
    except BaseException:
        await store.close()
        raise
    return authority
