"""A throw-away PostgreSQL cluster for tests: initdb into a temporary folder, started and stopped by PID.

Debian's `postgresql` package puts its programs in /usr/lib/postgresql/<major>/bin (not on PATH);
elsewhere they are looked for on PATH. The cluster listens on 127.0.0.1 on a free port, with its
unix socket in its own folder, fsync off, password authentication only (a superuser with a random
password), and never touches a system cluster or service. As root, initdb and postgres run as the
`postgres` user (PostgreSQL refuses to run as root).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

# What scripts/test sets: there, a missing PostgreSQL fails the tests instead of skipping them.
REQUIRE_ENV = "VOUCHD_REQUIRE_POSTGRES"
SUPERUSER = "vouchd_test"
START_DEADLINE = 30.0
STOP_DEADLINE = 15.0


def binaries() -> Path | None:
    """The folder holding initdb and postgres: the newest Debian major version, else PATH's."""
    def major(folder: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", folder.parent.name))

    debian = sorted((p.parent for p in Path("/usr/lib/postgresql").glob("*/bin/initdb")), key=major)
    if debian:
        return debian[-1]
    found = shutil.which("initdb")
    if found is not None and shutil.which("postgres", path=str(Path(found).parent)):
        return Path(found).parent
    return None


def missing_reason() -> str | None:
    """Why PostgreSQL tests cannot run here, or None when they can."""
    if binaries() is None:
        return "PostgreSQL is not installed (initdb not found in /usr/lib/postgresql/*/bin or on PATH)"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root, and there is no postgres user to run PostgreSQL as"
    return None


@dataclass
class PostgresServer:
    """A running throw-away cluster; `database()` makes a new, empty database for one test."""

    folder: Path
    port: int
    password: str = field(repr=False)
    process: subprocess.Popen[bytes]
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def dsn(self, dbname: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={SUPERUSER} password={self.password}"

    def database(self) -> str:
        """Create an empty database and return its DSN."""
        name = f"test_{os.getpid()}_{next(self._numbers)}"
        with psycopg.connect(self.dsn(), autocommit=True, connect_timeout=10) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        return self.dsn(name)

    @property
    def log(self) -> Path:
        return self.folder / "postgres.log"

    def stop(self) -> None:
        """Stop the cluster (see shut_down) and remove its folder."""
        self.shut_down()
        shutil.rmtree(self.folder, ignore_errors=True)

    def shut_down(self) -> None:
        """Fast shutdown (SIGINT) of this cluster's postmaster, by PID; SIGKILL if it lingers. Its
        data stays: start_again() brings it back on the same port."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout=STOP_DEADLINE)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=STOP_DEADLINE)

    def start_again(self) -> None:
        bin_dir = binaries()
        assert bin_dir is not None
        again = _launch(bin_dir, self.folder, self.password, _run_as(), port=self.port)
        if again is None:
            raise RuntimeError(f"port {self.port} was taken while postgres was down")
        self.process = again.process


def start() -> PostgresServer:
    """initdb into a new temporary folder and start postgres on a free loopback port."""
    bin_dir = binaries()
    if bin_dir is None:
        raise RuntimeError(missing_reason() or "PostgreSQL is not installed")
    owner = _run_as()
    # In /tmp when run as root: the postgres user must reach the folder (TMPDIR may be root's only).
    folder = Path(tempfile.mkdtemp(prefix="vouchd-postgres-", dir="/tmp" if owner is not None else None))
    try:
        if owner is not None:
            os.chown(folder, owner.pw_uid, owner.pw_gid)
        password = secrets.token_hex(16)
        password_file = folder / "password"
        password_file.write_text(password + "\n")
        if owner is not None:
            os.chown(password_file, owner.pw_uid, owner.pw_gid)
        password_file.chmod(0o600)
        _run([str(bin_dir / "initdb"), "--pgdata", str(folder / "data"), "--username", SUPERUSER,
              "--pwfile", str(password_file), "--auth", "scram-sha-256", "--encoding", "UTF8",
              "--locale", "C", "--no-sync"], owner, folder)
        password_file.unlink()
        for _ in range(5):  # a port found free may be taken before postgres binds it: try another
            server = _launch(bin_dir, folder, password, owner)
            if server is not None:
                return server
        raise RuntimeError(f"postgres did not start; see {folder / 'postgres.log'}")
    except BaseException:
        shutil.rmtree(folder, ignore_errors=True)
        raise


def _run_as() -> pwd.struct_passwd | None:
    return pwd.getpwnam("postgres") if os.geteuid() == 0 else None


def _environment() -> dict[str, str]:
    return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C", "LC_ALL": "C"}


def _run(command: list[str], owner: pwd.struct_passwd | None, folder: Path) -> None:
    result = subprocess.run(command, cwd=folder, env=_environment(), capture_output=True, timeout=120,
                            check=False, user=_uid(owner), group=_gid(owner), extra_groups=_groups(owner))
    if result.returncode != 0:
        raise RuntimeError(f"{command[0]} failed ({result.returncode}): {result.stderr.decode(errors='replace')}")


def _uid(owner: pwd.struct_passwd | None) -> int | None:
    return None if owner is None else owner.pw_uid


def _gid(owner: pwd.struct_passwd | None) -> int | None:
    return None if owner is None else owner.pw_gid


def _groups(owner: pwd.struct_passwd | None) -> list[int] | None:
    return None if owner is None else []  # root's supplementary groups must not follow it


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _launch(bin_dir: Path, folder: Path, password: str, owner: pwd.struct_passwd | None, *,
            port: int | None = None) -> PostgresServer | None:
    """Start postgres in the foreground (so that it stays our child, waited for by PID); None when it
    exited before accepting connections because its port was taken."""
    port = port or _free_port()
    log = (folder / "postgres.log").open("ab")
    with log:
        process = subprocess.Popen(
            [str(bin_dir / "postgres"), "-D", str(folder / "data"), "-p", str(port),
             "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={folder}",
             "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200", "-c", "shared_buffers=32MB"],
            cwd=folder, env=_environment(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True, user=_uid(owner), group=_gid(owner), extra_groups=_groups(owner))
    server = PostgresServer(folder=folder, port=port, password=password, process=process)
    deadline = time.monotonic() + START_DEADLINE
    while time.monotonic() < deadline:
        if process.poll() is not None:
            if "could not bind" in server.log.read_text(errors="replace").lower():
                return None
            raise RuntimeError(f"postgres exited with {process.returncode}: {server.log.read_text(errors='replace')}")
        with contextlib.suppress(psycopg.OperationalError):
            psycopg.connect(server.dsn(), connect_timeout=2).close()
            return server
        time.sleep(0.05)
    server.stop()
    raise RuntimeError(f"postgres did not accept connections within {START_DEADLINE:.0f} s")
