"""A swtpm process for tests: provisioned by scripts/swtpm, started and stopped by PID."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SWTPM_SCRIPT = REPO / "scripts" / "swtpm"


@dataclass
class Swtpm:
    """A running swtpm: where to reach it and which manufacturer CA issued its EK certificates."""

    state_dir: Path
    socket_path: Path
    process: subprocess.Popen[bytes]

    @property
    def tcti(self) -> str:
        return f"swtpm:path={self.socket_path}"

    @property
    def ctrl_path(self) -> Path:
        return Path(f"{self.socket_path}.ctrl")

    @property
    def manufacturer_root(self) -> Path:
        return self.state_dir / "ca" / "swtpm-localca-rootca-cert.pem"

    @property
    def manufacturer_issuer(self) -> Path:
        return self.state_dir / "ca" / "issuercert.pem"

    def power_cycle(self) -> None:
        """An orderly reboot: PCRs back to zero, transient objects and sessions gone, resetCount up.

        TPM2_Shutdown first, as an OS does: a TPM reset without it counts as a dictionary-attack
        failure, and a few of those lock out every DA-protected key for the rest of the session.
        """
        subprocess.run(["tpm2_shutdown", "--clear", "-T", self.tcti], check=False, capture_output=True,
                       env={**os.environ, "TSS2_LOG": "all+NONE"})
        subprocess.run(["swtpm_ioctl", "--unix", str(self.ctrl_path), "-i"], check=True,
                       capture_output=True)
        subprocess.run(["tpm2_startup", "--clear", "-T", self.tcti], check=True, capture_output=True,
                       env={**os.environ, "TSS2_LOG": "all+NONE"})

    def kill(self) -> None:
        """kill -9: the TPM goes away mid-whatever, as a crashed simulator or a pulled device would."""
        self.process.kill()
        self.process.wait(timeout=10)

    def restart(self) -> None:
        """After kill(): the same TPM state on the same socket path, freshly powered on."""
        if self.process.poll() is None:
            raise RuntimeError("swtpm is still running")
        for stale in (self.socket_path, self.ctrl_path):
            stale.unlink(missing_ok=True)
        self.process = _spawn(self.state_dir, self.socket_path)

    def stop(self) -> None:
        if self.process.poll() is None:
            subprocess.run(["swtpm_ioctl", "--unix", str(self.ctrl_path), "-s"], capture_output=True,
                           check=False)
            try:
                self.process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.socket_path.parent, ignore_errors=True)  # the mkdtemp folder start() made


def provision(state_dir: Path) -> None:
    subprocess.run([str(SWTPM_SCRIPT), "provision", str(state_dir)], check=True, capture_output=True)


def start(state_dir: Path) -> Swtpm:
    """Start swtpm on a fresh random socket path; returns once it answers."""
    sock_dir = Path(tempfile.mkdtemp(prefix="vouchd-swtpm-"))
    sock = sock_dir / "tpm.sock"
    return Swtpm(state_dir=state_dir, socket_path=sock, process=_spawn(state_dir, sock))


def _spawn(state_dir: Path, sock: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([str(SWTPM_SCRIPT), "start", str(state_dir), str(sock)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while not (sock.exists() and Path(f"{sock}.ctrl").exists()):
        if proc.poll() is not None:
            raise RuntimeError(f"swtpm exited with {proc.returncode} before listening")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("swtpm did not listen within 10 s")
        time.sleep(0.01)
    os.environ.setdefault("TSS2_LOG", "all+NONE")
    return proc
