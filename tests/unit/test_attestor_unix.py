"""The unix attestor against real processes: credentials, executable path and hash, cache, rate limit."""

from __future__ import annotations

import asyncio
import grp
import hashlib
import os
import pwd
import shutil
import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from vouchd.attestors import AttestorError, WorkloadProcess, read_start_time
from vouchd.attestors.workload.unix import ExecutableHasher, FileIdentity, TokenBucket, UnixAttestor, inspect_executable
from vouchd.errors import ConfigError
from vouchd.selectors import Selector

SLEEP = Path(shutil.which("sleep") or "/bin/sleep").resolve()


class CountingHasher(ExecutableHasher):
    """Counts how often file content is actually read."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.reads = 0

    def digest_file(self, fd: int) -> str:
        self.reads += 1
        return super().digest_file(fd)


class HeldHasher(CountingHasher):
    """Reads only once the test lets it: `reading` is set while a read waits for `release`."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.reading = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def digest_file(self, fd: int) -> str:
        self.reading.set()
        if not self.release.wait(timeout=10):
            raise AssertionError("the test never released the read")
        return super().digest_file(fd)


class FakeClock:
    """Time that moves only when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def time(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class GatedClock(FakeClock):
    """Fake time whose sleeps also wait until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.sleeping = asyncio.Event()
        self.gate = asyncio.Event()

    async def sleep(self, seconds: float) -> None:
        self.sleeping.set()
        await self.gate.wait()
        await super().sleep(seconds)


