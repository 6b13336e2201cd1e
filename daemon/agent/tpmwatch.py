"""The agent's watch over its TPM: is it answering, when did it stop, when to give up (DESIGN §11).

The TPM can go away (the device, tpm2-abrmd or a swtpm restarting) or hang mid-command. While it is
away the agent serves what it holds and issues nothing (every issuance needs a quote); back with
the same EK and keys, the node goes on; away longer than `tpm.unreachable_limit`, the agent exits
non-zero, so that systemd's Restart=on-failure starts it afresh. `status()` and `latency()` are what
`vouchd status` shows of it; `problem()` is what health checks and the systemd watchdog read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from pathlib import Path
from typing import Any

from vouchd.agent.notify import notify
from vouchd.agent.svids import SvidManager
from vouchd.config import TpmConfig
from vouchd.spiffe import TrustTier
from vouchd.tpm import TpmService, TpmUnavailableError

__all__ = ["TPM_PROBE_INTERVAL", "TPM_RECONNECT_MAX_INTERVAL", "TPM_STALL_LIMIT", "TpmWatch"]

log = logging.getLogger("vouchd.agent")

# A hardware TPM answers a quote in well under a second and creates an RSA EK in a few; a minute
# without an answer means it is stuck.
TPM_STALL_LIMIT = 60.0
# While the TPM answers, the agent asks it something cheap this often, so that status and health
# say the truth between heartbeats; once it is lost, it tries to reopen it this often, at most.
TPM_PROBE_INTERVAL = 5.0
TPM_RECONNECT_MAX_INTERVAL = 10.0


class TpmWatch:
    def __init__(self, config: TpmConfig, tier: TrustTier, socket_path: Path) -> None:
        self._config = config
        self._tier = tier
        self._socket_path = socket_path
        self.tpm: TpmService | None = None     # set once the TPM service has started

    def problem(self) -> str | None:
        """Why the TPM cannot be used now, or None."""
        if self.tpm is None:
            return None
        stalled = self.tpm.stalled_for()
        if stalled >= TPM_STALL_LIMIT:
            return f"a TPM operation at {self.tpm.tcti} has not returned for {stalled:.0f} s"
        return self.tpm.unavailable

    async def monitor(self, svids: SvidManager) -> None:
        """Notice a TPM that went away, reopen it when it is back, give up past the configured limit.

        While it is away, cached SVIDs are served and nothing is issued (every issuance needs a quote).
        Back with the same EK and keys, the node goes on; the authority demands a full attestation if
        the TPM was reset meanwhile. Away longer than `tpm.unreachable_limit`: the agent exits non-zero,
        so that systemd's Restart=on-failure starts it afresh.
        """
        tpm = self.tpm
        assert tpm is not None
        limit = self._config.unreachable_limit.total_seconds()
        retry = 1.0
        while True:
            if tpm.unavailable is None:
                await asyncio.sleep(TPM_PROBE_INTERVAL)
                with contextlib.suppress(TpmUnavailableError):
                    await tpm.probe()
                if tpm.unavailable is not None:
                    log.error("tpm unreachable", extra={"reason": tpm.unavailable})
                    notify(f"STATUS={tpm.unavailable}")
                retry = 1.0
                continue
            if tpm.unavailable_for() > limit:
                raise TpmUnavailableError(f"{tpm.unavailable}; unreachable for more than {limit:g} s "
                                          "(agent.tpm.unreachable_limit), exiting")
            await asyncio.sleep(min(retry, max(0.1, limit - tpm.unavailable_for() + 0.1)))
            retry = min(retry * 2, TPM_RECONNECT_MAX_INTERVAL)
            try:
                await tpm.reconnect()
            except TpmUnavailableError:
                continue
            log.info("tpm reachable again", extra={"tcti": tpm.tcti})
            notify(f"STATUS=serving on {self._socket_path}")
            svids.retry_now()
            # What was published while the TPM was away could not be fetched (every sync is quoted).
            try:
                await svids.sync_entries()
            except Exception as err:  # the heartbeat tries again
                log.warning("entry sync after the tpm came back failed", extra={"reason": str(err)})

    def status(self) -> dict[str, Any]:
        if self._tier is not TrustTier.HARDWARE:
            return {"state": "none", "reason": f"agent.tier is {self._tier.value}: no TPM is used"}
        if self.tpm is None:
            return {"state": "starting", "tcti": self._config.tcti}
        problem = self.problem()
        if problem is None:
            return {"state": "ok", "tcti": self.tpm.tcti}
        return {"state": "unreachable", "tcti": self.tpm.tcti, "reason": problem,
                "unreachable_for_seconds": round(self.tpm.unavailable_for(), 1),
                "exit_after_seconds": self._config.unreachable_limit.total_seconds()}


    def latency(self) -> dict[str, dict[str, float]]:
        """Per TPM operation: count and milliseconds (every TPM call queues on one device)."""
        if self.tpm is None:
            return {}
        return {op: {key: (int(value) if key == "count" else round(value, 2)) for key, value in figures.items()}
                for op, figures in self.tpm.latency_snapshot().items()}
