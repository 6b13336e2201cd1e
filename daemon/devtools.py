"""Development aids that need a software TPM; never used by the agent itself.

`simulate_measured_boot` plays the firmware's part on a swtpm: it writes a TCG2 event log and
extends the same digests into PCRs 0-7, so the authority's whole verification path (log replay
against the quote) runs on machines without measured boot. Real hosts have a log at
/sys/kernel/security/tpm0/binary_bios_measurements written by their firmware.
"""

from __future__ import annotations

import os
from pathlib import Path

from vouchd.errors import VouchdError
from vouchd.evidence import build_event_log, simulated_boot_events
from vouchd.tpm import TpmService

__all__ = ["simulate_measured_boot"]

_SOFTWARE_TCTIS = ("swtpm:", "mssim:")


async def simulate_measured_boot(tcti: str, event_log_path: Path) -> int:
    """Extend a simulated boot into PCRs 0-7 and write its event log; returns the event count.

    Refuses anything but a software TPM: extending made-up measurements into a real TPM would
    corrupt its measured boot state until the next reboot.
    """
    if not tcti.startswith(_SOFTWARE_TCTIS):
        raise VouchdError(f"refusing to simulate a boot on {tcti!r}: only swtpm and mssim TCTIs")
    log, measurements = build_event_log(simulated_boot_events())
    async with TpmService(tcti, pcrs_only=True) as tpm:
        current = await tpm.read_pcrs("sha256", range(8))
        if any(value != bytes(len(value)) for value in current.values()):
            raise VouchdError("PCRs 0-7 are already extended: the simulated boot runs once per TPM start")
        for pcr, digest in measurements:
            await tpm.extend_pcr(pcr, digest)
    event_log_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = event_log_path.with_name(event_log_path.name + ".tmp")
    tmp.write_bytes(log)
    os.replace(tmp, event_log_path)
    return len(measurements)