Spawn = Callable[[Path], WorkloadProcess]


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Start `binary 60` (a sleep) and describe it as the Workload API would."""
    children: list[subprocess.Popen[bytes]] = []

    def start(binary: Path) -> WorkloadProcess:
        child = subprocess.Popen([str(binary), "60"])
        children.append(child)
        return WorkloadProcess(pid=child.pid, uid=os.getuid(), gid=os.getgid(), start_time=read_start_time(child.pid))

    yield start
    for child in children:
        child.kill()
        child.wait()


def copy_of_sleep(directory: Path, name: str = "my-sleep") -> Path:
    target = directory / name
    shutil.copy2(SLEEP, target)
    target.chmod(0o755)
    return target


def identity_of(process: WorkloadProcess) -> FileIdentity:
    executable = inspect_executable(process.pid)
    assert executable is not None
    return executable.identity


async def read_started(hasher: HeldHasher) -> bool:
    return await asyncio.to_thread(hasher.reading.wait, 10)


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def values(selectors: object, key: str) -> list[str]:
    assert isinstance(selectors, list | tuple)
    return [s.value for s in selectors if isinstance(s, Selector) and s.type == "unix" and s.key == key]


async def test_selectors_describe_the_process(spawn: Spawn, tmp_path: Path) -> None:
    binary = copy_of_sleep(tmp_path)
    process = spawn(binary)

    selectors = await UnixAttestor().attest(process)

    assert values(selectors, "uid") == [str(os.getuid())]
    assert values(selectors, "user") == [pwd.getpwuid(os.getuid()).pw_name]
    assert values(selectors, "gid") == [str(os.getgid())]
    assert values(selectors, "group") == [grp.getgrgid(os.getgid()).gr_name]
    assert sorted(values(selectors, "supplementary_gid")) == sorted(str(g) for g in os.getgroups())
    assert values(selectors, "path") == [str(binary)]
    assert values(selectors, "sha256") == [sha256_of(binary)]


async def test_uid_and_gid_come_from_the_kernel_credentials_not_from_proc(spawn: Spawn) -> None:
    process = spawn(SLEEP)
    as_reported = WorkloadProcess(pid=process.pid, uid=4242, gid=4343, start_time=process.start_time)

    selectors = await UnixAttestor(hash_executables=False).attest(as_reported)

    assert values(selectors, "uid") == ["4242"]
    assert values(selectors, "gid") == ["4343"]


async def test_a_deleted_executable_gives_no_path_and_no_hash(spawn: Spawn, tmp_path: Path) -> None:
    binary = copy_of_sleep(tmp_path)
    process = spawn(binary)
    binary.unlink()

    selectors = await UnixAttestor().attest(process)

    assert values(selectors, "path") == []
    assert values(selectors, "sha256") == []
    assert values(selectors, "uid") == [str(os.getuid())]


async def test_a_cache_hit_does_not_read_the_file_again(spawn: Spawn, tmp_path: Path) -> None:
    binary = copy_of_sleep(tmp_path)
    hasher = CountingHasher()
    attestor = UnixAttestor(hasher=hasher)

    first = await attestor.attest(spawn(binary))
    second = await attestor.attest(spawn(binary))  # another process, same file

    assert hasher.reads == 1
    assert values(first, "sha256") == values(second, "sha256") == [sha256_of(binary)]


async def test_a_different_file_is_hashed_again(spawn: Spawn, tmp_path: Path) -> None:
    hasher = CountingHasher()
    attestor = UnixAttestor(hasher=hasher)

    await attestor.attest(spawn(copy_of_sleep(tmp_path, "one")))
    await attestor.attest(spawn(copy_of_sleep(tmp_path, "two")))  # same bytes, new inode

    assert hasher.reads == 2


async def test_concurrent_attestations_of_one_file_hash_it_once(spawn: Spawn, tmp_path: Path) -> None:
    binary = copy_of_sleep(tmp_path)
    hasher = CountingHasher()
    attestor = UnixAttestor(hasher=hasher)
    processes = [spawn(binary) for _ in range(4)]

    results = await asyncio.gather(*(attestor.attest(p) for p in processes))

    assert hasher.reads == 1
    assert all(values(r, "sha256") == [sha256_of(binary)] for r in results)


async def test_a_caller_whose_process_exits_before_the_shared_read_fails_nobody(spawn: Spawn, tmp_path: Path) -> None:
    clock = GatedClock()
    hasher = HeldHasher(hashes_per_second=1.0, clock=clock.time, sleep=clock.sleep)
    spender = spawn(copy_of_sleep(tmp_path, "other"))
    await hasher.sha256(spender.pid, identity_of(spender))  # takes the bucket's only token
    binary = copy_of_sleep(tmp_path)
    staying = spawn(binary)
    leaving = subprocess.Popen([str(binary), "60"])
    try:
        identity = identity_of(staying)
        first = asyncio.create_task(hasher.sha256(leaving.pid, identity))
        await clock.sleeping.wait()  # the first caller waits for a token...
        second = asyncio.create_task(hasher.sha256(staying.pid, identity))  # ...and the second behind it
    finally:
        leaving.kill()  # ...when the first caller's process exits
        leaving.wait()
    hasher.release.clear()
    hasher.reading.clear()

    clock.gate.set()
    assert await read_started(hasher), "the read for a caller whose process exited must still start"
    hasher.release.set()

    assert await second == sha256_of(binary)
    assert await first == sha256_of(binary)  # the file it ran; the Workload API's re-check refuses the caller
    assert hasher.reads == 2, "both callers share one read"


async def test_a_caller_that_gives_up_does_not_take_the_shared_read_with_it(spawn: Spawn, tmp_path: Path) -> None:
    binary = copy_of_sleep(tmp_path)
    hasher = HeldHasher()
    leader, follower = spawn(binary), spawn(binary)
    identity = identity_of(leader)
    hasher.release.clear()
    first = asyncio.create_task(hasher.sha256(leader.pid, identity))
    assert await read_started(hasher)
    second = asyncio.create_task(hasher.sha256(follower.pid, identity))

    first.cancel()  # the first caller's deadline passed: its own descriptor is closed
    with pytest.raises(asyncio.CancelledError):
        await first
    hasher.release.set()

    assert await second == sha256_of(binary)
    assert hasher.reads == 1


async def test_a_caller_running_another_file_does_not_share_its_read(spawn: Spawn, tmp_path: Path) -> None:
    binary = copy_of_sleep(tmp_path)
    hasher = HeldHasher()
    leader = spawn(binary)
    identity = identity_of(leader)
    impostor = spawn(copy_of_sleep(tmp_path, "other"))
    hasher.release.clear()
    first = asyncio.create_task(hasher.sha256(leader.pid, identity))
    assert await read_started(hasher)

    try:
        with pytest.raises(AttestorError, match=rf"process {impostor.pid} replaced its executable during attestation"):
            await hasher.sha256(impostor.pid, identity)
    finally:
        hasher.release.set()
    assert await first == sha256_of(binary)


async def test_files_above_the_size_limit_are_not_hashed(spawn: Spawn) -> None:
    hasher = CountingHasher(max_bytes=SLEEP.stat().st_size - 1)

    selectors = await UnixAttestor(hasher=hasher).attest(spawn(SLEEP))

    assert values(selectors, "sha256") == []
    assert values(selectors, "path") == [str(SLEEP)]
    assert hasher.reads == 0


async def test_hashing_can_be_switched_off(spawn: Spawn) -> None:
    hasher = CountingHasher()

    selectors = await UnixAttestor(hash_executables=False, hasher=hasher).attest(spawn(SLEEP))

    assert values(selectors, "sha256") == []
    assert values(selectors, "path") == [str(SLEEP)]
    assert hasher.reads == 0


async def test_hashing_is_rate_limited_and_cache_hits_are_free(spawn: Spawn, tmp_path: Path) -> None:
    clock = FakeClock()
    hasher = CountingHasher(hashes_per_second=0.5, clock=clock.time, sleep=clock.sleep)
    attestor = UnixAttestor(hasher=hasher)
    binaries = [copy_of_sleep(tmp_path, f"sleep-{i}") for i in range(3)]

    for binary in binaries:
        await attestor.attest(spawn(binary))
    await attestor.attest(spawn(binaries[0]))

    # One token at start, then one every 2 s; the repeated binary costs none.
    assert clock.sleeps == [pytest.approx(2.0), pytest.approx(2.0)]
    assert hasher.reads == 3


async def test_waiting_for_a_token_is_bounded_by_the_callers_deadline(spawn: Spawn, tmp_path: Path) -> None:
    hasher = CountingHasher(hashes_per_second=0.001)  # real clock: the second hash would wait 1000 s
    attestor = UnixAttestor(hasher=hasher)
    await attestor.attest(spawn(copy_of_sleep(tmp_path, "first")))

    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.05):
            await attestor.attest(spawn(copy_of_sleep(tmp_path, "second")))

    assert hasher.reads == 1


async def test_a_token_bucket_hands_out_its_capacity_then_waits() -> None:
    clock = FakeClock()
    bucket = TokenBucket(4.0, clock=clock.time, sleep=clock.sleep)

    for _ in range(5):
        await bucket.acquire()

    assert clock.sleeps == [pytest.approx(0.25)]


async def test_an_exited_process_is_an_attestor_error() -> None:
    child = subprocess.Popen(["true"])
    child.wait()
    gone = WorkloadProcess(pid=child.pid, uid=0, gid=0, start_time=1)

    with pytest.raises(AttestorError, match=rf"^workloadattestor\(unix\): process {child.pid} has exited$"):
        await UnixAttestor().attest(gone)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"hash_executables": "yes"}, "hash_executables must be true or false"),
        ({"max_hash_bytes": 0}, "max_hash_bytes must be a positive integer"),
        ({"max_hash_bytes": True}, "max_hash_bytes must be a positive integer"),
        ({"hashes_per_second": 0}, "hashes_per_second must be a positive number"),
        ({"hashes_per_second": "fast"}, "hashes_per_second must be a positive number"),
    ],
)
def test_bad_options_are_config_errors(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=rf"^workloadattestor\(unix\): {message}$"):
        UnixAttestor(**options)  # type: ignore[arg-type]
