"""A hardware TPM answers in tens to hundreds of milliseconds, not swtpm's one or two. With a 200 ms
delay injected into every TPM command, a burst of 50 new workloads, each its own identity, costs a
few quotes, not 50: callers arriving while a request is out are batched into the next one."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from datetime import timedelta

from tests.tpm.conftest import TRUST_DOMAIN, BootedTpm
from vouchd.agent.node import NodeIdentity
from vouchd.agent.svids import SvidManager
from vouchd.authority.server import Authority
from vouchd.entries import Entry
from vouchd.evidence import TpmPublic
from vouchd.protocol.identities import ek_hash
from vouchd.protocol.transport import LocalTransport
from vouchd.selectors import Selector, selector_set
from vouchd.spiffe import SpiffeId
from vouchd.tpm import EkInfo, NodeKeys, TpmQuote, TpmService

TPM_DELAY = 0.2
WORKLOADS = 50


class SlowTpm:
    """The node's TPM, every command taking TPM_DELAY longer (as a hardware TPM does), counted."""

    def __init__(self, tpm: TpmService) -> None:
        self._tpm = tpm
        self.commands: list[str] = []

    @property
    def ek(self) -> EkInfo:
        return self._tpm.ek

    async def _slow(self, name: str) -> None:
        self.commands.append(name)
        await asyncio.sleep(TPM_DELAY)

    async def activate_credential(self, credential_blob: bytes, encrypted_secret: bytes) -> bytes:
        await self._slow("activate_credential")
        return await self._tpm.activate_credential(credential_blob, encrypted_secret)

    async def quote(self, bank: str, pcrs: Sequence[int], qualifying_data: bytes) -> TpmQuote:
        await self._slow("quote")
        return await self._tpm.quote(bank, pcrs, qualifying_data)

    async def certify_node_key(self, qualifying_data: bytes) -> TpmQuote:
        await self._slow("certify")
        return await self._tpm.certify_node_key(qualifying_data)


async def test_a_burst_of_new_workloads_costs_a_few_tpm_round_trips_not_one_each(
        authority: Authority, tpm: TpmService, node_keys: NodeKeys, booted_tpm: BootedTpm) -> None:
    slow = SlowTpm(tpm)
    node = NodeIdentity.with_tpm(tpm=slow, ak_public=node_keys.ak.public, node_key_public=node_keys.node_key.public,
                                 event_log_path=booted_tpm.event_log, transport=LocalTransport(authority.handle),
                                 trust_domain=TRUST_DOMAIN, initial_bundle=authority.bundle)
    local = ek_hash(TpmPublic.from_tpm2b(tpm.ek.public))
    await authority.enrol(local, "test")
    await authority.registry.import_entries([
        Entry(id=f"w{n}", spiffe_id=SpiffeId.parse(f"spiffe://example.org/burst/{n}"),
              selectors=selector_set([f"unix:uid:{10_000 + n}"]), x509_ttl=timedelta(hours=1),
              node_selectors=frozenset({Selector("tpm", "ek_hash", local)})) for n in range(WORKLOADS)])
    svids = SvidManager(node)
    async with asyncio.timeout(60):
        await node.attest()
        await svids.sync_entries()
        issuing = asyncio.create_task(svids.run())
        try:
            slow.commands.clear()
            started = time.monotonic()
            results = await asyncio.gather(*(svids.x509_svids(selector_set([f"unix:uid:{10_000 + n}"]))
                                             for n in range(WORKLOADS)))
            took = time.monotonic() - started
        finally:
            issuing.cancel()
            await asyncio.gather(issuing, return_exceptions=True)

    assert sorted(svid.spiffe_id for held in results for svid in held) == sorted(
        f"spiffe://example.org/burst/{n}" for n in range(WORKLOADS))
    quotes = slow.commands.count("quote")
    assert quotes <= 3, f"{quotes} TPM quotes for {WORKLOADS} new workloads"
    assert took < WORKLOADS * TPM_DELAY / 5, f"{took:.1f} s: batched, not one TPM round trip each"
