"""Building an Authority from its configuration: the one place that opens its store and keys."""

from __future__ import annotations

from vouchd.authority.ekchain import EkTrust
from vouchd.authority.keys import CaKeeper, load_certificates, load_or_create_signing_key
from vouchd.authority.server import Authority
from vouchd.authority.sqlite import SqliteStore
from vouchd.authority.store import Store, StoreError
from vouchd.clock import SYSTEM_CLOCK, Clock
from vouchd.config import AuthorityConfig
from vouchd.decisions import DecisionSink
from vouchd.policy import PolicyEngine
from vouchd.protocol.transport import Publisher
from vouchd.securefiles import read_private
from vouchd.spiffe import TrustDomain

__all__ = ["AUTHORITY_DATABASE", "open_authority", "open_store"]

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
    store = await open_store(config)
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


async def open_store(config: AuthorityConfig) -> Store:
    """The store `authority.store` names: SQLite (authority.db in state_dir), or PostgreSQL through
    the connection string in `dsn_file`, read without following links and refused when group or
    others may read it (it holds a password)."""
    if config.store.kind == "sqlite":
        return await SqliteStore.open(config.state_dir / AUTHORITY_DATABASE)
    dsn_file = config.store.dsn_file
    if dsn_file is None:
        raise StoreError("authority.store: kind postgres needs dsn_file")
    # Imported here: an authority on SQLite (every standalone agent) never loads libpq.
    from vouchd.authority.postgres import PostgresStore

    try:
        dsn = read_private(dsn_file).decode("utf-8").strip()
    except OSError as err:
        raise StoreError(f"{dsn_file}: cannot read the PostgreSQL connection string: "
                         f"{err.strerror or err}") from None
    except UnicodeDecodeError:
        raise StoreError(f"{dsn_file}: the PostgreSQL connection string is not UTF-8 text") from None
    if not dsn:
        raise StoreError(f"{dsn_file}: the PostgreSQL connection string is empty")
    return await PostgresStore.open(dsn)
